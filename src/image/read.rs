//! Reading a base image: find the archive's format from its content,
//! select one image (name, platform), check every digest the image gives,
//! and address each layer's stored bytes by byte range.
//!
//! Formats (shared FORMATS.md "Inputs"):
//! * legacy docker-archive: `manifest.json` → `<config>.json`,
//!   `<id>/layer.tar` (no blob digests: the stored bytes are hashed here);
//! * Docker ≥ 25 hybrid: an OCI layout plus `manifest.json`; both are read
//!   and must describe the same image;
//! * OCI layout, directory or tar: `index.json` → (index →) manifest →
//!   config + layers;
//! * any tar above compressed as a whole (gzip, zstd): decompressed once
//!   to a temporary file, since layers must be byte ranges of a file.
//!
//! Layers are not decompressed here: `layers` hashes each compressed
//! layer's tar once while indexing it (its diff_id check), and
//! [`super::Layer::open_verified`] does the same for other host readers.
//! An uncompressed layer's diff_id *is* its blob digest, so that one is
//! checked here for free.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::compress::{self, Detected};
use super::digest::sha256_range;
use super::select::{self, Platform};
use super::store::{read_head, Store};
use super::{digest, BlobRef, Digest, FileId, ImageError, Layer};
use crate::spool::{Full, Spooler};

/// Largest `index.json`, `manifest.json` or OCI manifest/index blob: a
/// 500-layer manifest is ~100 KiB. Parsed, JSON can take 36 times its
/// size in memory (measured: 32 MiB of `[0,0,…]` became 1.1 GiB of
/// `serde_json::Value`s), so this bounds ~150 MiB.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest image config: the history of a 500-layer image is ~500 KiB.
/// Parsed, ~300 MiB at most (see [`MAX_MANIFEST_BYTES`]).
const MAX_CONFIG_BYTES: u64 = 8 << 20;
/// Largest `oci-layout` file (it holds one short field).
const MAX_LAYOUT_BYTES: u64 = 64 << 10;
/// Nesting of image indexes followed (buildx writes one level).
const MAX_INDEX_DEPTH: usize = 4;
/// Most layers an image may have. No runtime runs more: overlayfs stacks
/// at most 500 lower layers (`OVL_MAX_STACK`; Docker stops at 125), and
/// every layer holds a file open during a run (the default soft limit is
/// 1024 descriptors) and takes a device slot in the lower image.
pub const MAX_LAYERS: usize = 500;

/// How to open a base image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// `NAME:TAG` to select in a multi-image archive (RepoTags, or the
    /// index annotations `org.opencontainers.image.ref.name` /
    /// `io.containerd.image.name`); default the first image.
    pub from_image: Option<String>,
    /// `os/arch[/variant]` for indexes with several platforms; default
    /// `linux/amd64`.
    pub platform: Option<String>,
    /// Where a whole-archive decompression goes.
    pub temp_dir: PathBuf,
}

/// The on-disk format an image was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    DockerLegacy,
    DockerHybrid,
    OciLayout,
    /// `--base scratch`: no file, no layers.
    Scratch,
}

impl SourceFormat {
    pub fn describe(self) -> &'static str {
        match self {
            SourceFormat::DockerLegacy => "docker-archive",
            SourceFormat::DockerHybrid => "docker-archive (OCI hybrid)",
            SourceFormat::OciLayout => "OCI layout",
            SourceFormat::Scratch => "scratch (no layers)",
        }
    }
}

/// A selected, verified base image.
#[derive(Debug)]
pub struct Image {
    /// The config, fields in their original order.
    pub config: Value,
    /// The config exactly as stored (its sha256 is the config digest).
    pub config_bytes: Vec<u8>,
    /// Bottom layer first; a layer listed twice appears twice.
    pub layers: Vec<Layer>,
    /// The selected `name:tag`, when the archive names it.
    pub name: Option<String>,
    /// The path given, for messages.
    pub source: String,
    format: SourceFormat,
    compressed_as: Option<&'static str>,
    /// A decompressed copy of the archive, which the layers' byte ranges
    /// point into: removed when the image is dropped.
    _decompressed: Option<Arc<tempfile::TempPath>>,
}

