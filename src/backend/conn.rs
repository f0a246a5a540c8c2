//! One connection to a Postgres server: connect, startup, authenticate, then raw frames.

use rustc_hash::FxHashSet;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::Error;
use crate::protocol::{self, FrameReader, TxStatus, build, decode, tag};

/// Server replies are trusted more than client input, but still bounded: a row can be large.
const MAX_SERVER_MESSAGE: usize = 1 << 30;

/// How the proxy logs in to a server.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    pub database: String,
}

/// A key that cancels the query running on one server connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelKey {
    /// Shared: the key is copied into the cancel registry on every checkout.
    pub addr: std::sync::Arc<str>,
    pub pid: i32,
    pub secret: i32,
}

/// An authenticated server connection with the state the relay keeps about it.
pub struct ServerConn {
    pub reader: FrameReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
    pub addr: String,
    pub key: CancelKey,
    /// ParameterStatus values reported at startup.
    pub params: Vec<(String, String)>,
    /// Proxy-owned prepared statements (by registry id) that exist on this server. Looked up
    /// on every Bind of a named statement: a fast hash, as the ids are the proxy's own.
    pub prepared: FxHashSet<u64>,
    /// Fingerprint of the session settings applied on this server (0 = server defaults).
    pub settings: u64,
    /// Transaction status from the last ReadyForQuery.
    pub status: TxStatus,
    /// Set when the relay lost track of the protocol state; the pool then discards it.
    pub broken: bool,
}

impl ServerConn {
    /// Opens a TCP connection, runs startup and authentication, reads until ReadyForQuery.
    ///
    /// # Errors
    /// Connection refused or timed out (`08001`), authentication or startup failures.
    pub async fn connect(
        addr: &str,
        creds: &Credentials,
        timeout: Duration,
    ) -> Result<ServerConn, Error> {
        match tokio::time::timeout(timeout, Self::connect_inner(addr, creds)).await {
            Ok(result) => result,
            Err(_) => Err(Error::Connect {
                addr: addr.to_string(),
                reason: format!("timed out after {} ms", timeout.as_millis()),
            }),
        }
    }

    async fn connect_inner(addr: &str, creds: &Credentials) -> Result<ServerConn, Error> {
        let stream = TcpStream::connect(addr).await.map_err(|e| Error::Connect {
            addr: addr.to_string(),
            reason: e.to_string(),
        })?;
        // Latency matters more than packet count: replies are already batched per round trip.
        stream.set_nodelay(true).map_err(|e| Error::io(addr, e))?;
        let (read, mut writer) = stream.into_split();
        let mut reader = FrameReader::new(read, MAX_SERVER_MESSAGE);

        let mut out = BytesMut::new();
        startup_message(&mut out, creds);
        writer
            .write_all(&out)
            .await
            .map_err(|e| Error::io(addr, e))?;

        authenticate(addr, creds, &mut reader, &mut writer).await?;

        let mut params = Vec::new();
        let mut key = None;
        loop {
            let frame = reader.next().await.map_err(|e| Error::protocol(addr, e))?;
            match frame.tag() {
                tag::PARAMETER_STATUS => params.push(
                    decode::parameter_status(frame.body()).map_err(|e| Error::protocol(addr, e))?,
                ),
                tag::BACKEND_KEY_DATA => {
                    key = Some(
                        decode::backend_key_data(frame.body())
                            .map_err(|e| Error::protocol(addr, e))?,
                    )
                }
                tag::READY_FOR_QUERY => break,
                tag::ERROR_RESPONSE => return Err(server_error(addr, frame.body())),
                _ => {} // NoticeResponse and the like: nothing to do during startup
            }
        }
        let (pid, secret) = key.unwrap_or((0, 0));
        Ok(ServerConn {
            reader,
            writer,
            addr: addr.to_string(),
            key: CancelKey {
                addr: std::sync::Arc::from(addr),
                pid,
                secret,
            },
            params,
            prepared: FxHashSet::default(),
            settings: 0,
            status: TxStatus::Idle,
            broken: false,
        })
    }

