//! Tier 2, issue 4 "Output": every output format and compression, checked
//! with the clients users load images with — `skopeo inspect`, `skopeo
//! copy` to an OCI layout, `umoci raw unpack` (as root), `docker load` into
//! a private dockerd plus `docker run --network none … stat` — and
//! reproducibility across working directory, umask and TZ.
//!
//! Where a client cannot read a case it is not asked to: umoci 0.4.7 has
//! no zstd, dockerd 20.10 neither, and dockerd loads docker-archives only.

mod common;
#[path = "common/images.rs"]
mod images;
mod helpers;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use common::*;
use helpers::*;
use images::*;

const SCRIPT: &str = "mkdir /data && chown 1000:1000 /data && echo hello > /data/hello\n";
const NEW_LAYER: [&str; 2] = ["data/ dir 755 1000:1000 0", "data/hello file 644 0:0 6"];

/// busybox, then a gzip layer (its bytes must come out unchanged), with
/// config fields the output must keep.
fn base_image() -> Option<Image> {
    let bb = busybox_image()?;
    Some(Image {
        layers: vec![bb.layers[0].clone(), layer(vec![dir("etc"), file("etc/motd", "base\n")]).gzip()],
        ..bb
    }
    .runtime("Labels", json!({"org.example.keep": "yes"}))
    .runtime("ExposedPorts", json!({"6379/tcp": {}})))
}

struct Base {
    dir: tempfile::TempDir,
    built: Built,
}

fn base() -> Option<Base> {
    let img = base_image()?;
    let dir = scratch();
    let built = write(&dir.path().join("base.tar"), &Build::new(Format::DockerHybrid), &[img]);
    Some(Base { dir, built })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Out {
    DockerArchive,
    Oci,
    OciArchive,
}

impl Out {
    fn transport(self, path: &Path) -> String {
        match self {
            Out::DockerArchive => format!("docker-archive:{}", path.display()),
            Out::Oci => format!("oci:{}", path.display()),
            Out::OciArchive => format!("oci-archive:{}", path.display()),
        }
    }
}

/// What an output must be.
struct Want<'a> {
    format: Out,
    codec: Compression,
    created: &'a str,
    epoch: u64,
}

/// Checks an output image against the base and `want`, then with the real
/// clients. `layer` is --layer-output's bytes when one was asked for.
fn check_output(b: &Base, path: &Path, want: &Want, layer: Option<&[u8]>) {
    let scratch = b.dir.path().join(format!("check-{}", path.file_name().unwrap().to_string_lossy()));
    fs::create_dir_all(&scratch).unwrap();
    let out = OutImage::open(path, &scratch);
    let base = &b.built.images[0];
    let n = base.layer_digests.len();

    // The new layer, entry by entry, every mtime the epoch.
    let new = out.new_layer();
    assert_eq!(listing(&new), NEW_LAYER);
    assert!(mtimes(&new).iter().all(|&m| m == want.epoch), "mtimes {:?}, want {}", mtimes(&new), want.epoch);
    if let Some(l) = layer {
        assert_eq!(new, l, "--layer-output is the image's new layer, uncompressed");
    }
    let stored = fs::read(&out.layers[n].path).unwrap();
    let magic = match want.codec {
        Compression::None => &b"data"[..0],
        Compression::Gzip => &[0x1f, 0x8b][..],
        Compression::Zstd => &[0x28, 0xb5, 0x2f, 0xfd][..],
    };
    assert!(stored.starts_with(magic), "new layer compressed as {:?}", want.codec);
    if want.codec == Compression::None {
        assert_eq!(stored, new);
    }
    // Media types say what the bytes are.
    if let Some(m) = &out.manifest {
        for (i, l) in m["layers"].as_array().unwrap().iter().enumerate() {
            let mt = l["mediaType"].as_str().unwrap();
            let bytes = fs::read(&out.layers[i].path).unwrap();
            let is = |magic: &[u8]| bytes.starts_with(magic);
            assert_eq!(mt.contains("gzip"), is(&[0x1f, 0x8b]), "layer {i} media type {mt}");
            assert_eq!(mt.contains("zstd"), is(&[0x28, 0xb5, 0x2f, 0xfd]), "layer {i} media type {mt}");
        }
    }

    // Base layers byte for byte; diff_ids appended.
    let got: Vec<&str> = out.layers[..n].iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(got, base.layer_digests.iter().map(String::as_str).collect::<Vec<_>>(), "base layers byte for byte");
    let mut diff_ids = base.diff_ids.clone();
    diff_ids.push(format!("sha256:{}", sha256_hex(&new)));
    assert_eq!(out.diff_ids(), diff_ids);

    // Config: the base's settings kept, created and history as asked.
    let c = &out.config;
    assert_eq!(c["architecture"], base.config["architecture"]);
    assert_eq!(c["os"], base.config["os"]);
    assert_eq!(c["config"], base.config["config"], "Env, Cmd, Labels, ExposedPorts kept");
    assert_eq!(c["created"], json!(want.created));
    let history = c["history"].as_array().unwrap();
    let base_history = base.config["history"].as_array().unwrap();
    assert_eq!(history.len(), base_history.len() + 1);
    assert_eq!(&history[..base_history.len()], &base_history[..]);
    let last = &history[base_history.len()];
    assert_eq!(last["created"], json!(want.created));
    assert!(last["created_by"].as_str().unwrap_or("").contains("runasroot"), "history says runasroot made it: {last}");
    assert_ne!(last["empty_layer"], json!(true));

    check_with_clients(b, path, want, &diff_ids, &scratch);
}

