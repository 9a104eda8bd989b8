//! A read-only NBD server on a Unix socket, so that QEMU can take a disk
//! made of several files' ranges ([`Backing::Concat`](super::Backing)):
//! QEMU has no block driver that concatenates files, but it has an NBD
//! client. One export, no name, simple replies only, as the protocol
//! (NetworkBlockDevice/nbd doc/proto.md) allows a server to be:
//!
//! * handshake: fixed newstyle; `NBD_OPT_GO`/`NBD_OPT_INFO` answered with
//!   the export's size and flags, `NBD_OPT_EXPORT_NAME` accepted, every
//!   other option refused with `NBD_REP_ERR_UNSUP` (QEMU then does
//!   without structured replies and metadata contexts);
//! * transmission: `NBD_CMD_READ`, `NBD_CMD_FLUSH` (nothing to flush),
//!   `NBD_CMD_DISC`; writes are refused (`EPERM`): the export is
//!   read-only and says so.
//!
//! QEMU is the only client (the socket lives in the run's private
//! temporary directory); still every length and offset is checked, and a
//! bad request is an error reply or the end of the connection, never a
//! panic or an unbounded allocation.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::backend::Backend;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const INFO_EXPORT: u16 = 0;

const TFLAG_HAS_FLAGS: u16 = 1 << 0;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// Longest option payload accepted (an export name, info requests).
const MAX_OPTION: u32 = 4096;
/// Longest read served at once (QEMU asks for at most 32 MiB).
const MAX_READ: u32 = 32 << 20;
/// Pause after a failed accept (out of file descriptors, say).
const RETRY: Duration = Duration::from_millis(50);

/// A server for one read-only export, stopped and joined on drop.
pub struct NbdServer {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl NbdServer {
    /// Serves `disk` at `socket` (a new path) until dropped.
    pub fn start(disk: Backend, socket: &Path) -> io::Result<NbdServer> {
        let listener = UnixListener::bind(socket)?;
        let stop = Arc::new(AtomicBool::new(false));
        let size = disk.size()?;
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("nbd".into()).spawn(move || {
            for conn in listener.incoming() {
                // Drop wakes this accept with a connection of its own.
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                match conn {
                    Ok(conn) => {
                        if let Err(e) = serve(conn, &disk, size) {
                            log::debug!("nbd: connection ended: {e}");
                        }
                    }
                    Err(e) => {
                        log::debug!("nbd: accept: {e}");
                        std::thread::sleep(RETRY);
                    }
                }
            }
        })?;
        Ok(NbdServer { socket: socket.to_path_buf(), stop, thread: Some(thread) })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for NbdServer {
    /// Call after the client (QEMU) has gone: a connection still open
    /// keeps the server reading it.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if UnixStream::connect(&self.socket).is_ok() {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// One client, from handshake to disconnect, over any byte stream (the
/// `nbd` fuzz target feeds it one; the server a Unix socket).
#[doc(hidden)]
pub fn serve<S: Read + Write>(mut conn: S, disk: &Backend, size: u64) -> io::Result<()> {
    if handshake(&mut conn, size)? {
        transmission(&mut conn, disk, size)?;
    }
    Ok(())
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn protocol(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

const TRANSMISSION_FLAGS: u16 = TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH;

/// The option reply header and payload.
fn reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)
}

/// The fixed-newstyle handshake; true when transmission follows.
fn handshake<S: Read + Write>(conn: &mut S, size: u64) -> io::Result<bool> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    conn.write_all(&hello)?;
    let client = read_u32(conn)?;
    if client & u32::from(FLAG_FIXED_NEWSTYLE) == 0 {
        return Err(protocol("the client does not speak fixed newstyle"));
    }
    let no_zeroes = client & u32::from(FLAG_NO_ZEROES) != 0;
    loop {
        if read_u64(conn)? != IHAVEOPT {
            return Err(protocol("bad option magic"));
        }
        let option = read_u32(conn)?;
        let len = read_u32(conn)?;
        if len > MAX_OPTION {
            return Err(protocol("option too long"));
        }
        let mut data = vec![0u8; len as usize];
        conn.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                let mut out = Vec::with_capacity(10 + 124);
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                conn.write_all(&out)?;
                return Ok(true);
            }
            OPT_GO | OPT_INFO => {
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                reply(conn, option, REP_INFO, &info)?;
                reply(conn, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(true);
                }
            }
            OPT_ABORT => {
                reply(conn, option, REP_ACK, &[])?;
                return Ok(false);
            }
            _ => reply(conn, option, REP_ERR_UNSUP, &[])?,
        }
    }
}

fn simple_reply(w: &mut impl Write, error: u32, cookie: u64, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)
}

