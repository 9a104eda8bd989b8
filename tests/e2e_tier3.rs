//! Tier 3: the whole pipeline through the built-in VMM, the real binary
//! on real images, run as an unprivileged user.
//!
//! Where the host has hardware KVM the built-in VMM runs here. Elsewhere
//! (this project's PVM machines) every case runs in ONE boot of the nested
//! L1 guest (tests/nested/l1: Debian's kernel under QEMU TCG with emulated
//! AMD SVM, whose KVM boots Linux), and the QEMU references run on the host
//! beside it. The first test to start runs the whole batch
//! (tests/common/tier3.rs); each test then checks its own case. The output
//! says where the built-in VMM ran and how long each case took.
//!
//! Cases: byte identity of `-o` and `--layer-output` with QEMU on the
//! FORMATS.md edge-case image and on a 130-layer base; `export --script`;
//! a clean kernel log (`-v`) with one vCPU and with two (SMP start-up
//! through our MP table, one package of two cores as QEMU gives); the
//! script's exit code; `--timeout`; SIGINT; a guest panic; `--memory` and
//! `--disk-size` limits naming the flag.

mod common;
#[path = "common/images.rs"]
mod images;
mod helpers;
#[path = "common/edge.rs"]
mod edge;
#[path = "common/l1.rs"]
mod l1;
#[path = "common/tier3.rs"]
mod tier3;

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;

use common::*;
use images::{Build, Format};
use tier3::{Batch, Case, CaseRun};

