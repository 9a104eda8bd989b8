//! Read one layer's tar headers into a [`LayerTree`], hashing the
//! uncompressed stream against the layer's diff_id: the only tar decoder
//! of image layers in runasroot.
//!
//! An uncompressed layer is read where the image stores it (a byte range
//! of the archive or a blob file) and its file data is later read from
//! there by offset (by the export's tar writer, or by the guest through
//! the EROFS lower). When the image reader has already measured those
//! very bytes (`blob_digest`, which `image::open` computes over every
//! stored blob) and they are the diff_id, only the headers are read: file
//! data is seeked over, not read twice nor hashed twice. A compressed
//! layer is decompressed once into the spool cache (or, without one, a
//! temporary file), hashing it on the way; a later run finds the cache
//! entry and hashes it again instead of decompressing.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use sha2::{Digest as _, Sha256};

use super::guard::{Extensions, LastEntry, TarGuard};
use super::pax;
use super::tree::{normalize, Content, EntryKind, Inode, LayerTree, Meta};
use super::{label, LayerError, Shared, ENTRY_COST, MAX_METADATA_BYTES};
use crate::cache::{self, Cache};
use crate::image::{Compression, Digest, FileId, Layer};
use crate::spool::{Full, Spooler};
use runasroot_guest::tarfmt::MODE_BITS;
use runasroot_guest::whiteout::{self, Name};

/// Read and spool buffer size: large enough that syscalls and hashing
/// run in big pieces, small enough that parallel readers stay far below
/// the export's memory budget.
const BUF: usize = 256 << 10;
/// Buffer of the header-only reader: small files and their headers are
/// read in one piece, large files seeked over.
const HEADER_BUF: usize = 64 << 10;
/// How often (in entries) a reader checks whether another layer failed.
const STOP_CHECK_EVERY: usize = 256;

/// Where decompressed layers go: the spool cache when there is one, else
/// a temporary file in `temp_dir` (named, so a launcher can open it; gone
/// with the run's temporary directory).
#[derive(Debug, Clone, Copy)]
pub struct Spool<'a> {
    pub cache: Option<&'a Cache>,
    pub temp_dir: &'a Path,
}

/// Where a layer's uncompressed tar can be read by offset.
#[derive(Debug)]
pub(crate) struct Source {
    pub file: File,
    /// The file by name, for launchers that open it themselves.
    pub path: PathBuf,
    /// Offset of the tar's first byte in `file`, and its length.
    pub base: u64,
    pub len: u64,
    /// How the layer is named in errors.
    pub label: String,
    /// The file as it was when its bytes were verified.
    pub identity: FileId,
    pub origin: Origin,
    /// Keeps a cache entry held or a temporary spool alive.
    _keep: Keep,
}

/// Where a source's bytes came from this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The image's own file, read in place.
    Stored,
    /// A cache entry made by an earlier run, checked again now.
    CacheHit,
    /// Decompressed now into the cache (`rebuilt`: over a corrupted entry).
    CacheNew { rebuilt: bool },
    /// Decompressed now into a temporary file.
    Temp,
}

