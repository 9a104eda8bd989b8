//! `--copy-to-root`: tar streams from the job disk unpacked into the
//! merged view before the script runs, so they land in the upper dir and
//! become part of the new layer (nixpkgs' copyToRoot).
//!
//! No whiteout processing (a copy-to-root tar is content, not a layer),
//! owners as the tar says. Paths resolve inside the merged root the way
//! they would for a process chrooted there (`openat2` with
//! `RESOLVE_IN_ROOT`): `bin/x` over a base whose `/bin` is a symlink to
//! `usr/bin` lands in `/usr/bin/x`, as Docker's COPY does, and no symlink
//! of the base can lead outside the root. An existing symlink to a
//! directory is kept when the tar lists that directory (like GNU tar's
//! --keep-directory-symlink), so merged-/usr bases stay intact.

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{openat, AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{fstatat, Mode, SFlag};
use nix::unistd::linkat;

use runasroot_guest::contract::FailureKind;
use runasroot_guest::whiteout;

use crate::fail::GuestError;
use crate::layers::sanitize;
use crate::nodes::{self, cstr, Described, NodeError, NodeKind};
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("copy-to-root tar {index}: reading it")]
    Read {
        index: usize,
        #[source]
        source: io::Error,
    },
    #[error("copy-to-root tar {index}: entry {entry:?}: {reason}")]
    BadEntry { index: usize, entry: String, reason: String },
    #[error("copy-to-root tar {index}: entry {entry:?}: {what}")]
    Fs {
        index: usize,
        entry: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("copy-to-root tar {index}: entry {entry:?}")]
    Node {
        index: usize,
        entry: String,
        #[source]
        source: NodeError,
    },
}

impl GuestError for CopyError {
    fn kind(&self) -> FailureKind {
        match self {
            CopyError::Fs { .. } | CopyError::Node { source: NodeError::Fs(..), .. } => FailureKind::Internal,
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

/// Unpacks one copy-to-root tar into the tree at `root`; returns the
/// number of entries.
pub fn apply<R: Read>(index: usize, root: &Path, tar: R) -> Result<u64, CopyError> {
    let read_err = |source| CopyError::Read { index, source };
    let root = openat(AT_FDCWD, root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| read_err(e.into()))?;
    let mut archive = tar::Archive::new(tar);
    let mut buf = Vec::new();
    let mut count = 0;
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let d = match nodes::describe(&mut entry) {
            Ok(Some(d)) => d,
            Ok(None) => continue,
            Err(e) => {
                return Err(CopyError::BadEntry { index, entry: lossy(&entry.path_bytes()), reason: e.to_string() })
            }
        };
        apply_entry(index, root.as_fd(), &d, &mut entry, &mut buf)?;
        count += 1;
    }
    Ok(count)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn open_in_root(root: BorrowedFd<'_>, rel: &[u8], flags: OFlag) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { CString::new(".").expect("constant") } else { cstr(rel)? };
    sys::openat2(root, &rel, flags.bits(), IN_ROOT)
}

/// The directory `comps` names inside the root, made (0755 root:root)
/// where missing.
fn parent_dir(index: usize, root: BorrowedFd<'_>, entry: &[u8], comps: &[&[u8]]) -> Result<OwnedFd, CopyError> {
    let fs_err = |what| move |source| CopyError::Fs { index, entry: lossy(entry), what, source };
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
                            index,
                            entry: lossy(entry),
                            reason: format!("{:?} is a symlink to a missing directory", lossy(&rel)),
                        })
                    }
                    r => r.map_err(|source| CopyError::Node { index, entry: lossy(entry), source })?,
                }
                let dm = nodes::Meta::default_dir();
                nodes::apply_meta(dir.as_fd(), &name, false, &dm).map_err(|source| CopyError::Node { index, entry: lossy(entry), source })?;
                open_in_root(root, &rel, OFlag::O_PATH | OFlag::O_DIRECTORY).map_err(fs_err("opening a parent it made"))?
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                return Err(CopyError::BadEntry {
                    index,
                    entry: lossy(entry),
                    reason: format!("{:?} is not a directory in the image", lossy(&rel)),
                })
            }
            Err(e) => return Err(fs_err("opening a parent")(e)),
        };
    }
    Ok(dir)
}

