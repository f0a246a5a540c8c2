//! The pooled relay against a real cluster: psql, tokio-postgres, prepared statements across
//! pooled connections, settings replay, COPY, cancel, errors.

mod common;

use std::time::{Duration, Instant};

use common::{Proxy, raw, text, unique};
use tessera::config::PoolMode;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_queries_scripts_and_meta_commands() {
    let proxy = Proxy::start(|_| {}).await;
    let url = proxy.url();
    let table = unique("psql_t");

    let out = blocking({
        let url = url.clone();
        move || common::psql(&url, &["-A", "-t", "-c", "SELECT 40 + 2"], None)
    })
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "42");

    // A script with a syntax error in the middle: the error is 42601 and the next statement on
    // the same connection still runs.
    let script = format!(
        "\\set VERBOSITY verbose\nCREATE TABLE {table} (id int);\nSELEC oops;\nINSERT INTO {table} VALUES (7);\nSELECT 'after:' || sum(id) FROM {table};\n\\d {table}\n"
    );
    let out = blocking({
        let url = url.clone();
        move || common::psql(&url, &["-A", "-t"], Some(&script))
    })
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        stderr.contains("42601"),
        "syntax error code missing: {stderr}"
    );
    assert!(
        stdout.contains("after:7"),
        "statement after the error did not run: {stdout}"
    );
    assert!(
        stdout.contains("id|integer"),
        "\\d output missing: {stdout}"
    );

    // COPY out and back in.
    let copy = format!(
        "CREATE TABLE {table}_c (id int, name text);\n\\copy {table}_c FROM STDIN\n1\tone\n2\ttwo\n3\t\\N\n\\.\nCOPY (SELECT id, name FROM {table}_c ORDER BY id) TO STDOUT WITH CSV;\nCOPY {table}_c FROM STDIN WITH CSV;\n4,four\n\\.\nSELECT count(*) FROM {table}_c;\n"
    );
    let out = blocking({
        let url = url.clone();
        move || common::psql(&url, &["-A", "-t", "-v", "ON_ERROR_STOP=1"], Some(&copy))
    })
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("1,one\n2,two\n3,\n"), "{stdout}");
    assert!(stdout.trim_end().ends_with('4'), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn prepared_statements_survive_transaction_pooling() {
    // Many clients over a tiny pool: every statement lands on connections that never saw it.
    let proxy = Proxy::start(|c| c.pool.size = 4).await;
    let table = unique("accounts");
    let setup = proxy.connect().await;
    setup
        .batch_execute(&format!(
            "CREATE TABLE {table} (id int PRIMARY KEY, balance bigint NOT NULL);
             INSERT INTO {table} SELECT i, 0 FROM generate_series(1, 20) i;"
        ))
        .await
        .expect("setup");

    let mut tasks = Vec::new();
    for client_no in 1..=20i32 {
        let conninfo = proxy.conninfo();
        let table = table.clone();
        tasks.push(tokio::spawn(async move {
            let client = common::connect(&conninfo).await.expect("connect");
            let read = client
                .prepare(&format!("SELECT balance FROM {table} WHERE id = $1"))
                .await
                .expect("prepare read");
            let write = client
                .prepare(&format!(
                    "UPDATE {table} SET balance = balance + $2 WHERE id = $1"
                ))
                .await
                .expect("prepare write");
            let mut expected = 0i64;
            for i in 0..50i64 {
                if i % 2 == 0 {
                    client.execute("BEGIN", &[]).await.expect("begin");
                    let n = client
                        .execute(&write, &[&client_no, &i])
                        .await
                        .expect("update");
                    assert_eq!(n, 1);
                    client.execute("COMMIT", &[]).await.expect("commit");
                    expected += i;
                } else {
                    let row = client.query_one(&read, &[&client_no]).await.expect("read");
                    assert_eq!(
                        row.get::<_, i64>(0),
                        expected,
                        "client {client_no} read a wrong balance"
                    );
                }
            }
            expected
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let expected = task.await.expect("client task");
        let row = setup
            .query_one(
                &format!("SELECT balance FROM {table} WHERE id = $1"),
                &[&(i as i32 + 1)],
            )
            .await
            .expect("final read");
        assert_eq!(row.get::<_, i64>(0), expected);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prepared_statement_errors_match_postgres() {
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let client = proxy.connect().await;
    // A statement that fails to prepare is not remembered: preparing a good one works after.
    let err = client
        .prepare("SELECT * FROM no_such_table_x")
        .await
        .expect_err("bad prepare");
    assert_eq!(err.code().map(|c| c.code()), Some("42P01"));
    let stmt = client.prepare("SELECT $1::int + 1").await.expect("prepare");
    let row = client.query_one(&stmt, &[&41i32]).await.expect("query");
    assert_eq!(row.get::<_, i32>(0), 42);
    // Dropping a statement closes it for this client only.
    drop(stmt);
    let again = client
        .prepare("SELECT $1::int + 1")
        .await
        .expect("prepare again");
    assert_eq!(
        client
            .query_one(&again, &[&1i32])
            .await
            .expect("q")
            .get::<_, i32>(0),
        2
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_follow_the_client_not_the_connection() {
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let a = proxy.connect().await;
    let b = proxy.connect().await;
    a.batch_execute("SET statement_timeout = '4321ms'; SET application_name = 'client_a'")
        .await
        .expect("set");
    for _ in 0..3 {
        let row = a
            .query_one("SHOW statement_timeout", &[])
            .await
            .expect("show a");
        assert_eq!(row.get::<_, String>(0), "4321ms");
        let row = b
            .query_one("SHOW statement_timeout", &[])
            .await
            .expect("show b");
        assert_eq!(row.get::<_, String>(0), "0", "a's setting leaked to b");
    }
    // A SET rolled back with its transaction is not replayed.
    a.batch_execute("BEGIN; SET statement_timeout = '1s'; ROLLBACK")
        .await
        .expect("rollback");
    b.query_one("SELECT 1", &[])
        .await
        .expect("b uses the connection");
    let row = a
        .query_one("SHOW statement_timeout", &[])
        .await
        .expect("show a");
    assert_eq!(row.get::<_, String>(0), "4321ms");
    // RESET goes back to the server default.
    a.batch_execute("RESET statement_timeout")
        .await
        .expect("reset");
    b.query_one("SELECT 1", &[])
        .await
        .expect("b uses the connection");
    let row = a
        .query_one("SHOW statement_timeout", &[])
        .await
        .expect("show a");
    assert_eq!(row.get::<_, String>(0), "0");
    let row = a
        .query_one("SHOW application_name", &[])
        .await
        .expect("show");
    assert_eq!(row.get::<_, String>(0), "client_a");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_and_notices_keep_the_connection_usable() {
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let client = proxy.connect().await;
    let err = client
        .batch_execute("SELECT 1/0")
        .await
        .expect_err("division by zero");
    assert_eq!(err.code().map(|c| c.code()), Some("22012"));
    client.batch_execute("BEGIN").await.expect("begin");
    let err = client
        .query_one("SELECT nope", &[])
        .await
        .expect_err("bad column");
    assert_eq!(err.code().map(|c| c.code()), Some("42703"));
    let err = client
        .query_one("SELECT 1", &[])
        .await
        .expect_err("aborted transaction");
    assert_eq!(err.code().map(|c| c.code()), Some("25P02"));
    client.batch_execute("ROLLBACK").await.expect("rollback");
    let row = client
        .query_one("SELECT 5", &[])
        .await
        .expect("usable again");
    assert_eq!(row.get::<_, i32>(0), 5);
    client
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$")
        .await
        .expect("notice");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_reaches_the_running_query() {
    let proxy = Proxy::start(|c| c.pool.size = 2).await;
    let client = proxy.connect().await;
    let token = client.cancel_token();
    let started = Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token
            .cancel_query(tokio_postgres::NoTls)
            .await
            .expect("cancel sent");
    });
    let err = client
        .query_one("SELECT pg_sleep(10)", &[])
        .await
        .expect_err("cancelled");
    canceller.await.expect("canceller");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"));
    assert!(
        started.elapsed() < Duration::from_millis(1300),
        "took {:?}",
        started.elapsed()
    );
    let row = client
        .query_one("SELECT 1", &[])
        .await
        .expect("usable after cancel");
    assert_eq!(row.get::<_, i32>(0), 1);
}

/// A client that vanishes mid-transaction never leaves its transaction on a pooled connection:
/// neither one idle in its transaction nor one gone while its statement runs. The latter is
/// noticed at once (the statement would take seconds): the next client gets a fresh connection
/// without waiting for the statement to end.
#[tokio::test(flavor = "multi_thread")]
async fn vanished_client_never_leaves_a_dirty_connection() {
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let table = unique("vanish");
    let setup = proxy.connect().await;
    setup
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .expect("create");
    drop(setup);
    // Through the single pooled connection: had the open transaction been handed on, this
    // connection would see its own row.
    let assert_clean = async |what: &str| {
        let next = proxy.connect().await;
        let row = next
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("the single pooled connection is usable");
        assert_eq!(row.get::<_, i64>(0), 0, "{what}: the transaction leaked");
    };

    {
        let client = proxy.connect().await;
        client
            .batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)"))
            .await
            .expect("open transaction");
        // Dropped mid-transaction.
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_clean("idle in transaction").await;

    let mut c = raw::Raw::login(proxy.port).await;
    c.send(&raw::query("BEGIN")).await;
    assert_eq!(raw::tags(&c.until_ready().await), "CZ");
    c.send(&raw::query(&format!("INSERT INTO {table} VALUES (1)")))
        .await;
    assert_eq!(raw::tags(&c.until_ready().await), "CZ");
    c.send(&raw::query("SELECT pg_sleep(5)")).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(c);
    let started = Instant::now();
    assert_clean("mid-statement").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the next client waited {:?}: the vanished client's connection was held to the statement's end",
        started.elapsed()
    );
}

/// Requests sent while a reply is pending, each in a write of its own (as a driver that
/// pipelines sends them): every one is answered, in order, the first time and after.
#[tokio::test(flavor = "multi_thread")]
async fn requests_sent_while_a_reply_is_pending_are_answered_in_order() {
    let proxy = Proxy::start(|_| {}).await;
    let mut c = raw::Raw::login(proxy.port).await;
    for round in 0..3 {
        c.send(&raw::query(&format!("SELECT {round}, pg_sleep(0.2)")))
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.send(&raw::query(&format!("SELECT {round} + 100"))).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let n = round.to_string();
        c.send(
            &[
                raw::parse("", "SELECT $1::int * 2"),
                raw::bind("", "", &[&n]),
                raw::execute("", 0),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
        let mut values = Vec::new();
        for _ in 0..3 {
            let msgs = c.until_ready().await;
            values.push(msgs.iter().find_map(raw::Msg::col0).unwrap_or_default());
        }
        assert_eq!(
            values,
            [
                round.to_string(),
                (round + 100).to_string(),
                (round * 2).to_string()
            ],
            "round {round}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_idle_server_connection_is_replaced() {
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let client = proxy.connect().await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let admin = common::connect_superuser(0).await;
    let killed: bool = admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate")
        .get(0);
    assert!(killed);
    // Until the backend has exited (its FATAL message and EOF are on the socket), however
    // busy the machine.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let alive: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .expect("activity")
            .get(0);
        if alive == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "backend {pid} still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let row = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("query after kill");
    assert_ne!(row.get::<_, i32>(0), pid);
}

#[tokio::test(flavor = "multi_thread")]
async fn session_pooling_keeps_one_server_connection() {
    let proxy = Proxy::start(|c| {
        c.pool.mode = PoolMode::Session;
        c.pool.size = 2;
    })
    .await;
    let client = proxy.connect().await;
    client
        .batch_execute("CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1)")
        .await
        .expect("temp");
    let first: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    for _ in 0..3 {
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        assert_eq!(pid, first);
    }
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect("temp table")
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn server_parameters_are_relayed() {
    let proxy = Proxy::start(|_| {}).await;
    let out = blocking({
        let url = proxy.url();
        move || common::psql(&url, &["-A", "-t", "-c", "SHOW server_version_num"], None)
    })
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).trim().starts_with("15"),
        "{}",
        text(&out.stdout)
    );
    // psql prints the server version it got in ParameterStatus in its banner.
    let out = blocking({
        let url = proxy.url();
        move || common::psql(&url, &[], Some("\\echo :SERVER_VERSION_NAME\n"))
    })
    .await;
    assert!(
        text(&out.stdout).trim().starts_with("15"),
        "{}",
        text(&out.stdout)
    );
}

/// Settings through the extended protocol, whose replies the relay reads in place: the same
/// unnamed SET sent twice is tracked both times, a SET whose transaction ends in ROLLBACK is not
/// replayed, one that commits is, and another client on the one pooled connection sees neither.
#[tokio::test(flavor = "multi_thread")]
async fn extended_protocol_settings_follow_commit_and_rollback() {
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let mut a = raw::Raw::login(proxy.port).await;
    let b = proxy.connect().await;
    let run = |sql: &str| {
        [
            raw::parse("", sql),
            raw::bind("", "", &[]),
            raw::describe(b'P', ""),
            raw::execute("", 0),
            raw::sync(),
        ]
        .concat()
    };
    async fn show(a: &mut raw::Raw, batch: &[u8]) -> String {
        a.send(batch).await;
        let msgs = a.until_ready().await;
        msgs.iter()
            .find_map(raw::Msg::col0)
            .unwrap_or_else(|| panic!("no row: {}", raw::explain(&msgs)))
    }
    let show_timeout = run("SHOW statement_timeout");
    for _ in 0..2 {
        a.send(&run("SET statement_timeout = '4321ms'")).await;
        let msgs = a.until_ready().await;
        assert_eq!(raw::tags(&msgs), "12nCZ", "{}", raw::explain(&msgs));
        b.query_one("SELECT 1", &[])
            .await
            .expect("b uses the connection");
        assert_eq!(show(&mut a, &show_timeout).await, "4321ms");
    }
    // A transaction setting the timeout, each statement its own pipeline; then b uses the
    // connection, and a's setting is read back.
    let mut in_transaction = async |set: &str, end: &str| {
        for sql in ["BEGIN", set, end] {
            a.send(&run(sql)).await;
            let msgs = a.until_ready().await;
            assert!(
                msgs.iter().all(|m| m.tag != b'E'),
                "{sql}: {}",
                raw::explain(&msgs)
            );
        }
        b.query_one("SELECT 1", &[])
            .await
            .expect("b uses the connection");
        show(&mut a, &show_timeout).await
    };
    // Rolled back: not replayed.
    let after_rollback = in_transaction("SET statement_timeout = '1s'", "ROLLBACK").await;
    assert_eq!(after_rollback, "4321ms");
    // Committed: replayed.
    let after_commit = in_transaction("SET statement_timeout = '2s'", "COMMIT").await;
    assert_eq!(after_commit, "2s");
    let row = b
        .query_one("SHOW statement_timeout", &[])
        .await
        .expect("show b");
    assert_eq!(row.get::<_, String>(0), "0", "a's setting leaked to b");
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_through_the_extended_protocol() {
    use futures::{SinkExt, TryStreamExt};
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let client = proxy.connect().await;
    let table = unique("copy_ext");
    client
        .batch_execute(&format!("CREATE TABLE {table} (id int, name text)"))
        .await
        .expect("create");
    let sink = client
        .copy_in::<_, bytes::Bytes>(&format!("COPY {table} FROM STDIN"))
        .await
        .expect("copy in");
    let mut sink = Box::pin(sink);
    for i in 0..1000 {
        sink.send(bytes::Bytes::from(format!("{i}\tname {i}\n")))
            .await
            .expect("send row");
    }
    let n = sink.as_mut().finish().await.expect("finish");
    assert_eq!(n, 1000);
    let stream = client
        .copy_out(&format!(
            "COPY (SELECT id FROM {table} ORDER BY id) TO STDOUT"
        ))
        .await
        .expect("copy out");
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.expect("collect");
    let text: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8_lossy(&text).lines().count(), 1000);
    // The connection is usable and back in the pool afterwards.
    let other = proxy.connect().await;
    let n: i64 = other
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 1000);
}

/// COPY data sent right behind the statement, before the server's CopyInResponse, in one write:
/// loaded as on Postgres; behind a COPY that fails, ignored as on Postgres.
#[tokio::test(flavor = "multi_thread")]
async fn copy_data_sent_right_behind_its_statement() {
    let proxy = Proxy::start(|_| {}).await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    for (port, what) in [(primary, "Postgres"), (proxy.port, "proxy")] {
        let table = unique("copy_eager");
        let mut c = raw::Raw::login(port).await;
        let mut step = async |msg: Vec<u8>| {
            c.send(&msg).await;
            let msgs = tokio::time::timeout(Duration::from_secs(10), c.until_ready())
                .await
                .unwrap_or_else(|_| panic!("{what}: no ReadyForQuery"));
            let code = msgs.iter().find_map(raw::Msg::code).unwrap_or_default();
            (
                format!("{} {code}", raw::tags(&msgs)),
                msgs.iter().find_map(raw::Msg::col0),
            )
        };
        let eager = |target: &str| {
            [
                raw::query(&format!("COPY {target} FROM STDIN")),
                raw::copy_data(b"1\n"),
                raw::copy_data(b"2\n"),
                raw::copy_done(),
            ]
            .concat()
        };
        let replies = [
            step(raw::query(&format!("CREATE TABLE {table} (id int)"))).await,
            step(eager(&table)).await,
            step(eager(&format!("{table}_missing"))).await,
            step(raw::query(&format!("SELECT count(*) FROM {table}"))).await,
        ];
        assert_eq!(
            replies,
            [
                ("CZ ".to_string(), None),
                ("GCZ ".to_string(), None),
                ("EZ 42P01".to_string(), None),
                ("TDCZ ".to_string(), Some("2".to_string())),
            ],
            "{what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_and_unnamed_statements() {
    let proxy = Proxy::start(|c| c.pool.size = 2).await;
    let client = proxy.connect().await;
    // tokio-postgres pipelines concurrent queries on one connection.
    let stmt = client.prepare("SELECT $1::int * 2").await.expect("prepare");
    let futures = (0..50i32).map(|i| {
        let client = &client;
        let stmt = &stmt;
        async move {
            client
                .query_one(stmt, &[&i])
                .await
                .map(|r| r.get::<_, i32>(0))
        }
    });
    let results = futures::future::join_all(futures).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.expect("pipelined query"), i as i32 * 2);
    }
    // query_typed uses the unnamed statement: Parse, Bind, Execute in one batch.
    for i in 0..5i32 {
        let rows = client
            .query_typed(
                "SELECT $1::int + 1",
                &[(&i, tokio_postgres::types::Type::INT4)],
            )
            .await
            .expect("query_typed");
        assert_eq!(rows[0].get::<_, i32>(0), i + 1);
    }
    // A multi-statement simple query whose last statement fails: the earlier ones are rolled
    // back with the implicit transaction, and the session goes on.
    let err = client
        .batch_execute("SELECT 1; SELECT 1/0")
        .await
        .expect_err("fails");
    assert_eq!(err.code().map(|c| c.code()), Some("22012"));
    assert_eq!(
        client
            .query_one("SELECT 9", &[])
            .await
            .expect("ok")
            .get::<_, i32>(0),
        9
    );
}

/// A pipeline reaches the proxy whole, split across reads, back to back with the next one, or
/// ended by Flush: the replies are the same, and an error skips only to its own Sync.
#[tokio::test(flavor = "multi_thread")]
async fn pipelines_arriving_whole_split_or_back_to_back() {
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let mut a = raw::Raw::login(proxy.port).await;
    let times = |n: &str, describe: bool| {
        let mut run = vec![
            raw::parse("", "SELECT $1::int * 3"),
            raw::bind("", "", &[n]),
        ];
        if describe {
            run.push(raw::describe(b'P', ""));
        }
        run.extend([raw::execute("", 0), raw::sync()]);
        run.concat()
    };
    let value = |msgs: &[raw::Msg]| msgs.iter().find_map(raw::Msg::col0);
    let assert_value = |msgs: &[raw::Msg], want: &str| {
        assert_eq!(value(msgs).as_deref(), Some(want), "{}", raw::explain(msgs));
    };

    // Whole in one write.
    a.send(&times("7", true)).await;
    let msgs = a.until_ready().await;
    assert_eq!(raw::tags(&msgs), "12TDCZ", "{}", raw::explain(&msgs));
    assert_eq!(value(&msgs).as_deref(), Some("21"));

    // Split inside each message, and between messages.
    let whole = times("8", true);
    let parse = raw::parse("", "SELECT $1::int * 3").len();
    let bind = raw::bind("", "", &["8"]).len();
    let describe = raw::describe(b'P', "").len();
    for cut in [
        9,
        parse,
        parse + 3,
        parse + bind,
        parse + bind + describe + 4,
        whole.len() - 5,
        whole.len() - 2,
    ] {
        a.send(&whole[..cut]).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        a.send(&whole[cut..]).await;
        let msgs = a.until_ready().await;
        assert_eq!(
            raw::tags(&msgs),
            "12TDCZ",
            "cut at {cut}: {}",
            raw::explain(&msgs)
        );
        assert_eq!(value(&msgs).as_deref(), Some("24"));
    }

    // Back to back in one write, the first failing: its error skips to its own Sync only.
    let failing = [
        raw::parse("", "SELECT 1 / $1::int"),
        raw::bind("", "", &["0"]),
        raw::execute("", 0),
        raw::sync(),
    ]
    .concat();
    a.send(&[failing, times("10", false), times("11", false)].concat())
        .await;
    let first = a.until_ready().await;
    // (Postgres folds the constant division when it plans at Bind, so Bind fails.)
    assert_eq!(raw::tags(&first), "1EZ", "{}", raw::explain(&first));
    assert_eq!(first[1].code().as_deref(), Some("22012"));
    let second = a.until_ready().await;
    assert_eq!(raw::tags(&second), "12DCZ", "{}", raw::explain(&second));
    assert_eq!(value(&second).as_deref(), Some("30"));
    let third = a.until_ready().await;
    assert_value(&third, "33");

    // A statement the proxy answers itself, then one for the server, in one write.
    let next_id = raw::extended("SELECT tessera_next_id()");
    a.send(&[next_id, times("12", false)].concat()).await;
    let local = a.until_ready().await;
    assert_eq!(raw::tags(&local), "12DCZ", "{}", raw::explain(&local));
    let id: i64 = value(&local).expect("an id").parse().expect("a number");
    assert!(id > 0);
    let server = a.until_ready().await;
    assert_value(&server, "36");

    // Ended by Flush: the replies come without ReadyForQuery, which the Sync then brings.
    let flushed = [
        raw::parse("", "SELECT $1::int * 3"),
        raw::bind("", "", &["13"]),
        raw::execute("", 0),
        raw::flush(),
    ]
    .concat();
    a.send(&flushed).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let m = tokio::time::timeout(Duration::from_secs(10), a.read())
            .await
            .unwrap_or_else(|_| panic!("no reply to Flush after {}", raw::explain(&got)));
        got.push(m);
    }
    assert_eq!(raw::tags(&got), "12DC", "{}", raw::explain(&got));
    assert_eq!(value(&got).as_deref(), Some("39"));
    a.send(&raw::sync()).await;
    let end = a.until_ready().await;
    assert_eq!(raw::tags(&end), "Z");

    // An error the proxy raises itself (no such statement) skips the rest up to Sync, and the
    // pipeline behind it in the same write runs.
    let unknown = [
        raw::bind("", "no_such_statement", &[]),
        raw::execute("", 0),
        raw::sync(),
    ]
    .concat();
    a.send(&[unknown.clone(), times("14", false)].concat())
        .await;
    let failed = a.until_ready().await;
    assert_eq!(raw::tags(&failed), "EZ", "{}", raw::explain(&failed));
    assert_eq!(failed[0].code().as_deref(), Some("26000"));
    let after = a.until_ready().await;
    assert_value(&after, "42");

    // The same error in a pipeline ended by Flush: what follows is skipped up to the next
    // Sync, even when it comes in a later write, as Postgres does.
    let unknown_flushed = [
        raw::bind("", "no_such_statement", &[]),
        raw::execute("", 0),
        raw::flush(),
    ]
    .concat();
    a.send(&unknown_flushed).await;
    let error = tokio::time::timeout(Duration::from_secs(10), a.read())
        .await
        .expect("the error is flushed");
    assert_eq!(error.code().as_deref(), Some("26000"));
    tokio::time::sleep(Duration::from_millis(30)).await;
    a.send(&times("15", false)).await;
    let skipped = a.until_ready().await;
    assert_eq!(raw::tags(&skipped), "Z", "{}", raw::explain(&skipped));
    a.send(&times("16", false)).await;
    let after = a.until_ready().await;
    assert_value(&after, "48");
}

/// A portal outlives the statement it was bound from until its transaction ends: the same
/// exchange against Postgres directly (for a plain SELECT) and through the proxy, on one shard
/// and on two (for `tessera_next_id()`, which the proxy answers itself), gets the same replies.
#[tokio::test(flavor = "multi_thread")]
async fn portals_of_proxy_answered_statements_live_as_long_as_their_transaction() {
    let one = Proxy::start(|_| {}).await;
    let sharded = Proxy::start_sharded(|_| {}).await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    async fn exchange(port: u16, sql: &str) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        // Statement `s` for portal `p`, `sq` for `q` and so on.
        let bind = |portal: &str| {
            let stmt = if portal == "p" {
                "s".to_string()
            } else {
                format!("s{portal}")
            };
            [
                raw::parse(&stmt, sql),
                raw::bind(portal, &stmt, &[]),
                raw::sync(),
            ]
        };
        let run = |portal: &str| [raw::execute(portal, 0), raw::sync()].concat();
        // Each step is one write and the number of replies (up to ReadyForQuery) it gets; 0 for
        // one reply whose error code is not compared.
        let steps = [
            (raw::query("BEGIN"), 1),
            (bind("p").concat(), 1),
            ([raw::describe(b'S', "s"), raw::sync()].concat(), 1),
            (raw::query("SELECT 1"), 1),
            // Closing the statement leaves the portal.
            ([raw::close(b'S', "s"), raw::sync()].concat(), 1),
            (run("p"), 1),
            (raw::query("COMMIT"), 1),
            // The transaction took the portal with it.
            (run("p"), 1),
            // Outside a transaction a portal ends at its Sync.
            (bind("q").concat(), 1),
            (run("q"), 1),
            // A COMMIT pipelined with an Execute of the portal: the Execute comes after it.
            (raw::query("BEGIN"), 1),
            (bind("r").concat(), 1),
            ([raw::query("COMMIT"), run("r")].concat(), 2),
            // A ROLLBACK through the extended protocol ends portals too, also of a transaction
            // an error aborted.
            (raw::query("BEGIN"), 1),
            (bind("t").concat(), 1),
            (raw::query("SELEC 1"), 1),
            (raw::extended("ROLLBACK"), 1),
            (run("t"), 1),
            (raw::query("SELECT 2"), 1),
            // ROLLBACK TO a savepoint ends the portals bound since, RELEASE hands them to the
            // level around; savepoints set through the simple and the extended protocol.
            (raw::query("BEGIN"), 1),
            (bind("u").concat(), 1),
            (raw::query("SAVEPOINT a"), 1),
            (bind("v").concat(), 1),
            (raw::query("SAVEPOINT b"), 1),
            (bind("w").concat(), 1),
            (raw::query("RELEASE b"), 1),
            (raw::extended("SAVEPOINT c"), 1),
            (bind("x").concat(), 1),
            (raw::query("ROLLBACK TO c"), 1),
            (run("w"), 1),
            (run("x"), 1),
            (raw::query("ROLLBACK TO SAVEPOINT a"), 1),
            (run("u"), 1),
            (run("v"), 1),
            (raw::query("ROLLBACK"), 1),
        ];
        let mut shapes = Vec::new();
        for (step, replies) in steps {
            c.send(&step).await;
            let mut got = Vec::new();
            for _ in 0..replies.max(1) {
                let msgs = c.until_ready().await;
                let code = msgs.iter().find_map(raw::Msg::code).unwrap_or_default();
                let code = if replies == 0 { String::new() } else { code };
                got.push(format!("{} {code}", raw::tags(&msgs)));
            }
            shapes.push(got.join("|"));
        }
        shapes
    }
    let direct = exchange(primary, "SELECT 42::int8").await;
    assert_eq!(
        direct,
        [
            "CZ ",
            "12Z ",
            "tTZ ",
            "TDCZ ",
            "3Z ",
            "DCZ ",
            "CZ ",
            "EZ 34000",
            "12Z ",
            "EZ 34000",
            "CZ ",
            "12Z ",
            "CZ |EZ 34000",
            "CZ ",
            "12Z ",
            "EZ 42601",
            "12CZ ",
            "EZ 34000",
            "TDCZ ",
            "CZ ",
            "12Z ",
            "CZ ",
            "12Z ",
            "CZ ",
            "12Z ",
            "CZ ",
            "12CZ ",
            "12Z ",
            "CZ ",
            "DCZ ",
            "EZ 34000",
            "CZ ",
            "DCZ ",
            "EZ 34000",
            "CZ "
        ]
    );
    for (proxy, what) in [(&one, "one shard"), (&sharded, "sharded")] {
        let proxied = exchange(proxy.port, "SELECT tessera_next_id()").await;
        assert_eq!(proxied, direct, "{what}");
    }
}

/// A statement the router cannot parse, on a database with sharded tables: when Postgres cannot
/// parse it either, the client gets Postgres' own syntax error (42601, its message and position),
/// in the simple and the extended protocol, in and out of a transaction, with transaction and
/// session pooling; the same exchange against Postgres directly gets the same replies. When
/// Postgres can parse it, the router's refusal (0A000) stands. The session goes on either way.
#[tokio::test(flavor = "multi_thread")]
async fn syntax_errors_on_a_sharded_database_are_postgres_own() {
    let sharded = Proxy::start_sharded(|_| {}).await;
    let session = Proxy::start_sharded(|c| c.pool.mode = PoolMode::Session).await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    async fn exchange(port: u16) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        let steps = [
            raw::query("SELEC 1"),
            raw::extended("SELECT 1 FROM users WHERE id = (1"),
            raw::query("SELECT 2"),
            raw::query("BEGIN"),
            // The transaction holds a connection now; the error is found on another.
            raw::query("SELECT 3"),
            raw::query("SELECT 4 +"),
            raw::query("SELECT 5"),
            raw::query("ROLLBACK"),
            raw::query("BEGIN"),
            raw::query("SELECT 6"),
            raw::extended("SELECT (6"),
            raw::query("ROLLBACK"),
            raw::query("SELECT 7"),
        ];
        let mut replies = Vec::new();
        for step in steps {
            c.send(&step).await;
            let msgs = c.until_ready().await;
            let status = msgs.last().map_or(' ', |z| z.body[0] as char);
            let error = msgs.iter().find(|m| m.tag == b'E');
            let field = |k| error.and_then(|e| e.field(k)).unwrap_or_default();
            replies.push(format!(
                "{} {status} {} {} {}",
                raw::tags(&msgs),
                field(b'C'),
                field(b'M'),
                field(b'P')
            ));
        }
        replies
    }
    let direct = exchange(primary).await;
    assert_eq!(
        direct[..3],
        [
            "EZ I 42601 syntax error at or near \"SELEC\" 1",
            "EZ I 42601 syntax error at end of input 34",
            "TDCZ I   ",
        ]
    );
    assert!(direct[5].starts_with("EZ E 42601"), "{direct:?}");
    assert!(direct[6].starts_with("EZ E 25P02"), "{direct:?}");
    assert!(direct[10].starts_with("EZ E 42601"), "{direct:?}");
    for (proxy, what) in [
        (&sharded, "transaction pooling"),
        (&session, "session pooling"),
    ] {
        assert_eq!(exchange(proxy.port).await, direct, "{what}");
        // Postgres parses this one, the router does not: refused, and the session goes on.
        let mut c = raw::Raw::login(proxy.port).await;
        c.send(&raw::query("SELECT collation for ('a')")).await;
        let msgs = c.until_ready().await;
        assert_eq!(
            msgs[0].code().as_deref(),
            Some("0A000"),
            "{what}: {}",
            raw::explain(&msgs)
        );
        c.send(&raw::query("SELECT 8")).await;
        let msgs = c.until_ready().await;
        assert_eq!(raw::tags(&msgs), "TDCZ", "{what}: {}", raw::explain(&msgs));
    }
}

/// A proxy on one shard and one on two (reads on the primaries), each with one server
/// connection per server: a second client gets the first one's connection, or waits for it.
async fn pools_of_one() -> (Proxy, Proxy) {
    let one = Proxy::start(|c| c.pool.size = 1).await;
    let sharded = Proxy::start_sharded(|c| {
        c.pool.size = 1;
        c.routing.replica_reads = false;
    })
    .await;
    (one, sharded)
}

/// One id of `table` (sharded by id) per shard, found by where the rows land; the rows are
/// deleted again.
async fn ids_on_each_shard(proxy: &Proxy, table: &str) -> Vec<i32> {
    let client = proxy.connect().await;
    let mut on_shard = std::collections::BTreeMap::new();
    for id in 1..=20 {
        client
            .execute(&format!("INSERT INTO {table} (id) VALUES ({id})"), &[])
            .await
            .expect("insert");
        let port: i32 = client
            .query_one(
                &format!("SELECT inet_server_port() FROM {table} WHERE id = {id}"),
                &[],
            )
            .await
            .expect("port")
            .get(0);
        on_shard.entry(port).or_insert(id);
    }
    client
        .batch_execute(&format!("DELETE FROM {table}"))
        .await
        .expect("delete");
    on_shard.into_values().collect()
}

/// A new `table (id int)` on the first shard's primary, for the same exchange directly.
async fn direct_table(prefix: &str) -> String {
    let table = unique(prefix);
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    let mut setup = raw::Raw::login(primary).await;
    setup
        .send(&raw::query(&format!("CREATE TABLE {table} (id int)")))
        .await;
    let created = setup.until_ready().await;
    assert_eq!(raw::tags(&created), "CZ", "{}", raw::explain(&created));
    table
}

/// As `pools_of_one`, with `table (id int)` sharded by id and created on every shard.
async fn pools_of_one_with_table(table: &str) -> (Proxy, Proxy) {
    let one = Proxy::start(|c| c.pool.size = 1).await;
    let sharded = Proxy::start_sharded(|c| {
        c.pool.size = 1;
        c.routing.replica_reads = false;
        c.sharding.tables.insert(table.to_string(), "id".into());
    })
    .await;
    sharded
        .connect()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .expect("create on every shard");
    (one, sharded)
}

/// After a batch ended by Flush, as on Postgres: one that fails ends its implicit transaction
/// (the server skips up to the client's Sync, and so does the proxy), and a transaction begun
/// after one keeps what it then does until its ROLLBACK.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_batch_ended_by_flush() {
    let table = unique("flushed");
    // Sharded by id: the batch ended by Flush and the INSERT go to the same shard.
    let (one, sharded) = pools_of_one_with_table(&table).await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    async fn exchange(port: u16, table: &str) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        let mut replies = Vec::new();
        let mut note = |msgs: Vec<raw::Msg>| {
            let status = msgs
                .last()
                .filter(|m| m.tag == b'Z')
                .map_or(' ', |z| z.body[0] as char);
            let code = msgs.iter().find_map(raw::Msg::code).unwrap_or_default();
            let value = msgs.iter().find_map(raw::Msg::col0).unwrap_or_default();
            replies.push(format!("{} {status} {code}{value}", raw::tags(&msgs)));
        };
        c.send(&raw::flushed("SELECT 1/0")).await;
        note(c.until_complete().await);
        c.send(&raw::extended("SELECT 2")).await;
        note(c.until_ready().await);
        c.send(&raw::flushed(&format!(
            "SELECT count(*) + 3 FROM {table} WHERE id = 1"
        )))
        .await;
        note(c.until_complete().await);
        for step in [
            raw::query("BEGIN"),
            raw::extended(&format!("INSERT INTO {table} (id) VALUES (1)")),
            raw::query("ROLLBACK"),
            raw::query(&format!("SELECT count(*) FROM {table}")),
        ] {
            c.send(&step).await;
            note(c.until_ready().await);
        }
        replies
    }
    let direct = exchange(primary, &table).await;
    assert_eq!(
        direct,
        [
            // (1/0 is folded when the statement is planned, at Bind.)
            "1E   22012",
            "Z I ",
            "12DC   3",
            "CZ T ",
            "12CZ T ",
            "CZ I ",
            "TDCZ I 0"
        ]
    );
    for (proxy, what) in [(&one, "one shard"), (&sharded, "sharded")] {
        assert_eq!(exchange(proxy.port, &table).await, direct, "{what}");
        // The open transaction is ended (committed) by the Sync of a batch the proxy answers
        // itself, and by a simple Query it answers itself: tessera_next_id(), DEALLOCATE of a
        // statement prepared through the protocol. Another client then gets the connection.
        let mut c = raw::Raw::login(proxy.port).await;
        c.send(&[raw::parse("s9", "SELECT 9"), raw::sync()].concat())
            .await;
        c.until_ready().await;
        for (id, closer, tags) in [
            (7, raw::extended("SELECT tessera_next_id()"), "12DCZ"),
            (8, raw::query("SELECT tessera_next_id()"), "TDCZ"),
            (9, raw::query("DEALLOCATE s9"), "CZ"),
        ] {
            c.send(&raw::flushed(&format!(
                "INSERT INTO {table} (id) VALUES ({id})"
            )))
            .await;
            c.until_complete().await;
            c.send(&closer).await;
            let answered = c.until_ready().await;
            assert_eq!(
                raw::tags(&answered),
                tags,
                "{what}: {}",
                raw::explain(&answered)
            );
            let n: i64 = proxy
                .connect()
                .await
                .query_one(
                    &format!("SELECT count(*) FROM {table} WHERE id = {id}"),
                    &[],
                )
                .await
                .expect("count")
                .get(0);
            assert_eq!(n, 1, "{what}: row {id} committed");
        }
        let other = proxy.connect().await;
        other
            .batch_execute(&format!("DELETE FROM {table}"))
            .await
            .expect("clean up");
    }
}

/// The unnamed statement as Postgres keeps it: a Bind or Describe of it before any Parse, or
/// after a Parse that failed, is an error (26000), never a run of an older statement or of
/// another client's left on the server connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_unnamed_statement_is_an_error() {
    let (one, sharded) = pools_of_one().await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    let bound = || [raw::bind("", "", &[]), raw::execute("", 0), raw::sync()].concat();
    async fn exchange(port: u16, steps: &[Vec<u8>]) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        let mut replies = Vec::new();
        for step in steps {
            c.send(step).await;
            let msgs = c.until_ready().await;
            let code = msgs.iter().find_map(raw::Msg::code).unwrap_or_default();
            let value = msgs.iter().find_map(raw::Msg::col0).unwrap_or_default();
            replies.push(format!("{} {code}{value}", raw::tags(&msgs)));
        }
        replies
    }
    let steps = [
        bound(),
        raw::extended("SELECT 41"),
        bound(),
        raw::extended("SELEC 42"),
        bound(),
        [raw::describe(b'S', ""), raw::sync()].concat(),
        // In a pipeline the server skips a Parse after an error: no unnamed statement either.
        [
            raw::parse("", "SELEC 44"),
            raw::bind("", "", &[]),
            raw::execute("", 0),
            raw::parse("", "SELECT 45"),
            raw::bind("", "", &[]),
            raw::execute("", 0),
            raw::sync(),
        ]
        .concat(),
        bound(),
        // An error after a Parse that succeeded: that statement stays the unnamed one.
        [
            raw::parse("", "SELECT 1 / (random() * 0)::int"),
            raw::bind("", "", &[]),
            raw::execute("", 0),
            raw::parse("", "SELECT 46"),
            raw::bind("", "", &[]),
            raw::execute("", 0),
            raw::sync(),
        ]
        .concat(),
        bound(),
    ];
    let direct = exchange(primary, &steps).await;
    assert_eq!(
        direct,
        [
            "EZ 26000",
            "12DCZ 41",
            "2DCZ 41",
            "EZ 42601",
            "EZ 26000",
            "EZ 26000",
            "EZ 42601",
            "EZ 26000",
            "12EZ 22012",
            "2EZ 22012"
        ]
    );
    for (proxy, what) in [(&one, "one shard"), (&sharded, "sharded")] {
        assert_eq!(exchange(proxy.port, &steps).await, direct, "{what}");
        // Another client on the same server connection (a pool of one) finds none either.
        exchange(proxy.port, &[raw::extended("SELECT 43")]).await;
        assert_eq!(
            exchange(proxy.port, &[bound()]).await,
            ["EZ 26000"],
            "{what}: another client's unnamed statement"
        );
    }
    // A statement the router refuses (Postgres would run it): its Parse reaches the server,
    // as on Postgres, and replaces the older unnamed statement; bound again, it is refused
    // again, never the older one run.
    let refused = exchange(
        sharded.port,
        &[
            raw::extended("SELECT 44"),
            raw::extended("SELECT collation for ('a')"),
            bound(),
        ],
    )
    .await;
    assert_eq!(refused, ["12DCZ 44", "1EZ 0A000", "EZ 0A000"]);
}

/// Settings replayed on another client's connection: one whose text ends in a `--` comment
/// hides none of those after it.
#[tokio::test(flavor = "multi_thread")]
async fn a_setting_ending_in_a_comment_is_replayed_with_the_rest() {
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let a = proxy.connect().await;
    a.batch_execute("SET search_path TO public -- the tenant's")
        .await
        .expect("set");
    a.batch_execute("SET statement_timeout = '1234ms'")
        .await
        .expect("set");
    // Another client takes the one connection (its own settings replayed), then the first
    // client's come back.
    let b = proxy.connect().await;
    let other: String = b
        .query_one("SHOW statement_timeout", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(other, "0");
    let row = a
        .query_one("SELECT current_setting('statement_timeout')", &[])
        .await
        .expect("show");
    assert_eq!(row.get::<_, String>(0), "1234ms");
}

/// A role one client sets is its own: the next client on the same server connection runs as
/// itself (`RESET ALL` alone would leave the role).
#[tokio::test(flavor = "multi_thread")]
async fn a_role_one_client_sets_stays_its_own() {
    let role = unique("role");
    let admin = common::connect_superuser(0).await;
    admin
        .batch_execute(&format!("CREATE ROLE {role} NOLOGIN; GRANT {role} TO app"))
        .await
        .expect("role");
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let a = proxy.connect().await;
    a.batch_execute(&format!("SET ROLE {role}"))
        .await
        .expect("set role");
    let b = proxy.connect().await;
    let user: String = b
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("current user")
        .get(0);
    assert_eq!(user, "app");
    let user: String = a
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("current user")
        .get(0);
    assert_eq!(user, role);
}

#[tokio::test(flavor = "multi_thread")]
async fn deallocate_and_discard_are_handled() {
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let url = proxy.url();
    // psql's \bind / \gexec aside, DEALLOCATE of an SQL-level PREPARE goes to the server.
    let script =
        "PREPARE p1 AS SELECT 11;\nEXECUTE p1;\nDEALLOCATE p1;\nDISCARD ALL;\nSELECT 'done';\n";
    let out =
        blocking(move || common::psql(&url, &["-A", "-t", "-v", "ON_ERROR_STOP=1"], Some(script)))
            .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("11") && stdout.contains("done"), "{stdout}");
    // After DISCARD ALL from one client, another client's prepared statements still work
    // (they are re-prepared on the connection).
    let client = proxy.connect().await;
    let stmt = client.prepare("SELECT 21").await.expect("prepare");
    client.query_one(&stmt, &[]).await.expect("first");
    client.batch_execute("DISCARD ALL").await.expect("discard");
    let other = proxy.connect().await;
    let stmt2 = other.prepare("SELECT 21").await.expect("prepare same text");
    assert_eq!(
        other
            .query_one(&stmt2, &[])
            .await
            .expect("after discard")
            .get::<_, i32>(0),
        21
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn transaction_state_is_kept_across_statements() {
    let proxy = Proxy::start(|c| c.pool.size = 2).await;
    let table = unique("txstate");
    let url = proxy.url();
    let script = format!(
        "CREATE TABLE {table} (id int);\nBEGIN;\nSELECT txid_current_if_assigned() IS NULL AS fresh;\nTRUNCATE {table};\nSELECT pg_backend_pid() = pg_backend_pid();\nCOPY {table} FROM STDIN WITH (FREEZE);\n1\n\\.\nCOMMIT;\nSELECT count(*) FROM {table};\n"
    );
    let out =
        blocking(move || common::psql(&url, &["-A", "-t", "-v", "ON_ERROR_STOP=1"], Some(&script)))
            .await;
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_clients_are_told_when_the_proxy_shuts_down() {
    let proxy = Proxy::start(|_| {}).await;
    let mut client = raw::Raw::login(proxy.port).await;
    // Many requests first: the session's wait for shutdown is polled again after each.
    for i in 0..50 {
        client.send(&raw::query(&format!("SELECT {i}"))).await;
        let reply = client.until_ready().await;
        assert_eq!(raw::tags(&reply), "TDCZ");
        assert_eq!(reply[1].col0().as_deref(), Some(i.to_string().as_str()));
    }
    tokio::time::timeout(Duration::from_secs(10), proxy.shutdown())
        .await
        .expect("the session ends when the proxy shuts down");
    let told = tokio::time::timeout(Duration::from_secs(10), client.read())
        .await
        .expect("the client hears of it");
    assert_eq!(told.code().as_deref(), Some("57P01"), "{told:?}");
}

/// A batch ended by Flush leaves the server inside an implicit transaction that only a Sync (or
/// a simple Query) ends: the connection stays with its client until then. Another client waits
/// for it rather than running inside that transaction, the next batch goes on in the same
/// transaction, and a lone Sync reaches the server and lets the connection go.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_ended_by_flush_keeps_its_connection_until_sync() {
    let (one, sharded) = pools_of_one().await;
    fn other_client(port: u16) -> tokio::task::JoinHandle<Vec<raw::Msg>> {
        tokio::spawn(async move {
            let mut c = raw::Raw::login(port).await;
            c.send(&raw::query("SELECT txid_current_if_assigned()"))
                .await;
            c.until_ready().await
        })
    }
    let txid = |end: Vec<u8>| {
        [
            raw::parse("", "SELECT txid_current()"),
            raw::bind("", "", &[]),
            raw::execute("", 0),
            end,
        ]
        .concat()
    };
    for (proxy, what) in [(&one, "one shard"), (&sharded, "sharded")] {
        let mut a = raw::Raw::login(proxy.port).await;
        a.send(&txid(raw::flush())).await;
        let first = a.until_complete().await;
        assert_eq!(
            raw::tags(&first),
            "12DC",
            "{what}: {}",
            raw::explain(&first)
        );
        let b = other_client(proxy.port);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !b.is_finished(),
            "{what}: another client got a connection inside an open implicit transaction"
        );
        a.send(&txid(raw::sync())).await;
        let second = a.until_ready().await;
        assert_eq!(
            second.iter().find_map(raw::Msg::col0),
            first.iter().find_map(raw::Msg::col0),
            "{what}: the batch after the Flush runs in the same transaction"
        );
        let b = b.await.expect("other client");
        assert_eq!(raw::tags(&b), "TDCZ", "{what}: {}", raw::explain(&b));
        assert_eq!(
            b[1].cols(),
            Some(vec![None]),
            "{what}: in no one's transaction"
        );
        // A lone Sync after a Flush goes to the server; then the connection is free again.
        a.send(&txid(raw::flush())).await;
        a.until_complete().await;
        a.send(&raw::sync()).await;
        let synced = a.until_ready().await;
        assert_eq!(raw::tags(&synced), "Z", "{what}");
        let c = other_client(proxy.port).await.expect("third client");
        assert_eq!(raw::tags(&c), "TDCZ", "{what}: {}", raw::explain(&c));
        assert_eq!(c[1].cols(), Some(vec![None]), "{what}");
    }
}

/// An error the proxy raises inside a batch (an unknown statement name, a statement name
/// already in use) ends the transaction as Postgres' own errors do: what the batch ran before
/// it is rolled back, and inside a transaction block the block fails. Also when the batch's
/// first part ended with a Flush.
#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_error_inside_a_batch_rolls_it_back() {
    let table = unique("batch_error");
    let (one, sharded) = pools_of_one_with_table(&table).await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    struct Case {
        begin: bool,
        flush: bool,
        bad: Vec<u8>,
    }
    async fn run(port: u16, table: &str, id: usize, case: &Case) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        let mut replies = Vec::new();
        let step = |replies: &mut Vec<String>, msgs: Vec<raw::Msg>| {
            let code = msgs.iter().find_map(raw::Msg::code).unwrap_or_default();
            let m = msgs.iter().find_map(|m| m.field(b'M')).unwrap_or_default();
            let status = msgs.last().map_or('-', |z| char::from(z.body[0]));
            replies.push(format!("{} {status} {code} {m}", raw::tags(&msgs)));
        };
        if case.begin {
            c.send(&raw::query("BEGIN")).await;
            step(&mut replies, c.until_ready().await);
        }
        let insert = format!("INSERT INTO {table} (id) VALUES ({id})");
        let mut first = [
            raw::parse("dup", "SELECT 1"),
            raw::parse("", &insert),
            raw::bind("", "", &[]),
            raw::execute("", 0),
        ]
        .concat();
        if case.flush {
            first.extend(raw::flush());
            c.send(&first).await;
            let msgs = c.until_complete().await;
            replies.push(raw::tags(&msgs));
            first.clear();
        }
        first.extend_from_slice(&case.bad);
        first.extend([raw::execute("", 0), raw::sync()].concat());
        c.send(&first).await;
        step(&mut replies, c.until_ready().await);
        if case.begin {
            c.send(&raw::query("SELECT 1")).await;
            step(&mut replies, c.until_ready().await);
            c.send(&raw::query("COMMIT")).await;
            step(&mut replies, c.until_ready().await);
        }
        c.send(&raw::query(&format!(
            "SELECT count(*) FROM {table} WHERE id = {id}"
        )))
        .await;
        let msgs = c.until_ready().await;
        replies.push(msgs.iter().find_map(raw::Msg::col0).unwrap_or_default());
        replies
    }
    let bad = [
        raw::bind("", "nope", &[]),
        raw::describe(b'S', "nope"),
        raw::parse("dup", "SELECT 2"),
    ];
    let mut id = 0;
    for begin in [false, true] {
        for flush in [false, true] {
            for bad in &bad {
                let case = Case {
                    begin,
                    flush,
                    bad: bad.clone(),
                };
                let what = format!("begin {begin}, flush {flush}, {:?}", char::from(bad[0]));
                id += 1;
                let direct = run(primary, &table, id, &case).await;
                assert_eq!(
                    direct.last().map(String::as_str),
                    Some("0"),
                    "{what}: {direct:?}"
                );
                for (port, on) in [(one.port, "one shard"), (sharded.port, "sharded")] {
                    id += 1;
                    assert_eq!(run(port, &table, id, &case).await, direct, "{on}, {what}");
                }
            }
        }
    }
    // ROLLBACK TO a savepoint set before the batch recovers the transaction block.
    async fn savepoint(port: u16, table: &str, id: usize) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        let mut replies = Vec::new();
        let insert = format!("INSERT INTO {table} (id) VALUES ({id})");
        let steps = [
            raw::query("BEGIN"),
            raw::query("SAVEPOINT a"),
            [
                raw::parse("", &insert),
                raw::bind("", "", &[]),
                raw::execute("", 0),
                raw::bind("", "nope", &[]),
                raw::sync(),
            ]
            .concat(),
            raw::query("ROLLBACK TO a"),
            raw::query(&format!("{insert}, ({id})")),
            raw::query("COMMIT"),
            raw::query(&format!("SELECT count(*) FROM {table} WHERE id = {id}")),
        ];
        for step in &steps {
            c.send(step).await;
            replies.push(raw::summary(&c.until_ready().await));
        }
        replies
    }
    id += 1;
    let direct = savepoint(primary, &table, id).await;
    assert_eq!(
        direct.last().map(String::as_str),
        Some("TDCZ I 2"),
        "{direct:?}"
    );
    for (port, on) in [(one.port, "one shard"), (sharded.port, "sharded")] {
        id += 1;
        assert_eq!(savepoint(port, &table, id).await, direct, "{on}, savepoint");
    }
    // An error the proxy raises for a whole request (a statement the router cannot place)
    // after a batch ended by Flush rolls that batch back too, and the connection goes on; in
    // session pooling as well.
    let session = Proxy::start_sharded(|c| {
        c.pool.size = 1;
        c.pool.mode = PoolMode::Session;
        c.routing.replica_reads = false;
        c.sharding.tables.insert(table.clone(), "id".into());
    })
    .await;
    for (proxy, what) in [
        (&sharded, "transaction pooling"),
        (&session, "session pooling"),
    ] {
        id += 1;
        let mut c = raw::Raw::login(proxy.port).await;
        c.send(&raw::flushed(&format!(
            "INSERT INTO {table} (id) VALUES ({id})"
        )))
        .await;
        c.until_complete().await;
        c.send(&raw::query("SELECT collation for ('a')")).await;
        let refused = c.until_ready().await;
        let code = refused.iter().find_map(raw::Msg::code);
        assert_eq!(code.as_deref(), Some("0A000"), "{what}");
        for step in [
            raw::query(&format!("SELECT count(*) FROM {table} WHERE id = {id}")),
            raw::extended(&format!("SELECT count(*) FROM {table} WHERE id = {id}")),
        ] {
            c.send(&step).await;
            let counted = c.until_ready().await;
            let status = counted.last().map(|z| char::from(z.body[0]));
            let n = counted.iter().find_map(raw::Msg::col0);
            assert_eq!((n.as_deref(), status), (Some("0"), Some('I')), "{what}");
        }
    }
}

