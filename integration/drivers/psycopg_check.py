"""Checks that psycopg 3 gets from Tessera exactly what it gets from Postgres: pipeline mode
(statements queued under one Sync, errors in the middle, explicit sync points, results fetched
mid-pipeline with a Flush, pipelines in transactions and savepoints), prepared statements
(prepare=True, automatic preparation, eviction with Close, DEALLOCATE ALL after a rollback),
executemany (with RETURNING), COPY in and out (text, CSV, binary), binary parameters and results,
server-side cursors (DECLARE / FETCH / MOVE in a transaction), autocommit against transactions,
multi-statement queries, notices, cancel, and several connections at once.

Usage: psycopg_check.py --direct PORT --proxy PORT --prefix NAME [--sharded]
"""

import asyncio
import datetime
import decimal
import hashlib
import uuid

import psycopg
from psycopg import errors as pgerrors

import diffcheck

TABLES = {
    "pipe_ac": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "pipe_sync": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "pipe_flush": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "pipe_tx": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "pipe_span": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "prep": "(k int PRIMARY KEY, v text NOT NULL)",
    "many": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "copy": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "bcopy": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "bin": "(k int PRIMARY KEY, i8 bigint, num numeric, ts timestamptz, b bytea, arr int[], j jsonb,"
    " f float8, u uuid, d date, flag bool, t text)",
    "named": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "ac": "(k int, n int, v text, PRIMARY KEY (k, n))",
    "conc": "(k int, n int, v text, PRIMARY KEY (k, n))",
}

# A function raising a notice (DO blocks are refused on a sharded map).
NOTE_FUNCTION = (
    "CREATE FUNCTION {name}(n int) RETURNS int LANGUAGE plpgsql AS "
    "$$BEGIN RAISE NOTICE 'note %', n; RAISE WARNING 'careful %', n; RETURN n * 2; END$$"
)

SYNC = object()


def error_of(exc):
    if isinstance(exc, psycopg.Error) and exc.sqlstate:
        diag = exc.diag
        message = diag.message_primary or str(exc)
        if diag.message_detail:
            message += f" | detail: {diag.message_detail}"
        if diag.statement_position:
            message += f" | position: {diag.statement_position}"
        return type(exc).__name__, exc.sqlstate, message
    return type(exc).__name__, None, str(exc).strip()


async def connect(run, autocommit=True, **kwargs):
    return await psycopg.AsyncConnection.connect(
        host="127.0.0.1",
        port=run.port,
        user=run.user,
        password=run.password,
        dbname=run.database,
        autocommit=autocommit,
        connect_timeout=5,
        **kwargs,
    )


async def rows(conn, sql, params=None, prepare=None):
    cur = await conn.execute(sql, params, prepare=prepare)
    return await cur.fetchall()


async def setup(run):
    conn = await connect(run)
    try:
        for kind, columns in TABLES.items():
            await run.step(f"create {kind}", conn.execute(f"CREATE TABLE {run.t(kind)} {columns}"))
        await run.step("create function", conn.execute(NOTE_FUNCTION.format(name=run.t("note"))))
    finally:
        await conn.close()


async def teardown(run):
    conn = await connect(run)
    try:
        for kind in TABLES:
            await run.step(f"drop {kind}", conn.execute(f"DROP TABLE IF EXISTS {run.t(kind)}"))
        await run.step("drop function", conn.execute(f"DROP FUNCTION IF EXISTS {run.t('note')}(int)"))
    finally:
        await conn.close()


async def pipeline(run, conn, items, raise_first=False):
    """Runs `items` ((sql, params) or SYNC) in one pipeline and returns what psycopg reported:
    the errors (in order, each once) and each statement's status and rows.

    psycopg raises a pipeline's error from whichever call first reads its result, which depends
    on when the server's reply arrives; and the statements skipped after it report
    PipelineAborted only when read separately. So errors are collected from every call, and
    PipelineAborted is left out: each statement's own outcome shows what was skipped."""
    errors = []
    cursors = []

    def note(exc):
        if isinstance(exc, pgerrors.PipelineAborted):
            return
        if raise_first:
            raise exc
        err = run.error(exc)
        if err not in errors:
            errors.append(err)

    try:
        async with conn.pipeline() as p:
            for item in items:
                try:
                    if item is SYNC:
                        await p.sync()
                    else:
                        cur = conn.cursor()
                        cursors.append(cur)
                        await cur.execute(*item)
                except psycopg.Error as exc:
                    note(exc)
    except psycopg.Error as exc:
        note(exc)
    outcome = []
    for cur in cursors:
        fetched = None
        if cur.pgresult is not None and cur.description is not None:
            fetched = await cur.fetchall()
        outcome.append([cur.statusmessage, fetched])
    return {"errors": errors, "statements": outcome, "status": conn.info.transaction_status.name}


