//! Thin safe wrappers over the syscalls that `nix` does not cover: extended
//! attributes, the new mount API, `openat2`, `swapon`, and the interface
//! flags ioctl that brings `lo` up. Every `unsafe` block of guest-init that
//! is not a `fork` lives here, each one next to the invariant it relies on.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// `FSOPEN_CLOEXEC` (include/uapi/linux/mount.h).
const FSOPEN_CLOEXEC: libc::c_uint = 0x1;
/// `FSCONFIG_SET_STRING` (include/uapi/linux/mount.h, enum fsconfig_command).
const FSCONFIG_SET_STRING: libc::c_uint = 1;
/// `FSCONFIG_CMD_CREATE` (same enum).
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
/// `FSMOUNT_CLOEXEC` (include/uapi/linux/mount.h).
const FSMOUNT_CLOEXEC: libc::c_uint = 0x1;
/// `MOVE_MOUNT_F_EMPTY_PATH` (include/uapi/linux/mount.h).
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
/// An xattr value larger than this is refused by the kernel anyway
/// (XATTR_SIZE_MAX, include/uapi/linux/limits.h).
const XATTR_SIZE_MAX: usize = 65536;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_long(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A path that reaches `name` inside the directory open as `dir`, through
/// `/proc/self/fd`: the xattr calls take paths, and this keeps them short
/// and relative to a directory we already checked (an `O_PATH` fd works).
/// An empty `name` means the directory itself.
pub fn fd_path(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    if name.is_empty() {
        // A trailing "." makes the magic link an intermediate component,
        // so the l*xattr calls act on the directory, not on the link.
        p.push(b'.');
    } else {
        p.extend_from_slice(name);
    }
    CString::new(p).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a file name"))
}

/// The names of the extended attributes of `path` (not following a final
/// symlink). A filesystem without xattr support has none.
pub fn llistxattr(path: &CStr) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: `path` is NUL-terminated and `buf` is valid for
        // `buf.len()` writable bytes for the duration of the call.
        let n = unsafe { libc::llistxattr(path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        match check_size(n) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf.split(|&b| b == 0).filter(|s| !s.is_empty()).map(<[u8]>::to_vec).collect());
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < (1 << 20) => {
                buf.resize(buf.len() * 4, 0);
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
    }
}

/// The value of one extended attribute, `None` when it is not set.
pub fn lgetxattr(path: &CStr, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: both strings are NUL-terminated; `buf` is valid for
        // `buf.len()` writable bytes for the duration of the call.
        let n = unsafe { libc::lgetxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        match check_size(n) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) && buf.len() < XATTR_SIZE_MAX => {
                buf.resize(XATTR_SIZE_MAX, 0);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::EOPNOTSUPP)) => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// Sets one extended attribute (not following a final symlink).
pub fn lsetxattr(path: &CStr, name: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated; `value` is valid for
    // `value.len()` readable bytes for the duration of the call.
    let r = unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    check(r).map(drop)
}

/// Every extended attribute of `path` as (name, value), sorted by name.
pub fn xattrs(path: &CStr) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    for name in llistxattr(path)? {
        let cname = CString::new(name.clone()).expect("xattr names come NUL-separated");
        if let Some(value) = lgetxattr(path, &cname)? {
            out.push((name, value));
        }
    }
    out.sort();
    Ok(out)
}

/// A filesystem context being configured through the new mount API
/// (fsopen/fsconfig/fsmount/move_mount): the only way to hand overlayfs
/// more lower layers than one page of `lowerdir=a:b:c` holds.
pub struct FsContext {
    fd: OwnedFd,
    fstype: String,
}

impl FsContext {
    pub fn open(fstype: &str) -> io::Result<FsContext> {
        let c = CString::new(fstype).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in fs type"))?;
        // SAFETY: fsopen takes a NUL-terminated string and flags; it
        // returns a new fd that we take ownership of below.
        let fd = check_long(unsafe { libc::syscall(libc::SYS_fsopen, c.as_ptr(), FSOPEN_CLOEXEC) })?;
        // SAFETY: fsopen returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        Ok(FsContext { fd, fstype: fstype.to_string() })
    }

    /// `fsconfig(FSCONFIG_SET_STRING, key, value)`. On failure the error
    /// carries the filesystem's own explanation from the context's log.
    pub fn set_string(&self, key: &str, value: &[u8]) -> io::Result<()> {
        let k = CString::new(key).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in key"))?;
        let v = CString::new(value).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in value"))?;
        // SAFETY: the fd is a live fs context; key and value are
        // NUL-terminated and outlive the call; aux is unused (0).
        let r = unsafe {
            libc::syscall(libc::SYS_fsconfig, self.fd.as_raw_fd(), FSCONFIG_SET_STRING, k.as_ptr(), v.as_ptr(), 0)
        };
        check_long(r).map(drop).map_err(|e| self.explain(e))
    }

