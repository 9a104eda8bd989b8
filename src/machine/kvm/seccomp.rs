//! The seccomp filter of the built-in VMM's vCPU threads (rust-vmm's
//! `seccompiler`, as Firecracker does it).
//!
//! # Which threads
//!
//! The VMM has one kind of thread that the guest drives: the vCPU
//! threads. Each runs `KVM_RUN` and handles every exit itself (port and
//! MMIO accesses, the 8250, the i8042, and the virtio-blk requests, which
//! are served on the vCPU thread that wrote QueueNotify; see
//! `devices/virtio_mmio.rs`). There is no device or event thread: no
//! ioeventfd (a notification is an MMIO exit) and no thread behind irqfd
//! (an interrupt is an 8-byte `write` to an eventfd that KVM injects).
//! So every vCPU thread gets the same policy ([`VCPU_CALLS`]), compiled
//! per thread because it names that thread's own vCPU fd.
//!
//! The main thread is not filtered: it is the host program, which after
//! the VM opens, writes and renames the outputs (a seccomp filter cannot
//! be lifted). From the VM it only takes console bytes out of a buffer
//! and reads eventfds.
//!
//! # When
//!
//! After setup: the vCPU fd is created and configured, memory mapped and
//! registered, disks opened, irqfds registered, before the thread's first
//! `KVM_RUN`. The thread first blocks every asynchronous signal but the
//! kick (SIGINT and SIGTERM go to the host program's threads, not into a
//! confined one), then installs the filter ([`confine_vcpu_thread`]).
//!
//! # What a forbidden call does
//!
//! It is refused, never run: `SECCOMP_RET_TRAP` raises SIGSYS in the
//! thread, whose handler makes the call return `EPERM` and records its
//! number for the run loop, which then stops the VM and fails the run
//! with an error naming the call (`Error::Seccomp` in `kvm/mod.rs`).
//! Killing the process instead (Firecracker's choice) would leave the
//! run's temporary files and the outputs' temporary siblings behind;
//! refusing quietly with `EPERM` would surface as a puzzling guest I/O
//! error. A call on another architecture's ABI kills the process
//! (seccompiler's architecture check).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// `KVM_RUN` is `_IO(KVMIO, 0x80)` (linux/kvm.h): no size or direction
/// bits, so the request number is KVMIO << 8 | 0x80.
pub const KVM_RUN: u64 = ((kvm_bindings::KVMIO as u64) << 8) | 0x80;
/// An eventfd is written 8 bytes at a time (eventfd(2)): the count of a
/// `write` the filter lets through to any fd but stderr.
const EVENTFD_WRITE_LEN: u64 = 8;
/// stderr: `log` records and a panic's message.
const STDERR: u64 = 2;
/// `si_code` of a SIGSYS raised by seccomp (linux/signal.h `SYS_SECCOMP`).
const SYS_SECCOMP: libc::c_int = 1;

/// Errors confining a vCPU thread.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot compile the vCPU threads' seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    #[error("cannot install the SIGSYS handler that reports refused system calls")]
    Handler(#[source] nix::Error),
    #[error("cannot block signals in the vCPU thread")]
    SignalMask(#[source] std::io::Error),
    #[error("cannot install the seccomp filter (the built-in VMM needs a kernel with CONFIG_SECCOMP_FILTER; or use --vmm qemu)")]
    Install(#[source] seccompiler::Error),
}

/// An argument of a call, for a condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    Const(u64),
    /// The confined thread's own vCPU fd.
    VcpuFd,
}

/// One condition on argument `arg` (0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// 32-bit equality (fds, ioctl requests, `how`).
    Eq32 { arg: u8, value: Value },
    /// 64-bit equality (counts).
    Eq64 { arg: u8, value: u64 },
    /// None of `mask`'s bits set.
    Clear { arg: u8, mask: u64 },
    /// All of `mask`'s bits set.
    Set { arg: u8, mask: u64 },
}

/// A call a vCPU thread may make: with any arguments when `any_of` is
/// empty, else when every condition of one of its entries holds.
#[derive(Debug)]
pub struct Allowed {
    pub name: &'static str,
    pub nr: libc::c_long,
    pub any_of: &'static [&'static [Cond]],
    pub why: &'static str,
}

const PROT_EXEC: u64 = libc::PROT_EXEC as u64;

