//! Helpers for end-to-end tests: run the real `runasroot` binary as an
//! unprivileged user, list layer tars, talk to real clients.
//!
//! Include with `mod common;` (this file) from a test in tests/.

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

/// The binary under test. As root, a copy in a world-readable place: the
/// unprivileged user may not be able to reach the checkout (a clone under
/// /root, say).
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let built = env!("CARGO_BIN_EXE_runasroot");
        if !is_root() {
            return built.to_string();
        }
        let meta = fs::metadata(built).expect("the built binary");
        let mtime = meta.modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = world_readable_dir(&format!("bin-{}-{mtime}", meta.len()));
        let copy = dir.join("runasroot");
        if !copy.exists() {
            let tmp = dir.join(format!(".runasroot.{}", std::process::id()));
            fs::copy(built, &tmp).expect("copy the binary");
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
            fs::rename(&tmp, &copy).expect("rename the binary copy");
        }
        prune_stale_copies(&dir);
        copy.to_string_lossy().into_owned()
    })
}

/// Removes copies of older builds (a day untouched), so repeated test runs
/// do not fill the temp dir with binaries.
fn prune_stale_copies(current: &Path) {
    let Some(parent) = current.parent() else { return };
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age.as_secs() > 24 * 3600);
        if path != current && stale && entry.file_name().to_string_lossy().starts_with("bin-") {
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// A directory under the system temp dir that every user can read,
/// whatever the permissions of the checkout.
pub fn world_readable_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join("runasroot-tests").join(name);
    fs::create_dir_all(&dir).expect("mkdir");
    for d in [dir.parent().unwrap(), &dir] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// The unprivileged uid/gid the binary runs as when the tests run as root
/// (runasroot must never need root).
pub const NOBODY: u32 = 65534;

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and has no side effects.
    unsafe { libc::geteuid() == 0 }
}

/// A temporary directory everyone may use (the binary runs as nobody).
pub fn scratch() -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("rar-test-").tempdir().expect("tempdir");
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
    d
}

/// A sub directory of a scratch dir, world-writable.
pub fn subdir(parent: &Path, name: &str) -> PathBuf {
    let p = parent.join(name);
    fs::create_dir_all(&p).expect("mkdir");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o777)).expect("chmod");
    p
}

/// A command running `runasroot` unprivileged (through setpriv when the
/// tests run as root), with TMPDIR inside `tmp` so leftovers are visible.
pub fn runasroot_cmd(args: &[&str], tmp: &Path) -> Command {
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", &NOBODY.to_string(), "--regid", &NOBODY.to_string(), "--clear-groups", "--"]);
        c.arg(bin());
        c
    } else {
        Command::new(bin())
    };
    cmd.args(args).env("TMPDIR", tmp).env_remove("SOURCE_DATE_EPOCH").stdin(Stdio::null());
    cmd
}

/// Result of one run.
pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stderr ---\n{}", self.code, self.stderr)
    }
}

pub fn finish(out: Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `runasroot ARGS` unprivileged with a private TMPDIR.
pub fn runasroot(args: &[&str], tmp: &Path) -> Run {
    finish(runasroot_cmd(args, tmp).output().expect("spawn runasroot"))
}

/// Asserts a run succeeded, showing its stderr if not.
pub fn ok(run: Run) -> Run {
    assert_eq!(run.code, 0, "runasroot failed: {run:?}");
    run
}

/// Whether TMPDIR holds nothing (no temp file left behind).
pub fn assert_empty_dir(dir: &Path) {
    let left: Vec<_> = fs::read_dir(dir).expect("read dir").map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The busybox-static base built by the bundled example script. The script
/// is reproducible, so every test process may share one file: each builds
/// its own and renames it into place.
pub fn busybox_base() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = world_readable_dir("fixtures");
        let out = dir.join("busybox-base.tar");
        let tmp = dir.join(format!(".busybox-base.{}.tar", std::process::id()));
        let status = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/example/make-busybox-base.sh"))
            .arg(&tmp)
            .stdout(Stdio::null())
            .status()
            .expect("run make-busybox-base.sh");
        assert!(status.success(), "make-busybox-base.sh failed (is busybox-static installed?)");
        // Never replace a file another test process may be reading (a run
        // fails when its base changes under it): the script is
        // reproducible, so an existing file with these bytes is this one.
        if fs::read(&out).ok() == fs::read(&tmp).ok() {
            fs::remove_file(&tmp).unwrap();
        } else {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).unwrap();
            fs::rename(&tmp, &out).unwrap();
        }
        out
    })
    .clone()
}

/// The skeleton case both launchers run: a chown, a deleted base file and a
/// re-created directory, on the busybox base.
pub const SKELETON_SCRIPT: &str = "mkdir /data && chown 1000:1000 /data\n\
     rm /etc/group\n\
     rm -rf /root && mkdir /root && echo hi > /root/new\n";

