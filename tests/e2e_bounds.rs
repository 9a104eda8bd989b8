//! Tier 2, no VM: the host's resource bounds through the real binary
//! (`runasroot export`, the host engine). A hostile image must not make
//! the host allocate without bound or fill its disk: each case ends with
//! exit status 125, a message naming the layer (or archive) and the
//! bound, no output and nothing left in TMPDIR or the cache.
//!
//! The disk-filling cases run the binary in a user and mount namespace
//! (`unshare`) whose TMPDIR is a fresh 64 MiB tmpfs, so "the disk" is
//! small; where unprivileged namespaces are off they say so and skip.

mod common;
#[path = "common/images.rs"]
mod images;

use std::path::Path;
use std::process::Command;

use common::*;
use images::*;

/// A gzip layer that decompresses to 256 MiB of zeros (~250 KiB stored).
fn bomb_layer() -> Layer {
    layer(vec![big_file("zeros", 256 << 20, 0)]).gzip()
}

/// Whether this host lets us make a user and mount namespace with a
/// tmpfs in it (unprivileged user namespaces).
fn have_tmpfs_namespace() -> bool {
    let ok = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip("unshare cannot make a user and mount namespace with a tmpfs here (unprivileged user namespaces off?)");
    }
    ok
}

/// Runs `runasroot ARGS` in a fresh user and mount namespace where `tmp`
/// is a 64 MiB tmpfs (its TMPDIR, and `cache` under it when asked);
/// returns the run and every path left in the tmpfs afterwards.
fn in_small_tmpfs(tmp: &Path, with_cache: bool, args: &[&str]) -> (Run, Vec<String>) {
    let script = r#"
        mount -t tmpfs -o size=64m tmpfs "$TMPDIR" || exit 99
        if [ "$WITH_CACHE" = 1 ]; then export RUNASROOT_CACHE="$TMPDIR/cache"; fi
        "$@"
        code=$?
        find "$TMPDIR" -mindepth 1 -printf '%P\n' | sort > "$LEFT"
        exit $code
    "#;
    let left = tmp.with_extension("left");
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", bin()])
        .args(args)
        .env("TMPDIR", tmp)
        .env("LEFT", &left)
        .env("WITH_CACHE", if with_cache { "1" } else { "0" })
        .env_remove("RUNASROOT_CACHE")
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("run unshare");
    let run = finish(out);
    let left = std::fs::read_to_string(&left).unwrap_or_default().lines().map(str::to_string).collect();
    (run, left)
}

#[test]
fn a_gzip_bomb_layer_stops_before_the_spool_fills_and_leaves_nothing() {
    if !have_tmpfs_namespace() {
        return;
    }
    let dir = scratch();
    let base = dir.path().join("bomb.tar");
    write(&base, &Build::new(Format::DockerLegacy), &[image(vec![bomb_layer()])]);
    let out = dir.path().join("out.tar");
    for with_cache in [false, true] {
        let tmp = subdir(dir.path(), &format!("tmp-{with_cache}"));
        let mut args = vec!["export", "--base", base.to_str().unwrap(), "-o", out.to_str().unwrap()];
        if !with_cache {
            args.push("--no-cache");
        }
        let (run, left) = in_small_tmpfs(&tmp, with_cache, &args);
        assert_eq!(run.code, 125, "{run:?}");
        // The layer, what it needed at least, where, how much was free.
        // The cache's spool directory, or the run's own one in TMPDIR.
        let spool = if with_cache { format!("{}/cache/spool ", tmp.display()) } else { format!("{}/runasroot-", tmp.display()) };
        assert!(run.stderr.contains("layer 0 ("), "{run:?}");
        assert!(run.stderr.contains(") decompresses to more than "), "{run:?}");
        assert!(run.stderr.contains(&format!(" MiB, and {spool}")), "{run:?}");
        assert!(run.stderr.contains("runasroot leaves 3.2 MiB of it to the rest of the system"), "{run:?}");
        assert!(!out.exists(), "no output");
        // No spool or pending cache entry; the cache keeps its lock files.
        let junk: Vec<&String> = left.iter().filter(|p| !p.ends_with(".lock") && *p != "cache" && *p != "cache/spool").collect();
        assert!(junk.is_empty(), "left behind: {junk:?}");
    }
}

#[test]
fn an_archive_gzipped_whole_stops_before_tmpdir_fills() {
    if !have_tmpfs_namespace() {
        return;
    }
    let dir = scratch();
    let base = dir.path().join("bomb.tar.gz");
    let plain = image(vec![layer(vec![big_file("zeros", 256 << 20, 0)])]);
    write(&base, &Build::new(Format::DockerLegacy).whole(Whole::Gzip), &[plain]);
    let out = dir.path().join("out.tar");
    let tmp = subdir(dir.path(), "tmp");
    let (run, left) = in_small_tmpfs(&tmp, false, &["export", "--base", base.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains(&format!("{} (gzip) decompresses to more than ", base.display())), "{run:?}");
    assert!(run.stderr.contains("point TMPDIR at a filesystem with room for the uncompressed archive"), "{run:?}");
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!out.exists(), "no output");
}

#[test]
fn a_layer_with_a_huge_pax_header_is_refused_before_it_is_read() {
    // A 64 MiB xattr is a 64 MiB PAX header, which the tar crate would
    // read into memory whole; gzip makes it 64 KiB.
    let dir = scratch();
    let base = dir.path().join("pax.tar");
    let entry = file("big-xattr", "x").xattr("user.big", vec![b'a'; 64 << 20]);
    write(&base, &Build::new(Format::DockerLegacy), &[image(vec![layer(vec![entry]).gzip()])]);
    let tmp = subdir(dir.path(), "tmp");
    let out = dir.path().join("out.tar");
    let run = runasroot(&["export", "--base", base.to_str().unwrap(), "-o", out.to_str().unwrap(), "--no-cache"], &tmp);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("cannot read layer 0 ("), "{run:?}");
    assert!(run.stderr.contains("is a PAX extended header of 671"), "{run:?}");
    assert!(run.stderr.contains("bytes, more than the 1048576 runasroot reads"), "{run:?}");
    assert_empty_dir(&tmp);
    assert!(!out.exists());
}

#[test]
fn an_image_of_more_layers_than_any_runtime_stacks_is_refused() {
    let dir = scratch();
    let base = dir.path().join("deep.tar");
    let img = image(vec![layer(vec![file("f", "x")])]).listing(vec![0; 501]);
    write(&base, &Build::new(Format::DockerLegacy), &[img]);
    let tmp = subdir(dir.path(), "tmp");
    let out = dir.path().join("out.tar");
    let run = runasroot(&["export", "--base", base.to_str().unwrap(), "-o", out.to_str().unwrap()], &tmp);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("manifest.json lists 501 layers, more than the 500 runasroot reads"), "{run:?}");
    assert_empty_dir(&tmp);
    assert!(!out.exists());
}