/// Everything a vCPU thread may do after setup, and why. Found by
/// reading the code paths and checked with `strace -f` of tier 1 (a
/// thread that runs the test guest's virtio-blk reads and writes, serial
/// output and reset, then is kicked and exits); a call missing here fails
/// tier 1 and tier 3 with the refused call's number.
pub const VCPU_CALLS: &[Allowed] = &[
    Allowed {
        name: "ioctl",
        nr: libc::SYS_ioctl,
        any_of: &[&[Cond::Eq32 { arg: 0, value: Value::VcpuFd }, Cond::Eq32 { arg: 1, value: Value::Const(KVM_RUN) }]],
        why: "KVM_RUN on this thread's own vCPU fd, nothing else: no other vCPU, no VM or /dev/kvm ioctl \
              (memory slots, irqfds, registers are all set up before)",
    },
    Allowed {
        name: "pread64",
        nr: libc::SYS_pread64,
        any_of: &[],
        why: "virtio-blk reads (VIRTIO_BLK_T_IN) from the disk files, opened before; a concatenated disk reads its extents' files",
    },
    Allowed {
        name: "pwrite64",
        nr: libc::SYS_pwrite64,
        any_of: &[],
        why: "virtio-blk writes (VIRTIO_BLK_T_OUT) to the writable disks; read-only disks were opened O_RDONLY, so the kernel refuses those",
    },
    Allowed {
        name: "fdatasync",
        nr: libc::SYS_fdatasync,
        any_of: &[],
        why: "virtio-blk flushes (VIRTIO_BLK_T_FLUSH) of the writable disks",
    },
    Allowed {
        name: "write",
        nr: libc::SYS_write,
        any_of: &[
            &[Cond::Eq64 { arg: 2, value: EVENTFD_WRITE_LEN }],
            &[Cond::Eq32 { arg: 0, value: Value::Const(STDERR) }],
        ],
        why: "8 bytes to an eventfd: an interrupt through irqfd (serial, virtio), the console's and the run's wake-ups \
              to the run loop; or stderr, for log records and a panic's message",
    },
    Allowed {
        name: "futex",
        nr: libc::SYS_futex,
        any_of: &[&[Cond::Set { arg: 1, mask: libc::FUTEX_PRIVATE_FLAG as u64 }]],
        why: "process-private futexes only: the device, console and run-control mutexes shared with the other vCPUs and the run loop",
    },
    Allowed {
        name: "mmap",
        nr: libc::SYS_mmap,
        any_of: &[&[Cond::Clear { arg: 2, mask: PROT_EXEC }, Cond::Set { arg: 3, mask: libc::MAP_ANONYMOUS as u64 }]],
        why: "malloc (the bounce buffer of up to 1 MiB, the console backlog, the thread's arena): anonymous memory, never executable",
    },
    Allowed {
        name: "mprotect",
        nr: libc::SYS_mprotect,
        any_of: &[&[Cond::Clear { arg: 2, mask: PROT_EXEC }]],
        why: "malloc growing its thread arena; never making memory executable",
    },
    Allowed {
        name: "mremap",
        nr: libc::SYS_mremap,
        any_of: &[],
        why: "realloc of a large (mmapped) buffer: the console backlog",
    },
    Allowed { name: "munmap", nr: libc::SYS_munmap, any_of: &[], why: "free of large buffers; Rust's thread exit unmaps its signal stack" },
    Allowed { name: "madvise", nr: libc::SYS_madvise, any_of: &[], why: "malloc trimming, and glibc releasing the thread's stack at exit (MADV_DONTNEED)" },
    Allowed { name: "brk", nr: libc::SYS_brk, any_of: &[], why: "malloc falls back to the main heap when it cannot make a thread arena" },
    Allowed {
        name: "clock_gettime",
        nr: libc::SYS_clock_gettime,
        any_of: &[],
        why: "Instant::now() at the first KVM_RUN; the vDSO answers it without a system call unless the clocksource cannot (a nested host)",
    },
    Allowed {
        name: "rt_sigreturn",
        nr: libc::SYS_rt_sigreturn,
        any_of: &[],
        why: "returning from the kick signal's handler (the run loop's way out of KVM_RUN) and from the SIGSYS handler",
    },
    Allowed {
        name: "rt_sigprocmask",
        nr: libc::SYS_rt_sigprocmask,
        any_of: &[&[Cond::Eq32 { arg: 0, value: Value::Const(libc::SIG_BLOCK as u64) }]],
        why: "SIG_BLOCK only: glibc blocks every signal as the thread exits; unblocking one is refused",
    },
    Allowed { name: "sigaltstack", nr: libc::SYS_sigaltstack, any_of: &[], why: "Rust's thread exit removes the stack-overflow signal stack" },
    Allowed {
        name: "close",
        nr: libc::SYS_close,
        any_of: &[&[Cond::Eq32 { arg: 0, value: Value::VcpuFd }]],
        why: "the vCPU fd, dropped as the thread ends; every other fd belongs to the run loop",
    },
    Allowed { name: "exit", nr: libc::SYS_exit, any_of: &[], why: "the thread's end (exit_group, the whole process's, is refused)" },
];

