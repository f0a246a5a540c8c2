"""Checks that asyncpg gets from Tessera exactly what it gets from Postgres: named prepared
statements and asyncpg's statement cache (evictions, re-preparation after a schema change),
executemany (Bind/Execute pipelined under one Sync, atomic on Postgres), many parameter and result
types (user-defined enum included, which asyncpg introspects by OID), row-limited cursors in
transactions (named portals, MOVE), nested transactions (savepoints), errors inside transactions,
COPY in (CSV, text, binary records) and out (tables and queries), a pool of 10 connections doing
50 operations each, multi-statement simple queries, session settings (startup values, SET, RESET,
the pool's reset query), statement and client timeouts (cancel), and unnamed statements only
(statement_cache_size=0, as configured for transaction poolers).

Usage: asyncpg_check.py --direct PORT --proxy PORT --prefix NAME [--sharded]
"""

import asyncio
import datetime
import decimal
import hashlib
import io
import uuid

import asyncpg

import diffcheck

TABLES = {
    "prep": "(k int PRIMARY KEY, v text NOT NULL)",
    "many": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "types": "(k int PRIMARY KEY, i2 smallint, i8 bigint, t text, num numeric, ts timestamptz,"
    " b bytea, arr int[], tarr text[], j jsonb, f float8, u uuid, d date, iv interval,"
    " flag bool, mood {mood})",
    "cur": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "tx": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "abort": "(k int PRIMARY KEY, v text)",
    "copy": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "records": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "copyq": "(k int PRIMARY KEY, v text)",
    "acct": "(k int PRIMARY KEY, balance bigint NOT NULL)",
    "multi": "(k int, n int, PRIMARY KEY (k, n))",
    "alter": "(k int PRIMARY KEY, v text)",
    "errs": "(k int PRIMARY KEY, v text NOT NULL)",
    "unnamed": "(k int, n int, v text, PRIMARY KEY (k, n))",
}


def error_of(exc):
    if isinstance(exc, asyncpg.PostgresError):
        message = exc.message
        if getattr(exc, "detail", None):
            message += f" | detail: {exc.detail}"
        if getattr(exc, "position", None):
            message += f" | position: {exc.position}"
        return type(exc).__name__, exc.sqlstate, message
    return type(exc).__name__, None, str(exc)


async def connect(run, **kwargs):
    return await asyncpg.connect(
        host="127.0.0.1",
        port=run.port,
        user=run.user,
        password=run.password,
        database=run.database,
        **kwargs,
    )


async def val(conn, sql, *args):
    """The first value of a query's result. Not `fetchval`: asyncpg's fetchrow and fetchval send
    an Execute limited to one row, which a sharded map refuses across shards (README)."""
    rows = await conn.fetch(sql, *args)
    return rows[0][0]


def digest(rows):
    return hashlib.sha256(repr(rows).encode()).hexdigest()[:16]


async def setup(run):
    conn = await connect(run)
    try:
        await run.step("create enum", conn.execute(f"CREATE TYPE {run.t('mood')} AS ENUM ('sad', 'ok', 'happy')"))
        for kind, columns in TABLES.items():
            columns = columns.replace("{mood}", run.t("mood"))
            await run.step(f"create {kind}", conn.execute(f"CREATE TABLE {run.t(kind)} {columns}"))
    finally:
        await conn.close()


async def teardown(run):
    conn = await connect(run)
    try:
        for kind in TABLES:
            await run.step(f"drop {kind}", conn.execute(f"DROP TABLE IF EXISTS {run.t(kind)}"))
        await run.step("drop enum", conn.execute(f"DROP TYPE IF EXISTS {run.t('mood')}"))
    finally:
        await conn.close()


