//! COM1, the guest's console: vm-superio's 8250 model at 0x3f8, IRQ 4,
//! whose output is collected for the run loop, which hands it to the
//! caller's console callback on its own thread.
//!
//! Every byte the guest writes is one VM exit (DESIGN.md: keep the console
//! quiet on the fast path); collecting them costs a lock and, only when
//! the buffer was empty, one eventfd write.

use std::io;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::bus::BusDevice;

/// Console bytes not yet handed to the caller are capped here: a guest
/// that floods the console while the host is busy loses output, not host
/// memory.
pub const CONSOLE_BACKLOG: usize = 4 << 20;

/// Console output waiting for the run loop.
#[derive(Debug)]
pub struct ConsoleBuffer {
    bytes: Mutex<Vec<u8>>,
    ready: EventFd,
}

impl ConsoleBuffer {
    pub fn new() -> io::Result<Arc<ConsoleBuffer>> {
        Ok(Arc::new(ConsoleBuffer { bytes: Mutex::new(Vec::new()), ready: EventFd::new(EFD_NONBLOCK)? }))
    }

    /// Readable when bytes are waiting.
    pub fn eventfd(&self) -> &EventFd {
        &self.ready
    }

    /// Everything written so far, emptying the buffer.
    pub fn take(&self) -> Vec<u8> {
        // Clear the eventfd first: a byte written after this read re-arms it.
        let _ = self.ready.read();
        std::mem::take(&mut *self.bytes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn push(&self, data: &[u8]) {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let was_empty = bytes.is_empty();
        let room = CONSOLE_BACKLOG.saturating_sub(bytes.len());
        bytes.extend_from_slice(&data[..data.len().min(room)]);
        if was_empty && !bytes.is_empty() {
            let _ = self.ready.write(1);
        }
    }
}

/// The serial model's output side.
pub struct ConsoleWriter(pub Arc<ConsoleBuffer>);

impl io::Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.push(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// COM1 on the port bus.
pub struct Serial<T: Trigger<E = io::Error>> {
    inner: vm_superio::Serial<T, NoEvents, ConsoleWriter>,
}

impl<T: Trigger<E = io::Error>> Serial<T> {
    pub fn new(irq: T, console: Arc<ConsoleBuffer>) -> Serial<T> {
        Serial { inner: vm_superio::Serial::new(irq, ConsoleWriter(console)) }
    }
}

impl<T: Trigger<E = io::Error> + Send> BusDevice for Serial<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte registers only; a wider access reads as no device.
        match (u8::try_from(offset), data.len()) {
            (Ok(offset), 1) => data[0] = self.inner.read(offset),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            if let Err(e) = self.inner.write(offset, *value) {
                log::debug!("serial: raising IRQ failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::kvm::devices::IrqLine;

    // 8250 register offsets and bits (the 16550 datasheet).
    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;
    const IER_THR_EMPTY: u8 = 0x2;
    const LSR_THR_EMPTY_AND_IDLE: u8 = 0x60;

    fn read(s: &mut Serial<IrqLine>, offset: u64) -> u8 {
        let mut b = [0u8];
        s.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn bytes_reach_the_console_buffer_and_raise_the_line() {
        let console = ConsoleBuffer::new().unwrap();
        let irq = IrqLine::new(4).unwrap();
        let line = irq.try_clone().unwrap();
        let mut s = Serial::new(irq, console.clone());
        assert!(console.eventfd().read().is_err(), "nothing written yet");
        for b in b"Linux version" {
            s.write(THR, &[*b]);
        }
        assert_eq!(console.eventfd().read().unwrap(), 1, "one wake-up for the whole burst");
        assert_eq!(console.take(), b"Linux version");
        assert_eq!(console.take(), b"");
        assert!(line.eventfd().read().is_err(), "no interrupt while IER is 0");

        // The 8250 driver enables "THR empty" and waits for the interrupt.
        s.write(IER, &[IER_THR_EMPTY]);
        s.write(THR, b"x");
        assert_eq!(line.eventfd().read().unwrap(), 1);
        assert_eq!(read(&mut s, IIR) & 0xf, IER_THR_EMPTY, "IIR says THR empty");
        assert_eq!(read(&mut s, LSR) & LSR_THR_EMPTY_AND_IDLE, LSR_THR_EMPTY_AND_IDLE, "always ready to send");
        assert_eq!(console.take(), b"x");
    }

    #[test]
    fn wide_or_out_of_range_accesses_are_ignored() {
        let console = ConsoleBuffer::new().unwrap();
        let mut s = Serial::new(IrqLine::new(4).unwrap(), console.clone());
        s.write(THR, b"ab");
        s.write(0x1_0000_0000, b"c");
        let mut w = [0u8; 2];
        s.read(LSR, &mut w);
        assert_eq!(w, [0xff, 0xff]);
        assert_eq!(console.take(), b"");
    }

    #[test]
    fn the_backlog_is_bounded() {
        let console = ConsoleBuffer::new().unwrap();
        let mut w = ConsoleWriter(console.clone());
        io::Write::write_all(&mut w, &vec![b'a'; CONSOLE_BACKLOG + 10]).unwrap();
        io::Write::write_all(&mut w, b"lost").unwrap();
        assert_eq!(console.take().len(), CONSOLE_BACKLOG);
        io::Write::write_all(&mut w, b"kept").unwrap();
        assert_eq!(console.take(), b"kept");
    }
}
