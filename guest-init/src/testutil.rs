//! Test helpers: temp trees, in-memory tars, and whole-tree / whole-tar
//! listings to assert against.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::sys;

/// Whether the tests may chown, mknod and set trusted xattrs.
pub fn privileged() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("rar-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Printable ASCII as is, other bytes as `\xHH`.
pub fn esc(b: &[u8]) -> String {
    b.iter().map(|&c| if (0x20..0x7f).contains(&c) { (c as char).to_string() } else { format!("\\x{c:02x}") }).collect()
}

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

/// Every node under `root` (not the root), sorted by path, as
/// `path type mode uid:gid extra [xattrs]`; files show their content,
/// devices their numbers, symlinks their target, dirs their mtime.
pub fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let m = std::fs::symlink_metadata(&p).unwrap();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let ft = m.file_type();
        let mode = m.permissions().mode() & 0o7777;
        let extra = if ft.is_dir() {
            format!("mtime={}", m.mtime())
        } else if ft.is_symlink() {
            format!("-> {}", std::fs::read_link(&p).unwrap().display())
        } else if ft.is_file() {
            format!("{:?}", String::from_utf8_lossy(&std::fs::read(&p).unwrap()))
        } else {
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_char_device() {
                "c"
            } else if ft.is_block_device() {
                "b"
            } else if ft.is_fifo() {
                "p"
            } else {
                "s"
            };
            format!("{kind}{}:{}", nix::sys::stat::major(m.rdev()), nix::sys::stat::minor(m.rdev()))
        };
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "sym"
        } else if ft.is_file() {
            "file"
        } else {
            "node"
        };
        let xattrs: Vec<String> = sys::xattrs(&c(&p))
            .unwrap()
            .into_iter()
            .map(|(k, v)| format!("{}={}", String::from_utf8_lossy(&k), esc(&v)))
            .collect();
        let x = if xattrs.is_empty() { String::new() } else { format!(" [{}]", xattrs.join(",")) };
        out.push(format!("{rel} {kind} {mode:o} {}:{} {extra}{x}", m.uid(), m.gid()));
        if ft.is_dir() {
            walk(root, &p, out);
        }
    }
}

/// Every entry of a tar, in archive order: `path type mode uid:gid mtime
/// extra [xattrs]`, `extra` being the content, link target or device.
pub fn tar_listing(bytes: &[u8]) -> Vec<String> {
    let mut a = tar::Archive::new(bytes);
    let mut out = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let mut xattrs: Vec<String> = e
            .pax_extensions()
            .unwrap()
            .map(|exts| {
                exts.filter_map(|x| {
                    let x = x.unwrap();
                    x.key().unwrap().strip_prefix("SCHILY.xattr.").map(|k| format!("{k}={}", esc(x.value_bytes())))
                })
                .collect()
            })
            .unwrap_or_default();
        xattrs.sort();
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let link = e.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned());
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        let (kind, extra) = match h.entry_type() {
            tar::EntryType::Regular => ("file", format!("{:?}", String::from_utf8_lossy(&data))),
            tar::EntryType::Directory => ("dir", String::new()),
            tar::EntryType::Symlink => ("sym", format!("-> {}", link.unwrap())),
            tar::EntryType::Link => ("link", format!("=> {}", link.unwrap())),
            tar::EntryType::Char => ("chr", format!("{}:{}", h.device_major().unwrap().unwrap(), h.device_minor().unwrap().unwrap())),
            tar::EntryType::Block => ("blk", format!("{}:{}", h.device_major().unwrap().unwrap(), h.device_minor().unwrap().unwrap())),
            tar::EntryType::Fifo => ("fifo", String::new()),
            other => panic!("unexpected entry type {other:?}"),
        };
        let x = if xattrs.is_empty() { String::new() } else { format!(" [{}]", xattrs.join(",")) };
        out.push(
            format!("{path} {kind} {:o} {}:{} {} {extra}{x}", h.mode().unwrap(), h.uid().unwrap(), h.gid().unwrap(), h.mtime().unwrap())
                .trim_end()
                .to_string(),
        );
    }
    out
}

/// Builds a tar in memory.
pub struct TarBuilder(tar::Builder<Vec<u8>>);

impl TarBuilder {
    pub fn new() -> TarBuilder {
        TarBuilder(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, owner: u64, mtime: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner);
        h.set_gid(owner);
        h.set_mtime(mtime);
        h.set_size(0);
        h
    }

    /// Writes `path` as given in the header (no normalisation), so tests
    /// can feed `..`, leading `/` and other hostile names.
    fn raw(&mut self, mut h: tar::Header, path: &str, data: &[u8]) -> &mut Self {
        let bytes = path.as_bytes();
        assert!(bytes.len() <= 100, "test paths fit the name field");
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    pub fn dir(&mut self, path: &str, mode: u32, owner: u64, mtime: u64) -> &mut Self {
        self.raw(Self::header(tar::EntryType::Directory, mode, owner, mtime), path, b"")
    }

    pub fn file(&mut self, path: &str, data: &str, mode: u32, owner: u64) -> &mut Self {
        self.raw(Self::header(tar::EntryType::Regular, mode, owner, 10), path, data.as_bytes())
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0, 10);
        h.set_link_name(target).unwrap();
        self.raw(h, path, b"")
    }

    /// A hard link whose header says 0600 and owner 7, unlike any target
    /// in the tests: a link shows its target's metadata, not these.
    pub fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Link, 0o600, 7, 99);
        h.set_link_name(target).unwrap();
        self.raw(h, path, b"")
    }

    pub fn node(&mut self, path: &str, kind: tar::EntryType, major: u32, minor: u32) -> &mut Self {
        let mut h = Self::header(kind, 0o666, 0, 10);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.raw(h, path, b"")
    }

    pub fn xattrs(&mut self, pairs: &[(&str, &[u8])]) -> &mut Self {
        let keys: Vec<(String, &[u8])> = pairs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
        self.0.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v))).unwrap();
        self
    }

    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.0, tar::Builder::new(Vec::new())).into_inner().unwrap()
    }
}
