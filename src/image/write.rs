//! Writing the new image: the base layers byte for byte, the new layer on
//! top, the config with its diff_id and history appended, as a Docker ≥ 25
//! hybrid docker-archive (the default: `docker load`, `podman load`,
//! skopeo's `docker-archive:` and `oci-archive:` all read it), an OCI
//! layout directory, or an OCI archive.
//!
//! Deterministic: the documents are built by [`documents`] from the inputs
//! alone (field order fixed, compact JSON), members are written in
//! lexical order (as Docker's own `save` does) through
//! [`TarWriter`](runasroot_guest::tarfmt::TarWriter) with mtime = the
//! image's `created` time, owner 0:0, modes 0644/0755.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use runasroot_guest::tarfmt::{Entry, Kind, TarWriter};
use serde_json::{json, Value};

use super::compress::{self, Encoder};
use super::config::ConfigOverrides;
use super::digest::{self, HashingReader, HashingWriter};
use super::select;
use super::{media_type, store, BlobRef, Compression, Digest, Image, ImageError};
use crate::output::{self, Target};

/// The image format written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// Docker ≥ 25 `docker save` layout: an OCI layout plus `manifest.json`
    /// and `repositories`, in one tar.
    #[default]
    DockerArchive,
    /// An OCI image layout directory.
    Oci,
    /// An OCI image layout in one tar.
    OciArchive,
}

/// The layer the guest produced.
#[derive(Debug, Clone)]
pub struct NewLayer {
    /// The uncompressed layer tar (its first `size` bytes).
    pub path: PathBuf,
    /// sha256 of those bytes; checked again here.
    pub diff_id: Digest,
    pub size: u64,
}

/// How to write the image.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub format: OutputFormat,
    /// `NAME[:TAG]` (`:latest` when no tag); `None` writes an untagged image.
    pub tag: Option<String>,
    /// Compression of the new layer only; base layers stay as stored.
    pub compress: Compression,
    /// RFC 3339, already resolved (`--created`, SOURCE_DATE_EPOCH, default).
    pub created: String,
    /// The history entry's `created_by`.
    pub history_created_by: String,
    /// `--config`: container-config fields merged over the base's.
    pub config: ConfigOverrides,
    /// `--compress-archive`: the whole archive compressed (as nixpkgs'
    /// buildImage `compressor` does); base layers inside stay as stored.
    pub archive_compress: Compression,
}

/// The history comment that marks our layer.
const HISTORY_COMMENT: &str = "runasroot";
/// OCI media types (image-spec `media-types.md`).
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// image-spec `image-layout.md`.
const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// Longest tag Docker accepts (distribution reference grammar).
const MAX_TAG_LEN: usize = 128;

/// Checks the options that can be checked before any work (tag syntax,
/// created time, format and target agree), so a typo costs no guest run.
pub fn check_options(opts: &WriteOptions, target: &Target) -> Result<(), ImageError> {
    if opts.format == OutputFormat::Oci && *target == Target::Stdout {
        return Err(ImageError::OciDirToStdout);
    }
    if opts.format == OutputFormat::Oci && opts.archive_compress != Compression::None {
        return Err(ImageError::CompressDirectory);
    }
    opts.tag.as_deref().map(parse_tag).transpose()?;
    created_seconds(&opts.created)?;
    Ok(())
}

/// Writes `base` + `layer` to `target` in `opts.format`, atomically.
pub fn write_image(base: &Image, layer: &NewLayer, opts: &WriteOptions, target: &Target) -> Result<(), ImageError> {
    check_options(opts, target)?;
    let tag = opts.tag.as_deref().map(parse_tag).transpose()?;
    let mtime = created_seconds(&opts.created)?;
    let new = prepare_new_layer(layer, opts.compress)?;
    let base_layers: Vec<LayerInfo> = base
        .layers
        .iter()
        .map(|l| LayerInfo { digest: l.blob_digest.clone(), size: l.blob.length, compression: l.compression })
        .collect();
    let docs = documents(
        &base.config,
        &base.source,
        &base_layers,
        &new.info,
        tag.as_deref(),
        opts,
    )?;
    let members = members(base, &new, docs);
    match (opts.format, target) {
        (OutputFormat::Oci, Target::Path(path)) => write_dir(&members, path),
        (OutputFormat::Oci, Target::Stdout) => Err(ImageError::OciDirToStdout),
        _ => {
            let mut failure = None;
            let written = output::write_atomically(target, |w| {
                let mut enc = Encoder::new(opts.archive_compress, w)?;
                write_tar(&members, mtime, &mut enc, &mut failure)?;
                enc.finish()?.flush()
            });
            if let Some(e) = failure {
                return Err(e);
            }
            written.map_err(|source| ImageError::WriteOutput { target: target.describe(), source })
        }
    }
}

