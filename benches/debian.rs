//! Bench: nixpkgs' redis example on the Debian bookworm minbase base,
//! broken into phases, with peers measured in the same run:
//!
//! * one `runasroot -v` run of the redis script: host read/verify, host
//!   indexing and lower image, disk preparation, guest boot, mount,
//!   script, pack, guest write, VM exit, image assembly (from the host's
//!   phase lines and the guest's timings);
//! * the host's work to prepare the lower (hashing, indexing, the EROFS
//!   image) and its peak RSS, in a child running the library: the base as
//!   `docker save` writes it (uncompressed), and with a gzip layer, cold
//!   (empty cache: decompressing) and cached;
//! * in-guest pack throughput (a `runasroot export --in-vm` of the same
//!   base packs the whole tree) against GNU tar creating a tar of the
//!   same tree on the host;
//! * when /work/shared/bench/nixstyle.sh runs here (root, apt-get download
//!   of a Debian kernel), the nixpkgs-style runAsRoot peer on the same base
//!   and script, and the wall-time ratio.
//!
//! Run: `cargo bench --bench debian`. Prints figures and ratios; asserts
//! nothing about speed. Skips (saying why) when the Debian base cannot be
//! built here.

#[path = "../tests/common/images.rs"]
// Its own unit tests come along under `cargo bench`; they are not this bench's.
#[allow(unused_imports, clippy::items_after_test_module)]
mod images;
#[path = "../tests/helpers/mod.rs"]
mod helpers;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The nixpkgs-style peer (see ../shared/DESIGN.md, "The peer to beat").
const NIXSTYLE: &str = "/work/shared/bench/nixstyle.sh";
/// Set in the child that prepares a lower with the library.
const CHILD_ENV: &str = "RUNASROOT_BENCH_DEBIAN_CHILD";

/// The child: image::open + lower::build as a run does them; prints the
/// time and this process's own peak RSS (VmHWM: no guest, no parent).
fn child_prepare(args: &str) {
    let mut it = args.split('\n');
    let (base, cache, temp) = (it.next().unwrap(), it.next().unwrap(), PathBuf::from(it.next().unwrap()));
    let start = Instant::now();
    let opts = runasroot::image::OpenOptions { from_image: None, platform: None, temp_dir: temp.clone() };
    let image = runasroot::image::open(base, &opts).unwrap_or_else(|e| panic!("open {base}: {e}"));
    let opened = start.elapsed().as_secs_f64();
    let cache = (!cache.is_empty()).then(|| {
        let loc = runasroot::cache::Location { runasroot_cache: Some(cache.to_string()), ..Default::default() };
        runasroot::cache::Cache::open(&loc).unwrap()
    });
    let spool = runasroot::layers::Spool { cache: cache.as_ref(), temp_dir: &temp };
    let copy = runasroot::lower::CopySpec { items: &[], store_paths: &[], copy_dirlinks: false };
    let lower = runasroot::lower::build(&image.layers, copy, 1, spool, &temp).unwrap_or_else(|e| panic!("lower: {e}"));
    let total = start.elapsed().as_secs_f64();
    let hwm: i64 = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0);
    println!(
        "open={opened:.3} lower={:.3} total={total:.3} rss_kb={hwm} inodes={} image_kib={} spooled_mib={:.1} hits={}",
        total - opened,
        lower.stats.inodes,
        lower.stats.image_bytes >> 10,
        lower.stats.index.spooled_bytes as f64 / (1 << 20) as f64,
        lower.stats.index.cache_hits
    );
}

/// Runs the child on `base` (with `cache`, or none when empty); its line.
fn prepare(base: &Path, cache: &str, temp: &Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, format!("{}\n{cache}\n{}", base.display(), temp.display()))
        .output()
        .expect("run the bench child");
    assert!(out.status.success(), "prepare child failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A `runasroot -v` run, parsed.
struct Timed {
    ok: bool,
    wall: f64,
    /// `runasroot: [  1.23s] what` lines: (host seconds since start, what).
    host: Vec<(f64, String)>,
    /// The guest's `phase=uptime` pairs, in order.
    guest: Vec<(String, f64)>,
    stderr: String,
}

impl Timed {
    /// Host time at the first phase line starting with `prefix`.
    fn at(&self, prefix: &str) -> Option<f64> {
        self.host.iter().find(|(_, w)| w.starts_with(prefix)).map(|(t, _)| *t)
    }
    /// Duration of a guest phase: its end minus the previous phase's end.
    fn guest_phase(&self, phase: &str) -> Option<f64> {
        let i = self.guest.iter().position(|(p, _)| p == phase)?;
        Some(if i == 0 { self.guest[0].1 } else { self.guest[i].1 - self.guest[i - 1].1 })
    }
}

fn run_timed(args: &[&str]) -> Timed {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_runasroot")).args(args).stdin(Stdio::null()).stdout(Stdio::null()).output().expect("run runasroot");
    let wall = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut host = vec![];
    let mut guest = vec![];
    for line in stderr.lines() {
        if let Some(rest) = line.strip_prefix("runasroot: guest timings (uptime at end of phase):") {
            guest = rest
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((k.to_string(), v.trim_end_matches('s').parse().ok()?)))
                .collect();
        } else if let Some(rest) = line.strip_prefix("runasroot: [") {
            if let Some((t, what)) = rest.split_once("s] ") {
                if let Ok(t) = t.trim().parse() {
                    host.push((t, what.to_string()));
                }
            }
        }
    }
    Timed { ok: out.status.success(), wall, host, guest, stderr }
}

