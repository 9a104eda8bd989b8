//! One merge of the base's layers, for every consumer.
//!
//! Each layer's tar is read once ([`read`]: headers indexed, the
//! uncompressed stream hashed against its diff_id, compressed layers
//! spooled to the cache), layers in parallel, and the layers are merged
//! bottom first, in order, by the overlay rules of [`tree`]. Two writers
//! consume the result: `export` (one tar of the merged tree) and `lower`
//! (the EROFS image the guest mounts as its read-only base). OCI layer
//! semantics (tar decoding, whiteouts, opaque dirs, hard links, the
//! merge) live here and nowhere else.
//!
//! Memory grows with the number of entries, never with file sizes: a tree
//! holds paths, metadata and data offsets, never data.

pub mod guard;
pub(crate) mod pax;
pub(crate) mod read;
pub(crate) mod tree;

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;

pub use guard::{TarGuard, MAX_EXTENSION_BYTES};
pub use read::{Origin, Spool};
pub(crate) use read::Source;
pub(crate) use tree::Merged;

use crate::image::{Digest, FileId, Layer};
use crate::spool::{human, Full};

/// At most this many layers are read at once: reading is CPU-bound
/// (hashing, decompressing) and each reader holds a few buffers.
const MAX_READERS: usize = 8;

/// Most bytes of metadata the merge may hold, over all the layers of an
/// image: the trees keep every entry's name, link target and xattrs, and
/// a small structure per entry ([`ENTRY_COST`]), while a layer can list
/// entries without end (a gzip layer of 4 MiB holds millions). A base of
/// a million files takes ~200 MiB of it; a run's peak memory is about
/// twice what it holds (the lower image's tree and layout come on top).
pub const MAX_METADATA_BYTES: u64 = 1 << 30;
/// What one entry costs the merge besides its bytes: its place in its
/// directory's map, its inode and metadata (measured: ~160 bytes an entry
/// over a million entries, names aside).
pub const ENTRY_COST: u64 = 200;

/// Why reading or merging the layers failed. `layer` reads like
/// `layer 2 (blobs/sha256/…)`.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot open {layer} at {path}")]
    OpenLayer {
        layer: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {layer}: its bytes are truncated, corrupt or not a tar (of the compression detected)")]
    ReadLayer {
        layer: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot spool the decompressed {layer} to {dir}: \
         point TMPDIR (or RUNASROOT_CACHE) at a writable directory with room for the uncompressed layer"
    )]
    Spool {
        layer: String,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{layer} decompresses to more than {}, and {} has {} free (runasroot leaves {} of it to the rest of the system): \
         free space there, or point TMPDIR (RUNASROOT_CACHE for the cache) at a filesystem with room for the uncompressed layer",
        human(.full.written), .full.dir.display(), human(.full.space.available), human(.full.space.keep())
    )]
    SpoolFull { layer: String, full: Full },
    #[error("cannot use the cache {dir} for {layer} (fix: free space there, set RUNASROOT_CACHE, or pass --no-cache)")]
    Cache {
        layer: String,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the cache entry for {layer} in {dir}, just made by another run, does not match the layer (remove {dir} and run again)")]
    CacheCorrupt { layer: String, dir: PathBuf },
    #[error("{layer} is corrupt: its uncompressed tar has digest {found}, the image config says {expected}")]
    DiffIdMismatch { layer: String, expected: Digest, found: Digest },
    #[error("{layer}: entry {entry:?}: {reason}")]
    BadPath { layer: String, entry: String, reason: &'static str },
    #[error("{layer}: entry {entry:?}: invalid header field {field}")]
    BadHeader {
        layer: String,
        entry: String,
        field: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{layer}: entry {entry:?}: {what} entries are not supported in an image layer")]
    UnsupportedEntry { layer: String, entry: String, what: String },
    #[error("{layer}: entry {entry:?}: invalid whiteout name")]
    InvalidWhiteout {
        layer: String,
        entry: String,
        #[source]
        source: runasroot_guest::whiteout::WhiteoutError,
    },
    #[error(
        "{layer}: entry {entry}: its parent {parent} is not a directory in this layer \
         (refusing to write through a symlink or a file)"
    )]
    ParentNotDirectory { layer: String, entry: String, parent: String },
    #[error(
        "{layer}: entry {entry} writes into {path}, which is a symlink or a file in the layers below \
         (refusing to follow it: the layer must replace {path} with a directory entry first)"
    )]
    WritesIntoNonDirectory { layer: String, entry: String, path: String },
    #[error("{layer}: hard link {entry} -> {target}: the target is a directory")]
    HardlinkToDirectory { layer: String, entry: String, target: String },
    #[error("{layer}: hard link {entry} -> {target}: no regular file at that path in this layer or the layers below")]
    HardlinkTargetMissing { layer: String, entry: String, target: String },
    #[error("{layer} changed on disk while runasroot used it ({path}); nothing was written (run again on a file nothing writes to)")]
    Changed { layer: String, path: PathBuf },
    #[error(
        "{layer}: at entry {entry:?}, the layers' entries need more than the {limit} bytes of memory runasroot \
         gives the merge (names, link targets and xattrs of every entry): refusing the image"
    )]
    TooMuchMetadata { layer: String, entry: String, limit: u64 },
}

