//! Tier 2, issue 10 "Faults": the real binary through QEMU (TCG here),
//! stopped or disturbed in each phase. Every case must end with a clear
//! message and the documented exit status (125 failure, 124 --timeout,
//! 130 SIGINT, 143 SIGTERM), write no output or the complete one, and
//! leave no temporary file and no process behind.
//!
//! Phases are hit deterministically by watching `-v` output (each host
//! phase and each guest phase prints a line as it starts) and by making
//! the phase long: a base of 768 MiB compressed as a whole (reading it
//! means decompressing and hashing it), a base whose layer is 768 MiB
//! gzipped (the lower is prepared by decompressing it), a script that
//! sleeps, a script that writes 300 MiB (packing and writing the image
//! take seconds).

mod common;
#[path = "common/images.rs"]
mod images;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use images::*;

/// Size of the big file in the slow bases.
const BIG: u64 = 768 << 20;
/// How long a run may take to end after a signal: the cooperative stop,
/// else the backstop after interrupt::GRACE (3 s), plus QEMU's exit.
const STOP_WITHIN: Duration = Duration::from_secs(20);

/// A base whose reading takes seconds: busybox + a 768 MiB file, as a
/// legacy docker-archive gzipped as a whole (runasroot decompresses it to
/// a temporary file and hashes every layer). Also slow to assemble: the
/// 768 MiB layer is copied into the new image.
fn slow_to_read() -> Option<PathBuf> {
    static BASE: OnceLock<Option<PathBuf>> = OnceLock::new();
    BASE.get_or_init(|| big_fixture("faults-slow-read-v1.tar.gz", Whole::Gzip, Compression::None)).clone()
}

/// A base whose lower takes seconds to prepare: busybox + a 768 MiB file
/// in a gzipped layer (decompressed and spooled before the guest boots).
fn slow_to_prepare() -> Option<PathBuf> {
    static BASE: OnceLock<Option<PathBuf>> = OnceLock::new();
    BASE.get_or_init(|| big_fixture("faults-slow-lower-v1.tar", Whole::None, Compression::Gzip)).clone()
}

