//! Tier 2, issue 4 "Inputs": every input format runasroot reads, through
//! the real binary (unprivileged) and the real guest under QEMU.
//!
//! Each format carries the same image: busybox, a gzip layer, a zstd layer
//! that whites out a file of the gzip one, and the gzip layer listed again
//! on top (so the whited-out file comes back: the second listing really is
//! applied). A probe script records what it sees; the new layer and the
//! `-o` image (base layers byte for byte, diff_ids) are checked. Then:
//! skopeo-style prefixes, `--from-image`, multi-platform indexes, corrupt
//! blobs and diff_ids (error names the layer and both digests, nothing
//! written), and a base of 131 layers checked with skopeo and umoci.

mod common;
#[path = "common/images.rs"]
mod images;
mod helpers;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;
use helpers::*;
use images::*;

/// Records the merged /fmt and the image's identity.
const PROBE: &str = "#!/bin/sh -e\n{ ls /fmt | tr '\\n' ' '; echo; cat /which; } > /seen\n";

fn busybox_layer() -> Option<Layer> {
    Some(layer(busybox_entries()?))
}

/// The image every input format carries (see the module doc).
fn formats_image() -> Option<Image> {
    Some(
        image(vec![
            busybox_layer()?,
            layer(vec![dir("fmt"), file("fmt/one", "1\n"), file("fmt/gone", "g\n"), file("which", "formats\n")]).gzip(),
            layer(vec![whiteout("fmt/gone"), file("fmt/two", "2\n")]).zstd(),
        ])
        .listing(vec![0, 1, 2, 1])
        .tag("formats:1"),
    )
}

/// A small image naming itself in /which.
fn probe_image(which: &str, tag: Option<&str>) -> Option<Image> {
    let img = image(vec![busybox_layer()?, layer(vec![dir("fmt"), file("fmt/one", "1\n"), file("which", format!("{which}\n"))])]);
    Some(match tag {
        Some(t) => img.tag(t),
        None => img,
    })
}

struct Probe {
    run: Run,
    seen: Option<String>,
    layer: Option<Vec<u8>>,
    image: Option<std::path::PathBuf>,
}

/// Runs the probe on `base` (an argument to --base) with `extra` flags.
fn probe(dir: &Path, base: &str, extra: &[&str]) -> Probe {
    let tmp = subdir(dir, "tmp");
    let s = script(dir, "probe.sh", PROBE);
    let layer = dir.join("layer.tar");
    let img = dir.join("img.tar");
    let _ = fs::remove_file(&layer);
    let _ = fs::remove_file(&img);
    let mut args = vec!["--base", base, "--script", s.to_str().unwrap(), "-o", img.to_str().unwrap(), "--layer-output", layer.to_str().unwrap()];
    args.extend_from_slice(extra);
    let run = runasroot(&args, &tmp);
    assert_empty_dir(&tmp);
    let layer = fs::read(&layer).ok();
    let seen = layer.as_ref().and_then(|l| {
        let p = dir.join("layer-copy.tar");
        fs::write(&p, l).unwrap();
        tar_members(&p).into_iter().find(|(n, _)| n == "seen").map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
    });
    Probe { run, seen, layer, image: img.exists().then_some(img) }
}

/// The probe succeeded, saw `want`, and its layer is exactly `seen`.
fn assert_saw(p: Probe, want: &str) -> Probe {
    let p = Probe { run: ok(p.run), ..p };
    assert_eq!(p.seen.as_deref(), Some(want), "what the script saw");
    assert_eq!(listing(p.layer.as_ref().unwrap()), vec![format!("seen file 644 0:0 {}", want.len())]);
    p
}

/// The `-o` image: the base's layers byte for byte (digests and diff_ids,
/// the repeated listing included), then the new layer.
fn assert_base_kept(p: &Probe, built: &BuiltImage, dir: &Path) {
    let out = OutImage::open(p.image.as_ref().expect("-o written"), dir);
    let n = built.layer_digests.len();
    assert_eq!(out.layers.len(), n + 1);
    let got: Vec<&str> = out.layers[..n].iter().map(|l| l.digest.as_str()).collect();
    let want: Vec<&str> = built.layer_digests.iter().map(String::as_str).collect();
    assert_eq!(got, want, "base layers byte for byte");
    let mut diff_ids = built.diff_ids.clone();
    diff_ids.push(format!("sha256:{}", sha256_hex(p.layer.as_ref().unwrap())));
    assert_eq!(out.diff_ids(), diff_ids);
    assert_eq!(&out.new_layer(), p.layer.as_ref().unwrap());
}

