//! Image archives through `image::open` (format detection, the archive's
//! tar index, manifest, index and config JSON, selection, digest and
//! size checks), then the layers it names through the layer reader and
//! the export.
//!
//! Input: a mode byte (raw archive bytes, or members written as a tar or
//! as a layout directory, optionally compressed whole), selection
//! options, then the members: name, type (file, symlink, hard link) and
//! content. So the fuzzer can make digests that match, member contents
//! and names may hold `@N@` (`sha256:` and the hex digest of member N's
//! content), `%N%` (the hex alone) and `#N#` (its size), N one digit.
//!
//! Checked: no panic; an image that opens has as many diff_ids as layers,
//! every layer inside its file, a JSON object as config; its export is a
//! well-formed tar; no temporary file is left behind.

use std::io::Write;
use std::path::Path;

use runasroot::image::{self, OpenOptions};
use runasroot::layers::Spool;
use sha2::{Digest as _, Sha256};

use super::Input;

/// Member names the fuzzer picks from; the last index reads raw bytes.
const NAMES: [&str; 9] =
    ["manifest.json", "index.json", "oci-layout", "blobs/sha256/%0%", "blobs/sha256/%1%", "blobs/sha256/%2%", "l/layer.tar", "c.json", "repositories"];

/// One member of the archive, as the input describes it.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: Vec<u8>,
    /// 0: file, 1: symlink to `content`, 2: hard link to `content`, 3: directory.
    pub kind: u8,
    pub content: Vec<u8>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Replaces `@N@`, `%N%`, `#N#` by member N's digest, hex or size, in
/// rounds, so a manifest can name a config that names layers.
fn resolve(members: &mut [Member]) {
    for _ in 0..4 {
        let facts: Vec<(String, usize)> = members.iter().map(|m| (hex(&Sha256::digest(&m.content)), m.content.len())).collect();
        let pending = |b: &[u8]| b.windows(3).any(|w| matches!(w[0], b'@' | b'%' | b'#') && w[1].is_ascii_digit() && w[2] == w[0]);
        let done: Vec<bool> = members.iter().map(|m| !pending(&m.content)).collect();
        for m in members.iter_mut() {
            for field in [&mut m.name, &mut m.content] {
                let mut out = Vec::with_capacity(field.len());
                let mut i = 0;
                while i < field.len() {
                    let w = &field[i..field.len().min(i + 3)];
                    if w.len() == 3 && matches!(w[0], b'@' | b'%' | b'#') && w[1].is_ascii_digit() && w[2] == w[0] {
                        let n = usize::from(w[1] - b'0');
                        if let (Some((hex, size)), Some(true)) = (facts.get(n), done.get(n)) {
                            match w[0] {
                                b'@' => out.extend_from_slice(format!("sha256:{hex}").as_bytes()),
                                b'%' => out.extend_from_slice(hex.as_bytes()),
                                _ => out.extend_from_slice(size.to_string().as_bytes()),
                            }
                            i += 3;
                            continue;
                        }
                    }
                    out.push(field[i]);
                    i += 1;
                }
                *field = out;
            }
        }
    }
}

/// The members the input describes.
fn members(input: &mut Input) -> Vec<Member> {
    let mut out = Vec::new();
    for _ in 0..input.below(12) {
        let name = match input.below(NAMES.len() as u64 + 1) as usize {
            i if i < NAMES.len() => NAMES[i].as_bytes().to_vec(),
            _ => input.string(120),
        };
        let kind = input.below(4) as u8;
        let content = input.string(20_000);
        out.push(Member { name, kind, content });
    }
    resolve(&mut out);
    out
}