async def prepared_statements(run):
    conn = await connect(run)
    other = await connect(run)
    try:
        t = run.t("prep")
        await run.step(
            "load",
            conn.executemany(f"INSERT INTO {t} (k, v) VALUES ($1, $2)", [(i, f"v{i}") for i in range(1, 101)]),
        )
        stmt = await conn.prepare(f"SELECT k, v FROM {t} WHERE k = $1")
        run.record("attributes", [(a.name, a.type.name) for a in stmt.get_attributes()])
        run.record("parameters", [p.name for p in stmt.get_parameters()])
        run.record("fetchrow x120", [await stmt.fetchrow(i) for i in range(1, 121)])
        run.record("fetchval", [await stmt.fetchval(i, column=1) for i in (3, 200)])
        # The same text through the connection's statement cache, and on another connection.
        run.record("cached fetch", [await conn.fetch(f"SELECT k, v FROM {t} WHERE k = $1", i) for i in range(1, 30)])
        run.record("other connection", [await other.fetchrow(f"SELECT k, v FROM {t} WHERE k = $1", i) for i in range(1, 30)])
        named = await conn.prepare(f"SELECT v FROM {t} WHERE k = $1", name="explicitly_named")
        run.record("named statement", [await named.fetchval(i) for i in range(40, 50)])
        spanning = await conn.prepare(f"SELECT k, v FROM {t} WHERE k = ANY($1::int[]) ORDER BY k DESC")
        run.record("keys spanning shards", await spanning.fetch([3, 50, 99, 7, 1000]))
        run.record("aggregate", await conn.fetch(f"SELECT count(*), min(v), max(k), sum(k) FROM {t}"))
        # More distinct statements than asyncpg's cache holds (100): evicted ones are closed
        # (Close messages) while new ones are parsed.
        values = []
        for i in range(160):
            values.append(await conn.fetchval(f"SELECT v FROM {t} WHERE k = $1 AND {i} >= 0", i % 100 + 1))
        run.record("160 distinct statements", values)
        # Back to the first statements after their eviction.
        run.record("after eviction", [await conn.fetchval(f"SELECT v FROM {t} WHERE k = $1 AND {i} >= 0", 5) for i in range(5)])
        async with conn.transaction():
            run.record("in a transaction", [await stmt.fetchrow(i) for i in range(90, 95)])
            await conn.execute(f"UPDATE {t} SET v = v || '!' WHERE k = $1", 91)
            run.record("own write", await stmt.fetchrow(91))
        run.record("after commit", await other.fetchrow(f"SELECT k, v FROM {t} WHERE k = $1", 91))
        # Closed explicitly (asyncpg sends Close when the statement object is collected).
        del named
        run.record("reprepare after close", await conn.fetchval(f"SELECT v FROM {t} WHERE k = $1 AND 0 = 0", 60))
    finally:
        await conn.close()
        await other.close()


async def executemany(run):
    conn = await connect(run)
    try:
        t = run.t("many")
        ins = f"INSERT INTO {t} (k, n, v) VALUES ($1, $2, $3)"
        rows = [(k, n, f"r{k}-{n}") for k in range(1, 11) for n in range(50)]
        await run.step("executemany 500 rows over 10 keys", conn.executemany(ins, rows))
        run.record("contents", digest(await conn.fetch(f"SELECT * FROM {t} ORDER BY k, n")))
        run.record("count", await val(conn, f"SELECT count(*) FROM {t}"))
        # One implicit transaction (one Sync): a duplicate in the middle leaves nothing. One key,
        # so that on a sharded map the batch stays on one shard.
        bad = [(1000, n, "x") for n in range(20)] + [(1000, 5, "dup")] + [(1000, n, "y") for n in range(20, 40)]
        await run.step("executemany with a duplicate", conn.executemany(ins, bad))
        run.record("nothing of the failed batch", await conn.fetchval(f"SELECT count(*) FROM {t} WHERE k = 1000"))
        # In a transaction, across keys: the error aborts it.
        tr = conn.transaction()
        await tr.start()
        await run.step("executemany in a transaction", conn.executemany(ins, [(2000 + i, 1, "t") for i in range(10)]))
        bad = [(3000 + i, 1, "z") for i in range(10)] + [(2003, 1, "dup")]
        await run.step("failing executemany in a transaction", conn.executemany(ins, bad))
        await run.step("statement after the error", conn.fetchval("SELECT 1"))
        run.record("in transaction", conn.is_in_transaction())
        await run.step("rollback", tr.rollback())
        run.record("rolled back", await val(conn, f"SELECT count(*) FROM {t} WHERE k >= 2000"))
        upd = f"UPDATE {t} SET v = $3 WHERE k = $1 AND n = $2"
        await run.step("executemany update", conn.executemany(upd, [(k, n, f"u{n}") for k in range(1, 11) for n in range(0, 50, 7)]))
        run.record("after update", await conn.fetch(f"SELECT k, n, v FROM {t} WHERE v LIKE 'u%' ORDER BY k, n"))
        await run.step("executemany delete", conn.executemany(f"DELETE FROM {t} WHERE k = $1 AND n < $2", [(k, k * 3) for k in range(1, 11)]))
        run.record("after delete", await val(conn, f"SELECT count(*) FROM {t}"))
        await run.step("executemany of nothing", conn.executemany(ins, []))
        # Far more than socket buffers hold: the replies must flow while the client still sends.
        big = [(k, n, "x" * 50) for k in range(100, 110) for n in range(2000)]
        await run.step("executemany of 20000 rows", conn.executemany(ins, big))
        run.record("after the big batch", await conn.fetch(f"SELECT k, count(*) FROM {t} WHERE k >= 100 GROUP BY k ORDER BY k"))
    finally:
        await conn.close()


