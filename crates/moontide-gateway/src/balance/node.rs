//! `NodeState`: everything the gateway knows about one node of one upstream, shared by all
//! worker threads.
//!
//! It holds the node's in-flight count, its peak-EWMA latency ([`ewma`](super::ewma)), its
//! health ([`health`](super::health)) and its circuit breaker ([`breaker`](super::breaker)).
//! The server keeps one `Arc<NodeState>` per (upstream, node key) and hands the same `Arc`
//! to the new upstream when the upstream is edited and the node stays
//! ([`Upstream::new`](super::Upstream::new) does this), so health, breaker and latency
//! survive config edits.
//!
//! Concurrency:
//! - The state machines are plain `&mut` types kept under one `parking_lot::Mutex` per
//!   node, taken once per finished request (to record its outcome) and by the health
//!   checker; it is held for the few comparisons of a record, never across I/O.
//! - What balancers read on every pick — in-flight count, health, breaker mode and open
//!   deadline, latency estimate — is mirrored into atomics after each change, so
//!   [`eligible`](NodeState::eligible), [`cost`](NodeState::cost) and a closed breaker's
//!   admission take no lock. Only a half-open breaker is asked under the lock. A mirror
//!   can be a moment behind; the worst case is one request admitted as the breaker opens,
//!   whose outcome the breaker then ignores (its admission is of an older generation).
//! - Times are `Instant`s passed in by the caller; the atomics hold them as signed
//!   nanoseconds from an epoch taken when the state was created.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::breaker::{Admission, Breaker, BreakerConfig, BreakerMode, BreakerTransition};
use super::ewma::{self, PeakEwma};
use super::health::{Health, HealthConfig, HealthTransition};

/// Per-node settings: health, breaker, latency time constant.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Health thresholds.
    pub health: HealthConfig,
    /// Circuit-breaker settings.
    pub breaker: BreakerConfig,
    /// Time constant of the latency estimate (default [`ewma::DEFAULT_TAU`], 10 s).
    pub ewma_tau: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            health: HealthConfig::default(),
            breaker: BreakerConfig::default(),
            ewma_tau: ewma::DEFAULT_TAU,
        }
    }
}

/// State changes caused by one recorded outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transitions {
    /// Health change (passive failures, or a cooldown re-admission that was due).
    pub health: Option<HealthTransition>,
    /// Breaker change.
    pub breaker: Option<BreakerTransition>,
}

struct Inner {
    health: Health,
    breaker: Breaker,
    ewma: PeakEwma,
    tau: Duration,
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// One node's shared state (see the module doc).
pub struct NodeState {
    epoch: Instant,
    in_flight: AtomicU32,
    healthy: AtomicBool,
    readmit_at: AtomicI64,
    breaker_mode: AtomicU8,
    open_until: AtomicI64,
    generation: AtomicU64,
    ewma_ns: AtomicU64,
    ewma_at: AtomicI64,
    tau_ns: AtomicU64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeState")
            .field("in_flight", &self.in_flight())
            .field("healthy", &self.healthy.load(Ordering::Relaxed))
            .field("breaker", &self.breaker_mode())
            .finish_non_exhaustive()
    }
}

impl Default for NodeState {
    fn default() -> Self {
        Self::new(NodeConfig::default())
    }
}

impl NodeState {
    /// A healthy node with a closed breaker and no latency measured.
    pub fn new(cfg: NodeConfig) -> Self {
        let inner = Inner {
            health: Health::new(cfg.health),
            breaker: Breaker::new(cfg.breaker),
            ewma: PeakEwma::new(),
            tau: cfg.ewma_tau,
        };
        let state = Self {
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            readmit_at: AtomicI64::new(i64::MAX),
            breaker_mode: AtomicU8::new(CLOSED),
            open_until: AtomicI64::new(i64::MIN),
            generation: AtomicU64::new(0),
            ewma_ns: AtomicU64::new(f64::NAN.to_bits()),
            ewma_at: AtomicI64::new(0),
            tau_ns: AtomicU64::new(0),
            inner: Mutex::new(inner),
        };
        state.publish(&state.inner.lock());
        state
    }

    /// Applies edited settings, keeping health, breaker and latency state.
    pub fn set_config(&self, cfg: NodeConfig) {
        let mut inner = self.inner.lock();
        inner.health.set_config(cfg.health);
        inner.breaker.set_config(cfg.breaker);
        inner.tau = cfg.ewma_tau;
        self.publish(&inner);
    }

    /// The settings in force.
    pub fn config(&self) -> NodeConfig {
        let inner = self.inner.lock();
        NodeConfig {
            health: inner.health.config().clone(),
            breaker: inner.breaker.config().clone(),
            ewma_tau: inner.tau,
        }
    }

