//! The tar the guest wrote (a new layer, or an export), checked against
//! the rules every runasroot engine writes by (FORMATS.md; guest-init's
//! `tarfmt`) before the host writes any of it anywhere.
//!
//! [`check`] is a pure function over a reader, so it can be fuzzed: it
//! reads exactly the announced length once (hashing it: the digest is the
//! new layer's diff_id), and holds in memory at most one PAX header
//! ([`MAX_PAX`]), the chain of open directories, the previous name and one
//! 16-byte key per earlier hard-link target, whatever the input.
//!
//! The rules, each refused with its own [`Violation`]:
//! * framing: a whole number of 512-byte blocks; every header's checksum
//!   and POSIX ustar magic; numeric fields octal (or base-256); each
//!   entry's data and zero padding inside the payload; two zero blocks end
//!   the archive exactly at the payload's end.
//! * entry types: regular file `0`, hard link `1`, symlink `2`, char `3`,
//!   block `4`, directory `5`, fifo `6`, and one PAX header `x` before an
//!   entry. Nothing else: no GNU long names (PAX is used), no global
//!   headers, sparse files or old-style `\0` types.
//! * PAX: at most [`MAX_PAX`] bytes; records `LEN KEY=VALUE\n` exactly;
//!   each key once, and only those runasroot writes: `path`, `linkpath`,
//!   `size`, `uid`, `gid`, `mtime` (decimal), `SCHILY.xattr.NAME` (not an
//!   overlayfs-private `trusted.overlay.*`).
//! * names: relative and normalised (no leading `/`, no `.`, `..` or empty
//!   component, no NUL), at most [`MAX_PATH`] bytes; a directory's name
//!   ends in `/`, no other does; the ustar name and link fields are the
//!   PAX `path`/`linkpath` cut to 100 bytes (a reader that ignores PAX sees
//!   the same name), no ustar prefix, empty user and group names.
//! * metadata: the mode holds permission bits only; owners are Linux ids
//!   (at most 4294967294); only regular files carry data; in a layer every
//!   mtime is the job's epoch.
//! * order (FORMATS.md "Order"): depth first; inside a directory its
//!   opaque marker, then `.wh.` names, then the rest, each group sorted
//!   bytewise; no name twice.
//! * tree: each entry's parent directory has an entry right before its
//!   contents, so no entry is under a symlink, a file or a missing
//!   directory; a hard link names an earlier file, symlink, device or
//!   fifo of the same tar (never a directory, a whiteout or a link).
//! * whiteouts: `.wh.NAME` and `.wh..wh..opq` are empty regular files with
//!   a valid name, and an export has none; a char device 0:0 (overlayfs'
//!   own whiteout) is refused.

use std::cmp::Ordering;
use std::collections::HashSet;
use std::fmt;
use std::io::{self, Read};

use runasroot_guest::tarfmt::{compare_siblings, MODE_BITS};
use runasroot_guest::whiteout::{self, Name, WhiteoutError};
use sha2::{Digest as _, Sha256};

use crate::image::Digest;
use crate::report::quote_bytes;

/// A tar block.
pub const BLOCK: u64 = 512;
/// Most bytes of PAX records before one entry: far more than a path of
/// [`MAX_PATH`], a link and the xattrs of one file (Linux caps the xattr
/// names of a file at 64 KiB, each value at 64 KiB).
pub const MAX_PAX: u64 = 1 << 20;
/// Longest entry name or link target: Linux's PATH_MAX. A longer name
/// cannot be created or extracted through a path by any consumer.
pub const MAX_PATH: usize = 4096;
/// Largest owner id: u32::MAX is chown's "leave unchanged", not an owner.
pub const MAX_ID: u64 = u32::MAX as u64 - 1;
/// Bytes hashed per read while skipping file data.
const DATA_BUF: usize = 1 << 20;

/// What the tar is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A new layer: whiteouts allowed, every mtime is `epoch`.
    Layer { epoch: u64 },
    /// An export (the flattened tree): no whiteouts, mtimes as they are.
    Export,
}

/// A payload that passed every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Entries, PAX headers not counted.
    pub entries: u64,
    /// sha256 of all `len` bytes.
    pub digest: Digest,
}

/// What an entry is, by its typeflag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryType {
    File,
    Hardlink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

impl EntryType {
    fn from_flag(flag: u8) -> Option<EntryType> {
        Some(match flag {
            b'0' => EntryType::File,
            b'1' => EntryType::Hardlink,
            b'2' => EntryType::Symlink,
            b'3' => EntryType::Char,
            b'4' => EntryType::Block,
            b'5' => EntryType::Dir,
            b'6' => EntryType::Fifo,
            _ => return None,
        })
    }

    fn describe(self) -> &'static str {
        match self {
            EntryType::File => "regular file",
            EntryType::Hardlink => "hard link",
            EntryType::Symlink => "symlink",
            EntryType::Char => "char device",
            EntryType::Block => "block device",
            EntryType::Dir => "directory",
            EntryType::Fifo => "fifo",
        }
    }
}

/// What is wrong with a name or link target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadName {
    Empty,
    Absolute,
    /// A `..` component.
    Climbs,
    /// A `.` component (`./a`, `a/./b`).
    Dot,
    /// `a//b`.
    EmptyComponent,
    Nul,
    TooLong(usize),
    /// A directory whose name lacks its trailing `/`.
    DirWithoutSlash,
    /// A trailing `/` on anything but a directory.
    SlashOnNonDir,
}

impl fmt::Display for BadName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadName::Empty => f.write_str("it is empty"),
            BadName::Absolute => f.write_str("it is absolute (starts with /)"),
            BadName::Climbs => f.write_str("it climbs out of the tree with `..`"),
            BadName::Dot => f.write_str("it has a `.` component (names carry no ./ prefix)"),
            BadName::EmptyComponent => f.write_str("it has an empty component (`//`)"),
            BadName::Nul => f.write_str("it contains a NUL byte"),
            BadName::TooLong(n) => write!(f, "it is {n} bytes long, more than PATH_MAX ({MAX_PATH})"),
            BadName::DirWithoutSlash => f.write_str("a directory's name must end in /"),
            BadName::SlashOnNonDir => f.write_str("only a directory's name ends in /"),
        }
    }
}

