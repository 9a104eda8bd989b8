//! The virtio block device (virtio 1.2 §5.2) over host files: read,
//! write, flush and get-id, nothing else.
//!
//! Every request comes from the guest and is checked before any I/O: the
//! descriptor chain must lie in guest memory (virtio-queue's Reader and
//! Writer check that), the header must be whole, the data a whole number
//! of sectors inside the disk. A bad request gets an error status (or, if
//! it has no room for one, an empty used entry), never a panic. The
//! backing ([`Backend`]: a file, or read-only ranges of several files) is
//! read and written with pread/pwrite at the request's offset: a large
//! read-only disk (the user's image archive) is never read whole.

use std::io::{Read, Write};
use std::path::PathBuf;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};

use super::super::memory::GuestMemory;
use crate::machine::backend::Backend;
use super::virtio_mmio::VirtioDevice;
use crate::machine::{Backing, DiskSpec};

/// Sector size of the virtio block protocol (§5.2.6: "sector" is always
/// 512 bytes, whatever blk_size says).
pub const SECTOR_SIZE: u64 = 512;
/// Descriptors per queue: Linux sizes its requests from this.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request (config `seg_max`): a queue's worth minus
/// the header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The request header: type (le32), reserved/ioprio (le32), sector (le64).
const HEADER_LEN: usize = 16;
/// I/O goes through a bounce buffer of at most this size, so a request
/// that claims gigabytes costs no more host memory than a small one.
const CHUNK: usize = 1 << 20;
const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Errors setting up a disk (the guest's own I/O errors go back to it as
/// a status byte).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open disk image {path}{}", if *read_only { " (read-only)" } else { " for writing" })]
    Open {
        path: PathBuf,
        read_only: bool,
        #[source]
        source: std::io::Error,
    },
    #[error("disk serial {serial:?} is longer than the {SERIAL_LEN} bytes virtio-blk can report")]
    SerialTooLong { serial: String },
}

/// One virtio-blk disk.
pub struct Block {
    disk: Backend,
    read_only: bool,
    /// Sectors; a trailing partial sector of the file is not part of the
    /// disk (QEMU rounds down the same way).
    capacity: u64,
    serial: [u8; SERIAL_LEN],
    queue_sizes: [u16; 1],
    /// The bounce buffer, kept across requests: allocating and zeroing a
    /// fresh one per request costs more than the copy it serves.
    bounce: Vec<u8>,
}

/// The status of one request and how many bytes went to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Done {
    status: u32,
    /// Bytes written into device-writable buffers, status byte excluded.
    written: usize,
}

impl Block {
    pub fn open(spec: &DiskSpec) -> Result<Block, Error> {
        if spec.serial.len() > SERIAL_LEN {
            return Err(Error::SerialTooLong { serial: spec.serial.clone() });
        }
        let read_only = spec.read_only || matches!(spec.backing, Backing::Concat { .. });
        let disk = Backend::open(&spec.backing, read_only).map_err(|(path, source)| Error::Open { path, read_only, source })?;
        let size = disk.size().map_err(|source| Error::Open { path: spec.backing.describe(), read_only, source })?;
        let mut serial = [0u8; SERIAL_LEN];
        serial[..spec.serial.len()].copy_from_slice(spec.serial.as_bytes());
        Ok(Block {
            disk,
            read_only,
            capacity: size / SECTOR_SIZE,
            serial,
            queue_sizes: [QUEUE_SIZE],
            bounce: Vec::new(),
        })
    }

