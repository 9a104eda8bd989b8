//! Bench: the built-in VMM's start time, and (only where /dev/kvm is
//! hardware-backed) boot to init and a trivial script end to end against
//! QEMU microvm `-accel kvm` on the same kernel, in the same run.
//!
//! "VMM start" is measured two ways, each over RUNS runs (default 20):
//! * in process: `KvmMachine::new()` → the boot vCPU's first KVM_RUN, for
//!   a real job's shape (our kernel, initramfs, 512 MiB, three disks);
//! * from process spawn: this bench re-executes itself as a child that
//!   does only that, with RUNASROOT_TRACE_VMM=1; the child prints the
//!   CLOCK_MONOTONIC time of its first KVM_RUN, compared with the
//!   parent's clock just before the spawn.
//!
//! Run: `cargo bench --bench vmm` (RUNS=N to change the repetitions).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use runasroot::machine::kvm::{self, KvmMachine, TRACE_ENV, TRACE_PREFIX};
use runasroot::machine::qemu::{Accel, QemuMachine};
use runasroot::machine::{Backing, DiskSpec, GuestExit, GuestSpec, KernelImages, Machine};

/// Set in the child: the kernel images and initramfs to start, as paths.
const CHILD_ENV: &str = "RUNASROOT_VMM_BENCH_CHILD";
/// The guest runs this long after its first KVM_RUN before we stop it:
/// enough for the first KVM_RUN to have happened, short enough to repeat.
const RUN_FOR: Duration = Duration::from_millis(60);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn stats(v: &[f64]) -> String {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(0.0, f64::max);
    format!("median {:7.3} ms  (min {:.3}, max {:.3}, n={})", median(v.to_vec()), min, max, v.len())
}

fn monotonic() -> f64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9
}

