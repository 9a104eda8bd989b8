//! vCPUs: what each one is told before it runs (CPUID, MSRs, LAPIC, and
//! for the boot CPU the long-mode registers), the run loop of its thread,
//! and what each VM exit means ([`handle_exit`], pure, fed synthetic
//! exits in the tests).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_msr_entry, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::boot;
use super::bus::Buses;
use super::devices::i8042::ResetSink;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot set up vCPU {cpu}: {step} failed")]
    Configure {
        cpu: u8,
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the CPUID of vCPU {cpu} has {count} entries, more than KVM_SET_CPUID2 takes ({KVM_MAX_CPUID_ENTRIES})")]
    CpuidEntries { cpu: u8, count: usize },
    #[error("KVM took only {set} of the {total} boot MSRs of vCPU {cpu} (MSR {index:#x} was refused)")]
    Msrs { cpu: u8, set: usize, total: usize, index: u32 },
}

// CPUID bits (Intel SDM vol. 2A, CPUID).
/// Leaf 1 ECX bit 31: running under a hypervisor (Linux then looks for
/// KVM's paravirt leaves at 0x40000000).
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: more than one logical processor per package, so
/// EBX[23:16] is meaningful.
const CPUID_1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX bit 24: the LAPIC timer has TSC-deadline mode.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 0 vendor strings as (EBX, EDX, ECX): AMD's and Hygon's, whose
/// topology Linux reads from the extended leaves 0x80000008/0x8000001E.
const VENDOR_AMD: (u32, u32, u32) = (0x6874_7541, 0x6974_6e65, 0x444d_4163);
const VENDOR_HYGON: (u32, u32, u32) = (0x6f67_7948, 0x6e65_476e, 0x656e_6975);
/// Leaf 0x80000008 ECX (AMD APM vol. 3, E.4.7): [7:0] NC, the number of
/// threads in the package - 1; [15:12] ApicIdSize, the APIC id bits that
/// number them.
const CPUID_80000008_ECX_NC: u32 = 0xff;
const CPUID_80000008_ECX_APIC_ID_SIZE_SHIFT: u32 = 12;
const CPUID_80000008_ECX_APIC_ID_SIZE: u32 = 0xf << CPUID_80000008_ECX_APIC_ID_SIZE_SHIFT;
/// Leaf 0xB level types (ECX[15:8]).
const LEVEL_TYPE_INVALID: u32 = 0;
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Leaves that describe the topology level by level (Intel SDM vol. 2A,
/// CPUID leaves 0BH and 1FH): Linux reads 0x1F first where the CPU has
/// it, else 0xB, AMD included.
const TOPOLOGY_LEAVES: [u32; 2] = [0xb, 0x1f];

/// Makes the host's supported CPUID describe this guest: vCPU `cpu` of
/// `cpus`, one package of `cpus` single-threaded cores, under a hypervisor.
/// Everything else stays as KVM reports it (KVM already masks what it
/// cannot virtualise).
pub fn normalise_cpuid(host: &[kvm_cpuid_entry2], cpu: u8, cpus: u8) -> Vec<kvm_cpuid_entry2> {
    let (cpu, cpus) = (u32::from(cpu), u32::from(cpus.max(1)));
    // Bits needed to number the cores (leaf 0xB's "shift" for the core level).
    let core_bits = 32 - (cpus - 1).leading_zeros();
    let leaf0 = host.iter().find(|e| e.function == 0);
    let max_basic_leaf = leaf0.map_or(0, |e| e.eax);
    let vendor = leaf0.map(|e| (e.ebx, e.edx, e.ecx));
    let amd_topology = vendor == Some(VENDOR_AMD) || vendor == Some(VENDOR_HYGON);
    let mut entries = Vec::with_capacity(host.len() + 6);
    for leaf in host {
        let mut e = *leaf;
        match e.function {
            1 => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors
                // per package, [15:8] CLFLUSH line size in 8-byte units.
                e.ebx = (cpu << 24) | (cpus << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= CPUID_1_ECX_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= CPUID_1_EDX_HTT;
                } else {
                    e.edx &= !CPUID_1_EDX_HTT;
                }
            }
            4 => {
                // EAX[31:26]: cores per package - 1; [25:14]: threads
                // sharing this cache - 1 (the last level is shared by all).
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { cpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((cpus - 1) << 26) | (sharing << 14);
            }
            // Replaced as a whole below: the host's subleaves describe the
            // host, and KVM lists only those the host has (one, on a nested
            // TCG CPU: without the core level Linux made each vCPU a
            // package of its own).
            f if TOPOLOGY_LEAVES.contains(&f) => continue,
            // AMD's core count, which Linux reads where leaf 0xB is absent:
            // KVM passes the host's NC through (127 on a 64-core host).
            0x8000_0008 if amd_topology => {
                e.ecx = (e.ecx & !(CPUID_80000008_ECX_NC | CPUID_80000008_ECX_APIC_ID_SIZE))
                    | (cpus - 1)
                    | (core_bits << CPUID_80000008_ECX_APIC_ID_SIZE_SHIFT);
            }
            // AMD's extended APIC id, core id and node (APM vol. 3, E.4.17),
            // which KVM zeroes: with TOPOEXT and no leaf 0xB Linux takes
            // the APIC id from EAX, so every vCPU would claim APIC id 0.
            0x8000_001e if amd_topology => {
                e.eax = cpu;
                // [7:0] core id; [15:8] threads per core - 1 (one).
                e.ebx = cpu;
                // [7:0] node id; [10:8] nodes per package - 1 (one).
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
        entries.push(e);
    }
    for function in TOPOLOGY_LEAVES.into_iter().filter(|&f| f <= max_basic_leaf && host.iter().any(|e| e.function == f)) {
        entries.extend(topology_leaf(function, cpu, cpus, core_bits));
    }
    entries
}

/// The subleaves of a topology leaf (0xB or 0x1F) for vCPU `cpu` of
/// `cpus` single-threaded cores in one package: SMT, core, then the
/// invalid level that ends the list. EDX is the x2APIC id on every one.
fn topology_leaf(function: u32, cpu: u32, cpus: u32, core_bits: u32) -> [kvm_cpuid_entry2; 3] {
    // (EAX: APIC id bits below the next level, EBX: processors at this
    // level, level type)
    let levels = [(0, 1, LEVEL_TYPE_SMT), (core_bits, cpus, LEVEL_TYPE_CORE), (0, 0, LEVEL_TYPE_INVALID)];
    let mut index = 0;
    levels.map(|(eax, ebx, kind)| {
        let e = kvm_cpuid_entry2 {
            function,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx: (kind << 8) | index,
            edx: cpu,
            padding: [0; 3],
        };
        index += 1;
        e
    })
}

/// Advertises the LAPIC's TSC-deadline timer where KVM emulates it
/// (`KVM_CAP_TSC_DEADLINE_TIMER`). KVM_GET_SUPPORTED_CPUID leaves the bit
/// clear because the timer is KVM's, not the CPU's (KVM's api.rst); QEMU
/// and Firecracker set it. Without it Linux calibrates the LAPIC timer
/// against the PIT for 100 ms of every boot, and where that measurement
/// is disturbed (a loaded or nested host) it logs "APIC timer disabled
/// due to verification failure" and runs its timers on the PIT, late.
pub fn advertise_tsc_deadline(entries: &mut [kvm_cpuid_entry2], emulated: bool) {
    for e in entries.iter_mut().filter(|e| e.function == 1) {
        if emulated {
            e.ecx |= CPUID_1_ECX_TSC_DEADLINE;
        } else {
            e.ecx &= !CPUID_1_ECX_TSC_DEADLINE;
        }
    }
}

// MSR indices (Intel SDM vol. 4).
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// IA32_MISC_ENABLE bit 0: fast string operations (rep movs/stos).
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled (bit 11), default type write-back (6):
/// without it Linux maps all of RAM uncached.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSRs a vCPU starts with: what firmware would have left behind
/// (Firecracker's list): syscall MSRs cleared, fast strings and
/// write-back MTRRs on.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry { index, data, ..Default::default() })
    .collect()
}

// Local APIC registers (Intel SDM vol. 3A, 11.5.1): LVT LINT0/LINT1 and
// their delivery-mode field (bits 8–10).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_EXTINT: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x400;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as _;
    }
}

