//! Issue 11 through the CLI: what nixpkgs' buildImage does and runasroot
//! could not, driven on the real binary and checked with real clients.
//!
//! * `--base scratch` + `--copy-to-root` + `--config`, no script, the whole
//!   archive gzip-compressed (`--compress-archive`): docker load + run;
//!   then an image on top with `--config` merging (Env by name, null
//!   removes) read by skopeo, and a zstd archive read back by runasroot.
//! * bad `--config` and `--tag` fail before any guest runs, naming the file
//!   and key.
//! * QEMU is found with PATH=/path-not-set and an absent HOME (a Nix
//!   build), and a missing one is reported with every place tried.
//! * the one closing line on stderr, gone with -q; runasroot alone points
//!   to --help.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use common::*;

const APPLETS: &[&str] = &["sh", "cat", "echo", "id", "stat"];

/// A root tree: busybox and its links in bin/, an /etc/passwd.
fn root_tree(parent: &Path) -> PathBuf {
    let root = subdir(parent, "root");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed (.ci/setup)");
    for a in APPLETS {
        symlink("busybox", root.join("bin").join(a)).unwrap();
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let perms = |p: &Path, mode| {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap()
    };
    for d in ["bin", "etc"] {
        perms(&root.join(d), 0o755);
    }
    perms(&root.join("etc/passwd"), 0o644);
    perms(&root.join("bin/busybox"), 0o755);
    root
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    script(dir, name, body).to_string_lossy().into_owned()
}

fn docker_ok(d: &Dockerd, args: &[&str]) -> String {
    let out = d.docker(args);
    assert!(out.status.success(), "docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn from_scratch_with_config_then_an_image_on_top() {
    let tmp = scratch();
    let dir = tmp.path();
    let root = root_tree(dir);
    let out = subdir(dir, "out");
    let t = subdir(dir, "t");
    let config = write(
        dir,
        "config.json",
        r#"{"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo $GREETING from $(pwd)"], "Env": ["PATH=/bin", "GREETING=hello"],
            "WorkingDir": "/", "ExposedPorts": {"6379/tcp": {}}, "Volumes": {"/data": {}}, "Labels": {"a": "1"},
            "User": "0", "StopSignal": "SIGINT"}"#,
    );
    let first = out.join("first.tar.gz");
    let run = ok(runasroot(
        &["--base", "scratch", "--copy-to-root", root.to_str().unwrap(), "--config", &config, "--compress-archive", "gzip", "--tag", "first:1", "-o", first.to_str().unwrap()],
        &t,
    ));
    assert_empty_dir(&t);
    // The closing line names what was written; nothing else but the TCG
    // notice is said.
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("runasroot: wrote {} (docker-archive, 1 layer, tagged first:1); new layer sha256:", first.display())),
        "{run:?}"
    );
    let bytes = fs::read(&first).unwrap();
    assert_eq!(bytes[..2], [0x1f, 0x8b], "the whole archive is gzip");

    // -q: not a word on success.
    let quiet = ok(runasroot(&["-q", "--base", "scratch", "--copy-to-root", root.to_str().unwrap(), "-o", out.join("q.tar").to_str().unwrap()], &t));
    assert_eq!(quiet.stderr, "", "-q hides the closing line");

    // On top: a script, Env merged by name, Cmd removed by null, Labels replaced.
    let second = out.join("second.tar");
    let over = write(dir, "over.json", r#"{"Env": ["GREETING=hi", "MODE=2"], "Cmd": null, "Labels": {"b": "2"}}"#);
    let s = write(dir, "s.sh", "echo 'app:x:1000:1000::/:/bin/sh' >> /etc/passwd\nmkdir /data && chown app /data\n");
    ok(runasroot(&["--base", first.to_str().unwrap(), "--script", &s, "--config", &over, "-o", second.to_str().unwrap()], &t));
    let zst = out.join("second.tar.zst");
    ok(runasroot(&["--base", first.to_str().unwrap(), "--script", &s, "--config", &over, "--compress-archive", "zstd", "-o", zst.to_str().unwrap()], &t));
    assert_eq!(fs::read(&zst).unwrap()[..4], [0x28, 0xb5, 0x2f, 0xfd], "the whole archive is zstd");
    let from_plain = out.join("from-plain.tar");
    let from_zst = out.join("from-zst.tar");
    ok(runasroot(&["export", "--base", second.to_str().unwrap(), "-o", from_plain.to_str().unwrap()], &t));
    ok(runasroot(&["export", "--base", zst.to_str().unwrap(), "-o", from_zst.to_str().unwrap()], &t));
    assert_eq!(fs::read(&from_plain).unwrap(), fs::read(&from_zst).unwrap(), "the zstd archive holds the same image");
    let entries = listing(&fs::read(&from_plain).unwrap());
    assert!(entries.contains(&"data/ dir 755 1000:0 0".to_string()), "{entries:#?}");
    let busybox = format!("bin/busybox file 755 0:0 {}", fs::metadata("/bin/busybox").unwrap().len());
    assert!(entries.contains(&busybox), "{entries:#?}");

    if have("skopeo") {
        let cfg: Value = serde_json::from_str(&skopeo(&["inspect", "--config", &format!("docker-archive:{}", second.display())])).unwrap();
        assert_eq!(
            cfg["config"],
            json!({"Entrypoint": ["/bin/sh", "-c"], "Env": ["PATH=/bin", "GREETING=hi", "MODE=2"], "WorkingDir": "/",
                   "ExposedPorts": {"6379/tcp": {}}, "Volumes": {"/data": {}}, "Labels": {"b": "2"}, "User": "0", "StopSignal": "SIGINT"})
        );
        assert_eq!(cfg["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
        assert_eq!(cfg["architecture"], json!("amd64"));
        assert_eq!(cfg["os"], json!("linux"));
    }

    if let Some(d) = Dockerd::start() {
        let loaded = docker_ok(&d, &["load", "-i", first.to_str().unwrap()]);
        assert!(loaded.contains("Loaded image: first:1"), "{loaded}");
        let out = docker_ok(&d, &["run", "--rm", "--network", "none", "first:1"]);
        assert_eq!(out, "hello from /\n", "Entrypoint + Cmd + Env + WorkingDir from --config");
        let c: Value = serde_json::from_str(&docker_ok(&d, &["image", "inspect", "--format", "{{json .Config}}", "first:1"])).unwrap();
        assert_eq!(c["ExposedPorts"], json!({"6379/tcp": {}}));
        assert_eq!(c["StopSignal"], json!("SIGINT"));
        assert_eq!(c["Labels"], json!({"a": "1"}));
    }
}

#[test]
fn bad_config_and_tag_fail_before_any_guest() {
    let tmp = scratch();
    let dir = tmp.path();
    let root = root_tree(dir);
    let t = subdir(dir, "t");
    let out = dir.join("o.tar");
    let cases = [
        (r#"{"cmd": ["x"]}"#, "unknown field \"cmd\": field names are case-sensitive, write \"Cmd\""),
        (r#"{"Env": "A=1"}"#, "\"Env\" must be an array of \"KEY=VALUE\" strings, found a string"),
        (r#"["Cmd"]"#, "expected a JSON object of container config fields"),
        (r#"{"Cmd": ["#, "is not valid JSON"),
    ];
    for (body, want) in cases {
        let c = write(dir, "bad.json", body);
        let r = runasroot(&["--base", "scratch", "--copy-to-root", root.to_str().unwrap(), "--config", &c, "-o", out.to_str().unwrap()], &t);
        assert_eq!(r.code, 125, "{r:?}");
        assert!(r.stderr.contains(&format!("--config {c}")), "names the file: {r:?}");
        assert!(r.stderr.contains(want), "{want}: {r:?}");
        assert!(!r.stderr.contains("QEMU"), "no launcher was even picked: {r:?}");
        assert!(!out.exists());
        assert_empty_dir(&t);
    }
    let r = runasroot(&["--base", "scratch", "--copy-to-root", root.to_str().unwrap(), "--tag", "Bad:1", "-o", out.to_str().unwrap()], &t);
    assert_eq!(r.code, 125, "{r:?}");
    assert!(r.stderr.contains("Bad:1") && !r.stderr.contains("QEMU"), "{r:?}");
    let r = runasroot(&["--base", "scratch", "--from-image", "a:b", "--copy-to-root", root.to_str().unwrap(), "-o", out.to_str().unwrap()], &t);
    assert_eq!(r.code, 125, "{r:?}");
    assert!(r.stderr.contains("--base scratch is no archive"), "{r:?}");
    let r = runasroot(&["--base", "scratch", "-o", out.to_str().unwrap()], &t);
    assert_eq!(r.code, 125);
    assert!(r.stderr.contains("--script FILE is required, unless --copy-to-root or --config"), "{r:?}");
    let r = runasroot(&["--base", "scratch", "--format", "oci", "--compress-archive", "gzip", "--copy-to-root", root.to_str().unwrap(), "-o", out.to_str().unwrap()], &t);
    assert_eq!(r.code, 125);
    assert!(r.stderr.contains("--compress-archive compresses a single-file image"), "{r:?}");
}

/// `runasroot ARGS` as the unprivileged user with exactly this PATH and
/// HOME (setpriv found before PATH changes).
fn runasroot_env(args: &[&str], tmp: &Path, path: &str, home: &Path, qemu_env: Option<&str>) -> Run {
    let mut cmd = if is_root() {
        let mut c = Command::new("/usr/bin/setpriv");
        c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups", "--"]).arg(bin());
        c
    } else {
        Command::new(bin())
    };
    cmd.args(args).env("TMPDIR", tmp).env("PATH", path).env("HOME", home).env_remove("SOURCE_DATE_EPOCH").stdin(Stdio::null());
    match qemu_env {
        Some(v) => cmd.env("RUNASROOT_QEMU", v),
        None => cmd.env_remove("RUNASROOT_QEMU"),
    };
    finish(cmd.output().expect("spawn runasroot"))
}

#[test]
fn qemu_is_found_as_in_a_nix_build_and_missing_ones_are_named() {
    let tmp = scratch();
    let dir = tmp.path();
    let root = root_tree(dir);
    let t = subdir(dir, "t");
    // A HOME that does not exist in a directory the user may write: it
    // must stay absent (a Nix build's /homeless-shelter).
    let home = dir.join("homeless-shelter");
    let out = dir.join("o.tar");
    let args = ["--vmm", "qemu", "--base", "scratch", "--copy-to-root", root.to_str().unwrap(), "-o", out.to_str().unwrap()];
    let r = runasroot_env(&args, &t, "/path-not-set", &home, None);
    assert_eq!(r.code, 0, "QEMU found outside PATH: {r:?}");
    assert!(out.exists());
    assert!(!home.exists(), "HOME was created");
    assert_empty_dir(&t);

    let r = runasroot_env(&args, &t, "/path-not-set", &home, Some("qemu-does-not-exist"));
    assert_eq!(r.code, 125, "{r:?}");
    assert!(
        r.stderr.contains(
            "QEMU not found: looked for qemu-does-not-exist (from RUNASROOT_QEMU) in PATH (/path-not-set) and in /usr/local/bin, /usr/bin, /bin, \
             /run/current-system/sw/bin, /nix/var/nix/profiles/default/bin; fix: apt-get install qemu-system-x86, or name the binary with --qemu PATH or RUNASROOT_QEMU=PATH"
        ),
        "{r:?}"
    );
    let mut with_flag = args.to_vec();
    with_flag.extend(["--qemu", "/nonexistent/qemu-system-x86_64"]);
    let r = runasroot_env(&with_flag, &t, "/usr/bin:/bin", &home, Some("/usr/bin/qemu-system-x86_64"));
    assert_eq!(r.code, 125, "--qemu wins over RUNASROOT_QEMU: {r:?}");
    assert!(r.stderr.contains("QEMU not found: --qemu /nonexistent/qemu-system-x86_64 does not exist or is not executable"), "{r:?}");
    assert_empty_dir(&t);
}

#[test]
fn no_arguments_point_to_help() {
    let tmp = scratch();
    let r = runasroot(&[], tmp.path());
    assert_eq!(r.code, 125);
    assert!(r.stdout.is_empty());
    assert_eq!(
        r.stderr,
        "runasroot: run a root script over a container image inside a microVM\n\
         usage: runasroot --base IMAGE --script FILE -o NEW.tar\n       runasroot export --base IMAGE -o ROOTFS.tar\n\
         see `runasroot --help` for every option\n"
    );
    let r = runasroot(&["--script", "x.sh", "-o", "o.tar"], tmp.path());
    assert!(r.stderr.contains("--base IMAGE is required (or --base scratch to start from nothing); see runasroot --help"), "{r:?}");
}
