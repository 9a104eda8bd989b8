//! Making nodes on disk with plain syscalls relative to a parent directory
//! fd (copy-to-root), from a description read off the lower image.
//!
//! Each node is
//! created by the call that makes its type (open/mkdir/symlink/link/mknod),
//! then owned (lchown), then given its mode (chmod after chown: chown
//! clears setuid), then its xattrs (after chown too: chown clears
//! security.capability), then its mtime (directories last, by the caller).

use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmodat, fstatat, mkdirat, mknodat, utimensat, FchmodatFlags, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchownat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

use runasroot_guest::whiteout;

use crate::sys;

/// Size of the copy buffer for file data.
pub const COPY_BUF: usize = 256 << 10;

/// A file time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    pub sec: i64,
    pub nsec: i64,
}

/// Owner, mode, time and xattrs of a node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// Permission bits with setuid/setgid/sticky (no file type).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Time,
    /// Sorted by name; never `trusted.overlay.*`.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    /// What an implicit directory gets when no layer below has it.
    pub fn default_dir() -> Meta {
        Meta { mode: 0o755, ..Meta::default() }
    }
}

/// What a node is: the same kinds the tar writer emits (a hard link's
/// target is the path of the first name of its inode).
pub use runasroot_guest::tarfmt::Kind as NodeKind;

/// One node to make: its path below the root, what it is, its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub path: Vec<u8>,
    pub kind: NodeKind,
    pub meta: Meta,
}

pub fn cstr(name: &[u8]) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a file name"))
}

fn timespec(t: Time) -> TimeSpec {
    TimeSpec::new(t.sec, t.nsec)
}

/// Creates a regular file and fills it with `size` bytes of `data`; sets
/// owner, mode and mtime through the open fd. Returns the open file (the
/// caller may add xattrs by path).
pub fn create_file(
    parent: BorrowedFd<'_>,
    name: &CStr,
    data: &mut dyn Read,
    size: u64,
    meta: &Meta,
    buf: &mut Vec<u8>,
) -> Result<(), NodeError> {
    let fd = openat(
        parent,
        name,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| NodeError::Fs("creating the file", e.into()))?;
    let mut file = std::fs::File::from(fd);
    buf.resize(COPY_BUF, 0);
    let mut left = size;
    while left > 0 {
        let want = (buf.len() as u64).min(left) as usize;
        let n = match data.read(&mut buf[..want]) {
            Ok(0) => return Err(NodeError::Data(io::Error::new(io::ErrorKind::UnexpectedEof, "the data ends early"))),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NodeError::Data(e)),
        };
        file.write_all(&buf[..n]).map_err(|e| NodeError::Fs("writing the file", e))?;
        left -= n as u64;
    }
    let fd = OwnedFd::from(file);
    nix::unistd::fchown(&fd, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)))
        .map_err(|e| NodeError::Fs("chown", e.into()))?;
    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(meta.mode))
        .map_err(|e| NodeError::Fs("chmod", e.into()))?;
    set_xattrs(parent, name, &meta.xattrs, false)?;
    nix::sys::stat::futimens(&fd, &timespec(meta.mtime), &timespec(meta.mtime))
        .map_err(|e| NodeError::Fs("setting the mtime", e.into()))
}