/// Requests until the client disconnects.
fn transmission<S: Read + Write>(conn: &mut S, disk: &Backend, size: u64) -> io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let magic = match read_u32(conn) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        if magic != REQUEST_MAGIC {
            return Err(protocol("bad request magic"));
        }
        let _flags = read_u16(conn)?;
        let kind = read_u16(conn)?;
        let cookie = read_u64(conn)?;
        let offset = read_u64(conn)?;
        let len = read_u32(conn)?;
        match kind {
            CMD_READ => {
                let inside = offset.checked_add(u64::from(len)).is_some_and(|end| end <= size);
                if !inside || len > MAX_READ {
                    simple_reply(conn, EINVAL, cookie, &[])?;
                    continue;
                }
                buf.resize(len as usize, 0);
                match disk.read_exact_at(&mut buf, offset) {
                    Ok(()) => simple_reply(conn, 0, cookie, &buf)?,
                    Err(e) => {
                        log::debug!("nbd: read {len} at {offset}: {e}");
                        simple_reply(conn, EIO, cookie, &[])?;
                    }
                }
            }
            CMD_WRITE => {
                // The payload follows the request: drain it, then refuse.
                io::copy(&mut (&mut *conn).take(u64::from(len)), &mut io::sink())?;
                simple_reply(conn, EPERM, cookie, &[])?;
            }
            CMD_FLUSH => simple_reply(conn, 0, cookie, &[])?,
            CMD_DISC => return Ok(()),
            _ => simple_reply(conn, EINVAL, cookie, &[])?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::{Backing, Extent};

    /// A disk of 3 extents with gaps; its bytes as the server must show them.
    fn disk() -> (tempfile::TempDir, Backend, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let mut want = vec![0u8; 8192];
        let mut extents = vec![];
        for (i, (at, len)) in [(0u64, 1000u64), (1536, 3000), (6144, 512)].iter().enumerate() {
            let bytes: Vec<u8> = (0..*len).map(|j| (i as u64 * 31 + j) as u8).collect();
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, &bytes).unwrap();
            want[*at as usize..(*at + len) as usize].copy_from_slice(&bytes);
            extents.push(Extent { path: p, offset: 0, len: *len, at: *at });
        }
        let b = Backend::open(&Backing::Concat { extents, len: 8192 }, true).unwrap();
        (dir, b, want)
    }

    fn option(c: &mut UnixStream, option: u32, data: &[u8]) {
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
        c.write_all(&out).unwrap();
    }

    /// Reads one option reply: (option, type, data).
    fn read_reply(c: &mut UnixStream) -> (u32, u32, Vec<u8>) {
        assert_eq!(read_u64(c).unwrap(), REPLY_MAGIC);
        let (o, t, n) = (read_u32(c).unwrap(), read_u32(c).unwrap(), read_u32(c).unwrap());
        let mut d = vec![0u8; n as usize];
        c.read_exact(&mut d).unwrap();
        (o, t, d)
    }

    fn request(c: &mut UnixStream, kind: u16, cookie: u64, offset: u64, len: u32) {
        let mut out = REQUEST_MAGIC.to_be_bytes().to_vec();
        out.extend_from_slice(&0u16.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        c.write_all(&out).unwrap();
    }

    /// Reads a simple reply header: (error, cookie).
    fn read_simple(c: &mut UnixStream) -> (u32, u64) {
        assert_eq!(read_u32(c).unwrap(), SIMPLE_REPLY_MAGIC);
        (read_u32(c).unwrap(), read_u64(c).unwrap())
    }

    #[test]
    fn serves_a_concatenated_disk_read_only_through_go() {
        let (dir, b, want) = disk();
        let server = NbdServer::start(b, &dir.path().join("s.sock")).unwrap();
        let mut c = UnixStream::connect(server.socket()).unwrap();
        assert_eq!(read_u64(&mut c).unwrap(), NBDMAGIC);
        assert_eq!(read_u64(&mut c).unwrap(), IHAVEOPT);
        assert_eq!(read_u16(&mut c).unwrap(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c.write_all(&u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes()).unwrap();
        // Structured replies (what QEMU asks first) are declined.
        option(&mut c, 8, &[]);
        assert_eq!(read_reply(&mut c), (8, REP_ERR_UNSUP, vec![]));
        option(&mut c, OPT_GO, &[0, 0, 0, 0, 0, 0]);
        let (o, t, info) = read_reply(&mut c);
        assert_eq!((o, t), (OPT_GO, REP_INFO));
        assert_eq!(info[0..2], INFO_EXPORT.to_be_bytes());
        assert_eq!(u64::from_be_bytes(info[2..10].try_into().unwrap()), 8192);
        assert_eq!(u16::from_be_bytes(info[10..12].try_into().unwrap()), TRANSMISSION_FLAGS);
        assert_eq!(read_reply(&mut c), (OPT_GO, REP_ACK, vec![]));

        for (cookie, (offset, len)) in [(0u64, 8192u32), (900, 700), (6000, 2192)].into_iter().enumerate() {
            request(&mut c, CMD_READ, cookie as u64, offset, len);
            assert_eq!(read_simple(&mut c), (0, cookie as u64));
            let mut got = vec![0u8; len as usize];
            c.read_exact(&mut got).unwrap();
            assert_eq!(got, want[offset as usize..offset as usize + len as usize], "{offset}+{len}");
        }
        request(&mut c, CMD_READ, 7, 8000, 500);
        assert_eq!(read_simple(&mut c), (EINVAL, 7), "past the end");
        request(&mut c, CMD_WRITE, 8, 0, 4);
        c.write_all(b"junk").unwrap();
        assert_eq!(read_simple(&mut c), (EPERM, 8), "read-only");
        request(&mut c, CMD_FLUSH, 9, 0, 0);
        assert_eq!(read_simple(&mut c), (0, 9));
        request(&mut c, CMD_DISC, 10, 0, 0);
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        drop(server);
        assert!(!dir.path().join("s.sock").exists());
    }

    #[test]
    fn the_old_export_name_option_and_bad_clients() {
        let (dir, b, want) = disk();
        let server = NbdServer::start(b, &dir.path().join("s.sock")).unwrap();
        // EXPORT_NAME without NO_ZEROES: size, flags, 124 zeros.
        let mut c = UnixStream::connect(server.socket()).unwrap();
        let mut hello = [0u8; 18];
        c.read_exact(&mut hello).unwrap();
        c.write_all(&u32::from(FLAG_FIXED_NEWSTYLE).to_be_bytes()).unwrap();
        option(&mut c, OPT_EXPORT_NAME, b"");
        assert_eq!(read_u64(&mut c).unwrap(), 8192);
        assert_eq!(read_u16(&mut c).unwrap(), TRANSMISSION_FLAGS);
        let mut zeros = [1u8; 124];
        c.read_exact(&mut zeros).unwrap();
        assert!(zeros.iter().all(|&z| z == 0));
        request(&mut c, CMD_READ, 1, 1536, 16);
        assert_eq!(read_simple(&mut c), (0, 1));
        let mut got = [0u8; 16];
        c.read_exact(&mut got).unwrap();
        assert_eq!(got[..], want[1536..1552]);
        drop(c);
        // A client that sends garbage is dropped; the server keeps serving.
        let mut bad = UnixStream::connect(server.socket()).unwrap();
        bad.read_exact(&mut hello).unwrap();
        bad.write_all(&[0u8; 4]).unwrap();
        let mut rest = Vec::new();
        bad.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        let mut huge = UnixStream::connect(server.socket()).unwrap();
        huge.read_exact(&mut hello).unwrap();
        huge.write_all(&u32::from(FLAG_FIXED_NEWSTYLE).to_be_bytes()).unwrap();
        let mut out = IHAVEOPT.to_be_bytes().to_vec();
        out.extend_from_slice(&OPT_GO.to_be_bytes());
        out.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.write_all(&out).unwrap();
        let mut rest = Vec::new();
        huge.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "an option claiming 4 GiB ends the connection");
    }
}
