//! Routing: turns a statement (and its bind values) into a [`Plan`]: which shards, whether a
//! replica may serve it, and why. The relay only ever acts on a `Plan`.
//!
//! Analysis of a SQL text ([`analyze`]) is cached per distinct text; planning evaluates the
//! cached key expression against the bind values, which is cheap.

pub mod analyze;
pub mod hash;
pub mod lex;
pub mod params;
pub mod range;
pub mod rewrite;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::merge::{Count, MergeSpec};

use crate::config::{Config, Strategy};
use analyze::{Analysis, CopySpec, KeyExpr, KeySource, Route, Schema, TxCommand};
use hash::{Ring, ShardKey};
use params::Params;
use range::Ranges;

/// How many distinct statement texts keep their analysis; the cache starts over when full.
const CACHE_CAPACITY: usize = 10_000;

/// Index of a shard in the map's `shards` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub usize);

/// Where a statement runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fanout {
    /// Exactly one shard.
    One(ShardId),
    /// Several shards; rows are concatenated and command counts summed.
    Scatter(Vec<ShardId>),
    /// Every shard; one shard's reply stands for all (DDL, writes to reference tables).
    Broadcast,
}

/// The routing decision for one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub fanout: Fanout,
    /// A replica may serve it (the session still decides, from transaction state and health).
    pub replica_ok: bool,
    pub writes: bool,
    /// Transaction control: handled by the session, not by routing.
    pub tx: Option<TxCommand>,
    pub reason: Arc<str>,
    /// Several shards whose results need more than concatenation: the rewritten statement
    /// and how to merge its results.
    pub merge: Option<Arc<MergePlan>>,
    /// A multi-row INSERT split by shard: each shard's statement and parameters.
    pub split: Option<Arc<Vec<(ShardId, rewrite::SplitInsert)>>>,
    /// A COPY across shards: how its rows are read and split.
    pub copy: Option<Arc<CopySpec>>,
}

/// A statement rewritten for a scatter, with its LIMIT/OFFSET values resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergePlan {
    pub sql: Arc<str>,
    pub spec: Arc<MergeSpec>,
    pub limit: Option<u64>,
    pub offset: u64,
    /// Parameters `sql` does not use any more (declared as int8 if their type is open).
    pub dropped_params: Vec<usize>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shards = match &self.fanout {
            Fanout::One(s) => format!("shard {}", s.0),
            Fanout::Scatter(list) => format!(
                "shards {} (scatter, {})",
                list.iter()
                    .map(|s| s.0.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                match &self.merge {
                    Some(m) => format!("merged; each shard runs: {}", m.sql),
                    None => "rows concatenated".to_string(),
                }
            ),
            Fanout::Broadcast => "every shard (broadcast)".to_string(),
        };
        let role = if self.replica_ok {
            "replica"
        } else {
            "primary"
        };
        write!(f, "{shards}, {role}: {}", self.reason)
    }
}

/// Why a statement cannot be routed. Each maps to a SQLSTATE the client sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not supported across shards: {0}")]
    Unsupported(String),
    #[error("no shard owns key {key} of table {table} (sharding.strategy: range)")]
    NoShard { key: String, table: String },
    #[error("{0}")]
    BadKey(String),
    #[error("{} must not be negative", if *.offset { "OFFSET" } else { "LIMIT" })]
    NegativeCount { offset: bool },
}

impl Error {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Error::Unsupported(_) => "0A000",
            Error::NoShard { .. } => "22023",
            Error::BadKey(_) => "22P02",
            Error::NegativeCount { offset: false } => "2201W",
            Error::NegativeCount { offset: true } => "2201X",
        }
    }
}

#[derive(Debug)]
enum Placement {
    Hash(Ring),
    Range { ranges: Ranges },
}

/// A cached rewrite, or why the statement cannot be merged.
type RewriteResult = Result<Arc<rewrite::Rewritten>, String>;

