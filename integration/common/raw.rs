//! Raw protocol messages for tests that must control exactly what a client sends (pipelines,
//! batches, message order) and see every reply.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub s: TcpStream,
}

/// One backend message: tag and body.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

fn i16_at(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Msg {
    /// SQLSTATE of an ErrorResponse.
    pub fn code(&self) -> Option<String> {
        if self.tag != b'E' {
            return None;
        }
        let mut fields = self.body.split(|&b| b == 0);
        fields.find_map(|f| {
            f.strip_prefix(b"C")
                .map(|c| String::from_utf8_lossy(c).into_owned())
        })
    }

    /// Field `key` of an ErrorResponse or NoticeResponse (`b'M'` the message, `b'P'` the
    /// position).
    pub fn field(&self, key: u8) -> Option<String> {
        if !matches!(self.tag, b'E' | b'N') {
            return None;
        }
        self.body
            .split(|&b| b == 0)
            .find_map(|f| f.strip_prefix(&[key]))
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// First column of a DataRow, as text.
    pub fn col0(&self) -> Option<String> {
        let cols = self.cols()?;
        cols.first()?
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// The columns of a DataRow (None for NULL).
    pub fn cols(&self) -> Option<Vec<Option<Vec<u8>>>> {
        if self.tag != b'D' {
            return None;
        }
        let n = i16_at(&self.body, 0);
        let mut at = 2;
        let mut out = Vec::new();
        for _ in 0..n {
            let len = i32_at(&self.body, at);
            at += 4;
            if len < 0 {
                out.push(None);
            } else {
                let len = len as usize;
                out.push(Some(self.body[at..at + len].to_vec()));
                at += len;
            }
        }
        Some(out)
    }

    /// The columns of a text DataRow joined with `|`.
    pub fn text(&self) -> Option<String> {
        self.cols().map(|cols| {
            cols.iter()
                .map(|c| match c {
                    Some(b) => String::from_utf8_lossy(b).into_owned(),
                    None => "NULL".into(),
                })
                .collect::<Vec<_>>()
                .join("|")
        })
    }

    /// The fields of a RowDescription: (name, type oid, format).
    pub fn fields(&self) -> Option<Vec<(String, u32, i16)>> {
        if self.tag != b'T' {
            return None;
        }
        let n = i16_at(&self.body, 0);
        let mut at = 2;
        let mut out = Vec::new();
        for _ in 0..n {
            let end = at + self.body[at..].iter().position(|&b| b == 0)?;
            let name = String::from_utf8_lossy(&self.body[at..end]).into_owned();
            at = end + 1 + 4 + 2;
            let oid = i32_at(&self.body, at) as u32;
            at += 4 + 2 + 4;
            let format = i16_at(&self.body, at);
            at += 2;
            out.push((name, oid, format));
        }
        Some(out)
    }

    /// The parameter types of a ParameterDescription.
    pub fn params(&self) -> Option<Vec<u32>> {
        if self.tag != b't' {
            return None;
        }
        let n = i16_at(&self.body, 0);
        Some(
            (0..n as usize)
                .map(|k| i32_at(&self.body, 2 + 4 * k) as u32)
                .collect(),
        )
    }
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

pub fn parse(name: &str, sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&0i16.to_be_bytes());
    msg(b'P', &b)
}

/// Bind with text-format parameters (None is NULL) and the given result formats.
pub fn bind_fmt(portal: &str, stmt: &str, params: &[Option<&str>], results: &[i16]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, stmt);
    b.extend_from_slice(&0i16.to_be_bytes());
    b.extend_from_slice(&(params.len() as i16).to_be_bytes());
    for p in params {
        match p {
            Some(p) => {
                b.extend_from_slice(&(p.len() as i32).to_be_bytes());
                b.extend_from_slice(p.as_bytes());
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    b.extend_from_slice(&(results.len() as i16).to_be_bytes());
    for f in results {
        b.extend_from_slice(&f.to_be_bytes());
    }
    msg(b'B', &b)
}

/// Bind with text-format parameters and text results.
pub fn bind(portal: &str, stmt: &str, params: &[&str]) -> Vec<u8> {
    let params: Vec<Option<&str>> = params.iter().map(|p| Some(*p)).collect();
    bind_fmt(portal, stmt, &params, &[])
}

pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    msg(b'D', &b)
}

pub fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    msg(b'C', &b)
}

pub fn copy_data(data: &[u8]) -> Vec<u8> {
    msg(b'd', data)
}

pub fn copy_done() -> Vec<u8> {
    msg(b'c', &[])
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&max_rows.to_be_bytes());
    msg(b'E', &b)
}

pub fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

pub fn flush() -> Vec<u8> {
    msg(b'H', &[])
}

pub fn terminate() -> Vec<u8> {
    msg(b'X', &[])
}

/// A statement through the extended protocol, unnamed, without parameters: Parse, Bind,
/// Execute, Sync.
pub fn extended(sql: &str) -> Vec<u8> {
    extended_then(sql, sync())
}

/// As [`extended`], ended by Flush rather than Sync: the server stays in an implicit
/// transaction.
pub fn flushed(sql: &str) -> Vec<u8> {
    extended_then(sql, flush())
}

fn extended_then(sql: &str, end: Vec<u8>) -> Vec<u8> {
    [parse("", sql), bind("", "", &[]), execute("", 0), end].concat()
}

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    msg(b'Q', &b)
}

impl Raw {
    /// Logs in as app/app with SCRAM (the proxy's default).
    pub async fn login(port: u16) -> Raw {
        match Raw::login_with(port, &[]).await {
            Ok((raw, _)) => raw,
            Err(e) => panic!("login failed: {}", String::from_utf8_lossy(&e.body)),
        }
    }

    /// Logs in as app/app with SCRAM and startup parameters `params` besides the user and
    /// database: the session and the ParameterStatus messages it got, or the ErrorResponse
    /// that refused it.
    pub async fn login_with(port: u16, params: &[(&str, &str)]) -> Result<(Raw, Vec<Msg>), Msg> {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let mut body = 196_608i32.to_be_bytes().to_vec();
        for (name, value) in [("user", "app"), ("database", "app")].iter().chain(params) {
            for part in [name, value] {
                cstr(&mut body, part);
            }
        }
        body.push(0);
        let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        let mut raw = Raw { s };
        raw.send(&packet).await;
        let mut scram = ScramSha256::new(b"app", ChannelBinding::unsupported());
        let mut reported = Vec::new();
        loop {
            let m = raw.read().await;
            let code = m
                .body
                .get(..4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            match (m.tag, code) {
                (b'R', Some(10)) => {
                    let first = scram.message().to_vec();
                    let mut b = Vec::new();
                    cstr(&mut b, "SCRAM-SHA-256");
                    b.extend_from_slice(&(first.len() as i32).to_be_bytes());
                    b.extend_from_slice(&first);
                    raw.send(&msg(b'p', &b)).await;
                }
                (b'R', Some(11)) => {
                    scram.update(&m.body[4..]).expect("server first");
                    let next = scram.message().to_vec();
                    raw.send(&msg(b'p', &next)).await;
                }
                (b'R', Some(12)) => scram.finish(&m.body[4..]).expect("server final"),
                (b'S', _) => reported.push(m),
                (b'Z', _) => return Ok((raw, reported)),
                (b'E', _) => return Err(m),
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write");
    }

    pub async fn read(&mut self) -> Msg {
        let mut head = [0u8; 5];
        self.s.read_exact(&mut head).await.expect("message header");
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).await.expect("message body");
        Msg { tag: head[0], body }
    }

    /// Reads messages up to and including the next CommandComplete or ErrorResponse: the
    /// reply to a batch ended by Flush, which has no ReadyForQuery.
    pub async fn until_complete(&mut self) -> Vec<Msg> {
        let mut all = Vec::new();
        loop {
            let m = self.read().await;
            let done = matches!(m.tag, b'C' | b'E');
            all.push(m);
            if done {
                return all;
            }
        }
    }

    /// Reads messages up to and including the next ReadyForQuery.
    /// Sends each step and reads its reply up to ReadyForQuery: the replies' summaries.
    pub async fn transcript(&mut self, steps: &[Vec<u8>]) -> Vec<String> {
        let mut replies = Vec::new();
        for step in steps {
            self.send(step).await;
            replies.push(summary(&self.until_ready().await));
        }
        replies
    }

    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut all = Vec::new();
        loop {
            let m = self.read().await;
            let done = m.tag == b'Z';
            all.push(m);
            if done {
                return all;
            }
        }
    }
}

/// The tags of a reply, as a string ("12DDCZ"), with runs of DataRows kept.
/// One reply in a line: its tags, the transaction status its ReadyForQuery reports, the
/// SQLSTATE of its error and the first column of its first row (empty where there is none).
pub fn summary(msgs: &[Msg]) -> String {
    let code = msgs.iter().find_map(Msg::code).unwrap_or_default();
    let value = msgs.iter().find_map(Msg::col0).unwrap_or_default();
    let status = msgs.last().map_or('-', |z| char::from(z.body[0]));
    format!("{} {status} {code}{value}", tags(msgs))
}

pub fn tags(msgs: &[Msg]) -> String {
    msgs.iter().map(|m| m.tag as char).collect()
}

/// The shape of a reply with the text of its errors, for failure messages.
pub fn explain(msgs: &[Msg]) -> String {
    let errors: Vec<String> = msgs
        .iter()
        .filter(|m| m.tag == b'E')
        .map(|m| {
            let field = |k: u8| m.field(k).unwrap_or_default();
            format!("{} {}", field(b'C'), field(b'M'))
        })
        .collect();
    if errors.is_empty() {
        shape(msgs)
    } else {
        format!("{} {errors:?}", shape(msgs))
    }
}

/// The tags with each run of DataRows collapsed to `D<n>` ("12D3CZ").
pub fn shape(msgs: &[Msg]) -> String {
    let mut out = String::new();
    let mut run = 0;
    for m in msgs {
        if m.tag == b'D' {
            run += 1;
            continue;
        }
        if run > 0 {
            out.push_str(&format!("D{run}"));
            run = 0;
        }
        out.push(m.tag as char);
    }
    if run > 0 {
        out.push_str(&format!("D{run}"));
    }
    out
}
