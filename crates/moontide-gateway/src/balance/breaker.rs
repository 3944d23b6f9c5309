//! A per-node circuit breaker: Closed → Open → HalfOpen → Closed.
//!
//! - **Closed**: every request is let through. The breaker opens after
//!   `failure_threshold` consecutive failures (default 5; 0 turns this rule off), or — if
//!   `failure_ratio` is set — when over the last `window` (default 10 s, kept as 10 buckets,
//!   Hystrix-style) at least `min_requests` (default 20) requests finished and more than
//!   `ratio` (default 0.5) of them failed.
//! - **Open**: nothing is let through for `open_for` (default 10 s). Each time a half-open
//!   trial fails the breaker re-opens for twice as long as the previous time, up to
//!   `max_open_for` (default 300 s, Envoy's default `max_ejection_time`), so a node that
//!   stays broken is probed ever more rarely; once the breaker closes, the next trip starts
//!   from `open_for` again.
//! - **HalfOpen**: when the open period is over, the next `try_acquire` moves the breaker to
//!   half-open, which admits at most `half_open_probes` (default 1) concurrent trial
//!   requests. `success_threshold` (default 1) successful trials close it; any failed trial
//!   re-opens it. A trial that ends without an outcome (the request was cancelled) just
//!   frees its slot.
//!
//! Every state change bumps a generation; an [`Admission`] remembers the generation it was
//! given in and the breaker ignores outcomes from an older one: a slow request let through
//! while the breaker was closed and finishing after it opened neither extends nor shortens
//! the open period, and only trials decide a half-open breaker.
//!
//! This is plain `&mut` state with time passed in. [`NodeState`](super::NodeState) makes
//! it `Sync`: it keeps the breaker under the node's short lock, and mirrors its mode into
//! atomics so that a closed breaker admits without taking the lock.

use std::time::{Duration, Instant};

/// Breaker settings. See the module doc for the meaning and defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open a closed breaker; 0 disables the rule.
    pub failure_threshold: u32,
    /// Optional failure-ratio rule over a rolling window.
    pub failure_ratio: Option<FailureRatio>,
    /// How long the breaker stays open the first time.
    pub open_for: Duration,
    /// Cap of the doubling open period.
    pub max_open_for: Duration,
    /// Concurrent trial requests in half-open (0 counts as 1: a breaker that admits no
    /// trial would never close).
    pub half_open_probes: u32,
    /// Successful trials that close a half-open breaker (0 counts as 1).
    pub success_threshold: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_ratio: None,
            open_for: Duration::from_secs(10),
            max_open_for: Duration::from_secs(300),
            half_open_probes: 1,
            success_threshold: 1,
        }
    }
}

/// The failure-ratio rule: open when, over the last `window`, at least `min_requests`
/// requests finished and the share of failures is above `ratio`.
#[derive(Debug, Clone, PartialEq)]
pub struct FailureRatio {
    /// Share of failures (0.0–1.0) above which the breaker opens.
    pub ratio: f64,
    /// Fewest finished requests in the window for the ratio to count.
    pub min_requests: u32,
    /// Length of the rolling window (kept as [`WINDOW_BUCKETS`] buckets).
    pub window: Duration,
}

impl Default for FailureRatio {
    fn default() -> Self {
        Self {
            ratio: 0.5,
            min_requests: 20,
            window: Duration::from_secs(10),
        }
    }
}

/// Buckets of the rolling window: it slides in steps of `window / 10`.
pub const WINDOW_BUCKETS: usize = 10;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerMode {
    /// Requests flow; failures are counted.
    Closed,
    /// No request is admitted until the open period ends.
    Open,
    /// Only trial requests are admitted, up to the probe quota.
    HalfOpen,
}

/// A state change, returned so that the server can log it and count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerTransition {
    /// The breaker opened (from closed, or again from half-open) for this long.
    Opened {
        /// Length of this open period.
        open_for: Duration,
    },
    /// The open period ended and the breaker admits trials.
    HalfOpen,
    /// Enough trials succeeded: the breaker is closed again.
    Closed,
}

/// Proof that a request was admitted, to hand back with its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub(super) generation: u64,
    pub(super) probe: bool,
}

impl Admission {
    /// Whether this request is a half-open trial.
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open {
        until: Instant,
        open_for: Duration,
    },
    HalfOpen {
        probes: u32,
        successes: u32,
        open_for: Duration,
    },
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    slot: u64,
    ok: u32,
    failed: u32,
}

/// Rolling failure counts, one bucket per tenth of the window.
#[derive(Debug, Clone, Default)]
struct Window {
    origin: Option<Instant>,
    buckets: [Bucket; WINDOW_BUCKETS],
}

