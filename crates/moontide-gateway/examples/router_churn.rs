//! Micro benchmark of the routing table, run by hand (never by the tests):
//!
//! ```text
//! cargo run --release -p moontide-gateway --example router_churn
//! ```
//!
//! Builds 5 000 routes (exact, param and prefix paths; a tenth on exact hosts, a tenth on
//! wildcard hosts, a catch-all), then measures (a) `find` over a request mix of hits and
//! misses and (b) one change published the way the server publishes it: clone the current
//! snapshot, insert the changed route, swap the new snapshot in and drop the old one. Prints
//! ns/op, the cost of a full rebuild for comparison, and the heap the table holds (counted by
//! a wrapper around the system allocator, which adds one relaxed atomic per allocation).

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use http::{HeaderMap, Method};
use moontide_gateway::router::{Request, RouteSpec, Router, ValueMatch};

const ROUTES: usize = 5_000;

/// The system allocator, counting the bytes it holds.
struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` with the caller's arguments unchanged, so
// `System`'s guarantees are ours; the counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size(), Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which is `System`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size(), Relaxed);
        // SAFETY: `ptr` was allocated by `System` (through `alloc`/`realloc`) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(new_size, Relaxed);
        HELD.fetch_sub(layout.size(), Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract, which is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The spec of route `i`. A change bumps `version`, which renames the route's last literal
/// segment (`items` → `items-v2`), so that it really moves the route without making the
/// table deeper.
fn spec(i: usize, version: usize) -> RouteSpec {
    let items = match version {
        0 => "items".to_owned(),
        v => format!("items-v{v}"),
    };
    let path = match i % 3 {
        0 => format!("/api/v1/svc{i}/{items}"),
        1 => format!("/api/v1/svc{i}/{items}/:id"),
        _ => format!("/api/v1/svc{i}/static-v{version}/*"),
    };
    let hosts = match i % 10 {
        0 => vec![format!("h{}.example.com", i % 50)],
        5 => vec![format!("*.t{}.example.com", i % 20)],
        _ => vec![],
    };
    let methods = match i % 7 {
        0 => vec![Method::GET, Method::HEAD],
        _ => vec![],
    };
    let headers = match i % 11 {
        0 => vec![("x-tenant".to_owned(), ValueMatch::Present)],
        _ => vec![],
    };
    RouteSpec {
        hosts,
        paths: vec![path],
        methods,
        headers,
        ..RouteSpec::default()
    }
}

fn build() -> Router<usize> {
    let mut router = Router::new();
    for i in 0..ROUTES {
        router.insert(&format!("r{i}"), spec(i, 0), i).unwrap();
    }
    let catch_all = RouteSpec {
        paths: vec!["/*".into()],
        priority: -1,
        ..RouteSpec::default()
    };
    router.insert("catch-all", catch_all, usize::MAX).unwrap();
    router
}

/// An owned request: (host, path, query).
type Owned = (Option<String>, String, Option<String>);

/// Requests that hit route `i` for most `i`, and misses that only the catch-all takes.
fn request_mix() -> Vec<Owned> {
    let mut mix = Vec::new();
    for j in 0..2_000 {
        let i = (j * 7_919) % ROUTES;
        let host = match i % 10 {
            0 => Some(format!("h{}.example.com:8080", i % 50)),
            5 => Some(format!("App.t{}.example.com", i % 20)),
            _ => Some("gateway.local".to_owned()),
        };
        let path = match i % 3 {
            0 => format!("/api/v1/svc{i}/items"),
            1 => format!("/api/v1/svc{i}/items/{j}"),
            _ => format!("/api/v1/svc{i}/static-v0/js/app.{j}.js"),
        };
        mix.push((host, path, Some(format!("page={j}&sort=asc"))));
        if j % 10 == 0 {
            mix.push((None, format!("/api/v2/nothing/{j}"), None));
        }
    }
    mix
}

fn per_op(elapsed: Duration, ops: usize) -> f64 {
    elapsed.as_nanos() as f64 / ops as f64
}

fn main() {
    let held_before = HELD.load(Relaxed);
    let start = Instant::now();
    let router = build();
    let build_time = start.elapsed();
    let held = HELD.load(Relaxed) - held_before;
    println!(
        "routes: {} (exact/param/prefix; 500 on exact hosts, 500 on wildcard hosts; a catch-all)",
        router.len()
    );
    println!(
        "build from scratch: {:.1} ms ({:.0} ns/route); heap held: {:.1} MiB ({} bytes/route)",
        build_time.as_secs_f64() * 1e3,
        per_op(build_time, ROUTES),
        held as f64 / (1024.0 * 1024.0),
        held / ROUTES
    );

    // (a) find over the request mix.
    let before_mix = HELD.load(Relaxed);
    let owned = request_mix();
    let headers = HeaderMap::new();
    let requests: Vec<Request<'_>> = owned
        .iter()
        .map(|(host, path, query)| Request {
            host: host.as_deref(),
            method: &Method::GET,
            path: path.as_str(),
            query: query.as_deref(),
            headers: &headers,
        })
        .collect();
    let mix_bytes = HELD.load(Relaxed) - before_mix;
    let by_catch_all = requests
        .iter()
        .filter(|r| router.find(r).is_some_and(|m| m.id == "catch-all"))
        .count();
    let rounds = 200;
    let start = Instant::now();
    for _ in 0..rounds {
        for request in &requests {
            black_box(router.find(black_box(request)));
        }
    }
    let finds = rounds * requests.len();
    println!(
        "find: {:.0} ns/op over {finds} finds ({} distinct requests, {by_catch_all} fall to the catch-all)",
        per_op(start.elapsed(), finds),
        requests.len(),
    );

    // (b) clone + insert + publish, with readers' snapshot dropped as the swap would.
    let changes = 20_000;
    let mut current = Arc::new(router);
    let start = Instant::now();
    for k in 0..changes {
        let i = (k * 31) % ROUTES;
        let mut next = Router::clone(&current);
        next.insert(&format!("r{i}"), spec(i, k + 1), i).unwrap();
        let old = std::mem::replace(&mut current, Arc::new(next));
        drop(black_box(old));
    }
    println!(
        "change (clone + insert replacing one route + publish): {:.0} ns/op over {changes} changes",
        per_op(start.elapsed(), changes)
    );
    let held_after = HELD.load(Relaxed) - held_before - mix_bytes;
    println!(
        "heap held after the changes: {:.1} MiB (every route moved at least once)",
        held_after as f64 / (1024.0 * 1024.0)
    );
    assert_eq!(current.len(), ROUTES + 1);
}
