//! The host export engine against `umoci raw unpack` of the same images.
//!
//! Each image is written in every input format and exported through
//! `runasroot::image::open` + `runasroot::export::export`; all formats
//! must give the same bytes, and those bytes must describe, entry by
//! entry (name, type, mode, owner, size, content, link target, xattrs,
//! device numbers, mtime), the rootfs umoci unpacks from the same image
//! as an OCI layout. umoci 0.4.7 cannot read zstd layers, so umoci gets
//! the same image with zstd layers stored as gzip (same diff_ids).
//!
//! Hard links are compared as groups of names sharing an inode. Where a
//! layer links to a file of a lower layer, umoci links to the lower inode
//! while runasroot (both engines) writes a copy: such names are declared
//! per image and must come out as a copy with the same content and
//! metadata.
//!
//! Needs root (umoci must chown and mknod) and umoci; says so and passes
//! nothing otherwise.

#[path = "common/images.rs"]
mod images;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::fs;
use std::io::{BufWriter, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use images::*;
use runasroot::export::{export, ExportOptions, ExportStats};
use runasroot::image::{open, OpenOptions};
use sha2::{Digest as _, Sha256};

const TAG: &str = "fixture";

/// One entry as both sides describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rec {
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    sha: String,
    link: String,
    dev: (u64, u64),
    mtime: i64,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// A tree: every entry by path, and the hard-link groups (≥ 2 names).
#[derive(Debug, Default)]
struct Tree {
    entries: BTreeMap<String, Rec>,
    groups: BTreeSet<Vec<String>>,
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("umoci raw unpack must run as root (chown, mknod, security.* xattrs)".into());
    }
    match Command::new("umoci").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("umoci is not installed".into()),
    }
}

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Exports the image at `path` with the host engine.
fn export_image(path: &Path, clamp: Option<u64>, tmp: &Path) -> (Vec<u8>, ExportStats) {
    let opts = OpenOptions { from_image: None, platform: None, temp_dir: tmp.to_path_buf() };
    let image = open(&path.display().to_string(), &opts).unwrap_or_else(|e| panic!("open {}: {e:?}", path.display()));
    let mut out = BufWriter::new(Vec::new());
    let spool = runasroot::layers::Spool { cache: None, temp_dir: tmp };
    let stats = export(&image.layers, &ExportOptions { clamp_mtime: clamp, spool }, &mut out)
        .unwrap_or_else(|e| panic!("export {}: {e}", path.display()));
    (out.into_inner().unwrap(), stats)
}

