//! The autoscaler's arithmetic: how many instances one function needs on one worker thread,
//! from the concurrency it observes. Pure logic, no Lua, no clocks of its own — the pool
//! ([`crate::pool`]) feeds it events and ticks and acts on what it answers.
//!
//! # The policy, and where it departs from Knative's KPA
//!
//! KPA averages observed concurrency over a 60 s *stable* window and a 6 s *panic* window,
//! ticks every 2 s, and switches into a panic mode (no scale-down) when the panic average
//! reaches twice the ready capacity. It is built for pods that take seconds to start, and
//! it reacts in seconds. Here an instance starts in about 100 µs and lives on the thread
//! that serves its calls, so:
//!
//! - **Observed concurrency** is the *peak* number of calls holding or waiting for an
//!   instance of the function on this thread during each tick ([`TICK`], 10 ms) — the
//!   instances the tick actually needed. Averaging instantaneous samples would undercount
//!   short calls that overlap.
//! - Two exponential moving averages of it: `panic` (time constant `panic_window`, default
//!   100 ms) and `stable` (`stable_window`, default 500 ms: an instance starts in ~100 µs,
//!   so holding capacity longer after a drop buys little). Exponential windows need O(1)
//!   state per function and handle skipped ticks exactly, which matters with 10 000
//!   functions on a node (only functions with traffic are ticked).
//! - **Desired** = `ceil((max(stable, panic) + TREND_GAIN × max(0, panic − stable)) /
//!   target)`. Scale-up follows the fast average (and instances are also created on
//!   demand, so a spike never waits for a tick); scale-down follows the slow one. There is
//!   no mode switch: `max` keeps capacity while the fast average is above the slow one,
//!   which is what KPA's panic mode is for, without its cliff when the mode ends.
//! - **Pre-warming**: a fast average above the slow one means the load is rising; the
//!   trend term adds a quarter of the gap, and when the desired count exceeds the live
//!   instances the tick creates the difference (half the gap overshot for about a second
//!   after a step; with a quarter and the 500 ms stable window the step's instance-seconds
//!   fell from 1.31× to 1.23× the oracle, with no error either way — `bench/elasticity.sh`). So while
//!   load rises cold starts happen on the tick, ahead of the calls that need them, rather
//!   than on the request path. When load falls the term is zero.
//! - **Idle grace**: the last instance stays until no call came for `idle_timeout`; then
//!   the function falls to `min` (zero by default).
//!
//! A small tolerance ([`ROUNDING_SLACK`]) keeps a decaying average from holding a whole
//! instance for a sliver of concurrency.

use std::time::{Duration, Instant};

use crate::api::FunctionConfig;

/// How often active functions are re-evaluated on each worker thread.
pub const TICK: Duration = Duration::from_millis(10);

/// Fractions of an instance below this are not rounded up to a whole one.
pub const ROUNDING_SLACK: f64 = 0.1;

/// How much of a rising trend (fast average above slow) is provisioned ahead.
pub const TREND_GAIN: f64 = 0.25;

/// The policy knobs the scaler reads (from the function's config).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub target: f64,
    pub stable_window: Duration,
    pub panic_window: Duration,
    pub idle_grace: Duration,
}

impl Policy {
    pub fn of(config: &FunctionConfig) -> Policy {
        Policy {
            target: f64::from(config.concurrency.max(1)),
            stable_window: Duration::from_millis(config.stable_window_ms.max(1)),
            panic_window: Duration::from_millis(config.panic_window_ms.max(1)),
            idle_grace: Duration::from_millis(config.idle_timeout_ms),
        }
    }
}

/// One function's scaling state on one worker thread.
#[derive(Debug, Clone)]
pub struct Scaler {
    /// Calls holding or waiting for an instance now.
    level: u32,
    /// Highest `level` since the last tick.
    peak: u32,
    /// When the averages were last brought up to date.
    sampled_at: Instant,
    stable: f64,
    panic: f64,
    /// When the last call started.
    last_call: Instant,
}

