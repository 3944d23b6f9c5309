//! Per-call and per-instance limits, with safe defaults.

use std::time::Duration;

/// The limits one function version runs under. Every instance of the version gets the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Wall-clock budget of one call; an instance's init phase gets the same budget of its
    /// own.
    pub timeout: Duration,
    /// Cap on the memory of one instance's Lua state, in bytes.
    pub memory_bytes: usize,
    /// Cap on one log line, in bytes (longer lines are cut and marked).
    pub log_line_bytes: usize,
    /// Cap on an outbound HTTP response body read by `http.request`, in bytes.
    pub http_body_bytes: usize,
    /// Cap on a response body (or a direct invocation's JSON result), in bytes.
    pub response_body_bytes: usize,
    /// Cap on the number of response header lines (each value of `multiValueHeaders` is
    /// one line).
    pub response_headers: usize,
    /// Cap on one response header line: its name and value together, in bytes.
    pub response_header_bytes: usize,
    /// Cap on all response header lines together (`name: value\r\n` each), in bytes: the
    /// most the node's own proxy accepts from an upstream (`gateway::http1::MAX_HEAD_BYTES`).
    pub response_head_bytes: usize,
}

impl Limits {
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_MEMORY_BYTES: usize = 64 << 20;
    /// The smallest memory cap accepted: a Luau state with the modules loaded needs ~200 KB.
    pub const MIN_MEMORY_BYTES: usize = 1 << 20;
    pub const MAX_MEMORY_BYTES: usize = 4 << 30;
    pub const MIN_TIMEOUT: Duration = Duration::from_millis(1);
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Self::DEFAULT_TIMEOUT,
            memory_bytes: Self::DEFAULT_MEMORY_BYTES,
            log_line_bytes: 16 << 10,
            http_body_bytes: 10 << 20,
            response_body_bytes: 6 << 20,
            response_headers: 100,
            response_header_bytes: 8 << 10,
            response_head_bytes: 64 << 10,
        }
    }
}
