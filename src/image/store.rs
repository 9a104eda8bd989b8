//! Where an image's files are: members of a tar archive (addressed by byte
//! range, never extracted) or files of a directory.
//!
//! Every path an image names is untrusted: it is cleaned, and one that is
//! absolute, climbs with `..`, or resolves through a link to outside the
//! image is refused. Metadata reads are bounded.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{BlobRef, ImageError};
use crate::layers::{pax, TarGuard};

/// Most members an image archive may hold: a 1000-layer legacy archive
/// has ~4000; this only stops a hostile archive from filling memory.
pub const MAX_MEMBERS: usize = 1_000_000;
/// A tar header block.
const TAR_BLOCK: usize = 512;
/// Where a ustar header keeps its checksum.
const TAR_CHECKSUM: std::ops::Range<usize> = 148..156;

/// Most bytes the names of an archive's members may take in its index
/// (the index keeps every name): a 4000-member archive's take ~300 KiB,
/// while a name may be 1 MiB long (`MAX_EXTENSION_BYTES`).
pub const MAX_MEMBER_NAME_BYTES: usize = 64 << 20;
/// Names shown when a path is no image at all.
const SAMPLE_NAMES: usize = 8;
/// Links followed when resolving one member (legacy archives written by
/// skopeo make `<id>/layer.tar` a symlink to `../<hex>.tar`: one hop).
const MAX_LINK_HOPS: usize = 16;

/// A member of a tar archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    /// Data at `offset`, `size` bytes long.
    File { offset: u64, size: u64 },
    /// A symlink, target as stored (relative to the member's directory).
    Symlink(String),
    /// A hard link to another member (archive-root relative).
    Hardlink(String),
    Other,
}

/// An image's files.
#[derive(Debug)]
pub enum Store {
    /// `label` names it in messages (the user's file, not a temporary
    /// decompressed copy).
    Tar { path: PathBuf, label: String, members: HashMap<String, Member> },
    Dir { root: PathBuf },
}

