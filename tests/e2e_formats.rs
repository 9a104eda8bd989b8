//! Tier 2, issue 4: every row of FORMATS.md's edge-case table, in both
//! directions, through the real binary (run as an unprivileged user) and
//! the real guest under QEMU.
//!
//! One guest boot carries almost every row: a base whose layers hold the
//! input-side cases (opaque dirs, whiteouts of nothing, devices, hardlinks
//! within and across layers, xattrs including `trusted.overlay.*` that must
//! be stripped, setuid bits, long and non-UTF-8 names, big ids, a directory
//! a layer writes into without listing it), and one script that records
//! what it sees of them in a report and makes every output-side case
//! (whiteouts, opaque dirs, devices, sockets, hardlinks, xattrs, modes,
//! owners, paths created and deleted again). The new layer is then checked
//! entry by entry, in full. Cases that must fail (breakouts, `..`, a
//! missing interpreter) each need a boot of their own.

mod common;
#[path = "common/images.rs"]
mod images;
mod helpers;
#[path = "common/edge.rs"]
mod edge;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use edge::*;
use helpers::*;
use images::*;

struct Outcome {
    run: Run,
    layer: Option<Vec<u8>>,
    image: Option<PathBuf>,
}

/// Runs `runasroot --base BASE --script … -o img.tar --layer-output
/// layer.tar EXTRA` unprivileged, with a TZ and locale that must not leak.
fn run_script(dir: &Path, base: &str, body: &str, extra: &[&str]) -> Outcome {
    let tmp = subdir(dir, "tmp");
    let s = script(dir, "script.sh", body);
    let layer = dir.join("layer.tar");
    let img = dir.join("img.tar");
    let mut args = vec!["--base", base, "--script", s.to_str().unwrap(), "-o", img.to_str().unwrap(), "--layer-output", layer.to_str().unwrap()];
    args.extend_from_slice(extra);
    let run = finish(runasroot_cmd(&args, &tmp).env("TZ", "Asia/Tokyo").env("LANG", "C.UTF-8").output().expect("spawn runasroot"));
    assert_empty_dir(&tmp);
    Outcome { run, layer: fs::read(&layer).ok(), image: img.exists().then_some(img) }
}

#[test]
fn every_edge_case_row_in_one_boot() {
    let Some(img) = edge_image() else {
        skip("busybox-static or gcc -static is missing");
        return;
    };
    let dir = scratch();
    let base = dir.path().join("edge.tar");
    write(&base, &Build::new(Format::DockerHybrid), &[img]);
    let (ctr_dir, ctr_tar) = copy_to_root_inputs(dir.path());
    let o = run_script(
        dir.path(),
        base.to_str().unwrap(),
        &edge_script(),
        &["--env", "OVERRIDE=cli", "--env", "CLI_VAR=x", "--copy-to-root", ctr_dir.to_str().unwrap(), "--copy-to-root", ctr_tar.to_str().unwrap()],
    );
    let run = ok(o.run);
    let layer = o.layer.expect("--layer-output written");

    // The report the script wrote, from the layer itself.
    let members: Vec<(String, Vec<u8>)> = {
        let p = dir.path().join("layer-copy.tar");
        fs::write(&p, &layer).unwrap();
        tar_members(&p)
    };
    let report = members.iter().find(|(n, _)| n == "out/report").map(|(_, b)| String::from_utf8_lossy(b).into_owned());
    let want_report = expected_report();
    assert_eq!(report.as_deref(), Some(want_report.as_str()), "what the script saw (stderr: {run:?})");

    assert_eq!(listing(&layer), expected_layer(want_report.len()), "the new layer, entry by entry");

    // Every new entry gets the epoch: --created's default, 1970-01-01T00:00:01Z.
    assert!(mtimes(&layer).iter().all(|&m| m == 1), "mtimes {:?}", mtimes(&layer));
    // The non-UTF-8 name travels as its exact bytes.
    let names: Vec<Vec<u8>> =
        tar::Archive::new(&layer[..]).entries().unwrap().map(|e| e.unwrap().path_bytes().into_owned()).collect();
    assert!(names.contains(&b"names-copy/bad\xffname".to_vec()), "raw name bytes kept");
    // Hardlink contents: the link entries carry none, the first name all.
    let h1 = members.iter().find(|(n, _)| n == "out/h1").unwrap();
    assert_eq!(h1.1, b"hl\n");
    // Headers: PAX (never GNU long-name records), no user/group names.
    let raw = raw_headers(&layer);
    assert!(raw.iter().all(|h| h.typeflag != b'L' && h.typeflag != b'K'), "GNU long-name records: {raw:?}");
    assert!(raw.iter().any(|h| h.typeflag == b'x'), "PAX records for the long, odd and big entries");
    for h in &raw {
        let name = String::from_utf8_lossy(&h.name);
        assert!(h.uname.is_empty() && h.gname.is_empty(), "{name} has uname/gname {:?}/{:?}", h.uname, h.gname);
        assert_eq!(h.magic, b"ustar\x0000", "ustar header for {name} (type {})", h.typeflag as char);
    }
    // The -o image carries the same layer as its top layer.
    let out = OutImage::open(&o.image.unwrap(), dir.path());
    assert_eq!(out.new_layer(), layer, "-o's new layer equals --layer-output");
    assert_eq!(out.layers.len(), 4);
}