def typed_rows():
    utc = datetime.timezone.utc
    rows = [
        (1, 1, 2**40, "text \u00fc\u00ef \u2603", decimal.Decimal("12345.678900"),
         datetime.datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=utc), b"\x00\x01\xff\x00",
         [1, None, 3], ["a", "b,c", None, 'q"uote', "NULL", ""], '{"a": [1, 2, {"b": null}], "c": "\\u00e9"}',
         1.5, uuid.UUID("12345678-1234-5678-1234-567812345678"), datetime.date(2000, 1, 1),
         datetime.timedelta(days=3, seconds=7, microseconds=5), True, "happy"),
        (2,) + (None,) * 15,
        (3, -32768, -(2**63), "", decimal.Decimal("-0.001"),
         datetime.datetime(1970, 1, 1, tzinfo=utc), b"", [], [], "[]", float("inf"),
         uuid.UUID(int=0), datetime.date(1, 1, 1), datetime.timedelta(0), False, "sad"),
        (4, 32767, 2**63 - 1, "x" * 10000, decimal.Decimal("1e-30"),
         datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
         bytes(range(256)) * 40, [2**31 - 1, -(2**31)], ["\u00e9", "tab\there", "new\nline", "back\\slash"],
         '"just a string"', float("-inf"), uuid.uuid5(uuid.NAMESPACE_DNS, "tessera"),
         datetime.date(2024, 12, 31), datetime.timedelta(days=-1, seconds=1), None, "ok"),
        (5, 0, 0, "nan", decimal.Decimal("NaN"), None, b"\\", [[1, 2], [3, 4]], [[None]], "null",
         float("nan"), None, None, None, True, None),
    ]
    for k in range(6, 40):
        rows.append((k, k, k * 1000003, f"row {k}", decimal.Decimal(k) / 7, datetime.datetime(2020, 1, k % 28 + 1, tzinfo=utc),
                     bytes([k]) * k, list(range(k % 5)), [str(k)] * (k % 3), f'{{"k": {k}}}', k / 3,
                     uuid.UUID(int=k), datetime.date(2020, 1, k % 28 + 1), datetime.timedelta(hours=k),
                     k % 2 == 0, ["sad", "ok", "happy"][k % 3]))
    return rows


async def parameter_and_result_types(run):
    conn = await connect(run)
    try:
        t = run.t("types")
        cols = "k, i2, i8, t, num, ts, b, arr, tarr, j, f, u, d, iv, flag, mood"
        params = ", ".join(f"${i}" for i in range(1, 17))
        rows = typed_rows()
        await run.step("insert typed rows", conn.executemany(f"INSERT INTO {t} ({cols}) VALUES ({params})", rows))
        await run.step("all rows", conn.fetch(f"SELECT {cols} FROM {t} ORDER BY k"))
        run.record("row by row", [await conn.fetchrow(f"SELECT {cols} FROM {t} WHERE k = $1", r[0]) for r in rows])
        # The enum's type OID differs from shard to shard on a sharded map (created on each).
        await run.step("by enum parameter", conn.fetch(f"SELECT k FROM {t} WHERE mood = $1 ORDER BY k", "ok"))
        await run.step("by enum parameter and key", conn.fetch(f"SELECT k FROM {t} WHERE mood = $1 AND k = $2", "ok", 7))
        await run.step("enum parameter echoed", conn.fetch(f"SELECT $1::{run.t('mood')}", "sad"))
        await run.step("ordered by numeric desc", conn.fetch(f"SELECT k, num FROM {t} ORDER BY num DESC NULLS LAST, k LIMIT 10"))
        await run.step("ordered by timestamptz", conn.fetch(f"SELECT k, ts FROM {t} ORDER BY ts, k LIMIT 10 OFFSET 2"))
        casts = "$1::int2, $2::int8, $3::text, $4::numeric, $5::timestamptz, $6::bytea, $7::int[], $8::text[], $9::jsonb, $10::float8, $11::uuid, $12::date, $13::interval, $14::bool"
        run.record("parameters echoed", [await conn.fetchrow(f"SELECT {casts}", *r[1:15]) for r in rows[:6]])
        run.record("text forms", await conn.fetch(f"SELECT k, ts::text, num::text, b::text, arr::text, j::text, iv::text FROM {t} WHERE k < 6 ORDER BY k"))
        big = bytes(range(256)) * 4096
        run.record("1 MiB bytea round trip", hashlib.sha256(await conn.fetchval("SELECT $1::bytea", big)).hexdigest())
        rows = await conn.fetch("SELECT g, md5(g::text) FROM generate_series(1, 100000) g")
        run.record("100000 rows", (len(rows), digest(rows)))
        run.record("wide row", await conn.fetchrow("SELECT " + ", ".join(f"{i} AS c{i}" for i in range(300))))
        run.record("empty result", await conn.fetch(f"SELECT {cols} FROM {t} WHERE k < 0"))
    finally:
        await conn.close()


