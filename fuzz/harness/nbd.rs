//! The NBD server QEMU reads the lower disk through: a client's whole
//! byte stream (handshake options, then requests) into `nbd::serve`, over
//! a disk made of file ranges with gaps (`Backend::Concat`), some files
//! shorter than their range.
//!
//! Checked: no panic, no unbounded allocation; the server's replies are
//! byte for byte what a model of the protocol subset it implements
//! (NetworkBlockDevice/nbd doc/proto.md; the module docs of
//! `machine::nbd`) says, read data included.

use std::io::{self, Read, Write};

use runasroot::machine::backend::Backend;
use runasroot::machine::nbd;
use runasroot::machine::{Backing, Extent};

use super::Input;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const MAX_OPTION: u32 = 4096;
const MAX_READ: u32 = 32 << 20;
/// Read-only, has flags, sends flush.
const TRANSMISSION_FLAGS: u16 = 1 | 2 | 4;

/// The client's side of the socket: the input, then end of file.
struct Conn<'a> {
    from_client: &'a [u8],
    to_client: Vec<u8>,
}

impl Read for Conn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.from_client.read(buf)
    }
}

impl Write for Conn<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.to_client.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The disk: what each byte reads as, or `None` where a file is too
/// short under its extent (a read touching it is an I/O error).
struct Disk {
    bytes: Vec<Option<u8>>,
}

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let dir = super::temp_dir();
    let mut extents = Vec::new();
    let mut disk = Disk { bytes: Vec::new() };
    let mut at = 0u64;
    for i in 0..input.below(4) {
        at += input.below(600);
        let len = input.below(1500);
        let offset = input.below(100);
        let short = input.below(4) == 0;
        let file_len = if short { offset + input.below(len + 1) } else { offset + len };
        let bytes: Vec<u8> = (0..file_len).map(|j| (j as u8).wrapping_mul(7).wrapping_add(i as u8)).collect();
        let path = dir.path().join(format!("f{i}"));
        std::fs::write(&path, &bytes).expect("an extent file");
        disk.bytes.resize(at as usize, Some(0));
        disk.bytes.extend((offset..offset + len).map(|j| bytes.get(j as usize).copied()));
        extents.push(Extent { path, offset, len, at });
        at += len;
    }
    let size = at + input.below(700);
    disk.bytes.resize(size as usize, Some(0));
    let backend = Backend::open(&Backing::Concat { extents, len: size }, true).expect("the extents open");

    let client = input.rest();
    let mut conn = Conn { from_client: client, to_client: Vec::new() };
    let _ = nbd::serve(&mut conn, &backend, size);
    let want = model(client, &disk, size);
    if conn.to_client != want {
        let at = conn.to_client.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(want.len().min(conn.to_client.len()));
        panic!(
            "the server's replies differ from the protocol's at byte {at} (server wrote {}, model {})",
            conn.to_client.len(),
            want.len()
        );
    }
}

/// Reads the client stream as the protocol says the server must.
struct Stream<'a>(&'a [u8]);

impl Stream<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes(b.try_into().unwrap()))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes(b.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_be_bytes(b.try_into().unwrap()))
    }
}

fn option_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

fn simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Everything the server must write for this client stream.
fn model(client: &[u8], disk: &Disk, size: u64) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&3u16.to_be_bytes());
    let mut s = Stream(client);
    let _ = handshake(&mut s, &mut out, size).and_then(|go| if go { transmission(&mut s, &mut out, disk, size) } else { None });
    out
}

/// `Some(true)` when transmission follows; `None` where the server
/// drops the connection.
fn handshake(s: &mut Stream, out: &mut Vec<u8>, size: u64) -> Option<bool> {
    let flags = s.u32()?;
    if flags & 1 == 0 {
        return None;
    }
    let no_zeroes = flags & 2 != 0;
    loop {
        if s.u64()? != IHAVEOPT {
            return None;
        }
        let option = s.u32()?;
        let len = s.u32()?;
        if len > MAX_OPTION {
            return None;
        }
        s.take(len as usize)?;
        match option {
            1 => {
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0; 124]);
                }
                return Some(true);
            }
            6 | 7 => {
                let mut info = vec![0, 0];
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                option_reply(out, option, 3, &info);
                option_reply(out, option, 1, &[]);
                if option == 7 {
                    return Some(true);
                }
            }
            2 => {
                option_reply(out, option, 1, &[]);
                return Some(false);
            }
            _ => option_reply(out, option, (1 << 31) + 1, &[]),
        }
    }
}

