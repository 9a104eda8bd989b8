//! Emitting the image [`layout`](super::layout) decided, front to back:
//! the encoders of each on-disk structure are pure functions (tested byte
//! for byte below); [`emit`] puts them in place.

use std::io::{self, BufWriter, Write};

use super::format::{
    BLKSZ, BLKSZBITS, CHUNK_FORMAT_INDEXES, CHUNK_INDEX_SIZE, DEVICE_TAG_LEN, DEVT_SLOT_SIZE, DIRENT_SIZE,
    FEATURE_INCOMPAT_CHUNKED_FILE, FEATURE_INCOMPAT_DEVICE_TABLE, FT_BLKDEV, FT_CHRDEV, FT_DIR, FT_FIFO, FT_REG_FILE,
    FT_SYMLINK, ISLOTBITS, I_DATALAYOUT_BIT, I_VERSION_EXTENDED, LAYOUT_CHUNK_BASED, LAYOUT_FLAT_INLINE, SUPER_MAGIC,
    SUPER_OFFSET, S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG, XATTR_ENTRY_SIZE, XATTR_IBODY_HEADER_SIZE,
};
use super::layout::{path_of, sorted_entries, xattr_entry_size, xattr_index, DirPacker, Placed, Plan, Target};
use super::{Data, DataSource, Device, Error, InodeId, Kind, Meta, Tree};

/// `S_IF*` and `FT_*` of a kind.
fn file_type(kind: &Kind) -> (u16, u8) {
    match kind {
        Kind::Dir(_) => (S_IFDIR, FT_DIR),
        Kind::File { .. } => (S_IFREG, FT_REG_FILE),
        Kind::Symlink(_) => (S_IFLNK, FT_SYMLINK),
        Kind::Char { .. } => (S_IFCHR, FT_CHRDEV),
        Kind::Block { .. } => (S_IFBLK, FT_BLKDEV),
        Kind::Fifo => (S_IFIFO, FT_FIFO),
    }
}