/// One broken rule (module docs).
#[derive(Debug, thiserror::Error)]
pub enum Violation {
    #[error("reading the payload failed")]
    Read(#[source] io::Error),
    #[error("the payload ends at byte {at}, before its announced length {len}")]
    Short { at: u64, len: u64 },
    #[error("its length {len} is not a whole number of 512-byte tar blocks")]
    Length { len: u64 },
    #[error("it ends without the two zero blocks that end a tar (the payload is cut short, or its announced length is too small)")]
    NoEnd,
    #[error("a zero block is followed by data: a tar ends with two zero blocks")]
    LoneZeroBlock,
    #[error("{bytes} bytes follow the end of the tar (the announced payload length is larger than the tar)")]
    Trailing { bytes: u64 },
    #[error("the header checksum does not match: not a tar header")]
    Checksum,
    #[error("not a POSIX ustar header (magic and version must be \"ustar\\0\" \"00\")")]
    Magic,
    #[error("its {field} field is not a number")]
    Field { field: &'static str },
    #[error("typeflag {flag} is not allowed: {what}")]
    TypeFlag { flag: String, what: &'static str },
    #[error("its data ({size} bytes) runs past the end of the payload ({len} bytes)")]
    PastEnd { size: u64, len: u64 },
    #[error("the padding after its data is not zero")]
    Padding,
    #[error("a PAX header of {size} bytes, more than the {MAX_PAX} allowed")]
    PaxTooLarge { size: u64 },
    #[error("a PAX header must have an empty name")]
    PaxName,
    #[error("two PAX headers in a row")]
    PaxTwice,
    #[error("a PAX header is not followed by the entry it describes")]
    PaxNotFollowed,
    #[error("a malformed PAX record: {reason}")]
    PaxRecord { reason: &'static str },
    #[error("PAX record {key} is not one runasroot writes (path, linkpath, size, uid, gid, mtime, SCHILY.xattr.*)")]
    PaxKey { key: String },
    #[error("PAX record {key} appears twice")]
    PaxDuplicate { key: String },
    #[error("PAX record {key} has an invalid value")]
    PaxValue { key: String },
    #[error("xattr {name} is overlayfs-private (trusted.overlay.*): it would steer the overlay mount of whoever uses the layer")]
    PrivateXattr { name: String },
    #[error("its name is invalid: {0}")]
    Name(BadName),
    #[error("its link target {target} is invalid: {problem}")]
    LinkName { target: String, problem: BadName },
    #[error("the ustar {field} field disagrees with the PAX {field} record (readers would see different names)")]
    NameField { field: &'static str },
    #[error("the ustar prefix field is set (runasroot writes long names as PAX records)")]
    Prefix,
    #[error("the user or group name field is set (owners are numeric only)")]
    OwnerName,
    #[error("a {what} has a link target")]
    LinkOnNonLink { what: &'static str },
    #[error("mode {mode:o} has bits beyond the permission bits 7777")]
    Mode { mode: u64 },
    #[error("{field} {value} is not a Linux owner id (at most {MAX_ID})")]
    Owner { field: &'static str, value: u64 },
    #[error("mtime {found} is not the layer's epoch {epoch}")]
    Mtime { found: u64, epoch: u64 },
    #[error("its size field says {header} bytes, its PAX size record {pax} (readers would split the tar differently)")]
    SizeField { header: u64, pax: u64 },
    #[error("a {what} with {size} bytes of data (only regular files have data)")]
    DataOnNonFile { what: &'static str, size: u64 },
    #[error("a char device 0:0 is overlayfs' whiteout, not a device a layer may hold")]
    WhiteoutDevice,
    #[error("it comes after {previous}, but sorts before it (depth first; in a directory: opaque marker, .wh. names, the rest, each bytewise)")]
    Order { previous: String },
    #[error("the same name appears twice")]
    Duplicate,
    #[error("its parent {parent} is a {what} in this tar: nothing may be written through it")]
    UnderNonDir { parent: String, what: &'static str },
    #[error("its parent directory {parent} has no entry right before its contents")]
    NoParent { parent: String },
    #[error("hard link to {target}, which is not an earlier file, symlink, device or fifo of this tar")]
    LinkTarget { target: String },
    #[error("an empty or NUL-containing symlink target")]
    SymlinkTarget,
    #[error("its symlink target is {len} bytes, more than PATH_MAX ({MAX_PATH})")]
    SymlinkTooLong { len: usize },
    #[error("an invalid whiteout name")]
    WhiteoutName(#[source] WhiteoutError),
    #[error("a whiteout must be an empty regular file")]
    WhiteoutKind,
    #[error("an export holds no whiteouts (.wh. names)")]
    WhiteoutInExport,
}

/// A broken rule and where: the entry (its index and name, when known) and
/// the byte offset of its header in the payload.
#[derive(Debug)]
pub struct PayloadError {
    /// Offset of the header (or of the problem) in the payload.
    pub at: u64,
    /// 1-based index and escaped, quoted name of the entry.
    pub entry: Option<(u64, String)>,
    pub violation: Violation,
}

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.entry {
            Some((n, name)) => write!(f, "entry {n} {name} (header at byte {}): {}", self.at, self.violation),
            None => write!(f, "at byte {}: {}", self.at, self.violation),
        }
    }
}

impl std::error::Error for PayloadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.violation)
    }
}

/// Checks the `len` bytes `input` yields against the rules of [`Kind`];
/// reads exactly `len` bytes (fewer is an error) and never more.
pub fn check(input: impl Read, len: u64, kind: Kind) -> Result<Checked, PayloadError> {
    let mut c = Checker::new(input, len, kind);
    c.run()?;
    Ok(Checked { entries: c.entries, digest: Digest::from_sha256(&c.hasher.finalize()) })
}

/// The PAX records before one entry, as read.
#[derive(Debug, Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<u64>,
}

/// A 512-byte ustar header, by field.
struct Header<'a>(&'a [u8; BLOCK as usize]);

impl Header<'_> {
    fn field(&self, from: usize, to: usize) -> &[u8] {
        &self.0[from..to]
    }
    fn name(&self) -> &[u8] {
        until_nul(self.field(0, 100))
    }
    fn linkname(&self) -> &[u8] {
        until_nul(self.field(157, 257))
    }
    fn typeflag(&self) -> u8 {
        self.0[156]
    }
    fn num(&self, field: &'static str) -> Result<u64, Violation> {
        let (from, to) = match field {
            "mode" => (100, 108),
            "uid" => (108, 116),
            "gid" => (116, 124),
            "size" => (124, 136),
            "mtime" => (136, 148),
            "checksum" => (148, 156),
            "devmajor" => (329, 337),
            "devminor" => (337, 345),
            _ => unreachable!("no header field {field}"),
        };
        parse_number(self.field(from, to)).ok_or(Violation::Field { field })
    }
    fn checksum_ok(&self) -> bool {
        let sum: u64 = self.0.iter().enumerate().map(|(i, &b)| if (148..156).contains(&i) { u64::from(b' ') } else { u64::from(b) }).sum();
        self.num("checksum").is_ok_and(|c| c == sum)
    }
    fn is_ustar(&self) -> bool {
        self.field(257, 263) == b"ustar\0" && self.field(263, 265) == b"00"
    }
}

fn until_nul(field: &[u8]) -> &[u8] {
    field.iter().position(|&b| b == 0).map_or(field, |n| &field[..n])
}

/// An octal field (NUL- or space-terminated, leading spaces allowed) or
/// a base-256 one (first byte 0x80, big-endian after it).
fn parse_number(field: &[u8]) -> Option<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        if field[0] != 0x80 {
            return None;
        }
        let mut v: u64 = 0;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let start = field.iter().position(|&b| b != b' ').unwrap_or(field.len());
    let end = field[start..].iter().position(|&b| b == 0 || b == b' ').map_or(field.len(), |n| start + n);
    let (digits, rest) = (&field[start..end], &field[end..]);
    if digits.is_empty() || !rest.iter().all(|&b| b == 0 || b == b' ') {
        return None;
    }
    digits.iter().try_fold(0u64, |v, &d| match d {
        b'0'..=b'7' => v.checked_mul(8)?.checked_add(u64::from(d - b'0')),
        _ => None,
    })
}

/// Checks a name or link target: relative, normalised, bounded. Returns
/// it without a directory's trailing `/`.
fn normalised(name: &[u8], dir: bool) -> Result<&[u8], BadName> {
    if name.is_empty() {
        return Err(BadName::Empty);
    }
    if name.len() > MAX_PATH {
        return Err(BadName::TooLong(name.len()));
    }
    if name.contains(&0) {
        return Err(BadName::Nul);
    }
    if name[0] == b'/' {
        return Err(BadName::Absolute);
    }
    let bare = match (dir, name.strip_suffix(b"/")) {
        (true, Some(b)) => b,
        (true, None) => return Err(BadName::DirWithoutSlash),
        (false, Some(_)) => return Err(BadName::SlashOnNonDir),
        (false, None) => name,
    };
    for c in bare.split(|&b| b == b'/') {
        match c {
            b"" => return Err(BadName::EmptyComponent),
            b"." => return Err(BadName::Dot),
            b".." => return Err(BadName::Climbs),
            _ => {}
        }
    }
    Ok(bare)
}

/// Whether `a` is a proper ancestor of `b` (both without trailing `/`).
fn is_ancestor(a: &[u8], b: &[u8]) -> bool {
    b.len() > a.len() && b.starts_with(a) && b[a.len()] == b'/'
}

/// The order of FORMATS.md between two names: component by component,
/// siblings by [`compare_siblings`], an ancestor before its contents.
fn compare_paths(a: &[u8], b: &[u8]) -> Ordering {
    let mut x = a.split(|&c| c == b'/');
    let mut y = b.split(|&c| c == b'/');
    loop {
        match (x.next(), y.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(p), Some(q)) => match compare_siblings(p, q) {
                Ordering::Equal => continue,
                other => return other,
            },
        }
    }
}

