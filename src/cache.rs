//! The spool cache: compressed layers (and archives compressed as a whole)
//! decompressed once and kept, keyed by the sha256 of the compressed bytes
//! they were made from, so a later run on the same base reads them in
//! place instead of decompressing again.
//!
//! * An entry is written under a private name in the cache directory and
//!   renamed into place only once complete, so nobody ever sees half of
//!   one. Whoever uses an entry checks it again (a layer's diff_id is
//!   hashed while its headers are indexed); a corrupted entry is removed
//!   ([`Entry::discard`]) and made anew.
//! * Concurrent runs: the run making an entry holds an exclusive lock on
//!   `KEY.lock`; another run wanting the same entry waits for it, then
//!   uses what the first one made. A run holds a shared lock on every
//!   entry it uses until it ends.
//! * Bounded: after an entry is added, the least recently used entries
//!   are removed until the total fits the limit; an entry that another
//!   run holds is never removed.
//! * Location: `$RUNASROOT_CACHE`, else `$XDG_CACHE_HOME/runasroot`, else
//!   `$HOME/.cache/runasroot`, created where missing, but never creating
//!   `$XDG_CACHE_HOME` or `$HOME` themselves: inside a Nix build HOME is
//!   `/homeless-shelter`, which must stay absent even for root. When the
//!   place cannot be used, or with `--no-cache`, there is no cache and
//!   decompressed layers go to a temporary file in TMPDIR instead.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::image::Digest;

/// The cache's subdirectory for spooled (decompressed) blobs; the guest
/// kernel's build cache lives beside it (kernel-config/build.sh).
const SPOOL_DIR: &str = "spool";
/// Default size limit of the spool cache.
pub const DEFAULT_LIMIT_MIB: u64 = 10 << 10;
/// Entry file name suffix (an entry is a tar).
const ENTRY_SUFFIX: &str = ".tar";
const LOCK_SUFFIX: &str = ".lock";
const TEMP_PREFIX: &str = ".new-";

/// Why the cache could not be used. None of these fails a run: the run
/// spools to TMPDIR instead and `-v` says why.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("no cache directory: none of $RUNASROOT_CACHE, $XDG_CACHE_HOME, $HOME is set")]
    NoLocation,
    #[error("{0} does not exist (runasroot does not create it)")]
    NoAnchor(PathBuf),
    #[error("cannot use {dir} as the cache directory")]
    Unusable {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("RUNASROOT_CACHE_LIMIT={0:?} is not a number of MiB")]
    BadLimit(String, #[source] std::num::ParseIntError),
}

/// The spool cache (see the module docs).
#[derive(Debug)]
pub struct Cache {
    dir: PathBuf,
    limit_bytes: u64,
}

/// What the environment says about the cache, read once.
#[derive(Debug, Clone, Default)]
pub struct Location {
    pub runasroot_cache: Option<String>,
    pub xdg_cache_home: Option<String>,
    pub home: Option<String>,
    pub limit: Option<String>,
}

impl Location {
    pub fn from_env() -> Location {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        Location {
            runasroot_cache: var("RUNASROOT_CACHE"),
            xdg_cache_home: var("XDG_CACHE_HOME"),
            home: var("HOME"),
            limit: var("RUNASROOT_CACHE_LIMIT"),
        }
    }

    /// The cache root the environment names, most specific first, and
    /// the directory that must already exist for it to be used (none for
    /// `$RUNASROOT_CACHE`, which is created if missing).
    pub fn root(&self) -> Option<(PathBuf, Option<PathBuf>)> {
        if let Some(d) = &self.runasroot_cache {
            return Some((PathBuf::from(d), None));
        }
        if let Some(d) = &self.xdg_cache_home {
            return Some((Path::new(d).join("runasroot"), Some(PathBuf::from(d))));
        }
        self.home.as_ref().map(|h| (Path::new(h).join(".cache").join("runasroot"), Some(PathBuf::from(h))))
    }
}

