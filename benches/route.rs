//! Criterion benchmarks of the router's hot paths: the per-statement routing cost of a cached
//! statement (extended protocol), of a simple query whose constants change (normalize + cached
//! analysis), and of a statement's first, uncached parse + plan. Run: `cargo bench --bench route`.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use tessera::config::Config;
use tessera::router::Router;
use tessera::router::analyze::{self, Schema};
use tessera::router::params::Params;

/// Parameter type OIDs as a driver would declare them in Parse.
const INT8: u32 = 20;
const TEXT: u32 = 25;
const NUMERIC: u32 = 1700;

/// Distinct keys cycled through, so the ring sees different keys and no branch predictor
/// learns one answer.
const KEYS: usize = 1_000;

/// Two hash shards: users(id), orders(user_id), pgbench_accounts(aid); countries is a
/// reference table (the config of the router's unit tests, plus pgbench's table).
fn config() -> Config {
    let text = "database: app\n\
        users: [{name: app, password: app}]\n\
        backend: {user: app, password: app, database: app}\n\
        sharding:\n  strategy: hash\n  tables: {users: id, orders: user_id, pgbench_accounts: aid}\n  reference_tables: [countries]\n\
        shards:\n  - name: s0\n    primary: \"127.0.0.1:1\"\n  - name: s1\n    primary: \"127.0.0.1:2\"\n";
    Config::from_yaml(text, Path::new("bench.yaml")).expect("bench config")
}

/// One Bind value: its format code (0 text, 1 binary) and bytes.
type Value = (i16, Vec<u8>);

/// The part of a Bind after the portal and statement names: per-parameter format codes, the
/// values, and zero result-format codes.
fn bind_body(values: &[Value]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for (format, _) in values {
        b.extend_from_slice(&format.to_be_bytes());
    }
    b.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for (_, v) in values {
        b.extend_from_slice(&(v.len() as i32).to_be_bytes());
        b.extend_from_slice(v);
    }
    b.extend_from_slice(&0i16.to_be_bytes());
    b
}

fn int8(v: i64) -> Value {
    (1, v.to_be_bytes().to_vec())
}

fn text(v: &str) -> Value {
    (0, v.as_bytes().to_vec())
}

/// An extended-protocol statement: its text, parameter types, and Bind bodies with varying keys.
struct Extended {
    name: &'static str,
    sql: &'static str,
    types: &'static [u32],
    binds: Vec<Vec<u8>>,
}

fn key(i: usize) -> i64 {
    // Spread over a wide range, as ids of a real table would be.
    (i as i64).wrapping_mul(7_919).wrapping_add(100_003)
}

fn select_user() -> Extended {
    Extended {
        name: "select_user_by_id",
        sql: "SELECT * FROM users WHERE id = $1",
        types: &[INT8],
        binds: (0..KEYS).map(|i| bind_body(&[int8(key(i))])).collect(),
    }
}

fn update_orders() -> Extended {
    Extended {
        name: "update_orders_by_user",
        sql: "UPDATE orders SET amount = $2 WHERE user_id = $1",
        types: &[INT8, NUMERIC],
        binds: (0..KEYS)
            .map(|i| bind_body(&[int8(key(i)), text("19.99")]))
            .collect(),
    }
}

fn insert_order() -> Extended {
    Extended {
        name: "insert_order",
        sql: "INSERT INTO orders (id, user_id, amount) VALUES ($1, $2, $3)",
        types: &[INT8, INT8, NUMERIC],
        binds: (0..KEYS)
            .map(|i| bind_body(&[int8(i as i64 + 1), int8(key(i)), text("19.99")]))
            .collect(),
    }
}

fn join_user_orders() -> Extended {
    Extended {
        name: "join_users_orders",
        sql: "SELECT u.name, o.amount FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = $1",
        types: &[INT8],
        binds: (0..KEYS).map(|i| bind_body(&[int8(key(i))])).collect(),
    }
}

