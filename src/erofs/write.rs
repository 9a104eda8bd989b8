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

#[cfg(test)]
mod tests {
    use super::super::format::{LAYOUT_FLAT_PLAIN, NULL_ADDR};
    use super::super::tests::{meta, write_vec, Build};
    use super::super::Written;
    use super::*;

    /// Bytes from hex; whitespace and `|` separate fields, `#` starts a
    /// comment to the end of the line.
    pub(crate) fn hex(s: &str) -> Vec<u8> {
        let digits: Vec<u8> =
            s.lines().flat_map(|line| line.split('#').next().unwrap().bytes()).filter(u8::is_ascii_hexdigit).collect();
        assert_eq!(digits.len() % 2, 0, "odd number of hex digits");
        digits.chunks(2).map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap()).collect()
    }

    /// Equal bytes, or a panic naming the first difference.
    pub(crate) fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
        if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
            let window = |b: &[u8]| format!("{:02x?}", &b[at..(at + 16).min(b.len())]);
            panic!("{what}: first difference at byte {at}: got {} want {}", window(got), window(want));
        }
        assert_eq!(got.len(), want.len(), "{what}: length");
    }

    fn put(image: &mut [u8], at: usize, bytes: &[u8]) {
        image[at..at + bytes.len()].copy_from_slice(bytes);
    }

    #[test]
    fn a_root_alone_is_this_whole_image() {
        let (image, written) = write_vec(&Build::new().tree, &[], &[]).unwrap();
        let mut want = vec![0u8; 4096];
        #[rustfmt::skip]
        put(&mut want, 1024, &hex("
            e2e1f5e0 | 00000000 | 00000000 | 09 | 00 | 2400  # magic, checksum, compat, blkszbits, extslots, root nid 36
            0100000000000000 | 0000000000000000 | 00000000  # inos 1, build_time, build_time_nsec
            08000000 | 00000000 | 00000000  # blocks 8, meta_blkaddr, xattr_blkaddr
            00000000000000000000000000000000  # uuid
            00000000000000000000000000000000  # volume_name
            00000000 | 0000 | 0000 | 0000 | 00 | 00 | 00000000  # incompat, compr, extra devices, devt_slotoff, dirblkbits, prefixes
            0000000000000000 | 00  # packed_nid, xattr_filter_reserved
            0000000000000000000000000000000000000000000000  # reserved2
        "));
        #[rustfmt::skip]
        put(&mut want, 1152, &hex("
            0500 | 0000 | ed41 | 0000 | 1b00000000000000  # extended + FLAT_INLINE, no xattrs, dir 0755, size 27
            ffffffff | 01000000 | 00000000 | 00000000  # raw_blkaddr NULL (all inline), ino 1, uid, gid
            0000000000000000 | 00000000 | 02000000  # mtime, nsec, nlink 2
            00000000000000000000000000000000
            2400000000000000 | 1800 | 02 | 00  # `.`: nid 36, nameoff 24, FT_DIR
            2400000000000000 | 1900 | 02 | 00  # `..`: the root's parent is itself
            2e | 2e2e
        "));
        assert_bytes(&image, &want, "image");
        let expect = Written {
            len: 4096,
            device_starts: vec![],
            inodes: 1,
            metadata_bytes: 1536,
            dir_blocks: 0,
            data_blocks: 0,
        };
        assert_eq!(written, expect);
    }

    #[test]
    fn a_file_on_the_second_device_is_this_whole_image() {
        let mut b = Build::new();
        b.add(0, b"f", Kind::File { size: 1000, data: Data::Device { device: 1, offset: 1024 } }, meta(0o644));
        let devices = [Device { blocks: 10, tag: "a".into() }, Device { blocks: 5, tag: "b".into() }];
        let (image, written) = write_vec(&b.tree, &devices, &[]).unwrap();
        let mut want = vec![0u8; 4096];
        #[rustfmt::skip]
        put(&mut want, 1024, &hex("
            e2e1f5e0 | 00000000 | 00000000 | 09 | 00 | 2c00  # root nid 44 (after two device slots)
            0200000000000000 | 0000000000000000 | 00000000  # inos 2
            08000000 | 00000000 | 00000000  # blocks 8
            00000000000000000000000000000000
            00000000000000000000000000000000
            0c000000 | 0000 | 0200 | 0900 | 00 | 00 | 00000000  # CHUNKED_FILE | DEVICE_TABLE, 2 devices, slots at 9 * 128
            0000000000000000 | 00
            0000000000000000000000000000000000000000000000
        "));
        let mut slot = |at: usize, tag: u8, blocks: &str, mapped: &str| {
            want[at] = tag;
            put(&mut want, at + 64, &hex(blocks));
            put(&mut want, at + 68, &hex(mapped));
        };
        slot(1152, b'a', "0a000000", "08000000"); // 10 blocks, flat at 4096
        slot(1280, b'b', "05000000", "18000000"); // 5 blocks, flat at 4096 + 8 KiB (the next 4 KiB boundary)
        #[rustfmt::skip]
        put(&mut want, 1408, &hex("
            0500 | 0000 | ed41 | 0000 | 2800000000000000  # the root, size 40
            ffffffff | 01000000 | 00000000 | 00000000
            0000000000000000 | 00000000 | 02000000
            00000000000000000000000000000000
            2c00000000000000 | 2400 | 02 | 00
            2c00000000000000 | 2500 | 02 | 00
            3000000000000000 | 2700 | 01 | 00  # `f`: nid 48, FT_REG_FILE
            2e | 2e2e | 66
        "));
        #[rustfmt::skip]
        put(&mut want, 1536, &hex("
            0900 | 0000 | a481 | 0000 | e803000000000000  # extended + CHUNK_BASED, file 0644, size 1000
            21000000 | 02000000 | 00000000 | 00000000  # INDEXES | chunk = 512 << 1, ino 2
            0000000000000000 | 00000000 | 01000000
            00000000000000000000000000000000
            0000 | 0200 | 02000000  # one chunk: device id 2 (index 1 + 1), block 2
        "));
        assert_bytes(&image, &want, "image");
        assert_eq!(written.device_starts, [4096, 12288]);
    }

    #[test]
    fn inodes_encode_each_kind() {
        let placed = |layout, size, blkaddr, chunk_blkbits, xattr_isize| Placed {
            nid: 99,
            nlink: 3,
            layout,
            xattr_isize,
            size,
            blkaddr,
            blocks: 0,
            chunk_blkbits,
        };
        let owned = Meta {
            mode: 0o4755,
            uid: 0x1234_5678,
            gid: 0x9abc_def0,
            mtime: 1 << 33,
            mtime_nsec: 999_999_999,
            xattrs: vec![],
        };
        let embedded = Kind::File { size: 5, data: Data::Embedded { source: 0, offset: 0 } };
        let on_device = Kind::File { size: 5, data: Data::Device { device: 0, offset: 0 } };
        #[rustfmt::skip]
        let cases: Vec<(&str, Placed, Kind, &str)> = vec![
            ("dir with xattrs", placed(LAYOUT_FLAT_PLAIN, 600, 7, 0, 72), Kind::Dir(vec![]),
             "0100 | 1000 | ed49 | 0000 | 5802000000000000 | 07000000"),
            ("chunked file", placed(LAYOUT_CHUNK_BASED, 5, NULL_ADDR, 31, 0), on_device,
             "0900 | 0000 | ed89 | 0000 | 0500000000000000 | 3f000000"),
            ("embedded file", placed(LAYOUT_FLAT_PLAIN, 5, 12, 0, 0), embedded,
             "0100 | 0000 | ed89 | 0000 | 0500000000000000 | 0c000000"),
            ("inline symlink", placed(LAYOUT_FLAT_INLINE, 3, NULL_ADDR, 0, 0), Kind::Symlink(b"abc".to_vec()),
             "0500 | 0000 | eda9 | 0000 | 0300000000000000 | ffffffff"),
            ("char device", placed(LAYOUT_FLAT_PLAIN, 0, NULL_ADDR, 0, 0), Kind::Char { major: 136, minor: 0x12345 },
             "0100 | 0000 | ed29 | 0000 | 0000000000000000 | 45883012"),
            ("block device", placed(LAYOUT_FLAT_PLAIN, 0, NULL_ADDR, 0, 0), Kind::Block { major: 8, minor: 1 },
             "0100 | 0000 | ed69 | 0000 | 0000000000000000 | 01080000"),
            ("fifo", placed(LAYOUT_FLAT_PLAIN, 0, NULL_ADDR, 0, 0), Kind::Fifo,
             "0100 | 0000 | ed19 | 0000 | 0000000000000000 | 00000000"),
        ];
        // ino 7, uid, gid, mtime 2^33, nsec 999999999, nlink 3, reserved.
        let tail = hex("07000000 | 78563412 | f0debc9a | 0000000002000000 | ffc99a3b | 03000000");
        for (what, placed, kind, head) in cases {
            let mut want = hex(head);
            want.extend_from_slice(&tail);
            want.resize(64, 0);
            assert_eq!(inode(&placed, &kind, &owned, 7).to_vec(), want, "{what}");
        }
    }

    #[test]
    fn device_numbers_encode_as_new_encode_dev() {
        // kdev_t.h: (minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12).
        let cases = [
            ((0, 0), 0),
            ((1, 3), 0x103),
            ((8, 17), 0x811),
            ((259, 0x10005), 0x1001_0305),
            ((4095, 0xfffff), 0xffff_ffff),
            ((0, 0x100), 0x10_0000),
        ];
        for ((major, minor), dev) in cases {
            assert_eq!(encode_dev(major, minor), dev, "{major}:{minor}");
        }
    }

    #[test]
    fn xattrs_of_every_index_sort_and_pad() {
        let mut m = meta(0o644);
        m.xattrs = vec![
            (b"user.b".to_vec(), b"1".to_vec()),
            (b"system.posix_acl_default".to_vec(), vec![2, 0, 0, 0]),
            (b"trusted.t".to_vec(), vec![]),
            (b"security.capability".to_vec(), b"cap".to_vec()),
            (b"system.posix_acl_access".to_vec(), vec![2, 0, 0, 0]),
            (b"user.a".to_vec(), b"xy".to_vec()),
        ];
        #[rustfmt::skip]
        let want = hex("
            00000000 | 00 | 00000000000000  # no name filter, no shared xattrs
            01 | 01 | 0200 | 61 | 7879 | 00  # user. a = xy, padded to 8
            01 | 01 | 0100 | 62 | 31 | 0000  # user. b = 1
            00 | 02 | 0400 | 02000000  # system.posix_acl_access: index 2, no name
            00 | 03 | 0400 | 02000000  # system.posix_acl_default: index 3
            01 | 04 | 0000 | 74 | 000000  # trusted. t = (empty)
            0a | 06 | 0300 | 6361706162696c697479 | 636170 | 000000  # security. capability = cap, padded to 20
        ");
        assert_eq!(xattr_ibody(&m), want);
        assert_eq!(xattr_ibody(&meta(0)), Vec::<u8>::new());
    }

    #[test]
    fn chunk_indexes_cover_the_file_contiguously() {
        #[rustfmt::skip]
        let cases: Vec<(usize, u64, u64, u8, &str)> = vec![
            (0, 0, 1, 0, "0000 0100 00000000"),
            (0, 7, 512, 0, "0000 0100 07000000"),
            (2, 7, 513, 1, "0000 0300 07000000"),
            // Two chunks of 2^31 blocks: the largest chunk, then the rest.
            (1, 1, (1 << 40) + 1, 31, "0000 0200 01000000 | 0000 0200 01000080"),
            (0, 5, 3 * 512, 1, "0000 0100 05000000 | 0000 0100 07000000"),
        ];
        for (device, start, size, bits, want) in cases {
            assert_eq!(chunk_indexes(device, start, size, bits), hex(want), "{device} {start} {size} {bits}");
        }
    }

    #[test]
    fn dirents_fill_blocks_and_never_split_a_name() {
        let name = |c: u8, len: usize| vec![c; len];
        // Four 100-byte names take 4 * 112 = 448 bytes; a fifth starts a
        // new block, the first zero-padded to 512.
        let names: Vec<Vec<u8>> = (0..5).map(|i| name(b'a' + i, 100)).collect();
        let entries: Vec<(&[u8], u64, u8)> =
            names.iter().enumerate().map(|(i, n)| (n.as_slice(), i as u64, 1)).collect();
        let mut want = Vec::new();
        for (i, off) in [48u16, 148, 248, 348].iter().enumerate() {
            want.extend_from_slice(&(i as u64).to_le_bytes());
            want.extend_from_slice(&off.to_le_bytes());
            want.extend_from_slice(&[1, 0]);
        }
        for n in &names[..4] {
            want.extend_from_slice(n);
        }
        want.resize(512, 0);
        want.extend_from_slice(&hex("0400000000000000 | 0c00 | 01 | 00"));
        want.extend_from_slice(&names[4]);
        assert_eq!(dirents(&entries), want);

        // Sixteen 20-byte names fill a block exactly (16 * 32 = 512): no
        // padding, the next name opens block 2.
        let names: Vec<Vec<u8>> = (0..17).map(|i| name(b'A' + i, 20)).collect();
        let entries: Vec<(&[u8], u64, u8)> = names.iter().map(|n| (n.as_slice(), 9, 2)).collect();
        let bytes = dirents(&entries);
        assert_eq!(bytes.len(), 512 + 12 + 20);
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 16 * 12);
        assert_eq!(&bytes[512 - 20..512], &names[15][..]);
        assert_eq!(u16::from_le_bytes([bytes[520], bytes[521]]), 12);
        assert_eq!(&bytes[524..], &names[16][..]);
    }
}
