//! Adversarial tests of the cross-shard paths (merged reads, split writes, two-phase commit,
//! COPY split, tessera_next_id()) through real clients and raw protocol messages: pipelines of
//! merged queries, a shard failing mid-merge, clients vanishing mid-merge, extended-protocol
//! merges (named statements, binary formats, Describe before Bind, one statement routed to one
//! shard and to all), cancel of a query running on both shards, two-phase commit under
//! concurrent transfers, global ids in pipelines, and a 100,000-row COPY split by shard. Every
//! step is bounded in time so a hang fails instead of blocking.

mod common;

use common::raw;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use common::{Proxy, unique};
use futures::{SinkExt, StreamExt};
use tessera::router::{Router, canonical_key};
use tokio::task::JoinHandle;
use tokio_postgres::types::{FromSql, ToSql, Type};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

// === helpers ===

/// Runs `fut` with a deadline: a hang fails the test instead of blocking it.
async fn bounded<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: timed out after {secs}s (hang)"),
    }
}

fn code(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_string())
}

/// The SQLSTATE of an error, or its text when it has none (a lost connection, a protocol error).
fn code_or_text(e: &tokio_postgres::Error) -> String {
    code(e).unwrap_or_else(|| format!("no sqlstate: {e}"))
}

/// A client whose connection task can be aborted (an abrupt disconnect: the socket closes
/// without a Terminate).
async fn connect_abortable(conninfo: &str) -> (Client, JoinHandle<()>) {
    let (client, conn) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .expect("connect through proxy");
    let handle = tokio::spawn(async move {
        let _ = conn.await;
    });
    (client, handle)
}

fn simple_rows(msgs: &[SimpleQueryMessage]) -> Vec<&tokio_postgres::SimpleQueryRow> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// Simple-protocol rows as `a|b|c` strings (NULL as `NULL`).
fn simple_strings(msgs: &[SimpleQueryMessage]) -> Vec<String> {
    simple_rows(msgs)
        .iter()
        .map(|r| {
            (0..r.len())
                .map(|i| r.get(i).unwrap_or("NULL").to_string())
                .collect::<Vec<_>>()
                .join("|")
        })
        .collect()
}

/// Any value in its binary wire form, compared byte for byte.
#[derive(Debug, Clone, PartialEq)]
struct RawVal(Vec<u8>);

