//! guest-init: runasroot's PID 1 inside the microVM.
//!
//! The steps, in order (each one a function of its own module):
//! 1. mount /proc, /sys, /dev;
//! 2. find the disks by virtio-blk serial, read the job;
//! 3. swap on the scratch disk (if any), mount the scratch tmpfs;
//! 4. mount the host's EROFS lower image read-only (the merged base, its
//!    file data read in place from the layers' own bytes: nothing is
//!    unpacked, and the guest parses no tar);
//! 5. mount the overlay over it (new mount API);
//! 6. copy the copy-to-root tree into the merged view;
//! 7. run the script in its sandbox;
//! 8. pack the upper dir as a layer, or the merged view as an export,
//!    straight onto the output disk;
//! 9. write the result header, sync, reboot.
//!
//! Whatever fails, panics included, ends in step 9 with a failure result:
//! the host must never hang, and PID 1 must never exit (that panics the
//! kernel and loses the reason).

mod console;
mod copyroot;
mod disks;
mod fail;
mod lower;
mod mounts;
mod nodes;
mod pack;
mod script;
mod sys;
#[cfg(test)]
mod testutil;

use std::fs::File;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use nix::sys::stat::Mode;
use nix::time::{clock_gettime, ClockId};
use runasroot_guest::contract::{FailureKind, Mode as JobMode, Note, Outcome, Status};

use crate::console::{Console, Phase};
use crate::fail::Failure;
use crate::lower::Lower;

/// Largest script accepted (it is held in memory).
const MAX_SCRIPT: u64 = 64 << 20;
/// The open-file limit for guest-init and the script.
const NOFILE: u64 = 1 << 20;

/// What main carries across the steps, so a failure can still be written.
struct Run {
    console: Console,
    output: Option<File>,
    timings: Vec<(String, f64)>,
}

impl Run {
    /// Records that a phase ended now (guest uptime: CLOCK_BOOTTIME is
    /// what /proc/uptime shows, and needs no /proc).
    fn mark(&mut self, phase: &str) {
        let t = clock_gettime(ClockId::CLOCK_BOOTTIME).map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 / 1e9).unwrap_or(0.0);
        self.timings.push((phase.to_string(), (t * 1000.0).round() / 1000.0));
    }
}

/// A run that got as far as writing its payload (or not needing one).
struct Done {
    status: Status,
    payload: Option<pack::Written>,
    notes: Vec<Note>,
}

fn main() {
    fail::install_panic_hook();
    let mut run = Run { console: Console::new(), output: None, timings: Vec::new() };
    run.mark("init");
    let result = panic::catch_unwind(AssertUnwindSafe(|| steps(&mut run)));
    let outcome = match result {
        Ok(Ok(done)) => Outcome {
            status: done.status,
            payload_len: done.payload.as_ref().map_or(0, |w| w.len),
            payload_digest: done.payload.map(|w| w.digest),
            timings: Vec::new(),
            notes: done.notes,
        },
        Ok(Err(f)) => failed(&mut run, f),
        Err(_) => failed(&mut run, fail::panic_failure()),
    };
    finish(run, outcome)
}

fn failed(run: &mut Run, f: Failure) -> Outcome {
    run.console.error(&f.reason);
    Outcome {
        status: Status::Failed { kind: f.kind, reason: f.reason },
        payload_len: 0,
        payload_digest: None,
        timings: Vec::new(),
        notes: Vec::new(),
    }
}

