//! What the guest wrote on its output disk, checked before the host
//! writes anything.
//!
//! The guest runs a root script on a kernel that script can attack: the
//! VM is the security boundary, so the output disk is hostile input. Its
//! result header is decoded with bounds ([`contract::Outcome::decode`]),
//! then:
//! 1. [`check_outcome`]: what the header claims must be possible: an exit
//!    code of 0 to 255; a payload only for a script that exited 0, with a
//!    `sha256:` digest, fitting the disk.
//! 2. [`check_payload`]: the payload is a tar that keeps every rule of
//!    [`payload`] (names, types, sizes, PAX records, order, links), and
//!    its sha256 is the one the header claims.
//!
//! Anything else is an [`OutputError`]: runasroot exits 125 and writes
//! nothing (the checks run before any output is opened).
//!
//! [`contract::Outcome::decode`]: runasroot_guest::contract::Outcome::decode

pub mod payload;

use std::io::Read;

use runasroot_guest::contract::{DecodeError, FailureKind, Outcome, Status};

use crate::image::Digest;
use crate::report::quote_bytes;

/// Errors in what the guest wrote, each naming the claim or the entry.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("its result header cannot be decoded")]
    Header(#[source] DecodeError),
    #[error("its result header says the script exited with {code}; exit codes are 0 to 255")]
    ExitCode { code: i32 },
    #[error("its result header says the script exited with 0 but names no payload digest")]
    NoDigest,
    #[error("its result header names the payload digest {digest}, which is not sha256:<64 hex digits>")]
    BadDigest { digest: String },
    #[error("its result header says the script exited with {code}, yet announces a payload of {len} bytes")]
    PayloadOnFailure { code: i32, len: u64 },
    #[error("its result header announces a payload of {len} bytes; the output disk has room for {room}")]
    TooLong { len: u64, room: u64 },
    #[error("the {what} it wrote is invalid")]
    Payload {
        what: &'static str,
        #[source]
        source: payload::PayloadError,
    },
    #[error("the {what} it wrote has digest {found}, but its result header says {claimed}")]
    DigestMismatch { what: &'static str, found: Digest, claimed: Digest },
}

/// What a result header claims, once it is known to be possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The script exited 0 and the payload is `len` bytes with `digest`.
    Payload { len: u64, digest: Digest },
    /// The script exited with `code` (1 to 255); there is no payload.
    ScriptFailed { code: u8 },
    /// runasroot failed inside the guest.
    Failed { kind: FailureKind, reason: String },
}

/// Checks what a decoded result header claims; `room` is the most payload
/// the output disk can hold.
pub fn check_outcome(outcome: &Outcome, room: u64) -> Result<Claim, OutputError> {
    let len = outcome.payload_len;
    match &outcome.status {
        Status::Failed { kind, reason } => Ok(Claim::Failed { kind: *kind, reason: reason.clone() }),
        &Status::Finished { exit_code: code } => {
            let Ok(byte) = u8::try_from(code) else {
                return Err(OutputError::ExitCode { code });
            };
            if byte != 0 {
                if len != 0 {
                    return Err(OutputError::PayloadOnFailure { code, len });
                }
                return Ok(Claim::ScriptFailed { code: byte });
            }
            let claimed = outcome.payload_digest.as_deref().ok_or(OutputError::NoDigest)?;
            let digest = Digest::parse(claimed).ok_or_else(|| OutputError::BadDigest { digest: quote_bytes(claimed.as_bytes()) })?;
            if len > room {
                return Err(OutputError::TooLong { len, room });
            }
            Ok(Claim::Payload { len, digest })
        }
    }
}

/// What the payload is, for messages.
fn describe(kind: payload::Kind) -> &'static str {
    match kind {
        payload::Kind::Layer { .. } => "new layer",
        payload::Kind::Export => "export",
    }
}

/// Checks the `len` bytes of payload `input` yields against the rules of
/// `kind`, and their sha256 against `claimed`.
pub fn check_payload(input: impl Read, len: u64, claimed: &Digest, kind: payload::Kind) -> Result<payload::Checked, OutputError> {
    let what = describe(kind);
    let checked = payload::check(input, len, kind).map_err(|source| OutputError::Payload { what, source })?;
    if &checked.digest != claimed {
        return Err(OutputError::DigestMismatch { what, found: checked.digest, claimed: claimed.clone() });
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(status: Status, len: u64, digest: Option<&str>) -> Outcome {
        Outcome { status, payload_len: len, payload_digest: digest.map(str::to_string), timings: vec![], notes: vec![] }
    }

    #[test]
    fn result_headers_claim_only_what_is_possible() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let ok = |code| Status::Finished { exit_code: code };
        let table: Vec<(Outcome, Result<Claim, &str>)> = vec![
            (outcome(ok(0), 1024, Some(&d)), Ok(Claim::Payload { len: 1024, digest: Digest::parse(&d).unwrap() })),
            (outcome(ok(42), 0, None), Ok(Claim::ScriptFailed { code: 42 })),
            (outcome(ok(255), 0, None), Ok(Claim::ScriptFailed { code: 255 })),
            (
                outcome(Status::Failed { kind: FailureKind::OutOfScratch, reason: "full".into() }, 0, None),
                Ok(Claim::Failed { kind: FailureKind::OutOfScratch, reason: "full".into() }),
            ),
            (outcome(ok(-1), 0, None), Err("its result header says the script exited with -1; exit codes are 0 to 255")),
            (outcome(ok(256), 0, None), Err("its result header says the script exited with 256; exit codes are 0 to 255")),
            (outcome(ok(3), 1024, None), Err("its result header says the script exited with 3, yet announces a payload of 1024 bytes")),
            (outcome(ok(0), 1024, None), Err("its result header says the script exited with 0 but names no payload digest")),
            (
                outcome(ok(0), 1024, Some("md5:\u{1b}[2J")),
                Err("its result header names the payload digest \"md5:\\x1b[2J\", which is not sha256:<64 hex digits>"),
            ),
            (outcome(ok(0), 1 << 40, Some(&d)), Err("its result header announces a payload of 1099511627776 bytes; the output disk has room for 1048576")),
        ];
        for (o, want) in table {
            let got = check_outcome(&o, 1 << 20).map_err(|e| e.to_string());
            assert_eq!(got, want.map_err(String::from), "{o:?}");
        }
    }

    #[test]
    fn a_payload_whose_digest_is_not_the_claimed_one_is_refused() {
        let empty = vec![0u8; 1024];
        let right = Digest::from_sha256(&<sha2::Sha256 as sha2::Digest>::digest(&empty));
        let kind = payload::Kind::Layer { epoch: 1 };
        assert_eq!(check_payload(&empty[..], 1024, &right, kind).unwrap().entries, 0);
        let wrong = Digest::parse(&format!("sha256:{}", "00".repeat(32))).unwrap();
        let err = check_payload(&empty[..], 1024, &wrong, kind).unwrap_err();
        assert_eq!(err.to_string(), format!("the new layer it wrote has digest {right}, but its result header says {wrong}"));
        let err = check_payload(&empty[..512], 512, &right, payload::Kind::Export).unwrap_err();
        assert_eq!(err.to_string(), "the export it wrote is invalid");
        assert_eq!(
            std::error::Error::source(&err).unwrap().to_string(),
            "at byte 0: it ends without the two zero blocks that end a tar (the payload is cut short, or its announced length is too small)"
        );
    }
}
