//! Weighted least connections: the eligible node with the fewest requests in flight per
//! unit of weight (`in_flight / weight`, compared as `a.in_flight × b.weight` against
//! `b.in_flight × a.weight`, in integers).
//!
//! Ties are broken by the caller's per-thread smooth weighted round robin
//! ([`Wrr`]) run over the tied nodes only, as nginx's `least_conn` does. A
//! plain round-robin counter would share ties evenly, but at low load every node is idle
//! and everything is a tie: the weights would then be ignored, while the WRR keeps them
//! (weights 3:1 idle get 3:1 of the traffic) and still rotates equal nodes so they share
//! the load.
//!
//! The in-flight counts are read from atomics without a lock, so two threads may both see
//! the same node as least loaded for a moment; that is the usual, harmless race of least
//! connections on a multi-threaded proxy.

use super::{NodeSet, Wrr};

/// The eligible node with the lowest `load(i) / weights[i]`, ties broken by `tie_breaker`
/// (which must span the same nodes as `weights`). `eligible` is asked once per node; `load`
/// once per eligible node, and again for the tie-break. `None` when no node is eligible.
pub fn pick(
    load: impl Fn(usize) -> u32,
    weights: &[u32],
    mut eligible: impl FnMut(usize) -> bool,
    tie_breaker: &mut Wrr,
) -> Option<usize> {
    let weight = |i: usize| u64::from(weights[i].max(1));
    let mut best: Option<(usize, u64)> = None;
    let mut ties = 0;
    let mut candidates = NodeSet::new();
    for i in 0..weights.len() {
        if !eligible(i) {
            continue;
        }
        candidates.insert(i);
        let l = u64::from(load(i));
        match best {
            Some((b, bl)) if l * weight(b) > bl * weight(i) => {}
            Some((b, bl)) if l * weight(b) == bl * weight(i) => ties += 1,
            _ => {
                best = Some((i, l));
                ties = 1;
            }
        }
    }
    let (first, best_load) = best?;
    if ties == 1 {
        return Some(first);
    }
    // Loads may have moved since the first pass; if no node still ties, the first best
    // one stands.
    let is_tie = |i: usize| u64::from(load(i)) * weight(first) == best_load * weight(i);
    Some(
        tie_breaker
            .pick(|i| candidates.contains(i) && is_tie(i))
            .unwrap_or(first),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        loads: &[u32],
        weights: &[u32],
        eligible: impl Fn(usize) -> bool,
        wrr: &mut Wrr,
    ) -> Option<usize> {
        pick(|i| loads[i], weights, eligible, wrr)
    }

    #[test]
    fn lowest_in_flight_wins() {
        let mut wrr = Wrr::new(&[1, 1, 1]);
        assert_eq!(run(&[4, 2, 3], &[1, 1, 1], |_| true, &mut wrr), Some(1));
    }

    #[test]
    fn load_is_relative_to_weight() {
        let mut wrr = Wrr::new(&[1, 3]);
        // 2/1 against 5/3: the heavier node is less loaded.
        assert_eq!(run(&[2, 5], &[1, 3], |_| true, &mut wrr), Some(1));
        // 1/1 against 4/3: the light one.
        assert_eq!(run(&[1, 4], &[1, 3], |_| true, &mut wrr), Some(0));
    }

    #[test]
    fn ties_rotate_so_equal_nodes_share() {
        let mut wrr = Wrr::new(&[1, 1, 1, 1]);
        let loads = [1, 0, 0, 0];
        let picks: Vec<usize> = (0..6)
            .map(|_| run(&loads, &[1; 4], |_| true, &mut wrr).unwrap())
            .collect();
        assert_eq!(picks, [1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn idle_ties_keep_the_weights() {
        let weights = [3, 1];
        let mut wrr = Wrr::new(&weights);
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[run(&[0, 0], &weights, |_| true, &mut wrr).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100]);
    }

    #[test]
    fn ineligible_nodes_are_skipped() {
        let mut wrr = Wrr::new(&[1, 1, 1]);
        assert_eq!(run(&[0, 5, 3], &[1, 1, 1], |i| i != 0, &mut wrr), Some(2));
        assert_eq!(run(&[0, 0, 0], &[1, 1, 1], |_| false, &mut wrr), None);
        // Ties among eligible nodes only.
        for _ in 0..5 {
            assert_ne!(run(&[0, 0, 0], &[1, 1, 1], |i| i != 1, &mut wrr), Some(1));
        }
    }

    #[test]
    fn simulated_load_follows_the_weights() {
        // Requests arrive and stay; least connections spreads them in proportion to weight.
        let weights = [1, 2, 5];
        let mut wrr = Wrr::new(&weights);
        let mut loads = [0u32; 3];
        for _ in 0..800 {
            let i = pick(|i| loads[i], &weights, |_| true, &mut wrr).unwrap();
            loads[i] += 1;
        }
        assert_eq!(loads, [100, 200, 500]);
    }
}
