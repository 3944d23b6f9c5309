//! Data-plane worker threads: each runs its own single-threaded tokio runtime, accepts
//! connections from the shared listener, and runs Lua for the requests it accepted.
//!
//! This is nginx's worker model: a request stays on the thread that accepted it, Lua
//! states never cross threads, and the request path shares nothing mutable with other
//! threads but atomics. A long call cannot starve its thread's I/O: the Luau interrupt
//! yields back to the runtime every timeslice (`moontide_runtime::sandbox::TIMESLICE_MS`),
//! and long calls share a thread fairly with short ones (`moontide_runtime`'s long lane).
//!
//! One more thread, the **long-call worker**, runs the calls of functions that proved
//! long-running (see `dataplane`): I/O workers hand it those requests as [`Job::Http`],
//! so a function that holds a thread — even inside a C call, where Luau cannot yield —
//! competes with the I/O threads through the kernel's scheduler rather than stalling them.
//!
//! The admin API runs elsewhere; when it needs Lua (`invoke`), it sends a [`Job`] to a
//! worker.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moontide_runtime::Engine;
use tokio::sync::{mpsc, oneshot, watch};

use crate::dataplane::{OwnedRequest, Role, Worker};
use crate::edge::ClientTimeouts;
use crate::edge::conn_limits::ConnLimits;
use crate::errors::ApiError;
use crate::front;
use crate::pool;
use crate::registry::{DeployedFunction, Registry};
use moontide_runtime::plugin::Phases;
use moontide_runtime::{CompiledFunction, HttpResponse, InstanceError, InstanceSpec};

/// Work handed to a worker by the admin side, or by an I/O worker to the long-call worker.
pub enum Job {
    /// Direct invocation of a function's active version.
    Invoke {
        name: String,
        payload: serde_json::Value,
        request_id: String,
        reply: oneshot::Sender<Result<InvokeOutput, ApiError>>,
    },
    /// An HTTP call of a long-running function (to the long-call worker).
    Http {
        function: Arc<DeployedFunction>,
        request: Box<OwnedRequest>,
        reply: oneshot::Sender<Result<HttpResponse, ApiError>>,
    },
    /// Creates one instance of a unit being deployed — a function version or a plugin —
    /// to check that its init runs and returns what the unit must (a handler, a table of
    /// phases), under the unit's own limits, before the admin API stores it; the instance
    /// is then dropped. Its log lines carry the request id [`DEPLOY_CHECK_ID`]. Sent to the
    /// long-call worker ([`Workers::check_init`]).
    CheckInit {
        compiled: Arc<CompiledFunction>,
        spec: InstanceSpec,
        reply: oneshot::Sender<Result<Phases, InstanceError>>,
    },
}

/// The request id of a deploy's init check in the function's log.
pub const DEPLOY_CHECK_ID: &str = "deploy";
/// The version a deploy's init check runs as (the unit is not a version yet; plugins have
/// none).
pub const DEPLOY_CHECK_VERSION: u64 = 0;

/// A direct invocation's result.
pub struct InvokeOutput {
    pub version: u64,
    /// The handler's result as JSON text.
    pub body: Vec<u8>,
}

/// The long-call worker's nice value (I/O workers keep 0).
pub const LONG_CALL_WORKER_NICE: i32 = 5;

/// Handles to the worker threads.
pub struct Workers {
    jobs: Vec<mpsc::UnboundedSender<Job>>,
    /// The long-call worker's queue. Weak: the worker stops when the I/O workers (which
    /// hold the strong senders) have stopped.
    long_calls: mpsc::WeakUnboundedSender<Job>,
    next: AtomicUsize,
    threads: parking_lot::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// What every worker needs.
pub struct WorkerConfig {
    pub count: usize,
    pub listener: std::net::TcpListener,
    pub engine: Engine,
    pub registry: Arc<Registry>,
    pub max_body_bytes: usize,
    pub timeouts: ClientTimeouts,
    /// The data plane's connection caps (node-wide and per client address).
    pub conn_limits: Arc<ConnLimits>,
    pub shutdown: watch::Receiver<bool>,
    pub shutdown_grace: Duration,
}

impl Workers {
    pub fn start(config: WorkerConfig) -> std::io::Result<Workers> {
        config.listener.set_nonblocking(true)?;
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        let (long_calls, long_call_jobs) = mpsc::unbounded_channel();
        {
            let engine = config.engine.clone();
            let registry = config.registry.clone();
            let max_body_bytes = config.max_body_bytes;
            let timeouts = config.timeouts;
            let grace = config.shutdown_grace;
            threads.push(spawn_worker_thread(
                "moontide-long-calls",
                move || async move {
                    // Linux nice values are per thread: this one only lowers the long-call
                    // worker, so that when it and the I/O workers all want a core, the I/O
                    // workers get about three quarters of it (weights 1024 vs 335).
                    if let Err(error) =
                        rustix::process::setpriority_process(None, LONG_CALL_WORKER_NICE)
                    {
                        tracing::warn!(%error, "could not lower the long-call worker's priority");
                    }
                    let worker = Rc::new(Worker::new(
                        engine,
                        registry,
                        max_body_bytes,
                        timeouts,
                        Role::LongCalls,
                    ));
                    run_long_call_worker(worker, long_call_jobs, grace).await;
                },
            )?);
        }
        for index in 0..config.count.max(1) {
            let (sender, receiver) = mpsc::unbounded_channel();
            jobs.push(sender);
            let listener = config.listener.try_clone()?;
            let engine = config.engine.clone();
            let registry = config.registry.clone();
            let shutdown = config.shutdown.clone();
            let max_body_bytes = config.max_body_bytes;
            let timeouts = config.timeouts;
            let conn_limits = config.conn_limits.clone();
            let grace = config.shutdown_grace;
            let long_calls = long_calls.clone();
            threads.push(spawn_worker_thread(
                &format!("moontide-worker-{index}"),
                move || async move {
                    let role = Role::Io { long_calls };
                    let worker = Rc::new(Worker::new(
                        engine,
                        registry,
                        max_body_bytes,
                        timeouts,
                        role,
                    ));
                    run_worker(worker, listener, conn_limits, receiver, shutdown, grace).await;
                },
            )?);
        }
        let weak_long_calls = long_calls.downgrade();
        drop(long_calls);
        Ok(Workers {
            jobs,
            long_calls: weak_long_calls,
            next: AtomicUsize::new(0),
            threads: parking_lot::Mutex::new(threads),
        })
    }

