//! Test fixtures: container images built from a small description, in
//! every input format runasroot reads.
//!
//! Integration tests include this with
//! `#[path = "common/images.rs"] mod images;`. It does not use the
//! runasroot crate (a bug there must not hide in the fixture that tests
//! it): only tar, sha2, flate2, zstd, serde_json and tempfile.
//!
//! ```ignore
//! use images::*;
//! let base = image(vec![
//!     layer(vec![dir("etc"), file("etc/passwd", "root:x:0:0::/root:/bin/sh\n")]),
//!     layer(vec![whiteout("etc/passwd"), opaque("var"), char_dev("dev/null", 1, 3)]).gzip(),
//! ])
//! .tag("base:1");
//! let built = write(&dir.join("base.tar"), &Build::new(Format::DockerHybrid), &[base]);
//! ```
//!
//! Layer tars are written in the order the entries are given (no sorting,
//! so tests can feed odd orders, e.g. an opaque marker after its
//! siblings). Every blob is streamed through files, so big sizes work.

#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

// ---------------------------------------------------------------------------
// Entries
// ---------------------------------------------------------------------------

/// What a layer entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File(Vec<u8>),
    /// A regular file of `size` bytes, each `byte`, streamed (never held in
    /// memory); sizes beyond 8 GiB get a PAX `size` record.
    Big { size: u64, byte: u8 },
    Symlink(Vec<u8>),
    /// Hard link to an earlier entry's name.
    Hardlink(Vec<u8>),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// One entry of a layer tar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// As written in the tar; a directory gets a trailing `/` on write.
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits (with suid/sgid/sticky).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    /// Written as PAX `SCHILY.xattr.NAME` records, in this order.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// mtime of every entry unless set: an arbitrary fixed time (2001-09-09).
pub const DEFAULT_MTIME: u64 = 1_000_000_000;

fn entry(path: impl AsRef<[u8]>, kind: Kind, mode: u32) -> Entry {
    Entry { path: path.as_ref().to_vec(), kind, mode, uid: 0, gid: 0, mtime: DEFAULT_MTIME, xattrs: vec![] }
}

pub fn dir(path: impl AsRef<[u8]>) -> Entry {
    entry(path, Kind::Dir, 0o755)
}
pub fn file(path: impl AsRef<[u8]>, contents: impl AsRef<[u8]>) -> Entry {
    entry(path, Kind::File(contents.as_ref().to_vec()), 0o644)
}
/// A file of `size` bytes of `byte`, streamed.
pub fn big_file(path: impl AsRef<[u8]>, size: u64, byte: u8) -> Entry {
    entry(path, Kind::Big { size, byte }, 0o644)
}
pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Entry {
    entry(path, Kind::Symlink(target.as_ref().to_vec()), 0o777)
}
pub fn hardlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Entry {
    entry(path, Kind::Hardlink(target.as_ref().to_vec()), 0o644)
}
pub fn char_dev(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Entry {
    entry(path, Kind::Char(major, minor), 0o666)
}
pub fn block_dev(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Entry {
    entry(path, Kind::Block(major, minor), 0o660)
}
pub fn fifo(path: impl AsRef<[u8]>) -> Entry {
    entry(path, Kind::Fifo, 0o644)
}

/// `DIR/NAME` → the OCI whiteout `DIR/.wh.NAME` (an empty file).
pub fn whiteout(path: impl AsRef<[u8]>) -> Entry {
    let path = path.as_ref();
    let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => (&b""[..], path),
    };
    let mut p = parent.to_vec();
    p.extend_from_slice(b".wh.");
    p.extend_from_slice(name);
    file(p, b"")
}

/// `DIR` → its opaque marker `DIR/.wh..wh..opq` (an empty file).
pub fn opaque(dir_path: impl AsRef<[u8]>) -> Entry {
    let mut p = dir_path.as_ref().to_vec();
    if !p.is_empty() && !p.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(b".wh..wh..opq");
    file(p, b"")
}

impl Entry {
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }
    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }
    pub fn xattr(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.xattrs.push((name.to_string(), value.as_ref().to_vec()));
        self
    }
    fn size(&self) -> u64 {
        match &self.kind {
            Kind::File(c) => c.len() as u64,
            Kind::Big { size, .. } => *size,
            _ => 0,
        }
    }
}

/// ustar `name`/`linkname` field width.
const NAME_FIELD: usize = 100;
/// Largest size an 11-digit octal field holds (8 GiB - 1).
const MAX_OCTAL_SIZE: u64 = 0o77777777777;

fn needs_pax(name: &[u8]) -> bool {
    name.len() > NAME_FIELD || !name.is_ascii()
}

