//! The two jobs, end to end: runAsRoot (new layer + image) and export.
//!
//! Host side of the data path: open and verify the image, lay out the
//! disks, boot the guest, read and verify its result, write the outputs
//! atomically. Exit statuses follow `docker run`: the script's own code,
//! 125 when runasroot failed, 124 on --timeout, 130 on SIGINT (Ctrl-C),
//! 143 on SIGTERM (128 + the signal, as shells report it).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, IsTerminal, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runasroot_guest::contract::{self, DecodeError, FailureKind, Job, Mode, Note};

use crate::cache::{self, Cache};
use crate::guest_output::{self, payload, Claim, OutputError as GuestOutputError};
use crate::cli::{self, ExportArgs, RunArgs, ScriptArgs, UiArgs, VmArgs};
use crate::image::{self, Digest, Image, ImageError};
use crate::interrupt::Cause;
use crate::job::{self, JobDisk, JobError, Times};
use crate::layers::Spool;
use crate::lower::{self, LowerError};
use crate::machine::{select, Backing, DiskSpec, GuestExit, GuestSpec, Machine, MachineError, MAX_CPUS};
use crate::output::{self, OutputError, Target};
use crate::report;

/// Exit status when runasroot itself failed (as `docker run`).
pub const EXIT_FAILED: u8 = 125;
/// Exit status when --timeout expired (as `timeout(1)`).
pub const EXIT_TIMEOUT: u8 = crate::interrupt::EXIT_TIMEOUT;
/// Below this the guest kernel and init do not fit with a useful tmpfs
/// (the built-in VMM's own floor is lower).
const MIN_MEMORY_MIB: u64 = 128;
const _: () = assert!(MIN_MEMORY_MIB >= crate::machine::kvm::memory::MIN_MEMORY_MIB);
/// Scratch space below this cannot hold even a busybox base.
const MIN_DISK_MIB: u64 = 16;
/// Console lines kept for error reports (the renderer shows the last
/// [`report::MAX_CONTEXT`]).
const CONSOLE_TAIL: usize = report::MAX_CONTEXT;
/// Longest console line kept: the guest writes the console, and a line
/// without end must not fill the host's memory (the kernel's own lines
/// are at most 1 KiB, `PRINTK_MESSAGE_MAX`). The rest of a longer line
/// is dropped, and the line says how much.
const CONSOLE_LINE_MAX: usize = 64 << 10;