/// Made once and kept with the other fixtures (each test process makes
/// its own copy and renames it into place).
fn big_fixture(name: &str, whole: Whole, layer_compression: Compression) -> Option<PathBuf> {
    let Some(busybox) = busybox_entries() else {
        skip("busybox-static is missing (.ci/setup installs it)");
        return None;
    };
    let dir = world_readable_dir("fixtures");
    let out = dir.join(name);
    if !out.exists() {
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        let img = image(vec![layer(busybox), layer(vec![big_file("big", BIG, 0)]).compressed(layer_compression)])
            .tag("big:latest")
            .env(&["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]);
        write(&tmp, &Build::new(Format::DockerLegacy).whole(whole), &[img]);
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
        fs::rename(&tmp, &out).unwrap();
    }
    Some(out)
}

/// One case's directory: world-writable, with TMPDIR inside it.
struct Case {
    dir: tempfile::TempDir,
    tmp: PathBuf,
}

impl Case {
    fn new() -> Case {
        let dir = scratch();
        let tmp = subdir(dir.path(), "tmp");
        Case { dir, tmp }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn script(&self, body: &str) -> PathBuf {
        script(self.dir.path(), "s.sh", body)
    }

    /// Names in the case directory (temp files beside outputs show here).
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    /// Nothing left: no temp file in TMPDIR, nothing beside the outputs
    /// but `expected`, no process that uses the case's files.
    fn assert_clean(&self, expected: &[&str], run: &Run) {
        assert_empty_dir(&self.tmp);
        let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(self.names(), want, "only these files beside the outputs: {run:?}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = processes_using(self.dir.path());
            if left.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "processes left running: {left:?}\n{run:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `pid: cmdline` of every process whose command line names `dir`.
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()) && e.file_name().to_string_lossy() != me.as_str())
        .filter_map(|e| {
            let c = fs::read(e.path().join("cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(&needle).then(|| format!("{}: {c}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// A run in progress, its stderr collected as it comes.
struct Running {
    child: Child,
    stderr: Arc<(Mutex<String>, Condvar)>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(args: &[&str], case: &Case) -> Running {
        Running::spawn(runasroot_cmd(args, &case.tmp))
    }

    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let mut pipe = child.stderr.take().unwrap();
        let stderr = Arc::new((Mutex::new(String::new()), Condvar::new()));
        let shared = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                shared.0.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                shared.1.notify_all();
            }
        });
        Running { child, stderr, reader: Some(reader) }
    }

    /// Waits until stderr shows `marker` (a phase line of -v).
    fn wait_for(&mut self, marker: &str, within: Duration) {
        let give_up = Instant::now() + within;
        let mut text = self.stderr.0.lock().unwrap();
        while !text.contains(marker) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("runasroot ended ({status}) before {marker:?}:\n{text}");
            }
            assert!(Instant::now() < give_up, "no {marker:?} within {within:?}:\n{text}");
            text = self.stderr.1.wait_timeout(text, Duration::from_millis(50)).unwrap().0;
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child (setpriv execs runasroot, so
        // the pid is runasroot's).
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for the end (at most `within`), returns the run.
    fn finish(mut self, within: Duration) -> Run {
        let give_up = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > give_up {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("runasroot did not end within {within:?}:\n{}", self.stderr.0.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.reader.take().unwrap().join().unwrap();
        let stderr = self.stderr.0.lock().unwrap().clone();
        Run { code: status.code().unwrap_or(-1), stdout: Vec::new(), stderr }
    }
}

/// The phases, the -v line that says each began, and the words of the
/// message that names it.
struct Phase {
    name: &'static str,
    marker: &'static str,
}

const READ: Phase = Phase { name: "reading and verifying the base image", marker: "] reading and verifying the base image" };
const BOOT: Phase = Phase { name: "booting the guest", marker: "] booting the guest" };
const SCRIPT: Phase = Phase { name: "running the script", marker: "] running the script" };
const PACK: Phase = Phase { name: "packing the new layer", marker: "] packing the new layer" };
const ASSEMBLE: Phase = Phase { name: "writing the new image", marker: "] writing the new image" };

/// A script whose new layer is 300 MiB: packing and assembling take seconds.
const BIG_LAYER_SCRIPT: &str = "dd if=/dev/zero of=/big bs=1M count=300 2>/dev/null\n";

/// SIGINT then SIGTERM at `phase` of a run on `base` with `script`:
/// each ends with its status, a message naming the signal and the phase,
/// no output and nothing left behind.
fn signal_at(phase: &Phase, base: &Path, script_body: &str, extra: &[&str]) {
    for (sig, code, name) in [(libc::SIGINT, 130, "SIGINT"), (libc::SIGTERM, 143, "SIGTERM")] {
        let case = Case::new();
        let s = case.script(script_body);
        let out = case.path("out.tar");
        let layer = case.path("layer.tar");
        let mut args = vec!["-v", "--base", base.to_str().unwrap(), "--script", s.to_str().unwrap()];
        args.extend(["-o", out.to_str().unwrap(), "--layer-output", layer.to_str().unwrap(), "--timeout", "600"]);
        args.extend_from_slice(extra);
        let mut running = Running::start(&args, &case);
        running.wait_for(phase.marker, Duration::from_secs(300));
        running.signal(sig);
        let at = Instant::now();
        let run = running.finish(STOP_WITHIN);
        println!("{name} while {} ended in {:?}", phase.name, at.elapsed());
        assert_eq!(run.code, code, "{name} while {}: {run:?}", phase.name);
        let want = format!("interrupted by {name} while {}", phase.name);
        assert!(run.stderr.contains(&want), "the message says {want:?}: {run:?}");
        assert!(run.stderr.contains("nothing was written"), "{run:?}");
        case.assert_clean(&["s.sh", "tmp"], &run);
    }
}

#[test]
fn signals_while_reading_the_base() {
    let Some(base) = slow_to_read() else { return };
    signal_at(&READ, &base, "true\n", &[]);
}

#[test]
fn signals_while_booting() {
    let base = busybox_base();
    signal_at(&BOOT, &base, "true\n", &[]);
}

#[test]
fn signals_while_the_script_runs() {
    let base = busybox_base();
    signal_at(&SCRIPT, &base, "sleep 600\n", &[]);
}

#[test]
fn signals_while_packing() {
    let base = busybox_base();
    signal_at(&PACK, &base, BIG_LAYER_SCRIPT, &[]);
}

#[test]
fn signals_while_assembling_the_image() {
    let base = busybox_base();
    signal_at(&ASSEMBLE, &base, BIG_LAYER_SCRIPT, &["--compress", "gzip"]);
}

/// --timeout counts from the start: it stops the preparation of the
/// lower and the script alike. The lower is held up deterministically:
/// "another run" (this test) holds the cache lock of its gzipped layer,
/// as a run decompressing the same layer does, for as long as it takes.
#[test]
fn timeout_while_preparing_the_lower_and_while_the_script_runs() {
    let Some(slow) = slow_to_prepare() else { return };
    let busybox = busybox_base();
    let cases: [(&Path, &str, &str, &str); 2] =
        [(&slow, "true\n", "3s", "indexing the base"), (&busybox, "sleep 600\n", "25s", "running the script")];
    for (base, body, limit, phase) in cases {
        let case = Case::new();
        let s = case.script(body);
        let out = case.path("out.tar");
        let cache = subdir(case.dir.path(), "cache");
        let spool = subdir(&cache, "spool");
        let gzipped = tar_members(base).into_iter().find(|(_, b)| b.starts_with(&[0x1f, 0x8b])).map(|(_, b)| sha256_hex(&b));
        let _held = gzipped.map(|hex| {
            let lock = spool.join(format!("{hex}.lock"));
            let f = fs::File::create(&lock).unwrap();
            fs::set_permissions(&lock, fs::Permissions::from_mode(0o666)).unwrap();
            // SAFETY: flock(2) on a file this test owns.
            assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) }, 0);
            f
        });
        let start = Instant::now();
        let args = ["-v", "--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap(), "--timeout", limit];
        let mut cmd = runasroot_cmd(&args, &case.tmp);
        cmd.env("RUNASROOT_CACHE", &cache);
        let run = finish(cmd.output().unwrap());
        let took = start.elapsed();
        assert_eq!(run.code, 124, "{run:?}");
        let want = format!("--timeout {limit} expired while {phase}");
        assert!(run.stderr.contains(&want), "the message says {want:?}: {run:?}");
        assert!(run.stderr.contains("raise --timeout"), "{run:?}");
        let limit_s: u64 = limit.trim_end_matches('s').parse().unwrap();
        assert!(took < Duration::from_secs(limit_s) + STOP_WITHIN, "stopped in {took:?}");
        let spooling: Vec<_> = fs::read_dir(&spool).unwrap().map(|e| e.unwrap().file_name()).filter(|n| !n.to_string_lossy().ends_with(".lock")).collect();
        assert!(spooling.is_empty(), "no cache entry, whole or half: {spooling:?}");
        case.assert_clean(&["cache", "s.sh", "tmp"], &run);
    }
}

/// SIGINT while a cached layer is checked (its entry read, parsed and
/// hashed as the lower is prepared): the run stops, and the entry, which
/// is sound, stays in the cache (it was taken for a damaged one and
/// removed).
#[test]
fn a_signal_while_reading_the_cache_keeps_its_entries() {
    let Some(base) = slow_to_prepare() else { return };
    let case = Case::new();
    let cache = subdir(case.dir.path(), "cache");
    let s = case.script("true\n");
    let out = case.path("out.tar");
    let args = ["-v", "--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap()];
    let with_cache = || {
        let mut cmd = runasroot_cmd(&args, &case.tmp);
        cmd.env("RUNASROOT_CACHE", &cache);
        cmd
    };
    let first = Running::spawn(with_cache()).finish(Duration::from_secs(300));
    assert_eq!(first.code, 0, "{first:?}");
    fs::remove_file(&out).unwrap();
    let entries = || -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(cache.join("spool"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tar") && !n.starts_with('.'))
            .collect();
        v.sort();
        v
    };
    let cached = entries();
    assert_eq!(cached.len(), 1, "the gzipped layer was decompressed into the cache: {cached:?}");

    let mut second = Running::spawn(with_cache());
    second.wait_for("] indexing the base", Duration::from_secs(120));
    second.signal(libc::SIGINT);
    let run = second.finish(STOP_WITHIN);
    assert_eq!(run.code, 130, "{run:?}");
    assert!(run.stderr.contains("interrupted by SIGINT while indexing the base"), "{run:?}");
    assert!(!run.stderr.contains("corrupted entries made anew"), "{run:?}");
    assert_eq!(entries(), cached, "the cache entry is kept");
    let spool: Vec<_> = fs::read_dir(cache.join("spool")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(spool.iter().all(|n| !n.to_string_lossy().starts_with(".new-")), "no half-written entry: {spool:?}");
    case.assert_clean(&["cache", "s.sh", "tmp"], &run);
}

/// The backstop: a step that never looks at the stop (here opening a
/// base that is a FIFO nobody writes, which blocks in open(2)) is cut
/// short GRACE (3 s) after SIGTERM: the same status, a message naming
/// the phase, nothing left behind.
#[test]
fn a_step_that_does_not_stop_is_cut_short() {
    let case = Case::new();
    let fifo = case.path("base.tar");
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o666) }, 0);
    fs::set_permissions(&fifo, fs::Permissions::from_mode(0o666)).unwrap();
    let s = case.script("true\n");
    let out = case.path("out.tar");
    let mut running = Running::start(&["-v", "--base", fifo.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap()], &case);
    running.wait_for(READ.marker, Duration::from_secs(60));
    // The run is inside open(2) now, or about to be.
    std::thread::sleep(Duration::from_millis(300));
    running.signal(libc::SIGTERM);
    let at = Instant::now();
    let run = running.finish(STOP_WITHIN);
    let took = at.elapsed();
    assert_eq!(run.code, 143, "{run:?}");
    let want = "error: interrupted by SIGTERM while reading and verifying the base image (the step did not stop within 3s): removed the temporary files and exited; nothing was written";
    assert!(run.stderr.contains(want), "{want:?} in {run:?}");
    assert!(took >= Duration::from_millis(2900), "the backstop waited its grace period, not {took:?}");
    case.assert_clean(&["base.tar", "s.sh", "tmp"], &run);
}

/// QEMU killed from outside while the script runs: a clear error naming
/// the signal, 125, nothing written or left.
#[test]
fn qemu_killed_from_outside() {
    let case = Case::new();
    let s = case.script("sleep 600\n");
    let out = case.path("out.tar");
    let base = busybox_base();
    let mut running = Running::start(&["-v", "--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap()], &case);
    running.wait_for(SCRIPT.marker, Duration::from_secs(300));
    let qemu: Vec<i32> = processes_using(&case.tmp)
        .iter()
        .filter(|p| p.contains("qemu-system"))
        .map(|p| p.split(':').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(qemu.len(), 1, "one QEMU for the run");
    // SAFETY: kill(2) of the QEMU process found above.
    assert_eq!(unsafe { libc::kill(qemu[0], libc::SIGKILL) }, 0);
    let run = running.finish(STOP_WITHIN);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("QEMU was killed by signal 9 (SIGKILL)"), "{run:?}");
    case.assert_clean(&["s.sh", "tmp"], &run);
}

/// An output directory nobody may write to, or on a read-only file
/// system: refused at once, before any guest boots.
#[test]
fn an_unwritable_output_directory_fails_before_the_guest_runs() {
    if !is_root() {
        skip("mounting a read-only file system needs root");
        return;
    }
    let case = Case::new();
    let s = case.script("true\n");
    let base = busybox_base();
    let locked = case.path("locked");
    fs::create_dir(&locked).unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o555)).unwrap();
    let ro = case.path("ro");
    fs::create_dir(&ro).unwrap();
    let _mount = Mount::tmpfs(&ro, "ro,size=1m,mode=0777");
    for dir in [&locked, &ro] {
        let out = dir.join("out.tar");
        let start = Instant::now();
        let run = runasroot(&["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap()], &case.tmp);
        assert_eq!(run.code, 125, "{run:?}");
        let want = format!("cannot write {}: no file can be created in its directory {}", out.display(), dir.display());
        assert!(run.stderr.contains(&want), "{want:?} in {run:?}");
        assert!(start.elapsed() < Duration::from_secs(10), "no guest was booted");
        assert_eq!(fs::read_dir(dir).unwrap().count(), 0);
        assert_empty_dir(&case.tmp);
    }
}

/// The output's file system fills up while the image is written: the
/// error names the path and the cause; nothing is left on it.
#[test]
fn a_full_output_file_system() {
    if !is_root() {
        skip("mounting a small tmpfs needs root");
        return;
    }
    let case = Case::new();
    let s = case.script("echo hello > /greeting\n");
    let base = busybox_base();
    let small = case.path("small");
    fs::create_dir(&small).unwrap();
    // Less than the busybox base: the image cannot fit.
    let _mount = Mount::tmpfs(&small, "size=512k,mode=0777");
    let out = small.join("out.tar");
    let layer = small.join("layer.tar");
    let run = runasroot(&["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap(), "--layer-output", layer.to_str().unwrap()], &case.tmp);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains(&out.display().to_string()), "names the output: {run:?}");
    assert!(run.stderr.contains("No space left on device"), "names the cause: {run:?}");
    let left: Vec<_> = fs::read_dir(&small).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "nothing left on the full file system (not even the layer: both or neither): {left:?}");
    case.assert_clean(&["s.sh", "small", "tmp"], &run);
}

/// The output path is replaced while the script runs: by a directory
/// (the image cannot take its place: a clear error, the directory kept)
/// or by a symlink (replaced itself; what it pointed at is untouched).
#[test]
fn the_output_path_replaced_during_the_run() {
    let base = busybox_base();
    for replacement in ["a directory", "a symlink"] {
        let case = Case::new();
        let s = case.script("sleep 2\n");
        let out = case.path("out.tar");
        fs::write(&out, b"old output").unwrap();
        fs::set_permissions(&out, fs::Permissions::from_mode(0o666)).unwrap();
        let mut running = Running::start(&["-v", "--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap()], &case);
        running.wait_for(SCRIPT.marker, Duration::from_secs(300));
        fs::remove_file(&out).unwrap();
        let elsewhere = case.path("elsewhere");
        if replacement == "a directory" {
            fs::create_dir(&out).unwrap();
            fs::write(out.join("keep"), b"mine").unwrap();
        } else {
            fs::write(&elsewhere, b"not an image").unwrap();
            std::os::unix::fs::symlink(&elsewhere, &out).unwrap();
        }
        let run = running.finish(Duration::from_secs(300));
        if replacement == "a directory" {
            assert_eq!(run.code, 125, "{run:?}");
            let want = format!("cannot move the finished output into place at {}", out.display());
            assert!(run.stderr.contains(&want), "{want:?} in {run:?}");
            assert!(run.stderr.contains("Is a directory"), "{run:?}");
            assert_eq!(fs::read(out.join("keep")).unwrap(), b"mine", "the directory is kept");
            case.assert_clean(&["out.tar", "s.sh", "tmp"], &run);
        } else {
            assert_eq!(run.code, 0, "{run:?}");
            assert!(fs::symlink_metadata(&out).unwrap().is_file(), "the symlink was replaced by the image");
            assert!(tar_members(&out).iter().any(|(name, _)| name == "manifest.json"), "a whole image");
            assert_eq!(fs::read(&elsewhere).unwrap(), b"not an image", "the symlink's target is untouched");
            case.assert_clean(&["elsewhere", "out.tar", "s.sh", "tmp"], &run);
        }
    }
}

/// Two runs write the same -o at once: the file is one run's complete
/// image (every digest checks, the layer is one run's), never a mix.
#[test]
fn two_runs_writing_the_same_output() {
    let case = Case::new();
    let base = busybox_base();
    let out = case.path("out.tar");
    let mut runs = Vec::new();
    for who in ["A", "B"] {
        let s = script(case.dir.path(), &format!("{who}.sh"), &format!("echo {who} > /who\n{BIG_LAYER_SCRIPT}"));
        let layer = case.path(&format!("layer-{who}.tar"));
        let args = ["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap(), "--layer-output", layer.to_str().unwrap()];
        let running = Running::start(&args, &case);
        runs.push((who, layer, running));
    }
    let mut layers = Vec::new();
    for (who, layer, running) in runs {
        let run = running.finish(Duration::from_secs(400));
        assert_eq!(run.code, 0, "run {who}: {run:?}");
        layers.push((who, sha256_file(&layer)));
    }
    // runasroot itself reads the image back, verifying every digest.
    let flat = case.path("flat.tar");
    ok(runasroot(&["export", "--base", out.to_str().unwrap(), "-o", flat.to_str().unwrap()], &case.tmp));
    let who = tar_members(&flat).into_iter().find(|(n, _)| n == "who").map(|(_, b)| String::from_utf8(b).unwrap()).expect("/who");
    let manifest = tar_members(&out).into_iter().find(|(n, _)| n == "manifest.json").unwrap().1;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let last = manifest[0]["Layers"].as_array().unwrap().last().unwrap().as_str().unwrap().to_string();
    let winner = layers.iter().find(|(w, _)| format!("{w}\n") == who).expect("/who names a run");
    assert!(last.contains(&winner.1), "the image's new layer {last} is run {}'s ({})", winner.0, winner.1);
    fs::remove_file(&flat).unwrap();
    case.assert_clean(&["A.sh", "B.sh", "layer-A.tar", "layer-B.tar", "out.tar", "tmp"], &Run { code: 0, stdout: vec![], stderr: String::new() });
}

/// A tmpfs mounted for a test, unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, options: &str) -> Mount {
        let status = Command::new("mount").args(["-t", "tmpfs", "-o", options, "tmpfs"]).arg(at).status().unwrap();
        assert!(status.success(), "mount -t tmpfs -o {options} {}", at.display());
        Mount(at.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