async def pipeline_error_in_autocommit(run):
    conn = await connect(run)
    try:
        t = run.t("pipe_ac")
        ins = f"INSERT INTO {t} (k, n, v) VALUES (%s, %s, %s)"
        # One Sync: one implicit transaction, so the error undoes the statements before it.
        # One key, so that on a sharded map the batch stays on one shard.
        await run.step("one sync, error in the middle", pipeline(run, conn, [
            (ins, (1, 1, "a")), (ins, (1, 2, "b")), (ins, (1, 1, "duplicate")), (ins, (1, 3, "c")),
            (f"SELECT n FROM {t} WHERE k = %s ORDER BY n", (1,)),
        ]))
        await run.step("contents", rows(conn, f"SELECT k, n, v FROM {t} ORDER BY k, n"))
        await run.step("error in the first statement", pipeline(run, conn, [
            (f"INSERT INTO {t} (k, n, v) VALUES (%s, %s, %s::int::text)", (1, 4, "x")), (ins, (1, 5, "e")),
        ]))
        await run.step("error in the last statement", pipeline(run, conn, [
            (ins, (1, 6, "f")), (ins, (1, 7, "g")), (f"SELECT 1 / (n - n) FROM {t} WHERE k = %s", (1,)),
        ]))
        await run.step("syntax error", pipeline(run, conn, [(ins, (1, 8, "h")), ("SELEC %s", (1,)), (ins, (1, 9, "i"))]))
        await run.step("all good", pipeline(run, conn, [(ins, (1, n, f"ok{n}")) for n in range(10, 20)]
                                            + [(f"SELECT count(*) FROM {t} WHERE k = %s", (1,))]))
        await run.step("final", rows(conn, f"SELECT k, n, v FROM {t} ORDER BY k, n"))
        # Far more than socket buffers hold, under one Sync: the replies must flow while the
        # client still sends.
        big = [item for n in range(100, 2100) for item in ((ins, (2, n, "x" * 40)), (f"SELECT n, v FROM {t} WHERE k = %s AND n = %s", (2, n)))]
        outcome = await run.step("4000 statements under one sync", pipeline(run, conn, big))
        run.record("their replies", digest(outcome))
    finally:
        await conn.close()


def digest(value):
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


async def pipeline_sync_points(run):
    conn = await connect(run)
    try:
        t = run.t("pipe_sync")
        ins = f"INSERT INTO {t} (k, n, v) VALUES (%s, %s, %s)"
        # Each sync group commits or fails on its own; each uses one key (on a sharded map, a
        # group spread over shards commits shard by shard: README, "Current limits").
        await run.step("three groups, the second fails", pipeline(run, conn, [
            (ins, (1, 1, "group 1")), (ins, (1, 2, "group 1")), SYNC,
            (ins, (2, 1, "group 2")), (ins, (2, 1, "duplicate")), (ins, (2, 2, "skipped")), SYNC,
            (ins, (3, 1, "group 3")), (f"SELECT k, n FROM {t} WHERE k = %s ORDER BY n", (1,)),
        ]))
        await run.step("contents", rows(conn, f"SELECT k, n, v FROM {t} ORDER BY k, n"))
        await run.step("many small groups", pipeline(run, conn, [
            item for n in range(20) for item in ((ins, (4, n, f"g{n}")), SYNC)
        ] + [(ins, (4, 5, "duplicate")), SYNC, (f"SELECT count(*) FROM {t} WHERE k = %s", (4,))]))
        await run.step("final", rows(conn, f"SELECT k, n, v FROM {t} ORDER BY k, n"))
    finally:
        await conn.close()


async def pipeline_fetch_in_the_middle(run):
    # Reading a result inside a pipeline makes psycopg send a Flush, not a Sync: the statements
    # so far stay in the implicit transaction the next error rolls back.
    conn = await connect(run)
    try:
        t = run.t("pipe_flush")
        ins = f"INSERT INTO {t} (k, n, v) VALUES (%s, %s, %s) RETURNING n, v"
        fetched = []
        errors = []
        try:
            async with conn.pipeline():
                cur = await conn.execute(ins, (1, 1, "a"))
                fetched.append(await cur.fetchall())
                cur = await conn.execute(f"SELECT count(*) FROM {t} WHERE k = %s", (1,))
                fetched.append(await cur.fetchall())
                await conn.execute(ins, (1, 2, "b"))
                cur = await conn.execute(ins, (1, 1, "duplicate"))
                fetched.append(await cur.fetchall())
        except psycopg.Error as exc:
            errors.append(run.error(exc))
        run.record("fetched", fetched)
        run.record("errors", errors)
        await run.step("contents after the failure", rows(conn, f"SELECT k, n, v FROM {t} ORDER BY k, n"))
        fetched = []
        async with conn.pipeline():
            for n in range(3, 8):
                cur = await conn.execute(ins, (1, n, f"v{n}"))
                fetched.append(await cur.fetchone())
            cur = await conn.execute(f"SELECT n FROM {t} WHERE k = %s ORDER BY n", (1,))
            fetched.append(await cur.fetchall())
        run.record("fetched one by one", fetched)
        run.record("status", conn.info.transaction_status.name)
        await run.step("final", rows(conn, f"SELECT k, n, v FROM {t} ORDER BY k, n"))
    finally:
        await conn.close()


