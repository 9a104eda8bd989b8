//! Writing results atomically: nothing half-written is ever left at an
//! output path. A file is written to a temporary sibling and renamed into
//! place; `-` streams to stdout instead.

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// Where a result goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Path(PathBuf),
    Stdout,
}

impl Target {
    /// `-` means stdout.
    pub fn parse(s: &str) -> Target {
        if s == "-" {
            Target::Stdout
        } else {
            Target::Path(PathBuf::from(s))
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Target::Path(p) => p.display().to_string(),
            Target::Stdout => "standard output".to_string(),
        }
    }
}

/// Errors writing an output.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot create a temporary file beside {path} (is its directory writable?)")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path} failed")]
    Write {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot move the finished output into place at {path}")]
    Persist {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A file being written; [`AtomicFile::commit`] renames it into place,
/// dropping it without commit removes it.
pub struct AtomicFile {
    target: PathBuf,
    temp: tempfile::NamedTempFile,
}

impl AtomicFile {
    /// Starts writing a file that will appear at `target` on commit.
    pub fn create(target: &Path) -> Result<AtomicFile, OutputError> {
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let temp = crate::interrupt::create_temp(
            || tempfile::Builder::new().prefix(&format!(".{name}.runasroot-")).tempfile_in(&dir),
            |t| t.path(),
        )
        .map_err(|source| OutputError::Create { path: target.to_path_buf(), source })?;
        Ok(AtomicFile { target: target.to_path_buf(), temp })
    }

    pub fn file(&mut self) -> &mut fs::File {
        self.temp.as_file_mut()
    }

    /// Flushes to disk and renames into place with mode 0644 & !umask
    /// (tempfile creates 0600, which a user would not expect of an output).
    /// Refused once the run is stopped, unless an output is already in
    /// place ([`crate::interrupt::begin_commit`]).
    pub fn commit(self) -> Result<(), OutputError> {
        let path = self.target.clone();
        let werr = |source| OutputError::Write { path: path.display().to_string(), source };
        self.temp.as_file().sync_all().map_err(werr)?;
        let mode = 0o666 & !current_umask();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(self.temp.path(), fs::Permissions::from_mode(mode)).map_err(werr)?;
        let perr = |source| OutputError::Persist { path: self.target.clone(), source };
        crate::interrupt::begin_commit().map_err(perr)?;
        let temp_path = self.temp.path().to_path_buf();
        // A failed rename (the target became a directory meanwhile, say)
        // drops the temporary file: nothing is left beside the target.
        let persisted = self.temp.persist(&self.target).map_err(|e| perr(e.error));
        crate::interrupt::unregister_temp(&temp_path);
        persisted.map(drop)
    }
}

fn current_umask() -> u32 {
    // SAFETY: umask(2) cannot fail; it is set back at once (the process is
    // single-threaded here or tolerates a momentary 022).
    let old = unsafe { libc::umask(0o022) };
    // SAFETY: as above, restoring the value just read.
    unsafe { libc::umask(old) };
    old as u32
}

/// Writes a result to `target` atomically (or to stdout) with `write`.
pub fn write_atomically<F>(target: &Target, write: F) -> Result<(), OutputError>
where
    F: FnOnce(&mut dyn Write) -> io::Result<()>,
{
    match target {
        Target::Stdout => {
            let stdout = io::stdout();
            let mut w = BufWriter::with_capacity(1 << 20, stdout.lock());
            write(&mut w)
                .and_then(|_| w.flush())
                .map_err(|source| OutputError::Write { path: "standard output".into(), source })
        }
        Target::Path(path) => {
            let mut f = AtomicFile::create(path)?;
            {
                let mut w = BufWriter::with_capacity(1 << 20, f.file());
                write(&mut w)
                    .and_then(|_| w.flush())
                    .map_err(|source| OutputError::Write { path: path.display().to_string(), source })?;
            }
            f.commit()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_leaves_existing_file_untouched_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.tar");
        fs::write(&path, b"old").unwrap();
        let err = write_atomically(&Target::Path(path.clone()), |w| {
            w.write_all(b"partial")?;
            Err(io::Error::other("boom"))
        });
        assert!(err.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn commit_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.tar");
        write_atomically(&Target::Path(path.clone()), |w| w.write_all(b"new")).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(Target::parse("-"), Target::Stdout);
    }
}
