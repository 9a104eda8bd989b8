//! Reads back what [`write`](super::write()) writes: for tests and
//! fuzzing; the product never reads EROFS.
//!
//! It follows the kernel's reading paths (`super.c`, `inode.c`, `data.c`,
//! `dir.c`, `namei.c`, `xattr.c` of Linux 6.12) and checks every
//! structural rule they rely on, plus the conventions of our writer
//! (sorted names, zero padding, no overlaps, exact link counts), so that a
//! writer mistake fails here rather than in a guest. It shares only the
//! constants of [`format`](super::format) with the writer, never its
//! layout code. Features our writer does not use (compression, compact
//! inodes, shared or long-prefix xattrs, block maps) are refused.

use std::cmp::Ordering;
use std::collections::{BTreeMap, VecDeque};

use super::format::{
    BLKSZ, BLKSZBITS, CHUNK_FORMAT_BLKBITS_MASK, CHUNK_FORMAT_INDEXES, CHUNK_INDEX_SIZE, DEVT_SLOT_SIZE, DIRENT_SIZE,
    FEATURE_INCOMPAT_CHUNKED_FILE, FEATURE_INCOMPAT_DEVICE_TABLE, FLAT_DEVICE_ALIGN, FT_BLKDEV, FT_CHRDEV, FT_DIR,
    FT_FIFO, FT_REG_FILE, FT_SYMLINK, INODE_EXTENDED_SIZE, ISLOTBITS, I_ALL, I_DATALAYOUT_BIT, I_VERSION_EXTENDED,
    LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN, NAME_LEN, NULL_ADDR, SUPER_MAGIC, SUPER_OFFSET,
    SUPER_SIZE, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, XATTR_ENTRY_SIZE,
    XATTR_IBODY_HEADER_SIZE, XATTR_PREFIXES, XATTR_WHOLE_NAMES,
};
use super::Meta;

/// Full xattr names and their values.
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// What is wrong with an image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{what}: {len} bytes at byte {offset} pass the end of the image ({size} bytes)")]
    Truncated { what: &'static str, offset: u64, len: u64, size: u64 },
    #[error("superblock: {field} is {value:#x}: {reason}")]
    Superblock { field: &'static str, value: u64, reason: &'static str },
    #[error("device slot {device}: {reason}")]
    DeviceSlot { device: usize, reason: String },
    #[error("inode {nid}: {reason}")]
    Inode { nid: u64, reason: String },
    #[error("inode {nid}: xattr at byte {offset}: {reason}")]
    Xattr { nid: u64, offset: u64, reason: String },
    #[error("directory {nid}, block {block}: {reason}")]
    Dirent { nid: u64, block: u64, reason: String },
    #[error("inode {nid}, chunk {chunk}: {reason}")]
    Chunk { nid: u64, chunk: u64, reason: String },
    #[error("inode {nid}: {reason}")]
    Tree { nid: u64, reason: String },
    #[error("{first} (bytes {first_start}..{first_end}) overlaps {second} (bytes {second_start}..{second_end})")]
    Overlap { first: String, first_start: u64, first_end: u64, second: String, second_start: u64, second_end: u64 },
    #[error("the image has {expected} extra devices but {given} are given")]
    DeviceCount { expected: usize, given: usize },
    #[error("inode {nid} is not a {expected}")]
    WrongKind { nid: u64, expected: &'static str },
}

/// The superblock fields an image of ours sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub root_nid: u64,
    pub inos: u64,
    pub blocks: u64,
    pub meta_blkaddr: u64,
    pub feature_incompat: u32,
    pub extra_devices: u64,
    pub devt_slotoff: u64,
}

/// One `erofs_deviceslot`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub tag: Vec<u8>,
    pub blocks: u64,
    pub mapped_blkaddr: u64,
}

/// Where a stretch of a file or directory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Bytes of the image itself (`device_id` 0 or a flat inode).
    Image { offset: u64 },
    /// Bytes of extra device `device` (0-based: chunk `device_id` - 1).
    Device { device: usize, offset: u64 },
    /// A hole (`EROFS_NULL_ADDR`): zeros.
    Hole,
}

/// `len` bytes of the file from byte `logical` are at `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub len: u64,
    pub at: Location,
}

/// One dirent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dirent {
    pub name: Vec<u8>,
    pub nid: u64,
    pub file_type: u8,
}

/// What an inode is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// All dirents in on-disk order, `.` and `..` included.
    Dir {
        entries: Vec<Dirent>,
        size: u64,
    },
    File {
        size: u64,
    },
    /// `fast`: the kernel keeps the target from the inode block
    /// (`erofs_fill_symlink`).
    Symlink {
        target: Vec<u8>,
        fast: bool,
    },
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

/// One decoded inode. `meta.mode` holds the permission bits only;
/// `meta.xattrs` are full names in on-disk order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub meta: Meta,
    pub nlink: u32,
    /// `EROFS_INODE_FLAT_PLAIN`, `_FLAT_INLINE` or `_CHUNK_BASED`.
    pub layout: u8,
    pub kind: NodeKind,
    /// Where the bytes of a file, directory or symlink are.
    pub map: Vec<Extent>,
    /// Where the inode's metadata ends (inode, xattrs, chunk indexes,
    /// inline tail).
    pub end: u64,
}

/// Where the extra devices' bytes are, for [`Image::read`].
#[derive(Debug, Clone, Copy)]
pub enum Devices<'a> {
    /// Each device its own disk (`mount -o device=...`).
    Separate(&'a [&'a [u8]]),
    /// The image was decoded from the flat disk (the image, then every
    /// device at its `mapped_blkaddr`).
    Flat,
}

/// A decoded image, borrowing its bytes.
#[derive(Debug)]
pub struct Image<'a> {
    bytes: &'a [u8],
    pub superblock: Superblock,
    pub devices: Vec<Slot>,
    /// Every inode reachable from the root, by nid.
    pub inodes: BTreeMap<u64, Node>,
}

fn slice<'a>(bytes: &'a [u8], offset: u64, len: u64, what: &'static str) -> Result<&'a [u8], Error> {
    let truncated = || Error::Truncated { what, offset, len, size: bytes.len() as u64 };
    let end = offset.checked_add(len).ok_or_else(truncated)?;
    if end > bytes.len() as u64 {
        return Err(truncated());
    }
    Ok(&bytes[offset as usize..end as usize])
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses and checks the whole image: superblock, device table, every
/// inode reachable from the root, every directory, and that nothing
/// overlaps.
pub fn decode(bytes: &[u8]) -> Result<Image<'_>, Error> {
    let superblock = read_superblock(bytes)?;
    let devices = read_device_table(bytes, &superblock)?;
    let mut image = Image { bytes, superblock, devices, inodes: BTreeMap::new() };
    image.read_tree()?;
    image.check_overlaps()?;
    Ok(image)
}

