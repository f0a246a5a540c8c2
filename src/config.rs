//! `shard-map.yaml`: the config types, their defaults, `${VAR}` expansion and `validate()`.
//!
//! This is the only module that touches YAML, so the YAML crate can be swapped without touching
//! anything else. Unknown fields are rejected so a typo never silently falls back to a default.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a config could not be loaded. Every message names the file, variable or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var} is not set (referenced as ${{{var}}} in the config)")]
    Env { var: String },
    #[error("invalid config: {field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// The whole map. Field names are public contract (DESIGN.md section 10): extend, never rename.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// The logical database name clients ask for.
    pub database: String,
    /// How clients prove who they are: `scram-sha-256` (default), `md5` or `plain`.
    #[serde(default)]
    pub auth_method: AuthMethod,
    /// Who may log in to the proxy.
    pub users: Vec<User>,
    /// Threads serving clients: 0 = automatic (one on machines with up to two cores, else one
    /// per core); 1 = a single thread, like PgBouncer.
    #[serde(default)]
    pub workers: usize,
    /// This proxy's identity: part of every global id and two-phase transaction id it makes;
    /// every proxy sharing shards needs its own (0..=1023).
    #[serde(default)]
    pub node_id: u16,
    /// How the proxy logs in to every shard server.
    pub backend: Backend,
    #[serde(default)]
    pub pool: Pool,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub routing: Routing,
    #[serde(default)]
    pub sharding: Sharding,
    #[serde(default)]
    pub two_phase: TwoPhase,
    pub shards: Vec<Shard>,
}

/// The highest `node_id`: global ids keep 10 bits for it (see `ids`).
pub const MAX_NODE_ID: u16 = 1023;

fn default_listen() -> String {
    "127.0.0.1:6432".to_string()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum AuthMethod {
    #[default]
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "plain")]
    Plain,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// Plaintext, or a SCRAM verifier (`SCRAM-SHA-256$iter:salt$stored:server`) as Postgres stores
    /// it in `pg_authid`, so the proxy need not hold the plaintext (scram-sha-256 only).
    pub password: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub user: String,
    pub password: String,
    pub database: String,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A client holds a server connection only inside a transaction (or for one statement).
    #[default]
    Transaction,
    /// A client keeps one server connection for its whole session.
    Session,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    #[serde(default)]
    pub mode: PoolMode,
    /// Server connections per shard server.
    #[serde(default = "default_pool_size")]
    pub size: u32,
    /// Connections kept open even when idle.
    #[serde(default)]
    pub min_idle: u32,
    /// Time allowed to open and authenticate one server connection.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time a client waits for a free server connection before it gets an error.
    #[serde(default = "default_checkout_timeout_ms")]
    pub checkout_timeout_ms: u64,
    /// Idle server connections are closed after this long (0 = never).
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

fn default_pool_size() -> u32 {
    20
}
fn default_connect_timeout_ms() -> u64 {
    3_000
}
fn default_checkout_timeout_ms() -> u64 {
    5_000
}
fn default_idle_timeout_ms() -> u64 {
    600_000
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            mode: PoolMode::default(),
            size: default_pool_size(),
            min_idle: 0,
            connect_timeout_ms: default_connect_timeout_ms(),
            checkout_timeout_ms: default_checkout_timeout_ms(),
            idle_timeout_ms: default_idle_timeout_ms(),
        }
    }
}

impl Pool {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn checkout_timeout(&self) -> Duration {
        Duration::from_millis(self.checkout_timeout_ms)
    }
}

/// Guards against clients that send absurd messages.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest single protocol message accepted from a client, in bytes.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    /// Client connections accepted at once; more get `53300 too_many_connections`.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Most groups (GROUP BY), distinct rows (DISTINCT) or buffered rows a cross-shard merge may
    /// hold; more is an error (54000) rather than unbounded memory.
    #[serde(default = "default_max_merge_rows")]
    pub max_merge_rows: usize,
}

fn default_max_message_size() -> usize {
    64 * 1024 * 1024
}
fn default_max_clients() -> usize {
    1000
}
fn default_max_merge_rows() -> usize {
    1_000_000
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_size: default_max_message_size(),
            max_clients: default_max_clients(),
            max_merge_rows: default_max_merge_rows(),
        }
    }
}