    /// Requests started on this node and not yet finished or dropped.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether the node is healthy at `now` (lock-free).
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.healthy.load(Ordering::Acquire)
            || self.ticks(now) >= self.readmit_at.load(Ordering::Acquire)
    }

    /// Whether the breaker would admit a request at `now`: closed, open with its period
    /// over, or half-open with a trial slot free. Lock-free unless half-open.
    pub fn breaker_allows(&self, now: Instant) -> bool {
        match self.breaker_mode.load(Ordering::Acquire) {
            CLOSED => true,
            OPEN => self.ticks(now) >= self.open_until.load(Ordering::Acquire),
            _ => self.inner.lock().breaker.allows(now),
        }
    }

    /// Healthy and the breaker admits a request now: what balancers pick among.
    pub fn eligible(&self, now: Instant) -> bool {
        self.is_healthy(now) && self.breaker_allows(now)
    }

    /// The breaker's stored mode (an open breaker whose period is over reads `Open` until
    /// the next [`try_start`](Self::try_start)).
    pub fn breaker_mode(&self) -> BreakerMode {
        match self.breaker_mode.load(Ordering::Acquire) {
            CLOSED => BreakerMode::Closed,
            OPEN => BreakerMode::Open,
            _ => BreakerMode::HalfOpen,
        }
    }

    /// The latency estimate at `now` (decayed by idle time), `None` if never measured.
    pub fn latency(&self, now: Instant) -> Option<Duration> {
        self.estimate_ns(now)
            .map(|ns| Duration::from_nanos(ns as u64))
    }

    /// The peak-EWMA balancing cost at `now` for a node of this `weight` (see
    /// [`ewma::cost`]).
    pub fn cost(&self, now: Instant, weight: u32) -> f64 {
        ewma::cost(self.estimate_ns(now), self.in_flight(), weight)
    }

    fn estimate_ns(&self, now: Instant) -> Option<f64> {
        let ns = f64::from_bits(self.ewma_ns.load(Ordering::Acquire));
        if ns.is_nan() {
            return None;
        }
        let elapsed = self
            .ticks(now)
            .saturating_sub(self.ewma_at.load(Ordering::Acquire))
            .max(0);
        let tau = Duration::from_nanos(self.tau_ns.load(Ordering::Relaxed));
        Some(ns * ewma::decay_factor(Duration::from_nanos(elapsed as u64), tau))
    }

    /// Starts a request at `now` if the breaker admits it (a half-open breaker gives out
    /// its trial slots here). The returned guard counts the request in flight until it is
    /// finished or dropped. Does not look at health: that is the balancer's filter.
    pub fn try_start(self: &Arc<Self>, now: Instant) -> Option<InFlight> {
        let admission = if self.breaker_mode.load(Ordering::Acquire) == CLOSED {
            Breaker::closed_admission(self.generation.load(Ordering::Acquire))
        } else {
            let mut inner = self.inner.lock();
            let admission = inner.breaker.try_acquire(now);
            self.publish(&inner);
            admission?
        };
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Some(InFlight {
            node: Arc::clone(self),
            started: now,
            admission,
            finished: false,
        })
    }

    /// Records an active health-check result at `now`.
    pub fn record_active(&self, ok: bool, now: Instant) -> Option<HealthTransition> {
        let mut inner = self.inner.lock();
        let t = inner.health.record_active(ok, now);
        self.publish(&inner);
        t
    }

    /// Records a live-traffic outcome for health only, for a failure seen outside an
    /// [`InFlight`] (finishing an `InFlight` records it already).
    pub fn record_passive(&self, ok: bool, now: Instant) -> Option<HealthTransition> {
        let mut inner = self.inner.lock();
        let t = inner.health.record_passive(ok, now);
        self.publish(&inner);
        t
    }

    /// Applies a cooldown re-admission due at `now` and reports it (the node already
    /// reads healthy; this is for logs and metrics).
    pub fn poll_health(&self, now: Instant) -> Option<HealthTransition> {
        let mut inner = self.inner.lock();
        let t = inner.health.poll(now);
        self.publish(&inner);
        t
    }

    fn finish(
        &self,
        admission: Admission,
        ok: bool,
        latency: Duration,
        now: Instant,
    ) -> Transitions {
        let mut inner = self.inner.lock();
        let tau = inner.tau;
        inner.ewma.observe(latency, ok, now, tau);
        let health = inner.health.record_passive(ok, now);
        let breaker = inner.breaker.record(admission, ok, now);
        self.publish(&inner);
        Transitions { health, breaker }
    }

    fn cancel(&self, admission: Admission) {
        if admission.is_probe() {
            let mut inner = self.inner.lock();
            inner.breaker.cancel(admission);
            self.publish(&inner);
        }
    }

    /// Copies what the lock-free readers need out of the locked state.
    fn publish(&self, inner: &Inner) {
        let healthy = inner.health.marked_healthy();
        let readmit = inner
            .health
            .readmit_at()
            .map_or(i64::MAX, |t| self.ticks(t));
        self.readmit_at.store(readmit, Ordering::Release);
        self.healthy.store(healthy, Ordering::Release);
        let until = inner
            .breaker
            .open_until()
            .map_or(i64::MIN, |t| self.ticks(t));
        self.open_until.store(until, Ordering::Release);
        self.generation
            .store(inner.breaker.generation(), Ordering::Release);
        let mode = match inner.breaker.mode() {
            BreakerMode::Closed => CLOSED,
            BreakerMode::Open => OPEN,
            BreakerMode::HalfOpen => HALF_OPEN,
        };
        self.breaker_mode.store(mode, Ordering::Release);
        let (ns, at) = match inner.ewma.last() {
            Some((ns, at)) => (ns, self.ticks(at)),
            None => (f64::NAN, 0),
        };
        self.ewma_at.store(at, Ordering::Release);
        self.ewma_ns.store(ns.to_bits(), Ordering::Release);
        self.tau_ns.store(
            u64::try_from(inner.tau.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// `t` as signed nanoseconds from this state's epoch (saturating).
    fn ticks(&self, t: Instant) -> i64 {
        match t.checked_duration_since(self.epoch) {
            Some(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            None => i64::try_from((self.epoch - t).as_nanos()).map_or(i64::MIN, |n| -n),
        }
    }
}

/// A request in flight on a node: counted in the node's in-flight load until it is
/// [`finish`](InFlight::finish)ed (outcome and latency recorded) or dropped (cancelled:
/// nothing recorded, a half-open trial slot freed).
#[derive(Debug)]
#[must_use = "dropping the guard ends the request without recording an outcome"]
pub struct InFlight {
    node: Arc<NodeState>,
    started: Instant,
    admission: Admission,
    finished: bool,
}

impl InFlight {
    /// The node the request runs on.
    pub fn node(&self) -> &Arc<NodeState> {
        &self.node
    }

    /// When the request was started (the `now` given to `try_start`).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Whether this request is a half-open breaker's trial.
    pub fn is_probe(&self) -> bool {
        self.admission.is_probe()
    }

    /// Ends the request at `now` with its outcome: records its latency (`now − started`),
    /// a passive health observation and a breaker outcome; returns the transitions caused.
    pub fn finish(mut self, ok: bool, now: Instant) -> Transitions {
        self.finished = true;
        let latency = now.saturating_duration_since(self.started);
        self.node.finish(self.admission, ok, latency, now)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished {
            self.node.cancel(self.admission);
        }
        self.node.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::health::HealthCause;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn node() -> Arc<NodeState> {
        Arc::new(NodeState::default())
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<NodeState>();
        check::<InFlight>();
    }

    #[test]
    fn in_flight_guard_counts_and_releases() {
        let n = node();
        let t = Instant::now();
        let a = n.try_start(t).unwrap();
        let b = n.try_start(t).unwrap();
        assert_eq!(n.in_flight(), 2);
        drop(a);
        assert_eq!(n.in_flight(), 1);
        assert_eq!(b.finish(true, t + 5 * MS), Transitions::default());
        assert_eq!(n.in_flight(), 0);
        assert_eq!(n.latency(t + 5 * MS), Some(5 * MS));
    }

    #[test]
    fn cancelled_requests_record_nothing() {
        let n = node();
        let t = Instant::now();
        for _ in 0..10 {
            drop(n.try_start(t).unwrap());
        }
        assert_eq!(n.latency(t), None);
        assert!(n.eligible(t));
    }

    #[test]
    fn failures_trip_passive_health_and_breaker_together() {
        let n = node();
        let t0 = Instant::now();
        for _ in 0..4 {
            assert_eq!(
                n.try_start(t0).unwrap().finish(false, t0),
                Transitions::default()
            );
        }
        let t = n.try_start(t0).unwrap().finish(false, t0);
        assert_eq!(
            t.health,
            Some(HealthTransition {
                healthy: false,
                cause: HealthCause::Passive
            })
        );
        assert_eq!(
            t.breaker,
            Some(BreakerTransition::Opened { open_for: 10 * S })
        );
        assert!(!n.is_healthy(t0));
        assert!(!n.breaker_allows(t0));
        assert!(!n.eligible(t0 + 9 * S));
        assert!(n.try_start(t0 + 9 * S).is_none());
        assert_eq!(n.breaker_mode(), BreakerMode::Open);
        // Both come back at 10 s: cooldown re-admission, breaker trial.
        let t1 = t0 + 10 * S;
        assert!(n.eligible(t1));
        let probe = n.try_start(t1).unwrap();
        assert!(probe.is_probe());
        assert_eq!(n.breaker_mode(), BreakerMode::HalfOpen);
        assert!(!n.eligible(t1), "the only trial slot is taken");
        assert!(n.try_start(t1).is_none());
        let t = probe.finish(true, t1);
        assert_eq!(t.breaker, Some(BreakerTransition::Closed));
        assert_eq!(
            t.health,
            Some(HealthTransition {
                healthy: true,
                cause: HealthCause::Cooldown
            })
        );
        assert!(n.eligible(t1));
    }

    #[test]
    fn dropping_a_trial_frees_its_slot() {
        let n = node();
        let t0 = Instant::now();
        for _ in 0..5 {
            let _ = n.try_start(t0).unwrap().finish(false, t0);
        }
        let t1 = t0 + 10 * S;
        let probe = n.try_start(t1).unwrap();
        assert!(!n.breaker_allows(t1));
        drop(probe);
        assert!(n.breaker_allows(t1));
        assert_eq!(n.breaker_mode(), BreakerMode::HalfOpen);
    }

    #[test]
    fn active_checks_drive_health() {
        let cfg = NodeConfig {
            health: HealthConfig {
                active_checks: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let n = NodeState::new(cfg);
        let t = Instant::now();
        n.record_active(false, t);
        n.record_active(false, t);
        assert_eq!(n.record_active(false, t).map(|h| h.healthy), Some(false));
        assert!(!n.eligible(t + 3600 * S));
        assert!(n.breaker_allows(t), "health and breaker are separate");
        n.record_active(true, t);
        assert_eq!(n.record_active(true, t).map(|h| h.healthy), Some(true));
        assert!(n.eligible(t));
    }

    #[test]
    fn cooldown_readmission_reads_healthy_and_poll_reports_it() {
        let n = node();
        let t0 = Instant::now();
        for _ in 0..5 {
            n.record_passive(false, t0);
        }
        assert!(!n.is_healthy(t0 + 9 * S));
        assert!(n.is_healthy(t0 + 10 * S));
        assert_eq!(
            n.poll_health(t0 + 10 * S).map(|h| h.cause),
            Some(HealthCause::Cooldown)
        );
        assert_eq!(n.poll_health(t0 + 10 * S), None);
    }

    #[test]
    fn cost_follows_latency_and_load() {
        let n = node();
        let t = Instant::now();
        assert_eq!(n.cost(t, 1), 0.0, "never measured and idle");
        let first = n.try_start(t).unwrap();
        assert!(n.cost(t, 1) >= ewma::UNMEASURED_PENALTY_NS);
        let _ = first.finish(true, t + 10 * MS);
        let c0 = n.cost(t + 10 * MS, 1);
        assert_eq!(c0, 10e6);
        let _busy = n.try_start(t + 10 * MS).unwrap();
        assert_eq!(n.cost(t + 10 * MS, 1), 20e6);
        assert_eq!(n.cost(t + 10 * MS, 2), 10e6);
        // Idle time decays the estimate toward zero (τ = 10 s).
        let later = t + 10 * MS + 10 * S;
        let expected = 10e6 * (-1f64).exp();
        assert!((n.latency(later).unwrap().as_nanos() as f64 - expected).abs() < 2.0);
    }

    #[test]
    fn config_edit_keeps_state() {
        let n = node();
        let t0 = Instant::now();
        for _ in 0..5 {
            let _ = n.try_start(t0).unwrap().finish(false, t0);
        }
        let mut cfg = NodeConfig::default();
        cfg.breaker.failure_threshold = 2;
        cfg.ewma_tau = 2 * S;
        n.set_config(cfg.clone());
        assert_eq!(n.config(), cfg);
        assert_eq!(n.breaker_mode(), BreakerMode::Open);
        assert!(!n.is_healthy(t0));
    }

    #[test]
    fn times_before_the_epoch_work() {
        // Instants taken before the state was created compare correctly.
        let t0 = Instant::now();
        let n = node();
        for _ in 0..5 {
            let _ = n.try_start(t0).unwrap().finish(false, t0);
        }
        assert!(!n.breaker_allows(t0 + 9 * S));
        assert!(n.breaker_allows(t0 + 10 * S));
    }

    #[test]
    fn concurrent_starts_and_finishes_balance_out() {
        let n = node();
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..2000u32 {
                        let g = n.try_start(t).unwrap();
                        if i % 2 == 0 {
                            let _ = g.finish(true, t + MS);
                        }
                    }
                });
            }
        });
        assert_eq!(n.in_flight(), 0);
        assert!(n.eligible(t));
    }
}
