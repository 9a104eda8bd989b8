//! `runasroot::image` on every input format the fixtures build (and ones
//! real skopeo writes), and its output checked with the real clients:
//! `skopeo inspect`/`skopeo copy` of all three output formats, `umoci raw
//! unpack`, and the base layers byte for byte.

#[path = "common/images.rs"]
mod images;

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::Command;

use images::*;
use runasroot::image::{self, Digest, ImageError, NewLayer, OpenOptions, OutputFormat, WriteOptions};
use runasroot::output::Target;
use serde_json::{json, Value};

fn opts(temp: &Path) -> OpenOptions {
    OpenOptions { from_image: None, platform: None, temp_dir: temp.to_path_buf() }
}

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

fn is_root() -> bool {
    nix_uid() == 0
}

fn nix_uid() -> u32 {
    std::os::unix::fs::MetadataExt::uid(&fs::metadata("/proc/self").unwrap())
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = vec![];
    r.read_to_end(&mut v).unwrap();
    v
}

/// The shared sample with a PATH in its Env.
fn sample() -> Image {
    sample_image().env(&["A=b", "PATH=/bin"])
}

/// [`sample`] with its zstd layer gzipped: for umoci 0.4.7 and skopeo's
/// docker-archive writer, which have no zstd.
fn sample_without_zstd() -> Image {
    let mut img = sample();
    img.layers[2].compression = Compression::Gzip;
    img
}

fn spec_for(build: &Build, path: &Path) -> String {
    let p = path.display();
    match build.format {
        Format::DockerLegacy | Format::DockerHybrid => format!("docker-archive:{p}"),
        Format::OciDir => format!("oci:{p}"),
        Format::OciArchive => format!("oci-archive:{p}"),
    }
}

fn all_input_builds() -> Vec<Build> {
    let mut v = all_builds();
    v.push(Build::new(Format::DockerLegacy).symlinked_layers());
    v
}

fn input_name(b: &Build) -> String {
    format!("{}{}", if b.symlinked_layers { "sym-" } else { "" }, file_name(b))
}

#[test]
fn opens_every_input_format_and_verifies_every_layer() {
    let tmp = tempfile::tempdir().unwrap();
    for build in all_input_builds() {
        let path = tmp.path().join(input_name(&build));
        let built = write(&path, &build, &[sample()]);
        let want = &built.images[0];
        for spec in [path.display().to_string(), spec_for(&build, &path)] {
            let img = image::open(&spec, &opts(tmp.path())).unwrap_or_else(|e| panic!("{spec}: {e}"));
            let what = format!("{spec} ({})", img.format_name());
            assert_eq!(img.name.as_deref(), Some("sample:1"), "{what}");
            assert_eq!(img.env(), vec!["A=b", "PATH=/bin"], "{what}");
            assert_eq!(img.created().as_deref(), Some("2001-09-09T01:46:40Z"), "{what}");
            assert_eq!(sha(&img.config_bytes), want.config_digest, "{what}");
            let got: Vec<(String, String, String, image::Compression)> = img
                .layers
                .iter()
                .map(|l| (l.blob_digest.to_string(), l.diff_id.to_string(), l.media_type().to_string(), l.compression))
                .collect();
            let expected: Vec<(String, String, String, image::Compression)> = (0..4)
                .map(|i| {
                    let c = [image::Compression::None, image::Compression::Gzip, image::Compression::Zstd][[0, 1, 2, 1][i]];
                    (want.layer_digests[i].clone(), want.diff_ids[i].clone(), want.media_types[i].clone(), c)
                })
                .collect();
            assert_eq!(got, expected, "{what}");
            assert_eq!(img.layers.iter().map(|l| l.index).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
            for l in &img.layers {
                assert_eq!(sha(&read_all(l.open_stored().unwrap())), l.blob_digest.to_string(), "{what} layer {}", l.index);
                let tar = read_all(l.open_verified().unwrap());
                assert_eq!(sha(&tar), l.diff_id.to_string(), "{what} layer {}", l.index);
                assert_eq!(read_all(l.open_uncompressed().unwrap()), tar);
            }

            // Layers are byte ranges of the archive itself when it is a
            // plain tar (the guest reads them there: nothing is copied).
            let plain_tar = build.format != Format::OciDir && build.whole == Whole::None;
            for l in &img.layers {
                assert_eq!(l.blob.file == path, plain_tar, "{what}: layer {} in {}", l.index, l.blob.file.display());
                let bytes = fs::read(&l.blob.file).unwrap();
                let slice = &bytes[l.blob.offset as usize..(l.blob.offset + l.blob.length) as usize];
                assert_eq!(sha(slice), l.blob_digest.to_string(), "{what}: range of layer {}", l.index);
            }
            // The twice-listed layer is stored once.
            assert_eq!(img.layers[1].blob, img.layers[3].blob);
        }
    }
}

#[test]
fn decompressed_archive_lives_as_long_as_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let temp_dir = tmp.path().join("t");
    fs::create_dir(&temp_dir).unwrap();
    let build = Build::new(Format::DockerHybrid).whole(Whole::Zstd);
    let path = tmp.path().join(file_name(&build));
    write(&path, &build, &[sample()]);
    let img = image::open(path.to_str().unwrap(), &opts(&temp_dir)).unwrap();
    assert_eq!(img.format_name(), "docker-archive (OCI hybrid) (zstd-compressed)");
    assert_eq!(fs::read_dir(&temp_dir).unwrap().count(), 1);
    drop(img);
    assert_eq!(fs::read_dir(&temp_dir).unwrap().count(), 0, "the decompressed copy is removed");
}

