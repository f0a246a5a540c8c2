//! The accept loop and the state every client task shares: pools, users, the cancel-key
//! registry, the prepared-statement registry, the two-phase decision log and id generators.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use rand::RngExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::backend::health::Health;
use crate::backend::{self, CancelKey, Pool};
use crate::config::{AuthMethod, Config};
use crate::frontend;
use crate::frontend::auth::ScramVerifier;
use crate::ids::IdGenerator;
use crate::protocol::{build, decode};
use crate::router::Router;
use crate::router::analyze::Analysis;
use crate::twopc::{self, DecisionLog};

/// Why a proxy could not start. One line each, naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("invalid shard map: {0}")]
    Map(String),
    #[error(transparent)]
    DecisionLog(#[from] twopc::Error),
}

/// The servers of one shard.
pub struct ShardPools {
    pub primary: Pool,
    pub replicas: Vec<Pool>,
}

/// How one proxy user authenticates.
pub struct UserSecret {
    pub scram: Option<ScramVerifier>,
    /// Needed for md5 and cleartext; absent when the config holds only a SCRAM verifier.
    pub plaintext: Option<String>,
}

/// Everything client tasks share, behind one `Arc`.
pub struct Shared {
    pub config: Arc<Config>,
    pub shards: Vec<ShardPools>,
    pub router: Router,
    pub health: Arc<Health>,
    pub users: HashMap<String, UserSecret>,
    pub cancels: CancelRegistry,
    pub statements: StatementRegistry,
    /// The two-phase decision log (`None` when `two_phase.enabled` is false): a multi-shard
    /// commit records its decision here before the first `COMMIT PREPARED`.
    pub decisions: Option<Arc<DecisionLog>>,
    /// This start's part of every gid (see [`twopc::gid`]), so gids never repeat across
    /// restarts.
    pub boot: u64,
    /// The last gid sequence number handed out by [`Shared::new_gid`].
    pub next_gid: AtomicU64,
    /// Global ids stamped with `config.node_id`.
    pub ids: IdGenerator,
    /// Gids between PREPARE and the end of phase two in some session: the resolver leaves
    /// them alone.
    pub in_flight: Arc<Mutex<HashSet<String>>>,
    /// What a server reports at login (ParameterStatus) for each set of startup settings seen
    /// (`Settings::status_key`): a client sending a set seen before costs no round trip.
    pub login_status: LoginStatusCache,
}

impl Shared {
    /// Builds pools (no connection is opened yet), the router, and SCRAM verifiers. The
    /// decision log is left `None`: [`start`] opens it and runs recovery first.
    ///
    /// # Errors
    /// A map the router cannot place keys with (validated configs never fail here).
    pub fn new(config: Arc<Config>) -> Result<Shared, String> {
        let creds = backend::Credentials {
            user: config.backend.user.clone(),
            password: config.backend.password.clone(),
            database: config.backend.database.clone(),
        };
        let shards = config
            .shards
            .iter()
            .map(|s| ShardPools {
                primary: Pool::new(&s.primary, creds.clone(), &config.pool),
                replicas: s
                    .replicas
                    .iter()
                    .map(|r| Pool::new(r, creds.clone(), &config.pool))
                    .collect(),
            })
            .collect();
        let users = config
            .users
            .iter()
            .map(|u| {
                let secret = match ScramVerifier::parse(&u.password) {
                    Some(v) => UserSecret {
                        scram: Some(v),
                        plaintext: None,
                    },
                    None => UserSecret {
                        scram: (config.auth_method == AuthMethod::ScramSha256)
                            .then(|| ScramVerifier::from_password(&u.password)),
                        plaintext: Some(u.password.clone()),
                    },
                };
                (u.name.clone(), secret)
            })
            .collect();
        Ok(Shared {
            router: Router::new(&config)?,
            health: Health::new(&config),
            shards,
            users,
            cancels: CancelRegistry::default(),
            statements: StatementRegistry::default(),
            decisions: None,
            boot: twopc::new_boot(),
            next_gid: AtomicU64::new(0),
            ids: IdGenerator::new(config.node_id),
            in_flight: Arc::new(Mutex::new(HashSet::new())),
            login_status: LoginStatusCache::default(),
            config,
        })
    }

