//! The client side: startup (SSL/GSS refusal, cancel requests), authentication, then the relay
//! session in [`session`].

pub mod auth;
pub mod copy;
pub mod session;
pub mod settings;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::AuthMethod;
use crate::protocol::build::{self, Severity};
use crate::protocol::decode::{self, Startup};
use crate::protocol::{self, FrameReader, TxStatus, tag};
use crate::server::Shared;
use auth::ScramExchange;
use settings::Settings;

/// Startup and authentication must finish within this time, as Postgres' authentication_timeout.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a client could not get a session: the client has already been told (or is gone).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("client: {0}")]
    Client(#[from] protocol::Error),
    #[error("client write: {0}")]
    Write(#[from] std::io::Error),
    #[error("refused: {0}")]
    Refused(String),
}

/// Serves one client connection from its first byte to its last.
pub async fn serve_client(stream: TcpStream, shared: Arc<Shared>, shutdown: CancellationToken) {
    let (read, write) = stream.into_split();
    let mut reader = FrameReader::new(read, shared.config.limits.max_message_size);
    let mut writer = write;
    let started = tokio::time::timeout(
        STARTUP_TIMEOUT,
        handshake(&mut reader, &mut writer, &shared),
    )
    .await;
    let login = match started {
        Ok(Ok(Some(login))) => login,
        Ok(Ok(None)) => return, // cancel request, or SSL probe followed by a hang-up
        Ok(Err(e)) => {
            debug!(cause = %e, "startup failed");
            return;
        }
        Err(_) => {
            let mut out = BytesMut::new();
            build::error_response(
                &mut out,
                Severity::Fatal,
                "08P01",
                "canceling authentication due to timeout",
            );
            let _ = writer.write_all(&out).await;
            return;
        }
    };
    info!(user = %login.user, "client logged in");
    let session = session::Session::new(shared.clone(), reader, writer, login);
    session.run(shutdown).await;
}

/// Tells a client it cannot be served, then closes.
pub async fn refuse(mut stream: TcpStream, code: &str, message: &str) {
    let mut out = BytesMut::new();
    build::error_response(&mut out, Severity::Fatal, code, message);
    let _ = stream.write_all(&out).await;
}

/// A client that has logged in.
pub struct Login {
    pub user: String,
    pub settings: Settings,
    /// The ParameterStatus values the client got at login: its session-start values.
    pub status: Vec<(String, String)>,
    /// The client's BackendKeyData and where a cancel for it goes; unregistered on drop.
    pub cancel: crate::server::CancelEntry,
}

async fn fatal(
    writer: &mut OwnedWriteHalf,
    code: &str,
    message: &str,
) -> Result<Option<Login>, Error> {
    let mut out = BytesMut::new();
    build::error_response(&mut out, Severity::Fatal, code, message);
    writer.write_all(&out).await?;
    Err(Error::Refused(message.to_string()))
}

/// Startup packet, authentication, ParameterStatus, BackendKeyData, ReadyForQuery.
/// Returns `None` for connections that only carried a CancelRequest.
async fn handshake(
    reader: &mut FrameReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
    shared: &Arc<Shared>,
) -> Result<Option<Login>, Error> {
    let params = loop {
        let body = match reader.next_startup().await {
            Ok(body) => body,
            Err(protocol::Error::BadLength { .. }) => {
                return fatal(writer, "08P01", "invalid length of startup packet").await;
            }
            Err(e) => return Err(e.into()),
        };
        let startup = match decode::startup(&body) {
            Ok(s) => s,
            Err(_) => return fatal(writer, "08P01", "invalid startup packet layout").await,
        };
        match startup {
            // TLS and GSS encryption are not offered yet: 'N' tells the client to go on in
            // plaintext (or give up, if it requires encryption).
            Startup::Ssl | Startup::GssEnc => {
                if reader.buffered() > 0 {
                    return fatal(
                        writer,
                        "08P01",
                        "received unencrypted data after SSL request",
                    )
                    .await;
                }
                writer.write_all(b"N").await?;
            }
            Startup::Cancel { pid, secret } => {
                crate::server::forward_cancel(shared, pid, secret).await;
                return Ok(None);
            }
            Startup::Unsupported(version) => {
                let msg = format!(
                    "unsupported frontend protocol {}.{}: server supports 3.0",
                    version >> 16,
                    version & 0xffff
                );
                return fatal(writer, "0A000", &msg).await;
            }
            Startup::Params(params) => break params,
        }
    };
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let Some(user) = param("user") else {
        return fatal(
            writer,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
    };
    let database = param("database").unwrap_or_else(|| user.clone());
    let Some(secret) = shared.users.get(&user) else {
        return fatal(writer, "28000", &format!("role \"{user}\" does not exist")).await;
    };
    let authenticated =
        authenticate(reader, writer, shared.config.auth_method, &user, secret).await?;
    if !authenticated {
        return fatal(
            writer,
            "28P01",
            &format!("password authentication failed for user \"{user}\""),
        )
        .await;
    }
    if database != shared.config.database {
        return fatal(
            writer,
            "3D000",
            &format!("database \"{database}\" does not exist"),
        )
        .await;
    }
    let settings = match Settings::from_startup(&params) {
        Ok(s) => s,
        Err(reason) => return fatal(writer, "0A000", &reason).await,
    };

    let status = match login_status(shared, &settings).await {
        Ok(status) => status,
        Err(LoginError::Server(e)) => return fatal(writer, e.sqlstate(), &e.to_string()).await,
        Err(LoginError::Refused(error)) => {
            // A startup setting the server refused: its error (22023 for a bad value, 42704
            // for an unknown name), FATAL as Postgres sends it at login.
            let mut out = BytesMut::new();
            build::fatal_from(&mut out, &error);
            writer.write_all(&out).await?;
            let fields = decode::error_fields(&error).unwrap_or_default();
            return Err(Error::Refused(fields.message));
        }
    };
    let cancel = crate::server::CancelRegistry::register(shared);
    let mut out = BytesMut::new();
    build::auth_ok(&mut out);
    for (name, value) in &status {
        build::parameter_status(&mut out, name, value);
    }
    build::backend_key_data(&mut out, cancel.pid, cancel.secret);
    build::ready_for_query(&mut out, TxStatus::Idle);
    writer.write_all(&out).await?;
    Ok(Some(Login {
        user,
        settings,
        status,
        cancel,
    }))
}

/// Why a client's login could not get its ParameterStatus values.
enum LoginError {
    /// No server to ask (`08001`, `53300`...).
    Server(crate::backend::Error),
    /// The server refused a startup setting: its ErrorResponse.
    Refused(bytes::Bytes),
}

impl From<crate::backend::Error> for LoginError {
    fn from(e: crate::backend::Error) -> Self {
        LoginError::Server(e)
    }
}

/// The ParameterStatus values a client gets at login: those Postgres would send for its
/// startup packet. Postgres reports each setting in its own form (`Asia/Tokyo` for
/// `asia/tokyo`, `UTF8` for `'utf-8'`) once the startup parameters and `options` are applied,
/// and refuses the login over a value it rejects; rather than a second implementation of its
/// rules, a server is asked, once per distinct set of startup settings. A client with none
/// (or only a plain `application_name`) gets the server's own values without a round trip.
async fn login_status(
    shared: &Shared,
    settings: &Settings,
) -> Result<Vec<(String, String)>, LoginError> {
    let pool = &shared.shards[0].primary;
    let key = settings.status_key();
    let mut status = if key.is_empty() {
        match pool.server_params() {
            Some(params) => params,
            None => pool.get().await?.params.clone(),
        }
    } else {
        let known = shared.login_status.entry(&key);
        let status = known
            .get_or_try_init(|| async { ask_status(pool, settings).await.map(Arc::from) })
            .await?;
        status.to_vec()
    };
    if let Some(name) = settings.plain_application_name() {
        for (_, value) in status
            .iter_mut()
            .filter(|(n, _)| n.eq_ignore_ascii_case("application_name"))
        {
            *value = name.to_string();
        }
    }
    Ok(status)
}

/// Applies the client's startup settings on a server connection, as a replay would, and reads
/// back every value the server reports, in one round trip and one implicit transaction: a
/// refused value leaves the connection as it was. A connection that took them keeps them,
/// so the session's first statement may find it ready.
async fn ask_status(
    pool: &crate::backend::Pool,
    settings: &Settings,
) -> Result<Vec<(String, String)>, LoginError> {
    let mut conn = pool.get().await?;
    let names: Vec<String> = conn.params.iter().map(|(n, _)| n.clone()).collect();
    let row = match conn.query_row(&settings.status_sql(&names)).await? {
        Ok(row) => row,
        Err(error) => return Err(LoginError::Refused(error)),
    };
    if row.len() != names.len() {
        conn.broken = true;
        return Err(LoginError::Server(crate::backend::Error::Protocol {
            addr: conn.addr.clone(),
            reason: "unexpected reply to the startup settings check".into(),
        }));
    }
    conn.settings = settings.fingerprint();
    Ok(names
        .into_iter()
        .zip(row)
        .map(|(name, value)| (name, value.unwrap_or_default()))
        .collect())
}

/// Runs the password exchange for the configured method; `Ok(false)` means a wrong password.
async fn authenticate(
    reader: &mut FrameReader<OwnedReadHalf>,
    writer: &mut OwnedWriteHalf,
    method: AuthMethod,
    user: &str,
    secret: &crate::server::UserSecret,
) -> Result<bool, Error> {
    let mut out = BytesMut::new();
    match method {
        AuthMethod::ScramSha256 => {
            let verifier = secret
                .scram
                .as_ref()
                .expect("invariant: scram users have verifiers (Shared::new)");
            build::auth_sasl(&mut out, &["SCRAM-SHA-256"]);
            writer.write_all(&out).await?;
            let first = password_message(reader).await?;
            let Some(initial) = sasl_initial(&first) else {
                return fatal(writer, "08P01", "malformed SASL initial response")
                    .await
                    .map(|_| false);
            };
            let (exchange, server_first) = match ScramExchange::start(verifier, initial) {
                Ok(pair) => pair,
                Err(e) => return fatal(writer, "08P01", &e.to_string()).await.map(|_| false),
            };
            out.clear();
            build::auth_sasl_continue(&mut out, server_first.as_bytes());
            writer.write_all(&out).await?;
            let last = password_message(reader).await?;
            match exchange.finish(&last) {
                Ok(server_final) => {
                    out.clear();
                    build::auth_sasl_final(&mut out, server_final.as_bytes());
                    writer.write_all(&out).await?;
                    Ok(true)
                }
                Err(auth::AuthError::WrongPassword) => Ok(false),
                Err(e) => fatal(writer, "08P01", &e.to_string()).await.map(|_| false),
            }
        }
        AuthMethod::Md5 => {
            let salt: [u8; 4] = rand::random();
            build::auth_md5(&mut out, salt);
            writer.write_all(&out).await?;
            let response = password_message(reader).await?;
            let response = response.strip_suffix(b"\0").unwrap_or(&response);
            Ok(secret
                .plaintext
                .as_deref()
                .is_some_and(|pw| auth::md5_matches(user, pw, salt, response)))
        }
        AuthMethod::Plain => {
            build::auth_cleartext(&mut out);
            writer.write_all(&out).await?;
            let response = password_message(reader).await?;
            let response = response.strip_suffix(b"\0").unwrap_or(&response);
            Ok(secret
                .plaintext
                .as_deref()
                .is_some_and(|pw| auth::plain_matches(pw, response)))
        }
    }
}

/// Reads a PasswordMessage ('p') body; anything else is a protocol violation.
async fn password_message(reader: &mut FrameReader<OwnedReadHalf>) -> Result<Vec<u8>, Error> {
    let frame = reader.next().await?;
    if frame.tag() != tag::PASSWORD {
        return Err(Error::Refused(format!(
            "expected password response, got message type {:?}",
            frame.tag() as char
        )));
    }
    Ok(frame.body().to_vec())
}

/// SASLInitialResponse: mechanism name, then the length-prefixed client-first message.
fn sasl_initial(body: &[u8]) -> Option<&[u8]> {
    let (mechanism, rest) = decode::cstr(body, "SASLInitialResponse").ok()?;
    if mechanism != b"SCRAM-SHA-256" || rest.len() < 4 {
        return None;
    }
    let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let data = &rest[4..];
    (len >= 0 && data.len() == len as usize).then_some(data)
}

/// Appends an ErrorResponse (severity ERROR) to a buffer; shared by the session.
pub(crate) fn error(out: &mut BytesMut, code: &str, message: &str) {
    build::error_response(out, Severity::Error, code, message);
}

/// Appends a FATAL ErrorResponse.
pub(crate) fn fatal_error(out: &mut BytesMut, code: &str, message: &str) {
    build::error_response(out, Severity::Fatal, code, message);
}
