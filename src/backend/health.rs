//! Server health and replica lag (probed over tokio-postgres, never the data path), and the
//! choice of which replica serves a read.
//!
//! Every server gets one probe task that keeps a control connection open and, every
//! `routing.health_check_interval_ms`, publishes what it saw into that server's [`ServerState`]
//! atomics. The router reads those atomics on every read ([`ShardHealth::pick_replica`]); the
//! data path counts running statements with [`ServerState::enter`]. Nothing here blocks a client.
//!
//! Lag is measured against the primary, not in absolute time: a replica that has replayed
//! everything the primary had written at its last probe has lag 0, however old its last replayed
//! transaction is, so an idle primary never makes its replicas look stale.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio_postgres::{Client, NoTls, Statement};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, trace};

use crate::config::{self, Config, LoadBalance};

/// Samples of the primary's LSN kept at most, whatever the window says (bounds memory when the
/// check interval is tiny).
const MAX_LSN_SAMPLES: usize = 4096;

/// Whether a server takes writes or streams from a primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Replica,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        })
    }
}

/// What the proxy currently believes about one server.
///
/// The probe task is the only writer of `healthy`, `current_lsn`, `replay_lsn` and `lag_ms`
/// (tests may hand-set them); `in_flight` belongs to the data path through [`ServerState::enter`].
/// Values are independent snapshots, so `Relaxed` ordering is enough: no other memory is
/// published through them.
#[derive(Debug)]
pub struct ServerState {
    /// `host:port` as written in the config, for logs.
    pub addr: String,
    pub role: Role,
    /// The last probe succeeded (and, for a replica, it is in recovery and not too far behind).
    pub healthy: AtomicBool,
    /// Primary only: `pg_current_wal_lsn()` (the write position: what replicas can have
    /// received) at the last successful probe (0 = not known yet). Not a commit LSN: it may
    /// trail a commit that returned under `synchronous_commit = off`.
    pub current_lsn: AtomicU64,
    /// Replica only: `pg_last_wal_replay_lsn()` at the last successful probe (0 = not known yet).
    /// It only trails the real value, so `replay_lsn >= commit_lsn` proves a commit is visible.
    pub replay_lsn: AtomicU64,
    /// Replica only: estimated replay delay behind the primary, in milliseconds.
    pub lag_ms: AtomicU64,
    /// Statements running on this server through the proxy; see [`ServerState::enter`].
    pub in_flight: AtomicUsize,
    /// Primary only: recent `(probe time, current_lsn)` samples, oldest first. Replica probes use
    /// them to bound lag by when the primary was last at or below the replica's position.
    lsn_history: Mutex<VecDeque<(Instant, u64)>>,
    /// The database's collation orders text bytewise ("C"/"POSIX"): 0 = not known yet,
    /// 1 = yes, 2 = no. Cross-shard merges compare text only when every primary says yes.
    pub bytewise_text: AtomicU8,
}

