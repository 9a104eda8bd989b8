//! Compression: detected from magic bytes (media types lie, and
//! docker-archives have none), and pinned settings for what we write so
//! the compressed bytes are as reproducible as the tar inside.

use std::io::{self, BufReader, Read, Write};

use super::Compression;

/// gzip magic (RFC 1952 §2.3.1: ID1 ID2).
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
/// zstd frame magic (RFC 8878 §3.1.1, little-endian 0xFD2FB528).
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
/// xz stream header magic (xz file format §2.1.1.1).
const XZ_MAGIC: &[u8] = &[0xfd, b'7', b'z', b'X', b'Z', 0x00];
/// bzip2 stream magic ("BZh").
const BZIP2_MAGIC: &[u8] = b"BZh";
/// Bytes needed to tell every codec above apart.
pub const MAGIC_LEN: usize = 6;

/// gzip level of a new layer: gzip(1)'s own default, what `docker push`
/// and nixpkgs use, pinned so an upgrade of the default cannot change bytes.
pub const GZIP_LEVEL: u32 = 6;
/// gzip header OS byte: 255 "unknown" (RFC 1952), as Go's compress/gzip
/// writes, so the host OS does not leak into the bytes.
pub const GZIP_OS: u8 = 255;
/// zstd level of a new layer: the zstd CLI's default. Single-threaded
/// (multithreaded zstd output depends on the worker count).
pub const ZSTD_LEVEL: i32 = 3;

/// What a stream starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// Not a compressed stream we know (a tar, JSON, …).
    Plain,
    Gzip,
    Zstd,
    Xz,
    Bzip2,
}

impl Detected {
    /// The codec a layer or archive can be read with, or the name of one
    /// runasroot does not read.
    pub fn supported(self) -> Result<Compression, &'static str> {
        match self {
            Detected::Plain => Ok(Compression::None),
            Detected::Gzip => Ok(Compression::Gzip),
            Detected::Zstd => Ok(Compression::Zstd),
            Detected::Xz => Err("xz"),
            Detected::Bzip2 => Err("bzip2"),
        }
    }
}

/// Classifies the first bytes of a stream (fewer than [`MAGIC_LEN`] is
/// fine: a short stream just matches fewer codecs).
pub fn detect(head: &[u8]) -> Detected {
    if head.starts_with(GZIP_MAGIC) {
        Detected::Gzip
    } else if head.starts_with(ZSTD_MAGIC) {
        Detected::Zstd
    } else if head.starts_with(XZ_MAGIC) {
        Detected::Xz
    } else if head.starts_with(BZIP2_MAGIC) && head.len() > 3 && (b'1'..=b'9').contains(&head[3]) {
        Detected::Bzip2
    } else {
        Detected::Plain
    }
}

/// Name for messages.
pub fn name(c: Compression) -> &'static str {
    match c {
        Compression::None => "none",
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
    }
}

/// A reader of the uncompressed bytes. gzip is read as multi-member
/// (`pigz`/concatenated streams are valid gzip files).
pub fn decoder<R: Read + Send + 'static>(c: Compression, r: R) -> io::Result<Box<dyn Read + Send>> {
    Ok(match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, r))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
    })
}

/// A writer compressing with the pinned settings; [`Encoder::finish`]
/// ends the stream and returns the sink.
pub enum Encoder<W: Write> {
    None(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Encoder<W> {
    pub fn new(c: Compression, w: W) -> io::Result<Self> {
        Ok(match c {
            Compression::None => Encoder::None(w),
            Compression::Gzip => Encoder::Gzip(
                flate2::GzBuilder::new()
                    .mtime(0)
                    .operating_system(GZIP_OS)
                    .write(w, flate2::Compression::new(GZIP_LEVEL)),
            ),
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(w, ZSTD_LEVEL)?;
                // A checksum lets readers catch corruption, as `zstd` does.
                e.include_checksum(true)?;
                Encoder::Zstd(e)
            }
        })
    }

    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
        let mut e = Encoder::new(c, Vec::new()).unwrap();
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn detects_codecs_by_magic() {
        let cases: [(&[u8], Detected); 8] = [
            (&[0x1f, 0x8b, 8, 0], Detected::Gzip),
            (&[0x28, 0xb5, 0x2f, 0xfd, 0], Detected::Zstd),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0], Detected::Xz),
            (b"BZh9", Detected::Bzip2),
            (b"BZhx", Detected::Plain),
            (b"etc/\0\0", Detected::Plain),
            (&[0x1f], Detected::Plain),
            (b"", Detected::Plain),
        ];
        for (head, want) in cases {
            assert_eq!(detect(head), want, "{head:?}");
        }
        assert_eq!(Detected::Xz.supported(), Err("xz"));
        assert_eq!(Detected::Zstd.supported(), Ok(Compression::Zstd));
    }

    #[test]
    fn round_trips_and_detects_its_own_output() {
        let data = b"hello tar ".repeat(1000);
        for (c, d) in [(Compression::None, Detected::Plain), (Compression::Gzip, Detected::Gzip), (Compression::Zstd, Detected::Zstd)] {
            let bytes = compress(c, &data);
            assert_eq!(detect(&bytes), d);
            let mut out = vec![];
            decoder(c, io::Cursor::new(bytes)).unwrap().read_to_end(&mut out).unwrap();
            assert_eq!(out, data, "{c:?}");
        }
    }

    #[test]
    fn pinned_gzip_header_has_no_time_and_unknown_os() {
        let bytes = compress(Compression::Gzip, b"x");
        // ID1 ID2 CM FLG MTIME(4) XFL OS (RFC 1952 §2.3).
        assert_eq!(&bytes[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&bytes[4..8], &[0, 0, 0, 0]);
        assert_eq!(bytes[9], GZIP_OS);
    }

    #[test]
    fn compressed_bytes_are_stable() {
        let data = b"stable ".repeat(5000);
        for c in [Compression::Gzip, Compression::Zstd] {
            assert_eq!(compress(c, &data), compress(c, &data), "{c:?}");
        }
    }

    #[test]
    fn concatenated_gzip_members_read_as_one_stream() {
        let mut bytes = compress(Compression::Gzip, b"ab");
        bytes.extend(compress(Compression::Gzip, b"cd"));
        let mut out = vec![];
        decoder(Compression::Gzip, io::Cursor::new(bytes)).unwrap().read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abcd");
    }
}
