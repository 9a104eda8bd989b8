//! The layers disk: one file holding every layer's stored bytes, each a
//! byte range, that the guest reads as a raw read-only block device.
//!
//! A tar archive already is such a file (every member's data is one
//! contiguous range), so it is used as it is: no copy, whatever its size.
//! Layers in separate files (an OCI directory) are gathered into one.
//! Block devices come in 512-byte sectors (QEMU rounds a raw image down
//! to a whole sector), so the file must be a multiple of 512 bytes.

use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{store, BlobRef, Image, ImageError};

/// A disk sector: the size unit of a virtio-blk device.
pub const SECTOR: u64 = 512;
/// Alignment of each gathered blob: a page, so the guest's reads of a
/// layer start on a page boundary of the device.
const GATHER_ALIGN: u64 = 4096;

/// The file to hand the guest as its layers disk.
#[derive(Debug)]
pub struct LayerDisk {
    pub path: PathBuf,
    /// Per layer of [`Image::layers`] (same order, same length): its
    /// stored bytes on `path`.
    pub ranges: Vec<BlobRef>,
    /// A gathered file, removed when the disk is dropped.
    _temp: Option<tempfile::TempPath>,
}

/// How to make the disk: decided from the layers alone.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// Every layer is in this one file, whose size is whole sectors.
    UseAsIs(PathBuf),
    /// Copy each distinct blob to `offsets[i]` of a new file of `len` bytes.
    Gather { blobs: Vec<BlobRef>, offsets: Vec<u64>, len: u64 },
}

fn align(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

fn plan(layers: &[&BlobRef], file_len: impl Fn(&Path) -> Option<u64>) -> Plan {
    if let Some(first) = layers.first() {
        let one_file = layers.iter().all(|b| b.file == first.file);
        if one_file && file_len(&first.file).is_some_and(|n| n % SECTOR == 0 && n > 0) {
            return Plan::UseAsIs(first.file.clone());
        }
    }
    let mut blobs: Vec<BlobRef> = vec![];
    for b in layers {
        if !blobs.contains(b) {
            blobs.push((*b).clone());
        }
    }
    let mut offsets = vec![];
    let mut pos = 0;
    for b in &blobs {
        offsets.push(pos);
        pos = align(pos + b.length, GATHER_ALIGN);
    }
    // Never an empty disk: a zero-length drive is refused by launchers.
    Plan::Gather { blobs, offsets, len: pos.max(GATHER_ALIGN) }
}

impl Image {
    /// The layers disk for this image; a gathered copy goes to `temp_dir`.
    pub fn layer_disk(&self, temp_dir: &Path) -> Result<LayerDisk, ImageError> {
        let refs: Vec<&BlobRef> = self.layers.iter().map(|l| &l.blob).collect();
        match plan(&refs, |p| std::fs::metadata(p).ok().map(|m| m.len())) {
            Plan::UseAsIs(path) => Ok(LayerDisk { path, ranges: refs.into_iter().cloned().collect(), _temp: None }),
            Plan::Gather { blobs, offsets, len } => {
                let temp = tempfile::Builder::new()
                    .prefix("layers-")
                    .suffix(".img")
                    .tempfile_in(temp_dir)
                    .map_err(|source| ImageError::TempFile { dir: temp_dir.to_path_buf(), source })?;
                let (mut file, path) = temp.into_parts();
                let err = |source| ImageError::GatherLayers { path: path.to_path_buf(), source };
                gather(&mut file, &blobs, &offsets, len).map_err(err)?;
                let ranges = refs
                    .iter()
                    .map(|b| {
                        let i = blobs.iter().position(|x| x == *b).expect("every layer blob was planned");
                        BlobRef { file: path.to_path_buf(), offset: offsets[i], length: b.length }
                    })
                    .collect();
                Ok(LayerDisk { path: path.to_path_buf(), ranges, _temp: Some(path) })
            }
        }
    }
}

fn gather(out: &mut File, blobs: &[BlobRef], offsets: &[u64], len: u64) -> io::Result<()> {
    for (b, &offset) in blobs.iter().zip(offsets) {
        out.seek(SeekFrom::Start(offset))?;
        // std copies File→File with copy_file_range: no user-space buffer.
        let n = io::copy(&mut store::open_blob(b)?, out)?;
        if n != b.length {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} ends {} bytes early", b.file.display(), b.length - n),
            ));
        }
    }
    out.flush()?;
    out.set_len(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(file: &str, offset: u64, length: u64) -> BlobRef {
        BlobRef { file: PathBuf::from(file), offset, length }
    }

    #[test]
    fn plans_the_disk() {
        let a = blob("/a.tar", 1536, 100);
        let b = blob("/a.tar", 2048, 5000);
        let c = blob("/blobs/c", 0, 10);
        let odd = blob("/odd.tar", 512, 5);
        let len = |p: &Path| match p.to_str() {
            Some("/a.tar") => Some(10240),
            Some("/odd.tar") => Some(1000),
            _ => Some(10),
        };
        let cases = [
            (vec![&a, &b, &a], Plan::UseAsIs(PathBuf::from("/a.tar"))),
            (
                vec![&a, &c, &a],
                Plan::Gather { blobs: vec![a.clone(), c.clone()], offsets: vec![0, 4096], len: 8192 },
            ),
            (
                vec![&odd],
                Plan::Gather { blobs: vec![odd.clone()], offsets: vec![0], len: 4096 },
            ),
            (vec![], Plan::Gather { blobs: vec![], offsets: vec![], len: 4096 }),
        ];
        for (layers, want) in cases {
            assert_eq!(plan(&layers, len), want, "{layers:?}");
        }
    }

    #[test]
    fn gathers_blobs_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"xxHELLOyyWORLD").unwrap();
        let s = src.to_str().unwrap();
        let blobs = vec![blob(s, 2, 5), blob(s, 9, 5)];
        let out_path = dir.path().join("out");
        let mut out = File::create(&out_path).unwrap();
        gather(&mut out, &blobs, &[0, 4096], 8192).unwrap();
        let bytes = std::fs::read(&out_path).unwrap();
        assert_eq!(bytes.len(), 8192);
        assert_eq!(&bytes[..5], b"HELLO");
        assert!(bytes[5..4096].iter().all(|&b| b == 0));
        assert_eq!(&bytes[4096..4101], b"WORLD");
        let short = vec![blob(s, 10, 50)];
        assert_eq!(gather(&mut out, &short, &[0], 4096).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
