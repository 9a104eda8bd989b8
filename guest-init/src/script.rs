//! Running the script the way `docker build` runs a `RUN` line: as root,
//! chrooted in the merged view, cwd `/`, umask 022, exactly the job's
//! environment, stdin from /dev/null, stdout and stderr forwarded line by
//! line to the host.
//!
//! Isolation: new mount, PID, IPC, UTS and network namespaces (only `lo`,
//! up). The chroot gets a fresh minimal /dev (never the guest's devtmpfs,
//! which holds the disks: a script could write over the output disk),
//! /proc mounted from inside the new PID namespace, /sys read-only.
//!
//! Process layout: PID 1 (guest-init) unshares only its *children's* PID
//! namespace, forks the script process, and takes its own back. The
//! script process is PID 1 of the new namespace: it makes the other
//! namespaces, mounts, chroots and execs. When it exits, the kernel kills
//! everything it left running in its PID namespace, and with the last
//! process its mount namespace (and every mount made for the chroot)
//! goes too: a leftover daemon can neither hang the run nor keep the upper
//! dir busy.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::mount::{mount, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::signal::Signal;
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{chdir, chroot, execve, fork, pipe2, sethostname, ForkResult, Pid};

use runasroot_guest::contract::FailureKind;

use crate::console::{Console, LineSplitter};
use crate::fail::{Failure, GuestError};
use crate::sys;

/// Where the script file lives inside the chroot: in the private /dev
/// tmpfs, so it never lands in the upper dir.
pub const SCRIPT_DIR: &str = "/dev/.runasroot";
pub const SCRIPT_PATH: &str = "/dev/.runasroot/script";
/// The shell for a script without `#!`, as `RUN` uses.
pub const SHELL: &str = "/bin/sh";
/// The script's host name (UTS namespace): fixed, so scripts that record
/// it stay reproducible.
pub const HOSTNAME: &str = "runasroot";
/// The mountpoints the chroot needs; made in the merged view when the
/// base lacks them (and then left out of the layer and the export).
pub const MOUNTPOINTS: [&str; 3] = ["dev", "proc", "sys"];

#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    #[error("the base has /{0} as a {1}, not a directory: cannot mount the script's /{0} there")]
    BadMountpoint(&'static str, &'static str),
    #[error("creating /{name} in the merged view for the script")]
    Mkdir {
        name: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what} (starting the script)")]
    Start {
        what: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("reading the script's output")]
    Forward(#[source] nix::Error),
}

impl GuestError for ScriptError {
    fn kind(&self) -> FailureKind {
        match self {
            ScriptError::BadMountpoint(..) => FailureKind::BadInput,
            _ => FailureKind::Internal,
        }
    }
}

/// How to exec the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecPlan {
    /// `#!interpreter [arg]`: exec the script itself (the kernel runs the
    /// interpreter, which must exist in the root).
    Direct { interpreter: Vec<u8> },
    /// No `#!`: `/bin/sh SCRIPT`.
    Shell,
}

/// Decides how to exec a script from its first line.
pub fn plan_exec(script: &[u8]) -> ExecPlan {
    match script.strip_prefix(b"#!") {
        None => ExecPlan::Shell,
        Some(rest) => {
            let line = rest.split(|&b| b == b'\n').next().unwrap_or(b"");
            let interpreter = line
                .split(|&b| b == b' ' || b == b'\t' || b == b'\r')
                .find(|w| !w.is_empty())
                .unwrap_or(b"")
                .to_vec();
            ExecPlan::Direct { interpreter }
        }
    }
}

/// How the script ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Exit code, or 128 + signal (as a shell reports it); `oom_killed`:
    /// the OOM killer fired while it ran (the host says what to do).
    Code { code: i32, oom_killed: bool },
    /// The script never ran, or the guest ran out of a limit.
    Failed(Failure),
}

