//! The deterministic tar rules (see shared FORMATS.md, "Deterministic").
//!
//! Every engine that writes a tar (the guest's layer packer, the guest's
//! export, the host's streaming export) describes each entry as an
//! [`Entry`] and writes it with [`TarWriter`], and orders siblings with
//! [`compare_siblings`]. So the same tree gives the same bytes whatever
//! engine, clock, umask or locale produced it.
//!
//! * Order: depth first; a directory's entry comes right before its
//!   contents; inside a directory: the opaque marker, then `.wh.` names,
//!   then the rest, each group sorted bytewise.
//! * Names: no `./` prefix, directories end in `/`, no entry for the root.
//! * Headers: ustar with PAX records for long or non-ASCII names and link
//!   targets, ids and sizes beyond the octal fields, and xattrs
//!   (`SCHILY.xattr.NAME`, sorted); numeric ids, empty uname/gname, no
//!   atime/ctime, mode field = permission bits (with suid/sgid/sticky).

use std::cmp::Ordering;
use std::io::{self, Read, Write};

use crate::whiteout;

/// Largest value of an 8-byte octal field (uid, gid, mode): 7 digits.
const MAX_OCTAL_8: u64 = 0o7777777;
/// Largest value of a 12-byte octal field (size, mtime): 11 digits.
const MAX_OCTAL_12: u64 = 0o77777777777;
/// ustar's `name` and `linkname` fields.
const NAME_FIELD: usize = 100;
/// Permission bits kept in the mode field (rwx for all + suid/sgid/sticky).
pub const MODE_BITS: u32 = 0o7777;

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File { size: u64 },
    Dir,
    Symlink { target: Vec<u8> },
    /// A hard link to an earlier entry of the same archive (its tar name,
    /// without the trailing `/` rules: never a directory).
    Hardlink { target: Vec<u8> },
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

/// One tar entry, fully described.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the root, no leading `./` or `/`, no trailing `/`
    /// (the writer adds it for directories).
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits; anything above [`MODE_BITS`] is dropped.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    /// Seconds since the epoch.
    pub mtime: u64,
    /// Extended attributes to keep; the writer sorts them by name and drops
    /// overlayfs-private ones.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    /// An empty regular file standing for a whiteout or the opaque marker.
    pub fn whiteout_marker(path: Vec<u8>, mtime: u64) -> Entry {
        Entry {
            path,
            kind: Kind::File { size: 0 },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime,
            xattrs: Vec::new(),
        }
    }
}

/// The group a sibling name sorts in: opaque marker, whiteouts, the rest.
fn sibling_rank(name: &[u8]) -> u8 {
    if name == whiteout::OPAQUE_MARKER {
        0
    } else if name.starts_with(whiteout::PREFIX) {
        1
    } else {
        2
    }
}

/// Orders two names in the same directory.
pub fn compare_siblings(a: &[u8], b: &[u8]) -> Ordering {
    sibling_rank(a).cmp(&sibling_rank(b)).then_with(|| a.cmp(b))
}

/// The mtime an entry of an export gets: the image's own, clamped to
/// SOURCE_DATE_EPOCH when that is set.
pub fn export_mtime(image_mtime: u64, clamp: Option<u64>) -> u64 {
    match clamp {
        Some(c) => image_mtime.min(c),
        None => image_mtime,
    }
}

/// Writes [`Entry`]s as deterministic tar headers through `tar::Builder`.
pub struct TarWriter<W: Write> {
    builder: tar::Builder<W>,
}

impl<W: Write> TarWriter<W> {
    pub fn new(out: W) -> Self {
        let mut builder = tar::Builder::new(out);
        builder.mode(tar::HeaderMode::Deterministic);
        TarWriter { builder }
    }

    /// Appends one entry; `data` must yield exactly `size` bytes for a file
    /// (fewer is an error, extra is not read).
    pub fn append(&mut self, entry: &Entry, data: &mut dyn Read) -> io::Result<()> {
        let (header, pax) = build_header(entry)?;
        if !pax.is_empty() {
            self.builder
                .append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        match entry.kind {
            Kind::File { size } => {
                let mut limited = ExactReader { inner: data.take(size), left: size };
                self.builder.append(&header, &mut limited)
            }
            _ => self.builder.append(&header, io::empty()),
        }
    }

    /// Writes the end-of-archive blocks and returns the sink.
    pub fn finish(self) -> io::Result<W> {
        self.builder.into_inner()
    }

    /// The sink, e.g. to count bytes written so far.
    pub fn get_mut(&mut self) -> &mut W {
        self.builder.get_mut()
    }
}

/// Fails with UnexpectedEof if the source ends before `left` bytes: a file
/// that shrank while being packed must not yield a corrupt archive.
struct ExactReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shorter than its size"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn needs_pax_name(name: &[u8]) -> bool {
    name.len() > NAME_FIELD || !name.is_ascii() || name.contains(&0)
}