async def cursors_in_a_transaction(run):
    conn = await connect(run)
    try:
        t = run.t("cur")
        await run.step("load", conn.executemany(f"INSERT INTO {t} (k, n, v) VALUES ($1, $2, $3)",
                                                [(k, n, f"{k}:{n}") for k in (1, 2, 3) for n in range(60)]))
        async with conn.transaction():
            run.record("iterated with prefetch 7",
                       [r async for r in conn.cursor(f"SELECT k, n, v FROM {t} WHERE k = $1 ORDER BY n", 2, prefetch=7)])
            cur = await conn.cursor(f"SELECT n FROM {t} WHERE k = $1 ORDER BY n", 3)
            run.record("fetch 5", await cur.fetch(5))
            run.record("fetchrow", await cur.fetchrow())
            run.record("fetch the rest", await cur.fetch(100))
            run.record("fetch past the end", await cur.fetch(5))
            two = [await conn.cursor(f"SELECT n FROM {t} WHERE k = $1 ORDER BY n DESC", k) for k in (1, 3)]
            run.record("two open cursors", [await two[0].fetch(3), await two[1].fetch(3), await two[0].fetch(2)])
        # An error aborts the whole transaction, open portals included. On a sharded map the
        # error (a statement without tables: the first shard) and the portal may be on different
        # shards.
        async with conn.transaction():
            cur = await conn.cursor(f"SELECT n FROM {t} WHERE k = $1 ORDER BY n", 1)
            run.record("before an error", await cur.fetch(2))
            await run.step("error in the transaction", conn.fetchval("SELECT 1/0"))
            await run.step("cursor after the error", cur.fetch(2))
        run.record("after the failed transaction", await val(conn, f"SELECT count(*) FROM {t}"))
    finally:
        await conn.close()


async def cursor_forward(run):
    # Cursor.forward() moves the portal with a simple-protocol `MOVE FORWARD n <portal>`, a
    # statement the router cannot parse: refused on a sharded map (README, "Refused with 0A000").
    conn = await connect(run)
    try:
        t = run.t("cur")
        await run.step("load", conn.executemany(f"INSERT INTO {t} (k, n, v) VALUES ($1, $2, $3)",
                                                [(k, n, f"{k}:{n}") for k in (5, 6) for n in range(30)]))
        async with conn.transaction():
            cur = await conn.cursor(f"SELECT n FROM {t} WHERE k = $1 ORDER BY n", 5)
            run.record("fetch 5", await cur.fetch(5))
            await run.step("forward 10", cur.forward(10), refused=True)
            await run.step("fetchrow after the move", cur.fetchrow())
            await run.step("forward past the end", cur.forward(100))
            await run.step("fetch at the end", cur.fetch(3))
    finally:
        await conn.close()


async def cursor_without_a_key(run):
    conn = await connect(run)
    try:
        t = run.t("cur")
        await run.step("load", conn.executemany(f"INSERT INTO {t} (k, n, v) VALUES ($1, $2, $3)",
                                                [(k, n, f"{k}:{n}") for k in (10, 11, 12) for n in range(10)]))
        # A row-limited portal over every shard: refused by design on a sharded map.
        async with conn.transaction():
            await run.step("cursor without a key",
                           collect(conn.cursor(f"SELECT k, n FROM {t} WHERE k >= 10 ORDER BY k, n", prefetch=7)),
                           refused=True)
    finally:
        await conn.close()


async def fetchrow_across_shards(run):
    # asyncpg's fetchrow and fetchval send Execute with a row limit of 1: across shards a
    # row-limited Execute is refused by design on a sharded map, even when one row is all the
    # result has.
    conn = await connect(run)
    try:
        t = run.t("prep")
        await run.step("fetch count", conn.fetch(f"SELECT count(*) FROM {t}"))
        await run.step("fetchval count", conn.fetchval(f"SELECT count(*) FROM {t}"), refused=True)
    finally:
        await conn.close()


async def collect(cursor):
    return [r async for r in cursor]


async def transactions_and_savepoints(run):
    conn = await connect(run)
    try:
        t = run.t("tx")
        ins = f"INSERT INTO {t} (k, n, v) VALUES ($1, $2, $3)"
        contents = f"SELECT k, n, v FROM {t} ORDER BY k, n"
        async with conn.transaction():
            await conn.execute(ins, 1, 1, "outer")
            try:
                async with conn.transaction():
                    await conn.execute(ins, 2, 1, "inner, rolled back")
                    await conn.execute(ins, 1, 1, "duplicate")
            except asyncpg.PostgresError as exc:
                run.record("inner block failed", run.error(exc))
            await conn.execute(ins, 3, 1, "after the savepoint")
            async with conn.transaction():
                await conn.execute(ins, 4, 1, "released savepoint")
                async with conn.transaction():
                    await conn.execute(ins, 5, 1, "two levels deep")
            run.record("in transaction", conn.is_in_transaction())
        run.record("committed", await conn.fetch(contents))
        run.record("after commit", conn.is_in_transaction())

        tr = conn.transaction()
        await tr.start()
        await run.step("insert", conn.execute(ins, 6, 1, "rolled back"))
        await run.step("division by zero", conn.fetchval("SELECT 1/0"))
        await run.step("statement in the failed transaction", conn.fetchval("SELECT 1"))
        await run.step("another", conn.execute(ins, 7, 1, "never"))
        await run.step("rollback", tr.rollback())
        run.record("after rollback", await conn.fetch(contents))

        tr = conn.transaction(isolation="serializable", readonly=True)
        await tr.start()
        await run.step("read in a read-only transaction", conn.fetch(contents))
        await run.step("write in a read-only transaction", conn.execute(ins, 8, 1, "read only"))
        await run.step("rollback", tr.rollback())
        async with conn.transaction(isolation="repeatable_read"):
            run.record("isolation", await conn.fetchval("SHOW transaction_isolation"))

        # Transaction control as plain SQL, savepoints included.
        for sql in ["BEGIN", f"INSERT INTO {t} (k, n, v) VALUES (9, 1, 'sql')", "SAVEPOINT a",
                    f"INSERT INTO {t} (k, n, v) VALUES (9, 2, 'undone')", "ROLLBACK TO SAVEPOINT a",
                    f"INSERT INTO {t} (k, n, v) VALUES (9, 3, 'kept')", "RELEASE SAVEPOINT a", "COMMIT"]:
            await run.step(sql, conn.execute(sql))
        run.record("after SQL transaction", await conn.fetch(contents))
        await run.step("COMMIT outside a transaction", conn.execute("COMMIT"))
        await run.step("ROLLBACK TO a missing savepoint", conn.execute("BEGIN; ROLLBACK TO SAVEPOINT nope"))
        run.record("in failed transaction", conn.is_in_transaction())
        await run.step("rollback", conn.execute("ROLLBACK"))
        run.record("final", await conn.fetch(contents))
    finally:
        await conn.close()