#[derive(Debug)]
enum Keep {
    Nothing,
    Entry(#[allow(dead_code)] cache::Entry),
    Temp(#[allow(dead_code)] tempfile::TempPath),
}

/// One layer, read.
#[derive(Debug)]
pub(crate) struct ReadLayer {
    pub tree: LayerTree,
    pub source: Source,
    /// Decompressed bytes written this run (to the cache or a temp file).
    pub spooled_bytes: u64,
}

/// Reads layer `layer` (the `source`-th of the index) into a tree.
pub(crate) fn read_layer(layer: &Layer, source: u32, spool: Spool<'_>, shared: &Shared) -> Result<ReadLayer, LayerError> {
    let label = label(layer);
    let open_err = |path: &Path, e| LayerError::OpenLayer { layer: label.clone(), path: path.to_path_buf(), source: e };
    let file = File::open(&layer.blob.file).map_err(|e| open_err(&layer.blob.file, e))?;
    let stored = |file: File, tree| -> Result<ReadLayer, LayerError> {
        let identity = layer.stored_identity.clone();
        let source = Source {
            file,
            path: layer.blob.file.clone(),
            base: layer.blob.offset,
            len: layer.blob.length,
            label: label.clone(),
            identity,
            origin: Origin::Stored,
            _keep: Keep::Nothing,
        };
        Ok(ReadLayer { tree, source, spooled_bytes: 0 })
    };
    if layer.compression == Compression::None {
        let tree = if layer.blob_digest == layer.diff_id {
            let reader = SkippingReader::new(&file, layer.blob.offset, layer.blob.length);
            let guard = TarGuard::new(reader);
            let last = guard.last_entry();
            let mut archive = tar::Archive::new(guard);
            let entries = archive.entries_with_seek().map_err(|e| read_error(&label, e))?;
            index_entries(entries, &last, source, &label, shared, TarKind::Layer)?
        } else {
            let range = RangeReader { file: &file, pos: layer.blob.offset, end: layer.blob.offset.saturating_add(layer.blob.length) };
            hash_and_parse(Box::new(range), None, layer, source, &label, shared)?.0
        };
        return stored(file, tree);
    }
    let mut rebuilt = false;
    if let Some(cache) = spool.cache {
        let cache_err = |e| LayerError::Cache { layer: label.clone(), dir: cache.dir().to_path_buf(), source: e };
        if let Some(entry) = cache.get(&layer.blob_digest).map_err(cache_err)? {
            match read_cached(entry, layer, source, &label, shared)? {
                Ok(read) => return Ok(read),
                Err(bad) => {
                    bad.discard().map_err(cache_err)?;
                    rebuilt = true;
                }
            }
        }
        match cache.make(&layer.blob_digest).map_err(cache_err)? {
            cache::Made::Existing(entry) => {
                if let Ok(read) = read_cached(entry, layer, source, &label, shared)? {
                    return Ok(read);
                }
                return Err(LayerError::CacheCorrupt { layer: label.clone(), dir: cache.dir().to_path_buf() });
            }
            cache::Made::New(mut pending) => {
                let (tree, len) = {
                    let out = BufWriter::with_capacity(BUF, Spooler::new(&mut *pending.file(), cache.dir()));
                    decompress(&file, layer, out, source, &label, shared, cache.dir())?
                };
                let entry = pending.commit(cache).map_err(cache_err)?;
                let identity = FileId::of(&entry.file).map_err(|e| read_error(&label, e))?;
                let file = entry.file.try_clone().map_err(|e| read_error(&label, e))?;
                let source = Source {
                    file,
                    path: entry.path.clone(),
                    base: 0,
                    len,
                    label,
                    identity,
                    origin: Origin::CacheNew { rebuilt },
                    _keep: Keep::Entry(entry),
                };
                return Ok(ReadLayer { tree, source, spooled_bytes: len });
            }
        }
    }
    let temp = tempfile::Builder::new()
        .prefix("spool-")
        .suffix(".tar")
        .tempfile_in(spool.temp_dir)
        .map_err(|e| spool_error(&label, spool.temp_dir, e))?;
    let (spooled, temp_path) = temp.into_parts();
    let out = BufWriter::with_capacity(BUF, Spooler::new(&spooled, spool.temp_dir));
    let (tree, len) = decompress(&file, layer, out, source, &label, shared, spool.temp_dir)?;
    let identity = FileId::of(&spooled).map_err(|e| read_error(&label, e))?;
    let source = Source {
        file: spooled,
        path: temp_path.to_path_buf(),
        base: 0,
        len,
        label,
        identity,
        origin: Origin::Temp,
        _keep: Keep::Temp(temp_path),
    };
    Ok(ReadLayer { tree, source, spooled_bytes: len })
}

/// Why a `.wh.` name cannot be copied into a new layer.
pub(crate) const RESERVED_NAME: &str = "names starting with .wh. are reserved for whiteouts in an image layer";

/// A content tar (--copy-to-root), read: its tree, and the file its data
/// is read from by offset (the tar itself, or its decompressed spool).
#[derive(Debug)]
pub(crate) struct ContentTar {
    pub tree: LayerTree,
    pub data: PathBuf,
    /// The decompressed copy, removed when dropped.
    pub spool: Option<tempfile::TempPath>,
}

/// Reads a plain, gzip or zstd tar of content; `source` is the id its
/// files' data are tagged with.
pub(crate) fn read_content_tar(path: &Path, source: u32, label: &str, temp_dir: &Path) -> Result<ContentTar, LayerError> {
    let open_err = |e| LayerError::OpenLayer { layer: label.to_string(), path: path.to_path_buf(), source: e };
    let file = File::open(path).map_err(open_err)?;
    let len = file.metadata().map_err(open_err)?.len();
    let mut magic = [0u8; 4];
    let n = file.read_at(&mut magic, 0).map_err(open_err)?;
    let compression = match &magic[..n] {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
        _ => Compression::None,
    };
    let shared = Shared::new(MAX_METADATA_BYTES);
    if compression == Compression::None {
        let guard = TarGuard::new(SkippingReader::new(&file, 0, len));
        let last = guard.last_entry();
        let mut archive = tar::Archive::new(guard);
        let entries = archive.entries_with_seek().map_err(|e| read_error(label, e))?;
        let tree = index_entries(entries, &last, source, label, &shared, TarKind::Content)?;
        return Ok(ContentTar { tree, data: path.to_path_buf(), spool: None });
    }
    let temp = tempfile::Builder::new()
        .prefix("copy-")
        .suffix(".tar")
        .tempfile_in(temp_dir)
        .map_err(|e| spool_error(label, temp_dir, e))?;
    let (spooled, temp_path) = temp.into_parts();
    let range = BufReader::with_capacity(BUF, RangeReader { file: &file, pos: 0, end: len });
    let decoded: Box<dyn Read> = match compression {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(range)),
        _ => Box::new(zstd::stream::read::Decoder::with_buffer(range).map_err(|e| read_error(label, e))?),
    };
    let mut out = BufWriter::with_capacity(BUF, Spooler::new(&spooled, temp_dir));
    let mut tee = Tee { inner: decoded, hasher: Sha256::new(), len: 0, spool: Some(&mut out), spool_error: None };
    let parsed = {
        let guard = TarGuard::new(BufReader::with_capacity(BUF, &mut tee));
        let last = guard.last_entry();
        let mut archive = tar::Archive::new(guard);
        archive
            .entries()
            .map_err(|e| read_error(label, e))
            .and_then(|entries| index_entries(entries, &last, source, label, &shared, TarKind::Content))
    };
    if let Some(e) = tee.spool_error.take() {
        return Err(spool_error(label, temp_dir, e));
    }
    let tree = parsed?;
    drop(tee);
    out.flush().map_err(|e| spool_error(label, temp_dir, e))?;
    Ok(ContentTar { tree, data: temp_path.to_path_buf(), spool: Some(temp_path) })
}

/// Reads a cache entry as the layer's uncompressed tar, hashing all of it:
/// `Ok(Err(entry))` when it does not hash to the diff_id (corrupted).
fn read_cached(
    entry: cache::Entry,
    layer: &Layer,
    source: u32,
    label: &str,
    shared: &Shared,
) -> Result<Result<ReadLayer, cache::Entry>, LayerError> {
    let len = entry.file.metadata().map_err(|e| read_error(label, e))?.len();
    let range = RangeReader { file: &entry.file, pos: 0, end: len };
    match hash_and_parse(Box::new(range), None, layer, source, label, shared) {
        Ok((tree, _)) => {
            let identity = FileId::of(&entry.file).map_err(|e| read_error(label, e))?;
            let file = entry.file.try_clone().map_err(|e| read_error(label, e))?;
            let source = Source {
                file,
                path: entry.path.clone(),
                base: 0,
                len,
                label: label.to_string(),
                identity,
                origin: Origin::CacheHit,
                _keep: Keep::Entry(entry),
            };
            Ok(Ok(ReadLayer { tree, source, spooled_bytes: 0 }))
        }
        // A tar that does not parse or hash right: the entry is damaged
        // (the compressed blob it came from was verified when it was made)
        // — unless the read stopped because the run did (SIGINT,
        // --timeout): then the entry is fine and stays.
        Err(LayerError::DiffIdMismatch { .. } | LayerError::ReadLayer { .. }) if crate::interrupt::cancelled().is_none() => {
            Ok(Err(entry))
        }
        Err(e) => Err(e),
    }
}

/// Decompresses the layer's stored bytes into `out`, hashing and indexing
/// them on the way; returns the tree and the uncompressed length.
fn decompress<W: Write>(
    file: &File,
    layer: &Layer,
    out: BufWriter<W>,
    source: u32,
    label: &str,
    shared: &Shared,
    spool_dir: &Path,
) -> Result<(LayerTree, u64), LayerError> {
    let range = RangeReader { file, pos: layer.blob.offset, end: layer.blob.offset.saturating_add(layer.blob.length) };
    let decoded: Box<dyn Read + '_> = match layer.compression {
        Compression::None => Box::new(range),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(BufReader::with_capacity(BUF, range))),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(BUF, range)).map_err(|e| read_error(label, e))?,
        ),
    };
    let mut spool: Box<dyn Write + '_> = Box::new(out);
    let (tree, len) = hash_and_parse(decoded, Some((&mut *spool, spool_dir)), layer, source, label, shared)?;
    spool.flush().map_err(|e| spool_error(label, spool_dir, e))?;
    Ok((tree, len))
}