    /// True if the connection can be handed to a client: idle, in sync, and with nothing unread
    /// on the socket. A server that terminated the backend (pg_terminate_backend, restart) has
    /// left a FATAL error or EOF there; checking costs one non-blocking read, no round trip.
    pub fn is_reusable(&mut self) -> bool {
        if self.broken || self.status != TxStatus::Idle || self.reader.buffered() > 0 {
            return false;
        }
        let mut probe = [0u8; 1];
        match self.reader.get_mut().try_read(&mut probe) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            _ => false, // data, EOF or an error: this connection is done
        }
    }

    /// Postgres' verdict on `sql` as one statement, without running it: the ErrorResponse of
    /// a Parse of it, if the server refused it. The Parse runs in a transaction of its own that
    /// is rolled back in the same round trip, after `settings` (statements setting the session
    /// up as its client's, which the rollback undoes too), with lock and statement timeouts so
    /// short that analysing a statement that parses cannot wait on anyone's locks: a syntax
    /// error is found before any table is looked at.
    ///
    /// # Errors
    /// The server went away or answered out of protocol; the connection is marked broken.
    pub async fn parse_check(&mut self, sql: &str, settings: &str) -> Result<Option<Bytes>, Error> {
        let mut wire = BytesMut::new();
        build::query(
            &mut wire,
            &format!(
                "BEGIN;{settings}\n;SET LOCAL lock_timeout = 1;SET LOCAL statement_timeout = 1000"
            ),
        );
        build::parse(&mut wire, "", sql);
        build::sync(&mut wire);
        build::query(&mut wire, "ROLLBACK");
        self.send(&wire).await?;
        // Three ReadyForQuery: the setup's, the Sync's (the Parse answers before it), the
        // rollback's.
        let (mut ready, mut error) = (0, None);
        while ready < 3 {
            let frame = self.next_frame().await?;
            match frame.tag() {
                tag::ERROR_RESPONSE if ready == 1 => error = Some(frame.into_bytes()),
                tag::READY_FOR_QUERY => {
                    ready += 1;
                    match decode::ready_for_query(frame.body()) {
                        Ok(status) => self.status = status,
                        Err(e) => {
                            self.broken = true;
                            return Err(Error::protocol(&self.addr, e));
                        }
                    }
                }
                _ => {} // the setup's replies, notices, the rollback's
            }
        }
        Ok(error)
    }

    /// The next message from the server; a read that fails marks the connection broken.
    async fn next_frame(&mut self) -> Result<crate::protocol::Frame, Error> {
        match self.reader.next().await {
            Ok(frame) => Ok(frame),
            Err(e) => {
                self.broken = true;
                Err(Error::protocol(&self.addr, e))
            }
        }
    }

    /// Runs `sql` as one simple Query and returns the text columns of the last row it
    /// returned, or the body of the server's ErrorResponse if a statement failed.
    ///
    /// # Errors
    /// The server went away or answered out of protocol; the connection is marked broken.
    pub async fn query_row(
        &mut self,
        sql: &str,
    ) -> Result<Result<Vec<Option<String>>, Bytes>, Error> {
        let mut wire = BytesMut::new();
        build::query(&mut wire, sql);
        self.send(&wire).await?;
        let (mut row, mut error) = (Vec::new(), None);
        loop {
            let frame = self.next_frame().await?;
            match frame.tag() {
                tag::DATA_ROW => match decode::data_row_text(frame.body()) {
                    Ok(columns) => row = columns,
                    Err(e) => {
                        self.broken = true;
                        return Err(Error::protocol(&self.addr, e));
                    }
                },
                tag::ERROR_RESPONSE if error.is_none() => {
                    error = Some(frame.into_bytes().slice(5..))
                }
                tag::READY_FOR_QUERY => {
                    match decode::ready_for_query(frame.body()) {
                        Ok(status) => self.status = status,
                        Err(e) => {
                            self.broken = true;
                            return Err(Error::protocol(&self.addr, e));
                        }
                    }
                    return Ok(error.map_or(Ok(row), Err));
                }
                _ => {} // descriptions, completions, notices, ParameterStatus
            }
        }
    }

    /// Writes bytes to the server.
    ///
    /// # Errors
    /// The server went away; the connection is marked broken.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if let Err(e) = write_all(&mut self.writer, bytes).await {
            self.broken = true;
            return Err(Error::io(&self.addr, e));
        }
        Ok(())
    }

    /// Writes what the socket takes of `bytes` now, without waiting: how much. A request
    /// almost always fits at once, and the caller then needs no future; it sends the rest, if
    /// any, with [`ServerConn::send`].
    ///
    /// # Errors
    /// The server went away; the connection is marked broken.
    pub fn send_now(&mut self, bytes: &[u8]) -> Result<usize, Error> {
        match self.writer.try_write(bytes) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => {
                self.broken = true;
                Err(Error::io(&self.addr, e))
            }
        }
    }
}

