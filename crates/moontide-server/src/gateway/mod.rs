//! The API gateway: routes and upstreams users configure at runtime, and the proxy that
//! serves them. `config` holds the wire and stored forms with their validation; the
//! routing table and the balancing/health/breaker logic live in the `moontide-gateway`
//! crate (no I/O); `proxy` forwards requests over keep-alive connections per worker
//! thread.

pub mod config;