/// Parses the tar on `stream` while hashing it (and copying it to
/// `spool`), then checks the hash against the layer's diff_id.
fn hash_and_parse(
    stream: Box<dyn Read + '_>,
    spool: Option<(&mut dyn Write, &Path)>,
    layer: &Layer,
    source: u32,
    label: &str,
    shared: &Shared,
) -> Result<(LayerTree, u64), LayerError> {
    let (spool, spool_dir) = match spool {
        Some((w, d)) => (Some(w), Some(d)),
        None => (None, None),
    };
    let mut tee = Tee { inner: stream, hasher: Sha256::new(), len: 0, spool, spool_error: None };
    let parsed = parse(&mut tee, source, label, shared);
    if let (Some(e), Some(dir)) = (tee.spool_error.take(), spool_dir) {
        return Err(spool_error(label, dir, e));
    }
    let tree = parsed?;
    let found = Digest::from_sha256(&tee.hasher.finalize_reset());
    if found != layer.diff_id {
        return Err(LayerError::DiffIdMismatch { layer: label.to_string(), expected: layer.diff_id.clone(), found });
    }
    Ok((tree, tee.len))
}

fn spool_error(label: &str, dir: &Path, source: io::Error) -> LayerError {
    match Full::of(&source) {
        Some(full) => LayerError::SpoolFull { layer: label.to_string(), full: full.clone() },
        None => LayerError::Spool { layer: label.to_string(), dir: dir.to_path_buf(), source },
    }
}

