//! The merged trees as one EROFS tree: a root holding `base` (the merged
//! layers, file data on the devices) and `copy` (the copy-to-root tree,
//! data embedded).

use runasroot_guest::contract::{LOWER_BASE, LOWER_COPY};

use crate::erofs::{self, Data, InodeId, Kind};
use crate::layers::tree::{Content, MDir, MNode, Merged, Meta};

/// Builds the image's tree. `placement[source]` is where layer `source`'s
/// tar lies: (device index, offset of its first byte on the device).
pub fn build(base: &Merged, placement: &[(usize, u64)], copy: Option<&Merged>) -> erofs::Tree {
    let mut b = Builder { inodes: Vec::new() };
    let base_root = b.dir(base, base.root(), &|source, offset| {
        let (device, start) = placement[source as usize];
        Data::Device { device, offset: start + offset }
    });
    let mut top = vec![(LOWER_BASE.as_bytes().to_vec(), base_root)];
    if let Some(copy) = copy {
        let copy_root = b.dir(copy, copy.root(), &|source, offset| Data::Embedded { source, offset });
        top.push((LOWER_COPY.as_bytes().to_vec(), copy_root));
    }
    let root = b.push(Kind::Dir(top), root_meta());
    erofs::Tree { inodes: b.inodes, root }
}

/// The image's own root: never seen by the script or exported.
fn root_meta() -> erofs::Meta {
    erofs::Meta { mode: 0o755, uid: 0, gid: 0, mtime: 0, mtime_nsec: 0, xattrs: Vec::new() }
}

fn meta(m: &Meta) -> erofs::Meta {
    erofs::Meta { mode: m.mode, uid: m.uid, gid: m.gid, mtime: m.mtime, mtime_nsec: m.mtime_nsec, xattrs: m.xattrs.clone() }
}

struct Builder {
    inodes: Vec<erofs::Inode>,
}

impl Builder {
    fn push(&mut self, kind: Kind, meta: erofs::Meta) -> InodeId {
        self.inodes.push(erofs::Inode { kind, meta });
        self.inodes.len() - 1
    }

    /// One merged tree. Names sharing a merged inode (hard links) share
    /// one EROFS inode; a link the merge materialised from a lower layer
    /// is an inode of its own over the same bytes.
    fn dir(&mut self, tree: &Merged, root: &MDir, data: &dyn Fn(u32, u64) -> Data) -> InodeId {
        let mut ids: Vec<Option<InodeId>> = vec![None; tree.inode_count()];
        self.dir_at(tree, root, data, &mut ids)
    }

    fn dir_at(&mut self, tree: &Merged, dir: &MDir, data: &dyn Fn(u32, u64) -> Data, ids: &mut [Option<InodeId>]) -> InodeId {
        let mut children = Vec::new();
        for (name, node) in dir.children() {
            let id = match node {
                MNode::Dir(d) => self.dir_at(tree, d, data, ids),
                MNode::Leaf(n) => match ids[*n] {
                    Some(id) => id,
                    None => {
                        let inode = tree.inode(*n);
                        let kind = match &inode.content {
                            Content::File { source, offset, size } => Kind::File { size: *size, data: data(*source, *offset) },
                            Content::Symlink(t) => Kind::Symlink(t.clone()),
                            Content::Char { major, minor } => Kind::Char { major: *major, minor: *minor },
                            Content::Block { major, minor } => Kind::Block { major: *major, minor: *minor },
                            Content::Fifo => Kind::Fifo,
                        };
                        let id = self.push(kind, meta(&inode.meta));
                        ids[*n] = Some(id);
                        id
                    }
                },
            };
            children.push((name.to_vec(), id));
        }
        self.push(Kind::Dir(children), meta(dir.meta()))
    }
}
