//! The merge rules, as pure functions over in-memory trees: what one layer
//! says ([`LayerTree`]), what the layers say together ([`Merged`]), and
//! the export's entries in output order ([`Merged::walk`]).
//!
//! The rules are the ones overlayfs applies to a stack of lowerdirs (and
//! umoci and Docker to a stack of layers), written once: the export's tar
//! and the guest's lower image are both this merge, so the two export
//! engines write the same bytes:
//!
//! * inside one layer, entries apply in tar order and the last one for a
//!   path wins (a non-directory replacing a directory drops what this
//!   layer put below it); nothing is ever written below a non-directory
//!   of the same layer (a symlinked parent would lead outside the root);
//! * whiteouts and opaque markers hide what the *lower* layers have, never
//!   what their own layer adds, whatever their position in the tar;
//! * layers apply bottom first: a non-directory replaces whatever was
//!   there (a whole lower subtree included), a directory over a lower
//!   directory merges with it and takes its metadata when it has an entry
//!   of its own, a directory over a lower non-directory starts empty;
//! * a directory a layer only implies (it writes below it without an
//!   entry for it) keeps the metadata the layers below give it, or gets
//!   [`Meta::implied_dir`] where they have nothing or where an earlier
//!   whiteout of this layer deleted it (or an ancestor); where the layers
//!   below have a non-directory it is an error (overlayfs would hide the
//!   lower file, umoci and Docker would write through a lower symlink).
//!   "Earlier" is tar order, as in the guest's unpack and in umoci's: a
//!   whiteout after the entries below it leaves the lower metadata; an
//!   opaque marker hides lower contents, not the directory's metadata;
//! * a hard link whose target is in its own layer joins the target's
//!   inode; one whose target is only in the layers below becomes a copy
//!   of the regular file visible there, metadata included (what umoci's
//!   shared inode shows), and is a group of its own from then on.

use std::collections::{BTreeMap, HashMap, HashSet};

use runasroot_guest::tarfmt::{self, Entry, Kind};
use runasroot_guest::whiteout::{self, Name};

use super::LayerError;

/// Metadata of a file, directory or link, as the image gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    /// Permission bits with suid/sgid/sticky ([`tarfmt::MODE_BITS`]).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    /// From a PAX `mtime` with decimals; the export's tar keeps whole
    /// seconds (FORMATS.md), the lower image's inodes keep these too.
    pub mtime_nsec: u32,
    /// Sorted by name, no duplicates, no empty values (a PAX record
    /// without a value unsets), no `trusted.overlay.*`.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    /// What a directory that no layer describes gets: what `mkdir -p`
    /// under umask 022 as root gives, at the epoch (no clock leaks in).
    pub fn implied_dir() -> Meta {
        Meta { mode: 0o755, uid: 0, gid: 0, mtime: 0, mtime_nsec: 0, xattrs: Vec::new() }
    }
}

/// What a non-directory holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Content {
    /// `size` bytes at `offset` of source `source` (one source per layer:
    /// the stored blob itself when uncompressed, else its spooled copy).
    File { source: u32, offset: u64, size: u64 },
    Symlink(Vec<u8>),
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

/// One inode: every name in its group shows this content and metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Inode {
    pub content: Content,
    pub meta: Meta,
}

/// What one layer entry is, its path already normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum EntryKind {
    Dir(Meta),
    Node(Inode),
    /// Hard link to this normalised path.
    Hardlink(Vec<u8>),
    /// The last component is `.wh.NAME` or `.wh..wh..opq`: type and
    /// metadata do not matter.
    Marker,
}

/// Where a file's bytes are, for the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DataRef {
    pub source: u32,
    pub offset: u64,
}

