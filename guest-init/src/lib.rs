//! The contract between the runasroot host and its guest PID 1.
//!
//! Both sides link this library, so what they must agree on is written and
//! tested once:
//!
//! * [`contract`]: the disks the host hands the guest (named by virtio-blk
//!   serial), the job the host writes on the job disk, and the result the
//!   guest writes on the output disk.
//! * [`whiteout`]: OCI whiteout names and how they map to overlayfs.
//! * [`tarfmt`]: the deterministic tar rules every engine writes by (entry
//!   order, headers, PAX, xattr filtering), so the guest's packer, the
//!   guest's export and the host's streaming export write the same bytes.

pub mod contract;
pub mod tarfmt;
pub mod whiteout;