    /// Sends a job to the next worker (round robin).
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.jobs.len();
        self.jobs[index]
            .send(job)
            .map_err(|_| ApiError::internal("workers are shutting down"))
    }

    /// Sends a deploy's init check ([`Job::CheckInit`]) to the long-call worker: the
    /// thread meant for code that may hold it (niced, no listener), so an init that spins
    /// inside one C call until its timeout stalls no I/O worker's connections.
    pub fn check_init(&self, job: Job) -> Result<(), ApiError> {
        let stopped = || ApiError::internal("workers are shutting down");
        self.long_calls
            .upgrade()
            .ok_or_else(stopped)?
            .send(job)
            .map_err(|_| stopped())
    }

    /// Waits for every worker thread to finish (after shutdown was signalled).
    pub fn join(&self) {
        let threads = std::mem::take(&mut *self.threads.lock());
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Starts a thread running its own single-threaded runtime and `LocalSet` with `main`.
fn spawn_worker_thread<F, Fut>(name: &str, main: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let thread_name = name.to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(error) => {
                    tracing::error!(%error, thread = %thread_name, "worker runtime failed to start");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, main());
        })
}

/// Runs this thread's autoscaler: the fast tick every [`pool::TICK`] (functions with
/// recent traffic), the sweep and `min` keeping every second.
fn spawn_reaper(worker: &Rc<Worker>) -> tokio::task::JoinHandle<()> {
    let worker = worker.clone();
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(pool::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sweep_every = (SWEEP.as_millis() / pool::TICK.as_millis()).max(1) as u64;
        let mut count: u64 = 0;
        loop {
            tick.tick().await;
            let now = Instant::now();
            worker.pools.tick(worker.engine(), now).await;
            count += 1;
            if count.is_multiple_of(sweep_every) {
                worker.pools.sweep(now);
                worker.forget_removed_upstreams();
                worker.keep_warm().await;
            }
        }
    })
}

/// How often every function on a thread is re-evaluated (idle graces, `min`).
const SWEEP: Duration = Duration::from_secs(1);

/// The long-call worker: runs the calls I/O workers hand it. It stops when every I/O
/// worker has stopped (they hold the senders), then lets the calls in flight finish,
/// bounded by the grace period.
async fn run_long_call_worker(
    worker: Rc<Worker>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    grace: Duration,
) {
    let reaper = spawn_reaper(&worker);
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => {
                    let worker = worker.clone();
                    in_flight.spawn_local(async move { worker.run_job(job).await });
                }
                None => break,
            },
            Some(_) = in_flight.join_next() => {}
        }
    }
    let drained = async { while in_flight.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!("long calls still in flight after the shutdown grace period; closing");
    }
    reaper.abort();
}

async fn run_worker(
    worker: Rc<Worker>,
    listener: std::net::TcpListener,
    conn_limits: Arc<ConnLimits>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!(%error, "worker could not use the listener");
            return;
        }
    };
    // Connections hyper serves finish through `graceful`; those the front serves are told
    // to stop through `stop_front` and are waited for by its closing.
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let (stop_front, _) = watch::channel(());

    let reaper = spawn_reaper(&worker);

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let guard = match conn_limits.admit(remote.ip()) {
                        Ok(guard) => guard,
                        Err(refusal) => {
                            conn_limits.refuse(stream, refusal);
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    front::serve_connection(
                        &worker,
                        stream,
                        remote,
                        guard,
                        graceful.watcher(),
                        stop_front.subscribe(),
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(job) = jobs.recv() => {
                let worker = worker.clone();
                tokio::task::spawn_local(async move { worker.run_job(job).await });
            }
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    drop(listener);
    // Let the calls in flight finish, bounded by the grace period.
    let _ = stop_front.send(());
    let drained = async {
        stop_front.closed().await;
        graceful.shutdown().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!("calls still in flight after the shutdown grace period; closing");
    }
    reaper.abort();
}
