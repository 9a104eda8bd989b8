//! Tier 1: the built-in VMM against a real /dev/kvm (PVM included, where
//! Linux itself cannot get far; DESIGN.md "test tiers").
//!
//! * `tier1_test_guest_*`: a freestanding test guest (tests/tier1-guest/,
//!   built here with gcc) prints on COM1, drives two virtio-blk disks
//!   through our virtio-mmio transport, copies sector 0 of the read-only
//!   disk to the writable one and resets through the i8042; the bytes are
//!   checked on the host.
//! * `tier1_real_kernel_*`: our real kernel, booted with earlyprintk,
//!   must show its banner and exactly our command line on the console: a
//!   check of the zero page, command line, 64-bit entry and serial port
//!   against Linux itself. It is then stopped through `stop`.
//!
//! Where /dev/kvm is missing or unusable, each test prints "skipped: …"
//! and returns.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use runasroot::machine::kvm::{boot, KvmMachine};
use runasroot::machine::{Backing, DiskSpec, GuestExit, GuestSpec, KernelImages, Machine};

/// The reason the built-in VMM cannot run at all here, if any.
fn kvm_unusable() -> Option<String> {
    match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Err(e) => Some(format!("/dev/kvm cannot be opened ({e})")),
        Ok(_) => KvmMachine::new().err().map(|e| format!("KvmMachine::new failed: {e}")),
    }
}

/// Builds the test guest with gcc; `Err(reason)` when gcc is missing.
fn build_test_guest(dir: &Path) -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tier1-guest");
    let out = dir.join("tier1-guest.elf");
    let status = Command::new("gcc")
        .args(["-ffreestanding", "-nostdlib", "-static", "-fno-pie", "-no-pie", "-mno-red-zone"])
        .args(["-mgeneral-regs-only", "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-O2"])
        .arg(format!("-Wl,-T,{}", src.join("link.ld").display()))
        .arg("-Wl,--build-id=none")
        .arg("-o")
        .arg(&out)
        .arg(src.join("guest.c"))
        .status()
        .map_err(|e| format!("gcc cannot be run ({e}); the test guest needs it"))?;
    assert!(status.success(), "building the test guest failed: {status}");
    Ok(out)
}

fn spec(kernel: KernelImages, initramfs: PathBuf, cmdline: &str, disks: Vec<DiskSpec>, timeout: Duration) -> GuestSpec {
    GuestSpec {
        kernel,
        initramfs,
        cmdline: cmdline.into(),
        memory_mib: 128,
        cpus: 1,
        disks,
        deadline: Some(Instant::now() + timeout),
        work_dir: std::env::temp_dir(),
        stop: Arc::new(AtomicBool::new(false)),
    }
}

#[test]
fn tier1_test_guest_copies_a_sector_and_resets() {
    if let Some(why) = kvm_unusable() {
        skip(&why);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let guest = match build_test_guest(dir.path()) {
        Ok(g) => g,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    // Disk 0 (read-only): 8 sectors, sector 0 a recognisable pattern.
    let sector0: Vec<u8> = (0..512u32).map(|i| (i * 7 % 256) as u8).collect();
    let ro = dir.path().join("ro.img");
    std::fs::write(&ro, [sector0.clone(), vec![0x11; 7 * 512]].concat()).unwrap();
    let rw = dir.path().join("rw.img");
    std::fs::write(&rw, vec![0u8; 2 * 512]).unwrap();
    let empty = dir.path().join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();

    let disks = vec![
        DiskSpec { backing: Backing::File(ro.clone()), read_only: true, serial: "runasroot-layers".into() },
        DiskSpec { backing: Backing::File(rw.clone()), read_only: false, serial: "runasroot-output".into() },
    ];
    let kernel = KernelImages { bzimage: "/nonexistent".into(), vmlinux: Some(guest) };
    let spec = spec(kernel, empty, "tier1 test", disks, Duration::from_secs(60));
    let mut console = Vec::new();
    let t0 = Instant::now();
    let mut vmm = KvmMachine::new().unwrap();
    let t = Instant::now();
    let exit = vmm.run(&spec, &mut |b| console.extend_from_slice(b));
    let elapsed = t.elapsed();
    let console = String::from_utf8_lossy(&console).into_owned();
    println!("console ({elapsed:?}):\n{console}");
    assert_eq!(exit.unwrap(), GuestExit::Reset, "console:\n{console}");

    let want = "tier1 guest: hello from COM1\n\
        tier1 guest: cmdline=tier1 test virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6\n\
        disk0 id=runasroot-layers sectors=8\n\
        disk1 id=runasroot-output sectors=2\n\
        tier1 guest: copied sector 0\n\
        tier1 guest: write to read-only disk0 status=1\n\
        tier1 guest: read past the end of disk0 status=1\n\
        tier1 guest: resetting through the i8042\n";
    assert_eq!(console, want);

    let mut copied = vec![0u8; 1024];
    std::fs::File::open(&rw).unwrap().read_exact_at(&mut copied, 0).unwrap();
    assert_eq!(&copied[..512], &sector0[..], "sector 0 of the writable disk");
    assert_eq!(&copied[512..], &[0u8; 512][..], "sector 1 untouched");
    assert_eq!(std::fs::read(&ro).unwrap()[..512], sector0[..], "the read-only disk is unchanged");
    let first_run = vmm.first_kvm_run().expect("the boot vCPU ran");
    println!("KvmMachine::new → first KVM_RUN: {:?}", first_run.duration_since(t0));
}

#[test]
fn tier1_test_guest_is_stopped_by_the_deadline_and_by_stop() {
    if let Some(why) = kvm_unusable() {
        skip(&why);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A guest that spins forever: `jmp .` at the entry point.
    let path = dir.path().join("spin.elf");
    std::fs::write(&path, tiny_elf(0x20_0000, &[0xeb, 0xfe])).unwrap();
    let empty = dir.path().join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();
    let kernel = KernelImages { bzimage: "/nonexistent".into(), vmlinux: Some(path) };

    let mut vmm = KvmMachine::new().unwrap();
    let s = spec(kernel.clone(), empty.clone(), "", vec![], Duration::from_millis(300));
    let t = Instant::now();
    assert_eq!(vmm.run(&s, &mut |_| {}).unwrap(), GuestExit::TimedOut);
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(5), "deadline honoured in {took:?}");

    // Two vCPUs: the second waits inside KVM_RUN for an INIT/SIPI that
    // never comes, and must be kicked out all the same.
    let mut s = spec(kernel, empty, "", vec![], Duration::from_secs(60));
    s.cpus = 2;
    let stop = s.stop.clone();
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        // Both vCPU threads are running (one spins in the guest, one waits
        // in KVM_RUN): each must be under its seccomp filter, with SIGINT
        // and SIGTERM left to the host program's threads.
        let confined = vcpu_thread_status();
        stop.store(true, Ordering::Release);
        confined
    });
    let t = Instant::now();
    assert_eq!(vmm.run(&s, &mut |_| {}).unwrap(), GuestExit::Stopped);
    let confined = setter.join().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "stop honoured in {:?}", t.elapsed());
    assert!(confined.iter().any(|(name, _, _)| name == "vcpu1"), "both vCPU threads seen: {confined:?}");
    for (name, seccomp, sigint_blocked) in confined {
        assert_eq!(seccomp, "2", "{name} runs in seccomp filter mode (2)");
        assert!(sigint_blocked, "{name} blocks SIGINT and SIGTERM");
    }
}

