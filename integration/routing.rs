//! Routing against a real 2-shard cluster (each shard a primary and a streaming replica):
//! placement checked on the shards themselves, the read/write split, read-your-writes, replica
//! health, and failing closed.

mod common;

use std::time::{Duration, Instant};

use common::{Proxy, unique};
use tessera::config::{Config, Range, Strategy};
use tessera::router::{Router, canonical_key};

fn sqlstate(err: &tokio_postgres::Error) -> Option<&str> {
    err.as_db_error().map(|e| e.code().code())
}

/// Direct connection to a shard's primary as the app role.
async fn shard(i: usize) -> tokio_postgres::Client {
    common::connect_primary(i).await
}

/// Creates tables on every shard through the proxy (DDL is broadcast).
async fn create_tables(client: &tokio_postgres::Client, users: &str, orders: &str) {
    client
        .batch_execute(&format!(
            "CREATE TABLE {users} (id bigint PRIMARY KEY, name text NOT NULL);
             CREATE TABLE {orders} (id bigint NOT NULL, user_id bigint NOT NULL, amount int NOT NULL)"
        ))
        .await
        .expect("DDL through the proxy");
}

fn map_tables(config: &mut Config, users: &str, orders: &str) {
    config
        .sharding
        .tables
        .insert(users.to_string(), "id".into());
    config
        .sharding
        .tables
        .insert(orders.to_string(), "user_id".into());
}