impl Window {
    fn slot(&mut self, now: Instant, window: Duration) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        let width = (window.as_nanos() / WINDOW_BUCKETS as u128).max(1);
        (now.saturating_duration_since(origin).as_nanos() / width) as u64
    }

    /// Counts an outcome and returns the totals (ok, failed) over the window.
    fn record(&mut self, ok: bool, now: Instant, window: Duration) -> (u64, u64) {
        let slot = self.slot(now, window);
        let b = &mut self.buckets[(slot % WINDOW_BUCKETS as u64) as usize];
        if b.slot != slot {
            *b = Bucket {
                slot,
                ok: 0,
                failed: 0,
            };
        }
        if ok {
            b.ok += 1;
        } else {
            b.failed += 1;
        }
        self.buckets
            .iter()
            .filter(|b| b.slot + WINDOW_BUCKETS as u64 > slot && b.slot <= slot)
            .fold((0, 0), |(o, f), b| {
                (o + u64::from(b.ok), f + u64::from(b.failed))
            })
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// One node's circuit breaker (plain state; see the module doc).
#[derive(Debug, Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: State,
    generation: u64,
    consecutive_failures: u32,
    window: Window,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            state: State::Closed,
            generation: 0,
            consecutive_failures: 0,
            window: Window::default(),
        }
    }

    /// Replaces the settings, keeping the state (an upstream edit must not close an open
    /// breaker). The rolling window restarts if its length changed.
    pub fn set_config(&mut self, cfg: BreakerConfig) {
        let old = self.cfg.failure_ratio.as_ref().map(|r| r.window);
        if old != cfg.failure_ratio.as_ref().map(|r| r.window) {
            self.window.clear();
        }
        self.cfg = cfg;
    }

    /// The settings in force.
    pub fn config(&self) -> &BreakerConfig {
        &self.cfg
    }

    /// The stored mode. An `Open` breaker whose period is over stays `Open` here until the
    /// next [`try_acquire`](Self::try_acquire) moves it to half-open.
    pub fn mode(&self) -> BreakerMode {
        match self.state {
            State::Closed => BreakerMode::Closed,
            State::Open { .. } => BreakerMode::Open,
            State::HalfOpen { .. } => BreakerMode::HalfOpen,
        }
    }

    /// When the current open period ends, if open.
    pub fn open_until(&self) -> Option<Instant> {
        match self.state {
            State::Open { until, .. } => Some(until),
            _ => None,
        }
    }

    /// Bumped on every state change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// An admission for a closed breaker of this generation, given without the lock (see
    /// [`NodeState`](super::NodeState)).
    pub(super) fn closed_admission(generation: u64) -> Admission {
        Admission {
            generation,
            probe: false,
        }
    }

    fn probes(&self) -> u32 {
        self.cfg.half_open_probes.max(1)
    }

    /// Whether [`try_acquire`](Self::try_acquire) would admit a request at `now`. A pure
    /// read: balancers ask it of every candidate.
    pub fn allows(&self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until, .. } => now >= until,
            State::HalfOpen { probes, .. } => probes < self.probes(),
        }
    }

    /// Admits a request at `now`, or refuses it. Moves an open breaker whose period is
    /// over to half-open and takes a trial slot there.
    pub fn try_acquire(&mut self, now: Instant) -> Option<Admission> {
        if let State::Open { until, open_for } = self.state {
            if now < until {
                return None;
            }
            self.set(State::HalfOpen {
                probes: 0,
                successes: 0,
                open_for,
            });
        }
        let quota = self.probes();
        match &mut self.state {
            State::Closed => Some(Admission {
                generation: self.generation,
                probe: false,
            }),
            State::HalfOpen { probes, .. } if *probes < quota => {
                *probes += 1;
                Some(Admission {
                    generation: self.generation,
                    probe: true,
                })
            }
            _ => None,
        }
    }

    /// Like `try_acquire`, also reporting the move to half-open if this call made it.
    pub fn try_acquire_reporting(
        &mut self,
        now: Instant,
    ) -> (Option<Admission>, Option<BreakerTransition>) {
        let was_open = matches!(self.state, State::Open { .. });
        let admission = self.try_acquire(now);
        let moved = was_open && matches!(self.state, State::HalfOpen { .. });
        (admission, moved.then_some(BreakerTransition::HalfOpen))
    }

    /// Records the outcome of an admitted request finished at `now`; returns the state
    /// change it caused, if any.
    pub fn record(
        &mut self,
        admission: Admission,
        ok: bool,
        now: Instant,
    ) -> Option<BreakerTransition> {
        if admission.generation != self.generation {
            return None;
        }
        match (&mut self.state, admission.probe) {
            (State::Closed, false) => {
                let mut trip = false;
                if ok {
                    self.consecutive_failures = 0;
                } else {
                    self.consecutive_failures += 1;
                    let threshold = self.cfg.failure_threshold;
                    trip = threshold > 0 && self.consecutive_failures >= threshold;
                }
                if let Some(rule) = &self.cfg.failure_ratio {
                    let (good, bad) = self.window.record(ok, now, rule.window);
                    let total = good + bad;
                    trip |= !ok
                        && total >= u64::from(rule.min_requests)
                        && bad as f64 > rule.ratio * total as f64;
                }
                trip.then(|| self.open(now, self.cfg.open_for))
            }
            (
                State::HalfOpen {
                    probes,
                    successes,
                    open_for,
                },
                true,
            ) => {
                *probes = probes.saturating_sub(1);
                if ok {
                    *successes += 1;
                }
                let (successes, open_for) = (*successes, *open_for);
                if !ok {
                    let next = open_for
                        .saturating_mul(2)
                        .min(self.cfg.max_open_for)
                        .max(self.cfg.open_for);
                    return Some(self.open(now, next));
                }
                if successes >= self.cfg.success_threshold.max(1) {
                    self.set(State::Closed);
                    return Some(BreakerTransition::Closed);
                }
                None
            }
            _ => None,
        }
    }

    /// Releases an admission whose request ended without an outcome (cancelled): a trial
    /// frees its half-open slot; nothing is counted.
    pub fn cancel(&mut self, admission: Admission) {
        if admission.generation != self.generation || !admission.probe {
            return;
        }
        if let State::HalfOpen { probes, .. } = &mut self.state {
            *probes = probes.saturating_sub(1);
        }
    }

    fn open(&mut self, now: Instant, open_for: Duration) -> BreakerTransition {
        self.set(State::Open {
            until: super::instant_after(now, open_for),
            open_for,
        });
        BreakerTransition::Opened { open_for }
    }

    fn set(&mut self, state: State) {
        self.state = state;
        self.generation += 1;
        self.consecutive_failures = 0;
        self.window.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn fail(b: &mut Breaker, now: Instant) -> Option<BreakerTransition> {
        let a = b.try_acquire(now).expect("admitted");
        b.record(a, false, now)
    }

    fn succeed(b: &mut Breaker, now: Instant) -> Option<BreakerTransition> {
        let a = b.try_acquire(now).expect("admitted");
        b.record(a, true, now)
    }

    #[test]
    fn opens_after_consecutive_failures_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerConfig::default());
        for _ in 0..4 {
            assert_eq!(fail(&mut b, t0), None);
        }
        assert_eq!(succeed(&mut b, t0), None);
        for _ in 0..4 {
            assert_eq!(fail(&mut b, t0), None);
        }
        assert_eq!(
            fail(&mut b, t0),
            Some(BreakerTransition::Opened { open_for: 10 * S })
        );
        assert_eq!(b.mode(), BreakerMode::Open);
        assert_eq!(b.open_until(), Some(t0 + 10 * S));
    }

    #[test]
    fn admits_nothing_while_open() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerConfig::default());
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        for t in [
            t0,
            t0 + S,
            t0 + 9 * S,
            t0 + 10 * S - Duration::from_nanos(1),
        ] {
            assert!(!b.allows(t));
            assert_eq!(b.try_acquire(t), None);
        }
        assert!(b.allows(t0 + 10 * S));
    }

    #[test]
    fn half_open_admits_exactly_the_probe_quota() {
        let t0 = Instant::now();
        let cfg = BreakerConfig {
            half_open_probes: 2,
            success_threshold: 2,
            ..Default::default()
        };
        let mut b = Breaker::new(cfg);
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        let t1 = t0 + 10 * S;
        let (p1, moved) = b.try_acquire_reporting(t1);
        assert_eq!(moved, Some(BreakerTransition::HalfOpen));
        let p1 = p1.unwrap();
        let p2 = b.try_acquire(t1).unwrap();
        assert!(p1.is_probe() && p2.is_probe());
        assert_eq!(b.mode(), BreakerMode::HalfOpen);
        assert!(!b.allows(t1));
        assert_eq!(b.try_acquire(t1), None);
        // A cancelled trial frees its slot without counting.
        b.cancel(p2);
        let p3 = b.try_acquire(t1).unwrap();
        assert_eq!(b.try_acquire(t1), None);
        // One success is not enough (threshold 2); it frees a slot.
        assert_eq!(b.record(p1, true, t1), None);
        assert_eq!(b.mode(), BreakerMode::HalfOpen);
        let p4 = b.try_acquire(t1).unwrap();
        assert_eq!(b.record(p3, true, t1), Some(BreakerTransition::Closed));
        assert_eq!(b.mode(), BreakerMode::Closed);
        // The last trial finishes after closing: its outcome belongs to an old generation.
        assert_eq!(b.record(p4, false, t1), None);
        assert!(b.try_acquire(t1).is_some());
    }

    #[test]
    fn a_success_closes_with_the_defaults() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerConfig::default());
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        assert_eq!(
            succeed(&mut b, t0 + 10 * S),
            Some(BreakerTransition::Closed)
        );
        assert!(b.allows(t0 + 10 * S));
    }

    #[test]
    fn failed_trial_reopens_for_twice_as_long_up_to_the_cap_and_close_resets() {
        let t0 = Instant::now();
        let cfg = BreakerConfig {
            max_open_for: 35 * S,
            ..Default::default()
        };
        let mut b = Breaker::new(cfg);
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        let mut now = t0 + 10 * S;
        for expected in [20, 35, 35] {
            assert_eq!(
                fail(&mut b, now),
                Some(BreakerTransition::Opened {
                    open_for: expected * S
                })
            );
            assert!(!b.allows(now + expected * S - Duration::from_nanos(1)));
            now += expected * S;
        }
        assert_eq!(succeed(&mut b, now), Some(BreakerTransition::Closed));
        for _ in 0..4 {
            fail(&mut b, now);
        }
        assert_eq!(
            fail(&mut b, now),
            Some(BreakerTransition::Opened { open_for: 10 * S })
        );
    }

    #[test]
    fn stale_outcomes_are_ignored() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerConfig::default());
        let slow = b.try_acquire(t0).unwrap();
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        // The slow request admitted while closed fails after the breaker opened: ignored.
        assert_eq!(b.record(slow, false, t0 + S), None);
        assert_eq!(b.open_until(), Some(t0 + 10 * S));
        // A stale success does not close it either.
        assert_eq!(b.record(slow, true, t0 + S), None);
        assert_eq!(b.mode(), BreakerMode::Open);
    }

    #[test]
    fn failure_ratio_opens_over_the_window_only_with_enough_requests() {
        let t0 = Instant::now();
        let cfg = BreakerConfig {
            failure_threshold: 0,
            failure_ratio: Some(FailureRatio {
                ratio: 0.5,
                min_requests: 10,
                window: 10 * S,
            }),
            ..Default::default()
        };
        let mut b = Breaker::new(cfg);
        // Alternating: 50% is not above 50%.
        for _ in 0..10 {
            assert_eq!(succeed(&mut b, t0), None);
            assert_eq!(fail(&mut b, t0), None);
        }
        // Old outcomes leave the window: after 10 s only these count.
        let t1 = t0 + 11 * S;
        for _ in 0..3 {
            assert_eq!(succeed(&mut b, t1), None);
        }
        for _ in 0..5 {
            assert_eq!(fail(&mut b, t1), None);
        }
        // 9 requests, 6 failed: above 50% but fewer than 10 requests.
        assert_eq!(fail(&mut b, t1), None);
        // 10 requests, 7 failed.
        assert_eq!(
            fail(&mut b, t1),
            Some(BreakerTransition::Opened { open_for: 10 * S })
        );
    }

    #[test]
    fn window_slides_bucket_by_bucket() {
        let t0 = Instant::now();
        let mut w = Window::default();
        let win = 10 * S;
        assert_eq!(w.record(false, t0, win), (0, 1));
        assert_eq!(w.record(true, t0 + 5 * S, win), (1, 1));
        // 9.9 s later the first bucket is still in the window; at 10 s it has left.
        assert_eq!(
            w.record(true, t0 + Duration::from_millis(9_900), win),
            (2, 1)
        );
        assert_eq!(w.record(true, t0 + 10 * S, win), (3, 0));
        assert_eq!(w.record(true, t0 + 100 * S, win), (1, 0));
    }

    #[test]
    fn config_edit_keeps_an_open_breaker_open() {
        let t0 = Instant::now();
        let mut b = Breaker::new(BreakerConfig::default());
        for _ in 0..5 {
            fail(&mut b, t0);
        }
        b.set_config(BreakerConfig {
            failure_threshold: 2,
            ..Default::default()
        });
        assert_eq!(b.mode(), BreakerMode::Open);
        assert_eq!(b.config().failure_threshold, 2);
    }
}
