#!/usr/bin/env python3
"""Per-window statistics of a `moontide-gwload steady` records CSV.

    gwstats.py RECORDS.csv NAME:START_US:END_US [NAME:START_US:END_US ...]

A request belongs to the window its scheduled send time falls in (epoch µs, [start, end)).
Prints one tab-separated line per window:
    name requests failed transport timeouts non2xx rate_per_s p50_ms p99_ms p999_ms max_ms
Failed = status 0 (transport error), 1 (timeout) or not 2xx (599 = 2xx with a wrong body).
Percentiles are nearest-rank over every request of the window, failed ones included.
"""
import math
import sys


def pct(sorted_values, p):
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    windows = []
    for spec in sys.argv[2:]:
        name, start, end = spec.split(":")
        windows.append((name, int(start), int(end)))
    rows = {w[0]: [] for w in windows}
    with open(sys.argv[1]) as f:
        header = f.readline().strip()
        if header != "send_epoch_us,latency_us,status":
            sys.exit(f"{sys.argv[1]}: unexpected header {header!r}")
        for line in f:
            send, lat, status = line.split(",")
            send = int(send)
            for name, start, end in windows:
                if start <= send < end:
                    rows[name].append((int(lat), int(status)))
    print("window\trequests\tfailed\ttransport\ttimeouts\tnon2xx\trate_per_s\tp50_ms\tp99_ms\tp999_ms\tmax_ms")
    for name, start, end in windows:
        r = rows[name]
        lat = sorted(x[0] for x in r)
        transport = sum(1 for x in r if x[1] == 0)
        timeouts = sum(1 for x in r if x[1] == 1)
        non2xx = sum(1 for x in r if x[1] >= 100 and not 200 <= x[1] < 300)
        secs = max((end - start) / 1e6, 1e-9)
        print("%s\t%d\t%d\t%d\t%d\t%d\t%.0f\t%.3f\t%.3f\t%.3f\t%.3f" % (
            name, len(r), transport + timeouts + non2xx, transport, timeouts, non2xx,
            len(r) / secs, pct(lat, 50) / 1000, pct(lat, 99) / 1000, pct(lat, 99.9) / 1000,
            (lat[-1] if lat else 0) / 1000))


if __name__ == "__main__":
    main()
