//! Decoders for the message bodies the proxy must read. They borrow from the frame: no copies.

use super::{Error, TxStatus};

/// SQL text as sent: borrowed when it is valid UTF-8, the common case, which `from_utf8` checks
/// faster than `from_utf8_lossy` does; otherwise invalid bytes become U+FFFD, as with the latter.
pub fn text(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

/// Splits a NUL-terminated string off the front of `buf`.
pub fn cstr<'a>(buf: &'a [u8], what: &'static str) -> Result<(&'a [u8], &'a [u8]), Error> {
    // Names are mostly empty; query texts are long enough for memchr's wide compares to pay.
    let end = match buf.first() {
        Some(0) => 0,
        _ => memchr::memchr(0, buf).ok_or(Error::Malformed(what))?,
    };
    Ok((&buf[..end], &buf[end + 1..]))
}

fn utf8<'a>(bytes: &'a [u8], what: &'static str) -> Result<&'a str, Error> {
    std::str::from_utf8(bytes).map_err(|_| Error::Malformed(what))
}

/// A simple Query's SQL text: the whole body but its final NUL. Bytes after an earlier NUL
/// make it malformed, as on Postgres, rather than a query the proxy could plan by its first
/// part.
pub fn query(body: &[u8]) -> Result<&[u8], Error> {
    match cstr(body, "Query")? {
        (text, []) => Ok(text),
        _ => Err(Error::Malformed("Query")),
    }
}

/// Parse: statement name, SQL, and the parameter-type section left as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    /// `i16` count and the parameter type OIDs, as sent.
    pub param_types: &'a [u8],
}

pub fn parse(body: &[u8]) -> Result<Parse<'_>, Error> {
    let (name, rest) = cstr(body, "Parse")?;
    let (query, param_types) = cstr(rest, "Parse")?;
    if param_types.len() < 2 {
        return Err(Error::Malformed("Parse"));
    }
    let n = i16::from_be_bytes([param_types[0], param_types[1]]);
    if n < 0 || param_types.len() != 2 + 4 * n as usize {
        return Err(Error::Malformed("Parse"));
    }
    Ok(Parse {
        name,
        query,
        param_types,
    })
}

/// Bind: portal and statement names; formats, values and result formats left as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    pub rest: &'a [u8],
}

pub fn bind(body: &[u8]) -> Result<Bind<'_>, Error> {
    let (portal, rest) = cstr(body, "Bind")?;
    let (statement, rest) = cstr(rest, "Bind")?;
    Ok(Bind {
        portal,
        statement,
        rest,
    })
}

/// Splits a Bind's `rest` into its parameter part (formats and values, as sent) and its
/// result-column format codes.
pub fn bind_result_formats(rest: &[u8]) -> Result<(&[u8], Vec<i16>), Error> {
    let bad = Error::Malformed("Bind");
    let i16_at = |at: usize| -> Result<i16, Error> {
        rest.get(at..at + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or(Error::Malformed("Bind"))
    };
    let nformats = i16_at(0)?;
    if nformats < 0 {
        return Err(bad);
    }
    let mut at = 2 + 2 * nformats as usize;
    let nparams = i16_at(at)?;
    if nparams < 0 {
        return Err(bad);
    }
    at += 2;
    for _ in 0..nparams {
        let len = rest
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or(Error::Malformed("Bind"))?;
        at += 4;
        if len > 0 {
            at += len as usize;
        }
    }
    let params = rest.get(..at).ok_or(Error::Malformed("Bind"))?;
    let nresults = i16_at(at)?;
    if nresults < 0 || rest.len() != at + 2 + 2 * nresults as usize {
        return Err(bad);
    }
    let formats = (0..nresults as usize)
        .map(|k| i16_at(at + 2 + 2 * k))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((params, formats))
}

/// A Bind's parameters: format codes and values (`None` for NULL).
pub struct BindParams<'a> {
    pub formats: Vec<i16>,
    pub values: Vec<Option<&'a [u8]>>,
}

