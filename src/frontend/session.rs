//! The relay: one logged-in client, the server connection it holds (if any), and the
//! bookkeeping that makes transaction pooling invisible to the client.
//!
//! Every message sent to a server pushes an [`Expect`] entry; every server reply is matched
//! against the head of that queue. This is what lets the proxy inject messages the client did
//! not send (a Parse for a statement the client prepared on another server connection, the
//! replay of its SET commands) and swallow their replies, and answer some messages itself
//! (ParseComplete for a statement the server already has, CloseComplete) in the right order.
//! A reply that does not fit the queue is a desync: the server connection is discarded.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Login;
use super::settings::{Change, Settings};
use crate::backend::{self, PooledConn};
use crate::config::PoolMode;
use crate::protocol::{self, Frame, FrameReader, TxStatus, build, decode, tag};
use crate::router::lex;
use crate::server::{Shared, Statement};

/// What a reply from the server answers.
#[derive(Debug)]
enum Kind {
    /// `stmt`: the registry id it creates on the server; `client`: the client's name for it.
    Parse {
        stmt: Option<u64>,
        client: Option<Bytes>,
    },
    Bind,
    Describe,
    Execute {
        changes: Vec<Change>,
    },
    Close,
    Sync,
    /// A simple Query or FunctionCall: its reply ends with ReadyForQuery.
    Query {
        changes: Vec<Change>,
    },
}

#[derive(Debug)]
enum Expect {
    /// A reply from the server; `forward` is false for messages the proxy injected.
    Reply { kind: Kind, forward: bool },
    /// A reply the proxy makes itself, sent to the client when it reaches the head.
    Synthetic(Bytes),
}

/// A server connection checked out by this client.
struct Held {
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
}

/// One client's session after login.
pub struct Session {
    shared: Arc<Shared>,
    client: FrameReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    out: BytesMut,
    server: Option<Held>,
    batch: Vec<Frame>,
    statements: HashMap<Bytes, Arc<Statement>>,
    unnamed: Option<Bytes>,
    unnamed_changes: Vec<Change>,
    portal_changes: Vec<Change>,
    settings: Settings,
    tx_changes: Vec<Change>,
    status: TxStatus,
    mode: PoolMode,
    pid: i32,
    skip_until_sync: bool,
}