async def pipeline_in_a_transaction(run):
    conn = await connect(run, autocommit=False)
    try:
        t = run.t("pipe_tx")
        ins = f"INSERT INTO {t} (k, n, v) VALUES (%s, %s, %s)"
        # psycopg queues its BEGIN in the pipeline; the keys spread over the shards.
        await run.step("committed", pipeline(run, conn, [(ins, (k, 1, "ok")) for k in range(1, 11)]))
        await run.step("commit", conn.commit())
        await run.step("failing", pipeline(run, conn, [(ins, (k, 2, "rolled back")) for k in range(1, 11)]
                                           + [(ins, (5, 1, "duplicate")), (ins, (11, 1, "skipped"))]))
        run.record("status after the failure", conn.info.transaction_status.name)
        await run.step("statement after the failure", rows(conn, "SELECT 1"))
        await run.step("rollback", conn.rollback())
        await run.step("contents", rows(conn, f"SELECT k, n, v FROM {t} ORDER BY k, n"))
        await run.step("commit the read", conn.commit())
        # Savepoints inside a pipeline: the inner block fails and is rolled back alone. One key:
        # psycopg sends ROLLBACK TO and RELEASE under one Sync, which a transaction spanning
        # shards refuses (see savepoint_rollback_batched_with_release).
        inner_error = None
        async with conn.pipeline():
            async with conn.transaction():
                await conn.execute(ins, (20, 1, "outer"))
                try:
                    async with conn.transaction():
                        await conn.execute(ins, (20, 2, "inner"))
                        await conn.execute(ins, (20, 1, "duplicate"))
                except psycopg.Error as exc:
                    inner_error = run.error(exc)
                await conn.execute(ins, (20, 3, "after the savepoint"))
                async with conn.transaction():
                    await conn.execute(ins, (20, 4, "released savepoint"))
        run.record("inner error", inner_error)
        await run.step("contents after savepoints", rows(conn, f"SELECT k, n, v FROM {t} WHERE k >= 20 ORDER BY k, n"))
        await run.step("commit", conn.commit())
        # A Python exception inside transaction() rolls it back.
        try:
            async with conn.pipeline(), conn.transaction():
                await conn.execute(ins, (30, 1, "never"))
                raise RuntimeError("abandon")
        except RuntimeError:
            pass
        await run.step("after an abandoned transaction", rows(conn, f"SELECT count(*) FROM {t} WHERE k = %s", (30,)))
        await run.step("commit", conn.commit())
    finally:
        await conn.close()


async def pipeline_spanning_shards(run):
    # A statement over every shard queued with others under one Sync: refused by design on a
    # sharded map (send a Sync per statement).
    conn = await connect(run)
    try:
        t = run.t("pipe_span")
        ins = f"INSERT INTO {t} (k, n, v) VALUES (%s, %s, %s)"
        await run.step("load", pipeline(run, conn, [item for k in range(1, 6) for item in ((ins, (k, 1, "x")), SYNC)]))
        await run.step("count with synced statements", pipeline(run, conn, [
            (f"SELECT count(*) FROM {t}", None), SYNC, (ins, (6, 1, "y")), SYNC, (f"SELECT count(*) FROM {t}", None)]))
        await run.step("count with another statement under one sync", pipeline(run, conn, [
            (ins, (7, 1, "z")), (f"SELECT count(*) FROM {t}", None)], raise_first=True), refused=True)
        await run.step("contents", rows(conn, f"SELECT k, n, v FROM {t} ORDER BY k, n"))
    finally:
        await conn.close()


async def savepoint_rollback_batched_with_release(run):
    # What psycopg's nested transaction() sends in pipeline mode when its block fails:
    # ROLLBACK TO and RELEASE under one Sync. In a transaction spanning shards the proxy refuses
    # transaction control batched with other statements (README, "Refused with 0A000").
    conn = await connect(run, autocommit=False)
    try:
        t = run.t("pipe_tx")
        ins = f"INSERT INTO {t} (k, n, v) VALUES (%s, %s, %s)"
        for k in range(40, 50):
            await conn.execute(ins, (k, 1, "before"))
        await conn.execute("SAVEPOINT s1")
        await run.step("duplicate", conn.execute(ins, (40, 1, "duplicate")))
        await run.step("rollback to and release in one batch", pipeline(run, conn, [
            ("ROLLBACK TO SAVEPOINT s1", None), ("RELEASE SAVEPOINT s1", None)], raise_first=True), refused=True)
        await run.step("insert after", conn.execute(ins, (50, 1, "after")))
        await run.step("commit", conn.commit())
        await run.step("contents", rows(conn, f"SELECT k, n, v FROM {t} WHERE k >= 40 ORDER BY k, n"))
        await run.step("commit the read", conn.commit())
    finally:
        await conn.close()