fn check_format(build: Build) {
    let Some(img) = formats_image() else {
        skip("busybox-static is missing");
        return;
    };
    let dir = scratch();
    let path = dir.path().join(file_name(&build));
    let built = write(&path, &build, &[img]);
    let p = probe(dir.path(), path.to_str().unwrap(), &[]);
    // gone came back with the second listing of the gzip layer.
    let p = assert_saw(p, "gone one two \nformats\n");
    assert_base_kept(&p, &built.images[0], dir.path());
}

macro_rules! format_tests {
    ($($name:ident: $build:expr;)*) => {$(
        #[test]
        fn $name() {
            check_format($build);
        }
    )*};
}

format_tests! {
    docker_archive_legacy: Build::new(Format::DockerLegacy);
    docker_archive_legacy_symlinked_layers: Build::new(Format::DockerLegacy).symlinked_layers();
    docker_archive_legacy_gzip_whole: Build::new(Format::DockerLegacy).whole(Whole::Gzip);
    docker_archive_legacy_zstd_whole: Build::new(Format::DockerLegacy).whole(Whole::Zstd);
    docker_archive_hybrid: Build::new(Format::DockerHybrid);
    docker_archive_hybrid_gzip_whole: Build::new(Format::DockerHybrid).whole(Whole::Gzip);
    oci_dir: Build::new(Format::OciDir);
    oci_archive: Build::new(Format::OciArchive);
    oci_archive_gzip_whole: Build::new(Format::OciArchive).whole(Whole::Gzip);
}

/// An archive with two images, `first:1` then `second:2`.
fn two_images(dir: &Path, build: Build) -> Option<Built> {
    let images = [probe_image("first", Some("first:1"))?, probe_image("second", Some("second:2"))?];
    Some(write(&dir.join(file_name(&build)), &build, &images))
}

#[test]
fn docker_archive_prefix_and_the_default_first_image() {
    let dir = scratch();
    let Some(built) = two_images(dir.path(), Build::new(Format::DockerHybrid)) else { return };
    let base = format!("docker-archive:{}", built.path.display());
    assert_saw(probe(dir.path(), &base, &[]), "one \nfirst\n");
}

#[test]
fn oci_dir_prefix_with_a_reference() {
    let dir = scratch();
    let Some(built) = two_images(dir.path(), Build::new(Format::OciDir)) else { return };
    let base = format!("oci:{}:second:2", built.path.display());
    assert_saw(probe(dir.path(), &base, &[]), "one \nsecond\n");
}

#[test]
fn oci_archive_prefix_with_a_reference() {
    let dir = scratch();
    let Some(built) = two_images(dir.path(), Build::new(Format::OciArchive)) else { return };
    let base = format!("oci-archive:{}:second:2", built.path.display());
    assert_saw(probe(dir.path(), &base, &[]), "one \nsecond\n");
}

#[test]
fn from_image_selects_in_a_multi_image_archive() {
    let dir = scratch();
    let Some(built) = two_images(dir.path(), Build::new(Format::DockerLegacy)) else { return };
    assert_saw(probe(dir.path(), built.path.to_str().unwrap(), &["--from-image", "second:2"]), "one \nsecond\n");
}

#[test]
fn an_unknown_image_name_lists_what_the_archive_holds() {
    let dir = scratch();
    let Some(built) = two_images(dir.path(), Build::new(Format::DockerHybrid)) else { return };
    let p = probe(dir.path(), built.path.to_str().unwrap(), &["--from-image", "nope:0"]);
    assert_eq!(p.run.code, 125, "{:?}", p.run);
    for name in ["nope:0", "first:1", "second:2"] {
        assert!(p.run.stderr.contains(name), "the message names {name}: {:?}", p.run);
    }
    assert!(p.layer.is_none() && p.image.is_none(), "nothing written");
}

