//! Disks, job and result: everything that crosses the VM boundary.
//!
//! The only channels are the kernel command line, block devices and the
//! serial console (human-readable log only). The host never parses guest
//! memory; everything the guest writes is untrusted and decoded with bounds.
//!
//! Job disk layout (read-only, named [`serial::JOB`]):
//! ```text
//! 0      8       16            16+len              data_offset
//! | MAGIC | len u64 LE | JSON (Job) | zero pad | data area (blobs) ...
//! ```
//! `data_offset` is `16 + len` rounded up to [`BLOCK`]; [`Blob`] offsets are
//! relative to it, so the JSON can name them before its own length is known.
//!
//! Output disk layout (read-write, named [`serial::OUTPUT`]):
//! ```text
//! 0      8       16             16+len        PAYLOAD_OFFSET
//! | MAGIC | len u64 LE | JSON (Outcome) | zeros | payload (tar) ...
//! ```
//! The guest writes the payload first, syncs, then writes the header area
//! ([`RESULT_AREA`] bytes) and syncs again: a header is only ever present
//! for a complete payload. A reader reads the first [`BLOCK`], and the
//! rest of the area only when the announced length asks for it (a long
//! failure reason).
//!
//! Lower disk (read-only, named [`serial::LOWER`]): an EROFS image the
//! host wrote, whose root holds [`LOWER_BASE`] (the merged base image,
//! the overlay's only lowerdir) and, with `--copy-to-root`,
//! [`LOWER_COPY`] (the tree to copy into the new layer). File data are
//! chunk indexes into the image's extra devices, which follow the image
//! on the same disk at the offsets its device table gives (EROFS "flat"
//! mode: mounted with no `device=` option). The guest parses no tar.

use serde::{Deserialize, Serialize};

/// Magic at the start of the job disk.
pub const JOB_MAGIC: &[u8; 8] = b"RARJOB01";
/// Magic at the start of the output disk, written last by the guest.
pub const RESULT_MAGIC: &[u8; 8] = b"RARRES01";
/// Alignment of the job's data area; the size of a small result header.
pub const BLOCK: u64 = 4096;
/// Largest job JSON accepted (the environment dominates it).
pub const MAX_JOB_JSON: u64 = 16 << 20;
/// The result header area at the start of the output disk: room for
/// timings and a long failure reason.
pub const RESULT_AREA: u64 = 64 << 10;
/// The result JSON must fit in the result area with its 16-byte preamble.
pub const MAX_RESULT_JSON: u64 = RESULT_AREA - 16;
/// Where the payload (layer tar or export tar) starts on the output disk.
pub const PAYLOAD_OFFSET: u64 = RESULT_AREA;

/// Virtio-blk serial ids (VIRTIO_BLK_T_GET_ID) that name each disk; the
/// guest reads them from `/sys/block/vdX/serial` and never relies on order.
pub mod serial {
    /// The EROFS lower image, its devices behind it.
    pub const LOWER: &str = "rar-lower";
    /// The job: JSON plus the script, read-only.
    pub const JOB: &str = "rar-job";
    /// The result header and payload, read-write, sparse on the host.
    pub const OUTPUT: &str = "rar-output";
    /// Optional swap for scratch space beyond guest RAM (`--disk-size`).
    pub const SWAP: &str = "rar-swap";
}

/// Prefix of the structured lines guest-init prints on the console; the
/// host shows the rest (kernel log) only with `-v`.
pub const CONSOLE_TAG: &str = "@rar ";

/// What the guest is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Run the script, pack the overlay upper dir as a new OCI layer.
    Layer,
    /// Run the script if any, tar the merged tree (export / flatten).
    Export,
}

/// The lower image's root directory holding the merged base.
pub const LOWER_BASE: &str = "base";
/// The lower image's root directory holding the copy-to-root tree.
pub const LOWER_COPY: &str = "copy";

/// A byte range on a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    pub offset: u64,
    pub length: u64,
}

/// What the lower image holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lower {
    /// Whether the image holds [`LOWER_COPY`].
    pub copy_to_root: bool,
}