/// Cleans a path an image names: drops `./` and empty components; `None`
/// if it is absolute, empty or contains `..`.
pub fn clean_path(p: &str) -> Option<String> {
    if p.starts_with('/') {
        return None;
    }
    let mut parts = vec![];
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Whether `head` (the first bytes of a file) can start a tar archive: a
/// whole header block whose checksum holds (unsigned, or signed as some
/// old writers summed it), or the zero block of an empty archive. Random
/// bytes fail this, so they get a plain message instead of the tar
/// reader's, which quotes the bad header's bytes.
fn starts_like_tar(head: &[u8]) -> bool {
    if head.len() < TAR_BLOCK {
        return false;
    }
    let head = &head[..TAR_BLOCK];
    if head.iter().all(|&b| b == 0) {
        return true;
    }
    let field = &head[TAR_CHECKSUM];
    let digits: Vec<u8> = field.iter().copied().skip_while(|&b| b == b' ').take_while(|b| (b'0'..=b'7').contains(b)).collect();
    let Some(stored) = (!digits.is_empty()).then(|| digits.iter().fold(0i64, |v, d| v * 8 + i64::from(d - b'0'))) else {
        return false;
    };
    let blanked = |i: usize, b: u8| if TAR_CHECKSUM.contains(&i) { b' ' } else { b };
    let unsigned: i64 = head.iter().enumerate().map(|(i, &b)| i64::from(blanked(i, b))).sum();
    let signed: i64 = head.iter().enumerate().map(|(i, &b)| i64::from(blanked(i, b) as i8)).sum();
    stored == unsigned || stored == signed
}

/// Reads up to `buf.len()` bytes from the start of `file`; fewer only at
/// its end.
fn read_up_to(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Joins a symlink target onto the link's directory, resolving `..`
/// lexically; `None` if it is absolute or climbs above the root.
fn resolve_link(link: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

impl Store {
    /// Indexes the members of a tar archive (headers only: data is skipped
    /// by seeking). `original` is the user's file, `decompressed` the codec
    /// when `path` is its decompressed copy: messages name what the user gave.
    pub fn open_tar(path: &Path, original: &Path, decompressed: Option<&'static str>) -> Result<Store, ImageError> {
        let label = match decompressed {
            Some(codec) => format!("{} (decompressed {codec})", original.display()),
            None => original.display().to_string(),
        };
        let err = |source| ImageError::ReadArchive { what: label.clone(), source };
        let file = File::open(path).map_err(|source| ImageError::Open { path: path.to_path_buf(), source })?;
        let mut first = [0u8; TAR_BLOCK];
        let got = read_up_to(&file, &mut first).map_err(err)?;
        if !starts_like_tar(&first[..got]) {
            return Err(ImageError::NotATar { path: original.to_path_buf(), decompressed });
        }
        // The guard bounds the long names and PAX headers the tar crate
        // would read whole into memory.
        let guard = TarGuard::new(file);
        let last = guard.last_entry();
        let mut archive = tar::Archive::new(guard);
        let mut members = HashMap::new();
        let mut name_bytes = 0usize;
        for entry in archive.entries_with_seek().map_err(err)? {
            let entry = entry.map_err(err)?;
            if members.len() >= MAX_MEMBERS {
                return Err(ImageError::TooManyMembers { path: path.to_path_buf(), limit: MAX_MEMBERS });
            }
            // Names as Go's archive/tar reads them (the PAX records by
            // their lengths; the tar crate splits them at newlines).
            let ext = last.take().ok_or_else(|| err(std::io::Error::other("a member the tar guard did not see")))?;
            let records = match &ext.pax {
                Some(data) => pax::records(data).map_err(|reason| err(std::io::Error::other(reason)))?,
                None => Vec::new(),
            };
            pax::check_size(&entry, &ext, &records).map_err(|reason| err(std::io::Error::other(reason)))?;
            let raw = pax::path(&entry, &ext, &records);
            let Some(name) = std::str::from_utf8(&raw).ok().and_then(clean_path) else {
                // An image never names such a member, so it can never be
                // reached; skip rather than fail on junk we do not use.
                continue;
            };
            let link = || String::from_utf8_lossy(&pax::link(&entry, &ext, &records)).into_owned();
            let member = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    Member::File { offset: entry.raw_file_position(), size: entry.size() }
                }
                tar::EntryType::Symlink => Member::Symlink(link()),
                tar::EntryType::Link => Member::Hardlink(link()),
                _ => Member::Other,
            };
            name_bytes += name.len();
            if name_bytes > MAX_MEMBER_NAME_BYTES {
                return Err(ImageError::MemberNamesTooLarge { path: path.to_path_buf(), limit: MAX_MEMBER_NAME_BYTES });
            }
            // A later member of the same name replaces an earlier one, as
            // when the archive is extracted.
            members.insert(name, member);
        }
        Ok(Store::Tar { path: path.to_path_buf(), label, members })
    }

    pub fn open_dir(root: &Path) -> Store {
        Store::Dir { root: root.to_path_buf() }
    }

    /// The archive or directory, for messages.
    pub fn name(&self) -> String {
        match self {
            Store::Tar { label, .. } => label.clone(),
            Store::Dir { root } => root.display().to_string(),
        }
    }

    /// Whether a top-level file exists (format detection).
    pub fn has(&self, name: &str) -> bool {
        match self {
            Store::Tar { members, .. } => members.contains_key(name),
            Store::Dir { root } => root.join(name).is_file(),
        }
    }

    /// Some top-level names, for "this is not an image" messages: the
    /// first few in order, however many there are.
    pub fn sample_names(&self) -> String {
        let (names, total) = match self {
            Store::Tar { members, .. } => first_names(members.keys().cloned()),
            Store::Dir { root } => match fs::read_dir(root) {
                Ok(d) => first_names(d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned())),
                Err(_) => (Vec::new(), 0),
            },
        };
        match total {
            0 => "nothing".into(),
            n if n > SAMPLE_NAMES => format!("{} … ({n} entries)", names.join(", ")),
            _ => names.join(", "),
        }
    }

    /// Where the bytes of the file `name` (as the image names it) are.
    /// `what` says who names it, for the error.
    pub fn locate(&self, name: &str, what: &str) -> Result<BlobRef, ImageError> {
        let unsafe_path = |member: &str| ImageError::UnsafeMemberPath {
            source_name: self.name(),
            what: what.to_string(),
            member: member.to_string(),
        };
        let missing = |member: &str| ImageError::MissingMember { source_name: self.name(), member: member.to_string() };
        let mut current = clean_path(name).ok_or_else(|| unsafe_path(name))?;
        match self {
            Store::Tar { path, members, .. } => {
                for _ in 0..=MAX_LINK_HOPS {
                    match members.get(&current) {
                        Some(Member::File { offset, size }) => {
                            return Ok(BlobRef { file: path.clone(), offset: *offset, length: *size })
                        }
                        Some(Member::Symlink(target)) => {
                            current = resolve_link(&current, target).ok_or_else(|| unsafe_path(target))?;
                        }
                        Some(Member::Hardlink(target)) => {
                            current = clean_path(target).ok_or_else(|| unsafe_path(target))?;
                        }
                        Some(Member::Other) | None => return Err(missing(&current)),
                    }
                }
                Err(unsafe_path(name))
            }
            Store::Dir { root } => {
                // Not there (or a path through a file) is "missing"; any
                // other failure (permissions, a link loop) keeps its cause.
                let io_err = |member: &str, source: io::Error| match source.raw_os_error() {
                    Some(libc::ENOENT) | Some(libc::ENOTDIR) => missing(member),
                    _ => ImageError::ReadMember { source_name: self.name(), member: member.to_string(), source },
                };
                let joined = root.join(&current);
                let meta = fs::symlink_metadata(&joined).map_err(|e| io_err(&current, e))?;
                let real = if meta.file_type().is_symlink() || current.contains('/') {
                    // Resolve links (in the file or a parent) and make sure
                    // the result is still inside the layout.
                    let real = fs::canonicalize(&joined).map_err(|e| io_err(&current, e))?;
                    let root_real = fs::canonicalize(root).map_err(|e| io_err(".", e))?;
                    if !real.starts_with(&root_real) {
                        return Err(unsafe_path(name));
                    }
                    real
                } else {
                    joined
                };
                let meta = fs::metadata(&real).map_err(|e| io_err(&current, e))?;
                if !meta.is_file() {
                    return Err(missing(&current));
                }
                Ok(BlobRef { file: real, offset: 0, length: meta.len() })
            }
        }
    }

    /// Reads a small file (JSON metadata), refusing more than `limit` bytes.
    pub fn read_small(&self, name: &str, what: &str, limit: u64) -> Result<Vec<u8>, ImageError> {
        let blob = self.locate(name, what)?;
        read_blob_bounded(&blob, limit).map_err(|e| match e {
            BoundedReadError::TooLarge(size) => {
                ImageError::MemberTooLarge { source_name: self.name(), member: name.to_string(), size, limit }
            }
            BoundedReadError::Io(source) => {
                ImageError::ReadMember { source_name: self.name(), member: name.to_string(), source }
            }
        })
    }
}

