//! Load balancing over an upstream's nodes, with per-node health and circuit-breaker
//! state. Pure logic: no sockets, no timers, no Lua; time comes in as `Instant` arguments
//! and randomness from a caller-supplied [`RandomSource`], so every test is deterministic.
//!
//! Pieces, each in its own module:
//! - [`NodeState`] (`node`): one node's shared state (in-flight count, latency, health,
//!   breaker), `Send + Sync`, one `Arc` per (upstream, node key), kept across upstream
//!   edits. [`InFlight`] is the guard of one request on a node.
//! - [`Wrr`] (`wrr`): nginx's smooth weighted round robin, per thread.
//! - [`Ketama`] (`chash`): a ketama consistent-hash ring, shared and immutable.
//! - [`least_conn`]: weighted least connections, ties by the per-thread WRR.
//! - [`ewma`]: peak-EWMA latency and power-of-two-choices.
//! - [`health`]: active + passive health; [`breaker`]: the circuit breaker.
//!
//! [`Upstream`] ties them together: an immutable snapshot of an upstream (nodes, weights,
//! algorithm, ring) built from config, reusing the previous snapshot's `NodeState`s by
//! node key, and [`Upstream::pick`], the request path's entry point. Each worker thread
//! keeps a [`Local`] per upstream (its WRR counters and RNG).
//!
//! How a pick goes:
//! 1. Candidates are the nodes not already tried by this request (`tried`, for retries)
//!    that are *eligible*: healthy and their breaker admits a request now.
//! 2. The algorithm picks one; [`NodeState::try_start`] then takes the admission (a
//!    half-open breaker's trial slot may have been taken by another thread in between: the
//!    node is then set aside for this pick and the algorithm asked again).
//! 3. **If no node of the upstream is healthy**, health is ignored and the pick is made
//!    among the untried nodes whose breaker admits a request, flagged
//!    [`Pick::degraded`]. When every node looks down, the likelier story is that the checks
//!    are wrong (a broken health endpoint, the checker cut off from the nodes) or that the
//!    outage is total, in which case trying costs little; refusing outright would turn a
//!    health-check problem into a full outage. nginx likewise tries all servers once all
//!    are marked failed, and Envoy ignores health below its panic threshold. The fallback
//!    is all-or-nothing (Envoy's panic threshold at 0%, not its default 50%): Moontide's
//!    upstreams are often two or three nodes, where a 50% threshold would send traffic to a
//!    known-dead node as soon as one of two is down — the very case health checks are for.
//!    While *some* node is healthy, health is believed: a retry whose healthy nodes are all
//!    tried gets `None` rather than an unhealthy node.
//! 4. **An open breaker is never overridden**, not even in the fallback: it is the one
//!    thing that sheds load from a failing node, it already lets trials through on its own
//!    schedule, and when every breaker is open a fast `None` (a 503 at the edge) is better
//!    than piling requests onto nodes that just failed.
//!
//! `None` means nothing can be picked: no node left untried whose breaker admits a request
//! (and, while some node is healthy, none that is healthy too).
//!
//! Consistent hashing with no key (or an empty one) falls back to the WRR, as nginx's
//! `hash` does for an empty key. Node indices in a [`Pick`] and in `tried` refer to one
//! `Upstream` snapshot: a request keeps the snapshot it started with across its retries.

pub mod breaker;
pub mod chash;
pub mod ewma;
pub mod health;
pub mod least_conn;
mod node;
pub mod wrr;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub use breaker::{BreakerConfig, BreakerMode, BreakerTransition, FailureRatio};
pub use chash::Ketama;
pub use health::{HealthCause, HealthConfig, HealthTransition};
pub use node::{InFlight, NodeConfig, NodeState, Transitions};
pub use wrr::Wrr;

/// Errors building an [`Upstream`] or a [`Ketama`] ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalanceError {
    /// An upstream needs at least one node.
    #[error("upstream has no node")]
    Empty,
    /// Weights start at 1.
    #[error("node {key}: weight must be at least 1")]
    ZeroWeight {
        /// The node's key.
        key: String,
    },
    /// Two nodes with the same key would share one state.
    #[error("node {key} is listed twice")]
    DuplicateNode {
        /// The repeated key.
        key: String,
    },
    /// The consistent-hash ring would be too large (160 points per unit of weight).
    #[error("consistent-hash ring would need {points} points, more than {max}; lower the weights")]
    RingTooLarge {
        /// Points the weights ask for.
        points: u64,
        /// The limit, [`chash::MAX_RING_POINTS`].
        max: u64,
    },
}

