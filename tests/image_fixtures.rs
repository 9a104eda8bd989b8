//! The test fixtures themselves, checked with real clients: an image the
//! fixture writes must be one skopeo and umoci read (and a corrupt one must
//! be one they refuse), or every test built on it proves nothing.

#[path = "common/images.rs"]
mod images;

use std::path::Path;
use std::process::Command;

use images::*;

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

fn skopeo(args: &[&str]) -> (bool, String) {
    let out = Command::new("skopeo").args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn transport(build: &Build, path: &Path) -> String {
    match build.format {
        Format::DockerLegacy | Format::DockerHybrid => format!("docker-archive:{}", path.display()),
        Format::OciDir => format!("oci:{}", path.display()),
        Format::OciArchive => format!("oci-archive:{}", path.display()),
    }
}


#[test]
fn skopeo_reads_every_fixture_format_and_copies_it_verified() {
    if !have("skopeo") {
        println!("SKIPPED: skopeo is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for build in all_builds().into_iter().filter(|b| b.whole == Whole::None) {
        for b in [build, if build.format == Format::DockerLegacy { build.symlinked_layers() } else { build }] {
            let path = tmp.path().join(format!("{}{}", if b.symlinked_layers { "sym-" } else { "" }, file_name(&b)));
            let built = write(&path, &b, &[sample_image()]);
            let t = transport(&b, &path);
            let (ok, out) = skopeo(&["inspect", &t]);
            assert!(ok, "skopeo inspect {t}: {out}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["Env"], serde_json::json!(["A=b"]), "{t}");
            assert_eq!(v["Layers"].as_array().unwrap().len(), 4, "{t}");
            // skopeo names docker-archive layers by diff_id, OCI ones by
            // their stored digest.
            if matches!(b.format, Format::OciDir | Format::OciArchive) {
                let want: Vec<&str> = built.images[0].layer_digests.iter().map(String::as_str).collect();
                assert_eq!(v["Layers"], serde_json::json!(want), "{t}");
            }
            // A copy verifies every blob digest and (from docker-archive)
            // every diff_id.
            let dest = tmp.path().join(format!("copy-{}", path.file_name().unwrap().to_string_lossy()));
            let (ok, out) = skopeo(&["copy", "--quiet", &t, &format!("oci:{}:x", dest.display())]);
            assert!(ok, "skopeo copy {t}: {out}");
        }
    }
}

#[test]
fn skopeo_refuses_corrupt_fixtures() {
    if !have("skopeo") {
        println!("SKIPPED: skopeo is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (Format::OciArchive, Corrupt::LayerBlob(1)),
        (Format::OciArchive, Corrupt::ConfigDigest),
        (Format::DockerHybrid, Corrupt::LayerBlob(0)),
        (Format::DockerLegacy, Corrupt::DiffId(0)),
    ];
    for (n, (format, corrupt)) in cases.into_iter().enumerate() {
        let b = Build::new(format).corrupt(corrupt);
        let path = tmp.path().join(format!("{n}-{}", file_name(&b)));
        write(&path, &b, &[sample_image()]);
        let mut t = transport(&b, &path);
        if format == Format::DockerHybrid {
            // Through manifest.json skopeo checks diff_ids only; the OCI
            // side of a hybrid archive is where blob digests live.
            t = format!("oci-archive:{}", path.display());
        }
        let dest = tmp.path().join(format!("copy-{n}"));
        let (ok, out) = skopeo(&["copy", "--quiet", &t, &format!("oci:{}:x", dest.display())]);
        assert!(!ok, "skopeo accepted {corrupt:?} in {t}");
        println!("{corrupt:?} in {format:?}: skopeo says: {}", out.trim());
    }
}

#[test]
fn corruptions_skopeo_does_not_check_are_really_there() {
    // skopeo 1.9 reads an OCI manifest without checking its digest, so
    // check this corruption directly.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("oci");
    let built = write(&path, &Build::new(Format::OciDir).corrupt(Corrupt::ManifestDigest), &[sample_image()]);
    let named = built.images[0].manifest_digest.clone().unwrap();
    let hex = named.strip_prefix("sha256:").unwrap();
    let bytes = std::fs::read(path.join("blobs/sha256").join(hex)).unwrap();
    assert_ne!(sha256_hex(&bytes), hex);
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(path.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], serde_json::json!(named));

    // Nor does it check that a legacy config's bytes hash to its name.
    let path = tmp.path().join("legacy.tar");
    let built = write(&path, &Build::new(Format::DockerLegacy).corrupt(Corrupt::ConfigDigest), &[sample_image()]);
    let named = built.images[0].config_digest.strip_prefix("sha256:").unwrap().to_string();
    let members = tar_members(&path);
    let (_, config) = members.iter().find(|(n, _)| *n == format!("{named}.json")).unwrap();
    assert_ne!(sha256_hex(config), named);
}

#[test]
fn umoci_unpacks_the_oci_fixture_with_whiteouts_applied() {
    if !have("umoci") || !nix_is_root() {
        println!("SKIPPED: umoci raw unpack needs umoci and root here");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("oci");
    let img = image(vec![
        layer(vec![dir("etc"), file("etc/passwd", "root\n"), dir("var"), file("var/old", "o")]),
        layer(vec![whiteout("etc/passwd"), dir("var"), opaque("var"), file("var/new", "n")]).gzip(),
    ])
    .tag("t");
    write(&layout, &Build::new(Format::OciDir), &[img]);
    let root = tmp.path().join("root");
    let out = Command::new("umoci")
        .args(["raw", "unpack", "--image", &format!("{}:t", layout.display())])
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "umoci: {}", String::from_utf8_lossy(&out.stderr));
    assert!(root.join("etc").is_dir());
    assert!(!root.join("etc/passwd").exists());
    assert!(!root.join("var/old").exists());
    assert_eq!(std::fs::read(root.join("var/new")).unwrap(), b"n");
}

#[test]
fn busybox_base_runs_its_shell() {
    let Some(entries) = busybox_entries() else {
        println!("SKIPPED: {BUSYBOX} (Debian's busybox-static) is not installed");
        return;
    };
    let names: Vec<String> = entries.iter().map(|e| String::from_utf8_lossy(&e.path).into_owned()).collect();
    for want in ["bin/busybox", "bin/sh", "etc/passwd", "tmp", "root"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
    let tmp = entries.iter().find(|e| e.path == b"tmp").unwrap();
    assert_eq!(tmp.mode, 0o1777);
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}
