//! Which files the lower image reads file data from (its extra devices),
//! and where each layer's tar lies on them: decided from the files alone
//! ([`plan`]), then done ([`gather`], only when a launcher has fewer disk
//! slots than there are files).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::LowerError;
use crate::erofs::BLOCK_SIZE;

/// Alignment of each device in the flat layout and of each range in a
/// gather file: a page, so the guest's reads start on page boundaries.
pub const DEVICE_ALIGN: u64 = 4096;

/// How the launcher takes the lower's devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One disk: the image, then every device (the built-in VMM).
    Flat,
    /// The image, and at most `max` more disks, one per device (QEMU).
    Disks { max: usize },
}

/// A layer's uncompressed tar: `len` bytes at `base` of `path` (whose
/// size is `file_len`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRange {
    pub path: PathBuf,
    pub file_len: u64,
    pub base: u64,
    pub len: u64,
}

/// An extra device of the image: a whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub path: PathBuf,
    pub len: u64,
}

impl Device {
    /// Its size in EROFS blocks as the guest sees it: QEMU rounds a file
    /// down to whole sectors; the flat disk pads each file with zeros.
    pub fn blocks(&self, layout: Layout) -> u64 {
        match layout {
            Layout::Flat => self.len.div_ceil(BLOCK_SIZE),
            Layout::Disks { .. } => self.len / BLOCK_SIZE,
        }
    }

    pub fn padded_len(&self) -> u64 {
        self.len.next_multiple_of(BLOCK_SIZE)
    }
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Files kept as devices, in the order their first layer comes.
    pub kept: Vec<Device>,
    /// Sources copied into the gather file: (source index, offset there).
    pub gather: Vec<(usize, u64)>,
    /// The gather file's length.
    pub gather_len: u64,
    /// Per source: (device index, offset of its tar on that device). The
    /// gather file, when there is one, is device `kept.len()`.
    pub placement: Vec<(usize, u64)>,
}

/// Decides the devices for `sources` (one per layer, bottom first).
pub fn plan(sources: &[SourceRange], layout: Layout) -> Plan {
    // Distinct files, first appearance first.
    let mut files: Vec<(PathBuf, u64)> = Vec::new();
    for s in sources {
        if !files.iter().any(|(p, _)| p == &s.path) {
            files.push((s.path.clone(), s.file_len));
        }
    }
    let keep: Vec<bool> = match layout {
        Layout::Flat => vec![true; files.len()],
        Layout::Disks { max } => {
            // QEMU drops a trailing partial sector: such a file is copied
            // (padded) rather than served short.
            let whole = |len: u64| len % BLOCK_SIZE == 0 && len > 0;
            if files.len() <= max && files.iter().all(|(_, len)| whole(*len)) {
                vec![true; files.len()]
            } else {
                // One slot for the gather file; the biggest files keep the
                // others (the fewest bytes copied).
                let mut by_size: Vec<usize> = (0..files.len()).filter(|&i| whole(files[i].1)).collect();
                by_size.sort_by_key(|&i| std::cmp::Reverse(files[i].1));
                let mut keep = vec![false; files.len()];
                for &i in by_size.iter().take(max.saturating_sub(1)) {
                    keep[i] = true;
                }
                keep
            }
        }
    };
    let kept: Vec<Device> =
        files.iter().zip(&keep).filter(|(_, k)| **k).map(|((p, len), _)| Device { path: p.clone(), len: *len }).collect();
    let device_of = |path: &Path| kept.iter().position(|d| d.path == path);
    let mut gather: Vec<(usize, u64)> = Vec::new();
    let mut gather_len = 0u64;
    let mut placement = Vec::with_capacity(sources.len());
    for (i, s) in sources.iter().enumerate() {
        if let Some(d) = device_of(&s.path) {
            placement.push((d, s.base));
            continue;
        }
        // A layer listed twice is copied once.
        let earlier = sources[..i].iter().position(|o| o == s).and_then(|j| gather.iter().find(|(k, _)| *k == j));
        let offset = match earlier {
            Some(&(_, off)) => off,
            None => {
                let off = gather_len;
                gather.push((i, off));
                gather_len = (off + s.len).next_multiple_of(DEVICE_ALIGN);
                off
            }
        };
        placement.push((kept.len(), offset));
    }
    Plan { kept, gather, gather_len, placement }
}

impl Plan {
    /// The devices in device-table order: the kept files, then the
    /// gather file (`gathered`) if there is one.
    pub fn devices(&self, gathered: Option<&Path>) -> Vec<Device> {
        let mut d = self.kept.clone();
        if let Some(path) = gathered {
            d.push(Device { path: path.to_path_buf(), len: self.gather_len });
        }
        d
    }
}

/// A gather file, removed when dropped.
#[derive(Debug)]
pub struct Gathered {
    temp: tempfile::TempPath,
    pub bytes: u64,
}

impl Gathered {
    pub fn path(&self) -> &Path {
        &self.temp
    }

    pub fn into_temp(self) -> tempfile::TempPath {
        self.temp
    }
}

