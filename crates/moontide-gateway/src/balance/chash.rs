//! Consistent hashing on a ketama ring (libketama, as used by twemproxy and libmemcached;
//! nginx's `hash ... consistent` builds the same shape of ring with CRC32).
//!
//! Each node puts `160 × weight` points on a ring of `u32` hashes: for `k` in
//! `0..40 × weight` it hashes `"{key}-{k}"` with MD5 and cuts the 16-byte digest into four
//! little-endian `u32` points, exactly as libketama does. A request key is hashed the same
//! way (the first four digest bytes) and served by the node owning the first point at or
//! after it, walking clockwise and wrapping around. A node that is not eligible (down, its
//! breaker open, already tried by this request) is passed over: the walk goes on to the
//! next point that belongs to an eligible node, so a key's fallback is stable too.
//!
//! Choices:
//! - **Points per node are `160 × weight`, not libketama's share of a fixed total.**
//!   libketama gives each node `⌊40 × servers × weight / Σweight⌋` digests, so removing one
//!   node changes every other node's point count and moves keys between nodes that stayed.
//!   With a fixed count per weight unit (what nginx does) a node's points depend only on its
//!   own key and weight: removing a node moves only the keys it owned, adding one takes keys
//!   only for itself. With equal weights the ring is point for point libketama's.
//! - **MD5**: the hash libketama uses, so rings agree with other ketama clients given the
//!   same node keys; its cost on a request key (one 64-byte block, well under a
//!   microsecond) is small next to proxying the request. Callers that already have a hash
//!   can use [`Ketama::pick_hash`].
//! - Points are sorted by (hash, node index), so a collision resolves the same way on every
//!   build. The ring is immutable once built (`Sync`, shared by all threads); an upstream
//!   edit builds a new one.
//! - The ring holds at most [`MAX_RING_POINTS`] points (8 bytes each): weights beyond that
//!   are a configuration error rather than a silent memory cost.

use super::{BalanceError, NodeSet};

/// Ring points per unit of weight (libketama's and nginx's 160).
pub const POINTS_PER_WEIGHT: u64 = 160;
/// The most points a ring may have: `160 × Σweight ≤ 2²²`, i.e. Σweight ≤ 26 214 (32 MiB).
pub const MAX_RING_POINTS: u64 = 1 << 22;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Point {
    hash: u32,
    node: u32,
}

/// An immutable ketama ring over nodes `0..n`.
#[derive(Debug, Clone)]
pub struct Ketama {
    points: Vec<Point>,
    nodes: usize,
}

impl Ketama {
    /// Builds the ring for `(node key, weight)` pairs; node `i` of the ring is `nodes[i]`.
    /// A weight of 0 counts as 1. Fails only when the ring would exceed
    /// [`MAX_RING_POINTS`].
    pub fn new(nodes: &[(&str, u32)]) -> Result<Self, BalanceError> {
        let total: u64 = nodes
            .iter()
            .map(|&(_, w)| POINTS_PER_WEIGHT * u64::from(w.max(1)))
            .sum();
        if total > MAX_RING_POINTS {
            return Err(BalanceError::RingTooLarge {
                points: total,
                max: MAX_RING_POINTS,
            });
        }
        let mut points = Vec::with_capacity(total as usize);
        let mut buf = String::new();
        for (index, &(key, weight)) in nodes.iter().enumerate() {
            for k in 0..(POINTS_PER_WEIGHT / 4) * u64::from(weight.max(1)) {
                use std::fmt::Write as _;
                buf.clear();
                let _ = write!(buf, "{key}-{k}");
                let digest = md5::compute(buf.as_bytes()).0;
                for chunk in digest.chunks_exact(4) {
                    let hash = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                    points.push(Point {
                        hash,
                        node: index as u32,
                    });
                }
            }
        }
        points.sort_unstable();
        Ok(Self {
            points,
            nodes: nodes.len(),
        })
    }

    /// The ring position of a request key: the first four bytes of its MD5 digest, read
    /// little-endian (libketama's `ketama_hashi`).
    pub fn hash(key: &[u8]) -> u32 {
        let d = md5::compute(key).0;
        u32::from_le_bytes([d[0], d[1], d[2], d[3]])
    }

    /// The node serving `key`: the owner of the first point clockwise from the key's hash
    /// for which `eligible(node)` holds. `None` when no node is eligible.
    pub fn pick(&self, key: &[u8], eligible: impl FnMut(usize) -> bool) -> Option<usize> {
        self.pick_hash(Self::hash(key), eligible)
    }

    /// [`pick`](Self::pick) for a key already hashed onto the ring. `eligible` is asked at
    /// most once per node: a refused node is remembered and its other points skipped.
    pub fn pick_hash(&self, hash: u32, mut eligible: impl FnMut(usize) -> bool) -> Option<usize> {
        let len = self.points.len();
        if len == 0 {
            return None;
        }
        let start = self.points.partition_point(|p| p.hash < hash);
        let mut refused = NodeSet::new();
        let mut left = self.nodes;
        for step in 0..len {
            let node = self.points[(start + step) % len].node as usize;
            if refused.contains(node) {
                continue;
            }
            if eligible(node) {
                return Some(node);
            }
            refused.insert(node);
            left -= 1;
            if left == 0 {
                break;
            }
        }
        None
    }

    /// How many points the ring has (`160 × Σweight`).
    pub fn points(&self) -> usize {
        self.points.len()
    }

