//! What each fuzz target does with its input, shared by the targets
//! (`fuzz/fuzz_targets/*.rs`, run by `cargo fuzz`) and by the ordinary
//! test `tests/fuzz_regressions.rs`, which runs every saved input
//! (`fuzz/seeds/TARGET/`, `fuzz/regressions/TARGET/`) through the same
//! function. A target returns normally for any input the product handles
//! (an error is a fine answer to a hostile input); it panics where the
//! product crashed or broke a property the target checks.
//!
//! Targets, and where they feed their input:
//! * [`image`]: an image archive (raw bytes, or members built into a
//!   tar, optionally gzipped whole, or a layout directory) through
//!   `image::open`, then the layers it names through the export;
//! * [`layers`]: layer tars through the layer reader and merge
//!   (`export::export`): the tar it writes is well formed and the same
//!   every time, nothing is left in the spool directory;
//! * [`lower`]: the same layers through `lower::build`, the EROFS image
//!   decoded back and compared with the export, path by path;
//! * [`erofs`]: arbitrary trees through `erofs::write`, decoded back
//!   and compared with the tree (`erofs::check`);
//! * [`contract`]: the guest's result header and the job header decoders;
//! * [`new_layer`]: the host's validator of the tar the guest writes back
//!   (`guest_output`), its verdicts checked against the `tar` crate;
//! * [`virtio_blk`]: MMIO register writes and guest memory (rings,
//!   descriptor chains, requests) through the virtio-mmio transport into
//!   the virtio-blk device;
//! * [`nbd`]: a client's byte stream through the NBD server, its replies
//!   checked against a model of the protocol;
//! * [`tar_guard`]: arbitrary tars through the `tar` crate with and
//!   without `layers::TarGuard`: the same entries unless the guard
//!   refused a header over its bound.

#![allow(clippy::undocumented_unsafe_blocks)]

pub mod contract;
pub mod erofs;
pub mod image;
pub mod layers;
pub mod lower;
pub mod nbd;
pub mod new_layer;
pub mod tar_guard;
pub mod virtio_blk;

/// Reads a fuzz input front to back; past its end every read is zero or
/// empty, so any input decodes to something.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n <= 256 {
            u64::from(self.u8()) % n
        } else if n <= 65536 {
            u64::from(self.u16()) % n
        } else {
            self.u64() % n
        }
    }

    /// Up to `n` bytes (fewer where the input ends).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// A byte string of a length the input gives (at most `max`).
    pub fn string(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max as u64 + 1) as usize;
        self.bytes(n).to_vec()
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}

/// PAX records as POSIX lays them out: `LEN KEY=VALUE\n`, LEN counting
/// the whole record (an oracle of its own, apart from the product's).
pub fn pax_records(mut data: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let space = data.iter().position(|&b| b == b' ').expect("a record length");
        let len: usize = std::str::from_utf8(&data[..space]).unwrap().parse().expect("a decimal length");
        let body = &data[space + 1..len - 1];
        let eq = body.iter().position(|&b| b == b'=').expect("KEY=VALUE");
        out.push((body[..eq].to_vec(), body[eq + 1..].to_vec()));
        data = &data[len..];
    }
    out
}

/// Reads a tar runasroot wrote (an export, or a new layer that passed the
/// host's validator) as a client would, and checks what every such tar
/// promises: names relative with no `.`, `..` or empty component, only
/// directories ending in `/`, each directory before its contents and
/// every parent a directory of the tar, no name twice, each hard link to
/// an earlier non-directory that is not itself a link, data that reads.
/// PAX records are read by their length, as Go's archive/tar reads them
/// (the crate's parser splits at newlines, which names and binary xattr
/// values may hold): the tar guard keeps them raw. `each` sees every
/// entry's header and records for checks of its own; returns the entries.
pub fn read_as_client(tar: &[u8], mut each: impl FnMut(&tar::Header, &[(Vec<u8>, Vec<u8>)])) -> u64 {
    use std::collections::HashMap;
    use std::io::Read;
    use tar::EntryType;

    let guard = runasroot::layers::TarGuard::new(tar);
    let last = guard.last_entry();
    let mut archive = tar::Archive::new(guard);
    let mut kinds: HashMap<Vec<u8>, EntryType> = HashMap::new();
    let mut count = 0;
    for entry in archive.entries().expect("the tar reads") {
        let mut e = entry.expect("every entry reads");
        let kept = last.take().expect("the guard saw the entry");
        let records = kept.pax.as_deref().map(pax_records).unwrap_or_default();
        let record = |key: &[u8]| records.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let raw = record(b"path").unwrap_or_else(|| e.path_bytes().into_owned());
        let kind = e.header().entry_type();
        let name = raw.strip_suffix(b"/").unwrap_or(&raw).to_vec();
        assert_eq!(raw.ends_with(b"/"), kind == EntryType::Directory, "only directories end in /: {raw:?}");
        assert!(!name.is_empty() && !name.starts_with(b"/"), "name {raw:?}");
        for c in name.split(|&b| b == b'/') {
            assert!(!c.is_empty() && c != b"." && c != b"..", "component {c:?} in {raw:?}");
        }
        if let Some(slash) = name.iter().rposition(|&b| b == b'/') {
            assert_eq!(kinds.get(&name[..slash]), Some(&EntryType::Directory), "{raw:?} is not under an earlier directory of the tar");
        }
        if kind == EntryType::Link {
            let target = record(b"linkpath").unwrap_or_else(|| e.link_name_bytes().expect("a link has a target").into_owned());
            // A hard link may name any inode but a directory: a file, a
            // symlink, a device or a fifo.
            let named = kinds.get(&target);
            assert!(named.is_some_and(|k| !matches!(k, EntryType::Directory | EntryType::Link)), "hard link {raw:?} to {target:?}, not an earlier non-directory");
        }
        each(e.header(), &records);
        assert!(kinds.insert(name, kind).is_none(), "{raw:?} twice");
        let mut data = Vec::new();
        e.read_to_end(&mut data).expect("file data reads");
        count += 1;
    }
    count
}

/// Makes every 512-byte block whose typeflag byte is printable a header
/// with a valid checksum (the others stay data), so the fuzzer reaches
/// past the checksum.
pub fn fix_checksums(bytes: &mut [u8]) {
    for block in bytes.chunks_mut(512).filter(|b| b.len() == 512 && b[156].is_ascii_graphic()) {
        block[148..156].fill(b' ');
        let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
        block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    }
}

/// A temporary directory for one run; fuzzing creates many, so it goes
/// under `$TMPDIR` like any other.
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("rar-fuzz-").tempdir().expect("a temporary directory")
}

/// Deterministic noise (xorshift64), for starting inputs of the targets
/// that build everything from their input.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Starting inputs of the targets that have no well-formed examples of
/// their own.
pub fn noise_seeds() -> Vec<Vec<u8>> {
    (1..=4).map(|s| noise(s, 256 << s)).collect()
}
