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
//! The steps: `layout.rs` checks the tree and decides every nid and block
//! (nothing is written if the tree is wrong); `write.rs` then emits the
//! bytes front to back. [`decode`] reads images back, for tests and
//! fuzzing.

#[doc(hidden)]
pub mod check;
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
    /// device `device` (an index into the `devices` given to [`write()`]).
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

/// What [`write()`] wrote.
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

    use super::decode::{self, NodeKind};
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

    pub(crate) use super::check::Sources;

    pub(crate) fn write_vec(tree: &Tree, devices: &[Device], sources: &[Vec<u8>]) -> Result<(Vec<u8>, Written), Error> {
        let mut out = Vec::new();
        let written = write(tree, devices, &mut Sources(sources.to_vec()), &mut out)?;
        assert_eq!(written.len, out.len() as u64);
        assert_eq!(written.len % 4096, 0);
        Ok((out, written))
    }

    /// Writes `tree`, decodes it both ways (separate devices, flat disk)
    /// and checks both show what the tree says. Returns the image.
    pub(crate) fn round_trip(tree: &Tree, devices: &[Vec<u8>], sources: &[Vec<u8>], tags: &[&str]) -> Vec<u8> {
        let slots: Vec<Device> = devices
            .iter()
            .zip(tags)
            .map(|(bytes, tag)| Device { blocks: bytes.len().div_ceil(512) as u64, tag: tag.to_string() })
            .collect();
        let (image, written) = write_vec(tree, &slots, sources).unwrap();
        super::check::round_trip(tree, devices, sources, &image, &written).unwrap();
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

    fn file_on(device: usize, offset: u64, size: u64) -> Kind {
        Kind::File { size, data: Data::Device { device, offset } }
    }

    fn with_xattrs(xattrs: Vec<(&[u8], Vec<u8>)>) -> Tree {
        let mut b = Build::new();
        let d = b.dir(0, b"d");
        let mut m = meta(0o644);
        m.xattrs = xattrs.into_iter().map(|(n, v)| (n.to_vec(), v)).collect();
        b.add(d, b"f", Kind::Fifo, m);
        b.tree
    }

    fn one(kind: Kind, m: Meta) -> Tree {
        let mut b = Build::new();
        b.add(0, b"x", kind, m);
        b.tree
    }

    fn tag(tag: &str) -> Vec<Device> {
        vec![Device { blocks: 8, tag: tag.into() }]
    }

    #[test]
    fn every_check_names_what_failed() {
        let dev = || vec![Device { blocks: 8, tag: "layers".into() }];
        let named = |name: &[u8]| {
            let mut b = Build::new();
            let d = b.dir(0, b"etc");
            b.add(d, name, Kind::Fifo, meta(0));
            b.tree
        };
        let long_name =
            format!("/etc: the entry \"{}\" is 256 bytes long; EROFS names are at most 255", "n".repeat(256));
        let long_xattr = format!(
            "/d/f: xattr \"user.{}\" is 256 bytes long; Linux reads names of at most 255 (XATTR_NAME_MAX)",
            "n".repeat(251)
        );
        let long_tag = format!("extra device 0: tag \"{}\" must be 1..=64 bytes without NUL", "t".repeat(65));
        #[rustfmt::skip]
        let cases: Vec<(Tree, Vec<Device>, &str)> = vec![
            (Tree { root: 1, ..Build::new().tree }, vec![],
             "the root is inode 1 but the tree has 1 inodes"),
            (Tree { inodes: vec![Inode { kind: Kind::Fifo, meta: meta(0) }], root: 0 }, vec![],
             "the root (inode 0) is not a directory"),
            ({ let mut b = Build::new(); b.link(0, b"x", 7); b.tree }, vec![],
             "/: the entry \"x\" names inode 7 but the tree has 1 inodes"),
            (named(b""), vec![], "/etc: the entry \"\" is not a valid name (empty, `.`, `..`, or with `/` or NUL)"),
            (named(b"."), vec![], "/etc: the entry \".\" is not a valid name (empty, `.`, `..`, or with `/` or NUL)"),
            (named(b".."), vec![], "/etc: the entry \"..\" is not a valid name (empty, `.`, `..`, or with `/` or NUL)"),
            (named(b"a/b"), vec![], "/etc: the entry \"a/b\" is not a valid name (empty, `.`, `..`, or with `/` or NUL)"),
            (named(b"a\0b"), vec![], "/etc: the entry \"a\\0b\" is not a valid name (empty, `.`, `..`, or with `/` or NUL)"),
            (named(&[b'n'; 256]), vec![],
             &long_name),
            ({ let mut b = Build::new(); b.add(0, b"x", Kind::Fifo, meta(0)); b.add(0, b"x", Kind::Fifo, meta(0)); b.tree }, vec![],
             "/: two entries are named \"x\""),
            ({ let mut b = Build::new(); let d = b.dir(0, b"d"); b.link(d, b"up", 0); b.tree }, vec![],
             "/d/up: the root directory is named again (a directory cycle)"),
            ({ let mut b = Build::new(); let d = b.dir(0, b"d"); b.link(0, b"e", d); b.tree }, vec![],
             "/e: this directory is already named /d (directories cannot be hard links or form a cycle)"),
            ({ let mut b = Build::new(); let d = b.dir(0, b"d"); let e = b.dir(d, b"e"); b.link(e, b"loop", d); b.tree }, vec![],
             "/d/e/loop: this directory is already named /d (directories cannot be hard links or form a cycle)"),
            ({ let mut b = Build::new(); b.inode(Kind::Fifo, meta(0)); b.tree }, vec![],
             "inode 1 is in the tree but no directory names it"),
            // A cycle the root does not reach: unreferenced from the root.
            ({ let mut b = Build::new(); let d = b.inode(Kind::Dir(vec![]), meta(0)); b.link(d, b"me", d); b.tree }, vec![],
             "inode 1 is in the tree but no directory names it"),
            (one(Kind::Fifo, meta(0o100644)), vec![],
             "/x: mode 0o100644 has bits beyond the permissions 0o7777 (the file type comes from the kind)"),
            (one(Kind::Fifo, Meta { mtime_nsec: 1_000_000_000, ..meta(0) }), vec![],
             "/x: mtime nanoseconds 1000000000 is not below one second"),
            (one(Kind::Symlink(vec![]), meta(0o777)), vec![],
             "/x: the symlink target is 0 bytes or holds a NUL; Linux reads back 1..=4095 bytes without NUL"),
            (one(Kind::Symlink(vec![b'a'; 4096]), meta(0o777)), vec![],
             "/x: the symlink target is 4096 bytes or holds a NUL; Linux reads back 1..=4095 bytes without NUL"),
            (one(Kind::Symlink(b"a\0b".to_vec()), meta(0o777)), vec![],
             "/x: the symlink target is 3 bytes or holds a NUL; Linux reads back 1..=4095 bytes without NUL"),
            (one(Kind::Char { major: 4096, minor: 0 }, meta(0)), vec![],
             "/x: device number 4096:0 does not fit Linux's dev_t (major < 4096, minor < 2^20)"),
            (one(Kind::Block { major: 0, minor: 1 << 20 }, meta(0)), vec![],
             "/x: device number 0:1048576 does not fit Linux's dev_t (major < 4096, minor < 2^20)"),
            (with_xattrs(vec![(b"foo.bar", vec![])]), vec![],
             "/d/f: xattr \"foo.bar\" has no prefix EROFS stores (user., trusted., security., system.posix_acl_access/default) or nothing after it"),
            (with_xattrs(vec![(b"user.", vec![])]), vec![],
             "/d/f: xattr \"user.\" has no prefix EROFS stores (user., trusted., security., system.posix_acl_access/default) or nothing after it"),
            (with_xattrs(vec![(b"system.posix_acl_accessX", vec![])]), vec![],
             "/d/f: xattr \"system.posix_acl_accessX\" has no prefix EROFS stores (user., trusted., security., system.posix_acl_access/default) or nothing after it"),
            (with_xattrs(vec![(&[b"user.".as_slice(), &[b'n'; 251]].concat(), vec![])]), vec![],
             &long_xattr),
            (with_xattrs(vec![(b"user.v", vec![0; 65536])]), vec![],
             "/d/f: the value of xattr \"user.v\" is 65536 bytes; EROFS values are below 65536"),
            (with_xattrs(vec![(b"user.v", vec![]), (b"trusted.v", vec![]), (b"user.v", b"again".to_vec())]), vec![],
             "/d/f: the xattr \"user.v\" is given twice"),
            (with_xattrs((0..5u8).map(|i| (&b"user.0user.1user.2user.3user.4"[i as usize * 6..][..6], vec![0; 65535])).collect()), vec![],
             "/d/f: the xattrs take 327712 bytes, more than an inode holds (262148)"),
            (Build::new().tree, vec![Device { blocks: 1, tag: "t".into() }; MAX_DEVICES + 1],
             "4097 extra devices given; an image holds at most 4096"),
            (Build::new().tree, tag(""), "extra device 0: tag \"\" must be 1..=64 bytes without NUL"),
            (Build::new().tree, tag("a\0b"), "extra device 0: tag \"a\\0b\" must be 1..=64 bytes without NUL"),
            (Build::new().tree, tag(&"t".repeat(65)),
             &long_tag),
            (Build::new().tree, vec![Device { blocks: 1 << 32, tag: "big".into() }],
             "extra device 0 ends at block 4294967304 of the flat layout, past the 2^32 blocks (2 TiB) EROFS addresses"),
            (one(file_on(1, 0, 1), meta(0)), dev(), "/x: its data are on extra device 1 but only 1 are given"),
            (one(file_on(0, 100, 1), meta(0)), dev(), "/x: its data start at byte 100 of device 0, not a multiple of 512"),
            (one(file_on(0, 512, 3585), meta(0)), dev(),
             "/x: its 3585 bytes at byte 512 of device 0 pass the device's end (4096 bytes)"),
            (one(file_on(0, 4096, 1), meta(0)), dev(),
             "/x: its 1 bytes at byte 4096 of device 0 pass the device's end (4096 bytes)"),
            (one(file_on(0, u64::MAX - 511, 1024), meta(0)), dev(),
             "/x: its 1024 bytes at byte 18446744073709551104 of device 0 pass the device's end (4096 bytes)"),
            // Checked before anything is written: no embedded bytes needed.
            (one(Kind::File { size: 1 << 41, data: Data::Embedded { source: 0, offset: 0 } }, meta(0)), vec![],
             "the image needs 4294967304 blocks, more than the 2^32 (2 TiB) EROFS addresses"),
            ({ let mut b = Build::new(); for name in [b"a", b"b"] { b.add(0, name, Kind::File { size: u64::MAX, data: Data::Embedded { source: 0, offset: 0 } }, meta(0)); } b.tree }, vec![],
             "the image needs 72057594037927944 blocks, more than the 2^32 (2 TiB) EROFS addresses"),
        ];
        for (tree, devices, want) in cases {
            let mut out = Vec::new();
            let err = write(&tree, &devices, &mut Sources(vec![]), &mut out).unwrap_err();
            assert_eq!(err.to_string(), want);
            assert!(out.is_empty(), "{want}: wrote {} bytes before failing", out.len());
        }
        // Fine at the limits: a file up to the device's end, a 4095-byte
        // target, 64-byte tags, names of 255 bytes, values of 65535.
        let mut ok = one(file_on(0, 512, 3584), meta(0o7777));
        ok.inodes[1].meta.xattrs = vec![(b"user.v".to_vec(), vec![1; 65535])];
        let mut b = Build::new();
        b.add(0, &[b'n'; 255], Kind::Symlink(vec![b't'; 4095]), meta(0o777));
        b.add(0, b"dev", Kind::Char { major: 4095, minor: (1 << 20) - 1 }, meta(0));
        write_vec(&ok, &[Device { blocks: 8, tag: "t".repeat(64) }], &[]).unwrap();
        write_vec(&b.tree, &[], &[]).unwrap();
    }

    /// A source that gives `give` bytes whatever is asked, or fails.
    struct Liar {
        give: Option<u64>,
    }

    impl DataSource for Liar {
        fn copy_to(&mut self, _: u32, _: u64, _: u64, out: &mut dyn io::Write) -> io::Result<()> {
            match self.give {
                Some(n) => out.write_all(&vec![7; n as usize]),
                None => Err(io::Error::new(io::ErrorKind::NotFound, "blob gone")),
            }
        }
    }

    /// An output that fails once `room` bytes are written.
    struct Full {
        room: usize,
        got: Vec<u8>,
    }

    impl io::Write for Full {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.got.len() + buf.len() > self.room {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"));
            }
            self.got.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn embedded_data_and_output_failures_keep_their_cause() {
        let mut b = Build::new();
        let d = b.dir(0, b"opt");
        b.add(d, b"blob", Kind::File { size: 1000, data: Data::Embedded { source: 3, offset: 512 } }, meta(0o644));
        let tree = b.tree;
        let err = write(&tree, &[], &mut Liar { give: None }, &mut Vec::new()).unwrap_err();
        assert_eq!(err.to_string(), "/opt/blob: reading its 1000 bytes from source 3 at byte 512 failed");
        assert_eq!(std::error::Error::source(&err).unwrap().to_string(), "blob gone");
        for give in [999, 1001] {
            let mut out = Vec::new();
            let err = write(&tree, &[], &mut Liar { give: Some(give) }, &mut out).unwrap_err();
            let want = format!("/opt/blob: source 3 gave {give} bytes from byte 512 where the file has 1000");
            assert_eq!(err.to_string(), want);
        }
        // A full disk fails the write with its cause, wherever the buffer
        // meets it.
        for room in [0, 1500, 4095] {
            let mut out = Full { room, got: Vec::new() };
            let err = write(&tree, &[], &mut Liar { give: Some(1000) }, &mut out).unwrap_err();
            assert!(matches!(err, Error::Write { .. }), "{err}");
            assert!(err.to_string().starts_with("cannot write the EROFS image at byte "), "{err}");
            assert_eq!(std::error::Error::source(&err).unwrap().to_string(), "disk full");
        }
        let mut out = Full { room: 1 << 20, got: Vec::new() };
        write(&tree, &[], &mut Liar { give: Some(1000) }, &mut out).unwrap();
        assert_eq!(out.got.len(), 4096);
    }

    /// The decoded node at `path`.
    fn node<'i>(image: &'i decode::Image, path: &[u8]) -> (u64, &'i decode::Node) {
        let nid = image.paths().into_iter().find(|(p, _)| p == path).unwrap().1;
        (nid, &image.inodes[&nid])
    }

    fn device_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = Rng(seed);
        (0..len).map(|_| rng.next() as u8).collect()
    }

    #[test]
    fn file_data_map_to_the_fewest_chunks() {
        let sizes = [0u64, 1, 511, 512, 513, 4096 * 3 + 7, 65536];
        let mut b = Build::new();
        let mut offset = 0;
        for (i, size) in sizes.iter().enumerate() {
            b.add(0, format!("f{i}").as_bytes(), file_on(i % 2, offset, *size), meta(0o644));
            offset += size.next_multiple_of(512);
        }
        let devices = [device_bytes(offset as usize, 1), device_bytes(offset as usize, 2)];
        let image = round_trip(&b.tree, &devices, &[], &["a", "b"]);
        let decoded = decode::decode(&image).unwrap();
        let mut offset = 0;
        for (i, size) in sizes.iter().enumerate() {
            let (_, node) = node(&decoded, format!("/f{i}").as_bytes());
            let want = if *size == 0 {
                vec![]
            } else {
                vec![decode::Extent { logical: 0, len: *size, at: decode::Location::Device { device: i % 2, offset } }]
            };
            assert_eq!(node.map, want, "size {size}");
            let layout = if *size == 0 { format::LAYOUT_FLAT_PLAIN } else { format::LAYOUT_CHUNK_BASED };
            assert_eq!(node.layout, layout, "size {size}");
            offset += size.next_multiple_of(512);
        }
    }

    #[test]
    fn a_file_past_one_tib_takes_a_second_chunk() {
        // Blocks 1.. of a device just over 1 TiB; nothing is read.
        let size = (1u64 << 40) + 1;
        let mut b = Build::new();
        b.add(0, b"huge", file_on(1, 512, size), meta(0o644));
        let devices = [
            Device { blocks: 1, tag: "small".into() },
            Device { blocks: (1 << 31) + 2, tag: "big".into() },
            Device { blocks: 3, tag: "third".into() },
        ];
        let (image, written) = write_vec(&b.tree, &devices, &[]).unwrap();
        assert_eq!(written.device_starts, [4096, 8192, 8192 + (1 << 40) + 4096]);
        let decoded = decode::decode(&image).unwrap();
        let (_, node) = node(&decoded, b"/huge");
        let at = |offset| decode::Location::Device { device: 1, offset };
        let want = vec![
            decode::Extent { logical: 0, len: 1 << 40, at: at(512) },
            decode::Extent { logical: 1 << 40, len: 1, at: at(512 + (1 << 40)) },
        ];
        assert_eq!(node.map, want);
        let slots: Vec<(u64, u64)> = decoded.devices.iter().map(|d| (d.blocks, d.mapped_blkaddr)).collect();
        assert_eq!(slots, [(1, 8), ((1 << 31) + 2, 16), (3, (8192 + (1 << 40) + 4096) / 512)]);
    }

    #[test]
    fn xattrs_of_every_kind_round_trip() {
        let acl = |other: u8| {
            [
                2, 0, 0, 0, 1, 0, 7, 0, 255, 255, 255, 255, 4, 0, 5, 0, 255, 255, 255, 255, 32, 0, other, 0, 255, 255,
                255, 255,
            ]
            .to_vec()
        };
        let mut b = Build::new();
        let mut m = meta(0o755);
        m.xattrs = vec![
            (b"system.posix_acl_default".to_vec(), acl(0)),
            (b"user.mime_type".to_vec(), b"text/plain".to_vec()),
            (b"security.capability".to_vec(), [1, 0, 0, 2, 0, 48, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0].to_vec()),
            (b"system.posix_acl_access".to_vec(), acl(5)),
            (b"trusted.overlay.opaque".to_vec(), b"y".to_vec()),
            (b"security.selinux".to_vec(), b"system_u:object_r:bin_t:s0\0".to_vec()),
            (b"user.empty".to_vec(), vec![]),
            (b"user.max".to_vec(), (0..65535u32).map(|i| i as u8).collect()),
        ];
        let d = b.add(0, b"dir", Kind::Dir(vec![]), m.clone());
        b.add(d, b"link", Kind::Symlink(b"..".to_vec()), m.clone());
        b.add(d, b"fifo", Kind::Fifo, m);
        let image = round_trip(&b.tree, &[], &[], &[]);
        let decoded = decode::decode(&image).unwrap();
        // On disk in (index, name) order, whatever the order given.
        let names: Vec<Vec<u8>> = node(&decoded, b"/dir").1.meta.xattrs.iter().map(|(n, _)| n.clone()).collect();
        let want: [&[u8]; 8] = [
            b"user.empty",
            b"user.max",
            b"user.mime_type",
            b"system.posix_acl_access",
            b"system.posix_acl_default",
            b"trusted.overlay.opaque",
            b"security.capability",
            b"security.selinux",
        ];
        assert_eq!(names, want);
    }

    #[test]
    fn a_large_directory_is_found_by_namei_binary_search() {
        let mut rng = Rng(7);
        let mut names = std::collections::BTreeSet::new();
        while names.len() < 5000 {
            // Lengths 1..=255, skewed short; bytes across the whole range
            // so unsigned comparison matters.
            let len = 1 + (rng.next() % 255).min(rng.next() % 64) as usize;
            let name: Vec<u8> =
                (0..len).map(|_| [b'a', b'b', b'-', b'.', 0x7f, 0x80, 0xff][rng.next() as usize % 7]).collect();
            if name != b"." && name != b".." {
                names.insert(name);
            }
        }
        let mut b = Build::new();
        let big = b.dir(0, b"big");
        for name in &names {
            b.add(big, name, Kind::Fifo, meta(0));
        }
        let image = round_trip(&b.tree, &[], &[], &[]);
        let decoded = decode::decode(&image).unwrap();
        let (nid, dir) = node(&decoded, b"/big");
        let NodeKind::Dir { entries, size } = &dir.kind else { panic!() };
        let blocks = size.div_ceil(512);
        assert!(blocks > 100, "{blocks} blocks");
        // Every block's first and last names, and every name, are found;
        // names next to them that are not there are not.
        let by_name: BTreeMap<&[u8], u64> = entries.iter().map(|e| (e.name.as_slice(), e.nid)).collect();
        for entry in entries {
            assert_eq!(decoded.lookup(nid, &entry.name).unwrap(), Some(entry.nid), "{:?}", entry.name);
            let mut longer = entry.name.clone();
            longer.push(0x01);
            let shorter = &entry.name[..entry.name.len() - 1];
            for probe in [longer.as_slice(), shorter] {
                let want = by_name.get(probe).copied();
                assert_eq!(decoded.lookup(nid, probe).unwrap(), want, "{probe:?}");
            }
        }
        assert_eq!(decoded.lookup(nid, b"").unwrap(), None);
        assert_eq!(decoded.lookup(nid, &[0xff; 255]).unwrap(), by_name.get(&[0xff; 255][..]).copied());
    }

    #[test]
    fn hard_links_are_one_inode() {
        let mut b = Build::new();
        let (x, y) = (b.dir(0, b"x"), b.dir(0, b"y"));
        let f = b.add(x, b"f", Kind::File { size: 3, data: Data::Embedded { source: 0, offset: 0 } }, meta(0o644));
        b.link(y, b"g", f);
        b.link(0, b"h", f);
        let s = b.add(x, b"s", Kind::Symlink(b"f".to_vec()), meta(0o777));
        b.link(y, b"s", s);
        let p = b.add(y, b"p", Kind::Fifo, meta(0o600));
        b.link(y, b"q", p);
        let c = b.add(x, b"null", Kind::Char { major: 1, minor: 3 }, meta(0o666));
        b.link(y, b"null", c);
        let image = round_trip(&b.tree, &[], &[b"abc".to_vec()], &[]);
        let decoded = decode::decode(&image).unwrap();
        let nid = |path: &[u8]| node(&decoded, path).0;
        let links = |path: &[u8]| node(&decoded, path).1.nlink;
        assert_eq!([nid(b"/y/g"), nid(b"/h")], [nid(b"/x/f"); 2]);
        assert_eq!([links(b"/x/f"), links(b"/x/s"), links(b"/y/p"), links(b"/x/null")], [3, 2, 2, 2]);
        assert_eq!([links(b"/"), links(b"/x"), links(b"/y")], [4, 2, 2]);
        assert_eq!(decoded.inodes.len(), 7);
    }

    #[test]
    fn special_files_keep_their_device_numbers() {
        let mut b = Build::new();
        let cases = [(0, 0), (1, 3), (8, 0), (259, 65541), (4095, (1 << 20) - 1)];
        for (i, (major, minor)) in cases.iter().enumerate() {
            b.add(0, format!("c{i}").as_bytes(), Kind::Char { major: *major, minor: *minor }, meta(0o600));
            b.add(0, format!("b{i}").as_bytes(), Kind::Block { major: *major, minor: *minor }, meta(0o660));
        }
        b.add(0, b"fifo", Kind::Fifo, meta(0o644));
        round_trip(&b.tree, &[], &[], &[]);
    }

    #[test]
    fn symlinks_are_fast_when_inline() {
        let mut b = Build::new();
        // 448 bytes fill the inode's block exactly (64 + 448); one more goes
        // to a data block, as does anything with xattrs pushing it over.
        let mut tagged = meta(0o777);
        tagged.xattrs = vec![(b"user.k".to_vec(), b"v".to_vec())];
        let cases: [(&[u8], usize, Meta, bool); 5] = [
            (b"one", 1, meta(0o777), true),
            (b"fits", 448, meta(0o777), true),
            (b"over", 449, meta(0o777), false),
            (b"longest", 4095, meta(0o777), false),
            (b"xattr", 448 - 16, tagged, false),
        ];
        for (name, len, m, _) in &cases {
            b.add(0, name, Kind::Symlink(vec![b'/'; *len]), m.clone());
        }
        let image = round_trip(&b.tree, &[], &[], &[]);
        let decoded = decode::decode(&image).unwrap();
        for (name, len, _, fast) in cases {
            let path = [b"/", name].concat();
            let NodeKind::Symlink { target, fast: got } = &node(&decoded, &path).1.kind else { panic!() };
            assert_eq!((target.len(), *got), (len, fast), "{name:?}");
        }
    }

    #[test]
    fn names_of_255_bytes_round_trip() {
        let mut b = Build::new();
        for c in [b'a', b'z', 0xff] {
            let d = b.dir(0, &[c; 255]);
            b.add(d, &[c; 254], Kind::Fifo, meta(0));
        }
        round_trip(&b.tree, &[], &[], &[]);
    }

    #[test]
    fn a_tree_1500_deep_costs_no_stack() {
        // 1500 levels of two-byte names: paths of 4500 bytes, past PATH_MAX.
        let mut b = Build::new();
        let mut d = 0;
        for _ in 0..1500 {
            d = b.dir(d, b"dd");
        }
        b.add(d, b"bottom", Kind::File { size: 2, data: Data::Embedded { source: 0, offset: 0 } }, meta(0o644));
        round_trip(&b.tree, &[], &[b"ok".to_vec()], &[]);
        b.add(d, b"bad/name", Kind::Fifo, meta(0));
        let err = write(&b.tree, &[], &mut Sources(vec![b"ok".to_vec()]), &mut Vec::new()).unwrap_err();
        let Error::InvalidName { dir, .. } = err else { panic!("{err}") };
        assert_eq!(dir, "/dd".repeat(1500));
    }

    #[test]
    fn embedded_files_round_trip() {
        let source: Vec<u8> = (0..20_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut b = Build::new();
        for (i, (offset, size)) in
            [(0, 0), (0, 1), (3, 511), (100, 512), (7, 513), (0, 20_000), (19_999, 1)].iter().enumerate()
        {
            let data = Data::Embedded { source: (i % 2) as u32, offset: *offset };
            b.add(0, format!("e{i}").as_bytes(), Kind::File { size: *size, data }, meta(0o644));
        }
        let written = write_vec(&b.tree, &[], &[source.clone(), source.clone()]).unwrap().1;
        assert_eq!(written.data_blocks, [0, 1, 1, 1, 2, 40, 1].iter().sum::<u64>());
        round_trip(&b.tree, &[], &[source.clone(), source], &[]);
    }

    /// xorshift64: a tiny deterministic generator for test trees.
    pub(crate) struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// A random tree over two devices and one source: every kind, hard
    /// links, xattrs of every index, odd names and sizes.
    pub(crate) fn random_tree(seed: u64, inodes: usize) -> (Tree, Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let mut rng = Rng(seed | 1);
        let devices = vec![device_bytes(1 << 16, seed + 1), device_bytes(3 << 14, seed + 2)];
        let sources = vec![device_bytes(1 << 14, seed + 3)];
        let mut b = Build::new();
        let mut dirs = vec![0];
        let mut leaves = Vec::new();
        let mut names: Vec<std::collections::BTreeSet<Vec<u8>>> = vec![Default::default()];
        while b.tree.inodes.len() < inodes {
            let at = dirs[rng.below(dirs.len() as u64) as usize];
            let len = if rng.below(10) == 0 { 1 + rng.below(255) } else { 1 + rng.below(12) };
            let name: Vec<u8> = (0..len).map(|_| b"ab.-_\x01\x7f\x80\xfe\xff"[rng.below(10) as usize]).collect();
            let slot = names[dirs.iter().position(|&d| d == at).unwrap()].insert(name.clone());
            if !slot || name == b"." || name == b".." {
                continue;
            }
            let mut m = Meta {
                mode: rng.below(0o10000) as u32,
                uid: rng.next() as u32,
                gid: rng.below(70000) as u32,
                mtime: rng.next() >> 30,
                mtime_nsec: rng.below(1_000_000_000) as u32,
                xattrs: Vec::new(),
            };
            for _ in 0..rng.below(4).saturating_sub(1) {
                let prefix: &[u8] = [&b"user."[..], b"trusted.", b"security."][rng.below(3) as usize];
                let name = [prefix, &[b'x', b'a' + rng.below(26) as u8]].concat();
                if m.xattrs.iter().all(|(n, _)| *n != name) {
                    m.xattrs.push((name, (0..rng.below(300)).map(|i| i as u8).collect()));
                }
            }
            if rng.below(8) == 0 {
                m.xattrs.push((b"system.posix_acl_access".to_vec(), vec![2, 0, 0, 0]));
            }
            let kind = match rng.below(20) {
                0..=3 => Kind::Dir(Vec::new()),
                4..=10 => {
                    let device = rng.below(2) as usize;
                    let blocks = devices[device].len() as u64 / 512;
                    let offset = rng.below(blocks) * 512;
                    let size = rng.below(devices[device].len() as u64 - offset + 1);
                    Kind::File { size, data: Data::Device { device, offset } }
                }
                11..=12 => {
                    let offset = rng.below(sources[0].len() as u64);
                    let size = rng.below(sources[0].len() as u64 - offset + 1);
                    Kind::File { size, data: Data::Embedded { source: 0, offset } }
                }
                13..=14 => Kind::Symlink((0..1 + rng.below(700)).map(|_| b'a' + rng.below(26) as u8).collect()),
                15 => Kind::Char { major: rng.below(4096) as u32, minor: rng.below(1 << 20) as u32 },
                16 => Kind::Block { major: rng.below(4096) as u32, minor: rng.below(1 << 20) as u32 },
                17 => Kind::Fifo,
                _ if !leaves.is_empty() => {
                    let target = leaves[rng.below(leaves.len() as u64) as usize];
                    b.link(at, &name, target);
                    continue;
                }
                _ => Kind::Fifo,
            };
            let is_dir = matches!(kind, Kind::Dir(_));
            let id = b.add(at, &name, kind, m);
            if is_dir {
                dirs.push(id);
                names.push(Default::default());
            } else {
                leaves.push(id);
            }
        }
        (b.tree, devices, sources)
    }

    #[test]
    fn random_trees_round_trip() {
        for seed in 1..=12 {
            let (tree, devices, sources) = random_tree(seed, 60 + seed as usize * 40);
            round_trip(&tree, &devices, &sources, &["one", "two"]);
        }
    }

    #[test]
    fn the_same_tree_gives_the_same_bytes_whatever_its_order() {
        let (tree, devices, sources) = random_tree(99, 400);
        let slots: Vec<Device> =
            devices.iter().map(|d| Device { blocks: d.len() as u64 / 512, tag: "t".into() }).collect();
        let (first, _) = write_vec(&tree, &slots, &sources).unwrap();
        assert_eq!(write_vec(&tree, &slots, &sources).unwrap().0, first);
        // Renumber the inodes (reversed), reverse every children and xattr
        // list: the same filesystem, the same image.
        let n = tree.inodes.len();
        let new_id = |id: InodeId| n - 1 - id;
        let mut inodes: Vec<Inode> = tree.inodes.iter().rev().cloned().collect();
        for inode in &mut inodes {
            inode.meta.xattrs.reverse();
            if let Kind::Dir(children) = &mut inode.kind {
                children.reverse();
                children.iter_mut().for_each(|(_, id)| *id = new_id(*id));
            }
        }
        let shuffled = Tree { inodes, root: new_id(tree.root) };
        assert_ne!(shuffled, tree);
        assert_eq!(write_vec(&shuffled, &slots, &sources).unwrap().0, first);
    }

    #[test]
    fn a_hundred_thousand_entries() {
        let mut b = Build::new();
        for d in 0..100 {
            let dir = b.dir(0, format!("dir{d:03}").as_bytes());
            for f in 0..1000 {
                b.add(dir, format!("file-{f:04}").as_bytes(), file_on(0, 0, 3), meta(0o644));
            }
        }
        let devices = [Device { blocks: 1, tag: "t".into() }];
        let (image, written) = write_vec(&b.tree, &devices, &[]).unwrap();
        assert_eq!(written.inodes, 100_101);
        let decoded = decode::decode(&image).unwrap();
        assert_eq!(decoded.paths().len(), 100_101);
        // What the writer keeps per inode besides the tree itself.
        let per_inode = std::mem::size_of::<layout::Placed>() + std::mem::size_of::<Option<layout::Parent>>() + 8 * 4;
        assert!(per_inode <= 128, "{per_inode} bytes per inode");
        println!("100k inodes: {} image bytes, {} of metadata", written.len, written.metadata_bytes);
    }
}
