//! A bound on what a tar can make the `tar` crate hold in memory.
//!
//! The `tar` crate (0.4, `archive.rs` `next_entry`) reads a PAX extended
//! header (`x`), a GNU long name (`L`) or long link (`K`) whole into a
//! `Vec`, however many bytes its size field claims, and turns every block
//! of a GNU sparse entry's extension headers into a list entry
//! (`parse_sparse_header`): a 4 MiB gzip layer claiming a 4 GiB PAX
//! header makes it allocate 4 GiB. It has no option to refuse.
//!
//! [`TarGuard`] sits between the crate and the stream and follows the
//! same header walk as the bytes go by: where the next header starts (the
//! header's size, or a PAX `size` record, rounded up to a block), which
//! headers are extensions, where a sparse entry's extension blocks are.
//! The read that brings a header claiming more than
//! [`MAX_EXTENSION_BYTES`] (or more sparse blocks than that many bytes
//! hold) fails, so the crate never starts the allocation. Anything the
//! walk cannot follow (a damaged header, a skip over a header) fails too:
//! the guard never lets the crate read a header it has not checked.
//!
//! The guard changes nothing else: a tar it passes reads exactly as it
//! does without it (the `tar_guard` fuzz target compares the two). It
//! also keeps what the stream said about the entry the crate returned
//! last ([`Extensions`]: its header block, PAX records and GNU long
//! names as they were), so that readers decode those themselves
//! (`super::pax`: the crate's PAX parser splits records at newlines).

use std::cell::RefCell;
use std::io::{self, Read, Seek, SeekFrom};
use std::rc::Rc;

/// Most bytes one extension header (PAX `x`/`g`, GNU `L`/`K`) may hold,
/// and most bytes of GNU sparse extension blocks one entry may have.
/// Go's `archive/tar`, which writes and reads the layers of Docker,
/// containerd, podman and umoci, refuses anything larger
/// (`maxSpecialFileSize`, 1 MiB), so no image tool writes one.
pub const MAX_EXTENSION_BYTES: u64 = 1 << 20;

/// A tar block: headers and data are laid out in these.
const BLOCK: u64 = 512;
/// Largest entry size taken: offsets past it do not fit the `off_t` a
/// seek takes (a base-256 size field can claim up to 2^95).
pub const MAX_ENTRY_SIZE: u64 = i64::MAX as u64 / 2;
/// Offset of `isextended` in a GNU sparse extension block (21 sparse
/// descriptors of 24 bytes before it; tar 0.4 `GnuExtSparseHeader`).
const EXT_ISEXTENDED: usize = 504;

/// Why the guard stopped a tar.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error(
        "the tar header at byte {at} is a {what} of {size} bytes, more than the {MAX_EXTENSION_BYTES} runasroot reads \
         (Go's archive/tar, which writes image layers, refuses them too)"
    )]
    ExtensionTooLarge { at: u64, what: &'static str, size: u64 },
    #[error(
        "the GNU sparse entry at byte {at} has more than {MAX_EXTENSION_BYTES} bytes of sparse extension headers"
    )]
    SparseTooLarge { at: u64 },
    #[error("the tar header at byte {at} is damaged: {reason}")]
    BadHeader { at: u64, reason: &'static str },
    #[error("the tar header at byte {at} claims a size that overflows the archive")]
    SizeOverflow { at: u64 },
    #[error("the tar reader skipped from byte {from} to byte {to}, over the header at byte {header}")]
    Skipped { from: u64, to: u64, header: u64 },
}

fn fail(e: GuardError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// A reader (and, for `entries_with_seek`, a seeker) to hand to
/// `tar::Archive::new` in place of `inner`. Positions are counted from
/// the first byte the guard sees, as the crate counts them.
pub struct TarGuard<R> {
    inner: R,
    walk: Walk,
}

impl<R> TarGuard<R> {
    pub fn new(inner: R) -> TarGuard<R> {
        TarGuard { inner, walk: Walk::default() }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// Where the guard puts what the stream said about each entry, for
    /// the reader iterating the crate's entries to take after each one.
    pub fn last_entry(&self) -> LastEntry {
        self.walk.last.clone()
    }
}

/// An entry's header and extensions, as they were in the stream.
#[derive(Debug, Clone)]
pub struct Extensions {
    /// The header block itself (the crate rewrites uid, gid and size in
    /// its copy from PAX records it parsed its own way).
    pub header: tar::Header,
    /// The PAX records (`x`) before it, raw.
    pub pax: Option<Vec<u8>>,
    /// Whether a GNU long name (`L`), long link (`K`) came before it.
    pub long_name: bool,
    pub long_link: bool,
}

/// The [`Extensions`] of the entry the crate returned last; taken by the
/// reader after each entry.
#[derive(Debug, Clone, Default)]
pub struct LastEntry(Rc<RefCell<Option<Extensions>>>);

impl LastEntry {
    pub fn take(&self) -> Option<Extensions> {
        self.0.borrow_mut().take()
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.walk.saw(&buf[..n]).map_err(fail)?;
        Ok(n)
    }
}

impl<R: Seek> Seek for TarGuard<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let p = self.inner.seek(to)?;
        self.walk.moved(p).map_err(fail)?;
        Ok(p)
    }
}