/// Decides plans for one shard map.
#[derive(Debug)]
pub struct Router {
    schema: Schema,
    placement: Placement,
    shards: usize,
    passthrough: bool,
    cache: Mutex<HashMap<Box<str>, Arc<Analysis>>>,
    rewrites: Mutex<HashMap<Box<str>, RewriteResult>>,
}

impl Router {
    /// Builds the ring or the ranges of a (validated) config.
    ///
    /// # Errors
    /// Duplicate ring positions, overlapping ranges.
    pub fn new(config: &Config) -> Result<Router, String> {
        let schema = Schema::from_config(config);
        let placement = match config.sharding.strategy {
            Strategy::Hash => {
                let names: Vec<String> = config.shards.iter().map(|s| s.name.clone()).collect();
                Placement::Hash(
                    Ring::new(&names, config.sharding.vnodes).map_err(|e| e.to_string())?,
                )
            }
            Strategy::Range => {
                let spans: Vec<(Option<i64>, Option<i64>)> = config
                    .shards
                    .iter()
                    .map(|s| s.range.map_or((None, None), |r| (r.from, r.to)))
                    .collect();
                Placement::Range {
                    ranges: Ranges::new(&spans)
                        .map_err(|e| format!("invalid config: shards: {e}"))?,
                }
            }
        };
        let replicas = config.shards.iter().any(|s| !s.replicas.is_empty());
        Ok(Router {
            schema,
            placement,
            shards: config.shards.len(),
            passthrough: config.shards.len() == 1 && !(config.routing.replica_reads && replicas),
            cache: Mutex::new(HashMap::new()),
            rewrites: Mutex::new(HashMap::new()),
        })
    }

    /// One shard and no replica reads: every statement goes to the one primary and the proxy
    /// is a plain pooler, so statements need no analysis at all.
    pub fn passthrough(&self) -> bool {
        self.passthrough
    }

    /// The analysis of a simple-protocol query, shared by every query that differs only in its
    /// constants, and those constants (they play the part of bind values).
    pub fn analyze_simple(&self, sql: &str) -> (Arc<Analysis>, Vec<String>) {
        if let Some((normalized, literals)) = lex::normalize(sql) {
            let analysis = self.analyze(&normalized);
            if analysis.parsed {
                return (analysis, literals);
            }
        }
        (self.analyze(sql), Vec::new())
    }

    /// The (cached) analysis of a SQL text.
    pub fn analyze(&self, sql: &str) -> Arc<Analysis> {
        if let Some(found) = self.cache.lock().get(sql) {
            return found.clone();
        }
        let analysis = Arc::new(analyze::analyze(sql, &self.schema));
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(sql.into(), analysis.clone());
        analysis
    }

    /// The plan for an analyzed statement with its bind values (empty for simple queries).
    ///
    /// # Errors
    /// Statements that cannot run correctly where they would have to (`0A000`), keys outside
    /// every range, undecodable key parameters.
    pub fn plan(&self, analysis: &Analysis, params: &Params<'_>) -> Result<Plan, Error> {
        self.plan_sql(analysis, params, None)
    }

