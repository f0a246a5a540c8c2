//! Replica health through the proxy: a stopped replica or a lagging one leaves the read rotation
//! without client errors (beyond the one in-flight read), and both come back.

mod common;

use std::time::{Duration, Instant};

use common::{Proxy, unique};

async fn on_replica(
    client: &tokio_postgres::Client,
    sql: &str,
    id: i64,
) -> Result<bool, tokio_postgres::Error> {
    client
        .query_one(sql, &[&id])
        .await
        .map(|row| row.get::<_, bool>(0))
}

/// Polls until `want` is where the read runs, counting errors on the way.
async fn until_served(
    client: &tokio_postgres::Client,
    sql: &str,
    id: i64,
    want_replica: bool,
    what: &str,
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut errors = 0;
    loop {
        match on_replica(client, sql, id).await {
            Ok(r) if r == want_replica => return errors,
            Ok(_) => {}
            Err(_) => errors += 1,
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never happened ({errors} errors)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stopped_and_lagging_replicas_leave_the_rotation() {
    let users = unique("fo_users");
    let proxy = Proxy::start_sharded(|c| {
        c.sharding.tables.clear();
        c.sharding.tables.insert(users.clone(), "id".into());
        c.routing.health_check_interval_ms = 200;
        c.routing.max_replica_lag_ms = 1000;
    })
    .await;
    let writer = proxy.connect().await;
    writer
        .batch_execute(&format!(
            "CREATE TABLE {users} (id bigint PRIMARY KEY, v text)"
        ))
        .await
        .expect("create");
    for id in 1..=20i64 {
        writer
            .execute(
                &format!("INSERT INTO {users} (id, v) VALUES ($1, 'x')"),
                &[&id],
            )
            .await
            .expect("insert");
    }
    // A separate reader session: read-your-writes does not pin it to primaries.
    let reader = proxy.connect().await;
    let sql = format!("SELECT pg_is_in_recovery() FROM {users} WHERE id = $1");
    until_served(&reader, &sql, 1, true, "replica serves reads").await;
    // Which shard holds id 1: stop that shard's replica.
    let direct0 = common::connect_primary(0).await;
    let on_shard0: i64 = direct0
        .query_one(&format!("SELECT count(*) FROM {users} WHERE id = 1"), &[])
        .await
        .expect("locate")
        .get(0);
    let shard = if on_shard0 == 1 { 0 } else { 1 };
    let replica = common::with_cluster(|c| c.shards()[shard].replicas[0].clone());

    common::with_cluster(|c| c.stop_server(&replica)).expect("stop replica");
    let mut errors = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        if on_replica(&reader, &sql, 1).await.is_err() {
            errors += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        errors <= 1,
        "{errors} reads failed while the replica was down"
    );
    assert!(
        !on_replica(&reader, &sql, 1).await.expect("read"),
        "reads should use the primary now"
    );

    common::with_cluster(|c| c.start_server(&replica)).expect("restart replica");
    until_served(&reader, &sql, 1, true, "restarted replica back in rotation").await;

    // Lag: pause replay, keep writing; the replica falls behind and leaves the rotation.
    common::with_cluster(|c| c.psql(&replica, "SELECT pg_wal_replay_pause()")).expect("pause");
    let lagging = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut n = 1000i64;
        loop {
            for _ in 0..20 {
                n += 1;
                writer
                    .execute(
                        &format!("INSERT INTO {users} (id, v) VALUES ($1, 'lag')"),
                        &[&n],
                    )
                    .await
                    .expect("write");
            }
            if !on_replica(&reader, &sql, 1)
                .await
                .expect("read while lagging")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "a lagging replica stayed in rotation"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    lagging.await;
    common::with_cluster(|c| c.psql(&replica, "SELECT pg_wal_replay_resume()")).expect("resume");
    let errors = until_served(&reader, &sql, 1, true, "caught-up replica back in rotation").await;
    assert_eq!(errors, 0);
}