fn read_error(label: &str, source: io::Error) -> LayerError {
    LayerError::ReadLayer { layer: label.to_string(), source }
}

/// Parses the tar on `stream` (to its very end: the digest covers the
/// padding after the end-of-archive blocks too).
fn parse(stream: &mut dyn Read, source: u32, label: &str, shared: &Shared) -> Result<LayerTree, LayerError> {
    let guard = TarGuard::new(BufReader::with_capacity(BUF, stream));
    let last = guard.last_entry();
    let mut archive = tar::Archive::new(guard);
    let tree = index_entries(archive.entries().map_err(|e| read_error(label, e))?, &last, source, label, shared, TarKind::Layer)?;
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(|e| read_error(label, e))?;
    Ok(tree)
}

/// What a tar is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TarKind {
    /// An image layer: `.wh.` names are whiteouts.
    Layer,
    /// Content to place (--copy-to-root): `.wh.` names are refused, since
    /// the new layer could not carry them as files.
    Content,
}

fn index_entries<R: Read>(
    entries: tar::Entries<'_, R>,
    last: &LastEntry,
    source: u32,
    label: &str,
    shared: &Shared,
    kind: TarKind,
) -> Result<LayerTree, LayerError> {
    let mut tree = LayerTree::new();
    for (n, entry) in entries.enumerate() {
        if n % STOP_CHECK_EVERY == 0 && shared.stop.load(Ordering::Relaxed) {
            return Err(read_error(label, io::Error::other("stopped: another layer failed")));
        }
        let mut entry = entry.map_err(|e| read_error(label, e))?;
        // The guard saw the header of every entry the crate returns.
        let ext = last.take().ok_or_else(|| read_error(label, io::Error::other("an entry the tar guard did not see")))?;
        if let Some((path, entry_kind)) = convert(&mut entry, ext, source, label, kind)? {
            if !shared.budget.charge(metadata_cost(&path, &entry_kind)) {
                return Err(LayerError::TooMuchMetadata {
                    layer: label.to_string(),
                    entry: String::from_utf8_lossy(&path).into_owned(),
                    limit: shared.budget.limit,
                });
            }
            tree.insert(&path, entry_kind, label)?;
        }
    }
    Ok(tree)
}