/// Wall seconds of a shell command (which must succeed).
fn time_sh(cmd: &str) -> f64 {
    let start = Instant::now();
    let st = Command::new("sh").arg("-c").arg(cmd).status().expect("sh");
    assert!(st.success(), "{cmd} failed");
    start.elapsed().as_secs_f64()
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// A directory on tmpfs for the host peer (the guest unpacks into tmpfs).
fn host_tmpfs_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let b = tempfile::Builder::new().prefix("rar-bench-gnutar-").tempdir_in(shm);
    b.unwrap_or_else(|_| tempfile::Builder::new().prefix("rar-bench-gnutar-").tempdir().unwrap())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn main() {
    if let Ok(args) = std::env::var(CHILD_ENV) {
        child_prepare(&args);
        return;
    }
    let rootfs = match helpers::debian_minbase() {
        Ok(p) => p,
        Err(why) => {
            println!("debian bench skipped: {why}");
            return;
        }
    };
    let dir = tempfile::Builder::new().prefix("rar-bench-debian-").tempdir().unwrap();
    let (entries, content) = helpers::debian_entries(&rootfs);
    let layer_tar = dir.path().join("layer.tar");
    images::write_layer_tar(&entries, std::io::BufWriter::new(fs::File::create(&layer_tar).unwrap())).unwrap();
    let layer_bytes = fs::metadata(&layer_tar).unwrap().len();
    let base = dir.path().join("debian.tar");
    let img = images::image(vec![images::layer(entries)]).tag("debian:bookworm");
    images::write(&base, &images::Build::new(images::Format::DockerLegacy), &[img]);
    let script = dir.path().join("redis.sh");
    fs::write(&script, helpers::REDIS_SCRIPT).unwrap();
    let out = dir.path().join("redis.tar");
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();

    // 1. The redis run, phase by phase.
    let r = run_timed(&["-v", "--base", &s(&base), "--script", &s(&script), "-o", &s(&out)]);
    if !r.ok {
        println!("debian bench: runasroot failed:\n{}", tail(&r.stderr, 30));
        std::process::exit(1);
    }
    // The launcher, as the host's "booting the guest (NAME)" line says.
    let launcher = r
        .host
        .iter()
        .find_map(|(_, w)| w.strip_prefix("booting the guest (").and_then(|x| x.strip_suffix(')')))
        .unwrap_or("unknown launcher")
        .to_string();
    println!("debian bench: redis example on Debian bookworm minbase ({:.1} MB layer tar, {:.1} MB of file data), launcher {launcher}", mb(layer_bytes), mb(content));
    println!("  runasroot total wall                   {:8.3} s", r.wall);
    let read = r.at("reading and verifying");
    let index = r.at("indexing the base");
    let prep = r.at("preparing disks");
    let boot = r.at("booting the guest");
    let write = r.at("writing the new image");
    if let (Some(a), Some(b)) = (read, index) {
        println!("  host: read + verify the base            {:8.3} s", b - a);
    }
    if let (Some(a), Some(b)) = (index, prep) {
        println!("  host: index layers + write the lower    {:8.3} s", b - a);
    }
    if let (Some(a), Some(b)) = (prep, boot) {
        println!("  host: prepare disks                     {:8.3} s", b - a);
    }
    for (phase, label) in [("init", "guest: boot to init (uptime)"), ("mount", "guest: mount lower + overlay"), ("script", "guest: script"), ("pack", "guest: pack new layer"), ("write", "guest: write result")] {
        match r.guest_phase(phase) {
            Some(t) => println!("  {label:<38} {t:8.3} s"),
            None => println!("  {label:<38}      n/a (no `{phase}` in the guest timings)"),
        }
    }
    if let (Some(b), Some(w), Some(end)) = (boot, write, r.guest.last().map(|(_, t)| *t)) {
        println!("  host: VM launch + exit overhead         {:8.3} s", (w - b) - end);
    }
    if let Some(w) = write {
        println!("  host: assemble + write the image        {:8.3} s", r.wall - w);
    }
    println!("  (guest timings: {})", r.guest.iter().map(|(p, t)| format!("{p}={t:.3}s")).collect::<Vec<_>>().join(" "));

    // 2. The host's part: preparing the lower, and its peak RSS.
    let gz_base = dir.path().join("debian-gzip.tar");
    let (gz_entries, _) = helpers::debian_entries(&rootfs);
    let gz = images::image(vec![images::layer(gz_entries).gzip()]).tag("debian:bookworm");
    images::write(&gz_base, &images::Build::new(images::Format::DockerLegacy), &[gz]);
    let prep_cache = dir.path().join("prep-cache");
    let prep_temp = dir.path().join("prep-temp");
    fs::create_dir_all(&prep_temp).unwrap();
    println!("  host prepare (image::open + lower::build, a child of its own; peak RSS excludes the guest):");
    println!("    uncompressed layer:          {}", prepare(&base, "", &prep_temp));
    println!("    gzip layer, cold cache:      {}", prepare(&gz_base, prep_cache.to_str().unwrap(), &prep_temp));
    println!("    gzip layer, cached:          {}", prepare(&gz_base, prep_cache.to_str().unwrap(), &prep_temp));
    let host_x = host_tmpfs_dir();
    time_sh(&format!("tar -xpf {} -C {}", layer_tar.display(), host_x.path().display()));

    // 3. Pack throughput: an in-VM export packs the whole tree; GNU tar
    //    creates a tar of the same tree on the host.
    let packed = host_x.path().join("..").join(format!("rar-bench-packed-{}.tar", std::process::id()));
    let t_c = time_sh(&format!("tar -cf {} -C {} .", packed.display(), host_x.path().display()));
    let packed_bytes = fs::metadata(&packed).unwrap().len();
    let _ = fs::remove_file(&packed);
    let export = dir.path().join("export.tar");
    let e = run_timed(&["export", "--in-vm", "-v", "--base", &s(&base), "-o", &s(&export)]);
    if !e.ok {
        println!("  pack: in-VM export failed, no pack throughput:\n{}", tail(&e.stderr, 10));
    } else {
        let export_bytes = fs::metadata(&export).unwrap().len();
        // The phase after mount (and after script, when there is one) packs.
        let after = e.guest.iter().position(|(p, _)| p == "mount").map(|i| i + 1);
        let pack = after
            .and_then(|i| e.guest.get(i..))
            .and_then(|rest| rest.iter().find(|(p, _)| p != "script"))
            .map(|(p, _)| p.clone());
        match pack.as_deref().and_then(|p| e.guest_phase(p).map(|t| (p, t))) {
            Some((name, t)) => {
                let (g, h) = (mb(export_bytes) / t, mb(packed_bytes) / t_c);
                println!(
                    "  pack:   guest {g:8.1} MB/s ({t:.3} s, `{name}` of export --in-vm, {:.1} MB) | GNU tar -c on the host {h:8.1} MB/s ({t_c:.3} s, {:.1} MB) | guest/host {:.2}",
                    mb(export_bytes),
                    mb(packed_bytes),
                    g / h
                );
            }
            None => println!("  pack: no pack phase in the export's guest timings: {:?}", e.guest),
        }
        println!("  (export --in-vm: wall {:.3} s, guest timings: {})", e.wall, e.guest.iter().map(|(p, t)| format!("{p}={t:.3}s")).collect::<Vec<_>>().join(" "));
    }
    // 4. The nixpkgs-style peer, same base and script.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !Path::new(NIXSTYLE).exists() {
        println!("  peer: {NIXSTYLE} not found: skipped");
    } else if !root {
        println!("  peer: {NIXSTYLE} needs root (apt-get download, depmod): skipped");
    } else {
        let peer_out = dir.path().join("nixstyle-layer.tar");
        // nixpkgs runs the script with the build's PATH, not the image's:
        // its users add this line by hand (runasroot gives Docker's default).
        let peer_script = dir.path().join("redis-nixstyle.sh");
        fs::write(&peer_script, format!("export PATH=/usr/sbin:/usr/bin:/sbin:/bin\n{}", helpers::REDIS_SCRIPT)).unwrap();
        let start = Instant::now();
        // Same accelerator as runasroot got: nixstyle's default `kvm:tcg`
        // picks a /dev/kvm that cannot run it (PVM here) and QEMU aborts.
        let accel = if launcher.ends_with("tcg") { "tcg" } else { "kvm:tcg" };
        let o = Command::new("bash")
            .arg(NIXSTYLE)
            .arg(&base)
            .arg(&peer_script)
            .arg(&peer_out)
            .env("NIXSTYLE_ACCEL", accel)
            .stdin(Stdio::null())
            .output()
            .expect("run nixstyle.sh");
        let wall = start.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&o.stdout);
        let done = stdout.lines().find(|l| l.starts_with("nixstyle total_wall="));
        match done {
            Some(line) if o.status.success() && peer_out.exists() && line.ends_with("exit=0") => {
                let phases: Vec<&str> = stdout.lines().filter(|l| l.starts_with("PHASE")).collect();
                println!("  peer: nixpkgs-style runAsRoot (nixstyle.sh, accel {accel}) {wall:8.3} s wall [guest uptime at {}]", phases.join(", "));
                println!("  ratio nixstyle / runasroot wall: {:.2}x", wall / r.wall);
            }
            _ => println!(
                "  peer: nixstyle.sh did not complete (exit {:?}), no ratio:\n{}\n{}",
                o.status.code(),
                tail(&stdout, 5),
                tail(&String::from_utf8_lossy(&o.stderr), 5)
            ),
        }
    }
}
