#!/usr/bin/env python3
"""Closed-loop HTTP/1.1 client (keep-alive, N connections, one request in flight each) that
records every request's latency, so single stalls are visible without wrk's
coordinated-omission correction. Prints percentiles and the slow requests with the
handler's own x-handler-ms header.

usage: stall_client.py URL [connections=64] [seconds=4] [slow_ms=50]
"""
import selectors
import socket
import sys
import time
from urllib.parse import urlsplit

url = urlsplit(sys.argv[1])
conns = int(sys.argv[2]) if len(sys.argv) > 2 else 64
duration = float(sys.argv[3]) if len(sys.argv) > 3 else 4.0
slow_ms = float(sys.argv[4]) if len(sys.argv) > 4 else 50.0
host, port = url.hostname, url.port or 80
target = (url.path or "/") + (("?" + url.query) if url.query else "")
request = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()

sel = selectors.DefaultSelector()
state = {}
latencies, slow = [], []
t_begin = time.perf_counter()
for _ in range(conns):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.setblocking(False)
    s.send(request)
    state[s] = [time.perf_counter(), b""]
    sel.register(s, selectors.EVENT_READ)
while time.perf_counter() - t_begin < duration:
    for key, _ in sel.select(0.5):
        s = key.fileobj
        st = state[s]
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("server closed a connection")
        st[1] += chunk
        head_end = st[1].find(b"\r\n\r\n")
        if head_end < 0:
            continue
        lines = st[1][:head_end].split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 2"):
            sys.exit(f"non-2xx answer: {lines[0]!r}")
        headers = {l.split(b":", 1)[0].lower(): l.split(b":", 1)[1].strip() for l in lines[1:]}
        length = int(headers[b"content-length"])
        if len(st[1]) < head_end + 4 + length:
            continue
        now = time.perf_counter()
        latency = now - st[0]
        latencies.append(latency)
        if latency * 1000 > slow_ms:
            slow.append((latency * 1000, headers.get(b"x-handler-ms", b"?").decode()))
        st[1] = st[1][head_end + 4 + length:]
        st[0] = time.perf_counter()
        s.send(request)
latencies.sort()
n = len(latencies)
pct = lambda p: 1000 * latencies[min(n - 1, int(n * p))]
print(f"{n} requests, {n / duration:.0f} req/s, p50 {pct(0.5):.2f} ms, p99 {pct(0.99):.2f} ms, "
      f"p99.9 {pct(0.999):.2f} ms, max {1000 * latencies[-1]:.1f} ms; {len(slow)} slower than {slow_ms:g} ms")
for latency, handler in sorted(slow, reverse=True)[:10]:
    print(f"  {latency:8.1f} ms total, handler saw {handler} ms")