/// Reads an export back.
fn tar_tree(bytes: &[u8]) -> Tree {
    let mut tree = Tree::default();
    let mut links: Vec<(String, String)> = vec![];
    let mut a = tar::Archive::new(bytes);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let path = String::from_utf8_lossy(&e.path_bytes()).trim_end_matches('/').to_string();
        let mut xattrs: Vec<(String, Vec<u8>)> = e
            .pax_extensions()
            .unwrap()
            .map(|exts| {
                exts.map(|x| x.unwrap())
                    .filter_map(|x| {
                        let k = x.key().unwrap().strip_prefix("SCHILY.xattr.")?.to_string();
                        Some((k, x.value_bytes().to_vec()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        xattrs.sort();
        let link = e.link_name_bytes().map(|l| String::from_utf8_lossy(&l).into_owned()).unwrap_or_default();
        let mut data = vec![];
        e.read_to_end(&mut data).unwrap();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Regular => 'f',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Link => 'h',
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            tar::EntryType::Fifo => 'p',
            t => panic!("{path}: unexpected entry type {t:?} in an export"),
        };
        let dev = match kind {
            'c' | 'b' => (h.device_major().unwrap().unwrap() as u64, h.device_minor().unwrap().unwrap() as u64),
            _ => (0, 0),
        };
        let rec = Rec {
            kind,
            mode: h.mode().unwrap(),
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            size: data.len() as u64,
            sha: if kind == 'f' { sha_hex(&data) } else { String::new() },
            link: if kind == 'l' { link.clone() } else { String::new() },
            dev,
            mtime: h.mtime().unwrap() as i64,
            xattrs,
        };
        assert!(!tree.entries.contains_key(&path), "{path} twice in the export");
        if kind == 'h' {
            links.push((path.clone(), link));
        }
        tree.entries.insert(path, rec);
    }
    // A link entry shows its target's content, with its own header's
    // metadata (which must be the inode's: checked against umoci).
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (path, target) in links {
        let t = tree.entries.get(&target).unwrap_or_else(|| panic!("{path} links to {target}, not an earlier entry")).clone();
        assert_ne!(t.kind, 'h', "{path} links to a link");
        let rec = tree.entries.get_mut(&path).unwrap();
        rec.kind = t.kind;
        rec.size = t.size;
        rec.sha = t.sha;
        rec.link = t.link;
        rec.dev = t.dev;
        groups.entry(target.clone()).or_insert_with(|| vec![target]).push(path);
    }
    tree.groups = groups.into_values().map(|mut g| {
        g.sort();
        g
    }).collect();
    tree
}

fn xattrs_of(path: &Path) -> Vec<(String, Vec<u8>)> {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: `c` is a NUL-terminated path and `names` a writable buffer of
    // the length passed.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}: {}", path.display(), std::io::Error::last_os_error());
    let mut out = vec![];
    for name in names[..n as usize].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).unwrap();
        let mut value = vec![0u8; 64 << 10];
        // SAFETY: both strings are NUL-terminated and `value` is a writable
        // buffer of the length passed.
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        assert!(m >= 0, "lgetxattr {}: {}", path.display(), std::io::Error::last_os_error());
        value.truncate(m as usize);
        out.push((String::from_utf8(name.to_vec()).unwrap(), value));
    }
    out.sort();
    out
}

/// Linux's dev_t split (glibc's gnu_dev_major/minor).
fn split_dev(rdev: u64) -> (u64, u64) {
    (((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff), (rdev & 0xff) | ((rdev >> 12) & !0xff))
}

/// Walks umoci's rootfs.
fn rootfs_tree(root: &Path) -> Tree {
    let mut tree = Tree::default();
    let mut inodes: HashMap<u64, Vec<String>> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for d in fs::read_dir(root.join(&rel)).unwrap() {
            let d = d.unwrap();
            let rel = rel.join(d.file_name());
            let full = root.join(&rel);
            let md = fs::symlink_metadata(&full).unwrap();
            let ft = md.file_type();
            let name = String::from_utf8_lossy(rel.as_os_str().as_bytes()).into_owned();
            let kind = if ft.is_dir() {
                stack.push(rel.clone());
                'd'
            } else if ft.is_file() {
                'f'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else if ft.is_fifo() {
                'p'
            } else {
                panic!("{name}: unexpected file type in umoci's rootfs")
            };
            let (sha, size) = if kind == 'f' {
                let data = fs::read(&full).unwrap();
                (sha_hex(&data), data.len() as u64)
            } else {
                (String::new(), 0)
            };
            let link = if kind == 'l' {
                String::from_utf8_lossy(fs::read_link(&full).unwrap().as_os_str().as_bytes()).into_owned()
            } else {
                String::new()
            };
            if kind != 'd' {
                inodes.entry(md.ino()).or_default().push(name.clone());
            }
            let rec = Rec {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid().into(),
                gid: md.gid().into(),
                size,
                sha,
                link,
                dev: if matches!(kind, 'c' | 'b') { split_dev(md.rdev()) } else { (0, 0) },
                mtime: md.mtime(),
                xattrs: xattrs_of(&full),
            };
            tree.entries.insert(name, rec);
        }
    }
    tree.groups = inodes
        .into_values()
        .filter(|g| g.len() > 1)
        .map(|mut g| {
            g.sort();
            g
        })
        .collect();
    tree
}

fn umoci_unpack(oci_dir: &Path, rootfs: &Path) -> Tree {
    let out = Command::new("umoci")
        .args(["raw", "unpack", "--image"])
        .arg(format!("{}:{TAG}", oci_dir.display()))
        .arg(rootfs)
        .output()
        .expect("run umoci");
    assert!(out.status.success(), "umoci raw unpack failed: {}", String::from_utf8_lossy(&out.stderr));
    rootfs_tree(rootfs)
}

/// The image umoci can read: zstd layers stored as gzip.
fn for_umoci(img: &Image) -> Image {
    let mut img = img.clone();
    for l in &mut img.layers {
        if l.compression == Compression::Zstd {
            l.compression = Compression::Gzip;
        }
    }
    img
}

/// Exports `img` from every input format, checks they agree, and compares
/// the export with umoci's rootfs. `copies`: names that link to a lower
/// layer's file (umoci shares the inode, runasroot copies).
fn check(name: &str, img: Image, copies: &[&str]) {
    if let Some(why) = skip_reason() {
        println!("SKIPPED {name}: {why}");
        return;
    }
    let img = img.tag(TAG);
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    let mut exports: Vec<(String, Vec<u8>)> = vec![];
    for (fname, build) in [
        ("docker-legacy.tar", Build::new(Format::DockerLegacy)),
        ("docker-hybrid.tar", Build::new(Format::DockerHybrid)),
        ("oci-archive.tar", Build::new(Format::OciArchive)),
        ("oci-dir", Build::new(Format::OciDir)),
        ("docker-legacy.tar.gz", Build::new(Format::DockerLegacy).whole(Whole::Gzip)),
    ] {
        let path = dir.path().join(fname);
        write(&path, &build, std::slice::from_ref(&img));
        let (bytes, _) = export_image(&path, None, &tmp);
        exports.push((fname.to_string(), bytes));
    }
    for (fname, bytes) in &exports[1..] {
        assert!(bytes == &exports[0].1, "{name}: export of {fname} differs from export of {}", exports[0].0);
    }
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0, "{name}: temporary files left in {}", tmp.display());

    let oci = dir.path().join("umoci-oci");
    write(&oci, &Build::new(Format::OciDir), &[for_umoci(&img)]);
    let theirs = umoci_unpack(&oci, &dir.path().join("rootfs"));
    let ours = tar_tree(&exports[0].1);

    let names = |t: &Tree| t.entries.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&ours), names(&theirs), "{name}: the export and umoci's rootfs hold different names");
    for (path, rec) in &ours.entries {
        assert_eq!(rec, &theirs.entries[path], "{name}: {path} differs (left: export, right: umoci)");
    }
    // umoci's groups, with the declared copies split off.
    let expected: BTreeSet<Vec<String>> = theirs
        .groups
        .iter()
        .map(|g| g.iter().filter(|n| !copies.contains(&n.as_str())).cloned().collect::<Vec<_>>())
        .filter(|g| g.len() > 1)
        .collect();
    assert_eq!(ours.groups, expected, "{name}: hard-link groups differ");
    for c in copies {
        assert!(
            theirs.groups.iter().any(|g| g.iter().any(|n| n == c)),
            "{name}: {c} was declared a cross-layer link but umoci shows no shared inode"
        );
    }
    println!("{name}: {} entries, {} hard-link groups, equal to umoci", ours.entries.len(), ours.groups.len());
}