fn read_superblock(bytes: &[u8]) -> Result<Superblock, Error> {
    let sb = slice(bytes, SUPER_OFFSET, SUPER_SIZE, "superblock")?;
    let bad = |field, value: u64, reason| Err(Error::Superblock { field, value, reason });
    if u32_at(sb, 0) != SUPER_MAGIC {
        return bad("magic", u32_at(sb, 0).into(), "not EROFS");
    }
    if u32_at(sb, 8) != 0 {
        return bad("feature_compat", u32_at(sb, 8).into(), "no checksum, mtime or xattr filter is expected");
    }
    if sb[12] != BLKSZBITS {
        return bad("blkszbits", sb[12].into(), "our images use 512-byte blocks");
    }
    if sb[13] != 0 {
        return bad("sb_extslots", sb[13].into(), "no extension slots are expected");
    }
    let incompat = u32_at(sb, 80);
    if incompat & !(FEATURE_INCOMPAT_CHUNKED_FILE | FEATURE_INCOMPAT_DEVICE_TABLE) != 0 {
        return bad("feature_incompat", incompat.into(), "only chunked files and a device table are expected");
    }
    if !sb[64..80].contains(&0) {
        // `erofs_read_superblock`: strscpy must find the end.
        return bad("volume_name", 0, "no NUL terminator");
    }
    if u16_at(sb, 84) != 0 {
        return bad("available_compr_algs", u16_at(sb, 84).into(), "compression is not configured in our kernel");
    }
    if sb[90] != 0 {
        return bad("dirblkbits", sb[90].into(), "the kernel refuses anything but 0");
    }
    if sb[91] != 0 {
        return bad("xattr_prefix_count", sb[91].into(), "no long xattr prefixes are expected");
    }
    if u64_at(sb, 96) != 0 {
        return bad("packed_nid", u64_at(sb, 96), "no packed inode is expected");
    }
    if sb[104..].iter().any(|&b| b != 0) || u32_at(sb, 4) != 0 || u32_at(sb, 44) != 0 || u32_at(sb, 92) != 0 {
        return bad("reserved", 0, "checksum, xattr_blkaddr, xattr_prefix_start and reserved bytes must be 0");
    }
    let blocks = u64::from(u32_at(sb, 36));
    if blocks * BLKSZ > bytes.len() as u64 {
        return bad("blocks", blocks, "the image is shorter");
    }
    let device_table = incompat & FEATURE_INCOMPAT_DEVICE_TABLE != 0;
    Ok(Superblock {
        root_nid: u16_at(sb, 14).into(),
        inos: u64_at(sb, 16),
        blocks,
        meta_blkaddr: u32_at(sb, 40).into(),
        feature_incompat: incompat,
        extra_devices: if device_table { u16_at(sb, 86).into() } else { 0 },
        devt_slotoff: if device_table { u16_at(sb, 88).into() } else { 0 },
    })
}

fn read_device_table(bytes: &[u8], sb: &Superblock) -> Result<Vec<Slot>, Error> {
    let mut slots = Vec::new();
    let mut next_start = sb.blocks;
    for device in 0..sb.extra_devices as usize {
        let at = sb.devt_slotoff * DEVT_SLOT_SIZE + device as u64 * DEVT_SLOT_SIZE;
        if at < SUPER_OFFSET + SUPER_SIZE {
            return Err(Error::DeviceSlot { device, reason: format!("at byte {at}, inside the superblock") });
        }
        let slot = slice(bytes, at, DEVT_SLOT_SIZE, "device slot")?;
        let tag_len = slot[..64].iter().position(|&b| b == 0).unwrap_or(64);
        let bad = |reason: String| Err(Error::DeviceSlot { device, reason });
        if tag_len == 0 {
            // `erofs_init_device`: "empty device tag".
            return bad("empty tag".into());
        }
        if slot[tag_len..64].iter().chain(&slot[72..]).any(|&b| b != 0) {
            return bad("non-zero bytes after the tag or in the reserved space".into());
        }
        let blocks = u64::from(u32_at(slot, 64));
        let mapped_blkaddr = u64::from(u32_at(slot, 68));
        // Our flat layout: the image padded to 4 KiB, then each device in
        // order on a 4 KiB boundary, none overlapping.
        if mapped_blkaddr < next_start || (mapped_blkaddr * BLKSZ) % FLAT_DEVICE_ALIGN != 0 {
            return bad(format!("mapped at block {mapped_blkaddr}, expected a 4 KiB boundary from block {next_start}"));
        }
        next_start = mapped_blkaddr + blocks;
        slots.push(Slot { tag: slot[..tag_len].to_vec(), blocks, mapped_blkaddr });
    }
    Ok(slots)
}

/// Linux's `new_decode_dev`.
fn decode_dev(dev: u32) -> (u32, u32) {
    ((dev & 0xfff00) >> 8, (dev & 0xff) | ((dev >> 12) & 0xfff00))
}

fn xattr_name(index: u8, rest: &[u8]) -> Option<Vec<u8>> {
    if let Some((whole, _)) = XATTR_WHOLE_NAMES.iter().find(|(_, i)| *i == index) {
        return rest.is_empty().then(|| whole.to_vec());
    }
    let (prefix, _) = XATTR_PREFIXES.iter().find(|(_, i)| *i == index)?;
    (!rest.is_empty()).then(|| [*prefix, rest].concat())
}

/// Kernel `erofs_dirnamecmp`: compares the looked-up name (NUL-terminated
/// in the kernel, here its end) with a dirent name that ends at `end` or
/// at a NUL, skipping the `matched` prefix both are known to share.
fn dirnamecmp(name: &[u8], dname: &[u8], matched: &mut usize) -> Ordering {
    let mut i = *matched;
    while i < dname.len() && dname[i] != 0 {
        let c = name.get(i).copied().unwrap_or(0);
        if c != dname[i] {
            *matched = i;
            return c.cmp(&dname[i]);
        }
        i += 1;
    }
    *matched = i;
    if name.get(i).copied().unwrap_or(0) == 0 {
        Ordering::Equal
    } else {
        Ordering::Greater
    }
}