fn two_images() -> Vec<Image> {
    vec![
        image(vec![layer(vec![file("a", "a")])]).tag("a:1"),
        image(vec![layer(vec![file("b", "b")]).gzip()]).tag("b:2").tag("reg.example:5000/team/b:two"),
    ]
}

#[test]
fn selects_by_name_in_multi_image_archives() {
    let tmp = tempfile::tempdir().unwrap();
    for build in [Format::DockerLegacy, Format::DockerHybrid, Format::OciDir, Format::OciArchive].map(Build::new) {
        let path = tmp.path().join(file_name(&build));
        let built = write(&path, &build, &two_images());
        let b_digest = &built.images[1].layer_digests[0];
        let pick = |from: Option<&str>| {
            image::open(
                path.to_str().unwrap(),
                &OpenOptions { from_image: from.map(str::to_string), platform: None, temp_dir: tmp.path().into() },
            )
        };
        let first = pick(None).unwrap();
        assert_eq!(first.name.as_deref(), Some("a:1"), "{build:?}");
        assert_eq!(&first.layers[0].blob_digest.to_string(), &built.images[0].layer_digests[0]);
        // Selected by any spelling; named as the archive names it.
        let cases = [
            ("b:2", "b:2"),
            ("docker.io/library/b:2", "b:2"),
            ("reg.example:5000/team/b:two", "reg.example:5000/team/b:two"),
        ];
        for (name, called) in cases {
            let img = pick(Some(name)).unwrap_or_else(|e| panic!("{build:?} {name}: {e}"));
            assert_eq!(&img.layers[0].blob_digest.to_string(), b_digest, "{build:?} {name}");
            assert_eq!(img.name.as_deref(), Some(called), "{build:?} {name}");
        }
        // The skopeo-style reference selects too.
        let spec = format!("{}:b:2", spec_for(&build, &path));
        assert_eq!(&image::open(&spec, &opts(tmp.path())).unwrap().layers[0].blob_digest.to_string(), b_digest);
        let err = pick(Some("c:3")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageError::NoSuchImage { .. }), "{msg}");
        assert!(msg.contains("\"c:3\"") && msg.contains("a:1") && msg.contains("b:2"), "{build:?}: {msg}");
        // A spec reference and --from-image that disagree.
        let err = image::open(
            &format!("{}:a:1", spec_for(&build, &path)),
            &OpenOptions { from_image: Some("b:2".into()), platform: None, temp_dir: tmp.path().into() },
        )
        .unwrap_err();
        assert!(matches!(err, ImageError::ConflictingSelection { .. }), "{err}");
    }
}