/// An OCI index of two platforms, arm64 listed first.
fn multi_platform(dir: &Path) -> Option<Built> {
    let arm = probe_image("arm64", None)?.platform("linux", "arm64", Some("v8"));
    let amd = probe_image("amd64", None)?;
    Some(write_multi_platform(&dir.join("multi.tar"), &Build::new(Format::OciArchive), Some("multi:1"), &[arm, amd]))
}

#[test]
fn a_multi_platform_index_picks_linux_amd64() {
    let dir = scratch();
    let Some(built) = multi_platform(dir.path()) else { return };
    assert_saw(probe(dir.path(), built.path.to_str().unwrap(), &[]), "one \namd64\n");
}

#[test]
fn platform_selects_another_entry_of_the_index() {
    let dir = scratch();
    let Some(built) = multi_platform(dir.path()) else { return };
    // The "arm64" image carries the x86 busybox of the fixtures: only the
    // selection is under test here.
    assert_saw(probe(dir.path(), built.path.to_str().unwrap(), &["--platform", "linux/arm64/v8"]), "one \narm64\n");
}

#[test]
fn an_unknown_platform_lists_the_platforms() {
    let dir = scratch();
    let Some(built) = multi_platform(dir.path()) else { return };
    let p = probe(dir.path(), built.path.to_str().unwrap(), &["--platform", "linux/s390x"]);
    assert_eq!(p.run.code, 125, "{:?}", p.run);
    for name in ["linux/s390x", "linux/amd64", "linux/arm64"] {
        assert!(p.run.stderr.contains(name), "the message names {name}: {:?}", p.run);
    }
    assert!(p.layer.is_none() && p.image.is_none(), "nothing written");
}

/// The path of listed layer `i` of a legacy docker-archive, and its stored bytes.
fn legacy_layer(built: &Built, i: usize) -> (String, Vec<u8>) {
    let members = tar_members(&built.path);
    let m: serde_json::Value =
        serde_json::from_slice(&members.iter().find(|(n, _)| n == "manifest.json").unwrap().1).unwrap();
    let name = m[0]["Layers"][i].as_str().unwrap().to_string();
    let bytes = members.into_iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("{name} in the archive")).1;
    (name, bytes)
}

/// The digest the (corrupt) OCI manifest claims for listed layer `i`.
fn claimed_layer_digest(built: &Built, i: usize) -> String {
    let members = tar_members(&built.path);
    let get = |name: &str| members.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name}")).1.clone();
    let index: serde_json::Value = serde_json::from_slice(&get("index.json")).unwrap();
    let m = index["manifests"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let manifest: serde_json::Value = serde_json::from_slice(&get(&format!("blobs/sha256/{m}"))).unwrap();
    manifest["layers"][i]["digest"].as_str().unwrap().to_string()
}

/// Exit 125, the message names the layer (by index or by its name in the
/// archive) and both digests, nothing written.
fn assert_refused(p: &Probe, layer_index: usize, layer_name: &str, digests: [&str; 2]) {
    assert_eq!(p.run.code, 125, "{:?}", p.run);
    assert!(
        p.run.stderr.contains(&format!("layer {layer_index}")) || p.run.stderr.contains(layer_name),
        "the message names layer {layer_index} ({layer_name}): {:?}",
        p.run
    );
    for d in digests {
        assert!(p.run.stderr.contains(d), "the message names {d}: {:?}", p.run);
    }
    assert!(p.layer.is_none() && p.image.is_none(), "nothing written");
}

#[test]
fn a_corrupt_layer_blob_names_the_layer_and_both_digests() {
    let Some(img) = formats_image() else { return };
    let dir = scratch();
    let built = write(&dir.path().join("corrupt.tar"), &Build::new(Format::OciArchive).corrupt(Corrupt::LayerBlob(1)), &[img]);
    let claimed = claimed_layer_digest(&built, 1);
    // The fixture records the digest of the bytes it really stored.
    let actual = built.images[0].layer_digests[1].clone();
    assert_ne!(claimed, actual);
    let p = probe(dir.path(), built.path.to_str().unwrap(), &[]);
    assert_refused(&p, 1, &format!("blobs/sha256/{}", claimed.trim_start_matches("sha256:")), [&claimed, &actual]);
}