/// Writes a layer tar (uncompressed) to `out`, entries in the given order.
pub fn write_layer_tar(entries: &[Entry], out: impl Write) -> io::Result<()> {
    let mut b = tar::Builder::new(out);
    for e in entries {
        let mut name = e.path.clone();
        if e.kind == Kind::Dir && !name.ends_with(b"/") {
            name.push(b'/');
        }
        let mut pax: Vec<(String, Vec<u8>)> = vec![];
        if needs_pax(&name) {
            pax.push(("path".into(), name.clone()));
        }
        let mut h = tar::Header::new_ustar();
        let n = name.len().min(NAME_FIELD);
        h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
        let ty = match &e.kind {
            Kind::Dir => tar::EntryType::Directory,
            Kind::File(_) | Kind::Big { .. } => tar::EntryType::Regular,
            Kind::Symlink(_) => tar::EntryType::Symlink,
            Kind::Hardlink(_) => tar::EntryType::Link,
            Kind::Char(..) => tar::EntryType::Char,
            Kind::Block(..) => tar::EntryType::Block,
            Kind::Fifo => tar::EntryType::Fifo,
        };
        h.set_entry_type(ty);
        if let Kind::Symlink(t) | Kind::Hardlink(t) = &e.kind {
            if needs_pax(t) {
                pax.push(("linkpath".into(), t.clone()));
            }
            let n = t.len().min(NAME_FIELD);
            h.as_old_mut().linkname[..n].copy_from_slice(&t[..n]);
        }
        h.set_mode(e.mode);
        if e.uid > 0o7777777 {
            pax.push(("uid".into(), e.uid.to_string().into_bytes()));
        } else {
            h.set_uid(e.uid);
        }
        if e.gid > 0o7777777 {
            pax.push(("gid".into(), e.gid.to_string().into_bytes()));
        } else {
            h.set_gid(e.gid);
        }
        h.set_mtime(e.mtime);
        let size = e.size();
        if size > MAX_OCTAL_SIZE {
            pax.push(("size".into(), size.to_string().into_bytes()));
        }
        h.set_size(size);
        if let Kind::Char(ma, mi) | Kind::Block(ma, mi) = e.kind {
            h.set_device_major(ma)?;
            h.set_device_minor(mi)?;
        }
        for (k, v) in &e.xattrs {
            pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
        }
        h.set_cksum();
        if !pax.is_empty() {
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        match &e.kind {
            Kind::File(c) => b.append(&h, &c[..])?,
            Kind::Big { size, byte } => b.append(&h, io::repeat(*byte).take(*size))?,
            _ => b.append(&h, io::empty())?,
        }
    }
    b.into_inner()?.flush()
}

/// A layer tar in memory (for small layers in unit-style checks).
pub fn layer_tar(entries: &[Entry]) -> Vec<u8> {
    let mut v = Vec::new();
    write_layer_tar(entries, &mut v).unwrap();
    v
}

// ---------------------------------------------------------------------------
// Layers and images
// ---------------------------------------------------------------------------

/// How a layer's stored bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub entries: Vec<Entry>,
    pub compression: Compression,
}

pub fn layer(entries: Vec<Entry>) -> Layer {
    Layer { entries, compression: Compression::None }
}

impl Layer {
    pub fn gzip(mut self) -> Self {
        self.compression = Compression::Gzip;
        self
    }
    pub fn zstd(mut self) -> Self {
        self.compression = Compression::Zstd;
        self
    }
    pub fn compressed(mut self, c: Compression) -> Self {
        self.compression = c;
        self
    }
}

/// One image: its distinct layers, how the manifest lists them, its names.
#[derive(Debug, Clone)]
pub struct Image {
    pub layers: Vec<Layer>,
    /// The manifest's layer list as indexes into `layers` (default: each
    /// once, in order); `[0, 1, 0]` lists layer 0 twice.
    pub listing: Option<Vec<usize>>,
    /// `NAME:TAG`s: RepoTags, and index annotations in OCI layouts.
    pub tags: Vec<String>,
    /// Merged into the config's `config` object (`Env`, `Cmd`, …).
    pub runtime: Value,
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
    pub created: String,
}

pub fn image(layers: Vec<Layer>) -> Image {
    Image {
        layers,
        listing: None,
        tags: vec![],
        runtime: json!({}),
        os: "linux".into(),
        arch: "amd64".into(),
        variant: None,
        created: "2001-09-09T01:46:40Z".into(),
    }
}

impl Image {
    pub fn tag(mut self, name_tag: &str) -> Self {
        self.tags.push(name_tag.to_string());
        self
    }
    pub fn env(mut self, vars: &[&str]) -> Self {
        self.runtime["Env"] = json!(vars);
        self
    }
    pub fn runtime(mut self, key: &str, value: Value) -> Self {
        self.runtime[key] = value;
        self
    }
    pub fn listing(mut self, order: Vec<usize>) -> Self {
        self.listing = Some(order);
        self
    }
    pub fn platform(mut self, os: &str, arch: &str, variant: Option<&str>) -> Self {
        self.os = os.into();
        self.arch = arch.into();
        self.variant = variant.map(str::to_string);
        self
    }
    fn order(&self) -> Vec<usize> {
        self.listing.clone().unwrap_or_else(|| (0..self.layers.len()).collect())
    }
}

// ---------------------------------------------------------------------------
// Archive formats
// ---------------------------------------------------------------------------

/// The image formats runasroot reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `docker save` ≤ 24: manifest.json, `<id>/layer.tar`, `<hex>.json`.
    DockerLegacy,
    /// `docker save` ≥ 25: an OCI layout plus manifest.json/repositories.
    DockerHybrid,
    /// An OCI image layout directory.
    OciDir,
    /// An OCI image layout in a tar.
    OciArchive,
}

/// Compression of the whole archive file (tar formats only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whole {
    None,
    Gzip,
    Zstd,
}

/// A deliberate defect, to test verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corrupt {
    None,
    /// The descriptor of listed layer `i` names a digest its stored bytes
    /// do not have (OCI and hybrid; legacy archives name no blob digest).
    LayerBlob(usize),
    /// The config's `rootfs.diff_ids[i]` is wrong (config digest stays
    /// consistent, so only a diff_id check catches it).
    DiffId(usize),
    /// The config's bytes do not hash to the digest that names them.
    ConfigDigest,
    /// The index names a manifest digest its bytes do not have (OCI).
    ManifestDigest,
    /// Hybrid only: manifest.json points at another config than index.json.
    HybridDisagree,
    /// The manifest's size for listed layer `i` is off by one (OCI/hybrid).
    LayerSize(usize),
}

/// How to write an archive.
#[derive(Debug, Clone, Copy)]
pub struct Build {
    pub format: Format,
    pub whole: Whole,
    pub corrupt: Corrupt,
    /// Legacy only: store each layer once as `<hex>.tar` at the root and
    /// make `<id>/layer.tar` a symlink to `../<hex>.tar`, as skopeo's
    /// docker-archive writer does.
    pub symlinked_layers: bool,
}

