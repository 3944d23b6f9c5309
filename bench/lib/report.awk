# Turns the per-run results (TSV, see the header run.sh writes) into markdown:
# per endpoint, every run, the per-server medians, the Moontide/OpenResty ratios of the
# medians, and the verdict on the issue's targets.
#
#   awk -F'\t' -v endpoints="hello json" -f report.awk results.tsv
#
# Columns: server endpoint run rps p50_ms p99_ms requests cpu_ticks cpu_us_per_req
#          server_core_pct wrk_core_pct other_pct steal_pct disturbed errors
# Targets (from the issue):
#   hello: server CPU per request <= 1/1.5 of OpenResty's, and p99 no worse
#   json:  requests/s >= 1.5x OpenResty's

function median(list,   n, v, i, j, t) {
    n = split(list, v, " ")
    if (n == 0) return ""
    for (i = 2; i <= n; i++) {                 # insertion sort, numeric
        t = v[i] + 0
        for (j = i - 1; j >= 1 && v[j] + 0 > t; j--) v[j + 1] = v[j]
        v[j + 1] = t
    }
    return (n % 2) ? v[(n + 1) / 2] + 0 : (v[n / 2] + v[n / 2 + 1]) / 2
}
function add(key, value) { vals[key] = (key in vals) ? vals[key] " " value : value }
function ratio(a, b) { return (b + 0 == 0) ? "n/a" : sprintf("%.2f", a / b) }
function yes(ok) { return ok ? "**met**" : "**missed**" }

