//! Tier 2: the walking skeleton end to end — the real binary, our kernel
//! and guest-init, through QEMU (TCG where there is no hardware
//! virtualisation), run as an unprivileged user on a busybox-static base.

mod common;

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

fn layer_run(script_body: &str, extra: &[&str]) -> (Run, Option<Vec<u8>>, tempfile::TempDir) {
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let s = script(dir.path(), "script.sh", script_body);
    let layer = dir.path().join("layer.tar");
    let base = busybox_base();
    let mut args = vec!["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "--layer-output", layer.to_str().unwrap()];
    args.extend_from_slice(extra);
    let run = runasroot(&args, &tmp);
    assert_empty_dir(&tmp);
    let bytes = fs::read(&layer).ok();
    (run, bytes, dir)
}

#[test]
fn chown_whiteout_and_opaque_dir_land_in_the_layer() {
    let (run, layer, _d) = layer_run(SKELETON_SCRIPT, &[]);
    ok(run);
    assert_eq!(listing(&layer.unwrap()), skeleton_layer());
}

#[test]
fn a_script_that_changes_nothing_yields_an_empty_layer() {
    let (run, layer, _d) = layer_run("true\n", &[]);
    ok(run);
    let layer = layer.unwrap();
    assert_eq!(listing(&layer), Vec::<String>::new());
    assert_eq!(layer.len(), 1024, "an empty tar is two zero blocks");
}

#[test]
fn exit_code_comes_back_and_nothing_is_written() {
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let s = script(dir.path(), "fail.sh", "echo from-the-script; exit 42\n");
    let out = dir.path().join("out.tar");
    fs::write(&out, b"previous").unwrap();
    fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let base = busybox_base();
    let run = runasroot(&["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap()], &tmp);
    assert_eq!(run.code, 42, "{run:?}");
    assert!(run.stderr.contains("from-the-script"), "script output is forwarded: {run:?}");
    assert_eq!(fs::read(&out).unwrap(), b"previous");
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3, "no temp file beside the output");
    assert_empty_dir(&tmp);
}

#[test]
fn a_leftover_daemon_does_not_hang_the_run() {
    let start = Instant::now();
    let (run, layer, _d) = layer_run("sleep 1000 &\n(while true; do sleep 1; done) &\necho done\n", &["--timeout", "120"]);
    ok(run);
    assert_eq!(listing(&layer.unwrap()), Vec::<String>::new());
    assert!(start.elapsed() < Duration::from_secs(100));
}

#[test]
fn outputs_are_byte_identical_across_cwd_umask_and_tz() {
    let dir = scratch();
    let s = script(dir.path(), "s.sh", "mkdir -p /data/sub && echo x > /data/sub/f && chown -R 1000:1000 /data && rm /etc/passwd\n");
    let base = busybox_base();
    let mut outputs = Vec::new();
    for (i, (umask, tz)) in [("0022", "UTC"), ("0077", "Asia/Tokyo")].iter().enumerate() {
        let tmp = subdir(dir.path(), &format!("tmp{i}"));
        let cwd = subdir(dir.path(), &format!("cwd{i}"));
        let img = dir.path().join(format!("img{i}.tar"));
        let layer = dir.path().join(format!("layer{i}.tar"));
        let cmd = runasroot_cmd(
            &["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", img.to_str().unwrap(), "--layer-output", layer.to_str().unwrap()],
            &tmp,
        );
        // umask is a process attribute: set it through a shell around the command.
        let program = cmd.get_program().to_owned();
        let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
        let mut shell = std::process::Command::new("sh");
        shell
            .arg("-c")
            .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
            .arg(program)
            .args(args)
            .current_dir(&cwd)
            .env("TMPDIR", &tmp)
            .env("TZ", tz)
            .env_remove("SOURCE_DATE_EPOCH")
            .stdin(Stdio::null());
        ok(finish(shell.output().unwrap()));
        outputs.push((fs::read(&img).unwrap(), fs::read(&layer).unwrap()));
    }
    assert!(outputs[0].0 == outputs[1].0, "-o differs between runs");
    assert!(outputs[0].1 == outputs[1].1, "--layer-output differs between runs");
    assert!(mtimes(&outputs[0].1).iter().all(|&m| m == 1), "every new entry gets the epoch (1)");
}

#[test]
fn timeout_gives_124_and_no_output() {
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let s = script(dir.path(), "s.sh", "sleep 600\n");
    let out = dir.path().join("out.tar");
    let base = busybox_base();
    let start = Instant::now();
    let run = runasroot(&["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap(), "--timeout", "8s"], &tmp);
    assert_eq!(run.code, 124, "{run:?}");
    assert!(run.stderr.contains("--timeout"), "the message names the flag: {run:?}");
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(!out.exists());
    assert_empty_dir(&tmp);
}

#[test]
fn a_guest_that_panics_gives_a_clear_error() {
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let s = script(dir.path(), "s.sh", "true\n");
    // An initramfs without /init: the kernel finds no init and panics.
    let bogus = dir.path().join("bogus.cpio");
    fs::write(&bogus, b"070701this is not a valid cpio archive").unwrap();
    fs::set_permissions(&bogus, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = dir.path().join("out.tar");
    let base = busybox_base();
    let run = runasroot(
        &["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap(), "--initramfs", bogus.to_str().unwrap(), "--timeout", "120"],
        &tmp,
    );
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("panic"), "names the panic: {run:?}");
    assert!(!out.exists());
    assert_empty_dir(&tmp);
}

#[test]
fn ctrl_c_stops_the_guest_and_leaves_nothing_behind() {
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let s = script(dir.path(), "s.sh", "echo script-started; sleep 600\n");
    let out = dir.path().join("out.tar");
    let base = busybox_base();
    let mut child = runasroot_cmd(&["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap()], &tmp)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        loop {
            use std::io::Read;
            match stderr.read(&mut buf) {
                Ok(0) | Err(_) => return seen,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
    // Wait until the script runs (its output reaches our stderr).
    let start = Instant::now();
    while !qemu_running_for(&tmp) || start.elapsed() < Duration::from_secs(1) {
        assert!(start.elapsed() < Duration::from_secs(120), "guest never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    std::thread::sleep(Duration::from_millis(500));
    assert!(!qemu_running_for(&tmp), "QEMU left running");
    assert!(!out.exists());
    assert_empty_dir(&tmp);
}

/// Whether a QEMU process uses files under `tmp`.
fn qemu_running_for(tmp: &Path) -> bool {
    let needle = tmp.to_string_lossy().into_owned();
    fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()).any(|e| {
        fs::read(e.path().join("cmdline"))
            .map(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                c.contains("qemu-system") && c.contains(&needle)
            })
            .unwrap_or(false)
    })
}

#[test]
fn bad_paths_fail_at_once_naming_the_path() {
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let s = script(dir.path(), "s.sh", "true\n");
    let base = busybox_base();
    let missing_script = dir.path().join("nope.sh");
    let missing_dir = dir.path().join("no/such/dir/out.tar");
    let cases: [(Vec<&str>, String); 3] = [
        (vec!["--base", base.to_str().unwrap(), "--script", missing_script.to_str().unwrap(), "-o", "-"], missing_script.display().to_string()),
        (vec!["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", missing_dir.to_str().unwrap()], "does not exist".into()),
        (vec!["--base", "/no/such/base.tar", "--script", s.to_str().unwrap(), "-o", "-"], "/no/such/base.tar".into()),
    ];
    for (args, needle) in cases {
        let start = Instant::now();
        let run = runasroot(&args, &tmp);
        assert_eq!(run.code, 125, "{run:?}");
        assert!(run.stderr.contains(&needle), "expected {needle:?} in {run:?}");
        assert!(run.stdout.is_empty());
        assert!(start.elapsed() < Duration::from_secs(5), "no guest should boot for a bad path");
        assert_empty_dir(&tmp);
    }
}

#[test]
fn two_vcpus_give_the_same_bytes_as_one() {
    // With a second vCPU the guest reads and hashes layers in a thread
    // beside the unpacker: the result must not change.
    let (one, l1, _d1) = layer_run(SKELETON_SCRIPT, &["--cpus", "1"]);
    let (two, l2, _d2) = layer_run(SKELETON_SCRIPT, &["--cpus", "2"]);
    ok(one);
    ok(two);
    assert_eq!(listing(l2.as_ref().unwrap()), skeleton_layer());
    assert!(l1 == l2, "--cpus 2 changed the layer");
}

#[test]
fn a_usage_error_exits_125_like_any_runasroot_failure() {
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let run = runasroot(&["--no-such-flag"], &tmp);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("--no-such-flag"), "{run:?}");
    let run = runasroot(&["--help"], &tmp);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(String::from_utf8_lossy(&run.stdout).contains("--script"));
}
