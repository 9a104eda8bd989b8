//! Ctrl-C and SIGTERM: stop the guest and leave nothing behind.
//!
//! A signal sets the shared `stop` flag; the launcher's loop sees it, kills
//! the guest and returns, and ordinary drops remove temporary files. Host
//! phases that do not poll the flag (hashing, writing) are covered by a
//! grace period: if the main thread has not finished shortly after the
//! signal, the signal thread removes every registered temporary path
//! itself and exits with 130 (QEMU dies with us through PDEATHSIG).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Exit status after SIGINT/SIGTERM (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;
/// How long the main thread gets to clean up by itself.
const GRACE: Duration = Duration::from_secs(3);

static TEMP_PATHS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Registers a temporary file or directory to remove if interrupted.
pub fn register_temp(path: &Path) {
    if let Ok(mut paths) = TEMP_PATHS.lock() {
        paths.push(path.to_path_buf());
    }
}

/// Forgets a path (it was renamed into place or removed normally).
pub fn unregister_temp(path: &Path) {
    if let Ok(mut paths) = TEMP_PATHS.lock() {
        paths.retain(|p| p != path);
    }
}

fn remove_registered() {
    let paths = TEMP_PATHS.lock().map(|p| p.clone()).unwrap_or_default();
    for path in paths {
        if path.is_dir() {
            let _ = std::fs::remove_dir_all(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Installs the handlers; returns the flag launchers poll.
pub fn install() -> std::io::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    let flag = stop.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if signals.forever().next().is_some() {
            flag.store(true, Ordering::SeqCst);
            std::thread::sleep(GRACE);
            remove_registered();
            std::process::exit(EXIT_INTERRUPTED as i32);
        }
    })?;
    Ok(stop)
}