    /// Like [`Router::plan`], with the statement's text (`sql`), so a statement that needs
    /// merging across shards can be rewritten for them rather than refused.
    ///
    /// # Errors
    /// As [`Router::plan`].
    pub fn plan_sql(
        &self,
        analysis: &Analysis,
        params: &Params<'_>,
        sql: Option<&str>,
    ) -> Result<Plan, Error> {
        let mut plan = Plan {
            fanout: Fanout::One(ShardId(0)),
            replica_ok: analysis.replica_ok,
            writes: analysis.writes,
            tx: None,
            reason: analysis.reason.clone(),
            merge: None,
            split: None,
            copy: None,
        };
        if self.shards == 1 {
            // One shard holds everything: any statement runs there as on plain Postgres.
            if let Route::Tx(cmd) = analysis.route {
                plan.tx = Some(cmd);
            }
            return Ok(plan);
        }
        plan.fanout = match &analysis.route {
            Route::AnyShard => Fanout::One(ShardId(0)),
            Route::Tx(cmd) => {
                plan.tx = Some(*cmd);
                Fanout::One(ShardId(0))
            }
            Route::Reference if analysis.writes => Fanout::Broadcast,
            Route::Reference => Fanout::One(ShardId(0)),
            Route::Broadcast => Fanout::Broadcast,
            Route::Multi(parts) => Fanout::One(ShardId(self.one_shard_of(parts, params)?)),
            Route::Copy(spec) => {
                plan.copy = Some(spec.clone());
                if spec.to || spec.key.is_some() {
                    Fanout::Scatter((0..self.shards).map(ShardId).collect())
                } else {
                    Fanout::Broadcast
                }
            }
            Route::Unsupported(why) => return Err(Error::Unsupported(why.clone())),
            Route::Sharded { table, keys } => {
                let shards = self.eval(keys, table, params, analysis.writes)?;
                let fanout = self.fanout(shards)?;
                if let (Fanout::Scatter(_), Some(need)) = (&fanout, &analysis.needs_merge) {
                    let Some(sql) = sql else {
                        return Err(Error::Unsupported(format!("{need} over several shards")));
                    };
                    plan.merge = Some(self.merge_plan(sql, params)?);
                }
                fanout
            }
            Route::Insert { table, rows } => {
                let mut shards = BTreeSet::new();
                let mut row_shards = Vec::with_capacity(rows.len());
                for row in rows {
                    match self.source_shards(row, table, params)? {
                        Some(set) if set.len() == 1 => {
                            shards.extend(&set);
                            row_shards.extend(set);
                        }
                        _ => {
                            return Err(Error::BadKey(format!(
                                "the shard key of {table} must not be NULL and must be decodable"
                            )));
                        }
                    }
                }
                if shards.len() > 1 {
                    let Some(sql) = sql else {
                        return Err(Error::Unsupported(format!(
                            "a multi-row INSERT into {table} whose rows belong to different shards"
                        )));
                    };
                    let parts =
                        rewrite::split_insert(sql, &row_shards).map_err(Error::Unsupported)?;
                    // RETURNING rows come back in VALUES order: row r is the next row of the
                    // shard that got it (slots are positions in the sorted shard list).
                    let sorted: Vec<usize> = shards.iter().copied().collect();
                    let turns = row_shards
                        .iter()
                        .map(|s| sorted.iter().position(|x| x == s).unwrap_or(0))
                        .collect();
                    plan.merge = Some(Arc::new(MergePlan {
                        sql: Arc::from(""),
                        spec: Arc::new(MergeSpec {
                            interleave: Some(turns),
                            ..MergeSpec::default()
                        }),
                        limit: None,
                        offset: 0,
                        dropped_params: Vec::new(),
                    }));
                    plan.split = Some(Arc::new(
                        parts.into_iter().map(|(s, p)| (ShardId(s), p)).collect(),
                    ));
                    Fanout::Scatter(shards.into_iter().map(ShardId).collect())
                } else {
                    Fanout::One(ShardId(shards.into_iter().next().unwrap_or(0)))
                }
            }
        };
        Ok(plan)
    }

    fn fanout(&self, shards: Option<BTreeSet<usize>>) -> Result<Fanout, Error> {
        let shards: Vec<usize> = match shards {
            None => (0..self.shards).collect(),
            Some(set) if set.is_empty() => vec![0], // contradictory keys: no row anywhere
            Some(set) => set.into_iter().collect(),
        };
        if let [one] = shards.as_slice() {
            return Ok(Fanout::One(ShardId(*one)));
        }
        Ok(Fanout::Scatter(shards.into_iter().map(ShardId).collect()))
    }

