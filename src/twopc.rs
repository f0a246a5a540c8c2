//! Two-phase commit outside the client session: transaction ids (gids), the durable decision
//! log, and startup recovery of in-doubt prepared transactions.
//!
//! A transaction that wrote on several shards commits in two phases: `PREPARE TRANSACTION gid`
//! on every shard, then, once all prepared, a commit decision appended to the [`DecisionLog`]
//! and fsynced, and only then `COMMIT PREPARED gid` on every shard. If the proxy dies in
//! between, the shards keep the transaction prepared (holding its locks). [`recover`] runs at
//! startup: a prepared transaction with a decision in the log is committed (every shard
//! prepared it, and some may already have committed it); one of this node without a decision
//! is rolled back (the proxy died before deciding, so no shard committed it).
//!
//! Gids name the node that made them (`tessera_{node}_{boot}_{seq}`), so a proxy only ever
//! rolls back its own transactions, never those of another proxy sharing the shards, nor
//! prepared transactions of other tools.

use std::collections::HashSet;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tracing::{debug, warn};

use crate::backend::health::describe;
use crate::config::{self, Config};

/// Every gid Tessera makes starts with this.
pub const GID_PREFIX: &str = "tessera_";

/// Postgres rejects gids of 200 bytes or more (`GIDSIZE`).
const MAX_GID_LEN: usize = 199;

/// Bound on each recovery statement, so a server that accepts connections but never answers
/// cannot stall startup forever.
const RECOVERY_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often `open` retries when a concurrent compaction replaced the file it opened.
const OPEN_ATTEMPTS: usize = 5;

/// What went wrong with the decision log or with recovering a shard.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open the decision log {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "the decision log {path} is locked: another proxy is using it (every proxy needs its \
         own two_phase.log)"
    )]
    Locked { path: PathBuf },
    #[error("cannot write the decision log {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error(
        "the decision log {path} is unusable after a failed write that could not be undone; \
         restart the proxy"
    )]
    Poisoned { path: PathBuf },
    #[error("the decision log {path}, line {line}: unrecognized entry {text:?}")]
    Corrupt {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("invalid two-phase transaction id {gid:?}: {reason}")]
    BadGid { gid: String, reason: &'static str },
    #[error("shard {shard} ({addr}): {reason}")]
    Shard {
        shard: String,
        addr: String,
        reason: String,
    },
}

impl Error {
    /// The SQLSTATE a client sees when this error ends its transaction.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // io_error: the decision could not be made durable.
            Error::Open { .. }
            | Error::Locked { .. }
            | Error::Write { .. }
            | Error::Poisoned { .. } => "58030",
            // data_corrupted
            Error::Corrupt { .. } => "XX001",
            // internal_error: gids are made by the proxy, so a bad one is a bug.
            Error::BadGid { .. } => "XX000",
            // connection_failure
            Error::Shard { .. } => "08006",
        }
    }
}

// === gids ===

/// The gid of one two-phase transaction: `tessera_{node_id}_{boot:x}_{seq}`.
///
/// `boot` differs on every start (see [`new_boot`]) and `seq` counts within one start, so a
/// gid never repeats, even across restarts: a decision from an earlier run cannot be mistaken
/// for one of this run.
pub fn gid(node_id: u16, boot: u64, seq: u64) -> String {
    format!("{GID_PREFIX}{node_id}_{boot:x}_{seq}")
}

/// The node id of a gid made by [`gid`]; `None` for anything else (other tools' gids).
///
/// Parsing is strict (every part present and well-formed) so that a foreign gid that merely
/// starts with `tessera_` is left alone.
pub fn gid_node(gid: &str) -> Option<u16> {
    let rest = gid.strip_prefix(GID_PREFIX)?;
    let mut parts = rest.split('_');
    let (node, boot, seq) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let digits = |s: &str, radix: u32| !s.is_empty() && s.chars().all(|c| c.is_digit(radix));
    // Lowercase hex only, as `gid` writes it.
    let hex = |s: &str| digits(s, 16) && !s.chars().any(|c| c.is_ascii_uppercase());
    if !digits(node, 10) || !hex(boot) || !digits(seq, 10) {
        return None;
    }
    u64::from_str_radix(boot, 16).ok()?;
    seq.parse::<u64>().ok()?;
    let node = node.parse::<u16>().ok()?;
    (node <= config::MAX_NODE_ID).then_some(node)
}