/// The layer [`SKELETON_SCRIPT`] must produce, entry by entry.
pub fn skeleton_layer() -> Vec<String> {
    [
        "data/ dir 755 1000:1000 0",
        "etc/ dir 755 0:0 0",
        "etc/.wh.group file 644 0:0 0",
        "root/ dir 755 0:0 0",
        "root/.wh..wh..opq file 644 0:0 0",
        "root/new file 644 0:0 3",
    ]
    .map(String::from)
    .to_vec()
}

/// Writes a script file readable by everyone.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, body).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    p
}

/// One line per entry: `path type mode uid:gid size[ -> link][ xattrs]`.
pub fn listing(tar_bytes: &[u8]) -> Vec<String> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut out = Vec::new();
    for e in archive.entries().expect("a tar") {
        let mut e = e.expect("a tar entry");
        let h = e.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Regular => "file".to_string(),
            tar::EntryType::Directory => "dir".into(),
            tar::EntryType::Symlink => "symlink".into(),
            tar::EntryType::Link => "hardlink".into(),
            tar::EntryType::Char => format!("char {}:{}", h.device_major().unwrap().unwrap_or(0), h.device_minor().unwrap().unwrap_or(0)),
            tar::EntryType::Block => format!("block {}:{}", h.device_major().unwrap().unwrap_or(0), h.device_minor().unwrap().unwrap_or(0)),
            tar::EntryType::Fifo => "fifo".into(),
            other => format!("{other:?}"),
        };
        let mut line = format!(
            "{} {} {:o} {}:{} {}",
            String::from_utf8_lossy(&e.path_bytes()),
            kind,
            h.mode().unwrap(),
            e.header().uid().unwrap(),
            e.header().gid().unwrap(),
            e.size()
        );
        if let Some(link) = e.link_name_bytes() {
            line.push_str(&format!(" -> {}", String::from_utf8_lossy(&link)));
        }
        let mut xattrs: Vec<String> = e
            .pax_extensions()
            .unwrap()
            .map(|exts| {
                exts.filter_map(|x| {
                    let x = x.unwrap();
                    let k = x.key().unwrap();
                    k.strip_prefix("SCHILY.xattr.").map(|k| format!("{k}={:?}", String::from_utf8_lossy(x.value_bytes())))
                })
                .collect()
            })
            .unwrap_or_default();
        xattrs.sort();
        if !xattrs.is_empty() {
            line.push_str(&format!(" [{}]", xattrs.join(",")));
        }
        let mut sink = Vec::new();
        e.read_to_end(&mut sink).unwrap();
        out.push(line);
    }
    out
}

/// The mtimes of every entry of a tar.
pub fn mtimes(tar_bytes: &[u8]) -> Vec<u64> {
    tar::Archive::new(tar_bytes).entries().unwrap().map(|e| e.unwrap().header().mtime().unwrap()).collect()
}

/// Says that a test (or part of one) was skipped and why. Written straight
/// to the stderr file descriptor, past the test harness's output capture,
/// so a skip shows in `cargo test` output even when the test passes.
pub fn skip(reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}

/// Whether a host tool is installed; prints why a test is skipped if not.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).stdout(Stdio::null()).status().map(|s| s.success()).unwrap_or(false);
    if !found {
        skip(&format!("{tool} is not installed (.ci/setup installs it)"));
    }
    found
}

/// `skopeo inspect --raw`/config etc.: runs skopeo and returns stdout.
pub fn skopeo(args: &[&str]) -> String {
    let out = Command::new("skopeo").args(args).output().expect("run skopeo");
    assert!(out.status.success(), "skopeo {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A private dockerd (own data-root, exec-root and socket; vfs storage; no
/// iptables or bridge), stopped on drop. Needs root.
pub struct Dockerd {
    child: std::process::Child,
    dir: tempfile::TempDir,
    host: String,
}

impl Dockerd {
    /// Starts one, or returns None (printing why) where that is impossible.
    pub fn start() -> Option<Dockerd> {
        if !is_root() {
            skip("docker load needs a private dockerd, which needs root");
            return None;
        }
        if !have("dockerd") {
            return None;
        }
        let dir = tempfile::Builder::new().prefix("rar-dockerd-").tempdir().unwrap();
        let sock = dir.path().join("docker.sock");
        let host = format!("unix://{}", sock.display());
        let log = fs::File::create(dir.path().join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .args(["--storage-driver", "vfs", "--iptables=false", "--ip6tables=false", "--bridge=none"])
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("docker.pid"))
            .args(["-H", &host])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn dockerd");
        let d = Dockerd { child, dir, host };
        for _ in 0..300 {
            if d.docker(&["version"]).status.success() {
                return Some(d);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("private dockerd did not come up: {}", fs::read_to_string(d.dir.path().join("dockerd.log")).unwrap_or_default());
    }

    /// Runs the docker client against this daemon.
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker").arg("-H").arg(&self.host).args(args).output().expect("run docker")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; SIGTERM lets dockerd
        // unmount its private state before exiting.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