impl<'a> FromSql<'a> for RawVal {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(RawVal(raw.to_vec()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

type BinRow = Vec<Option<Vec<u8>>>;

fn raw_row(row: &tokio_postgres::Row) -> BinRow {
    (0..row.len())
        .map(|i| row.get::<_, Option<RawVal>>(i).map(|r| r.0))
        .collect()
}

/// The text of a binary numeric (what Postgres' numeric_out prints, scale included).
fn numeric_text(raw: &[u8]) -> String {
    let word = |i: usize| i16::from_be_bytes([raw[2 * i], raw[2 * i + 1]]);
    let ndigits = word(0) as i32;
    let weight = word(1) as i32;
    let sign = word(2) as u16;
    let dscale = word(3) as i32;
    if sign == 0xC000 {
        return "NaN".into();
    }
    let digit = |d: i32| -> i16 {
        if d >= 0 && d < ndigits {
            word(4 + d as usize)
        } else {
            0
        }
    };
    let mut out = String::new();
    if sign == 0x4000 {
        out.push('-');
    }
    if weight < 0 {
        out.push('0');
    } else {
        for d in 0..=weight {
            if d == 0 {
                out.push_str(&digit(d).to_string());
            } else {
                out.push_str(&format!("{:04}", digit(d)));
            }
        }
    }
    if dscale > 0 {
        out.push('.');
        let mut frac = String::new();
        let mut d = weight + 1;
        while (frac.len() as i32) < dscale {
            frac.push_str(&format!("{:04}", digit(d)));
            d += 1;
        }
        frac.truncate(dscale as usize);
        out.push_str(&frac);
    }
    out
}

/// An extended-protocol row as `a|b|c` text, by column type (numeric decoded from binary,
/// timestamptz as microseconds since 2000-01-01).
fn ext_string(row: &tokio_postgres::Row) -> String {
    (0..row.len())
        .map(|i| {
            let ty = row.columns()[i].type_().clone();
            let raw: Option<RawVal> = row.get(i);
            let Some(RawVal(raw)) = raw else {
                return "NULL".to_string();
            };
            match ty {
                Type::INT2 => i16::from_be_bytes(raw[..2].try_into().unwrap()).to_string(),
                Type::INT4 => i32::from_be_bytes(raw[..4].try_into().unwrap()).to_string(),
                Type::INT8 | Type::TIMESTAMPTZ => {
                    i64::from_be_bytes(raw[..8].try_into().unwrap()).to_string()
                }
                Type::NUMERIC => numeric_text(&raw),
                Type::BOOL => (if raw[0] != 0 { "t" } else { "f" }).to_string(),
                _ => String::from_utf8_lossy(&raw).into_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("|")
}

/// xorshift64: deterministic choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn shard_of(router: &Router, table: &str, id: i64) -> usize {
    router
        .shard_of(&canonical_key(&id.to_string()), table)
        .expect("placement")
}

fn router_for(table: &str) -> Router {
    let mut config = common::sharded_config();
    config
        .sharding
        .tables
        .insert(table.to_string(), "id".into());
    Router::new(&config).expect("router")
}

/// The gids of prepared transactions on both shards that belong to `node`.
async fn prepared_of(node: u16) -> Vec<String> {
    let mut gids = Vec::new();
    for shard in 0..2 {
        let client = common::connect_superuser(shard).await;
        for row in client
            .query("SELECT gid FROM pg_prepared_xacts", &[])
            .await
            .expect("pg_prepared_xacts")
        {
            let gid: String = row.get(0);
            if tessera::twopc::gid_node(&gid) == Some(node) {
                gids.push(gid);
            }
        }
    }
    gids
}

/// Waits until every server connection of the proxy's primary pools is back in its pool (none
/// leaked by a session that ended mid-request) and no pool is over `size`.
async fn pools_settle(proxy: &Proxy, size: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let states: Vec<(u32, u32)> = proxy
            .handle
            .shared
            .shards
            .iter()
            .map(|s| s.primary.state())
            .collect();
        for (s, (conns, _)) in states.iter().enumerate() {
            assert!(
                *conns <= size,
                "{what}: shard {s} pool holds {conns} connections over a size of {size}"
            );
        }
        if states.iter().all(|(conns, idle)| conns == idle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: server connections still checked out after 10s (connections, idle) per shard: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many backends on each shard are running a statement whose text contains `needle`.
async fn active_with(needle: &str) -> [i64; 2] {
    let mut out = [0; 2];
    for (shard, n) in out.iter_mut().enumerate() {
        let su = common::connect_superuser(shard).await;
        *n = su
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' \
                 AND pid <> pg_backend_pid() AND strpos(query, $1) > 0",
                &[&needle],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
    }
    out
}

// --- the sharded fixture ---

/// One row of the fixture table, as inserted.
#[derive(Debug, Clone)]
struct Row {
    id: i64,
    v: i32,
    /// amt in cents (amt is numeric(12,2)).
    cents: i64,
    /// ts in microseconds since 1970-01-01.
    unix_us: i64,
}

impl Row {
    /// ts as Postgres' binary timestamptz: microseconds since 2000-01-01.
    fn pg_us(&self) -> i64 {
        self.unix_us - 946_684_800_000_000
    }
    fn note(&self) -> String {
        format!("n{}", self.id)
    }
}

fn gen_rows(n: i64) -> Vec<Row> {
    (1..=n)
        .map(|id| Row {
            id,
            // Uneven groups, many ties.
            v: ((id * id) % 997) as i32,
            // Negative and positive amounts, ties.
            cents: (id * 7907) % 200_000 - 50_000,
            // Ties every 500 ids, microseconds not round.
            unix_us: 1_735_689_600_000_000 + (id % 500) * 3_600_000_017,
        })
        .collect()
}

struct Fx {
    proxy: Proxy,
    /// The sharded table `(id bigint primary key, v int, amt numeric(12,2), ts timestamptz,
    /// note text)`.
    t: String,
    /// A plain copy of every row on shard 0's primary (not through the proxy): the single
    /// Postgres the merged answers are compared with.
    all: String,
    ids: [Vec<i64>; 2],
    rows: Vec<Row>,
}

const INSERT_ROWS: &str = "SELECT g, x, (c::numeric / 100)::numeric(12,2), \
    timestamptz 'epoch' + (u / 1000000) * interval '1 second' + (u % 1000000) * interval '1 microsecond', \
    'n' || g FROM unnest($1::bigint[], $2::int[], $3::bigint[], $4::bigint[]) AS d(g, x, c, u)";

async fn insert_direct(client: &Client, table: &str, rows: &[&Row]) {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    let vs: Vec<i32> = rows.iter().map(|r| r.v).collect();
    let cents: Vec<i64> = rows.iter().map(|r| r.cents).collect();
    let us: Vec<i64> = rows.iter().map(|r| r.unix_us).collect();
    client
        .execute(
            &format!("INSERT INTO {table} (id, v, amt, ts, note) {INSERT_ROWS}"),
            &[&ids, &vs, &cents, &us],
        )
        .await
        .expect("populate");
}

/// A 2-shard proxy (replica reads off, pool of `pool_size` per server) over a fresh sharded
/// table holding ids 1..=n, inserted directly on the shard the map says, and a plain copy of all
/// rows on shard 0.
async fn fixture(n: i64, pool_size: u32) -> Fx {
    let t = unique("xadv");
    let proxy = Proxy::start_sharded(|c| {
        c.sharding.tables.insert(t.clone(), "id".into());
        c.pool.size = pool_size;
        c.routing.replica_reads = false;
    })
    .await;
    let router = router_for(&t);
    let client = proxy.connect().await;
    let columns = "(id bigint PRIMARY KEY, v int NOT NULL, amt numeric(12,2) NOT NULL, ts timestamptz NOT NULL, note text NOT NULL)";
    client
        .batch_execute(&format!("CREATE TABLE {t} {columns}"))
        .await
        .expect("DDL through the proxy");
    let rows = gen_rows(n);
    let mut ids = [Vec::new(), Vec::new()];
    let mut parts: [Vec<&Row>; 2] = [Vec::new(), Vec::new()];
    for r in &rows {
        let s = shard_of(&router, &t, r.id);
        ids[s].push(r.id);
        parts[s].push(r);
    }
    for (s, part) in parts.iter().enumerate() {
        let direct = common::connect_primary(s).await;
        insert_direct(&direct, &t, part).await;
        direct
            .batch_execute(&format!("ANALYZE {t}"))
            .await
            .expect("analyze");
    }
    let all = format!("{t}_all");
    let direct = common::connect_primary(0).await;
    direct
        .batch_execute(&format!("CREATE TABLE {all} {columns}"))
        .await
        .expect("reference table");
    insert_direct(&direct, &all, &rows.iter().collect::<Vec<_>>()).await;
    assert!(
        !ids[0].is_empty() && !ids[1].is_empty(),
        "both shards need rows"
    );
    Fx {
        proxy,
        t,
        all,
        ids,
        rows,
    }
}

// === raw protocol ===

/// Sends `parts` (each a Bind + Execute, or more) in one Sync batch. The proxy refuses a batch
/// with several Binds when one spans shards (0A000 for the whole batch, a limit of the proxy):
/// that is reported and the same requests are then pipelined with a Sync each. Returns the
/// replies without the ReadyForQuery messages.
async fn batch_or_pipeline(c: &mut raw::Raw, parts: &[Vec<u8>], what: &str) -> Vec<raw::Msg> {
    let mut batch: Vec<u8> = parts.concat();
    batch.extend(raw::sync());
    c.send(&batch).await;
    let reply = c.until_ready().await;
    let refused = reply.len() == 2 && reply[0].code().as_deref() == Some("0A000");
    if !refused {
        return reply.into_iter().filter(|m| m.tag != b'Z').collect();
    }
    println!("{what}: one Sync batch refused: {}", raw::explain(&reply));
    let mut pipeline = Vec::new();
    for part in parts {
        pipeline.extend_from_slice(part);
        pipeline.extend(raw::sync());
    }
    c.send(&pipeline).await;
    let mut out = Vec::new();
    for _ in parts {
        out.extend(c.until_ready().await.into_iter().filter(|m| m.tag != b'Z'));
    }
    out
}

// --- expected answers, computed from the rows ---

/// `SELECT id, v FROM t ORDER BY v DESC, id LIMIT limit OFFSET offset`
fn want_top(rows: &[Row], limit: Option<i64>, offset: i64) -> Vec<String> {
    let mut sorted: Vec<&Row> = rows.iter().collect();
    sorted.sort_by(|a, b| b.v.cmp(&a.v).then(a.id.cmp(&b.id)));
    sorted
        .into_iter()
        .skip(offset.max(0) as usize)
        .take(limit.map_or(usize::MAX, |l| l as usize))
        .map(|r| format!("{}|{}", r.id, r.v))
        .collect()
}

/// `SELECT v % m AS g, count(*), sum(v), min(id), max(id) FROM t GROUP BY 1 ORDER BY 1`
fn want_groups(rows: &[Row], m: i32) -> Vec<String> {
    let mut groups: BTreeMap<i32, (i64, i64, i64, i64)> = BTreeMap::new();
    for r in rows {
        let e = groups.entry(r.v % m).or_insert((0, 0, i64::MAX, i64::MIN));
        e.0 += 1;
        e.1 += i64::from(r.v);
        e.2 = e.2.min(r.id);
        e.3 = e.3.max(r.id);
    }
    groups
        .iter()
        .map(|(g, (n, s, lo, hi))| format!("{g}|{n}|{s}|{lo}|{hi}"))
        .collect()
}

/// `SELECT v % 10 AS g, count(*) FROM t GROUP BY 1 HAVING count(*) > min ORDER BY 1`
fn want_having(rows: &[Row], min: i64) -> Vec<String> {
    let mut groups: BTreeMap<i32, i64> = BTreeMap::new();
    for r in rows {
        *groups.entry(r.v % 10).or_default() += 1;
    }
    groups
        .iter()
        .filter(|(_, n)| **n > min)
        .map(|(g, n)| format!("{g}|{n}"))
        .collect()
}

/// `SELECT DISTINCT v % m AS m FROM t ORDER BY m`
fn want_distinct(rows: &[Row], m: i32) -> Vec<String> {
    let set: BTreeSet<i32> = rows.iter().map(|r| r.v % m).collect();
    set.iter().map(|x| x.to_string()).collect()
}

type Outcome = Result<Vec<String>, String>;
type BoxFut<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

fn ext<'a>(
    fut: impl Future<Output = Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>> + Send + 'a,
) -> BoxFut<'a> {
    Box::pin(async move {
        fut.await
            .map(|rows| rows.iter().map(ext_string).collect())
            .map_err(|e| code_or_text(&e))
    })
}

fn simple<'a>(
    fut: impl Future<Output = Result<Vec<SimpleQueryMessage>, tokio_postgres::Error>> + Send + 'a,
) -> BoxFut<'a> {
    Box::pin(async move {
        fut.await
            .map(|m| simple_strings(&m))
            .map_err(|e| code_or_text(&e))
    })
}

// === 1. pipelines of merged queries ===

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_merged_queries_each_get_their_rows_in_order() {
    let f = fixture(2000, 4).await;
    let t = &f.t;
    let rows = &f.rows;
    let client = f.proxy.connect().await;
    // A HAVING threshold that keeps some groups and drops others.
    let mut counts: Vec<i64> = {
        let mut g: BTreeMap<i32, i64> = BTreeMap::new();
        for r in rows {
            *g.entry(r.v % 10).or_default() += 1;
        }
        g.into_values().collect()
    };
    counts.sort_unstable();
    let threshold = counts[counts.len() / 2];
    assert!(
        !want_having(rows, threshold).is_empty() && want_having(rows, threshold).len() < 10,
        "the threshold splits the groups"
    );
    bounded(60, "pipeline of merged queries", async {
        let top = client
            .prepare(&format!(
                "SELECT id, v FROM {t} ORDER BY v DESC, id LIMIT $1"
            ))
            .await
            .expect("prepare top");
        let page = client
            .prepare(&format!("SELECT id FROM {t} ORDER BY id LIMIT $1 OFFSET $2"))
            .await
            .expect("prepare page");
        let groups = client
            .prepare(&format!(
                "SELECT v % 10 AS g, count(*), sum(v), min(id), max(id) FROM {t} GROUP BY 1 ORDER BY 1"
            ))
            .await
            .expect("prepare groups");
        let keyed = client
            .prepare(&format!("SELECT id, v FROM {t} WHERE id = $1"))
            .await
            .expect("prepare keyed");
        let client = &client;
        let (top, page, groups, keyed) = (&top, &page, &groups, &keyed);
        let limits: [i64; 6] = [0, 1, 3, 10, 100, 2500];
        let mut futs: Vec<BoxFut<'_>> = Vec::new();
        let mut want: Vec<Outcome> = Vec::new();
        let mut what: Vec<String> = Vec::new();
        for i in 0..96i64 {
            let round = (i / 8) as usize;
            match i % 8 {
                0 => {
                    let l = limits[round % limits.len()];
                    futs.push(Box::pin(async move { ext(client.query(top, &[&l])).await }));
                    want.push(Ok(want_top(rows, Some(l), 0)));
                    what.push(format!("top LIMIT {l}"));
                }
                1 => {
                    let (l, o) = (5i64, i * 3);
                    futs.push(Box::pin(async move {
                        ext(client.query(page, &[&l, &o])).await
                    }));
                    want.push(Ok((o + 1..=(o + l).min(2000))
                        .map(|x| x.to_string())
                        .collect()));
                    what.push(format!("page LIMIT {l} OFFSET {o}"));
                }
                2 => {
                    futs.push(ext(client.query(groups, &[])));
                    want.push(Ok(want_groups(rows, 10)));
                    what.push("groups".into());
                }
                3 => {
                    let l = i;
                    let sql = format!("SELECT id, v FROM {t} ORDER BY v DESC, id LIMIT {l}");
                    futs.push(Box::pin(async move {
                        simple(client.simple_query(&sql)).await
                    }));
                    want.push(Ok(want_top(rows, Some(l), 0)));
                    what.push(format!("simple top LIMIT {l}"));
                }
                4 => {
                    // A fresh text each time: its Parse/Describe is pipelined too.
                    let m = 2 + (i % 13) as i32;
                    let sql = format!("SELECT DISTINCT v % {m} AS m FROM {t} ORDER BY m");
                    futs.push(Box::pin(async move {
                        ext(client.query(&sql, &[])).await
                    }));
                    want.push(Ok(want_distinct(rows, m)));
                    what.push(format!("distinct % {m}"));
                }
                5 => {
                    let side = &f.ids[round % 2];
                    let k = side[(i as usize * 7) % side.len()];
                    futs.push(Box::pin(async move {
                        ext(client.query(keyed, &[&k])).await
                    }));
                    let r = &rows[(k - 1) as usize];
                    want.push(Ok(vec![format!("{}|{}", r.id, r.v)]));
                    what.push(format!("keyed {k}"));
                }
                6 => {
                    let sql = format!(
                        "SELECT v % 10 AS g, count(*) FROM {t} GROUP BY 1 HAVING count(*) > {threshold} ORDER BY 1"
                    );
                    if round.is_multiple_of(2) {
                        futs.push(Box::pin(async move {
                            ext(client.query(&sql, &[])).await
                        }));
                    } else {
                        futs.push(Box::pin(async move {
                            simple(client.simple_query(&sql)).await
                        }));
                    }
                    want.push(Ok(want_having(rows, threshold)));
                    what.push("having".into());
                }
                _ => {
                    let upto = i * 10;
                    let sql = format!("SELECT count(*), sum(v) FROM {t} WHERE id <= {upto}");
                    futs.push(Box::pin(async move {
                        ext(client.query(&sql, &[])).await
                    }));
                    let sel: Vec<&Row> = rows.iter().filter(|r| r.id <= upto).collect();
                    let sum: i64 = sel.iter().map(|r| i64::from(r.v)).sum();
                    want.push(Ok(vec![format!("{}|{}", sel.len(), sum)]));
                    what.push(format!("count up to {upto}"));
                }
            }
        }
        let got = futures::future::join_all(futs).await;
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "pipelined request {k} ({})", what[k]);
        }
        // And the session is fine afterwards.
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await
            .expect("after the pipeline")
            .get(0);
        assert_eq!(n, 2000);
    })
    .await;

    // Several merged Executes in one Sync batch on the raw protocol.
    bounded(30, "raw batch of merged executes", async {
        let mut c = raw::Raw::login(f.proxy.port).await;
        let mut batch = raw::parse(
            "top",
            &format!("SELECT id, v FROM {t} ORDER BY v DESC, id LIMIT $1"),
        );
        batch.extend(raw::parse(
            "grp",
            &format!(
                "SELECT v % 10 AS g, count(*), sum(v), min(id), max(id) FROM {t} GROUP BY 1 ORDER BY 1"
            ),
        ));
        batch.extend(raw::sync());
        c.send(&batch).await;
        assert_eq!(raw::tags(&c.until_ready().await), "11Z");
        let mut parts = Vec::new();
        for l in ["3", "0", "7"] {
            let mut part = raw::bind("", "top", &[l]);
            part.extend(raw::execute("", 0));
            parts.push(part);
        }
        let mut part = raw::bind("", "grp", &[]);
        part.extend(raw::execute("", 0));
        parts.push(part);
        let mut part = raw::bind("", "top", &["2"]);
        part.extend(raw::execute("", 0));
        parts.push(part);
        let reply = batch_or_pipeline(&mut c, &parts, "five merged Executes").await;
        assert_eq!(
            raw::shape(&reply),
            "2D3C2C2D7C2D10C2D2C",
            "five merged Executes: {:?}",
            raw::tags(&reply)
        );
        let texts: Vec<String> = reply.iter().filter_map(raw::Msg::text).collect();
        let mut want = want_top(rows, Some(3), 0);
        want.extend(want_top(rows, Some(7), 0));
        want.extend(want_groups(rows, 10));
        want.extend(want_top(rows, Some(2), 0));
        assert_eq!(texts, want);
        // Completion tags: SELECT n per Execute.
        let tags: Vec<String> = reply
            .iter()
            .filter(|m| m.tag == b'C')
            .map(|m| String::from_utf8_lossy(&m.body[..m.body.len() - 1]).into_owned())
            .collect();
        assert_eq!(
            tags,
            ["SELECT 3", "SELECT 0", "SELECT 7", "SELECT 10", "SELECT 2"]
        );
    })
    .await;
}

// === 2. a shard failing mid-merge ===

#[tokio::test(flavor = "multi_thread")]
async fn an_error_on_one_shard_mid_merge() {
    let f = fixture(6000, 4).await;
    let t = &f.t;
    let rows = &f.rows;
    let total: i64 = rows.iter().map(|r| i64::from(r.v)).sum();
    let client = f.proxy.connect().await;
    async fn usable(client: &Client, f: &Fx, total: i64, step: &str) {
        let row = bounded(
            10,
            step,
            client.query_one(&format!("SELECT count(*), sum(v) FROM {}", f.t), &[]),
        )
        .await
        .unwrap_or_else(|e| panic!("{step}: merged count after the error: {e}"));
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1)),
            (6000, total),
            "{step}"
        );
        for s in 0..2 {
            let k = f.ids[s][3];
            let v: i32 = bounded(
                10,
                step,
                client.query_one(&format!("SELECT v FROM {} WHERE id = $1", f.t), &[&k]),
            )
            .await
            .unwrap_or_else(|e| panic!("{step}: keyed read on shard {s}: {e}"))
            .get(0);
            assert_eq!(v, f.rows[(k - 1) as usize].v, "{step}");
        }
    }
    for s in 0..2 {
        let k = f.ids[s][f.ids[s].len() / 2];
        let shapes = [
            format!("SELECT id, 1 / (id - {k}) FROM {t} ORDER BY id"),
            format!("SELECT id, 1 / (id - {k}) FROM {t} ORDER BY id DESC LIMIT 5000"),
            format!("SELECT v % 10, sum(1 / (id - {k})) FROM {t} GROUP BY 1 ORDER BY 1"),
            format!("SELECT count(*), min(1 / (id - {k})) FROM {t}"),
            format!("SELECT DISTINCT v % 7, 1 / (id - {k}) FROM {t}"),
        ];
        for sql in &shapes {
            let step = format!("shard {s}, extended: {sql}");
            let err = bounded(20, &step, client.query(sql.as_str(), &[]))
                .await
                .expect_err("division by zero on one shard");
            assert_eq!(code(&err).as_deref(), Some("22012"), "{step}: {err}");
            usable(&client, &f, total, &step).await;
            let step = format!("shard {s}, simple: {sql}");
            let err = bounded(20, &step, client.simple_query(sql))
                .await
                .expect_err("division by zero on one shard");
            assert_eq!(code(&err).as_deref(), Some("22012"), "{step}: {err}");
            usable(&client, &f, total, &step).await;
        }
    }

    // Streamed: with sorts off each shard walks its primary key, so rows flow to the client
    // before one shard fails; what arrived must be an exact prefix of the merged order.
    bounded(30, "streamed merge with an error", async {
        let c = f.proxy.connect().await;
        c.batch_execute("SET enable_sort = off")
            .await
            .expect("set enable_sort");
        for s in 0..2 {
            let k = f.ids[s][f.ids[s].len() / 2];
            let stream = c
                .query_raw(
                    &format!("SELECT id, 1 / (id - {k}) FROM {t} ORDER BY id"),
                    std::iter::empty::<i64>(),
                )
                .await;
            let mut got = Vec::new();
            let mut failure = None;
            match stream {
                Err(e) => failure = Some(e),
                Ok(stream) => {
                    let mut stream = Box::pin(stream);
                    while let Some(r) = stream.next().await {
                        match r {
                            Ok(row) => got.push(row.get::<_, i64>(0)),
                            Err(e) => {
                                failure = Some(e);
                                break;
                            }
                        }
                    }
                }
            }
            let err = failure.unwrap_or_else(|| {
                panic!("no error, {} rows (bad row {k} on shard {s})", got.len())
            });
            assert_eq!(code(&err).as_deref(), Some("22012"), "{err}");
            assert_eq!(
                got,
                (1..=got.len() as i64).collect::<Vec<_>>(),
                "rows before the error are not a prefix of the merged order"
            );
            assert!(got.len() < k as usize, "a row past the failing one arrived");
            println!(
                "streamed merge, bad row {k} on shard {s}: {} rows arrived before 22012",
                got.len()
            );
            let n: i64 = c
                .query_one(&format!("SELECT count(*) FROM {t}"), &[])
                .await
                .expect("after a streamed error")
                .get(0);
            assert_eq!(n, 6000);
        }
    })
    .await;

    // In a pipeline: only the failing request fails.
    bounded(30, "pipeline with a failing merge", async {
        let k = f.ids[1][10];
        let client = &client;
        let futs: Vec<BoxFut<'_>> = vec![
            Box::pin({
                let sql = format!("SELECT id, v FROM {t} ORDER BY v DESC, id LIMIT 5");
                async move { ext(client.query(&sql, &[])).await }
            }),
            Box::pin({
                let sql = format!("SELECT id, 1 / (id - {k}) FROM {t} ORDER BY id");
                async move { ext(client.query(&sql, &[])).await }
            }),
            Box::pin({
                let sql = format!(
                    "SELECT v % 10 AS g, count(*), sum(v), min(id), max(id) FROM {t} GROUP BY 1 ORDER BY 1"
                );
                async move { ext(client.query(&sql, &[])).await }
            }),
            Box::pin({
                let sql = format!("SELECT id, 1 / (id - {k}) FROM {t} ORDER BY id");
                async move { simple(client.simple_query(&sql)).await }
            }),
            Box::pin({
                let sql = format!("SELECT id, v FROM {t} ORDER BY v DESC, id LIMIT 3 OFFSET 2");
                async move { simple(client.simple_query(&sql)).await }
            }),
        ];
        let got = futures::future::join_all(futs).await;
        let want: Vec<Outcome> = vec![
            Ok(want_top(rows, Some(5), 0)),
            Err("22012".into()),
            Ok(want_groups(rows, 10)),
            Err("22012".into()),
            Ok(want_top(rows, Some(3), 2)),
        ];
        assert_eq!(got, want);
    })
    .await;

    // In a transaction that already wrote on both shards: aborted; ROLLBACK (or a COMMIT, which
    // Postgres turns into a rollback) leaves nothing, and no prepared transaction.
    let (k0, k1) = (f.ids[0][0], f.ids[1][0]);
    for end in ["ROLLBACK", "COMMIT"] {
        bounded(30, "error in a two-shard transaction", async {
            client.batch_execute("BEGIN").await.expect("begin");
            for k in [k0, k1] {
                client
                    .execute(&format!("UPDATE {t} SET v = -1 WHERE id = $1"), &[&k])
                    .await
                    .expect("write in the transaction");
            }
            let err = client
                .query(
                    &format!("SELECT id, 1 / (id - {k1}) FROM {t} ORDER BY id"),
                    &[],
                )
                .await
                .expect_err("22012 in the transaction");
            assert_eq!(code(&err).as_deref(), Some("22012"), "{err}");
            for sql in [
                "SELECT 1".to_string(),
                format!("SELECT count(*) FROM {t}"),
                format!("SELECT id FROM {t} ORDER BY id LIMIT 2"),
            ] {
                let err = client
                    .query(&sql, &[])
                    .await
                    .expect_err("aborted transaction");
                assert_eq!(code(&err).as_deref(), Some("25P02"), "{sql}: {err}");
            }
            let err = client
                .query(&format!("SELECT v FROM {t} WHERE id = $1"), &[&k0])
                .await
                .expect_err("aborted transaction, keyed");
            assert_eq!(code(&err).as_deref(), Some("25P02"), "{err}");
            let r = client.simple_query(end).await;
            match r {
                Ok(msgs) => {
                    // Postgres answers COMMIT of a failed transaction with a ROLLBACK tag.
                    let tag_ok = msgs
                        .iter()
                        .any(|m| matches!(m, SimpleQueryMessage::CommandComplete(_)));
                    assert!(tag_ok, "{end}: no CommandComplete");
                }
                Err(e) => panic!(
                    "{end} of an aborted transaction failed (Postgres: no error, tag ROLLBACK): {e}"
                ),
            }
            let msgs = client
                .simple_query("SELECT now() = statement_timestamp()")
                .await
                .expect("after the transaction");
            assert_eq!(
                simple_rows(&msgs)[0].get(0),
                Some("t"),
                "{end}: left in a transaction"
            );
            for (s, k) in [(0, k0), (1, k1)] {
                let direct = common::connect_primary(s).await;
                let v: i32 = direct
                    .query_one(&format!("SELECT v FROM {t} WHERE id = $1"), &[&k])
                    .await
                    .expect("direct")
                    .get(0);
                assert_eq!(
                    v,
                    rows[(k - 1) as usize].v,
                    "{end}: write on shard {s} landed"
                );
            }
            assert_eq!(
                prepared_of(f.proxy.handle.shared.config.node_id).await,
                Vec::<String>::new(),
                "{end}: prepared transactions left"
            );
        })
        .await;
    }
    usable(&client, &f, total, "after the transactions").await;
}

