//! The virtio-mmio transport, version 2 ("modern"; virtio 1.2 §4.2.2):
//! the register window the guest driver uses to negotiate features, set
//! up the queues and notify the device.
//!
//! A notification (a write to QueueNotify) is handled on the vCPU thread
//! that made it, during the MMIO exit: the device processes the queue,
//! then the used-buffer interrupt goes out through irqfd. That keeps the
//! device single-threaded and lock-free inside; the guest's other vCPUs
//! keep running.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

use super::super::bus::BusDevice;
use super::super::memory::GuestMemory;
use super::Interrupt;

/// "virt" in little endian (§4.2.2.1 MagicValue).
pub const MAGIC: u32 = 0x7472_6976;
/// The modern transport (legacy devices say 1).
pub const VERSION: u32 = 2;
/// "RaR " — any value is allowed; this one names us in guest logs.
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"RaR ");

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (§5: 2 = block).
    fn device_type(&self) -> u32;
    /// Device feature bits; the transport adds VIRTIO_F_VERSION_1.
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space (any width, any offset: bytes
    /// past the end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Handles the available buffers of queue `index`; returns whether
    /// any buffer was put on the used ring.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool;
}

/// The transport's registers around one device.
pub struct VirtioMmio<D: VirtioDevice> {
    device: D,
    mem: Arc<GuestMemory>,
    irq: Box<dyn Interrupt>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
}

/// What a register write asks the transport to do: decided by
/// [`VirtioMmio::decode_write`] without touching the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    DeviceFeaturesSel(u32),
    DriverFeaturesSel(u32),
    DriverFeatures(u32),
    QueueSel(u32),
    QueueNum(u32),
    QueueReady(bool),
    QueueNotify(u32),
    InterruptAck(u32),
    Status(u32),
    QueueDesc { high: bool, value: u32 },
    QueueAvail { high: bool, value: u32 },
    QueueUsed { high: bool, value: u32 },
    Config,
    Ignored,
}

impl<D: VirtioDevice> VirtioMmio<D> {
    pub fn new(device: D, mem: Arc<GuestMemory>, irq: Box<dyn Interrupt>) -> VirtioMmio<D> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue sizes of our devices are powers of two"))
            .collect();
        VirtioMmio {
            device,
            mem,
            irq,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
        }
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// Everything the device offers, transport features included.
    fn offered_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn decode_write(offset: u64, value: u32) -> Write {
        let Ok(offset) = u32::try_from(offset) else { return Write::Ignored };
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => Write::DeviceFeaturesSel(value),
            VIRTIO_MMIO_DRIVER_FEATURES => Write::DriverFeatures(value),
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => Write::DriverFeaturesSel(value),
            VIRTIO_MMIO_QUEUE_SEL => Write::QueueSel(value),
            VIRTIO_MMIO_QUEUE_NUM => Write::QueueNum(value),
            VIRTIO_MMIO_QUEUE_READY => Write::QueueReady(value == 1),
            VIRTIO_MMIO_QUEUE_NOTIFY => Write::QueueNotify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => Write::InterruptAck(value),
            VIRTIO_MMIO_STATUS => Write::Status(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW => Write::QueueDesc { high: false, value },
            VIRTIO_MMIO_QUEUE_DESC_HIGH => Write::QueueDesc { high: true, value },
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => Write::QueueAvail { high: false, value },
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => Write::QueueAvail { high: true, value },
            VIRTIO_MMIO_QUEUE_USED_LOW => Write::QueueUsed { high: false, value },
            VIRTIO_MMIO_QUEUE_USED_HIGH => Write::QueueUsed { high: true, value },
            o if o >= VIRTIO_MMIO_CONFIG => Write::Config,
            _ => Write::Ignored,
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let Ok(offset) = u32::try_from(offset) else { return 0 };
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            // No configuration change ever happens: one generation.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        // §4.2.2.2: queue registers may only change while the queue is
        // not ready, and the driver must not touch them after DRIVER_OK
        // without a reset. A driver that does is ignored, not obeyed.
        let queue_setup_allowed = self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match Self::decode_write(offset, value) {
            Write::DeviceFeaturesSel(v) => self.device_features_sel = v,
            Write::DriverFeaturesSel(v) => self.driver_features_sel = v,
            Write::DriverFeatures(v) if self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                    _ => {}
                }
            }
            Write::QueueSel(v) => self.queue_sel = v,
            Write::QueueNum(v) if queue_setup_allowed => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    // A size that is not a power of two or exceeds the
                    // maximum is refused; the queue then fails validation
                    // when made ready.
                    q.set_size(v as u16);
                }
            }
            Write::QueueReady(ready) if queue_setup_allowed || !ready => {
                let mem = self.mem.clone();
                if let Some(q) = self.selected_queue() {
                    q.set_ready(ready);
                    if ready && !q.is_valid(&*mem) {
                        log::debug!("virtio-mmio: queue rings outside guest memory; queue left not ready");
                        q.set_ready(false);
                    }
                }
            }
            Write::QueueDesc { high, value } if queue_setup_allowed => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    let (lo, hi) = split(high, value);
                    q.set_desc_table_address(lo, hi);
                }
            }
            Write::QueueAvail { high, value } if queue_setup_allowed => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    let (lo, hi) = split(high, value);
                    q.set_avail_ring_address(lo, hi);
                }
            }
            Write::QueueUsed { high, value } if queue_setup_allowed => {
                if let Some(q) = self.selected_queue().filter(|q| !q.ready()) {
                    let (lo, hi) = split(high, value);
                    q.set_used_ring_address(lo, hi);
                }
            }
            Write::QueueNotify(index) => self.notify(index as usize),
            Write::InterruptAck(v) => self.interrupt_status &= !v,
            Write::Status(v) => self.set_status(v),
            Write::Config | Write::Ignored => {}
            other => log::debug!("virtio-mmio: {other:?} refused in status {:#x}", self.status),
        }
    }

    /// The status state machine (§3.1.1): 0 resets; FEATURES_OK only
    /// sticks when the driver accepted VERSION_1 and nothing we did not
    /// offer (the driver reads it back to learn that).
    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let acceptable = self.driver_features & !self.offered_features() == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !acceptable {
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
        }
        // Status bits only accumulate until a reset (FAILED aside).
        self.status = (self.status | value)
            & (VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK
                | VIRTIO_CONFIG_S_FAILED);
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn notify(&mut self, index: usize) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(index).filter(|q| q.ready()) else { return };
        if !self.device.process_queue(index, queue, &self.mem) {
            return;
        }
        match queue.needs_notification(&*self.mem) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                self.interrupt_status |= VIRTIO_MMIO_INT_VRING;
                if let Err(e) = self.irq.trigger() {
                    log::debug!("virtio-mmio: raising the interrupt failed: {e}");
                }
            }
        }
    }
}