/// The batch, run once per test binary; Err says why it could not run
/// (then every test fails with that message, without a second boot).
fn batch() -> Option<&'static Batch> {
    static BATCH: OnceLock<Result<Option<Batch>, String>> = OnceLock::new();
    let result = BATCH.get_or_init(|| {
        let place = match tier3::place() {
            Ok(p) => p,
            Err(why) => {
                skip(&format!("tier 3: {why}"));
                return Ok(None);
            }
        };
        std::panic::catch_unwind(|| {
            let inputs = Inputs::build();
            let cases = cases(&inputs);
            let batch = tier3::run(place, &cases, &inputs.paths)?;
            note(&batch.summary());
            Ok(Some(batch))
        })
        .unwrap_or_else(|p| Err(format!("building or running the tier 3 batch panicked: {}", panic_text(&p))))
    });
    match result {
        Ok(b) => b.as_ref(),
        Err(why) => panic!("{why}"),
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Prints past the test harness's capture (like `skip`).
fn note(text: &str) {
    use std::io::Write;
    let _ = write!(std::io::stderr(), "{text}");
}

/// The files the cases read, world-readable.
struct Inputs {
    /// Holds them; removed with the Inputs, once the batch has run.
    _dir: tempfile::TempDir,
    paths: Vec<PathBuf>,
    busybox: PathBuf,
    edge: PathBuf,
    ctr_dir: PathBuf,
    ctr_tar: PathBuf,
    deep: PathBuf,
    bogus_initramfs: PathBuf,
    scripts: PathBuf,
}

/// Layers of the deep base above its busybox layer: more than Docker
/// allows (125) and than nixpkgs' runAsRoot can take (DESIGN.md).
const DEEP_LAYERS: usize = 130;

/// What the SMP case's script adds to the skeleton: the topology the guest
/// kernel built from our CPUID and MP table.
const TOPOLOGY: &str = "grep -E '^(processor|physical id|siblings|core id|cpu cores|apicid|initial apicid)' /proc/cpuinfo > /root/topology\n";

impl Inputs {
    fn build() -> Inputs {
        let dir = scratch();
        let at = |name: &str| dir.path().join(name);
        let busybox = busybox_base();
        let edge_img = edge::edge_image().expect("the edge-case image needs busybox-static and gcc -static (.ci/setup)");
        let edge = at("edge.tar");
        images::write(&edge, &Build::new(Format::DockerHybrid), &[edge_img]);
        let (ctr_dir, ctr_tar) = edge::copy_to_root_inputs(dir.path());
        let deep = at("deep.tar");
        // A busybox layer for the script's shell, then the export tests' deep stack.
        let mut layers = vec![images::layer(images::busybox_entries().expect("busybox-static (.ci/setup)"))];
        layers.extend(images::deep_export_image(DEEP_LAYERS).layers);
        let deep_img = images::image(layers).tag("deep:131");
        images::write(&deep, &Build::new(Format::OciArchive), &[deep_img]);
        // An initramfs without /init: the kernel finds no init and panics.
        let bogus_initramfs = at("bogus.cpio");
        fs::write(&bogus_initramfs, b"070701this is not a valid cpio archive").unwrap();
        let scripts = subdir(dir.path(), "scripts");
        for (name, body) in [
            ("edge.sh", edge::edge_script()),
            ("skeleton.sh", SKELETON_SCRIPT.to_string()),
            ("smp.sh", format!("{SKELETON_SCRIPT}{TOPOLOGY}")),
            // The top layer's file, the bottom layer's, and a directory the
            // top layer made opaque; then a whiteout and a change.
            (
                "deep.sh",
                "{ cat /shared/version; echo; cat /l000/data; echo; ls /l128 | wc -l; } > /seen\nrm -rf /l005 && echo new > /l129/data\n".into(),
            ),
            ("exit7.sh", "echo from-the-script; exit 7\n".into()),
            ("sleep.sh", "echo script-started; sleep 600\n".into()),
            ("true.sh", "true\n".into()),
            ("dd.sh", "dd if=/dev/zero of=/big bs=1M count=200\n".into()),
            // 64 MB strings, each touched, until the OOM killer fires: more
            // than the guest's RAM and swap together within a few of them
            // (small allocations took minutes under a loaded TCG).
            ("hog.sh", "awk 'BEGIN { s = sprintf(\"%32000000s\", \"\"); while (1) a[i++] = s s i }'\n".into()),
        ] {
            script(&scripts, name, &body);
        }
        let ok = std::process::Command::new("chmod").args(["-R", "a+rX"]).arg(dir.path()).status();
        assert!(ok.map(|s| s.success()).unwrap_or(false), "chmod -R a+rX {}", dir.path().display());
        let paths = vec![dir.path().to_path_buf(), busybox.clone()];
        Inputs { paths, busybox, edge, ctr_dir, ctr_tar, deep, bogus_initramfs, scripts, _dir: dir }
    }

    fn script(&self, name: &str) -> String {
        self.scripts.join(name).display().to_string()
    }
}

/// Every case, in the order they run.
fn cases(i: &Inputs) -> Vec<Case> {
    let rar = r#""$RAR" --vmm "$VMM""#;
    let outs = r#"-o "$OUT/img.tar" --layer-output "$OUT/layer.tar""#;
    let (bb, edge, deep) = (i.busybox.display(), i.edge.display(), i.deep.display());
    let case = |name, reference, script: String| Case { name, reference, script };
    vec![
        case(
            "rich",
            true,
            format!(
                "{rar} --base {edge} --script {} --env OVERRIDE=cli --env CLI_VAR=x --copy-to-root {} --copy-to-root {} {outs}\n",
                i.script("edge.sh"),
                i.ctr_dir.display(),
                i.ctr_tar.display()
            ),
        ),
        case("deep", true, format!("{rar} --base {deep} --script {} {outs}\n", i.script("deep.sh"))),
        case("skeleton", true, format!("{rar} -v --base {bb} --script {} {outs}\n", i.script("skeleton.sh"))),
        case("smp", true, format!("{rar} -v --cpus 2 --base {bb} --script {} {outs}\n", i.script("smp.sh"))),
        case(
            "export",
            true,
            format!(r#"{rar_export} --base {edge} --script {} -o "$OUT/rootfs.tar""#, i.script("skeleton.sh"), rar_export = r#""$RAR" export --vmm "$VMM""#)
                + "\n",
        ),
        case("exit-code", false, format!("{rar} --base {bb} --script {} {outs}\n", i.script("exit7.sh"))),
        case("timeout", false, format!("{rar} --timeout 10 --base {bb} --script {} {outs}\n", i.script("sleep.sh"))),
        case("ctrl-c", false, ctrl_c_script(&bb.to_string(), &i.script("sleep.sh"))),
        case(
            "panic",
            false,
            format!("{rar} --initramfs {} --timeout 120 --base {bb} --script {} {outs}\n", i.bogus_initramfs.display(), i.script("true.sh")),
        ),
        case("disk-size", false, format!("{rar} --disk-size 64 --base {bb} --script {} {outs}\n", i.script("dd.sh"))),
        case(
            "memory",
            false,
            format!("{rar} --memory 128 --disk-size 16 --timeout 4m --base {bb} --script {} {outs}\n", i.script("hog.sh")),
        ),
    ]
}

/// SIGINT to runasroot once the script runs (its output reached
/// runasroot's stderr); then every process that used the case's TMPDIR
/// must be gone. Exits with runasroot's status.
fn ctrl_c_script(base: &str, sleeper: &str) -> String {
    format!(
        r#""$RAR" --vmm "$VMM" --base {base} --script {sleeper} -o "$OUT/img.tar" 2>"$OUT/rar.stderr" &
pid=$!
i=0
until grep -q script-started "$OUT/rar.stderr"; do
  i=$((i + 1))
  if [ $i -gt 1200 ] || ! kill -0 $pid 2>/dev/null; then
    echo "the script never started"; cat "$OUT/rar.stderr"; kill -9 $pid; exit 99
  fi
  sleep 0.1
done
sleep 1
kill -INT $pid
wait $pid
code=$?
sleep 1
for p in /proc/[0-9]*; do
  c=$(tr '\000' ' ' <"$p/cmdline" 2>/dev/null) || continue
  case $c in *"$TMPDIR"*) echo "left running: ${{p#/proc/}} $c";; esac
done
if kill -0 $pid 2>/dev/null; then echo "left running: runasroot $pid"; fi
exit $code
"#
    )
}

/// Asserts that the built-in VMM's files are byte-identical to QEMU's.
fn assert_identical(b: &Batch, name: &str, files: &[&str]) {
    let (builtin, qemu) = (b.builtin(name), b.qemu(name));
    assert_eq!(builtin.code, 0, "{name} with the built-in VMM: {builtin:?}");
    assert_eq!(qemu.code, 0, "{name} with QEMU: {qemu:?}");
    for f in files {
        let (x, y) = (builtin.file(f), qemu.file(f));
        assert!(x.is_some(), "{name}: the built-in VMM wrote no {f}: {builtin:?}");
        if x != y {
            let (lx, ly) = (listing(&x.unwrap_or_default()), listing(&y.unwrap_or_default()));
            let only_b: Vec<_> = lx.iter().filter(|l| !ly.contains(l)).collect();
            let only_q: Vec<_> = ly.iter().filter(|l| !lx.contains(l)).collect();
            panic!("{name}: {f} differs between the built-in VMM and QEMU\nonly builtin: {only_b:#?}\nonly QEMU: {only_q:#?}");
        }
        assert!(builtin.tmp_left.is_empty() && qemu.tmp_left.is_empty(), "{name}: temp files left: {:?} {:?}", builtin.tmp_left, qemu.tmp_left);
    }
}

/// A failed run: `code`, stderr naming `needle`, nothing written, no temp
/// file left.
fn assert_failed_cleanly(run: &CaseRun, code: i32, needle: &str) {
    assert_eq!(run.code, code, "{run:?}");
    assert!(run.stderr.contains(needle), "the message names {needle:?}: {run:?}");
    let written: Vec<&String> = run.files.keys().filter(|f| *f != "rar.stderr").collect();
    assert!(written.is_empty(), "nothing written, but $OUT holds {written:?}: {run:?}");
    assert!(run.tmp_left.is_empty(), "temp files left: {:?}", run.tmp_left);
}

/// The guest kernel's lines of a `-v` run that read as a warning or an
/// error. The console carries no printk levels, so this goes by the words
/// kernel warnings and errors use.
fn alarming_kernel_lines(stderr: &str) -> Vec<&str> {
    const WORDS: &[&str] = &[
        "error", "warn", "fail", "unable", "can't", "cannot", "bug", "oops", "panic", "call trace", "taint",
        "unhandled", "unknown", "invalid", "unexpected", "timed out", "timeout", "corrupt", "mismatch", "unstable",
        "long readout", "i8042", "disabled due",
    ];
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("kernel: "))
        // Our command line holds `panic=-1`.
        .filter(|l| !l.to_ascii_lowercase().contains("command line:"))
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            WORDS.iter().any(|w| {
                lower.match_indices(w).any(|(at, _)| at == 0 || !lower.as_bytes()[at - 1].is_ascii_alphanumeric())
            })
        })
        .collect()
}

