//! Table-driven tests of statement analysis.

use super::*;

fn schema() -> Schema {
    let mut s = Schema::default();
    s.sharded.insert("users".into(), "id".into());
    s.sharded.insert("orders".into(), "user_id".into());
    s.reference.insert("countries".into());
    s
}

fn a(sql: &str) -> Analysis {
    analyze(sql, &schema())
}

fn keys(sql: &str) -> KeyExpr {
    match a(sql).route {
        Route::Sharded { keys, .. } => keys,
        other => panic!("{sql}: not sharded: {other:?}"),
    }
}

fn lit(s: &str) -> KeySource {
    KeySource::Literal(s.into())
}

fn unsupported(sql: &str) -> String {
    match a(sql).route {
        Route::Unsupported(why) => why,
        other => panic!("{sql}: expected unsupported, got {other:?}"),
    }
}

#[test]
fn keys_from_where_clauses() {
    assert_eq!(
        keys("SELECT * FROM users WHERE id = 5"),
        KeyExpr::Keys(vec![lit("5")])
    );
    assert_eq!(
        keys("SELECT * FROM users u WHERE u.id = $1"),
        KeyExpr::Keys(vec![KeySource::Param(1)])
    );
    assert_eq!(
        keys("SELECT * FROM public.users WHERE users.id = '7'::bigint"),
        KeyExpr::Keys(vec![lit("7")])
    );
    assert_eq!(
        keys("SELECT * FROM users WHERE 5 = id"),
        KeyExpr::Keys(vec![lit("5")])
    );
    assert_eq!(
        keys("SELECT * FROM users WHERE id = -3"),
        KeyExpr::Keys(vec![lit("-3")])
    );
    assert_eq!(
        keys("SELECT * FROM users WHERE id IN (1, 2, $3)"),
        KeyExpr::Keys(vec![lit("1"), lit("2"), KeySource::Param(3)])
    );
    assert_eq!(
        keys("SELECT * FROM users WHERE id = ANY($1)"),
        KeyExpr::Keys(vec![KeySource::AnyParam(1)])
    );
    assert_eq!(
        keys("SELECT * FROM users WHERE id = ANY(ARRAY[1,2])"),
        KeyExpr::Keys(vec![lit("1"), lit("2")])
    );
    assert_eq!(
        keys("SELECT * FROM users WHERE id = 1 AND name = 'x'"),
        KeyExpr::And(vec![KeyExpr::Keys(vec![lit("1")]), KeyExpr::All])
    );
    assert_eq!(
        keys("SELECT * FROM users WHERE id = 1 OR id = 2"),
        KeyExpr::Or(vec![
            KeyExpr::Keys(vec![lit("1")]),
            KeyExpr::Keys(vec![lit("2")])
        ])
    );
    assert_eq!(keys("SELECT * FROM users WHERE name = 'x'"), KeyExpr::All);
    assert_eq!(keys("SELECT * FROM users"), KeyExpr::All);
    assert_eq!(keys("SELECT * FROM users WHERE id <> 5"), KeyExpr::All);
    assert_eq!(
        keys("SELECT * FROM users WHERE id NOT IN (5)"),
        KeyExpr::All
    );
}

#[test]
fn dml_keys() {
    assert_eq!(
        keys("UPDATE users SET name = 'x' WHERE id = $2"),
        KeyExpr::Keys(vec![KeySource::Param(2)])
    );
    assert_eq!(
        keys("DELETE FROM orders WHERE user_id = 9"),
        KeyExpr::Keys(vec![lit("9")])
    );
    assert_eq!(
        keys("UPDATE orders o SET amount = 1 WHERE o.user_id = 4"),
        KeyExpr::Keys(vec![lit("4")])
    );
    match a("INSERT INTO users (name, id) VALUES ('a', 1), ('b', $1)").route {
        Route::Insert { table, rows } => {
            assert_eq!(table, "users");
            assert_eq!(rows, vec![lit("1"), KeySource::Param(1)]);
        }
        other => panic!("{other:?}"),
    }
    assert!(unsupported("INSERT INTO users VALUES (1, 'a')").contains("column list"));
    assert!(unsupported("INSERT INTO users (name) VALUES ('a')").contains("shard key id"));
    assert!(
        unsupported("INSERT INTO users (id, name) SELECT id, name FROM users")
            .contains("INSERT ... SELECT")
    );
    assert!(unsupported("UPDATE users SET id = 2 WHERE id = 1").contains("changes the shard key"));
}