/// A fresh per-start value for [`gid`]: 64 random bits, so two starts (of one process or of
/// several) practically never share one.
pub fn new_boot() -> u64 {
    rand::random::<u64>()
}

/// Gids go into the log one per line and into SQL string literals, so only characters that need
/// no quoting in either are accepted.
fn check_gid(gid: &str) -> Result<(), Error> {
    let bad = |reason| {
        Err(Error::BadGid {
            gid: gid.to_string(),
            reason,
        })
    };
    if gid.is_empty() {
        return bad("empty");
    }
    if gid.len() > MAX_GID_LEN {
        return bad("longer than 199 bytes");
    }
    if !gid
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return bad("only ASCII letters, digits, '_', '-' and '.' are allowed");
    }
    Ok(())
}

// === DecisionLog ===

/// The durable record of commit decisions, one line per entry:
///
/// - `commit <gid>`: every shard prepared `gid` and the proxy decided to commit it. Appended and
///   fsynced before the first `COMMIT PREPARED`, so a crash after that point still commits.
/// - `done <gid>`: every shard committed `gid`; the decision is no longer needed. Not fsynced:
///   losing it only delays compaction.
///
/// The file is held under an exclusive advisory lock (`flock`) for as long as the value lives,
/// so two proxies never share a log: each would roll back the other's undecided transactions.
///
/// All methods do blocking file I/O under a mutex; [`DecisionLog::record_commit`] costs one
/// fdatasync, short enough to call from async code (or wrap in `block_in_place`).
pub struct DecisionLog {
    path: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Open and locked; written only with positional writes at `len`.
    file: File,
    /// Bytes of complete entries in `file`: where the next entry goes.
    len: u64,
    /// Every commit decision in the file.
    committed: HashSet<String>,
    /// Gids with a `done` entry in the file.
    done: HashSet<String>,
    /// Commit decisions appended through this value (as opposed to read at open): compaction
    /// keeps them until they are done, since their transactions may still be running.
    recorded: HashSet<String>,
    /// A failed append could not be undone: the file may hold a decision the caller was told
    /// failed, so nothing more is written.
    poisoned: bool,
}

impl std::fmt::Debug for DecisionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecisionLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl DecisionLog {
    /// Opens (creating if absent) and locks the log at `path`, and reads its decisions.
    ///
    /// A torn last line (a crash during an append, which the caller never saw succeed) is cut
    /// off, so the next append starts on a fresh line.
    ///
    /// # Errors
    /// [`Error::Locked`] if another process (or another `DecisionLog` in this one) holds it;
    /// [`Error::Open`] if it cannot be created, read or locked; [`Error::Corrupt`] for a line
    /// that is not an entry (a hand-edited file is refused rather than guessed at).
    pub fn open(path: impl AsRef<Path>) -> Result<DecisionLog, Error> {
        let path = path.as_ref().to_path_buf();
        let open_error = |source| Error::Open {
            path: path.clone(),
            source,
        };
        let mut attempt = 0;
        let file = loop {
            attempt += 1;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(open_error)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => return Err(Error::Locked { path }),
                Err(TryLockError::Error(e)) => return Err(open_error(e)),
            }
            // Compaction replaces the file by rename while holding the lock on the new one. If
            // that happened between our open and our lock, we locked the old, unlinked file:
            // open again.
            if same_file(&file, &path).map_err(open_error)? {
                break file;
            }
            if attempt >= OPEN_ATTEMPTS {
                return Err(open_error(io::Error::other(
                    "the file keeps being replaced while opening it",
                )));
            }
        };
        // Make a newly created file's directory entry durable too.
        sync_dir(&path).map_err(open_error)?;

