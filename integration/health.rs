//! Health probes against a real 1 x (primary + 2 replicas) cluster: replicas join the read
//! rotation, leave it when stopped or lagging, come back, and their replay LSN reaches a
//! primary write (read-your-writes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera::backend::health::{Health, ShardHealth};
use tessera::cluster::{ClusterSpec, LocalCluster, PgServer};
use tessera::config::LoadBalance;
use tokio_util::sync::CancellationToken;

const INTERVAL_MS: u64 = 200;
const MAX_LAG_MS: u64 = 1_000;

/// Polls `f` every 50 ms until it holds or `timeout` passes; returns whether it held.
fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn describe(shard: &ShardHealth) -> String {
    let replicas: Vec<String> = shard
        .replicas
        .iter()
        .map(|r| {
            format!(
                "{} healthy={} replay={} lag={}ms",
                r.addr,
                r.is_healthy(),
                r.replay_lsn(),
                r.lag_ms()
            )
        })
        .collect();
    format!(
        "primary healthy={} lsn={}; {}",
        shard.primary.is_healthy(),
        shard.primary.current_lsn(),
        replicas.join("; ")
    )
}

/// Every pick among `n` tries, for both policies.
fn picks(shard: &ShardHealth, min_lsn: Option<u64>, n: usize) -> Vec<Option<usize>> {
    (0..n)
        .flat_map(|_| {
            [LoadBalance::RoundRobin, LoadBalance::LeastBusy]
                .map(|policy| shard.pick_replica(policy, min_lsn))
        })
        .collect()
}

/// Runs a write on the primary with a synchronous commit and returns the WAL write position
/// after it, which then covers the commit (the cluster runs `synchronous_commit = off`, under
/// which a commit may return before its record is written).
fn write_on_primary(cluster: &LocalCluster, primary: &PgServer, sql: &str) -> u64 {
    let script = format!(
        "SET synchronous_commit = on; {sql}; \
         SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint;"
    );
    cluster
        .psql(primary, &script)
        .expect("write on the primary")
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("the write position is a number")
}

