//! `layers::TarGuard` against the `tar` crate alone: the guard follows
//! the crate's header walk to bound what the crate reads into memory, so
//! over any bytes the two must list the same entries, unless the guard
//! refused a header over its bound (an extension or sparse map larger
//! than `MAX_EXTENSION_BYTES`, or an entry size past `MAX_ENTRY_SIZE`,
//! which no seek reaches). Any other difference means the guard lost the
//! crate's place: it could then miss a huge header.
//!
//! The guard also keeps each entry's header and PAX records as they were
//! (the layer reader decodes them itself): they must be the entry's.
//!
//! Input: a mode byte (streamed or seeking, read piece sizes, raw bytes
//! or blocks whose header checksums are fixed up so the fuzzer reaches
//! past them), then the tar.

use std::io::{self, Cursor, Read, Seek, SeekFrom};

use runasroot::layers::guard::{LastEntry, MAX_ENTRY_SIZE};
use runasroot::layers::TarGuard;

use super::Input;

/// What the crate shows of one entry.
#[derive(Debug, PartialEq, Eq)]
struct Listed {
    header: Vec<u8>,
    path: Vec<u8>,
    link: Option<Vec<u8>>,
    size: u64,
    position: u64,
    pax: Option<Vec<(Vec<u8>, Vec<u8>)>>,
    data: Option<Vec<u8>>,
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let seeking = mode & 1 == 1;
    let piece = [1usize, 3, 100, 512, 4096, usize::MAX][usize::from(mode >> 1) % 6];
    let fix_checksums = mode & 0x10 != 0;
    let mut bytes = input.rest().to_vec();
    if fix_checksums {
        super::fix_checksums(&mut bytes);
    }
    let plain = list(&bytes, seeking, piece, false);
    let guarded = list(&bytes, seeking, piece, true);
    match (&plain, &guarded) {
        (Ok(p), Ok(g)) => assert_eq!(p, g, "the guard changed what the tar crate reads"),
        (Ok(p), Err(e)) => assert!(
            e.contains("runasroot reads")
                || e.contains("bytes of sparse extension headers")
                || (e.contains("invalid size field") && p.iter().any(|l| l.size > MAX_ENTRY_SIZE)),
            "the guard refused a tar the crate reads, for another reason than its bound: {e}"
        ),
        (Err(_), Ok(_)) => panic!("the guard made a tar the crate refuses readable"),
        (Err(_), Err(_)) => {}
    }
}

/// Gives at most `piece` bytes per read, as a decompressor or a socket.
struct Pieces<R> {
    inner: R,
    piece: usize,
}

impl<R: Read> Read for Pieces<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.piece);
        self.inner.read(&mut buf[..n])
    }
}

impl<R: Seek> Seek for Pieces<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.inner.seek(to)
    }
}

fn list(bytes: &[u8], seeking: bool, piece: usize, guarded: bool) -> Result<Vec<Listed>, String> {
    let reader = Pieces { inner: Cursor::new(bytes), piece };
    let r = if guarded {
        let guard = TarGuard::new(reader);
        let last = guard.last_entry();
        entries(tar::Archive::new(guard), seeking, Some(&last))
    } else {
        entries(tar::Archive::new(reader), seeking, None)
    };
    r.map_err(|e| e.to_string())
}

/// What the guard kept of the entry the crate just returned must be that
/// entry: its header block as it was (the crate rewrites uid and gid
/// from PAX records), its PAX records the crate's.
fn check_kept<R: Read>(e: &mut tar::Entry<'_, R>, last: &LastEntry) -> io::Result<()> {
    let kept = last.take().expect("the guard keeps every entry's header");
    let (ours, theirs) = (kept.header.as_bytes(), e.header().as_bytes());
    let same = if kept.pax.is_some() { ours[..108] == theirs[..108] && ours[124..] == theirs[124..] } else { ours[..] == theirs[..] };
    assert!(same, "the guard kept another header than the entry's");
    if let Some(pax) = &kept.pax {
        let ours: Vec<_> = tar::PaxExtensions::new(pax).map(|r| r.ok().map(|r| (r.key_bytes().to_vec(), r.value_bytes().to_vec()))).collect();
        let theirs: Vec<_> = match e.pax_extensions()? {
            Some(p) => p.map(|r| r.ok().map(|r| (r.key_bytes().to_vec(), r.value_bytes().to_vec()))).collect(),
            None => Vec::new(),
        };
        assert_eq!(ours, theirs, "the guard kept other PAX records than the entry's");
    }
    Ok(())
}

fn entries<R: Read + Seek>(mut archive: tar::Archive<R>, seeking: bool, last: Option<&LastEntry>) -> io::Result<Vec<Listed>> {
    let mut out = Vec::new();
    let entries = if seeking { archive.entries_with_seek()? } else { archive.entries()? };
    for entry in entries {
        let mut e = entry?;
        if let Some(last) = last {
            check_kept(&mut e, last)?;
        }
        let pax = match e.pax_extensions()? {
            Some(p) => Some(
                p.map(|r| r.map(|r| (r.key_bytes().to_vec(), r.value_bytes().to_vec())))
                    .collect::<io::Result<Vec<_>>>()?,
            ),
            None => None,
        };
        let mut listed = Listed {
            header: e.header().as_bytes().to_vec(),
            path: e.path_bytes().into_owned(),
            link: e.link_name_bytes().map(|l| l.into_owned()),
            size: e.size(),
            position: e.raw_file_position(),
            pax,
            data: None,
        };
        if !seeking {
            let mut data = Vec::new();
            e.read_to_end(&mut data)?;
            listed.data = Some(data);
        }
        out.push(listed);
    }
    Ok(out)
}

/// Starting inputs: tars with GNU long names, PAX records, a PAX size,
/// a sparse entry, streamed and seeking.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    b.append_data(&mut h, "a/short", &b"abc"[..]).unwrap();
    b.append_data(&mut h.clone(), "l/".repeat(60) + "long", &b"abc"[..]).unwrap();
    b.append_pax_extensions([("path", &b"p/pax"[..]), ("SCHILY.xattr.user.x", b"1"), ("size", b"3")]).unwrap();
    b.append_data(&mut h.clone(), "ignored", &b"abc"[..]).unwrap();
    let mut link = tar::Header::new_ustar();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    b.append_link(&mut link, "s", "t/".repeat(70)).unwrap();
    let mut sparse = tar::Header::new_gnu();
    sparse.set_entry_type(tar::EntryType::GNUSparse);
    sparse.set_size(0);
    sparse.as_gnu_mut().unwrap().realsize = *b"00000000000\0";
    b.append_data(&mut sparse, "sparse", &b""[..]).unwrap();
    let tar = b.into_inner().unwrap();
    vec![[vec![0x00], tar.clone()].concat(), [vec![0x01], tar.clone()].concat(), [vec![0x13], tar].concat()]
}
