#!/usr/bin/env python3
"""Summarise `perf script -F comm,tid,ip,sym --no-inline` output of a Moontide server.

Prints, in % of all samples of the process (= its CPU time):
  1. phases of the request path: a sample with a socket syscall (writev, recv,
     epoll_wait) on its stack counts as that syscall; any other sample is attributed to
     the OUTERMOST marker frame found on its stack (so GC triggered while building the
     event counts as "build event"); markers are listed in SYSCALLS and PHASES below;
  2. cross-cutting costs (inclusive, a sample may count in several): Luau GC, mlua's
     protected calls, malloc/free, syscalls;
  3. the hottest functions by self time;
  4. for the heaviest Moontide phases, their hottest direct callees (inclusive).

usage: perf script -i perf.data -F comm,tid,ip,sym,dso --no-inline | phases.py [--top N]
(kernel frames are shown as "[k] symbol")
"""
import collections
import re
import sys

# Syscalls first: a sample with one of these on its stack is that syscall, wherever it
# was called from (e.g. hyper's parse reads the socket).
SYSCALLS = [
    ("kernel: send response (writev; incl. loopback TCP delivery + waking wrk)", r"writev"),
    ("kernel: recv request (recvfrom/read)", r"__libc_recv|recvfrom|__GI___libc_read|^read$"),
    ("kernel: epoll_wait / tokio I/O driver / park", r"epoll_wait|io::driver::Driver::turn|park_internal|park_yield"),
]
# Then the outermost of these marker frames wins (so GC triggered while building the
# event counts as "build event").
PHASES = [
    ("event: build the API Gateway event table (contract::http_event)", r"contract::http_event"),
    ("result: handler result -> HTTP response (contract::http_response)", r"contract::http_response"),
    ("lua: run the handler (Instance::call / run / mlua AsyncThread)", r"instance::Instance::(call|run)|AsyncThread|Instance::invoke_http"),
    ("pool: acquire/release instance", r"pool::LocalPools::(acquire|release)|pool::Lease"),
    ("body: collect the request body", r"http_body_util::.*Collect|Limited"),
    ("http: hyper parse request (user space)", r"h1::role::Server as hyper::proto::h1::Http1Transaction>::parse|h1::io::Buffered<T,B>::parse"),
    ("http: hyper encode response head", r"h1::role::Server as hyper::proto::h1::Http1Transaction>::encode|encode_headers"),
    ("timers (tokio timeout / sleep)", r"tokio::time|TimerEntry|timer::"),
    ("metrics / request id / time", r"prometheus_client|Histogram|request_id|SystemTime|Worker::request_id"),
    ("clock ticker thread (moontide-clock)", r"clock::start"),
]
CROSS = [
    ("Luau GC (luaC_step, sweep, mark)", r"^luaC_|sweepgco|propagatemark|reallymarkobject|^gcstep|singlestep|luaC_fullgc"),
    ("mlua protected calls (protect_lua_closure + lua_pcall)", r"protect_lua_closure"),
    ("Lua string interning (luaS_newlstr)", r"^luaS_newlstr"),
    ("Lua table writes (lua_rawset/luaH_*)", r"^lua_rawset|^luaH_"),
    ("malloc/free/realloc", r"^(malloc|free|realloc|_int_malloc|_int_free|cfree|__libc_malloc|__libc_free)"),
    ("json.decode (modules::json::decode_to_lua)", r"json::decode_to_lua"),
    ("json.encode (modules::json::lua_encode / encode_value)", r"json::(lua_encode|encode_value)"),
    ("mlua coroutine per call (create_recycled_thread / create_thread)", r"create_recycled_thread|RawLua::create_thread"),
    ("kernel: waking wrk on the other CPU (sock_def_readable)", r"^\[k\] sock_def_readable"),
    ("kernel (leaf frame in the kernel)", None),
]


def samples(stream):
    comm, frames = None, []
    for line in stream:
        line = line.rstrip("\n")
        if not line.strip():
            if comm is not None:
                yield comm, frames
            comm, frames = None, []
            continue
        if not line.startswith((" ", "\t")):
            comm = line.split()[0] if line.split() else "?"
            frames = []
            continue
        parts = line.strip().split(None, 1)
        sym = parts[1] if len(parts) > 1 else "[unknown]"
        m = re.match(r"^(.*) \(([^()]*)\)$", sym)       # "sym (dso)" with -F ...,dso
        if m:
            sym, dso = m.group(1), m.group(2)
            if "kernel" in dso or dso.startswith("[k"):
                sym = "[k] " + sym
        sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
        frames.append(sym)          # leaf first
    if comm is not None:
        yield comm, frames


def main():
    top = 25
    if "--top" in sys.argv:
        top = int(sys.argv[sys.argv.index("--top") + 1])
    phase_re = [(label, re.compile(rx)) for label, rx in PHASES]
    sys_re = [(label, re.compile(rx)) for label, rx in SYSCALLS]
    cross_re = [(label, re.compile(rx) if rx else None) for label, rx in CROSS]
    total = 0
    by_phase = collections.Counter()
    by_cross = collections.Counter()
    self_sym = collections.Counter()
    by_thread = collections.Counter()
    callees = collections.defaultdict(collections.Counter)   # phase -> direct child symbol
    for comm, frames in samples(sys.stdin):
        if not frames:
            continue
        total += 1
        by_thread[comm] += 1
        leaf = frames[0]
        self_sym[leaf] += 1
        phase, child = None, None
        for label, rx in sys_re:
            hits = [i for i, f in enumerate(frames) if rx.search(f)]
            if hits:
                i = hits[-1]
                phase, child = label, (frames[i - 1] if i > 0 else "(self)")
                break
        for i in (range(len(frames) - 1, -1, -1) if phase is None else ()):  # root -> leaf
            for label, rx in phase_re:
                if rx.search(frames[i]):
                    phase = label
                    child = frames[i - 1] if i > 0 else "(self)"
                    break
            if phase:
                break
        if phase is None:
            phase = "other: hyper/tokio glue, scheduler, unattributed"
        by_phase[phase] += 1
        if child is not None:
            callees[phase][child] += 1
        for label, rx in cross_re:
            if rx is None:
                if leaf.startswith("[k] "):
                    by_cross[label] += 1
            elif any(rx.search(f) for f in frames):
                by_cross[label] += 1
    if total == 0:
        print("no samples")
        return
    pct = lambda n: 100.0 * n / total
    print(f"samples: {total}")
    print("\nthreads:")
    for comm, n in by_thread.most_common():
        print(f"  {pct(n):5.1f}%  {comm}")
    print("\nphases (a socket syscall on the stack wins, else the outermost marker):")
    for label, n in by_phase.most_common():
        print(f"  {pct(n):5.1f}%  {label}")
    print("\ncross-cutting (inclusive; overlaps the phases):")
    for label, _ in CROSS:
        print(f"  {pct(by_cross[label]):5.1f}%  {label}")
    print(f"\ntop {top} functions by self time:")
    for sym, n in self_sym.most_common(top):
        print(f"  {pct(n):5.1f}%  {sym[:110]}")
    for label, n in by_phase.most_common(4):
        if label.startswith("other") or not callees[label]:
            continue
        print(f"\n{label} [{pct(n):.1f}%] -- direct callees (inclusive):")
        for sym, m in callees[label].most_common(10):
            print(f"  {pct(m):5.1f}%  {sym[:110]}")


if __name__ == "__main__":
    main()