/// A transaction block begun after a batch ended by Flush takes in what that batch ran, as on
/// Postgres: its ROLLBACK rolls it back, its COMMIT commits it (simple and extended protocol).
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_begun_after_a_flush_takes_in_the_batch() {
    let table = unique("flush_begin");
    let (one, sharded) = pools_of_one_with_table(&table).await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    async fn run(port: u16, table: &str, id: usize, begin: &[u8], end: &[u8]) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        c.send(&raw::flushed(&format!(
            "INSERT INTO {table} (id) VALUES ({id})"
        )))
        .await;
        let mut replies = vec![raw::tags(&c.until_complete().await)];
        let count = raw::query(&format!("SELECT count(*) FROM {table} WHERE id = {id}"));
        for step in [begin, end, &count[..]] {
            c.send(step).await;
            replies.push(raw::summary(&c.until_ready().await));
        }
        c.send(&raw::query(&format!("DELETE FROM {table} WHERE id = {id}")))
            .await;
        c.until_ready().await;
        replies
    }
    // The batch before the BEGIN lands on each shard in turn (rows deleted after each run).
    let ids = ids_on_each_shard(&sharded, &table).await;
    for word in ["ROLLBACK", "COMMIT"] {
        for (begin, end, what) in [
            (raw::query("BEGIN"), raw::query(word), "simple"),
            (raw::extended("BEGIN"), raw::extended(word), "extended"),
            (
                raw::query("BEGIN"),
                raw::extended(word),
                "simple BEGIN, extended end",
            ),
            (
                raw::extended("BEGIN"),
                raw::query(word),
                "extended BEGIN, simple end",
            ),
        ] {
            let direct = run(primary, &table, 1000, &begin, &end).await;
            for &id in &ids {
                for (port, on) in [(one.port, "one shard"), (sharded.port, "sharded")] {
                    let got = run(port, &table, id as usize, &begin, &end).await;
                    assert_eq!(got, direct, "{on}, id {id}, {what} {word}");
                }
            }
        }
    }
}

