//! runasroot: run a root script over a container image inside a microVM
//! and hand back the new layer (or the flattened filesystem).
//!
//! The pipeline, in order:
//! 1. [`image`]: read the base (docker-archive or OCI), select, verify
//!    the blob digests.
//! 2. [`layers`]: read every layer's tar headers once (diff_ids checked,
//!    compressed layers spooled to the [`cache`]) and merge them by the
//!    overlay rules: the one place OCI layer semantics live.
//! 3. [`lower`]: write the merged base as an [`erofs`] image whose file
//!    data point at the layers' own bytes; [`job`]: the script and
//!    options, a sparse output disk, swap.
//! 4. [`machine`]: boot our kernel and guest-init through the built-in
//!    VMM or QEMU microvm; the guest mounts the lower under an overlay,
//!    runs the script, packs the new layer (it unpacks nothing).
//! 5. [`run`]: read the result and check it whole ([`guest_output`]: the
//!    guest is not trusted), assemble the new image with [`image`] and
//!    write it atomically through [`output`].
//!
//! Every error reaches the user through [`report`], which escapes and
//! bounds what input put in it.
//!
//! [`export`] writes the same merge as one tar on the host, no VM at all.
//! Every error reaches the user through [`report`], which escapes and
//! bounds what input put in it.
//!
//! [`closure`] reads the Nix store paths `--copy-closure` adds (the Nix
//! library in `nix/default.nix` drives the CLI). [`spool`] writes what is
//! decompressed without filling the disk.

pub mod assets;
pub mod cache;
pub mod cli;
pub mod closure;
pub mod erofs;
pub mod export;
pub mod guest_output;
pub mod image;
pub mod interrupt;
pub mod job;
pub mod layers;
pub mod lower;
pub mod machine;
pub mod output;
pub mod report;
pub mod run;
pub mod spool;
