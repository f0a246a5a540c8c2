//! Pools of [`ServerConn`]s, one per server: a LIFO stack of idle connections, checked out
//! without an await when one is free.

use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Credentials, Error, ServerConn};
use crate::config;

/// How often idle connections are checked against `idle_timeout_ms` and `min_idle`.
const MAINTENANCE_PERIOD: Duration = Duration::from_secs(1);

/// The pool of one server. Cloning shares it.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    creds: Credentials,
    size: u32,
    min_idle: u32,
    connect_timeout: Duration,
    checkout_timeout: Duration,
    idle_timeout: Option<Duration>,
    state: Mutex<State>,
    /// Signalled when a connection comes back or a connection's slot frees up.
    freed: Notify,
    /// ParameterStatus values of the first connection, relayed to clients at their startup.
    params: Mutex<Option<Vec<(String, String)>>>,
}

struct State {
    /// Idle connections, the most recently returned last: checkouts take from the end, so
    /// the few server processes a light load needs stay hot in cache and the rest idle out.
    idle: Vec<Idle>,
    /// Connections that exist or are being opened: idle, checked out, connecting.
    open: u32,
    /// Checkouts waiting for a connection; while there are any, a new checkout queues behind
    /// them instead of taking the next connection returned.
    waiting: u32,
}

struct Idle {
    conn: ServerConn,
    since: Instant,
}

/// A checked-out server connection; dropping it returns it to the pool, or closes it if the
/// relay marked it broken or it is not idle (mid-transaction, mid-request).
pub struct PooledConn {
    conn: Option<ServerConn>,
    pool: Arc<Inner>,
}

impl Pool {
    /// Builds a pool; connections open on demand. Inside a runtime, a background task also
    /// keeps `min_idle` connections open and closes those idle longer than `idle_timeout_ms`.
    pub fn new(addr: &str, creds: Credentials, cfg: &config::Pool) -> Pool {
        let inner = Arc::new(Inner {
            addr: addr.to_string(),
            creds,
            size: cfg.size,
            min_idle: cfg.min_idle.min(cfg.size),
            connect_timeout: cfg.connect_timeout(),
            checkout_timeout: cfg.checkout_timeout(),
            idle_timeout: (cfg.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(cfg.idle_timeout_ms)),
            state: Mutex::new(State {
                idle: Vec::new(),
                open: 0,
                waiting: 0,
            }),
            freed: Notify::new(),
            params: Mutex::new(None),
        });
        if (inner.min_idle > 0 || inner.idle_timeout.is_some())
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(maintain(Arc::downgrade(&inner)));
        }
        Pool { inner }
    }

    /// Checks out a connection: an idle one if there is one (no await), else a new one if the
    /// pool has room, else the next one returned.
    ///
    /// # Errors
    /// The server is unreachable (`08001`/`08006`) or no connection freed up in time (`53300`).
    pub async fn get(&self) -> Result<PooledConn, Error> {
        if let Some(conn) = self.inner.take_idle(false) {
            return Ok(conn);
        }
        // Boxed: the rare path's state would otherwise make every caller's future larger.
        Box::pin(self.get_slow()).await
    }

    async fn get_slow(&self) -> Result<PooledConn, Error> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.checkout_timeout;
        let _waiting = Waiting::new(inner);
        loop {
            // Registered before looking, so a connection returned in between is not missed.
            let freed = inner.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(conn) = inner.take_idle(true) {
                return Ok(conn);
            }
            if let Some(slot) = Slot::reserve(inner) {
                return inner.open(slot).await;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Error::PoolTimeout {
                    addr: inner.addr.clone(),
                    waited_ms: inner.checkout_timeout.as_millis() as u64,
                    size: inner.size,
                });
            }
        }
    }

    /// ParameterStatus values reported by this server, once a connection has been made.
    pub fn server_params(&self) -> Option<Vec<(String, String)>> {
        self.inner.params.lock().clone()
    }

    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// (connections, idle) right now.
    pub fn state(&self) -> (u32, u32) {
        let state = self.inner.state.lock();
        (state.open, state.idle.len() as u32)
    }
}

impl Inner {
    /// The most recently returned idle connection that is still usable. Dead ones (the server
    /// ended them while idle) are closed on the way. A new checkout (`queued` false) leaves
    /// connections to the checkouts already waiting.
    fn take_idle(self: &Arc<Self>, queued: bool) -> Option<PooledConn> {
        let mut state = self.state.lock();
        if !queued && state.waiting > 0 {
            return None;
        }
        while let Some(mut idle) = state.idle.pop() {
            if idle.conn.is_reusable() {
                drop(state);
                return Some(PooledConn {
                    conn: Some(idle.conn),
                    pool: self.clone(),
                });
            }
            state.open -= 1;
        }
        None
    }

    /// Opens a connection in a reserved slot.
    async fn open(self: &Arc<Self>, slot: Slot<'_>) -> Result<PooledConn, Error> {
        let conn = ServerConn::connect(&self.addr, &self.creds, self.connect_timeout).await?;
        slot.keep();
        let mut params = self.params.lock();
        if params.is_none() {
            *params = Some(conn.params.clone());
        }
        Ok(PooledConn {
            conn: Some(conn),
            pool: self.clone(),
        })
    }

