//! Writes across shards against the real cluster: multi-row INSERTs split by shard (simple and
//! extended protocol), UPDATE/DELETE ... RETURNING without a key, and two-phase commit: a
//! transaction writing on two shards commits on both, a failing PREPARE leaves no trace, and a
//! proxy killed between the phases is recovered at its next start.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Proxy, unique};
use tessera::config::Config;
use tessera::router::{Router, canonical_key};

fn sqlstate(err: &tokio_postgres::Error) -> Option<&str> {
    err.as_db_error().map(|e| e.code().code())
}

/// A sharded table `name (id bigint primary key, v text)` keyed by id, created through the
/// proxy.
async fn table(client: &tokio_postgres::Client, name: &str, extra: &str) {
    client
        .batch_execute(&format!(
            "CREATE TABLE {name} (id bigint PRIMARY KEY, v text NOT NULL{extra})"
        ))
        .await
        .expect("DDL through the proxy");
}

fn map(config: &mut Config, name: &str) {
    config.sharding.tables.insert(name.to_string(), "id".into());
}

/// The test cluster's map with `name` sharded by id.
fn config_for(name: &str) -> Config {
    let mut config = common::sharded_config();
    map(&mut config, name);
    config
}

/// The ids each shard's primary holds, read directly.
async fn ids_on_shards(name: &str) -> Vec<BTreeSet<i64>> {
    let mut out = Vec::new();
    for shard in 0..2 {
        let client = common::connect_primary(shard).await;
        let rows = client
            .query(&format!("SELECT id FROM {name}"), &[])
            .await
            .expect("direct read");
        out.push(rows.iter().map(|r| r.get::<_, i64>(0)).collect());
    }
    out
}

/// Where the router places each id.
fn placement(config: &Config, name: &str, ids: &[i64]) -> Vec<BTreeSet<i64>> {
    let router = Router::new(config).expect("router");
    let mut out = vec![BTreeSet::new(), BTreeSet::new()];
    for &id in ids {
        let shard = router
            .shard_of(&canonical_key(&id.to_string()), name)
            .expect("placed");
        out[shard].insert(id);
    }
    out
}