async def an_error_aborts_the_whole_transaction(run):
    # Writes under several keys, then an error: Postgres aborts the whole transaction (every
    # later statement gets 25P02, and COMMIT rolls back). On a sharded map the keys and the
    # error land on different shards.
    conn = await connect(run)
    try:
        t = run.t("abort")
        ins = f"INSERT INTO {t} (k, v) VALUES ($1, $2)"
        for failing in ("SELECT 1/0", f"SELECT 1/0 FROM {t} WHERE k = 3", f"INSERT INTO {t} (k, v) VALUES (1, 'duplicate')"):
            await run.step("clean", conn.execute(f"DELETE FROM {t}"))
            await run.step("begin", conn.execute("BEGIN"))
            for k in range(1, 9):
                await run.step(f"insert {k}", conn.execute(ins, k, "before"))
            await run.step(failing, conn.execute(failing))
            for k in range(1, 9):
                await run.step(f"read {k} after the error", conn.fetch(f"SELECT v FROM {t} WHERE k = $1", k))
            for k in range(11, 15):
                await run.step(f"insert {k} after the error", conn.execute(ins, k, "after"))
            run.record("in transaction", conn.is_in_transaction())
            await run.step("commit", conn.execute("COMMIT"))
            run.record("in transaction after commit", conn.is_in_transaction())
            run.record("contents", await conn.fetch(f"SELECT k, v FROM {t} ORDER BY k"))
    finally:
        await conn.close()


async def copy_in_and_out(run):
    conn = await connect(run)
    try:
        t = run.t("copy")
        csv = "".join(f"{k},{n},\"c {k},{n}\"\n" for k in range(1, 6) for n in range(40))
        await run.step("copy_to_table csv",
                       conn.copy_to_table(t, source=io.BytesIO(csv.encode()), columns=["k", "n", "v"], format="csv"))
        text = "6\t1\t\\N\n6\t2\ttab\\there\n6\t3\tback\\\\slash\n"
        await run.step("copy_to_table text", conn.copy_to_table(t, source=io.BytesIO(text.encode()), columns=["k", "n", "v"]))
        await run.step("copy_to_table csv with header",
                       conn.copy_to_table(t, source=io.BytesIO(b"k,n,v\n7,1,h\n7,2,\n"), columns=["k", "n", "v"],
                                          format="csv", header=True))
        bad = io.BytesIO(b"8,1,fine\nnot-a-number,2,bad\n")
        await run.step("copy with a bad row", conn.copy_to_table(t, source=bad, columns=["k", "n", "v"], format="csv"))
        await run.step("statement after the failed copy", conn.fetchval("SELECT 1"))
        run.record("count", await val(conn, f"SELECT count(*) FROM {t}"))
        for fmt in ("csv", "text"):
            out = io.BytesIO()
            await run.step(f"copy_from_table {fmt}", conn.copy_from_table(t, output=out, columns=["k", "n", "v"], format=fmt))
            # A table has no order: compare the lines as a set.
            run.record(f"copy_from_table {fmt} lines", sorted(out.getvalue().decode().splitlines()))
        async with conn.transaction():
            await run.step("copy in a transaction",
                           conn.copy_to_table(t, source=io.BytesIO(b"9,1,a\n9,2,b\n"), columns=["k", "n", "v"], format="csv"))
            run.record("seen in the transaction", await conn.fetchval(f"SELECT count(*) FROM {t} WHERE k = 9"))
            await run.step("duplicate by copy", conn.copy_to_table(t, source=io.BytesIO(b"9,1,again\n"), columns=["k", "n", "v"], format="csv"))
    except asyncpg.PostgresError as exc:
        run.record("transaction ended by", run.error(exc))
    finally:
        run.record("final", await conn.fetch(f"SELECT k, n, v FROM {t} ORDER BY k, n"))
        await conn.close()


