//! QEMU's `microvm` machine as a launcher: TCG where the host has no
//! hardware virtualisation, KVM where it has (and as a test harness).
//!
//! The guest contract is the same as the built-in VMM's. QEMU-specific
//! points (DESIGN.md): `acpi=off` (a no-ACPI kernel cannot read disks that
//! ACPI tables describe), at most 8 virtio-mmio slots, `-no-reboot` so the
//! guest's reset ends QEMU, the console on a pipe rather than our stdout
//! (`-o -` owns that).

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Backing, GuestExit, GuestSpec, Machine, MachineError};

/// QEMU microvm's virtio-mmio slot count (a 9th disk is refused).
pub const MAX_DISKS: usize = 8;
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

impl QemuMachine {
    /// `RUNASROOT_QEMU` overrides the binary (default `qemu-system-x86_64`).
    pub fn new(accel: Accel) -> QemuMachine {
        let binary = std::env::var("RUNASROOT_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string());
        QemuMachine { binary, accel }
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

/// The full QEMU argument list for a guest; each disk must be one file
/// (QEMU has no block driver that concatenates files).
pub fn args(spec: &GuestSpec, accel: Accel) -> Result<Vec<OsString>, MachineError> {
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
        let Backing::File(path) = &disk.backing else {
            return Err(MachineError::NoConcat { launcher: "QEMU".into(), disk: disk.serial.clone() });
        };
        let mut drive = OsString::from("file=");
        drive.push(escape(path));
        // Writable disks are scratch (output, swap): flushes can be
        // ignored, the data reaches the host file when QEMU exits.
        drive.push(format!(
            ",format=raw,if=none,id=d{i},readonly={},cache={}",
            if disk.read_only { "on" } else { "off" },
            if disk.read_only { "writeback" } else { "unsafe" }
        ));
        a.push("-drive".into());
        a.push(drive);
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=d{i},serial={}", disk.serial).into());
    }
    Ok(a)
}

impl Machine for QemuMachine {
    fn name(&self) -> String {
        match self.accel {
            Accel::Kvm => "qemu-kvm".into(),
            Accel::Tcg => "qemu-tcg".into(),
        }
    }

    fn can_concat(&self) -> bool {
        false
    }

    fn max_disks(&self) -> usize {
        MAX_DISKS
    }

    fn boots_vmlinux(&self) -> bool {
        false
    }

    fn run(&mut self, spec: &GuestSpec, console: &mut dyn FnMut(&[u8])) -> Result<GuestExit, MachineError> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(args(spec, self.accel)?)
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
        Err(MachineError::QemuFailed { status, stderr: stderr.trim().to_string() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{DiskSpec, KernelImages};
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
                DiskSpec { backing: Backing::File(PathBuf::from("/in/a,b.tar")), read_only: true, serial: "rar-lower".into() },
                DiskSpec { backing: Backing::File(PathBuf::from("/t/out.img")), read_only: false, serial: "rar-output".into() },
            ],
            deadline: None,
            stop: Arc::new(AtomicBool::new(false)),
        };
        let got: Vec<String> = args(&spec, Accel::Tcg).unwrap().into_iter().map(|s| s.into_string().unwrap()).collect();
        let want = "-M microvm,acpi=off -accel tcg -cpu max -smp 2 -m 512M -nodefaults -no-user-config -nographic -no-reboot \
            -chardev stdio,id=console,signal=off -serial chardev:console -kernel /k/bzImage -initrd /k/init.cpio \
            -append console=ttyS0|reboot=t \
            -drive file=/in/a,,b.tar,format=raw,if=none,id=d0,readonly=on,cache=writeback -device virtio-blk-device,drive=d0,serial=rar-lower \
            -drive file=/t/out.img,format=raw,if=none,id=d1,readonly=off,cache=unsafe -device virtio-blk-device,drive=d1,serial=rar-output";
        let want: Vec<String> = want.split_whitespace().map(|s| s.replace('|', " ")).collect();
        assert_eq!(got, want);
        let mut concat = spec.clone();
        concat.disks[0].backing = Backing::Concat { extents: vec![], len: 512 };
        assert!(matches!(args(&concat, Accel::Tcg), Err(MachineError::NoConcat { .. })));
        let kvm: Vec<String> = args(&spec, Accel::Kvm).unwrap().into_iter().take(6).map(|s| s.into_string().unwrap()).collect();
        assert_eq!(kvm, ["-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host"]);
    }
}