impl<'a> Image<'a> {
    /// `erofs_iloc`; a nid too large for any image saturates and fails
    /// the bounds check.
    fn iloc(&self, nid: u64) -> u64 {
        (nid.saturating_mul(1 << ISLOTBITS)).saturating_add(self.superblock.meta_blkaddr * BLKSZ)
    }

    fn image_len(&self) -> u64 {
        self.superblock.blocks * BLKSZ
    }

    /// Walks from the root breadth-first, reading each inode once, each
    /// directory's children in order, and checks `.`, `..`, that no
    /// directory is reached twice, link counts and `inos`.
    fn read_tree(&mut self) -> Result<(), Error> {
        let root = self.superblock.root_nid;
        let mut parent_of: BTreeMap<u64, u64> = BTreeMap::from([(root, root)]);
        let mut names: BTreeMap<u64, u64> = BTreeMap::new();
        let mut queue = VecDeque::from([root]);
        let node = self.read_inode(root)?;
        if !matches!(node.kind, NodeKind::Dir { .. }) {
            return Err(Error::Tree { nid: root, reason: "the root is not a directory".into() });
        }
        self.inodes.insert(root, node);
        while let Some(dir) = queue.pop_front() {
            let NodeKind::Dir { entries, .. } = &self.inodes[&dir].kind else { continue };
            let entries = entries.clone();
            let mut subdirs = 0;
            for entry in &entries {
                let expect_dot = match entry.name.as_slice() {
                    b"." => Some(dir),
                    b".." => Some(parent_of[&dir]),
                    _ => None,
                };
                if let Some(expected) = expect_dot {
                    if entry.nid != expected {
                        let reason = format!("{:?} points at {}, not {expected}", lossy(&entry.name), entry.nid);
                        return Err(Error::Tree { nid: dir, reason });
                    }
                    if entry.file_type != FT_DIR {
                        return Err(Error::Tree { nid: dir, reason: "`.` or `..` is not a directory".into() });
                    }
                    continue;
                }
                if !self.inodes.contains_key(&entry.nid) {
                    let node = self.read_inode(entry.nid)?;
                    self.inodes.insert(entry.nid, node);
                }
                let child = &self.inodes[&entry.nid];
                if file_type(&child.kind) != entry.file_type {
                    let reason = format!("dirent {:?} has file type {}", lossy(&entry.name), entry.file_type);
                    return Err(Error::Tree { nid: dir, reason });
                }
                *names.entry(entry.nid).or_default() += 1;
                if matches!(child.kind, NodeKind::Dir { .. }) {
                    if entry.nid == root || parent_of.insert(entry.nid, dir).is_some() {
                        let reason = format!("directory {} is named again, as {:?}", entry.nid, lossy(&entry.name));
                        return Err(Error::Tree { nid: dir, reason });
                    }
                    subdirs += 1;
                    queue.push_back(entry.nid);
                }
            }
            let nlink = self.inodes[&dir].nlink;
            if u64::from(nlink) != 2 + subdirs {
                return Err(Error::Tree { nid: dir, reason: format!("nlink {nlink} but {subdirs} subdirectories") });
            }
        }
        for (nid, node) in &self.inodes {
            if !matches!(node.kind, NodeKind::Dir { .. }) && u64::from(node.nlink) != names[nid] {
                let reason = format!("nlink {} but {} names", node.nlink, names[nid]);
                return Err(Error::Tree { nid: *nid, reason });
            }
        }
        if self.superblock.inos != self.inodes.len() as u64 {
            let reason =
                format!("the superblock counts {} inodes, the tree has {}", self.superblock.inos, self.inodes.len());
            return Err(Error::Tree { nid: root, reason });
        }
        Ok(())
    }

    /// `inode.c` `erofs_read_inode` and what each kind needs.
    fn read_inode(&self, nid: u64) -> Result<Node, Error> {
        let bad = |reason: String| Error::Inode { nid, reason };
        let iloc = self.iloc(nid);
        if iloc < SUPER_OFFSET + SUPER_SIZE + self.superblock.extra_devices * DEVT_SLOT_SIZE {
            return Err(bad(format!("at byte {iloc}, inside the superblock or device table")));
        }
        if iloc.saturating_add(INODE_EXTENDED_SIZE) > self.image_len() {
            return Err(bad(format!("at byte {iloc}, past the image's {} blocks", self.superblock.blocks)));
        }
        let die = slice(self.bytes, iloc, INODE_EXTENDED_SIZE, "inode")?;
        let format = u16_at(die, 0);
        if format & !I_ALL != 0 {
            return Err(bad(format!("unsupported i_format {format:#x}")));
        }
        if format & 1 != I_VERSION_EXTENDED {
            return Err(bad("a compact inode: our writer makes extended ones only".into()));
        }
        let layout = (format >> I_DATALAYOUT_BIT) as u8 & 0x7;
        let icount = u64::from(u16_at(die, 2));
        let xattr_isize = if icount == 0 { 0 } else { XATTR_IBODY_HEADER_SIZE + 4 * (icount - 1) };
        let mode = u16_at(die, 4);
        let size = u64_at(die, 8);
        let i_u = u32_at(die, 16);
        if u16_at(die, 6) != 0 || die[48..].iter().any(|&b| b != 0) {
            return Err(bad("non-zero reserved bytes".into()));
        }
        if size > i64::MAX as u64 {
            return Err(bad(format!("negative i_size {size:#x}")));
        }
        let xattrs = self.read_xattrs(nid, iloc + INODE_EXTENDED_SIZE, xattr_isize)?;
        let meta = Meta {
            mode: u32::from(mode & !S_IFMT),
            uid: u32_at(die, 24),
            gid: u32_at(die, 28),
            mtime: u64_at(die, 32),
            mtime_nsec: u32_at(die, 40),
            xattrs,
        };
        if meta.mtime_nsec >= 1_000_000_000 {
            return Err(bad(format!("mtime_nsec {}", meta.mtime_nsec)));
        }
        let body = iloc + INODE_EXTENDED_SIZE + xattr_isize;
        let (mut map, mut end) = (Vec::new(), body);
        let kind = match mode & S_IFMT {
            S_IFREG => {
                (map, end) = self.map(nid, layout, size, i_u, body)?;
                NodeKind::File { size }
            }
            S_IFDIR => {
                if layout == LAYOUT_CHUNK_BASED {
                    return Err(bad("a chunk-based directory".into()));
                }
                (map, end) = self.map(nid, layout, size, i_u, body)?;
                let entries = self.read_dirents(nid, size, &map)?;
                NodeKind::Dir { entries, size }
            }
            S_IFLNK => {
                if layout == LAYOUT_CHUNK_BASED {
                    return Err(bad("a chunk-based symlink".into()));
                }
                (map, end) = self.map(nid, layout, size, i_u, body)?;
                let target = if (1..=4095).contains(&size) {
                    self.gather(&map, size, Devices::Separate(&[]))?
                } else {
                    Vec::new()
                };
                if target.is_empty() || target.contains(&0) {
                    return Err(bad(format!("symlink target of {size} bytes or with a NUL")));
                }
                // `erofs_fill_symlink`: the offset after the inode in the
                // block `erofs_read_inode` ends in, plus the xattrs.
                let ofs = iloc % BLKSZ + INODE_EXTENDED_SIZE;
                let ofs = if ofs <= BLKSZ { ofs } else { ofs - BLKSZ };
                let fast = layout == LAYOUT_FLAT_INLINE && ofs + xattr_isize + size <= BLKSZ;
                NodeKind::Symlink { target, fast }
            }
            S_IFCHR | S_IFBLK | S_IFIFO => {
                if layout != LAYOUT_FLAT_PLAIN || size != 0 {
                    return Err(bad(format!("a special file with layout {layout} and size {size}")));
                }
                let (major, minor) = decode_dev(i_u);
                match mode & S_IFMT {
                    S_IFCHR => NodeKind::Char { major, minor },
                    S_IFBLK => NodeKind::Block { major, minor },
                    _ if i_u != 0 => return Err(bad(format!("a fifo with rdev {i_u:#x}"))),
                    _ => NodeKind::Fifo,
                }
            }
            _ => return Err(bad(format!("bogus i_mode {mode:#o}"))),
        };
        Ok(Node { meta, nlink: u32_at(die, 44), layout, kind, map, end })
    }

