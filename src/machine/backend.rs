//! What a disk reads and writes: one host file, or (read-only) ranges of
//! several host files one after another, so that one disk can serve the
//! lower image and the layers' own bytes behind it (EROFS flat mode)
//! without copying any of them into a new file. The built-in VMM's
//! virtio-blk device reads it directly; QEMU reads it through [`super::nbd`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;

use crate::machine::{Backing, Extent};

/// An open disk backing.
#[derive(Debug)]
pub enum Backend {
    File(File),
    Concat(Concat),
}

/// Extents sorted by disk offset, each open; what no extent covers reads
/// as zeros (alignment padding between files, the tail).
#[derive(Debug)]
pub struct Concat {
    extents: Vec<(Extent, File)>,
    len: u64,
}

impl Backend {
    /// Opens what `backing` names; a concatenation is always read-only.
    pub fn open(backing: &Backing, read_only: bool) -> Result<Backend, (std::path::PathBuf, io::Error)> {
        match backing {
            Backing::File(path) => OpenOptions::new()
                .read(true)
                .write(!read_only)
                .open(path)
                .map(Backend::File)
                .map_err(|e| (path.clone(), e)),
            Backing::Concat { extents, len } => {
                let mut open = Vec::with_capacity(extents.len());
                for x in extents {
                    let f = File::open(&x.path).map_err(|e| (x.path.clone(), e))?;
                    open.push((x.clone(), f));
                }
                open.sort_by_key(|(x, _)| x.at);
                Ok(Backend::Concat(Concat { extents: open, len: *len }))
            }
        }
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> io::Result<u64> {
        match self {
            Backend::File(f) => Ok(f.metadata()?.len()),
            Backend::Concat(c) => Ok(c.len),
        }
    }

    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Backend::File(f) => f.read_exact_at(buf, offset),
            Backend::Concat(c) => c.read_exact_at(buf, offset),
        }
    }

    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Backend::File(f) => f.write_all_at(buf, offset),
            Backend::Concat(_) => Err(io::Error::new(io::ErrorKind::PermissionDenied, "a concatenated disk is read-only")),
        }
    }

    pub fn sync_data(&self) -> io::Result<()> {
        match self {
            Backend::File(f) => f.sync_data(),
            Backend::Concat(_) => Ok(()),
        }
    }
}

impl Concat {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the disk"));
        }
        buf.fill(0);
        // The first extent that may overlap: the last one starting at or
        // before `offset` (extents do not overlap each other).
        let first = self.extents.partition_point(|(x, _)| x.at <= offset).saturating_sub(1);
        for (x, f) in &self.extents[first..] {
            let (lo, hi) = (offset.max(x.at), (offset + buf.len() as u64).min(x.at + x.len));
            if x.at >= offset + buf.len() as u64 {
                break;
            }
            if lo >= hi {
                continue;
            }
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            f.read_exact_at(dst, x.offset + (lo - x.at))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn a_concatenation_reads_each_extent_where_it_lies_and_zeros_between() {
        let a = file_with(b"AAAAAAAA");
        let b = file_with(b"xxBBBByy");
        let x = |path: &std::path::Path, offset, len, at| Extent { path: path.to_path_buf(), offset, len, at };
        let backing = Backing::Concat { extents: vec![x(b.path(), 2, 4, 10), x(a.path(), 0, 8, 0)], len: 20 };
        let disk = Backend::open(&backing, true).unwrap();
        assert_eq!(disk.size().unwrap(), 20);
        let mut all = [9u8; 20];
        disk.read_exact_at(&mut all, 0).unwrap();
        assert_eq!(&all, b"AAAAAAAA\0\0BBBB\0\0\0\0\0\0");
        let table: &[(u64, usize, &[u8])] = &[(6, 6, b"AA\0\0BB"), (11, 2, b"BB"), (14, 6, b"\0\0\0\0\0\0"), (0, 0, b"")];
        for &(at, n, want) in table {
            let mut got = vec![7u8; n];
            disk.read_exact_at(&mut got, at).unwrap();
            assert_eq!(got, want, "{at}+{n}");
        }
        assert!(disk.read_exact_at(&mut [0u8; 2], 19).is_err(), "past the end");
        assert!(disk.write_all_at(b"x", 0).is_err(), "read-only");
        let missing = Backing::Concat { extents: vec![x(&PathBuf::from("/nonexistent"), 0, 1, 0)], len: 1 };
        assert_eq!(Backend::open(&missing, true).unwrap_err().0, PathBuf::from("/nonexistent"));
    }

    #[test]
    fn a_short_file_under_an_extent_is_an_error_not_zeros() {
        let a = file_with(b"AB");
        let backing = Backing::Concat { extents: vec![Extent { path: a.path().to_path_buf(), offset: 0, len: 8, at: 0 }], len: 8 };
        let disk = Backend::open(&backing, true).unwrap();
        assert!(disk.read_exact_at(&mut [0u8; 8], 0).is_err());
    }
}
