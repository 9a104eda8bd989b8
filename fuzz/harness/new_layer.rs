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

use runasroot::guest_output::{check_payload, payload};
use runasroot::image::Digest;
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
        super::fix_checksums(&mut bytes);
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

/// Reads a passed payload as a client would (`read_as_client`: safe
/// names, parents, links), and checks what a layer promises besides: no
/// overlayfs-private xattr, every mtime the job's epoch (the header's and
/// any PAX record's); returns the entries.
fn read_back(bytes: &[u8], kind: payload::Kind) -> u64 {
    super::read_as_client(bytes, |header, records| {
        for (key, _) in records {
            assert!(!key.starts_with(b"SCHILY.xattr.trusted.overlay."), "an overlayfs-private xattr passed");
        }
        if let payload::Kind::Layer { epoch } = kind {
            assert_eq!(header.mtime().expect("an mtime"), epoch, "an mtime that is not the epoch");
            if let Some((_, mtime)) = records.iter().rev().find(|(k, _)| k == b"mtime") {
                let value = std::str::from_utf8(mtime).ok().and_then(|m| m.parse::<u64>().ok());
                assert_eq!(value, Some(epoch), "a PAX mtime that is not the epoch");
            }
        }
    })
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
