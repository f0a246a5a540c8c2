//! bb8 pools of [`ServerConn`]s, one per server, with a manager that speaks our own startup.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{Credentials, Error, ServerConn};
use crate::config;

/// Opens and vets server connections for bb8.
pub struct Manager {
    addr: String,
    creds: Credentials,
    connect_timeout: Duration,
    /// ParameterStatus values of the first connection, relayed to clients at their startup.
    params: ServerParams,
    health: Arc<Health>,
}

/// Connect failures, published so waiting checkouts fail at once with the real cause: bb8
/// opens connections in background tasks and would otherwise only report a timeout.
struct Health {
    failures: tokio::sync::watch::Sender<u64>,
    last_error: Mutex<Option<Error>>,
}

type ServerParams = Arc<Mutex<Option<Vec<(String, String)>>>>;

impl bb8::ManageConnection for Manager {
    type Connection = ServerConn;
    type Error = Error;

    async fn connect(&self) -> Result<ServerConn, Error> {
        let conn = match ServerConn::connect(&self.addr, &self.creds, self.connect_timeout).await {
            Ok(conn) => conn,
            Err(e) => {
                *self.health.last_error.lock() = Some(e.clone());
                self.health.failures.send_modify(|n| *n += 1);
                return Err(e);
            }
        };
        let mut params = self.params.lock();
        if params.is_none() {
            *params = Some(conn.params.clone());
        }
        Ok(conn)
    }

    /// Runs on every checkout: a local, non-blocking check (see [`ServerConn::is_reusable`]),
    /// never a round trip to the server.
    async fn is_valid(&self, conn: &mut ServerConn) -> Result<(), Error> {
        if conn.is_reusable() {
            Ok(())
        } else {
            Err(Error::Io {
                addr: self.addr.clone(),
                reason: "connection closed while idle".into(),
            })
        }
    }

    fn has_broken(&self, conn: &mut ServerConn) -> bool {
        conn.broken || conn.status != crate::protocol::TxStatus::Idle
    }
}

/// A checked-out server connection; dropping it returns it to the pool (or discards it if it
/// is broken or not idle).
pub type PooledConn = bb8::PooledConnection<'static, Manager>;

/// The pool of one server.
#[derive(Clone)]
pub struct Pool {
    inner: bb8::Pool<Manager>,
    addr: String,
    size: u32,
    checkout_timeout: Duration,
    params: ServerParams,
    health: Arc<Health>,
}

impl Pool {
    /// Builds a pool; connections open lazily (or up to `min_idle` in the background).
    pub fn new(addr: &str, creds: Credentials, cfg: &config::Pool) -> Pool {
        let params = Arc::new(Mutex::new(None));
        let health = Arc::new(Health {
            failures: tokio::sync::watch::Sender::new(0),
            last_error: Mutex::new(None),
        });
        let manager = Manager {
            addr: addr.to_string(),
            creds,
            connect_timeout: cfg.connect_timeout(),
            params: params.clone(),
            health: health.clone(),
        };
        let idle_timeout =
            (cfg.idle_timeout_ms > 0).then(|| Duration::from_millis(cfg.idle_timeout_ms));
        let inner = bb8::Pool::builder()
            .max_size(cfg.size)
            .min_idle(Some(cfg.min_idle).filter(|&n| n > 0))
            .connection_timeout(cfg.checkout_timeout())
            .idle_timeout(idle_timeout)
            .max_lifetime(None)
            // A failed connect is reported to the waiting checkout (see `Health`) instead of
            // being retried until the checkout timeout: a dead server fails fast.
            .retry_connection(false)
            .test_on_check_out(true)
            // The most recently returned connection goes out first (as PgBouncer does): the few
            // server processes a light load needs stay hot in cache, and the rest can idle out.
            .queue_strategy(bb8::QueueStrategy::Lifo)
            .build_unchecked(manager);
        Pool {
            inner,
            addr: addr.to_string(),
            size: cfg.size,
            checkout_timeout: cfg.checkout_timeout(),
            params,
            health,
        }
    }

    /// Checks out a connection.
    ///
    /// # Errors
    /// The server is unreachable (`08001`/`08006`) or no connection freed up in time (`53300`).
    pub async fn get(&self) -> Result<PooledConn, Error> {
        // Failures from now on concern this checkout: a connect attempt it triggered failed.
        let mut failures = self.health.failures.subscribe();
        // bb8 discards connections that fail `is_valid` and tries the next one by itself.
        let got = tokio::select! {
            biased;
            got = self.inner.get_owned() => got,
            Ok(()) = failures.changed() => {
                let e = self.health.last_error.lock().clone();
                return Err(e.unwrap_or_else(|| Error::Connect {
                    addr: self.addr.clone(),
                    reason: "connection failed".into(),
                }));
            }
        };
        match got {
            Ok(conn) => Ok(conn),
            Err(bb8::RunError::User(e)) => Err(e),
            Err(bb8::RunError::TimedOut) => Err(Error::PoolTimeout {
                addr: self.addr.clone(),
                waited_ms: self.checkout_timeout.as_millis() as u64,
                size: self.size,
            }),
        }
    }

    /// ParameterStatus values reported by this server, once a connection has been made.
    pub fn server_params(&self) -> Option<Vec<(String, String)>> {
        self.params.lock().clone()
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// (connections, idle) right now.
    pub fn state(&self) -> (u32, u32) {
        let s = self.inner.state();
        (s.connections, s.idle_connections)
    }
}
