//! `--copy-to-root` items (directories, or plain/gzip/zstd tars) merged
//! into one tree in the order given, by the same rules as layers (a later
//! item's file replaces an earlier one's; directories merge), minus
//! whiteouts: a `.wh.` name is refused, since the new layer could not
//! carry it as a file. The guest copies the tree into the merged view.
//!
//! A directory is taken as nixpkgs' copyToRoot takes a store path: its
//! contents (not itself) at `/`, owned by root, mtimes at the epoch,
//! modes as they are; sockets and device nodes in it are not content and
//! are skipped; with `--copy-dirlinks` a symlink to a directory is copied
//! as that directory (rsync -k: a `buildEnv` is all such links). A tar
//! keeps what its headers say. `--copy-closure` store paths come first,
//! each at its own absolute path below `nix/store/` (0755, root).

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

/// What `--copy-to-root`, `--copy-closure` and `--copy-dirlinks` ask for.
#[derive(Debug, Clone, Copy)]
pub struct CopySpec<'a> {
    pub items: &'a [PathBuf],
    /// Store paths (absolute), sorted.
    pub store_paths: &'a [PathBuf],
    pub copy_dirlinks: bool,
}

impl Copy {
    pub fn read(spec: CopySpec<'_>, epoch: u64, temp_dir: &Path) -> Result<Copy, LowerError> {
        let mut copy = Copy { merged: None, sources: Vec::new(), _spools: Vec::new() };
        if !spec.store_paths.is_empty() {
            let label = "--copy-closure";
            let mut tree = LayerTree::new();
            for path in spec.store_paths {
                copy.store_path(path, epoch, &mut tree, label)?;
            }
            copy.merged.get_or_insert_with(Merged::new).apply(tree, label)?;
        }
        for item in spec.items {
            let meta = fs::metadata(item).map_err(|source| LowerError::CopyToRoot { path: item.clone(), source })?;
            let label = format!("--copy-to-root {}", item.display());
            let tree = if meta.is_dir() {
                let mut tree = LayerTree::new();
                let walk = Walk { item, epoch, dirlinks: spec.copy_dirlinks, label: &label };
                copy.walk_dir(&walk, item, &mut Vec::new(), &mut vec![(meta.dev(), meta.ino())], &mut tree)?;
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

    /// A store path at its own absolute path, with its parents made
    /// (0755, root, epoch); its contents as they are (links kept).
    fn store_path(&mut self, path: &Path, epoch: u64, tree: &mut LayerTree, label: &str) -> Result<(), LowerError> {
        let rerr = |source| LowerError::CopyToRoot { path: path.to_path_buf(), source };
        let rel = path.strip_prefix("/").map_err(|_| rerr(io::Error::other("a store path must be absolute")))?;
        let mut parent = Vec::new();
        for c in rel.parent().into_iter().flat_map(Path::components) {
            if !parent.is_empty() {
                parent.push(b'/');
            }
            parent.extend_from_slice(c.as_os_str().as_bytes());
            let meta = Meta { mode: 0o755, uid: 0, gid: 0, mtime: epoch, mtime_nsec: 0, xattrs: Vec::new() };
            let normal = normalize(&parent).map_err(|reason| LowerError::CopyEntry { path: path.to_path_buf(), entry: lossy(&parent), reason })?;
            tree.insert(&normal, EntryKind::Dir(meta), label)?;
        }
        let mut rel = rel.as_os_str().as_bytes().to_vec();
        let m = fs::symlink_metadata(path).map_err(rerr)?;
        let walk = Walk { item: path, epoch, dirlinks: false, label };
        if let Some(kind) = self.entry_kind(&walk, path, &m)? {
            let normal = normalize(&rel).map_err(|reason| LowerError::CopyEntry { path: path.to_path_buf(), entry: lossy(&rel), reason })?;
            tree.insert(&normal, kind, label)?;
            if m.is_dir() {
                self.walk_dir(&walk, path, &mut rel, &mut vec![(m.dev(), m.ino())], tree)?;
            }
        }
        Ok(())
    }

    /// What a host file is in the tree (None: not content).
    fn entry_kind(&mut self, walk: &Walk<'_>, path: &Path, m: &fs::Metadata) -> Result<Option<EntryKind>, LowerError> {
        let rerr = |source| LowerError::CopyToRoot { path: path.to_path_buf(), source };
        let ft = m.file_type();
        let meta = Meta { mode: m.mode() & MODE_BITS, uid: 0, gid: 0, mtime: walk.epoch, mtime_nsec: 0, xattrs: Vec::new() };
        Ok(if ft.is_dir() {
            Some(EntryKind::Dir(meta))
        } else if ft.is_file() {
            self.sources.push(path.to_path_buf());
            let content = Content::File { source: (self.sources.len() - 1) as u32, offset: 0, size: m.len() };
            Some(EntryKind::Node(Inode { content, meta }))
        } else if ft.is_symlink() {
            let target = fs::read_link(path).map_err(rerr)?.as_os_str().as_bytes().to_vec();
            Some(EntryKind::Node(Inode { content: Content::Symlink(target), meta: Meta { mode: 0o777, ..meta } }))
        } else if ft.is_fifo() {
            Some(EntryKind::Node(Inode { content: Content::Fifo, meta }))
        } else {
            // Sockets and device nodes in a host directory are not content.
            None
        })
    }

    /// Adds `dir`'s contents below `rel`. `walking` holds the (device,
    /// inode) of every directory from the item down to `dir`: a followed
    /// symlink back into one of them is a loop.
    fn walk_dir(&mut self, walk: &Walk<'_>, dir: &Path, rel: &mut Vec<u8>, walking: &mut Vec<(u64, u64)>, tree: &mut LayerTree) -> Result<(), LowerError> {
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
                return Err(LowerError::CopyEntry { path: walk.item.to_path_buf(), entry: lossy(rel), reason: RESERVED_NAME });
            }
            let mut m = fs::symlink_metadata(&path).map_err(rerr)?;
            if walk.dirlinks && m.file_type().is_symlink() {
                // A dangling link or a link to a file stays a link.
                if let Some(target) = fs::metadata(&path).ok().filter(fs::Metadata::is_dir) {
                    if walking.contains(&(target.dev(), target.ino())) {
                        return Err(LowerError::CopyEntry { path: walk.item.to_path_buf(), entry: lossy(rel), reason: DIRLINK_LOOP });
                    }
                    m = target;
                }
            }
            if let Some(kind) = self.entry_kind(walk, &path, &m)? {
                let normal = normalize(rel).map_err(|reason| LowerError::CopyEntry { path: walk.item.to_path_buf(), entry: lossy(rel), reason })?;
                tree.insert(&normal, kind, walk.label)?;
                if m.is_dir() {
                    walking.push((m.dev(), m.ino()));
                    self.walk_dir(walk, &path, rel, walking, tree)?;
                    walking.pop();
                }
            }
            rel.truncate(base);
        }
        Ok(())
    }
}

/// How one `--copy-to-root` directory is walked.
struct Walk<'a> {
    item: &'a Path,
    epoch: u64,
    /// Follow symlinks to directories (`--copy-dirlinks`).
    dirlinks: bool,
    label: &'a str,
}

