//! What the guest is asked to do: the disks, the job, the command line.
//! Pure decisions (environment, times, sizes, swap header) are separate
//! from the few functions that write files.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use runasroot_guest::contract::{self, Blob, Job};

/// Docker's default PATH for a RUN line when the image sets none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// nixpkgs' default `created` time (and so the default layer epoch).
pub const DEFAULT_CREATED: &str = "1970-01-01T00:00:01Z";
/// Swap area header signature (mm/swapfile.c, `union swap_header`).
const SWAP_MAGIC: &[u8; 10] = b"SWAPSPACE2";
/// The swap header occupies one page.
const SWAP_PAGE: u64 = 4096;
/// Headroom on the output disk beyond guest RAM + scratch, in MiB.
const OUTPUT_HEADROOM_MIB: u64 = 64;

/// Errors preparing a job.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("--env {0:?} is not KEY=VALUE")]
    BadEnv(String),
    #[error("--created {value:?} is neither RFC 3339 (e.g. 2024-05-01T12:00:00Z) nor `now`")]
    BadCreated {
        value: String,
        #[source]
        source: time::error::Parse,
    },
    #[error("SOURCE_DATE_EPOCH={0:?} is not a number of seconds")]
    BadSourceDateEpoch(String, #[source] std::num::ParseIntError),
    #[error("cannot read the script {path}")]
    ReadScript {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the {what} disk {path} (is the temporary directory writable and not full?)")]
    WriteDisk {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The script's environment, as a Dockerfile RUN line gets it: the image's
/// Env, then --env (a later KEY replaces an earlier one in place), then
/// Docker's default PATH and HOME=/root where still unset.
pub fn script_env(image_env: &[String], overrides: &[String]) -> Result<Vec<String>, JobError> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |kv: &str, strict: bool| -> Result<(), JobError> {
        let Some((k, v)) = kv.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            return if strict { Err(JobError::BadEnv(kv.to_string())) } else { Ok(()) };
        };
        match env.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.to_string(),
            None => env.push((k.to_string(), v.to_string())),
        }
        Ok(())
    };
    for kv in image_env {
        set(kv, false)?;
    }
    for kv in overrides {
        set(kv, true)?;
    }
    for (k, v) in [("PATH", DEFAULT_PATH), ("HOME", "/root")] {
        if !env.iter().any(|(key, _)| key == k) {
            env.push((k.to_string(), v.to_string()));
        }
    }
    Ok(env.into_iter().map(|(k, v)| format!("{k}={v}")).collect())
}

/// The image's `created` string and the mtime of the new layer's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Times {
    pub created: String,
    pub epoch: u64,
    /// SOURCE_DATE_EPOCH, which also clamps export mtimes.
    pub source_date_epoch: Option<u64>,
}

/// Resolves `--created` and SOURCE_DATE_EPOCH (FORMATS.md, "mtime"): the
/// epoch is SOURCE_DATE_EPOCH if set, else the created time; `created` is
/// --created if given, else SOURCE_DATE_EPOCH, else 1970-01-01T00:00:01Z.
pub fn resolve_times(created_flag: Option<&str>, source_date_epoch: Option<&str>, now: time::OffsetDateTime) -> Result<Times, JobError> {
    use time::format_description::well_known::Rfc3339;
    let sde = match source_date_epoch.map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<u64>().map_err(|e| JobError::BadSourceDateEpoch(s.to_string(), e))?),
        None => None,
    };
    let created_time = match created_flag {
        Some("now") => now.replace_nanosecond(0).expect("0 ns is valid"),
        Some(value) => time::OffsetDateTime::parse(value, &Rfc3339)
            .map_err(|source| JobError::BadCreated { value: value.to_string(), source })?,
        None => match sde {
            Some(s) => time::OffsetDateTime::from_unix_timestamp(s as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
            None => time::OffsetDateTime::parse(DEFAULT_CREATED, &Rfc3339).expect("constant is valid"),
        },
    };
    let created_utc = created_time.to_offset(time::UtcOffset::UTC);
    let created = created_utc.format(&Rfc3339).expect("a UTC time formats");
    let epoch = sde.unwrap_or_else(|| created_utc.unix_timestamp().max(0) as u64);
    Ok(Times { created, epoch, source_date_epoch: sde })
}