/// Our kernel from kernel-config/build.sh, or why not.
fn kernel(root: &Path) -> Result<KernelImages, String> {
    let out = Command::new("bash").arg(root.join("kernel-config/build.sh")).stderr(Stdio::inherit()).output();
    let out = out.map_err(|e| format!("cannot run kernel-config/build.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!("kernel-config/build.sh failed ({})", out.status));
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim());
    Ok(KernelImages { bzimage: dir.join("bzImage"), vmlinux: Some(dir.join("vmlinux")) })
}

/// A static init that only syncs and reboots (the skeleton bench's floor),
/// or why it cannot be built.
fn noop_initramfs(dir: &Path) -> Result<PathBuf, String> {
    let src = dir.join("noop.c");
    std::fs::write(
        &src,
        "#include <sys/reboot.h>\n#include <unistd.h>\nint main(void){sync();reboot(RB_AUTOBOOT);return 0;}\n",
    )
    .unwrap();
    let root = dir.join("noop-root");
    std::fs::create_dir_all(root.join("dev")).unwrap();
    let ok = Command::new("gcc").args(["-static", "-Os", "-o"]).arg(root.join("init")).arg(&src).status();
    if !ok.map(|s| s.success()).unwrap_or(false) {
        return Err("gcc -static failed".into());
    }
    let cpio = dir.join("noop.cpio");
    let script =
        format!("cd {} && printf 'init\\ndev\\n' | cpio -o -H newc --quiet > {}", root.display(), cpio.display());
    let ok = Command::new("sh").arg("-c").arg(script).status();
    if !ok.map(|s| s.success()).unwrap_or(false) {
        return Err("cpio failed (apt-get install cpio)".into());
    }
    Ok(cpio)
}

/// The disks of a real job: layers (read-only), job (read-only), output.
fn disks(dir: &Path) -> Vec<DiskSpec> {
    let mut v = Vec::new();
    for (name, ro, size) in [("rar-lower", true, 8 << 20), ("rar-job", true, 1 << 20), ("rar-output", false, 64 << 20)]
    {
        let path = dir.join(format!("{name}.img"));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        v.push(DiskSpec { backing: Backing::File(path), read_only: ro, serial: name.into() });
    }
    v
}

fn spec(kernel: &KernelImages, initramfs: &Path, disks: Vec<DiskSpec>, deadline: Option<Instant>) -> GuestSpec {
    GuestSpec {
        kernel: kernel.clone(),
        initramfs: initramfs.to_path_buf(),
        cmdline: "console=ttyS0 reboot=t panic=-1 quiet loglevel=1".into(),
        memory_mib: 512,
        cpus: 1,
        disks,
        deadline,
        work_dir: std::env::temp_dir(),
        stop: Arc::new(AtomicBool::new(false)),
    }
}

/// The child: start the VMM once, traced, and stop soon after.
fn child(arg: &str) {
    let mut parts = arg.split('\n');
    let (vmlinux, initramfs, dir) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    let kernel = KernelImages { bzimage: vmlinux.into(), vmlinux: Some(vmlinux.into()) };
    let mut vmm = KvmMachine::new().unwrap();
    let s = spec(&kernel, Path::new(initramfs), disks(Path::new(dir)), Some(Instant::now() + RUN_FOR));
    let _ = vmm.run(&s, &mut |_| {});
}

fn main() {
    if let Ok(arg) = std::env::var(CHILD_ENV) {
        child(&arg);
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let runs: usize = std::env::var("RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let hw = kvm::hardware_support();

    println!("vmm bench ({runs} runs)");
    if let Err(e) = KvmMachine::new() {
        println!("  VMM start: cannot be measured here: {e}");
        return;
    }
    let kernel = match kernel(&root) {
        Ok(k) => k,
        Err(why) => {
            println!("  VMM start: cannot be measured here: no guest kernel ({why})");
            return;
        }
    };
    let initramfs = match noop_initramfs(dir.path()) {
        Ok(p) => p,
        Err(why) => {
            println!("  (no do-nothing initramfs: {why}; using an empty one)");
            let p = dir.path().join("empty.cpio");
            std::fs::write(&p, b"").unwrap();
            p
        }
    };

    // 1. In process.
    let mut from_new = Vec::new();
    let mut from_run = Vec::new();
    for _ in 0..runs {
        let s = spec(&kernel, &initramfs, disks(dir.path()), Some(Instant::now() + RUN_FOR));
        let t0 = Instant::now();
        let mut vmm = KvmMachine::new().unwrap();
        let t1 = Instant::now();
        let exit = vmm.run(&s, &mut |_| {});
        let first = vmm.first_kvm_run().expect("the boot vCPU entered KVM_RUN");
        assert!(matches!(exit, Ok(GuestExit::TimedOut) | Ok(GuestExit::Reset)), "{exit:?}");
        from_new.push(first.duration_since(t0).as_secs_f64() * 1e3);
        from_run.push(first.duration_since(t1).as_secs_f64() * 1e3);
    }
    println!("  VMM start, KvmMachine::new → first KVM_RUN   {}", stats(&from_new));
    println!("  VMM start, run() → first KVM_RUN             {}", stats(&from_run));

    // 2. From process spawn.
    let me = std::env::current_exe().unwrap();
    let arg =
        format!("{}\n{}\n{}", kernel.vmlinux.as_ref().unwrap().display(), initramfs.display(), dir.path().display());
    let mut from_spawn = Vec::new();
    for _ in 0..runs {
        let t = monotonic();
        let out = Command::new(&me).env(CHILD_ENV, &arg).env(TRACE_ENV, "1").stdin(Stdio::null()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr
            .lines()
            .find(|l| l.starts_with(TRACE_PREFIX))
            .unwrap_or_else(|| panic!("no trace line in:\n{stderr}"));
        let at: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        from_spawn.push((at - t) * 1e3);
    }
    println!("  VMM start, process spawn → first KVM_RUN     {}", stats(&from_spawn));
    println!("  target: VMM start ≤ 10 ms");

    // 3. Boot to init and end to end: hardware virtualisation only.
    match hw {
        Err(reason) => {
            println!("  boot to init (builtin vs QEMU -accel kvm): cannot be measured here: {reason}");
            println!("  trivial script end to end (builtin vs QEMU -accel kvm): cannot be measured here: {reason}");
        }
        Ok(()) => boot_and_end_to_end(&root, dir.path(), &kernel, &initramfs, runs),
    }
}

/// Boot to a do-nothing init (which reboots at once) and back, through
/// both launchers on the same kernel; then the real binary on a trivial
/// script with `--vmm builtin` and `--vmm qemu`.
fn boot_and_end_to_end(root: &Path, dir: &Path, kernel: &KernelImages, initramfs: &Path, runs: usize) {
    let boot = |machine: &mut dyn Machine, kernel: &KernelImages| -> Vec<f64> {
        (0..runs)
            .map(|_| {
                let s = spec(kernel, initramfs, disks(dir), Some(Instant::now() + Duration::from_secs(30)));
                let t = Instant::now();
                let exit = machine.run(&s, &mut |_| {});
                assert_eq!(exit.unwrap(), GuestExit::Reset, "{} did not reboot", machine.name());
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect()
    };
    let builtin = boot(&mut KvmMachine::new().unwrap(), kernel);
    // QEMU boots an ELF kernel only with a PVH note: give it the bzImage.
    let bz = KernelImages { bzimage: kernel.bzimage.clone(), vmlinux: None };
    let qemu = boot(&mut QemuMachine::new(Accel::Kvm), &bz);
    let builtin_bz = boot(&mut KvmMachine::new().unwrap(), &bz);
    println!("  boot to init and reboot, builtin (vmlinux)   {}", stats(&builtin));
    println!("  boot to init and reboot, builtin (bzImage)   {}", stats(&builtin_bz));
    println!("  boot to init and reboot, QEMU -accel kvm     {}", stats(&qemu));
    println!(
        "  ratio QEMU / builtin (same bzImage): {:.2}x; target ≥ 2x, boot to init ≤ 100 ms",
        median(qemu) / median(builtin_bz)
    );

    let base = dir.join("busybox-base.tar");
    let made = Command::new(root.join("tests/example/make-busybox-base.sh")).arg(&base).stdout(Stdio::null()).status();
    if !made.map(|s| s.success()).unwrap_or(false) {
        println!("  trivial script end to end: cannot be measured: tests/example/make-busybox-base.sh failed");
        return;
    }
    let script = dir.join("s.sh");
    std::fs::write(&script, "true\n").unwrap();
    let e2e = |vmm: &str| -> Result<Vec<f64>, String> {
        let mut v = Vec::new();
        for _ in 0..runs {
            let out = dir.join("out.tar");
            let t = Instant::now();
            let o = Command::new(env!("CARGO_BIN_EXE_runasroot"))
                .args(["--vmm", vmm, "--base"])
                .arg(&base)
                .arg("--script")
                .arg(&script)
                .arg("-o")
                .arg(&out)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| e.to_string())?;
            if !o.status.success() {
                return Err(String::from_utf8_lossy(&o.stderr).into_owned());
            }
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(v)
    };
    match (e2e("builtin"), e2e("qemu")) {
        (Ok(b), Ok(q)) => {
            println!("  trivial script end to end, builtin           {}", stats(&b));
            println!("  trivial script end to end, QEMU -accel kvm   {}", stats(&q));
            println!("  ratio QEMU / builtin: {:.2}x; target ≤ 250 ms end to end", median(q) / median(b));
        }
        (b, q) => println!("  trivial script end to end: failed: builtin {:?} / qemu {:?}", b.err(), q.err()),
    }
}