fn check_with_clients(b: &Base, path: &Path, want: &Want, diff_ids: &[String], scratch: &Path) {
    let base = &b.built.images[0];
    let n = base.layer_digests.len();
    let transports = match want.format {
        // The hybrid docker-archive is read as an OCI archive too.
        Out::DockerArchive => vec![want.format.transport(path), Out::OciArchive.transport(path)],
        f => vec![f.transport(path)],
    };
    if !have("skopeo") {
        return;
    }
    for t in &transports {
        let v: Value = serde_json::from_str(&skopeo(&["inspect", t])).unwrap();
        assert_eq!(v["Layers"].as_array().unwrap().len(), n + 1, "skopeo inspect {t}");
        assert_eq!(v["Env"], base.config["config"]["Env"], "skopeo inspect {t}");
        assert_eq!(v["Labels"], base.config["config"]["Labels"], "skopeo inspect {t}");
        let cfg: Value = serde_json::from_str(&skopeo(&["inspect", "--config", t])).unwrap();
        assert_eq!(cfg["rootfs"]["diff_ids"], json!(diff_ids), "skopeo inspect --config {t}");
    }
    let copy = scratch.join("skopeo-copy");
    skopeo(&["copy", &transports[0], &format!("oci:{}:check", copy.display())]);

    if want.codec == Compression::Zstd {
        eprintln!("note: umoci and docker not tried on a zstd layer (umoci 0.4.7 and dockerd 20.10 cannot read zstd)");
        return;
    }
    if !is_root() {
        skip("umoci raw unpack needs root to restore owners");
    } else if have("umoci") {
        let rootfs = scratch.join("rootfs");
        must(Command::new("umoci").args(["raw", "unpack", "--image"]).arg(format!("{}:check", copy.display())).arg(&rootfs));
        let data = fs::metadata(rootfs.join("data")).unwrap();
        assert_eq!((data.uid(), data.gid()), (1000, 1000), "umoci: /data owner");
        assert_eq!(fs::read_to_string(rootfs.join("data/hello")).unwrap(), "hello\n");
        assert_eq!(fs::read_to_string(rootfs.join("etc/motd")).unwrap(), "base\n", "umoci: the gzip base layer");
        eprintln!("checked: umoci raw unpack of {}", path.display());
    }
    if want.format == Out::DockerArchive {
        docker_check(path, diff_ids);
    }
}

