//! Deciding the image: check the tree, then give every inode its nid,
//! data layout and blocks, before a byte is written (dirents carry the
//! nids of their targets, so all of them must be known first).
//!
//! The image, front to back:
//!
//! ```text
//! 0       1024         1152            1152 + 128 n
//! | zeros | superblock | device table  | inodes (nid order) ... | data blocks ... | zeros to 4 KiB
//! ```
//!
//! `meta_blkaddr` is 0, so a nid is an inode's byte offset / 32, and the
//! root, placed first, has a nid far below the 16-bit `root_nid` limit.
//! Inodes follow in breadth-first order from the root, each directory's
//! children by name, so a `readdir` + `stat` reads neighbouring slots.
//! Data blocks (directory blocks, long symlink targets, embedded files)
//! follow in the same order.

use super::format::{
    BLKSZ, CHUNK_FORMAT_BLKBITS_MASK, CHUNK_INDEX_SIZE, DEVICE_TAG_LEN, DEVT_SLOT_SIZE, DIRENT_SIZE, FLAT_DEVICE_ALIGN,
    INODE_EXTENDED_SIZE, ISLOT_SIZE, LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, LAYOUT_FLAT_PLAIN, NAME_LEN, NULL_ADDR,
    SUPER_OFFSET, SUPER_SIZE, XATTR_ENTRY_SIZE, XATTR_IBODY_HEADER_SIZE, XATTR_PREFIXES, XATTR_WHOLE_NAMES,
};
use super::{Data, Device, Error, InodeId, Kind, Meta, Tree, Written, MAX_DEVICES, MAX_SYMLINK_LEN};

/// Chunk size = block size << (`format` & `EROFS_CHUNK_FORMAT_BLKBITS_MASK`):
/// at most 512 << 31 bytes, 1 TiB.
pub(super) const MAX_CHUNK_BLKBITS: u8 = CHUNK_FORMAT_BLKBITS_MASK as u8;

/// `i_xattr_icount` is 16 bits: the ibody is at most this long
/// (`erofs_xattr_ibody_size`: 12 + 4 * (icount - 1)).
const MAX_XATTR_ISIZE: u64 = XATTR_IBODY_HEADER_SIZE + 4 * (u16::MAX as u64 - 1);

/// `XATTR_NAME_MAX` (`include/uapi/linux/limits.h`): a whole xattr name.
const XATTR_NAME_MAX: usize = 255;

/// Linux's dev_t as `new_encode_dev` packs it: 12 bits of major, 20 of minor.
const MAX_MAJOR: u32 = (1 << 12) - 1;
const MAX_MINOR: u32 = (1 << 20) - 1;

/// Where an inode is first named: its parent directory and the index of
/// the entry in that directory's children. Directories have exactly one;
/// `..` and error paths use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Parent {
    pub dir: InodeId,
    pub entry: usize,
}

/// Everything decided about one inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Placed {
    pub nid: u64,
    pub nlink: u32,
    /// `EROFS_INODE_FLAT_PLAIN`, `_FLAT_INLINE` or `_CHUNK_BASED`.
    pub layout: u8,
    /// Bytes of the xattr ibody, 0 when there are no xattrs.
    pub xattr_isize: u64,
    /// `i_size`: file size, symlink length, bytes of dirents.
    pub size: u64,
    /// First of `blocks` data blocks in the image, or `NULL_ADDR`.
    pub blkaddr: u32,
    /// Data blocks in the image (not counting an inline tail).
    pub blocks: u64,
    /// Chunk-based files: chunk size = block size << this.
    pub chunk_blkbits: u8,
}

