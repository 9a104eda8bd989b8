//! Issue 11: `nix/default.nix` driven by a real `nix-build` (Debian's
//! nix-bin, sandbox off, no substituters, no nixpkgs), the results checked
//! with docker load + docker run, skopeo and `runasroot export`.
//!
//! The expression is lethalman's redis example from nothing:
//! (a) `base`: buildImage with no fromImage, copyToRoot = a buildEnv-like
//!     tree whose `bin` is a symlink into the store (busybox placed in the
//!     store with builtins.path), runAsRoot making /data and a user, config
//!     with Entrypoint, Cmd, WorkingDir, Volumes, Env;
//! (b) `app`: buildImage with fromImage = (a), compressor "none", kvm = false;
//! (c) `flat`: exportImage of (b).
//! A second build (`nix-build --check`) rebuilds each and Nix compares the
//! bytes; the paths and file hashes must not change.
//!
//! Each run puts a fresh label in the config so the derivations are new
//! and really built (the store outlives test runs).

mod common;
#[path = "common/images.rs"]
mod images;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::{json, Value};

use common::*;

/// How nix-build runs here: as root, no build users, no sandbox (so
/// /dev/kvm and the host's QEMU are reachable), nothing downloaded.
const NIX_OPTIONS: &[&str] =
    &["--option", "sandbox", "false", "--option", "build-users-group", "", "--option", "substituters", ""];

/// The busybox applets the images use, linked to the one binary.
const APPLETS: &[&str] = &["sh", "mkdir", "chown", "cat", "echo", "id", "stat", "ls"];

const EXPRESSION: &str = r#"
let
  rar = import @NIXLIB@ { runasroot = @RUNASROOT@; };
  busybox = builtins.path { path = @BUSYBOX@; name = "busybox"; };
  # Like pkgs.buildEnv with one package: bin is a symlink into the store.
  imageRoot = derivation {
    name = "image-root-@NONCE@";
    system = "x86_64-linux";
    builder = "${busybox}/bin/busybox";
    args = [ "sh" "-c" "${busybox}/bin/busybox mkdir $out && ${busybox}/bin/busybox ln -s ${busybox}/bin $out/bin" ];
  };
in rec {
  base = rar.buildImage {
    name = "busybox-redis";
    tag = "latest";
    copyToRoot = imageRoot;
    runAsRoot = ''
      mkdir -p /etc /data
      echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd
      echo 'redis:x:1001:1001:redis:/data:/bin/sh' >> /etc/passwd
      echo 'root:x:0:' > /etc/group
      echo 'redis:x:1001:' >> /etc/group
      chown redis:redis /data
    '';
    config = {
      Entrypoint = [ "/bin/sh" "-c" ];
      Cmd = [ "echo hello from $NAME in $(pwd)" ];
      WorkingDir = "/data";
      Volumes = { "/data" = { }; };
      Env = [ "NAME=redis" "PATH=/bin" ];
      Labels = { "test.run" = "@NONCE@"; };
    };
  };
  app = rar.buildImage {
    name = "App";
    fromImage = base;
    runAsRoot = "echo hi > /data/hello && chown redis /data/hello";
    config = { Env = [ "MODE=app" "NAME=app" ]; Cmd = [ "cat hello; echo $NAME $MODE" ]; };
    compressor = "none";
    kvm = false;
  };
  flat = rar.exportImage { fromImage = app; };
}
"#;

fn nix(tool: &str, args: &[&str], dir: &Path) -> Output {
    let mut cmd = Command::new(tool);
    if tool == "nix-build" {
        cmd.args(NIX_OPTIONS);
    }
    cmd.args(args).current_dir(dir).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("spawn {tool}: {e}"))
}

/// `nix-build test.nix -A ATTR --no-out-link [extra]`: the output path.
fn build(dir: &Path, attr: &str, extra: &[&str]) -> PathBuf {
    let mut args = vec!["test.nix", "-A", attr, "--no-out-link"];
    args.extend_from_slice(extra);
    let out = nix("nix-build", &args, dir);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nix-build -A {attr} {extra:?} failed:\n{log}");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(path.starts_with("/nix/store"), "nix-build printed {path:?}\n{log}");
    path
}