    /// A gid for a new two-phase transaction, unique across proxies and restarts.
    pub fn new_gid(&self) -> String {
        let seq = self.next_gid.fetch_add(1, Ordering::Relaxed) + 1;
        twopc::gid(self.config.node_id, self.boot, seq)
    }
}

// === LoginStatusCache ===

/// How many distinct sets of startup settings keep their login ParameterStatus values; the
/// cache starts over when full.
const LOGIN_STATUS_CAPACITY: usize = 1_000;

/// The ParameterStatus values a server reports at login, by set of startup settings.
#[derive(Default)]
pub struct LoginStatusCache {
    by_key: Mutex<HashMap<String, Arc<LoginStatus>>>,
}

/// What a server reports at login for one set of startup settings: learnt once, by the first
/// login that asks, while the others with the same set wait for it rather than each taking a
/// pooled connection (a crowd of new clients would queue behind the pool's work). Left
/// unset if the server refused the settings or could not be asked: the next login asks.
pub type LoginStatus = tokio::sync::OnceCell<Arc<[(String, String)]>>;

impl LoginStatusCache {
    pub fn entry(&self, key: &str) -> Arc<LoginStatus> {
        let mut by_key = self.by_key.lock();
        if let Some(status) = by_key.get(key) {
            return status.clone();
        }
        if by_key.len() >= LOGIN_STATUS_CAPACITY {
            by_key.clear();
        }
        by_key.entry(key.to_string()).or_default().clone()
    }
}

// === CancelRegistry ===

/// Maps the BackendKeyData Tessera gave each client to the server connections it is using now.
#[derive(Default)]
pub struct CancelRegistry {
    clients: Mutex<HashMap<i32, (i32, CancelTargets)>>,
}

/// The server connections one client holds now, shared between its session (which updates it
/// at every checkout and release, without the registry's lock) and the registry (which reads it
/// when a CancelRequest names the client).
#[derive(Clone, Default)]
pub struct CancelTargets(Arc<Mutex<Vec<CancelKey>>>);

impl CancelTargets {
    /// Points the client's key at the server connections it holds now (a statement on several
    /// shards runs on several): a cancel goes to each, and never to a connection it gave back.
    pub fn set(&self, targets: impl IntoIterator<Item = CancelKey>) {
        let mut list = self.0.lock();
        list.clear();
        list.extend(targets);
    }
}

/// One client's registration; dropping it unregisters the client.
pub struct CancelEntry {
    shared: Arc<Shared>,
    pub pid: i32,
    pub secret: i32,
    pub targets: CancelTargets,
}

impl Drop for CancelEntry {
    fn drop(&mut self) {
        self.shared.cancels.unregister(self.pid);
    }
}

impl CancelRegistry {
    /// Registers a new client under a fresh (pid, secret); it stays registered until the
    /// returned entry is dropped, however its connection ends.
    pub fn register(shared: &Arc<Shared>) -> CancelEntry {
        let mut rng = rand::rng();
        let mut clients = shared.cancels.clients.lock();
        loop {
            let pid = rng.random_range(1..i32::MAX);
            if let std::collections::hash_map::Entry::Vacant(e) = clients.entry(pid) {
                let secret = rng.random::<i32>();
                let targets = CancelTargets::default();
                e.insert((secret, targets.clone()));
                return CancelEntry {
                    shared: shared.clone(),
                    pid,
                    secret,
                    targets,
                };
            }
        }
    }

    fn unregister(&self, pid: i32) {
        self.clients.lock().remove(&pid);
    }