/// The exit code for a wait status; `None` while still running.
pub fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// The message the script process sends back when it cannot exec.
pub fn encode_child_failure(f: &Failure) -> Vec<u8> {
    let kind = match f.kind {
        FailureKind::NoInterpreter => "no-interpreter",
        FailureKind::BadInput => "bad-input",
        FailureKind::OutOfScratch => "out-of-scratch",
        FailureKind::OutOfMemory => "out-of-memory",
        FailureKind::Internal => "internal",
    };
    format!("{kind}\t{}", f.reason).into_bytes()
}

pub fn decode_child_failure(bytes: &[u8]) -> Option<Failure> {
    if bytes.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(bytes);
    let (kind, reason) = text.split_once('\t').unwrap_or(("internal", &text));
    let kind = match kind {
        "no-interpreter" => FailureKind::NoInterpreter,
        "bad-input" => FailureKind::BadInput,
        "out-of-scratch" => FailureKind::OutOfScratch,
        "out-of-memory" => FailureKind::OutOfMemory,
        _ => FailureKind::Internal,
    };
    Some(Failure::new(kind, reason.to_string()))
}

/// The `oom_kill` counter of /proc/vmstat.
pub fn parse_oom_kills(vmstat: &str) -> Option<u64> {
    vmstat.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|v| v.trim().parse().ok())
}

fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat").ok().as_deref().and_then(parse_oom_kills).unwrap_or(0)
}

/// Makes /dev, /proc and /sys in the merged view where the base lacks
/// them; returns the ones it made (to leave out of the result).
pub fn ensure_mountpoints(merged: &Path) -> Result<Vec<&'static str>, ScriptError> {
    let mut made = Vec::new();
    for name in MOUNTPOINTS {
        let path = merged.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            // mount(2) follows symlinks: a base whose /proc points at / must
            // not steer our mounts onto the guest's own tree.
            Ok(m) => {
                let what = if m.file_type().is_symlink() { "symlink" } else { "file" };
                return Err(ScriptError::BadMountpoint(name, what));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&path)
                    .map_err(|source| ScriptError::Mkdir { name, source })?;
                made.push(name);
            }
            Err(source) => return Err(ScriptError::Mkdir { name, source }),
        }
    }
    Ok(made)
}

