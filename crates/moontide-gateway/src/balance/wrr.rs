//! Smooth weighted round robin, nginx's algorithm (`ngx_http_upstream_get_peer`).
//!
//! Every pick adds each eligible node's weight to its `current` counter, picks the node with
//! the largest `current` (the first one on a tie) and subtracts the sum of the eligible
//! weights from it. Over any `Σweight` consecutive picks on a fixed eligible set each node
//! is picked exactly `weight` times, and the picks are interleaved rather than bunched:
//! weights 5, 1, 1 give `a a b a c a a`.
//!
//! Ineligible nodes are left out of the round: their counter does not grow and their
//! weight is not in the sum, so the others share the traffic in their own proportions and
//! nobody starves; when the node comes back it resumes from where its counter stood.
//!
//! A `Wrr` is not `Sync`: the server keeps one per worker thread (inside
//! [`Local`](super::Local)), which keeps exact proportions per thread without any shared
//! write on the request path. nginx's `effective_weight` (lowered on failures, climbing
//! back by one per pick) is left out: failures are the business of the health and breaker
//! state, which take a failing node out altogether.

/// Per-thread smooth weighted round-robin state over a fixed list of weights.
#[derive(Debug, Clone)]
pub struct Wrr {
    weights: Vec<i64>,
    current: Vec<i64>,
}

impl Wrr {
    /// A round robin over nodes `0..weights.len()`. A weight of 0 counts as 1 (upstream
    /// validation rejects it; this only keeps the arithmetic total).
    pub fn new(weights: &[u32]) -> Self {
        Self {
            weights: weights.iter().map(|&w| i64::from(w.max(1))).collect(),
            current: vec![0; weights.len()],
        }
    }

    /// How many nodes this round robin spans.
    pub fn len(&self) -> usize {
        self.weights.len()
    }

    /// Whether it spans no node (every pick returns `None`).
    pub fn is_empty(&self) -> bool {
        self.weights.is_empty()
    }

    /// The next node among those for which `eligible(index)` holds, or `None` when there
    /// is none. `eligible` is called once per node.
    pub fn pick(&mut self, mut eligible: impl FnMut(usize) -> bool) -> Option<usize> {
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for i in 0..self.weights.len() {
            if !eligible(i) {
                continue;
            }
            self.current[i] += self.weights[i];
            total += self.weights[i];
            if best.is_none_or(|b| self.current[i] > self.current[b]) {
                best = Some(i);
            }
        }
        let best = best?;
        self.current[best] -= total;
        Some(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence(wrr: &mut Wrr, n: usize, eligible: impl Fn(usize) -> bool) -> Vec<usize> {
        (0..n).map(|_| wrr.pick(&eligible).unwrap()).collect()
    }

    #[test]
    fn nginx_example_5_1_1() {
        let mut wrr = Wrr::new(&[5, 1, 1]);
        let names: String = sequence(&mut wrr, 14, |_| true)
            .into_iter()
            .map(|i| (b'a' + i as u8) as char)
            .collect();
        // Two full rounds: the sequence repeats exactly.
        assert_eq!(names, "aabacaaaabacaa");
    }

    #[test]
    fn exact_proportions_over_whole_rounds() {
        let weights = [3, 7, 1, 4];
        let mut wrr = Wrr::new(&weights);
        let rounds = 1000;
        let total: u32 = weights.iter().sum();
        let mut counts = [0u32; 4];
        for i in sequence(&mut wrr, (total * rounds) as usize, |_| true) {
            counts[i] += 1;
        }
        assert_eq!(counts, weights.map(|w| w * rounds));
    }

    #[test]
    fn every_window_of_one_round_is_exact() {
        // Smoothness: not only the totals, each consecutive Σweight picks are exact.
        let weights = [2, 3, 5];
        let mut wrr = Wrr::new(&weights);
        let seq = sequence(&mut wrr, 100, |_| true);
        for chunk in seq.chunks(10) {
            let mut counts = [0u32; 3];
            for &i in chunk {
                counts[i] += 1;
            }
            assert_eq!(counts, weights);
        }
    }

    #[test]
    fn ineligible_nodes_are_skipped_and_others_keep_proportions() {
        let mut wrr = Wrr::new(&[5, 1, 1]);
        // Node 0 (the heavy one) is out: 1 and 2 alternate, neither starves.
        let seq = sequence(&mut wrr, 6, |i| i != 0);
        assert_eq!(seq, [1, 2, 1, 2, 1, 2]);
        // With 0 back, all three are served again within one round.
        let seq = sequence(&mut wrr, 7, |_| true);
        for node in 0..3 {
            assert!(seq.contains(&node), "{seq:?}");
        }
    }

    #[test]
    fn skipping_a_node_gives_the_rest_their_ratio() {
        let mut wrr = Wrr::new(&[1, 3, 1]);
        let mut counts = [0u32; 3];
        for i in sequence(&mut wrr, 4000, |i| i != 2) {
            counts[i] += 1;
        }
        assert_eq!(counts, [1000, 3000, 0]);
    }

    #[test]
    fn nothing_eligible_and_empty() {
        let mut wrr = Wrr::new(&[1, 2]);
        assert_eq!(wrr.pick(|_| false), None);
        let mut empty = Wrr::new(&[]);
        assert!(empty.is_empty());
        assert_eq!(empty.pick(|_| true), None);
    }

    #[test]
    fn zero_weight_counts_as_one() {
        let mut wrr = Wrr::new(&[0, 1]);
        assert_eq!(sequence(&mut wrr, 4, |_| true), [0, 1, 0, 1]);
    }
}