/// Atomic commit of transactions that write on several shards.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TwoPhase {
    /// A transaction writing on several shards commits with PREPARE TRANSACTION / COMMIT
    /// PREPARED; when false such a transaction gets `0A000`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The durable decision log: appended and fsynced before phase two; read at startup to
    /// finish in-doubt transactions. A relative path is relative to the working directory.
    #[serde(default = "default_two_phase_log")]
    pub log: PathBuf,
    /// While running, how often the proxy looks for its in-doubt prepared transactions older
    /// than this (left by a session that lost a shard connection mid-commit) and finishes them.
    #[serde(default = "default_resolve_interval_ms")]
    pub resolve_interval_ms: u64,
}

fn default_resolve_interval_ms() -> u64 {
    30_000
}

fn default_two_phase_log() -> PathBuf {
    PathBuf::from("tessera-2pc.log")
}

impl Default for TwoPhase {
    fn default() -> Self {
        TwoPhase {
            enabled: true,
            log: default_two_phase_log(),
            resolve_interval_ms: default_resolve_interval_ms(),
        }
    }
}

/// How reads are spread over replicas and when a replica is trusted.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// Send eligible reads to replicas (false: everything goes to primaries).
    #[serde(default = "yes")]
    pub replica_reads: bool,
    /// How a read picks among healthy replicas.
    #[serde(default)]
    pub load_balance: LoadBalance,
    /// A replica further behind its primary than this leaves the read rotation.
    #[serde(default = "default_max_replica_lag_ms")]
    pub max_replica_lag_ms: u64,
    /// How often every server is probed.
    #[serde(default = "default_health_check_interval_ms")]
    pub health_check_interval_ms: u64,
    /// After a session commits a write on a shard, its reads there go to a replica only once
    /// that replica has replayed the commit.
    #[serde(default = "yes")]
    pub read_your_writes: bool,
}

fn yes() -> bool {
    true
}
fn default_max_replica_lag_ms() -> u64 {
    5_000
}
fn default_health_check_interval_ms() -> u64 {
    1_000
}

