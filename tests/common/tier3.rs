//! Tier 3's runner: a batch of cases, each a POSIX shell script that
//! drives the real `runasroot` binary, run once with the built-in VMM and,
//! where a case asks, once more with QEMU for byte identity.
//!
//! Where the host has hardware KVM the built-in runs happen here. Elsewhere
//! (PVM, no KVM) they all happen in one boot of the nested L1 guest
//! (tests/common/l1.rs), whose KVM boots Linux; the QEMU references run on
//! the host meanwhile. Either way the same driver script runs the cases,
//! so they see the same thing:
//!
//! * `$RAR` the binary, `$VMM` `builtin` or `qemu`, `$OUT` an empty
//!   directory for the case's files, `$TMPDIR` an empty private temp dir
//!   (the driver lists what is left in it), cwd `$OUT`, stdin /dev/null;
//! * uid 65534 where the driver runs as root (runasroot must never need
//!   root), with /dev/kvm usable;
//! * a deadline of [`CASE_DEADLINE`] (SIGKILL), beside the runs' own
//!   `--timeout`s.
//!
//! What comes back per run: exit code, stdout, stderr, the files in
//! `$OUT`, what was left in `$TMPDIR`, and how long it took.
//!
//! Include after `mod common;` with `#[path = "common/l1.rs"] mod l1;` and
//! `#[path = "common/tier3.rs"] mod tier3;`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{bin, is_root, NOBODY};
use crate::l1;

/// Each case is killed after this long, whatever it does.
pub const CASE_DEADLINE: Duration = Duration::from_secs(240);
/// The whole L1 boot is killed after this long (normally under 2 minutes
/// here, on 2 shared cores).
pub const L1_DEADLINE: Duration = Duration::from_secs(900);

/// One case.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: &'static str,
    /// The shell script (see the module doc for what it sees).
    pub script: String,
    /// Also run it with `VMM=qemu` on the host, for byte identity.
    pub reference: bool,
}

/// Where the built-in VMM ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// On this host: it has hardware KVM.
    Host,
    /// Inside the nested L1, because the host's KVM cannot boot Linux (why).
    NestedL1(String),
}

/// One run of one case, read back into memory (the batch's temporary
/// files are gone once [`run`] returns).
pub struct CaseRun {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
    /// The plain files the case left in `$OUT`, by name.
    pub files: BTreeMap<String, Vec<u8>>,
    /// Names left in `$TMPDIR` after the run.
    pub tmp_left: Vec<String>,
    /// Wall time of the case (seconds, from the uptime of where it ran).
    pub secs: f64,
}

impl CaseRun {
    /// A file the case wrote in `$OUT`.
    pub fn file(&self, name: &str) -> Option<Vec<u8>> {
        self.files.get(name).cloned()
    }
}

impl std::fmt::Debug for CaseRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files: Vec<_> = self.files.iter().map(|(n, b)| format!("{n} ({} bytes)", b.len())).collect();
        write!(
            f,
            "exit {}, {:.1} s, $OUT: {files:?}, left in $TMPDIR: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            self.secs,
            self.tmp_left,
            String::from_utf8_lossy(&self.stdout),
            self.stderr
        )
    }
}

/// The results of a batch.
pub struct Batch {
    pub place: Place,
    builtin: BTreeMap<String, CaseRun>,
    qemu: BTreeMap<String, CaseRun>,
    /// The L1's wall time (boot, every case, hand-back), when nested.
    pub l1_wall: Option<Duration>,
    /// The L1's console, when nested.
    pub l1_console: String,
    /// Why some cases have no result (the L1's deadline passed first).
    pub incomplete: Option<String>,
}

impl Batch {
    /// The case's run with the built-in VMM.
    pub fn builtin(&self, name: &str) -> &CaseRun {
        self.builtin.get(name).unwrap_or_else(|| panic!("tier 3 case {name} has no built-in VMM run: {}", self.why_missing()))
    }

    /// The case's reference run with QEMU.
    pub fn qemu(&self, name: &str) -> &CaseRun {
        self.qemu.get(name).unwrap_or_else(|| panic!("tier 3 case {name} has no QEMU reference run: {}", self.why_missing()))
    }

    fn why_missing(&self) -> &str {
        self.incomplete.as_deref().unwrap_or("no such case")
    }

