//! `--copy-closure FILE`: the Nix store paths a `--copy-to-root` tree
//! points into, so that its symlinks into /nix/store resolve in the image.
//!
//! nixpkgs' buildImage adds to the layer every store path that the layer's
//! files refer to (`writeClosure [ layer ]`, the layer itself excluded):
//! a `buildEnv` is a tree of symlinks into the store, useless without
//! them. Nix hands a builder that set as a file when the derivation asks
//! with `exportReferencesGraph = [ "NAME" path ]`: per path, a record of
//! the path, its deriver (empty here), the number of references and the
//! references, one per line (Nix's `makeValidityRegistration`).
//!
//! What is copied is the union of the *references* of every record: the
//! closure of what the roots refer to, without a root nothing refers to
//! (its contents go to / through `--copy-to-root` instead).

use std::collections::BTreeSet;
use std::io;
use std::path::{Component, Path, PathBuf};

/// Largest closure file read (a NixOS system closure is ~1 MiB).
const MAX_CLOSURE_FILE: u64 = 64 << 20;

/// Errors reading a `--copy-closure` file.
#[derive(Debug, thiserror::Error)]
pub enum ClosureError {
    #[error("cannot read --copy-closure {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--copy-closure {path} is larger than {MAX_CLOSURE_FILE} bytes; it is not a Nix closure file")]
    TooLarge { path: PathBuf },
    #[error("--copy-closure {path}, line {line}: {reason} (expected the file Nix writes for exportReferencesGraph)")]
    Parse { path: PathBuf, line: usize, reason: String },
    #[error("--copy-closure: {a} and {b} are in different store directories; give one store's paths")]
    MixedStores { a: PathBuf, b: PathBuf },
}

/// Reads every closure file and returns the store paths to copy, sorted
/// bytewise and each once.
pub fn read_all(files: &[PathBuf]) -> Result<Vec<PathBuf>, ClosureError> {
    let mut all = BTreeSet::new();
    for file in files {
        let read = |source| ClosureError::Read { path: file.clone(), source };
        if std::fs::metadata(file).map_err(read)?.len() > MAX_CLOSURE_FILE {
            return Err(ClosureError::TooLarge { path: file.clone() });
        }
        let text = std::fs::read_to_string(file).map_err(read)?;
        let refs = referenced_paths(&text)
            .map_err(|(line, reason)| ClosureError::Parse { path: file.clone(), line, reason })?;
        all.extend(refs);
    }
    let paths: Vec<PathBuf> = all.into_iter().collect();
    if let Some(first) = paths.first() {
        if let Some(other) = paths.iter().find(|p| p.parent() != first.parent()) {
            return Err(ClosureError::MixedStores { a: first.clone(), b: other.clone() });
        }
    }
    Ok(paths)
}

/// Parses one registration file into the union of its records'
/// references. Errors carry the 1-based line number.
pub fn referenced_paths(text: &str) -> Result<BTreeSet<PathBuf>, (usize, String)> {
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l)).peekable();
    let mut refs = BTreeSet::new();
    while let Some((n, path)) = lines.next() {
        if path.is_empty() && lines.peek().is_none() {
            break;
        }
        store_path(path).map_err(|r| (n, r))?;
        let Some((_, _deriver)) = lines.next() else {
            return Err((n, format!("the record of {path} ends after its path")));
        };
        let (n, count) = lines.next().ok_or((n, format!("the record of {path} has no reference count")))?;
        let count: usize = count.parse().map_err(|_| (n, format!("{count:?} is not a reference count")))?;
        for _ in 0..count {
            let (n, r) = lines.next().ok_or((n, format!("the record of {path} lists fewer than {count} references")))?;
            refs.insert(store_path(r).map_err(|reason| (n, reason))?);
        }
    }
    Ok(refs)
}

/// A store path: absolute, normal components only, at least two deep
/// (`/nix/store/HASH-name`).
fn store_path(s: &str) -> Result<PathBuf, String> {
    let p = Path::new(s);
    let normal = p.components().skip(1).all(|c| matches!(c, Component::Normal(_)));
    if !p.is_absolute() || !normal || p.components().count() < 3 || s.ends_with('/') {
        return Err(format!("{s:?} is not a store path"));
    }
    Ok(p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As Nix 2.8 writes it for `exportReferencesGraph = [ "c" imageRoot ]`.
    const REGISTRATION: &str = "\
/nix/store/aaaa-image-root

1
/nix/store/bbbb-busybox
/nix/store/bbbb-busybox

1
/nix/store/bbbb-busybox
";

    #[test]
    fn copies_what_the_roots_refer_to() {
        let got: Vec<_> = referenced_paths(REGISTRATION).unwrap().into_iter().collect();
        assert_eq!(got, [PathBuf::from("/nix/store/bbbb-busybox")]);
        // A root that refers to itself (an rpath) is copied too.
        let selfref = "/nix/store/cccc-redis\n\n2\n/nix/store/cccc-redis\n/nix/store/dddd-glibc\n/nix/store/dddd-glibc\n\n0\n";
        let got: Vec<_> = referenced_paths(selfref).unwrap().into_iter().collect();
        assert_eq!(got, [PathBuf::from("/nix/store/cccc-redis"), PathBuf::from("/nix/store/dddd-glibc")]);
        assert!(referenced_paths("").unwrap().is_empty());
    }

    #[test]
    fn rejects_what_is_not_a_registration() {
        let cases = [
            ("relative/path\n\n0\n", 1, "is not a store path"),
            ("/nix/store/a\n\nmany\n", 3, "\"many\" is not a reference count"),
            ("/nix/store/a\n\n2\n/nix/store/b\n", 3, "fewer than 2 references"),
            ("/nix/store/a\n\n1\n/nix/store/../etc\n", 4, "is not a store path"),
            ("/nix/store/a\n", 1, "ends after its path"),
            ("{\"closure\": []}\n", 1, "is not a store path"),
        ];
        for (text, line, want) in cases {
            let (n, reason) = referenced_paths(text).unwrap_err();
            assert_eq!(n, line, "{text:?}: {reason}");
            assert!(reason.contains(want), "{text:?}: {reason}");
        }
    }

    #[test]
    fn reads_files_and_merges_them() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("closure-0");
        let b = dir.path().join("closure-1");
        std::fs::write(&a, REGISTRATION).unwrap();
        std::fs::write(&b, "/nix/store/eeee-x\n\n1\n/nix/store/ffff-y\n/nix/store/ffff-y\n\n0\n").unwrap();
        assert_eq!(
            read_all(&[b.clone(), a.clone()]).unwrap(),
            [PathBuf::from("/nix/store/bbbb-busybox"), PathBuf::from("/nix/store/ffff-y")]
        );
        std::fs::write(&b, "/gnu/store/eeee-x\n\n1\n/gnu/store/ffff-y\n").unwrap();
        assert!(matches!(read_all(&[a.clone(), b.clone()]), Err(ClosureError::MixedStores { .. })));
        let e = read_all(&[dir.path().join("nope")]).unwrap_err().to_string();
        assert!(e.starts_with("cannot read --copy-closure "), "{e}");
    }
}
