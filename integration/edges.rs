//! Bad input, authentication failures and dead servers: each gets a clear error, the proxy
//! survives, and the next client works.

mod common;

use std::time::{Duration, Instant};

use common::{Proxy, raw};
use tessera::config::AuthMethod;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads whatever the proxy answers until it closes the connection (bounded).
async fn read_reply(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    buf
}

async fn assert_proxy_works(proxy: &Proxy) {
    let client = proxy.connect().await;
    let row = client
        .query_one("SELECT 1 + 1", &[])
        .await
        .expect("next client works");
    assert_eq!(row.get::<_, i32>(0), 2);
}

fn sqlstate(err: &tokio_postgres::Error) -> Option<&str> {
    err.as_db_error().map(|e| e.code().code())
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_input_gets_an_error_and_the_proxy_survives() {
    let proxy = Proxy::start(|_| {}).await;
    let addr = format!("127.0.0.1:{}", proxy.port);

    // A startup packet whose parameters are not NUL-terminated.
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&20i32.to_be_bytes());
    pkt.extend_from_slice(&196_608i32.to_be_bytes());
    pkt.extend_from_slice(b"user\0appxxxx");
    s.write_all(&pkt).await.expect("write");
    let reply = read_reply(&mut s).await;
    assert_eq!(
        reply.first(),
        Some(&b'E'),
        "expected an ErrorResponse, got {reply:?}"
    );
    assert!(String::from_utf8_lossy(&reply).contains("08P01"));

    // A 2 GB length prefix on the startup packet.
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    s.write_all(&[0x7f, 0xff, 0xff, 0xff, 0, 3, 0, 0])
        .await
        .expect("write");
    let reply = read_reply(&mut s).await;
    assert!(
        String::from_utf8_lossy(&reply).contains("invalid length of startup packet"),
        "{reply:?}"
    );

    // A 2 GB length prefix on a message after login.
    let (client, conn) = tokio_postgres::connect(&proxy.conninfo(), tokio_postgres::NoTls)
        .await
        .expect("login");
    drop(client);
    drop(conn);
    let mut s = login_raw(&addr).await;
    s.write_all(b"Q\x7f\xff\xff\xff").await.expect("write");
    let reply = read_reply(&mut s).await;
    assert!(
        String::from_utf8_lossy(&reply).contains("54000"),
        "{:?}",
        String::from_utf8_lossy(&reply)
    );

    // Random bytes after startup.
    let mut s = login_raw(&addr).await;
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = s.write_all(&noise).await;
    let reply = read_reply(&mut s).await;
    assert!(reply.is_empty() || reply[0] == b'E', "{reply:?}");

    // An unknown protocol version.
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    let mut pkt = Vec::new();
    pkt.extend_from_slice(&8i32.to_be_bytes());
    pkt.extend_from_slice(&0x0002_0000i32.to_be_bytes());
    s.write_all(&pkt).await.expect("write");
    let reply = read_reply(&mut s).await;
    assert!(
        String::from_utf8_lossy(&reply).contains("0A000"),
        "{reply:?}"
    );

    // SSLRequest is answered 'N'; the client may then go on in plaintext.
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .expect("write");
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.expect("ssl answer");
    assert_eq!(&answer, b"N");

    assert_proxy_works(&proxy).await;
}

