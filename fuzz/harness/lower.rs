//! Layer tars (as [`super::layers`] builds them) through `lower::build`:
//! the EROFS image the guest mounts, with the layers' bytes behind it as
//! its extra devices. The guest's disk is read back as the built-in VMM
//! would serve it (`Lower::disk`, a concatenation of files), decoded, and
//! compared path by path with the host export of the same layers: both
//! are the one merge, so they must show the same files, metadata, bytes
//! and hard-link groups.
//!
//! The lower may refuse what the export writes only where EROFS or Linux
//! cannot hold it (`LowerError::Erofs`: a symlink target or xattr too
//! long, a device number past Linux's dev_t).

use std::collections::BTreeMap;

use runasroot::erofs::check::Shows;
use runasroot::erofs::decode::{self, Devices, NodeKind};
use runasroot::export::ExportError;
use runasroot::layers::{Spool, TarGuard};
use runasroot::lower::{self, CopySpec, LowerError};
use runasroot::machine::backend::Backend;

use super::layers::{build_layers, export_to_vec};
use super::Input;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    shows: Shows,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// For files: the least path of its inode (its hard-link group).
    group: Option<Vec<u8>>,
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let dir = super::temp_dir();
    let layers = build_layers(&mut input, dir.path());
    let spool_dir = dir.path().join("spool");
    let work = dir.path().join("work");
    std::fs::create_dir(&spool_dir).expect("a spool directory");
    std::fs::create_dir(&work).expect("a work directory");
    let spool = Spool { cache: None, temp_dir: &spool_dir };
    let exported = export_to_vec(&layers, spool);
    let no_copy = CopySpec { items: &[], store_paths: &[], copy_dirlinks: false };
    let built = lower::build(&layers, no_copy, 0, spool, &work);
    let (tar, lower) = match (exported, built) {
        (Ok(tar), Ok(lower)) => (tar, lower),
        (Err(_), Err(_)) => return,
        (Ok(_), Err(LowerError::Erofs(_))) => return,
        (Ok(_), Err(e)) => panic!("the export succeeded but the lower failed: {e}"),
        (Err(ExportError::ReadData { .. }), Ok(_)) => return,
        (Err(e), Ok(_)) => panic!("the lower succeeded but the export failed: {e}"),
    };
    let disk = lower.disk();
    let backend = Backend::open(&disk.backing, true).expect("the lower disk opens");
    let len = backend.size().expect("the lower disk has a size");
    let mut bytes = vec![0u8; usize::try_from(len).expect("a small disk")];
    backend.read_exact_at(&mut bytes, 0).expect("the lower disk reads");
    let image = decode::decode(&bytes).unwrap_or_else(|e| panic!("the lower image does not decode: {e}"));
    let from_image = image_view(&image);
    let from_export = export_view(&tar);
    if from_image != from_export {
        for (path, want) in &from_export {
            assert_eq!(from_image.get(path), Some(want), "{:?} differs (left: lower, right: export)", String::from_utf8_lossy(path));
        }
        let extra: Vec<_> = from_image.keys().filter(|p| !from_export.contains_key(*p)).collect();
        panic!("the lower has paths the export lacks: {extra:?}");
    }
    drop(lower);
    assert_eq!(std::fs::read_dir(&spool_dir).expect("the spool directory").count(), 0, "spool files left behind");
}

/// The merged base as the image shows it, under `/base`.
fn image_view(image: &decode::Image) -> BTreeMap<Vec<u8>, Seen> {
    let mut paths = image.paths();
    paths.sort();
    let mut first: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (path, nid) in paths {
        let Some(rel) = path.strip_prefix(b"/base/") else { continue };
        let node = &image.inodes[&nid];
        let group = first.entry(nid).or_insert_with(|| rel.to_vec()).clone();
        let shows = match &node.kind {
            NodeKind::Dir { .. } => Shows::Dir,
            NodeKind::File { .. } => {
                Shows::File(image.read(nid, Devices::Flat).unwrap_or_else(|e| panic!("reading {path:?}: {e}")))
            }
            NodeKind::Symlink { target, .. } => Shows::Symlink(target.clone()),
            NodeKind::Char { major, minor } => Shows::Char(*major, *minor),
            NodeKind::Block { major, minor } => Shows::Block(*major, *minor),
            NodeKind::Fifo => Shows::Fifo,
        };
        let mut xattrs = node.meta.xattrs.clone();
        xattrs.sort();
        let group = matches!(shows, Shows::File(_)).then_some(group);
        let seen = Seen {
            shows,
            mode: node.meta.mode,
            uid: node.meta.uid.into(),
            gid: node.meta.gid.into(),
            mtime: node.meta.mtime,
            xattrs,
            group,
        };
        out.insert(rel.to_vec(), seen);
    }
    least_names(&mut out);
    out
}

