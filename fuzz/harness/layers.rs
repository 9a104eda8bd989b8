//! Layer tars through the layer reader and the merge (`layers::index`,
//! by way of `export::export`, which writes the merged tree as one tar).
//!
//! Input: tame or wild (below), how many layers, then per layer its
//! compression, whether its diff_id is right, and its tar: raw bytes, or
//! entries described by the input (paths, every entry type, hard links to
//! earlier files, PAX records) written with valid headers. A tame input
//! is mostly valid, with an odd entry now and then, so most reach the
//! merge and the writers; a wild one has `..`, whiteouts as directories,
//! odd bytes, raw tars and wrong diff_ids often. All layers go one after
//! another into one file, as in a docker-archive.
//!
//! Checked: no panic; an export either fails or writes a tar that reads
//! back with every name normalised, every directory before its
//! contents, no name twice, every hard link to an earlier non-directory
//! (not a link); the same layers export to the same bytes; nothing is
//! left in the spool directory.

use std::io::Write;
use std::path::Path;

use runasroot::cache::{Cache, Location};
use runasroot::export::{export, ExportError, ExportOptions};
use runasroot::image::{BlobRef, Compression, Digest, FileId, Layer};
use runasroot::layers::Spool;
use sha2::{Digest as _, Sha256};

use super::Input;

/// Path components of wild inputs; index 12 reads raw bytes.
const COMPONENTS: [&[u8]; 12] =
    [b"a", b"b", b"c", b"dir", b".wh.a", b".wh.b", b".wh.dir", b".wh..wh..opq", b"..", b".", b"", b"a\xffb"];
/// Tame inputs: directories and leaves from different names, so most
/// layers merge; whiteouts only last.
const DIRS: [&[u8]; 3] = [b"d1", b"d2", b"d3"];
const LEAVES: [&[u8]; 6] = [b"f1", b"f2", b"f3", b"l1", b".wh.f1", b".wh.d2"];

fn sha(bytes: &[u8]) -> Digest {
    Digest::from_sha256(&Sha256::digest(bytes))
}

/// What the input says, and how wild: a tame input makes mostly valid
/// layers (so the merge, the export and the lower are reached), a wild
/// one anything (so the refusals are).
pub struct Gen<'a, 'b> {
    pub input: &'b mut Input<'a>,
    pub wild: bool,
    /// Paths of files made so far, for hard links to name.
    files: Vec<Vec<u8>>,
}

impl<'a, 'b> Gen<'a, 'b> {
    /// Now and then in a tame input, often in a wild one (never where
    /// the input has run out: zeros are tame).
    fn odd(&mut self) -> bool {
        let n = if self.wild { 4 } else { 64 };
        self.input.below(n) == n - 1
    }

    fn wild_path(&mut self) -> Vec<u8> {
        let input = &mut *self.input;
        let mut out = Vec::new();
        match input.below(8) {
            0 => out.extend_from_slice(b"/"),
            1 => out.extend_from_slice(b"./"),
            _ => {}
        }
        for i in 0..=input.below(4) {
            if i > 0 {
                out.push(b'/');
            }
            match input.below(13) as usize {
                12 => out.extend(input.string(12)),
                c => out.extend_from_slice(COMPONENTS[c]),
            }
        }
        if input.below(6) == 0 {
            out.push(b'/');
        }
        out
    }

    /// A path: under 0 to 2 directories, a directory or a leaf name.
    fn path(&mut self, dir: bool) -> Vec<u8> {
        if self.odd() {
            return self.wild_path();
        }
        let mut out = Vec::new();
        if self.input.below(8) == 0 {
            out.extend_from_slice(b"./");
        }
        for _ in 0..self.input.below(3) {
            out.extend_from_slice(DIRS[self.input.below(3) as usize]);
            out.push(b'/');
        }
        if dir {
            out.extend_from_slice(DIRS[self.input.below(3) as usize]);
            if self.input.bool() {
                out.push(b'/');
            }
        } else {
            out.extend_from_slice(LEAVES[self.input.below(6) as usize]);
        }
        out
    }