#[test]
fn a_corrupt_diff_id_names_the_layer_and_both_digests() {
    let Some(img) = formats_image() else { return };
    let dir = scratch();
    // Legacy archives name no blob digest: only the diff_id (of the gzip
    // layer, after decompression) can catch this.
    let built = write(&dir.path().join("corrupt.tar"), &Build::new(Format::DockerLegacy).corrupt(Corrupt::DiffId(1)), &[img]);
    let claimed = built.images[0].diff_ids[1].clone();
    let (name, stored) = legacy_layer(&built, 1);
    let actual = format!("sha256:{}", sha256_hex(&decompress(stored)));
    assert_ne!(claimed, actual);
    let p = probe(dir.path(), built.path.to_str().unwrap(), &[]);
    assert_refused(&p, 1, &name, [&claimed, &actual]);
}

/// 1 busybox layer + 130 layers: more than the classic lowerdir string
/// and nixpkgs (16) allow, more than Docker (125) loads.
const DEEP: usize = 130;

#[test]
fn a_base_of_131_layers_checked_with_skopeo_and_umoci() {
    let Some(bb) = busybox_layer() else { return };
    let mut layers = vec![bb, layer(vec![dir("fmt"), file("fmt/one", "1\n"), file("which", "deep\n"), dir("deep")])];
    for k in 2..=DEEP {
        let mut entries = vec![file(format!("deep/{k:03}"), format!("{k}\n")), file("deep/top", format!("{k}\n"))];
        // Every tenth layer whites out what the one before added.
        if k % 10 == 0 {
            entries.push(whiteout(format!("deep/{:03}", k - 1)));
        }
        // Plain and gzip only: umoci 0.4.7, which checks the result, has no zstd.
        layers.push(layer(entries).compressed(if k % 2 == 0 { Compression::None } else { Compression::Gzip }));
    }
    let dir = scratch();
    let built = write(&dir.path().join("deep.tar"), &Build::new(Format::OciArchive), &[image(layers).tag("deep:1")]);
    assert_eq!(built.images[0].layer_digests.len(), DEEP + 1);

    let tmp = subdir(dir.path(), "tmp");
    let s = script(dir.path(), "deep.sh", "{ ls /deep | wc -l; cat /deep/top; cat /deep/129 2>&1 || true; } > /seen\n");
    let out = dir.path().join("out.tar");
    let run = runasroot(&["--base", built.path.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap(), "--format", "oci-archive"], &tmp);
    ok(run);
    let img = OutImage::open(&out, dir.path());
    assert_eq!(img.layers.len(), DEEP + 2);
    let layer = img.new_layer();
    // 129 numbered files (002..130) less 13 whited out (009, 019, …, 129), plus top.
    let want = "117\n130\ncat: can't open '/deep/129': No such file or directory\n";
    assert_eq!(listing(&layer), vec![format!("seen file 644 0:0 {}", want.len())]);

    if have("skopeo") {
        let v: serde_json::Value = serde_json::from_str(&skopeo(&["inspect", &format!("oci-archive:{}", out.display())])).unwrap();
        assert_eq!(v["Layers"].as_array().unwrap().len(), DEEP + 2, "skopeo sees every layer");
        let copy = dir.path().join("copy");
        skopeo(&["copy", &format!("oci-archive:{}", out.display()), &format!("oci:{}:deep", copy.display())]);
        if !is_root() {
            skip("umoci raw unpack needs root to restore owners");
        } else if have("umoci") {
            let rootfs = dir.path().join("rootfs");
            must(Command::new("umoci").args(["raw", "unpack", "--image"]).arg(format!("{}:deep", copy.display())).arg(&rootfs));
            assert_eq!(fs::read_to_string(rootfs.join("seen")).unwrap(), want, "umoci applies all {} layers", DEEP + 2);
            assert_eq!(fs::read_to_string(rootfs.join("deep/top")).unwrap(), format!("{DEEP}\n"));
            assert_eq!(fs::read_dir(rootfs.join("deep")).unwrap().count(), 117);
        }
    }
    eprintln!("note: docker load not tried: Docker refuses images deeper than 125 layers");
}
