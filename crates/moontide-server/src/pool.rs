//! Instance pools: warm Lua instances per function version, per worker thread.
//!
//! Lua states are `!Send`, so every worker thread keeps its own idle instances
//! ([`LocalPools`]) and the request path touches no lock. What must be node-wide — the
//! live-instance count checked against the function's `max`, the count of waiting calls,
//! the wake-up of waiters on other threads — lives in [`PoolShared`] as atomics.
//!
//! Acquire: an idle local instance if there is one; else create one if the function is
//! under `max` (a cold start); else wait in a bounded queue, up to the queue timeout, and
//! then shed (`503`). Release: hand the instance to a local waiter; else, if calls wait on
//! another thread, drop it so that thread may create one; else keep it idle. Broken
//! instances (a limit was hit, or the call was abandoned midway) are always dropped.
//!
//! The scaling policy (pre-warming, panic windows, node budgets) plugs in here: it decides
//! how many instances to create ahead of demand and when to reap idle ones.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moontide_runtime::{Engine, Instance, InstanceError};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{Notify, oneshot};

use crate::registry::DeployedFunction;

/// How long a call waits for an instance before it is shed.
pub const QUEUE_TIMEOUT: Duration = Duration::from_secs(1);
/// Most calls waiting for one function on one node before new ones are shed at once.
pub const MAX_WAITING: usize = 1024;

/// Node-wide pool state of one deployed function version.
pub struct PoolShared {
    max: usize,
    live: AtomicUsize,
    waiting: AtomicUsize,
    retired: AtomicBool,
    wake: Notify,
    instances_gauge: Gauge,
}

impl PoolShared {
    pub fn new(max: usize, instances_gauge: Gauge) -> PoolShared {
        PoolShared {
            max: max.max(1),
            live: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            wake: Notify::new(),
            instances_gauge,
        }
    }

    /// Live instances of this version on the node (busy and idle).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Marks the version as no longer served: instances are dropped when released.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    fn try_reserve(&self) -> bool {
        self.try_reserve_below(self.max)
    }

    /// Reserves a slot for a new instance if fewer than `limit` (and `max`) are live.
    fn try_reserve_below(&self, limit: usize) -> bool {
        let limit = limit.min(self.max);
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |live| {
                (live < limit).then_some(live + 1)
            })
            .is_ok()
    }

    fn instance_gone(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.instances_gauge.dec();
        self.wake.notify_one();
    }
}

/// Why no instance could be had.
#[derive(Debug)]
pub enum AcquireError {
    /// The function is at `max` and the queue is full or its timeout passed.
    Overloaded,
    /// Creating an instance failed (init code error, limit hit during init).
    Init(InstanceError),
}

/// Creates an instance in a slot already reserved with `try_reserve*`, counting it; a
/// failure gives the slot back.
async fn cold_start(
    engine: &Engine,
    function: &Arc<DeployedFunction>,
) -> Result<Instance, InstanceError> {
    function.pool.instances_gauge.inc();
    let started = Instant::now();
    match Instance::new(engine, &function.compiled, &function.spec).await {
        Ok(instance) => {
            function.metrics.cold_starts.inc();
            function
                .metrics
                .cold_start_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok(instance)
        }
        Err(error) => {
            function.pool.instance_gone();
            Err(error)
        }
    }
}

struct LocalPool {
    function: Arc<DeployedFunction>,
    idle: Vec<(Instance, Instant)>,
    waiters: VecDeque<oneshot::Sender<Instance>>,
}

/// One worker thread's pools, keyed by [`DeployedFunction::id`].
#[derive(Default)]
pub struct LocalPools {
    pools: RefCell<HashMap<u64, LocalPool>>,
}

/// A leased instance; goes back to the pool when dropped.
pub struct Lease {
    instance: Option<Instance>,
    function: Arc<DeployedFunction>,
    pools: Rc<LocalPools>,
}

impl Lease {
    pub fn instance(&mut self) -> &mut Instance {
        self.instance
            .as_mut()
            .expect("a lease holds its instance until dropped")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(instance) = self.instance.take() {
            self.pools.release(&self.function, instance);
        }
    }
}

impl LocalPools {
    fn with_pool<R>(
        &self,
        function: &Arc<DeployedFunction>,
        f: impl FnOnce(&mut LocalPool) -> R,
    ) -> R {
        let mut pools = self.pools.borrow_mut();
        let pool = pools.entry(function.id).or_insert_with(|| LocalPool {
            function: function.clone(),
            idle: Vec::new(),
            waiters: VecDeque::new(),
        });
        f(pool)
    }