/// The decided image.
#[derive(Debug)]
pub(super) struct Plan {
    /// Inodes in nid order.
    pub order: Vec<InodeId>,
    /// Indexed by [`InodeId`].
    pub placed: Vec<Placed>,
    pub parents: Vec<Option<Parent>>,
    /// Where the inodes start and end (bytes).
    pub inodes_start: u64,
    pub inodes_end: u64,
    /// First data block.
    pub data_start: u64,
    /// End of the last data block (bytes).
    pub data_end: u64,
    /// Image bytes, a multiple of 4096.
    pub len: u64,
    pub device_starts: Vec<u64>,
    pub chunked: bool,
    pub dir_blocks: u64,
    pub data_blocks: u64,
}

impl Plan {
    pub fn written(&self) -> Written {
        Written {
            len: self.len,
            device_starts: self.device_starts.clone(),
            inodes: self.order.len() as u64,
            metadata_bytes: self.data_start * BLKSZ,
            dir_blocks: self.dir_blocks,
            data_blocks: self.data_blocks,
        }
    }
}

/// What a dirent points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Target {
    /// `.`
    Itself,
    /// `..` (the root's is itself).
    Parent,
    /// Inode `id`, entry `entry` of the directory's children.
    Child { id: InodeId, entry: usize },
}

/// A directory's entries with `.` and `..`, sorted bytewise (shorter first
/// on a common prefix) as `namei.c`'s binary search needs: across blocks
/// (`erofs_find_target_block` compares with each block's first name) and
/// within one (`find_target_dirent`).
pub(super) fn sorted_entries(children: &[(Vec<u8>, InodeId)]) -> Vec<(&[u8], Target)> {
    let mut entries: Vec<(&[u8], Target)> = Vec::with_capacity(children.len() + 2);
    entries.push((b".", Target::Itself));
    entries.push((b"..", Target::Parent));
    let named = children.iter().enumerate();
    entries.extend(named.map(|(entry, (name, id))| (name.as_slice(), Target::Child { id: *id, entry })));
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    entries
}

/// Dirents in 512-byte blocks (`dirblkbits` 0): each block holds
/// `count` 12-byte dirents, then their names back to back; a name never
/// crosses a block (`dir.c` reads each block on its own).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct DirPacker {
    /// Full blocks before the current one.
    pub full_blocks: u64,
    /// Dirents and name bytes in the current block.
    pub count: u64,
    pub name_bytes: u64,
}

impl DirPacker {
    /// Adds a name of `len` bytes; true if it starts a new block.
    pub fn push(&mut self, len: usize) -> bool {
        let len = len as u64;
        let fits = (self.count + 1) * DIRENT_SIZE + self.name_bytes + len <= BLKSZ;
        let new_block = self.count > 0 && !fits;
        if new_block {
            self.full_blocks += 1;
            self.count = 0;
            self.name_bytes = 0;
        }
        self.count += 1;
        self.name_bytes += len;
        new_block
    }

    /// `i_size`: the last block ends where its last name does (`dir.c`
    /// takes the last name up to `i_size`).
    pub fn size(&self) -> u64 {
        self.full_blocks * BLKSZ + self.count * DIRENT_SIZE + self.name_bytes
    }
}