#[test]
fn picks_the_platform_in_a_multi_platform_index() {
    let tmp = tempfile::tempdir().unwrap();
    let platforms = vec![
        image(vec![layer(vec![file("arch", "arm64")])]).platform("linux", "arm64", Some("v8")),
        image(vec![layer(vec![file("arch", "amd64")])]),
    ];
    for build in [Format::OciDir, Format::OciArchive, Format::DockerHybrid].map(Build::new) {
        let path = tmp.path().join(format!("mp-{}", file_name(&build)));
        let built = write_multi_platform(&path, &build, Some("multi:1"), &platforms);
        let open = |platform: Option<&str>, from: Option<&str>| {
            image::open(
                path.to_str().unwrap(),
                &OpenOptions {
                    from_image: from.map(str::to_string),
                    platform: platform.map(str::to_string),
                    temp_dir: tmp.path().into(),
                },
            )
        };
        let cases = [
            (None, None, 1),
            (Some("linux/amd64"), Some("multi:1"), 1),
            (Some("linux/arm64"), None, 0),
            (Some("linux/arm64/v8"), None, 0),
        ];
        for (platform, from, want) in cases {
            let img = open(platform, from).unwrap_or_else(|e| panic!("{build:?} {platform:?}: {e}"));
            assert_eq!(
                img.layers[0].blob_digest.to_string(),
                built.images[want].layer_digests[0],
                "{build:?} {platform:?}"
            );
        }
        let err = open(Some("linux/s390x"), None).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageError::NoSuchPlatform { .. }), "{msg}");
        assert!(msg.contains("linux/arm64/v8, linux/amd64"), "{msg}");
        assert!(matches!(open(Some("linux"), None).unwrap_err(), ImageError::BadPlatform { .. }));
    }
}

#[test]
fn every_bad_digest_is_an_error_naming_the_layer_and_both_digests() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(Build, &str)> = vec![
        (Build::new(Format::OciArchive).corrupt(Corrupt::LayerBlob(1)), "layer 1 (blobs/sha256/"),
        (Build::new(Format::OciArchive).corrupt(Corrupt::LayerBlob(1)).whole(Whole::Gzip), "layer 1 (blobs/sha256/"),
        (Build::new(Format::OciDir).corrupt(Corrupt::LayerBlob(2)), "layer 2 (blobs/sha256/"),
        (Build::new(Format::DockerHybrid).corrupt(Corrupt::LayerBlob(0)), "layer 0 (blobs/sha256/"),
        (Build::new(Format::OciDir).corrupt(Corrupt::LayerSize(0)), "layer 0 (blobs/sha256/"),
        (Build::new(Format::DockerLegacy).corrupt(Corrupt::DiffId(0)), "layer 0 ("),
        (Build::new(Format::OciArchive).corrupt(Corrupt::DiffId(0)), "layer 0 (blobs/sha256/"),
        (Build::new(Format::DockerLegacy).corrupt(Corrupt::ConfigDigest), "config "),
        (Build::new(Format::OciArchive).corrupt(Corrupt::ConfigDigest), "config blobs/sha256/"),
        (Build::new(Format::DockerHybrid).corrupt(Corrupt::ConfigDigest), "config blobs/sha256/"),
        (Build::new(Format::OciDir).corrupt(Corrupt::ManifestDigest), "manifest blobs/sha256/"),
        (Build::new(Format::DockerHybrid).corrupt(Corrupt::HybridDisagree), "manifest.json and index.json describe different images"),
    ];
    for (n, (build, names)) in cases.into_iter().enumerate() {
        let path = tmp.path().join(format!("{n}-{}", file_name(&build)));
        let built = write(&path, &build, &[sample()]);
        let err = image::open(path.to_str().unwrap(), &opts(tmp.path())).unwrap_err();
        let msg = err.to_string();
        println!("{:?}: {msg}", build.corrupt);
        assert!(msg.contains(names), "{:?}: {msg}", build.corrupt);
        // Named after the file the user gave, even when decompressed.
        assert!(msg.starts_with(path.to_str().unwrap()), "{msg}");
        match build.corrupt {
            Corrupt::HybridDisagree | Corrupt::LayerSize(_) => {}
            Corrupt::DiffId(i) => {
                assert!(matches!(err, ImageError::DiffIdMismatch { .. }), "{msg}");
                assert!(msg.contains(&built.images[0].diff_ids[i]), "expected digest missing: {msg}");
            }
            _ => {
                assert!(matches!(err, ImageError::DigestMismatch { .. }), "{msg}");
                assert_eq!(msg.matches("sha256:").count(), 2, "both digests: {msg}");
            }
        }
    }
}

#[test]
fn a_bad_diff_id_of_a_compressed_layer_fails_when_the_layer_is_read() {
    // Checking it needs decompression, which open() leaves to the guest
    // and to open_verified().
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("legacy.tar");
    let built = write(&path, &Build::new(Format::DockerLegacy).corrupt(Corrupt::DiffId(2)), &[sample()]);
    let img = image::open(path.to_str().unwrap(), &opts(tmp.path())).unwrap();
    let mut r = img.layers[2].open_verified().unwrap();
    let err = io::copy(&mut r, &mut io::sink()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<ImageError>()).expect("an ImageError inside");
    let msg = inner.to_string();
    assert!(matches!(inner, ImageError::DiffIdMismatch { index: 2, .. }), "{msg}");
    assert!(msg.contains(&built.images[0].diff_ids[2]) && msg.contains("layer 2 ("), "{msg}");
}