// ----- deciding -------------------------------------------------------

/// A layer as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LayerInfo {
    digest: Digest,
    size: u64,
    compression: Compression,
}

/// The new layer as written: its blob, and its diff_id for the config.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NewLayerInfo {
    blob: LayerInfo,
    diff_id: Digest,
}

/// The JSON documents of the output, bytes and digests.
#[derive(Debug, PartialEq, Eq)]
struct Documents {
    config: Vec<u8>,
    config_digest: Digest,
    manifest: Vec<u8>,
    manifest_digest: Digest,
    /// `index.json`.
    index: Vec<u8>,
    /// `manifest.json` (docker-archive only).
    docker_manifest: Option<Vec<u8>>,
    /// `repositories` (docker-archive with a tag only).
    repositories: Option<Vec<u8>>,
}

/// Checks a `NAME[:TAG]` and returns it with its tag (`:latest` added).
fn parse_tag(tag: &str) -> Result<String, ImageError> {
    let bad = |reason: &str| ImageError::BadTag { tag: tag.to_string(), reason: reason.to_string() };
    if tag.contains('@') {
        return Err(bad("a digest cannot be a tag"));
    }
    let (name, t) = select::split_name_tag(tag);
    let t = t.unwrap_or("latest");
    if name.is_empty() {
        return Err(bad("the name is empty"));
    }
    if t.is_empty()
        || t.len() > MAX_TAG_LEN
        || t.starts_with(['.', '-'])
        || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(bad("a tag is 1 to 128 of A-Z a-z 0-9 _ . - and does not start with . or -"));
    }
    let mut components: Vec<&str> = name.split('/').collect();
    if components.len() > 1 {
        let first = components[0];
        if first.contains('.') || first.contains(':') || first == "localhost" {
            let host_ok = first
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b))
                && !first.starts_with(['.', '-', ':']);
            if !host_ok {
                return Err(bad("invalid registry host"));
            }
            components.remove(0);
        }
    }
    for c in components {
        let ok = !c.is_empty()
            && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && c.as_bytes()[0].is_ascii_alphanumeric()
            && c.as_bytes()[c.len() - 1].is_ascii_alphanumeric();
        if !ok {
            return Err(bad("name components are lowercase a-z 0-9 with . _ - inside, separated by /"));
        }
    }
    Ok(format!("{name}:{t}"))
}

/// Seconds since the epoch of an RFC 3339 time (the archive's mtimes).
fn created_seconds(created: &str) -> Result<u64, ImageError> {
    let t = time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
        .map_err(|source| ImageError::BadCreated { value: created.to_string(), source })?;
    Ok(t.unix_timestamp().max(0) as u64)
}

fn descriptor(media: &str, digest: &Digest, size: u64) -> Value {
    json!({"mediaType": media, "digest": digest.as_str(), "size": size})
}