    fn put_back(&self, conn: ServerConn) {
        let reusable = !conn.broken
            && conn.status == crate::protocol::TxStatus::Idle
            && conn.reader.buffered() == 0;
        let mut state = self.state.lock();
        if reusable {
            state.idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        } else {
            state.open -= 1;
        }
        let notify = state.waiting > 0;
        drop(state);
        if notify {
            self.freed.notify_one();
        }
    }

    /// Closes connections idle longer than `idle_timeout` (oldest first, keeping `min_idle`
    /// open), and those the server ended; then opens connections up to `min_idle`.
    async fn maintain(self: &Arc<Self>) {
        let closed: Vec<Idle> = {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            let now = Instant::now();
            let mut closed = Vec::new();
            let mut n = 0;
            while n < state.idle.len() {
                let idle = &mut state.idle[n];
                let expired = self
                    .idle_timeout
                    .is_some_and(|t| now.duration_since(idle.since) >= t);
                if (expired && state.open > self.min_idle) || !idle.conn.is_reusable() {
                    closed.push(state.idle.remove(n));
                    state.open -= 1;
                } else {
                    n += 1;
                }
            }
            closed
        };
        drop(closed);
        while self.state.lock().open < self.min_idle {
            let Some(slot) = Slot::reserve(self) else {
                break;
            };
            match self.open(slot).await {
                Ok(conn) => drop(conn), // into the idle stack
                Err(e) => {
                    tracing::debug!(cause = %e, "could not open a min_idle connection");
                    break;
                }
            }
        }
    }
}

/// The background upkeep of one pool; ends when the pool is dropped.
async fn maintain(pool: Weak<Inner>) {
    loop {
        match pool.upgrade() {
            Some(inner) => inner.maintain().await,
            None => return,
        }
        tokio::time::sleep(MAINTENANCE_PERIOD).await;
    }
}

/// Room for one more connection, given back unless the connection it was for got made (so a
/// connect that fails, or a checkout dropped mid-connect, does not shrink the pool for good).
struct Slot<'a> {
    pool: &'a Inner,
    kept: bool,
}

impl<'a> Slot<'a> {
    fn reserve(pool: &'a Inner) -> Option<Slot<'a>> {
        let mut state = pool.state.lock();
        if state.open >= pool.size {
            return None;
        }
        state.open += 1;
        Some(Slot { pool, kept: false })
    }

    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.pool.state.lock().open -= 1;
            // A waiting checkout may now open a connection itself.
            self.pool.freed.notify_one();
        }
    }
}

/// Counts a checkout as waiting for as long as it is in the slow path.
struct Waiting<'a>(&'a Inner);

impl<'a> Waiting<'a> {
    fn new(pool: &'a Inner) -> Waiting<'a> {
        pool.state.lock().waiting += 1;
        Waiting(pool)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock();
        state.waiting -= 1;
        let idle_left = !state.idle.is_empty() && state.waiting > 0;
        drop(state);
        if idle_left {
            // This checkout was woken for a connection it did not take (it timed out, or its
            // client went away): pass the wake-up on.
            self.0.freed.notify_one();
        }
    }
}

impl std::ops::Deref for PooledConn {
    type Target = ServerConn;

    fn deref(&self) -> &ServerConn {
        self.conn
            .as_ref()
            .expect("invariant: the connection is only taken when dropped")
    }
}

impl std::ops::DerefMut for PooledConn {
    fn deref_mut(&mut self) -> &mut ServerConn {
        self.conn
            .as_mut()
            .expect("invariant: the connection is only taken when dropped")
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put_back(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            user: "app".into(),
            password: "app".into(),
            database: "app".into(),
        }
    }

    fn cfg(size: u32) -> config::Pool {
        config::Pool {
            size,
            connect_timeout_ms: 2_000,
            checkout_timeout_ms: 2_000,
            ..config::Pool::default()
        }
    }

    /// A port nothing listens on: connecting is refused at once.
    fn closed_port() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").to_string()
    }

    #[tokio::test]
    async fn failed_connects_give_their_slot_back() {
        let pool = Pool::new(&closed_port(), creds(), &cfg(2));
        // More attempts than slots: each fails with the connect error, none with a timeout.
        for _ in 0..5 {
            let started = std::time::Instant::now();
            let Err(e) = pool.get().await else {
                panic!("nothing listens there")
            };
            assert_eq!(e.sqlstate(), "08001", "{e}");
            assert!(started.elapsed() < Duration::from_secs(1), "fails fast");
        }
        assert_eq!(pool.state(), (0, 0));
    }

    #[tokio::test]
    async fn a_checkout_dropped_mid_connect_gives_its_slot_back() {
        // Accepts, then never answers the startup message.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                open.push(stream);
            }
        });
        let pool = Pool::new(&addr, creds(), &cfg(1));
        for _ in 0..3 {
            let attempt = tokio::time::timeout(Duration::from_millis(100), pool.get()).await;
            assert!(attempt.is_err(), "the server never answers");
            assert_eq!(pool.state(), (0, 0), "the abandoned connect holds no slot");
        }
        held.abort();
    }
}
