//! Launching the guest: one contract (kernel + initramfs + command line +
//! virtio-mmio block devices + one 8250 serial port), two launchers.
//!
//! * [`kvm`]: the built-in VMM on rust-vmm crates, the default where
//!   `/dev/kvm` is backed by hardware virtualisation.
//! * [`qemu`]: QEMU's `microvm` machine, TCG where there is no hardware
//!   virtualisation (and as a test harness).
//!
//! Callers build a [`GuestSpec`] and call [`Machine::run`]; nothing here
//! knows about images or jobs.

pub mod backend;
pub mod kvm;
pub mod nbd;
pub mod qemu;
pub mod select;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// Most vCPUs a guest gets: the guest kernel's CONFIG_NR_CPUS
/// (kernel-config/runasroot.config). The built-in VMM's MP table is sized
/// for them (`kvm::mptable`).
pub const MAX_CPUS: u8 = 32;

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub backing: Backing,
    pub read_only: bool,
    /// Answered to VIRTIO_BLK_T_GET_ID (at most 20 bytes): the guest finds
    /// its disks by this, never by order.
    pub serial: String,
}

/// What a disk holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// One host file; its size is the disk's size (a size that is not a
    /// multiple of 512 is rounded down by QEMU, so callers pad).
    File(PathBuf),
    /// Ranges of several host files one after another, read-only, `len`
    /// bytes in all (gaps and the tail read as zeros): the built-in VMM
    /// reads them itself, QEMU through an NBD server of ours.
    Concat { extents: Vec<Extent>, len: u64 },
}

/// `len` bytes of `path` from `offset`, at `at` on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
    pub at: u64,
}

impl Backing {
    /// A path naming the disk in messages.
    pub fn describe(&self) -> PathBuf {
        match self {
            Backing::File(p) => p.clone(),
            Backing::Concat { extents, .. } => extents.first().map(|x| x.path.clone()).unwrap_or_default(),
        }
    }
}

/// The kernel images a launcher may choose from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelImages {
    /// Compressed kernel with the x86 boot protocol header (QEMU, fallback).
    pub bzimage: PathBuf,
    /// Uncompressed ELF kernel (the built-in VMM's fast path), if present.
    pub vmlinux: Option<PathBuf>,
}

/// Everything needed to start the guest once.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub kernel: KernelImages,
    pub initramfs: PathBuf,
    /// Kernel command line without the `virtio_mmio.device=` entries the
    /// built-in VMM appends for its disks. Must end the guest with a reset:
    /// `reboot=t` (triple fault) works for both launchers.
    pub cmdline: String,
    pub memory_mib: u64,
    pub cpus: u8,
    /// In the order given; serial ids name them for the guest.
    pub disks: Vec<DiskSpec>,
    /// When to give up on the guest (`--timeout`).
    pub deadline: Option<Instant>,
    /// A private directory the launcher may use for the run (sockets).
    pub work_dir: PathBuf,
    /// Set (by SIGINT/SIGTERM handling) to stop the guest early.
    pub stop: Arc<AtomicBool>,
}

/// How the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest reset or shut down (its normal end: guest-init reboots).
    Reset,
    /// `deadline` passed; the guest was killed.
    TimedOut,
    /// `stop` was set; the guest was killed.
    Stopped,
}

/// Errors starting or running a guest.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("QEMU ({binary}) could not be started; fix: apt-get install qemu-system-x86")]
    QemuSpawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU not found: {}", qemu_not_found(requested.as_deref(), *asked_by, path_var.as_deref(), tried))]
    QemuNotFound {
        /// `--qemu` or `RUNASROOT_QEMU` as given.
        requested: Option<String>,
        asked_by: qemu::QemuSource,
        path_var: Option<String>,
        tried: Vec<PathBuf>,
    },
    /// `stderr`: QEMU's own lines, shown below the error by the renderer.
    #[error("{}", qemu_failed(status))]
    QemuFailed { status: std::process::ExitStatus, stderr: Vec<String> },
    #[error("reading the guest console failed")]
    Console(#[source] std::io::Error),
    #[error("the built-in VMM cannot run here (--vmm builtin); use --vmm qemu, or --vmm auto to fall back to QEMU")]
    KvmUnavailable(#[source] kvm::Unsupported),
    #[error("the built-in VMM failed: {0}")]
    Kvm(#[from] kvm::Error),
    #[error("cannot serve disk {serial} to QEMU over NBD at {socket}")]
    Nbd {
        serial: String,
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`MachineError::QemuFailed`] says: a signal is named as such (a
/// `kill -9` or the OOM killer from outside), an exit status with QEMU's
/// own words.
fn qemu_failed(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(sig) => {
            let name = nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str()).unwrap_or("an unknown signal");
            format!(
                "QEMU was killed by signal {sig} ({name}) before the guest finished: something outside runasroot \
                 killed it (a kill command, the OOM killer)"
            )
        }
        None => format!("QEMU exited with {status} before the guest reset"),
    }
}

/// What [`MachineError::QemuNotFound`] says: what was asked for, every
/// place tried, and the fix.
fn qemu_not_found(requested: Option<&str>, source: qemu::QemuSource, path_var: Option<&str>, tried: &[PathBuf]) -> String {
    let by = match source {
        qemu::QemuSource::Flag => "--qemu",
        qemu::QemuSource::Env => qemu::QEMU_ENV,
        qemu::QemuSource::Default => "",
    };
    let name = requested.unwrap_or(qemu::QEMU_NAME);
    if tried.len() == 1 && requested.is_some() {
        let sep = if source == qemu::QemuSource::Flag { " " } else { "=" };
        return format!("{by}{sep}{name} does not exist or is not executable; fix: give the path of {}", qemu::QEMU_NAME);
    }
    let path_dirs: Vec<String> = path_var
        .map(|p| std::env::split_paths(p).filter(|d| d.is_absolute()).map(|d| d.display().to_string()).collect())
        .unwrap_or_default();
    let others: Vec<String> = tried
        .iter()
        .filter_map(|t| t.parent())
        .map(|d| d.display().to_string())
        .filter(|d| !path_dirs.contains(d))
        .collect();
    let asked = if requested.is_some() { format!(" (from {by})") } else { String::new() };
    format!(
        "looked for {name}{asked} in PATH ({}) and in {}; fix: apt-get install qemu-system-x86, or name the binary with --qemu PATH or {}=PATH",
        path_var.unwrap_or("unset"),
        others.join(", "),
        qemu::QEMU_ENV
    )
}

/// A guest launcher.
pub trait Machine {
    /// Short name for logs and benchmarks ("builtin", "qemu-tcg", "qemu-kvm").
    fn name(&self) -> String;

    /// Whether it boots the uncompressed ELF kernel when there is one
    /// (else the bzImage).
    fn boots_vmlinux(&self) -> bool;

    /// Boots the guest and runs it until it resets, times out or is
    /// stopped. Console bytes are passed to `console` as they arrive.
    fn run(&mut self, spec: &GuestSpec, console: &mut dyn FnMut(&[u8])) -> Result<GuestExit, MachineError>;
}