/// The key a hard-link target is remembered by: 16 bytes of its sha256,
/// so memory stays bounded by the entry count, not the names' lengths.
fn link_key(path: &[u8]) -> [u8; 16] {
    let d = Sha256::digest(path);
    d[..16].try_into().expect("16 of 32 bytes")
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Parses a PAX header's records (`LEN KEY=VALUE\n` each).
fn parse_pax(mut data: &[u8]) -> Result<Pax, Violation> {
    let bad = |reason| Violation::PaxRecord { reason };
    let mut pax = Pax::default();
    let mut seen: HashSet<String> = HashSet::new();
    while !data.is_empty() {
        let space = data.iter().take(21).position(|&b| b == b' ').ok_or(bad("no length before a space"))?;
        let len = parse_decimal(&data[..space]).ok_or(bad("the length is not a decimal number"))?;
        let len = usize::try_from(len).ok().filter(|&l| l > space + 1 && l <= data.len()).ok_or(bad("the length runs past the header"))?;
        let (record, rest) = data.split_at(len);
        data = rest;
        let body = record[space + 1..].strip_suffix(b"\n").ok_or(bad("a record does not end in a newline"))?;
        let eq = body.iter().position(|&b| b == b'=').ok_or(bad("a record has no `=`"))?;
        let key = std::str::from_utf8(&body[..eq]).map_err(|_| bad("a key is not UTF-8"))?;
        if key.is_empty() {
            return Err(bad("an empty key"));
        }
        let value = &body[eq + 1..];
        let printable = quote_bytes(key.as_bytes());
        if !seen.insert(key.to_string()) {
            return Err(Violation::PaxDuplicate { key: printable });
        }
        let number = || parse_decimal(value).ok_or_else(|| Violation::PaxValue { key: printable.clone() });
        match key {
            "path" => pax.path = Some(value.to_vec()),
            "linkpath" => pax.linkpath = Some(value.to_vec()),
            "size" => pax.size = Some(number()?),
            "uid" => pax.uid = Some(number()?),
            "gid" => pax.gid = Some(number()?),
            "mtime" => pax.mtime = Some(number()?),
            _ => match key.strip_prefix("SCHILY.xattr.") {
                Some(name) if name.is_empty() || name.contains('\0') => return Err(Violation::PaxValue { key: printable }),
                Some(name) if whiteout::is_overlay_private(name.as_bytes()) => {
                    return Err(Violation::PrivateXattr { name: quote_bytes(name.as_bytes()) })
                }
                Some(_) => {}
                None => return Err(Violation::PaxKey { key: printable }),
            },
        }
    }
    Ok(pax)
}

/// The walk's state.
struct Checker<R> {
    input: R,
    len: u64,
    kind: Kind,
    pos: u64,
    hasher: Sha256,
    entries: u64,
    /// The previous entry's name (no trailing `/`) and type.
    previous: Option<(Vec<u8>, EntryType)>,
    /// The directories whose contents may follow, outermost first.
    open_dirs: Vec<Vec<u8>>,
    /// [`link_key`]s of the entries a hard link may name.
    link_targets: HashSet<[u8; 16]>,
    buf: Vec<u8>,
}

impl<R: Read> Checker<R> {
    fn new(input: R, len: u64, kind: Kind) -> Self {
        Checker {
            input,
            len,
            kind,
            pos: 0,
            hasher: Sha256::new(),
            entries: 0,
            previous: None,
            open_dirs: Vec::new(),
            link_targets: HashSet::new(),
            buf: Vec::new(),
        }
    }

    fn fail(&self, at: u64, violation: Violation) -> PayloadError {
        PayloadError { at, entry: None, violation }
    }

    /// Reads `out.len()` bytes (never past `len`), hashing them.
    fn read_exact(&mut self, out: &mut [u8]) -> Result<(), PayloadError> {
        let mut filled = 0;
        while filled < out.len() {
            match self.input.read(&mut out[filled..]) {
                Ok(0) => return Err(self.fail(self.pos, Violation::Short { at: self.pos, len: self.len })),
                Ok(n) => {
                    filled += n;
                    self.pos += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(self.pos, Violation::Read(e))),
            }
        }
        self.hasher.update(&out[..]);
        Ok(())
    }

    fn read_block(&mut self) -> Result<[u8; BLOCK as usize], PayloadError> {
        let mut b = [0u8; BLOCK as usize];
        self.read_exact(&mut b)?;
        Ok(b)
    }

    /// Reads `size` bytes of data (kept when `keep`), then the zero
    /// padding to the next block.
    fn read_data(&mut self, size: u64, keep: bool) -> Result<Vec<u8>, Violation> {
        let padded = size.div_ceil(BLOCK).checked_mul(BLOCK);
        let Some(padded) = padded.filter(|&p| p <= self.len - self.pos) else {
            return Err(Violation::PastEnd { size, len: self.len });
        };
        let mut kept = Vec::new();
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(DATA_BUF, 0);
        let mut left = size;
        while left > 0 {
            let n = left.min(DATA_BUF as u64) as usize;
            self.read_exact(&mut buf[..n]).map_err(|e| e.violation)?;
            if keep {
                kept.extend_from_slice(&buf[..n]);
            }
            left -= n as u64;
        }
        let pad = (padded - size) as usize;
        self.read_exact(&mut buf[..pad]).map_err(|e| e.violation)?;
        let zero = buf[..pad].iter().all(|&b| b == 0);
        self.buf = buf;
        if zero {
            Ok(kept)
        } else {
            Err(Violation::Padding)
        }
    }

    fn run(&mut self) -> Result<(), PayloadError> {
        if self.len % BLOCK != 0 {
            return Err(self.fail(0, Violation::Length { len: self.len }));
        }
        let mut pax: Option<Pax> = None;
        loop {
            let at = self.pos;
            if at == self.len {
                return Err(self.fail(at, if pax.is_some() { Violation::PaxNotFollowed } else { Violation::NoEnd }));
            }
            let block = self.read_block()?;
            if block.iter().all(|&b| b == 0) {
                if pax.is_some() {
                    return Err(self.fail(at, Violation::PaxNotFollowed));
                }
                if self.pos == self.len {
                    return Err(self.fail(at, Violation::NoEnd));
                }
                if self.read_block()?.iter().any(|&b| b != 0) {
                    return Err(self.fail(at, Violation::LoneZeroBlock));
                }
                if self.pos != self.len {
                    return Err(self.fail(self.pos, Violation::Trailing { bytes: self.len - self.pos }));
                }
                return Ok(());
            }
            let h = Header(&block);
            if !h.checksum_ok() {
                return Err(self.fail(at, Violation::Checksum));
            }
            if !h.is_ustar() {
                return Err(self.fail(at, Violation::Magic));
            }
            if h.typeflag() == b'x' {
                if pax.is_some() {
                    return Err(self.fail(at, Violation::PaxTwice));
                }
                pax = Some(self.read_pax(&h).map_err(|v| self.fail(at, v))?);
                continue;
            }
            let Some(ty) = EntryType::from_flag(h.typeflag()) else {
                return Err(self.fail(at, refuse_flag(h.typeflag())));
            };
            let pax = pax.take().unwrap_or_default();
            self.entries += 1;
            let raw_name = pax.path.clone().unwrap_or_else(|| h.name().to_vec());
            let n = self.entries;
            self.entry(&h, ty, pax).map_err(|violation| PayloadError { at, entry: Some((n, quote_bytes(&raw_name))), violation })?;
        }
    }

    fn read_pax(&mut self, h: &Header<'_>) -> Result<Pax, Violation> {
        if !h.field(0, 100).iter().all(|&b| b == 0) {
            return Err(Violation::PaxName);
        }
        let size = h.num("size")?;
        if size > MAX_PAX {
            return Err(Violation::PaxTooLarge { size });
        }
        let data = self.read_data(size, true)?;
        parse_pax(&data)
    }

    /// Checks one entry (header and PAX records read) and reads its data.
    fn entry(&mut self, h: &Header<'_>, ty: EntryType, pax: Pax) -> Result<(), Violation> {
        let what = ty.describe();
        // Framing and the fixed fields.
        if h.field(345, 500).iter().any(|&b| b != 0) {
            return Err(Violation::Prefix);
        }
        if h.field(265, 329).iter().any(|&b| b != 0) {
            return Err(Violation::OwnerName);
        }
        let mode = h.num("mode")?;
        if mode & !u64::from(MODE_BITS) != 0 {
            return Err(Violation::Mode { mode });
        }
        for (field, pax_value) in [("uid", pax.uid), ("gid", pax.gid)] {
            let value = match pax_value {
                Some(v) => v,
                None => h.num(field)?,
            };
            if value > MAX_ID {
                return Err(Violation::Owner { field, value });
            }
        }
        let mtime = match pax.mtime {
            Some(m) => m,
            None => h.num("mtime")?,
        };
        if let Kind::Layer { epoch } = self.kind {
            if mtime != epoch {
                return Err(Violation::Mtime { found: mtime, epoch });
            }
        }
        // A reader that ignores PAX must frame the archive the same way.
        let size = h.num("size")?;
        if pax.size.is_some_and(|s| s != size) {
            return Err(Violation::SizeField { header: size, pax: pax.size.unwrap_or_default() });
        }
        if ty != EntryType::File && size != 0 {
            return Err(Violation::DataOnNonFile { what, size });
        }

        // The name.
        let raw = pax.path.as_deref().unwrap_or(h.name());
        if pax.path.is_some() && h.name() != until_nul(&raw[..raw.len().min(100)]) {
            return Err(Violation::NameField { field: "path" });
        }
        let path = normalised(raw, ty == EntryType::Dir).map_err(Violation::Name)?.to_vec();
        let (parent, last) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], &path[..]),
        };

        // The link target.
        let link = pax.linkpath.as_deref().unwrap_or(h.linkname());
        if pax.linkpath.is_some() && h.linkname() != until_nul(&link[..link.len().min(100)]) {
            return Err(Violation::NameField { field: "linkpath" });
        }
        match ty {
            EntryType::Hardlink | EntryType::Symlink => {}
            _ if !link.is_empty() || pax.linkpath.is_some() => return Err(Violation::LinkOnNonLink { what }),
            _ => {}
        }

        // Whiteouts.
        let marker = match whiteout::classify(last).map_err(Violation::WhiteoutName)? {
            Name::Plain(_) => false,
            Name::Whiteout(_) | Name::Opaque if self.kind == Kind::Export => return Err(Violation::WhiteoutInExport),
            Name::Whiteout(_) | Name::Opaque if ty != EntryType::File || size != 0 => return Err(Violation::WhiteoutKind),
            Name::Whiteout(_) | Name::Opaque => true,
        };

        // Order, then the tree.
        if let Some((prev, prev_ty)) = &self.previous {
            match compare_paths(prev, &path) {
                Ordering::Less => {}
                Ordering::Equal => return Err(Violation::Duplicate),
                Ordering::Greater => return Err(Violation::Order { previous: quote_bytes(prev) }),
            }
            if prev.as_slice() == parent && *prev_ty != EntryType::Dir {
                return Err(Violation::UnderNonDir { parent: quote_bytes(parent), what: prev_ty.describe() });
            }
        }
        while self.open_dirs.last().is_some_and(|d| !is_ancestor(d, &path)) {
            self.open_dirs.pop();
        }
        let parent_open = match self.open_dirs.last() {
            Some(d) => d.as_slice() == parent,
            None => parent.is_empty(),
        };
        if !parent_open {
            return Err(Violation::NoParent { parent: quote_bytes(parent) });
        }

        // What each type must hold.
        match ty {
            EntryType::Hardlink => {
                let target = normalised(link, false).map_err(|problem| Violation::LinkName { target: quote_bytes(link), problem })?;
                if !self.link_targets.contains(&link_key(target)) {
                    return Err(Violation::LinkTarget { target: quote_bytes(target) });
                }
            }
            EntryType::Symlink => {
                if link.is_empty() || link.contains(&0) {
                    return Err(Violation::SymlinkTarget);
                }
                if link.len() > MAX_PATH {
                    return Err(Violation::SymlinkTooLong { len: link.len() });
                }
            }
            EntryType::Char | EntryType::Block => {
                let major = h.num("devmajor")?;
                let minor = h.num("devminor")?;
                if ty == EntryType::Char && major == 0 && minor == 0 {
                    return Err(Violation::WhiteoutDevice);
                }
            }
            EntryType::File | EntryType::Dir | EntryType::Fifo => {}
        }
        if !marker && !matches!(ty, EntryType::Dir | EntryType::Hardlink) {
            self.link_targets.insert(link_key(&path));
        }
        if ty == EntryType::Dir {
            self.open_dirs.push(path.clone());
        }
        self.previous = Some((path, ty));
        if size > 0 {
            self.read_data(size, false)?;
        }
        Ok(())
    }
}

