//! Instance pools: warm Lua instances per function version, per worker thread, scaled by
//! the autoscaler ([`crate::autoscale`]) within the node budget ([`crate::budget`]).
//!
//! Lua states are `!Send`, so every worker thread keeps its own idle instances
//! ([`LocalPools`]) and the request path touches no lock. What must be node-wide — the
//! live-instance count checked against the function's `max`, the count of waiting calls,
//! the scale-up rate limit, the wake-up of waiters on other threads — lives in
//! [`PoolShared`] as atomics; the node's instance and memory budget in [`NodeBudget`].
//!
//! **Acquire**: an idle local instance if there is one (most recently used first); else
//! create one (a cold start on the request path, reason `demand`) if the function is under
//! `max` and its scale-up rate and the node budget allow — when the node is full, the
//! coldest idle instance on this thread is evicted first; else wait in the function's
//! bounded queue, up to the queue timeout, and then shed (`503`).
//!
//! **Release**: hand the instance to a local waiter; else, if calls wait on another thread
//! or starve for node budget, drop it so they may create one; else keep it idle. Broken
//! instances (a limit was hit, or the call was abandoned midway) are always dropped.
//!
//! **Shares**: a function with `concurrency` c > 1 lends each instance to up to c calls at
//! once (coroutines of one Lua state, see `moontide_runtime::Instance`). A lease is one
//! share; an instance with free shares is *open* and is lent before an idle one is taken,
//! so calls pack onto few instances; it becomes idle when its last share comes back. Counts
//! (`busy`, `idle`, `live`, the budget) are of instances, the scaler's level of calls.
//!
//! **Tick** (every [`TICK`] on each worker, for functions with recent traffic): sample each
//! function's [`Scaler`], publish desired/busy/idle, create instances up to the desired
//! count (pre-warming), drop idle ones above it, and evict idle instances while calls
//! elsewhere starve for budget. **Sweep** (every second, every function): the same for
//! functions without recent traffic — the idle grace and scale-to-`min` — and cleanup of
//! retired versions.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moontide_runtime::{Engine, INIT_REQUEST_ID, Instance, InstanceError};
use tokio::sync::{Notify, oneshot};

pub use crate::autoscale::TICK;
use crate::autoscale::{Policy, Scaler};
use crate::budget::{Full, NodeBudget};
use crate::metrics::{ScaleDown, ScaleUp, Shed};
use crate::registry::DeployedFunction;

/// Most instances one function pre-warms on one thread in one tick (each is a cold start
/// run on the tick, about 100 µs of the thread).
const PREWARM_PER_TICK: u32 = 16;

/// How often a waiting call re-checks for a slot even without a wake-up (a slot freed by
/// a cancelled reservation, a refill of the scale-up rate).
const RECHECK: Duration = Duration::from_millis(20);

/// Smallest change of an instance's heap that is re-accounted in the node budget.
const RESIZE_STEP: usize = 16 << 10;

/// Expected Lua memory of an instance before one was measured.
const FIRST_INSTANCE_BYTES: usize = 256 << 10;

/// Node-wide pool state of one deployed function version.
pub struct PoolShared {
    max: usize,
    live: AtomicUsize,
    waiting: AtomicUsize,
    retired: AtomicBool,
    wake: Notify,
    /// Lua memory of the last instance measured after init: the expected size of the next.
    instance_bytes: AtomicUsize,
    /// Scale-up limiter (GCRA): the theoretical arrival time of the next instance, in ns
    /// since `epoch`.
    scale_up_tat: AtomicU64,
    scale_up_interval_ns: u64,
    scale_up_tolerance_ns: u64,
    epoch: Instant,
    /// Sums over worker threads, for `info` (the gauges sum over versions too).
    desired: AtomicI64,
    busy: AtomicI64,
    idle: AtomicI64,
    budget: Arc<NodeBudget>,
}

