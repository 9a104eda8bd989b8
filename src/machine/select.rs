//! Which launcher runs the guest.
//!
//! The built-in VMM is the default where /dev/kvm is backed by hardware
//! virtualisation; elsewhere (no /dev/kvm, or PVM as on this project's CI
//! machines, which cannot boot Linux) QEMU with TCG, with a one-line notice
//! saying why. `--vmm builtin|qemu` forces one. QEMU is found by
//! [`QemuMachine::find`] (`--qemu`, RUNASROOT_QEMU, PATH, usual places).

use std::ffi::OsStr;

use super::kvm::{self, KvmMachine};
use super::qemu::{Accel, QemuMachine};
use super::{Machine, MachineError};
use crate::cli::Vmm;
use crate::report;

/// Picks and constructs the launcher. `notice` receives the one-line
/// explanation when the default falls back to QEMU. `qemu` is `--qemu`.
pub fn select(choice: Vmm, qemu: Option<&OsStr>, notice: &mut dyn FnMut(&str)) -> Result<Box<dyn Machine>, MachineError> {
    match choice {
        Vmm::Builtin => {
            kvm::hardware_support().map_err(MachineError::KvmUnavailable)?;
            Ok(Box::new(KvmMachine::new()?))
        }
        Vmm::Qemu => Ok(Box::new(QemuMachine::find(qemu_accel(), qemu)?)),
        Vmm::Auto => match kvm::hardware_support() {
            Ok(()) => match KvmMachine::new() {
                Ok(m) => Ok(Box::new(m)),
                Err(e) => {
                    notice(&format!("runasroot: the built-in VMM cannot start ({}); using QEMU instead", report::one_line(&e)));
                    Ok(Box::new(QemuMachine::find(qemu_accel(), qemu)?))
                }
            },
            Err(reason) => {
                notice(&format!(
                    "runasroot: {}; using QEMU with software emulation (TCG), which is slower",
                    report::one_line(&reason)
                ));
                Ok(Box::new(QemuMachine::find(Accel::Tcg, qemu)?))
            }
        },
    }
}

/// KVM for QEMU only where it is hardware-backed and we may open it.
fn qemu_accel() -> Accel {
    let usable = kvm::hardware_support().is_ok()
        && std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if usable {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}
