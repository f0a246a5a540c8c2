#!/usr/bin/env python3
"""Summarizes the CSV written by scripts/bench: per protocol mode, the median TPS of each target,
TPS ratios (of the medians) and the median proxy CPU microseconds per transaction.
Usage: scripts/bench_report.py target/bench/bench-<timestamp>.csv"""
import csv
import statistics
import sys

MODES = ["simple", "extended", "prepared"]


def main(path):
    tps, cpu = {}, {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["status"] != "ok":
                continue
            key = (row["mode"], row["target"])
            tps.setdefault(key, []).append(float(row["tps"]))
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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