/// The [`SAMPLE_NAMES`] least names, sorted, and how many there were,
/// holding no more than that many at a time.
fn first_names(names: impl Iterator<Item = String>) -> (Vec<String>, usize) {
    let mut least = std::collections::BTreeSet::new();
    let mut total = 0;
    for name in names {
        total += 1;
        least.insert(name);
        if least.len() > SAMPLE_NAMES {
            least.pop_last();
        }
    }
    (least.into_iter().collect(), total)
}

pub enum BoundedReadError {
    TooLarge(u64),
    Io(io::Error),
}

/// All bytes of a blob, if it is at most `limit` bytes.
pub fn read_blob_bounded(blob: &BlobRef, limit: u64) -> Result<Vec<u8>, BoundedReadError> {
    if blob.length > limit {
        return Err(BoundedReadError::TooLarge(blob.length));
    }
    let file = File::open(&blob.file).map_err(BoundedReadError::Io)?;
    let mut buf = vec![0u8; blob.length as usize];
    file.read_exact_at(&mut buf, blob.offset).map_err(BoundedReadError::Io)?;
    Ok(buf)
}

/// The first bytes of a blob (for magic detection), fewer if it is short.
pub fn read_head(blob: &BlobRef, n: usize) -> io::Result<Vec<u8>> {
    let file = File::open(&blob.file)?;
    let want = (n as u64).min(blob.length) as usize;
    let mut buf = vec![0u8; want];
    file.read_exact_at(&mut buf, blob.offset)?;
    Ok(buf)
}

