#!/usr/bin/env python3
"""Summarizes the CSV written by scripts/bench: per protocol mode, the median TPS of each target,
TPS ratios (of the medians) and the median proxy CPU microseconds per transaction; then the
Tessera/PgBouncer ratio round by round (the two ran close together in time, so a round's ratio
is a paired measure), as a geometric mean with a 95% confidence interval.
Usage: scripts/bench_report.py target/bench/bench-<timestamp>.csv"""
import csv
import math
import statistics
import sys

MODES = ["simple", "extended", "prepared"]

# Student's t, two-sided 95%, by degrees of freedom (2.0 beyond the table, about df 60).
T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23,
       2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11, 2.10, 2.09, 2.09,
       2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]


def paired(by_round, mode):
    """Per-round log ratios of Tessera to PgBouncer: (geometric mean, low, high, n)."""
    logs = []
    for (m, _), targets in sorted(by_round.items()):
        if m == mode and "tessera" in targets and "pgbouncer" in targets:
            logs.append(math.log(targets["tessera"] / targets["pgbouncer"]))
    if len(logs) < 2:
        return None
    df = len(logs) - 1
    t = T95[df - 1] if df <= len(T95) else 2.0
    mean = statistics.mean(logs)
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half), len(logs)


def main(path):
    tps, cpu, by_round = {}, {}, {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["status"] != "ok":
                continue
            key = (row["mode"], row["target"])
            tps.setdefault(key, []).append(float(row["tps"]))
            by_round.setdefault((row["mode"], row["round"]), {})[row["target"]] = float(row["tps"])
            if row["proxy_cpu_us_per_txn"]:
                cpu.setdefault(key, []).append(float(row["proxy_cpu_us_per_txn"]))

    def med(d, mode, target):
        values = d.get((mode, target))
        return statistics.median(values) if values else None

    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    header = ["mode", "direct tps", "tessera tps", "pgbouncer tps", "tess/direct",
              "pgb/direct", "tess/pgb", "tessera us/txn", "pgbouncer us/txn"]
    rows = [header]
    for mode in MODES:
        d, t, p = (med(tps, mode, x) for x in ("direct", "tessera", "pgbouncer"))
        rows.append([
            mode, num(d, ".0f"), num(t, ".0f"), num(p, ".0f"),
            num(ratio(t, d), ".2f"), num(ratio(p, d), ".2f"), num(ratio(t, p), ".2f"),
            num(med(cpu, mode, "tessera"), ".1f"), num(med(cpu, mode, "pgbouncer"), ".1f"),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for n, r in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print("n/a: the run failed or is unsupported (see below); ratios are of the median TPS")
    for mode in MODES:
        p = paired(by_round, mode)
        if p is None:
            continue
        mean, low, high, n = p
        verdict = ("Tessera ahead" if low > 1 else "PgBouncer ahead" if high < 1
                   else "no difference these rounds can tell")
        print(f"{mode}: tess/pgb round by round {mean:.3f} (95% interval {low:.3f} to "
              f"{high:.3f}, {n} rounds): {verdict}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
