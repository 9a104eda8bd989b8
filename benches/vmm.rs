//! Bench: the built-in VMM's start time; boot to init and a trivial script
//! end to end against QEMU microvm `-accel kvm` on the same kernel, in the
//! same run; and the VM exits of one end-to-end run of each launcher,
//! counted by kind (KVM's kvm_exit and kvm_userspace_exit tracepoints):
//! fewer exits is what makes the built-in VMM fast on real hardware.
//!
//! Where /dev/kvm cannot boot Linux (PVM, none), the boot, end-to-end and
//! exit-count part runs inside the nested L1 guest of tests/nested/l1
//! (QEMU TCG with emulated AMD SVM), both launchers in the same L1. There
//! every VM exit costs tens of microseconds of emulation, so only the
//! ratios and the exit counts mean anything, not the times.
//!
//! "VMM start" is measured two ways, each over RUNS runs (default 20):
//! * in process: `KvmMachine::new()` → the boot vCPU's first KVM_RUN, for
//!   a real job's shape (our kernel, initramfs, 512 MiB, three disks);
//! * from process spawn: this bench re-executes itself as a child that
//!   does only that, with RUNASROOT_TRACE_VMM=1; the child prints the
//!   CLOCK_MONOTONIC time of its first KVM_RUN, compared with the
//!   parent's clock just before the spawn.
//!
//! Run: `cargo bench --bench vmm` (RUNS=N to change the repetitions;
//! default 20, 5 in the nested L1).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "../tests/common/l1.rs"]
mod l1;

use runasroot::machine::kvm::{self, KvmMachine, TRACE_ENV, TRACE_PREFIX};
use runasroot::machine::qemu::{Accel, QemuMachine};
use runasroot::machine::{Backing, DiskSpec, GuestExit, GuestSpec, KernelImages, Machine};