/// Everything the guest needs, written by the host on the job disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub mode: Mode,
    /// The read-only base (and copy-to-root tree) on the lower disk.
    pub lower: Lower,
    /// The script, on the job disk. `None` only for a plain export.
    pub script: Option<Blob>,
    /// The script's whole environment, `KEY=VALUE`, already merged by the
    /// host (image config Env, then --env, default PATH and HOME).
    pub env: Vec<String>,
    /// mtime of every entry of a new layer (SOURCE_DATE_EPOCH or `created`).
    pub epoch: u64,
    /// Export only: clamp mtimes to this (SOURCE_DATE_EPOCH) when set.
    pub clamp_mtime: Option<u64>,
    /// Size limit of the tmpfs holding the upper dir (the new layer), in
    /// MiB; the base is not in it.
    pub scratch_mib: u64,
    /// Print the guest's own progress lines (host `-v`).
    pub verbose: bool,
}

/// How the run ended, from the guest's point of view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Status {
    /// The script ran and exited with `exit_code`; when 0 the payload holds
    /// the tar. A non-zero code carries no payload.
    Finished { exit_code: i32 },
    /// runasroot itself failed inside the guest.
    Failed { kind: FailureKind, reason: String },
}

/// Why the guest failed, so the host can name the limit or input at fault
/// (the guest says what failed; the host alone says which flag to raise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// What the script or copy-to-root made cannot be a layer (a reserved
    /// `.wh.` name), or copy-to-root cannot be placed (its path is taken).
    BadInput,
    /// The scratch tmpfs (+ swap) filled up.
    OutOfScratch,
    /// The guest ran out of memory.
    OutOfMemory,
    /// The base has no interpreter for the script.
    NoInterpreter,
    /// Anything else (a bug or an unexpected kernel answer).
    Internal,
}

/// The result header the guest writes on the output disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    #[serde(flatten)]
    pub status: Status,
    /// Bytes of payload at [`PAYLOAD_OFFSET`].
    pub payload_len: u64,
    /// `sha256:…` of the payload as the guest wrote it.
    pub payload_digest: Option<String>,
    /// (phase, guest uptime in seconds when it ended), in order.
    pub timings: Vec<(String, f64)>,
    /// What the host should tell the user about a run that succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<Note>,
}

/// Something worth telling the user about a run that succeeded anyway;
/// the guest says what happened, the host what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Note {
    /// The guest's OOM killer killed a process the script started (the
    /// script still exited 0).
    OomKilled,
}