    /// How many nodes the ring was built over.
    pub fn nodes(&self) -> usize {
        self.nodes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{}:8080", i + 1)).collect()
    }

    fn ring(keys: &[String], weight: u32) -> Ketama {
        let nodes: Vec<(&str, u32)> = keys.iter().map(|k| (k.as_str(), weight)).collect();
        Ketama::new(&nodes).unwrap()
    }

    fn request_keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("/user/{i}")).collect()
    }

    #[test]
    fn ring_has_160_points_per_weight_unit() {
        let r = Ketama::new(&[("a:1", 1), ("b:1", 3)]).unwrap();
        assert_eq!(r.points(), 160 * 4);
        assert_eq!(r.nodes(), 2);
        assert!(r.points.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn libketama_point_layout() {
        // The first digest of "a-0" gives the node's first four points, little-endian.
        let d = md5::compute(b"a-0").0;
        let r = Ketama::new(&[("a", 1)]).unwrap();
        for c in d.chunks_exact(4) {
            let h = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            assert!(r.points.iter().any(|p| p.hash == h));
        }
    }

    #[test]
    fn same_key_same_node() {
        let keys = node_keys(5);
        let r = ring(&keys, 1);
        for k in request_keys(200) {
            let first = r.pick(k.as_bytes(), |_| true).unwrap();
            for _ in 0..3 {
                assert_eq!(r.pick(k.as_bytes(), |_| true), Some(first));
            }
            // A rebuilt ring (another snapshot, another thread) agrees.
            assert_eq!(ring(&keys, 1).pick(k.as_bytes(), |_| true), Some(first));
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_keys() {
        const N: usize = 10;
        let keys = node_keys(N);
        let before = ring(&keys, 1);
        let removed = 3;
        let kept: Vec<String> = keys
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != removed)
            .map(|(_, k)| k.clone())
            .collect();
        let after = ring(&kept, 1);
        let requests = request_keys(10_000);
        let mut moved = 0;
        for k in &requests {
            let b = &keys[before.pick(k.as_bytes(), |_| true).unwrap()];
            let a = &kept[after.pick(k.as_bytes(), |_| true).unwrap()];
            if a != b {
                assert_eq!(b, &keys[removed], "key {k} moved between surviving nodes");
                moved += 1;
            }
        }
        let fraction = moved as f64 / requests.len() as f64;
        assert!(
            (0.06..0.14).contains(&fraction),
            "moved {fraction}, expected ≈ 1/{N}"
        );
    }

    #[test]
    fn adding_a_node_takes_keys_only_for_itself() {
        let keys = node_keys(9);
        let mut more = keys.clone();
        more.push("10.0.0.99:8080".into());
        let before = ring(&keys, 1);
        let after = ring(&more, 1);
        let mut moved = 0;
        for k in request_keys(10_000) {
            let b = &keys[before.pick(k.as_bytes(), |_| true).unwrap()];
            let a = &more[after.pick(k.as_bytes(), |_| true).unwrap()];
            if a != b {
                assert_eq!(a, "10.0.0.99:8080");
                moved += 1;
            }
        }
        assert!((600..1400).contains(&moved), "{moved}");
    }

    #[test]
    fn ineligible_node_falls_to_the_next_on_the_ring_same_as_removal() {
        let keys = node_keys(6);
        let r = ring(&keys, 1);
        let down = 2;
        let without: Vec<String> = keys
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != down)
            .map(|(_, k)| k.clone())
            .collect();
        let r2 = ring(&without, 1);
        for k in request_keys(2000) {
            let skipped = r.pick(k.as_bytes(), |i| i != down).unwrap();
            assert_ne!(skipped, down);
            // Marking a node ineligible sends its keys where removing it would.
            assert_eq!(
                keys[skipped],
                without[r2.pick(k.as_bytes(), |_| true).unwrap()]
            );
            // Keys not on the down node do not move.
            let normal = r.pick(k.as_bytes(), |_| true).unwrap();
            if normal != down {
                assert_eq!(skipped, normal);
            }
        }
    }

    #[test]
    fn eligibility_is_asked_once_per_node_and_none_when_all_refused() {
        let keys = node_keys(4);
        let r = ring(&keys, 2);
        let mut asked = vec![0; 4];
        assert_eq!(
            r.pick(b"k", |i| {
                asked[i] += 1;
                false
            }),
            None
        );
        assert_eq!(asked, [1, 1, 1, 1]);
        assert_eq!(Ketama::new(&[]).unwrap().pick(b"k", |_| true), None);
    }

    #[test]
    fn weights_are_roughly_proportional() {
        let keys = node_keys(3);
        let weights = [1u32, 2, 5];
        let nodes: Vec<(&str, u32)> = keys
            .iter()
            .zip(weights)
            .map(|(k, w)| (k.as_str(), w))
            .collect();
        let r = Ketama::new(&nodes).unwrap();
        let mut counts = [0f64; 3];
        let n = 40_000;
        for k in request_keys(n) {
            counts[r.pick(k.as_bytes(), |_| true).unwrap()] += 1.0;
        }
        for (count, w) in counts.iter().zip(weights) {
            let expected = n as f64 * f64::from(w) / 8.0;
            let ratio = count / expected;
            assert!((0.8..1.2).contains(&ratio), "{counts:?}");
        }
    }

    #[test]
    fn oversized_ring_is_refused() {
        let err = Ketama::new(&[("a", 30_000)]).unwrap_err();
        assert!(matches!(err, BalanceError::RingTooLarge { .. }));
    }
}