/// `docker load` into a private dockerd, then `docker run` on the result.
fn docker_check(path: &Path, diff_ids: &[String]) {
    let Some(d) = Dockerd::start() else { return };
    let load = d.docker(&["load", "-i", path.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&load.stdout).into_owned();
    assert!(load.status.success(), "docker load: {}{stdout}", String::from_utf8_lossy(&load.stderr));
    let reference = stdout
        .lines()
        .find_map(|l| l.strip_prefix("Loaded image: ").or_else(|| l.strip_prefix("Loaded image ID: ")))
        .unwrap_or_else(|| panic!("docker load said {stdout:?}"))
        .trim()
        .to_string();
    let inspect = d.docker(&["image", "inspect", "--format", "{{json .RootFS.Layers}}", &reference]);
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let layers: Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(layers, json!(diff_ids), "docker sees the diff_ids");
    let run = d.docker(&["run", "--rm", "--network", "none", &reference, "stat", "-c", "%u:%g", "/data"]);
    assert!(run.status.success(), "docker run: {}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), "1000:1000", "docker run … stat /data");
    eprintln!("checked: docker load {} + docker run {reference} stat /data", path.display());
}

/// How a run differs from the other: working directory (a fresh one each),
/// umask, TZ and, when the tests run as root, the unprivileged user.
struct Variant {
    umask: &'static str,
    tz: &'static str,
    uid: u32,
}

const VARIANTS: [Variant; 2] = [
    Variant { umask: "0022", tz: "UTC", uid: NOBODY },
    Variant { umask: "0077", tz: "Asia/Tokyo", uid: 12345 },
];

/// One run as `v` says, with SOURCE_DATE_EPOCH `sde`.
fn run_in(args: &[&str], tmp: &Path, cwd: &Path, v: &Variant, sde: Option<&str>) -> Run {
    let (program, cmd_args): (String, Vec<String>) = if is_root() {
        let id = v.uid.to_string();
        let mut a: Vec<String> = ["--reuid", &id, "--regid", &id, "--clear-groups", "--", bin()].iter().map(|s| s.to_string()).collect();
        a.extend(args.iter().map(|s| s.to_string()));
        ("setpriv".into(), a)
    } else {
        (bin().into(), args.iter().map(|s| s.to_string()).collect())
    };
    let umask = v.umask;
    // umask is a process attribute: set it through a shell around the command.
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
        .arg(program)
        .args(cmd_args)
        .current_dir(cwd)
        .env("TMPDIR", tmp)
        .env("TZ", v.tz)
        .env_remove("SOURCE_DATE_EPOCH")
        .stdin(Stdio::null());
    if let Some(s) = sde {
        shell.env("SOURCE_DATE_EPOCH", s);
    }
    let run = finish(shell.output().unwrap());
    assert_empty_dir(tmp);
    run
}

fn paths(b: &Base, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let s = script(b.dir.path(), "s.sh", SCRIPT);
    (s, b.dir.path().join(format!("{tag}-out")), b.dir.path().join(format!("{tag}-layer.tar")))
}

#[test]
fn default_docker_archive_with_a_tag_loads_everywhere() {
    let Some(b) = base() else { return };
    let (s, out, layer) = paths(&b, "a");
    let tmp = subdir(b.dir.path(), "tmp");
    let run = runasroot(
        &["--base", b.built.path.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap(), "--layer-output", layer.to_str().unwrap(), "--tag", "e2e-clients:a"],
        &tmp,
    );
    let run = ok(run);
    assert_empty_dir(&tmp);
    // Not a terminal: no progress display, only plain lines.
    assert!(!run.stderr.contains('\r') && !run.stderr.contains('\x1b'), "progress output on a pipe: {run:?}");
    let want = Want { format: Out::DockerArchive, codec: Compression::None, created: "1970-01-01T00:00:01Z", epoch: 1 };
    check_output(&b, &out, &want, Some(&fs::read(&layer).unwrap()));
    let img = OutImage::open(&out, &b.dir.path().join("tags"));
    assert_eq!(img.repo_tags(), vec!["e2e-clients:a"], "--tag in manifest.json");
    assert!(img.index.is_some(), "the default docker-archive is the hybrid one (index.json + manifest.json)");
}

#[test]
fn oci_layout_with_gzip_and_created() {
    let Some(b) = base() else { return };
    let (s, out, _) = paths(&b, "b");
    let tmp = subdir(b.dir.path(), "tmp");
    let run = runasroot(
        &["--base", b.built.path.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap(), "--format", "oci", "--compress", "gzip", "--created", "2020-01-02T03:04:05Z", "--tag", "e2e-clients:b"],
        &tmp,
    );
    ok(run);
    assert!(out.is_dir(), "--format oci writes a directory");
    let want = Want { format: Out::Oci, codec: Compression::Gzip, created: "2020-01-02T03:04:05Z", epoch: 1_577_934_245 };
    check_output(&b, &out, &want, None);
}

#[test]
fn oci_archive_with_zstd_to_stdout_is_reproducible() {
    let Some(b) = base() else { return };
    let (s, _, _) = paths(&b, "c");
    let mut outputs = vec![];
    for (i, v) in VARIANTS.iter().enumerate() {
        let tmp = subdir(b.dir.path(), &format!("tmp{i}"));
        let cwd = subdir(b.dir.path(), &format!("cwd{i}"));
        let run = run_in(
            &["--base", b.built.path.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", "-", "--format", "oci-archive", "--compress", "zstd", "-q"],
            &tmp,
            &cwd,
            v,
            Some("1700000000"),
        );
        outputs.push(ok(run).stdout);
    }
    assert!(!outputs[0].is_empty(), "-o - writes the image to stdout");
    assert!(outputs[0] == outputs[1], "-o - differs between runs (cwd, umask, TZ, user)");
    let path = b.dir.path().join("c-out.tar");
    fs::write(&path, &outputs[0]).unwrap();
    // SOURCE_DATE_EPOCH gives both the created time and the mtimes.
    let want = Want { format: Out::OciArchive, codec: Compression::Zstd, created: "2023-11-14T22:13:20Z", epoch: 1_700_000_000 };
    check_output(&b, &path, &want, None);
}

#[test]
fn gzip_docker_archive_is_reproducible_and_loads() {
    let Some(b) = base() else { return };
    let (s, _, _) = paths(&b, "d");
    let mut outputs = vec![];
    for (i, v) in VARIANTS.iter().enumerate() {
        let tmp = subdir(b.dir.path(), &format!("tmp{i}"));
        let cwd = subdir(b.dir.path(), &format!("cwd{i}"));
        let out = b.dir.path().join(format!("d-out{i}.tar"));
        let layer = b.dir.path().join(format!("d-layer{i}.tar"));
        let run = run_in(
            &["--base", b.built.path.to_str().unwrap(), "--script", s.to_str().unwrap(), "-o", out.to_str().unwrap(), "--layer-output", layer.to_str().unwrap(), "--compress", "gzip"],
            &tmp,
            &cwd,
            v,
            None,
        );
        ok(run);
        outputs.push((fs::read(&out).unwrap(), fs::read(&layer).unwrap(), out));
    }
    assert!(outputs[0].0 == outputs[1].0, "-o differs between runs (cwd, umask, TZ, user)");
    assert!(outputs[0].1 == outputs[1].1, "--layer-output differs between runs");
    let want = Want { format: Out::DockerArchive, codec: Compression::Gzip, created: "1970-01-01T00:00:01Z", epoch: 1 };
    check_output(&b, &outputs[0].2, &want, Some(&outputs[0].1));
}