/// Errors making one node; the caller adds which entry it was.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A filesystem call failed (scratch full shows up here).
    #[error("{0}")]
    Fs(&'static str, #[source] io::Error),
    /// The source of the data failed (a truncated or corrupt stream).
    #[error("reading the entry's data")]
    Data(#[source] io::Error),
    /// An xattr the kernel refuses for a reason other than "unsupported".
    #[error("setting xattr {name}")]
    Xattr {
        name: String,
        #[source]
        source: io::Error,
    },
}

pub fn mkdir(parent: BorrowedFd<'_>, name: &CStr) -> Result<(), NodeError> {
    // 0700 until the real mode is applied right after the owner.
    mkdirat(parent, name, Mode::from_bits_truncate(0o700)).map_err(|e| NodeError::Fs("creating the directory", e.into()))
}

pub fn symlink(parent: BorrowedFd<'_>, name: &CStr, target: &[u8]) -> Result<(), NodeError> {
    let t = cstr(target).map_err(|e| NodeError::Fs("creating the symlink", e))?;
    symlinkat(t.as_c_str(), parent, name).map_err(|e| NodeError::Fs("creating the symlink", e.into()))
}

/// Creates a char/block device or fifo (whiteouts are char 0:0).
pub fn mknod(parent: BorrowedFd<'_>, name: &CStr, kind: SFlag, major: u32, minor: u32) -> Result<(), NodeError> {
    let dev = libc::makedev(major, minor);
    mknodat(parent, name, kind, Mode::from_bits_truncate(0o600), dev).map_err(|e| NodeError::Fs("creating the node", e.into()))
}

/// Owner, then mode (not for symlinks, which have none), then xattrs.
pub fn apply_meta(parent: BorrowedFd<'_>, name: &CStr, is_symlink: bool, meta: &Meta) -> Result<(), NodeError> {
    fchownat(parent, name, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| NodeError::Fs("chown", e.into()))?;
    if !is_symlink {
        fchmodat(parent, name, Mode::from_bits_truncate(meta.mode), FchmodatFlags::FollowSymlink)
            .map_err(|e| NodeError::Fs("chmod", e.into()))?;
    }
    set_xattrs(parent, name, &meta.xattrs, is_symlink)
}

/// Sets xattrs; ones the filesystem cannot store (EOPNOTSUPP: e.g. POSIX
/// ACLs on a tmpfs without them; EPERM: `user.*` on a symlink or device,
/// which the kernel never allows) are skipped rather than failing the run.
pub fn set_xattrs(parent: BorrowedFd<'_>, name: &CStr, xattrs: &[(Vec<u8>, Vec<u8>)], _is_symlink: bool) -> Result<(), NodeError> {
    if xattrs.is_empty() {
        return Ok(());
    }
    let path = sys::fd_path(parent, name.to_bytes()).map_err(|e| NodeError::Fs("naming the node", e))?;
    for (key, value) in xattrs {
        if whiteout::is_overlay_private(key) {
            continue;
        }
        let k = cstr(key).map_err(|e| NodeError::Fs("naming the xattr", e))?;
        match sys::lsetxattr(&path, &k, value) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && key.starts_with(b"user.") => {}
            Err(source) => return Err(NodeError::Xattr { name: String::from_utf8_lossy(key).into_owned(), source }),
        }
    }
    Ok(())
}

pub fn set_mtime(parent: BorrowedFd<'_>, name: &CStr, t: Time) -> Result<(), NodeError> {
    utimensat(parent, name, &timespec(t), &timespec(t), UtimensatFlags::NoFollowSymlink)
        .map_err(|e| NodeError::Fs("setting the mtime", e.into()))
}

/// The xattrs of a node worth carrying (not `trusted.overlay.*`), sorted.
pub fn read_xattrs(parent: BorrowedFd<'_>, name: &[u8]) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let path = sys::fd_path(parent, name)?;
    let mut all = sys::xattrs(&path)?;
    all.retain(|(k, _)| !whiteout::is_overlay_private(k));
    Ok(all)
}

/// Removes a node; a directory with everything below it (never following
/// a symlink: every level is opened with O_NOFOLLOW).
pub fn remove_tree(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let st = fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFDIR {
        return Ok(unlinkat(parent, name, UnlinkatFlags::NoRemoveDir)?);
    }
    let fd = openat(parent, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())?;
    let mut names = Vec::new();
    {
        let mut dir = nix::dir::Dir::from_fd(fd.try_clone()?)?;
        for e in dir.iter() {
            let e = e?;
            let n = e.file_name();
            if n != c"." && n != c".." {
                names.push(n.to_owned());
            }
        }
    }
    for n in names {
        remove_tree(fd.as_fd(), &n)?;
    }
    Ok(unlinkat(parent, name, UnlinkatFlags::RemoveDir)?)
}