/// A tar of (name, bytes) members, for hand-made hostile archives.
fn raw_tar(path: &Path, members: &[(&str, &[u8])]) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, bytes) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *bytes).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn refuses_hostile_and_unknown_archives() {
    let tmp = tempfile::tempdir().unwrap();
    let config = br#"{"rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#;
    let manifest = |layer: &str| format!(r#"[{{"Config":"c.json","RepoTags":["x:1"],"Layers":["{layer}"]}}]"#);
    let xz = [0xfd, b'7', b'z', b'X', b'Z', 0, 1, 2];
    let big = vec![b' '; (4 << 20) + 1];
    type Members<'a> = Vec<(&'a str, Vec<u8>)>;
    let cases: Vec<(&str, Members, &str)> = vec![
        ("dotdot", vec![("manifest.json", manifest("../etc/passwd").into_bytes()), ("c.json", config.to_vec())], "leaves the image"),
        ("absolute", vec![("manifest.json", manifest("/etc/passwd").into_bytes()), ("c.json", config.to_vec())], "leaves the image"),
        ("missing", vec![("manifest.json", manifest("l/layer.tar").into_bytes()), ("c.json", config.to_vec())], "l/layer.tar is missing"),
        (
            "xz",
            vec![("manifest.json", manifest("l/layer.tar").into_bytes()), ("c.json", config.to_vec()), ("l/layer.tar", xz.to_vec())],
            "compressed with xz",
        ),
        ("huge", vec![("manifest.json", big)], "more than the 4194304 allowed"),
        ("notjson", vec![("manifest.json", b"{".to_vec())], "not valid JSON"),
        ("empty", vec![("manifest.json", b"[]".to_vec())], "lists no images"),
        ("other", vec![("hello.txt", b"hi".to_vec())], "is not a container image"),
    ];
    for (name, members, want) in cases {
        let path = tmp.path().join(format!("{name}.tar"));
        let refs: Vec<(&str, &[u8])> = members.iter().map(|(n, b)| (*n, &b[..])).collect();
        raw_tar(&path, &refs);
        let err = image::open(path.to_str().unwrap(), &opts(tmp.path())).unwrap_err();
        assert!(err.to_string().contains(want), "{name}: {err}");
    }
    // A whole archive in xz, and a file that is no tar at all.
    let xz_path = tmp.path().join("a.tar.xz");
    fs::write(&xz_path, xz).unwrap();
    let err = image::open(xz_path.to_str().unwrap(), &opts(tmp.path())).unwrap_err();
    assert!(matches!(err, ImageError::UnsupportedArchiveCompression { codec: "xz", .. }), "{err}");
    let missing = image::open(tmp.path().join("nope.tar").to_str().unwrap(), &opts(tmp.path())).unwrap_err();
    assert!(matches!(missing, ImageError::Open { .. }), "{missing}");
}