fn lossy(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

fn join(components: &[&[u8]]) -> Vec<u8> {
    components.join(&b'/')
}

// ---------------------------------------------------------------------------
// One layer
// ---------------------------------------------------------------------------

#[derive(Debug)]
enum LNode {
    Dir(Box<LDir>),
    Leaf(usize),
}

#[derive(Debug, Default)]
struct LDir {
    /// `None`: the layer writes below this directory without an entry (the
    /// layers below lend it metadata at merge time).
    meta: Option<Meta>,
    /// The first entry written below it while it had no entry of its own,
    /// to name in an error.
    implied_by: Option<Box<[u8]>>,
    opaque: bool,
    whiteouts: Vec<Box<[u8]>>,
    children: BTreeMap<Box<[u8]>, LNode>,
}

/// What an entry does to its parent directory.
enum Action<'a> {
    Opaque,
    Whiteout(&'a [u8]),
    Dir(&'a [u8], Meta),
    Leaf(&'a [u8], usize),
}

#[derive(Debug)]
enum LInode {
    Own(Inode),
    /// A hard link to a path its own layer did not have (yet): a copy of
    /// the regular file the lower layers show there.
    Lower { target: Vec<u8>, entry: Vec<u8> },
}

/// Everything one layer says, entries applied in tar order.
#[derive(Debug, Default)]
pub(crate) struct LayerTree {
    root: LDir,
    inodes: Vec<LInode>,
    /// Paths this layer's whiteouts named so far: a directory implied at
    /// or below one of them has nothing below to take metadata from.
    whited: HashSet<Box<[u8]>>,
}

impl LayerTree {
    pub fn new() -> LayerTree {
        LayerTree::default()
    }

    /// Applies one entry. `path` is normalised (see [`normalize`]); empty
    /// means the root directory.
    pub fn insert(&mut self, path: &[u8], kind: EntryKind, layer: &str) -> Result<(), LayerError> {
        let entry_err = || lossy(path);
        if path.is_empty() {
            // The root has no entry in an export: its metadata is moot.
            return match kind {
                EntryKind::Dir(_) => Ok(()),
                _ => Err(LayerError::BadPath {
                    layer: layer.into(),
                    entry: "/".into(),
                    reason: "the root must be a directory",
                }),
            };
        }
        let components: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        let (&last, parents) = components.split_last().expect("non-empty path");
        for p in parents {
            if p.starts_with(whiteout::PREFIX) {
                return Err(LayerError::BadPath {
                    layer: layer.into(),
                    entry: entry_err(),
                    reason: "a whiteout name cannot be a directory",
                });
            }
        }
        let name = whiteout::classify(last)
            .map_err(|source| LayerError::InvalidWhiteout { layer: layer.into(), entry: entry_err(), source })?;
        // A link names what its layer holds *before* this entry applies
        // (the entry may create its parents, never its target).
        let action = match (name, kind) {
            (Name::Opaque, _) => Action::Opaque,
            (Name::Whiteout(hidden), _) => Action::Whiteout(hidden),
            (Name::Plain(_), EntryKind::Marker) => unreachable!("markers have a whiteout name"),
            (Name::Plain(n), EntryKind::Dir(meta)) => Action::Dir(n, meta),
            (Name::Plain(n), EntryKind::Node(inode)) => {
                self.inodes.push(LInode::Own(inode));
                Action::Leaf(n, self.inodes.len() - 1)
            }
            (Name::Plain(n), EntryKind::Hardlink(target)) => Action::Leaf(n, self.link_target(&target, path, layer)?),
        };
        let dir = self.parent_dir(&components, path, layer)?;
        match action {
            Action::Opaque => dir.opaque = true,
            Action::Whiteout(hidden) => {
                dir.whiteouts.push(hidden.into());
                let mut target = join(&components[..components.len() - 1]);
                if !target.is_empty() {
                    target.push(b'/');
                }
                target.extend_from_slice(hidden);
                self.whited.insert(target.into());
            }
            Action::Dir(n, meta) => match dir.children.get_mut(n) {
                Some(LNode::Dir(d)) => {
                    d.meta = Some(meta);
                    d.implied_by = None;
                }
                _ => {
                    let d = LDir { meta: Some(meta), ..LDir::default() };
                    dir.children.insert(n.into(), LNode::Dir(Box::new(d)));
                }
            },
            Action::Leaf(n, id) => {
                dir.children.insert(n.into(), LNode::Leaf(id));
            }
        }
        Ok(())
    }

    /// The inode a hard link joins: its target's in this layer, else a new
    /// one to be copied from the layers below at merge time.
    fn link_target(&mut self, target: &[u8], entry: &[u8], layer: &str) -> Result<usize, LayerError> {
        if target.is_empty() {
            return Err(LayerError::BadPath {
                layer: layer.into(),
                entry: lossy(entry),
                reason: "a hard link to the root directory",
            });
        }
        let mut dir = &self.root;
        let mut found = None;
        let components: Vec<&[u8]> = target.split(|&b| b == b'/').collect();
        for (i, c) in components.iter().enumerate() {
            match dir.children.get(*c) {
                Some(LNode::Dir(d)) if i + 1 < components.len() => dir = d,
                Some(LNode::Dir(_)) => {
                    return Err(LayerError::HardlinkToDirectory {
                        layer: layer.into(),
                        entry: lossy(entry),
                        target: lossy(target),
                    })
                }
                Some(LNode::Leaf(id)) if i + 1 == components.len() => found = Some(*id),
                _ => break,
            }
        }
        Ok(match found {
            Some(id) => id,
            None => {
                self.inodes.push(LInode::Lower { target: target.to_vec(), entry: entry.to_vec() });
                self.inodes.len() - 1
            }
        })
    }

    /// The directory an entry goes into, creating the ones the layer only
    /// implies; refuses to go below a non-directory of this layer.
    fn parent_dir(&mut self, components: &[&[u8]], path: &[u8], layer: &str) -> Result<&mut LDir, LayerError> {
        let parents = &components[..components.len() - 1];
        let whited = &self.whited;
        let mut dir = &mut self.root;
        for (i, &c) in parents.iter().enumerate() {
            if !dir.children.contains_key(c) {
                let deleted = !whited.is_empty() && (0..=i).any(|k| whited.contains(&join(&parents[..=k])[..]));
                let d = if deleted {
                    LDir { meta: Some(Meta::implied_dir()), ..LDir::default() }
                } else {
                    LDir { implied_by: Some(path.into()), ..LDir::default() }
                };
                dir.children.insert(c.into(), LNode::Dir(Box::new(d)));
            }
            dir = match dir.children.get_mut(c) {
                Some(LNode::Dir(d)) => d,
                _ => {
                    return Err(LayerError::ParentNotDirectory {
                        layer: layer.into(),
                        entry: lossy(path),
                        parent: lossy(&join(&parents[..=i])),
                    })
                }
            };
        }
        Ok(dir)
    }
}

// ---------------------------------------------------------------------------
// The merged tree
// ---------------------------------------------------------------------------

/// A name in the merged tree: a directory, or an inode (by id; several
/// names may share one: hard links).
#[derive(Debug)]
pub(crate) enum MNode {
    Dir(Box<MDir>),
    Leaf(usize),
}

/// A directory of the merged tree.
#[derive(Debug)]
pub(crate) struct MDir {
    meta: Meta,
    children: BTreeMap<Box<[u8]>, MNode>,
}

impl MDir {
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The entries, sorted bytewise by name.
    pub fn children(&self) -> impl Iterator<Item = (&[u8], &MNode)> {
        self.children.iter().map(|(k, v)| (&**k, v))
    }
}

/// The layers applied so far, bottom first.
#[derive(Debug)]
pub(crate) struct Merged {
    root: MDir,
    inodes: Vec<Inode>,
}

/// Counts of what [`Merged::walk`] emitted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WalkStats {
    pub entries: u64,
    pub hardlinks: u64,
}

impl Merged {
    pub fn new() -> Merged {
        Merged { root: MDir { meta: Meta::implied_dir(), children: BTreeMap::new() }, inodes: Vec::new() }
    }

    pub fn root(&self) -> &MDir {
        &self.root
    }

    pub fn inode(&self, id: usize) -> &Inode {
        &self.inodes[id]
    }

    /// How many inodes the tree holds (some may no longer have a name).
    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    /// Applies the next layer up; returns how many hard links it
    /// materialised from the layers below.
    pub fn apply(&mut self, layer: LayerTree, label: &str) -> Result<u64, LayerError> {
        let base = self.inodes.len();
        let mut copies = 0;
        // Resolve links against the layers below before this layer's
        // whiteouts or entries change what is visible.
        let mut resolved = Vec::with_capacity(layer.inodes.len());
        for inode in layer.inodes {
            resolved.push(match inode {
                LInode::Own(i) => i,
                LInode::Lower { target, entry } => {
                    copies += 1;
                    self.regular_file(&target).cloned().ok_or_else(|| LayerError::HardlinkTargetMissing {
                        layer: label.into(),
                        entry: lossy(&entry),
                        target: lossy(&target),
                    })?
                }
            });
        }
        self.inodes.extend(resolved);
        let mut root = layer.root;
        let mut path = Vec::new();
        lend_metadata(&mut root, Some(&self.root), &mut path, label)?;
        apply_dir(&mut self.root, root, base);
        Ok(copies)
    }

    /// The regular file visible at `path`, if any.
    fn regular_file(&self, path: &[u8]) -> Option<&Inode> {
        let mut dir = &self.root;
        let components: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        for (i, c) in components.iter().enumerate() {
            match dir.children.get(*c)? {
                MNode::Dir(d) if i + 1 < components.len() => dir = d,
                MNode::Leaf(id) if i + 1 == components.len() => {
                    let inode = &self.inodes[*id];
                    return matches!(inode.content, Content::File { .. }).then_some(inode);
                }
                _ => return None,
            }
        }
        None
    }

    /// Calls `emit` for every entry of the export, in output order: depth
    /// first, siblings bytewise (no whiteout names are left, so that is
    /// [`tarfmt::compare_siblings`]' order), a directory right before its
    /// contents; the first name of a hard-link group in that order is the
    /// full entry, the others link to it.
    pub fn walk<E>(
        &self,
        clamp: Option<u64>,
        emit: &mut dyn FnMut(Entry, Option<DataRef>) -> Result<(), E>,
    ) -> Result<WalkStats, E> {
        let mut names = vec![0u32; self.inodes.len()];
        count_names(&self.root, &mut names);
        let mut walker = Walker { inodes: &self.inodes, names, first: HashMap::new(), clamp, stats: WalkStats::default() };
        let mut path = Vec::new();
        walker.dir(&self.root, &mut path, emit)?;
        Ok(walker.stats)
    }
}

/// Gives every directory the layer only implies the metadata the layers
/// below (`lower`, before this layer changes anything) show at its path;
/// refuses one where they show a non-directory.
fn lend_metadata(l: &mut LDir, lower: Option<&MDir>, path: &mut Vec<u8>, label: &str) -> Result<(), LayerError> {
    for (name, child) in &mut l.children {
        let LNode::Dir(ld) = child else { continue };
        let len = path.len();
        if len > 0 {
            path.push(b'/');
        }
        path.extend_from_slice(name);
        let below = lower.and_then(|m| m.children.get(name));
        if ld.meta.is_none() {
            ld.meta = Some(match below {
                Some(MNode::Dir(md)) => md.meta.clone(),
                Some(MNode::Leaf(_)) => {
                    return Err(LayerError::WritesIntoNonDirectory {
                        layer: label.into(),
                        entry: lossy(ld.implied_by.as_deref().unwrap_or(path)),
                        path: lossy(path),
                    })
                }
                None => Meta::implied_dir(),
            });
        }
        let below = match below {
            Some(MNode::Dir(md)) => Some(&**md),
            _ => None,
        };
        lend_metadata(ld, below, path, label)?;
        path.truncate(len);
    }
    Ok(())
}

/// Applies one layer's directory onto the merged one: its whiteouts and
/// opaque marker first (they only hide what is below), then its entries.
/// Every directory of `l` has its metadata by now ([`lend_metadata`]).
fn apply_dir(m: &mut MDir, l: LDir, base: usize) {
    if l.opaque {
        m.children.clear();
    }
    for w in &l.whiteouts {
        m.children.remove(w);
    }
    if let Some(meta) = l.meta {
        m.meta = meta;
    }
    for (name, child) in l.children {
        match child {
            LNode::Leaf(id) => {
                m.children.insert(name, MNode::Leaf(base + id));
            }
            LNode::Dir(ld) => match m.children.get_mut(&name) {
                Some(MNode::Dir(md)) => apply_dir(md, *ld, base),
                // Over a non-directory (or nothing): a new directory, nothing
                // below it merges.
                _ => {
                    let mut md = MDir { meta: Meta::implied_dir(), children: BTreeMap::new() };
                    apply_dir(&mut md, *ld, base);
                    m.children.insert(name, MNode::Dir(Box::new(md)));
                }
            },
        }
    }
}

fn count_names(dir: &MDir, names: &mut [u32]) {
    for child in dir.children.values() {
        match child {
            MNode::Dir(d) => count_names(d, names),
            MNode::Leaf(id) => names[*id] = names[*id].saturating_add(1),
        }
    }
}

struct Walker<'a> {
    inodes: &'a [Inode],
    /// How many names each inode has in the export.
    names: Vec<u32>,
    /// The output name of each multi-name inode emitted so far.
    first: HashMap<usize, Vec<u8>>,
    clamp: Option<u64>,
    stats: WalkStats,
}

impl Walker<'_> {
    fn dir<E>(
        &mut self,
        dir: &MDir,
        path: &mut Vec<u8>,
        emit: &mut dyn FnMut(Entry, Option<DataRef>) -> Result<(), E>,
    ) -> Result<(), E> {
        for (name, child) in &dir.children {
            let len = path.len();
            if len > 0 {
                path.push(b'/');
            }
            path.extend_from_slice(name);
            match child {
                MNode::Dir(d) => {
                    emit(self.entry(path, Kind::Dir, &d.meta), None)?;
                    self.stats.entries += 1;
                    self.dir(d, path, emit)?;
                }
                MNode::Leaf(id) => {
                    let inode = &self.inodes[*id];
                    let (kind, data) = match (self.names[*id] > 1).then(|| self.first.get(id)).flatten() {
                        Some(first) => {
                            self.stats.hardlinks += 1;
                            (Kind::Hardlink { target: first.clone() }, None)
                        }
                        None => {
                            if self.names[*id] > 1 {
                                self.first.insert(*id, path.clone());
                            }
                            content_kind(&inode.content)
                        }
                    };
                    emit(self.entry(path, kind, &inode.meta), data)?;
                    self.stats.entries += 1;
                }
            }
            path.truncate(len);
        }
        Ok(())
    }

    fn entry(&self, path: &[u8], kind: Kind, meta: &Meta) -> Entry {
        Entry {
            path: path.to_vec(),
            kind,
            mode: meta.mode,
            uid: meta.uid.into(),
            gid: meta.gid.into(),
            mtime: tarfmt::export_mtime(meta.mtime, self.clamp),
            xattrs: meta.xattrs.clone(),
        }
    }
}

