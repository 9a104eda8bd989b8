//! An EROFS image writer: the merged base as a read-only filesystem whose
//! file data stay where they are, on extra devices (the layers' own
//! bytes), the layout `mkfs.erofs --tar=i` makes and Linux ≥ 6.4 mounts.
//!
//! The image holds the metadata (inodes, directories, xattrs, symlink
//! targets) and, for [`Data::Embedded`] files, their bytes; a
//! [`Data::Device`] file is a chunk-based inode whose chunk indexes name an
//! extra device and a block on it. The same image mounts two ways
//! (`super.c` `erofs_scan_devices`, `data.c` `erofs_map_dev`):
//!
//! * `mount -t erofs -o device=DEV0,device=DEV1 IMAGE`: each device is its
//!   own disk, chunk addresses are relative to it;
//! * `mount -t erofs FLAT` with no `device=`: one disk that is the image
//!   padded to 4 KiB, then each device in order, each starting on a 4 KiB
//!   boundary ([`Written::device_starts`]); the kernel adds each device's
//!   `mapped_blkaddr` from the device table.
//!
//! The steps: [`layout`] checks the tree and decides every nid and block
//! (nothing is written if the tree is wrong); [`write`](mod@write) then
//! emits the bytes front to back. [`decode`] reads images back, for tests
//! and fuzzing.

pub mod decode;
pub mod format;
mod layout;
mod write;

use std::io;

/// Bytes in one block of our images: tar data start on 512-byte
/// boundaries, so a chunk can point straight at them.
pub const BLOCK_SIZE: u64 = format::BLKSZ;

/// Extra devices one image may name. The device table sits between the
/// superblock and the root inode, and `root_nid` is 16 bits
/// (`erofs_super_block`); 4096 slots (512 KiB) keep it far from that limit
/// and are more than any image has layers.
pub const MAX_DEVICES: usize = 4096;

/// Longest symlink target Linux reads back: `page_get_link` ends the
/// target at PAGE_SIZE - 1 bytes (and `symlink(2)` refuses longer ones).
pub const MAX_SYMLINK_LEN: usize = 4095;

/// Index into [`Tree::inodes`].
pub type InodeId = usize;

/// The filesystem to write: inodes and the directory that is the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    pub inodes: Vec<Inode>,
    pub root: InodeId,
}

/// One inode. A non-directory that several directory entries name is one
/// inode (hard links); a directory is named by exactly one entry, or is
/// the root and named by none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    pub kind: Kind,
    pub meta: Meta,
}

/// What `stat` and `getxattr` show of an inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits with setuid/setgid/sticky (`& 0o7777`); the writer
    /// adds the file type from [`Kind`].
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    /// Below 1_000_000_000.
    pub mtime_nsec: u32,
    /// Full names (`user.x`, `trusted.x`, `security.capability`,
    /// `system.posix_acl_access`, `system.posix_acl_default`), any order;
    /// the image stores them in a canonical order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// What an inode is and holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Children by name, any order, without `.` and `..` (the writer adds
    /// them).
    Dir(Vec<(Vec<u8>, InodeId)>),
    File {
        size: u64,
        data: Data,
    },
    Symlink(Vec<u8>),
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// Where a regular file's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    /// `size` bytes at byte `offset` (a multiple of [`BLOCK_SIZE`]) of extra
    /// device `device` (an index into the `devices` given to [`write`]).
    Device { device: usize, offset: u64 },
    /// Bytes copied into the image itself at write time, read through
    /// [`DataSource`] (for `--copy-to-root` images).
    Embedded { source: u32, offset: u64 },
}

/// An extra device: a disk (or a stretch of the flat disk) that
/// [`Data::Device`] files point into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its length in 512-byte blocks.
    pub blocks: u64,
    /// 1..=64 bytes, no NUL, stored in the device slot (the kernel only
    /// reads it in fscache mode; mkfs.erofs puts a digest there).
    pub tag: String,
}