#[test]
fn reads_what_real_skopeo_writes() {
    if !have("skopeo") {
        println!("SKIPPED: skopeo is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let layout = tmp.path().join("src");
    // skopeo refuses zstd layers in a docker-archive.
    let built = write(&layout, &Build::new(Format::OciDir), &[sample_without_zstd()]);
    let src = format!("oci:{}:sample:1", layout.display());
    for (dest, spec) in [
        (format!("docker-archive:{}/s.tar:sample:1", tmp.path().display()), format!("{}/s.tar", tmp.path().display())),
        (format!("oci-archive:{}/o.tar:sample:1", tmp.path().display()), format!("{}/o.tar", tmp.path().display())),
    ] {
        let (ok, out) = run(Command::new("skopeo").args(["copy", "--quiet", &src, &dest]));
        assert!(ok, "skopeo copy to {dest}: {out}");
        let img = image::open(&spec, &opts(tmp.path())).unwrap_or_else(|e| panic!("{spec}: {e}"));
        let diff_ids: Vec<String> = img.layers.iter().map(|l| l.diff_id.to_string()).collect();
        assert_eq!(diff_ids, built.images[0].diff_ids, "{dest}");
        for l in &img.layers {
            io::copy(&mut l.open_verified().unwrap(), &mut io::sink()).unwrap();
        }
    }
}

// ----- output ---------------------------------------------------------

/// The new layer, as the guest would hand it back.
fn new_layer(dir: &Path) -> NewLayer {
    let bytes = layer_tar(&[
        dir_entry("data").owner(1000, 1000),
        file("data/hello", "hello\n").owner(1000, 1000),
        whiteout("etc/passwd"),
    ]);
    let path = dir.join("layer.tar");
    fs::write(&path, &bytes).unwrap();
    NewLayer { path, diff_id: Digest::parse(&sha(&bytes)).unwrap(), size: bytes.len() as u64 }
}

fn dir_entry(p: &str) -> Entry {
    images::dir(p)
}

fn write_opts(format: OutputFormat, compress: image::Compression, tag: Option<&str>) -> WriteOptions {
    WriteOptions {
        format,
        tag: tag.map(str::to_string),
        compress,
        created: "1970-01-01T00:00:01Z".into(),
        history_created_by: "runasroot --script setup.sh".into(),
        config: image::ConfigOverrides::default(),
        archive_compress: image::Compression::None,
    }
}

/// The output's OCI layout as a directory (archives are unpacked).
fn as_layout(out: &Path, format: OutputFormat, scratch: &Path) -> PathBuf {
    if format == OutputFormat::Oci {
        return out.to_path_buf();
    }
    let dir = scratch.join(format!("unpacked-{}", out.file_name().unwrap().to_string_lossy()));
    fs::create_dir_all(&dir).unwrap();
    tar::Archive::new(fs::File::open(out).unwrap()).unpack(&dir).unwrap();
    dir
}

fn transport(format: OutputFormat, out: &Path) -> String {
    match format {
        OutputFormat::DockerArchive => format!("docker-archive:{}", out.display()),
        OutputFormat::Oci => format!("oci:{}", out.display()),
        OutputFormat::OciArchive => format!("oci-archive:{}", out.display()),
    }
}

fn tree_bytes(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path().strip_prefix(root).unwrap().display().to_string(), fs::read(e.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn writes_every_output_format_that_skopeo_and_umoci_read() {
    let tmp = tempfile::tempdir().unwrap();
    let new = new_layer(tmp.path());
    let skopeo = have("skopeo");
    let umoci = have("umoci") && is_root();
    if !skopeo {
        println!("SKIPPED (part): skopeo is not installed: output checked by runasroot's own reader only");
    }
    if !umoci {
        println!("SKIPPED (part): umoci raw unpack needs umoci and root");
    }
    let formats = [OutputFormat::DockerArchive, OutputFormat::Oci, OutputFormat::OciArchive];
    let codecs = [image::Compression::None, image::Compression::Gzip, image::Compression::Zstd];
    // With a zstd base layer, umoci cannot read the output at all.
    for (base_name, base_image, umoci) in [("gz", sample_without_zstd(), umoci), ("zst", sample(), false)] {
    let base_path = tmp.path().join(format!("base-{base_name}.tar"));
    write(&base_path, &Build::new(Format::DockerHybrid), &[base_image]);
    let base = image::open(base_path.to_str().unwrap(), &opts(tmp.path())).unwrap();
    for format in formats {
        for compress in codecs {
            for tag in [Some("out/app:1"), None] {
                let label = format!("{base_name}-{format:?}-{compress:?}-{}", tag.is_some());
                let out = tmp.path().join(format!("out-{label}"));
                let o = write_opts(format, compress, tag);
                image::write_image(&base, &new, &o, &Target::Path(out.clone())).unwrap_or_else(|e| panic!("{label}: {e}"));

                // Deterministic: a second write gives the same bytes.
                let again = tmp.path().join(format!("again-{label}"));
                image::write_image(&base, &new, &o, &Target::Path(again.clone())).unwrap();
                if format == OutputFormat::Oci {
                    assert_eq!(tree_bytes(&out), tree_bytes(&again), "{label}");
                } else {
                    assert_eq!(fs::read(&out).unwrap(), fs::read(&again).unwrap(), "{label}");
                }

                // Our own reader sees base + new, base layers unchanged.
                let img = image::open(&transport(format, &out), &opts(tmp.path())).unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(img.layers.len(), base.layers.len() + 1, "{label}");
                for (a, b) in img.layers.iter().zip(&base.layers) {
                    assert_eq!((&a.blob_digest, &a.diff_id, a.compression), (&b.blob_digest, &b.diff_id, b.compression));
                    assert_eq!(read_all(a.open_stored().unwrap()), read_all(b.open_stored().unwrap()), "{label}: base layer bytes");
                }
                let top = img.layers.last().unwrap();
                assert_eq!((&top.diff_id, top.compression), (&new.diff_id, compress), "{label}");
                assert_eq!(read_all(top.open_verified().unwrap()), fs::read(&new.path).unwrap(), "{label}");
                assert_eq!(img.env(), base.env(), "{label}: config kept");
                assert_eq!(img.created().as_deref(), Some("1970-01-01T00:00:01Z"));
                let history = img.config["history"].as_array().unwrap();
                assert_eq!(
                    history.last().unwrap(),
                    &json!({"created": "1970-01-01T00:00:01Z", "created_by": "runasroot --script setup.sh", "comment": "runasroot"})
                );
                assert_eq!(img.name.as_deref(), tag.map(|_| "out/app:1"), "{label}");

                if skopeo {
                    let t = transport(format, &out);
                    let (ok, text) = run(Command::new("skopeo").args(["inspect", &t]));
                    assert!(ok, "skopeo inspect {t}: {text}");
                    let v: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(v["Layers"].as_array().unwrap().len(), 5, "{label}");
                    assert_eq!(v["Env"], json!(["A=b", "PATH=/bin"]), "{label}");
                    assert_eq!(v["Created"], json!("1970-01-01T00:00:01Z"), "{label}");
                    if format == OutputFormat::DockerArchive {
                        // Through manifest.json skopeo shows diff_ids;
                        // also read the hybrid's OCI side.
                        let layers: Vec<String> = img.layers.iter().map(|l| l.diff_id.to_string()).collect();
                        assert_eq!(v["Layers"], json!(layers), "{label}");
                        let o = format!("oci-archive:{}", out.display());
                        let (ok, text) = run(Command::new("skopeo").args(["inspect", &o]));
                        assert!(ok, "skopeo inspect {o}: {text}");
                    } else {
                        let layers: Vec<String> = img.layers.iter().map(|l| l.blob_digest.to_string()).collect();
                        assert_eq!(v["Layers"], json!(layers), "{label}");
                    }
                    let dest = tmp.path().join(format!("copy-{label}"));
                    let (ok, text) =
                        run(Command::new("skopeo").args(["copy", "--quiet", &t, &format!("oci:{}:x", dest.display())]));
                    assert!(ok, "skopeo copy {t}: {text}");
                }

                // umoci 0.4.7 has no zstd.
                if umoci && compress != image::Compression::Zstd {
                    let layout = as_layout(&out, format, tmp.path());
                    let reference = match (tag, format) {
                        (None, _) => None,
                        (Some(_), OutputFormat::DockerArchive) => Some("1"),
                        (Some(t), _) => Some(t),
                    };
                    if let Some(r) = reference {
                        let root = tmp.path().join(format!("root-{label}"));
                        let (ok, text) = run(Command::new("umoci")
                            .args(["raw", "unpack", "--image", &format!("{}:{r}", layout.display())])
                            .arg(&root));
                        assert!(ok, "umoci raw unpack {label}: {text}");
                        assert_eq!(fs::read(root.join("data/hello")).unwrap(), b"hello\n", "{label}");
                        assert!(!root.join("etc/passwd").exists(), "{label}: whiteout applied");
                        // Layer 1 is listed again on top: its opaque var/
                        // hides layer 2's var/x and brings var/null back.
                        assert!(!root.join("var/x").exists(), "{label}");
                        let null = fs::symlink_metadata(root.join("var/null")).unwrap();
                        assert!(std::os::unix::fs::FileTypeExt::is_char_device(&null.file_type()), "{label}");
                        let meta = fs::metadata(root.join("data")).unwrap();
                        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 1000, "{label}");
                    }
                }
            }
        }
    }
    }
}

#[test]
fn the_archive_is_laid_out_like_docker_save() {
    let tmp = tempfile::tempdir().unwrap();
    let base_path = tmp.path().join("base.tar");
    write(&base_path, &Build::new(Format::OciArchive), &[sample()]);
    let base = image::open(base_path.to_str().unwrap(), &opts(tmp.path())).unwrap();
    let new = new_layer(tmp.path());
    let out = tmp.path().join("out.tar");
    image::write_image(&base, &new, &write_opts(OutputFormat::DockerArchive, image::Compression::Gzip, Some("app:1")), &Target::Path(out.clone()))
        .unwrap();
    let listing = list_tar(fs::File::open(&out).unwrap());
    let names: Vec<&str> = listing.iter().map(|l| l.split(' ').next().unwrap()).collect();
    let mut blobs: Vec<String> = base.layers.iter().map(|l| l.blob_digest.hex().to_string()).collect();
    blobs.sort();
    blobs.dedup();
    assert_eq!(names[..2], ["blobs/", "blobs/sha256/"]);
    assert_eq!(names[names.len() - 4..], ["index.json", "manifest.json", "oci-layout", "repositories"]);
    // 3 distinct base blobs + new layer + config + manifest, sorted.
    assert_eq!(names.len(), 2 + 6 + 4);
    let mut sorted = names[2..8].to_vec();
    sorted.sort();
    assert_eq!(sorted, names[2..8]);
    for line in &listing {
        let fields: Vec<&str> = line.split(' ').collect();
        let (mode, owner, mtime) = (fields[2], fields[3], fields[5]);
        assert!(mode == "755" || mode == "644", "{line}");
        assert_eq!((owner, mtime), ("0:0", "1"), "{line}");
    }
    let manifest: Value = serde_json::from_slice(
        &tar_members(&out).into_iter().find(|(n, _)| n == "manifest.json").unwrap().1,
    )
    .unwrap();
    assert_eq!(manifest[0]["RepoTags"], json!(["app:1"]));
    assert_eq!(manifest[0]["Layers"].as_array().unwrap().len(), 5);
    // The new layer's gzip header: mtime 0, OS unknown.
    let gz = base.layers.len(); // index of the new layer in the manifest
    let top = manifest[0]["Layers"][gz].as_str().unwrap().to_string();
    let bytes = tar_members(&out).into_iter().find(|(n, _)| *n == top).unwrap().1;
    assert_eq!(&bytes[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
}

#[test]
fn output_from_every_input_format_keeps_the_base_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let new = new_layer(tmp.path());
    for build in all_input_builds() {
        let path = tmp.path().join(input_name(&build));
        let built = write(&path, &build, &[sample()]);
        let base = image::open(path.to_str().unwrap(), &opts(tmp.path())).unwrap();
        let out = tmp.path().join(format!("out-{}", input_name(&build)));
        image::write_image(&base, &new, &write_opts(OutputFormat::Oci, image::Compression::None, None), &Target::Path(out.clone()))
            .unwrap();
        for (i, d) in built.images[0].layer_digests.iter().enumerate() {
            let blob = fs::read(out.join("blobs/sha256").join(d.strip_prefix("sha256:").unwrap())).unwrap();
            assert_eq!(&sha(&blob), d, "{build:?} layer {i}");
        }
    }
}

#[test]
fn replaces_an_oci_layout_but_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let base_path = tmp.path().join("base.tar");
    write(&base_path, &Build::new(Format::DockerLegacy), &[sample()]);
    let base = image::open(base_path.to_str().unwrap(), &opts(tmp.path())).unwrap();
    let new = new_layer(tmp.path());
    let out = tmp.path().join("layout");
    let o = write_opts(OutputFormat::Oci, image::Compression::None, Some("a:1"));
    image::write_image(&base, &new, &o, &Target::Path(out.clone())).unwrap();
    fs::write(out.join("stale"), b"x").unwrap();
    image::write_image(&base, &new, &o, &Target::Path(out.clone())).unwrap();
    assert!(!out.join("stale").exists(), "the old layout is replaced as a whole");
    assert!(out.join("index.json").is_file());
    let leftovers: Vec<String> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary directories left: {leftovers:?}");

    let precious = tmp.path().join("precious");
    fs::create_dir(&precious).unwrap();
    fs::write(precious.join("file"), b"keep").unwrap();
    let err = image::write_image(&base, &new, &o, &Target::Path(precious.clone())).unwrap_err();
    assert!(matches!(err, ImageError::RefuseReplace { .. }), "{err}");
    assert_eq!(fs::read(precious.join("file")).unwrap(), b"keep");
    let err = image::write_image(&base, &new, &o, &Target::Stdout).unwrap_err();
    assert!(matches!(err, ImageError::OciDirToStdout), "{err}");
}

#[test]
fn a_new_layer_that_does_not_match_its_digest_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base_path = tmp.path().join("base.tar");
    write(&base_path, &Build::new(Format::DockerLegacy), &[sample()]);
    let base = image::open(base_path.to_str().unwrap(), &opts(tmp.path())).unwrap();
    let mut new = new_layer(tmp.path());
    new.diff_id = Digest::parse(&format!("sha256:{}", "0".repeat(64))).unwrap();
    let out = tmp.path().join("out.tar");
    let err = image::write_image(&base, &new, &write_opts(OutputFormat::DockerArchive, image::Compression::Gzip, None), &Target::Path(out.clone()))
        .unwrap_err();
    assert!(matches!(err, ImageError::NewLayerMismatch { .. }), "{err}");
    assert!(!out.exists());
    let bad_tag = write_opts(OutputFormat::DockerArchive, image::Compression::None, Some("Bad Tag"));
    assert!(matches!(image::write_image(&base, &new_layer(tmp.path()), &bad_tag, &Target::Path(out.clone())), Err(ImageError::BadTag { .. })));
}

#[test]
fn a_base_changed_after_open_is_caught_while_copying() {
    let tmp = tempfile::tempdir().unwrap();
    let base_path = tmp.path().join("base.tar");
    write(&base_path, &Build::new(Format::OciDir), &[sample()]);
    let base = image::open(base_path.to_str().unwrap(), &opts(tmp.path())).unwrap();
    // Flip one byte of the stored bottom layer.
    let blob = &base.layers[0].blob;
    let mut bytes = fs::read(&blob.file).unwrap();
    bytes[blob.offset as usize + 600] ^= 1;
    fs::write(&blob.file, bytes).unwrap();
    let out = tmp.path().join("out.tar");
    let err = image::write_image(&base, &new_layer(tmp.path()), &write_opts(OutputFormat::DockerArchive, image::Compression::None, None), &Target::Path(out.clone()))
        .unwrap_err();
    assert!(matches!(err, ImageError::BaseLayerChanged { index: 0, .. }), "{err}");
    assert!(!out.exists(), "nothing written");
}

/// Not a timed assertion: prints how fast `open` verifies a large base,
/// against `sha256sum` over the same archive in the same run. Run with
/// `cargo test --release --test image_formats -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_open_verifies_a_large_base() {
    const LAYERS: usize = 4;
    const LAYER_MB: u64 = 48;
    let tmp = tempfile::tempdir().unwrap();
    // Incompressible-looking content so no layer is trivially small.
    let layers: Vec<Layer> = (0..LAYERS)
        .map(|i| layer(vec![big_file(format!("f{i}"), LAYER_MB << 20, b'a' + i as u8)]))
        .collect();
    let path = tmp.path().join("big.tar");
    write(&path, &Build::new(Format::DockerLegacy), &[image(layers)]);
    let size = fs::metadata(&path).unwrap().len();
    let _ = fs::read(&path).unwrap(); // warm the page cache for both
    let t = std::time::Instant::now();
    let img = image::open(path.to_str().unwrap(), &opts(tmp.path())).unwrap();
    let ours = t.elapsed().as_secs_f64();
    assert_eq!(img.layers.len(), LAYERS);
    let t = std::time::Instant::now();
    let (ok, _) = run(Command::new("sha256sum").arg(&path));
    let peer = t.elapsed().as_secs_f64();
    assert!(ok);
    let mb = size as f64 / 1e6;
    println!(
        "open+verify {mb:.0} MB legacy docker-archive: {ours:.3} s ({:.0} MB/s); sha256sum of the same file: {peer:.3} s ({:.0} MB/s); ratio {:.2}",
        mb / ours,
        mb / peer,
        ours / peer
    );
}

#[test]
fn opens_deep_stacks_and_reports_hashing_progress() {
    // Docker stops at 125 layers; runasroot must take at least 128.
    let tmp = tempfile::tempdir().unwrap();
    let layers: Vec<Layer> = (0..130).map(|i| layer(vec![file(format!("f{i}"), format!("{i}"))])).collect();
    for build in [Format::DockerLegacy, Format::OciDir].map(Build::new) {
        let path = tmp.path().join(format!("deep-{}", file_name(&build)));
        let built = write(&path, &build, &[image(layers.clone())]);
        let seen = std::cell::RefCell::new(vec![]);
        let img = image::open_with_progress(path.to_str().unwrap(), &opts(tmp.path()), &|phase, done, total| {
            seen.borrow_mut().push((phase.to_string(), done, total))
        })
        .unwrap();
        let digests: Vec<String> = img.layers.iter().map(|l| l.blob_digest.to_string()).collect();
        assert_eq!(digests, built.images[0].layer_digests, "{build:?}");
        let seen = seen.into_inner();
        let total: u64 = img.layers.iter().map(|l| l.blob.length).sum();
        assert_eq!(seen.len(), 130, "one report per (small) layer");
        assert_eq!(seen.last().unwrap(), &(image::VERIFYING.to_string(), total, total));
        assert!(seen.windows(2).all(|w| w[0].1 < w[1].1), "progress only grows");
        assert_eq!(img.layers.len(), 130);
    }
}
