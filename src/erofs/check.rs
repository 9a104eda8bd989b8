//! The round-trip oracle of the writer, for its unit tests and the
//! `erofs` fuzz target: what a [`Tree`] says every path shows, worked out
//! from the tree alone, against what [`decode`] reads back from the
//! image, on separate devices and on the flat disk. Not used by the
//! product.

use std::collections::BTreeMap;
use std::io;

use super::decode::{self, Devices, NodeKind};
use super::{Data, DataSource, InodeId, Kind, Meta, Tree, Written};

/// Embedded data: source `i` is `self.0[i]`.
pub struct Sources(pub Vec<Vec<u8>>);

impl DataSource for Sources {
    fn copy_to(&mut self, source: u32, offset: u64, len: u64, out: &mut dyn io::Write) -> io::Result<()> {
        let bytes = self.0.get(source as usize).ok_or_else(|| io::Error::other("no such source"))?;
        let range = usize::try_from(offset).ok().zip(offset.checked_add(len).and_then(|e| usize::try_from(e).ok()));
        let bytes = range.and_then(|(from, to)| bytes.get(from..to));
        out.write_all(bytes.ok_or_else(|| io::Error::other("past the source's end"))?)
    }
}

/// What one path shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shows {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// A path, what it shows, its metadata (xattrs sorted by name), its
/// link count, and the first path (by sorted order) of its inode, so
/// hard links compare as groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub path: Vec<u8>,
    pub shows: Shows,
    pub meta: Meta,
    pub nlink: u32,
    pub inode_of: Vec<u8>,
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut path = if dir == b"/" { Vec::new() } else { dir.to_vec() };
    path.push(b'/');
    path.extend_from_slice(name);
    path
}

fn sorted_meta(meta: &Meta) -> Meta {
    let mut meta = meta.clone();
    meta.xattrs.sort();
    meta
}

/// What the tree says every path should show (the tree must be one the
/// writer accepted: every child in range, no cycle, data inside its
/// device or source).
pub fn expected(tree: &Tree, devices: &[Vec<u8>], sources: &[Vec<u8>]) -> Vec<Seen> {
    let mut paths = vec![(b"/".to_vec(), tree.root)];
    let mut names = vec![0u32; tree.inodes.len()];
    let mut next = 0;
    while next < paths.len() {
        let (path, id) = paths[next].clone();
        next += 1;
        if let Kind::Dir(children) = &tree.inodes[id].kind {
            for (name, child) in children {
                names[*child] += 1;
                paths.push((join(&path, name), *child));
            }
        }
    }
    paths.sort();
    let mut first: BTreeMap<InodeId, Vec<u8>> = BTreeMap::new();
    for (path, id) in &paths {
        first.entry(*id).or_insert_with(|| path.clone());
    }
    paths
        .iter()
        .map(|(path, id)| {
            let inode = &tree.inodes[*id];
            let (shows, nlink) = match &inode.kind {
                Kind::Dir(children) => {
                    let subdirs = children.iter().filter(|(_, c)| matches!(tree.inodes[*c].kind, Kind::Dir(_)));
                    (Shows::Dir, 2 + subdirs.count() as u32)
                }
                // An empty file reads nothing, wherever it points.
                Kind::File { size: 0, .. } => (Shows::File(Vec::new()), names[*id]),
                Kind::File { size, data } => {
                    let (bytes, offset) = match data {
                        Data::Device { device, offset } => (&devices[*device], *offset),
                        Data::Embedded { source, offset } => (&sources[*source as usize], *offset),
                    };
                    (Shows::File(bytes[offset as usize..(offset + size) as usize].to_vec()), names[*id])
                }
                Kind::Symlink(target) => (Shows::Symlink(target.clone()), names[*id]),
                Kind::Char { major, minor } => (Shows::Char(*major, *minor), names[*id]),
                Kind::Block { major, minor } => (Shows::Block(*major, *minor), names[*id]),
                Kind::Fifo => (Shows::Fifo, names[*id]),
            };
            Seen { path: path.clone(), shows, meta: sorted_meta(&inode.meta), nlink, inode_of: first[id].clone() }
        })
        .collect()
}