/// Where [`Data::Embedded`] bytes come from.
pub trait DataSource {
    /// Writes exactly `len` bytes of `source` from `offset` to `out`.
    fn copy_to(&mut self, source: u32, offset: u64, len: u64, out: &mut dyn io::Write) -> io::Result<()>;
}

/// What [`write`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Image bytes written, a multiple of 4096.
    pub len: u64,
    /// Byte offset of each extra device in the flat layout (the first is
    /// `len`).
    pub device_starts: Vec<u64>,
    /// Inodes in the image (hard links count once).
    pub inodes: u64,
    /// Bytes before the first data block: boot sector, superblock, device
    /// table, inodes with their xattrs, chunk indexes and inline tails.
    pub metadata_bytes: u64,
    /// 512-byte directory blocks outside the inodes.
    pub dir_blocks: u64,
    /// 512-byte blocks of embedded file data and long symlink targets.
    pub data_blocks: u64,
}

/// Why an image cannot be written. Paths are built from the tree (`/` is
/// the root); every check runs before the first byte is written, except
/// the I/O ones.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the root is inode {root} but the tree has {inodes} inodes")]
    RootOutOfRange { root: InodeId, inodes: usize },
    #[error("the root (inode {root}) is not a directory")]
    RootNotDir { root: InodeId },
    #[error("{dir}: the entry {name:?} names inode {child} but the tree has {inodes} inodes")]
    ChildOutOfRange { dir: String, name: String, child: InodeId, inodes: usize },
    #[error("{dir}: the entry {name:?} is not a valid name (empty, `.`, `..`, or with `/` or NUL)")]
    InvalidName { dir: String, name: String },
    #[error("{dir}: the entry {name:?} is {len} bytes long; EROFS names are at most 255")]
    NameTooLong { dir: String, name: String, len: usize },
    #[error("{dir}: two entries are named {name:?}")]
    DuplicateName { dir: String, name: String },
    #[error("{path}: the root directory is named again (a directory cycle)")]
    RootLinked { path: String },
    #[error("{path}: this directory is already named {first} (directories cannot be hard links or form a cycle)")]
    DirLinkedTwice { path: String, first: String },
    #[error("inode {inode} is in the tree but no directory names it")]
    Unreferenced { inode: InodeId },
    #[error("{path}: mode {mode:#o} has bits beyond the permissions 0o7777 (the file type comes from the kind)")]
    Mode { path: String, mode: u32 },
    #[error("{path}: mtime nanoseconds {nsec} is not below one second")]
    MtimeNsec { path: String, nsec: u32 },
    #[error("{path}: the symlink target is {len} bytes or holds a NUL; Linux reads back 1..=4095 bytes without NUL")]
    SymlinkTarget { path: String, len: usize },
    #[error("{path}: device number {major}:{minor} does not fit Linux's dev_t (major < 4096, minor < 2^20)")]
    DeviceNumber { path: String, major: u32, minor: u32 },
    #[error("{path}: xattr {name:?} has no prefix EROFS stores (user., trusted., security., system.posix_acl_access/default) or nothing after it")]
    XattrName { path: String, name: String },
    #[error("{path}: xattr {name:?} is {len} bytes long; Linux reads names of at most 255 (XATTR_NAME_MAX)")]
    XattrNameTooLong { path: String, name: String, len: usize },
    #[error("{path}: the value of xattr {name:?} is {len} bytes; EROFS values are below 65536")]
    XattrValueTooLarge { path: String, name: String, len: usize },
    #[error("{path}: the xattr {name:?} is given twice")]
    DuplicateXattr { path: String, name: String },
    #[error("{path}: the xattrs take {bytes} bytes, more than an inode holds ({limit})")]
    XattrsTooLarge { path: String, bytes: u64, limit: u64 },
    #[error("{count} extra devices given; an image holds at most {limit}")]
    TooManyDevices { count: usize, limit: usize },
    #[error("extra device {device}: tag {tag:?} must be 1..=64 bytes without NUL")]
    DeviceTag { device: usize, tag: String },
    #[error(
        "extra device {device} ends at block {end} of the flat layout, past the 2^32 blocks (2 TiB) EROFS addresses"
    )]
    FlatLayoutTooLarge { device: usize, end: u64 },
    #[error("{path}: its data are on extra device {device} but only {devices} are given")]
    NoSuchDevice { path: String, device: usize, devices: usize },
    #[error("{path}: its data start at byte {offset} of device {device}, not a multiple of 512")]
    UnalignedData { path: String, device: usize, offset: u64 },
    #[error(
        "{path}: its {size} bytes at byte {offset} of device {device} pass the device's end ({device_bytes} bytes)"
    )]
    DataOutOfDevice { path: String, device: usize, offset: u64, size: u64, device_bytes: u64 },
    #[error("the image needs {blocks} blocks, more than the 2^32 (2 TiB) EROFS addresses")]
    ImageTooLarge { blocks: u64 },
    #[error("{path}: reading its {len} bytes from source {source_id} at byte {offset} failed")]
    ReadEmbedded {
        path: String,
        source_id: u32,
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("{path}: source {source_id} gave {got} bytes from byte {offset} where the file has {len}")]
    EmbeddedLength { path: String, source_id: u32, offset: u64, len: u64, got: u64 },
    #[error("cannot write the EROFS image at byte {offset}")]
    Write {
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// Writes `tree` as an EROFS image to `out`, front to back, its file data
/// on `devices` or copied from `data`. The same tree and devices always
/// give the same bytes.
pub fn write(
    tree: &Tree,
    devices: &[Device],
    data: &mut dyn DataSource,
    out: &mut dyn io::Write,
) -> Result<Written, Error> {
    let plan = layout::plan(tree, devices)?;
    write::emit(tree, devices, &plan, data, out)?;
    Ok(plan.written())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::decode::{self, Devices, NodeKind};
    use super::*;

    /// Builds trees in tests: inode 0 is the root.
    pub(crate) struct Build {
        pub tree: Tree,
    }

    pub(crate) fn meta(mode: u32) -> Meta {
        Meta { mode, uid: 0, gid: 0, mtime: 0, mtime_nsec: 0, xattrs: Vec::new() }
    }

    impl Build {
        pub fn new() -> Build {
            Build { tree: Tree { inodes: vec![Inode { kind: Kind::Dir(Vec::new()), meta: meta(0o755) }], root: 0 } }
        }

        /// Adds an inode without naming it.
        pub fn inode(&mut self, kind: Kind, meta: Meta) -> InodeId {
            self.tree.inodes.push(Inode { kind, meta });
            self.tree.inodes.len() - 1
        }

        /// Names `id` as `name` in `dir`.
        pub fn link(&mut self, dir: InodeId, name: &[u8], id: InodeId) {
            let Kind::Dir(children) = &mut self.tree.inodes[dir].kind else { panic!("{dir} is not a dir") };
            children.push((name.to_vec(), id));
        }

        pub fn add(&mut self, dir: InodeId, name: &[u8], kind: Kind, meta: Meta) -> InodeId {
            let id = self.inode(kind, meta);
            self.link(dir, name, id);
            id
        }

        pub fn dir(&mut self, dir: InodeId, name: &[u8]) -> InodeId {
            self.add(dir, name, Kind::Dir(Vec::new()), meta(0o755))
        }
    }

    /// Embedded data: source `i` is `self.0[i]`.
    pub(crate) struct Sources(pub Vec<Vec<u8>>);

    impl DataSource for Sources {
        fn copy_to(&mut self, source: u32, offset: u64, len: u64, out: &mut dyn io::Write) -> io::Result<()> {
            let bytes = self.0.get(source as usize).ok_or_else(|| io::Error::other("no such source"))?;
            let range = offset as usize..(offset + len) as usize;
            out.write_all(bytes.get(range).ok_or_else(|| io::Error::other("past the source's end"))?)
        }
    }

    pub(crate) fn write_vec(tree: &Tree, devices: &[Device], sources: &[Vec<u8>]) -> Result<(Vec<u8>, Written), Error> {
        let mut out = Vec::new();
        let written = write(tree, devices, &mut Sources(sources.to_vec()), &mut out)?;
        assert_eq!(written.len, out.len() as u64);
        assert_eq!(written.len % 4096, 0);
        Ok((out, written))
    }

    /// What one path shows, as a test compares it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) enum Shows {
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
    pub(crate) struct Seen {
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

    /// What the tree says every path should show, worked out from the
    /// tree alone (not from the writer's layout).
    pub(crate) fn expected(tree: &Tree, devices: &[Vec<u8>], sources: &[Vec<u8>]) -> Vec<Seen> {
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
    pub(crate) fn seen(image: &decode::Image, devices: Devices) -> Vec<Seen> {
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
                    NodeKind::File { .. } => Shows::File(image.read(*nid, devices).unwrap()),
                    NodeKind::Symlink { target, .. } => Shows::Symlink(target.clone()),
                    NodeKind::Char { major, minor } => Shows::Char(*major, *minor),
                    NodeKind::Block { major, minor } => Shows::Block(*major, *minor),
                    NodeKind::Fifo => Shows::Fifo,
                };
                Seen {
                    path: path.clone(),
                    shows,
                    meta: sorted_meta(&node.meta),
                    nlink: node.nlink,
                    inode_of: first[nid].clone(),
                }
            })
            .collect()
    }

    /// The flat disk: the image, then each device at its start.
    pub(crate) fn flat(image: &[u8], written: &Written, devices: &[Vec<u8>]) -> Vec<u8> {
        let mut flat = image.to_vec();
        for (bytes, start) in devices.iter().zip(&written.device_starts) {
            assert!(*start >= flat.len() as u64 && start % 4096 == 0, "device start {start}");
            flat.resize(*start as usize, 0);
            flat.extend_from_slice(bytes);
        }
        flat
    }

    /// Writes `tree`, decodes it both ways (separate devices, flat disk)
    /// and checks both show what the tree says. Returns the image.
    pub(crate) fn round_trip(tree: &Tree, devices: &[Vec<u8>], sources: &[Vec<u8>], tags: &[&str]) -> Vec<u8> {
        let slots: Vec<Device> = devices
            .iter()
            .zip(tags)
            .map(|(bytes, tag)| Device { blocks: bytes.len().div_ceil(512) as u64, tag: tag.to_string() })
            .collect();
        let padded: Vec<Vec<u8>> = devices
            .iter()
            .map(|d| {
                let mut d = d.clone();
                d.resize(d.len().next_multiple_of(512), 0);
                d
            })
            .collect();
        let (image, written) = write_vec(tree, &slots, sources).unwrap();
        let want = expected(tree, &padded, sources);
        let decoded = decode::decode(&image).unwrap();
        let separate: Vec<&[u8]> = padded.iter().map(Vec::as_slice).collect();
        assert_eq!(seen(&decoded, Devices::Separate(&separate)), want);
        let flat = flat(&image, &written, &padded);
        let decoded_flat = decode::decode(&flat).unwrap();
        assert_eq!(seen(&decoded_flat, Devices::Flat), want);
        assert_eq!(written.inodes, decoded.inodes.len() as u64);
        image
    }

    #[test]
    fn a_small_tree_round_trips() {
        let mut b = Build::new();
        let etc = b.dir(0, b"etc");
        b.add(etc, b"hostname", Kind::File { size: 5, data: Data::Device { device: 0, offset: 512 } }, meta(0o644));
        b.add(0, b"copied", Kind::File { size: 3, data: Data::Embedded { source: 0, offset: 1 } }, meta(0o600));
        b.add(0, b"link", Kind::Symlink(b"etc/hostname".to_vec()), meta(0o777));
        let mut device = vec![0u8; 1024];
        device[512..517].copy_from_slice(b"box\n\n");
        round_trip(&b.tree, &[device], &[b"xabcx".to_vec()], &["layers"]);
    }
}