/// Encodes members as [`members`] reads them (for seeds).
pub fn encode(mode: u8, select: u8, members: &[Member]) -> Vec<u8> {
    let mut out = vec![mode, select];
    out.push(members.len() as u8);
    for m in members {
        let named = NAMES.iter().position(|n| n.as_bytes() == m.name.as_slice());
        match named {
            Some(i) => out.push(i as u8),
            None => {
                out.push(NAMES.len() as u8);
                out.push(m.name.len() as u8);
                out.extend_from_slice(&m.name);
            }
        }
        out.push(m.kind);
        out.extend_from_slice(&(m.content.len() as u16).to_le_bytes());
        out.extend_from_slice(&m.content);
    }
    out
}

fn write_tar(members: &[Member], out: impl Write) -> std::io::Result<()> {
    let mut b = tar::Builder::new(out);
    for m in members {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        let (ty, data): (tar::EntryType, &[u8]) = match m.kind {
            0 => (tar::EntryType::Regular, &m.content),
            1 => (tar::EntryType::Symlink, b""),
            2 => (tar::EntryType::Link, b""),
            _ => (tar::EntryType::Directory, b""),
        };
        h.set_entry_type(ty);
        h.set_size(data.len() as u64);
        // Names and link targets raw (absolute, `..`, anything), as a
        // hostile archive has them; a tar field cannot hold NUL (it ends
        // the field), and a long name goes in a PAX record.
        let name: Vec<u8> = if m.name.is_empty() { b"x".to_vec() } else { m.name.iter().map(|&b| if b == 0 { b'_' } else { b }).collect() };
        let n = name.len().min(100);
        h.as_old_mut().name[..n].copy_from_slice(&name[..n]);
        if name.len() > 100 {
            b.append_pax_extensions([("path", name.as_slice())])?;
        }
        if m.kind == 1 || m.kind == 2 {
            let n = m.content.len().min(100);
            h.as_old_mut().linkname[..n].copy_from_slice(&m.content[..n]);
        }
        h.set_cksum();
        b.append(&h, data)?;
    }
    b.finish()
}

/// Writes the members under `root`, skipping names that would leave it.
fn write_dir(members: &[Member], root: &Path) {
    for m in members {
        let Ok(name) = std::str::from_utf8(&m.name) else { continue };
        if name.is_empty() || name.starts_with('/') || name.split('/').any(|c| c == "..") {
            continue;
        }
        let path = root.join(name);
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = match m.kind {
            0 => std::fs::write(&path, &m.content),
            1 => std::os::unix::fs::symlink(String::from_utf8_lossy(&m.content).as_ref(), &path),
            2 => std::fs::hard_link(root.join(String::from_utf8_lossy(&m.content).as_ref()), &path),
            _ => std::fs::create_dir_all(&path),
        };
    }
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let select = input.u8();
    let dir = super::temp_dir();
    let temp = dir.path().join("temp");
    std::fs::create_dir(&temp).expect("a temporary directory");
    let archive = dir.path().join("image");
    match mode % 4 {
        0 => std::fs::write(&archive, input.rest()).expect("the archive"),
        1 => {
            std::fs::create_dir(&archive).expect("the layout directory");
            write_dir(&members(&mut input), &archive);
        }
        _ => {
            let members = members(&mut input);
            let mut tar = Vec::new();
            write_tar(&members, &mut tar).expect("writing to memory");
            let bytes = match mode >> 2 & 3 {
                1 => {
                    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    e.write_all(&tar).expect("writing to memory");
                    e.finish().expect("writing to memory")
                }
                2 => zstd::encode_all(&tar[..], 1).expect("writing to memory"),
                _ => tar,
            };
            std::fs::write(&archive, bytes).expect("the archive");
        }
    }
    let opts = OpenOptions {
        from_image: (select & 1 == 1).then(|| ["b:2", "b", "docker.io/library/b:2", "x"][usize::from(select >> 1 & 3)].to_string()),
        platform: (select & 8 == 8).then(|| ["linux/amd64", "linux/arm64/v8", "bad"][usize::from(select >> 4) % 3].to_string()),
        temp_dir: temp.clone(),
    };
    let spec = archive.display().to_string();
    if let Ok(img) = image::open(&spec, &opts) {
        check_image(&img);
        let spool_dir = dir.path().join("spool");
        std::fs::create_dir(&spool_dir).expect("a spool directory");
        let spool = Spool { cache: None, temp_dir: &spool_dir };
        if let Ok(tar) = super::layers::export_to_vec(&img.layers, spool) {
            super::layers::check_export(&tar);
        }
        assert_eq!(std::fs::read_dir(&spool_dir).expect("the spool directory").count(), 0, "spool files left behind");
    }
    assert_eq!(std::fs::read_dir(&temp).expect("the temporary directory").count(), 0, "temporary files left behind");
}