    /// The server keys to cancel, if `(pid, secret)` is a live client holding connections.
    pub fn lookup(&self, pid: i32, secret: i32) -> Vec<CancelKey> {
        let clients = self.clients.lock();
        match clients.get(&pid) {
            Some((s, targets)) if *s == secret => targets.0.lock().clone(),
            _ => Vec::new(),
        }
    }
}

/// Forwards a CancelRequest to every server connection the client is using (one per shard
/// its statement runs on), each in turn, each bounded by the connect timeout.
pub async fn forward_cancel(shared: &Shared, pid: i32, secret: i32) {
    let keys = shared.cancels.lookup(pid, secret);
    if keys.is_empty() {
        debug!(pid, "cancel request for no running query");
        return;
    }
    for key in keys {
        cancel_one(shared, key).await;
    }
}

async fn cancel_one(shared: &Shared, key: CancelKey) {
    let mut msg = BytesMut::new();
    build::cancel_request(&mut msg, key.pid, key.secret);
    let timeout = shared.config.pool.connect_timeout();
    let sent = tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(&*key.addr).await?;
        stream.write_all(&msg).await?;
        stream.shutdown().await
    })
    .await;
    match sent {
        Ok(Ok(())) => debug!(server = %key.addr, "cancel forwarded"),
        Ok(Err(e)) => warn!(server = %key.addr, cause = %e, "cannot forward cancel"),
        Err(_) => warn!(server = %key.addr, "timed out forwarding cancel"),
    }
}

// === StatementRegistry ===

/// A named prepared statement under its proxy-owned name, shared by every client that prepares
/// the same SQL with the same parameter types.
#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The server-side name, `__tessera_<id>`.
    pub server_name: Bytes,
    /// A ready-to-send Parse message under the server-side name.
    pub parse: Bytes,
    /// What running it does to session settings.
    pub effects: frontend::settings::Effects,
    /// Where it runs (keys stay symbolic as `$n`).
    pub analysis: Arc<Analysis>,
    /// Parameter type OIDs: from the Parse, completed by the server's ParameterDescription.
    pub param_types: Mutex<Vec<u32>>,
}

impl Statement {
    /// Records the parameter types a server described (clients often leave them unspecified,
    /// then send binary values of the types the server inferred).
    pub fn learn_param_types(&self, described: &[u32]) {
        let mut types = self.param_types.lock();
        if types.len() < described.len() || types.contains(&0) {
            *types = described.to_vec();
        }
    }
}

/// A parameter type to declare in a Parse sent to any shard: a built-in type's OID (below
/// FirstNormalObjectId, the same on every server), else 0 (the server infers it, as it did
/// for the client): a user-defined type (an enum, a domain) has its own OID on each server,
/// and one learned from a shard's Describe names nothing, or another type, on the others.
pub fn portable_type(oid: u32) -> u32 {
    const FIRST_NORMAL_OBJECT_ID: u32 = 16384;
    if oid < FIRST_NORMAL_OBJECT_ID { oid } else { 0 }
}

