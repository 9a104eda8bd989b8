//! QEMU's `microvm` machine as a launcher: TCG where the host has no
//! hardware virtualisation, KVM where it has (and as a test harness).
//!
//! The guest contract is the same as the built-in VMM's. QEMU-specific
//! points (DESIGN.md): `acpi=off` (a no-ACPI kernel cannot read disks that
//! ACPI tables describe), at most 8 virtio-mmio slots, `-no-reboot` so the
//! guest's reset ends QEMU, the console on a pipe rather than our stdout
//! (`-o -` owns that).

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::backend::Backend;
use super::nbd::NbdServer;
use super::{Backing, GuestExit, GuestSpec, Machine, MachineError};

/// How often the console loop checks `stop` and the deadline.
const POLL_INTERVAL_MS: u16 = 50;
/// Keep at most this much of QEMU's stderr for error messages.
const STDERR_KEEP: usize = 16 << 10;

/// Which QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
    /// Software emulation: works everywhere, about 10× slower.
    Tcg,
}

/// The QEMU launcher.
#[derive(Debug, Clone)]
pub struct QemuMachine {
    binary: String,
    accel: Accel,
}

/// The program runasroot runs (QEMU's x86-64 system emulator).
pub const QEMU_NAME: &str = "qemu-system-x86_64";
/// The environment variable naming the QEMU to run (as `--qemu` does).
pub const QEMU_ENV: &str = "RUNASROOT_QEMU";
/// Where QEMU is installed, tried after PATH: a Nix build runs with
/// PATH=/path-not-set, cron and systemd units with a short PATH.
/// Distributions (/usr/bin), source installs (/usr/local/bin), NixOS and
/// multi-user Nix profiles.
pub const QEMU_DIRS: &[&str] =
    &["/usr/local/bin", "/usr/bin", "/bin", "/run/current-system/sw/bin", "/nix/var/nix/profiles/default/bin"];

/// Who asked for a QEMU binary (for error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuSource {
    Flag,
    Env,
    Default,
}

/// Where to look for QEMU, in order: a requested path as it is; a
/// requested or default name in each PATH directory, then in [`QEMU_DIRS`].
/// Pure: the caller checks which candidate is an executable file.
pub fn qemu_candidates(requested: Option<&OsStr>, path_var: Option<&OsStr>) -> Vec<PathBuf> {
    let name = requested.unwrap_or(OsStr::new(QEMU_NAME));
    if std::os::unix::ffi::OsStrExt::as_bytes(name).contains(&b'/') {
        return vec![PathBuf::from(name)];
    }
    let mut dirs: Vec<PathBuf> = path_var.map(|p| std::env::split_paths(p).filter(|d| d.is_absolute()).collect()).unwrap_or_default();
    for d in QEMU_DIRS {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(PathBuf::from(d));
        }
    }
    dirs.into_iter().map(|d| d.join(name)).collect()
}

fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl QemuMachine {
    /// Finds QEMU: `--qemu` (`flag`), else `RUNASROOT_QEMU`, else
    /// `qemu-system-x86_64` in PATH, else in [`QEMU_DIRS`]. A value with a
    /// `/` is a path used as it is; a bare name is looked up the same way.
    /// When nothing is found the error lists every place tried.
    pub fn find(accel: Accel, flag: Option<&OsStr>) -> Result<QemuMachine, MachineError> {
        let env = std::env::var_os(QEMU_ENV).filter(|v| !v.is_empty());
        let (requested, source) = match (flag, &env) {
            (Some(f), _) => (Some(f), QemuSource::Flag),
            (None, Some(e)) => (Some(e.as_os_str()), QemuSource::Env),
            (None, None) => (None, QemuSource::Default),
        };
        let path_var = std::env::var_os("PATH");
        let candidates = qemu_candidates(requested, path_var.as_deref());
        match candidates.iter().find(|c| is_executable_file(c)) {
            Some(found) => Ok(QemuMachine { binary: found.to_string_lossy().into_owned(), accel }),
            None => Err(MachineError::QemuNotFound {
                requested: requested.map(|r| r.to_string_lossy().into_owned()),
                asked_by: source,
                path_var: path_var.map(|p| p.to_string_lossy().into_owned()),
                tried: candidates,
            }),
        }
    }

    /// For benches and tests: QEMU as [`QemuMachine::find`] finds it
    /// (without `--qemu`), else the bare name, so that starting it fails
    /// with the spawn error.
    pub fn new(accel: Accel) -> QemuMachine {
        QemuMachine::find(accel, None).unwrap_or_else(|_| QemuMachine { binary: QEMU_NAME.to_string(), accel })
    }

    /// The binary that will be run.
    pub fn binary(&self) -> &str {
        &self.binary
    }
}