/// The guest's kernel command line (without the built-in VMM's
/// virtio_mmio.device= entries). `reboot=t`: a triple fault ends both
/// QEMU (-no-reboot) and the built-in VMM; `panic=-1`: a panic reboots
/// at once, so the host never waits on a dead guest; `no_timer_check`:
/// Linux's boot-time check that the IO-APIC timer ticks (a few ticks
/// during a 10 ms busy wait, arch/x86/kernel/apic/io_apic.c) fails on a
/// loaded host under TCG, where the virtual timer lags: "IO-APIC + timer
/// doesn't work!" and a panic (seen with six QEMUs on two cores). Our
/// launchers' timers work; the check only costs. `tsc=reliable`: the
/// clocksource watchdog compares the TSC with kvm-clock every half second
/// and, when a loaded host delays a vCPU (nested under TCG, seen in tier
/// 3), marks the TSC unstable with a warning and falls back to a slower
/// clocksource; a run lasts seconds and needs no such switch.
pub fn cmdline(verbose: bool) -> String {
    let log = if verbose { "loglevel=7" } else { "quiet loglevel=1" };
    format!("console=ttyS0 reboot=t panic=-1 no_timer_check tsc=reliable {log}")
}

/// Size of the sparse output disk: it can never need more than everything
/// the guest can hold (RAM + scratch).
pub fn output_disk_bytes(memory_mib: u64, scratch_mib: u64) -> u64 {
    (memory_mib + scratch_mib + OUTPUT_HEADROOM_MIB) << 20
}

