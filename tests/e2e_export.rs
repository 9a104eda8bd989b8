//! Tier 2: `runasroot export`, both engines through the real binary. The
//! host streaming engine (default) and the in-VM engine (`--in-vm`, the
//! merged overlay view tarred by guest-init) must write the same bytes on
//! every test image; `export --script` runs a script first (through the VM).

mod common;
#[path = "common/images.rs"]
mod images;

use std::fs;
use std::path::Path;

use common::*;

/// Exports `base` with both engines; asserts identical bytes; returns them.
fn export_both(base: &Path, extra_env: &[(&str, &str)]) -> Vec<u8> {
    let dir = scratch();
    let mut outs = Vec::new();
    for engine in ["host", "in-vm"] {
        let tmp = subdir(dir.path(), &format!("tmp-{engine}"));
        let out = dir.path().join(format!("{engine}.tar"));
        let mut args = vec!["export", "--base", base.to_str().unwrap(), "-o", out.to_str().unwrap()];
        if engine == "in-vm" {
            args.extend(["--in-vm", "--memory", "768", "--timeout", "300"]);
        }
        let mut cmd = runasroot_cmd(&args, &tmp);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        ok(finish(cmd.output().unwrap()));
        assert_empty_dir(&tmp);
        outs.push(fs::read(&out).unwrap());
    }
    if outs[0] != outs[1] {
        let (h, v) = (listing(&outs[0]), listing(&outs[1]));
        let only_host: Vec<_> = h.iter().filter(|l| !v.contains(l)).collect();
        let only_vm: Vec<_> = v.iter().filter(|l| !h.contains(l)).collect();
        panic!("host and in-VM exports differ\nonly host: {only_host:#?}\nonly in-VM: {only_vm:#?}");
    }
    outs.pop().unwrap()
}

fn build(dir: &Path, name: &str, format: images::Format, img: images::Image) -> std::path::PathBuf {
    let path = dir.join(name);
    images::write(&path, &images::Build::new(format), &[img]);
    let _ = std::process::Command::new("chmod").args(["-R", "a+rX"]).arg(&path).status();
    path
}

#[test]
fn engines_agree_on_the_rich_image_in_docker_and_oci_inputs() {
    let dir = scratch();
    for (name, format) in [("rich-docker.tar", images::Format::DockerLegacy), ("rich-oci", images::Format::OciDir)] {
        let base = build(dir.path(), name, format, images::rich_export_image());
        let bytes = export_both(&base, &[]);
        let l = listing(&bytes);
        // Spot checks of the merge rules on top of the byte identity.
        assert!(!l.iter().any(|e| e.contains(".wh.")), "no whiteouts in an export: {l:#?}");
        assert!(!l.iter().any(|e| e.starts_with("etc/gone file 644 0:0 3 ")), "whited-out then re-added");
        assert!(l.iter().any(|e| e.starts_with("was-dir file")), "a dir replaced by a file: {l:#?}");
        assert!(!l.iter().any(|e| e.starts_with("was-dir/")), "no children below a replaced dir");
        assert!(l.iter().any(|e| e.starts_with("was-file/ dir 750")), "a file replaced by a dir");
        assert!(!l.iter().any(|e| e.starts_with("var/cache/old")), "opaque dir hides lower contents");
    }
}

#[test]
fn engines_agree_with_source_date_epoch_clamp() {
    let dir = scratch();
    let base = build(dir.path(), "rich.tar", images::Format::DockerHybrid, images::rich_export_image());
    let bytes = export_both(&base, &[("SOURCE_DATE_EPOCH", "1000")]);
    assert!(mtimes(&bytes).iter().all(|&m| m <= 1000));
}

#[test]
fn engines_agree_on_20_and_130_layers() {
    let dir = scratch();
    for n in [20, 130] {
        let base = build(dir.path(), &format!("deep-{n}"), images::Format::OciDir, images::deep_export_image(n));
        let bytes = export_both(&base, &[]);
        assert!(listing(&bytes).iter().any(|e| e.starts_with(&format!("l{:03}/ dir", n - 1))));
    }
}

#[test]
fn export_with_a_script_exports_the_result() {
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let s = script(dir.path(), "s.sh", "mkdir /data && chown 1000:1000 /data && rm /etc/group\n");
    let out = dir.path().join("rootfs.tar");
    let base = busybox_base();
    ok(runasroot(&["export", "--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap()], &tmp));
    let l = listing(&fs::read(&out).unwrap());
    assert!(l.contains(&"data/ dir 755 1000:1000 0".to_string()), "{l:#?}");
    assert!(!l.iter().any(|e| e.starts_with("etc/group ")), "{l:#?}");
    assert!(l.iter().any(|e| e.starts_with("etc/passwd file")), "{l:#?}");
    assert!(l.iter().any(|e| e.starts_with("bin/busybox file 755 0:0")), "{l:#?}");
    assert_empty_dir(&tmp);
}

#[test]
fn export_streams_to_stdout() {
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let base = busybox_base();
    let run = ok(runasroot(&["export", "--base", base.to_str().unwrap(), "-o", "-"], &tmp));
    let file = dir.path().join("f.tar");
    ok(runasroot(&["export", "--base", base.to_str().unwrap(), "-o", file.to_str().unwrap()], &tmp));
    assert!(run.stdout == fs::read(&file).unwrap());
}

#[test]
fn xattr_values_holding_newlines_are_exported() {
    // A file capability for cap_dac_override + cap_fowner holds byte
    // 0x0a, which the tar crate's PAX parser took for the end of the
    // record: such layers were refused. The host engine only (no VM).
    let cap = [1u8, 0, 0, 2, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let dir = scratch();
    let img = images::image(vec![images::layer(vec![
        images::dir("bin"),
        images::file("bin/tool", "t").xattr("security.capability", cap),
    ])
    .gzip()]);
    let base = build(dir.path(), "cap.tar", images::Format::DockerLegacy, img);
    let tmp = subdir(dir.path(), "tmp");
    let out = dir.path().join("out.tar");
    ok(runasroot(&["export", "--base", base.to_str().unwrap(), "-o", out.to_str().unwrap()], &tmp));
    let bytes = fs::read(&out).unwrap();
    let record = [b" SCHILY.xattr.security.capability=".as_slice(), &cap, b"\n"].concat();
    assert!(bytes.windows(record.len()).any(|w| w == record), "the capability record is in the export");
    assert_empty_dir(&tmp);
}