async def deallocate_through_the_extended_protocol(run):
    # DEALLOCATE ALL and DISCARD ALL sent as prepared statements (prepare=True, or any
    # statement once prepare_threshold is 0) rather than as a simple Query. Afterwards the
    # client prepares its statements again; another client uses the same text.
    for command in ("DEALLOCATE ALL", "DISCARD ALL"):
        conn = await connect(run)
        other = await connect(run)
        try:
            t = run.t("prep")
            q = f"SELECT v, %s::text FROM {t} WHERE k = %s"
            await run.step(f"prepared before {command}", rows(conn, q, (command, 12), prepare=True))
            await run.step(f"other client before {command}", rows(other, q, (command, 13), prepare=True))
            await run.step(command, conn.execute(command, prepare=True))
            await run.step(f"prepared again after {command}", rows(conn, q, (command, 14), prepare=True))
            await run.step(f"other client after {command}", rows(other, q, (command, 15), prepare=True))
            third = await connect(run)
            try:
                await run.step(f"new client after {command}", rows(third, q, (command, 16), prepare=True))
            finally:
                await third.close()
        finally:
            await conn.close()
            await other.close()


async def prepared_statements(run):
    conn = await connect(run)
    try:
        t = run.t("prep")
        await run.step("load", conn.cursor().executemany(f"INSERT INTO {t} (k, v) VALUES (%s, %s)",
                                                         [(k, f"v{k}") for k in range(1, 101)]))
        q = f"SELECT k, v FROM {t} WHERE k = %s"
        got = []
        for k in range(1, 61):
            got.append(await (await conn.execute(q, (k,), prepare=True)).fetchall())
        run.record("prepare=True x60", got)
        # Automatic preparation after prepare_threshold (5) executions.
        got = []
        for k in range(1, 12):
            got.append(await (await conn.execute(f"SELECT v FROM {t} WHERE k = %s AND true", (k,))).fetchall())
        run.record("prepared on the 6th execution", got)
        # More statements than prepared_max: the oldest are closed (Close) and parsed again.
        conn.prepared_max = 3
        got = []
        for rnd in range(4):
            for i in range(8):
                cur = await conn.execute(f"SELECT v, {i} FROM {t} WHERE k = %s", (rnd * 8 + i + 1,), prepare=True)
                got.append(await cur.fetchall())
        run.record("evicted and prepared again", got)
        got = []
        for k in range(1, 6):
            got.append(await (await conn.execute(f"SELECT k, v FROM {t} WHERE k = %b", (k,), prepare=True)).fetchall())
        run.record("binary key parameter", got)
        await run.step("prepare=False", rows(conn, q, (3,)))
        await run.step("failing prepared statement", conn.execute(f"SELECT k / 0 FROM {t} WHERE k = %s", (1,), prepare=True))
        await run.step("prepared after the failure", rows(conn, q, (4,)))
        await run.step("statement that fails to prepare", conn.execute("SELECT nope FROM no_such_table_for_drivers WHERE x = %s", (1,), prepare=True))
        await run.step("after that", rows(conn, q, (5,)))
    finally:
        await conn.close()


async def prepared_statements_and_rollback(run):
    # psycopg forgets its prepared statements after a ROLLBACK (or DROP, ALTER...) and sends
    # DEALLOCATE ALL.
    conn = await connect(run, autocommit=False)
    try:
        conn.prepare_threshold = 0
        t = run.t("prep")
        q = f"SELECT v FROM {t} WHERE k = %s"
        await run.step("in a transaction", rows(conn, q, (7,)))
        await run.step("rollback", conn.rollback())
        await run.step("prepared again", rows(conn, q, (8,)))
        await run.step("commit", conn.commit())
        await run.step("again", rows(conn, q, (9,)))
        await run.step("explicit DEALLOCATE ALL", conn.execute("DEALLOCATE ALL"))
        await run.step("after DEALLOCATE ALL", rows(conn, q, (10,)))
        await run.step("ROLLBACK as SQL", conn.execute("ROLLBACK"))
        await run.step("after ROLLBACK as SQL", rows(conn, q, (11,)))
        await run.step("commit", conn.commit())
    finally:
        await conn.close()