impl Build {
    pub fn new(format: Format) -> Build {
        Build { format, whole: Whole::None, corrupt: Corrupt::None, symlinked_layers: false }
    }
    pub fn symlinked_layers(mut self) -> Build {
        assert_eq!(self.format, Format::DockerLegacy, "symlinked layers exist in legacy docker-archives only");
        self.symlinked_layers = true;
        self
    }
    pub fn whole(mut self, whole: Whole) -> Build {
        self.whole = whole;
        self
    }
    pub fn corrupt(mut self, corrupt: Corrupt) -> Build {
        self.corrupt = corrupt;
        self
    }
}

/// What was written, for assertions.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub config_digest: String,
    /// OCI manifest digest (None for legacy docker archives).
    pub manifest_digest: Option<String>,
    /// sha256 of each listed layer's stored bytes, manifest order.
    pub layer_digests: Vec<String>,
    /// The config's rootfs.diff_ids (as written, corruption included).
    pub diff_ids: Vec<String>,
    /// Media type of each listed layer (OCI names).
    pub media_types: Vec<String>,
    pub config: Value,
}

#[derive(Debug, Clone)]
pub struct Built {
    pub path: PathBuf,
    pub images: Vec<BuiltImage>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// A `Write` that hashes and counts.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A blob staged as a file.
#[derive(Debug, Clone)]
struct Blob {
    path: PathBuf,
    hex: String,
    size: u64,
}

/// Stored layer bytes with their uncompressed digest.
#[derive(Debug, Clone)]
struct StagedLayer {
    blob: Blob,
    diff_id_hex: String,
    media_type: String,
}

fn stage_bytes(stage: &Path, bytes: &[u8]) -> Blob {
    let hex = sha256_hex(bytes);
    let path = stage.join(format!("b-{hex}"));
    fs::write(&path, bytes).unwrap();
    Blob { path, hex, size: bytes.len() as u64 }
}

/// Writes a layer's tar (compressed as asked) into `stage`, hashing both
/// the uncompressed and the stored bytes on the way.
fn stage_layer(stage: &Path, layer: &Layer, n: usize) -> StagedLayer {
    let path = stage.join(format!("layer-{n}"));
    let out = HashWriter { inner: BufWriter::new(File::create(&path).unwrap()), hasher: Sha256::new(), len: 0 };
    let diff_hasher;
    let stored;
    match layer.compression {
        Compression::None => {
            let mut w = out;
            write_layer_tar(&layer.entries, &mut w).unwrap();
            w.flush().unwrap();
            diff_hasher = w.hasher.clone();
            stored = w;
        }
        Compression::Gzip => {
            let enc = flate2::GzBuilder::new().mtime(0).write(out, flate2::Compression::new(6));
            let mut w = HashWriter { inner: enc, hasher: Sha256::new(), len: 0 };
            write_layer_tar(&layer.entries, &mut w).unwrap();
            diff_hasher = w.hasher.clone();
            let mut o = w.inner.finish().unwrap();
            o.flush().unwrap();
            stored = o;
        }
        Compression::Zstd => {
            let enc = zstd::Encoder::new(out, 3).unwrap();
            let mut w = HashWriter { inner: enc, hasher: Sha256::new(), len: 0 };
            write_layer_tar(&layer.entries, &mut w).unwrap();
            diff_hasher = w.hasher.clone();
            let mut o = w.inner.finish().unwrap();
            o.flush().unwrap();
            stored = o;
        }
    }
    let diff_id_hex = hex(&diff_hasher.finalize());
    let hex_stored = hex(&stored.hasher.clone().finalize());
    let size = stored.len;
    drop(stored);
    let media_type = match layer.compression {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
    .to_string();
    StagedLayer { blob: Blob { path, hex: hex_stored, size }, diff_id_hex, media_type }
}

/// A wrong digest that still looks like one.
fn wrong(hex: &str) -> String {
    sha256_hex(format!("not {hex}").as_bytes())
}

/// Everything one image needs, staged.
struct StagedImage {
    layers: Vec<StagedLayer>,
    order: Vec<usize>,
    config: Value,
    config_blob: Blob,
    /// The digest the config is named by (differs from `config_blob.hex`
    /// under [`Corrupt::ConfigDigest`]).
    config_name: String,
    manifest_blob: Blob,
    manifest_name: String,
    /// Digest claimed for each listed layer.
    layer_names: Vec<String>,
    tags: Vec<String>,
    platform: Value,
}

fn stage_image(stage: &Path, img: &Image, corrupt: Corrupt, n: usize) -> StagedImage {
    let layers: Vec<StagedLayer> =
        img.layers.iter().enumerate().map(|(i, l)| stage_layer(stage, l, n * 1000 + i)).collect();
    let order = img.order();
    let mut diff_ids: Vec<String> = order.iter().map(|&i| format!("sha256:{}", layers[i].diff_id_hex)).collect();
    if let Corrupt::DiffId(i) = corrupt {
        diff_ids[i] = format!("sha256:{}", wrong(&layers[order[i]].diff_id_hex));
    }
    let mut runtime = json!({});
    if let Value::Object(m) = &img.runtime {
        for (k, v) in m {
            runtime[k] = v.clone();
        }
    }
    let mut config = json!({
        "architecture": img.arch,
        "os": img.os,
        "created": img.created,
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": order.iter().map(|i| json!({"created": img.created, "created_by": format!("fixture layer {i}")})).collect::<Vec<_>>(),
    });
    if let Some(v) = &img.variant {
        config["variant"] = json!(v);
    }
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let mut config_blob = stage_bytes(stage, &config_bytes);
    let config_name = if corrupt == Corrupt::ConfigDigest {
        // Bytes changed after naming: same name, other content.
        let named = config_blob.hex.clone();
        // Same length, one byte changed (2001 → 2002 in `created`), so
        // only the digest can tell.
        let mut bad = config_bytes.clone();
        let at = bad.windows(4).position(|w| w == b"2001").expect("created is in 2001");
        bad[at + 3] = b'2';
        config_blob = stage_bytes(stage, &bad);
        named
    } else {
        config_blob.hex.clone()
    };
    let mut layer_names: Vec<String> = order.iter().map(|&i| layers[i].blob.hex.clone()).collect();
    if let Corrupt::LayerBlob(i) = corrupt {
        layer_names[i] = wrong(&layer_names[i]);
    }
    let mut sizes: Vec<u64> = order.iter().map(|&i| layers[i].blob.size).collect();
    if let Corrupt::LayerSize(i) = corrupt {
        sizes[i] += 1;
    }
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{config_name}"),
            "size": config_bytes.len(),
        },
        "layers": order.iter().enumerate().map(|(k, &i)| json!({
            "mediaType": layers[i].media_type,
            "digest": format!("sha256:{}", layer_names[k]),
            "size": sizes[k],
        })).collect::<Vec<_>>(),
    });
    let manifest_blob = stage_bytes(stage, &serde_json::to_vec(&manifest).unwrap());
    let manifest_name =
        if corrupt == Corrupt::ManifestDigest { wrong(&manifest_blob.hex) } else { manifest_blob.hex.clone() };
    let mut platform = json!({"os": img.os, "architecture": img.arch});
    if let Some(v) = &img.variant {
        platform["variant"] = json!(v);
    }
    StagedImage {
        layers,
        order,
        config,
        config_blob,
        config_name,
        manifest_blob,
        manifest_name,
        layer_names,
        tags: img.tags.clone(),
        platform,
    }
}

