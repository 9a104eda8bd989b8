//! Writing the result tar: the upper dir as a new OCI layer (layer mode),
//! or the merged view as one flat tree (export mode).
//!
//! Both walk depth first, a directory's entry right before its contents,
//! siblings in [`tarfmt::compare_siblings`] order of their *output* names,
//! no entry for the root; every header goes through [`tarfmt::TarWriter`].
//!
//! Layer mode turns overlayfs' notation back into OCI's (FORMATS.md,
//! "Packing upperdir"): char 0:0 (or a zero-size file with
//! `trusted.overlay.whiteout`) → `.wh.NAME`, dropped when no lower layer
//! has NAME; `trusted.overlay.opaque=y` → the directory, then
//! `DIR/.wh..wh..opq`, then its children. Sockets are skipped; other
//! devices and fifos kept. Inodes with several names in the walk become
//! one regular entry and hard links to it (never whiteouts, which may all
//! share one inode). An upper dir holding `trusted.overlay.redirect` or
//! `trusted.overlay.metacopy` is refused rather than packed wrong.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{openat, readlinkat, AtFlags, OFlag};
use nix::sys::stat::{fstatat, major, minor, FileStat, Mode, SFlag};

use runasroot_guest::contract::FailureKind;
use runasroot_guest::tarfmt::{self, Entry, Kind, TarWriter};
use runasroot_guest::whiteout;

use crate::disks::{DiskError, PayloadWriter};
use crate::fail::GuestError;
use crate::lower::Lower;
use crate::nodes::cstr;

/// Write buffer in front of the output disk.
const WRITE_BUF: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PackError {
    #[error("reading {path:?} in the {tree}")]
    Walk {
        tree: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path:?} in the upper dir carries {xattr}: overlayfs recorded a change a plain layer cannot express; refusing to write a wrong layer")]
    Refuse { path: String, xattr: &'static str },
    #[error("the script created {path:?}: an image layer reserves names starting with .wh. for whiteouts")]
    ReservedName { path: String },
    #[error("{path:?} is below a symlink in the tree being exported")]
    BelowSymlink { path: String },
    #[error("writing {path:?} to the result tar")]
    Append {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("finishing the result tar")]
    Finish(#[source] io::Error),
    #[error(transparent)]
    Disk(#[from] DiskError),
}

impl GuestError for PackError {
    fn kind(&self) -> FailureKind {
        match self {
            PackError::ReservedName { .. } | PackError::BelowSymlink { .. } => FailureKind::BadInput,
            _ => FailureKind::Internal,
        }
    }
    fn on_scratch(&self) -> bool {
        false
    }
}

/// What an upper-dir inode stands for in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpperNode {
    Whiteout,
    Dir { opaque: bool },
    File,
    Symlink,
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
    /// Sockets: meaningless in an image.
    Skip,
}

/// The overlayfs xattrs a plain layer cannot express.
const REFUSED: [&str; 2] = ["trusted.overlay.redirect", "trusted.overlay.metacopy"];

/// Classifies an upper-dir inode from its type bits, device number,
/// size and xattrs (decide apart from doing: no syscall here).
pub fn classify_upper(mode: u32, rdev_major: u32, rdev_minor: u32, size: u64, xattrs: &[(Vec<u8>, Vec<u8>)]) -> Result<UpperNode, &'static str> {
    let has = |name: &str| xattrs.iter().find(|(k, _)| k == name.as_bytes()).map(|(_, v)| v.as_slice());
    if let Some(x) = REFUSED.iter().find(|x| has(x).is_some()) {
        return Err(x);
    }
    Ok(match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFCHR if whiteout::is_whiteout_device(true, rdev_major.into(), rdev_minor.into()) => UpperNode::Whiteout,
        SFlag::S_IFREG if size == 0 && has(whiteout::OVERLAY_WHITEOUT_XATTR).is_some() => UpperNode::Whiteout,
        SFlag::S_IFDIR => UpperNode::Dir { opaque: has(whiteout::OVERLAY_OPAQUE_XATTR).is_some_and(whiteout::is_opaque_value) },
        SFlag::S_IFREG => UpperNode::File,
        SFlag::S_IFLNK => UpperNode::Symlink,
        SFlag::S_IFCHR => UpperNode::Char { major: rdev_major, minor: rdev_minor },
        SFlag::S_IFBLK => UpperNode::Block { major: rdev_major, minor: rdev_minor },
        SFlag::S_IFIFO => UpperNode::Fifo,
        _ => UpperNode::Skip,
    })
}