/// The export tar, as the same view.
fn export_view(tar: &[u8]) -> BTreeMap<Vec<u8>, Seen> {
    let mut out: BTreeMap<Vec<u8>, Seen> = BTreeMap::new();
    // The guard keeps each entry's PAX records raw: read them by their
    // lengths (values may hold newlines, which the crate's parser cannot).
    let guard = TarGuard::new(tar);
    let last = guard.last_entry();
    let mut archive = tar::Archive::new(guard);
    for entry in archive.entries().expect("the export is a tar") {
        let mut e = entry.expect("export entries read");
        let kept = last.take().expect("the guard saw the entry");
        let records = kept.pax.as_deref().map(super::pax_records).unwrap_or_default();
        let record = |key: &[u8]| records.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let raw = record(b"path").unwrap_or_else(|| e.path_bytes().into_owned());
        let name = raw.strip_suffix(b"/").unwrap_or(&raw).to_vec();
        let h = kept.header.clone();
        let mut mtime = h.mtime().expect("an mtime");
        let mut xattrs = Vec::new();
        for (key, value) in &records {
            if key == b"mtime" {
                mtime = std::str::from_utf8(value).expect("a PAX mtime").parse().expect("whole seconds");
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                xattrs.push((name.to_vec(), value.clone()));
            }
        }
        xattrs.sort();
        let device = || (h.device_major().unwrap().unwrap(), h.device_minor().unwrap().unwrap());
        let mut group = None;
        let shows = match h.entry_type() {
            tar::EntryType::Directory => Shows::Dir,
            tar::EntryType::Regular => {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).expect("file data");
                group = Some(name.clone());
                Shows::File(data)
            }
            tar::EntryType::Link => {
                let target = record(b"linkpath").unwrap_or_else(|| e.link_name_bytes().expect("a link target").into_owned());
                let first = out.get(&target).cloned().expect("a hard link to an earlier file");
                out.insert(name, first);
                continue;
            }
            tar::EntryType::Symlink => {
                Shows::Symlink(record(b"linkpath").unwrap_or_else(|| e.link_name_bytes().expect("a symlink target").into_owned()))
            }
            tar::EntryType::Char => Shows::Char(device().0, device().1),
            tar::EntryType::Block => Shows::Block(device().0, device().1),
            tar::EntryType::Fifo => Shows::Fifo,
            other => panic!("the export wrote a {other:?} entry"),
        };
        let seen = Seen {
            shows,
            mode: h.mode().expect("a mode"),
            uid: record(b"uid").map_or_else(|| h.uid().expect("a uid"), |v| String::from_utf8(v).unwrap().parse().unwrap()),
            gid: record(b"gid").map_or_else(|| h.gid().expect("a gid"), |v| String::from_utf8(v).unwrap().parse().unwrap()),
            mtime,
            xattrs,
            group,
        };
        out.insert(name, seen);
    }
    least_names(&mut out);
    out
}

/// Names each hard-link group by its least path.
fn least_names(view: &mut BTreeMap<Vec<u8>, Seen>) {
    let mut least: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for (path, seen) in view.iter() {
        if let Some(g) = &seen.group {
            let l = least.entry(g.clone()).or_insert_with(|| path.clone());
            if path < l {
                *l = path.clone();
            }
        }
    }
    for seen in view.values_mut() {
        if let Some(g) = &mut seen.group {
            *g = least[g].clone();
        }
    }
}
