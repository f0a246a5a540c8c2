//! The relay: one logged-in client, the server connections it holds, and the bookkeeping that
//! makes transaction pooling and sharding invisible to the client.
//!
//! Every message sent to a server pushes an [`Expect`] entry on that connection's queue; every
//! server reply is matched against the head of that queue. This is what lets the proxy inject
//! messages the client did not send (a Parse for a statement the client prepared on another
//! connection, the replay of its SET commands, a deferred BEGIN) and swallow their replies, and
//! answer some messages itself (ParseComplete for a statement the server already has,
//! CloseComplete) in the right order. A reply that fits no entry is a desync: the server
//! connection is discarded.
//!
//! At most one connection has replies pending while the relay loop runs, so replies reach the
//! client in request order: switching to another connection first drains the current one. A
//! statement on several shards ([`Fanout::Scatter`], [`Fanout::Broadcast`]) is sent to every
//! target, then their replies are drained one connection after the other through a [`Merge`]
//! filter: one RowDescription, every DataRow, summed CommandComplete counts, one ReadyForQuery.
//! When the rows need more than concatenation (ORDER BY, LIMIT, aggregates) a [`Merger`] decides
//! which shard to read next and what to emit.
//!
//! The parts about several shards live in submodules, as more `impl Session` blocks: `gather`
//! (one statement on several shards, merging), `two_phase` (commits across shards), `copy_in`
//! (COPY FROM STDIN split by row), `local` (what the proxy answers itself).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rustc_hash::FxHashMap;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, warn};

use super::Login;
use super::copy;
use super::settings::{Change, Settings};
use crate::backend::health::InFlight;
use crate::backend::{self, PooledConn};
use crate::config::PoolMode;
use crate::merge::{self, Merger};
use crate::protocol::{self, Frame, FrameReader, TxStatus, build, decode, tag};
use crate::router::analyze::{Analysis, CopySpec, TxCommand};
use crate::router::params::Params;
use crate::router::{self, Fanout, MergePlan, Plan, lex};
use crate::server::{Shared, Statement};

mod copy_in;
mod gather;
mod local;
mod reset;
mod syntax;
mod two_phase;

use copy_in::CopyIn;
use local::{Local, next_id_call, next_id_description, next_id_row};

/// A batch's wire buffer up to this size is kept for the next batch; a larger one (a big
/// Bind) is freed rather than held for the rest of the session.
const SPARE_WIRE_MAX: usize = 64 * 1024;

/// The text `Kind::Fail` parses: not SQL, so the Parse fails whatever the server's state (a
/// statement of that name, an aborted transaction, COPY), and the server's log says why.
const FAIL_TEXT: &[u8] = b"tessera: an error raised by the proxy ends this transaction";

/// The plan of every statement when the router is a passthrough (one shard, no replicas).
static PASSTHROUGH: std::sync::LazyLock<Plan> = std::sync::LazyLock::new(|| Plan {
    fanout: Fanout::One(router::ShardId(0)),
    replica_ok: false,
    writes: false,
    tx: None,
    reason: Arc::from("single shard, primary only: passthrough"),
    merge: None,
    split: None,
    copy: None,
});

/// What a reply from the server answers.
#[derive(Debug)]
enum Kind {
    /// `stmt`: the registry id it creates on the server; `client`: the client's name for it;
    /// `before`, for the client's own Parse of the unnamed statement: its unnamed statement
    /// before this one, which stays its statement if the server skips this Parse (after an
    /// error earlier in the pipeline).
    Parse {
        stmt: Option<u64>,
        client: Option<Bytes>,
        before: Option<Arc<Unnamed>>,
    },
    /// `stmt`: the registry id of the statement bound (0: the unnamed one), to retire it if the
    /// server finds its plan stale.
    Bind {
        stmt: u64,
    },
    /// `stmt`: the statement described, to learn its parameter types (`unnamed`: the client's
    /// unnamed statement, described).
    Describe {
        stmt: Option<Arc<Statement>>,
        unnamed: Option<Arc<Unnamed>>,
        /// A portal (not a statement) is described: in a merge, its columns are the merge's.
        portal: bool,
    },
    /// `dropped`: it runs DISCARD ALL or DEALLOCATE ALL, accounted for when sent; what the
    /// proxy counted before, restored should it fail or be skipped.
    Execute {
        changes: Vec<Change>,
        dropped: Option<Box<Dropped>>,
    },
    Close,
    Sync,
    /// A simple Query or FunctionCall: its reply ends with ReadyForQuery. `appended`: how many
    /// statements of the proxy's end the client's text (the startup values of what it reset):
    /// their CommandCompletes, the reply's last ones, are not the client's.
    Query {
        changes: Vec<Change>,
        appended: usize,
    },
    /// The injected `SELECT pg_current_wal_insert_lsn()` after a write (read your writes).
    Lsn,
    /// One of the messages that set back the startup values of the settings an Execute reset
    /// (see [`Session::restore_after`]), answered by the message of this tag.
    Restore(u8),
    /// A message that always fails (a Parse of text that is not SQL), sent where the proxy
    /// raised an error inside a batch: the server fails there too, so what ran before it in the
    /// transaction is rolled back (or the transaction block fails), as Postgres' own errors do.
    /// Its error is dropped. `unnamed`: it stands for the client's Parse of the unnamed
    /// statement, which the client then no longer has (unless the server skipped it).
    Fail {
        unnamed: bool,
    },
}

#[derive(Debug)]
enum Expect {
    /// A reply from the server; `forward` is false for messages the proxy injected.
    Reply { kind: Kind, forward: bool },
    /// A reply the proxy makes itself, sent to the client when it reaches the head.
    Synthetic(Bytes),
}

/// Which server of which shard: `server` 0 is the primary, `i + 1` replica `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnKey {
    shard: usize,
    server: usize,
}

impl ConnKey {
    fn primary(shard: usize) -> ConnKey {
        ConnKey { shard, server: 0 }
    }
}

/// A server connection checked out by this client.
struct Held {
    key: ConnKey,
    conn: PooledConn,
    expect: VecDeque<Expect>,
    /// The client's unnamed statement exists on this connection (unless a simple Query sent
    /// since drops it: see [`Held::has_unnamed`]).
    unnamed_ready: bool,
    /// The server is in COPY FROM STDIN mode.
    copy_in: bool,
    /// An error was seen in the simple Query at the head.
    query_failed: bool,
    /// Tag of the last CommandComplete (to tell COMMIT from ROLLBACK). Owned, not a view into
    /// the reader's buffer, which could keep a large result's buffer alive with it.
    last_tag: Vec<u8>,
    /// A write ran here since the last ReadyForQuery idle (read your writes).
    wrote: bool,
    /// The session's transaction has been opened on this connection.
    begun: bool,
    /// The ErrorResponse of the last request the proxy injected here, if it failed.
    injected_error: Option<Bytes>,
    /// An error arrived and its ReadyForQuery has not yet: the transaction is about to be
    /// aborted, whatever the client sends meanwhile.
    failing: bool,
    /// The last ReadyForQuery ended a transaction that failed: what it set is gone.
    rolled_back: bool,
    /// Extended-protocol messages went here with no Sync behind them yet (a batch ended by
    /// Flush, or an Execute's COPY whose Sync the server ignores): the server is inside the
    /// implicit transaction they opened, which only a Sync (or a simple Query) ends, so the
    /// connection stays with this client until then. Set when such a batch is sent, cleared
    /// by a ReadyForQuery with nothing sent after it.
    unsynced: bool,
    /// CommandCompletes of a Query with statements of the proxy's appended (`Kind::Query`'s
    /// `appended`), held back until the next message shows whose they are.
    withheld: Vec<Bytes>,
    /// Counts this connection's statements for least-busy replica balancing.
    _in_flight: Option<InFlight>,
}

/// A CommandComplete (its body): the tag, kept to tell COMMIT from ROLLBACK later.
fn note_command(last_tag: &mut Vec<u8>, body: &[u8]) {
    last_tag.clear();
    // The tag is the whole body but its NUL: no scan for it.
    if let Some((0, command)) = body.split_last() {
        last_tag.extend_from_slice(command);
    }
}

impl Held {
    /// Whether the client's unnamed statement is on this server connection once what is sent
    /// has run. A simple Query drops the server's unnamed statement, the proxy's own ones too
    /// (a deferred BEGIN, a settings replay, a read-your-writes probe): of those still pending
    /// and the Parses of it, the last one sent decides.
    fn has_unnamed(&self) -> bool {
        if !self.unnamed_ready {
            return false;
        }
        for e in self.expect.iter().rev() {
            match e {
                Expect::Reply {
                    kind: Kind::Query { .. } | Kind::Lsn,
                    ..
                } => return false,
                e if parses_unnamed(e) => return true,
                _ => {}
            }
        }
        true
    }

    /// Whether another client may have the connection: nothing pending, no COPY, no
    /// transaction open, explicit or implicit.
    fn releasable(&self) -> bool {
        self.expect.is_empty()
            && !self.copy_in
            && !self.unsynced
            && self.conn.status == TxStatus::Idle
    }

    /// A ReadyForQuery (its Sync or Query still at the head of the queue): the server's
    /// transaction status; COPY and any error are over, and so is an implicit transaction if
    /// nothing was sent after.
    fn note_ready(&mut self, status: TxStatus) {
        self.conn.status = status;
        // (Replies the proxy makes itself, queued behind, were sent nothing.)
        if self.expect.len() <= 1
            || self
                .expect
                .iter()
                .skip(1)
                .all(|e| matches!(e, Expect::Synthetic(_)))
        {
            self.unsynced = false;
        }
        self.copy_in = false;
        self.rolled_back = self.failing && status == TxStatus::Idle;
        self.failing = false;
    }
}

/// A transaction the client opened. BEGIN is deferred: it is sent to each shard's connection
/// just before the first statement that needs that shard.
#[derive(Debug)]
struct Tx {
    /// The client's BEGIN message, replayed on each connection the transaction adds.
    begin: Bytes,
    read_only: bool,
    /// An error the proxy raised aborted it: only ROLLBACK is accepted now.
    failed: bool,
    written: BTreeSet<usize>,
    /// Savepoints open now (name as written, name as compared), oldest first: a shard that
    /// joins the transaction later gets them too, so ROLLBACK TO means the same everywhere.
    savepoints: Vec<(String, String)>,
    /// Opened by the proxy around one statement that writes on several shards outside a
    /// transaction, so it commits atomically (two-phase) or not at all.
    implicit: bool,
}

/// Filters the replies of a statement run on several connections into one reply.
#[derive(Debug, Default)]
struct Merge {
    /// The connection being drained is the first one: its descriptions are the client's.
    first: bool,
    /// Broadcast: only the first connection's rows and counts count.
    broadcast: bool,
    tags: Vec<String>,
    error: bool,
    /// Rows that need more than concatenation (ORDER BY, LIMIT, aggregates) go through this.
    merger: Option<Merger>,
    /// The connections of the merge, in shard order (a merger's shard slots).
    slots: Vec<ConnKey>,
    /// COPY TO STDOUT: every shard's data, one CopyDone at the end.
    copy_out: bool,
    /// ... with a CSV header line, which only the first shard's data keeps.
    copy_header: bool,
    /// Connections whose first CopyData (their header) has gone by.
    past_header: Vec<ConnKey>,
    /// CommandCompletes seen per connection.
    completions: Vec<(ConnKey, usize)>,
    /// No ReadyForQuery at the end: the client's Sync asks for it (extended-protocol COPY).
    no_ready: bool,
}

/// A portal of a statement the proxy answers itself.
#[derive(Clone, Default)]
struct LocalPortal {
    /// The column name the statement returns.
    column: String,
    /// The result format the Bind asked for.
    format: i16,
    /// Savepoints open when it was bound: a ROLLBACK TO one of those after it ends it.
    depth: usize,
}

/// What the proxy counted as prepared before a DISCARD ALL or DEALLOCATE ALL it sent: the
/// server connection's statements, and the client's.
#[derive(Debug)]
struct Dropped {
    prepared: rustc_hash::FxHashSet<u64>,
    statements: FxHashMap<Bytes, Arc<Statement>>,
}

/// The client's unnamed prepared statement.
#[derive(Debug, Clone)]
struct Unnamed {
    /// The Parse message, copied out of the client's read buffer so it keeps none of it alive.
    parse: Bytes,
    /// None when the router passes everything through (nothing to plan).
    analysis: Option<Arc<Analysis>>,
    types: Vec<u32>,
    changes: Vec<Change>,
    /// DISCARD ALL or DEALLOCATE ALL (see `Effects::drops_all`).
    drops_all: bool,
    /// Answered by the proxy itself (a BEGIN, a DEALLOCATE), never sent to a server.
    local: bool,
}

/// One client's session after login.
pub struct Session {
    shared: Arc<Shared>,
    client: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    out: BytesMut,
    conns: Vec<Held>,
    batch: Vec<Frame>,
    /// The client's named statements. Looked up on every Bind: a fast hash (a client choosing
    /// colliding names slows only its own session).
    statements: FxHashMap<Bytes, Arc<Statement>>,
    unnamed: Option<Arc<Unnamed>>,
    /// The batch being routed (on a sharded map) has a Parse of the unnamed statement: if the
    /// proxy refuses the batch, the client's previous unnamed statement is gone all the same,
    /// as a Parse on Postgres drops it even when it fails.
    parses_unnamed: bool,
    portal_changes: Vec<Change>,
    /// Portals that run DISCARD ALL or DEALLOCATE ALL (see `Effects::drops_all`).
    portal_drops: Vec<Bytes>,
    settings: Settings,
    /// What the client was told at login of each setting the server reports (ParameterStatus):
    /// its values at session start, which DISCARD ALL goes back to.
    started: Vec<(String, String)>,
    /// What the client was last told of each of them.
    reported: Vec<(String, String)>,
    tx_changes: Vec<Change>,
    tx: Option<Tx>,
    status: TxStatus,
    mode: PoolMode,
    /// This client's cancel key and the connections a cancel for it reaches.
    cancel: crate::server::CancelEntry,
    /// Empty reply queues of connections given back, reused by the next checkouts.
    spare_expect: Vec<VecDeque<Expect>>,
    /// The previous batch's emptied vector, which collects the batch after next.
    spare_batch: Vec<Frame>,
    /// An emptied `Held::last_tag`, for the next checkout.
    spare_tag: Vec<u8>,
    /// The last passed-through batch's emptied wire buffer, for the next one.
    spare_wire: BytesMut,
    skip_until_sync: bool,
    merge: Option<Merge>,
    /// Read your writes: the WAL position of this session's last write per shard.
    ryw: HashMap<usize, u64>,
    /// Server errors relayed so far (to notice one while draining mid-batch).
    errors: u64,
    /// Where each portal was bound, so its Executes and Describes follow it.
    portals: Portals,
    /// Statements (by client name) that only call `tessera_next_id()`, answered by the proxy,
    /// with the column name they return.
    local_statements: HashMap<Bytes, String>,
    /// Portals of those statements.
    local_portals: HashMap<Bytes, LocalPortal>,
    /// A COPY FROM STDIN being split across shards.
    copy_in: Option<CopyIn>,
    /// The next scatter is a COPY TO STDOUT (its CopyData is concatenated).
    copy_out: Option<Arc<CopySpec>>,
}

/// SAVEPOINT, RELEASE or ROLLBACK TO, with the savepoint's name as written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SavepointOp {
    Create(String),
    Release(String),
    RollbackTo(String),
}

/// Whether `text` may hold a savepoint command: a cheap look at its first word.
fn may_move_savepoints(text: &[u8]) -> bool {
    let (word, rest) = lex::lead_word(text);
    (word.is_empty() && matches!(rest.first(), Some(b'-' | b'/')))
        || ["savepoint", "release", "rollback", "abort"]
            .iter()
            .any(|command| lex::word_is(word, command.as_bytes()))
}

