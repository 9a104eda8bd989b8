//! PAX extended header records, read as POSIX writes them (pax(1),
//! "extended header"): `LENGTH KEYWORD=VALUE\n`, LENGTH the record's
//! own length in decimal, so a value may hold any byte, newlines
//! included. The `tar` crate's parser splits records at newlines instead
//! (tar 0.4 `PaxExtensions`): a binary xattr holding byte 0x0a (a file
//! capability, an ACL naming uid 10) broke its record, and the bytes
//! after the newline could read as a record of their own (a `path`
//! smuggled inside an xattr). Go's archive/tar, which writes and reads
//! layers for Docker, containerd and umoci, reads by length, as here.

use std::io::Read;

use super::guard::Extensions;

/// One record: its keyword and value, as bytes.
pub(crate) type Record = (Vec<u8>, Vec<u8>);

/// An entry's path as Go's archive/tar reads it: the last PAX `path`,
/// else a GNU long name (which the crate reads), else the header's.
pub(crate) fn path<R: Read>(entry: &tar::Entry<'_, R>, ext: &Extensions, records: &[Record]) -> Vec<u8> {
    match last(records, "path") {
        Some(p) => p.to_vec(),
        None if ext.long_name => entry.path_bytes().into_owned(),
        None => ext.header.path_bytes().into_owned(),
    }
}

/// An entry's link target, by the same rules (`linkpath`, GNU long link).
pub(crate) fn link<R: Read>(entry: &tar::Entry<'_, R>, ext: &Extensions, records: &[Record]) -> Vec<u8> {
    let target = match last(records, "linkpath") {
        Some(l) => return l.to_vec(),
        None if ext.long_link => entry.link_name_bytes(),
        None => ext.header.link_name_bytes(),
    };
    target.map(|t| t.into_owned()).unwrap_or_default()
}

/// Whether the crate found the entry's data by the size the records (or
/// the header) give: it follows its own parse of the PAX `size`, which a
/// record holding a newline can hide or fake.
pub(crate) fn check_size<R: Read>(entry: &tar::Entry<'_, R>, ext: &Extensions, records: &[Record]) -> Result<(), &'static str> {
    if ext.header.entry_type().is_gnu_sparse() {
        // Its size is the sparse map's (and image tars hold none).
        return Ok(());
    }
    let size = match number(records, "size")? {
        Some(size) => size,
        None => ext.header.entry_size().map_err(|_| "an invalid size field")?,
    };
    if size != entry.size() {
        return Err("the PAX size record is not the size the tar reader followed");
    }
    Ok(())
}

/// The records in order, keys and values as bytes; a record that does
/// not parse is an error (Go's `parsePAXRecord` refuses it too).
pub(crate) fn records(mut data: &[u8]) -> Result<Vec<Record>, &'static str> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let space = data.iter().take(21).position(|&b| b == b' ').ok_or("a PAX record without its length")?;
        let digits = &data[..space];
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err("a PAX record whose length is not a decimal number");
        }
        let len: usize = std::str::from_utf8(digits).ok().and_then(|s| s.parse().ok()).ok_or("a PAX record length too large")?;
        if len <= space + 1 || len > data.len() {
            return Err("a PAX record whose length does not fit the header");
        }
        let (record, rest) = data.split_at(len);
        let body = record[space + 1..].strip_suffix(b"\n").ok_or("a PAX record not ended by a newline")?;
        let eq = body.iter().position(|&b| b == b'=').ok_or("a PAX record without `=`")?;
        if eq == 0 {
            return Err("a PAX record with an empty keyword");
        }
        out.push((body[..eq].to_vec(), body[eq + 1..].to_vec()));
        data = rest;
    }
    Ok(out)
}

/// The value of the last record for `key`, unless it is empty (POSIX:
/// an empty value unsets the keyword, for the header's field to apply).
pub(crate) fn last<'a>(records: &'a [(Vec<u8>, Vec<u8>)], key: &str) -> Option<&'a [u8]> {
    records.iter().rev().find(|(k, _)| k == key.as_bytes()).map(|(_, v)| v.as_slice()).filter(|v| !v.is_empty())
}

/// A numeric record (`size`, `uid`, `gid`): `Ok(None)` when absent.
pub(crate) fn number(records: &[Record], key: &str) -> Result<Option<u64>, &'static str> {
    match last(records, key) {
        None => Ok(None),
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map(Some)
            .ok_or("a PAX number that is not a decimal number"),
    }
}

/// One PAX record, `LEN KEY=VALUE\n`, for tests that craft headers.
#[cfg(test)]
pub(crate) fn record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
    let mut len = body.len() + 1;
    while format!("{len}").len() + body.len() != len {
        len += 1;
    }
    [format!("{len}").into_bytes(), body].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_hold_any_byte_newlines_included() {
        // A capability xattr for cap_dac_override + cap_fowner (0x0a),
        // then a value that looks like a record of its own.
        let cap = [1u8, 0, 0, 2, 0x0a, 0, 0, 0];
        let data = [
            record("SCHILY.xattr.security.capability", &cap),
            record("SCHILY.xattr.user.x", b"a\n10 path=x\n"),
            record("path", b"caf\xc3\xa9/f"),
            record("path", b""),
            record("size", b"12"),
        ]
        .concat();
        let r = records(&data).unwrap();
        assert_eq!(
            r,
            vec![
                (b"SCHILY.xattr.security.capability".to_vec(), cap.to_vec()),
                (b"SCHILY.xattr.user.x".to_vec(), b"a\n10 path=x\n".to_vec()),
                (b"path".to_vec(), b"caf\xc3\xa9/f".to_vec()),
                (b"path".to_vec(), b"".to_vec()),
                (b"size".to_vec(), b"12".to_vec()),
            ]
        );
        // The last `path` unsets it; there is no other.
        assert_eq!(last(&r, "path"), None);
        assert_eq!(number(&r, "size"), Ok(Some(12)));
        assert_eq!(number(&r, "uid"), Ok(None));
        // What the tar crate makes of the same records.
        let theirs: Vec<_> = tar::PaxExtensions::new(&data).map(|r| r.is_ok()).collect();
        assert!(theirs.contains(&false), "the tar crate splits at newlines: {theirs:?}");
    }

    #[test]
    fn malformed_records_are_refused() {
        let table: [(&[u8], &str); 7] = [
            (b"x path=a\n", "a PAX record whose length is not a decimal number"),
            (b"12 path=a\n", "a PAX record whose length does not fit the header"),
            (b"7 path=a\n", "a PAX record not ended by a newline"),
            (b"8 patha\n", "a PAX record without `=`"),
            (b"5 =a\n", "a PAX record with an empty keyword"),
            (b"11path=abc\n", "a PAX record without its length"),
            (b"99999999999999999999999 a=b\n", "a PAX record without its length"),
        ];
        for (data, want) in table {
            assert_eq!(records(data), Err(want), "{}", String::from_utf8_lossy(data));
        }
        assert_eq!(records(b""), Ok(vec![]));
        assert_eq!(number(&records(&record("uid", b"x1")).unwrap(), "uid"), Err("a PAX number that is not a decimal number"));
    }
}