/// The parameter type OIDs of a Parse message body section (`i16` count, then OIDs).
pub fn parse_param_types(section: &[u8]) -> Vec<u32> {
    section
        .get(2..)
        .unwrap_or_default()
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Interns statements by (SQL, parameter types) so equal statements share one server name.
#[derive(Default)]
pub struct StatementRegistry {
    by_text: Mutex<HashMap<Bytes, Arc<Statement>>>,
    next_id: AtomicU64,
}

impl StatementRegistry {
    /// The shared statement for a client's Parse.
    pub fn intern(&self, parse: &decode::Parse<'_>, router: &Router) -> Arc<Statement> {
        let mut key = Vec::with_capacity(parse.query.len() + 1 + parse.param_types.len());
        key.extend_from_slice(parse.query);
        key.push(0);
        key.extend_from_slice(parse.param_types);
        let key = Bytes::from(key);
        let mut map = self.by_text.lock();
        if let Some(stmt) = map.get(&key) {
            return stmt.clone();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let server_name = Bytes::from(format!("__tessera_{id}"));
        let mut msg = BytesMut::with_capacity(key.len() + server_name.len() + 8);
        build::message(&mut msg, b'P', |b| {
            build::cstr(b, &server_name);
            b.extend_from_slice(&key);
        });
        let sql = String::from_utf8_lossy(parse.query);
        let effects = frontend::settings::effects(&sql);
        let stmt = Arc::new(Statement {
            id,
            server_name,
            parse: msg.freeze(),
            effects,
            analysis: router.analyze(&sql),
            param_types: Mutex::new(parse_param_types(parse.param_types)),
        });
        map.insert(key, stmt.clone());
        stmt
    }

    /// Forgets the statement for `stmt`'s text (its plan went stale on a server): the next
    /// Parse of the text makes a new statement, prepared afresh under a new name. That is so
    /// even when the registry already moved on to a newer statement for the text: prepared
    /// before the same schema change, it may be stale too. Connections keep the old ones,
    /// which clients still bound to them go on using, as they would on Postgres.
    pub fn retire(&self, stmt: &Statement) {
        // The Parse message is `P`, length, server name, NUL, then the key.
        let key = &stmt.parse[5 + stmt.server_name.len() + 1..];
        self.by_text.lock().remove(key);
    }

    /// As [`StatementRegistry::retire`], for a statement known by its id only (one the proxy
    /// rewrote for the shards): found by a scan, on this rare path.
    pub fn retire_id(&self, id: u64) {
        self.by_text.lock().retain(|_, s| s.id != id);
    }

    pub fn len(&self) -> usize {
        self.by_text.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// === accept loop ===

/// A running proxy: its address and the handle that stops it.
pub struct Handle {
    pub addr: std::net::SocketAddr,
    pub shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

impl Handle {
    /// Stops accepting and waits for client tasks to finish (bounded by the caller).
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// A token that stops the accept loop when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Binds `config.listen` (port 0 picks a free port) and serves in the background.
///
/// With `two_phase.enabled`, first opens and locks the decision log and finishes the in-doubt
/// transactions a previous run left prepared ([`twopc::recover`]), so no client waits on
/// their locks once served. A shard that cannot be recovered is logged and skipped: its
/// transactions are finished on the next start.
///
/// # Errors
/// The address cannot be bound, or the decision log cannot be opened (locked by another
/// proxy, unwritable, corrupt) or compacted.
pub async fn start(config: Arc<Config>) -> Result<Handle, Error> {
    let bind_error = |source| Error::Bind {
        addr: config.listen.clone(),
        source,
    };
    let listener = TcpListener::bind(&config.listen)
        .await
        .map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    let mut shared = Shared::new(config.clone()).map_err(Error::Map)?;
    if config.two_phase.enabled {
        let log = DecisionLog::open(&config.two_phase.log)?;
        let recovery = twopc::recover(&config, &log).await?;
        for shard in &recovery.shards {
            if shard.committed + shard.rolled_back > 0 {
                info!(
                    shard = %shard.shard,
                    committed = shard.committed,
                    rolled_back = shard.rolled_back,
                    "finished in-doubt transactions"
                );
            }
        }
        for failure in &recovery.failed {
            warn!(cause = %failure, "cannot finish in-doubt transactions now; will retry at next start");
        }
        info!(
            log = %config.two_phase.log.display(),
            node_id = config.node_id,
            committed = recovery.committed(),
            rolled_back = recovery.rolled_back(),
            decisions_kept = recovery.decisions_kept,
            "two-phase recovery done"
        );
        shared.decisions = Some(Arc::new(log));
    }
    let shared = Arc::new(shared);
    let shutdown = CancellationToken::new();
    shared.health.spawn(config.clone(), shutdown.clone());
    let tasks = TaskTracker::new();
    if shared.decisions.is_some() {
        tasks.spawn(resolve_loop(shared.clone(), shutdown.clone()));
    }
    tasks.spawn(accept_loop(
        listener,
        shared.clone(),
        shutdown.clone(),
        tasks.clone(),
    ));
    info!(%addr, "listening");
    Ok(Handle {
        addr,
        shared,
        shutdown,
        tasks,
    })
}

/// Finishes, while the proxy runs, in-doubt transactions its sessions could not finish (a shard
/// connection lost between PREPARE and COMMIT PREPARED), so their locks do not wait for a
/// restart.
async fn resolve_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    let Some(log) = shared.decisions.clone() else {
        return;
    };
    let every = Duration::from_millis(shared.config.two_phase.resolve_interval_ms.max(100));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let leave = twopc::Leave {
            in_flight: Some(shared.in_flight.clone()),
            log: Some(log.clone()),
            younger_than: Some(every),
        };
        match twopc::resolve(&shared.config, &log, &leave).await {
            Ok(done) => {
                if done.committed() + done.rolled_back() > 0 {
                    info!(
                        committed = done.committed(),
                        rolled_back = done.rolled_back(),
                        "finished in-doubt transactions"
                    );
                }
                for failure in &done.failed {
                    debug!(cause = %failure, "in-doubt check could not reach a shard");
                }
                // A rewrite and two fsyncs: off the async worker.
                let log = log.clone();
                let keep = done.still_in_doubt;
                match tokio::task::spawn_blocking(move || log.compact(&keep)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(cause = %e, "cannot compact the decision log"),
                    Err(e) => warn!(cause = %e, "cannot compact the decision log"),
                }
            }
            Err(e) => warn!(cause = %e, "in-doubt check failed"),
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(shared.config.limits.max_clients));
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: one bad accept must not end the loop.
                warn!(cause = %e, "failed to accept");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        next_id += 1;
        let span = tracing::info_span!("client", peer = %peer, id = next_id);
        let shared = shared.clone();
        let permit = limit.clone().try_acquire_owned().ok();
        let shutdown = shutdown.clone();
        tasks.spawn(
            async move {
                let _ = stream.set_nodelay(true);
                match permit {
                    Some(_permit) => frontend::serve_client(stream, shared, shutdown).await,
                    None => {
                        frontend::refuse(stream, "53300", "sorry, too many clients already").await
                    }
                }
            }
            .instrument(span),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Shared> {
        // Building the shared state opens no connection, so the shipped map's servers need not
        // exist.
        let config = Config::from_yaml(
            include_str!("../shard-map.yaml"),
            std::path::Path::new("shard-map.yaml"),
        )
        .expect("the shipped map");
        Arc::new(Shared::new(Arc::new(config)).expect("shared"))
    }

    #[tokio::test]
    async fn cancel_targets_follow_the_session_and_leave_with_it() {
        let shared = shared();
        let entry = CancelRegistry::register(&shared);
        let (pid, secret) = (entry.pid, entry.secret);
        assert!(
            shared.cancels.lookup(pid, secret).is_empty(),
            "nothing held yet"
        );
        let key = CancelKey {
            addr: Arc::from("127.0.0.1:5432"),
            pid: 42,
            secret: 7,
        };
        entry.targets.set([key.clone()]);
        assert_eq!(shared.cancels.lookup(pid, secret), vec![key]);
        assert!(
            shared
                .cancels
                .lookup(pid, secret.wrapping_add(1))
                .is_empty(),
            "a wrong secret cancels nothing"
        );
        entry.targets.set([]);
        assert!(shared.cancels.lookup(pid, secret).is_empty(), "given back");
        // However the session ends (even a handshake cut short after BackendKeyData was
        // built), dropping its entry leaves the registry as it was.
        drop(entry);
        assert!(shared.cancels.clients.lock().is_empty());
    }
}