/// Copies the planned sources into a new file in `dir`.
pub fn gather(plan: &Plan, sources: &[SourceRange], dir: &Path) -> Result<Gathered, LowerError> {
    let temp = tempfile::Builder::new()
        .prefix("gather-")
        .suffix(".img")
        .tempfile_in(dir)
        .map_err(|source| LowerError::Gather { path: dir.to_path_buf(), source })?;
    let (mut out, temp) = temp.into_parts();
    let err = |source| LowerError::Gather { path: temp.to_path_buf(), source };
    let mut bytes = 0;
    for &(i, offset) in &plan.gather {
        let s = &sources[i];
        let mut src = File::open(&s.path).map_err(err)?;
        src.seek(SeekFrom::Start(s.base)).map_err(err)?;
        out.seek(SeekFrom::Start(offset)).map_err(err)?;
        // std copies File→File with copy_file_range: no user-space buffer.
        let n = io::copy(&mut src.take(s.len), &mut out).map_err(err)?;
        if n != s.len {
            return Err(err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} ends early", s.path.display()))));
        }
        bytes += n;
    }
    out.flush().map_err(err)?;
    out.set_len(plan.gather_len.next_multiple_of(BLOCK_SIZE)).map_err(err)?;
    Ok(Gathered { temp, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(path: &str, file_len: u64, base: u64, len: u64) -> SourceRange {
        SourceRange { path: PathBuf::from(path), file_len, base, len }
    }

    fn dev(path: &str, len: u64) -> Device {
        Device { path: PathBuf::from(path), len }
    }

    #[test]
    fn plans_devices_for_each_layout() {
        // A docker-archive whose two plain layers are in the archive and
        // whose gzip layer was spooled.
        let archive = [src("/a.tar", 10240, 1536, 2048), src("/spool/x", 4096, 0, 4096), src("/a.tar", 10240, 4608, 1024)];
        let cases: Vec<(&str, Vec<SourceRange>, Layout, Plan)> = vec![
            (
                "flat: every file a device, none copied",
                archive.to_vec(),
                Layout::Flat,
                Plan {
                    kept: vec![dev("/a.tar", 10240), dev("/spool/x", 4096)],
                    gather: vec![],
                    gather_len: 0,
                    placement: vec![(0, 1536), (1, 0), (0, 4608)],
                },
            ),
            (
                "disks: enough slots",
                archive.to_vec(),
                Layout::Disks { max: 4 },
                Plan {
                    kept: vec![dev("/a.tar", 10240), dev("/spool/x", 4096)],
                    gather: vec![],
                    gather_len: 0,
                    placement: vec![(0, 1536), (1, 0), (0, 4608)],
                },
            ),
            (
                "disks: too few slots, the smaller file is gathered",
                archive.to_vec(),
                Layout::Disks { max: 1 },
                Plan {
                    kept: vec![],
                    gather: vec![(0, 0), (1, 4096), (2, 8192)],
                    gather_len: 12288,
                    placement: vec![(0, 0), (0, 4096), (0, 8192)],
                },
            ),
            (
                "disks: the biggest files keep their slots",
                vec![src("/b1", 1 << 20, 0, 1 << 20), src("/b2", 512, 0, 512), src("/b3", 1 << 30, 0, 1 << 30), src("/b4", 1024, 0, 1024)],
                Layout::Disks { max: 3 },
                Plan {
                    kept: vec![dev("/b1", 1 << 20), dev("/b3", 1 << 30)],
                    gather: vec![(1, 0), (3, 4096)],
                    gather_len: 8192,
                    placement: vec![(0, 0), (2, 0), (1, 0), (2, 4096)],
                },
            ),
            (
                "disks: a file QEMU would cut short is copied, padded; a repeated layer once",
                vec![src("/odd", 1000, 0, 1000), src("/even", 1024, 0, 1024), src("/odd", 1000, 0, 1000)],
                Layout::Disks { max: 4 },
                Plan {
                    kept: vec![dev("/even", 1024)],
                    gather: vec![(0, 0)],
                    gather_len: 4096,
                    placement: vec![(1, 0), (0, 0), (1, 0)],
                },
            ),
        ];
        for (name, sources, layout, want) in cases {
            assert_eq!(plan(&sources, layout), want, "{name}");
        }
    }

    #[test]
    fn device_sizes_follow_what_the_launcher_shows() {
        let d = dev("/x", 1000);
        assert_eq!((d.blocks(Layout::Flat), d.blocks(Layout::Disks { max: 1 }), d.padded_len()), (2, 1, 1024));
    }

    #[test]
    fn gathers_each_range_at_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"xxHELLOyy").unwrap();
        let b = dir.path().join("b");
        std::fs::write(&b, b"WORLD").unwrap();
        let sources = vec![
            SourceRange { path: a.clone(), file_len: 9, base: 2, len: 5 },
            SourceRange { path: b.clone(), file_len: 5, base: 0, len: 5 },
        ];
        let p = plan(&sources, Layout::Disks { max: 1 });
        let g = gather(&p, &sources, dir.path()).unwrap();
        let bytes = std::fs::read(g.path()).unwrap();
        assert_eq!((bytes.len(), g.bytes), (8192, 10));
        assert_eq!(&bytes[..5], b"HELLO");
        assert_eq!(&bytes[4096..4101], b"WORLD");
        assert_eq!(p.devices(Some(g.path())), vec![Device { path: g.path().to_path_buf(), len: 8192 }]);
        let short = vec![SourceRange { path: a, file_len: 9, base: 5, len: 50 }];
        let p = plan(&short, Layout::Disks { max: 1 });
        assert!(matches!(gather(&p, &short, dir.path()), Err(LowerError::Gather { .. })));
    }
}