impl SavepointOp {
    fn parse(sql: &str) -> Option<SavepointOp> {
        let statements = lex::statements(sql);
        let [stmt] = statements.as_slice() else {
            return None;
        };
        let words: Vec<&str> = lex::Tokens::new(stmt).collect();
        let lower: Vec<String> = words.iter().map(|w| w.to_ascii_lowercase()).collect();
        let last = |at: usize| (words.len() == at + 1).then(|| words[at].to_string());
        match lower.first().map(String::as_str)? {
            "savepoint" => last(1).map(SavepointOp::Create),
            "release" if lower.get(1).map(String::as_str) == Some("savepoint") => {
                last(2).map(SavepointOp::Release)
            }
            "release" => last(1).map(SavepointOp::Release),
            "rollback" | "abort" => {
                let to = lower.iter().position(|w| w == "to")?;
                let at = if lower.get(to + 1).map(String::as_str) == Some("savepoint") {
                    to + 2
                } else {
                    to + 1
                };
                last(at).map(SavepointOp::RollbackTo)
            }
            _ => None,
        }
    }

    fn name(&self) -> &str {
        match self {
            SavepointOp::Create(n) | SavepointOp::Release(n) | SavepointOp::RollbackTo(n) => n,
        }
    }

    fn tag(&self) -> &'static str {
        match self {
            SavepointOp::Create(_) => "SAVEPOINT",
            SavepointOp::Release(_) => "RELEASE",
            SavepointOp::RollbackTo(_) => "ROLLBACK",
        }
    }
}

/// A savepoint name as Postgres compares it: folded to lower case unless quoted.
fn fold_name(name: &str) -> String {
    match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\"\"", "\""),
        None => name.to_ascii_lowercase(),
    }
}

/// The SQL of the statement a batch runs: its Parse, or the statement its Bind names.
fn batch_sql(session: &Session, batch: &[Frame]) -> Option<String> {
    let n = batch
        .iter()
        .position(|f| f.tag() == tag::PARSE || f.tag() == tag::BIND)?;
    if batch[n].tag() == tag::PARSE {
        let parse = decode::parse(batch[n].body()).ok()?;
        return Some(String::from_utf8_lossy(parse.query).into_owned());
    }
    bind_sql(session, batch, n)
}

/// Where the Bind is, if the batch is one statement run once: Parse (of the statement bound)
/// if any, Bind, Describe if any, Execute, Sync.
fn one_statement(batch: &[Frame]) -> Option<usize> {
    let tags: Vec<u8> = batch.iter().map(Frame::tag).collect();
    let at = match tags.as_slice() {
        [tag::PARSE, tag::BIND, rest @ ..] => {
            let parse = decode::parse(batch[0].body()).ok()?;
            let bind = decode::bind(batch[1].body()).ok()?;
            (parse.name == bind.statement).then_some(())?;
            matches!(
                rest,
                [tag::EXECUTE, tag::SYNC] | [tag::DESCRIBE, tag::EXECUTE, tag::SYNC]
            )
            .then_some(1)?
        }
        [tag::BIND, tag::EXECUTE, tag::SYNC]
        | [tag::BIND, tag::DESCRIBE, tag::EXECUTE, tag::SYNC] => 0,
        _ => return None,
    };
    Some(at)
}

/// The SQL of the statement the Bind at `batch[n]` runs: parsed earlier in the batch, or one
/// the client prepared before.
fn bind_sql(session: &Session, batch: &[Frame], n: usize) -> Option<String> {
    let bind = decode::bind(batch.get(n)?.body()).ok()?;
    let parsed = batch[..n].iter().rev().find_map(|f| {
        let p = decode::parse(f.body())
            .ok()
            .filter(|_| f.tag() == tag::PARSE)?;
        (p.name == bind.statement).then(|| String::from_utf8_lossy(p.query).into_owned())
    });
    if parsed.is_some() {
        return parsed;
    }
    let parse = if bind.statement.is_empty() {
        session.unnamed.as_ref().map(|u| u.parse.clone())
    } else {
        session
            .statements
            .get(bind.statement)
            .map(|s| s.parse.clone())
    }?;
    let p = decode::parse(parse.get(5..)?).ok()?;
    Some(String::from_utf8_lossy(p.query).into_owned())
}

/// The savepoints to recreate on a shard that joins a transaction, as one query.
fn savepoint_replay(tx: &Tx) -> Option<Bytes> {
    if tx.savepoints.is_empty() {
        return None;
    }
    let sql: Vec<String> = tx
        .savepoints
        .iter()
        .map(|(raw, _)| format!("SAVEPOINT {raw}"))
        .collect();
    let mut msg = BytesMut::new();
    build::query(&mut msg, &sql.join("; "));
    Some(msg.freeze())
}

/// The proxy's shutdown, awaited across the whole session: one registration with the token,
/// not one per message; and while the session's task (its waker) stays the same, polling again
/// is a flag check rather than a trip through the token's locked waiter list.
struct ShutdownWait {
    token: CancellationToken,
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
    registered: Option<Waker>,
}

impl ShutdownWait {
    fn new(token: CancellationToken) -> Self {
        ShutdownWait {
            wait: Box::pin(token.clone().cancelled_owned()),
            token,
            registered: None,
        }
    }
}

