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
//! which shard to read next and what to emit. Writes on several shards commit with two-phase
//! commit; COPY FROM STDIN across shards is split row by row here.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;
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

thread_local! {
    /// The plan of every statement when the router is a passthrough (one shard, no replicas).
    static PASSTHROUGH: Plan = Plan {
        fanout: Fanout::One(router::ShardId(0)),
        replica_ok: false,
        writes: false,
        tx: None,
        reason: Arc::from("single shard, primary only: passthrough"),
        merge: None,
        split: None,
        copy: None,
    };
}

/// What a reply from the server answers.
#[derive(Debug)]
enum Kind {
    /// `stmt`: the registry id it creates on the server; `client`: the client's name for it.
    Parse {
        stmt: Option<u64>,
        client: Option<Bytes>,
    },
    Bind,
    /// `stmt`: the statement described, to learn its parameter types.
    Describe {
        stmt: Option<Arc<Statement>>,
        /// A portal (not a statement) is described: in a merge, its columns are the merge's.
        portal: bool,
    },
    Execute {
        changes: Vec<Change>,
    },
    Close,
    Sync,
    /// A simple Query or FunctionCall: its reply ends with ReadyForQuery.
    Query {
        changes: Vec<Change>,
    },
    /// The injected `SELECT pg_current_wal_insert_lsn()` after a write (read your writes).
    Lsn,
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
    /// The client's unnamed statement exists on this connection.
    unnamed_ready: bool,
    /// The server is in COPY FROM STDIN mode.
    copy_in: bool,
    /// An error was seen in the simple Query at the head.
    query_failed: bool,
    /// Tag of the last CommandComplete (to tell COMMIT from ROLLBACK).
    last_tag: String,
    /// A write ran here since the last ReadyForQuery idle (read your writes).
    wrote: bool,
    /// The session's transaction has been opened on this connection.
    begun: bool,
    /// The ErrorResponse of the last request the proxy injected here, if it failed.
    injected_error: Option<Bytes>,
    /// Counts this connection's statements for least-busy replica balancing.
    _in_flight: Option<InFlight>,
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

/// The client's unnamed prepared statement.
struct Unnamed {
    parse: Bytes,
    analysis: Arc<Analysis>,
    types: Vec<u32>,
    changes: Vec<Change>,
}

/// One client's session after login.
pub struct Session {
    shared: Arc<Shared>,
    client: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    out: BytesMut,
    conns: Vec<Held>,
    batch: Vec<Frame>,
    statements: HashMap<Bytes, Arc<Statement>>,
    unnamed: Option<Unnamed>,
    portal_changes: Vec<Change>,
    settings: Settings,
    tx_changes: Vec<Change>,
    tx: Option<Tx>,
    status: TxStatus,
    mode: PoolMode,
    pid: i32,
    skip_until_sync: bool,
    merge: Option<Merge>,
    /// Read your writes: the WAL position of this session's last write per shard.
    ryw: HashMap<usize, u64>,
    /// Server errors relayed so far (to notice one while draining mid-batch).
    errors: u64,
    /// Where each portal was bound, so its Executes and Describes follow it.
    portals: HashMap<Bytes, ConnKey>,
    /// Statements (by client name) that only call `tessera_next_id()`, answered by the proxy,
    /// with the column name they return.
    local_statements: HashMap<Bytes, String>,
    /// Portals of those statements: column name and result format.
    local_portals: HashMap<Bytes, (String, i16)>,
    /// A COPY FROM STDIN being split across shards.
    copy_in: Option<CopyIn>,
    /// The next scatter is a COPY TO STDOUT (its CopyData is concatenated).
    copy_out: Option<Arc<CopySpec>>,
}

/// A COPY FROM STDIN spread over several shards: the client's rows are cut out of its
/// CopyData stream and each is sent to the shard that owns it.
struct CopyIn {
    rows: copy::Rows,
    spec: Arc<CopySpec>,
    /// The connections, in shard order (`conns[shard]`).
    conns: Vec<ConnKey>,
    /// Data waiting to be sent to each shard.
    pending: Vec<BytesMut>,
    /// The next row is the CSV header: every shard gets it.
    header: bool,
    /// Why the copy was abandoned (the shards got CopyFail): the client's error.
    failed: Option<(&'static str, String)>,
    /// Started through the extended protocol: the client's next Sync gets the ReadyForQuery.
    extended: bool,
}

/// A two-phase transaction a session is committing (registered in [`Shared::in_flight`]).
struct GidInFlight {
    shared: Arc<Shared>,
    gid: String,
}

impl GidInFlight {
    fn new(shared: &Arc<Shared>, gid: &str) -> GidInFlight {
        shared.in_flight.lock().insert(gid.to_string());
        GidInFlight {
            shared: shared.clone(),
            gid: gid.to_string(),
        }
    }
}

impl Drop for GidInFlight {
    fn drop(&mut self) {
        self.shared.in_flight.lock().remove(&self.gid);
    }
}

/// Whether a batch is about `tessera_next_id()`, which the proxy answers itself.
#[derive(Debug, PartialEq, Eq)]
enum Local {
    None,
    All,
    Mixed,
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
    Client(Result<Frame, protocol::Error>),
    Server(Result<Frame, protocol::Error>),
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
            statements: HashMap::new(),
            unnamed: None,
            portal_changes: Vec::new(),
            settings: login.settings,
            tx_changes: Vec::new(),
            tx: None,
            status: TxStatus::Idle,
            mode,
            pid: login.pid,
            skip_until_sync: false,
            merge: None,
            ryw: HashMap::new(),
            errors: 0,
            portals: HashMap::new(),
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
        loop {
            let active = self.pending();
            // Batch writes to the client: flush only when no further server reply is buffered.
            let more_buffered = active.is_some_and(|i| self.conns[i].conn.reader.has_frame());
            if !self.out.is_empty() && !more_buffered && self.flush_client().await.is_err() {
                return End::ClientGone;
            }
            // With nothing pending, a held connection (session pooling, an open transaction) is
            // still watched: notifications and notices arrive between requests.
            let polled = active.or(if self.conns.is_empty() { None } else { Some(0) });
            let event = match polled {
                Some(i) if active.is_none() => {
                    let held = &mut self.conns[i];
                    tokio::select! {
                        r = self.client.next() => Event::Client(r),
                        r = held.conn.reader.next() => Event::Server(r),
                        _ = shutdown.cancelled() => {
                            super::fatal_error(&mut self.out, "57P01", "terminating connection due to administrator command");
                            return End::Fatal;
                        }
                    }
                }
                Some(i) => {
                    let held = &mut self.conns[i];
                    tokio::select! {
                        biased;
                        r = held.conn.reader.next() => Event::Server(r),
                        r = self.client.next() => Event::Client(r),
                    }
                }
                None => tokio::select! {
                    r = self.client.next() => Event::Client(r),
                    _ = shutdown.cancelled() => {
                        super::fatal_error(&mut self.out, "57P01", "terminating connection due to administrator command");
                        return End::Fatal;
                    }
                },
            };
            let step = match event {
                Event::Client(Ok(frame)) => self.on_client(frame).await,
                Event::Client(Err(e)) => Err(self.client_error(e)),
                Event::Server(Ok(frame)) => {
                    let i =
                        polled.expect("invariant: server events come from the polled connection");
                    self.on_server(i, frame)
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

    async fn flush_client(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let result = self.writer.write_all(&self.out).await;
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
                // Outside COPY mode Postgres ignores these; so do we.
                if let Some(i) = self.conns.iter().position(|h| h.copy_in) {
                    if frame.tag() != tag::COPY_DATA {
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
        let sql = match decode::query(&body) {
            Ok(sql) => String::from_utf8_lossy(sql),
            Err(e) => return Err(self.client_error(e)),
        };
        if let Some(column) = next_id_call(&sql) {
            if self.tx_failed() {
                return self.aborted().await;
            }
            self.settle().await?;
            let id = self.shared.ids.next();
            next_id_description(&mut self.out, &column, 0);
            next_id_row(&mut self.out, id, 0);
            build::command_complete(&mut self.out, "SELECT 1");
            let status = self.client_status();
            build::ready_for_query(&mut self.out, status);
            return Ok(());
        }
        let effects = super::settings::effects(&sql);
        if effects.drops_prepared
            && let Some(reply) = self.deallocate(&sql)
        {
            // DEALLOCATE of a statement prepared through the protocol is answered here: the
            // server-side statement belongs to the proxy and other clients may share it.
            return self.reply_locally(reply);
        }
        let plan = if self.shared.router.passthrough() {
            PASSTHROUGH.with(Plan::clone)
        } else {
            let (analysis, literals) = self.shared.router.analyze_simple(&sql);
            match self.shared.router.plan_sql(
                &analysis,
                &Params::from_literals(&literals),
                Some(&sql),
            ) {
                Ok(plan) => plan,
                Err(e) => return self.refuse_statement(&e).await,
            }
        };
        if let Some(cmd) = plan.tx {
            return self.on_tx_command(frame, cmd, &sql).await;
        }
        // (A passthrough leaves transaction control to the one server, which enforces this.)
        if self.tx_failed() && !self.shared.router.passthrough() {
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
        match plan.fanout.clone() {
            Fanout::One(shard) => {
                if let Err(e) = self.note_write(&plan, &[shard.0]) {
                    return self.refuse_statement(&e).await;
                }
                let key = self.choose(shard.0, &plan);
                let i = match self.pin(key).await {
                    Ok(i) => i,
                    Err(e) => return self.refuse_request(&e).await,
                };
                let held = &mut self.conns[i];
                if effects.drops_prepared {
                    held.conn.prepared.clear();
                    if effects.changes.contains(&Change::ResetAll) {
                        // DISCARD ALL drops the client's statements too, as on Postgres.
                        self.statements.clear();
                        self.unnamed = None;
                    }
                }
                let held = &mut self.conns[i];
                held.unnamed_ready = false;
                held.wrote |= plan.writes;
                self.send(
                    i,
                    frame.into_bytes(),
                    Kind::Query {
                        changes: effects.changes,
                    },
                )
                .await
            }
            _ if plan.copy.as_ref().is_some_and(|c| !c.to) => {
                let spec = plan.copy.clone().expect("invariant: matched");
                self.start_copy_in(&plan, spec, frame).await
            }
            Fanout::Scatter(_) if lex::statements(&sql).len() > 1 => {
                self.refuse_statement(&router::Error::Unsupported(
                    "a multi-statement query on several shards".into(),
                ))
                .await
            }
            fanout => {
                let shards = self.fanout_shards(&fanout);
                if let Err(e) = self.note_write(&plan, &shards) {
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
                self.scatter(&shards, &plan, broadcast, |session, i, wire| {
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
                    }])
                })
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
                    implicit: false,
                });
                self.reply_locally("BEGIN")
            }
            TxCommand::Commit | TxCommand::Rollback => {
                let failed = self.tx_failed();
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
                            }])
                        })
                        .await
                    }
                }
            }
            TxCommand::Savepoint => {
                if self.tx_failed() && !sql.to_ascii_lowercase().contains("rollback") {
                    return self.aborted().await;
                }
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

    /// Runs one statement the proxy makes on each listed connection, in parallel, and returns
    /// each one's error (the ErrorResponse message) if it failed.
    async fn run_injected(
        &mut self,
        jobs: &[(ConnKey, String)],
    ) -> Result<Vec<Option<Bytes>>, End> {
        for (key, sql) in jobs {
            let i = self.index(*key);
            let mut msg = BytesMut::new();
            build::query(&mut msg, sql);
            let held = &mut self.conns[i];
            held.injected_error = None;
            held.expect.push_back(Expect::Reply {
                kind: Kind::Query {
                    changes: Vec::new(),
                },
                forward: false,
            });
            if let Err(e) = held.conn.send(&msg).await {
                return Err(self.server_lost(i, e));
            }
        }
        let mut errors = Vec::with_capacity(jobs.len());
        for (key, _) in jobs {
            let i = self.index(*key);
            self.drain(i).await?;
            errors.push(self.conns[i].injected_error.take());
        }
        Ok(errors)
    }

    /// COMMIT of a transaction that wrote on several shards: PREPARE TRANSACTION on each, the
    /// decision made durable in the log, then COMMIT PREPARED on each. A shard that cannot
    /// prepare rolls the transaction back everywhere and the client gets its error.
    async fn commit_two_phase(&mut self) -> Result<(), End> {
        self.settle().await?;
        match self.two_phase().await? {
            None => build::command_complete(&mut self.out, "COMMIT"),
            Some(error) => self.out.extend_from_slice(&error),
        }
        build::ready_for_query(&mut self.out, TxStatus::Idle);
        Ok(())
    }

    /// The end of the proxy's own transaction around one multi-shard write: two-phase commit
    /// if the statement succeeded everywhere, else rollback everywhere.
    async fn finish_implicit(&mut self, merge: &mut Merge) -> Result<(), End> {
        if merge.error {
            let jobs: Vec<(ConnKey, String)> = self
                .conns
                .iter()
                .filter(|h| h.begun)
                .map(|h| (h.key, "ROLLBACK".to_string()))
                .collect();
            self.run_injected(&jobs).await?;
            self.end_two_phase("ROLLBACK");
            return Ok(());
        }
        if let Some(error) = self.two_phase().await? {
            self.out.extend_from_slice(&error);
            merge.error = true;
        }
        Ok(())
    }

    /// Two-phase commit of the session's transaction; `Some(ErrorResponse)` if it rolled back.
    async fn two_phase(&mut self) -> Result<Option<Bytes>, End> {
        let Some(log) = self.shared.decisions.clone() else {
            let mut msg = BytesMut::new();
            super::error(
                &mut msg,
                "0A000",
                "not supported across shards: a transaction that writes to more than one shard with two-phase commit disabled",
            );
            return Ok(Some(msg.freeze()));
        };
        let written = self
            .tx
            .as_ref()
            .map(|tx| tx.written.clone())
            .unwrap_or_default();
        let gid = self.shared.new_gid();
        // Until this function returns, the background resolver leaves the gid alone; if the
        // session dies midway (a shard connection lost), the resolver finishes it.
        let _in_flight = GidInFlight::new(&self.shared, &gid);
        // Shards the transaction only read from just commit; those it wrote to prepare.
        let jobs: Vec<(ConnKey, String)> = self
            .conns
            .iter()
            .filter(|h| h.begun)
            .map(|h| {
                let sql = if written.contains(&h.key.shard) {
                    format!("PREPARE TRANSACTION '{gid}'")
                } else {
                    "COMMIT".to_string()
                };
                (h.key, sql)
            })
            .collect();
        debug!(%gid, shards = ?written, "two-phase commit: prepare");
        let results = self.run_injected(&jobs).await?;
        let prepared: Vec<ConnKey> = jobs
            .iter()
            .zip(&results)
            .filter(|((key, _), err)| err.is_none() && written.contains(&key.shard))
            .map(|((key, _), _)| *key)
            .collect();
        let failure = results.iter().flatten().next().cloned();
        crate::twopc::failpoint("after-prepare");
        let decided = match failure {
            Some(_) => Err(None),
            None => {
                // An fsync: off the async worker, which serves other clients meanwhile.
                let (log, decided) = (log.clone(), gid.clone());
                let path = log.path().to_path_buf();
                tokio::task::spawn_blocking(move || log.record_commit(&decided))
                    .await
                    .unwrap_or_else(|e| {
                        Err(crate::twopc::Error::Write {
                            path,
                            source: std::io::Error::other(e.to_string()),
                        })
                    })
                    .map_err(Some)
            }
        };
        if let Err(log_error) = decided {
            let undo: Vec<(ConnKey, String)> = prepared
                .iter()
                .map(|k| (*k, format!("ROLLBACK PREPARED '{gid}'")))
                .collect();
            self.run_injected(&undo).await?;
            self.end_two_phase("ROLLBACK");
            let mut msg = BytesMut::new();
            match (failure, log_error) {
                (Some(frame), _) => msg.extend_from_slice(&frame),
                (None, Some(e)) => super::error(&mut msg, e.sqlstate(), &e.to_string()),
                (None, None) => super::error(&mut msg, "XX000", "two-phase commit failed"),
            }
            return Ok(Some(msg.freeze()));
        }
        crate::twopc::failpoint("after-decision");
        let commit: Vec<(ConnKey, String)> = prepared
            .iter()
            .map(|k| (*k, format!("COMMIT PREPARED '{gid}'")))
            .collect();
        let results = self.run_injected(&commit).await?;
        if results.iter().all(Option::is_none) {
            if let Err(e) = log.record_done(&gid) {
                warn!(cause = %e, %gid, "could not mark a two-phase commit done");
            }
        } else {
            // The decision is durable: recovery at the next start (or an operator) finishes
            // the shards that did not commit yet; the transaction is committed.
            warn!(%gid, "COMMIT PREPARED failed on a shard; recovery will finish it");
            build::error_response(
                &mut self.out,
                build::Severity::Warning,
                "01000",
                &format!(
                    "transaction {gid} is committed but not yet on every shard; Tessera finishes it at its next start"
                ),
            );
        }
        self.end_two_phase("COMMIT");
        Ok(None)
    }

    /// After a two-phase commit or its rollback: every connection is idle and the session's
    /// transaction is over.
    fn end_two_phase(&mut self, outcome: &str) {
        self.tx = None;
        for i in 0..self.conns.len() {
            self.conns[i].last_tag = outcome.into();
            self.ready(i);
        }
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
        if let Some(tx) = self.tx.as_mut() {
            tx.failed = true;
        }
        let status = self.client_status();
        build::ready_for_query(&mut self.out, status);
        Ok(())
    }

    async fn send(&mut self, i: usize, bytes: Bytes, kind: Kind) -> Result<(), End> {
        let held = &mut self.conns[i];
        tracing::trace!(conn = ?held.key, pid = held.conn.key.pid, ?kind, "send");
        held.expect.push_back(Expect::Reply {
            kind,
            forward: true,
        });
        if let Err(e) = held.conn.send(&bytes).await {
            return Err(self.server_lost(i, e));
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
        if let Some(i) = self.pending()
            && self.conns[i].key != key
            && self.drain(i).await.is_err()
        {
            return Err(backend::Error::Io {
                addr: String::new(),
                reason: "lost a server connection".into(),
            });
        }
        if let Some(i) = self.conns.iter().position(|h| h.key == key) {
            let held = &mut self.conns[i];
            if let Some(tx) = &self.tx
                && !held.begun
            {
                // Held from before the transaction began (a write's WAL-position probe still
                // running, or session pooling): the transaction starts here now.
                held.begun = true;
                held.expect.push_back(Expect::Reply {
                    kind: Kind::Query {
                        changes: Vec::new(),
                    },
                    forward: false,
                });
                held.conn.send(&tx.begin).await?;
            }
            return Ok(i);
        }
        let shard = &self.shared.shards[key.shard];
        let (pool, state) = if key.server == 0 {
            (
                &shard.primary,
                self.shared.health.shard(key.shard).primary.clone(),
            )
        } else {
            (
                &shard.replicas[key.server - 1],
                self.shared.health.shard(key.shard).replicas[key.server - 1].clone(),
            )
        };
        let mut conn = match pool.get().await {
            Ok(conn) => conn,
            Err(e) if key.server > 0 && self.tx.is_none() => {
                // A replica that cannot be reached leaves the rotation now (its probe brings it
                // back) and the read goes to the primary: the client sees no error.
                warn!(cause = %e, "replica unavailable, reading from the primary");
                state
                    .healthy
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                return Box::pin(self.pin(ConnKey::primary(key.shard))).await;
            }
            Err(e) => {
                warn!(cause = %e, "no server connection");
                return Err(e);
            }
        };
        self.shared.cancels.set_targets(
            self.pid,
            self.conns
                .iter()
                .map(|h| h.conn.key.clone())
                .chain(std::iter::once(conn.key.clone())),
        );
        let mut expect = VecDeque::new();
        let mut wire = BytesMut::new();
        let fingerprint = self.settings.fingerprint();
        if conn.settings != fingerprint {
            build::query(&mut wire, &self.settings.replay_sql());
            conn.settings = fingerprint;
            expect.push_back(Expect::Reply {
                kind: Kind::Query {
                    changes: Vec::new(),
                },
                forward: false,
            });
        }
        if let Some(tx) = &self.tx {
            wire.extend_from_slice(&tx.begin);
            expect.push_back(Expect::Reply {
                kind: Kind::Query {
                    changes: Vec::new(),
                },
                forward: false,
            });
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
            last_tag: String::new(),
            wrote: false,
            begun: self.tx.is_some(),
            injected_error: None,
            _in_flight: (key.server > 0).then(|| state.enter()),
        });
        Ok(self.conns.len() - 1)
    }

    /// Runs one statement on several shards and merges the replies. `build` writes the
    /// messages for one connection and returns the kinds of replies they expect.
    async fn scatter(
        &mut self,
        shards: &[usize],
        plan: &Plan,
        broadcast: bool,
        build: impl FnMut(&mut Self, usize, &mut BytesMut) -> Result<Vec<Kind>, protocol::Error>,
    ) -> Result<(), End> {
        let keys: Vec<ConnKey> = shards.iter().map(|&s| self.choose(s, plan)).collect();
        if plan.writes && !broadcast && self.tx.is_none() && keys.len() > 1 {
            if self.shared.decisions.is_none() {
                return self
                    .refuse_statement(&router::Error::Unsupported(
                        "a statement that writes on several shards with two-phase commit disabled (two_phase.enabled: false)".into(),
                    ))
                    .await;
            }
            // One statement, several shards: it runs in a transaction of the proxy's own and
            // commits with two-phase commit, so it lands everywhere or nowhere.
            self.begin_implicit(shards).await?;
        }
        // A write marks each connection, so read your writes covers every shard it touched.
        let writes = plan.writes;
        let mut build = build;
        let build = move |session: &mut Self, i: usize, wire: &mut BytesMut| {
            session.conns[i].wrote |= writes;
            build(session, i, wire)
        };
        self.scatter_on(&keys, broadcast, plan.merge.clone(), build)
            .await
    }

    async fn scatter_on(
        &mut self,
        keys: &[ConnKey],
        broadcast: bool,
        plan: Option<Arc<MergePlan>>,
        build: impl FnMut(&mut Self, usize, &mut BytesMut) -> Result<Vec<Kind>, protocol::Error>,
    ) -> Result<(), End> {
        let copy_out = self.copy_out.take();
        let Some(idx) = self.gather_start(keys, build).await? else {
            return Ok(());
        };
        let merger = plan.map(|m| {
            Merger::new(
                m.spec.clone(),
                m.limit,
                m.offset,
                idx.len(),
                self.shared.config.limits.max_merge_rows,
                self.shared.health.text_bytewise(),
            )
        });
        self.merge = Some(Merge {
            broadcast,
            merger,
            slots: idx.clone(),
            copy_out: copy_out.is_some(),
            copy_header: copy_out.is_some_and(|c| c.header),
            ..Merge::default()
        });
        self.gather_finish(&idx).await
    }

    /// Takes a connection for each key (injected messages drained, so replies start clean)
    /// and sends each the messages `build` writes. `None` if the client already got an error.
    async fn gather_start(
        &mut self,
        keys: &[ConnKey],
        mut build: impl FnMut(&mut Self, usize, &mut BytesMut) -> Result<Vec<Kind>, protocol::Error>,
    ) -> Result<Option<Vec<ConnKey>>, End> {
        let mut idx = Vec::with_capacity(keys.len());
        for &key in keys {
            let i = match self.pin(key).await {
                Ok(i) => i,
                Err(e) => {
                    if self.tx.as_ref().is_some_and(|tx| tx.implicit) {
                        // The proxy's own transaction ends here, on the shards it reached.
                        self.settle().await?;
                        let jobs: Vec<(ConnKey, String)> = self
                            .conns
                            .iter()
                            .filter(|h| h.begun)
                            .map(|h| (h.key, "ROLLBACK".to_string()))
                            .collect();
                        self.run_injected(&jobs).await?;
                        self.end_two_phase("ROLLBACK");
                    }
                    self.refuse_request(&e).await?;
                    return Ok(None);
                }
            };
            self.drain(i).await?;
            // pin may have fallen back from a replica to the primary.
            idx.push(self.conns[i].key);
        }
        for &key in &idx {
            let i = self.index(key);
            let mut wire = BytesMut::new();
            let kinds = match build(self, i, &mut wire) {
                Ok(kinds) => kinds,
                Err(e) => return Err(self.client_error(e)),
            };
            let held = &mut self.conns[i];
            for kind in kinds {
                held.expect.push_back(Expect::Reply {
                    kind,
                    forward: true,
                });
            }
            if let Err(e) = held.conn.send(&wire).await {
                return Err(self.server_lost(i, e));
            }
        }
        Ok(Some(idx))
    }

    /// Drains the replies of a statement sent to `idx` through the merge in `self.merge`,
    /// then writes its completion (or error) and ReadyForQuery; ends the proxy's own
    /// transaction around it, if any.
    async fn gather_finish(&mut self, idx: &[ConnKey]) -> Result<(), End> {
        let merging = self.merge.as_ref().is_some_and(|m| m.merger.is_some());
        if merging && let Err(end) = self.merge_rows(idx).await {
            self.merge = None;
            return Err(end);
        }
        for (n, &key) in idx.iter().enumerate() {
            if let Some(m) = self.merge.as_mut() {
                m.first = n == 0;
            }
            let i = self.index(key);
            let drained = self.drain(i).await;
            if let Err(end) = drained {
                self.merge = None;
                return Err(end);
            }
        }
        let mut merge = self.merge.take().unwrap_or_default();
        if !merge.error
            && let Some(merger) = merge.merger.as_mut()
        {
            match merger.finish(&mut self.out) {
                // A query's count is the merged rows; a write's (RETURNING) stays the sum.
                Ok(rows) if merge.tags.first().is_none_or(|t| t.starts_with("SELECT")) => {
                    merge.tags = vec![format!("SELECT {rows}")];
                }
                Ok(_) => {}
                Err(e) => {
                    super::error(&mut self.out, e.sqlstate(), &e.to_string());
                    merge.error = true;
                }
            }
        }
        if merge.copy_out && !merge.error {
            build::message(&mut self.out, tag::COPY_DONE, |_| {});
        }
        if self.tx.as_ref().is_some_and(|tx| tx.implicit) {
            self.finish_implicit(&mut merge).await?;
        }
        if !merge.error {
            for tag in &merge.tags {
                build::command_complete(&mut self.out, tag);
            }
        }
        if merge.error
            && let Some(tx) = self.tx.as_mut()
        {
            tx.failed = true;
        }
        if self.tx.is_none() {
            // The connections' own ReadyForQuery did not update the session's status during
            // the merge: it is what they say now (idle after a COMMIT on several shards).
            self.status = self
                .conns
                .iter()
                .map(|h| h.conn.status)
                .find(|s| *s != TxStatus::Idle)
                .unwrap_or(TxStatus::Idle);
        }
        if !merge.no_ready {
            let status = self.client_status();
            build::ready_for_query(&mut self.out, status);
        }
        Ok(())
    }

    /// Starts a COPY FROM STDIN on every shard it writes to (in a transaction, the proxy's
    /// own if the client has none, so the copy lands everywhere or nowhere).
    async fn start_copy_in(
        &mut self,
        plan: &Plan,
        spec: Arc<CopySpec>,
        frame: Frame,
    ) -> Result<(), End> {
        let shards = self.fanout_shards(&plan.fanout);
        if let Err(e) = self.note_write(plan, &shards) {
            return self.refuse_statement(&e).await;
        }
        if self.tx.is_none() {
            if self.shared.decisions.is_none() {
                return self
                    .refuse_statement(&router::Error::Unsupported(
                        "a COPY that writes on several shards with two-phase commit disabled (two_phase.enabled: false)".into(),
                    ))
                    .await;
            }
            self.begin_implicit(&shards).await?;
        }
        let keys: Vec<ConnKey> = shards.iter().map(|&s| self.choose(s, plan)).collect();
        let statement = frame.into_bytes();
        let Some(idx) = self
            .gather_start(&keys, |session, i, wire| {
                session.conns[i].wrote = true;
                wire.extend_from_slice(&statement);
                Ok(vec![Kind::Query {
                    changes: Vec::new(),
                }])
            })
            .await?
        else {
            return Ok(());
        };
        self.merge = Some(Merge {
            broadcast: matches!(plan.fanout, Fanout::Broadcast),
            slots: idx.clone(),
            ..Merge::default()
        });
        // Every shard must reach COPY mode; the first one's CopyInResponse is the client's.
        for (n, &key) in idx.iter().enumerate() {
            if let Some(m) = self.merge.as_mut() {
                m.first = n == 0;
            }
            let i = self.index(key);
            while !self.conns[i].copy_in && !self.conns[i].expect.is_empty() {
                self.read_one(i).await?;
            }
        }
        if self.merge.as_ref().is_some_and(|m| m.error) {
            self.abandon_copy(&idx, "a shard refused the COPY").await?;
            return self.gather_finish(&idx).await;
        }
        self.copy_in = Some(CopyIn {
            rows: copy::Rows::new(spec.clone()),
            header: spec.header,
            spec,
            pending: vec![BytesMut::new(); idx.len()],
            conns: idx,
            failed: None,
            extended: false,
        });
        Ok(())
    }

    /// A COPY FROM STDIN across shards through the extended protocol (Bind, Execute, Sync, as
    /// drivers send it): the shards run it as a simple query; the client gets the replies of
    /// the extended protocol, its ReadyForQuery after the Sync that follows CopyDone.
    async fn extended_copy_in(
        &mut self,
        batch: Vec<Frame>,
        plan: Plan,
        spec: Arc<CopySpec>,
    ) -> Result<(), End> {
        self.settle().await?;
        let has_sync = batch.iter().any(|f| f.tag() == tag::SYNC);
        let mut sql = None;
        for frame in &batch {
            match frame.tag() {
                tag::PARSE => {
                    let parse = decode::parse(frame.body()).map_err(|e| self.client_error(e))?;
                    sql = Some(String::from_utf8_lossy(parse.query).into_owned());
                    self.local_parse(frame)?;
                }
                tag::BIND => {
                    let bind = decode::bind(frame.body()).map_err(|e| self.client_error(e))?;
                    let parse = if bind.statement.is_empty() {
                        self.unnamed.as_ref().map(|u| u.parse.clone())
                    } else {
                        self.statements.get(bind.statement).map(|s| s.parse.clone())
                    };
                    if let Some(p) = parse
                        && let Some(Ok(p)) = p.get(5..).map(decode::parse)
                    {
                        sql = Some(String::from_utf8_lossy(p.query).into_owned());
                    }
                    build::message(&mut self.out, b'2', |_| {});
                }
                tag::DESCRIBE => {
                    if let Ok((b'S', _)) = decode::target(frame.body(), "Describe") {
                        build::message(&mut self.out, b't', |b| b.put_i16(0));
                    }
                    build::message(&mut self.out, b'n', |_| {});
                }
                tag::EXECUTE => {
                    let Some(sql) = sql.take() else {
                        super::error(
                            &mut self.out,
                            "26000",
                            "the COPY statement to execute is unknown",
                        );
                        return self.end_failed_batch(has_sync);
                    };
                    let mut query = BytesMut::new();
                    build::query(&mut query, &sql);
                    let started = self
                        .start_copy_in(&plan, spec.clone(), Frame::from_bytes(query.freeze()))
                        .await;
                    if let Some(c) = self.copy_in.as_mut() {
                        // The client's Sync in this batch is consumed by the COPY, as on
                        // Postgres; the one after CopyDone gets the ReadyForQuery.
                        c.extended = true;
                    }
                    return started;
                }
                _ => {}
            }
        }
        if has_sync {
            let status = self.client_status();
            build::ready_for_query(&mut self.out, status);
        }
        Ok(())
    }

    /// Answers an extended-protocol batch whose statement the proxy ran itself (COMMIT or
    /// ROLLBACK of a transaction on several shards): its tag, or the error.
    fn answer_tx_batch(
        &mut self,
        batch: &[Frame],
        outcome: Result<&str, Bytes>,
    ) -> Result<(), End> {
        let mut failed = false;
        for frame in batch {
            match frame.tag() {
                _ if failed && frame.tag() != tag::SYNC => {}
                tag::PARSE => self.local_parse(frame)?,
                tag::BIND => build::message(&mut self.out, b'2', |_| {}),
                tag::DESCRIBE => {
                    if let Ok((b'S', _)) = decode::target(frame.body(), "Describe") {
                        build::message(&mut self.out, b't', |b| b.put_i16(0));
                    }
                    build::message(&mut self.out, b'n', |_| {});
                }
                tag::EXECUTE => match &outcome {
                    Ok(word) => build::command_complete(&mut self.out, word),
                    Err(error) => {
                        self.out.extend_from_slice(error);
                        failed = true;
                    }
                },
                tag::CLOSE => build::close_complete(&mut self.out),
                tag::SYNC => {
                    self.skip_until_sync = false;
                    let status = self.client_status();
                    build::ready_for_query(&mut self.out, status);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A Parse the proxy answers itself: the statement is registered for the client (and
    /// prepared on a server when it is first bound there).
    fn local_parse(&mut self, frame: &Frame) -> Result<(), End> {
        let parse = decode::parse(frame.body()).map_err(|e| self.client_error(e))?;
        let sql = String::from_utf8_lossy(parse.query).into_owned();
        if parse.name.is_empty() {
            self.unnamed = Some(Unnamed {
                parse: frame.bytes().clone(),
                analysis: self.shared.router.analyze(&sql),
                types: crate::server::parse_param_types(parse.param_types),
                changes: super::settings::effects(&sql).changes,
            });
            for held in &mut self.conns {
                held.unnamed_ready = false;
            }
        } else {
            let stmt = self.shared.statements.intern(&parse, &self.shared.router);
            self.statements
                .insert(Bytes::copy_from_slice(parse.name), stmt);
        }
        build::parse_complete(&mut self.out);
        Ok(())
    }

    /// The proxy's own transaction around one statement that writes on several shards.
    async fn begin_implicit(&mut self, shards: &[usize]) -> Result<(), End> {
        self.settle().await?;
        let mut begin = BytesMut::new();
        build::query(&mut begin, "BEGIN");
        self.tx = Some(Tx {
            begin: begin.freeze(),
            read_only: false,
            failed: false,
            written: shards.iter().copied().collect(),
            implicit: true,
        });
        Ok(())
    }

    /// CopyFail to every shard still copying: each ends its COPY with an error.
    async fn abandon_copy(&mut self, idx: &[ConnKey], why: &str) -> Result<(), End> {
        let mut fail = BytesMut::new();
        build::message(&mut fail, tag::COPY_FAIL, |b| {
            build::cstr(b, why.as_bytes())
        });
        for &key in idx {
            let i = self.index(key);
            if self.conns[i].copy_in {
                self.conns[i].copy_in = false;
                if let Err(e) = self.conns[i].conn.send(&fail).await {
                    return Err(self.server_lost(i, e));
                }
            }
        }
        Ok(())
    }

    /// The client's CopyData, CopyDone or CopyFail during a COPY spread over shards.
    async fn on_copy_in(&mut self, frame: Frame) -> Result<(), End> {
        let Some(mut c) = self.copy_in.take() else {
            return Ok(());
        };
        match frame.tag() {
            tag::COPY_DATA => {
                if c.failed.is_none() {
                    c.rows.push(frame.body());
                    while let Some(row) = c.rows.next_row() {
                        self.route_copy_row(&mut c, row);
                    }
                    self.send_copy_data(&mut c, 64 * 1024).await?;
                    self.copy_failed(&c).await?;
                }
                self.copy_in = Some(c);
                Ok(())
            }
            tag::COPY_DONE => {
                if c.failed.is_none() {
                    if let Some(row) = c.rows.rest() {
                        self.route_copy_row(&mut c, row);
                    }
                    self.send_copy_data(&mut c, 0).await?;
                    self.copy_failed(&c).await?;
                }
                if c.failed.is_some() {
                    if let Some(m) = self.merge.as_mut() {
                        m.no_ready = c.extended;
                    }
                } else {
                    let mut done = BytesMut::new();
                    build::message(&mut done, tag::COPY_DONE, |_| {});
                    if let Some(m) = self.merge.as_mut() {
                        m.no_ready = c.extended;
                    }
                    for &key in &c.conns {
                        let i = self.index(key);
                        self.conns[i].copy_in = false;
                        if let Err(e) = self.conns[i].conn.send(&done).await {
                            return Err(self.server_lost(i, e));
                        }
                    }
                }
                self.gather_finish(&c.conns).await
            }
            _ => {
                // CopyFail: every shard fails the COPY with the client's message.
                if let Some(m) = self.merge.as_mut() {
                    m.no_ready = c.extended;
                }
                for &key in &c.conns {
                    let i = self.index(key);
                    if self.conns[i].copy_in {
                        self.conns[i].copy_in = false;
                        if let Err(e) = self.conns[i].conn.send(frame.bytes()).await {
                            return Err(self.server_lost(i, e));
                        }
                    }
                }
                self.gather_finish(&c.conns).await
            }
        }
    }

    /// A row could not be routed: the client gets the error now (once) and every shard
    /// abandons the COPY; the shards' own errors about it are not the client's.
    async fn copy_failed(&mut self, c: &CopyIn) -> Result<(), End> {
        let Some((code, message)) = &c.failed else {
            return Ok(());
        };
        if let Some(m) = self.merge.as_mut()
            && !m.error
        {
            m.error = true;
            super::error(&mut self.out, code, message);
            self.abandon_copy(&c.conns, "the proxy could not route a row")
                .await?;
        }
        Ok(())
    }

    /// Queues one row for the shard that owns it (every shard for a header, the end marker,
    /// or a table copied on every shard).
    fn route_copy_row(&mut self, c: &mut CopyIn, row: Bytes) {
        let everywhere = std::mem::take(&mut c.header) || copy::is_end_marker(&row);
        let shard = match c.spec.key {
            Some(_) if everywhere => None,
            None => None,
            Some(index) => match copy::key_field(&c.spec, &row, index) {
                Ok(Some(key)) => {
                    match self
                        .shared
                        .router
                        .shard_of(&router::canonical_key(&key), &c.spec.table)
                    {
                        Ok(shard) => Some(shard),
                        Err(e) => {
                            c.failed.get_or_insert((e.sqlstate(), e.to_string()));
                            return;
                        }
                    }
                }
                Ok(None) => {
                    c.failed.get_or_insert((
                        "23502",
                        format!(
                            "null value in the shard key of \"{}\" in a COPY row",
                            c.spec.table
                        ),
                    ));
                    return;
                }
                Err(e) => {
                    c.failed.get_or_insert(("22P04", e));
                    return;
                }
            },
        };
        match shard {
            Some(s) => match c.conns.iter().position(|k| k.shard == s) {
                Some(slot) => c.pending[slot].extend_from_slice(&row),
                None => {
                    c.failed.get_or_insert((
                        "XX000",
                        format!("no connection to shard {s} for a COPY row"),
                    ));
                }
            },
            None => {
                for p in &mut c.pending {
                    p.extend_from_slice(&row);
                }
            }
        }
    }

    /// Sends each shard its queued rows as CopyData once more than `min` bytes wait.
    async fn send_copy_data(&mut self, c: &mut CopyIn, min: usize) -> Result<(), End> {
        for (slot, &key) in c.conns.iter().enumerate() {
            if c.pending[slot].is_empty() || c.pending[slot].len() < min {
                continue;
            }
            let data = c.pending[slot].split();
            let mut msg = BytesMut::with_capacity(data.len() + 5);
            build::message(&mut msg, tag::COPY_DATA, |b| b.extend_from_slice(&data));
            let i = self.index(key);
            if let Err(e) = self.conns[i].conn.send(&msg).await {
                return Err(self.server_lost(i, e));
            }
        }
        Ok(())
    }

    /// Reads the shards' rows in the order the merger asks for (the shard whose next row
    /// decides what comes next), writing merged rows as they become final. Memory stays at a
    /// few rows per shard for ORDER BY and LIMIT.
    async fn merge_rows(&mut self, idx: &[ConnKey]) -> Result<(), End> {
        loop {
            let Some(merge) = self.merge.as_mut() else {
                return Ok(());
            };
            if merge.error {
                return Ok(());
            }
            let Some(merger) = merge.merger.as_mut() else {
                return Ok(());
            };
            if let Err(e) = merger.emit(&mut self.out) {
                self.merge_failed(&e);
                return Ok(());
            }
            let next = if merger.preamble_done() {
                merger.next_read()
            } else {
                Some(0)
            };
            let Some(slot) = next else {
                return Ok(());
            };
            merge.first = slot == 0;
            let i = self.index(idx[slot]);
            if self.conns[i].expect.is_empty() {
                // The reply ended without rows or a completion the merger saw.
                if let Some(m) = self.merge.as_mut().and_then(|m| m.merger.as_mut()) {
                    m.end(slot);
                }
                continue;
            }
            self.read_one(i).await?;
        }
    }

    /// The merge cannot go on: the client gets the error (once); the shards' remaining
    /// replies are drained and dropped.
    fn merge_failed(&mut self, e: &merge::Error) {
        debug!(cause = %e, "merge failed");
        if let Some(m) = self.merge.as_mut()
            && !m.error
        {
            m.error = true;
            super::error(&mut self.out, e.sqlstate(), &e.to_string());
        }
    }

    /// A merged statement's reply message from connection `i`: feeds the merger; true if the
    /// message is handled (not forwarded as is).
    fn merge_message(&mut self, i: usize, t: u8, frame: &Frame, forward: bool) -> bool {
        let key = self.conns[i].key;
        let portal_reply = matches!(
            self.conns[i].expect.front(),
            Some(Expect::Reply {
                kind: Kind::Query { .. }
                    | Kind::Execute { .. }
                    | Kind::Describe { portal: true, .. },
                ..
            })
        );
        let Some(merge) = self.merge.as_mut() else {
            return false;
        };
        let Some(slot) = merge.slots.iter().position(|k| *k == key) else {
            return false;
        };
        let first = merge.first;
        if merge.error {
            return matches!(t, tag::ROW_DESCRIPTION | tag::DATA_ROW) && portal_reply;
        }
        let Some(merger) = merge.merger.as_mut() else {
            return false;
        };
        let result = match t {
            tag::ROW_DESCRIPTION if portal_reply => match merger.describe(frame.body()) {
                Ok(description) => {
                    if forward && first {
                        self.out.extend_from_slice(&description);
                    }
                    Ok(())
                }
                Err(e) => Err(e),
            },
            tag::DATA_ROW if portal_reply => merger.row(slot, frame.bytes().slice(5..)),
            tag::COMMAND_COMPLETE | tag::ERROR_RESPONSE | tag::EMPTY_QUERY if portal_reply => {
                merger.end(slot);
                return false;
            }
            _ => return false,
        };
        if let Err(e) = result {
            self.merge_failed(&e);
        }
        true
    }

    fn index(&self, key: ConnKey) -> usize {
        self.conns
            .iter()
            .position(|h| h.key == key)
            .expect("invariant: connections are released only between requests")
    }

    // === extended protocol ===

    /// Sends a buffered extended-protocol batch (ending in Sync or Flush), routing each
    /// Bind by its statement and values.
    async fn run_batch(&mut self) -> Result<(), End> {
        let batch = std::mem::take(&mut self.batch);
        let has_sync = batch.iter().any(|f| f.tag() == tag::SYNC);
        let local = self.answers_locally(&batch);
        if local == Local::Mixed {
            self.settle().await?;
            super::error(
                &mut self.out,
                "0A000",
                "tessera_next_id() in one pipeline with other statements: send it with a Sync of its own",
            );
            return self.end_failed_batch(has_sync);
        }
        if local == Local::All {
            if self.tx_failed() {
                self.settle().await?;
                super::error(
                    &mut self.out,
                    "25P02",
                    "current transaction is aborted, commands ignored until end of transaction block",
                );
                return self.end_failed_batch(has_sync);
            }
            return self.run_local_batch(batch).await;
        }
        // A lone Sync with nothing pending needs no server: answer it here.
        if self.pending().is_none() && batch.len() == 1 && has_sync {
            self.skip_until_sync = false;
            let status = self.client_status();
            build::ready_for_query(&mut self.out, status);
            return Ok(());
        }
        // Route every Bind; a batch normally targets one place. A Parse earlier in the batch
        // defines the statement its Binds use, so planning sees the batch in order.
        let mut overlay: HashMap<Bytes, (Arc<Analysis>, Vec<u32>, Bytes)> = HashMap::new();
        let mut targets: Vec<Option<Plan>> = Vec::with_capacity(batch.len());
        for frame in &batch {
            if frame.tag() == tag::PARSE
                && !self.shared.router.passthrough()
                && let Ok(parse) = decode::parse(frame.body())
            {
                let sql = String::from_utf8_lossy(parse.query);
                overlay.insert(
                    Bytes::copy_from_slice(parse.name),
                    (
                        self.shared.router.analyze(&sql),
                        crate::server::parse_param_types(parse.param_types),
                        frame.bytes().clone(),
                    ),
                );
            }
            targets.push(match frame.tag() {
                tag::BIND => match self.plan_bind(frame, &overlay) {
                    Ok(plan) => Some(plan),
                    Err(e) => {
                        self.settle().await?;
                        super::error(&mut self.out, e.sqlstate(), &e.to_string());
                        if let Some(tx) = self.tx.as_mut() {
                            tx.failed = true;
                        }
                        return self.end_failed_batch(has_sync);
                    }
                },
                _ => None,
            });
        }
        let plans: Vec<&Plan> = targets.iter().flatten().collect();
        // An aborted transaction accepts only ROLLBACK (and ROLLBACK TO SAVEPOINT).
        let ends_tx = |p: &&Plan| {
            matches!(
                p.tx,
                Some(TxCommand::Rollback | TxCommand::Savepoint | TxCommand::Commit)
            )
        };
        if self.tx_failed() && !self.shared.router.passthrough() && !plans.iter().all(ends_tx) {
            self.settle().await?;
            super::error(
                &mut self.out,
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            );
            return self.end_failed_batch(has_sync);
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
            if begun.len() > 1 {
                if plans.len() != 1
                    || cmd == TxCommand::Savepoint
                    || batch.last().map(Frame::tag) != Some(tag::SYNC)
                {
                    self.settle().await?;
                    super::error(
                        &mut self.out,
                        "0A000",
                        "not supported across shards: this transaction control statement in a transaction that spans shards",
                    );
                    return self.end_failed_batch(has_sync);
                }
                // COMMIT / ROLLBACK on every shard of the transaction (two-phase if it wrote on
                // several), one reply in the extended protocol. A transaction the proxy aborted
                // is rolled back whatever the client asked.
                self.settle().await?;
                let rollback = self.tx_failed() || cmd == TxCommand::Rollback;
                let written = self.tx.as_ref().map_or(0, |tx| tx.written.len());
                let outcome = if !rollback && written > 1 {
                    self.two_phase().await?.map_or(Ok("COMMIT"), Err)
                } else {
                    let word = if rollback { "ROLLBACK" } else { "COMMIT" };
                    let jobs: Vec<(ConnKey, String)> =
                        begun.iter().map(|k| (*k, word.to_string())).collect();
                    let errors = self.run_injected(&jobs).await?;
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
            let binds = plans.len();
            if binds != 1 {
                self.settle().await?;
                super::error(
                    &mut self.out,
                    "0A000",
                    "not supported across shards: a pipeline of several statements where one spans shards",
                );
                return self.end_failed_batch(has_sync);
            }
            return self.scatter_batch(batch, multi).await;
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
        let mut wire = BytesMut::new();
        for (n, frame) in batch.into_iter().enumerate() {
            if self.skip_until_sync && frame.tag() != tag::SYNC {
                continue;
            }
            let key = match &targets[n] {
                Some(plan) if plan.tx.is_some() => self
                    .conns
                    .iter()
                    .find(|h| h.begun)
                    .map_or(ConnKey::primary(0), |h| h.key),
                Some(plan) => {
                    let Fanout::One(shard) = plan.fanout else {
                        unreachable!("single-shard batch")
                    };
                    self.choose(shard.0, plan)
                }
                None if portal_of(&frame).is_some_and(|p| self.portals.contains_key(p)) => {
                    let portal = portal_of(&frame).expect("invariant: checked by the guard");
                    self.portals[portal]
                }
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
                        self.settle().await?;
                        super::error(&mut self.out, e.sqlstate(), &e.to_string());
                        return self.end_failed_batch(has_sync);
                    }
                }
            }
            let i = current.expect("invariant: pinned above");
            if let Some(plan) = &targets[n] {
                self.conns[i].wrote |= plan.writes;
            }
            if let Err(e) = self.batch_message(i, frame, &mut wire) {
                return Err(self.client_error(e));
            }
        }
        if let Some(i) = current {
            pop_synthetic(&mut self.conns[i], &mut self.out, self.merge.as_ref());
            if !wire.is_empty()
                && let Err(e) = self.conns[i].conn.send(&wire).await
            {
                return Err(self.server_lost(i, e));
            }
        }
        Ok(())
    }

    /// The batch only prepares, binds, describes and runs `SELECT tessera_next_id()`: the
    /// proxy answers it without a server.
    fn answers_locally(&self, batch: &[Frame]) -> Local {
        // The common case costs one scan of each Parse for the function's name.
        if self.local_statements.is_empty()
            && !batch
                .iter()
                .any(|f| f.tag() == tag::PARSE && mentions_next_id(f.body()))
        {
            return Local::None;
        }
        let mut statements: HashMap<&[u8], bool> = HashMap::new();
        let mut portals: HashMap<&[u8], bool> = HashMap::new();
        let (mut any, mut other) = (false, false);
        let statement_local = |name: &[u8], seen: &HashMap<&[u8], bool>| {
            seen.get(name)
                .copied()
                .unwrap_or_else(|| self.local_statements.contains_key(name))
        };
        for frame in batch {
            let body = frame.body();
            let local = match frame.tag() {
                tag::PARSE => match decode::parse(body) {
                    Ok(p) => {
                        let local = next_id_call(&String::from_utf8_lossy(p.query)).is_some();
                        statements.insert(p.name, local);
                        local
                    }
                    Err(_) => false,
                },
                tag::BIND => match decode::bind(body) {
                    Ok(b) => {
                        let local = statement_local(b.statement, &statements);
                        portals.insert(b.portal, local);
                        local
                    }
                    Err(_) => false,
                },
                tag::DESCRIBE | tag::CLOSE => match decode::target(body, "Describe") {
                    Ok((b'S', name)) => statement_local(name, &statements),
                    Ok((_, name)) => portals
                        .get(name)
                        .copied()
                        .unwrap_or_else(|| self.local_portals.contains_key(name)),
                    Err(_) => false,
                },
                tag::EXECUTE => match decode::cstr(body, "Execute") {
                    Ok((name, _)) => portals
                        .get(name)
                        .copied()
                        .unwrap_or_else(|| self.local_portals.contains_key(name)),
                    Err(_) => false,
                },
                _ => continue,
            };
            any |= local;
            other |= !local;
        }
        match (any, other) {
            (true, false) => Local::All,
            (true, true) => Local::Mixed,
            _ => Local::None,
        }
    }

    /// Answers a batch [`Session::answers_locally`] accepted, message by message.
    async fn run_local_batch(&mut self, batch: Vec<Frame>) -> Result<(), End> {
        self.settle().await?;
        for frame in batch {
            let body = frame.body();
            match frame.tag() {
                tag::PARSE => {
                    let p = decode::parse(body).map_err(|e| self.client_error(e))?;
                    let column = next_id_call(&String::from_utf8_lossy(p.query))
                        .expect("invariant: checked by answers_locally");
                    self.local_statements
                        .insert(Bytes::copy_from_slice(p.name), column);
                    build::parse_complete(&mut self.out);
                }
                tag::BIND => {
                    let b = decode::bind(body).map_err(|e| self.client_error(e))?;
                    let (_, formats) =
                        decode::bind_result_formats(b.rest).map_err(|e| self.client_error(e))?;
                    let column = self
                        .local_statements
                        .get(b.statement)
                        .cloned()
                        .unwrap_or_default();
                    let format = formats.first().copied().unwrap_or(0);
                    self.local_portals
                        .insert(Bytes::copy_from_slice(b.portal), (column, format));
                    build::message(&mut self.out, b'2', |_| {});
                }
                tag::DESCRIBE => {
                    let (kind, name) =
                        decode::target(body, "Describe").map_err(|e| self.client_error(e))?;
                    if kind == b'S' {
                        let column = self.local_statements.get(name).cloned().unwrap_or_default();
                        build::message(&mut self.out, b't', |b| b.put_i16(0));
                        next_id_description(&mut self.out, &column, 0);
                    } else {
                        let (column, format) =
                            self.local_portals.get(name).cloned().unwrap_or_default();
                        next_id_description(&mut self.out, &column, format);
                    }
                }
                tag::EXECUTE => {
                    let (name, _) =
                        decode::cstr(body, "Execute").map_err(|e| self.client_error(e))?;
                    let format = self.local_portals.get(name).map_or(0, |p| p.1);
                    let id = self.shared.ids.next();
                    next_id_row(&mut self.out, id, format);
                    build::command_complete(&mut self.out, "SELECT 1");
                }
                tag::CLOSE => {
                    let (kind, name) =
                        decode::target(body, "Close").map_err(|e| self.client_error(e))?;
                    if kind == b'S' {
                        self.local_statements.remove(name);
                    } else {
                        self.local_portals.remove(name);
                    }
                    build::close_complete(&mut self.out);
                }
                tag::SYNC => {
                    self.skip_until_sync = false;
                    let status = self.client_status();
                    build::ready_for_query(&mut self.out, status);
                }
                _ => {} // Flush: the replies go out with the next flush of the relay loop
            }
        }
        Ok(())
    }

    /// After an error raised by the proxy for a batch: skip to Sync, which gets its
    /// ReadyForQuery so the client can go on.
    fn end_failed_batch(&mut self, has_sync: bool) -> Result<(), End> {
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
        targets[from..].iter().flatten().next().map(|plan| {
            let Fanout::One(shard) = plan.fanout else {
                return ConnKey::primary(0);
            };
            self.choose(shard.0, plan)
        })
    }

    /// The plan of a Bind: its statement's analysis evaluated with its values.
    fn plan_bind(
        &self,
        frame: &Frame,
        overlay: &HashMap<Bytes, (Arc<Analysis>, Vec<u32>, Bytes)>,
    ) -> Result<Plan, router::Error> {
        if self.shared.router.passthrough() {
            return Ok(PASSTHROUGH.with(Plan::clone));
        }
        let bad = |_| router::Error::BadKey("malformed Bind message".into());
        let bind = decode::bind(frame.body()).map_err(bad)?;
        let (analysis, types, parse) =
            if let Some((analysis, types, parse)) = overlay.get(bind.statement) {
                // Parsed earlier in this batch; server-described types (if the statement existed
                // already) are better than the Parse's unspecified ones.
                let learned = self
                    .statements
                    .get(bind.statement)
                    .map(|s| s.param_types.lock().clone())
                    .filter(|t| t.len() >= types.len() && !t.contains(&0));
                (
                    analysis.clone(),
                    learned.unwrap_or_else(|| types.clone()),
                    parse.clone(),
                )
            } else if bind.statement.is_empty() {
                match &self.unnamed {
                    Some(u) => (u.analysis.clone(), u.types.clone(), u.parse.clone()),
                    None => {
                        return self
                            .shared
                            .router
                            .plan(&self.shared.router.analyze(""), &Params::none());
                    }
                }
            } else {
                match self.statements.get(bind.statement) {
                    Some(stmt) => (
                        stmt.analysis.clone(),
                        stmt.param_types.lock().clone(),
                        stmt.parse.clone(),
                    ),
                    // The error for an unknown statement comes in order from batch_message.
                    None => {
                        return self
                            .shared
                            .router
                            .plan(&self.shared.router.analyze(""), &Params::none());
                    }
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
    }

    /// A single statement (Parse? Bind Describe? Execute Sync) on several shards.
    async fn scatter_batch(&mut self, batch: Vec<Frame>, plan: Plan) -> Result<(), End> {
        // A portal fetched in pieces (a row limit, or a named portal fetched later) would need
        // the merge to keep every shard's portal open: not yet.
        let partial = batch.iter().any(|f| match f.tag() {
            tag::EXECUTE => decode::cstr(f.body(), "Execute")
                .map(|(portal, rest)| {
                    !portal.is_empty() || rest.get(..4).is_some_and(|n| n != [0, 0, 0, 0])
                })
                .unwrap_or(true),
            tag::BIND => decode::bind(f.body())
                .map(|b| !b.portal.is_empty())
                .unwrap_or(true),
            _ => false,
        });
        if partial {
            self.settle().await?;
            super::error(
                &mut self.out,
                "0A000",
                "not supported across shards: a named portal or a row-limited Execute on several shards",
            );
            return self.end_failed_batch(batch.iter().any(|f| f.tag() == tag::SYNC));
        }
        if let Some(spec) = plan.copy.clone()
            && !spec.to
        {
            return self.extended_copy_in(batch, plan, spec).await;
        }
        if batch.last().map(Frame::tag) != Some(tag::SYNC) {
            self.settle().await?;
            super::error(
                &mut self.out,
                "0A000",
                "not supported across shards: a statement without Sync",
            );
            return self.end_failed_batch(false);
        }
        if let Some((code, message)) = self.check_scatter_batch(&batch) {
            self.settle().await?;
            super::error(&mut self.out, code, &message);
            return self.end_failed_batch(true);
        }
        let shards = self.fanout_shards(&plan.fanout);
        if let Err(e) = self.note_write(&plan, &shards) {
            self.settle().await?;
            super::error(&mut self.out, e.sqlstate(), &e.to_string());
            if let Some(tx) = self.tx.as_mut() {
                tx.failed = true;
            }
            return self.end_failed_batch(true);
        }
        // COPY TO: every shard's data concatenated, like rows.
        self.copy_out = plan.copy.clone().filter(|c| c.to);
        let broadcast = matches!(plan.fanout, Fanout::Broadcast);
        let body: Vec<Frame> = batch[..batch.len() - 1].to_vec();
        let merge = plan.merge.clone();
        let split = plan.split.clone();
        let described = body.iter().any(|f| {
            f.tag() == tag::DESCRIBE
                && matches!(decode::target(f.body(), "Describe"), Ok((b'P', _)))
        });
        let mut nth = 0;
        self.scatter(&shards, &plan, broadcast, move |session, i, wire| {
            nth += 1;
            for frame in &body {
                if nth > 1
                    && frame.tag() == tag::PARSE
                    && let Ok(parse) = decode::parse(frame.body())
                    && !parse.name.is_empty()
                    && let Some(stmt) = session.statements.get(parse.name).cloned()
                {
                    // Registered by the first shard's pass; this shard just needs it prepared.
                    session.ensure_prepared(i, &stmt, wire);
                    continue;
                }
                let shard = session.conns[i].key.shard;
                let part = split
                    .as_ref()
                    .and_then(|parts| parts.iter().find(|p| p.0.0 == shard));
                match (&merge, part) {
                    (_, Some((_, part))) if frame.tag() == tag::BIND => {
                        session.split_bind(i, frame, part, described, wire)?;
                    }
                    (Some(m), _) if frame.tag() == tag::BIND => {
                        session.merge_bind(i, frame, m, described, wire)?;
                    }
                    _ => session.batch_message(i, frame.clone(), wire)?,
                }
            }
            session.conns[i].wrote |= plan.writes;
            // Our own Sync per connection; the merge emits the client's ReadyForQuery.
            build::message(wire, tag::SYNC, |_| {});
            Ok(vec![Kind::Sync])
        })
        .await
    }

    /// What must fail a batch on several shards before anything is sent: an error the proxy
    /// raises midway could not stop the servers running the rest.
    fn check_scatter_batch(&self, batch: &[Frame]) -> Option<(&'static str, String)> {
        if let Some(pos) = batch.iter().position(|f| f.tag() == tag::EXECUTE)
            && batch[pos + 1..].iter().any(|f| f.tag() != tag::SYNC)
        {
            // Their replies would overtake the merged rows.
            return Some((
                "0A000",
                "not supported across shards: messages after the Execute of a statement that spans shards, before Sync".into(),
            ));
        }
        let mut parsed: Vec<&[u8]> = Vec::new();
        for frame in batch {
            match frame.tag() {
                tag::PARSE => {
                    let Ok(parse) = decode::parse(frame.body()) else {
                        continue;
                    };
                    if !parse.name.is_empty() && self.statements.contains_key(parse.name) {
                        return Some((
                            "42P05",
                            format!(
                                "prepared statement \"{}\" already exists",
                                String::from_utf8_lossy(parse.name)
                            ),
                        ));
                    }
                    parsed.push(parse.name);
                }
                tag::BIND => {
                    let Ok(bind) = decode::bind(frame.body()) else {
                        continue;
                    };
                    let known = parsed.contains(&bind.statement)
                        || if bind.statement.is_empty() {
                            self.unnamed.is_some()
                        } else {
                            self.statements.contains_key(bind.statement)
                        };
                    if !known {
                        return Some((
                            "26000",
                            format!(
                                "prepared statement \"{}\" does not exist",
                                String::from_utf8_lossy(bind.statement)
                            ),
                        ));
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// The Bind of a statement whose results are merged: binds the client's values to the
    /// statement rewritten for the shards instead, asks for the extra columns in text, and
    /// describes the portal so the merger knows the column types.
    fn merge_bind(
        &mut self,
        i: usize,
        frame: &Frame,
        m: &MergePlan,
        described: bool,
        wire: &mut BytesMut,
    ) -> Result<(), protocol::Error> {
        let bind = decode::bind(frame.body())?;
        let (params, formats) = decode::bind_result_formats(bind.rest)?;
        let types = if bind.statement.is_empty() {
            match &self.unnamed {
                Some(u) => u.types.clone(),
                None => {
                    self.synthetic_error(i, "26000", "unnamed prepared statement does not exist");
                    return Ok(());
                }
            }
        } else {
            match self.lookup(i, bind.statement) {
                Some(stmt) => stmt.param_types.lock().clone(),
                None => return Ok(()),
            }
        };
        let mut types = types;
        for &n in &m.dropped_params {
            // A LIMIT/OFFSET parameter the shards' statement no longer mentions: declared, so
            // the client's Bind still fits, as int8 unless the client said otherwise.
            if types.len() < n {
                types.resize(n, 0);
            }
            if types[n - 1] == 0 {
                types[n - 1] = 20;
            }
        }
        let mut encoded = Vec::with_capacity(2 + 4 * types.len());
        encoded.extend_from_slice(&(types.len() as i16).to_be_bytes());
        for t in &types {
            encoded.extend_from_slice(&t.to_be_bytes());
        }
        let stmt = self.shared.statements.intern(
            &decode::Parse {
                name: b"",
                query: m.sql.as_bytes(),
                param_types: &encoded,
            },
            &self.shared.router,
        );
        self.ensure_prepared(i, &stmt, wire);
        let client = |j: usize| match formats.len() {
            0 => 0,
            1 => formats[0],
            _ => formats.get(j).copied().unwrap_or(0),
        };
        let result_formats: Vec<i16> = match m.spec.columns {
            Some(n) => {
                let visible = n - m.spec.extras;
                (0..n)
                    .map(|j| if j < visible { client(j) } else { 0 })
                    .collect()
            }
            None if formats.len() > 1 => formats
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, m.spec.extras))
                .collect(),
            None => formats,
        };
        build::message(wire, tag::BIND, |b| {
            build::cstr(b, bind.portal);
            build::cstr(b, &stmt.server_name);
            b.put_slice(params);
            b.put_i16(result_formats.len() as i16);
            for f in &result_formats {
                b.put_i16(*f);
            }
        });
        self.portals
            .insert(Bytes::copy_from_slice(bind.portal), self.conns[i].key);
        self.conns[i].expect.push_back(Expect::Reply {
            kind: Kind::Bind,
            forward: true,
        });
        if !described {
            self.describe_portal(i, bind.portal, wire);
        }
        Ok(())
    }

    /// The Bind of a multi-row INSERT split by shard: this shard's rows only, with their
    /// parameters.
    fn split_bind(
        &mut self,
        i: usize,
        frame: &Frame,
        part: &router::rewrite::SplitInsert,
        described: bool,
        wire: &mut BytesMut,
    ) -> Result<(), protocol::Error> {
        let bind = decode::bind(frame.body())?;
        let (params, results) = decode::bind_result_formats(bind.rest)?;
        let decode::BindParams { formats, values } = decode::bind_params(params)?;
        let types = if bind.statement.is_empty() {
            self.unnamed
                .as_ref()
                .map(|u| u.types.clone())
                .unwrap_or_default()
        } else {
            match self.lookup(i, bind.statement) {
                Some(stmt) => stmt.param_types.lock().clone(),
                None => return Ok(()),
            }
        };
        let mut encoded = Vec::with_capacity(2 + 4 * part.params.len());
        encoded.extend_from_slice(&(part.params.len() as i16).to_be_bytes());
        for &n in &part.params {
            encoded.extend_from_slice(&types.get(n - 1).copied().unwrap_or(0).to_be_bytes());
        }
        let stmt = self.shared.statements.intern(
            &decode::Parse {
                name: b"",
                query: part.sql.as_bytes(),
                param_types: &encoded,
            },
            &self.shared.router,
        );
        self.ensure_prepared(i, &stmt, wire);
        let mut chosen = Vec::with_capacity(part.params.len());
        for &n in &part.params {
            chosen.push(
                *values
                    .get(n - 1)
                    .ok_or(protocol::Error::Malformed("Bind"))?,
            );
        }
        build::message(wire, tag::BIND, |b| {
            build::cstr(b, bind.portal);
            build::cstr(b, &stmt.server_name);
            if formats.len() > 1 {
                b.put_i16(part.params.len() as i16);
                for &n in &part.params {
                    b.put_i16(formats.get(n - 1).copied().unwrap_or(0));
                }
            } else {
                b.put_i16(formats.len() as i16);
                for f in &formats {
                    b.put_i16(*f);
                }
            }
            b.put_i16(chosen.len() as i16);
            for v in &chosen {
                match v {
                    Some(v) => {
                        b.put_i32(v.len() as i32);
                        b.put_slice(v);
                    }
                    None => b.put_i32(-1),
                }
            }
            b.put_i16(results.len() as i16);
            for f in &results {
                b.put_i16(*f);
            }
        });
        self.portals
            .insert(Bytes::copy_from_slice(bind.portal), self.conns[i].key);
        self.conns[i].expect.push_back(Expect::Reply {
            kind: Kind::Bind,
            forward: true,
        });
        if !described {
            // RETURNING rows are merged in VALUES order: the merger needs their description.
            self.describe_portal(i, bind.portal, wire);
        }
        Ok(())
    }

    /// A Describe of a portal the proxy sends for itself (its reply is not the client's).
    fn describe_portal(&mut self, i: usize, portal: &[u8], wire: &mut BytesMut) {
        build::message(wire, tag::DESCRIBE, |b| {
            b.put_u8(b'P');
            build::cstr(b, portal);
        });
        self.conns[i].expect.push_back(Expect::Reply {
            kind: Kind::Describe {
                stmt: None,
                portal: true,
            },
            forward: false,
        });
    }

    fn batch_message(
        &mut self,
        i: usize,
        frame: Frame,
        wire: &mut BytesMut,
    ) -> Result<(), protocol::Error> {
        let reply = |kind| Expect::Reply {
            kind,
            forward: true,
        };
        match frame.tag() {
            tag::PARSE => {
                let parse = decode::parse(frame.body())?;
                self.local_statements.remove(parse.name);
                if parse.name.is_empty() {
                    let sql = String::from_utf8_lossy(parse.query);
                    self.unnamed = Some(Unnamed {
                        parse: frame.bytes().clone(),
                        analysis: self.shared.router.analyze(&sql),
                        types: crate::server::parse_param_types(parse.param_types),
                        changes: super::settings::effects(&sql).changes,
                    });
                    let held = &mut self.conns[i];
                    held.unnamed_ready = true;
                    wire.extend_from_slice(frame.bytes());
                    held.expect.push_back(reply(Kind::Parse {
                        stmt: None,
                        client: None,
                    }));
                    return Ok(());
                }
                let name = Bytes::copy_from_slice(parse.name);
                if self.statements.contains_key(&name) {
                    let msg = format!(
                        "prepared statement \"{}\" already exists",
                        String::from_utf8_lossy(&name)
                    );
                    self.synthetic_error(i, "42P05", &msg);
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
                    }));
                }
                self.statements.insert(name, stmt);
            }
            tag::BIND => {
                let bind = decode::bind(frame.body())?;
                self.local_portals.remove(bind.portal);
                let portal_unnamed = bind.portal.is_empty();
                if bind.statement.is_empty() {
                    self.ensure_unnamed(i, wire);
                    wire.extend_from_slice(frame.bytes());
                    if portal_unnamed {
                        self.portal_changes = self
                            .unnamed
                            .as_ref()
                            .map(|u| u.changes.clone())
                            .unwrap_or_default();
                    }
                } else {
                    let Some(stmt) = self.lookup(i, bind.statement) else {
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
                }
                self.portals
                    .insert(Bytes::copy_from_slice(bind.portal), self.conns[i].key);
                self.conns[i].expect.push_back(reply(Kind::Bind));
            }
            tag::DESCRIBE => {
                let (kind, name) = decode::target(frame.body(), "Describe")?;
                let mut described = None;
                if kind == b'S' && !name.is_empty() {
                    let Some(stmt) = self.lookup(i, name) else {
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
                        self.ensure_unnamed(i, wire);
                    }
                    wire.extend_from_slice(frame.bytes());
                }
                self.conns[i].expect.push_back(reply(Kind::Describe {
                    stmt: described,
                    portal: kind == b'P',
                }));
            }
            tag::EXECUTE => {
                let (portal, _) = decode::cstr(frame.body(), "Execute")?;
                let changes = if portal.is_empty() {
                    std::mem::take(&mut self.portal_changes)
                } else {
                    Vec::new()
                };
                wire.extend_from_slice(frame.bytes());
                self.conns[i]
                    .expect
                    .push_back(reply(Kind::Execute { changes }));
            }
            tag::CLOSE => {
                let (kind, name) = decode::target(frame.body(), "Close")?;
                if kind == b'S' && !name.is_empty() {
                    // The server-side statement is shared and stays; the client's name goes.
                    self.statements.remove(name);
                    let mut msg = BytesMut::new();
                    build::close_complete(&mut msg);
                    self.conns[i]
                        .expect
                        .push_back(Expect::Synthetic(msg.freeze()));
                } else {
                    wire.extend_from_slice(frame.bytes());
                    self.conns[i].expect.push_back(reply(Kind::Close));
                }
            }
            tag::SYNC => {
                self.skip_until_sync = false;
                wire.extend_from_slice(frame.bytes());
                self.conns[i].expect.push_back(reply(Kind::Sync));
            }
            _ => wire.extend_from_slice(frame.bytes()), // Flush
        }
        Ok(())
    }

    /// The client's statement by name, or an error queued in its place.
    fn lookup(&mut self, i: usize, name: &[u8]) -> Option<Arc<Statement>> {
        if let Some(stmt) = self.statements.get(name) {
            return Some(stmt.clone());
        }
        let msg = format!(
            "prepared statement \"{}\" does not exist",
            String::from_utf8_lossy(name)
        );
        self.synthetic_error(i, "26000", &msg);
        None
    }

    /// An error the proxy raises inside a batch: like Postgres, it skips the rest up to Sync.
    fn synthetic_error(&mut self, i: usize, code: &str, msg: &str) {
        let mut err = BytesMut::new();
        super::error(&mut err, code, msg);
        self.conns[i]
            .expect
            .push_back(Expect::Synthetic(err.freeze()));
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
                },
                forward: false,
            });
        }
    }

    fn ensure_unnamed(&mut self, i: usize, wire: &mut BytesMut) {
        let held = &mut self.conns[i];
        if held.unnamed_ready {
            return;
        }
        if let Some(unnamed) = &self.unnamed {
            wire.extend_from_slice(&unnamed.parse);
            held.unnamed_ready = true;
            held.expect.push_back(Expect::Reply {
                kind: Kind::Parse {
                    stmt: None,
                    client: None,
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
                    tag::NOTICE_RESPONSE | tag::NOTIFICATION | tag::PARAMETER_STATUS => {
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
        let held = &mut self.conns[i];
        match t {
            tag::ERROR_RESPONSE => return self.on_server_error(i, frame, forward),
            tag::COMMAND_COMPLETE => {
                held.last_tag = decode::command_complete(frame.body())
                    .unwrap_or_default()
                    .to_string();
            }
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
                    let head = held.expect.pop_front();
                    held.expect.retain(|e| {
                        !matches!(
                            e,
                            Expect::Reply {
                                kind: Kind::Sync,
                                ..
                            }
                        )
                    });
                    if let Some(head) = head {
                        held.expect.push_front(head);
                    }
                }
            }
            tag::PARAMETER_DESCRIPTION => {
                if let Some(Expect::Reply {
                    kind:
                        Kind::Describe {
                            stmt: Some(stmt), ..
                        },
                    ..
                }) = held.expect.front()
                {
                    stmt.learn_param_types(&crate::server::parse_param_types(frame.body()));
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
                held.conn.status = status;
                held.copy_in = false;
            }
            _ => {}
        }
        if ends == Ends::Mismatch {
            return Err(self.desync(i, &format!("message {:?}", t as char)));
        }
        // Replies to injected requests are dropped, but a notification is for the client
        // whatever request it arrived during.
        if (forward || t == tag::NOTIFICATION) && self.merge_allows(i, t, &frame) {
            self.out.extend_from_slice(frame.bytes());
        }
        if ends == Ends::Yes {
            let Some(Expect::Reply { kind, forward }) = self.conns[i].expect.pop_front() else {
                unreachable!("head checked above");
            };
            self.completed(i, kind, t, forward);
        }
        Ok(())
    }

    /// In a merge, which replies reach the client; CommandComplete tags are collected.
    fn merge_allows(&mut self, i: usize, t: u8, frame: &Frame) -> bool {
        let key = self.conns[i].key;
        let Some(merge) = self.merge.as_mut() else {
            return true;
        };
        if t == tag::COPY_DATA && merge.copy_header && !merge.past_header.contains(&key) {
            // Each shard starts with the header line; the client gets the first one only.
            merge.past_header.push(key);
            return !merge.error && merge.first;
        }
        match t {
            tag::DATA_ROW => !merge.error && (merge.first || !merge.broadcast),
            tag::COPY_DATA if merge.copy_out => !merge.error,
            tag::COPY_DONE if merge.copy_out => false,
            tag::COMMAND_COMPLETE => {
                // The k-th completion of each connection adds into the k-th tag, whichever
                // connection the merge happened to read first.
                let text = decode::command_complete(frame.body()).unwrap_or_default();
                let k = match merge.completions.iter_mut().find(|(c, _)| *c == key) {
                    Some((_, n)) => {
                        *n += 1;
                        *n - 1
                    }
                    None => {
                        merge.completions.push((key, 1));
                        0
                    }
                };
                if merge.broadcast && !merge.first {
                    return false;
                }
                match merge.tags.get_mut(k) {
                    Some(tag) if !merge.broadcast => *tag = add_counts(tag, text),
                    Some(_) => {}
                    None => merge.tags.push(text.to_string()),
                }
                false
            }
            tag::READY_FOR_QUERY => false,
            tag::NOTICE_RESPONSE | tag::NOTIFICATION | tag::PARAMETER_STATUS => merge.first,
            _ => merge.first,
        }
    }

    /// Bookkeeping when a request's reply is complete.
    fn completed(&mut self, i: usize, kind: Kind, t: u8, forward: bool) {
        if !forward {
            // Injected requests (settings replay, BEGIN, our own Syncs) change nothing the
            // session tracks beyond the connection's status.
            self.conns[i].query_failed = false;
            let merge = self.merge.as_ref();
            pop_synthetic(&mut self.conns[i], &mut self.out, merge);
            return;
        }
        match kind {
            Kind::Execute { changes } if t == tag::COMMAND_COMPLETE => {
                self.tx_changes.extend(changes)
            }
            Kind::Query { changes } => {
                if !self.conns[i].query_failed {
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
                    implicit: false,
                });
            }
            return;
        }
        if held.last_tag != "ROLLBACK" {
            let changes = std::mem::take(&mut self.tx_changes);
            self.settings.apply(&changes);
        }
        self.tx_changes.clear();
        held.conn.settings = self.settings.fingerprint();
        if self.tx.is_some() && was_begun && !self.conns.iter().any(|h| h.begun) {
            // COMMIT or ROLLBACK inside a query the router passed through.
            self.tx = None;
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
        // An injected Parse that fails still answers for the client's request that needed it.
        if merge_ok {
            self.out.extend_from_slice(frame.bytes());
        }
        if self.merge.is_none() {
            self.skip_until_sync = self.skip_until_sync
                || !held.expect.iter().any(|e| {
                    matches!(
                        e,
                        Expect::Reply {
                            kind: Kind::Sync,
                            ..
                        }
                    )
                });
        }
        while let Some(front) = held.expect.front() {
            if matches!(
                front,
                Expect::Reply {
                    kind: Kind::Sync,
                    ..
                }
            ) {
                break;
            }
            if let Some(Expect::Reply {
                kind: Kind::Parse { stmt, client },
                ..
            }) = held.expect.pop_front()
            {
                if let Some(id) = stmt {
                    held.conn.prepared.remove(&id);
                }
                if let Some(name) = client {
                    self.statements.remove(&name);
                }
            }
        }
        if was_copy_in
            && !held.expect.iter().any(|e| {
                matches!(
                    e,
                    Expect::Reply {
                        kind: Kind::Sync,
                        ..
                    }
                )
            })
        {
            // A COPY FROM STDIN started by Execute failed: the server now ignores everything
            // up to a Sync, and the client's Sync was already spent (ignored during the copy).
            // Send one of ours, so the connection comes back in sync.
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

    /// Returns idle connections to the pool when the session is between transactions.
    fn release_idle(&mut self) {
        if self.mode == PoolMode::Session || self.tx.is_some() || !self.batch.is_empty() {
            return;
        }
        let before = self.conns.len();
        self.conns
            .retain(|h| !(h.expect.is_empty() && !h.copy_in && h.conn.status == TxStatus::Idle));
        if self.conns.len() != before {
            self.shared
                .cancels
                .set_targets(self.pid, self.conns.iter().map(|h| h.conn.key.clone()));
        }
    }

    /// At the end of a session: a connection still mid-request cannot be reused; a session-mode
    /// connection is reset so the next client starts clean.
    async fn release_on_exit(&mut self) {
        self.shared.cancels.set_targets(self.pid, []);
        for mut held in std::mem::take(&mut self.conns) {
            let idle =
                held.expect.is_empty() && !held.copy_in && held.conn.status == TxStatus::Idle;
            if !idle {
                held.conn.broken = true;
                continue;
            }
            if self.mode == PoolMode::Session && reset_session(&mut held.conn).await.is_err() {
                held.conn.broken = true;
            }
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

/// If `sql` is `SELECT tessera_next_id() [AS name]`, the column name it returns.
fn next_id_call(sql: &str) -> Option<String> {
    if sql.len() > 128 || !mentions_next_id(sql.as_bytes()) {
        return None;
    }
    let text = sql.trim().trim_end_matches(';').trim().to_ascii_lowercase();
    let words: Vec<&str> = text.split_whitespace().collect();
    let call = |w: &str| w == "tessera_next_id()";
    match words.as_slice() {
        ["select", f] if call(f) => Some("tessera_next_id".into()),
        ["select", f, "as", name] | ["select", f, name]
            if call(f) && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            Some((*name).to_string())
        }
        _ => None,
    }
}

fn mentions_next_id(text: &[u8]) -> bool {
    text.windows(15)
        .any(|w| w.eq_ignore_ascii_case(b"tessera_next_id"))
}

/// The RowDescription of `SELECT tessera_next_id()`: one bigint column.
fn next_id_description(out: &mut BytesMut, column: &str, format: i16) {
    build::message(out, tag::ROW_DESCRIPTION, |b| {
        b.put_i16(1);
        build::cstr(b, column.as_bytes());
        b.put_u32(0);
        b.put_i16(0);
        b.put_u32(20);
        b.put_i16(8);
        b.put_i32(-1);
        b.put_i16(format);
    });
}

fn next_id_row(out: &mut BytesMut, id: i64, format: i16) {
    let value = if format == 1 {
        id.to_be_bytes().to_vec()
    } else {
        id.to_string().into_bytes()
    };
    build::message(out, tag::DATA_ROW, |b| {
        b.put_i16(1);
        b.put_i32(value.len() as i32);
        b.put_slice(&value);
    });
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
        (Kind::Bind, BIND_COMPLETE) => Ends::Yes,
        (Kind::Close, CLOSE_COMPLETE) => Ends::Yes,
        (Kind::Describe { .. }, PARAMETER_DESCRIPTION) => Ends::No,
        (Kind::Describe { .. }, ROW_DESCRIPTION | NO_DATA) => Ends::Yes,
        (Kind::Execute { .. }, COMMAND_COMPLETE | EMPTY_QUERY | PORTAL_SUSPENDED) => Ends::Yes,
        (
            Kind::Execute { .. },
            DATA_ROW | COPY_IN_RESPONSE | COPY_OUT_RESPONSE | COPY_BOTH_RESPONSE | b'd' | b'c',
        ) => Ends::No,
        (Kind::Sync | Kind::Query { .. } | Kind::Lsn, READY_FOR_QUERY) => Ends::Yes,
        // A simple Query (or FunctionCall) reply holds anything up to its ReadyForQuery.
        (Kind::Query { .. } | Kind::Lsn, _) => Ends::No,
        _ => Ends::Mismatch,
    }
}

/// Sends every synthetic reply at the head of the queue (in a merge, only the first
/// connection's count).
fn pop_synthetic(held: &mut Held, out: &mut BytesMut, merge: Option<&Merge>) {
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