const DIRLINK_LOOP: &str = "a symlink to a directory that contains it (a loop, with --copy-dirlinks)";

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::tree::{MDir, MNode};
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// The merged copy tree: `path kind mode[ -> link]`, depth first.
    fn listing(copy: &Copy) -> Vec<String> {
        fn walk(m: &Merged, d: &MDir, prefix: &str, out: &mut Vec<String>) {
            for (name, node) in d.children() {
                let path = format!("{prefix}{}", String::from_utf8_lossy(name));
                match node {
                    MNode::Dir(sub) => {
                        out.push(format!("{path}/ dir {:o}", sub.meta().mode));
                        walk(m, sub, &format!("{path}/"), out);
                    }
                    MNode::Leaf(id) => {
                        let i = m.inode(*id);
                        let kind = match &i.content {
                            Content::File { .. } => "file".to_string(),
                            Content::Symlink(t) => format!("symlink -> {}", String::from_utf8_lossy(t)),
                            other => format!("{other:?}"),
                        };
                        out.push(format!("{path} {kind} {:o}", i.meta.mode));
                    }
                }
            }
        }
        let mut out = Vec::new();
        if let Some(m) = copy.merged() {
            walk(m, m.root(), "", &mut out);
        }
        out
    }

    fn read(items: &[PathBuf], store_paths: &[PathBuf], copy_dirlinks: bool) -> Result<Copy, LowerError> {
        let temp = tempfile::tempdir().unwrap();
        Copy::read(CopySpec { items, store_paths, copy_dirlinks }, 7, temp.path())
    }

    /// A buildEnv-like tree: `bin` links to a directory elsewhere, `lib`
    /// dangles, `sh` links to a file.
    fn env_tree(dir: &Path) -> PathBuf {
        let pkg = dir.join("store/pkg");
        fs::create_dir_all(pkg.join("bin")).unwrap();
        fs::write(pkg.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        fs::set_permissions(pkg.join("bin/tool"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::set_permissions(pkg.join("bin"), fs::Permissions::from_mode(0o555)).unwrap();
        let root = dir.join("root");
        fs::create_dir_all(&root).unwrap();
        symlink(pkg.join("bin"), root.join("bin")).unwrap();
        symlink("/nonexistent", root.join("lib")).unwrap();
        symlink(pkg.join("bin/tool"), root.join("sh")).unwrap();
        root
    }

    #[test]
    fn copy_dirlinks_takes_a_linked_directory_as_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = env_tree(dir.path());
        let pkg_bin = dir.path().join("store/pkg/bin");
        assert_eq!(
            listing(&read(std::slice::from_ref(&root), &[], true).unwrap()),
            vec![
                "bin/ dir 555".to_string(),
                "bin/tool file 555".into(),
                "lib symlink -> /nonexistent 777".into(),
                format!("sh symlink -> {}/tool 777", pkg_bin.display()),
            ]
        );
        let plain = listing(&read(&[root], &[], false).unwrap());
        assert_eq!(plain[0], format!("bin symlink -> {} 777", pkg_bin.display()));
    }

    #[test]
    fn copy_dirlinks_refuses_a_loop() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("a")).unwrap();
        symlink("..", root.join("a/up")).unwrap();
        let e = read(&[root], &[], true).unwrap_err().to_string();
        assert!(e.ends_with("\"a/up\": a symlink to a directory that contains it (a loop, with --copy-dirlinks)"), "{e}");
    }

    #[test]
    fn store_paths_go_to_their_own_paths_and_items_apply_after_them() {
        let dir = tempfile::tempdir().unwrap();
        env_tree(dir.path());
        let store = dir.path().join("store");
        fs::write(store.join("file.txt"), b"x").unwrap();
        symlink("pkg", store.join("link")).unwrap();
        let paths = [store.join("file.txt"), store.join("link"), store.join("pkg")];
        let rel = store.strip_prefix("/").unwrap().display().to_string();
        let mut want: Vec<String> = Vec::new();
        let mut parent = PathBuf::new();
        for c in Path::new(&rel).components() {
            parent.push(c);
            want.push(format!("{}/ dir 755", parent.display()));
        }
        want.extend([
            format!("{rel}/file.txt file 644"),
            format!("{rel}/link symlink -> pkg 777"),
            format!("{rel}/pkg/ dir 755"),
            format!("{rel}/pkg/bin/ dir 555"),
            format!("{rel}/pkg/bin/tool file 555"),
        ]);
        // The store paths' first component sorts wherever it sorts; this
        // listing is of a temp dir, so compare as sets of lines.
        let mut got = listing(&read(&[], &paths, false).unwrap());
        got.sort();
        want.sort();
        assert_eq!(got, want);
        let e = read(&[], &[store.join("missing")], false).unwrap_err().to_string();
        assert!(e.contains("store/missing"), "{e}");

        // An item's file replaces a store path's file; a whiteout name is refused.
        let over = dir.path().join("over");
        fs::create_dir_all(over.join(&rel)).unwrap();
        fs::write(over.join(&rel).join("file.txt"), b"yy").unwrap();
        let copy = read(std::slice::from_ref(&over), &paths, false).unwrap();
        assert!(listing(&copy).contains(&format!("{rel}/file.txt file 644")));
        assert_eq!(copy.sources.last().unwrap(), &over.join(&rel).join("file.txt"));
        fs::write(over.join(".wh.x"), b"").unwrap();
        let e = read(&[over], &[], false).unwrap_err().to_string();
        assert!(e.contains("reserved for whiteouts"), "{e}");
    }
}
