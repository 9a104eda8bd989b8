//! Helpers of the issue-4 end-to-end proofs (tests/e2e_*.rs and
//! benches/debian.rs), beside the shared ones in tests/common:
//!
//! * [`rar_helper`]: a tiny static C program (rar-helper.c) for what
//!   busybox cannot do inside the guest (setxattr, binding a unix socket);
//! * [`OutImage`]: reads back an image runasroot wrote (docker-archive,
//!   OCI layout or OCI archive) without using the runasroot crate, checking
//!   every digest on the way;
//! * [`debian_minbase`] / [`debian_entries`]: the flagship's Debian
//!   bookworm minbase rootfs, built once by mmdebstrap and cached outside
//!   the clone.
//!
//! Include with `mod helpers;` after `#[path = "common/images.rs"] mod images;`
//! (the Debian wrapper builds fixture entries).

#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::images;

// ---------------------------------------------------------------------------
// The guest-side helper binary
// ---------------------------------------------------------------------------

/// Where the helper is installed in the bases that carry it (on Docker's
/// default PATH, so scripts call it by name).
pub const RAR_HELPER_IN_IMAGE: &str = "usr/local/bin/rar-helper";

/// The static rar-helper binary, compiled once per target dir with gcc;
/// None (after printing why) when gcc or a static libc is missing.
pub fn rar_helper() -> Option<Vec<u8>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helpers/rar-helper.c");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helpers");
    fs::create_dir_all(&dir).ok()?;
    let src_bytes = fs::read(&src).expect("tests/helpers/rar-helper.c");
    // Keyed by the source, so an edit rebuilds it; built under a private
    // name then renamed, so concurrent test binaries never see half a file.
    let out = dir.join(format!("rar-helper-{}", &images::sha256_hex(&src_bytes)[..16]));
    if !out.exists() {
        let tmp = dir.join(format!("rar-helper.{}.tmp", std::process::id()));
        let status = Command::new("gcc").args(["-static", "-O2", "-Wall", "-o"]).arg(&tmp).arg(&src).status();
        match status {
            Ok(s) if s.success() => fs::rename(&tmp, &out).expect("rename rar-helper"),
            other => {
                skip(&format!("cannot build tests/helpers/rar-helper.c with `gcc -static` ({other:?}); install gcc and libc6-dev"));
                return None;
            }
        }
    }
    Some(fs::read(&out).expect("read rar-helper"))
}

// ---------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------

/// `sha256:<hex>` of a file, streamed.
pub fn file_digest(path: &Path) -> String {
    format!("sha256:{}", images::sha256_file(path))
}