    /// One entry, appended to `b`.
    fn entry(&mut self, b: &mut tar::Builder<Vec<u8>>) {
        let (ty, data): (u8, Vec<u8>) = match self.input.below(if self.wild { 12 } else { 9 }) {
            0..=2 => (b'0', self.input.string(700)),
            3 => (b'5', vec![]),
            4 => (b'2', vec![]),
            5 => (b'1', vec![]),
            6 => (b'3', vec![]),
            7 => (b'4', vec![]),
            8 => (b'6', vec![]),
            9 => (0, self.input.string(40)),
            10 => (b'7', self.input.string(40)),
            _ => (self.input.u8(), self.input.string(40)),
        };
        let name = self.path(ty == b'5');
        let link = match ty {
            b'1' if !self.files.is_empty() && !self.odd() => self.files[self.input.below(self.files.len() as u64) as usize].clone(),
            b'1' | b'2' => self.path(false),
            _ if self.odd() => self.path(false),
            _ => vec![],
        };
        if ty == b'0' {
            self.files.push(name.clone());
        }
        let mut h = if self.input.bool() { tar::Header::new_ustar() } else { tar::Header::new_gnu() };
        h.as_mut_bytes()[156] = ty;
        let mode = u32::from(self.input.u16());
        h.set_mode(if self.odd() { mode } else { mode & 0o7777 });
        let uid = if self.odd() { self.input.u64() } else { self.input.below(70000) };
        h.set_uid(uid.min(0o7777777));
        h.set_gid(self.input.below(3));
        h.set_mtime(self.input.below(2_000_000_000));
        if matches!(ty, b'3' | b'4') {
            let (major, minor) = if self.odd() { (self.input.below(4200) as u32, self.input.u32()) } else { (1 + self.input.below(300) as u32, self.input.below(1 << 20) as u32) };
            let _ = h.set_device_major(major);
            let _ = h.set_device_minor(minor);
        }
        h.set_size(data.len() as u64);
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if name.len() > 100 || name.contains(&0) || self.input.below(8) == 0 {
            pax.push(("path".into(), name.clone()));
        } else {
            h.as_old_mut().name[..name.len()].copy_from_slice(&name);
        }
        if link.len() > 100 || self.input.below(16) == 0 {
            pax.push(("linkpath".into(), link.clone()));
        } else {
            h.as_old_mut().linkname[..link.len()].copy_from_slice(&link);
        }
        if uid > 0o7777777 {
            pax.push(("uid".into(), uid.to_string().into_bytes()));
        }
        for _ in 0..self.input.below(4) {
            let wild = self.odd();
            let input = &mut *self.input;
            match (input.below(6), wild) {
                (0, _) => pax.push(("SCHILY.xattr.user.x".into(), input.string(20))),
                (1, _) => pax.push(("SCHILY.xattr.trusted.overlay.opaque".into(), b"y".to_vec())),
                (2, _) => pax.push(("SCHILY.xattr.security.capability".into(), input.string(30))),
                (3, false) => pax.push(("mtime".into(), format!("{}.{}", input.below(2_000_000_000), input.below(1000)).into_bytes())),
                (3, true) => pax.push(("mtime".into(), input.string(24))),
                (4, true) => pax.push((String::from_utf8_lossy(&input.string(16)).into_owned(), input.string(16))),
                (_, true) => pax.push(("SCHILY.xattr.".into(), vec![])),
                (_, false) => pax.push(("SCHILY.xattr.user.y".into(), input.string(8))),
            }
        }
        h.set_cksum();
        if !pax.is_empty() {
            let _ = b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
        }
        let _ = b.append(&h, &data[..]);
    }