/// What the decoded image shows, file data read through `devices`.
pub fn seen(image: &decode::Image, devices: Devices) -> Result<Vec<Seen>, decode::Error> {
    let mut paths = image.paths();
    paths.sort();
    let mut first: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for (path, nid) in &paths {
        first.entry(*nid).or_insert_with(|| path.clone());
    }
    paths
        .iter()
        .map(|(path, nid)| {
            let node = &image.inodes[nid];
            let shows = match &node.kind {
                NodeKind::Dir { .. } => Shows::Dir,
                NodeKind::File { .. } => Shows::File(image.read(*nid, devices)?),
                NodeKind::Symlink { target, .. } => Shows::Symlink(target.clone()),
                NodeKind::Char { major, minor } => Shows::Char(*major, *minor),
                NodeKind::Block { major, minor } => Shows::Block(*major, *minor),
                NodeKind::Fifo => Shows::Fifo,
            };
            Ok(Seen { path: path.clone(), shows, meta: sorted_meta(&node.meta), nlink: node.nlink, inode_of: first[nid].clone() })
        })
        .collect()
}

/// The flat disk: the image, then each device at its start.
pub fn flat(image: &[u8], written: &Written, devices: &[Vec<u8>]) -> Vec<u8> {
    let mut flat = image.to_vec();
    for (bytes, start) in devices.iter().zip(&written.device_starts) {
        assert!(*start >= flat.len() as u64 && start % 4096 == 0, "device start {start}");
        flat.resize(*start as usize, 0);
        flat.extend_from_slice(bytes);
    }
    flat
}

/// Checks an image the writer made of `tree` (`written` is what it
/// returned): decoded with the devices separate and as the flat disk,
/// both show what the tree says. `devices` are the devices' bytes as
/// given (padded here to whole blocks, as the guest's disk pads them).
pub fn round_trip(
    tree: &Tree,
    devices: &[Vec<u8>],
    sources: &[Vec<u8>],
    image: &[u8],
    written: &Written,
) -> Result<(), String> {
    if written.len != image.len() as u64 || written.len % 4096 != 0 {
        return Err(format!("the writer says {} bytes but wrote {}", written.len, image.len()));
    }
    let padded: Vec<Vec<u8>> = devices
        .iter()
        .map(|d| {
            let mut d = d.clone();
            d.resize(d.len().next_multiple_of(512), 0);
            d
        })
        .collect();
    let want = expected(tree, &padded, sources);
    let decoded = decode::decode(image).map_err(|e| format!("decoding the image: {e}"))?;
    let separate: Vec<&[u8]> = padded.iter().map(Vec::as_slice).collect();
    let got = seen(&decoded, Devices::Separate(&separate)).map_err(|e| format!("reading the image: {e}"))?;
    if got != want {
        return Err(first_difference("separate devices", &got, &want));
    }
    if written.inodes != decoded.inodes.len() as u64 {
        return Err(format!("the writer counts {} inodes, the image has {}", written.inodes, decoded.inodes.len()));
    }
    let flat = flat(image, written, &padded);
    let decoded_flat = decode::decode(&flat).map_err(|e| format!("decoding the flat disk: {e}"))?;
    let got = seen(&decoded_flat, Devices::Flat).map_err(|e| format!("reading the flat disk: {e}"))?;
    if got != want {
        return Err(first_difference("flat disk", &got, &want));
    }
    Ok(())
}

fn first_difference(what: &str, got: &[Seen], want: &[Seen]) -> String {
    for (g, w) in got.iter().zip(want) {
        if g != w {
            return format!("{what}: the image shows {g:?} where the tree says {w:?}");
        }
    }
    format!("{what}: the image shows {} paths, the tree {}", got.len(), want.len())
}