    /// Disk size in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Configuration space (§5.2.4): capacity, size_max (0: none),
    /// seg_max.
    fn config(&self) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c
    }

    /// Byte offset of `len` bytes at `sector`, if they lie inside the disk
    /// and are whole sectors.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = len as u64;
        let end_sector = sector.checked_add(len / SECTOR_SIZE)?;
        // `then`, not `then_some`: the offset of a sector past the disk
        // may not fit a u64 (it overflowed, a panic with overflow checks).
        (len % SECTOR_SIZE == 0 && end_sector <= self.capacity).then(|| sector * SECTOR_SIZE)
    }

    /// Handles one request: the decision (which status) and the I/O.
    fn execute(&mut self, kind: u32, sector: u64, reader: &mut Reader<'_>, data: &mut Writer<'_>) -> Done {
        let fail = |status, written| Done { status, written };
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = data.available_bytes();
                let Some(mut offset) = self.range(sector, len) else { return fail(VIRTIO_BLK_S_IOERR, 0) };
                let buf = bounce(&mut self.bounce, len);
                while data.available_bytes() > 0 {
                    let n = data.available_bytes().min(CHUNK);
                    let chunk = &mut buf[..n];
                    if let Err(e) = self.disk.read_exact_at(chunk, offset) {
                        log::debug!("virtio-blk: read at {offset:#x}: {e}");
                        return fail(VIRTIO_BLK_S_IOERR, data.bytes_written());
                    }
                    if data.write_all(chunk).is_err() {
                        return fail(VIRTIO_BLK_S_IOERR, data.bytes_written());
                    }
                    offset += n as u64;
                }
                Done { status: VIRTIO_BLK_S_OK, written: data.bytes_written() }
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return fail(VIRTIO_BLK_S_IOERR, 0);
                }
                let len = reader.available_bytes();
                let Some(mut offset) = self.range(sector, len) else { return fail(VIRTIO_BLK_S_IOERR, 0) };
                let buf = bounce(&mut self.bounce, len);
                while reader.available_bytes() > 0 {
                    let n = reader.available_bytes().min(CHUNK);
                    let chunk = &mut buf[..n];
                    if reader.read_exact(chunk).is_err() {
                        return fail(VIRTIO_BLK_S_IOERR, 0);
                    }
                    if let Err(e) = self.disk.write_all_at(chunk, offset) {
                        log::debug!("virtio-blk: write at {offset:#x}: {e}");
                        return fail(VIRTIO_BLK_S_IOERR, 0);
                    }
                    offset += n as u64;
                }
                Done { status: VIRTIO_BLK_S_OK, written: 0 }
            }
            VIRTIO_BLK_T_FLUSH => {
                let ok = self.read_only || self.disk.sync_data().is_ok();
                Done { status: if ok { VIRTIO_BLK_S_OK } else { VIRTIO_BLK_S_IOERR }, written: 0 }
            }
            VIRTIO_BLK_T_GET_ID => {
                // §5.2.6.1: up to 20 bytes, NUL-padded (not terminated
                // when exactly 20); a smaller buffer gets what fits.
                let n = data.available_bytes().min(SERIAL_LEN);
                match data.write_all(&self.serial[..n]) {
                    Ok(()) => Done { status: VIRTIO_BLK_S_OK, written: n },
                    Err(_) => fail(VIRTIO_BLK_S_IOERR, data.bytes_written()),
                }
            }
            _ => fail(VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// Parses and answers one descriptor chain; returns the used length
    /// (§2.7.8: bytes written into the chain, status byte included).
    fn handle_chain(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) = (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) else {
            log::debug!("virtio-blk: descriptor chain outside guest memory");
            return 0;
        };
        // The status byte is the chain's last writable byte (§5.2.6).
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            log::debug!("virtio-blk: request without room for a status byte");
            return 0;
        };
        let Ok(mut status_writer) = writer.split_at(data_len) else { return 0 };
        let mut header = [0u8; HEADER_LEN];
        let done = match reader.read_exact(&mut header) {
            Ok(()) => {
                let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
                let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
                self.execute(kind, sector, &mut reader, &mut writer)
            }
            Err(_) => Done { status: VIRTIO_BLK_S_IOERR, written: 0 },
        };
        if status_writer.write_all(&[done.status as u8]).is_err() {
            return done.written as u32;
        }
        (done.written + 1) as u32
    }
}