impl Scaler {
    pub fn new(now: Instant) -> Scaler {
        Scaler {
            level: 0,
            peak: 0,
            sampled_at: now,
            stable: 0.0,
            panic: 0.0,
            // A new function counts as just called: its first instance gets the grace.
            last_call: now,
        }
    }

    /// A call wants an instance (it holds one or waits for one until [`Scaler::call_ended`]).
    pub fn call_started(&mut self, now: Instant) {
        self.level += 1;
        self.peak = self.peak.max(self.level);
        self.last_call = now;
    }

    pub fn call_ended(&mut self) {
        self.level = self.level.saturating_sub(1);
    }

    /// Calls holding or waiting for an instance now.
    pub fn level(&self) -> u32 {
        self.level
    }

    /// Brings the averages up to `now` and answers the instances this thread should hold.
    ///
    /// Exact for any gap since the last sample: the first tick of the gap saw `peak`, the
    /// rest saw `level` (nothing started in between, or the function would have been
    /// ticked).
    pub fn sample(&mut self, now: Instant, policy: &Policy) -> u32 {
        let elapsed = now.saturating_duration_since(self.sampled_at);
        if elapsed > Duration::ZERO {
            let first = elapsed.min(TICK);
            let rest = elapsed - first;
            let peak = f64::from(self.peak);
            let level = f64::from(self.level);
            self.stable = decay(self.stable, peak, first, policy.stable_window);
            self.panic = decay(self.panic, peak, first, policy.panic_window);
            if rest > Duration::ZERO {
                self.stable = decay(self.stable, level, rest, policy.stable_window);
                self.panic = decay(self.panic, level, rest, policy.panic_window);
            }
            self.sampled_at = now;
            self.peak = self.level;
        }
        self.desired(now, policy)
    }

    /// Instances wanted now, from the averages as last sampled.
    pub fn desired(&self, now: Instant, policy: &Policy) -> u32 {
        let trend = (self.panic - self.stable).max(0.0);
        let wanted = self.stable.max(self.panic) + TREND_GAIN * trend;
        let needed = (wanted / policy.target - ROUNDING_SLACK).ceil().max(0.0) as u32;
        // Within the idle grace, keep at least the one instance a next call needs.
        let in_grace = now.saturating_duration_since(self.last_call) < policy.idle_grace;
        needed.max(u32::from(in_grace && self.was_used()))
    }

    /// `true` while the fast tick can change the answer: a call is in flight, or the
    /// averages ask for more than the one instance the idle grace keeps anyway. A function
    /// called now and then (10 000 functions sharing a node) is left to the sweep, so a
    /// tick costs O(busy functions), not O(functions with traffic).
    pub fn is_active(&self) -> bool {
        self.level > 0 || self.stable.max(self.panic) > 1.0
    }

    fn was_used(&self) -> bool {
        self.level > 0 || self.stable > 0.0 || self.panic > 0.0
    }

    /// The fast and slow averages.
    #[cfg(test)]
    fn averages(&self) -> (f64, f64) {
        (self.panic, self.stable)
    }
}