/// The unnamed statement a Bind finds is the one the client parsed last, on whichever shard the
/// Bind goes to: not an older one another shard's connection still holds, nor none because the
/// proxy's own simple Query (a read-your-writes probe) dropped it there.
#[tokio::test(flavor = "multi_thread")]
async fn a_bind_finds_the_last_unnamed_statement_on_every_shard() {
    let table = unique("unnamed_shards");
    let (_, sharded) = pools_of_one_with_table(&table).await;
    let ids = ids_on_each_shard(&sharded, &table).await;
    sharded
        .connect()
        .await
        .batch_execute(&format!(
            "INSERT INTO {table} (id) VALUES ({})",
            ids.iter()
                .map(i32::to_string)
                .collect::<Vec<_>>()
                .join("), (")
        ))
        .await
        .expect("rows");
    let [a, b] = ids[..] else {
        panic!("ids on two shards: {ids:?}")
    };
    let select = |word: &str| format!("SELECT '{word}', id FROM {table} WHERE id = $1::int");
    let run = |id: i32| {
        [
            raw::bind("", "", &[&id.to_string()]),
            raw::execute("", 0),
            raw::sync(),
        ]
        .concat()
    };
    for begin in [true, false] {
        let mut c = raw::Raw::login(sharded.port).await;
        if begin {
            c.send(&raw::query("BEGIN")).await;
            c.until_ready().await;
        }
        let mut rows = Vec::new();
        for (step, id) in [(Some("first"), a), (Some("second"), b), (None, a)] {
            let mut msgs = step.map(|w| raw::parse("", &select(w))).unwrap_or_default();
            msgs.extend(run(id));
            c.send(&msgs).await;
            let reply = c.until_ready().await;
            rows.push(
                reply
                    .iter()
                    .find_map(raw::Msg::cols)
                    .map(|cols| {
                        cols.iter()
                            .map(|v| {
                                String::from_utf8_lossy(v.as_deref().unwrap_or(b"")).into_owned()
                            })
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .unwrap_or_else(|| raw::explain(&reply)),
            );
        }
        if begin {
            c.send(&raw::query("COMMIT")).await;
            c.until_ready().await;
        }
        assert_eq!(
            rows,
            [
                format!("first {a}"),
                format!("second {b}"),
                format!("second {a}")
            ],
            "begin {begin}"
        );
    }
    // In session pooling the connection stays with the client: after a write, the proxy's
    // read-your-writes probe (a simple Query) dropped the server's unnamed statement, and a
    // Bind of it again still runs it, as on Postgres.
    let session = Proxy::start_sharded(|c| {
        c.pool.mode = PoolMode::Session;
        c.sharding.tables.insert(table.clone(), "id".into());
    })
    .await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    let insert = format!("INSERT INTO {table} (id) VALUES ($1::int)");
    // (Also when the Bind comes right behind, while the probe is still running.)
    for (port, id) in [(primary, 1001), (session.port, 1002)] {
        let mut c = raw::Raw::login(port).await;
        c.send(&[raw::parse("", &insert), run(id)].concat()).await;
        c.until_ready().await;
        c.send(&run(id)).await;
        let again = c.until_ready().await;
        assert_eq!(raw::tags(&again), "2CZ", "{}", raw::explain(&again));
        c.send(&[run(id), run(id)].concat()).await;
        for _ in 0..2 {
            let behind = c.until_ready().await;
            assert_eq!(raw::tags(&behind), "2CZ", "{}", raw::explain(&behind));
        }
        c.send(&raw::query(&format!(
            "SELECT count(*) FROM {table} WHERE id = {id}"
        )))
        .await;
        let n = c.until_ready().await.iter().find_map(raw::Msg::col0);
        assert_eq!(n.as_deref(), Some("4"), "port {port}");
    }
}

/// After a table's columns change, a prepared statement's plan is stale: binding it fails with
/// 0A000 as on Postgres, and a new Parse of the same text (what drivers do to recover) gets a
/// fresh statement that works, rather than the stale one the proxy shares.
#[tokio::test(flavor = "multi_thread")]
async fn a_statement_prepared_again_after_a_schema_change_works() {
    let (one, sharded) = pools_of_one().await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    async fn exchange(port: u16, table: &str) -> Vec<String> {
        // Two clients with the statement prepared before the change.
        let mut clients = [raw::Raw::login(port).await, raw::Raw::login(port).await];
        let select = format!("SELECT * FROM {table} WHERE id = $1::int");
        let run = |name: &str| {
            [
                raw::bind("", name, &["1"]),
                raw::execute("", 0),
                raw::sync(),
            ]
            .concat()
        };
        let steps = [
            (
                0,
                raw::query(&format!("CREATE TABLE {table} (id int, v text)")),
            ),
            (
                0,
                raw::query(&format!("INSERT INTO {table} VALUES (1, 'a')")),
            ),
            (0, [raw::parse("s1", &select), run("s1")].concat()),
            (1, [raw::parse("s1", &select), run("s1")].concat()),
            (
                0,
                raw::query(&format!(
                    "ALTER TABLE {table} ADD COLUMN extra int DEFAULT 7"
                )),
            ),
            (0, run("s1")),
            (
                0,
                [raw::close(b'S', "s1"), raw::parse("s2", &select), run("s2")].concat(),
            ),
            // Changed again: the other client's statement stays stale until it prepares it
            // again, and then gets a plan newer than the first client's.
            (
                0,
                raw::query(&format!("ALTER TABLE {table} ADD COLUMN more int")),
            ),
            (1, run("s1")),
            (1, [raw::parse("s3", &select), run("s3")].concat()),
        ];
        let mut replies = Vec::new();
        for (n, step) in &steps {
            let c = &mut clients[*n];
            c.send(step).await;
            let msgs = c.until_ready().await;
            let code = msgs.iter().find_map(raw::Msg::code).unwrap_or_default();
            let row = msgs.iter().find_map(raw::Msg::cols).map_or(0, |r| r.len());
            replies.push(format!("{} {code} {row}", raw::tags(&msgs)));
        }
        replies
    }
    let direct = exchange(primary, &unique("stale_plan")).await;
    assert_eq!(
        direct,
        [
            "CZ  0",
            "CZ  0",
            "12DCZ  2",
            "12DCZ  2",
            "CZ  0",
            "EZ 0A000 0",
            "312DCZ  3",
            "CZ  0",
            "EZ 0A000 0",
            "12DCZ  4"
        ]
    );
    for (proxy, what) in [(&one, "one shard"), (&sharded, "sharded")] {
        let got = exchange(proxy.port, &unique("stale_plan")).await;
        assert_eq!(got, direct, "{what}");
    }
}

/// A Bind or Describe of a statement the client lacks, in a batch the proxy would otherwise
/// answer or scatter as a whole (a savepoint, a statement on every shard): the error comes where
/// Postgres puts it, and the session goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_statement_in_a_batch_answered_whole() {
    let table = unique("missing_whole");
    let (_, sharded) = pools_of_one_with_table(&table).await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    let direct_table = direct_table("missing_whole").await;
    async fn exchange(port: u16, table: &str) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        let steps = [
            raw::query("BEGIN"),
            [
                raw::parse("", "SAVEPOINT a"),
                raw::bind("", "", &[]),
                raw::execute("", 0),
                raw::bind("", "nope", &[]),
                raw::execute("", 0),
                raw::sync(),
            ]
            .concat(),
            raw::query("ROLLBACK"),
            [
                raw::parse("every", &format!("SELECT count(*) FROM {table}")),
                raw::sync(),
            ]
            .concat(),
            [
                raw::describe(b'S', "nope"),
                raw::bind("", "every", &[]),
                raw::execute("", 0),
                raw::sync(),
            ]
            .concat(),
            raw::extended("SELECT 5"),
        ];
        c.transcript(&steps).await
    }
    let direct = exchange(primary, &direct_table).await;
    assert_eq!(
        direct,
        [
            "CZ T ",
            "12CEZ E 26000",
            "CZ I ",
            "1Z I ",
            "EZ I 26000",
            "12DCZ I 5"
        ]
    );
    assert_eq!(exchange(sharded.port, &table).await, direct);
}

