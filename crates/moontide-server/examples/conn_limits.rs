//! Micro benchmark of the connection caps' cost at accept, run by hand (never by the
//! tests):
//!
//! ```text
//! cargo run --release -p moontide-server --example conn_limits
//! ```
//!
//! Measures one `admit` + drop of its guard (what every accepted data-plane connection
//! pays) with the node-wide cap only, with both caps over 1 and 10 000 client addresses,
//! and with both caps on two threads at once (the worker count of the test machine); and,
//! for scale, one loopback TCP connect + accept + close.

use std::hint::black_box;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use moontide_server::edge::conn_limits::{ConnLimitConfig, ConnLimits};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

const ROUNDS: usize = 2_000_000;

fn limits(per_ip: usize) -> Arc<ConnLimits> {
    Arc::new(ConnLimits::new(
        ConnLimitConfig {
            total: 1 << 30,
            per_ip,
        },
        Gauge::default(),
        Counter::default(),
        Counter::default(),
    ))
}

fn addresses(count: u32) -> Vec<IpAddr> {
    (0..count)
        .map(|i| IpAddr::from((0x0a00_0000u32 + i).to_be_bytes()))
        .collect()
}

/// ns per admit + release.
fn run(limits: &Arc<ConnLimits>, addresses: &[IpAddr], rounds: usize) -> f64 {
    let started = Instant::now();
    for i in 0..rounds {
        let guard = limits.admit(addresses[i % addresses.len()]);
        black_box(&guard);
        drop(guard);
    }
    started.elapsed().as_nanos() as f64 / rounds as f64
}

fn main() {
    let one = addresses(1);
    let many = addresses(10_000);
    // Warm-up.
    run(&limits(4096), &many, ROUNDS / 10);

    println!("admit + release, ns per connection ({ROUNDS} rounds):");
    println!(
        "  node-wide cap only (per-ip 0):      {:6.1}",
        run(&limits(0), &one, ROUNDS)
    );
    println!(
        "  both caps, 1 address:               {:6.1}",
        run(&limits(4096), &one, ROUNDS)
    );
    println!(
        "  both caps, 10 000 addresses:        {:6.1}",
        run(&limits(4096), &many, ROUNDS)
    );
    // 10 000 connections held open, then admit + release of others on top.
    let held_limits = limits(4096);
    let held: Vec<_> = many
        .iter()
        .map(|ip| held_limits.admit(*ip).expect("admitted"))
        .collect();
    println!(
        "  both caps, 10 000 held open:        {:6.1}",
        run(&held_limits, &many, ROUNDS)
    );
    drop(held);
    let shared = limits(4096);
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let shared = shared.clone();
            let mine: Vec<IpAddr> = addresses(10_000).into_iter().skip(t).step_by(2).collect();
            std::thread::spawn(move || run(&shared, &mine, ROUNDS))
        })
        .collect();
    let per_thread: Vec<f64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    println!(
        "  both caps, 2 threads at once:       {:6.1} / {:6.1}",
        per_thread[0], per_thread[1]
    );

    // For scale: a loopback TCP connect + accept + close.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().unwrap();
    let rounds = 20_000;
    let started = Instant::now();
    for _ in 0..rounds {
        let client = std::net::TcpStream::connect(address).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        drop(client);
        drop(server);
    }
    let per = started.elapsed() / rounds;
    println!(
        "loopback connect + accept + close:    {:6.1} (for scale)",
        per.as_nanos() as f64
    );
}
