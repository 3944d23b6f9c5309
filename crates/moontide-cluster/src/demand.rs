//! How much of a node its load uses, and how many nodes a cluster needs.
//!
//! A node's **demand** is in nodes: 1.0 is one node fully used. It is the largest of
//! what can run out:
//!
//! - **CPU**: the fraction of its cores the node used over the period, times its
//!   **backlog** (calls that arrived over calls served). CPU use stops at 100 %: a node
//!   that gets twice what it can serve shows a CPU of 1.0 and a backlog of 2, so its
//!   demand says 2 nodes, not "full";
//! - **instances**: the instances the per-function autoscalers want over the node's
//!   instance budget (the autoscalers' wants are not capped by the budget, so this too
//!   sees past a full node);
//! - **memory**: Lua memory held over the node's memory budget.
//!
//! The cluster needs `ceil(sum of demands / target utilization)` nodes, at least one
//! ([`Scaling::of`]). That is the number to run, not a step towards it: HPA's own
//! proportional rule (`ceil(replicas × current / target)`) on CPU alone can only grow the
//! fleet by `1 / target` per period while CPU is pinned at 100 %; the backlog term lets one
//! decision reach the right size.

use std::time::Instant;

use serde::Serialize;

use crate::record::{NodeLoad, NodeRecord, NodeState};

/// The target utilization `/v1/scaling` uses unless asked for another: a node at 70 % of
/// its capacity has headroom for a burst while a new node starts.
pub const DEFAULT_TARGET_UTILIZATION: f64 = 0.7;

/// The most the backlog multiplies CPU use by in one period (a burst that arrives all at
/// once must not ask for a hundred nodes).
const MAX_BACKLOG: f64 = 10.0;

/// Fewer calls than this in a period say nothing about a backlog.
const MIN_CALLS_FOR_BACKLOG: u64 = 20;

/// What the node counts, read when it reports. Counters are totals since start.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadSample {
    pub instances: u64,
    pub desired_instances: u64,
    pub busy_instances: u64,
    pub queued_calls: u64,
    pub instance_budget: u64,
    pub memory_bytes: u64,
    pub memory_budget: u64,
    /// Calls that arrived (total).
    pub calls_arrived: u64,
    /// Calls refused for want of an instance (total).
    pub calls_shed: u64,
    /// CPU time the process used (total), in seconds.
    pub cpu_seconds: f64,
}

impl LoadSample {
    fn in_flight(&self) -> u64 {
        self.busy_instances + self.queued_calls
    }
}

/// Turns successive [`LoadSample`]s into a [`NodeLoad`] over the period between them.
#[derive(Debug)]
pub struct LoadMeter {
    cores: f64,
    last: Option<(Instant, LoadSample)>,
}

impl LoadMeter {
    /// A meter for a node that may use `cores` cores.
    pub fn new(cores: f64) -> LoadMeter {
        LoadMeter {
            cores: cores.max(1.0),
            last: None,
        }
    }

    /// The load since the previous call (the first call knows no CPU or backlog yet).
    pub fn observe(&mut self, at: Instant, sample: LoadSample) -> NodeLoad {
        let (cpu, backlog) = match self.last.replace((at, sample)) {
            Some((then, before)) => {
                let wall = at.saturating_duration_since(then).as_secs_f64();
                let cpu = if wall > 0.0 {
                    ((sample.cpu_seconds - before.cpu_seconds) / (wall * self.cores))
                        .clamp(0.0, 1.0)
                } else {
                    0.0
                };
                (cpu, backlog(&before, &sample))
            }
            None => (0.0, 1.0),
        };
        let instances = ratio(sample.desired_instances, sample.instance_budget);
        let memory = ratio(sample.memory_bytes, sample.memory_budget);
        NodeLoad {
            instances: sample.instances,
            desired_instances: sample.desired_instances,
            busy_instances: sample.busy_instances,
            queued_calls: sample.queued_calls,
            instance_budget: sample.instance_budget,
            memory_bytes: sample.memory_bytes,
            memory_budget: sample.memory_budget,
            cpu: round(cpu),
            backlog: round(backlog),
            demand: round((cpu * backlog).max(instances).max(memory)),
        }
    }
}

