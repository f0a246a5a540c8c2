//! Differential test of queries without a shard key: every query runs through the proxy over
//! the 2-shard cluster and directly on a plain database that holds all the rows, in the text
//! (simple query) and the binary (extended protocol) format, and the results must be
//! identical: same columns (names, types, type modifiers), same values byte for byte (binary
//! values are compared raw, so a numeric with a different scale or a float that is one ulp off
//! fails), same order where the query's ORDER BY fixes one, same multiset otherwise.
//!
//! Shapes the proxy cannot answer exactly must be refused with SQLSTATE 0A000 (and run fine on
//! the plain database). Shapes whose support is undecided may be refused or answered, but an
//! answer must be exact.
//!
//! The plain database also holds a second copy of every table (schema `rev`) loaded in reverse
//! order: every query must give the same result on both copies, which checks that the test's
//! own ORDER BYs fix the order they claim to (a tie left open shows up as a "test bug").

mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::{Proxy, unique};
use futures::TryStreamExt;
use tessera::config::Config;
use tessera::router::{Router, canonical_key};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, SimpleQueryMessage};

/// Upper bound for one query through the proxy (a hang is reported, not waited out).
const QUERY_TIMEOUT: Duration = Duration::from_secs(20);
/// How many differing rows a failure message shows.
const SHOW_DIFFS: usize = 5;

// ---------------------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------------------

/// xorshift64: deterministic, good enough to scatter test data.
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

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

/// One row as COPY text values (`None` is NULL).
type TextRow = Vec<Option<String>>;

struct Data {
    countries: Vec<TextRow>,
    /// (id, row)
    users: Vec<(i64, TextRow)>,
    /// (user_id, row)
    orders: Vec<(i64, TextRow)>,
}

const COUNTRIES: [(&str, &str, &str); 11] = [
    ("AR", "Argentina", "americas"),
    ("BR", "Brazil", "americas"),
    ("CA", "Canada", "americas"),
    ("DE", "Germany", "europe"),
    ("FR", "France", "europe"),
    ("IN", "India", "asia"),
    ("JP", "Japan", "asia"),
    ("NG", "Nigeria", "africa"),
    ("US", "United States", "americas"),
    ("ZA", "South Africa", "africa"),
    // No user lives here: inner joins drop it.
    ("NZ", "New Zealand", "oceania"),
];

/// Ids big enough that sum(id) overflows bigint (sum(bigint) is numeric: it must not wrap).
const BIG_IDS: [i64; 2] = [4_000_000_000_000_000_000, 5_000_000_000_000_000_000];

fn cents(c: i64) -> String {
    let sign = if c < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", c.abs() / 100, c.abs() % 100)
}

fn generate() -> Data {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let countries = COUNTRIES
        .iter()
        .map(|(code, name, region)| {
            vec![
                Some(code.to_string()),
                Some(name.to_string()),
                Some(region.to_string()),
            ]
        })
        .collect();
    let first = [
        "alice", "Alice", "bob", "BOB", "carol", "Dave", "eve", "Émile", "frank", "grace", "Heidi",
        "ivan", "judy", "mallory", "o'neil", "zoë", "Zed", "a b",
    ];
    let codes: Vec<&str> = COUNTRIES[..10].iter().map(|c| c.0).collect();

    let mut ids: Vec<i64> = (1..=1998i64)
        .map(|i| if i % 25 == 0 { -i } else { i })
        .collect();
    ids.extend(BIG_IDS);
    let mut users = Vec::with_capacity(ids.len());
    for &id in &ids {
        let name = format!("{} {}", rng.pick(&first), rng.below(40));
        let country = (!rng.chance(4)).then(|| rng.pick(&codes).to_string());
        let age = if rng.chance(8) {
            None
        } else if rng.chance(3) {
            Some(format!("-{}", 1 + rng.below(9)))
        } else {
            Some((16 + rng.below(80)).to_string())
        };
        let score = if rng.chance(7) {
            None
        } else if rng.chance(5) {
            Some("100.00".to_string())
        } else {
            Some(cents(rng.below(1_050_000) as i64 - 50_000))
        };
        let active = (rng.below(3) != 0).to_string();
        let created = format!(
            "{}-{:02}-{:02}",
            2019 + rng.below(6),
            1 + rng.below(12),
            1 + rng.below(28)
        );
        let seen_at = if rng.chance(15) {
            None
        } else {
            let frac = if rng.chance(30) {
                format!(".{:06}", rng.below(1_000_000))
            } else {
                String::new()
            };
            let zone = if rng.chance(10) { "+05:30" } else { "+00" };
            Some(format!(
                "2023-{:02}-{:02} {:02}:{:02}:00{frac}{zone}",
                1 + rng.below(12),
                1 + rng.below(28),
                rng.below(24),
                15 * rng.below(4)
            ))
        };
        // Multiples of 1/8: sums and averages are exact in any order of addition.
        let ratio = ((rng.below(16_001) as i64 - 8000) as f64 * 0.125).to_string();
        let (a, b) = (rng.next(), rng.next());
        let uid = format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        );
        users.push((
            id,
            vec![
                Some(id.to_string()),
                Some(name),
                country,
                age,
                score,
                Some(active),
                Some(created),
                seen_at,
                Some(ratio),
                Some(uid),
            ],
        ));
    }

    let statuses = [
        "new",
        "paid",
        "paid",
        "shipped",
        "shipped",
        "shipped",
        "cancelled",
        "refunded",
    ];
    let notes = [
        "gift",
        "rush",
        "",
        "fragile",
        "call first",
        "Gift",
        "ünicode",
    ];
    let n = ids.len() as u64;
    let mut orders = Vec::with_capacity(10_000);
    for id in 1..=10_000i64 {
        let user_id = if rng.chance(1) {
            // No such user: inner joins drop the order.
            100_000 + rng.below(50) as i64
        } else {
            // Skewed towards the first users: some have many orders, many have none.
            ids[(rng.below(n) * rng.below(n) / n) as usize]
        };
        let amount = (rng.below(1101) as i64 - 100).to_string();
        let price = if rng.chance(3) {
            "0.00".to_string()
        } else {
            cents(rng.below(2_000_000) as i64 - 10_000)
        };
        let status = rng.pick(&statuses).to_string();
        let placed_at = format!(
            "2024-{:02}-{:02} {:02}:{:02}:00{}",
            1 + rng.below(12),
            1 + rng.below(28),
            rng.below(24),
            30 * rng.below(2),
            if rng.chance(20) { ".5" } else { "" }
        );
        let note = (!rng.chance(40)).then(|| rng.pick(&notes).to_string());
        orders.push((
            user_id,
            vec![
                Some(id.to_string()),
                Some(user_id.to_string()),
                Some(amount),
                Some(price),
                Some(status),
                Some(placed_at),
                note,
            ],
        ));
    }
    Data {
        countries,
        users,
        orders,
    }
}

// ---------------------------------------------------------------------------------------------
// Schema and loading
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Names {
    users: String,
    orders: String,
    countries: String,
}

fn ddl(t: &Names, schema: &str) -> String {
    let (u, o, c) = (&t.users, &t.orders, &t.countries);
    format!(
        "CREATE TABLE {schema}{c} (code text PRIMARY KEY, name text NOT NULL, region text NOT NULL);
         CREATE TABLE {schema}{u} (id bigint PRIMARY KEY, name text NOT NULL,
             country text REFERENCES {schema}{c} (code), age int, score numeric(10,2),
             active bool NOT NULL, created date NOT NULL, seen_at timestamptz,
             ratio float8 NOT NULL, uid uuid NOT NULL);
         CREATE TABLE {schema}{o} (id bigint PRIMARY KEY, user_id bigint NOT NULL,
             amount int NOT NULL, price numeric(12,2) NOT NULL, status text NOT NULL,
             placed_at timestamp NOT NULL, note text)"
    )
}

