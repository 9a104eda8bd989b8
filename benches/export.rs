//! Flattening a ~500 MB, 10-layer image: the host streaming engine
//! against `umoci raw unpack` + `tar -c` (what users do today without
//! Docker) and the in-VM engine, measured in the same run.
//!
//! `cargo bench --bench export`. Prints wall times (best and median of
//! RUNS), ratios, and each tool's peak RSS (from wait4's rusage of the
//! child that ran it; the library engine runs in a child copy of this
//! program for that). Targets (issue 5): ≥ 3× faster than umoci + tar,
//! peak RSS < 64 MB.
//!
//! Then (issue 8) a do-nothing script run over this image (plus a
//! busybox layer on top, for the script's shell) against the same script
//! over the 2 MB busybox base: the base is served in place, so the cost
//! must not grow with the base (target: within 1.5×).
//!
//! The image (many small files, a few large ones, whiteouts and opaque
//! dirs, uncompressed layers as `docker save` writes them) is generated
//! once into target/bench-cache/. `RUNASROOT_BENCH_COMPRESS=gzip` (or
//! `zstd`) benchmarks a compressed variant instead (umoci gets gzip for
//! zstd, which it cannot read).

#[path = "../tests/common/images.rs"]
#[allow(unused_imports)]
mod images;

use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use images::{big_file, dir, image, layer, opaque, whiteout, write, Build, Compression, Entry, Format};

/// Bump when the generated image changes.
const GENERATION: u32 = 1;
const LAYERS: usize = 10;
/// Small files per layer: SUBDIRS × FILES_PER_DIR, 1–8 KiB each.
const SUBDIRS: usize = 60;
const FILES_PER_DIR: usize = 100;
/// One large file per layer.
const BIG: u64 = 24 << 20;
const RUNS: usize = 3;
const TAG: &str = "bench";
/// The in-VM engine under TCG is slow: give up after this long.
const VM_TIMEOUT: Duration = Duration::from_secs(600);
/// Set in the child that runs the library engine.
const CHILD_ENV: &str = "RUNASROOT_BENCH_EXPORT_CHILD";

