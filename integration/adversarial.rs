//! Adversarial protocol tests: what real drivers do (portals with row limits, pipelining with
//! errors, savepoints, large results, COPY failures, notifications, multi-shard transactions,
//! unnamed statements, cursors over scatters, abrupt disconnects, connection churn), each
//! bounded in time so a hang fails instead of blocking.

mod common;

use common::raw;

use std::future::Future;
use std::time::{Duration, Instant};

use common::{Proxy, unique};
use futures::{SinkExt, StreamExt};
use tessera::config::PoolMode;
use tessera::router::{Router, canonical_key};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, SimpleQueryMessage};

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

/// A client whose connection task can be aborted (an abrupt disconnect: the socket closes
/// without a Terminate) and whose notices and notifications are collected.
async fn connect_full(
    conninfo: &str,
) -> (
    Client,
    JoinHandle<()>,
    mpsc::UnboundedReceiver<AsyncMessage>,
) {
    let (client, mut conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
        .await
        .expect("connect through proxy");
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = tokio::spawn(async move {
        let mut stream = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(m) => {
                    let _ = tx.send(m);
                }
                Err(_) => break,
            }
        }
    });
    (client, handle, rx)
}

fn simple_rows(msgs: &[SimpleQueryMessage]) -> Vec<&tokio_postgres::SimpleQueryRow> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .collect()
}

/// FNV-1a over a sequence of byte strings (row contents in order).
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
struct Checksum {
    hash: u64,
    rows: u64,
    bytes: u64,
}

impl Checksum {
    fn new() -> Self {
        Checksum {
            hash: 0xcbf2_9ce4_8422_2325,
            rows: 0,
            bytes: 0,
        }
    }
    fn add(&mut self, data: &[u8]) {
        for &b in data.iter().chain(std::iter::once(&0xffu8)) {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(0x100_0000_01b3);
        }
        self.rows += 1;
        self.bytes += data.len() as u64;
    }
}

const BIG_SQL: &str =
    "SELECT g, md5(g::text) || repeat('y', 60) AS s FROM generate_series(1, 200000) g";

async fn checksum_simple(client: &Client, sql: &str) -> Checksum {
    let msgs = client.simple_query(sql).await.expect("simple big query");
    let mut sum = Checksum::new();
    for row in simple_rows(&msgs) {
        let id = row.get(0).expect("id");
        let s = row.get(1).expect("s");
        sum.add(format!("{id}|{s}").as_bytes());
    }
    sum
}

async fn checksum_extended(client: &Client, sql: &str) -> Checksum {
    let stream = client
        .query_raw(sql, std::iter::empty::<i32>())
        .await
        .expect("extended big query");
    let mut stream = std::pin::pin!(stream);
    let mut sum = Checksum::new();
    while let Some(row) = stream.next().await {
        let row = row.expect("row");
        let id: i32 = row.get(0);
        let s: &str = row.get(1);
        sum.add(format!("{id}|{s}").as_bytes());
    }
    sum
}

// --- sharded helpers ---

struct ShardedFixture {
    proxy: Proxy,
    table: String,
    router: Router,
    /// The ids stored on each shard (v = 3 * id, note = 'n' || id).
    ids: [Vec<i64>; 2],
}

fn shard_of(router: &Router, table: &str, id: i64) -> usize {
    router
        .shard_of(&canonical_key(&id.to_string()), table)
        .expect("placement")
}

/// A 2-shard proxy with a fresh sharded table `(id bigint primary key, v bigint, note text)`
/// holding ids 1..=rows, inserted directly on the shard the map says.
async fn sharded_fixture(pool_size: u32, replica_reads: bool, rows: i64) -> ShardedFixture {
    let table = unique("adv_t");
    let proxy = Proxy::start_sharded(|c| {
        c.sharding.tables.insert(table.clone(), "id".into());
        c.pool.size = pool_size;
        c.routing.replica_reads = replica_reads;
    })
    .await;
    let mut config = common::sharded_config();
    config.sharding.tables.insert(table.clone(), "id".into());
    let router = Router::new(&config).expect("router");
    let client = proxy.connect().await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (id bigint PRIMARY KEY, v bigint NOT NULL, note text NOT NULL)"
        ))
        .await
        .expect("DDL through the proxy");
    let mut ids = [Vec::new(), Vec::new()];
    for id in 1..=rows {
        ids[shard_of(&router, &table, id)].push(id);
    }
    for (s, list) in ids.iter().enumerate() {
        let direct = common::connect_primary(s).await;
        direct
            .execute(
                &format!(
                    "INSERT INTO {table} (id, v, note) SELECT g, g * 3, 'n' || g FROM unnest($1::bigint[]) g"
                ),
                &[list],
            )
            .await
            .expect("populate shard");
    }
    assert!(
        !ids[0].is_empty() && !ids[1].is_empty(),
        "both shards need rows"
    );
    if replica_reads {
        wait_replicas_caught_up().await;
    }
    ShardedFixture {
        proxy,
        table,
        router,
        ids,
    }
}

/// Waits until every replica has replayed everything its primary has written so far.
async fn wait_replicas_caught_up() {
    for s in 0..2 {
        let primary = common::connect_primary(s).await;
        let lsn: String = primary
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .expect("primary lsn")
            .get(0);
        let info = common::with_cluster(|c| c.app_conninfo(&c.shards()[s].replicas[0]));
        let replica = common::connect(&info).await.expect("replica connection");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let done: bool = replica
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&lsn],
                )
                .await
                .expect("replica lsn")
                .get(0);
            if done {
                break;
            }
            assert!(Instant::now() < deadline, "replica {s} never caught up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn direct_v(shard: usize, table: &str, id: i64) -> Option<i64> {
    let direct = common::connect_primary(shard).await;
    direct
        .query_opt(&format!("SELECT v FROM {table} WHERE id = $1"), &[&id])
        .await
        .expect("direct read")
        .map(|r| r.get(0))
}

// === 1. portals with a row limit ===

#[tokio::test(flavor = "multi_thread")]
async fn portal_execute_with_max_rows_suspends_and_resumes() {
    let proxy = Proxy::start(|c| c.pool.size = 2).await;
    let table = unique("portal");
    let mut client = proxy.connect().await;
    let mut direct = common::connect_primary(0).await;
    bounded(20, "portal fetches", async {
        client
            .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
            .await
            .expect("create");

        /// Fetch sizes and values of two interleaved portals, as the server reports them.
        async fn fetch_pattern(
            client: &mut Client,
            table: &str,
        ) -> (Vec<usize>, Vec<i32>, Vec<usize>, Vec<i32>) {
            let a = client
                .prepare("SELECT g FROM generate_series(1, 7) g")
                .await
                .expect("prepare a");
            let b = client
                .prepare("SELECT g FROM generate_series(100, 104) g")
                .await
                .expect("prepare b");
            let tx = client.transaction().await.expect("begin");
            tx.execute(&format!("INSERT INTO {table} VALUES (1)"), &[])
                .await
                .expect("insert 1");
            let pa = tx.bind(&a, &[]).await.expect("bind a");
            let pb = tx.bind(&b, &[]).await.expect("bind b");
            let (mut sa, mut va, mut sb, mut vb) = (vec![], vec![], vec![], vec![]);
            let (mut done_a, mut done_b) = (false, false);
            for _ in 0..10 {
                if !done_a {
                    let rows = tx.query_portal(&pa, 2).await.expect("fetch a");
                    sa.push(rows.len());
                    va.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
                    done_a = rows.is_empty();
                }
                if !done_b {
                    let rows = tx.query_portal(&pb, 3).await.expect("fetch b");
                    sb.push(rows.len());
                    vb.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
                    done_b = rows.is_empty();
                }
            }
            drop(pa);
            drop(pb);
            tx.execute(&format!("INSERT INTO {table} VALUES (2)"), &[])
                .await
                .expect("insert 2 after the portals");
            tx.commit().await.expect("commit");
            (sa, va, sb, vb)
        }

        let through_proxy = fetch_pattern(&mut client, &table).await;
        let n: i64 = direct
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(
            n, 2,
            "the transaction around the portals did not commit both rows"
        );
        direct
            .batch_execute(&format!("TRUNCATE {table}"))
            .await
            .expect("truncate");
        let on_postgres = fetch_pattern(&mut direct, &table).await;
        assert_eq!(
            through_proxy, on_postgres,
            "portal fetches through the proxy differ from Postgres"
        );
        assert_eq!(through_proxy.1, (1..=7).collect::<Vec<_>>());
        assert_eq!(through_proxy.3, (100..=104).collect::<Vec<_>>());
        let one: i32 = client
            .query_one("SELECT 1", &[])
            .await
            .expect("usable after")
            .get(0);
        assert_eq!(one, 1);
    })
    .await;
}

