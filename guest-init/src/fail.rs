//! How a failure inside the guest becomes a result the host can act on.
//!
//! Every module has its own error enum; each implements [`GuestError`] to
//! say which [`FailureKind`] it is. Converting to a [`Failure`] renders the
//! whole cause chain on one line, and turns "no space left on device" on
//! the scratch tmpfs into [`FailureKind::OutOfScratch`]. The guest says
//! what failed and where; which flag to raise is the host's to say. A
//! panic is caught and reported the same way: the host must get a result,
//! never a hang.

use std::error::Error;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use runasroot_guest::contract::FailureKind;

/// The scratch size, to say how full "full" was.
static SCRATCH_MIB: AtomicU64 = AtomicU64::new(0);
/// The message and place of the last panic, recorded by the hook.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

pub fn set_scratch_mib(mib: u64) {
    SCRATCH_MIB.store(mib, Ordering::Relaxed);
}

/// What an error of one module means to the host.
pub trait GuestError: Error + 'static {
    fn kind(&self) -> FailureKind;
    /// Whether the operation wrote to the scratch tmpfs, so that ENOSPC
    /// means "scratch full" (and not, say, "output disk full").
    fn on_scratch(&self) -> bool {
        true
    }
}

/// A failure as written in the result header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub reason: String,
}

impl Failure {
    pub fn new(kind: FailureKind, reason: impl Into<String>) -> Failure {
        Failure { kind, reason: reason.into() }
    }
}

impl<E: GuestError> From<E> for Failure {
    fn from(err: E) -> Failure {
        let reason = chain(&err);
        if err.on_scratch() && chain_has_enospc(&err) {
            return Failure::new(FailureKind::OutOfScratch, scratch_full(&reason, SCRATCH_MIB.load(Ordering::Relaxed)));
        }
        Failure::new(err.kind(), reason)
    }
}

/// "a: b: c" from an error and its sources, skipping a source whose text
/// the previous message already ends with (thiserror messages often embed
/// their source).
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

fn chain_has_enospc(err: &(dyn Error + 'static)) -> bool {
    let mut cur: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if is_out_of_space(io) {
                return true;
            }
            // An io::Error may wrap another error (e.g. from the tar crate).
            if let Some(inner) = io.get_ref() {
                if chain_has_enospc(inner) {
                    return true;
                }
            }
        }
        cur = e.source();
    }
    false
}

/// ENOSPC, or EDQUOT (the same thing for a tmpfs with quotas).
pub fn is_out_of_space(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// The reason for an [`FailureKind::OutOfScratch`] failure.
pub fn scratch_full(doing: &str, scratch_mib: u64) -> String {
    format!("the scratch space ({scratch_mib} MiB) is full: {doing}")
}

/// Records panics (message and place) so `main` can report them in the
/// result header after `catch_unwind`.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "unknown panic payload".to_string()
        };
        let place = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        if let Ok(mut slot) = PANIC.lock() {
            *slot = Some(format!("guest-init panicked{place}: {msg}"));
        }
    }));
}

/// The failure for a panic caught by `catch_unwind`.
pub fn panic_failure() -> Failure {
    let reason = PANIC
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .unwrap_or_else(|| "guest-init panicked".to_string());
    Failure::new(FailureKind::Internal, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Demo {
        #[error("copying {entry}")]
        Copy {
            entry: String,
            #[source]
            source: io::Error,
        },
        #[error("writing the output disk")]
        Output(#[source] io::Error),
        #[error("layer {0} is bad")]
        Bad(usize),
    }

    impl GuestError for Demo {
        fn kind(&self) -> FailureKind {
            match self {
                Demo::Bad(_) => FailureKind::BadInput,
                _ => FailureKind::Internal,
            }
        }
        fn on_scratch(&self) -> bool {
            !matches!(self, Demo::Output(_))
        }
    }

    #[test]
    fn failures_name_the_operation_and_the_limit() {
        set_scratch_mib(1024);
        let enospc = || io::Error::from_raw_os_error(libc::ENOSPC);
        let table: Vec<(Demo, Failure)> = vec![
            (
                Demo::Copy { entry: "usr/x".into(), source: enospc() },
                Failure::new(
                    FailureKind::OutOfScratch,
                    format!("the scratch space (1024 MiB) is full: copying usr/x: {}", enospc()),
                ),
            ),
            (
                Demo::Copy { entry: "a".into(), source: io::Error::other(enospc()) },
                Failure::new(FailureKind::OutOfScratch, format!("the scratch space (1024 MiB) is full: copying a: {}", enospc())),
            ),
            (
                Demo::Output(enospc()),
                Failure::new(FailureKind::Internal, format!("writing the output disk: {}", enospc())),
            ),
            (Demo::Bad(3), Failure::new(FailureKind::BadInput, "layer 3 is bad")),
        ];
        for (err, want) in table {
            assert_eq!(Failure::from(err), want);
        }
    }

    #[test]
    fn panics_become_internal_failures_with_their_place() {
        install_panic_hook();
        let r = std::panic::catch_unwind(|| panic!("boom {}", 7));
        assert!(r.is_err());
        let f = panic_failure();
        let _ = std::panic::take_hook();
        assert_eq!(f.kind, FailureKind::Internal);
        assert!(f.reason.starts_with("guest-init panicked at "), "{}", f.reason);
        assert!(f.reason.ends_with(": boom 7"), "{}", f.reason);
    }
}