fn select_country() -> Extended {
    const CODES: [&str; 4] = ["de", "fr", "us", "jp"];
    Extended {
        name: "select_reference",
        sql: "SELECT * FROM countries WHERE code = $1",
        types: &[TEXT],
        binds: (0..KEYS)
            .map(|i| bind_body(&[text(CODES[i % CODES.len()])]))
            .collect(),
    }
}

/// Checks outside the timed loops that every benchmarked statement routes without error.
fn check_routes(router: &Router, statements: &[Extended]) {
    for s in statements {
        let analysis = router.analyze(s.sql);
        assert!(analysis.parsed, "{}: not parsed", s.sql);
        for body in &s.binds {
            let params = Params::from_bind(body, s.types).expect("bind");
            router
                .plan(&analysis, &params)
                .unwrap_or_else(|e| panic!("{}: {e}", s.sql));
        }
    }
}

/// A statement already seen: cache hit, Bind decode, plan.
fn cached(c: &mut Criterion) {
    let router = Router::new(&config()).expect("router");
    let statements = [select_user(), update_orders(), insert_order()];
    check_routes(&router, &statements);
    let mut group = c.benchmark_group("route/cached");
    for s in &statements {
        let mut next = s.binds.iter().cycle();
        group.bench_function(s.name, |b| {
            b.iter(|| {
                let body = next.next().expect("cycled");
                let analysis = router.analyze(black_box(s.sql));
                let params = Params::from_bind(black_box(body), s.types).expect("bind");
                black_box(router.plan(&analysis, &params))
            });
        });
    }
    group.finish();
}

/// Simple-protocol queries whose constants differ every time: normalize, cache hit, plan.
fn simple_cached(c: &mut Criterion) {
    let router = Router::new(&config()).expect("router");
    // The query text up to its constant, which differs every time.
    let families = [
        (
            "pgbench_select",
            "SELECT abalance FROM pgbench_accounts WHERE aid = ",
        ),
        ("select_user_by_id", "SELECT * FROM users WHERE id = "),
    ];
    let mut group = c.benchmark_group("route/simple_cached");
    for (name, prefix) in families {
        let queries: Vec<String> = (0..KEYS).map(|i| format!("{prefix}{}", key(i))).collect();
        for q in &queries {
            let (analysis, literals) = router.analyze_simple(q);
            assert!(
                analysis.parsed && literals.len() == 1,
                "{q}: not normalized"
            );
            router
                .plan(&analysis, &Params::from_literals(&literals))
                .unwrap_or_else(|e| panic!("{q}: {e}"));
        }
        let mut next = queries.iter().cycle();
        group.bench_function(name, |b| {
            b.iter(|| {
                let sql = next.next().expect("cycled");
                let (analysis, literals) = router.analyze_simple(black_box(sql));
                black_box(router.plan(&analysis, &Params::from_literals(&literals)))
            });
        });
    }
    group.finish();
}

/// A statement never seen before: full analysis (lexing, sqlparser, key extraction) + plan.
fn first_parse(c: &mut Criterion) {
    let config = config();
    let router = Router::new(&config).expect("router");
    let schema = Schema::from_config(&config);
    let statements = [
        select_user(),
        update_orders(),
        insert_order(),
        join_user_orders(),
        select_country(),
    ];
    check_routes(&router, &statements);
    let mut group = c.benchmark_group("route/first_parse");
    for s in &statements {
        assert_eq!(
            analyze::analyze(s.sql, &schema),
            *router.analyze(s.sql),
            "{}: the bench schema differs from the router's",
            s.sql
        );
        let mut next = s.binds.iter().cycle();
        group.bench_function(s.name, |b| {
            b.iter(|| {
                let body = next.next().expect("cycled");
                let analysis = analyze::analyze(black_box(s.sql), &schema);
                let params = Params::from_bind(black_box(body), s.types).expect("bind");
                black_box(router.plan(&analysis, &params))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, cached, simple_cached, first_parse);
criterion_main!(benches);