fn main() {
    if let Ok(args) = std::env::var(CHILD_ENV) {
        child_export(&args);
        return;
    }
    let compress = match std::env::var("RUNASROOT_BENCH_COMPRESS").as_deref() {
        Ok("gzip") => Compression::Gzip,
        Ok("zstd") => Compression::Zstd,
        _ => Compression::None,
    };
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-cache");
    let (ours_img, umoci_img, stored) = generated_image(&cache, compress);
    let work = cache.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    println!(
        "image: {} layers ({compress:?}), {:.0} MB stored, {} entries listed",
        LAYERS,
        stored as f64 / 1e6,
        LAYERS * (SUBDIRS * FILES_PER_DIR + SUBDIRS + 3)
    );

    let out = work.join("host.tar");
    let mut host = vec![];
    let mut host_rss = 0;
    for _ in 0..RUNS {
        let m = run_measured(
            Command::new(std::env::current_exe().unwrap())
                .env(CHILD_ENV, format!("{}\n{}\n{}", ours_img.display(), out.display(), work.display())),
        )
        .expect("host engine failed");
        host.push(m.wall);
        host_rss = host_rss.max(m.max_rss_kb);
    }
    let host_bytes = fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    report("host engine (runasroot::export)", &host, None, host_rss);

    let cli = env!("CARGO_BIN_EXE_runasroot");
    match cli_supports_export(cli) {
        Err(why) => println!("runasroot export (CLI): skipped: {why}"),
        Ok(()) => {
            let out = work.join("cli.tar");
            let mut times = vec![];
            let mut rss = 0;
            for _ in 0..RUNS {
                match run_measured(Command::new(cli).arg("export").arg("--base").arg(&ours_img).arg("-o").arg(&out).env("TMPDIR", &work)) {
                    Ok(m) => {
                        times.push(m.wall);
                        rss = rss.max(m.max_rss_kb);
                    }
                    Err(e) => {
                        println!("runasroot export (CLI): failed: {e}");
                        break;
                    }
                }
            }
            if !times.is_empty() {
                report("runasroot export (CLI, host engine)", &times, Some(&host), rss);
                let same = same_bytes(&out, &work.join("host.tar"));
                println!("  CLI output identical to the library's: {same}");
            }
        }
    }

    match umoci_skip_reason() {
        Some(why) => println!("umoci raw unpack + tar -c: skipped: {why}"),
        None => {
            let rootfs = work.join("rootfs");
            let tar_out = work.join("umoci.tar");
            let (mut umoci, mut tar, mut both) = (vec![], vec![], vec![]);
            let (mut umoci_rss, mut tar_rss) = (0, 0);
            for _ in 0..RUNS {
                let _ = fs::remove_dir_all(&rootfs);
                let u = run_measured(
                    Command::new("umoci")
                        .args(["raw", "unpack", "--image"])
                        .arg(format!("{}:{TAG}", umoci_img.display()))
                        .arg(&rootfs),
                )
                .expect("umoci raw unpack failed");
                let t = run_measured(
                    Command::new("tar")
                        .args(["--xattrs", "--numeric-owner", "-C"])
                        .arg(&rootfs)
                        .arg("-cf")
                        .arg(&tar_out)
                        .arg("."),
                )
                .expect("tar -c failed");
                umoci.push(u.wall);
                tar.push(t.wall);
                both.push(u.wall + t.wall);
                umoci_rss = umoci_rss.max(u.max_rss_kb);
                tar_rss = tar_rss.max(t.max_rss_kb);
            }
            let _ = fs::remove_dir_all(&rootfs);
            report("umoci raw unpack", &umoci, None, umoci_rss);
            report("tar -c of the rootfs", &tar, None, tar_rss);
            report("umoci + tar", &both, None, umoci_rss.max(tar_rss));
            let ratio = median(&both).as_secs_f64() / median(&host).as_secs_f64();
            let best = both.iter().min().unwrap().as_secs_f64() / host.iter().min().unwrap().as_secs_f64();
            println!(
                "  => host engine is {ratio:.1}x faster than umoci + tar (median; {best:.1}x best vs best; target >= 3x: {})",
                if ratio.min(best) >= 3.0 { "met" } else { "NOT met" }
            );
            println!(
                "  output sizes: host {:.0} MB, umoci+tar {:.0} MB",
                host_bytes as f64 / 1e6,
                fs::metadata(&tar_out).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
            );
        }
    }

    match in_vm(cli, &ours_img, &work) {
        Err(why) => println!("in-VM engine (runasroot export --in-vm): skipped: {why}"),
        Ok(m) => {
            report("in-VM engine (runasroot export --in-vm)", &[m.wall], Some(&host), m.max_rss_kb);
            let same = same_bytes(&work.join("vm.tar"), &work.join("host.tar"));
            println!("  in-VM output identical to the host engine's: {same}");
        }
    }
    do_nothing_ratio(&cache, compress, cli, &work);
    println!(
        "host engine peak RSS: {:.1} MB (target < 64 MB: {}); this bench process itself peaked at {:.1} MB",
        host_rss as f64 / 1024.0,
        if host_rss < 64 * 1024 { "met" } else { "NOT met" },
        own_peak_rss_kb() as f64 / 1024.0
    );
    let _ = fs::remove_dir_all(&work);
}

/// The child: open the image and export it with the library, as the CLI
/// does, so its peak RSS is the engine's.
fn child_export(args: &str) {
    let mut it = args.split('\n');
    let (img, out, tmp) = (it.next().unwrap(), it.next().unwrap(), PathBuf::from(it.next().unwrap()));
    let opts = runasroot::image::OpenOptions { from_image: None, platform: None, temp_dir: tmp.clone() };
    let start = Instant::now();
    let image = runasroot::image::open(img, &opts).unwrap_or_else(|e| panic!("open {img}: {e}"));
    let opened = start.elapsed();
    let mut w = BufWriter::with_capacity(1 << 20, fs::File::create(out).unwrap());
    let spool = runasroot::layers::Spool { cache: None, temp_dir: &tmp };
    let export_opts = runasroot::export::ExportOptions { clamp_mtime: None, spool };
    if let Err(e) = runasroot::export::export(&image.layers, &export_opts, &mut w) {
        panic!("export: {e}");
    }
    // No fsync: umoci and tar do not sync either.
    w.into_inner().unwrap();
    eprintln!("image::open {:.3} s, export {:.3} s", opened.as_secs_f64(), (start.elapsed() - opened).as_secs_f64());
}

