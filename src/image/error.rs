//! What can go wrong reading or writing an image: one variant per failed
//! operation, each naming the file, layer or digest and, where there is
//! one, the fix.

use std::io;
use std::path::PathBuf;

use super::Digest;
use crate::spool::{human, Full};
use crate::output::OutputError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("invalid image reference {spec:?}: {reason}")]
    BadSpec { spec: String, reason: String },

    #[error("the image reference {spec:?} names {in_spec:?} but --from-image asks for {from_image:?}: give only one")]
    ConflictingSelection { spec: String, in_spec: String, from_image: String },

    #[error("--from-image {wanted:?} selects an image inside an archive, but --base scratch is no archive: drop one of them (a file named scratch is ./scratch)")]
    SelectInScratch { wanted: String },

    #[error("invalid platform {value:?} (--platform): expected OS/ARCH[/VARIANT], e.g. linux/amd64")]
    BadPlatform { value: String },

    #[error("cannot open the base image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{path} is compressed with {codec}, which runasroot does not read: decompress it first (e.g. `{hint}`)")]
    UnsupportedArchiveCompression { path: PathBuf, codec: &'static str, hint: &'static str },

    #[error("cannot decompress {path} ({codec}) into a temporary file in {temp_dir} (is there room?)")]
    Decompress {
        path: PathBuf,
        codec: &'static str,
        temp_dir: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{path} ({codec}) decompresses to more than {}, and {} has {} free (runasroot leaves {} of it to the rest of the system): \
         free space there, or point TMPDIR at a filesystem with room for the uncompressed archive",
        human(.full.written), .full.dir.display(), human(.full.space.available), human(.full.space.keep())
    )]
    DecompressFull { path: PathBuf, codec: &'static str, full: Full },

    #[error("cannot create a temporary file in {dir}")]
    TempFile {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{path} is not a container image: {} is no tar archive (its first 512 bytes are no tar header); \
         give a docker-archive, an OCI archive or an OCI layout directory, as a tar or compressed with gzip or zstd",
        match decompressed { Some(codec) => format!("what it {codec}-decompresses to"), None => "it is not compressed and".to_string() }
    )]
    NotATar { path: PathBuf, decompressed: Option<&'static str> },

    #[error("cannot read the tar archive {what}: it is truncated or corrupt")]
    ReadArchive {
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("{path} holds more than {limit} members: refusing it as an image archive")]
    TooManyMembers { path: PathBuf, limit: usize },

    #[error("{path}: the names of its members take more than {limit} bytes: refusing it as an image archive")]
    MemberNamesTooLarge { path: PathBuf, limit: usize },

    #[error("{source_name}: {member} lists {count} layers, more than the {limit} runasroot reads (no container runtime stacks more; squash the image, e.g. with a multi-stage build)")]
    TooManyLayers { source_name: String, member: String, count: usize, limit: usize },

    #[error("{path} is not a container image: it has neither manifest.json (docker-archive) nor index.json + oci-layout (OCI layout); found {found}")]
    UnknownFormat { path: PathBuf, found: String },

    #[error("{source_name}: {member} is missing")]
    MissingMember { source_name: String, member: String },

    #[error("{source_name}: {what} names the path {member:?}, which leaves the image (absolute, `..` or a link outside)")]
    UnsafeMemberPath { source_name: String, what: String, member: String },

    #[error("{source_name}: {member} is {size} bytes, more than the {limit} allowed for image metadata")]
    MemberTooLarge { source_name: String, member: String, size: u64, limit: u64 },

    #[error("{source_name}: cannot read {member}")]
    ReadMember {
        source_name: String,
        member: String,
        #[source]
        source: io::Error,
    },

    #[error("{source_name}: {member} is not valid JSON of the expected shape")]
    ParseJson {
        source_name: String,
        member: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("{source_name}: {member}: {reason}")]
    BadMetadata { source_name: String, member: String, reason: String },

    #[error("{source_name} holds no image named {wanted:?}; it holds: {}", list_or_none(.available))]
    NoSuchImage { source_name: String, wanted: String, available: Vec<String> },

    #[error("{source_name} has no image for platform {wanted} (--platform); it has: {}", list_or_none(.available))]
    NoSuchPlatform { source_name: String, wanted: String, available: Vec<String> },

    #[error("{source_name}: manifest.json and index.json describe different images ({reason}); the archive is inconsistent, re-export it")]
    HybridDisagree { source_name: String, reason: String },

    #[error("{source_name}: {what} has digest {found}, but the image says {expected}: the file is corrupt or was altered")]
    DigestMismatch { source_name: String, what: String, expected: Digest, found: Digest },

    #[error("{source_name}: {what} is {found} bytes, but the image says {expected}")]
    SizeMismatch { source_name: String, what: String, expected: u64, found: u64 },

    #[error("{source_name}: layer {index} ({name}) unpacks to digest {found}, but the config's rootfs.diff_ids says {expected}: the layer is corrupt or was altered")]
    DiffIdMismatch { source_name: String, index: usize, name: String, expected: Digest, found: Digest },

    #[error("{source_name}: layer {index} ({name}) is compressed with {codec}, which runasroot does not read (gzip, zstd or none): recompress the image, e.g. `skopeo copy --dest-compress-format gzip`")]
    UnsupportedLayerCompression { source_name: String, index: usize, name: String, codec: &'static str },

    #[error("{source_name}: cannot read layer {index} ({name})")]
    ReadLayer {
        source_name: String,
        index: usize,
        name: String,
        #[source]
        source: io::Error,
    },

    #[error("cannot gather the layers into {path} for the guest (is there room in the temporary directory?)")]
    GatherLayers {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot read the new layer {path}")]
    ReadNewLayer {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("the new layer {path} has digest {found} ({found_size} bytes), but {expected} ({expected_size} bytes) was expected")]
    NewLayerMismatch { path: PathBuf, expected: Digest, found: Digest, expected_size: u64, found_size: u64 },

    #[error("cannot compress the new layer {path} with {codec}")]
    CompressLayer {
        path: PathBuf,
        codec: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("invalid tag {tag:?}: {reason} (expected NAME:TAG, e.g. myimage:1.0)")]
    BadTag { tag: String, reason: String },

    #[error("invalid created time {value:?}: expected RFC 3339, e.g. 1970-01-01T00:00:01Z")]
    BadCreated {
        value: String,
        #[source]
        source: time::error::Parse,
    },

    #[error("the base image's config is not a JSON object ({source_name})")]
    ConfigNotObject { source_name: String },

    #[error("base layer {index} ({name}) changed since it was verified: it now has digest {found}, not {expected}; do not modify the base while runasroot runs")]
    BaseLayerChanged { index: usize, name: String, expected: Digest, found: Digest },

    #[error("cannot copy base layer {index} ({name}) into the output")]
    CopyLayer {
        index: usize,
        name: String,
        #[source]
        source: io::Error,
    },

    #[error("an OCI layout is a directory and cannot be written to standard output: use --format oci-archive or docker-archive with -o -")]
    OciDirToStdout,

    #[error("--compress-archive compresses a single-file image; an OCI layout (--format oci) is a directory: use --format oci-archive or docker-archive, or --compress for the new layer")]
    CompressDirectory,

    #[error("refusing to replace {path}: {reason}; remove it or choose another -o")]
    RefuseReplace { path: PathBuf, reason: String },

    #[error("cannot write the OCI layout {path}")]
    WriteDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("cannot write the image to {target}")]
    WriteOutput {
        target: String,
        #[source]
        source: OutputError,
    },
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "nothing".to_string()
    } else {
        names.join(", ")
    }
}