async def executemany(run):
    conn = await connect(run)
    try:
        t = run.t("many")
        ins = f"INSERT INTO {t} (k, n, v) VALUES (%s, %s, %s)"
        cur = conn.cursor()
        await run.step("500 rows over 10 keys", cur.executemany(ins, [(k, n, f"r{k}-{n}") for k in range(1, 11) for n in range(50)]))
        run.record("rowcount", cur.rowcount)
        await run.step("count", rows(conn, f"SELECT k, count(*) FROM {t} GROUP BY k ORDER BY k"))
        returned = []
        await run.step("with RETURNING", cur.executemany(ins + " RETURNING k, n, v", [(20 + k, 1, f"ret{k}") for k in range(5)], returning=True))
        while True:
            returned.append(await cur.fetchall())
            if not cur.nextset():
                break
        run.record("returned", returned)
        # One key: on a sharded map the failing batch stays on one shard, and, as on Postgres,
        # leaves nothing.
        await run.step("failing batch", cur.executemany(ins, [(30, n, "x") for n in range(20)] + [(30, 3, "duplicate")]))
        await run.step("nothing of it", rows(conn, f"SELECT count(*) FROM {t} WHERE k = %s", (30,)))
        await run.step("update", cur.executemany(f"UPDATE {t} SET v = %s WHERE k = %s AND n = %s", [(f"u{k}", k, 7) for k in range(1, 11)]))
        run.record("update rowcount", cur.rowcount)
        await run.step("updated", rows(conn, f"SELECT k, n, v FROM {t} WHERE v LIKE 'u%%' ORDER BY k, n"))
        await run.step("delete", cur.executemany(f"DELETE FROM {t} WHERE k = %s AND n >= %s", [(k, 40) for k in range(1, 11)]))
        run.record("delete rowcount", cur.rowcount)
        async with conn.transaction():
            await run.step("in a transaction across keys", cur.executemany(ins, [(40 + k, 1, "tx") for k in range(10)]))
        await run.step("committed", rows(conn, f"SELECT count(*) FROM {t} WHERE k >= %s", (40,)))
        try:
            async with conn.transaction():
                await cur.executemany(ins, [(50 + k, 1, "tx") for k in range(10)] + [(40, 1, "duplicate")])
        except psycopg.Error as exc:
            run.record("failing in a transaction", run.error(exc))
        await run.step("rolled back", rows(conn, f"SELECT count(*) FROM {t} WHERE k >= %s", (50,)))
        await run.step("final", rows(conn, f"SELECT k, count(*), min(n), max(v) FROM {t} GROUP BY k ORDER BY k"))
    finally:
        await conn.close()


async def copy_text_and_csv(run):
    conn = await connect(run)
    try:
        t = run.t("copy")
        cur = conn.cursor()
        async with cur.copy(f"COPY {t} (k, n, v) FROM STDIN") as copy:
            for k in range(1, 6):
                for n in range(100):
                    await copy.write_row((k, n, None if n % 7 == 0 else f"text {k}\t{n}\\"))
        run.record("write_row rowcount", cur.rowcount)
        async with cur.copy(f"COPY {t} (k, n, v) FROM STDIN (FORMAT csv, HEADER true)") as copy:
            await copy.write("k,n,v\n")
            await copy.write("".join(f'6,{n},"csv, {n}"\n' for n in range(50)))
        run.record("csv rowcount", cur.rowcount)

        async def copy_in(sql, data):
            async with cur.copy(sql) as copy:
                await copy.write(data)
            return cur.rowcount

        await run.step("bad row", copy_in(f"COPY {t} (k, n, v) FROM STDIN (FORMAT csv)", "7,1,ok\nseven,2,bad\n"))
        await run.step("duplicate row", copy_in(f"COPY {t} (k, n, v) FROM STDIN (FORMAT csv)", "8,1,ok\n1,1,duplicate\n"))
        await run.step("after the failures", rows(conn, f"SELECT count(*) FROM {t}"))

        async def copy_out(sql):
            out = []
            async with cur.copy(sql) as copy:
                async for row in copy.rows():
                    out.append(row)
            return out

        # A table has no order (on a sharded map, one shard's rows follow the other's): compare
        # the rows as a set.
        await run.step("table out", sorted_rows(copy_out(f"COPY {t} (k, n, v) TO STDOUT")))
        await run.step("query out", copy_out("COPY (SELECT g, g * g, 'q' || g FROM generate_series(1, 1000) g) TO STDOUT (FORMAT csv)"))
        async with conn.transaction():
            await run.step("copy in a transaction", copy_in(f"COPY {t} (k, n, v) FROM STDIN", "9\t1\tin tx\n9\t2\tin tx\n"))
            await run.step("seen", rows(conn, f"SELECT k, n, v FROM {t} WHERE k = %s ORDER BY n", (9,)))
        await run.step("final", rows(conn, f"SELECT k, count(*), count(v) FROM {t} GROUP BY k ORDER BY k"))
    finally:
        await conn.close()


async def sorted_rows(work):
    return sorted(await work, key=repr)