fn split(high: bool, value: u32) -> (Option<u32>, Option<u32>) {
    if high {
        (None, Some(value))
    } else {
        (Some(value), None)
    }
}

impl<D: VirtioDevice> BusDevice for VirtioMmio<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device.read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        // §4.2.2.2: control registers are read 32 bits wide and aligned.
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!("virtio-mmio: {}-byte read at {offset:#x} ignored", data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!("virtio-mmio: {}-byte write at {offset:#x} ignored", data.len());
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};

    /// A device with one queue of 16 that pops every chain and returns it
    /// used with length 1.
    struct Echo {
        popped: Arc<Mutex<Vec<u16>>>,
    }

    impl VirtioDevice for Echo {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            1 << 5
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = 0xc0u8.wrapping_add(offset as u8).wrapping_add(i as u8);
            }
        }
        fn process_queue(&mut self, _index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool {
            let mut any = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                self.popped.lock().unwrap().push(chain.head_index());
                queue.add_used(mem, chain.head_index(), 1).unwrap();
                any = true;
            }
            any
        }
    }

    #[derive(Default, Clone)]
    struct Counter(Arc<AtomicUsize>);
    impl Interrupt for Counter {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    type Setup = (VirtioMmio<Echo>, Arc<GuestMemory>, Counter, Arc<Mutex<Vec<u16>>>);

    fn setup() -> Setup {
        let mem = Arc::new(super::super::super::memory::create(64).unwrap());
        let irq = Counter::default();
        let popped = Arc::new(Mutex::new(Vec::new()));
        let dev = VirtioMmio::new(Echo { popped: popped.clone() }, mem.clone(), Box::new(irq.clone()));
        (dev, mem, irq, popped)
    }

    fn r(d: &mut VirtioMmio<Echo>, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        d.read(u64::from(offset), &mut b);
        u32::from_le_bytes(b)
    }

    fn w(d: &mut VirtioMmio<Echo>, offset: u32, value: u32) {
        d.write(u64::from(offset), &value.to_le_bytes());
    }

    /// The Linux driver's sequence (drivers/virtio/virtio_mmio.c), queue
    /// rings at 0x10000 (desc), 0x11000 (avail), 0x12000 (used).
    fn handshake(d: &mut VirtioMmio<Echo>, features_hi: u32) -> u32 {
        w(d, VIRTIO_MMIO_STATUS, 0);
        w(d, VIRTIO_MMIO_STATUS, 1);
        w(d, VIRTIO_MMIO_STATUS, 1 | 2);
        w(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(d, VIRTIO_MMIO_DRIVER_FEATURES, features_hi);
        w(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(d, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 5);
        w(d, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        let status = r(d, VIRTIO_MMIO_STATUS);
        w(d, VIRTIO_MMIO_QUEUE_SEL, 0);
        w(d, VIRTIO_MMIO_QUEUE_NUM, 16);
        w(d, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10000);
        w(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        w(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x11000);
        w(d, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w(d, VIRTIO_MMIO_QUEUE_USED_LOW, 0x12000);
        w(d, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w(d, VIRTIO_MMIO_QUEUE_READY, 1);
        w(d, VIRTIO_MMIO_STATUS, status | 4);
        status
    }

    #[test]
    fn identification_registers() {
        let (mut d, ..) = setup();
        let got: Vec<u32> = [0x0, 0x4, 0x8, 0xc, 0x34, 0x60, 0x70, 0xfc].iter().map(|&o| r(&mut d, o)).collect();
        assert_eq!(got, vec![MAGIC, 2, 42, VENDOR_ID, 16, 0, 0, 0]);
        w(&mut d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut d, VIRTIO_MMIO_DEVICE_FEATURES), 1 << 5);
        w(&mut d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut d, VIRTIO_MMIO_DEVICE_FEATURES), 1, "VIRTIO_F_VERSION_1 is offered");
        w(&mut d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(&mut d, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        w(&mut d, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r(&mut d, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "there is no queue 1");
        let mut cfg = [0u8; 3];
        d.read(0x102, &mut cfg);
        assert_eq!(cfg, [0xc2, 0xc3, 0xc4]);
    }

    #[test]
    fn features_ok_needs_version_1() {
        let (mut d, ..) = setup();
        assert_eq!(handshake(&mut d, 0), 1 | 2, "legacy driver: FEATURES_OK refused");
        let (mut d, ..) = setup();
        assert_eq!(handshake(&mut d, 1 | 2), 1 | 2, "feature 33 was never offered");
        let (mut d, ..) = setup();
        assert_eq!(handshake(&mut d, 1), 1 | 2 | 8);
        assert_eq!(r(&mut d, VIRTIO_MMIO_STATUS), 1 | 2 | 4 | 8);
        assert_eq!(r(&mut d, VIRTIO_MMIO_QUEUE_READY), 1);
    }

    #[test]
    fn notify_processes_the_queue_and_interrupts() {
        let (mut d, mem, irq, popped) = setup();
        handshake(&mut d, 1);
        // One descriptor (index 3) on the avail ring.
        mem.write_obj(0x20000u64, GuestAddress(0x10000 + 3 * 16)).unwrap();
        mem.write_obj(8u32, GuestAddress(0x10000 + 3 * 16 + 8)).unwrap();
        mem.write_obj(3u16, GuestAddress(0x11000 + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x11000 + 2)).unwrap();
        w(&mut d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(*popped.lock().unwrap(), vec![3]);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x12000 + 2)).unwrap(), 1, "used idx");
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x12000 + 4)).unwrap(), 3, "used id");
        assert_eq!(r(&mut d, VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        w(&mut d, VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut d, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // Nothing new: no interrupt; a bogus queue index: nothing at all.
        w(&mut d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        w(&mut d, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn hostile_setups_are_refused_without_panicking() {
        let (mut d, _mem, irq, popped) = setup();
        // Rings outside guest memory: the queue does not become ready.
        w(&mut d, VIRTIO_MMIO_STATUS, 1 | 2);
        w(&mut d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut d, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        w(&mut d, VIRTIO_MMIO_STATUS, 1 | 2 | 8);
        w(&mut d, VIRTIO_MMIO_QUEUE_NUM, 16);
        w(&mut d, VIRTIO_MMIO_QUEUE_DESC_LOW, 0xffff_f000);
        w(&mut d, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0xffff_ffff);
        w(&mut d, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(r(&mut d, VIRTIO_MMIO_QUEUE_READY), 0);
        // A size that is not a power of two is not taken.
        w(&mut d, VIRTIO_MMIO_QUEUE_NUM, 3);
        w(&mut d, VIRTIO_MMIO_STATUS, 1 | 2 | 4 | 8);
        w(&mut d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        // Odd widths and offsets.
        d.write(0x50, &[0, 0]);
        d.write(0x51, &[0; 4]);
        let mut b = [0xffu8; 2];
        d.read(0x0, &mut b);
        assert_eq!(b, [0, 0]);
        d.read(u64::MAX - 3, &mut [0u8; 4]);
        d.write(u64::MAX - 3, &[0u8; 4]);
        assert!(popped.lock().unwrap().is_empty());
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
        // Reset clears everything.
        w(&mut d, VIRTIO_MMIO_STATUS, 0);
        assert_eq!((r(&mut d, VIRTIO_MMIO_STATUS), r(&mut d, VIRTIO_MMIO_QUEUE_READY)), (0, 0));
    }
}