/// Bytes being gathered at a known place of the stream.
#[derive(Debug)]
struct Gather {
    at: u64,
    want: usize,
    bytes: Vec<u8>,
}

impl Gather {
    fn new(at: u64, want: usize) -> Gather {
        Gather { at, want, bytes: Vec::with_capacity(want) }
    }

    fn end(&self) -> u64 {
        self.at + self.want as u64
    }

    /// The next byte it needs.
    fn next(&self) -> u64 {
        self.at + self.bytes.len() as u64
    }
}

/// What comes next in the stream, as the `tar` crate will read it.
#[derive(Debug)]
enum Expect {
    /// A header block (`Gather::want` 512).
    Header(Gather),
    /// A recognised PAX header's records, then the header at `next`.
    Pax { data: Gather, next: u64 },
    /// A GNU sparse extension block; `data_len` is the entry's data
    /// (rounded to blocks) that follows the last of them, `left` how many
    /// more blocks the bound allows.
    SparseExt { block: Gather, data_len: u64, left: u64, entry: u64 },
    /// The end-of-archive block was read: the crate reads no more headers.
    Ended,
}

#[derive(Debug)]
struct Walk {
    /// Position of the next byte the inner reader gives.
    pos: u64,
    expect: Expect,
    /// A complete PAX header's records, for the next entry (its `size`).
    pending_pax: Option<Vec<u8>>,
    /// GNU long name and link headers seen for the next entry.
    pending_long: (bool, bool),
    last: LastEntry,
}

impl Default for Walk {
    fn default() -> Walk {
        Walk {
            pos: 0,
            expect: Expect::Header(Gather::new(0, BLOCK as usize)),
            pending_pax: None,
            pending_long: (false, false),
            last: LastEntry::default(),
        }
    }
}

