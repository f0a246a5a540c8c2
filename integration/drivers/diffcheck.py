"""Shared by the driver checks: runs one workload on Postgres directly and through Tessera,
records every result and every error of each case, and prints where the two transcripts differ.

A workload is a list of cases (async functions taking a `Run`). Each case runs on both sides with
its own connections and its own tables, under a timeout, so a hang or a broken connection in one
case cannot hide the others. Table names carry a per-side prefix (`<prefix>_d_` directly,
`<prefix>_p_` through the proxy), replaced by `T_` in everything recorded, so error messages
naming tables or constraints compare equal.

On a sharded map some shapes are refused by design with SQLSTATE 0A000 (see the README's
"Across shards"): a step marked `refused=True` must be refused through the proxy and must work
directly; the case ends there on both sides.
"""

import argparse
import asyncio
import datetime
import decimal
import json
import sys
import time
import traceback
import uuid

CASE_TIMEOUT = 20.0


class CaseEnded(Exception):
    """Ends a case after a step whose outcome makes the rest meaningless (a refusal, a timeout)."""


class Run:
    """One side of one case: where to connect, how to name tables, and the transcript."""

    def __init__(self, side, port, args, error_of):
        self.side = side
        self.port = port
        self.user = args.user
        self.password = args.password
        self.database = args.database
        self.sharded = args.sharded
        self.prefix = f"{args.prefix}_{side[0]}_"
        self.events = []
        self._error_of = error_of

    def t(self, kind):
        """The name of this side's table (or type, or function) `kind`."""
        return self.prefix + kind

    def canon(self, value):
        """A comparable, printable form of a driver value, with this side's prefix hidden."""
        if value is None or isinstance(value, (bool, int)):
            return value
        if isinstance(value, str):
            return value.replace(self.prefix, "T_")
        if isinstance(value, float):
            return repr(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return "\\x" + bytes(value).hex()
        if isinstance(value, decimal.Decimal):
            return f"numeric:{value}"
        if isinstance(value, (datetime.datetime, datetime.date, datetime.time, datetime.timedelta)):
            return f"{type(value).__name__}:{value!r}"
        if isinstance(value, uuid.UUID):
            return f"uuid:{value}"
        if isinstance(value, dict):
            return {self.canon(k): self.canon(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
        if isinstance(value, (list, tuple)):
            return [self.canon(v) for v in value]
        if hasattr(value, "statusmessage") and hasattr(value, "rowcount"):
            # psycopg cursor
            return ["cursor", self.canon(value.statusmessage), value.rowcount]
        if hasattr(value, "items") and hasattr(value, "values"):
            # asyncpg Record
            return [self.canon(v) for v in value.values()]
        return self.canon(repr(value))

    def error(self, exc):
        kind, code, message = self._error_of(exc)
        return {"error": kind, "sqlstate": code, "message": self.canon(message)}

    def record(self, label, value):
        self.events.append((self.canon(label), self.canon(value)))

    async def step(self, label, work, refused=False):
        """Runs `work` (an awaitable), records its result or its error, and returns the result
        (None after an error). `refused`: on a sharded map the proxy must answer 0A000."""
        label = self.canon(label)
        try:
            value = await work
        except (asyncio.CancelledError, CaseEnded):
            raise
        except Exception as exc:  # every driver error is a result to compare
            err = self.error(exc)
            if refused and self.sharded:
                if self.side == "direct" or err["sqlstate"] == "0A000":
                    self.events.append((label, "refused with 0A000 as documented"))
                else:
                    self.events.append((label, err))
                raise CaseEnded()
            self.events.append((label, err))
            return None
        if refused and self.sharded:
            if self.side == "proxy":
                self.events.append((label, {"expected a 0A000 refusal, got": self.canon(value)}))
            else:
                self.events.append((label, "refused with 0A000 as documented"))
            raise CaseEnded()
        self.events.append((label, self.canon(value)))
        return value


def _first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else None


def _show(value, limit=600):
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


async def _run_side(side, port, args, cases, setup, teardown, error_of):
    """Runs setup, every case and teardown on one side; returns {case name: (events, seconds)}."""
    results = {}
    for name, fn in [("setup", setup)] + [(c.__name__, c) for c in cases] + [("teardown", teardown)]:
        if args.only and name not in ("setup", "teardown") and name not in args.only:
            continue
        run = Run(side, port, args, error_of)
        started = time.monotonic()
        # On stderr as it happens: if the whole script is killed, this shows where it stopped.
        print(f"[{side}] {name}", file=sys.stderr, flush=True)
        try:
            await asyncio.wait_for(fn(run), CASE_TIMEOUT)
        except CaseEnded:
            pass
        except asyncio.TimeoutError:
            run.events.append(("TIMEOUT", f"case did not finish in {CASE_TIMEOUT:.0f} s"))
        except Exception as exc:
            run.events.append(("unexpected exception", run.error(exc)))
            run.events.append(("traceback", traceback.format_exc().splitlines()[-6:]))
        results[name] = (run.events, time.monotonic() - started)
    return results


def main(cases, setup, teardown, tables, error_of):
    """Command line of a driver check: `--direct PORT --proxy PORT --prefix P [--sharded]`, or
    `--tables` to print the table kinds (each sharded by its column `k` on a sharded map)."""
    ap = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__)
    ap.add_argument("--direct", type=int, help="port of Postgres itself")
    ap.add_argument("--proxy", type=int, help="port of Tessera")
    ap.add_argument("--user", default="app")
    ap.add_argument("--password", default="app")
    ap.add_argument("--database", default="app")
    ap.add_argument("--prefix", default="drv", help="table name prefix, unique per run")
    ap.add_argument("--sharded", action="store_true", help="the proxy shards the tables by k")
    ap.add_argument("--only", nargs="*", help="run only these cases")
    ap.add_argument("--tables", action="store_true", help="print the table kinds and exit")
    args = ap.parse_args()
    if args.tables:
        print("\n".join(tables))
        return 0
    if args.direct is None or args.proxy is None:
        ap.error("--direct and --proxy are required")

    started = time.monotonic()
    direct = asyncio.run(_run_side("direct", args.direct, args, cases, setup, teardown, error_of))
    proxy = asyncio.run(_run_side("proxy", args.proxy, args, cases, setup, teardown, error_of))

    failed = []
    for name, (d_events, d_secs) in direct.items():
        p_events, p_secs = proxy[name]
        where = _first_difference(d_events, p_events)
        # Directly, a case must not time out or crash: that is a bug in the check itself.
        broken = any(label in ("TIMEOUT", "unexpected exception") for label, _ in d_events)
        status = "ok" if where is None and not broken else "MISMATCH"
        print(f"{status:8} {name:40} direct {d_secs:5.2f} s  proxy {p_secs:5.2f} s  ({len(d_events)} steps)")
        if status == "ok":
            continue
        failed.append(name)
        if where is not None:
            label = d_events[where][0] if where < len(d_events) else p_events[where][0]
            print(f"  first difference at step {where} ({label}):")
            print(f"    postgres: {_show(d_events[where]) if where < len(d_events) else '(no such step)'}")
            print(f"    tessera:  {_show(p_events[where]) if where < len(p_events) else '(no such step)'}")
        else:
            print("  the case failed directly too (a bug in the check):")
        print("  postgres transcript:")
        for event in d_events:
            print(f"    {_show(event, 300)}")
        print("  tessera transcript:")
        for event in p_events:
            print(f"    {_show(event, 300)}")
    mode = "sharded" if args.sharded else "one shard"
    print(f"{len(direct) - len(failed)}/{len(direct)} cases agree ({mode}), {time.monotonic() - started:.1f} s")
    if failed:
        print("mismatching cases: " + " ".join(failed))
        return 1
    return 0
