//! What the base (the lower image's merged tree, the overlay's only
//! lowerdir) holds at a path, looked up without following symlinks.
//!
//! The host merged the layers, so the lower holds no whiteouts or opaque
//! markers: a path is there when every ancestor is a directory and the
//! last component exists. Used to drop a whiteout in the new layer that
//! hides nothing (the script made and removed a file).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{openat, AtFlags, OFlag, AT_FDCWD};
use nix::sys::stat::{fstatat, Mode, SFlag};

/// The base, open for lookups.
pub struct Lower {
    root: OwnedFd,
}

impl Lower {
    pub fn open(root: &Path) -> io::Result<Lower> {
        let root = openat(AT_FDCWD, root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
        Ok(Lower { root })
    }

    /// Whether the base has anything at `components` (checked one
    /// component at a time: a symlinked ancestor is not followed, since in
    /// the merged view nothing can lie below a non-directory).
    pub fn holds(&self, components: &[&[u8]]) -> io::Result<bool> {
        for n in 1..=components.len() {
            let rel = CString::new(components[..n].join(&b'/'))
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
            let st = match fstatat(self.root.as_fd(), rel.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(nix::Error::ENOENT) | Err(nix::Error::ENOTDIR) => return Ok(false),
                Err(e) => return Err(e.into()),
            };
            let is_dir = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == SFlag::S_IFDIR;
            if n < components.len() && !is_dir {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_only_what_a_walk_without_symlinks_reaches() {
        let dir = tempfile_dir("lower-holds");
        std::fs::create_dir_all(dir.join("etc/sub")).unwrap();
        std::fs::write(dir.join("etc/passwd"), b"").unwrap();
        std::fs::write(dir.join("file"), b"").unwrap();
        std::os::unix::fs::symlink("etc", dir.join("link")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.join("dangling")).unwrap();
        let lower = Lower::open(&dir).unwrap();
        let table: &[(&str, bool)] = &[
            ("etc", true),
            ("etc/passwd", true),
            ("etc/sub", true),
            ("etc/none", false),
            ("none/x", false),
            ("file", true),
            ("file/x", false),
            ("link", true),
            ("link/passwd", false),
            ("dangling", true),
        ];
        for (path, want) in table {
            let comps: Vec<&[u8]> = path.split('/').map(str::as_bytes).collect();
            assert_eq!(lower.holds(&comps).unwrap(), *want, "{path}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("rar-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