/// The filter rules of [`VCPU_CALLS`] for the thread of `vcpu_fd`.
fn rules(vcpu_fd: RawFd) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let value = |v: Value| match v {
        Value::Const(c) => c,
        Value::VcpuFd => vcpu_fd as u64,
    };
    let condition = |c: &Cond| match *c {
        Cond::Eq32 { arg, value: v } => SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value(v)),
        Cond::Eq64 { arg, value: v } => SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, v),
        Cond::Clear { arg, mask } => SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(mask), 0),
        Cond::Set { arg, mask } => SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(mask), mask),
    };
    let mut map = BTreeMap::new();
    for call in VCPU_CALLS {
        let mut rules = Vec::with_capacity(call.any_of.len());
        for conds in call.any_of {
            rules.push(SeccompRule::new(conds.iter().map(condition).collect::<Result<_, _>>()?)?);
        }
        map.insert(call.nr, rules);
    }
    Ok(map)
}

/// Compiles the filter of the vCPU thread that owns `vcpu_fd` (on the
/// caller's thread, so that a failure is an error before any vCPU runs).
pub fn vcpu_filter(vcpu_fd: RawFd) -> Result<BpfProgram, Error> {
    let filter = SeccompFilter::new(rules(vcpu_fd).map_err(Error::Compile)?, SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(Error::Compile)?;
    filter.try_into().map_err(Error::Compile)
}

/// Where a thread's refused calls are recorded: `0` when none, else
/// `(cpu + 1) << 32 | syscall number` of the first one.
#[derive(Debug, Default)]
pub struct Violations(AtomicU64);

/// A refused system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub cpu: u8,
    pub syscall: i64,
}

impl Violations {
    pub fn first(&self) -> Option<Violation> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            v => Some(Violation { cpu: ((v >> 32) - 1) as u8, syscall: i64::from(v as u32) }),
        }
    }

    fn record(&self, cpu: u8, syscall: libc::c_int) {
        let v = ((u64::from(cpu) + 1) << 32) | u64::from(syscall as u32);
        let _ = self.0.compare_exchange(0, v, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// Refused calls of threads that have no [`Violations`] of their own (a
/// filtered thread past its guard): kept so that nothing is lost.
static UNATTRIBUTED: Violations = Violations(AtomicU64::new(0));

thread_local! {
    /// This thread's record of refused calls and its vCPU number. Const
    /// initialised, no destructor: reading it is a plain TLS load, safe
    /// in a signal handler.
    static SLOT: Cell<(*const Violations, u8)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// Points this thread's SIGSYS reports at a [`Violations`] until dropped.
pub struct ReportTo<'a>(std::marker::PhantomData<&'a Violations>);

impl<'a> ReportTo<'a> {
    fn new(violations: &'a Violations, cpu: u8) -> ReportTo<'a> {
        SLOT.with(|s| s.set((violations, cpu)));
        ReportTo(std::marker::PhantomData)
    }
}

impl Drop for ReportTo<'_> {
    fn drop(&mut self) {
        SLOT.with(|s| s.set((std::ptr::null(), 0)));
    }
}

/// The layout of a SIGSYS `siginfo_t` on x86-64 (`_sigsys` in
/// asm-generic/siginfo.h); the libc crate has no accessor for it.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// SIGSYS: a confined thread made a call outside its filter. Records it
/// and makes it return -EPERM. Async-signal-safe: a TLS load and atomics.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo_t;
    // SigsysInfo is a prefix of its SIGSYS layout.
    let info = unsafe { &*(info as *const SigsysInfo) };
    if info.code != SYS_SECCOMP {
        // kill -SYS from outside: no call to answer.
        return;
    }
    let (slot, cpu) = SLOT.with(|s| s.get());
    // SAFETY: a non-null slot points at the Violations that the thread's
    // live ReportTo guard borrows.
    let violations = if slot.is_null() { &UNATTRIBUTED } else { unsafe { &*slot } };
    violations.record(cpu, info.syscall);
    // SAFETY: `context` is the ucontext_t of the interrupted thread that
    // the kernel passes to an SA_SIGINFO handler; on return it restores
    // RAX from it, which is the refused call's return value.
    unsafe {
        (*(context as *mut libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::EPERM);
    }
}

/// Installs the process's SIGSYS handler, once.
pub fn install_sigsys_handler() -> Result<(), Error> {
    static INSTALLED: OnceLock<Result<(), nix::Error>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        let action = SigAction::new(SigHandler::SigAction(on_sigsys), SaFlags::SA_SIGINFO, SigSet::empty());
        // SAFETY: on_sigsys is async-signal-safe (see its comment) and
        // touches only this thread's TLS slot and atomics.
        unsafe { sigaction(Signal::SIGSYS, &action) }.map(drop)
    });
    installed.map_err(Error::Handler)
}

