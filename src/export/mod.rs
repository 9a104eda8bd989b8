//! Host streaming export: flatten an image's layers into one rootfs tar
//! with no VM, no root and no extraction to a directory.
//!
//! The layers are read and merged once by [`crate::layers`] (the same
//! merge that feeds the guest's EROFS lower); this module walks the merged
//! tree depth first and writes it with the shared deterministic
//! [`tarfmt`](runasroot_guest::tarfmt) writer, reading each file's bytes
//! by offset from where its layer's uncompressed tar is (the image's own
//! file, or the spool).
//!
//! Memory grows with the number of entries, never with file sizes. The
//! result is byte for byte what the in-VM engine (tar of the merged
//! overlay view) writes for the same image.

mod write;

use std::io::{self, Write};

use crate::image::Layer;
use crate::layers::{self, IndexStats, LayerError, Spool};

/// How to export.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions<'a> {
    /// SOURCE_DATE_EPOCH: no mtime in the export is later than this.
    pub clamp_mtime: Option<u64>,
    /// Where compressed layers are decompressed to.
    pub spool: Spool<'a>,
}

/// What an export did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExportStats {
    pub index: IndexStats,
    /// Entries written (directories, files, links, devices).
    pub entries: u64,
    /// Of those, hard links to an earlier entry.
    pub hardlinks: u64,
    /// File content written.
    pub data_bytes: u64,
    /// The whole tar written.
    pub tar_bytes: u64,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Layers(#[from] LayerError),
    #[error("cannot read the content of {entry} from {layer}")]
    ReadData {
        layer: String,
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the export (at entry {entry})")]
    WriteOutput {
        entry: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot finish writing the export")]
    FinishOutput(#[source] io::Error),
}

/// Flattens `layers` (bottom first) into one tar on `out`. `out` should be
/// buffered: entries are written in header-sized and 8 KiB pieces.
///
/// An uncompressed layer whose `blob_digest` equals its `diff_id` is
/// trusted to hash to it (`image::open` computes `blob_digest` over the
/// stored bytes, which for such a layer are the tar); any other layer is
/// hashed here and a mismatch is [`LayerError::DiffIdMismatch`].
pub fn export(layers: &[Layer], opts: &ExportOptions<'_>, out: &mut dyn Write) -> Result<ExportStats, ExportError> {
    let indexed = layers::index(layers, opts.spool)?;
    let written = write::write_tar(&indexed.merged, &indexed.sources, opts.clamp_mtime, out)?;
    indexed.check_unchanged()?;
    Ok(ExportStats {
        index: indexed.stats,
        entries: written.entries,
        hardlinks: written.hardlinks,
        data_bytes: written.data_bytes,
        tar_bytes: written.tar_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{BlobRef, Compression, Digest};
    use sha2::{Digest as _, Sha256};
    use std::io::Read;
    use std::path::Path;

    /// One entry of a test layer tar.
    #[derive(Clone)]
    struct T {
        path: &'static str,
        ty: tar::EntryType,
        mode: u32,
        uid: u64,
        mtime: u64,
        data: Vec<u8>,
        link: &'static str,
        dev: (u32, u32),
        pax: Vec<(&'static str, Vec<u8>)>,
    }

    fn t(path: &'static str, ty: tar::EntryType) -> T {
        T { path, ty, mode: 0o644, uid: 0, mtime: 1000, data: vec![], link: "", dev: (0, 0), pax: vec![] }
    }
    fn dir(path: &'static str) -> T {
        T { mode: 0o755, ..t(path, tar::EntryType::Directory) }
    }
    fn file(path: &'static str, data: &str) -> T {
        T { data: data.as_bytes().to_vec(), ..t(path, tar::EntryType::Regular) }
    }
    fn link(path: &'static str, ty: tar::EntryType, target: &'static str) -> T {
        T { link: target, ..t(path, ty) }
    }
    impl T {
        fn mode(self, mode: u32) -> T {
            T { mode, ..self }
        }
        fn pax(mut self, k: &'static str, v: &[u8]) -> T {
            self.pax.push((k, v.to_vec()));
            self
        }
    }

    fn tar_of(entries: &[T]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(e.ty);
            h.set_mode(e.mode);
            h.set_uid(e.uid);
            h.set_mtime(e.mtime);
            h.set_size(e.data.len() as u64);
            if matches!(e.ty, tar::EntryType::Char | tar::EntryType::Block) {
                h.set_device_major(e.dev.0).unwrap();
                h.set_device_minor(e.dev.1).unwrap();
            }
            let mut pax = e.pax.clone();
            if e.path.len() > 100 {
                pax.push(("path", e.path.as_bytes().to_vec()));
            } else {
                h.as_old_mut().name[..e.path.len()].copy_from_slice(e.path.as_bytes());
            }
            h.as_old_mut().linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
            h.set_cksum();
            if !pax.is_empty() {
                b.append_pax_extensions(pax.iter().map(|(k, v)| (*k, v.as_slice()))).unwrap();
            }
            b.append(&h, &e.data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn compress(tar: &[u8], c: Compression) -> Vec<u8> {
        match c {
            Compression::None => tar.to_vec(),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(tar).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(tar, 1).unwrap(),
        }
    }

    fn sha(bytes: &[u8]) -> Digest {
        Digest::from_sha256(&Sha256::digest(bytes))
    }

    /// Writes the layers, all into one file one after the other (as in a
    /// docker-archive), and describes them.
    fn layers(dir: &Path, tars: &[(Vec<u8>, Compression)]) -> Vec<Layer> {
        let path = dir.join("archive");
        let mut all = b"leading junk".to_vec();
        let mut out = vec![];
        for (i, (tar, c)) in tars.iter().enumerate() {
            let stored = compress(tar, *c);
            out.push(Layer {
                index: i,
                blob: BlobRef { file: path.clone(), offset: all.len() as u64, length: stored.len() as u64 },
                blob_digest: sha(&stored),
                diff_id: sha(tar),
                compression: *c,
                name: format!("l{i}/layer.tar"),
                stored_identity: crate::image::FileId { dev: 0, ino: 0, size: 0, mtime_ns: 0, ctime_ns: 0 },
            });
            all.extend_from_slice(&stored);
        }
        std::fs::write(&path, all).unwrap();
        let identity = crate::image::FileId::of_path(&path).unwrap();
        out.iter_mut().for_each(|l| l.stored_identity = identity.clone());
        out
    }

    fn run(tars: &[(Vec<u8>, Compression)], clamp: Option<u64>) -> Result<(Vec<u8>, ExportStats), ExportError> {
        run_with(tars, clamp, |_| {})
    }

    fn run_with(
        tars: &[(Vec<u8>, Compression)],
        clamp: Option<u64>,
        tweak: impl Fn(&mut Vec<Layer>),
    ) -> Result<(Vec<u8>, ExportStats), ExportError> {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        let mut layers = layers(dir.path(), tars);
        tweak(&mut layers);
        let mut out = Vec::new();
        let opts = ExportOptions { clamp_mtime: clamp, spool: Spool { cache: None, temp_dir: &spool } };
        let stats = export(&layers, &opts, &mut out)?;
        assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0, "spool files left behind");
        Ok((out, stats))
    }

    /// Every entry as "path type mode uid mtime size link dev [pax] data".
    fn listing(bytes: &[u8]) -> Vec<String> {
        let mut a = tar::Archive::new(bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let h = e.header().clone();
                let mut pax: Vec<String> = e
                    .pax_extensions()
                    .unwrap()
                    .map(|x| {
                        x.map(|x| {
                            let x = x.unwrap();
                            format!("{}={}", x.key().unwrap(), String::from_utf8_lossy(x.value_bytes()))
                        })
                        .collect()
                    })
                    .unwrap_or_default();
                pax.sort();
                let dev = match h.entry_type() {
                    tar::EntryType::Char | tar::EntryType::Block => {
                        format!(" {}:{}", h.device_major().unwrap().unwrap(), h.device_minor().unwrap().unwrap())
                    }
                    _ => String::new(),
                };
                let link = e.link_name_bytes().map(|l| format!(" ->{}", String::from_utf8_lossy(&l))).unwrap_or_default();
                let mut data = String::new();
                e.read_to_string(&mut data).unwrap();
                format!(
                    "{} {:?} {:o} {} {} {}{link}{dev} [{}] {data:?}",
                    String::from_utf8_lossy(&e.path_bytes()),
                    h.entry_type(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.mtime().unwrap(),
                    h.size().unwrap(),
                    pax.join(",")
                )
            })
            .collect()
    }

    use tar::EntryType as E;

    #[test]
    fn exports_the_merged_tree_with_every_kind_of_entry() {
        let long: &'static str = Box::leak("x".repeat(150).into_boxed_str());
        let base = tar_of(&[
            dir("./"),
            dir("./bin"),
            file("./bin/sh", "shell").mode(0o4755),
            link("./bin/ash", E::Link, "./bin/sh"),
            dir("./dev"),
            T { dev: (1, 3), ..t("./dev/null", E::Char) }.mode(0o666),
            T { dev: (8, 0), ..t("./dev/sda", E::Block) }.mode(0o660),
            t("./dev/fifo", E::Fifo),
            dir("./etc"),
            file("./etc/passwd", "root"),
            file("./etc/gone", "x"),
            link("./etc/mtab", E::Symlink, "/proc/mounts").mode(0o644),
            dir("./tmp").mode(0o1777),
            file("./ping", "p")
                .pax("SCHILY.xattr.security.capability", b"\x01\x00")
                .pax("SCHILY.xattr.trusted.overlay.origin", b"x"),
            T { uid: 3_000_000, ..file("big-uid", "") }.pax("mtime", b"2000.75"),
        ]);
        let top = tar_of(&[
            file("etc/.wh.gone", ""),
            file("tmp/new", "n"),
            link("sh2", E::Link, "bin/sh"),
            file(long, "l"),
        ]);
        let (out, stats) = run(&[(base, Compression::None), (top, Compression::None)], None).unwrap();
        let want = vec![
            "big-uid Regular 644 3000000 2000 0 [uid=3000000] \"\"".to_string(),
            "bin/ Directory 755 0 1000 0 [] \"\"".into(),
            "bin/ash Regular 4755 0 1000 5 [] \"shell\"".into(),
            "bin/sh Link 4755 0 1000 0 ->bin/ash [] \"\"".into(),
            "dev/ Directory 755 0 1000 0 [] \"\"".into(),
            "dev/fifo Fifo 644 0 1000 0 [] \"\"".into(),
            "dev/null Char 666 0 1000 0 1:3 [] \"\"".into(),
            "dev/sda Block 660 0 1000 0 8:0 [] \"\"".into(),
            "etc/ Directory 755 0 1000 0 [] \"\"".into(),
            "etc/mtab Symlink 777 0 1000 0 ->/proc/mounts [] \"\"".into(),
            "etc/passwd Regular 644 0 1000 4 [] \"root\"".into(),
            "ping Regular 644 0 1000 1 [SCHILY.xattr.security.capability=\u{1}\u{0}] \"p\"".into(),
            "sh2 Regular 4755 0 1000 5 [] \"shell\"".into(),
            "tmp/ Directory 1777 0 1000 0 [] \"\"".into(),
            "tmp/new Regular 644 0 1000 1 [] \"n\"".into(),
            format!("{long} Regular 644 0 1000 1 [path={long}] \"l\""),
        ];
        assert_eq!(listing(&out), want);
        assert_eq!(
            stats,
            ExportStats {
                index: IndexStats { layers: 2, materialised_links: 1, ..IndexStats::default() },
                entries: want.len() as u64,
                hardlinks: 1,
                data_bytes: 5 + 4 + 1 + 5 + 1 + 1,
                tar_bytes: out.len() as u64,
            }
        );
    }

    #[test]
    fn compressed_layers_give_the_same_bytes_and_leave_no_spool() {
        let base = tar_of(&[dir("a"), file("a/f", &"data".repeat(100_000)), file("a/g", "g")]);
        let top = tar_of(&[file("a/.wh.g", ""), file("a/h", "h")]);
        let mut outputs = vec![];
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let (out, stats) = run(&[(base.clone(), c), (top.clone(), c)], None).unwrap();
            let spooled = if c == Compression::None { 0 } else { (base.len() + top.len()) as u64 };
            assert_eq!(stats.index.spooled_bytes, spooled, "{c:?}");
            outputs.push(out);
        }
        // An uncompressed layer the image reader did not measure is hashed
        // while its headers are read (not only seeked through).
        let unmeasured = |ls: &mut Vec<Layer>| ls.iter_mut().for_each(|l| l.blob_digest = sha(b"not measured"));
        let (hashed, _) = run_with(&[(base.clone(), Compression::None), (top.clone(), Compression::None)], None, unmeasured).unwrap();
        assert_eq!(outputs[0], outputs[1]);
        assert_eq!(outputs[0], outputs[2]);
        assert_eq!(outputs[0], hashed);
        assert_eq!(listing(&outputs[0]).len(), 3);
    }

    #[test]
    fn same_input_same_bytes_and_clamp_applies() {
        let l = tar_of(&[dir("d"), T { mtime: 5_000, ..file("d/f", "x") }, T { mtime: 10, ..file("d/old", "y") }]);
        let (a, _) = run(&[(l.clone(), Compression::Gzip)], None).unwrap();
        let (b, _) = run(&[(l.clone(), Compression::Gzip)], None).unwrap();
        assert_eq!(a, b);
        let (c, _) = run(&[(l, Compression::None)], Some(2_000)).unwrap();
        let mtimes: Vec<String> = listing(&c).iter().map(|l| l.split(' ').nth(4).unwrap().to_string()).collect();
        assert_eq!(mtimes, ["1000", "2000", "10"]);
    }

    #[test]
    fn refuses_bad_layers_naming_them() {
        let good = tar_of(&[file("f", "x")]);
        type Tars = Vec<(Vec<u8>, Compression)>;
        type Tweak = Box<dyn Fn(&mut Vec<Layer>)>;
        let cases: Vec<(&str, Tars, Tweak, String)> = vec![
            (
                "diff_id mismatch",
                vec![(good.clone(), Compression::None), (good.clone(), Compression::Gzip)],
                Box::new(|ls: &mut Vec<Layer>| ls[1].diff_id = sha(b"other")),
                format!(
                    "layer 1 (l1/layer.tar) is corrupt: its uncompressed tar has digest {}, the image config says {}",
                    sha(&good),
                    sha(b"other")
                ),
            ),
            (
                "a range past the end of the file",
                vec![(good.clone(), Compression::None)],
                Box::new(|ls: &mut Vec<Layer>| {
                    ls[0].blob.length += 10_000;
                    ls[0].blob_digest = sha(b"not measured");
                }),
                "cannot read layer 0 (l0/layer.tar): its bytes are truncated, corrupt or not a tar (of the compression detected)"
                    .into(),
            ),
            (
                "a measured tar whose last file is cut short",
                vec![(tar_of(&[file("f", &"x".repeat(5000))])[..1024].to_vec(), Compression::None)],
                Box::new(|_: &mut Vec<Layer>| {}),
                "cannot read layer 0 (l0/layer.tar): its bytes are truncated, corrupt or not a tar (of the compression detected)"
                    .into(),
            ),
            (
                "not gzip",
                vec![(good.clone(), Compression::None)],
                Box::new(|ls: &mut Vec<Layer>| ls[0].compression = Compression::Gzip),
                "cannot read layer 0 (l0/layer.tar): its bytes are truncated, corrupt or not a tar (of the compression detected)"
                    .into(),
            ),
            (
                "missing blob",
                vec![(good.clone(), Compression::None)],
                Box::new(|ls: &mut Vec<Layer>| ls[0].blob.file = "/nonexistent/blob".into()),
                "cannot open layer 0 (l0/layer.tar) at /nonexistent/blob".into(),
            ),
            (
                "dot-dot",
                vec![(tar_of(&[file("a/../../etc/passwd", "x")]), Compression::None)],
                Box::new(|_: &mut Vec<Layer>| {}),
                "layer 0 (l0/layer.tar): entry \"a/../../etc/passwd\": a `..` component leads outside the root".into(),
            ),
            (
                "breakout through a lower symlink",
                vec![
                    (tar_of(&[link("etc", E::Symlink, "/")]), Compression::None),
                    (tar_of(&[file("etc/shadow", "x")]), Compression::Zstd),
                ],
                Box::new(|_: &mut Vec<Layer>| {}),
                "layer 1 (l1/layer.tar): entry etc/shadow writes into etc, which is a symlink or a file in the layers below \
                 (refusing to follow it: the layer must replace etc with a directory entry first)"
                    .into(),
            ),
            (
                "a char device 0:0",
                vec![(tar_of(&[t("dev/wh", E::Char)]), Compression::None)],
                Box::new(|_: &mut Vec<Layer>| {}),
                "layer 0 (l0/layer.tar): entry \"dev/wh\": a char device 0:0 cannot be stored in a layer: it is overlayfs' whiteout"
                    .into(),
            ),
            (
                "volume labels",
                vec![(tar_of(&[t("v", E::new(b'V'))]), Compression::None)],
                Box::new(|_: &mut Vec<Layer>| {}),
                "layer 0 (l0/layer.tar): entry \"v\": typeflag 'V' entries are not supported in an image layer"
                    .into(),
            ),
        ];
        for (name, tars, tweak, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let mut ls = layers(dir.path(), &tars);
            tweak(&mut ls);
            let opts = ExportOptions { clamp_mtime: None, spool: Spool { cache: None, temp_dir: dir.path() } };
            let err = export(&ls, &opts, &mut Vec::new()).unwrap_err();
            assert_eq!(err.to_string(), want, "{name}");
        }
    }

    #[test]
    fn an_unusable_temp_dir_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let ls = layers(dir.path(), &[(tar_of(&[file("f", "x")]), Compression::Gzip)]);
        let missing = dir.path().join("missing");
        let opts = ExportOptions { clamp_mtime: None, spool: Spool { cache: None, temp_dir: &missing } };
        let err = export(&ls, &opts, &mut Vec::new()).unwrap_err();
        assert!(matches!(&err, ExportError::Layers(LayerError::Spool { dir: d, .. }) if d == &missing), "{err}");
    }

    #[test]
    fn the_cache_spares_a_second_decompression_and_rebuilds_a_corrupted_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tar_of(&[dir("a"), file("a/f", &"data".repeat(50_000))]);
        let top = tar_of(&[file("a/g", "g")]);
        let ls = layers(tmp.path(), &[(base.clone(), Compression::Gzip), (top.clone(), Compression::Zstd)]);
        let loc = crate::cache::Location { runasroot_cache: Some(tmp.path().join("c").display().to_string()), ..Default::default() };
        let cache = crate::cache::Cache::open(&loc).unwrap();
        let temp = tmp.path().join("t");
        std::fs::create_dir(&temp).unwrap();
        let opts = ExportOptions { clamp_mtime: None, spool: Spool { cache: Some(&cache), temp_dir: &temp } };
        let run = || {
            let mut out = Vec::new();
            let stats = export(&ls, &opts, &mut out).unwrap();
            (out, stats.index)
        };
        let (first, s1) = run();
        assert_eq!((s1.spooled_bytes, s1.cache_hits, s1.cache_rebuilt), ((base.len() + top.len()) as u64, 0, 0));
        let (second, s2) = run();
        assert_eq!((s2.spooled_bytes, s2.cache_hits, s2.cache_rebuilt), (0, 2, 0));
        assert_eq!(first, second);
        // Damage the base layer's entry: found, refused, made anew.
        let entry = cache.dir().join(format!("{}.tar", ls[0].blob_digest.hex()));
        let mut bytes = std::fs::read(&entry).unwrap();
        bytes[2000] ^= 1;
        std::fs::write(&entry, bytes).unwrap();
        let (third, s3) = run();
        assert_eq!((s3.spooled_bytes, s3.cache_hits, s3.cache_rebuilt), (base.len() as u64, 1, 1));
        assert_eq!(first, third);
        assert_eq!(std::fs::read(&entry).unwrap(), base);
        assert_eq!(std::fs::read_dir(&temp).unwrap().count(), 0, "nothing spooled to the temp dir");
    }

    /// A raw ustar header block: `name`, typeflag, size.
    fn raw_header(name: &str, ty: u8, size: u64) -> Vec<u8> {
        crate::layers::guard::raw_header(name, ty, size, true)
    }

    #[test]
    fn a_huge_extension_header_is_refused_before_it_is_read() {
        // Each of these would have the tar crate read 32 MiB into one Vec
        // (a small part of what a gzip layer of a few MiB can claim).
        for (ty, what) in [(b'x', "PAX extended header"), (b'L', "GNU long name"), (b'K', "GNU long link name")] {
            let mut tar = raw_header("huge", ty, 32 << 20);
            tar.extend(vec![b'a'; 32 << 20]);
            tar.extend(raw_header("f", b'0', 0));
            tar.extend(vec![0; 1024]);
            let err = run(&[(tar, Compression::Gzip)], None).unwrap_err();
            let ExportError::Layers(LayerError::ReadLayer { layer, source }) = &err else { panic!("{err}") };
            assert_eq!(layer, "layer 0 (l0/layer.tar)");
            assert_eq!(
                source.to_string(),
                format!(
                    "the tar header at byte 0 is a {what} of 33554432 bytes, more than the 1048576 runasroot reads \
                     (Go's archive/tar, which writes image layers, refuses them too)"
                )
            );
        }
    }

    #[test]
    fn pax_values_hold_newlines() {
        // Found by looking at what the layers fuzz target reached: the tar
        // crate splits PAX records at newlines, so a layer was refused for
        // a capability xattr holding byte 0x0a (cap_dac_override +
        // cap_fowner), and bytes after a newline could pass for a record
        // of their own (a `path` inside an xattr value).
        let cap = [1u8, 0, 0, 2, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let layer = tar_of(&[
            file("bin/ping", "p").pax("SCHILY.xattr.security.capability", &cap),
            file("plain", "x").pax("SCHILY.xattr.user.note", b"a\n10 path=evil\n"),
            file("x", "n").pax("path", b"new\nline"),
        ]);
        let (out, _) = run(&[(layer, Compression::Gzip)], None).unwrap();
        // The export writes the records by the same rules; read it back
        // with the layer reader, as the next run on this image would.
        let dir = tempfile::tempdir().unwrap();
        let back = crate::layers::index(&layers(dir.path(), &[(out, Compression::None)]), Spool { cache: None, temp_dir: dir.path() })
            .unwrap();
        let mut seen = Vec::new();
        back.merged
            .walk::<()>(None, &mut |entry, _| {
                seen.push((String::from_utf8_lossy(&entry.path).into_owned(), entry.xattrs.clone()));
                Ok(())
            })
            .unwrap();
        assert_eq!(
            seen,
            vec![
                ("bin".to_string(), vec![]),
                ("bin/ping".to_string(), vec![(b"security.capability".to_vec(), cap.to_vec())]),
                ("new\nline".to_string(), vec![]),
                ("plain".to_string(), vec![(b"user.note".to_vec(), b"a\n10 path=evil\n".to_vec())]),
            ]
        );
    }

    #[test]
    fn a_pax_size_the_tar_reader_cannot_follow_is_refused() {
        // Go writes a file past 8 GiB with size 0 in its header and a PAX
        // `size` (records sorted: an xattr first). Where that xattr holds
        // a newline, the tar crate's parse stops before `size` and reads
        // the data as headers: refused, rather than read wrong.
        let records = [
            crate::layers::pax::record("SCHILY.xattr.user.a", b"x\ny"),
            crate::layers::pax::record("size", b"3"),
        ]
        .concat();
        let mut tar = raw_header("pax", b'x', records.len() as u64);
        tar.extend(&records);
        tar.resize(tar.len().next_multiple_of(512), 0);
        tar.extend(raw_header("big", b'0', 0));
        tar.extend(b"abc");
        tar.resize(tar.len().next_multiple_of(512), 0);
        tar.extend(vec![0; 1024]);
        let err = run(&[(tar, Compression::None)], None).unwrap_err();
        assert_eq!(
            format!("{err}: {}", std::error::Error::source(&err).map(|s| s.to_string()).unwrap_or_default()),
            "layer 0 (l0/layer.tar): entry \"big\": invalid header field size: \
             the PAX size record is not the size the tar reader followed"
        );
    }

    #[test]
    fn the_merge_stops_at_its_memory_budget() {
        // 3 layers of 100 entries, each entry costing ENTRY_COST plus its
        // name: a budget for 250 entries stops in the third layer.
        let tars: Vec<(Vec<u8>, Compression)> = (0..3)
            .map(|l| {
                let entries: Vec<T> = (0..100)
                    .map(|i| file(Box::leak(format!("l{l}/f{i:03}").into_boxed_str()), ""))
                    .collect();
                (tar_of(&entries), Compression::None)
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let ls = layers(dir.path(), &tars);
        let spool = Spool { cache: None, temp_dir: dir.path() };
        let per_entry = crate::layers::ENTRY_COST + "l0/f000".len() as u64;
        let err = crate::layers::index_within(&ls, spool, 250 * per_entry).unwrap_err();
        let LayerError::TooMuchMetadata { layer, limit, .. } = &err else { panic!("{err}") };
        assert_eq!((layer.as_str(), *limit), ("layer 2 (l2/layer.tar)", 250 * per_entry));
        assert!(err.to_string().contains("more than the 51750 bytes of memory runasroot gives the merge"), "{err}");
        // The same layers within the real budget.
        assert_eq!(crate::layers::index(&ls, spool).unwrap().stats.layers, 3);
    }

    #[test]
    fn the_deepest_path_linux_holds_merges_and_exports_on_a_small_stack() {
        // 2048 components, 4095 bytes: PATH_MAX bounds the depth of every
        // recursion over the trees (merge, walk, drop); one more byte is
        // refused. Test threads have 2 MiB stacks, as the layer readers.
        let deep: &'static str = Box::leak(("a/".repeat(2047) + "f").into_boxed_str());
        let (out, stats) = run(&[(tar_of(&[file(deep, "x")]), Compression::Gzip)], None).unwrap();
        assert_eq!(stats.entries, 2048);
        assert_eq!(listing(&out).last().unwrap(), &format!("{deep} Regular 644 0 1000 1 [path={deep}] \"x\""));
        let deeper: &'static str = Box::leak(("a/".repeat(2047) + "fg").into_boxed_str());
        let err = run(&[(tar_of(&[file(deeper, "x")]), Compression::None)], None).unwrap_err();
        assert!(err.to_string().ends_with("the path is longer than 4095 bytes"), "{err}");
    }

    #[test]
    fn many_layers_merge_in_order() {
        // 130 layers each replacing /f and adding /dN: the top /f wins
        // whatever order the parallel readers finish in.
        let tars: Vec<(Vec<u8>, Compression)> = (0..130)
            .map(|i| {
                let d: &'static str = Box::leak(format!("d{i:03}").into_boxed_str());
                let content: &'static str = Box::leak(format!("layer {i}").into_boxed_str());
                let c = [Compression::None, Compression::Gzip, Compression::Zstd][i % 3];
                (tar_of(&[file("f", content), dir(d)]), c)
            })
            .collect();
        let (out, stats) = run(&tars, None).unwrap();
        let l = listing(&out);
        assert_eq!(l.len(), 131);
        assert_eq!(l[0], "d000/ Directory 755 0 1000 0 [] \"\"");
        assert_eq!(l[130], "f Regular 644 0 1000 9 [] \"layer 129\"");
        assert_eq!(stats.index.layers, 130);
    }
}