/// The first page of a swap area of `size` bytes (version 1 header).
pub fn swap_header(size: u64) -> Vec<u8> {
    let mut page = vec![0u8; SWAP_PAGE as usize];
    let last_page = (size / SWAP_PAGE).saturating_sub(1) as u32;
    // struct { char bootbits[1024]; u32 version; u32 last_page; u32 nr_badpages; ... }
    page[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    page[1028..1032].copy_from_slice(&last_page.to_le_bytes());
    page[SWAP_PAGE as usize - SWAP_MAGIC.len()..].copy_from_slice(SWAP_MAGIC);
    page
}

/// Creates a sparse file of `size` bytes starting with `head`.
pub fn write_sparse_disk(path: &Path, size: u64, head: &[u8], what: &'static str) -> Result<(), JobError> {
    let werr = |source| JobError::WriteDisk { what, path: path.to_path_buf(), source };
    let mut f = File::create(path).map_err(werr)?;
    f.write_all(head).map_err(werr)?;
    f.set_len(size.max(head.len() as u64)).map_err(werr)?;
    Ok(())
}

/// Accumulates the job disk's data area (the script).
pub struct JobDisk {
    path: PathBuf,
    data: File,
    data_path: PathBuf,
    len: u64,
}

impl JobDisk {
    pub fn new(dir: &Path) -> Result<JobDisk, JobError> {
        let data_path = dir.join("job-data");
        let data = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&data_path)
            .map_err(|source| JobError::WriteDisk { what: "job", path: data_path.clone(), source })?;
        Ok(JobDisk { path: dir.join("job.img"), data, data_path, len: 0 })
    }

    fn werr(&self) -> impl Fn(io::Error) -> JobError + '_ {
        move |source| JobError::WriteDisk { what: "job", path: self.data_path.clone(), source }
    }

    /// Appends bytes produced by `fill` as one blob, block aligned.
    fn add(&mut self, fill: impl FnOnce(&mut File) -> io::Result<()>) -> Result<Blob, JobError> {
        let offset = self.len;
        fill(&mut self.data).map_err(self.werr())?;
        let end = self.data.stream_position().map_err(self.werr())?;
        let padded = contract::align_block(end);
        self.data.set_len(padded).map_err(self.werr())?;
        self.data.seek(SeekFrom::Start(padded)).map_err(self.werr())?;
        self.len = padded;
        Ok(Blob { offset, length: end - offset })
    }

    /// The script file.
    pub fn add_script(&mut self, path: &Path) -> Result<Blob, JobError> {
        let bytes = fs::read(path).map_err(|source| JobError::ReadScript { path: path.to_path_buf(), source })?;
        self.add(|f| f.write_all(&bytes))
    }

    /// Writes the job disk: header (with `job`) then the data area.
    pub fn finish(mut self, job: &Job) -> Result<PathBuf, JobError> {
        let werr = |source| JobError::WriteDisk { what: "job", path: self.path.clone(), source };
        let mut out = File::create(&self.path).map_err(werr)?;
        out.write_all(&job.encode_header()).map_err(werr)?;
        self.data.seek(SeekFrom::Start(0)).map_err(werr)?;
        io::copy(&mut self.data, &mut out).map_err(werr)?;
        let len = out.stream_position().map_err(werr)?;
        out.set_len(contract::align_block(len.max(1))).map_err(werr)?;
        drop(self.data);
        let _ = fs::remove_file(&self.data_path);
        Ok(self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn env_follows_docker_run() {
        let table: &[(&[&str], &[&str], &[&str])] = &[
            (&[], &[], &["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"]),
            (&["PATH=/bin", "LANG=C"], &["LANG=C.UTF-8", "X=a=b"], &["PATH=/bin", "LANG=C.UTF-8", "X=a=b", "HOME=/root"]),
            (&["HOME=/home/u", "garbage"], &["EMPTY="], &["HOME=/home/u", "EMPTY=", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]),
        ];
        for (image, over, want) in table {
            assert_eq!(script_env(&s(image), &s(over)).unwrap(), s(want));
        }
        assert!(matches!(script_env(&[], &s(&["NOEQUALS"])), Err(JobError::BadEnv(_))));
        assert!(matches!(script_env(&[], &s(&["=x"])), Err(JobError::BadEnv(_))));
    }

    #[test]
    fn times_follow_formats_md() {
        let now = time::macros::datetime!(2026-11-23 10:00:00.5 UTC);
        let t = resolve_times(None, None, now).unwrap();
        assert_eq!((t.created.as_str(), t.epoch), ("1970-01-01T00:00:01Z", 1));
        let t = resolve_times(None, Some("1700000000"), now).unwrap();
        assert_eq!((t.created.as_str(), t.epoch), ("2023-11-14T22:13:20Z", 1700000000));
        let t = resolve_times(Some("2024-05-01T14:00:00+02:00"), None, now).unwrap();
        assert_eq!((t.created.as_str(), t.epoch), ("2024-05-01T12:00:00Z", 1714564800));
        let t = resolve_times(Some("2024-05-01T12:00:00Z"), Some("5"), now).unwrap();
        assert_eq!((t.created.as_str(), t.epoch, t.source_date_epoch), ("2024-05-01T12:00:00Z", 5, Some(5)));
        let t = resolve_times(Some("now"), None, now).unwrap();
        assert_eq!((t.created.as_str(), t.epoch), ("2026-11-23T10:00:00Z", 1795428000));
        assert!(matches!(resolve_times(Some("yesterday"), None, now), Err(JobError::BadCreated { .. })));
        assert!(matches!(resolve_times(None, Some("soon"), now), Err(JobError::BadSourceDateEpoch(..))));
    }

    #[test]
    fn swap_header_matches_mkswap_layout() {
        let h = swap_header(64 << 20);
        assert_eq!(h.len(), 4096);
        assert_eq!(&h[4086..], b"SWAPSPACE2");
        assert_eq!(u32::from_le_bytes(h[1024..1028].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(h[1028..1032].try_into().unwrap()), 16383);
        assert!(h[..1024].iter().all(|&b| b == 0));
    }

    #[test]
    fn job_disk_places_blobs_after_header() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s.sh");
        fs::write(&script, b"echo hi\n").unwrap();
        let mut disk = JobDisk::new(dir.path()).unwrap();
        let s = disk.add_script(&script).unwrap();
        assert_eq!(s, Blob { offset: 0, length: 8 });
        let job = Job {
            mode: contract::Mode::Layer,
            lower: contract::Lower { copy_to_root: false },
            script: Some(s),
            env: vec![],
            epoch: 7,
            clamp_mtime: None,
            scratch_mib: 1,
            verbose: false,
        };
        let path = disk.finish(&job).unwrap();
        let bytes = fs::read(path).unwrap();
        let (back, data) = Job::decode(&bytes).unwrap();
        assert_eq!(back, job);
        assert_eq!(&bytes[data as usize..data as usize + 8], b"echo hi\n");
        assert_eq!(bytes.len() % 4096, 0);
    }
}