/// The path of `id` as its first name gives it, for error messages.
pub(super) fn path_of(tree: &Tree, parents: &[Option<Parent>], id: InodeId) -> String {
    let mut names: Vec<&[u8]> = Vec::new();
    let mut at = id;
    // Bounded: every step goes to a directory's unique parent, and the
    // walk that built `parents` rejected cycles.
    while let Some(parent) = parents.get(at).copied().flatten() {
        let Kind::Dir(children) = &tree.inodes[parent.dir].kind else { break };
        names.push(&children[parent.entry].0);
        at = parent.dir;
        if names.len() > tree.inodes.len() {
            break;
        }
    }
    if names.is_empty() {
        return "/".to_owned();
    }
    let mut path = Vec::new();
    for name in names.iter().rev() {
        path.push(b'/');
        path.extend_from_slice(name);
    }
    String::from_utf8_lossy(&path).into_owned()
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The xattr name index and the part of the name stored after it.
pub(super) fn xattr_index(name: &[u8]) -> Option<(u8, &[u8])> {
    for (whole, index) in XATTR_WHOLE_NAMES {
        if name == whole {
            return Some((index, &[]));
        }
    }
    for (prefix, index) in XATTR_PREFIXES {
        // An empty rest is unreachable: the VFS refuses `user.` alone
        // (`xattr_resolve_name`).
        if let Some(rest) = name.strip_prefix(prefix).filter(|rest| !rest.is_empty()) {
            return Some((index, rest));
        }
    }
    None
}

/// Bytes of one xattr entry: header, name rest, value, padded to 4
/// (`erofs_xattr_entry_size`).
pub(super) fn xattr_entry_size(rest: usize, value: usize) -> u64 {
    (XATTR_ENTRY_SIZE + rest as u64 + value as u64).next_multiple_of(XATTR_ENTRY_SIZE)
}

/// The xattr ibody size of `meta`, after checking every name and value.
fn xattr_isize(meta: &Meta, path: impl Fn() -> String) -> Result<u64, Error> {
    if meta.xattrs.is_empty() {
        return Ok(0);
    }
    let mut keys = Vec::with_capacity(meta.xattrs.len());
    let mut size = XATTR_IBODY_HEADER_SIZE;
    for (name, value) in &meta.xattrs {
        let (index, rest) = xattr_index(name).ok_or_else(|| Error::XattrName { path: path(), name: lossy(name) })?;
        // The VFS refuses longer names in getxattr(2) before EROFS sees
        // them (XATTR_NAME_MAX, the whole name); this also keeps the rest
        // within the 8-bit `e_name_len`.
        if name.len() > XATTR_NAME_MAX {
            return Err(Error::XattrNameTooLong { path: path(), name: lossy(name), len: name.len() });
        }
        if value.len() > usize::from(u16::MAX) {
            return Err(Error::XattrValueTooLarge { path: path(), name: lossy(name), len: value.len() });
        }
        size += xattr_entry_size(rest.len(), value.len());
        keys.push((index, rest, name));
    }
    keys.sort_unstable();
    if let Some(pair) = keys.windows(2).find(|pair| pair[0].0 == pair[1].0 && pair[0].1 == pair[1].1) {
        return Err(Error::DuplicateXattr { path: path(), name: lossy(pair[0].2) });
    }
    if size > MAX_XATTR_ISIZE {
        return Err(Error::XattrsTooLarge { path: path(), bytes: size, limit: MAX_XATTR_ISIZE });
    }
    Ok(size)
}

/// The smallest chunk size (as block bits over the block size) that holds
/// `blocks` blocks in one chunk, or the largest there is.
pub(super) fn chunk_blkbits(blocks: u64) -> u8 {
    let bits = blocks.next_power_of_two().trailing_zeros();
    bits.min(u32::from(MAX_CHUNK_BLKBITS)) as u8
}

/// Checks the tree and the devices and decides the whole image.
pub(super) fn plan(tree: &Tree, devices: &[Device]) -> Result<Plan, Error> {
    check_devices(devices)?;
    let walked = walk(tree)?;
    let mut placed: Vec<Option<Placed>> = vec![None; tree.inodes.len()];
    let inodes_start = SUPER_OFFSET + SUPER_SIZE + devices.len() as u64 * DEVT_SLOT_SIZE;
    let mut cursor = inodes_start;
    let mut chunked = false;
    // Pass 1, in nid order: layouts and sizes, which place the inodes.
    for &id in &walked.order {
        let inode = &tree.inodes[id];
        let path = || path_of(tree, &walked.parents, id);
        if inode.meta.mode & !0o7777 != 0 {
            return Err(Error::Mode { path: path(), mode: inode.meta.mode });
        }
        if inode.meta.mtime_nsec >= 1_000_000_000 {
            return Err(Error::MtimeNsec { path: path(), nsec: inode.meta.mtime_nsec });
        }
        let xattr_isize = xattr_isize(&inode.meta, path)?;
        let head = INODE_EXTENDED_SIZE + xattr_isize;
        // Below 2^32: a tree naming one inode that often would not fit in
        // memory.
        let nlink = u32::try_from(walked.links[id]).unwrap_or(u32::MAX);
        // (layout, i_size, blocks in the image, bytes from the inode's start)
        let (layout, size, blocks, bytes, chunk_blkbits) = match &inode.kind {
            Kind::Dir(_) => {
                let size = walked.dir_sizes[id];
                // The last block inline when it fits after the inode.
                let tail = size - (size.div_ceil(BLKSZ) - 1) * BLKSZ;
                if head + tail <= BLKSZ {
                    (LAYOUT_FLAT_INLINE, size, size.div_ceil(BLKSZ) - 1, head + tail, 0)
                } else {
                    (LAYOUT_FLAT_PLAIN, size, size.div_ceil(BLKSZ), head, 0)
                }
            }
            Kind::Symlink(target) => {
                if target.is_empty() || target.len() > MAX_SYMLINK_LEN || target.contains(&0) {
                    return Err(Error::SymlinkTarget { path: path(), len: target.len() });
                }
                // `erofs_fill_symlink` makes a fast symlink (the target
                // kept in memory) only of a target inline in the inode's
                // block; a longer one goes to data blocks.
                let size = target.len() as u64;
                if head + size <= BLKSZ {
                    (LAYOUT_FLAT_INLINE, size, 0, head + size, 0)
                } else {
                    (LAYOUT_FLAT_PLAIN, size, size.div_ceil(BLKSZ), head, 0)
                }
            }
            Kind::File { size, data } => {
                if let Data::Device { device, offset } = *data {
                    check_device_range(devices, device, offset, *size, path)?;
                }
                match data {
                    _ if *size == 0 => (LAYOUT_FLAT_PLAIN, 0, 0, head, 0),
                    Data::Device { .. } => {
                        chunked = true;
                        let bits = chunk_blkbits(size.div_ceil(BLKSZ));
                        let chunks = size.div_ceil(BLKSZ << bits);
                        let bytes = head.next_multiple_of(CHUNK_INDEX_SIZE) + chunks * CHUNK_INDEX_SIZE;
                        (LAYOUT_CHUNK_BASED, *size, 0, bytes, bits)
                    }
                    Data::Embedded { .. } => (LAYOUT_FLAT_PLAIN, *size, size.div_ceil(BLKSZ), head, 0),
                }
            }
            Kind::Char { major, minor } | Kind::Block { major, minor } => {
                if *major > MAX_MAJOR || *minor > MAX_MINOR {
                    return Err(Error::DeviceNumber { path: path(), major: *major, minor: *minor });
                }
                (LAYOUT_FLAT_PLAIN, 0, 0, head, 0)
            }
            Kind::Fifo => (LAYOUT_FLAT_PLAIN, 0, 0, head, 0),
        };
        // An inline tail must not cross a block (`data.c`
        // `erofs_map_blocks_flatmode`); keeping the whole inode in one
        // block also keeps a fast symlink fast (`erofs_fill_symlink`).
        // Other inodes may cross blocks: `erofs_read_inode` reassembles an
        // extended inode, xattrs are read in slices, chunk indexes are
        // 8-byte aligned.
        if layout == LAYOUT_FLAT_INLINE && cursor % BLKSZ + bytes > BLKSZ {
            cursor = cursor.next_multiple_of(BLKSZ);
        }
        let nid = cursor / ISLOT_SIZE;
        placed[id] = Some(Placed { nid, nlink, layout, xattr_isize, size, blkaddr: NULL_ADDR, blocks, chunk_blkbits });
        cursor = (cursor + bytes).next_multiple_of(ISLOT_SIZE);
    }
    let inodes_end = cursor;
    let data_start = inodes_end.div_ceil(BLKSZ);
    // Every inode is in `order` (`walk` rejects unreferenced ones).
    let mut placed: Vec<Placed> = placed.into_iter().map(|p| p.expect("walk visits every inode")).collect();
    // Pass 2: data blocks, in the same order. Saturating: embedded sizes
    // are only bounded by the check below.
    let mut next = data_start;
    let mut dir_blocks = 0;
    let mut data_blocks = 0;
    for &id in &walked.order {
        let p = &mut placed[id];
        if p.blocks == 0 {
            continue;
        }
        if matches!(tree.inodes[id].kind, Kind::Dir(_)) {
            dir_blocks += p.blocks;
        } else {
            data_blocks += p.blocks;
        }
        // Checked below: the image ends below 2^32 blocks.
        p.blkaddr = next as u32;
        next = next.saturating_add(p.blocks);
    }
    let blocks = next.checked_next_multiple_of(FLAT_DEVICE_ALIGN / BLKSZ).unwrap_or(u64::MAX);
    if blocks > u64::from(u32::MAX) {
        return Err(Error::ImageTooLarge { blocks });
    }
    let (data_end, len) = (next * BLKSZ, blocks * BLKSZ);
    let device_starts = flat_layout(len, devices)?;
    Ok(Plan {
        order: walked.order,
        placed,
        parents: walked.parents,
        inodes_start,
        inodes_end,
        data_start,
        data_end,
        len,
        device_starts,
        chunked,
        dir_blocks,
        data_blocks,
    })
}

fn check_devices(devices: &[Device]) -> Result<(), Error> {
    if devices.len() > MAX_DEVICES {
        return Err(Error::TooManyDevices { count: devices.len(), limit: MAX_DEVICES });
    }
    for (device, d) in devices.iter().enumerate() {
        if d.tag.is_empty() || d.tag.len() > DEVICE_TAG_LEN || d.tag.contains('\0') {
            return Err(Error::DeviceTag { device, tag: d.tag.clone() });
        }
    }
    Ok(())
}

fn check_device_range(
    devices: &[Device],
    device: usize,
    offset: u64,
    size: u64,
    path: impl Fn() -> String,
) -> Result<(), Error> {
    let Some(d) = devices.get(device) else {
        return Err(Error::NoSuchDevice { path: path(), device, devices: devices.len() });
    };
    if offset % BLKSZ != 0 {
        return Err(Error::UnalignedData { path: path(), device, offset });
    }
    let device_bytes = d.blocks.saturating_mul(BLKSZ);
    match offset.checked_add(size) {
        Some(end) if end <= device_bytes => Ok(()),
        _ => Err(Error::DataOutOfDevice { path: path(), device, offset, size, device_bytes }),
    }
}

/// Where each device starts in the flat layout: the image, then each
/// device on the next 4 KiB boundary. Every device must end within the
/// 2^32 blocks a `mapped_blkaddr` and a chunk's `blkaddr` (both 32 bits)
/// reach; that also keeps `blocks` and every chunk address below
/// `NULL_ADDR`.
fn flat_layout(image_len: u64, devices: &[Device]) -> Result<Vec<u64>, Error> {
    let limit = 1u64 << 32;
    let mut starts = Vec::with_capacity(devices.len());
    let mut at = image_len;
    for (device, d) in devices.iter().enumerate() {
        let end = (at / BLKSZ).saturating_add(d.blocks);
        if end > limit {
            return Err(Error::FlatLayoutTooLarge { device, end });
        }
        starts.push(at);
        at = (end * BLKSZ).next_multiple_of(FLAT_DEVICE_ALIGN);
    }
    Ok(starts)
}

/// What the walk from the root finds.
struct Walked {
    order: Vec<InodeId>,
    parents: Vec<Option<Parent>>,
    /// Names of each non-directory; 2 + subdirectories of each directory.
    links: Vec<u64>,
    /// `i_size` of each directory.
    dir_sizes: Vec<u64>,
}

/// Walks the tree breadth-first from the root (iteratively: a deep tree
/// costs heap, not stack), checking names and links, and lists the inodes
/// in nid order: each directory's children by name, each inode where it
/// is first named, so the order does not depend on the order of the
/// children vectors.
fn walk(tree: &Tree) -> Result<Walked, Error> {
    let n = tree.inodes.len();
    let root = tree.root;
    if root >= n {
        return Err(Error::RootOutOfRange { root, inodes: n });
    }
    if !matches!(tree.inodes[root].kind, Kind::Dir(_)) {
        return Err(Error::RootNotDir { root });
    }
    let mut parents: Vec<Option<Parent>> = vec![None; n];
    let mut links = vec![0u64; n];
    let mut dir_sizes = vec![0u64; n];
    let mut order = Vec::with_capacity(n);
    order.push(root);
    let mut next_dir = 0;
    while next_dir < order.len() {
        let dir = order[next_dir];
        next_dir += 1;
        let Kind::Dir(children) = &tree.inodes[dir].kind else { continue };
        let dir_path = || path_of(tree, &parents, dir);
        for (name, child) in children {
            if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
                return Err(Error::InvalidName { dir: dir_path(), name: lossy(name) });
            }
            if name.len() > NAME_LEN {
                return Err(Error::NameTooLong { dir: dir_path(), name: lossy(name), len: name.len() });
            }
            if *child >= n {
                return Err(Error::ChildOutOfRange { dir: dir_path(), name: lossy(name), child: *child, inodes: n });
            }
        }
        let entries = sorted_entries(children);
        if let Some(pair) = entries.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(Error::DuplicateName { dir: dir_path(), name: lossy(pair[0].0) });
        }
        let mut packer = DirPacker::default();
        for (name, _) in &entries {
            packer.push(name.len());
        }
        dir_sizes[dir] = packer.size();
        links[dir] += 2;
        for (name, target) in entries {
            let Target::Child { id: child, entry } = target else { continue };
            // Named from inside the tree, so never the root's own path:
            // built from the (acyclic) path of `dir`.
            let here = || format!("{}/{}", path_of(tree, &parents, dir).trim_end_matches('/'), lossy(name));
            if child == root {
                return Err(Error::RootLinked { path: here() });
            }
            if matches!(tree.inodes[child].kind, Kind::Dir(_)) {
                if parents[child].is_some() {
                    return Err(Error::DirLinkedTwice { path: here(), first: path_of(tree, &parents, child) });
                }
                links[dir] += 1;
            } else {
                links[child] += 1;
            }
            if parents[child].is_none() {
                parents[child] = Some(Parent { dir, entry });
                order.push(child);
            }
        }
    }
    if let Some(inode) = (0..n).find(|&id| id != root && parents[id].is_none()) {
        return Err(Error::Unreferenced { inode });
    }
    Ok(Walked { order, parents, links, dir_sizes })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{meta, Build};
    use super::*;

    #[test]
    fn one_chunk_holds_a_file_up_to_one_tib() {
        let cases = [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (1 << 20, 20), ((1 << 20) + 1, 21), (1 << 31, 31)];
        for (blocks, bits) in cases {
            assert_eq!(chunk_blkbits(blocks), bits, "{blocks} blocks");
            assert!(BLKSZ << bits >= blocks * BLKSZ);
        }
        // Past 2^31 blocks (1 TiB) the largest chunk is used, several times.
        assert_eq!(chunk_blkbits((1 << 31) + 1), 31);
        assert_eq!(chunk_blkbits(1 << 40), 31);
    }

    #[test]
    fn dirents_pack_until_the_block_is_full() {
        // (name lengths, i_size)
        let cases: Vec<(Vec<usize>, u64)> = vec![
            (vec![1, 2], 27),
            (vec![1, 2, 255], 36 + 258),
            (vec![20; 16], 512),
            (vec![20; 17], 512 + 32),
            (vec![100; 5], 512 + 112),
            (vec![255, 255], 512 + 267),
            // 39 dirents of 13 bytes fill 507 bytes: the 40th opens block 2.
            (vec![1; 39], 39 * 13),
            (vec![1; 40], 512 + 13),
            (vec![1; 42], 512 + 3 * 13),
        ];
        for (names, size) in cases {
            let mut packer = DirPacker::default();
            let new_blocks: Vec<usize> =
                names.iter().enumerate().filter_map(|(i, &len)| packer.push(len).then_some(i)).collect();
            assert_eq!(packer.size(), size, "{names:?}");
            assert_eq!(new_blocks.len() as u64, packer.full_blocks, "{names:?}");
        }
    }

    #[test]
    fn devices_follow_the_image_on_4k_boundaries() {
        let device = |blocks| Device { blocks, tag: "t".into() };
        assert_eq!(flat_layout(4096, &[]).unwrap(), Vec::<u64>::new());
        assert_eq!(
            flat_layout(4096, &[device(1), device(8), device(0), device(3)]).unwrap(),
            [4096, 8192, 12288, 12288]
        );
        assert_eq!(flat_layout(8192, &[device(9)]).unwrap(), [8192]);
        // The last device may end exactly at 2^32 blocks, not past it.
        assert_eq!(flat_layout(4096, &[device((1 << 32) - 8)]).unwrap(), [4096]);
        // Device 1 starts at block 16 (8192 bytes).
        assert_eq!(flat_layout(4096, &[device(1), device((1 << 32) - 16)]).unwrap(), [4096, 8192]);
        let err = flat_layout(4096, &[device(1), device((1 << 32) - 8)]).unwrap_err();
        assert!(matches!(err, Error::FlatLayoutTooLarge { device: 1, end } if end == (1 << 32) + 8), "{err}");
        assert!(matches!(flat_layout(4096, &[device(u64::MAX)]), Err(Error::FlatLayoutTooLarge { device: 0, .. })));
    }

    #[test]
    fn inodes_follow_the_root_breadth_first_by_name() {
        let mut b = Build::new();
        let dir_b = b.dir(0, b"b");
        let x = b.add(dir_b, b"x", Kind::Fifo, meta(0o644));
        let a = b.add(0, b"a", Kind::Symlink(b"t".to_vec()), meta(0o777));
        b.link(dir_b, b"0", a);
        let dir_c = b.dir(dir_b, b"c");
        let dot = b.add(0, b".a", Kind::Fifo, meta(0o600));
        let plan = plan(&b.tree, &[]).unwrap();
        // The root, its children by name (".a" < "a" < "b"), then those of
        // "b"; "a" keeps the place of its first name.
        assert_eq!(plan.order, [0, dot, a, dir_b, dir_c, x]);
        let nids: Vec<u64> = plan.order.iter().map(|&id| plan.placed[id].nid).collect();
        // The root: 64 + 12 * 5 + 7 = 131 bytes inline, 160 with padding;
        // ".a" 64; "a" 64 + 1; "b" (".", "..", "0", "c", "x": 130 bytes)
        // would cross the block at 1536 from 1472, so starts there.
        assert_eq!(nids, [36, 41, 43, 48, 53, 56]);
        let links: Vec<u32> = plan.order.iter().map(|&id| plan.placed[id].nlink).collect();
        assert_eq!(links, [3, 1, 2, 3, 2, 1]);
        assert_eq!(plan.parents[dir_c], Some(Parent { dir: dir_b, entry: 2 }));
        assert_eq!(plan.parents[a], Some(Parent { dir: 0, entry: 1 }));
    }

    #[test]
    fn an_inline_tail_never_crosses_a_block() {
        let mut b = Build::new();
        let mut m = meta(0o644);
        // A 160-byte xattr ibody: 12 + (4 + 1 + 143).
        m.xattrs = vec![(b"user.x".to_vec(), vec![b'v'; 143])];
        let a = b.add(0, b"a", Kind::File { size: 0, data: Data::Embedded { source: 0, offset: 0 } }, m);
        let dir = b.dir(0, b"b");
        let plan = plan(&b.tree, &[]).unwrap();
        // The root (117 bytes) at 1152..1280, "a" at 1280..1504; "b" with
        // its 27 inline bytes would end at 1595, past the block at 1536,
        // so it starts there.
        assert_eq!(plan.placed[0].nid * 32, 1152);
        assert_eq!(plan.placed[a].nid * 32, 1280);
        assert_eq!(plan.placed[a].xattr_isize, 160);
        assert_eq!(plan.placed[dir].nid * 32, 1536);
        assert_eq!(plan.placed[dir].layout, LAYOUT_FLAT_INLINE);
        assert_eq!(plan.inodes_end, 1536 + 96);
    }

    #[test]
    fn layouts_follow_what_fits() {
        let mut b = Build::new();
        let full = b.dir(0, b"full");
        for i in 0..16u8 {
            // ".", ".." and fourteen names: 16 dirents with 14 * 19 + 3
            // name bytes = 461 bytes; one more 20-byte name would not fit.
            let name = [b'n', b'a' + i].iter().copied().chain(std::iter::repeat(b'-').take(17)).collect::<Vec<u8>>();
            if i < 14 {
                b.add(full, &name, Kind::Fifo, meta(0));
            }
        }
        let big = b.dir(0, b"big");
        for i in 0..40u8 {
            b.add(big, &[b'f', i + 1], Kind::Fifo, meta(0));
        }
        let short = b.add(0, b"short", Kind::Symlink(vec![b's'; 448]), meta(0o777));
        let long = b.add(0, b"long", Kind::Symlink(vec![b'l'; 449]), meta(0o777));
        let huge = b.add(0, b"huge", Kind::Symlink(vec![b'h'; 4095]), meta(0o777));
        let embedded = b.add(0, b"e", Kind::File { size: 513, data: Data::Embedded { source: 0, offset: 0 } }, meta(0));
        let plan = plan(&b.tree, &[]).unwrap();
        let summary = |id: InodeId| {
            let p = &plan.placed[id];
            (p.layout, p.size, p.blocks)
        };
        // 461 bytes do not fit after a 64-byte inode: a block of its own.
        assert_eq!(summary(full), (LAYOUT_FLAT_PLAIN, 461, 1));
        // ".", ".." and 34 two-byte names fill 503 bytes of block 1; the
        // other six (6 * 14 bytes) are inline.
        assert_eq!(summary(big), (LAYOUT_FLAT_INLINE, 512 + 84, 1));
        assert_eq!(summary(short), (LAYOUT_FLAT_INLINE, 448, 0));
        assert_eq!(summary(long), (LAYOUT_FLAT_PLAIN, 449, 1));
        assert_eq!(summary(huge), (LAYOUT_FLAT_PLAIN, 4095, 8));
        assert_eq!(summary(embedded), (LAYOUT_FLAT_PLAIN, 513, 2));
        // Data blocks follow in nid order from the first block after the
        // inodes: "big", "full", "huge", "long", "e"... by name.
        let mut blocks: Vec<(u32, u64)> = plan
            .order
            .iter()
            .map(|&id| &plan.placed[id])
            .filter(|p| p.blocks > 0)
            .map(|p| (p.blkaddr, p.blocks))
            .collect();
        assert_eq!(blocks[0].0 as u64, plan.data_start);
        blocks.windows(2).for_each(|w| assert_eq!(w[0].0 as u64 + w[0].1, w[1].0 as u64));
        let last = blocks.pop().unwrap();
        assert_eq!((last.0 as u64 + last.1) * BLKSZ, plan.data_end);
    }
}
