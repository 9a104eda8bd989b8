//! Every saved fuzz input, through the same code the fuzz target runs
//! (`fuzz/harness/`), with the ordinary toolchain: CI runs these, not
//! the fuzzer. `fuzz/regressions/TARGET/` holds the inputs that once
//! crashed, hung or broke a check (each named after what it found);
//! `fuzz/seeds/TARGET/` the starting inputs, written from the harness's
//! `seeds()` by `cargo test --test fuzz_regressions -- --ignored write_seeds`.

#[path = "../fuzz/harness/mod.rs"]
#[allow(dead_code)]
mod harness;

use std::path::{Path, PathBuf};

type Target = (&'static str, fn(&[u8]), fn() -> Vec<Vec<u8>>);

const TARGETS: [Target; 9] = [
    ("contract", harness::contract::run, harness::contract::seeds),
    ("erofs", harness::erofs::run, harness::noise_seeds),
    ("image", harness::image::run, harness::image::seeds),
    ("layers", harness::layers::run, harness::noise_seeds),
    ("lower", harness::lower::run, harness::noise_seeds),
    ("nbd", harness::nbd::run, harness::nbd::seeds),
    ("new_layer", harness::new_layer::run, harness::new_layer::seeds),
    ("tar_guard", harness::tar_guard::run, harness::tar_guard::seeds),
    ("virtio_blk", harness::virtio_blk::run, harness::virtio_blk::seeds),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(list) => list.map(|e| e.expect("a directory entry").path()).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files
}

/// Runs every file under `kind/TARGET/`; returns how many ran.
fn run_saved(kind: &str) -> usize {
    let mut ran = 0;
    let mut failed = Vec::new();
    for (name, run, _) in TARGETS {
        for path in inputs(&fuzz_dir().join(kind).join(name)) {
            let bytes = std::fs::read(&path).expect("a saved input");
            if std::panic::catch_unwind(|| run(&bytes)).is_err() {
                failed.push(path.display().to_string());
            }
            ran += 1;
        }
    }
    assert!(failed.is_empty(), "saved fuzz inputs that fail (see the panics above):\n{}", failed.join("\n"));
    ran
}

#[test]
fn every_regression_input_passes() {
    let ran = run_saved("regressions");
    assert!(ran > 0, "no regression inputs under {}", fuzz_dir().join("regressions").display());
    println!("{ran} regression inputs");
}

#[test]
fn every_seed_passes_and_every_target_has_seeds() {
    for (name, _, _) in TARGETS {
        assert!(!inputs(&fuzz_dir().join("seeds").join(name)).is_empty(), "no seeds for {name}: run write_seeds");
    }
    run_saved("seeds");
}

/// Writes each target's `seeds()` to `fuzz/seeds/TARGET/` (the fuzzer's
/// starting corpus).
#[test]
#[ignore = "writes fuzz/seeds; run by hand when a target's seeds change"]
fn write_seeds() {
    for (name, _, seeds) in TARGETS {
        let dir = fuzz_dir().join("seeds").join(name);
        std::fs::create_dir_all(&dir).expect("the seeds directory");
        for (i, seed) in seeds().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).expect("a seed");
        }
    }
}