async def copy_records(run):
    conn = await connect(run)
    try:
        t = run.t("records")
        records = [(k, n, f"rec {k}-{n}" if n % 5 else None) for k in range(1, 6) for n in range(40)]
        # Binary COPY: refused with 0A000 on a sharded map.
        await run.step("copy_records_to_table", conn.copy_records_to_table(t, records=records, columns=["k", "n", "v"]),
                       refused=True)
        run.record("contents", await conn.fetch(f"SELECT k, n, v FROM {t} ORDER BY k, n"))
        await run.step("copy_records_to_table duplicate", conn.copy_records_to_table(t, records=[(1, 1, "dup")], columns=["k", "n", "v"]))
        run.record("count", await val(conn, f"SELECT count(*) FROM {t}"))
    finally:
        await conn.close()


async def copy_from_query(run):
    conn = await connect(run)
    try:
        out = io.BytesIO()
        await run.step("copy_from_query csv", conn.copy_from_query("SELECT g, g * 2, 'x' || g FROM generate_series(1, 2000) g", output=out, format="csv"))
        run.record("csv", digest(out.getvalue()))
        out = io.BytesIO()
        await run.step("copy_from_query with arguments", conn.copy_from_query("SELECT $1::int + g FROM generate_series(1, 5) g", 10, output=out))
        run.record("text", out.getvalue().decode())
        t = run.t("copyq")
        await run.step("load", conn.executemany(f"INSERT INTO {t} (k, v) VALUES ($1, $2)", [(k, f"q{k}") for k in range(1, 21)]))
        out = io.BytesIO()
        # COPY (query) of a sharded table: refused with 0A000 on a sharded map.
        await run.step("copy_from_query of a table", conn.copy_from_query(f"SELECT k, v FROM {t} ORDER BY k", output=out, format="csv"), refused=True)
        run.record("table csv", out.getvalue().decode())
    finally:
        await conn.close()


async def pool_of_ten(run):
    t = run.t("acct")
    conn = await connect(run)
    pool = await asyncpg.create_pool(host="127.0.0.1", port=run.port, user=run.user, password=run.password,
                                     database=run.database, min_size=10, max_size=10)
    try:
        await run.step("load", conn.executemany(f"INSERT INTO {t} (k, balance) VALUES ($1, 0)", [(w,) for w in range(1, 11)]))
        upd = f"UPDATE {t} SET balance = balance + $2 WHERE k = $1"
        sel = f"SELECT balance FROM {t} WHERE k = $1"

        async def worker(w):
            seen = []
            for i in range(50):
                if i % 3 == 0:
                    async with pool.acquire() as c:
                        async with c.transaction():
                            await c.execute(upd, w, i)
                            seen.append(await c.fetchval(sel, w))
                elif i % 3 == 1:
                    seen.append(await pool.execute(upd, w, i))
                else:
                    # Read in a transaction: on the primary, so another pooled client's commit is
                    # seen as on one server.
                    async with pool.acquire() as c:
                        async with c.transaction():
                            seen.append(await c.fetchrow(sel, w))
            return seen

        run.record("ten workers", await asyncio.gather(*(worker(w) for w in range(1, 11))))
        async with conn.transaction():
            run.record("final balances", await conn.fetch(f"SELECT k, balance FROM {t} ORDER BY k"))
            run.record("total", await val(conn, f"SELECT sum(balance) FROM {t}"))
    finally:
        await pool.close()
        await conn.close()