impl Cache {
    /// Opens (creating it if needed) the cache the environment names.
    pub fn open(location: &Location) -> Result<Cache, CacheError> {
        let limit_mib = match &location.limit {
            Some(v) => v.trim().parse::<u64>().map_err(|e| CacheError::BadLimit(v.clone(), e))?,
            None => DEFAULT_LIMIT_MIB,
        };
        let (root, anchor) = location.root().ok_or(CacheError::NoLocation)?;
        if let Some(anchor) = anchor.filter(|a| !a.is_dir()) {
            return Err(CacheError::NoAnchor(anchor));
        }
        let dir = root.join(SPOOL_DIR);
        let unusable = |source| CacheError::Unusable { dir: dir.clone(), source };
        fs::create_dir_all(&dir).map_err(unusable)?;
        // Writable? (create_dir_all succeeds on an existing read-only dir.)
        tempfile::Builder::new().prefix(TEMP_PREFIX).tempfile_in(&dir).map_err(unusable)?;
        Ok(Cache { dir, limit_bytes: limit_mib.saturating_mul(1 << 20) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, key: &Digest) -> PathBuf {
        self.dir.join(format!("{}{ENTRY_SUFFIX}", key.hex()))
    }

    fn lock_path(&self, key: &Digest) -> PathBuf {
        self.dir.join(format!("{}{LOCK_SUFFIX}", key.hex()))
    }

    /// Recency for eviction is the mtime of the entry's lock file: the
    /// entry itself is never touched once made, so a run can tell that
    /// nobody wrote to it (its ctime and mtime stay as they were).
    fn mark_used(&self, key: &Digest) {
        if let Ok(f) = File::options().create(true).truncate(false).write(true).open(self.lock_path(key)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// The entry for `key`, if there is one, held (shared lock) and marked
    /// as just used.
    pub fn get(&self, key: &Digest) -> io::Result<Option<Entry>> {
        let path = self.entry_path(key);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let file = Flock::lock(file, FlockArg::LockShared).map_err(|(_, e)| io::Error::from(e))?;
        // Evicted between open and lock: the name is gone or is another file.
        match fs::metadata(&path) {
            Ok(m) if m.ino() == file.metadata()?.ino() => {}
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
        self.mark_used(key);
        Ok(Some(Entry { path, file }))
    }

    /// Starts making the entry for `key`. Waits while another run makes
    /// the same entry: then `Made::Existing` is what that run made.
    pub fn make(&self, key: &Digest) -> io::Result<Made> {
        let lock = File::options().create(true).truncate(false).write(true).open(self.lock_path(key))?;
        let lock = lock_exclusive_unless_stopped(lock)?;
        if let Some(entry) = self.get(key)? {
            return Ok(Made::Existing(entry));
        }
        // Registered: a run stopped by the signal backstop leaves no
        // half-written entry in the cache.
        let temp = crate::interrupt::create_temp(
            || tempfile::Builder::new().prefix(TEMP_PREFIX).suffix(ENTRY_SUFFIX).tempfile_in(&self.dir),
            |t| t.path(),
        )?;
        Ok(Made::New(Pending { temp, final_path: self.entry_path(key), lock_path: self.lock_path(key), _lock: lock }))
    }

    /// Removes the least recently used entries until the total fits the
    /// limit, sparing `keep` and every entry someone holds. Best effort:
    /// a cache that cannot be trimmed is no reason to fail a run.
    pub fn evict(&self, keep: &Path) {
        let Ok(list) = fs::read_dir(&self.dir) else { return };
        let mut entries: Vec<(std::time::SystemTime, u64, PathBuf)> = list
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.ends_with(ENTRY_SUFFIX) && !n.starts_with(TEMP_PREFIX)
            })
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                let path = e.path();
                let lock = path.with_extension(&LOCK_SUFFIX[1..]);
                let used = fs::metadata(&lock).and_then(|l| l.modified()).or_else(|_| m.modified()).ok()?;
                Some((used, m.len(), path))
            })
            .collect();
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort();
        for (_, len, path) in entries {
            if total <= self.limit_bytes {
                break;
            }
            if path == keep {
                continue;
            }
            let Ok(f) = File::open(&path) else { continue };
            // Held by a run: skip it. Else remove it while we hold it, so
            // nobody starts using it in between (see `get`).
            if let Ok(_held) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                if fs::remove_file(&path).is_ok() {
                    total -= len;
                    let _ = fs::remove_file(path.with_extension(&LOCK_SUFFIX[1..]));
                }
            }
        }
    }
}