    /// The inline xattrs (`xattr.c` `erofs_init_inode_xattrs`,
    /// `erofs_xattr_iter_inline`).
    fn read_xattrs(&self, nid: u64, at: u64, isize: u64) -> Result<Xattrs, Error> {
        let bad = |offset, reason: String| Error::Xattr { nid, offset, reason };
        if isize == 0 {
            return Ok(Vec::new());
        }
        if isize <= XATTR_IBODY_HEADER_SIZE {
            // "xattr_isize %d of nid %llu is not supported yet".
            return Err(bad(at, format!("ibody of {isize} bytes")));
        }
        let body = slice(self.bytes, at, isize, "xattr ibody")?;
        if body[..XATTR_IBODY_HEADER_SIZE as usize].iter().any(|&b| b != 0) {
            return Err(bad(at, "name filter, shared xattrs or reserved bytes set".into()));
        }
        let mut xattrs = Vec::new();
        let mut pos = XATTR_IBODY_HEADER_SIZE as usize;
        let mut last: Option<(u8, Vec<u8>)> = None;
        while pos < body.len() {
            let offset = at + pos as u64;
            let (name_len, index, value_len) = (body[pos] as usize, body[pos + 1], u16_at(body, pos + 2) as usize);
            let size = (XATTR_ENTRY_SIZE as usize + name_len + value_len).next_multiple_of(XATTR_ENTRY_SIZE as usize);
            if size > body.len() - pos {
                return Err(bad(offset, "entry beyond xattr_isize".into()));
            }
            let rest = &body[pos + 4..pos + 4 + name_len];
            let value = &body[pos + 4 + name_len..pos + 4 + name_len + value_len];
            if body[pos + 4 + name_len + value_len..pos + size].iter().any(|&b| b != 0) {
                return Err(bad(offset, "non-zero padding".into()));
            }
            let name = xattr_name(index, rest)
                .ok_or_else(|| bad(offset, format!("name index {index} with a {name_len}-byte name")))?;
            // Our writer's canonical order, which also rules out
            // duplicates: (index, name) strictly increasing.
            let key = (index, rest.to_vec());
            if last.as_ref().is_some_and(|last| *last >= key) {
                return Err(bad(offset, format!("{:?} is out of order or repeated", lossy(&name))));
            }
            last = Some(key);
            xattrs.push((name, value.to_vec()));
            pos += size;
        }
        Ok(xattrs)
    }

    /// Where the bytes of a flat or chunk-based inode are (`data.c`
    /// `erofs_map_blocks`), and where its metadata end.
    fn map(&self, nid: u64, layout: u8, size: u64, i_u: u32, body: u64) -> Result<(Vec<Extent>, u64), Error> {
        let bad = |reason: String| Error::Inode { nid, reason };
        let iblks = size.div_ceil(BLKSZ);
        match layout {
            LAYOUT_FLAT_PLAIN | LAYOUT_FLAT_INLINE => {
                let tail = layout == LAYOUT_FLAT_INLINE;
                let lastblk = iblks - u64::from(tail && iblks > 0);
                let mut map = Vec::new();
                if lastblk > 0 {
                    if i_u == NULL_ADDR || u64::from(i_u) + lastblk > self.superblock.blocks {
                        return Err(bad(format!("blocks {i_u}..+{lastblk} are outside the image")));
                    }
                    let len = (lastblk * BLKSZ).min(size);
                    map.push(Extent { logical: 0, len, at: Location::Image { offset: u64::from(i_u) * BLKSZ } });
                } else if i_u != NULL_ADDR {
                    return Err(bad(format!("raw_blkaddr {i_u} but no data blocks (expected NULL_ADDR)")));
                }
                if !tail {
                    return Ok((map, body));
                }
                if size == 0 {
                    return Err(bad("an inline layout with nothing inline".into()));
                }
                let len = size - lastblk * BLKSZ;
                // "inline data across blocks".
                if body % BLKSZ + len > BLKSZ {
                    return Err(bad(format!("inline tail of {len} bytes at byte {body} crosses a block")));
                }
                map.push(Extent { logical: lastblk * BLKSZ, len, at: Location::Image { offset: body } });
                Ok((map, body + len))
            }
            LAYOUT_CHUNK_BASED => {
                let format = i_u as u16;
                if i_u >> 16 != 0 || format & !(CHUNK_FORMAT_BLKBITS_MASK | CHUNK_FORMAT_INDEXES) != 0 {
                    return Err(bad(format!("unsupported chunk format {i_u:#x}")));
                }
                if format & CHUNK_FORMAT_INDEXES == 0 {
                    return Err(bad("a block map: our writer makes chunk indexes".into()));
                }
                let chunkbits = u32::from(BLKSZBITS) + u32::from(format & CHUNK_FORMAT_BLKBITS_MASK);
                let chunks = size.div_ceil(1 << chunkbits);
                let table = body.next_multiple_of(CHUNK_INDEX_SIZE);
                let raw = slice(self.bytes, table, chunks * CHUNK_INDEX_SIZE, "chunk indexes")?;
                let mut map = Vec::new();
                for chunk in 0..chunks {
                    let bad = |reason: String| Error::Chunk { nid, chunk, reason };
                    let index = &raw[(chunk * CHUNK_INDEX_SIZE) as usize..][..CHUNK_INDEX_SIZE as usize];
                    let (advise, device_id, blkaddr) = (u16_at(index, 0), u16_at(index, 2), u32_at(index, 4));
                    let logical = chunk << chunkbits;
                    let len = (1u64 << chunkbits).min((size - logical).next_multiple_of(BLKSZ));
                    if advise != 0 {
                        return Err(bad(format!("advise {advise:#x}")));
                    }
                    let at = if blkaddr == NULL_ADDR {
                        Location::Hole
                    } else if device_id == 0 {
                        if u64::from(blkaddr) * BLKSZ + len > self.image_len() {
                            return Err(bad(format!("blocks {blkaddr}.. pass the end of the image")));
                        }
                        Location::Image { offset: u64::from(blkaddr) * BLKSZ }
                    } else {
                        let device = usize::from(device_id) - 1;
                        let Some(slot) = self.devices.get(device) else {
                            return Err(bad(format!("device id {device_id} but {} devices", self.devices.len())));
                        };
                        if u64::from(blkaddr) * BLKSZ + len > slot.blocks * BLKSZ {
                            return Err(bad(format!("blocks {blkaddr}..+{len} bytes pass device {device_id}'s end")));
                        }
                        Location::Device { device, offset: u64::from(blkaddr) * BLKSZ }
                    };
                    map.push(Extent { logical, len: len.min(size - logical), at });
                }
                Ok((map, table + chunks * CHUNK_INDEX_SIZE))
            }
            _ => Err(bad(format!("unsupported data layout {layout}"))),
        }
    }

