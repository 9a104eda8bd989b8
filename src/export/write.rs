//! Pass 2: write the merged tree as one deterministic tar, reading each
//! file's bytes by offset from its layer's source.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use runasroot_guest::tarfmt::{Entry, Kind, TarWriter};

use super::ExportError;
use crate::layers::tree::{DataRef, Merged};
use crate::layers::Source;

/// Positioned reads of file data in pieces this big.
const READ_BUF: usize = 256 << 10;

/// What was written.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Written {
    pub entries: u64,
    pub hardlinks: u64,
    pub data_bytes: u64,
    pub tar_bytes: u64,
}

pub(crate) fn write_tar(
    merged: &Merged,
    sources: &[Source],
    clamp: Option<u64>,
    out: &mut dyn Write,
) -> Result<Written, ExportError> {
    let mut tar = TarWriter::new(Counting { inner: out, bytes: 0 });
    let mut buf = vec![0u8; READ_BUF];
    let mut data_bytes = 0u64;
    let walked = merged.walk(clamp, &mut |entry: Entry, data: Option<DataRef>| {
        let name = || String::from_utf8_lossy(&entry.path).into_owned();
        let result = match (data, &entry.kind) {
            (Some(d), Kind::File { size }) => {
                let source = &sources[d.source as usize];
                let mut reader = DataReader {
                    file: &source.file,
                    pos: source.base + d.offset,
                    left: *size,
                    buf: &mut buf,
                    start: 0,
                    end: 0,
                    error: None,
                };
                let r = tar.append(&entry, &mut reader);
                if let Some(e) = reader.error.take() {
                    return Err(ExportError::ReadData { layer: source.label.clone(), entry: name(), source: e });
                }
                data_bytes += size;
                r
            }
            _ => tar.append(&entry, &mut io::empty()),
        };
        result.map_err(|e| ExportError::WriteOutput { entry: name(), source: e })
    })?;
    let counting = tar.finish().map_err(ExportError::FinishOutput)?;
    counting.inner.flush().map_err(ExportError::FinishOutput)?;
    Ok(Written { entries: walked.entries, hardlinks: walked.hardlinks, data_bytes, tar_bytes: counting.bytes })
}

/// Counts what reaches the sink.
struct Counting<'a> {
    inner: &'a mut dyn Write,
    bytes: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One file's bytes, read by offset in big pieces through a buffer shared
/// by all files; keeps its own error so a bad source is told apart from a
/// failing output.
struct DataReader<'a> {
    file: &'a std::fs::File,
    pos: u64,
    left: u64,
    buf: &'a mut [u8],
    start: usize,
    end: usize,
    error: Option<io::Error>,
}

impl Read for DataReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            if self.left == 0 {
                return Ok(0);
            }
            let want = self.buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
            let n = match self.file.read_at(&mut self.buf[..want], self.pos) {
                Ok(0) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the source ends before the file's last byte")),
                other => other,
            };
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    let kind = e.kind();
                    self.error = Some(e);
                    return Err(io::Error::new(kind, "reading file data failed"));
                }
            };
            self.pos += n as u64;
            self.left -= n as u64;
            self.start = 0;
            self.end = n;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}