/// What an entry costs the merge's memory: [`ENTRY_COST`] and the bytes
/// it keeps (name, link target, xattrs).
fn metadata_cost(path: &[u8], kind: &EntryKind) -> u64 {
    let xattrs = |m: &Meta| m.xattrs.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>();
    let bytes = match kind {
        EntryKind::Dir(m) => xattrs(m),
        EntryKind::Node(Inode { content, meta }) => {
            xattrs(meta) + if let Content::Symlink(t) = content { t.len() } else { 0 }
        }
        EntryKind::Hardlink(target) => target.len(),
        EntryKind::Marker => 0,
    };
    ENTRY_COST + (path.len() + bytes) as u64
}

/// What a tar entry says, as a normalised path and an [`EntryKind`];
/// `None` for entries that describe no file (PAX global headers). The
/// names, ids and PAX records come from `ext`, the header and records as
/// they were in the stream ([`pax`](super::pax) says why); the crate
/// gives where the data are and how long, checked against them.
fn convert<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    ext: Extensions,
    source: u32,
    label: &str,
    tar_kind: TarKind,
) -> Result<Option<(Vec<u8>, EntryKind)>, LayerError> {
    let header = ext.header.clone();
    let entry_type = header.entry_type();
    if entry_type.is_pax_global_extensions() {
        return Ok(None);
    }
    let records = match &ext.pax {
        Some(data) => pax::records(data),
        None => Ok(Vec::new()),
    };
    let raw = pax::path(entry, &ext, records.as_deref().unwrap_or_default());
    let name = || String::from_utf8_lossy(&raw).into_owned();
    let bad_path = |reason| LayerError::BadPath { layer: label.to_string(), entry: name(), reason };
    let bad_header = |field, e| LayerError::BadHeader { layer: label.to_string(), entry: name(), field, source: e };
    let records = records.map_err(|reason| bad_header("pax", io::Error::other(reason)))?;
    pax::check_size(entry, &ext, &records).map_err(|e| bad_header("size", io::Error::other(e)))?;
    let path = normalize(&raw).map_err(bad_path)?;
    if tar_kind == TarKind::Content && path.split(|&b| b == b'/').any(|c| c.starts_with(whiteout::PREFIX)) {
        return Err(bad_path(RESERVED_NAME));
    }
    let last = path.rsplit(|&b| b == b'/').next().unwrap_or_default();
    if !matches!(whiteout::classify(last), Ok(Name::Plain(_))) {
        return Ok(Some((path, EntryKind::Marker)));
    }
    let link = || pax::link(entry, &ext, &records);
    // Hard links take their inode's metadata, but a header that cannot be
    // read is refused whatever the entry.
    let meta = read_meta(entry_meta(&header, &records), label, &raw)?;
    let kind = match entry_type {
        tar::EntryType::Directory => EntryKind::Dir(meta),
        // Pre-POSIX tars mark directories by a trailing slash on a
        // regular-file typeflag (NUL), as Go's archive/tar reads them.
        tar::EntryType::Regular if header.as_bytes()[156] == 0 && raw.ends_with(b"/") => EntryKind::Dir(meta),
        tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::Node(Inode {
            content: Content::File { source, offset: entry.raw_file_position(), size: entry.size() },
            meta,
        }),
        tar::EntryType::Symlink => {
            let target = link();
            if target.is_empty() || target.contains(&0) {
                return Err(bad_path("a symlink with an empty or NUL-containing target"));
            }
            // Linux symlinks have no permission bits of their own: lstat
            // (the guest's view, umoci's rootfs) always shows 0777.
            EntryKind::Node(Inode { content: Content::Symlink(target), meta: Meta { mode: 0o777, ..meta } })
        }
        tar::EntryType::Link => EntryKind::Hardlink(normalize(&link()).map_err(bad_path)?),
        tar::EntryType::Char | tar::EntryType::Block => {
            let major = header.device_major().map_err(|e| bad_header("devmajor", e))?;
            let minor = header.device_minor().map_err(|e| bad_header("devminor", e))?;
            let (Some(major), Some(minor)) = (major, minor) else {
                return Err(bad_header("devmajor", io::Error::other("a device in a pre-ustar header")));
            };
            if entry_type == tar::EntryType::Char && (major, minor) == (0, 0) {
                // overlayfs (the in-VM engine) reads it as a whiteout.
                return Err(bad_path("a char device 0:0 cannot be stored in a layer: it is overlayfs' whiteout"));
            }
            let content = if entry_type == tar::EntryType::Char {
                Content::Char { major, minor }
            } else {
                Content::Block { major, minor }
            };
            EntryKind::Node(Inode { content, meta })
        }
        tar::EntryType::Fifo => EntryKind::Node(Inode { content: Content::Fifo, meta }),
        other => {
            let what = format!("typeflag {:?}", char::from(other.as_byte()));
            return Err(LayerError::UnsupportedEntry { layer: label.to_string(), entry: name(), what });
        }
    };
    Ok(Some((path, kind)))
}