/// A reader of exactly a blob's bytes.
pub fn open_blob(blob: &BlobRef) -> io::Result<io::Take<File>> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(&blob.file)?;
    file.seek(SeekFrom::Start(blob.offset))?;
    Ok(file.take(blob.length))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn cleans_and_refuses_paths() {
        let cases = [
            ("manifest.json", Some("manifest.json")),
            ("./blobs//sha256/./ab", Some("blobs/sha256/ab")),
            ("abc/layer.tar", Some("abc/layer.tar")),
            ("/etc/passwd", None),
            ("../x", None),
            ("a/../b", None),
            ("", None),
            ("./", None),
        ];
        for (p, want) in cases {
            assert_eq!(clean_path(p).as_deref(), want, "{p}");
        }
    }

    #[test]
    fn resolves_symlinks_lexically_within_the_root() {
        let cases = [
            ("id/layer.tar", "../abc.tar", Some("abc.tar")),
            ("id/layer.tar", "other.tar", Some("id/other.tar")),
            ("a/b/c", "../../d", Some("d")),
            ("id/layer.tar", "../../etc/passwd", None),
            ("id/layer.tar", "/etc/passwd", None),
        ];
        for (link, target, want) in cases {
            assert_eq!(resolve_link(link, target).as_deref(), want, "{link} -> {target}");
        }
    }

    fn archive(build: impl FnOnce(&mut tar::Builder<&mut Vec<u8>>)) -> tempfile::NamedTempFile {
        let mut bytes = Vec::new();
        {
            let mut b = tar::Builder::new(&mut bytes);
            build(&mut b);
            b.finish().unwrap();
        }
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes).unwrap();
        f
    }

    fn add(b: &mut tar::Builder<&mut Vec<u8>>, name: &str, ty: tar::EntryType, data: &[u8], link: Option<&str>) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, data).unwrap();
    }

    #[test]
    fn locates_tar_members_through_links_and_refuses_escapes() {
        let f = archive(|b| {
            add(b, "./abc.tar", tar::EntryType::Regular, b"layer", None);
            add(b, "id/layer.tar", tar::EntryType::Symlink, b"", Some("../abc.tar"));
            add(b, "id2/layer.tar", tar::EntryType::Link, b"", Some("abc.tar"));
            add(b, "bad/layer.tar", tar::EntryType::Symlink, b"", Some("../../x"));
            add(b, "loop", tar::EntryType::Symlink, b"", Some("loop"));
            add(b, "manifest.json", tar::EntryType::Regular, b"[1,2]", None);
        });
        let store = Store::open_tar(f.path(), Path::new("img.tar"), None).unwrap();
        let direct = store.locate("abc.tar", "test").unwrap();
        assert_eq!((direct.offset, direct.length), (512, 5));
        assert_eq!(store.locate("id/layer.tar", "test").unwrap(), direct);
        assert_eq!(store.locate("./id2/layer.tar", "test").unwrap(), direct);
        assert_eq!(store.read_small("manifest.json", "test", 5).unwrap(), b"[1,2]");
        let errors = [
            (store.locate("bad/layer.tar", "test").unwrap_err(), "leaves the image"),
            (store.locate("loop", "test").unwrap_err(), "leaves the image"),
            (store.locate("../abc.tar", "test").unwrap_err(), "leaves the image"),
            (store.locate("nope", "test").unwrap_err(), "nope is missing"),
            (store.read_small("manifest.json", "test", 4).unwrap_err(), "more than the 4 allowed"),
        ];
        for (err, want) in errors {
            assert!(err.to_string().contains(want), "{err} lacks {want}");
        }
        assert!(store.has("manifest.json") && !store.has("index.json"));
    }

    #[test]
    fn the_index_of_member_names_is_bounded() {
        // 65 members named by 1 MiB PAX paths: past the names' budget,
        // though each name is within the tar guard's bound.
        let name = "d/".repeat((1 << 19) - 16) + "f";
        let f = archive(|b| {
            for i in 0..=(MAX_MEMBER_NAME_BYTES / name.len()) {
                b.append_pax_extensions([("path", format!("{i}/{name}").as_bytes())]).unwrap();
                add(b, "short", tar::EntryType::Regular, b"", None);
            }
        });
        let err = Store::open_tar(f.path(), f.path(), None).unwrap_err();
        assert!(matches!(err, ImageError::MemberNamesTooLarge { limit: MAX_MEMBER_NAME_BYTES, .. }), "{err}");
        assert!(err.to_string().ends_with("the names of its members take more than 67108864 bytes: refusing it as an image archive"));
    }

    #[test]
    fn sample_names_show_the_first_few_of_many() {
        let root = tempfile::tempdir().unwrap();
        for i in (0..20).rev() {
            fs::write(root.path().join(format!("n{i:02}")), b"").unwrap();
        }
        let store = Store::open_dir(root.path());
        assert_eq!(store.sample_names(), "n00, n01, n02, n03, n04, n05, n06, n07 … (20 entries)");
        assert_eq!(Store::open_dir(&root.path().join("none")).sample_names(), "nothing");
    }

    #[test]
    fn locates_dir_files_and_refuses_links_outside() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), b"s").unwrap();
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("blobs/sha256")).unwrap();
        fs::write(root.path().join("blobs/sha256/aa"), b"blob").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("blobs/sha256/bb")).unwrap();
        std::os::unix::fs::symlink("aa", root.path().join("blobs/sha256/cc")).unwrap();
        let store = Store::open_dir(root.path());
        let aa = store.locate("blobs/sha256/aa", "t").unwrap();
        assert_eq!((aa.offset, aa.length), (0, 4));
        assert_eq!(store.locate("blobs/sha256/cc", "t").unwrap().length, 4);
        assert!(store.locate("blobs/sha256/bb", "t").unwrap_err().to_string().contains("leaves the image"));
        assert!(store.locate("blobs/sha256", "t").unwrap_err().to_string().contains("missing"));
        assert!(store.locate("blobs/sha256/zz", "t").unwrap_err().to_string().contains("missing"));
        // A link loop is no "missing" file: the error says what happened.
        std::os::unix::fs::symlink("dd", root.path().join("blobs/sha256/ee")).unwrap();
        std::os::unix::fs::symlink("ee", root.path().join("blobs/sha256/dd")).unwrap();
        let err = store.locate("blobs/sha256/ee", "t").unwrap_err();
        assert!(matches!(err, ImageError::ReadMember { .. }), "{err}");
        let cause = std::error::Error::source(&err).unwrap();
        assert_eq!(cause.downcast_ref::<io::Error>().unwrap().raw_os_error(), Some(libc::ELOOP));
    }

    #[test]
    fn a_file_that_is_no_tar_is_named_plainly() {
        let dir = tempfile::tempdir().unwrap();
        let random: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let table: Vec<(&str, Vec<u8>, bool)> = vec![
            ("random", random, false),
            ("short", b"hello".to_vec(), false),
            ("empty", vec![], false),
            ("empty tar", vec![0; 1024], true),
        ];
        for (name, bytes, is_tar) in table {
            let p = dir.path().join(name);
            fs::write(&p, &bytes).unwrap();
            match Store::open_tar(&p, Path::new(name), None) {
                Ok(_) => assert!(is_tar, "{name} read as a tar"),
                Err(e) => {
                    assert!(!is_tar, "{name}: {e}");
                    assert!(matches!(&e, ImageError::NotATar { path, decompressed: None } if path == Path::new(name)), "{name}: {e}");
                }
            }
        }
        // A real header passes the check, GNU or ustar.
        let f = archive(|b| add(b, "a", tar::EntryType::Regular, b"x", None));
        let mut head = vec![0u8; 512];
        File::open(f.path()).unwrap().read_exact(&mut head).unwrap();
        assert!(starts_like_tar(&head));
        head[0] ^= 1;
        assert!(!starts_like_tar(&head));
        let e = Store::open_tar(&dir.path().join("random"), Path::new("img.tar.gz"), Some("gzip")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "img.tar.gz is not a container image: what it gzip-decompresses to is no tar archive (its first 512 bytes are no tar header); \
             give a docker-archive, an OCI archive or an OCI layout directory, as a tar or compressed with gzip or zstd"
        );
    }
}