/// What `info` shows of a version's pool.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PoolStatus {
    pub live: usize,
    pub desired: i64,
    pub busy: i64,
    pub idle: i64,
    pub waiting: usize,
}

impl PoolShared {
    /// `max` instances; at most `scale_up_rate` created per second, with bursts of a tenth
    /// of a second's worth.
    pub fn new(max: usize, scale_up_rate: u32, budget: Arc<NodeBudget>) -> PoolShared {
        let rate = u64::from(scale_up_rate.max(1));
        let interval = 1_000_000_000 / rate;
        let burst = (rate / 10).max(1);
        PoolShared {
            max: max.max(1),
            live: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            wake: Notify::new(),
            instance_bytes: AtomicUsize::new(FIRST_INSTANCE_BYTES),
            scale_up_tat: AtomicU64::new(0),
            scale_up_interval_ns: interval,
            scale_up_tolerance_ns: interval * (burst - 1),
            epoch: Instant::now(),
            desired: AtomicI64::new(0),
            busy: AtomicI64::new(0),
            idle: AtomicI64::new(0),
            budget,
        }
    }

    /// Live instances of this version on the node (busy and idle).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> PoolStatus {
        PoolStatus {
            live: self.live(),
            desired: self.desired.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
            idle: self.idle.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }

    /// Marks the version as no longer served: instances are dropped when released.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
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

    /// An instance (or a slot reserved for one) is gone: a waiter may create one.
    fn unreserve(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.wake.notify_one();
    }

    /// Takes back a reservation that did not become an instance, without waking anyone:
    /// a waiter woken for it would fail the same way and wake the next (a livelock).
    /// Waiters re-check on their own every [`RECHECK`].
    fn cancel_reservation(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }

    /// Takes one instance creation from the scale-up rate limit, if it allows one now.
    fn try_scale_up(&self, now: Instant) -> bool {
        let now_ns = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.scale_up_tat
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |tat| {
                let tat = tat.max(now_ns);
                (tat - now_ns <= self.scale_up_tolerance_ns)
                    .then_some(tat + self.scale_up_interval_ns)
            })
            .is_ok()
    }

    fn expected_bytes(&self) -> usize {
        self.instance_bytes.load(Ordering::Relaxed)
    }
}

/// Why no instance could be had.
#[derive(Debug)]
pub enum AcquireError {
    /// No instance within the queue's bounds: the call is shed.
    Shed(Shed),
    /// Creating an instance failed (init code error, limit hit during init).
    Init(InstanceError),
    /// The version is quarantined: it crashed the node (see `moontide_supervisor::ledger`).
    Quarantined(Arc<moontide_supervisor::ledger::CrashRecord>),
}

/// An instance with the bytes the node budget has it accounted at, shared by the leases
/// of the calls it serves (one for a function with `concurrency` 1).
struct Warm {
    instance: Instance,
    bytes: Cell<usize>,
    /// Calls holding a share of it.
    leases: Cell<u32>,
    /// In its pool's open list (has callers and free shares).
    open: Cell<bool>,
}

impl Warm {
    fn new(instance: Instance, bytes: usize) -> Rc<Warm> {
        Rc::new(Warm {
            instance,
            bytes: Cell::new(bytes),
            leases: Cell::new(0),
            open: Cell::new(false),
        })
    }
}

/// How an instance comes back to its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Returned {
    /// A lease's call ended.
    CallEnded,
    /// A share handed to a waiter that had stopped listening: never used.
    Unused,
    /// A new instance, not lent yet (pre-warmed).
    New,
}

/// Why a slot for a new instance was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    AtMax,
    RateLimited,
    NodeFull,
}