/// Whether two outputs exist and hold the same bytes. Streamed: this
/// process must stay small, because a child's peak RSS (wait4's
/// ru_maxrss) starts from its parent's high-water mark at exec.
fn same_bytes(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (Ok(fa), Ok(fb)) = (fs::File::open(a), fs::File::open(b)) else { return false };
    if fa.metadata().map(|m| m.len()).ok() != fb.metadata().map(|m| m.len()).ok() {
        return false;
    }
    let (mut ra, mut rb) = (std::io::BufReader::new(fa), std::io::BufReader::new(fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = match ra.read(&mut ba) {
            Ok(0) => return rb.read(&mut bb[..1]).ok() == Some(0),
            Ok(n) => n,
            Err(_) => return false,
        };
        if rb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// This process's own peak RSS in KiB (VmHWM): a floor under every
/// child's figure.
fn own_peak_rss_kb() -> i64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

struct Measured {
    wall: Duration,
    max_rss_kb: i64,
}

/// Runs a command to its end, timing it and taking its own rusage.
fn run_measured(cmd: &mut Command) -> Result<Measured, String> {
    let start = Instant::now();
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own unwaited child; status and usage point to
    // live locals. std's Child is never waited on afterwards.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    if r != pid {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let mut err = String::new();
        if let Some(mut e) = child.stderr {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        return Err(format!("exit status {status:#x}: {}", err.trim()));
    }
    Ok(Measured { wall, max_rss_kb: usage.ru_maxrss })
}

fn median(times: &[Duration]) -> Duration {
    let mut t = times.to_vec();
    t.sort();
    t[t.len() / 2]
}

fn report(what: &str, times: &[Duration], baseline: Option<&[Duration]>, rss_kb: i64) {
    let best = times.iter().min().unwrap();
    let ratio = baseline
        .map(|b| format!(", {:.2}x the host engine's time", median(times).as_secs_f64() / median(b).as_secs_f64()))
        .unwrap_or_default();
    println!(
        "{what}: best {:.3} s, median {:.3} s over {} runs, peak RSS {:.1} MB{ratio}",
        best.as_secs_f64(),
        median(times).as_secs_f64(),
        times.len(),
        rss_kb as f64 / 1024.0
    );
}

fn cli_supports_export(cli: &str) -> Result<(), String> {
    let out = Command::new(cli).args(["export", "--help"]).output().map_err(|e| e.to_string())?;
    let help = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && help.contains("--base") {
        Ok(())
    } else {
        Err("this build of the runasroot binary has no `export --base` command yet".into())
    }
}

fn umoci_skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("umoci raw unpack needs root to chown and mknod (run the bench as root)".into());
    }
    match Command::new("umoci").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("umoci is not installed".into()),
    }
}

fn in_vm(cli: &str, img: &Path, work: &Path) -> Result<Measured, String> {
    cli_supports_export(cli)?;
    let help = Command::new(cli).args(["export", "--help"]).output().map_err(|e| e.to_string())?;
    if !String::from_utf8_lossy(&help.stdout).contains("--in-vm") {
        return Err("the binary has no --in-vm".into());
    }
    // Big enough for the whole unpacked image plus its tar in the guest.
    let mut cmd = Command::new("timeout");
    cmd.arg(VM_TIMEOUT.as_secs().to_string())
        .arg(cli)
        .args(["export", "--in-vm", "--memory", "2048", "--disk-size", "4096", "--base"])
        .arg(img)
        .arg("-o")
        .arg(work.join("vm.tar"))
        .env("TMPDIR", work);
    run_measured(&mut cmd).map_err(|e| format!("runasroot export --in-vm failed or timed out: {e}"))
}

