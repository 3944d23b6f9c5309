#!/usr/bin/env python3
"""The report of bench/cluster_deploys.sh: rows.csv (one row per setup, round and phase,
from `moontide-gwload deploys`) -> Markdown tables of the medians over rounds, with the
ratios of each etcd setup to the embedded store."""
import csv
import statistics
import sys
from collections import defaultdict

PHASES = [
    ("deploy_seq", "deploy, sequential (new functions)"),
    ("redeploy_seq", "redeploy, sequential (new versions of one function)"),
    ("deploy_conc", "deploy, concurrent clients (new functions)"),
    ("route_seq", "route PUT, sequential"),
    ("route_conc", "route PUT, concurrent clients"),
    ("get_fn", "GET /v1/functions/NAME"),
    ("list_fn", "GET /v1/functions (2×calls + 11 functions)"),
]


def main(path):
    rows = list(csv.DictReader(open(path)))
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    by = defaultdict(list)
    for r in rows:
        by[(r["setup"], r["phase"])].append(r)

    def med(setup, phase, field):
        values = [float(r[field]) for r in by.get((setup, phase), [])]
        return statistics.median(values) if values else None

    def fmt(value, digits):
        return "–" if value is None else f"{value:.{digits}f}"

    calls = rows[0]["calls"] if rows else "?"
    print(f"Calls per phase: {calls}. Latency from send to the whole answer.")
    print()
    print("| phase | setup | calls/s | p50 ms | p99 ms | max ms | server CPU µs/call | etcd CPU µs/call | etcd requests/call | etcd fsyncs/call | etcd fsync ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for phase, title in PHASES:
        for setup in setups:
            if (setup, phase) not in by:
                continue
            etcd = setup != "embedded"
            print(
                f"| {title if setup == setups[0] else ''} | {setup} "
                f"| {fmt(med(setup, phase, 'per_s'), 0)} "
                f"| {fmt(med(setup, phase, 'p50_us') / 1000, 2)} "
                f"| {fmt(med(setup, phase, 'p99_us') / 1000, 2)} "
                f"| {fmt(med(setup, phase, 'max_us') / 1000, 2)} "
                f"| {fmt(med(setup, phase, 'server_cpu_us_per_call'), 0)} "
                f"| {fmt(med(setup, phase, 'etcd_cpu_us_per_call'), 0) if etcd else ''} "
                f"| {fmt(med(setup, phase, 'etcd_kv_requests_per_call'), 1) if etcd else ''} "
                f"| {fmt(med(setup, phase, 'wal_fsyncs_per_call'), 2) if etcd else ''} "
                f"| {fmt(med(setup, phase, 'wal_fsync_mean_us') / 1000, 2) if etcd else ''} |"
            )
    others = [s for s in setups if s != "embedded"]
    if "embedded" not in setups or not others:
        return
    print()
    print("Ratios to the embedded store (medians; calls/s: above 1 is faster, latency: above 1 is slower):")
    print()
    head = " | ".join(f"{s} calls/s | {s} p50 | {s} p99" for s in others)
    print(f"| phase | {head} |")
    print("|---|" + "---:|" * (3 * len(others)))
    for phase, title in PHASES:
        cells = []
        for setup in others:
            for field in ("per_s", "p50_us", "p99_us"):
                a, b = med(setup, phase, field), med("embedded", phase, field)
                cells.append("–" if a is None or not b else f"{a / b:.2f}")
        print(f"| {title} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