    /// One line per run: where and how long.
    pub fn summary(&self) -> String {
        let mut s = match (&self.place, self.l1_wall) {
            (Place::Host, _) => "tier 3: the built-in VMM ran on this host (hardware KVM)\n".to_string(),
            (Place::NestedL1(why), wall) => format!(
                "tier 3: the built-in VMM ran inside the nested L1 guest (QEMU TCG, emulated AMD SVM), one boot of {:.0} s, because {why}\n",
                wall.unwrap_or_default().as_secs_f64()
            ),
        };
        if let Some(why) = &self.incomplete {
            s.push_str(&format!("tier 3: INCOMPLETE: {why}\n"));
        }
        for (vmm, runs) in [("builtin", &self.builtin), ("qemu", &self.qemu)] {
            for (name, r) in runs {
                s.push_str(&format!("tier 3:   {name:<12} {vmm:<8} exit {:<3} {:6.1} s\n", r.code, r.secs));
            }
        }
        s
    }
}

/// Where the built-in VMM can run here, or why tier 3 cannot run at all.
pub fn place() -> Result<Place, String> {
    match runasroot::machine::kvm::hardware_support() {
        Ok(()) => Ok(Place::Host),
        Err(why) => match l1::unavailable() {
            None => Ok(Place::NestedL1(why.to_string())),
            Some(l1_why) => Err(format!("the built-in VMM cannot boot Linux here ({why}) and the nested L1 cannot run: {l1_why}")),
        },
    }
}

/// Runs every case (built-in, and QEMU where asked). `inputs` are the
/// files and directories the cases read; they must be readable by uid
/// 65534. Errors say why the batch as a whole failed (the L1 did not
/// boot, a deadline passed).
pub fn run(place: Place, cases: &[Case], inputs: &[PathBuf]) -> Result<Batch, String> {
    let dir = tempfile::Builder::new().prefix("rar-tier3-").tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let scripts = dir.path().join("cases");
    fs::create_dir(&scripts).unwrap();
    for c in cases {
        write_readable(&scripts.join(format!("{}.sh", c.name)), &c.script);
    }
    for d in [dir.path(), &scripts] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let setpriv = format!("/usr/bin/setpriv --reuid {NOBODY} --regid {NOBODY} --clear-groups --");
    let drop_root = if is_root() { setpriv.as_str() } else { "" };

    // The QEMU references, on the host, beside the built-in runs.
    let reference: Vec<&Case> = cases.iter().filter(|c| c.reference).collect();
    let host_root = dir.path().join("host");
    fs::create_dir(&host_root).unwrap();
    let ref_driver = dir.path().join("reference.sh");
    write_readable(&ref_driver, &driver(&reference.iter().map(|c| (*c, "qemu")).collect::<Vec<_>>(), &scripts, drop_root));
    let references = {
        let (driver, root) = (ref_driver.clone(), host_root.clone());
        std::thread::spawn(move || run_driver_here(&driver, &root))
    };

    let all: Vec<(&Case, &str)> = cases.iter().map(|c| (c, "builtin")).collect();
    let builtin_driver = dir.path().join("builtin.sh");
    let mut incomplete = None;
    let (builtin_root, l1_wall, l1_console) = match &place {
        Place::Host => {
            write_readable(&builtin_driver, &driver(&all, &scripts, drop_root));
            run_driver_here(&builtin_driver, &host_root)?;
            (host_root.clone(), None, String::new())
        }
        Place::NestedL1(_) => {
            // In the L1 the driver runs as root; the cases drop to 65534
            // through the host's setpriv (busybox's cannot change uids).
            write_readable(&builtin_driver, &driver(&all, &scripts, &setpriv));
            let mut puts: Vec<PathBuf> = vec![PathBuf::from(bin()), PathBuf::from("/usr/bin/setpriv"), scripts.clone()];
            puts.extend(inputs.iter().cloned());
            let out = dir.path().join("l1-out");
            let r = l1::run(&builtin_driver, &puts, &out, L1_DEADLINE);
            // 124: the L1 stopped the driver at its deadline and handed
            // back the cases that had finished.
            if r.code == 124 && out.join("exit-code").exists() {
                incomplete = Some(format!("the nested L1 passed its deadline of {} s first", L1_DEADLINE.as_secs()));
            } else if r.code != 0 {
                let console = r.console();
                let tail: Vec<&str> = console.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
                return Err(format!(
                    "the nested L1 failed (exit {}, {:.0} s): {}\n{}\n--- L1 console (last lines) ---\n{}",
                    r.code,
                    r.wall.as_secs_f64(),
                    r.stderr.trim(),
                    keep_for_diagnosis(&out),
                    tail.join("\n")
                ));
            }
            (out, Some(r.wall), r.console())
        }
    };
    references.join().map_err(|_| "the QEMU reference thread panicked".to_string())??;

    let collect = |root: &Path, list: &[(&Case, &str)]| -> Result<BTreeMap<String, CaseRun>, String> {
        let finished = |d: &PathBuf| incomplete.is_none() || d.join("uptime").exists();
        let dirs = list.iter().map(|(c, vmm)| (c.name.to_string(), root.join(format!("{}-{vmm}", c.name))));
        dirs.filter(|(_, d)| finished(d)).map(|(name, d)| Ok((name, read_run(&d)?))).collect()
    };
    let builtin = collect(&builtin_root, &all)?;
    let qemu = collect(&host_root, &reference.iter().map(|c| (*c, "qemu")).collect::<Vec<_>>())?;
    Ok(Batch { place, builtin, qemu, l1_wall, l1_console, incomplete })
}