    /// The bytes `map` names, `size` of them.
    fn gather(&self, map: &[Extent], size: u64, devices: Devices) -> Result<Vec<u8>, Error> {
        // Not sized from `size` up front: a file's bytes on a device are
        // only as many as the device has.
        let mut out = Vec::new();
        for extent in map {
            debug_assert_eq!(extent.logical, out.len() as u64);
            match extent.at {
                Location::Image { offset } => out.extend_from_slice(slice(self.bytes, offset, extent.len, "data")?),
                Location::Hole => out.resize(out.len() + extent.len as usize, 0),
                Location::Device { device, offset } => match devices {
                    Devices::Separate(devices) => {
                        let bytes = devices
                            .get(device)
                            .ok_or(Error::DeviceCount { expected: self.devices.len(), given: devices.len() })?;
                        out.extend_from_slice(slice(bytes, offset, extent.len, "device data")?);
                    }
                    Devices::Flat => {
                        // `erofs_map_dev` with `flatdev`: m_pa +=
                        // mapped_blkaddr.
                        let start = self.devices[device].mapped_blkaddr * BLKSZ;
                        out.extend_from_slice(slice(self.bytes, start + offset, extent.len, "flat device data")?);
                    }
                },
            }
        }
        if out.len() as u64 != size {
            return Err(Error::Truncated { what: "mapped data", offset: 0, len: size, size: out.len() as u64 });
        }
        Ok(out)
    }

    /// `dir.c` `erofs_readdir`, block by block, plus our writer's rules:
    /// names sorted across the directory, no NUL or `/`, zero padding.
    fn read_dirents(&self, nid: u64, size: u64, map: &[Extent]) -> Result<Vec<Dirent>, Error> {
        if size == 0 {
            return Err(Error::Dirent { nid, block: 0, reason: "an empty directory (no `.`)".into() });
        }
        let bytes = self.gather(map, size, Devices::Separate(&[]))?;
        let mut entries: Vec<Dirent> = Vec::new();
        for (block, data) in bytes.chunks(BLKSZ as usize).enumerate() {
            let bad = |reason: String| Error::Dirent { nid, block: block as u64, reason };
            let maxsize = data.len();
            if maxsize < DIRENT_SIZE as usize {
                return Err(bad(format!("a block of {maxsize} bytes")));
            }
            let nameoff0 = usize::from(u16_at(data, 8));
            if nameoff0 == 0 || nameoff0 >= BLKSZ as usize || nameoff0 % DIRENT_SIZE as usize != 0 {
                return Err(bad(format!("invalid de[0].nameoff {nameoff0}")));
            }
            if nameoff0 >= maxsize {
                return Err(bad(format!("de[0].nameoff {nameoff0} at or past the block's {maxsize} bytes")));
            }
            let count = nameoff0 / DIRENT_SIZE as usize;
            let mut name_end = nameoff0;
            for i in 0..count {
                let de = &data[i * DIRENT_SIZE as usize..][..DIRENT_SIZE as usize];
                let nameoff = usize::from(u16_at(de, 8));
                if nameoff != name_end {
                    return Err(bad(format!(
                        "dirent {i}: nameoff {nameoff}, expected {name_end} (names back to back)"
                    )));
                }
                let len = if i + 1 < count {
                    usize::from(u16_at(data, (i + 1) * DIRENT_SIZE as usize + 8)).wrapping_sub(nameoff)
                } else if maxsize <= nameoff {
                    return Err(bad(format!("dirent {i}: the last name starts at {nameoff}, the block ends")));
                } else {
                    data[nameoff..].iter().position(|&b| b == 0).unwrap_or(maxsize - nameoff)
                };
                if !(1..=NAME_LEN).contains(&len) || nameoff + len > maxsize {
                    return Err(bad(format!("dirent {i}: a name of {len} bytes at {nameoff}")));
                }
                let name = &data[nameoff..nameoff + len];
                if name.contains(&0) || name.contains(&b'/') {
                    return Err(bad(format!("dirent {i}: name {:?} holds NUL or `/`", lossy(name))));
                }
                if de[11] != 0 || !matches!(de[10], FT_REG_FILE | FT_DIR | FT_CHRDEV | FT_BLKDEV | FT_FIFO | FT_SYMLINK)
                {
                    return Err(bad(format!("dirent {i}: file type {} reserved {}", de[10], de[11])));
                }
                if let Some(prev) = entries.last() {
                    if prev.name.as_slice() >= name {
                        let reason = format!("{:?} after {:?}: not sorted", lossy(name), lossy(&prev.name));
                        return Err(bad(reason));
                    }
                }
                entries.push(Dirent { name: name.to_vec(), nid: u64_at(de, 0), file_type: de[10] });
                name_end = nameoff + len;
            }
            // Every block but the last is zero-padded after its last name;
            // the last one ends there (i_size is where the names end).
            if data[name_end..].iter().any(|&b| b != 0) {
                return Err(bad(format!("non-zero bytes after the last name at {name_end}")));
            }
            if (block as u64 + 1) * BLKSZ >= size && name_end != maxsize {
                return Err(bad(format!("i_size ends {} bytes after the last name", maxsize - name_end)));
            }
        }
        let count = |name: &[u8]| entries.iter().filter(|e| e.name == name).count();
        if count(b".") != 1 || count(b"..") != 1 {
            return Err(Error::Dirent { nid, block: 0, reason: "no `.` or `..`".into() });
        }
        Ok(entries)
    }