/// Errors of a run, each naming what failed and the fix where there is one.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("--base IMAGE is required (or --base scratch to start from nothing); see runasroot --help")]
    MissingBase,
    #[error("--script FILE is required, unless --copy-to-root or --config says what the new layer holds (or use `runasroot export`)")]
    MissingScript,
    #[error("reading the new image's config failed")]
    Config(#[from] image::ConfigError),
    #[error("reading the store paths to copy failed")]
    Closure(#[from] crate::closure::ClosureError),
    #[error("nothing to write: give -o PATH (the new image) and/or --layer-output PATH (the bare layer)")]
    NoOutput,
    #[error("-o and --layer-output cannot both be standard output")]
    BothStdout,
    #[error("--timeout {value:?} is not a duration (e.g. 90, 90s, 5m)")]
    BadTimeout {
        value: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("cannot start the thread that enforces --timeout")]
    Deadline(#[source] io::Error),
    #[error("--{flag} must be at least {min}")]
    TooSmall { flag: &'static str, min: u64 },
    #[error("--{flag} can be at most {max} (the guest kernel's limit)")]
    TooLarge { flag: &'static str, max: u64 },
    #[error("cannot create a temporary directory in {dir} (set TMPDIR to a writable directory)")]
    TempDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the base image failed")]
    Image(#[from] ImageError),
    #[error("writing the new image failed")]
    WriteImage(#[source] ImageError),
    #[error("cannot write {path}: its directory {dir} does not exist")]
    OutputDir { path: PathBuf, dir: PathBuf },
    #[error("cannot write {path}: no file can be created in its directory {dir}; fix: make the directory writable, or choose another path")]
    OutputDirNotWritable {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("preparing the job failed")]
    Job(#[from] JobError),
    #[error("preparing the base for the guest failed")]
    Lower(#[from] LowerError),
    #[error("finding the guest kernel failed")]
    Assets(#[from] crate::assets::AssetError),
    #[error("no launcher for the guest")]
    Launcher(#[source] MachineError),
    #[error("running the guest failed")]
    Machine(#[from] MachineError),
    #[error("writing the output failed")]
    Output(#[from] OutputError),
    #[error("exporting failed")]
    Export(#[from] crate::export::ExportError),
    /// Stopped by SIGINT, SIGTERM or --timeout (`phase` and `limit` are
    /// filled in by [`main`]).
    #[error("{}", stopped(*cause, phase, limit.as_deref()))]
    Stopped { cause: Cause, phase: String, limit: Option<String> },
    /// The guest's own report: what failed and where; the flag to change
    /// is the host's to say ([`RunError::fix`]).
    #[error("{reason}")]
    Guest { kind: FailureKind, reason: String, fix: Option<String> },
    #[error("the guest kernel panicked: {line}")]
    GuestPanic { line: String, tail: Vec<String> },
    #[error("the guest ended without writing a result (rerun with -v to see its whole log)")]
    NoResult { tail: Vec<String> },
    #[error("refusing what the guest wrote on its output disk; nothing was written")]
    GuestOutput(#[from] GuestOutputError),
    #[error("reading the guest's output disk {path} failed")]
    ReadOutput {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl RunError {
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Stopped { cause, .. } => cause.exit_code(),
            _ => EXIT_FAILED,
        }
    }

    /// What to do about it, when that is a flag of ours to change.
    pub fn fix(&self) -> Option<String> {
        match self {
            RunError::Guest { fix, .. } => fix.clone(),
            RunError::Stopped { cause: Cause::Timeout, .. } => Some("raise --timeout".into()),
            RunError::Machine(MachineError::Kvm(crate::machine::kvm::Error::TooManyCpus { max, .. })) => Some(format!("lower --cpus to {max} or fewer")),
            _ => None,
        }
    }

    /// Lines that explain the error beyond its chain: the end of the guest
    /// console, QEMU's own complaint.
    pub fn context(&self) -> Option<report::Context<'_>> {
        match self {
            RunError::GuestPanic { tail, .. } | RunError::NoResult { tail } => {
                Some(report::Context { title: "last lines of the guest console", lines: tail })
            }
            RunError::Machine(MachineError::QemuFailed { stderr, .. }) => Some(report::Context { title: "QEMU's stderr", lines: stderr }),
            _ => None,
        }
    }

    /// The run was stopped: [`main`] says why and where.
    fn stopped(cause: Cause) -> RunError {
        RunError::Stopped { cause, phase: String::new(), limit: None }
    }
}

/// What [`RunError::Stopped`] says: the cause, the phase, that nothing
/// was written, and for a timeout the flag.
fn stopped(cause: Cause, phase: &str, limit: Option<&str>) -> String {
    let during = if phase.is_empty() { String::new() } else { format!(" while {phase}") };
    match cause {
        Cause::Timeout => format!("--timeout {} expired{during}: the run was stopped and nothing was written", limit.unwrap_or("")),
        _ => format!("interrupted by {}{during}: the run was stopped and nothing was written", cause.name()),
    }
}

/// Fails with [`RunError::Stopped`] once the run is: called between phases.
fn checkpoint() -> Result<(), RunError> {
    match crate::interrupt::cancelled() {
        Some(cause) => Err(RunError::stopped(cause)),
        None => Ok(()),
    }
}

/// How a run ended when runasroot itself did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Outputs written.
    Done,
    /// The script exited non-zero; nothing written; pass its code on.
    ScriptFailed(i32),
}

/// The user-visible side of a run: notices, progress, the guest console.
pub struct Ui {
    verbose: bool,
    quiet: bool,
    progress: Option<indicatif::ProgressBar>,
    started: Instant,
}

impl Ui {
    pub fn new(args: UiArgs) -> Ui {
        let progress = (!args.quiet && !args.verbose && io::stderr().is_terminal()).then(|| {
            let pb = indicatif::ProgressBar::new_spinner();
            pb.set_style(indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {msg}").expect("valid template"));
            pb.enable_steady_tick(Duration::from_millis(120));
            pb
        });
        Ui { verbose: args.verbose, quiet: args.quiet, progress, started: Instant::now() }
    }

    /// A phase began (also recorded for the message if the run is stopped).
    pub fn phase(&self, what: &str) {
        crate::interrupt::set_phase(what);
        if let Some(pb) = &self.progress {
            pb.set_message(what.to_string());
        } else if self.verbose {
            eprintln!("runasroot: [{:6.2}s] {what}", self.started.elapsed().as_secs_f64());
        }
    }

    /// Progress through a long host phase (hashing, decompressing).
    pub fn bytes(&self, what: &str, done: u64, total: u64) {
        if let Some(pb) = &self.progress {
            let mib = |n: u64| n as f64 / (1 << 20) as f64;
            pb.set_message(format!("{what}: {:.0}/{:.0} MiB", mib(done), mib(total)));
        }
    }

    /// A line shown only with -v.
    pub fn verbose_line(&self, line: &str) {
        if self.verbose {
            self.println(line);
        }
    }

    /// A one-line notice (e.g. why QEMU is used); hidden by -q.
    pub fn notice(&self, line: &str) {
        if !self.quiet {
            self.println(line);
        }
    }

    /// Prints a line without tearing the progress display.
    pub fn println(&self, line: &str) {
        match &self.progress {
            Some(pb) => pb.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(pb) = &self.progress {
            pb.finish_and_clear();
        }
    }
}

/// Splits the guest console into lines and routes them (see contract).
struct Console<'a> {
    ui: &'a Ui,
    partial: Vec<u8>,
    /// Bytes of the current line dropped past [`CONSOLE_LINE_MAX`].
    dropped: u64,
    tail: VecDeque<String>,
    panic_line: Option<String>,
}

impl<'a> Console<'a> {
    fn new(ui: &'a Ui) -> Console<'a> {
        Console { ui, partial: Vec::new(), dropped: 0, tail: VecDeque::new(), panic_line: None }
    }

    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let mut line = String::from_utf8_lossy(&self.partial).trim_end_matches('\r').to_string();
                if self.dropped > 0 {
                    line.push_str(&format!(" [{} more bytes dropped]", self.dropped));
                }
                self.partial.clear();
                self.dropped = 0;
                self.line(line);
            } else if self.partial.len() < CONSOLE_LINE_MAX {
                self.partial.push(b);
            } else {
                self.dropped += 1;
            }
        }
    }

    fn line(&mut self, line: String) {
        // The script's own output passes through as `docker run` passes
        // it; what the guest says about itself is escaped like any message.
        if let Some(rest) = line.strip_prefix(contract::CONSOLE_TAG) {
            if let Some(text) = rest.strip_prefix("out ") {
                self.ui.println(text);
            } else if let Some(phase) = rest.strip_prefix("phase ") {
                self.ui.phase(&report::escape(&guest_phase(phase)));
            } else if let Some(text) = rest.strip_prefix("log ") {
                if self.ui.verbose {
                    self.ui.println(&format!("guest: {}", report::escape(text)));
                }
            }
        } else {
            if line.contains("Kernel panic") && self.panic_line.is_none() {
                self.panic_line = Some(line.trim().to_string());
            }
            if self.ui.verbose {
                self.ui.println(&format!("kernel: {}", report::escape(&line)));
            }
        }
        if self.tail.len() == CONSOLE_TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    fn tail_lines(&self) -> Vec<String> {
        self.tail.iter().cloned().collect()
    }
}

/// A guest phase's name (contract::Phase) as the UI shows it.
fn guest_phase(name: &str) -> String {
    match name {
        "boot" => "starting the guest".into(),
        "mount" => "mounting the base in the guest".into(),
        "script" => "running the script".into(),
        "pack" => "packing the new layer".into(),
        "write" => "writing the guest's result".into(),
        other => format!("in the guest's phase {other}"),
    }
}

/// Parses --timeout: plain seconds or a humantime duration ("90s", "5m").
pub fn parse_timeout(s: &str) -> Result<Duration, RunError> {
    if let Ok(secs) = s.trim().parse::<f64>() {
        if secs.is_finite() && secs > 0.0 {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(s.trim()).map_err(|source| RunError::BadTimeout { value: s.to_string(), source })
}

/// A per-run temporary directory (in $TMPDIR), removed on every exit path.
fn temp_dir() -> Result<tempfile::TempDir, RunError> {
    let dir = std::env::temp_dir();
    let t = tempfile::Builder::new()
        .prefix("runasroot-")
        .tempdir_in(&dir)
        .map_err(|source| RunError::TempDir { dir, source })?;
    crate::interrupt::register_temp(t.path());
    Ok(t)
}

fn source_date_epoch() -> Option<String> {
    std::env::var("SOURCE_DATE_EPOCH").ok()
}

fn open_image(input: &cli::InputArgs, temp: &Path, ui: &Ui) -> Result<Image, RunError> {
    let base = input.base.as_deref().ok_or(RunError::MissingBase)?;
    ui.phase("reading and verifying the base image");
    let opts = image::OpenOptions {
        from_image: input.from_image.clone(),
        platform: Some(input.platform.clone()),
        temp_dir: temp.to_path_buf(),
    };
    Ok(image::open_with_progress(base, &opts, &|what, done, total| ui.bytes(what, done, total))?)
}

/// What a guest run needs beyond the image.
struct GuestJob<'a> {
    mode: Mode,
    script: Option<&'a Path>,
    script_args: &'a ScriptArgs,
    /// `--copy-closure`, read: the store paths to copy.
    store_paths: &'a [PathBuf],
    vm: &'a VmArgs,
    times: &'a Times,
    cache: Option<&'a Cache>,
    /// `--timeout` from the start of the run.
    deadline: Option<Instant>,
}

/// The spool cache, unless `--no-cache` or no writable place for it;
/// `-v` says which.
fn open_cache(no_cache: bool, ui: &Ui) -> Option<Cache> {
    if no_cache {
        return None;
    }
    match Cache::open(&cache::Location::from_env()) {
        Ok(c) => {
            ui.verbose_line(&format!("runasroot: cache {}", c.dir().display()));
            Some(c)
        }
        Err(e) => {
            ui.verbose_line(&format!("runasroot: no cache ({}); decompressed layers go to TMPDIR for this run", report::one_line(&e)));
            None
        }
    }
}

/// The guest's verified result: the payload sits on the output disk.
struct GuestResult {
    output_disk: PathBuf,
    payload_len: u64,
    exit_code: i32,
    /// sha256 of the payload as the host hashed it (None when the script
    /// failed and there is no payload). For a layer this is its diff_id.
    payload_digest: Option<Digest>,
}

/// Checks the VM flags and picks the launcher before any heavy work, so a
/// bad flag or `--vmm builtin` on a host without KVM fails at once.
fn prepare_machine(vm: &VmArgs, ui: &Ui) -> Result<Box<dyn Machine>, RunError> {
    if vm.memory < MIN_MEMORY_MIB {
        return Err(RunError::TooSmall { flag: "memory", min: MIN_MEMORY_MIB });
    }
    if vm.disk_size < MIN_DISK_MIB {
        return Err(RunError::TooSmall { flag: "disk-size", min: MIN_DISK_MIB });
    }
    if vm.cpus == 0 {
        return Err(RunError::TooSmall { flag: "cpus", min: 1 });
    }
    if u64::from(vm.cpus) > u64::from(MAX_CPUS) {
        return Err(RunError::TooLarge { flag: "cpus", max: MAX_CPUS.into() });
    }
    vm.timeout.as_deref().map(parse_timeout).transpose()?;
    select::select(vm.vmm, vm.qemu.as_deref().map(Path::as_os_str), &mut |line| ui.notice(line)).map_err(RunError::Launcher)
}

fn run_guest(
    machine: &mut dyn Machine,
    image: &Image,
    job_args: &GuestJob,
    temp: &Path,
    ui: &Ui,
    stop: &Arc<AtomicBool>,
) -> Result<GuestResult, RunError> {
    let vm = job_args.vm;

    checkpoint()?;
    ui.phase("indexing the base");
    let spool = Spool { cache: job_args.cache, temp_dir: temp };
    let copy = lower::CopySpec {
        items: &job_args.script_args.copy_to_root,
        store_paths: job_args.store_paths,
        copy_dirlinks: job_args.script_args.copy_dirlinks,
    };
    let base = lower::build(&image.layers, copy, job_args.times.epoch, spool, temp)?;
    let st = &base.stats;
    ui.verbose_line(&format!(
        "runasroot: lower: {} layers, {} inodes, image {} KiB, {} devices; decompressed {:.1} MiB now, {} layers from the cache{}",
        st.index.layers,
        st.inodes,
        st.image_bytes >> 10,
        st.devices,
        st.index.spooled_bytes as f64 / (1 << 20) as f64,
        st.index.cache_hits,
        if st.index.cache_rebuilt > 0 { format!(" ({} corrupted entries made anew)", st.index.cache_rebuilt) } else { String::new() },
    ));

    checkpoint()?;
    ui.phase("preparing disks");
    let mut disk = JobDisk::new(temp)?;
    let script = job_args.script.map(|p| disk.add_script(p)).transpose()?;
    let job = Job {
        mode: job_args.mode,
        lower: base.spec(),
        script,
        env: job::script_env(&image.env(), &job_args.script_args.env)?,
        epoch: job_args.times.epoch,
        clamp_mtime: job_args.times.source_date_epoch,
        scratch_mib: vm.disk_size,
        verbose: ui.verbose,
    };
    let job_path = disk.finish(&job)?;
    let output_disk = temp.join("output.img");
    job::write_sparse_disk(&output_disk, job::output_disk_bytes(vm.memory, vm.disk_size), &[], "output")?;
    let swap_disk = temp.join("swap.img");
    let swap_bytes = vm.disk_size << 20;
    job::write_sparse_disk(&swap_disk, swap_bytes, &job::swap_header(swap_bytes), "swap")?;

    let guest = crate::assets::prepare(vm.kernel.as_deref(), vm.initramfs.as_deref(), temp, machine.boots_vmlinux())?;
    let spec = GuestSpec {
        kernel: guest.kernel,
        initramfs: guest.initramfs,
        cmdline: job::cmdline(ui.verbose),
        memory_mib: vm.memory,
        cpus: vm.cpus,
        disks: vec![
            base.disk(),
            DiskSpec { backing: Backing::File(job_path), read_only: true, serial: contract::serial::JOB.into() },
            DiskSpec { backing: Backing::File(output_disk.clone()), read_only: false, serial: contract::serial::OUTPUT.into() },
            DiskSpec { backing: Backing::File(swap_disk), read_only: false, serial: contract::serial::SWAP.into() },
        ],
        deadline: job_args.deadline,
        work_dir: temp.to_path_buf(),
        stop: stop.clone(),
    };
    checkpoint()?;
    ui.phase(&format!("booting the guest ({})", machine.name()));
    let mut console = Console::new(ui);
    let exit = machine.run(&spec, &mut |bytes| console.feed(bytes))?;
    match exit {
        GuestExit::TimedOut => return Err(RunError::stopped(Cause::Timeout)),
        GuestExit::Stopped => return Err(RunError::stopped(crate::interrupt::cancelled().unwrap_or(Cause::Interrupt))),
        GuestExit::Reset => {}
    }
    ui.phase("checking the guest's result");
    // The guest read the base from these files: they must still be what
    // was verified.
    base.check_unchanged()?;

    read_result(&output_disk, job_args, console, ui)
}

/// Reads the output disk and checks everything on it before anything is
/// written anywhere (guest_output: the guest is not trusted).
fn read_result(output_disk: &Path, job_args: &GuestJob, mut console: Console, ui: &Ui) -> Result<GuestResult, RunError> {
    let vm = job_args.vm;
    let rerr = |source| RunError::ReadOutput { path: output_disk.to_path_buf(), source };
    let mut f = File::open(output_disk).map_err(rerr)?;
    let mut block = vec![0u8; contract::RESULT_AREA as usize];
    f.read_exact(&mut block).map_err(rerr)?;
    let outcome = match contract::Outcome::decode(&block) {
        Ok(o) => o,
        Err(e) => {
            return Err(match (console.panic_line.take(), e) {
                (Some(line), _) => RunError::GuestPanic { line, tail: console.tail_lines() },
                (None, DecodeError::NoMagic { .. }) => RunError::NoResult { tail: console.tail_lines() },
                (None, e) => GuestOutputError::Header(e).into(),
            })
        }
    };
    if ui.verbose {
        let t: Vec<String> = outcome.timings.iter().map(|(p, t)| format!("{p}={t:.3}s")).collect();
        ui.println(&format!("runasroot: guest timings (uptime at end of phase): {}", report::escape(&t.join(" "))));
    }
    let room = f.metadata().map_err(rerr)?.len().saturating_sub(contract::PAYLOAD_OFFSET);
    let (len, digest) = match guest_output::check_outcome(&outcome, room)? {
        Claim::Failed { kind, reason } => return Err(RunError::Guest { kind, fix: fix(kind, vm), reason }),
        Claim::ScriptFailed { code } => {
            return Ok(GuestResult { output_disk: output_disk.to_path_buf(), payload_len: 0, exit_code: code.into(), payload_digest: None })
        }
        Claim::Payload { len, digest } => (len, digest),
    };
    let kind = match job_args.mode {
        Mode::Layer => payload::Kind::Layer { epoch: job_args.times.epoch },
        Mode::Export => payload::Kind::Export,
    };
    f.seek(SeekFrom::Start(contract::PAYLOAD_OFFSET)).map_err(rerr)?;
    let input = io::BufReader::with_capacity(1 << 20, f.take(len));
    let checked = guest_output::check_payload(input, len, &digest, kind)?;
    ui.verbose_line(&format!("runasroot: the guest's {} entries passed every check", checked.entries));
    if outcome.notes.contains(&Note::OomKilled) {
        ui.notice(&format!(
            "runasroot: warning: the guest's OOM killer killed a process the script started (the script still exited 0); \
             raise --memory (now {} MiB) if that matters",
            vm.memory
        ));
    }
    Ok(GuestResult { output_disk: output_disk.to_path_buf(), payload_len: len, exit_code: 0, payload_digest: Some(checked.digest) })
}

/// The flag to change for each kind of failure the guest reports.
fn fix(kind: FailureKind, vm: &VmArgs) -> Option<String> {
    match kind {
        FailureKind::OutOfScratch => Some(format!("raise --disk-size (now {} MiB)", vm.disk_size)),
        FailureKind::OutOfMemory => Some(format!("raise --memory (now {} MiB)", vm.memory)),
        FailureKind::NoInterpreter => Some("start the script with a #! line naming an interpreter the image has".into()),
        FailureKind::BadInput | FailureKind::Internal => None,
    }
}

/// Copies the payload into its own file (copy_file_range where possible).
fn extract_payload(r: &GuestResult, dest: &Path) -> Result<(), RunError> {
    let rerr = |source| RunError::ReadOutput { path: r.output_disk.clone(), source };
    let mut src = File::open(&r.output_disk).map_err(rerr)?;
    src.seek(SeekFrom::Start(contract::PAYLOAD_OFFSET)).map_err(rerr)?;
    let mut dst = File::create(dest).map_err(rerr)?;
    let n = io::copy(&mut crate::interrupt::Checked(src.take(r.payload_len)), &mut dst).map_err(rerr)?;
    if n != r.payload_len {
        return Err(rerr(io::Error::new(io::ErrorKind::UnexpectedEof, "short payload")));
    }
    Ok(())
}

/// Streams the payload to `w`.
fn copy_payload(r: &GuestResult, w: &mut dyn io::Write) -> io::Result<()> {
    let mut src = File::open(&r.output_disk)?;
    src.seek(SeekFrom::Start(contract::PAYLOAD_OFFSET))?;
    let n = io::copy(&mut crate::interrupt::Checked(src.take(r.payload_len)), w)?;
    if n != r.payload_len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short payload"));
    }
    Ok(())
}

/// Streams the payload to an output target.
fn write_payload(r: &GuestResult, target: &Target) -> Result<(), RunError> {
    Ok(output::write_atomically(target, |w| copy_payload(r, w))?)
}

/// Writes the payload beside `path` without moving it into place yet.
fn stage_payload(r: &GuestResult, path: &Path) -> Result<output::AtomicFile, RunError> {
    let mut f = output::AtomicFile::create(path)?;
    let werr = |source| OutputError::Write { path: path.display().to_string(), source };
    {
        let mut w = io::BufWriter::with_capacity(1 << 20, f.file());
        copy_payload(r, &mut w).and_then(|_| io::Write::flush(&mut w)).map_err(werr)?;
    }
    Ok(f)
}

/// Checks what can be checked before any work: the script and copy-to-root
/// items can be read, each output's directory exists. A typo then costs
/// nothing, not a whole guest run.
fn check_inputs(script: Option<&Path>, script_args: &ScriptArgs, outputs: [Option<&Target>; 2]) -> Result<(), RunError> {
    if let Some(path) = script {
        File::open(path).map_err(|source| JobError::ReadScript { path: path.to_path_buf(), source })?;
    }
    for path in &script_args.copy_to_root {
        std::fs::metadata(path).map_err(|source| LowerError::CopyToRoot { path: path.clone(), source })?;
    }
    for target in outputs.into_iter().flatten() {
        if let Target::Path(path) = target {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return Err(RunError::OutputDir { path: path.clone(), dir: dir.to_path_buf() });
            }
            // Writable? (A read-only directory or file system would
            // otherwise fail only after the whole guest run.)
            tempfile::Builder::new().prefix(".runasroot-probe-").tempfile_in(dir).map(drop).map_err(|source| {
                RunError::OutputDirNotWritable { path: path.clone(), dir: dir.to_path_buf(), source }
            })?;
        }
    }
    Ok(())
}

/// `runasroot --base … --script … -o …`.
pub fn run_layer(args: &RunArgs, ui: &Ui, stop: &Arc<AtomicBool>) -> Result<Ended, RunError> {
    args.input.base.as_deref().ok_or(RunError::MissingBase)?;
    let script = args.script.as_deref();
    let adds_files = !args.script_env.copy_to_root.is_empty() || !args.script_env.copy_closure.is_empty();
    if script.is_none() && !adds_files && args.config.is_none() {
        return Err(RunError::MissingScript);
    }
    let out = args.output.as_deref().map(Target::parse);
    let layer_out = args.layer_output.as_deref().map(Target::parse);
    if out.is_none() && layer_out.is_none() {
        return Err(RunError::NoOutput);
    }
    if out == Some(Target::Stdout) && layer_out == Some(Target::Stdout) {
        return Err(RunError::BothStdout);
    }
    check_inputs(script, &args.script_env, [out.as_ref(), layer_out.as_ref()])?;
    let store_paths = crate::closure::read_all(&args.script_env.copy_closure)?;
    let config = args.config.as_deref().map(image::ConfigOverrides::load).transpose()?.unwrap_or_default();
    let times = job::resolve_times(args.created.as_deref(), source_date_epoch().as_deref(), time::OffsetDateTime::now_utc())?;
    let write_opts = image::WriteOptions {
        format: match args.format {
            cli::Format::DockerArchive => image::OutputFormat::DockerArchive,
            cli::Format::Oci => image::OutputFormat::Oci,
            cli::Format::OciArchive => image::OutputFormat::OciArchive,
        },
        tag: args.tag.clone(),
        compress: compression(args.compress),
        created: times.created.clone(),
        history_created_by: history_line(script, args),
        config,
        archive_compress: compression(args.compress_archive),
    };
    if let Some(target) = &out {
        image::check_options(&write_opts, target).map_err(RunError::WriteImage)?;
    }
    let mut machine = prepare_machine(&args.vm, ui)?;
    let deadline = start_deadline(&args.vm)?;
    let temp = temp_dir()?;
    let image = open_image(&args.input, temp.path(), ui)?;
    let cache = open_cache(args.input.no_cache, ui);
    let job = GuestJob {
        mode: Mode::Layer,
        script,
        script_args: &args.script_env,
        store_paths: &store_paths,
        vm: &args.vm,
        times: &times,
        cache: cache.as_ref(),
        deadline,
    };
    let result = run_guest(machine.as_mut(), &image, &job, temp.path(), ui, stop)?;
    if result.exit_code != 0 {
        return Ok(Ended::ScriptFailed(result.exit_code));
    }

    checkpoint()?;
    ui.phase("writing the new image");
    let layer_path = temp.path().join("layer.tar");
    extract_payload(&result, &layer_path)?;
    let diff_id = result.payload_digest.clone().expect("a script that exited 0 has a verified payload");
    // Both outputs or neither: the bare layer is written first and moved
    // into place after the image (the first move makes the run finish).
    let staged_layer = match &layer_out {
        Some(Target::Path(path)) => Some(stage_payload(&result, path)?),
        Some(Target::Stdout) => {
            write_payload(&result, &Target::Stdout)?;
            None
        }
        None => None,
    };
    if let Some(target) = &out {
        let new = image::NewLayer { path: layer_path, diff_id: diff_id.clone(), size: result.payload_len };
        image::write_image(&image, &new, &write_opts, target).map_err(RunError::WriteImage)?;
    }
    if let Some(staged) = staged_layer {
        staged.commit()?;
    }
    ui.finish();
    let image_out = out.as_ref().map(|t| WrittenImage {
        target: t,
        format: args.format,
        layers: image.layers.len() + 1,
        tag: args.tag.as_deref(),
    });
    ui.notice(&written_line(image_out, layer_out.as_ref(), &diff_id, result.payload_len));
    Ok(Ended::Done)
}

fn compression(c: cli::Compress) -> image::Compression {
    match c {
        cli::Compress::None => image::Compression::None,
        cli::Compress::Gzip => image::Compression::Gzip,
        cli::Compress::Zstd => image::Compression::Zstd,
    }
}

/// The history entry's `created_by`: what made the layer, without host
/// paths (a script run alone keeps the historical `runasroot --script NAME`).
fn history_line(script: Option<&Path>, args: &RunArgs) -> String {
    let mut line = String::from("runasroot");
    if script.is_none() {
        if !args.script_env.copy_closure.is_empty() {
            line.push_str(" --copy-closure");
        }
        if !args.script_env.copy_to_root.is_empty() {
            line.push_str(" --copy-to-root");
        }
    }
    if let Some(script) = script {
        let name = script.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        line.push_str(&format!(" --script {name}"));
    }
    line
}

/// The image written with -o, for the closing line.
struct WrittenImage<'a> {
    target: &'a Target,
    format: cli::Format,
    layers: usize,
    tag: Option<&'a str>,
}

/// "1 layer", "3 layers".
fn layers(n: usize) -> String {
    format!("{n} layer{}", if n == 1 { "" } else { "s" })
}

/// The one line on stderr after a run that wrote its outputs (hidden by -q).
fn written_line(image: Option<WrittenImage>, layer: Option<&Target>, diff_id: &Digest, layer_len: u64) -> String {
    let short = &diff_id.hex()[..12];
    let mut parts = Vec::new();
    if let Some(i) = image {
        let format = match i.format {
            cli::Format::DockerArchive => "docker-archive",
            cli::Format::Oci => "OCI layout",
            cli::Format::OciArchive => "OCI archive",
        };
        let tag = i.tag.map(|t| format!(", tagged {t}")).unwrap_or_default();
        parts.push(format!("{} ({format}, {}{tag})", i.target.describe(), layers(i.layers)));
    }
    if let Some(t) = layer {
        parts.push(format!("{} (the new layer, {layer_len} bytes)", t.describe()));
    }
    format!("runasroot: wrote {}; new layer sha256:{short}", parts.join(" and "))
}

/// `runasroot export …`.
pub fn run_export(args: &ExportArgs, ui: &Ui, stop: &Arc<AtomicBool>) -> Result<Ended, RunError> {
    args.input.base.as_deref().ok_or(RunError::MissingBase)?;
    let target = Target::parse(&args.output);
    check_inputs(args.script.as_deref(), &args.script_env, [Some(&target), None])?;
    let store_paths = crate::closure::read_all(&args.script_env.copy_closure)?;
    let times = job::resolve_times(None, source_date_epoch().as_deref(), time::OffsetDateTime::now_utc())?;
    let in_vm = args.in_vm || args.script.is_some() || !store_paths.is_empty() || !args.script_env.copy_to_root.is_empty();
    let mut machine = if in_vm { Some(prepare_machine(&args.vm, ui)?) } else { None };
    let deadline = start_deadline(&args.vm)?;
    let temp = temp_dir()?;
    let image = open_image(&args.input, temp.path(), ui)?;
    let cache = open_cache(args.input.no_cache, ui);
    if let Some(machine) = machine.as_mut() {
        let job = GuestJob {
            mode: Mode::Export,
            script: args.script.as_deref(),
            script_args: &args.script_env,
            store_paths: &store_paths,
            vm: &args.vm,
            times: &times,
            cache: cache.as_ref(),
            deadline,
        };
        let result = run_guest(machine.as_mut(), &image, &job, temp.path(), ui, stop)?;
        if result.exit_code != 0 {
            return Ok(Ended::ScriptFailed(result.exit_code));
        }
        checkpoint()?;
        ui.phase("writing the export");
        write_payload(&result, &target)?;
        ui.finish();
        ui.notice(&format!("runasroot: wrote {} (the filesystem of {}, flattened in the VM)", target.describe(), layers(image.layers.len())));
    } else {
        ui.phase("flattening on the host");
        let spool = Spool { cache: cache.as_ref(), temp_dir: temp.path() };
        let opts = crate::export::ExportOptions { clamp_mtime: times.source_date_epoch, spool };
        let mut failure = None;
        let written = output::write_atomically(&target, |w| match crate::export::export(&image.layers, &opts, w) {
            Ok(_) => Ok(()),
            Err(e) => {
                failure = Some(e);
                Err(io::Error::other("export failed"))
            }
        });
        if let Some(e) = failure {
            return Err(e.into());
        }
        written?;
        ui.finish();
        ui.notice(&format!("runasroot: wrote {} (the filesystem of {}, flattened)", target.describe(), layers(image.layers.len())));
    }
    ui.finish();
    Ok(Ended::Done)
}

/// Starts the `--timeout` clock: it covers the whole run from here
/// (reading the base, preparing the lower, the guest, writing).
fn start_deadline(vm: &VmArgs) -> Result<Option<Instant>, RunError> {
    let Some(limit) = vm.timeout.as_deref().map(parse_timeout).transpose()? else { return Ok(None) };
    crate::interrupt::start_deadline(limit).map_err(RunError::Deadline)?;
    Ok(Some(Instant::now() + limit))
}

/// A failure while the run was being stopped is the stop: says why, in
/// which phase, with the stop's exit status.
fn explain_stop(r: Result<Ended, RunError>, timeout: Option<&str>) -> Result<Ended, RunError> {
    let cause = match (&r, crate::interrupt::cancelled()) {
        (Err(RunError::Stopped { cause, .. }), _) => *cause,
        (Err(_), Some(cause)) => cause,
        _ => return r,
    };
    let limit = (cause == Cause::Timeout).then(|| timeout.unwrap_or_default().to_string());
    Err(RunError::Stopped { cause, phase: crate::interrupt::phase(), limit })
}

/// Entry point after argument parsing.
pub fn main(cli: cli::Cli, stop: Arc<AtomicBool>) -> Result<Ended, (RunError, UiArgs)> {
    match cli.command {
        Some(cli::Command::Export(args)) => {
            let ui = Ui::new(args.ui);
            let r = explain_stop(run_export(&args, &ui, &stop), args.vm.timeout.as_deref());
            ui.finish();
            r.map_err(|e| (e, args.ui))
        }
        None => {
            let ui = Ui::new(cli.run.ui);
            let r = explain_stop(run_layer(&cli.run, &ui, &stop), cli.run.vm.timeout.as_deref());
            ui.finish();
            r.map_err(|e| (e, cli.run.ui))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_as_seconds_or_durations() {
        assert_eq!(parse_timeout("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_timeout("1.5").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_timeout("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_timeout("soon").is_err());
        assert!(parse_timeout("-3").is_err());
    }

    #[test]
    fn a_stop_names_its_cause_and_phase() {
        let cases = [
            (Cause::Interrupt, "packing the new layer", None, "interrupted by SIGINT while packing the new layer: the run was stopped and nothing was written"),
            (Cause::Terminate, "", None, "interrupted by SIGTERM: the run was stopped and nothing was written"),
            (
                Cause::Timeout,
                "indexing the base",
                Some("3s"),
                "--timeout 3s expired while indexing the base: the run was stopped and nothing was written",
            ),
        ];
        for (cause, phase, limit, want) in cases {
            let e = RunError::Stopped { cause, phase: phase.into(), limit: limit.map(String::from) };
            assert_eq!((e.to_string().as_str(), e.exit_code()), (want, cause.exit_code()));
            let fix = (cause == Cause::Timeout).then(|| "raise --timeout".to_string());
            assert_eq!(e.fix(), fix);
        }
        assert_eq!([Cause::Interrupt, Cause::Terminate, Cause::Timeout].map(Cause::exit_code), [130, 143, 124]);
    }

    #[test]
    fn more_vcpus_than_kvm_allows_is_fixed_by_lowering_cpus() {
        let e = RunError::Machine(MachineError::Kvm(crate::machine::kvm::Error::TooManyCpus { cpus: 8, max: 4 }));
        assert_eq!(report::one_line(&e), "running the guest failed: the built-in VMM failed: 8 vCPUs requested; this host's KVM allows at most 4");
        assert_eq!(e.fix().as_deref(), Some("lower --cpus to 4 or fewer"));
    }

    #[test]
    fn the_closing_line_names_what_was_written() {
        let d = Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap();
        let out = Target::Path("out/new.tar".into());
        let layer = Target::Path("layer.tar".into());
        let img = |target| WrittenImage { target, format: cli::Format::DockerArchive, layers: 3, tag: Some("redis:7") };
        assert_eq!(
            written_line(Some(img(&out)), Some(&layer), &d, 10240),
            "runasroot: wrote out/new.tar (docker-archive, 3 layers, tagged redis:7) and layer.tar (the new layer, 10240 bytes); new layer sha256:abababababab"
        );
        assert_eq!(written_line(None, Some(&Target::Stdout), &d, 1024), "runasroot: wrote standard output (the new layer, 1024 bytes); new layer sha256:abababababab");
        let oci = WrittenImage { target: &out, format: cli::Format::Oci, layers: 1, tag: None };
        assert_eq!(written_line(Some(oci), None, &d, 0), "runasroot: wrote out/new.tar (OCI layout, 1 layer); new layer sha256:abababababab");
    }

    #[test]
    fn console_routes_tagged_lines() {
        let ui = Ui { verbose: false, quiet: true, progress: None, started: Instant::now() };
        let mut c = Console::new(&ui);
        c.feed(b"[ 0.1] boot\r\n@rar phase mount\n@rar out hello\nKernel panic - not syncing: x\npartial");
        assert_eq!(c.tail.iter().cloned().collect::<Vec<_>>(), vec!["[ 0.1] boot", "@rar phase mount", "@rar out hello", "Kernel panic - not syncing: x"]);
        assert_eq!(c.panic_line.as_deref(), Some("Kernel panic - not syncing: x"));
        assert_eq!(c.partial, b"partial");
    }

    #[test]
    fn a_console_line_without_end_is_cut_not_kept() {
        let ui = Ui { verbose: false, quiet: true, progress: None, started: Instant::now() };
        let mut c = Console::new(&ui);
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..64 {
            c.feed(&chunk);
            assert!(c.partial.len() <= CONSOLE_LINE_MAX, "{} bytes held", c.partial.len());
        }
        c.feed(b"\nnext\n");
        let lines: Vec<&String> = c.tail.iter().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), CONSOLE_LINE_MAX + " [67043328 more bytes dropped]".len());
        assert!(lines[0].ends_with(" [67043328 more bytes dropped]"), "{}", &lines[0][CONSOLE_LINE_MAX - 10..]);
        assert_eq!(lines[1], "next");
    }
}