/// A cache entry in use (held with a shared lock until dropped).
#[derive(Debug)]
pub struct Entry {
    pub path: PathBuf,
    pub file: Flock<File>,
}

impl Entry {
    /// Removes a corrupted entry so it is made anew.
    pub fn discard(self) -> io::Result<()> {
        let r = fs::remove_file(&self.path);
        drop(self.file);
        r
    }
}

/// The outcome of [`Cache::make`].
#[derive(Debug)]
pub enum Made {
    /// Another run made it while we waited.
    Existing(Entry),
    /// Ours to write: fill [`Pending::file`], then [`Pending::commit`].
    New(Pending),
}

/// Waits for the exclusive lock on `file` as long as another run holds it
/// (it is making the same entry, which may take minutes), but fails as
/// soon as this run is stopped (SIGINT, SIGTERM, --timeout): a blocking
/// flock would sit out the stop.
fn lock_exclusive_unless_stopped(mut file: File) -> io::Result<Flock<File>> {
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                crate::interrupt::check()?;
                std::thread::sleep(std::time::Duration::from_millis(50));
                file = f;
            }
            Err((_, e)) => return Err(e.into()),
        }
    }
}

/// An entry being written; removed if dropped before [`Pending::commit`].
#[derive(Debug)]
pub struct Pending {
    temp: tempfile::NamedTempFile,
    final_path: PathBuf,
    lock_path: PathBuf,
    _lock: Flock<File>,
}