/// The header fields and PAX records an entry's metadata comes from.
struct RawMeta {
    mode: io::Result<u32>,
    uid: io::Result<u64>,
    gid: io::Result<u64>,
    mtime: io::Result<u64>,
    pax: io::Result<Vec<(String, Vec<u8>)>>,
}

/// The header as it was in the stream and its PAX records: a PAX `uid`
/// or `gid` overrides the header's.
fn entry_meta(header: &tar::Header, records: &[pax::Record]) -> RawMeta {
    let old = header.as_old();
    let id = |key, field: io::Result<u64>, raw: &[u8]| match pax::number(records, key) {
        Ok(Some(v)) => Ok(v),
        Ok(None) => or_blank(field, raw),
        Err(e) => Err(io::Error::other(e)),
    };
    let uid = id("uid", header.uid(), &old.uid);
    let gid = id("gid", header.gid(), &old.gid);
    let pax = records
        .iter()
        .map(|(k, v)| match std::str::from_utf8(k) {
            Ok(k) => Ok((k.to_string(), v.clone())),
            Err(_) => Err(io::Error::other("a PAX record with a non-UTF-8 key")),
        })
        .collect();
    RawMeta { mode: or_blank(header.mode(), &old.mode), uid, gid, mtime: or_blank(header.mtime(), &old.mtime), pax }
}

/// An all-blank numeric field reads as 0, as Go's archive/tar (Docker,
/// umoci) and GNU tar read it.
fn or_blank<T: Default>(parsed: io::Result<T>, field: &[u8]) -> io::Result<T> {
    parsed.or_else(|e| if field.iter().all(|&b| b == 0 || b == b' ') { Ok(T::default()) } else { Err(e) })
}