// === 2. pipelining with errors in the middle ===

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_queries_with_errors_in_the_middle() {
    let proxy = Proxy::start(|c| c.pool.size = 2).await;
    let client = proxy.connect().await;
    bounded(20, "pipeline", async {
        let double = client.prepare("SELECT $1::int * 2").await.expect("prepare");
        let divide = client
            .prepare("SELECT 100 / $1::int")
            .await
            .expect("prepare divide");
        #[derive(Debug, PartialEq)]
        enum Out {
            Val(i64),
            Err(String),
        }
        let futs = (0..120i32).map(|i| {
            let client = &client;
            let double = &double;
            let divide = &divide;
            async move {
                let r: Result<i64, tokio_postgres::Error> = match i % 6 {
                    // Division by zero on every 10th.
                    0 => client
                        .query_one(divide, &[&(i % 10)])
                        .await
                        .map(|r| i64::from(r.get::<_, i32>(0))),
                    // Syntax error at Parse (prepare fails).
                    1 if i % 4 == 1 => client
                        .query_one(&format!("SELEC {i}"), &[])
                        .await
                        .map(|_| -1),
                    // A fresh statement text each time: Parse + Describe + Bind + Execute.
                    2 => client
                        .query_one(&format!("SELECT {i}::int8 + $1::int8"), &[&1i64])
                        .await
                        .map(|r| r.get::<_, i64>(0)),
                    // Simple protocol in the middle of the pipeline.
                    3 => client
                        .simple_query(&format!("SELECT {i} * 3"))
                        .await
                        .map(|m| simple_rows(&m)[0].get(0).unwrap().parse().unwrap()),
                    // A runtime error from a fresh statement.
                    4 => client
                        .query_one(&format!("SELECT {i} / ($1::int - $1::int)"), &[&i])
                        .await
                        .map(|_| -1),
                    _ => client
                        .query_one(double, &[&i])
                        .await
                        .map(|r| i64::from(r.get::<_, i32>(0))),
                };
                match r {
                    Ok(v) => Out::Val(v),
                    Err(e) => Out::Err(code(&e).unwrap_or_else(|| format!("no sqlstate: {e}"))),
                }
            }
        });
        let results = futures::future::join_all(futs).await;
        for (i, got) in results.into_iter().enumerate() {
            let i = i as i32;
            let want = match i % 6 {
                0 if i % 10 == 0 => Out::Err("22012".into()),
                0 => Out::Val(i64::from(100 / (i % 10))),
                1 if i % 4 == 1 => Out::Err("42601".into()),
                2 => Out::Val(i64::from(i) + 1),
                3 => Out::Val(i64::from(i) * 3),
                4 => Out::Err("22012".into()),
                _ => Out::Val(i64::from(i) * 2),
            };
            assert_eq!(got, want, "pipelined request {i}");
        }
        let ok: i32 = client
            .query_one(&double, &[&21])
            .await
            .expect("usable after the pipeline")
            .get(0);
        assert_eq!(ok, 42);
    })
    .await;
}

// === 3. errors mid-transaction, ROLLBACK TO SAVEPOINT, COMMIT ===

#[tokio::test(flavor = "multi_thread")]
async fn savepoint_rollback_after_errors_then_commit() {
    let proxy = Proxy::start(|c| c.pool.size = 2).await;
    let table = unique("savepoint");
    let mut client = proxy.connect().await;
    let direct = common::connect_primary(0).await;
    bounded(20, "savepoints", async {
        client
            .batch_execute(&format!("CREATE TABLE {table} (id int PRIMARY KEY)"))
            .await
            .expect("create");
        let mut tx = client.transaction().await.expect("begin");
        tx.execute(&format!("INSERT INTO {table} VALUES (1)"), &[])
            .await
            .expect("insert 1");
        {
            let sp = tx.savepoint("sp1").await.expect("savepoint");
            let err = sp
                .execute(&format!("INSERT INTO {table} VALUES (1)"), &[])
                .await
                .expect_err("duplicate key");
            assert_eq!(code(&err).as_deref(), Some("23505"));
            let err = sp
                .query_one("SELECT 1", &[])
                .await
                .expect_err("aborted transaction");
            assert_eq!(code(&err).as_deref(), Some("25P02"));
            sp.rollback().await.expect("rollback to savepoint");
        }
        tx.execute(&format!("INSERT INTO {table} VALUES (2)"), &[])
            .await
            .expect("insert 2 after rollback to savepoint");
        // The same with SQL text and the simple protocol.
        tx.batch_execute("SAVEPOINT s2")
            .await
            .expect("savepoint s2");
        let err = tx
            .batch_execute("SELECT 1/0")
            .await
            .expect_err("division by zero");
        assert_eq!(code(&err).as_deref(), Some("22012"));
        let err = tx
            .batch_execute(&format!("INSERT INTO {table} VALUES (99)"))
            .await
            .expect_err("aborted");
        assert_eq!(code(&err).as_deref(), Some("25P02"));
        tx.batch_execute("ROLLBACK TO SAVEPOINT s2")
            .await
            .expect("rollback to s2");
        tx.batch_execute(&format!(
            "INSERT INTO {table} VALUES (3); RELEASE SAVEPOINT s2"
        ))
        .await
        .expect("insert 3, release");
        tx.commit().await.expect("commit");
        let ids: Vec<i32> = direct
            .query(&format!("SELECT id FROM {table} ORDER BY id"), &[])
            .await
            .expect("direct read")
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(ids, vec![1, 2, 3], "rows committed on the shard");
        // The connection went back clean: a new transaction starts fresh.
        // (Simple protocol: there a new transaction starts at the statement's own timestamp.)
        let msgs = client
            .simple_query("SELECT now() = statement_timestamp()")
            .await
            .expect("after");
        let in_tx = simple_rows(&msgs)[0].get(0) == Some("t");
        assert!(in_tx, "still inside a transaction after COMMIT");
    })
    .await;
}

// === 4. large results ===

#[tokio::test(flavor = "multi_thread")]
async fn large_results_simple_and_extended() {
    let proxy = Proxy::start(|c| c.pool.size = 2).await;
    let client = proxy.connect().await;
    let direct = common::connect_primary(0).await;
    bounded(60, "large results", async {
        let expected = checksum_extended(&direct, BIG_SQL).await;
        assert_eq!(expected.rows, 200_000);
        let t = Instant::now();
        let simple = checksum_simple(&client, BIG_SQL).await;
        let simple_time = t.elapsed();
        assert_eq!(simple, expected, "simple protocol rows differ");
        let t = Instant::now();
        let extended = checksum_extended(&client, BIG_SQL).await;
        let extended_time = t.elapsed();
        assert_eq!(extended, expected, "extended protocol rows differ");
        eprintln!("200k rows: simple {simple_time:?}, extended {extended_time:?}");
        let one: i32 = client
            .query_one("SELECT 1", &[])
            .await
            .expect("after")
            .get(0);
        assert_eq!(one, 1);
    })
    .await;
}

