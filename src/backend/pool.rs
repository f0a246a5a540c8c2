//! Pools of [`ServerConn`]s, one per server: a LIFO stack of idle connections, checked out
//! without an await when one is free, and a FIFO of checkouts waiting for one.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
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
    /// ParameterStatus values of the first connection, relayed to clients at their startup.
    params: Mutex<Option<Vec<(String, String)>>>,
}

struct State {
    /// Idle connections, the most recently returned last: checkouts take from the end, so
    /// the few server processes a light load needs stay hot in cache and the rest idle out.
    idle: Vec<Idle>,
    /// Connections that exist or are being opened: idle, checked out, connecting, and slots
    /// handed to a waiting checkout.
    open: u32,
    /// Checkouts waiting, oldest first. A connection given back, or room freed by one that
    /// closed, goes straight to the oldest: waiting clients are served in turn, and a new
    /// checkout queues behind them rather than taking what they wait for.
    waiters: VecDeque<oneshot::Sender<Grant>>,
}

struct Idle {
    conn: Box<ServerConn>,
    /// When the upkeep first saw it idle: stamped there rather than at every return, so giving
    /// a connection back reads no clock. It may so close up to one upkeep period late.
    since: Option<Instant>,
}

/// What a waiting checkout is handed.
enum Grant {
    /// A connection given back.
    Conn(Box<ServerConn>),
    /// Room for a new connection (already counted in `open`), for it to open.
    Slot,
}

/// What a checkout does when no idle connection is free for it.
enum Next {
    /// Open one in the room it reserved.
    Open,
    /// Wait in line for one.
    Wait(oneshot::Receiver<Grant>),
}

fn enqueue(state: &mut State) -> oneshot::Receiver<Grant> {
    let (tx, rx) = oneshot::channel();
    state.waiters.push_back(tx);
    rx
}

