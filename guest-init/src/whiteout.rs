//! OCI whiteouts (image-spec `layer.md`) and their overlayfs counterparts.
//!
//! In a layer tar, `DIR/.wh.NAME` deletes `DIR/NAME` from the layers below
//! and `DIR/.wh..wh..opq` hides all lower contents of `DIR`. In an overlay
//! lowerdir or upperdir, the same facts are a char device 0:0 named `NAME`
//! and the xattr `trusted.overlay.opaque="y"` on `DIR`.

/// Prefix of a whiteout name in a layer tar.
pub const PREFIX: &[u8] = b".wh.";
/// The opaque marker's file name in a layer tar.
pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// The overlayfs xattr that marks a directory opaque.
pub const OVERLAY_OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// The only value of [`OVERLAY_OPAQUE_XATTR`] that means "opaque"
/// (`x` means "has whiteouts" to overlayfs, nothing to OCI).
pub const OVERLAY_OPAQUE_VALUE: &[u8] = b"y";
/// Newer overlayfs may mark a zero-size regular file as a whiteout.
pub const OVERLAY_WHITEOUT_XATTR: &str = "trusted.overlay.whiteout";
/// xattrs under this prefix steer overlayfs (redirect, metacopy, opaque,
/// origin, …): never taken from an input layer, never written to an output.
pub const OVERLAY_PRIVATE_PREFIX: &[u8] = b"trusted.overlay.";

/// What a file name in a layer tar means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name<'a> {
    /// An ordinary entry.
    Plain(&'a [u8]),
    /// `.wh.NAME`: delete `NAME` from lower layers.
    Whiteout(&'a [u8]),
    /// `.wh..wh..opq`: the parent directory is opaque.
    Opaque,
}

/// Errors in whiteout names.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WhiteoutError {
    #[error("invalid whiteout name {0:?} (a bare \".wh.\" or one naming \".\"/\"..\")")]
    Invalid(String),
}

/// Classifies the last component of a path inside a layer tar.
pub fn classify(file_name: &[u8]) -> Result<Name<'_>, WhiteoutError> {
    if file_name == OPAQUE_MARKER {
        return Ok(Name::Opaque);
    }
    match file_name.strip_prefix(PREFIX) {
        None => Ok(Name::Plain(file_name)),
        Some(target) if target.is_empty() || target == b"." || target == b".." || target.contains(&b'/') => {
            Err(WhiteoutError::Invalid(String::from_utf8_lossy(file_name).into_owned()))
        }
        Some(target) => Ok(Name::Whiteout(target)),
    }
}

/// The layer-tar file name that whites out `name`.
pub fn whiteout_name(name: &[u8]) -> Vec<u8> {
    let mut out = PREFIX.to_vec();
    out.extend_from_slice(name);
    out
}

/// Whether an xattr from an input layer or an upper dir must be dropped.
pub fn is_overlay_private(xattr_name: &[u8]) -> bool {
    xattr_name.starts_with(OVERLAY_PRIVATE_PREFIX)
}

/// Whether an upperdir inode is an overlay whiteout: a char device 0:0.
/// (All whiteouts may share one inode with nlink > 1: never a hardlink.)
pub fn is_whiteout_device(is_char_device: bool, rdev_major: u64, rdev_minor: u64) -> bool {
    is_char_device && rdev_major == 0 && rdev_minor == 0
}

/// Whether an overlay opaque xattr value means "opaque".
pub fn is_opaque_value(value: &[u8]) -> bool {
    value == OVERLAY_OPAQUE_VALUE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_names() {
        let table: &[(&[u8], Result<Name, ()>)] = &[
            (b"etc", Ok(Name::Plain(b"etc"))),
            (b".wh.passwd", Ok(Name::Whiteout(b"passwd"))),
            (b".wh..wh..opq", Ok(Name::Opaque)),
            (b".wh..hidden", Ok(Name::Whiteout(b".hidden"))),
            (b".wh.", Err(())),
            (b".wh..", Err(())),
            (b".wh...", Err(())),
            (b".whx", Ok(Name::Plain(b".whx"))),
        ];
        for (input, want) in table {
            let got = classify(input).map_err(|_| ());
            assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn whiteout_names_round_trip() {
        assert_eq!(whiteout_name(b"x"), b".wh.x");
        assert_eq!(classify(&whiteout_name(b"x")).unwrap(), Name::Whiteout(b"x"));
    }

    #[test]
    fn only_y_is_opaque_and_only_overlay_xattrs_are_private() {
        assert!(is_opaque_value(b"y"));
        assert!(!is_opaque_value(b"x"));
        assert!(!is_opaque_value(b"y\0"));
        assert!(is_overlay_private(b"trusted.overlay.redirect"));
        assert!(!is_overlay_private(b"security.capability"));
        assert!(!is_overlay_private(b"user.overlay.opaque"));
        assert!(is_whiteout_device(true, 0, 0));
        assert!(!is_whiteout_device(true, 1, 3));
        assert!(!is_whiteout_device(false, 0, 0));
    }
}