        let mut text = Vec::new();
        (&file).read_to_end(&mut text).map_err(open_error)?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < text.len() {
            warn!(
                path = %path.display(),
                bytes = text.len() - complete,
                "decision log ends with a torn entry (a crash during an append); dropping it"
            );
            file.set_len(complete as u64).map_err(open_error)?;
            file.sync_data().map_err(open_error)?;
            text.truncate(complete);
        }
        let (committed, done) = parse_entries(&text, &path)?;
        debug!(path = %path.display(), decisions = committed.len(), "decision log opened");
        Ok(DecisionLog {
            inner: Mutex::new(Inner {
                file,
                len: complete as u64,
                committed,
                done,
                recorded: HashSet::new(),
                poisoned: false,
            }),
            path,
        })
    }

    /// The file this log writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Durably records the decision to commit `gid`. Call it after every shard has prepared
    /// `gid` and before the first `COMMIT PREPARED`; on error, roll back instead.
    ///
    /// # Errors
    /// The entry could not be written and fsynced ([`Error::Write`]), or a previous failure
    /// poisoned the log; a malformed gid ([`Error::BadGid`]).
    pub fn record_commit(&self, gid: &str) -> Result<(), Error> {
        check_gid(gid)?;
        let mut inner = self.inner.lock();
        self.append(&mut inner, &format!("commit {gid}\n"), true)?;
        inner.committed.insert(gid.to_string());
        inner.recorded.insert(gid.to_string());
        Ok(())
    }

    /// Records that every shard committed `gid`, so compaction may drop its decision. Not
    /// fsynced (a lost `done` only keeps a decision around longer).
    ///
    /// # Errors
    /// As [`DecisionLog::record_commit`]; an error here is harmless to correctness.
    pub fn record_done(&self, gid: &str) -> Result<(), Error> {
        check_gid(gid)?;
        let mut inner = self.inner.lock();
        self.append(&mut inner, &format!("done {gid}\n"), false)?;
        inner.done.insert(gid.to_string());
        inner.recorded.remove(gid);
        Ok(())
    }

    /// Every commit decision in the log (including ones marked done: a decision is never
    /// forgotten before compaction, so a gid still prepared somewhere is never rolled back
    /// after it was decided).
    pub fn committed(&self) -> HashSet<String> {
        self.inner.lock().committed.clone()
    }

    /// Whether the log holds a commit decision for `gid`.
    pub fn is_committed(&self, gid: &str) -> bool {
        self.inner.lock().committed.contains(gid)
    }

    /// Rewrites the log with only the decisions still needed: those in `still_in_doubt` (gids
    /// that may still be prepared on some shard) and those recorded through this value and not
    /// yet done (their transactions may still be finishing). Everything read at open that is
    /// not in `still_in_doubt` is dropped, so the caller must include every gid it could not
    /// rule out, e.g. all of them when a shard was unreachable.
    ///
    /// Crash-safe: the new content goes to a temporary file in the same directory, which is
    /// fsynced, locked, and renamed over the log (then the directory is fsynced).
    ///
    /// # Errors
    /// [`Error::Write`]: the old log is left as it was.
    pub fn compact(&self, still_in_doubt: &HashSet<String>) -> Result<(), Error> {
        let mut inner = self.inner.lock();
        if inner.poisoned {
            return Err(Error::Poisoned {
                path: self.path.clone(),
            });
        }
        let keep: HashSet<String> = inner
            .committed
            .iter()
            .filter(|gid| {
                still_in_doubt.contains(*gid)
                    || (inner.recorded.contains(*gid) && !inner.done.contains(*gid))
            })
            .cloned()
            .collect();
        // Sorted, so the file reads well and compaction is deterministic.
        let mut lines: Vec<&String> = keep.iter().collect();
        lines.sort();
        let text: String = lines.iter().map(|gid| format!("commit {gid}\n")).collect();
        if keep.len() == inner.committed.len() && text.len() as u64 == inner.len {
            // Nothing to drop (the usual case, every resolve interval): the file already says
            // exactly this (a `done` line would make it longer), and rewriting it would cost
            // two fsyncs for nothing.
            return Ok(());
        }

        let write_error = |source| Error::Write {
            path: self.path.clone(),
            source,
        };
        let dir = parent_dir(&self.path);
        let temp = tempfile::Builder::new()
            .prefix(".tessera-2pc-")
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(write_error)?;
        // Lock the replacement before it becomes visible under the log's name, so no other
        // process can lock the log in between.
        match temp.as_file().try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(write_error(io::Error::other(
                    "a fresh temporary file is locked",
                )));
            }
            Err(TryLockError::Error(e)) => return Err(write_error(e)),
        }
        temp.as_file()
            .write_all_at(text.as_bytes(), 0)
            .map_err(write_error)?;
        temp.as_file().sync_all().map_err(write_error)?;
        let file = temp.persist(&self.path).map_err(|e| write_error(e.error))?;
        sync_dir(&self.path).map_err(write_error)?;

        debug!(
            path = %self.path.display(),
            kept = keep.len(),
            dropped = inner.committed.len() - keep.len(),
            "decision log compacted"
        );
        // Dropping the old handle releases the lock on the old, now unlinked, file.
        inner.file = file;
        inner.len = text.len() as u64;
        inner.recorded.retain(|gid| keep.contains(gid));
        inner.done.clear();
        inner.committed = keep;
        Ok(())
    }

    /// Writes one entry at the end; on failure, cuts the file back to its last complete entry
    /// so a half-written line can never be read as a decision.
    fn append(&self, inner: &mut Inner, line: &str, sync: bool) -> Result<(), Error> {
        if inner.poisoned {
            return Err(Error::Poisoned {
                path: self.path.clone(),
            });
        }
        let written = inner
            .file
            .write_all_at(line.as_bytes(), inner.len)
            .and_then(|()| if sync { inner.file.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => {
                inner.len += line.len() as u64;
                Ok(())
            }
            Err(source) => {
                // After a failed fsync the page cache may still hold the entry and write it
                // later; truncating (and syncing that) is the only way to be sure it is gone.
                let undone = inner
                    .file
                    .set_len(inner.len)
                    .and_then(|()| inner.file.sync_data());
                if let Err(e) = undone {
                    warn!(path = %self.path.display(), cause = %e, "cannot undo a failed decision log append");
                    inner.poisoned = true;
                }
                Err(Error::Write {
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }
}

/// Reads `commit`/`done` entries; blank lines are skipped.
fn parse_entries(text: &[u8], path: &Path) -> Result<(HashSet<String>, HashSet<String>), Error> {
    let mut committed = HashSet::new();
    let mut done = HashSet::new();
    for (i, line) in text.split(|&b| b == b'\n').enumerate() {
        let corrupt = || Error::Corrupt {
            path: path.to_path_buf(),
            line: i + 1,
            text: String::from_utf8_lossy(line).into_owned(),
        };
        let line = std::str::from_utf8(line).map_err(|_| corrupt())?;
        if line.trim().is_empty() {
            continue;
        }
        let (kind, gid) = line.split_once(' ').ok_or_else(corrupt)?;
        check_gid(gid).map_err(|_| corrupt())?;
        match kind {
            "commit" => committed.insert(gid.to_string()),
            "done" => done.insert(gid.to_string()),
            _ => return Err(corrupt()),
        };
    }
    Ok((committed, done))
}

/// Whether `file` is still the file at `path` (not replaced by a rename since it was opened).
fn same_file(file: &File, path: &Path) -> io::Result<bool> {
    let opened = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(opened.dev() == now.dev() && opened.ino() == now.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Fsyncs the directory holding `path`, making a create or rename in it durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(parent_dir(path))?.sync_all()
}

// === recovery ===

/// What recovery did on one shard's primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRecovery {
    pub shard: String,
    /// Prepared transactions finished with `COMMIT PREPARED` (a decision was logged).
    pub committed: usize,
    /// This node's prepared transactions finished with `ROLLBACK PREPARED` (no decision).
    pub rolled_back: usize,
    /// Prepared transactions left alone: other nodes' or other tools'.
    pub left_alone: usize,
}

/// What [`recover`] did.
///
/// A shard that cannot be recovered (down, unreachable, a statement failed) does not stop the
/// others, nor startup: it is reported in `failed` and every decision is kept in the log for
/// the next start to finish. Its in-doubt transactions stay prepared (holding their locks)
/// until then; new transactions are unaffected, since they use new gids.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Shards recovered, in config order.
    pub shards: Vec<ShardRecovery>,
    /// Shards not recovered, each error naming its shard.
    pub failed: Vec<Error>,
    /// Commit decisions left in the log after compaction.
    pub decisions_kept: usize,
    /// The decisions still needed (for a compaction the caller runs itself).
    pub still_in_doubt: HashSet<String>,
}

impl Recovery {
    /// Transactions committed on all shards together.
    pub fn committed(&self) -> usize {
        self.shards.iter().map(|s| s.committed).sum()
    }

    /// Transactions rolled back on all shards together.
    pub fn rolled_back(&self) -> usize {
        self.shards.iter().map(|s| s.rolled_back).sum()
    }
}

/// What recovery does with one prepared transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolution {
    Commit,
    Rollback,
}

/// A decision in our log means commit, whatever node id the gid carries: the log belongs to
/// this proxy alone, so the decision was made here (possibly under an earlier `node_id`).
/// Without one, only this node's gids are ours to roll back.
fn resolution(gid: &str, node_id: u16, decisions: &HashSet<String>) -> Option<Resolution> {
    if decisions.contains(gid) {
        Some(Resolution::Commit)
    } else if gid_node(gid) == Some(node_id) {
        Some(Resolution::Rollback)
    } else {
        None
    }
}

/// How to reach one shard's primary.
struct Target {
    shard: String,
    addr: String,
    pg: tokio_postgres::Config,
    connect_timeout: Duration,
}

impl Target {
    /// The primary of `shard`, reached as the backend user (as in `backend::health`).
    fn new(config: &Config, shard: &config::Shard) -> Result<Target, Error> {
        let connect_timeout = config.pool.connect_timeout();
        let mut target = Target {
            shard: shard.name.clone(),
            addr: shard.primary.clone(),
            pg: tokio_postgres::Config::new(),
            connect_timeout,
        };
        let (host, port) = config::parse_host_port(&shard.primary).map_err(|r| target.error(r))?;
        target
            .pg
            .host(host)
            .port(port)
            .user(&config.backend.user)
            .password(&config.backend.password)
            .dbname(&config.backend.database)
            .application_name("tessera-recovery")
            .connect_timeout(connect_timeout);
        Ok(target)
    }

    fn error(&self, reason: impl Into<String>) -> Error {
        Error::Shard {
            shard: self.shard.clone(),
            addr: self.addr.clone(),
            reason: reason.into(),
        }
    }
}

/// Finishes this node's in-doubt transactions on every shard primary (concurrently), then
/// compacts the log down to the decisions still needed.
///
/// Connects as `backend.user` to `backend.database`, the database and role the proxy's own
/// `PREPARE TRANSACTION`s ran as (only the preparing role or a superuser may finish them, and
/// only from their database).
///
/// # Errors
/// Only the log's compaction; shard failures are reported in [`Recovery::failed`].
pub async fn recover(config: &Config, log: &DecisionLog) -> Result<Recovery, Error> {
    resolve(config, log, &Leave::default()).await
}

/// Which prepared transactions a resolution pass leaves alone while the proxy runs.
#[derive(Default, Clone)]
pub struct Leave {
    /// Gids sessions of this proxy are committing right now, looked at when acting on each
    /// gid (a session registers its gid before PREPARE, so a prepared gid not in here is not
    /// in flight).
    pub in_flight: Option<Arc<Mutex<HashSet<String>>>>,
    /// The running proxy's log, read again when acting: a decision recorded after the pass
    /// began must not be rolled back.
    pub log: Option<Arc<DecisionLog>>,
    /// Prepared less than this long ago: left for the next pass.
    pub younger_than: Option<Duration>,
}

/// Finishes this node's in-doubt prepared transactions (committed if the log has the decision,
/// else rolled back), except those `leave` names. At startup nothing is in flight; while the
/// proxy runs, a session that lost a shard connection mid-commit leaves its gid here.
///
/// # Errors
/// Compacting the log failed (unreachable shards are reported in [`Recovery::failed`]).
pub async fn resolve(config: &Config, log: &DecisionLog, leave: &Leave) -> Result<Recovery, Error> {
    let decisions = Arc::new(log.committed());
    let leave = Arc::new(leave.clone());
    let tasks: Vec<_> = config
        .shards
        .iter()
        .map(|shard| {
            Target::new(config, shard).map(|target| {
                tokio::spawn(recover_shard(
                    target,
                    config.node_id,
                    decisions.clone(),
                    leave.clone(),
                ))
            })
        })
        .collect();

    let mut recovery = Recovery::default();
    let mut still_prepared = HashSet::new();
    for (task, shard) in tasks.into_iter().zip(&config.shards) {
        let outcome = match task {
            Ok(handle) => handle.await.unwrap_or_else(|e| {
                Err(Error::Shard {
                    shard: shard.name.clone(),
                    addr: shard.primary.clone(),
                    reason: format!("recovery task failed: {e}"),
                })
            }),
            Err(e) => Err(e),
        };
        match outcome {
            Ok((done, remaining)) => {
                recovery.shards.push(done);
                still_prepared.extend(remaining);
            }
            Err(e) => recovery.failed.push(e),
        }
    }

    // Keep a decision while its gid may still be prepared somewhere: everywhere we looked, or,
    // if a shard could not be looked at, all of them.
    let still_in_doubt: HashSet<String> = if recovery.failed.is_empty() {
        still_prepared
            .into_iter()
            .filter(|gid| decisions.contains(gid))
            .collect()
    } else {
        (*decisions).clone()
    };
    // A running proxy compacts off its async worker (see `server::resolve_loop`).
    if leave.log.is_none() {
        log.compact(&still_in_doubt)?;
    }
    recovery.decisions_kept = still_in_doubt.len();
    recovery.still_in_doubt = still_in_doubt;
    Ok(recovery)
}

/// Recovers one shard; returns what it did and the gids still prepared there afterwards.
async fn recover_shard(
    target: Target,
    node_id: u16,
    decisions: Arc<HashSet<String>>,
    leave: Arc<Leave>,
) -> Result<(ShardRecovery, Vec<String>), Error> {
    let (client, connection) =
        tokio::time::timeout(target.connect_timeout, target.pg.connect(NoTls))
            .await
            .map_err(|_| {
                target.error(format!(
                    "cannot connect within {} ms",
                    target.connect_timeout.as_millis()
                ))
            })?
            .map_err(|e| target.error(format!("cannot connect: {}", describe(&e))))?;
    let shard = target.shard.clone();
    let connection = tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(%shard, error = %describe(&e), "recovery connection closed");
        }
    });
    let result = async {
        let min_age = leave.younger_than.map_or(0.0, |d| d.as_secs_f64());
        let rows = bounded(client.query(
            "SELECT gid, extract(epoch FROM now() - prepared)::float8 >= $1 FROM pg_prepared_xacts WHERE database = current_database()",
            &[&min_age],
        ))
        .await
        .map_err(|e| statement_error(&target, "listing prepared transactions", None, e))?;
        let mut done = ShardRecovery {
            shard: target.shard.clone(),
            committed: 0,
            rolled_back: 0,
            left_alone: 0,
        };
        let mut remaining = Vec::new();
        for row in rows {
            let gid: String = row.get(0);
            let old_enough: bool = row.get(1);
            let in_flight = leave
                .in_flight
                .as_ref()
                .is_some_and(|set| set.lock().contains(&gid));
            if !old_enough || in_flight {
                done.left_alone += 1;
                remaining.push(gid);
                continue;
            }
            let decided_since = leave.log.as_ref().is_some_and(|l| l.is_committed(&gid));
            let resolution = if decided_since {
                Some(Resolution::Commit)
            } else {
                resolution(&gid, node_id, &decisions)
            };
            let Some(resolution) = resolution else {
                done.left_alone += 1;
                remaining.push(gid);
                continue;
            };
            let verb = match resolution {
                Resolution::Commit => "COMMIT",
                Resolution::Rollback => "ROLLBACK",
            };
            // Gids from the log passed check_gid and ours have no quotes, but quote anyway: the
            // text comes from the server.
            let sql = format!("{verb} PREPARED '{}'", gid.replace('\'', "''"));
            match bounded(client.batch_execute(&sql)).await {
                Ok(()) => {}
                // 42704: finished meanwhile (by an operator, say): nothing left to do.
                Err(Some(e)) if e.code() == Some(&SqlState::UNDEFINED_OBJECT) => {
                    debug!(shard = %target.shard, %gid, "prepared transaction already finished");
                    continue;
                }
                Err(e) => {
                    return Err(statement_error(
                        &target,
                        "finishing prepared transaction",
                        Some(&gid),
                        e,
                    ));
                }
            }
            debug!(shard = %target.shard, %gid, action = verb, "in-doubt transaction finished");
            match resolution {
                Resolution::Commit => done.committed += 1,
                Resolution::Rollback => done.rolled_back += 1,
            }
        }
        Ok((done, remaining))
    }
    .await;
    drop(client);
    let _ = connection.await;
    result
}