/// Runs the script over the tree at `merged`, forwarding its output to
/// the console until it and everything it started are gone.
pub fn run(merged: &Path, script: &[u8], env: &[String], console: &Console) -> Result<Ended, ScriptError> {
    let start = |what| move |source| ScriptError::Start { what, source };
    let env: Vec<CString> = env
        .iter()
        .map(|e| CString::new(e.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| start("an environment entry contains NUL")(nix::Error::EINVAL))?;
    let (out_r, out_w) = pipe2(OFlag::O_CLOEXEC).map_err(start("creating the output pipe"))?;
    let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(start("creating the status pipe"))?;
    let own_pid_ns = File::open("/proc/self/ns/pid").map_err(|e| start("opening our PID namespace")(io_to_nix(e)))?;
    let oom_before = oom_kills();

    unshare(CloneFlags::CLONE_NEWPID).map_err(start("unsharing the PID namespace"))?;
    // SAFETY: guest-init is single-threaded, so the child may run any
    // code (allocation included) until it execs.
    let fork = unsafe { fork() };
    let child = match fork {
        Ok(ForkResult::Child) => {
            drop(out_r);
            drop(err_r);
            child_main(merged, script, &env, out_w, err_w)
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => return Err(start("forking")(e)),
    };
    // Later children (none planned) would otherwise land in the script's
    // namespace, which dies with the script.
    setns(own_pid_ns.as_fd(), CloneFlags::CLONE_NEWPID).map_err(start("returning to our PID namespace"))?;
    drop(out_w);
    drop(err_w);

    let status = forward_until_gone(child, out_r, console)?;
    let mut report = Vec::new();
    let _ = File::from(err_r).read_to_end(&mut report);
    if let Some(f) = decode_child_failure(&report) {
        return Ok(Ended::Failed(f));
    }
    let code = exit_code(status).unwrap_or(128);
    let oom = oom_kills() > oom_before;
    if let Some(f) = oom_failure(oom, status, code) {
        return Ok(Ended::Failed(f));
    }
    if oom {
        console.log("the OOM killer killed a process the script started; the script still exited 0");
    }
    Ok(Ended::Code { code, oom_killed: oom })
}

/// A failed script is an out-of-memory failure when the OOM killer fired
/// while it ran: whether it killed the script itself (SIGKILL) or a
/// command the script then reported failing (a shell exits 137 for a
/// killed child; apt exits 100 for a killed dpkg), the limit to raise is
/// the memory. A script that succeeded anyway is left alone.
pub fn oom_failure(oom_killed: bool, status: WaitStatus, code: i32) -> Option<Failure> {
    if !oom_killed || code == 0 {
        return None;
    }
    let how = match status {
        WaitStatus::Signaled(_, Signal::SIGKILL, _) => "the script was killed by it".to_string(),
        _ => format!("the script then exited with {code}"),
    };
    Some(Failure::new(FailureKind::OutOfMemory, format!("the guest ran out of memory (the OOM killer fired; {how})")))
}

fn io_to_nix(e: io::Error) -> nix::Error {
    nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Forwards the output pipe line by line until it reaches end of file
/// (every process of the script's namespace is gone), or until the script
/// process is reaped and what is left in the pipe is drained (a process
/// stuck in the kernel must not hang the run).
fn forward_until_gone(child: Pid, out: OwnedFd, console: &Console) -> Result<WaitStatus, ScriptError> {
    let mut splitter = LineSplitter::default();
    let mut buf = vec![0u8; 64 << 10];
    let mut reaped = None;
    let mut pipe = File::from(out);
    loop {
        let ready = {
            let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(200u16)) {
                Ok(n) => n > 0,
                Err(nix::Error::EINTR) => false,
                Err(e) => return Err(ScriptError::Forward(e)),
            }
        };
        if ready {
            match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => splitter.push(&buf[..n], |l| console.out(l)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ScriptError::Forward(io_to_nix(e))),
            }
            continue;
        }
        if reaped.is_none() {
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(s) if exit_code(s).is_some() => reaped = Some(s),
                Ok(_) => {}
                Err(e) => return Err(ScriptError::Forward(e)),
            }
        } else {
            // Reaped, and nothing came for a whole poll period: drained.
            break;
        }
    }
    splitter.finish(|l| console.out(l));
    match reaped {
        Some(s) => Ok(s),
        None => loop {
            match waitpid(child, None) {
                Ok(s) if exit_code(s).is_some() => return Ok(s),
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(ScriptError::Forward(e)),
            }
        },
    }
}

/// The script process: never returns. Anything that fails before exec is
/// reported on the status pipe, then the process exits.
fn child_main(merged: &Path, script: &[u8], env: &[CString], out: OwnedFd, status: OwnedFd) -> ! {
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| setup_and_exec(merged, script, env, &out)));
    let failure = match result {
        Ok(f) => f,
        Err(_) => crate::fail::panic_failure(),
    };
    let mut status = File::from(status);
    let _ = status.write_all(&encode_child_failure(&failure));
    // SAFETY: _exit ends this (forked, single-threaded) process without
    // running the parent's atexit handlers or unwinding into its frames.
    unsafe { libc::_exit(127) }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::new(FailureKind::Internal, format!("preparing the script's sandbox: {what}: {e}"))
}