/// The name an upper-dir entry has in the layer.
pub fn output_name(node: UpperNode, name: &[u8]) -> Vec<u8> {
    match node {
        UpperNode::Whiteout => whiteout::whiteout_name(name),
        _ => name.to_vec(),
    }
}

/// One directory entry, read.
struct Child {
    name: Vec<u8>,
    st: FileStat,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits())
}

/// Lists a directory: every entry with its lstat and all its xattrs
/// (overlay-private ones included: the caller decides).
fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<Child>> {
    let mut names = Vec::new();
    {
        let mut d = nix::dir::Dir::openat(dir, c".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
        for e in d.iter() {
            let e = e?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
    }
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let c = cstr(&name)?;
        let st = fstatat(dir, c.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
        let path = crate::sys::fd_path(dir, &name)?;
        let xattrs = crate::sys::xattrs(&path)?;
        out.push(Child { name, st, xattrs });
    }
    Ok(out)
}

fn join(prefix: &[u8], name: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        name.to_vec()
    } else {
        let mut p = Vec::with_capacity(prefix.len() + 1 + name.len());
        p.extend_from_slice(prefix);
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn open_dir(parent: BorrowedFd<'_>, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(openat(parent, cstr(name)?.as_c_str(), OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())?)
}

/// The tar being written, with the hardlink table of the walk.
struct Out<W: Write> {
    tar: TarWriter<W>,
    /// (dev, ino) of inodes with several names → the first name written.
    links: HashMap<(u64, u64), Vec<u8>>,
    entries: u64,
}

impl<W: Write> Out<W> {
    fn append(&mut self, entry: &Entry, data: &mut dyn io::Read) -> Result<(), PackError> {
        self.entries += 1;
        self.tar.append(entry, data).map_err(|source| PackError::Append { path: lossy(&entry.path), source })
    }

    /// Writes a non-directory: a hard link to an earlier name of the same
    /// inode, or the node itself (a file's data read from `dir`).
    fn append_node(&mut self, dir: BorrowedFd<'_>, tree: &'static str, c: &Child, path: Vec<u8>, mtime: u64) -> Result<(), PackError> {
        let walk_err = |source| PackError::Walk { tree, path: lossy(&path), source };
        let ft = file_type(&c.st);
        let mut entry = Entry {
            path: path.clone(),
            kind: Kind::Fifo,
            mode: c.st.st_mode & tarfmt::MODE_BITS,
            uid: u64::from(c.st.st_uid),
            gid: u64::from(c.st.st_gid),
            mtime,
            xattrs: c.xattrs.iter().filter(|(k, _)| !whiteout::is_overlay_private(k)).cloned().collect(),
        };
        if c.st.st_nlink > 1 {
            let key = (c.st.st_dev, c.st.st_ino);
            if let Some(first) = self.links.get(&key) {
                entry.kind = Kind::Hardlink { target: first.clone() };
                return self.append(&entry, &mut io::empty());
            }
            self.links.insert(key, path.clone());
        }
        let name = cstr(&c.name).map_err(walk_err)?;
        match ft {
            SFlag::S_IFREG => {
                entry.kind = Kind::File { size: c.st.st_size as u64 };
                let fd = openat(dir, name.as_c_str(), OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
                    .map_err(|e| walk_err(e.into()))?;
                let mut f = File::from(fd);
                self.append(&entry, &mut f)
            }
            SFlag::S_IFLNK => {
                let target = readlinkat(dir, name.as_c_str()).map_err(|e| walk_err(e.into()))?;
                entry.kind = Kind::Symlink { target: target.into_encoded_bytes() };
                self.append(&entry, &mut io::empty())
            }
            SFlag::S_IFCHR | SFlag::S_IFBLK => {
                let (ma, mi) = (major(c.st.st_rdev) as u32, minor(c.st.st_rdev) as u32);
                entry.kind = if ft == SFlag::S_IFCHR { Kind::Char { major: ma, minor: mi } } else { Kind::Block { major: ma, minor: mi } };
                self.append(&entry, &mut io::empty())
            }
            SFlag::S_IFIFO => self.append(&entry, &mut io::empty()),
            _ => Ok(()),
        }
    }

    fn append_dir(&mut self, c: &Child, path: Vec<u8>, mtime: u64) -> Result<(), PackError> {
        let entry = Entry {
            path,
            kind: Kind::Dir,
            mode: c.st.st_mode & tarfmt::MODE_BITS,
            uid: u64::from(c.st.st_uid),
            gid: u64::from(c.st.st_gid),
            mtime,
            xattrs: c.xattrs.iter().filter(|(k, _)| !whiteout::is_overlay_private(k)).cloned().collect(),
        };
        self.append(&entry, &mut io::empty())
    }
}

/// What the walk leaves out at the top level: the mountpoints guest-init
/// made for the script (the base lacked them).
pub struct Skip<'a> {
    pub top_level: &'a [&'a str],
}

impl Skip<'_> {
    fn skips(&self, prefix: &[u8], name: &[u8]) -> bool {
        prefix.is_empty() && self.top_level.iter().any(|s| s.as_bytes() == name)
    }
}

/// The counters of a written tar.
#[derive(Debug)]
pub struct Written {
    pub len: u64,
    pub digest: String,
    pub entries: u64,
}

fn finish<'a>(out: Out<BufWriter<PayloadWriter<'a>>>) -> Result<Written, PackError> {
    let entries = out.entries;
    let buffered = out.tar.finish().map_err(PackError::Finish)?;
    let payload = buffered.into_inner().map_err(|e| PackError::Finish(e.into_error()))?;
    let (len, digest) = payload.finish()?;
    Ok(Written { len, digest, entries })
}