async def multi_statement_queries(run):
    conn = await connect(run)
    try:
        t = run.t("multi")
        contents = f"SELECT k, n FROM {t} ORDER BY k, n"
        # One key, so that on a sharded map every statement goes to the same shard.
        await run.step("three statements", conn.execute(
            f"INSERT INTO {t} (k, n) VALUES (1, 1); INSERT INTO {t} (k, n) VALUES (1, 2); UPDATE {t} SET n = n + 10 WHERE k = 1"))
        await run.step("a failing statement in the middle", conn.execute(
            f"INSERT INTO {t} (k, n) VALUES (1, 3); SELECT 1/0; INSERT INTO {t} (k, n) VALUES (1, 4)"))
        run.record("after the failure", await conn.fetch(contents))
        await run.step("BEGIN ... COMMIT in one string", conn.execute(
            f"BEGIN; INSERT INTO {t} (k, n) VALUES (1, 5); INSERT INTO {t} (k, n) VALUES (1, 6); COMMIT"))
        # The statement before BEGIN joins the transaction block and is rolled back with it.
        await run.step("a statement then BEGIN ... ROLLBACK", conn.execute(
            f"INSERT INTO {t} (k, n) VALUES (1, 7); BEGIN; INSERT INTO {t} (k, n) VALUES (1, 8); ROLLBACK"))
        run.record("contents", await conn.fetch(contents))
        await run.step("BEGIN left open by a string", conn.execute(f"BEGIN; INSERT INTO {t} (k, n) VALUES (1, 9)"))
        run.record("in transaction", conn.is_in_transaction())
        await run.step("read in it", conn.fetch(contents))
        await run.step("COMMIT", conn.execute("COMMIT"))
        run.record("in transaction after COMMIT", conn.is_in_transaction())
        await run.step("statements without tables", conn.execute("SELECT 1; SELECT 2; SET application_name = 'multi'; SELECT 3"))
        run.record("setting from a string", await conn.fetchval("SHOW application_name"))
        await run.step("empty statements", conn.execute(";;"))
        run.record("final", await conn.fetch(contents))
        # On a sharded map a statement the router cannot parse is refused inside a multi-statement
        # string (README, "Current limits").
        await run.step("syntax error in the second statement",
                       conn.execute(f"INSERT INTO {t} (k, n) VALUES (1, 10); SELEC 1"), refused=True)
        run.record("nothing of the failed string", await conn.fetch(contents))
    finally:
        await conn.close()


async def statement_cache_after_a_schema_change(run):
    conn = await connect(run)
    other = await connect(run)
    try:
        t = run.t("alter")
        await run.step("load", conn.executemany(f"INSERT INTO {t} (k, v) VALUES ($1, $2)", [(1, "one"), (2, "two")]))
        sql = f"SELECT * FROM {t} WHERE k = $1"
        await run.step("fetch", conn.fetch(sql, 1))
        await run.step("fetch on another connection", other.fetch(sql, 2))
        await run.step("alter table", conn.execute(f"ALTER TABLE {t} ADD COLUMN extra int DEFAULT 7"))
        # Postgres answers 0A000 "cached plan must not change result type"; outside a
        # transaction asyncpg then re-prepares the statement and retries, invisibly.
        await run.step("fetch after the change", conn.fetch(sql, 1))
        await run.step("fetch after the change, other connection", other.fetch(sql, 2))
        await run.step("alter again", other.execute(f"ALTER TABLE {t} ADD COLUMN more text DEFAULT 'm'"))
        # In a transaction asyncpg cannot retry: the error reaches the caller.
        tr = conn.transaction()
        await tr.start()
        await run.step("fetch in a transaction after the change", conn.fetch(sql, 1))
        await run.step("rollback", tr.rollback())
        await run.step("fetch after the rollback", conn.fetch(sql, 1))
        await run.step("alter column type", other.execute(f"ALTER TABLE {t} ALTER COLUMN extra TYPE bigint"))
        await run.step("fetch after a type change", conn.fetch(sql, 2))
        await run.step("drop column", other.execute(f"ALTER TABLE {t} DROP COLUMN more"))
        await run.step("fetch after a drop", other.fetch(sql, 2))
    finally:
        await conn.close()
        await other.close()


async def errors_keep_the_session(run):
    conn = await connect(run)
    try:
        t = run.t("errs")
        await run.step("insert", conn.execute(f"INSERT INTO {t} (k, v) VALUES ($1, $2)", 1, "one"))
        cases = [
            ("syntax error (extended)", conn.fetch, ("SELEC 1",)),
            ("syntax error (simple)", conn.execute, ("SELECT 1 +",)),
            ("undefined table", conn.fetch, ("SELECT * FROM no_such_table_for_drivers",)),
            ("undefined column", conn.fetch, (f"SELECT nope FROM {t}",)),
            ("division by zero", conn.fetchval, ("SELECT 1 / $1::int", 0)),
            ("bad cast", conn.fetchval, ("SELECT 'x'::int",)),
            ("unique violation", conn.execute, (f"INSERT INTO {t} (k, v) VALUES ($1, $2)", 1, "dup")),
            ("not null violation", conn.execute, (f"INSERT INTO {t} (k, v) VALUES ($1, $2)", 2, None)),
            ("wrong parameter count", conn.fetch, ("SELECT $1::int", 1, 2)),
            ("raise exception", conn.fetch, ("SELECT CASE WHEN $1::int > 0 THEN (SELECT 1/0) END", 1)),
        ]
        for label, fn, args in cases:
            await run.step(label, fn(*args))
            await run.step(f"after {label}", conn.fetchval("SELECT 42"))
        await run.step("two commands with parameters", conn.execute("SELECT $1::int; SELECT 2", 1))
        await run.step("after two commands", conn.fetchval("SELECT 43"))
        # asyncpg's own timeout cancels the query (CancelRequest) and the connection goes on.
        await run.step("client timeout", conn.fetch("SELECT pg_sleep(3)", timeout=0.3))
        await run.step("after the client timeout", conn.fetch("SELECT 44"))
        await run.step("set statement_timeout", conn.execute("SET statement_timeout = '200ms'"))
        await run.step("query over the timeout", conn.fetchval("SELECT pg_sleep(2)"))
        await run.step("setting kept", conn.fetchval("SHOW statement_timeout"))
        await run.step("reset", conn.execute("RESET statement_timeout"))
        await run.step("query after the reset", conn.fetchval("SELECT pg_sleep(0.3)::text"))
        run.record("final", await conn.fetch(f"SELECT k, v FROM {t} ORDER BY k"))
    finally:
        await conn.close()


