//! The disks the host hands the guest, found by virtio-blk serial id (never
//! by order), and byte-range I/O on them: reading the job and the layer
//! bytes, writing the payload and the result header.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use runasroot_guest::contract::{self, serial, Blob, DecodeError, FailureKind, Job, Outcome};
pub use runasroot_guest::hashing::HashingReader;
use sha2::{Digest, Sha256};

use crate::fail::GuestError;
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("listing /sys/block to find the disks")]
    ListBlock(#[source] io::Error),
    #[error("no disk with serial {serial:?} (found: {found}): the host did not attach it")]
    Missing { serial: &'static str, found: String },
    #[error("two disks with serial {serial:?} ({a} and {b})")]
    Duplicate { serial: &'static str, a: String, b: String },
    #[error("opening disk {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the job header from {path}")]
    ReadJob {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("decoding the job on {path}")]
    DecodeJob {
        path: PathBuf,
        #[source]
        source: DecodeError,
    },
    #[error("blob at {offset}+{length} on the job disk does not fit: {what}")]
    BlobRange { offset: u64, length: u64, what: &'static str },
    #[error("reading {what} ({length} bytes) from the job disk")]
    ReadBlob {
        what: &'static str,
        length: u64,
        #[source]
        source: io::Error,
    },
    #[error("writing the result header to the output disk")]
    WriteHeader(#[source] io::Error),
    #[error("flushing the output disk")]
    Sync(#[source] io::Error),
}

impl GuestError for DiskError {
    fn kind(&self) -> FailureKind {
        FailureKind::Internal
    }
    fn on_scratch(&self) -> bool {
        false
    }
}

/// The disks by role.
#[derive(Debug)]
pub struct Disks {
    pub layers: Option<PathBuf>,
    pub job: PathBuf,
    pub output: PathBuf,
    pub swap: Option<PathBuf>,
}

/// Picks each role's device from (device name, serial) pairs.
pub fn assign(found: &[(String, String)]) -> Result<Disks, DiskError> {
    let pick = |serial: &'static str| -> Result<Option<PathBuf>, DiskError> {
        let mut hits = found.iter().filter(|(_, s)| s == serial);
        let first = hits.next();
        if let (Some(a), Some(b)) = (first, hits.next()) {
            return Err(DiskError::Duplicate { serial, a: a.0.clone(), b: b.0.clone() });
        }
        Ok(first.map(|(dev, _)| Path::new("/dev").join(dev)))
    };
    let require = |serial: &'static str| -> Result<PathBuf, DiskError> {
        pick(serial)?.ok_or_else(|| DiskError::Missing {
            serial,
            found: if found.is_empty() {
                "no virtio disks".into()
            } else {
                found.iter().map(|(d, s)| format!("{d}={s:?}")).collect::<Vec<_>>().join(", ")
            },
        })
    };
    Ok(Disks {
        // A job with no layers (an empty base) may come without this disk.
        layers: pick(serial::LAYERS)?,
        job: require(serial::JOB)?,
        output: require(serial::OUTPUT)?,
        swap: pick(serial::SWAP)?,
    })
}

/// Finds the virtio disks and their serials in sysfs.
pub fn find() -> Result<Disks, DiskError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").map_err(DiskError::ListBlock)? {
        let entry = entry.map_err(DiskError::ListBlock)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        // virtio_blk's `serial` attribute: the VIRTIO_BLK_T_GET_ID string.
        let serial = std::fs::read(entry.path().join("serial")).unwrap_or_default();
        let serial = String::from_utf8_lossy(&serial).trim_end_matches(['\0', '\n', ' ']).to_string();
        found.push((name, serial));
    }
    found.sort();
    assign(&found)
}

pub fn open_read(path: &Path) -> Result<File, DiskError> {
    File::open(path).map_err(|source| DiskError::Open { path: path.to_path_buf(), source })
}

/// Opens a disk for large sequential reads with O_DIRECT: the bytes go
/// from the virtio request straight into our buffer, without a copy
/// through the page cache (which costs a second pass over every byte, and
/// guest memory the tmpfs needs). Falls back to a plain open where the
/// file cannot do O_DIRECT.
pub fn open_direct(path: &Path) -> Result<(File, bool), DiskError> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open_read(path).map(|f| (f, false)),
        Err(source) => Err(DiskError::Open { path: path.to_path_buf(), source }),
    }
}