/// Linux's `new_encode_dev` (`kdev_t.h`): minor's low byte, major, then
/// minor's upper 12 bits; `inode.c` reads it back with `new_decode_dev`.
pub(super) fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// `struct erofs_super_block`, field by field.
pub(super) fn superblock(plan: &Plan, tree: &Tree, devices: &[Device]) -> [u8; 128] {
    let mut incompat = 0;
    if plan.chunked {
        incompat |= FEATURE_INCOMPAT_CHUNKED_FILE;
    }
    // Slots follow the superblock; `devt_slotoff` counts 128-byte slots
    // from the start of the image.
    let (extra_devices, devt_slotoff) = if devices.is_empty() {
        (0u16, 0u16)
    } else {
        incompat |= FEATURE_INCOMPAT_DEVICE_TABLE;
        (devices.len() as u16, ((SUPER_OFFSET + 128) / DEVT_SLOT_SIZE) as u16)
    };
    let root_nid = plan.placed[tree.root].nid;
    let mut b = Vec::with_capacity(128);
    b.extend_from_slice(&SUPER_MAGIC.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // checksum: no COMPAT_SB_CHKSUM
    b.extend_from_slice(&0u32.to_le_bytes()); // feature_compat: none, no xattr filter
    b.push(BLKSZBITS);
    b.push(0); // sb_extslots
    b.extend_from_slice(&(root_nid as u16).to_le_bytes());
    b.extend_from_slice(&(plan.order.len() as u64).to_le_bytes()); // inos
    b.extend_from_slice(&0u64.to_le_bytes()); // build_time: unused by extended inodes
    b.extend_from_slice(&0u32.to_le_bytes()); // build_time_nsec
    b.extend_from_slice(&((plan.len / BLKSZ) as u32).to_le_bytes()); // blocks
    b.extend_from_slice(&0u32.to_le_bytes()); // meta_blkaddr: nid = byte offset / 32
    b.extend_from_slice(&0u32.to_le_bytes()); // xattr_blkaddr: no shared xattrs
    b.extend_from_slice(&[0; 16]); // uuid: zero, for reproducible images
    b.extend_from_slice(&[0; 16]); // volume_name
    b.extend_from_slice(&incompat.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes()); // available_compr_algs
    b.extend_from_slice(&extra_devices.to_le_bytes());
    b.extend_from_slice(&devt_slotoff.to_le_bytes());
    b.push(0); // dirblkbits: must be 0 (`erofs_read_superblock`)
    b.push(0); // xattr_prefix_count
    b.extend_from_slice(&0u32.to_le_bytes()); // xattr_prefix_start
    b.extend_from_slice(&0u64.to_le_bytes()); // packed_nid
    b.push(0); // xattr_filter_reserved
    b.extend_from_slice(&[0; 23]);
    b.try_into().expect("the superblock is 128 bytes")
}

/// `struct erofs_deviceslot`: the device's length and where the flat
/// layout maps it (`data.c` `erofs_map_dev` adds it when there is no
/// `device=` option).
pub(super) fn device_slot(device: &Device, start: u64) -> [u8; 128] {
    let mut b = [0u8; 128];
    b[..device.tag.len()].copy_from_slice(device.tag.as_bytes());
    b[DEVICE_TAG_LEN..DEVICE_TAG_LEN + 4].copy_from_slice(&(device.blocks as u32).to_le_bytes());
    b[DEVICE_TAG_LEN + 4..DEVICE_TAG_LEN + 8].copy_from_slice(&((start / BLKSZ) as u32).to_le_bytes());
    b
}

/// `struct erofs_inode_extended`. `ino` is only for 32-bit `stat` (the
/// kernel's inode number is the nid).
pub(super) fn inode(placed: &Placed, kind: &Kind, meta: &Meta, ino: u32) -> [u8; 64] {
    let (ifmt, _) = file_type(kind);
    let format = I_VERSION_EXTENDED | u16::from(placed.layout) << I_DATALAYOUT_BIT;
    let icount = if placed.xattr_isize == 0 { 0 } else { 1 + (placed.xattr_isize - XATTR_IBODY_HEADER_SIZE) / 4 };
    let i_u = match kind {
        Kind::Char { major, minor } | Kind::Block { major, minor } => encode_dev(*major, *minor),
        Kind::Fifo => 0,
        _ if placed.layout == LAYOUT_CHUNK_BASED => u32::from(CHUNK_FORMAT_INDEXES | u16::from(placed.chunk_blkbits)),
        _ => placed.blkaddr,
    };
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&format.to_le_bytes());
    b.extend_from_slice(&(icount as u16).to_le_bytes());
    b.extend_from_slice(&(ifmt | meta.mode as u16).to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes()); // i_reserved
    b.extend_from_slice(&placed.size.to_le_bytes());
    b.extend_from_slice(&i_u.to_le_bytes());
    b.extend_from_slice(&ino.to_le_bytes());
    b.extend_from_slice(&meta.uid.to_le_bytes());
    b.extend_from_slice(&meta.gid.to_le_bytes());
    b.extend_from_slice(&meta.mtime.to_le_bytes());
    b.extend_from_slice(&meta.mtime_nsec.to_le_bytes());
    b.extend_from_slice(&placed.nlink.to_le_bytes());
    b.extend_from_slice(&[0; 16]);
    b.try_into().expect("the extended inode is 64 bytes")
}

/// The xattr ibody: `erofs_xattr_ibody_header` (no name filter, no shared
/// xattrs), then each entry padded to 4, sorted by (index, name) so that
/// the order of `meta.xattrs` does not change the image. `layout` checked
/// every name.
pub(super) fn xattr_ibody(meta: &Meta) -> Vec<u8> {
    if meta.xattrs.is_empty() {
        return Vec::new();
    }
    let mut entries: Vec<(u8, &[u8], &[u8])> = meta
        .xattrs
        .iter()
        .filter_map(|(name, value)| xattr_index(name).map(|(index, rest)| (index, rest, value.as_slice())))
        .collect();
    entries.sort_unstable();
    // h_name_filter 0: without COMPAT_XATTR_FILTER in the superblock
    // `erofs_getxattr` never reads it.
    let mut b = vec![0u8; XATTR_IBODY_HEADER_SIZE as usize];
    for (index, rest, value) in entries {
        let start = b.len();
        b.push(rest.len() as u8);
        b.push(index);
        b.extend_from_slice(&(value.len() as u16).to_le_bytes());
        b.extend_from_slice(rest);
        b.extend_from_slice(value);
        b.resize(start + xattr_entry_size(rest.len(), value.len()) as usize, 0);
    }
    debug_assert_eq!(b.len() % XATTR_ENTRY_SIZE as usize, 0);
    b
}