fn assert_clean_boot(run: &CaseRun) {
    assert!(run.stderr.lines().any(|l| l.starts_with("kernel: Linux version")), "-v shows the kernel log: {run:?}");
    let bad = alarming_kernel_lines(&run.stderr);
    assert!(bad.is_empty(), "the guest kernel logged warnings or errors under the built-in VMM:\n{}\n{run:?}", bad.join("\n"));
}

fn layer_member(layer: &[u8], name: &str) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut a = tar::Archive::new(layer);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path_bytes().as_ref() == name.as_bytes() {
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            return Some(v);
        }
    }
    None
}

#[test]
fn tier3_every_formats_row_gives_the_same_bytes_as_qemu() {
    let Some(b) = batch() else { return };
    assert_identical(b, "rich", &["layer.tar", "img.tar"]);
    // And the right bytes, not only the same: tier 2's expectations.
    let layer = b.builtin("rich").file("layer.tar").unwrap();
    let report = layer_member(&layer, "out/report").map(|r| String::from_utf8_lossy(&r).into_owned());
    assert_eq!(report.as_deref(), Some(edge::expected_report().as_str()), "what the script saw");
    assert_eq!(listing(&layer), edge::expected_layer(edge::expected_report().len()), "the new layer, entry by entry");
}

#[test]
fn tier3_a_130_layer_base_gives_the_same_bytes_as_qemu() {
    let Some(b) = batch() else { return };
    assert_identical(b, "deep", &["layer.tar", "img.tar"]);
    let layer = b.builtin("deep").file("layer.tar").unwrap();
    let seen = String::from_utf8_lossy(&layer_member(&layer, "seen").expect("the script's /seen")).into_owned();
    assert_eq!(seen, format!("layer {}\ndata 0\n0\n", DEEP_LAYERS - 1), "the top layer, the bottom one, an opaque dir");
    let l = listing(&layer);
    assert!(l.contains(&".wh.l005 file 644 0:0 0".to_string()), "{l:#?}");
    assert!(l.iter().any(|e| e.starts_with("l129/data file")), "{l:#?}");
}

