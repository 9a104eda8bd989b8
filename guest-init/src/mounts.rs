//! The guest's mounts: the early pseudo-filesystems, the lower image, the
//! scratch tmpfs, and the overlay.
//!
//! Layout (all on the initramfs root, which is itself a tmpfs):
//! ```text
//! /proc /sys /dev     early mounts (devtmpfs holds the disks)
//! /lower              the host's EROFS image, read-only
//!   base              the merged base image: the overlay's only lowerdir
//!   copy              the --copy-to-root tree (when there is one)
//! /scratch            tmpfs, size = job.scratch_mib (+ swap behind it)
//!   upper, work       the overlay's upper and work dirs
//! /merged             the overlay: the script's root, the export's source
//! ```

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use runasroot_guest::contract::{self, FailureKind};

use crate::fail::GuestError;
use crate::sys;

pub const LOWER: &str = "/lower";
pub const SCRATCH: &str = "/scratch";
pub const MERGED: &str = "/merged";
/// The kernel refuses a `lowerdir+` value longer than this (fs/overlayfs/params.c).
pub const MAX_LOWERDIR_VALUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("creating mountpoint {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting {fstype} on {target}")]
    Mount {
        fstype: &'static str,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("opening {path} in the lower image")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting the lower image {device} on {LOWER} (erofs)")]
    Lower {
        device: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("overlay option {key}={value:?} is longer than the kernel's {MAX_LOWERDIR_VALUE} bytes")]
    ValueTooLong { key: &'static str, value: String },
    #[error("mounting the overlay on {target} (option {step})")]
    Overlay {
        target: String,
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("enabling swap on {path} (the scratch disk beyond RAM)")]
    Swapon {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unmounting {target}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
}

impl GuestError for MountError {
    fn kind(&self) -> FailureKind {
        FailureKind::Internal
    }
}

/// One entry of a mount table.
pub struct MountSpec {
    pub source: &'static str,
    pub target: &'static str,
    pub fstype: &'static str,
    pub flags: MsFlags,
    pub data: Option<&'static str>,
}

/// What PID 1 mounts before anything else: /proc (uptime, vmstat, fd
/// paths), /sys (disk serials), /dev (the disk nodes; the kernel does not
/// mount devtmpfs for us: CONFIG_DEVTMPFS_MOUNT is off).
pub const EARLY: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC),
        data: None,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV).union(MsFlags::MS_NOEXEC),
        data: None,
    },
    MountSpec { source: "devtmpfs", target: "/dev", fstype: "devtmpfs", flags: MsFlags::MS_NOSUID, data: None },
];

pub fn mkdir(path: &Path, mode: u32) -> Result<(), MountError> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(MountError::Mkdir { path: path.to_path_buf(), source }),
    }
}

pub fn mount_spec(spec: &MountSpec) -> Result<(), MountError> {
    mkdir(Path::new(spec.target), 0o755)?;
    mount(Some(spec.source), spec.target, Some(spec.fstype), spec.flags, spec.data).map_err(|source| {
        MountError::Mount { fstype: spec.fstype, target: PathBuf::from(spec.target), source }
    })
}

pub fn mount_early() -> Result<(), MountError> {
    EARLY.iter().try_for_each(mount_spec)
}

/// Mounts the lower image read-only at [`LOWER`]. No `device=` option:
/// the image's devices follow it on the same disk, where its device
/// table's `mapped_blkaddr`s point (EROFS flat mode, fs/erofs/super.c).
pub fn mount_lower(device: &Path) -> Result<(), MountError> {
    mkdir(Path::new(LOWER), 0o755)?;
    mount(Some(device), LOWER, Some("erofs"), MsFlags::MS_RDONLY, None::<&str>)
        .map_err(|source| MountError::Lower { device: device.to_path_buf(), source })
}

/// The merged base inside the lower image.
pub fn lower_base() -> PathBuf {
    Path::new(LOWER).join(contract::LOWER_BASE)
}

/// The copy-to-root tree inside the lower image.
pub fn lower_copy() -> PathBuf {
    Path::new(LOWER).join(contract::LOWER_COPY)
}