/// The parameter part of a Bind (as split off by [`bind_result_formats`]).
pub fn bind_params(params: &[u8]) -> Result<BindParams<'_>, Error> {
    let bad = || Error::Malformed("Bind");
    let i16_at = |at: usize| -> Result<i16, Error> {
        params
            .get(at..at + 2)
            .map(|b| i16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(bad)
    };
    let nformats = i16_at(0)?.max(0) as usize;
    let formats = (0..nformats)
        .map(|k| i16_at(2 + 2 * k))
        .collect::<Result<Vec<_>, _>>()?;
    let mut at = 2 + 2 * nformats;
    let nvalues = i16_at(at)?.max(0) as usize;
    at += 2;
    let mut values = Vec::with_capacity(nvalues);
    for _ in 0..nvalues {
        let len = params
            .get(at..at + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(bad)?;
        at += 4;
        if len < 0 {
            values.push(None);
        } else {
            let end = at + len as usize;
            values.push(Some(params.get(at..end).ok_or_else(bad)?));
            at = end;
        }
    }
    Ok(BindParams { formats, values })
}

/// Describe or Close: `'S'` (statement) or `'P'` (portal), and the name.
pub fn target<'a>(body: &'a [u8], what: &'static str) -> Result<(u8, &'a [u8]), Error> {
    let (&kind, rest) = body.split_first().ok_or(Error::Malformed(what))?;
    if kind != b'S' && kind != b'P' {
        return Err(Error::Malformed(what));
    }
    let (name, rest) = cstr(rest, what)?;
    if !rest.is_empty() {
        return Err(Error::Malformed(what));
    }
    Ok((kind, name))
}

pub fn ready_for_query(body: &[u8]) -> Result<TxStatus, Error> {
    match body {
        [b] => TxStatus::from_byte(*b).ok_or(Error::Malformed("ReadyForQuery")),
        _ => Err(Error::Malformed("ReadyForQuery")),
    }
}

/// CommandComplete's tag, e.g. `SELECT 1`, `COMMIT`.
pub fn command_complete(body: &[u8]) -> Result<&str, Error> {
    utf8(cstr(body, "CommandComplete")?.0, "CommandComplete")
}

/// The fields of an ErrorResponse or NoticeResponse the proxy looks at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
    /// The server routine that raised it (`R`): unlike the message, never translated.
    pub routine: String,
}

pub fn error_fields(body: &[u8]) -> Result<ErrorFields, Error> {
    let mut fields = ErrorFields::default();
    let mut rest = body;
    loop {
        let (&kind, after) = rest
            .split_first()
            .ok_or(Error::Malformed("ErrorResponse"))?;
        if kind == 0 {
            return Ok(fields);
        }
        let (value, after) = cstr(after, "ErrorResponse")?;
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'S' => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            b'R' => fields.routine = value,
            _ => {}
        }
        rest = after;
    }
}

/// A DataRow's columns as text (None for NULL), for rows the proxy asks for itself.
pub fn data_row_text(body: &[u8]) -> Result<Vec<Option<String>>, Error> {
    let bad = || Error::Malformed("DataRow");
    let count = body.get(..2).ok_or_else(bad)?;
    let count = i16::from_be_bytes([count[0], count[1]]);
    let mut rest = &body[2..];
    let mut columns = Vec::with_capacity(usize::try_from(count).map_err(|_| bad())?);
    for _ in 0..count {
        let (len, after) = rest.split_at_checked(4).ok_or_else(bad)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        rest = after;
        if len < 0 {
            columns.push(None);
            continue;
        }
        let (value, after) = rest.split_at_checked(len as usize).ok_or_else(bad)?;
        columns.push(Some(String::from_utf8_lossy(value).into_owned()));
        rest = after;
    }
    Ok(columns)
}

/// ParameterStatus: name and value.
pub fn parameter_status(body: &[u8]) -> Result<(String, String), Error> {
    let (name, rest) = cstr(body, "ParameterStatus")?;
    let (value, _) = cstr(rest, "ParameterStatus")?;
    Ok((
        utf8(name, "ParameterStatus")?.to_string(),
        utf8(value, "ParameterStatus")?.to_string(),
    ))
}

/// BackendKeyData: process id and secret key.
pub fn backend_key_data(body: &[u8]) -> Result<(i32, i32), Error> {
    match body {
        [a, b, c, d, e, f, g, h] => Ok((
            i32::from_be_bytes([*a, *b, *c, *d]),
            i32::from_be_bytes([*e, *f, *g, *h]),
        )),
        _ => Err(Error::Malformed("BackendKeyData")),
    }
}

