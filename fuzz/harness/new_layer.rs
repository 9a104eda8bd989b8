//! The host's validator of what the guest writes back
//! (`guest_output::payload::check`, and `check_payload` around it): the
//! guest runs a root script on a kernel that script can attack, so every
//! byte here is hostile.
//!
//! Checked: no panic; the validator reads at most the announced length;
//! its message names no raw control byte (the renderer's rule: input bytes
//! are escaped); and a payload it passes is one a real reader takes as
//! the safe tar it claims to be: the `tar` crate reads the same number of
//! entries, every name relative with no `.`, `..` or empty component, no
//! entry under a symlink or a non-directory of the same tar, a link that
//! names an earlier entry, and in a layer every mtime the job's epoch
//! (the header's and any PAX record's);
//! the digest is the sha256 of the announced bytes.
//!
//! Input: a mode byte (layer or export; the announced length equal to the
//! bytes, shorter or longer; header checksums fixed up so the fuzzer
//! reaches past them), then the payload.

use std::collections::{HashMap, HashSet};

use runasroot::guest_output::{check_payload, payload};
use runasroot::image::Digest;
use runasroot::layers::TarGuard;
use sha2::{Digest as _, Sha256};

use super::Input;

/// The epoch the layer seeds were written with.
const EPOCH: u64 = 1_700_000_000;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let kind = if mode & 1 == 0 { payload::Kind::Layer { epoch: EPOCH } } else { payload::Kind::Export };
    let mut bytes = input.rest().to_vec();
    if mode & 0x10 != 0 {
        fix_checksums(&mut bytes);
    }
    let announced = match (mode >> 1) & 7 {
        0..=4 => bytes.len() as u64,
        5 => (bytes.len() as u64).saturating_sub(512),
        6 => bytes.len() as u64 + 512,
        _ => u64::MAX,
    };
    let mut reader = &bytes[..];
    let result = payload::check(&mut reader, announced, kind);
    let read = bytes.len() - reader.len();
    assert!(read as u64 <= announced, "the validator read {read} bytes of {announced} announced");
    let checked = match result {
        Err(e) => {
            let message = e.to_string();
            assert!(!message.chars().any(|c| c.is_control()), "raw control bytes in the message: {message:?}");
            return;
        }
        Ok(checked) => checked,
    };
    // Passed: the announced bytes were there, and they alone are the tar
    // (a shorter announcement over a longer disk reads what it announces).
    let bytes = match usize::try_from(announced).ok().and_then(|n| bytes.get(..n)) {
        Some(announced_bytes) => announced_bytes,
        None => panic!("a payload of {} bytes passed for {announced} announced", bytes.len()),
    };
    assert_eq!(read, bytes.len());
    let digest = Digest::from_sha256(&Sha256::digest(bytes));
    assert_eq!(checked.digest, digest);
    // The same through check_payload, and a wrong digest refused.
    assert_eq!(check_payload(bytes, announced, &digest, kind).expect("the same payload passes"), checked);
    let other = Digest::from_sha256(&Sha256::digest(b"other"));
    assert!(check_payload(bytes, announced, &other, kind).is_err(), "a payload passed under a digest not its own");
    assert_eq!(read_back(bytes, kind), checked.entries, "the tar crate reads another number of entries");
}

/// Every block whose typeflag byte is printable is made a valid header.
fn fix_checksums(bytes: &mut [u8]) {
    for block in bytes.chunks_mut(512).filter(|b| b.len() == 512 && b[156].is_ascii_graphic()) {
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }
}