impl ServerState {
    /// A state with nothing probed yet: primaries start healthy (so the proxy serves writes
    /// before the first probe ends), replicas unhealthy (reads use the primary until a probe has
    /// shown the replica is streaming and current).
    pub fn new(addr: impl Into<String>, role: Role) -> ServerState {
        ServerState {
            addr: addr.into(),
            role,
            healthy: AtomicBool::new(role == Role::Primary),
            current_lsn: AtomicU64::new(0),
            replay_lsn: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            lsn_history: Mutex::new(VecDeque::new()),
            bytewise_text: AtomicU8::new(0),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn current_lsn(&self) -> u64 {
        self.current_lsn.load(Ordering::Relaxed)
    }

    pub fn replay_lsn(&self) -> u64 {
        self.replay_lsn.load(Ordering::Relaxed)
    }

    pub fn lag_ms(&self) -> u64 {
        self.lag_ms.load(Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts one statement as running on this server until the returned guard is dropped
    /// (used by [`LoadBalance::LeastBusy`]).
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            state: Arc::clone(self),
        }
    }

    /// Records a primary LSN sample and forgets samples older than `keep`.
    fn record_lsn(&self, at: Instant, lsn: u64, keep: Duration) {
        self.current_lsn.store(lsn, Ordering::Relaxed);
        let mut history = self.lsn_history.lock();
        history.push_back((at, lsn));
        while history.len() > MAX_LSN_SAMPLES
            || history
                .front()
                .is_some_and(|&(t, _)| at.saturating_duration_since(t) > keep)
        {
            history.pop_front();
        }
    }
}

/// One statement running on a server; dropping it ends the count.
#[derive(Debug)]
#[must_use = "the statement counts as running only while the guard lives"]
pub struct InFlight {
    state: Arc<ServerState>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The states of one shard's servers, in config order.
#[derive(Debug)]
pub struct ShardHealth {
    pub primary: Arc<ServerState>,
    pub replicas: Vec<Arc<ServerState>>,
    /// Rotates round-robin picks and least-busy tie breaks.
    rr: AtomicUsize,
}

impl ShardHealth {
    /// Groups existing states (tests build hand-set shards with this).
    pub fn new(primary: Arc<ServerState>, replicas: Vec<Arc<ServerState>>) -> ShardHealth {
        ShardHealth {
            primary,
            replicas,
            rr: AtomicUsize::new(0),
        }
    }

    /// The index of the replica that should serve a read, or `None` to use the primary.
    ///
    /// Only healthy replicas qualify, and with `min_lsn` (read-your-writes: the LSN of the
    /// session's last commit on this shard) only those whose probed `replay_lsn` has reached it.
    /// `RoundRobin` rotates over the qualifying replicas; `LeastBusy` takes the one with the
    /// fewest statements in flight, rotating among ties.
    pub fn pick_replica(&self, policy: LoadBalance, min_lsn: Option<u64>) -> Option<usize> {
        let eligible =
            |s: &ServerState| s.is_healthy() && min_lsn.is_none_or(|lsn| s.replay_lsn() >= lsn);
        match policy {
            LoadBalance::RoundRobin => {
                // Rotate over the qualifying replicas, not over all of them: skipping to the
                // next healthy one would hand a dead replica's share to its neighbour.
                let count = self.replicas.iter().filter(|s| eligible(s)).count();
                if count == 0 {
                    return None;
                }
                let k = self.rr.fetch_add(1, Ordering::Relaxed) % count;
                // States may change between the two passes; then any qualifying one will do.
                let mut chosen = None;
                let qualifying = self
                    .replicas
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| eligible(s))
                    .map(|(i, _)| i);
                for (seen, i) in qualifying.enumerate() {
                    chosen = Some(i);
                    if seen == k {
                        break;
                    }
                }
                chosen
            }
            LoadBalance::LeastBusy => {
                // One pass from a rotating start: `in_flight` changes constantly, so a second
                // pass could find no replica at the minimum seen by the first.
                let n = self.replicas.len();
                if n == 0 {
                    return None;
                }
                let start = self.rr.fetch_add(1, Ordering::Relaxed) % n;
                let mut best: Option<(usize, usize)> = None;
                for offset in 0..n {
                    let i = (start + offset) % n;
                    let s = &self.replicas[i];
                    if !eligible(s) {
                        continue;
                    }
                    let busy = s.in_flight();
                    if best.is_none_or(|(_, b)| busy < b) {
                        best = Some((i, busy));
                    }
                }
                best.map(|(i, _)| i)
            }
        }
    }
}

/// The health of every server of every shard, shared by the router and the probe tasks.
#[derive(Debug)]
pub struct Health {
    shards: Vec<ShardHealth>,
}

impl Health {
    /// States for every server in `config` (primaries healthy, replicas not until probed).
    /// Nothing is probed until [`Health::spawn`].
    pub fn new(config: &Config) -> Arc<Health> {
        let shards = config
            .shards
            .iter()
            .map(|s| {
                ShardHealth::new(
                    Arc::new(ServerState::new(&s.primary, Role::Primary)),
                    s.replicas
                        .iter()
                        .map(|r| Arc::new(ServerState::new(r, Role::Replica)))
                        .collect(),
                )
            })
            .collect();
        Arc::new(Health { shards })
    }

    /// Groups hand-built shards (for tests of code that consults health).
    pub fn from_shards(shards: Vec<ShardHealth>) -> Arc<Health> {
        Arc::new(Health { shards })
    }

    /// Shard `i`, in config order.
    ///
    /// # Panics
    /// If `i` is not a shard index of the config this was built from.
    /// Every shard's database sorts text bytewise, so the merge may compare text itself.
    /// Unknown (not probed yet) counts as no: a merge must not guess an order.
    pub fn text_bytewise(&self) -> bool {
        self.shards
            .iter()
            .all(|s| s.primary.bytewise_text.load(Ordering::Relaxed) == 1)
    }

    pub fn shard(&self, i: usize) -> &ShardHealth {
        &self.shards[i]
    }

    pub fn shards(&self) -> &[ShardHealth] {
        &self.shards
    }

    /// Whether shard `i`'s primary answered its last probe (`false` for an unknown shard).
    pub fn primary_healthy(&self, i: usize) -> bool {
        self.shards.get(i).is_some_and(|s| s.primary.is_healthy())
    }

    /// Starts one probe task per server; each probes at once, then every
    /// `routing.health_check_interval_ms`, until `shutdown` is cancelled. Server addresses come
    /// from the config given to [`Health::new`]; `config` supplies credentials and timings.
    ///
    /// Call it once (a second call would double the probes), within a tokio runtime. The
    /// returned tracker is already closed: after cancelling, `tracker.wait()` ends when every
    /// probe task has.
    pub fn spawn(
        self: &Arc<Self>,
        config: Arc<Config>,
        shutdown: CancellationToken,
    ) -> TaskTracker {
        let tracker = TaskTracker::new();
        let settings = Arc::new(ProbeSettings::new(&config));
        for shard in &self.shards {
            let servers = std::iter::once((Arc::clone(&shard.primary), None)).chain(
                shard
                    .replicas
                    .iter()
                    .map(|r| (Arc::clone(r), Some(Arc::clone(&shard.primary)))),
            );
            for (state, primary) in servers {
                let prober = Prober {
                    state,
                    primary,
                    settings: Arc::clone(&settings),
                    conn: None,
                    reported: None,
                };
                tracker.spawn(prober.run(shutdown.clone()));
            }
        }
        tracker.close();
        tracker
    }
}

// === probing ===

/// What every probe task needs from the config.
struct ProbeSettings {
    user: String,
    password: String,
    database: String,
    interval: Duration,
    connect_timeout: Duration,
    /// Bound on one probe query: a server that accepts connections but never answers (stopped
    /// process, stuck I/O) is declared unhealthy instead of freezing its probe task.
    probe_timeout: Duration,
    max_lag_ms: u64,
    /// How long the primary's LSN samples are kept: long enough to bound any lag up to the
    /// limit, plus slack for a few late probes.
    history_window: Duration,
}

impl ProbeSettings {
    fn new(config: &Config) -> ProbeSettings {
        let interval = Duration::from_millis(config.routing.health_check_interval_ms.max(1));
        let connect_timeout = config.pool.connect_timeout();
        ProbeSettings {
            user: config.backend.user.clone(),
            password: config.backend.password.clone(),
            database: config.backend.database.clone(),
            interval,
            connect_timeout,
            probe_timeout: connect_timeout.max(interval),
            max_lag_ms: config.routing.max_replica_lag_ms,
            history_window: Duration::from_millis(config.routing.max_replica_lag_ms) + interval * 4,
        }
    }
}

/// The probe statements, converting `pg_lsn` to bytes since `0/0` (numeric -> bigint). On a
/// server in recovery the primary probe fails ("recovery is in progress"): a demoted primary is
/// unhealthy.
///
/// The write position, not the insert position: right after a segment switch (or any record
/// ending on a page boundary) the insert position points past the next page header, where no
/// replica's replay position ever lands, so an idle primary would seem forever ahead.
const PRIMARY_PROBE: &str = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint";
/// `pg_is_wal_replay_paused()` raises an error outside recovery, hence the CASE. The commit age
/// is NULL until a transaction has been replayed since the replica started (and it is clamped
/// in Rust, since `greatest(0, NULL)` would turn "unknown" into 0).
const REPLICA_PROBE: &str = "SELECT pg_is_in_recovery(), \
     (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint, \
     (pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::bigint, \
     (extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint, \
     CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END";

/// An open control connection and its prepared probe.
struct ProbeConn {
    client: Client,
    statement: Statement,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProbeConn {
    fn drop(&mut self) {
        // The connection task would end once the client is gone; aborting makes sure a
        // half-dead socket does not linger.
        self.task.abort();
    }
}

/// One server's probe loop.
struct Prober {
    state: Arc<ServerState>,
    /// For a replica: its primary, whose LSN samples it is measured against.
    primary: Option<Arc<ServerState>>,
    settings: Arc<ProbeSettings>,
    conn: Option<ProbeConn>,
    /// The health last published by this task (`None` before the first probe), so only
    /// changes are logged at info.
    reported: Option<bool>,
}

/// The outcome of one probe: healthy or not, and why.
struct Verdict {
    healthy: bool,
    reason: String,
}

impl Prober {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.settings.interval);
        // A slow probe must not be followed by a burst of catch-up probes.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if shutdown.run_until_cancelled(ticker.tick()).await.is_none() {
                break;
            }
            let Some(verdict) = shutdown.run_until_cancelled(self.probe()).await else {
                break;
            };
            self.apply(verdict);
        }
        debug!(server = %self.state.addr, role = %self.state.role, "health probe stopped");
    }

    /// Publishes a verdict, logging the first one and every change of health.
    fn apply(&mut self, verdict: Verdict) {
        self.state.healthy.store(verdict.healthy, Ordering::Relaxed);
        let (server, role, reason) = (&self.state.addr, self.state.role, &verdict.reason);
        if self.reported == Some(verdict.healthy) {
            let healthy = verdict.healthy;
            trace!(server = %server, role = %role, healthy, reason = %reason, "probe");
        } else if verdict.healthy {
            info!(server = %server, role = %role, reason = %reason, "server is healthy");
        } else {
            info!(server = %server, role = %role, reason = %reason, "server is unhealthy");
        }
        self.reported = Some(verdict.healthy);
    }

    /// Runs one probe, reconnecting first if needed. A failure drops the connection, so the
    /// next probe starts from a fresh one.
    async fn probe(&mut self) -> Verdict {
        match self.try_probe().await {
            Ok(verdict) => verdict,
            Err(reason) => {
                self.conn = None;
                Verdict {
                    healthy: false,
                    reason,
                }
            }
        }
    }

    async fn try_probe(&mut self) -> Result<Verdict, String> {
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        let Some(conn) = &self.conn else {
            return Err("no connection".into());
        };
        let sent = Instant::now();
        let row = tokio::time::timeout(
            self.settings.probe_timeout,
            conn.client.query_one(&conn.statement, &[]),
        )
        .await
        .map_err(|_| {
            format!(
                "probe got no answer within {} ms",
                self.settings.probe_timeout.as_millis()
            )
        })?
        .map_err(|e| format!("probe failed: {}", describe(&e)))?;
        let lsn_of = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
        match &self.primary {
            None => {
                let lsn = lsn_of(row.try_get(0).map_err(|e| e.to_string())?).unwrap_or(0);
                self.state
                    .record_lsn(sent, lsn, self.settings.history_window);
                Ok(Verdict {
                    healthy: true,
                    reason: "answering".into(),
                })
            }
            Some(primary) => {
                let in_recovery: bool = row.try_get(0).map_err(|e| e.to_string())?;
                let replay = lsn_of(row.try_get(1).map_err(|e| e.to_string())?).unwrap_or(0);
                let receive = lsn_of(row.try_get(2).map_err(|e| e.to_string())?);
                // Negative when the replica's clock runs behind the primary's.
                let ts_lag = row
                    .try_get::<_, Option<i64>>(3)
                    .map_err(|e| e.to_string())?
                    .map(|ms| u64::try_from(ms).unwrap_or(0));
                let paused: bool = row.try_get(4).map_err(|e| e.to_string())?;
                if !in_recovery {
                    return Ok(Verdict {
                        healthy: false,
                        reason: "not in recovery (promoted?): it no longer follows the primary"
                            .into(),
                    });
                }
                // Behind means missing WAL the primary had at its last probe or that this
                // replica has already received: the latter covers a primary we cannot reach.
                let target = primary.current_lsn().max(receive.unwrap_or(0));
                let lag = {
                    let history = primary.lsn_history.lock();
                    estimate_lag_ms(Instant::now(), replay, target, ts_lag, history.iter())
                };
                self.state.replay_lsn.store(replay, Ordering::Relaxed);
                self.state.lag_ms.store(lag, Ordering::Relaxed);
                let paused = if paused { ", replay paused" } else { "" };
                let max = self.settings.max_lag_ms;
                Ok(if lag > max {
                    Verdict {
                        healthy: false,
                        reason: format!(
                            "lagging {lag} ms behind the primary (max {max} ms){paused}"
                        ),
                    }
                } else {
                    Verdict {
                        healthy: true,
                        reason: format!("streaming, lag {lag} ms{paused}"),
                    }
                })
            }
        }
    }

    /// Opens the control connection and prepares the probe, all within the connect timeout.
    async fn connect(&self) -> Result<ProbeConn, String> {
        let (host, port) = config::parse_host_port(&self.state.addr)?;
        let mut pg = tokio_postgres::Config::new();
        pg.host(host)
            .port(port)
            .user(&self.settings.user)
            .password(&self.settings.password)
            .dbname(&self.settings.database)
            .application_name("tessera-health")
            .connect_timeout(self.settings.connect_timeout);
        let sql = match self.primary {
            None => PRIMARY_PROBE,
            Some(_) => REPLICA_PROBE,
        };
        let timeout = self.settings.connect_timeout;
        tokio::time::timeout(timeout, async {
            let (client, connection) = pg
                .connect(NoTls)
                .await
                .map_err(|e| format!("cannot connect: {}", describe(&e)))?;
            let addr = self.state.addr.clone();
            let task = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    debug!(server = %addr, error = %describe(&e), "health connection closed");
                }
            });
            if self.primary.is_none() {
                // Learned once per connection: collations do not change under a database.
                // An ICU default (Postgres 15+: datlocprovider 'i') sorts by ICU whatever
                // datcollate says; older servers lack the column and use libc.
                let collate = match client
                    .query_one(
                        "SELECT datcollate::text, datlocprovider::text FROM pg_database WHERE datname = current_database()",
                        &[],
                    )
                    .await
                {
                    Ok(row) => row
                        .try_get::<_, String>(0)
                        .ok()
                        .map(|c| (c, row.try_get::<_, String>(1).unwrap_or_default())),
                    Err(_) => client
                        .query_one(
                            "SELECT datcollate::text FROM pg_database WHERE datname = current_database()",
                            &[],
                        )
                        .await
                        .ok()
                        .and_then(|row| row.try_get::<_, String>(0).ok())
                        .map(|c| (c, "c".to_string())),
                };
                let bytewise = match collate {
                    Some((c, provider))
                        if provider == "c"
                            && matches!(c.as_str(), "C" | "POSIX" | "C.UTF-8" | "C.utf8") =>
                    {
                        1
                    }
                    Some(_) => 2,
                    None => 0,
                };
                self.state.bytewise_text.store(bytewise, Ordering::Relaxed);
            }
            match client.prepare(sql).await {
                Ok(statement) => Ok(ProbeConn {
                    client,
                    statement,
                    task,
                }),
                Err(e) => {
                    task.abort();
                    Err(format!("cannot prepare the probe: {}", describe(&e)))
                }
            }
        })
        .await
        .map_err(|_| format!("cannot connect within {} ms", timeout.as_millis()))?
    }
}