/// A Parse of the unnamed statement the proxy sends ahead of a Bind (the statement was parsed
/// on another shard) and the server then skips (an error earlier in the pipeline) leaves that
/// connection without it: a later Bind there parses it again rather than running an older one.
#[tokio::test(flavor = "multi_thread")]
async fn a_skipped_parse_of_the_proxy_leaves_no_stale_statement() {
    let table = unique("skipped_parse");
    let session = Proxy::start_sharded(|c| {
        c.pool.mode = PoolMode::Session;
        c.routing.replica_reads = false;
        c.sharding.tables.insert(table.clone(), "id".into());
    })
    .await;
    session
        .connect()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (id int)"))
        .await
        .expect("create on every shard");
    let ids = ids_on_each_shard(&session, &table).await;
    let [a, b] = ids[..] else {
        panic!("ids on two shards: {ids:?}")
    };
    session
        .connect()
        .await
        .batch_execute(&format!("INSERT INTO {table} (id) VALUES ({a}), ({b})"))
        .await
        .expect("rows");
    let mut c = raw::Raw::login(session.port).await;
    let select = |word: &str| format!("SELECT '{word}', id FROM {table} WHERE id = $1::int");
    let bind = |stmt: &str, id: i32| {
        [raw::bind("", stmt, &[&id.to_string()]), raw::execute("", 0)].concat()
    };
    let steps = [
        [
            raw::parse(
                "f",
                &format!("SELECT 1 / (id - id) FROM {table} WHERE id = $1::int"),
            ),
            raw::sync(),
        ]
        .concat(),
        [raw::parse("", &select("u1")), bind("", a), raw::sync()].concat(),
        [raw::parse("", &select("u2")), bind("", b), raw::sync()].concat(),
        [bind("f", a), bind("", a), raw::sync()].concat(),
        [bind("", a), raw::sync()].concat(),
    ];
    let mut replies = Vec::new();
    for step in &steps {
        c.send(step).await;
        let msgs = c.until_ready().await;
        let code = msgs.iter().find_map(raw::Msg::code).unwrap_or_default();
        let row = msgs
            .iter()
            .find_map(raw::Msg::cols)
            .map(|cols| {
                cols.iter()
                    .map(|v| String::from_utf8_lossy(v.as_deref().unwrap_or(b"")).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        replies.push(format!("{} {code}{row}", raw::tags(&msgs)));
    }
    assert_eq!(
        replies,
        [
            "1Z ".to_string(),
            format!("12DCZ u1 {a}"),
            format!("12DCZ u2 {b}"),
            "2EZ 22012".to_string(),
            format!("2DCZ u2 {a}"),
        ]
    );
}

/// A BEGIN through the extended protocol is deferred like a simple one: a transaction that then
/// works on one shard only stays on that shard, so savepoint control pipelined under one Sync
/// (psycopg's nested transactions) runs there, as on Postgres.
#[tokio::test(flavor = "multi_thread")]
async fn an_extended_begin_is_deferred_to_the_shard_used() {
    let table = unique("extended_begin");
    let (one, sharded) = pools_of_one_with_table(&table).await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    let ids = ids_on_each_shard(&sharded, &table).await;
    async fn run(port: u16, table: &str, id: i32) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        let insert = |n: i32| {
            let sql = format!("INSERT INTO {table} (id) VALUES ({n})");
            [
                raw::parse("", &sql),
                raw::bind("", "", &[]),
                raw::execute("", 0),
            ]
            .concat()
        };
        let control = |sql: &str| {
            [
                raw::parse("", sql),
                raw::bind("", "", &[]),
                raw::execute("", 0),
            ]
            .concat()
        };
        let steps = [
            raw::extended("BEGIN"),
            [insert(id), raw::sync()].concat(),
            [control("SAVEPOINT s"), insert(id), raw::sync()].concat(),
            [
                control("ROLLBACK TO SAVEPOINT s"),
                control("RELEASE SAVEPOINT s"),
                raw::sync(),
            ]
            .concat(),
            raw::extended("COMMIT"),
            raw::query(&format!("SELECT count(*) FROM {table} WHERE id = {id}")),
            raw::query(&format!("DELETE FROM {table} WHERE id = {id}")),
        ];
        c.transcript(&steps).await
    }
    let direct = run(primary, &table, 1000).await;
    assert_eq!(direct[5], "TDCZ I 1", "{direct:?}");
    for &id in &ids {
        for (port, on) in [(one.port, "one shard"), (sharded.port, "sharded")] {
            assert_eq!(run(port, &table, id).await, direct, "{on}, id {id}");
        }
    }
}

/// `DEALLOCATE name`, `DEALLOCATE ALL` and `DISCARD ALL` through the extended protocol (as
/// psycopg sends them) act on the client's statements as on Postgres, and leave the statements
/// the proxy shares on the server connection usable by the next client.
#[tokio::test(flavor = "multi_thread")]
async fn deallocate_and_discard_through_the_extended_protocol() {
    let (one, sharded) = pools_of_one().await;
    let session = Proxy::start(|c| {
        c.pool.size = 1;
        c.pool.mode = PoolMode::Session;
    })
    .await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    let run = |name: &str| [raw::bind("", name, &[]), raw::execute("", 0), raw::sync()].concat();
    let command = |sql: &str| {
        [
            raw::parse("", sql),
            raw::bind("", "", &[]),
            raw::describe(b'P', ""),
            raw::execute("", 0),
            raw::sync(),
        ]
        .concat()
    };
    let steps = [
        [
            raw::parse("s1", "SELECT 1"),
            raw::parse("s2", "SELECT 2"),
            run("s1"),
        ]
        .concat(),
        command("DEALLOCATE s1"),
        run("s1"),
        run("s2"),
        [raw::parse("s1", "SELECT 1"), run("s1")].concat(),
        command("DEALLOCATE ALL"),
        run("s1"),
        [raw::parse("s1", "SELECT 1"), run("s1")].concat(),
        command("DISCARD ALL"),
        run("s1"),
        [raw::parse("s1", "SELECT 1"), run("s1")].concat(),
        command("DEALLOCATE nope"),
    ];
    async fn exchange(port: u16, steps: &[Vec<u8>]) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        let mut replies = Vec::new();
        for step in steps {
            c.send(step).await;
            let msgs = c.until_ready().await;
            let code = msgs.iter().find_map(raw::Msg::code).unwrap_or_default();
            let value = msgs.iter().find_map(raw::Msg::col0).unwrap_or_default();
            replies.push(format!("{} {code}{value}", raw::tags(&msgs)));
        }
        replies
    }
    let direct = exchange(primary, &steps).await;
    assert_eq!(
        direct,
        [
            "112DCZ 1",
            "12nCZ ",
            "EZ 26000",
            "2DCZ 2",
            "12DCZ 1",
            "12nCZ ",
            "EZ 26000",
            "12DCZ 1",
            "12nCZ ",
            "EZ 26000",
            "12DCZ 1",
            "12nEZ 26000"
        ]
    );
    for (proxy, what) in [
        (&one, "one shard"),
        (&sharded, "sharded"),
        (&session, "session"),
    ] {
        assert_eq!(exchange(proxy.port, &steps).await, direct, "{what}");
        // The next client on the same server connection prepares the same texts.
        let next = exchange(
            proxy.port,
            &[
                [
                    raw::parse("t1", "SELECT 1"),
                    raw::parse("t2", "SELECT 2"),
                    run("t1"),
                ]
                .concat(),
                run("t2"),
            ],
        )
        .await;
        assert_eq!(next, ["112DCZ 1", "2DCZ 2"], "{what}: the next client");
    }
}

/// An unnamed statement parsed without parameter types, then described (asyncpg without its
/// statement cache): the types the server describes let a key sent in binary be routed.
#[tokio::test(flavor = "multi_thread")]
async fn an_unnamed_statement_learns_its_parameter_types() {
    let table = unique("unnamed_types");
    let (_, sharded) = pools_of_one_with_table(&table).await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    let direct_table = direct_table("unnamed_types").await;
    // Bind of the unnamed statement with one int4 parameter in binary.
    let binary_bind = |id: i32| {
        let mut body = vec![0u8, 0]; // portal "", statement ""
        body.extend_from_slice(&1i16.to_be_bytes()); // one format code: binary
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes()); // one parameter
        body.extend_from_slice(&4i32.to_be_bytes());
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes()); // result formats: default
        let mut msg = vec![b'B'];
        msg.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        msg.extend_from_slice(&body);
        msg
    };
    async fn exchange(port: u16, table: &str, bind: Vec<u8>) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        let parse = raw::parse("", &format!("INSERT INTO {table} (id) VALUES ($1)"));
        let steps = [
            [parse.clone(), raw::describe(b'S', ""), raw::sync()].concat(),
            [bind.clone(), raw::execute("", 0), raw::sync()].concat(),
            // Parsed again right before the Bind, as asyncpg does.
            [parse, bind, raw::execute("", 0), raw::sync()].concat(),
        ];
        let mut replies = Vec::new();
        for step in &steps {
            c.send(step).await;
            let msgs = c.until_ready().await;
            let code = msgs.iter().find_map(raw::Msg::code).unwrap_or_default();
            replies.push(format!("{} {code}", raw::tags(&msgs)));
        }
        replies
    }
    let direct = exchange(primary, &direct_table, binary_bind(7)).await;
    assert_eq!(direct, ["1tnZ ", "2CZ ", "12CZ "]);
    assert_eq!(exchange(sharded.port, &table, binary_bind(7)).await, direct);
    let n: i64 = sharded
        .connect()
        .await
        .query_one(&format!("SELECT count(*) FROM {table} WHERE id = 7"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 2, "the rows are on the shard their key names");
}