pub fn open_write(path: &Path) -> Result<File, DiskError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| DiskError::Open { path: path.to_path_buf(), source })
}

/// Reads and decodes the job; returns it with the data area's offset.
pub fn read_job(disk: &File, path: &Path) -> Result<(Job, u64), DiskError> {
    let read_err = |source| DiskError::ReadJob { path: path.to_path_buf(), source };
    let decode_err = |source| DiskError::DecodeJob { path: path.to_path_buf(), source };
    let mut first = [0u8; 16];
    disk.read_exact_at(&mut first, 0).map_err(read_err)?;
    let len = Job::header_len(&first).map_err(decode_err)?;
    let mut header = vec![0u8; len as usize];
    disk.read_exact_at(&mut header, 0).map_err(read_err)?;
    Job::decode(&header).map_err(decode_err)
}

/// Reads a whole blob of the job disk (the script) into memory.
pub fn read_blob(disk: &File, data_offset: u64, blob: Blob, what: &'static str, max: u64) -> Result<Vec<u8>, DiskError> {
    if blob.length > max {
        return Err(DiskError::BlobRange { offset: blob.offset, length: blob.length, what: "larger than allowed" });
    }
    let start = data_offset
        .checked_add(blob.offset)
        .ok_or(DiskError::BlobRange { offset: blob.offset, length: blob.length, what: "offset overflows" })?;
    let mut buf = vec![0u8; blob.length as usize];
    disk.read_exact_at(&mut buf, start)
        .map_err(|source| DiskError::ReadBlob { what, length: blob.length, source })?;
    Ok(buf)
}

/// A `Read` over `length` bytes of a disk starting at `offset` (pread: no
/// shared file position). Ends early only if the disk does.
pub struct RangeReader<'a> {
    disk: &'a File,
    pos: u64,
    end: u64,
}

impl<'a> RangeReader<'a> {
    pub fn new(disk: &'a File, offset: u64, length: u64) -> RangeReader<'a> {
        RangeReader { disk, pos: offset, end: offset.saturating_add(length) }
    }
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        if left == 0 {
            return Ok(0);
        }
        let n = buf.len().min(left.min(usize::MAX as u64) as usize);
        let got = self.disk.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

/// O_DIRECT needs buffer, offset and length aligned to the logical block
/// size; 4 KiB covers every block size a virtio disk reports.
const DIRECT_ALIGN: usize = 4096;

/// A buffered `Read` over `length` bytes of a disk at `offset` that reads
/// whole aligned chunks (so it works on an O_DIRECT file) and hands out
/// the part inside the range.
pub struct ChunkReader<'a> {
    disk: &'a File,
    /// Next byte of the range to hand out.
    pos: u64,
    end: u64,
    storage: Vec<u8>,
    /// Where the aligned buffer starts in `storage`, and its size.
    base: usize,
    chunk: usize,
    /// Disk offset of the buffer's first byte, and how many bytes it holds.
    buf_at: u64,
    buf_len: usize,
}

impl<'a> ChunkReader<'a> {
    pub fn new(disk: &'a File, offset: u64, length: u64, chunk: usize) -> ChunkReader<'a> {
        let chunk = chunk.next_multiple_of(DIRECT_ALIGN);
        let storage = vec![0u8; chunk + DIRECT_ALIGN];
        let base = storage.as_ptr().align_offset(DIRECT_ALIGN);
        ChunkReader { disk, pos: offset, end: offset.saturating_add(length), storage, base, chunk, buf_at: 0, buf_len: 0 }
    }
}

impl io::BufRead for ChunkReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.pos >= self.end {
            return Ok(&[]);
        }
        if self.pos < self.buf_at || self.pos >= self.buf_at + self.buf_len as u64 {
            let at = self.pos - self.pos % DIRECT_ALIGN as u64;
            let buf = &mut self.storage[self.base..self.base + self.chunk];
            let n = loop {
                match self.disk.read_at(buf, at) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    r => break r?,
                }
            };
            self.buf_at = at;
            self.buf_len = n;
            if self.pos >= at + n as u64 {
                // The disk ends before the range does.
                return Ok(&[]);
            }
        }
        let start = (self.pos - self.buf_at) as usize;
        let avail = (self.buf_len - start).min((self.end - self.pos).min(usize::MAX as u64) as usize);
        Ok(&self.storage[self.base + start..self.base + start + avail])
    }

    fn consume(&mut self, n: usize) {
        self.pos += n as u64;
    }
}