// === 5. COPY ===

/// Runs an extended-protocol COPY FROM STDIN whose row 501 is bad, letting the server's error
/// arrive while the client is still sending rows, and returns the error the client gets.
async fn failing_copy_in(
    client: &Client,
    statement: &tokio_postgres::Statement,
) -> tokio_postgres::Error {
    let sink = client
        .copy_in::<_, bytes::Bytes>(statement)
        .await
        .expect("copy in");
    let mut sink = Box::pin(sink);
    let mut failure = None;
    for i in 0..500 {
        if let Err(e) = sink.send(bytes::Bytes::from(format!("{i}\n"))).await {
            failure = Some(e);
            break;
        }
    }
    if failure.is_none()
        && let Err(e) = sink
            .send(bytes::Bytes::from_static(b"not a number\n"))
            .await
    {
        failure = Some(e);
    }
    if failure.is_none()
        && let Err(e) = sink.flush().await
    {
        failure = Some(e);
    }
    // Let the server's error arrive while the client is still in COPY mode.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if failure.is_none() {
        for i in 500..1000 {
            if let Err(e) = sink.send(bytes::Bytes::from(format!("{i}\n"))).await {
                failure = Some(e);
                break;
            }
        }
    }
    let result = match failure {
        Some(e) => Err(e),
        None => sink.as_mut().finish().await,
    };
    result.expect_err("COPY with a bad row must fail")
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_in_extended_with_bad_row_leaves_connection_usable() {
    // Pool of one: whatever state the failed COPY leaves is what the next statement gets.
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let table = unique("copy_bad");
    let client = proxy.connect().await;
    bounded(20, "copy with a bad row", async {
        client
            .batch_execute(&format!("CREATE TABLE {table} (id int)"))
            .await
            .expect("create");
        // The statement is dropped right after: tokio-postgres then sends Close + Sync first.
        let stmt = client
            .prepare(&format!("COPY {table} FROM STDIN"))
            .await
            .expect("prepare copy");
        let err = failing_copy_in(&client, &stmt).await;
        assert_eq!(code(&err).as_deref(), Some("22P02"), "{err}");
        drop(stmt);
        let one = bounded(
            5,
            "query after failed COPY",
            client.query_one("SELECT 1", &[]),
        )
        .await
        .expect("the same client can query after a failed COPY");
        assert_eq!(one.get::<_, i32>(0), 1);
        let other = proxy.connect().await;
        let n: i64 = bounded(
            5,
            "other client after failed COPY",
            other.query_one(&format!("SELECT count(*) FROM {table}"), &[]),
        )
        .await
        .expect("another client can query after a failed COPY")
        .get(0);
        assert_eq!(n, 0, "the failed COPY left rows behind");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_in_extended_bad_row_then_simple_query_on_the_pooled_connection() {
    // As above, but the COPY statement stays prepared (no Close + Sync follows the COPY) and
    // the next thing the single pooled server connection receives is a simple Query.
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let table = unique("copy_bad2");
    let client = proxy.connect().await;
    bounded(25, "copy with a bad row, then a simple query", async {
        client
            .batch_execute(&format!("CREATE TABLE {table} (id int)"))
            .await
            .expect("create");
        let stmt = client
            .prepare(&format!("COPY {table} FROM STDIN"))
            .await
            .expect("prepare copy");
        let err = failing_copy_in(&client, &stmt).await;
        assert_eq!(code(&err).as_deref(), Some("22P02"), "{err}");
        let other = proxy.connect().await;
        let msgs = bounded(
            5,
            "simple query on the connection the failed extended COPY used",
            other.simple_query(&format!("SELECT count(*) FROM {table}")),
        )
        .await
        .expect("another client's simple query after a failed COPY");
        assert_eq!(simple_rows(&msgs)[0].get(0), Some("0"));
        let one = bounded(5, "same client after", client.query_one("SELECT 1", &[]))
            .await
            .expect("the same client can query after a failed COPY");
        assert_eq!(one.get::<_, i32>(0), 1);
        drop(stmt);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_in_simple_with_bad_row_then_copy_out_many_rows() {
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let table = unique("copy_simple");
    let url = proxy.url();
    let client = proxy.connect().await;
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int, s text)"))
        .await
        .expect("create");
    // psql: simple-protocol COPY with a bad row in the middle, then more statements.
    let mut script = format!("COPY {table} FROM STDIN;\n");
    for i in 0..2000 {
        if i == 1000 {
            script.push_str("oops\tbad\n");
        }
        script.push_str(&format!("{i}\trow {i}\n"));
    }
    script.push_str("\\.\n");
    script.push_str(&format!(
        "SELECT 'count=' || count(*) FROM {table};\nSELECT 'alive';\n"
    ));
    let out = bounded(
        20,
        "psql COPY",
        tokio::task::spawn_blocking(move || common::psql(&url, &["-A", "-t"], Some(&script))),
    )
    .await
    .expect("psql");
    let (stdout, stderr) = (common::text(&out.stdout), common::text(&out.stderr));
    assert!(
        stderr.contains("invalid input syntax"),
        "no COPY error: {stderr}"
    );
    assert!(stdout.contains("count=0"), "{stdout}\n{stderr}");
    assert!(stdout.contains("alive"), "{stdout}\n{stderr}");

    // COPY TO STDOUT of many rows, text then binary, compared with Postgres.
    bounded(40, "copy out", async {
        let direct = common::connect_primary(0).await;
        let sql = "COPY (SELECT g, md5(g::text) FROM generate_series(1, 150000) g) TO STDOUT";
        async fn collect(client: &Client, sql: &str) -> Vec<u8> {
            let stream = client.copy_out(sql).await.expect("copy out");
            let mut stream = std::pin::pin!(stream);
            let mut all = Vec::new();
            while let Some(chunk) = stream.next().await {
                all.extend_from_slice(&chunk.expect("chunk"));
            }
            all
        }
        let via_proxy = collect(&client, sql).await;
        let expected = collect(&direct, sql).await;
        assert_eq!(via_proxy.len(), expected.len(), "COPY OUT sizes differ");
        assert!(via_proxy == expected, "COPY OUT bytes differ");
        assert_eq!(String::from_utf8_lossy(&via_proxy).lines().count(), 150_000);
        let bin = "COPY (SELECT g FROM generate_series(1, 50000) g) TO STDOUT (FORMAT binary)";
        assert!(
            collect(&client, bin).await == collect(&direct, bin).await,
            "binary COPY OUT differs"
        );
        let one: i32 = client
            .query_one("SELECT 1", &[])
            .await
            .expect("after")
            .get(0);
        assert_eq!(one, 1);
    })
    .await;
}

// === 6. notices and notifications (session mode) ===

#[tokio::test(flavor = "multi_thread")]
async fn notices_and_notifications_in_session_mode() {
    let proxy = Proxy::start(|c| {
        c.pool.mode = PoolMode::Session;
        c.pool.size = 4;
    })
    .await;
    let channel = unique("chan");
    let (a, _handle, mut messages) = connect_full(&proxy.conninfo()).await;
    let b = proxy.connect().await;
    bounded(20, "notices and notifications", async {
        // A notice in the simple and in the extended protocol.
        a.batch_execute("DO $$ BEGIN RAISE NOTICE 'adv notice %', 41; END $$")
            .await
            .expect("do");
        a.execute("DO $$ BEGIN RAISE NOTICE 'adv notice %', 42; END $$", &[])
            .await
            .expect("do extended");
        let mut notices = Vec::new();
        while let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_millis(500), messages.recv()).await
        {
            if let AsyncMessage::Notice(n) = m {
                notices.push(n.message().to_string());
            }
            if notices.len() == 2 {
                break;
            }
        }
        assert_eq!(notices, vec!["adv notice 41", "adv notice 42"]);

        // A notification to itself arrives with the reply of the NOTIFY.
        a.batch_execute(&format!("LISTEN {channel}")).await.expect("listen");
        a.batch_execute(&format!("NOTIFY {channel}, 'self'"))
            .await
            .expect("notify self");
        let got = tokio::time::timeout(Duration::from_secs(2), messages.recv()).await;
        match got {
            Ok(Some(AsyncMessage::Notification(n))) => assert_eq!(n.payload(), "self"),
            other => panic!("no self-notification: {other:?}"),
        }

        // A notification from another session reaches an idle listener, as on Postgres.
        b.batch_execute(&format!("NOTIFY {channel}, 'from b'"))
            .await
            .expect("notify from b");
        let got = tokio::time::timeout(Duration::from_secs(3), messages.recv()).await;
        match got {
            Ok(Some(AsyncMessage::Notification(n))) => assert_eq!(n.payload(), "from b"),
            Ok(other) => panic!("unexpected message instead of the notification: {other:?}"),
            Err(_) => {
                // Diagnose: does it arrive once the listener sends something?
                a.batch_execute("SELECT 1").await.expect("poke");
                let late = messages.try_recv();
                panic!(
                    "an idle LISTENing client did not receive a NOTIFY from another session within 3 s; \
                     after the client sent a query it got: {late:?}"
                );
            }
        }
    })
    .await;
}

// === 7. sharded ===

#[tokio::test(flavor = "multi_thread")]
async fn sharded_transaction_reads_two_shards_then_writes_one() {
    let f = sharded_fixture(4, true, 200).await;
    let (t, k0, k1) = (&f.table, f.ids[0][0], f.ids[1][0]);
    let mut client = f.proxy.connect().await;
    bounded(20, "multi-shard transaction", async {
        let by_id = client
            .prepare(&format!("SELECT v FROM {t} WHERE id = $1"))
            .await
            .expect("prepare");
        let tx = client.transaction().await.expect("begin");
        let v0: i64 = tx
            .query_one(&by_id, &[&k0])
            .await
            .expect("read shard 0")
            .get(0);
        let v1: i64 = tx
            .query_one(&by_id, &[&k1])
            .await
            .expect("read shard 1")
            .get(0);
        assert_eq!((v0, v1), (k0 * 3, k1 * 3));
        // A scatter read too (keyless).
        let n = tx
            .query(&format!("SELECT id FROM {t} WHERE v % 2 = 0"), &[])
            .await
            .expect("scatter in tx")
            .len();
        assert_eq!(n, 100, "even v: 100 of 200 rows");
        let updated = tx
            .execute(&format!("UPDATE {t} SET v = -1 WHERE id = $1"), &[&k1])
            .await
            .expect("write on one shard");
        assert_eq!(updated, 1);
        let v1: i64 = tx
            .query_one(&by_id, &[&k1])
            .await
            .expect("read own write")
            .get(0);
        assert_eq!(v1, -1);
        tx.commit().await.expect("commit");
        assert_eq!(
            direct_v(1, t, k1).await,
            Some(-1),
            "write not committed on shard 1"
        );
        assert_eq!(direct_v(0, t, k0).await, Some(k0 * 3));
        // Both shard connections are idle again: a second transaction writing the other shard.
        let tx = client.transaction().await.expect("begin 2");
        tx.query_one(&by_id, &[&k1]).await.expect("read shard 1");
        tx.execute(&format!("UPDATE {t} SET v = -2 WHERE id = $1"), &[&k0])
            .await
            .expect("write shard 0");
        tx.commit().await.expect("commit 2");
        assert_eq!(
            direct_v(0, t, k0).await,
            Some(-2),
            "write not committed on shard 0"
        );
        // A write to a second shard joins the transaction; ROLLBACK undoes both, never half.
        let tx = client.transaction().await.expect("begin 3");
        tx.execute(&format!("UPDATE {t} SET v = -3 WHERE id = $1"), &[&k0])
            .await
            .expect("first write");
        tx.execute(&format!("UPDATE {t} SET v = -3 WHERE id = $1"), &[&k1])
            .await
            .expect("second shard write");
        tx.rollback().await.expect("rollback");
        assert_eq!(
            direct_v(0, t, k0).await,
            Some(-2),
            "rolled-back write visible"
        );
        assert_eq!(direct_v(1, t, k1).await, Some(-1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_begin_and_commit_through_the_extended_protocol() {
    // JDBC, npgsql and others send BEGIN/COMMIT as Parse/Bind/Execute, not as simple queries.
    let f = sharded_fixture(4, false, 100).await;
    let (t, k0, k1) = (&f.table, f.ids[0][0], f.ids[1][0]);
    let client = f.proxy.connect().await;
    bounded(20, "extended BEGIN/COMMIT", async {
        // Only shard 1 is touched.
        client.execute("BEGIN", &[]).await.expect("begin");
        client
            .execute(&format!("UPDATE {t} SET v = 1001 WHERE id = $1"), &[&k1])
            .await
            .expect("update shard 1");
        client.execute("COMMIT", &[]).await.expect("commit");
        let other = f.proxy.connect().await;
        let seen: i64 = other
            .query_one(&format!("SELECT v FROM {t} WHERE id = $1"), &[&k1])
            .await
            .expect("read from another session")
            .get(0);
        assert_eq!(
            (direct_v(1, t, k1).await, seen),
            (Some(1001), 1001),
            "a transaction on shard 1 committed with an extended-protocol COMMIT is not committed there"
        );
        // Read shard 0, write shard 1, extended COMMIT.
        client.execute("BEGIN", &[]).await.expect("begin 2");
        client
            .query_one(&format!("SELECT v FROM {t} WHERE id = $1"), &[&k0])
            .await
            .expect("read shard 0");
        client
            .execute(&format!("UPDATE {t} SET v = 1002 WHERE id = $1"), &[&k1])
            .await
            .expect("update shard 1");
        client.execute("COMMIT", &[]).await.expect("commit 2");
        assert_eq!(
            direct_v(1, t, k1).await,
            Some(1002),
            "read on shard 0 + write on shard 1, extended COMMIT: the write is not committed"
        );
        // An extended ROLLBACK undoes the write.
        client.execute("BEGIN", &[]).await.expect("begin 3");
        client
            .execute(&format!("UPDATE {t} SET v = 1003 WHERE id = $1"), &[&k1])
            .await
            .expect("update shard 1");
        client.execute("ROLLBACK", &[]).await.expect("rollback");
        assert_eq!(direct_v(1, t, k1).await, Some(1002), "extended ROLLBACK did not roll back");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_error_on_one_shard_aborts_the_whole_transaction() {
    let f = sharded_fixture(4, false, 100).await;
    let (t, k0, k1) = (&f.table, f.ids[0][0], f.ids[1][0]);
    let client = f.proxy.connect().await;
    bounded(20, "error then write on the other shard", async {
        client.batch_execute("BEGIN").await.expect("begin");
        let err = client
            .simple_query(&format!("SELECT 1 / (v - v) FROM {t} WHERE id = {k0}"))
            .await
            .expect_err("division by zero on shard 0");
        assert_eq!(code(&err).as_deref(), Some("22012"));
        // On Postgres the transaction is now aborted: every statement fails with 25P02.
        let after = client
            .simple_query(&format!("UPDATE {t} SET v = 777 WHERE id = {k1}"))
            .await;
        let commit = client.simple_query("COMMIT").await;
        let v1 = direct_v(1, t, k1).await;
        assert!(
            matches!(&after, Err(e) if code(e).as_deref() == Some("25P02")),
            "a write after an error in the transaction ran instead of failing with 25P02: {after:?}"
        );
        assert_eq!(
            v1,
            Some(k1 * 3),
            "the write made after the error was committed on shard 1 (COMMIT reply: {commit:?})"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_prepared_statements_on_both_shards_and_pipelined() {
    let f = sharded_fixture(4, true, 400).await;
    let t = &f.table;
    let client = f.proxy.connect().await;
    bounded(30, "prepared across shards", async {
        let by_id = client
            .prepare(&format!("SELECT v, note FROM {t} WHERE id = $1"))
            .await
            .expect("prepare");
        let keys: Vec<i64> = f.ids[0]
            .iter()
            .take(20)
            .chain(f.ids[1].iter().take(20))
            .copied()
            .collect();
        for &k in &keys {
            let row = client.query_one(&by_id, &[&k]).await.expect("by id");
            assert_eq!(row.get::<_, i64>(0), k * 3);
            assert_eq!(row.get::<_, String>(1), format!("n{k}"));
        }
        // Pipelined, alternating shards, with unknown keys and an error mixed in.
        let futs = (0..80usize).map(|n| {
            let client = &client;
            let by_id = &by_id;
            let k = if n % 2 == 0 { f.ids[0][n] } else { f.ids[1][n] };
            async move {
                if n % 17 == 5 {
                    return client
                        .query_opt(by_id, &[&(k + 1_000_000)])
                        .await
                        .map(|r| r.map(|r| r.get::<_, i64>(0)));
                }
                if n % 19 == 7 {
                    return client
                        .query_opt(&format!("SELECT v / (v - v) FROM {t} WHERE id = $1"), &[&k])
                        .await
                        .map(|r| r.map(|r| r.get::<_, i64>(0)));
                }
                client
                    .query_opt(by_id, &[&k])
                    .await
                    .map(|r| r.map(|r| r.get::<_, i64>(0)))
            }
        });
        let results = futures::future::join_all(futs).await;
        for (n, r) in results.into_iter().enumerate() {
            let k = if n % 2 == 0 { f.ids[0][n] } else { f.ids[1][n] };
            if n % 17 == 5 {
                assert_eq!(r.expect("unknown key"), None, "request {n}");
            } else if n % 19 == 7 {
                let e = r.expect_err("division by zero");
                assert_eq!(code(&e).as_deref(), Some("22012"), "request {n}");
            } else {
                assert_eq!(r.expect("pipelined by id"), Some(k * 3), "request {n}");
            }
        }
        // A prepared write on each shard, checked on the shards.
        let set = client
            .prepare(&format!("UPDATE {t} SET v = $2 WHERE id = $1"))
            .await
            .expect("prepare update");
        let (k0, k1) = (f.ids[0][1], f.ids[1][1]);
        assert_eq!(
            client.execute(&set, &[&k0, &5i64]).await.expect("update 0"),
            1
        );
        assert_eq!(
            client.execute(&set, &[&k1, &6i64]).await.expect("update 1"),
            1
        );
        assert_eq!(direct_v(0, t, k0).await, Some(5));
        assert_eq!(direct_v(1, t, k1).await, Some(6));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_query_typed_routes_unnamed_statements_by_key() {
    // query_typed uses the unnamed statement: Parse(""), Bind, Describe, Execute, Sync in one
    // batch, as pgx, psycopg 3, node-postgres and JDBC do.
    let f = sharded_fixture(4, false, 200).await;
    let t = &f.table;
    let client = f.proxy.connect().await;
    bounded(20, "query_typed", async {
        let mut wrong = Vec::new();
        // Shard 1 first: the session's very first statement must not default to shard 0.
        for s in [1usize, 0] {
            let ids = &f.ids[s];
            for &k in ids.iter().take(5) {
                let rows = client
                    .query_typed(
                        &format!("SELECT v FROM {t} WHERE id = $1"),
                        &[(&k as &(dyn ToSql + Sync), Type::INT8)],
                    )
                    .await
                    .expect("query_typed int8");
                if rows.len() != 1 || rows[0].get::<_, i64>(0) != k * 3 {
                    wrong.push(format!("int8 key {k} (shard {s}): {} rows", rows.len()));
                }
                let k4 = i32::try_from(k).expect("small key");
                let rows = client
                    .query_typed(
                        // The key is the second parameter here.
                        &format!("SELECT note FROM {t} WHERE note = $1 AND id = $2"),
                        &[
                            (&format!("n{k}") as &(dyn ToSql + Sync), Type::TEXT),
                            (&k4 as &(dyn ToSql + Sync), Type::INT4),
                        ],
                    )
                    .await
                    .expect("query_typed int4 + text");
                if rows.len() != 1 {
                    wrong.push(format!("int4 key {k} (shard {s}): {} rows", rows.len()));
                }
            }
        }
        // A keyless scatter through the unnamed statement.
        let rows = client
            .query_typed(
                &format!("SELECT id FROM {t} WHERE v > $1"),
                &[(&(190i64 * 3) as &(dyn ToSql + Sync), Type::INT8)],
            )
            .await
            .expect("typed scatter");
        if rows.len() != 10 {
            wrong.push(format!("keyless scatter: {} of 10 rows", rows.len()));
        }
        // Writes through the unnamed statement must land on the key's shard.
        let mut misplaced = Vec::new();
        for id in 100_001..100_021i64 {
            let n = client
                .execute_typed(
                    &format!("INSERT INTO {t} (id, v, note) VALUES ($1, $2, 'typed')"),
                    &[
                        (&id as &(dyn ToSql + Sync), Type::INT8),
                        (&7i64 as &(dyn ToSql + Sync), Type::INT8),
                    ],
                )
                .await
                .expect("execute_typed insert");
            if n != 1 {
                misplaced.push(format!("INSERT of {id} reported {n} rows"));
            }
            let want = shard_of(&f.router, t, id);
            if direct_v(want, t, id).await.is_none() {
                misplaced.push(format!("{id} missing from shard {want}, where it belongs"));
            }
            if direct_v(1 - want, t, id).await.is_some() {
                misplaced.push(format!("{id} stored on shard {}, not its shard", 1 - want));
            }
        }
        assert!(
            wrong.is_empty() && misplaced.is_empty(),
            "unnamed statements routed wrongly.\nreads: {wrong:#?}\nwrites misplaced: {misplaced:#?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_scatter_reads_with_no_rows_and_many_rows() {
    let f = sharded_fixture(4, true, 30_000).await;
    let t = &f.table;
    let client = f.proxy.connect().await;
    bounded(40, "scatter reads", async {
        // ~0 rows.
        let none = format!("SELECT id, note FROM {t} WHERE v < 0");
        assert_eq!(
            client.query(&none, &[]).await.expect("extended none").len(),
            0
        );
        let msgs = client.simple_query(&none).await.expect("simple none");
        assert_eq!(simple_rows(&msgs).len(), 0);
        let tag = msgs.iter().find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        });
        assert_eq!(tag, Some(0));
        // One row (on one shard only) without a key.
        let one = client
            .query(
                &format!("SELECT id FROM {t} WHERE v = $1"),
                &[&(f.ids[1][3] * 3)],
            )
            .await
            .expect("one row");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].get::<_, i64>(0), f.ids[1][3]);
        // Many rows: every id exactly once.
        let all = format!("SELECT id, note FROM {t}");
        let rows = client.query(&all, &[]).await.expect("extended all");
        let mut ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
        ids.sort_unstable();
        assert_eq!(
            ids,
            (1..=30_000).collect::<Vec<i64>>(),
            "extended scatter rows"
        );
        let msgs = client.simple_query(&all).await.expect("simple all");
        let mut ids: Vec<i64> = simple_rows(&msgs)
            .iter()
            .map(|r| r.get(0).unwrap().parse().unwrap())
            .collect();
        ids.sort_unstable();
        assert_eq!(
            ids,
            (1..=30_000).collect::<Vec<i64>>(),
            "simple scatter rows"
        );
        let tag = msgs.iter().find_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        });
        assert_eq!(tag, Some(30_000), "summed SELECT count");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_update_returning_on_one_shard() {
    let f = sharded_fixture(4, false, 100).await;
    let t = &f.table;
    let client = f.proxy.connect().await;
    bounded(20, "UPDATE RETURNING", async {
        for s in 0..2 {
            let k = f.ids[s][2];
            let row = client
                .query_one(
                    &format!("UPDATE {t} SET v = v + 1 WHERE id = $1 RETURNING id, v"),
                    &[&k],
                )
                .await
                .expect("extended UPDATE RETURNING");
            assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (k, k * 3 + 1));
            let msgs = client
                .simple_query(&format!(
                    "UPDATE {t} SET v = v + 1 WHERE id = {k} RETURNING v"
                ))
                .await
                .expect("simple UPDATE RETURNING");
            let rows = simple_rows(&msgs);
            assert_eq!(rows.len(), 1);
            assert_eq!(rows[0].get(0), Some((k * 3 + 2).to_string().as_str()));
            let tag = msgs.iter().find_map(|m| match m {
                SimpleQueryMessage::CommandComplete(n) => Some(*n),
                _ => None,
            });
            assert_eq!(tag, Some(1));
            assert_eq!(direct_v(s, t, k).await, Some(k * 3 + 2));
            assert_eq!(direct_v(1 - s, t, k).await, None, "row on the wrong shard");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_scatter_error_on_one_shard() {
    let f = sharded_fixture(4, true, 200).await;
    let t = &f.table;
    let client = f.proxy.connect().await;
    bounded(30, "scatter error", async {
        for s in 0..2 {
            let bad = f.ids[s][4];
            let sql = format!("SELECT id, 100 / (id - {bad}) FROM {t}");
            let err = client
                .query(&sql, &[])
                .await
                .expect_err("extended scatter error");
            assert_eq!(
                code(&err).as_deref(),
                Some("22012"),
                "extended, bad row on shard {s}"
            );
            let err = client
                .simple_query(&sql)
                .await
                .expect_err("simple scatter error");
            assert_eq!(
                code(&err).as_deref(),
                Some("22012"),
                "simple, bad row on shard {s}"
            );
            // Usable: a keyed read and a scatter.
            let k = f.ids[1 - s][0];
            let v: i64 = client
                .query_one(&format!("SELECT v FROM {t} WHERE id = $1"), &[&k])
                .await
                .expect("usable after a scatter error")
                .get(0);
            assert_eq!(v, k * 3);
            let n = client
                .query(&format!("SELECT id FROM {t}"), &[])
                .await
                .expect("scatter after error")
                .len();
            assert_eq!(n, 200);
        }
        // Inside a transaction: the error aborts it, ROLLBACK ends it, the session goes on.
        client.batch_execute("BEGIN").await.expect("begin");
        let bad = f.ids[1][0];
        let err = client
            .simple_query(&format!("SELECT 100 / (id - {bad}) FROM {t}"))
            .await
            .expect_err("scatter error in tx");
        assert_eq!(code(&err).as_deref(), Some("22012"));
        let err = client
            .simple_query("SELECT 1")
            .await
            .expect_err("aborted transaction");
        assert_eq!(code(&err).as_deref(), Some("25P02"));
        client.batch_execute("ROLLBACK").await.expect("rollback");
        let n = client
            .query(&format!("SELECT id FROM {t}"), &[])
            .await
            .expect("after rollback")
            .len();
        assert_eq!(n, 200);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_portal_fetch_over_a_scatter() {
    // A cursor-style fetch (Bind to a named portal, then Execute with max_rows) over a statement
    // that runs on both shards: every row must come back, or the proxy must refuse.
    let f = sharded_fixture(4, false, 300).await;
    let t = &f.table;
    let mut client = f.proxy.connect().await;
    bounded(20, "scatter portal", async {
        let stmt = client
            .prepare(&format!("SELECT id FROM {t}"))
            .await
            .expect("prepare");
        let tx = client.transaction().await.expect("begin");
        let portal = match tx.bind(&stmt, &[]).await {
            Ok(p) => p,
            Err(e) => {
                // Refusing (0A000) would be acceptable; check and stop.
                assert_eq!(code(&e).as_deref(), Some("0A000"), "{e}");
                return;
            }
        };
        let mut ids = Vec::new();
        let mut fetches = 0;
        loop {
            match tx.query_portal(&portal, 50).await {
                Ok(rows) if rows.is_empty() => break,
                Ok(rows) => ids.extend(rows.iter().map(|r| r.get::<_, i64>(0))),
                Err(e) => {
                    assert_eq!(code(&e).as_deref(), Some("0A000"), "{e}");
                    return;
                }
            }
            fetches += 1;
            assert!(fetches < 100, "portal never ends");
        }
        drop(portal);
        tx.commit().await.expect("commit");
        ids.sort_unstable();
        assert_eq!(
            ids.len(),
            300,
            "a portal over both shards returned {} of 300 rows (shard sizes {} / {})",
            ids.len(),
            f.ids[0].len(),
            f.ids[1].len()
        );
        assert_eq!(ids, (1..=300).collect::<Vec<i64>>());
    })
    .await;
}

// === 8. abrupt disconnects ===

#[tokio::test(flavor = "multi_thread")]
async fn abrupt_disconnects_mid_result_and_mid_copy() {
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let table = unique("abrupt");
    let setup = proxy.connect().await;
    setup
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .expect("create");
    drop(setup);
    bounded(40, "abrupt disconnects", async {
        async fn check_next(proxy: &Proxy, table: &str, step: &str) {
            let next = proxy.connect().await;
            let msgs = bounded(
                8,
                step,
                next.simple_query(&format!(
                    "SELECT count(*), now() = statement_timestamp() FROM {table}"
                )),
            )
            .await
            .unwrap_or_else(|e| panic!("{step}: next client failed: {e}"));
            let row = simple_rows(&msgs)[0];
            assert_eq!(row.get(0), Some("0"), "{step}: rows leaked");
            assert_eq!(
                row.get(1),
                Some("t"),
                "{step}: next client inherited a transaction"
            );
            // And the extended protocol works on that connection too.
            let one: i32 = bounded(8, step, next.query_one("SELECT 1", &[]))
                .await
                .unwrap_or_else(|e| panic!("{step}: extended query failed: {e}"))
                .get(0);
            assert_eq!(one, 1);
        }

        // Mid large result, extended protocol.
        let (client, handle, _m) = connect_full(&proxy.conninfo()).await;
        let stream = client
            .query_raw(
                "SELECT g, repeat('z', 100) FROM generate_series(1, 3000000) g",
                std::iter::empty::<i32>(),
            )
            .await
            .expect("big query");
        let mut stream = Box::pin(stream);
        for _ in 0..10 {
            stream.next().await.expect("row").expect("row ok");
        }
        handle.abort();
        drop(stream);
        drop(client);
        check_next(&proxy, &table, "after abort mid extended result").await;

        // Mid large result, simple protocol, inside a transaction with a write.
        let (client, handle, _m) = connect_full(&proxy.conninfo()).await;
        client
            .batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)"))
            .await
            .expect("tx");
        let stream = client
            .simple_query_raw("SELECT g, repeat('z', 100) FROM generate_series(1, 3000000) g")
            .await
            .expect("simple big");
        let mut stream = Box::pin(stream);
        for _ in 0..10 {
            stream.next().await.expect("msg").expect("msg ok");
        }
        handle.abort();
        drop(stream);
        drop(client);
        check_next(
            &proxy,
            &table,
            "after abort mid simple result in a transaction",
        )
        .await;

        // Mid COPY FROM STDIN.
        let (client, handle, _m) = connect_full(&proxy.conninfo()).await;
        let sink = client
            .copy_in::<_, bytes::Bytes>(&format!("COPY {table} FROM STDIN"))
            .await
            .expect("copy in");
        let mut sink = Box::pin(sink);
        for i in 0..1000 {
            sink.send(bytes::Bytes::from(format!("{i}\n")))
                .await
                .expect("row");
        }
        sink.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(100)).await;
        handle.abort();
        drop(sink);
        drop(client);
        check_next(&proxy, &table, "after abort mid COPY FROM").await;

        // Mid COPY TO STDOUT.
        let (client, handle, _m) = connect_full(&proxy.conninfo()).await;
        let out = client
            .copy_out("COPY (SELECT g FROM generate_series(1, 3000000) g) TO STDOUT")
            .await
            .expect("copy out");
        let mut out = Box::pin(out);
        out.next().await.expect("chunk").expect("chunk ok");
        handle.abort();
        drop(out);
        drop(client);
        check_next(&proxy, &table, "after abort mid COPY TO").await;

        // Mid pipelined batch: several requests in flight, then gone.
        let (client, handle, _m) = connect_full(&proxy.conninfo()).await;
        let client = std::sync::Arc::new(client);
        let mut inflight = Vec::new();
        for i in 0..20 {
            let c = client.clone();
            inflight.push(tokio::spawn(async move {
                let _ = c.query_one("SELECT pg_sleep(0.01), $1::int", &[&i]).await;
            }));
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        handle.abort();
        for t in inflight {
            let _ = t.await;
        }
        drop(client);
        check_next(&proxy, &table, "after abort mid pipeline").await;
    })
    .await;
}

// === 9. churn ===

#[tokio::test(flavor = "multi_thread")]
async fn many_clients_churn_over_a_small_pool() {
    let proxy = Proxy::start(|c| c.pool.size = 2).await;
    let conninfo = proxy.conninfo();
    bounded(60, "churn", async {
        let mut workers = Vec::new();
        for w in 0..4i32 {
            let conninfo = conninfo.clone();
            workers.push(tokio::spawn(async move {
                let mut client = common::connect(&conninfo).await.expect("worker connect");
                let stmt = client.prepare("SELECT $1::int + 1").await.expect("prepare");
                for i in 0..60i32 {
                    if i % 5 == 0 {
                        let tx = client.transaction().await.expect("begin");
                        let v: i32 = tx
                            .query_one("SELECT $1::int * 2", &[&i])
                            .await
                            .expect("tx q")
                            .get(0);
                        assert_eq!(v, i * 2);
                        tx.commit().await.expect("commit");
                    } else {
                        let v: i32 = client
                            .query_one(&stmt, &[&(i + w)])
                            .await
                            .unwrap_or_else(|e| panic!("worker {w} query {i}: {e}"))
                            .get(0);
                        assert_eq!(v, i + w + 1);
                    }
                }
            }));
        }
        let mut churners = Vec::new();
        for n in 0..50 {
            let conninfo = conninfo.clone();
            churners.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis((n % 10) * 15)).await;
                let (client, handle, _m) = connect_full(&conninfo).await;
                match n % 5 {
                    0 => drop(client),
                    1 => {
                        let v: i32 = client
                            .query_one("SELECT 7", &[])
                            .await
                            .expect("churn q")
                            .get(0);
                        assert_eq!(v, 7);
                    }
                    2 => {
                        // Abrupt: mid-query.
                        let c = client;
                        let q = tokio::spawn(async move {
                            let _ = c.query("SELECT pg_sleep(0.05)", &[]).await;
                        });
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        handle.abort();
                        let _ = q.await;
                        return;
                    }
                    3 => {
                        // Abrupt: mid-transaction.
                        client
                            .batch_execute("BEGIN; SELECT 1")
                            .await
                            .expect("begin");
                        handle.abort();
                        return;
                    }
                    _ => {
                        let err = client
                            .query_one("SELECT 1/0", &[])
                            .await
                            .expect_err("error");
                        assert_eq!(code(&err).as_deref(), Some("22012"));
                    }
                }
                handle.abort();
            }));
        }
        for (n, c) in churners.into_iter().enumerate() {
            c.await
                .unwrap_or_else(|e| panic!("churner {n} failed: {e}"));
        }
        for (w, t) in workers.into_iter().enumerate() {
            t.await.unwrap_or_else(|e| panic!("worker {w} failed: {e}"));
        }
        // The pool recovered: two clients can each hold a connection in a transaction.
        let mut a = common::connect(&conninfo).await.expect("a");
        let mut b = common::connect(&conninfo).await.expect("b");
        let ta = a.transaction().await.expect("ta");
        let tb = b.transaction().await.expect("tb");
        let pa: i32 = ta
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pa")
            .get(0);
        let pb: i32 = tb
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pb")
            .get(0);
        assert_ne!(pa, pb);
        ta.commit().await.expect("commit a");
        tb.commit().await.expect("commit b");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_portal_on_the_second_shard_of_a_transaction() {
    // The transaction first reads shard 0, then opens a portal keyed to shard 1 and fetches it
    // with a row limit: the Execute (which has no Bind in its batch) must go where the portal is.
    let f = sharded_fixture(4, false, 100).await;
    let t = &f.table;
    let (k0, k1) = (f.ids[0][0], f.ids[1][0]);
    let mut client = f.proxy.connect().await;
    bounded(20, "portal on shard 1", async {
        let stmt = client
            .prepare(&format!(
                "SELECT g FROM {t}, generate_series(1, 5) g WHERE id = $1"
            ))
            .await
            .expect("prepare");
        let tx = client.transaction().await.expect("begin");
        let v0: i64 = tx
            .query_one(&format!("SELECT v FROM {t} WHERE id = $1"), &[&k0])
            .await
            .expect("read shard 0")
            .get(0);
        assert_eq!(v0, k0 * 3);
        let portal = tx.bind(&stmt, &[&k1]).await.expect("bind on shard 1");
        let mut got = Vec::new();
        for _ in 0..5 {
            let rows = tx.query_portal(&portal, 2).await.unwrap_or_else(|e| {
                panic!(
                    "fetch from a portal bound on shard 1: {:?} {:?}",
                    code(&e),
                    e.as_db_error().map(|d| d.message())
                )
            });
            if rows.is_empty() {
                break;
            }
            got.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
        }
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        drop(portal);
        tx.commit().await.expect("commit");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_abrupt_disconnect_mid_scatter() {
    let f = sharded_fixture(1, false, 2000).await;
    let t = &f.table;
    bounded(30, "abrupt disconnect mid scatter", async {
        let (client, handle, _m) = connect_full(&f.proxy.conninfo()).await;
        let stream = client
            .query_raw(
                &format!("SELECT id, g, repeat('q', 100) FROM {t}, generate_series(1, 500) g"),
                std::iter::empty::<i32>(),
            )
            .await
            .expect("scatter");
        let mut stream = Box::pin(stream);
        for _ in 0..10 {
            stream.next().await.expect("row").expect("row ok");
        }
        handle.abort();
        drop(stream);
        drop(client);
        // Pool size 1 per server: the next client gets the same servers.
        let next = f.proxy.connect().await;
        for s in 0..2 {
            let k = f.ids[s][0];
            let v: i64 = bounded(
                8,
                "keyed read after abort",
                next.query_one(&format!("SELECT v FROM {t} WHERE id = $1"), &[&k]),
            )
            .await
            .unwrap_or_else(|e| panic!("shard {s} after an abort mid-scatter: {e}"))
            .get(0);
            assert_eq!(v, k * 3);
        }
        let n = bounded(
            8,
            "scatter after abort",
            next.query(&format!("SELECT id FROM {t}"), &[]),
        )
        .await
        .expect("scatter after abort")
        .len();
        assert_eq!(n, 2000);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sharded_multi_statement_transaction_in_one_query() {
    // psql -c "BEGIN; UPDATE ...; COMMIT" and ORMs' batched scripts: one Query message.
    let f = sharded_fixture(4, false, 100).await;
    let t = &f.table;
    let k1 = f.ids[1][0];
    let client = f.proxy.connect().await;
    bounded(20, "multi-statement transaction", async {
        let r = client
            .batch_execute(&format!(
                "BEGIN; UPDATE {t} SET v = 555 WHERE id = {k1}; COMMIT"
            ))
            .await;
        match r {
            Ok(()) => {
                assert_eq!(
                    direct_v(1, t, k1).await,
                    Some(555),
                    "not committed on shard 1"
                );
            }
            // Refusing is acceptable; answering wrongly is not.
            Err(e) => assert_eq!(code(&e).as_deref(), Some("0A000"), "{e}"),
        }
        // Not left inside a transaction either way.
        let msgs = client
            .simple_query("SELECT now() = statement_timestamp()")
            .await
            .expect("after");
        assert_eq!(
            simple_rows(&msgs)[0].get(0),
            Some("t"),
            "left in a transaction"
        );
    })
    .await;
}

// === raw protocol: what tokio-postgres cannot send (row limits on the unnamed portal, several
// Binds in one Sync batch, Flush) ===

#[tokio::test(flavor = "multi_thread")]
async fn raw_unnamed_portal_row_limit_single_shard_and_flush() {
    let proxy = Proxy::start(|c| c.pool.size = 2).await;
    bounded(20, "raw single shard", async {
        let mut c = raw::Raw::login(proxy.port).await;
        // Execute with max_rows on the unnamed portal (JDBC setMaxRows), then Sync.
        let mut batch = raw::parse("", "SELECT g FROM generate_series(1, 10) g");
        batch.extend(raw::bind("", "", &[]));
        batch.extend(raw::execute("", 3));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let reply = c.until_ready().await;
        assert_eq!(
            raw::tags(&reply),
            "12DDDsZ",
            "Execute(max_rows=3): {reply:?}"
        );
        // Flush: the replies so far must arrive without a Sync.
        let mut batch = raw::parse("", "SELECT 41 + 1");
        batch.extend(raw::bind("", "", &[]));
        batch.extend(raw::describe(b'P', ""));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::flush());
        c.send(&batch).await;
        let mut got = Vec::new();
        for _ in 0..5 {
            let m = tokio::time::timeout(std::time::Duration::from_secs(3), c.read())
                .await
                .expect("replies to a Flush arrive before any Sync");
            got.push(m);
        }
        assert_eq!(raw::tags(&got), "12TDC");
        assert_eq!(got[3].col0().as_deref(), Some("42"));
        c.send(&raw::sync()).await;
        let reply = c.until_ready().await;
        assert_eq!(raw::tags(&reply), "Z");
        c.send(&raw::query("SELECT 7")).await;
        let reply = c.until_ready().await;
        assert_eq!(raw::tags(&reply), "TDCZ");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_sharded_unnamed_portal_row_limit_on_a_scatter() {
    let f = sharded_fixture(4, false, 100).await;
    let t = &f.table;
    bounded(20, "raw scatter with max_rows", async {
        let mut c = raw::Raw::login(f.proxy.port).await;
        // Parse in a batch of its own first, so the Bind is planned with this statement.
        let mut batch = raw::parse("", &format!("SELECT id FROM {t}"));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let reply = c.until_ready().await;
        assert_eq!(raw::tags(&reply), "1Z");
        let mut batch = raw::bind("", "", &[]);
        batch.extend(raw::execute("", 3));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let reply = c.until_ready().await;
        let tags = raw::tags(&reply);
        // Postgres: BindComplete, 3 rows, PortalSuspended, ReadyForQuery. A proxy
        // that cannot do it exactly must refuse (0A000), not send more rows or rows after the
        // PortalSuspended.
        let refused = reply.iter().any(|m| m.code().as_deref() == Some("0A000"));
        assert!(
            tags == "2DDDsZ" || refused,
            "Execute(max_rows=3) over two shards answered {tags:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_sharded_one_sync_batch_with_binds_on_both_shards() {
    let f = sharded_fixture(4, false, 100).await;
    let t = &f.table;
    let (k0, k1) = (f.ids[0][0].to_string(), f.ids[1][0].to_string());
    bounded(20, "raw multi-shard batch", async {
        let mut c = raw::Raw::login(f.proxy.port).await;
        let want = vec![(f.ids[0][0] * 3).to_string(), (f.ids[1][0] * 3).to_string()];
        // Two shards in one batch, both fine; the statement prepared in an earlier batch.
        let mut batch = raw::parse("s1", &format!("SELECT v FROM {t} WHERE id = $1"));
        batch.extend(raw::sync());
        c.send(&batch).await;
        assert_eq!(raw::tags(&c.until_ready().await), "1Z");
        let mut batch = raw::bind("", "s1", &[&k0]);
        batch.extend(raw::execute("", 0));
        batch.extend(raw::bind("", "s1", &[&k1]));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let reply = c.until_ready().await;
        assert_eq!(raw::tags(&reply), "2DC2DCZ", "{reply:?}");
        let vals: Vec<String> = reply.iter().filter_map(raw::Msg::col0).collect();
        assert_eq!(vals, want);
        // The first part fails: Postgres skips everything up to the Sync.
        let mut batch = raw::parse("s2", &format!("SELECT 1 / (v - v) FROM {t} WHERE id = $1"));
        batch.extend(raw::bind("", "s2", &[&k0]));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::bind("", "s1", &[&k1]));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let reply = c.until_ready().await;
        assert_eq!(raw::tags(&reply), "12EZ", "{reply:?}");
        assert_eq!(reply[2].code().as_deref(), Some("22012"));
        // Still usable, both shards.
        let mut batch = raw::bind("", "s1", &[&k1]);
        batch.extend(raw::execute("", 0));
        batch.extend(raw::bind("", "s1", &[&k0]));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let reply = c.until_ready().await;
        assert_eq!(raw::tags(&reply), "2DC2DCZ", "{reply:?}");
        // The same with the Parse in the same batch as its Binds (JDBC, pgx, npgsql do this).
        let mut batch = raw::parse("s3", &format!("SELECT v FROM {t} WHERE id = $1"));
        batch.extend(raw::bind("", "s3", &[&k0]));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::bind("", "s3", &[&k1]));
        batch.extend(raw::execute("", 0));
        batch.extend(raw::sync());
        c.send(&batch).await;
        let reply = c.until_ready().await;
        let vals: Vec<String> = reply.iter().filter_map(raw::Msg::col0).collect();
        assert_eq!(
            (raw::tags(&reply), vals),
            ("12DC2DCZ".to_string(), want.clone()),
            "Parse + Binds for two shards in one batch"
        );
    })
    .await;
}