NR == 1 && $1 == "server" { next }            # header
NF >= 14 {
    s = $1; e = $2
    row[e] = row[e] sprintf("| %d | %s | %.0f | %.3f | %.3f | %.2f | %.0f | %.0f | %.1f |%s\n",
        $3, (s == "moontide" ? "Moontide" : "OpenResty"), $4, $5, $6, $9, $10, $11, $12,
        ($14 == 1 ? " disturbed" : "") ($15 > 0 ? " **" $15 " errors**" : ""))
    # medians use the clean runs (not disturbed, no errors) if there are any
    c = ($14 == 1 || $15 > 0) ? "dirty" : "clean"
    add(s SUBSEP e SUBSEP c SUBSEP "rps", $4)
    add(s SUBSEP e SUBSEP c SUBSEP "p50", $5)
    add(s SUBSEP e SUBSEP c SUBSEP "p99", $6)
    add(s SUBSEP e SUBSEP c SUBSEP "cpu", $9)
    add(s SUBSEP e SUBSEP c SUBSEP "srv", $10)
    runs[s SUBSEP e SUBSEP c]++
    if ($14 == 1) disturbed++
    if ($15 > 0) failed++
}
END {
    n = split(endpoints, eps, " ")
    for (k = 1; k <= n; k++) {
        e = eps[k]
        printf "### `%s`\n\n", e
        print "| run | server | req/s | p50 ms | p99 ms | server CPU µs/req | server core % | wrk core % | other % |"
        print "|----:|--------|------:|-------:|-------:|------------------:|--------------:|-----------:|--------:|"
        printf "%s\n", row[e]
        note = ""
        for (si = 1; si <= 2; si++) {
            s = (si == 1) ? "openresty" : "moontide"
            c = ((s, e, "clean") in runs) ? "clean" : "dirty"
            used[s] = runs[s, e, c] + 0
            if (c == "dirty") note = note sprintf(" %s has no clean run: its medians use disturbed/failed runs.", s)
            else if ((s, e, "dirty") in runs) note = note sprintf(" %s: %d disturbed/failed run(s) left out.", s, runs[s, e, "dirty"])
            m[s, "rps"] = median(vals[s, e, c, "rps"]); m[s, "p50"] = median(vals[s, e, c, "p50"])
            m[s, "p99"] = median(vals[s, e, c, "p99"]); m[s, "cpu"] = median(vals[s, e, c, "cpu"])
            m[s, "srv"] = median(vals[s, e, c, "srv"])
        }
        printf "Medians (OpenResty over %d runs, Moontide over %d runs).%s\n\n", used["openresty"], used["moontide"], note
        print "| server | req/s | p50 ms | p99 ms | server CPU µs/req | server core % |"
        print "|--------|------:|-------:|-------:|------------------:|--------------:|"
        printf "| OpenResty | %.0f | %.3f | %.3f | %.2f | %.0f |\n",
            m["openresty", "rps"], m["openresty", "p50"], m["openresty", "p99"],
            m["openresty", "cpu"], m["openresty", "srv"]
        printf "| Moontide | %.0f | %.3f | %.3f | %.2f | %.0f |\n",
            m["moontide", "rps"], m["moontide", "p50"], m["moontide", "p99"],
            m["moontide", "cpu"], m["moontide", "srv"]
        rr = ratio(m["moontide", "rps"], m["openresty", "rps"])
        r50 = ratio(m["moontide", "p50"], m["openresty", "p50"])
        r99 = ratio(m["moontide", "p99"], m["openresty", "p99"])
        rc = ratio(m["moontide", "cpu"], m["openresty", "cpu"])
        printf "| **Moontide / OpenResty** | **%s** | **%s** | **%s** | **%s** | |\n\n", rr, r50, r99, rc
        if (e == "hello") {
            ok_cpu = (rc != "n/a" && m["moontide", "cpu"] * 1.5 <= m["openresty", "cpu"])
            ok_p99 = (r99 != "n/a" && m["moontide", "p99"] <= m["openresty", "p99"])
            printf "Target `hello`: server CPU/request ≤ 1/1.5 (0.67×) of OpenResty's → %s × → %s; " \
                   "p99 no worse (≤ 1.00×) → %s × → %s.\n\n", rc, yes(ok_cpu), r99, yes(ok_p99)
            verdict = verdict sprintf("TARGET hello cpu_ratio=%s (<=0.67) %s p99_ratio=%s (<=1.00) %s\n",
                rc, ok_cpu ? "met" : "MISSED", r99, ok_p99 ? "met" : "MISSED")
        } else if (e == "json") {
            ok_rps = (rr != "n/a" && m["moontide", "rps"] >= 1.5 * m["openresty", "rps"])
            printf "Target `json`: req/s ≥ 1.5× OpenResty's → %s × → %s.\n\n", rr, yes(ok_rps)
            verdict = verdict sprintf("TARGET json rps_ratio=%s (>=1.50) %s\n",
                rr, ok_rps ? "met" : "MISSED")
        } else if (e == "proxy") {
            ok_rps = (rr != "n/a" && m["moontide", "rps"] >= m["openresty", "rps"])
            ok_p99 = (r99 != "n/a" && m["moontide", "p99"] <= m["openresty", "p99"])
            printf "Target `proxy`: req/s ≥ 1.0× nginx proxy_pass → %s × → %s; p99 no worse (≤ 1.00×) → %s × → %s.\n\n", \
                rr, yes(ok_rps), r99, yes(ok_p99)
            verdict = verdict sprintf("TARGET proxy rps_ratio=%s (>=1.00) %s p99_ratio=%s (<=1.00) %s\n",
                rr, ok_rps ? "met" : "MISSED", r99, ok_p99 ? "met" : "MISSED")
        } else if (e ~ /^balancer/) {
            ok_rps = (rr != "n/a" && m["moontide", "rps"] >= 1.3 * m["openresty", "rps"])
            printf "Target `%s`: req/s ≥ 1.3× OpenResty's balancer_by_lua → %s × → %s.\n\n", e, rr, yes(ok_rps)
            verdict = verdict sprintf("TARGET %s rps_ratio=%s (>=1.30) %s\n",
                e, rr, ok_rps ? "met" : "MISSED")
        }
    }
    if (failed) printf "**Error:** %d run(s) had non-2xx answers or socket errors; their numbers are invalid.\n\n", failed
    if (disturbed) printf "**Warning:** %d run(s) were disturbed by other load (see `other %%`); treat with care.\n\n", disturbed
    # machine-readable verdict lines for run.sh (it moves them to stderr/stdout)
    printf "%s", verdict > "/dev/stderr"
}