impl Pending {
    pub fn file(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    /// Where the entry is being written (a private name in the cache dir).
    pub fn path(&self) -> &Path {
        self.temp.path()
    }

    /// Puts the complete entry in place, held by us, and trims the cache.
    pub fn commit(self, cache: &Cache) -> io::Result<Entry> {
        let (file, temp_path) = self.temp.into_parts();
        let file = Flock::lock(file, FlockArg::LockShared).map_err(|(_, e)| io::Error::from(e))?;
        let registered = temp_path.to_path_buf();
        let persisted = temp_path.persist(&self.final_path).map_err(|e| e.error);
        crate::interrupt::unregister_temp(&registered);
        persisted?;
        let _ = File::options().write(true).open(&self.lock_path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        cache.evict(&self.final_path);
        Ok(Entry { path: self.final_path, file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn digest(n: u8) -> Digest {
        Digest::from_sha256(&[n; 32])
    }

    fn cache_in(dir: &Path, limit_mib: u64) -> Cache {
        let loc = Location { runasroot_cache: Some(dir.display().to_string()), limit: Some(limit_mib.to_string()), ..Location::default() };
        Cache::open(&loc).unwrap()
    }

    fn put(cache: &Cache, key: &Digest, bytes: &[u8]) -> Entry {
        match cache.make(key).unwrap() {
            Made::New(mut p) => {
                p.file().write_all(bytes).unwrap();
                p.commit(cache).unwrap()
            }
            Made::Existing(_) => panic!("entry already there"),
        }
    }

    #[test]
    fn location_prefers_the_most_specific_variable() {
        let l = |r: Option<&str>, x: Option<&str>, h: Option<&str>| Location {
            runasroot_cache: r.map(String::from),
            xdg_cache_home: x.map(String::from),
            home: h.map(String::from),
            limit: None,
        };
        let p = PathBuf::from;
        assert_eq!(l(Some("/c"), Some("/x"), Some("/h")).root(), Some((p("/c"), None)));
        assert_eq!(l(None, Some("/x"), Some("/h")).root(), Some((p("/x/runasroot"), Some(p("/x")))));
        assert_eq!(l(None, None, Some("/h")).root(), Some((p("/h/.cache/runasroot"), Some(p("/h")))));
        assert_eq!(l(None, None, None).root(), None);
        assert!(matches!(Cache::open(&l(None, None, None)), Err(CacheError::NoLocation)));
        // A Nix build's HOME is never created, even by root.
        let shelter = std::env::temp_dir().join(format!("rar-homeless-{}", std::process::id()));
        let e = Cache::open(&l(None, None, Some(shelter.to_str().unwrap()))).unwrap_err();
        assert!(matches!(e, CacheError::NoAnchor(_)), "{e}");
        assert!(!shelter.exists());
    }

    #[test]
    fn an_unwritable_location_is_refused_not_fatal() {
        let loc = Location { home: Some("/proc/self".into()), ..Location::default() };
        assert!(matches!(Cache::open(&loc), Err(CacheError::Unusable { .. })));
        let loc = Location { runasroot_cache: Some("/tmp".into()), limit: Some("lots".into()), ..Location::default() };
        assert!(matches!(Cache::open(&loc), Err(CacheError::BadLimit(..))));
    }

    #[test]
    fn entries_are_made_once_then_found() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache_in(dir.path(), 100);
        assert!(cache.get(&digest(1)).unwrap().is_none());
        let e = put(&cache, &digest(1), b"spooled");
        assert_eq!(fs::read(&e.path).unwrap(), b"spooled");
        drop(e);
        let e = cache.get(&digest(1)).unwrap().expect("found");
        assert_eq!(e.path, dir.path().join("spool").join(format!("{}.tar", digest(1).hex())));
        match cache.make(&digest(1)).unwrap() {
            Made::Existing(_) => {}
            Made::New(_) => panic!("made twice"),
        }
        e.discard().unwrap();
        assert!(cache.get(&digest(1)).unwrap().is_none());
    }

    #[test]
    fn an_abandoned_entry_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache_in(dir.path(), 100);
        match cache.make(&digest(2)).unwrap() {
            Made::New(mut p) => p.file().write_all(b"half").unwrap(),
            Made::Existing(_) => unreachable!(),
        }
        let names: Vec<String> = fs::read_dir(cache.dir()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec![format!("{}.lock", digest(2).hex())]);
    }

    #[test]
    fn eviction_removes_the_least_recently_used_unheld_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = cache_in(dir.path(), 2);
        let mib = vec![7u8; 1 << 20];
        let old = put(&cache, &digest(1), &mib);
        let held_path = old.path.clone();
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(put(&cache, &digest(2), &mib));
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Entry 1 is the oldest but held: entry 2 goes instead.
        drop(put(&cache, &digest(3), &mib));
        assert!(held_path.exists());
        assert!(cache.get(&digest(2)).unwrap().is_none());
        assert!(cache.get(&digest(3)).unwrap().is_some());
        drop(old);
        std::thread::sleep(std::time::Duration::from_millis(20));
        drop(put(&cache, &digest(4), &mib));
        // Entry 3 was used (get) after entry 1 was last touched.
        assert!(cache.get(&digest(1)).unwrap().is_none());
        assert!(cache.get(&digest(3)).unwrap().is_some());
        assert!(cache.get(&digest(4)).unwrap().is_some());
    }

    #[test]
    fn a_concurrent_maker_waits_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let cache = std::sync::Arc::new(cache_in(dir.path(), 100));
        let mut first = match cache.make(&digest(5)).unwrap() {
            Made::New(p) => p,
            Made::Existing(_) => unreachable!(),
        };
        let c = cache.clone();
        let waiter = std::thread::spawn(move || match c.make(&digest(5)).unwrap() {
            Made::Existing(e) => fs::read(&e.path).unwrap(),
            Made::New(_) => b"made twice".to_vec(),
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        first.file().write_all(b"once").unwrap();
        drop(first.commit(&cache).unwrap());
        assert_eq!(waiter.join().unwrap(), b"once");
    }
}