/// A layer that must be rejected: exit 125, the message names the entry,
/// nothing written.
fn assert_rejected(bad: Layer, entry: &str) {
    let Some(bb) = busybox_entries() else {
        skip("busybox-static is missing");
        return;
    };
    let dir = scratch();
    let base = dir.path().join("bad.tar");
    write(&base, &Build::new(Format::OciArchive), &[image(vec![layer(bb), bad])]);
    let o = run_script(dir.path(), base.to_str().unwrap(), "echo the script must not run > /ran\n", &[]);
    assert_eq!(o.run.code, 125, "{:?}", o.run);
    assert!(o.run.stderr.contains(entry), "the message names {entry:?}: {:?}", o.run);
    assert!(o.layer.is_none() && o.image.is_none(), "nothing written");
}

#[test]
fn a_symlinked_parent_breakout_is_rejected_naming_the_entry() {
    assert_rejected(layer(vec![symlink("a", "/"), file("a/etc/x", "evil\n")]), "a/etc/x");
}

#[test]
fn a_dotdot_name_is_rejected_naming_the_entry() {
    assert_rejected(layer(vec![dir("etc"), file("etc/../../escape", "evil\n")]), "etc/../../escape");
}

#[test]
fn a_leading_dotdot_name_is_rejected_naming_the_entry() {
    assert_rejected(layer(vec![file("../escape", "evil\n")]), "../escape");
}

#[test]
fn a_missing_interpreter_is_a_clear_error_naming_it() {
    let dir = scratch();
    let Some(base) = busybox_hybrid(dir.path()) else {
        return;
    };
    let o = run_script(dir.path(), base.to_str().unwrap(), "#!/usr/bin/python3\nprint('hi')\n", &[]);
    assert_eq!(o.run.code, 125, "{:?}", o.run);
    assert!(o.run.stderr.contains("/usr/bin/python3"), "the message names the interpreter: {:?}", o.run);
    assert!(o.layer.is_none() && o.image.is_none(), "nothing written");
}

#[test]
fn a_shebang_picks_the_interpreter_and_its_arguments() {
    let dir = scratch();
    let Some(base) = busybox_hybrid(dir.path()) else {
        return;
    };
    // `sh -e`: the failing `false` stops the script with its code.
    let o = run_script(dir.path(), base.to_str().unwrap(), "#!/bin/sh -e\nfalse\ntouch /not-reached\n", &[]);
    assert_eq!(o.run.code, 1, "the shebang's -e stopped the script: {:?}", o.run);
    assert!(o.layer.is_none() && o.image.is_none(), "nothing written when the script fails");
    // Another interpreter than /bin/sh, named by absolute path.
    let o = run_script(dir.path(), base.to_str().unwrap(), "#!/bin/busybox ash\necho ok > /ran\n", &[]);
    ok(o.run);
    assert_eq!(listing(&o.layer.unwrap()), vec!["ran file 644 0:0 3"]);
}

/// A one-layer busybox base (hybrid docker-archive) in `dir`, or None
/// (saying why) where busybox-static is missing.
fn busybox_hybrid(dir: &std::path::Path) -> Option<std::path::PathBuf> {
    let Some(bb) = busybox_entries() else {
        skip("busybox-static is missing");
        return None;
    };
    let base = dir.join("base.tar");
    write(&base, &Build::new(Format::DockerHybrid), &[image(vec![layer(bb)])]);
    Some(base)
}
