//! Micro benchmark of the request-path normal form, run by hand (never by the tests):
//!
//! ```text
//! cargo run --release -p moontide-gateway --example path_normalize
//! ```
//!
//! Measures `path::normalize` on paths already in normal form (the quick check alone, no
//! allocation: what nearly every request pays, on the front's hot path) and on paths that
//! need the full pass, and prints ns/path for each.

use std::hint::black_box;
use std::time::Instant;

use moontide_gateway::path::normalize;

const ROUNDS: usize = 2_000_000;

fn measure(label: &str, paths: &[&str]) {
    let started = Instant::now();
    let mut kept = 0usize;
    for round in 0..ROUNDS {
        let path = black_box(paths[round % paths.len()]);
        if let Ok(normal) = normalize(path) {
            kept += normal.len();
        }
    }
    let elapsed = started.elapsed();
    black_box(kept);
    println!(
        "{label:<32} {:>7.1} ns/path",
        elapsed.as_nanos() as f64 / ROUNDS as f64
    );
}

fn main() {
    measure(
        "already normal (quick check)",
        &[
            "/proxy",
            "/api/v1/users/12345/orders",
            "/static/css/site.min.css",
            "/a/.hidden/file..txt",
        ],
    );
    measure(
        "needs the full pass",
        &[
            "/api/public/../private/secret.txt",
            "/api/%70rivate/secret.txt",
            "/api//private/secret.txt",
            "/a%20b%3ac/./d",
        ],
    );
}
