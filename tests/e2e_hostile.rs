//! Tier 2: a hostile guest. The guest runs a root script on a kernel the
//! script can attack, so everything on the output disk is hostile input.
//! Each case boots the real binary (QEMU, TCG where there is no hardware
//! virtualisation) with `--initramfs` pointing at an init of our own
//! (tests/helpers/hostile-init.c) that writes a crafted result header and
//! payload on the output disk, as a guest taken over would. Each run must
//! fail cleanly: exit 125, a message naming what was wrong, nothing
//! written (no `-o`, no `--layer-output`, no temporary file), and no raw
//! control character on the terminal.
//!
//! One honest case goes first: the same init writing a well-formed layer
//! must succeed, so a refusal below is the host's check, not a broken
//! harness.
//!
//! Hostile images get the same treatment where their bytes would reach a
//! message: a base of random bytes, a tar whose second header is garbage
//! with terminal escapes in it.

mod common;

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use runasroot_guest::contract::{Outcome, Status, RESULT_AREA, RESULT_MAGIC};
use sha2::{Digest as _, Sha256};

/// Every entry of a new layer gets the epoch: 1 when neither --created
/// nor SOURCE_DATE_EPOCH is given (FORMATS.md "mtime").
const EPOCH: u64 = 1;

/// The static hostile init, built once per target dir with gcc (once per
/// process, whatever the test threads); None (after saying why) when gcc
/// or a static libc is missing.
fn hostile_init() -> Option<Vec<u8>> {
    static INIT: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
    INIT.get_or_init(build_hostile_init).clone()
}

fn build_hostile_init() -> Option<Vec<u8>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helpers/hostile-init.c");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helpers");
    fs::create_dir_all(&dir).ok()?;
    let digest = hex::encode(Sha256::digest(fs::read(&src).expect("tests/helpers/hostile-init.c")));
    let out = dir.join(format!("hostile-init-{}", &digest[..16]));
    if !out.exists() {
        let tmp = dir.join(format!("hostile-init.{}.tmp", std::process::id()));
        match Command::new("gcc").args(["-static", "-O2", "-Wall", "-o"]).arg(&tmp).arg(&src).status() {
            Ok(s) if s.success() => fs::rename(&tmp, &out).expect("rename hostile-init"),
            other => {
                println!("SKIP: cannot build tests/helpers/hostile-init.c with `gcc -static` ({other:?}); install gcc and libc6-dev");
                return None;
            }
        }
    }
    Some(fs::read(&out).expect("read hostile-init"))
}

/// A newc cpio: /dev/console (the init's stdout), /init, /result.
fn initramfs(init: &[u8], result: &[u8]) -> Vec<u8> {
    let mut cpio = Vec::new();
    let mut ino = 1;
    let mut entry = |name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        let mut head = String::new();
        write!(
            head,
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        )
        .unwrap();
        ino += 1;
        cpio.extend_from_slice(head.as_bytes());
        cpio.extend_from_slice(name.as_bytes());
        cpio.push(0);
        cpio.resize(cpio.len().div_ceil(4) * 4, 0);
        cpio.extend_from_slice(data);
        cpio.resize(cpio.len().div_ceil(4) * 4, 0);
    };
    entry("dev", 0o040755, (0, 0), b"");
    entry("dev/console", 0o020600, (5, 1), b"");
    entry("init", 0o100755, (0, 0), init);
    entry("result", 0o100644, (0, 0), result);
    entry("TRAILER!!!", 0, (0, 0), b"");
    cpio
}

/// One raw ustar entry: the name bytes go in as they are (the tar crate's
/// own setters refuse `..` and absolute names, which is the point here).
fn raw(name: &str, kind: tar::EntryType, size: u64, link: &str) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(if kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(EPOCH);
    h.set_size(size);
    h.set_cksum();
    h.as_bytes().to_vec()
}

/// A file entry with its data and padding.
fn file(name: &str, data: &[u8]) -> Vec<u8> {
    let mut e = raw(name, tar::EntryType::Regular, data.len() as u64, "");
    e.extend_from_slice(data);
    e.resize(e.len().div_ceil(512) * 512, 0);
    e
}