/// Whiteouts, opaque dirs, hard links within and across layers, a file
/// replaced by a directory and the reverse, xattrs, devices, setuid, long
/// and non-ASCII names, plain/gzip/zstd layers.
#[test]
fn rich_image_matches_umoci() {
    check("rich", rich_export_image(), &["usr/bin/sh2"]);
}

#[test]
fn twenty_layers_match_umoci() {
    check("20 layers", deep_export_image(20), &[]);
}

#[test]
fn a_hundred_and_thirty_layers_match_umoci() {
    check("130 layers", deep_export_image(130), &[]);
}

#[test]
fn exports_are_deterministic_and_clamped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.tar");
    write(&path, &Build::new(Format::DockerHybrid), &[rich_export_image().tag(TAG)]);
    let (a, sa) = export_image(&path, None, dir.path());
    let (b, _) = export_image(&path, None, dir.path());
    assert!(a == b, "two exports of one image differ");
    let clamp = 1_550_000_000;
    let (c, sc) = export_image(&path, Some(clamp), dir.path());
    let (d, _) = export_image(&path, Some(clamp), dir.path());
    assert!(c == d, "two clamped exports differ");
    assert_eq!((sa.entries, sa.tar_bytes), (sc.entries, sc.tar_bytes));
    let (ta, tc) = (tar_tree(&a), tar_tree(&c));
    let mut clamped = 0;
    for (path, ra) in &ta.entries {
        let rc = &tc.entries[path];
        assert_eq!(rc.mtime, ra.mtime.min(clamp as i64), "{path}");
        clamped += usize::from(rc.mtime != ra.mtime);
        assert_eq!(Rec { mtime: 0, ..rc.clone() }, Rec { mtime: 0, ..ra.clone() }, "{path}");
    }
    // etc/passwd (1.6e9) and tmp (1.7e9) are later than the clamp.
    assert_eq!(clamped, 2, "the clamp changed {clamped} entries");
}