/// Builds config, manifest, index and the docker files. Pure: the same
/// inputs give the same bytes.
fn documents(
    base_config: &Value,
    source_name: &str,
    base_layers: &[LayerInfo],
    new: &NewLayerInfo,
    tag: Option<&str>,
    opts: &WriteOptions,
) -> Result<Documents, ImageError> {
    let Value::Object(_) = base_config else {
        return Err(ImageError::ConfigNotObject { source_name: source_name.to_string() });
    };
    // Every base field is kept in its order; only these change.
    let mut config = base_config.clone();
    config["created"] = json!(opts.created);
    if !opts.config.is_empty() {
        config["config"] = opts.config.merge_into(config.get("config"));
    }
    if !config.get("rootfs").is_some_and(Value::is_object) {
        config["rootfs"] = json!({"type": "layers", "diff_ids": []});
    }
    if !config["rootfs"].get("diff_ids").is_some_and(Value::is_array) {
        config["rootfs"]["diff_ids"] = json!([]);
    }
    config["rootfs"]["diff_ids"].as_array_mut().expect("made an array above").push(json!(new.diff_id.as_str()));
    if !config.get("history").is_some_and(Value::is_array) {
        config["history"] = json!([]);
    }
    config["history"].as_array_mut().expect("made an array above").push(json!({
        "created": opts.created,
        "created_by": opts.history_created_by,
        "comment": HISTORY_COMMENT,
    }));
    let config = serde_json::to_vec(&config).expect("a JSON value serialises");
    let config_digest = digest::sha256_bytes(&config);

    let layers: Vec<Value> = base_layers
        .iter()
        .chain(std::iter::once(&new.blob))
        .map(|l| descriptor(media_type(l.compression), &l.digest, l.size))
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": descriptor(MEDIA_CONFIG, &config_digest, config.len() as u64),
        "layers": layers,
    }))
    .expect("a JSON value serialises");
    let manifest_digest = digest::sha256_bytes(&manifest);

    let docker = opts.format == OutputFormat::DockerArchive;
    let mut desc = descriptor(MEDIA_MANIFEST, &manifest_digest, manifest.len() as u64);
    if let Some(t) = tag {
        // Docker ≥ 25 writes the full name and the bare tag; OCI layouts
        // get the reference as given (what skopeo's `oci:DIR:REF` finds).
        let ref_name = if docker { select::split_name_tag(t).1.unwrap_or("latest") } else { t };
        desc["annotations"] = json!({CONTAINERD_NAME: select::full_name(t), REF_NAME: ref_name});
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [desc],
    }))
    .expect("a JSON value serialises");

    let (docker_manifest, repositories) = if docker {
        let all: Vec<&LayerInfo> = base_layers.iter().chain(std::iter::once(&new.blob)).collect();
        let manifest = json!([{
            "Config": format!("blobs/sha256/{}", config_digest.hex()),
            "RepoTags": tag.map(|t| json!([select::familiar_name(t)])).unwrap_or(Value::Null),
            "Layers": all.iter().map(|l| format!("blobs/sha256/{}", l.digest.hex())).collect::<Vec<_>>(),
        }]);
        // `repositories`: name → tag → top layer, as Docker ≥ 25 writes it.
        let repositories = tag.map(|t| {
            let familiar = select::familiar_name(t);
            let (name, tag) = select::split_name_tag(&familiar);
            let repos = json!({ name: { tag.unwrap_or("latest"): new.blob.digest.hex() } });
            serde_json::to_vec(&repos).expect("a JSON value serialises")
        });
        (Some(serde_json::to_vec(&manifest).expect("a JSON value serialises")), repositories)
    } else {
        (None, None)
    };
    Ok(Documents { config, config_digest, manifest, manifest_digest, index, docker_manifest, repositories })
}

// ----- the new layer --------------------------------------------------

/// The new layer's blob: the layer file itself (uncompressed) or a
/// compressed temporary copy.
struct PreparedLayer {
    info: NewLayerInfo,
    file: PathBuf,
    _temp: Option<tempfile::TempPath>,
}