/// QEMU's option syntax doubles commas inside a value.
fn escape(value: &std::path::Path) -> OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let mut out = Vec::new();
    for &b in value.as_os_str().as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// The NBD socket of concatenated disk `i` (QEMU has no block driver that
/// concatenates files; [`super::nbd`] serves it).
fn nbd_socket(spec: &GuestSpec, i: usize) -> PathBuf {
    spec.work_dir.join(format!("nbd-{i}.sock"))
}

/// The full QEMU argument list for a guest.
pub fn args(spec: &GuestSpec, accel: Accel) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    push("-M");
    push("microvm,acpi=off");
    match accel {
        Accel::Kvm => {
            push("-accel");
            push("kvm");
            push("-cpu");
            push("host");
        }
        Accel::Tcg => {
            push("-accel");
            push("tcg");
            push("-cpu");
            push("max");
        }
    }
    for s in [
        "-smp".to_string(),
        spec.cpus.max(1).to_string(),
        "-m".to_string(),
        format!("{}M", spec.memory_mib),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-chardev".into(),
        "stdio,id=console,signal=off".into(),
        "-serial".into(),
        "chardev:console".into(),
    ] {
        a.push(s.into());
    }
    a.push("-kernel".into());
    a.push(spec.kernel.bzimage.clone().into());
    a.push("-initrd".into());
    a.push(spec.initramfs.clone().into());
    a.push("-append".into());
    a.push(spec.cmdline.clone().into());
    for (i, disk) in spec.disks.iter().enumerate() {
        let mut drive = match &disk.backing {
            Backing::File(path) => {
                let mut d = OsString::from("file=");
                d.push(escape(path));
                d.push(",format=raw");
                d
            }
            Backing::Concat { .. } => {
                let mut d = OsString::from("driver=nbd,server.type=unix,server.path=");
                d.push(escape(&nbd_socket(spec, i)));
                d
            }
        };
        // Writable disks are scratch (output, swap): flushes can be
        // ignored, the data reaches the host file when QEMU exits.
        drive.push(format!(
            ",if=none,id=d{i},readonly={},cache={}",
            if disk.read_only { "on" } else { "off" },
            if disk.read_only { "writeback" } else { "unsafe" }
        ));
        a.push("-drive".into());
        a.push(drive);
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=d{i},serial={}", disk.serial).into());
    }
    a
}

/// Starts an NBD server for each concatenated disk; they stop when the
/// returned servers are dropped (after QEMU has exited).
fn serve_concatenated(spec: &GuestSpec) -> Result<Vec<NbdServer>, MachineError> {
    let mut servers = Vec::new();
    for (i, disk) in spec.disks.iter().enumerate() {
        if let Backing::Concat { .. } = &disk.backing {
            let socket = nbd_socket(spec, i);
            let err = |source| MachineError::Nbd { serial: disk.serial.clone(), socket: socket.clone(), source };
            let backend = Backend::open(&disk.backing, true).map_err(|(_, e)| err(e))?;
            servers.push(NbdServer::start(backend, &socket).map_err(err)?);
        }
    }
    Ok(servers)
}