/// Why the session ended early.
#[derive(Debug)]
enum End {
    /// The client left (Terminate, EOF, I/O error): nothing more to say.
    ClientGone,
    /// The client was sent a FATAL error.
    Fatal,
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
            server: None,
            batch: Vec::new(),
            statements: HashMap::new(),
            unnamed: None,
            unnamed_changes: Vec::new(),
            portal_changes: Vec::new(),
            settings: login.settings,
            tx_changes: Vec::new(),
            status: TxStatus::Idle,
            mode,
            pid: login.pid,
            skip_until_sync: false,
        }
    }

    /// Relays until the client leaves or the proxy shuts down.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let end = self.relay(shutdown).await;
        debug!(?end, "session ended");
        let _ = self.flush_client().await;
        self.release_on_exit().await;
    }

    async fn relay(&mut self, shutdown: CancellationToken) -> End {
        loop {
            // Batch writes to the client: flush only when no further server reply is buffered.
            let more_buffered = self
                .server
                .as_ref()
                .is_some_and(|h| h.conn.reader.has_frame());
            if !self.out.is_empty() && !more_buffered && self.flush_client().await.is_err() {
                return End::ClientGone;
            }
            let event = match &mut self.server {
                Some(held) => tokio::select! {
                    biased;
                    r = held.conn.reader.next() => Event::Server(r),
                    r = self.client.next() => Event::Client(r),
                },
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
                Event::Server(Ok(frame)) => self.on_server(frame),
                Event::Server(Err(e)) => {
                    let addr = self
                        .server
                        .as_ref()
                        .map(|h| h.conn.addr.clone())
                        .unwrap_or_default();
                    Err(self.server_lost(backend::Error::protocol(&addr, e)))
                }
            };
            if let Err(end) = step {
                return end;
            }
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

    /// The server connection died or broke protocol: the client's session cannot continue
    /// (its transaction state is gone), so it gets a FATAL error, as if Postgres had crashed.
    fn server_lost(&mut self, e: backend::Error) -> End {
        if let Some(held) = self.server.as_mut() {
            held.conn.broken = true;
        }
        warn!(cause = %e, "server connection lost");
        super::fatal_error(&mut self.out, e.sqlstate(), &e.to_string());
        End::Fatal
    }

    fn desync(&mut self, what: &str) -> End {
        let addr = self
            .server
            .as_ref()
            .map(|h| h.conn.addr.clone())
            .unwrap_or_default();
        self.server_lost(backend::Error::Protocol {
            addr,
            reason: format!("unexpected {what}: protocol desynchronized"),
        })
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
            tag::COPY_DATA | tag::COPY_DONE | tag::COPY_FAIL => {
                // Outside COPY mode Postgres ignores these; so do we.
                if let Some(held) = self.server.as_mut() {
                    if frame.tag() != tag::COPY_DATA {
                        held.copy_in = false;
                    }
                    if let Err(e) = held.conn.send(frame.bytes()).await {
                        return Err(self.server_lost(e));
                    }
                }
                Ok(())
            }
            tag::FUNCTION_CALL => {
                if let Err(e) = self.acquire().await {
                    return self.refuse_request(&e);
                }
                self.send_request(
                    frame.bytes().clone(),
                    Kind::Query {
                        changes: Vec::new(),
                    },
                )
                .await
            }
            tag::TERMINATE => Err(End::ClientGone),
            other => {
                let msg = format!("invalid frontend message type {}", other);
                super::fatal_error(&mut self.out, "08P01", &msg);
                Err(End::Fatal)
            }
        }
    }

    async fn on_query(&mut self, frame: Frame) -> Result<(), End> {
        let sql = match decode::query(frame.body()) {
            Ok(sql) => String::from_utf8_lossy(sql),
            Err(e) => return Err(self.client_error(e)),
        };
        let effects = super::settings::effects(&sql);
        if effects.drops_prepared {
            // DEALLOCATE of a statement prepared through the protocol is answered here: the
            // server-side statement belongs to the proxy and other clients may share it.
            if let Some(reply) = self.deallocate(&sql) {
                return self.reply_locally(reply);
            }
        }
        if let Err(e) = self.acquire().await {
            return self.refuse_request(&e);
        }
        let held = self.server.as_mut().expect("invariant: acquired above");
        if effects.drops_prepared {
            held.conn.prepared.clear();
            if effects.changes.contains(&Change::ResetAll) {
                // DISCARD ALL drops the client's statements too, as it would on Postgres.
                self.statements.clear();
                self.unnamed = None;
            }
        }
        held.unnamed_ready = false;
        self.send_request(
            frame.into_bytes(),
            Kind::Query {
                changes: effects.changes,
            },
        )
        .await
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
        match self.server.as_mut() {
            Some(held) if !held.expect.is_empty() => {
                // Its status is whatever the pending requests leave: claim it when they end.
                held.expect.push_back(Expect::Synthetic(msg.freeze()));
                // The requests still pending end in a ReadyForQuery the client sees first;
                // repeating the last known status is the closest approximation.
                let mut rfq = BytesMut::new();
                build::ready_for_query(&mut rfq, held.conn.status);
                held.expect.push_back(Expect::Synthetic(rfq.freeze()));
            }
            _ => {
                self.out.extend_from_slice(&msg);
                build::ready_for_query(&mut self.out, self.status);
            }
        }
        Ok(())
    }

    /// No server for a simple Query: the client gets the error and stays connected, as it
    /// would if Postgres had refused the statement.
    fn refuse_request(&mut self, e: &backend::Error) -> Result<(), End> {
        super::error(&mut self.out, e.sqlstate(), &e.to_string());
        build::ready_for_query(&mut self.out, self.status);
        Ok(())
    }

    async fn send_request(&mut self, bytes: Bytes, kind: Kind) -> Result<(), End> {
        let held = self
            .server
            .as_mut()
            .expect("invariant: caller acquired a server");
        held.expect.push_back(Expect::Reply {
            kind,
            forward: true,
        });
        if let Err(e) = held.conn.send(&bytes).await {
            return Err(self.server_lost(e));
        }
        Ok(())
    }

    /// Makes sure a server connection is held, replaying session settings on it.
    async fn acquire(&mut self) -> Result<(), backend::Error> {
        if self.server.is_some() {
            return Ok(());
        }
        let plan = self.shared.router.plan(b"");
        let pool = &self.shared.shards[plan.shard.0].primary;
        let mut conn = pool
            .get()
            .await
            .inspect_err(|e| warn!(cause = %e, "no server connection"))?;
        self.shared
            .cancels
            .set_target(self.pid, Some(conn.key.clone()));
        let mut expect = VecDeque::new();
        let fingerprint = self.settings.fingerprint();
        if conn.settings != fingerprint {
            let mut replay = BytesMut::new();
            build::query(&mut replay, &self.settings.replay_sql());
            conn.settings = fingerprint;
            expect.push_back(Expect::Reply {
                kind: Kind::Query {
                    changes: Vec::new(),
                },
                forward: false,
            });
            if let Err(e) = conn.send(&replay).await {
                self.shared.cancels.set_target(self.pid, None);
                return Err(e);
            }
        }
        self.server = Some(Held {
            conn,
            expect,
            unnamed_ready: false,
            copy_in: false,
            query_failed: false,
            last_tag: String::new(),
        });
        Ok(())
    }

    /// Sends a buffered extended-protocol batch (ending in Sync or Flush), rewriting statement
    /// names and preparing statements the server connection lacks.
    async fn run_batch(&mut self) -> Result<(), End> {
        let batch = std::mem::take(&mut self.batch);
        // A lone Sync outside a transaction needs no server: answer it here.
        if self.server.is_none() && batch.len() == 1 && batch[0].tag() == tag::SYNC {
            self.skip_until_sync = false;
            build::ready_for_query(&mut self.out, self.status);
            return Ok(());
        }
        if let Err(e) = self.acquire().await {
            super::error(&mut self.out, e.sqlstate(), &e.to_string());
            // Like any error in a batch: the rest is skipped up to Sync, which still gets its
            // ReadyForQuery so the client can go on.
            if batch.iter().any(|f| f.tag() == tag::SYNC) {
                build::ready_for_query(&mut self.out, self.status);
            } else {
                self.skip_until_sync = true;
            }
            return Ok(());
        }
        let mut wire = BytesMut::new();
        for frame in batch {
            if self.skip_until_sync && frame.tag() != tag::SYNC {
                continue;
            }
            if let Err(e) = self.batch_message(frame, &mut wire) {
                return Err(self.client_error(e));
            }
        }
        let held = self.server.as_mut().expect("invariant: acquired above");
        pop_synthetic(held, &mut self.out);
        if !wire.is_empty()
            && let Err(e) = held.conn.send(&wire).await
        {
            return Err(self.server_lost(e));
        }
        Ok(())
    }

    fn batch_message(&mut self, frame: Frame, wire: &mut BytesMut) -> Result<(), protocol::Error> {
        let held = self
            .server
            .as_mut()
            .expect("invariant: acquired by run_batch");
        let reply = |kind| Expect::Reply {
            kind,
            forward: true,
        };
        match frame.tag() {
            tag::PARSE => {
                let parse = decode::parse(frame.body())?;
                if parse.name.is_empty() {
                    self.unnamed = Some(frame.bytes().clone());
                    self.unnamed_changes =
                        super::settings::effects(&String::from_utf8_lossy(parse.query)).changes;
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
                    self.synthetic_error(wire, "42P05", &msg);
                    return Ok(());
                }
                let stmt = self.shared.statements.intern(&parse);
                let held = self
                    .server
                    .as_mut()
                    .expect("invariant: acquired by run_batch");
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
                let portal_unnamed = bind.portal.is_empty();
                if bind.statement.is_empty() {
                    self.ensure_unnamed(wire);
                    wire.extend_from_slice(frame.bytes());
                    if portal_unnamed {
                        self.portal_changes = self.unnamed_changes.clone();
                    }
                } else {
                    let Some(stmt) = self.lookup(bind.statement, wire) else {
                        return Ok(());
                    };
                    self.ensure_prepared(&stmt, wire);
                    build::message(wire, tag::BIND, |b| {
                        build::cstr(b, bind.portal);
                        build::cstr(b, &stmt.server_name);
                        b.put_slice(bind.rest);
                    });
                    if portal_unnamed {
                        self.portal_changes = stmt.effects.changes.clone();
                    }
                }
                self.push(reply(Kind::Bind));
            }
            tag::DESCRIBE => {
                let (kind, name) = decode::target(frame.body(), "Describe")?;
                if kind == b'S' && !name.is_empty() {
                    let Some(stmt) = self.lookup(name, wire) else {
                        return Ok(());
                    };
                    self.ensure_prepared(&stmt, wire);
                    build::message(wire, tag::DESCRIBE, |b| {
                        b.put_u8(b'S');
                        build::cstr(b, &stmt.server_name);
                    });
                } else {
                    if kind == b'S' {
                        self.ensure_unnamed(wire);
                    }
                    wire.extend_from_slice(frame.bytes());
                }
                self.push(reply(Kind::Describe));
            }
            tag::EXECUTE => {
                let (portal, _) = decode::cstr(frame.body(), "Execute")?;
                let changes = if portal.is_empty() {
                    std::mem::take(&mut self.portal_changes)
                } else {
                    Vec::new()
                };
                wire.extend_from_slice(frame.bytes());
                self.push(reply(Kind::Execute { changes }));
            }
            tag::CLOSE => {
                let (kind, name) = decode::target(frame.body(), "Close")?;
                if kind == b'S' && !name.is_empty() {
                    // The server-side statement is shared and stays; the client's name goes.
                    self.statements.remove(name);
                    let mut msg = BytesMut::new();
                    build::close_complete(&mut msg);
                    self.push(Expect::Synthetic(msg.freeze()));
                } else {
                    wire.extend_from_slice(frame.bytes());
                    self.push(reply(Kind::Close));
                }
            }
            tag::SYNC => {
                self.skip_until_sync = false;
                wire.extend_from_slice(frame.bytes());
                self.push(reply(Kind::Sync));
            }
            _ => wire.extend_from_slice(frame.bytes()), // Flush
        }
        Ok(())
    }

    fn push(&mut self, expect: Expect) {
        let held = self
            .server
            .as_mut()
            .expect("invariant: acquired by run_batch");
        held.expect.push_back(expect);
    }

    /// The client's statement by name, or an error queued in its place.
    fn lookup(&mut self, name: &[u8], wire: &mut BytesMut) -> Option<Arc<Statement>> {
        if let Some(stmt) = self.statements.get(name) {
            return Some(stmt.clone());
        }
        let msg = format!(
            "prepared statement \"{}\" does not exist",
            String::from_utf8_lossy(name)
        );
        self.synthetic_error(wire, "26000", &msg);
        None
    }

    /// An error the proxy raises inside a batch: like Postgres, it skips the rest up to Sync.
    fn synthetic_error(&mut self, _wire: &mut BytesMut, code: &str, msg: &str) {
        let mut err = BytesMut::new();
        super::error(&mut err, code, msg);
        self.push(Expect::Synthetic(err.freeze()));
        self.skip_until_sync = true;
    }

    fn ensure_prepared(&mut self, stmt: &Statement, wire: &mut BytesMut) {
        let held = self
            .server
            .as_mut()
            .expect("invariant: acquired by run_batch");
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

    fn ensure_unnamed(&mut self, wire: &mut BytesMut) {
        let held = self
            .server
            .as_mut()
            .expect("invariant: acquired by run_batch");
        if held.unnamed_ready {
            return;
        }
        if let Some(parse) = &self.unnamed {
            wire.extend_from_slice(parse);
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

    fn on_server(&mut self, frame: Frame) -> Result<(), End> {
        let held = self
            .server
            .as_mut()
            .expect("invariant: only polled while held");
        pop_synthetic(held, &mut self.out);
        let t = frame.tag();
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
                        held.conn.broken = true;
                        self.release();
                        Ok(())
                    }
                    _ => {
                        Err(self
                            .desync(&format!("message {:?} with no request pending", t as char)))
                    }
                };
            }
        };
        match t {
            tag::ERROR_RESPONSE => return self.on_server_error(frame, forward),
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
            tag::READY_FOR_QUERY => {
                let Ok(status) = decode::ready_for_query(frame.body()) else {
                    return Err(self.desync("malformed ReadyForQuery"));
                };
                held.conn.status = status;
                held.copy_in = false;
            }
            _ => {}
        }
        if ends == Ends::Mismatch {
            return Err(self.desync(&format!("message {:?}", t as char)));
        }
        // Replies to injected requests are dropped, but a notification is for the client
        // whatever request it arrived during.
        if forward || t == tag::NOTIFICATION {
            self.out.extend_from_slice(frame.bytes());
        }
        if ends == Ends::Yes {
            let held = self.server.as_mut().expect("invariant: held");
            let Some(Expect::Reply { kind, .. }) = held.expect.pop_front() else {
                unreachable!("head checked above");
            };
            self.completed(kind, t);
        }
        Ok(())
    }

    /// Bookkeeping when a request's reply is complete.
    fn completed(&mut self, kind: Kind, t: u8) {
        let held = self.server.as_mut().expect("invariant: held");
        match kind {
            Kind::Execute { changes } if t == tag::COMMAND_COMPLETE => {
                self.tx_changes.extend(changes)
            }
            Kind::Query { changes } => {
                if !held.query_failed {
                    self.tx_changes.extend(changes);
                }
                held.query_failed = false;
                self.ready();
            }
            Kind::Sync => self.ready(),
            _ => {}
        }
        // `ready` may have returned the connection to the pool.
        if let Some(held) = self.server.as_mut() {
            pop_synthetic(held, &mut self.out);
        }
    }

    /// After a ReadyForQuery: settle settings and maybe return the connection to the pool.
    fn ready(&mut self) {
        let held = self.server.as_mut().expect("invariant: held");
        let status = held.conn.status;
        self.status = status;
        if status == TxStatus::Idle {
            if held.last_tag != "ROLLBACK" {
                let changes = std::mem::take(&mut self.tx_changes);
                self.settings.apply(&changes);
            }
            self.tx_changes.clear();
            held.conn.settings = self.settings.fingerprint();
        }
        if status == TxStatus::Idle
            && held.expect.is_empty()
            && !held.copy_in
            && self.batch.is_empty()
            && self.mode == PoolMode::Transaction
        {
            self.release();
        }
    }

    /// An ErrorResponse: in a simple Query it is part of the reply; in the extended protocol the
    /// server now skips to the next Sync, so every request before it gets no reply.
    fn on_server_error(&mut self, frame: Frame, forward: bool) -> Result<(), End> {
        let held = self.server.as_mut().expect("invariant: held");
        held.copy_in = false;
        if matches!(
            held.expect.front(),
            Some(Expect::Reply {
                kind: Kind::Query { .. },
                ..
            })
        ) {
            held.query_failed = true;
            if forward {
                self.out.extend_from_slice(frame.bytes());
            } else {
                let fields = decode::error_fields(frame.body()).unwrap_or_default();
                warn!(code = %fields.code, message = %fields.message, "replaying session settings failed");
            }
            return Ok(());
        }
        // An injected Parse that fails still answers for the client's request that needed it.
        self.out.extend_from_slice(frame.bytes());
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
        Ok(())
    }

    /// Returns the held server connection to the pool.
    fn release(&mut self) {
        if let Some(held) = self.server.take() {
            self.shared.cancels.set_target(self.pid, None);
            drop(held);
        }
    }

    /// At the end of a session: a connection still mid-request cannot be reused; a session-mode
    /// connection is reset so the next client starts clean.
    async fn release_on_exit(&mut self) {
        let Some(mut held) = self.server.take() else {
            return;
        };
        self.shared.cancels.set_target(self.pid, None);
        let idle = held.expect.is_empty() && !held.copy_in && held.conn.status == TxStatus::Idle;
        if !idle {
            held.conn.broken = true;
            return;
        }
        if self.mode == PoolMode::Session && reset_session(&mut held.conn).await.is_err() {
            held.conn.broken = true;
        }
    }
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

