//! What each subcommand does: serve, check and demo. `main.rs` only parses and reports.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tracing::info;

use crate::cli::{self, Command};
use crate::cluster::{ClusterSpec, LocalCluster};
use crate::config::{self, Config};
use crate::server;

/// How long SIGTERM waits for clients to finish before the process exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs one subcommand to completion.
///
/// # Errors
/// A one-line reason: bad config, bind failure, cluster start failure.
pub fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve { config } => {
            let config = load(&cli::config_path(config))?;
            let config = Arc::new(config);
            runtime(config.workers)?.block_on(async {
                let handle = start(&config).await?;
                serve_until_signal(handle).await
            })
        }
        Command::Check { config } => {
            let path = cli::config_path(config);
            let config = load(&path)?;
            print!("{}", summary(&path, &config));
            Ok(())
        }
        Command::Demo {
            shards,
            replicas,
            port,
        } => demo(shards, replicas, port),
        Command::Route { config, sql } => {
            let config = load(&cli::config_path(config))?;
            let router = crate::router::Router::new(&config).map_err(anyhow::Error::msg)?;
            let analysis = router.analyze(&sql);
            match router.plan_sql(
                &analysis,
                &crate::router::params::Params::none(),
                Some(&sql),
            ) {
                Ok(plan) => println!("{plan}"),
                Err(e) => println!("error {}: {e}", e.sqlstate()),
            }
            Ok(())
        }
    }
}

fn load(path: &Path) -> Result<Config> {
    Ok(Config::load(path)?)
}

/// The async runtime for `workers` threads (0 = automatic: one thread on machines with up to two
/// cores, one per core above that). One thread runs on tokio's current-thread scheduler, which
/// saves the cross-thread wake-ups that dominate a proxy's CPU time on small machines.
fn runtime(workers: usize) -> Result<tokio::runtime::Runtime> {
    let workers = match workers {
        0 => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            if cores <= 2 { 1 } else { cores }
        }
        n => n,
    };
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn start(config: &Arc<Config>) -> Result<server::Handle> {
    // Every server::Error already names what failed (the address, the decision log).
    Ok(server::start(config.clone()).await?)
}

/// Serves until SIGINT (exit now) or SIGTERM (stop accepting, let clients finish, bounded).
async fn serve_until_signal(handle: server::Handle) -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            info!("interrupted: exiting");
        }
        _ = term.recv() => {
            info!("terminated: draining clients");
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, handle.shutdown()).await;
        }
    }
    Ok(())
}

/// The text `tessera check` prints.
pub fn summary(path: &Path, config: &Config) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "{}: ok", path.display());
    let _ = writeln!(s, "listen      {}", config.listen);
    let _ = writeln!(s, "database    {}", config.database);
    let _ = writeln!(
        s,
        "users       {} ({:?})",
        config
            .users
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        config.auth_method
    );
    let _ = writeln!(
        s,
        "pool        {:?}, {} connections per server",
        config.pool.mode, config.pool.size
    );
    let _ = writeln!(s, "node_id     {}", config.node_id);
    let _ = writeln!(
        s,
        "two_phase   {}",
        if config.two_phase.enabled {
            format!("on, decision log {}", config.two_phase.log.display())
        } else {
            "off (multi-shard writes get 0A000)".to_string()
        }
    );
    let _ = writeln!(s, "strategy    {:?}", config.sharding.strategy);
    for (table, column) in &config.sharding.tables {
        let _ = writeln!(s, "sharded     {table}.{column}");
    }
    for table in &config.sharding.reference_tables {
        let _ = writeln!(s, "reference   {table}");
    }
    let shares = crate::router::Router::new(config)
        .ok()
        .and_then(|r| r.ring_shares());
    for (i, shard) in config.shards.iter().enumerate() {
        let share = shares
            .as_ref()
            .and_then(|s| s.get(i))
            .map(|f| format!(" ({:.1}% of the ring)", f * 100.0))
            .unwrap_or_default();
        let range = match shard.range {
            Some(config::Range { from, to }) => format!(
                " range [{}, {})",
                from.map_or("-inf".to_string(), |v| v.to_string()),
                to.map_or("+inf".to_string(), |v| v.to_string())
            ),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "shard {:<5} primary {} replicas [{}]{}{}",
            shard.name,
            shard.primary,
            shard.replicas.join(", "),
            range,
            share
        );
    }
    s
}