/// `nix-instantiate --eval --json` of an expression.
fn eval(dir: &Path, expr: &str) -> Result<Value, String> {
    let out = nix("nix-instantiate", &["--eval", "--strict", "--json", "-E", expr], dir);
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("nix-instantiate --json prints JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn nix_here() -> bool {
    if !is_root() {
        skip("nix-build here uses the single-user store /nix, owned by root: run the tests as root");
        return false;
    }
    have("nix-build") && have("nix-instantiate")
}

/// A directory with bin/busybox and its applet links (placed in the store
/// by the expression).
fn busybox_dir(parent: &Path) -> PathBuf {
    let dir = parent.join("busybox");
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox-static is installed (.ci/setup)");
    for a in APPLETS {
        symlink("busybox", dir.join("bin").join(a)).unwrap();
    }
    dir
}

fn expression(dir: &Path, nonce: &str) -> String {
    EXPRESSION
        .replace("@NIXLIB@", concat!(env!("CARGO_MANIFEST_DIR"), "/nix"))
        .replace("@RUNASROOT@", env!("CARGO_BIN_EXE_runasroot"))
        .replace("@BUSYBOX@", &busybox_dir(dir).display().to_string())
        .replace("@NONCE@", nonce)
}

fn docker_ok(d: &Dockerd, args: &[&str]) -> String {
    let out = d.docker(args);
    assert!(out.status.success(), "docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nix_builds_the_redis_example_and_exports_it() {
    if !nix_here() {
        return;
    }
    let tmp = scratch();
    let dir = tmp.path();
    let nonce = format!("{}-{}", std::process::id(), std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
    fs::write(dir.join("test.nix"), expression(dir, &nonce)).unwrap();

    // (a), (b), (c) through nix-build; runasroot runs inside the builds
    // with PATH=/path-not-set and HOME=/homeless-shelter.
    let base = build(dir, "base", &[]);
    let app = build(dir, "app", &[]);
    let flat = build(dir, "flat", &[]);
    assert!(base.to_string_lossy().ends_with("-docker-image-busybox-redis.tar.gz"), "{}", base.display());
    assert!(app.to_string_lossy().ends_with("-docker-image-App.tar"), "{}", app.display());
    assert_eq!(fs::read(&base).unwrap()[..2], [0x1f, 0x8b], "compressor gz (the default) compresses the whole archive");
    assert!(!Path::new("/homeless-shelter").exists(), "nothing may create the build's HOME");
    let app_tag = eval(dir, "(import ./test.nix).app.imageTag").unwrap();
    let app_tag = app_tag.as_str().unwrap();
    assert_eq!(app_tag.len(), 32, "a null tag is a hash of the inputs: {app_tag}");
    let app_ref = format!("app:{app_tag}");

    // The derivations: kvm = true (the default) asks for the kvm feature,
    // kvm = false runs anywhere.
    let features = eval(dir, "with import ./test.nix; [ base.drvAttrs.requiredSystemFeatures app.drvAttrs.requiredSystemFeatures ]");
    assert_eq!(features.unwrap(), json!([["kvm"], []]));

    // docker load + docker run: config as given, /data owned by the user.
    if let Some(d) = Dockerd::start() {
        let loaded = docker_ok(&d, &["load", "-i", base.to_str().unwrap()]);
        assert!(loaded.contains("Loaded image: busybox-redis:latest"), "{loaded}");
        let config: Value = serde_json::from_str(&docker_ok(&d, &["image", "inspect", "--format", "{{json .Config}}", "busybox-redis:latest"])).unwrap();
        assert_eq!(config["Entrypoint"], json!(["/bin/sh", "-c"]));
        assert_eq!(config["Cmd"], json!(["echo hello from $NAME in $(pwd)"]));
        assert_eq!(config["WorkingDir"], json!("/data"));
        assert_eq!(config["Volumes"], json!({"/data": {}}));
        assert_eq!(config["Env"], json!(["NAME=redis", "PATH=/bin"]));
        assert_eq!(config["Labels"], json!({"test.run": nonce}));
        let run = |image: &str, extra: &[&str]| {
            let mut args = vec!["run", "--rm", "--network", "none"];
            args.extend_from_slice(extra);
            args.push(image);
            docker_ok(&d, &args)
        };
        assert_eq!(run("busybox-redis:latest", &[]), "hello from redis in /data\n");
        assert_eq!(docker_ok(&d, &["run", "--rm", "--network", "none", "--entrypoint", "stat", "busybox-redis:latest", "-c", "%U:%G %a", "/data"]), "redis:redis 755\n");
        assert_eq!(
            docker_ok(&d, &["run", "--rm", "--network", "none", "--entrypoint", "id", "busybox-redis:latest", "redis"]),
            "uid=1001(redis) gid=1001(redis) groups=1001(redis)\n"
        );
        // bin is a real directory (copyToRoot's dirlink followed), and its
        // symlinks' targets in /nix/store came along (the closure).
        let ls = docker_ok(&d, &["run", "--rm", "--network", "none", "--entrypoint", "stat", "busybox-redis:latest", "-c", "%F", "/bin", "/bin/busybox"]);
        assert_eq!(ls, "directory\nregular file\n");

        let loaded = docker_ok(&d, &["load", "-i", app.to_str().unwrap()]);
        assert!(loaded.contains(&format!("Loaded image: {app_ref}")), "name lowercased, tag from the inputs: {loaded}");
        // Env merged by name over the base's; the rest of the base kept.
        assert_eq!(run(&app_ref, &[]), "hi\napp app\n");
        let config: Value = serde_json::from_str(&docker_ok(&d, &["image", "inspect", "--format", "{{json .Config}}", &app_ref])).unwrap();
        assert_eq!(config["Env"], json!(["NAME=app", "PATH=/bin", "MODE=app"]));
        assert_eq!(config["WorkingDir"], json!("/data"));
        assert_eq!(config["Entrypoint"], json!(["/bin/sh", "-c"]));
        assert_eq!(docker_ok(&d, &["run", "--rm", "--network", "none", "--entrypoint", "stat", &app_ref, "-c", "%U", "/data/hello"]), "redis\n");
    }

    // skopeo: (b) directly; (a) once decompressed (skopeo 1.9 does not
    // read a compressed docker-archive; newer ones and docker load do).
    if have("skopeo") {
        let inspect: Value = serde_json::from_str(&skopeo(&["inspect", &format!("docker-archive:{}", app.display())])).unwrap();
        assert_eq!(inspect["Layers"].as_array().unwrap().len(), 2);
        assert_eq!(inspect["Architecture"], json!("amd64"));
        assert_eq!(inspect["Labels"], json!({"test.run": nonce}));
        let config: Value = serde_json::from_str(&skopeo(&["inspect", "--config", &format!("docker-archive:{}", app.display())])).unwrap();
        assert_eq!(config["config"]["Cmd"], json!(["cat hello; echo $NAME $MODE"]));
        assert_eq!(config["created"], json!("1970-01-01T00:00:01Z"));
        let plain = dir.join("base.tar");
        let mut gz = flate2::read::GzDecoder::new(fs::File::open(&base).unwrap());
        std::io::copy(&mut gz, &mut fs::File::create(&plain).unwrap()).unwrap();
        let inspect: Value = serde_json::from_str(&skopeo(&["inspect", &format!("docker-archive:{}", plain.display())])).unwrap();
        assert_eq!(inspect["Layers"].as_array().unwrap().len(), 1, "from nothing: one layer");
        assert_eq!(inspect["Env"], json!(["NAME=redis", "PATH=/bin"]));
    }

    // (c) equals `runasroot export` of (b), byte for byte.
    let out = subdir(dir, "out");
    ok(runasroot(&["export", "--base", app.to_str().unwrap(), "-o", out.join("flat.tar").to_str().unwrap()], &subdir(dir, "t")));
    let ours = fs::read(out.join("flat.tar")).unwrap();
    assert_eq!(fs::read(&flat).unwrap(), ours, "exportImage = runasroot export");
    let entries = listing(&ours);
    for want in ["bin/ dir 555 0:0 0", "data/ dir 755 1001:1001 0", "data/hello file 644 1001:0 3", "nix/ dir 755 0:0 0", "nix/store/ dir 755 0:0 0"] {
        assert!(entries.iter().any(|e| e == want), "{want} in the export: {entries:#?}");
    }

    // Built again, the same paths and the same bytes (`--check` rebuilds
    // and fails on any difference).
    let before: Vec<String> = [&base, &app, &flat].iter().map(|p| images::sha256_file(p)).collect();
    for (attr, path) in [("base", &base), ("app", &app), ("flat", &flat)] {
        assert_eq!(&build(dir, attr, &[]), path, "same expression, same output path");
        assert_eq!(&build(dir, attr, &["--check"]), path, "rebuilt with --check");
    }
    let after: Vec<String> = [&base, &app, &flat].iter().map(|p| images::sha256_file(p)).collect();
    assert_eq!(before, after);

    // Leave the store as it was (best effort: nothing else refers to these).
    let _ = Command::new("nix-store").arg("--delete").args([&flat, &app, &base]).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

#[test]
fn nix_library_refuses_what_it_cannot_do() {
    if !nix_here() {
        return;
    }
    let tmp = scratch();
    let lib = concat!(env!("CARGO_MANIFEST_DIR"), "/nix");
    let with = |args: &str| format!("let rar = import {lib} {{ runasroot = /bin/true; }}; in (rar.buildImage ({{ name = \"x\"; }} // {args})).drvPath");
    let cases = [
        ("{ extraCommands = \"touch x\"; }", "runasroot buildImage x: extraCommands is not supported: it ran outside the image as the build user; put those commands in runAsRoot"),
        ("{ uid = 1000; }", "uid/gid are not supported: copyToRoot is copied owned by root; chown in runAsRoot instead"),
        ("{ includeNixDB = true; }", "includeNixDB is not supported"),
        ("{ contents = /tmp; }", "contents is deprecated in nixpkgs and not supported here: use copyToRoot"),
        ("{ includeStorePaths = false; }", "includeStorePaths is a streamLayeredImage argument"),
        ("{ maxLayers = 10; }", "maxLayers is a buildLayeredImage argument"),
        ("{ fakeRootCommands = \"\"; }", "fakeRootCommands/enableFakechroot are buildLayeredImage arguments"),
        ("{ architecture = \"arm64\"; }", "architecture = \"arm64\" is not supported: runasroot's guest is x86-64"),
        ("{ compressor = \"xz\"; }", "compressor = \"xz\"; it must be one of: gz, none, zstd"),
        ("{ fromImageTag = \"1\"; fromImage = /tmp; }", "fromImageTag = \"1\" needs fromImageName too"),
    ];
    for (args, want) in cases {
        let err = eval(tmp.path(), &with(args)).expect_err(args);
        assert!(err.contains(want), "{args}: {err}");
    }
    // The names buildImage shares with nixpkgs map onto runasroot's flags.
    let drv = eval(
        tmp.path(),
        &format!(
            "let rar = import {lib} {{ runasroot = /bin/true; qemu = \"/opt/qemu/bin/qemu-system-x86_64\"; }};
                 d = rar.buildImage {{ name = \"My/Redis\"; fromImage = /bin/true; fromImageName = \"base\"; fromImageTag = \"7\";
                   diskSize = 2048; buildVMMemorySize = 1024; created = \"2024-01-01T00:00:00Z\"; compressor = \"zstd\"; kvm = false; }};
             in {{ inherit (d) name imageName imageTag; args = d.drvAttrs.args; }}"
        ),
    )
    .unwrap();
    assert_eq!(drv["name"], json!("docker-image-Redis.tar.zst"));
    assert_eq!(drv["imageName"], json!("my/redis"));
    let args: Vec<&str> = drv["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let flag = |f: &str| args.iter().position(|a| *a == f).map(|i| args[i + 1]);
    assert!(flag("--base").unwrap().starts_with("/nix/store/"), "{args:?}");
    assert_eq!(flag("--from-image"), Some("base:7"));
    assert_eq!(flag("--disk-size"), Some("2048"));
    assert_eq!(flag("--memory"), Some("1024"));
    assert_eq!(flag("--created"), Some("2024-01-01T00:00:00Z"));
    assert_eq!(flag("--compress-archive"), Some("zstd"));
    assert_eq!(flag("--qemu"), Some("/opt/qemu/bin/qemu-system-x86_64"));
    assert_eq!(flag("--tag"), Some(format!("my/redis:{}", drv["imageTag"].as_str().unwrap()).as_str()));
    assert_eq!(flag("--script"), None, "no runAsRoot, no script");
    assert_eq!(flag("--copy-dirlinks"), None);
}
