//! Writing decompressed bytes to disk without filling it.
//!
//! A compressed layer (or an archive compressed as a whole) is spooled
//! to a file once, to be read by offset. Its compressed size says
//! nothing of what it decompresses to: 4 MiB of gzip holds 4 GiB of
//! zeros, a little zstd holds terabytes. [`Spooler`] writes through to
//! the file and looks at the filesystem's free space as it goes; it stops
//! before leaving less than [`KEEP_FREE_BYTES`] (or [`KEEP_FREE_FRACTION`]
//! of a small filesystem) to the other users of the disk, and says how
//! much it had written and how much was free ([`Full`]), so the caller
//! names the layer and the space it needed. The file it wrote is the
//! caller's to remove (they are temporary or pending cache files).

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Free space a spool leaves on its filesystem, at most: what a host
/// needs to keep working (logs, other builds) while runasroot runs.
pub const KEEP_FREE_BYTES: u64 = 1 << 30;
/// On a filesystem smaller than 20 GiB, the space left free is this
/// fraction of its size instead (1/20: 5%), so a small TMPDIR (a 512 MiB
/// tmpfs in CI) still holds layers.
pub const KEEP_FREE_FRACTION: u64 = 20;
/// Least bytes written between two looks at the free space (statvfs):
/// far from the limit it looks less often, near it at every megabyte.
const LOOK_EVERY_MIN: u64 = 1 << 20;

/// Free space of a filesystem, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Available to an unprivileged writer (`f_bavail`).
    pub available: u64,
    /// The filesystem's size (`f_blocks`).
    pub size: u64,
}

impl Space {
    /// What a spool leaves free here.
    pub fn keep(&self) -> u64 {
        KEEP_FREE_BYTES.min(self.size / KEEP_FREE_FRACTION)
    }
}

/// The free space of the filesystem holding `dir`.
pub fn space_of(dir: &Path) -> io::Result<Space> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    let frag = s.fragment_size() as u64;
    Ok(Space { available: s.blocks_available() as u64 * frag, size: s.blocks() as u64 * frag })
}

/// Why a spool stopped: the error inside the `io::Error` a [`Spooler`]
/// returns ([`Full::of`] finds it), for the caller to name its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Full {
    pub dir: PathBuf,
    /// Bytes written when it stopped: the input needs more than this.
    pub written: u64,
    pub space: Space,
}

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} has {} free and runasroot leaves {} free; it stopped after writing {}",
            self.dir.display(),
            human(self.space.available),
            human(self.space.keep()),
            human(self.written)
        )
    }
}

impl std::error::Error for Full {}

impl Full {
    /// The `Full` inside an error a spool returned, if that is why it
    /// failed.
    pub fn of(e: &io::Error) -> Option<&Full> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<Full>())
    }
}

/// `n` bytes for a person: `512 bytes`, `3.0 MiB`, `4.2 GiB`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// A writer to a file in `dir` that stops before the disk fills.
pub struct Spooler<W> {
    inner: W,
    dir: PathBuf,
    written: u64,
    /// Written bytes at which to look at the free space again.
    next_look: u64,
    look: fn(&Path) -> io::Result<Space>,
}

impl<W: Write> Spooler<W> {
    pub fn new(inner: W, dir: &Path) -> Spooler<W> {
        Spooler::looking_with(inner, dir, space_of)
    }

    /// With another way to learn the free space (tests).
    pub fn looking_with(inner: W, dir: &Path, look: fn(&Path) -> io::Result<Space>) -> Spooler<W> {
        Spooler { inner, dir: dir.to_path_buf(), written: 0, next_look: 0, look }
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    fn full(&self, space: Space) -> io::Error {
        io::Error::other(Full { dir: self.dir.clone(), written: self.written, space })
    }
}

impl<W: Write> Write for Spooler<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let end = self.written + buf.len() as u64;
        if end > self.next_look {
            // A filesystem that cannot say (statvfs refused) is written
            // until it is full, as without this check.
            if let Ok(space) = (self.look)(&self.dir) {
                let room = space.available.saturating_sub(space.keep());
                if (buf.len() as u64) > room {
                    return Err(self.full(space));
                }
                self.next_look = self.written + (room / 2).max(LOOK_EVERY_MIN).min(room);
            }
        }
        match self.inner.write(buf) {
            Ok(n) => {
                self.written += n as u64;
                Ok(n)
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => {
                let space = (self.look)(&self.dir).unwrap_or(Space { available: 0, size: 0 });
                Err(self.full(space))
            }
            Err(e) => Err(e),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.inner.flush() {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) => {
                let space = (self.look)(&self.dir).unwrap_or(Space { available: 0, size: 0 });
                Err(self.full(space))
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// What the test's spool wrote to its pretend filesystem.
        static USED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// A filesystem of 100 MiB with 20 MiB available before the spool
    /// writes to it: 5 MiB is kept.
    fn small(_: &Path) -> io::Result<Space> {
        Ok(Space { available: (20 << 20) - USED.get(), size: 100 << 20 })
    }

    /// Writes to the pretend filesystem.
    struct Disk;
    impl Write for Disk {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            USED.set(USED.get() + buf.len() as u64);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn keeps_a_share_of_small_filesystems_and_a_gibibyte_of_large_ones() {
        let table = [(100 << 20, 5 << 20), (20 << 30, 1 << 30), (2 << 40, 1 << 30), (0, 0)];
        for (size, keep) in table {
            assert_eq!(Space { available: 0, size }.keep(), keep, "size {size}");
        }
    }

    #[test]
    fn stops_before_the_space_kept_and_says_how_far_it_got() {
        let mut s = Spooler::looking_with(Disk, Path::new("/spool"), small);
        let chunk = vec![0u8; 256 << 10];
        let err = loop {
            if let Err(e) = s.write_all(&chunk) {
                break e;
            }
        };
        let full = Full::of(&err).expect("a Full inside").clone();
        // 15 MiB of room, written in 256 KiB pieces.
        assert_eq!(full.written, 15 << 20);
        assert_eq!(s.written(), 15 << 20);
        assert_eq!(
            err.to_string(),
            "/spool has 5.0 MiB free and runasroot leaves 5.0 MiB free; it stopped after writing 15.0 MiB"
        );
        assert_eq!(USED.get(), 15 << 20, "nothing written past the space kept");
    }

    #[test]
    fn a_full_disk_is_told_apart_from_other_write_errors() {
        struct Failing(i32);
        impl Write for Failing {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(self.0))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut nospace = Spooler::looking_with(Failing(libc::ENOSPC), Path::new("/d"), small);
        assert!(Full::of(&nospace.write(b"x").unwrap_err()).is_some());
        let mut eio = Spooler::looking_with(Failing(libc::EIO), Path::new("/d"), small);
        let e = eio.write(b"x").unwrap_err();
        assert!(Full::of(&e).is_none());
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        let table = [(0, "0 bytes"), (1023, "1023 bytes"), (1024, "1.0 KiB"), (15 << 20, "15.0 MiB"), (4 << 30, "4.0 GiB"), (5 << 40, "5.0 TiB"), (u64::MAX, "16777216.0 TiB")];
        for (n, want) in table {
            assert_eq!(human(n), want);
        }
    }
}