enum Event {
    Client(Result<Frame, protocol::Error>),
    Server(Result<Frame, protocol::Error>),
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
        (Kind::Describe, PARAMETER_DESCRIPTION) => Ends::No,
        (Kind::Describe, ROW_DESCRIPTION | NO_DATA) => Ends::Yes,
        (Kind::Execute { .. }, COMMAND_COMPLETE | EMPTY_QUERY | PORTAL_SUSPENDED) => Ends::Yes,
        (
            Kind::Execute { .. },
            DATA_ROW | COPY_IN_RESPONSE | COPY_OUT_RESPONSE | COPY_BOTH_RESPONSE | b'd' | b'c',
        ) => Ends::No,
        (Kind::Sync | Kind::Query { .. }, READY_FOR_QUERY) => Ends::Yes,
        // A simple Query (or FunctionCall) reply holds anything up to its ReadyForQuery.
        (Kind::Query { .. }, _) => Ends::No,
        _ => Ends::Mismatch,
    }
}

/// Sends every synthetic reply at the head of the queue.
fn pop_synthetic(held: &mut Held, out: &mut BytesMut) {
    while let Some(Expect::Synthetic(_)) = held.expect.front() {
        if let Some(Expect::Synthetic(bytes)) = held.expect.pop_front() {
            out.extend_from_slice(&bytes);
        }
    }
}