/// The map `tessera demo` serves: the shipped `shard-map.yaml` shape with the cluster's ports.
pub fn demo_config(cluster: &LocalCluster, port: u16) -> Config {
    let spec = cluster.spec();
    let mut config: Config = Config {
        listen: format!("127.0.0.1:{port}"),
        database: spec.database.clone(),
        auth_method: config::AuthMethod::ScramSha256,
        users: vec![config::User {
            name: spec.user.clone(),
            password: spec.password.clone(),
        }],
        backend: config::Backend {
            user: spec.user.clone(),
            password: spec.password.clone(),
            database: spec.database.clone(),
        },
        workers: 0,
        node_id: 0,
        pool: config::Pool::default(),
        limits: config::Limits::default(),
        routing: config::Routing::default(),
        sharding: config::Sharding::default(),
        // In the cluster's directory: the demo's decisions live and die with its servers.
        two_phase: config::TwoPhase {
            log: cluster.dir().join("tessera-2pc.log"),
            ..config::TwoPhase::default()
        },
        shards: Vec::new(),
    };
    config.sharding.tables.insert("users".into(), "id".into());
    config
        .sharding
        .tables
        .insert("orders".into(), "user_id".into());
    config.sharding.reference_tables.push("countries".into());
    config.shards = cluster
        .shards()
        .iter()
        .enumerate()
        .map(|(i, s)| config::Shard {
            name: format!("s{i}"),
            primary: s.primary.addr(),
            replicas: s.replicas.iter().map(|r| r.addr()).collect(),
            range: None,
        })
        .collect();
    config
}

/// The demo schema, created on every shard (DDL runs everywhere).
pub const DEMO_SCHEMA: &str = "
CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, country text, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id bigint NOT NULL, user_id bigint NOT NULL, amount numeric(12,2) NOT NULL, placed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (user_id, id));
";

/// Reference rows, broadcast to every shard through the proxy.
pub const DEMO_COUNTRIES: &str = "INSERT INTO countries VALUES ('fr', 'France'), ('jp', 'Japan'), ('br', 'Brazil'), ('ng', 'Nigeria')";

/// Loads the demo rows through the proxy, so each user and its orders land on their shard.
async fn load_demo_data(url: &str) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let task = tokio::spawn(conn);
    client.batch_execute(DEMO_COUNTRIES).await?;
    let user = client
        .prepare("INSERT INTO users (id, name, country) VALUES ($1, $2, $3)")
        .await?;
    let order = client
        .prepare("INSERT INTO orders (id, user_id, amount) VALUES ($1, $2, $3::text::numeric)")
        .await?;
    let countries = ["fr", "jp", "br", "ng"];
    for id in 1..=100i64 {
        let country = countries[(id % 4) as usize];
        client
            .execute(&user, &[&id, &format!("user {id}"), &country])
            .await?;
        for n in 0..5i64 {
            let amount = format!("{}.99", (id * 7 + n * 13) % 500);
            client
                .execute(&order, &[&(id * 10 + n), &id, &amount])
                .await?;
        }
    }
    drop(client);
    let _ = task.await;
    Ok(())
}

fn demo(shards: usize, replicas: usize, port: u16) -> Result<()> {
    if shards == 0 {
        anyhow::bail!("--shards must be at least 1");
    }
    let spec = ClusterSpec {
        shards,
        replicas,
        ..ClusterSpec::default()
    };
    eprintln!("starting {shards} shard(s) x (primary + {replicas} replica(s))...");
    let cluster = LocalCluster::start(&spec).context("cannot start the local cluster")?;
    let config = Arc::new(demo_config(&cluster, port));
    let url = format!(
        "postgres://{}:{}@127.0.0.1:{port}/{}",
        spec.user, spec.password, spec.database
    );
    let result = runtime(config.workers)?.block_on(async {
        let direct = |shard: &crate::cluster::ShardServers| {
            format!(
                "postgres://{}:{}@{}/{}",
                spec.user,
                spec.password,
                shard.primary.addr(),
                spec.database
            )
        };
        for shard in cluster.shards() {
            execute(&direct(shard), DEMO_SCHEMA).await.context("cannot create the demo schema")?;
        }
        let handle = start(&config).await?;
        load_demo_data(&url).await.context("cannot load demo data through the proxy")?;
        for shard in cluster.shards() {
            wait_for_replicas(&direct(shard)).await?;
        }
        println!(
            "\nTessera demo is serving on {}.\nConnect with:\n\n    psql {url}\n\nPress Ctrl-C to stop and remove the cluster.",
            config.listen
        );
        serve_until_signal(handle).await
    });
    drop(cluster);
    result
}

/// Waits until every replica of a primary has replayed all its WAL, so the demo's first reads
/// (served by replicas) see all of the sample data.
async fn wait_for_replicas(url: &str) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let task = tokio::spawn(conn);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let row = client
            .query_one(
                "SELECT coalesce(bool_and(replay_lsn >= pg_current_wal_lsn()), true) FROM pg_stat_replication",
                &[],
            )
            .await?;
        if row.get::<_, bool>(0) {
            break;
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("replicas did not catch up with {url} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(client);
    let _ = task.await;
    Ok(())
}

/// Runs a script on one connection.
async fn execute(url: &str, sql: &str) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let task = tokio::spawn(conn);
    client.batch_execute(sql).await?;
    drop(client);
    let _ = task.await;
    Ok(())
}
