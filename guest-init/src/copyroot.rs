//! `--copy-to-root`: the tree the host put in the lower image
//! ([`contract::LOWER_COPY`]) copied into the merged view before the
//! script runs, so it lands in the upper dir and becomes part of the new
//! layer (nixpkgs' copyToRoot). The host already merged every
//! `--copy-to-root` item into that one tree; here it is walked depth first
//! (a directory before its contents, names sorted) and each node made.
//!
//! Owners, modes, times and xattrs as the tree has them. Paths resolve
//! inside the merged root the way they would for a process chrooted there
//! (`openat2` with `RESOLVE_IN_ROOT`): `bin/x` over a base whose `/bin` is
//! a symlink to `usr/bin` lands in `/usr/bin/x`, as Docker's COPY does, and
//! no symlink of the base can lead outside the root. An existing symlink
//! to a directory is kept when the tree has that directory (like GNU tar's
//! --keep-directory-symlink), so merged-/usr bases stay intact. Names
//! sharing an inode in the tree become hard links to the first one copied.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{openat, readlinkat, AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{fstatat, major, minor, FileStat, Mode, SFlag};
use nix::unistd::linkat;

use runasroot_guest::contract::FailureKind;
use runasroot_guest::tarfmt::MODE_BITS;
use runasroot_guest::whiteout;

use crate::fail::GuestError;
use crate::nodes::{self, cstr, Described, NodeError, NodeKind, Time};
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("copy-to-root: reading {entry:?} in the lower image")]
    Read {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("copy-to-root: entry {entry:?}: {reason}")]
    BadEntry { entry: String, reason: String },
    #[error("copy-to-root: entry {entry:?}: {what}")]
    Fs {
        entry: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("copy-to-root: entry {entry:?}")]
    Node {
        entry: String,
        #[source]
        source: NodeError,
    },
}

impl GuestError for CopyError {
    fn kind(&self) -> FailureKind {
        match self {
            CopyError::Fs { .. } | CopyError::Node { source: NodeError::Fs(..), .. } | CopyError::Read { .. } => {
                FailureKind::Internal
            }
            _ => FailureKind::BadInput,
        }
    }
    fn on_scratch(&self) -> bool {
        !matches!(self, CopyError::Read { .. } | CopyError::Node { source: NodeError::Data(_), .. })
    }
}

/// Resolution of every path below the merged root: symlinks and `..` as
/// if the root were `/`; no magic links (/proc is not mounted there yet).
const IN_ROOT: u64 = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;

/// Copies the tree at `tree` (the lower image's copy directory) into the
/// tree at `root`; returns the number of nodes made.
pub fn apply(tree: &Path, root: &Path) -> Result<u64, CopyError> {
    let read_err = |entry: &[u8]| {
        let entry = lossy(entry);
        move |source| CopyError::Read { entry: entry.clone(), source }
    };
    let root = openat(AT_FDCWD, root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| read_err(b"")(e.into()))?;
    let src = openat(AT_FDCWD, tree, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| read_err(b"")(e.into()))?;
    let mut copier = Copier { root: root.as_fd(), links: HashMap::new(), buf: Vec::new(), count: 0 };
    copier.dir(src.as_fd(), &mut Vec::new())?;
    Ok(copier.count)
}

struct Copier<'a> {
    root: BorrowedFd<'a>,
    /// (dev, ino) of nodes with several names → the path copied first.
    links: HashMap<(u64, u64), Vec<u8>>,
    buf: Vec<u8>,
    count: u64,
}