/// Waits until a read by key outside a transaction is served by a replica: the health probes
/// have run and the replica has replayed this session's writes.
async fn wait_for_replicas(client: &tokio_postgres::Client, users: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let sql = format!("SELECT pg_is_in_recovery() FROM {users} WHERE id = $1");
    for id in [1i64, 2, 3, 4] {
        loop {
            let rows = client.query(&sql, &[&id]).await.expect("probe read");
            // No row means no user with this id: the read still went somewhere; ask the
            // server directly instead.
            let on_replica = match rows.first() {
                Some(row) => row.get::<_, bool>(0),
                None => break,
            };
            if on_replica {
                break;
            }
            assert!(Instant::now() < deadline, "replicas never served reads");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_land_on_the_shard_the_map_says() {
    let (users, orders) = (unique("users"), unique("orders"));
    let proxy = Proxy::start_sharded(|c| {
        map_tables(c, &users, &orders);
        c.pool.size = 4;
    })
    .await;
    let config = common::sharded_config();
    let mut config_for_router = config.clone();
    map_tables(&mut config_for_router, &users, &orders);
    let router = Router::new(&config_for_router).expect("router");

    let client = proxy.connect().await;
    create_tables(&client, &users, &orders).await;
    // Parameterized inserts (tokio-postgres sends binary int8), then text literals in
    // multi-row INSERTs that stay within one user, and simple-protocol inserts.
    let insert_user = client
        .prepare(&format!("INSERT INTO {users} (id, name) VALUES ($1, $2)"))
        .await
        .expect("prepare");
    for id in 1..=2000i64 {
        match id % 3 {
            0 => {
                client
                    .execute(&insert_user, &[&id, &format!("user {id}")])
                    .await
                    .expect("insert user");
            }
            1 => {
                client
                    .batch_execute(&format!(
                        "INSERT INTO {users} (name, id) VALUES ('user {id}', '{id}')"
                    ))
                    .await
                    .expect("simple insert");
            }
            _ => {
                client
                    .execute(
                        &format!("INSERT INTO {users} (id, name) VALUES ($1::text::bigint, $2)"),
                        &[&id.to_string(), &format!("user {id}")],
                    )
                    .await
                    .expect("text param insert");
            }
        }
        let orders_sql = format!(
            "INSERT INTO {orders} (id, user_id, amount) VALUES ({o1}, {id}, 10), ({o2}, {id}, 20)",
            o1 = id * 10,
            o2 = id * 10 + 1
        );
        client
            .batch_execute(&orders_sql)
            .await
            .expect("multi-row insert for one user");
    }

    let mut counts = [0i64; 2];
    for (s, count) in counts.iter_mut().enumerate() {
        let direct = shard(s).await;
        let rows = direct
            .query(&format!("SELECT u.id, (SELECT count(*) FROM {orders} o WHERE o.user_id = u.id) FROM {users} u"), &[])
            .await
            .expect("read shard");
        *count = rows.len() as i64;
        for row in rows {
            let id: i64 = row.get(0);
            let n: i64 = row.get(1);
            let expected = router
                .shard_of(&canonical_key(&id.to_string()), &users)
                .expect("shard");
            assert_eq!(expected, s, "user {id} on shard {s}, map says {expected}");
            assert_eq!(n, 2, "user {id}'s orders are not with it on shard {s}");
        }
        let stray: i64 = direct
            .query_one(&format!("SELECT count(*) FROM {orders} o WHERE NOT EXISTS (SELECT 1 FROM {users} u WHERE u.id = o.user_id)"), &[])
            .await
            .expect("orphans")
            .get(0);
        assert_eq!(stray, 0, "orders without their user on shard {s}");
    }
    assert_eq!(counts[0] + counts[1], 2000, "every user exactly once");
    for c in counts {
        let share = c as f64 / 2000.0;
        assert!(
            (0.35..=0.65).contains(&share),
            "unbalanced shares: {counts:?}"
        );
    }

    // Reads by key find every row through the proxy, in every wire form.
    let by_id = client
        .prepare(&format!("SELECT name FROM {users} WHERE id = $1"))
        .await
        .expect("prepare");
    for id in [1i64, 2, 777, 1999, 2000] {
        let row = client.query_one(&by_id, &[&id]).await.expect("binary key");
        assert_eq!(row.get::<_, String>(0), format!("user {id}"));
        let rows = client
            .simple_query(&format!("SELECT name FROM {users} WHERE id = '{id}'"))
            .await
            .expect("text key");
        let n = rows
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        assert_eq!(n, 1, "text key");
    }
    // A scatter without a key concatenates rows and sums counts.
    let n = client
        .query(
            &format!("SELECT id FROM {users} WHERE name LIKE 'user 1%'"),
            &[],
        )
        .await
        .expect("scatter")
        .len();
    assert_eq!(n, 1111);
    let updated = client
        .execute(
            &format!("UPDATE {users} SET name = name || '!' WHERE id IN (1, 2, 3, 4, 5)"),
            &[],
        )
        .await
        .expect("update across shards outside a transaction");
    assert_eq!(updated, 5);
    let ids: Vec<i64> = (1..=10).collect();
    let rows = client
        .query(
            &format!("SELECT id FROM {users} WHERE id = ANY($1)"),
            &[&ids],
        )
        .await
        .expect("any array");
    assert_eq!(rows.len(), 10);
}

#[tokio::test(flavor = "multi_thread")]
async fn range_placement_is_exact_and_fails_closed() {
    let (users, orders) = (unique("rusers"), unique("rorders"));
    let proxy = Proxy::start_sharded(|c| {
        map_tables(c, &users, &orders);
        c.sharding.strategy = Strategy::Range;
        c.shards[0].range = Some(Range {
            from: Some(0),
            to: Some(1000),
        });
        c.shards[1].range = Some(Range {
            from: Some(1000),
            to: Some(2000),
        });
    })
    .await;
    let client = proxy.connect().await;
    create_tables(&client, &users, &orders).await;
    let insert = client
        .prepare(&format!("INSERT INTO {users} (id, name) VALUES ($1, 'x')"))
        .await
        .expect("prepare");
    for id in [0i64, 1, 999, 1000, 1500, 1999] {
        client
            .execute(&insert, &[&id])
            .await
            .expect("insert in range");
    }
    let s0: Vec<i64> = shard(0)
        .await
        .query(&format!("SELECT id FROM {users} ORDER BY id"), &[])
        .await
        .expect("s0")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let s1: Vec<i64> = shard(1)
        .await
        .query(&format!("SELECT id FROM {users} ORDER BY id"), &[])
        .await
        .expect("s1")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(s0, vec![0, 1, 999]);
    assert_eq!(s1, vec![1000, 1500, 1999]);
    for id in [-1i64, 2000, 5000] {
        let err = client
            .execute(&insert, &[&id])
            .await
            .expect_err("outside every range");
        assert_eq!(sqlstate(&err), Some("22023"), "{err:?}");
        let msg = err
            .as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        assert!(
            msg.contains(&id.to_string()) && msg.contains(&users),
            "{msg}"
        );
    }
    // The connection is still usable.
    let n: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {users} WHERE id = 1500"),
            &[],
        )
        .await
        .expect("usable")
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn unsupported_shapes_fail_closed_with_0a000() {
    let (users, orders) = (unique("fusers"), unique("forders"));
    let proxy = Proxy::start_sharded(|c| map_tables(c, &users, &orders)).await;
    let client = proxy.connect().await;
    create_tables(&client, &users, &orders).await;
    for (id, name) in [(1i64, "a"), (2, "b")] {
        client
            .execute(
                &format!("INSERT INTO {users} (id, name) VALUES ($1, $2)"),
                &[&id, &name],
            )
            .await
            .expect("insert");
    }
    // Statements of one query on different shards cannot run as one implicit transaction.
    let err = client
        .batch_execute(&format!("INSERT INTO {users} (id, name) VALUES (1, 'a'); INSERT INTO {users} (id, name) VALUES (2, 'b')"))
        .await
        .expect_err("multi-statement across shards");
    assert_eq!(sqlstate(&err), Some("0A000"));
    for sql in [
        format!("SELECT count(*) + 1 FROM {users}"),
        format!("SELECT string_agg(name, ',') FROM {users}"),
        format!("SELECT DISTINCT ON (name) * FROM {users}"),
        format!("SELECT row_number() OVER (ORDER BY id) FROM {users}"),
        format!("SELECT * FROM {users} u JOIN {orders} o ON o.id = u.id"),
        format!("INSERT INTO {users} VALUES (9, 'no column list')"),
        format!("UPDATE {users} SET id = 5 WHERE id = 1"),
        format!("SELECT * FROM {users} WHERE id IN (SELECT user_id FROM {orders})"),
        format!("SELECT * FROM {users} WHERE id = 1 FOR NO KEY UPDATE"),
    ] {
        let err = client.query(&sql, &[]).await.expect_err(&sql);
        let code = sqlstate(&err).unwrap_or("none").to_string();
        assert!(code == "0A000", "{sql}: {code} {err:?}");
        let msg = err
            .as_db_error()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        assert!(msg.contains("not supported"), "{sql}: {msg}");
    }
    // A write on a second shard inside a transaction joins it (two-phase commit at COMMIT);
    // ROLLBACK undoes the writes on both shards.
    client.batch_execute("BEGIN").await.expect("begin");
    client
        .execute(&format!("UPDATE {users} SET name = 'z' WHERE id = 1"), &[])
        .await
        .expect("first shard write");
    let n = client
        .execute(&format!("UPDATE {users} SET name = 'z'"), &[])
        .await
        .expect("second shard write");
    assert_eq!(n, 2);
    client.batch_execute("ROLLBACK").await.expect("rollback");
    let row = client
        .query_one(&format!("SELECT name FROM {users} WHERE id = 1"), &[])
        .await
        .expect("after rollback");
    assert_eq!(
        row.get::<_, String>(0),
        "a",
        "the aborted transaction's write leaked"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_go_to_replicas_outside_transactions_and_primaries_inside() {
    let (users, orders) = (unique("rwusers"), unique("rworders"));
    let proxy = Proxy::start_sharded(|c| map_tables(c, &users, &orders)).await;
    let client = proxy.connect().await;
    create_tables(&client, &users, &orders).await;
    client
        .execute(
            &format!("INSERT INTO {users} (id, name) VALUES ($1, 'a')"),
            &[&1i64],
        )
        .await
        .expect("insert");
    wait_for_replicas(&client, &users).await;
    let sql = format!("SELECT pg_is_in_recovery() FROM {users} WHERE id = $1");
    let row = client
        .query_one(&sql, &[&1i64])
        .await
        .expect("read outside tx");
    assert!(
        row.get::<_, bool>(0),
        "a plain read outside a transaction should use a replica"
    );
    // The hint forces the primary.
    let row = client
        .query_one(&format!("/* tessera: primary */ {sql}"), &[&1i64])
        .await
        .expect("hinted");
    assert!(!row.get::<_, bool>(0));
    // Locking reads and writing functions go to the primary.
    let row = client
        .query_one(&format!("{sql} FOR UPDATE"), &[&1i64])
        .await
        .expect("locking read");
    assert!(!row.get::<_, bool>(0));

    client.batch_execute("BEGIN").await.expect("begin");
    let row = client
        .query_one(&sql, &[&1i64])
        .await
        .expect("read inside tx");
    assert!(
        !row.get::<_, bool>(0),
        "reads in a read-write transaction use the primary"
    );
    client
        .execute(
            &format!("INSERT INTO {users} (id, name) VALUES ($1, 'b')"),
            &[&2i64],
        )
        .await
        .expect("write in tx");
    let row = client
        .query_one(&format!("SELECT name FROM {users} WHERE id = $1"), &[&2i64])
        .await
        .expect("read own write in tx");
    assert_eq!(row.get::<_, String>(0), "b");
    client.batch_execute("COMMIT").await.expect("commit");

    // This session wrote; its reads use replicas again once they have replayed the write.
    wait_for_replicas(&client, &users).await;
    client
        .batch_execute("BEGIN READ ONLY")
        .await
        .expect("begin ro");
    let row = client
        .query_one(&sql, &[&1i64])
        .await
        .expect("read in read-only tx");
    assert!(
        row.get::<_, bool>(0),
        "a READ ONLY transaction may use a replica"
    );
    client.batch_execute("COMMIT").await.expect("commit ro");
}

#[tokio::test(flavor = "multi_thread")]
async fn committed_writes_are_readable_even_when_replicas_lag() {
    let (users, orders) = (unique("ryw_users"), unique("ryw_orders"));
    let proxy = Proxy::start_sharded(|c| {
        map_tables(c, &users, &orders);
        // Keep lagging replicas in rotation: only read-your-writes protects the reads here.
        c.routing.max_replica_lag_ms = 600_000;
    })
    .await;
    let client = proxy.connect().await;
    create_tables(&client, &users, &orders).await;
    for id in 1..=4i64 {
        client
            .execute(
                &format!("INSERT INTO {users} (id, name) VALUES ($1, 'seed')"),
                &[&id],
            )
            .await
            .expect("seed");
    }
    wait_for_replicas(&client, &users).await;
    let replicas: Vec<_> =
        common::with_cluster(|c| c.shards().iter().map(|s| s.replicas[0].clone()).collect());
    for r in &replicas {
        common::with_cluster(|c| c.psql(r, "SELECT pg_wal_replay_pause()")).expect("pause replay");
    }
    let result = async {
        for id in 100..120i64 {
            client
                .execute(
                    &format!("INSERT INTO {users} (id, name) VALUES ($1, 'fresh')"),
                    &[&id],
                )
                .await
                .expect("insert");
            let rows = client
                .query(&format!("SELECT name FROM {users} WHERE id = $1"), &[&id])
                .await
                .expect("read back");
            assert_eq!(
                rows.len(),
                1,
                "a committed write was not visible to the same session"
            );
        }
    }
    .await;
    for r in &replicas {
        common::with_cluster(|c| c.psql(r, "SELECT pg_wal_replay_resume()"))
            .expect("resume replay");
    }
    result
}

#[tokio::test(flavor = "multi_thread")]
async fn the_demo_map_routes_and_the_route_command_explains() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "route",
            "--config",
            "shard-map.yaml",
            "SELECT * FROM users WHERE id = 42",
        ])
        .output()
        .expect("tessera route");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("shard"), "{stdout}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "route",
            "--config",
            "shard-map.yaml",
            "SELECT name FROM users ORDER BY id LIMIT 5",
        ])
        .output()
        .expect("tessera route");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("merged") && stdout.contains("LIMIT 5"),
        "{stdout}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "route",
            "--config",
            "shard-map.yaml",
            "SELECT count(*) + 1 FROM users",
        ])
        .output()
        .expect("tessera route");
    assert!(String::from_utf8_lossy(&out.stdout).contains("0A000"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["check", "--config", "shard-map.yaml"])
        .output()
        .expect("tessera check");
    assert!(String::from_utf8_lossy(&out.stdout).contains("% of the ring"));
}
