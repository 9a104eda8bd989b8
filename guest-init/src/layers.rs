//! Unpacking each base layer into its own lowerdir, OCI whiteouts turned
//! into overlayfs ones, hashing the uncompressed bytes as they are read.
//!
//! The input is hostile. The rules (FORMATS.md, edge-case table):
//! * paths lose a leading `/` or `./`; `..` and NUL are refused;
//! * a parent that this layer made a symlink is never followed (`a -> /`
//!   then `a/etc/x` is a breakout): the layer is refused, naming the entry;
//! * `.wh.NAME` becomes a char device 0:0 named NAME, unless the layer has
//!   NAME itself (same-layer files survive; a directory of this layer that
//!   is also whited out hides what the layers below have in it: opaque);
//!   `.wh..wh..opq` marks its directory opaque, wherever it comes;
//! * a path listed twice: last wins;
//! * a directory the layer writes into without listing it gets the
//!   metadata of the same path in the layers below (`/tmp` stays 1777);
//! * a hardlink to a file of a lower layer becomes a copy of that file.
//!
//! Deciding is pure: [`LayerIndex`] records what this layer holds (no
//! lstat needed to know a parent is a real directory we made), and
//! [`plan`] says what an entry does to it. [`Unpacker`] does the syscalls.

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{Mode, SFlag};

use runasroot_guest::contract::{Compression, FailureKind, LayerSpec};
use runasroot_guest::whiteout::{self, Name};

use crate::disks::{ChunkReader, HashingReader};
use crate::fail::GuestError;
use crate::lower::{Lowers, Visible};
use crate::nodes::{self, cstr, Described, Meta, NodeError, NodeKind, Time};
use crate::sys;

/// Read buffer between the layers disk and the decompressor.
const READ_BUF: usize = 1 << 20;

/// Why a tar path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    Nul,
    DotDot,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::Nul => "the name contains a NUL byte",
            PathError::DotDot => "the name has a \"..\" component",
        })
    }
}

/// Splits a tar path into its components, relative to the root: a leading
/// `/` and `./` go, empty and `.` components go, `..` and NUL are refused.
/// The root itself is the empty list.
pub fn sanitize(raw: &[u8]) -> Result<Vec<&[u8]>, PathError> {
    if raw.contains(&0) {
        return Err(PathError::Nul);
    }
    let mut out = Vec::new();
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(PathError::DotDot),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// What this layer holds at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    Dir,
    Whiteout,
    Symlink,
    /// A file, device or fifo.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Node {
    held: Held,
    /// Directories: the mtime to set once their contents are in place.
    mtime: Time,
    /// Directories: a `.wh..wh..opq` named this one.
    opaque_marker: bool,
}

/// Everything the layer being unpacked has made so far, by path (the
/// components joined by `/`; the root is the empty path).
#[derive(Debug, Default)]
pub struct LayerIndex {
    nodes: BTreeMap<Vec<u8>, Node>,
    /// Paths named by a `.wh.` entry of this layer: deleted from below.
    whited: HashSet<Vec<u8>>,
}

impl LayerIndex {
    pub fn new() -> LayerIndex {
        let mut nodes = BTreeMap::new();
        nodes.insert(Vec::new(), Node { held: Held::Dir, mtime: Time::default(), opaque_marker: false });
        LayerIndex { nodes, whited: HashSet::new() }
    }

    pub fn get(&self, path: &[u8]) -> Option<Held> {
        self.nodes.get(path).map(|n| n.held)
    }

    fn insert(&mut self, path: &[u8], held: Held, mtime: Time) {
        let opaque_marker = self.nodes.get(path).is_some_and(|n| n.held == Held::Dir && n.opaque_marker);
        self.nodes.insert(path.to_vec(), Node { held, mtime, opaque_marker: opaque_marker && held == Held::Dir });
    }

    /// Forgets a path and, for a directory, everything below it.
    fn remove_subtree(&mut self, path: &[u8]) {
        self.nodes.remove(path);
        let mut lo = path.to_vec();
        lo.push(b'/');
        let mut hi = path.to_vec();
        hi.push(b'/' + 1);
        let below: Vec<Vec<u8>> = self.nodes.range(lo..hi).map(|(k, _)| k.clone()).collect();
        for k in below {
            self.nodes.remove(&k);
        }
    }

    /// Whether this layer deleted `path` or one of its ancestors from the
    /// layers below (so nothing below can lend it metadata).
    fn whited_at_or_above(&self, comps: &[&[u8]]) -> bool {
        (1..=comps.len()).any(|n| self.whited.contains(&comps[..n].join(&b'/')))
    }

    /// Directories with their final opaque state and mtime, for the
    /// post-pass: opaque when marked, or when this layer also whited them
    /// out (the lower directory is deleted, this layer's one replaces it).
    pub fn dirs(&self) -> impl Iterator<Item = (&[u8], bool, Time)> {
        self.nodes.iter().filter(|(_, n)| n.held == Held::Dir).map(|(p, n)| {
            (p.as_slice(), n.opaque_marker || self.whited.contains(p), n.mtime)
        })
    }

    /// The whole index as (path, held, opaque) lines, for tests.
    #[cfg(test)]
    pub fn listing(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(p, n)| {
                let opaque = n.held == Held::Dir && (n.opaque_marker || self.whited.contains(p));
                format!("{} {:?}{}", String::from_utf8_lossy(p), n.held, if opaque { " opaque" } else { "" })
            })
            .collect()
    }
}

/// What an entry asks for, once its file name is classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// `.wh.NAME`: the path is NAME's.
    Whiteout,
    /// `.wh..wh..opq`: the path is the directory's.
    Opaque,
    /// Any other entry.
    Node { dir: bool },
}

/// One thing to do for an entry, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Make the missing directory made of the first `depth` components
    /// (replacing a whiteout node of this layer if `over_whiteout`).
    ImplicitDir { depth: usize, over_whiteout: bool },
    /// Remove what the layer holds at the path (a directory's subtree too).
    Remove,
    /// Create the entry's node.
    Create,
    /// The path is already a directory of this layer: new metadata only.
    UpdateDir,
    /// Make the whiteout node (char 0:0).
    MakeWhiteout,
    /// Mark the directory at the path opaque.
    MarkOpaque,
}

/// Why an entry cannot be applied, by the ancestor at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanError {
    /// The first `depth` components are a symlink this layer made.
    Breakout { depth: usize },
    /// The first `depth` components are a file/device this layer made.
    NotADir { depth: usize },
    /// A non-directory entry for the root.
    RootNotDir,
}

