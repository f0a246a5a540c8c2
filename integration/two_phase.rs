//! Two-phase commit recovery against the real cluster: a proxy starting over in-doubt prepared
//! transactions commits the decided ones of its node, rolls back the undecided ones, and leaves
//! other nodes' and other tools' alone; a decision log is never shared by two proxies.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::Proxy;
use tessera::server;
use tessera::twopc::{self, DecisionLog};

/// Opens a transaction on `client` that inserts one marker row and prepares it as `gid`.
async fn prepare(client: &tokio_postgres::Client, table: &str, tag: &str, gid: &str) {
    client
        .batch_execute(&format!(
            "BEGIN; INSERT INTO {table} (tag) VALUES ('{tag}'); PREPARE TRANSACTION '{gid}'"
        ))
        .await
        .unwrap_or_else(|e| panic!("prepare {gid}: {e}"));
}

async fn prepared_gids(client: &tokio_postgres::Client) -> BTreeSet<String> {
    client
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()",
            &[],
        )
        .await
        .expect("list prepared transactions")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn tags(client: &tokio_postgres::Client, table: &str) -> Vec<String> {
    client
        .query(&format!("SELECT tag FROM {table} ORDER BY tag"), &[])
        .await
        .expect("read markers")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read decision log")
}

#[tokio::test(flavor = "multi_thread")]
async fn recovery_finishes_this_nodes_in_doubt_transactions_only() {
    const NODE: u16 = 901;
    const OTHER_NODE: u16 = 902;
    const FOREIGN: &str = "other_tool_1";
    let table = common::unique("twopc_markers");
    let setup = Proxy::start_sharded(|_| {}).await;
    setup
        .connect()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (tag text NOT NULL)"))
        .await
        .expect("DDL through the proxy");

    let boot = twopc::new_boot();
    let decided = twopc::gid(NODE, boot, 1);
    let undecided = twopc::gid(NODE, boot, 2);
    let other_node = twopc::gid(OTHER_NODE, boot, 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("2pc.log");
    {
        let log = DecisionLog::open(&log_path).expect("decision log");
        log.record_commit(&decided).expect("record decision");
        // Dropped here: the lock goes with it, as when a proxy dies.
    }

    // Every shard prepared all four, as a proxy (and another tool) dying mid-commit leaves them.
    for shard in 0..2 {
        let primary = common::connect_primary(shard).await;
        prepare(&primary, &table, "a", &decided).await;
        prepare(&primary, &table, "b", &undecided).await;
        prepare(&primary, &table, "c", &other_node).await;
        prepare(&primary, &table, "other", FOREIGN).await;
    }

    let proxy = Proxy::start_sharded(|c| {
        c.node_id = NODE;
        c.two_phase.log = log_path.clone();
    })
    .await;

    let left: BTreeSet<String> = [other_node.clone(), FOREIGN.to_string()]
        .into_iter()
        .collect();
    for shard in 0..2 {
        let primary = common::connect_primary(shard).await;
        let prepared = prepared_gids(&primary).await;
        assert!(!prepared.contains(&decided), "shard {shard}: {prepared:?}");
        assert!(
            !prepared.contains(&undecided),
            "shard {shard}: {prepared:?}"
        );
        assert!(prepared.is_superset(&left), "shard {shard}: {prepared:?}");
        // Only the decided transaction's row is visible: b was rolled back, c and other are
        // still prepared (invisible).
        assert_eq!(tags(&primary, &table).await, ["a"], "shard {shard}");
    }
    // The decision is no longer needed (committed everywhere): compaction dropped it.
    assert!(
        !log_text(&log_path).contains(&decided),
        "{}",
        log_text(&log_path)
    );

    // The running proxy holds the log and makes gids of its own node.
    let shared = &proxy.handle.shared;
    assert!(shared.decisions.is_some());
    let next = shared.new_gid();
    assert_eq!(twopc::gid_node(&next), Some(NODE), "{next}");
    assert_ne!(next, shared.new_gid());

    for shard in 0..2 {
        let primary = common::connect_primary(shard).await;
        for gid in &left {
            primary
                .batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
                .await
                .unwrap_or_else(|e| panic!("clean up {gid}: {e}"));
        }
        primary
            .batch_execute(&format!("DROP TABLE {table}"))
            .await
            .expect("drop markers");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_decision_log_is_never_shared_by_two_proxies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("2pc.log");
    let _first = Proxy::start_sharded(|c| c.two_phase.log = log_path.clone()).await;

    let mut config = common::sharded_config();
    config.node_id = common::next_node_id();
    config.two_phase.log = log_path.clone();
    let err = match server::start(Arc::new(config)).await {
        Ok(_) => panic!("a second proxy started on a locked decision log"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("locked"), "{err}");
    assert!(err.contains(&log_path.display().to_string()), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_shard_keeps_every_decision_and_startup_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("2pc.log");
    let pending = twopc::gid(903, twopc::new_boot(), 1);
    {
        let log = DecisionLog::open(&log_path).expect("decision log");
        log.record_commit(&pending).expect("record decision");
    }
    // A port nothing listens on: connection refused at once.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    let proxy = Proxy::start_sharded(|c| {
        c.node_id = 903;
        c.two_phase.log = log_path.clone();
        c.shards.push(tessera::config::Shard {
            name: "down".into(),
            primary: dead.to_string(),
            replicas: Vec::new(),
            range: None,
        });
    })
    .await;
    // That shard may still hold the transaction prepared: its decision must survive.
    assert!(
        log_text(&log_path).contains(&pending),
        "{}",
        log_text(&log_path)
    );
    assert!(proxy.handle.shared.decisions.is_some());

    // Stopping the proxy releases the log; with every shard reachable, the next start finds
    // the transaction finished everywhere and drops its decision.
    proxy.shutdown().await;
    let _proxy = Proxy::start_sharded(|c| {
        c.node_id = 903;
        c.two_phase.log = log_path.clone();
    })
    .await;
    assert!(
        !log_text(&log_path).contains(&pending),
        "{}",
        log_text(&log_path)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn disabled_two_phase_opens_no_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("never.log");
    let proxy = Proxy::start_sharded(|c| {
        c.two_phase.enabled = false;
        c.two_phase.log = log_path.clone();
    })
    .await;
    assert!(proxy.handle.shared.decisions.is_none());
    assert!(!log_path.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_proxy_finishes_its_abandoned_in_doubt_transactions() {
    const NODE: u16 = 911;
    let table = common::unique("twopc_abandoned");
    let proxy = Proxy::start_sharded(|c| {
        c.node_id = NODE;
        c.two_phase.resolve_interval_ms = 300;
    })
    .await;
    proxy
        .connect()
        .await
        .batch_execute(&format!("CREATE TABLE {table} (tag text)"))
        .await
        .expect("DDL");
    // As a session that lost its shard connection between PREPARE and the decision leaves it.
    let shard0 = common::connect_primary(0).await;
    let ours = twopc::gid(NODE, 77, 1);
    let foreign = "other_tool_abandoned";
    prepare(&shard0, &table, "ours", &ours).await;
    prepare(
        &common::connect_primary(0).await,
        &table,
        "foreign",
        foreign,
    )
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let gids = prepared_gids(&shard0).await;
        if !gids.contains(&ours) {
            assert!(gids.contains(foreign), "another tool's stays prepared");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy never finished {ours}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // Undecided: rolled back.
    assert!(tags(&shard0, &table).await.is_empty());
    shard0
        .batch_execute(&format!("ROLLBACK PREPARED '{foreign}'"))
        .await
        .expect("clean up");
}