    fn layer_tar(&mut self) -> Vec<u8> {
        if self.odd() {
            return self.input.string(4096);
        }
        let mut b = tar::Builder::new(Vec::new());
        for _ in 0..self.input.below(24) {
            self.entry(&mut b);
        }
        b.into_inner().expect("writing to memory")
    }
}

fn compress(tar: &[u8], c: Compression) -> Vec<u8> {
    match c {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(tar).expect("writing to memory");
            e.finish().expect("writing to memory")
        }
        Compression::Zstd => zstd::encode_all(tar, 1).expect("writing to memory"),
    }
}

/// The layers the input describes, stored one after another in
/// `dir/archive`, each on a 512-byte boundary after a first block, as
/// the members of a docker-archive are (the lower image points at file
/// data where they lie, so it needs that alignment).
pub fn build_layers(input: &mut Input, dir: &Path) -> Vec<Layer> {
    let wild = input.below(4) == 3;
    let mut gen = Gen { input, wild, files: Vec::new() };
    let path = dir.join("archive");
    let mut all = vec![b'h'; 512];
    let mut layers = Vec::new();
    for index in 0..=gen.input.below(4) as usize {
        let compression = [Compression::None, Compression::None, Compression::Gzip, Compression::Zstd][gen.input.below(4) as usize];
        let right_diff_id = !gen.odd();
        let tar = gen.layer_tar();
        let stored = compress(&tar, compression);
        let diff_id = if right_diff_id { sha(&tar) } else { sha(b"something else") };
        layers.push(Layer {
            index,
            blob: BlobRef { file: path.clone(), offset: all.len() as u64, length: stored.len() as u64 },
            blob_digest: sha(&stored),
            diff_id,
            compression,
            name: format!("l{index}/layer.tar"),
            stored_identity: FileId { dev: 0, ino: 0, size: 0, mtime_ns: 0, ctime_ns: 0 },
        });
        all.extend_from_slice(&stored);
        all.resize(all.len().next_multiple_of(512), 0);
    }
    std::fs::write(&path, all).expect("writing the test archive");
    let identity = FileId::of_path(&path).expect("stat of the test archive");
    layers.iter_mut().for_each(|l| l.stored_identity = identity.clone());
    layers
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let use_cache = input.below(4) == 0;
    let dir = super::temp_dir();
    let layers = build_layers(&mut input, dir.path());
    let spool_dir = dir.path().join("spool");
    std::fs::create_dir(&spool_dir).expect("a spool directory");
    let cache = use_cache.then(|| {
        let location = Location { runasroot_cache: Some(dir.path().join("cache").display().to_string()), ..Location::default() };
        Cache::open(&location).expect("a cache in a temporary directory")
    });
    let spool = Spool { cache: cache.as_ref(), temp_dir: &spool_dir };
    let first = export_to_vec(&layers, spool);
    assert_eq!(std::fs::read_dir(&spool_dir).expect("the spool directory").count(), 0, "spool files left behind");
    let Ok(tar) = first else { return };
    check_export(&tar);
    // Again, now from the cache where there is one: the same bytes.
    let again = export_to_vec(&layers, spool).expect("the same layers export again");
    assert!(again == tar, "the same layers exported to different bytes");
}

pub fn export_to_vec(layers: &[Layer], spool: Spool<'_>) -> Result<Vec<u8>, ExportError> {
    let mut out = Vec::new();
    let opts = ExportOptions { clamp_mtime: None, spool };
    match export(layers, &opts, &mut out) {
        Ok(stats) => {
            assert_eq!(stats.tar_bytes, out.len() as u64, "the export's byte count");
            Ok(out)
        }
        Err(e) => {
            // Every error can be shown.
            assert!(!e.to_string().is_empty());
            Err(e)
        }
    }
}

/// What an export must look like, whatever the layers were.
pub fn check_export(tar: &[u8]) {
    super::read_as_client(tar, |_, _| {});
}
