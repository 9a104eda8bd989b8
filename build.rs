//! Builds the guest side and embeds it in the runasroot binary, so users
//! never name a kernel or initramfs:
//!
//! 1. the kernel, through `kernel-config/build.sh` (cached outside the tree,
//!    keyed by what it is built from; about 5 minutes the first time);
//! 2. guest-init, as a static stripped binary (`+crt-static`, the only way here: no
//!    musl target exists), by a nested cargo on a *separate* target dir (the
//!    same one would deadlock on cargo's build lock);
//! 3. the initramfs: a newc cpio holding `/init` and `/dev/console`.
//!
//! `RUNASROOT_SKIP_GUEST_BUILD=1` skips all three (for work on host-only
//! parts); such a binary says at run time that it has no guest and how to
//! get one (`--kernel`/`--initramfs`, or a normal build).

use std::env;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    for var in ["RUNASROOT_SKIP_GUEST_BUILD", "RUNASROOT_KERNEL_SOURCE", "RUNASROOT_CACHE", "RUNASROOT_KERNEL_DEBUG"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    for path in ["kernel-config", "guest-init/src", "guest-init/Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={path}");
    }

    if env::var("RUNASROOT_SKIP_GUEST_BUILD").as_deref() == Ok("1") {
        for name in ["bzImage", "vmlinux", "initramfs.cpio"] {
            fs::write(out.join(name), b"").expect("write to OUT_DIR");
        }
        return;
    }

    let kernel_dir = build_kernel(&root);
    fs::copy(kernel_dir.join("bzImage"), out.join("bzImage")).expect("copy bzImage");
    fs::copy(kernel_dir.join("vmlinux"), out.join("vmlinux")).expect("copy vmlinux");

    let init = build_guest_init(&root, &out);
    let init_bytes = fs::read(&init).unwrap_or_else(|e| panic!("reading {}: {e}", init.display()));
    let cpio = initramfs(&init_bytes);
    fs::write(out.join("initramfs.cpio"), cpio).expect("write initramfs");
}

/// What build.sh says on stderr when the kernel is not cached.
const KERNEL_BUILD_STARTS: &str = "kernel-config/build.sh: building kernel";

fn build_kernel(root: &Path) -> PathBuf {
    let script = root.join("kernel-config/build.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    // Cargo shows a build script's output only when it ends, so minutes of
    // kernel build would pass in silence: say so on the terminal itself.
    let stderr = child.stderr.take().expect("stderr is piped");
    let relay = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with(KERNEL_BUILD_STARTS) {
                if let Ok(mut tty) = fs::OpenOptions::new().write(true).open("/dev/tty") {
                    let _ = writeln!(tty, "\r\x1b[Krunasroot: building the guest kernel (first time only, about 5 minutes; then cached)");
                }
                println!("cargo:warning=built the guest kernel (first time only; then cached)");
            }
            eprintln!("{line}");
        }
    });
    let output = child.wait_with_output().unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    let _ = relay.join();
    if !output.status.success() {
        panic!(
            "building the guest kernel failed ({}); see the messages above.\n\
             On Debian: apt-get install linux-source-6.12 build-essential bc bison flex libelf-dev cpio\n\
             (or set RUNASROOT_SKIP_GUEST_BUILD=1 to build without a guest)",
            output.status
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    PathBuf::from(stdout.lines().last().expect("build.sh prints the kernel dir").trim())
}

fn build_guest_init(root: &Path, out: &Path) -> PathBuf {
    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: keep the nested
    // build beside the profiles so it survives build-script reruns.
    let target_dir = out.ancestors().nth(4).unwrap_or(out).join("runasroot-guest");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .args(["build", "--release", "--locked", "-p", "runasroot-guest-init", "--bin", "runasroot-init"])
        .args(["--target", GUEST_TARGET, "--target-dir"])
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static -C strip=symbols")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .expect("running the nested cargo build of guest-init");
    if !status.success() {
        panic!("building guest-init (static) failed: {status}");
    }
    target_dir.join(GUEST_TARGET).join("release/runasroot-init")
}

/// A newc ("070701") cpio archive: the format the kernel unpacks into its
/// initial rootfs (Documentation/driver-api/early-userspace/buffer-format.rst).
fn initramfs(init: &[u8]) -> Vec<u8> {
    let mut cpio = Vec::new();
    let mut ino = 1;
    let mut entry = |name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        let namesize = name.len() + 1;
        write!(
            cpio,
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            ino, mode, 0, 0, 1, 0, data.len(), 0, 0, rdev.0, rdev.1, namesize, 0
        )
        .expect("write to Vec");
        ino += 1;
        cpio.extend_from_slice(name.as_bytes());
        cpio.push(0);
        while cpio.len() % 4 != 0 {
            cpio.push(0);
        }
        cpio.extend_from_slice(data);
        while cpio.len() % 4 != 0 {
            cpio.push(0);
        }
    };
    const S_IFDIR: u32 = 0o040000;
    const S_IFCHR: u32 = 0o020000;
    const S_IFREG: u32 = 0o100000;
    entry("dev", S_IFDIR | 0o755, (0, 0), b"");
    // The kernel opens /dev/console for init's stdio before any devtmpfs
    // is mounted: without this node init starts with no console.
    entry("dev/console", S_IFCHR | 0o600, (5, 1), b"");
    entry("init", S_IFREG | 0o755, (0, 0), init);
    entry("TRAILER!!!", 0, (0, 0), b"");
    cpio
}
