//! Tier 2: the base served in place (issue 8), through the real binary.
//! The host writes the merged base as an EROFS image over the layers' own
//! bytes; the guest mounts it and unpacks nothing. So:
//! * a base far larger than guest RAM and scratch works;
//! * an uncompressed docker-archive is never copied on the host;
//! * compressed layers are decompressed once into the cache, checked on
//!   every use, rebuilt when damaged, shared by concurrent runs;
//! * however many files hold the layers (OCI blobs, spooled layers), the
//!   guest reads them all through one disk and exports what the host
//!   engine exports;
//! * a base file that changes during a run fails the run.

mod common;
#[path = "common/images.rs"]
mod images;

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use images::{busybox_entries, dir, file, image, layer, layer_tar, write, Build, Format};
use sha2::{Digest, Sha256};

const BIG: u64 = 4 << 30;
const MARKER: &[u8] = b"the end of the base\n";

/// A tar header for `path` (ustar, numeric ids).
fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> [u8; 512] {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1);
    h.set_cksum();
    *h.as_bytes()
}

/// A docker-archive (legacy) whose second layer holds a 4 GiB file of
/// zeros (stored as a hole: the archive is sparse on disk) followed by
/// `end/marker`; the first layer is busybox, for the script's shell.
/// Built once and shared.
fn big_base() -> Option<PathBuf> {
    let entries = busybox_entries()?;
    let path = world_readable_dir("fixtures").join("big-base-v1.tar");
    if path.exists() {
        return Some(path);
    }
    let bb = layer_tar(&entries);
    // The big layer: header, 4 GiB hole, end/, end/marker, end blocks.
    let big_head = header("big", tar::EntryType::Regular, BIG, 0o644);
    let mut tail = Vec::new();
    tail.extend_from_slice(&header("end/", tar::EntryType::Directory, 0, 0o755));
    tail.extend_from_slice(&header("end/marker", tar::EntryType::Regular, MARKER.len() as u64, 0o644));
    let mut data = MARKER.to_vec();
    data.resize(512, 0);
    tail.extend_from_slice(&data);
    tail.extend_from_slice(&[0u8; 1024]);
    let big_len = 512 + BIG + tail.len() as u64;
    let mut h = Sha256::new();
    h.update(big_head);
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..BIG / zeros.len() as u64 {
        h.update(&zeros);
    }
    h.update(&tail);
    let big_diff = format!("sha256:{}", hex(&h.finalize()));
    let bb_diff = format!("sha256:{}", hex(&Sha256::digest(&bb)));
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2001-09-09T01:46:40Z",
        "config": {}, "rootfs": {"type": "layers", "diff_ids": [bb_diff, big_diff]},
        "history": [{"created_by": "busybox"}, {"created_by": "big"}],
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_name = format!("{}.json", hex(&Sha256::digest(&config)));
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": config_name, "RepoTags": ["big:latest"], "Layers": ["a/layer.tar", "b/layer.tar"],
    }]))
    .unwrap();

    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    let f = File::create(&tmp).unwrap();
    let mut at = 0u64;
    let mut member = |name: &str, len: u64, write: &mut dyn FnMut(&File, u64)| {
        f.write_all_at(&header(name, tar::EntryType::Regular, len, 0o644), at).unwrap();
        write(&f, at + 512);
        at += 512 + len.next_multiple_of(512);
    };
    member("manifest.json", manifest.len() as u64, &mut |f, o| f.write_all_at(&manifest, o).unwrap());
    member(&config_name, config.len() as u64, &mut |f, o| f.write_all_at(&config, o).unwrap());
    member("a/layer.tar", bb.len() as u64, &mut |f, o| f.write_all_at(&bb, o).unwrap());
    member("b/layer.tar", big_len, &mut |f, o| {
        f.write_all_at(&big_head, o).unwrap();
        f.write_all_at(&tail, o + 512 + BIG).unwrap();
    });
    f.set_len(at + 1024).unwrap();
    drop(f);
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
    fs::rename(&tmp, &path).unwrap();
    Some(path)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_base_far_larger_than_guest_ram_and_scratch_works() {
    let Some(base) = big_base() else {
        skip("busybox-static is missing");
        return;
    };
    assert!(fs::metadata(&base).unwrap().blocks() * 512 < 64 << 20, "the fixture is sparse on disk");
    let d = scratch();
    let tmp = subdir(d.path(), "tmp");
    let s = script(
        d.path(),
        "s.sh",
        "cat /end/marker > /result\n\
         tail -c 3 /big | od -An -tx1 >> /result\n\
         ls -l /big | awk '{print $5}' >> /result\n",
    );
    let layer = d.path().join("layer.tar");
    let run = ok(runasroot(
        &["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "--memory", "256", "--disk-size", "64", "--layer-output", layer.to_str().unwrap(), "-v"],
        &tmp,
    ));
    assert_empty_dir(&tmp);
    let mut a = tar::Archive::new(File::open(&layer).unwrap());
    let mut result = None;
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if &*e.path_bytes() == b"result" {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            result = Some(s);
        }
    }
    assert_eq!(result.as_deref(), Some("the end of the base\n 00 00 00\n4294967296\n"), "{run:?}");
}