impl Default for Routing {
    fn default() -> Self {
        Routing {
            replica_reads: true,
            load_balance: LoadBalance::default(),
            max_replica_lag_ms: default_max_replica_lag_ms(),
            health_check_interval_ms: default_health_check_interval_ms(),
            read_your_writes: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalance {
    #[default]
    RoundRobin,
    /// The replica with the fewest statements in flight from this proxy.
    LeastBusy,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Hash,
    Range,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Sharding {
    #[serde(default)]
    pub strategy: Strategy,
    /// Hash only: virtual nodes per shard on the ring.
    #[serde(default = "default_vnodes")]
    pub vnodes: u32,
    /// Sharded table -> its key column.
    #[serde(default)]
    pub tables: BTreeMap<String, String>,
    /// Tables with an identical copy on every shard.
    #[serde(default)]
    pub reference_tables: Vec<String>,
}

fn default_vnodes() -> u32 {
    256
}

impl Default for Sharding {
    fn default() -> Self {
        Sharding {
            strategy: Strategy::default(),
            vnodes: default_vnodes(),
            tables: BTreeMap::new(),
            reference_tables: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    /// Part of hash placement: renaming a shard moves data.
    pub name: String,
    /// `host:port` of the primary.
    pub primary: String,
    #[serde(default)]
    pub replicas: Vec<String>,
    /// Range strategy only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<Range>,
}

/// Half-open `[from, to)`; an absent bound is unbounded.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Range {
    #[serde(default)]
    pub from: Option<i64>,
    #[serde(default)]
    pub to: Option<i64>,
}

// === impl Config ===

impl Config {
    /// Reads, expands `${VAR}`, parses and validates a config file.
    ///
    /// # Errors
    /// A one-line reason naming the file, the variable or the field at fault.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_yaml(&text, path)
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Config, Error> {
        let parse_error = |e: yaml_serde::Error| Error::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().replace('\n', " "),
        };
        // Expand variables in values only, so a `${...}` in a comment means nothing.
        let mut value: yaml_serde::Value = yaml_serde::from_str(text).map_err(parse_error)?;
        expand_values(&mut value, &|var| std::env::var(var).ok())?;
        let config: Config = yaml_serde::from_value(value).map_err(parse_error)?;
        config.validate()?;
        Ok(config)
    }

    /// Renders the config back to YAML (used by `tessera demo` to show the map it serves).
    pub fn to_yaml(&self) -> String {
        yaml_serde::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    /// Checks everything serde cannot: addresses, uniqueness, strategy-specific fields.
    ///
    /// # Errors
    /// The first problem found, naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        self.listen.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "listen",
                format!("{:?} is not host:port ({e})", self.listen),
            )
        })?;
        if self.database.is_empty() {
            return Err(invalid("database", "must not be empty"));
        }
        if self.database == "tessera" {
            return Err(invalid(
                "database",
                "\"tessera\" is reserved for the admin database",
            ));
        }
        if self.users.is_empty() {
            return Err(invalid("users", "at least one user is required"));
        }
        let mut names = HashSet::new();
        for (i, user) in self.users.iter().enumerate() {
            if user.name.is_empty() {
                return Err(invalid(format!("users[{i}].name"), "must not be empty"));
            }
            if !names.insert(&user.name) {
                return Err(invalid(
                    format!("users[{i}].name"),
                    format!("duplicate user {:?}", user.name),
                ));
            }
            let is_verifier = user.password.starts_with("SCRAM-SHA-256$");
            if is_verifier && self.auth_method != AuthMethod::ScramSha256 {
                return Err(invalid(
                    format!("users[{i}].password"),
                    "a SCRAM verifier only works with auth_method: scram-sha-256",
                ));
            }
            if is_verifier && crate::frontend::auth::ScramVerifier::parse(&user.password).is_none()
            {
                return Err(invalid(
                    format!("users[{i}].password"),
                    "malformed SCRAM verifier",
                ));
            }
        }
        if self.backend.user.is_empty() {
            return Err(invalid("backend.user", "must not be empty"));
        }
        if self.backend.database.is_empty() {
            return Err(invalid("backend.database", "must not be empty"));
        }
        if self.pool.size == 0 {
            return Err(invalid("pool.size", "must be at least 1"));
        }
        if self.pool.min_idle > self.pool.size {
            return Err(invalid("pool.min_idle", "must not exceed pool.size"));
        }
        if self.pool.connect_timeout_ms == 0 {
            return Err(invalid("pool.connect_timeout_ms", "must be positive"));
        }
        if self.pool.checkout_timeout_ms == 0 {
            return Err(invalid("pool.checkout_timeout_ms", "must be positive"));
        }
        if self.limits.max_message_size < 1024 {
            return Err(invalid(
                "limits.max_message_size",
                "must be at least 1024 bytes",
            ));
        }
        if self.routing.health_check_interval_ms == 0 {
            return Err(invalid(
                "routing.health_check_interval_ms",
                "must be positive",
            ));
        }
        if self.limits.max_clients == 0 {
            return Err(invalid("limits.max_clients", "must be at least 1"));
        }
        if self.limits.max_merge_rows == 0 {
            return Err(invalid("limits.max_merge_rows", "must be at least 1"));
        }
        if self.node_id > MAX_NODE_ID {
            return Err(invalid(
                "node_id",
                format!("{} is out of range 0..={MAX_NODE_ID}", self.node_id),
            ));
        }
        if self.two_phase.enabled && self.two_phase.log.as_os_str().is_empty() {
            return Err(invalid(
                "two_phase.log",
                "must name a file when two_phase.enabled is true",
            ));
        }
        self.validate_sharding()
    }

    fn validate_sharding(&self) -> Result<(), Error> {
        if self.shards.is_empty() {
            return Err(invalid("shards", "at least one shard is required"));
        }
        let mut names = HashSet::new();
        for (i, shard) in self.shards.iter().enumerate() {
            if shard.name.is_empty() {
                return Err(invalid(format!("shards[{i}].name"), "must not be empty"));
            }
            if !names.insert(&shard.name) {
                return Err(invalid(
                    format!("shards[{i}].name"),
                    format!("duplicate shard {:?}", shard.name),
                ));
            }
            parse_host_port(&shard.primary)
                .map_err(|reason| invalid(format!("shards[{i}].primary"), reason))?;
            for (j, replica) in shard.replicas.iter().enumerate() {
                parse_host_port(replica)
                    .map_err(|reason| invalid(format!("shards[{i}].replicas[{j}]"), reason))?;
            }
            match (self.sharding.strategy, shard.range) {
                (Strategy::Hash, Some(_)) => {
                    return Err(invalid(
                        format!("shards[{i}].range"),
                        "only allowed with sharding.strategy: range",
                    ));
                }
                (Strategy::Range, None) => {
                    return Err(invalid(
                        format!("shards[{i}].range"),
                        "required with sharding.strategy: range",
                    ));
                }
                (
                    Strategy::Range,
                    Some(Range {
                        from: Some(from),
                        to: Some(to),
                    }),
                ) if from >= to => {
                    return Err(invalid(
                        format!("shards[{i}].range"),
                        format!("from ({from}) must be less than to ({to})"),
                    ));
                }
                _ => {}
            }
        }
        if self.sharding.strategy == Strategy::Hash && self.sharding.vnodes == 0 {
            return Err(invalid("sharding.vnodes", "must be at least 1"));
        }
        match self.sharding.strategy {
            Strategy::Hash => {
                let names: Vec<String> = self.shards.iter().map(|s| s.name.clone()).collect();
                crate::router::hash::Ring::new(&names, self.sharding.vnodes)
                    .map_err(|e| invalid("sharding.vnodes", e.to_string()))?;
            }
            Strategy::Range => {
                let spans: Vec<(Option<i64>, Option<i64>)> = self
                    .shards
                    .iter()
                    .map(|s| s.range.map_or((None, None), |r| (r.from, r.to)))
                    .collect();
                crate::router::range::Ranges::new(&spans)
                    .map_err(|e| invalid("shards[].range", e))?;
            }
        }
        for (table, column) in &self.sharding.tables {
            if table.is_empty() || column.is_empty() {
                return Err(invalid(
                    format!("sharding.tables.{table}"),
                    "table and key column must be named",
                ));
            }
            if self.sharding.reference_tables.contains(table) {
                return Err(invalid(
                    format!("sharding.tables.{table}"),
                    "a table cannot be both sharded and a reference table",
                ));
            }
        }
        Ok(())
    }

    /// Finds a proxy user by name.
    pub fn user(&self, name: &str) -> Option<&User> {
        self.users.iter().find(|u| u.name == name)
    }
}

/// Splits `host:port`, the form every server address in the map takes.
///
/// # Errors
/// A reason fit for a config error.
pub fn parse_host_port(addr: &str) -> Result<(String, u16), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not host:port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{addr:?} has no host"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("{addr:?} has an invalid port"))?;
    if port == 0 {
        return Err(format!("{addr:?} has port 0"));
    }
    Ok((host.to_string(), port))
}