/// A Query with bytes after its text's NUL is malformed: it gets an error and is never run by
/// its first part, and the session goes on (its transaction aborted), as on Postgres. The
/// passthrough leaves the answer to the server; the router gives the same one.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_query_gets_an_error_and_the_session_goes_on() {
    use common::raw;
    let t = common::unique("malformed");
    let one = Proxy::start(|_| {}).await;
    let sharded = Proxy::start_sharded(|c| {
        c.sharding.tables.insert(t.clone(), "id".into());
    })
    .await;
    let setup = sharded.connect().await;
    for sql in [
        format!("CREATE TABLE {t} (id int PRIMARY KEY)"),
        format!("INSERT INTO {t} (id) VALUES (1), (2), (3)"),
    ] {
        setup.batch_execute(&sql).await.expect("setup");
    }
    let primary = common::with_cluster(|c| c.shards()[0].primary.port);
    // On several shards, a count is merged from a rewritten statement: the one place where a
    // query could be run by its first part.
    let body = format!("SELECT count(*) FROM {t}\0SELECT 2\0");
    let query = |body: &[u8]| {
        let mut q = vec![b'Q'];
        q.extend_from_slice(&(4 + body.len() as i32).to_be_bytes());
        q.extend_from_slice(body);
        q
    };
    let malformed = query(body.as_bytes());
    for (port, what) in [
        (primary, "Postgres"),
        (one.port, "one shard"),
        (sharded.port, "sharded"),
    ] {
        let mut c = raw::Raw::login(port).await;
        let mut step = async |msg: &[u8]| {
            c.send(msg).await;
            let msgs = c.until_ready().await;
            let code = msgs.iter().find_map(raw::Msg::code).unwrap_or_default();
            format!("{} {code}", raw::tags(&msgs))
        };
        let replies = [
            step(&raw::query("BEGIN")).await,
            step(&malformed).await,
            step(&raw::query("SELECT 3")).await,
            step(&raw::query("ROLLBACK")).await,
            // No NUL at all, and no text at all.
            step(&query(b"SELECT 5")).await,
            step(&query(b"")).await,
            // A session command before the inner NUL is not acted on: the statement stays.
            step(&[raw::parse("d", "SELECT 7"), raw::sync()].concat()).await,
            step(&query(b"DEALLOCATE d --\0x\0")).await,
            step(&query(b"DISCARD ALL\0x\0")).await,
            step(&[raw::bind("", "d", &[]), raw::execute("", 0), raw::sync()].concat()).await,
            step(&raw::query("SELECT 4")).await,
        ];
        assert_eq!(
            replies,
            [
                "CZ ", "EZ 08P01", "EZ 25P02", "CZ ", "EZ 08P01", "EZ 08P01", "1Z ", "EZ 08P01",
                "EZ 08P01", "2DCZ ", "TDCZ "
            ],
            "{what}"
        );
    }
}

