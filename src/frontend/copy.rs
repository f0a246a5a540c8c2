//! COPY FROM STDIN across shards: cuts the client's CopyData stream into rows (they may span
//! or share messages) and reads each row's shard key, in text and CSV format.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::router::analyze::CopySpec;

/// The rows of a COPY stream, as they complete.
pub struct Rows {
    spec: Arc<CopySpec>,
    buf: BytesMut,
    /// How far `buf` has been scanned for the end of the current row.
    scan: usize,
    /// Scanner state carried across messages: inside a CSV quoted field; after a backslash.
    in_quotes: bool,
    escaped: bool,
}

impl Rows {
    pub fn new(spec: Arc<CopySpec>) -> Rows {
        Rows {
            spec,
            buf: BytesMut::new(),
            scan: 0,
            in_quotes: false,
            escaped: false,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete row, with its line end.
    pub fn next_row(&mut self) -> Option<Bytes> {
        let (quote, escape) = (self.spec.quote, self.spec.escape);
        while self.scan < self.buf.len() {
            let b = self.buf[self.scan];
            self.scan += 1;
            if self.spec.csv {
                if self.in_quotes {
                    if escape != quote && b == escape && self.scan < self.buf.len() {
                        self.scan += 1; // the escaped character
                    } else if escape != quote && b == escape {
                        // The escaped character is in the next message: look again then.
                        self.scan -= 1;
                        return None;
                    } else if b == quote {
                        self.in_quotes = false;
                    }
                    continue;
                }
                if b == quote {
                    self.in_quotes = true;
                    continue;
                }
            } else {
                if self.escaped {
                    self.escaped = false;
                    continue;
                }
                if b == b'\\' {
                    self.escaped = true;
                    continue;
                }
            }
            if b == b'\n' {
                let row = self.buf.split_to(self.scan).freeze();
                self.scan = 0;
                return Some(row);
            }
        }
        None
    }

    /// At the end of the stream: a last row without a line end.
    pub fn rest(&mut self) -> Option<Bytes> {
        self.scan = 0;
        (!self.buf.is_empty()).then(|| self.buf.split().freeze())
    }
}

/// The end-of-data marker `\.` on a line of its own.
pub fn is_end_marker(row: &[u8]) -> bool {
    trim_line_end(row) == b"\\."
}

fn trim_line_end(row: &[u8]) -> &[u8] {
    let row = row.strip_suffix(b"\n").unwrap_or(row);
    row.strip_suffix(b"\r").unwrap_or(row)
}

/// The shard key of one row: `Ok(None)` for NULL, `Err` if the row has no such field.
pub fn key_field(spec: &CopySpec, row: &[u8], index: usize) -> Result<Option<String>, String> {
    let line = trim_line_end(row);
    let field = if spec.csv {
        csv_field(spec, line, index)
    } else {
        text_field(spec, line, index)
    };
    field.ok_or_else(|| format!("missing data for column {} of the COPY", index + 1))
}

fn text_field(spec: &CopySpec, line: &[u8], index: usize) -> Option<Option<String>> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < line.len() {
        if line[i] == b'\\' {
            i += 2;
            continue;
        }
        if line[i] == spec.delimiter {
            fields.push(&line[start..i]);
            start = i + 1;
        }
        i += 1;
    }
    fields.push(&line[start.min(line.len())..]);
    let raw = fields.get(index)?;
    if *raw == spec.null.as_bytes() {
        return Some(None);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut k = 0;
    while k < raw.len() {
        if raw[k] == b'\\' && k + 1 < raw.len() {
            k += 1;
            out.push(match raw[k] {
                b'b' => 8,
                b'f' => 12,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'v' => 11,
                other => other,
            });
        } else {
            out.push(raw[k]);
        }
        k += 1;
    }
    Some(Some(String::from_utf8_lossy(&out).into_owned()))
}

fn csv_field(spec: &CopySpec, line: &[u8], index: usize) -> Option<Option<String>> {
    let mut field = 0;
    let mut i = 0;
    loop {
        // One field starts at `i`.
        let mut value = Vec::new();
        let mut quoted = false;
        let start = i;
        while i < line.len() && line[i] != spec.delimiter {
            if line[i] == spec.quote {
                quoted = true;
                i += 1;
                while i < line.len() {
                    // An escape escapes the next character; when it is the quote itself,
                    // only a doubled quote is an escaped one.
                    let escapes = i + 1 < line.len()
                        && line[i] == spec.escape
                        && (spec.escape != spec.quote || line[i + 1] == spec.quote);
                    if escapes {
                        value.push(line[i + 1]);
                        i += 2;
                    } else if line[i] == spec.quote {
                        i += 1;
                        break;
                    } else {
                        value.push(line[i]);
                        i += 1;
                    }
                }
            } else {
                value.push(line[i]);
                i += 1;
            }
        }
        if field == index {
            let raw = &line[start..i];
            if !quoted && raw == spec.null.as_bytes() {
                return Some(None);
            }
            return Some(Some(String::from_utf8_lossy(&value).into_owned()));
        }
        if i >= line.len() {
            return None;
        }
        i += 1; // the delimiter
        field += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(csv: bool) -> Arc<CopySpec> {
        Arc::new(CopySpec {
            table: "t".into(),
            to: false,
            key: Some(0),
            csv,
            delimiter: if csv { b',' } else { b'\t' },
            quote: b'"',
            escape: b'"',
            header: false,
            null: if csv { String::new() } else { "\\N".into() },
        })
    }

    fn rows(spec: Arc<CopySpec>, chunks: &[&[u8]]) -> Vec<Bytes> {
        let mut r = Rows::new(spec);
        let mut out = Vec::new();
        for c in chunks {
            r.push(c);
            while let Some(row) = r.next_row() {
                out.push(row);
            }
        }
        out.extend(r.rest());
        out
    }

    #[test]
    fn text_rows_split_across_messages_and_escaped_newlines() {
        let got = rows(spec(false), &[b"1\ta\n2\tb", b"\\\nc\n3", b"\tz"]);
        assert_eq!(
            got,
            vec![
                Bytes::from_static(b"1\ta\n"),
                Bytes::from_static(b"2\tb\\\nc\n"),
                Bytes::from_static(b"3\tz"),
            ]
        );
    }

    #[test]
    fn csv_rows_keep_quoted_newlines() {
        let got = rows(spec(true), &[b"1,\"a\nb\"\n2,\"x\"\"", b"y\"\n"]);
        assert_eq!(
            got,
            vec![
                Bytes::from_static(b"1,\"a\nb\"\n"),
                Bytes::from_static(b"2,\"x\"\"y\"\n"),
            ]
        );
    }

    #[test]
    fn key_fields_in_both_formats() {
        let text = spec(false);
        assert_eq!(key_field(&text, b"42\tx\n", 0), Ok(Some("42".into())));
        assert_eq!(key_field(&text, b"x\t\\N\n", 1), Ok(None));
        assert_eq!(key_field(&text, b"a\\tb\tc\n", 0), Ok(Some("a\tb".into())));
        assert!(key_field(&text, b"1\n", 2).is_err());
        let csv = spec(true);
        assert_eq!(key_field(&csv, b"x,\"4,2\"\n", 1), Ok(Some("4,2".into())));
        assert_eq!(key_field(&csv, b"x,\n", 1), Ok(None));
        assert_eq!(key_field(&csv, b"x,\"\"\n", 1), Ok(Some(String::new())));
        assert_eq!(
            key_field(&csv, b"\"a\"\"b\",7\r\n", 0),
            Ok(Some("a\"b".into()))
        );
        assert_eq!(
            key_field(&csv, b"\"a\"\"b\",7\r\n", 1),
            Ok(Some("7".into()))
        );
        assert!(is_end_marker(b"\\.\n"));
    }
}
