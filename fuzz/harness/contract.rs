//! The headers that cross the VM boundary: the result header the guest
//! writes (hostile: the guest runs a root script on a kernel it can
//! attack) and the job header the host writes. The input is the start of
//! the disk as the reader sees it.
//!
//! Checked: no panic; `header_len` and `decode` agree on whether the
//! magic and length are acceptable; a decoded header encodes to one that
//! decodes to the same value (timings aside: JSON floats round-trip only
//! approximately).

use runasroot_guest::contract::{DecodeError, Job, Outcome, BLOCK, MAX_RESULT_JSON, RESULT_AREA};

use super::Input;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let which = input.u8();
    let bytes = input.rest();
    if which & 1 == 0 {
        result(bytes);
    } else {
        job(bytes);
    }
}

fn result(bytes: &[u8]) {
    let len = Outcome::header_len(bytes);
    let decoded = Outcome::decode(bytes);
    match (&len, &decoded) {
        (Ok(n), _) => {
            assert!(*n >= 16 && *n <= RESULT_AREA, "header_len {n} outside the result area");
            if (bytes.len() as u64) < *n {
                assert!(matches!(decoded, Err(DecodeError::Truncated { what: "result" })), "{decoded:?}");
            }
        }
        (Err(e), d) => assert_eq!(d.as_ref().err().map(|d| d.to_string()), Some(e.to_string()), "header_len and decode disagree"),
    }
    let Ok(outcome) = decoded else { return };
    let area = outcome.encode();
    assert_eq!(area.len() as u64, RESULT_AREA);
    let n = Outcome::header_len(&area).expect("an encoded header has a valid length");
    assert!(n <= MAX_RESULT_JSON + 16);
    let again = Outcome::decode(&area).expect("an encoded header decodes");
    assert_eq!(again.payload_len, outcome.payload_len);
    assert_eq!(again.payload_digest, outcome.payload_digest);
    if again.timings.len() == outcome.timings.len() {
        assert_eq!(again.status, outcome.status);
    }
    // A reader that takes one block first, then the rest of the area.
    if n <= BLOCK {
        assert!(Outcome::decode(&area[..BLOCK as usize]).is_ok());
    }
}

fn job(bytes: &[u8]) {
    let len = Job::header_len(bytes);
    let decoded = Job::decode(bytes);
    match (&len, &decoded) {
        (Ok(n), _) => {
            if (bytes.len() as u64) < *n {
                assert!(matches!(decoded, Err(DecodeError::Truncated { what: "job" })), "{decoded:?}");
            }
        }
        (Err(e), d) => assert_eq!(d.as_ref().err().map(|d| d.to_string()), Some(e.to_string()), "header_len and decode disagree"),
    }
    let Ok((job, data_offset)) = decoded else { return };
    assert_eq!(data_offset % BLOCK, 0);
    let header = job.encode_header();
    assert_eq!(header.len() as u64 % BLOCK, 0);
    let (again, again_offset) = Job::decode(&header).expect("an encoded job decodes");
    assert_eq!(again, job);
    assert_eq!(again_offset, header.len() as u64);
}

/// Starting inputs: well-formed headers of each kind.
pub fn seeds() -> Vec<Vec<u8>> {
    use runasroot_guest::contract::{Blob, FailureKind, Lower, Mode, Status};
    let finished = Outcome {
        status: Status::Finished { exit_code: 0 },
        payload_len: 4096,
        payload_digest: Some(format!("sha256:{}", "ab".repeat(32))),
        timings: vec![("init".into(), 0.25), ("script".into(), 1.5)],
        notes: vec![],
    };
    let failed = Outcome {
        status: Status::Failed { kind: FailureKind::OutOfScratch, reason: "writing /data: no space".into() },
        payload_len: 0,
        payload_digest: None,
        timings: vec![],
        notes: vec![],
    };
    let job = Job {
        mode: Mode::Layer,
        lower: Lower { copy_to_root: true },
        script: Some(Blob { offset: 0, length: 42 }),
        env: vec!["PATH=/bin".into()],
        epoch: 1,
        clamp_mtime: Some(7),
        scratch_mib: 1024,
        verbose: false,
    };
    let header = |area: Vec<u8>| area[..Outcome::header_len(&area).unwrap() as usize].to_vec();
    vec![
        [vec![0], header(finished.encode())].concat(),
        [vec![0], header(failed.encode())].concat(),
        [vec![1], job.encode_header()].concat(),
    ]
}