/// Copies a failed L1's /out (its console, what the cases wrote, and
/// l1-frozen.txt when it froze) out of the batch's temporary directory,
/// which is gone once [`run`] returns; says where.
fn keep_for_diagnosis(out: &Path) -> String {
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tier3-l1-failed");
    let _ = fs::remove_dir_all(&kept);
    let copied = Command::new("cp").arg("-a").arg(out).arg(&kept).status();
    match copied {
        Ok(s) if s.success() => format!("the L1's /out and console are kept in {}", kept.display()),
        _ => format!("(could not keep the L1's /out in {})", kept.display()),
    }
}

fn write_readable(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).unwrap();
}

/// The driver: runs each (case, vmm) in turn under `root` (its first
/// argument), dropping root with `drop_root`.
fn driver(runs: &[(&Case, &str)], scripts: &Path, drop_root: &str) -> String {
    let mut s = format!(
        r#"#!/bin/sh
# tier 3 driver, written by tests/common/tier3.rs: sh THIS ROOT
root=${{1:-/out}}
rar={bin}
run_case() {{
  d=$root/$1-$2
  mkdir -p "$d/out" "$d/tmp"
  chmod 777 "$d" "$d/out" "$d/tmp"
  echo "tier3: $1 ($2) starts at $(cut -d' ' -f1 /proc/uptime)"
  t0=$(cut -d' ' -f1 /proc/uptime)
  (cd "$d/out" && {drop_root} env RAR="$rar" VMM="$2" OUT="$d/out" TMPDIR="$d/tmp" \
    timeout -s KILL {deadline} sh {scripts}/$1.sh) </dev/null >"$d/stdout" 2>"$d/stderr"
  echo $? >"$d/code"
  echo "$t0 $(cut -d' ' -f1 /proc/uptime)" >"$d/uptime"
  ls -A "$d/tmp" >"$d/tmp-left"
  echo "tier3: $1 ($2) exit $(cat "$d/code")"
}}
"#,
        bin = bin(),
        deadline = CASE_DEADLINE.as_secs(),
        scripts = scripts.display(),
    );
    for (c, vmm) in runs {
        s.push_str(&format!("run_case {} {vmm}\n", c.name));
    }
    s
}

fn run_driver_here(driver: &Path, root: &Path) -> Result<(), String> {
    let o = Command::new("sh").arg(driver).arg(root).stdin(Stdio::null()).output().map_err(|e| format!("sh {}: {e}", driver.display()))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("{} failed ({}): {}", driver.display(), o.status, String::from_utf8_lossy(&o.stderr)))
    }
}

fn read_run(d: &Path) -> Result<CaseRun, String> {
    let text = |name: &str| fs::read_to_string(d.join(name)).map_err(|e| format!("{}: {e} (did the case run?)", d.join(name).display()));
    let code = text("code")?.trim().parse().map_err(|e| format!("{}/code: {e}", d.display()))?;
    let times: Vec<f64> = text("uptime")?.split_whitespace().filter_map(|t| t.parse().ok()).collect();
    let mut files = BTreeMap::new();
    for e in fs::read_dir(d.join("out")).map_err(|e| format!("{}/out: {e}", d.display()))? {
        let e = e.map_err(|e| e.to_string())?;
        if e.file_type().map_err(|e| e.to_string())?.is_file() {
            files.insert(e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).map_err(|e| e.to_string())?);
        }
    }
    Ok(CaseRun {
        code,
        stdout: fs::read(d.join("stdout")).unwrap_or_default(),
        stderr: text("stderr")?,
        files,
        tmp_left: text("tmp-left")?.lines().map(str::to_string).collect(),
        secs: if times.len() == 2 { times[1] - times[0] } else { f64::NAN },
    })
}