impl Future for ShutdownWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // Cancelling sets the flag before it wakes the registered waker.
        if self.token.is_cancelled() {
            return Poll::Ready(());
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        let this = &mut *self;
        match this.wait.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => {
                this.registered = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// Why the session ended.
#[derive(Debug)]
enum End {
    /// The client left (Terminate, EOF, I/O error): nothing more to say.
    ClientGone,
    /// The client was sent a FATAL error.
    Fatal,
    /// A replica connection died under a read outside a transaction: the client got an error
    /// for that statement and the session goes on.
    Recovered,
}

enum Event {
    /// A whole message (or more) is buffered from the client.
    Client(Result<(), protocol::Error>),
    /// A whole message (or more) is buffered from the polled server connection.
    Server(Result<(), protocol::Error>),
}

impl Session {
    pub fn new(
        shared: Arc<Shared>,
        client: FrameReader<OwnedReadHalf>,
        writer: OwnedWriteHalf,
        login: Login,
    ) -> Self {
        let mode = shared.config.pool.mode;
        Session {
            shared,
            client,
            writer,
            out: BytesMut::with_capacity(8 * 1024),
            conns: Vec::new(),
            batch: Vec::new(),
            statements: FxHashMap::default(),
            unnamed: None,
            parses_unnamed: false,
            portal_changes: Vec::new(),
            portal_drops: Vec::new(),
            settings: login.settings,
            reported: login.status.clone(),
            started: login.status,
            tx_changes: Vec::new(),
            tx: None,
            status: TxStatus::Idle,
            mode,
            cancel: login.cancel,
            spare_expect: Vec::new(),
            spare_batch: Vec::new(),
            spare_tag: Vec::new(),
            spare_wire: BytesMut::new(),
            skip_until_sync: false,
            merge: None,
            ryw: HashMap::new(),
            errors: 0,
            portals: Portals::default(),
            local_statements: HashMap::new(),
            local_portals: HashMap::new(),
            copy_in: None,
            copy_out: None,
        }
    }

    /// Relays until the client leaves or the proxy shuts down.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let end = self.relay(shutdown).await;
        debug!(?end, "session ended");
        let _ = self.flush_client().await;
        self.release_on_exit().await;
    }

    fn pending(&self) -> Option<usize> {
        self.conns.iter().position(|h| !h.expect.is_empty())
    }

    async fn relay(&mut self, shutdown: CancellationToken) -> End {
        let mut shutdown = ShutdownWait::new(shutdown);
        loop {
            let active = self.pending();
            // Batch writes to the client: flush only when no further server reply is buffered.
            let more_buffered = active.is_some_and(|i| self.conns[i].conn.reader.has_frame());
            if !self.out.is_empty()
                && !more_buffered
                && (self.flush_client_now().is_err()
                    || (!self.out.is_empty() && self.flush_client().await.is_err()))
            {
                return End::ClientGone;
            }
            // With nothing pending, a held connection (session pooling, an open transaction) is
            // still watched: notifications and notices arrive between requests.
            let polled = active.or(if self.conns.is_empty() { None } else { Some(0) });
            let event = match polled {
                Some(i) if active.is_none() => {
                    let held = &mut self.conns[i];
                    tokio::select! {
                        biased;
                        r = self.client.ready() => Event::Client(r),
                        r = held.conn.reader.ready() => Event::Server(r),
                        () = &mut shutdown => {
                            super::fatal_error(&mut self.out, "57P01", "terminating connection due to administrator command");
                            return End::Fatal;
                        }
                    }
                }
                Some(i) => {
                    let held = &mut self.conns[i];
                    tokio::select! {
                        biased;
                        r = held.conn.reader.ready() => Event::Server(r),
                        r = self.client.ready() => Event::Client(r),
                    }
                }
                None => tokio::select! {
                    biased;
                    r = self.client.ready() => Event::Client(r),
                    () = &mut shutdown => {
                        super::fatal_error(&mut self.out, "57P01", "terminating connection due to administrator command");
                        return End::Fatal;
                    }
                },
            };
            let step = match event {
                Event::Client(Ok(())) => self.on_client_ready().await,
                Event::Client(Err(e)) => Err(self.client_error(e)),
                Event::Server(Ok(())) => {
                    let i =
                        polled.expect("invariant: server events come from the polled connection");
                    self.on_buffered(i)
                }
                Event::Server(Err(e)) => {
                    let i =
                        polled.expect("invariant: server events come from the polled connection");
                    let addr = self.conns[i].conn.addr.clone();
                    Err(self.server_lost(i, backend::Error::protocol(&addr, e)))
                }
            };
            match step {
                Ok(()) | Err(End::Recovered) => {}
                Err(end) => return end,
            }
            self.release_idle();
        }
    }

    /// The messages buffered from connection `i` (at least one): all of them, without a trip
    /// through the loop's `select!` per message. Stops where the loop would poll something
    /// else first: when another connection's replies come next, or `i` has nothing pending.
    fn on_buffered(&mut self, i: usize) -> Result<(), End> {
        loop {
            if self.forward_plain(i) && self.pending() != Some(i) {
                return Ok(());
            }
            match self.conns[i].conn.reader.try_next() {
                Ok(Some(frame)) => self.on_server(i, frame)?,
                Ok(None) => return Ok(()),
                Err(e) => {
                    let addr = self.conns[i].conn.addr.clone();
                    return Err(self.server_lost(i, backend::Error::protocol(&addr, e)));
                }
            }
            if self.pending() != Some(i) {
                return Ok(());
            }
        }
    }

    /// The messages of a reply the client gets as they are, with no bookkeeping beyond what
    /// `on_server` does for them: relayed straight from the read buffer, rows in one copy, no
    /// frame each. Stops at anything else (an error, a notice, COPY, a merge's rows), which
    /// `on_server` takes. Returns whether it relayed anything.
    fn forward_plain(&mut self, i: usize) -> bool {
        use tag::*;
        if self.merge.is_some() {
            return false;
        }
        let mut relayed = false;
        loop {
            let held = &mut self.conns[i];
            pop_synthetic(held, &mut self.out, None);
            let Some(Expect::Reply {
                kind,
                forward: true,
            }) = held.expect.front()
            else {
                return relayed;
            };
            let rows = match kind {
                // A session command's reply: the proxy may hold back or add messages.
                Kind::Query { changes, .. } if !changes.is_empty() => return relayed,
                Kind::Query { .. } => Some(true),
                Kind::Execute { .. } => Some(false),
                _ => None,
            };
            if let Some(query) = rows {
                let before = self.out.len();
                held.conn.reader.forward_while(
                    |t| t == DATA_ROW || (query && t == ROW_DESCRIPTION),
                    &mut self.out,
                );
                relayed |= self.out.len() > before;
            }
            let Some((t, msg)) = held.conn.reader.peek() else {
                return relayed;
            };
            let mut ready = None;
            let ends = match (kind, t) {
                (Kind::Parse { .. }, PARSE_COMPLETE)
                | (Kind::Bind { .. }, BIND_COMPLETE)
                | (Kind::Close, CLOSE_COMPLETE)
                | (Kind::Describe { .. }, ROW_DESCRIPTION | NO_DATA) => true,
                (Kind::Query { .. } | Kind::Execute { .. }, COMMAND_COMPLETE) => {
                    note_command(&mut held.last_tag, &msg[5..]);
                    rows == Some(false)
                }
                (Kind::Sync | Kind::Query { .. }, READY_FOR_QUERY) => {
                    match decode::ready_for_query(&msg[5..]) {
                        Ok(status) => ready = Some(status),
                        // on_server reports it.
                        Err(_) => return relayed,
                    }
                    true
                }
                _ => return relayed,
            };
            self.out.extend_from_slice(msg);
            let len = msg.len();
            held.conn.reader.consume(len);
            if let Some(status) = ready {
                held.note_ready(status);
            }
            relayed = true;
            if ends {
                let Some(Expect::Reply { kind, forward }) = held.expect.pop_front() else {
                    unreachable!("head checked above");
                };
                // Most replies change nothing the session tracks: what completed() does for
                // them, without the call.
                let untracked = forward
                    && match &kind {
                        Kind::Parse { .. }
                        | Kind::Bind { .. }
                        | Kind::Describe { .. }
                        | Kind::Close => true,
                        Kind::Execute { changes, dropped } => {
                            changes.is_empty() && dropped.is_none()
                        }
                        _ => false,
                    };
                if untracked {
                    drop(kind);
                    pop_synthetic(held, &mut self.out, None);
                } else {
                    self.completed(i, kind, t, forward);
                }
            }
            if self.pending() != Some(i) {
                return relayed;
            }
        }
    }

    /// Writes what the client's socket takes of the buffered replies now, without a future;
    /// [`Session::flush_client`] writes the rest, if any.
    fn flush_client_now(&mut self) -> std::io::Result<()> {
        match self.writer.try_write(&self.out) {
            Ok(n) if n == self.out.len() => self.out.clear(),
            Ok(n) => self.out.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }

    async fn flush_client(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let result = backend::write_all(&mut self.writer, &self.out).await;
        self.out.clear();
        result
    }

    fn client_error(&mut self, e: protocol::Error) -> End {
        match e {
            protocol::Error::Closed | protocol::Error::Io(_) => End::ClientGone,
            protocol::Error::TooLarge { tag, len, max } => {
                let msg = format!(
                    "message of type {tag:?} is {len} bytes, over the limit of {max} (limits.max_message_size)"
                );
                super::fatal_error(&mut self.out, "54000", &msg);
                End::Fatal
            }
            other => {
                super::fatal_error(
                    &mut self.out,
                    "08P01",
                    &format!("invalid frontend message: {other}"),
                );
                End::Fatal
            }
        }
    }

    /// A server connection died or broke protocol: the client's session cannot continue (its
    /// transaction state is gone), so it gets a FATAL error, as if Postgres had crashed.
    fn server_lost(&mut self, i: usize, e: backend::Error) -> End {
        if let Some(held) = self.conns.get_mut(i) {
            held.conn.broken = true;
        }
        let others_busy = self
            .conns
            .iter()
            .enumerate()
            .any(|(j, h)| j != i && !h.expect.is_empty());
        if self.conns.get(i).is_some_and(|h| h.key.server > 0)
            && self.tx.is_none()
            && self.merge.is_none()
            && !others_busy
        {
            warn!(cause = %e, "replica connection lost during a read");
            let held = self.conns.remove(i);
            let shard = held.key.shard;
            self.shared.health.shard(shard).replicas[held.key.server - 1]
                .healthy
                .store(false, std::sync::atomic::Ordering::Relaxed);
            drop(held);
            super::error(
                &mut self.out,
                e.sqlstate(),
                &format!("{e} (the read did not complete; retry it)"),
            );
            let status = self.client_status();
            build::ready_for_query(&mut self.out, status);
            return End::Recovered;
        }
        warn!(cause = %e, "server connection lost");
        super::fatal_error(&mut self.out, e.sqlstate(), &e.to_string());
        End::Fatal
    }

    fn desync(&mut self, i: usize, what: &str) -> End {
        let addr = self.conns[i].conn.addr.clone();
        self.server_lost(
            i,
            backend::Error::Protocol {
                addr,
                reason: format!("unexpected {what}: protocol desynchronized"),
            },
        )
    }

    /// The status the client should see now.
    fn client_status(&self) -> TxStatus {
        match &self.tx {
            Some(_) if self.tx_failed() => TxStatus::Failed,
            Some(_) => TxStatus::InTransaction,
            None => self.status,
        }
    }

    /// The transaction is aborted: by an error the proxy raised, or by an error on any shard
    /// (one shard's error aborts the whole logical transaction, as on one Postgres).
    fn tx_failed(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.failed)
            || (self.tx.is_some()
                && self
                    .conns
                    .iter()
                    .any(|h| h.begun && h.conn.status == TxStatus::Failed))
    }

    // === client messages ===

    /// The client's buffered messages: an extended-protocol pipeline whole up to its Sync (or
    /// Flush) is taken in one piece; anything else one message at a time.
    async fn on_client_ready(&mut self) -> Result<(), End> {
        use tag::*;
        if self.batch.is_empty()
            && !self.skip_until_sync
            && matches!(
                self.client.peek_tag(),
                Some(PARSE | BIND | DESCRIBE | EXECUTE | CLOSE)
            )
            && let Some(run) = self.client.take_run(
                |t| matches!(t, PARSE | BIND | DESCRIBE | EXECUTE | CLOSE),
                |t| matches!(t, SYNC | FLUSH),
            )
        {
            return self.run_pipeline(run).await;
        }
        match self.client.try_next() {
            Ok(Some(frame)) => self.on_client(frame).await,
            Ok(None) => Ok(()), // (ready() saw a whole message)
            Err(e) => Err(self.client_error(e)),
        }
    }

    async fn on_client(&mut self, frame: Frame) -> Result<(), End> {
        match frame.tag() {
            tag::QUERY => {
                if !self.batch.is_empty() {
                    self.run_batch().await?;
                }
                self.on_query(frame).await
            }
            tag::PARSE | tag::BIND | tag::DESCRIBE | tag::EXECUTE | tag::CLOSE => {
                if !self.skip_until_sync {
                    self.batch.push(frame);
                }
                // The rest of a pipeline usually came in the same read: collect it here rather
                // than through the relay loop's `select!` once per message.
                while let Some(
                    t @ (tag::PARSE
                    | tag::BIND
                    | tag::DESCRIBE
                    | tag::EXECUTE
                    | tag::CLOSE
                    | tag::SYNC
                    | tag::FLUSH),
                ) = self.client.peek_tag()
                {
                    let Ok(Some(frame)) = self.client.try_next() else {
                        break; // (peek_tag saw a whole message)
                    };
                    if matches!(t, tag::SYNC | tag::FLUSH) {
                        self.batch.push(frame);
                        return self.run_batch().await;
                    }
                    if !self.skip_until_sync {
                        self.batch.push(frame);
                    }
                }
                Ok(())
            }
            tag::SYNC | tag::FLUSH => {
                self.batch.push(frame);
                self.run_batch().await
            }
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL if self.copy_in.is_some() => {
                self.on_copy_in(frame).await
            }
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {
                // To the server in COPY mode; else to the one still answering a request, which
                // may be the COPY whose CopyInResponse has not come yet (a client may send its
                // data right behind the statement): Postgres reads it once in COPY mode, and
                // ignores it if the COPY failed. With nothing pending, ignored, as on Postgres.
                let copying = self.conns.iter().position(|h| h.copy_in);
                if let Some(i) = copying.or_else(|| self.pending()) {
                    if copying.is_some() && frame.tag() != tag::COPY_DATA {
                        self.conns[i].copy_in = false;
                    }
                    if let Err(e) = self.conns[i].conn.send(frame.bytes()).await {
                        return Err(self.server_lost(i, e));
                    }
                }
                Ok(())
            }
            tag::FUNCTION_CALL => {
                let i = match self.pin(ConnKey::primary(0)).await {
                    Ok(i) => i,
                    Err(e) => return self.refuse_request(&e).await,
                };
                self.send(
                    i,
                    frame.bytes().clone(),
                    Kind::Query {
                        changes: Vec::new(),
                        appended: 0,
                    },
                )
                .await
            }
            tag::TERMINATE => Err(End::ClientGone),
            other => {
                let msg = format!("invalid frontend message type {other}");
                super::fatal_error(&mut self.out, "08P01", &msg);
                Err(End::Fatal)
            }
        }
    }

    async fn on_query(&mut self, frame: Frame) -> Result<(), End> {
        // A reference-counted view of the text, so `frame` can move on without a copy.
        let body = frame.bytes().slice(5..);
        // The text is the body but its final NUL. A NUL before that makes the message
        // malformed: the one server of a passthrough finds it itself, so only a router that
        // plans the text scans for it.
        let passthrough = self.shared.router.passthrough();
        let text = match body.split_last() {
            Some((0, text)) if passthrough => Ok(text),
            _ => decode::query(&body),
        };
        let text = match text {
            Ok(text) => text,
            // Postgres answers a malformed Query with an error and the session goes on. The one
            // server of a passthrough says so itself (its text is then looked at as empty: no
            // command of the proxy's); a router cannot plan it.
            Err(_) if passthrough => &[],
            Err(_) => {
                return self
                    .refuse(
                        "08P01",
                        "invalid message format: a Query's text must end it",
                    )
                    .await;
            }
        };
        // Checked as UTF-8 only when something reads it: a passed-through query never is.
        let sql = std::cell::LazyCell::new(|| decode::text(text));
        let mut next_id = next_id_call(text);
        let mut effects = super::settings::effects_of(text);
        if passthrough
            && (next_id.is_some() || !effects.is_empty())
            && memchr::memchr(0, text).is_some()
        {
            // A NUL inside: the server rejects the message whole, so nothing in it (a
            // DISCARD, a DEALLOCATE, tessera_next_id()) is the proxy's to act on.
            (next_id, effects) = (None, super::settings::Effects::default());
        }
        if let Some(column) = next_id {
            if self.tx_failed() {
                return self.aborted().await;
            }
            self.settle().await?;
            // A simple Query ends an implicit transaction a batch ended by Flush left open.
            self.end_implicit_all().await?;
            let id = self.shared.ids.next();
            next_id_description(&mut self.out, &column, 0);
            next_id_row(&mut self.out, id, 0);
            build::command_complete(&mut self.out, "SELECT 1");
            let status = self.client_status();
            build::ready_for_query(&mut self.out, status);
            return Ok(());
        }
        if effects.drops_prepared
            && let Some(reply) = self.deallocate(&sql)
        {
            // DEALLOCATE of a statement prepared through the protocol is answered here: the
            // server-side statement belongs to the proxy and other clients may share it. (As a
            // simple Query it ends an implicit transaction left open by a Flush.)
            self.end_implicit_all().await?;
            return self.reply_locally(reply);
        }
        let routed;
        let plan: &Plan = if passthrough {
            &PASSTHROUGH
        } else {
            let (analysis, literals) = self.shared.router.analyze_simple(&sql);
            routed = match self.shared.router.plan_sql(
                &analysis,
                &Params::from_literals(&literals),
                Some(&sql),
            ) {
                Ok(plan) => plan,
                Err(e) => {
                    // One statement Postgres cannot parse either gets Postgres' own error.
                    if !analysis.parsed && lex::statements(&sql).len() == 1 {
                        self.settle().await?;
                        if let Some(error) = Box::pin(self.syntax_error(&sql)).await {
                            self.out.extend_from_slice(&error);
                            self.request_failed();
                            return Ok(());
                        }
                    }
                    return self.refuse_statement(&e).await;
                }
            };
            &routed
        };
        if self.must_settle(plan) {
            // A statement pipelined behind replies still pending elsewhere in the transaction
            // (or ending it): those replies may abort the transaction, so they come first.
            self.settle().await?;
        }
        if self.tx.is_some()
            && plan.tx.is_none()
            && ((passthrough && may_move_savepoints(text)) || lex::statements(&sql).len() > 1)
        {
            // Savepoints the router leaves to the server (a passthrough's, or inside a
            // multi-statement query one shard runs): keep the stack.
            self.note_savepoints(&sql);
        }
        if let Some(cmd) = plan.tx {
            return Box::pin(self.on_tx_command(frame, cmd, &sql)).await;
        }
        // (A passthrough leaves transaction control to the one server, which enforces this.)
        if self.tx_failed() && !passthrough {
            return self.aborted().await;
        }
        if self.tx.is_some() && ends_transaction_inside(&sql) {
            // `UPDATE ...; COMMIT` would end the transaction on one shard only.
            let begun: BTreeSet<usize> = self
                .conns
                .iter()
                .filter(|h| h.begun)
                .map(|h| h.key.shard)
                .collect();
            let spans = begun.len() > 1
                || match &plan.fanout {
                    Fanout::One(s) => !begun.is_empty() && !begun.contains(&s.0),
                    _ => true,
                };
            if spans {
                return self
                    .refuse_statement(&router::Error::Unsupported(
                        "a multi-statement query that ends a transaction spanning shards (send COMMIT or ROLLBACK on its own)".into(),
                    ))
                    .await;
            }
        }
        match &plan.fanout {
            &Fanout::One(shard) => {
                if let Err(e) = self.note_write(plan, &[shard.0]) {
                    return self.refuse_statement(&e).await;
                }
                let key = self.choose(shard.0, plan);
                let i = match self.pin(key).await {
                    Ok(i) => i,
                    Err(e) => return self.refuse_request(&e).await,
                };
                let held = &mut self.conns[i];
                if effects.drops_all {
                    held.conn.prepared.clear();
                    if effects.changes.contains(&Change::DiscardAll) {
                        // DISCARD ALL drops the client's statements too, as on Postgres.
                        self.statements.clear();
                        self.unnamed = None;
                    }
                }
                let held = &mut self.conns[i];
                held.unnamed_ready = false;
                held.wrote |= plan.writes;
                let (message, appended) = self.with_restore(frame, text, &effects.changes);
                let discards = effects.changes.contains(&Change::DiscardAll);
                self.send(
                    i,
                    message,
                    Kind::Query {
                        changes: effects.changes,
                        appended,
                    },
                )
                .await?;
                if discards && self.tx.is_none() && lex::statements(&sql).len() == 1 {
                    self.restore_after_discard(i);
                }
                Ok(())
            }
            _ if plan.copy.as_ref().is_some_and(|c| !c.to) => {
                let spec = plan.copy.clone().expect("invariant: matched");
                Box::pin(self.start_copy_in(plan, spec, frame)).await
            }
            Fanout::Scatter(_) if lex::statements(&sql).len() > 1 => {
                self.refuse_statement(&router::Error::Unsupported(
                    "a multi-statement query on several shards".into(),
                ))
                .await
            }
            fanout => {
                let shards = self.fanout_shards(fanout);
                if let Err(e) = self.note_write(plan, &shards) {
                    return self.refuse_statement(&e).await;
                }
                let broadcast = matches!(fanout, Fanout::Broadcast);
                let bytes = match &plan.merge {
                    Some(m) => {
                        let mut msg = BytesMut::new();
                        build::query(&mut msg, &m.sql);
                        msg.freeze()
                    }
                    None => frame.into_bytes(),
                };
                let split = plan.split.clone();
                self.copy_out = plan.copy.clone().filter(|c| c.to);
                Box::pin(self.scatter(&shards, plan, broadcast, |session, i, wire| {
                    let shard = session.conns[i].key.shard;
                    match split
                        .as_ref()
                        .and_then(|parts| parts.iter().find(|p| p.0.0 == shard))
                    {
                        Some((_, part)) => build::query(wire, &part.sql),
                        None => wire.extend_from_slice(&bytes),
                    }
                    Ok(vec![Kind::Query {
                        changes: Vec::new(),
                        appended: 0,
                    }])
                }))
                .await
            }
        }
    }

    fn fanout_shards(&self, fanout: &Fanout) -> Vec<usize> {
        match fanout {
            Fanout::One(s) => vec![s.0],
            Fanout::Scatter(list) => list.iter().map(|s| s.0).collect(),
            Fanout::Broadcast => (0..self.shared.shards.len()).collect(),
        }
    }

    /// Tracks which shards a transaction writes to: one is fine; several need two-phase
    /// commit, which is not available yet.
    fn note_write(&mut self, plan: &Plan, shards: &[usize]) -> Result<(), router::Error> {
        if !plan.writes {
            return Ok(());
        }
        let Some(tx) = self.tx.as_mut() else {
            debug!(?shards, "write outside a transaction");
            return Ok(());
        };
        debug!(?shards, written = ?tx.written, "write in a transaction");
        let mut written = tx.written.clone();
        written.extend(shards.iter().copied());
        if written.len() > 1 && self.shared.decisions.is_none() {
            return Err(router::Error::Unsupported(
                "a transaction that writes to more than one shard with two-phase commit disabled (two_phase.enabled: false)".into(),
            ));
        }
        tx.written = written;
        Ok(())
    }

    /// Which server of `shard` runs a statement with this plan.
    fn choose(&self, shard: usize, plan: &Plan) -> ConnKey {
        // A transaction keeps the connection it already has on this shard.
        if self.tx.is_some()
            && let Some(held) = self.conns.iter().find(|h| h.key.shard == shard)
        {
            return held.key;
        }
        let routing = &self.shared.config.routing;
        let replica_wanted = routing.replica_reads
            && plan.replica_ok
            && match &self.tx {
                Some(tx) => tx.read_only,
                None => true,
            };
        if !replica_wanted || self.shared.shards[shard].replicas.is_empty() {
            return ConnKey::primary(shard);
        }
        if self.tx.is_none()
            && let Some(held) = self.conns.iter().find(|h| h.key.shard == shard)
        {
            // Session pooling (or a connection still finishing up): keep using it.
            return held.key;
        }
        let min_lsn = if routing.read_your_writes {
            self.ryw.get(&shard).copied()
        } else {
            None
        };
        match self
            .shared
            .health
            .shard(shard)
            .pick_replica(routing.load_balance, min_lsn)
        {
            Some(r) => ConnKey {
                shard,
                server: r + 1,
            },
            None => ConnKey::primary(shard),
        }
    }

    /// Transaction control: BEGIN is answered here and deferred; COMMIT and ROLLBACK go to
    /// every connection the transaction holds.
    async fn on_tx_command(&mut self, frame: Frame, cmd: TxCommand, sql: &str) -> Result<(), End> {
        match cmd {
            TxCommand::Begin { read_only } => {
                if self.tx_failed() {
                    return self.aborted().await;
                }
                if self.tx.is_some() || !self.conns.iter().all(|h| h.conn.status == TxStatus::Idle)
                {
                    // Already in a transaction: Postgres warns and carries on.
                    build::error_response(
                        &mut self.out,
                        build::Severity::Notice,
                        "25001",
                        "there is already a transaction in progress",
                    );
                    return self.reply_locally("BEGIN");
                }
                self.tx = Some(Tx {
                    begin: frame.into_bytes(),
                    read_only,
                    failed: false,
                    written: BTreeSet::new(),
                    savepoints: Vec::new(),
                    implicit: false,
                });
                self.begin_unsynced().await?;
                self.reply_locally("BEGIN")
            }
            TxCommand::Commit | TxCommand::Rollback => {
                let failed = self.tx_failed();
                if self.conns.len() > 1
                    && lex::Tokens::new(sql).any(|w| w.eq_ignore_ascii_case("chain"))
                {
                    return self
                        .refuse_statement(&router::Error::Unsupported(
                            "COMMIT/ROLLBACK AND CHAIN of a transaction that spans shards".into(),
                        ))
                        .await;
                }
                self.local_portals.clear();
                let held: Vec<usize> = (0..self.conns.len()).collect();
                match held.as_slice() {
                    [] => {
                        let was_open = self.tx.take().is_some();
                        if !was_open {
                            let msg = "there is no transaction in progress";
                            build::error_response(
                                &mut self.out,
                                build::Severity::Notice,
                                "25P01",
                                msg,
                            );
                        }
                        let tag = if cmd == TxCommand::Commit && !failed {
                            "COMMIT"
                        } else {
                            "ROLLBACK"
                        };
                        self.reply_locally(tag)
                    }
                    _ if cmd == TxCommand::Commit
                        && !failed
                        && self.tx.as_ref().is_some_and(|tx| tx.written.len() > 1) =>
                    {
                        self.commit_two_phase().await
                    }
                    [one] if !failed => {
                        let i = *one;
                        self.tx = None;
                        self.send(
                            i,
                            frame.into_bytes(),
                            Kind::Query {
                                changes: Vec::new(),
                                appended: 0,
                            },
                        )
                        .await
                    }
                    _ => {
                        // Several shards (or an aborted transaction): end it on each, one reply.
                        let mut msg = BytesMut::new();
                        let word = if cmd == TxCommand::Commit && !failed {
                            "COMMIT"
                        } else {
                            "ROLLBACK"
                        };
                        build::query(&mut msg, word);
                        let msg = msg.freeze();
                        let keys: Vec<ConnKey> = self.conns.iter().map(|h| h.key).collect();
                        self.tx = None;
                        self.scatter_on(&keys, true, None, |_, _, wire| {
                            wire.extend_from_slice(&msg);
                            Ok(vec![Kind::Query {
                                changes: Vec::new(),
                                appended: 0,
                            }])
                        })
                        .await
                    }
                }
            }
            TxCommand::Savepoint if self.tx.is_some() => {
                let Some(op) = SavepointOp::parse(sql) else {
                    return self
                        .refuse_statement(&router::Error::Unsupported(
                            "a savepoint statement the proxy cannot read".into(),
                        ))
                        .await;
                };
                if self.tx_failed() && !matches!(op, SavepointOp::RollbackTo(..)) {
                    return self.aborted().await;
                }
                if let Err(message) = self.track_savepoint(&op) {
                    return self.refuse("3B001", &message).await;
                }
                let begun: Vec<ConnKey> = self
                    .conns
                    .iter()
                    .filter(|h| h.begun)
                    .map(|h| h.key)
                    .collect();
                if begun.is_empty() {
                    // No shard has the transaction yet: each gets the savepoint when it joins.
                    return self.reply_locally(op.tag());
                }
                let bytes = frame.into_bytes();
                self.scatter_on(&begun, true, None, move |_, _, wire| {
                    wire.extend_from_slice(&bytes);
                    Ok(vec![Kind::Query {
                        changes: Vec::new(),
                        appended: 0,
                    }])
                })
                .await
            }
            TxCommand::Savepoint => {
                // Outside a transaction block: Postgres says what is wrong.
                let key = match self.conns.as_slice() {
                    [] => ConnKey::primary(0),
                    [one] => one.key,
                    _ => {
                        return self
                            .refuse_statement(&router::Error::Unsupported(
                                "a savepoint in a transaction that spans shards".into(),
                            ))
                            .await;
                    }
                };
                let i = match self.pin(key).await {
                    Ok(i) => i,
                    Err(e) => return self.refuse_request(&e).await,
                };
                self.send(
                    i,
                    frame.into_bytes(),
                    Kind::Query {
                        changes: Vec::new(),
                        appended: 0,
                    },
                )
                .await
            }
            TxCommand::TwoPhase => {
                self.refuse_statement(&router::Error::Unsupported(
                    "PREPARE TRANSACTION / COMMIT PREPARED through the proxy".into(),
                ))
                .await
            }
        }
    }

    /// SAVEPOINT, RELEASE or ROLLBACK TO through the extended protocol inside a transaction:
    /// run on every shard the transaction holds, answered as one.
    async fn extended_savepoint(&mut self, batch: &[Frame], begun: &[ConnKey]) -> Result<(), End> {
        self.settle().await?;
        let Some(op) = batch_sql(self, batch)
            .as_deref()
            .and_then(SavepointOp::parse)
        else {
            crate::frontend::error(
                &mut self.out,
                "0A000",
                "not supported across shards: a savepoint statement the proxy cannot read",
            );
            return self.end_failed_batch(true);
        };
        if self.tx_failed() && !matches!(op, SavepointOp::RollbackTo(..)) {
            crate::frontend::error(
                &mut self.out,
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            );
            return self.end_failed_batch(true);
        }
        if let Err(message) = self.track_savepoint(&op) {
            crate::frontend::error(&mut self.out, "3B001", &message);
            if let Some(tx) = self.tx.as_mut() {
                tx.failed = true;
            }
            return self.end_failed_batch(true);
        }
        let sql = match &op {
            SavepointOp::Create(n) => format!("SAVEPOINT {n}"),
            SavepointOp::Release(n) => format!("RELEASE SAVEPOINT {n}"),
            SavepointOp::RollbackTo(n) => format!("ROLLBACK TO SAVEPOINT {n}"),
        };
        let jobs: Vec<(ConnKey, String)> = begun.iter().map(|k| (*k, sql.clone())).collect();
        let errors = self.run_injected(&jobs).await?;
        let outcome = match errors.into_iter().flatten().next() {
            Some(error) => Err(error),
            None => Ok(op.tag()),
        };
        self.answer_tx_batch(batch, outcome)
    }

    /// In a transaction, a statement must wait for replies still pending on another connection
    /// (or any, for transaction control): an error among them aborts the whole transaction.
    fn must_settle(&self, plan: &Plan) -> bool {
        if self.tx.is_none() {
            return false;
        }
        let Some(i) = self.pending() else {
            return false;
        };
        plan.tx.is_some()
            || match &plan.fanout {
                Fanout::One(shard) => self.conns[i].key.shard != shard.0,
                _ => true,
            }
    }

    /// [`Session::track_savepoint`] for the savepoint commands among `sql`'s statements.
    fn note_savepoints(&mut self, sql: &str) {
        for stmt in lex::statements(sql) {
            if let Some(op) = SavepointOp::parse(stmt) {
                let _ = self.track_savepoint(&op);
            }
        }
    }

    /// Keeps the transaction's savepoint stack as Postgres does; an error for an unknown name.
    fn track_savepoint(&mut self, op: &SavepointOp) -> Result<(), String> {
        let Some(tx) = self.tx.as_mut() else {
            return Ok(());
        };
        let name = fold_name(op.name());
        let found = tx.savepoints.iter().rposition(|(_, n)| *n == name);
        match (op, found) {
            (SavepointOp::Create(raw), _) => tx.savepoints.push((raw.clone(), name)),
            (SavepointOp::Release(_), Some(at)) => {
                tx.savepoints.truncate(at);
                // A portal bound inside what is released now belongs to the level around it.
                for portal in self.local_portals.values_mut() {
                    portal.depth = portal.depth.min(at);
                }
            }
            (SavepointOp::RollbackTo(_), Some(at)) => {
                tx.savepoints.truncate(at + 1);
                // As on Postgres, portals bound since the savepoint are gone with what it undoes.
                self.local_portals.retain(|_, portal| portal.depth <= at);
                // Rolled back to a point before the error: the transaction goes on.
                tx.failed = false;
            }
            (_, None) => return Err(format!("savepoint \"{}\" does not exist", op.name())),
        }
        Ok(())
    }

    /// Inside a transaction the proxy aborted: everything but ROLLBACK fails, as on Postgres.
    async fn aborted(&mut self) -> Result<(), End> {
        self.settle().await?;
        super::error(
            &mut self.out,
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
        );
        build::ready_for_query(&mut self.out, TxStatus::Failed);
        Ok(())
    }

    /// Answers `DEALLOCATE name|ALL` for protocol-level statements without a server.
    fn deallocate(&mut self, sql: &str) -> Option<&'static str> {
        let stmts = lex::statements(sql);
        let [stmt] = stmts.as_slice() else {
            return None;
        };
        let mut words = lex::Tokens::new(stmt);
        if !words.next()?.eq_ignore_ascii_case("deallocate") {
            return None;
        }
        let mut name = words.next()?;
        if name.eq_ignore_ascii_case("prepare") {
            name = words.next()?;
        }
        if words.next().is_some() {
            return None;
        }
        if name.eq_ignore_ascii_case("all") {
            if self.mode == PoolMode::Session {
                return None; // SQL-level PREPAREs live on the server too: let it run there
            }
            self.statements.clear();
            return Some("DEALLOCATE ALL");
        }
        let key = if name.starts_with('"') {
            name.trim_matches('"').to_string()
        } else {
            name.to_ascii_lowercase()
        };
        let removed = self.statements.remove(key.as_bytes()).is_some()
            || self.statements.remove(name.as_bytes()).is_some();
        removed.then_some("DEALLOCATE")
    }

    /// Sends CommandComplete + ReadyForQuery in order with any replies still pending.
    fn reply_locally(&mut self, command: &str) -> Result<(), End> {
        let mut msg = BytesMut::new();
        build::command_complete(&mut msg, command);
        let status = self.client_status();
        match self.pending() {
            Some(i) => {
                // Behind the replies still pending, so the client gets them in request order.
                let held = &mut self.conns[i];
                held.expect.push_back(Expect::Synthetic(msg.freeze()));
                let mut rfq = BytesMut::new();
                build::ready_for_query(&mut rfq, status);
                held.expect.push_back(Expect::Synthetic(rfq.freeze()));
            }
            None => {
                self.out.extend_from_slice(&msg);
                build::ready_for_query(&mut self.out, status);
            }
        }
        Ok(())
    }

    /// No server connection for a simple Query: the client gets the error and stays connected.
    async fn refuse_request(&mut self, e: &backend::Error) -> Result<(), End> {
        self.refuse(e.sqlstate(), &e.to_string()).await
    }

    /// A statement the router refused.
    async fn refuse_statement(&mut self, e: &router::Error) -> Result<(), End> {
        debug!(cause = %e, "statement refused");
        self.refuse(e.sqlstate(), &e.to_string()).await
    }

    /// An error for a whole request, after the replies still pending; inside a transaction the
    /// transaction is aborted, as Postgres aborts it on any error.
    async fn refuse(&mut self, code: &str, message: &str) -> Result<(), End> {
        self.settle().await?;
        super::error(&mut self.out, code, message);
        self.request_failed();
        Ok(())
    }

    /// After the error written for a whole request: the transaction, if any, is aborted, and
    /// the client may go on.
    fn request_failed(&mut self) {
        self.abort_implicit();
        if let Some(tx) = self.tx.as_mut() {
            tx.failed = true;
        }
        let status = self.client_status();
        build::ready_for_query(&mut self.out, status);
    }

    async fn send(&mut self, i: usize, bytes: Bytes, kind: Kind) -> Result<(), End> {
        let held = &mut self.conns[i];
        tracing::trace!(conn = ?held.key, pid = held.conn.key.pid, ?kind, "send");
        held.expect.push_back(Expect::Reply {
            kind,
            forward: true,
        });
        let sent = match held.conn.send_now(&bytes) {
            Ok(n) => n,
            Err(e) => return Err(self.server_lost(i, e)),
        };
        if sent < bytes.len()
            && let Err(e) = held.conn.send(&bytes[sent..]).await
        {
            return Err(self.server_lost(i, e));
        }
        Ok(())
    }

    /// Ends the implicit transaction a batch ended by Flush left open on connection `i` with a
    /// Sync of the proxy's, which commits it as the client's Sync would, and waits for the
    /// connection's replies.
    async fn end_implicit(&mut self, i: usize) -> Result<(), End> {
        let mut sync = BytesMut::new();
        build::sync(&mut sync);
        self.conns[i].expect.push_back(Expect::Reply {
            kind: Kind::Sync,
            forward: false,
        });
        if let Err(e) = self.conns[i].conn.send(&sync).await {
            return Err(self.server_lost(i, e));
        }
        self.drain(i).await
    }

    /// An error the proxy raised for a request: outside a transaction block, it ends the
    /// implicit transaction a batch ended by Flush left open, which Postgres rolls back. The
    /// server is made to fail (`Kind::Fail`) and synced; the replies are the proxy's own. A
    /// connection that cannot take those at once is closed, which rolls back too. (Callers
    /// have settled the replies pending.)
    fn abort_implicit(&mut self) {
        if self.tx.is_some() || !self.conns.iter().any(|h| h.unsynced) {
            return;
        }
        let mut wire = BytesMut::new();
        fail(&mut wire);
        build::sync(&mut wire);
        let mut closed = false;
        for held in self.conns.iter_mut().filter(|h| h.unsynced) {
            let written = held.conn.writer.try_write(&wire);
            if written.is_ok_and(|n| n == wire.len()) {
                for kind in [Kind::Fail { unnamed: false }, Kind::Sync] {
                    held.expect.push_back(Expect::Reply {
                        kind,
                        forward: false,
                    });
                }
            } else {
                // (Never seen: a few bytes to a connection with nothing pending.)
                held.conn.broken = true;
                held.unsynced = false;
                closed = true;
            }
        }
        // In session pooling the connection carries the client's session (temporary tables,
        // locks): it stays with the client (its transaction then open until the client's next
        // Sync), marked to be closed rather than reused when the session ends.
        if closed && self.mode == PoolMode::Transaction {
            self.conns
                .retain(|h| !(h.conn.broken && h.expect.is_empty()));
            self.cancel
                .targets
                .set(self.conns.iter().map(|h| h.conn.key.clone()));
        }
    }

    /// A transaction block begun while a batch ended by Flush holds a connection in an
    /// implicit transaction: on Postgres BEGIN turns that into the block, so the block begins
    /// there now (ROLLBACK and COMMIT then reach it even if nothing else runs there).
    async fn begin_unsynced(&mut self) -> Result<(), End> {
        if let Some(i) = self.conns.iter().position(|h| h.unsynced && !h.begun) {
            let key = self.conns[i].key;
            if let Err(e) = self.pin(key).await {
                return Err(self.server_lost(i, e));
            }
        }
        Ok(())
    }

    /// The client's Sync, answered by the proxy: it ends the implicit transactions batches
    /// ended by Flush left open on servers.
    async fn end_implicit_all(&mut self) -> Result<(), End> {
        let open: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].unsynced)
            .collect();
        for i in open {
            self.end_implicit(i).await?;
        }
        Ok(())
    }

    /// Delivers every reply still pending, so a reply the proxy writes itself comes after them,
    /// in request order.
    async fn settle(&mut self) -> Result<(), End> {
        while let Some(i) = self.pending() {
            self.drain(i).await?;
        }
        Ok(())
    }

    /// Finishes every reply pending on connection `i`.
    async fn drain(&mut self, i: usize) -> Result<(), End> {
        while !self.conns[i].expect.is_empty() {
            self.read_one(i).await?;
        }
        Ok(())
    }

    /// Reads and handles one reply message from connection `i`.
    async fn read_one(&mut self, i: usize) -> Result<(), End> {
        match self.conns[i].conn.reader.next().await {
            Ok(frame) => self.on_server(i, frame)?,
            Err(e) => {
                let addr = self.conns[i].conn.addr.clone();
                return Err(self.server_lost(i, backend::Error::protocol(&addr, e)));
            }
        }
        // Keep client writes flowing for long results.
        if self.out.len() > 64 * 1024 && self.flush_client().await.is_err() {
            return Err(End::ClientGone);
        }
        Ok(())
    }

    /// Makes sure connection `key` is held and nothing else has replies pending; returns its
    /// index. A new connection gets the session's settings and, inside a transaction, its BEGIN.
    async fn pin(&mut self, key: ConnKey) -> Result<usize, backend::Error> {
        let lost = || backend::Error::Io {
            addr: String::new(),
            reason: "lost a server connection".into(),
        };
        if let Some(i) = self.pending()
            && self.conns[i].key != key
            && self.drain(i).await.is_err()
        {
            return Err(lost());
        }
        // Work moving on from a connection left in an implicit transaction (a batch ended by
        // Flush) ends that transaction first, as within a batch.
        if let Some(i) = self.conns.iter().position(|h| h.unsynced && h.key != key)
            && self.end_implicit(i).await.is_err()
        {
            return Err(lost());
        }
        if let Some(i) = self.conns.iter().position(|h| h.key == key) {
            let held = &mut self.conns[i];
            if let Some(tx) = &self.tx
                && !held.begun
            {
                // Held from before the transaction began (a write's WAL-position probe still
                // running, or session pooling): the transaction starts here now.
                held.begun = true;
                let mut wire = BytesMut::from(&tx.begin[..]);
                held.expect.push_back(Expect::Reply {
                    kind: Kind::Query {
                        changes: Vec::new(),
                        appended: 0,
                    },
                    forward: false,
                });
                if let Some(replay) = savepoint_replay(tx) {
                    wire.extend_from_slice(&replay);
                    held.expect.push_back(Expect::Reply {
                        kind: Kind::Query {
                            changes: Vec::new(),
                            appended: 0,
                        },
                        forward: false,
                    });
                }
                held.conn.send(&wire).await?;
            }
            return Ok(i);
        }
        let shard = &self.shared.shards[key.shard];
        let pool = if key.server == 0 {
            &shard.primary
        } else {
            &shard.replicas[key.server - 1]
        };
        let got = match pool.try_get() {
            Some(conn) => Ok(conn),
            None => pool.get().await,
        };
        let mut conn = match got {
            Ok(conn) => conn,
            Err(e) if key.server > 0 && self.tx.is_none() => {
                // A replica that cannot be reached leaves the rotation now (its probe brings it
                // back) and the read goes to the primary: the client sees no error.
                warn!(cause = %e, "replica unavailable, reading from the primary");
                self.shared.health.shard(key.shard).replicas[key.server - 1]
                    .healthy
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                return Box::pin(self.pin(ConnKey::primary(key.shard))).await;
            }
            Err(e) => {
                warn!(cause = %e, "no server connection");
                return Err(e);
            }
        };
        self.cancel.targets.set(
            self.conns
                .iter()
                .map(|h| h.conn.key.clone())
                .chain(std::iter::once(conn.key.clone())),
        );
        let mut expect = self.spare_expect.pop().unwrap_or_default();
        let mut wire = BytesMut::new();
        let fingerprint = self.settings.fingerprint();
        if conn.settings != fingerprint {
            build::query(&mut wire, &self.settings.replay_sql());
            conn.settings = fingerprint;
            expect.push_back(Expect::Reply {
                kind: Kind::Query {
                    changes: Vec::new(),
                    appended: 0,
                },
                forward: false,
            });
        }
        if let Some(tx) = &self.tx {
            wire.extend_from_slice(&tx.begin);
            expect.push_back(Expect::Reply {
                kind: Kind::Query {
                    changes: Vec::new(),
                    appended: 0,
                },
                forward: false,
            });
            if let Some(replay) = savepoint_replay(tx) {
                wire.extend_from_slice(&replay);
                expect.push_back(Expect::Reply {
                    kind: Kind::Query {
                        changes: Vec::new(),
                        appended: 0,
                    },
                    forward: false,
                });
            }
        }
        if !wire.is_empty() {
            conn.send(&wire).await?;
        }
        self.conns.push(Held {
            key,
            conn,
            expect,
            unnamed_ready: false,
            copy_in: false,
            query_failed: false,
            last_tag: std::mem::take(&mut self.spare_tag),
            wrote: false,
            begun: self.tx.is_some(),
            injected_error: None,
            failing: false,
            rolled_back: false,
            unsynced: false,
            withheld: Vec::new(),
            // Only replicas count reads in flight (for least-busy balancing).
            _in_flight: (key.server > 0)
                .then(|| self.shared.health.shard(key.shard).replicas[key.server - 1].enter()),
        });
        Ok(self.conns.len() - 1)
    }

    fn index(&self, key: ConnKey) -> usize {
        self.conns
            .iter()
            .position(|h| h.key == key)
            .expect("invariant: connections are released only between requests")
    }

    // === extended protocol ===

    /// A pipeline taken whole from the client's buffer (see [`Session::on_client_ready`]).
    /// With nothing to plan and nothing the proxy answers itself, its messages go through
    /// [`Session::passthrough`] straight from that one buffer; otherwise it becomes a batch
    /// of frames like any other.
    async fn run_pipeline(&mut self, run: Bytes) -> Result<(), End> {
        // One look at every message: how the run ends, and whether the proxy may answer one.
        let (mut has_sync, mut local) = (false, false);
        for m in protocol::messages(&run) {
            has_sync = m[0] == tag::SYNC;
            local |= m[0] == tag::PARSE && self.may_answer(m);
        }
        if self.shared.router.passthrough() && !self.holds_local() && !local {
            return self.passthrough(protocol::messages(&run), has_sync).await;
        }
        let mut at = 0;
        for msg in protocol::messages(&run) {
            self.batch
                .push(Frame::from_bytes(run.slice(at..at + msg.len())));
            at += msg.len();
        }
        self.run_batch().await
    }

    /// Sends a buffered extended-protocol batch (ending in Sync or Flush), routing each
    /// Bind by its statement and values.
    async fn run_batch(&mut self) -> Result<(), End> {
        // The next batch collects into the spare vector, so neither allocates in steady state.
        let mut batch = std::mem::replace(&mut self.batch, std::mem::take(&mut self.spare_batch));
        let has_sync = batch.iter().any(|f| f.tag() == tag::SYNC);
        self.parses_unnamed = false;
        if !self.local_portals.is_empty() && self.pending().is_some() {
            // A reply still pending may end the transaction and the proxy's portals with it
            // (a pipelined COMMIT): it decides whether this batch's Execute is the proxy's.
            self.settle().await?;
        }
        let local = self.answers_locally(&batch);
        if local == Local::Mixed {
            return self.fail_batch("0A000", "tessera_next_id() in one pipeline with other statements: send it with a Sync of its own", has_sync).await;
        }
        if local == Local::All {
            if self.tx_failed() {
                return self.fail_batch("25P02", "current transaction is aborted, commands ignored until end of transaction block", has_sync).await;
            }
            return Box::pin(self.run_local_batch(batch)).await;
        }
        if let Some(sql) = self.deallocate_batch(&batch) {
            // (After the replies pending: one may abort the transaction, or fail a batch ended
            // by Flush, whose messages up to the Sync are then skipped.)
            self.settle().await?;
            if !self.tx_failed()
                && !self.skip_until_sync
                && let Some(reply) = self.deallocate(&sql)
            {
                // As a simple Query's DEALLOCATE of a statement prepared through the protocol
                // (its Sync ends an implicit transaction a Flush left open, as on the server).
                self.end_implicit_all().await?;
                return self.answer_tx_batch(&batch, Ok(reply));
            }
        }
        // A lone Sync with nothing pending needs no server: answer it here. (Not one that ends
        // an implicit transaction a Flush left open: that server needs it.)
        if self.pending().is_none()
            && batch.len() == 1
            && has_sync
            && !self.conns.iter().any(|h| h.unsynced)
        {
            self.skip_until_sync = false;
            let status = self.client_status();
            build::ready_for_query(&mut self.out, status);
            return Ok(());
        }
        if self.shared.router.passthrough() {
            return self.passthrough_batch(batch, has_sync).await;
        }
        self.parses_unnamed = batch
            .iter()
            .any(|f| f.tag() == tag::PARSE && f.body().first() == Some(&0));
        // Route every Bind; a batch normally targets one place. A Parse earlier in the batch
        // defines the statement its Binds use, so planning sees the batch in order.
        let mut overlay: HashMap<Bytes, (Arc<Analysis>, Vec<u32>, Bytes)> = HashMap::new();
        let mut parsed_at: HashMap<Bytes, usize> = HashMap::new();
        let mut targets: Vec<Option<Plan>> = Vec::with_capacity(batch.len());
        // A statement the router cannot plan: the message where Postgres would fail (the
        // Parse of a syntax error, else the Bind), and the error.
        let mut cut: Option<(usize, Bytes)> = None;
        for (n, frame) in batch.iter().enumerate() {
            if frame.tag() == tag::PARSE
                && !self.shared.router.passthrough()
                && let Ok(parse) = decode::parse(frame.body())
            {
                let sql = String::from_utf8_lossy(parse.query);
                let name = Bytes::copy_from_slice(parse.name);
                parsed_at.insert(name.clone(), n);
                overlay.insert(
                    name,
                    (
                        self.shared.router.analyze(&sql),
                        crate::server::parse_param_types(parse.param_types),
                        frame.bytes().clone(),
                    ),
                );
            }
            targets.push(match frame.tag() {
                tag::BIND => match self.plan_bind(frame, &overlay) {
                    Ok(plan) => plan,
                    Err(e) => {
                        cut = Some(
                            Box::pin(self.unplanned(frame, &e, &overlay, &parsed_at, n)).await,
                        );
                        break;
                    }
                },
                _ => None,
            });
        }
        if let Some((at, error)) = &cut {
            if *at == 0 {
                // Nothing before it: the error is the batch's whole answer.
                self.settle().await?;
                self.out.extend_from_slice(error);
                if let Some(tx) = self.tx.as_mut() {
                    tx.failed = true;
                }
                return self.end_failed_batch(has_sync);
            }
            // What comes before runs, as on Postgres; the rest is skipped up to the Sync.
            targets.resize_with(batch.len(), || None);
            for target in &mut targets[*at..] {
                *target = None;
            }
        }
        if self.tx.is_some() && targets.iter().flatten().count() > 1 {
            // Savepoints pipelined with other statements (one shard runs them, as pgjdbc's
            // autosave does): keep the stack in step with the server.
            for (n, plan) in targets.iter().enumerate() {
                if plan
                    .as_ref()
                    .is_some_and(|p| p.tx == Some(TxCommand::Savepoint))
                    && let Some(op) = bind_sql(self, &batch, n)
                        .as_deref()
                        .and_then(SavepointOp::parse)
                {
                    let _ = self.track_savepoint(&op);
                }
            }
        }
        if targets.iter().flatten().any(|p| self.must_settle(p)) {
            // As in on_query: replies pending elsewhere may abort the transaction first.
            self.settle().await?;
        }
        let plans: Vec<&Plan> = targets.iter().flatten().collect();
        // A Bind of a statement the client does not have has no plan: its error comes in order
        // from batch_message, so no shortcut below may answer the batch as a whole.
        let binds = batch.iter().filter(|f| f.tag() == tag::BIND).count();
        let one_bind = binds == 1 && plans.len() == 1;
        // An aborted transaction accepts only ROLLBACK (and ROLLBACK TO SAVEPOINT).
        let ends_tx = |p: &&Plan| {
            matches!(
                p.tx,
                Some(TxCommand::Rollback | TxCommand::Savepoint | TxCommand::Commit)
            )
        };
        // (An Execute of a portal bound before the abort has no plan: refused all the same,
        // after the replies pending, which may be what aborts it.)
        let runs_portal = plans.is_empty() && batch.iter().any(|f| f.tag() == tag::EXECUTE);
        if runs_portal && self.tx.is_some() {
            self.settle().await?;
        }
        if self.tx_failed()
            && !self.shared.router.passthrough()
            && (runs_portal || !plans.iter().all(ends_tx))
        {
            return self.fail_batch("25P02", "current transaction is aborted, commands ignored until end of transaction block", has_sync).await;
        }
        // Transaction control through the extended protocol goes where the transaction is.
        if let Some(tx_plan) = plans.iter().find(|p| p.tx.is_some()) {
            let cmd = tx_plan.tx.expect("invariant: found by tx");
            let begun: Vec<ConnKey> = self
                .conns
                .iter()
                .filter(|h| h.begun)
                .map(|h| h.key)
                .collect();
            if let TxCommand::Begin { read_only } = cmd
                && self.tx.is_none()
                && let Some(at) = one_statement(&batch)
                && let Some(sql) = bind_sql(self, &batch, at)
                && {
                    // (Replies pending may leave a transaction or a Flush's open.)
                    self.settle().await?;
                    self.tx.is_none()
                        && !self.skip_until_sync
                        && self
                            .conns
                            .iter()
                            .all(|h| !h.unsynced && h.conn.status == TxStatus::Idle)
                }
            {
                // Answered here and deferred, as a simple-Query BEGIN is: the transaction
                // begins on each shard when it first sends a statement there. (After a batch
                // ended by Flush it goes to that connection instead, and takes that batch in.)
                let mut begin = BytesMut::new();
                build::query(&mut begin, &sql);
                self.tx = Some(Tx {
                    begin: begin.freeze(),
                    read_only,
                    failed: false,
                    written: BTreeSet::new(),
                    savepoints: Vec::new(),
                    implicit: false,
                });
                return self.answer_tx_batch(&batch, Ok("BEGIN"));
            }
            if cmd == TxCommand::Savepoint
                && self.tx.is_some()
                && one_bind
                && batch.last().map(Frame::tag) == Some(tag::SYNC)
            {
                return Box::pin(self.extended_savepoint(&batch, &begun)).await;
            }
            if matches!(cmd, TxCommand::Commit | TxCommand::Rollback)
                && self.tx_failed()
                && one_bind
                && batch.last().map(Frame::tag) == Some(tag::SYNC)
            {
                // Aborted (perhaps by an error the proxy raised, which the server never saw):
                // it ends in a rollback whatever the client asked, on every shard it holds.
                self.settle().await?;
                let jobs: Vec<(ConnKey, String)> =
                    begun.iter().map(|k| (*k, "ROLLBACK".to_string())).collect();
                Box::pin(self.run_injected(&jobs)).await?;
                self.end_two_phase("ROLLBACK");
                return self.answer_tx_batch(&batch, Ok("ROLLBACK"));
            }
            if begun.len() > 1
                && batch_sql(self, &batch).is_some_and(|sql| {
                    lex::Tokens::new(&sql).any(|w| w.eq_ignore_ascii_case("chain"))
                })
            {
                return self.fail_batch("0A000", "not supported across shards: COMMIT/ROLLBACK AND CHAIN of a transaction that spans shards", has_sync).await;
            }
            if begun.len() > 1 {
                if !one_bind
                    || cmd == TxCommand::Savepoint
                    || batch.last().map(Frame::tag) != Some(tag::SYNC)
                {
                    return self.fail_batch("0A000", "not supported across shards: this transaction control statement in a transaction that spans shards", has_sync).await;
                }
                // COMMIT / ROLLBACK on every shard of the transaction (two-phase if it wrote on
                // several), one reply in the extended protocol. A transaction the proxy aborted
                // is rolled back whatever the client asked.
                self.settle().await?;
                let rollback = self.tx_failed() || cmd == TxCommand::Rollback;
                let written = self.tx.as_ref().map_or(0, |tx| tx.written.len());
                let outcome = if !rollback && written > 1 {
                    Box::pin(self.two_phase()).await?.map_or(Ok("COMMIT"), Err)
                } else {
                    let word = if rollback { "ROLLBACK" } else { "COMMIT" };
                    let jobs: Vec<(ConnKey, String)> =
                        begun.iter().map(|k| (*k, word.to_string())).collect();
                    let errors = Box::pin(self.run_injected(&jobs)).await?;
                    self.end_two_phase(word);
                    match errors.into_iter().flatten().next() {
                        Some(error) => Err(error),
                        None => Ok(word),
                    }
                };
                return self.answer_tx_batch(&batch, outcome);
            }
        }
        if let Some(multi) = plans.iter().find(|p| !matches!(p.fanout, Fanout::One(_))) {
            let multi = (*multi).clone();
            if !one_bind {
                return self.fail_batch("0A000", "not supported across shards: a pipeline of several statements where one spans shards", has_sync).await;
            }
            return Box::pin(self.scatter_batch(batch, multi)).await;
        }
        for plan in &plans {
            let Fanout::One(shard) = plan.fanout else {
                unreachable!("checked above")
            };
            if let Err(e) = self.note_write(plan, &[shard.0]) {
                self.settle().await?;
                super::error(&mut self.out, e.sqlstate(), &e.to_string());
                if let Some(tx) = self.tx.as_mut() {
                    tx.failed = true;
                }
                return self.end_failed_batch(has_sync);
            }
        }
        // One connection per run of messages with the same target.
        let default_key = self.default_key(plans.first().copied());
        // The connection this batch's messages go to (none chosen yet).
        let mut current: Option<usize> = None;
        // Sized for the batch as sent; ensure_prepared/ensure_unnamed may add a Parse.
        let mut wire =
            BytesMut::with_capacity(batch.iter().map(|f| f.bytes().len()).sum::<usize>() + 256);
        for (n, frame) in batch.drain(..).enumerate() {
            // (With everything before it skipped, so is the error: there is nothing to end.)
            if let Some((_, error)) = cut.take_if(|(at, _)| *at == n)
                && let Some(i) = current
                && !self.skip_until_sync
            {
                let unnamed = frame.tag() == tag::PARSE && frame.body().first() == Some(&0);
                self.queue_error(i, error, unnamed, &mut wire);
            }
            if self.skip_until_sync && frame.tag() != tag::SYNC {
                continue;
            }
            let key = match &targets[n] {
                Some(plan) => self.bind_key(plan),
                None if let Some(key) = portal_of(&frame).and_then(|p| self.portals.get(p)) => key,
                None => match current {
                    Some(i)
                        if frame.tag() != tag::PARSE
                            || self.next_bind_key(&targets, n).is_none() =>
                    {
                        self.conns[i].key
                    }
                    _ => self.next_bind_key(&targets, n).unwrap_or(default_key),
                },
            };
            let switch = current.is_none_or(|i| self.conns[i].key != key);
            if switch {
                if let Some(i) = current {
                    // Leaving a connection mid-batch: close its part with a Sync of our own.
                    build::message(&mut wire, tag::SYNC, |_| {});
                    self.conns[i].expect.push_back(Expect::Reply {
                        kind: Kind::Sync,
                        forward: false,
                    });
                    if let Err(e) = self.conns[i].conn.send(&wire).await {
                        return Err(self.server_lost(i, e));
                    }
                    wire.clear();
                    let errors_before = self.errors;
                    self.drain(i).await?;
                    if self.errors > errors_before {
                        // Postgres would skip the rest of the batch up to Sync.
                        self.skip_until_sync = true;
                        continue;
                    }
                }
                match self.pin(key).await {
                    Ok(i) => current = Some(i),
                    Err(e) => {
                        return self
                            .fail_batch(e.sqlstate(), &e.to_string(), has_sync)
                            .await;
                    }
                }
            }
            let i = current.expect("invariant: pinned above");
            if let Some(plan) = &targets[n] {
                self.conns[i].wrote |= plan.writes;
            }
            if let Err(e) = self.batch_message(i, frame.bytes(), &mut wire) {
                return Err(self.client_error(e));
            }
        }
        self.spare_batch = batch;
        if let Some(i) = current {
            // (As in `passthrough`; a connection left mid-batch got a Sync of the proxy's.)
            self.conns[i].unsynced = !has_sync;
        }
        let sent = self.send_batch(current, &wire).await;
        if wire.capacity() <= SPARE_WIRE_MAX {
            wire.clear();
            self.spare_wire = wire;
        }
        sent
    }

    /// One server and nothing to plan (see [`router::Router::passthrough`]): the batch goes to the one
    /// primary as it came, with the client's statement names mapped to the proxy's.
    async fn passthrough_batch(
        &mut self,
        mut batch: Vec<Frame>,
        has_sync: bool,
    ) -> Result<(), End> {
        let sent = self
            .passthrough(batch.iter().map(|f| &f.bytes()[..]), has_sync)
            .await;
        batch.clear();
        self.spare_batch = batch;
        sent
    }

    /// [`Session::passthrough_batch`] for messages (each whole, with type and length) from
    /// wherever they were read.
    async fn passthrough<'a>(
        &mut self,
        messages: impl Iterator<Item = &'a [u8]>,
        has_sync: bool,
    ) -> Result<(), End> {
        let mut wire = std::mem::take(&mut self.spare_wire);
        let mut current = None;
        for msg in messages {
            if self.skip_until_sync && msg[0] != tag::SYNC {
                continue;
            }
            let i = match current {
                Some(i) => i,
                None => match self.pin(ConnKey::primary(0)).await {
                    Ok(i) => *current.insert(i),
                    Err(e) => {
                        return self
                            .fail_batch(e.sqlstate(), &e.to_string(), has_sync)
                            .await;
                    }
                },
            };
            if self.tx.is_some()
                && msg[0] == tag::PARSE
                && let Ok(parse) = decode::parse(&msg[5..])
                && may_move_savepoints(parse.query)
                && let Some(op) = SavepointOp::parse(&decode::text(parse.query))
            {
                // The one server keeps the savepoints; the stack is kept for the proxy's own
                // portals, which a ROLLBACK TO ends.
                let _ = self.track_savepoint(&op);
            }
            if let Err(e) = self.batch_message(i, msg, &mut wire) {
                return Err(self.client_error(e));
            }
        }
        if let Some(i) = current {
            // A batch ends at its first Sync or Flush: one ended by Flush leaves the server in
            // an implicit transaction.
            self.conns[i].unsynced = !has_sync;
        }
        let sent = self.send_batch(current, &wire).await;
        if wire.capacity() <= SPARE_WIRE_MAX {
            wire.clear();
            self.spare_wire = wire;
        }
        sent
    }

    /// Sends the batch's messages to the connection they went to (none if every one was skipped
    /// or answered by the proxy).
    async fn send_batch(&mut self, current: Option<usize>, wire: &[u8]) -> Result<(), End> {
        let Some(i) = current else {
            return Ok(());
        };
        pop_synthetic(&mut self.conns[i], &mut self.out, self.merge.as_ref());
        if wire.is_empty() {
            return Ok(());
        }
        let conn = &mut self.conns[i].conn;
        let sent = match conn.send_now(wire) {
            Ok(n) => n,
            Err(e) => return Err(self.server_lost(i, e)),
        };
        if sent < wire.len()
            && let Err(e) = conn.send(&wire[sent..]).await
        {
            return Err(self.server_lost(i, e));
        }
        Ok(())
    }

    /// An error the proxy raises for a whole batch, after the replies still pending; then
    /// as [`Session::end_failed_batch`].
    async fn fail_batch(&mut self, code: &str, message: &str, has_sync: bool) -> Result<(), End> {
        self.settle().await?;
        super::error(&mut self.out, code, message);
        self.end_failed_batch(has_sync)
    }

    /// After an error raised by the proxy for a batch: skip to Sync, which gets its
    /// ReadyForQuery so the client can go on.
    fn end_failed_batch(&mut self, has_sync: bool) -> Result<(), End> {
        self.abort_implicit();
        if std::mem::take(&mut self.parses_unnamed) {
            // A Bind of the unnamed statement now fails (26000) rather than runs the old one.
            self.unnamed = None;
            for held in &mut self.conns {
                held.unnamed_ready = false;
            }
        }
        // Callers settle pending replies before they write their error.
        if has_sync {
            self.skip_until_sync = false;
            let status = self.client_status();
            build::ready_for_query(&mut self.out, status);
        } else {
            self.skip_until_sync = true;
        }
        Ok(())
    }

    /// Where messages with no Bind of their own go (a Parse/Describe-only batch): the
    /// connection the transaction already has, or the first shard's primary.
    fn default_key(&self, plan: Option<&Plan>) -> ConnKey {
        if let Some(plan) = plan
            && let Fanout::One(shard) = plan.fanout
        {
            return self.choose(shard.0, plan);
        }
        // A batch continuing an unfinished one (after a Flush) goes where that one went.
        if let Some(i) = self.pending() {
            return self.conns[i].key;
        }
        self.conns.first().map_or(ConnKey::primary(0), |h| h.key)
    }

    fn next_bind_key(&self, targets: &[Option<Plan>], from: usize) -> Option<ConnKey> {
        targets[from..]
            .iter()
            .flatten()
            .next()
            .map(|plan| self.bind_key(plan))
    }

    /// Where a Bind with this plan goes in a batch for one shard (a Parse before it goes
    /// there too): transaction control where the transaction is (or the implicit one a batch
    /// ended by Flush left open, which a BEGIN takes in), anything else by its shard.
    fn bind_key(&self, plan: &Plan) -> ConnKey {
        if plan.tx.is_some() {
            return self
                .conns
                .iter()
                .find(|h| h.begun)
                .or_else(|| self.conns.iter().find(|h| h.unsynced))
                .map_or(ConnKey::primary(0), |h| h.key);
        }
        match plan.fanout {
            Fanout::One(shard) => self.choose(shard.0, plan),
            _ => ConnKey::primary(0),
        }
    }

    /// The plan of a Bind: its statement's analysis evaluated with its values. None for a
    /// statement the client does not have: its error comes in order from batch_message, on
    /// the connection the batch is using (where that error then ends the transaction).
    fn plan_bind(
        &self,
        frame: &Frame,
        overlay: &HashMap<Bytes, (Arc<Analysis>, Vec<u32>, Bytes)>,
    ) -> Result<Option<Plan>, router::Error> {
        if self.shared.router.passthrough() {
            return Ok(Some(Plan::clone(&PASSTHROUGH)));
        }
        let bad = |_| router::Error::BadKey("malformed Bind message".into());
        let bind = decode::bind(frame.body()).map_err(bad)?;
        let (analysis, types, parse) =
            if let Some((analysis, types, parse)) = overlay.get(bind.statement) {
                // Parsed earlier in this batch; server-described types (if the statement existed
                // already: a driver parses the unnamed statement again before each use) are
                // better than the Parse's unspecified ones.
                let learned = if bind.statement.is_empty() {
                    self.unnamed
                        .as_ref()
                        .filter(|u| u.parse == *parse)
                        .map(|u| u.types.clone())
                } else {
                    self.statements
                        .get(bind.statement)
                        .map(|s| s.param_types.lock().clone())
                };
                let learned = learned.filter(|t| t.len() >= types.len() && !t.contains(&0));
                (
                    analysis.clone(),
                    learned.unwrap_or_else(|| types.clone()),
                    parse.clone(),
                )
            } else if bind.statement.is_empty() {
                match self.unnamed.as_deref() {
                    Some(Unnamed {
                        analysis: Some(analysis),
                        types,
                        parse,
                        ..
                    }) => (analysis.clone(), types.clone(), parse.clone()),
                    _ => return Ok(None),
                }
            } else {
                match self.statements.get(bind.statement) {
                    Some(stmt) => (
                        stmt.analysis.clone(),
                        stmt.param_types.lock().clone(),
                        stmt.parse.clone(),
                    ),
                    None => return Ok(None),
                }
            };
        let params = Params::from_bind(bind.rest, &types).map_err(bad)?;
        // The text is needed only to rewrite a merged statement or split an INSERT.
        let sql = analysis
            .needs_text()
            .then(|| decode::parse(parse.get(5..)?).ok())
            .flatten()
            .map(|p| String::from_utf8_lossy(p.query).into_owned());
        self.shared
            .router
            .plan_sql(&analysis, &params, sql.as_deref())
            .map(Some)
    }

    /// One extended-protocol message of a batch (`msg` whole: type, length, body) on its way to
    /// connection `i`: what goes on the wire (the client's names mapped to the proxy's, a Parse
    /// the connection lacks), and the reply it expects.
    fn batch_message(
        &mut self,
        i: usize,
        msg: &[u8],
        wire: &mut BytesMut,
    ) -> Result<(), protocol::Error> {
        let reply = |kind| Expect::Reply {
            kind,
            forward: true,
        };
        match msg[0] {
            tag::PARSE => {
                // Drivers send the same unnamed statement again and again: what was learnt
                // about it still stands, and the message needs no decoding.
                let known = self
                    .unnamed
                    .as_ref()
                    .is_some_and(|u| u.parse[..] == msg[..]);
                if known && self.local_statements.is_empty() {
                    let before = self.unnamed.clone();
                    self.parse_unnamed(i, msg, wire, before);
                    return Ok(());
                }
                let parse = decode::parse(&msg[5..])?;
                if !self.local_statements.is_empty() {
                    self.local_statements.remove(parse.name);
                }
                if parse.name.is_empty() {
                    let before = self.unnamed.clone();
                    if !known {
                        let effects = super::settings::effects_of(parse.query);
                        // Other connections hold the old statement, if any.
                        for held in &mut self.conns {
                            held.unnamed_ready = false;
                        }
                        self.unnamed = Some(Arc::new(Unnamed {
                            parse: Bytes::copy_from_slice(msg),
                            analysis: (!self.shared.router.passthrough())
                                .then(|| self.shared.router.analyze(&decode::text(parse.query))),
                            types: crate::server::parse_param_types(parse.param_types),
                            changes: effects.changes,
                            drops_all: effects.drops_all,
                            local: false,
                        }));
                    }
                    self.parse_unnamed(i, msg, wire, before);
                    return Ok(());
                }
                let name = Bytes::copy_from_slice(parse.name);
                if self.statements.contains_key(&name) {
                    let msg = format!(
                        "prepared statement \"{}\" already exists",
                        String::from_utf8_lossy(&name)
                    );
                    self.synthetic_error(i, "42P05", &msg, wire);
                    return Ok(());
                }
                let stmt = self.shared.statements.intern(&parse, &self.shared.router);
                let held = &mut self.conns[i];
                if held.conn.prepared.contains(&stmt.id) {
                    let mut msg = BytesMut::new();
                    build::parse_complete(&mut msg);
                    held.expect.push_back(Expect::Synthetic(msg.freeze()));
                } else {
                    wire.extend_from_slice(&stmt.parse);
                    held.conn.prepared.insert(stmt.id);
                    held.expect.push_back(reply(Kind::Parse {
                        stmt: Some(stmt.id),
                        client: Some(name.clone()),
                        before: None,
                    }));
                }
                self.statements.insert(name, stmt);
            }
            tag::BIND => {
                let bind = decode::bind(&msg[5..])?;
                if !self.local_portals.is_empty() {
                    self.local_portals.remove(bind.portal);
                }
                let portal_unnamed = bind.portal.is_empty();
                let mut bound = 0;
                if bind.statement.is_empty() {
                    if self.unnamed_missing(i, wire) {
                        return Ok(());
                    }
                    self.ensure_unnamed(i, wire);
                    wire.extend_from_slice(msg);
                    if portal_unnamed {
                        self.portal_changes.clear();
                        if let Some(u) = &self.unnamed {
                            self.portal_changes.extend_from_slice(&u.changes);
                        }
                    }
                    let drops = self.unnamed.as_ref().is_some_and(|u| u.drops_all);
                    self.note_portal_drops(bind.portal, drops);
                } else {
                    let Some(stmt) = self.lookup(i, bind.statement, wire) else {
                        return Ok(());
                    };
                    self.ensure_prepared(i, &stmt, wire);
                    build::message(wire, tag::BIND, |b| {
                        build::cstr(b, bind.portal);
                        build::cstr(b, &stmt.server_name);
                        b.put_slice(bind.rest);
                    });
                    if portal_unnamed {
                        self.portal_changes = stmt.effects.changes.clone();
                    }
                    self.note_portal_drops(bind.portal, stmt.effects.drops_all);
                    bound = stmt.id;
                }
                self.portals.insert(bind.portal, self.conns[i].key);
                self.conns[i]
                    .expect
                    .push_back(reply(Kind::Bind { stmt: bound }));
            }
            tag::DESCRIBE => {
                let (kind, name) = decode::target(&msg[5..], "Describe")?;
                let mut described = None;
                let mut unnamed = None;
                if kind == b'S' && !name.is_empty() {
                    let Some(stmt) = self.lookup(i, name, wire) else {
                        return Ok(());
                    };
                    self.ensure_prepared(i, &stmt, wire);
                    build::message(wire, tag::DESCRIBE, |b| {
                        b.put_u8(b'S');
                        build::cstr(b, &stmt.server_name);
                    });
                    described = Some(stmt);
                } else {
                    if kind == b'S' {
                        if self.unnamed_missing(i, wire) {
                            return Ok(());
                        }
                        self.ensure_unnamed(i, wire);
                        unnamed = self.unnamed.clone();
                    }
                    wire.extend_from_slice(msg);
                }
                self.conns[i].expect.push_back(reply(Kind::Describe {
                    stmt: described,
                    unnamed,
                    portal: kind == b'P',
                }));
            }
            tag::EXECUTE => {
                let (portal, _) = decode::cstr(&msg[5..], "Execute")?;
                let changes = if portal.is_empty() {
                    std::mem::take(&mut self.portal_changes)
                } else {
                    Vec::new()
                };
                let dropped = if !self.portal_drops.is_empty()
                    && self.portal_drops.iter().any(|p| p[..] == *portal)
                {
                    Some(self.drops_all(i))
                } else {
                    None
                };
                let restore = if changes.is_empty() {
                    None
                } else {
                    self.settings.restore_select(&changes)
                };
                wire.extend_from_slice(msg);
                self.conns[i]
                    .expect
                    .push_back(reply(Kind::Execute { changes, dropped }));
                if let Some(sql) = restore {
                    self.restore_after(i, &sql, wire);
                }
            }
            tag::CLOSE => {
                let (kind, name) = decode::target(&msg[5..], "Close")?;
                if kind == b'S' && !name.is_empty() {
                    // The server-side statement is shared and stays; the client's name goes.
                    self.statements.remove(name);
                    let mut msg = BytesMut::new();
                    build::close_complete(&mut msg);
                    self.conns[i]
                        .expect
                        .push_back(Expect::Synthetic(msg.freeze()));
                } else {
                    wire.extend_from_slice(msg);
                    self.conns[i].expect.push_back(reply(Kind::Close));
                }
            }
            tag::SYNC => {
                self.skip_until_sync = false;
                wire.extend_from_slice(msg);
                self.conns[i].expect.push_back(reply(Kind::Sync));
            }
            _ => wire.extend_from_slice(msg), // Flush
        }
        Ok(())
    }

    /// Sends the client's Parse of the unnamed statement (`self.unnamed` already describes
    /// it; `before` did until now).
    fn parse_unnamed(
        &mut self,
        i: usize,
        msg: &[u8],
        wire: &mut BytesMut,
        before: Option<Arc<Unnamed>>,
    ) {
        let held = &mut self.conns[i];
        held.unnamed_ready = true;
        wire.extend_from_slice(msg);
        held.expect.push_back(Expect::Reply {
            kind: Kind::Parse {
                stmt: None,
                client: None,
                before,
            },
            forward: true,
        });
    }

    /// The client's statement by name, or an error queued in its place.
    fn lookup(&mut self, i: usize, name: &[u8], wire: &mut BytesMut) -> Option<Arc<Statement>> {
        if let Some(stmt) = self.statements.get(name) {
            return Some(stmt.clone());
        }
        let msg = format!(
            "prepared statement \"{}\" does not exist",
            String::from_utf8_lossy(name)
        );
        self.synthetic_error(i, "26000", &msg, wire);
        None
    }

    /// An error the proxy raises inside a batch: like Postgres, it skips the rest up to Sync.
    /// The server is made to fail at the same point (`Kind::Fail`), which ends the transaction
    /// as the error would on Postgres: an implicit one rolls back what the batch ran before the
    /// error, a transaction block fails (the server's status then says so).
    fn synthetic_error(&mut self, i: usize, code: &str, msg: &str, wire: &mut BytesMut) {
        let mut err = BytesMut::new();
        super::error(&mut err, code, msg);
        self.queue_error(i, err.freeze(), false, wire);
    }

    /// As [`Session::synthetic_error`], with the ErrorResponse made already; `unnamed` as in
    /// [`Kind::Fail`].
    fn queue_error(&mut self, i: usize, error: Bytes, unnamed: bool, wire: &mut BytesMut) {
        let held = &mut self.conns[i];
        held.expect.push_back(Expect::Synthetic(error));
        fail(wire);
        held.expect.push_back(Expect::Reply {
            kind: Kind::Fail { unnamed },
            forward: false,
        });
        self.skip_until_sync = true;
    }

    fn ensure_prepared(&mut self, i: usize, stmt: &Statement, wire: &mut BytesMut) {
        let held = &mut self.conns[i];
        if held.conn.prepared.insert(stmt.id) {
            wire.extend_from_slice(&stmt.parse);
            held.expect.push_back(Expect::Reply {
                kind: Kind::Parse {
                    stmt: Some(stmt.id),
                    client: None,
                    before: None,
                },
                forward: false,
            });
        }
    }

    /// The client has no unnamed statement (none Parsed, or its Parse was refused): an error
    /// queued for a Bind or Describe of it, as Postgres answers. Sent on, the message would
    /// find whatever unnamed statement the server connection has, perhaps another client's.
    fn unnamed_missing(&mut self, i: usize, wire: &mut BytesMut) -> bool {
        if self.unnamed.is_some() {
            return false;
        }
        self.synthetic_error(
            i,
            "26000",
            "unnamed prepared statement does not exist",
            wire,
        );
        true
    }

    fn ensure_unnamed(&mut self, i: usize, wire: &mut BytesMut) {
        let held = &mut self.conns[i];
        if held.has_unnamed() {
            return;
        }
        if let Some(unnamed) = &self.unnamed {
            wire.extend_from_slice(&unnamed.parse);
            held.unnamed_ready = true;
            held.expect.push_back(Expect::Reply {
                kind: Kind::Parse {
                    stmt: None,
                    client: None,
                    before: None,
                },
                forward: false,
            });
        }
    }

    // === server messages ===

    fn on_server(&mut self, i: usize, frame: Frame) -> Result<(), End> {
        pop_synthetic(&mut self.conns[i], &mut self.out, self.merge.as_ref());
        let t = frame.tag();
        let held = &mut self.conns[i];
        let (forward, ends) = match held.expect.front() {
            Some(Expect::Reply { kind, forward }) => (*forward, ends_reply(kind, t)),
            Some(Expect::Synthetic(_)) => unreachable!("pop_synthetic leaves a reply at the head"),
            None => {
                return match t {
                    tag::PARAMETER_STATUS => {
                        self.relay_status(i, &frame);
                        Ok(())
                    }
                    tag::NOTICE_RESPONSE | tag::NOTIFICATION => {
                        self.out.extend_from_slice(frame.bytes());
                        Ok(())
                    }
                    tag::ERROR_RESPONSE => {
                        // An idle server telling us it is going away (shutdown, terminated).
                        self.out.extend_from_slice(frame.bytes());
                        self.conns[i].conn.broken = true;
                        Ok(())
                    }
                    _ => Err(self.desync(
                        i,
                        &format!("message {:?} with no request pending", t as char),
                    )),
                };
            }
        };
        if self.merge.as_ref().is_some_and(|m| m.merger.is_some())
            && self.merge_message(i, t, &frame, forward)
        {
            if ends == Ends::Yes {
                let Some(Expect::Reply { kind, forward }) = self.conns[i].expect.pop_front() else {
                    unreachable!("head checked above");
                };
                self.completed(i, kind, t, forward);
            }
            return Ok(());
        }
        if forward && self.withhold(i, t, &frame) {
            return Ok(());
        }
        let held = &mut self.conns[i];
        match t {
            tag::ERROR_RESPONSE => return self.on_server_error(i, frame, forward),
            tag::COMMAND_COMPLETE => note_command(&mut held.last_tag, frame.body()),
            tag::COPY_IN_RESPONSE => {
                held.copy_in = true;
                // Sync messages sent after an Execute that starts COPY FROM STDIN are ignored
                // by the server until the copy ends: they will get no ReadyForQuery.
                if matches!(
                    held.expect.front(),
                    Some(Expect::Reply {
                        kind: Kind::Execute { .. },
                        ..
                    })
                ) {
                    // The client's Sync after CopyDone ends the transaction: until it reaches
                    // the server, the connection stays with the client.
                    held.unsynced = true;
                    let head = held.expect.pop_front();
                    held.expect.retain(|e| !is_sync(e));
                    if let Some(head) = head {
                        held.expect.push_front(head);
                    }
                }
            }
            tag::PARAMETER_DESCRIPTION => {
                if let Some(Expect::Reply {
                    kind: Kind::Describe { stmt, unnamed, .. },
                    ..
                }) = held.expect.front()
                {
                    let types = crate::server::parse_param_types(frame.body());
                    if let Some(stmt) = stmt {
                        stmt.learn_param_types(&types);
                    } else if let Some(described) = unnamed {
                        let described = described.clone();
                        self.learn_unnamed_types(&described, types);
                    }
                }
            }
            tag::DATA_ROW => {
                if let Some(Expect::Reply {
                    kind: Kind::Lsn, ..
                }) = held.expect.front()
                    && let Some(lsn) = lsn_from_row(frame.body())
                {
                    let shard = held.key.shard;
                    self.ryw.insert(shard, lsn);
                }
            }
            tag::READY_FOR_QUERY => {
                let Ok(status) = decode::ready_for_query(frame.body()) else {
                    return Err(self.desync(i, "malformed ReadyForQuery"));
                };
                held.note_ready(status);
            }
            _ => {}
        }
        if ends == Ends::Mismatch {
            return Err(self.desync(i, &format!("message {:?}", t as char)));
        }
        // Replies to injected requests are dropped, but a notification is for the client
        // whatever request it arrived during.
        if (forward || t == tag::NOTIFICATION) && self.merge_allows(i, t, &frame) {
            match t {
                tag::PARAMETER_STATUS => self.relay_status(i, &frame),
                tag::READY_FOR_QUERY => {
                    self.report_discarded(i);
                    self.out.extend_from_slice(frame.bytes());
                }
                _ => self.out.extend_from_slice(frame.bytes()),
            }
        }
        if ends == Ends::Yes {
            let Some(Expect::Reply { kind, forward }) = self.conns[i].expect.pop_front() else {
                unreachable!("head checked above");
            };
            self.completed(i, kind, t, forward);
        }
        Ok(())
    }

    /// Bookkeeping when a request's reply is complete.
    fn completed(&mut self, i: usize, kind: Kind, t: u8, forward: bool) {
        if matches!(kind, Kind::Query { .. } | Kind::Lsn)
            && !self.conns[i].expect.iter().any(parses_unnamed)
        {
            // The server dropped its unnamed statement, and no Parse of it was sent after (see
            // `Held::has_unnamed`).
            self.conns[i].unnamed_ready = false;
        }
        if !forward {
            // Injected requests (settings replay, BEGIN, our own Syncs) change nothing the
            // session tracks beyond the connection's status.
            self.conns[i].query_failed = false;
            let merge = self.merge.as_ref();
            pop_synthetic(&mut self.conns[i], &mut self.out, merge);
            return;
        }
        match kind {
            Kind::Execute { changes, .. } if t == tag::COMMAND_COMPLETE && !changes.is_empty() => {
                self.tx_changes.extend(changes)
            }
            Kind::Query { changes, .. } => {
                if !changes.is_empty() && !self.conns[i].query_failed {
                    self.tx_changes.extend(changes);
                }
                self.conns[i].query_failed = false;
                self.ready(i);
            }
            Kind::Sync => self.ready(i),
            Kind::Lsn => {}
            _ => {}
        }
        let merge = self.merge.as_ref();
        pop_synthetic(&mut self.conns[i], &mut self.out, merge);
    }

    /// The server described the client's unnamed statement: parameter types its Parse left
    /// unspecified are known now, which routing needs to read a key sent in binary. (Unless
    /// the client has parsed another since.)
    fn learn_unnamed_types(&mut self, described: &Arc<Unnamed>, types: Vec<u32>) {
        let Some(current) = &self.unnamed else {
            return;
        };
        if !Arc::ptr_eq(current, described)
            || (current.types.len() >= types.len() && !current.types.contains(&0))
        {
            return;
        }
        self.unnamed = Some(Arc::new(Unnamed {
            types,
            ..Unnamed::clone(current)
        }));
    }

    /// A Bind of a statement that runs DISCARD ALL or DEALLOCATE ALL (`drops`) into
    /// `portal`, or of another one.
    fn note_portal_drops(&mut self, portal: &[u8], drops: bool) {
        if drops {
            self.portal_drops.push(Bytes::copy_from_slice(portal));
        } else if !self.portal_drops.is_empty() {
            self.portal_drops.retain(|p| p[..] != *portal);
        }
    }

    /// An Execute of `DEALLOCATE ALL` or `DISCARD ALL` goes to server `i` (DISCARD ALL always;
    /// DEALLOCATE ALL in session pooling, where SQL-level statements live there too, or in a
    /// larger pipeline): it drops every named prepared statement there, the proxy's shared ones
    /// and the client's. Accounted for when sent, so what is pipelined behind it is prepared
    /// again; what was counted before is kept, for an error that means it did not run.
    fn drops_all(&mut self, i: usize) -> Box<Dropped> {
        Box::new(Dropped {
            prepared: std::mem::take(&mut self.conns[i].conn.prepared),
            statements: std::mem::take(&mut self.statements),
        })
    }

    /// A DISCARD ALL or DEALLOCATE ALL on server `i` failed or was skipped: the statements
    /// counted before it are there still, with any prepared since.
    #[cold]
    fn undrop(&mut self, i: usize, dropped: Dropped) {
        let Dropped {
            prepared,
            statements,
        } = dropped;
        self.conns[i].conn.prepared.extend(prepared);
        for (name, stmt) in statements {
            self.statements.entry(name).or_insert(stmt);
        }
    }

    /// After a ReadyForQuery: settle settings, learn where a write ended, track the
    /// transaction.
    fn ready(&mut self, i: usize) {
        let held = &mut self.conns[i];
        let status = held.conn.status;
        if self.merge.is_none() {
            self.status = status;
        }
        let was_begun = held.begun;
        held.begun = status != TxStatus::Idle;
        if status != TxStatus::Idle {
            // The server is in a transaction (perhaps opened inside a multi-statement query):
            // the session is too.
            if self.tx.is_none() {
                let mut begin = BytesMut::new();
                build::query(&mut begin, "BEGIN");
                self.tx = Some(Tx {
                    begin: begin.freeze(),
                    read_only: false,
                    failed: false,
                    written: if held.wrote {
                        BTreeSet::from([held.key.shard])
                    } else {
                        BTreeSet::new()
                    },
                    savepoints: Vec::new(),
                    implicit: false,
                });
            }
            return;
        }
        if !self.tx_changes.is_empty() {
            // A failed implicit transaction (a batch, a COMMIT that failed) rolled back what it
            // set, as ROLLBACK does.
            if held.last_tag != b"ROLLBACK" && !held.rolled_back {
                let changes = std::mem::take(&mut self.tx_changes);
                self.settings.apply(&changes);
            }
            self.tx_changes.clear();
        }
        held.conn.settings = self.settings.fingerprint();
        if self.tx.is_some() && was_begun && !self.conns.iter().any(|h| h.begun) {
            // COMMIT or ROLLBACK inside a query the router passed through.
            self.tx = None;
        }
        if self.tx.is_none() && !self.local_portals.is_empty() {
            // Portals end with their transaction, the proxy's own as much as a server's.
            self.local_portals.clear();
        }
        let held = &mut self.conns[i];
        if held.wrote
            && held.key.server == 0
            && self.shared.config.routing.read_your_writes
            && self.tx.is_none()
        {
            held.wrote = false;
            if !self.shared.shards[held.key.shard].replicas.is_empty() {
                // Where the write ended in the WAL: replicas serve this session's reads on the
                // shard once they have replayed that far. Pipelined, so no client waits for it.
                let mut q = BytesMut::new();
                build::query(&mut q, "SELECT pg_current_wal_insert_lsn()");
                held.expect.push_back(Expect::Reply {
                    kind: Kind::Lsn,
                    forward: false,
                });
                // try_write keeps this synchronous; a full socket buffer just skips the probe
                // (reads then go to the primary until a later write records an LSN).
                if held
                    .conn
                    .writer
                    .try_write(&q)
                    .map(|n| n == q.len())
                    .unwrap_or(false)
                {
                    self.ryw.insert(held.key.shard, u64::MAX);
                } else {
                    held.expect.pop_back();
                    held.conn.broken = true;
                }
            }
        }
    }

    /// An ErrorResponse: in a simple Query it is part of the reply; in the extended protocol the
    /// server now skips to the next Sync, so every request before it gets no reply.
    fn on_server_error(&mut self, i: usize, frame: Frame, forward: bool) -> Result<(), End> {
        let merge_ok = match self.merge.as_mut() {
            Some(m) => {
                let first_error = !m.error;
                m.error = true;
                first_error
            }
            None => true,
        };
        if forward {
            self.errors += 1;
        }
        let held = &mut self.conns[i];
        held.failing = true;
        let was_copy_in = std::mem::replace(&mut held.copy_in, false);
        if matches!(
            held.expect.front(),
            Some(Expect::Reply {
                kind: Kind::Query { .. } | Kind::Lsn,
                ..
            })
        ) {
            held.query_failed = true;
            if forward && merge_ok {
                self.out.extend_from_slice(frame.bytes());
            } else if !forward {
                let fields = decode::error_fields(frame.body()).unwrap_or_default();
                warn!(code = %fields.code, message = %fields.message, "a request injected by the proxy failed");
                held.injected_error = Some(frame.bytes().clone());
            }
            return Ok(());
        }
        // (A Describe of a statement revalidates its plan too.)
        let bound = match held.expect.front() {
            Some(Expect::Reply {
                kind: Kind::Bind { stmt },
                ..
            }) => *stmt,
            Some(Expect::Reply {
                kind: Kind::Describe {
                    stmt: Some(stmt), ..
                },
                ..
            }) => stmt.id,
            _ => 0,
        };
        if bound != 0 {
            self.stale_plan(bound, frame.body());
        }
        self.unnamed_after_error(i);
        let held = &mut self.conns[i];
        // An injected Parse that fails still answers for the client's request that needed it;
        // a `Kind::Fail` failing as asked does not: the client has the proxy's error.
        let asked = match held.expect.front() {
            Some(Expect::Reply {
                kind: Kind::Fail { unnamed },
                ..
            }) => Some(*unnamed),
            _ => None,
        };
        if asked == Some(true) {
            self.forget_unnamed(i);
        }
        let asked = asked.is_some();
        let held = &mut self.conns[i];
        if merge_ok && !asked {
            self.out.extend_from_slice(frame.bytes());
        }
        if self.merge.is_none() {
            self.skip_until_sync = self.skip_until_sync || !held.expect.iter().any(is_sync);
        }
        let mut undropped = None;
        while let Some(front) = held.expect.front() {
            if is_sync(front) {
                break;
            }
            match held.expect.pop_front() {
                Some(Expect::Reply {
                    kind: Kind::Parse { stmt, client, .. },
                    ..
                }) => {
                    if let Some(id) = stmt {
                        held.conn.prepared.remove(&id);
                    }
                    if let Some(name) = client {
                        self.statements.remove(&name);
                    }
                }
                Some(Expect::Reply {
                    kind:
                        Kind::Execute {
                            dropped: Some(dropped),
                            ..
                        },
                    ..
                }) => undropped = Some(dropped),
                _ => {}
            }
        }
        if let Some(dropped) = undropped {
            // A DISCARD ALL or DEALLOCATE ALL that failed, or that the server skipped.
            self.undrop(i, *dropped);
        }
        let held = &mut self.conns[i];
        if (was_copy_in || held.unsynced) && !held.expect.iter().any(is_sync) {
            // The server now ignores everything up to a Sync, which is not coming: a COPY FROM
            // STDIN started by Execute failed, and the client's Sync was already spent (ignored
            // during the copy); or a batch ended by Flush failed, and what the client sends
            // before its Sync is skipped here (`skip_until_sync`), as the server would, while
            // the proxy may still send the connection requests of its own. One Sync of ours
            // ends the failed (implicit) transaction, as the client's would, and brings the
            // connection back in sync.
            let mut sync = BytesMut::new();
            build::message(&mut sync, tag::SYNC, |_| {});
            if held
                .conn
                .writer
                .try_write(&sync)
                .map(|n| n == sync.len())
                .unwrap_or(false)
            {
                held.expect.push_back(Expect::Reply {
                    kind: Kind::Sync,
                    forward: false,
                });
            } else {
                held.conn.broken = true;
            }
        }
        Ok(())
    }

    /// The client's Parse of the unnamed statement failed on connection `i` (a `Kind::Fail`
    /// standing for it): it has none now, unless a Parse of it pipelined after the Sync sets
    /// it again, which then replaces none.
    #[cold]
    fn forget_unnamed(&mut self, i: usize) {
        for held in &mut self.conns {
            held.unnamed_ready = false;
        }
        match later_unnamed_parse(&mut self.conns[i]) {
            Some(before) => *before = None,
            None => self.unnamed = None,
        }
    }

    /// What an error on connection `i` leaves of the client's unnamed statement. The server
    /// skips everything up to the next Sync: a Parse of it there does not happen (the proxy's
    /// own neither), and one that failed leaves none, as Postgres drops the old one first.
    #[cold]
    fn unnamed_after_error(&mut self, i: usize) {
        let held = &mut self.conns[i];
        let sync_at = held
            .expect
            .iter()
            .position(is_sync)
            .unwrap_or(held.expect.len());
        let failed = held.expect.front().is_some_and(client_parses_unnamed);
        // The client's unnamed statement after this error, if the error changes it.
        let outcome = if failed {
            Some(None)
        } else {
            held.expect.iter().take(sync_at).find_map(|e| match e {
                Expect::Reply {
                    kind: Kind::Parse { before, .. },
                    ..
                } if client_parses_unnamed(e) => Some(before.clone()),
                _ => None,
            })
        };
        if held.expect.iter().take(sync_at).any(parses_unnamed) {
            // Whatever this server holds now, a Bind here parses it again.
            held.unnamed_ready = false;
        }
        let Some(outcome) = outcome else {
            return;
        };
        // A Parse of it after the Sync sets it again: what this error leaves is what that one
        // replaces, should it fail or be skipped in turn.
        if let Some(before) = later_unnamed_parse(held) {
            *before = outcome;
            return;
        }
        if failed {
            // Other connections may hold the same text from before: not the client's now.
            for held in &mut self.conns {
                held.unnamed_ready = false;
            }
        }
        self.unnamed = outcome;
    }

    /// A Bind of a shared statement failed. If its plan went stale (a table's columns changed
    /// since it was prepared: "cached plan must not change result type"), the statement is
    /// retired from the registry: as on Postgres, the client's statement keeps failing, but a
    /// new Parse of the same text (a driver re-preparing) gets a fresh server statement rather
    /// than the stale shared one.
    #[cold]
    fn stale_plan(&mut self, id: u64, error: &[u8]) {
        let Ok(fields) = decode::error_fields(error) else {
            return;
        };
        if fields.code != "0A000" || fields.routine != "RevalidateCachedQuery" {
            return;
        }
        match self.statements.values().find(|s| s.id == id) {
            Some(stmt) => self.shared.statements.retire(stmt),
            // One the proxy rewrote for the shards (a merge, a split INSERT).
            None => self.shared.statements.retire_id(id),
        }
    }

    /// Returns idle connections to the pool when the session is between transactions.
    fn release_idle(&mut self) {
        if self.mode == PoolMode::Session || self.tx.is_some() || !self.batch.is_empty() {
            return;
        }
        let before = self.conns.len();
        for mut held in self.conns.extract_if(.., |h| h.releasable()) {
            // The queue's and the tag's allocations serve the next checkout (one each per
            // transaction otherwise).
            if self.spare_expect.len() < 4 {
                self.spare_expect.push(std::mem::take(&mut held.expect));
            }
            if self.spare_tag.capacity() == 0 {
                self.spare_tag = std::mem::take(&mut held.last_tag);
                self.spare_tag.clear();
            }
        }
        if self.conns.len() != before {
            self.cancel
                .targets
                .set(self.conns.iter().map(|h| h.conn.key.clone()));
        }
    }

    /// At the end of a session: a connection still mid-request cannot be reused; a session-mode
    /// connection is reset so the next client starts clean.
    async fn release_on_exit(&mut self) {
        self.cancel.targets.set([]);
        for mut held in std::mem::take(&mut self.conns) {
            if !held.releasable() {
                held.conn.broken = true;
                continue;
            }
            if self.mode == PoolMode::Session && reset_session(&mut held.conn).await.is_err() {
                held.conn.broken = true;
            }
        }
    }
}

