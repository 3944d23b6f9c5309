//! The node's edge against slow, idle and greedy clients, on every listener: how long a
//! client may take to send a request head and each next piece of a body
//! ([`ClientTimeouts`], applied by the front, by hyper on the data plane and by the admin
//! listener), a per-read timeout for request bodies ([`timed_body`]), the caps on open
//! data-plane connections, node-wide and per client address ([`conn_limits`]), and the
//! admin listener's server ([`admin_listener`]), which gets the same timeouts.
//!
//! Why a module of its own: these are the node's answers to hostile clients rather than
//! features of a request path, and each listener must apply all of them; keeping them
//! together keeps the listeners from drifting apart.

pub mod admin_listener;
pub mod conn_limits;
pub mod timed_body;

use std::time::Duration;

/// How long a client may keep the node waiting, on every listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// Longest wait for a whole request head, counted from when the wait starts: an idle
    /// keep-alive connection's wait for its next request is included, so this is also
    /// the idle timeout (as hyper's `header_read_timeout`).
    pub head: Duration,
    /// Longest wait for each next piece of a request body (nginx's `client_body_timeout`):
    /// a slow upload goes on as long as it keeps moving.
    pub body: Duration,
}

impl Default for ClientTimeouts {
    fn default() -> Self {
        ClientTimeouts {
            head: Duration::from_secs(30),
            body: Duration::from_secs(60),
        }
    }
}