/// Calls that arrived over calls served between two samples. Served: arrived, minus those
/// shed, minus the growth of the calls still in flight.
fn backlog(before: &LoadSample, now: &LoadSample) -> f64 {
    let arrived = now.calls_arrived.saturating_sub(before.calls_arrived);
    if arrived < MIN_CALLS_FOR_BACKLOG {
        return 1.0;
    }
    let shed = now.calls_shed.saturating_sub(before.calls_shed);
    let piled_up = now.in_flight().saturating_sub(before.in_flight());
    let served = arrived.saturating_sub(shed).saturating_sub(piled_up).max(1);
    (arrived as f64 / served as f64).clamp(1.0, MAX_BACKLOG)
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Three decimals are plenty for a load figure and keep the JSON readable.
fn round(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// The node-count signal (`GET /v1/scaling`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scaling {
    /// How many nodes the cluster needs: what KEDA's `valueLocation` points at.
    pub desired_nodes: u64,
    pub live_nodes: u64,
    pub ready_nodes: u64,
    /// The sum of the live nodes' demand, in nodes.
    pub demand: f64,
    pub target_utilization: f64,
}

impl Scaling {
    /// The signal from the live nodes' records. `target_utilization` is in (0, 1].
    pub fn of(records: &[NodeRecord], target_utilization: f64) -> Scaling {
        let demand: f64 = records.iter().map(|record| record.load.demand).sum();
        // A hair under a whole number of nodes is that number (float sums of rounded
        // figures drift by a few ulps).
        let needed = (demand / target_utilization - 1e-9).ceil();
        Scaling {
            desired_nodes: (needed.max(1.0)) as u64,
            live_nodes: records.len() as u64,
            ready_nodes: records
                .iter()
                .filter(|record| record.state == NodeState::Ready)
                .count() as u64,
            demand: round(demand),
            target_utilization,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sample(cpu_seconds: f64, arrived: u64) -> LoadSample {
        LoadSample {
            instance_budget: 1000,
            memory_budget: 1 << 30,
            calls_arrived: arrived,
            cpu_seconds,
            ..LoadSample::default()
        }
    }

    #[test]
    fn cpu_is_the_fraction_of_the_cores_used() {
        let mut meter = LoadMeter::new(2.0);
        let start = Instant::now();
        assert_eq!(meter.observe(start, sample(0.0, 0)).cpu, 0.0);
        // One core-second over one second of two cores.
        let load = meter.observe(start + Duration::from_secs(1), sample(1.0, 100));
        assert_eq!(load.cpu, 0.5);
        assert_eq!(load.backlog, 1.0);
        assert_eq!(load.demand, 0.5);
    }

    #[test]
    fn a_saturated_node_shows_demand_beyond_one() {
        let mut meter = LoadMeter::new(2.0);
        let start = Instant::now();
        meter.observe(start, sample(0.0, 0));
        // 300 calls came, 100 were shed, 50 more are in flight than before: 150 served.
        let mut now = sample(2.0, 300);
        now.calls_shed = 100;
        now.busy_instances = 50;
        let load = meter.observe(start + Duration::from_secs(1), now);
        assert_eq!(load.cpu, 1.0);
        assert_eq!(load.backlog, 2.0);
        assert_eq!(load.demand, 2.0);
    }

    #[test]
    fn instance_and_memory_pressure_count_too() {
        let mut meter = LoadMeter::new(1.0);
        let mut wanted = sample(0.0, 0);
        wanted.desired_instances = 1500;
        assert_eq!(meter.observe(Instant::now(), wanted).demand, 1.5);
        let mut meter = LoadMeter::new(1.0);
        let mut full = sample(0.0, 0);
        full.memory_bytes = 3 << 29;
        assert_eq!(meter.observe(Instant::now(), full).demand, 1.5);
    }

    #[test]
    fn a_few_calls_say_nothing_about_a_backlog() {
        let mut meter = LoadMeter::new(1.0);
        let start = Instant::now();
        meter.observe(start, sample(0.0, 0));
        let mut now = sample(1.0, 5);
        now.calls_shed = 5;
        assert_eq!(
            meter.observe(start + Duration::from_secs(1), now).backlog,
            1.0
        );
    }

    fn node(name: &str, state: NodeState, demand: f64) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            version: "0".into(),
            state,
            data_plane: String::new(),
            admin: String::new(),
            revision: 0,
            started_at_ms: 0,
            updated_at_ms: 0,
            load: NodeLoad {
                demand,
                ..NodeLoad::default()
            },
        }
    }

    #[test]
    fn the_cluster_needs_its_demand_over_the_target() {
        let idle = Scaling::of(&[node("a", NodeState::Ready, 0.0)], 0.7);
        assert_eq!(idle.desired_nodes, 1, "never fewer than one node");
        let records = [
            node("a", NodeState::Ready, 1.0),
            node("b", NodeState::Ready, 1.0),
            node("c", NodeState::Draining, 0.8),
        ];
        let scaling = Scaling::of(&records, 0.7);
        // 2.8 / 0.7 = 4 exactly: not 5.
        assert_eq!(scaling.desired_nodes, 4);
        assert_eq!(scaling.live_nodes, 3);
        assert_eq!(scaling.ready_nodes, 2);
        assert_eq!(scaling.demand, 2.8);
        assert_eq!(Scaling::of(&records, 1.0).desired_nodes, 3);
        assert_eq!(Scaling::of(&[], 0.7).desired_nodes, 1);
    }
}