#[test]
fn tier3_export_with_a_script_gives_the_same_bytes_as_qemu() {
    let Some(b) = batch() else { return };
    assert_identical(b, "export", &["rootfs.tar"]);
    let l = listing(&b.builtin("export").file("rootfs.tar").unwrap());
    assert!(l.contains(&"data/ dir 755 1000:1000 0".to_string()), "{l:#?}");
    assert!(!l.iter().any(|e| e.starts_with("etc/group ")), "{l:#?}");
}

#[test]
fn tier3_a_normal_run_boots_clean() {
    let Some(b) = batch() else { return };
    assert_identical(b, "skeleton", &["layer.tar", "img.tar"]);
    assert_eq!(listing(&b.builtin("skeleton").file("layer.tar").unwrap()), skeleton_layer());
    assert_clean_boot(b.builtin("skeleton"));
}

#[test]
fn tier3_two_vcpus_start_as_one_package_and_boot_clean() {
    let Some(b) = batch() else { return };
    let run = b.builtin("smp");
    assert_identical(b, "smp", &["layer.tar", "img.tar"]);
    let layer = run.file("layer.tar").unwrap();
    let topology = String::from_utf8_lossy(&layer_member(&layer, "root/topology").expect("/root/topology")).into_owned();
    let cpu = |n: u32| format!("processor\t: {n}\nphysical id\t: 0\nsiblings\t: 2\ncore id\t\t: {n}\ncpu cores\t: 2\napicid\t\t: {n}\ninitial apicid\t: {n}\n");
    assert_eq!(topology, format!("{}{}", cpu(0), cpu(1)), "both vCPUs up, one package of two cores");
    assert!(run.stderr.contains("kernel: smp: Brought up 1 node, 2 CPUs"), "{run:?}");
    assert_clean_boot(run);
}