/// A checked-out server connection; dropping it returns it to the pool, or closes it if the
/// relay marked it broken or it is not idle (mid-transaction, mid-request).
pub struct PooledConn {
    /// Boxed: a checkout moves the connection through the pool, a waiter's channel and the
    /// session; a pointer moves cheaper than the struct.
    conn: Option<Box<ServerConn>>,
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
                waiters: VecDeque::new(),
            }),
            params: Mutex::new(None),
        });
        if (inner.min_idle > 0 || inner.idle_timeout.is_some())
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(maintain(Arc::downgrade(&inner)));
        }
        Pool { inner }
    }

    /// An idle connection, if there is one and nobody waits for one: the usual checkout, with
    /// no future. [`Pool::get`] does everything else.
    pub fn try_get(&self) -> Option<PooledConn> {
        let mut state = self.inner.state.lock();
        if !state.waiters.is_empty() {
            return None;
        }
        self.inner.take_idle(&mut state)
    }

    /// Checks out a connection: an idle one if there is one and nobody waits (no await), else
    /// a new one if the pool has room, else the next one given back, in turn.
    ///
    /// # Errors
    /// The server is unreachable (`08001`/`08006`) or no connection freed up within
    /// `checkout_timeout_ms` (`53300`).
    pub async fn get(&self) -> Result<PooledConn, Error> {
        let inner = &self.inner;
        let next = {
            let mut state = inner.state.lock();
            if !state.waiters.is_empty() {
                Next::Wait(enqueue(&mut state))
            } else if let Some(conn) = inner.take_idle(&mut state) {
                return Ok(conn);
            } else if state.open < inner.size {
                state.open += 1;
                Next::Open
            } else {
                Next::Wait(enqueue(&mut state))
            }
        };
        // Boxed: the rare paths' state would otherwise make every caller's future larger.
        match next {
            Next::Open => {
                let slot = Slot {
                    pool: inner,
                    kept: false,
                };
                let deadline = Instant::now() + inner.checkout_timeout;
                Box::pin(inner.open(slot, deadline)).await
            }
            Next::Wait(rx) => Box::pin(self.wait(rx)).await,
        }
    }

    /// A checkout that never waits for a connection to be given back: an idle one, else a
    /// new one if the pool has room. None when it is full, for a caller that may itself hold
    /// the connections it would wait for.
    ///
    /// # Errors
    /// The server is unreachable (`08001`/`08006`).
    pub async fn get_unless_full(&self) -> Option<Result<PooledConn, Error>> {
        let inner = &self.inner;
        {
            let mut state = inner.state.lock();
            if !state.waiters.is_empty() {
                return None;
            }
            if let Some(conn) = inner.take_idle(&mut state) {
                return Some(Ok(conn));
            }
            if state.open >= inner.size {
                return None;
            }
            state.open += 1;
        }
        let slot = Slot {
            pool: inner,
            kept: false,
        };
        let deadline = Instant::now() + inner.checkout_timeout;
        Some(Box::pin(inner.open(slot, deadline)).await)
    }

    async fn wait(&self, rx: oneshot::Receiver<Grant>) -> Result<PooledConn, Error> {
        let inner = &self.inner;
        let deadline = Instant::now() + inner.checkout_timeout;
        let mut waiting = Waiting { rx, pool: inner };
        let grant = match tokio::time::timeout_at(deadline, &mut waiting.rx).await {
            Ok(Ok(grant)) => grant,
            Ok(Err(_)) | Err(_) => {
                return Err(Error::PoolTimeout {
                    addr: inner.addr.clone(),
                    waited_ms: inner.checkout_timeout.as_millis() as u64,
                    size: inner.size,
                });
            }
        };
        drop(waiting);
        if let Grant::Conn(mut conn) = grant
            && conn.is_reusable()
        {
            return Ok(PooledConn {
                conn: Some(conn),
                pool: inner.clone(),
            });
        }
        // A slot, or a connection the server ended in the meantime: its room is this
        // checkout's to open a connection in.
        let slot = Slot {
            pool: inner,
            kept: false,
        };
        inner.open(slot, deadline).await
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
    /// ended them while idle) are closed on the way.
    fn take_idle(self: &Arc<Self>, state: &mut State) -> Option<PooledConn> {
        while let Some(mut idle) = state.idle.pop() {
            if idle.conn.is_reusable() {
                return Some(PooledConn {
                    conn: Some(idle.conn),
                    pool: self.clone(),
                });
            }
            self.release(state);
        }
        None
    }

    /// Opens a connection in a reserved slot, within the checkout's deadline.
    async fn open(
        self: &Arc<Self>,
        slot: Slot<'_>,
        deadline: Instant,
    ) -> Result<PooledConn, Error> {
        let timeout = self
            .connect_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let conn = ServerConn::connect(&self.addr, &self.creds, timeout).await?;
        slot.keep();
        let mut params = self.params.lock();
        if params.is_none() {
            *params = Some(conn.params.clone());
        }
        Ok(PooledConn {
            conn: Some(Box::new(conn)),
            pool: self.clone(),
        })
    }

    /// A connection comes back: to the oldest waiting checkout, else onto the idle stack; or,
    /// if it cannot be reused, it closes and its room goes to the oldest waiting checkout.
    fn put_back(&self, conn: Box<ServerConn>) {
        let reusable = !conn.broken
            && conn.status == crate::protocol::TxStatus::Idle
            && conn.reader.buffered() == 0;
        let mut state = self.state.lock();
        if !reusable {
            self.release(&mut state);
            return;
        }
        let mut conn = conn;
        while let Some(waiter) = state.waiters.pop_front() {
            match waiter.send(Grant::Conn(conn)) {
                Ok(()) => return,
                // That checkout gave up (timed out, or its client went away).
                Err(Grant::Conn(back)) => conn = back,
                Err(Grant::Slot) => unreachable!("a Conn was sent"),
            }
        }
        state.idle.push(Idle { conn, since: None });
    }

    /// One connection fewer: its room goes to the oldest waiting checkout, if any.
    fn release(&self, state: &mut State) {
        while let Some(waiter) = state.waiters.pop_front() {
            if waiter.send(Grant::Slot).is_ok() {
                return; // the room stays counted, now as that checkout's
            }
        }
        state.open -= 1;
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
                let since = *idle.since.get_or_insert(now);
                let expired = self
                    .idle_timeout
                    .is_some_and(|t| now.duration_since(since) >= t);
                if (expired && state.open > self.min_idle) || !idle.conn.is_reusable() {
                    closed.push(state.idle.remove(n));
                    self.release(state);
                } else {
                    n += 1;
                }
            }
            closed
        };
        drop(closed);
        loop {
            let slot = {
                let mut state = self.state.lock();
                if state.open >= self.min_idle || !state.waiters.is_empty() {
                    break;
                }
                state.open += 1;
                Slot {
                    pool: self,
                    kept: false,
                }
            };
            let deadline = Instant::now() + self.connect_timeout;
            match self.open(slot, deadline).await {
                Ok(conn) => drop(conn), // onto the idle stack
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

/// Room for one more connection, counted in `open` and given back (to a waiting checkout, or
/// freed) unless the connection it was for got made: a connect that fails, or a checkout
/// dropped mid-connect, does not shrink the pool for good.
struct Slot<'a> {
    pool: &'a Inner,
    kept: bool,
}

impl Slot<'_> {
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.pool.release(&mut self.pool.state.lock());
        }
    }
}

