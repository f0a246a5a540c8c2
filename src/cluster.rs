//! Throwaway local PostgreSQL clusters (N primaries, each with M streaming replicas) for integration
//! tests and `tessera demo`: finding the server binaries, initdb / pg_basebackup / pg_ctl
//! orchestration, and teardown when the [`LocalCluster`] is dropped.
//!
//! Everything here is synchronous (`std::process::Command`) because tests build clusters before
//! or outside a tokio runtime. Every wait is bounded by a timeout so a broken environment fails a
//! test with a message instead of hanging it.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The bootstrap superuser of every server (`initdb -U postgres`), independent of the OS user.
const SUPERUSER: &str = "postgres";
/// Upper bound for initdb and pg_basebackup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `pg_ctl -w` waits for a server to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `pg_ctl -w` waits for a server to shut down.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the primary may take to report all of its replicas as streaming.
const STREAMING_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one `psql` invocation.
const PSQL_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for small helper programs (`pg_config`, `id`, `kill`).
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time our own process timeout grants on top of a `pg_ctl -t` timeout, so pg_ctl gets to
/// report its own (more specific) failure first.
const PG_CTL_GRACE: Duration = Duration::from_secs(10);
/// Lines of a server log quoted in start errors.
const LOG_TAIL_LINES: usize = 20;
/// Unix socket paths are limited to 107 bytes (sun_path); stay well below.
const MAX_SOCKET_PATH: usize = 100;
/// Attempts to start a server when its port was taken between picking and binding it.
const PORT_ATTEMPTS: usize = 3;
/// Set to `1` to keep the cluster directory (data dirs and logs) after the cluster is dropped.
pub const KEEP_ENV: &str = "TESSERA_KEEP_CLUSTER";
/// Optional override of the PostgreSQL bin directory, checked before any discovery.
pub const BINDIR_ENV: &str = "TESSERA_PG_BINDIR";
/// Programs a bin directory must contain to be usable.
const REQUIRED_PROGRAMS: [&str; 5] = ["initdb", "pg_ctl", "pg_basebackup", "psql", "postgres"];

/// Shape of a [`LocalCluster`]: how many shards and replicas, and the application role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// Number of primaries (one per shard); at least 1.
    pub shards: usize,
    /// Streaming replicas per primary; may be 0.
    pub replicas: usize,
    /// Application role created on every primary (LOGIN, scram-sha-256 password).
    pub user: String,
    /// Password of [`ClusterSpec::user`].
    pub password: String,
    /// Database created on every primary, owned by [`ClusterSpec::user`].
    pub database: String,
}

impl Default for ClusterSpec {
    /// Two shards with one replica each; role, password and database all `app`.
    fn default() -> Self {
        ClusterSpec {
            shards: 2,
            replicas: 1,
            user: "app".to_owned(),
            password: "app".to_owned(),
            database: "app".to_owned(),
        }
    }
}

impl ClusterSpec {
    fn validate(&self) -> Result<(), ClusterError> {
        let invalid = |msg: &str| Err(ClusterError::InvalidSpec(msg.to_owned()));
        if self.shards == 0 {
            return invalid("shards must be at least 1");
        }
        if self.user.is_empty() || self.database.is_empty() {
            return invalid("user and database must not be empty");
        }
        // The bootstrap superuser already exists and must stay a superuser for psql().
        if self.user == SUPERUSER {
            return invalid("user must not be `postgres` (that is the cluster superuser)");
        }
        // PostgreSQL treats an empty password as "no password", so scram login would be impossible.
        if self.password.is_empty() {
            return invalid("password must not be empty");
        }
        if self.database == "template0" || self.database == "template1" {
            return invalid("database must not be a template database");
        }
        Ok(())
    }
}

/// Why building, using or tearing down a [`LocalCluster`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No directory with initdb, pg_ctl, pg_basebackup, psql and postgres was found.
    #[error("no PostgreSQL server binaries found: install postgresql or put initdb on PATH")]
    NoBinaries,
    /// The [`ClusterSpec`] cannot be realized.
    #[error("invalid cluster spec: {0}")]
    InvalidSpec(String),
    /// We run as root (which PostgreSQL refuses), but the `postgres` OS user is unknown.
    #[error(
        "running as root, and PostgreSQL refuses to run as root, but the OS user `postgres` \
         could not be resolved: {0}"
    )]
    NoPostgresUser(String),
    /// A file system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A helper program exited unsuccessfully.
    #[error("{what} failed ({status}):\n{output}")]
    CommandFailed {
        /// The command line, shortened to the program and what it was for.
        what: String,
        /// Exit status as text.
        status: String,
        /// The program's stderr and stdout.
        output: String,
    },
    /// A helper program did not finish in time and was killed.
    #[error("{what} did not finish within {timeout:?}")]
    CommandTimeout {
        /// The command line, shortened.
        what: String,
        /// The limit that was exceeded.
        timeout: Duration,
    },
    /// A server did not start; carries the end of its log.
    #[error(
        "could not start {server} on port {port}: {reason}\n--- last lines of {} ---\n{log_tail}",
        .log.display()
    )]
    ServerStart {
        /// Server name, e.g. `shard0-replica1`.
        server: String,
        /// Port it was supposed to listen on.
        port: u16,
        /// What pg_ctl said.
        reason: String,
        /// The server log file.
        log: PathBuf,
        /// The last lines of that log.
        log_tail: String,
    },
    /// Replicas were started but the primary did not report them all as streaming in time.
    #[error(
        "timed out after {timeout:?} waiting for {expected} replica(s) of {shard} to stream \
         (last observation: {observed})\n{logs}"
    )]
    ReplicationTimeout {
        /// The primary's name.
        shard: String,
        /// Number of replicas that should stream.
        expected: usize,
        /// The last streaming count or psql error seen.
        observed: String,
        /// The limit that was exceeded.
        timeout: Duration,
        /// Tails of the replica logs.
        logs: String,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// One PostgreSQL server of a [`LocalCluster`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgServer {
    /// TCP port on 127.0.0.1 (also the number of its unix socket in the cluster directory).
    pub port: u16,
    name: String,
    data_dir: PathBuf,
    log: PathBuf,
}