/// Creates an instance in a slot already reserved (function `live` and node budget at
/// `bytes`), counting it; a failure gives the slot back.
/// `request_id` is the call that asked for it (`init` when none did): the init's log lines
/// carry it.
async fn cold_start(
    engine: &Engine,
    function: &Arc<DeployedFunction>,
    bytes: usize,
    why: ScaleUp,
    request_id: &str,
) -> Result<Rc<Warm>, InstanceError> {
    let shared = &function.pool;
    function.metrics.instances.inc();
    // If the caller goes away mid-init (the client hung up), the slot comes back.
    let mut slot = Slot {
        function,
        bytes,
        taken: false,
    };
    let started = Instant::now();
    let created = Instance::new_for(engine, &function.compiled, &function.spec, request_id).await;
    slot.taken = true;
    match created {
        Ok(instance) => {
            function.metrics.cold_starts.inc();
            function
                .metrics
                .cold_start_seconds
                .observe(started.elapsed().as_secs_f64());
            function.metrics.scaled_up(why, 1);
            let measured = instance.used_memory();
            shared.budget.resize(bytes, measured);
            shared.instance_bytes.store(measured, Ordering::Relaxed);
            Ok(Warm::new(instance, measured))
        }
        Err(error) => {
            function.metrics.instances.dec();
            shared.budget.release(bytes);
            shared.unreserve();
            Err(error)
        }
    }
}

/// A slot reserved for an instance being created; given back if the creation is abandoned.
struct Slot<'a> {
    function: &'a DeployedFunction,
    bytes: usize,
    taken: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.taken {
            self.function.metrics.instances.dec();
            self.function.pool.budget.release(self.bytes);
            self.function.pool.unreserve();
        }
    }
}

/// A call's place in a function's queue, counted (node-wide, on this thread, in the
/// queue-depth gauge) until it is dropped — also when the call is abandoned mid-wait
/// (client gone). An instance handed to it after it stopped listening (it was woken for
/// another reason at the same moment, or its client went away) is not lost: dropping the
/// place takes it out of the channel and gives its slots back.
struct Waiting<'a> {
    receiver: oneshot::Receiver<Rc<Warm>>,
    function: &'a Arc<DeployedFunction>,
    pools: &'a LocalPools,
}

impl Waiting<'_> {
    /// The instance handed over, if one was.
    fn take(&mut self) -> Option<Rc<Warm>> {
        self.receiver.close();
        self.receiver.try_recv().ok()
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.function.pool.waiting.fetch_sub(1, Ordering::AcqRel);
        self.function.metrics.queue_depth.dec();
        self.pools
            .with_pool(self.function, |pool| pool.waiting -= 1);
        if let Some(share) = self.take() {
            self.pools.release(self.function, share, Returned::Unused);
        }
    }
}

/// Drops an instance no call holds and gives back its slots.
fn drop_instance(function: &DeployedFunction, warm: Rc<Warm>, why: ScaleDown) {
    debug_assert_eq!(warm.leases.get(), 0, "dropping an instance in use");
    let bytes = warm.bytes.get();
    drop(warm);
    function.pool.budget.release(bytes);
    function.metrics.instances.dec();
    function.metrics.scaled_down(why, 1);
    function.pool.unreserve();
}

/// What one thread last added to the node-wide gauges for one function version.
#[derive(Default)]
struct Published {
    desired: i64,
    busy: i64,
    idle: i64,
}

struct LocalPool {
    function: Arc<DeployedFunction>,
    policy: Policy,
    /// Calls one instance serves at once.
    concurrency: u32,
    /// Instances no call holds, oldest first; calls take the most recently used (the end).
    idle: Vec<(Rc<Warm>, Instant)>,
    /// Instances with callers and free shares (only with `concurrency` > 1).
    open: Vec<Rc<Warm>>,
    waiters: VecDeque<oneshot::Sender<Rc<Warm>>>,
    /// Calls of this function waiting on this thread (some may be between wake-ups and
    /// out of `waiters`).
    waiting: usize,
    /// Instances on this thread that calls hold.
    busy: usize,
    scaler: Scaler,
    desired: u32,
    published: Published,
    /// In this thread's tick list.
    ticking: bool,
}