fn steps(run: &mut Run) -> Result<Done, Failure> {
    run.console.phase(Phase::Boot);
    // Modes are always given explicitly; the script gets umask 022.
    nix::sys::stat::umask(Mode::empty());
    mounts::mount_early()?;
    if let Err(e) = sys::raise_nofile(NOFILE) {
        run.console.log(&format!("could not raise the open-file limit: {e}"));
    }

    let disks = disks::find()?;
    run.output = Some(disks::open_write(&disks.output)?);
    let job_disk = disks::open_read(&disks.job)?;
    let (job, data_offset) = disks::read_job(&job_disk, &disks.job)?;
    run.console.set_verbose(job.verbose);
    fail::set_scratch_mib(job.scratch_mib);
    run.console.log(&format!(
        "job: {:?}, script: {}, copy-to-root: {}, scratch {} MiB",
        job.mode,
        job.script.is_some(),
        job.lower.copy_to_root,
        job.scratch_mib
    ));
    if let Some(swap) = &disks.swap {
        mounts::swapon(swap)?;
    }
    mounts::mount_scratch(job.scratch_mib)?;

    run.console.phase(Phase::Mount);
    mounts::mount_lower(&disks.lower)?;
    let base = mounts::lower_base();
    let lower = Lower::open(&base).map_err(|source| mounts::MountError::Open { path: base.clone(), source })?;
    mounts::mount_overlay()?;
    run.mark("mount");
    let merged = Path::new(mounts::MERGED);
    if job.lower.copy_to_root {
        let n = copyroot::apply(&mounts::lower_copy(), merged)?;
        run.console.log(&format!("copy-to-root: {n} nodes"));
    }

    let mut made: Vec<&'static str> = Vec::new();
    let mut notes = Vec::new();
    if let Some(blob) = job.script {
        run.console.phase(Phase::Script);
        let script = disks::read_blob(&job_disk, data_offset, blob, "the script", MAX_SCRIPT)?;
        made = script::ensure_mountpoints(merged)?;
        match script::run(merged, &script, &job.env, &run.console)? {
            script::Ended::Failed(f) => return Err(f),
            script::Ended::Code { code, oom_killed } => {
                if oom_killed {
                    notes.push(Note::OomKilled);
                }
                run.mark("script");
                run.console.log(&format!("script exited with {code}"));
                if code != 0 {
                    let scratch = std::ffi::CString::new(mounts::SCRATCH).expect("constant");
                    if let Some((free, total)) = script::free_bytes(&scratch) {
                        if script::scratch_looks_full(free, total) {
                            return Err(Failure::new(
                                FailureKind::OutOfScratch,
                                fail::scratch_full(&format!("running the script (it exited with {code})"), job.scratch_mib),
                            ));
                        }
                    }
                    return Ok(Done { status: Status::Finished { exit_code: code }, payload: None, notes });
                }
            }
        }
    }

    run.console.phase(Phase::Pack);
    let output = run.output.as_ref().expect("opened above");
    let skip = pack::Skip { top_level: &made };
    let written = match job.mode {
        JobMode::Layer => {
            // The upper dir must be quiescent: the script's mounts went with
            // its namespace; the overlay itself goes now.
            mounts::unmount(merged)?;
            pack::pack_layer(&mounts::upper_dir(), &lower, job.epoch, &skip, output)?
        }
        JobMode::Export => {
            let times = pack::ExportTimes { epoch: job.epoch, clamp: job.clamp_mtime };
            pack::export(merged, &mounts::upper_dir(), &times, &skip, output)?
        }
    };
    run.console.log(&format!("packed {} entries, {} bytes, {}", written.entries, written.len, written.digest));
    run.mark("pack");
    Ok(Done { status: Status::Finished { exit_code: 0 }, payload: Some(written), notes })
}

/// Writes the result header (after the payload, already synced), syncs,
/// and reboots; `reboot=t` with QEMU's `-no-reboot`, or the built-in
/// VMM's reset handling, turn that into the end of the VM.
fn finish(mut run: Run, mut outcome: Outcome) -> ! {
    run.console.phase(Phase::Write);
    run.mark("write");
    outcome.timings = std::mem::take(&mut run.timings);
    match &run.output {
        Some(out) => {
            if let Err(e) = disks::write_outcome(out, &outcome) {
                run.console.error(&fail::chain(&e));
            }
        }
        None => run.console.error("no output disk was found: the result cannot be written"),
    }
    nix::unistd::sync();
    loop {
        // RB_AUTOBOOT only returns on failure; power off is the fallback,
        // and PID 1 must not return from main either way.
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}