/// Reads a passed payload with the `tar` crate, as a client would, and
/// checks what the validator promises; returns the entries. PAX records
/// are read by their length, as Go's archive/tar reads them (a binary
/// xattr value may hold a newline, which the crate's own parser splits
/// at): the tar guard keeps them raw.
fn read_back(bytes: &[u8], kind: payload::Kind) -> u64 {
    let guard = TarGuard::new(bytes);
    let last = guard.last_entry();
    let mut archive = tar::Archive::new(guard);
    let mut kinds: HashMap<Vec<u8>, tar::EntryType> = HashMap::new();
    let mut seen = HashSet::new();
    let mut count = 0;
    for entry in archive.entries().expect("a passed payload reads as a tar") {
        let entry = entry.expect("each entry of a passed payload reads");
        let kept = last.take().expect("the guard saw the entry");
        let records = kept.pax.as_deref().map(super::pax_records).unwrap_or_default();
        let record = |key: &[u8]| records.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        for (key, _) in &records {
            assert!(!key.starts_with(b"SCHILY.xattr.trusted.overlay."), "an overlayfs-private xattr passed");
        }
        let header = entry.header();
        let path = record(b"path").unwrap_or_else(|| entry.path_bytes().into_owned());
        let kind_of = header.entry_type();
        let name = path.strip_suffix(b"/").unwrap_or(&path).to_vec();
        assert!(!name.is_empty() && !name.starts_with(b"/"), "name {:?}", String::from_utf8_lossy(&path));
        let parts: Vec<&[u8]> = name.split(|&b| b == b'/').collect();
        assert!(parts.iter().all(|p| !p.is_empty() && *p != b"." && *p != b".."), "name {:?}", String::from_utf8_lossy(&path));
        assert!(seen.insert(name.clone()), "{:?} twice", String::from_utf8_lossy(&name));
        for depth in 1..parts.len() {
            let parent = parts[..depth].join(&b'/');
            assert_eq!(kinds.get(&parent), Some(&tar::EntryType::Directory), "{:?} is not under a directory of the tar", String::from_utf8_lossy(&name));
        }
        if kind_of == tar::EntryType::Link {
            let target = record(b"linkpath")
                .or_else(|| entry.link_name_bytes().map(|l| l.into_owned()))
                .expect("a hard link names its target");
            assert!(kinds.get(&target).is_some_and(|k| *k != tar::EntryType::Directory), "hard link {:?} to no earlier entry", String::from_utf8_lossy(&name));
        }
        if let payload::Kind::Layer { epoch } = kind {
            assert_eq!(header.mtime().expect("an mtime"), epoch, "an mtime that is not the epoch");
            if let Some(mtime) = record(b"mtime") {
                let value = std::str::from_utf8(&mtime).ok().and_then(|m| m.parse::<u64>().ok());
                assert_eq!(value, Some(epoch), "a PAX mtime that is not the epoch");
            }
        }
        kinds.insert(name, kind_of);
        count += 1;
    }
    count
}

/// Starting inputs: what the guest's own packer writes, as a layer
/// (whiteouts, an opaque directory) and as an export.
pub fn seeds() -> Vec<Vec<u8>> {
    use runasroot_guest::tarfmt::{Entry, Kind as TKind, TarWriter};
    let entry = |path: &str, kind: TKind| Entry { path: path.as_bytes().to_vec(), kind, mode: 0o755, uid: 0, gid: 0, mtime: EPOCH, xattrs: vec![] };
    let mut cap = entry("data/cap", TKind::File { size: 3 });
    cap.xattrs = vec![(b"security.capability".to_vec(), vec![1, 0, 0, 2]), (b"user.x".to_vec(), b"v".to_vec())];
    let long = format!("data/{}", "long-name-".repeat(12));
    let entries: Vec<(Entry, &[u8])> = vec![
        (entry(".wh.gone", TKind::File { size: 0 }), b""),
        (entry("data", TKind::Dir), b""),
        (entry("data/.wh..wh..opq", TKind::File { size: 0 }), b""),
        (entry("data/.wh.old", TKind::File { size: 0 }), b""),
        (entry("data/bin", TKind::Dir), b""),
        (entry("data/bin/sh", TKind::Symlink { target: b"/bin/busybox".to_vec() }), b""),
        (cap, b"abc"),
        (entry("data/dev", TKind::Char { major: 1, minor: 3 }), b""),
        (entry("data/fifo", TKind::Fifo), b""),
        (entry("data/link", TKind::Hardlink { target: b"data/cap".to_vec() }), b""),
        (entry(&long, TKind::File { size: 700 }), &[7u8; 700]),
        (entry("etc", TKind::Dir), b""),
        (entry("etc/passwd", TKind::File { size: 5 }), b"root\n"),
    ];
    let write = |keep: &dyn Fn(&Entry) -> bool| {
        let mut w = TarWriter::new(Vec::new());
        for (e, data) in entries.iter().filter(|(e, _)| keep(e)) {
            w.append(e, &mut &data[..]).unwrap();
        }
        w.finish().unwrap()
    };
    let layer = write(&|_| true);
    let export = write(&|e| !e.path.split(|&b| b == b'/').any(|c| c.starts_with(b".wh.")));
    let empty = vec![0u8; 1024];
    vec![[vec![0x00], layer.clone()].concat(), [vec![0x01], export].concat(), [vec![0x10], layer].concat(), [vec![0x00], empty].concat()]
}