fn copy_escape(value: &str, out: &mut String) {
    for ch in value.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// Loads rows with `COPY ... FROM STDIN` (text format).
async fn copy_rows<'a>(client: &Client, table: &str, rows: impl Iterator<Item = &'a TextRow>) {
    use futures::SinkExt;
    let mut data = String::new();
    for row in rows {
        for (i, value) in row.iter().enumerate() {
            if i > 0 {
                data.push('\t');
            }
            match value {
                Some(v) => copy_escape(v, &mut data),
                None => data.push_str("\\N"),
            }
        }
        data.push('\n');
    }
    let sink = client
        .copy_in::<_, bytes::Bytes>(&format!("COPY {table} FROM STDIN"))
        .await
        .unwrap_or_else(|e| panic!("COPY {table}: {e:?}"));
    let mut sink = std::pin::pin!(sink);
    sink.send(bytes::Bytes::from(data))
        .await
        .unwrap_or_else(|e| panic!("COPY {table} data: {e:?}"));
    sink.as_mut()
        .finish()
        .await
        .unwrap_or_else(|e| panic!("COPY {table} finish: {e:?}"));
}

/// Replaces the `dbname=` of a conninfo string.
fn with_dbname(conninfo: &str, db: &str) -> String {
    conninfo
        .split_whitespace()
        .map(|kv| {
            if kv.starts_with("dbname=") {
                format!("dbname={db}")
            } else {
                kv.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A new database on shard 0's primary (owned by the app role) holding every row: `public`
/// in insertion order, `rev` in reverse order. Returns a client for each.
async fn plain_database(t: &Names, data: &Data) -> (Client, Client) {
    let db = unique("xshard_plain");
    let owner = common::with_cluster(|c| c.spec().user.clone());
    common::connect_superuser(0)
        .await
        .batch_execute(&format!("CREATE DATABASE {db} OWNER \"{owner}\""))
        .await
        .expect("create the plain database");
    let info = common::with_cluster(|c| c.app_conninfo(&c.shards()[0].primary));
    let info = with_dbname(&info, &db);
    let plain = common::connect(&info).await.expect("connect to plain db");
    plain
        .batch_execute(&format!(
            "{}; CREATE SCHEMA rev; {}",
            ddl(t, ""),
            ddl(t, "rev.")
        ))
        .await
        .expect("plain DDL");
    copy_rows(&plain, &t.countries, data.countries.iter()).await;
    copy_rows(&plain, &t.users, data.users.iter().map(|(_, r)| r)).await;
    copy_rows(&plain, &t.orders, data.orders.iter().map(|(_, r)| r)).await;
    let rev = |name: &str| format!("rev.{name}");
    copy_rows(&plain, &rev(&t.countries), data.countries.iter().rev()).await;
    copy_rows(
        &plain,
        &rev(&t.users),
        data.users.iter().rev().map(|(_, r)| r),
    )
    .await;
    copy_rows(
        &plain,
        &rev(&t.orders),
        data.orders.iter().rev().map(|(_, r)| r),
    )
    .await;
    let reversed = common::connect(&info).await.expect("connect to plain db");
    reversed
        .batch_execute("SET search_path = rev")
        .await
        .expect("search_path");
    (plain, reversed)
}

/// Creates the tables through the proxy (DDL is broadcast), then loads each shard's rows
/// directly into its primary, placed by the router; the reference table goes everywhere.
async fn sharded_load(proxy_client: &Client, router: &Router, t: &Names, data: &Data) {
    proxy_client
        .batch_execute(&ddl(t, ""))
        .await
        .expect("DDL through the proxy");
    let shards = router.shard_count();
    for s in 0..shards {
        let direct = common::connect_primary(s).await;
        let users = data.users.iter().filter(|(id, _)| {
            router
                .shard_of(&canonical_key(&id.to_string()), &t.users)
                .expect("shard of user")
                == s
        });
        let orders = data.orders.iter().filter(|(user_id, _)| {
            router
                .shard_of(&canonical_key(&user_id.to_string()), &t.orders)
                .expect("shard of order")
                == s
        });
        copy_rows(&direct, &t.countries, data.countries.iter()).await;
        copy_rows(&direct, &t.users, users.map(|(_, r)| r)).await;
        copy_rows(&direct, &t.orders, orders.map(|(_, r)| r)).await;
        let n: i64 = direct
            .query_one(&format!("SELECT count(*) FROM {}", t.users), &[])
            .await
            .expect("count")
            .get(0);
        assert!(
            (600..1400).contains(&n),
            "shard {s} holds {n} of 2000 users: placement looks wrong"
        );
    }
}

/// Waits until every replica has replayed its primary's WAL as of now, so reads the proxy
/// sends to replicas see the rows loaded directly into the primaries.
async fn wait_for_replicas() {
    let servers = common::with_cluster(|c| {
        c.shards()
            .iter()
            .map(|s| {
                (
                    c.app_conninfo(&s.primary),
                    s.replicas
                        .iter()
                        .map(|r| c.app_conninfo(r))
                        .collect::<Vec<_>>(),
                )
            })
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    for (primary, replicas) in servers {
        let primary = common::connect(&primary).await.expect("primary");
        let lsn: String = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("current lsn")
            .get(0);
        for replica in replicas {
            let replica = common::connect(&replica).await.expect("replica");
            loop {
                let done: bool = replica
                    .query_one(
                        &format!(
                            "SELECT coalesce(pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn, false)"
                        ),
                        &[],
                    )
                    .await
                    .expect("replay lsn")
                    .get(0);
                if done {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "a replica never replayed the load"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running a query in both formats
// ---------------------------------------------------------------------------------------------

/// Any value in its binary wire form, compared byte for byte.
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw.to_vec()))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

type BinRow = Vec<Option<Vec<u8>>>;

#[derive(Debug, Clone, PartialEq)]
struct TextResult {
    columns: Vec<String>,
    rows: Vec<TextRow>,
    /// The row count of the CommandComplete tag (`SELECT n`).
    tag: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
struct BinResult {
    /// name, type, type modifier
    columns: Vec<(String, Type, i32)>,
    rows: Vec<BinRow>,
    /// The row count of the CommandComplete tag (`SELECT n`).
    tag: Option<u64>,
}

#[derive(Debug, Clone)]
struct QueryError {
    code: Option<String>,
    message: String,
}

impl std::fmt::Display for QueryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {}",
            self.code.as_deref().unwrap_or("no SQLSTATE"),
            self.message
        )
    }
}

fn query_error(e: &tokio_postgres::Error) -> QueryError {
    match e.as_db_error() {
        Some(db) => QueryError {
            code: Some(db.code().code().to_string()),
            message: db.message().to_string(),
        },
        None => QueryError {
            code: None,
            message: format!("{e}"),
        },
    }
}

async fn timed<T>(fut: impl Future<Output = Result<T, QueryError>>) -> Result<T, QueryError> {
    tokio::time::timeout(QUERY_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| {
            Err(QueryError {
                code: None,
                message: format!("timed out after {QUERY_TIMEOUT:?}"),
            })
        })
}

/// Simple query protocol: text values.
async fn run_text(client: &Client, sql: &str) -> Result<TextResult, QueryError> {
    timed(async {
        let messages = client
            .simple_query(sql)
            .await
            .map_err(|e| query_error(&e))?;
        let mut result = TextResult {
            columns: Vec::new(),
            rows: Vec::new(),
            tag: None,
        };
        let mut described = false;
        for m in messages {
            match m {
                SimpleQueryMessage::RowDescription(cols) if !described => {
                    described = true;
                    result.columns = cols.iter().map(|c| c.name().to_string()).collect();
                }
                SimpleQueryMessage::Row(row) => result.rows.push(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                ),
                SimpleQueryMessage::CommandComplete(n) => result.tag = Some(n),
                _ => {}
            }
        }
        Ok(result)
    })
    .await
}

/// Extended protocol (Parse/Describe, then Bind/Execute): binary values.
async fn run_binary(client: &Client, sql: &str) -> Result<BinResult, QueryError> {
    timed(async {
        let stmt = client.prepare(sql).await.map_err(|e| query_error(&e))?;
        let columns = stmt
            .columns()
            .iter()
            .map(|c| (c.name().to_string(), c.type_().clone(), c.type_modifier()))
            .collect();
        let no_params: [&(dyn tokio_postgres::types::ToSql + Sync); 0] = [];
        let stream = client
            .query_raw(&stmt, no_params)
            .await
            .map_err(|e| query_error(&e))?;
        let mut stream = std::pin::pin!(stream);
        let mut rows = Vec::new();
        while let Some(row) = stream.try_next().await.map_err(|e| query_error(&e))? {
            rows.push(
                (0..row.len())
                    .map(|i| {
                        row.try_get::<_, Option<Raw>>(i)
                            .expect("raw value")
                            .map(|r| r.0)
                    })
                    .collect(),
            );
        }
        let tag = stream.rows_affected();
        Ok(BinResult { columns, rows, tag })
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Rendering binary values (messages only: comparisons use the raw bytes)
// ---------------------------------------------------------------------------------------------

fn hex(raw: &[u8]) -> String {
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days from 1970-01-01 to 2000-01-01 (the Postgres epoch).
const PG_EPOCH_DAYS: i64 = 10_957;

fn render_date(days: i64) -> String {
    let (y, m, d) = civil(days + PG_EPOCH_DAYS);
    format!("{y:04}-{m:02}-{d:02}")
}

fn render_timestamp(micros: i64) -> String {
    if micros == i64::MAX {
        return "infinity".into();
    }
    if micros == i64::MIN {
        return "-infinity".into();
    }
    let day = 86_400_000_000i64;
    let (days, rem) = (micros.div_euclid(day), micros.rem_euclid(day));
    let secs = rem / 1_000_000;
    format!(
        "{} {:02}:{:02}:{:02}.{:06}",
        render_date(days),
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        rem % 1_000_000
    )
}

fn be_i16(raw: &[u8], at: usize) -> Option<i16> {
    raw.get(at..at + 2)
        .map(|b| i16::from_be_bytes([b[0], b[1]]))
}

/// Decimal text of a binary numeric, with exactly its display scale.
fn render_numeric(raw: &[u8]) -> Option<String> {
    let ndigits = be_i16(raw, 0)? as usize;
    let weight = be_i16(raw, 2)? as i64;
    let sign = be_i16(raw, 4)? as u16;
    let dscale = be_i16(raw, 6)? as u16 as usize;
    let digits: Vec<i16> = (0..ndigits)
        .map(|i| be_i16(raw, 8 + 2 * i))
        .collect::<Option<_>>()?;
    match sign {
        0xC000 => return Some("NaN".into()),
        0xD000 => return Some("Infinity".into()),
        0xF000 => return Some("-Infinity".into()),
        _ => {}
    }
    let digit = |idx: i64| -> i16 {
        if idx >= 0 && (idx as usize) < digits.len() {
            digits[idx as usize]
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
        for idx in 0..=weight {
            if idx == 0 {
                write!(out, "{}", digit(idx)).ok()?;
            } else {
                write!(out, "{:04}", digit(idx)).ok()?;
            }
        }
    }
    if dscale > 0 {
        let mut frac = String::new();
        let groups = dscale.div_ceil(4) as i64;
        for j in 0..groups {
            write!(frac, "{:04}", digit(weight + 1 + j)).ok()?;
        }
        frac.truncate(dscale);
        out.push('.');
        out.push_str(&frac);
    }
    Some(out)
}

fn render(ty: &Type, raw: &[u8]) -> String {
    render_known(ty, raw).unwrap_or_else(|| format!("{}:0x{}", ty.name(), hex(raw)))
}

fn render_known(ty: &Type, raw: &[u8]) -> Option<String> {
    let fixed = |n: usize| raw.len() == n;
    match *ty {
        Type::BOOL if fixed(1) => Some((raw[0] != 0).to_string()),
        Type::INT2 if fixed(2) => Some(i16::from_be_bytes([raw[0], raw[1]]).to_string()),
        Type::INT4 if fixed(4) => Some(i32::from_be_bytes(raw.try_into().ok()?).to_string()),
        Type::INT8 if fixed(8) => Some(i64::from_be_bytes(raw.try_into().ok()?).to_string()),
        Type::FLOAT4 if fixed(4) => Some(format!("{:?}", f32::from_be_bytes(raw.try_into().ok()?))),
        Type::FLOAT8 if fixed(8) => Some(format!("{:?}", f64::from_be_bytes(raw.try_into().ok()?))),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            Some(format!("{:?}", String::from_utf8_lossy(raw)))
        }
        Type::NUMERIC => render_numeric(raw).map(|n| format!("{n}::numeric")),
        Type::DATE if fixed(4) => {
            Some(render_date(i32::from_be_bytes(raw.try_into().ok()?).into()))
        }
        Type::TIMESTAMP if fixed(8) => {
            Some(render_timestamp(i64::from_be_bytes(raw.try_into().ok()?)))
        }
        Type::TIMESTAMPTZ if fixed(8) => Some(format!(
            "{}+00",
            render_timestamp(i64::from_be_bytes(raw.try_into().ok()?))
        )),
        Type::UUID if fixed(16) => {
            let h = hex(raw);
            Some(format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            ))
        }
        _ => None,
    }
}

fn show_text_row(row: &TextRow) -> String {
    let cells: Vec<String> = row
        .iter()
        .map(|v| match v {
            Some(v) => format!("{v:?}"),
            None => "NULL".into(),
        })
        .collect();
    truncate(format!("({})", cells.join(", ")))
}

fn show_bin_row(types: &[Type], row: &BinRow) -> String {
    let cells: Vec<String> = row
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Some(raw) => render(types.get(i).unwrap_or(&Type::BYTEA), raw),
            None => "NULL".into(),
        })
        .collect();
    truncate(format!("({})", cells.join(", ")))
}

fn truncate(mut s: String) -> String {
    if s.len() > 400 {
        let mut cut = 400;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Comparing results
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Order {
    /// The ORDER BY fixes the order completely: compare row by row.
    Ordered,
    /// No (complete) order: compare sorted.
    Multiset,
}

use Order::{Multiset as M, Ordered as O};

/// Rows in `a` that are not in `b` (multiset difference of sorted slices).
fn missing<T: Ord + Clone>(a: &[T], b: &[T]) -> Vec<T> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() {
        if j >= b.len() || a[i] < b[j] {
            out.push(a[i].clone());
            i += 1;
        } else if a[i] > b[j] {
            j += 1;
        } else {
            i += 1;
            j += 1;
        }
    }
    out
}

/// `None` if the rows agree; otherwise what differs.
fn diff_rows<T: Ord + Clone>(
    expected: &[T],
    actual: &[T],
    order: Order,
    show: impl Fn(&T) -> String,
) -> Option<String> {
    let (mut e_sorted, mut a_sorted) = (expected.to_vec(), actual.to_vec());
    e_sorted.sort();
    a_sorted.sort();
    let same_multiset = e_sorted == a_sorted;
    match order {
        O if expected == actual => return None,
        M if same_multiset => return None,
        _ => {}
    }
    let mut out = format!("expected {} rows, got {}", expected.len(), actual.len());
    if same_multiset {
        out.push_str("; the same rows in a different order. First differences:");
        let mut shown = 0;
        for (i, (e, a)) in expected.iter().zip(actual).enumerate() {
            if e != a {
                let _ = write!(
                    out,
                    "\n      row {i}: expected {}\n      row {i}: actual   {}",
                    show(e),
                    show(a)
                );
                shown += 1;
                if shown == SHOW_DIFFS {
                    break;
                }
            }
        }
        return Some(out);
    }
    let lost = missing(&e_sorted, &a_sorted);
    let extra = missing(&a_sorted, &e_sorted);
    if order == O
        && let Some(i) = expected.iter().zip(actual).position(|(e, a)| e != a)
    {
        let _ = write!(out, "; first difference at row {i}");
    }
    if !lost.is_empty() {
        let _ = write!(out, "\n    {} expected rows missing, e.g.:", lost.len());
        for r in lost.iter().take(SHOW_DIFFS) {
            let _ = write!(out, "\n      - {}", show(r));
        }
    }
    if !extra.is_empty() {
        let _ = write!(out, "\n    {} unexpected rows, e.g.:", extra.len());
        for r in extra.iter().take(SHOW_DIFFS) {
            let _ = write!(out, "\n      + {}", show(r));
        }
    }
    if order == O && !expected.is_empty() {
        let _ = write!(out, "\n    expected first rows:");
        for r in expected.iter().take(3) {
            let _ = write!(out, "\n        {}", show(r));
        }
        let _ = write!(out, "\n    actual first rows:");
        for r in actual.iter().take(3) {
            let _ = write!(out, "\n        {}", show(r));
        }
    }
    Some(out)
}

fn diff_text(expected: &TextResult, actual: &TextResult, order: Order) -> Option<String> {
    if expected.columns != actual.columns {
        return Some(format!(
            "columns differ: expected {:?}, got {:?}",
            expected.columns, actual.columns
        ));
    }
    diff_rows(&expected.rows, &actual.rows, order, show_text_row).or_else(|| {
        (expected.tag != actual.tag).then(|| {
            format!(
                "the rows agree, the CommandComplete tag does not: expected SELECT {:?}, got {:?}",
                expected.tag, actual.tag
            )
        })
    })
}

fn diff_binary(expected: &BinResult, actual: &BinResult, order: Order) -> Option<String> {
    if expected.columns != actual.columns {
        let show = |cols: &[(String, Type, i32)]| {
            cols.iter()
                .map(|(n, t, m)| format!("{n} {}({m})", t.name()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Some(format!(
            "columns differ: expected [{}], got [{}]",
            show(&expected.columns),
            show(&actual.columns)
        ));
    }
    let types: Vec<Type> = expected.columns.iter().map(|c| c.1.clone()).collect();
    diff_rows(&expected.rows, &actual.rows, order, |r| {
        show_bin_row(&types, r)
    })
    .or_else(|| {
        (expected.tag != actual.tag).then(|| {
            format!(
                "the rows agree, the CommandComplete tag does not: expected SELECT {:?}, got {:?}",
                expected.tag, actual.tag
            )
        })
    })
}

// ---------------------------------------------------------------------------------------------
// The queries
// ---------------------------------------------------------------------------------------------

/// Placeholders: {u} users, {o} orders, {c} countries, {ids} a list of user ids spanning both
/// shards, {k0} {k1} users on shard 0 and {k2} {k3} users on shard 1 (each with orders).
#[rustfmt::skip]
const DIFFERENTIAL: &[(&str, Order, &str)] = &[
    // Plain scans.
    ("scan", M, "SELECT * FROM {u}"),
    ("scan", M, "SELECT * FROM {o}"),
    ("scan", M, "SELECT id, name, score FROM {u} WHERE age > 60"),
    ("scan", M, "SELECT id, amount, note FROM {o} WHERE note IS NULL OR note = ''"),
    ("scan", M, "SELECT name, active, uid FROM {u} WHERE country = 'DE'"),
    ("scan", M, "SELECT id, user_id, amount * 2 AS twice, price - 1 AS less FROM {o} WHERE status = 'paid' AND amount < 0"),
    ("scan", M, "SELECT * FROM {c}"),
    // ORDER BY, each type, both directions, NULLS FIRST/LAST, ties broken by a unique column.
    ("order by", O, "SELECT id, name FROM {u} ORDER BY id"),
    ("order by", O, "SELECT id, name FROM {u} ORDER BY id DESC"),
    ("order by", O, "SELECT * FROM {u} ORDER BY id"),
    ("order by", O, "SELECT id, name FROM {u} ORDER BY name, id"),
    ("order by", O, "SELECT id, name FROM {u} ORDER BY name DESC, id DESC"),
    ("order by", O, "SELECT id, age FROM {u} ORDER BY age, id"),
    ("order by", O, "SELECT id, age FROM {u} ORDER BY age DESC, id"),
    ("order by", O, "SELECT id, age FROM {u} ORDER BY age NULLS FIRST, id"),
    ("order by", O, "SELECT id, age FROM {u} ORDER BY age DESC NULLS LAST, id"),
    ("order by", O, "SELECT id, score FROM {u} ORDER BY score NULLS FIRST, id DESC"),
    ("order by", O, "SELECT id, score FROM {u} ORDER BY score DESC, id"),
    ("order by", O, "SELECT id, active FROM {u} ORDER BY active, id"),
    ("order by", O, "SELECT id, active FROM {u} ORDER BY active DESC, id DESC"),
    ("order by", O, "SELECT id, created FROM {u} ORDER BY created DESC, id"),
    ("order by", O, "SELECT id, seen_at FROM {u} ORDER BY seen_at, id"),
    ("order by", O, "SELECT id, seen_at FROM {u} ORDER BY seen_at DESC NULLS LAST, id DESC"),
    ("order by", O, "SELECT id, ratio FROM {u} ORDER BY ratio, id"),
    ("order by", O, "SELECT id, uid FROM {u} ORDER BY uid"),
    ("order by", O, "SELECT uid, id FROM {u} ORDER BY uid DESC"),
    ("order by", O, "SELECT id, country, age, name FROM {u} ORDER BY country NULLS FIRST, age DESC, name, id"),
    ("order by", O, "SELECT id, amount, price FROM {o} ORDER BY price DESC, id"),
    ("order by", O, "SELECT id, status, placed_at FROM {o} ORDER BY status, placed_at DESC, id"),
    ("order by", O, "SELECT id, note FROM {o} ORDER BY note NULLS FIRST, id"),
    ("order by", O, "SELECT id, user_id, placed_at FROM {o} ORDER BY user_id, placed_at, id"),
    ("order by", O, "SELECT name FROM {u} ORDER BY age DESC NULLS LAST, id"),
    ("order by", O, "SELECT id, name, age FROM {u} ORDER BY 3, 1"),
    ("order by", O, "SELECT id AS k, score AS s FROM {u} ORDER BY s DESC NULLS LAST, k"),
    ("order by", O, "SELECT id, lower(name) AS ln FROM {u} ORDER BY ln, id"),
    // LIMIT / OFFSET / FETCH.
    ("limit", O, "SELECT id, name FROM {u} ORDER BY id LIMIT 10"),
    ("limit", O, "SELECT id, name FROM {u} ORDER BY id OFFSET 1990"),
    ("limit", O, "SELECT id, amount FROM {o} ORDER BY amount DESC, id LIMIT 25 OFFSET 100"),
    ("limit", O, "SELECT id, score FROM {u} ORDER BY score DESC NULLS LAST, id LIMIT 50"),
    ("limit", O, "SELECT id, name FROM {u} ORDER BY name, id FETCH FIRST 15 ROWS ONLY"),
    ("limit", O, "SELECT id FROM {u} ORDER BY id OFFSET 5 ROWS FETCH NEXT 7 ROWS ONLY"),
    ("limit", O, "SELECT id, uid FROM {u} ORDER BY uid DESC LIMIT 10"),
    ("limit", O, "SELECT id, placed_at FROM {o} ORDER BY placed_at DESC, id DESC LIMIT 1"),
    ("limit", O, "SELECT id FROM {u} ORDER BY id LIMIT 0"),
    ("limit", O, "SELECT id FROM {u} ORDER BY id LIMIT 5 OFFSET 5000"),
    // Aggregates without GROUP BY.
    ("aggregate", M, "SELECT count(*) FROM {u}"),
    ("aggregate", M, "SELECT count(*), count(1), count(age), count(score), count(seen_at), count(country) FROM {u}"),
    ("aggregate", M, "SELECT sum(age), sum(id), sum(score) FROM {u}"),
    ("aggregate", M, "SELECT sum(amount), sum(price), sum(user_id), sum(id) FROM {o}"),
    ("aggregate", M, "SELECT avg(age), avg(score), avg(ratio), avg(id) FROM {u}"),
    ("aggregate", M, "SELECT avg(amount), avg(price) FROM {o}"),
    ("aggregate", M, "SELECT min(name), max(name), min(created), max(created), min(seen_at), max(seen_at) FROM {u}"),
    ("aggregate", M, "SELECT min(score), max(score), min(uid::text), max(uid::text), min(ratio), max(ratio), min(age), max(id) FROM {u}"),
    ("aggregate", M, "SELECT bool_and(active), bool_or(active), bool_and(age > -10), bool_or(age > 90) FROM {u}"),
    ("aggregate", M, "SELECT min(placed_at), max(placed_at), min(status), max(note), min(price), max(amount) FROM {o}"),
    ("aggregate", M, "SELECT count(DISTINCT country) FROM {u}"),
    ("aggregate", M, "SELECT count(DISTINCT age) FROM {u}"),
    ("aggregate", M, "SELECT count(DISTINCT note) FROM {o}"),
    ("aggregate", M, "SELECT count(DISTINCT user_id), count(*), sum(amount), max(note) FROM {o}"),
    ("aggregate", M, "SELECT count(*), sum(amount), avg(price) FROM {o} WHERE status = 'refunded'"),
    // GROUP BY (with HAVING, with ORDER BY an aggregate and LIMIT).
    ("group by", M, "SELECT country, count(*) FROM {u} GROUP BY country"),
    ("group by", M, "SELECT country, count(*), sum(age), avg(age), min(score), max(score), avg(score), sum(score) FROM {u} GROUP BY country"),
    ("group by", M, "SELECT status, count(*), sum(amount), sum(price), avg(price), min(placed_at), max(placed_at) FROM {o} GROUP BY status"),
    ("group by", M, "SELECT active, bool_and(age > 30), bool_or(score > 9000), count(DISTINCT country), min(name), max(uid::text) FROM {u} GROUP BY active"),
    ("group by", M, "SELECT country, active, count(*), max(created), min(uid::text), avg(ratio) FROM {u} GROUP BY country, active"),
    ("group by", M, "SELECT status, count(DISTINCT user_id) FROM {o} GROUP BY status"),
    ("group by", M, "SELECT status, count(DISTINCT note) FROM {o} GROUP BY status"),
    ("group by", M, "SELECT country, count(DISTINCT age), count(*), avg(score) FROM {u} GROUP BY country"),
    ("group by", M, "SELECT country, sum(age), avg(age), min(age), count(age), bool_or(age > 0) FROM {u} WHERE age IS NULL GROUP BY country"),
    ("group by", M, "SELECT user_id, count(*), sum(amount), min(note) FROM {o} GROUP BY user_id"),
    ("group by", O, "SELECT user_id, count(*), sum(amount) FROM {o} GROUP BY user_id ORDER BY count(*) DESC, user_id LIMIT 10"),
    ("group by", O, "SELECT user_id, sum(price) AS total FROM {o} GROUP BY user_id ORDER BY total DESC, user_id LIMIT 20"),
    ("group by", O, "SELECT country, count(*) AS n FROM {u} GROUP BY country ORDER BY n DESC, country NULLS FIRST"),
    ("group by", O, "SELECT age, count(*) FROM {u} GROUP BY age ORDER BY age NULLS FIRST"),
    ("group by", O, "SELECT age, count(*), avg(score) FROM {u} GROUP BY age ORDER BY age LIMIT 5 OFFSET 2"),
    ("group by", O, "SELECT created, count(*) FROM {u} GROUP BY created ORDER BY 2 DESC, 1 LIMIT 5"),
    ("group by", O, "SELECT status, note, count(*) FROM {o} GROUP BY status, note ORDER BY status, note NULLS FIRST"),
    ("group by", O, "SELECT date_trunc('month', placed_at) AS m, count(*), sum(amount) FROM {o} GROUP BY m ORDER BY m"),
    ("group by", O, "SELECT extract(year FROM created) AS y, avg(age), max(seen_at) FROM {u} GROUP BY 1 ORDER BY 1"),
    ("having", M, "SELECT status, count(*) FROM {o} GROUP BY status HAVING count(*) > 1000"),
    ("having", M, "SELECT country, sum(age) FROM {u} GROUP BY country HAVING sum(age) > 5000"),
    ("having", M, "SELECT country, avg(score) FROM {u} GROUP BY country HAVING avg(score) > 4900"),
    ("having", M, "SELECT user_id, count(DISTINCT status) FROM {o} GROUP BY user_id HAVING count(DISTINCT status) >= 4"),
    ("having", O, "SELECT age, count(*) FROM {u} GROUP BY age HAVING count(*) >= 25 ORDER BY count(*) DESC, age"),
    // DISTINCT.
    ("distinct", M, "SELECT DISTINCT country FROM {u}"),
    ("distinct", O, "SELECT DISTINCT country FROM {u} ORDER BY country NULLS FIRST"),
    ("distinct", M, "SELECT DISTINCT status, note FROM {o}"),
    ("distinct", O, "SELECT DISTINCT age FROM {u} ORDER BY age DESC LIMIT 10"),
    ("distinct", O, "SELECT DISTINCT created FROM {u} ORDER BY created LIMIT 20 OFFSET 3"),
    ("distinct", O, "SELECT DISTINCT active, country FROM {u} ORDER BY 2, 1"),
    // IN lists of keys spanning both shards.
    ("in list", M, "SELECT id, name, seen_at FROM {u} WHERE id IN ({ids})"),
    ("in list", O, "SELECT id, name FROM {u} WHERE id IN ({ids}) ORDER BY name, id"),
    ("in list", O, "SELECT country, count(*), min(age) FROM {u} WHERE id IN ({ids}) GROUP BY country ORDER BY country NULLS LAST"),
    ("in list", O, "SELECT user_id, count(*), sum(price) FROM {o} WHERE user_id IN ({ids}) GROUP BY user_id ORDER BY user_id"),
    ("in list", M, "SELECT count(*), sum(amount), max(placed_at), avg(price) FROM {o} WHERE user_id IN ({ids})"),
    // Co-located joins.
    ("join", M, "SELECT u.id, u.name, o.id, o.amount FROM {u} u JOIN {o} o ON u.id = o.user_id"),
    ("join", O, "SELECT u.id, u.name, o.id, o.amount FROM {u} u JOIN {o} o ON u.id = o.user_id ORDER BY o.amount DESC, o.id LIMIT 30"),
    ("join", M, "SELECT u.country, count(*), sum(o.amount), avg(o.price) FROM {u} u JOIN {o} o ON u.id = o.user_id GROUP BY u.country"),
    ("join", O, "SELECT u.id, u.name, count(o.id) AS n, sum(o.price) FROM {u} u JOIN {o} o ON o.user_id = u.id GROUP BY u.id, u.name ORDER BY n DESC, u.id LIMIT 15"),
    ("join", O, "SELECT o.status, u.active, count(*), min(o.placed_at), max(u.seen_at) FROM {u} u JOIN {o} o ON u.id = o.user_id WHERE o.amount > 0 GROUP BY o.status, u.active ORDER BY 1, 2"),
    ("join", M, "SELECT count(*), count(DISTINCT u.country), sum(o.amount), bool_or(u.active) FROM {u} u JOIN {o} o ON u.id = o.user_id"),
    // Window functions partitioned by the shard key run on each shard.
    ("window", O, "SELECT user_id, id, row_number() OVER (PARTITION BY user_id ORDER BY id), sum(amount) OVER (PARTITION BY user_id) FROM {o} ORDER BY user_id, id LIMIT 50"),
    ("window", M, "SELECT o.user_id, o.id, rank() OVER (PARTITION BY o.user_id ORDER BY o.amount DESC, o.id) FROM {o} o"),
    // Output columns rewritten for the shards do not confuse ORDER BY or aliases after `*`.
    ("rewrite", O, "SELECT status, avg(amount), sum(amount) FROM {o} GROUP BY status ORDER BY sum(amount), status"),
    ("rewrite", O, "SELECT *, -id AS neg FROM {u} ORDER BY neg LIMIT 7"),
    ("rewrite", M, "SELECT 'total' AS t FROM {o} ORDER BY count(*)"),
    ("rewrite", O, "SELECT date_trunc('day', placed_at) AS day, count(*) FROM {o} GROUP BY day ORDER BY day LIMIT 10"),
    // Subqueries and CTEs over the reference table run on each shard.
    ("subquery", M, "SELECT id, name FROM {u} WHERE country IN (SELECT code FROM {c} WHERE region = 'europe')"),
    ("subquery", O, "WITH eu AS (SELECT code FROM {c} WHERE region = 'europe') SELECT u.country, count(*) FROM {u} u JOIN eu ON eu.code = u.country GROUP BY u.country ORDER BY u.country"),
    ("subquery", O, "SELECT id, (SELECT c.name FROM {c} c WHERE c.code = u.country) AS cname FROM {u} u ORDER BY id LIMIT 25"),
    // Joins with the reference table.
    ("reference join", M, "SELECT c.region, count(*) FROM {u} u JOIN {c} c ON c.code = u.country GROUP BY c.region"),
    ("reference join", O, "SELECT c.region, count(*), sum(o.amount), avg(o.price) FROM {o} o JOIN {u} u ON u.id = o.user_id JOIN {c} c ON c.code = u.country GROUP BY c.region ORDER BY c.region"),
    ("reference join", O, "SELECT u.id, u.name, c.name FROM {u} u JOIN {c} c ON u.country = c.code ORDER BY c.name, u.id LIMIT 40"),
    ("reference join", O, "SELECT c.name, max(u.score), count(DISTINCT u.age) FROM {c} c JOIN {u} u ON u.country = c.code WHERE c.region = 'europe' GROUP BY c.name ORDER BY c.name"),
    ("reference join", M, "SELECT u.id, c.region FROM {u} u JOIN {c} c ON c.code = u.country WHERE u.age > 80"),
    // Empty results.
    ("empty", M, "SELECT count(*), sum(amount), min(price), max(placed_at), avg(amount), bool_and(amount > 0), bool_or(amount > 0) FROM {o} WHERE amount > 1000000"),
    ("empty", M, "SELECT count(DISTINCT status) FROM {o} WHERE amount > 1000000"),
    ("empty", M, "SELECT count(DISTINCT status), count(*), sum(price) FROM {o} WHERE amount > 1000000"),
    ("empty", M, "SELECT status, count(*) FROM {o} WHERE amount > 1000000 GROUP BY status"),
    ("empty", O, "SELECT id, name FROM {u} WHERE age > 1000 ORDER BY id"),
    ("empty", O, "SELECT id FROM {u} WHERE false ORDER BY id LIMIT 5"),
    ("empty", M, "SELECT DISTINCT country FROM {u} WHERE id < -100000"),
    ("empty", M, "SELECT count(*), sum(o.price) FROM {u} u JOIN {o} o ON u.id = o.user_id WHERE o.amount > 1000000"),
    // One shard (or the reference table): these route to one server today.
    ("single shard", M, "SELECT * FROM {u} WHERE id = {k0}"),
    ("single shard", O, "SELECT id, amount, price, placed_at, note FROM {o} WHERE user_id = {k1} ORDER BY id"),
    ("single shard", M, "SELECT count(*), sum(price), avg(amount), min(placed_at) FROM {o} WHERE user_id = {k2}"),
    ("single shard", O, "SELECT u.name, c.name, o.id, o.price FROM {u} u JOIN {o} o ON u.id = o.user_id JOIN {c} c ON c.code = u.country WHERE u.id = {k3} ORDER BY o.id"),
    ("single shard", O, "SELECT * FROM {c} ORDER BY code"),
];

/// Shapes the proxy cannot answer exactly: it must refuse them with 0A000.
#[rustfmt::skip]
const REFUSED: &[&str] = &[
    "SELECT u.id, o.id FROM {u} u JOIN {o} o ON u.id = o.id",
    "SELECT u.id, o.id FROM {u} u JOIN {o} o ON u.id < o.user_id WHERE o.id < 3",
    "SELECT id FROM {u} WHERE id IN (SELECT user_id FROM {o})",
    "WITH t AS (SELECT user_id, sum(amount) AS s FROM {o} GROUP BY user_id) SELECT max(s) FROM t",
    "SELECT id FROM {u} UNION SELECT user_id FROM {o}",
    "SELECT id FROM {u} EXCEPT SELECT user_id FROM {o}",
    "SELECT id, row_number() OVER (ORDER BY id) FROM {u}",
    "SELECT id, sum(age) OVER (PARTITION BY country) FROM {u}",
    "SELECT count(*) + 1 FROM {u}",
    "SELECT max(id) - min(id) FROM {u}",
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY age) FROM {u}",
    "SELECT string_agg(name, ',' ORDER BY id) FROM {u}",
    "SELECT array_agg(id ORDER BY id) FROM {u}",
    "SELECT stddev(score) FROM {u}",
    "SELECT id FROM {u} ORDER BY rank() OVER (ORDER BY id) LIMIT 3",
    "SELECT id FROM {u} ORDER BY id LIMIT 5 FOR UPDATE",
    "SELECT avg(ratio::real) FROM {u}",
    "SELECT lower(name) AS name, count(*) FROM {u} GROUP BY name",
];

/// Shapes whose support is open: refusing (0A000) or answering exactly are both fine; a wrong
/// answer or another error fails.
#[rustfmt::skip]
const EITHER: &[(Order, &str)] = &[
    (O, "SELECT id, amount FROM {o} ORDER BY amount * -1, id LIMIT 20"),
    (O, "SELECT id, name FROM {u} ORDER BY upper(name), id LIMIT 10"),
    (O, "SELECT id, name FROM {u} ORDER BY name COLLATE \"C\" DESC, id LIMIT 10"),
    (M, "SELECT status, count(*) FROM {o} GROUP BY status HAVING min(amount) < -50"),
    (O, "SELECT country FROM {u} GROUP BY country ORDER BY count(*) DESC, country"),
    (O, "SELECT u.id, count(o.id) FROM {u} u LEFT JOIN {o} o ON u.id = o.user_id GROUP BY u.id ORDER BY 2 DESC, 1 LIMIT 10"),
    (M, "SELECT count(*) FROM {u} u, {o} o WHERE u.id = o.user_id"),
    (O, "SELECT a.id, b.name FROM {u} a JOIN {u} b ON a.id = b.id WHERE b.age > 80 ORDER BY a.id"),
    (O, "SELECT DISTINCT ON (country) country, id, name FROM {u} ORDER BY country, id"),
    (M, "SELECT count(*) FILTER (WHERE active), sum(age) FILTER (WHERE country = 'DE') FROM {u}"),
    (M, "SELECT count(DISTINCT country), count(DISTINCT age), count(DISTINCT name) FROM {u}"),
    (M, "SELECT status, count(DISTINCT user_id), count(DISTINCT note) FROM {o} GROUP BY status"),
    (M, "SELECT country, count(DISTINCT age), count(DISTINCT active) FROM {u} GROUP BY country"),
    (M, "SELECT sum(DISTINCT age), avg(DISTINCT amount) FROM {u} JOIN {o} ON {u}.id = {o}.user_id"),
    (M, "SELECT id, amount FROM {o} ORDER BY amount DESC FETCH FIRST 5 ROWS WITH TIES"),
    (M, "SELECT country, count(*) FROM {u} GROUP BY ROLLUP (country)"),
    (O, "SELECT id FROM {u} ORDER BY id LIMIT ALL"),
    (O, "SELECT id FROM {u} ORDER BY id LIMIT 3 + 2"),
    (M, "SELECT count(*) AS n, 'x' AS tag FROM {u}"),
];

struct Placeholders {
    names: Names,
    ids: String,
    keys: [i64; 4],
}

impl Placeholders {
    fn fill(&self, template: &str) -> String {
        let mut sql = template
            .replace("{u}", &self.names.users)
            .replace("{o}", &self.names.orders)
            .replace("{c}", &self.names.countries)
            .replace("{ids}", &self.ids);
        for (i, k) in self.keys.iter().enumerate() {
            sql = sql.replace(&format!("{{k{i}}}"), &k.to_string());
        }
        sql
    }
}

/// The user ids of the IN lists: some on each shard.
fn in_list_ids(router: &Router, users: &str) -> Vec<i64> {
    let mut ids: Vec<i64> = (1..=12).collect();
    ids.extend([-25, -50, -75, 999, 1000, 1001, 77_777]);
    ids.extend(BIG_IDS);
    let shards: std::collections::BTreeSet<usize> = ids
        .iter()
        .map(|id| {
            router
                .shard_of(&canonical_key(&id.to_string()), users)
                .expect("shard")
        })
        .collect();
    assert_eq!(shards.len(), 2, "the IN list must span both shards");
    ids
}

/// Two users on each shard, those with the most orders (and a country).
fn single_shard_keys(router: &Router, t: &Names, data: &Data) -> [i64; 4] {
    let mut orders_per_user: BTreeMap<i64, usize> = BTreeMap::new();
    for (user_id, _) in &data.orders {
        *orders_per_user.entry(*user_id).or_default() += 1;
    }
    let mut keys = Vec::new();
    for shard in 0..2 {
        let mut candidates: Vec<(usize, i64)> = data
            .users
            .iter()
            .filter(|(id, row)| {
                row[2].is_some()
                    && router
                        .shard_of(&canonical_key(&id.to_string()), &t.users)
                        .expect("shard")
                        == shard
            })
            .map(|(id, _)| (orders_per_user.get(id).copied().unwrap_or(0), *id))
            .collect();
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        keys.extend(candidates.iter().take(2).map(|c| c.1));
    }
    keys.try_into().expect("two keys per shard")
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

/// The proxy side, reconnected if a query broke or hung its connection.
struct ProxySide<'a> {
    proxy: &'a Proxy,
    client: Client,
}

impl ProxySide<'_> {
    async fn healthy(&mut self, after: &Result<impl Sized, QueryError>) {
        let timed_out =
            matches!(after, Err(e) if e.code.is_none() && e.message.starts_with("timed out"));
        if timed_out || self.client.is_closed() {
            self.client = self.proxy.connect().await;
        }
    }

    async fn text(&mut self, sql: &str) -> Result<TextResult, QueryError> {
        let r = run_text(&self.client, sql).await;
        self.healthy(&r).await;
        r
    }

    async fn binary(&mut self, sql: &str) -> Result<BinResult, QueryError> {
        let r = run_binary(&self.client, sql).await;
        self.healthy(&r).await;
        r
    }
}

struct Expected {
    text: TextResult,
    binary: BinResult,
}

/// Runs `sql` on both copies of the plain database; any problem there is a bug of the test.
async fn expected(
    plain: &Client,
    reversed: &Client,
    sql: &str,
    order: Order,
) -> Result<Expected, String> {
    let text = run_text(plain, sql)
        .await
        .map_err(|e| format!("TEST BUG: fails on the plain database (text): {e}"))?;
    let binary = run_binary(plain, sql)
        .await
        .map_err(|e| format!("TEST BUG: fails on the plain database (binary): {e}"))?;
    let other = run_text(reversed, sql)
        .await
        .map_err(|e| format!("TEST BUG: fails on the reversed copy: {e}"))?;
    if let Some(d) = diff_text(&text, &other, order) {
        return Err(format!(
            "TEST BUG: the result depends on the physical row order (an ORDER BY leaves ties \
             open?): {d}"
        ));
    }
    if text.rows.len() != binary.rows.len() {
        return Err("TEST BUG: text and binary results differ in length".into());
    }
    Ok(Expected { text, binary })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_shard_queries_match_a_single_database() {
    let started = Instant::now();
    let names = Names {
        users: unique("xusers"),
        orders: unique("xorders"),
        countries: unique("xcountries"),
    };
    let mut config: Config = common::sharded_config();
    config
        .sharding
        .tables
        .insert(names.users.clone(), "id".into());
    config
        .sharding
        .tables
        .insert(names.orders.clone(), "user_id".into());
    config
        .sharding
        .reference_tables
        .push(names.countries.clone());
    let router = Router::new(&config).expect("router");
    assert_eq!(router.shard_count(), 2);
    let proxy = Proxy::start_with(config, |_| {}).await;

    let data = generate();
    let (plain, reversed) = plain_database(&names, &data).await;
    let mut side = ProxySide {
        proxy: &proxy,
        client: proxy.connect().await,
    };
    sharded_load(&side.client, &router, &names, &data).await;
    wait_for_replicas().await;
    let ids = in_list_ids(&router, &names.users);
    let keys = single_shard_keys(&router, &names, &data);
    let ph = Placeholders {
        names: names.clone(),
        ids: ids
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        keys,
    };
    eprintln!(
        "setup: {} users, {} orders, {} countries loaded in {:?}",
        data.users.len(),
        data.orders.len(),
        data.countries.len(),
        started.elapsed()
    );

    let mut failures: Vec<String> = Vec::new();
    let mut failing: Vec<String> = Vec::new();
    let mut per_category: BTreeMap<&str, (usize, usize)> = BTreeMap::new();

    // 1. Differential queries.
    for (category, order, template) in DIFFERENTIAL {
        let sql = ph.fill(template);
        let mut problems = Vec::new();
        match expected(&plain, &reversed, &sql, *order).await {
            Err(bug) => problems.push(bug),
            Ok(exp) => {
                match side.text(&sql).await {
                    Err(e) => problems.push(format!("text protocol: proxy error {e}")),
                    Ok(got) => {
                        if let Some(d) = diff_text(&exp.text, &got, *order) {
                            problems.push(format!("text protocol: {d}"));
                        }
                    }
                }
                match side.binary(&sql).await {
                    Err(e) => problems.push(format!("binary protocol: proxy error {e}")),
                    Ok(got) => {
                        if let Some(d) = diff_binary(&exp.binary, &got, *order) {
                            problems.push(format!("binary protocol: {d}"));
                        }
                    }
                }
            }
        }
        let entry = per_category.entry(category).or_default();
        entry.1 += 1;
        if problems.is_empty() {
            entry.0 += 1;
        } else {
            failing.push(format!(
                "[{category}] {template}\n      {}",
                first_line(&problems[0])
            ));
            failures.push(format!("[{category}] {sql}\n  {}", problems.join("\n  ")));
        }
    }

    // 2. Shapes that must be refused with 0A000.
    for template in REFUSED {
        let sql = ph.fill(template);
        let mut problems = Vec::new();
        if let Err(bug) = run_text(&plain, &sql).await {
            problems.push(format!("TEST BUG: fails on the plain database: {bug}"));
        }
        if let Err(bug) = run_binary(&plain, &sql).await {
            problems.push(format!(
                "TEST BUG: fails on the plain database (binary): {bug}"
            ));
        }
        let text = side.text(&sql).await.map(drop);
        let binary = side.binary(&sql).await.map(drop);
        for (protocol, outcome) in [("text", text), ("binary", binary)] {
            match outcome {
                Err(e) if e.code.as_deref() == Some("0A000") => {}
                Err(e) => problems.push(format!("{protocol} protocol: expected 0A000, got {e}")),
                Ok(()) => problems.push(format!(
                    "{protocol} protocol: expected 0A000, the proxy answered"
                )),
            }
        }
        let entry = per_category.entry("refused (0A000)").or_default();
        entry.1 += 1;
        if problems.is_empty() {
            entry.0 += 1;
        } else {
            failing.push(format!(
                "[refused] {template}\n      {}",
                first_line(&problems[0])
            ));
            failures.push(format!("[refused] {sql}\n  {}", problems.join("\n  ")));
        }
    }

    // 3. Shapes that may be refused or answered, never answered wrongly.
    let mut either_report = Vec::new();
    for (order, template) in EITHER {
        let sql = ph.fill(template);
        let mut problems = Vec::new();
        let mut outcomes = Vec::new();
        match expected(&plain, &reversed, &sql, *order).await {
            Err(bug) => problems.push(bug),
            Ok(exp) => {
                match side.text(&sql).await {
                    Err(e) if e.code.as_deref() == Some("0A000") => {
                        outcomes.push(format!("text refused ({})", e.message));
                    }
                    Err(e) => problems.push(format!("text protocol: proxy error {e}")),
                    Ok(got) => match diff_text(&exp.text, &got, *order) {
                        None => outcomes.push("text answered exactly".to_string()),
                        Some(d) => problems.push(format!("text protocol: WRONG ANSWER: {d}")),
                    },
                }
                match side.binary(&sql).await {
                    Err(e) if e.code.as_deref() == Some("0A000") => {
                        outcomes.push("binary refused".to_string());
                    }
                    Err(e) => problems.push(format!("binary protocol: proxy error {e}")),
                    Ok(got) => match diff_binary(&exp.binary, &got, *order) {
                        None => outcomes.push("binary answered exactly".to_string()),
                        Some(d) => problems.push(format!("binary protocol: WRONG ANSWER: {d}")),
                    },
                }
            }
        }
        let entry = per_category.entry("either (0A000 or exact)").or_default();
        entry.1 += 1;
        if problems.is_empty() {
            entry.0 += 1;
            either_report.push(format!("  {template}\n      {}", outcomes.join("; ")));
        } else {
            failing.push(format!(
                "[either] {template}\n      {}",
                first_line(&problems[0])
            ));
            failures.push(format!("[either] {sql}\n  {}", problems.join("\n  ")));
        }
    }

    let total: usize = per_category.values().map(|c| c.1).sum();
    let passed: usize = per_category.values().map(|c| c.0).sum();
    eprintln!("\n=== cross-shard differential: {passed} of {total} queries passed ===");
    for (category, (ok, n)) in &per_category {
        eprintln!("  {category:<24} {ok:>3} / {n}");
    }
    eprintln!("\nshapes that may be refused or answered (all fine):");
    for line in &either_report {
        eprintln!("{line}");
    }
    if !failing.is_empty() {
        eprintln!("\nfailing queries:");
        for f in &failing {
            eprintln!("  {f}");
        }
    }
    eprintln!("(total time {:?})", started.elapsed());
    assert!(
        failures.is_empty(),
        "{} of {total} cross-shard queries failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// The comparison and rendering helpers themselves (no cluster needed).
#[test]
fn the_comparison_helpers_catch_differences() {
    let row = |v: Option<&str>| vec![v.map(str::to_string)];
    let a = vec![row(Some("1")), row(Some("2")), row(None)];
    let shuffled = vec![a[1].clone(), a[0].clone(), a[2].clone()];
    assert!(diff_rows(&a, &shuffled, M, show_text_row).is_none());
    let d = diff_rows(&a, &shuffled, O, show_text_row).expect("order differs");
    assert!(d.contains("different order"), "{d}");
    let d = diff_rows(&a, &a[..2], M, show_text_row).expect("a row is missing");
    assert!(
        d.contains("1 expected rows missing") && d.contains("NULL"),
        "{d}"
    );
    let dup = vec![a[0].clone(), a[0].clone(), a[1].clone()];
    let d = diff_rows(&a, &dup, M, show_text_row).expect("a duplicate is not a NULL");
    assert!(d.contains("unexpected rows"), "{d}");
    // NULL and the empty string differ.
    assert!(diff_rows(&[row(None)], &[row(Some(""))], M, show_text_row).is_some());

    let numeric = |ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[i16]| {
        let mut raw = Vec::new();
        for v in [ndigits, weight, sign as i16, dscale as i16] {
            raw.extend(v.to_be_bytes());
        }
        for d in digits {
            raw.extend(d.to_be_bytes());
        }
        render_numeric(&raw).expect("decodes")
    };
    assert_eq!(numeric(2, 0, 0, 2, &[12, 5000]), "12.50");
    assert_eq!(numeric(1, -1, 0x4000, 4, &[12]), "-0.0012");
    assert_eq!(numeric(4, 2, 0, 1, &[1, 2345, 6789, 1000]), "123456789.1");
    assert_eq!(numeric(0, 0, 0, 2, &[]), "0.00");
    assert_eq!(numeric(1, 1, 0, 0, &[4]), "40000");
    assert_eq!(render_date(0), "2000-01-01");
    assert_eq!(render_date(-1), "1999-12-31");
    assert_eq!(render_date(60), "2000-03-01");
    assert_eq!(
        render_timestamp(86_400_000_000 + 3_723_000_005),
        "2000-01-02 01:02:03.000005"
    );
    assert_eq!(render_timestamp(-1), "1999-12-31 23:59:59.999999");
    assert_eq!(render(&Type::INT8, &(-5i64).to_be_bytes()), "-5");
    assert_eq!(render(&Type::BYTEA, &[1, 2]), "bytea:0x0102");
}