/// A parameter of a user-defined type (an enum) in a statement run on every shard: each shard
/// has its own OID for the type, so the one a shard's Describe taught is not declared to the
/// others; each infers it, as for the client.
#[tokio::test(flavor = "multi_thread")]
async fn a_user_defined_parameter_type_across_shards() {
    let table = unique("moods");
    let mood = unique("mood");
    let sharded = Proxy::start_sharded(|c| {
        c.routing.replica_reads = false;
        c.sharding.tables.insert(table.clone(), "id".into());
    })
    .await;
    // The second shard's OIDs run ahead, so the type gets a different OID there.
    let second = common::with_cluster(|c| c.shards()[1].primary.port);
    let mut c = raw::Raw::login(second).await;
    c.send(&raw::query(&format!("CREATE TYPE {mood}_skew AS (a int)")))
        .await;
    c.until_ready().await;
    let client = sharded.connect().await;
    client
        .batch_execute(&format!(
            "CREATE TYPE {mood} AS ENUM ('ok', 'sad'); \
             CREATE TABLE {table} (id int, m {mood})"
        ))
        .await
        .expect("create on every shard");
    for id in 1..=8 {
        let m = if id % 2 == 0 { "ok" } else { "sad" };
        client
            .execute(
                &format!("INSERT INTO {table} (id, m) VALUES ({id}, '{m}')"),
                &[],
            )
            .await
            .expect("insert");
    }
    let mut c = raw::Raw::login(sharded.port).await;
    let count = format!("SELECT count(*) FROM {table} WHERE m = $1");
    c.send(
        &[
            raw::parse("s", &count),
            raw::describe(b'S', "s"),
            raw::sync(),
        ]
        .concat(),
    )
    .await;
    let described = c.until_ready().await;
    assert_eq!(
        raw::tags(&described),
        "1tTZ",
        "{}",
        raw::explain(&described)
    );
    for _ in 0..2 {
        c.send(
            &[
                raw::bind("", "s", &["ok"]),
                raw::execute("", 0),
                raw::sync(),
            ]
            .concat(),
        )
        .await;
        let counted = c.until_ready().await;
        assert_eq!(
            counted.iter().find_map(raw::Msg::col0).as_deref(),
            Some("4"),
            "{}",
            raw::explain(&counted)
        );
    }
}