/// Decides what an entry at `comps` does to the layer so far.
pub fn plan(index: &LayerIndex, comps: &[&[u8]], want: Want) -> Result<Vec<Step>, PlanError> {
    let parents = match want {
        Want::Opaque => comps.len(),
        _ => comps.len().saturating_sub(1),
    };
    let mut steps = Vec::new();
    let mut missing = false;
    for depth in 1..=parents {
        if missing {
            steps.push(Step::ImplicitDir { depth, over_whiteout: false });
            continue;
        }
        match index.get(&comps[..depth].join(&b'/')) {
            None => {
                missing = true;
                steps.push(Step::ImplicitDir { depth, over_whiteout: false });
            }
            Some(Held::Dir) => {}
            Some(Held::Whiteout) => {
                missing = true;
                steps.push(Step::ImplicitDir { depth, over_whiteout: true });
            }
            Some(Held::Symlink) => return Err(PlanError::Breakout { depth }),
            Some(Held::Other) => return Err(PlanError::NotADir { depth }),
        }
    }
    let here = if missing { None } else { index.get(&comps.join(&b'/')) };
    match want {
        Want::Opaque => steps.push(Step::MarkOpaque),
        Want::Whiteout => {
            if here.is_none() {
                steps.push(Step::MakeWhiteout);
            }
        }
        Want::Node { dir } => match here {
            _ if comps.is_empty() && !dir => return Err(PlanError::RootNotDir),
            None => steps.push(Step::Create),
            Some(Held::Dir) if dir => steps.push(Step::UpdateDir),
            Some(_) => {
                steps.push(Step::Remove);
                steps.push(Step::Create);
            }
        },
    }
    Ok(steps)
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {layer}: creating its directory {dir}")]
    Mkdir {
        layer: usize,
        dir: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: reading its tar stream ({compression:?}, {offset}+{length} on the layers disk)")]
    Read {
        layer: usize,
        compression: Compression,
        offset: u64,
        length: u64,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: the image has no layers disk but lists this layer")]
    NoDisk { layer: usize },
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    BadEntry { layer: usize, entry: String, reason: String },
    #[error("layer {layer}: entry {entry:?} goes through {ancestor:?}, which the same layer made a symlink; refusing to follow it (a layer must not write through its own symlinks)")]
    Breakout { layer: usize, entry: String, ancestor: String },
    #[error("layer {layer}: entry {entry:?} is below {ancestor:?}, which the same layer made a {what}")]
    NotADir { layer: usize, entry: String, ancestor: String, what: &'static str },
    #[error("layer {layer} writes {entry:?} below {ancestor:?}, which is a {what} in layer {lower}")]
    BelowLowerNonDir { layer: usize, entry: String, ancestor: String, what: &'static str, lower: usize },
    #[error("layer {layer}: hardlink {entry:?} -> {target:?}: {reason}")]
    Hardlink { layer: usize, entry: String, target: String, reason: String },
    #[error("layer {layer}: unpacking {entry:?}")]
    Node {
        layer: usize,
        entry: String,
        #[source]
        source: NodeError,
    },
    #[error("layer {layer}: looking up {entry:?} in the layers below")]
    Lookup {
        layer: usize,
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("layer {layer}: finishing directory {entry:?}")]
    Finish {
        layer: usize,
        entry: String,
        #[source]
        source: NodeError,
    },
    #[error("layer {layer}: the image config says its diff_id is {expected}, but its unpacked bytes hash to {actual}")]
    DiffId { layer: usize, expected: String, actual: String },
}

impl GuestError for LayerError {
    fn kind(&self) -> FailureKind {
        match self {
            LayerError::Mkdir { .. } | LayerError::Lookup { .. } | LayerError::Finish { .. } => FailureKind::Internal,
            // A name longer than the kernel takes is the layer's fault.
            LayerError::Node { source: NodeError::Fs(_, e), .. } if e.raw_os_error() == Some(libc::ENAMETOOLONG) => {
                FailureKind::BadInput
            }
            LayerError::Node { source: NodeError::Fs(..), .. } => FailureKind::Internal,
            _ => FailureKind::BadInput,
        }
    }
    fn on_scratch(&self) -> bool {
        !matches!(self, LayerError::Read { .. } | LayerError::Node { source: NodeError::Data(_), .. })
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The error for a failed filesystem step on `entry` of `layer`.
fn node_err(layer: usize, entry: &[u8]) -> impl Fn(NodeError) -> LayerError + '_ {
    move |source| LayerError::Node { layer, entry: lossy(entry), source }
}

/// The same, for a bare io::Error of step `what`.
fn fs_err<'a>(layer: usize, entry: &'a [u8], what: &'static str) -> impl Fn(io::Error) -> LayerError + 'a {
    move |e| LayerError::Node { layer, entry: lossy(entry), source: NodeError::Fs(what, e) }
}

fn bad(layer: usize, entry: &[u8], reason: impl Into<String>) -> LayerError {
    LayerError::BadEntry { layer, entry: lossy(entry), reason: reason.into() }
}

const O_DIR_PATH: OFlag = OFlag::O_PATH.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

/// Applies tar entries to one directory tree (a lowerdir), layer rules.
pub struct Unpacker<'a> {
    layer: usize,
    root: OwnedFd,
    lowers: &'a Lowers,
    index: LayerIndex,
    buf: Vec<u8>,
    /// The last parent directory opened, by path.
    parent: Option<(Vec<u8>, OwnedFd)>,
    pub entries: u64,
}

impl<'a> Unpacker<'a> {
    /// `root` is the empty lowerdir of layer `layer`; `lowers` holds (at
    /// least) the layers below it.
    pub fn new(layer: usize, root: OwnedFd, lowers: &'a Lowers) -> Unpacker<'a> {
        Unpacker { layer, root, lowers, index: LayerIndex::new(), buf: Vec::new(), parent: None, entries: 0 }
    }

    /// Applies every entry of a tar stream.
    pub fn unpack<R: Read>(&mut self, archive: &mut tar::Archive<R>, read_err: impl Fn(io::Error) -> LayerError) -> Result<(), LayerError> {
        for entry in archive.entries().map_err(&read_err)? {
            let mut entry = entry.map_err(&read_err)?;
            let described = match nodes::describe(&mut entry) {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(e) => return Err(bad(self.layer, &entry.path_bytes(), e.to_string())),
            };
            self.apply(&described, &mut entry)?;
            self.entries += 1;
        }
        Ok(())
    }

    /// Applies one entry; `data` yields a file's contents.
    pub fn apply(&mut self, d: &Described, data: &mut dyn Read) -> Result<(), LayerError> {
        let layer = self.layer;
        let comps = sanitize(&d.path).map_err(|e| bad(layer, &d.path, e.to_string()))?;
        if let Some(c) = comps.iter().rev().skip(1).find(|c| c.starts_with(whiteout::PREFIX)) {
            return Err(bad(layer, &d.path, format!("a directory component {:?} has a whiteout name", lossy(c))));
        }
        let node = Want::Node { dir: d.kind == NodeKind::Dir };
        let (want, comps) = match comps.split_last() {
            None => (node, comps),
            Some((last, dir)) => match whiteout::classify(last) {
                Err(e) => return Err(bad(layer, &d.path, e.to_string())),
                Ok(Name::Plain(_)) => (node, comps),
                Ok(Name::Opaque) => (Want::Opaque, dir.to_vec()),
                Ok(Name::Whiteout(target)) => {
                    let mut c = dir.to_vec();
                    c.push(target);
                    (Want::Whiteout, c)
                }
            },
        };
        let path = comps.join(&b'/');
        if let NodeKind::Hardlink { target } = &d.kind {
            if sanitize(target).ok().as_deref() == Some(comps.as_slice()) && self.index.get(&path).is_some() {
                // `tar c a a` stores the second `a` as a link to itself:
                // the node is already there.
                return Ok(());
            }
        }
        let steps = plan(&self.index, &comps, want).map_err(|e| match e {
            PlanError::Breakout { depth } => {
                LayerError::Breakout { layer, entry: lossy(&d.path), ancestor: lossy(&comps[..depth].join(&b'/')) }
            }
            PlanError::NotADir { depth } => LayerError::NotADir {
                layer,
                entry: lossy(&d.path),
                ancestor: lossy(&comps[..depth].join(&b'/')),
                what: "file",
            },
            PlanError::RootNotDir => bad(layer, &d.path, "the root of a layer must be a directory"),
        })?;
        if want == Want::Whiteout {
            self.index.whited.insert(path.clone());
        }
        let open_err = fs_err(layer, &d.path, "opening the parent directory");
        for step in steps {
            match step {
                Step::ImplicitDir { depth, over_whiteout } => self.implicit_dir(&d.path, &comps[..depth], over_whiteout)?,
                Step::Remove => {
                    self.parent = None;
                    let (parent, name) = self.parent_of(&comps).map_err(&open_err)?;
                    nodes::remove_tree(parent, &name).map_err(fs_err(layer, &d.path, "removing the earlier entry"))?;
                    self.index.remove_subtree(&path);
                }
                Step::Create => {
                    let held = self.create(d, &comps, data)?;
                    self.index.insert(&path, held, d.meta.mtime);
                }
                Step::UpdateDir => {
                    let (parent, name) = self.parent_of(&comps).map_err(&open_err)?;
                    nodes::apply_meta(parent, &name, false, &d.meta).map_err(node_err(layer, &d.path))?;
                    nodes::replace_xattrs(parent, &name, &d.meta.xattrs).map_err(node_err(layer, &d.path))?;
                    self.index.insert(&path, Held::Dir, d.meta.mtime);
                }
                Step::MakeWhiteout => {
                    let (parent, name) = self.parent_of(&comps).map_err(&open_err)?;
                    nodes::mknod(parent, &name, SFlag::S_IFCHR, 0, 0).map_err(node_err(layer, &d.path))?;
                    self.index.insert(&path, Held::Whiteout, Time::default());
                }
                Step::MarkOpaque => {
                    if let Some(n) = self.index.nodes.get_mut(&path) {
                        n.opaque_marker = true;
                    }
                }
            }
        }
        Ok(())
    }

    /// The parent directory of `comps` (opened O_PATH, cached) and the
    /// last component; the root and "." for the root. Every ancestor is a
    /// directory this layer made (the plan checked the index), so opening
    /// it by relative path follows no symlink (O_NOFOLLOW guards the last).
    fn parent_of(&mut self, comps: &[&[u8]]) -> io::Result<(BorrowedFd<'_>, CString)> {
        let Some((last, dir)) = comps.split_last() else {
            return Ok((self.root.as_fd(), CString::new(".").expect("constant")));
        };
        let name = cstr(last)?;
        if dir.is_empty() {
            return Ok((self.root.as_fd(), name));
        }
        let key = dir.join(&b'/');
        if self.parent.as_ref().map(|(k, _)| k) != Some(&key) {
            let fd = openat(self.root.as_fd(), cstr(&key)?.as_c_str(), O_DIR_PATH, Mode::empty())?;
            self.parent = Some((key, fd));
        }
        let fd = self.parent.as_ref().map(|(_, fd)| fd.as_fd()).expect("just set");
        Ok((fd, name))
    }

    /// Makes a directory the layer writes into without listing it, with
    /// the metadata the layers below have for it.
    fn implicit_dir(&mut self, entry: &[u8], comps: &[&[u8]], over_whiteout: bool) -> Result<(), LayerError> {
        let layer = self.layer;
        let path = comps.join(&b'/');
        let meta = if over_whiteout || self.index.whited_at_or_above(comps) {
            Meta::default_dir()
        } else {
            let lookup_err = |source| LayerError::Lookup { layer, entry: lossy(entry), source };
            match self.lowers.visible(layer, comps).map_err(lookup_err)? {
                Visible::Dir { layer: from } => {
                    let (last, dir) = comps.split_last().expect("an implicit dir is never the root");
                    lower_meta(self.lowers, from, &dir.join(&b'/'), last).map_err(lookup_err)?
                }
                Visible::NonDir { layer: lower } => {
                    let what = match self.lowers.lstat(lower, &path) {
                        Ok(Some(st)) => nodes::type_name(st.st_mode),
                        _ => "non-directory",
                    };
                    return Err(LayerError::BelowLowerNonDir { layer, entry: lossy(entry), ancestor: lossy(&path), what, lower });
                }
                Visible::Missing | Visible::BelowNonDir { .. } => Meta::default_dir(),
            }
        };
        let (parent, name) = self.parent_of(comps).map_err(fs_err(layer, entry, "opening the parent directory"))?;
        if over_whiteout {
            nodes::remove_tree(parent, &name).map_err(fs_err(layer, entry, "removing the whiteout"))?;
        }
        nodes::mkdir(parent, &name).map_err(node_err(layer, entry))?;
        nodes::apply_meta(parent, &name, false, &meta).map_err(node_err(layer, entry))?;
        self.index.insert(&path, Held::Dir, meta.mtime);
        Ok(())
    }

    /// Makes the entry's node; returns what it is.
    fn create(&mut self, d: &Described, comps: &[&[u8]], data: &mut dyn Read) -> Result<Held, LayerError> {
        let layer = self.layer;
        let err = node_err(layer, &d.path);
        let open_err = fs_err(layer, &d.path, "opening the parent directory");
        match &d.kind {
            NodeKind::File { size } => {
                let mut buf = std::mem::take(&mut self.buf);
                let (parent, name) = self.parent_of(comps).map_err(&open_err)?;
                let r = nodes::create_file(parent, &name, data, *size, &d.meta, &mut buf);
                self.buf = buf;
                r.map_err(err)?;
                Ok(Held::Other)
            }
            NodeKind::Dir => {
                let (parent, name) = self.parent_of(comps).map_err(&open_err)?;
                nodes::mkdir(parent, &name).map_err(&err)?;
                nodes::apply_meta(parent, &name, false, &d.meta).map_err(&err)?;
                Ok(Held::Dir)
            }
            NodeKind::Symlink { target } => {
                let (parent, name) = self.parent_of(comps).map_err(&open_err)?;
                nodes::symlink(parent, &name, target).map_err(&err)?;
                nodes::apply_meta(parent, &name, true, &d.meta).map_err(&err)?;
                nodes::set_mtime(parent, &name, d.meta.mtime).map_err(&err)?;
                Ok(Held::Symlink)
            }
            NodeKind::Char { major: 0, minor: 0 } => Err(bad(
                layer,
                &d.path,
                "a char device 0:0 cannot be stored in a layer: overlayfs would read it as a whiteout",
            )),
            NodeKind::Char { major, minor } | NodeKind::Block { major, minor } => {
                let kind = if matches!(d.kind, NodeKind::Char { .. }) { SFlag::S_IFCHR } else { SFlag::S_IFBLK };
                let (parent, name) = self.parent_of(comps).map_err(&open_err)?;
                nodes::mknod(parent, &name, kind, *major, *minor).map_err(&err)?;
                nodes::apply_meta(parent, &name, false, &d.meta).map_err(&err)?;
                nodes::set_mtime(parent, &name, d.meta.mtime).map_err(&err)?;
                Ok(Held::Other)
            }
            NodeKind::Fifo => {
                let (parent, name) = self.parent_of(comps).map_err(&open_err)?;
                nodes::mknod(parent, &name, SFlag::S_IFIFO, 0, 0).map_err(&err)?;
                nodes::apply_meta(parent, &name, false, &d.meta).map_err(&err)?;
                nodes::set_mtime(parent, &name, d.meta.mtime).map_err(&err)?;
                Ok(Held::Other)
            }
            NodeKind::Hardlink { target } => self.hardlink(d, comps, target),
        }
    }

    fn hardlink(&mut self, d: &Described, comps: &[&[u8]], raw_target: &[u8]) -> Result<Held, LayerError> {
        let layer = self.layer;
        let herr = |reason: &str| LayerError::Hardlink {
            layer,
            entry: lossy(&d.path),
            target: lossy(raw_target),
            reason: reason.to_string(),
        };
        let tcomps = sanitize(raw_target).map_err(|e| herr(&e.to_string()))?;
        let Some((tlast, tdir)) = tcomps.split_last() else {
            return Err(herr("the target is the root directory"));
        };
        let tpath = tcomps.join(&b'/');
        let err = node_err(layer, &d.path);
        let held = match self.index.get(&tpath) {
            Some(h @ (Held::Other | Held::Symlink)) => h,
            Some(Held::Dir) => return Err(herr("the target is a directory")),
            Some(Held::Whiteout) => return Err(herr("the target is deleted by this layer")),
            None => {
                self.materialise(d, comps, &tcomps, raw_target)?;
                return Ok(Held::Other);
            }
        };
        let tdir_fd = if tdir.is_empty() {
            self.root.try_clone().map_err(fs_err(layer, &d.path, "opening the target's directory"))?
        } else {
            let rel = cstr(&tdir.join(&b'/')).map_err(fs_err(layer, &d.path, "naming the target"))?;
            openat(self.root.as_fd(), rel.as_c_str(), O_DIR_PATH, Mode::empty())
                .map_err(|e| fs_err(layer, &d.path, "opening the target's directory")(e.into()))?
        };
        let tname = cstr(tlast).map_err(fs_err(layer, &d.path, "naming the target"))?;
        let (parent, name) = self.parent_of(comps).map_err(fs_err(layer, &d.path, "opening the parent directory"))?;
        // The link shares its target's inode, metadata included: the link
        // entry's own header fields are not applied (umoci and the host
        // export engine keep the target's owner and mode too).
        nodes::hardlink(tdir_fd.as_fd(), &tname, parent, &name).map_err(&err)?;
        Ok(held)
    }

    /// A hard link to a file of a lower layer cannot be a link across
    /// lowerdirs: it becomes a copy of the file the layers below show at
    /// the target path, content and metadata (owner, mode, mtime, xattrs),
    /// which is what a link to it would show (FORMATS.md, "Hardlinks").
    fn materialise(&mut self, d: &Described, comps: &[&[u8]], tcomps: &[&[u8]], raw_target: &[u8]) -> Result<(), LayerError> {
        let layer = self.layer;
        let herr = |reason: String| LayerError::Hardlink { layer, entry: lossy(&d.path), target: lossy(raw_target), reason };
        let lookup_err = |source| LayerError::Lookup { layer, entry: lossy(&d.path), source };
        let tpath = tcomps.join(&b'/');
        let from = match self.lowers.visible(layer, tcomps).map_err(lookup_err)? {
            Visible::NonDir { layer } => layer,
            _ => return Err(herr("the target is neither in this layer nor a file in the layers below".into())),
        };
        let st = self.lowers.lstat(from, &tpath).map_err(lookup_err)?.ok_or_else(|| herr("the target vanished".into()))?;
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG {
            return Err(herr(format!("the target is a {} in layer {from}, not a regular file", nodes::type_name(st.st_mode))));
        }
        let rel = cstr(&tpath).map_err(lookup_err)?;
        let src = openat(self.lowers.root(from), rel.as_c_str(), OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| lookup_err(e.into()))?;
        let (tlast, tdir) = tcomps.split_last().expect("a link target is never the root");
        let meta = lower_meta(self.lowers, from, &tdir.join(&b'/'), tlast).map_err(lookup_err)?;
        let mut src = File::from(src);
        let mut buf = std::mem::take(&mut self.buf);
        let (parent, name) = self.parent_of(comps).map_err(fs_err(layer, &d.path, "opening the parent directory"))?;
        let r = nodes::create_file(parent, &name, &mut src, st.st_size as u64, &meta, &mut buf);
        self.buf = buf;
        r.map_err(|e| match e {
            // The copy's source is our own scratch: not the input's fault.
            NodeError::Data(e) => NodeError::Fs("copying the target from a lower layer", e),
            e => e,
        })
        .map_err(node_err(layer, &d.path))
    }

    /// The post-pass: opaque markers and directory mtimes, set once every
    /// entry is in (creating an entry changes its directory's mtime).
    pub fn finish(mut self) -> Result<LayerIndex, LayerError> {
        let layer = self.layer;
        self.parent = None;
        if self.index.nodes.get(&b""[..]).is_some_and(|root| root.opaque_marker) {
            self.hide_lower_roots()?;
        }
        let dirs: Vec<(Vec<u8>, bool, Time)> = self.index.dirs().map(|(p, o, t)| (p.to_vec(), o, t)).collect();
        for (path, opaque, mtime) in dirs {
            let comps: Vec<&[u8]> = if path.is_empty() { Vec::new() } else { path.split(|&b| b == b'/').collect() };
            let finish_err = |source| LayerError::Finish { layer, entry: lossy(&path), source };
            // The root's own mtime is never visible (overlayfs shows the
            // upper dir's, and no tar has an entry for the root), and its
            // opaque marker was handled above.
            if comps.is_empty() {
                continue;
            }
            let (parent, name) = self.parent_of(&comps).map_err(|e| finish_err(NodeError::Fs("opening the directory", e)))?;
            if opaque {
                let p = sys::fd_path(parent, name.to_bytes()).map_err(|e| finish_err(NodeError::Fs("naming the directory", e)))?;
                sys::lsetxattr(&p, c"trusted.overlay.opaque", whiteout::OVERLAY_OPAQUE_VALUE)
                    .map_err(|e| finish_err(NodeError::Fs("marking the directory opaque", e)))?;
            }
            nodes::set_mtime(parent, &name, mtime).map_err(finish_err)?;
        }
        Ok(self.index)
    }
}

impl Unpacker<'_> {
    /// An opaque marker at the top of a layer hides every layer below; but
    /// overlayfs ignores the opaque xattr on a layer's root, so the same
    /// fact is written one level down: a whiteout for every top-level name
    /// the layers below show that this layer does not have, and the opaque
    /// mark on every top-level directory it does have.
    fn hide_lower_roots(&mut self) -> Result<(), LayerError> {
        let layer = self.layer;
        let err = |source| LayerError::Finish { layer, entry: String::new(), source: NodeError::Fs("hiding the layers below", source) };
        let mut names = std::collections::BTreeSet::new();
        for below in 0..layer.min(self.lowers.len()) {
            let dir = nix::dir::Dir::openat(self.lowers.root(below), c".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
                .map_err(|e| err(e.into()))?;
            for e in dir {
                let e = e.map_err(|e| err(e.into()))?;
                let n = e.file_name().to_bytes();
                if n != b"." && n != b".." {
                    names.insert(n.to_vec());
                }
            }
        }
        let tops: Vec<Vec<u8>> = self.index.nodes.keys().filter(|k| !k.is_empty() && !k.contains(&b'/')).cloned().collect();
        for top in tops {
            if let Some(n) = self.index.nodes.get_mut(&top) {
                n.opaque_marker |= n.held == Held::Dir;
            }
        }
        for name in names {
            if self.index.get(&name).is_some() {
                continue;
            }
            let seen = self.lowers.visible(layer, &[name.as_slice()]).map_err(err)?;
            if matches!(seen, Visible::Missing | Visible::BelowNonDir { .. }) {
                continue;
            }
            let c = cstr(&name).map_err(err)?;
            nodes::mknod(self.root.as_fd(), &c, SFlag::S_IFCHR, 0, 0)
                .map_err(|source| LayerError::Finish { layer, entry: lossy(&name), source })?;
            self.index.insert(&name, Held::Whiteout, Time::default());
        }
        Ok(())
    }
}

/// The metadata of `parent_rel/name` in a lower layer.
fn lower_meta(lowers: &Lowers, layer: usize, parent_rel: &[u8], name: &[u8]) -> io::Result<Meta> {
    let dir = if parent_rel.is_empty() {
        lowers.root(layer).try_clone_to_owned()?
    } else {
        openat(lowers.root(layer), cstr(parent_rel)?.as_c_str(), O_DIR_PATH, Mode::empty())?
    };
    nodes::read_meta(dir.as_fd(), &cstr(name)?)
}

/// The uncompressed stream of a layer, from its byte range on the disk.
pub fn open_stream<'a>(disk: &'a File, spec: &LayerSpec) -> io::Result<Box<dyn Read + Send + 'a>> {
    // ChunkReader is the buffer: no BufReader copy in between.
    let raw = ChunkReader::new(disk, spec.range.offset, spec.range.length, READ_BUF);
    Ok(match spec.compression {
        Compression::None => Box::new(raw),
        // Multi-member: pigz and concatenated gzip streams are valid layers.
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(raw)),
        Compression::Zstd => Box::new(zstd::Decoder::with_buffer(raw)?),
    })
}

/// Chunks in flight between the layer reader thread and the unpacker.
const PIPE_CHUNKS: usize = 4;
/// Size of one chunk handed from the reader thread to the unpacker.
const PIPE_CHUNK: usize = 256 << 10;

/// The reader thread: reads (and decompresses, and hashes) the layer stream
/// in chunks until it ends, fails, or the unpacker stops listening. Returns
/// the hash of what it read.
fn produce_chunks<R: Read>(mut hashing: HashingReader<R>, tx: std::sync::mpsc::SyncSender<io::Result<Vec<u8>>>) -> ([u8; 32], u64) {
    loop {
        let mut chunk = vec![0u8; PIPE_CHUNK];
        let mut filled = 0;
        let result = loop {
            match hashing.read(&mut chunk[filled..]) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    filled += n;
                    if filled == chunk.len() {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        chunk.truncate(filled);
        let done = filled < PIPE_CHUNK;
        let sent = match result {
            Ok(()) if chunk.is_empty() => break,
            Ok(()) => tx.send(Ok(chunk)),
            Err(e) => {
                let _ = tx.send(Ok(chunk));
                let _ = tx.send(Err(e));
                break;
            }
        };
        if sent.is_err() || done {
            break;
        }
    }
    hashing.finish()
}

/// The unpacker's side of the pipe: a `Read` over the chunks.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // The reader thread finished: end of stream.
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Counters of one unpacked layer, for the log.
pub struct LayerStats {
    pub diff_id: String,
    pub bytes: u64,
    pub entries: u64,
}

/// Unpacks layer `i` into `root` (an empty directory), checking its
/// diff_id. `lowers` holds layers `0..i`.
pub fn unpack_layer(i: usize, spec: &LayerSpec, disk: Option<&File>, root: &std::path::Path, lowers: &Lowers) -> Result<LayerStats, LayerError> {
    let disk = disk.ok_or(LayerError::NoDisk { layer: i })?;
    let read_err = |source| LayerError::Read {
        layer: i,
        compression: spec.compression,
        offset: spec.range.offset,
        length: spec.range.length,
        source,
    };
    let mkdir_err = |source| LayerError::Mkdir { layer: i, dir: root.display().to_string(), source };
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(root)
            .or_else(|e| if e.kind() == io::ErrorKind::AlreadyExists { Ok(()) } else { Err(e) })
            .map_err(mkdir_err)?;
    }
    let root_fd = openat(
        nix::fcntl::AT_FDCWD,
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| mkdir_err(e.into()))?;
    let stream = open_stream(disk, spec).map_err(read_err)?;
    let mut unpacker = Unpacker::new(i, root_fd, lowers);
    // The diff_id covers the whole stream, end-of-archive blocks and any
    // padding after them included: the reader is drained after the tar.
    let ((raw, bytes), unpacked) = if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        // With a second vCPU, reading, decompressing and hashing run beside
        // the unpacking (under TCG each costs about as much as the other).
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel(PIPE_CHUNKS);
            let producer = scope.spawn(move || produce_chunks(HashingReader::new(stream), tx));
            let mut reader = ChannelReader { rx, chunk: Vec::new(), pos: 0 };
            let unpacked = unpacker.unpack(&mut tar::Archive::new(&mut reader), read_err).and_then(|()| {
                io::copy(&mut reader, &mut io::sink()).map(drop).map_err(read_err)
            });
            drop(reader);
            (producer.join().expect("the layer reader thread does not panic"), unpacked)
        })
    } else {
        let mut hashing = HashingReader::new(stream);
        let unpacked = unpacker.unpack(&mut tar::Archive::new(&mut hashing), read_err).and_then(|()| {
            io::copy(&mut hashing, &mut io::sink()).map(drop).map_err(read_err)
        });
        (hashing.finish(), unpacked)
    };
    unpacked?;
    let entries = unpacker.entries;
    unpacker.finish()?;
    let diff_id = runasroot_guest::hashing::digest_string(&raw);
    if diff_id != spec.diff_id {
        return Err(LayerError::DiffId { layer: i, expected: spec.diff_id.clone(), actual: diff_id });
    }
    Ok(LayerStats { diff_id, bytes, entries })
}

