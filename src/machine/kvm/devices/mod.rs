//! Device models of the built-in VMM: the guest contract's 8250 console,
//! the i8042 (only for its reset line), and virtio-mmio block devices.

pub mod i8042;
pub mod serial;
pub mod virtio_blk;
pub mod virtio_mmio;

use std::io;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// An edge on an interrupt line. The real one is an eventfd that KVM
/// injects through irqfd (no exit to us, no lock); tests count instead.
pub trait Interrupt: Send + Sync {
    fn trigger(&self) -> io::Result<()>;
}

/// An eventfd registered with KVM as the irqfd of one GSI.
#[derive(Debug)]
pub struct IrqLine {
    pub gsi: u32,
    evt: EventFd,
}

impl IrqLine {
    pub fn new(gsi: u32) -> io::Result<IrqLine> {
        Ok(IrqLine { gsi, evt: EventFd::new(EFD_NONBLOCK)? })
    }

    /// The eventfd to hand to `KVM_IRQFD`.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    pub fn try_clone(&self) -> io::Result<IrqLine> {
        Ok(IrqLine { gsi: self.gsi, evt: self.evt.try_clone()? })
    }
}

impl Interrupt for IrqLine {
    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}

/// vm-superio's devices take their interrupt (serial) or reset line
/// (i8042) as a `Trigger`.
impl vm_superio::Trigger for IrqLine {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}
