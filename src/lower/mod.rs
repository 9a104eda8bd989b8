//! The guest's read-only view, written by the host: one EROFS image whose
//! root holds `base/` (the base image, merged) and, with `--copy-to-root`,
//! `copy/` (the tree the guest copies into the new layer). The guest
//! mounts it as the overlay's only lowerdir and never parses a tar.
//!
//! The base's file data are not copied: each file is a chunk index into
//! the uncompressed tar it came from (the image's own file, a spool cache
//! entry, an OCI blob), which the image names as one of its extra devices
//! ([`devices`]). The guest gets one disk: the image, then each device
//! file at the offset the image's device table gives (EROFS flat mode),
//! served as one concatenation of files by either launcher, so nothing is
//! copied whatever the image's format or number of layers.
//!
//! The copy-to-root tree comes from many small host files: its data are
//! embedded in the image.

mod copy;
mod devices;
mod tree;

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use runasroot_guest::contract::{self, serial};

use crate::erofs;
use crate::image::Layer;
use crate::layers::{self, IndexStats, LayerError, Spool};
use crate::machine::{Backing, DiskSpec, Extent};

pub use copy::CopySpec;

/// Why the lower image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LowerError {
    #[error(transparent)]
    Layers(#[from] LayerError),
    #[error("cannot read --copy-to-root {path}")]
    CopyToRoot {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--copy-to-root {path}: {entry:?}: {reason}")]
    CopyEntry { path: PathBuf, entry: String, reason: &'static str },
    #[error("cannot write the lower image {path} (is the temporary directory writable and not full?)")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the base cannot be written as an EROFS image")]
    Erofs(#[source] erofs::Error),
}

/// What preparing the lower did, for `-v` and the benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LowerStats {
    pub index: IndexStats,
    /// Inodes in the image (base and copy tree).
    pub inodes: usize,
    /// The image's size (metadata, and embedded copy-to-root data).
    pub image_bytes: u64,
    /// Extra devices the image reads file data from.
    pub devices: usize,
}

/// The lower image, ready to hand to the guest.
#[derive(Debug)]
pub struct Lower {
    image: PathBuf,
    image_len: u64,
    devices: Vec<devices::Device>,
    /// Where each device starts in the flat layout (bytes).
    flat_starts: Vec<u64>,
    copy_to_root: bool,
    pub stats: LowerStats,
    /// Holds the layers' sources (cache entries, temporary spools) open,
    /// and knows how they were when verified.
    indexed: layers::Indexed,
    _copy: copy::Copy,
}

/// Builds the lower image for `layers` (bottom first) and what is to be
/// copied into the new layer, in `temp_dir`.
pub fn build(
    layers: &[Layer],
    copy_to_root: CopySpec<'_>,
    epoch: u64,
    spool: Spool<'_>,
    temp_dir: &Path,
) -> Result<Lower, LowerError> {
    let indexed = layers::index(layers, spool)?;
    let copy = copy::Copy::read(copy_to_root, epoch, temp_dir)?;
    let sources: Vec<devices::SourceRange> = indexed
        .sources
        .iter()
        .map(|s| devices::SourceRange { path: s.path.clone(), file_len: s.identity.size, base: s.base, len: s.len })
        .collect();
    let plan = devices::plan(&sources);
    let devices = plan.devices;

    let tree = tree::build(&indexed.merged, &plan.placement, copy.merged());
    let image = temp_dir.join("lower.erofs");
    let werr = |source| LowerError::Write { path: image.clone(), source };
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&image).map_err(werr)?);
    let erofs_devices: Vec<erofs::Device> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| erofs::Device { blocks: d.blocks(), tag: format!("rar-data-{i}") })
        .collect();
    let mut data = copy.data_source();
    let written = erofs::write(&tree, &erofs_devices, &mut data, &mut out).map_err(|e| match e {
        erofs::Error::Write { source, .. } => werr(source),
        other => LowerError::Erofs(other),
    })?;
    out.flush().map_err(werr)?;
    drop(out);

    let stats = LowerStats {
        index: indexed.stats,
        inodes: tree.inodes.len(),
        image_bytes: written.len,
        devices: devices.len(),
    };
    Ok(Lower {
        image,
        image_len: written.len,
        devices,
        flat_starts: written.device_starts,
        copy_to_root: copy.is_some(),
        stats,
        indexed,
        _copy: copy,
    })
}

impl Lower {
    /// The guest's lower disk: the image, then every device at its place
    /// in the flat layout.
    pub fn disk(&self) -> DiskSpec {
        let mut extents = vec![Extent { path: self.image.clone(), offset: 0, len: self.image_len, at: 0 }];
        let mut len = self.image_len;
        for (d, &at) in self.devices.iter().zip(&self.flat_starts) {
            extents.push(Extent { path: d.path.clone(), offset: 0, len: d.len, at });
            len = at + d.padded_len();
        }
        DiskSpec { backing: Backing::Concat { extents, len }, read_only: true, serial: serial::LOWER.into() }
    }

    /// What the job says about the lower.
    pub fn spec(&self) -> contract::Lower {
        contract::Lower { copy_to_root: self.copy_to_root }
    }

    /// Fails if a file the base was read from changed since it was
    /// verified (the guest may have read other bytes).
    pub fn check_unchanged(&self) -> Result<(), LowerError> {
        Ok(self.indexed.check_unchanged()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{BlobRef, Compression, Digest, FileId};
    use sha2::{Digest as _, Sha256};

    #[test]
    fn the_deepest_path_linux_holds_builds_an_image_on_a_small_stack() {
        // 2048 components (PATH_MAX): every recursion from the merge to
        // the image's tree fits a test thread's 2 MiB stack.
        let dir = tempfile::tempdir().unwrap();
        let deep = "a/".repeat(2047) + "f";
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, &deep, &b"x"[..]).unwrap();
        let tar = b.into_inner().unwrap();
        let path = dir.path().join("layer.tar");
        std::fs::write(&path, &tar).unwrap();
        let digest = Digest::from_sha256(&Sha256::digest(&tar));
        let layer = Layer {
            index: 0,
            blob: BlobRef { file: path.clone(), offset: 0, length: tar.len() as u64 },
            blob_digest: digest.clone(),
            diff_id: digest,
            compression: Compression::None,
            name: "deep".into(),
            stored_identity: FileId::of_path(&path).unwrap(),
        };
        let no_copy = CopySpec { items: &[], store_paths: &[], copy_dirlinks: false };
        let spool = Spool { cache: None, temp_dir: dir.path() };
        let lower = build(&[layer], no_copy, 0, spool, dir.path()).unwrap();
        // The image's root, base/, the 2047 directories and the file.
        assert_eq!(lower.stats.inodes, 2050);
    }
}