impl LocalPool {
    fn new(function: &Arc<DeployedFunction>, now: Instant) -> LocalPool {
        LocalPool {
            function: function.clone(),
            policy: Policy::of(&function.config),
            concurrency: function.config.concurrency.max(1),
            idle: Vec::new(),
            open: Vec::new(),
            waiters: VecDeque::new(),
            waiting: 0,
            busy: 0,
            scaler: Scaler::new(now),
            desired: 0,
            published: Published::default(),
            ticking: false,
        }
    }

    fn local_live(&self) -> usize {
        self.idle.len() + self.busy
    }

    /// Lends a share of an open instance, else of the most recently used idle one.
    fn take_share(&mut self) -> Option<Rc<Warm>> {
        let warm = match self.open.last() {
            Some(open) => open.clone(),
            None => self.idle.pop()?.0,
        };
        self.lend(&warm);
        Some(warm)
    }

    /// Counts one more call on `warm` (the caller hands the share on).
    fn lend(&mut self, warm: &Rc<Warm>) {
        let leases = warm.leases.get() + 1;
        warm.leases.set(leases);
        if leases == 1 {
            self.busy += 1;
        }
        self.set_open(warm, leases < self.concurrency);
    }

    /// Counts one call less on `warm`; `true` if none holds it any more. A `usable`
    /// instance with calls left stays open to more.
    fn unlend(&mut self, warm: &Rc<Warm>, usable: bool) -> bool {
        let leases = warm.leases.get() - 1;
        warm.leases.set(leases);
        if leases == 0 {
            self.busy -= 1;
        }
        self.set_open(warm, usable && leases > 0);
        leases == 0
    }

    fn set_open(&mut self, warm: &Rc<Warm>, open: bool) {
        if warm.open.replace(open) == open {
            return;
        }
        if open {
            self.open.push(warm.clone());
        } else if let Some(at) = self.open.iter().position(|o| Rc::ptr_eq(o, warm)) {
            self.open.swap_remove(at);
        }
    }

    /// Hands free shares of `warm` to this thread's waiters, oldest first. `true` if one
    /// was handed.
    fn serve_waiters(&mut self, warm: &Rc<Warm>) -> bool {
        let mut served = false;
        while warm.leases.get() < self.concurrency {
            let Some(waiter) = self.waiters.pop_front() else {
                break;
            };
            if waiter.is_closed() {
                continue;
            }
            self.lend(warm);
            // The receiver lives on this thread and was open just now: the send succeeds.
            if let Err(share) = waiter.send(warm.clone()) {
                self.unlend(&share, true);
                continue;
            }
            served = true;
        }
        served
    }

    /// Samples the scaler and publishes what changed. Returns how many instances to
    /// pre-warm.
    fn evaluate(&mut self, now: Instant) -> u32 {
        let retired = self.function.pool.is_retired();
        self.desired = if retired {
            0
        } else {
            self.scaler.sample(now, &self.policy)
        };
        self.scale_down(now);
        self.publish();
        if retired {
            return 0;
        }
        (self.desired as usize)
            .saturating_sub(self.local_live())
            .min(PREWARM_PER_TICK as usize) as u32
    }

    /// Drops idle instances above the desired count that idled at least a panic window
    /// (never below the function's `min` on the node); all of them for a retired version.
    fn scale_down(&mut self, now: Instant) {
        let function = self.function.clone();
        let retired = function.pool.is_retired();
        let keep_at_least = if retired {
            0
        } else {
            function.config.min as usize
        };
        let why = if retired {
            ScaleDown::Retired
        } else if self.desired == 0 {
            ScaleDown::Idle
        } else {
            ScaleDown::ScaleDown
        };
        let mut excess = self.local_live().saturating_sub(self.desired as usize);
        while excess > 0
            && !self.idle.is_empty()
            && function.pool.live() > keep_at_least
            && (retired
                || now.saturating_duration_since(self.idle[0].1) >= self.policy.panic_window)
        {
            let (warm, _) = self.idle.remove(0);
            drop_instance(&function, warm, why);
            excess -= 1;
        }
    }