/// Which connection each of the client's portals was bound on. The unnamed portal, bound again
/// by almost every extended-protocol statement, skips the map.
#[derive(Default)]
struct Portals {
    unnamed: Option<ConnKey>,
    named: HashMap<Bytes, ConnKey>,
}

impl Portals {
    fn get(&self, name: &[u8]) -> Option<ConnKey> {
        if name.is_empty() {
            self.unnamed
        } else {
            self.named.get(name).copied()
        }
    }

    fn insert(&mut self, name: &[u8], key: ConnKey) {
        if name.is_empty() {
            self.unnamed = Some(key);
        } else {
            self.named.insert(Bytes::copy_from_slice(name), key);
        }
    }
}

/// A multi-statement query with transaction control among its statements.
fn ends_transaction_inside(sql: &str) -> bool {
    let statements = lex::statements(sql);
    statements.len() > 1
        && statements.iter().any(|stmt| {
            lex::Tokens::new(stmt).next().is_some_and(|w| {
                [
                    "commit",
                    "end",
                    "rollback",
                    "abort",
                    "begin",
                    "start",
                    "savepoint",
                    "release",
                    "prepare",
                ]
                .iter()
                .any(|k| w.eq_ignore_ascii_case(k))
            })
        })
}

/// The portal an Execute, Describe('P') or Close('P') refers to.
fn portal_of(frame: &Frame) -> Option<&[u8]> {
    match frame.tag() {
        tag::EXECUTE => decode::cstr(frame.body(), "Execute").ok().map(|(p, _)| p),
        tag::DESCRIBE | tag::CLOSE => match decode::target(frame.body(), "Describe") {
            Ok((b'P', name)) => Some(name),
            _ => None,
        },
        _ => None,
    }
}