/// Docker's normalisation of a short name (`busybox:1` →
/// `docker.io/library/busybox:1`), as Docker ≥ 25 writes it in
/// `io.containerd.image.name`.
pub fn docker_full_name(name_tag: &str) -> String {
    let first = name_tag.split('/').next().unwrap_or("");
    let has_registry = name_tag.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_registry {
        name_tag.to_string()
    } else if name_tag.contains('/') {
        format!("docker.io/{name_tag}")
    } else {
        format!("docker.io/library/{name_tag}")
    }
}

fn split_tag(name_tag: &str) -> (&str, &str) {
    match name_tag.rfind(':') {
        Some(i) if !name_tag[i..].contains('/') => (&name_tag[..i], &name_tag[i + 1..]),
        _ => (name_tag, "latest"),
    }
}

/// Files of an archive, staged, in the order they are written.
enum Member {
    Dir(String),
    Bytes(String, Vec<u8>),
    File(String, PathBuf),
    Symlink(String, String),
}

fn member_name(m: &Member) -> &str {
    match m {
        Member::Dir(n) | Member::Bytes(n, _) | Member::File(n, _) | Member::Symlink(n, _) => n,
    }
}

fn blob_member(path: &str, blob: &Blob) -> Member {
    Member::File(path.to_string(), blob.path.clone())
}

/// Index descriptors of `images` (one per tag, or one unnamed).
fn index_entries(images: &[StagedImage], hybrid: bool) -> Vec<Value> {
    let mut out = vec![];
    for s in images {
        let desc = |annotations: Option<Value>| {
            let mut d = json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{}", s.manifest_name),
                "size": s.manifest_blob.size,
            });
            if let Some(a) = annotations {
                d["annotations"] = a;
            }
            d
        };
        if s.tags.is_empty() {
            out.push(desc(None));
        }
        for t in &s.tags {
            // Docker ≥ 25 writes the full name and the bare tag; OCI
            // writers (skopeo oci:DIR:REF) write the reference given.
            let a = if hybrid {
                json!({"io.containerd.image.name": docker_full_name(t), "org.opencontainers.image.ref.name": split_tag(t).1})
            } else {
                json!({"org.opencontainers.image.ref.name": t})
            };
            out.push(desc(Some(a)));
        }
    }
    out
}

fn oci_layout_members(images: &[StagedImage], index: Value) -> Vec<Member> {
    let mut blobs: Vec<(String, Member)> = vec![];
    let mut push = |hex: &str, blob: &Blob| {
        let name = format!("blobs/sha256/{hex}");
        if !blobs.iter().any(|(n, _)| *n == name) {
            blobs.push((name.clone(), blob_member(&name, blob)));
        }
    };
    for s in images {
        push(&s.config_name, &s.config_blob);
        push(&s.manifest_name, &s.manifest_blob);
        for (k, &i) in s.order.iter().enumerate() {
            push(&s.layer_names[k], &s.layers[i].blob);
        }
    }
    blobs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut members = vec![Member::Dir("blobs".into()), Member::Dir("blobs/sha256".into())];
    members.extend(blobs.into_iter().map(|(_, m)| m));
    members.push(Member::Bytes("index.json".into(), serde_json::to_vec(&index).unwrap()));
    members.push(Member::Bytes("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()));
    members
}

fn oci_index(manifests: Vec<Value>) -> Value {
    json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests})
}

/// Docker's `repositories` file: name → tag → top layer id (v1 id for
/// legacy archives, the top layer's digest hex for hybrid ones).
fn repositories(images: &[StagedImage], tops: &[String]) -> Option<Vec<u8>> {
    let mut repos = serde_json::Map::new();
    for (s, top) in images.iter().zip(tops) {
        for t in &s.tags {
            let (name, tag) = split_tag(t);
            let e = repos.entry(name.to_string()).or_insert_with(|| json!({}));
            e[tag] = json!(top);
        }
    }
    (!repos.is_empty()).then(|| serde_json::to_vec(&Value::Object(repos)).unwrap())
}