    /// Brings the node-wide gauges up to this thread's counts.
    fn publish(&mut self) {
        let now = Published {
            desired: i64::from(self.desired),
            busy: self.busy as i64,
            idle: self.idle.len() as i64,
        };
        self.apply(now);
    }

    fn apply(&mut self, now: Published) {
        let shared = &self.function.pool;
        let metrics = &self.function.metrics;
        let desired = now.desired - self.published.desired;
        let busy = now.busy - self.published.busy;
        let idle = now.idle - self.published.idle;
        if desired != 0 {
            shared.desired.fetch_add(desired, Ordering::Relaxed);
            metrics.instances_desired.inc_by(desired);
        }
        if busy != 0 {
            shared.busy.fetch_add(busy, Ordering::Relaxed);
            metrics.instances_busy.inc_by(busy);
        }
        if idle != 0 {
            shared.idle.fetch_add(idle, Ordering::Relaxed);
            metrics.instances_idle.inc_by(idle);
        }
        self.published = now;
    }

    /// Still needs the fast tick (recent traffic, or instances above the desired count).
    fn needs_tick(&self) -> bool {
        self.scaler.is_active() || self.local_live() > self.desired as usize
    }

    /// Nothing here is worth keeping (the sweep may drop the entry).
    fn is_empty(&self) -> bool {
        self.idle.is_empty()
            && self.busy == 0
            && self.waiters.is_empty()
            && self.waiting == 0
            && self.scaler.level() == 0
            && (self.function.pool.is_retired() || self.desired == 0)
    }
}

impl Drop for LocalPool {
    fn drop(&mut self) {
        // Take this thread's share out of the node-wide gauges.
        self.apply(Published::default());
    }
}

/// One worker thread's pools, keyed by [`DeployedFunction::id`].
pub struct LocalPools {
    pools: RefCell<HashMap<u64, LocalPool>>,
    /// Functions with recent traffic: the ones each tick evaluates.
    ticking: RefCell<Vec<u64>>,
    budget: Arc<NodeBudget>,
}

/// One call's share of an instance; goes back to the pool when dropped.
pub struct Lease {
    warm: Option<Rc<Warm>>,
    function: Arc<DeployedFunction>,
    pools: Rc<LocalPools>,
}

impl Lease {
    pub fn instance(&self) -> &Instance {
        &self
            .warm
            .as_ref()
            .expect("a lease holds its instance until dropped")
            .instance
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(warm) = self.warm.take() {
            self.pools
                .release(&self.function, warm, Returned::CallEnded);
        }
    }
}

/// A call counted in its function's observed concurrency until it ends (served or shed).
struct Demand<'a> {
    pools: &'a LocalPools,
    function: &'a Arc<DeployedFunction>,
}

impl Demand<'_> {
    /// The call got its instance: its lease ends the demand.
    fn served(self) {
        std::mem::forget(self);
    }
}

impl Drop for Demand<'_> {
    fn drop(&mut self) {
        self.pools
            .with_pool(self.function, |pool| pool.scaler.call_ended());
    }
}

impl LocalPools {
    pub fn new(budget: Arc<NodeBudget>) -> LocalPools {
        LocalPools {
            pools: RefCell::default(),
            ticking: RefCell::default(),
            budget,
        }
    }

    fn with_pool<R>(
        &self,
        function: &Arc<DeployedFunction>,
        f: impl FnOnce(&mut LocalPool) -> R,
    ) -> R {
        let mut pools = self.pools.borrow_mut();
        let pool = pools
            .entry(function.id)
            .or_insert_with(|| LocalPool::new(function, Instant::now()));
        f(pool)
    }