/// A source of random numbers for the balancers that draw (peak-EWMA's two choices).
pub trait RandomSource {
    /// The next uniformly distributed 64-bit number.
    fn next_u64(&mut self) -> u64;
}

/// The default [`RandomSource`]: a small fast PRNG (rand's `SmallRng`), one per thread.
#[derive(Debug, Clone)]
pub struct DefaultRng(rand::rngs::SmallRng);

impl DefaultRng {
    /// Seeded from the thread's OS-seeded generator.
    pub fn new() -> Self {
        use rand::SeedableRng;
        Self(rand::rngs::SmallRng::from_rng(&mut rand::rng()))
    }

    /// A fixed sequence, for tests.
    pub fn seeded(seed: u64) -> Self {
        use rand::SeedableRng;
        Self(rand::rngs::SmallRng::seed_from_u64(seed))
    }
}

impl Default for DefaultRng {
    fn default() -> Self {
        Self::new()
    }
}

impl RandomSource for DefaultRng {
    fn next_u64(&mut self) -> u64 {
        rand::RngCore::next_u64(&mut self.0)
    }
}

/// `t + d`, saturating instead of panicking when a configured duration is absurdly long
/// (the latest representable instant is taken: halving `d` until it fits).
pub(crate) fn instant_after(t: Instant, mut d: std::time::Duration) -> Instant {
    loop {
        if let Some(later) = t.checked_add(d) {
            return later;
        }
        d /= 2;
    }
}

/// A set of node indices (a request's tried nodes, a pass's refused nodes). Indices below
/// 128 live in one inline word; only larger upstreams allocate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeSet {
    low: u128,
    high: Vec<u64>,
}

impl NodeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `index`; returns whether it was new.
    pub fn insert(&mut self, index: usize) -> bool {
        let had = self.contains(index);
        if index < 128 {
            self.low |= 1 << index;
        } else {
            let (word, bit) = ((index - 128) / 64, (index - 128) % 64);
            if self.high.len() <= word {
                self.high.resize(word + 1, 0);
            }
            self.high[word] |= 1 << bit;
        }
        !had
    }

    /// Whether `index` is in the set.
    pub fn contains(&self, index: usize) -> bool {
        if index < 128 {
            self.low & (1 << index) != 0
        } else {
            let (word, bit) = ((index - 128) / 64, (index - 128) % 64);
            self.high.get(word).is_some_and(|w| w & (1 << bit) != 0)
        }
    }

    /// How many indices are in the set.
    pub fn len(&self) -> usize {
        self.low.count_ones() as usize
            + self
                .high
                .iter()
                .map(|w| w.count_ones() as usize)
                .sum::<usize>()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Empties the set, keeping its allocation.
    pub fn clear(&mut self) {
        self.low = 0;
        self.high.iter_mut().for_each(|w| *w = 0);
    }
}

/// How an upstream picks among its nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// Smooth weighted round robin ([`Wrr`]).
    #[default]
    RoundRobin,
    /// Ketama consistent hashing on a request key ([`Ketama`]).
    ConsistentHash,
    /// Weighted least connections ([`least_conn`]).
    LeastConnections,
    /// Peak-EWMA latency with power of two choices ([`ewma`]).
    Ewma,
}

/// A node as configured: its key (`host:port`) and weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// The node's identity (an address such as `10.0.0.1:8080`); state is kept per key.
    pub key: String,
    /// Relative share of traffic, at least 1.
    pub weight: u32,
}

impl NodeSpec {
    /// A node spec.
    pub fn new(key: impl Into<String>, weight: u32) -> Self {
        Self {
            key: key.into(),
            weight,
        }
    }
}

/// A node of a built [`Upstream`].
#[derive(Debug)]
pub struct UpstreamNode {
    key: String,
    weight: u32,
    state: Arc<NodeState>,
}