/// Set in the child: the kernel images and initramfs to start, as paths.
const CHILD_ENV: &str = "RUNASROOT_VMM_BENCH_CHILD";
/// Set in the copy of this bench that runs inside the nested L1: the
/// paths of what it measures ([`Measured`], one per line).
const NESTED_ENV: &str = "RUNASROOT_VMM_BENCH_NESTED";
/// Repetitions in the nested L1, unless RUNS says otherwise.
const NESTED_RUNS: usize = 5;
/// The nested L1 is killed after this long.
const NESTED_DEADLINE: Duration = Duration::from_secs(1200);
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
    if let Ok(arg) = std::env::var(NESTED_ENV) {
        let m = Measured::from_env(&arg);
        let runs = std::env::var("RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(NESTED_RUNS);
        println!("inside the nested L1 ({runs} runs; nested under TCG every VM exit costs tens of µs: only ratios and exit counts mean anything here)");
        let dir = tempfile::tempdir().unwrap();
        boot_and_end_to_end(&m, dir.path(), runs);
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let runs: usize = std::env::var("RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let hw = kvm::hardware_support();

    println!("vmm bench ({runs} runs)");
    let kernel = match kernel(&root) {
        Ok(k) => k,
        Err(why) => {
            println!("  nothing can be measured here: no guest kernel ({why})");
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
    // 1 and 2: wherever /dev/kvm opens (PVM included: the guest only has
    // to reach its first instruction).
    match KvmMachine::new() {
        Ok(_) => vmm_start(&kernel, &initramfs, dir.path(), runs),
        Err(e) => println!("  VMM start: cannot be measured here: {e}"),
    }

    // 3. Boot to init, end to end and exit counts: where /dev/kvm boots
    // Linux, here; elsewhere in the nested L1.
    let base = dir.path().join("busybox-base.tar");
    let made = Command::new(root.join("tests/example/make-busybox-base.sh")).arg(&base).stdout(Stdio::null()).status();
    if !made.map(|s| s.success()).unwrap_or(false) {
        println!("  boot to init and end to end: cannot be measured: tests/example/make-busybox-base.sh failed");
        return;
    }
    let m = Measured { kernel, initramfs, base, runasroot: PathBuf::from(env!("CARGO_BIN_EXE_runasroot")) };
    match hw {
        Ok(()) => boot_and_end_to_end(&m, dir.path(), runs),
        Err(reason) => match l1::unavailable() {
            Some(why) => println!("  boot to init, end to end, exit counts: cannot be measured here ({reason}), nor in the nested L1 ({why})"),
            None => nested(&m, dir.path(), &reason.to_string()),
        },
    }
}

/// Parts 1 and 2: the VMM's start time, in process and from process spawn.
fn vmm_start(kernel: &KernelImages, initramfs: &Path, dir: &Path, runs: usize) {
    // 1. In process.
    let mut from_new = Vec::new();
    let mut from_run = Vec::new();
    for _ in 0..runs {
        let s = spec(kernel, initramfs, disks(dir), Some(Instant::now() + RUN_FOR));
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
        format!("{}\n{}\n{}", kernel.vmlinux.as_ref().unwrap().display(), initramfs.display(), dir.display());
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
}

/// What part 3 measures, by path (the same paths inside the nested L1).
struct Measured {
    kernel: KernelImages,
    /// The do-nothing init.
    initramfs: PathBuf,
    /// The busybox base of the end-to-end runs.
    base: PathBuf,
    runasroot: PathBuf,
}

impl Measured {
    fn to_env(&self) -> String {
        let vmlinux = self.kernel.vmlinux.as_ref().expect("kernel-config/build.sh gives a vmlinux");
        [&self.kernel.bzimage, vmlinux, &self.initramfs, &self.base, &self.runasroot].map(|p| p.display().to_string()).join("\n")
    }

    fn from_env(arg: &str) -> Measured {
        let p: Vec<PathBuf> = arg.lines().map(PathBuf::from).collect();
        assert_eq!(p.len(), 5, "{NESTED_ENV} holds five paths");
        Measured {
            kernel: KernelImages { bzimage: p[0].clone(), vmlinux: Some(p[1].clone()) },
            initramfs: p[2].clone(),
            base: p[3].clone(),
            runasroot: p[4].clone(),
        }
    }
}

/// Part 3 in the nested L1: this bench binary runs there with everything
/// it measures (and QEMU) at the same paths, and its report comes back.
fn nested(m: &Measured, dir: &Path, reason: &str) {
    let runs = std::env::var("RUNS").unwrap_or_else(|_| NESTED_RUNS.to_string());
    println!("  boot to init, end to end, exit counts: in the nested L1 guest (QEMU TCG, emulated AMD SVM), because {reason}");
    let job = dir.join("nested-bench.sh");
    std::fs::write(
        &job,
        format!(
            "RUNS={runs} {NESTED_ENV}='{}' {} > /out/report.txt 2>&1\n",
            m.to_env(),
            std::env::current_exe().unwrap().display()
        ),
    )
    .unwrap();
    let vmlinux = m.kernel.vmlinux.clone().unwrap();
    let mut puts = vec![std::env::current_exe().unwrap(), m.kernel.bzimage.clone(), vmlinux, m.initramfs.clone(), m.base.clone(), m.runasroot.clone()];
    // QEMU and its firmware (microvm's qboot), for the -accel kvm peer.
    match which("qemu-system-x86_64") {
        Some(q) => puts.extend([q, PathBuf::from("/usr/share/qemu")]),
        None => println!("  (qemu-system-x86_64 is not installed: the QEMU side will fail)"),
    }
    let out = dir.join("l1-out");
    let r = l1::run(&job, &puts, &out, NESTED_DEADLINE);
    let report = std::fs::read_to_string(out.join("report.txt")).unwrap_or_default();
    for line in report.lines() {
        println!("  | {line}");
    }
    println!("  (the nested L1 ran {:.0} s in all)", r.wall.as_secs_f64());
    if r.code != 0 {
        println!("  the nested run failed (exit {}): {}", r.code, r.stderr.trim());
        let console = r.console();
        for line in console.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev() {
            println!("  console: {line}");
        }
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.is_file())
}

/// Boot to a do-nothing init (which reboots at once) and back, through
/// both launchers on the same kernel; then the real binary on a trivial
/// script with `--vmm builtin` and `--vmm qemu`; then one more end-to-end
/// run of each with its VM exits counted.
fn boot_and_end_to_end(m: &Measured, dir: &Path, runs: usize) {
    let (kernel, initramfs) = (&m.kernel, &m.initramfs);
    let boot = |machine: &mut dyn Machine, kernel: &KernelImages| -> Vec<f64> {
        (0..runs)
            .map(|_| {
                let s = spec(kernel, initramfs, disks(dir), Some(Instant::now() + Duration::from_secs(60)));
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

    let script = dir.join("s.sh");
    std::fs::write(&script, "true\n").unwrap();
    let e2e_once = |vmm: &str| -> Result<f64, String> {
        let out = dir.join("out.tar");
        let t = Instant::now();
        let o = Command::new(&m.runasroot)
            .args(["--vmm", vmm, "-q", "--base"])
            .arg(&m.base)
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
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let e2e = |vmm: &str| -> Result<Vec<f64>, String> { (0..runs).map(|_| e2e_once(vmm)).collect() };
    match (e2e("builtin"), e2e("qemu")) {
        (Ok(b), Ok(q)) => {
            println!("  trivial script end to end, builtin           {}", stats(&b));
            println!("  trivial script end to end, QEMU -accel kvm   {}", stats(&q));
            println!("  ratio QEMU / builtin: {:.2}x; target ≤ 250 ms end to end", median(q) / median(b));
        }
        (b, q) => println!("  trivial script end to end: failed: builtin {:?} / qemu {:?}", b.err(), q.err()),
    }

    // VM exits of one end-to-end run of each launcher.
    let counted = |vmm: &str| exits::count(|| e2e_once(vmm).map(drop));
    match (counted("builtin"), counted("qemu")) {
        (Ok(b), Ok(q)) => print!("{}", exits::table(&b, &q)),
        (b, q) => println!("  VM exits by kind: cannot be counted here: {}", b.err().or(q.err()).unwrap_or_default()),
    }
}

/// VM exits counted by KVM's own tracepoints, with ftrace histogram
/// triggers (root and tracefs needed): `kvm_exit` by (isa, exit reason),
/// every exit from the guest whether KVM handles it or not, and
/// `kvm_userspace_exit` by reason, the exits that reach the VMM process.
mod exits {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];
    /// (event, trigger)
    const TRIGGERS: [(&str, &str); 2] = [
        ("events/kvm/kvm_exit", "hist:keys=isa,exit_reason:vals=hitcount:size=4096"),
        ("events/kvm/kvm_userspace_exit", "hist:keys=reason,errno:vals=hitcount"),
    ];

    /// Exit counts of one run.
    pub struct Counts {
        /// kvm_exit, by kind.
        pub all: BTreeMap<String, u64>,
        /// kvm_userspace_exit, by reason.
        pub to_vmm: BTreeMap<String, u64>,
    }

    /// Counts the VM exits that happen while `run` runs (it must be the
    /// only VM running).
    pub fn count(run: impl FnOnce() -> Result<(), String>) -> Result<Counts, String> {
        let root = TRACEFS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.join(TRIGGERS[0].0).exists())
            .ok_or("no tracefs with KVM's events (mount tracefs, load kvm)")?;
        let set = |event: &str, trigger: &str| {
            std::fs::write(root.join(event).join("trigger"), trigger)
                .map_err(|e| format!("cannot set the ftrace trigger of {event} ({e}; root needed)"))
        };
        for (event, trigger) in TRIGGERS {
            set(event, trigger)?;
        }
        let ran = run();
        let hists: Vec<String> =
            TRIGGERS.iter().map(|(event, _)| std::fs::read_to_string(root.join(event).join("hist")).unwrap_or_default()).collect();
        for (event, trigger) in TRIGGERS {
            set(event, &format!("!{trigger}"))?;
        }
        ran?;
        Ok(Counts { all: tally(&hists[0], exit_kind), to_vmm: tally(&hists[1], userspace_kind) })
    }

    /// Sums a histogram's hitcounts by the name `name` gives its keys.
    fn tally(hist: &str, name: fn(&BTreeMap<&str, i64>) -> String) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for line in hist.lines().filter(|l| l.starts_with('{')) {
            let Some((keys, count)) = line[1..].split_once('}') else { continue };
            let keys: BTreeMap<&str, i64> = keys
                .split(',')
                .filter_map(|kv| kv.split_once(':'))
                .filter_map(|(k, v)| Some((k.trim(), v.trim().parse().ok()?)))
                .collect();
            let n: u64 = count.trim().strip_prefix("hitcount:").and_then(|n| n.trim().parse().ok()).unwrap_or(0);
            *out.entry(name(&keys)).or_insert(0) += n;
        }
        out
    }

    /// kvm_exit's reason, by vendor (isa 1: VMX, Intel SDM vol. 3 app. C;
    /// isa 2: SVM, AMD APM vol. 2 app. C, Linux's uapi svm.h).
    fn exit_kind(keys: &BTreeMap<&str, i64>) -> String {
        let r = keys.get("exit_reason").copied().unwrap_or(-1);
        match keys.get("isa") {
            Some(2) => svm_exit(r),
            Some(1) => vmx_exit(r),
            _ => format!("reason {r:#x}"),
        }
    }

    fn svm_exit(r: i64) -> String {
        let named = match r {
            0x00..=0x0f => return format!("CR{} read", r),
            0x10..=0x1f => return format!("CR{} write", r - 0x10),
            0x20..=0x2f => return format!("DR{} read", r - 0x20),
            0x30..=0x3f => return format!("DR{} write", r - 0x30),
            0x40..=0x5f => return format!("exception {}", r - 0x40),
            0x60 => "INTR (host interrupt)",
            0x61 => "NMI",
            0x64 => "VINTR (interrupt window)",
            0x65 => "CR0 selective write",
            0x6e => "RDTSC",
            0x72 => "CPUID",
            0x77 => "PAUSE",
            0x78 => "HLT",
            0x7b => "IOIO (port I/O)",
            0x7c => "MSR",
            0x7f => "SHUTDOWN",
            0x81 => "VMMCALL",
            0x87 => "RDTSCP",
            0x89 => "WBINVD",
            0x8d => "XSETBV",
            0x400 => "NPF (nested page fault: MMIO)",
            0x401 => "AVIC incomplete IPI",
            0x402 => "AVIC unaccelerated access",
            _ => return format!("SVM exit {r:#x}"),
        };
        named.to_string()
    }

    fn vmx_exit(r: i64) -> String {
        let named = match r {
            0 => "EXCEPTION_NMI",
            1 => "EXTERNAL_INTERRUPT",
            2 => "TRIPLE_FAULT",
            7 => "INTERRUPT_WINDOW",
            10 => "CPUID",
            12 => "HLT",
            16 => "RDTSC",
            18 => "VMCALL",
            28 => "CR_ACCESS",
            30 => "IO_INSTRUCTION (port I/O)",
            31 => "MSR_READ",
            32 => "MSR_WRITE",
            40 => "PAUSE",
            44 => "APIC_ACCESS",
            45 => "EOI_INDUCED",
            48 => "EPT_VIOLATION",
            49 => "EPT_MISCONFIG (MMIO)",
            52 => "PREEMPTION_TIMER",
            54 => "WBINVD",
            55 => "XSETBV",
            56 => "APIC_WRITE",
            _ => return format!("VMX exit {r}"),
        };
        named.to_string()
    }

    /// kvm_userspace_exit's reason (KVM_EXIT_*, linux/kvm.h); a negative
    /// errno is a KVM_RUN that returned an error (EINTR: a signal).
    fn userspace_kind(keys: &BTreeMap<&str, i64>) -> String {
        if let Some(&errno) = keys.get("errno").filter(|e| **e < 0) {
            return if errno == -4 { "KVM_RUN interrupted (EINTR)".into() } else { format!("KVM_RUN error {errno}") };
        }
        let r = keys.get("reason").copied().unwrap_or(-1);
        let named = match r {
            2 => "IO (port I/O)",
            5 => "HLT",
            6 => "MMIO",
            8 => "SHUTDOWN",
            9 => "FAIL_ENTRY",
            10 => "INTR",
            17 => "INTERNAL_ERROR",
            24 => "SYSTEM_EVENT",
            _ => return format!("KVM_EXIT {r}"),
        };
        named.to_string()
    }

    /// The two launchers side by side, most frequent kinds first.
    pub fn table(builtin: &Counts, qemu: &Counts) -> String {
        let mut s = String::from("  VM exits of one trivial end-to-end run, by kind (builtin vs QEMU -accel kvm):\n");
        for (title, b, q) in [
            ("every exit from the guest (kvm_exit)", &builtin.all, &qemu.all),
            ("exits that reach the VMM process (kvm_userspace_exit)", &builtin.to_vmm, &qemu.to_vmm),
        ] {
            s.push_str(&format!("    {title}:\n"));
            let mut kinds: Vec<&String> = b.keys().chain(q.keys()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            kinds.sort_by_key(|k| std::cmp::Reverse(b.get(*k).unwrap_or(&0) + q.get(*k).unwrap_or(&0)));
            for k in kinds {
                s.push_str(&format!("      {k:<34} {:>9} {:>9}\n", b.get(k).unwrap_or(&0), q.get(k).unwrap_or(&0)));
            }
            let (tb, tq): (u64, u64) = (b.values().sum(), q.values().sum());
            let ratio = if tb > 0 { format!("{:.2}x", tq as f64 / tb as f64) } else { "-".into() };
            s.push_str(&format!("      {:<34} {tb:>9} {tq:>9}   QEMU / builtin {ratio}\n", "total"));
        }
        s
    }
}
