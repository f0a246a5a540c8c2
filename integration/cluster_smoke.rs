//! Smoke test of `tessera::cluster::LocalCluster`: a 2x1 cluster starts, replicates, accepts the
//! application role over TCP with scram-sha-256, survives a replica restart, and is gone after
//! drop.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use tessera::cluster::{ClusterSpec, KEEP_ENV, LocalCluster, PgServer};

/// Polls `f` until it returns `Some` or `timeout` passes.
fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs a query as the application role over TCP with the given conninfo (password included).
fn app_query(cluster: &LocalCluster, conninfo: &str, sql: &str) -> Result<String, String> {
    let out = Command::new(cluster.bin_dir().join("psql"))
        .args(["-X", "-A", "-t", "-w", "-c", sql, "-d", conninfo])
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .output()
        .expect("run psql");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn accepts_tcp(server: &PgServer) -> bool {
    let addr: SocketAddr = server.addr().parse().expect("addr parses");
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

#[test]
fn two_by_one_cluster_smoke() {
    let started = Instant::now();
    let spec = ClusterSpec::default();
    let cluster = LocalCluster::start(&spec).expect("cluster starts");
    eprintln!(
        "cluster up in {:?} at {}",
        started.elapsed(),
        cluster.dir().display()
    );

    assert_eq!(cluster.spec(), &spec);
    assert_eq!(cluster.shards().len(), 2);
    let mut servers = Vec::new();
    for (index, shard) in cluster.shards().iter().enumerate() {
        assert_eq!(shard.replicas.len(), 1);
        let primary = &shard.primary;
        let replica = &shard.replicas[0];
        servers.push(primary.clone());
        servers.push(replica.clone());

        assert_eq!(
            cluster.psql(primary, "SELECT pg_is_in_recovery()").unwrap(),
            "f"
        );
        assert_eq!(
            cluster.psql(replica, "SELECT pg_is_in_recovery()").unwrap(),
            "t"
        );
        assert_eq!(cluster.psql(primary, "SHOW wal_level").unwrap(), "logical");
        assert_eq!(cluster.psql(primary, "SHOW lc_collate").unwrap(), "C");

        // Replication: a table created on the primary shows up on its replica.
        cluster
            .psql(
                primary,
                &format!("CREATE TABLE smoke (id int); INSERT INTO smoke VALUES ({index});"),
            )
            .unwrap();
        // Waits for the row itself: a read may find the table before the replica has
        // replayed (or shown) the commit that filled it.
        let replicated = eventually(Duration::from_secs(5), || {
            cluster
                .psql(replica, "SELECT id FROM smoke")
                .ok()
                .filter(|rows| !rows.is_empty())
        });
        assert_eq!(replicated.as_deref(), Some(index.to_string().as_str()));

        // The application role logs in over TCP with scram-sha-256 and owns the database.
        let conninfo = cluster.app_conninfo(primary);
        assert_eq!(
            conninfo,
            format!(
                "host=127.0.0.1 port={} user=app password=app dbname=app",
                primary.port
            )
        );
        let who = app_query(
            &cluster,
            &conninfo,
            "SELECT current_user || ',' || pg_catalog.pg_get_userbyid(datdba) \
             FROM pg_database WHERE datname = current_database()",
        )
        .expect("app role logs in on the primary");
        assert_eq!(who, "app,app");
        app_query(&cluster, &cluster.app_conninfo(replica), "SELECT 1")
            .expect("app role logs in on the replica");
        let wrong = format!(
            "host=127.0.0.1 port={} user=app password=nope dbname=app",
            primary.port
        );
        let err = app_query(&cluster, &wrong, "SELECT 1").expect_err("wrong password fails");
        assert!(err.contains("password authentication failed"), "{err}");
    }

    // Superuser conninfo works for tokio-postgres over the unix socket.
    let first = &cluster.shards()[0];
    let conninfo = cluster.superuser_conninfo(&first.primary);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .expect("superuser connects via tokio-postgres");
            let connection = tokio::spawn(connection);
            let row = client
                .query_one("SELECT current_user::text", &[])
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), "postgres");
            drop(client);
            let _ = connection.await;
        });

    // A stopped replica comes back on the same port and catches up.
    let replica = &first.replicas[0];
    cluster.stop_server(replica).expect("replica stops");
    assert!(!accepts_tcp(replica));
    cluster
        .psql(&first.primary, "INSERT INTO smoke VALUES (42)")
        .unwrap();
    cluster.start_server(replica).expect("replica restarts");
    let caught_up = eventually(Duration::from_secs(10), || {
        cluster
            .psql(replica, "SELECT count(*) FROM smoke WHERE id = 42")
            .ok()
            .filter(|count| count == "1")
    });
    assert!(caught_up.is_some(), "restarted replica did not catch up");

    let dir = cluster.dir().to_path_buf();
    drop(cluster);
    for server in &servers {
        assert!(
            !accepts_tcp(server),
            "{} still accepts connections",
            server.name()
        );
    }
    if std::env::var_os(KEEP_ENV).is_none() {
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }
    eprintln!("smoke test done in {:?}", started.elapsed());
}