fn check_image(img: &image::Image) {
    assert!(img.config.is_object(), "the config is not an object");
    let diff_ids = img.config.pointer("/rootfs/diff_ids").and_then(|v| v.as_array()).map_or(0, |a| a.len());
    assert_eq!(diff_ids, img.layers.len(), "diff_ids and layers");
    for l in &img.layers {
        let len = std::fs::metadata(&l.blob.file).expect("a layer's file").len();
        assert!(l.blob.offset.checked_add(l.blob.length).is_some_and(|end| end <= len), "layer {} outside its file", l.index);
    }
}

/// A small layer tar for seeds.
pub fn sample_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    b.append_data(&mut dir, "etc/", &b""[..]).unwrap();
    let mut f = tar::Header::new_ustar();
    f.set_mode(0o644);
    f.set_size(5);
    b.append_data(&mut f, "etc/hosts", &b"hosts"[..]).unwrap();
    let mut l = tar::Header::new_ustar();
    l.set_entry_type(tar::EntryType::Symlink);
    l.set_size(0);
    b.append_link(&mut l, "etc/link", "hosts").unwrap();
    let mut w = tar::Header::new_ustar();
    w.set_mode(0o644);
    w.set_size(0);
    b.append_data(&mut w, "var/.wh.gone", &b""[..]).unwrap();
    b.into_inner().unwrap()
}

/// Starting inputs: a legacy docker-archive, an OCI layout (archive and
/// directory, gzip and zstd whole), a Docker ≥ 25 hybrid; one image
/// each, with a gzip layer.
pub fn seeds() -> Vec<Vec<u8>> {
    let m = |name: &str, content: &[u8]| Member { name: name.as_bytes().to_vec(), kind: 0, content: content.to_vec() };
    let layer = sample_layer();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer).unwrap();
    let gz = gz.finish().unwrap();
    let config = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"]},"rootfs":{"type":"layers","diff_ids":["@0@"]},"history":[{"created_by":"x"}]}"#;
    let legacy = vec![
        m("l/layer.tar", &layer),
        m("c.json", config),
        m("manifest.json", br#"[{"Config":"c.json","RepoTags":["b:2"],"Layers":["l/layer.tar"]}]"#),
    ];
    // The layer's diff_id is the uncompressed tar's digest: member 5.
    let oci_config = String::from_utf8(config.to_vec()).unwrap().replace("@0@", "@5@").into_bytes();
    let oci = vec![
        m("blobs/sha256/%0%", &gz),
        m("blobs/sha256/%1%", &oci_config),
        m(
            "blobs/sha256/%2%",
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"@1@","size":#1#},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"@0@","size":#0#}]}"#,
        ),
        m(
            "index.json",
            br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@2@","size":#2#,"annotations":{"org.opencontainers.image.ref.name":"b:2"},"platform":{"architecture":"amd64","os":"linux"}}]}"#,
        ),
        m("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        Member { name: b"unused/uncompressed".to_vec(), kind: 0, content: layer.clone() },
    ];
    let mut hybrid = oci.clone();
    hybrid.push(m("manifest.json", br#"[{"Config":"blobs/sha256/%1%","RepoTags":["b:2"],"Layers":["blobs/sha256/%0%"]}]"#));
    vec![
        encode(2, 0, &legacy),
        encode(2, 1, &oci),
        encode(1, 0, &oci),
        encode(6, 0, &oci),
        encode(10, 9, &hybrid),
    ]
}