/// Errors decoding what the other side wrote.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("no {what} header (magic missing): the guest ended before writing a result")]
    NoMagic { what: &'static str },
    #[error("{what} header announces {len} bytes of JSON, more than the {max} allowed")]
    TooLong { what: &'static str, len: u64, max: u64 },
    #[error("{what} header is truncated")]
    Truncated { what: &'static str },
    #[error("{what} JSON is invalid")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// Rounds `n` up to a multiple of [`BLOCK`].
pub fn align_block(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

fn encode_header(magic: &[u8; 8], json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + json.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(json);
    out
}

fn decode_header<'a>(
    bytes: &'a [u8],
    magic: &[u8; 8],
    max: u64,
    what: &'static str,
) -> Result<&'a [u8], DecodeError> {
    if bytes.len() < 16 || &bytes[..8] != magic {
        return Err(DecodeError::NoMagic { what });
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if len > max {
        return Err(DecodeError::TooLong { what, len, max });
    }
    let end = 16usize
        .checked_add(len as usize)
        .ok_or(DecodeError::Truncated { what })?;
    bytes.get(16..end).ok_or(DecodeError::Truncated { what })
}

impl Job {
    /// The job disk's header: magic, length, JSON, zero padding up to the
    /// data area. Blob offsets in the job are relative to the data area.
    pub fn encode_header(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a Job always serialises");
        let mut out = encode_header(JOB_MAGIC, &json);
        out.resize(align_block(out.len() as u64) as usize, 0);
        out
    }

    /// Decodes the job from the start of the job disk (at least the header
    /// bytes). Returns the job and the data area's offset on the disk.
    pub fn decode(bytes: &[u8]) -> Result<(Job, u64), DecodeError> {
        let json = decode_header(bytes, JOB_MAGIC, MAX_JOB_JSON, "job")?;
        let job = serde_json::from_slice(json).map_err(|source| DecodeError::Json { what: "job", source })?;
        Ok((job, align_block(16 + json.len() as u64)))
    }

    /// The JSON length announced by a job header's first 16 bytes, so the
    /// guest knows how much more to read.
    pub fn header_len(first16: &[u8]) -> Result<u64, DecodeError> {
        if first16.len() < 16 || &first16[..8] != JOB_MAGIC {
            return Err(DecodeError::NoMagic { what: "job" });
        }
        let len = u64::from_le_bytes(first16[8..16].try_into().expect("8 bytes"));
        if len > MAX_JOB_JSON {
            return Err(DecodeError::TooLong { what: "job", len, max: MAX_JOB_JSON });
        }
        Ok(16 + len)
    }
}

impl Outcome {
    /// The output disk's header area ([`RESULT_AREA`] bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = self.clone();
        let mut json = serde_json::to_vec(&out).expect("an Outcome always serialises");
        // Whatever is too long must not push the header past its area:
        // shorten the reason first, then drop the timings. Each step
        // shrinks the JSON, so this ends.
        while json.len() as u64 > MAX_RESULT_JSON {
            match &mut out.status {
                Status::Failed { reason, .. } if reason.len() > 3 => {
                    let keep = reason.len().saturating_sub(json.len() - MAX_RESULT_JSON as usize + 3);
                    let mut cut = keep.min(reason.len() - 4);
                    while !reason.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    reason.truncate(cut);
                    reason.push_str("...");
                }
                _ => {
                    assert!(!out.timings.is_empty(), "an Outcome without reason or timings always fits");
                    out.timings.clear();
                }
            }
            json = serde_json::to_vec(&out).expect("an Outcome always serialises");
        }
        let mut block = encode_header(RESULT_MAGIC, &json);
        block.resize(RESULT_AREA as usize, 0);
        block
    }

    /// The number of bytes of the header area a reader needs, from its
    /// first 16 bytes (so a reader can read [`BLOCK`] bytes, then the
    /// rest only for a long result).
    pub fn header_len(first16: &[u8]) -> Result<u64, DecodeError> {
        if first16.len() < 16 || &first16[..8] != RESULT_MAGIC {
            return Err(DecodeError::NoMagic { what: "result" });
        }
        let len = u64::from_le_bytes(first16[8..16].try_into().expect("8 bytes"));
        if len > MAX_RESULT_JSON {
            return Err(DecodeError::TooLong { what: "result", len, max: MAX_RESULT_JSON });
        }
        Ok(16 + len)
    }

    /// Decodes the output disk's header (at least [`Outcome::header_len`]
    /// bytes of it).
    pub fn decode(block: &[u8]) -> Result<Outcome, DecodeError> {
        let json = decode_header(block, RESULT_MAGIC, MAX_RESULT_JSON, "result")?;
        serde_json::from_slice(json).map_err(|source| DecodeError::Json { what: "result", source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            mode: Mode::Layer,
            lower: Lower { copy_to_root: true },
            script: Some(Blob { offset: 0, length: 42 }),
            env: vec!["PATH=/bin".into()],
            epoch: 1,
            clamp_mtime: None,
            scratch_mib: 1024,
            verbose: false,
        }
    }

    #[test]
    fn job_round_trips_and_data_area_is_block_aligned() {
        let header = job().encode_header();
        assert_eq!(header.len() as u64 % BLOCK, 0);
        assert_eq!(&header[..8], JOB_MAGIC);
        let (decoded, data) = Job::decode(&header).unwrap();
        assert_eq!(decoded, job());
        assert_eq!(data, header.len() as u64);
        let len = u64::from_le_bytes(header[8..16].try_into().unwrap());
        assert_eq!(Job::header_len(&header[..16]).unwrap(), 16 + len);
    }

    #[test]
    fn job_decode_rejects_bad_headers() {
        assert!(matches!(Job::decode(b"nope"), Err(DecodeError::NoMagic { what: "job" })));
        let mut h = job().encode_header();
        h[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(Job::decode(&h), Err(DecodeError::TooLong { .. })));
        let h = job().encode_header();
        assert!(matches!(Job::decode(&h[..40]), Err(DecodeError::Truncated { what: "job" })));
    }

    #[test]
    fn outcome_round_trips_and_a_small_one_fits_one_block() {
        let o = Outcome {
            status: Status::Finished { exit_code: 3 },
            payload_len: 0,
            payload_digest: None,
            timings: vec![("init".into(), 0.5)],
            notes: vec![Note::OomKilled],
        };
        let area = o.encode();
        assert_eq!(area.len() as u64, RESULT_AREA);
        assert!(Outcome::header_len(&area[..16]).unwrap() <= BLOCK);
        assert_eq!(Outcome::decode(&area[..BLOCK as usize]).unwrap(), o);
    }

    #[test]
    fn a_long_reason_needs_the_rest_of_the_area() {
        let o = Outcome {
            status: Status::Failed { kind: FailureKind::BadInput, reason: "r".repeat(10_000) },
            payload_len: 0,
            payload_digest: None,
            timings: ["init", "mount", "script", "pack", "write"].iter().map(|p| (p.to_string(), 12345.678)).collect(),
            notes: vec![],
        };
        let area = o.encode();
        let len = Outcome::header_len(&area[..16]).unwrap();
        assert!(len > BLOCK, "the reason does not fit one block: the area is needed");
        assert_eq!(Outcome::decode(&area[..len as usize]).unwrap(), o);
        assert!(matches!(Outcome::decode(&area[..BLOCK as usize]), Err(DecodeError::Truncated { what: "result" })));
    }

    #[test]
    fn outcome_too_big_for_its_area_is_shortened_not_looped() {
        let o = Outcome {
            status: Status::Finished { exit_code: 0 },
            payload_len: 0,
            payload_digest: None,
            timings: (0..5000).map(|i| (format!("phase-{i:060}"), 0.5)).collect(),
            notes: vec![],
        };
        let back = Outcome::decode(&o.encode()).unwrap();
        assert!(back.timings.is_empty());
        assert_eq!(back.status, o.status);
    }

    #[test]
    fn outcome_with_huge_reason_is_shortened_not_dropped() {
        let o = Outcome {
            status: Status::Failed { kind: FailureKind::Internal, reason: "x".repeat(100_000) },
            payload_len: 0,
            payload_digest: None,
            timings: vec![],
            notes: vec![],
        };
        let back = Outcome::decode(&o.encode()).unwrap();
        match back.status {
            Status::Failed { kind, reason } => {
                assert_eq!(kind, FailureKind::Internal);
                assert!(reason.ends_with("...") && reason.len() > 60_000);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn notes_are_optional_and_unknown_ones_refused() {
        let area = |json: &str| encode_header(RESULT_MAGIC, json.as_bytes());
        let plain = Outcome::decode(&area(r#"{"status":"finished","exit_code":0,"payload_len":1024,"payload_digest":null,"timings":[]}"#)).unwrap();
        assert!(plain.notes.is_empty());
        let bad = Outcome::decode(&area(r#"{"status":"finished","exit_code":0,"payload_len":0,"payload_digest":null,"timings":[],"notes":["x"]}"#));
        assert!(matches!(bad, Err(DecodeError::Json { what: "result", .. })), "{bad:?}");
    }

    #[test]
    fn zeroed_output_disk_means_no_result() {
        assert!(matches!(Outcome::decode(&[0u8; 4096]), Err(DecodeError::NoMagic { what: "result" })));
        assert!(matches!(Outcome::header_len(&[0u8; 16]), Err(DecodeError::NoMagic { what: "result" })));
    }
}
