//! Function logs: every line a function prints or logs, and every error of its calls,
//! kept per function in a ring bounded in bytes and streamed to followers
//! (`moontide logs NAME --follow`).
//!
//! Logs are held in memory (not persisted): a flood evicts the oldest lines and never
//! grows past the cap. Lines are also emitted to the node's own `tracing` output at debug
//! level.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use moontide_runtime::{LogLevel, LogSink};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::broadcast;

/// Bytes of log text kept per function.
pub const RING_BYTES: usize = 256 << 10;

/// One log line.
#[derive(Debug, Clone, Serialize)]
pub struct LogRecord {
    pub ts_ms: u64,
    pub level: &'static str,
    pub version: u64,
    pub request_id: String,
    pub message: String,
}

/// The log of one function (all its versions).
pub struct FunctionLog {
    name: String,
    ring: Mutex<Ring>,
    /// Made on the first `follow`: a broadcast channel preallocates its 1024 slots (about
    /// 100 KiB), which 10 000 deployed functions nobody follows should not pay.
    followers: std::sync::OnceLock<broadcast::Sender<LogRecord>>,
}

#[derive(Default)]
struct Ring {
    lines: VecDeque<LogRecord>,
    bytes: usize,
}

impl FunctionLog {
    fn new(name: &str) -> FunctionLog {
        FunctionLog {
            name: name.to_string(),
            ring: Mutex::new(Ring::default()),
            followers: std::sync::OnceLock::new(),
        }
    }

    pub fn push(&self, record: LogRecord) {
        tracing::debug!(function = %self.name, request_id = %record.request_id, level = record.level, "{}", record.message);
        let size = record.message.len() + record.request_id.len() + 32;
        {
            let mut ring = self.ring.lock();
            ring.bytes += size;
            ring.lines.push_back(record.clone());
            while ring.bytes > RING_BYTES {
                match ring.lines.pop_front() {
                    Some(old) => ring.bytes -= old.message.len() + old.request_id.len() + 32,
                    None => break,
                }
            }
        }
        if let Some(followers) = self.followers.get() {
            let _ = followers.send(record);
        }
    }

    /// The last `tail` lines.
    pub fn tail(&self, tail: usize) -> Vec<LogRecord> {
        let ring = self.ring.lock();
        let skip = ring.lines.len().saturating_sub(tail);
        ring.lines.iter().skip(skip).cloned().collect()
    }

    pub fn follow(&self) -> broadcast::Receiver<LogRecord> {
        self.followers
            .get_or_init(|| broadcast::channel(1024).0)
            .subscribe()
    }
}

/// The logs of every function on the node.
#[derive(Default)]
pub struct LogHub {
    functions: Mutex<HashMap<String, Arc<FunctionLog>>>,
}

impl LogHub {
    /// The log of `name`, created on first use.
    pub fn function(&self, name: &str) -> Arc<FunctionLog> {
        self.functions
            .lock()
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(FunctionLog::new(name)))
            .clone()
    }

    pub fn get(&self, name: &str) -> Option<Arc<FunctionLog>> {
        self.functions.lock().get(name).cloned()
    }

    pub fn remove(&self, name: &str) {
        self.functions.lock().remove(name);
    }
}

/// The sink one deployed version writes to.
pub struct VersionLogSink {
    pub log: Arc<FunctionLog>,
    pub version: u64,
}

impl LogSink for VersionLogSink {
    fn log(&self, level: LogLevel, request_id: &str, message: &str) {
        self.log.push(LogRecord {
            ts_ms: crate::records::now_ms(),
            level: level.as_str(),
            version: self.version,
            request_id: request_id.to_string(),
            message: message.to_string(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(message: &str) -> LogRecord {
        LogRecord {
            ts_ms: 0,
            level: "info",
            version: 1,
            request_id: "r".into(),
            message: message.into(),
        }
    }

    #[test]
    fn ring_is_bounded_in_bytes_and_keeps_the_newest() {
        let log = FunctionLog::new("f");
        let line = "x".repeat(1000);
        for _ in 0..1000 {
            log.push(record(&line));
        }
        log.push(record("last"));
        let kept = log.tail(usize::MAX);
        let bytes: usize = kept
            .iter()
            .map(|r| r.message.len() + r.request_id.len() + 32)
            .sum();
        assert!(bytes <= RING_BYTES, "{bytes}");
        assert!(kept.len() < 1001);
        assert_eq!(kept.last().unwrap().message, "last");
        assert_eq!(log.tail(2).len(), 2);
    }

    #[tokio::test]
    async fn followers_see_new_lines() {
        let log = FunctionLog::new("f");
        let mut follower = log.follow();
        log.push(record("hello"));
        assert_eq!(follower.recv().await.unwrap().message, "hello");
    }
}