/// `runasroot --script true` over the big image (+ busybox on top) and
/// over the busybox base, RUNS times each, the same launcher.
fn do_nothing_ratio(cache: &Path, compress: Compression, cli: &str, work: &Path) {
    let Some(bb) = images::busybox_entries() else {
        println!("do-nothing script: skipped: busybox-static is missing");
        return;
    };
    let root = cache.join(format!("export-g{GENERATION}-{compress:?}-busybox").to_lowercase());
    let big = root.join("oci");
    if !root.join("done").exists() {
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let mut img = bench_image(compress);
        img.layers.push(layer(bb.clone()).compressed(compress));
        write(&big, &Build::new(Format::OciDir), &[img.tag(TAG)]);
        fs::write(root.join("done"), b"").unwrap();
    }
    let small = work.join("busybox.tar");
    write(&small, &Build::new(Format::DockerLegacy), &[image(vec![layer(bb).compressed(compress)])]);
    let script = work.join("true.sh");
    fs::write(&script, "true\n").unwrap();
    let spool = work.join("spool-cache");
    let run = |base: &Path| -> Result<Duration, String> {
        let m = run_measured(
            Command::new(cli)
                .arg("--base")
                .arg(base)
                .arg("--script")
                .arg(&script)
                .arg("--layer-output")
                .arg(work.join("true-layer.tar"))
                .env("TMPDIR", work)
                .env("RUNASROOT_CACHE", &spool),
        )?;
        Ok(m.wall)
    };
    // A first run of each warms the page cache (and, compressed, fills
    // the spool cache: reported apart).
    let cold = match (run(&big), run(&small)) {
        (Ok(b), Ok(s)) => (b, s),
        (Err(e), _) | (_, Err(e)) => {
            println!("do-nothing script: runasroot failed: {e}");
            return;
        }
    };
    let (mut on_big, mut on_small) = (vec![], vec![]);
    for _ in 0..RUNS {
        on_big.push(run(&big).expect("do-nothing over the big image"));
        on_small.push(run(&small).expect("do-nothing over busybox"));
    }
    let ratio = median(&on_big).as_secs_f64() / median(&on_small).as_secs_f64();
    println!(
        "do-nothing script: over this image + busybox (11 layers) median {:.3} s, over busybox alone median {:.3} s \
         => {ratio:.2}x (target <= 1.5x: {}); first runs {:.3} s / {:.3} s{}",
        median(&on_big).as_secs_f64(),
        median(&on_small).as_secs_f64(),
        if ratio <= 1.5 { "met" } else { "NOT met" },
        cold.0.as_secs_f64(),
        cold.1.as_secs_f64(),
        if compress == Compression::None { "" } else { " (the first decompresses into the spool cache)" }
    );
    let _ = fs::remove_dir_all(&spool);
}

/// The image, generated once: (what runasroot reads, what umoci reads,
/// stored bytes).
fn generated_image(cache: &Path, compress: Compression) -> (PathBuf, PathBuf, u64) {
    let key = format!("export-g{GENERATION}-{compress:?}").to_lowercase();
    let root = cache.join(&key);
    let ours = root.join("oci");
    let theirs = if compress == Compression::Zstd { root.join("oci-gzip") } else { ours.clone() };
    let done = root.join("done");
    if !done.exists() {
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let start = Instant::now();
        println!("generating the bench image in {} (once) ...", root.display());
        let img = bench_image(compress).tag(TAG);
        write(&ours, &Build::new(Format::OciDir), std::slice::from_ref(&img));
        if theirs != ours {
            let mut gz = img.clone();
            for l in &mut gz.layers {
                l.compression = Compression::Gzip;
            }
            write(&theirs, &Build::new(Format::OciDir), &[gz]);
        }
        fs::write(&done, b"").unwrap();
        println!("generated in {:.1} s", start.elapsed().as_secs_f64());
    }
    let stored = fs::read_dir(ours.join("blobs/sha256")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum();
    (ours, theirs, stored)
}

/// 10 layers, each: SUBDIRS × FILES_PER_DIR small files (1–8 KiB), one
/// 24 MiB file, explicit parent directories; from the second layer on,
/// whiteouts of some of the previous layer's files, a whole directory
/// and its large file, and an opaque directory.
fn bench_image(compress: Compression) -> images::Image {
    let mut layers = vec![];
    for i in 0..LAYERS {
        let mut e: Vec<Entry> = vec![dir("big"), dir(format!("d{i}"))];
        if i > 0 {
            let prev = i - 1;
            for j in 0..10 {
                for k in 0..5 {
                    e.push(whiteout(format!("d{prev}/s{j:02}/f{k:03}")));
                }
            }
            e.push(whiteout(format!("d{prev}/s{:02}", SUBDIRS - 1)));
            e.push(opaque(format!("d{prev}/s{:02}", SUBDIRS - 2)));
            e.push(big_file(format!("d{prev}/s{:02}/replacement", SUBDIRS - 2), 100, b'r'));
            e.push(whiteout(format!("big/{prev}.bin")));
        }
        for j in 0..SUBDIRS {
            e.push(dir(format!("d{i}/s{j:02}")));
            for k in 0..FILES_PER_DIR {
                // Sizes spread over 1–8 KiB, deterministic.
                let size = 1024 + ((i * 7919 + j * 104_729 + k * 1_299_709) % 7168) as u64;
                e.push(big_file(format!("d{i}/s{j:02}/f{k:03}"), size, (k % 251) as u8).mode(0o644));
            }
        }
        e.push(big_file(format!("big/{i}.bin"), BIG, i as u8));
        layers.push(layer(e).compressed(compress));
    }
    image(layers)
}
