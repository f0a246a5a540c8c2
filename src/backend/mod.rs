//! The server side: one Postgres connection ([`conn`]) and the pools of them ([`pool`]).

pub mod conn;
pub mod health;
pub mod pool;

pub use conn::{CancelKey, Credentials, ServerConn, write_all};
pub use pool::{Pool, PooledConn};

/// Why a server connection could not be had or used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("could not connect to server {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("lost connection to server {addr}: {reason}")]
    Io { addr: String, reason: String },
    #[error("protocol error from server {addr}: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("authentication to server {addr} failed: {reason}")]
    Auth { addr: String, reason: String },
    #[error("server {addr} refused the connection: {message}")]
    Server {
        addr: String,
        code: String,
        message: String,
    },
    #[error("no server connection to {addr} became free within {waited_ms} ms (pool.size {size})")]
    PoolTimeout {
        addr: String,
        waited_ms: u64,
        size: u32,
    },
}

impl Error {
    pub(crate) fn io(addr: &str, e: std::io::Error) -> Error {
        Error::Io {
            addr: addr.to_string(),
            reason: e.to_string(),
        }
    }

    pub(crate) fn protocol(addr: &str, e: crate::protocol::Error) -> Error {
        match e {
            crate::protocol::Error::Closed => Error::Io {
                addr: addr.to_string(),
                reason: "server closed the connection".into(),
            },
            other => Error::Protocol {
                addr: addr.to_string(),
                reason: other.to_string(),
            },
        }
    }

    /// The SQLSTATE a client sees for this error.
    pub fn sqlstate(&self) -> &str {
        match self {
            // connection_exception family, as libpq users expect for an unreachable server.
            Error::Connect { .. } => "08001",
            Error::Io { .. } => "08006",
            Error::Protocol { .. } => "08P01",
            Error::Auth { .. } => "08001",
            // The server's own code (e.g. 57P03 cannot_connect_now, 53300 too_many_connections).
            Error::Server { code, .. } if !code.is_empty() => code,
            Error::Server { .. } => "08001",
            Error::PoolTimeout { .. } => "53300",
        }
    }
}
