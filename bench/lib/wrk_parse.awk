# wrk --latency output on stdin -> one line: "rps p50_ms p99_ms requests errors"
#   rps       Requests/sec as wrk prints it
#   p50, p99  from the "Latency Distribution" block, converted to milliseconds
#   requests  "N requests in Xs" (completed requests; the CPU/request denominator)
#   errors    non-2xx/3xx responses + every socket error (connect/read/write/timeout)
# Exits 1 (and prints nothing) if the output has no Requests/sec line (wrk failed).
function ms(v,   n, u) {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
    if (u == "us") return n / 1000
    if (u == "ms") return n
    if (u == "s")  return n * 1000
    if (u == "m")  return n * 60000
    return n
}
/^[ \t]+50%/                { p50 = ms($2) }
/^[ \t]+99%/                { p99 = ms($2) }
/ requests in /             { requests = $1 }
/^Requests\/sec:/           { rps = $2 }
/Non-2xx or 3xx responses:/ { err += $NF }
/Socket errors:/            { line = $0; gsub(/[^0-9 ]/, " ", line)
                              n = split(line, f, " "); for (i = 1; i <= n; i++) err += f[i] }
END {
    if (rps == "" || requests == "") exit 1
    printf "%s %.3f %.3f %d %d\n", rps, p50, p99, requests, err
}