/// Blocks every asynchronous signal in this thread except `kick`
/// (SIGSYS and the fault signals stay deliverable).
fn block_signals(kick: libc::c_int) -> Result<(), Error> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initialises the set it is given; sigdelset and
    // pthread_sigmask then use the initialised set and valid signal numbers.
    let ret = unsafe {
        libc::sigfillset(set.as_mut_ptr());
        for sig in [kick, libc::SIGSYS, libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE, libc::SIGTRAP, libc::SIGABRT] {
            libc::sigdelset(set.as_mut_ptr(), sig);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut())
    };
    if ret != 0 {
        return Err(Error::SignalMask(std::io::Error::from_raw_os_error(ret)));
    }
    Ok(())
}

/// Confines the calling thread (vCPU `cpu`) with `filter`: signals but
/// `kick` blocked, refused calls reported to `violations` while the
/// returned guard lives. [`install_sigsys_handler`] must have run.
pub fn confine_vcpu_thread<'a>(
    filter: &BpfProgram,
    kick: libc::c_int,
    violations: &'a Violations,
    cpu: u8,
) -> Result<ReportTo<'a>, Error> {
    block_signals(kick)?;
    let guard = ReportTo::new(violations, cpu);
    seccompiler::apply_filter(filter).map_err(Error::Install)?;
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn the_policy_is_the_documented_list() {
        let names: Vec<&str> = VCPU_CALLS.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "ioctl", "pread64", "pwrite64", "fdatasync", "write", "futex", "mmap", "mprotect", "mremap", "munmap",
                "madvise", "brk", "clock_gettime", "rt_sigreturn", "rt_sigprocmask", "sigaltstack", "close", "exit"
            ]
        );
        let mut nrs: Vec<_> = VCPU_CALLS.iter().map(|c| c.nr).collect();
        nrs.sort();
        nrs.dedup();
        assert_eq!(nrs.len(), VCPU_CALLS.len(), "each call once");
        assert!(VCPU_CALLS.iter().all(|c| !c.why.is_empty()));
        assert_eq!(KVM_RUN, 0xae80, "_IO(KVMIO, 0x80)");
        assert!(vcpu_filter(7).unwrap().len() < 200, "a short program");
    }

    /// A raw system call: its return value, or the errno.
    fn sys(nr: libc::c_long, args: [u64; 4]) -> Result<libc::c_long, i32> {
        // SAFETY: the tests below pass only fds they own, pointers to
        // live buffers of the lengths given, or null; a refused call
        // touches nothing.
        let r = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3]) };
        if r < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap())
        } else {
            Ok(r)
        }
    }

    /// A thread confined as a vCPU thread (with an eventfd standing in for
    /// its vCPU fd) tries calls inside and outside the filter: the ones
    /// outside return EPERM and the first is recorded; the thread still
    /// allocates, writes to stderr and exits normally.
    #[test]
    fn a_confined_thread_is_refused_what_the_filter_does_not_allow() {
        install_sigsys_handler().unwrap();
        let vcpu = EventFd::new(0).unwrap();
        let other = EventFd::new(0).unwrap();
        let (vfd, ofd) = (vcpu.as_raw_fd() as u64, other.as_raw_fd() as u64);
        let filter = vcpu_filter(vcpu.as_raw_fd()).unwrap();
        let violations = std::sync::Arc::new(Violations::default());
        let v = violations.clone();
        let results = std::thread::spawn(move || {
            let _guard = confine_vcpu_thread(&filter, libc::SIGRTMIN(), &v, 3).unwrap();
            let one = 1u64.to_ne_bytes();
            let buf = one.as_ptr() as u64;
            let path = c"/etc/hostname".as_ptr() as u64;
            let mut sigint = 0u64.to_ne_bytes();
            sigint[0] = 1 << (libc::SIGINT - 1);
            let anon = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
            let table: Vec<(&str, Result<libc::c_long, i32>)> = vec![
                ("openat", sys(libc::SYS_openat, [libc::AT_FDCWD as u64, path, libc::O_RDONLY as u64, 0])),
                ("eventfd write", sys(libc::SYS_write, [ofd, buf, 8, 0])),
                ("3-byte write", sys(libc::SYS_write, [ofd, buf, 3, 0])),
                ("KVM_RUN on another fd", sys(libc::SYS_ioctl, [ofd, KVM_RUN, 0, 0])),
                // The vCPU fd is an eventfd here: the filter lets the call
                // through and the eventfd refuses it (ENOTTY), not seccomp.
                ("KVM_RUN on the vCPU fd", sys(libc::SYS_ioctl, [vfd, KVM_RUN, 0, 0])),
                ("KVM_GET_REGS on the vCPU fd", sys(libc::SYS_ioctl, [vfd, 0x8090_ae81, 0, 0])),
                ("executable mmap", sys(libc::SYS_mmap, [0, 4096, (libc::PROT_READ | libc::PROT_EXEC) as u64, anon])),
                ("socket", sys(libc::SYS_socket, [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0, 0])),
                ("fork", sys(libc::SYS_fork, [0; 4])),
                ("unblocking SIGINT", sys(libc::SYS_rt_sigprocmask, [libc::SIG_UNBLOCK as u64, sigint.as_ptr() as u64, 0, 8])),
                ("closing another fd", sys(libc::SYS_close, [ofd, 0, 0, 0])),
                ("exit_group", sys(libc::SYS_exit_group, [3, 0, 0, 0])),
                ("an allocation", Ok(Vec::<u8>::with_capacity(4 << 20).capacity() as libc::c_long)),
                ("stderr", Ok(std::io::stderr().write(b"confined thread: stderr works\n").map_or(-1, |n| n as libc::c_long))),
            ];
            table.into_iter().map(|(what, r)| (what.to_string(), r)).collect::<Vec<_>>()
        })
        .join()
        .expect("the confined thread exits normally");
        let want: Vec<(String, Result<libc::c_long, i32>)> = [
            ("openat", Err(libc::EPERM)),
            ("eventfd write", Ok(8)),
            ("3-byte write", Err(libc::EPERM)),
            ("KVM_RUN on another fd", Err(libc::EPERM)),
            ("KVM_RUN on the vCPU fd", Err(libc::ENOTTY)),
            ("KVM_GET_REGS on the vCPU fd", Err(libc::EPERM)),
            ("executable mmap", Err(libc::EPERM)),
            ("socket", Err(libc::EPERM)),
            ("fork", Err(libc::EPERM)),
            ("unblocking SIGINT", Err(libc::EPERM)),
            ("closing another fd", Err(libc::EPERM)),
            ("exit_group", Err(libc::EPERM)),
            ("an allocation", Ok(4 << 20)),
            ("stderr", Ok(30)),
        ]
        .into_iter()
        .map(|(w, r)| (w.to_string(), r))
        .collect();
        assert_eq!(results, want);
        assert_eq!(other.read().unwrap(), 1, "the eventfd write went through, the other fd stayed open");
        assert_eq!(violations.first(), Some(Violation { cpu: 3, syscall: libc::SYS_openat }), "the first refused call is kept");
        // This (unconfined) thread is unaffected.
        assert!(std::fs::metadata("/").is_ok());
    }

    #[test]
    fn violations_encode_cpu_and_call() {
        let v = Violations::default();
        assert_eq!(v.first(), None);
        v.record(0, 257);
        v.record(5, 41);
        assert_eq!(v.first(), Some(Violation { cpu: 0, syscall: 257 }));
    }
}
