//! Arbitrary trees through the EROFS writer: the writer either refuses a
//! tree (every check runs before the first byte) or writes an image that
//! decodes, on separate devices and as the guest's flat disk, to exactly
//! what the tree says (`erofs::check::round_trip`, the same oracle as the
//! writer's unit tests).
//!
//! Input: devices and embedded sources (their bytes), then inodes added
//! one by one under a directory made so far, with names, modes, ids,
//! times, xattrs and data places drawn from the input; now and then a
//! hard link, a link to any inode (cycles, directories named twice), an
//! out-of-range child or root, so the refusals are fuzzed too.

use runasroot::erofs::{self, check, Data, Device, Inode, Kind, Meta, Tree};

use super::Input;

const NAMES: [&[u8]; 8] = [b"a", b"b", b"etc", b".", b"..", b"", b"a/b", b"x\0y"];
const PREFIXES: [&[u8]; 7] =
    [b"user.", b"trusted.", b"security.", b"system.posix_acl_access", b"system.posix_acl_default", b"system.", b"other."];

fn name(input: &mut Input) -> Vec<u8> {
    match input.below(12) as usize {
        i @ 0..=7 if input.below(4) == 0 => NAMES[i].to_vec(),
        8 => input.string(300),
        _ => {
            let n = 1 + input.below(12) as usize;
            (0..n).map(|_| b"abc.-_\x01\xff"[input.below(8) as usize]).collect()
        }
    }
}

fn meta(input: &mut Input) -> Meta {
    let odd = input.below(16) == 0;
    let mut m = Meta {
        mode: if odd { input.u32() } else { u32::from(input.u16()) & 0o7777 },
        uid: input.u32(),
        gid: input.u32(),
        mtime: input.u64(),
        mtime_nsec: if odd { input.u32() } else { input.below(1_000_000_000) as u32 },
        xattrs: Vec::new(),
    };
    for _ in 0..input.below(4) {
        let mut n = PREFIXES[input.below(7) as usize].to_vec();
        if !n.starts_with(b"system.posix") || input.below(4) == 0 {
            n.extend(input.string(12));
        }
        let len = if input.below(32) == 0 { input.below(70_000) as usize } else { input.below(300) as usize };
        let v: Vec<u8> = (0..len).map(|i| i as u8).collect();
        m.xattrs.push((n, v));
    }
    m
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mut devices: Vec<Vec<u8>> = (0..input.below(4)).map(|_| input.string(5000)).collect();
    let sources: Vec<Vec<u8>> = (0..input.below(3)).map(|_| input.string(3000)).collect();
    // A device's bytes are whatever its block count says (mostly its
    // bytes' own, padded); now and then a count past what EROFS
    // addresses, which the writer must refuse.
    let mut huge = false;
    let slots: Vec<Device> = devices
        .iter_mut()
        .map(|d| {
            let tag = if input.below(16) == 0 { String::from_utf8_lossy(&input.string(70)).into_owned() } else { "dev".into() };
            let blocks = match input.below(32) {
                0 => {
                    huge = true;
                    (1 << 32) - input.below(4)
                }
                1 => input.below(12),
                _ => d.len().div_ceil(512) as u64,
            };
            if !huge {
                d.resize(blocks as usize * 512, 0);
            }
            Device { blocks, tag }
        })
        .collect();
    let mut tree = Tree { inodes: vec![Inode { kind: Kind::Dir(Vec::new()), meta: meta(&mut input) }], root: 0 };
    let mut dirs = vec![0usize];
    let count = input.below(80);
    while (tree.inodes.len() as u64) < count && !input.is_empty() {
        let at = dirs[input.below(dirs.len() as u64) as usize];
        let n = name(&mut input);
        let kind = match input.below(24) {
            0..=4 => Kind::Dir(Vec::new()),
            5..=11 => {
                let device = if devices.is_empty() || input.below(32) == 0 { input.below(5) as usize } else { input.below(devices.len() as u64) as usize };
                let len = devices.get(device).map_or(0, |d| d.len() as u64);
                let offset = if input.below(32) == 0 { input.u64() } else { input.below(len / 512 + 1) * 512 };
                let size = if input.below(32) == 0 { input.u64() } else { input.below(len.saturating_sub(offset) + 1) };
                Kind::File { size, data: Data::Device { device, offset } }
            }
            12..=13 => {
                let source = input.below(sources.len() as u64 + 1) as u32;
                let len = sources.get(source as usize).map_or(0, |s| s.len() as u64);
                let offset = input.below(len + 1);
                let size = input.below(len - offset + 1);
                Kind::File { size, data: Data::Embedded { source, offset } }
            }
            14..=16 => Kind::Symlink(if input.below(16) == 0 { input.string(5000) } else { input.string(700) }),
            17 => Kind::Char { major: input.below(5000) as u32, minor: input.u32() >> input.below(32) },
            18 => Kind::Block { major: input.below(5000) as u32, minor: input.u32() >> input.below(32) },
            19 => Kind::Fifo,
            20..=21 => {
                // A second name for an existing inode: a hard link, or
                // (a directory) a refusal.
                let target = input.below(tree.inodes.len() as u64) as usize;
                if let Kind::Dir(children) = &mut tree.inodes[at].kind {
                    children.push((n, target));
                }
                continue;
            }
            22 => {
                // A child past the end of the inodes.
                let past = tree.inodes.len() + input.below(3) as usize;
                if let Kind::Dir(children) = &mut tree.inodes[at].kind {
                    children.push((n, past));
                }
                continue;
            }
            _ => Kind::Fifo,
        };
        let is_dir = matches!(kind, Kind::Dir(_));
        tree.inodes.push(Inode { kind, meta: meta(&mut input) });
        let id = tree.inodes.len() - 1;
        if input.below(64) != 0 {
            if let Kind::Dir(children) = &mut tree.inodes[at].kind {
                children.push((n, id));
            }
        }
        if is_dir {
            dirs.push(id);
        }
    }
    if input.below(32) == 0 {
        tree.root = input.below(tree.inodes.len() as u64 + 2) as usize;
    }
    let mut image = Vec::new();
    let Ok(written) = erofs::write(&tree, &slots, &mut check::Sources(sources.clone()), &mut image) else { return };
    if huge {
        // Written, but its devices are too large to lay out here.
        return;
    }
    if let Err(e) = check::round_trip(&tree, &devices, &sources, &image, &written) {
        panic!("the writer accepted a tree it wrote wrong: {e}");
    }
}
