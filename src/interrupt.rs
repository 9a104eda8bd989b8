//! Stopping a run early: SIGINT, SIGTERM and `--timeout`, leaving nothing
//! behind.
//!
//! Each sets the process's one cancellation ([`cancelled`], the first
//! cause wins) and the `stop` flag that launchers poll. Then:
//! * in the guest phases the launcher kills the guest and returns;
//! * in the host phases the long loops (hashing, decompressing, copying
//!   layers) call [`check`] per chunk and fail with [`Cancelled`];
//! * the first output is never moved into place once cancelled
//!   ([`begin_commit`]); once one is, the run finishes the rest.
//!
//! Ordinary drops then remove the temporary files, and `main` reports the
//! cause with its exit status ([`Cause::exit_code`]). As a backstop, if
//! the main thread has not finished [`GRACE`] after the cause (a phase
//! that never calls [`check`]), or at a second signal, the signal thread
//! removes every registered temporary path itself, says so and exits with
//! the same status (QEMU dies with us through PDEATHSIG).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Exit status after SIGINT (128 + 2, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;
/// Exit status after SIGTERM (128 + 15, as shells report it).
pub const EXIT_TERMINATED: u8 = 143;
/// Exit status when --timeout expired (as `timeout(1)`).
pub const EXIT_TIMEOUT: u8 = 124;
/// How long the main thread gets to stop by itself.
pub const GRACE: Duration = Duration::from_secs(3);

/// Why a run was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Interrupt,
    Terminate,
    Timeout,
}

impl Cause {
    pub fn exit_code(self) -> u8 {
        match self {
            Cause::Interrupt => EXIT_INTERRUPTED,
            Cause::Terminate => EXIT_TERMINATED,
            Cause::Timeout => EXIT_TIMEOUT,
        }
    }

    /// "SIGINT", "SIGTERM", "--timeout".
    pub fn name(self) -> &'static str {
        match self {
            Cause::Interrupt => "SIGINT",
            Cause::Terminate => "SIGTERM",
            Cause::Timeout => "--timeout",
        }
    }

    fn code(self) -> u8 {
        match self {
            Cause::Interrupt => 1,
            Cause::Terminate => 2,
            Cause::Timeout => 3,
        }
    }

    fn from_code(code: u8) -> Option<Cause> {
        match code {
            1 => Some(Cause::Interrupt),
            2 => Some(Cause::Terminate),
            3 => Some(Cause::Timeout),
            _ => None,
        }
    }
}

/// The error of a loop that saw the run cancelled ([`check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled(pub Cause);

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stopped by {}", self.0.name())
    }
}

impl std::error::Error for Cancelled {}

static CAUSE: AtomicU8 = AtomicU8::new(0);
/// Set once the first output was moved into place: from then on the run
/// completes whatever arrives.
static COMMITTING: AtomicBool = AtomicBool::new(false);
/// The `stop` flag handed to launchers, once [`install`] made it.
static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static TEMP_PATHS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// What the run is doing ("indexing the base"), for the messages.
static PHASE: Mutex<String> = Mutex::new(String::new());

/// Records the phase the run entered.
pub fn set_phase(what: &str) {
    let mut phase = PHASE.lock().unwrap_or_else(|p| p.into_inner());
    phase.clear();
    phase.push_str(what);
}

/// The phase the run is in, as "while …" continues it ("" before any).
pub fn phase() -> String {
    PHASE.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// The cause the run was stopped for, if it was.
pub fn cancelled() -> Option<Cause> {
    Cause::from_code(CAUSE.load(Ordering::SeqCst))
}

/// Fails with [`Cancelled`] (as an I/O error, for loops over readers and
/// writers) once the run is stopped, unless it is already committing.
pub fn check() -> io::Result<()> {
    match cancelled() {
        Some(cause) if !COMMITTING.load(Ordering::SeqCst) => Err(io::Error::other(Cancelled(cause))),
        _ => Ok(()),
    }
}

/// A reader that fails with [`Cancelled`] once the run is stopped.
pub struct Checked<R>(pub R);

impl<R: io::Read> io::Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        check()?;
        self.0.read(buf)
    }
}

/// Called before moving an output into place: fails if the run was
/// stopped and no output is in place yet; otherwise from now on the run
/// completes (so that -o and --layer-output are both written or neither).
pub fn begin_commit() -> io::Result<()> {
    // Under the temp-path lock, so that the backstop's cleanup and exit
    // happen either before (then we fail here) or after every commit.
    let _paths = TEMP_PATHS.lock().unwrap_or_else(|p| p.into_inner());
    if !COMMITTING.load(Ordering::SeqCst) {
        if let Some(cause) = cancelled() {
            return Err(io::Error::other(Cancelled(cause)));
        }
    }
    COMMITTING.store(true, Ordering::SeqCst);
    Ok(())
}