    /// The one shard every statement of a multi-statement query needs.
    fn one_shard_of(&self, parts: &[(Route, bool)], params: &Params<'_>) -> Result<usize, Error> {
        let spans = || {
            Error::Unsupported(
                "a multi-statement query whose statements target different shards".into(),
            )
        };
        let mut target: Option<usize> = None;
        for (route, writes) in parts {
            let set = match route {
                Route::Sharded { table, keys } => match self.eval(keys, table, params, *writes)? {
                    Some(set) => set,
                    None => return Err(spans()),
                },
                Route::Insert { table, rows } => {
                    let mut set = BTreeSet::new();
                    for row in rows {
                        match self.source_shards(row, table, params)? {
                            Some(s) if s.len() == 1 => set.extend(s),
                            _ => {
                                return Err(Error::BadKey(format!(
                                    "the shard key of {table} must not be NULL and must be decodable"
                                )));
                            }
                        }
                    }
                    set
                }
                // Reads of tables every shard holds: any shard will do.
                Route::Reference if !*writes => BTreeSet::new(),
                _ => return Err(spans()),
            };
            for shard in set {
                match target {
                    None => target = Some(shard),
                    Some(t) if t == shard => {}
                    Some(_) => return Err(spans()),
                }
            }
        }
        Ok(target.unwrap_or(0))
    }

    /// The (cached) rewrite of a statement for a scatter, with its LIMIT/OFFSET values.
    fn merge_plan(&self, sql: &str, params: &Params<'_>) -> Result<Arc<MergePlan>, Error> {
        let cached = self.rewrites.lock().get(sql).cloned();
        let rewritten = match cached {
            Some(r) => r,
            None => {
                let r = rewrite::rewrite(sql, &self.schema).map(Arc::new);
                let mut cache = self.rewrites.lock();
                if cache.len() >= CACHE_CAPACITY {
                    cache.clear();
                }
                cache.insert(sql.into(), r.clone());
                r
            }
        }
        .map_err(Error::Unsupported)?;
        let resolve = |c: Option<Count>, offset: bool| -> Result<Option<u64>, Error> {
            match c {
                None => Ok(None),
                Some(Count::Const(n)) => Ok(Some(n)),
                Some(Count::Param(n)) => match params.key(n) {
                    Some(None) => Ok(None),
                    Some(Some(ShardKey::Int(v))) => u64::try_from(v)
                        .map(Some)
                        .map_err(|_| Error::NegativeCount { offset }),
                    _ => Err(Error::BadKey(format!(
                        "cannot read parameter ${n} as a LIMIT/OFFSET count"
                    ))),
                },
            }
        };
        Ok(Arc::new(MergePlan {
            sql: Arc::from(rewritten.sql.as_str()),
            limit: resolve(rewritten.spec.limit, false)?,
            offset: resolve(rewritten.spec.offset, true)?.unwrap_or(0),
            spec: Arc::new(rewritten.spec.clone()),
            dropped_params: rewritten.dropped_params.clone(),
        }))
    }

    /// Evaluates a key expression: `None` means every shard.
    fn eval(
        &self,
        keys: &KeyExpr,
        table: &str,
        params: &Params<'_>,
        writes: bool,
    ) -> Result<Option<BTreeSet<usize>>, Error> {
        Ok(match keys {
            KeyExpr::All => None,
            KeyExpr::Keys(sources) => {
                let mut set = BTreeSet::new();
                for source in sources {
                    match self.source_shards(source, table, params)? {
                        Some(s) => set.extend(s),
                        // An undecodable key: a read may look everywhere, a write may not guess.
                        None if writes => {
                            return Err(Error::BadKey(format!(
                                "cannot decode the shard key of {table} from its parameter"
                            )));
                        }
                        None => return Ok(None),
                    }
                }
                Some(set)
            }
            KeyExpr::And(parts) => {
                let mut acc: Option<BTreeSet<usize>> = None;
                for part in parts {
                    if let Some(set) = self.eval(part, table, params, writes)? {
                        acc = Some(match acc {
                            None => set,
                            Some(prev) => prev.intersection(&set).copied().collect(),
                        });
                    }
                }
                acc
            }
            KeyExpr::Or(parts) => {
                let mut acc = BTreeSet::new();
                for part in parts {
                    match self.eval(part, table, params, writes)? {
                        Some(set) => acc.extend(set),
                        None => return Ok(None),
                    }
                }
                Some(acc)
            }
        })
    }