impl PgServer {
    /// `"127.0.0.1:PORT"`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stable name such as `shard0-primary` or `shard1-replica2` (also its data dir's name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file (pg_ctl `-l`).
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

/// The servers of one shard: a primary and its streaming replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardServers {
    /// The read-write server.
    pub primary: PgServer,
    /// Hot standbys streaming from `primary`, in creation order.
    pub replicas: Vec<PgServer>,
}

/// A running throwaway cluster. Dropping it stops every server (immediate mode) and deletes its
/// directory, also while a test unwinds from a panic; set `TESSERA_KEEP_CLUSTER=1` to keep the
/// directory for post-mortems.
#[derive(Debug)]
pub struct LocalCluster {
    env: PgEnv,
    spec: ClusterSpec,
    shards: Vec<ShardServers>,
    /// `None` only inside `drop`.
    temp: Option<tempfile::TempDir>,
}

impl LocalCluster {
    /// Creates and starts all servers of `spec` and waits until every replica streams.
    ///
    /// On error, whatever was already started is torn down before returning.
    pub fn start(spec: &ClusterSpec) -> Result<LocalCluster, ClusterError> {
        spec.validate()?;
        let bin_dir = find_bin_dir()?;
        let run_as = if effective_uid() == Some(0) {
            Some(lookup_postgres_user()?)
        } else {
            None
        };
        let temp = make_cluster_dir(run_as)?;
        // From here on the cluster value owns the directory, so an early return tears down
        // whatever was started (Drop discovers running servers from the directory itself).
        let mut cluster = LocalCluster {
            env: PgEnv {
                bin_dir,
                dir: temp.path().to_path_buf(),
                run_as,
            },
            spec: spec.clone(),
            shards: Vec::with_capacity(spec.shards),
            temp: Some(temp),
        };

        // Hold every port's listener until just before its server starts, so servers of this
        // cluster cannot be handed the same port.
        let mut reservations = Vec::with_capacity(spec.shards);
        for _ in 0..spec.shards {
            let ports = (0..=spec.replicas)
                .map(|_| reserve_port())
                .collect::<Result<Vec<_>, _>>()?;
            reservations.push(ports);
        }

        // Shards are independent, so set them up in parallel: initdb dominates the start time.
        let env = &cluster.env;
        let results: Vec<Result<ShardServers, ClusterError>> = thread::scope(|scope| {
            let handles: Vec<_> = reservations
                .into_iter()
                .enumerate()
                .map(|(index, ports)| scope.spawn(move || start_shard(env, spec, index, ports)))
                .collect();
            handles
                .into_iter()
                .map(|handle| match handle.join() {
                    Ok(result) => result,
                    Err(payload) => std::panic::resume_unwind(payload),
                })
                .collect()
        });
        for result in results {
            cluster.shards.push(result?);
        }
        Ok(cluster)
    }

    /// The shards, in index order (shard `i` has data dirs named `shard{i}-*`).
    pub fn shards(&self) -> &[ShardServers] {
        &self.shards
    }

    /// The spec this cluster was started from.
    pub fn spec(&self) -> &ClusterSpec {
        &self.spec
    }

    /// The PostgreSQL bin directory in use.
    pub fn bin_dir(&self) -> &Path {
        &self.env.bin_dir
    }

    /// The cluster directory: data dirs, logs, and the unix sockets of every server.
    pub fn dir(&self) -> &Path {
        &self.env.dir
    }

    /// Runs `sql` as the superuser in the spec's database on `server` (`psql -X -A -t -q -v
    /// ON_ERROR_STOP=1`, script on stdin, so several statements and `CREATE DATABASE` work) and
    /// returns stdout, trimmed. Multi-column rows are `|`-separated.
    pub fn psql(&self, server: &PgServer, sql: &str) -> Result<String, ClusterError> {
        self.env.psql(server.port, &self.spec.database, sql)
    }

    /// Superuser connection string over the unix socket, for tokio-postgres / libpq:
    /// `host=<cluster dir> port=P user=postgres dbname=<database>`.
    pub fn superuser_conninfo(&self, server: &PgServer) -> String {
        format!(
            "host={} port={} user={} dbname={}",
            conninfo_value(&self.env.dir.to_string_lossy()),
            server.port,
            SUPERUSER,
            conninfo_value(&self.spec.database)
        )
    }