/// Entries and the two zero blocks that end a tar.
fn tar(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut t = entries.concat();
    t.extend_from_slice(&[0u8; 1024]);
    t
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// What the hostile init writes: a result header claiming the script
/// exited 0 with `payload_len` bytes of digest `digest`, then `payload`.
fn claim(payload: &[u8], payload_len: u64, digest: String) -> Vec<u8> {
    let outcome = Outcome {
        status: Status::Finished { exit_code: 0 },
        payload_len,
        payload_digest: Some(digest),
        timings: vec![],
        notes: vec![],
    };
    let mut out = outcome.encode();
    out.extend_from_slice(payload);
    out
}

/// An honest header for `payload`.
fn honest(payload: &[u8]) -> Vec<u8> {
    claim(payload, payload.len() as u64, sha256(payload))
}

/// A header area holding `json` as the result JSON, whatever it says.
fn header_json(json: &str) -> Vec<u8> {
    let mut out = RESULT_MAGIC.to_vec();
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json.as_bytes());
    out.resize(RESULT_AREA as usize, 0);
    out
}

/// What a case expects.
enum Want {
    /// The run succeeds and writes these layer entries.
    Written(&'static [&'static str]),
    /// Exit 125, nothing written, stderr holding each of these.
    Refused(&'static [&'static str]),
}

struct Case {
    name: &'static str,
    /// `export --in-vm` instead of a layer run.
    export: bool,
    result: Vec<u8>,
    want: Want,
}

fn case(name: &'static str, result: Vec<u8>, want: Want) -> Case {
    Case { name, export: false, result, want }
}