/// Why a typeflag is refused.
fn refuse_flag(flag: u8) -> Violation {
    let what = match flag {
        b'\0' => "old-style regular file (runasroot writes typeflag 0)",
        b'7' => "contiguous file",
        b'g' => "PAX global header",
        b'L' | b'K' => "GNU long name record (runasroot writes PAX records)",
        b'S' => "GNU sparse file",
        b'D' | b'M' | b'N' | b'V' => "GNU extension",
        _ => "unknown entry type",
    };
    Violation::TypeFlag { flag: quote_bytes(&[flag]).replace('"', "'"), what }
}

#[cfg(test)]
// Test tables spell out whole rows on purpose.
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;
    use runasroot_guest::tarfmt::{Entry, Kind as TKind, TarWriter};

    /// The epoch of every layer in these tests.
    const EPOCH: u64 = 1;

    /// A ustar header with every field settable, checksummed on output.
    #[derive(Clone)]
    struct H {
        name: Vec<u8>,
        flag: u8,
        mode: u64,
        uid: u64,
        size: u64,
        mtime: u64,
        link: Vec<u8>,
        dev: (u64, u64),
        magic: &'static [u8; 8],
        uname: &'static [u8],
        prefix: &'static [u8],
        raw_mode: Option<&'static [u8; 8]>,
        bad_checksum: bool,
    }

    fn h(name: &str, flag: u8) -> H {
        H {
            name: name.as_bytes().to_vec(),
            flag,
            mode: 0o644,
            uid: 0,
            size: 0,
            mtime: EPOCH,
            link: vec![],
            dev: (0, 0),
            magic: b"ustar\x0000",
            uname: b"",
            prefix: b"",
            raw_mode: None,
            bad_checksum: false,
        }
    }

    fn octal(field: &mut [u8], v: u64) {
        let n = field.len() - 1;
        let s = format!("{v:0n$o}");
        field[..n].copy_from_slice(s.as_bytes());
        field[n] = 0;
    }

    impl H {
        fn size(mut self, n: u64) -> H {
            self.size = n;
            self
        }
        fn link(mut self, l: &str) -> H {
            self.link = l.as_bytes().to_vec();
            self
        }
        fn block(&self) -> Vec<u8> {
            let mut b = vec![0u8; 512];
            let n = self.name.len().min(100);
            b[..n].copy_from_slice(&self.name[..n]);
            match self.raw_mode {
                Some(raw) => b[100..108].copy_from_slice(raw),
                None => octal(&mut b[100..108], self.mode),
            }
            octal(&mut b[108..116], self.uid);
            octal(&mut b[116..124], 0);
            octal(&mut b[124..136], self.size);
            octal(&mut b[136..148], self.mtime);
            b[156] = self.flag;
            let l = self.link.len().min(100);
            b[157..157 + l].copy_from_slice(&self.link[..l]);
            b[257..265].copy_from_slice(self.magic);
            b[265..265 + self.uname.len()].copy_from_slice(self.uname);
            if matches!(self.flag, b'3' | b'4') {
                octal(&mut b[329..337], self.dev.0);
                octal(&mut b[337..345], self.dev.1);
            }
            b[345..345 + self.prefix.len()].copy_from_slice(self.prefix);
            b[148..156].fill(b' ');
            let sum: u64 = b.iter().map(|&x| u64::from(x)).sum();
            octal(&mut b[148..156], sum + u64::from(self.bad_checksum));
            b
        }
        /// The header, `data` and its padding.
        fn with(&self, data: &[u8]) -> Vec<u8> {
            let mut out = self.block();
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
            out
        }
        fn bare(&self) -> Vec<u8> {
            self.with(&[])
        }
    }

    /// One PAX record, as `tar::Builder::append_pax_extensions` writes it.
    fn rec(key: &str, value: &[u8]) -> Vec<u8> {
        let rest = 3 + key.len() + value.len();
        let mut len = rest + 1;
        while len.to_string().len() + rest != len {
            len += 1;
        }
        let mut r = format!("{len} {key}=").into_bytes();
        r.extend_from_slice(value);
        r.push(b'\n');
        r
    }

    /// A PAX header ('x', empty name) holding `records`.
    fn pax(records: &[Vec<u8>]) -> Vec<u8> {
        let data = records.concat();
        let mut x = h("", b'x').size(data.len() as u64);
        x.mode = 0;
        x.with(&data)
    }

    /// Entries followed by the two zero blocks.
    fn tar(parts: &[Vec<u8>]) -> Vec<u8> {
        let mut out = parts.concat();
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn entry(path: &str, kind: TKind) -> Entry {
        Entry { path: path.as_bytes().to_vec(), kind, mode: 0o755, uid: 0, gid: 0, mtime: EPOCH, xattrs: vec![] }
    }

    /// A layer as the guest's packer writes it (through the same writer):
    /// every kind of entry, whiteouts, an opaque dir, PAX records.
    fn guest_layer(kind: Kind) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        let long = format!("data/{}", "long-name-".repeat(20));
        let mut capped = entry("data/cap", TKind::File { size: 3 });
        capped.xattrs = vec![(b"security.capability".to_vec(), vec![1, 0, 0, 2]), (b"user.x".to_vec(), b"".to_vec())];
        capped.uid = 1 << 30;
        let mut entries: Vec<(Entry, &[u8])> = vec![
            (entry(".wh.gone", TKind::File { size: 0 }), b""),
            (entry("data", TKind::Dir), b""),
            (entry("data/.wh..wh..opq", TKind::File { size: 0 }), b""),
            (entry("data/.wh.old", TKind::File { size: 0 }), b""),
            (entry("data/bin", TKind::Dir), b""),
            (entry("data/bin/sh", TKind::Symlink { target: b"/bin/busybox".to_vec() }), b""),
            (capped, b"abc"),
            (entry("data/dev", TKind::Char { major: 1, minor: 3 }), b""),
            (entry("data/disk", TKind::Block { major: 8, minor: 0 }), b""),
            (entry("data/fifo", TKind::Fifo), b""),
            (entry("data/link", TKind::Hardlink { target: b"data/cap".to_vec() }), b""),
            (entry(&long, TKind::File { size: 1000 }), &[7u8; 1000]),
            (entry("data/z\u{e9}", TKind::Hardlink { target: long.as_bytes().to_vec() }), b""),
            (entry("etc", TKind::Dir), b""),
            (entry("etc/passwd", TKind::File { size: 5 }), b"root\n"),
        ];
        if kind == Kind::Export {
            entries.retain(|(e, _)| !e.path.split(|&b| b == b'/').any(|c| c.starts_with(b".wh.")));
        }
        for (e, data) in entries {
            w.append(&e, &mut &data[..]).unwrap();
        }
        w.finish().unwrap()
    }

    fn run(bytes: &[u8], kind: Kind) -> Result<u64, String> {
        check(bytes, bytes.len() as u64, kind).map(|c| c.entries).map_err(|e| e.to_string())
    }

    const LAYER: Kind = Kind::Layer { epoch: EPOCH };

    #[test]
    fn what_the_guest_writes_passes_and_is_hashed() {
        for kind in [LAYER, Kind::Export] {
            let bytes = guest_layer(kind);
            let checked = check(&bytes[..], bytes.len() as u64, kind).unwrap();
            assert_eq!(checked.digest, Digest::from_sha256(&Sha256::digest(&bytes)));
            assert_eq!(checked.entries, if kind == LAYER { 15 } else { 12 });
        }
        assert_eq!(run(&[0u8; 1024], LAYER), Ok(0), "a script that changes nothing: an empty tar");
        // Base-256 sizes (files of 8 GiB and more) and octal fields padded
        // with spaces read as numbers.
        assert_eq!(parse_number(&[0x80, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]), Some(1 << 33));
        assert_eq!(parse_number(b"  0755 \0"), Some(0o755));
        assert_eq!(parse_number(b"0000000\0"), Some(0));
        for bad in [&b"\0\0\0\0\0\0\0\0"[..], b"12 3\0", b"0009\0", &[0x81, 0, 0, 0], &[0x80, 1, 0, 0, 0, 0, 0, 0, 0, 0]] {
            assert_eq!(parse_number(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn it_reads_exactly_the_announced_length() {
        let mut bytes = guest_layer(LAYER);
        let len = bytes.len() as u64;
        bytes.extend_from_slice(b"whatever follows on the disk is not read");
        let mut input = &bytes[..];
        check(&mut input, len, LAYER).unwrap();
        assert_eq!(input, b"whatever follows on the disk is not read");
    }

    /// Every rule refused, each with the whole message a user sees.
    #[test]
    fn every_rule_is_enforced() {
        let d = |n: &str| h(n, b'5').bare();
        let f = |n: &str| h(n, b'0').bare();
        let sym = |n: &str, t: &str| h(n, b'2').link(t).bare();
        let hard = |n: &str, t: &str| h(n, b'1').link(t).bare();
        let long_path = "a/".repeat(2100) + "f";
        let mut short = tar(&[f("a")]);
        short.truncate(1024);
        let padded = {
            let mut e = h("f", b'0').size(3).with(b"abc");
            e[512 + 3] = 1;
            tar(&[e])
        };
        let table: Vec<(&str, Vec<u8>, u64, Kind, &str)> = vec![
            // Framing.
            ("length", vec![0u8; 1000], 1000, LAYER, "at byte 0: its length 1000 is not a whole number of 512-byte tar blocks"),
            ("short input", short.clone(), 2048, LAYER, "at byte 1024: the payload ends at byte 1024, before its announced length 2048"),
            ("no end", f("a"), 512, LAYER, "at byte 512: it ends without the two zero blocks that end a tar (the payload is cut short, or its announced length is too small)"),
            ("one zero block", [f("a"), vec![0; 512]].concat(), 1024, LAYER, "at byte 512: it ends without the two zero blocks that end a tar (the payload is cut short, or its announced length is too small)"),
            ("lone zero block", [vec![0; 512], f("a"), vec![0; 1024]].concat(), 2048, LAYER, "at byte 0: a zero block is followed by data: a tar ends with two zero blocks"),
            ("trailing", [tar(&[f("a")]), vec![0; 1024]].concat(), 2560, LAYER, "at byte 1536: 1024 bytes follow the end of the tar (the announced payload length is larger than the tar)"),
            ("checksum", tar(&[{ let mut x = h("a", b'0'); x.bad_checksum = true; x.bare() }]), 1536, LAYER, "at byte 0: the header checksum does not match: not a tar header"),
            ("gnu magic", tar(&[{ let mut x = h("a", b'0'); x.magic = b"ustar  \0"; x.bare() }]), 1536, LAYER, "at byte 0: not a POSIX ustar header (magic and version must be \"ustar\\0\" \"00\")"),
            ("mode field", tar(&[{ let mut x = h("a", b'0'); x.raw_mode = Some(b"rwxr-xr\0"); x.bare() }]), 1536, LAYER, "entry 1 \"a\" (header at byte 0): its mode field is not a number"),
            ("past end", tar(&[h("big", b'0').size(1 << 20).bare()]), 1536, LAYER, "entry 1 \"big\" (header at byte 0): its data (1048576 bytes) runs past the end of the payload (1536 bytes)"),
            ("huge size", tar(&[{ let mut b = h("big", b'0').bare(); b[124..136].copy_from_slice(&[0x80, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]); b[148..156].fill(b' '); let sum: u64 = b.iter().map(|&x| u64::from(x)).sum(); octal(&mut b[148..156], sum); b }]), 1536, LAYER, "entry 1 \"big\" (header at byte 0): its data (18446744073709551615 bytes) runs past the end of the payload (1536 bytes)"),
            ("padding", padded.clone(), 2048, LAYER, "entry 1 \"f\" (header at byte 0): the padding after its data is not zero"),
            // Entry types.
            ("gnu long name", tar(&[h("././@LongLink", b'L').size(5).with(b"x/../")]), 2048, LAYER, "at byte 0: typeflag 'L' is not allowed: GNU long name record (runasroot writes PAX records)"),
            ("global pax", tar(&[h("g", b'g').bare()]), 1536, LAYER, "at byte 0: typeflag 'g' is not allowed: PAX global header"),
            ("old regular", tar(&[h("a", 0).bare()]), 1536, LAYER, "at byte 0: typeflag '\\0' is not allowed: old-style regular file (runasroot writes typeflag 0)"),
            ("sparse", tar(&[h("a", b'S').bare()]), 1536, LAYER, "at byte 0: typeflag 'S' is not allowed: GNU sparse file"),
            ("unknown", tar(&[h("a", b'Z').bare()]), 1536, LAYER, "at byte 0: typeflag 'Z' is not allowed: unknown entry type"),
            // PAX.
            ("pax too large", tar(&[h("", b'x').size(MAX_PAX + 1).bare()]), 1536, LAYER, "at byte 0: a PAX header of 1048577 bytes, more than the 1048576 allowed"),
            ("pax name", tar(&[{ let mut x = h("PaxHeaders/a", b'x').size(11); x.mode = 0; x.with(b"11 uid=10\n\0") }, f("a")]), 2560, LAYER, "at byte 0: a PAX header must have an empty name"),
            ("pax twice", tar(&[pax(&[rec("uid", b"1")]), pax(&[rec("gid", b"1")]), f("a")]), 4096, LAYER, "at byte 1024: two PAX headers in a row"),
            ("pax then end", tar(&[pax(&[rec("uid", b"1")])]), 2048, LAYER, "at byte 1024: a PAX header is not followed by the entry it describes"),
            ("pax length", tar(&[pax(&[b"99 uid=1\n".to_vec()]), f("a")]), 2560, LAYER, "at byte 0: a malformed PAX record: the length runs past the header"),
            ("pax no newline", tar(&[pax(&[b"9 uid=12 ".to_vec()]), f("a")]), 2560, LAYER, "at byte 0: a malformed PAX record: a record does not end in a newline"),
            ("pax no equals", tar(&[pax(&[b"8 uidxx\n".to_vec()]), f("a")]), 2560, LAYER, "at byte 0: a malformed PAX record: a record has no `=`"),
            ("pax empty key", tar(&[pax(&[b"6 =xx\n".to_vec()]), f("a")]), 2560, LAYER, "at byte 0: a malformed PAX record: an empty key"),
            ("pax unknown key", tar(&[pax(&[rec("GNU.sparse.size", b"1")]), f("a")]), 2560, LAYER, "at byte 0: PAX record \"GNU.sparse.size\" is not one runasroot writes (path, linkpath, size, uid, gid, mtime, SCHILY.xattr.*)"),
            ("pax atime", tar(&[pax(&[rec("atime", b"1")]), f("a")]), 2560, LAYER, "at byte 0: PAX record \"atime\" is not one runasroot writes (path, linkpath, size, uid, gid, mtime, SCHILY.xattr.*)"),
            ("pax duplicate", tar(&[pax(&[rec("path", b"a"), rec("path", b"../b")]), f("a")]), 2560, LAYER, "at byte 0: PAX record \"path\" appears twice"),
            ("pax value", tar(&[pax(&[rec("uid", b"-1")]), f("a")]), 2560, LAYER, "at byte 0: PAX record \"uid\" has an invalid value"),
            ("pax overlay xattr", tar(&[pax(&[rec("SCHILY.xattr.trusted.overlay.redirect", b"/etc")]), d("a/")]), 2560, LAYER, "at byte 0: xattr \"trusted.overlay.redirect\" is overlayfs-private (trusted.overlay.*): it would steer the overlay mount of whoever uses the layer"),
            // Names.
            ("absolute", tar(&[f("/etc/passwd")]), 1536, LAYER, "entry 1 \"/etc/passwd\" (header at byte 0): its name is invalid: it is absolute (starts with /)"),
            ("dotdot", tar(&[f("../escape")]), 1536, LAYER, "entry 1 \"../escape\" (header at byte 0): its name is invalid: it climbs out of the tree with `..`"),
            ("inner dotdot", tar(&[d("a/"), f("a/../../x")]), 2048, LAYER, "entry 2 \"a/../../x\" (header at byte 512): its name is invalid: it climbs out of the tree with `..`"),
            ("dot prefix", tar(&[f("./a")]), 1536, LAYER, "entry 1 \"./a\" (header at byte 0): its name is invalid: it has a `.` component (names carry no ./ prefix)"),
            ("empty component", tar(&[d("a/"), f("a//b")]), 2048, LAYER, "entry 2 \"a//b\" (header at byte 512): its name is invalid: it has an empty component (`//`)"),
            ("empty name", tar(&[f("")]), 1536, LAYER, "entry 1 \"\" (header at byte 0): its name is invalid: it is empty"),
            ("nul in pax path", tar(&[pax(&[rec("path", b"a\0b")]), f("a")]), 2560, LAYER, "entry 1 \"a\\0b\" (header at byte 1024): its name is invalid: it contains a NUL byte"),
            ("too long", tar(&[pax(&[rec("path", long_path.as_bytes())]), { let mut x = h("", b'0'); x.name = long_path.as_bytes()[..100].to_vec(); x.bare() }]), (long_path.len() as u64).div_ceil(512) * 512 + 2048 + 512, LAYER, ""),
            ("dir without slash", tar(&[d("a")]), 1536, LAYER, "entry 1 \"a\" (header at byte 0): its name is invalid: a directory's name must end in /"),
            ("file with slash", tar(&[f("a/")]), 1536, LAYER, "entry 1 \"a/\" (header at byte 0): its name is invalid: only a directory's name ends in /"),
            ("name field lies", tar(&[pax(&[rec("path", b"etc/passwd")]), f("harmless")]), 2560, LAYER, "entry 1 \"etc/passwd\" (header at byte 1024): the ustar path field disagrees with the PAX path record (readers would see different names)"),
            ("link field lies", tar(&[f("t"), pax(&[rec("linkpath", b"t")]), hard("l", "../../etc/shadow")]), 3072, LAYER, "entry 2 \"l\" (header at byte 1536): the ustar linkpath field disagrees with the PAX linkpath record (readers would see different names)"),
            ("prefix", tar(&[{ let mut x = h("a", b'0'); x.prefix = b"/etc"; x.bare() }]), 1536, LAYER, "entry 1 \"a\" (header at byte 0): the ustar prefix field is set (runasroot writes long names as PAX records)"),
            ("uname", tar(&[{ let mut x = h("a", b'0'); x.uname = b"root"; x.bare() }]), 1536, LAYER, "entry 1 \"a\" (header at byte 0): the user or group name field is set (owners are numeric only)"),
            ("link on file", tar(&[h("a", b'0').link("b").bare()]), 1536, LAYER, "entry 1 \"a\" (header at byte 0): a regular file has a link target"),
            // Metadata.
            ("mode type bits", tar(&[{ let mut x = h("a", b'0'); x.mode = 0o100644; x.bare() }]), 1536, LAYER, "entry 1 \"a\" (header at byte 0): mode 100644 has bits beyond the permission bits 7777"),
            ("owner", tar(&[pax(&[rec("uid", b"4294967295")]), f("a")]), 2560, LAYER, "entry 1 \"a\" (header at byte 1024): uid 4294967295 is not a Linux owner id (at most 4294967294)"),
            ("mtime", tar(&[{ let mut x = h("a", b'0'); x.mtime = 1_700_000_000; x.bare() }]), 1536, LAYER, "entry 1 \"a\" (header at byte 0): mtime 1700000000 is not the layer's epoch 1"),
            ("pax mtime", tar(&[pax(&[rec("mtime", b"5")]), f("a")]), 2560, LAYER, "entry 1 \"a\" (header at byte 1024): mtime 5 is not the layer's epoch 1"),
            ("size field lies", tar(&[pax(&[rec("size", b"0")]), h("a", b'0').size(3).with(b"abc")]), 3072, LAYER, "entry 1 \"a\" (header at byte 1024): its size field says 3 bytes, its PAX size record 0 (readers would split the tar differently)"),
            ("data on dir", tar(&[h("a/", b'5').size(3).with(b"abc")]), 2048, LAYER, "entry 1 \"a/\" (header at byte 0): a directory with 3 bytes of data (only regular files have data)"),
            ("whiteout device", tar(&[h("a", b'3').bare()]), 1536, LAYER, "entry 1 \"a\" (header at byte 0): a char device 0:0 is overlayfs' whiteout, not a device a layer may hold"),
            // Order.
            ("unsorted", tar(&[f("b"), f("a")]), 2048, LAYER, "entry 2 \"a\" (header at byte 512): it comes after \"b\", but sorts before it (depth first; in a directory: opaque marker, .wh. names, the rest, each bytewise)"),
            ("whiteout after plain", tar(&[f("a"), f(".wh.b")]), 2048, LAYER, "entry 2 \".wh.b\" (header at byte 512): it comes after \"a\", but sorts before it (depth first; in a directory: opaque marker, .wh. names, the rest, each bytewise)"),
            ("opaque after whiteout", tar(&[d("d/"), f("d/.wh.a"), f("d/.wh..wh..opq")]), 2560, LAYER, "entry 3 \"d/.wh..wh..opq\" (header at byte 1024): it comes after \"d/.wh.a\", but sorts before it (depth first; in a directory: opaque marker, .wh. names, the rest, each bytewise)"),
            ("contents after sibling", tar(&[d("a/"), f("b"), f("a/c")]), 2560, LAYER, "entry 3 \"a/c\" (header at byte 1024): it comes after \"b\", but sorts before it (depth first; in a directory: opaque marker, .wh. names, the rest, each bytewise)"),
            ("duplicate", tar(&[f("a"), f("a")]), 2048, LAYER, "entry 2 \"a\" (header at byte 512): the same name appears twice"),
            ("dir twice", tar(&[d("a/"), f("a/b"), d("a/")]), 2560, LAYER, "entry 3 \"a/\" (header at byte 1024): it comes after \"a/b\", but sorts before it (depth first; in a directory: opaque marker, .wh. names, the rest, each bytewise)"),
            // The tree.
            ("under symlink", tar(&[sym("a", "/etc"), f("a/passwd")]), 2048, LAYER, "entry 2 \"a/passwd\" (header at byte 512): its parent \"a\" is a symlink in this tar: nothing may be written through it"),
            ("under file", tar(&[f("a"), d("a/b/")]), 2048, LAYER, "entry 2 \"a/b/\" (header at byte 512): its parent \"a\" is a regular file in this tar: nothing may be written through it"),
            ("under whiteout", tar(&[f(".wh.a"), f(".wh.a/x")]), 2048, LAYER, "entry 2 \".wh.a/x\" (header at byte 512): its parent \".wh.a\" is a regular file in this tar: nothing may be written through it"),
            ("no parent", tar(&[f("etc/passwd")]), 1536, LAYER, "entry 1 \"etc/passwd\" (header at byte 0): its parent directory \"etc\" has no entry right before its contents"),
            ("no grandparent", tar(&[d("a/"), d("a/b/c/")]), 2048, LAYER, "entry 2 \"a/b/c/\" (header at byte 512): its parent directory \"a/b\" has no entry right before its contents"),
            ("link missing", tar(&[hard("l", "etc/shadow")]), 1536, LAYER, "entry 1 \"l\" (header at byte 0): hard link to \"etc/shadow\", which is not an earlier file, symlink, device or fifo of this tar"),
            ("link forward", tar(&[hard("a", "b"), f("b")]), 2048, LAYER, "entry 1 \"a\" (header at byte 0): hard link to \"b\", which is not an earlier file, symlink, device or fifo of this tar"),
            ("link to dir", tar(&[d("d/"), hard("l", "d")]), 2048, LAYER, "entry 2 \"l\" (header at byte 512): hard link to \"d\", which is not an earlier file, symlink, device or fifo of this tar"),
            ("link to link", tar(&[f("a"), hard("b", "a"), hard("c", "b")]), 2560, LAYER, "entry 3 \"c\" (header at byte 1024): hard link to \"b\", which is not an earlier file, symlink, device or fifo of this tar"),
            ("link to whiteout", tar(&[f(".wh.a"), hard("b", ".wh.a")]), 2048, LAYER, "entry 2 \"b\" (header at byte 512): hard link to \".wh.a\", which is not an earlier file, symlink, device or fifo of this tar"),
            ("link outside", tar(&[f("a"), hard("b", "../a")]), 2048, LAYER, "entry 2 \"b\" (header at byte 512): its link target \"../a\" is invalid: it climbs out of the tree with `..`"),
            ("link absolute", tar(&[f("a"), hard("b", "/a")]), 2048, LAYER, "entry 2 \"b\" (header at byte 512): its link target \"/a\" is invalid: it is absolute (starts with /)"),
            ("empty symlink", tar(&[sym("a", "")]), 1536, LAYER, "entry 1 \"a\" (header at byte 0): an empty or NUL-containing symlink target"),
            ("long symlink", tar(&[pax(&[rec("linkpath", "x".repeat(5000).as_bytes())]), h("a", b'2').link(&"x".repeat(100)).bare()]), 7168, LAYER, "entry 1 \"a\" (header at byte 5632): its symlink target is 5000 bytes, more than PATH_MAX (4096)"),
            // Whiteouts.
            ("bare whiteout", tar(&[f(".wh.")]), 1536, LAYER, "entry 1 \".wh.\" (header at byte 0): an invalid whiteout name"),
            ("whiteout dir", tar(&[d(".wh.a/")]), 1536, LAYER, "entry 1 \".wh.a/\" (header at byte 0): a whiteout must be an empty regular file"),
            ("whiteout data", tar(&[h(".wh.a", b'0').size(1).with(b"x")]), 2048, LAYER, "entry 1 \".wh.a\" (header at byte 0): a whiteout must be an empty regular file"),
            ("whiteout in export", tar(&[f(".wh.a")]), 1536, Kind::Export, "entry 1 \".wh.a\" (header at byte 0): an export holds no whiteouts (.wh. names)"),
            ("opaque in export", tar(&[d("d/"), f("d/.wh..wh..opq")]), 2048, Kind::Export, "entry 2 \"d/.wh..wh..opq\" (header at byte 512): an export holds no whiteouts (.wh. names)"),
        ];
        let mut failures = Vec::new();
        for (case, bytes, len, kind, want) in table {
            let got = check(&bytes[..], len, kind).map(|c| c.entries).map_err(|e| e.to_string());
            let ok = match (&got, case) {
                // Its name is too long to spell out here: the start will do.
                (Err(e), "too long") => e.starts_with("entry 1 \"a/a/") && e.ends_with("its name is invalid: it is 4201 bytes long, more than PATH_MAX (4096)"),
                (Err(e), _) => e == want,
                (Ok(_), _) => false,
            };
            if !ok {
                failures.push(format!("{case}: got {got:?}\n  want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    /// A smoke test until the fuzz target exists: damaged headers (with a
    /// valid checksum, so the check goes past framing) never panic, and
    /// whatever passes still obeys the order rule's strictness.
    #[test]
    fn damaged_headers_never_panic() {
        let clean = guest_layer(LAYER);
        let mut headers = Vec::new();
        let mut pos = 0usize;
        while clean[pos..pos + 512].iter().any(|&b| b != 0) {
            headers.push(pos);
            let size = parse_number(&clean[pos + 124..pos + 136]).unwrap() as usize;
            pos += 512 + size.div_ceil(512) * 512;
        }
        let interesting = [0u8, b'/', b'.', b'0', b'7', b'x', b'1', b'5', 0x80, 0xff, b' ', b'\n', b'='];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut passed, mut refused) = (0, 0);
        for _ in 0..5000 {
            let mut bytes = clean.clone();
            for _ in 0..1 + next() % 3 {
                let at = headers[(next() % headers.len() as u64) as usize];
                let field = (next() % 512) as usize;
                if (148..156).contains(&field) {
                    continue;
                }
                bytes[at + field] = interesting[(next() % interesting.len() as u64) as usize];
                bytes[at + 148..at + 156].fill(b' ');
                let sum: u64 = bytes[at..at + 512].iter().map(|&x| u64::from(x)).sum();
                octal(&mut bytes[at + 148..at + 156], sum);
            }
            let len = bytes.len() as u64 - 512 * (next() % 3);
            match check(&bytes[..], len, LAYER) {
                Ok(_) => passed += 1,
                Err(_) => refused += 1,
            }
        }
        assert!(refused > 4000 && passed > 0, "passed {passed}, refused {refused}");
    }

    #[test]
    fn read_errors_keep_their_cause() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let err = check(Broken, 1024, LAYER).unwrap_err();
        assert_eq!(err.to_string(), "at byte 0: reading the payload failed");
        assert_eq!(std::error::Error::source(&err).unwrap().to_string(), "disk on fire");
    }

    #[test]
    fn the_order_is_formats_md_order() {
        let mut names: Vec<&[u8]> = vec![b"b", b"a/.wh.x", b"a", b"a/b/c", b".wh.z", b"a/.wh..wh..opq", b"a/b", b"a-", b"a/a"];
        names.sort_by(|x, y| compare_paths(x, y));
        let want: Vec<&[u8]> = vec![b".wh.z", b"a", b"a/.wh..wh..opq", b"a/.wh.x", b"a/a", b"a/b", b"a/b/c", b"a-", b"b"];
        assert_eq!(names, want);
    }
}