/// Checks the new layer's diff_id and compresses it if asked, in one pass.
fn prepare_new_layer(layer: &NewLayer, compression: Compression) -> Result<PreparedLayer, ImageError> {
    let read_err = |source| ImageError::ReadNewLayer { path: layer.path.clone(), source };
    let mut src = HashingReader::new(File::open(&layer.path).map_err(read_err)?.take(layer.size));
    let codec = compress::name(compression);
    let compress_err = |source| ImageError::CompressLayer { path: layer.path.clone(), codec, source };
    let (blob, temp) = if compression == Compression::None {
        io::copy(&mut src, &mut io::sink()).map_err(read_err)?;
        (None, None)
    } else {
        // Beside the layer: the caller's temporary directory.
        let dir = layer.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let temp = tempfile::Builder::new()
            .prefix("layer-")
            .suffix(".compressed")
            .tempfile_in(dir)
            .map_err(|source| ImageError::TempFile { dir: dir.to_path_buf(), source })?;
        let (file, path) = temp.into_parts();
        let mut enc = Encoder::new(compression, HashingWriter::new(BufWriter::with_capacity(1 << 20, file)))
            .map_err(compress_err)?;
        io::copy(&mut src, &mut enc).map_err(compress_err)?;
        let (mut sink, digest, size) = enc.finish().map_err(compress_err)?.finish();
        sink.flush().map_err(compress_err)?;
        (Some((digest, size)), Some(path))
    };
    let (raw, found_size) = src.finish();
    let found = Digest::from_sha256(&raw);
    if found != layer.diff_id || found_size != layer.size {
        return Err(ImageError::NewLayerMismatch {
            path: layer.path.clone(),
            expected: layer.diff_id.clone(),
            found,
            expected_size: layer.size,
            found_size,
        });
    }
    let (digest, size) = blob.unwrap_or((layer.diff_id.clone(), layer.size));
    let file = temp.as_ref().map_or_else(|| layer.path.clone(), |t| t.to_path_buf());
    Ok(PreparedLayer {
        info: NewLayerInfo { blob: LayerInfo { digest, size, compression }, diff_id: layer.diff_id.clone() },
        file,
        _temp: temp,
    })
}

// ----- doing ----------------------------------------------------------

/// Where a blob's bytes come from, and what to blame if they are wrong.
enum Source {
    Base { index: usize, name: String, blob: BlobRef },
    New { blob: BlobRef },
    Bytes(Vec<u8>),
}

struct BlobMember {
    digest: Digest,
    size: u64,
    source: Source,
}

/// Everything the output holds, in write order.
struct Members {
    /// Sorted by digest, each once.
    blobs: Vec<BlobMember>,
    /// Top-level files, sorted by name.
    files: Vec<(&'static str, Vec<u8>)>,
}

fn members(base: &Image, new: &PreparedLayer, docs: Documents) -> Members {
    let mut blobs: Vec<BlobMember> = vec![];
    let mut push = |m: BlobMember| {
        if !blobs.iter().any(|b| b.digest == m.digest) {
            blobs.push(m);
        }
    };
    for l in &base.layers {
        push(BlobMember {
            digest: l.blob_digest.clone(),
            size: l.blob.length,
            source: Source::Base { index: l.index, name: l.name.clone(), blob: l.blob.clone() },
        });
    }
    push(BlobMember {
        digest: new.info.blob.digest.clone(),
        size: new.info.blob.size,
        source: Source::New { blob: BlobRef { file: new.file.clone(), offset: 0, length: new.info.blob.size } },
    });
    push(BlobMember { digest: docs.config_digest, size: docs.config.len() as u64, source: Source::Bytes(docs.config) });
    push(BlobMember {
        digest: docs.manifest_digest,
        size: docs.manifest.len() as u64,
        source: Source::Bytes(docs.manifest),
    });
    blobs.sort_by(|a, b| a.digest.cmp(&b.digest));
    let mut files = vec![("index.json", docs.index), ("oci-layout", OCI_LAYOUT.to_vec())];
    if let Some(m) = docs.docker_manifest {
        files.push(("manifest.json", m));
    }
    if let Some(r) = docs.repositories {
        files.push(("repositories", r));
    }
    files.sort_by(|a, b| a.0.cmp(b.0));
    Members { blobs, files }
}

/// A source reader that remembers whether *it* failed, so a failed copy
/// can be blamed on the input rather than the output.
struct Tracked<R> {
    inner: HashingReader<R>,
    failed: bool,
}

impl<R: Read> Read for Tracked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|_| self.failed = true)
    }
}

