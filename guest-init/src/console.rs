//! The console protocol: the lines guest-init writes on /dev/console
//! (ttyS0), which the host parses.
//!
//! * `@rar out <text>`: one line of the script's stdout/stderr;
//! * `@rar phase <name>`: a phase began (boot, mount, script, pack, write);
//! * `@rar log <text>`: guest-init's own diagnostics (verbose, or errors).
//!
//! Anything else on the console is kernel log. Results never travel here:
//! they go on the output disk. Every line is one `write(2)`, so a line is
//! never interleaved with the kernel's own messages mid-way.

use std::fs::File;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;

use runasroot_guest::contract::CONSOLE_TAG;

/// Longest script output line forwarded as one `@rar out` line; longer
/// lines are cut into pieces so one chatty line cannot hold the console.
pub const MAX_LINE: usize = 4096;

/// The phases the host shows as progress, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Boot,
    Mount,
    Script,
    Pack,
    Write,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Boot => "boot",
            Phase::Mount => "mount",
            Phase::Script => "script",
            Phase::Pack => "pack",
            Phase::Write => "write",
        }
    }
}

/// Writes protocol lines to the console (fd 1, which the kernel opened on
/// /dev/console for PID 1).
pub struct Console {
    verbose: bool,
}

impl Console {
    pub fn new() -> Console {
        Console { verbose: false }
    }

    pub fn set_verbose(&mut self, verbose: bool) {
        self.verbose = verbose;
    }

    pub fn phase(&self, phase: Phase) {
        write_line(&line("phase", phase.name().as_bytes()));
    }

    /// A diagnostic shown by the host with `-v`; dropped unless verbose.
    pub fn log(&self, text: &str) {
        if self.verbose {
            write_line(&line("log", text.as_bytes()));
        }
    }

    /// A diagnostic printed whatever the verbosity (errors).
    pub fn error(&self, text: &str) {
        write_line(&line("log", format!("error: {text}").as_bytes()));
    }

    /// One line of the script's output.
    pub fn out(&self, text: &[u8]) {
        write_line(&line("out", text));
    }
}

/// The bytes of one protocol line: tag, kind, text, newline. Line breaks
/// inside the text would start lines the host does not expect: they
/// become spaces.
pub fn line(kind: &str, text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONSOLE_TAG.len() + kind.len() + text.len() + 2);
    out.extend_from_slice(CONSOLE_TAG.as_bytes());
    out.extend_from_slice(kind.as_bytes());
    out.push(b' ');
    out.extend(text.iter().map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }));
    out.push(b'\n');
    out
}

fn write_line(bytes: &[u8]) {
    // SAFETY: fd 1 is the console the kernel opened for PID 1 (or closed,
    // in which case the write fails and is ignored); ManuallyDrop keeps
    // this handle from closing it.
    let mut console = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
    // A console that cannot be written to leaves nothing better to do.
    let _ = console.write_all(bytes);
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes, without
/// their newline; a last line without newline comes out of `finish`.
#[derive(Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8])) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) if self.pending.len() + i <= MAX_LINE => {
                    self.pending.extend_from_slice(&data[..i]);
                    emit(&self.pending);
                    self.pending.clear();
                    data = &data[i + 1..];
                }
                _ => {
                    let room = MAX_LINE - self.pending.len();
                    let take = room.min(data.len());
                    self.pending.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.pending.len() == MAX_LINE {
                        emit(&self.pending);
                        self.pending.clear();
                    }
                }
            }
        }
    }

    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.pending.is_empty() {
            emit(&self.pending);
            self.pending.clear();
        }
    }
}

#[cfg(test)]
// Test tables spell out whole rows on purpose.
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_the_tag_and_no_inner_breaks() {
        assert_eq!(line("phase", b"mount"), b"@rar phase mount\n");
        assert_eq!(line("out", b"a\r\nb"), b"@rar out a  b\n");
        assert_eq!(line("out", b""), b"@rar out \n");
    }

    fn split(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |l| out.push(l.to_vec()));
        }
        s.finish(|l| out.push(l.to_vec()));
        out
    }

    #[test]
    fn splits_lines_across_chunks() {
        let table: Vec<(Vec<&[u8]>, Vec<Vec<u8>>)> = vec![
            (vec![b"a\nb", b"c\n", b"d"], vec![b"a".to_vec(), b"bc".to_vec(), b"d".to_vec()]),
            (vec![b"\n\n"], vec![b"".to_vec(), b"".to_vec()]),
            (vec![b"x"], vec![b"x".to_vec()]),
            (vec![], vec![]),
        ];
        for (chunks, want) in table {
            assert_eq!(split(&chunks), want);
        }
    }

    #[test]
    fn cuts_overlong_lines() {
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let mut data = long.clone();
        data.push(b'\n');
        let got = split(&[&data]);
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), vec![MAX_LINE, MAX_LINE, 10]);
        assert_eq!(got.concat(), long);
    }
}