/// LINT0 delivers the PIC's interrupts (ExtINT), LINT1 NMIs: the virtual
/// wire mode a PC BIOS sets up, which Linux expects to find (MP spec 3.6.2).
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let value = (lapic_reg(lapic, reg) & !APIC_DELIVERY_MODE_MASK) | mode;
        set_lapic_reg(lapic, reg, value);
    }
}

/// x87 and SSE control words after FNINIT / at reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// Sets up vCPU `cpu` of `cpus`; the boot CPU also gets the long-mode
/// registers for `entry` (the others wait for Linux's INIT/SIPI in KVM).
pub fn configure(vcpu: &VcpuFd, cpu: u8, cpus: u8, supported: &CpuId, entry: Option<u64>) -> Result<(), Error> {
    let step = |step: &'static str| move |source| Error::Configure { cpu, step, source };
    let entries = normalise_cpuid(supported.as_slice(), cpu, cpus);
    let cpuid = CpuId::from_entries(&entries).map_err(|_| Error::CpuidEntries { cpu, count: entries.len() })?;
    vcpu.set_cpuid2(&cpuid).map_err(step("KVM_SET_CPUID2"))?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).expect("the boot MSR list is far below KVM_MAX_MSR_ENTRIES");
    let set = vcpu.set_msrs(&msrs).map_err(step("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(Error::Msrs { cpu, set, total: entries.len(), index: entries[set].index });
    }

    let mut lapic = vcpu.get_lapic().map_err(step("KVM_GET_LAPIC"))?;
    set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(step("KVM_SET_LAPIC"))?;

    if let Some(entry) = entry {
        vcpu.set_fpu(&boot_fpu()).map_err(step("KVM_SET_FPU"))?;
        let sregs = vcpu.get_sregs().map_err(step("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&boot::long_mode_sregs(sregs)).map_err(step("KVM_SET_SREGS"))?;
        vcpu.set_regs(&boot::entry_regs(entry)).map_err(step("KVM_SET_REGS"))?;
    }
    Ok(())
}

/// Where a vCPU exit's I/O goes.
pub trait ExitIo {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

impl ExitIo for Buses {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio.read(u64::from(port), data);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(u64::from(port), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            log::debug!("vmm: MMIO read of {} bytes at {addr:#x} hits no device", data.len());
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.mmio.write(addr, data) {
            log::debug!("vmm: MMIO write of {} bytes at {addr:#x} hits no device", data.len());
        }
    }
}

/// What the run loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Re-enter the guest (after checking whether the VM is stopping).
    Resume,
    /// The guest reset or shut down: the VM is over, normally.
    Reset,
    /// The VM cannot go on.
    Fail(Stop),
}

/// Why a vCPU stopped the VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stop {
    #[error("the guest crashed (KVM_SYSTEM_EVENT_CRASH)")]
    Crashed,
    #[error("unexpected KVM system event {0}")]
    SystemEvent(u32),
    #[error("the vCPU halted with no interrupt to wake it")]
    Halted,
    #[error("KVM could not enter the guest (hardware entry failure {reason:#x} on CPU {cpu})")]
    FailEntry { reason: u64, cpu: u32 },
    #[error("KVM internal error (KVM_EXIT_INTERNAL_ERROR)")]
    Internal,
    /// The exit as KVM named it.
    #[error("unexpected VM exit {0}")]
    UnexpectedExit(String),
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
}

/// What a VM exit means, doing its I/O through `io`.
pub fn handle_exit(exit: VcpuExit<'_>, io: &impl ExitIo) -> Decision {
    match exit {
        VcpuExit::IoIn(port, data) => {
            io.pio_read(port, data);
            Decision::Resume
        }
        VcpuExit::IoOut(port, data) => {
            io.pio_write(port, data);
            Decision::Resume
        }
        VcpuExit::MmioRead(addr, data) => {
            io.mmio_read(addr, data);
            Decision::Resume
        }
        VcpuExit::MmioWrite(addr, data) => {
            io.mmio_write(addr, data);
            Decision::Resume
        }
        // A signal kicked the vCPU out (we are stopping, or it was not
        // for us): the loop decides.
        VcpuExit::Intr => Decision::Resume,
        // Triple fault: Linux's `reboot=t`, or a guest gone wrong; either
        // way the guest is over and the host reads what it left.
        VcpuExit::Shutdown => Decision::Reset,
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN | KVM_SYSTEM_EVENT_RESET => Decision::Reset,
            KVM_SYSTEM_EVENT_CRASH => Decision::Fail(Stop::Crashed),
            other => Decision::Fail(Stop::SystemEvent(other)),
        },
        // With KVM's in-kernel LAPIC a HLT never comes to us; one that does
        // would never be woken.
        VcpuExit::Hlt => Decision::Fail(Stop::Halted),
        VcpuExit::FailEntry(reason, cpu) => Decision::Fail(Stop::FailEntry { reason, cpu }),
        VcpuExit::InternalError => Decision::Fail(Stop::Internal),
        other => Decision::Fail(Stop::UnexpectedExit(format!("{other:?}"))),
    }
}