/// PAX records of one entry, in the order they are written.
pub type PaxRecords = Vec<(String, Vec<u8>)>;

/// Builds the ustar header and the PAX records (ordered) for an entry.
pub fn build_header(entry: &Entry) -> io::Result<(tar::Header, PaxRecords)> {
    if entry.path.is_empty() || entry.path.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty or NUL-containing tar path"));
    }
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    let mut header = tar::Header::new_ustar();

    let mut name = entry.path.clone();
    if entry.kind == Kind::Dir {
        name.push(b'/');
    }
    if needs_pax_name(&name) {
        pax.push(("path".into(), name.clone()));
    }
    {
        let field = &mut header.as_old_mut().name;
        let n = name.len().min(NAME_FIELD);
        field[..n].copy_from_slice(&name[..n]);
    }

    let (entry_type, size) = match &entry.kind {
        Kind::File { size } => (tar::EntryType::Regular, *size),
        Kind::Dir => (tar::EntryType::Directory, 0),
        Kind::Symlink { .. } => (tar::EntryType::Symlink, 0),
        Kind::Hardlink { .. } => (tar::EntryType::Link, 0),
        Kind::Char { .. } => (tar::EntryType::Char, 0),
        Kind::Block { .. } => (tar::EntryType::Block, 0),
        Kind::Fifo => (tar::EntryType::Fifo, 0),
    };
    header.set_entry_type(entry_type);

    if let Kind::Symlink { target } | Kind::Hardlink { target } = &entry.kind {
        if target.is_empty() || target.contains(&0) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty or NUL-containing link target"));
        }
        if needs_pax_name(target) {
            pax.push(("linkpath".into(), target.clone()));
        }
        let field = &mut header.as_old_mut().linkname;
        let n = target.len().min(NAME_FIELD);
        field[..n].copy_from_slice(&target[..n]);
    }

    header.set_mode(entry.mode & MODE_BITS);
    for (key, value, setter) in [
        ("uid", entry.uid, tar::Header::set_uid as fn(&mut tar::Header, u64)),
        ("gid", entry.gid, tar::Header::set_gid),
    ] {
        if value > MAX_OCTAL_8 {
            pax.push((key.into(), value.to_string().into_bytes()));
            setter(&mut header, 0);
        } else {
            setter(&mut header, value);
        }
    }
    if size > MAX_OCTAL_12 {
        pax.push(("size".into(), size.to_string().into_bytes()));
    }
    // set_size writes base-256 beyond the octal range; with a PAX `size`
    // readers take the record, so the field just has to be well-formed.
    header.set_size(size.min(MAX_OCTAL_12));
    if size > MAX_OCTAL_12 {
        // tar::Builder writes `header.size()` bytes of data: give it the
        // real size (base-256 in the field, PAX record authoritative).
        header.set_size(size);
    }
    if entry.mtime > MAX_OCTAL_12 {
        pax.push(("mtime".into(), entry.mtime.to_string().into_bytes()));
        header.set_mtime(0);
    } else {
        header.set_mtime(entry.mtime);
    }
    if let Kind::Char { major, minor } | Kind::Block { major, minor } = entry.kind {
        header.set_device_major(major)?;
        header.set_device_minor(minor)?;
    }

    let mut xattrs: Vec<&(Vec<u8>, Vec<u8>)> = entry
        .xattrs
        .iter()
        .filter(|(k, _)| !whiteout::is_overlay_private(k))
        .collect();
    xattrs.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in xattrs {
        let key = std::str::from_utf8(k)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "non-UTF-8 xattr name"))?;
        pax.push((format!("SCHILY.xattr.{key}"), v.clone()));
    }

    header.set_cksum();
    Ok((header, pax))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1,
            xattrs: vec![],
        }
    }

    fn write(entries: &[(Entry, &[u8])]) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        for (e, data) in entries {
            w.append(e, &mut &data[..]).unwrap();
        }
        w.finish().unwrap()
    }

    /// (path, type, mode, uid, gid, size, mtime, link, pax keys) of each entry.
    fn listing(bytes: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                let mut keys: Vec<String> = e
                    .pax_extensions()
                    .unwrap()
                    .map(|exts| exts.map(|x| x.unwrap().key().unwrap().to_string()).collect::<Vec<_>>())
                    .unwrap_or_default();
                keys.sort();
                format!(
                    "{} {:?} {:o} {}:{} {} {} {} [{}]",
                    String::from_utf8_lossy(&e.path_bytes()),
                    h.entry_type(),
                    h.mode().unwrap(),
                    e.header().uid().unwrap(),
                    e.header().gid().unwrap(),
                    e.size(),
                    h.mtime().unwrap(),
                    e.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned()).unwrap_or_default(),
                    keys.join(",")
                )
            })
            .collect()
    }

    #[test]
    fn writes_plain_entries_as_ustar_with_numeric_ids() {
        let mut file = entry("data/f", Kind::File { size: 3 });
        file.mode = 0o104755;
        file.uid = 1000;
        file.gid = 1000;
        let bytes = write(&[
            (entry("data", Kind::Dir), b""),
            (file, b"abc"),
            (entry("data/l", Kind::Symlink { target: b"f".to_vec() }), b""),
            (entry("data/h", Kind::Hardlink { target: b"data/f".to_vec() }), b""),
            (entry("data/c", Kind::Char { major: 1, minor: 3 }), b""),
            (entry("data/p", Kind::Fifo), b""),
        ]);
        assert_eq!(
            listing(&bytes),
            vec![
                "data/ Directory 755 0:0 0 1  []",
                "data/f Regular 4755 1000:1000 3 1  []",
                "data/l Symlink 755 0:0 0 1 f []",
                "data/h Link 755 0:0 0 1 data/f []",
                "data/c Char 755 0:0 0 1  []",
                "data/p Fifo 755 0:0 0 1  []",
            ]
        );
        // ustar magic, empty uname/gname.
        assert_eq!(&bytes[257..263], b"ustar\0");
        assert!(bytes[265..265 + 64].iter().all(|&b| b == 0));
    }

    #[test]
    fn uses_pax_for_long_and_odd_names_big_ids_and_xattrs() {
        let long = "d/".repeat(60) + "file";
        let mut e = entry(&long, Kind::File { size: 0 });
        e.uid = 1 << 40;
        e.xattrs = vec![
            (b"user.b".to_vec(), b"2".to_vec()),
            (b"security.capability".to_vec(), vec![1, 0, 0, 2]),
            (b"trusted.overlay.origin".to_vec(), b"x".to_vec()),
        ];
        let odd = entry("caf\u{e9}", Kind::Symlink { target: vec![b'x'; 150] });
        let bytes = write(&[(e, b""), (odd, b"")]);
        let l = listing(&bytes);
        assert_eq!(
            l[0],
            format!("{long} Regular 755 1099511627776:0 0 1  [SCHILY.xattr.security.capability,SCHILY.xattr.user.b,path,uid]")
        );
        assert_eq!(l[1], format!("caf\u{e9} Symlink 755 0:0 0 1 {} [linkpath,path]", "x".repeat(150)));
    }

    #[test]
    fn same_entries_give_same_bytes() {
        let e = entry("a", Kind::File { size: 2 });
        assert_eq!(write(&[(e.clone(), b"hi")]), write(&[(e, b"hi")]));
    }

    #[test]
    fn short_data_is_an_error() {
        let mut w = TarWriter::new(Vec::new());
        let err = w.append(&entry("a", Kind::File { size: 10 }), &mut &b"abc"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn orders_siblings_opaque_then_whiteouts_then_rest() {
        let mut names: Vec<&[u8]> = vec![b"b", b".wh.z", b"A", b".wh..wh..opq", b".wh.a", b"a", b".a"];
        names.sort_by(|a, b| compare_siblings(a, b));
        assert_eq!(
            names,
            vec![&b".wh..wh..opq"[..], b".wh.a", b".wh.z", b".a", b"A", b"a", b"b"]
        );
    }

    #[test]
    fn export_mtime_clamps_only_when_asked() {
        assert_eq!(export_mtime(500, None), 500);
        assert_eq!(export_mtime(500, Some(100)), 100);
        assert_eq!(export_mtime(50, Some(100)), 50);
    }
}
