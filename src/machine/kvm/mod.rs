//! The built-in VMM: boots the guest contract (kernel + initramfs +
//! command line + virtio-mmio disks + one 8250) on /dev/kvm with nothing
//! but rust-vmm crates, in this process.
//!
//! A run follows the boot sequence of rust-vmm's vmm-reference, in order:
//! 1. KVM: open /dev/kvm once ([`KvmMachine::new`]: API version,
//!    capabilities, supported CPUID); per run a VM with the in-kernel
//!    irqchip (PIC, IOAPIC, LAPICs), the PIT and the TSS pages.
//! 2. Memory ([`memory`]): `--memory` MiB of lazily backed RAM, split
//!    around the MMIO gap of [`layout`], registered with KVM.
//! 3. Boot ([`boot`]): kernel (vmlinux, else bzImage), initramfs, command
//!    line with one `virtio_mmio.device=` per disk, zero page, page
//!    tables, GDT, [`mptable`].
//! 4. Devices ([`devices`], on a [`bus`]): COM1 → the console callback,
//!    the i8042 whose reset ends the VM, one virtio-blk per disk; every
//!    interrupt is an irqfd.
//! 5. vCPUs ([`vcpu`]): CPUID, MSRs, LAPIC, long-mode registers for the
//!    boot CPU; one thread each, confined by a seccomp filter
//!    ([`seccomp`]) before its first KVM_RUN, running until a reset, a
//!    triple fault (`KVM_EXIT_SHUTDOWN`), the deadline or `stop`.

pub mod boot;
pub mod bus;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod seccomp;
pub mod vcpu;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, CpuId, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::{GuestExit, GuestSpec, Machine, MachineError};
use bus::{BusDevice, Buses};
use devices::i8042::I8042;
use devices::serial::{ConsoleBuffer, Serial};
use devices::virtio_blk::Block;
use devices::virtio_mmio::VirtioMmio;
use devices::IrqLine;
use memory::GuestMemory;
use vcpu::{End, RunControl};

/// How often the run loop looks at `stop` and the deadline while the
/// guest is quiet (an `AtomicBool` cannot be waited on).
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long stopping the vCPU threads may take before we give up on them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Offset from SIGRTMIN of the signal that kicks a vCPU out of KVM_RUN.
const KICK_SIGNAL_OFFSET: i32 = 0;
/// Set to 1 to print, at the first KVM_RUN, how long the VMM took to start.
pub const TRACE_ENV: &str = "RUNASROOT_TRACE_VMM";
/// How the trace line starts.
pub const TRACE_PREFIX: &str = "runasroot: vmm: first KVM_RUN ";