    /// Every range of the image something is placed in, checked pairwise
    /// disjoint: superblock, device table, each inode with its xattrs,
    /// chunk indexes and inline tail, each block range of data.
    fn check_overlaps(&self) -> Result<(), Error> {
        let mut ranges: Vec<(u64, u64, String)> = vec![(SUPER_OFFSET, SUPER_OFFSET + SUPER_SIZE, "superblock".into())];
        if !self.devices.is_empty() {
            let start = self.superblock.devt_slotoff * DEVT_SLOT_SIZE;
            ranges.push((start, start + self.devices.len() as u64 * DEVT_SLOT_SIZE, "device table".into()));
        }
        for (nid, node) in &self.inodes {
            ranges.push((self.iloc(*nid), node.end, format!("inode {nid}")));
            for extent in &node.map {
                // The inline tail is part of the inode's own range.
                if let Location::Image { offset } = extent.at {
                    if offset >= node.end || offset < self.iloc(*nid) {
                        let end = offset + extent.len.next_multiple_of(BLKSZ);
                        ranges.push((offset, end, format!("data of inode {nid}")));
                    }
                }
            }
        }
        ranges.sort();
        for pair in ranges.windows(2) {
            let ((a0, a1, a), (b0, b1, b)) = (&pair[0], &pair[1]);
            if b0 < a1 {
                return Err(Error::Overlap {
                    first: a.clone(),
                    first_start: *a0,
                    first_end: *a1,
                    second: b.clone(),
                    second_start: *b0,
                    second_end: *b1,
                });
            }
        }
        Ok(())
    }

    /// The root's nid.
    pub fn root(&self) -> u64 {
        self.superblock.root_nid
    }

    /// Every path and its nid, breadth-first from the root (`/`), each
    /// directory's entries in on-disk order, without `.` and `..`.
    pub fn paths(&self) -> Vec<(Vec<u8>, u64)> {
        let mut out = vec![(b"/".to_vec(), self.root())];
        let mut next = 0;
        while next < out.len() {
            let (path, nid) = out[next].clone();
            next += 1;
            let Some(NodeKind::Dir { entries, .. }) = self.inodes.get(&nid).map(|n| &n.kind) else { continue };
            for entry in entries.iter().filter(|e| e.name != b"." && e.name != b"..") {
                let mut child = if path == b"/" { Vec::new() } else { path.clone() };
                child.push(b'/');
                child.extend_from_slice(&entry.name);
                out.push((child, entry.nid));
            }
        }
        out
    }

    /// The contents of regular file `nid`.
    pub fn read(&self, nid: u64, devices: Devices) -> Result<Vec<u8>, Error> {
        if let Devices::Separate(given) = devices {
            if given.len() != self.devices.len() {
                // `erofs_scan_devices`: "extra devices don't match".
                return Err(Error::DeviceCount { expected: self.devices.len(), given: given.len() });
            }
        }
        match self.inodes.get(&nid) {
            Some(Node { kind: NodeKind::File { size }, map, .. }) => self.gather(map, *size, devices),
            _ => Err(Error::WrongKind { nid, expected: "regular file" }),
        }
    }

    /// Looks `name` up in directory `dir` the way `namei.c` does: a binary
    /// search over the blocks by their first names, then over the
    /// dirents of the candidate block, each comparison skipping the prefix
    /// already matched on both sides.
    pub fn lookup(&self, dir: u64, name: &[u8]) -> Result<Option<u64>, Error> {
        let Some(Node { kind: NodeKind::Dir { size, .. }, map, .. }) = self.inodes.get(&dir) else {
            return Err(Error::WrongKind { nid: dir, expected: "directory" });
        };
        let mut bytes = self.gather(map, *size, Devices::Separate(&[]))?;
        // Past i_size the page cache holds zeros.
        bytes.resize(bytes.len().next_multiple_of(BLKSZ as usize), 0);
        let blocks: Vec<&[u8]> = bytes.chunks(BLKSZ as usize).collect();
        let bsz = BLKSZ as usize;
        let nameoff = |block: &[u8], i: usize| usize::from(u16_at(block, i * DIRENT_SIZE as usize + 8)) & (bsz - 1);
        let corrupt = |block: usize| Error::Dirent { nid: dir, block: block as u64, reason: "no dirents".into() };
        // erofs_find_target_block
        let (mut head, mut back) = (0i64, blocks.len() as i64 - 1);
        let (mut startprfx, mut endprfx) = (0, 0);
        let mut candidate = None;
        while head <= back {
            let mid = (head + (back - head) / 2) as usize;
            let block = blocks[mid];
            let ndirents = nameoff(block, 0) / DIRENT_SIZE as usize;
            if ndirents == 0 {
                return Err(corrupt(mid));
            }
            let mut matched = startprfx.min(endprfx);
            let end = if ndirents == 1 { bsz } else { nameoff(block, 1) };
            let dname = block.get(nameoff(block, 0)..end).unwrap_or(&[]);
            match dirnamecmp(name, dname, &mut matched) {
                Ordering::Less => {
                    back = mid as i64 - 1;
                    endprfx = matched;
                }
                Ordering::Equal => return Ok(Some(u64_at(block, 0))),
                Ordering::Greater => {
                    head = mid as i64 + 1;
                    startprfx = matched;
                    candidate = Some((block, ndirents));
                }
            }
        }
        let Some((block, ndirents)) = candidate else { return Ok(None) };
        // find_target_dirent: the first dirent was compared above.
        let (mut head, mut back) = (1i64, ndirents as i64 - 1);
        let (mut startprfx, mut endprfx) = (0, 0);
        while head <= back {
            let mid = (head + (back - head) / 2) as usize;
            let end = if mid >= ndirents - 1 { bsz } else { nameoff(block, mid + 1) };
            let dname = block.get(nameoff(block, mid)..end).unwrap_or(&[]);
            let mut matched = startprfx.min(endprfx);
            match dirnamecmp(name, dname, &mut matched) {
                Ordering::Equal => return Ok(Some(u64_at(block, mid * DIRENT_SIZE as usize))),
                Ordering::Greater => {
                    head = mid as i64 + 1;
                    startprfx = matched;
                }
                Ordering::Less => {
                    back = mid as i64 - 1;
                    endprfx = matched;
                }
            }
        }
        Ok(None)
    }
}