/// Packs the upper dir `upper` as an OCI layer onto the output disk.
/// `lower` (the base) decides which whiteouts hide something.
pub fn pack_layer(upper: &std::path::Path, lower: &Lower, epoch: u64, skip: &Skip<'_>, disk: &File) -> Result<Written, PackError> {
    let root = openat(nix::fcntl::AT_FDCWD, upper, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| PackError::Walk { tree: "upper dir", path: String::new(), source: e.into() })?;
    let sink = BufWriter::with_capacity(WRITE_BUF, PayloadWriter::new(disk)?);
    let mut out = Out { tar: TarWriter::new(sink), links: HashMap::new(), entries: 0 };
    let mut comps: Vec<Vec<u8>> = Vec::new();
    layer_dir(&mut out, root.as_fd(), b"", &mut comps, lower, epoch, skip)?;
    finish(out)
}

fn layer_dir<W: Write>(
    out: &mut Out<W>,
    dir: BorrowedFd<'_>,
    prefix: &[u8],
    comps: &mut Vec<Vec<u8>>,
    lower: &Lower,
    epoch: u64,
    skip: &Skip<'_>,
) -> Result<(), PackError> {
    let walk_err = |path: &[u8]| {
        let path = lossy(path);
        move |source| PackError::Walk { tree: "upper dir", path: path.clone(), source }
    };
    let children = list(dir).map_err(walk_err(prefix))?;
    let mut planned: Vec<(Vec<u8>, UpperNode, Child)> = Vec::with_capacity(children.len());
    for c in children {
        if skip.skips(prefix, &c.name) {
            continue;
        }
        let path = join(prefix, &c.name);
        let node = classify_upper(c.st.st_mode, major(c.st.st_rdev) as u32, minor(c.st.st_rdev) as u32, c.st.st_size as u64, &c.xattrs)
            .map_err(|xattr| PackError::Refuse { path: lossy(&path), xattr })?;
        if node != UpperNode::Whiteout && c.name.starts_with(whiteout::PREFIX) {
            return Err(PackError::ReservedName { path: lossy(&path) });
        }
        match node {
            UpperNode::Skip => continue,
            UpperNode::Whiteout => {
                // A whiteout that hides nothing (the script made and removed
                // a file) is noise in the layer: drop it.
                comps.push(c.name.clone());
                let parts: Vec<&[u8]> = comps.iter().map(Vec::as_slice).collect();
                let hides = lower.holds(&parts).map_err(walk_err(&path));
                comps.pop();
                if !hides? {
                    continue;
                }
            }
            _ => {}
        }
        planned.push((output_name(node, &c.name), node, c));
    }
    planned.sort_by(|a, b| tarfmt::compare_siblings(&a.0, &b.0));
    for (out_name, node, c) in planned {
        let path = join(prefix, &out_name);
        match node {
            UpperNode::Whiteout => out.append(&Entry::whiteout_marker(path, epoch), &mut io::empty())?,
            UpperNode::Dir { opaque } => {
                out.append_dir(&c, path.clone(), epoch)?;
                if opaque {
                    let marker = join(&path, whiteout::OPAQUE_MARKER);
                    out.append(&Entry::whiteout_marker(marker, epoch), &mut io::empty())?;
                }
                let sub = open_dir(dir, &c.name).map_err(walk_err(&path))?;
                comps.push(c.name.clone());
                layer_dir(out, sub.as_fd(), &path, comps, lower, epoch, skip)?;
                comps.pop();
            }
            _ => out.append_node(dir, "upper dir", &c, path, epoch)?,
        }
    }
    Ok(())
}

