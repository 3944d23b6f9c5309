//! A coarse, process-wide millisecond clock that is cheap enough to read on every Luau
//! interrupt.
//!
//! Reading `Instant::now()` costs a vDSO call; the interrupt fires at every loop back-edge
//! and call, so it reads this atomic instead. One background thread advances it every
//! millisecond (the epoch-ticker pattern wasmtime uses for its epoch interruption) — but
//! only while calls are in flight: an idle node's ticker sleeps, and the first call to
//! start refreshes the clock precisely before anything reads it. After each tick the
//! ticker runs the watchdog, which arms the interrupt of calls whose timeslice or deadline
//! is due (`watchdog`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::Thread;
use std::time::{Duration, Instant};

static NOW_MS: AtomicU64 = AtomicU64::new(0);
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static ORIGIN: OnceLock<Instant> = OnceLock::new();
static TICKER: OnceLock<Thread> = OnceLock::new();

fn origin() -> Instant {
    *ORIGIN.get_or_init(Instant::now)
}

/// Starts the ticker thread (idempotent). Called by [`crate::Engine::new`].
pub fn start() {
    TICKER.get_or_init(|| {
        let origin = origin();
        std::thread::Builder::new()
            .name("moontide-clock".into())
            .spawn(move || {
                loop {
                    if IN_FLIGHT.load(Ordering::Acquire) == 0 {
                        // `Ticking::start` unparks us; a wake-up before we park is kept.
                        std::thread::park();
                        continue;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    let now = origin.elapsed().as_millis() as u64;
                    NOW_MS.store(now, Ordering::Relaxed);
                    crate::watchdog::tick(now);
                }
            })
            .expect("spawning the clock thread")
            .thread()
            .clone()
    });
}

/// Milliseconds since the clock started, advanced by the ticker (coarse; current while any
/// [`Ticking`] guard is alive).
#[inline]
pub fn now_ms() -> u64 {
    NOW_MS.load(Ordering::Relaxed)
}

/// Milliseconds since the clock started, read precisely (for `ctx:remaining_ms()`).
pub fn precise_now_ms() -> u64 {
    origin().elapsed().as_millis() as u64
}

/// Keeps the ticker running while a call is in flight.
pub struct Ticking(());

impl Ticking {
    pub fn start() -> Ticking {
        if IN_FLIGHT.fetch_add(1, Ordering::AcqRel) == 0 {
            NOW_MS.store(precise_now_ms(), Ordering::Relaxed);
            if let Some(ticker) = TICKER.get() {
                ticker.unpark();
            }
        }
        Ticking(())
    }
}

impl Drop for Ticking {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_advances_while_ticking() {
        start();
        let guard = Ticking::start();
        let before = now_ms();
        std::thread::sleep(Duration::from_millis(30));
        assert!(now_ms() > before, "the ticker advanced the clock");
        drop(guard);
    }
}