    /// Leases an instance of `function` for the call `request_id`: idle, new, or after a
    /// bounded wait. An instance created for it logs its init under that id.
    pub async fn acquire(
        self: &Rc<Self>,
        engine: &Engine,
        function: &Arc<DeployedFunction>,
        request_id: &str,
    ) -> Result<Lease, AcquireError> {
        if let Some(record) = &function.quarantine {
            return Err(AcquireError::Quarantined(record.clone()));
        }
        let now = Instant::now();
        // The common case in one lookup: count the call, take a share of a warm instance.
        let (start_tick, share) = self.with_pool(function, |pool| {
            pool.scaler.call_started(now);
            let share = pool.take_share();
            (!std::mem::replace(&mut pool.ticking, true), share)
        });
        if start_tick {
            self.ticking.borrow_mut().push(function.id);
        }
        let lease = |warm| Lease {
            warm: Some(warm),
            function: function.clone(),
            pools: self.clone(),
        };
        if let Some(share) = share {
            return Ok(lease(share));
        }
        let demand = Demand {
            pools: self,
            function,
        };
        let share = self
            .acquire_share(engine, function, now, request_id)
            .await?;
        demand.served();
        Ok(lease(share))
    }

    /// A share of an instance for a call that found none free: a share freed meanwhile, a
    /// new instance, or one handed over in the queue.
    async fn acquire_share(
        &self,
        engine: &Engine,
        function: &Arc<DeployedFunction>,
        started: Instant,
        request_id: &str,
    ) -> Result<Rc<Warm>, AcquireError> {
        let shared = &function.pool;
        let config = &function.config;
        let deadline = tokio::time::Instant::from_std(started)
            + Duration::from_millis(config.queue_timeout_ms);
        let mut waited = false;
        let observe_wait = |waited: bool| {
            if waited {
                function
                    .metrics
                    .queue_wait
                    .observe(started.elapsed().as_secs_f64());
            }
        };
        loop {
            if let Some(share) = self.with_pool(function, LocalPool::take_share) {
                observe_wait(waited);
                return Ok(share);
            }
            let refused = match self.reserve(function, true) {
                Ok(bytes) => {
                    observe_wait(waited);
                    let warm = cold_start(engine, function, bytes, ScaleUp::Demand, request_id)
                        .await
                        .map_err(AcquireError::Init)?;
                    // The new instance's other shares go to calls queued here meanwhile.
                    self.with_pool(function, |pool| {
                        pool.lend(&warm);
                        pool.serve_waiters(&warm);
                    });
                    return Ok(warm);
                }
                Err(refused) => refused,
            };
            let queue_size = config.queue_size as usize;
            let queued =
                shared
                    .waiting
                    .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |waiting| {
                        (waiting < queue_size).then_some(waiting + 1)
                    });
            if queued.is_err() {
                observe_wait(waited);
                return Err(AcquireError::Shed(Shed::QueueFull));
            }
            let (sender, receiver) = oneshot::channel();
            self.with_pool(function, |pool| {
                pool.waiters.push_back(sender);
                pool.waiting += 1;
            });
            function.metrics.queue_depth.inc();
            let mut place = Waiting {
                receiver,
                function,
                pools: self,
            };
            waited = true;
            let woken = shared.wake.notified();
            let starving = (refused == Refused::NodeFull).then(|| shared.budget.starve());
            let freed = shared.budget.freed();
            let recheck = if refused == Refused::RateLimited {
                RECHECK.min(Duration::from_nanos(shared.scale_up_interval_ns))
            } else {
                RECHECK
            };
            let outcome = tokio::select! {
                handed = &mut place.receiver => Ok(handed.ok()),
                _ = woken => Ok(None),
                _ = freed, if starving.is_some() => Ok(None),
                _ = tokio::time::sleep(recheck) => Ok(None),
                _ = tokio::time::sleep_until(deadline) => Err(()),
            };
            drop(starving);
            // Handed an instance while woken for another reason: take it.
            let outcome = match outcome {
                Ok(None) | Err(()) => place.take().map_or(outcome, |warm| Ok(Some(warm))),
                handed => handed,
            };
            drop(place);
            match outcome {
                Ok(Some(share)) => {
                    observe_wait(true);
                    return Ok(share);
                }
                Ok(None) => {}
                Err(()) => {
                    observe_wait(true);
                    let why = if refused == Refused::NodeFull {
                        Shed::NodeFull
                    } else {
                        Shed::QueueTimeout
                    };
                    return Err(AcquireError::Shed(why));
                }
            }
        }
    }

    /// Reserves a slot for a new instance of `function`: under its `max`, within the node
    /// budget (evicting this thread's coldest idle instance if `evict` and the node is
    /// full) and its scale-up rate. Returns the bytes accounted for it.
    fn reserve(&self, function: &Arc<DeployedFunction>, evict: bool) -> Result<usize, Refused> {
        self.reserve_below(function, usize::MAX, evict)
    }

    fn reserve_below(
        &self,
        function: &Arc<DeployedFunction>,
        limit: usize,
        evict: bool,
    ) -> Result<usize, Refused> {
        let shared = &function.pool;
        if shared.is_retired() || !shared.try_reserve_below(limit) {
            return Err(Refused::AtMax);
        }
        let bytes = shared.expected_bytes();
        loop {
            match shared.budget.try_admit(bytes) {
                Ok(()) => break,
                Err(Full::Instances | Full::Memory)
                    if evict && self.evict_coldest(Some(function.id)) => {}
                Err(_) => {
                    shared.cancel_reservation();
                    return Err(Refused::NodeFull);
                }
            }
        }
        if !shared.try_scale_up(Instant::now()) {
            shared.budget.cancel(bytes);
            shared.cancel_reservation();
            return Err(Refused::RateLimited);
        }
        Ok(bytes)
    }

    /// Drops the idle instance on this thread that has idled longest, of a function other
    /// than `except`, above that function's `min`. `false` if there is none.
    fn evict_coldest(&self, except: Option<u64>) -> bool {
        let mut pools = self.pools.borrow_mut();
        let coldest = pools
            .values()
            .filter(|pool| {
                Some(pool.function.id) != except
                    && !pool.idle.is_empty()
                    && pool.function.pool.live() > pool.function.config.min as usize
            })
            .min_by_key(|pool| pool.idle[0].1)
            .map(|pool| pool.function.id);
        let Some(pool) = coldest.and_then(|id| pools.get_mut(&id)) else {
            return false;
        };
        let (warm, _) = pool.idle.remove(0);
        let function = pool.function.clone();
        pool.publish();
        drop(pools);
        drop_instance(&function, warm, ScaleDown::Evicted);
        true
    }

    /// Takes back a share of an instance: to a waiter; when no call holds the instance any
    /// more, to the node (if calls wait elsewhere) or to the idle list; broken or retired
    /// instances are dropped when their last call ends.
    fn release(&self, function: &Arc<DeployedFunction>, warm: Rc<Warm>, returned: Returned) {
        let shared = &function.pool;
        let unusable = if warm.instance.is_broken() {
            Some(ScaleDown::Broken)
        } else if shared.is_retired() {
            Some(ScaleDown::Retired)
        } else {
            None
        };
        if unusable.is_none() {
            // Re-account the heap only when it moved by a page or more: the node-wide
            // counters are shared by every worker, and most calls leave a little garbage.
            let measured = warm.instance.used_memory();
            let bytes = warm.bytes.get();
            if measured.abs_diff(bytes) >= RESIZE_STEP {
                shared.budget.resize(bytes, measured);
                warm.bytes.set(measured);
            }
        }
        let dropped = self.with_pool(function, |pool| {
            if returned == Returned::CallEnded {
                pool.scaler.call_ended();
            }
            let unheld = returned == Returned::New || pool.unlend(&warm, unusable.is_none());
            if let Some(why) = unusable {
                return unheld.then_some((warm, why));
            }
            if pool.serve_waiters(&warm) || !unheld {
                return None;
            }
            let waiting_elsewhere = shared.waiting.load(Ordering::Acquire) > pool.waiting;
            if waiting_elsewhere || shared.budget.starving() > 0 {
                // Calls wait on another thread, or for node budget: free the slot for them.
                // (Calls waiting here between wake-ups find this instance idle when they
                // retry.)
                return Some((warm, ScaleDown::Rebalance));
            }
            pool.idle.push((warm, Instant::now()));
            None
        });
        if let Some((warm, why)) = dropped {
            drop_instance(function, warm, why);
        }
    }

    /// The autoscaler's fast pass (every [`TICK`]): evaluates the functions with recent
    /// traffic on this thread, pre-warms what they need and gives idle instances to calls
    /// starving for node budget elsewhere.
    pub async fn tick(self: &Rc<Self>, engine: &Engine, now: Instant) {
        let ids = std::mem::take(&mut *self.ticking.borrow_mut());
        let mut prewarm = Vec::new();
        {
            let mut pools = self.pools.borrow_mut();
            let mut still = self.ticking.borrow_mut();
            for id in ids {
                let Some(pool) = pools.get_mut(&id) else {
                    continue;
                };
                let count = pool.evaluate(now);
                if count > 0 {
                    prewarm.push((pool.function.clone(), count));
                }
                if pool.needs_tick() {
                    still.push(id);
                } else {
                    pool.ticking = false;
                }
            }
        }
        self.give_to_starving();
        for (function, count) in prewarm {
            self.prewarm(engine, &function, count, ScaleUp::Prewarm, usize::MAX)
                .await;
        }
    }

    /// While calls starve for node budget, evicts this thread's coldest idle instances.
    fn give_to_starving(&self) {
        for _ in 0..self.budget.starving() {
            if !self.evict_coldest(None) {
                return;
            }
        }
    }

    /// Creates up to `count` instances of `function` (while under `limit` live on the node)
    /// and makes them available; stops at the first refusal or failure.
    async fn prewarm(
        &self,
        engine: &Engine,
        function: &Arc<DeployedFunction>,
        count: u32,
        why: ScaleUp,
        limit: usize,
    ) {
        for _ in 0..count {
            let Ok(bytes) = self.reserve_below(function, limit, false) else {
                return;
            };
            match cold_start(engine, function, bytes, why, INIT_REQUEST_ID).await {
                Ok(warm) => self.release(function, warm, Returned::New),
                Err(error) => {
                    function.metrics.error(error.kind());
                    tracing::warn!(function = %function.name, %error, "pre-warming an instance failed");
                    return;
                }
            }
        }
        self.with_pool(function, LocalPool::publish);
    }

    /// The slow pass (every second, all functions on this thread): brings every scaler up
    /// to date, so idle graces expire and functions fall to `min` without traffic; drops
    /// the pools of retired versions and of functions with nothing left here.
    pub fn sweep(&self, now: Instant) {
        let mut pools = self.pools.borrow_mut();
        pools.retain(|_, pool| {
            if !pool.ticking {
                pool.evaluate(now);
            }
            pool.waiters.retain(|waiter| !waiter.is_closed());
            pool.ticking || !pool.is_empty()
        });
    }

    /// Creates instances of functions below their `min` on the node, one per function per
    /// call, so warm capacity returns after a restart, a deploy or a failure.
    pub async fn keep_warm<'a>(
        &self,
        engine: &Engine,
        functions: impl Iterator<Item = &'a Arc<DeployedFunction>>,
    ) {
        let below_min: Vec<Arc<DeployedFunction>> = functions
            .filter(|f| f.config.min > 0 && f.pool.live() < f.config.min as usize)
            .cloned()
            .collect();
        for function in below_min {
            self.prewarm(
                engine,
                &function,
                1,
                ScaleUp::Min,
                function.config.min as usize,
            )
            .await;
        }
    }
}