/// Mounts a small tmpfs (root only), unmounted on drop.
struct SmallTmpfs {
    dir: tempfile::TempDir,
}

impl SmallTmpfs {
    fn mount(mib: u64) -> Option<SmallTmpfs> {
        if !is_root() {
            skip("mounting a small tmpfs needs root");
            return None;
        }
        let dir = tempfile::Builder::new().prefix("rar-tmpfs-").tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m,mode=1777"), "rar-small", dir.path().to_str().unwrap()])
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Some(SmallTmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn uncompressed_layers_are_not_copied_on_the_host() {
    let Some(bb) = busybox_entries() else {
        skip("busybox-static is missing");
        return;
    };
    let d = scratch();
    // 48 MiB of layer data, with 8 MiB for TMPDIR and the cache together:
    // a docker-archive (layers inside the archive) and an OCI layout (a
    // file per blob) both run in place.
    let data: Vec<u8> = (0..48u32 << 20).map(|i| (i % 251) as u8).collect();
    let img = image(vec![layer(bb), layer(vec![dir("data"), file("data/blob", data.clone())])]);
    let Some(small) = SmallTmpfs::mount(8) else { return };
    let want = format!("{}\n", hex(&Sha256::digest(&data)));
    for (format, name) in [(Format::DockerLegacy, "base.tar"), (Format::OciDir, "base-oci")] {
        let base = write(&d.path().join(name), &Build::new(format), std::slice::from_ref(&img)).path;
        let s = script(d.path(), "s.sh", "sha256sum /data/blob | cut -d' ' -f1 > /sum\n");
        let layer_out = d.path().join("layer.tar");
        let run = finish(
            runasroot_cmd(&["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "--layer-output", layer_out.to_str().unwrap(), "-v"], small.path())
                .env("RUNASROOT_CACHE", small.path().join("cache"))
                .output()
                .unwrap(),
        );
        let run = ok(run);
        assert!(run.stderr.contains("decompressed 0.0 MiB now, 0 layers from the cache"), "{format:?}: {run:?}");
        let sum = tar_member(&layer_out, "sum");
        assert_eq!(String::from_utf8(sum).unwrap(), want, "{format:?}");
    }
}

/// One member of a tar file.
fn tar_member(path: &Path, name: &str) -> Vec<u8> {
    let mut a = tar::Archive::new(File::open(path).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if &*e.path_bytes() == name.as_bytes() {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut v).unwrap();
            return v;
        }
    }
    panic!("{name} not in {}", path.display());
}

/// A docker-archive of busybox plus `n` gzip layers with distinct files.
fn gzip_base(at: &Path, n: usize) -> Option<PathBuf> {
    let bb = busybox_entries()?;
    let mut layers = vec![layer(bb).gzip()];
    for i in 0..n {
        let body: Vec<u8> = (0..(200_000 + i * 1000)).map(|j| ((i * 7 + j) % 253) as u8).collect();
        layers.push(layer(vec![dir(format!("l{i}")), file(format!("l{i}/data"), body)]).gzip());
    }
    Some(write(&at.join("gz.tar"), &Build::new(Format::DockerLegacy), &[image(layers)]).path)
}

/// One run with the cache at `cache`; returns (stderr, layer bytes).
fn cached_run(base: &Path, cache: &Path, at: &Path, name: &str) -> (String, Vec<u8>) {
    let tmp = subdir(at, &format!("tmp-{name}"));
    let s = script(at, &format!("s-{name}.sh"), "cat /l0/data /l1/data | sha256sum > /sums\n");
    let out = at.join(format!("{name}.tar"));
    let run = finish(
        runasroot_cmd(&["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "--layer-output", out.to_str().unwrap(), "-v"], &tmp)
            .env("RUNASROOT_CACHE", cache)
            .output()
            .unwrap(),
    );
    let run = ok(run);
    assert_empty_dir(&tmp);
    (run.stderr, fs::read(&out).unwrap())
}

/// The cache's entries: name → (inode, mtime).
fn entries(cache: &Path) -> Vec<(String, u64, i64)> {
    let mut v: Vec<_> = fs::read_dir(cache.join("spool"))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tar"))
        .map(|e| {
            let m = e.metadata().unwrap();
            (e.file_name().to_string_lossy().into_owned(), m.ino(), m.mtime_nsec() + m.mtime() * 1_000_000_000)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn compressed_layers_are_decompressed_once_checked_on_reuse_and_rebuilt_when_damaged() {
    let d = scratch();
    let Some(base) = gzip_base(d.path(), 2) else {
        skip("busybox-static is missing");
        return;
    };
    let cache = subdir(d.path(), "cache");
    let (first, out1) = cached_run(&base, &cache, d.path(), "first");
    assert!(first.contains(", 0 layers from the cache\n"), "{first}");
    assert!(!first.contains("decompressed 0.0 MiB now"), "{first}");
    let made = entries(&cache);
    assert_eq!(made.len(), 3, "one entry per gzip layer: {made:?}");

    let (second, out2) = cached_run(&base, &cache, d.path(), "second");
    assert!(second.contains("decompressed 0.0 MiB now, 3 layers from the cache\n"), "{second}");
    assert_eq!(entries(&cache), made, "no entry was written again");
    assert_eq!(out1, out2);

    // Damage one entry: it is found out, made anew, and the run succeeds.
    let victim = cache.join("spool").join(&made[1].0);
    let f = fs::OpenOptions::new().write(true).open(&victim).unwrap();
    f.write_all_at(b"X", 1000).unwrap();
    drop(f);
    let (third, out3) = cached_run(&base, &cache, d.path(), "third");
    assert!(third.contains("2 layers from the cache (1 corrupted entries made anew)"), "{third}");
    assert_eq!(out1, out3);
    assert_eq!(entries(&cache).len(), 3);
}

#[test]
fn concurrent_runs_share_one_cache() {
    let d = scratch();
    let Some(base) = gzip_base(d.path(), 2) else {
        skip("busybox-static is missing");
        return;
    };
    let cache = subdir(d.path(), "cache");
    let outs: Vec<(String, Vec<u8>)> = std::thread::scope(|s| {
        let runs: Vec<_> = ["a", "b"].iter().map(|n| s.spawn(|| cached_run(&base, &cache, d.path(), n))).collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(outs[0].1, outs[1].1);
    assert_eq!(entries(&cache).len(), 3);
    let no_temp: Vec<_> = fs::read_dir(cache.join("spool")).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().starts_with(".new-")).collect();
    assert!(no_temp.is_empty(), "{no_temp:?}");
}

#[test]
fn many_layer_files_on_one_disk_export_the_same_bytes() {
    // Seven spool files (--no-cache), each a device of the lower image,
    // all behind it on one disk. The in-VM export must equal the host's.
    let d = scratch();
    let Some(base) = gzip_base(d.path(), 6) else {
        skip("busybox-static is missing");
        return;
    };
    let mut outs = Vec::new();
    for engine in ["host", "in-vm"] {
        let tmp = subdir(d.path(), &format!("tmp-{engine}"));
        let out = d.path().join(format!("{engine}.tar"));
        let mut args = vec!["export", "--no-cache", "--base", base.to_str().unwrap(), "-o", out.to_str().unwrap(), "-v"];
        if engine == "in-vm" {
            args.extend(["--in-vm", "--vmm", "qemu"]);
        }
        let run = ok(runasroot(&args, &tmp));
        if engine == "in-vm" {
            assert!(run.stderr.contains("7 layers, ") && run.stderr.contains(", 7 devices;"), "{run:?}");
        }
        assert_empty_dir(&tmp);
        outs.push(fs::read(&out).unwrap());
    }
    assert!(outs[0] == outs[1], "host and in-VM exports differ");
}

#[test]
fn a_base_that_changes_during_the_run_fails_it() {
    let Some(bb) = busybox_entries() else {
        skip("busybox-static is missing");
        return;
    };
    let d = scratch();
    let base = write(&d.path().join("base.tar"), &Build::new(Format::DockerLegacy), &[image(vec![layer(bb)])]).path;
    fs::set_permissions(&base, fs::Permissions::from_mode(0o666)).unwrap();
    let tmp = subdir(d.path(), "tmp");
    let s = script(d.path(), "s.sh", "sleep 4\n");
    let out = d.path().join("out.tar");
    let child = runasroot_cmd(&["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap()], &tmp)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // Written in place while the guest runs (same size, same inode).
    let f = fs::OpenOptions::new().read(true).write(true).open(&base).unwrap();
    let mut first = [0u8; 1];
    f.read_exact_at(&mut first, 100).unwrap();
    f.write_all_at(&first, 100).unwrap();
    drop(f);
    let run = finish(child.wait_with_output().unwrap());
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("changed on disk while runasroot used it"), "{run:?}");
    assert!(!out.exists());
    assert_empty_dir(&tmp);
}
