//! Peak-EWMA latency and power-of-two-choices selection (finagle's `PeakEwma`, linkerd's
//! and tower's `p2c` balancer).
//!
//! **Estimate.** Each node keeps an exponentially weighted moving average of its response
//! latency, updated on every completed request. The weight of an observation depends on
//! the time since the previous one: with `Δ` elapsed, `w = e^(−Δ/τ)` and
//! `estimate = estimate·w + rtt·(1 − w)`, so the estimate forgets with time constant `τ`
//! whatever the request rate. It is *peak*-sensitive: a latency above the estimate
//! replaces it at once, so a node that slows down is avoided on its first slow response
//! and is trusted again only gradually.
//!
//! **Decay while idle.** Read for balancing, the estimate is decayed toward zero by the
//! time since its last observation (`estimate·e^(−Δ/τ)`, a pure read). A node that was slow
//! and therefore gets no traffic looks cheaper as time passes until it is picked again and
//! re-measured; finagle and tower do the same (they fold the decay into the stored value on
//! each read; here the read does not write, so reading often does not change the
//! estimate).
//!
//! **Failures never lower the estimate**: a fast error (connection refused, an instant 503)
//! would otherwise make a broken node look like the best one and draw all traffic to it.
//! A failure above the estimate still raises it.
//!
//! **Cost** `= estimate × (in_flight + 1) / weight`. A node never measured costs 0 while
//! idle, so a new node gets a request at once, and a huge penalty while that first request
//! is in flight, so it is not flooded before its first answer (finagle's rule; tower uses a
//! fixed default RTT instead, which has to guess the scale of the upstream's latency).
//! The weight divides the cost: a node of weight 2 is taken to carry twice the load at the
//! same cost (linkerd ignores weights; Moontide's upstreams have them).
//!
//! **Selection.** Power of two choices: two distinct eligible nodes drawn uniformly at
//! random, the cheaper one wins (the first drawn on a tie). This needs no shared ordering,
//! avoids the herd effect of always picking the global minimum, and is within a constant
//! of the best choice. The draw is unbiased (ranks among the eligible nodes, Lemire's
//! multiply-shift) and the randomness comes from a caller-supplied [`RandomSource`].
//!
//! Default `τ` = 10 s ([`DEFAULT_TAU`]), linkerd's default decay.

use std::time::{Duration, Instant};

use super::{NodeSet, RandomSource};

/// Default time constant of the estimate.
pub const DEFAULT_TAU: Duration = Duration::from_secs(10);

/// Cost of a node never measured that already has a request in flight (≈ 11.6 days in
/// nanoseconds): it loses to any measured node.
pub const UNMEASURED_PENALTY_NS: f64 = 1e15;

/// A peak-sensitive EWMA of latency. Plain state: [`NodeState`](super::NodeState) keeps it
/// under its lock and mirrors it into atomics for lock-free reads.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeakEwma {
    /// Estimate in nanoseconds and the time of the last observation; `None` until the
    /// first one.
    last: Option<(f64, Instant)>,
}

impl PeakEwma {
    /// An estimate with no observation yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a completed request's latency at `now`. A failure (`ok == false`) only
    /// counts when it raises the estimate.
    pub fn observe(&mut self, rtt: Duration, ok: bool, now: Instant, tau: Duration) {
        let rtt = rtt.as_nanos() as f64;
        let next = match self.last {
            None => rtt,
            Some((estimate, _)) if rtt >= estimate => rtt,
            Some(_) if !ok => return,
            Some((estimate, at)) => {
                let w = decay_factor(now.saturating_duration_since(at), tau);
                estimate * w + rtt * (1.0 - w)
            }
        };
        self.last = Some((next, now));
    }

    /// The stored estimate (ns) and when it was last updated, or `None` if never measured.
    pub fn last(&self) -> Option<(f64, Instant)> {
        self.last
    }

    /// The estimate as read for balancing at `now`: decayed toward zero by the time since
    /// the last observation. `None` if never measured.
    pub fn estimate(&self, now: Instant, tau: Duration) -> Option<Duration> {
        let (estimate, at) = self.last?;
        let ns = estimate * decay_factor(now.saturating_duration_since(at), tau);
        Some(Duration::from_nanos(ns as u64))
    }
}

/// `e^(−elapsed/τ)`; 0 when `τ` is zero (no memory).
pub fn decay_factor(elapsed: Duration, tau: Duration) -> f64 {
    if tau.is_zero() {
        return 0.0;
    }
    (-(elapsed.as_nanos() as f64) / tau.as_nanos() as f64).exp()
}

