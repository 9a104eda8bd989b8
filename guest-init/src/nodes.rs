//! Reading what a tar entry describes, and making it on disk with plain
//! syscalls relative to a parent directory fd.
//!
//! `tar::Entry::unpack` is not used anywhere: it turns devices into files,
//! follows symlinks, and applies owners before modes. Here each node is
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
use nix::unistd::{fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

use runasroot_guest::tarfmt::MODE_BITS;
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

/// The node a tar entry asks for: the same kinds the tar writer emits
/// (a hardlink's target is its unsanitised archive name here).
pub use runasroot_guest::tarfmt::Kind as NodeKind;

/// A tar entry, decoded: its raw path, what it is, and its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub path: Vec<u8>,
    pub kind: NodeKind,
    pub meta: Meta,
}

/// Why a tar entry cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescribeError {
    #[error("unsupported tar entry type {0:?}")]
    Type(char),
    #[error("invalid header field {field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("{what} id {id} is out of range (at most {max})")]
    Id { what: &'static str, id: u64, max: u64 },
    #[error("a {what} entry has no link target")]
    NoTarget { what: &'static str },
}

fn field(field: &'static str) -> impl Fn(io::Error) -> DescribeError {
    move |e| DescribeError::Field { field, reason: e.to_string() }
}

/// Parses a PAX time (`1700000000.25`, possibly negative) into a [`Time`].
pub fn parse_pax_time(value: &[u8]) -> Option<Time> {
    let s = std::str::from_utf8(value).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let sec: i64 = int.parse().ok()?;
    let mut nsec: i64 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nsec += i64::from(d - b'0') * 10i64.pow(8 - i as u32);
    }
    Some(if !neg {
        Time { sec, nsec }
    } else if nsec == 0 {
        Time { sec: -sec, nsec: 0 }
    } else {
        Time { sec: -sec - 1, nsec: 1_000_000_000 - nsec }
    })
}

/// Decodes a tar entry. `Ok(None)` for entries that describe no node (a
/// PAX global header). `trusted.overlay.*` xattrs are dropped: they would
/// steer overlayfs (redirect, metacopy, opaque) from inside a layer.
pub fn describe<R: Read>(entry: &mut tar::Entry<'_, R>) -> Result<Option<Described>, DescribeError> {
    let header = entry.header();
    let etype = header.entry_type();
    let path = entry.path_bytes().into_owned();
    let kind = match etype {
        tar::EntryType::XGlobalHeader => return Ok(None),
        tar::EntryType::Directory => NodeKind::Dir,
        // Pre-POSIX tars mark directories by a trailing slash only.
        tar::EntryType::Regular if path.ends_with(b"/") => NodeKind::Dir,
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            NodeKind::File { size: entry.size() }
        }
        tar::EntryType::Symlink => NodeKind::Symlink {
            target: entry
                .link_name_bytes()
                .map(|c| c.into_owned())
                .filter(|t| !t.is_empty())
                .ok_or(DescribeError::NoTarget { what: "symlink" })?,
        },
        tar::EntryType::Link => NodeKind::Hardlink {
            target: entry
                .link_name_bytes()
                .map(|c| c.into_owned())
                .filter(|t| !t.is_empty())
                .ok_or(DescribeError::NoTarget { what: "hardlink" })?,
        },
        tar::EntryType::Char | tar::EntryType::Block => {
            let major = header.device_major().map_err(field("devmajor"))?.unwrap_or(0);
            let minor = header.device_minor().map_err(field("devminor"))?.unwrap_or(0);
            if etype == tar::EntryType::Char {
                NodeKind::Char { major, minor }
            } else {
                NodeKind::Block { major, minor }
            }
        }
        tar::EntryType::Fifo => NodeKind::Fifo,
        other => return Err(DescribeError::Type(other.as_byte() as char)),
    };
    let id = |what: &'static str, v: u64| -> Result<u32, DescribeError> {
        // u32::MAX is chown's "leave unchanged": not an owner.
        if v >= u64::from(u32::MAX) {
            Err(DescribeError::Id { what, id: v, max: u64::from(u32::MAX) - 1 })
        } else {
            Ok(v as u32)
        }
    };
    let mode = header.mode().map_err(field("mode"))? & MODE_BITS;
    let uid = id("uid", header.uid().map_err(field("uid"))?)?;
    let gid = id("gid", header.gid().map_err(field("gid"))?)?;
    let header_mtime = Time { sec: header.mtime().map_err(field("mtime"))? as i64, nsec: 0 };
    let mut mtime = header_mtime;
    // Later records win; a record with an empty value deletes the keyword
    // (POSIX pax: "If the <value> field is zero length, it shall delete
    // any ... value of the same name"), as Go's archive/tar (umoci, Docker)
    // and the host export engine read it.
    let mut xattrs: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = std::collections::BTreeMap::new();
    if let Some(exts) = entry.pax_extensions().map_err(field("pax"))? {
        for ext in exts {
            let ext = ext.map_err(field("pax"))?;
            let (key, value) = (ext.key_bytes(), ext.value_bytes());
            if key == b"mtime" {
                mtime = if value.is_empty() {
                    header_mtime
                } else {
                    parse_pax_time(value).ok_or_else(|| DescribeError::Field {
                        field: "pax mtime",
                        reason: String::from_utf8_lossy(value).into_owned(),
                    })?
                };
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                if name.is_empty() || whiteout::is_overlay_private(name) {
                    continue;
                }
                if value.is_empty() {
                    xattrs.remove(name);
                } else {
                    xattrs.insert(name.to_vec(), value.to_vec());
                }
            }
        }
    }
    let xattrs: Vec<(Vec<u8>, Vec<u8>)> = xattrs.into_iter().collect();
    Ok(Some(Described { path, kind, meta: Meta { mode, uid, gid, mtime, xattrs } }))
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