async def copy_binary(run):
    # COPY in binary format: refused by design on a sharded map.
    conn = await connect(run)
    try:
        t = run.t("bcopy")
        cur = conn.cursor()

        async def copy_in():
            async with cur.copy(f"COPY {t} (k, n, v) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "int4", "text"])
                for k in range(1, 4):
                    for n in range(30):
                        await copy.write_row((k, n, f"b{k}.{n}"))
            return cur.rowcount

        await run.step("binary copy in", copy_in(), refused=True)
        out = []
        async with cur.copy(f"COPY (SELECT k, n, v FROM {t} ORDER BY k, n) TO STDOUT (FORMAT BINARY)") as copy:
            copy.set_types(["int4", "int4", "text"])
            async for row in copy.rows():
                out.append(row)
        run.record("binary copy out", out)
    finally:
        await conn.close()


def typed_rows():
    utc = datetime.timezone.utc
    out = [
        (1, 2**62, decimal.Decimal("-123.4500"), datetime.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=utc),
         b"\x00\xff", [1, None, -3], {"a": [1, {"b": None}]}, -0.0, uuid.UUID(int=1), datetime.date(2024, 2, 29), True, "\u00e9t\u00e9"),
        (2, None, None, None, None, None, None, None, None, None, None, None),
        (3, -(2**63), decimal.Decimal("NaN"), datetime.datetime(1, 1, 1, tzinfo=utc), b"", [], [], float("nan"),
         uuid.UUID(int=2**128 - 1), datetime.date(9999, 12, 31), False, ""),
    ]
    for k in range(4, 30):
        out.append((k, k * 7919, decimal.Decimal(k) / 3, datetime.datetime(2021, k % 12 + 1, 1, tzinfo=utc),
                    bytes([k % 256]) * k, list(range(k % 4)), {"k": k}, k / 7, uuid.UUID(int=k),
                    datetime.date(2021, 1, k % 28 + 1), k % 3 == 0, f"t{k:03}"))
    return out


async def binary_parameters_and_results(run):
    conn = await connect(run)
    try:
        t = run.t("bin")
        cols = "k, i8, num, ts, b, arr, j, f, u, d, flag, t"
        cur = conn.cursor()
        data = [tuple(psycopg.types.json.Jsonb(v) if isinstance(v, (dict, list)) and i == 6 else v for i, v in enumerate(r))
                for r in typed_rows()]
        await run.step("insert with binary parameters",
                       cur.executemany(f"INSERT INTO {t} ({cols}) VALUES ({', '.join(['%b'] * 12)})", data))
        for binary in (False, True):
            mode = "binary" if binary else "text"
            bcur = conn.cursor(binary=binary)
            await run.step(f"all rows, {mode}", bcur.execute(f"SELECT {cols} FROM {t} ORDER BY k"))
            run.record(f"rows, {mode}", await bcur.fetchall())
            got = []
            for k in (1, 2, 3, 17):
                await bcur.execute(f"SELECT {cols} FROM {t} WHERE k = %b", (k,))
                got.append(await bcur.fetchall())
            run.record(f"by binary key, {mode}", got)
            await bcur.execute(f"SELECT k, num, ts FROM {t} ORDER BY num DESC NULLS FIRST, k LIMIT 8")
            run.record(f"ordered by numeric, {mode}", await bcur.fetchall())
            await bcur.execute(f"SELECT flag, count(*), sum(i8), min(ts), max(t) FROM {t} GROUP BY flag ORDER BY flag")
            run.record(f"grouped, {mode}", await bcur.fetchall())
        await run.step("binary=True on execute", rows_binary(conn, f"SELECT k, b, u FROM {t} WHERE k = ANY(%s) ORDER BY k", ([1, 5, 9],)))
        await run.step("binary echo", rows_binary(conn, "SELECT %b::numeric, %b::timestamptz, %b::int[]",
                                                  (decimal.Decimal("1.10"), datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc), [1, 2])))
    finally:
        await conn.close()


async def rows_binary(conn, sql, params):
    cur = await conn.execute(sql, params, binary=True)
    return await cur.fetchall()


async def server_side_cursors(run):
    # psycopg's named cursors are SQL cursors: DECLARE, then Describe of the portal the DECLARE
    # made, FETCH FORWARD and MOVE.
    conn = await connect(run, autocommit=False)
    try:
        t = run.t("named")
        ins = f"INSERT INTO {t} (k, n, v) VALUES (%s, %s, %s)"
        await conn.cursor().executemany(ins, [(k, n, f"{k}.{n}") for k in (1, 2) for n in range(40)])
        await run.step("commit", conn.commit())
        cur = conn.cursor(name="drivers_cursor")
        await run.step("declare", cur.execute(f"SELECT n, v FROM {t} WHERE k = %s ORDER BY n", (1,)), refused=True)
        run.record("description", [(c.name, c.type_code) for c in cur.description or []])
        await run.step("fetchmany 5", cur.fetchmany(5))
        await run.step("scroll 3", cur.scroll(3))
        await run.step("fetchone", cur.fetchone())
        await run.step("fetchall", cur.fetchall())
        await run.step("close", cur.close())
        cur = conn.cursor(name="drivers_iter")
        cur.itersize = 7
        await cur.execute(f"SELECT n FROM {t} WHERE k = %s ORDER BY n DESC", (2,))
        run.record("iterated by 7", [r async for r in cur])
        await cur.close()
        cur = conn.cursor(name="drivers_scroll", scrollable=True)
        await cur.execute(f"SELECT n FROM {t} WHERE k = %s ORDER BY n", (2,))
        await run.step("scroll to 30", cur.scroll(30, mode="absolute"))
        await run.step("fetchone at 30", cur.fetchone())
        await run.step("scroll back", cur.scroll(-5))
        await run.step("fetchmany after scrolling back", cur.fetchmany(3))
        await cur.close()
        bcur = conn.cursor(name="drivers_binary", binary=True)
        await bcur.execute(f"SELECT n, v FROM {t} WHERE k = %s ORDER BY n", (1,))
        await run.step("binary named cursor", bcur.fetchmany(4))
        await bcur.close()
        await run.step("commit", conn.commit())
        cur = conn.cursor(name="drivers_missing")
        await run.step("error in the query", cur.execute(f"SELECT n / 0 FROM {t} WHERE k = %s", (1,)))
        run.record("status", conn.info.transaction_status.name)
        await run.step("rollback", conn.rollback())
    finally:
        await conn.close()


