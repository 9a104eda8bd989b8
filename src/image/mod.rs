//! Container images in and out.
//!
//! Reading: docker-archive (legacy and Docker ≥ 25 hybrid), OCI image
//! layout (directory or archive), whole-archive gzip/zstd; select an image
//! by name:tag and platform; verify blob digests. Layers are addressed by
//! byte range inside the file that stores them, so nothing is copied.
//!
//! Writing: the base layers byte for byte plus the new layer, config with
//! diff_ids and history appended, as docker-archive (hybrid), OCI layout or
//! OCI archive, written atomically.

mod compress;
mod config;
mod digest;
mod error;
mod read;
mod select;
mod store;
mod write;

use std::io::{self, Read};
use std::path::PathBuf;


pub use config::{ConfigError, ConfigOverrides};
pub use error::ImageError;
pub use read::{open, open_with_progress, Image, OpenOptions, SourceFormat, SCRATCH, VERIFYING};
pub use write::{check_options, write_image, NewLayer, OutputFormat, WriteOptions};

/// How a layer's stored bytes are compressed (detected from the content).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// A `sha256:<64 hex>` digest, validated on construction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`; anything else is `None`.
    pub fn parse(s: &str) -> Option<Digest> {
        let hex = s.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then(|| Digest(s.to_string()))
    }

    /// From a raw sha256 output.
    pub fn from_sha256(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(bytes)))
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a blob's stored bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobRef {
    pub file: PathBuf,
    pub offset: u64,
    pub length: u64,
}

/// A file as it was when runasroot verified its bytes: if any of this
/// differs later, the file was replaced or written meanwhile (a write
/// always moves ctime, which no user can set back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileId {
    pub fn of(file: &std::fs::File) -> io::Result<FileId> {
        Ok(FileId::from_meta(&file.metadata()?))
    }

    pub fn of_path(path: &std::path::Path) -> io::Result<FileId> {
        Ok(FileId::from_meta(&std::fs::metadata(path)?))
    }

    fn from_meta(m: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

/// One layer of the selected image, bottom first.
#[derive(Debug, Clone)]
pub struct Layer {
    /// 0 = bottom layer.
    pub index: usize,
    /// The stored (possibly compressed) bytes.
    pub blob: BlobRef,
    /// sha256 of the stored bytes (verified when the source names it).
    pub blob_digest: Digest,
    /// sha256 of the uncompressed tar, from the config's rootfs.diff_ids.
    pub diff_id: Digest,
    /// Detected from the content, not from the media type.
    pub compression: Compression,
    /// How the source names the layer, for error messages
    /// (`<id>/layer.tar`, `blobs/sha256/…`).
    pub name: String,
    /// `blob.file` as it was when its bytes were hashed.
    pub stored_identity: FileId,
}

impl Layer {
    /// The stored bytes, exactly (compressed or not).
    pub fn open_stored(&self) -> io::Result<impl Read> {
        store::open_blob(&self.blob)
    }

    /// The layer tar, decompressed, unchecked.
    pub fn open_uncompressed(&self) -> io::Result<Box<dyn Read + Send>> {
        compress::decoder(self.compression, store::open_blob(&self.blob)?)
    }

    /// The layer tar, decompressed; reading it to the end fails with an
    /// `InvalidData` error wrapping [`ImageError::DiffIdMismatch`] (naming
    /// the layer and both digests) if it does not hash to its diff_id. A
    /// tar reader stops at the end-of-archive blocks: drain the rest
    /// (`io::copy(&mut r, &mut io::sink())`) to get the check.
    pub fn open_verified(&self) -> io::Result<Box<dyn Read + Send>> {
        let inner = self.open_uncompressed()?;
        let (index, name, expected) = (self.index, self.name.clone(), self.diff_id.clone());
        let source_name = self.blob.file.display().to_string();
        Ok(Box::new(digest::VerifyingReader::new(
            inner,
            self.diff_id.clone(),
            Box::new(move |found| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    ImageError::DiffIdMismatch {
                        source_name: source_name.clone(),
                        index,
                        name: name.clone(),
                        expected: expected.clone(),
                        found,
                    },
                )
            }),
        )))
    }

    /// The OCI media type of the stored bytes.
    pub fn media_type(&self) -> &'static str {
        media_type(self.compression)
    }
}

/// OCI layer media types (image-spec `media-types.md`).
pub fn media_type(c: Compression) -> &'static str {
    match c {
        Compression::None => "application/vnd.oci.image.layer.v1.tar",
        Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}
