//! The i8042 keyboard controller, kept only for its CPU-reset command:
//! Linux with `reboot=k` writes 0xFE to port 0x64, and that ends the VM.

use std::sync::Arc;

use vm_superio::I8042Device;

use super::super::bus::BusDevice;

/// Where the reset request goes: the run loop waits on it.
pub trait ResetSink: Send + Sync {
    fn reset(&self);
}

/// vm-superio's i8042 wired to a [`ResetSink`].
pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
}

pub struct ResetTrigger(Arc<dyn ResetSink>);

impl vm_superio::Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.reset();
        Ok(())
    }
}

impl I8042 {
    pub fn new(sink: Arc<dyn ResetSink>) -> I8042 {
        I8042 { inner: I8042Device::new(ResetTrigger(sink)) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0 (output buffer empty, input buffer empty): Linux's
        // kb_wait() before the reset command returns at once.
        let value = u8::try_from(offset).map_or(0, |o| self.inner.read(o));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only single-byte accesses are meaningful on the i8042; wider ones
        // are ignored rather than read as the reset command.
        if let (Ok(offset), [value]) = (u8::try_from(offset), data) {
            let Ok(()) = self.inner.write(offset, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Count(AtomicUsize);
    impl ResetSink for Count {
        fn reset(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn only_the_reset_command_on_the_command_port_resets() {
        // (offset, bytes written, resets so far)
        let cases: &[(u64, &[u8], usize)] = &[
            (0, &[0xfe], 0),       // data port
            (4, &[0xaa], 0),       // self-test command
            (4, &[0xfe, 0x00], 0), // a 2-byte write is not the command
            (4, &[0xfe], 1),
            (4, &[0xfe], 2),
        ];
        let count = Arc::new(Count::default());
        let mut dev = I8042::new(count.clone());
        for (offset, bytes, want) in cases {
            dev.write(*offset, bytes);
            assert_eq!(count.0.load(Ordering::SeqCst), *want, "after {bytes:x?} at {offset}");
        }
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
    }
}