impl Read for ChunkReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let avail = io::BufRead::fill_buf(self)?;
        let n = avail.len().min(out.len());
        out[..n].copy_from_slice(&avail[..n]);
        io::BufRead::consume(self, n);
        Ok(n)
    }
}

/// Writes the payload at [`contract::PAYLOAD_OFFSET`] of the output disk,
/// hashing and counting it.
pub struct PayloadWriter<'a> {
    disk: &'a File,
    disk_size: u64,
    pos: u64,
    hasher: Sha256,
}

impl<'a> PayloadWriter<'a> {
    pub fn new(disk: &'a File) -> Result<PayloadWriter<'a>, DiskError> {
        let disk_size = sys::block_device_size(disk.as_fd())
            .or_else(|_| disk.metadata().map(|m| m.len()))
            .map_err(DiskError::WriteHeader)?;
        Ok(PayloadWriter { disk, disk_size, pos: contract::PAYLOAD_OFFSET, hasher: Sha256::new() })
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.pos - contract::PAYLOAD_OFFSET
    }

    /// Syncs the payload to the disk; returns (length, `sha256:<hex>`).
    pub fn finish(self) -> Result<(u64, String), DiskError> {
        self.disk.sync_all().map_err(DiskError::Sync)?;
        let len = self.len();
        Ok((len, format!("sha256:{}", hex::encode(self.hasher.finalize()))))
    }
}

impl Write for PayloadWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.pos.saturating_add(buf.len() as u64) > self.disk_size {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("the output disk is full ({} bytes): the host sized it too small", self.disk_size),
            ));
        }
        self.disk.write_all_at(buf, self.pos)?;
        self.hasher.update(buf);
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the result header at offset 0 and syncs: written last, so a
/// header only ever describes a complete payload.
pub fn write_outcome(disk: &File, outcome: &Outcome) -> Result<(), DiskError> {
    disk.write_all_at(&outcome.encode(), 0).map_err(DiskError::WriteHeader)?;
    disk.sync_all().map_err(DiskError::Sync)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn assigns_disks_by_serial_not_order() {
        let d = assign(&s(&[("vda", "rar-output"), ("vdb", "rar-job"), ("vdc", "rar-layers")])).unwrap();
        assert_eq!(d.layers, Some(PathBuf::from("/dev/vdc")));
        assert_eq!(d.job, PathBuf::from("/dev/vdb"));
        assert_eq!(d.output, PathBuf::from("/dev/vda"));
        assert_eq!(d.swap, None);

        let d = assign(&s(&[("vda", "rar-job"), ("vdb", "rar-output"), ("vdd", "rar-swap")])).unwrap();
        assert_eq!(d.layers, None);
        assert_eq!(d.swap, Some(PathBuf::from("/dev/vdd")));
    }

    #[test]
    fn missing_or_duplicate_disks_are_errors_naming_what_was_found() {
        let e = assign(&s(&[("vda", "rar-job"), ("vdb", "other")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no disk with serial \"rar-output\" (found: vda=\"rar-job\", vdb=\"other\"): the host did not attach it"
        );
        let e = assign(&[]).unwrap_err();
        assert!(e.to_string().contains("found: no virtio disks"), "{e}");
        let e = assign(&s(&[("vda", "rar-job"), ("vdb", "rar-job"), ("vdc", "rar-output")])).unwrap_err();
        assert_eq!(e.to_string(), "two disks with serial \"rar-job\" (vda and vdb)");
    }

    #[test]
    fn range_reader_stays_in_its_range_and_hashes() {
        let dir = std::env::temp_dir().join(format!("rar-disks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("disk");
        std::fs::write(&p, b"0123456789").unwrap();
        let f = File::open(&p).unwrap();
        let mut out = Vec::new();
        let mut r = HashingReader::new(RangeReader::new(&f, 2, 5));
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"23456");
        let (digest, n) = r.finish();
        assert_eq!(n, 5);
        assert_eq!(runasroot_guest::hashing::digest_string(&digest), format!("sha256:{}", hex::encode(Sha256::digest(b"23456"))));
        // A range past the end of the disk ends where the disk does.
        let mut out = Vec::new();
        RangeReader::new(&f, 8, 100).read_to_end(&mut out).unwrap();
        assert_eq!(out, b"89");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn chunk_reader_serves_unaligned_ranges_from_aligned_reads() {
        let dir = std::env::temp_dir().join(format!("rar-disks-chunk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("disk");
        let bytes: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        let (f, direct) = open_direct(&p).unwrap();
        eprintln!("O_DIRECT on {}: {direct}", dir.display());
        let table: &[(u64, u64, usize)] = &[(0, 40_000, 4096), (7, 10_000, 4096), (4095, 8194, 8192), (39_990, 100, 4096), (5000, 0, 4096)];
        for &(offset, length, chunk) in table {
            let mut out = Vec::new();
            // Small reads, to cross chunk boundaries inside one call site.
            let mut r = ChunkReader::new(&f, offset, length, chunk);
            let mut piece = [0u8; 1000];
            loop {
                let n = r.read(&mut piece).unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&piece[..n]);
            }
            let end = (offset + length).min(bytes.len() as u64) as usize;
            assert_eq!(out, &bytes[offset as usize..end], "{offset}+{length} by {chunk}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn job_and_outcome_travel_through_disk_files() {
        use runasroot_guest::contract::{Mode, Status};
        let dir = std::env::temp_dir().join(format!("rar-disks-job-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let job = Job {
            mode: Mode::Layer,
            layers: vec![],
            script: Some(Blob { offset: 3, length: 4 }),
            copy_to_root: vec![],
            env: vec![],
            epoch: 1,
            clamp_mtime: None,
            scratch_mib: 64,
            verbose: true,
        };
        let mut bytes = job.encode_header();
        let data = bytes.len() as u64;
        bytes.extend_from_slice(b"xxxecho");
        let p = dir.join("job");
        std::fs::write(&p, &bytes).unwrap();
        let f = File::open(&p).unwrap();
        let (got, off) = read_job(&f, &p).unwrap();
        assert_eq!((got.clone(), off), (job, data));
        assert_eq!(read_blob(&f, off, got.script.unwrap(), "the script", 1 << 20).unwrap(), b"echo");
        assert!(read_blob(&f, off, Blob { offset: 0, length: 1 << 30 }, "the script", 1 << 20).is_err());

        let out = dir.join("out");
        let start = contract::PAYLOAD_OFFSET as usize;
        std::fs::write(&out, vec![0u8; start + 16384]).unwrap();
        let f = open_write(&out).unwrap();
        let mut w = PayloadWriter::new(&f).unwrap();
        w.write_all(b"payload").unwrap();
        assert!(w.write_all(&vec![0u8; 16384]).is_err(), "writes past the disk's end fail");
        let (len, digest) = w.finish().unwrap();
        assert_eq!((len, digest), (7, format!("sha256:{}", hex::encode(Sha256::digest(b"payload")))));
        let o = Outcome {
            status: Status::Finished { exit_code: 0 },
            payload_len: len,
            payload_digest: None,
            layer_diff_ids: vec![],
            timings: vec![],
        };
        write_outcome(&f, &o).unwrap();
        let disk = std::fs::read(&out).unwrap();
        assert_eq!(Outcome::decode(&disk[..contract::BLOCK as usize]).unwrap(), o);
        assert_eq!(&disk[start..start + 7], b"payload");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