fn hybrid_members(images: &[StagedImage], corrupt: Corrupt, stage: &Path) -> Vec<Member> {
    let mut members = oci_layout_members(images, oci_index(index_entries(images, true)));
    let mut manifest = vec![];
    for s in images {
        let mut config_path = format!("blobs/sha256/{}", s.config_name);
        if corrupt == Corrupt::HybridDisagree {
            let mut other = s.config.clone();
            other["created"] = json!("1999-01-01T00:00:00Z");
            let blob = stage_bytes(stage, &serde_json::to_vec(&other).unwrap());
            config_path = format!("blobs/sha256/{}", blob.hex);
            members.insert(2, blob_member(&config_path, &blob));
        }
        manifest.push(json!({
            "Config": config_path,
            "RepoTags": if s.tags.is_empty() { Value::Null } else { json!(s.tags) },
            "Layers": s.layer_names.iter().map(|h| format!("blobs/sha256/{h}")).collect::<Vec<_>>(),
        }));
    }
    let at = members.iter().position(|m| member_name(m) == "oci-layout").unwrap();
    members.insert(at, Member::Bytes("manifest.json".into(), serde_json::to_vec(&manifest).unwrap()));
    let tops: Vec<String> = images.iter().map(|s| s.layer_names.last().cloned().unwrap_or_default()).collect();
    if let Some(r) = repositories(images, &tops) {
        members.push(Member::Bytes("repositories".into(), r));
    }
    members
}

fn legacy_members(images: &[StagedImage], symlinked: bool) -> Vec<Member> {
    let mut members: Vec<Member> = vec![];
    let mut manifest = vec![];
    let mut seen = std::collections::HashSet::new();
    let mut tops = vec![];
    for s in images {
        // v1 ids chain like Docker's: each depends on its parent.
        let mut parent = String::new();
        let mut ids: Vec<String> = vec![];
        let mut paths = vec![];
        for &i in &s.order {
            let l = &s.layers[i];
            // A layer listed twice keeps one directory (same path twice).
            let id = match s.order.iter().position(|&j| j == i).filter(|&first| first < ids.len()) {
                Some(first) => ids[first].clone(),
                None => sha256_hex(format!("{parent} {}", l.diff_id_hex).as_bytes()),
            };
            if seen.insert(id.clone()) {
                let mut v1 = json!({"id": id, "created": "2001-09-09T01:46:40Z"});
                if !parent.is_empty() {
                    v1["parent"] = json!(parent);
                }
                members.push(Member::Dir(id.clone()));
                members.push(Member::Bytes(format!("{id}/VERSION"), b"1.0".to_vec()));
                members.push(Member::Bytes(format!("{id}/json"), serde_json::to_vec(&v1).unwrap()));
                if symlinked {
                    let stored = format!("{}.tar", l.blob.hex);
                    if seen.insert(stored.clone()) {
                        members.insert(0, blob_member(&stored, &l.blob));
                    }
                    members.push(Member::Symlink(format!("{id}/layer.tar"), format!("../{stored}")));
                } else {
                    members.push(blob_member(&format!("{id}/layer.tar"), &l.blob));
                }
            }
            paths.push(format!("{id}/layer.tar"));
            parent = id.clone();
            ids.push(id);
        }
        tops.push(parent);
        let config_path = format!("{}.json", s.config_name);
        if seen.insert(config_path.clone()) {
            members.push(blob_member(&config_path, &s.config_blob));
        }
        manifest.push(json!({
            "Config": config_path,
            "RepoTags": if s.tags.is_empty() { Value::Null } else { json!(s.tags) },
            "Layers": paths,
        }));
    }
    members.push(Member::Bytes("manifest.json".into(), serde_json::to_vec(&manifest).unwrap()));
    if let Some(r) = repositories(images, &tops) {
        members.push(Member::Bytes("repositories".into(), r));
    }
    members
}

fn write_tar(members: &[Member], out: impl Write) -> io::Result<()> {
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Deterministic);
    for m in members {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(DEFAULT_MTIME);
        match m {
            Member::Dir(n) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, format!("{n}/"), io::empty())?;
            }
            Member::Bytes(n, bytes) => {
                h.set_mode(0o644);
                h.set_size(bytes.len() as u64);
                b.append_data(&mut h, n, &bytes[..])?;
            }
            Member::File(n, path) => {
                let f = File::open(path)?;
                h.set_mode(0o644);
                h.set_size(f.metadata()?.len());
                b.append_data(&mut h, n, f)?;
            }
            Member::Symlink(n, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, n, target)?;
            }
        }
    }
    b.into_inner()?.flush()
}

fn write_dir(members: &[Member], root: &Path) -> io::Result<()> {
    fs::create_dir_all(root)?;
    for m in members {
        match m {
            Member::Dir(n) => fs::create_dir_all(root.join(n))?,
            Member::Bytes(n, bytes) => fs::write(root.join(n), bytes)?,
            Member::File(n, path) => {
                fs::copy(path, root.join(n))?;
            }
            Member::Symlink(n, target) => std::os::unix::fs::symlink(target, root.join(n))?,
        }
    }
    Ok(())
}

fn finish_archive(members: &[Member], path: &Path, whole: Whole) {
    let f = BufWriter::new(File::create(path).unwrap());
    match whole {
        Whole::None => write_tar(members, f).unwrap(),
        Whole::Gzip => {
            let mut enc = flate2::GzBuilder::new().mtime(0).write(f, flate2::Compression::new(6));
            write_tar(members, &mut enc).unwrap();
            enc.finish().unwrap().flush().unwrap();
        }
        Whole::Zstd => {
            let mut enc = zstd::Encoder::new(f, 3).unwrap();
            write_tar(members, &mut enc).unwrap();
            enc.finish().unwrap().flush().unwrap();
        }
    }
}