/// What the readers of one merge share: a flag that stops them when one
/// fails, and the memory budget of [`MAX_METADATA_BYTES`].
#[derive(Debug)]
pub(crate) struct Shared {
    pub stop: AtomicBool,
    pub budget: Budget,
}

impl Shared {
    pub fn new(limit: u64) -> Shared {
        Shared { stop: AtomicBool::new(false), budget: Budget { used: AtomicU64::new(0), limit } }
    }
}

/// Bytes of metadata held so far, against a limit.
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicU64,
    pub limit: u64,
}

impl Budget {
    /// Counts `bytes` more; false once the total passes the limit.
    pub fn charge(&self, bytes: u64) -> bool {
        self.used.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes) <= self.limit
    }
}

/// How a layer is named in errors.
pub(crate) fn label(layer: &Layer) -> String {
    format!("layer {} ({})", layer.index, layer.name)
}

/// The layers read and merged.
#[derive(Debug)]
pub(crate) struct Indexed {
    pub merged: Merged,
    /// Where each layer's uncompressed tar is, by position in the layers.
    pub sources: Vec<Source>,
    pub stats: IndexStats,
}

/// What indexing did, for `-v` and the benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IndexStats {
    pub layers: usize,
    /// Hard links whose target was in a lower layer (copies, not links).
    pub materialised_links: u64,
    /// Decompressed bytes written this run (cache or temporary files).
    pub spooled_bytes: u64,
    /// Compressed layers found in the cache (and checked again).
    pub cache_hits: usize,
    /// Cache entries that did not check out and were made anew.
    pub cache_rebuilt: usize,
}

/// Reads the layers in parallel and merges them in order as they arrive,
/// so the first error in layer order is the one reported, whatever the
/// timing.
pub(crate) fn index(layers: &[Layer], spool: Spool<'_>) -> Result<Indexed, LayerError> {
    index_within(layers, spool, MAX_METADATA_BYTES)
}

/// [`index`] with the merge's memory budget given.
pub(crate) fn index_within(layers: &[Layer], spool: Spool<'_>, budget: u64) -> Result<Indexed, LayerError> {
    let readers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_READERS).min(layers.len());
    let next = AtomicUsize::new(0);
    let shared = Shared::new(budget);
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::channel();
        let workers: Vec<_> = (0..readers)
            .map(|_| {
                let tx = tx.clone();
                let (next, shared) = (&next, &shared);
                s.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= layers.len() || shared.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let r = read::read_layer(&layers[i], i as u32, spool, shared);
                    if tx.send((i, r)).is_err() {
                        break;
                    }
                })
            })
            .collect();
        drop(tx);
        let merged = merge_in_order(layers, rx);
        if merged.is_err() {
            shared.stop.store(true, Ordering::Relaxed);
        }
        join_all(workers);
        merged
    })
}

/// Joins scoped threads for real: the end of `thread::scope` only waits
/// until each closure has returned, while the thread itself may still be
/// exiting (running its thread-local destructors) when the caller goes on.
/// A worker's panic goes on in the caller, as the scope's would.
pub(crate) fn join_all(workers: Vec<std::thread::ScopedJoinHandle<'_, ()>>) {
    for worker in workers {
        if let Err(panic) = worker.join() {
            std::panic::resume_unwind(panic);
        }
    }
}

fn merge_in_order(
    layers: &[Layer],
    rx: mpsc::Receiver<(usize, Result<read::ReadLayer, LayerError>)>,
) -> Result<Indexed, LayerError> {
    let mut indexed = Indexed {
        merged: Merged::new(),
        sources: Vec::with_capacity(layers.len()),
        stats: IndexStats { layers: layers.len(), ..IndexStats::default() },
    };
    let mut pending = BTreeMap::new();
    for (i, r) in rx {
        pending.insert(i, r);
        while let Some(r) = pending.remove(&indexed.sources.len()) {
            let layer = r?;
            let i = indexed.sources.len();
            indexed.stats.materialised_links += indexed.merged.apply(layer.tree, &label(&layers[i]))?;
            indexed.stats.spooled_bytes += layer.spooled_bytes;
            match layer.source.origin {
                Origin::CacheHit => indexed.stats.cache_hits += 1,
                Origin::CacheNew { rebuilt: true } => indexed.stats.cache_rebuilt += 1,
                _ => {}
            }
            indexed.sources.push(layer.source);
        }
    }
    // Every reader sent its layer or stopped because of an error above.
    assert_eq!(indexed.sources.len(), layers.len(), "a layer reader stopped without a result");
    Ok(indexed)
}

impl Indexed {
    /// Fails if a file the layers were read from changed since its bytes
    /// were verified (replaced, or written in place): whatever read it
    /// after that (the guest) may have seen other bytes.
    pub fn check_unchanged(&self) -> Result<(), LayerError> {
        let mut seen: Vec<&std::path::Path> = Vec::new();
        for s in &self.sources {
            if seen.contains(&s.path.as_path()) {
                continue;
            }
            seen.push(&s.path);
            let now_by_name = FileId::of_path(&s.path).ok();
            let now_open = FileId::of(&s.file).ok();
            if now_by_name.as_ref() != Some(&s.identity) || now_open.as_ref() != Some(&s.identity) {
                return Err(LayerError::Changed { layer: s.label.clone(), path: s.path.clone() });
            }
        }
        Ok(())
    }
}