    /// Leases an instance of `function`: idle, new, or after a bounded wait.
    pub async fn acquire(
        self: &Rc<Self>,
        engine: &Engine,
        function: &Arc<DeployedFunction>,
    ) -> Result<Lease, AcquireError> {
        let lease = |instance| Lease {
            instance: Some(instance),
            function: function.clone(),
            pools: self.clone(),
        };
        let shared = &function.pool;
        let deadline = tokio::time::Instant::now() + QUEUE_TIMEOUT;
        loop {
            if let Some((instance, _)) = self.with_pool(function, |pool| pool.idle.pop()) {
                return Ok(lease(instance));
            }
            if shared.try_reserve() {
                return cold_start(engine, function)
                    .await
                    .map(lease)
                    .map_err(AcquireError::Init);
            }
            if shared.waiting.load(Ordering::Relaxed) >= MAX_WAITING {
                return Err(AcquireError::Overloaded);
            }
            let (sender, receiver) = oneshot::channel();
            self.with_pool(function, |pool| pool.waiters.push_back(sender));
            shared.waiting.fetch_add(1, Ordering::AcqRel);
            let woken = shared.wake.notified();
            let outcome = tokio::select! {
                handed = receiver => handed.ok(),
                _ = woken => None,
                _ = tokio::time::sleep_until(deadline) => {
                    shared.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Err(AcquireError::Overloaded);
                }
            };
            shared.waiting.fetch_sub(1, Ordering::AcqRel);
            if let Some(instance) = outcome {
                return Ok(lease(instance));
            }
        }
    }

    fn release(&self, function: &Arc<DeployedFunction>, mut instance: Instance) {
        let shared = &function.pool;
        if instance.is_broken() || shared.is_retired() {
            drop(instance);
            shared.instance_gone();
            return;
        }
        let kept = self.with_pool(function, |pool| {
            while let Some(waiter) = pool.waiters.pop_front() {
                match waiter.send(instance) {
                    Ok(()) => return None,
                    Err(returned) => instance = returned,
                }
            }
            Some(instance)
        });
        let Some(instance) = kept else {
            return;
        };
        if shared.waiting.load(Ordering::Acquire) > 0 {
            // Calls wait on another thread: free the slot for them.
            drop(instance);
            shared.instance_gone();
            return;
        }
        self.with_pool(function, |pool| pool.idle.push((instance, Instant::now())));
    }

    /// Drops idle instances past their function's idle timeout (never below the
    /// function's `min` on the node), and every pool of a retired version. Runs
    /// periodically on each worker.
    pub fn reap(&self, now: Instant) {
        let mut pools = self.pools.borrow_mut();
        pools.retain(|_, pool| {
            let function = &pool.function;
            let retired = function.pool.is_retired();
            let idle_timeout = Duration::from_millis(function.config.idle_timeout_ms);
            let keep_at_least = if retired {
                0
            } else {
                function.config.min as usize
            };
            // Oldest idle first; the most recently used stay warm.
            let mut index = 0;
            while index < pool.idle.len() {
                let expired = retired || now.duration_since(pool.idle[index].1) >= idle_timeout;
                if expired && function.pool.live() > keep_at_least {
                    drop(pool.idle.remove(index));
                    function.pool.instance_gone();
                } else {
                    index += 1;
                }
            }
            pool.waiters.retain(|waiter| !waiter.is_closed());
            !(pool.idle.is_empty() && pool.waiters.is_empty() && retired)
        });
    }

    /// Creates instances of functions below their `min` on the node, one per function per
    /// call, so warm capacity returns after a restart, a deploy or a failure.
    pub async fn keep_warm<'a>(
        self: &Rc<Self>,
        engine: &Engine,
        functions: impl Iterator<Item = &'a Arc<DeployedFunction>>,
    ) {
        let below_min: Vec<Arc<DeployedFunction>> = functions
            .filter(|f| f.config.min > 0 && f.pool.live() < f.config.min as usize)
            .cloned()
            .collect();
        for function in below_min {
            if function.pool.is_retired()
                || !function
                    .pool
                    .try_reserve_below(function.config.min as usize)
            {
                continue;
            }
            match cold_start(engine, &function).await {
                Ok(instance) => self.release(&function, instance),
                Err(error) => {
                    function.metrics.error(error.kind());
                    tracing::warn!(function = %function.name, %error, "pre-warming an instance failed");
                }
            }
        }
    }
}
