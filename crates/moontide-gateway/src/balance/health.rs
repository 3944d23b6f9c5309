//! Node health from active checks and passive observation of live traffic.
//!
//! - A node **starts healthy**: it is trusted until proven otherwise, so a new or edited
//!   upstream serves at once instead of waiting for a round of checks, and an upstream
//!   with no active check configured works at all.
//! - **Active** checks (the server's background prober): `unhealthy_threshold` consecutive
//!   failures (default 3) make a healthy node unhealthy; `healthy_threshold` consecutive
//!   successes (default 2) make an unhealthy node healthy again.
//! - **Passive** observation (outcomes of live requests): `passive_unhealthy_threshold`
//!   consecutive failures (default 5; 0 turns passive ejection off) make a healthy node
//!   unhealthy. Passive successes never re-admit a node: an unhealthy node gets no traffic,
//!   so waiting for live successes would keep it out forever.
//! - **Re-admission** is by active successes when active checks are configured
//!   (`active_checks = true`). Without active checks an unhealthy node is re-admitted
//!   `passive_recovery` (default 10 s) after it was marked unhealthy, and live traffic
//!   judges it again from a clean count. (Kong's passive-only health keeps such a node out
//!   until an operator re-enables it.) The same holds for a node marked unhealthy by active
//!   checks that were then removed from the config, so an edit cannot strand a node.
//!
//! Re-admission after the cooldown is a matter of time, not of an event: [`Health::is_healthy`]
//! answers it from `now` without writing, and the stored state catches up (and reports the
//! transition) on the next `record_*` or [`Health::poll`]. Each call reports at most one
//! transition, the last one it caused.
//!
//! This is plain `&mut` state; [`NodeState`](super::NodeState) keeps it under the node's
//! lock and mirrors what balancers read into atomics.

use std::time::{Duration, Instant};

/// Health settings. See the module doc for the meaning and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive active successes that make an unhealthy node healthy (0 counts as 1).
    pub healthy_threshold: u32,
    /// Consecutive active failures that make a healthy node unhealthy (0 counts as 1).
    pub unhealthy_threshold: u32,
    /// Consecutive live-traffic failures that make a healthy node unhealthy; 0 disables.
    pub passive_unhealthy_threshold: u32,
    /// Without active checks, how long an unhealthy node stays out.
    pub passive_recovery: Duration,
    /// Whether the server runs active checks for this upstream (then only they re-admit).
    pub active_checks: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            passive_unhealthy_threshold: 5,
            passive_recovery: Duration::from_secs(10),
            active_checks: false,
        }
    }
}

/// What caused a health transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCause {
    /// Active check results.
    Active,
    /// Live-traffic failures.
    Passive,
    /// The re-admission cooldown ran out (no active checks configured).
    Cooldown,
}

/// A health state change, returned so that the server can log it and count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthTransition {
    /// The new state.
    pub healthy: bool,
    /// Why it changed.
    pub cause: HealthCause,
}

/// One node's health (plain state; see the module doc).
#[derive(Debug, Clone)]
pub struct Health {
    cfg: HealthConfig,
    healthy: bool,
    unhealthy_since: Option<Instant>,
    active_ok: u32,
    active_failed: u32,
    passive_failed: u32,
}

impl Health {
    /// A healthy node.
    pub fn new(cfg: HealthConfig) -> Self {
        Self {
            cfg,
            healthy: true,
            unhealthy_since: None,
            active_ok: 0,
            active_failed: 0,
            passive_failed: 0,
        }
    }

    /// Replaces the settings, keeping the state and the counts.
    pub fn set_config(&mut self, cfg: HealthConfig) {
        self.cfg = cfg;
    }

    /// The settings in force.
    pub fn config(&self) -> &HealthConfig {
        &self.cfg
    }

    /// The stored state, not counting a cooldown that has run out since.
    pub fn marked_healthy(&self) -> bool {
        self.healthy
    }

    /// When an unhealthy node is re-admitted by the cooldown; `None` when healthy or when
    /// only active checks can re-admit it.
    pub fn readmit_at(&self) -> Option<Instant> {
        match self.unhealthy_since {
            Some(since) if !self.healthy && !self.cfg.active_checks => {
                Some(super::instant_after(since, self.cfg.passive_recovery))
            }
            _ => None,
        }
    }

    /// Whether the node is healthy at `now` (a pure read).
    pub fn is_healthy(&self, now: Instant) -> bool {
        self.healthy || self.readmit_at().is_some_and(|at| now >= at)
    }

