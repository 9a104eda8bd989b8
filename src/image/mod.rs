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

// Owned by the image work: read.rs (formats, selection, verification),
// write.rs (output formats), digest.rs, compress.rs.

use std::path::PathBuf;

pub use runasroot_guest::contract::Compression;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobRef {
    pub file: PathBuf,
    pub offset: u64,
    pub length: u64,
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
}