/// What a client sent first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// Protocol 3.0 startup with its `name=value` parameters.
    Params(Vec<(String, String)>),
    /// A protocol version the proxy does not speak.
    Unsupported(i32),
}

/// Decodes the body of a startup-phase message (after the length word).
pub fn startup(body: &[u8]) -> Result<Startup, Error> {
    if body.len() < 4 {
        return Err(Error::Malformed("startup"));
    }
    let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        super::code::SSL_REQUEST => Ok(Startup::Ssl),
        super::code::GSSENC_REQUEST => Ok(Startup::GssEnc),
        super::code::CANCEL_REQUEST => match rest {
            [a, b, c, d, e, f, g, h] => Ok(Startup::Cancel {
                pid: i32::from_be_bytes([*a, *b, *c, *d]),
                secret: i32::from_be_bytes([*e, *f, *g, *h]),
            }),
            _ => Err(Error::Malformed("CancelRequest")),
        },
        super::code::PROTOCOL_3 => {
            let mut params = Vec::new();
            let mut rest = rest;
            loop {
                let (name, after) = cstr(rest, "startup")?;
                if name.is_empty() {
                    break;
                }
                let (value, after) = cstr(after, "startup")?;
                params.push((
                    utf8(name, "startup")?.to_string(),
                    utf8(value, "startup")?.to_string(),
                ));
                rest = after;
            }
            Ok(Startup::Params(params))
        }
        other => Ok(Startup::Unsupported(other)),
    }
}

/// An authentication request from a server: its code and the data after it.
pub fn auth_request(body: &[u8]) -> Result<(i32, &[u8]), Error> {
    if body.len() < 4 {
        return Err(Error::Malformed("Authentication"));
    }
    Ok((
        i32::from_be_bytes([body[0], body[1], body[2], body[3]]),
        &body[4..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_bind_split() {
        let p = parse(b"s1\0SELECT $1\0\0\x01\0\0\0\x17").expect("parse");
        assert_eq!(p.name, b"s1");
        assert_eq!(p.query, b"SELECT $1");
        assert_eq!(p.param_types, b"\0\x01\0\0\0\x17");
        assert!(parse(b"s1\0SELECT\0\0\x05").is_err());
        assert!(parse(b"s1\0SELECT").is_err());

        let b = bind(b"\0s1\0\0\0\0\0\0\0").expect("bind");
        assert_eq!(b.portal, b"");
        assert_eq!(b.statement, b"s1");
        assert!(bind(b"p").is_err());
    }

    #[test]
    fn query_text_is_the_whole_body() {
        assert_eq!(query(b"SELECT 1\0").expect("query"), b"SELECT 1");
        assert_eq!(query(b"\0").expect("empty query"), b"");
        assert!(query(b"SELECT 1").is_err());
        assert!(query(b"SELECT 1\0; DROP TABLE t\0").is_err());
        assert!(query(b"SELECT 1\0\0").is_err());
    }

    #[test]
    fn startup_variants() {
        let mut body = 196_608i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0app\0database\0db\0\0");
        assert_eq!(
            startup(&body).expect("startup"),
            Startup::Params(vec![
                ("user".into(), "app".into()),
                ("database".into(), "db".into())
            ])
        );
        assert_eq!(
            startup(&80_877_103i32.to_be_bytes()).expect("ssl"),
            Startup::Ssl
        );
        assert!(startup(&[1, 2]).is_err());
        let mut bad = 196_608i32.to_be_bytes().to_vec();
        bad.extend_from_slice(b"user\0app");
        assert!(startup(&bad).is_err());
    }

    #[test]
    fn data_rows_read_as_text() {
        let row = b"\0\x02\0\0\0\x03UTC\xff\xff\xff\xff";
        assert_eq!(
            data_row_text(row).expect("row"),
            vec![Some("UTC".to_string()), None]
        );
        assert!(data_row_text(b"\0\x01\0\0\0\x09UTC").is_err());
        assert!(data_row_text(b"\0").is_err());
    }

    #[test]
    fn error_fields_read() {
        let f = error_fields(b"SERROR\0C42601\0Msyntax\0\0").expect("fields");
        assert_eq!(f.code, "42601");
        assert_eq!(f.message, "syntax");
        assert!(error_fields(b"SERROR").is_err());
    }
}
