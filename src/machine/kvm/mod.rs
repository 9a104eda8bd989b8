//! The built-in VMM (work in progress: see issue 3).

pub mod boot;
pub mod bus;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod mptable;

/// Errors of the built-in VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {}