async fn prepared_xacts() -> Vec<String> {
    let mut gids = Vec::new();
    for shard in 0..2 {
        let client = common::connect_superuser(shard).await;
        for row in client
            .query("SELECT gid FROM pg_prepared_xacts", &[])
            .await
            .expect("pg_prepared_xacts")
        {
            gids.push(row.get::<_, String>(0));
        }
    }
    gids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_row_inserts_split_by_shard_in_both_protocols() {
    let name = unique("split");
    let proxy = Proxy::start_sharded(|c| map(c, &name)).await;
    let client = proxy.connect().await;
    table(&client, &name, "").await;

    // Simple protocol, literal keys, RETURNING.
    let ids: Vec<i64> = (1..=40).collect();
    let values: Vec<String> = ids.iter().map(|i| format!("({i}, 'v{i}')")).collect();
    let messages = client
        .simple_query(&format!(
            "INSERT INTO {name} (id, v) VALUES {} RETURNING id",
            values.join(", ")
        ))
        .await
        .expect("split insert");
    let returned: BTreeSet<i64> = messages
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .collect();
    assert_eq!(returned, ids.iter().copied().collect());
    let count = messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
        _ => None,
    });
    assert_eq!(count, Some(40));

    // Extended protocol: parameters renumbered per shard, binary int8 keys.
    let more: Vec<i64> = (41..=60).collect();
    let placeholders: Vec<String> = (0..more.len())
        .map(|k| format!("(${}, ${})", 2 * k + 1, 2 * k + 2))
        .collect();
    let texts: Vec<String> = more.iter().map(|i| format!("w{i}")).collect();
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
    for (id, text) in more.iter().zip(&texts) {
        params.push(id);
        params.push(text);
    }
    let rows = client
        .query(
            &format!(
                "INSERT INTO {name} (id, v) VALUES {} RETURNING id, v",
                placeholders.join(", ")
            ),
            &params,
        )
        .await
        .expect("extended split insert");
    let back: BTreeSet<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: BTreeSet<(i64, String)> = more.iter().map(|i| (*i, format!("w{i}"))).collect();
    assert_eq!(back, want);

    // Every row is on the shard that owns it, and only there.
    let all: Vec<i64> = (1..=60).collect();
    let config = config_for(&name);
    assert_eq!(ids_on_shards(&name).await, placement(&config, &name, &all));

    // UPDATE and DELETE without a key: every shard's RETURNING rows, summed counts.
    let rows = client
        .query(&format!("UPDATE {name} SET v = v || '!' RETURNING id"), &[])
        .await
        .expect("update everywhere");
    assert_eq!(rows.len(), 60);
    let n = client
        .execute(&format!("DELETE FROM {name} WHERE id > 50"), &[])
        .await
        .expect("delete everywhere");
    assert_eq!(n, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_row_rolls_back_a_split_insert_everywhere() {
    let name = unique("atomic");
    let proxy = Proxy::start_sharded(|c| map(c, &name)).await;
    let client = proxy.connect().await;
    table(&client, &name, "").await;
    client
        .batch_execute(&format!("INSERT INTO {name} (id, v) VALUES (7, 'x')"))
        .await
        .expect("seed");
    // 1..=20 spans both shards; 7 already exists on its shard.
    let values: Vec<String> = (1..=20).map(|i| format!("({i}, 'v')")).collect();
    let err = client
        .batch_execute(&format!(
            "INSERT INTO {name} (id, v) VALUES {}",
            values.join(", ")
        ))
        .await
        .expect_err("duplicate key");
    assert_eq!(sqlstate(&err), Some("23505"), "{err}");
    let held = ids_on_shards(&name).await;
    let all: BTreeSet<i64> = held.iter().flatten().copied().collect();
    assert_eq!(all, BTreeSet::from([7]), "nothing else landed anywhere");
    // The session goes on.
    let rows = client
        .query(&format!("SELECT count(*) FROM {name}"), &[])
        .await
        .expect("next statement");
    assert_eq!(rows[0].get::<_, i64>(0), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_on_two_shards_commits_with_two_phase_commit() {
    let name = unique("tpc");
    let proxy = Proxy::start_sharded(|c| map(c, &name)).await;
    let mut client = proxy.connect().await;
    table(&client, &name, "").await;
    let tx = client.transaction().await.expect("begin");
    for id in 1..=10i64 {
        tx.execute(
            &format!("INSERT INTO {name} (id, v) VALUES ($1, 'a')"),
            &[&id],
        )
        .await
        .expect("insert in tx");
    }
    tx.execute(
        &format!("UPDATE {name} SET v = 'b' WHERE id IN (1, 2, 3, 4)"),
        &[],
    )
    .await
    .expect("update in tx");
    tx.commit().await.expect("two-phase commit");
    let held = ids_on_shards(&name).await;
    assert!(!held[0].is_empty() && !held[1].is_empty(), "{held:?}");
    assert_eq!(held.iter().map(BTreeSet::len).sum::<usize>(), 10);
    let gids = prepared_xacts().await;
    let node = proxy.handle.shared.config.node_id;
    assert!(
        !gids
            .iter()
            .any(|g| tessera::twopc::gid_node(g) == Some(node)),
        "no prepared transaction left behind: {gids:?}"
    );
    // Rolled back on every shard.
    let tx = client.transaction().await.expect("begin");
    for id in 11..=20i64 {
        tx.execute(
            &format!("INSERT INTO {name} (id, v) VALUES ($1, 'a')"),
            &[&id],
        )
        .await
        .expect("insert in tx");
    }
    tx.rollback().await.expect("rollback");
    assert_eq!(
        ids_on_shards(&name)
            .await
            .iter()
            .map(BTreeSet::len)
            .sum::<usize>(),
        10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_failing_prepare_leaves_no_trace() {
    let name = unique("tpcfail");
    let proxy = Proxy::start_sharded(|c| map(c, &name)).await;
    let client = proxy.connect().await;
    // A deferred unique constraint is checked at PREPARE TRANSACTION, on one shard only.
    table(
        &client,
        &name,
        ", x int UNIQUE DEFERRABLE INITIALLY DEFERRED",
    )
    .await;
    let config = config_for(&name);
    let placed = placement(&config, &name, &(1..=20).collect::<Vec<_>>());
    let on0: Vec<i64> = placed[0].iter().copied().take(2).collect();
    let on1: i64 = *placed[1].iter().next().expect("a key on shard 1");
    for sql in [
        "BEGIN".to_string(),
        format!("INSERT INTO {name} (id, v, x) VALUES ({on1}, 'ok', 100)"),
        format!(
            "INSERT INTO {name} (id, v, x) VALUES ({}, 'dup', 5)",
            on0[0]
        ),
        format!(
            "INSERT INTO {name} (id, v, x) VALUES ({}, 'dup', 5)",
            on0[1]
        ),
    ] {
        client
            .batch_execute(&sql)
            .await
            .expect("deferred: no error before commit");
    }
    let err = client
        .batch_execute("COMMIT")
        .await
        .expect_err("PREPARE fails on shard 0");
    assert_eq!(sqlstate(&err), Some("23505"), "{err}");
    let held = ids_on_shards(&name).await;
    assert!(held.iter().all(BTreeSet::is_empty), "{held:?}");
    let node = proxy.handle.shared.config.node_id;
    assert!(
        !prepared_xacts()
            .await
            .iter()
            .any(|g| tessera::twopc::gid_node(g) == Some(node))
    );
    // The session is usable and out of the transaction.
    client
        .batch_execute(&format!(
            "INSERT INTO {name} (id, v) VALUES ({on1}, 'again')"
        ))
        .await
        .expect("next statement");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_phase_off_a_multi_shard_write_is_refused() {
    let name = unique("notpc");
    let proxy = Proxy::start_sharded(|c| {
        map(c, &name);
        c.two_phase.enabled = false;
    })
    .await;
    let client = proxy.connect().await;
    table(&client, &name, "").await;
    client.batch_execute("BEGIN").await.expect("begin");
    let mut refused = None;
    for id in 1..=10 {
        if let Err(e) = client
            .batch_execute(&format!("INSERT INTO {name} (id, v) VALUES ({id}, 'a')"))
            .await
        {
            refused = Some(e);
            break;
        }
    }
    let err = refused.expect("a second shard in one transaction is refused");
    assert_eq!(sqlstate(&err), Some("0A000"), "{err}");
    client.batch_execute("ROLLBACK").await.expect("rollback");
    let values: Vec<String> = (1..=20).map(|i| format!("({i}, 'v')")).collect();
    let err = client
        .batch_execute(&format!(
            "INSERT INTO {name} (id, v) VALUES {}",
            values.join(", ")
        ))
        .await
        .expect_err("split insert");
    assert_eq!(sqlstate(&err), Some("0A000"), "{err}");
}

/// The `tessera` binary serving `config` (written to `dir`), with extra environment.
fn serve(dir: &std::path::Path, config: &Config, env: &[(&str, &str)]) -> Child {
    let path = dir.join("map.yaml");
    std::fs::write(&path, yaml_serde::to_string(config).expect("yaml")).expect("write map");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.args(["serve", "--config"])
        .arg(&path)
        .env_remove("TESSERA_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("tessera serve")
}

async fn connect_retry(conninfo: &str) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match common::connect(conninfo).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("proxy did not come up: {e}"),
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A proxy killed at `failpoint` during a two-phase commit; the next start finishes the
/// transaction: committed everywhere if the decision was logged, else rolled back everywhere.
async fn killed_between_phases(failpoint: &str, committed: bool) {
    let name = unique("crash");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = common::sharded_config();
    map(&mut config, &name);
    config.node_id = 1000 + u16::from(committed);
    config.two_phase.log = dir.path().join("decisions.log");
    let port = free_port();
    config.listen = format!("127.0.0.1:{port}");
    let conninfo = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");

    let mut first = serve(dir.path(), &config, &[("TESSERA_FAILPOINT", failpoint)]);
    let client = connect_retry(&conninfo).await;
    table(&client, &name, "").await;
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!(
            "INSERT INTO {name} (id, v) VALUES (1, 'a'), (2, 'b'), (3, 'c'), (4, 'd'), (5, 'e')"
        ))
        .await
        .expect("split insert in a transaction");
    let result = client.batch_execute("COMMIT").await;
    assert!(result.is_err(), "the proxy died during COMMIT");
    let status = first.wait().expect("first proxy exits");
    assert!(!status.success());
    let node = config.node_id;
    let in_doubt: Vec<String> = prepared_xacts()
        .await
        .into_iter()
        .filter(|g| tessera::twopc::gid_node(g) == Some(node))
        .collect();
    assert_eq!(in_doubt.len(), 2, "prepared on both shards: {in_doubt:?}");
    assert!(ids_on_shards(&name).await.iter().all(BTreeSet::is_empty));

    let mut second = serve(dir.path(), &config, &[]);
    let client = connect_retry(&conninfo).await;
    let left: Vec<String> = prepared_xacts()
        .await
        .into_iter()
        .filter(|g| tessera::twopc::gid_node(g) == Some(node))
        .collect();
    assert!(left.is_empty(), "recovered at start: {left:?}");
    let total: usize = ids_on_shards(&name).await.iter().map(BTreeSet::len).sum();
    assert_eq!(total, if committed { 5 } else { 0 });
    let rows = client
        .query(&format!("SELECT count(*) FROM {name}"), &[])
        .await
        .expect("query after recovery");
    assert_eq!(rows[0].get::<_, i64>(0), if committed { 5 } else { 0 });
    let _ = second.kill();
    let _ = second.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_after_the_decision_commits_at_its_next_start() {
    killed_between_phases("after-decision", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_before_the_decision_rolls_back_at_its_next_start() {
    killed_between_phases("after-prepare", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_ids_are_unique_across_proxies_in_both_protocols() {
    let a = Proxy::start_sharded(|c| c.node_id = 11).await;
    let b = Proxy::start_sharded(|c| c.node_id = 12).await;
    let mut seen = BTreeSet::new();
    for (proxy, node) in [(&a, 11u16), (&b, 12)] {
        let client = proxy.connect().await;
        // Simple protocol (text).
        for m in client
            .simple_query("SELECT tessera_next_id()")
            .await
            .expect("simple")
        {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = m {
                assert_eq!(row.columns()[0].name(), "tessera_next_id");
                let id: i64 = row.get(0).expect("value").parse().expect("bigint");
                assert_eq!(tessera::ids::node_of(id), node);
                assert!(seen.insert(id));
            }
        }
        // Extended protocol (binary), a prepared statement reused, and an alias.
        let stmt = client
            .prepare("select tessera_next_id() as id")
            .await
            .expect("prepare");
        assert_eq!(stmt.columns()[0].name(), "id");
        for _ in 0..200 {
            let id: i64 = client.query_one(&stmt, &[]).await.expect("run").get(0);
            assert_eq!(tessera::ids::node_of(id), node);
            assert!(seen.insert(id), "duplicate id {id}");
        }
        // A later ordinary statement on the same session still reaches a server.
        let one: i32 = client
            .query_one("SELECT 1", &[])
            .await
            .expect("ordinary statement")
            .get(0);
        assert_eq!(one, 1);
        // Usable as a key before the shard is known.
        let id: i64 = client
            .query_one("SELECT tessera_next_id()", &[])
            .await
            .expect("unnamed")
            .get(0);
        assert!(id > 0);
    }
    assert_eq!(seen.len(), 402);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merge_over_its_row_cap_fails_with_54000() {
    let name = unique("cap");
    let proxy = Proxy::start_sharded(|c| {
        map(c, &name);
        c.limits.max_merge_rows = 50;
    })
    .await;
    let client = proxy.connect().await;
    table(&client, &name, "").await;
    let values: Vec<String> = (1..=200).map(|i| format!("({i}, 'v{i}')")).collect();
    client
        .batch_execute(&format!(
            "INSERT INTO {name} (id, v) VALUES {}",
            values.join(", ")
        ))
        .await
        .expect("load");
    let err = client
        .query(&format!("SELECT v, count(*) FROM {name} GROUP BY v"), &[])
        .await
        .expect_err("200 groups over a cap of 50");
    assert_eq!(sqlstate(&err), Some("54000"), "{err}");
    // Streaming merges hold a few rows per shard, whatever the cap.
    let rows = client
        .query(&format!("SELECT id FROM {name} ORDER BY id"), &[])
        .await
        .expect("ordered scan");
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, (1..=200).collect::<Vec<_>>());
}

async fn copy_in(
    client: &tokio_postgres::Client,
    sql: &str,
    data: &str,
) -> Result<u64, tokio_postgres::Error> {
    use futures::SinkExt;
    let sink = client.copy_in(sql).await?;
    futures::pin_mut!(sink);
    // Several messages, cut mid-row, as a client streaming a file would send them.
    for chunk in data.as_bytes().chunks(37) {
        sink.send(bytes::Bytes::copy_from_slice(chunk)).await?;
    }
    sink.finish().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_from_stdin_splits_rows_by_shard() {
    let name = unique("copy");
    let reference = unique("copyref");
    let proxy = Proxy::start_sharded(|c| {
        map(c, &name);
        c.sharding.reference_tables.push(reference.clone());
    })
    .await;
    let client = proxy.connect().await;
    table(&client, &name, "").await;
    client
        .batch_execute(&format!(
            "CREATE TABLE {reference} (code text PRIMARY KEY, label text)"
        ))
        .await
        .expect("reference DDL");

    // Text format, with escapes in the data.
    let text: String = (1..=300).map(|i| format!("{i}\tline\\t{i}\\n\n")).collect();
    let n = copy_in(&client, &format!("COPY {name} (id, v) FROM STDIN"), &text)
        .await
        .expect("text copy");
    assert_eq!(n, 300);
    // CSV with a header, quoted delimiters and a quoted newline; key not the first column.
    let mut csv = String::from("v,id\n");
    for i in 301..=400 {
        csv.push_str(&format!("\"a,\"\"b\"\"\nc{i}\",{i}\n"));
    }
    let n = copy_in(
        &client,
        &format!("COPY {name} (v, id) FROM STDIN WITH (FORMAT csv, HEADER true)"),
        &csv,
    )
    .await
    .expect("csv copy");
    assert_eq!(n, 100);
    let config = config_for(&name);
    let all: Vec<i64> = (1..=400).collect();
    assert_eq!(ids_on_shards(&name).await, placement(&config, &name, &all));
    let row = client
        .query_one(&format!("SELECT v FROM {name} WHERE id = 350"), &[])
        .await
        .expect("csv row");
    assert_eq!(row.get::<_, String>(0), "a,\"b\"\nc350");
    let row = client
        .query_one(&format!("SELECT v FROM {name} WHERE id = 7"), &[])
        .await
        .expect("text row");
    assert_eq!(row.get::<_, String>(0), "line\t7\n");

    // A bad row anywhere: nothing of that COPY lands on any shard.
    let bad: String = (401..=450)
        .map(|i| format!("{i}\tok\n"))
        .chain(std::iter::once("3\tduplicate\n".to_string()))
        .collect();
    let err = copy_in(&client, &format!("COPY {name} (id, v) FROM STDIN"), &bad)
        .await
        .expect_err("duplicate key");
    assert_eq!(sqlstate(&err), Some("23505"), "{err}");
    let err = copy_in(
        &client,
        &format!("COPY {name} (id, v) FROM STDIN"),
        "\\N\tnull key\n",
    )
    .await
    .expect_err("null key");
    assert_eq!(sqlstate(&err), Some("23502"), "{err}");
    let total: usize = ids_on_shards(&name).await.iter().map(BTreeSet::len).sum();
    assert_eq!(total, 400);

    // COPY TO STDOUT: every shard's rows, one stream.
    use futures::TryStreamExt;
    let stream = client
        .copy_out(&format!("COPY {name} (id) TO STDOUT"))
        .await
        .expect("copy out");
    let chunks: Vec<bytes::Bytes> = stream.try_collect().await.expect("copy data");
    let text: String = chunks
        .iter()
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    let mut ids: Vec<i64> = text.lines().map(|l| l.parse().expect("id")).collect();
    ids.sort_unstable();
    assert_eq!(ids, all);

    // A table copied on every shard gets every row everywhere.
    let n = copy_in(
        &client,
        &format!("COPY {reference} FROM STDIN"),
        "de\tGermany\nfr\tFrance\n",
    )
    .await
    .expect("reference copy");
    assert_eq!(n, 2);
    for shard in 0..2 {
        let direct = common::connect_primary(shard).await;
        let n: i64 = direct
            .query_one(&format!("SELECT count(*) FROM {reference}"), &[])
            .await
            .expect("direct count")
            .get(0);
        assert_eq!(n, 2, "shard {shard}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_rows_of_a_split_insert_come_back_in_values_order() {
    let name = unique("order");
    let proxy = Proxy::start_sharded(|c| map(c, &name)).await;
    let client = proxy.connect().await;
    table(&client, &name, "").await;
    // A shuffled order that alternates between the shards.
    let ids: Vec<i64> = vec![17, 3, 42, 8, 25, 1, 99, 64, 12, 5, 77, 30];
    let values: Vec<String> = ids.iter().map(|i| format!("({i}, 'v')")).collect();
    let sql = format!(
        "INSERT INTO {name} (id, v) VALUES {} RETURNING id",
        values.join(", ")
    );
    let simple: Vec<i64> = client
        .simple_query(&sql)
        .await
        .expect("simple")
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .collect();
    assert_eq!(simple, ids);
    client
        .batch_execute(&format!("DELETE FROM {name}"))
        .await
        .expect("delete");
    let placeholders: Vec<String> = (1..=ids.len()).map(|k| format!("(${k}, 'w')")).collect();
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = ids
        .iter()
        .map(|i| i as &(dyn tokio_postgres::types::ToSql + Sync))
        .collect();
    let extended: Vec<i64> = client
        .query(
            &format!(
                "INSERT INTO {name} (id, v) VALUES {} RETURNING id",
                placeholders.join(", ")
            ),
            &params,
        )
        .await
        .expect("extended")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(extended, ids);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_across_shards_end_cleanly_in_every_protocol() {
    let name = unique("txend");
    let proxy = Proxy::start_sharded(|c| map(c, &name)).await;
    let client = proxy.connect().await;
    table(
        &client,
        &name,
        ", x int UNIQUE DEFERRABLE INITIALLY DEFERRED",
    )
    .await;
    let values: Vec<String> = (1..=20).map(|i| format!("({i}, 'v', {i})")).collect();
    client
        .batch_execute(&format!(
            "INSERT INTO {name} (id, v, x) VALUES {}",
            values.join(", ")
        ))
        .await
        .expect("load");
    let node = proxy.handle.shared.config.node_id;
    let config = config_for(&name);
    let placed = placement(&config, &name, &(1..=20).collect::<Vec<_>>());
    let (a, b) = (
        *placed[0].iter().next().expect("shard 0 key"),
        *placed[1].iter().next().expect("shard 1 key"),
    );

    // COMMIT through the extended protocol (as JDBC sends it) uses two-phase commit too: a
    // deferred violation on shard 0 fails PREPARE there and nothing lands on either shard.
    let a2 = *placed[0].iter().nth(1).expect("a second shard 0 key");
    client.execute("BEGIN", &[]).await.expect("begin");
    client
        .execute(&format!("UPDATE {name} SET v = 'x' WHERE id = {b}"), &[])
        .await
        .expect("write shard 1");
    client
        .execute(&format!("UPDATE {name} SET x = {a2} WHERE id = {a}"), &[])
        .await
        .expect("deferred duplicate on shard 0");
    let err = client
        .execute("COMMIT", &[])
        .await
        .expect_err("PREPARE fails on shard 0");
    assert_eq!(sqlstate(&err), Some("23505"), "{err}");
    let v: String = client
        .query_one(&format!("SELECT v FROM {name} WHERE id = {b}"), &[])
        .await
        .expect("read")
        .get(0);
    assert_eq!(v, "v", "nothing landed");
    // A plain successful one through the extended protocol.
    client.execute("BEGIN", &[]).await.expect("begin");
    client
        .execute(&format!("UPDATE {name} SET v = 'y' WHERE id = {a}"), &[])
        .await
        .expect("write shard 0");
    client
        .execute(&format!("UPDATE {name} SET v = 'y' WHERE id = {b}"), &[])
        .await
        .expect("write shard 1");
    client
        .execute("COMMIT", &[])
        .await
        .expect("extended commit");
    let n: i64 = client
        .query_one(&format!("SELECT count(*) FROM {name} WHERE v = 'y'"), &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 2);
    assert!(
        !prepared_xacts()
            .await
            .iter()
            .any(|g| tessera::twopc::gid_node(g) == Some(node))
    );

    // `...; COMMIT` in one query cannot end a transaction that spans shards.
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!("UPDATE {name} SET v = 'z' WHERE id = {a}"))
        .await
        .expect("write shard 0");
    let err = client
        .batch_execute(&format!("UPDATE {name} SET v = 'z' WHERE id = {b}; COMMIT"))
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&err), Some("0A000"), "{err}");
    client.batch_execute("ROLLBACK").await.expect("rollback");

    // After COMMIT of a transaction on two shards the session is idle: pgbench checks the
    // ReadyForQuery status after each script.
    let script = format!(
        "BEGIN;\nUPDATE {name} SET v = 'p' WHERE id = {a};\nSELECT v FROM {name} WHERE id = {b};\nUPDATE {name} SET v = 'p' WHERE id = {b};\nCOMMIT;\n"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tx.sql");
    std::fs::write(&path, script).expect("script");
    for mode in ["simple", "extended", "prepared"] {
        let out = Command::new(common::bin("pgbench"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &proxy.port.to_string(),
                "-U",
                "app",
            ])
            .args(["-n", "-M", mode, "-t", "20", "-f"])
            .arg(&path)
            .arg("app")
            .env("PGPASSWORD", "app")
            .output()
            .expect("pgbench");
        let stdout = common::text(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("number of failed transactions: 0 "),
            "{mode}: {stdout}\n{}",
            common::text(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_with_a_header_has_one_header() {
    let name = unique("hdr");
    let proxy = Proxy::start_sharded(|c| map(c, &name)).await;
    let client = proxy.connect().await;
    table(&client, &name, "").await;
    let values: Vec<String> = (1..=30).map(|i| format!("({i}, 'v{i}')")).collect();
    client
        .batch_execute(&format!(
            "INSERT INTO {name} (id, v) VALUES {}",
            values.join(", ")
        ))
        .await
        .expect("load");
    let out = proxy.psql(
        &[
            "-c",
            &format!("COPY {name} (id, v) TO STDOUT WITH (FORMAT csv, HEADER true)"),
        ],
        None,
    );
    let text = common::text(&out.stdout);
    assert_eq!(text.lines().filter(|l| *l == "id,v").count(), 1, "{text}");
    assert_eq!(text.lines().next(), Some("id,v"));
    assert_eq!(text.lines().count(), 31);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_work_in_transactions_that_span_shards() {
    let name = unique("savepoint");
    let proxy = Proxy::start_sharded(|c| map(c, &name)).await;
    let client = proxy.connect().await;
    table(&client, &name, "").await;
    let config = config_for(&name);
    let placed = placement(&config, &name, &(1..=40).collect::<Vec<_>>());
    let on0: Vec<i64> = placed[0].iter().copied().collect();
    let on1: Vec<i64> = placed[1].iter().copied().collect();
    for extended in [false, true] {
        let run = |sql: String| {
            let client = &client;
            async move {
                if extended {
                    client.execute(&sql, &[]).await.map(|_| ())
                } else {
                    client.batch_execute(&sql).await
                }
            }
        };
        let k = if extended { 3 } else { 0 };
        let (a, b, c) = (on0[k], on1[k], on1[k + 1]);
        run("BEGIN".into()).await.expect("begin");
        run(format!("INSERT INTO {name} (id, v) VALUES ({a}, 'a')"))
            .await
            .expect("shard 0");
        run("SAVEPOINT s1".into()).await.expect("savepoint");
        // Shard 1 joins after the savepoint: it gets it too.
        run(format!("INSERT INTO {name} (id, v) VALUES ({b}, 'b')"))
            .await
            .expect("shard 1");
        run("ROLLBACK TO SAVEPOINT s1".into())
            .await
            .expect("rollback to");
        // An error on one shard, undone by ROLLBACK TO, as ORMs do.
        run("SAVEPOINT \"Two\"".into()).await.expect("savepoint 2");
        let err = run(format!("INSERT INTO {name} (id, v) VALUES ({a}, 'dup')"))
            .await
            .expect_err("duplicate");
        assert_eq!(sqlstate(&err), Some("23505"));
        run("ROLLBACK TO \"Two\"".into())
            .await
            .expect("rollback to after error");
        run(format!("INSERT INTO {name} (id, v) VALUES ({c}, 'c')"))
            .await
            .expect("shard 1 again");
        run("RELEASE SAVEPOINT s1".into()).await.expect("release");
        let err = run("ROLLBACK TO s1".into()).await.expect_err("released");
        assert_eq!(sqlstate(&err), Some("3B001"), "{err}");
        run("ROLLBACK".into()).await.expect("rollback");
        // Again, committed this time.
        run("BEGIN".into()).await.expect("begin");
        run(format!("INSERT INTO {name} (id, v) VALUES ({a}, 'a')"))
            .await
            .expect("shard 0");
        run("SAVEPOINT s1".into()).await.expect("savepoint");
        run(format!("INSERT INTO {name} (id, v) VALUES ({b}, 'b')"))
            .await
            .expect("shard 1");
        run("ROLLBACK TO s1".into()).await.expect("rollback to");
        run(format!("INSERT INTO {name} (id, v) VALUES ({c}, 'c')"))
            .await
            .expect("shard 1 again");
        run("COMMIT".into()).await.expect("commit");
        let held = ids_on_shards(&name).await;
        assert!(held[0].contains(&a) && held[1].contains(&c), "{held:?}");
        assert!(!held[1].contains(&b), "rolled back to before b: {held:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_failures_and_transaction_edges_across_shards() {
    let name = unique("edges");
    let proxy = Proxy::start_sharded(|c| map(c, &name)).await;
    let client = proxy.connect().await;
    table(&client, &name, "").await;
    let values: Vec<String> = (1..=20).map(|i| format!("({i}, 'v')")).collect();
    client
        .batch_execute(&format!(
            "INSERT INTO {name} (id, v) VALUES {}",
            values.join(", ")
        ))
        .await
        .expect("load");
    let config = config_for(&name);
    let placed = placement(&config, &name, &(1..=20).collect::<Vec<_>>());
    let (a, b) = (
        *placed[0].iter().next().expect("shard 0 key"),
        *placed[1].iter().next().expect("shard 1 key"),
    );
    let v = |id: i64| {
        let client = &client;
        let name = &name;
        async move {
            client
                .query_one(&format!("SELECT v FROM {name} WHERE id = {id}"), &[])
                .await
                .expect("read")
                .get::<_, String>(0)
        }
    };

    // A failing statement and COMMIT pipelined: nothing of the transaction commits.
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!("UPDATE {name} SET v = 'p1' WHERE id = {a}"))
        .await
        .expect("shard 0");
    client
        .batch_execute(&format!("UPDATE {name} SET v = 'p1' WHERE id = {b}"))
        .await
        .expect("shard 1");
    let bad = format!("UPDATE {name} SET v = (1 / 0)::text WHERE id = {a}");
    let (failed, commit) = futures::join!(client.simple_query(&bad), client.simple_query("COMMIT"));
    assert_eq!(sqlstate(&failed.expect_err("1/0")), Some("22012"));
    let _ = commit;
    assert_eq!(v(a).await, "v");
    assert_eq!(v(b).await, "v", "no shard committed");

    // A failing statement and a write on the other shard pipelined: the write gets 25P02.
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!("UPDATE {name} SET v = 'p2' WHERE id = {a}"))
        .await
        .expect("shard 0");
    let other = format!("UPDATE {name} SET v = 'p2' WHERE id = {b}");
    let (failed, after) = futures::join!(client.simple_query(&bad), client.simple_query(&other));
    assert_eq!(sqlstate(&failed.expect_err("1/0")), Some("22012"));
    assert_eq!(sqlstate(&after.expect_err("aborted")), Some("25P02"));
    client.batch_execute("ROLLBACK").await.expect("rollback");

    // An error the proxy raises, then COMMIT through the extended protocol: rolled back.
    client.execute("BEGIN", &[]).await.expect("begin");
    client
        .execute(&format!("UPDATE {name} SET v = 'p3' WHERE id = {a}"), &[])
        .await
        .expect("shard 0");
    let err = client
        .query(&format!("SELECT string_agg(v, ',') FROM {name}"), &[])
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&err), Some("0A000"));
    client.execute("COMMIT", &[]).await.expect("commit answers");
    assert_eq!(v(a).await, "v", "an aborted transaction does not commit");

    // Savepoints a single shard runs inside a multi-statement query, and pipelined with a
    // statement (pgjdbc's autosave): the proxy keeps up.
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!("UPDATE {name} SET v = 'x' WHERE id = {a}"))
        .await
        .expect("write");
    client
        .batch_execute(&format!(
            "SAVEPOINT s; UPDATE {name} SET v = 'y' WHERE id = {a}"
        ))
        .await
        .expect("multi-statement with a savepoint");
    client
        .batch_execute("ROLLBACK TO SAVEPOINT s")
        .await
        .expect("the savepoint is known");
    let update = format!("UPDATE {name} SET v = 'z' WHERE id = {a}");
    let (sp, upd) = futures::join!(
        client.execute("SAVEPOINT auto", &[]),
        client.execute(&update, &[])
    );
    sp.expect("savepoint");
    upd.expect("update");
    client
        .execute("ROLLBACK TO SAVEPOINT auto", &[])
        .await
        .expect("pipelined savepoint is known");
    client.batch_execute("COMMIT").await.expect("commit");
    assert_eq!(v(a).await, "x");

    // ROLLBACK with a comment that says "to" is a rollback.
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!("UPDATE {name} SET v = 'c' WHERE id = {a}"))
        .await
        .expect("write");
    client
        .batch_execute("ROLLBACK /* back to the start */")
        .await
        .expect("rollback");
    assert_eq!(v(a).await, "x");

    // AND CHAIN cannot keep a transaction spanning shards going: refused.
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .batch_execute(&format!("UPDATE {name} SET v = 'q' WHERE id = {a}"))
        .await
        .expect("shard 0");
    client
        .batch_execute(&format!("UPDATE {name} SET v = 'q' WHERE id = {b}"))
        .await
        .expect("shard 1");
    let err = client
        .batch_execute("COMMIT AND CHAIN")
        .await
        .expect_err("refused");
    assert_eq!(sqlstate(&err), Some("0A000"), "{err}");
    client.batch_execute("ROLLBACK").await.expect("rollback");
    assert_eq!(v(b).await, "v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_statement_query_runs_where_all_its_keys_are() {
    let name = unique("multi");
    let proxy = Proxy::start_sharded(|c| map(c, &name)).await;
    let client = proxy.connect().await;
    table(&client, &name, "").await;
    let placed = placement(&config_for(&name), &name, &(1..=20).collect::<Vec<_>>());
    let (a, a2, b) = (
        *placed[0].iter().next().expect("shard 0 key"),
        *placed[0].iter().nth(1).expect("another shard 0 key"),
        *placed[1].iter().next().expect("shard 1 key"),
    );
    client
        .batch_execute(&format!(
            "INSERT INTO {name} (id, v) VALUES ({a}, 'a'); UPDATE {name} SET v = 'b' WHERE id = {a}; INSERT INTO {name} (id, v) VALUES ({a2}, 'c'); SELECT now()"
        ))
        .await
        .expect("one shard");
    assert_eq!(ids_on_shards(&name).await[0], BTreeSet::from([a, a2]));
    let err = client
        .batch_execute(&format!(
            "UPDATE {name} SET v = 'x' WHERE id = {a}; UPDATE {name} SET v = 'x' WHERE id = {b}"
        ))
        .await
        .expect_err("two shards");
    assert_eq!(sqlstate(&err), Some("0A000"), "{err}");
    let err = client
        .batch_execute(&format!(
            "UPDATE {name} SET v = 'x' WHERE id = {a}; UPDATE {name} SET v = 'x'"
        ))
        .await
        .expect_err("every shard");
    assert_eq!(sqlstate(&err), Some("0A000"), "{err}");
}