/// Namespaces, mounts, chroot, stdio, exec. Returns only on failure.
fn setup_and_exec(merged: &Path, script: &[u8], env: &[CString], out: &OwnedFd) -> Failure {
    let flags = CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS | CloneFlags::CLONE_NEWNET;
    if let Err(e) = unshare(flags) {
        return internal("unshare", e);
    }
    // Nothing mounted from here on may reach guest-init's namespace.
    if let Err(e) = mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>) {
        return internal("making mounts private", e);
    }
    if let Err(e) = sethostname(HOSTNAME) {
        return internal("sethostname", e);
    }
    if let Err(e) = sys::loopback_up() {
        return internal("bringing lo up", e);
    }
    if let Err(f) = mount_sandbox(merged) {
        return f;
    }
    if let Err(e) = write_script(merged, script) {
        return internal("writing the script", e);
    }
    if let Err(e) = chroot(merged) {
        return internal("chroot", e);
    }
    if let Err(e) = chdir("/") {
        return internal("chdir /", e);
    }
    nix::sys::stat::umask(Mode::from_bits_truncate(0o022));
    if let Err(e) = default_signals() {
        return internal("resetting signal dispositions", e);
    }
    if let Err(e) = stdio(out) {
        return internal("setting up stdin/stdout/stderr", e);
    }
    let (path, argv) = match plan_exec(script) {
        ExecPlan::Direct { interpreter } => {
            if interpreter.is_empty() {
                return Failure::new(FailureKind::NoInterpreter, "the script's #! line names no interpreter");
            }
            if let Err(f) = check_interpreter(&interpreter) {
                return f;
            }
            let p = CString::new(SCRIPT_PATH).expect("constant");
            (p.clone(), vec![p])
        }
        ExecPlan::Shell => {
            if let Err(f) = check_interpreter(SHELL.as_bytes()) {
                return f;
            }
            let sh = CString::new(SHELL).expect("constant");
            (sh.clone(), vec![sh, CString::new(SCRIPT_PATH).expect("constant")])
        }
    };
    let err = match execve(&path, &argv, env) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    let what = match plan_exec(script) {
        ExecPlan::Direct { interpreter } => String::from_utf8_lossy(&interpreter).into_owned(),
        ExecPlan::Shell => SHELL.to_string(),
    };
    Failure::new(
        FailureKind::NoInterpreter,
        format!(
            "cannot execute the script's interpreter {what}: {err}{}",
            if err == nix::Error::ENOENT { " (its ELF loader or a library it needs is missing from the image)" } else { "" }
        ),
    )
}

/// The interpreter must exist in the root (following symlinks, as exec
/// does) and not be a directory.
fn check_interpreter(path: &[u8]) -> Result<(), Failure> {
    let shown = String::from_utf8_lossy(path).into_owned();
    let missing = |why: &str| {
        Failure::new(FailureKind::NoInterpreter, format!("the image has no {shown} to run the script with ({why})"))
    };
    let c = CString::new(path).map_err(|_| missing("NUL in its name"))?;
    match nix::sys::stat::stat(c.as_c_str()) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR => {
            Err(missing("it is a directory"))
        }
        Ok(_) => Ok(()),
        Err(e) => Err(missing(&e.to_string())),
    }
}

/// Gives the script the signal state a fresh process has: Rust's runtime
/// ignores SIGPIPE in guest-init, and an ignored signal stays ignored
/// across exec (`yes | head -n1` would print "Broken pipe" errors instead
/// of ending quietly, as it does under Docker).
fn default_signals() -> nix::Result<()> {
    use nix::sys::signal::{sigprocmask, SigHandler, SigSet, SigmaskHow};
    for sig in [Signal::SIGPIPE, Signal::SIGCHLD, Signal::SIGINT, Signal::SIGQUIT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: SIG_DFL installs no handler code; this process is
        // single-threaded and about to exec.
        unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) }?;
    }
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