/// How the VM ended, as decided by the first vCPU or device to say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    Reset,
    Failed { cpu: u8, reason: Stop },
}

/// What the run loop and the vCPU threads share.
#[derive(Debug)]
pub struct RunControl {
    /// Set by the run loop: vCPUs leave instead of re-entering the guest.
    pub stopping: AtomicBool,
    end: Mutex<Option<End>>,
    /// Readable once `end` is set.
    ended: EventFd,
    /// When the boot vCPU first entered KVM_RUN (the "VMM start" mark).
    pub first_run: OnceLock<Instant>,
    /// System calls the vCPU threads' seccomp filter refused.
    pub violations: super::seccomp::Violations,
}

impl RunControl {
    pub fn new() -> std::io::Result<RunControl> {
        Ok(RunControl {
            stopping: AtomicBool::new(false),
            end: Mutex::new(None),
            ended: EventFd::new(EFD_NONBLOCK)?,
            first_run: OnceLock::new(),
            violations: Default::default(),
        })
    }

    /// Records how the VM ended; the first word wins. The vCPU that
    /// caused it (an i8042 write, a triple fault) does not re-enter the
    /// guest: like a real reset, nothing runs after it.
    pub fn finish(&self, end: End) {
        self.stopping.store(true, Ordering::Release);
        let mut slot = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(end);
            let _ = self.ended.write(1);
        }
    }

    pub fn end(&self) -> Option<End> {
        self.end.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn ended_fd(&self) -> &EventFd {
        &self.ended
    }
}

