//! The data plane: HTTP/1.1 and HTTP/2 (hyper) on the worker threads. Every function
//! answers at `/fn/{name}` (and `/fn/{name}/...`), and at its configured route; the probes
//! `/healthz` and `/readyz` answer here too.
//!
//! The request path: a per-thread cached load of the snapshot (no lock), a hash lookup of
//! the function, a body read bounded in size, an instance from the thread's pool, the
//! call, the response. Failures become JSON errors carrying the request id; the details go
//! to the function's log, never to the client.

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, Cache};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use moontide_runtime::{CallError, Engine, HttpRequest, InstanceError};

use crate::errors::ApiError;
use crate::pool::{AcquireError, LocalPools};
use crate::registry::{DeployedFunction, Registry, Snapshot};
use crate::worker::{InvokeOutput, Job};

static REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// One worker thread's request-serving state.
pub struct Worker {
    engine: Engine,
    registry: Arc<Registry>,
    snapshot: RefCell<Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>>,
    pub pools: Rc<LocalPools>,
    max_body_bytes: usize,
    id_prefix: u64,
    id_counter: Cell<u64>,
    builder: hyper_util::server::conn::auto::Builder<LocalExecutor>,
}

/// Runs hyper's HTTP/2 stream tasks on this thread (they hold `!Send` Lua futures).
#[derive(Clone, Copy)]
pub struct LocalExecutor;

impl<F> hyper::rt::Executor<F> for LocalExecutor
where
    F: std::future::Future + 'static,
{
    fn execute(&self, future: F) {
        tokio::task::spawn_local(future);
    }
}

impl Worker {
    pub fn new(engine: Engine, registry: Arc<Registry>, max_body_bytes: usize) -> Worker {
        let mut builder = hyper_util::server::conn::auto::Builder::new(LocalExecutor);
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(std::time::Duration::from_secs(30));
        builder.http2().timer(TokioTimer::new());
        Worker {
            snapshot: RefCell::new(Cache::new(registry.cell())),
            engine,
            registry,
            pools: Rc::new(LocalPools::default()),
            max_body_bytes,
            id_prefix: rand::random::<u64>() & 0xffff_ffff_ffff,
            id_counter: Cell::new(0),
            builder,
        }
    }

    fn function(&self, name: &str) -> Option<Arc<DeployedFunction>> {
        self.snapshot
            .borrow_mut()
            .load()
            .functions
            .get(name)
            .cloned()
    }

    /// An id for a request: the client's `x-request-id` if it is sane, else a new one.
    fn request_id(&self, given: Option<&HeaderValue>) -> String {
        if let Some(value) = given
            && let Ok(text) = value.to_str()
            && !text.is_empty()
            && text.len() <= 128
            && text.bytes().all(|b| b.is_ascii_graphic())
        {
            return text.to_string();
        }
        let n = self.id_counter.get().wrapping_add(1);
        self.id_counter.set(n);
        format!("{:012x}{:08x}", self.id_prefix, n)
    }