/// The bounce buffer grown to hold `len` bytes (at most [`CHUNK`]).
fn bounce(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    let want = len.min(CHUNK);
    if buf.len() < want {
        buf.resize(want, 0);
    }
    &mut buf[..want]
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { 1 << VIRTIO_BLK_F_RO } else { 0 };
        (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | ro
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = self.handle_chain(chain, mem);
            if let Err(e) = queue.add_used(mem, head, len) {
                log::debug!("virtio-blk: cannot return descriptor {head}: {e}");
                break;
            }
            used = true;
        }
        used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    struct Disk {
        _file: tempfile::NamedTempFile,
        block: Block,
    }

    /// A disk of `sectors` sectors where byte i of sector s is (s + i) % 251.
    fn disk(sectors: u64, read_only: bool, serial: &str) -> Disk {
        let file = tempfile::NamedTempFile::new().unwrap();
        let bytes: Vec<u8> = (0..sectors * 512).map(|i| ((i / 512 + i % 512) % 251) as u8).collect();
        file.as_file().write_all_at(&bytes, 0).unwrap();
        let spec = DiskSpec { backing: Backing::File(file.path().to_path_buf()), read_only, serial: serial.into() };
        Disk { block: Block::open(&spec).unwrap(), _file: file }
    }

    fn expected_sector(s: u64) -> Vec<u8> {
        (0..512u64).map(|i| ((s + i) % 251) as u8).collect()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(mem: &GuestMemory, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    /// Runs one chain through the device; returns (used len, status byte).
    fn submit(block: &mut Block, mem: &GuestMemory, descs: &[RawDescriptor]) -> (u32, u8) {
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let vq = MockSplitQueue::new(mem, 16);
        let mut chained: Vec<RawDescriptor> = Vec::new();
        for (i, d) in descs.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let last = i + 1 == descs.len();
            let flags = if last { d.flags() } else { d.flags() | VRING_DESC_F_NEXT as u16 };
            chained.push(RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, i as u16 + 1)));
        }
        vq.add_desc_chains(&chained, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(block.process_queue(0, &mut q, mem));
        let used_len = mem.read_obj::<u32>(vq.used_addr().unchecked_add(4 + 4)).unwrap();
        (used_len, mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
    }

    fn mem() -> GuestMemory {
        super::super::super::memory::create(64).unwrap()
    }

    use vm_memory::Address;

    #[test]
    fn read_write_flush_get_id() {
        let m = mem();
        let mut d = disk(8, false, "runasroot-out");
        // Read sectors 2 and 3 into two buffers.
        header(&m, VIRTIO_BLK_T_IN, 2);
        let (len, status) = submit(
            &mut d.block,
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(DATA + 0x1000, 512, W), desc(STATUS, 1, W)],
        );
        assert_eq!((len, status), (1025, 0));
        let mut got = vec![0u8; 512];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, expected_sector(2));
        m.read_slice(&mut got, GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(got, expected_sector(3));

        // Write sector 7.
        m.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 7);
        assert_eq!(submit(&mut d.block, &m, &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)]), (1, 0));
        let mut on_disk = vec![0u8; 512];
        d.block.disk.read_exact_at(&mut on_disk, 7 * 512).unwrap();
        assert_eq!(on_disk, vec![0xab; 512]);

        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(submit(&mut d.block, &m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]), (1, 0));

        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(submit(&mut d.block, &m, &[desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)]), (21, 0));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"runasroot-out\0\0\0\0\0\0\0");
    }

    #[test]
    fn indirect_descriptor_tables_are_followed() {
        // Offered through VIRTIO_RING_F_INDIRECT_DESC, and what Linux uses
        // for requests of several segments.
        use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
        let m = mem();
        let mut d = disk(8, true, "ind");
        header(&m, VIRTIO_BLK_T_IN, 5);
        m.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        const TABLE: u64 = 0x40_0000;
        let next = VRING_DESC_F_NEXT as u16;
        let table = [
            SplitDescriptor::new(HDR, 16, next, 1),
            SplitDescriptor::new(DATA, 512, W | next, 2),
            SplitDescriptor::new(DATA + 0x1000, 512, W | next, 3),
            SplitDescriptor::new(STATUS, 1, W, 0),
        ];
        for (i, desc) in table.iter().enumerate() {
            m.write_obj(RawDescriptor::from(*desc), GuestAddress(TABLE + i as u64 * 16)).unwrap();
        }
        let vq = MockSplitQueue::new(&m, 16);
        let head = SplitDescriptor::new(TABLE, 4 * 16, VRING_DESC_F_INDIRECT as u16, 0);
        vq.desc_table().store(0, RawDescriptor::from(head)).unwrap();
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(d.block.process_queue(0, &mut q, &m));
        assert_eq!(m.read_obj::<u32>(vq.used_addr().unchecked_add(8)).unwrap(), 1025);
        assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
        let mut got = vec![0u8; 512];
        m.read_slice(&mut got, GuestAddress(DATA + 0x1000)).unwrap();
        assert_eq!(got, expected_sector(6));
    }

    #[test]
    fn config_space_and_features() {
        let d = disk(8, true, "x");
        let mut cfg = [0u8; 24];
        d.block.read_config(0, &mut cfg);
        assert_eq!(cfg, [8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 254, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut far = [0xffu8; 4];
        d.block.read_config(u64::MAX - 1, &mut far);
        assert_eq!(far, [0; 4]);
        assert_eq!(d.block.features(), (1 << 2) | (1 << 5) | (1 << 9) | (1 << 28));
        assert_eq!(disk(1, false, "y").block.features() & (1 << 5), 0);
    }

    #[test]
    fn bad_requests_get_an_error_status() {
        let m = mem();
        let mut rw = disk(8, false, "rw");
        let mut ro = disk(8, true, "ro");
        // (what, disk is read-only, header (type, sector) or None for a
        //  short header, descriptors, want (used len, status))
        type Case = (&'static str, bool, Option<(u32, u64)>, Vec<RawDescriptor>, (u32, u8));
        let cases: Vec<Case> = vec![
            (
                "read past the end",
                false,
                Some((VIRTIO_BLK_T_IN, 7)),
                vec![desc(HDR, 16, 0), desc(DATA, 1024, W), desc(STATUS, 1, W)],
                (1, 1),
            ),
            (
                "read starting past the end",
                false,
                Some((VIRTIO_BLK_T_IN, 8)),
                vec![desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
                (1, 1),
            ),
            (
                "sector overflows",
                false,
                Some((VIRTIO_BLK_T_IN, u64::MAX)),
                vec![desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
                (1, 1),
            ),
            (
                "partial sector",
                false,
                Some((VIRTIO_BLK_T_IN, 0)),
                vec![desc(HDR, 16, 0), desc(DATA, 100, W), desc(STATUS, 1, W)],
                (1, 1),
            ),
            (
                "write past the end",
                false,
                Some((VIRTIO_BLK_T_OUT, 8)),
                vec![desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
                (1, 1),
            ),
            (
                "write to a read-only disk",
                true,
                Some((VIRTIO_BLK_T_OUT, 0)),
                vec![desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
                (1, 1),
            ),
            ("unknown type", false, Some((99, 0)), vec![desc(HDR, 16, 0), desc(STATUS, 1, W)], (1, 2)),
            ("discard is not offered", false, Some((11, 0)), vec![desc(HDR, 16, 0), desc(STATUS, 1, W)], (1, 2)),
            ("short header", false, None, vec![desc(HDR, 8, 0), desc(STATUS, 1, W)], (1, 1)),
            (
                "header in a writable buffer",
                false,
                Some((VIRTIO_BLK_T_IN, 0)),
                vec![desc(HDR, 16, W), desc(STATUS, 1, W)],
                (1, 1),
            ),
            (
                "no status byte",
                false,
                Some((VIRTIO_BLK_T_IN, 0)),
                vec![desc(HDR, 16, 0), desc(DATA, 512, 0)],
                (0, 0xee),
            ),
            (
                "buffer outside guest memory",
                false,
                Some((VIRTIO_BLK_T_IN, 0)),
                vec![desc(HDR, 16, 0), desc(0xffff_0000_0000, 512, W), desc(STATUS, 1, W)],
                (0, 0xee),
            ),
            (
                "buffer crossing the end of memory",
                false,
                Some((VIRTIO_BLK_T_IN, 0)),
                vec![desc(HDR, 16, 0), desc((64 << 20) - 256, 512, W), desc(STATUS, 1, W)],
                (0, 0xee),
            ),
            (
                "huge claimed length",
                false,
                Some((VIRTIO_BLK_T_OUT, 0)),
                vec![desc(HDR, 16, 0), desc(DATA, u32::MAX, 0), desc(STATUS, 1, W)],
                (0, 0xee),
            ),
        ];
        for (what, read_only, hdr, descs, want) in cases {
            match hdr {
                Some((kind, sector)) => header(&m, kind, sector),
                None => header(&m, 0, 0),
            }
            let block = if read_only { &mut ro.block } else { &mut rw.block };
            assert_eq!(submit(block, &m, &descs), want, "{what}");
        }
        // Nothing was written by any of them.
        let mut all = vec![0u8; 8 * 512];
        rw.block.disk.read_exact_at(&mut all, 0).unwrap();
        assert_eq!(all, (0..8).flat_map(expected_sector).collect::<Vec<u8>>());
    }

    #[test]
    fn a_request_without_data_far_past_the_disk_is_refused_without_overflow() {
        // Found by the virtio_blk fuzz target: `range` computed the byte
        // offset of any sector, even one it refused, and u64::MAX / 4
        // sectors overflow (a panic where overflow checks are on: debug
        // builds, fuzzing).
        let d = disk(8, false, "x");
        assert_eq!(d.block.range(u64::MAX / 4, 0), None);
        assert_eq!(d.block.range(8, 0), Some(8 * 512));
        let m = mem();
        let mut d = d;
        header(&m, VIRTIO_BLK_T_IN, u64::MAX / 4);
        assert_eq!(submit(&mut d.block, &m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]), (1, 1));
    }

    #[test]
    fn reads_from_a_read_only_disk_work_and_a_short_id_buffer_gets_what_fits() {
        let m = mem();
        let mut ro = disk(2, true, "runasroot-layers-001");
        header(&m, VIRTIO_BLK_T_IN, 1);
        assert_eq!(submit(&mut ro.block, &m, &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)]), (513, 0));
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(submit(&mut ro.block, &m, &[desc(HDR, 16, 0), desc(DATA, 4, W), desc(STATUS, 1, W)]), (5, 0));
        let mut id = [0u8; 4];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"runa");
    }

    #[test]
    fn open_errors_name_the_path() {
        let spec = DiskSpec { backing: Backing::File("/nonexistent/disk.img".into()), read_only: true, serial: "x".into() };
        let err = Block::open(&spec).err().unwrap();
        assert_eq!(err.to_string(), "cannot open disk image /nonexistent/disk.img (read-only)");
        let long = DiskSpec { serial: "x".repeat(21), ..spec };
        assert!(matches!(Block::open(&long), Err(Error::SerialTooLong { .. })));
    }
}
