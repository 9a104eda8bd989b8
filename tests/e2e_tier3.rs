//! Tier 3: the whole pipeline through the built-in VMM, whose outputs must
//! be byte-identical to the QEMU launcher's on the same inputs. Needs
//! hardware virtualisation (vmx/svm, not PVM): elsewhere every test here
//! prints that it was skipped and why.

mod common;

use std::fs;

use common::*;

fn hardware_kvm() -> bool {
    match runasroot::machine::kvm::hardware_support() {
        Ok(()) => true,
        Err(reason) => {
            skip(&format!("tier 3 needs hardware KVM: {reason}"));
            false
        }
    }
}

/// Runs the same job with both launchers; returns (builtin, qemu) outputs.
fn both(script_body: &str) -> [(Vec<u8>, Vec<u8>); 2] {
    let dir = scratch();
    let s = script(dir.path(), "s.sh", script_body);
    let base = busybox_base();
    ["builtin", "qemu"].map(|vmm| {
        let tmp = subdir(dir.path(), &format!("tmp-{vmm}"));
        let img = dir.path().join(format!("img-{vmm}.tar"));
        let layer = dir.path().join(format!("layer-{vmm}.tar"));
        // The built-in VMM needs /dev/kvm: run as the test user here.
        let run = common::finish(
            std::process::Command::new(bin())
                .args(["--vmm", vmm, "--base", base.to_str().unwrap(), "--script", s.to_str().unwrap()])
                .arg("-o")
                .arg(&img)
                .arg("--layer-output")
                .arg(&layer)
                .env("TMPDIR", &tmp)
                .output()
                .unwrap(),
        );
        ok(run);
        assert_empty_dir(&tmp);
        (fs::read(&img).unwrap(), fs::read(&layer).unwrap())
    })
}

#[test]
fn tier3_builtin_vmm_matches_qemu_byte_for_byte() {
    if !hardware_kvm() {
        return;
    }
    let [builtin, qemu] = both(SKELETON_SCRIPT);
    assert_eq!(listing(&builtin.1), skeleton_layer());
    assert!(builtin.0 == qemu.0, "-o differs between the built-in VMM and QEMU");
    assert!(builtin.1 == qemu.1, "--layer-output differs between the built-in VMM and QEMU");
}

#[test]
fn tier3_builtin_vmm_passes_exit_codes_and_timeouts() {
    if !hardware_kvm() {
        return;
    }
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let base = busybox_base();
    let fail = script(dir.path(), "f.sh", "exit 7\n");
    let out = dir.path().join("o.tar");
    let run = finish(
        std::process::Command::new(bin())
            .args(["--vmm", "builtin", "--base", base.to_str().unwrap(), "--script", fail.to_str().unwrap(), "-o", out.to_str().unwrap()])
            .env("TMPDIR", &tmp)
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 7, "{run:?}");
    let slow = script(dir.path(), "s.sh", "sleep 600\n");
    let run = finish(
        std::process::Command::new(bin())
            .args(["--vmm", "builtin", "--timeout", "5", "--base", base.to_str().unwrap(), "--script", slow.to_str().unwrap(), "-o", out.to_str().unwrap()])
            .env("TMPDIR", &tmp)
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 124, "{run:?}");
    assert!(!out.exists());
    assert_empty_dir(&tmp);
}

#[test]
fn forcing_the_builtin_vmm_without_hardware_kvm_fails_fast_with_the_reason() {
    if runasroot::machine::kvm::hardware_support().is_ok() {
        skip("this host has hardware KVM, so --vmm builtin is allowed here");
        return;
    }
    let dir = scratch();
    let tmp = subdir(dir.path(), "tmp");
    let s = script(dir.path(), "s.sh", "true\n");
    let base = busybox_base();
    let start = std::time::Instant::now();
    let run = runasroot(&["--vmm", "builtin", "--base", base.to_str().unwrap(), "--script", s.to_str().unwrap(), "--layer-output", "-"], &tmp);
    assert_eq!(run.code, 125, "{run:?}");
    assert!(run.stderr.contains("built-in VMM"), "{run:?}");
    assert!(start.elapsed() < std::time::Duration::from_secs(3), "took {:?}", start.elapsed());
    assert_empty_dir(&tmp);
}