#[test]
fn read_write_classification() {
    let read = a("SELECT * FROM users WHERE id = 1");
    assert!(read.replica_ok && !read.writes);
    for sql in [
        "SELECT * FROM users WHERE id = 1 FOR UPDATE",
        "SELECT nextval('s')",
        "SELECT pg_advisory_lock(1)",
        "WITH x AS (DELETE FROM countries RETURNING *) SELECT * FROM x",
        "INSERT INTO countries VALUES ('x', 'y')",
        "SET search_path = a",
    ] {
        let an = a(sql);
        assert!(!an.replica_ok, "{sql} must not go to a replica");
    }
    let hinted = a("/* tessera: primary */ SELECT * FROM users WHERE id = 1");
    assert!(hinted.force_primary && !hinted.replica_ok);
    // The parser cannot read it: primary, and refused on sharded databases.
    let odd = a("SELECT * FROM users WHERE id = 1 FOR NO KEY UPDATE OF users NOWAIT SKIP");
    assert!(!odd.replica_ok);
}

#[test]
fn routes_by_table_kind() {
    assert_eq!(a("SELECT 1").route, Route::AnyShard);
    assert_eq!(a("SELECT * FROM countries").route, Route::Reference);
    assert_eq!(
        a("SELECT * FROM pgbench_accounts WHERE aid = 1").route,
        Route::Reference
    );
    assert_eq!(a("CREATE TABLE t (id int)").route, Route::Broadcast);
    assert_eq!(
        a("BEGIN").route,
        Route::Tx(TxCommand::Begin { read_only: false })
    );
    assert_eq!(
        a("begin read only").route,
        Route::Tx(TxCommand::Begin { read_only: true })
    );
    assert_eq!(a("COMMIT").route, Route::Tx(TxCommand::Commit));
    assert_eq!(
        a("ROLLBACK TO SAVEPOINT a").route,
        Route::Tx(TxCommand::Savepoint)
    );
    // A join with a reference table routes by the sharded table.
    assert_eq!(
        keys("SELECT * FROM users u JOIN countries c ON c.code = u.country WHERE u.id = 3"),
        KeyExpr::Keys(vec![lit("3")])
    );
    // Co-located join: keys of either table count.
    assert_eq!(
        keys("SELECT * FROM users u JOIN orders o ON o.user_id = u.id WHERE o.user_id = 3"),
        KeyExpr::Keys(vec![lit("3")])
    );
    assert!(
        unsupported("SELECT * FROM users u JOIN orders o ON o.id = u.id")
            .contains("not on their shard keys")
    );
    assert!(
        unsupported("SELECT * FROM users WHERE id IN (SELECT user_id FROM orders)")
            .contains("subquery")
    );
    assert!(
        unsupported("SELECT id FROM users UNION SELECT user_id FROM orders")
            .contains("set operation")
    );
    assert!(unsupported("DO $$ BEGIN END $$").contains("DO"));
}

#[test]
fn merge_needs_are_named() {
    for (sql, need) in [
        ("SELECT * FROM users ORDER BY id", "ORDER BY"),
        ("SELECT * FROM users LIMIT 5", "LIMIT"),
        ("SELECT count(*) FROM users", "count"),
        ("SELECT DISTINCT name FROM users", "DISTINCT"),
        ("SELECT name FROM users GROUP BY name", "GROUP BY"),
        ("SELECT rank() OVER (ORDER BY id) FROM users", "window"),
    ] {
        let got = a(sql).needs_merge.unwrap_or_default();
        assert!(got.contains(need), "{sql}: {got}");
    }
    assert_eq!(
        a("SELECT id, lower(name) FROM users WHERE id = 1").needs_merge,
        None
    );
}

#[test]
fn multi_statement_queries() {
    assert_eq!(
        a("BEGIN; UPDATE users SET name = 'a' WHERE id = 1; COMMIT").route,
        keyed("users", "1")
    );
    // Different keys: whether they share a shard is decided at plan time.
    assert!(matches!(
        a("UPDATE users SET name = 'a' WHERE id = 1; UPDATE users SET name = 'b' WHERE id = 2")
            .route,
        Route::Multi(ref parts) if parts.len() == 2
    ));
    assert!(matches!(
        a("UPDATE users SET name = 'a' WHERE id = 1; CREATE TABLE c (z int)").route,
        Route::Unsupported(_)
    ));
    assert_eq!(
        a("CREATE TABLE a (x int); CREATE TABLE b (y int)").route,
        Route::Broadcast
    );
}

fn keyed(table: &str, key: &str) -> Route {
    Route::Sharded {
        table: table.into(),
        keys: KeyExpr::Keys(vec![lit(key)]),
    }
}