/// Runs a command and returns (success, stdout, stderr).
pub fn run_tool(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs a command that must succeed; returns its stdout.
pub fn must(cmd: &mut Command) -> String {
    let (ok, out, err) = run_tool(cmd);
    assert!(ok, "{cmd:?} failed:\n{err}\n{out}");
    out
}

/// One 512-byte ustar header block, as written (what the `tar` crate
/// hides: PAX vs GNU long-name records, user and group names).
#[derive(Debug)]
pub struct RawHeader {
    pub typeflag: u8,
    /// The 100-byte name field, up to its first NUL.
    pub name: Vec<u8>,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    /// magic + version (`ustar\0` `00` for POSIX ustar).
    pub magic: Vec<u8>,
}

/// The header blocks of a plain tar, in order (PAX `x` records included).
pub fn raw_headers(tar: &[u8]) -> Vec<RawHeader> {
    let field = |b: &[u8]| b.iter().take_while(|&&c| c != 0).copied().collect::<Vec<u8>>();
    let mut out = vec![];
    let mut at = 0;
    while at + 512 <= tar.len() {
        let h = &tar[at..at + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let size_field = String::from_utf8_lossy(&field(&h[124..136])).trim().to_string();
        let size = u64::from_str_radix(if size_field.is_empty() { "0" } else { &size_field }, 8)
            .unwrap_or_else(|_| panic!("non-octal size field {size_field:?} at offset {at}"));
        out.push(RawHeader {
            typeflag: h[156],
            name: field(&h[0..100]),
            uname: field(&h[265..297]),
            gname: field(&h[297..329]),
            magic: h[257..265].to_vec(),
        });
        at += 512 + (size.div_ceil(512) * 512) as usize;
    }
    out
}

// ---------------------------------------------------------------------------
// Reading back an image runasroot wrote
// ---------------------------------------------------------------------------

/// One layer of an output image.
#[derive(Debug, Clone)]
pub struct OutLayer {
    /// `sha256:…` of the stored blob (checked against the file).
    pub digest: String,
    /// OCI media type (None when only manifest.json describes the image).
    pub media_type: Option<String>,
    pub size: u64,
    pub path: PathBuf,
}

impl OutLayer {
    /// The layer tar, decompressed by magic.
    pub fn tar_bytes(&self) -> Vec<u8> {
        images::decompress(fs::read(&self.path).unwrap())
    }
}

/// An image as written by runasroot, unpacked into a directory.
#[derive(Debug)]
pub struct OutImage {
    /// The directory holding the layout (the output itself for `--format oci`).
    pub root: PathBuf,
    pub config: Value,
    pub config_digest: String,
    pub layers: Vec<OutLayer>,
    /// index.json, when present (OCI layout and hybrid docker-archive).
    pub index: Option<Value>,
    /// The OCI manifest, when index.json is present.
    pub manifest: Option<Value>,
    /// manifest.json, when present (docker-archive).
    pub docker_manifest: Option<Value>,
}

fn read_json(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn blob_path(root: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("not a sha256 digest: {digest}"));
    root.join("blobs/sha256").join(hex)
}

impl OutImage {
    /// Opens `path` (an archive is extracted under `scratch` with GNU tar)
    /// and checks that every blob hashes to the digest that names it and
    /// that manifest.json and index.json, when both exist, agree.
    pub fn open(path: &Path, scratch: &Path) -> OutImage {
        let root = if path.is_dir() {
            path.to_path_buf()
        } else {
            let root = scratch.join(format!("unpacked-{}", path.file_name().unwrap().to_string_lossy()));
            fs::create_dir_all(&root).unwrap();
            must(Command::new("tar").arg("-xf").arg(path).arg("-C").arg(&root));
            root
        };
        let index = root.join("index.json").exists().then(|| read_json(&root.join("index.json")));
        let docker_manifest = root.join("manifest.json").exists().then(|| read_json(&root.join("manifest.json")));
        assert!(index.is_some() || docker_manifest.is_some(), "{} has neither index.json nor manifest.json", path.display());

        let mut from_index = None;
        if let Some(index) = &index {
            assert!(root.join("oci-layout").exists(), "an OCI layout needs oci-layout");
            let manifests = index["manifests"].as_array().expect("index.json manifests");
            assert_eq!(manifests.len(), 1, "one image written: {index}");
            let mdesc = &manifests[0];
            let mdigest = mdesc["digest"].as_str().unwrap();
            let mpath = blob_path(&root, mdigest);
            assert_eq!(file_digest(&mpath), mdigest, "manifest blob digest");
            assert_eq!(fs::metadata(&mpath).unwrap().len(), mdesc["size"].as_u64().unwrap(), "manifest size");
            let manifest = read_json(&mpath);
            assert_eq!(manifest["schemaVersion"], 2);
            let cdigest = manifest["config"]["digest"].as_str().unwrap().to_string();
            let layers: Vec<OutLayer> = manifest["layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| OutLayer {
                    digest: l["digest"].as_str().unwrap().to_string(),
                    media_type: l["mediaType"].as_str().map(str::to_string),
                    size: l["size"].as_u64().unwrap(),
                    path: blob_path(&root, l["digest"].as_str().unwrap()),
                })
                .collect();
            from_index = Some((manifest, cdigest, layers));
        }

        let mut from_docker = None;
        if let Some(dm) = &docker_manifest {
            let list = dm.as_array().expect("manifest.json is a list");
            assert_eq!(list.len(), 1, "one image written: {dm}");
            let config_path = root.join(list[0]["Config"].as_str().unwrap());
            let cdigest = file_digest(&config_path);
            let layers: Vec<OutLayer> = list[0]["Layers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    let p = root.join(l.as_str().unwrap());
                    OutLayer { digest: file_digest(&p), media_type: None, size: fs::metadata(&p).unwrap().len(), path: p }
                })
                .collect();
            from_docker = Some((cdigest, layers));
        }

        let (manifest, config_digest, layers) = match (from_index, &from_docker) {
            (Some((manifest, cdigest, layers)), Some((dcdigest, dlayers))) => {
                assert_eq!(&cdigest, dcdigest, "manifest.json and index.json name different configs");
                let a: Vec<_> = layers.iter().map(|l| &l.digest).collect();
                let b: Vec<_> = dlayers.iter().map(|l| &l.digest).collect();
                assert_eq!(a, b, "manifest.json and index.json list different layers");
                (Some(manifest), cdigest, layers)
            }
            (Some((manifest, cdigest, layers)), None) => (Some(manifest), cdigest, layers),
            (None, Some((cdigest, layers))) => (None, cdigest.clone(), layers.clone()),
            (None, None) => unreachable!(),
        };
        let config_path = blob_path(&root, &config_digest);
        let config_path = if config_path.exists() {
            config_path
        } else {
            root.join(docker_manifest.as_ref().unwrap()[0]["Config"].as_str().unwrap())
        };
        assert_eq!(file_digest(&config_path), config_digest, "config digest");
        for l in &layers {
            assert_eq!(file_digest(&l.path), l.digest, "layer blob {} hashes to its digest", l.path.display());
            assert_eq!(fs::metadata(&l.path).unwrap().len(), l.size, "layer blob {} size", l.path.display());
        }
        OutImage { root, config: read_json(&config_path), config_digest, layers, index, manifest, docker_manifest }
    }

    /// The config's rootfs.diff_ids.
    pub fn diff_ids(&self) -> Vec<String> {
        self.config["rootfs"]["diff_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
    }

    /// The new (top) layer, decompressed.
    pub fn new_layer(&self) -> Vec<u8> {
        self.layers.last().expect("at least one layer").tar_bytes()
    }

    /// manifest.json's RepoTags (empty when absent or null).
    pub fn repo_tags(&self) -> Vec<String> {
        self.docker_manifest
            .as_ref()
            .and_then(|m| m[0]["RepoTags"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }
}

// ---------------------------------------------------------------------------
// The Debian bookworm minbase base
// ---------------------------------------------------------------------------

/// SOURCE_DATE_EPOCH pinned for mmdebstrap (2023-11-14T22:13:20Z): the
/// cache key, and the mtime of every file of the base.
pub const DEBIAN_EPOCH: u64 = 1_700_000_000;
/// A tar someone may already have built on this machine with the same
/// command and epoch: used to seed the cache.
pub const DEBIAN_SEED: &str = "/tmp/debian-minbase.tar";

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("runasroot")
}

/// `mmdebstrap --variant=minbase --format=tar bookworm` with
/// SOURCE_DATE_EPOCH=[`DEBIAN_EPOCH`], cached in ~/.cache/runasroot (outside
/// the clone). Err(reason) when it cannot be had here (not root, no
/// mmdebstrap, no network): the caller prints "skipped: reason".
pub fn debian_minbase() -> Result<PathBuf, String> {
    let dir = cache_dir();
    let cached = dir.join(format!("debian-bookworm-minbase-{DEBIAN_EPOCH}.tar"));
    if cached.exists() {
        return Ok(cached);
    }
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create the cache dir {}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".debian-minbase.{}.tmp", std::process::id()));
    if Path::new(DEBIAN_SEED).exists() && looks_like_minbase(Path::new(DEBIAN_SEED)) {
        fs::copy(DEBIAN_SEED, &tmp).map_err(|e| format!("cannot copy {DEBIAN_SEED}: {e}"))?;
    } else {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("building the Debian base needs root (mmdebstrap)".into());
        }
        let found = Command::new("sh").args(["-c", "command -v mmdebstrap"]).stdout(Stdio::null()).status();
        if !found.map(|s| s.success()).unwrap_or(false) {
            return Err("mmdebstrap is not installed (apt-get install mmdebstrap)".into());
        }
        eprintln!("building the Debian bookworm minbase base with mmdebstrap (about 80 s, cached in {})", dir.display());
        let out = Command::new("mmdebstrap")
            .args(["--variant=minbase", "--format=tar", "--quiet", "bookworm"])
            .arg(&tmp)
            .env("SOURCE_DATE_EPOCH", DEBIAN_EPOCH.to_string())
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run mmdebstrap: {e}"))?;
        if !out.status.success() {
            let _ = fs::remove_file(&tmp);
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            return Err(format!("mmdebstrap failed (no network?): {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | ")));
        }
    }
    fs::rename(&tmp, &cached).map_err(|e| format!("cannot move the Debian base into the cache: {e}"))?;
    Ok(cached)
}