fn read_meta(raw: RawMeta, label: &str, entry: &[u8]) -> Result<Meta, LayerError> {
    let bad = |field, e| LayerError::BadHeader {
        layer: label.to_string(),
        entry: String::from_utf8_lossy(entry).into_owned(),
        field,
        source: e,
    };
    let id = |field, v: io::Result<u64>| -> Result<u32, LayerError> {
        let v = v.map_err(|e| bad(field, e))?;
        // u32::MAX is chown's "leave unchanged": not an owner.
        u32::try_from(v)
            .ok()
            .filter(|&v| v != u32::MAX)
            .ok_or_else(|| bad(field, io::Error::other(format!("{v} is not a Linux owner id (at most 4294967294)"))))
    };
    let mut meta = Meta {
        mode: raw.mode.map_err(|e| bad("mode", e))? & MODE_BITS,
        uid: id("uid", raw.uid)?,
        gid: id("gid", raw.gid)?,
        mtime: raw.mtime.map_err(|e| bad("mtime", e))?,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    };
    for (key, value) in raw.pax.map_err(|e| bad("pax", e))? {
        // POSIX pax: a record with an empty value unsets its keyword (Go's
        // archive/tar, so Docker and umoci, read it so).
        if key == "mtime" {
            if !value.is_empty() {
                (meta.mtime, meta.mtime_nsec) = pax_time(&value).ok_or_else(|| bad("mtime", io::Error::other("not a PAX time")))?;
            }
        } else if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
            // The last record for a name wins, as when a tar is extracted.
            meta.xattrs.retain(|(n, _)| n != name.as_bytes());
            // overlayfs-private xattrs would steer the guest's overlay
            // mount: never taken from a layer (FORMATS.md).
            if !value.is_empty() && !whiteout::is_overlay_private(name.as_bytes()) {
                meta.xattrs.push((name.as_bytes().to_vec(), value));
            }
        }
    }
    meta.xattrs.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(meta)
}

/// Seconds and nanoseconds of a PAX time (`123`, `123.456`, `-1.5`);
/// times before the epoch become 0 (mtimes here are unsigned, as in the
/// export's tar and the lower image's inodes). Digits past the ninth
/// decimal are dropped.
fn pax_time(value: &[u8]) -> Option<(u64, u32)> {
    let s = std::str::from_utf8(value).ok()?;
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nsec = frac.bytes().take(9).enumerate().map(|(i, d)| u32::from(d - b'0') * 10u32.pow(8 - i as u32)).sum();
    match int.strip_prefix('-') {
        Some(neg) => neg.parse::<u64>().ok().map(|_| (0, 0)),
        None => int.parse::<u64>().ok().map(|secs| (secs, nsec)),
    }
}

/// Reads `file` from `pos` to `end` with positioned reads, so several
/// readers can share one archive file; a file shorter than the range is
/// an error, not a quiet end.
struct RangeReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(usize::try_from(self.end - self.pos).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file ends before the layer's last byte"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// A layer's bytes for header-only reading: positioned reads through a
/// buffer that survives short forward seeks (the tar reader seeks over
/// every file's data), positions relative to the layer's first byte. A
/// seek past the layer's end is an error, so a tar whose last file is
/// cut short is refused rather than read as complete.
struct SkippingReader<'a> {
    file: &'a File,
    base: u64,
    len: u64,
    pos: u64,
    buf: Vec<u8>,
    /// Layer position of `buf[0]`, and how much of `buf` is valid.
    buf_at: u64,
    buf_len: usize,
}

impl<'a> SkippingReader<'a> {
    fn new(file: &'a File, base: u64, len: u64) -> Self {
        SkippingReader { file, base, len, pos: 0, buf: vec![0; HEADER_BUF], buf_at: 0, buf_len: 0 }
    }
}

impl Read for SkippingReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.buf_at || self.pos >= self.buf_at + self.buf_len as u64 {
            let want = self.buf.len().min(usize::try_from(self.len - self.pos).unwrap_or(usize::MAX));
            if want == 0 {
                return Ok(0);
            }
            let n = self.file.read_at(&mut self.buf[..want], self.base + self.pos)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file ends before the layer's last byte"));
            }
            self.buf_at = self.pos;
            self.buf_len = n;
        }
        let from = (self.pos - self.buf_at) as usize;
        let n = out.len().min(self.buf_len - from);
        out[..n].copy_from_slice(&self.buf[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SkippingReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        match target {
            Some(p) if p <= self.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "an entry's data runs past the end of the layer")),
        }
    }
}