/// Runs one recovery statement within [`RECOVERY_STATEMENT_TIMEOUT`]; `Err(None)` = no answer.
async fn bounded<T>(
    statement: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Option<tokio_postgres::Error>> {
    match tokio::time::timeout(RECOVERY_STATEMENT_TIMEOUT, statement).await {
        Ok(result) => result.map_err(Some),
        Err(_) => Err(None),
    }
}

/// A failed or unanswered recovery statement, naming the shard and the gid.
fn statement_error(
    target: &Target,
    what: &str,
    gid: Option<&str>,
    e: Option<tokio_postgres::Error>,
) -> Error {
    let gid = gid.map(|g| format!(" {g}")).unwrap_or_default();
    match e {
        Some(e) => target.error(format!("{what}{gid}: {}", describe(&e))),
        None => target.error(format!(
            "{what}{gid}: no answer within {} s",
            RECOVERY_STATEMENT_TIMEOUT.as_secs()
        )),
    }
}

/// Test hook: with `TESSERA_FAILPOINT=<name>` in the environment, the process aborts at the
/// named point of a two-phase commit (`after-prepare`, `after-decision`), as a crash would,
/// so recovery can be tested against real servers.
pub fn failpoint(name: &str) {
    if std::env::var("TESSERA_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("tessera: failpoint {name} reached, aborting");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_name_their_node() {
        let g = gid(901, 0xdead_beef, 42);
        assert_eq!(g, "tessera_901_deadbeef_42");
        assert_eq!(gid_node(&g), Some(901));
        assert_eq!(gid_node(&gid(0, u64::MAX, u64::MAX)), Some(0));
        assert_eq!(gid_node(&gid(1023, 0, 0)), Some(1023));
        assert!(gid(1023, u64::MAX, u64::MAX).len() <= MAX_GID_LEN);
        check_gid(&gid(1023, u64::MAX, u64::MAX)).expect("our gids are valid");
    }

    #[test]
    fn foreign_gids_have_no_node() {
        for g in [
            "other_tool_1",
            "",
            "tessera_",
            "tessera_1",
            "tessera_1_ab",
            "tessera_1_ab_",
            "tessera__ab_1",
            "tessera_1_ab_1_2",
            "tessera_1_AB_1",
            "tessera_1_xyz_1",
            "tessera_1024_ab_1",
            "tessera_-1_ab_1",
            "tessera_+1_ab_1",
            "tessera_99999_ab_1",
            "tessera_1_ab_1x",
            "tessera_1_ab_99999999999999999999999",
            "TESSERA_1_ab_1",
        ] {
            assert_eq!(gid_node(g), None, "{g}");
        }
    }

    #[test]
    fn boots_differ() {
        assert_ne!(new_boot(), new_boot());
    }

    #[test]
    fn resolution_commits_decided_and_rolls_back_only_our_undecided() {
        let decisions: HashSet<String> = [gid(1, 5, 1), gid(2, 5, 1)].into_iter().collect();
        assert_eq!(
            resolution(&gid(1, 5, 1), 1, &decisions),
            Some(Resolution::Commit)
        );
        assert_eq!(
            resolution(&gid(1, 5, 2), 1, &decisions),
            Some(Resolution::Rollback)
        );
        // Decided under an earlier node id, in this proxy's own log: still committed.
        assert_eq!(
            resolution(&gid(2, 5, 1), 1, &decisions),
            Some(Resolution::Commit)
        );
        assert_eq!(resolution(&gid(2, 5, 2), 1, &decisions), None);
        assert_eq!(resolution("other_tool_1", 1, &decisions), None);
    }

    #[test]
    fn log_records_and_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("2pc.log");
        let log = DecisionLog::open(&path).expect("creates");
        assert!(log.committed().is_empty());
        log.record_commit("tessera_1_a_1").expect("commit 1");
        log.record_commit("tessera_1_a_2").expect("commit 2");
        log.record_done("tessera_1_a_1").expect("done 1");
        assert!(log.is_committed("tessera_1_a_1"));
        drop(log);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(
            text,
            "commit tessera_1_a_1\ncommit tessera_1_a_2\ndone tessera_1_a_1\n"
        );
        let log = DecisionLog::open(&path).expect("reopens");
        let expected: HashSet<String> = ["tessera_1_a_1", "tessera_1_a_2"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(log.committed(), expected);
    }

    #[test]
    fn second_open_is_refused_while_locked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("2pc.log");
        let log = DecisionLog::open(&path).expect("first");
        let err = DecisionLog::open(&path).expect_err("second");
        assert!(matches!(err, Error::Locked { .. }), "{err}");
        assert!(err.to_string().contains("locked"), "{err}");
        // Still locked after compaction replaced the file (a finished decision to drop, so
        // it does replace it).
        log.record_commit("finished").expect("commit");
        log.record_done("finished").expect("done");
        log.compact(&HashSet::new()).expect("compacts");
        let err = DecisionLog::open(&path).expect_err("after compaction");
        assert!(matches!(err, Error::Locked { .. }), "{err}");
        drop(log);
        DecisionLog::open(&path).expect("free once dropped");
    }

    #[test]
    fn compaction_keeps_in_doubt_and_unfinished_decisions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("2pc.log");
        std::fs::write(
            &path,
            "commit old_in_doubt\ncommit old_finished\ndone old_finished\ncommit old_gone\n",
        )
        .expect("seed");
        let log = DecisionLog::open(&path).expect("opens");
        log.record_commit("new_running").expect("commit");
        log.record_commit("new_done").expect("commit");
        log.record_done("new_done").expect("done");
        let in_doubt: HashSet<String> = ["old_in_doubt".to_string()].into_iter().collect();
        log.compact(&in_doubt).expect("compacts");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "commit new_running\ncommit old_in_doubt\n"
        );
        // Appends after compaction go to the new file.
        log.record_commit("after").expect("commit");
        drop(log);
        let log = DecisionLog::open(&path).expect("reopens");
        let expected: HashSet<String> = ["new_running", "old_in_doubt", "after"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(log.committed(), expected);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .filter(|e| e.file_name() != "2pc.log")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn compaction_with_nothing_to_drop_leaves_the_file_alone() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("2pc.log");
        let log = DecisionLog::open(&path).expect("opens");
        let inode = || std::fs::metadata(&path).expect("stat").ino();
        let empty = inode();
        log.compact(&HashSet::new()).expect("compacts");
        assert_eq!(inode(), empty, "an empty log was rewritten");
        log.record_commit("running").expect("commit");
        log.compact(&HashSet::new()).expect("compacts");
        assert_eq!(inode(), empty, "a log with nothing to drop was rewritten");
        log.record_done("running").expect("done");
        log.compact(&HashSet::new()).expect("compacts");
        assert_ne!(inode(), empty, "a finished decision was not dropped");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "");
    }

    #[test]
    fn torn_tail_is_dropped_and_appends_start_clean() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("2pc.log");
        std::fs::write(&path, "commit tessera_1_a_1\ncommit tessera_1_a_1").expect("seed");
        let log = DecisionLog::open(&path).expect("opens");
        // The torn entry names a different gid (a prefix of the real one) and must not count.
        let expected: HashSet<String> = ["tessera_1_a_1".to_string()].into_iter().collect();
        assert_eq!(log.committed(), expected);
        log.record_commit("tessera_1_a_2").expect("commit");
        drop(log);
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "commit tessera_1_a_1\ncommit tessera_1_a_2\n"
        );
    }

    #[test]
    fn corrupt_lines_and_bad_gids_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("2pc.log");
        std::fs::write(&path, "commit a\n\nabort b\n").expect("seed");
        let err = DecisionLog::open(&path).expect_err("corrupt");
        assert!(matches!(err, Error::Corrupt { line: 3, .. }), "{err}");
        std::fs::write(&path, "commit a b\n").expect("seed");
        assert!(matches!(
            DecisionLog::open(&path),
            Err(Error::Corrupt { line: 1, .. })
        ));
        std::fs::write(&path, "").expect("reset");
        let log = DecisionLog::open(&path).expect("opens");
        for bad in ["", "a b", "a\nb", "it's", &"x".repeat(200)] {
            assert!(
                matches!(log.record_commit(bad), Err(Error::BadGid { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "");
    }

    #[test]
    fn unopenable_log_names_the_path() {
        let err = DecisionLog::open("/nonexistent-dir-for-tessera/2pc.log").expect_err("no dir");
        assert!(
            err.to_string()
                .contains("/nonexistent-dir-for-tessera/2pc.log"),
            "{err}"
        );
        assert_eq!(err.sqlstate(), "58030");
    }
}