/// Records `cause` (the first one wins) and raises the launchers' stop
/// flag. Returns whether this was the first.
pub fn cancel(cause: Cause) -> bool {
    let first = CAUSE.compare_exchange(0, cause.code(), Ordering::SeqCst, Ordering::SeqCst).is_ok();
    if let Some(stop) = STOP.get() {
        stop.store(true, Ordering::SeqCst);
    }
    first
}

/// Creates a temporary file or directory with `create` and registers it
/// for removal if the run is stopped, both under one lock: the backstop
/// never misses a path created while it cleans up.
pub fn create_temp<T>(create: impl FnOnce() -> io::Result<T>, path: impl Fn(&T) -> &Path) -> io::Result<T> {
    let mut paths = TEMP_PATHS.lock().unwrap_or_else(|p| p.into_inner());
    let made = create()?;
    paths.push(path(&made).to_path_buf());
    Ok(made)
}

/// Registers a temporary file or directory to remove if interrupted.
pub fn register_temp(path: &Path) {
    TEMP_PATHS.lock().unwrap_or_else(|p| p.into_inner()).push(path.to_path_buf());
}

/// Forgets a path (it was renamed into place or removed normally).
pub fn unregister_temp(path: &Path) {
    TEMP_PATHS.lock().unwrap_or_else(|p| p.into_inner()).retain(|p| p != path);
}

/// The backstop: removes every registered path and exits with `cause`'s
/// status, holding the lock so that nothing new is registered (or
/// committed) meanwhile.
fn remove_registered_and_exit(cause: Cause, why: &str) -> ! {
    let paths = TEMP_PATHS.lock().unwrap_or_else(|p| p.into_inner());
    let what = match cause {
        Cause::Timeout => "--timeout expired".to_string(),
        signal => format!("interrupted by {}", signal.name()),
    };
    let phase = phase();
    let during = if phase.is_empty() { String::new() } else { format!(" while {phase}") };
    if COMMITTING.load(Ordering::SeqCst) {
        eprintln!("runasroot: {what}{during} ({why}), as the outputs were being moved into place; exiting");
    } else {
        eprintln!("error: {what}{during} ({why}): removed the temporary files and exited; nothing was written");
    }
    for path in paths.iter() {
        // The main thread may still be creating files inside a directory
        // being removed: retry until it is gone.
        for _ in 0..20 {
            let gone = if path.is_dir() { std::fs::remove_dir_all(path) } else { std::fs::remove_file(path) };
            if gone.is_ok() || !path.exists() {
                break;
            }
        }
    }
    std::process::exit(i32::from(cause.exit_code()));
}

/// Waits for the main thread to stop by itself after `cause`; if it has
/// not within [`GRACE`] (twice that once it is moving outputs into place,
/// which it finishes quickly), or at once when `again` says another
/// signal came, cleans up and exits.
fn backstop(cause: Cause, mut again: impl FnMut() -> bool) -> ! {
    let at = Instant::now();
    loop {
        if again() {
            remove_registered_and_exit(cause, "then a second signal");
        }
        let grace = if COMMITTING.load(Ordering::SeqCst) { 2 * GRACE } else { GRACE };
        if at.elapsed() >= grace {
            remove_registered_and_exit(cause, &format!("the step did not stop within {}s", grace.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Installs the SIGINT/SIGTERM handlers; returns the flag launchers poll.
pub fn install() -> io::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = STOP.get_or_init(|| Arc::new(AtomicBool::new(false))).clone();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let Some(signal) = signals.forever().next() else { return };
        let cause = if signal == SIGTERM { Cause::Terminate } else { Cause::Interrupt };
        if !cancel(cause) {
            // Already stopping (--timeout): this signal is the second word.
            remove_registered_and_exit(cancelled().unwrap_or(cause), "then a signal");
        }
        backstop(cause, || signals.pending().next().is_some());
    })?;
    Ok(stop)
}

/// Cancels the run with [`Cause::Timeout`] `after` from now (then the
/// backstop as for a signal).
pub fn start_deadline(after: Duration) -> io::Result<()> {
    std::thread::Builder::new().name("deadline".into()).spawn(move || {
        std::thread::sleep(after);
        if cancel(Cause::Timeout) {
            backstop(Cause::Timeout, || false);
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_map_to_shell_statuses() {
        let table = [(Cause::Interrupt, 130, "SIGINT"), (Cause::Terminate, 143, "SIGTERM"), (Cause::Timeout, 124, "--timeout")];
        for (cause, code, name) in table {
            assert_eq!((cause.exit_code(), cause.name()), (code, name));
            assert_eq!(Cause::from_code(cause.code()), Some(cause));
        }
        assert_eq!(Cause::from_code(0), None);
        assert_eq!(Cancelled(Cause::Terminate).to_string(), "stopped by SIGTERM");
    }
}