/// `struct erofs_inode_chunk_index` for each chunk of a file of `size`
/// bytes at block `start` of device `device`: one chunk per block <<
/// `blkbits` bytes, contiguous on the device. Device ids count from 1 (0
/// is the image itself).
pub(super) fn chunk_indexes(device: usize, start: u64, size: u64, blkbits: u8) -> Vec<u8> {
    let per_chunk = 1u64 << blkbits;
    let chunks = size.div_ceil(BLKSZ << blkbits);
    let mut b = Vec::with_capacity((chunks * CHUNK_INDEX_SIZE) as usize);
    for chunk in 0..chunks {
        b.extend_from_slice(&0u16.to_le_bytes()); // advise
        b.extend_from_slice(&(device as u16 + 1).to_le_bytes());
        b.extend_from_slice(&((start + chunk * per_chunk) as u32).to_le_bytes());
    }
    b
}

/// A directory's dirent blocks: in each block the 12-byte dirents, then
/// their names; `nameoff` of the first dirent is the count × 12
/// (`dir.c`); every block but the last is zero-padded to 512 bytes, so a
/// block's last name ends at a NUL or at the block's end, and the last
/// block ends at `i_size`, with its last name.
pub(super) fn dirents(entries: &[(&[u8], u64, u8)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut packer = DirPacker::default();
    let mut block_start = 0;
    for (i, (name, _, _)) in entries.iter().enumerate() {
        if packer.push(name.len()) {
            dirent_block(&entries[block_start..i], &mut out);
            out.resize(out.len().next_multiple_of(BLKSZ as usize), 0);
            block_start = i;
        }
    }
    dirent_block(&entries[block_start..], &mut out);
    debug_assert_eq!(out.len() as u64, packer.size());
    out
}

fn dirent_block(entries: &[(&[u8], u64, u8)], out: &mut Vec<u8>) {
    let mut nameoff = entries.len() as u64 * DIRENT_SIZE;
    for (name, nid, file_type) in entries {
        out.extend_from_slice(&nid.to_le_bytes());
        out.extend_from_slice(&(nameoff as u16).to_le_bytes());
        out.push(*file_type);
        out.push(0);
        nameoff += name.len() as u64;
    }
    for (name, _, _) in entries {
        out.extend_from_slice(name);
    }
}

/// The dirent bytes of directory `dir` (all of `i_size`).
fn dir_bytes(tree: &Tree, plan: &Plan, dir: InodeId) -> Vec<u8> {
    let Kind::Dir(children) = &tree.inodes[dir].kind else { return Vec::new() };
    let parent = plan.parents[dir].map_or(dir, |p| p.dir);
    let entries: Vec<(&[u8], u64, u8)> = sorted_entries(children)
        .into_iter()
        .map(|(name, target)| {
            let id = match target {
                Target::Itself => dir,
                Target::Parent => parent,
                Target::Child { id, .. } => id,
            };
            (name, plan.placed[id].nid, file_type(&tree.inodes[id].kind).1)
        })
        .collect();
    dirents(&entries)
}

/// The output, with the position every offset in the plan is relative to.
struct Out<'a> {
    w: BufWriter<&'a mut dyn Write>,
    pos: u64,
}

const ZEROS: [u8; 4096] = [0; 4096];

impl Out<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.w.write_all(bytes).map_err(|source| Error::Write { offset: self.pos, source })?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Zeros up to `pos`. The plan never places two things at one
    /// offset; a step back would be a bug that corrupts the image.
    fn zeros_to(&mut self, pos: u64) -> Result<(), Error> {
        assert!(pos >= self.pos, "EROFS layout overlap: at byte {} but asked to write at {pos}", self.pos);
        while self.pos < pos {
            let n = (pos - self.pos).min(ZEROS.len() as u64) as usize;
            self.put(&ZEROS[..n])?;
        }
        Ok(())
    }
}