/// Writes all of `bytes` to a socket (client or server side). A request or a reply almost
/// always fits the socket's buffer at once: the first attempt is a plain non-blocking write,
/// without the future and task-budget bookkeeping of `write_all`, which only sends the rest.
///
/// # Errors
/// The peer went away.
pub async fn write_all(writer: &mut OwnedWriteHalf, bytes: &[u8]) -> std::io::Result<()> {
    let sent = match writer.try_write(bytes) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if sent < bytes.len() {
        writer.write_all(&bytes[sent..]).await?;
    }
    Ok(())
}

fn startup_message(out: &mut BytesMut, creds: &Credentials) {
    let len_at = out.len();
    out.put_i32(0);
    out.put_i32(protocol::code::PROTOCOL_3);
    for (name, value) in [
        ("user", creds.user.as_str()),
        ("database", creds.database.as_str()),
    ] {
        build::cstr(out, name.as_bytes());
        build::cstr(out, value.as_bytes());
    }
    out.put_u8(0);
    let len = (out.len() - len_at) as i32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn password_message(out: &mut BytesMut, data: &[u8]) {
    build::message(out, tag::PASSWORD, |b| b.put_slice(data));
}

fn server_error(addr: &str, body: &[u8]) -> Error {
    let fields = decode::error_fields(body).unwrap_or_default();
    Error::Server {
        addr: addr.to_string(),
        code: fields.code,
        message: fields.message,
    }
}

/// Answers the server's authentication requests: cleartext, md5 or SCRAM-SHA-256.
async fn authenticate(
    addr: &str,
    creds: &Credentials,
    reader: &mut FrameReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
) -> Result<(), Error> {
    let mut scram: Option<ScramSha256> = None;
    loop {
        let frame = reader.next().await.map_err(|e| Error::protocol(addr, e))?;
        match frame.tag() {
            tag::AUTH => {}
            tag::ERROR_RESPONSE => return Err(server_error(addr, frame.body())),
            other => {
                return Err(Error::Protocol {
                    addr: addr.to_string(),
                    reason: format!(
                        "unexpected message {:?} during authentication",
                        other as char
                    ),
                });
            }
        }
        let (code, data) =
            decode::auth_request(frame.body()).map_err(|e| Error::protocol(addr, e))?;
        let mut out = BytesMut::new();
        match code {
            0 => return Ok(()),
            3 => {
                let mut pw = creds.password.as_bytes().to_vec();
                pw.push(0);
                password_message(&mut out, &pw);
            }
            5 => {
                let salt: [u8; 4] = data.try_into().map_err(|_| Error::Protocol {
                    addr: addr.to_string(),
                    reason: "malformed md5 salt".into(),
                })?;
                let mut hash = postgres_protocol::authentication::md5_hash(
                    creds.user.as_bytes(),
                    creds.password.as_bytes(),
                    salt,
                )
                .into_bytes();
                hash.push(0);
                password_message(&mut out, &hash);
            }
            10 => {
                let offers_scram = data.split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256");
                if !offers_scram {
                    return Err(Error::Auth {
                        addr: addr.to_string(),
                        reason: "server offers no supported SASL mechanism".into(),
                    });
                }
                let client =
                    ScramSha256::new(creds.password.as_bytes(), ChannelBinding::unsupported());
                build::message(&mut out, tag::PASSWORD, |b| {
                    build::cstr(b, b"SCRAM-SHA-256");
                    b.put_i32(client.message().len() as i32);
                    b.put_slice(client.message());
                });
                scram = Some(client);
            }
            11 | 12 => {
                let Some(client) = scram.as_mut() else {
                    return Err(Error::Protocol {
                        addr: addr.to_string(),
                        reason: "SASL message without SASL start".into(),
                    });
                };
                let step = if code == 11 {
                    client.update(data)
                } else {
                    client.finish(data)
                };
                step.map_err(|e| Error::Auth {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                })?;
                if code == 11 {
                    password_message(&mut out, client.message());
                }
            }
            other => {
                return Err(Error::Auth {
                    addr: addr.to_string(),
                    reason: format!("unsupported authentication method (code {other})"),
                });
            }
        }
        if !out.is_empty() {
            writer
                .write_all(&out)
                .await
                .map_err(|e| Error::io(addr, e))?;
        }
    }
}