impl Image {
    /// The config's `config.Env`, as the script's starting environment.
    pub fn env(&self) -> Vec<String> {
        self.config
            .pointer("/config/Env")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// The config's `created` time as written.
    pub fn created(&self) -> Option<String> {
        self.config.get("created").and_then(Value::as_str).map(str::to_string)
    }

    /// What the image was read as, e.g. `docker-archive (gzip)`.
    pub fn format_name(&self) -> String {
        match self.compressed_as {
            Some(c) => format!("{} ({c}-compressed)", self.format.describe()),
            None => self.format.describe().to_string(),
        }
    }

    pub fn format(&self) -> SourceFormat {
        self.format
    }
}

/// The base that names no image: `--base scratch` starts from nothing,
/// as a Dockerfile's `FROM scratch` and nixpkgs' `fromImage = null` do.
/// A file called `scratch` is still reachable as `./scratch`.
pub const SCRATCH: &str = "scratch";

impl Image {
    /// An image with no layers and a minimal config for `platform`
    /// (`os/arch[/variant]`): what `--base scratch` builds on.
    pub fn scratch(platform: &str) -> Result<Image, ImageError> {
        let p = Platform::parse(platform).ok_or_else(|| ImageError::BadPlatform { value: platform.to_string() })?;
        let mut config = serde_json::json!({"architecture": p.architecture, "os": p.os});
        if let Some(v) = &p.variant {
            config["variant"] = Value::String(v.clone());
        }
        config["config"] = serde_json::json!({});
        config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": []});
        config["history"] = serde_json::json!([]);
        Ok(Image {
            config_bytes: serde_json::to_vec(&config).expect("a JSON value serialises"),
            config,
            layers: vec![],
            name: None,
            source: SCRATCH.to_string(),
            format: SourceFormat::Scratch,
            compressed_as: None,
            _decompressed: None,
        })
    }
}

/// Opens, selects and verifies a base image (see [`open_with_progress`]).
pub fn open(spec: &str, opts: &OpenOptions) -> Result<Image, ImageError> {
    open_with_progress(spec, opts, &|_, _, _| {})
}

/// Opens `spec` (a path, or `docker-archive:PATH`, `oci:DIR[:REF]`,
/// `oci-archive:PATH[:REF]`), selects one image and checks every digest it
/// gives. `progress(phase, done, total)` is called while blobs are hashed.
pub fn open_with_progress(
    spec: &str,
    opts: &OpenOptions,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<Image, ImageError> {
    if spec == SCRATCH {
        if let Some(wanted) = &opts.from_image {
            return Err(ImageError::SelectInScratch { wanted: wanted.clone() });
        }
        return Image::scratch(opts.platform.as_deref().unwrap_or(select::DEFAULT_PLATFORM));
    }
    let parsed = parse_spec(spec, |p| p.exists())?;
    let wanted = match (&parsed.reference, &opts.from_image) {
        (Some(r), Some(f)) if r != f => {
            return Err(ImageError::ConflictingSelection {
                spec: spec.to_string(),
                in_spec: r.clone(),
                from_image: f.clone(),
            })
        }
        (r, f) => f.clone().or_else(|| r.clone()),
    };
    let platform_text = opts.platform.as_deref().unwrap_or(select::DEFAULT_PLATFORM);
    let platform =
        Platform::parse(platform_text).ok_or_else(|| ImageError::BadPlatform { value: platform_text.to_string() })?;

    let path = parsed.path;
    let (store, decompressed, compressed_as) = open_store(&path, &opts.temp_dir)?;
    let format = detect_format(&store, &path)?;
    let resolved = match format {
        SourceFormat::DockerLegacy => resolve_docker(&store, wanted.as_deref())?,
        SourceFormat::OciLayout => resolve_oci(&store, wanted.as_deref(), &platform)?.0,
        SourceFormat::DockerHybrid => resolve_hybrid(&store, wanted.as_deref(), &platform)?,
        SourceFormat::Scratch => unreachable!("detect_format finds archive formats only"),
    };
    let config_bytes = read_config(&store, &resolved)?;
    let config: Value = serde_json::from_slice(&config_bytes).map_err(|source| ImageError::ParseJson {
        source_name: store.name(),
        member: resolved.config_member.clone(),
        source,
    })?;
    let diff_ids = diff_ids(&config, &store, &resolved)?;
    let layers = verify_layers(&store, &resolved, &diff_ids, progress)?;
    Ok(Image {
        config,
        config_bytes,
        layers,
        name: resolved.name,
        source: path.display().to_string(),
        format,
        compressed_as,
        _decompressed: decompressed.map(Arc::new),
    })
}

/// An image reference, parsed.
#[derive(Debug, PartialEq, Eq)]
struct Spec {
    path: PathBuf,
    reference: Option<String>,
}

/// skopeo's transports; a plain path is detected by content. `exists`
/// decides `oci:a:b` between the path `a:b` and the path `a` with `b`.
fn parse_spec(spec: &str, exists: impl Fn(&Path) -> bool) -> Result<Spec, ImageError> {
    let bad = |reason: &str| ImageError::BadSpec { spec: spec.to_string(), reason: reason.to_string() };
    let rest = ["docker-archive:", "oci-archive:", "oci:"].iter().find_map(|p| spec.strip_prefix(p));
    let Some(rest) = rest else {
        if spec.is_empty() {
            return Err(bad("empty path"));
        }
        return Ok(Spec { path: PathBuf::from(spec), reference: None });
    };
    if rest.is_empty() {
        return Err(bad("no path after the transport prefix"));
    }
    if exists(Path::new(rest)) {
        return Ok(Spec { path: PathBuf::from(rest), reference: None });
    }
    // As containers/image does: the first `:` ends the path.
    match rest.split_once(':') {
        Some((path, reference)) if !path.is_empty() && !reference.is_empty() => {
            Ok(Spec { path: PathBuf::from(path), reference: Some(reference.to_string()) })
        }
        Some(_) => Err(bad("empty path or reference around ':'")),
        None => Ok(Spec { path: PathBuf::from(rest), reference: None }),
    }
}

/// A directory as it is; a file as a tar, decompressed first to a
/// temporary file when it is compressed as a whole.
fn open_store(
    path: &Path,
    temp_dir: &Path,
) -> Result<(Store, Option<tempfile::TempPath>, Option<&'static str>), ImageError> {
    let open_err = |source| ImageError::Open { path: path.to_path_buf(), source };
    let meta = std::fs::metadata(path).map_err(open_err)?;
    if meta.is_dir() {
        return Ok((Store::open_dir(path), None, None));
    }
    let blob = BlobRef { file: path.to_path_buf(), offset: 0, length: meta.len() };
    let head = read_head(&blob, compress::MAGIC_LEN).map_err(open_err)?;
    let detected = compress::detect(&head);
    let codec = match detected.supported() {
        Ok(super::Compression::None) => return Ok((Store::open_tar(path, path, None)?, None, None)),
        Ok(c) => c,
        Err(name) => {
            let hint = if detected == Detected::Xz { "xz -dk FILE" } else { "bzip2 -dk FILE" };
            return Err(ImageError::UnsupportedArchiveCompression { path: path.to_path_buf(), codec: name, hint });
        }
    };
    let codec_name = compress::name(codec);
    let temp = tempfile::Builder::new()
        .prefix("base-")
        .suffix(".tar")
        .tempfile_in(temp_dir)
        .map_err(|source| ImageError::TempFile { dir: temp_dir.to_path_buf(), source })?;
    let decompress_err = |source: io::Error| match Full::of(&source) {
        Some(full) => ImageError::DecompressFull { path: path.to_path_buf(), codec: codec_name, full: full.clone() },
        None => ImageError::Decompress { path: path.to_path_buf(), codec: codec_name, temp_dir: temp_dir.to_path_buf(), source },
    };
    let (file, temp_path) = temp.into_parts();
    let mut out = io::BufWriter::with_capacity(1 << 20, Spooler::new(file, temp_dir));
    let reader = compress::decoder(codec, File::open(path).map_err(open_err)?).map_err(decompress_err)?;
    io::copy(&mut crate::interrupt::Checked(reader), &mut out).map_err(decompress_err)?;
    io::Write::flush(&mut out).map_err(decompress_err)?;
    drop(out);
    let store = Store::open_tar(&temp_path, path, Some(codec_name))?;
    Ok((store, Some(temp_path), Some(codec_name)))
}

fn detect_format(store: &Store, path: &Path) -> Result<SourceFormat, ImageError> {
    let oci = store.has("index.json") && store.has("oci-layout");
    if oci {
        let layout = store.read_small("oci-layout", "the OCI layout", MAX_LAYOUT_BYTES)?;
        let v: Value = serde_json::from_slice(&layout).map_err(|source| ImageError::ParseJson {
            source_name: store.name(),
            member: "oci-layout".into(),
            source,
        })?;
        if v.get("imageLayoutVersion").and_then(Value::as_str).is_none() {
            return Err(ImageError::BadMetadata {
                source_name: store.name(),
                member: "oci-layout".into(),
                reason: "no imageLayoutVersion".into(),
            });
        }
    }
    match (oci, store.has("manifest.json")) {
        (true, true) => Ok(SourceFormat::DockerHybrid),
        (true, false) => Ok(SourceFormat::OciLayout),
        (false, true) => Ok(SourceFormat::DockerLegacy),
        (false, false) => Err(ImageError::UnknownFormat { path: path.to_path_buf(), found: store.sample_names() }),
    }
}

/// One layer as the manifest lists it, before verification.
#[derive(Debug, Clone)]
struct Listed {
    /// Its path in the archive, for messages.
    name: String,
    blob: BlobRef,
    /// The digest the image gives for the stored bytes, if any.
    digest: Option<Digest>,
    size: Option<u64>,
}

/// The selected image, located but not yet verified.
#[derive(Debug)]
struct Resolved {
    name: Option<String>,
    config_member: String,
    config_blob: BlobRef,
    config_digest: Option<Digest>,
    config_size: Option<u64>,
    layers: Vec<Listed>,
}

fn parse_json<T: serde::de::DeserializeOwned>(store: &Store, member: &str, bytes: &[u8]) -> Result<T, ImageError> {
    serde_json::from_slice(bytes).map_err(|source| ImageError::ParseJson {
        source_name: store.name(),
        member: member.to_string(),
        source,
    })
}

// ----- docker-archive --------------------------------------------------

#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

fn read_docker_manifest(store: &Store) -> Result<Vec<DockerEntry>, ImageError> {
    let bytes = store.read_small("manifest.json", "the archive", MAX_MANIFEST_BYTES)?;
    let entries: Vec<DockerEntry> = parse_json(store, "manifest.json", &bytes)?;
    if entries.is_empty() {
        return Err(ImageError::BadMetadata {
            source_name: store.name(),
            member: "manifest.json".into(),
            reason: "it lists no images".into(),
        });
    }
    Ok(entries)
}

/// The entry whose RepoTags hold `wanted` (default the first), with the
/// name it goes by.
fn select_docker<'a>(
    store: &Store,
    entries: &'a [DockerEntry],
    wanted: Option<&str>,
) -> Result<(&'a DockerEntry, Option<String>), ImageError> {
    let tags = |e: &'a DockerEntry| e.repo_tags.iter().flatten();
    let Some(w) = wanted else {
        return Ok((&entries[0], tags(&entries[0]).next().cloned()));
    };
    for e in entries {
        if let Some(t) = tags(e).find(|t| select::name_matches(w, t)) {
            return Ok((e, Some(t.clone())));
        }
    }
    let available = entries
        .iter()
        .enumerate()
        .flat_map(|(i, e)| {
            let t: Vec<String> = tags(e).cloned().collect();
            if t.is_empty() {
                vec![format!("(untagged image {i})")]
            } else {
                t
            }
        })
        .collect();
    Err(ImageError::NoSuchImage { source_name: store.name(), wanted: w.to_string(), available })
}

/// A legacy config is named `<sha256 hex>.json` by docker save and skopeo.
fn digest_from_config_name(member: &str) -> Option<Digest> {
    let file = member.rsplit('/').next()?;
    Digest::parse(&format!("sha256:{}", file.strip_suffix(".json")?))
}

/// Refuses a manifest listing more than [`MAX_LAYERS`] layers, before
/// any of them is looked up.
fn check_layer_count(store: &Store, member: &str, count: usize) -> Result<(), ImageError> {
    if count > MAX_LAYERS {
        return Err(ImageError::TooManyLayers { source_name: store.name(), member: member.to_string(), count, limit: MAX_LAYERS });
    }
    Ok(())
}

fn resolve_docker(store: &Store, wanted: Option<&str>) -> Result<Resolved, ImageError> {
    let entries = read_docker_manifest(store)?;
    let (entry, name) = select_docker(store, &entries, wanted)?;
    check_layer_count(store, "manifest.json", entry.layers.len())?;
    let config_blob = store.locate(&entry.config, "manifest.json's Config")?;
    let layers = entry
        .layers
        .iter()
        .map(|l| {
            Ok(Listed {
                name: l.clone(),
                blob: store.locate(l, "manifest.json's Layers")?,
                digest: None,
                size: None,
            })
        })
        .collect::<Result<Vec<_>, ImageError>>()?;
    Ok(Resolved {
        name,
        config_member: entry.config.clone(),
        config_blob,
        config_digest: digest_from_config_name(&entry.config),
        config_size: None,
        layers,
    })
}

// ----- OCI layout ------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<PlatformJson>,
}

