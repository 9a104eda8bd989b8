//! What the stack of unpacked lowerdirs shows at a path, resolved the way
//! overlayfs resolves it, without mounting anything.
//!
//! Used to give an implicit parent directory its metadata from below, to
//! materialise a hardlink whose target is in a lower layer, and to drop a
//! whiteout in the new layer that hides nothing.
//!
//! overlayfs lookup, one component at a time, over the layers that still
//! contribute to the parent directory (top first): the topmost layer that
//! has the name decides. A whiteout there means "absent"; a non-directory
//! hides everything below it; a directory merges with the directories of
//! the same name below, until one of them is opaque or a layer below has a
//! non-directory (which is ignored and ends the merge).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{openat, OFlag, AT_FDCWD};
use nix::sys::stat::{fstatat, FileStat, Mode, SFlag};
use nix::fcntl::AtFlags;

use runasroot_guest::whiteout;

use crate::sys;

/// What one layer holds at one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Missing,
    /// A char device 0:0: deleted from the layers below.
    Whiteout,
    Dir { opaque: bool },
    /// Anything else: file, symlink, device, fifo, socket.
    Other,
}

/// What the stack shows at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visible {
    Missing,
    /// A directory; its metadata comes from this (the topmost) layer.
    Dir { layer: usize },
    /// A non-directory, from this layer.
    NonDir { layer: usize },
    /// The path cannot exist because an ancestor (the first `depth`
    /// components) is a non-directory in `layer`.
    BelowNonDir { depth: usize, layer: usize },
}

/// Resolves a path of `depth` components over `layers_top_first`;
/// `probe(layer, n)` says what `layer` holds at the first `n` components.
pub fn resolve(
    layers_top_first: &[usize],
    depth: usize,
    mut probe: impl FnMut(usize, usize) -> io::Result<Probe>,
) -> io::Result<Visible> {
    let mut active: Vec<usize> = layers_top_first.to_vec();
    if depth == 0 {
        return Ok(active.first().map_or(Visible::Missing, |&layer| Visible::Dir { layer }));
    }
    for n in 1..=depth {
        let mut dirs = Vec::new();
        let mut top_non_dir = None;
        for &layer in &active {
            match probe(layer, n)? {
                Probe::Missing => continue,
                Probe::Whiteout => break,
                Probe::Dir { opaque } => {
                    dirs.push(layer);
                    if opaque {
                        break;
                    }
                }
                Probe::Other => {
                    if dirs.is_empty() {
                        top_non_dir = Some(layer);
                    }
                    break;
                }
            }
        }
        if let Some(layer) = top_non_dir {
            return Ok(if n == depth { Visible::NonDir { layer } } else { Visible::BelowNonDir { depth: n, layer } });
        }
        if dirs.is_empty() {
            return Ok(Visible::Missing);
        }
        active = dirs;
    }
    Ok(Visible::Dir { layer: active[0] })
}

/// The unpacked lowerdirs, open for lookups.
pub struct Lowers {
    /// Root fds of the layers, bottom first.
    roots: Vec<OwnedFd>,
}

impl Lowers {
    pub fn new() -> Lowers {
        Lowers { roots: Vec::new() }
    }

    /// Adds the next layer up (opened by path, a directory).
    pub fn push(&mut self, root: &Path) -> io::Result<()> {
        let fd = openat(AT_FDCWD, root, OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
        self.roots.push(fd);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.roots.len()
    }

    pub fn root(&self, layer: usize) -> std::os::fd::BorrowedFd<'_> {
        self.roots[layer].as_fd()
    }

