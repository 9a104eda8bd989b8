//! The guest's side of the built-in VMM's disks: register accesses
//! through the virtio-mmio transport and whatever the guest puts in its
//! memory (rings, descriptor tables, indirect tables, request headers),
//! into the virtio-blk device over a real host file. The guest is hostile
//! (it runs a root script on a kernel it can attack).
//!
//! Input: the guest memory size and first bytes, the disk (sectors,
//! read-only or not, serial), then operations: a driver's whole setup
//! with queue addresses from the input, raw register writes and reads,
//! memory pokes, a request chain written onto the rings (descriptors,
//! header, flags and lengths from the input), a notify.
//!
//! Checked: no panic, no hang; a read-only disk's file is unchanged and
//! no disk file ever grows.

use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use runasroot::machine::kvm::bus::BusDevice;
use runasroot::machine::kvm::devices::virtio_blk::Block;
use runasroot::machine::kvm::devices::virtio_mmio::VirtioMmio;
use runasroot::machine::kvm::devices::Interrupt;
use runasroot::machine::kvm::memory::GuestMemory;
use runasroot::machine::{Backing, DiskSpec};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

use super::Input;

struct NoIrq;

impl Interrupt for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where the driver put queue 0, as far as the harness knows.
#[derive(Default)]
struct Rings {
    desc: u64,
    avail: u64,
    size: u16,
    next_avail: u16,
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem_size = (16 + input.below(240) as usize) << 12;
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), mem_size)]).expect("guest memory");
    let init = input.string(4096);
    mem.write_slice(&init, GuestAddress(0)).expect("the start of memory");
    let mem = Arc::new(mem);

    let sectors = input.below(16);
    let read_only = input.bool();
    let serial = if input.below(16) == 0 { String::from_utf8_lossy(&input.string(24)).into_owned() } else { "rar-fuzz".into() };
    let mut file = tempfile::NamedTempFile::new().expect("a disk file");
    let contents: Vec<u8> = (0..sectors * 512 + input.below(512)).map(|i| (i % 251) as u8).collect();
    file.write_all(&contents).expect("the disk's bytes");
    let spec = DiskSpec { backing: Backing::File(file.path().to_path_buf()), read_only, serial };
    let Ok(block) = Block::open(&spec) else { return };
    let mut dev = VirtioMmio::new(block, mem.clone(), Box::new(NoIrq));
    let mut rings = Rings::default();

    let mut ops = 0;
    while !input.is_empty() && ops < 64 {
        ops += 1;
        match input.below(8) {
            0 => setup(&mut dev, &mut input, &mut rings, mem_size as u64),
            1 => {
                let offset = if input.below(8) == 0 { input.u64() } else { input.below(0x120) };
                let width = [4usize, 1, 2, 8][input.below(4) as usize];
                dev.write(offset, &input.u64().to_le_bytes()[..width]);
            }
            2 => {
                let offset = if input.below(8) == 0 { input.u64() } else { input.below(0x120) };
                let mut out = vec![0u8; [4usize, 1, 2, 8, 3][input.below(5) as usize]];
                dev.read(offset, &mut out);
            }
            3 => {
                let at = input.below(mem_size as u64);
                let bytes = input.string(64);
                let _ = mem.write_slice(&bytes, GuestAddress(at));
            }
            4..=6 => {
                request(&mem, &mut input, &mut rings, mem_size as u64);
                dev.write(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), &0u32.to_le_bytes());
            }
            _ => dev.write(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), &u32::from(input.u8() % 3).to_le_bytes()),
        }
    }
    drop(dev);
    let mut now = vec![0u8; contents.len() + 1];
    let n = file.as_file().read_at(&mut now, 0).expect("the disk reads");
    assert_eq!(n, contents.len(), "the disk file changed size");
    if read_only {
        assert!(now[..n] == contents[..], "a read-only disk was written");
    }
}

/// An address in guest memory, aligned as the rings want it, mostly.
fn address(input: &mut Input, mem_size: u64, align: u64) -> u64 {
    match input.below(16) {
        0 => input.u64(),
        1 => input.below(mem_size + 4096),
        _ => input.below(mem_size / align) * align,
    }
}

fn reg(dev: &mut VirtioMmio<Block>, offset: u32, value: u32) {
    dev.write(u64::from(offset), &value.to_le_bytes());
}