fn file_type(kind: &NodeKind) -> u8 {
    match kind {
        NodeKind::Dir { .. } => FT_DIR,
        NodeKind::File { .. } => FT_REG_FILE,
        NodeKind::Symlink { .. } => FT_SYMLINK,
        NodeKind::Char { .. } => FT_CHRDEV,
        NodeKind::Block { .. } => FT_BLKDEV,
        NodeKind::Fifo => FT_FIFO,
    }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{meta, write_vec, Build};
    use super::super::{Data, Device, Kind};
    use super::*;

    /// A small image with a bit of everything, and where its parts are.
    struct Good {
        image: Vec<u8>,
        nids: BTreeMap<Vec<u8>, u64>,
    }

    impl Good {
        fn new() -> Good {
            let mut b = Build::new();
            let d = b.dir(0, b"d");
            for i in 0..30 {
                b.add(d, format!("n{i:02}").as_bytes(), Kind::Fifo, meta(0o644));
            }
            let small = b.dir(0, b"small");
            b.add(small, b"a", Kind::Fifo, meta(0));
            b.add(0, b"f", Kind::File { size: 1000, data: Data::Device { device: 0, offset: 0 } }, meta(0o644));
            b.add(0, b"g", Kind::File { size: 10, data: Data::Device { device: 1, offset: 512 } }, meta(0o644));
            for name in [b"e1", b"e2"] {
                b.add(0, name, Kind::File { size: 600, data: Data::Embedded { source: 0, offset: 0 } }, meta(0o600));
            }
            let mut m = meta(0o644);
            m.xattrs = vec![(b"user.a".to_vec(), b"1".to_vec())];
            b.add(0, b"x", Kind::Fifo, m);
            b.add(0, b"s", Kind::Symlink(b"d/n00".to_vec()), meta(0o777));
            let devices = [Device { blocks: 4, tag: "zero".into() }, Device { blocks: 4, tag: "one".into() }];
            let (image, _) = write_vec(&b.tree, &devices, &[vec![5; 600]]).unwrap();
            let nids = decode(&image).unwrap().paths().into_iter().collect();
            Good { image, nids }
        }

        fn iloc(&self, path: &str) -> usize {
            self.nids[path.as_bytes()] as usize * 32
        }

        fn u32_at(&self, at: usize) -> u32 {
            u32::from_le_bytes(self.image[at..at + 4].try_into().unwrap())
        }

        /// Byte offset of the first data block of a flat inode.
        fn block(&self, path: &str) -> usize {
            self.u32_at(self.iloc(path) + 16) as usize * 512
        }
    }

    #[test]
    fn the_good_image_decodes() {
        let good = Good::new();
        let image = decode(&good.image).unwrap();
        assert_eq!(image.inodes.len(), 40);
        let layouts: Vec<(&str, u8)> = ["/d", "/small", "/f", "/e1", "/s"]
            .into_iter()
            .map(|path| (path, image.inodes[&good.nids[path.as_bytes()]].layout))
            .collect();
        assert_eq!(layouts, [("/d", 0), ("/small", 2), ("/f", 4), ("/e1", 0), ("/s", 2)]);
    }

    #[test]
    fn every_corruption_is_caught() {
        type Corrupt = fn(&Good, &mut Vec<u8>);
        #[rustfmt::skip]
        let cases: Vec<(&str, Corrupt, &str)> = vec![
            ("magic", |_, i| i[1024] ^= 1,
             "superblock: magic is 0xe0f5e1e3: not EROFS"),
            ("4 KiB blocks", |_, i| i[1036] = 12,
             "superblock: blkszbits is 0xc: our images use 512-byte blocks"),
            ("dirblkbits", |_, i| i[1114] = 1,
             "superblock: dirblkbits is 0x1: the kernel refuses anything but 0"),
            ("compression feature", |_, i| i[1104] |= 0x10,
             "superblock: feature_incompat is 0x1c: only chunked files and a device table are expected"),
            ("checksum feature", |_, i| i[1032] = 1,
             "superblock: feature_compat is 0x1: no checksum, mtime or xattr filter is expected"),
            ("image shorter than its blocks", |_, i| i.truncate(2048),
             "superblock: blocks is 0x10: the image is shorter"),
            ("empty device tag", |_, i| i[1152] = 0,
             "device slot 0: empty tag"),
            ("device not on a 4 KiB boundary", |_, i| i[1152 + 128 + 68] += 1,
             "device slot 1: mapped at block 25, expected a 4 KiB boundary from block 20"),
            ("compact inode", |g, i| i[g.iloc("/f")] &= !1,
             "inode 61: a compact inode: our writer makes extended ones only"),
            ("unknown layout", |g, i| i[g.iloc("/f")] = 1 | 6 << 1,
             "inode 61: unsupported data layout 6"),
            ("socket", |g, i| i[g.iloc("/x") + 5] = 0xc1,
             "inode 74: bogus i_mode 0o140644"),
            ("unsorted names", |g, i| { let at = g.block("/d") + 12 * 32; i.swap(at + 3 + 2, at + 3 + 5); },
             "directory 55, block 0: \"n00\" after \"n01\": not sorted"),
            ("first nameoff", |g, i| i[g.block("/d") + 8] = 13,
             "directory 55, block 0: invalid de[0].nameoff 269"),
            ("NUL in a name", |g, i| i[g.block("/d") + 12 * 32 + 4] = 0,
             "directory 55, block 0: dirent 2: name \"n\\00\" holds NUL or `/`"),
            ("no dot", |g, i| i[g.block("/d") + 12 * 32] = b'-',
             "directory 55, block 0: no `.` or `..`"),
            ("dot elsewhere", |g, i| { let at = g.block("/d"); i[at] += 1; },
             "inode 55: \".\" points at 56, not 55"),
            ("wrong file type", |g, i| { let at = g.block("/d") + 12 * 2 + 10; i[at] = FT_CHRDEV; },
             "inode 55: dirent \"n00\" has file type 3"),
            ("a file's nlink", |g, i| i[g.iloc("/x") + 44] = 2,
             "inode 74: nlink 2 but 1 names"),
            ("a directory's nlink", |g, i| i[g.iloc("/small") + 44] = 3,
             "inode 70: nlink 3 but 0 subdirectories"),
            ("inode count", |_, i| i[1040] += 1,
             "inode 48: the superblock counts 41 inodes, the tree has 40"),
            ("directory named twice", |g, i| {
                // The root's dirent for "x" now names "small" (and says dir).
                let root = g.iloc("/");
                let at = (root + 64..root + 200).step_by(4).find(|&at| g.u32_at(at) as u64 == g.nids[&b"/x"[..]]).unwrap();
                i[at..at + 8].copy_from_slice(&g.nids[&b"/small"[..]].to_le_bytes());
                i[at + 10] = FT_DIR;
            }, "inode 48: directory 70 is named again, as \"x\""),
            ("chunk on a device that is not there", |g, i| { let at = g.iloc("/f") + 64 + 2; i[at] = 3; },
             "inode 61, chunk 0: device id 3 but 2 devices"),
            ("chunk past its device", |g, i| { let at = g.iloc("/g") + 64 + 4; i[at] = 4; },
             "inode 64, chunk 0: blocks 4..+512 bytes pass device 2's end"),
            ("chunk format", |g, i| i[g.iloc("/f") + 17] = 1,
             "inode 61: unsupported chunk format 0x121"),
            ("block map", |g, i| i[g.iloc("/f") + 16] = 1,
             "inode 61: a block map: our writer makes chunk indexes"),
            ("inline tail across a block", |g, i| {
                // Still one block long, but now running past the block.
                let size = 512 - (g.iloc("/small") as u64 + 64) % 512 + 1;
                assert!(size <= 512);
                let at = g.iloc("/small") + 8;
                i[at..at + 8].copy_from_slice(&size.to_le_bytes());
            },
             "inode 70: inline tail of 257 bytes at byte 2304 crosses a block"),
            ("data past the image", |g, i| { let at = g.iloc("/e1") + 16; i[at..at + 4].copy_from_slice(&15u32.to_le_bytes()); },
             "inode 57: blocks 15..+2 are outside the image"),
            ("overlapping data", |g, i| { let (a, b) = (g.iloc("/e1") + 16, g.iloc("/e2") + 16); i.copy_within(a..a + 4, b); },
             "data of inode 57 (bytes 5120..6144) overlaps data of inode 59 (bytes 5120..6144)"),
            ("data over the inodes", |g, i| { let at = g.iloc("/e2") + 16; i[at..at + 4].copy_from_slice(&4u32.to_le_bytes()); },
             "inode 64 (bytes 2048..2120) overlaps data of inode 59 (bytes 2048..3072)"),
            ("unknown xattr index", |g, i| i[g.iloc("/x") + 64 + 12 + 1] = 5,
             "inode 74: xattr at byte 2444: name index 5 with a 1-byte name"),
            ("shared xattr", |g, i| i[g.iloc("/x") + 64 + 4] = 1,
             "inode 74: xattr at byte 2432: name filter, shared xattrs or reserved bytes set"),
            ("xattr past its ibody", |g, i| i[g.iloc("/x") + 64 + 12] = 9,
             "inode 74: xattr at byte 2444: entry beyond xattr_isize"),
            ("symlink with a NUL", |g, i| { let at = g.iloc("/s") + 64 + 1; i[at] = 0; },
             "inode 67: symlink target of 5 bytes or with a NUL"),
        ];
        let good = Good::new();
        let mut wrong = Vec::new();
        for (what, corrupt, want) in cases {
            let mut image = good.image.clone();
            corrupt(&good, &mut image);
            match decode(&image).map(|_| ()) {
                Err(err) if err.to_string() == want => {}
                Err(err) => wrong.push(format!("{what}: got {err}")),
                Ok(()) => wrong.push(format!("{what}: decoded")),
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn reading_needs_every_device() {
        let good = Good::new();
        let image = decode(&good.image).unwrap();
        let f = good.nids[&b"/f"[..]];
        let err = image.read(f, Devices::Separate(&[&[0; 2048]])).unwrap_err();
        assert_eq!(err, Error::DeviceCount { expected: 2, given: 1 });
        let two: [&[u8]; 2] = [&[1; 2048], &[2; 2048]];
        assert_eq!(image.read(f, Devices::Separate(&two)).unwrap(), vec![1; 1000]);
        assert_eq!(image.read(good.nids[&b"/g"[..]], Devices::Separate(&two)).unwrap(), vec![2; 10]);
        // The flat image is only the metadata here: device bytes past it are
        // missing, and said so.
        let err = image.read(f, Devices::Flat).unwrap_err();
        assert!(matches!(err, Error::Truncated { what: "flat device data", .. }), "{err}");
        assert_eq!(
            image.read(good.nids[&b"/d"[..]], Devices::Flat),
            Err(Error::WrongKind { nid: good.nids[&b"/d"[..]], expected: "regular file" })
        );
    }

    /// Hostile bytes are normal input for a decoder used in fuzzing: random
    /// damage to a good image is an error or a valid image, never a panic
    /// or a runaway allocation.
    #[test]
    fn random_damage_never_panics() {
        let good = Good::new();
        let devices: [&[u8]; 2] = [&[1; 2048], &[2; 2048]];
        let mut rng = super::super::tests::Rng(0x5eed);
        let (mut decoded, mut failed) = (0, 0);
        for round in 0..3000 {
            let mut image = good.image.clone();
            for _ in 0..1 + rng.next() % 4 {
                let at = (rng.next() % image.len() as u64) as usize;
                image[at] = rng.next() as u8;
            }
            if round % 10 == 0 {
                image.truncate((rng.next() % image.len() as u64) as usize);
            }
            let Ok(fs) = decode(&image) else {
                failed += 1;
                continue;
            };
            decoded += 1;
            for (_, nid) in fs.paths() {
                match &fs.inodes[&nid].kind {
                    NodeKind::File { .. } => {
                        let _ = fs.read(nid, Devices::Separate(&devices));
                        let _ = fs.read(nid, Devices::Flat);
                    }
                    NodeKind::Dir { entries, .. } => {
                        for entry in entries {
                            assert_eq!(fs.lookup(nid, &entry.name).unwrap(), Some(entry.nid));
                        }
                    }
                    _ => {}
                }
            }
        }
        // Most damage is caught; some lands in padding, names or data.
        assert!(failed > 1000 && decoded > 100, "{failed} failed, {decoded} decoded");
    }
}
