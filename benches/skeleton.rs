//! Bench: the walking skeleton's overhead. For a trivial script on the
//! busybox base, prints total wall time and the guest's phases (boot to
//! init, unpack, script, pack), alongside QEMU microvm booting the same
//! kernel with a do-nothing init in the same run, so runasroot's own
//! overhead is a ratio, not an absolute that depends on the machine.
//!
//! Run: `cargo bench --bench skeleton` (RUNS=N to change the repetitions).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn kernel_dir(root: &Path) -> PathBuf {
    let out = Command::new("bash").arg(root.join("kernel-config/build.sh")).output().expect("kernel-config/build.sh");
    assert!(out.status.success(), "kernel build failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap().trim())
}

/// A static init that only reboots: the floor any guest pays for boot.
fn noop_initramfs(dir: &Path) -> PathBuf {
    let src = dir.join("noop.c");
    fs::write(&src, "#include <sys/reboot.h>\n#include <unistd.h>\nint main(void){sync();reboot(RB_AUTOBOOT);return 0;}\n").unwrap();
    let root = dir.join("noop-root");
    fs::create_dir_all(root.join("dev")).unwrap();
    let ok = Command::new("gcc").args(["-static", "-Os", "-o"]).arg(root.join("init")).arg(&src).status().unwrap();
    assert!(ok.success(), "gcc -static failed");
    let cpio = dir.join("noop.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && printf 'init\\ndev\\n' | cpio -o -H newc --quiet > {}", root.display(), cpio.display()))
        .status()
        .unwrap();
    assert!(status.success(), "cpio failed (apt-get install cpio)");
    cpio
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let runs: usize = std::env::var("RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("busybox-base.tar");
    assert!(Command::new(root.join("tests/example/make-busybox-base.sh")).arg(&base).stdout(Stdio::null()).status().unwrap().success());
    let script = dir.path().join("s.sh");
    fs::write(&script, "mkdir /data && chown 1000:1000 /data\n").unwrap();
    let kdir = kernel_dir(&root);
    let noop = noop_initramfs(dir.path());
    let kvm_ok = runasroot::machine::kvm::hardware_support();
    let accel = if kvm_ok.is_ok() { "kvm" } else { "tcg" };

    let mut peer = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let st = Command::new("qemu-system-x86_64")
            .args(["-M", "microvm,acpi=off", "-accel", accel, "-cpu", if accel == "kvm" { "host" } else { "max" }])
            .args(["-m", "512M", "-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "null"])
            .arg("-kernel")
            .arg(kdir.join("bzImage"))
            .arg("-initrd")
            .arg(&noop)
            .args(["-append", "console=ttyS0 reboot=t panic=-1 quiet loglevel=1"])
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
        peer.push(t.elapsed().as_secs_f64());
    }

    let mut total = Vec::new();
    let mut phases: Vec<Vec<(String, f64)>> = Vec::new();
    for _ in 0..runs {
        let out = dir.path().join("out.tar");
        let t = Instant::now();
        let o = Command::new(env!("CARGO_BIN_EXE_runasroot"))
            .args(["--vmm", "qemu", "-v", "--base"])
            .arg(&base)
            .arg("--script")
            .arg(&script)
            .arg("-o")
            .arg(&out)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        total.push(t.elapsed().as_secs_f64());
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        let line = stderr.lines().find(|l| l.contains("guest timings")).expect("timings line with -v");
        let parsed: Vec<(String, f64)> = line
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_end_matches('s').parse().unwrap()))
            .collect();
        phases.push(parsed);
    }
    let phase = |name: &str| -> f64 {
        median(phases.iter().map(|p| p.iter().find(|(k, _)| k == name).map(|(_, v)| *v).unwrap_or(f64::NAN)).collect())
    };
    let init = phase("init");
    let unpack = phase("unpack") - init;
    let script_t = phase("script") - phase("unpack");
    let pack = phase("pack") - phase("script");
    let (t, p) = (median(total), median(peer));
    println!("skeleton bench ({runs} runs, medians, QEMU microvm -accel {accel}{})", if accel == "tcg" { ", no hardware virtualisation here" } else { "" });
    println!("  runasroot total wall          {t:8.3} s");
    println!("  guest: boot to init (uptime)  {init:8.3} s");
    println!("  guest: unpack base            {unpack:8.3} s");
    println!("  guest: script                 {script_t:8.3} s");
    println!("  guest: pack                   {pack:8.3} s");
    println!("  peer: QEMU microvm, same kernel, do-nothing init, wall {p:8.3} s");
    println!("  ratio runasroot / do-nothing boot: {:.2}x (overhead {:.3} s)", t / p, t - p);
}