/// A checkout's place in the queue. If it stops waiting (timed out, or dropped because its
/// client went away) just as something was handed to it, that goes to the next in line.
struct Waiting<'a> {
    rx: oneshot::Receiver<Grant>,
    pool: &'a Inner,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.rx.close();
        match self.rx.try_recv() {
            Ok(Grant::Conn(conn)) => self.pool.put_back(conn),
            Ok(Grant::Slot) => self.pool.release(&mut self.pool.state.lock()),
            Err(_) => {}
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

    /// A stand-in server that accepts any startup (AuthenticationOk, BackendKeyData,
    /// ReadyForQuery), answering the connections after the first `fast` ones `delay` late.
    async fn startup_server(fast: usize, delay: Duration) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            let mut accepted = 0;
            while let Ok((mut stream, _)) = listener.accept().await {
                let late = accepted >= fast;
                accepted += 1;
                tokio::spawn(async move {
                    let Ok(len) = stream.read_i32().await else {
                        return;
                    };
                    let mut startup = vec![0; usize::try_from(len).unwrap_or(4) - 4];
                    if stream.read_exact(&mut startup).await.is_err() {
                        return;
                    }
                    if late {
                        tokio::time::sleep(delay).await;
                    }
                    let mut reply = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
                    reply.extend_from_slice(&[b'K', 0, 0, 0, 12, 0, 0, 0, 1, 0, 0, 0, 2]);
                    reply.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
                    let _ = stream.write_all(&reply).await;
                    let mut sink = [0; 1024];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_waiting_checkout_gets_a_connection_given_back_while_another_connects() {
        let addr = startup_server(1, Duration::from_secs(2)).await;
        let pool = Pool::new(&addr, creds(), &cfg(2));
        let first = pool.get().await.expect("first connection");
        // Takes the last room and connects slowly.
        let slow = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.get().await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                pool.get().await.map(|_| started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        let waited = waiter
            .await
            .expect("task")
            .expect("the returned connection");
        assert!(waited < Duration::from_millis(500), "waited {waited:?}");
        slow.abort();
    }

    #[tokio::test]
    async fn waiting_checkouts_come_before_new_ones() {
        let addr = startup_server(usize::MAX, Duration::ZERO).await;
        let pool = Pool::new(&addr, creds(), &cfg(1));
        let held = pool.get().await.expect("the one connection");
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let conn = pool.get().await.expect("served in turn");
                let served = std::time::Instant::now();
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(conn);
                served
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Give it back and ask again at once, before the waiter has run.
        drop(held);
        let again = pool.get().await.expect("after the waiter");
        let regot = std::time::Instant::now();
        let served = waiter.await.expect("task");
        assert!(served < regot, "the waiting checkout was served first");
        drop(again);
        assert_eq!(pool.state(), (1, 1));
    }

    #[tokio::test]
    async fn a_checkout_unless_full_opens_but_never_waits() {
        let addr = startup_server(usize::MAX, Duration::ZERO).await;
        let pool = Pool::new(&addr, creds(), &cfg(2));
        let first = pool.get_unless_full().await.expect("room").expect("opened");
        let second = pool.get_unless_full().await.expect("room").expect("opened");
        assert_eq!(pool.state(), (2, 0));
        let started = std::time::Instant::now();
        assert!(pool.get_unless_full().await.is_none(), "full: no wait");
        assert!(started.elapsed() < Duration::from_millis(500));
        drop(first);
        let again = pool
            .get_unless_full()
            .await
            .expect("idle")
            .expect("the idle one");
        assert_eq!(pool.state(), (2, 0));
        drop((second, again));
        assert_eq!(pool.state(), (2, 2));
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