fn built_image(s: &StagedImage) -> BuiltImage {
    BuiltImage {
        config_digest: format!("sha256:{}", s.config_name),
        manifest_digest: Some(format!("sha256:{}", s.manifest_name)),
        layer_digests: s.order.iter().map(|&i| format!("sha256:{}", s.layers[i].blob.hex)).collect(),
        diff_ids: s.config["rootfs"]["diff_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect(),
        media_types: s.order.iter().map(|&i| s.layers[i].media_type.clone()).collect(),
        config: s.config.clone(),
    }
}

fn staging_dir(path: &Path) -> tempfile::TempDir {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(parent).unwrap();
    tempfile::Builder::new().prefix(".fixture-stage-").tempdir_in(parent).unwrap()
}

/// Writes `images` to `path` in `build.format` (a directory for
/// [`Format::OciDir`], a file otherwise).
pub fn write(path: &Path, build: &Build, images: &[Image]) -> Built {
    assert!(!images.is_empty(), "an archive holds at least one image");
    if build.format == Format::OciDir {
        assert_eq!(build.whole, Whole::None, "a directory cannot be compressed as a whole");
    }
    match build.corrupt {
        Corrupt::LayerBlob(_) | Corrupt::LayerSize(_) | Corrupt::ManifestDigest
            if build.format == Format::DockerLegacy =>
        {
            panic!("{:?} does not apply to a legacy docker-archive (it names no blob digests)", build.corrupt)
        }
        Corrupt::HybridDisagree if build.format != Format::DockerHybrid => {
            panic!("HybridDisagree applies to Format::DockerHybrid only")
        }
        _ => {}
    }
    let stage = staging_dir(path);
    let staged: Vec<StagedImage> =
        images.iter().enumerate().map(|(n, img)| stage_image(stage.path(), img, build.corrupt, n)).collect();
    let members = match build.format {
        Format::DockerLegacy => legacy_members(&staged, build.symlinked_layers),
        Format::DockerHybrid => hybrid_members(&staged, build.corrupt, stage.path()),
        Format::OciDir | Format::OciArchive => oci_layout_members(&staged, oci_index(index_entries(&staged, false))),
    };
    if build.format == Format::OciDir {
        write_dir(&members, path).unwrap();
    } else {
        finish_archive(&members, path, build.whole);
    }
    let mut images: Vec<BuiltImage> = staged.iter().map(built_image).collect();
    if build.format == Format::DockerLegacy {
        for i in &mut images {
            i.manifest_digest = None;
        }
    }
    Built { path: path.to_path_buf(), images }
}

/// Writes one name whose index points at an image index with one manifest
/// per platform (as `docker buildx` and `skopeo copy --all` do), in an OCI
/// layout (dir or archive) or a hybrid docker-archive. Images are the
/// platform variants, in index order; their own tags are ignored.
pub fn write_multi_platform(path: &Path, build: &Build, tag: Option<&str>, platforms: &[Image]) -> Built {
    assert!(matches!(build.format, Format::OciDir | Format::OciArchive | Format::DockerHybrid));
    let stage = staging_dir(path);
    let mut staged: Vec<StagedImage> = platforms
        .iter()
        .enumerate()
        .map(|(n, img)| stage_image(stage.path(), img, build.corrupt, n))
        .collect();
    for s in &mut staged {
        s.tags.clear();
    }
    let nested = oci_index(
        staged
            .iter()
            .map(|s| {
                json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": format!("sha256:{}", s.manifest_name),
                    "size": s.manifest_blob.size,
                    "platform": s.platform,
                })
            })
            .collect(),
    );
    let nested_blob = stage_bytes(stage.path(), &serde_json::to_vec(&nested).unwrap());
    let mut desc = json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": format!("sha256:{}", nested_blob.hex),
        "size": nested_blob.size,
    });
    if let Some(t) = tag {
        desc["annotations"] = if build.format == Format::DockerHybrid {
            json!({"io.containerd.image.name": docker_full_name(t), "org.opencontainers.image.ref.name": split_tag(t).1})
        } else {
            json!({"org.opencontainers.image.ref.name": t})
        };
    }
    let mut members = oci_layout_members(&staged, oci_index(vec![desc]));
    let name = format!("blobs/sha256/{}", nested_blob.hex);
    members.insert(2, blob_member(&name, &nested_blob));
    if build.format == Format::DockerHybrid {
        // docker save of a multi-platform image lists the host platform's
        // manifest (the first here) in manifest.json.
        let s = &staged[0];
        let manifest = json!([{
            "Config": format!("blobs/sha256/{}", s.config_name),
            "RepoTags": tag.map(|t| json!([t])).unwrap_or(Value::Null),
            "Layers": s.layer_names.iter().map(|h| format!("blobs/sha256/{h}")).collect::<Vec<_>>(),
        }]);
        let at = members.iter().position(|m| member_name(m) == "oci-layout").unwrap();
        members.insert(at, Member::Bytes("manifest.json".into(), serde_json::to_vec(&manifest).unwrap()));
    }
    if build.format == Format::OciDir {
        write_dir(&members, path).unwrap();
    } else {
        finish_archive(&members, path, build.whole);
    }
    Built { path: path.to_path_buf(), images: staged.iter().map(built_image).collect() }
}

/// Every combination of input format and whole-archive compression the
/// tools accept (OCI directories are never compressed as a whole).
pub fn all_builds() -> Vec<Build> {
    let mut v = vec![];
    for f in [Format::DockerLegacy, Format::DockerHybrid, Format::OciDir, Format::OciArchive] {
        v.push(Build::new(f));
        if f != Format::OciDir {
            v.push(Build::new(f).whole(Whole::Gzip));
            v.push(Build::new(f).whole(Whole::Zstd));
        }
    }
    v
}