/// What a Linux driver does to bring the device up, with the queue where
/// the input says.
fn setup(dev: &mut VirtioMmio<Block>, input: &mut Input, rings: &mut Rings, mem_size: u64) {
    reg(dev, VIRTIO_MMIO_STATUS, 0);
    reg(dev, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    let (lo, hi) = if input.below(4) == 0 { (input.u32(), input.u32()) } else { (input.u32() & (1 << 9 | 1 << 29), 1) };
    for (sel, value) in [(0, lo), (1, hi)] {
        reg(dev, VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
        reg(dev, VIRTIO_MMIO_DRIVER_FEATURES, value);
    }
    reg(dev, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK);
    reg(dev, VIRTIO_MMIO_QUEUE_SEL, if input.below(16) == 0 { input.u32() } else { 0 });
    let size = if input.below(8) == 0 { u32::from(input.u16()) } else { 1 << input.below(9) };
    reg(dev, VIRTIO_MMIO_QUEUE_NUM, size);
    let desc = address(input, mem_size, 16);
    let avail = address(input, mem_size, 2);
    let used = address(input, mem_size, 4);
    for (lo, hi, at) in [
        (VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH, desc),
        (VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, avail),
        (VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_QUEUE_USED_HIGH, used),
    ] {
        reg(dev, lo, at as u32);
        reg(dev, hi, (at >> 32) as u32);
    }
    reg(dev, VIRTIO_MMIO_QUEUE_READY, 1);
    reg(
        dev,
        VIRTIO_MMIO_STATUS,
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    *rings = Rings { desc, avail, size: size as u16, next_avail: 0 };
}

/// Writes one request (header, descriptors, an avail entry) where the
/// driver set the queue up.
fn request(mem: &GuestMemory, input: &mut Input, rings: &mut Rings, mem_size: u64) {
    if rings.size == 0 {
        return;
    }
    let header_at = address(input, mem_size, 16);
    let kind = match input.below(6) {
        0 | 1 => VIRTIO_BLK_T_IN,
        2 | 3 => VIRTIO_BLK_T_OUT,
        4 => [VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID][input.below(2) as usize],
        _ => input.u32(),
    };
    let sector = if input.below(8) == 0 { input.u64() } else { input.below(20) };
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    let _ = mem.write_slice(&header, GuestAddress(header_at));

    // The chain: the header, data buffers, the status byte; each field
    // now and then replaced by anything.
    let head = input.below(u64::from(rings.size)) as u16;
    let count = 1 + input.below(5) as u16;
    let indirect = input.below(16) == 0;
    let table = if indirect { address(input, mem_size, 16) } else { rings.desc };
    let table_len = if indirect { u64::from(count) } else { u64::from(rings.size) };
    let first = if indirect { 0 } else { head };
    for i in 0..count {
        let slot = (u64::from(first) + u64::from(i)) % table_len;
        let last = i + 1 == count;
        let (addr, len, mut flags) = match (i, last) {
            (0, _) => (header_at, 16, 0),
            (_, true) => (address(input, mem_size, 1), 1, VRING_DESC_F_WRITE as u16),
            _ => {
                let write = if kind == VIRTIO_BLK_T_OUT { 0 } else { VRING_DESC_F_WRITE as u16 };
                (address(input, mem_size, 512), 512 * (1 + input.below(8) as u32), write)
            }
        };
        if !last {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let next = ((slot + 1) % table_len) as u16;
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&addr.to_le_bytes());
        desc[8..12].copy_from_slice(&(if input.below(16) == 0 { input.u32() } else { len }).to_le_bytes());
        desc[12..14].copy_from_slice(&(if input.below(16) == 0 { input.u16() } else { flags }).to_le_bytes());
        desc[14..].copy_from_slice(&(if input.below(16) == 0 { input.u16() } else { next }).to_le_bytes());
        let _ = mem.write_slice(&desc, GuestAddress(table.wrapping_add(slot * 16)));
    }
    if indirect {
        let flags = VRING_DESC_F_INDIRECT as u16;
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&table.to_le_bytes());
        desc[8..12].copy_from_slice(&(u32::from(count) * 16).to_le_bytes());
        desc[12..14].copy_from_slice(&flags.to_le_bytes());
        let _ = mem.write_slice(&desc, GuestAddress(rings.desc.wrapping_add(u64::from(head) * 16)));
    }
    // avail: flags, idx, ring[size].
    let slot = u64::from(rings.next_avail % rings.size);
    let _ = mem.write_obj(head, GuestAddress(rings.avail.wrapping_add(4 + slot * 2)));
    rings.next_avail = if input.below(32) == 0 { input.u16() } else { rings.next_avail.wrapping_add(1) };
    let _ = mem.write_obj(rings.next_avail, GuestAddress(rings.avail.wrapping_add(2)));
}

/// Starting inputs: a 64 KiB guest, an 8-sector disk, the driver's
/// setup of a 16-entry queue, a read of two sectors, a write, a get-id.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut s = vec![0u8]; // 64 KiB of memory
    s.extend_from_slice(&0u16.to_le_bytes()); // no initial bytes
    s.extend_from_slice(&[8, 0, 1]); // 8 sectors, writable, default serial
    s.extend_from_slice(&0u16.to_le_bytes()); // no partial sector
    // Setup: known features, queue 0 of 16 at 0x1000/0x2000/0x3000.
    s.extend_from_slice(&[0, 1, 0xff, 0xff, 0xff, 0xff, 1, 1, 4]);
    for (align, at) in [(16u64, 0x1000u64), (2, 0x2000), (4, 0x3000)] {
        s.push(2);
        s.extend_from_slice(&((at / align) as u16).to_le_bytes());
    }
    for kind in [0u8, 2, 4] {
        s.push(4); // a request, then a notify
        s.push(2);
        s.extend_from_slice(&(0x400u16).to_le_bytes()); // header at 0x4000
        s.push(kind); // IN, OUT, FLUSH/GET_ID
        if kind == 4 {
            s.push(1); // GET_ID
        }
        s.extend_from_slice(&[1, 2]); // sector 2
        s.extend_from_slice(&[0, 2, 1]); // head 0, 3 descriptors, direct
        s.extend_from_slice(&[1, 1, 1]); // header descriptor as is
        s.extend_from_slice(&[2, 0x50, 1]); // data at 0xa000, 1024 bytes
        s.extend_from_slice(&[1, 1, 1]);
        s.push(2);
        s.extend_from_slice(&0x5000u16.to_le_bytes()); // status byte
        s.extend_from_slice(&[1, 1, 1, 1]);
    }
    vec![s]
}