    /// Application-role connection string over TCP (scram-sha-256):
    /// `host=127.0.0.1 port=P user=<user> password=<password> dbname=<database>`.
    pub fn app_conninfo(&self, server: &PgServer) -> String {
        format!(
            "host=127.0.0.1 port={} user={} password={} dbname={}",
            server.port,
            conninfo_value(&self.spec.user),
            conninfo_value(&self.spec.password),
            conninfo_value(&self.spec.database)
        )
    }

    /// Stops `server` with `pg_ctl stop -m fast` (clients are disconnected, no crash recovery
    /// needed on restart). Stopping a stopped server is an error.
    pub fn stop_server(&self, server: &PgServer) -> Result<(), ClusterError> {
        self.env.pg_ctl_stop(&server.data_dir, "fast")
    }

    /// Starts a stopped `server` again on the same port (the port is in its
    /// `postgresql.auto.conf`). Does not wait for a replica to resume streaming.
    pub fn start_server(&self, server: &PgServer) -> Result<(), ClusterError> {
        self.env.pg_ctl_start(server)
    }

    /// Stops every server that is still running: replicas first, so they do not spend the
    /// teardown reconnecting to a vanished primary. Errors are reported on stderr, never raised.
    fn stop_all(&self) {
        // The directory, not `self.shards`, is the source of truth: after a failed `start` some
        // servers run that never made it into `shards`.
        let entries = match fs::read_dir(&self.env.dir) {
            Ok(entries) => entries,
            Err(err) => {
                eprintln!(
                    "tessera cluster: cannot list {}: {err}",
                    self.env.dir.display()
                );
                return;
            }
        };
        let mut running: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.join("postmaster.pid").is_file())
            .collect();
        running.sort_by_key(|dir| (!is_replica_dir(dir), dir.clone()));
        for data_dir in running {
            if let Err(err) = self.env.pg_ctl_stop(&data_dir, "immediate") {
                eprintln!(
                    "tessera cluster: stopping {} failed, killing it: {err}",
                    data_dir.display()
                );
                kill_postmaster(&data_dir);
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop_all();
        let Some(temp) = self.temp.take() else {
            return;
        };
        if keep_requested(std::env::var(KEEP_ENV).ok().as_deref()) {
            let path = temp.keep();
            let as_whom = if self.env.run_as.is_some() {
                " as the postgres OS user"
            } else {
                ""
            };
            eprintln!(
                "tessera cluster: {KEEP_ENV} is set, kept {dir} (servers stopped; restart one{as_whom} \
                 with `{bin}/pg_ctl -D {dir}/<server> -l {dir}/<server>.log start`)",
                dir = path.display(),
                bin = self.env.bin_dir.display(),
            );
        } else if let Err(err) = temp.close() {
            eprintln!(
                "tessera cluster: could not remove {}: {err}",
                self.env.dir.display()
            );
        }
    }
}

/// Uid/gid the PostgreSQL programs run as when we are root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OsUser {
    uid: u32,
    gid: u32,
}

/// Where and as whom the PostgreSQL programs run.
#[derive(Debug)]
struct PgEnv {
    bin_dir: PathBuf,
    /// Cluster directory: data dirs, logs, unix sockets; cwd and HOME of every program.
    dir: PathBuf,
    run_as: Option<OsUser>,
}