/// Copies one blob into `sink` via `copy`, checking that its bytes still
/// hash to its digest. Input failures become an [`ImageError`]; output
/// failures stay `io::Error`.
fn copy_blob(
    m: &BlobMember,
    copy: &mut dyn FnMut(&mut dyn Read) -> io::Result<()>,
) -> Result<(), Result<ImageError, io::Error>> {
    let input_err = |source: io::Error| match &m.source {
        Source::Base { index, name, .. } => ImageError::CopyLayer { index: *index, name: name.clone(), source },
        Source::New { blob } => ImageError::ReadNewLayer { path: blob.file.clone(), source },
        // Reading memory cannot fail; named anyway rather than panicking.
        Source::Bytes(_) => ImageError::ReadNewLayer { path: PathBuf::from("(generated document)"), source },
    };
    let reader: Box<dyn Read> = match &m.source {
        Source::Base { blob, .. } | Source::New { blob } => {
            Box::new(store::open_blob(blob).map_err(|e| Ok(input_err(e)))?)
        }
        Source::Bytes(b) => Box::new(&b[..]),
    };
    let mut tracked = Tracked { inner: HashingReader::new(reader), failed: false };
    if let Err(e) = copy(&mut tracked) {
        return Err(if tracked.failed { Ok(input_err(e)) } else { Err(e) });
    }
    let (raw, found_size) = tracked.inner.finish();
    let found = Digest::from_sha256(&raw);
    if found != m.digest {
        return Err(Ok(match &m.source {
            Source::Base { index, name, .. } => {
                ImageError::BaseLayerChanged { index: *index, name: name.clone(), expected: m.digest.clone(), found }
            }
            Source::New { blob } => ImageError::NewLayerMismatch {
                path: blob.file.clone(),
                expected: m.digest.clone(),
                found,
                expected_size: m.size,
                found_size,
            },
            Source::Bytes(_) => unreachable!("generated documents are hashed from these very bytes"),
        }));
    }
    Ok(())
}

fn tar_entry(path: &str, kind: Kind, mtime: u64) -> Entry {
    let mode = if kind == Kind::Dir { 0o755 } else { 0o644 };
    Entry { path: path.as_bytes().to_vec(), kind, mode, uid: 0, gid: 0, mtime, xattrs: vec![] }
}

/// Streams the archive; an input failure is put in `failure` (and the
/// write fails so nothing is committed).
fn write_tar(
    members: &Members,
    mtime: u64,
    w: &mut dyn Write,
    failure: &mut Option<ImageError>,
) -> io::Result<()> {
    let mut tw = TarWriter::new(w);
    for dir in ["blobs", "blobs/sha256"] {
        tw.append(&tar_entry(dir, Kind::Dir, mtime), &mut io::empty())?;
    }
    for m in &members.blobs {
        let entry = tar_entry(&format!("blobs/sha256/{}", m.digest.hex()), Kind::File { size: m.size }, mtime);
        match copy_blob(m, &mut |r| tw.append(&entry, r)) {
            Ok(()) => {}
            Err(Ok(e)) => {
                let msg = e.to_string();
                *failure = Some(e);
                return Err(io::Error::other(msg));
            }
            Err(Err(e)) => return Err(e),
        }
    }
    for (name, bytes) in &members.files {
        tw.append(&tar_entry(name, Kind::File { size: bytes.len() as u64 }, mtime), &mut &bytes[..])?;
    }
    tw.finish()?.flush()
}

/// Writes an OCI layout directory beside `target` and swaps it into place.
fn write_dir(members: &Members, target: &Path) -> Result<(), ImageError> {
    let exists = match fs::symlink_metadata(target) {
        Ok(meta) if !meta.is_dir() => {
            return Err(ImageError::RefuseReplace { path: target.to_path_buf(), reason: "it is not a directory".into() })
        }
        Ok(_) => {
            let empty = fs::read_dir(target).map(|mut d| d.next().is_none()).unwrap_or(false);
            if !empty && !target.join("oci-layout").is_file() {
                return Err(ImageError::RefuseReplace {
                    path: target.to_path_buf(),
                    reason: "it is a non-empty directory that is not an OCI layout".into(),
                });
            }
            true
        }
        Err(_) => false,
    };
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = crate::interrupt::create_temp(
        || tempfile::Builder::new().prefix(&format!(".{name}.runasroot-")).tempdir_in(&parent),
        |t| t.path(),
    )
    .map_err(|source| ImageError::TempFile { dir: parent.clone(), source })?;
    let registered = temp.path().to_path_buf();
    let result = fill_and_swap(members, target, temp, exists);
    crate::interrupt::unregister_temp(&registered);
    result
}