impl UpstreamNode {
    /// The node's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The node's weight.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The node's shared state (also for the health checker's `record_active`).
    pub fn state(&self) -> &Arc<NodeState> {
        &self.state
    }
}

/// Unique id of each built upstream, so a thread's [`Local`] notices a rebuilt one.
static GENERATION: AtomicU64 = AtomicU64::new(1);

/// An immutable snapshot of one upstream: nodes, weights, algorithm and (for consistent
/// hashing) the ring. `Send + Sync`; kept in the config snapshot and shared by all threads.
#[derive(Debug)]
pub struct Upstream {
    algorithm: Algorithm,
    nodes: Vec<UpstreamNode>,
    weights: Vec<u32>,
    ring: Option<Ketama>,
    generation: u64,
}

/// What [`Upstream::pick`] chose.
#[derive(Debug)]
pub struct Pick {
    /// Index of the node in [`Upstream::nodes`] (add it to `tried` before a retry).
    pub index: usize,
    /// The request's guard on that node: finish it with the outcome.
    pub guard: InFlight,
    /// The pick ignored health because no node was healthy (see the module doc).
    pub degraded: bool,
}

/// One worker thread's balancing state for one upstream: WRR counters and RNG. Rebuilt
/// automatically when it meets a new snapshot of the upstream.
#[derive(Debug, Clone)]
pub struct Local<R = DefaultRng> {
    generation: u64,
    wrr: Wrr,
    rng: R,
}

impl Local<DefaultRng> {
    /// Per-thread state with an OS-seeded RNG.
    pub fn new() -> Self {
        Self::with_rng(DefaultRng::new())
    }
}

impl Default for Local<DefaultRng> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R: RandomSource> Local<R> {
    /// Per-thread state drawing from `rng`.
    pub fn with_rng(rng: R) -> Self {
        Self {
            generation: 0,
            wrr: Wrr::new(&[]),
            rng,
        }
    }
}