/// A file name for a build (`docker-hybrid.tar.gz`, `oci-dir`, …).
pub fn file_name(build: &Build) -> String {
    let base = match build.format {
        Format::DockerLegacy => "docker-legacy",
        Format::DockerHybrid => "docker-hybrid",
        Format::OciDir => return "oci-dir".into(),
        Format::OciArchive => "oci-archive",
    };
    let ext = match build.whole {
        Whole::None => "tar",
        Whole::Gzip => "tar.gz",
        Whole::Zstd => "tar.zst",
    };
    format!("{base}.{ext}")
}

// ---------------------------------------------------------------------------
// A busybox base
// ---------------------------------------------------------------------------

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// The entries of a minimal busybox root: `/bin/busybox`, `/bin/<applet>`
/// symlinks for every applet it lists (`sh` included), `/etc/passwd` and
/// `/etc/group` with root, `/tmp` 1777, `/root` 0700. None when busybox
/// is missing (the caller prints that the test is skipped).
pub fn busybox_entries() -> Option<Vec<Entry>> {
    let bin = fs::read(BUSYBOX).ok()?;
    let list = std::process::Command::new(BUSYBOX).arg("--list").output().ok()?;
    let mut applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_string)
        .collect();
    applets.sort();
    applets.dedup();
    let mut entries = vec![dir("bin"), file("bin/busybox", bin).mode(0o755)];
    entries.extend(applets.iter().map(|a| symlink(format!("bin/{a}"), "busybox")));
    entries.extend([
        dir("etc"),
        file("etc/group", "root:x:0:\n"),
        file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        dir("root").mode(0o700),
        dir("tmp").mode(0o1777),
    ]);
    Some(entries)
}

/// A one-layer busybox image tagged `busybox:latest`, with a PATH in its
/// config like Docker Hub's busybox. None when busybox is missing.
pub fn busybox_image() -> Option<Image> {
    Some(
        image(vec![layer(busybox_entries()?)])
            .tag("busybox:latest")
            .env(&["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"])
            .runtime("Cmd", json!(["sh"])),
    )
}

/// Writes the busybox base in `build`'s format at `path`; None when
/// busybox is missing.
pub fn write_busybox(path: &Path, build: &Build) -> Option<Built> {
    Some(write(path, build, &[busybox_image()?]))
}

// ---------------------------------------------------------------------------
// Reading layer tars back (for assertions)
// ---------------------------------------------------------------------------

/// A one-line description of each entry of a layer tar: `path type mode
/// uid:gid size mtime -> link [xattrs]`, for whole-listing assertions.
pub fn list_tar(bytes: impl Read) -> Vec<String> {
    let mut a = tar::Archive::new(bytes);
    let mut out = vec![];
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let mut xattrs: Vec<String> = vec![];
        if let Some(exts) = e.pax_extensions().unwrap() {
            for x in exts {
                let x = x.unwrap();
                if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.push(format!("{k}={}", String::from_utf8_lossy(x.value_bytes())));
                }
            }
        }
        let link = e.link_name_bytes().map(|l| format!(" -> {}", String::from_utf8_lossy(&l))).unwrap_or_default();
        let dev = match h.entry_type() {
            tar::EntryType::Char | tar::EntryType::Block => {
                format!(" {}:{}", h.device_major().unwrap().unwrap_or(0), h.device_minor().unwrap().unwrap_or(0))
            }
            _ => String::new(),
        };
        out.push(format!(
            "{} {:?} {:o} {}:{} {} {}{}{}{}",
            String::from_utf8_lossy(&e.path_bytes()),
            h.entry_type(),
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            e.size(),
            h.mtime().unwrap(),
            dev,
            link,
            if xattrs.is_empty() { String::new() } else { format!(" [{}]", xattrs.join(",")) },
        ));
    }
    out
}

/// Decompresses by magic (gzip, zstd) or passes through.
pub fn decompress(bytes: Vec<u8>) -> Vec<u8> {
    let mut out = vec![];
    if bytes.starts_with(&[0x1f, 0x8b]) {
        flate2::read::MultiGzDecoder::new(&bytes[..]).read_to_end(&mut out).unwrap();
        out
    } else if bytes.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::read::Decoder::new(&bytes[..]).unwrap().read_to_end(&mut out).unwrap();
        out
    } else {
        bytes
    }
}

/// The members of a plain tar file as (name, bytes) (small archives only).
pub fn tar_members(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut f = File::open(path).unwrap();
    f.rewind().unwrap();
    let mut a = tar::Archive::new(f);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            let mut v = vec![];
            e.read_to_end(&mut v).unwrap();
            (name, v)
        })
        .collect()
}

/// Three distinct layers (none, gzip, zstd), the gzip one listed twice:
/// whiteout, opaque dir, device, xattr and hardlink in a small image.
pub fn sample_image() -> Image {
    image(vec![
        layer(vec![dir("etc"), file("etc/passwd", "root:x:0:0::/root:/bin/sh\n"), dir("tmp").mode(0o1777)]),
        layer(vec![whiteout("etc/passwd"), dir("var"), opaque("var"), char_dev("var/null", 1, 3)]).gzip(),
        layer(vec![file("var/x", "x").xattr("user.k", "v"), hardlink("var/y", "var/x")]).zstd(),
    ])
    .listing(vec![0, 1, 2, 1])
    .tag("sample:1")
    .env(&["A=b"])
}

// ---------------------------------------------------------------------------
// Shared export test images
// ---------------------------------------------------------------------------