/// The balancing cost of a node: `estimate_ns × (in_flight + 1) / weight`, with finagle's
/// rule for a node never measured (0 while idle, [`UNMEASURED_PENALTY_NS`] while busy).
pub fn cost(estimate_ns: Option<f64>, in_flight: u32, weight: u32) -> f64 {
    let weight = f64::from(weight.max(1));
    match estimate_ns {
        Some(ns) => ns * (f64::from(in_flight) + 1.0) / weight,
        None if in_flight == 0 => 0.0,
        None => (UNMEASURED_PENALTY_NS + f64::from(in_flight)) / weight,
    }
}

/// A uniform draw in `0..n` (`n > 0`), Lemire's multiply-shift.
pub fn uniform(rng: &mut impl RandomSource, n: usize) -> usize {
    ((u128::from(rng.next_u64()) * n as u128) >> 64) as usize
}

/// Power of two choices among nodes `0..n`: two distinct nodes for which `eligible` holds,
/// drawn at random, the one with the lower `cost` wins. `eligible` is asked once per node;
/// `cost` only for the two drawn. `None` when no node is eligible.
pub fn pick_p2c(
    n: usize,
    mut eligible: impl FnMut(usize) -> bool,
    mut cost: impl FnMut(usize) -> f64,
    rng: &mut impl RandomSource,
) -> Option<usize> {
    let mut set = NodeSet::new();
    let mut count = 0;
    for i in 0..n {
        if eligible(i) {
            set.insert(i);
            count += 1;
        }
    }
    match count {
        0 => return None,
        1 => return (0..n).find(|&i| set.contains(i)),
        _ => {}
    }
    let a = uniform(rng, count);
    let mut b = uniform(rng, count - 1);
    if b >= a {
        b += 1;
    }
    let mut eligible_nodes = (0..n).filter(|&i| set.contains(i));
    let (lo, hi) = (a.min(b), a.max(b));
    let at_lo = eligible_nodes.nth(lo);
    let at_hi = eligible_nodes.nth(hi - lo - 1);
    let (first, second) = if a < b {
        (at_lo, at_hi)
    } else {
        (at_hi, at_lo)
    };
    let (a, b) = (first?, second?);
    if cost(b) < cost(a) { Some(b) } else { Some(a) }
}

#[cfg(test)]
mod tests {
    use super::super::DefaultRng;
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn ms(d: Option<Duration>) -> f64 {
        d.unwrap().as_secs_f64() * 1000.0
    }