impl Upstream {
    /// Builds an upstream from its config. A node whose key was in `previous` keeps that
    /// node's `Arc<NodeState>` (health, breaker, latency, in-flight count), with `cfg`
    /// applied to it; new nodes start fresh (healthy, breaker closed). Fails on an empty
    /// node list, a zero weight, a repeated key, or a ring too large.
    pub fn new(
        algorithm: Algorithm,
        nodes: &[NodeSpec],
        cfg: &NodeConfig,
        previous: Option<&Upstream>,
    ) -> Result<Self, BalanceError> {
        if nodes.is_empty() {
            return Err(BalanceError::Empty);
        }
        for (i, spec) in nodes.iter().enumerate() {
            if spec.weight == 0 {
                return Err(BalanceError::ZeroWeight {
                    key: spec.key.clone(),
                });
            }
            if nodes[..i].iter().any(|n| n.key == spec.key) {
                return Err(BalanceError::DuplicateNode {
                    key: spec.key.clone(),
                });
            }
        }
        let ring = match algorithm {
            Algorithm::ConsistentHash => {
                let keyed: Vec<(&str, u32)> =
                    nodes.iter().map(|n| (n.key.as_str(), n.weight)).collect();
                Some(Ketama::new(&keyed)?)
            }
            _ => None,
        };
        let nodes: Vec<UpstreamNode> = nodes
            .iter()
            .map(|spec| {
                let kept = previous.and_then(|p| p.nodes.iter().find(|n| n.key == spec.key));
                let state = match kept {
                    Some(n) => {
                        n.state.set_config(cfg.clone());
                        Arc::clone(&n.state)
                    }
                    None => Arc::new(NodeState::new(cfg.clone())),
                };
                UpstreamNode {
                    key: spec.key.clone(),
                    weight: spec.weight,
                    state,
                }
            })
            .collect();
        Ok(Self {
            algorithm,
            weights: nodes.iter().map(|n| n.weight).collect(),
            nodes,
            ring,
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The balancing algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The nodes, in config order; [`Pick::index`] indexes this.
    pub fn nodes(&self) -> &[UpstreamNode] {
        &self.nodes
    }

    /// Picks a node for a request at `now` and starts the request on it (see the module
    /// doc). `key` is the consistent-hash key (ignored by the other algorithms); `tried`
    /// holds the indices this request already tried. `None` when nothing can be picked.
    pub fn pick<R: RandomSource>(
        &self,
        local: &mut Local<R>,
        key: Option<&[u8]>,
        tried: &NodeSet,
        now: Instant,
    ) -> Option<Pick> {
        if local.generation != self.generation {
            local.wrr = Wrr::new(&self.weights);
            local.generation = self.generation;
        }
        let mut raced = NodeSet::new();
        if let Some(pick) = self.pick_pass(local, key, tried, &mut raced, now, false) {
            return Some(pick);
        }
        if self.nodes.iter().any(|n| n.state.is_healthy(now)) {
            return None;
        }
        self.pick_pass(local, key, tried, &mut raced, now, true)
    }

    fn pick_pass<R: RandomSource>(
        &self,
        local: &mut Local<R>,
        key: Option<&[u8]>,
        tried: &NodeSet,
        raced: &mut NodeSet,
        now: Instant,
        degraded: bool,
    ) -> Option<Pick> {
        loop {
            let candidate = |i: usize| {
                let state = &self.nodes[i].state;
                !tried.contains(i)
                    && !raced.contains(i)
                    && if degraded {
                        state.breaker_allows(now)
                    } else {
                        state.eligible(now)
                    }
            };
            let index = self.choose(local, key, now, candidate)?;
            match self.nodes[index].state.try_start(now) {
                Some(guard) => {
                    return Some(Pick {
                        index,
                        guard,
                        degraded,
                    });
                }
                // Another thread took the last trial slot since the check: set it aside.
                None => {
                    raced.insert(index);
                }
            }
        }
    }

    fn choose<R: RandomSource>(
        &self,
        local: &mut Local<R>,
        key: Option<&[u8]>,
        now: Instant,
        eligible: impl FnMut(usize) -> bool,
    ) -> Option<usize> {
        match (self.algorithm, key, &self.ring) {
            (Algorithm::ConsistentHash, Some(key), Some(ring)) if !key.is_empty() => {
                ring.pick(key, eligible)
            }
            (Algorithm::RoundRobin | Algorithm::ConsistentHash, ..) => local.wrr.pick(eligible),
            (Algorithm::LeastConnections, ..) => least_conn::pick(
                |i| self.nodes[i].state.in_flight(),
                &self.weights,
                eligible,
                &mut local.wrr,
            ),
            (Algorithm::Ewma, ..) => ewma::pick_p2c(
                self.nodes.len(),
                eligible,
                |i| self.nodes[i].state.cost(now, self.weights[i]),
                &mut local.rng,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    fn specs(weights: &[u32]) -> Vec<NodeSpec> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| NodeSpec::new(format!("10.0.0.{}:80", i + 1), w))
            .collect()
    }

    fn upstream(algorithm: Algorithm, weights: &[u32]) -> Upstream {
        Upstream::new(algorithm, &specs(weights), &NodeConfig::default(), None).unwrap()
    }

    fn local() -> Local {
        Local::with_rng(DefaultRng::seeded(11))
    }

    /// Trips a node's breaker (and passive health) with five failures at `now`.
    fn break_node(u: &Upstream, i: usize, now: Instant) {
        for _ in 0..5 {
            let _ = u.nodes()[i]
                .state()
                .try_start(now)
                .unwrap()
                .finish(false, now);
        }
    }

    /// Marks a node unhealthy with three failed active checks (its breaker stays closed).
    fn mark_unhealthy(u: &Upstream, i: usize, now: Instant) {
        for _ in 0..3 {
            u.nodes()[i].state().record_active(false, now);
        }
        assert!(!u.nodes()[i].state().is_healthy(now));
    }

    fn pick_index(
        u: &Upstream,
        l: &mut Local,
        key: Option<&[u8]>,
        tried: &NodeSet,
        now: Instant,
    ) -> Option<usize> {
        u.pick(l, key, tried, now).map(|p| p.index)
    }

    #[test]
    fn types_are_shareable() {
        fn check<T: Send + Sync>() {}
        check::<Upstream>();
        check::<Ketama>();
        check::<NodeSet>();
    }

    #[test]
    fn round_robin_follows_weights() {
        let u = upstream(Algorithm::RoundRobin, &[5, 1, 1]);
        let mut l = local();
        let now = Instant::now();
        let seq: Vec<usize> = (0..7)
            .map(|_| pick_index(&u, &mut l, None, &NodeSet::new(), now).unwrap())
            .collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn every_algorithm_skips_unhealthy_and_open_nodes() {
        let now = Instant::now();
        for algorithm in [
            Algorithm::RoundRobin,
            Algorithm::ConsistentHash,
            Algorithm::LeastConnections,
            Algorithm::Ewma,
        ] {
            let u = upstream(algorithm, &[1, 1, 1]);
            break_node(&u, 0, now);
            mark_unhealthy(&u, 1, now);
            let mut l = local();
            for k in 0..50 {
                let key = format!("k{k}");
                let p = u
                    .pick(&mut l, Some(key.as_bytes()), &NodeSet::new(), now)
                    .unwrap();
                assert_eq!(p.index, 2, "{algorithm:?}");
                assert!(!p.degraded);
            }
        }
    }

    #[test]
    fn retries_exclude_tried_nodes_then_give_up() {
        let now = Instant::now();
        for algorithm in [
            Algorithm::RoundRobin,
            Algorithm::ConsistentHash,
            Algorithm::LeastConnections,
            Algorithm::Ewma,
        ] {
            let u = upstream(algorithm, &[1, 2, 3]);
            let mut l = local();
            let mut tried = NodeSet::new();
            for _ in 0..3 {
                let p = u.pick(&mut l, Some(b"user-42"), &tried, now).unwrap();
                assert!(tried.insert(p.index), "{algorithm:?} picked a tried node");
            }
            assert!(u.pick(&mut l, Some(b"user-42"), &tried, now).is_none());
        }
    }

    #[test]
    fn consistent_hash_is_sticky_and_retries_walk_the_ring() {
        let u = upstream(Algorithm::ConsistentHash, &[1, 1, 1, 1]);
        let mut l = local();
        let now = Instant::now();
        let first = pick_index(&u, &mut l, Some(b"session-9"), &NodeSet::new(), now).unwrap();
        for _ in 0..10 {
            assert_eq!(
                pick_index(&u, &mut l, Some(b"session-9"), &NodeSet::new(), now),
                Some(first)
            );
        }
        let mut tried = NodeSet::new();
        tried.insert(first);
        let second = pick_index(&u, &mut l, Some(b"session-9"), &tried, now).unwrap();
        assert_ne!(second, first);
        // The retry goes where the ring sends the key when the first node is ineligible.
        let keyed: Vec<(&str, u32)> = u.nodes().iter().map(|n| (n.key(), n.weight())).collect();
        let ring = Ketama::new(&keyed).unwrap();
        assert_eq!(ring.pick(b"session-9", |i| i != first), Some(second));
    }

    #[test]
    fn consistent_hash_without_key_uses_round_robin() {
        let u = upstream(Algorithm::ConsistentHash, &[1, 1]);
        let mut l = local();
        let now = Instant::now();
        let seq: Vec<usize> = (0..4)
            .map(|_| pick_index(&u, &mut l, None, &NodeSet::new(), now).unwrap())
            .collect();
        assert_eq!(seq, [0, 1, 0, 1]);
        let seq: Vec<usize> = (0..2)
            .map(|_| pick_index(&u, &mut l, Some(b""), &NodeSet::new(), now).unwrap())
            .collect();
        assert_eq!(seq, [0, 1]);
    }

    #[test]
    fn least_connections_counts_live_guards() {
        let u = upstream(Algorithm::LeastConnections, &[1, 1, 1]);
        let mut l = local();
        let now = Instant::now();
        let a = u.pick(&mut l, None, &NodeSet::new(), now).unwrap();
        let b = u.pick(&mut l, None, &NodeSet::new(), now).unwrap();
        let c = u.pick(&mut l, None, &NodeSet::new(), now).unwrap();
        let mut seen = [a.index, b.index, c.index];
        seen.sort();
        assert_eq!(seen, [0, 1, 2]);
        let freed = b.index;
        let _ = b.guard.finish(true, now + MS);
        assert_eq!(
            pick_index(&u, &mut l, None, &NodeSet::new(), now),
            Some(freed)
        );
        drop((a, c));
    }

    #[test]
    fn ewma_prefers_the_fast_node_and_tries_new_ones() {
        let u = upstream(Algorithm::Ewma, &[1, 1]);
        let mut l = local();
        let t0 = Instant::now();
        // Node 0 answers in 100 ms, node 1 in 1 ms.
        for (i, latency) in [(0, 100 * MS), (1, MS)] {
            let _ = u.nodes()[i]
                .state()
                .try_start(t0)
                .unwrap()
                .finish(true, t0 + latency);
        }
        let now = t0 + 100 * MS;
        for _ in 0..20 {
            assert_eq!(pick_index(&u, &mut l, None, &NodeSet::new(), now), Some(1));
        }
        // A node added by an edit has no measurement: it costs nothing while idle.
        let mut more = specs(&[1, 1]);
        more.push(NodeSpec::new("10.0.0.9:80", 1));
        let u2 = Upstream::new(Algorithm::Ewma, &more, &NodeConfig::default(), Some(&u)).unwrap();
        let picks: Vec<usize> = (0..40)
            .map(|_| pick_index(&u2, &mut l, None, &NodeSet::new(), now).unwrap())
            .collect();
        assert!(picks.contains(&2), "{picks:?}");
    }

    #[test]
    fn all_unhealthy_falls_back_to_nodes_whose_breaker_admits() {
        let u = upstream(Algorithm::RoundRobin, &[1, 1, 1]);
        let now = Instant::now();
        mark_unhealthy(&u, 0, now);
        mark_unhealthy(&u, 1, now);
        mark_unhealthy(&u, 2, now);
        break_node(&u, 2, now);
        let mut l = local();
        let mut seen = NodeSet::new();
        for _ in 0..10 {
            let p = u.pick(&mut l, None, &NodeSet::new(), now).unwrap();
            assert!(p.degraded);
            assert_ne!(p.index, 2, "an open breaker is never overridden");
            seen.insert(p.index);
        }
        assert_eq!(seen.len(), 2);
        // Tried nodes stay excluded in the fallback too.
        let mut tried = NodeSet::new();
        tried.insert(0);
        tried.insert(1);
        assert!(u.pick(&mut l, None, &tried, now).is_none());
    }

    #[test]
    fn no_fallback_while_some_node_is_healthy() {
        // Passive ejection off, so that tripping a breaker leaves health alone.
        let mut cfg = NodeConfig::default();
        cfg.health.passive_unhealthy_threshold = 0;
        let u = Upstream::new(Algorithm::RoundRobin, &specs(&[1, 1]), &cfg, None).unwrap();
        let now = Instant::now();
        mark_unhealthy(&u, 0, now);
        let mut l = local();
        let mut tried = NodeSet::new();
        tried.insert(1);
        assert!(u.pick(&mut l, None, &tried, now).is_none());
        // Node 1 healthy but its breaker open: still no fallback to the unhealthy node 0.
        break_node(&u, 1, now);
        assert!(u.pick(&mut l, None, &NodeSet::new(), now).is_none());
    }

    #[test]
    fn every_breaker_open_means_none_until_the_trial() {
        let u = upstream(Algorithm::RoundRobin, &[1, 1]);
        let t0 = Instant::now();
        break_node(&u, 0, t0);
        break_node(&u, 1, t0);
        let mut l = local();
        assert!(u.pick(&mut l, None, &NodeSet::new(), t0 + 5 * S).is_none());
        let t1 = t0 + 10 * S;
        let a = u.pick(&mut l, None, &NodeSet::new(), t1).unwrap();
        let b = u.pick(&mut l, None, &NodeSet::new(), t1).unwrap();
        assert!(a.guard.is_probe() && b.guard.is_probe());
        assert_ne!(a.index, b.index);
        // Both trial slots taken: nothing more until one finishes.
        assert!(u.pick(&mut l, None, &NodeSet::new(), t1).is_none());
        let _ = a.guard.finish(true, t1);
        assert!(u.pick(&mut l, None, &NodeSet::new(), t1).is_some());
        drop(b);
    }

    #[test]
    fn edits_keep_the_state_of_nodes_that_stay() {
        let now = Instant::now();
        let u1 = upstream(Algorithm::RoundRobin, &[1, 1, 1]);
        break_node(&u1, 1, now);
        let kept = Arc::clone(u1.nodes()[1].state());
        // Edit: node 0 removed, node 1 reweighted, a new node added, algorithm changed.
        let edited = vec![
            NodeSpec::new("10.0.0.2:80", 4),
            NodeSpec::new("10.0.0.3:80", 1),
            NodeSpec::new("10.0.0.7:80", 1),
        ];
        let mut cfg = NodeConfig::default();
        cfg.breaker.open_for = 30 * S;
        let u2 = Upstream::new(Algorithm::LeastConnections, &edited, &cfg, Some(&u1)).unwrap();
        assert!(Arc::ptr_eq(u2.nodes()[0].state(), &kept));
        assert!(Arc::ptr_eq(u2.nodes()[1].state(), u1.nodes()[2].state()));
        assert_eq!(u2.nodes()[0].weight(), 4);
        assert_eq!(u2.nodes()[0].state().breaker_mode(), BreakerMode::Open);
        assert_eq!(u2.nodes()[0].state().config().breaker.open_for, 30 * S);
        assert_eq!(u2.nodes()[2].state().breaker_mode(), BreakerMode::Closed);
        // A thread's Local built for u1 adapts to u2's weights on first use.
        let mut l = local();
        let _ = u1.pick(&mut l, None, &NodeSet::new(), now);
        assert_ne!(
            u2.pick(&mut l, None, &NodeSet::new(), now).unwrap().index,
            0
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let cfg = NodeConfig::default();
        assert_eq!(
            Upstream::new(Algorithm::RoundRobin, &[], &cfg, None).unwrap_err(),
            BalanceError::Empty
        );
        let zero = [NodeSpec::new("a:1", 0)];
        assert!(matches!(
            Upstream::new(Algorithm::RoundRobin, &zero, &cfg, None),
            Err(BalanceError::ZeroWeight { .. })
        ));
        let dup = [NodeSpec::new("a:1", 1), NodeSpec::new("a:1", 2)];
        assert!(matches!(
            Upstream::new(Algorithm::RoundRobin, &dup, &cfg, None),
            Err(BalanceError::DuplicateNode { .. })
        ));
        let heavy = [NodeSpec::new("a:1", 100_000)];
        assert!(Upstream::new(Algorithm::RoundRobin, &heavy, &cfg, None).is_ok());
        assert!(matches!(
            Upstream::new(Algorithm::ConsistentHash, &heavy, &cfg, None),
            Err(BalanceError::RingTooLarge { .. })
        ));
    }

    #[test]
    fn node_set_small_and_large_indices() {
        let mut s = NodeSet::new();
        assert!(s.is_empty());
        for i in [0, 5, 127, 128, 300, 1000] {
            assert!(s.insert(i));
            assert!(!s.insert(i));
            assert!(s.contains(i));
        }
        assert!(!s.contains(1) && !s.contains(129) && !s.contains(5000));
        assert_eq!(s.len(), 6);
        s.clear();
        assert!(s.is_empty() && !s.contains(300));
    }

    #[test]
    fn absurd_durations_do_not_panic() {
        let now = Instant::now();
        assert!(instant_after(now, Duration::MAX) > now + 3600 * S);
        let mut cfg = NodeConfig::default();
        cfg.breaker.open_for = Duration::MAX;
        cfg.breaker.max_open_for = Duration::MAX;
        cfg.health.passive_recovery = Duration::MAX;
        let node = Arc::new(NodeState::new(cfg));
        for _ in 0..5 {
            let _ = node.try_start(now).unwrap().finish(false, now);
        }
        assert!(!node.eligible(now + 1_000_000 * S));
    }

    #[test]
    fn default_rng_is_seedable() {
        let mut a = DefaultRng::seeded(5);
        let mut b = DefaultRng::seeded(5);
        assert_eq!(a.next_u64(), b.next_u64());
        let _ = DefaultRng::default().next_u64();
    }
}