impl PgEnv {
    /// A command for `program` from the bin dir, isolated from the caller's environment.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(program));
        // As the postgres OS user, the caller's cwd and HOME (e.g. /root) may be unreadable.
        cmd.current_dir(&self.dir).env("HOME", &self.dir);
        // PGHOST, PGPORT, PGDATA, PGOPTIONS, ... of the caller must not redirect our programs.
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|key| key.starts_with("PG")) {
                cmd.env_remove(key);
            }
        }
        // English messages, so errors in test output are greppable; UTF-8 results from psql.
        cmd.env("LC_ALL", "C").env("PGCLIENTENCODING", "UTF8");
        if let Some(user) = self.run_as {
            cmd.gid(user.gid).uid(user.uid);
        }
        cmd
    }

    fn psql(&self, port: u16, database: &str, sql: &str) -> Result<String, ClusterError> {
        let mut cmd = self.command("psql");
        cmd.args([
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            "-",
            "-d",
        ])
        .arg(format!(
            "host={} port={port} user={SUPERUSER} dbname={} connect_timeout=10",
            conninfo_value(&self.dir.to_string_lossy()),
            conninfo_value(database)
        ));
        let out = run(
            cmd,
            Some(sql),
            PSQL_TIMEOUT,
            &format!("psql on port {port}"),
        )?;
        Ok(out.trim().to_owned())
    }

    fn pg_ctl_start(&self, server: &PgServer) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(&server.data_dir)
            .arg("-l")
            .arg(&server.log)
            .args(["-w", "-t", &START_TIMEOUT.as_secs().to_string(), "start"]);
        let what = format!("pg_ctl start of {}", server.name);
        run(cmd, None, START_TIMEOUT + PG_CTL_GRACE, &what)
            .map(drop)
            .map_err(|err| ClusterError::ServerStart {
                server: server.name.clone(),
                port: server.port,
                reason: err.to_string(),
                log: server.log.clone(),
                log_tail: tail_lines(&read_lossy(&server.log), LOG_TAIL_LINES),
            })
    }

    fn pg_ctl_stop(&self, data_dir: &Path, mode: &str) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(data_dir).args([
            "-m",
            mode,
            "-w",
            "-t",
            &STOP_TIMEOUT.as_secs().to_string(),
            "stop",
        ]);
        let what = format!("pg_ctl stop -m {mode} of {}", data_dir.display());
        run(cmd, None, STOP_TIMEOUT + PG_CTL_GRACE, &what).map(drop)
    }

    /// Runs initdb for a primary and writes its configuration.
    fn init_primary(&self, spec: &ClusterSpec, data_dir: &Path) -> Result<(), ClusterError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(data_dir).args([
            "-U",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            // Bytewise, deterministic text ordering regardless of the host's locale.
            "--locale=C",
            // A throwaway cluster does not need to survive a power loss.
            "--no-sync",
        ]);
        run(
            cmd,
            None,
            SETUP_TIMEOUT,
            &format!("initdb of {}", data_dir.display()),
        )?;

        let conf = primary_conf(&self.dir, spec.replicas);
        append_file(&data_dir.join("postgresql.conf"), &conf)?;
        let hba = data_dir.join("pg_hba.conf");
        fs::write(&hba, pg_hba_conf()).map_err(io_error(format!("writing {}", hba.display())))
    }

    /// Clones `primary` into `data_dir` as a standby (`standby.signal` and `primary_conninfo`
    /// from `-R`), with a physical slot so a stopped replica can catch up later.
    fn base_backup(
        &self,
        primary: &PgServer,
        data_dir: &Path,
        slot: &str,
    ) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_basebackup");
        cmd.arg("-h")
            .arg(&self.dir)
            .args(["-p", &primary.port.to_string(), "-U", SUPERUSER, "-D"])
            .arg(data_dir)
            .args([
                "-R",
                "-X",
                "stream",
                "-C",
                "-S",
                slot,
                // Without this pg_basebackup waits for a spread checkpoint (can take minutes).
                "--checkpoint=fast",
                "--no-sync",
            ]);
        run(
            cmd,
            None,
            SETUP_TIMEOUT,
            &format!(
                "pg_basebackup of {} into {}",
                primary.name,
                data_dir.display()
            ),
        )
        .map(drop)
    }

    /// Sets the server's port in `postgresql.auto.conf` (the last setting wins, so this also
    /// overrides the primary's port a replica inherited) and starts it. Retries on a fresh
    /// port when another process grabbed the reserved one in the meantime.
    fn start_new_server(
        &self,
        name: String,
        reservation: TcpListener,
    ) -> Result<PgServer, ClusterError> {
        let data_dir = self.dir.join(&name);
        let log = self.dir.join(format!("{name}.log"));
        let mut reservation = Some(reservation);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let listener = match reservation.take() {
                Some(listener) => listener,
                None => reserve_port()?,
            };
            let port = listener
                .local_addr()
                .map_err(io_error("reading a reserved port"))?
                .port();
            // Release the port only now, right before the server binds it.
            drop(listener);
            append_file(
                &data_dir.join("postgresql.auto.conf"),
                &format!("port = {port}\n"),
            )?;
            let server = PgServer {
                port,
                name: name.clone(),
                data_dir: data_dir.clone(),
                log: log.clone(),
            };
            let log_offset = fs::metadata(&log).map(|meta| meta.len()).unwrap_or(0);
            match self.pg_ctl_start(&server) {
                Ok(()) => return Ok(server),
                Err(err)
                    if attempt < PORT_ATTEMPTS
                        && is_port_conflict(&read_lossy_from(&log, log_offset)) =>
                {
                    // The failed postmaster exited on its own; try again with another port.
                    drop(err);
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Polls `pg_stat_replication` on `primary` until all `replicas` stream.
    fn wait_for_streaming(
        &self,
        primary: &PgServer,
        replicas: &[PgServer],
    ) -> Result<(), ClusterError> {
        let expected = replicas.len();
        if expected == 0 {
            return Ok(());
        }
        let deadline = Instant::now() + STREAMING_TIMEOUT;
        loop {
            let observed = match self.psql(
                primary.port,
                SUPERUSER,
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
            ) {
                Ok(count) if count.parse::<usize>() == Ok(expected) => return Ok(()),
                Ok(count) => format!("{count} streaming"),
                Err(err) => err.to_string(),
            };
            if Instant::now() >= deadline {
                let logs = replicas
                    .iter()
                    .map(|replica| {
                        format!(
                            "--- last lines of {} ---\n{}",
                            replica.log.display(),
                            tail_lines(&read_lossy(&replica.log), LOG_TAIL_LINES)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(ClusterError::ReplicationTimeout {
                    shard: primary.name.clone(),
                    expected,
                    observed,
                    timeout: STREAMING_TIMEOUT,
                    logs,
                });
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Builds shard `index`: primary, application role and database, replicas, streaming check.
/// `ports` holds one reservation for the primary followed by one per replica.
fn start_shard(
    env: &PgEnv,
    spec: &ClusterSpec,
    index: usize,
    ports: Vec<TcpListener>,
) -> Result<ShardServers, ClusterError> {
    let mut ports = ports.into_iter();
    let mut next_port = || {
        ports
            .next()
            .expect("invariant: one port reservation per server of the shard")
    };

    let name = format!("shard{index}-primary");
    env.init_primary(spec, &env.dir.join(&name))?;
    let primary = env.start_new_server(name, next_port())?;
    env.psql(primary.port, SUPERUSER, &setup_sql(spec))?;

    let mut replicas = Vec::with_capacity(spec.replicas);
    for replica in 1..=spec.replicas {
        let name = format!("shard{index}-replica{replica}");
        let slot = format!("shard{index}_replica{replica}");
        env.base_backup(&primary, &env.dir.join(&name), &slot)?;
        replicas.push(env.start_new_server(name, next_port())?);
    }
    env.wait_for_streaming(&primary, &replicas)?;
    Ok(ShardServers { primary, replicas })
}

/// SQL run once per primary as the superuser (in database `postgres`).
fn setup_sql(spec: &ClusterSpec) -> String {
    let user = quote_ident(&spec.user);
    let database = quote_ident(&spec.database);
    let create_database = if spec.database == SUPERUSER {
        // `postgres` already exists; just hand it over.
        format!("ALTER DATABASE {database} OWNER TO {user};")
    } else {
        format!("CREATE DATABASE {database} OWNER {user};")
    };
    // pg_signal_backend lets the role cancel/terminate backends of other non-superusers, and
    // pg_monitor lets it read pg_stat_activity / pg_stat_replication in full.
    format!(
        "CREATE ROLE {user} LOGIN PASSWORD {password};\n\
         GRANT pg_monitor, pg_signal_backend TO {user};\n\
         {create_database}\n",
        password = quote_literal(&spec.password),
    )
}

/// Settings appended to a primary's postgresql.conf (replicas inherit them via the base backup).
fn primary_conf(socket_dir: &Path, replicas: usize) -> String {
    // Headroom beyond the replicas for tests that add their own logical slots / senders.
    let senders = (replicas + 4).max(10);
    format!(
        "\n# --- tessera local cluster ---\n\
         listen_addresses = '127.0.0.1'\n\
         unix_socket_directories = {socket_dir}\n\
         wal_level = logical\n\
         max_prepared_transactions = 32\n\
         max_wal_senders = {senders}\n\
         max_replication_slots = {senders}\n\
         hot_standby = on\n\
         max_connections = 200\n\
         shared_buffers = 32MB\n\
         password_encryption = 'scram-sha-256'\n\
         # durability is pointless for a throwaway cluster; speed matters\n\
         fsync = off\n\
         synchronous_commit = off\n\
         full_page_writes = off\n",
        socket_dir = conf_string(&socket_dir.to_string_lossy()),
    )
}

/// Complete pg_hba.conf: trust on the socket (superuser tooling, replication) and for
/// replication over loopback, scram-sha-256 for every other TCP login (the application role).
fn pg_hba_conf() -> &'static str {
    "# TYPE  DATABASE     USER  ADDRESS        METHOD\n\
     local   all          all                  trust\n\
     local   replication  all                  trust\n\
     host    replication  all   127.0.0.1/32   trust\n\
     host    all          all   127.0.0.1/32   scram-sha-256\n"
}

/// Creates the cluster directory with a short path (unix socket paths are limited) and, when
/// the servers run as `postgres`, hands it to that user.
fn make_cluster_dir(run_as: Option<OsUser>) -> Result<tempfile::TempDir, ClusterError> {
    let mut base = std::env::temp_dir();
    // ".s.PGSQL.65535.lock" plus a separator and the tempfile name (~20 bytes).
    if base.as_os_str().len() + 40 > MAX_SOCKET_PATH {
        base = PathBuf::from("/tmp");
    }
    let temp = tempfile::Builder::new()
        .prefix("tessera-")
        .tempdir_in(&base)
        .map_err(io_error(format!(
            "creating a cluster directory in {}",
            base.display()
        )))?;
    if temp.path().as_os_str().len() + 20 > MAX_SOCKET_PATH {
        return Err(ClusterError::InvalidSpec(format!(
            "cluster directory {} is too long for unix socket paths",
            temp.path().display()
        )));
    }
    if let Some(user) = run_as {
        std::os::unix::fs::chown(temp.path(), Some(user.uid), Some(user.gid)).map_err(io_error(
            format!("chown of {} to postgres", temp.path().display()),
        ))?;
    }
    Ok(temp)
}

/// Binds 127.0.0.1:0 to let the kernel pick a free port; the listener holds it until dropped.
fn reserve_port() -> Result<TcpListener, ClusterError> {
    TcpListener::bind(("127.0.0.1", 0)).map_err(io_error("reserving a TCP port on 127.0.0.1"))
}

/// Finds a directory with the PostgreSQL server programs: `$TESSERA_PG_BINDIR`, then
/// `pg_config --bindir`, then the directory of `initdb` on PATH (symlinks resolved), then the
/// highest version under `/usr/lib/postgresql/*/bin` (Debian/Ubuntu layout).
pub fn find_bin_dir() -> Result<PathBuf, ClusterError> {
    if let Some(dir) = std::env::var_os(BINDIR_ENV) {
        let dir = PathBuf::from(dir);
        return if has_server_programs(&dir) {
            Ok(dir)
        } else {
            Err(ClusterError::InvalidSpec(format!(
                "{BINDIR_ENV}={} does not contain {}",
                dir.display(),
                REQUIRED_PROGRAMS.join(", ")
            )))
        };
    }
    let from_pg_config = || {
        let mut cmd = Command::new("pg_config");
        cmd.arg("--bindir");
        run(cmd, None, HELPER_TIMEOUT, "pg_config --bindir")
            .ok()
            .map(|out| PathBuf::from(out.trim()))
    };
    let from_path = || {
        let path = std::env::var_os("PATH")?;
        let initdb = find_on_path("initdb", &path)?;
        // e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb: the symlink's own
        // directory usually lacks pg_basebackup and psql.
        let initdb = fs::canonicalize(&initdb).unwrap_or(initdb);
        initdb.parent().map(Path::to_path_buf)
    };
    let from_debian = || highest_versioned_bin_dir(Path::new("/usr/lib/postgresql"));
    let candidates: [&dyn Fn() -> Option<PathBuf>; 3] = [&from_pg_config, &from_path, &from_debian];
    candidates
        .iter()
        .filter_map(|candidate| candidate())
        .find(|dir| has_server_programs(dir))
        .ok_or(ClusterError::NoBinaries)
}

fn has_server_programs(dir: &Path) -> bool {
    REQUIRED_PROGRAMS
        .iter()
        .all(|program| dir.join(program).is_file())
}

/// First `name` in the `PATH`-style list `path` that is a file.
fn find_on_path(name: &str, path: &std::ffi::OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `<root>/<version>/bin` with the highest numeric version that contains `initdb`.
fn highest_versioned_bin_dir(root: &Path) -> Option<PathBuf> {
    fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let key = version_key(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((key, bin))
        })
        .max_by(|(a, _), (b, _)| a.cmp(b))
        .map(|(_, bin)| bin)
}

/// `"9.6"` -> `[9, 6]`, `"15"` -> `[15]`; `None` for non-version names. Compares so that
/// 9.6 < 10 < 15.
fn version_key(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// Effective uid of this process (Linux: /proc/self/status, else `id -u`).
fn effective_uid() -> Option<u32> {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| parse_status_euid(&status))
        .or_else(|| {
            let mut cmd = Command::new("id");
            cmd.arg("-u");
            run(cmd, None, HELPER_TIMEOUT, "id -u")
                .ok()?
                .trim()
                .parse()
                .ok()
        })
}

/// The effective uid from `/proc/<pid>/status` text (`Uid: real effective saved fs`).
fn parse_status_euid(status: &str) -> Option<u32> {
    let line = status.lines().find(|line| line.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Uid and gid of the `postgres` OS user (/etc/passwd, else `id`).
fn lookup_postgres_user() -> Result<OsUser, ClusterError> {
    if let Some(user) = fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| parse_passwd_ids(&passwd, SUPERUSER))
    {
        return Ok(user);
    }
    // Not in /etc/passwd (e.g. NSS/LDAP): ask `id`, which goes through NSS.
    let id = |flag: &str| -> Result<u32, ClusterError> {
        let mut cmd = Command::new("id");
        cmd.args([flag, SUPERUSER]);
        let out = run(cmd, None, HELPER_TIMEOUT, &format!("id {flag} {SUPERUSER}"))
            .map_err(|err| ClusterError::NoPostgresUser(err.to_string()))?;
        out.trim()
            .parse()
            .map_err(|_| ClusterError::NoPostgresUser(format!("`id {flag}` printed {out:?}")))
    };
    Ok(OsUser {
        uid: id("-u")?,
        gid: id("-g")?,
    })
}

/// `(uid, gid)` of `user` in passwd-format text.
fn parse_passwd_ids(passwd: &str, user: &str) -> Option<OsUser> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != user {
            return None;
        }
        let _password = fields.next()?;
        Some(OsUser {
            uid: fields.next()?.parse().ok()?,
            gid: fields.next()?.parse().ok()?,
        })
    })
}

/// Last resort when `pg_ctl stop` fails: SIGKILL the postmaster named in `postmaster.pid`.
fn kill_postmaster(data_dir: &Path) {
    let pid = read_lossy(&data_dir.join("postmaster.pid"))
        .lines()
        .next()
        .and_then(|line| line.trim().parse::<u32>().ok());
    let Some(pid) = pid else {
        return;
    };
    let mut cmd = Command::new("kill");
    cmd.args(["-KILL", &pid.to_string()]);
    if let Err(err) = run(cmd, None, HELPER_TIMEOUT, &format!("kill -KILL {pid}")) {
        eprintln!("tessera cluster: {err}");
    }
}

fn is_replica_dir(dir: &Path) -> bool {
    dir.file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name.contains("-replica"))
}

fn is_port_conflict(log: &str) -> bool {
    log.contains("Address already in use")
}

fn keep_requested(value: Option<&str>) -> bool {
    matches!(value, Some("1" | "true" | "yes"))
}

/// Runs `cmd` with optional `stdin` text, killing it after `timeout`; returns stdout on
/// success. Output is drained on separate threads so a chatty program cannot block on a full pipe.
fn run(
    mut cmd: Command,
    stdin: Option<&str>,
    timeout: Duration,
    what: &str,
) -> Result<String, ClusterError> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(io_error(format!(
        "starting {what} ({:?})",
        cmd.get_program()
    )))?;

    if let (Some(mut pipe), Some(text)) = (child.stdin.take(), stdin) {
        let text = text.to_owned();
        // Dropping the pipe at the end of the thread closes stdin (psql then runs the script).
        thread::spawn(move || {
            let _ = pipe.write_all(text.as_bytes());
        });
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());

    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ClusterError::CommandTimeout {
                    what: what.to_owned(),
                    timeout,
                });
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(source) => {
                return Err(ClusterError::Io {
                    context: format!("waiting for {what}"),
                    source,
                });
            }
        }
    };
    // A grandchild that inherited the pipes (should not happen: pg_ctl points the postmaster's
    // output at the log file) must not hang us, so collection is bounded too.
    let collect = |rx: mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| String::from("<output not collected>"))
    };
    let stdout = collect(stdout);
    let stderr = collect(stderr);
    if status.success() {
        Ok(stdout)
    } else {
        Err(ClusterError::CommandFailed {
            what: what.to_owned(),
            status: status.to_string(),
            output: format!("{}{}", stderr.trim_end(), prefixed_stdout(&stdout)),
        })
    }
}