    /// The shards of one key source; `None` if it cannot be decoded.
    fn source_shards(
        &self,
        source: &KeySource,
        table: &str,
        params: &Params<'_>,
    ) -> Result<Option<BTreeSet<usize>>, Error> {
        let keys = match source {
            KeySource::Null => return Ok(Some(BTreeSet::new())),
            KeySource::Literal(text) => vec![Some(Some(canonical_key(text)))],
            KeySource::Param(n) => vec![params.key(*n)],
            KeySource::AnyParam(n) => match params.array_keys(*n) {
                Some(keys) => keys,
                None => return Ok(None),
            },
        };
        let mut set = BTreeSet::new();
        for key in keys {
            match key {
                Some(Some(key)) => {
                    set.insert(self.shard_of(&key, table)?);
                }
                Some(None) => {} // a NULL parameter or element
                None => return Ok(None),
            }
        }
        Ok(Some(set))
    }

    /// The shard that owns a key.
    ///
    /// # Errors
    /// Range strategy: a non-integer key or a key in no range.
    pub fn shard_of(&self, key: &ShardKey, table: &str) -> Result<usize, Error> {
        match &self.placement {
            Placement::Hash(ring) => Ok(ring.shard_for(key)),
            Placement::Range { ranges } => match key {
                ShardKey::Int(v) => ranges.shard_for(*v).ok_or_else(|| Error::NoShard {
                    key: v.to_string(),
                    table: table.to_string(),
                }),
                other => Err(Error::BadKey(format!(
                    "range sharding of {table} needs an integer key, got {other:?}"
                ))),
            },
        }
    }

    /// Each shard's share of the hash ring (hash strategy only).
    pub fn ring_shares(&self) -> Option<Vec<f64>> {
        match &self.placement {
            Placement::Hash(ring) => Some(ring.shares()),
            Placement::Range { .. } => None,
        }
    }

    pub fn shard_count(&self) -> usize {
        self.shards
    }
}

/// The canonical key of a value's text form, so every wire form of the same key lands on the
/// same shard: integers (in any width, quoted or not) become int8, UUIDs become uuid, the rest
/// stays text.
pub fn canonical_key(text: &str) -> ShardKey {
    let trimmed = text.trim();
    if let Ok(v) = trimmed.parse::<i64>() {
        return ShardKey::Int(v);
    }
    if let Some(uuid) = parse_uuid(trimmed) {
        return ShardKey::Uuid(uuid);
    }
    ShardKey::Text(text.to_string())
}