/// The body of [`write_dir`]: writes the layout in `temp` and swaps it
/// into place at `target` (`exists`: there is a layout to replace).
fn fill_and_swap(members: &Members, target: &Path, temp: tempfile::TempDir, exists: bool) -> Result<(), ImageError> {
    let dir_err = |source| ImageError::WriteDir { path: target.to_path_buf(), source };
    let root = temp.path();
    let blobs_dir = root.join("blobs/sha256");
    fs::create_dir_all(&blobs_dir).map_err(dir_err)?;
    for m in &members.blobs {
        let path = blobs_dir.join(m.digest.hex());
        let mut f = File::create(&path).map_err(dir_err)?;
        match copy_blob(m, &mut |r| io::copy(r, &mut f).map(drop)) {
            Ok(()) => {}
            Err(Ok(e)) => return Err(e),
            Err(Err(e)) => return Err(dir_err(e)),
        }
        f.sync_all().map_err(dir_err)?;
    }
    for (name, bytes) in &members.files {
        let mut f = File::create(root.join(name)).map_err(dir_err)?;
        f.write_all(bytes).and_then(|_| f.sync_all()).map_err(dir_err)?;
    }
    // tempdir is 0700; an output directory is 0755 less the umask (the
    // files already got 0666 less the umask from create).
    let umask = current_umask();
    fs::set_permissions(root, fs::Permissions::from_mode(0o777 & !umask)).map_err(dir_err)?;
    if let Err(e) = crate::interrupt::begin_commit() {
        return Err(dir_err(e));
    }
    let root = temp.keep();
    let swap = if exists {
        // Atomic: the old layout and the new one trade places, then the
        // old one is removed; a reader never sees a half-written layout.
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &root,
            nix::fcntl::AT_FDCWD,
            target,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(io::Error::from)
    } else {
        fs::rename(&root, target)
    };
    if let Err(e) = swap {
        let _ = fs::remove_dir_all(&root);
        return Err(dir_err(e));
    }
    if exists {
        fs::remove_dir_all(&root).map_err(dir_err)?;
    }
    Ok(())
}