impl ResetSink for RunControl {
    fn reset(&self) {
        self.finish(End::Reset);
    }
}

/// The body of vCPU `cpu`'s thread: run until the VM ends or the run loop
/// says stop.
pub fn run(mut vcpu: VcpuFd, cpu: u8, io: &Buses, control: &RunControl, trace: Option<&dyn Fn(Instant)>) {
    if cpu == 0 {
        let now = Instant::now();
        let _ = control.first_run.set(now);
        if let Some(trace) = trace {
            trace(now);
        }
    }
    while !control.stopping.load(Ordering::Acquire) {
        let decision = match vcpu.run() {
            Ok(exit) => handle_exit(exit, io),
            // EINTR: kicked by our signal; EAGAIN: KVM asks to retry.
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Decision::Resume,
            Err(e) => Decision::Fail(Stop::Run(e)),
        };
        match decision {
            Decision::Resume => {}
            Decision::Reset => {
                control.finish(End::Reset);
                return;
            }
            Decision::Fail(reason) => {
                control.finish(End::Failed { cpu, reason });
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Recorder(RefCell<Vec<String>>);
    impl ExitIo for Recorder {
        fn pio_read(&self, port: u16, data: &mut [u8]) {
            data.fill(0x42);
            self.0.borrow_mut().push(format!("in {port:#x} {}", data.len()));
        }
        fn pio_write(&self, port: u16, data: &[u8]) {
            self.0.borrow_mut().push(format!("out {port:#x} {data:x?}"));
        }
        fn mmio_read(&self, addr: u64, data: &mut [u8]) {
            data.fill(0x24);
            self.0.borrow_mut().push(format!("read {addr:#x} {}", data.len()));
        }
        fn mmio_write(&self, addr: u64, data: &[u8]) {
            self.0.borrow_mut().push(format!("write {addr:#x} {data:x?}"));
        }
    }

    #[test]
    fn exits_decide_what_happens_next() {
        let io = Recorder::default();
        let mut in_data = [0u8; 1];
        let mut mmio_data = [0u8; 4];
        let cases: Vec<(VcpuExit, Decision)> = vec![
            (VcpuExit::IoOut(0x3f8, b"L"), Decision::Resume),
            (VcpuExit::IoIn(0x3fd, &mut in_data), Decision::Resume),
            (VcpuExit::MmioWrite(0xd000_0050, &[0, 0, 0, 0]), Decision::Resume),
            (VcpuExit::MmioRead(0xd000_0000, &mut mmio_data), Decision::Resume),
            (VcpuExit::Intr, Decision::Resume),
            (VcpuExit::Shutdown, Decision::Reset),
            (VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]), Decision::Reset),
            (VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]), Decision::Reset),
            (
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[]),
                Decision::Fail(Stop::Crashed),
            ),
            (VcpuExit::Hlt, Decision::Fail(Stop::Halted)),
            (VcpuExit::FailEntry(0x80000021, 1), Decision::Fail(Stop::FailEntry { reason: 0x80000021, cpu: 1 })),
            (VcpuExit::InternalError, Decision::Fail(Stop::Internal)),
            (VcpuExit::Exception, Decision::Fail(Stop::UnexpectedExit("Exception".into()))),
        ];
        for (exit, want) in cases {
            let what = format!("{exit:?}");
            assert_eq!(handle_exit(exit, &io), want, "{what}");
        }
        assert_eq!(
            Stop::FailEntry { reason: 0x80000021, cpu: 1 }.to_string(),
            "KVM could not enter the guest (hardware entry failure 0x80000021 on CPU 1)"
        );
        assert_eq!(in_data, [0x42]);
        assert_eq!(mmio_data, [0x24; 4]);
        assert_eq!(
            *io.0.borrow(),
            vec!["out 0x3f8 [4c]", "in 0x3fd 1", "write 0xd0000050 [0, 0, 0, 0]", "read 0xd0000000 4"]
        );
    }

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, flags: 0, eax, ebx, ecx, edx, padding: [0; 3] }
    }

    fn regs(e: &kvm_cpuid_entry2) -> (u32, u32, u32, u32, u32, u32) {
        (e.function, e.index, e.eax, e.ebx, e.ecx, e.edx)
    }

    #[test]
    fn cpuid_describes_this_vcpu() {
        let host = vec![
            entry(0, 0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(1, 0, 0x906ea, 0x0710_0800 | 0x5a, 0x7ffa_fbff, 0xbfeb_fbff),
            entry(4, 0, 0x1c00_4121, 1, 2, 3),
            entry(4, 3, 0x1c03_c163, 1, 2, 3),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 16, 0x201, 7),
            entry(0xb, 2, 0, 0, 2, 7),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        ];
        let e = normalise_cpuid(&host, 2, 4);
        let got: Vec<_> = e.iter().map(regs).collect();
        assert_eq!(
            got,
            vec![
                (0, 0, 0xd, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
                (1, 0, 0x906ea, 0x0204_085a, 0xfffa_fbff, 0xbfeb_fbff),
                (4, 0, (3 << 26) | 0x121, 1, 2, 3),
                (4, 3, (3 << 26) | (3 << 14) | 0x163, 1, 2, 3),
                (0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
                (0xb, 0, 0, 1, 0x100, 2),
                (0xb, 1, 2, 4, 0x201, 2),
                (0xb, 2, 0, 0, 2, 2),
            ]
        );
        assert!(e[5..].iter().all(|e| e.flags == KVM_CPUID_FLAG_SIGNIFCANT_INDEX), "subleaves are indexed");
        let one = normalise_cpuid(&host, 0, 1);
        assert_eq!(regs(&one[1]), (1, 0, 0x906ea, 0x0001_085a, 0xfffa_fbff, 0xafeb_fbff), "no HTT with one CPU");
        assert_eq!(regs(&one[6]), (0xb, 1, 0, 1, 0x201, 0));
    }

    /// Found by tier 3: a nested TCG CPU has only subleaf 0 of leaf 0xB,
    /// so KVM listed only that one, and Linux, finding no core level, made
    /// each vCPU a package (and its TSC "unsynchronized").
    #[test]
    fn topology_leaves_have_every_level_whatever_the_host_lists() {
        let leaf0 = |max| entry(0, 0, max, 0x6874_7541, 0x444d_4163, 0x6974_6e65);
        let topology = |f| {
            vec![
                (f, 0, 0, 1, 0x100, 1),
                (f, 1, 1, 2, 0x201, 1),
                (f, 2, 0, 0, 0x2, 1),
            ]
        };
        // (host entries, the topology subleaves vCPU 1 of 2 must get)
        let cases = [
            // Nested TCG (Debian's QEMU 7.2 -cpu max): one subleaf.
            (vec![leaf0(0xd), entry(0xb, 0, 0, 1, 0x100, 0)], topology(0xb)),
            // A host with both leaves, 0x1F with a die level.
            (
                vec![
                    leaf0(0x1f),
                    entry(0xb, 0, 1, 2, 0x100, 9),
                    entry(0xb, 1, 7, 64, 0x201, 9),
                    entry(0x1f, 0, 1, 2, 0x100, 9),
                    entry(0x1f, 1, 7, 64, 0x201, 9),
                    entry(0x1f, 2, 8, 128, 0x502, 9),
                ],
                [topology(0xb), topology(0x1f)].concat(),
            ),
            // A CPU without the leaves (max basic leaf below 0xB) gets none.
            (vec![leaf0(0xa)], vec![]),
        ];
        for (host, want) in cases {
            let got: Vec<_> =
                normalise_cpuid(&host, 1, 2).iter().filter(|e| TOPOLOGY_LEAVES.contains(&e.function)).map(regs).collect();
            assert_eq!(got, want, "host {:x?}", host.iter().map(regs).collect::<Vec<_>>());
        }
    }

    #[test]
    fn cpuid_gives_amd_guests_one_package_of_cores() {
        let (b, d, c) = VENDOR_AMD;
        let host = vec![
            entry(0, 0, 0x10, b, c, d),
            // KVM's 0x80000008 on a nested TCG CPU: NC 0, ApicIdSize 0.
            entry(0x8000_0008, 0, 0x3030, 0, 0x0000_0000, 0),
            // And on a 64-core, 128-thread host: NC 127, ApicIdSize 7.
            entry(0x8000_0008, 1, 0x3030, 0, 0x0001_707f, 0),
            entry(0x8000_001e, 0, 0, 0, 0, 0),
        ];
        for (cpu, cpus, ecx_nested, ecx_host, leaf_1e) in [
            (0u8, 1u8, 0x0000_0000, 0x0001_0000, (0, 0, 0, 0)),
            (1, 2, 0x0000_1001, 0x0001_1001, (1, 1, 0, 0)),
            (4, 6, 0x0000_3005, 0x0001_3005, (4, 4, 0, 0)),
        ] {
            let got: Vec<_> = normalise_cpuid(&host, cpu, cpus).iter().map(regs).collect();
            assert_eq!(
                got[1..],
                [
                    (0x8000_0008, 0, 0x3030, 0, ecx_nested, 0),
                    (0x8000_0008, 1, 0x3030, 0, ecx_host, 0),
                    (0x8000_001e, 0, leaf_1e.0, leaf_1e.1, leaf_1e.2, leaf_1e.3),
                ],
                "vCPU {cpu} of {cpus}"
            );
        }
        // Hygon reads the same leaves; Intel's 0x80000008 ECX is reserved.
        for (vendor, changed) in [(VENDOR_HYGON, true), ((0x756e_6547, 0x4965_6e69, 0x6c65_746e), false)] {
            let mut h = host.clone();
            h[0] = entry(0, 0, 0x10, vendor.0, vendor.2, vendor.1);
            assert_eq!(normalise_cpuid(&h, 1, 2)[1].ecx != 0, changed, "{vendor:x?}");
        }
    }

    #[test]
    fn the_tsc_deadline_timer_is_advertised_only_where_kvm_emulates_it() {
        // Leaf 1 as KVM_GET_SUPPORTED_CPUID gives it: bit 24 clear.
        let supported = vec![entry(0, 0, 0xd, 1, 2, 3), entry(1, 0, 0x906ea, 0x800, 0x7efa_fbff, 0xbfeb_fbff)];
        let cases = [(true, 0x7ffa_fbff), (false, 0x7efa_fbff)];
        for (emulated, ecx) in cases {
            for start in [0x7efa_fbff, 0x7ffa_fbff] {
                let mut e = supported.clone();
                e[1].ecx = start;
                advertise_tsc_deadline(&mut e, emulated);
                assert_eq!(regs(&e[1]), (1, 0, 0x906ea, 0x800, ecx, 0xbfeb_fbff), "emulated={emulated} from {start:#x}");
                assert_eq!(regs(&e[0]), (0, 0, 0xd, 1, 2, 3), "other leaves untouched");
            }
        }
    }

    #[test]
    fn msrs_lapic_and_fpu() {
        let msrs: Vec<(u32, u64)> = boot_msrs().iter().map(|m| (m.index, m.data)).collect();
        assert_eq!(msrs.len(), 11);
        assert!(msrs.contains(&(0x1a0, 1)));
        assert!(msrs.contains(&(0x2ff, 0x806)));
        assert!(msrs.iter().filter(|m| m.0 != 0x1a0 && m.0 != 0x2ff).all(|m| m.1 == 0));

        let mut lapic = kvm_lapic_state { regs: [0; 1024] };
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0000); // masked, fixed
        set_lapic_reg(&mut lapic, APIC_LVT1, 0x0001_0200); // masked, SMI
        set_lint(&mut lapic);
        assert_eq!((lapic_reg(&lapic, APIC_LVT0), lapic_reg(&lapic, APIC_LVT1)), (0x0001_0700, 0x0001_0400));
        assert!(lapic.regs[..0x350].iter().all(|&b| b == 0));

        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr, fpu.fsw), (0x37f, 0x1f80, 0));
    }

    #[test]
    fn the_first_end_wins() {
        let c = RunControl::new().unwrap();
        assert!(c.ended_fd().read().is_err());
        assert!(!c.stopping.load(Ordering::Acquire));
        c.reset();
        assert!(c.stopping.load(Ordering::Acquire), "no vCPU re-enters the guest after a reset");
        c.finish(End::Failed { cpu: 1, reason: Stop::Halted });
        assert_eq!(c.end(), Some(End::Reset));
        assert_eq!(c.ended_fd().read().unwrap(), 1);
    }
}