impl Walk {
    /// The bytes `[pos, pos + bytes.len())` went by.
    fn saw(&mut self, mut bytes: &[u8]) -> Result<(), GuardError> {
        while !bytes.is_empty() {
            let gather = match &mut self.expect {
                Expect::Ended => break,
                Expect::Header(g) | Expect::Pax { data: g, .. } | Expect::SparseExt { block: g, .. } => g,
            };
            if self.pos < gather.next() {
                // Entry data or padding: nothing to check.
                let skip = (gather.next() - self.pos).min(bytes.len() as u64) as usize;
                self.pos += skip as u64;
                bytes = &bytes[skip..];
                continue;
            }
            if self.pos > gather.next() {
                // Only a seek can get here, and `moved` refuses that.
                return Err(GuardError::Skipped { from: gather.next(), to: self.pos, header: gather.at });
            }
            let take = (gather.want - gather.bytes.len()).min(bytes.len());
            gather.bytes.extend_from_slice(&bytes[..take]);
            self.pos += take as u64;
            bytes = &bytes[take..];
            if gather.bytes.len() == gather.want {
                self.complete()?;
            }
        }
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// The inner reader is now at `to`.
    fn moved(&mut self, to: u64) -> Result<(), GuardError> {
        let next = match &self.expect {
            Expect::Ended => None,
            Expect::Header(g) | Expect::Pax { data: g, .. } | Expect::SparseExt { block: g, .. } => Some(g),
        };
        if let Some(g) = next {
            // The crate seeks over entry data to the next header; it never
            // seeks into or past what it must read next, nor back.
            if to > g.next() || to < self.pos {
                return Err(GuardError::Skipped { from: self.pos, to, header: g.at });
            }
        }
        self.pos = to;
        Ok(())
    }

    /// What `expect` gathered is complete.
    fn complete(&mut self) -> Result<(), GuardError> {
        let expect = std::mem::replace(&mut self.expect, Expect::Ended);
        self.expect = match expect {
            Expect::Header(g) => self.header(g.at, &g.bytes)?,
            Expect::Pax { data, next } => {
                self.pending_pax = Some(data.bytes);
                Expect::Header(Gather::new(next, BLOCK as usize))
            }
            Expect::SparseExt { block, data_len, left, entry } => {
                let after = block.end();
                if block.bytes[EXT_ISEXTENDED] != 1 {
                    let next = after.checked_add(data_len).ok_or(GuardError::SizeOverflow { at: entry })?;
                    Expect::Header(Gather::new(next, BLOCK as usize))
                } else if left == 0 {
                    return Err(GuardError::SparseTooLarge { at: entry });
                } else {
                    Expect::SparseExt { block: Gather::new(after, BLOCK as usize), data_len, left: left - 1, entry }
                }
            }
            Expect::Ended => Expect::Ended,
        };
        Ok(())
    }

    /// One header block at `at`: what the crate does with it
    /// (`next_entry_raw`, `next_entry`, `parse_sparse_header`).
    fn header(&mut self, at: u64, bytes: &[u8]) -> Result<Expect, GuardError> {
        if bytes.iter().all(|&b| b == 0) {
            return Ok(Expect::Ended);
        }
        let mut header = tar::Header::new_old();
        header.as_mut_bytes().copy_from_slice(bytes);
        let sum: u32 = bytes[..148].iter().chain(&bytes[156..]).map(|&b| u32::from(b)).sum::<u32>() + 8 * 32;
        if header.cksum().ok() != Some(sum) {
            return Err(GuardError::BadHeader { at, reason: "checksum mismatch" });
        }
        let ty = header.entry_type();
        let extension = match ty.as_byte() {
            b'x' => Some("PAX extended header"),
            b'g' => Some("PAX global header"),
            b'L' => Some("GNU long name"),
            b'K' => Some("GNU long link name"),
            _ => None,
        };
        let recognised = header.as_gnu().is_some() || header.as_ustar().is_some();
        let mut size = header
            .entry_size()
            .ok()
            .filter(|&n| n <= MAX_ENTRY_SIZE)
            .ok_or(GuardError::BadHeader { at, reason: "invalid size field" })?;
        if let (None, Some(pax)) = (extension, &self.pending_pax) {
            size = pax_size(pax).unwrap_or(size);
        }
        if let Some(what) = extension {
            // Every extension type, recognised or not: the layer reader
            // reads an unrecognised `x` entry's records too.
            if size > MAX_EXTENSION_BYTES {
                return Err(GuardError::ExtensionTooLarge { at, what, size });
            }
        }
        let data = at + BLOCK;
        let next = size
            .checked_add(BLOCK - 1)
            .map(|s| s & !(BLOCK - 1))
            .and_then(|s| data.checked_add(s))
            .ok_or(GuardError::SizeOverflow { at })?;
        // The crate collects recognised `x`, `L`, `K` for the entry that
        // follows; any other header is that entry and uses them up.
        let continued = recognised && matches!(ty.as_byte(), b'x' | b'L' | b'K');
        match (continued, ty.as_byte()) {
            (true, b'L') => self.pending_long.0 = true,
            (true, b'K') => self.pending_long.1 = true,
            (true, _) => {}
            (false, _) => {
                let (long_name, long_link) = std::mem::take(&mut self.pending_long);
                let pax = self.pending_pax.take();
                *self.last.0.borrow_mut() = Some(Extensions { header: header.clone(), pax, long_name, long_link });
            }
        }
        if recognised && ty.is_pax_local_extensions() {
            if size == 0 {
                self.pending_pax = Some(Vec::new());
                return Ok(Expect::Header(Gather::new(next, BLOCK as usize)));
            }
            return Ok(Expect::Pax { data: Gather::new(data, size as usize), next });
        }
        if !continued && ty.is_gnu_sparse() {
            if let Some(gnu) = header.as_gnu() {
                if gnu.is_extended() {
                    return Ok(Expect::SparseExt {
                        block: Gather::new(data, BLOCK as usize),
                        data_len: next - data,
                        left: MAX_EXTENSION_BYTES / BLOCK - 1,
                        entry: at,
                    });
                }
            }
        }
        Ok(Expect::Header(Gather::new(next, BLOCK as usize)))
    }
}

/// The PAX `size` record as the crate reads it (tar 0.4 `pax.rs`
/// `pax_extensions_value`): the first `size` key, if its record and
/// value parse; a malformed record before it hides it.
fn pax_size(records: &[u8]) -> Option<u64> {
    for record in tar::PaxExtensions::new(records) {
        let record = record.ok()?;
        if record.key() != Ok("size") {
            continue;
        }
        return record.value().ok()?.parse::<u64>().ok();
    }
    None
}

/// A raw header block for tests that craft tars the `tar` crate's
/// builder refuses to write: `name`, typeflag, size field, ustar magic or
/// not.
#[cfg(test)]
pub(crate) fn raw_header(name: &str, ty: u8, size: u64, ustar: bool) -> Vec<u8> {
    let mut h = if ustar { tar::Header::new_ustar() } else { tar::Header::new_old() };
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_size(size);
    h.set_mode(0o644);
    h.as_mut_bytes()[156] = ty;
    h.set_cksum();
    h.as_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;


    fn padded(mut data: Vec<u8>) -> Vec<u8> {
        data.resize(data.len().next_multiple_of(512), 0);
        data
    }

    fn pax_record(key: &str, value: &str) -> Vec<u8> {
        let body = format!(" {key}={value}\n");
        let mut len = body.len() + 1;
        while format!("{len}{body}").len() != len {
            len += 1;
        }
        format!("{len}{body}").into_bytes()
    }

    /// Paths and sizes the `tar` crate lists, through the guard or not,
    /// reading the stream in pieces of `chunk` bytes.
    fn list(bytes: &[u8], guarded: bool, chunk: usize) -> Result<Vec<(String, u64, u64)>, String> {
        struct Pieces<'a>(&'a [u8], usize);
        impl Read for Pieces<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.1).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let run = |r: &mut dyn Read| -> io::Result<Vec<(String, u64, u64)>> {
            let mut a = tar::Archive::new(r);
            let mut out = vec![];
            for e in a.entries()? {
                let mut e = e?;
                // What the layer reader does with every entry.
                let _ = e.pax_extensions()?.map(|p| p.count());
                out.push((String::from_utf8_lossy(&e.path_bytes()).into_owned(), e.size(), e.raw_file_position()));
            }
            Ok(out)
        };
        let mut pieces = Pieces(bytes, chunk);
        let r = if guarded { run(&mut TarGuard::new(pieces)) } else { run(&mut pieces) };
        r.map_err(|e| e.to_string())
    }

    #[test]
    fn a_guarded_tar_reads_as_an_unguarded_one() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        b.append_data(&mut h, "a/short", &b"abc"[..]).unwrap();
        // A GNU long name, and a PAX path, size and xattr.
        b.append_data(&mut h.clone(), "l/".repeat(80) + "long", &b"abc"[..]).unwrap();
        b.append_pax_extensions([("path", &b"p/pax"[..]), ("SCHILY.xattr.user.x", b"1")]).unwrap();
        b.append_data(&mut h.clone(), "ignored", &b"abc"[..]).unwrap();
        let mut bytes = b.into_inner().unwrap();
        // A PAX `size` record that overrides the header's (as Go writes
        // for files past 8 GiB): the data is 700 bytes, the header says 0.
        let rec = pax_record("size", "700");
        let mut tail = raw_header("pax", b'x', rec.len() as u64, true);
        tail.extend(padded(rec));
        tail.extend(raw_header("big", b'0', 0, true));
        tail.extend(padded(vec![7; 700]));
        tail.extend(vec![0; 1024]);
        let end = bytes.len() - 1024;
        bytes.truncate(end);
        bytes.extend(tail);
        let plain = list(&bytes, false, usize::MAX).unwrap();
        assert_eq!(plain.len(), 4);
        assert_eq!(plain[3], ("big".to_string(), 700, plain[3].2));
        for chunk in [1, 7, 512, 513, 100_000] {
            assert_eq!(list(&bytes, true, chunk), Ok(plain.clone()), "chunk {chunk}");
        }
    }

    #[test]
    fn keeps_each_entrys_header_and_extensions_as_they_were() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(7);
        b.append_data(&mut h.clone(), "plain", &b"a"[..]).unwrap();
        b.append_data(&mut h.clone(), "l/".repeat(60) + "long", &b"b"[..]).unwrap();
        b.append_pax_extensions([("uid", &b"4000000"[..]), ("SCHILY.xattr.user.x", b"a\nb")]).unwrap();
        b.append_data(&mut h.clone(), "pax", &b"c"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let guard = TarGuard::new(&bytes[..]);
        let last = guard.last_entry();
        let mut a = tar::Archive::new(guard);
        let mut kept = Vec::new();
        for e in a.entries().unwrap() {
            let e = e.unwrap();
            let ext = last.take().expect("kept for every entry");
            kept.push((e.header().as_bytes()[..108] == ext.header.as_bytes()[..108], ext.pax.is_some(), ext.long_name, ext.header.uid().unwrap()));
        }
        // The header as written (uid 7, the PAX uid is the reader's to
        // apply), the PAX records of the last entry, the long name's flag.
        assert_eq!(kept, vec![(true, false, false, 7), (true, false, true, 7), (true, true, false, 7)]);
        assert!(last.take().is_none(), "taken once");
    }

    #[test]
    fn huge_extension_headers_fail_before_the_crate_reads_them() {
        // (typeflag, ustar magic): every extension kind, recognised by the
        // crate or (an old-style header) read by the layer reader.
        for (ty, ustar) in [(b'x', true), (b'L', true), (b'K', true), (b'g', true), (b'x', false)] {
            let mut bytes = raw_header("huge", ty, 4 << 30, ustar);
            bytes.extend(vec![b'a'; 4096]);
            let err = list(&bytes, true, 4096).unwrap_err();
            assert!(err.contains("4294967296 bytes, more than the 1048576"), "{}: {err}", ty as char);
        }
        // At the bound itself: the crate reads it (and then finds the
        // stream too short).
        let bytes = raw_header("edge", b'x', MAX_EXTENSION_BYTES, true);
        assert!(!list(&bytes, true, 512).unwrap_err().contains("more than"));
    }

    #[test]
    fn a_damaged_header_or_a_skip_over_a_header_fails() {
        let mut bytes = raw_header("f", b'0', 0, true);
        bytes[0] ^= 1;
        assert!(list(&bytes, true, 512).unwrap_err().contains("byte 0 is damaged: checksum mismatch"));
        // A base-256 size no seek can reach (the sign bit set: 0xff...).
        let mut h = tar::Header::from_byte_slice(&raw_header("f", b'0', 0, true)).clone();
        h.as_mut_bytes()[124..136].copy_from_slice(&[0xff, 0xfe, 0x1b, b'[', b'H', 0x9b, 0xc0, 0, 0, 0, 0, 0]);
        h.set_cksum();
        let err = list(h.as_bytes(), true, 512).unwrap_err();
        assert!(err.contains("byte 0 is damaged: invalid size field"), "{err}");
        let mut g = TarGuard::new(io::Cursor::new(vec![0u8; 4096]));
        let err = g.seek(SeekFrom::Start(1024)).unwrap_err();
        assert!(err.to_string().contains("skipped from byte 0 to byte 1024"), "{err}");
    }

    #[test]
    fn sparse_extension_blocks_are_followed_and_bounded() {
        // A GNU sparse entry with two extension blocks, then a file.
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_size(0);
        h.as_gnu_mut().unwrap().isextended[0] = 1;
        h.as_gnu_mut().unwrap().realsize = *b"00000000000\0";
        h.as_old_mut().name[..6].copy_from_slice(b"sparse");
        h.set_cksum();
        let ext = |more: bool| {
            let mut b = vec![0u8; 512];
            b[EXT_ISEXTENDED] = u8::from(more);
            b
        };
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend(ext(true));
        bytes.extend(ext(false));
        bytes.extend(raw_header("after", b'0', 0, true));
        bytes.extend(vec![0; 1024]);
        let plain = list(&bytes, false, 512).unwrap();
        assert_eq!(plain.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(), ["sparse", "after"]);
        assert_eq!(list(&bytes, true, 100), Ok(plain));
        // Endless extension blocks: stopped after the bound.
        let mut endless = h.as_bytes().to_vec();
        for _ in 0..(MAX_EXTENSION_BYTES / 512 + 1) {
            endless.extend(ext(true));
        }
        assert!(list(&endless, true, 65536).unwrap_err().contains("more than 1048576 bytes of sparse extension"));
    }
}