    async fn handle(
        self: Rc<Self>,
        request: Request<Incoming>,
        peer_ip: Rc<str>,
    ) -> Response<Full<Bytes>> {
        match request.uri().path() {
            "/healthz" => return plain(StatusCode::OK, "ok\n"),
            "/readyz" if self.registry.is_ready() => return plain(StatusCode::OK, "ready\n"),
            "/readyz" => return plain(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
            _ => {}
        }
        let request_id = self.request_id(request.headers().get(&REQUEST_ID));
        let mut response = self.call_function(request, &peer_ip, &request_id).await;
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID.clone(), value);
        }
        response
    }

    async fn call_function(
        &self,
        request: Request<Incoming>,
        source_ip: &str,
        request_id: &str,
    ) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path();
        let Some((function, resource, proxy)) = self.resolve(path) else {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no function serves {path}"),
            )
            .to_response();
        };
        let started = Instant::now();
        function.metrics.http_requests.inc();
        let body = match Limited::new(body, self.max_body_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => {
                let too_large = error
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
                return if too_large {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!("request body is larger than {} bytes", self.max_body_bytes),
                    )
                    .to_response()
                } else {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        "could not read the request body",
                    )
                    .to_response()
                };
            }
        };
        let mut lease = match self.pools.acquire(&self.engine, &function).await {
            Ok(lease) => lease,
            Err(error) => {
                let error = acquire_failure(&function, error, request_id);
                return error.to_response();
            }
        };
        let path_parameters = [("proxy", proxy)];
        let protocol = match parts.version {
            http::Version::HTTP_2 => "HTTP/2.0",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        let event = HttpRequest {
            method: parts.method.as_str(),
            path,
            query: parts.uri.query(),
            headers: &parts.headers,
            body: &body,
            source_ip,
            request_id,
            request_time_epoch_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            resource,
            path_parameters: if proxy.is_empty() {
                &[]
            } else {
                &path_parameters
            },
            protocol,
        };
        let result = lease.instance().invoke_http(&event).await;
        drop(lease);
        function
            .metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(output) => {
                let mut response = Response::new(Full::new(output.body));
                *response.status_mut() = output.status;
                *response.headers_mut() = output.headers;
                response
            }
            Err(error) => call_failure(&function, &error, request_id).to_response(),
        }
    }

    /// `/fn/{name}[/rest]` or a configured route → (function, resource, rest of the path).
    fn resolve<'p>(&self, path: &'p str) -> Option<(Arc<DeployedFunction>, &'static str, &'p str)> {
        if let Some(rest) = path.strip_prefix("/fn/") {
            let (name, proxy) = rest.split_once('/').unwrap_or((rest, ""));
            let function = self.function(name)?;
            let resource = if proxy.is_empty() {
                "/fn/{name}"
            } else {
                "/fn/{name}/{proxy+}"
            };
            return Some((function, resource, proxy));
        }
        let mut cache = self.snapshot.borrow_mut();
        let snapshot = cache.load();
        let function = snapshot.route(path)?.clone();
        let route = function.config.route.as_deref().unwrap_or_default();
        let proxy = path[route.len()..].trim_start_matches('/');
        Some((function, "/{proxy+}", proxy))
    }

    /// Brings functions with a `min` back to it (see `LocalPools::keep_warm`).
    pub async fn keep_warm(&self) {
        let snapshot = self.registry.snapshot();
        self.pools
            .keep_warm(&self.engine, snapshot.functions.values())
            .await;
    }

    /// Runs an admin-side job on this thread.
    pub async fn run_job(self: Rc<Self>, job: Job) {
        match job {
            Job::Invoke {
                name,
                payload,
                request_id,
                reply,
            } => {
                let result = self.invoke(&name, &payload, &request_id).await;
                let _ = reply.send(result);
            }
        }
    }

    async fn invoke(
        &self,
        name: &str,
        payload: &serde_json::Value,
        request_id: &str,
    ) -> Result<InvokeOutput, ApiError> {
        let function = self
            .function(name)
            .ok_or_else(|| ApiError::not_found("function", name))?;
        let started = Instant::now();
        function.metrics.invoke_requests.inc();
        let mut lease = self
            .pools
            .acquire(&self.engine, &function)
            .await
            .map_err(|error| acquire_failure(&function, error, request_id))?;
        let result = lease.instance().invoke_json(payload, request_id).await;
        drop(lease);
        function
            .metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(body) => Ok(InvokeOutput {
                version: function.version,
                body,
            }),
            Err(error) => Err(call_failure(&function, &error, request_id)),
        }
    }
}

/// Serves one accepted connection on this thread.
pub fn serve_connection(
    worker: &Rc<Worker>,
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) {
    let service_worker = worker.clone();
    let peer_ip: Rc<str> = Rc::from(remote.ip().to_string());
    let service = hyper::service::service_fn(move |request| {
        let worker = service_worker.clone();
        let peer_ip = peer_ip.clone();
        async move { Ok::<_, Infallible>(worker.handle(request, peer_ip).await) }
    });
    let connection = worker
        .builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    let connection = graceful.watch(connection);
    tokio::task::spawn_local(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connection ended with an error");
        }
    });
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// A failed call as the client sees it (the details are in the function log).
pub fn call_failure(function: &DeployedFunction, error: &CallError, request_id: &str) -> ApiError {
    function.metrics.error(error.kind());
    let details = serde_json::json!({"request_id": request_id, "function": &*function.name});
    match error {
        CallError::Timeout => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "function_timeout",
            "function timed out",
        ),
        CallError::MemoryLimit => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "memory_limit_exceeded",
            "memory limit exceeded",
        ),
        CallError::Runtime(_) | CallError::BadResult(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "function_error",
            format!(
                "function failed; see `moontide logs {}` for request {request_id}",
                function.name
            ),
        ),
    }
    .with_details(details)
}

fn acquire_failure(function: &DeployedFunction, error: AcquireError, request_id: &str) -> ApiError {
    match error {
        AcquireError::Overloaded => {
            function.metrics.error("overloaded");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "function is at its instance limit; retry later",
            )
            .with_details(serde_json::json!({"request_id": request_id}))
        }
        AcquireError::Init(InstanceError::Init(error)) => {
            call_failure(function, &error, request_id)
        }
        AcquireError::Init(error) => {
            function.metrics.error(error.kind());
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "function_init_failed",
                format!(
                    "function could not start; see `moontide logs {}` for request {request_id}",
                    function.name
                ),
            )
            .with_details(serde_json::json!({"request_id": request_id}))
        }
    }
}