/// Exercises every merge rule of an export at once: whiteouts, an opaque
/// dir, a file replaced by a dir and the reverse, hardlinks within and
/// across layers, devices, setuid, xattrs, long and non-ASCII names, and
/// plain/gzip/zstd layers. Shared by the export engine tests.
pub fn rich_export_image() -> Image {
    let long = "n".repeat(150);
    let base = layer(vec![
        dir("bin"),
        file("bin/busybox", "#!busybox").mode(0o755),
        hardlink("bin/sh", "bin/busybox"),
        hardlink("bin/ls", "bin/busybox"),
        file("bin/su", "su").mode(0o4755),
        file("bin/ping", "ping").mode(0o755).xattr("security.capability", [1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        dir("dev"),
        char_dev("dev/null", 1, 3),
        block_dev("dev/sda", 8, 0),
        fifo("dev/initctl").mode(0o600),
        dir("etc"),
        file("etc/passwd", "root:x:0:0::/root:/bin/sh\n"),
        file("etc/gone", "bye"),
        symlink("etc/mtab", "/proc/self/mounts"),
        dir("home").mode(0o755),
        dir("home/user").owner(1000, 1000).mode(0o700).xattr("user.note", "home"),
        file("home/user/.profile", "export A=1\n").owner(1000, 1000).mtime(1_500_000_000),
        dir("tmp").mode(0o1777),
        file("was-file", "plain"),
        dir("was-dir"),
        file("was-dir/inner", "inner"),
        dir("was-dir/sub"),
        file("was-dir/sub/deep", "deep"),
        dir("var"),
        dir("var/cache"),
        file("var/cache/old", "old"),
        dir("var/cache/apt"),
        file("var/cache/apt/pkg", "pkg"),
        file(format!("var/{long}"), "long"),
        symlink("var/longlink", format!("/{long}/{long}")),
        file("var/caf\u{e9}", "accent"),
        dir("usr").mode(0o755),
        dir("usr/lib"),
        file("usr/lib/libc.so", "libc"),
    ]);
    let middle = layer(vec![
        whiteout("etc/gone"),
        opaque("var/cache"),
        file("var/cache/new", "new"),
        dir("was-file").mode(0o750),
        file("was-file/now-inside", "inside"),
        file("was-dir", "now a file"),
        dir("usr/bin"),
        hardlink("usr/bin/sh2", "bin/busybox"),
        file("usr/bin/tool", "tool").mode(0o2755).owner(0, 50),
        hardlink("usr/bin/tool-alias", "usr/bin/tool"),
        file("bin/su", "new su").mode(0o4711),
        file("etc/passwd", "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n").mtime(1_600_000_000),
        dir("opt").owner(12, 34).mode(0o711).xattr("user.a", "1").xattr("user.b", ""),
    ])
    .gzip();
    let top = layer(vec![
        whiteout("bin/ls"),
        whiteout("usr/lib"),
        file("etc/gone", "back again"),
        dir("dev"),
        char_dev("dev/zero", 1, 5),
        dir("tmp").mode(0o1777).mtime(1_700_000_000),
        file("tmp/scratch", "s"),
    ])
    .zstd();
    image(vec![base, middle, top])
}

/// `n` layers, each adding a directory and files, replacing a shared file,
/// and whiting out the previous layer's scratch file; compressions rotate.
pub fn deep_export_image(n: usize) -> Image {
    let mut layers = vec![];
    for i in 0..n {
        let mut entries = vec![
            dir("shared"),
            file("shared/version", format!("layer {i}")).mtime(1_000_000 + i as u64),
            dir(format!("l{i:03}")),
            file(format!("l{i:03}/data"), format!("data {i}").repeat(i + 1)),
            file(format!("shared/scratch-{i}"), "tmp"),
        ];
        if i > 0 {
            entries.push(whiteout(format!("shared/scratch-{}", i - 1)));
        }
        if i % 7 == 3 {
            entries.push(opaque(format!("l{:03}", i - 1)));
        }
        let c = [Compression::None, Compression::Gzip, Compression::Zstd][i % 3];
        layers.push(layer(entries).compressed(c));
    }
    image(layers)
}

#[cfg(test)]
mod fixture_tests {
    use super::*;

    #[test]
    fn whiteout_and_opaque_names() {
        assert_eq!(whiteout("a/b/c").path, b"a/b/.wh.c");
        assert_eq!(whiteout("c").path, b".wh.c");
        assert_eq!(opaque("a/b").path, b"a/b/.wh..wh..opq");
    }

    #[test]
    fn layer_tar_lists_back_exactly() {
        let long = "d/".repeat(60) + "f";
        let bytes = layer_tar(&[
            dir("d").owner(1, 2),
            file("d/f", "abc").mode(0o4755).xattr("security.capability", [1u8, 2]),
            symlink("d/l", "f"),
            hardlink("d/h", "d/f"),
            char_dev("d/c", 1, 3),
            block_dev("d/b", 8, 0),
            fifo("d/p"),
            whiteout("d/gone"),
            opaque("d"),
            file(&long, "").owner(1 << 30, 0),
        ]);
        let t = DEFAULT_MTIME;
        assert_eq!(
            list_tar(&bytes[..]),
            vec![
                format!("d/ Directory 755 1:2 0 {t}"),
                format!("d/f Regular 4755 0:0 3 {t} [security.capability=\u{1}\u{2}]"),
                format!("d/l Symlink 777 0:0 0 {t} -> f"),
                format!("d/h Link 644 0:0 0 {t} -> d/f"),
                format!("d/c Char 666 0:0 0 {t} 1:3"),
                format!("d/b Block 660 0:0 0 {t} 8:0"),
                format!("d/p Fifo 644 0:0 0 {t}"),
                format!("d/.wh.gone Regular 644 0:0 0 {t}"),
                format!("d/.wh..wh..opq Regular 644 0:0 0 {t}"),
                format!("{long} Regular 644 1073741824:0 0 {t}"),
            ]
        );
    }
}