#[derive(Debug, Clone, Deserialize)]
struct PlatformJson {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

impl PlatformJson {
    fn platform(&self) -> Platform {
        Platform { os: self.os.clone(), architecture: self.architecture.clone(), variant: self.variant.clone() }
    }
}

#[derive(Debug, Deserialize)]
struct IndexJson {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct ManifestJson {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// The annotations that name an image in an index.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

impl Descriptor {
    fn names(&self) -> impl Iterator<Item = &String> {
        [CONTAINERD_NAME, REF_NAME].into_iter().filter_map(|k| self.annotations.get(k))
    }

    /// The name to show: Docker's short form of the containerd name, else
    /// the ref name.
    fn display_name(&self) -> Option<String> {
        match self.annotations.get(CONTAINERD_NAME) {
            Some(n) => Some(select::familiar_name(n)),
            None => self.annotations.get(REF_NAME).cloned(),
        }
    }

    fn digest(&self, store: &Store, member: &str) -> Result<Digest, ImageError> {
        Digest::parse(&self.digest).ok_or_else(|| ImageError::BadMetadata {
            source_name: store.name(),
            member: member.to_string(),
            reason: format!("digest {:?} is not sha256:<64 hex> (the only algorithm runasroot reads)", self.digest),
        })
    }
}

fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// Reads a small blob a descriptor names and checks its size and digest.
fn read_blob(store: &Store, desc: &Descriptor, referrer: &str, what: &str) -> Result<(Vec<u8>, String), ImageError> {
    let digest = desc.digest(store, referrer)?;
    let path = blob_path(&digest);
    let bytes = store.read_small(&path, referrer, MAX_MANIFEST_BYTES)?;
    if bytes.len() as u64 != desc.size {
        return Err(ImageError::SizeMismatch {
            source_name: store.name(),
            what: format!("{what} {path}"),
            expected: desc.size,
            found: bytes.len() as u64,
        });
    }
    let found = digest::sha256_bytes(&bytes);
    if found != digest {
        return Err(ImageError::DigestMismatch {
            source_name: store.name(),
            what: format!("{what} {path}"),
            expected: digest,
            found,
        });
    }
    Ok((bytes, path))
}

/// Picks the manifest for `wanted` among descriptors that carry platforms.
fn pick_platform<'a>(
    store: &Store,
    candidates: &[&'a Descriptor],
    wanted: &Platform,
) -> Result<&'a Descriptor, ImageError> {
    if let Some(d) =
        candidates.iter().find(|d| d.platform.as_ref().is_some_and(|p| p.platform().satisfies(wanted)))
    {
        return Ok(d);
    }
    if candidates.iter().all(|d| d.platform.is_none()) {
        // No platform information at all: the first, as for a name.
        return Ok(candidates[0]);
    }
    Err(ImageError::NoSuchPlatform {
        source_name: store.name(),
        wanted: wanted.to_string(),
        available: candidates.iter().filter_map(|d| d.platform.as_ref().map(|p| p.platform().to_string())).collect(),
    })
}

/// What OCI selection found: the resolved image, and the other manifests
/// of the multi-platform index it came through (for the hybrid check).
struct OciSelection {
    /// Every manifest descriptor of the index the chosen one came from.
    siblings: Vec<Descriptor>,
}

fn resolve_oci(
    store: &Store,
    wanted: Option<&str>,
    platform: &Platform,
) -> Result<(Resolved, OciSelection), ImageError> {
    let bytes = store.read_small("index.json", "the OCI layout", MAX_MANIFEST_BYTES)?;
    let index: IndexJson = parse_json(store, "index.json", &bytes)?;
    let candidates: Vec<&Descriptor> = match wanted {
        None => index.manifests.iter().collect(),
        Some(w) => index.manifests.iter().filter(|d| d.names().any(|n| select::name_matches(w, n))).collect(),
    };
    if candidates.is_empty() {
        return match wanted {
            Some(w) => Err(ImageError::NoSuchImage {
                source_name: store.name(),
                wanted: w.to_string(),
                available: index
                    .manifests
                    .iter()
                    .enumerate()
                    .map(|(i, d)| d.display_name().unwrap_or_else(|| format!("(unnamed image {i}, {})", d.digest)))
                    .collect(),
            }),
            None => Err(ImageError::BadMetadata {
                source_name: store.name(),
                member: "index.json".into(),
                reason: "it lists no images".into(),
            }),
        };
    }
    let mut chosen = pick_platform(store, &candidates, platform)?.clone();
    // What the archive calls it (`b:2` for `docker.io/library/b:2`).
    let name = chosen.display_name().or_else(|| wanted.map(str::to_string));
    let mut siblings = vec![];
    let mut referrer = "index.json".to_string();
    for _ in 0..=MAX_INDEX_DEPTH {
        let (bytes, path) = read_blob(store, &chosen, &referrer, "manifest")?;
        let value: Value = parse_json(store, &path, &bytes)?;
        if value.get("manifests").is_some() {
            let nested: IndexJson = parse_json(store, &path, &bytes)?;
            if nested.manifests.is_empty() {
                return Err(ImageError::BadMetadata {
                    source_name: store.name(),
                    member: path,
                    reason: "the image index lists no manifests".into(),
                });
            }
            let all: Vec<&Descriptor> = nested.manifests.iter().collect();
            chosen = pick_platform(store, &all, platform)?.clone();
            siblings = nested.manifests.clone();
            referrer = path;
            continue;
        }
        let manifest: ManifestJson = parse_json(store, &path, &bytes)?;
        check_layer_count(store, &path, manifest.layers.len())?;
        let config_digest = manifest.config.digest(store, &path)?;
        let config_member = blob_path(&config_digest);
        let config_blob = store.locate(&config_member, &format!("manifest {path}"))?;
        let layers = manifest
            .layers
            .iter()
            .map(|l| {
                let d = l.digest(store, &path)?;
                let member = blob_path(&d);
                Ok(Listed {
                    blob: store.locate(&member, &format!("manifest {path}"))?,
                    name: member,
                    digest: Some(d),
                    size: Some(l.size),
                })
            })
            .collect::<Result<Vec<_>, ImageError>>()?;
        if manifest.config.media_type.as_deref().is_some_and(|m| m.contains("encrypted")) {
            return Err(ImageError::BadMetadata {
                source_name: store.name(),
                member: path,
                reason: "the image is encrypted".into(),
            });
        }
        return Ok((
            Resolved {
                name,
                config_member,
                config_blob,
                config_digest: Some(config_digest),
                config_size: Some(manifest.config.size),
                layers,
            },
            OciSelection { siblings },
        ));
    }
    Err(ImageError::BadMetadata {
        source_name: store.name(),
        member: referrer,
        reason: format!("image indexes nest deeper than {MAX_INDEX_DEPTH}"),
    })
}

/// Reads both views of a Docker ≥ 25 archive and insists they agree.
fn resolve_hybrid(store: &Store, wanted: Option<&str>, platform: &Platform) -> Result<Resolved, ImageError> {
    let disagree = |reason: String| ImageError::HybridDisagree { source_name: store.name(), reason };
    let (oci, selection) = resolve_oci(store, wanted, platform)?;
    let entries = read_docker_manifest(store)?;
    let (entry, docker_name) = match select_docker(store, &entries, wanted) {
        Ok(found) => found,
        Err(ImageError::NoSuchImage { wanted, .. }) => {
            return Err(disagree(format!("index.json names {wanted:?} but manifest.json does not")))
        }
        Err(e) => return Err(e),
    };
    let docker_config = super::store::clean_path(&entry.config).unwrap_or_default();
    let docker_layers: Vec<String> =
        entry.layers.iter().map(|l| super::store::clean_path(l).unwrap_or_default()).collect();
    let oci_layers: Vec<&str> = oci.layers.iter().map(|l| l.name.as_str()).collect();
    if docker_config == oci.config_member && docker_layers == oci_layers {
        return Ok(Resolved { name: oci.name.or(docker_name), ..oci });
    }
    // A multi-platform index: manifest.json lists one platform's image
    // (the saving host's); it must be one of the index's manifests.
    if !selection.siblings.is_empty() {
        for sibling in &selection.siblings {
            let (bytes, path) = read_blob(store, sibling, "index.json", "manifest")?;
            let manifest: ManifestJson = parse_json(store, &path, &bytes)?;
            let config = blob_path(&manifest.config.digest(store, &path)?);
            let layers: Vec<String> =
                manifest.layers.iter().map(|l| l.digest(store, &path).map(|d| blob_path(&d))).collect::<Result<_, _>>()?;
            if config == docker_config && layers == docker_layers {
                return Ok(oci);
            }
        }
    }
    Err(disagree(if docker_config != oci.config_member {
        format!("manifest.json's Config is {}, index.json's manifest names {}", entry.config, oci.config_member)
    } else {
        format!("manifest.json lists layers {docker_layers:?}, index.json's manifest lists {oci_layers:?}")
    }))
}

// ----- config, diff_ids, layers ---------------------------------------

fn read_config(store: &Store, r: &Resolved) -> Result<Vec<u8>, ImageError> {
    let bytes = store.read_small(&r.config_member, "the manifest", MAX_CONFIG_BYTES)?;
    if let Some(size) = r.config_size {
        if size != bytes.len() as u64 {
            return Err(ImageError::SizeMismatch {
                source_name: store.name(),
                what: format!("config {}", r.config_member),
                expected: size,
                found: bytes.len() as u64,
            });
        }
    }
    if let Some(expected) = &r.config_digest {
        let found = digest::sha256_bytes(&bytes);
        if &found != expected {
            return Err(ImageError::DigestMismatch {
                source_name: store.name(),
                what: format!("config {}", r.config_member),
                expected: expected.clone(),
                found,
            });
        }
    }
    debug_assert_eq!(r.config_blob.length, bytes.len() as u64);
    Ok(bytes)
}

fn diff_ids(config: &Value, store: &Store, r: &Resolved) -> Result<Vec<Digest>, ImageError> {
    let bad = |reason: String| ImageError::BadMetadata {
        source_name: store.name(),
        member: format!("config {}", r.config_member),
        reason,
    };
    if !config.is_object() {
        return Err(bad("the config is not a JSON object".into()));
    }
    let list = config
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("it has no rootfs.diff_ids list".into()))?;
    let ids = list
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str()
                .and_then(Digest::parse)
                .ok_or_else(|| bad(format!("rootfs.diff_ids[{i}] is {v}, not sha256:<64 hex>")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() != r.layers.len() {
        return Err(bad(format!(
            "rootfs.diff_ids has {} entries but the manifest lists {} layers",
            ids.len(),
            r.layers.len()
        )));
    }
    Ok(ids)
}

/// Blobs hashed at once: sha256 is CPU-bound, one core per blob.
const MAX_HASHERS: usize = 8;
/// The progress label while the layers are hashed.
pub const VERIFYING: &str = "verifying the layers";

/// Hashes the listed layers `blobs` (indexes into `r.layers`), several at
/// once; each result with the blob file's identity from before its hash
/// (a write during or after it moves the ctime). The first error in
/// listing order wins, whatever the timing. Progress is reported from
/// the calling thread.
fn hash_blobs(
    r: &Resolved,
    blobs: &[usize],
    total: u64,
    progress: &dyn Fn(&str, u64, u64),
) -> Result<Vec<(Digest, FileId)>, (usize, io::Error)> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_HASHERS).min(blobs.len()).max(1);
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<io::Result<(Digest, FileId)>>> = (0..blobs.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel::<(usize, Option<io::Result<(Digest, FileId)>>, u64)>();
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let tx = tx.clone();
                let next = &next;
                s.spawn(move || loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&index) = blobs.get(k) else { break };
                    let blob = &r.layers[index].blob;
                    let hash = || -> io::Result<(Digest, FileId)> {
                        let file = File::open(&blob.file)?;
                        let identity = FileId::of(&file)?;
                        let mut seen = 0;
                        let digest = sha256_range(&file, blob.offset, blob.length, &mut |n| {
                            let _ = tx.send((k, None, n - seen));
                            seen = n;
                        })?;
                        Ok((digest, identity))
                    };
                    let result = hash();
                    if tx.send((k, Some(result), 0)).is_err() {
                        break;
                    }
                })
            })
            .collect();
        drop(tx);
        let mut done = 0;
        for (k, result, n) in rx {
            done += n;
            if n > 0 {
                progress(VERIFYING, done, total);
            }
            if let Some(result) = result {
                results[k] = Some(result);
            }
        }
        crate::layers::join_all(handles);
    });
    results
        .into_iter()
        .zip(blobs)
        .map(|(r, &index)| r.expect("every blob was hashed").map_err(|e| (index, e)))
        .collect()
}

