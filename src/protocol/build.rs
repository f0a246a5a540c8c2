//! Builders for the messages the proxy synthesizes, appended to an output buffer.

use bytes::{BufMut, BytesMut};

use super::TxStatus;

/// Appends one message: `tag`, a length word patched after `body` wrote its bytes.
pub fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let len_at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - len_at) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

pub fn auth_ok(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(0));
}

pub fn auth_cleartext(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(3));
}

pub fn auth_md5(out: &mut BytesMut, salt: [u8; 4]) {
    message(out, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn auth_sasl(out: &mut BytesMut, mechanisms: &[&str]) {
    message(out, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            cstr(b, m.as_bytes());
        }
        b.put_u8(0);
    });
}

pub fn auth_sasl_continue(out: &mut BytesMut, data: &[u8]) {
    message(out, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn auth_sasl_final(out: &mut BytesMut, data: &[u8]) {
    message(out, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    message(out, b'S', |b| {
        cstr(b, name.as_bytes());
        cstr(b, value.as_bytes());
    });
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, secret: i32) {
    message(out, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: TxStatus) {
    message(out, b'Z', |b| b.put_u8(status.as_byte()));
}

pub fn parse_complete(out: &mut BytesMut) {
    message(out, b'1', |_| {});
}

pub fn close_complete(out: &mut BytesMut) {
    message(out, b'3', |_| {});
}

pub fn command_complete(out: &mut BytesMut, tag: &str) {
    message(out, b'C', |b| cstr(b, tag.as_bytes()));
}

/// Severity of a synthesized error or notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
    Notice,
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
            Severity::Warning => "WARNING",
        }
    }
}

/// An ErrorResponse (or NoticeResponse for a notice or warning) with a SQLSTATE.
pub fn error_response(out: &mut BytesMut, severity: Severity, code: &str, text: &str) {
    let tag = if matches!(severity, Severity::Notice | Severity::Warning) {
        b'N'
    } else {
        b'E'
    };
    message(out, tag, |b| {
        b.put_u8(b'S');
        cstr(b, severity.as_str().as_bytes());
        b.put_u8(b'V');
        cstr(b, severity.as_str().as_bytes());
        b.put_u8(b'C');
        cstr(b, code.as_bytes());
        b.put_u8(b'M');
        cstr(b, text.as_bytes());
        b.put_u8(0);
    });
}

/// A server's ErrorResponse (its body) passed on as FATAL, every other field as the server
/// wrote it: an error that ends the client's connection, such as a startup setting the server
/// refused.
pub fn fatal_from(out: &mut BytesMut, body: &[u8]) {
    message(out, b'E', |b| {
        let mut rest = body;
        while let Some((&kind, after)) = rest.split_first()
            && kind != 0
        {
            let end = after.iter().position(|&c| c == 0).unwrap_or(after.len());
            b.put_u8(kind);
            match kind {
                b'S' | b'V' => cstr(b, Severity::Fatal.as_str().as_bytes()),
                _ => cstr(b, &after[..end]),
            }
            rest = after.get(end + 1..).unwrap_or_default();
        }
        b.put_u8(0);
    });
}

// Frontend messages the proxy sends to servers on its own behalf.

/// A simple Query.
pub fn query(out: &mut BytesMut, sql: &str) {
    message(out, b'Q', |b| cstr(b, sql.as_bytes()));
}

/// A Parse of `sql` as statement `name`, with no parameter types given.
pub fn parse(out: &mut BytesMut, name: &str, sql: &str) {
    message(out, b'P', |b| {
        cstr(b, name.as_bytes());
        cstr(b, sql.as_bytes());
        b.put_i16(0);
    });
}

pub fn sync(out: &mut BytesMut) {
    message(out, b'S', |_| {});
}

pub fn terminate(out: &mut BytesMut) {
    message(out, b'X', |_| {});
}

/// A CancelRequest (no type byte).
pub fn cancel_request(out: &mut BytesMut, pid: i32, secret: i32) {
    out.put_i32(16);
    out.put_i32(super::code::CANCEL_REQUEST);
    out.put_i32(pid);
    out.put_i32(secret);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_patched() {
        let mut out = BytesMut::new();
        ready_for_query(&mut out, TxStatus::Idle);
        assert_eq!(&out[..], b"Z\0\0\0\x05I");
        out.clear();
        command_complete(&mut out, "SET");
        assert_eq!(&out[..], b"C\0\0\0\x08SET\0");
    }

    #[test]
    fn a_server_error_passes_on_as_fatal() {
        let mut out = BytesMut::new();
        fatal_from(&mut out, b"SERROR\0VERROR\0C22023\0Mbad\0Dwhy\0\0");
        assert_eq!(&out[5..], b"SFATAL\0VFATAL\0C22023\0Mbad\0Dwhy\0\0");
        assert_eq!(out.len(), 5 + out[5..].len());
        // A body cut short still makes a well-formed message.
        out.clear();
        fatal_from(&mut out, b"SERROR\0C2");
        assert_eq!(&out[5..], b"SFATAL\0C2\0\0");
    }
}
