//! The disks the host hands the guest, found by virtio-blk serial id (never
//! by order), and byte-range I/O on them: reading the job, writing the
//! payload and the result header.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use runasroot_guest::contract::{self, serial, Blob, DecodeError, FailureKind, Job, Outcome};
use sha2::{Digest, Sha256};

use crate::fail::GuestError;
use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("listing /sys/block to find the disks")]
    ListBlock(#[source] io::Error),
    #[error("no disk with serial {serial:?} (found: {found}): the host did not attach it")]
    Missing { serial: String, found: String },
    #[error("two disks with serial {serial:?} ({a} and {b})")]
    Duplicate { serial: String, a: String, b: String },
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
    pub lower: PathBuf,
    pub job: PathBuf,
    pub output: PathBuf,
    pub swap: Option<PathBuf>,
}

fn pick(found: &[(String, String)], serial: &str) -> Result<Option<PathBuf>, DiskError> {
    let mut hits = found.iter().filter(|(_, s)| s == serial);
    let first = hits.next();
    if let (Some(a), Some(b)) = (first, hits.next()) {
        return Err(DiskError::Duplicate { serial: serial.to_string(), a: a.0.clone(), b: b.0.clone() });
    }
    Ok(first.map(|(dev, _)| Path::new("/dev").join(dev)))
}

fn require(found: &[(String, String)], serial: &str) -> Result<PathBuf, DiskError> {
    pick(found, serial)?.ok_or_else(|| DiskError::Missing {
        serial: serial.to_string(),
        found: if found.is_empty() {
            "no virtio disks".into()
        } else {
            found.iter().map(|(d, s)| format!("{d}={s:?}")).collect::<Vec<_>>().join(", ")
        },
    })
}

/// Picks each role's device from (device name, serial) pairs.
pub fn assign(found: &[(String, String)]) -> Result<Disks, DiskError> {
    Ok(Disks {
        lower: require(found, serial::LOWER)?,
        job: require(found, serial::JOB)?,
        output: require(found, serial::OUTPUT)?,
        swap: pick(found, serial::SWAP)?,
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
        let d = assign(&s(&[("vda", "rar-output"), ("vdb", "rar-job"), ("vdc", "rar-lower")])).unwrap();
        assert_eq!(d.lower, PathBuf::from("/dev/vdc"));
        assert_eq!(d.job, PathBuf::from("/dev/vdb"));
        assert_eq!(d.output, PathBuf::from("/dev/vda"));
        assert_eq!(d.swap, None);

        let d = assign(&s(&[("vda", "rar-job"), ("vdb", "rar-output"), ("vdd", "rar-swap"), ("vde", "rar-lower")])).unwrap();
        assert_eq!(d.swap, Some(PathBuf::from("/dev/vdd")));
        assert_eq!(d.lower, PathBuf::from("/dev/vde"));
    }

    #[test]
    fn missing_or_duplicate_disks_are_errors_naming_what_was_found() {
        let e = assign(&s(&[("vda", "rar-job"), ("vdb", "other"), ("vdc", "rar-lower")])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no disk with serial \"rar-output\" (found: vda=\"rar-job\", vdb=\"other\", vdc=\"rar-lower\"): the host did not attach it"
        );
        let e = assign(&[]).unwrap_err();
        assert!(e.to_string().contains("found: no virtio disks"), "{e}");
        let e = assign(&s(&[("vda", "rar-lower"), ("vdb", "rar-lower"), ("vdc", "rar-output")])).unwrap_err();
        assert_eq!(e.to_string(), "two disks with serial \"rar-lower\" (vda and vdb)");
    }

    #[test]
    fn job_and_outcome_travel_through_disk_files() {
        use runasroot_guest::contract::{Mode, Status};
        let dir = std::env::temp_dir().join(format!("rar-disks-job-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let job = Job {
            mode: Mode::Layer,
            lower: contract::Lower { copy_to_root: false },
            script: Some(Blob { offset: 3, length: 4 }),
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
            timings: vec![],
            notes: vec![],
        };
        write_outcome(&f, &o).unwrap();
        let disk = std::fs::read(&out).unwrap();
        assert_eq!(Outcome::decode(&disk[..contract::BLOCK as usize]).unwrap(), o);
        assert_eq!(&disk[start..start + 7], b"payload");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