pub fn hardlink(
    target_dir: BorrowedFd<'_>,
    target: &CStr,
    parent: BorrowedFd<'_>,
    name: &CStr,
) -> Result<(), NodeError> {
    linkat(target_dir, target, parent, name, AtFlags::empty()).map_err(|e| NodeError::Fs("creating the hard link", e.into()))
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

/// Makes a node's xattrs exactly `xattrs` (overlayfs' own aside): a
/// directory listed again in the same layer takes the later entry's
/// metadata whole, as umoci and the host export engine apply it.
pub fn replace_xattrs(parent: BorrowedFd<'_>, name: &CStr, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<(), NodeError> {
    let path = sys::fd_path(parent, name.to_bytes()).map_err(|e| NodeError::Fs("naming the node", e))?;
    for old in sys::llistxattr(&path).map_err(|e| NodeError::Fs("listing xattrs", e))? {
        if whiteout::is_overlay_private(&old) || xattrs.iter().any(|(k, _)| *k == old) {
            continue;
        }
        let k = cstr(&old).map_err(|e| NodeError::Fs("naming the xattr", e))?;
        match sys::lremovexattr(&path, &k) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(source) => return Err(NodeError::Xattr { name: String::from_utf8_lossy(&old).into_owned(), source }),
        }
    }
    set_xattrs(parent, name, xattrs, false)
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

/// The metadata of an existing node (for implicit parents).
pub fn read_meta(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<Meta> {
    let st = fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
    Ok(Meta {
        mode: st.st_mode & MODE_BITS,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: Time { sec: st.st_mtime, nsec: st.st_mtime_nsec },
        xattrs: read_xattrs(parent, name.to_bytes())?,
    })
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

/// A short name for a file type, for messages.
pub fn type_name(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFLNK => "symlink",
        SFlag::S_IFREG => "regular file",
        SFlag::S_IFCHR => "char device",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFIFO => "fifo",
        SFlag::S_IFSOCK => "socket",
        _ => "special file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pax_times() {
        let table: &[(&str, Option<Time>)] = &[
            ("1700000000", Some(Time { sec: 1_700_000_000, nsec: 0 })),
            ("1.25", Some(Time { sec: 1, nsec: 250_000_000 })),
            ("1.1234567899", Some(Time { sec: 1, nsec: 123_456_789 })),
            ("-1.5", Some(Time { sec: -2, nsec: 500_000_000 })),
            ("-3", Some(Time { sec: -3, nsec: 0 })),
            ("", None),
            ("1.x", None),
            (".5", None),
        ];
        for (input, want) in table {
            assert_eq!(parse_pax_time(input.as_bytes()), *want, "{input}");
        }
    }

    fn one(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Result<Option<Described>, DescribeError> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let bytes = b.into_inner().unwrap();
        let mut a = tar::Archive::new(&bytes[..]);
        let mut entries = a.entries().unwrap();
        let mut e = entries.next().unwrap().unwrap();
        describe(&mut e)
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(7);
        h.set_mtime(99);
        h.set_size(0);
        h
    }

    #[test]
    fn describes_entries_with_pax_xattrs_and_times() {
        let got = one(|b| {
            b.append_pax_extensions([
                ("SCHILY.xattr.security.capability", &b"\x01\x00"[..]),
                ("SCHILY.xattr.trusted.overlay.redirect", &b"/x"[..]),
                ("SCHILY.xattr.user.a", &b"1"[..]),
                ("SCHILY.xattr.user.empty", &b""[..]),
                ("SCHILY.xattr.user.gone", &b"x"[..]),
                ("SCHILY.xattr.user.gone", &b""[..]),
                ("mtime", &b"5.5"[..]),
            ])
            .unwrap();
            let mut h = header(tar::EntryType::Regular, 0o104755, 1000);
            h.set_size(3);
            b.append_data(&mut h, "./usr/bin/su", &b"abc"[..]).unwrap();
        })
        .unwrap()
        .unwrap();
        assert_eq!(
            got,
            Described {
                path: b"usr/bin/su".to_vec(),
                kind: NodeKind::File { size: 3 },
                meta: Meta {
                    mode: 0o4755,
                    uid: 1000,
                    gid: 7,
                    mtime: Time { sec: 5, nsec: 500_000_000 },
                    xattrs: vec![
                        (b"security.capability".to_vec(), b"\x01\x00".to_vec()),
                        (b"user.a".to_vec(), b"1".to_vec()),
                    ],
                },
            }
        );
    }

    #[test]
    fn describes_every_node_type() {
        let dev = one(|b| {
            let mut h = header(tar::EntryType::Char, 0o666, 0);
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
            b.append_data(&mut h, "dev/null", &b""[..]).unwrap();
        });
        assert_eq!(dev.unwrap().unwrap().kind, NodeKind::Char { major: 1, minor: 3 });
        let link = one(|b| {
            let mut h = header(tar::EntryType::Link, 0o644, 0);
            b.append_link(&mut h, "b", "a").unwrap();
        });
        assert_eq!(link.unwrap().unwrap().kind, NodeKind::Hardlink { target: b"a".to_vec() });
        let sym = one(|b| {
            let mut h = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut h, "l", "/etc").unwrap();
        });
        assert_eq!(sym.unwrap().unwrap().kind, NodeKind::Symlink { target: b"/etc".to_vec() });
        let fifo = one(|b| {
            let mut h = header(tar::EntryType::Fifo, 0o644, 0);
            b.append_data(&mut h, "p", &b""[..]).unwrap();
        });
        assert_eq!(fifo.unwrap().unwrap().kind, NodeKind::Fifo);
        let old_dir = one(|b| {
            let mut h = header(tar::EntryType::Regular, 0o755, 0);
            b.append_data(&mut h, "d/", &b""[..]).unwrap();
        });
        assert_eq!(old_dir.unwrap().unwrap().kind, NodeKind::Dir);
        let bad_uid = one(|b| {
            let mut h = header(tar::EntryType::Regular, 0o644, u64::from(u32::MAX));
            b.append_data(&mut h, "f", &b""[..]).unwrap();
        });
        assert!(matches!(bad_uid, Err(DescribeError::Id { what: "uid", .. })));
        let odd = one(|b| {
            let mut h = header(tar::EntryType::new(b'V'), 0o644, 0);
            b.append_data(&mut h, "vol", &b""[..]).unwrap();
        });
        assert_eq!(odd, Err(DescribeError::Type('V')));
    }
}