/// Runs one case on `base`; returns what went wrong, if anything.
fn run_case(init: &[u8], base: &Path, c: &Case) -> Option<String> {
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let cpio = dir.path().join("hostile.cpio");
    fs::write(&cpio, initramfs(init, &c.result)).unwrap();
    fs::set_permissions(&cpio, fs::Permissions::from_mode(0o644)).unwrap();
    let s = script(dir.path(), "s.sh", "true\n");
    let out = dir.path().join("out.tar");
    let layer = dir.path().join("layer.tar");
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let mut args: Vec<String> = if c.export { vec!["export".into(), "--in-vm".into()] } else { vec![] };
    args.extend(["--base".into(), p(base), "--script".into(), p(&s), "-o".into(), p(&out)]);
    if !c.export {
        args.extend(["--layer-output".into(), p(&layer)]);
    }
    args.extend(["--initramfs".into(), p(&cpio), "--timeout".into(), "180".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = runasroot(&args, &tmp);
    println!("--- {} (exit {}):\n{}", c.name, run.code, run.stderr);

    let mut problems = Vec::new();
    let left: Vec<PathBuf> = fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().path()).collect();
    if !left.is_empty() {
        problems.push(format!("left behind in TMPDIR: {left:?}"));
    }
    if let Some(bad) = run.stderr.chars().find(|&ch| ch.is_control() && ch != '\n') {
        problems.push(format!("a raw control character {bad:?} reached the terminal"));
    }
    match &c.want {
        Want::Written(entries) => {
            if run.code != 0 {
                problems.push(format!("the honest run failed: {run:?}"));
            } else {
                let got = listing(&fs::read(&layer).unwrap_or_default());
                if got != *entries {
                    problems.push(format!("layer {got:?}, want {entries:?}"));
                }
                if !out.exists() {
                    problems.push("-o was not written".into());
                }
            }
        }
        Want::Refused(needles) => {
            if run.code != 125 {
                problems.push(format!("exit {}, want 125", run.code));
            }
            if !run.stderr.contains("error: refusing what the guest wrote on its output disk; nothing was written") {
                problems.push("no refusal line".into());
            }
            for n in needles.iter() {
                if !run.stderr.contains(n) {
                    problems.push(format!("stderr lacks {n:?}"));
                }
            }
            for written in [&out, &layer] {
                if written.exists() {
                    problems.push(format!("{} was written", written.display()));
                }
            }
            if fs::read_dir(dir.path()).unwrap().count() != 3 {
                let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
                problems.push(format!("files beside the outputs: {names:?}"));
            }
        }
    }
    (!problems.is_empty()).then(|| format!("{}: {}\n{run:?}", c.name, problems.join("; ")))
}

fn run_cases(cases: Vec<Case>) {
    let Some(init) = hostile_init() else { return };
    // A private copy: the shared fixture is replaced (renamed over) by
    // every test process that builds it, and runasroot rightly refuses a
    // base that changes under it.
    let dir = scratch();
    let base = dir.path().join("base.tar");
    fs::copy(busybox_base(), &base).unwrap();
    fs::set_permissions(&base, fs::Permissions::from_mode(0o644)).unwrap();
    let failures: Vec<String> = cases.iter().filter_map(|c| run_case(&init, &base, c)).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A well-formed layer: a directory and a file in it.
fn good_layer() -> Vec<u8> {
    tar(&[raw("data/", tar::EntryType::Directory, 0, ""), file("data/f", b"hello\n")])
}

#[test]
fn hostile_layers_are_refused_and_nothing_is_written() {
    let dotdot = tar(&[file("../escape", b"x")]);
    let absolute = tar(&[file("/etc/passwd", b"root::0:0::/:/bin/sh\n")]);
    let symlinked = tar(&[raw("a", tar::EntryType::Symlink, 0, "/etc"), file("a/passwd", b"x")]);
    let past_end = {
        let mut t = raw("big", tar::EntryType::Regular, 1 << 20, "");
        t.extend_from_slice(&[0u8; 1024]);
        t
    };
    run_cases(vec![
        case("an honest layer", honest(&good_layer()), Want::Written(&["data/ dir 755 0:0 0", "data/f file 644 0:0 6"])),
        case("a ../ name", honest(&dotdot), Want::Refused(&["entry 1 \"../escape\"", "it climbs out of the tree with `..`"])),
        case("an absolute path", honest(&absolute), Want::Refused(&["entry 1 \"/etc/passwd\"", "it is absolute (starts with /)"])),
        case(
            "an entry under a symlink",
            honest(&symlinked),
            Want::Refused(&["entry 2 \"a/passwd\"", "its parent \"a\" is a symlink in this tar: nothing may be written through it"]),
        ),
        case(
            "a size past the payload",
            honest(&past_end),
            Want::Refused(&["entry 1 \"big\"", "its data (1048576 bytes) runs past the end of the payload (1536 bytes)"]),
        ),
    ]);
}

#[test]
fn lying_result_headers_are_refused_and_nothing_is_written() {
    let good = good_layer();
    let short = &good[..good.len() - 1024];
    let long = [good.clone(), vec![0u8; 4096]].concat();
    let zeros = format!("sha256:{}", "0".repeat(64));
    let not_exited = header_json(r#"{"status":"finished","exit_code":-1,"payload_len":0,"payload_digest":null,"timings":[]}"#);
    // JSON escapes: the decoded status is ESC ] 0 ; pwned BEL ESC [ 2 J.
    let garbage = header_json(r#"{"status":"\u001b]0;pwned\u0007\u001b[2J","payload_len":0,"payload_digest":null,"timings":[]}"#);
    let export_whiteout = tar(&[raw("etc/", tar::EntryType::Directory, 0, ""), file("etc/.wh.passwd", b"")]);
    let mut cases = vec![
        case(
            "a length shorter than the tar",
            claim(&good, short.len() as u64, sha256(short)),
            Want::Refused(&["the new layer it wrote is invalid", "it ends without the two zero blocks that end a tar"]),
        ),
        case(
            "a length longer than the tar",
            claim(&long, long.len() as u64, sha256(&long)),
            Want::Refused(&["4096 bytes follow the end of the tar (the announced payload length is larger than the tar)"]),
        ),
        case(
            "a digest that is not the payload's",
            claim(&good, good.len() as u64, zeros),
            Want::Refused(&["the new layer it wrote has digest sha256:", "but its result header says sha256:0000000000000000"]),
        ),
        case(
            "a length past the output disk",
            claim(&good, 1 << 40, sha256(&good)),
            Want::Refused(&["its result header announces a payload of 1099511627776 bytes; the output disk has room for"]),
        ),
        case(
            "an exit code no process has",
            [not_exited, good.clone()].concat(),
            Want::Refused(&["its result header says the script exited with -1; exit codes are 0 to 255"]),
        ),
        case(
            "a header with terminal escapes",
            garbage,
            Want::Refused(&["its result header cannot be decoded", "\\x1b]0;pwned\\x07\\x1b[2J"]),
        ),
    ];
    cases.push(Case {
        name: "an export with a whiteout",
        export: true,
        result: honest(&export_whiteout),
        want: Want::Refused(&["the export it wrote is invalid", "entry 2 \"etc/.wh.passwd\"", "an export holds no whiteouts (.wh. names)"]),
    });
    run_cases(cases);
}

/// Runs `runasroot` on `base` (no guest is reached) and checks the error
/// is a few printable lines naming the file.
fn refused_base(base_bytes: &[u8], needles: &[&str]) {
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let base = dir.path().join("base.tar");
    fs::write(&base, base_bytes).unwrap();
    fs::set_permissions(&base, fs::Permissions::from_mode(0o644)).unwrap();
    let s = script(dir.path(), "s.sh", "true\n");
    let out = dir.path().join("out.tar");
    let run = runasroot(&["--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap()], &tmp);
    println!("{}", run.stderr);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(!out.exists());
    assert_empty_dir(&tmp);
    assert!(!run.stderr.chars().any(|c| c.is_control() && c != '\n'), "a raw control character: {run:?}");
    let error_lines = run.stderr.lines().skip_while(|l| !l.starts_with("error: ")).count();
    assert!((2..=4).contains(&error_lines), "a few lines: {run:?}");
    assert!(run.stderr.lines().all(|l| l.chars().count() <= 500), "bounded lines: {run:?}");
    for n in needles {
        assert!(run.stderr.contains(n), "lacks {n:?}: {run:?}");
    }
}

#[test]
fn a_base_of_random_bytes_gets_a_plain_message() {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let random: Vec<u8> = (0..20_000)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect();
    refused_base(&random, &["base.tar is not a container image: it is not compressed and is no tar archive"]);
}

#[test]
fn corrupt_headers_in_a_base_are_named_not_echoed() {
    // A good first member, then a header whose name holds terminal escapes
    // and whose checksum field is not even text: the message names where
    // the header is and what is wrong with it, and quotes none of it.
    let name = b"\x1b]0;pwned\x07\x1b[2J\x1b[31mred";
    let mut bad = vec![0u8; 512];
    bad[..name.len()].copy_from_slice(name);
    bad[148..156].copy_from_slice(&[0xff, 0xfe, 0x1b, b'[', b'H', 0x9b, 0xc0, 0x00]);
    bad[257..263].copy_from_slice(b"ustar\0");
    let base = tar(&[file("manifest.json", b"[]"), bad]);
    refused_base(&base, &["cannot read the tar archive", "base.tar: it is truncated or corrupt", "the tar header at byte 1024 is damaged: checksum mismatch"]);
    // A valid checksum over a base-256 size field no seek can reach, with
    // escapes in it.
    let mut header = tar::Header::new_ustar();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_mode(0o644);
    header.as_mut_bytes()[124..136].copy_from_slice(&[0xff, 0xfe, 0x1b, b'[', b'H', 0x9b, 0xc0, 0, 0, 0, 0, 0]);
    header.set_cksum();
    let base = tar(&[file("manifest.json", b"[]"), header.as_bytes().to_vec()]);
    refused_base(&base, &["base.tar: it is truncated or corrupt", "the tar header at byte 1024 is damaged: invalid size field"]);
}

#[test]
fn member_names_with_escapes_are_escaped() {
    // No image at all: the message lists what the archive holds, escaped.
    let base = tar(&[file("\x1b]0;pwned\x07\x1b[2J", b"")]);
    refused_base(&base, &["base.tar is not a container image", "found \\x1b]0;pwned\\x07\\x1b[2J"]);
}
