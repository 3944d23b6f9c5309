//! Data-plane worker threads: each runs its own single-threaded tokio runtime, accepts
//! connections from the shared listener, and runs Lua for the requests it accepted.
//!
//! This is nginx's worker model: a request stays on the thread that accepted it, Lua
//! states never cross threads, and the request path shares nothing mutable with other
//! threads but atomics. A long call cannot starve its thread's I/O: the Luau interrupt
//! yields back to the runtime every timeslice (`moontide_runtime::sandbox::TIMESLICE_MS`).
//!
//! The admin API runs elsewhere; when it needs Lua (`invoke`), it sends a [`Job`] to a
//! worker.

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moontide_runtime::Engine;
use tokio::sync::{mpsc, oneshot, watch};

use crate::dataplane::{self, Worker};
use crate::errors::ApiError;
use crate::registry::Registry;

/// Work the admin side hands to a worker.
pub enum Job {
    /// Direct invocation of a function's active version.
    Invoke {
        name: String,
        payload: serde_json::Value,
        request_id: String,
        reply: oneshot::Sender<Result<InvokeOutput, ApiError>>,
    },
}

/// A direct invocation's result.
pub struct InvokeOutput {
    pub version: u64,
    /// The handler's result as JSON text.
    pub body: Vec<u8>,
}

/// Handles to the worker threads.
pub struct Workers {
    jobs: Vec<mpsc::UnboundedSender<Job>>,
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
    pub shutdown: watch::Receiver<bool>,
    pub shutdown_grace: Duration,
}

impl Workers {
    pub fn start(config: WorkerConfig) -> std::io::Result<Workers> {
        config.listener.set_nonblocking(true)?;
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for index in 0..config.count.max(1) {
            let (sender, receiver) = mpsc::unbounded_channel();
            jobs.push(sender);
            let listener = config.listener.try_clone()?;
            let engine = config.engine.clone();
            let registry = config.registry.clone();
            let shutdown = config.shutdown.clone();
            let max_body_bytes = config.max_body_bytes;
            let grace = config.shutdown_grace;
            let thread = std::thread::Builder::new()
                .name(format!("moontide-worker-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(error) => {
                            tracing::error!(%error, "worker runtime failed to start");
                            return;
                        }
                    };
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&runtime, async move {
                        let worker = Rc::new(Worker::new(engine, registry, max_body_bytes));
                        run_worker(worker, listener, receiver, shutdown, grace).await;
                    });
                })?;
            threads.push(thread);
        }
        Ok(Workers {
            jobs,
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

    /// Waits for every worker thread to finish (after shutdown was signalled).
    pub fn join(&self) {
        let threads = std::mem::take(&mut *self.threads.lock());
        for thread in threads {
            let _ = thread.join();
        }
    }
}

async fn run_worker(
    worker: Rc<Worker>,
    listener: std::net::TcpListener,
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
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();

    let reaper = {
        let worker = worker.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                worker.pools.reap(Instant::now());
                worker.keep_warm().await;
            }
        })
    };

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    dataplane::serve_connection(&worker, stream, remote, &graceful);
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
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("calls still in flight after the shutdown grace period; closing");
    }
    reaper.abort();
}