/// Hashes every distinct stored blob once and checks it against what the
/// image says: its descriptor digest and size when given, and its diff_id
/// when it is not compressed.
fn verify_layers(
    store: &Store,
    r: &Resolved,
    diff_ids: &[Digest],
    progress: &dyn Fn(&str, u64, u64),
) -> Result<Vec<Layer>, ImageError> {
    let read_err = |index: usize, l: &Listed, source: io::Error| ImageError::ReadLayer {
        source_name: store.name(),
        index,
        name: l.name.clone(),
        source,
    };
    // Sizes and codecs first: cheap, and they fail before any hashing.
    let mut codecs = vec![];
    for (index, l) in r.layers.iter().enumerate() {
        if let Some(size) = l.size {
            if size != l.blob.length {
                return Err(ImageError::SizeMismatch {
                    source_name: store.name(),
                    what: format!("layer {index} ({})", l.name),
                    expected: size,
                    found: l.blob.length,
                });
            }
        }
        let head = read_head(&l.blob, compress::MAGIC_LEN).map_err(|e| read_err(index, l, e))?;
        codecs.push(compress::detect(&head).supported().map_err(|codec| ImageError::UnsupportedLayerCompression {
            source_name: store.name(),
            index,
            name: l.name.clone(),
            codec,
        })?);
    }

    // Each distinct blob once, by its first listing.
    let mut distinct: Vec<usize> = vec![];
    for (index, l) in r.layers.iter().enumerate() {
        if !distinct.iter().any(|&i| r.layers[i].blob == l.blob) {
            distinct.push(index);
        }
    }
    let total: u64 = distinct.iter().map(|&i| r.layers[i].blob.length).sum();
    let hashed = hash_blobs(r, &distinct, total, progress).map_err(|(index, e)| read_err(index, &r.layers[index], e))?;
    let hashed: HashMap<&BlobRef, (Digest, FileId)> =
        distinct.iter().zip(hashed).map(|(&i, h)| (&r.layers[i].blob, h)).collect();

    let mut layers = vec![];
    for (index, (l, compression)) in r.layers.iter().zip(codecs).enumerate() {
        let (found, stored_identity) = hashed[&l.blob].clone();
        if let Some(expected) = &l.digest {
            if &found != expected {
                return Err(ImageError::DigestMismatch {
                    source_name: store.name(),
                    what: format!("layer {index} ({})", l.name),
                    expected: expected.clone(),
                    found,
                });
            }
        }
        if compression == super::Compression::None && found != diff_ids[index] {
            // The stored bytes are the tar itself: this is the diff_id.
            return Err(ImageError::DiffIdMismatch {
                source_name: store.name(),
                index,
                name: l.name.clone(),
                expected: diff_ids[index].clone(),
                found,
            });
        }
        layers.push(Layer {
            index,
            blob: l.blob.clone(),
            blob_digest: found,
            diff_id: diff_ids[index].clone(),
            compression,
            name: l.name.clone(),
            stored_identity,
        });
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_is_an_empty_image_for_the_platform() {
        let img = open("scratch", &OpenOptions { platform: Some("linux/arm64/v8".into()), ..Default::default() }).unwrap();
        assert!(img.layers.is_empty());
        assert_eq!(img.format(), SourceFormat::Scratch);
        assert_eq!(
            String::from_utf8(img.config_bytes.clone()).unwrap(),
            r#"{"architecture":"arm64","os":"linux","variant":"v8","config":{},"rootfs":{"type":"layers","diff_ids":[]},"history":[]}"#
        );
        assert_eq!(serde_json::from_slice::<Value>(&img.config_bytes).unwrap(), img.config);
        let amd64 = open("scratch", &OpenOptions::default()).unwrap();
        assert_eq!(amd64.config["architecture"], "amd64");
        assert!(img.env().is_empty());
        let e = open("scratch", &OpenOptions { from_image: Some("a:b".into()), ..Default::default() }).unwrap_err();
        assert!(matches!(e, ImageError::SelectInScratch { .. }), "{e}");
        // Any other spelling is a path.
        assert!(matches!(open("./scratch", &OpenOptions::default()), Err(ImageError::Open { .. })));
    }

    #[test]
    fn parses_image_references() {
        let exists = |p: &Path| p == Path::new("/x/a:b.tar") || p == Path::new("/x/img");
        type Want<'a> = Option<(&'a str, Option<&'a str>)>;
        let cases: [(&str, Want); 9] = [
            ("/x/base.tar", Some(("/x/base.tar", None))),
            ("docker-archive:/x/base.tar", Some(("/x/base.tar", None))),
            ("docker-archive:/x/a:b.tar", Some(("/x/a:b.tar", None))),
            ("oci:/x/img", Some(("/x/img", None))),
            ("oci:/x/img:busybox:latest", Some(("/x/img", Some("busybox:latest")))),
            ("oci-archive:/x/o.tar:v1", Some(("/x/o.tar", Some("v1")))),
            ("oci:", None),
            ("oci::ref", None),
            ("", None),
        ];
        for (spec, want) in cases {
            let got = parse_spec(spec, exists).ok().map(|s| (s.path, s.reference));
            let want = want.map(|(p, r)| (PathBuf::from(p), r.map(str::to_string)));
            assert_eq!(got, want, "{spec}");
        }
    }

    /// A legacy docker-archive whose manifest lists the one layer tar
    /// `count` times (a layer may repeat), and a config to match, padded
    /// with a label to at least `config_len` bytes.
    fn repeated_layer_archive(count: usize, config_len: usize) -> tempfile::NamedTempFile {
        let layer = {
            let mut b = tar::Builder::new(Vec::new());
            let mut h = tar::Header::new_ustar();
            h.set_size(1);
            h.set_mode(0o644);
            b.append_data(&mut h, "f", &b"x"[..]).unwrap();
            b.into_inner().unwrap()
        };
        let diff_id = digest::sha256_bytes(&layer);
        let mut config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": vec![diff_id.to_string(); count]},
        });
        let short = serde_json::to_vec(&config).unwrap().len();
        if config_len > short {
            // `,"config":{"Labels":{"pad":"…"}}` is 31 bytes and the pad.
            config["config"] = serde_json::json!({"Labels": {"pad": "p".repeat(config_len.saturating_sub(short + 31))}});
        }
        let manifest = serde_json::json!([{"Config": "c.json", "Layers": vec!["l/layer.tar"; count]}]);
        let mut b = tar::Builder::new(Vec::new());
        for (name, bytes) in [
            ("l/layer.tar", layer),
            ("c.json", serde_json::to_vec(&config).unwrap()),
            ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ] {
            let mut h = tar::Header::new_ustar();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, &bytes[..]).unwrap();
        }
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, &b.into_inner().unwrap()).unwrap();
        f
    }

    #[test]
    fn an_image_of_more_layers_than_any_runtime_stacks_is_refused() {
        let opts = OpenOptions { temp_dir: std::env::temp_dir(), ..Default::default() };
        let at_limit = repeated_layer_archive(MAX_LAYERS, 0);
        assert_eq!(open(at_limit.path().to_str().unwrap(), &opts).unwrap().layers.len(), MAX_LAYERS);
        let over = repeated_layer_archive(MAX_LAYERS + 1, 0);
        let err = open(over.path().to_str().unwrap(), &opts).unwrap_err();
        assert!(matches!(err, ImageError::TooManyLayers { count: 501, limit: 500, .. }), "{err}");
        assert!(err.to_string().ends_with(
            "manifest.json lists 501 layers, more than the 500 runasroot reads (no container runtime stacks more; \
             squash the image, e.g. with a multi-stage build)"
        ), "{err}");
    }

    #[test]
    fn a_config_larger_than_its_bound_is_refused_unread() {
        let opts = OpenOptions { temp_dir: std::env::temp_dir(), ..Default::default() };
        let limit = MAX_CONFIG_BYTES as usize;
        let at_limit = repeated_layer_archive(1, limit);
        let img = open(at_limit.path().to_str().unwrap(), &opts).unwrap();
        assert_eq!(img.config_bytes.len(), limit);
        let over = repeated_layer_archive(1, limit + 1);
        let err = open(over.path().to_str().unwrap(), &opts).unwrap_err();
        assert!(
            err.to_string().ends_with(": c.json is 8388609 bytes, more than the 8388608 allowed for image metadata"),
            "{err}"
        );
    }

    #[test]
    fn legacy_config_names_carry_their_digest() {
        let hex = "ab".repeat(32);
        assert_eq!(
            digest_from_config_name(&format!("{hex}.json")),
            Some(Digest::parse(&format!("sha256:{hex}")).unwrap())
        );
        assert_eq!(digest_from_config_name("config.json"), None);
    }
}