fn transmission(s: &mut Stream, out: &mut Vec<u8>, disk: &Disk, size: u64) -> Option<bool> {
    loop {
        if s.u32()? != REQUEST_MAGIC {
            return None;
        }
        let _flags = s.u16()?;
        let kind = s.u16()?;
        let cookie = s.u64()?;
        let offset = s.u64()?;
        let len = s.u32()?;
        match kind {
            0 => {
                let inside = offset.checked_add(u64::from(len)).is_some_and(|end| end <= size);
                if !inside || len > MAX_READ {
                    simple_reply(out, 22, cookie);
                    continue;
                }
                let range = &disk.bytes[offset as usize..(offset + u64::from(len)) as usize];
                match range.iter().copied().collect::<Option<Vec<u8>>>() {
                    Some(bytes) => {
                        simple_reply(out, 0, cookie);
                        out.extend_from_slice(&bytes);
                    }
                    None => simple_reply(out, 5, cookie),
                }
            }
            1 => {
                let drain = (len as usize).min(s.0.len());
                s.take(drain);
                simple_reply(out, 1, cookie);
            }
            3 => simple_reply(out, 0, cookie),
            2 => return None,
            _ => simple_reply(out, 22, cookie),
        }
    }
}

/// Starting inputs: a disk of two extents (one file short), a client
/// that negotiates with GO (structured replies refused) or EXPORT_NAME,
/// then reads, writes, flushes and disconnects.
pub fn seeds() -> Vec<Vec<u8>> {
    // Disk: 2 extents: at +10, 1000 bytes from offset 5; at +100, 300
    // bytes of a file with only 150. Then 200 bytes of tail. (`Input::below` encodings.)
    let mut disk = vec![2u8];
    for (at, len, offset, short) in [(10u16, 1000u16, 5u8, false), (100, 300, 0, true)] {
        disk.extend_from_slice(&at.to_le_bytes());
        disk.extend_from_slice(&len.to_le_bytes());
        disk.push(offset);
        if short {
            // below(4) == 0, then the file's length past the offset.
            disk.push(0);
            disk.extend_from_slice(&150u16.to_le_bytes());
        } else {
            disk.push(1);
        }
    }
    disk.extend_from_slice(&200u16.to_le_bytes());
    let option = |o: u32, data: &[u8]| [IHAVEOPT.to_be_bytes().to_vec(), o.to_be_bytes().to_vec(), (data.len() as u32).to_be_bytes().to_vec(), data.to_vec()].concat();
    let request = |kind: u16, cookie: u64, offset: u64, len: u32| {
        [REQUEST_MAGIC.to_be_bytes().to_vec(), 0u16.to_be_bytes().to_vec(), kind.to_be_bytes().to_vec(), cookie.to_be_bytes().to_vec(), offset.to_be_bytes().to_vec(), len.to_be_bytes().to_vec()].concat()
    };
    let requests = [
        request(0, 1, 0, 512),
        request(0, 2, 1000, 300),
        request(0, 3, 1200, 1000),
        request(1, 4, 0, 4),
        b"junk".to_vec(),
        request(3, 5, 0, 0),
        request(9, 6, 0, 0),
        request(2, 7, 0, 0),
    ]
    .concat();
    let go = [3u32.to_be_bytes().to_vec(), option(8, &[]), option(7, &[0, 0, 0, 0, 0, 0]), requests.clone()].concat();
    let old = [1u32.to_be_bytes().to_vec(), option(6, &[]), option(1, b""), requests].concat();
    vec![[disk.clone(), go].concat(), [disk, old].concat()]
}