/// Logs in with cleartext auth over a raw socket (proxy in `plain` mode is not needed: we use
/// tokio-postgres for SCRAM, then speak raw frames on a fresh socket via a plain-auth proxy).
async fn login_raw(addr: &str) -> TcpStream {
    // SCRAM by hand would be long; instead drive the handshake with postgres-protocol.
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut pkt = Vec::new();
    let body = b"user\0app\0database\0app\0\0";
    pkt.extend_from_slice(&((8 + body.len()) as i32).to_be_bytes());
    pkt.extend_from_slice(&196_608i32.to_be_bytes());
    pkt.extend_from_slice(body);
    s.write_all(&pkt).await.expect("startup");
    let mut scram = ScramSha256::new(b"app", ChannelBinding::unsupported());
    loop {
        let mut head = [0u8; 5];
        s.read_exact(&mut head).await.expect("message");
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.expect("body");
        match (
            head[0],
            body.get(..4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]])),
        ) {
            (b'R', Some(10)) => {
                let msg = scram.message().to_vec();
                let mut out = vec![b'p'];
                let payload_len = 4 + 14 + 4 + msg.len();
                out.extend_from_slice(&(payload_len as i32).to_be_bytes());
                out.extend_from_slice(b"SCRAM-SHA-256\0");
                out.extend_from_slice(&(msg.len() as i32).to_be_bytes());
                out.extend_from_slice(&msg);
                s.write_all(&out).await.expect("sasl initial");
            }
            (b'R', Some(11)) => {
                scram.update(&body[4..]).expect("server first");
                let msg = scram.message().to_vec();
                let mut out = vec![b'p'];
                out.extend_from_slice(&((4 + msg.len()) as i32).to_be_bytes());
                out.extend_from_slice(&msg);
                s.write_all(&out).await.expect("sasl response");
            }
            (b'R', Some(12)) => scram.finish(&body[4..]).expect("server final"),
            (b'Z', _) => return s,
            (b'E', _) => panic!("login failed: {}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn authentication_failures_have_postgres_codes() {
    let proxy = Proxy::start(|_| {}).await;
    let base = format!("host=127.0.0.1 port={}", proxy.port);

    let err = common::connect(&format!("{base} user=app password=wrong dbname=app"))
        .await
        .expect_err("wrong password");
    assert_eq!(sqlstate(&err), Some("28P01"), "{err}");
    let err = common::connect(&format!("{base} user=nobody password=x dbname=app"))
        .await
        .expect_err("unknown user");
    assert_eq!(sqlstate(&err), Some("28000"), "{err}");
    let err = common::connect(&format!("{base} user=app password=app dbname=nope"))
        .await
        .expect_err("unknown db");
    assert_eq!(sqlstate(&err), Some("3D000"), "{err}");
    assert_proxy_works(&proxy).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn md5_and_cleartext_auth_can_be_selected() {
    for method in [AuthMethod::Md5, AuthMethod::Plain] {
        let proxy = Proxy::start(|c| c.auth_method = method).await;
        assert_proxy_works(&proxy).await;
        let err = common::connect(&format!(
            "host=127.0.0.1 port={} user=app password=bad dbname=app",
            proxy.port
        ))
        .await
        .expect_err("wrong password");
        assert_eq!(sqlstate(&err), Some("28P01"), "{method:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_server_fails_fast_and_the_pool_recovers() {
    // This proxy serves the second shard's primary, which this test stops and restarts.
    let proxy = Proxy::start_with(common::sharded_config(), |c| {
        c.shards.swap(0, 1);
        c.shards.truncate(1);
        c.routing.replica_reads = false;
        c.pool.size = 2;
    })
    .await;
    let client = proxy.connect().await;
    client
        .query_one("SELECT 1", &[])
        .await
        .expect("works while up");

    let server = common::with_cluster(|c| c.shards()[1].primary.clone());
    common::with_cluster(|c| c.stop_server(&server)).expect("stop primary");

    let started = Instant::now();
    let err = client
        .query_one("SELECT 1", &[])
        .await
        .expect_err("server is down");
    let code = sqlstate(&err).map(str::to_string);
    assert!(
        matches!(code.as_deref(), Some("08001" | "08006" | "57P01")) || err.is_closed(),
        "unexpected error: {err:?}"
    );
    // A new client gets a clear error, fast.
    let started_new = Instant::now();
    let result = common::connect(&proxy.conninfo()).await;
    let err = match result {
        Ok(c) => c.query_one("SELECT 1", &[]).await.expect_err("down"),
        Err(e) => e,
    };
    assert!(matches!(sqlstate(&err), Some("08001" | "08006")), "{err:?}");
    assert!(
        started_new.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started_new.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    common::with_cluster(|c| c.start_server(&server)).expect("restart primary");
    let client = proxy.connect().await;
    let row = client
        .query_one("SELECT 3", &[])
        .await
        .expect("recovered without a restart");
    assert_eq!(row.get::<_, i32>(0), 3);
}

// === Session settings against Postgres: startup parameters, ParameterStatus, RESET ===

/// ParameterStatus values by name, for comparison.
type Reported = std::collections::BTreeMap<String, String>;

fn parameter_status(m: &raw::Msg) -> (String, String) {
    let mut parts = m.body.split(|&b| b == 0);
    let mut next = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    (next(), next())
}

/// Logs in as app/app (SCRAM) to `port` with startup parameters `params` besides the user and
/// database: the session and the ParameterStatus values it got, or the ErrorResponse that
/// refused it.
async fn login_with(port: u16, params: &[(&str, &str)]) -> Result<(raw::Raw, Reported), raw::Msg> {
    let (raw, statuses) = raw::Raw::login_with(port, params).await?;
    Ok((raw, statuses.iter().map(parameter_status).collect()))
}

/// The primary the single-shard proxy serves, for a direct comparison.
fn direct_port() -> u16 {
    common::with_cluster(|c| c.shards()[0].primary.port)
}

/// A reply as comparable text: every message's tag and body (ParameterStatus, rows, tags).
fn transcript(msgs: &[raw::Msg]) -> Vec<String> {
    msgs.iter()
        .map(|m| format!("{} {}", m.tag as char, String::from_utf8_lossy(&m.body)))
        .collect()
}

/// Sends `message` and reads the reply up to its ReadyForQuery.
async fn run(raw: &mut raw::Raw, message: &[u8]) -> Vec<raw::Msg> {
    raw.send(message).await;
    raw.until_ready().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_set_in_a_failed_batch_is_forgotten_as_on_postgres() {
    // One server connection, used by another client before each step: what the client set
    // comes back only through the proxy's replay.
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let (mut direct, _) = login_with(direct_port(), &[]).await.expect("login");
    let (mut client, _) = login_with(proxy.port, &[]).await.expect("login");
    let other = proxy.connect().await;
    let show = raw::query("SELECT current_setting('TimeZone'), current_setting('DateStyle')");
    let table = common::unique("deferred");
    let create = format!("CREATE TABLE {table} (k int UNIQUE DEFERRABLE INITIALLY DEFERRED)");
    run(&mut direct, &raw::query(&create)).await;
    let steps = [
        // The batch's implicit transaction rolls back, the SET with it.
        [
            raw::parse("", "SET TimeZone = 'Asia/Tokyo'"),
            raw::bind("", "", &[]),
            raw::execute("", 0),
            raw::parse("", "SELECT 1/0"),
            raw::bind("", "", &[]),
            raw::execute("", 0),
            raw::sync(),
        ]
        .concat(),
        show.clone(),
        // So does a transaction whose COMMIT fails.
        raw::query("BEGIN"),
        raw::query(&format!(
            "SET DateStyle = 'German'; INSERT INTO {table} VALUES (1), (1)"
        )),
        raw::query("COMMIT"),
        show,
    ];
    for (n, step) in steps.iter().enumerate() {
        let at_postgres = run(&mut direct, step).await;
        if n != 3 && n != 4 {
            other.simple_query("SELECT 1").await.expect("other client");
        }
        let here = run(&mut client, step).await;
        assert_eq!(transcript(&here), transcript(&at_postgres), "step {n}");
    }
    run(&mut direct, &raw::query(&format!("DROP TABLE {table}"))).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn login_reports_the_settings_as_postgres_does() {
    let proxy = Proxy::start(|_| {}).await;
    let cases: Vec<Vec<(&str, &str)>> = vec![
        // As drivers write them (asyncpg quotes client_encoding): Postgres reports its own forms.
        vec![
            ("application_name", "drivers"),
            ("TimeZone", "america/new_york"),
            ("DateStyle", "iso, dmy"),
            ("client_encoding", "'utf-8'"),
        ],
        // libpq's options: -c and --name=value entries; a plain parameter wins over them.
        vec![("options", "-c TimeZone=Asia/Tokyo -c application_name=x")],
        vec![
            (
                "options",
                "--application-name=from\\ options -c intervalstyle=SQL_STANDARD",
            ),
            ("application_name", "plain wins"),
        ],
        // Reported as Postgres cleans it, not as sent.
        vec![("application_name", "caf\u{e9}")],
        vec![],
    ];
    for params in &cases {
        let (_, at_postgres) = login_with(direct_port(), params)
            .await
            .unwrap_or_else(|e| panic!("{params:?}: {:?}", e.field(b'M')));
        // Twice: the second login takes what the first learnt.
        for round in 0..2 {
            let (_, at_proxy) = login_with(proxy.port, params)
                .await
                .unwrap_or_else(|e| panic!("{params:?}: {:?}", e.field(b'M')));
            assert_eq!(at_proxy, at_postgres, "{params:?}, login {round}");
        }
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_startup_setting_is_refused_as_postgres_refuses_it() {
    let proxy = Proxy::start(|_| {}).await;
    let cases: [&[(&str, &str)]; 4] = [
        &[("TimeZone", "Nowhere/Land")],
        &[("options", "-c DateStyle=foo")],
        &[
            ("application_name", "ok"),
            ("options", "-c no_such_setting=1"),
        ],
        // Overridden by a valid plain parameter, but applied first all the same.
        &[("TimeZone", "UTC"), ("options", "-c TimeZone=Nowhere/Land")],
    ];
    for params in cases {
        let at_postgres = login_with(direct_port(), params)
            .await
            .err()
            .expect("Postgres refuses it");
        let at_proxy = login_with(proxy.port, params)
            .await
            .err()
            .unwrap_or_else(|| panic!("{params:?} accepted"));
        for field in [b'S', b'V', b'C', b'M', b'D', b'H'] {
            assert_eq!(
                at_proxy.field(field),
                at_postgres.field(field),
                "{params:?}, field {}",
                field as char
            );
        }
    }
    assert_proxy_works(&proxy).await;
    proxy.shutdown().await;
}

/// What the session tests read back: the settings they change, and a value they shape.
const SHOW: &str = "SELECT current_setting('TimeZone'), current_setting('application_name'), \
                    current_setting('DateStyle'), current_setting('IntervalStyle'), \
                    '2024-03-01 12:00+00'::timestamptz::text";

/// Startup settings both ways: `options` entries and plain parameters.
const STARTUP: [(&str, &str); 2] = [
    (
        "options",
        "-c TimeZone=Asia/Tokyo -c application_name=edges -c IntervalStyle=iso_8601",
    ),
    ("DateStyle", "sql, dmy"),
];

#[tokio::test(flavor = "multi_thread")]
async fn startup_settings_and_reset_follow_the_client_across_pooled_connections() {
    let proxy = Proxy::start(|c| c.pool.size = 2).await;
    let (mut direct, _) = login_with(direct_port(), &STARTUP).await.expect("login");
    let (mut client, _) = login_with(proxy.port, &STARTUP).await.expect("login");
    let other = proxy.connect().await;
    let show_pid = format!("{SHOW}, pg_backend_pid()");
    let row = |msgs: &[raw::Msg]| {
        let cols = msgs.iter().find_map(raw::Msg::text).expect("a row");
        let (values, pid) = cols.rsplit_once('|').expect("pid column");
        (values.to_string(), pid.to_string())
    };
    for step in [
        "SET TimeZone = 'UTC'; SET IntervalStyle = 'postgres'",
        "RESET TimeZone",
        "RESET ALL",
    ] {
        let at_postgres = run(&mut direct, &raw::query(step)).await;
        let here = run(&mut client, &raw::query(step)).await;
        assert_eq!(transcript(&here), transcript(&at_postgres), "{step}");
        let (values, pid) = row(&run(&mut client, &raw::query(&show_pid)).await);
        // Another client takes that connection (the most recently returned) for a
        // transaction: this client's next statement runs on the other one.
        other.batch_execute("BEGIN").await.expect("begin");
        let taken: i32 = other
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get(0);
        assert_eq!(taken.to_string(), pid, "{step}: the other client took it");
        let (moved, moved_pid) = row(&run(&mut client, &raw::query(&show_pid)).await);
        other.batch_execute("COMMIT").await.expect("commit");
        assert_ne!(moved_pid, pid, "{step}");
        let expected = row(&run(&mut direct, &raw::query(&show_pid)).await).0;
        assert_eq!(values, expected, "after {step}");
        assert_eq!(moved, expected, "after {step}, moved");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_returns_to_the_startup_values_as_on_postgres() {
    // One server connection, shared with another client between steps: every step that
    // follows one of its runs on a connection set up by the other client's session first.
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let (mut direct, _) = login_with(direct_port(), &STARTUP).await.expect("login");
    let (mut client, _) = login_with(proxy.port, &STARTUP).await.expect("login");
    let other = proxy.connect().await;
    let asyncpg_reset = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;";
    let steps: Vec<Vec<u8>> = [
        "SET TimeZone = 'Europe/Paris'; SET application_name = 'changed'",
        SHOW,
        "RESET TimeZone",
        SHOW,
        "SET DateStyle = 'German'",
        "RESET ALL",
        SHOW,
        // In a transaction.
        "BEGIN",
        "SET TimeZone = 'UTC'",
        "RESET TimeZone",
        SHOW,
        "SET DateStyle = 'German'; SET application_name = 'in a transaction'",
        "RESET ALL",
        SHOW,
        "COMMIT",
        SHOW,
        // A SET rolled back, and a RESET rolled back.
        "BEGIN; SET TimeZone = 'UTC'",
        "ROLLBACK",
        SHOW,
        "SET TimeZone = 'UTC'",
        "BEGIN",
        "RESET TimeZone",
        "ROLLBACK",
        SHOW,
        // RESET by other names, and as a pool's reset query (a multi-statement text).
        "SET TIME ZONE DEFAULT",
        SHOW,
        "SET application_name = 'x'; SET TimeZone = 'UTC'",
        "SET application_name TO DEFAULT -- a comment",
        SHOW,
        asyncpg_reset,
        SHOW,
        "SET TimeZone = 'UTC'; SET application_name = 'y'",
        "DISCARD ALL",
        SHOW,
        // A RESET that fails with its text resets nothing.
        "SET TimeZone = 'UTC'",
        "RESET TimeZone; SELECT 1/0",
        SHOW,
    ]
    .iter()
    .map(|sql| raw::query(sql))
    .chain([
        // The extended protocol, in and out of a transaction.
        raw::extended("SET TimeZone = 'UTC'"),
        raw::extended("RESET TimeZone"),
        raw::extended(SHOW),
        raw::query("BEGIN"),
        raw::extended("SET IntervalStyle = 'postgres'"),
        raw::extended("RESET ALL"),
        raw::extended(SHOW),
        raw::query("COMMIT"),
        raw::extended(SHOW),
        raw::extended("SET TimeZone = 'UTC'"),
        [
            raw::parse("", "RESET TimeZone"),
            raw::bind("", "", &[]),
            raw::execute("", 0),
            raw::parse("", "SELECT 1/0"),
            raw::bind("", "", &[]),
            raw::execute("", 0),
            raw::sync(),
        ]
        .concat(),
        raw::extended(SHOW),
    ])
    .collect();
    let mut idle = true;
    for (n, step) in steps.iter().enumerate() {
        if idle {
            other.simple_query("SELECT 1").await.expect("other client");
        }
        let at_postgres = run(&mut direct, step).await;
        let here = run(&mut client, step).await;
        let what = String::from_utf8_lossy(&step[5..]).into_owned();
        assert_eq!(
            transcript(&here),
            transcript(&at_postgres),
            "step {n}: {what:?}"
        );
        idle = here.last().is_some_and(|z| z.body == b"I");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_all_leaves_the_role_as_on_postgres() {
    let role = common::unique("edges_role");
    common::connect_superuser(0)
        .await
        .batch_execute(&format!("CREATE ROLE {role} NOLOGIN; GRANT {role} TO app"))
        .await
        .expect("role");
    let proxy = Proxy::start(|c| c.pool.size = 1).await;
    let (mut direct, _) = login_with(direct_port(), &STARTUP).await.expect("login");
    let (mut client, _) = login_with(proxy.port, &STARTUP).await.expect("login");
    let other = proxy.connect().await;
    let show = "SELECT current_user, current_setting('TimeZone')";
    for step in [
        format!("SET ROLE {role}; SET TimeZone = 'UTC'"),
        "RESET ALL".to_string(),
        show.to_string(),
        "DISCARD ALL".to_string(),
        show.to_string(),
    ] {
        other.simple_query("SELECT 1").await.expect("other client");
        let at_postgres = run(&mut direct, &raw::query(&step)).await;
        let here = run(&mut client, &raw::query(&step)).await;
        assert_eq!(transcript(&here), transcript(&at_postgres), "{step}");
    }
    proxy.shutdown().await;
}