fn apply_entry(index: usize, root: BorrowedFd<'_>, d: &Described, data: &mut dyn Read, buf: &mut Vec<u8>) -> Result<(), CopyError> {
    let bad = |reason: String| CopyError::BadEntry { index, entry: lossy(&d.path), reason };
    let node_err = |source| CopyError::Node { index, entry: lossy(&d.path), source };
    let fs_err = |what| move |source| CopyError::Fs { index, entry: lossy(&d.path), what, source };
    let comps = sanitize(&d.path).map_err(|e| bad(e.to_string()))?;
    if let Some(c) = comps.iter().find(|c| c.starts_with(whiteout::PREFIX)) {
        return Err(bad(format!("{:?} is a whiteout name, which an image layer cannot carry as a file", lossy(c))));
    }
    let Some((last, dir)) = comps.split_last() else {
        // The root's own entry: its metadata is never part of a layer.
        return Ok(());
    };
    let parent = parent_dir(index, root, &d.path, dir)?;
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
        NodeKind::File { size } => nodes::create_file(parent, &name, data, *size, &d.meta, buf).map_err(node_err)?,
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
            let tcomps = sanitize(target).map_err(|e| bad(format!("hardlink target: {e}")))?;
            let target_fd = open_in_root(root, &tcomps.join(&b'/'), OFlag::O_PATH | OFlag::O_NOFOLLOW)
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

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, mode: u32, uid: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1);
        h.set_size(0);
        h
    }

    #[test]
    fn copies_into_the_root_through_its_symlinks_but_never_out_of_it() {
        if !is_root() {
            eprintln!("skipped: needs root (chown to other owners)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("rar-copyroot-{}", std::process::id()));
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
        let bytes = tar_of(|b| {
            let mut h = header(tar::EntryType::Directory, 0o755, 0);
            b.append_data(&mut h, "bin/", &b""[..]).unwrap();
            let mut h = header(tar::EntryType::Regular, 0o4755, 1000);
            h.set_size(2);
            b.append_data(&mut h, "bin/tool", &b"hi"[..]).unwrap();
            let mut h = header(tar::EntryType::Regular, 0o644, 0);
            h.set_size(1);
            b.append_data(&mut h, "escape/x", &b"x"[..]).unwrap();
            let mut h = header(tar::EntryType::Directory, 0o700, 1000);
            b.append_data(&mut h, "replaced/", &b""[..]).unwrap();
            let mut h = header(tar::EntryType::Regular, 0o600, 0);
            h.set_size(1);
            b.append_data(&mut h, "deep/new/f", &b"f"[..]).unwrap();
            // The link header's own owner and mode are not applied.
            let mut h = header(tar::EntryType::Link, 0o600, 7);
            b.append_link(&mut h, "usr/bin/tool2", "bin/tool").unwrap();
        });
        assert_eq!(apply(0, &root, &bytes[..]).unwrap(), 6);
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
        let deep = std::fs::metadata(root.join("deep")).unwrap();
        assert_eq!(deep.mode() & 0o7777, 0o755);

        let dangling = tar_of(|b| {
            let mut h = header(tar::EntryType::Regular, 0o644, 0);
            b.append_data(&mut h, "dangling/x", &b""[..]).unwrap();
        });
        let e = apply(1, &root, &dangling[..]).unwrap_err();
        assert!(e.to_string().contains("symlink to a missing directory"), "{e}");

        let wh = tar_of(|b| {
            let mut h = header(tar::EntryType::Regular, 0o644, 0);
            b.append_data(&mut h, "etc/.wh.passwd", &b""[..]).unwrap();
        });
        let e = apply(1, &root, &wh[..]).unwrap_err();
        assert_eq!(e.kind(), FailureKind::BadInput);
        assert!(e.to_string().contains("whiteout name"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