#[test]
fn tier3_the_scripts_exit_code_comes_back_and_nothing_is_written() {
    let Some(b) = batch() else { return };
    let run = b.builtin("exit-code");
    assert!(run.stderr.contains("from-the-script"), "script output is forwarded: {run:?}");
    assert_failed_cleanly(run, 7, "from-the-script");
}

#[test]
fn tier3_timeout_gives_124_naming_the_flag() {
    let Some(b) = batch() else { return };
    let run = b.builtin("timeout");
    assert_failed_cleanly(run, 124, "--timeout");
    assert!(run.secs < 60.0, "stopped in time: {:.1} s", run.secs);
}

#[test]
fn tier3_sigint_stops_the_guest_and_leaves_nothing() {
    let Some(b) = batch() else { return };
    let run = b.builtin("ctrl-c");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(!stdout.contains("left running"), "{stdout}");
    assert_failed_cleanly(run, 130, "");
}

#[test]
fn tier3_a_guest_panic_is_named() {
    let Some(b) = batch() else { return };
    assert_failed_cleanly(b.builtin("panic"), 125, "panic");
}

#[test]
fn tier3_filling_the_scratch_space_names_disk_size() {
    let Some(b) = batch() else { return };
    assert_failed_cleanly(b.builtin("disk-size"), 125, "--disk-size");
}

#[test]
fn tier3_a_guest_oom_names_memory() {
    let Some(b) = batch() else { return };
    assert_failed_cleanly(b.builtin("memory"), 125, "--memory");
}

#[test]
fn forcing_the_builtin_vmm_without_hardware_kvm_fails_fast_with_the_reason() {
    if runasroot::machine::kvm::hardware_support().is_ok() {
        skip("this host has hardware KVM, so --vmm builtin is allowed here");
        return;
    }
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let s = script(dir.path(), "s.sh", "true\n");
    let base = busybox_base();
    let start = std::time::Instant::now();
    let run = runasroot(&["--vmm", "builtin", "--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "--layer-output", "-"], &tmp);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("built-in VMM"), "{run:?}");
    assert!(start.elapsed() < std::time::Duration::from_secs(3), "took {:?}", start.elapsed());
    assert_empty_dir(&tmp);
}

#[test]
fn kernel_log_lines_that_read_as_warnings_are_caught() {
    let log = "kernel: Linux version 6.12\n\
               kernel: Command line: console=ttyS0 panic=-1\n\
               kernel: i8042: Can't read CTR while initializing i8042\n\
               kernel: APIC timer disabled due to verification failure\n\
               kernel: clocksource: Long readout interval, skipping watchdog check\n\
               kernel: tsc: Marking TSC unstable due to TSCs unsynchronized\n\
               kernel: [Firmware Bug]: CPU1: APIC id mismatch\n\
               kernel: debugfs: Directory 'x' with parent 'y' already present!\n\
               kernel: Run /init as init process\n\
               guest: error in the guest is not the kernel's\n\
               kernel: WARNING: CPU: 0 PID: 1 at kernel/x.c:1\n";
    assert_eq!(
        alarming_kernel_lines(log),
        vec![
            "i8042: Can't read CTR while initializing i8042",
            "APIC timer disabled due to verification failure",
            "clocksource: Long readout interval, skipping watchdog check",
            "tsc: Marking TSC unstable due to TSCs unsynchronized",
            "[Firmware Bug]: CPU1: APIC id mismatch",
            "WARNING: CPU: 0 PID: 1 at kernel/x.c:1",
        ]
    );
}