/// The scratch tmpfs options: an explicit size (tmpfs defaults to half
/// of RAM and does not count swap), no inode limit (the default, half of
/// RAM in pages, could run out before the bytes do; running out of RAM
/// for inodes is reported as OOM instead).
pub fn scratch_options(scratch_mib: u64) -> String {
    format!("size={scratch_mib}m,nr_inodes=0,mode=0755")
}

pub fn mount_scratch(scratch_mib: u64) -> Result<(), MountError> {
    mkdir(Path::new(SCRATCH), 0o755)?;
    let opts = scratch_options(scratch_mib);
    mount(Some("scratch"), SCRATCH, Some("tmpfs"), MsFlags::MS_NOSUID, Some(opts.as_str()))
        .map_err(|source| MountError::Mount { fstype: "tmpfs", target: PathBuf::from(SCRATCH), source })?;
    for dir in ["upper", "work"] {
        mkdir(&Path::new(SCRATCH).join(dir), 0o755)?;
    }
    mkdir(Path::new(MERGED), 0o755)
}

pub fn upper_dir() -> PathBuf {
    Path::new(SCRATCH).join("upper")
}

/// The fsconfig calls that mount the overlay, in order: the lower (the
/// merged base, read-only), upper and work; then the options that keep
/// the upper dir a plain description of the changes (FORMATS.md
/// "overlayfs in the guest": no redirect xattrs on renamed dirs, no
/// metadata-only copy-ups, no hardlink index).
pub fn overlay_plan(lower: &Path, upper: &Path, work: &Path) -> Result<Vec<(&'static str, String)>, MountError> {
    let mut plan: Vec<(&'static str, String)> = vec![
        ("lowerdir+", lower.to_string_lossy().into_owned()),
        ("upperdir", upper.to_string_lossy().into_owned()),
        ("workdir", work.to_string_lossy().into_owned()),
    ];
    for key in ["redirect_dir", "metacopy", "index"] {
        plan.push((key, "off".into()));
    }
    for (key, value) in &plan {
        if value.len() > MAX_LOWERDIR_VALUE {
            return Err(MountError::ValueTooLong { key, value: value.clone() });
        }
    }
    Ok(plan)
}

/// Mounts the overlay of the merged base at [`MERGED`].
pub fn mount_overlay() -> Result<(), MountError> {
    let plan = overlay_plan(&lower_base(), &upper_dir(), &Path::new(SCRATCH).join("work"))?;
    let fail = |step: String, source| MountError::Overlay { target: MERGED.into(), step, source };
    let ctx = sys::FsContext::open("overlay").map_err(|e| fail("fsopen".into(), e))?;
    for (key, value) in &plan {
        ctx.set_string(key, value.as_bytes()).map_err(|e| fail(format!("{key}={value}"), e))?;
    }
    let target = CString::new(MERGED).expect("constant path");
    ctx.mount_at(&target).map_err(|e| fail("create".into(), e))
}

pub fn swapon(path: &Path) -> Result<(), MountError> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).expect("device paths have no NUL");
    sys::swapon(&c).map_err(|source| MountError::Swapon { path: path.to_path_buf(), source })
}

/// Unmounts `target`; if something still holds it (nothing should: no
/// process is left), detaches it, which is as good for a quiescent tree.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    match umount2(target, MntFlags::empty()) {
        Err(nix::Error::EBUSY) => umount2(target, MntFlags::MNT_DETACH),
        r => r,
    }
    .map_err(|source| MountError::Unmount { target: target.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_plan_has_one_lower_and_keeps_the_upper_plain() {
        let plan = overlay_plan(&lower_base(), &upper_dir(), Path::new("/scratch/work")).unwrap();
        let got: Vec<String> = plan.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            got,
            vec![
                "lowerdir+=/lower/base",
                "upperdir=/scratch/upper",
                "workdir=/scratch/work",
                "redirect_dir=off",
                "metacopy=off",
                "index=off",
            ]
        );
        let long = PathBuf::from(format!("/{}", "x".repeat(300)));
        assert!(matches!(overlay_plan(&long, &upper_dir(), Path::new("/w")), Err(MountError::ValueTooLong { .. })));
    }

    #[test]
    fn scratch_has_an_explicit_size_and_no_inode_limit() {
        assert_eq!(scratch_options(1024), "size=1024m,nr_inodes=0,mode=0755");
    }
}
