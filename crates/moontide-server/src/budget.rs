//! The node-wide instance budget: how many Lua instances, and how much Lua memory, all
//! functions together may hold on this node.
//!
//! Every instance is counted here from its creation to its drop, with the bytes its Lua
//! state held when last measured (after init, and again each time a call releases it, if
//! it moved by 16 KiB or more).
//! A new instance is admitted only under both limits. When the node is full the pool first
//! evicts an idle instance on its own thread, coldest first; if it has none, the call
//! *starves*: it waits in its function's queue and [`NodeBudget::starving`] tells every
//! worker's tick to evict its coldest idle instances and released instances to go back to
//! the node rather than idle. A hot function is thus refused only when no idle instance is
//! left anywhere.
//!
//! The memory limit is soft: it is checked against the last measured size of every live
//! instance plus the expected size of the new one; a call may still grow its instance up
//! to the function's own `memory` cap.

use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::Notify;

/// Node-wide counts and limits of live instances.
pub struct NodeBudget {
    max_instances: usize,
    max_memory: usize,
    instances: AtomicUsize,
    memory: AtomicUsize,
    starving: AtomicUsize,
    freed: Notify,
    instances_gauge: Gauge,
    memory_gauge: Gauge,
}

/// Why the node could not admit an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Instances,
    Memory,
}

impl NodeBudget {
    pub fn new(
        max_instances: usize,
        max_memory: usize,
        instances_gauge: Gauge,
        memory_gauge: Gauge,
    ) -> NodeBudget {
        NodeBudget {
            max_instances: max_instances.max(1),
            max_memory,
            instances: AtomicUsize::new(0),
            memory: AtomicUsize::new(0),
            starving: AtomicUsize::new(0),
            freed: Notify::new(),
            instances_gauge,
            memory_gauge,
        }
    }

    /// A budget that never refuses (tests, tools).
    pub fn unlimited() -> NodeBudget {
        NodeBudget::new(usize::MAX, usize::MAX, Gauge::default(), Gauge::default())
    }

    pub fn max_instances(&self) -> usize {
        self.max_instances
    }

    pub fn max_memory(&self) -> usize {
        self.max_memory
    }

    /// Live instances on the node.
    pub fn instances(&self) -> usize {
        self.instances.load(Ordering::Relaxed)
    }

    /// Last measured bytes of all live instances.
    pub fn memory(&self) -> usize {
        self.memory.load(Ordering::Relaxed)
    }

    /// Admits one more instance expected to take `bytes`, or says which limit is reached.
    /// The bytes are accounted at once; [`NodeBudget::resize`] corrects them later.
    pub fn try_admit(&self, bytes: usize) -> Result<(), Full> {
        self.instances
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |live| {
                (live < self.max_instances).then_some(live + 1)
            })
            .map_err(|_| Full::Instances)?;
        let admitted = self
            .memory
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |used| {
                // The first instance is always admitted, whatever its size.
                let total = used.saturating_add(bytes);
                (used == 0 || total <= self.max_memory).then_some(total)
            });
        if admitted.is_err() {
            self.instances.fetch_sub(1, Ordering::AcqRel);
            return Err(Full::Memory);
        }
        self.instances_gauge.inc();
        self.memory_gauge.inc_by(bytes as i64);
        Ok(())
    }

    /// An instance accounted at `from` bytes now holds `to`.
    pub fn resize(&self, from: usize, to: usize) {
        if to >= from {
            self.memory.fetch_add(to - from, Ordering::AcqRel);
        } else {
            self.memory.fetch_sub(from - to, Ordering::AcqRel);
        }
        self.memory_gauge.inc_by(to as i64 - from as i64);
    }

    /// An instance accounted at `bytes` is gone.
    pub fn release(&self, bytes: usize) {
        self.instances.fetch_sub(1, Ordering::AcqRel);
        self.memory.fetch_sub(bytes, Ordering::AcqRel);
        self.instances_gauge.dec();
        self.memory_gauge.dec_by(bytes as i64);
        if self.starving.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Takes back an admission that did not become an instance, without waking anyone
    /// (see `pool`: a woken waiter would fail the same way).
    pub fn cancel(&self, bytes: usize) {
        self.instances.fetch_sub(1, Ordering::AcqRel);
        self.memory.fetch_sub(bytes, Ordering::AcqRel);
        self.instances_gauge.dec();
        self.memory_gauge.dec_by(bytes as i64);
    }

    /// Calls waiting because the node is full.
    pub fn starving(&self) -> usize {
        self.starving.load(Ordering::Acquire)
    }

    /// Counts a call as starving until the guard drops.
    pub fn starve(&self) -> Starving<'_> {
        self.starving.fetch_add(1, Ordering::AcqRel);
        Starving { budget: self }
    }

    /// Resolves when an instance is released while calls starve.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }
}

/// A call waiting for room on the node.
pub struct Starving<'a> {
    budget: &'a NodeBudget,
}

impl Drop for Starving<'_> {
    fn drop(&mut self) {
        self.budget.starving.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Half of the machine's memory (from `/proc/meminfo`), or 4 GiB if it cannot be read: the
/// default Lua memory budget.
pub fn default_memory_budget() -> usize {
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
        });
    match total_kib {
        Some(kib) => kib * 1024 / 2,
        None => 4 << 30,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_under_both_limits_and_gives_back() {
        let budget = NodeBudget::new(2, 1000, Gauge::default(), Gauge::default());
        assert_eq!(budget.try_admit(400), Ok(()));
        assert_eq!(budget.try_admit(700), Err(Full::Memory));
        assert_eq!(budget.try_admit(500), Ok(()));
        assert_eq!(budget.try_admit(1), Err(Full::Instances));
        budget.release(400);
        assert_eq!(budget.instances(), 1);
        assert_eq!(budget.memory(), 500);
        budget.resize(500, 900);
        assert_eq!(budget.try_admit(200), Err(Full::Memory));
        budget.resize(900, 100);
        assert_eq!(budget.try_admit(200), Ok(()));
    }

    #[test]
    fn the_first_instance_is_admitted_whatever_its_size() {
        let budget = NodeBudget::new(10, 100, Gauge::default(), Gauge::default());
        assert_eq!(budget.try_admit(1000), Ok(()));
        assert_eq!(budget.try_admit(1), Err(Full::Memory));
    }

    #[test]
    fn starving_is_counted_while_the_guard_lives() {
        let budget = NodeBudget::unlimited();
        let guard = budget.starve();
        assert_eq!(budget.starving(), 1);
        drop(guard);
        assert_eq!(budget.starving(), 0);
    }
}
