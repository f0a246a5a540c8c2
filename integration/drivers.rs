//! Real Python drivers (asyncpg, psycopg 3 with its pipeline mode) through the proxy: each script
//! in `integration/drivers/` runs its workload on Postgres directly and through Tessera, and
//! fails on any difference in rows, errors (SQLSTATE and message) or final table contents.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Proxy, unique};

/// The scripts time out each case themselves; this only stops a script that stopped entirely.
const SCRIPT_DEADLINE: Duration = Duration::from_secs(240);

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("integration/drivers")
        .join(name)
}

/// What a script run left behind.
struct Run {
    success: bool,
    stdout: String,
    stderr: String,
}

/// Runs python3 on `script` with `args`. Panics when python3 cannot run at all: a missing
/// interpreter must fail the test, not skip it.
fn python(script: &Path, args: &[String]) -> Run {
    let out_dir = tempfile::tempdir().expect("temp dir for the script's output");
    let stdout_path = out_dir.path().join("stdout");
    let stderr_path = out_dir.path().join("stderr");
    let file = |p: &Path| std::fs::File::create(p).expect("output file");
    // Output goes to files, not pipes: a chatty script cannot block on a full pipe while the
    // test waits for it to exit.
    let spawned = Command::new("python3")
        .arg(script)
        .args(args)
        .env("PYTHONUNBUFFERED", "1")
        // No __pycache__ in the source tree.
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(file(&stdout_path))
        .stderr(file(&stderr_path))
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot run python3 ({e}): the driver tests need python3 with asyncpg and psycopg \
             (`python3 -m pip install asyncpg 'psycopg[binary]'`)"
        ),
    };
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for python3") {
            break Some(status);
        }
        if started.elapsed() > SCRIPT_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let mut run = Run {
        success: status.is_some_and(|s| s.success()),
        stdout: read(&stdout_path),
        stderr: read(&stderr_path),
    };
    if status.is_none() {
        run.stderr
            .push_str(&format!("\nkilled after {} s", SCRIPT_DEADLINE.as_secs()));
    }
    run
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn check(script_name: &str, sharded: bool) {
    let path = script(script_name);
    // The table kinds the script creates (`<prefix>_p_<kind>` through the proxy), each sharded
    // by its column `k` on a sharded map. Asking the script first also checks that its driver
    // imports.
    let listed = blocking({
        let path = path.clone();
        move || python(&path, &["--tables".to_string()])
    })
    .await;
    assert!(
        listed.success,
        "{script_name} --tables failed (missing module? \
         `python3 -m pip install asyncpg 'psycopg[binary]'`):\n{}",
        listed.stderr
    );
    let prefix = unique("drv");
    // A small pool, so that the drivers' prepared statements and settings keep landing on server
    // connections that never saw them.
    let proxy = if sharded {
        Proxy::start_sharded(|c| {
            c.pool.size = 4;
            // A read on a replica may miss another session's commit for a moment, which one
            // Postgres never does; the comparison needs one server's consistency.
            c.routing.replica_reads = false;
            for kind in listed.stdout.lines() {
                c.sharding
                    .tables
                    .insert(format!("{prefix}_p_{kind}"), "k".into());
            }
        })
        .await
    } else {
        Proxy::start(|c| c.pool.size = 4).await
    };
    let direct = common::with_cluster(|c| c.shards()[0].primary.port);
    let mut args = vec![
        "--direct".to_string(),
        direct.to_string(),
        "--proxy".to_string(),
        proxy.port.to_string(),
        "--prefix".to_string(),
        prefix,
    ];
    if sharded {
        args.push("--sharded".to_string());
    }
    let started = Instant::now();
    let run = blocking(move || python(&path, &args)).await;
    proxy.shutdown().await;
    assert!(
        run.success,
        "{script_name} (sharded: {sharded}) failed: Tessera and Postgres differ, or the script \
         broke:\n--- stdout ---\n{}\n--- stderr ---\n{}",
        run.stdout, run.stderr
    );
    println!(
        "{script_name} (sharded: {sharded}) in {:.1} s:\n{}",
        started.elapsed().as_secs_f64(),
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn asyncpg_one_shard() {
    check("asyncpg_check.py", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn asyncpg_sharded() {
    check("asyncpg_check.py", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg_one_shard() {
    check("psycopg_check.py", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg_sharded() {
    check("psycopg_check.py", true).await;
}