#[cfg(test)]
// Test tables spell out whole rows on purpose.
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    /// A reader that fails after `ok` bytes.
    struct FailAfter {
        ok: usize,
    }

    impl Read for FailAfter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err(io::Error::other("disk gone"));
            }
            let n = buf.len().min(self.ok);
            buf[..n].fill(7);
            self.ok -= n;
            Ok(n)
        }
    }

    #[test]
    fn the_reader_thread_hands_over_every_byte_and_its_hash() {
        for len in [0usize, 1, PIPE_CHUNK - 1, PIPE_CHUNK, 3 * PIPE_CHUNK + 17] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let (tx, rx) = std::sync::mpsc::sync_channel(PIPE_CHUNKS);
            let (out, (raw, n)) = std::thread::scope(|scope| {
                let producer = scope.spawn(|| produce_chunks(HashingReader::new(&data[..]), tx));
                let mut out = Vec::new();
                ChannelReader { rx, chunk: Vec::new(), pos: 0 }.read_to_end(&mut out).unwrap();
                (out, producer.join().unwrap())
            });
            assert_eq!(out, data, "len {len}");
            let mut direct = HashingReader::new(&data[..]);
            io::copy(&mut direct, &mut io::sink()).unwrap();
            assert_eq!((raw, n), direct.finish(), "len {len}");
        }
    }

    #[test]
    fn the_reader_thread_passes_on_errors_and_stops_when_nobody_listens() {
        let (tx, rx) = std::sync::mpsc::sync_channel(PIPE_CHUNKS);
        let err = std::thread::scope(|scope| {
            scope.spawn(|| produce_chunks(HashingReader::new(FailAfter { ok: PIPE_CHUNK + 5 }), tx));
            let mut out = Vec::new();
            let err = ChannelReader { rx, chunk: Vec::new(), pos: 0 }.read_to_end(&mut out).unwrap_err();
            assert_eq!(out.len(), PIPE_CHUNK + 5);
            err
        });
        assert_eq!(err.to_string(), "disk gone");
        // The consumer goes away early: the producer must not block forever.
        let (tx, rx) = std::sync::mpsc::sync_channel(PIPE_CHUNKS);
        drop(rx);
        let endless = FailAfter { ok: usize::MAX };
        let (_, n) = produce_chunks(HashingReader::new(endless), tx);
        assert_eq!(n, PIPE_CHUNK as u64);
    }

    #[test]
    fn sanitizes_paths() {
        let table: &[(&[u8], Result<Vec<&[u8]>, PathError>)] = &[
            (b"etc/passwd", Ok(vec![b"etc", b"passwd"])),
            (b"./etc/", Ok(vec![b"etc"])),
            (b"/abs//x/./y", Ok(vec![b"abs", b"x", b"y"])),
            (b"./", Ok(vec![])),
            (b"", Ok(vec![])),
            (b"a/../b", Err(PathError::DotDot)),
            (b"../x", Err(PathError::DotDot)),
            (b"..", Err(PathError::DotDot)),
            (b"a\0b", Err(PathError::Nul)),
            (b"...", Ok(vec![b"..."])),
        ];
        for (raw, want) in table {
            assert_eq!(&sanitize(raw), want, "{:?}", String::from_utf8_lossy(raw));
        }
    }

    fn index(entries: &[(&str, Held)]) -> LayerIndex {
        let mut ix = LayerIndex::new();
        for (p, h) in entries {
            ix.insert(p.as_bytes(), *h, Time::default());
        }
        ix
    }

    fn comps(p: &str) -> Vec<&[u8]> {
        sanitize(p.as_bytes()).unwrap()
    }

    #[test]
    fn plans_entries_against_the_layer_so_far() {
        use Step::*;
        let ix = index(&[
            ("etc", Held::Dir),
            ("etc/passwd", Held::Other),
            ("a", Held::Symlink),
            ("gone", Held::Whiteout),
            ("f", Held::Other),
        ]);
        let dir = Want::Node { dir: true };
        let file = Want::Node { dir: false };
        let table: Vec<(&str, Want, Result<Vec<Step>, PlanError>)> = vec![
            ("etc/group", file, Ok(vec![Create])),
            ("etc/passwd", file, Ok(vec![Remove, Create])),
            ("etc", dir, Ok(vec![UpdateDir])),
            ("etc", file, Ok(vec![Remove, Create])),
            ("f", dir, Ok(vec![Remove, Create])),
            ("usr/bin/x", file, Ok(vec![ImplicitDir { depth: 1, over_whiteout: false }, ImplicitDir { depth: 2, over_whiteout: false }, Create])),
            ("a/etc/x", file, Err(PlanError::Breakout { depth: 1 })),
            ("a/.wh.x", Want::Whiteout, Err(PlanError::Breakout { depth: 1 })),
            ("a", Want::Opaque, Err(PlanError::Breakout { depth: 1 })),
            ("f/x", file, Err(PlanError::NotADir { depth: 1 })),
            ("gone/x", file, Ok(vec![ImplicitDir { depth: 1, over_whiteout: true }, Create])),
            ("gone", dir, Ok(vec![Remove, Create])),
            ("gone", Want::Whiteout, Ok(vec![])),
            ("etc/passwd", Want::Whiteout, Ok(vec![])),
            ("etc", Want::Whiteout, Ok(vec![])),
            ("etc/shadow", Want::Whiteout, Ok(vec![MakeWhiteout])),
            ("x/y", Want::Whiteout, Ok(vec![ImplicitDir { depth: 1, over_whiteout: false }, MakeWhiteout])),
            ("etc", Want::Opaque, Ok(vec![MarkOpaque])),
            ("new", Want::Opaque, Ok(vec![ImplicitDir { depth: 1, over_whiteout: false }, MarkOpaque])),
            ("", Want::Opaque, Ok(vec![MarkOpaque])),
            ("", dir, Ok(vec![UpdateDir])),
            ("", file, Err(PlanError::RootNotDir)),
        ];
        for (path, want, expected) in table {
            assert_eq!(plan(&ix, &comps(path), want), expected, "{path} {want:?}");
        }
    }

    use crate::testutil::{listing, privileged, TarBuilder, TempDir};
    use sha2::{Digest, Sha256};
    use std::path::PathBuf;

    /// Unpacks `tars` (bottom first) as a base, the way main does; the
    /// digest of layer `bad_digest` is made wrong. Returns the lowerdirs.
    fn unpack_stack(tmp: &TempDir, tars: &[Vec<u8>], bad_digest: Option<usize>) -> Result<Vec<PathBuf>, LayerError> {
        let disk_path = tmp.path().join("disk");
        let mut disk = Vec::new();
        let mut specs = Vec::new();
        for (i, t) in tars.iter().enumerate() {
            let mut diff_id = format!("sha256:{}", hex::encode(Sha256::digest(t)));
            if bad_digest == Some(i) {
                diff_id = format!("sha256:{}", "0".repeat(64));
            }
            specs.push(LayerSpec {
                range: runasroot_guest::contract::Blob { offset: disk.len() as u64, length: t.len() as u64 },
                compression: Compression::None,
                diff_id,
            });
            disk.extend_from_slice(t);
            disk.extend_from_slice(b"garbage between blobs");
        }
        std::fs::write(&disk_path, &disk).unwrap();
        let disk = File::open(&disk_path).unwrap();
        let mut lowers = Lowers::new();
        let mut dirs = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let dir = tmp.path().join(format!("l{i}"));
            let stats = unpack_layer(i, spec, Some(&disk), &dir, &lowers)?;
            assert_eq!(stats.diff_id, spec.diff_id);
            assert_eq!(stats.bytes, spec.range.length);
            lowers.push(&dir).unwrap();
            dirs.push(dir);
        }
        Ok(dirs)
    }

    /// A valid `security.capability` (vfs_cap_data revision 2, effective,
    /// CAP_NET_RAW permitted): the kernel refuses malformed ones.
    pub const CAP_NET_RAW: &[u8] = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

    fn base_layer() -> Vec<u8> {
        TarBuilder::new()
            .dir("etc/", 0o755, 0, 100)
            .file("etc/passwd", "root", 0o644, 0)
            .file("etc/old", "old", 0o644, 0)
            .dir("./tmp/", 0o1777, 0, 200)
            .dir("opq/", 0o755, 0, 300)
            .file("opq/hidden", "h", 0o644, 0)
            .dir("usr/", 0o755, 0, 400)
            .dir("usr/bin/", 0o755, 0, 500)
            .xattrs(&[("security.capability", CAP_NET_RAW), ("trusted.overlay.redirect", b"/x"), ("user.k", b"v")])
            .file("usr/bin/ping", "p", 0o4755, 0)
            .symlink("bin", "usr/bin")
            .node("dev/null", tar::EntryType::Char, 1, 3)
            .node("p", tar::EntryType::Fifo, 0, 0)
            .hardlink("etc/passwd-hl", "etc/passwd")
            .file("etc/shadow", "s", 0o640, 42)
            .file("/home/u/f", "u", 0o600, 1000)
            .finish()
    }

    #[test]
    fn unpacks_layers_into_overlay_lowerdirs() {
        if !privileged() {
            eprintln!("skipped: needs root (chown, mknod, trusted.* xattrs)");
            return;
        }
        let tmp = TempDir::new("unpack");
        let top = TarBuilder::new()
            .file("etc/.wh.old", "", 0o644, 0)
            .file("opq/.wh..wh..opq", "", 0o644, 0)
            .dir("opq/", 0o700, 0, 301)
            .file("opq/shown", "s", 0o644, 0)
            .file("tmp/x", "x", 0o644, 0)
            .hardlink("hl", "etc/passwd")
            .hardlink("shadow-copy", "etc/shadow")
            .file("keep", "k", 0o644, 0)
            .file(".wh.keep", "", 0o644, 0)
            .file(".wh.keep2", "", 0o644, 0)
            .file("keep2", "k2", 0o644, 0)
            .dir("d/", 0o755, 0, 600)
            .file("d/in", "i", 0o644, 0)
            .file(".wh.d", "", 0o644, 0)
            .file(".wh.e", "", 0o644, 0)
            .file("e/f", "f", 0o644, 0)
            .file("twice", "1", 0o644, 0)
            .file("twice", "2", 0o644, 0)
            .dir("twice-dir/", 0o755, 0, 700)
            .file("twice-dir/a", "a", 0o644, 0)
            .file("twice-dir", "now a file", 0o644, 0)
            .xattrs(&[("user.a", b"1"), ("user.b", b"")])
            .dir("x2/", 0o711, 0, 800)
            .xattrs(&[("user.a", b"1")])
            .dir("x2/", 0o711, 0, 800)
            .finish();
        let dirs = unpack_stack(&tmp, &[base_layer(), top], None).unwrap();
        assert_eq!(
            listing(&dirs[0]),
            vec![
                "bin sym 777 0:0 -> usr/bin",
                "dev dir 755 0:0 mtime=0",
                "dev/null node 666 0:0 c1:3",
                "etc dir 755 0:0 mtime=100",
                "etc/old file 644 0:0 \"old\"",
                "etc/passwd file 644 0:0 \"root\"",
                "etc/passwd-hl file 644 0:0 \"root\"",
                "etc/shadow file 640 42:42 \"s\"",
                "home dir 755 0:0 mtime=0",
                "home/u dir 755 0:0 mtime=0",
                "home/u/f file 600 1000:1000 \"u\"",
                "opq dir 755 0:0 mtime=300",
                "opq/hidden file 644 0:0 \"h\"",
                "p node 666 0:0 p0:0",
                "tmp dir 1777 0:0 mtime=200",
                "usr dir 755 0:0 mtime=400",
                "usr/bin dir 755 0:0 mtime=500",
                "usr/bin/ping file 4755 0:0 \"p\" [security.capability=\\x01\\x00\\x00\\x02\\x00 \\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00,user.k=v]",
            ]
        );
        let passwd = std::fs::metadata(dirs[0].join("etc/passwd")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&passwd), 2, "a same-layer hardlink is a link");
        assert_eq!(
            listing(&dirs[1]),
            vec![
                "d dir 755 0:0 mtime=600 [trusted.overlay.opaque=y]",
                "d/in file 644 0:0 \"i\"",
                "e dir 755 0:0 mtime=0 [trusted.overlay.opaque=y]",
                "e/f file 644 0:0 \"f\"",
                "etc dir 755 0:0 mtime=100",
                "etc/old node 600 0:0 c0:0",
                "hl file 644 0:0 \"root\"",
                "keep file 644 0:0 \"k\"",
                "keep2 file 644 0:0 \"k2\"",
                "opq dir 700 0:0 mtime=301 [trusted.overlay.opaque=y]",
                "opq/shown file 644 0:0 \"s\"",
                "shadow-copy file 640 42:42 \"s\"",
                "tmp dir 1777 0:0 mtime=200",
                "tmp/x file 644 0:0 \"x\"",
                "twice file 644 0:0 \"2\"",
                "twice-dir file 644 0:0 \"now a file\"",
                "x2 dir 711 0:0 mtime=800 [user.a=1]",
            ]
        );
    }

    #[test]
    fn an_opaque_layer_root_hides_every_layer_below() {
        if !privileged() {
            eprintln!("skipped: needs root (chown, mknod, trusted.* xattrs)");
            return;
        }
        let tmp = TempDir::new("opaque-root");
        let wipe = TarBuilder::new().file(".wh..wh..opq", "", 0o644, 0).file("etc/new", "n", 0o644, 0).file(".wh.p", "", 0o644, 0).finish();
        let dirs = unpack_stack(&tmp, &[base_layer(), wipe], None).unwrap();
        assert_eq!(
            listing(&dirs[1]),
            vec![
                "bin node 600 0:0 c0:0",
                "dev node 600 0:0 c0:0",
                "etc dir 755 0:0 mtime=100 [trusted.overlay.opaque=y]",
                "etc/new file 644 0:0 \"n\"",
                "home node 600 0:0 c0:0",
                "opq node 600 0:0 c0:0",
                "p node 600 0:0 c0:0",
                "tmp node 600 0:0 c0:0",
                "usr node 600 0:0 c0:0",
            ]
        );
    }

    #[test]
    fn refuses_hostile_or_broken_layers_naming_the_entry() {
        if !privileged() {
            eprintln!("skipped: needs root (chown, mknod, trusted.* xattrs)");
            return;
        }
        let breakout = TarBuilder::new().symlink("a", "/").file("a/etc/x", "x", 0o644, 0).finish();
        let dotdot = TarBuilder::new().file("a/../../x", "x", 0o644, 0).finish();
        let bare = TarBuilder::new().file("etc/.wh.", "", 0o644, 0).finish();
        let lower_link = TarBuilder::new().symlink("a", "/etc").finish();
        let below_lower_link = TarBuilder::new().file("a/x", "x", 0o644, 0).finish();
        let dangling = TarBuilder::new().hardlink("b", "nowhere").finish();
        let zero_dev = TarBuilder::new().node("c", tar::EntryType::Char, 0, 0).finish();
        let wh_dir = TarBuilder::new().file(".wh.x/y", "", 0o644, 0).finish();
        let table: Vec<(Vec<Vec<u8>>, Option<usize>, &str)> = vec![
            (vec![breakout], None, "layer 0: entry \"a/etc/x\" goes through \"a\", which the same layer made a symlink; refusing to follow it"),
            (vec![dotdot], None, "layer 0: entry \"a/../../x\": the name has a \"..\" component"),
            (vec![bare], None, "layer 0: entry \"etc/.wh.\": invalid whiteout name"),
            (vec![lower_link, below_lower_link], None, "layer 1 writes \"a/x\" below \"a\", which is a symlink in layer 0"),
            (vec![dangling], None, "layer 0: hardlink \"b\" -> \"nowhere\": the target is neither in this layer nor a file in the layers below"),
            (vec![zero_dev], None, "layer 0: entry \"c\": a char device 0:0 cannot be stored in a layer"),
            (vec![wh_dir], None, "layer 0: entry \".wh.x/y\": a directory component \".wh.x\" has a whiteout name"),
            (vec![base_layer()], Some(0), "layer 0: the image config says its diff_id is sha256:0000"),
        ];
        for (tars, bad_digest, want) in table {
            let tmp = TempDir::new("refuse");
            let err = unpack_stack(&tmp, &tars, bad_digest).unwrap_err();
            assert!(err.to_string().starts_with(want), "got: {err}\nwant: {want}");
            assert_eq!(err.kind(), FailureKind::BadInput, "{err}");
        }
    }

    #[test]
    fn unpacks_compressed_layers_and_hashes_the_uncompressed_bytes() {
        let tmp = TempDir::new("compressed");
        let plain = TarBuilder::new().dir("d/", 0o755, nix::unistd::geteuid().as_raw().into(), 5).finish();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &plain).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&plain[..], 3).unwrap();
        for (bytes, compression) in [(gz, Compression::Gzip), (zst, Compression::Zstd)] {
            let disk = tmp.path().join("disk");
            std::fs::write(&disk, &bytes).unwrap();
            let spec = LayerSpec {
                range: runasroot_guest::contract::Blob { offset: 0, length: bytes.len() as u64 },
                compression,
                diff_id: format!("sha256:{}", hex::encode(Sha256::digest(&plain))),
            };
            let dir = tmp.path().join(format!("{compression:?}"));
            let stats = unpack_layer(0, &spec, Some(&File::open(&disk).unwrap()), &dir, &Lowers::new()).unwrap();
            assert_eq!((stats.entries, stats.bytes), (1, plain.len() as u64));
            assert!(dir.join("d").is_dir());
        }
    }

    #[test]
    fn index_forgets_whole_subtrees_and_reports_opaque_dirs() {
        let mut ix = index(&[("a", Held::Dir), ("a/b", Held::Other), ("a/c", Held::Dir), ("a/c/d", Held::Other), ("ab", Held::Other), ("a.x", Held::Other)]);
        ix.remove_subtree(b"a");
        assert_eq!(ix.listing(), vec![" Dir", "a.x Other", "ab Other"]);
        ix.insert(b"d", Held::Dir, Time::default());
        ix.whited.insert(b"d".to_vec());
        ix.insert(b"e", Held::Dir, Time::default());
        ix.nodes.get_mut(&b"e"[..]).unwrap().opaque_marker = true;
        // A later entry for the same dir keeps its opaque marker.
        ix.insert(b"e", Held::Dir, Time { sec: 5, nsec: 0 });
        assert_eq!(ix.listing(), vec![" Dir", "a.x Other", "ab Other", "d Dir opaque", "e Dir opaque"]);
        assert!(ix.whited_at_or_above(&comps("d/x/y")));
        assert!(!ix.whited_at_or_above(&comps("e/x")));
    }
}
