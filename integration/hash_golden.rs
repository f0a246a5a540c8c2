//! Golden vectors for `tessera::router::hash` checked against a real server: the Rust port of
//! Postgres' hash functions must return exactly what `hashint8extended`, `hashtextextended` and
//! `uuid_hash_extended` return, and ring placement must equal the same rule evaluated in SQL.

use std::time::Instant;

use tessera::cluster::{ClusterSpec, LocalCluster};
use tessera::router::hash::{Ring, ShardKey, pg_hash, pg_hash_with_seed};

/// Keys generated per type.
const KEYS: i64 = 1000;

/// Parses a uuid's text form into its 16 bytes.
fn uuid_bytes(text: &str) -> [u8; 16] {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    assert_eq!(hex.len(), 32, "uuid {text:?}");
    let mut bytes = [0u8; 16];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("uuid hex");
    }
    bytes
}

/// Splits psql's unaligned output into rows of `columns` fields. Fields never contain `|` or
/// newlines: keys that could are sent through `encode(..., 'hex')`.
fn rows(out: &str, columns: usize) -> Vec<Vec<String>> {
    out.lines()
        .map(|line| {
            let fields: Vec<String> = line.split('|').map(str::to_owned).collect();
            assert_eq!(fields.len(), columns, "row {line:?}");
            fields
        })
        .collect()
}