/// One mount of the sandbox.
struct SandboxMount {
    source: &'static str,
    /// Relative to the merged root.
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: &'static str,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC);

/// The chroot's mounts, in order (Docker's defaults for a container).
const SANDBOX: &[SandboxMount] = &[
    SandboxMount { source: "tmpfs", target: "dev", fstype: "tmpfs", flags: MsFlags::MS_NOSUID, data: "mode=755,size=65536k" },
    SandboxMount {
        source: "devpts",
        target: "dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: "newinstance,ptmxmode=0666,mode=0620,gid=5",
    },
    SandboxMount { source: "shm", target: "dev/shm", fstype: "tmpfs", flags: NOSUID_NODEV_NOEXEC, data: "mode=1777,size=65536k" },
    SandboxMount { source: "sysfs", target: "sys", fstype: "sysfs", flags: NOSUID_NODEV_NOEXEC.union(MsFlags::MS_RDONLY), data: "" },
    // Mounted from inside the new PID namespace: it shows the script's
    // processes only.
    SandboxMount { source: "proc", target: "proc", fstype: "proc", flags: NOSUID_NODEV_NOEXEC, data: "" },
];

/// The device nodes of the chroot's /dev: (name, major, minor), all 0666.
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The symlinks of the chroot's /dev.
const DEV_LINKS: &[(&str, &str)] = &[
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("core", "/proc/kcore"),
];

fn mount_sandbox(merged: &Path) -> Result<(), Failure> {
    for m in SANDBOX {
        let target: PathBuf = merged.join(m.target);
        if m.target.starts_with("dev/") {
            std::fs::DirBuilder::new().mode(0o755).create(&target).map_err(|e| internal("creating a /dev mountpoint", e))?;
        }
        let data = if m.data.is_empty() { None } else { Some(m.data) };
        mount(Some(m.source), &target, Some(m.fstype), m.flags, data)
            .map_err(|e| internal(&format!("mounting {} on /{}", m.fstype, m.target), e))?;
        if m.target == "dev" {
            make_devices(&target)?;
        }
    }
    Ok(())
}

fn make_devices(dev: &Path) -> Result<(), Failure> {
    for (name, major, minor) in DEVICES {
        let p = dev.join(name);
        mknod(&p, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(*major, *minor))
            .map_err(|e| internal(&format!("mknod /dev/{name}"), e))?;
        // mknod is subject to the umask; the mode must be exactly 0666.
        nix::sys::stat::fchmodat(nix::fcntl::AT_FDCWD, &p, Mode::from_bits_truncate(0o666), nix::sys::stat::FchmodatFlags::FollowSymlink)
            .map_err(|e| internal(&format!("chmod /dev/{name}"), e))?;
    }
    for (name, target) in DEV_LINKS {
        std::os::unix::fs::symlink(target, dev.join(name)).map_err(|e| internal(&format!("symlink /dev/{name}"), e))?;
    }
    Ok(())
}

fn write_script(merged: &Path, script: &[u8]) -> io::Result<()> {
    let dir = merged.join(SCRIPT_DIR.trim_start_matches('/'));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(merged.join(SCRIPT_PATH.trim_start_matches('/')))?;
    f.write_all(script)
}

fn stdio(out: &OwnedFd) -> nix::Result<()> {
    let null = nix::fcntl::open(c"/dev/null", OFlag::O_RDONLY, Mode::empty())?;
    dup_onto(null.as_raw_fd(), 0)?;
    dup_onto(out.as_raw_fd(), 1)?;
    dup_onto(out.as_raw_fd(), 2)
}

/// dup2 onto a fixed descriptor number (0, 1, 2), which is left without
/// close-on-exec so the script inherits it.
fn dup_onto(from: i32, to: i32) -> nix::Result<()> {
    // SAFETY: dup2 on two plain descriptor numbers; `to` is one of the
    // standard descriptors, which this process does not otherwise own
    // through any Rust handle it will use again before exec.
    let r = unsafe { libc::dup2(from, to) };
    nix::Error::result(r).map(drop)
}

/// Free bytes on a filesystem (statvfs), for the "scratch full" check.
pub fn free_bytes(path: &CStr) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks_available() * st.fragment_size(), st.blocks() * st.fragment_size()))
}