async def session_settings(run):
    # Startup values as a user may write them: Postgres reports them in canonical form
    # (asyncpg itself sends client_encoding as 'utf-8', quotes included).
    conn = await connect(run, server_settings={"application_name": "drivers", "TimeZone": "america/new_york",
                                               "DateStyle": "iso, dmy"})
    other = await connect(run)
    try:
        def reported():
            s = conn.get_settings()
            return [s.application_name, s.TimeZone, s.DateStyle, s.client_encoding, s.integer_datetimes]

        run.record("reported at startup", reported())
        show = "SELECT current_setting('application_name'), current_setting('TimeZone'), '2024-03-01 12:00+00'::timestamptz::text"
        run.record("startup settings", await conn.fetchrow(show))
        run.record("other connection", await other.fetchrow(show))
        await run.step("set time zone", conn.execute("SET TIME ZONE 'Asia/Tokyo'"))
        run.record("reported after SET", reported())
        run.record("after SET", await conn.fetchrow(show))
        run.record("other connection after SET", await other.fetchrow(show))
        async with conn.transaction():
            await conn.execute("SET LOCAL TimeZone = 'UTC'")
            run.record("SET LOCAL", await conn.fetchrow(show))
        run.record("after SET LOCAL", await conn.fetchrow(show))
        tr = conn.transaction()
        await tr.start()
        await conn.execute("SET application_name = 'rolled back'")
        await tr.rollback()
        run.record("after a rolled back SET", await conn.fetchrow(show))
        run.record("reported after rollback", reported())
        await run.step("reset time zone", conn.execute("RESET TimeZone"))
        run.record("after RESET TimeZone", await conn.fetchrow(show))
        run.record("reported after RESET TimeZone", reported())
        await run.step("set application_name", conn.execute("SET application_name = 'changed'"))
        # What asyncpg's pool runs when a connection is released.
        await run.step("reset all", conn.execute(conn.get_reset_query()))
        run.record("after RESET ALL", await conn.fetchrow(show))
        run.record("reported after RESET ALL", reported())
    finally:
        await conn.close()
        await other.close()


async def without_statement_cache(run):
    # statement_cache_size=0 is what asyncpg users configure for transaction poolers: each query
    # is Parse("") + Describe + Sync, then Bind (binary parameters of the described types) +
    # Execute + Sync.
    conn = await connect(run, statement_cache_size=0)
    try:
        t = run.t("unnamed")
        ins = f"INSERT INTO {t} (k, n, v) VALUES ($1, $2, $3)"
        loader = await connect(run)
        await run.step("load through a cached statement", loader.executemany(ins, [(k, 0, f"{k}/0") for k in range(1, 6)]))
        await loader.close()
        await run.step("fetch by key", conn.fetch(f"SELECT n, v FROM {t} WHERE k = $1", 1))
        await run.step("execute with a key", conn.execute(ins, 1, 100, "first"))
        await run.step("executemany", conn.executemany(ins, [(k, n, f"{k}/{n}") for k in range(1, 6) for n in range(1, 20)]))
        fetched = []
        for k in range(40):
            fetched.append(await conn.fetch(f"SELECT n, v FROM {t} WHERE k = $1 AND n < $2 ORDER BY n", k % 5 + 1, k))
        run.record("fetch x40", fetched)
        await run.step("count", val(conn, f"SELECT count(*) FROM {t}"))
        async with conn.transaction():
            await run.step("cursor", collect(conn.cursor(f"SELECT n FROM {t} WHERE k = $1 ORDER BY n", 4, prefetch=6)))
        await run.step("error", conn.fetch(f"SELECT n / 0 FROM {t} WHERE k = $1", 1))
        await run.step("after the error", conn.fetch(f"SELECT v FROM {t} WHERE k = $1 AND n = $2", 2, 3))
    finally:
        await conn.close()


CASES = [
    prepared_statements,
    executemany,
    parameter_and_result_types,
    cursors_in_a_transaction,
    cursor_forward,
    cursor_without_a_key,
    fetchrow_across_shards,
    transactions_and_savepoints,
    an_error_aborts_the_whole_transaction,
    copy_in_and_out,
    copy_records,
    copy_from_query,
    pool_of_ten,
    multi_statement_queries,
    statement_cache_after_a_schema_change,
    errors_keep_the_session,
    session_settings,
    without_statement_cache,
]

if __name__ == "__main__":
    raise SystemExit(diffcheck.main(CASES, setup, teardown, list(TABLES), error_of))