/// The process umask (read by setting and restoring it).
fn current_umask() -> u32 {
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    nix::sys::stat::umask(old);
    old.bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(c: char) -> Digest {
        Digest::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
    }

    fn opts(format: OutputFormat) -> WriteOptions {
        WriteOptions {
            format,
            tag: None,
            compress: Compression::Gzip,
            created: "1970-01-01T00:00:01Z".into(),
            history_created_by: "runasroot --script s.sh".into(),
            config: ConfigOverrides::default(),
            archive_compress: Compression::None,
        }
    }

    #[test]
    fn checks_tags() {
        let cases = [
            ("busybox", Ok("busybox:latest")),
            ("me/app:1.0", Ok("me/app:1.0")),
            ("localhost:5000/a/b:t", Ok("localhost:5000/a/b:t")),
            ("Upper:1", Err(())),
            ("a:-x", Err(())),
            ("a@sha256:00", Err(())),
            (":t", Err(())),
            ("a//b:t", Err(())),
        ];
        for (tag, want) in cases {
            assert_eq!(parse_tag(tag).ok().as_deref(), want.ok(), "{tag}");
        }
    }

    #[test]
    fn parses_created_times() {
        assert_eq!(created_seconds("1970-01-01T00:00:01Z").unwrap(), 1);
        assert_eq!(created_seconds("2024-01-01T01:00:00+01:00").unwrap(), 1704067200);
        assert_eq!(created_seconds("1960-01-01T00:00:00Z").unwrap(), 0);
        assert!(created_seconds("yesterday").is_err());
    }

    #[test]
    fn builds_every_document_of_a_tagged_docker_archive() {
        let base: Value = serde_json::from_str(
            r#"{"architecture":"amd64","config":{"Env":["A=1"]},"created":"2001-01-01T00:00:00Z","os":"linux",
                "rootfs":{"type":"layers","diff_ids":["sha256:1111111111111111111111111111111111111111111111111111111111111111"]},
                "history":[{"created_by":"base"}],"zzz":"kept"}"#,
        )
        .unwrap();
        let base_layers = [LayerInfo { digest: d('a'), size: 10, compression: Compression::Gzip }];
        let new = NewLayerInfo { blob: LayerInfo { digest: d('b'), size: 20, compression: Compression::Zstd }, diff_id: d('c') };
        let docs = documents(&base, "base.tar", &base_layers, &new, Some("me/app:1"), &opts(OutputFormat::DockerArchive)).unwrap();
        let config = String::from_utf8(docs.config.clone()).unwrap();
        assert_eq!(
            config,
            format!(
                r#"{{"architecture":"amd64","config":{{"Env":["A=1"]}},"created":"1970-01-01T00:00:01Z","os":"linux","rootfs":{{"type":"layers","diff_ids":["sha256:{}","{}"]}},"history":[{{"created_by":"base"}},{{"created":"1970-01-01T00:00:01Z","created_by":"runasroot --script s.sh","comment":"runasroot"}}],"zzz":"kept"}}"#,
                "1".repeat(64),
                d('c')
            )
        );
        assert_eq!(docs.config_digest, digest::sha256_bytes(&docs.config));
        let manifest = String::from_utf8(docs.manifest.clone()).unwrap();
        assert_eq!(
            manifest,
            format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":10}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{}","size":20}}]}}"#,
                docs.config_digest,
                docs.config.len(),
                d('a'),
                d('b')
            )
        );
        assert_eq!(
            String::from_utf8(docs.index.clone()).unwrap(),
            format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{},"annotations":{{"io.containerd.image.name":"docker.io/me/app:1","org.opencontainers.image.ref.name":"1"}}}}]}}"#,
                docs.manifest_digest,
                docs.manifest.len()
            )
        );
        assert_eq!(
            String::from_utf8(docs.docker_manifest.clone().unwrap()).unwrap(),
            format!(
                r#"[{{"Config":"blobs/sha256/{}","RepoTags":["me/app:1"],"Layers":["blobs/sha256/{}","blobs/sha256/{}"]}}]"#,
                docs.config_digest.hex(),
                d('a').hex(),
                d('b').hex()
            )
        );
        assert_eq!(
            String::from_utf8(docs.repositories.clone().unwrap()).unwrap(),
            format!(r#"{{"me/app":{{"1":"{}"}}}}"#, d('b').hex())
        );
        // Same inputs, same bytes.
        assert_eq!(docs, documents(&base, "base.tar", &base_layers, &new, Some("me/app:1"), &opts(OutputFormat::DockerArchive)).unwrap());
    }

    #[test]
    fn untagged_oci_layout_has_no_names_and_no_docker_files() {
        let base = json!({"rootfs": {"type": "layers", "diff_ids": []}});
        let new = NewLayerInfo { blob: LayerInfo { digest: d('b'), size: 20, compression: Compression::None }, diff_id: d('b') };
        let docs = documents(&base, "b", &[], &new, None, &opts(OutputFormat::Oci)).unwrap();
        assert_eq!(docs.docker_manifest, None);
        assert_eq!(docs.repositories, None);
        let index: Value = serde_json::from_slice(&docs.index).unwrap();
        assert_eq!(index["manifests"][0].get("annotations"), None);
        let tagged = documents(&base, "b", &[], &new, Some("x:1"), &opts(OutputFormat::OciArchive)).unwrap();
        let index: Value = serde_json::from_slice(&tagged.index).unwrap();
        assert_eq!(
            index["manifests"][0]["annotations"],
            json!({"io.containerd.image.name": "docker.io/library/x:1", "org.opencontainers.image.ref.name": "x:1"})
        );
        // A config without rootfs or history gets both.
        let config: Value = serde_json::from_slice(&docs.config).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"], json!([d('b').as_str()]));
        assert_eq!(config["history"][0]["comment"], json!("runasroot"));
        assert!(documents(&json!([1]), "b", &[], &new, None, &opts(OutputFormat::Oci)).is_err());
    }
}
