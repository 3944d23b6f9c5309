//! Caps on the data plane's open connections: node-wide (all worker threads together) and
//! per client address. A connection is counted from accept until its socket is dropped
//! (by the front or hyper), through a [`ConnGuard`] that travels with it.
//!
//! Cost at accept: the node-wide count is one atomic add on the `moontide_connections`
//! gauge, which is the count itself; the per-address count is a map split into [`SHARDS`]
//! shards, each behind its own mutex, picked by the address's hash, so two workers only
//! meet on a lock when their clients hash to the same shard, and never on a node-wide
//! lock. An address whose count falls to zero leaves its shard, so the map holds only
//! addresses with open connections. Measured (`cargo run --release -p moontide-server
//! --example conn_limits`, on 2 shared, loaded cores): admit + release costs ~60 ns with
//! the node-wide cap only, ~210 ns with both (1 or 10 000 addresses, 10 000 held open),
//! ~570 ns each with two threads admitting at once (the gauge's cache line moves between
//! cores); a loopback connect + accept + close costs ~57 µs there, so the caps are under
//! 1% of a connection's setup. IPv6 clients are counted by their /64 (one host usually
//! owns a whole /64, so per-address counting would not limit it at all); IPv4 by address.
//!
//! Over a cap, the connection is answered before its request is read, with a short JSON
//! error (`503 connection_limit` node-wide, `429 client_connection_limit` per address)
//! and `Connection: close`, written with one non-blocking write (a fresh socket's send
//! buffer always takes it), then closed after a short wait for the client to read it
//! (see [`ConnLimits::refuse`]). Refusals are counted in
//! `moontide_connections_refused_total{reason}`. The answer is HTTP/1.1, written before
//! the client has said what it speaks: an HTTP/2 prior-knowledge client sees a protocol
//! error and a closed connection, which is what it would see if the node closed at once.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::errors::ApiError;

/// Shards of the per-address map (a power of two).
pub const SHARDS: usize = 64;

/// Most refused connections waiting at once for their client to read the answer; more are
/// closed at once (still counted), so a flood of refused connections holds few sockets.
const MAX_LINGERING: usize = 256;

/// How long a refused connection waits for its client to read the answer and close.
const LINGER: Duration = Duration::from_secs(1);

/// The caps (0: no cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimitConfig {
    /// Most open data-plane connections on the node.
    pub total: usize,
    /// Most open data-plane connections from one client address (IPv6: one /64).
    pub per_ip: usize,
}

impl Default for ConnLimitConfig {
    fn default() -> Self {
        ConnLimitConfig {
            total: 16_384,
            per_ip: 4_096,
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node-wide cap.
    Total,
    /// The client address's cap.
    PerIp,
}

impl Refusal {
    /// The `reason` label of `moontide_connections_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Total => "total",
            Refusal::PerIp => "per_ip",
        }
    }

    fn error(self) -> ApiError {
        match self {
            Refusal::Total => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "connection_limit",
                "the node has as many open connections as it accepts; retry later",
            ),
            Refusal::PerIp => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "client_connection_limit",
                "too many open connections from this address; reuse or close some",
            ),
        }
    }
}

/// The node's connection counts; shared by the worker threads.
pub struct ConnLimits {
    config: ConnLimitConfig,
    /// Open connections (the `moontide_connections` gauge is the count).
    open: Gauge,
    shards: Box<[parking_lot::Mutex<HashMap<IpKey, u32>>]>,
    hasher: RandomState,
    refused_total: Counter,
    refused_per_ip: Counter,
    lingering: AtomicUsize,
    /// The canned answers, made once.
    answers: [Vec<u8>; 2],
}

/// A client address as counted: IPv4 whole, IPv6 by its /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum IpKey {
    V4(u32),
    V6(u64),
}