    /// lstat of `rel` (components joined by `/`) in `layer`; None if absent.
    pub fn lstat(&self, layer: usize, rel: &[u8]) -> io::Result<Option<FileStat>> {
        let c = CString::new(rel).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        match fstatat(self.roots[layer].as_fd(), c.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            // ENOTDIR: an ancestor is not a directory in this layer, so it
            // does not hold the path either.
            Err(nix::Error::ENOENT) | Err(nix::Error::ENOTDIR) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn probe(&self, layer: usize, rel: &[u8]) -> io::Result<Probe> {
        let Some(st) = self.lstat(layer, rel)? else { return Ok(Probe::Missing) };
        let kind = SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits());
        Ok(match kind {
            SFlag::S_IFDIR => {
                let path = sys::fd_path(self.roots[layer].as_fd(), rel)?;
                let value = sys::lgetxattr(&path, c"trusted.overlay.opaque")?;
                Probe::Dir { opaque: value.as_deref().is_some_and(whiteout::is_opaque_value) }
            }
            SFlag::S_IFCHR if st.st_rdev == 0 => Probe::Whiteout,
            _ => Probe::Other,
        })
    }

    /// What layers `0..below` show at `components`.
    pub fn visible(&self, below: usize, components: &[&[u8]]) -> io::Result<Visible> {
        let top_first: Vec<usize> = (0..below.min(self.roots.len())).rev().collect();
        let joined: Vec<Vec<u8>> = (1..=components.len()).map(|n| components[..n].join(&b'/')).collect();
        resolve(&top_first, components.len(), |layer, n| self.probe(layer, &joined[n - 1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A fake stack: (layer, path) → probe.
    fn stack(entries: &[(usize, &str, Probe)]) -> HashMap<(usize, String), Probe> {
        entries.iter().map(|(l, p, k)| ((*l, p.to_string()), *k)).collect()
    }

    fn look(stack: &HashMap<(usize, String), Probe>, layers: usize, path: &str) -> Visible {
        let comps: Vec<&str> = path.split('/').collect();
        let top_first: Vec<usize> = (0..layers).rev().collect();
        resolve(&top_first, comps.len(), |layer, n| {
            Ok(*stack.get(&(layer, comps[..n].join("/"))).unwrap_or(&Probe::Missing))
        })
        .unwrap()
    }

    const D: Probe = Probe::Dir { opaque: false };
    const O: Probe = Probe::Dir { opaque: true };

    #[test]
    fn resolves_like_overlayfs() {
        let s = stack(&[
            (0, "etc", D),
            (0, "etc/passwd", Probe::Other),
            (0, "etc/old", Probe::Other),
            (1, "etc", D),
            (1, "etc/old", Probe::Whiteout),
            (0, "opq", D),
            (0, "opq/hidden", Probe::Other),
            (1, "opq", O),
            (1, "opq/shown", Probe::Other),
            (0, "bin", Probe::Other),
            (1, "bin", D),
            (1, "bin/sh", Probe::Other),
            (0, "lnk", D),
            (0, "lnk/x", Probe::Other),
            (1, "lnk", Probe::Other),
            (2, "etc", D),
        ]);
        let table: &[(&str, Visible)] = &[
            ("etc", Visible::Dir { layer: 2 }),
            ("etc/passwd", Visible::NonDir { layer: 0 }),
            ("etc/old", Visible::Missing),
            ("etc/none", Visible::Missing),
            ("opq/hidden", Visible::Missing),
            ("opq/shown", Visible::NonDir { layer: 1 }),
            ("opq", Visible::Dir { layer: 1 }),
            // A dir over a non-dir: the lower non-dir is ignored.
            ("bin", Visible::Dir { layer: 1 }),
            ("bin/sh", Visible::NonDir { layer: 1 }),
            // A non-dir over a dir hides the dir's contents.
            ("lnk", Visible::NonDir { layer: 1 }),
            ("lnk/x", Visible::BelowNonDir { depth: 1, layer: 1 }),
            ("lnk/x/y", Visible::BelowNonDir { depth: 1, layer: 1 }),
            ("nothing/here", Visible::Missing),
        ];
        for (path, want) in table {
            assert_eq!(look(&s, 3, path), *want, "{path}");
        }
        // Seen from layer 1 down only (unpacking layer 1).
        assert_eq!(look(&s, 1, "etc/old"), Visible::NonDir { layer: 0 });
        assert_eq!(look(&s, 1, "lnk/x"), Visible::NonDir { layer: 0 });
        assert_eq!(look(&s, 0, "etc"), Visible::Missing);
    }
}
