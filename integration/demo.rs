//! `tessera demo`: starts its own cluster, loads the sample data through the proxy (so it is
//! really sharded), serves it, and tears everything down on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Stops the demo (and with it its cluster) if the test fails half way.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
            for _ in 0..100 {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.0.kill();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_serves_sharded_sample_data_and_cleans_up() {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "demo",
            "--shards",
            "2",
            "--replicas",
            "1",
            "--port",
            &port.to_string(),
        ])
        .env("TESSERA_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tessera demo starts");
    let mut demo = Demo(child);
    let stdout = demo.0.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut banner = String::new();
    let ready = loop {
        match rx.recv_timeout(Duration::from_secs(90)) {
            Ok(line) => {
                banner.push_str(&line);
                banner.push('\n');
                if line.contains("Press Ctrl-C") {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    assert!(ready, "demo never became ready: {banner}");
    let url = format!("postgres://app:app@127.0.0.1:{port}/app");
    assert!(banner.contains(&format!("psql {url}")), "{banner}");

    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect to demo");
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT name, country FROM users WHERE id = $1", &[&42i64])
        .await
        .expect("read a user by key");
    assert_eq!(row.get::<_, String>(0), "user 42");
    let users = client
        .query("SELECT id FROM users", &[])
        .await
        .expect("scatter read");
    assert_eq!(users.len(), 100);
    let orders = client
        .query(
            "SELECT o.id FROM orders o JOIN users u ON u.id = o.user_id WHERE u.id = $1",
            &[&7i64],
        )
        .await
        .expect("co-located join");
    assert_eq!(orders.len(), 5);
    let countries = client
        .query("SELECT code FROM countries", &[])
        .await
        .expect("reference read");
    assert_eq!(countries.len(), 4);
    drop(client);

    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(demo.0.id() as i32, libc::SIGINT) };
    let mut exited = None;
    for _ in 0..100 {
        if let Ok(Some(status)) = demo.0.try_wait() {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let Some(status) = exited else {
        panic!("demo did not exit on Ctrl-C");
    };
    assert!(status.success(), "demo exited with {status}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the proxy port still accepts connections"
    );
}