/// The capabilities a run needs, with the reason (for the error message).
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// Errors of the built-in VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm: permission denied; fix: add your user to the kvm group (sudo usermod -aG kvm $USER, then log in again), or use --vmm qemu")]
    KvmPermission(#[source] kvm_ioctls::Error),
    #[error("/dev/kvm does not exist: KVM is not available on this host (load kvm_intel/kvm_amd, or enable virtualisation in the firmware); or use --vmm qemu")]
    KvmMissing(#[source] kvm_ioctls::Error),
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("/dev/kvm speaks KVM API version {found}; the built-in VMM needs version {KVM_API_VERSION}")]
    ApiVersion { found: i32 },
    #[error("/dev/kvm lacks {cap}, which the built-in VMM needs; use --vmm qemu")]
    MissingCapability { cap: &'static str },
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("{cpus} vCPUs requested; this host's KVM allows at most {max}")]
    TooManyCpus { cpus: u8, max: usize },
    #[error("cannot set up the VM: {step} failed")]
    CreateVm {
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot create vCPU {cpu}")]
    CreateVcpu {
        cpu: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Disk(#[from] devices::virtio_blk::Error),
    #[error("cannot wire a device onto the VMM bus")]
    Bus(#[from] bus::Error),
    #[error("cannot create the eventfd of {what}")]
    EventFd {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot register the interrupt line of {what} (GSI {gsi}) with KVM")]
    Irqfd {
        what: &'static str,
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot install the signal handler that stops vCPU threads")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start the thread of vCPU {cpu}")]
    SpawnVcpu {
        cpu: u8,
        #[source]
        source: io::Error,
    },
    #[error("waiting for the guest failed")]
    Wait(#[source] io::Error),
    #[error("vCPU {cpu} stopped the guest")]
    GuestFailed {
        cpu: u8,
        #[source]
        reason: vcpu::Stop,
    },
    #[error("the vCPU threads did not stop within {STOP_TIMEOUT:?}")]
    StopTimeout,
    #[error("cannot confine vCPU {cpu} with its seccomp filter")]
    Confine {
        cpu: u8,
        #[source]
        source: seccomp::Error,
    },
    #[error("vCPU {cpu} made system call {syscall}, which its seccomp filter forbids: the call was refused and the guest stopped; \
             this is a bug in runasroot (or a guest breaking into the VMM), please report it (`grep -w {syscall} \
             /usr/include/x86_64-linux-gnu/asm/unistd_64.h` names the call); --vmm qemu avoids the built-in VMM")]
    SyscallRefused { cpu: u8, syscall: i64 },
}

/// Why the built-in VMM cannot boot Linux on this host. Says what the
/// host lacks; the way out (`--vmm qemu`, the kvm group) is in the
/// message only where it is the one fix.
#[derive(Debug, thiserror::Error)]
pub enum Unsupported {
    #[error("/dev/kvm does not exist (no KVM on this host)")]
    NoDevice,
    #[error("/dev/kvm is PVM (kvm_pvm is loaded): it cannot boot Linux")]
    Pvm,
    #[error("the CPU shows no hardware virtualisation (no vmx/svm in /proc/cpuinfo)")]
    NoHardwareVirtualisation,
    #[error("cannot open /dev/kvm (permission denied); fix: add your user to the kvm group")]
    Permission(#[source] io::Error),
    #[error("cannot open /dev/kvm")]
    Open(#[source] io::Error),
}

/// Whether the built-in VMM can boot Linux here: `/dev/kvm` must exist,
/// be usable by us, and be backed by hardware virtualisation (PVM's
/// `/dev/kvm` runs guest kernel code about 1000× slower and a stock
/// kernel does not boot on it; DESIGN.md). Fast: reads two files and
/// opens /dev/kvm, creates no VM.
pub fn hardware_support() -> Result<(), Unsupported> {
    let dev = Path::new("/dev/kvm");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let open = dev.exists().then(|| std::fs::OpenOptions::new().read(true).write(true).open(dev).map(drop));
    classify_host(open, Path::new("/sys/module/kvm_pvm").exists(), cpu_has_virtualisation(&cpuinfo))
}

/// The decision of [`hardware_support`]: `open` is None when /dev/kvm
/// does not exist.
fn classify_host(open: Option<io::Result<()>>, pvm: bool, hw_virt: bool) -> Result<(), Unsupported> {
    match open {
        None => Err(Unsupported::NoDevice),
        Some(_) if pvm => Err(Unsupported::Pvm),
        Some(_) if !hw_virt => Err(Unsupported::NoHardwareVirtualisation),
        Some(Err(e)) if e.kind() == io::ErrorKind::PermissionDenied => Err(Unsupported::Permission(e)),
        Some(Err(e)) => Err(Unsupported::Open(e)),
        Some(Ok(())) => Ok(()),
    }
}

fn cpu_has_virtualisation(cpuinfo: &str) -> bool {
    cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The built-in VMM.
pub struct KvmMachine {
    kvm: Kvm,
    supported_cpuid: CpuId,
    created: Instant,
    first_kvm_run: Option<Instant>,
}

impl std::fmt::Debug for KvmMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmMachine").field("created", &self.created).finish_non_exhaustive()
    }
}

impl KvmMachine {
    /// Opens /dev/kvm and checks that it can run our guest.
    pub fn new() -> Result<KvmMachine, Error> {
        let created = Instant::now();
        let kvm = Kvm::new().map_err(|e| match e.errno() {
            libc::EACCES | libc::EPERM => Error::KvmPermission(e),
            libc::ENOENT | libc::ENODEV | libc::ENXIO => Error::KvmMissing(e),
            _ => Error::OpenKvm(e),
        })?;
        let found = kvm.get_api_version();
        if found != KVM_API_VERSION as i32 {
            return Err(Error::ApiVersion { found });
        }
        if let Some((_, cap)) = REQUIRED_CAPS.iter().find(|(cap, _)| !kvm.check_extension(*cap)) {
            return Err(Error::MissingCapability { cap });
        }
        let mut supported_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::SupportedCpuid)?;
        vcpu::advertise_tsc_deadline(supported_cpuid.as_mut_slice(), kvm.check_extension(Cap::TscDeadlineTimer));
        Ok(KvmMachine { kvm, supported_cpuid, created, first_kvm_run: None })
    }

    /// When the boot vCPU of the last run first entered KVM_RUN: minus the
    /// caller's own start mark, that is the VMM's start time.
    pub fn first_kvm_run(&self) -> Option<Instant> {
        self.first_kvm_run
    }

    /// Step 1 of a run: the VM and KVM's in-kernel devices.
    fn create_vm(&self) -> Result<VmFd, Error> {
        let step = |step| move |source| Error::CreateVm { step, source };
        let vm = self.kvm.create_vm().map_err(step("KVM_CREATE_VM"))?;
        vm.set_tss_address(layout::KVM_TSS_START as usize).map_err(step("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(step("KVM_CREATE_IRQCHIP"))?;
        // The PIT after the irqchip (it needs the PIC); the dummy speaker
        // port answers 0x61, which Linux reads while calibrating the TSC.
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(step("KVM_CREATE_PIT2"))?;
        Ok(vm)
    }

    /// Step 4: the devices on their buses, interrupts wired to KVM.
    fn create_devices(
        vm: &VmFd,
        mem: &Arc<GuestMemory>,
        spec: &GuestSpec,
        control: &Arc<RunControl>,
        console: &Arc<ConsoleBuffer>,
    ) -> Result<Buses, Error> {
        let irq = |what: &'static str, gsi: u32| -> Result<IrqLine, Error> {
            let line = IrqLine::new(gsi).map_err(|source| Error::EventFd { what, source })?;
            vm.register_irqfd(line.eventfd(), gsi).map_err(|source| Error::Irqfd { what, gsi, source })?;
            Ok(line)
        };
        let mut buses = Buses::default();
        let serial = Serial::new(irq("the serial port", layout::SERIAL_IRQ)?, console.clone());
        buses.pio.insert(layout::SERIAL_PORT.into(), layout::SERIAL_PORT_SIZE.into(), Arc::new(Mutex::new(serial)))?;
        let i8042 = I8042::new(control.clone());
        buses.pio.insert(layout::I8042_PORT.into(), layout::I8042_PORT_SIZE.into(), Arc::new(Mutex::new(i8042)))?;
        for (slot, disk) in spec.disks.iter().enumerate() {
            let block = Block::open(disk)?;
            let line = irq("a virtio disk", layout::virtio_irq(slot))?;
            let device: Arc<Mutex<dyn BusDevice>> =
                Arc::new(Mutex::new(VirtioMmio::new(block, mem.clone(), Box::new(line))));
            buses.mmio.insert(layout::virtio_mmio_addr(slot), layout::VIRTIO_MMIO_SIZE, device)?;
        }
        Ok(buses)
    }

    fn start(&mut self, spec: &GuestSpec, console: &mut dyn FnMut(&[u8])) -> Result<GuestExit, Error> {
        let run_start = Instant::now();
        // KVM_CAP_MAX_VCPUS is the limit; KVM_CAP_NR_VCPUS (the host's
        // CPUs) only a recommendation: past it the vCPUs share host CPUs,
        // slower but correct, as QEMU allows too.
        let max = self.kvm.get_max_vcpus().min(usize::from(crate::machine::MAX_CPUS));
        if spec.cpus == 0 || usize::from(spec.cpus) > max {
            return Err(Error::TooManyCpus { cpus: spec.cpus, max });
        }
        let recommended = self.kvm.get_nr_vcpus();
        if usize::from(spec.cpus) > recommended {
            log::debug!("vmm: {} vCPUs on a host whose KVM recommends at most {recommended}: they share its CPUs", spec.cpus);
        }
        install_kick_handler()?;
        seccomp::install_sigsys_handler().map_err(|source| Error::Confine { cpu: 0, source })?;
        // Step marks for RUNASROOT_TRACE_VMM's breakdown of the start time.
        let mut marks: Vec<(&'static str, Instant)> = vec![("start", run_start)];

        let vm = self.create_vm()?;
        marks.push(("vm", Instant::now()));
        let mem = Arc::new(memory::create(spec.memory_mib)?);
        marks.push(("memory", Instant::now()));
        let boot = boot::load(&mem, &spec.kernel, &spec.initramfs, &spec.cmdline, spec.disks.len(), spec.cpus)?;
        marks.push(("boot", Instant::now()));
        // Registered after loading: measured on this project's PVM hosts,
        // the other order costs 3–4 ms more (KVM then tracks the pages
        // the loader faults in one by one).
        memory::register(&vm, &mem)?;
        marks.push(("register", Instant::now()));
        log::debug!("vmm: kernel entry {:#x}, command line {:?}", boot.kernel.entry, boot.cmdline);

        let control = Arc::new(RunControl::new().map_err(|source| Error::EventFd { what: "the run loop", source })?);
        let console_buf = ConsoleBuffer::new().map_err(|source| Error::EventFd { what: "the console", source })?;
        let buses = Arc::new(Self::create_devices(&vm, &mem, spec, &control, &console_buf)?);
        marks.push(("devices", Instant::now()));

        let mut vcpus = Vec::with_capacity(usize::from(spec.cpus));
        for cpu in 0..spec.cpus {
            let fd = vm.create_vcpu(u64::from(cpu)).map_err(|source| Error::CreateVcpu { cpu, source })?;
            vcpu::configure(&fd, cpu, spec.cpus, &self.supported_cpuid, (cpu == 0).then_some(boot.kernel.entry))?;
            let filter = seccomp::vcpu_filter(fd.as_raw_fd()).map_err(|source| Error::Confine { cpu, source })?;
            vcpus.push((fd, filter));
        }
        marks.push(("vcpus", Instant::now()));
        let steps: String = marks
            .windows(2)
            .map(|w| format!(" {} {:.3}", w[1].0, w[1].1.duration_since(w[0].1).as_secs_f64() * 1e3))
            .collect();

        let trace = std::env::var(TRACE_ENV).as_deref() == Ok("1");
        // Read before the vCPU threads are confined (they may not open files).
        let process_started = if trace { process_start() } else { None };
        let created = if self.first_kvm_run.is_none() { self.created } else { run_start };
        let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(vcpus.len());
        let mut spawn_error = None;
        for (cpu, (fd, filter)) in (0u8..).zip(vcpus) {
            let (buses, control, steps) = (buses.clone(), control.clone(), steps.clone());
            let (confined_tx, confined) = mpsc::sync_channel(1);
            let spawned = std::thread::Builder::new().name(format!("vcpu{cpu}")).spawn(move || {
                let kick = SIGRTMIN() + KICK_SIGNAL_OFFSET;
                let _reporting = match seccomp::confine_vcpu_thread(&filter, kick, &control.violations, cpu) {
                    Ok(guard) => {
                        let _ = confined_tx.send(Ok(()));
                        guard
                    }
                    Err(e) => {
                        let _ = confined_tx.send(Err(e));
                        return;
                    }
                };
                let print = move |at: Instant| print_start_trace(created, process_started, at, &steps);
                vcpu::run(fd, cpu, &buses, &control, if trace { Some(&print) } else { None });
            });
            let started = match spawned {
                Ok(handle) => {
                    threads.push(handle);
                    confined.recv().unwrap_or(Ok(())).map_err(|source| Error::Confine { cpu, source })
                }
                Err(source) => Err(Error::SpawnVcpu { cpu, source }),
            };
            if let Err(e) = started {
                spawn_error = Some(e);
                break;
            }
        }

        let outcome = match spawn_error {
            Some(e) => Err(e),
            None => wait(spec, &control, &console_buf, console),
        };
        let stopped = stop_vcpus(&control, threads);
        let rest = console_buf.take();
        if !rest.is_empty() {
            console(&rest);
        }
        // A call refused while the threads stopped fails the run too.
        let outcome = match (outcome, control.violations.first()) {
            (Ok(_), Some(v)) => Err(Error::SyscallRefused { cpu: v.cpu, syscall: v.syscall }),
            (outcome, _) => outcome,
        };
        self.first_kvm_run = control.first_run.get().copied();
        // The VM (and with it every vCPU and irqfd) goes before the memory
        // it maps: `vm` and the last vCPU fd are dropped by now, `mem` after.
        drop(vm);
        let outcome = outcome?;
        stopped?;
        Ok(outcome)
    }
}

impl Machine for KvmMachine {
    fn name(&self) -> String {
        "builtin".into()
    }



    fn boots_vmlinux(&self) -> bool {
        true
    }

    fn run(&mut self, spec: &GuestSpec, console: &mut dyn FnMut(&[u8])) -> Result<GuestExit, MachineError> {
        Ok(self.start(spec, console)?)
    }
}

/// The run loop: hands console output to the caller until the VM ends,
/// the deadline passes or `stop` is set.
fn wait(
    spec: &GuestSpec,
    control: &RunControl,
    console_buf: &ConsoleBuffer,
    console: &mut dyn FnMut(&[u8]),
) -> Result<GuestExit, Error> {
    loop {
        let bytes = console_buf.take();
        if !bytes.is_empty() {
            console(&bytes);
        }
        if let Some(v) = control.violations.first() {
            return Err(Error::SyscallRefused { cpu: v.cpu, syscall: v.syscall });
        }
        match control.end() {
            Some(End::Reset) => return Ok(GuestExit::Reset),
            Some(End::Failed { cpu, reason }) => return Err(Error::GuestFailed { cpu, reason }),
            None => {}
        }
        if spec.stop.load(Ordering::Acquire) {
            return Ok(GuestExit::Stopped);
        }
        let now = Instant::now();
        let timeout = match spec.deadline {
            Some(deadline) if deadline <= now => return Ok(GuestExit::TimedOut),
            Some(deadline) => POLL_INTERVAL.min(deadline - now),
            None => POLL_INTERVAL,
        };
        wait_readable(&[control.ended_fd().as_raw_fd(), console_buf.eventfd().as_raw_fd()], timeout)
            .map_err(Error::Wait)?;
    }
}

/// Blocks until one of `fds` is readable or `timeout` passes.
fn wait_readable(fds: &[RawFd], timeout: Duration) -> io::Result<()> {
    let mut pollfds: Vec<libc::pollfd> =
        fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pollfds` is a live, correctly sized array of pollfd that
    // poll(2) only writes `revents` into; the fds belong to eventfds the
    // caller keeps open for the duration of the call.
    let ret = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, ms) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(())
}

/// The kick signal's handler does nothing: its only job is to make
/// KVM_RUN return EINTR (installed without SA_RESTART).
extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), Error> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let installed = INSTALLED
        .get_or_init(|| register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler).map_err(|e| e.errno()));
    installed.map_err(|errno| Error::SignalHandler(vmm_sys_util::errno::Error::new(errno)))
}

/// Makes every vCPU thread leave KVM_RUN and waits for it. The signal is
/// repeated until the thread is gone: one sent between the thread's look
/// at `stopping` and its next KVM_RUN would otherwise be lost.
fn stop_vcpus(control: &RunControl, threads: Vec<JoinHandle<()>>) -> Result<(), Error> {
    control.stopping.store(true, Ordering::Release);
    let give_up = Instant::now() + STOP_TIMEOUT;
    loop {
        let running: Vec<&JoinHandle<()>> = threads.iter().filter(|t| !t.is_finished()).collect();
        if running.is_empty() {
            break;
        }
        if Instant::now() > give_up {
            // Leave them detached: they hold their own references to the
            // memory and devices, and die with the process.
            return Err(Error::StopTimeout);
        }
        for t in running {
            let _ = t.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// `RUNASROOT_TRACE_VMM=1`: the VMM's start time, from process start (as
/// the kernel records it, in clock ticks) and from `KvmMachine::new`,
/// plus the CLOCK_MONOTONIC time of the first KVM_RUN, so that a parent
/// process can measure spawn → first KVM_RUN exactly (benches/vmm.rs).
/// Runs on the confined boot vCPU: only clock_gettime and a write to
/// stderr; `process_started` was read before.
fn print_start_trace(created: Instant, process_started: Option<Duration>, first_run: Instant, steps: &str) {
    let monotonic = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
        .unwrap_or(f64::NAN);
    let from_new = first_run.duration_since(created).as_secs_f64() * 1e3;
    let age = process_started.and_then(|started| boottime()?.checked_sub(started));
    let from_process = match age {
        Some(age) => format!(
            "{:.1} ms after process start (±{} ms: /proc clock ticks), ",
            age.as_secs_f64() * 1e3,
            1000 / clock_ticks_per_second()
        ),
        None => String::new(),
    };
    eprintln!("{TRACE_PREFIX}{from_process}{from_new:.3} ms after KvmMachine::new (run steps, ms:{steps}); CLOCK_MONOTONIC {monotonic:.6}");
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&hz| hz > 0).unwrap_or(100)
}

/// When this process started, in CLOCK_BOOTTIME: the start time in
/// /proc/self/stat (field 22, clock ticks since boot).
fn process_start() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let start_ticks = parse_start_ticks(&stat)?;
    Some(Duration::from_secs_f64(start_ticks as f64 / clock_ticks_per_second() as f64))
}

fn boottime() -> Option<Duration> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    Some(Duration::new(now.tv_sec() as u64, now.tv_nsec() as u32))
}

/// Field 22 of /proc/PID/stat; the command name (field 2) may contain
/// spaces and parentheses, so fields are counted after its last ')'.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_classification() {
        let denied = || Some(Err(io::Error::from(io::ErrorKind::PermissionDenied)));
        type Case = (Option<io::Result<()>>, bool, bool, Result<(), &'static str>);
        let cases: Vec<Case> = vec![
            (None, false, true, Err("/dev/kvm does not exist (no KVM on this host)")),
            (Some(Ok(())), true, false, Err("/dev/kvm is PVM (kvm_pvm is loaded): it cannot boot Linux")),
            (Some(Ok(())), true, true, Err("/dev/kvm is PVM (kvm_pvm is loaded): it cannot boot Linux")),
            (Some(Ok(())), false, false, Err("the CPU shows no hardware virtualisation (no vmx/svm in /proc/cpuinfo)")),
            (denied(), false, true, Err("cannot open /dev/kvm (permission denied); fix: add your user to the kvm group")),
            (Some(Err(io::Error::from(io::ErrorKind::NotFound))), false, true, Err("cannot open /dev/kvm")),
            (Some(Ok(())), false, true, Ok(())),
        ];
        for (open, pvm, hw, want) in cases {
            let label = format!("{open:?} pvm={pvm} hw={hw}");
            assert_eq!(classify_host(open, pvm, hw).map_err(|e| e.to_string()), want.map_err(String::from), "{label}");
        }
        // The I/O error stays the cause.
        let err = classify_host(denied(), false, true).unwrap_err();
        assert_eq!(std::error::Error::source(&err).unwrap().to_string(), "permission denied");
    }

    #[test]
    fn cpu_flags() {
        assert!(cpu_has_virtualisation("processor\t: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_has_virtualisation("flags\t\t: fpu svm\n"));
        assert!(!cpu_has_virtualisation("flags\t\t: fpu vmxe hypervisor\nvmx flags\t: ept\n"));
        assert!(!cpu_has_virtualisation(""));
    }

    #[test]
    fn this_host_is_classified() {
        let verdict = hardware_support();
        println!("hardware_support() here: {verdict:?}");
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert!(matches!(verdict, Err(Unsupported::Pvm)), "{verdict:?}");
        }
    }

    #[test]
    fn start_ticks_are_read_after_the_command_name() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 ...";
        assert_eq!(parse_start_ticks(stat), Some(987_654));
        assert_eq!(parse_start_ticks("garbage"), None);
        assert!(process_start().and_then(|s| boottime()?.checked_sub(s)).is_some());
    }
}