/// Whether a tar holds a Debian root (etc/debian_version and usr/sbin/useradd).
fn looks_like_minbase(path: &Path) -> bool {
    let Ok(f) = File::open(path) else { return false };
    let mut a = tar::Archive::new(io::BufReader::new(f));
    let Ok(entries) = a.entries() else { return false };
    let mut seen = (false, false);
    for e in entries {
        let Ok(e) = e else { return false };
        let p = e.path_bytes().into_owned();
        let p = p.strip_prefix(b"./").unwrap_or(&p);
        seen.0 |= p == b"etc/debian_version";
        seen.1 |= p == b"usr/sbin/useradd";
    }
    seen.0 && seen.1
}

/// Strips mmdebstrap's `./` prefix and the trailing `/` of directories.
fn rootfs_name(raw: &[u8]) -> Vec<u8> {
    let p = raw.strip_prefix(b"./").unwrap_or(raw);
    let p = p.strip_suffix(b"/").unwrap_or(p);
    p.to_vec()
}

/// The entries of a rootfs tar as fixture entries (names without `./`,
/// no entry for the root itself, xattrs kept), to wrap it as an image
/// layer with the fixtures. Also returns the total of file sizes.
pub fn debian_entries(rootfs_tar: &Path) -> (Vec<images::Entry>, u64) {
    let f = File::open(rootfs_tar).unwrap_or_else(|e| panic!("open {}: {e}", rootfs_tar.display()));
    let mut a = tar::Archive::new(io::BufReader::with_capacity(1 << 20, f));
    let mut out = vec![];
    let mut content = 0u64;
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = rootfs_name(&e.path_bytes());
        if path.is_empty() || path == b"." {
            continue;
        }
        let h = e.header().clone();
        let dev = || (h.device_major().unwrap().unwrap_or(0), h.device_minor().unwrap().unwrap_or(0));
        let kind = match h.entry_type() {
            tar::EntryType::Directory => images::Kind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut v = Vec::with_capacity(e.size() as usize);
                e.read_to_end(&mut v).unwrap();
                content += v.len() as u64;
                images::Kind::File(v)
            }
            tar::EntryType::Symlink => images::Kind::Symlink(e.link_name_bytes().unwrap().into_owned()),
            tar::EntryType::Link => images::Kind::Hardlink(rootfs_name(&e.link_name_bytes().unwrap())),
            tar::EntryType::Char => images::Kind::Char(dev().0, dev().1),
            tar::EntryType::Block => images::Kind::Block(dev().0, dev().1),
            tar::EntryType::Fifo => images::Kind::Fifo,
            other => panic!("unexpected entry type {other:?} in {}", rootfs_tar.display()),
        };
        let xattrs = e
            .pax_extensions()
            .unwrap()
            .map(|exts| {
                exts.filter_map(|x| {
                    let x = x.unwrap();
                    x.key().unwrap().strip_prefix("SCHILY.xattr.").map(|k| (k.to_string(), x.value_bytes().to_vec()))
                })
                .collect()
            })
            .unwrap_or_default();
        out.push(images::Entry {
            path,
            kind,
            mode: h.mode().unwrap() & 0o7777,
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            mtime: h.mtime().unwrap(),
            xattrs,
        });
    }
    (out, content)
}

/// The flagship's base: the Debian minbase rootfs as a one-layer legacy
/// docker-archive tagged `debian:bookworm`, with no Env (so the script's
/// PATH is Docker's default, as for a Dockerfile RUN line), written at
/// `path` (readable by everyone). Err(reason) when the rootfs cannot be had.
pub fn write_debian_base(path: &Path) -> Result<images::Built, String> {
    let rootfs = debian_minbase()?;
    let (entries, _) = debian_entries(&rootfs);
    let img = images::image(vec![images::layer(entries)]).tag("debian:bookworm");
    Ok(images::write(path, &images::Build::new(images::Format::DockerLegacy), &[img]))
}

/// nixpkgs' redis example script, verbatim from the issue (no `#!` line:
/// runasroot runs it with /bin/sh).
pub const REDIS_SCRIPT: &str =
    "groupadd -r redis && useradd -r -g redis -d /data -M redis && mkdir /data && chown redis:redis /data\n";

/// Says that a test (or part of one) was skipped and why. Written straight
/// to the stderr file descriptor, past the test harness's output capture,
/// so a skip shows in `cargo test` output even when the test passes.
fn skip(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}