/// Export settings.
pub struct ExportTimes {
    /// mtime of entries the script wrote (present in the upper dir).
    pub epoch: u64,
    /// SOURCE_DATE_EPOCH, clamping the mtimes the image carries.
    pub clamp: Option<u64>,
}

/// Writes the merged view `merged` as one tar onto the output disk; the
/// upper dir tells which entries the script wrote.
pub fn export(merged: &std::path::Path, upper: &std::path::Path, times: &ExportTimes, skip: &Skip<'_>, disk: &File) -> Result<Written, PackError> {
    let open_root = |p: &std::path::Path, tree| {
        openat(nix::fcntl::AT_FDCWD, p, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| PackError::Walk { tree, path: String::new(), source: e.into() })
    };
    let root = open_root(merged, "merged view")?;
    let upper_root = open_root(upper, "upper dir")?;
    let sink = BufWriter::with_capacity(WRITE_BUF, PayloadWriter::new(disk)?);
    let mut out = Out { tar: TarWriter::new(sink), links: HashMap::new(), entries: 0 };
    export_dir(&mut out, root.as_fd(), Some(upper_root.as_fd()), b"", times, skip)?;
    finish(out)
}

/// The names present in an upper directory (whiteouts included: a name
/// the script deleted is not in the merged view anyway).
fn upper_names(upper: Option<BorrowedFd<'_>>) -> io::Result<HashSet<Vec<u8>>> {
    let Some(dir) = upper else { return Ok(HashSet::new()) };
    let mut d = nix::dir::Dir::openat(dir, c".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
    let mut names = HashSet::new();
    for e in d.iter() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.insert(n.to_vec());
        }
    }
    Ok(names)
}

/// The mtime of an export entry: the script's epoch for what it wrote,
/// else the image's own, clamped. A pre-1970 mtime becomes 0.
pub fn export_entry_mtime(in_upper: bool, st_mtime: i64, times: &ExportTimes) -> u64 {
    if in_upper {
        times.epoch
    } else {
        tarfmt::export_mtime(st_mtime.max(0) as u64, times.clamp)
    }
}

fn export_dir<W: Write>(
    out: &mut Out<W>,
    dir: BorrowedFd<'_>,
    upper: Option<BorrowedFd<'_>>,
    prefix: &[u8],
    times: &ExportTimes,
    skip: &Skip<'_>,
) -> Result<(), PackError> {
    let walk_err = |path: &[u8]| {
        let path = lossy(path);
        move |source| PackError::Walk { tree: "merged view", path: path.clone(), source }
    };
    let mut children = list(dir).map_err(walk_err(prefix))?;
    let in_upper = upper_names(upper).map_err(walk_err(prefix))?;
    children.retain(|c| !skip.skips(prefix, &c.name) && file_type(&c.st) != SFlag::S_IFSOCK);
    children.sort_by(|a, b| tarfmt::compare_siblings(&a.name, &b.name));
    for c in children {
        let path = join(prefix, &c.name);
        if c.name.starts_with(whiteout::PREFIX) {
            return Err(PackError::ReservedName { path: lossy(&path) });
        }
        let written = in_upper.contains(&c.name);
        let mtime = export_entry_mtime(written, c.st.st_mtime, times);
        if file_type(&c.st) == SFlag::S_IFDIR {
            out.append_dir(&c, path.clone(), mtime)?;
            // O_NOFOLLOW: the walk never enters a symlink, so no entry can
            // end up below one.
            let sub = open_dir(dir, &c.name).map_err(|e| {
                if e.raw_os_error() == Some(libc::ELOOP) {
                    PackError::BelowSymlink { path: lossy(&path) }
                } else {
                    walk_err(&path)(e)
                }
            })?;
            let sub_upper = match (written, upper) {
                (true, Some(u)) => match open_dir(u, &c.name) {
                    Ok(fd) => Some(fd),
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR) | Some(libc::ENOENT)) => None,
                    Err(e) => return Err(walk_err(&path)(e)),
                },
                _ => None,
            };
            export_dir(out, sub.as_fd(), sub_upper.as_ref().map(|f| f.as_fd()), &path, times, skip)?;
        } else {
            out.append_node(dir, "merged view", &c, path, mtime)?;
        }
    }
    Ok(())
}

