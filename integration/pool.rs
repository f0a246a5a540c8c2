//! The server connection pool through the proxy, against the real cluster: a checkout that waits
//! too long gets 53300, waiting clients are all served in turn, `min_idle` connections are
//! opened and `idle_timeout_ms` closes the rest.

mod common;

use std::time::{Duration, Instant};

use common::Proxy;

/// (connections, idle) of the proxy's one primary pool.
fn pool_state(proxy: &Proxy) -> (u32, u32) {
    proxy.handle.shared.shards[0].primary.state()
}

async fn until_state(proxy: &Proxy, want: (u32, u32), within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let state = pool_state(proxy);
        if state == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: pool (connections, idle) is {state:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_that_waits_too_long_gets_53300_and_the_next_one_works() {
    let proxy = Proxy::start(|c| {
        c.pool.size = 1;
        c.pool.checkout_timeout_ms = 300;
    })
    .await;
    let holder = proxy.connect().await;
    holder
        .batch_execute("BEGIN; SELECT 1")
        .await
        .expect("begin");
    let waiter = proxy.connect().await;
    let started = Instant::now();
    let err = waiter
        .simple_query("SELECT 1")
        .await
        .expect_err("the only connection is in a transaction");
    let waited = started.elapsed();
    let db = err.as_db_error().expect("a server-style error");
    assert_eq!(db.code().code(), "53300", "{db:?}");
    assert!(db.message().contains("300 ms"), "{}", db.message());
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "waited {waited:?} for a 300 ms checkout timeout"
    );
    holder.batch_execute("COMMIT").await.expect("commit");
    let row = waiter
        .query_one("SELECT 2::int", &[])
        .await
        .expect("the connection is free again");
    assert_eq!(row.get::<_, i32>(0), 2);
    until_state(&proxy, (1, 1), Duration::from_secs(5), "after both clients").await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_waiting_for_one_connection_are_all_served() {
    let proxy = Proxy::start(|c| {
        c.pool.size = 1;
        c.pool.checkout_timeout_ms = 10_000;
    })
    .await;
    let mut tasks = Vec::new();
    for client in 0..8i32 {
        let conninfo = proxy.conninfo();
        tasks.push(tokio::spawn(async move {
            let mut db = common::connect(&conninfo).await.expect("connect");
            for n in 0..25i32 {
                let tx = db.transaction().await.expect("begin");
                let row = tx
                    .query_one("SELECT $1::int * 1000 + $2::int", &[&client, &n])
                    .await
                    .expect("query while others wait");
                assert_eq!(row.get::<_, i32>(0), client * 1000 + n);
                tx.commit().await.expect("commit");
            }
        }));
    }
    for task in tasks {
        task.await.expect("no client failed or starved");
    }
    until_state(&proxy, (1, 1), Duration::from_secs(5), "after the clients").await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_idle_connections_open_and_idle_ones_close() {
    let proxy = Proxy::start(|c| {
        c.pool.size = 4;
        c.pool.min_idle = 2;
        c.pool.idle_timeout_ms = 300;
    })
    .await;
    until_state(
        &proxy,
        (2, 2),
        Duration::from_secs(10),
        "min_idle with no client",
    )
    .await;

    // Four transactions at once need four connections.
    let mut clients = Vec::new();
    for _ in 0..4 {
        let client = proxy.connect().await;
        client
            .batch_execute("BEGIN; SELECT 1")
            .await
            .expect("begin");
        clients.push(client);
    }
    assert_eq!(pool_state(&proxy), (4, 0));
    for client in &clients {
        client.batch_execute("COMMIT").await.expect("commit");
    }
    until_state(&proxy, (4, 4), Duration::from_secs(5), "all given back").await;
    // Idle past the timeout: closed down to min_idle, and those left still work.
    until_state(
        &proxy,
        (2, 2),
        Duration::from_secs(10),
        "after idle_timeout_ms",
    )
    .await;
    let row = clients[0]
        .query_one("SELECT 7::int", &[])
        .await
        .expect("a kept connection");
    assert_eq!(row.get::<_, i32>(0), 7);
    proxy.shutdown().await;
}