/// Parses the forms Postgres accepts for uuid input: with or without hyphens, optional braces.
pub fn parse_uuid(text: &str) -> Option<[u8; 16]> {
    let inner = text
        .strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .unwrap_or(text);
    let hex: Vec<u8> = inner.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 || inner.len() > 36 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    if inner.len() == 36 && ![8, 13, 18, 23].iter().all(|&i| inner.as_bytes()[i] == b'-') {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(strategy: &str) -> Config {
        let shards = if strategy == "range" {
            "shards:\n  - name: s0\n    primary: \"127.0.0.1:1\"\n    range: { to: 100 }\n  - name: s1\n    primary: \"127.0.0.1:2\"\n    range: { from: 100, to: 200 }\n"
        } else {
            "shards:\n  - name: s0\n    primary: \"127.0.0.1:1\"\n  - name: s1\n    primary: \"127.0.0.1:2\"\n"
        };
        let text = format!(
            "database: app\nusers: [{{name: app, password: app}}]\nbackend: {{user: app, password: app, database: app}}\nsharding:\n  strategy: {strategy}\n  tables: {{users: id, orders: user_id}}\n  reference_tables: [countries]\n{shards}"
        );
        Config::from_yaml(&text, std::path::Path::new("t.yaml")).expect("config")
    }

    fn plan(router: &Router, sql: &str) -> Result<Plan, Error> {
        router.plan(&router.analyze(sql), &Params::none())
    }

    #[test]
    fn every_wire_form_of_a_key_is_the_same_key() {
        assert_eq!(canonical_key("5"), ShardKey::Int(5));
        assert_eq!(canonical_key(" -5 "), ShardKey::Int(-5));
        assert_eq!(canonical_key("abc"), ShardKey::Text("abc".into()));
        let u = canonical_key("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        assert_eq!(u, canonical_key("{A0EEBC999C0B4EF8BB6D6BB9BD380A11}"));
        assert!(matches!(u, ShardKey::Uuid(_)));
    }

    #[test]
    fn range_routing_fails_closed() {
        let router = Router::new(&config("range")).expect("router");
        assert_eq!(
            plan(&router, "SELECT * FROM users WHERE id = 5")
                .expect("plan")
                .fanout,
            Fanout::One(ShardId(0))
        );
        assert_eq!(
            plan(&router, "SELECT * FROM users WHERE id = 150")
                .expect("plan")
                .fanout,
            Fanout::One(ShardId(1))
        );
        let err = plan(&router, "SELECT * FROM users WHERE id = 250").expect_err("out of range");
        assert_eq!(err.sqlstate(), "22023");
        assert!(err.to_string().contains("250") && err.to_string().contains("users"));
        assert_eq!(
            plan(&router, "SELECT * FROM users WHERE id IN (5, 150)")
                .expect("plan")
                .fanout,
            Fanout::Scatter(vec![ShardId(0), ShardId(1)])
        );
        assert_eq!(
            plan(&router, "SELECT * FROM users WHERE id = 5 AND id = 150")
                .expect("plan")
                .fanout,
            Fanout::One(ShardId(0))
        );
    }

    #[test]
    fn scatter_and_merge_rules() {
        let router = Router::new(&config("hash")).expect("router");
        let all = plan(&router, "SELECT * FROM users").expect("plan");
        assert_eq!(all.fanout, Fanout::Scatter(vec![ShardId(0), ShardId(1)]));
        let err = plan(&router, "SELECT * FROM users ORDER BY id").expect_err("merge");
        assert_eq!(err.sqlstate(), "0A000");
        assert!(err.to_string().contains("ORDER BY"));
        assert_eq!(
            plan(&router, "CREATE TABLE x (a int)").expect("ddl").fanout,
            Fanout::Broadcast
        );
        assert_eq!(
            plan(&router, "INSERT INTO countries VALUES ('a','b')")
                .expect("ref")
                .fanout,
            Fanout::Broadcast
        );
        assert_eq!(
            plan(&router, "SELECT * FROM countries")
                .expect("ref")
                .fanout,
            Fanout::One(ShardId(0))
        );
        let update_all = plan(&router, "UPDATE users SET name = 'x'").expect("update all");
        assert!(matches!(update_all.fanout, Fanout::Scatter(_)));
        // A key that hashes to one shard goes there; the same key as text goes to the same one.
        let a = plan(&router, "SELECT * FROM users WHERE id = 42")
            .expect("plan")
            .fanout;
        let b = plan(&router, "SELECT * FROM users WHERE id = '42'")
            .expect("plan")
            .fanout;
        assert_eq!(a, b);
        assert!(matches!(a, Fanout::One(_)));
    }
}
