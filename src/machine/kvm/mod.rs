//! The built-in VMM (work in progress: see issue 3).

/// Errors of the built-in VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {}