/// A statement the router cannot plan in the middle of a pipeline (a syntax error, a shape it
/// refuses): what comes before it runs and is answered, the error comes where Postgres puts
/// it, and the rest is skipped up to the Sync; the implicit transaction rolls back.
#[tokio::test(flavor = "multi_thread")]
async fn an_unplannable_statement_mid_pipeline() {
    let table = unique("mid_pipeline");
    let (_, sharded) = pools_of_one_with_table(&table).await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    let direct_table = direct_table("mid_pipeline").await;
    async fn exchange(port: u16, table: &str, bad: &str) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        let statement = |sql: &str| {
            [
                raw::parse("", sql),
                raw::bind("", "", &[]),
                raw::execute("", 0),
            ]
            .concat()
        };
        let insert = |id: i32| statement(&format!("INSERT INTO {table} (id) VALUES ({id})"));
        let steps = [
            [insert(1), statement(bad), insert(2), raw::sync()].concat(),
            raw::query(&format!("SELECT count(*) FROM {table}")),
            raw::query("BEGIN"),
            [insert(3), statement(bad), raw::sync()].concat(),
            raw::query("COMMIT"),
            raw::query(&format!("SELECT count(*) FROM {table}")),
            // The unnamed statement whose Parse failed is gone.
            [raw::bind("", "", &[]), raw::execute("", 0), raw::sync()].concat(),
        ];
        c.transcript(&steps).await
    }
    let direct = exchange(primary, &direct_table, "SELEC 1").await;
    assert_eq!(
        direct,
        [
            "12CEZ I 42601",
            "TDCZ I 0",
            "CZ T ",
            "12CEZ E 42601",
            "CZ I ",
            "TDCZ I 0",
            "EZ I 26000"
        ]
    );
    assert_eq!(exchange(sharded.port, &table, "SELEC 1").await, direct);
    // A statement Postgres would run but the router refuses: the same, with its 0A000 at the
    // Bind (Postgres parses it).
    let refused = exchange(sharded.port, &table, "SELECT collation for ('a')").await;
    assert_eq!(
        refused,
        [
            "12C1EZ I 0A000",
            "TDCZ I 0",
            "CZ T ",
            "12C1EZ E 0A000",
            "CZ I ",
            "TDCZ I 0",
            // (Parsed, so the client has it; bound again, it is refused again.)
            "EZ I 0A000"
        ]
    );
}