/// Hashes (and spools, for a compressed layer) the uncompressed stream as
/// the tar parser reads it.
struct Tee<'w, R> {
    inner: R,
    hasher: Sha256,
    len: u64,
    spool: Option<&'w mut dyn Write>,
    /// A failed spool write, told apart from a bad layer.
    spool_error: Option<io::Error>,
}

impl<R: Read> Read for Tee<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Indexing and spooling a large layer is the longest host phase
        // of the lower: stop here when the run is (SIGINT, --timeout).
        crate::interrupt::check()?;
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        if let Some(w) = &mut self.spool {
            if let Err(e) = w.write_all(&buf[..n]) {
                self.spool_error = Some(e);
                return Err(io::Error::other("spooling failed"));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pax_times() {
        let table: &[(&str, Option<(u64, u32)>)] = &[
            ("1700000000", Some((1_700_000_000, 0))),
            ("1700000000.999999999", Some((1_700_000_000, 999_999_999))),
            ("5.25", Some((5, 250_000_000))),
            ("5.1234567891", Some((5, 123_456_789))),
            ("-1.5", Some((0, 0))),
            ("12x", None),
            ("1.2.3", None),
            ("", None),
        ];
        for (input, want) in table {
            assert_eq!(pax_time(input.as_bytes()), *want, "{input}");
        }
    }

    #[test]
    fn skipping_reader_reads_seeks_and_refuses_to_run_past_the_end() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let mut r = SkippingReader::new(&f, 100, 150_000);
        let mut got = [0u8; 10];
        r.read_exact(&mut got).unwrap();
        assert_eq!(got[..], data[100..110]);
        // Within the buffer, then far beyond it, then back.
        for at in [5_000u64, 140_000, 20] {
            assert_eq!(r.seek(SeekFrom::Start(at)).unwrap(), at);
            r.read_exact(&mut got).unwrap();
            assert_eq!(got[..], data[100 + at as usize..110 + at as usize], "at {at}");
        }
        assert_eq!(r.seek(SeekFrom::Current(149_970)).unwrap(), 150_000);
        assert_eq!(r.read(&mut got).unwrap(), 0);
        assert!(r.seek(SeekFrom::Current(1)).is_err());
        let mut short = SkippingReader::new(&f, 199_990, 100);
        assert_eq!(short.read_to_end(&mut Vec::new()).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn range_reader_refuses_a_short_file() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"0123456789").unwrap();
        let mut out = Vec::new();
        RangeReader { file: &f, pos: 2, end: 6 }.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"2345");
        let err = RangeReader { file: &f, pos: 8, end: 20 }.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn meta_keeps_last_xattr_drops_unset_and_overlay_ones_and_checks_ids() {
        let raw = |uid: u64, pax: Vec<(&str, &[u8])>| RawMeta {
            mode: Ok(0o104755),
            uid: Ok(uid),
            gid: Ok(7),
            mtime: Ok(99),
            pax: Ok(pax.into_iter().map(|(k, v)| (k.to_string(), v.to_vec())).collect()),
        };
        let m = read_meta(
            raw(
                1000,
                vec![
                    ("SCHILY.xattr.user.b", b"1"),
                    ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
                    ("SCHILY.xattr.security.capability", b"cap"),
                    ("SCHILY.xattr.user.b", b"2"),
                    ("SCHILY.xattr.user.gone", b"x"),
                    ("SCHILY.xattr.user.gone", b""),
                    ("SCHILY.xattr.user.empty", b""),
                    ("mtime", b"123.5"),
                    ("mtime", b""),
                    ("comment", b"ignored"),
                ],
            ),
            "l",
            b"e",
        )
        .unwrap();
        assert_eq!(
            m,
            Meta {
                mode: 0o4755,
                uid: 1000,
                gid: 7,
                mtime: 123,
                mtime_nsec: 500_000_000,
                xattrs: vec![(b"security.capability".to_vec(), b"cap".to_vec()), (b"user.b".to_vec(), b"2".to_vec())],
            }
        );
        let err = read_meta(raw(1 << 33, vec![]), "layer 0 (x)", b"big").unwrap_err().to_string();
        assert_eq!(err, "layer 0 (x): entry \"big\": invalid header field uid");
    }
}