    #[test]
    fn first_observation_sets_the_estimate() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new();
        assert_eq!(e.estimate(t0, DEFAULT_TAU), None);
        e.observe(20 * MS, true, t0, DEFAULT_TAU);
        assert_eq!(e.estimate(t0, DEFAULT_TAU), Some(20 * MS));
    }

    #[test]
    fn a_peak_replaces_the_average_at_once() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new();
        e.observe(10 * MS, true, t0, DEFAULT_TAU);
        e.observe(500 * MS, true, t0 + MS, DEFAULT_TAU);
        assert_eq!(e.estimate(t0 + MS, DEFAULT_TAU), Some(500 * MS));
    }

    #[test]
    fn lower_latencies_pull_it_down_with_time_constant_tau() {
        let t0 = Instant::now();
        let tau = Duration::from_secs(10);
        let mut e = PeakEwma::new();
        e.observe(100 * MS, true, t0, tau);
        // One observation of 0 ms after exactly τ: weight e^-1 on the old value.
        e.observe(Duration::ZERO, true, t0 + tau, tau);
        let v = ms(e.estimate(t0 + tau, tau));
        assert!((v - 100.0 / std::f64::consts::E).abs() < 0.01, "{v}");
        // Many small steps compose to the same decay as one big one.
        let mut f = PeakEwma::new();
        f.observe(100 * MS, true, t0, tau);
        for i in 1..=100 {
            f.observe(Duration::ZERO, true, t0 + tau * i / 100, tau);
        }
        assert!((ms(f.estimate(t0 + tau, tau)) - v).abs() < 0.01);
    }

    #[test]
    fn steady_latency_converges() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new();
        e.observe(200 * MS, true, t0, DEFAULT_TAU);
        for i in 1..=600 {
            e.observe(
                10 * MS,
                true,
                t0 + Duration::from_millis(100 * i),
                DEFAULT_TAU,
            );
        }
        // 60 s = 6τ after the peak: 10 + 190·e⁻⁶ ≈ 10.47 ms.
        let v = ms(e.estimate(t0 + Duration::from_secs(60), DEFAULT_TAU));
        assert!((v - (10.0 + 190.0 * (-6f64).exp())).abs() < 0.01, "{v}");
    }

    #[test]
    fn idle_estimate_decays_toward_zero_on_read_without_changing_state() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new();
        e.observe(100 * MS, true, t0, DEFAULT_TAU);
        let later = t0 + 2 * DEFAULT_TAU;
        let v = ms(e.estimate(later, DEFAULT_TAU));
        assert!((v - 100.0 * (-2f64).exp()).abs() < 0.01, "{v}");
        assert_eq!(e.last().unwrap().0, 100e6);
    }

    #[test]
    fn failures_never_lower_the_estimate() {
        let t0 = Instant::now();
        let mut e = PeakEwma::new();
        e.observe(100 * MS, true, t0, DEFAULT_TAU);
        e.observe(MS, false, t0 + DEFAULT_TAU, DEFAULT_TAU);
        assert_eq!(e.last().unwrap(), (100e6, t0));
        e.observe(300 * MS, false, t0 + DEFAULT_TAU, DEFAULT_TAU);
        assert_eq!(e.last().unwrap().0, 300e6);
    }

    #[test]
    fn cost_rules() {
        assert_eq!(cost(Some(10.0), 0, 1), 10.0);
        assert_eq!(cost(Some(10.0), 3, 1), 40.0);
        assert_eq!(cost(Some(10.0), 3, 2), 20.0);
        assert_eq!(cost(None, 0, 1), 0.0);
        assert!(cost(None, 1, 1) > cost(Some(60e9), 100, 1));
    }

    /// Replays a fixed list of numbers.
    struct Script(Vec<u64>);
    impl RandomSource for Script {
        fn next_u64(&mut self) -> u64 {
            self.0.remove(0)
        }
    }

    #[test]
    fn p2c_takes_the_cheaper_of_the_two_drawn() {
        let costs = [5.0, 1.0, 3.0, 0.5];
        // First draw 0/2⁶⁴ of 4 → rank 0; second ½ of the other 3 → 1, shifted past 0 → 2.
        let half = 1u64 << 63;
        let mut rng = Script(vec![0, half]);
        assert_eq!(pick_p2c(4, |_| true, |i| costs[i], &mut rng), Some(2));
        let mut rng = Script(vec![u64::MAX, 0]); // ranks 3 and 0
        assert_eq!(pick_p2c(4, |_| true, |i| costs[i], &mut rng), Some(3));
    }

    #[test]
    fn p2c_draws_two_distinct_eligible_nodes() {
        let mut rng = DefaultRng::seeded(7);
        for _ in 0..1000 {
            let mut asked = Vec::new();
            let picked = pick_p2c(
                5,
                |i| i % 2 == 1,
                |i| {
                    asked.push(i);
                    1.0
                },
                &mut rng,
            )
            .unwrap();
            assert_eq!(picked % 2, 1);
            assert_eq!(asked.len(), 2);
            assert_ne!(asked[0], asked[1]);
            assert!(asked.iter().all(|i| i % 2 == 1));
        }
    }

    #[test]
    fn p2c_edge_cases() {
        let mut rng = DefaultRng::seeded(1);
        assert_eq!(pick_p2c(3, |_| false, |_| 0.0, &mut rng), None);
        assert_eq!(pick_p2c(0, |_| true, |_| 0.0, &mut rng), None);
        assert_eq!(pick_p2c(3, |i| i == 2, |_| 0.0, &mut rng), Some(2));
    }

    #[test]
    fn p2c_sends_most_traffic_to_the_fast_node_but_not_all() {
        // Costs fixed: node 0 is ten times cheaper. With 3 nodes node 0 is in 2 of 3 pairs.
        let mut rng = DefaultRng::seeded(42);
        let costs = [1.0, 10.0, 10.0];
        let mut counts = [0u32; 3];
        for _ in 0..30_000 {
            counts[pick_p2c(3, |_| true, |i| costs[i], &mut rng).unwrap()] += 1;
        }
        assert!((19_000..21_000).contains(&counts[0]), "{counts:?}");
        assert!(counts[1] > 4000 && counts[2] > 4000, "{counts:?}");
    }

    #[test]
    fn uniform_is_in_range_and_covers_it() {
        let mut rng = DefaultRng::seeded(3);
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            seen[uniform(&mut rng, 7)] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }
}
