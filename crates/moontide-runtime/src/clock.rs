//! A coarse, process-wide millisecond clock that is cheap enough to read on every Luau
//! interrupt.
//!
//! Reading `Instant::now()` costs a vDSO call; the interrupt fires at every loop back-edge
//! and call, so it reads this atomic instead. One background thread advances it every
//! millisecond (the epoch-ticker pattern wasmtime uses for its epoch interruption).
//! Precision is therefore ±1 ms plus scheduling delay, which is what a per-call deadline
//! needs.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static NOW_MS: AtomicU64 = AtomicU64::new(0);
static ORIGIN: OnceLock<Instant> = OnceLock::new();

/// Starts the ticker thread (idempotent). Called by [`crate::Engine::new`].
pub fn start() {
    let mut started = false;
    let origin = *ORIGIN.get_or_init(|| {
        started = true;
        Instant::now()
    });
    if !started {
        return;
    }
    std::thread::Builder::new()
        .name("moontide-clock".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_millis(1));
                NOW_MS.store(origin.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        })
        .expect("spawning the clock thread");
}

/// Milliseconds since the clock started, advanced by the ticker (coarse).
#[inline]
pub fn now_ms() -> u64 {
    NOW_MS.load(Ordering::Relaxed)
}

/// Milliseconds since the clock started, read precisely (for setting deadlines).
pub fn precise_now_ms() -> u64 {
    ORIGIN
        .get()
        .map(|origin| origin.elapsed().as_millis() as u64)
        .unwrap_or(0)
}
