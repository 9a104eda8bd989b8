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
    assert!(run.stderr.contains("--disk-size"), "the message names the flag: {run:?}");
}

#[test]
fn a_guest_oom_names_memory() {
    // Small allocations, each touched, until the OOM killer fires: more
    // than the guest's RAM and swap (the scratch space) together.
    let hog = "awk 'BEGIN { while (1) a[i++] = sprintf(\"%0200d\", i) }'\n";
    let Some(run) = limited(hog, &["--memory", "128", "--disk-size", "64", "--timeout", "10m"]) else { return };
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("--memory"), "the message names the flag: {run:?}");
}

#[test]
fn timeout_names_the_flag_and_writes_nothing() {
    let start = Instant::now();
    let Some(run) = limited("sleep 600\n", &["--timeout", "10s"]) else { return };
    assert_eq!(run.code, 124, "{run:?}");
    assert!(run.stderr.contains("--timeout"), "the message names the flag: {run:?}");
    assert!(start.elapsed() < Duration::from_secs(90), "stopped in time");
}