impl Copier<'_> {
    fn dir(&mut self, dir: BorrowedFd<'_>, prefix: &mut Vec<u8>) -> Result<(), CopyError> {
        let read_err = |entry: &[u8]| {
            let entry = lossy(entry);
            move |source| CopyError::Read { entry: entry.clone(), source }
        };
        let mut names = Vec::new();
        {
            let mut d = nix::dir::Dir::openat(dir, c".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|e| read_err(prefix)(e.into()))?;
            for e in d.iter() {
                let n = e.map_err(|e| read_err(prefix)(e.into()))?.file_name().to_bytes().to_vec();
                if n != b"." && n != b".." {
                    names.push(n);
                }
            }
        }
        names.sort();
        for name in names {
            let len = prefix.len();
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(&name);
            let c = cstr(&name).map_err(read_err(prefix))?;
            let st = fstatat(dir, c.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| read_err(prefix)(e.into()))?;
            let d = self.describe(dir, &c, &st, prefix).map_err(read_err(prefix))?;
            if d.kind == NodeKind::Dir {
                apply_entry(self.root, &d, None, &mut self.buf)?;
                self.count += 1;
                let sub = openat(dir, c.as_c_str(), OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
                    .map_err(|e| read_err(prefix)(e.into()))?;
                self.dir(sub.as_fd(), prefix)?;
            } else {
                let mut data = match d.kind {
                    NodeKind::File { .. } => Some(File::from(
                        openat(dir, c.as_c_str(), OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
                            .map_err(|e| read_err(prefix)(e.into()))?,
                    )),
                    _ => None,
                };
                apply_entry(self.root, &d, data.as_mut().map(|f| f as &mut dyn io::Read), &mut self.buf)?;
                self.count += 1;
            }
            prefix.truncate(len);
        }
        Ok(())
    }

    /// What the lower image holds at `name`, as a node to make.
    fn describe(&mut self, dir: BorrowedFd<'_>, name: &CString, st: &FileStat, path: &[u8]) -> io::Result<Described> {
        let ft = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        let meta = nodes::Meta {
            mode: st.st_mode & MODE_BITS,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: Time { sec: st.st_mtime, nsec: st.st_mtime_nsec },
            xattrs: nodes::read_xattrs(dir, name.as_bytes())?,
        };
        if ft != SFlag::S_IFDIR && st.st_nlink > 1 {
            let key = (st.st_dev, st.st_ino);
            if let Some(first) = self.links.get(&key) {
                return Ok(Described { path: path.to_vec(), kind: NodeKind::Hardlink { target: first.clone() }, meta });
            }
            self.links.insert(key, path.to_vec());
        }
        let (ma, mi) = (major(st.st_rdev) as u32, minor(st.st_rdev) as u32);
        let kind = match ft {
            SFlag::S_IFDIR => NodeKind::Dir,
            SFlag::S_IFREG => NodeKind::File { size: st.st_size as u64 },
            SFlag::S_IFLNK => NodeKind::Symlink { target: readlinkat(dir, name.as_c_str())?.into_encoded_bytes() },
            SFlag::S_IFCHR => NodeKind::Char { major: ma, minor: mi },
            SFlag::S_IFBLK => NodeKind::Block { major: ma, minor: mi },
            SFlag::S_IFIFO => NodeKind::Fifo,
            _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "a socket or unknown node in the lower image")),
        };
        Ok(Described { path: path.to_vec(), kind, meta })
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The path's components: the tree's own names, which the host checked.
fn components(path: &[u8]) -> Vec<&[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect()
}

fn open_in_root(root: BorrowedFd<'_>, rel: &[u8], flags: OFlag) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { CString::new(".").expect("constant") } else { cstr(rel)? };
    sys::openat2(root, &rel, flags.bits(), IN_ROOT)
}

/// The directory `comps` names inside the root, made (0755 root:root)
/// where missing.
fn parent_dir(root: BorrowedFd<'_>, entry: &[u8], comps: &[&[u8]]) -> Result<OwnedFd, CopyError> {
    let fs_err = |what| move |source| CopyError::Fs { entry: lossy(entry), what, source };
    let mut dir = open_in_root(root, b"", OFlag::O_PATH | OFlag::O_DIRECTORY).map_err(fs_err("opening the root"))?;
    for n in 1..=comps.len() {
        let rel = comps[..n].join(&b'/');
        dir = match open_in_root(root, &rel, OFlag::O_PATH | OFlag::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let name = cstr(comps[n - 1]).map_err(fs_err("naming a parent"))?;
                match nodes::mkdir(dir.as_fd(), &name) {
                    Err(NodeError::Fs(_, e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                        return Err(CopyError::BadEntry {
                            entry: lossy(entry),
                            reason: format!("{:?} is a symlink to a missing directory", lossy(&rel)),
                        })
                    }
                    r => r.map_err(|source| CopyError::Node { entry: lossy(entry), source })?,
                }
                let dm = nodes::Meta::default_dir();
                nodes::apply_meta(dir.as_fd(), &name, false, &dm).map_err(|source| CopyError::Node { entry: lossy(entry), source })?;
                open_in_root(root, &rel, OFlag::O_PATH | OFlag::O_DIRECTORY).map_err(fs_err("opening a parent it made"))?
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(CopyError::BadEntry {
                    entry: lossy(entry),
                    reason: format!("{:?} is not a directory in the image", lossy(&rel)),
                })
            }
            Err(e) => return Err(fs_err("opening a parent")(e)),
        };
    }
    Ok(dir)
}

fn apply_entry(root: BorrowedFd<'_>, d: &Described, data: Option<&mut dyn io::Read>, buf: &mut Vec<u8>) -> Result<(), CopyError> {
    let bad = |reason: String| CopyError::BadEntry { entry: lossy(&d.path), reason };
    let node_err = |source| CopyError::Node { entry: lossy(&d.path), source };
    let fs_err = |what| move |source| CopyError::Fs { entry: lossy(&d.path), what, source };
    let comps = components(&d.path);
    if let Some(c) = comps.iter().find(|c| c.starts_with(whiteout::PREFIX)) {
        return Err(bad(format!("{:?} is a whiteout name, which an image layer cannot carry as a file", lossy(c))));
    }
    let Some((last, dir)) = comps.split_last() else {
        // The root's own entry: its metadata is never part of a layer.
        return Ok(());
    };
    let parent = parent_dir(root, &d.path, dir)?;
    let parent = parent.as_fd();
    let name = cstr(last).map_err(fs_err("naming the entry"))?;
    let existing = match fstatat(parent, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Some(SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())),
        Err(nix::Error::ENOENT) => None,
        Err(e) => return Err(fs_err("looking at the existing entry")(e.into())),
    };
    if d.kind == NodeKind::Dir {
        match existing {
            Some(SFlag::S_IFDIR) => {
                nodes::apply_meta(parent, &name, false, &d.meta).map_err(node_err)?;
                return Ok(());
            }
            Some(SFlag::S_IFLNK) if open_in_root(root, &comps.join(&b'/'), OFlag::O_PATH | OFlag::O_DIRECTORY).is_ok() => {
                return Ok(());
            }
            _ => {}
        }
    }
    if existing.is_some() {
        nodes::remove_tree(parent, &name).map_err(fs_err("removing the existing entry"))?;
    }
    match &d.kind {
        NodeKind::File { size } => {
            let data = data.ok_or_else(|| bad("a file without its content".into()))?;
            nodes::create_file(parent, &name, data, *size, &d.meta, buf).map_err(node_err)?
        }
        NodeKind::Dir => {
            nodes::mkdir(parent, &name).map_err(node_err)?;
            nodes::apply_meta(parent, &name, false, &d.meta).map_err(node_err)?;
        }
        NodeKind::Symlink { target } => {
            nodes::symlink(parent, &name, target).map_err(node_err)?;
            nodes::apply_meta(parent, &name, true, &d.meta).map_err(node_err)?;
            nodes::set_mtime(parent, &name, d.meta.mtime).map_err(node_err)?;
        }
        NodeKind::Char { major: 0, minor: 0 } => {
            return Err(bad("a char device 0:0 would be read as a whiteout in the new layer".into()));
        }
        NodeKind::Char { major, minor } | NodeKind::Block { major, minor } => {
            let kind = if matches!(d.kind, NodeKind::Char { .. }) { SFlag::S_IFCHR } else { SFlag::S_IFBLK };
            nodes::mknod(parent, &name, kind, *major, *minor).map_err(node_err)?;
            nodes::apply_meta(parent, &name, false, &d.meta).map_err(node_err)?;
            nodes::set_mtime(parent, &name, d.meta.mtime).map_err(node_err)?;
        }
        NodeKind::Fifo => {
            nodes::mknod(parent, &name, SFlag::S_IFIFO, 0, 0).map_err(node_err)?;
            nodes::apply_meta(parent, &name, false, &d.meta).map_err(node_err)?;
            nodes::set_mtime(parent, &name, d.meta.mtime).map_err(node_err)?;
        }
        NodeKind::Hardlink { target } => {
            let target_fd = open_in_root(root, &components(target).join(&b'/'), OFlag::O_PATH | OFlag::O_NOFOLLOW)
                .map_err(|e| bad(format!("hardlink target {:?} does not exist: {e}", lossy(target))))?;
            // AT_EMPTY_PATH links the inode the O_PATH fd holds: the target
            // as resolved in the root, not a path resolved again. The link
            // shows its target's metadata, as in a layer.
            linkat(target_fd.as_fd(), c"", parent, name.as_c_str(), AtFlags::AT_EMPTY_PATH)
                .map_err(|e| node_err(NodeError::Fs("creating the hard link", e.into())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn copies_into_the_root_through_its_symlinks_but_never_out_of_it() {
        if !is_root() {
            eprintln!("skipped: needs root (chown to other owners)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("rar-copyroot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let root = dir.join("root");
        let outside = dir.join("outside");
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // The same absolute path inside the root, where the link must lead.
        std::fs::create_dir_all(root.join(outside.strip_prefix("/").unwrap())).unwrap();
        std::os::unix::fs::symlink("/nonexistent", root.join("dangling")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
        std::fs::write(root.join("replaced"), b"old").unwrap();

        // The tree to copy, as the lower image would show it.
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("bin")).unwrap();
        std::fs::write(tree.join("bin/tool"), b"hi").unwrap();
        std::os::unix::fs::chown(tree.join("bin/tool"), Some(1000), Some(1000)).unwrap();
        std::fs::set_permissions(tree.join("bin/tool"), std::os::unix::fs::PermissionsExt::from_mode(0o4755)).unwrap();
        std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
        std::fs::hard_link(tree.join("bin/tool"), tree.join("usr/bin/tool2")).unwrap();
        std::fs::create_dir_all(tree.join("escape")).unwrap();
        std::fs::write(tree.join("escape/x"), b"x").unwrap();
        std::fs::create_dir_all(tree.join("replaced")).unwrap();
        std::os::unix::fs::chown(tree.join("replaced"), Some(1000), Some(1000)).unwrap();
        std::fs::set_permissions(tree.join("replaced"), std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        std::fs::create_dir_all(tree.join("deep/new")).unwrap();
        std::fs::write(tree.join("deep/new/f"), b"f").unwrap();

        // bin/, bin/tool, deep/, deep/new/, deep/new/f, escape/, escape/x,
        // replaced/, usr/, usr/bin/, usr/bin/tool2.
        assert_eq!(apply(&tree, &root).unwrap(), 11);
        assert!(std::fs::symlink_metadata(root.join("bin")).unwrap().file_type().is_symlink(), "bin stays a symlink");
        let tool = std::fs::metadata(root.join("usr/bin/tool")).unwrap();
        assert_eq!((tool.mode() & 0o7777, tool.uid(), tool.nlink()), (0o4755, 1000, 2));
        assert_eq!(std::fs::read(root.join("usr/bin/tool2")).unwrap(), b"hi");
        // The absolute symlink resolves inside the root, not on the host.
        assert_eq!(std::fs::read(root.join(outside.strip_prefix("/").unwrap()).join("x")).unwrap(), b"x");
        assert!(!outside.join("x").exists());
        let replaced = std::fs::symlink_metadata(root.join("replaced")).unwrap();
        assert!(replaced.is_dir());
        assert_eq!((replaced.mode() & 0o7777, replaced.uid()), (0o700, 1000));
        assert_eq!(std::fs::read(root.join("deep/new/f")).unwrap(), b"f");

        let dangling = dir.join("dangling-tree");
        std::fs::create_dir_all(dangling.join("dangling")).unwrap();
        std::fs::write(dangling.join("dangling/x"), b"").unwrap();
        // A directory of the tree replaces a symlink that leads nowhere (a
        // symlink to a directory is kept, as above), as tar does.
        assert_eq!(apply(&dangling, &root).unwrap(), 2);
        assert!(std::fs::symlink_metadata(root.join("dangling")).unwrap().is_dir());

        let wh = dir.join("wh-tree");
        std::fs::create_dir_all(wh.join("etc")).unwrap();
        std::fs::write(wh.join("etc/.wh.passwd"), b"").unwrap();
        let e = apply(&wh, &root).unwrap_err();
        assert_eq!(e.kind(), FailureKind::BadInput);
        assert!(e.to_string().contains("whiteout name"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
