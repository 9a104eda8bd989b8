//! Which files the lower image reads file data from (its extra devices),
//! and where each layer's tar lies on them. Every distinct file holding a
//! layer's uncompressed tar (the input archive, an OCI blob, a spool
//! cache entry) is one device, whole: nothing is copied.

use std::path::PathBuf;

use crate::erofs::BLOCK_SIZE;

/// A layer's uncompressed tar: `len` bytes at `base` of `path` (whose
/// size is `file_len`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceRange {
    pub path: PathBuf,
    pub file_len: u64,
    pub base: u64,
    pub len: u64,
}

/// An extra device of the image: a whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub path: PathBuf,
    pub len: u64,
}

impl Device {
    /// Its size in EROFS blocks: the flat disk pads each file with zeros
    /// to a whole block.
    pub fn blocks(&self) -> u64 {
        self.len.div_ceil(BLOCK_SIZE)
    }

    pub fn padded_len(&self) -> u64 {
        self.blocks() * BLOCK_SIZE
    }
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The devices, in the order their first layer comes.
    pub devices: Vec<Device>,
    /// Per source: (device index, offset of its tar on that device).
    pub placement: Vec<(usize, u64)>,
}

/// Decides the devices for `sources` (one per layer, bottom first).
pub fn plan(sources: &[SourceRange]) -> Plan {
    let mut devices: Vec<Device> = Vec::new();
    let mut placement = Vec::with_capacity(sources.len());
    for s in sources {
        let d = match devices.iter().position(|d| d.path == s.path) {
            Some(d) => d,
            None => {
                devices.push(Device { path: s.path.clone(), len: s.file_len });
                devices.len() - 1
            }
        };
        placement.push((d, s.base));
    }
    Plan { devices, placement }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(path: &str, file_len: u64, base: u64, len: u64) -> SourceRange {
        SourceRange { path: PathBuf::from(path), file_len, base, len }
    }

    #[test]
    fn one_device_per_file_in_layer_order() {
        // A docker-archive whose two plain layers are in the archive and
        // whose gzip layer was spooled; a layer listed twice.
        let sources = [
            src("/a.tar", 10240, 1536, 2048),
            src("/spool/x", 4000, 0, 4000),
            src("/a.tar", 10240, 4608, 1024),
            src("/a.tar", 10240, 1536, 2048),
        ];
        assert_eq!(
            plan(&sources),
            Plan {
                devices: vec![Device { path: "/a.tar".into(), len: 10240 }, Device { path: "/spool/x".into(), len: 4000 }],
                placement: vec![(0, 1536), (1, 0), (0, 4608), (0, 1536)],
            }
        );
        let d = Device { path: "/x".into(), len: 1000 };
        assert_eq!((d.blocks(), d.padded_len()), (2, 1024));
    }
}