/// Takes at most `len` bytes from a [`DataSource`] into the image and
/// counts what it was given.
struct Counted<'a, 'b> {
    out: &'a mut Out<'b>,
    len: u64,
    got: u64,
    write_failed: bool,
}

impl Write for Counted<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.len.saturating_sub(self.got).min(buf.len() as u64) as usize;
        self.got += buf.len() as u64;
        if let Err(err) = self.out.w.write_all(&buf[..room]) {
            self.write_failed = true;
            return Err(err);
        }
        self.out.pos += room as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the image `plan` describes.
pub(super) fn emit(
    tree: &Tree,
    devices: &[Device],
    plan: &Plan,
    data: &mut dyn DataSource,
    out: &mut dyn Write,
) -> Result<(), Error> {
    let mut out = Out { w: BufWriter::with_capacity(1 << 16, out), pos: 0 };
    out.zeros_to(SUPER_OFFSET)?;
    out.put(&superblock(plan, tree, devices))?;
    for (device, start) in devices.iter().zip(&plan.device_starts) {
        out.put(&device_slot(device, *start))?;
    }
    debug_assert_eq!(out.pos, plan.inodes_start);
    for (index, &id) in plan.order.iter().enumerate() {
        let (p, node) = (&plan.placed[id], &tree.inodes[id]);
        out.zeros_to(p.nid << ISLOTBITS)?;
        out.put(&inode(p, &node.kind, &node.meta, index as u32 + 1))?;
        out.put(&xattr_ibody(&node.meta))?;
        match &node.kind {
            Kind::File { size, data: Data::Device { device, offset } } if p.layout == LAYOUT_CHUNK_BASED => {
                out.zeros_to(out.pos.next_multiple_of(CHUNK_INDEX_SIZE))?;
                out.put(&chunk_indexes(*device, offset / BLKSZ, *size, p.chunk_blkbits))?;
            }
            Kind::Dir(_) if p.layout == LAYOUT_FLAT_INLINE => {
                let bytes = dir_bytes(tree, plan, id);
                out.put(&bytes[(p.blocks * BLKSZ) as usize..])?;
            }
            Kind::Symlink(target) if p.layout == LAYOUT_FLAT_INLINE => out.put(target)?,
            _ => {}
        }
    }
    debug_assert!(out.pos <= plan.inodes_end);
    out.zeros_to(plan.data_start * BLKSZ)?;
    for &id in &plan.order {
        let (p, node) = (&plan.placed[id], &tree.inodes[id]);
        if p.blocks == 0 {
            continue;
        }
        out.zeros_to(u64::from(p.blkaddr) * BLKSZ)?;
        match &node.kind {
            Kind::Dir(_) => {
                let bytes = dir_bytes(tree, plan, id);
                let whole = bytes.len().min((p.blocks * BLKSZ) as usize);
                out.put(&bytes[..whole])?;
            }
            Kind::Symlink(target) => out.put(target)?,
            Kind::File { size, data: Data::Embedded { source, offset } } => {
                copy_embedded(&mut out, data, *source, *offset, *size, || path_of(tree, &plan.parents, id))?;
            }
            _ => unreachable!("only directories, symlinks and embedded files have data blocks"),
        }
        out.zeros_to(u64::from(p.blkaddr) * BLKSZ + p.blocks * BLKSZ)?;
    }
    debug_assert_eq!(out.pos, plan.data_end);
    out.zeros_to(plan.len)?;
    let pos = out.pos;
    out.w.flush().map_err(|source| Error::Write { offset: pos, source })
}

fn copy_embedded(
    out: &mut Out,
    data: &mut dyn DataSource,
    source: u32,
    offset: u64,
    len: u64,
    path: impl Fn() -> String,
) -> Result<(), Error> {
    let mut counted = Counted { out, len, got: 0, write_failed: false };
    let result = data.copy_to(source, offset, len, &mut counted);
    let (got, write_failed) = (counted.got, counted.write_failed);
    match result {
        Err(source) if write_failed => Err(Error::Write { offset: out.pos, source }),
        Err(err) => Err(Error::ReadEmbedded { path: path(), source_id: source, offset, len, source: err }),
        Ok(()) if got != len => Err(Error::EmbeddedLength { path: path(), source_id: source, offset, len, got }),
        Ok(()) => Ok(()),
    }
}