/// A tokio-postgres error with its server message or I/O cause (its `Display` alone often says
/// only "db error" or "error connecting to server").
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(source) => format!("{e}: {source}"),
        None => e.to_string(),
    }
}

/// Estimates how far (ms) a replica at `replay` trails its primary.
///
/// Not behind `target` (the newest LSN known to exist) means lag 0. Otherwise the lag is bounded
/// above twice: by the age of the last replayed transaction (`ts_lag_ms`, which overstates the
/// lag after an idle period: the last commit may be hours old when a new write arrives), and by
/// the time since the primary was last sampled at or below `replay` (the replica had everything
/// the primary had then). The smaller bound is used, so the estimate never understates the lag
/// and overstates it by at most about one check interval. With neither bound (no transaction
/// replayed since the replica started, and the primary's samples at or below `replay` aged out),
/// the time since the oldest kept sample past `replay` is a lower bound: it stops growing at the
/// history window, which exceeds the lag limit, so the verdict is still right. With no samples
/// at all (primary never reached), 0.
fn estimate_lag_ms<'a>(
    now: Instant,
    replay: u64,
    target: u64,
    ts_lag_ms: Option<u64>,
    history: impl Iterator<Item = &'a (Instant, u64)>,
) -> u64 {
    if replay >= target {
        return 0;
    }
    let ms = |t: Instant| {
        u64::try_from(now.saturating_duration_since(t).as_millis()).unwrap_or(u64::MAX)
    };
    let mut last_at_or_below = None;
    let mut first_above = None;
    for &(at, lsn) in history {
        if lsn <= replay {
            last_at_or_below = Some(at);
        } else if first_above.is_none() {
            first_above = Some(at);
        }
    }
    let history_bound = last_at_or_below.map(ms);
    match (ts_lag_ms, history_bound) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => first_above.map_or(0, ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(replicas: &[(bool, u64, usize)]) -> ShardHealth {
        let primary = Arc::new(ServerState::new("p:1", Role::Primary));
        let replicas = replicas
            .iter()
            .enumerate()
            .map(|(i, &(healthy, lsn, busy))| {
                let s = ServerState::new(format!("r:{}", i + 2), Role::Replica);
                s.healthy.store(healthy, Ordering::Relaxed);
                s.replay_lsn.store(lsn, Ordering::Relaxed);
                s.in_flight.store(busy, Ordering::Relaxed);
                Arc::new(s)
            })
            .collect();
        ShardHealth::new(primary, replicas)
    }

    fn picks(s: &ShardHealth, policy: LoadBalance, min_lsn: Option<u64>, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| {
                s.pick_replica(policy, min_lsn)
                    .expect("a replica qualifies")
            })
            .collect()
    }

    #[test]
    fn initial_states() {
        let p = ServerState::new("p:1", Role::Primary);
        let r = ServerState::new("r:1", Role::Replica);
        assert!(p.is_healthy());
        assert!(!r.is_healthy(), "a replica is trusted only after a probe");
    }

    #[test]
    fn round_robin_rotates_over_healthy_replicas() {
        let s = shard(&[(true, 0, 0), (true, 0, 0), (true, 0, 0)]);
        assert_eq!(
            picks(&s, LoadBalance::RoundRobin, None, 6),
            [0, 1, 2, 0, 1, 2]
        );
    }

    #[test]
    fn round_robin_spreads_evenly_around_an_unhealthy_replica() {
        let s = shard(&[(true, 0, 0), (false, 0, 0), (true, 0, 0)]);
        let got = picks(&s, LoadBalance::RoundRobin, None, 100);
        assert!(!got.contains(&1));
        assert_eq!(got.iter().filter(|&&i| i == 0).count(), 50);
    }

    #[test]
    fn min_lsn_filters_replicas_that_have_not_replayed_it() {
        let s = shard(&[(true, 100, 0), (true, 250, 0), (true, 300, 0)]);
        let got = picks(&s, LoadBalance::RoundRobin, Some(250), 4);
        assert_eq!(got, [1, 2, 1, 2]);
        assert_eq!(s.pick_replica(LoadBalance::RoundRobin, Some(301)), None);
        assert_eq!(s.pick_replica(LoadBalance::LeastBusy, Some(301)), None);
        assert_eq!(s.pick_replica(LoadBalance::LeastBusy, Some(300)), Some(2));
    }

    #[test]
    fn none_when_no_replica_qualifies() {
        let s = shard(&[(false, 500, 0), (false, 500, 0)]);
        assert_eq!(s.pick_replica(LoadBalance::RoundRobin, None), None);
        assert_eq!(s.pick_replica(LoadBalance::LeastBusy, None), None);
        let empty = shard(&[]);
        assert_eq!(empty.pick_replica(LoadBalance::RoundRobin, None), None);
        assert_eq!(empty.pick_replica(LoadBalance::LeastBusy, Some(1)), None);
    }

    #[test]
    fn least_busy_prefers_fewest_in_flight_and_rotates_ties() {
        let s = shard(&[(true, 0, 3), (true, 0, 1), (false, 0, 0), (true, 0, 1)]);
        let got = picks(&s, LoadBalance::LeastBusy, None, 8);
        assert!(got.iter().all(|&i| i == 1 || i == 3), "{got:?}");
        assert!(got.contains(&1) && got.contains(&3), "ties rotate: {got:?}");
    }

    #[test]
    fn in_flight_guard_counts_and_steers_least_busy() {
        let s = shard(&[(true, 0, 0), (true, 0, 0)]);
        let guard = s.replicas[0].enter();
        let second = s.replicas[0].enter();
        assert_eq!(s.replicas[0].in_flight(), 2);
        assert_eq!(picks(&s, LoadBalance::LeastBusy, None, 4), [1, 1, 1, 1]);
        drop(guard);
        drop(second);
        assert_eq!(s.replicas[0].in_flight(), 0);
        let got = picks(&s, LoadBalance::LeastBusy, None, 4);
        assert!(got.contains(&0), "{got:?}");
    }

    #[test]
    fn lag_is_zero_when_caught_up_with_the_primary() {
        let now = Instant::now();
        // The last replayed commit is an hour old, but nothing has been written since.
        assert_eq!(
            estimate_lag_ms(now, 500, 500, Some(3_600_000), [].iter()),
            0
        );
        assert_eq!(estimate_lag_ms(now, 600, 500, None, [].iter()), 0);
    }

    #[test]
    fn lag_after_an_idle_period_is_bounded_by_primary_samples() {
        let now = Instant::now();
        let history = [
            (now - Duration::from_millis(400), 500),
            (now - Duration::from_millis(200), 500),
            (now - Duration::from_millis(10), 900),
        ];
        // A write after an hour of idleness: the commit-age measure says an hour, the primary
        // was at the replica's position 200 ms ago.
        assert_eq!(
            estimate_lag_ms(now, 500, 900, Some(3_600_000), history.iter()),
            200
        );
        // Under steady writes the commit age is the tighter bound.
        assert_eq!(estimate_lag_ms(now, 500, 900, Some(50), history.iter()), 50);
    }

    #[test]
    fn lag_of_a_replica_behind_all_samples() {
        let now = Instant::now();
        let history = [
            (now - Duration::from_millis(3_000), 700),
            (now - Duration::from_millis(100), 900),
        ];
        assert_eq!(
            estimate_lag_ms(now, 500, 900, Some(7_000), history.iter()),
            7_000
        );
        // No commit replayed since the replica started: the first sample past it bounds below.
        assert_eq!(estimate_lag_ms(now, 500, 900, None, history.iter()), 3_000);
        assert_eq!(estimate_lag_ms(now, 500, 900, None, [].iter()), 0);
    }

    #[test]
    fn lsn_history_is_trimmed_to_the_window() {
        let s = ServerState::new("p:1", Role::Primary);
        let t0 = Instant::now();
        for i in 0..10u64 {
            s.record_lsn(
                t0 + Duration::from_millis(i * 100),
                i,
                Duration::from_millis(250),
            );
        }
        assert_eq!(s.current_lsn(), 9);
        let kept: Vec<u64> = s.lsn_history.lock().iter().map(|&(_, l)| l).collect();
        assert_eq!(kept, [7, 8, 9]);
    }
}