#[test]
fn replicas_follow_health_and_lag() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("tessera=info")
        .with_test_writer()
        .try_init();
    let started = Instant::now();
    let cluster = LocalCluster::start(&ClusterSpec {
        shards: 1,
        replicas: 2,
        ..Default::default()
    })
    .expect("cluster starts");
    eprintln!("cluster up in {:?}", started.elapsed());
    let servers = cluster.shards()[0].clone();
    let (primary, replica0, replica1) =
        (&servers.primary, &servers.replicas[0], &servers.replicas[1]);

    let mut config = tessera::run::demo_config(&cluster, 0);
    config.routing.health_check_interval_ms = INTERVAL_MS;
    config.routing.max_replica_lag_ms = MAX_LAG_MS;
    let config = Arc::new(config);

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let health = Health::new(&config);
    let shard = health.shard(0);
    assert!(
        shard.replicas.iter().all(|r| !r.is_healthy()),
        "replicas start untrusted"
    );
    assert_eq!(shard.pick_replica(LoadBalance::RoundRobin, None), None);
    let shutdown = CancellationToken::new();
    let tasks = {
        let _enter = runtime.enter();
        health.spawn(config.clone(), shutdown.clone())
    };

    // Both replicas join the rotation after their first probes.
    assert!(
        eventually(Duration::from_secs(5 * 3), || shard
            .replicas
            .iter()
            .all(|r| r.is_healthy())),
        "replicas never became healthy: {}",
        describe(shard)
    );
    assert!(
        eventually(Duration::from_secs(15), || health.primary_healthy(0)
            && shard.primary.current_lsn() > 0),
        "primary never probed: {}",
        describe(shard)
    );
    let got = picks(shard, None, 4);
    assert!(got.contains(&Some(0)) && got.contains(&Some(1)), "{got:?}");

    // An idle primary does not make caught-up replicas look stale, however old their last
    // replayed transaction gets.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            shard.replicas.iter().all(|r| r.is_healthy()),
            "idle cluster: {}",
            describe(shard)
        );
    }

    // A stopped replica leaves the rotation within a couple of probe intervals.
    cluster.stop_server(replica0).expect("stop replica 0");
    assert!(
        eventually(Duration::from_secs(2 * 3), || !shard.replicas[0]
            .is_healthy()),
        "stopped replica still healthy: {}",
        describe(shard)
    );
    let got = picks(shard, None, 6);
    assert!(got.iter().all(|&p| p == Some(1)), "{got:?}");

    // ... and comes back once restarted.
    cluster.start_server(replica0).expect("start replica 0");
    assert!(
        eventually(Duration::from_secs(10 * 3), || shard.replicas[0]
            .is_healthy()),
        "restarted replica not healthy: {}",
        describe(shard)
    );

    // Least busy steers away from a replica with statements in flight.
    {
        let _busy = shard.replicas[0].enter();
        let got: Vec<_> = (0..4)
            .map(|_| shard.pick_replica(LoadBalance::LeastBusy, None))
            .collect();
        assert!(got.iter().all(|&p| p == Some(1)), "{got:?}");
    }
    assert_eq!(shard.replicas[0].in_flight(), 0);

    // A paused replica that is behind accumulates lag and leaves the rotation; until then a
    // read that must see the write goes only to the replica that replayed it.
    cluster
        .psql(replica1, "SELECT pg_wal_replay_pause()")
        .expect("pause replay");
    let write_lsn = write_on_primary(
        &cluster,
        primary,
        "CREATE TABLE health_t (id int); \
         INSERT INTO health_t SELECT generate_series(1, 10000)",
    );
    assert!(
        eventually(Duration::from_secs(3 * 3), || shard.replicas[0]
            .replay_lsn()
            >= write_lsn),
        "replica 0 never replayed the write at {write_lsn}: {}",
        describe(shard)
    );
    let got = picks(shard, Some(write_lsn), 5);
    assert!(got.iter().all(|&p| p == Some(0)), "{got:?}");
    assert!(
        eventually(Duration::from_millis(MAX_LAG_MS + 3_000), || !shard
            .replicas[1]
            .is_healthy()),
        "paused replica never became unhealthy: {}",
        describe(shard)
    );
    assert!(
        shard.replicas[1].lag_ms() > MAX_LAG_MS,
        "{}",
        describe(shard)
    );
    assert!(shard.replicas[0].is_healthy(), "{}", describe(shard));
    let got = picks(shard, None, 4);
    assert!(got.iter().all(|&p| p == Some(0)), "{got:?}");

    cluster
        .psql(replica1, "SELECT pg_wal_replay_resume()")
        .expect("resume replay");
    assert!(
        eventually(Duration::from_secs(3 * 3), || shard.replicas[1]
            .is_healthy()),
        "resumed replica not healthy: {}",
        describe(shard)
    );

    // Read-your-writes: both replicas' probed replay LSN reaches a fresh write.
    let write_lsn = write_on_primary(&cluster, primary, "INSERT INTO health_t VALUES (0)");
    assert!(
        eventually(Duration::from_secs(2 * 3), || shard.primary.current_lsn()
            >= write_lsn),
        "primary probe never saw {write_lsn}: {}",
        describe(shard)
    );
    let write_lsn = shard.primary.current_lsn();
    assert!(
        eventually(Duration::from_secs(3 * 3), || shard
            .replicas
            .iter()
            .all(|r| r.replay_lsn() >= write_lsn)),
        "replicas never replayed {write_lsn}: {}",
        describe(shard)
    );
    let got = picks(shard, Some(write_lsn), 4);
    assert!(got.contains(&Some(0)) && got.contains(&Some(1)), "{got:?}");
    assert_eq!(
        shard.pick_replica(LoadBalance::RoundRobin, Some(u64::MAX)),
        None
    );

    // The primary going away is noticed too.
    cluster.stop_server(primary).expect("stop primary");
    assert!(
        eventually(Duration::from_secs(2 * 3), || !health.primary_healthy(0)),
        "stopped primary still healthy: {}",
        describe(shard)
    );

    shutdown.cancel();
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), tasks.wait())
            .await
            .expect("probe tasks stop on shutdown");
    });
    eprintln!("test done in {:?}", started.elapsed());
}