impl From<IpAddr> for IpKey {
    fn from(ip: IpAddr) -> IpKey {
        match ip {
            IpAddr::V4(v4) => IpKey::V4(v4.to_bits()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpKey::V4(v4.to_bits()),
                None => IpKey::V6((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

impl ConnLimits {
    /// `open` is the `moontide_connections` gauge; `refused_total`/`refused_per_ip` the
    /// refusal counters by reason.
    pub fn new(
        config: ConnLimitConfig,
        open: Gauge,
        refused_total: Counter,
        refused_per_ip: Counter,
    ) -> ConnLimits {
        ConnLimits {
            config,
            open,
            shards: (0..SHARDS)
                .map(|_| parking_lot::Mutex::new(HashMap::new()))
                .collect(),
            hasher: RandomState::new(),
            refused_total,
            refused_per_ip,
            lingering: AtomicUsize::new(0),
            answers: [
                answer(&Refusal::Total.error()),
                answer(&Refusal::PerIp.error()),
            ],
        }
    }

    /// Counts a new connection from `ip`, or says which cap it is over (then nothing is
    /// counted but the refusal).
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Refusal> {
        let before = self.open.inc();
        if self.config.total > 0 && before >= self.config.total as i64 {
            self.open.dec();
            self.refused_total.inc();
            return Err(Refusal::Total);
        }
        let key = if self.config.per_ip > 0 {
            let key = IpKey::from(ip);
            let mut shard = self.shard(&key).lock();
            let count = shard.entry(key).or_insert(0);
            if *count as usize >= self.config.per_ip {
                drop(shard);
                self.open.dec();
                self.refused_per_ip.inc();
                return Err(Refusal::PerIp);
            }
            *count += 1;
            Some(key)
        } else {
            None
        };
        Ok(ConnGuard {
            limits: self.clone(),
            key,
        })
    }

    fn shard(&self, key: &IpKey) -> &parking_lot::Mutex<HashMap<IpKey, u32>> {
        &self.shards[self.hasher.hash_one(key) as usize & (SHARDS - 1)]
    }

    fn release(&self, key: Option<IpKey>) {
        if let Some(key) = key {
            let mut shard = self.shard(&key).lock();
            if let Some(count) = shard.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    shard.remove(&key);
                }
            }
        }
        self.open.dec();
    }

    /// Open connections now.
    pub fn open(&self) -> i64 {
        self.open.get()
    }

    /// Answers a refused connection (see the module doc) and closes it. Runs on the
    /// accepting thread; never waits for a slow client longer than `LINGER` (1 s).
    pub fn refuse(self: &Arc<Self>, stream: TcpStream, refusal: Refusal) {
        let answer = match refusal {
            Refusal::Total => &self.answers[0],
            Refusal::PerIp => &self.answers[1],
        };
        // One non-blocking write: a new socket's send buffer is empty.
        let _ = stream.try_write(answer);
        if self.lingering.fetch_add(1, Ordering::Relaxed) >= MAX_LINGERING {
            self.lingering.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let limits = self.clone();
        tokio::task::spawn_local(async move {
            let mut stream = stream;
            // Half-close, then read what the client sends until it closes: closing with
            // its request unread would send a reset, which can destroy the answer before
            // the client reads it.
            let _ = stream.shutdown().await;
            let drain = async {
                let mut sink = [0u8; 1024];
                let mut total = 0usize;
                while let Ok(n) = stream.read(&mut sink).await {
                    total += n;
                    if n == 0 || total > 64 * 1024 {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(LINGER, drain).await;
            limits.lingering.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// The whole HTTP/1.1 answer to a refused connection.
fn answer(error: &ApiError) -> Vec<u8> {
    let body = error.body();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        error.status.as_u16(),
        error.status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if error.status == StatusCode::SERVICE_UNAVAILABLE {
        out.push_str("retry-after: 1\r\n");
    }
    out.push_str("connection: close\r\n\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    out
}

/// One counted connection; uncounts it when dropped.
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    key: Option<IpKey>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.limits.release(self.key.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits::new(
            ConnLimitConfig { total, per_ip },
            Gauge::default(),
            Counter::default(),
            Counter::default(),
        ))
    }

    #[test]
    fn the_per_ip_cap_counts_each_address_and_forgets_it_when_closed() {
        let limits = limits(0, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limits.admit(a).expect("first");
        let _second = limits.admit(a).expect("second");
        assert_eq!(limits.admit(a).err(), Some(Refusal::PerIp));
        let _other = limits.admit(b).expect("another address");
        drop(first);
        let _again = limits.admit(a).expect("a slot was freed");
        assert_eq!(limits.open(), 3);
        assert_eq!(limits.refused_per_ip.get(), 1);
    }

    #[test]
    fn the_total_cap_counts_every_address() {
        let limits = limits(2, 0);
        let _a = limits.admit("10.0.0.1".parse().unwrap()).expect("a");
        let b = limits.admit("10.0.0.2".parse().unwrap()).expect("b");
        assert_eq!(
            limits.admit("10.0.0.3".parse().unwrap()).err(),
            Some(Refusal::Total)
        );
        drop(b);
        assert_eq!(limits.open(), 1);
        let _c = limits.admit("10.0.0.3".parse().unwrap()).expect("c");
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let limits = limits(0, 1);
        let _a = limits.admit("2001:db8::1".parse().unwrap()).expect("a");
        assert_eq!(
            limits.admit("2001:db8::2".parse().unwrap()).err(),
            Some(Refusal::PerIp)
        );
        let _other = limits
            .admit("2001:db8:0:1::1".parse().unwrap())
            .expect("another /64");
        let _v4 = limits
            .admit("::ffff:10.0.0.1".parse().unwrap())
            .expect("v4");
        assert_eq!(
            limits.admit("10.0.0.1".parse().unwrap()).err(),
            Some(Refusal::PerIp),
            "a mapped IPv4 address is that address"
        );
    }

    #[test]
    fn refusal_answers_are_complete_http_responses() {
        let limits = limits(1, 1);
        let text = String::from_utf8(limits.answers[1].clone()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{text}"
        );
        assert!(text.contains("connection: close\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "client_connection_limit");
    }
}
