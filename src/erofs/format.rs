//! The EROFS on-disk format, as Linux 6.12 reads it: every constant the
//! writer and the decoder agree on, each named after its field or macro in
//! `fs/erofs/erofs_fs.h` (the ground truth; `super.c`, `inode.c`,
//! `data.c`, `dir.c`, `namei.c` and `xattr.c` say how they are read).
//!
//! Only constants live here. The writer and the decoder each encode and
//! parse the structures on their own, so that a mistake in one is caught
//! by the other instead of being shared.

/// `blkszbits`: our images use 512-byte blocks, because tar data starts on
/// 512-byte boundaries and chunk addresses are in blocks. Linux ≥ 6.4
/// mounts sub-page blocks for uncompressed data (`super.c` accepts
/// 9..=PAGE_SHIFT).
pub const BLKSZBITS: u8 = 9;
/// Bytes in one block.
pub const BLKSZ: u64 = 1 << BLKSZBITS;

/// `EROFS_SUPER_OFFSET`: the superblock starts 1 KiB in (room for a boot
/// sector, as in ext2).
pub const SUPER_OFFSET: u64 = 1024;
/// `EROFS_SUPER_MAGIC_V1`.
pub const SUPER_MAGIC: u32 = 0xe0f5_e1e2;
/// `sizeof(struct erofs_super_block)`, with `sb_extslots` = 0.
pub const SUPER_SIZE: u64 = 128;
/// `EROFS_DEVT_SLOT_SIZE`: one `struct erofs_deviceslot`.
pub const DEVT_SLOT_SIZE: u64 = 128;
/// Bytes of `erofs_deviceslot.tag`.
pub const DEVICE_TAG_LEN: usize = 64;

/// `EROFS_FEATURE_INCOMPAT_CHUNKED_FILE`: some inode is chunk-based.
pub const FEATURE_INCOMPAT_CHUNKED_FILE: u32 = 0x4;
/// `EROFS_FEATURE_INCOMPAT_DEVICE_TABLE`: `extra_devices` and
/// `devt_slotoff` are valid (`super.c` `erofs_scan_devices` ignores them
/// otherwise).
pub const FEATURE_INCOMPAT_DEVICE_TABLE: u32 = 0x8;

/// Inode slots are 32 bytes (`sbi->islotbits = ilog2(sizeof(struct
/// erofs_inode_compact))`): a nid is `(inode offset - meta_blkaddr * block
/// size) >> 5`, so every inode starts 32-byte aligned.
pub const ISLOTBITS: u8 = 5;
/// Bytes in one inode slot.
pub const ISLOT_SIZE: u64 = 1 << ISLOTBITS;
/// `sizeof(struct erofs_inode_compact)`.
pub const INODE_COMPACT_SIZE: u64 = 32;
/// `sizeof(struct erofs_inode_extended)`.
pub const INODE_EXTENDED_SIZE: u64 = 64;

/// `i_format` bit 0: `EROFS_INODE_LAYOUT_EXTENDED` (each inode has its own
/// mtime; a compact one takes the superblock's `build_time`).
pub const I_VERSION_EXTENDED: u16 = 1;
/// `EROFS_I_DATALAYOUT_BIT`: the data layout sits in bits 1..=3.
pub const I_DATALAYOUT_BIT: u16 = 1;
/// `EROFS_I_ALL`: no other `i_format` bit may be set.
pub const I_ALL: u16 = 0xf;

/// `EROFS_INODE_FLAT_PLAIN`: data in whole blocks from `raw_blkaddr`.
pub const LAYOUT_FLAT_PLAIN: u8 = 0;
/// `EROFS_INODE_FLAT_INLINE`: whole blocks from `raw_blkaddr`, then the
/// tail right after the inode and its xattrs, in the same block.
pub const LAYOUT_FLAT_INLINE: u8 = 2;
/// `EROFS_INODE_CHUNK_BASED`: a table of chunk indexes after the inode.
pub const LAYOUT_CHUNK_BASED: u8 = 4;

/// `EROFS_CHUNK_FORMAT_BLKBITS_MASK`: chunk size = block size << these bits.
pub const CHUNK_FORMAT_BLKBITS_MASK: u16 = 0x1f;
/// `EROFS_CHUNK_FORMAT_INDEXES`: 8-byte indexes with a device id, not a
/// bare 4-byte block map.
pub const CHUNK_FORMAT_INDEXES: u16 = 0x20;
/// `sizeof(struct erofs_inode_chunk_index)`; the table starts at the next
/// multiple of this after the inode and its xattrs (`data.c`
/// `erofs_map_blocks`: `ALIGN(iloc + inode_isize + xattr_isize, unit)`).
pub const CHUNK_INDEX_SIZE: u64 = 8;
/// `EROFS_NULL_ADDR`: a hole, or (in `raw_blkaddr`) no data blocks at all,
/// as mkfs.erofs writes it.
pub const NULL_ADDR: u32 = u32::MAX;

/// `sizeof(struct erofs_xattr_ibody_header)`.
pub const XATTR_IBODY_HEADER_SIZE: u64 = 12;
/// `sizeof(struct erofs_xattr_entry)`; entries are padded to a multiple of
/// it (`EROFS_XATTR_ALIGN`).
pub const XATTR_ENTRY_SIZE: u64 = 4;

/// `e_name_index` values and the name prefix each stands for (`xattr.h`
/// `erofs_xattr_prefix`, `xattr.c` `erofs_get_acl`). The two ACL indexes
/// stand for the whole name: their entries have an empty `e_name`.
pub const XATTR_INDEX_USER: u8 = 1;
pub const XATTR_INDEX_POSIX_ACL_ACCESS: u8 = 2;
pub const XATTR_INDEX_POSIX_ACL_DEFAULT: u8 = 3;
pub const XATTR_INDEX_TRUSTED: u8 = 4;
pub const XATTR_INDEX_SECURITY: u8 = 6;

/// Prefixes whose rest is stored as `e_name`.
pub const XATTR_PREFIXES: [(&[u8], u8); 3] =
    [(b"user.", XATTR_INDEX_USER), (b"trusted.", XATTR_INDEX_TRUSTED), (b"security.", XATTR_INDEX_SECURITY)];
/// Whole names stored as an index alone.
pub const XATTR_WHOLE_NAMES: [(&[u8], u8); 2] = [
    (b"system.posix_acl_access", XATTR_INDEX_POSIX_ACL_ACCESS),
    (b"system.posix_acl_default", XATTR_INDEX_POSIX_ACL_DEFAULT),
];

/// `sizeof(struct erofs_dirent)`: nid (8), nameoff (2), file_type, reserved.
pub const DIRENT_SIZE: u64 = 12;
/// `EROFS_NAME_LEN`.
pub const NAME_LEN: usize = 255;

/// `file_type` of a dirent: the kernel's `FT_*` values (`fs_types.h`).
pub const FT_REG_FILE: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHRDEV: u8 = 3;
pub const FT_BLKDEV: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_SYMLINK: u8 = 7;

/// `i_mode` file type bits (`stat.h`).
pub const S_IFMT: u16 = 0o170000;
pub const S_IFIFO: u16 = 0o010000;
pub const S_IFCHR: u16 = 0o020000;
pub const S_IFDIR: u16 = 0o040000;
pub const S_IFBLK: u16 = 0o060000;
pub const S_IFREG: u16 = 0o100000;
pub const S_IFLNK: u16 = 0o120000;

/// Where the flat layout starts each extra device: a page boundary, so the
/// concatenation can be served as one disk whose parts stay page-aligned.
pub const FLAT_DEVICE_ALIGN: u64 = 4096;