fn hex_decode(hex: &str) -> Vec<u8> {
    assert!(hex.len().is_multiple_of(2), "hex {hex:?}");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn int(field: &str) -> i64 {
    field.parse().unwrap_or_else(|e| panic!("{field:?}: {e}"))
}

/// Integer keys: the extremes, values around the i32/u32 boundaries (where the int8 fold changes
/// behaviour), small values, and a deterministic spread over the whole i64 range.
const INT_KEYS_SQL: &str = "
    SELECT k FROM unnest(ARRAY[
        0, 1, -1, 2, -2, 255, 256, 65535, 65536,
        2147483647, -2147483648, 2147483648, -2147483649,
        4294967295, 4294967296, -4294967296, -4294967297,
        9223372036854775807, -9223372036854775808,
        9223372036854775806, -9223372036854775807
    ]::bigint[]) AS k
    UNION ALL
    SELECT g - 100 FROM generate_series(0, 199) g
    UNION ALL
    -- 8 bytes of md5 give a deterministic, uniformly spread bigint.
    SELECT ('x' || substr(md5(g::text), 1, 16))::bit(64)::bigint
    FROM generate_series(1, 1000) g";

/// Text keys of varied lengths 0..100, ASCII and multi-byte UTF-8 (2-, 3- and 4-byte sequences),
/// so every tail length of the 12-byte blocks is covered.
const TEXT_KEYS_SQL: &str = "
    SELECT left(repeat(
        CASE g % 5
            WHEN 0 THEN md5(g::text)
            WHEN 1 THEN 'é' || md5(g::text)
            WHEN 2 THEN '日本語' || md5(g::text)
            WHEN 3 THEN '🦀' || upper(md5(g::text))
            ELSE 'key:' || g
        END, 4), g % 101) AS k
    FROM generate_series(0, 999) g";

#[test]
fn rust_hashes_match_the_server() {
    let started = Instant::now();
    let spec = ClusterSpec {
        shards: 1,
        replicas: 0,
        ..Default::default()
    };
    let cluster = LocalCluster::start(&spec).expect("cluster starts");
    let server = &cluster.shards()[0].primary;
    let psql = |sql: &str| cluster.psql(server, sql).expect("query runs");
    eprintln!("cluster up in {:?}", started.elapsed());

    // The text hash is only collation-independent under a deterministic collation; the launcher
    // creates C-locale databases, and the test would be meaningless otherwise.
    assert_eq!(
        psql("SELECT datcollate FROM pg_database WHERE datname = current_database()"),
        "C"
    );
    assert_eq!(psql("SHOW server_encoding"), "UTF8");

    // Integers, with int4/int2 hashes of the same values where they fit: callers canonicalize
    // every integer to i64, which is only right if Postgres agrees across the integer types.
    let out = psql(&format!(
        "SELECT k, hashint8extended(k, 0),
                CASE WHEN k BETWEEN -2147483648 AND 2147483647
                     THEN hashint4extended(k::int4, 0) END,
                CASE WHEN k BETWEEN -32768 AND 32767 THEN hashint2extended(k::int2, 0) END
         FROM ({INT_KEYS_SQL}) keys"
    ));
    let int_rows = rows(&out, 4);
    assert!(
        int_rows.len() >= KEYS as usize,
        "{} int keys",
        int_rows.len()
    );
    for row in &int_rows {
        let key = int(&row[0]);
        let ours = pg_hash(&ShardKey::Int(key));
        assert_eq!(ours, int(&row[1]), "hashint8extended({key}, 0)");
        for narrow in &row[2..] {
            if !narrow.is_empty() {
                assert_eq!(ours, int(narrow), "narrow integer hash of {key}");
            }
        }
    }

    // Texts travel hex-encoded so any character survives psql's output format.
    let out = psql(&format!(
        "SELECT encode(convert_to(k, 'UTF8'), 'hex'), hashtextextended(k, 0)
         FROM ({TEXT_KEYS_SQL}) keys"
    ));
    let text_rows = rows(&out, 2);
    assert_eq!(text_rows.len(), KEYS as usize);
    let mut multibyte = 0;
    for row in &text_rows {
        let text = String::from_utf8(hex_decode(&row[0])).expect("server sends UTF-8");
        multibyte += usize::from(text.len() != text.chars().count());
        let ours = pg_hash(&ShardKey::Text(text.clone()));
        assert_eq!(ours, int(&row[1]), "hashtextextended({text:?}, 0)");
    }
    assert!(multibyte > 500, "only {multibyte} multi-byte texts");

    // Uuids derived from md5, so the run is reproducible.
    let out = psql(
        "SELECT u, uuid_hash_extended(u, 0)
         FROM (SELECT md5('uuid' || g)::uuid AS u FROM generate_series(1, 1000) g) keys",
    );
    let uuid_rows = rows(&out, 2);
    assert_eq!(uuid_rows.len(), KEYS as usize);
    for row in &uuid_rows {
        let ours = pg_hash(&ShardKey::Uuid(uuid_bytes(&row[0])));
        assert_eq!(ours, int(&row[1]), "uuid_hash_extended({}, 0)", row[0]);
    }

    // Non-zero seeds exercise the seed perturbation of the state, which seed 0 skips.
    let out = psql(
        "SELECT s, k, hashint8extended(k, s), encode(convert_to(t, 'UTF8'), 'hex'),
                hashtextextended(t, s)
         FROM (SELECT g AS k, repeat('é' || g, g % 7) AS t FROM generate_series(-50, 49) g) keys,
              unnest(ARRAY[1, -1, 42, 4294967296, -9223372036854775808]::bigint[]) AS s",
    );
    for row in rows(&out, 5) {
        let seed = int(&row[0]) as u64;
        let key = int(&row[1]);
        let ours = pg_hash_with_seed(&ShardKey::Int(key), seed);
        assert_eq!(ours, int(&row[2]), "hashint8extended({key}, {seed})");
        let text = String::from_utf8(hex_decode(&row[3])).expect("server sends UTF-8");
        let ours = pg_hash_with_seed(&ShardKey::Text(text.clone()), seed);
        assert_eq!(ours, int(&row[4]), "hashtextextended({text:?}, {seed})");
    }

    // Placement: the same ownership rule written in SQL (first vnode at or after the key in u64
    // order, wrapping to the lowest; XOR-ing the sign bit turns u64 order into bigint order). This
    // is the predicate the rebalancer relies on to select moving rows on the server.
    let names: Vec<String> = ["s0", "s1", "s2"].map(str::to_owned).to_vec();
    let ring = Ring::new(&names, 64).expect("ring builds");
    let out = psql(&format!(
        "WITH v AS (
            SELECT s, hashtextextended('s' || s || '#' || i, 0) # (-9223372036854775808)::bigint AS p
            FROM generate_series(0, 2) s, generate_series(0, 63) i
         ), k AS (
            SELECT k, hashint8extended(k, 0) # (-9223372036854775808)::bigint AS h
            FROM ({INT_KEYS_SQL}) keys
         )
         SELECT k, COALESCE((SELECT s FROM v WHERE v.p >= k.h ORDER BY v.p LIMIT 1),
                            (SELECT s FROM v ORDER BY v.p LIMIT 1))
         FROM k"
    ));
    let placement = rows(&out, 2);
    assert_eq!(placement.len(), int_rows.len());
    for row in &placement {
        let key = int(&row[0]);
        let shard = ring.shard_for(&ShardKey::Int(key));
        assert_eq!(shard as i64, int(&row[1]), "shard of key {key}");
    }

    eprintln!("checked in {:?}", started.elapsed());
}
