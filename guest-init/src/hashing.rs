//! sha256 of what passes through a reader. The guest hashes the layers it
//! unpacks (diff_ids) and the host hashes blobs with this one type, so
//! both sides compute digests the same way.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

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
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// The `sha256:<hex>` form used in image configs and the contract.
pub fn digest_string(raw: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_counts_what_is_read() {
        let mut r = HashingReader::new(&b"abc"[..]);
        io::copy(&mut r, &mut io::sink()).unwrap();
        let (raw, n) = r.finish();
        assert_eq!(n, 3);
        assert_eq!(digest_string(&raw), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