/// Expands `${VAR}` in every string value of a YAML tree.
fn expand_values(
    value: &mut yaml_serde::Value,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), Error> {
    match value {
        yaml_serde::Value::String(s) if s.contains("${") => *s = expand_env(s, lookup)?,
        yaml_serde::Value::Sequence(items) => {
            for item in items {
                expand_values(item, lookup)?;
            }
        }
        yaml_serde::Value::Mapping(map) => {
            for (_, item) in map.iter_mut() {
                expand_values(item, lookup)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Replaces every `${VAR}` with the variable's value; `$$` is not special, a lone `$` stays.
fn expand_env(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, Error> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(invalid("${...}", "unterminated ${ in the config"));
        };
        let var = &after[..end];
        let value = lookup(var).ok_or_else(|| Error::Env {
            var: var.to_string(),
        })?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
listen: "127.0.0.1:6432"
database: app
users:
  - name: app
    password: app
backend:
  user: app
  password: app
  database: app
pool:
  mode: transaction
  size: 20
sharding:
  strategy: hash
  vnodes: 256
  tables:
    users: id
    orders: user_id
  reference_tables: [countries]
shards:
  - name: s0
    primary: "127.0.0.1:5432"
    replicas: ["127.0.0.1:5433"]
  - name: s1
    primary: "127.0.0.1:5442"
    replicas: ["127.0.0.1:5443"]
"#;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::from_yaml(text, Path::new("test.yaml"))
    }

    #[test]
    fn design_example_parses() {
        let c = parse(EXAMPLE).expect("example parses");
        assert_eq!(c.shards.len(), 2);
        assert_eq!(c.pool.mode, PoolMode::Transaction);
        assert_eq!(c.sharding.tables["orders"], "user_id");
        assert_eq!(c.auth_method, AuthMethod::ScramSha256);
    }

    #[test]
    fn shipped_shard_map_parses() {
        let text = include_str!("../shard-map.yaml");
        parse(text).expect("shard-map.yaml is valid");
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let text = EXAMPLE.replace("  size: 20", "  size: 20\n  sise: 3");
        let err = parse(&text).expect_err("typo rejected").to_string();
        assert!(err.contains("sise"), "{err}");
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            (EXAMPLE.replace("size: 20", "size: 0"), "pool.size"),
            (
                EXAMPLE.replace("\"127.0.0.1:5442\"", "\"nohost\""),
                "shards[1].primary",
            ),
            (EXAMPLE.replace("name: s1", "name: s0"), "shards[1].name"),
            (
                EXAMPLE.replace("listen: \"127.0.0.1:6432\"", "listen: \"x\""),
                "listen",
            ),
            (
                EXAMPLE.replace(
                    "    replicas: [\"127.0.0.1:5443\"]",
                    "    range: { from: 5 }",
                ),
                "shards[1].range",
            ),
            (
                EXAMPLE.replace("users: id", "countries: id"),
                "sharding.tables.countries",
            ),
        ];
        for (text, field) in cases {
            let err = parse(&text).expect_err(field).to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn range_bounds_are_checked() {
        let text = EXAMPLE
            .replace("strategy: hash", "strategy: range")
            .replace(
                "    replicas: [\"127.0.0.1:5433\"]",
                "    range: { from: 10, to: 5 }",
            )
            .replace(
                "    replicas: [\"127.0.0.1:5443\"]",
                "    range: { from: 10 }",
            );
        let err = parse(&text).expect_err("from >= to").to_string();
        assert!(err.contains("shards[0].range"), "{err}");
    }

    #[test]
    fn env_vars_expand_and_missing_ones_are_named() {
        let lookup = |v: &str| (v == "PW").then(|| "secret".to_string());
        assert_eq!(
            expand_env("a: ${PW} $x", &lookup).expect("expands"),
            "a: secret $x"
        );
        let err = expand_env("a: ${NOPE}", &lookup).expect_err("missing");
        assert!(err.to_string().contains("NOPE"));
        assert!(expand_env("a: ${PW", &lookup).is_err());
    }

    #[test]
    fn node_id_two_phase_and_merge_limit_defaults() {
        let c = parse(EXAMPLE).expect("example parses");
        assert_eq!(c.node_id, 0);
        assert!(c.two_phase.enabled);
        assert_eq!(c.two_phase.log, PathBuf::from("tessera-2pc.log"));
        assert_eq!(c.limits.max_merge_rows, 1_000_000);
        assert_eq!(c.two_phase, TwoPhase::default());
    }

    #[test]
    fn node_id_two_phase_and_merge_limit_parse() {
        let text = format!(
            "node_id: 1023\ntwo_phase:\n  enabled: false\n  log: /var/lib/tessera/2pc.log\n\
             limits:\n  max_merge_rows: 5\n{EXAMPLE}"
        );
        let c = parse(&text).expect("parses");
        assert_eq!(c.node_id, 1023);
        assert!(!c.two_phase.enabled);
        assert_eq!(c.two_phase.log, PathBuf::from("/var/lib/tessera/2pc.log"));
        assert_eq!(c.limits.max_merge_rows, 5);
        // A round trip through YAML keeps the new fields (`tessera demo` prints its map).
        assert_eq!(parse(&c.to_yaml()).expect("round trip"), c);
    }

    #[test]
    fn node_id_and_two_phase_are_validated() {
        let err = parse(&format!("node_id: 1024\n{EXAMPLE}"))
            .expect_err("node_id 1024")
            .to_string();
        assert!(err.contains("node_id"), "{err}");
        // Negative or beyond u16 already fails in serde.
        parse(&format!("node_id: -1\n{EXAMPLE}")).expect_err("node_id -1");
        parse(&format!("node_id: 65536\n{EXAMPLE}")).expect_err("node_id 65536");
        let err = parse(&format!("two_phase:\n  log: \"\"\n{EXAMPLE}"))
            .expect_err("empty log")
            .to_string();
        assert!(err.contains("two_phase.log"), "{err}");
        let err = parse(&format!("two_phase:\n  logg: x\n{EXAMPLE}"))
            .expect_err("typo")
            .to_string();
        assert!(err.contains("logg"), "{err}");
        let err = parse(&format!("limits:\n  max_merge_rows: 0\n{EXAMPLE}"))
            .expect_err("zero merge rows")
            .to_string();
        assert!(err.contains("limits.max_merge_rows"), "{err}");
    }

    #[test]
    fn host_port_parsing() {
        assert_eq!(parse_host_port("db:5432"), Ok(("db".into(), 5432)));
        assert_eq!(parse_host_port("[::1]:5432"), Ok(("::1".into(), 5432)));
        assert!(parse_host_port("db").is_err());
        assert!(parse_host_port("db:x").is_err());
        assert!(parse_host_port(":5432").is_err());
    }
}