    /// Applies a cooldown re-admission that is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<HealthTransition> {
        if self.healthy || !self.is_healthy(now) {
            return None;
        }
        Some(self.mark(true, HealthCause::Cooldown, now))
    }

    /// Records an active check result at `now`.
    pub fn record_active(&mut self, ok: bool, now: Instant) -> Option<HealthTransition> {
        let readmitted = self.poll(now);
        let changed = if ok {
            self.active_failed = 0;
            self.active_ok += 1;
            (!self.healthy && self.active_ok >= self.cfg.healthy_threshold.max(1))
                .then(|| self.mark(true, HealthCause::Active, now))
        } else {
            self.active_ok = 0;
            self.active_failed += 1;
            (self.healthy && self.active_failed >= self.cfg.unhealthy_threshold.max(1))
                .then(|| self.mark(false, HealthCause::Active, now))
        };
        changed.or(readmitted)
    }

    /// Records the outcome of a live request at `now`.
    pub fn record_passive(&mut self, ok: bool, now: Instant) -> Option<HealthTransition> {
        let readmitted = self.poll(now);
        let changed = if ok {
            self.passive_failed = 0;
            None
        } else {
            self.passive_failed += 1;
            let threshold = self.cfg.passive_unhealthy_threshold;
            (self.healthy && threshold > 0 && self.passive_failed >= threshold)
                .then(|| self.mark(false, HealthCause::Passive, now))
        };
        changed.or(readmitted)
    }

    fn mark(&mut self, healthy: bool, cause: HealthCause, now: Instant) -> HealthTransition {
        self.healthy = healthy;
        self.unhealthy_since = (!healthy).then_some(now);
        self.active_ok = 0;
        self.active_failed = 0;
        self.passive_failed = 0;
        HealthTransition { healthy, cause }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn down(cause: HealthCause) -> Option<HealthTransition> {
        Some(HealthTransition {
            healthy: false,
            cause,
        })
    }

    fn up(cause: HealthCause) -> Option<HealthTransition> {
        Some(HealthTransition {
            healthy: true,
            cause,
        })
    }

    fn with_active() -> Health {
        Health::new(HealthConfig {
            active_checks: true,
            ..Default::default()
        })
    }

    #[test]
    fn starts_healthy() {
        let h = Health::new(HealthConfig::default());
        assert!(h.is_healthy(Instant::now()));
        assert!(h.marked_healthy());
    }

    #[test]
    fn active_failures_eject_and_active_successes_readmit() {
        let t = Instant::now();
        let mut h = with_active();
        assert_eq!(h.record_active(false, t), None);
        assert_eq!(h.record_active(false, t), None);
        assert_eq!(h.record_active(true, t), None); // breaks the run
        assert_eq!(h.record_active(false, t), None);
        assert_eq!(h.record_active(false, t), None);
        assert_eq!(h.record_active(false, t), down(HealthCause::Active));
        assert!(!h.is_healthy(t + 3600 * S)); // no cooldown with active checks
        assert_eq!(h.record_active(true, t), None);
        assert_eq!(h.record_active(false, t), None); // breaks the run of successes
        assert_eq!(h.record_active(true, t), None);
        assert_eq!(h.record_active(true, t), up(HealthCause::Active));
        assert!(h.is_healthy(t));
    }

    #[test]
    fn passive_failures_eject_and_passive_successes_do_not_readmit() {
        let t = Instant::now();
        let mut h = with_active();
        for _ in 0..4 {
            assert_eq!(h.record_passive(false, t), None);
        }
        assert_eq!(h.record_passive(true, t), None); // breaks the run
        for _ in 0..4 {
            assert_eq!(h.record_passive(false, t), None);
        }
        assert_eq!(h.record_passive(false, t), down(HealthCause::Passive));
        for _ in 0..10 {
            assert_eq!(h.record_passive(true, t), None);
        }
        assert!(!h.is_healthy(t + 60 * S));
        h.record_active(true, t);
        assert_eq!(h.record_active(true, t), up(HealthCause::Active));
    }

    #[test]
    fn without_active_checks_the_cooldown_readmits() {
        let t0 = Instant::now();
        let mut h = Health::new(HealthConfig::default());
        for _ in 0..5 {
            h.record_passive(false, t0);
        }
        assert!(!h.is_healthy(t0));
        assert_eq!(h.readmit_at(), Some(t0 + 10 * S));
        assert!(!h.is_healthy(t0 + 10 * S - Duration::from_nanos(1)));
        assert_eq!(h.poll(t0 + 9 * S), None);
        // Due: healthy on read, and the next call reports the transition once.
        let t1 = t0 + 10 * S;
        assert!(h.is_healthy(t1));
        assert!(!h.marked_healthy());
        assert_eq!(h.record_passive(false, t1), up(HealthCause::Cooldown));
        assert!(h.marked_healthy());
        assert_eq!(h.poll(t1), None);
        // It is judged again from a clean count: the failure at t1 was the first of 5.
        for _ in 0..3 {
            assert_eq!(h.record_passive(false, t1), None);
        }
        assert_eq!(h.record_passive(false, t1), down(HealthCause::Passive));
        assert_eq!(h.readmit_at(), Some(t1 + 10 * S));
    }

    #[test]
    fn removing_active_checks_cannot_strand_a_node() {
        let t0 = Instant::now();
        let mut h = with_active();
        for _ in 0..3 {
            h.record_active(false, t0);
        }
        assert!(!h.is_healthy(t0 + 60 * S));
        h.set_config(HealthConfig::default());
        assert!(h.is_healthy(t0 + 60 * S));
        assert_eq!(h.poll(t0 + 60 * S), up(HealthCause::Cooldown));
    }

    #[test]
    fn passive_ejection_can_be_turned_off() {
        let t = Instant::now();
        let mut h = Health::new(HealthConfig {
            passive_unhealthy_threshold: 0,
            ..Default::default()
        });
        for _ in 0..100 {
            assert_eq!(h.record_passive(false, t), None);
        }
        assert!(h.is_healthy(t));
    }
}
