//! Test harness: one real local cluster per test binary, and an in-process proxy per test.

#![allow(dead_code)]

pub mod raw;

use std::process::Output;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tessera::cluster::{ClusterSpec, LocalCluster};
use tessera::config::Config;
use tessera::server::{self, Handle};

static CLUSTER: OnceLock<Mutex<Option<LocalCluster>>> = OnceLock::new();

extern "C" fn stop_cluster() {
    if let Some(lock) = CLUSTER.get() {
        let cluster = lock
            .lock()
            .map(|mut c| c.take())
            .unwrap_or_else(|e| e.into_inner().take());
        drop(cluster);
    }
}

/// The test binary's cluster (2 shards x primary + 1 replica), started on first use and torn
/// down when the test binary exits (statics are never dropped, so an atexit hook does it).
pub fn with_cluster<T>(f: impl FnOnce(&LocalCluster) -> T) -> T {
    let lock = CLUSTER.get_or_init(|| {
        let cluster = LocalCluster::start(&ClusterSpec::default()).expect("local cluster starts");
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(stop_cluster) };
        Mutex::new(Some(cluster))
    });
    let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    f(guard.as_ref().expect("cluster alive until exit"))
}

/// The proxy config for the whole test cluster (2 shards, replicas), on a free port.
pub fn sharded_config() -> Config {
    with_cluster(|c| {
        let mut config = tessera::run::demo_config(c, 0);
        config.listen = "127.0.0.1:0".into();
        config
    })
}

/// A single-shard config (the first shard's primary only, replica reads off): plain pooling,
/// where every statement behaves exactly as on one Postgres.
pub fn config() -> Config {
    let mut config = sharded_config();
    config.shards.truncate(1);
    config.routing.replica_reads = false;
    config
}

/// A proxy running inside the test's runtime.
pub struct Proxy {
    pub handle: Handle,
    pub port: u16,
    /// Holds the proxy's default decision log; removed when the proxy is dropped.
    _log_dir: tempfile::TempDir,
}

/// A node id for the next proxy: many proxies run at once in one test binary against one
/// cluster, and each must own its two-phase gids (recovery at start rolls back the undecided
/// ones of its own node). Counts 1..=1023, then wraps.
pub fn next_node_id() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed) % u32::from(tessera::config::MAX_NODE_ID);
    u16::try_from(n + 1).expect("at most 1023")
}

impl Proxy {
    /// A single-shard proxy (see [`config`]), adjusted by `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Proxy {
        Proxy::start_with(config(), tweak).await
    }

    /// A proxy over the whole sharded cluster, adjusted by `tweak`.
    pub async fn start_sharded(tweak: impl FnOnce(&mut Config)) -> Proxy {
        Proxy::start_with(sharded_config(), tweak).await
    }

    pub async fn start_with(mut config: Config, tweak: impl FnOnce(&mut Config)) -> Proxy {
        // TESSERA_LOG=debug shows the proxy's logs in test output.
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("TESSERA_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        // Harness defaults first, so a tweak can still choose its own node id or log.
        let log_dir = tempfile::Builder::new()
            .prefix("tessera-2pc-")
            .tempdir()
            .expect("decision log dir");
        config.node_id = next_node_id();
        config.two_phase.log = log_dir.path().join("2pc.log");
        tweak(&mut config);
        config.validate().expect("test config is valid");
        let handle = server::start(Arc::new(config)).await.expect("proxy starts");
        let port = handle.addr.port();
        Proxy {
            handle,
            port,
            _log_dir: log_dir,
        }
    }

    /// Stops the proxy and waits for its tasks, releasing its decision log.
    pub async fn shutdown(self) {
        self.handle.shutdown().await;
    }

    pub fn url(&self) -> String {
        format!("postgres://app:app@127.0.0.1:{}/app", self.port)
    }

    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=app password=app dbname=app",
            self.port
        )
    }

    /// A tokio-postgres client through the proxy.
    pub async fn connect(&self) -> tokio_postgres::Client {
        connect(&self.conninfo())
            .await
            .expect("connect through proxy")
    }

    /// Runs psql against the proxy with extra arguments; stdin from `input`.
    pub fn psql(&self, args: &[&str], input: Option<&str>) -> Output {
        psql(&self.url(), args, input)
    }
}

pub async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Direct connection (app role) to the first shard's primary.
pub async fn connect_primary(shard: usize) -> tokio_postgres::Client {
    let info = with_cluster(|c| c.app_conninfo(&c.shards()[shard].primary));
    connect(&info).await.expect("direct connection")
}

/// Superuser connection to a shard's primary.
pub async fn connect_superuser(shard: usize) -> tokio_postgres::Client {
    let info = with_cluster(|c| c.superuser_conninfo(&c.shards()[shard].primary));
    connect(&info).await.expect("superuser connection")
}

pub fn bin(name: &str) -> std::path::PathBuf {
    with_cluster(|c| c.bin_dir().join(name))
}

pub fn psql(url: &str, args: &[&str], input: Option<&str>) -> Output {
    use std::io::Write;
    let mut cmd = std::process::Command::new(bin("psql"));
    cmd.arg(url).arg("-X").args(args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("psql runs");
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    child.wait_with_output().expect("psql finishes")
}

pub fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// A unique name per call, so tests sharing a cluster do not collide.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub const SHORT: Duration = Duration::from_secs(10);