/// One step of an exponential moving average: `value` held for `elapsed`, time constant
/// `window`.
fn decay(average: f64, value: f64, elapsed: Duration, window: Duration) -> f64 {
    let keep = (-elapsed.as_secs_f64() / window.as_secs_f64()).exp();
    average * keep + value * (1.0 - keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            target: 1.0,
            stable_window: Duration::from_secs(1),
            panic_window: Duration::from_millis(100),
            idle_grace: Duration::from_secs(60),
        }
    }

    /// Holds `level` concurrent calls for `ticks` ticks, sampling each tick.
    fn hold(scaler: &mut Scaler, at: &mut Instant, level: u32, ticks: u32) -> u32 {
        while scaler.level() < level {
            scaler.call_started(*at);
        }
        while scaler.level() > level {
            scaler.call_ended();
        }
        let mut desired = 0;
        for _ in 0..ticks {
            *at += TICK;
            desired = scaler.sample(*at, &policy());
        }
        desired
    }

    #[test]
    fn steady_load_converges_to_its_concurrency() {
        let mut at = Instant::now();
        let mut scaler = Scaler::new(at);
        assert_eq!(hold(&mut scaler, &mut at, 10, 500), 10);
    }

    #[test]
    fn a_spike_is_followed_within_a_panic_window_and_left_slowly() {
        let mut at = Instant::now();
        let mut scaler = Scaler::new(at);
        hold(&mut scaler, &mut at, 10, 500);
        // 1 -> 10x: three panic windows bring the desired count most of the way.
        let up = hold(&mut scaler, &mut at, 100, 30);
        assert!(
            up >= 90,
            "desired {up} after 300 ms of 100 concurrent calls"
        );
        hold(&mut scaler, &mut at, 100, 500);
        // Back to 10: after 100 ms the stable average still holds most instances...
        let holding = hold(&mut scaler, &mut at, 10, 10);
        assert!(holding > 80, "desired {holding} 100 ms after the spike");
        // ...and after 5 stable windows it is back near the load.
        let settled = hold(&mut scaler, &mut at, 10, 500);
        assert!(settled <= 11, "desired {settled} 5 s after the spike");
    }

    #[test]
    fn idle_function_keeps_one_instance_for_the_grace_then_none() {
        let mut at = Instant::now();
        let mut scaler = Scaler::new(at);
        hold(&mut scaler, &mut at, 3, 100);
        hold(&mut scaler, &mut at, 0, 1);
        let policy = Policy {
            idle_grace: Duration::from_secs(30),
            ..policy()
        };
        at += Duration::from_secs(10);
        assert_eq!(scaler.sample(at, &policy), 1, "within the grace");
        at += Duration::from_secs(21);
        assert_eq!(scaler.sample(at, &policy), 0, "after the grace");
        assert!(!scaler.is_active());
    }

    #[test]
    fn a_function_called_now_and_then_leaves_the_fast_tick() {
        let mut at = Instant::now();
        let mut scaler = Scaler::new(at);
        // Three short calls a second (one tick each).
        for _ in 0..30 {
            scaler.call_started(at);
            scaler.call_ended();
            at += Duration::from_millis(333);
            assert!(scaler.sample(at, &policy()) <= 1);
            assert!(!scaler.is_active());
        }
    }

    #[test]
    fn a_gap_between_samples_decays_as_if_every_tick_had_been_sampled() {
        let start = Instant::now();
        let mut ticked = Scaler::new(start);
        let mut skipped = Scaler::new(start);
        for scaler in [&mut ticked, &mut skipped] {
            scaler.call_started(start);
            scaler.call_started(start);
            scaler.call_ended();
            scaler.call_ended();
        }
        let mut at = start;
        for _ in 0..50 {
            at += TICK;
            ticked.sample(at, &policy());
        }
        skipped.sample(at, &policy());
        let (a, b) = (ticked.averages(), skipped.averages());
        assert!(
            (a.0 - b.0).abs() < 1e-9 && (a.1 - b.1).abs() < 1e-9,
            "{a:?} vs {b:?}"
        );
    }

    #[test]
    fn a_rising_load_is_provisioned_ahead_and_a_falling_one_is_not() {
        let mut at = Instant::now();
        let mut scaler = Scaler::new(at);
        hold(&mut scaler, &mut at, 4, 500);
        // A quarter second into a step to 8, the desired count runs ahead of the load.
        let rising = hold(&mut scaler, &mut at, 8, 25);
        assert!(rising > 8, "desired {rising} while the load steps up to 8");
        hold(&mut scaler, &mut at, 8, 500);
        // Falling: the slow average leads, no trend term.
        let falling = hold(&mut scaler, &mut at, 4, 25);
        assert!(
            (5..=8).contains(&falling),
            "desired {falling} while falling"
        );
    }

    #[test]
    fn target_concurrency_divides_the_need() {
        let mut at = Instant::now();
        let mut scaler = Scaler::new(at);
        hold(&mut scaler, &mut at, 10, 500);
        let policy = Policy {
            target: 4.0,
            ..policy()
        };
        assert_eq!(scaler.sample(at, &policy), 3);
    }
}