/// For each live thread of this process named vcpuN: its name, the
/// `Seccomp:` field of its status and whether it blocks SIGINT and SIGTERM.
fn vcpu_thread_status() -> Vec<(String, String, bool)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        if !name.starts_with("vcpu") {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |key: &str| status.lines().find_map(|l| l.strip_prefix(key)).unwrap_or("").trim().to_string();
        let blocked = u64::from_str_radix(&field("SigBlk:"), 16).unwrap_or(0);
        let bit = |sig: i32| 1u64 << (sig - 1);
        found.push((name, field("Seccomp:"), blocked & bit(libc::SIGINT) != 0 && blocked & bit(libc::SIGTERM) != 0));
    }
    found
}

/// A minimal x86-64 ELF: one PT_LOAD of `code` at `paddr`, entered there.
fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; 64 + 56];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2;
    e[5] = 1;
    e[6] = 1;
    e[16..18].copy_from_slice(&2u16.to_le_bytes());
    e[18..20].copy_from_slice(&62u16.to_le_bytes());
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&paddr.to_le_bytes());
    e[32..40].copy_from_slice(&64u64.to_le_bytes());
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    e[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    e[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
    e[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
    e[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    e[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    e[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    e.extend_from_slice(code);
    e
}

/// The guest kernel's directory from kernel-config/build.sh, or why not.
fn kernel_dir() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel-config/build.sh");
    let out =
        Command::new("bash").arg(&script).output().map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!("kernel-config/build.sh failed ({}): {}", out.status, stderr.trim()));
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim());
    Ok(dir)
}

#[test]
fn tier1_real_kernel_prints_its_banner_and_our_command_line() {
    if let Some(why) = kvm_unusable() {
        skip(&why);
        return;
    }
    let dir = match kernel_dir() {
        Ok(d) => d,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.cpio");
    std::fs::write(&empty, b"").unwrap();
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let base = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1";
    let disks = vec![DiskSpec { backing: Backing::File(disk), read_only: true, serial: "runasroot-layers".into() }];
    let kernel = KernelImages { bzimage: dir.join("bzImage"), vmlinux: Some(dir.join("vmlinux")) };
    let mut spec = spec(kernel, empty, base, disks, Duration::from_secs(90));
    spec.memory_mib = 256;
    let full_cmdline = boot::cmdline(base, 1).unwrap();
    let want_banner = "Linux version ";
    let want_cmdline = format!("Command line: {full_cmdline}");

    let stop = spec.stop.clone();
    let mut console = Vec::new();
    let t = Instant::now();
    let mut seen_at = None;
    let exit = KvmMachine::new().unwrap().run(&spec, &mut |b| {
        console.extend_from_slice(b);
        let text = String::from_utf8_lossy(&console);
        if seen_at.is_none() && text.contains(want_banner) && text.contains(&want_cmdline) {
            seen_at = Some(t.elapsed());
            stop.store(true, Ordering::Release);
        }
    });
    let text = String::from_utf8_lossy(&console).into_owned();
    println!("console after {:?} ({exit:?}):\n{text}", t.elapsed());
    assert!(text.contains(want_banner), "no kernel banner on the console");
    assert!(text.contains(&want_cmdline), "the kernel did not print our exact command line {want_cmdline:?}");
    // Seen both, then stopped by us (on hardware KVM the kernel would go
    // on to panic for want of an init, and reboot: also fine).
    assert!(matches!(exit, Ok(GuestExit::Stopped) | Ok(GuestExit::Reset)), "{exit:?}");
    println!("banner and command line seen after {:?}", seen_at.unwrap());
}

/// Says that a test (or part of one) was skipped and why. Written straight
/// to the stderr file descriptor, past the test harness's output capture,
/// so a skip shows in `cargo test` output even when the test passes.
fn skip(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}
