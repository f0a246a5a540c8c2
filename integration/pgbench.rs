//! pgbench through the proxy: initialization (DDL, COPY, VACUUM) and select-only runs in the
//! simple, extended and prepared protocols, many clients over a small pool.

mod common;

use common::{Proxy, text};

fn pgbench(port: u16, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::bin("pgbench"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "app"])
        .args(args)
        .arg("app")
        .env("PGPASSWORD", "app")
        .output()
        .expect("pgbench runs")
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_runs_clean_in_every_protocol_mode() {
    let proxy = Proxy::start(|c| c.pool.size = 2).await;
    let port = proxy.port;
    let init = tokio::task::spawn_blocking(move || pgbench(port, &["-i", "-s", "1", "-q"]))
        .await
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "pgbench -i failed: {}",
        text(&init.stderr)
    );

    for mode in ["simple", "extended", "prepared"] {
        let run = tokio::task::spawn_blocking(move || {
            pgbench(
                port,
                &["-S", "-M", mode, "-c", "8", "-j", "2", "-T", "3", "-n"],
            )
        })
        .await
        .expect("pgbench -S");
        let stdout = text(&run.stdout);
        assert!(
            run.status.success(),
            "{mode}: {stdout}\n{}",
            text(&run.stderr)
        );
        assert!(
            stdout.contains("number of failed transactions: 0 "),
            "{mode}: failed transactions: {stdout}"
        );
        let processed: u64 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(
            processed > 100,
            "{mode}: only {processed} transactions: {stdout}"
        );
    }

    // The data pgbench wrote is really there, on the first shard.
    let direct = common::connect_primary(0).await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM pgbench_accounts", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(n, 100_000);
}
