//! The guest (kernel + initramfs) embedded at build time by `build.rs`,
//! written out for a run, or taken from `--kernel`/`--initramfs`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::machine::KernelImages;

const BZIMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/bzImage"));
const VMLINUX: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vmlinux"));
const INITRAMFS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/initramfs.cpio"));

/// Errors finding the guest.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error(
        "this runasroot was built without its guest kernel and initramfs \
         (RUNASROOT_SKIP_GUEST_BUILD=1); rebuild without it, or pass --kernel and --initramfs"
    )]
    NotEmbedded,
    #[error("cannot write the embedded guest to {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {path} does not exist")]
    Missing { what: &'static str, path: PathBuf },
}

/// The guest files for one run.
#[derive(Debug, Clone)]
pub struct Guest {
    pub kernel: KernelImages,
    pub initramfs: PathBuf,
}

/// Whether this binary carries a guest.
pub fn embedded() -> bool {
    !BZIMAGE.is_empty() && !INITRAMFS.is_empty()
}

/// Finds the guest: overrides first, else the embedded files written into
/// `scratch` (a per-run temporary directory): the uncompressed vmlinux
/// (14 MB) only for a launcher that boots it (`want_vmlinux`).
pub fn prepare(kernel: Option<&Path>, initramfs: Option<&Path>, scratch: &Path, want_vmlinux: bool) -> Result<Guest, AssetError> {
    let write = |name: &str, bytes: &[u8]| -> Result<PathBuf, AssetError> {
        let path = scratch.join(name);
        fs::write(&path, bytes).map_err(|source| AssetError::Write { path: path.clone(), source })?;
        Ok(path)
    };
    let kernel = match kernel {
        Some(path) => {
            if !path.exists() {
                return Err(AssetError::Missing { what: "kernel", path: path.to_path_buf() });
            }
            // A user-supplied ELF goes to the built-in VMM as vmlinux; a
            // bzImage serves both launchers.
            let is_elf = fs::read(path).map(|b| b.starts_with(b"\x7fELF")).unwrap_or(false);
            if is_elf {
                KernelImages { bzimage: path.to_path_buf(), vmlinux: Some(path.to_path_buf()) }
            } else {
                KernelImages { bzimage: path.to_path_buf(), vmlinux: None }
            }
        }
        None if embedded() => KernelImages {
            bzimage: write("bzImage", BZIMAGE)?,
            vmlinux: if VMLINUX.is_empty() || !want_vmlinux { None } else { Some(write("vmlinux", VMLINUX)?) },
        },
        None => return Err(AssetError::NotEmbedded),
    };
    let initramfs = match initramfs {
        Some(path) if path.exists() => path.to_path_buf(),
        Some(path) => return Err(AssetError::Missing { what: "initramfs", path: path.to_path_buf() }),
        None if embedded() => write("initramfs.cpio", INITRAMFS)?,
        None => return Err(AssetError::NotEmbedded),
    };
    Ok(Guest { kernel, initramfs })
}
