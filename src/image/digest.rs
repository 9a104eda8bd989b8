//! sha256 of blobs, streamed.
//!
//! A Debian base is ~170 MB and every stored blob is hashed once per run,
//! so this reads in [`CHUNK`]-sized positional reads (no seeks, the file
//! can be shared) and lets `sha2` pick its SHA-NI backend at run time.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use sha2::{Digest as _, Sha256};

use super::Digest;

/// Read size for hashing: large enough that syscalls do not show, small
/// enough to stay in cache.
pub const CHUNK: usize = 1 << 20;

/// sha256 of `length` bytes of `file` from `offset`; `progress` gets the
/// bytes hashed so far after each chunk. A file shorter than the range is
/// an `UnexpectedEof` error.
pub fn sha256_range(file: &File, offset: u64, length: u64, progress: &mut dyn FnMut(u64)) -> io::Result<Digest> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < length {
        crate::interrupt::check()?;
        let want = (length - done).min(CHUNK as u64) as usize;
        let n = file.read_at(&mut buf[..want], offset + done)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file ends {} bytes before the blob does", length - done),
            ));
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(Digest::from_sha256(&hasher.finalize()))
}

/// sha256 of a byte slice.
pub fn sha256_bytes(bytes: &[u8]) -> Digest {
    Digest::from_sha256(&Sha256::digest(bytes))
}

/// Hashes (sha256) and counts what passes through a reader.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), count: 0 }
    }

    /// The raw sha256 of everything read so far, and its length.
    pub fn finish(self) -> ([u8; 32], u64) {
        (self.hasher.finalize().into(), self.count)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Copying blobs into a new image and hashing the new layer: stop
        // here when the run is (SIGINT, --timeout).
        crate::interrupt::check()?;
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Hashes and counts what passes through a writer.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: io::Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), count: 0 }
    }

    /// The sink, the digest and the length of everything written.
    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest::from_sha256(&self.hasher.finalize()), self.count)
    }
}

impl<W: io::Write> io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that, when its source ends, checks the sha256 of everything
/// it passed and fails the final read with `mismatch(found)` if it is not
/// `expected`. Whoever reads to EOF therefore never accepts bad bytes
/// silently; whoever stops early must drain it to get the check.
pub struct VerifyingReader<R> {
    inner: Option<HashingReader<R>>,
    expected: Digest,
    mismatch: Box<dyn Fn(Digest) -> io::Error + Send>,
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, expected: Digest, mismatch: Box<dyn Fn(Digest) -> io::Error + Send>) -> Self {
        VerifyingReader { inner: Some(HashingReader::new(inner)), expected, mismatch }
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(inner) = self.inner.as_mut() else {
            return Ok(0);
        };
        let n = inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let (raw, _) = self.inner.take().expect("present above").finish();
            let found = Digest::from_sha256(&raw);
            if found != self.expected {
                return Err((self.mismatch)(found));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const ABC: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn hashes_ranges_of_a_file() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"xxabcyy").unwrap();
        let mut seen = vec![];
        let cases = [(2, 3, ABC), (0, 0, EMPTY)];
        for (offset, length, want) in cases {
            assert_eq!(sha256_range(&f, offset, length, &mut |n| seen.push(n)).unwrap().as_str(), want);
        }
        assert_eq!(seen, vec![3]);
        let err = sha256_range(&f, 5, 10, &mut |_| {}).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn hashing_reader_and_writer_agree_with_sha256() {
        let mut r = HashingReader::new(&b"abc"[..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        let (raw, n) = r.finish();
        assert_eq!((Digest::from_sha256(&raw), n), (Digest::parse(ABC).unwrap(), 3));
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"abc").unwrap();
        let (v, d, n) = w.finish();
        assert_eq!((v, d.as_str(), n), (b"abc".to_vec(), ABC, 3));
        assert_eq!(sha256_bytes(b"").as_str(), EMPTY);
    }

    #[test]
    fn verifying_reader_fails_at_eof_only_on_mismatch() {
        let mk = |data: &'static [u8]| {
            VerifyingReader::new(
                data,
                Digest::parse(ABC).unwrap(),
                Box::new(|found| io::Error::new(io::ErrorKind::InvalidData, format!("got {found}"))),
            )
        };
        let mut out = vec![];
        mk(b"abc").read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc");
        let err = mk(b"abd").read_to_end(&mut vec![]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().starts_with("got sha256:"), "{err}");
    }
}