async def autocommit_and_transactions(run):
    conn = await connect(run, autocommit=False)
    try:
        t = run.t("ac")
        ins = f"INSERT INTO {t} (k, n, v) VALUES (%s, %s, %s)"
        contents = f"SELECT k, n, v FROM {t} ORDER BY k, n"

        def status():
            return conn.info.transaction_status.name

        run.record("idle at start", status())
        await run.step("insert", conn.execute(ins, (1, 1, "rolled back")))
        run.record("in a transaction", status())
        await run.step("rollback", conn.rollback())
        await run.step("insert again", conn.execute(ins, (1, 2, "committed")))
        await run.step("insert another key", conn.execute(ins, (2, 1, "committed")))
        await run.step("commit", conn.commit())
        run.record("idle after commit", status())
        await run.step("contents", rows(conn, contents))
        await run.step("error", conn.execute(ins, (1, 2, "duplicate")))
        run.record("failed transaction", status())
        await run.step("statement after the error", conn.execute("SELECT 1"))
        await run.step("commit of a failed transaction", conn.commit())
        run.record("after it", status())
        await run.step("contents", rows(conn, contents))
        async with conn.transaction():
            await conn.execute(ins, (3, 1, "transaction block"))
            try:
                async with conn.transaction():
                    await conn.execute(ins, (4, 1, "savepoint"))
                    await conn.execute(ins, (3, 1, "duplicate"))
            except psycopg.Error as exc:
                run.record("savepoint failed", run.error(exc))
            await conn.execute(ins, (5, 1, "after the savepoint"))
        await run.step("contents after a transaction block", rows(conn, contents))
        await run.step("commit", conn.commit())
        await conn.set_read_only(True)
        await conn.set_isolation_level(psycopg.IsolationLevel.SERIALIZABLE)
        await run.step("read in a read-only serializable transaction", rows(conn, "SHOW transaction_isolation"))
        await run.step("write in it", conn.execute(ins, (6, 1, "read only")))
        await run.step("rollback", conn.rollback())
        await conn.set_read_only(None)
        await conn.set_isolation_level(None)
        await conn.set_autocommit(True)
        await run.step("autocommit insert", conn.execute(ins, (7, 1, "autocommit")))
        run.record("idle in autocommit", status())
        await run.step("explicit BEGIN", conn.execute("BEGIN"))
        await run.step("insert in it", conn.execute(ins, (8, 1, "explicit")))
        run.record("in an explicit transaction", status())
        await run.step("explicit ROLLBACK", conn.execute("ROLLBACK"))
        run.record("after explicit ROLLBACK", status())
        await run.step("final", rows(conn, contents))
    finally:
        await conn.close()


async def client_side_binding(run):
    # ClientCursor merges the parameters into the text and sends simple Queries.
    conn = await connect(run, cursor_factory=psycopg.AsyncClientCursor)
    try:
        t = run.t("ac")
        ins = f"INSERT INTO {t} (k, n, v) VALUES (%s, %s, %s)"
        cur = conn.cursor()
        for k in range(100, 110):
            await run.step(f"insert {k}", cur.execute(ins, (k, 1, f"it's {k}")))
        await run.step("select by key", rows(conn, f"SELECT k, n, v FROM {t} WHERE k = %s", (105,)))
        await run.step("select by keys", rows(conn, f"SELECT k, v FROM {t} WHERE k IN (%s, %s, %s) ORDER BY k", (101, 108, 999)))
        await run.step("executemany", cur.executemany(ins, [(k, 2, None) for k in range(100, 110)]))
        await run.step("contents", rows(conn, f"SELECT k, n, v FROM {t} WHERE k >= %s ORDER BY k, n", (100,)))
        await run.step("error", cur.execute(ins, (100, 1, "duplicate")))
        await run.step("after the error", rows(conn, "SELECT %s::text", ("still here",)))
    finally:
        await conn.close()


async def multi_statement_and_notices(run):
    conn = await connect(run)
    notices = []
    conn.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.sqlstate, d.message_primary)))
    try:
        # Without parameters psycopg sends a simple Query: several statements, several results.
        cur = await conn.execute("SELECT 1 AS a; SELECT 'x' AS b, 2 AS c; VALUES (1), (2), (3)")
        sets = []
        while True:
            sets.append([[c.name for c in cur.description], await cur.fetchall()])
            if not cur.nextset():
                break
        run.record("three result sets", sets)
        await run.step("error in the second statement", conn.execute("SELECT 1; SELECT 1/0; SELECT 3"))
        await run.step("function raising notices", rows(conn, f"SELECT {run.t('note')}(%s)", (21,)))
        await run.step("notices in a multi-statement query", conn.execute(f"SELECT {run.t('note')}(1); SELECT {run.t('note')}(2)"))
        run.record("notices", notices)
        await run.step("empty query", conn.execute(""))
        await run.step("only a comment", conn.execute("-- nothing"))
    finally:
        await conn.close()


