//! `--copy-to-root` items (directories, or plain/gzip/zstd tars) merged
//! into one tree in the order given, by the same rules as layers (a later
//! item's file replaces an earlier one's; directories merge), minus
//! whiteouts: a `.wh.` name is refused, since the new layer could not
//! carry it as a file. The guest copies the tree into the merged view.
//!
//! A directory is taken as nixpkgs' copyToRoot takes a store path: its
//! contents (not itself) at `/`, owned by root, mtimes at the epoch,
//! modes as they are; sockets and device nodes in it are not content and
//! are skipped. A tar keeps what its headers say.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use runasroot_guest::tarfmt::MODE_BITS;
use runasroot_guest::whiteout;

use super::LowerError;
use crate::erofs::DataSource;
use crate::layers::read::{read_content_tar, ContentTar, RESERVED_NAME};
use crate::layers::tree::{normalize, Content, EntryKind, Inode, LayerTree, Meta};
use crate::layers::Merged;

/// The copy-to-root tree and where its files' bytes are.
#[derive(Debug)]
pub struct Copy {
    merged: Option<Merged>,
    /// Per data source id: the file and the offset its ids count from.
    sources: Vec<PathBuf>,
    /// Keeps decompressed tars alive until the image is written.
    _spools: Vec<tempfile::TempPath>,
}

impl Copy {
    pub fn read(items: &[PathBuf], epoch: u64, temp_dir: &Path) -> Result<Copy, LowerError> {
        let mut copy = Copy { merged: None, sources: Vec::new(), _spools: Vec::new() };
        for item in items {
            let meta = fs::metadata(item).map_err(|source| LowerError::CopyToRoot { path: item.clone(), source })?;
            let label = format!("--copy-to-root {}", item.display());
            let tree = if meta.is_dir() {
                let mut tree = LayerTree::new();
                copy.walk_dir(item, item, &mut Vec::new(), epoch, &mut tree, &label)?;
                tree
            } else {
                let ContentTar { tree, data, spool } = read_content_tar(item, copy.sources.len() as u32, &label, temp_dir)?;
                copy.sources.push(data);
                copy._spools.extend(spool);
                tree
            };
            copy.merged.get_or_insert_with(Merged::new).apply(tree, &label)?;
        }
        Ok(copy)
    }

    pub fn merged(&self) -> Option<&Merged> {
        self.merged.as_ref()
    }

    pub fn is_some(&self) -> bool {
        self.merged.is_some()
    }

    /// Reads embedded file data for the image writer.
    pub fn data_source(&self) -> Files<'_> {
        Files { paths: &self.sources, open: None }
    }

    fn walk_dir(&mut self, item: &Path, dir: &Path, rel: &mut Vec<u8>, epoch: u64, tree: &mut LayerTree, label: &str) -> Result<(), LowerError> {
        let rerr = |source| LowerError::CopyToRoot { path: dir.to_path_buf(), source };
        let mut names: Vec<_> = fs::read_dir(dir).map_err(rerr)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>().map_err(rerr)?;
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let rerr = |source| LowerError::CopyToRoot { path: path.clone(), source };
            let base = rel.len();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
            if name.as_bytes().starts_with(whiteout::PREFIX) {
                return Err(LowerError::CopyEntry { path: item.to_path_buf(), entry: lossy(rel), reason: RESERVED_NAME });
            }
            let m = fs::symlink_metadata(&path).map_err(rerr)?;
            let ft = m.file_type();
            let meta = Meta { mode: m.mode() & MODE_BITS, uid: 0, gid: 0, mtime: epoch, mtime_nsec: 0, xattrs: Vec::new() };
            let kind = if ft.is_dir() {
                Some(EntryKind::Dir(meta))
            } else if ft.is_file() {
                self.sources.push(path.clone());
                let content = Content::File { source: (self.sources.len() - 1) as u32, offset: 0, size: m.len() };
                Some(EntryKind::Node(Inode { content, meta }))
            } else if ft.is_symlink() {
                let target = fs::read_link(&path).map_err(rerr)?.as_os_str().as_bytes().to_vec();
                Some(EntryKind::Node(Inode { content: Content::Symlink(target), meta: Meta { mode: 0o777, ..meta } }))
            } else if ft.is_fifo() {
                Some(EntryKind::Node(Inode { content: Content::Fifo, meta }))
            } else {
                // Sockets and device nodes in a host directory are not content.
                None
            };
            if let Some(kind) = kind {
                let normal = normalize(rel).map_err(|reason| LowerError::CopyEntry { path: item.to_path_buf(), entry: lossy(rel), reason })?;
                tree.insert(&normal, kind, label)?;
                if ft.is_dir() {
                    self.walk_dir(item, &path, rel, epoch, tree, label)?;
                }
            }
            rel.truncate(base);
        }
        Ok(())
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The copy tree's files, opened one at a time as the writer asks.
pub struct Files<'a> {
    paths: &'a [PathBuf],
    open: Option<(u32, File)>,
}

impl DataSource for Files<'_> {
    fn copy_to(&mut self, source: u32, offset: u64, len: u64, out: &mut dyn Write) -> io::Result<()> {
        if self.open.as_ref().map(|(s, _)| *s) != Some(source) {
            let path = self.paths.get(source as usize).ok_or_else(|| io::Error::other("no such copy-to-root source"))?;
            self.open = Some((source, File::open(path)?));
        }
        let (_, file) = self.open.as_mut().expect("opened above");
        file.seek(SeekFrom::Start(offset))?;
        let n = io::copy(&mut file.take(len), out)?;
        if n != len {
            let path = self.paths[source as usize].display();
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("{path} shrank while it was copied")));
        }
        Ok(())
    }
}