impl Machine for QemuMachine {
    fn name(&self) -> String {
        match self.accel {
            Accel::Kvm => "qemu-kvm".into(),
            Accel::Tcg => "qemu-tcg".into(),
        }
    }



    fn boots_vmlinux(&self) -> bool {
        false
    }

    fn run(&mut self, spec: &GuestSpec, console: &mut dyn FnMut(&[u8])) -> Result<GuestExit, MachineError> {
        let mut cmd = Command::new(&self.binary);
        let _servers = serve_concatenated(spec)?;
        cmd.args(args(spec, self.accel))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches only us,
            // and we stop QEMU ourselves after cleaning up.
            .process_group(0);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
        // no memory of the parent; it makes QEMU die if runasroot is killed.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|source| MachineError::QemuSpawn { binary: self.binary.clone(), source })?;
        let guard = KillOnDrop(Some(&mut child));
        run_child(guard, spec, console)
    }
}

/// Kills and reaps QEMU on every path out of [`run_child`], errors included.
struct KillOnDrop<'a>(Option<&'a mut Child>);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run_child(mut guard: KillOnDrop<'_>, spec: &GuestSpec, console: &mut dyn FnMut(&[u8])) -> Result<GuestExit, MachineError> {
    let child = guard.0.as_mut().expect("child present until drop");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let stderr_thread = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            if kept.len() < STDERR_KEEP {
                kept.extend_from_slice(&buf[..n]);
            }
        }
        String::from_utf8_lossy(&kept).into_owned()
    });

    let mut buf = vec![0u8; 64 << 10];
    loop {
        if spec.stop.load(Ordering::SeqCst) {
            return Ok(GuestExit::Stopped);
        }
        if spec.deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(GuestExit::TimedOut);
        }
        let mut fds = [nix::poll::PollFd::new(stdout.as_fd(), nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(POLL_INTERVAL_MS)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(MachineError::Console(e.into())),
        }
        match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => console(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(MachineError::Console(e)),
        }
    }

    // Console closed: QEMU is exiting. Wait for it, still honouring stop.
    let status = loop {
        if let Some(status) = child.try_wait().map_err(MachineError::Console)? {
            break status;
        }
        if spec.stop.load(Ordering::SeqCst) {
            return Ok(GuestExit::Stopped);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    guard.0 = None;
    let stderr = stderr_thread.join().unwrap_or_default();
    if status.success() {
        Ok(GuestExit::Reset)
    } else {
        Err(MachineError::QemuFailed { status, stderr: stderr.trim().lines().map(str::to_string).collect() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{DiskSpec, KernelImages};

    #[test]
    fn looks_for_qemu_in_path_then_the_usual_places() {
        let os = |s: &str| OsString::from(s);
        let paths = |v: Vec<PathBuf>| v.into_iter().map(|p| p.display().to_string()).collect::<Vec<_>>();
        // Inside a Nix build: PATH names nothing real.
        assert_eq!(
            paths(qemu_candidates(None, Some(&os("/path-not-set")))),
            [
                "/path-not-set/qemu-system-x86_64",
                "/usr/local/bin/qemu-system-x86_64",
                "/usr/bin/qemu-system-x86_64",
                "/bin/qemu-system-x86_64",
                "/run/current-system/sw/bin/qemu-system-x86_64",
                "/nix/var/nix/profiles/default/bin/qemu-system-x86_64",
            ]
        );
        // PATH order first, no duplicates, relative entries ignored.
        assert_eq!(
            paths(qemu_candidates(Some(&os("my-qemu")), Some(&os("/opt/q/bin:.:/usr/bin")))),
            [
                "/opt/q/bin/my-qemu",
                "/usr/bin/my-qemu",
                "/usr/local/bin/my-qemu",
                "/bin/my-qemu",
                "/run/current-system/sw/bin/my-qemu",
                "/nix/var/nix/profiles/default/bin/my-qemu",
            ]
        );
        // A path is taken as it is.
        assert_eq!(paths(qemu_candidates(Some(&os("/nix/store/x-qemu/bin/qemu-system-x86_64")), None)), ["/nix/store/x-qemu/bin/qemu-system-x86_64"]);
        assert_eq!(paths(qemu_candidates(Some(&os("./qemu")), Some(&os("/usr/bin")))), ["./qemu"]);
        assert_eq!(qemu_candidates(None, None).len(), QEMU_DIRS.len());
    }

    #[test]
    fn a_missing_qemu_is_reported_with_every_place_tried() {
        let e = QemuMachine::find(Accel::Tcg, Some(OsStr::new("/nonexistent/qemu"))).unwrap_err().to_string();
        assert_eq!(e, "QEMU not found: --qemu /nonexistent/qemu does not exist or is not executable; fix: give the path of qemu-system-x86_64");
        let e = MachineError::QemuNotFound {
            requested: None,
            asked_by: QemuSource::Default,
            path_var: Some("/path-not-set".into()),
            tried: qemu_candidates(None, Some(OsStr::new("/path-not-set"))),
        }
        .to_string();
        assert_eq!(
            e,
            "QEMU not found: looked for qemu-system-x86_64 in PATH (/path-not-set) and in /usr/local/bin, /usr/bin, /bin, \
             /run/current-system/sw/bin, /nix/var/nix/profiles/default/bin; \
             fix: apt-get install qemu-system-x86, or name the binary with --qemu PATH or RUNASROOT_QEMU=PATH"
        );
    }
    use std::path::PathBuf;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn builds_microvm_command_line() {
        let spec = GuestSpec {
            kernel: KernelImages { bzimage: "/k/bzImage".into(), vmlinux: None },
            initramfs: "/k/init.cpio".into(),
            cmdline: "console=ttyS0 reboot=t".into(),
            memory_mib: 512,
            cpus: 2,
            disks: vec![
                DiskSpec { backing: Backing::Concat { extents: vec![], len: 512 }, read_only: true, serial: "rar-lower".into() },
                DiskSpec { backing: Backing::File(PathBuf::from("/in/a,b.tar")), read_only: true, serial: "rar-job".into() },
                DiskSpec { backing: Backing::File(PathBuf::from("/t/out.img")), read_only: false, serial: "rar-output".into() },
            ],
            deadline: None,
            work_dir: "/t/w,x".into(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let got: Vec<String> = args(&spec, Accel::Tcg).into_iter().map(|s| s.into_string().unwrap()).collect();
        let want = "-M microvm,acpi=off -accel tcg -cpu max -smp 2 -m 512M -nodefaults -no-user-config -nographic -no-reboot \
            -chardev stdio,id=console,signal=off -serial chardev:console -kernel /k/bzImage -initrd /k/init.cpio \
            -append console=ttyS0|reboot=t \
            -drive driver=nbd,server.type=unix,server.path=/t/w,,x/nbd-0.sock,if=none,id=d0,readonly=on,cache=writeback \
            -device virtio-blk-device,drive=d0,serial=rar-lower \
            -drive file=/in/a,,b.tar,format=raw,if=none,id=d1,readonly=on,cache=writeback -device virtio-blk-device,drive=d1,serial=rar-job \
            -drive file=/t/out.img,format=raw,if=none,id=d2,readonly=off,cache=unsafe -device virtio-blk-device,drive=d2,serial=rar-output";
        let want: Vec<String> = want.split_whitespace().map(|s| s.replace('|', " ")).collect();
        assert_eq!(got, want);
        let kvm: Vec<String> = args(&spec, Accel::Kvm).into_iter().take(6).map(|s| s.into_string().unwrap()).collect();
        assert_eq!(kvm, ["-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host"]);
    }
}