fn prefixed_stdout(stdout: &str) -> String {
    if stdout.trim().is_empty() {
        String::new()
    } else {
        format!("\nstdout:\n{}", stdout.trim_end())
    }
}

/// Reads a pipe to the end on a thread; the text arrives on the returned channel.
fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
    });
    rx
}

fn append_file(path: &Path, text: &str) -> Result<(), ClusterError> {
    fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(io_error(format!("appending to {}", path.display())))
}

/// File contents for error messages; a missing log is described, not an error.
fn read_lossy(path: &Path) -> String {
    read_lossy_from(path, 0)
}

fn read_lossy_from(path: &Path, offset: u64) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            String::from_utf8_lossy(&bytes[start..]).into_owned()
        }
        Err(err) => format!("<cannot read {}: {err}>", path.display()),
    }
}

/// The last `n` lines of `text`.
fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// SQL identifier quoting: `a"b` -> `"a""b"`.
fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// SQL string literal quoting (standard_conforming_strings, the default): `it's` -> `'it''s'`.
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// postgresql.conf string quoting: unlike SQL, the config parser treats backslash as an escape.
fn conf_string(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

/// A libpq conninfo value, quoted when it contains spaces, quotes or backslashes.
fn conninfo_value(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '\'' || c == '\\');
    if plain {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_is_two_by_one_app() {
        let spec = ClusterSpec::default();
        assert_eq!((spec.shards, spec.replicas), (2, 1));
        assert_eq!(
            (
                spec.user.as_str(),
                spec.password.as_str(),
                spec.database.as_str()
            ),
            ("app", "app", "app")
        );
        spec.validate().expect("default spec is valid");
    }

    #[test]
    fn spec_validation_rejects_unrealizable_specs() {
        let bad = [
            ClusterSpec {
                shards: 0,
                ..ClusterSpec::default()
            },
            ClusterSpec {
                user: "postgres".into(),
                ..ClusterSpec::default()
            },
            ClusterSpec {
                password: String::new(),
                ..ClusterSpec::default()
            },
            ClusterSpec {
                database: "template1".into(),
                ..ClusterSpec::default()
            },
        ];
        for spec in bad {
            assert!(
                matches!(spec.validate(), Err(ClusterError::InvalidSpec(_))),
                "{spec:?}"
            );
        }
        let no_replicas = ClusterSpec {
            replicas: 0,
            ..ClusterSpec::default()
        };
        no_replicas.validate().expect("replicas may be 0");
    }

    #[test]
    fn version_keys_order_numerically() {
        assert!(version_key("9.6") < version_key("10"));
        assert!(version_key("10") < version_key("15"));
        assert!(version_key("15") < version_key("16"));
        assert_eq!(version_key("main"), None);
        assert_eq!(version_key(""), None);
    }

    fn touch(path: &Path) {
        fs::create_dir_all(path.parent().expect("has parent")).expect("mkdir");
        fs::write(path, "").expect("write");
    }

    #[test]
    fn highest_versioned_bin_dir_picks_highest_version_with_initdb() {
        let root = tempfile::tempdir().expect("tempdir");
        touch(&root.path().join("9.6/bin/initdb"));
        touch(&root.path().join("10/bin/initdb"));
        touch(&root.path().join("15/bin/initdb"));
        // Client-only install (no initdb) and a non-version entry are ignored.
        touch(&root.path().join("17/bin/psql"));
        touch(&root.path().join("common/bin/initdb"));
        assert_eq!(
            highest_versioned_bin_dir(root.path()),
            Some(root.path().join("15/bin"))
        );
        assert_eq!(
            highest_versioned_bin_dir(&root.path().join("missing")),
            None
        );
    }

    #[test]
    fn find_on_path_takes_first_match() {
        let root = tempfile::tempdir().expect("tempdir");
        touch(&root.path().join("b/initdb"));
        touch(&root.path().join("c/initdb"));
        let path = std::env::join_paths([
            root.path().join("a"),
            root.path().join("b"),
            root.path().join("c"),
        ])
        .expect("join paths");
        assert_eq!(
            find_on_path("initdb", &path),
            Some(root.path().join("b/initdb"))
        );
        assert_eq!(find_on_path("pg_ctl", &path), None);
    }

    #[test]
    fn server_programs_check_requires_all_programs() {
        let root = tempfile::tempdir().expect("tempdir");
        touch(&root.path().join("initdb"));
        assert!(!has_server_programs(root.path()));
        for program in REQUIRED_PROGRAMS {
            touch(&root.path().join(program));
        }
        assert!(has_server_programs(root.path()));
    }

    #[test]
    fn parses_effective_uid_from_proc_status() {
        let status = "Name:\tcargo\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(parse_status_euid(status), Some(0));
        assert_eq!(parse_status_euid("Name:\tx\n"), None);
    }

    #[test]
    fn parses_passwd_entries() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgresql:x:5:5::/:/bin/false\n\
                      postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        assert_eq!(
            parse_passwd_ids(passwd, "postgres"),
            Some(OsUser { uid: 101, gid: 104 })
        );
        assert_eq!(parse_passwd_ids(passwd, "nobody"), None);
        assert_eq!(parse_passwd_ids("postgres:x:abc:1:::\n", "postgres"), None);
    }

    #[test]
    fn tail_keeps_last_lines() {
        let text = (1..=30)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        let tail = tail_lines(&text, 20);
        assert_eq!(tail.lines().next(), Some("11"));
        assert_eq!(tail.lines().count(), 20);
        assert_eq!(tail_lines("a\nb", 20), "a\nb");
        assert_eq!(tail_lines("", 20), "");
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(conf_string("a\\b'c"), "'a\\\\b''c'");
        assert_eq!(conninfo_value("/tmp/tessera-x"), "/tmp/tessera-x");
        assert_eq!(conninfo_value("a b"), "'a b'");
        assert_eq!(conninfo_value("it's\\"), "'it\\'s\\\\'");
        assert_eq!(conninfo_value(""), "''");
    }

    #[test]
    fn setup_sql_creates_role_grants_and_database() {
        let sql = setup_sql(&ClusterSpec::default());
        assert!(sql.contains("CREATE ROLE \"app\" LOGIN PASSWORD 'app';"));
        assert!(sql.contains("GRANT pg_monitor, pg_signal_backend TO \"app\";"));
        assert!(sql.contains("CREATE DATABASE \"app\" OWNER \"app\";"));
        let in_postgres = setup_sql(&ClusterSpec {
            database: "postgres".into(),
            ..ClusterSpec::default()
        });
        assert!(in_postgres.contains("ALTER DATABASE \"postgres\" OWNER TO \"app\";"));
    }

    #[test]
    fn primary_conf_has_required_settings() {
        let conf = primary_conf(Path::new("/tmp/tessera-abc"), 1);
        for setting in [
            "wal_level = logical",
            "max_wal_senders = 10",
            "max_replication_slots = 10",
            "hot_standby = on",
            "listen_addresses = '127.0.0.1'",
            "unix_socket_directories = '/tmp/tessera-abc'",
            "fsync = off",
            "password_encryption = 'scram-sha-256'",
        ] {
            assert!(conf.contains(setting), "missing {setting}");
        }
        assert!(primary_conf(Path::new("/t"), 12).contains("max_wal_senders = 16"));
    }

    #[test]
    fn small_predicates() {
        assert!(is_replica_dir(Path::new("/tmp/x/shard0-replica1")));
        assert!(!is_replica_dir(Path::new("/tmp/x/shard0-primary")));
        assert!(is_port_conflict(
            "LOG:  could not bind IPv4 address \"127.0.0.1\": Address already in use"
        ));
        assert!(keep_requested(Some("1")));
        assert!(!keep_requested(Some("0")));
        assert!(!keep_requested(None));
    }

    #[test]
    fn run_reports_failure_output_and_timeouts() {
        let mut ok = Command::new("sh");
        ok.args(["-c", "cat"]);
        assert_eq!(
            run(ok, Some("hello"), Duration::from_secs(5), "cat").expect("cat"),
            "hello"
        );

        let mut fail = Command::new("sh");
        fail.args(["-c", "echo boom >&2; exit 3"]);
        let err = run(fail, None, Duration::from_secs(5), "failing sh").expect_err("fails");
        let text = err.to_string();
        assert!(
            text.contains("failing sh failed") && text.contains("boom"),
            "{text}"
        );

        let mut slow = Command::new("sleep");
        slow.arg("5");
        let started = Instant::now();
        let err = run(slow, None, Duration::from_millis(200), "sleep").expect_err("times out");
        assert!(matches!(err, ClusterError::CommandTimeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