fn content_kind(content: &Content) -> (Kind, Option<DataRef>) {
    match content {
        Content::File { source, offset, size } => {
            (Kind::File { size: *size }, Some(DataRef { source: *source, offset: *offset }))
        }
        Content::Symlink(t) => (Kind::Symlink { target: t.clone() }, None),
        Content::Char { major, minor } => (Kind::Char { major: *major, minor: *minor }, None),
        Content::Block { major, minor } => (Kind::Block { major: *major, minor: *minor }, None),
        Content::Fifo => (Kind::Fifo, None),
    }
}

// ---------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------

/// Linux's PATH_MAX: a longer path cannot be created in the guest (and
/// bounds the recursion depth of the merge).
pub(crate) const PATH_MAX: usize = 4096;
/// Linux's NAME_MAX.
pub(crate) const NAME_MAX: usize = 255;

/// A tar path as the export names it: no leading `/` or `./`, no empty or
/// `.` components, no trailing `/`; empty means the root. `..` is refused
/// (a layer must not reach outside the root), as are paths Linux cannot
/// hold.
pub(crate) fn normalize(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    if raw.contains(&0) {
        return Err("the path holds a NUL byte");
    }
    let mut out = Vec::with_capacity(raw.len());
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => continue,
            b".." => return Err("a `..` component leads outside the root"),
            _ if c.len() > NAME_MAX => return Err("a component is longer than 255 bytes"),
            _ => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    if out.len() >= PATH_MAX {
        return Err("the path is longer than 4095 bytes");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(mode: u32, mtime: u64) -> Meta {
        Meta { mode, uid: 0, gid: 0, mtime, mtime_nsec: 0, xattrs: vec![] }
    }

    /// A layer from (path, kind) pairs, files get offset = their order.
    fn layer(entries: &[(&str, Ent)]) -> Result<LayerTree, LayerError> {
        let mut t = LayerTree::new();
        for (i, (path, e)) in entries.iter().enumerate() {
            let kind = match e {
                Ent::D(mode) => EntryKind::Dir(meta(*mode, 10)),
                Ent::F => EntryKind::Node(Inode {
                    content: Content::File { source: 0, offset: i as u64, size: 1 },
                    meta: meta(0o644, 10),
                }),
                Ent::L(t) => EntryKind::Node(Inode { content: Content::Symlink(t.as_bytes().to_vec()), meta: meta(0o777, 10) }),
                Ent::H(t) => EntryKind::Hardlink(t.as_bytes().to_vec()),
                Ent::M => EntryKind::Marker,
            };
            t.insert(&normalize(path.as_bytes()).unwrap(), kind, "layer")?;
        }
        Ok(t)
    }

    enum Ent {
        D(u32),
        F,
        L(&'static str),
        H(&'static str),
        M,
    }
    use Ent::*;

    /// Merges the layers and lists the export: "path kind mode mtime" with
    /// files as `f@source:offset` and links as `->target`/`=>target`.
    fn export(layers: Vec<Vec<(&str, Ent)>>) -> Result<Vec<String>, String> {
        let mut m = Merged::new();
        for (i, l) in layers.iter().enumerate() {
            // The whole chain, so the tables can check causes are kept.
            let t = layer(l).map_err(|e| crate::report::one_line(&e))?;
            let t = relabel(t, i as u32);
            m.apply(t, "layer").map_err(|e| crate::report::one_line(&e))?;
        }
        let mut out = vec![];
        m.walk::<()>(None, &mut |e, data| {
            let k = match (&e.kind, data) {
                (Kind::Dir, _) => "d".to_string(),
                (Kind::File { .. }, Some(d)) => format!("f@{}:{}", d.source, d.offset),
                (Kind::Symlink { target }, _) => format!("->{}", lossy(target)),
                (Kind::Hardlink { target }, _) => format!("=>{}", lossy(target)),
                (k, _) => format!("{k:?}"),
            };
            out.push(format!("{} {} {:o} {}", lossy(&e.path), k, e.mode, e.mtime));
            Ok(())
        })
        .unwrap();
        Ok(out)
    }

    /// Gives every file of a layer tree the layer's number as its source.
    fn relabel(mut t: LayerTree, source: u32) -> LayerTree {
        for i in &mut t.inodes {
            if let LInode::Own(Inode { content: Content::File { source: s, .. }, .. }) = i {
                *s = source;
            }
        }
        t
    }

    #[test]
    fn merges_layers_as_overlayfs_does() {
        type Case = (&'static str, Vec<Vec<(&'static str, Ent)>>, Result<Vec<&'static str>, &'static str>);
        let cases: Vec<Case> = vec![
            (
                "upper file replaces lower file; dirs merge, metadata from the top entry",
                vec![
                    vec![("etc", D(0o755)), ("etc/a", F), ("etc/b", F)],
                    vec![("etc", D(0o700)), ("etc/b", F)],
                ],
                Ok(vec!["etc d 700 10", "etc/a f@0:1 644 10", "etc/b f@1:1 644 10"]),
            ),
            (
                "whiteout hides lower only; same-layer file survives whatever the order",
                vec![
                    vec![("d", D(0o755)), ("d/x", F), ("d/y", F)],
                    vec![("d/x", F), ("d/.wh.x", M), ("d/.wh.y", M)],
                ],
                Ok(vec!["d d 755 10", "d/x f@1:0 644 10"]),
            ),
            (
                "opaque marker after its siblings still only hides lower contents",
                vec![
                    vec![("d", D(0o755)), ("d/old", F), ("d/sub", D(0o755)), ("d/sub/x", F)],
                    vec![("d/new", F), ("d/.wh..wh..opq", M)],
                ],
                Ok(vec!["d d 755 10", "d/new f@1:0 644 10"]),
            ),
            (
                "implied dir keeps lower metadata (e.g. /tmp 1777)",
                vec![vec![("tmp", D(0o1777)), ("tmp/a", F)], vec![("tmp/b", F)]],
                Ok(vec!["tmp d 1777 10", "tmp/a f@0:1 644 10", "tmp/b f@1:0 644 10"]),
            ),
            (
                "implied dir with nothing below gets 0755 root mtime 0",
                vec![vec![("a/b/c", F)]],
                Ok(vec!["a d 755 0", "a/b d 755 0", "a/b/c f@0:0 644 10"]),
            ),
            (
                "file replaced by a directory: nothing of the file is left",
                vec![vec![("x", F)], vec![("x", D(0o750)), ("x/y", F)]],
                Ok(vec!["x d 750 10", "x/y f@1:1 644 10"]),
            ),
            (
                "directory replaced by a file hides the whole lower subtree",
                vec![vec![("x", D(0o755)), ("x/y", F)], vec![("x", L("elsewhere"))], vec![]],
                Ok(vec!["x ->elsewhere 777 10"]),
            ),
            (
                "dir over lower non-dir does not merge with what lies below it",
                vec![
                    vec![("x", D(0o755)), ("x/deep", F)],
                    vec![("x", F)],
                    vec![("x", D(0o700)), ("x/top", F)],
                ],
                Ok(vec!["x d 700 10", "x/top f@2:1 644 10"]),
            ),
            (
                "whiteout then re-create as a directory: lower contents gone (opaque)",
                vec![
                    vec![("d", D(0o755)), ("d/old", F)],
                    vec![(".wh.d", M), ("d", D(0o711)), ("d/new", F)],
                ],
                Ok(vec!["d d 711 10", "d/new f@1:2 644 10"]),
            ),
            (
                "whiteout of a lower symlink lets the layer imply a dir there",
                vec![vec![("d", L("/etc"))], vec![(".wh.d", M), ("d/x", F)]],
                Ok(vec!["d d 755 0", "d/x f@1:1 644 10"]),
            ),
            (
                "an earlier whiteout of an ancestor: implied dirs get no lower metadata",
                vec![vec![("a", D(0o700)), ("a/b", D(0o700)), ("a/b/old", F)], vec![(".wh.a", M), ("a/b/new", F)]],
                Ok(vec!["a d 755 0", "a/b d 755 0", "a/b/new f@1:1 644 10"]),
            ),
            (
                "a later whiteout: the implied dir keeps lower metadata, lower contents go",
                vec![vec![("a", D(0o700)), ("a/old", F)], vec![("a/new", F), (".wh.a", M)]],
                Ok(vec!["a d 700 10", "a/new f@1:0 644 10"]),
            ),
            (
                "a later whiteout does not excuse writing into a lower symlink",
                vec![vec![("d", L("/etc"))], vec![("d/x", F), (".wh.d", M)]],
                Err("entry d/x writes into d"),
            ),
            (
                "an opaque marker hides lower contents, not lower metadata",
                vec![
                    vec![("d", D(0o755)), ("d/sub", D(0o700)), ("d/sub/old", F)],
                    vec![("d/.wh..wh..opq", M), ("d/sub/new", F)],
                ],
                Ok(vec!["d d 755 10", "d/sub d 700 10", "d/sub/new f@1:1 644 10"]),
            ),
            (
                "same path twice in one layer: last wins, a file drops the layer's subtree",
                vec![vec![("a", D(0o755)), ("a/x", F), ("a", F), ("b", F), ("b", D(0o700))]],
                Ok(vec!["a f@0:2 644 10", "b d 700 10"]),
            ),
            (
                "hard links within a layer: first name in output order is the file",
                vec![vec![("z", F), ("a", H("z")), ("m", H("a"))]],
                Ok(vec!["a f@0:0 644 10", "m =>a 644 10", "z =>a 644 10"]),
            ),
            (
                "a hard-linked name hidden above drops out of its group",
                vec![vec![("a", F), ("b", H("a")), ("c", H("a"))], vec![(".wh.a", M), ("c", F)]],
                Ok(vec!["b f@0:0 644 10", "c f@1:1 644 10"]),
            ),
            (
                "hard link to a lower layer's file is a copy, not a link",
                vec![vec![("bin", D(0o755)), ("bin/sh", F)], vec![("bin/ash", H("bin/sh"))]],
                Ok(vec!["bin d 755 10", "bin/ash f@0:1 644 10", "bin/sh f@0:1 644 10"]),
            ),
            (
                "a link to its own layer's file written after it copies the lower one",
                vec![vec![("a", F)], vec![("b", H("a")), ("a", F)]],
                Ok(vec!["a f@1:1 644 10", "b f@0:0 644 10"]),
            ),
            (
                "links to one lower file become separate copies unless linked to each other",
                vec![vec![("a", F)], vec![("b", H("a")), ("c", H("a")), ("d", H("b"))]],
                Ok(vec!["a f@0:0 644 10", "b f@0:0 644 10", "c f@0:0 644 10", "d =>b 644 10"]),
            ),
            (
                "the copy respects whiteouts between",
                vec![vec![("a", F)], vec![(".wh.a", M)], vec![("b", H("a"))]],
                Err("hard link b -> a"),
            ),
            (
                "the copy must be a regular file",
                vec![vec![("a", L("x"))], vec![("b", H("a"))]],
                Err("hard link b -> a"),
            ),
            ("hard link to a directory", vec![vec![("d", D(0o755)), ("x", H("d"))]], Err("is a directory")),
            (
                "writing below a lower symlink without replacing it",
                vec![vec![("etc", L("/"))], vec![("etc/passwd", F)]],
                Err("entry etc/passwd writes into etc"),
            ),
            (
                "a whiteout implies its directory too",
                vec![vec![("etc", L("/"))], vec![("etc/.wh.passwd", M)]],
                Err("entry etc/.wh.passwd writes into etc"),
            ),
            (
                "writing below a symlink of the same layer",
                vec![vec![("a", L("/")), ("a/etc/x", F)]],
                Err("entry a/etc/x: its parent a is not a directory"),
            ),
            (
                "bare .wh.",
                vec![vec![("d/.wh.", M)]],
                Err("layer: entry \"d/.wh.\": invalid whiteout name: invalid whiteout name \".wh.\" (a bare \".wh.\""),
            ),
            ("whiteout name as a directory", vec![vec![(".wh.d/x", F)]], Err("a whiteout name cannot be a directory")),
            (
                "the root entry is skipped, root opaque hides everything below",
                vec![vec![("", D(0o700)), ("a", F)], vec![(".wh..wh..opq", M), ("b", F)]],
                Ok(vec!["b f@1:1 644 10"]),
            ),
        ];
        for (name, layers, want) in cases {
            let got = export(layers);
            match (&got, &want) {
                (Ok(g), Ok(w)) => assert_eq!(g, w, "{name}"),
                (Err(g), Err(w)) => assert!(g.contains(w), "{name}: error {g:?} should contain {w:?}"),
                _ => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn normalizes_paths() {
        let table: &[(&str, Result<&str, &str>)] = &[
            ("./etc/passwd", Ok("etc/passwd")),
            ("/etc//passwd/", Ok("etc/passwd")),
            ("././a/./b", Ok("a/b")),
            ("./", Ok("")),
            ("/", Ok("")),
            ("a/../b", Err("..")),
            ("..", Err("..")),
        ];
        for (raw, want) in table {
            let got = normalize(raw.as_bytes());
            match (got, want) {
                (Ok(g), Ok(w)) => assert_eq!(lossy(&g), *w, "{raw}"),
                (Err(g), Err(w)) => assert!(g.contains(w), "{raw}: {g}"),
                (g, w) => panic!("{raw}: got {g:?}, want {w:?}"),
            }
        }
        assert!(normalize(&[b'a'; 256]).is_err());
        assert!(normalize(&b"a/".repeat(2048)).is_ok());
        assert!(normalize(&b"a/".repeat(2049)).is_err());
        assert!(normalize(b"a\0b").is_err());
    }

    #[test]
    fn clamps_mtimes_only_when_asked() {
        let mut m = Merged::new();
        m.apply(layer(&[("a", F)]).unwrap(), "l").unwrap();
        let mut mtimes = vec![];
        for clamp in [None, Some(5), Some(50)] {
            m.walk::<()>(clamp, &mut |e, _| {
                mtimes.push(e.mtime);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(mtimes, vec![10, 5, 10]);
    }
}
