//! The nested L1 guest of `tests/nested/l1` (Debian's kernel under QEMU
//! TCG with emulated AMD SVM: hardware-style KVM on a host without it),
//! driven from Rust: tier 3 (tests/e2e_tier3.rs) and the vmm bench run the
//! built-in VMM there when the host itself cannot.
//!
//! Include with `#[path = "common/l1.rs"] mod l1;` (from benches:
//! `#[path = "../tests/common/l1.rs"]`). Uses std only.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The harness script.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nested/l1")
}

/// Why the L1 cannot run here, if it cannot: QEMU missing, or the L1
/// kernel neither cached nor fetchable (`tests/nested/l1 prepare` says
/// which, and the fix).
pub fn unavailable() -> Option<String> {
    let qemu = Command::new("sh").arg("-c").arg("command -v qemu-system-x86_64").stdout(Stdio::null()).status();
    if !qemu.map(|s| s.success()).unwrap_or(false) {
        return Some("qemu-system-x86_64 is not installed (.ci/setup installs it)".into());
    }
    match Command::new(script()).arg("prepare").stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("tests/nested/l1 prepare failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => Some(format!("cannot run {}: {e}", script().display())),
    }
}

/// What came back from one L1 boot.
#[derive(Debug)]
pub struct L1Run {
    /// The script's exit status (124: a deadline passed; 125: the L1
    /// could not run it).
    pub code: i32,
    /// The L1's /out, with console.log and exit-code beside what the
    /// script wrote.
    pub out: PathBuf,
    /// The harness's own stderr (why it failed, how long the L1 ran).
    pub stderr: String,
    /// Wall time of the whole boot, script and hand-back.
    pub wall: Duration,
}

impl L1Run {
    /// The L1's serial console: its kernel messages and the script's output.
    pub fn console(&self) -> String {
        fs::read_to_string(self.out.join("console.log")).unwrap_or_default()
    }
}

/// Boots the L1, runs `sh SCRIPT` in it with every path of `puts` at its
/// own path, and brings back its /out into `out`; the whole run is killed
/// after `timeout`.
pub fn run(script_file: &Path, puts: &[PathBuf], out: &Path, timeout: Duration) -> L1Run {
    let mut cmd = Command::new(script());
    for p in puts {
        cmd.arg("--put").arg(p);
    }
    cmd.arg("--out").arg(out).arg("--timeout").arg(timeout.as_secs().to_string()).arg(script_file);
    let start = Instant::now();
    let o = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {}: {e}", script().display()));
    L1Run {
        code: o.status.code().unwrap_or(-1),
        out: out.to_path_buf(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        wall: start.elapsed(),
    }
}