/// A portal bound before the transaction aborted (on another shard) is not fetched from after:
/// 25P02, as on Postgres.
#[tokio::test(flavor = "multi_thread")]
async fn a_portal_after_the_transaction_aborted() {
    let table = unique("portal_abort");
    let (_, sharded) = pools_of_one_with_table(&table).await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    let ids = ids_on_each_shard(&sharded, &table).await;
    let direct_table = direct_table("portal_abort").await;
    async fn exchange(port: u16, table: &str, id: i32) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        let steps = [
            raw::query(&format!(
                "INSERT INTO {table} (id) VALUES ({id}), ({id}), ({id}), ({id})"
            )),
            raw::query("BEGIN"),
            [
                raw::parse("", &format!("SELECT id FROM {table} WHERE id = {id}")),
                raw::bind("c", "", &[]),
                raw::execute("c", 2),
                raw::sync(),
            ]
            .concat(),
            raw::extended("SELECT 1/0"),
            [raw::execute("c", 2), raw::sync()].concat(),
            raw::query("ROLLBACK"),
            raw::query(&format!("DELETE FROM {table}")),
        ];
        let mut replies = Vec::new();
        for step in &steps {
            c.send(step).await;
            let msgs = c.until_ready().await;
            let code = msgs.iter().find_map(raw::Msg::code).unwrap_or_default();
            let status = msgs.last().map_or('-', |z| char::from(z.body[0]));
            replies.push(format!("{} {status} {code}", raw::tags(&msgs)));
        }
        replies
    }
    let direct = exchange(primary, &direct_table, 1).await;
    assert_eq!(direct[4], "EZ E 25P02", "{direct:?}");
    for id in ids {
        assert_eq!(exchange(sharded.port, &table, id).await, direct, "id {id}");
    }
}

