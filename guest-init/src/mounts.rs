//! The guest's mounts: the early pseudo-filesystems, the scratch tmpfs, and
//! the overlay over the unpacked layers.
//!
//! Layout (all on the initramfs root, which is itself a tmpfs):
//! ```text
//! /proc /sys /dev     early mounts (devtmpfs holds the disks)
//! /scratch            tmpfs, size = job.scratch_mib (+ swap behind it)
//!   l/<i>             lowerdir of layer i (0 = bottom)
//!   upper, work       the overlay's upper and work dirs
//!   empty             an empty lowerdir, for a base without layers
//! /merged             the overlay: the script's root, the export's source
//! ```

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use runasroot_guest::contract::FailureKind;

use crate::fail::GuestError;
use crate::sys;

pub const SCRATCH: &str = "/scratch";
pub const MERGED: &str = "/merged";
/// The kernel refuses a `lowerdir+` value longer than this (fs/overlayfs/params.c).
pub const MAX_LOWERDIR_VALUE: usize = 256;
/// overlayfs stacks at most this many lower layers (OVL_MAX_STACK).
pub const MAX_LAYERS: usize = 500;

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
    #[error("the base has {0} layers; overlayfs stacks at most {MAX_LAYERS}")]
    TooManyLayers(usize),
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
        match self {
            MountError::TooManyLayers(_) => FailureKind::BadInput,
            _ => FailureKind::Internal,
        }
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

/// The scratch tmpfs options: an explicit size (tmpfs defaults to half
/// of RAM and does not count swap), no inode limit (the default, half of
/// RAM in pages, would run out on a base with many small files before the
/// bytes do; running out of RAM for inodes is reported as OOM instead).
pub fn scratch_options(scratch_mib: u64) -> String {
    format!("size={scratch_mib}m,nr_inodes=0,mode=0755")
}

pub fn mount_scratch(scratch_mib: u64) -> Result<(), MountError> {
    mkdir(Path::new(SCRATCH), 0o755)?;
    let opts = scratch_options(scratch_mib);
    mount(Some("scratch"), SCRATCH, Some("tmpfs"), MsFlags::MS_NOSUID, Some(opts.as_str()))
        .map_err(|source| MountError::Mount { fstype: "tmpfs", target: PathBuf::from(SCRATCH), source })?;
    for dir in ["l", "upper", "work", "empty"] {
        mkdir(&Path::new(SCRATCH).join(dir), 0o755)?;
    }
    mkdir(Path::new(MERGED), 0o755)
}

/// The lowerdir of layer `i` (0 = bottom).
pub fn layer_dir(i: usize) -> PathBuf {
    Path::new(SCRATCH).join("l").join(i.to_string())
}

pub fn upper_dir() -> PathBuf {
    Path::new(SCRATCH).join("upper")
}

/// The fsconfig calls that mount the overlay, in order: `lowerdir+` once
/// per layer, the FIRST added being the TOP layer; then upper and work;
/// then the options that keep the upper dir a plain description of the
/// changes (FORMATS.md "overlayfs in the guest": no redirect xattrs on
/// renamed dirs, no metadata-only copy-ups, no hardlink index).
pub fn overlay_plan(lowers_bottom_first: &[PathBuf], upper: &Path, work: &Path) -> Result<Vec<(&'static str, String)>, MountError> {
    if lowers_bottom_first.len() > MAX_LAYERS {
        return Err(MountError::TooManyLayers(lowers_bottom_first.len()));
    }
    let mut plan: Vec<(&'static str, String)> = Vec::new();
    for dir in lowers_bottom_first.iter().rev() {
        plan.push(("lowerdir+", dir.to_string_lossy().into_owned()));
    }
    plan.push(("upperdir", upper.to_string_lossy().into_owned()));
    plan.push(("workdir", work.to_string_lossy().into_owned()));
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

/// Mounts the overlay of the layers at [`MERGED`].
pub fn mount_overlay(layers: usize) -> Result<(), MountError> {
    let mut lowers: Vec<PathBuf> = (0..layers).map(layer_dir).collect();
    if lowers.is_empty() {
        // overlayfs needs at least one lower layer: an empty base gets an
        // empty one, which changes nothing in the merged view.
        lowers.push(Path::new(SCRATCH).join("empty"));
    }
    let plan = overlay_plan(&lowers, &upper_dir(), &Path::new(SCRATCH).join("work"))?;
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
    fn overlay_plan_adds_the_top_layer_first() {
        let lowers: Vec<PathBuf> = (0..3).map(layer_dir).collect();
        let plan = overlay_plan(&lowers, &upper_dir(), Path::new("/scratch/work")).unwrap();
        let got: Vec<String> = plan.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(
            got,
            vec![
                "lowerdir+=/scratch/l/2",
                "lowerdir+=/scratch/l/1",
                "lowerdir+=/scratch/l/0",
                "upperdir=/scratch/upper",
                "workdir=/scratch/work",
                "redirect_dir=off",
                "metacopy=off",
                "index=off",
            ]
        );
    }

    #[test]
    fn overlay_plan_takes_many_layers_and_refuses_too_many() {
        let lowers: Vec<PathBuf> = (0..MAX_LAYERS).map(layer_dir).collect();
        let plan = overlay_plan(&lowers, &upper_dir(), Path::new("/w")).unwrap();
        assert_eq!(plan.len(), MAX_LAYERS + 5);
        assert_eq!(plan[0], ("lowerdir+", format!("/scratch/l/{}", MAX_LAYERS - 1)));
        assert!(plan.iter().all(|(_, v)| v.len() <= MAX_LOWERDIR_VALUE));
        let lowers: Vec<PathBuf> = (0..MAX_LAYERS + 1).map(layer_dir).collect();
        assert!(matches!(overlay_plan(&lowers, &upper_dir(), Path::new("/w")), Err(MountError::TooManyLayers(501))));
        let long = vec![PathBuf::from(format!("/{}", "x".repeat(300)))];
        assert!(matches!(overlay_plan(&long, &upper_dir(), Path::new("/w")), Err(MountError::ValueTooLong { .. })));
    }

    #[test]
    fn scratch_has_an_explicit_size_and_no_inode_limit() {
        assert_eq!(scratch_options(1024), "size=1024m,nr_inodes=0,mode=0755");
    }
}
