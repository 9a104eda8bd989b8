//! Routing guest I/O to device models: one bus for port I/O, one for MMIO,
//! each a sorted list of non-overlapping ranges.
//!
//! A guest access that hits no device is not an error (Linux probes ports
//! that are not there, such as 0x80 for I/O delays or COM2–COM4): reads
//! see all ones, as on a real ISA bus with nothing driving it, and writes
//! are dropped.

use std::sync::{Arc, Mutex};

/// A device model reachable through a bus. `offset` is relative to the
/// start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors wiring devices onto a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("device range {start:#x}+{len:#x} overlaps the device already at {other:#x}")]
    Overlap { start: u64, len: u64, other: u64 },
    #[error("device range {start:#x}+{len:#x} is empty or wraps around")]
    BadRange { start: u64, len: u64 },
}

struct Entry {
    start: u64,
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space (ports or MMIO).
#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Bus {
        Bus::default()
    }

    /// Places `device` at `start..start+len`.
    pub fn insert(&mut self, start: u64, len: u64, device: Arc<Mutex<dyn BusDevice>>) -> Result<(), Error> {
        let end = start.checked_add(len).filter(|_| len > 0).ok_or(Error::BadRange { start, len })?;
        if let Some(other) = self.entries.iter().find(|e| start < e.start + e.len && e.start < end) {
            return Err(Error::Overlap { start, len, other: other.start });
        }
        let at = self.entries.partition_point(|e| e.start < start);
        self.entries.insert(at, Entry { start, len, device });
        Ok(())
    }

    /// The device covering the whole access `addr..addr+size`, and the
    /// offset of `addr` in it. An access straddling two devices or the
    /// end of one hits none.
    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let i = self.entries.partition_point(|e| e.start <= addr).checked_sub(1)?;
        let e = &self.entries[i];
        let offset = addr - e.start;
        (offset.checked_add(size as u64)? <= e.len).then_some((e, offset))
    }

    /// Reads through the bus; `false` when no device answered (`data` is
    /// then all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Writes through the bus; `false` when no device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((e, offset)) => {
                lock(&e.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned (a panic in another vCPU thread while
/// it held the lock) is still used: device state is plain registers, and
/// the run is already failing on the thread that panicked.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The two buses a vCPU exit can target.
#[derive(Default)]
pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every access as (kind, offset, bytes) and answers reads
    /// with its id.
    struct Probe {
        id: u8,
        log: Log,
    }
    type Log = Arc<Mutex<Vec<(char, u8, u64, Vec<u8>)>>>;

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.id);
            self.log.lock().unwrap().push(('r', self.id, offset, data.to_vec()));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.log.lock().unwrap().push(('w', self.id, offset, data.to_vec()));
        }
    }

    #[test]
    fn accesses_reach_the_right_device_at_the_right_offset() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut bus = Bus::new();
        for (id, start) in [(1u8, 0x3f8u64), (2, 0x60)] {
            bus.insert(start, 8, Arc::new(Mutex::new(Probe { id, log: log.clone() }))).unwrap();
        }
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fd, &mut b));
        assert_eq!(b, [1]);
        assert!(bus.write(0x64, &[0xfe]));
        assert!(!bus.read(0x80, &mut b), "nothing at 0x80");
        assert_eq!(b, [0xff]);
        assert!(!bus.write(0x2f8, &[1]));
        let mut w = [0u8; 2];
        assert!(!bus.read(0x3ff, &mut w), "straddles the end of COM1");
        assert!(bus.read(0x3fe, &mut w));
        assert_eq!(*log.lock().unwrap(), vec![('r', 1, 5, vec![1]), ('w', 2, 4, vec![0xfe]), ('r', 1, 6, vec![1, 1])]);
    }

    #[test]
    fn overlapping_or_empty_ranges_are_refused() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let dev = || -> Arc<Mutex<dyn BusDevice>> { Arc::new(Mutex::new(Probe { id: 0, log: log.clone() })) };
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x1000, dev()).unwrap();
        bus.insert(0x2000, 0x1000, dev()).unwrap();
        bus.insert(0x0, 0x1000, dev()).unwrap();
        assert_eq!(bus.insert(0x1fff, 2, dev()), Err(Error::Overlap { start: 0x1fff, len: 2, other: 0x1000 }));
        assert_eq!(bus.insert(0x500, 0x1000, dev()), Err(Error::Overlap { start: 0x500, len: 0x1000, other: 0 }));
        assert_eq!(bus.insert(0x9000, 0, dev()), Err(Error::BadRange { start: 0x9000, len: 0 }));
        assert_eq!(bus.insert(u64::MAX, 2, dev()), Err(Error::BadRange { start: u64::MAX, len: 2 }));
        let starts: Vec<u64> = bus.entries.iter().map(|e| e.start).collect();
        assert_eq!(starts, vec![0, 0x1000, 0x2000]);
    }
}