/// Adds the row counts of two CommandComplete tags of the same command (`SELECT 3` + `SELECT 4`
/// = `SELECT 7`; `INSERT 0 2` keeps its OID field).
fn add_counts(a: &str, b: &str) -> String {
    let (prefix, n) = match a.rsplit_once(' ') {
        Some((p, n)) => (p, n.parse::<u64>().ok()),
        None => (a, None),
    };
    let m = b.rsplit_once(' ').and_then(|(_, n)| n.parse::<u64>().ok());
    match (n, m) {
        (Some(n), Some(m)) => format!("{prefix} {}", n + m),
        _ => a.to_string(),
    }
}

/// The LSN in a one-column text DataRow (`16/B374D848`).
fn lsn_from_row(body: &[u8]) -> Option<u64> {
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let text = std::str::from_utf8(body.get(6..6 + usize::try_from(len).ok()?)?).ok()?;
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Sends DISCARD ALL and waits for its ReadyForQuery.
async fn reset_session(conn: &mut PooledConn) -> Result<(), ()> {
    let mut msg = BytesMut::new();
    build::query(&mut msg, "DISCARD ALL");
    conn.send(&msg).await.map_err(|_| ())?;
    let wait = async {
        loop {
            let frame = conn.reader.next().await.map_err(|_| ())?;
            match frame.tag() {
                tag::READY_FOR_QUERY => return Ok(()),
                tag::ERROR_RESPONSE => return Err(()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), wait)
        .await
        .map_err(|_| ())??;
    conn.prepared.clear();
    conn.settings = 0;
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Ends {
    Yes,
    No,
    Mismatch,
}

/// Whether server message `t` completes (or belongs to) a reply of `kind`.
fn ends_reply(kind: &Kind, t: u8) -> Ends {
    use tag::*;
    match (kind, t) {
        (_, NOTICE_RESPONSE | NOTIFICATION | PARAMETER_STATUS | ERROR_RESPONSE) => Ends::No,
        (Kind::Parse { .. }, PARSE_COMPLETE) => Ends::Yes,
        (Kind::Bind { .. }, BIND_COMPLETE) => Ends::Yes,
        (Kind::Close, CLOSE_COMPLETE) => Ends::Yes,
        (Kind::Describe { .. }, PARAMETER_DESCRIPTION) => Ends::No,
        (Kind::Describe { .. }, ROW_DESCRIPTION | NO_DATA) => Ends::Yes,
        (Kind::Execute { .. }, COMMAND_COMPLETE | EMPTY_QUERY | PORTAL_SUSPENDED) => Ends::Yes,
        (
            Kind::Execute { .. },
            DATA_ROW | COPY_IN_RESPONSE | COPY_OUT_RESPONSE | COPY_BOTH_RESPONSE | b'd' | b'c',
        ) => Ends::No,
        (Kind::Sync | Kind::Query { .. } | Kind::Lsn, READY_FOR_QUERY) => Ends::Yes,
        (Kind::Restore(COMMAND_COMPLETE), DATA_ROW) => Ends::No,
        (Kind::Restore(reply), t) if *reply == t => Ends::Yes,
        // A simple Query (or FunctionCall) reply holds anything up to its ReadyForQuery.
        (Kind::Query { .. } | Kind::Lsn, _) => Ends::No,
        _ => Ends::Mismatch,
    }
}

/// The message of `Kind::Fail`: a Parse that fails at once. Of a named statement, so the
/// server's unnamed one stays (the statement is never stored).
fn fail(wire: &mut BytesMut) {
    build::message(wire, tag::PARSE, |b| {
        build::cstr(b, b"tessera_fail");
        build::cstr(b, FAIL_TEXT);
        b.put_i16(0);
    });
}

/// What the first client Parse of the unnamed statement queued after the next Sync replaces
/// (an error skips up to that Sync, not beyond).
fn later_unnamed_parse(held: &mut Held) -> Option<&mut Option<Arc<Unnamed>>> {
    let sync_at = held
        .expect
        .iter()
        .position(is_sync)
        .unwrap_or(held.expect.len());
    held.expect
        .iter_mut()
        .skip(sync_at)
        .find(|e| client_parses_unnamed(e))
        .and_then(|e| match e {
            Expect::Reply {
                kind: Kind::Parse { before, .. },
                ..
            } => Some(before),
            _ => None,
        })
}

/// The client's own Parse of the unnamed statement.
fn client_parses_unnamed(e: &Expect) -> bool {
    matches!(
        e,
        Expect::Reply {
            kind: Kind::Parse {
                stmt: None,
                client: None,
                ..
            },
            forward: true,
        }
    )
}

/// A Parse of the unnamed statement, the client's or the proxy's.
fn parses_unnamed(e: &Expect) -> bool {
    matches!(
        e,
        Expect::Reply {
            kind: Kind::Parse {
                stmt: None,
                client: None,
                ..
            },
            ..
        }
    )
}

fn is_sync(e: &Expect) -> bool {
    matches!(
        e,
        Expect::Reply {
            kind: Kind::Sync,
            ..
        }
    )
}

/// Sends every synthetic reply at the head of the queue (in a merge, only the first
/// connection's count).
#[inline(always)]
fn pop_synthetic(held: &mut Held, out: &mut BytesMut, merge: Option<&Merge>) {
    // Called around every reply: the common case is one look at the head, inlined.
    if matches!(held.expect.front(), Some(Expect::Synthetic(_))) {
        send_synthetic(held, out, merge);
    }
}

#[inline(never)]
fn send_synthetic(held: &mut Held, out: &mut BytesMut, merge: Option<&Merge>) {
    let keep = merge.is_none_or(|m| m.first);
    while let Some(Expect::Synthetic(_)) = held.expect.front() {
        if let Some(Expect::Synthetic(bytes)) = held.expect.pop_front()
            && keep
        {
            out.extend_from_slice(&bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_wait_wakes_a_session_polled_many_times() {
        let token = CancellationToken::new();
        let mut wait = ShutdownWait::new(token.clone());
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(4);
        let session = tokio::spawn(async move {
            let mut messages = 0;
            loop {
                tokio::select! {
                    biased;
                    Some(()) = rx.recv() => messages += 1,
                    () = &mut wait => return messages,
                }
            }
        });
        // Polled again and again with the same waker: the shutdown still gets through.
        for _ in 0..3 {
            tx.send(()).await.expect("send");
            tokio::task::yield_now().await;
        }
        token.cancel();
        let messages = tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .expect("woken by the shutdown")
            .expect("task");
        assert_eq!(messages, 3);
    }

    #[test]
    fn counts_add_up() {
        assert_eq!(add_counts("SELECT 3", "SELECT 4"), "SELECT 7");
        assert_eq!(add_counts("INSERT 0 2", "INSERT 0 5"), "INSERT 0 7");
        assert_eq!(add_counts("UPDATE 0", "UPDATE 1"), "UPDATE 1");
        assert_eq!(add_counts("CREATE TABLE", "CREATE TABLE"), "CREATE TABLE");
    }

    #[test]
    fn lsn_rows_parse() {
        let mut body = vec![0, 1];
        let text = b"16/B374D848";
        body.extend_from_slice(&(text.len() as i32).to_be_bytes());
        body.extend_from_slice(text);
        assert_eq!(lsn_from_row(&body), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(lsn_from_row(&[0, 1, 255, 255, 255, 255]), None);
    }
}