async def do_block_notice(run):
    # DO is refused by design on a sharded map.
    conn = await connect(run)
    notices = []
    conn.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary)))
    try:
        await run.step("DO", conn.execute("DO $$BEGIN RAISE NOTICE 'from DO'; END$$"), refused=True)
        run.record("notices", notices)
    finally:
        await conn.close()


async def cancel(run):
    conn = await connect(run)
    try:
        task = asyncio.ensure_future(conn.execute("SELECT pg_sleep(8)"))
        await asyncio.sleep(0.5)
        await conn.cancel_safe()
        await run.step("cancelled query", task)
        await run.step("after the cancel", rows(conn, "SELECT 42"))
        conn2 = await connect(run, autocommit=False)
        try:
            await conn2.execute("SELECT 1")
            task = asyncio.ensure_future(conn2.execute("SELECT pg_sleep(8)"))
            await asyncio.sleep(0.5)
            await conn2.cancel_safe()
            await run.step("cancelled in a transaction", task)
            run.record("status", conn2.info.transaction_status.name)
            await run.step("rollback", conn2.rollback())
            await run.step("after it", rows(conn2, "SELECT 43"))
        finally:
            await conn2.close()
    finally:
        await conn.close()


async def connections_at_once(run):
    # Eight connections, pipelines and prepared statements interleaved over the proxy's small
    # pool.
    t = run.t("conc")
    ins = f"INSERT INTO {t} (k, n, v) VALUES (%s, %s, %s)"

    async def worker(w):
        conn = await connect(run)
        seen = []
        try:
            for i in range(25):
                if i % 2 == 0:
                    async with conn.pipeline():
                        await conn.execute(ins, (w, i, f"w{w}"))
                        cur = await conn.execute(f"SELECT count(*) FROM {t} WHERE k = %s", (w,), prepare=True)
                        seen.append(await cur.fetchall())
                else:
                    async with conn.transaction():
                        await conn.execute(f"UPDATE {t} SET v = v || '+' WHERE k = %s AND n = %s", (w, i - 1))
                        cur = await conn.execute(f"SELECT v FROM {t} WHERE k = %s AND n = %s", (w, i - 1))
                        seen.append(await cur.fetchall())
        finally:
            await conn.close()
        return seen

    run.record("workers", await asyncio.gather(*(worker(w) for w in range(1, 9))))
    conn = await connect(run)
    try:
        await run.step("final", rows(conn, f"SELECT k, count(*), min(v), max(v) FROM {t} GROUP BY k ORDER BY k"))
    finally:
        await conn.close()


async def session_settings(run):
    conn = await connect(run, options="-c TimeZone=Asia/Tokyo -c application_name=psycopg_check")
    try:
        def reported():
            return [conn.info.parameter_status(p) for p in ("TimeZone", "application_name", "client_encoding", "DateStyle")]

        run.record("reported at startup", reported())
        run.record("encoding", conn.info.encoding)
        show = "SELECT current_setting('TimeZone'), current_setting('application_name'), '2024-01-01 00:00+00'::timestamptz::text"
        await run.step("startup settings", rows(conn, show))
        # psycopg gives timestamptz values the time zone the server reported.
        await run.step("timestamptz value, text", rows(conn, "SELECT '2024-01-01 00:00+00'::timestamptz"))
        await run.step("timestamptz value, binary", rows_binary(conn, "SELECT '2024-01-01 00:00+00'::timestamptz", None))
        await run.step("set", conn.execute("SET TimeZone = 'America/Sao_Paulo'"))
        run.record("reported after SET", reported())
        await run.step("after SET", rows(conn, show))
        await run.step("reset", conn.execute("RESET TimeZone"))
        await run.step("after RESET", rows(conn, show))
        run.record("reported after RESET", reported())
    finally:
        await conn.close()


CASES = [
    pipeline_error_in_autocommit,
    pipeline_sync_points,
    pipeline_fetch_in_the_middle,
    pipeline_in_a_transaction,
    pipeline_spanning_shards,
    savepoint_rollback_batched_with_release,
    prepared_statements,
    deallocate_through_the_extended_protocol,
    prepared_statements_and_rollback,
    executemany,
    copy_text_and_csv,
    copy_binary,
    binary_parameters_and_results,
    server_side_cursors,
    autocommit_and_transactions,
    client_side_binding,
    multi_statement_and_notices,
    do_block_notice,
    cancel,
    connections_at_once,
    session_settings,
]

if __name__ == "__main__":
    raise SystemExit(diffcheck.main(CASES, setup, teardown, list(TABLES), error_of))
