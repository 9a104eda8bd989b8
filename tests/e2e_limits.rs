//! Tier 2, issue 4 "In the guest": running out of scratch space
//! (`--disk-size`), of memory (`--memory`, a guest OOM) or of time
//! (`--timeout`) gives an error naming the flag that raises the limit, and
//! no partial output (neither `-o` nor `--layer-output`, no temp file).

mod common;
#[path = "common/images.rs"]
mod images;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use images::*;

/// Runs `body` on a busybox base with both outputs asked for; asserts
/// nothing was written and returns the run.
fn limited(body: &str, limits: &[&str]) -> Option<Run> {
    let Some(img) = busybox_image() else {
        skip("busybox-static is missing");
        return None;
    };
    let dir = scratch();
    let base = dir.path().join("base.tar");
    write(&base, &Build::new(Format::DockerHybrid), &[img]);
    let tmp = subdir(dir.path(), "tmp");
    let s = script(dir.path(), "s.sh", body);
    let out = dir.path().join("out.tar");
    let layer = dir.path().join("layer.tar");
    let mut args = vec!["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap(), "--layer-output", layer.to_str().unwrap()];
    args.extend_from_slice(limits);
    let run = runasroot(&args, &tmp);
    assert!(!out.exists() && !layer.exists(), "no partial output: {run:?}");
    assert_empty_dir(&tmp);
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left.len(), 3, "nothing beside base, script and tmp: {left:?}");
    assert!(Path::new(&base).exists());
    Some(run)
}

#[test]
fn filling_the_scratch_space_names_disk_size() {
    // 200 MiB into a 64 MiB scratch.
    let Some(run) = limited("dd if=/dev/zero of=/big bs=1M count=200\n", &["--disk-size", "64"]) else { return };
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("  fix: raise --disk-size (now 64 MiB)\n"), "the message names the flag: {run:?}");
    assert_eq!(run.stderr.matches("--disk-size").count(), 1, "the host alone says which flag, once: {run:?}");
}

#[test]
fn a_guest_oom_names_memory() {
    // 64 MB strings, each touched, until the OOM killer fires: more than
    // the guest's RAM and swap (the scratch space) together within a few
    // of them (small allocations took minutes under a loaded TCG).
    let hog = "awk 'BEGIN { s = sprintf(\"%32000000s\", \"\"); while (1) a[i++] = s s i }'\n";
    let Some(run) = limited(hog, &["--memory", "128", "--disk-size", "16", "--timeout", "10m"]) else { return };
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("  fix: raise --memory (now 128 MiB)\n"), "the message names the flag: {run:?}");
    assert_eq!(run.stderr.matches("--memory").count(), 1, "the host alone says which flag, once: {run:?}");
}

#[test]
fn an_oom_kill_the_script_survives_is_a_warning_naming_memory() {
    let Some(img) = busybox_image() else {
        skip("busybox-static is missing");
        return;
    };
    let dir = scratch();
    let base = dir.path().join("base.tar");
    write(&base, &Build::new(Format::DockerHybrid), &[img]);
    let tmp = subdir(dir.path(), "tmp");
    // Four 80 MiB buffers filled at once (more than RAM and swap
    // together; one 300 MiB malloc would just fail): the OOM killer fires
    // within seconds, and the script exits 0 anyway.
    let s = script(dir.path(), "s.sh", "for i in 1 2 3 4; do dd if=/dev/zero of=/dev/null bs=80M count=1 & done\nwait\n");
    let layer = dir.path().join("layer.tar");
    let args = ["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "--layer-output", layer.to_str().unwrap()];
    let run = runasroot(&[&args[..], &["--memory", "128", "--disk-size", "64", "--timeout", "10m"]].concat(), &tmp);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains(
            "runasroot: warning: the guest's OOM killer killed a process the script started (the script still exited 0); \
             raise --memory (now 128 MiB) if that matters"
        ),
        "{run:?}"
    );
    assert!(layer.exists());
    assert_empty_dir(&tmp);
}

#[test]
fn timeout_names_the_flag_and_writes_nothing() {
    let start = Instant::now();
    let Some(run) = limited("sleep 600\n", &["--timeout", "10s"]) else { return };
    assert_eq!(run.code, 124, "{run:?}");
    assert!(run.stderr.contains("--timeout"), "the message names the flag: {run:?}");
    assert!(start.elapsed() < Duration::from_secs(90), "stopped in time");
}