// === 3. clients vanishing mid-merge ===

#[tokio::test(flavor = "multi_thread")]
async fn clients_disconnecting_mid_merge_leak_nothing() {
    let f = fixture(30_000, 2).await;
    let t = &f.t;
    let rows = &f.rows;
    let total: i64 = rows.iter().map(|r| i64::from(r.v)).sum();
    let node = f.proxy.handle.shared.config.node_id;
    // About 30 MB merged by id: far more than the socket buffers hold.
    let big = format!("SELECT id, note, repeat('x', 1000) AS pad FROM {t} ORDER BY id");
    let (k0, k1) = (f.ids[0][5], f.ids[1][5]);
    bounded(120, "disconnects mid-merge", async {
        for round in 0..10 {
            let step = format!("round {round} (variant {})", round % 5);
            match round % 5 {
                0 => {
                    // Extended protocol, abrupt: the socket closes without a Terminate.
                    let (client, handle) = connect_abortable(&f.proxy.conninfo()).await;
                    let stream = client
                        .query_raw(big.as_str(), std::iter::empty::<i64>())
                        .await
                        .expect("big merge");
                    let mut stream = Box::pin(stream);
                    for want in 1..=10i64 {
                        let row = stream.next().await.expect("row").expect("row ok");
                        assert_eq!(row.get::<_, i64>(0), want);
                    }
                    handle.abort();
                    drop(stream);
                    drop(client);
                }
                1 => {
                    // Simple protocol, abrupt.
                    let (client, handle) = connect_abortable(&f.proxy.conninfo()).await;
                    let stream = client.simple_query_raw(&big).await.expect("big merge");
                    let mut stream = Box::pin(stream);
                    for _ in 0..10 {
                        stream.next().await.expect("msg").expect("msg ok");
                    }
                    handle.abort();
                    drop(stream);
                    drop(client);
                }
                2 => {
                    // Raw socket: a few messages read, then closed.
                    let mut c = raw::Raw::login(f.proxy.port).await;
                    c.send(&raw::query(&big)).await;
                    for _ in 0..20 {
                        let m = c.read().await;
                        assert!(m.tag == b'T' || m.tag == b'D', "{m:?}");
                    }
                    drop(c);
                }
                3 => {
                    // Raw socket: a Terminate in the middle of the result, nothing read.
                    let mut c = raw::Raw::login(f.proxy.port).await;
                    let mut batch = raw::parse("", &big);
                    batch.extend(raw::bind("", "", &[]));
                    batch.extend(raw::execute("", 0));
                    batch.extend(raw::sync());
                    c.send(&batch).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    c.send(&raw::terminate()).await;
                    drop(c);
                }
                _ => {
                    // In a transaction that wrote on both shards (two-phase commit pending).
                    let (client, handle) = connect_abortable(&f.proxy.conninfo()).await;
                    client.batch_execute("BEGIN").await.expect("begin");
                    for k in [k0, k1] {
                        client
                            .execute(
                                &format!("UPDATE {t} SET v = v + 1000000 WHERE id = $1"),
                                &[&k],
                            )
                            .await
                            .expect("write");
                    }
                    let stream = client
                        .query_raw(big.as_str(), std::iter::empty::<i64>())
                        .await
                        .expect("big merge in the transaction");
                    let mut stream = Box::pin(stream);
                    for _ in 0..10 {
                        stream.next().await.expect("row").expect("row ok");
                    }
                    handle.abort();
                    drop(stream);
                    drop(client);
                }
            }
            // A new client works at once, on both shards, keyed and merged (the pool has 2
            // connections per server: two leaked ones would block it).
            let next = f.proxy.connect().await;
            for (s, k) in [(0, k0), (1, k1)] {
                let v: i32 = bounded(
                    10,
                    &step,
                    next.query_one(&format!("SELECT v FROM {t} WHERE id = $1"), &[&k]),
                )
                .await
                .unwrap_or_else(|e| panic!("{step}: keyed read on shard {s}: {e}"))
                .get(0);
                assert_eq!(
                    v,
                    rows[(k - 1) as usize].v,
                    "{step}: a write of the dead client landed"
                );
            }
            let row = bounded(
                10,
                &step,
                next.query_one(&format!("SELECT count(*), sum(v) FROM {t}"), &[]),
            )
            .await
            .unwrap_or_else(|e| panic!("{step}: merged count: {e}"));
            assert_eq!(
                (row.get::<_, i64>(0), row.get::<_, i64>(1)),
                (30_000, total),
                "{step}"
            );
            let ids: Vec<i64> = bounded(
                10,
                &step,
                next.query(&format!("SELECT id FROM {t} ORDER BY id DESC LIMIT 3"), &[]),
            )
            .await
            .unwrap_or_else(|e| panic!("{step}: merged top: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect();
            assert_eq!(ids, [30_000, 29_999, 29_998], "{step}");
            drop(next);
        }
        pools_settle(&f.proxy, 2, "after 10 disconnects").await;
        // No server still streams the big result to nobody.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let active = active_with("repeat('x', 1000)").await;
            if active == [0, 0] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "servers still running the abandoned merge: {active:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(prepared_of(node).await, Vec::<String>::new());
        // Ten more clients in a row, each with a full merge, over the same 2 connections.
        for n in 0..10 {
            let c = f.proxy.connect().await;
            let got = bounded(
                20,
                "full merge after the disconnects",
                c.query(&format!("SELECT id FROM {t} ORDER BY id"), &[]),
            )
            .await
            .unwrap_or_else(|e| panic!("client {n}: {e}"));
            assert_eq!(got.len(), 30_000);
        }
        pools_settle(&f.proxy, 2, "after 10 more clients").await;
    })
    .await;
}

// === 4. extended-protocol merges ===

#[tokio::test(flavor = "multi_thread")]
async fn a_named_statement_with_many_limit_parameters() {
    let f = fixture(1500, 4).await;
    let t = &f.t;
    let rows = &f.rows;
    let client = f.proxy.connect().await;
    bounded(60, "LIMIT parameters", async {
        let top = client
            .prepare(&format!(
                "SELECT id, v FROM {t} ORDER BY v DESC, id LIMIT $1 OFFSET $2"
            ))
            .await
            .expect("prepare");
        assert_eq!(top.params(), &[Type::INT8, Type::INT8]);
        assert_eq!(top.columns().len(), 2);
        let cases: [(Option<i64>, Option<i64>); 14] = [
            (Some(0), Some(0)),
            (Some(1), Some(0)),
            (Some(2), Some(1)),
            (Some(5), Some(0)),
            (Some(17), Some(3)),
            (Some(100), Some(1400)),
            (Some(999), Some(0)),
            (Some(1500), Some(0)),
            (Some(1501), Some(0)),
            (Some(10), Some(1495)),
            (Some(10), Some(1500)),
            (Some(10), Some(5000)),
            // LIMIT NULL is LIMIT ALL, OFFSET NULL is OFFSET 0.
            (None, Some(1490)),
            (Some(4), None),
        ];
        for round in 0..3 {
            for (l, o) in cases {
                let got: Vec<String> = client
                    .query(&top, &[&l, &o])
                    .await
                    .unwrap_or_else(|e| panic!("LIMIT {l:?} OFFSET {o:?}: {e}"))
                    .iter()
                    .map(ext_string)
                    .collect();
                assert_eq!(
                    got,
                    want_top(rows, l, o.unwrap_or(0)),
                    "round {round}: LIMIT {l:?} OFFSET {o:?}"
                );
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn negative_limit_or_offset_across_shards_gets_postgres_errors() {
    let f = fixture(100, 4).await;
    let t = &f.t;
    let rows = &f.rows;
    let client = f.proxy.connect().await;
    bounded(30, "negative LIMIT/OFFSET", async {
        let top = client
            .prepare(&format!(
                "SELECT id, v FROM {t} ORDER BY v DESC, id LIMIT $1 OFFSET $2"
            ))
            .await
            .expect("prepare");
        let mut wrong = Vec::new();
        // Parameters (extended protocol): what one Postgres answers.
        for (l, o, want) in [
            (Some(-1i64), Some(0i64), "2201W"),
            (Some(3), Some(-2), "2201X"),
        ] {
            let err = client
                .query(&top, &[&l, &o])
                .await
                .expect_err("negative LIMIT/OFFSET");
            let got = code_or_text(&err);
            if got != want {
                let msg = err.as_db_error().map(|d| d.message().to_string());
                wrong.push(format!(
                    "LIMIT {l:?} OFFSET {o:?} (parameters): {got} {msg:?}, Postgres: {want}"
                ));
            }
            let got: Vec<String> = client
                .query(&top, &[&Some(3i64), &Some(0i64)])
                .await
                .expect("after the error")
                .iter()
                .map(ext_string)
                .collect();
            assert_eq!(got, want_top(rows, Some(3), 0));
        }
        // Literals (simple protocol): Postgres' error, or a refusal.
        for (l, o, want) in [(-1, 0, "2201W"), (3, -2, "2201X")] {
            let err = client
                .simple_query(&format!(
                    "SELECT id, v FROM {t} ORDER BY v DESC, id LIMIT {l} OFFSET {o}"
                ))
                .await
                .expect_err("negative LIMIT/OFFSET literal");
            let got = code_or_text(&err);
            assert!(
                got == want || got == "0A000",
                "LIMIT {l} OFFSET {o}: {got} {err}"
            );
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_numeric_avg_and_timestamptz_match_one_postgres() {
    let f = fixture(3000, 4).await;
    let (t, all) = (&f.t, &f.all);
    let rows = &f.rows;
    let client = f.proxy.connect().await;
    let direct = common::connect_primary(0).await;
    bounded(60, "binary merges", async {
        let queries = [
            "SELECT count(*), sum(amt), avg(amt), min(amt), max(amt), min(ts), max(ts), avg(v), sum(v), count(amt) FROM {T}",
            "SELECT v % 5 AS g, count(*), sum(amt), avg(amt), min(ts), max(ts), avg(v) FROM {T} GROUP BY 1 ORDER BY 1",
            "SELECT v % 5 AS g, avg(amt) AS a FROM {T} GROUP BY 1 ORDER BY a DESC, g",
            "SELECT id, amt, ts FROM {T} ORDER BY amt DESC, id LIMIT 25",
            "SELECT id, amt, ts FROM {T} ORDER BY ts DESC, id LIMIT 25 OFFSET 7",
            "SELECT id, ts FROM {T} ORDER BY ts, amt DESC, id",
            "SELECT avg(amt), sum(amt) FROM {T} WHERE v < 0",
            "SELECT DISTINCT ts FROM {T} ORDER BY ts DESC LIMIT 10",
            "SELECT min(ts), max(ts), avg(amt) FROM {T} WHERE id % 2 = 0 HAVING count(*) > 100",
        ];
        for q in queries {
            let through = client
                .query(&q.replace("{T}", t), &[])
                .await
                .unwrap_or_else(|e| panic!("{q}: {e}"));
            let plain = direct
                .query(&q.replace("{T}", all), &[])
                .await
                .unwrap_or_else(|e| panic!("reference {q}: {e}"));
            let types = |rows: &[tokio_postgres::Row]| -> Vec<Type> {
                rows.first()
                    .map(|r| r.columns().iter().map(|c| c.type_().clone()).collect())
                    .unwrap_or_default()
            };
            assert_eq!(types(&through), types(&plain), "column types of {q}");
            let a: Vec<BinRow> = through.iter().map(raw_row).collect();
            let b: Vec<BinRow> = plain.iter().map(raw_row).collect();
            if a != b {
                let a: Vec<String> = through.iter().map(ext_string).collect();
                let b: Vec<String> = plain.iter().map(ext_string).collect();
                panic!("binary result of {q} differs:\n proxy: {a:?}\n plain: {b:?}");
            }
            // The same in text format (simple protocol).
            let a = simple_strings(
                &client
                    .simple_query(&q.replace("{T}", t))
                    .await
                    .unwrap_or_else(|e| panic!("simple {q}: {e}")),
            );
            let b = simple_strings(
                &direct
                    .simple_query(&q.replace("{T}", all))
                    .await
                    .expect("reference simple"),
            );
            assert_eq!(a, b, "text result of {q}");
        }
        // And against values computed here.
        let row = client
            .query_one(
                &format!("SELECT count(*), sum(amt), min(ts), max(ts), min(amt) FROM {t}"),
                &[],
            )
            .await
            .expect("totals");
        let cents: i64 = rows.iter().map(|r| r.cents).sum();
        let sign = if cents < 0 { "-" } else { "" };
        assert_eq!(row.get::<_, i64>(0), 3000);
        assert_eq!(
            ext_string(&row).split('|').nth(1).unwrap(),
            format!("{sign}{}.{:02}", cents.abs() / 100, cents.abs() % 100)
        );
        let min_ts = rows.iter().map(Row::pg_us).min().unwrap();
        let max_ts = rows.iter().map(Row::pg_us).max().unwrap();
        let min_raw: RawVal = row.get(2);
        let max_raw: RawVal = row.get(3);
        assert_eq!(min_raw.0, min_ts.to_be_bytes());
        assert_eq!(max_raw.0, max_ts.to_be_bytes());
        let min_sys: std::time::SystemTime = row.get(2);
        let unix = rows.iter().map(|r| r.unix_us).min().unwrap();
        assert_eq!(
            min_sys,
            std::time::UNIX_EPOCH + Duration::from_micros(unix as u64)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn describe_statement_before_bind_on_merged_statements() {
    let f = fixture(800, 4).await;
    let (t, all) = (&f.t, &f.all);
    let rows = &f.rows;
    let direct = common::connect_primary(0).await;
    bounded(40, "describe before bind", async {
        let mut c = raw::Raw::login(f.proxy.port).await;
        // Aggregates rewritten for the shards (avg runs as sum and count), ordered by an
        // aggregate: the description is the client's statement's, not the shards'.
        let grouped = "SELECT v % 5 AS g, avg(amt) AS a, count(*) FROM {T} GROUP BY 1 ORDER BY a DESC, g LIMIT $1";
        let mut batch = raw::parse("d1", &grouped.replace("{T}", t));
        batch.extend(raw::describe(b'S', "d1"));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let reply = c.until_ready().await;
        assert_eq!(raw::tags(&reply), "1tTZ", "{}", raw::explain(&reply));
        assert_eq!(reply[1].params(), Some(vec![20]));
        assert_eq!(
            reply[2].fields(),
            Some(vec![
                ("g".to_string(), 23, 0),
                ("a".to_string(), 1700, 0),
                ("count".to_string(), 20, 0)
            ])
        );
        // Bind with binary results, Describe the portal, Execute.
        let mut batch = raw::bind_fmt("", "d1", &[Some("3")], &[1]);
        batch.extend(raw::describe(b'P', ""));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let reply = c.until_ready().await;
        assert_eq!(raw::shape(&reply), "2TD3CZ", "{}", raw::explain(&reply));
        assert_eq!(
            reply[1].fields(),
            Some(vec![
                ("g".to_string(), 23, 1),
                ("a".to_string(), 1700, 1),
                ("count".to_string(), 20, 1)
            ])
        );
        let got: Vec<BinRow> = reply.iter().filter_map(raw::Msg::cols).collect();
        let want: Vec<BinRow> = direct
            .query(&grouped.replace("{T}", all), &[&3i64])
            .await
            .expect("reference")
            .iter()
            .map(raw_row)
            .collect();
        assert_eq!(got, want, "binary rows of the described statement");

        // A sort key outside the select list travels as an extra column: never described or
        // sent.
        let notes = format!("SELECT note FROM {t} ORDER BY v DESC, id LIMIT $1");
        // (Parse in a batch of its own: a named Parse with its Bind in one batch is
        // `raw_named_parse_and_bind_in_one_merged_batch`.)
        let mut batch = raw::parse("d2", &notes);
        batch.extend(raw::describe(b'S', "d2"));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let described = c.until_ready().await;
        assert_eq!(raw::tags(&described), "1tTZ", "{}", raw::explain(&described));
        assert_eq!(described[2].fields(), Some(vec![("note".to_string(), 25, 0)]));
        let mut batch = raw::bind("", "d2", &["6"]);
        batch.extend(raw::describe(b'P', ""));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let reply = c.until_ready().await;
        assert_eq!(raw::shape(&reply), "2TD6CZ", "{}", raw::explain(&reply));
        assert_eq!(reply[1].fields(), Some(vec![("note".to_string(), 25, 0)]));
        let got: Vec<BinRow> = reply.iter().filter_map(raw::Msg::cols).collect();
        let mut sorted: Vec<&Row> = rows.iter().collect();
        sorted.sort_by(|a, b| b.v.cmp(&a.v).then(a.id.cmp(&b.id)));
        let want: Vec<BinRow> = sorted[..6]
            .iter()
            .map(|r| vec![Some(r.note().into_bytes())])
            .collect();
        assert_eq!(got, want, "only the selected column");

        // The unnamed statement, described and bound in one batch, twice with other limits.
        let parts: Vec<Vec<u8>> = ["2", "4"]
            .iter()
            .map(|l| {
                let mut part = raw::parse("", &notes);
                part.extend(raw::describe(b'S', ""));
                part.extend(raw::bind("", "", &[l]));
                part.extend(raw::execute("", 0));
                part
            })
            .collect();
        let reply = batch_or_pipeline(&mut c, &parts, "two unnamed merged statements").await;
        assert_eq!(raw::shape(&reply), "1tT2D2C1tT2D4C", "{}", raw::explain(&reply));
        let got: Vec<String> = reply.iter().filter_map(raw::Msg::text).collect();
        let want: Vec<String> = sorted[..2]
            .iter()
            .chain(&sorted[..4])
            .map(|r| r.note())
            .collect();
        assert_eq!(got, want);

        // Describe Statement through tokio-postgres (prepare) of rewritten shapes.
        let client = f.proxy.connect().await;
        for (sql, want) in [
            (
                format!("SELECT avg(amt) FROM {t}"),
                vec![("avg", Type::NUMERIC)],
            ),
            (
                format!("SELECT avg(v) AS m, count(DISTINCT v) FROM {t}"),
                vec![("m", Type::NUMERIC), ("count", Type::INT8)],
            ),
            (
                format!("SELECT ts FROM {t} ORDER BY amt, id LIMIT $1"),
                vec![("ts", Type::TIMESTAMPTZ)],
            ),
            (
                format!(
                    "SELECT v % 3 AS g, max(ts) FROM {t} GROUP BY 1 HAVING count(*) > 1 ORDER BY 1"
                ),
                vec![("g", Type::INT4), ("max", Type::TIMESTAMPTZ)],
            ),
        ] {
            let stmt = client
                .prepare(&sql)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let got: Vec<(&str, Type)> = stmt
                .columns()
                .iter()
                .map(|c| (c.name(), c.type_().clone()))
                .collect();
            assert_eq!(got, want, "{sql}");
            let params: Vec<i64> = vec![5; stmt.params().len()];
            let params: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            let out = client
                .query(&stmt, &params)
                .await
                .unwrap_or_else(|e| panic!("run {sql}: {e}"));
            for row in &out {
                assert_eq!(row.len(), want.len(), "{sql}: extra columns in a row");
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_statement_for_one_shard_and_for_all_alternately() {
    let f = fixture(1000, 4).await;
    let (t, all) = (&f.t, &f.all);
    let rows = &f.rows;
    let (a, b) = (&f.ids[0], &f.ids[1]);
    let client = f.proxy.connect().await;
    let direct = common::connect_primary(0).await;
    bounded(60, "one statement, several routes", async {
        let list = client
            .prepare(&format!(
                "SELECT id, v FROM {t} WHERE id = ANY($1) ORDER BY id"
            ))
            .await
            .expect("prepare list");
        let agg_sql = "SELECT count(*), sum(v), avg(amt), max(ts) FROM {T} WHERE id = ANY($1)";
        let agg = client
            .prepare(&agg_sql.replace("{T}", t))
            .await
            .expect("prepare agg");
        let agg_ref = direct
            .prepare(&agg_sql.replace("{T}", all))
            .await
            .expect("prepare reference");
        let sets: Vec<Vec<i64>> = vec![
            vec![a[0]],
            vec![a[0], b[0]],
            vec![b[1]],
            vec![a[1], a[2], a[3]],
            vec![],
            vec![b[2], b[2]],
            vec![a[4], 999_999],
            (1..=1000).collect(),
            vec![b[3], a[5], b[4]],
            vec![999_998],
        ];
        for round in 0..4 {
            for ids in &sets {
                let got: Vec<String> = client
                    .query(&list, &[ids])
                    .await
                    .unwrap_or_else(|e| panic!("list {ids:?}: {e}"))
                    .iter()
                    .map(ext_string)
                    .collect();
                let set: BTreeSet<i64> = ids.iter().copied().collect();
                let want: Vec<String> = rows
                    .iter()
                    .filter(|r| set.contains(&r.id))
                    .map(|r| format!("{}|{}", r.id, r.v))
                    .collect();
                assert_eq!(got, want, "round {round}: ANY({ids:?})");
                let got: Vec<BinRow> = client
                    .query(&agg, &[ids])
                    .await
                    .unwrap_or_else(|e| panic!("agg {ids:?}: {e}"))
                    .iter()
                    .map(raw_row)
                    .collect();
                let want: Vec<BinRow> = direct
                    .query(&agg_ref, &[ids])
                    .await
                    .expect("reference")
                    .iter()
                    .map(raw_row)
                    .collect();
                assert_eq!(got, want, "round {round}: aggregates over ANY({ids:?})");
            }
        }
        // The same on the raw protocol, one Sync batch routing each Bind differently.
        let mut c = raw::Raw::login(f.proxy.port).await;
        let mut batch = raw::parse(
            "any",
            &format!("SELECT id, v FROM {t} WHERE id = ANY($1) ORDER BY id"),
        );
        batch.extend(raw::sync());
        c.send(&batch).await;
        assert_eq!(raw::tags(&c.until_ready().await), "1Z");
        let sets = [
            format!("{{{}}}", a[0]),
            format!("{{{},{}}}", b[0], a[0]),
            format!("{{{}}}", b[0]),
            format!("{{{},{},{}}}", a[1], b[1], b[2]),
            format!("{{{}}}", a[1]),
        ];
        let parts: Vec<Vec<u8>> = sets
            .iter()
            .map(|s| {
                let mut part = raw::bind("", "any", &[s]);
                part.extend(raw::execute("", 0));
                part
            })
            .collect();
        let reply = batch_or_pipeline(&mut c, &parts, "Binds routed to one shard and to two").await;
        assert_eq!(
            raw::shape(&reply),
            "2D1C2D2C2D1C2D3C2D1C",
            "{}",
            raw::explain(&reply)
        );
        let got: Vec<String> = reply.iter().filter_map(raw::Msg::text).collect();
        let v = |id: i64| rows[(id - 1) as usize].v;
        let mut want = Vec::new();
        for set in [
            vec![a[0]],
            {
                let mut s = vec![a[0], b[0]];
                s.sort_unstable();
                s
            },
            vec![b[0]],
            {
                let mut s = vec![a[1], b[1], b[2]];
                s.sort_unstable();
                s
            },
            vec![a[1]],
        ] {
            want.extend(set.iter().map(|&id| format!("{id}|{}", v(id))));
        }
        assert_eq!(got, want);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_named_parse_and_bind_in_one_merged_batch() {
    // JDBC (after prepareThreshold) and other drivers send Parse of a named statement with its
    // Bind/Execute and Sync in one batch. Over several shards the answer must be right and the
    // session must go on exactly like Postgres: the next batch gets its own replies.
    let f = fixture(200, 4).await;
    let t = &f.t;
    let rows = &f.rows;
    bounded(30, "named Parse + Bind in one merged batch", async {
        let shapes = [
            (
                format!("SELECT id, v FROM {t} ORDER BY v DESC, id LIMIT $1"),
                vec!["6"],
                "12D6C",
            ),
            (format!("SELECT count(*) FROM {t}"), vec![], "12D1C"),
            (format!("SELECT id FROM {t}"), vec![], "12D200C"),
        ];
        for (n, (sql, params, want)) in shapes.iter().enumerate() {
            let mut c = raw::Raw::login(f.proxy.port).await;
            let mut batch = raw::parse(&format!("s{n}"), sql);
            batch.extend(raw::bind("", &format!("s{n}"), params));
            batch.extend(raw::execute("", 0));
            batch.extend(raw::sync());
            c.send(&batch).await;
            let reply = c.until_ready().await;
            assert_eq!(raw::shape(&reply), format!("{want}Z"), "{sql}: {}", raw::explain(&reply));
            // The next batch, a plain one.
            let mut batch = raw::parse("", "SELECT 41 + 1");
            batch.extend(raw::bind("", "", &[]));
            batch.extend(raw::execute("", 0));
            batch.extend(raw::sync());
            c.send(&batch).await;
            let next = c.until_ready().await;
            assert_eq!(
                raw::shape(&next),
                "12D1CZ",
                "the batch after `{sql}` (named Parse + Bind + Execute + Sync over both shards) got {}",
                raw::explain(&next)
            );
            // The statement is usable again on both shards.
            let mut batch = raw::bind("", &format!("s{n}"), params);
            batch.extend(raw::execute("", 0));
            batch.extend(raw::sync());
            c.send(&batch).await;
            let again = c.until_ready().await;
            assert_eq!(raw::shape(&again), format!("{}Z", &want[1..]), "{sql} again");
            if n == 0 {
                let got: Vec<String> = again.iter().filter_map(raw::Msg::text).collect();
                assert_eq!(got, want_top(rows, Some(6), 0));
            }
        }
    })
    .await;
}

// === 5. cancel ===

/// Runs `sql` (a slow statement on both shards) on `client`, cancels it after `after`, and
/// returns the result and the time from the cancel to the reply.
async fn run_and_cancel(
    client: &Client,
    sql: &str,
    after: Duration,
) -> (Result<(), tokio_postgres::Error>, Duration) {
    let token = client.cancel_token();
    let query = async {
        let r = client.query(sql, &[]).await.map(|_| ());
        (r, Instant::now())
    };
    let cancel = async {
        tokio::time::sleep(after).await;
        let at = Instant::now();
        token
            .cancel_query(NoTls)
            .await
            .expect("cancel request sent");
        at
    };
    let ((r, done), at) = tokio::join!(query, cancel);
    (r, done.saturating_duration_since(at))
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_merged_query_on_every_shard() {
    // ~20 rows per shard and 0.3 s per row: each shard needs about 6 s.
    let f = fixture(40, 2).await;
    let t = &f.t;
    assert!(
        f.ids[0].len() >= 12 && f.ids[1].len() >= 12,
        "shards of {} and {} rows",
        f.ids[0].len(),
        f.ids[1].len()
    );
    let client = f.proxy.connect().await;
    let mut failures = Vec::new();
    let shapes = [
        (
            "ORDER BY",
            format!("SELECT id, pg_sleep(0.3)::text FROM {t} ORDER BY id"),
        ),
        (
            "aggregate",
            format!("SELECT count(*) FROM {t} WHERE pg_sleep(0.3)::text = ''"),
        ),
        (
            "GROUP BY",
            format!("SELECT v % 3, count(*) FROM {t} WHERE pg_sleep(0.3)::text = '' GROUP BY 1"),
        ),
    ];
    for (name, sql) in &shapes {
        let (r, took) = bounded(
            20,
            name,
            run_and_cancel(&client, sql, Duration::from_millis(800)),
        )
        .await;
        let still = active_with("pg_sleep(0.3)").await;
        let outcome = match &r {
            Ok(()) => "completed (not cancelled)".to_string(),
            Err(e) => code_or_text(e),
        };
        println!(
            "cancel of {name}: {outcome} after {took:?}; statements still running per shard right after: {still:?}"
        );
        if outcome != "57014" || took > Duration::from_secs(3) {
            failures.push(format!(
                "{name}: {outcome} {took:?} after the cancel (want 57014 in < 3 s); still running per shard: {still:?}"
            ));
        }
        // Usable afterwards, and promptly (nothing left running holds the connections).
        let start = Instant::now();
        let n: i64 = bounded(
            15,
            "after the cancel",
            client.query_one(&format!("SELECT count(*) FROM {t}"), &[]),
        )
        .await
        .unwrap_or_else(|e| panic!("{name}: after the cancel: {e}"))
        .get(0);
        assert_eq!(n, 40);
        println!("  next query after {:?}", start.elapsed());
        // Let any shard still sleeping finish before the next shape.
        let deadline = Instant::now() + Duration::from_secs(15);
        while active_with("pg_sleep(0.3)").await != [0, 0] && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Simple protocol, inside a transaction that wrote on both shards: 57014, then 25P02,
    // then ROLLBACK leaves nothing.
    let (k0, k1) = (f.ids[0][0], f.ids[1][0]);
    client.batch_execute("BEGIN").await.expect("begin");
    for k in [k0, k1] {
        client
            .execute(&format!("UPDATE {t} SET v = -7 WHERE id = $1"), &[&k])
            .await
            .expect("write");
    }
    let token = client.cancel_token();
    let sql = format!("SELECT id, pg_sleep(0.3)::text FROM {t} ORDER BY id");
    let query = async {
        let r = client.simple_query(&sql).await.map(|_| ());
        (r, Instant::now())
    };
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        let at = Instant::now();
        token.cancel_query(NoTls).await.expect("cancel sent");
        at
    };
    let ((r, done), at) = bounded(20, "cancel in a transaction", async {
        tokio::join!(query, cancel)
    })
    .await;
    let took = done.saturating_duration_since(at);
    let outcome = match &r {
        Ok(()) => "completed (not cancelled)".to_string(),
        Err(e) => code_or_text(e),
    };
    println!("cancel in a transaction (simple protocol): {outcome} after {took:?}");
    if outcome != "57014" || took > Duration::from_secs(3) {
        failures.push(format!(
            "simple protocol in a transaction: {outcome} {took:?} after the cancel (want 57014 in < 3 s)"
        ));
    }
    if r.is_err() {
        let err = client
            .simple_query("SELECT 1")
            .await
            .expect_err("aborted transaction");
        assert_eq!(code(&err).as_deref(), Some("25P02"), "{err}");
    }
    bounded(20, "rollback", client.batch_execute("ROLLBACK"))
        .await
        .expect("rollback");
    for (s, k) in [(0, k0), (1, k1)] {
        let direct = common::connect_primary(s).await;
        let v: i32 = direct
            .query_one(&format!("SELECT v FROM {t} WHERE id = $1"), &[&k])
            .await
            .expect("direct")
            .get(0);
        assert_eq!(v, f.rows[(k - 1) as usize].v, "write on shard {s} survived");
    }
    assert!(
        failures.is_empty(),
        "cancel across shards:\n{}",
        failures.join("\n")
    );
}

// === 6. two-phase commit under concurrency ===

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_transfers_across_shards_keep_the_total() {
    let acct = unique("acct");
    let proxy = Proxy::start_sharded(|c| {
        c.sharding.tables.insert(acct.clone(), "id".into());
        c.pool.size = 10;
        c.routing.replica_reads = false;
    })
    .await;
    let node = proxy.handle.shared.config.node_id;
    let router = router_for(&acct);
    let setup = proxy.connect().await;
    setup
        .batch_execute(&format!(
            "CREATE TABLE {acct} (id bigint PRIMARY KEY, bal bigint NOT NULL)"
        ))
        .await
        .expect("DDL");
    const ACCOUNTS: i64 = 64;
    const START: i64 = 1000;
    // Loaded through the proxy: one INSERT split over both shards.
    let values: Vec<String> = (1..=ACCOUNTS).map(|i| format!("({i}, {START})")).collect();
    let n = setup
        .execute(
            &format!("INSERT INTO {acct} (id, bal) VALUES {}", values.join(", ")),
            &[],
        )
        .await
        .expect("split insert");
    assert_eq!(n, ACCOUNTS as u64);
    let mut sides = [Vec::new(), Vec::new()];
    for id in 1..=ACCOUNTS {
        sides[shard_of(&router, &acct, id)].push(id);
    }
    assert!(sides[0].len() > 5 && sides[1].len() > 5);
    let total = ACCOUNTS * START;

    // A reader summing across shards while transfers commit (no global snapshot: a sum may
    // see one side of a transfer; reported, not asserted).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let conninfo = proxy.conninfo();
        let acct = acct.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let c = common::connect(&conninfo).await.expect("reader");
            let (mut reads, mut off) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let sum: Option<RawVal> = c
                    .query_one(&format!("SELECT sum(bal) FROM {acct}"), &[])
                    .await
                    .expect("merged sum during transfers")
                    .get(0);
                let sum = numeric_text(&sum.expect("a sum").0);
                reads += 1;
                if sum != total.to_string() {
                    off += 1;
                }
            }
            (reads, off)
        })
    };

    let mut workers = Vec::new();
    for w in 0..8u64 {
        let conninfo = proxy.conninfo();
        let acct = acct.clone();
        let sides = sides.clone();
        workers.push(tokio::spawn(async move {
            let mut client = common::connect(&conninfo).await.expect("worker connect");
            client
                .batch_execute("SET lock_timeout = '500ms'")
                .await
                .expect("lock_timeout");
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w + 1).wrapping_mul(0x1234_5678_9ABC));
            let mut applied: BTreeMap<i64, i64> = BTreeMap::new();
            let mut retries: BTreeMap<String, u64> = BTreeMap::new();
            for n in 0..50 {
                let a = sides[0][rng.below(sides[0].len() as u64) as usize];
                let b = sides[1][rng.below(sides[1].len() as u64) as usize];
                let amount = 1 + rng.below(5) as i64;
                // Money flows a -> b or b -> a; the statements in either order.
                let (from, to) = if rng.below(2) == 0 { (a, b) } else { (b, a) };
                let flip = rng.below(2) == 0;
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    assert!(attempt < 100, "worker {w} transfer {n}: too many retries");
                    let r: Result<(), tokio_postgres::Error> = if w % 2 == 0 {
                        // Extended protocol, a transaction object.
                        async {
                            let tx = client.transaction().await?;
                            let debit = format!("UPDATE {acct} SET bal = bal - $2 WHERE id = $1");
                            let credit = format!("UPDATE {acct} SET bal = bal + $2 WHERE id = $1");
                            let steps = if flip {
                                [(&credit, to), (&debit, from)]
                            } else {
                                [(&debit, from), (&credit, to)]
                            };
                            for (sql, id) in steps {
                                let n = tx.execute(sql.as_str(), &[&id, &amount]).await?;
                                assert_eq!(n, 1);
                            }
                            tx.commit().await
                        }
                        .await
                    } else {
                        // Simple protocol, one statement per message.
                        async {
                            client.batch_execute("BEGIN").await?;
                            let debit =
                                format!("UPDATE {acct} SET bal = bal - {amount} WHERE id = {from}");
                            let credit =
                                format!("UPDATE {acct} SET bal = bal + {amount} WHERE id = {to}");
                            let steps = if flip {
                                [credit, debit]
                            } else {
                                [debit, credit]
                            };
                            for sql in steps {
                                if let Err(e) = client.batch_execute(&sql).await {
                                    let _ = client.batch_execute("ROLLBACK").await;
                                    return Err(e);
                                }
                            }
                            client.batch_execute("COMMIT").await
                        }
                        .await
                    };
                    match r {
                        Ok(()) => {
                            *applied.entry(from).or_default() -= amount;
                            *applied.entry(to).or_default() += amount;
                            break;
                        }
                        Err(e) => {
                            let c = code_or_text(&e);
                            // A deadlock Postgres sees, or a cross-shard one only the lock
                            // timeout breaks.
                            if matches!(c.as_str(), "40P01" | "55P03" | "40001") {
                                *retries.entry(c).or_default() += 1;
                                continue;
                            }
                            panic!("worker {w} transfer {n} attempt {attempt}: {c}: {e}");
                        }
                    }
                }
            }
            // Out of any transaction at the end.
            let msgs = client
                .simple_query("SELECT now() = statement_timestamp()")
                .await
                .expect("after the transfers");
            assert_eq!(simple_rows(&msgs)[0].get(0), Some("t"));
            (applied, retries)
        }));
    }
    let results = bounded(240, "transfers", futures::future::join_all(workers)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, off) = bounded(20, "reader", reader).await.expect("reader task");
    let mut expected: BTreeMap<i64, i64> = (1..=ACCOUNTS).map(|i| (i, START)).collect();
    let mut retries: BTreeMap<String, u64> = BTreeMap::new();
    for r in results {
        let (applied, tried) = r.expect("worker");
        for (id, delta) in applied {
            *expected.get_mut(&id).expect("account") += delta;
        }
        for (c, n) in tried {
            *retries.entry(c).or_default() += n;
        }
    }
    println!(
        "transfers: 400 committed, retries {retries:?}; concurrent merged sums: {off} of {reads} saw a transfer half done"
    );
    let check = proxy.connect().await;
    let got: BTreeMap<i64, i64> = check
        .query(&format!("SELECT id, bal FROM {acct} ORDER BY id"), &[])
        .await
        .expect("balances")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(got, expected, "balances through the proxy");
    let sum: RawVal = check
        .query_one(&format!("SELECT sum(bal) FROM {acct}"), &[])
        .await
        .expect("sum")
        .get(0);
    assert_eq!(numeric_text(&sum.0), total.to_string());
    // On the shards themselves.
    let mut direct_total = 0i64;
    for (s, side) in sides.iter().enumerate() {
        let direct = common::connect_primary(s).await;
        for row in direct
            .query(&format!("SELECT id, bal FROM {acct}"), &[])
            .await
            .expect("direct")
        {
            let (id, bal): (i64, i64) = (row.get(0), row.get(1));
            assert!(side.contains(&id), "account {id} on shard {s}");
            assert_eq!(bal, expected[&id], "account {id} on shard {s}");
            direct_total += bal;
        }
    }
    assert_eq!(direct_total, total);
    assert_eq!(
        prepared_of(node).await,
        Vec::<String>::new(),
        "prepared transactions of this proxy left behind"
    );
}

// === 7. tessera_next_id() in pipelines ===

#[tokio::test(flavor = "multi_thread")]
async fn next_id_mixed_into_pipelines() {
    let f = fixture(500, 4).await;
    let t = &f.t;
    let rows = &f.rows;
    let node = f.proxy.handle.shared.config.node_id;
    let client = f.proxy.connect().await;
    bounded(60, "next_id pipeline", async {
        let next = client
            .prepare("SELECT tessera_next_id()")
            .await
            .expect("prepare next id");
        let keyed = client
            .prepare(&format!("SELECT v FROM {t} WHERE id = $1"))
            .await
            .expect("prepare keyed");
        #[derive(Debug, PartialEq)]
        enum Out {
            Id(i64),
            Val(String),
        }
        let futs = (0..120i64).map(|i| {
            let (client, next, keyed) = (&client, &next, &keyed);
            async move {
                let r: Result<Out, String> = match i % 6 {
                    0 => client
                        .query_one("SELECT tessera_next_id()", &[])
                        .await
                        .map(|r| Out::Id(r.get(0))),
                    1 => client.query_one(next, &[]).await.map(|r| Out::Id(r.get(0))),
                    2 => client
                        .simple_query("SELECT tessera_next_id() AS nid")
                        .await
                        .map(|m| Out::Id(simple_rows(&m)[0].get(0).unwrap().parse().unwrap())),
                    3 => {
                        let k = 1 + (i * 7) % 500;
                        client
                            .query_one(keyed, &[&k])
                            .await
                            .map(|r| Out::Val(r.get::<_, i32>(0).to_string()))
                    }
                    4 => client
                        .query(
                            &format!("SELECT id FROM {t} ORDER BY v DESC, id LIMIT 3") as &str,
                            &[],
                        )
                        .await
                        .map(|r| {
                            Out::Val(
                                r.iter()
                                    .map(|x| x.get::<_, i64>(0).to_string())
                                    .collect::<Vec<_>>()
                                    .join(","),
                            )
                        }),
                    _ => client
                        .query_one("SELECT $1::bigint * 2", &[&i])
                        .await
                        .map(|r| Out::Val(r.get::<_, i64>(0).to_string())),
                }
                .map_err(|e| code_or_text(&e));
                r
            }
        });
        let results = futures::future::join_all(futs).await;
        let top3: String = want_top(rows, Some(3), 0)
            .iter()
            .map(|s| s.split('|').next().unwrap().to_string())
            .collect::<Vec<_>>()
            .join(",");
        let mut ids = HashSet::new();
        for (i, got) in results.into_iter().enumerate() {
            let i = i as i64;
            match (i % 6, got) {
                (0..=2, Ok(Out::Id(id))) => {
                    assert!(id > 0);
                    assert_eq!(tessera::ids::node_of(id), node, "request {i}");
                    assert!(ids.insert(id), "request {i}: duplicate id {id}");
                }
                (3, Ok(Out::Val(v))) => {
                    let k = 1 + (i * 7) % 500;
                    assert_eq!(v, rows[(k - 1) as usize].v.to_string(), "request {i}");
                }
                (4, Ok(Out::Val(v))) => assert_eq!(v, top3, "request {i}"),
                (5, Ok(Out::Val(v))) => assert_eq!(v, (i * 2).to_string(), "request {i}"),
                (_, got) => panic!("request {i}: {got:?}"),
            }
        }
        assert_eq!(ids.len(), 60);

        // Ids used as keys right away, pipelined inserts, then found on their shards.
        let insert = client
            .prepare(&format!(
                "INSERT INTO {t} (id, v, amt, ts, note) VALUES ($1, 1, 0, now(), 'id') RETURNING id"
            ))
            .await
            .expect("prepare insert");
        let fresh: Vec<i64> = futures::future::join_all((0..40).map(|_| async {
            client
                .query_one(&next, &[])
                .await
                .expect("next id")
                .get::<_, i64>(0)
        }))
        .await;
        let back = futures::future::join_all(fresh.iter().map(|id| {
            let (client, insert) = (&client, &insert);
            async move {
                client
                    .query_one(insert, &[id])
                    .await
                    .map(|r| r.get::<_, i64>(0))
            }
        }))
        .await;
        let back: Vec<i64> = back.into_iter().map(|r| r.expect("insert")).collect();
        assert_eq!(back, fresh);
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {t} WHERE note = 'id'"), &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(n, 40);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn next_id_in_one_sync_batch_with_server_statements() {
    // Drivers that pipeline (JDBC batches, pgx batches, npgsql) put several statements in one
    // Sync batch: the proxy's own answer must mix with the servers' in order.
    let f = fixture(500, 4).await;
    let t = &f.t;
    let rows = &f.rows;
    let node = f.proxy.handle.shared.config.node_id;
    bounded(30, "raw mixed batch", async {
        let mut wrong = Vec::new();
        let k = f.ids[1][0];
        // A keyed read (one shard) between two ids.
        let mut c = raw::Raw::login(f.proxy.port).await;
        let mut batch = raw::parse("nid", "SELECT tessera_next_id()");
        batch.extend(raw::bind("", "nid", &[]));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::parse(
            "kv",
            &format!("SELECT v FROM {t} WHERE id = $1"),
        ));
        batch.extend(raw::bind("", "kv", &[&k.to_string()]));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::bind("", "nid", &[]));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let reply = c.until_ready().await;
        let refused = reply.len() == 2 && reply[0].code().as_deref() == Some("0A000");
        if refused {
            // The documented limit: tessera_next_id() needs a Sync of its own.
            println!(
                "next id in a mixed batch: refused: {}",
                raw::explain(&reply)
            );
        } else if raw::tags(&reply) != "12DC12DC2DCZ" {
            wrong.push(format!(
                "next id, keyed read, next id in one batch: {} (want 12DC12DC2DCZ)",
                raw::explain(&reply)
            ));
        } else {
            let texts: Vec<String> = reply.iter().filter_map(raw::Msg::text).collect();
            assert_eq!(texts[1], rows[(k - 1) as usize].v.to_string());
            for id in [&texts[0], &texts[2]] {
                let id: i64 = id.parse().expect("an id");
                assert_eq!(tessera::ids::node_of(id), node);
            }
        }
        // A statement prepared earlier for the proxy, bound next to a merged statement.
        let mut c = raw::Raw::login(f.proxy.port).await;
        let mut batch = raw::parse("nid", "SELECT tessera_next_id()");
        batch.extend(raw::sync());
        c.send(&batch).await;
        assert_eq!(raw::tags(&c.until_ready().await), "1Z");
        let mut batch = raw::bind("", "nid", &[]);
        batch.extend(raw::execute("", 0));
        batch.extend(raw::parse("", &format!("SELECT count(*) FROM {t}")));
        batch.extend(raw::bind("", "", &[]));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let reply = c.until_ready().await;
        let refused = reply.len() == 2 && reply[0].code().as_deref() == Some("0A000");
        if refused {
            // The proxy's limit on batches with several Binds where one spans shards.
            println!(
                "next id then a merged count in one batch: refused: {}",
                raw::explain(&reply)
            );
        } else if raw::tags(&reply) != "2DC12DCZ" {
            wrong.push(format!(
                "next id then a merged count in one batch: {} (want 2DC12DCZ)",
                raw::explain(&reply)
            ));
        } else {
            let texts: Vec<String> = reply.iter().filter_map(raw::Msg::text).collect();
            assert_eq!(texts[1], "500");
        }
        // Either way the session goes on.
        c.send(&raw::query("SELECT tessera_next_id()")).await;
        assert_eq!(raw::tags(&c.until_ready().await), "TDCZ");
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn next_id_in_an_aborted_transaction_is_refused_with_25p02() {
    let f = fixture(50, 4).await;
    let t = &f.t;
    let node = f.proxy.handle.shared.config.node_id;
    let client = f.proxy.connect().await;
    // In a failed transaction every statement gets 25P02 until ROLLBACK, the proxy's own
    // answers included (Postgres refuses even the Parse).
    bounded(20, "next id in an aborted transaction", async {
        let mut wrong = Vec::new();
        client.batch_execute("BEGIN").await.expect("begin");
        let err = client
            .query(&format!("SELECT 1 / (id - id) FROM {t}"), &[])
            .await
            .expect_err("22012");
        assert_eq!(code(&err).as_deref(), Some("22012"));
        match client.simple_query("SELECT tessera_next_id()").await {
            Err(e) if code(&e).as_deref() == Some("25P02") => {}
            Err(e) => wrong.push(format!("simple protocol: {e}")),
            Ok(m) => wrong.push(format!(
                "simple protocol: answered {:?} inside the aborted transaction",
                simple_strings(&m)
            )),
        }
        match client.query("SELECT tessera_next_id()", &[]).await {
            Err(e) if code(&e).as_deref() == Some("25P02") => {}
            Err(e) => wrong.push(format!("extended protocol: {e}")),
            Ok(rows) => wrong.push(format!(
                "extended protocol: answered {:?} inside the aborted transaction",
                rows.iter().map(ext_string).collect::<Vec<_>>()
            )),
        }
        // Still aborted for everything else.
        let err = client
            .simple_query("SELECT 1")
            .await
            .expect_err("still aborted");
        assert_eq!(code(&err).as_deref(), Some("25P02"));
        client.batch_execute("ROLLBACK").await.expect("rollback");
        let id: i64 = client
            .query_one("SELECT tessera_next_id()", &[])
            .await
            .expect("after rollback")
            .get(0);
        assert_eq!(tessera::ids::node_of(id), node);
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    })
    .await;
}

// === 8. COPY of 100,000 rows ===

fn vm_rss_kb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn copy_rows(
    client: &Client,
    sql: &str,
    rows: impl Iterator<Item = String>,
    chunk: usize,
) -> Result<u64, tokio_postgres::Error> {
    let sink = client.copy_in(sql).await?;
    let mut sink = Box::pin(sink);
    let mut buf = Vec::with_capacity(chunk * 2);
    for row in rows {
        buf.extend_from_slice(row.as_bytes());
        // Cut wherever the chunk ends, mid-row included.
        while buf.len() >= chunk {
            let rest = buf.split_off(chunk);
            sink.send(bytes::Bytes::from(std::mem::replace(&mut buf, rest)))
                .await?;
        }
    }
    if !buf.is_empty() {
        sink.send(bytes::Bytes::from(buf)).await?;
    }
    sink.as_mut().finish().await
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_of_100k_rows_across_shards() {
    let name = unique("bigcopy");
    let proxy = Proxy::start_sharded(|c| {
        c.sharding.tables.insert(name.clone(), "id".into());
        c.routing.replica_reads = false;
    })
    .await;
    let router = router_for(&name);
    let client = proxy.connect().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {name} (id bigint PRIMARY KEY, v text NOT NULL)"
        ))
        .await
        .expect("DDL");
    const N: i64 = 100_000;
    let line = |i: i64| format!("{i}\tpayload {i} with\\ttab and \\\\ backslash\n");
    let before = vm_rss_kb();
    let n = bounded(
        120,
        "copy of 100k rows",
        copy_rows(
            &client,
            &format!("COPY {name} (id, v) FROM STDIN"),
            (1..=N).map(line),
            8191,
        ),
    )
    .await
    .expect("copy 100k");
    let after = vm_rss_kb();
    println!(
        "COPY 100k: test process RSS {before:?} kB -> {after:?} kB (whole process, other tests included)"
    );
    assert_eq!(n, N as u64);
    let row = client
        .query_one(
            &format!("SELECT count(*), count(DISTINCT id), min(id), max(id) FROM {name}"),
            &[],
        )
        .await
        .expect("count through the proxy");
    assert_eq!(
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3)
        ),
        (N, N, 1, N)
    );
    let v: String = client
        .query_one(&format!("SELECT v FROM {name} WHERE id = 77777"), &[])
        .await
        .expect("one row")
        .get(0);
    assert_eq!(v, "payload 77777 with\ttab and \\ backslash");
    let mut want = [0i64; 2];
    for id in 1..=N {
        want[shard_of(&router, &name, id)] += 1;
    }
    for (s, w) in want.iter().enumerate() {
        let direct = common::connect_primary(s).await;
        let got: i64 = direct
            .query_one(&format!("SELECT count(*) FROM {name}"), &[])
            .await
            .expect("direct count")
            .get(0);
        assert_eq!(got, *w, "rows on shard {s}");
    }

    // 100,000 more with a duplicate key as the very last row: nothing of it lands.
    let err = bounded(
        120,
        "failing copy",
        copy_rows(
            &client,
            &format!("COPY {name} (id, v) FROM STDIN"),
            (N + 1..=2 * N).map(line).chain(std::iter::once(line(5))),
            65_536,
        ),
    )
    .await
    .expect_err("duplicate key at the end");
    assert_eq!(code(&err).as_deref(), Some("23505"), "{err}");
    // In a transaction, rolled back: nothing lands either.
    client.batch_execute("BEGIN").await.expect("begin");
    let n = bounded(
        120,
        "copy in a transaction",
        copy_rows(
            &client,
            &format!("COPY {name} (id, v) FROM STDIN"),
            (2 * N + 1..=3 * N).map(line),
            100_000,
        ),
    )
    .await
    .expect("copy in a transaction");
    assert_eq!(n, N as u64);
    let inside: i64 = client
        .query_one(&format!("SELECT count(*) FROM {name}"), &[])
        .await
        .expect("count inside")
        .get(0);
    assert_eq!(inside, 2 * N, "the transaction sees its own copy");
    client.batch_execute("ROLLBACK").await.expect("rollback");
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {name}"), &[])
        .await
        .expect("count after")
        .get(0);
    assert_eq!(n, N);
    assert_eq!(
        prepared_of(proxy.handle.shared.config.node_id).await,
        Vec::<String>::new()
    );

    // A client that vanishes mid-COPY (50,000 rows sent to both shards, no CopyDone): nothing
    // lands, nothing stays prepared, the pools get their connections back.
    let (dying, handle) = connect_abortable(&proxy.conninfo()).await;
    let sink = dying
        .copy_in::<_, bytes::Bytes>(&format!("COPY {name} (id, v) FROM STDIN"))
        .await
        .expect("copy in");
    let mut sink = Box::pin(sink);
    let data: String = (3 * N + 1..=3 * N + 50_000).map(line).collect();
    for chunk in data.as_bytes().chunks(16_384) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .expect("copy data");
    }
    sink.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(200)).await;
    handle.abort();
    drop(sink);
    drop(dying);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (n, active) = {
            let n: i64 = client
                .query_one(&format!("SELECT count(*) FROM {name}"), &[])
                .await
                .expect("count after an abandoned copy")
                .get(0);
            (n, active_with(&format!("COPY {name}")).await)
        };
        assert_eq!(n, N, "rows of an abandoned COPY landed");
        if active == [0, 0] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "servers still in the abandoned COPY: {active:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pools_settle(
        &proxy,
        proxy.handle.shared.config.pool.size,
        "after an abandoned COPY",
    )
    .await;
    assert_eq!(
        prepared_of(proxy.handle.shared.config.node_id).await,
        Vec::<String>::new()
    );
}
