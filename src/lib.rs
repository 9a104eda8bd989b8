//! runasroot: run a root script over a container image inside a microVM
//! and hand back the new layer (or the flattened filesystem).
//!
//! The pipeline, in order:
//! 1. [`image`]: read the base (docker-archive or OCI), select, verify.
//! 2. [`job`]: lay out the disks: the layer bytes by byte range, the job
//!    (script, copy-to-root, env, options), a sparse output disk, swap.
//! 3. [`machine`]: boot our kernel and guest-init through the built-in
//!    VMM or QEMU microvm; the guest unpacks, runs the script, packs.
//! 4. [`run`]: read the result, verify it, assemble the new image with
//!    [`image`] and write it atomically through [`output`].
//!
//! [`export`] flattens an image on the host with no VM at all.
//! [`erofs`] writes a merged base as an EROFS image over the layers' bytes.

pub mod assets;
pub mod cli;
pub mod erofs;
pub mod export;
pub mod image;
pub mod interrupt;
pub mod job;
pub mod machine;
pub mod output;
pub mod run;