    /// Creates the superblock, mounts it detached and attaches it at `target`.
    pub fn mount_at(self, target: &CStr) -> io::Result<()> {
        // SAFETY: the fd is a live fs context; key and value are NULL as
        // FSCONFIG_CMD_CREATE requires.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                self.fd.as_raw_fd(),
                FSCONFIG_CMD_CREATE,
                std::ptr::null::<libc::c_char>(),
                std::ptr::null::<libc::c_void>(),
                0,
            )
        };
        check_long(r).map_err(|e| self.explain(e))?;
        // SAFETY: the fd is a created fs context; flags and attributes are
        // plain integers. It returns a new mount fd we own below.
        let m = check_long(unsafe { libc::syscall(libc::SYS_fsmount, self.fd.as_raw_fd(), FSMOUNT_CLOEXEC, 0) })
            .map_err(|e| self.explain(e))?;
        // SAFETY: fsmount returned a fresh fd that nothing else owns.
        let mnt = unsafe { OwnedFd::from_raw_fd(m as RawFd) };
        let empty = c"";
        // SAFETY: `mnt` is a live detached mount, the empty path with
        // MOVE_MOUNT_F_EMPTY_PATH names it, and `target` is NUL-terminated.
        let r = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                mnt.as_raw_fd(),
                empty.as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        check_long(r).map(drop)
    }

    /// Adds the messages the filesystem logged on the context fd (e.g.
    /// "e overlayfs: failed to resolve '/x': -2") to an error.
    fn explain(&self, err: io::Error) -> io::Error {
        let mut msgs = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            // SAFETY: `buf` is valid for `buf.len()` writable bytes; the fd
            // is a live fs context, whose read returns one message or fails.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                break;
            }
            msgs.push(String::from_utf8_lossy(&buf[..n as usize]).trim().to_string());
        }
        if msgs.is_empty() {
            err
        } else {
            io::Error::new(err.kind(), format!("{err} ({}: {})", self.fstype, msgs.join("; ")))
        }
    }
}

/// `openat2(dir, path, flags, resolve)`: opens `path` with the kernel's
/// resolution rules (e.g. `RESOLVE_IN_ROOT`, which resolves symlinks and
/// `..` as if `dir` were `/`).
pub fn openat2(dir: BorrowedFd<'_>, path: &CStr, flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
    /// `struct open_how` (include/uapi/linux/openat2.h); libc's is
    /// non-exhaustive, so it cannot be built outside libc.
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow { flags: (flags | libc::O_CLOEXEC) as u64, mode: 0, resolve };
    // SAFETY: `path` is NUL-terminated, `how` is a valid open_how of the
    // size passed, and both outlive the call.
    let fd = check_long(unsafe {
        libc::syscall(libc::SYS_openat2, dir.as_raw_fd(), path.as_ptr(), &how as *const OpenHow, std::mem::size_of::<OpenHow>())
    })?;
    // SAFETY: openat2 returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `swapon(path, 0)`.
pub fn swapon(path: &CStr) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated and outlives the call.
    check(unsafe { libc::swapon(path.as_ptr(), 0) }).map(drop)
}

/// Brings the loopback interface of the current network namespace up (a
/// new namespace starts with `lo` down, and the guest has no `ip` tool).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket(2) call; the fd is owned right below.
    let s = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket returned a fresh fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming "lo"; SIOCGIFFLAGS fills its
    // flags member.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: SIOCGIFFLAGS just wrote the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: `req` is a valid ifreq naming "lo" with its flags set.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) }).map(drop)
}

/// Size in bytes of the block device open as `fd` (BLKGETSIZE64).
pub fn block_device_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    /// `BLKGETSIZE64` = _IOR(0x12, 114, size_t) (include/uapi/linux/fs.h).
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is
    // valid and aligned for the duration of the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) })?;
    Ok(size)
}

/// Raises the open-file limit (soft and hard) to `n`: the pack walk holds
/// one directory fd per level, and scripts get Docker's 1048576 too.
pub fn raise_nofile(n: u64) -> io::Result<()> {
    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
    // SAFETY: setrlimit reads one valid rlimit struct through the pointer.
    check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn fd_paths_reach_names_and_the_directory_itself() {
        let dir = std::fs::File::open("/").unwrap();
        let n = dir.as_raw_fd();
        assert_eq!(fd_path(dir.as_fd(), b"etc").unwrap().as_bytes(), format!("/proc/self/fd/{n}/etc").as_bytes());
        assert_eq!(fd_path(dir.as_fd(), b"").unwrap().as_bytes(), format!("/proc/self/fd/{n}/.").as_bytes());
        assert!(fd_path(dir.as_fd(), b"a\0b").is_err());
    }

    #[test]
    fn xattr_round_trip_on_a_temp_file() {
        let dir = std::env::temp_dir().join(format!("rar-sys-xattr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, b"").unwrap();
        let p = CString::new(f.to_str().unwrap()).unwrap();
        match lsetxattr(&p, c"user.rar", b"v") {
            Err(e) => eprintln!("skipped: this filesystem refuses user xattrs ({e})"),
            Ok(()) => {
                assert_eq!(lgetxattr(&p, c"user.rar").unwrap(), Some(b"v".to_vec()));
                assert_eq!(lgetxattr(&p, c"user.none").unwrap(), None);
                assert!(xattrs(&p).unwrap().contains(&(b"user.rar".to_vec(), b"v".to_vec())));
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
