//! Test helpers: temp directories, and whole-tar listings to assert
//! against.

use std::path::{Path, PathBuf};

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