/// Edges of the proxy's shortcuts, against Postgres: an extended BEGIN in a batch that also
/// prepares another statement; DISCARD ALL through the extended protocol with a Parse
/// pipelined behind it (the next client on that server connection unaffected); a merged
/// statement (its text rewritten for the shards) prepared again after its table changed.
#[tokio::test(flavor = "multi_thread")]
async fn shortcut_edges() {
    let table = unique("shortcuts");
    let (one, sharded) = pools_of_one_with_table(&table).await;
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    let direct_table = direct_table("shortcuts").await;
    async fn exchange(port: u16, steps: &[Vec<u8>]) -> Vec<String> {
        let mut c = raw::Raw::login(port).await;
        let mut replies = Vec::new();
        for step in steps {
            c.send(step).await;
            // One reply per Sync in the step.
            let syncs = protocol_syncs(step);
            for _ in 0..syncs {
                replies.push(raw::summary(&c.until_ready().await));
            }
        }
        replies
    }
    fn protocol_syncs(step: &[u8]) -> usize {
        let (mut at, mut n) = (0, 0);
        while at + 5 <= step.len() {
            let len = i32::from_be_bytes([step[at + 1], step[at + 2], step[at + 3], step[at + 4]]);
            n += usize::from(step[at] == b'S' || step[at] == b'Q');
            at += 1 + len as usize;
        }
        n
    }
    let run = |name: &str| [raw::bind("", name, &[]), raw::execute("", 0), raw::sync()].concat();
    let discard_in_portal = || {
        [
            raw::parse("", "DISCARD ALL"),
            raw::bind("p1", "", &[]),
            raw::execute("p1", 0),
            raw::sync(),
        ]
        .concat()
    };
    let steps = |table: &str| {
        vec![
            // BEGIN with another statement prepared in the same batch.
            [
                raw::parse("x", &format!("DELETE FROM {table}")),
                raw::parse("", "BEGIN"),
                raw::bind("", "", &[]),
                raw::execute("", 0),
                raw::sync(),
            ]
            .concat(),
            raw::query(&format!("INSERT INTO {table} (id) VALUES (1)")),
            raw::query("ROLLBACK"),
            raw::query(&format!("SELECT count(*) FROM {table}")),
            // DISCARD ALL with a Parse right behind it.
            [
                raw::parse("", "DISCARD ALL"),
                raw::bind("", "", &[]),
                raw::execute("", 0),
                raw::sync(),
                raw::parse("s1", "SELECT 1"),
                run("s1"),
            ]
            .concat(),
            run("s1"),
            // A DEALLOCATE pipelined behind a statement that aborts the transaction.
            raw::query("BEGIN"),
            [
                raw::extended("SELECT 1/0"),
                raw::parse("", "DEALLOCATE s1"),
                raw::bind("", "", &[]),
                raw::execute("", 0),
                raw::sync(),
            ]
            .concat(),
            raw::query("ROLLBACK"),
            run("s1"),
            // DISCARD ALL in a named portal; then one that fails (in a transaction block).
            [discard_in_portal(), raw::parse("s1", "SELECT 1"), run("s1")].concat(),
            raw::query("BEGIN"),
            discard_in_portal(),
            raw::query("ROLLBACK"),
            run("s1"),
        ]
    };
    let direct = exchange(primary, &steps(&direct_table)).await;
    assert_eq!(
        direct,
        [
            "112CZ T ",
            "CZ T ",
            "CZ I ",
            "TDCZ I 0",
            "12CZ I ",
            "12DCZ I 1",
            "2DCZ I 1",
            "CZ T ",
            "1EZ E 22012",
            "EZ E 25P02",
            "CZ I ",
            "2DCZ I 1",
            "12CZ I ",
            "12DCZ I 1",
            "CZ T ",
            "12EZ E 25001",
            "CZ I ",
            "2DCZ I 1"
        ]
    );
    let session = Proxy::start_sharded(|c| {
        c.pool.size = 1;
        c.pool.mode = PoolMode::Session;
        c.routing.replica_reads = false;
        c.sharding.tables.insert(table.clone(), "id".into());
    })
    .await;
    for (proxy, what) in [
        (&one, "one shard"),
        (&sharded, "sharded"),
        (&session, "session pooling"),
    ] {
        assert_eq!(exchange(proxy.port, &steps(&table)).await, direct, "{what}");
        // The next client on that server connection prepares the same text.
        let next = exchange(
            proxy.port,
            &[[raw::parse("t1", "SELECT 1"), run("t1")].concat()],
        )
        .await;
        assert_eq!(next, ["12DCZ I 1"], "{what}: the next client");
    }
    // A statement on every shard whose text the proxy rewrites (avg), prepared again after
    // its table changed: a fresh plan, as on Postgres.
    let merged = format!("SELECT avg(id) FROM {table}");
    let mut c = raw::Raw::login(sharded.port).await;
    c.send(&[raw::parse("m1", &merged), run("m1")].concat())
        .await;
    c.until_ready().await;
    let mut admin = raw::Raw::login(sharded.port).await;
    admin
        .send(&raw::query(&format!(
            "ALTER TABLE {table} ALTER COLUMN id TYPE bigint"
        )))
        .await;
    let altered = admin.until_ready().await;
    assert_eq!(raw::tags(&altered), "CZ", "{}", raw::explain(&altered));
    c.send(&run("m1")).await;
    let stale = c.until_ready().await;
    c.send(&[raw::close(b'S', "m1"), raw::parse("m2", &merged), run("m2")].concat())
        .await;
    let fresh = c.until_ready().await;
    assert_eq!(
        raw::tags(&fresh),
        "312DCZ",
        "after {}: {}",
        raw::explain(&stale),
        raw::explain(&fresh)
    );
}