/// Whether a script failure is best explained by a full scratch disk: less
/// than 1 MiB or 1% of it left.
pub fn scratch_looks_full(free: u64, total: u64) -> bool {
    free < (1 << 20).max(total / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_exec_from_the_first_line() {
        let table: &[(&[u8], ExecPlan)] = &[
            (b"echo hi\n", ExecPlan::Shell),
            (b"", ExecPlan::Shell),
            (b" #!/bin/bash\n", ExecPlan::Shell),
            (b"#!/bin/bash\necho", ExecPlan::Direct { interpreter: b"/bin/bash".to_vec() }),
            (b"#! /usr/bin/env python3\n", ExecPlan::Direct { interpreter: b"/usr/bin/env".to_vec() }),
            (b"#!/bin/sh -e\r\n", ExecPlan::Direct { interpreter: b"/bin/sh".to_vec() }),
            (b"#!\n", ExecPlan::Direct { interpreter: b"".to_vec() }),
        ];
        for (script, want) in table {
            assert_eq!(&plan_exec(script), want, "{:?}", String::from_utf8_lossy(script));
        }
    }

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        let p = Pid::from_raw(5);
        assert_eq!(exit_code(WaitStatus::Exited(p, 0)), Some(0));
        assert_eq!(exit_code(WaitStatus::Exited(p, 42)), Some(42));
        assert_eq!(exit_code(WaitStatus::Signaled(p, Signal::SIGKILL, false)), Some(137));
        assert_eq!(exit_code(WaitStatus::StillAlive), None);
    }

    #[test]
    fn child_failures_round_trip() {
        for kind in [FailureKind::NoInterpreter, FailureKind::Internal, FailureKind::BadInput, FailureKind::OutOfMemory, FailureKind::OutOfScratch] {
            let f = Failure::new(kind, "the image has no /bin/sh\tto run");
            assert_eq!(decode_child_failure(&encode_child_failure(&f)), Some(f));
        }
        assert_eq!(decode_child_failure(b""), None);
        assert_eq!(decode_child_failure(b"garbage"), Some(Failure::new(FailureKind::Internal, "garbage")));
    }

    #[test]
    fn an_oom_kill_explains_a_failed_script_only() {
        let p = Pid::from_raw(1);
        let killed = WaitStatus::Signaled(p, Signal::SIGKILL, false);
        let table: Vec<(bool, WaitStatus, i32, Option<&str>)> = vec![
            (true, killed, 137, Some("the guest ran out of memory (the OOM killer fired; the script was killed by it)")),
            (true, WaitStatus::Exited(p, 137), 137, Some("the guest ran out of memory (the OOM killer fired; the script then exited with 137)")),
            (true, WaitStatus::Exited(p, 0), 0, None),
            (false, killed, 137, None),
            (false, WaitStatus::Exited(p, 1), 1, None),
        ];
        for (oom, status, code, want) in table {
            let got = oom_failure(oom, status, code);
            assert_eq!(got.as_ref().map(|f| f.reason.as_str()), want, "{oom} {status:?}");
            assert!(got.iter().all(|f| f.kind == FailureKind::OutOfMemory));
        }
    }

    #[test]
    fn reads_the_oom_counter() {
        assert_eq!(parse_oom_kills("pgfault 10\noom_kill 3\nx 1\n"), Some(3));
        assert_eq!(parse_oom_kills("pgfault 10\n"), None);
    }

    #[test]
    fn scratch_full_threshold() {
        let gib = 1u64 << 30;
        assert!(scratch_looks_full(0, gib));
        assert!(scratch_looks_full(10 << 20, gib));
        assert!(!scratch_looks_full(20 << 20, gib));
        assert!(scratch_looks_full(512 << 10, 16 << 20));
        assert!(!scratch_looks_full(2 << 20, 16 << 20));
    }

    #[test]
    fn sandbox_mounts_dev_first_and_proc_last() {
        let order: Vec<&str> = SANDBOX.iter().map(|m| m.target).collect();
        assert_eq!(order, vec!["dev", "dev/pts", "dev/shm", "sys", "proc"]);
        assert!(SANDBOX.iter().find(|m| m.target == "sys").unwrap().flags.contains(MsFlags::MS_RDONLY));
        assert!(SCRIPT_PATH.starts_with("/dev/"), "the script must live in the private /dev");
    }
}