#[cfg(test)]
// Test tables spell out whole rows on purpose.
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    fn x(k: &str, v: &str) -> (Vec<u8>, Vec<u8>) {
        (k.as_bytes().to_vec(), v.as_bytes().to_vec())
    }

    const CHR: u32 = libc::S_IFCHR;
    const REG: u32 = libc::S_IFREG;
    const DIR: u32 = libc::S_IFDIR;

    #[test]
    fn classifies_upper_inodes_per_the_formats_table() {
        let table: Vec<(u32, (u32, u32), u64, Vec<(Vec<u8>, Vec<u8>)>, Result<UpperNode, &str>)> = vec![
            (CHR | 0o600, (0, 0), 0, vec![], Ok(UpperNode::Whiteout)),
            (CHR | 0o666, (1, 3), 0, vec![], Ok(UpperNode::Char { major: 1, minor: 3 })),
            (libc::S_IFBLK | 0o660, (7, 0), 0, vec![], Ok(UpperNode::Block { major: 7, minor: 0 })),
            (REG | 0o644, (0, 0), 0, vec![x("trusted.overlay.whiteout", "")], Ok(UpperNode::Whiteout)),
            (REG | 0o644, (0, 0), 3, vec![x("trusted.overlay.whiteout", "")], Ok(UpperNode::File)),
            (REG | 0o644, (0, 0), 0, vec![], Ok(UpperNode::File)),
            (DIR | 0o755, (0, 0), 0, vec![x("trusted.overlay.opaque", "y")], Ok(UpperNode::Dir { opaque: true })),
            (DIR | 0o755, (0, 0), 0, vec![x("trusted.overlay.opaque", "x")], Ok(UpperNode::Dir { opaque: false })),
            (DIR | 0o755, (0, 0), 0, vec![x("trusted.overlay.redirect", "/a")], Err("trusted.overlay.redirect")),
            (REG | 0o755, (0, 0), 9, vec![x("trusted.overlay.metacopy", "")], Err("trusted.overlay.metacopy")),
            (libc::S_IFLNK | 0o777, (0, 0), 4, vec![], Ok(UpperNode::Symlink)),
            (libc::S_IFIFO | 0o644, (0, 0), 0, vec![], Ok(UpperNode::Fifo)),
            (libc::S_IFSOCK | 0o755, (0, 0), 0, vec![], Ok(UpperNode::Skip)),
        ];
        for (mode, (ma, mi), size, xattrs, want) in table {
            assert_eq!(classify_upper(mode, ma, mi, size, &xattrs), want, "{mode:o} {ma}:{mi} {xattrs:?}");
        }
    }

    #[test]
    fn output_names_and_their_order() {
        let mut names: Vec<Vec<u8>> = vec![
            output_name(UpperNode::File, b"b"),
            output_name(UpperNode::Whiteout, b"z"),
            output_name(UpperNode::Dir { opaque: false }, b"a"),
            output_name(UpperNode::Whiteout, b"c"),
        ];
        names.sort_by(|a, b| tarfmt::compare_siblings(a, b));
        assert_eq!(names, vec![b".wh.c".to_vec(), b".wh.z".to_vec(), b"a".to_vec(), b"b".to_vec()]);
    }

    use crate::testutil::{privileged, tar_listing, TempDir};
    use std::path::Path;

    /// A tree builder for hand-made upper/lower/merged dirs.
    struct Tree<'a>(&'a Path);

    impl Tree<'_> {
        fn p(&self, rel: &str) -> std::path::PathBuf {
            self.0.join(rel)
        }
        fn dir(&self, rel: &str, mode: u32, owner: u32) -> &Self {
            std::fs::create_dir_all(self.p(rel)).unwrap();
            self.meta(rel, mode, owner)
        }
        fn file(&self, rel: &str, data: &str, mode: u32) -> &Self {
            std::fs::create_dir_all(self.p(rel).parent().unwrap()).unwrap();
            std::fs::write(self.p(rel), data).unwrap();
            self.meta(rel, mode, 0)
        }
        fn meta(&self, rel: &str, mode: u32, owner: u32) -> &Self {
            std::os::unix::fs::chown(self.p(rel), Some(owner), Some(owner)).unwrap();
            std::fs::set_permissions(self.p(rel), std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
            self
        }
        fn node(&self, rel: &str, kind: SFlag, major: u64, minor: u64) -> &Self {
            nix::sys::stat::mknod(&self.p(rel), kind, Mode::from_bits_truncate(0o644), nix::sys::stat::makedev(major, minor)).unwrap();
            self
        }
        fn xattr(&self, rel: &str, k: &str, v: &[u8]) -> &Self {
            let p = CStringPath::new(&self.p(rel));
            crate::sys::lsetxattr(&p.0, &std::ffi::CString::new(k).unwrap(), v).unwrap();
            self
        }
        fn link(&self, from: &str, to: &str) -> &Self {
            std::fs::hard_link(self.p(from), self.p(to)).unwrap();
            self
        }
        fn mtime(&self, rel: &str, t: i64) -> &Self {
            let p = CStringPath::new(&self.p(rel));
            nix::sys::stat::utimensat(
                nix::fcntl::AT_FDCWD,
                p.0.as_c_str(),
                &nix::sys::time::TimeSpec::new(t, 0),
                &nix::sys::time::TimeSpec::new(t, 0),
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )
            .unwrap();
            self
        }
    }

    struct CStringPath(std::ffi::CString);
    impl CStringPath {
        fn new(p: &Path) -> Self {
            CStringPath(std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap())
        }
    }

    /// A regular file standing in for the output disk.
    fn disk(tmp: &TempDir) -> (File, std::path::PathBuf) {
        let p = tmp.path().join("output");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        (f, p)
    }

    fn payload(path: &Path, w: &Written) -> Vec<u8> {
        let bytes = std::fs::read(path).unwrap();
        let start = runasroot_guest::contract::PAYLOAD_OFFSET as usize;
        bytes[start..start + w.len as usize].to_vec()
    }

    #[test]
    fn packs_the_upper_dir_per_the_formats_table() {
        if !privileged() {
            eprintln!("skipped: needs root (chown, mknod, trusted.* xattrs)");
            return;
        }
        let tmp = TempDir::new("pack");
        let lower = tmp.path().join("lower");
        Tree(&lower).dir("etc", 0o755, 0).file("etc/old", "o", 0o644).file("etc/zw", "z", 0o644).dir("opq", 0o755, 0);
        let base = Lower::open(&lower).unwrap();

        let upper = tmp.path().join("upper");
        Tree(&upper)
            .dir("etc", 0o755, 0)
            .node("etc/old", SFlag::S_IFCHR, 0, 0)
            .node("etc/ghost", SFlag::S_IFCHR, 0, 0)
            .file("etc/zw", "", 0o644)
            .xattr("etc/zw", "trusted.overlay.whiteout", b"")
            .file("etc/passwd", "new", 0o644)
            .xattr("etc/passwd", "trusted.overlay.origin", b"junk")
            .xattr("etc/passwd", "user.x", b"1")
            .dir("opq", 0o755, 0)
            .xattr("opq", "trusted.overlay.opaque", b"y")
            .file("opq/n", "n", 0o644)
            .dir("data", 0o755, 1000)
            .file("data/a", "same", 0o644)
            .link("data/a", "data/b")
            .node("data/c", SFlag::S_IFCHR, 1, 3)
            .node("data/f", SFlag::S_IFIFO, 0, 0)
            .file("data/su", "su", 0o4755)
            .dir("dev", 0o755, 0);
        let _sock = std::os::unix::net::UnixListener::bind(upper.join("data/s")).unwrap();
        let (out, out_path) = disk(&tmp);
        let w = pack_layer(&upper, &base, 7, &Skip { top_level: &["dev"] }, &out).unwrap();
        let bytes = payload(&out_path, &w);
        assert_eq!(w.digest, format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))));
        assert_eq!(
            tar_listing(&bytes),
            vec![
                "data/ dir 755 1000:1000 7",
                "data/a file 644 0:0 7 \"same\"",
                "data/b link 644 0:0 7 => data/a",
                "data/c chr 644 0:0 7 1:3",
                "data/f fifo 644 0:0 7",
                "data/su file 4755 0:0 7 \"su\"",
                "etc/ dir 755 0:0 7",
                "etc/.wh.old file 644 0:0 7 \"\"",
                "etc/.wh.zw file 644 0:0 7 \"\"",
                "etc/passwd file 644 0:0 7 \"new\" [user.x=1]",
                "opq/ dir 755 0:0 7",
                "opq/.wh..wh..opq file 644 0:0 7 \"\"",
                "opq/n file 644 0:0 7 \"n\"",
            ]
        );
        assert_eq!(w.entries, 13);

        // The same upper dir packs to the same bytes.
        let tmp2 = TempDir::new("pack2");
        let (out2, out2_path) = disk(&tmp2);
        let w2 = pack_layer(&upper, &base, 7, &Skip { top_level: &["dev"] }, &out2).unwrap();
        assert_eq!(payload(&out2_path, &w2), bytes);
    }

    #[test]
    fn refuses_upper_dirs_a_layer_cannot_express() {
        if !privileged() {
            eprintln!("skipped: needs root (trusted.* xattrs)");
            return;
        }
        let tmp = TempDir::new("refuse");
        let empty = tmp.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let base = Lower::open(&empty).unwrap();
        let upper = tmp.path().join("upper");
        Tree(&upper).dir("moved", 0o755, 0).xattr("moved", "trusted.overlay.redirect", b"/orig");
        let (out, _) = disk(&tmp);
        let e = pack_layer(&upper, &base, 1, &Skip { top_level: &[] }, &out).unwrap_err();
        assert_eq!(e.kind(), FailureKind::Internal);
        assert!(e.to_string().starts_with("\"moved\" in the upper dir carries trusted.overlay.redirect"), "{e}");

        let upper2 = tmp.path().join("upper2");
        Tree(&upper2).file(".wh.x", "", 0o644);
        let e = pack_layer(&upper2, &base, 1, &Skip { top_level: &[] }, &out).unwrap_err();
        assert_eq!(e.kind(), FailureKind::BadInput);
        assert!(e.to_string().contains("reserves names starting with .wh."), "{e}");
    }

    #[test]
    fn exports_the_merged_view_with_image_and_script_times() {
        if !privileged() {
            eprintln!("skipped: needs root (chown)");
            return;
        }
        let tmp = TempDir::new("export");
        let merged = tmp.path().join("merged");
        let upper = tmp.path().join("upper");
        Tree(&upper).file("new", "n", 0o644);
        let t = Tree(&merged);
        t.dir("etc", 0o755, 0)
            .file("etc/passwd", "root", 0o644)
            .link("etc/passwd", "etc/hl2")
            .mtime("etc/passwd", 5000)
            .mtime("etc", 100)
            .file("new", "n", 0o644)
            .dir("dev", 0o755, 0);
        std::os::unix::fs::symlink("usr/bin", merged.join("bin")).unwrap();
        t.mtime("bin", 50);
        let _sock = std::os::unix::net::UnixListener::bind(merged.join("sock")).unwrap();
        let (out, out_path) = disk(&tmp);
        let times = ExportTimes { epoch: 7, clamp: Some(1000) };
        let w = export(&merged, &upper, &times, &Skip { top_level: &["dev"] }, &out).unwrap();
        assert_eq!(
            tar_listing(&payload(&out_path, &w)),
            vec![
                "bin sym 777 0:0 50 -> usr/bin",
                "etc/ dir 755 0:0 100",
                "etc/hl2 file 644 0:0 1000 \"root\"",
                "etc/passwd link 644 0:0 1000 => etc/hl2",
                "new file 644 0:0 7 \"n\"",
            ]
        );
    }

    #[test]
    fn export_mtimes() {
        let t = ExportTimes { epoch: 7, clamp: Some(100) };
        assert_eq!(export_entry_mtime(true, 5000, &t), 7);
        assert_eq!(export_entry_mtime(false, 5000, &t), 100);
        assert_eq!(export_entry_mtime(false, 50, &t), 50);
        assert_eq!(export_entry_mtime(false, -5, &t), 0);
        let t = ExportTimes { epoch: 7, clamp: None };
        assert_eq!(export_entry_mtime(false, 5000, &t), 5000);
    }
}
