//! The data plane: HTTP/1.1 and HTTP/2 (hyper) on the worker threads, for every request
//! the front (`crate::front`) does not proxy itself. Every function answers at
//! `/fn/{name}` (and `/fn/{name}/...`), and at its configured route; the probes
//! `/healthz` and `/readyz` answer here too.
//!
//! The request path: a per-thread cached load of the snapshot (no lock), a hash lookup of
//! the function, a body read bounded in size, an instance from the thread's pool, the
//! call, the response. Failures become JSON errors carrying the request id; the details go
//! to the function's log, never to the client. A gateway route with plugins goes through
//! `gateway::plugins` around its target (request phases, filters, logs). A function's or
//! a plugin's response reaches hyper without framing headers (`moontide_runtime::contract`
//! drops them, a filter cannot change them): hyper frames every answer from its body, so
//! tenant code cannot split, forge or swallow responses on a keep-alive connection.
//!
//! Calls of *long-running* functions — one of their calls used more than [`LONG_CALL`] of
//! CPU past its first timeslice, or hit the blocking cap — are not run on the connection's thread but handed to the long-call
//! worker ([`Role::LongCalls`]), so a CPU-heavy or hostile function competes with the
//! I/O threads through the kernel's scheduler instead of stalling them: Luau can yield
//! from its interrupt only in Lua code, not inside a C function such as `string.find` or
//! `table.sort`. A call still running inline is capped at [`INLINE_BLOCKING_CAP`] without
//! yielding; past that it ends (`503`, kind `blocking`) and its function is marked.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, Cache};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use moontide_runtime::plugin::{Phase, PluginRequest, PluginResponse};
use moontide_runtime::{CallError, Engine, HttpRequest, HttpResponse, Instance, InstanceError};
use tokio::sync::{mpsc, oneshot};

use crate::edge::ClientTimeouts;
use crate::edge::conn_limits::ConnGuard;
use crate::edge::timed_body::{self, TimedBody};
use crate::errors::ApiError;
use crate::gateway::Route;
use crate::gateway::client::{self, UpstreamBody};
use crate::gateway::config::RouteTarget;
use crate::gateway::plugins::Chain;
use crate::gateway::proxy::{Downstream, Exchange, LocalUpstreams, upgrade_protocol};
use crate::metrics::Shed;
use crate::pool::{AcquireError, LocalPools};
use crate::registry::{DeployedFunction, Registry, Snapshot};
use crate::worker::{DEPLOY_CHECK_ID, InvokeOutput, Job};

/// A response body: a function's (whole) or an upstream's (streamed, with a timeout on
/// each wait for more).
pub type ResponseBody = Either<Full<Bytes>, UpstreamBody>;

static REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// CPU time a call may use after its first timeslice before its function counts as
/// long-running (`CallStats::cpu_after_first_slice`: measured in thread CPU time, so a
/// short call the kernel preempted does not count).
pub const LONG_CALL: Duration = Duration::from_millis(2 * moontide_runtime::sandbox::TIMESLICE_MS);

/// Longest an inline call may hold an I/O thread without yielding.
pub const INLINE_BLOCKING_CAP: Duration = Duration::from_millis(100);

/// What a worker thread is for.
pub enum Role {
    /// Accepts connections and runs calls inline, except those of long-running functions,
    /// which go to the long-call worker through `long_calls`.
    Io {
        long_calls: mpsc::UnboundedSender<Job>,
    },
    /// Runs the calls of long-running functions (no listener, no blocking cap).
    LongCalls,
}

/// A request handed to another thread: owns what the event borrows.
pub struct OwnedRequest {
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: Bytes,
    source_ip: Arc<str>,
    request_id: String,
    request_time_epoch_ms: u64,
    resource: Cow<'static, str>,
    /// Where the `proxy` path parameter starts in the path.
    proxy_at: usize,
    /// Path parameters a gateway route captured (`:id`, a named rest); when empty, the
    /// `proxy` parameter is the rest of the path.
    params: Vec<(String, String)>,
    protocol: &'static str,
}

impl OwnedRequest {
    fn proxy(&self) -> &str {
        &self.uri.path()[self.proxy_at..]
    }

    /// The event's view of the request; `parameters` holds the path parameters (see
    /// [`OwnedRequest::path_parameters`]).
    fn event<'a>(&'a self, parameters: &'a [(&'a str, &'a str)]) -> HttpRequest<'a> {
        HttpRequest {
            method: self.method.as_str(),
            path: self.uri.path(),
            query: self.uri.query(),
            headers: &self.headers,
            body: &self.body,
            source_ip: &self.source_ip,
            request_id: &self.request_id,
            request_time_epoch_ms: self.request_time_epoch_ms,
            resource: &self.resource,
            path_parameters: if self.proxy().is_empty() && self.params.is_empty() {
                &[]
            } else {
                parameters
            },
            protocol: self.protocol,
        }
    }

    fn path_parameters(&self) -> Vec<(&str, &str)> {
        if self.params.is_empty() {
            vec![("proxy", self.proxy())]
        } else {
            self.params
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect()
        }
    }
}

/// Whether a client's `x-request-id` is used as the request's id (else a new one is made):
/// 1 to 128 visible ASCII characters.
pub(crate) fn is_sane_request_id(given: &[u8]) -> bool {
    !given.is_empty() && given.len() <= 128 && given.iter().all(|b| b.is_ascii_graphic())
}

/// One worker thread's request-serving state.
pub struct Worker {
    engine: Engine,
    registry: Arc<Registry>,
    snapshot: RefCell<Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>>,
    pub pools: Rc<LocalPools>,
    /// This thread's upstream clients and balancer state.
    upstreams: LocalUpstreams,
    max_body_bytes: usize,
    timeouts: ClientTimeouts,
    id_prefix: u64,
    id_counter: Cell<u64>,
    builder: hyper_util::server::conn::auto::Builder<LocalExecutor>,
    role: Role,
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
    pub fn new(
        engine: Engine,
        registry: Arc<Registry>,
        max_body_bytes: usize,
        timeouts: ClientTimeouts,
        role: Role,
    ) -> Worker {
        let builder = connection_builder_with(timeouts.head);
        Worker {
            pools: Rc::new(LocalPools::new(registry.budget.clone())),
            upstreams: LocalUpstreams::default(),
            snapshot: RefCell::new(Cache::new(registry.cell())),
            engine,
            registry,
            max_body_bytes,
            timeouts,
            id_prefix: rand::random::<u64>() & 0xffff_ffff_ffff,
            id_counter: Cell::new(0),
            builder,
            role,
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The long-call worker's queue, if `function`'s calls belong there and this thread
    /// is not it.
    fn long_call_queue(&self, function: &DeployedFunction) -> Option<&mpsc::UnboundedSender<Job>> {
        match &self.role {
            Role::Io { long_calls } if function.is_long_running() => Some(long_calls),
            _ => None,
        }
    }

    fn blocking_cap(&self) -> Option<Duration> {
        match self.role {
            Role::Io { .. } => Some(INLINE_BLOCKING_CAP),
            Role::LongCalls => None,
        }
    }

    /// Marks `function` long-running if its last call used the CPU past [`LONG_CALL`] or
    /// hit the blocking cap.
    fn note_call_cost<T>(
        &self,
        function: &DeployedFunction,
        stats: moontide_runtime::CallStats,
        result: &Result<T, CallError>,
    ) {
        let long = stats.cpu_after_first_slice >= LONG_CALL
            || matches!(result, Err(CallError::Blocking(_)));
        if long && function.mark_long_running() {
            tracing::info!(
                function = %function.name,
                running_ms = stats.running.as_millis() as u64,
                "function is long-running: its calls now run on the long-call worker"
            );
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
            && is_sane_request_id(value.as_bytes())
            && let Ok(text) = value.to_str()
        {
            return text.to_string();
        }
        let id = self.new_request_id();
        String::from_utf8_lossy(&id).into_owned()
    }

    /// A new request id: this worker's random prefix and a counter, 20 hex digits.
    pub(crate) fn new_request_id(&self) -> [u8; 20] {
        let n = self.id_counter.get().wrapping_add(1);
        self.id_counter.set(n);
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut id = [0u8; 20];
        for (i, slot) in id[..12].iter_mut().enumerate() {
            *slot = DIGITS[((self.id_prefix >> (4 * (11 - i))) & 0xf) as usize];
        }
        for (i, slot) in id[12..].iter_mut().enumerate() {
            *slot = DIGITS[((n >> (4 * (7 - i))) & 0xf) as usize];
        }
        id
    }

    /// The serving snapshot, through this thread's cache (no lock).
    pub(crate) fn current_snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow_mut().load().clone()
    }

    pub(crate) fn upstreams(&self) -> &LocalUpstreams {
        &self.upstreams
    }

    pub(crate) fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    pub(crate) fn timeouts(&self) -> ClientTimeouts {
        self.timeouts
    }

    async fn handle(
        self: Rc<Self>,
        mut request: Request<Incoming>,
        peer_ip: Arc<str>,
    ) -> Response<ResponseBody> {
        if let Err(mut refused) = admit_at_edge(&mut request) {
            let id = self.request_id(request.headers().get(&REQUEST_ID));
            set_request_id(&mut refused, HeaderValue::from_str(&id).ok());
            return refused.map(Either::Left);
        }
        match request.uri().path() {
            "/healthz" => return plain(StatusCode::OK, "ok\n").map(Either::Left),
            "/readyz" if self.registry.is_ready() => {
                return plain(StatusCode::OK, "ready\n").map(Either::Left);
            }
            "/readyz" => {
                return plain(StatusCode::SERVICE_UNAVAILABLE, "not ready\n").map(Either::Left);
            }
            _ => {}
        }
        let request_id = self.request_id(request.headers().get(&REQUEST_ID));
        // The header is made first so that the id itself can move into the call.
        let id_header = HeaderValue::from_str(&request_id).ok();
        let mut response = self.serve(request, &peer_ip, request_id).await;
        set_request_id(&mut response, id_header);
        response
    }

    /// Routes a request: `/fn/{name}`, then the gateway's routes, then functions' own
    /// `route` prefixes.
    async fn serve(
        &self,
        request: Request<Incoming>,
        source_ip: &Arc<str>,
        request_id: String,
    ) -> Response<ResponseBody> {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path();
        if !path.starts_with("/fn/") {
            let snapshot = self.snapshot.borrow_mut().load().clone();
            // An absolute-form target's (or HTTP/2's `:authority`) authority is the host
            // (RFC 9112 §3.2.2), else the `Host` header.
            let host = parts.uri.authority().map(|a| a.as_str()).or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
            });
            let routed = snapshot
                .gateway
                .router
                .find(&moontide_gateway::router::Request {
                    host,
                    method: &parts.method,
                    path,
                    query: parts.uri.query(),
                    headers: &parts.headers,
                });
            if let Some(found) = routed {
                let route = found.value.clone();
                let proxy_at = path.len() - found.rest.len();
                // Path parameters and the pattern are for functions and plugins; a plain
                // proxied route skips building them.
                let wants_params =
                    !route.plugins.is_empty() || matches!(route.target, RouteTarget::Function(_));
                let (params, pattern): (Vec<(String, String)>, String) = if wants_params {
                    let params = found
                        .params
                        .iter()
                        .map(|(name, value)| (name.to_string(), value.clone()))
                        .collect();
                    (params, found.pattern.to_string())
                } else {
                    (Vec::new(), String::new())
                };
                let body = match self.read_body(body).await {
                    Ok(body) => body,
                    Err(response) => return response.map(Either::Left),
                };
                if !route.plugins.is_empty() {
                    let target = Target {
                        route: &route,
                        resource: pattern,
                        proxy_at,
                    };
                    return self
                        .serve_with_plugins(
                            &snapshot, target, params, parts, body, source_ip, request_id,
                        )
                        .await;
                }
                return match &route.target {
                    RouteTarget::Upstream(name) => {
                        let Some(upstream) = snapshot.gateway.upstreams.get(name.as_str()).cloned()
                        else {
                            return missing_target(&route.name, "upstream", name);
                        };
                        self.proxy(&upstream, parts, body, source_ip).await
                    }
                    RouteTarget::Function(name) => {
                        let Some(function) = snapshot.functions.get(name.as_str()).cloned() else {
                            return missing_target(&route.name, "function", name);
                        };
                        self.call_function(
                            function,
                            Cow::Owned(pattern),
                            proxy_at,
                            params,
                            parts,
                            body,
                            source_ip,
                            request_id,
                        )
                        .await
                        .map(Either::Left)
                    }
                };
            }
        }
        let Some((function, resource, proxy)) = self.resolve(path) else {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no function or route serves {path}"),
            )
            .to_response()
            .map(Either::Left);
        };
        let proxy_at = path.len() - proxy.len();
        let body = match self.read_body(body).await {
            Ok(body) => body,
            Err(response) => return response.map(Either::Left),
        };
        self.call_function(
            function,
            Cow::Borrowed(resource),
            proxy_at,
            Vec::new(),
            parts,
            body,
            source_ip,
            request_id,
        )
        .await
        .map(Either::Left)
    }

    /// Forwards a request to an upstream (see `gateway::proxy`).
    async fn proxy(
        &self,
        upstream: &crate::gateway::proxy::Upstream,
        parts: http::request::Parts,
        body: Bytes,
        source_ip: &Arc<str>,
    ) -> Response<ResponseBody> {
        let mut parts = parts;
        let upgrade = upgrade_protocol(&parts).map(<[u8]>::to_vec);
        let client_upgrade = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<OnUpgrade>());
        let downstream = Downstream {
            client_ip: source_ip,
            scheme: "http",
            upgrade: upgrade.as_deref(),
        };
        let mut exchange = Exchange::default();
        let connection = match self
            .upstreams
            .forward(upstream, &parts, &body, &downstream, &mut exchange)
            .await
        {
            Ok(connection) => connection,
            Err(error) => {
                return ApiError::new(error.status(), "upstream", error.message())
                    .to_response()
                    .map(Either::Left);
            }
        };
        let read_timeout = Duration::from_millis(upstream.config.read_timeout_ms);
        let response =
            client::into_response(exchange.response, &exchange.head, connection, read_timeout);
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return response.map(Either::Right);
        }
        let (parts, mut body) = response.into_parts();
        let (Some(client_upgrade), Some((stream, early))) = (client_upgrade, body.take_upgraded())
        else {
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream",
                "the upstream switched protocols for a request that did not ask to",
            )
            .to_response()
            .map(Either::Left);
        };
        tokio::task::spawn_local(bridge_upgraded(client_upgrade, stream, early));
        Response::from_parts(parts, Either::Left(Full::default()))
    }

    /// The request body, whole, within the size limit; or the error response. Each wait
    /// for more of the body is bounded by the body timeout (`edge::timed_body`): a client
    /// that stops sending is answered `408` and its connection closed. A body that says
    /// up front it is over the limit (`Content-Length`) is answered `413` without waiting
    /// for it; both answers close the connection, since the body was not read to its end.
    async fn read_body(&self, body: Incoming) -> Result<Bytes, Response<Full<Bytes>>> {
        let too_large = || {
            let mut response = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body is larger than {} bytes", self.max_body_bytes),
            )
            .to_response();
            close_after(&mut response);
            response
        };
        if body.size_hint().lower() > self.max_body_bytes as u64 {
            return Err(too_large());
        }
        let timed = TimedBody::new(body, self.timeouts.body);
        match Limited::new(timed, self.max_body_bytes).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error) => {
                if error
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some()
                {
                    return Err(too_large());
                }
                let mut response = if timed_body::is_timeout(error.as_ref()) {
                    ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "body_timeout",
                        format!(
                            "no more of the request body arrived within {} ms",
                            self.timeouts.body.as_millis()
                        ),
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
                close_after(&mut response);
                Err(response)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn call_function(
        &self,
        function: Arc<DeployedFunction>,
        resource: Cow<'static, str>,
        proxy_at: usize,
        params: Vec<(String, String)>,
        parts: http::request::Parts,
        body: Bytes,
        source_ip: &Arc<str>,
        request_id: String,
    ) -> Response<Full<Bytes>> {
        let started = Instant::now();
        function.metrics.http_requests.inc();
        let request = OwnedRequest {
            method: parts.method,
            uri: parts.uri,
            headers: parts.headers,
            body,
            source_ip: source_ip.clone(),
            request_id,
            request_time_epoch_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            resource,
            proxy_at,
            params,
            protocol: match parts.version {
                http::Version::HTTP_2 => "HTTP/2.0",
                http::Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
        };
        let result = match self.long_call_queue(&function) {
            Some(queue) => {
                function.metrics.long_calls.inc();
                let (reply, answer) = oneshot::channel();
                let job = Job::Http {
                    function: function.clone(),
                    request: Box::new(request),
                    reply,
                };
                match queue.send(job) {
                    Ok(()) => answer.await.unwrap_or_else(|_| {
                        Err(ApiError::internal("the long-call worker stopped"))
                    }),
                    Err(_) => Err(ApiError::internal("the long-call worker stopped")),
                }
            }
            None => self.run_http(&function, &request).await,
        };
        function
            .metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(output) => function_response(output),
            Err(error) => error.to_response(),
        }
    }

    /// Serves a request on a route with plugins (see `gateway::plugins`): request phases,
    /// the target with the request as the plugins left it, the filters, then the logs.
    #[allow(clippy::too_many_arguments)]
    async fn serve_with_plugins(
        &self,
        snapshot: &Snapshot,
        target: Target<'_>,
        params: Vec<(String, String)>,
        mut parts: http::request::Parts,
        body: Bytes,
        source_ip: &Arc<str>,
        request_id: String,
    ) -> Response<ResponseBody> {
        let chain = match Chain::start(
            &self.pools,
            &self.engine,
            snapshot,
            target.route,
            &request_id,
            self.blocking_cap(),
        )
        .await
        {
            Ok(chain) => chain,
            Err(error) => return error.to_response().map(Either::Left),
        };
        let original_path = parts.uri.path().to_string();
        let mut request = PluginRequest {
            method: parts.method.clone(),
            path: original_path.clone(),
            query: parts.uri.query().map(str::to_string),
            headers: std::mem::take(&mut parts.headers),
            body,
            client_ip: source_ip.to_string(),
            params,
        };
        let (response, seen) = match chain.request_phases(&mut request).await {
            Ok(Some(ended)) => {
                let seen = PluginResponse {
                    status: ended.status,
                    headers: ended.headers.clone(),
                    body: Some(ended.body.clone()),
                };
                (function_response(ended).map(Either::Left), seen)
            }
            Err(error) => {
                let response = error.to_response();
                let seen = PluginResponse {
                    status: error.status,
                    headers: response.headers().clone(),
                    body: None,
                };
                (response.map(Either::Left), seen)
            }
            Ok(None) => {
                let proxy_at = if request.path == original_path {
                    target.proxy_at
                } else {
                    request.path.len()
                };
                let response = self
                    .send_to_target(
                        snapshot,
                        &target,
                        proxy_at,
                        &request,
                        parts,
                        source_ip,
                        &request_id,
                    )
                    .await;
                self.filter_response(&chain, response).await
            }
        };
        chain.log(request, seen);
        response
    }

    /// The route's target, sent the request as the plugins left it.
    #[allow(clippy::too_many_arguments)]
    async fn send_to_target(
        &self,
        snapshot: &Snapshot,
        target: &Target<'_>,
        proxy_at: usize,
        request: &PluginRequest,
        mut parts: http::request::Parts,
        source_ip: &Arc<str>,
        request_id: &str,
    ) -> Response<ResponseBody> {
        let mut uri = http::Uri::builder();
        if let Some(scheme) = parts.uri.scheme() {
            uri = uri.scheme(scheme.clone());
        }
        if let Some(authority) = parts.uri.authority() {
            uri = uri.authority(authority.clone());
        }
        match uri.path_and_query(request.path_and_query()).build() {
            Ok(uri) => parts.uri = uri,
            Err(_) => {
                return ApiError::internal("a plugin left an invalid request path")
                    .to_response()
                    .map(Either::Left);
            }
        }
        parts.method = request.method.clone();
        parts.headers = request.headers.clone();
        let route = target.route;
        match &route.target {
            RouteTarget::Upstream(name) => {
                let Some(upstream) = snapshot.gateway.upstreams.get(name.as_str()).cloned() else {
                    return missing_target(&route.name, "upstream", name);
                };
                self.proxy(&upstream, parts, request.body.clone(), source_ip)
                    .await
            }
            RouteTarget::Function(name) => {
                let Some(function) = snapshot.functions.get(name.as_str()).cloned() else {
                    return missing_target(&route.name, "function", name);
                };
                self.call_function(
                    function,
                    Cow::Owned(target.resource.clone()),
                    proxy_at,
                    request.params.clone(),
                    parts,
                    request.body.clone(),
                    source_ip,
                    request_id.to_string(),
                )
                .await
                .map(Either::Left)
            }
        }
    }

    /// Runs the header and body filters on the target's response; also returns the
    /// response as the `log` phase sees it. With a `body_filter` on the route, the body is
    /// read whole (up to the body size limit) and the filters get it as one string.
    async fn filter_response(
        &self,
        chain: &Chain,
        response: Response<ResponseBody>,
    ) -> (Response<ResponseBody>, PluginResponse) {
        let (parts, body) = response.into_parts();
        let mut seen = PluginResponse {
            status: parts.status,
            headers: parts.headers,
            body: None,
        };
        let failed = |error: ApiError| {
            let response = error.to_response();
            let seen = PluginResponse {
                status: error.status,
                headers: response.headers().clone(),
                body: None,
            };
            (response.map(Either::Left), seen)
        };
        if let Err(error) = chain.filters(Phase::HeaderFilter, &mut seen).await {
            return failed(error);
        }
        let body = if chain.has(Phase::BodyFilter) {
            let bytes = match Limited::new(body, self.max_body_bytes).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    let too_large = error
                        .downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some();
                    return failed(if too_large {
                        ApiError::new(
                            StatusCode::BAD_GATEWAY,
                            "response_too_large",
                            format!(
                                "the response body is larger than {} bytes, the most a \
                                 body_filter can be given",
                                self.max_body_bytes
                            ),
                        )
                    } else {
                        ApiError::new(
                            StatusCode::BAD_GATEWAY,
                            "upstream",
                            "the response body could not be read",
                        )
                    });
                }
            };
            seen.body = Some(bytes);
            if let Err(error) = chain.filters(Phase::BodyFilter, &mut seen).await {
                return failed(error);
            }
            // The length is the new body's (hyper sets it for a whole body).
            seen.headers.remove(header::CONTENT_LENGTH);
            Either::Left(Full::new(seen.body.clone().unwrap_or_default()))
        } else {
            body
        };
        let mut response = Response::new(body);
        *response.status_mut() = seen.status;
        *response.headers_mut() = seen.headers.clone();
        (response, seen)
    }

    /// Runs one HTTP call of `function` on this thread.
    async fn run_http(
        &self,
        function: &Arc<DeployedFunction>,
        request: &OwnedRequest,
    ) -> Result<HttpResponse, ApiError> {
        let request_id = request.request_id.as_str();
        let lease = self
            .pools
            .acquire(&self.engine, function, request_id)
            .await
            .map_err(|error| acquire_failure(function, error, request_id))?;
        let parameters = request.path_parameters();
        let event = request.event(&parameters);
        let instance = lease.instance();
        instance.set_blocking_cap(self.blocking_cap());
        let result = instance.invoke_http(&event).await;
        self.note_call_cost(function, instance.last_call(), &result);
        drop(lease);
        result.map_err(|error| call_failure(function, &error, request_id))
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

    /// Drops this thread's clients (and so their idle connections) of upstreams that are no
    /// longer configured.
    pub fn forget_removed_upstreams(&self) {
        let snapshot = self.registry.snapshot();
        self.upstreams
            .retain(|name| snapshot.gateway.upstreams.get(name).cloned());
    }

    /// Brings functions and plugins with a `min` back to it (see `LocalPools::keep_warm`).
    /// Each thread warms only the functions it serves: the long-call worker those that are
    /// long-running, the I/O workers the others and every plugin.
    pub async fn keep_warm(&self) {
        let snapshot = self.registry.snapshot();
        let serves_long = matches!(self.role, Role::LongCalls);
        let plugins = snapshot
            .plugins
            .values()
            .filter(|_| !serves_long)
            .map(|plugin| &plugin.unit);
        self.pools
            .keep_warm(
                &self.engine,
                snapshot
                    .functions
                    .values()
                    .filter(|f| f.is_long_running() == serves_long)
                    .chain(plugins),
            )
            .await;
    }

    /// Runs a job handed to this thread (by the admin API or an I/O worker).
    pub async fn run_job(self: Rc<Self>, job: Job) {
        match job {
            Job::Invoke {
                name,
                payload,
                request_id,
                reply,
            } => {
                if let Some(function) = self.function(&name)
                    && let Some(queue) = self.long_call_queue(&function)
                {
                    function.metrics.long_calls.inc();
                    let job = Job::Invoke {
                        name,
                        payload,
                        request_id,
                        reply,
                    };
                    if let Err(mpsc::error::SendError(Job::Invoke { reply, .. })) = queue.send(job)
                    {
                        let _ = reply.send(Err(ApiError::internal("the long-call worker stopped")));
                    }
                    return;
                }
                let result = self.invoke(&name, &payload, &request_id).await;
                let _ = reply.send(result);
            }
            Job::Http {
                function,
                request,
                reply,
            } => {
                let result = self.run_http(&function, &request).await;
                let _ = reply.send(result);
            }
            Job::CheckInit {
                compiled,
                spec,
                reply,
            } => {
                let instance =
                    Instance::new_for(&self.engine, &compiled, &spec, DEPLOY_CHECK_ID).await;
                let _ = reply.send(instance.map(|instance| instance.phases()));
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
        let lease = self
            .pools
            .acquire(&self.engine, &function, request_id)
            .await
            .map_err(|error| acquire_failure(&function, error, request_id))?;
        let instance = lease.instance();
        instance.set_blocking_cap(self.blocking_cap());
        let result = instance.invoke_json(payload, request_id).await;
        self.note_call_cost(&function, instance.last_call(), &result);
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

/// Checks what every request must pass before it is routed, and puts its path in normal
/// form (`moontide_gateway::path`; the front does the same with the same function):
/// `CONNECT` is refused (`405`, and the connection closes: no route tunnels); an HTTP/1.1
/// request needs exactly one `Host` and no request may have two (`400`, RFC 9112 §3.2); a
/// path the normal form refuses is `400`. From here on, routing, functions, plugins and
/// the upstream all see the normalised path.
// The refusal is the response itself, built once on a cold path: boxing it buys nothing.
#[allow(clippy::result_large_err)]
fn admit_at_edge<B>(request: &mut Request<B>) -> Result<(), Response<Full<Bytes>>> {
    let http1 = request.version() <= http::Version::HTTP_11;
    if request.method() == http::Method::CONNECT {
        let mut response = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "CONNECT is not supported: no route tunnels",
        )
        .to_response();
        response.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        );
        if http1 {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        return Err(response);
    }
    let hosts = request.headers().get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && request.version() == http::Version::HTTP_11) {
        let message = if hosts == 0 {
            "an HTTP/1.1 request needs a Host header"
        } else {
            "a request may have only one Host header"
        };
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_host", message).to_response());
    }
    let uri = request.uri();
    let normal = match moontide_gateway::path::normalize(uri.path()) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(normal)) => normal,
        Err(rejection) => {
            return Err(
                ApiError::new(StatusCode::BAD_REQUEST, "bad_path", rejection.to_string())
                    .with_details(serde_json::json!({"path": uri.path()}))
                    .to_response(),
            );
        }
    };
    let path_and_query = match uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal,
    };
    let mut parts = uri.clone().into_parts();
    let rebuilt = http::uri::PathAndQuery::from_maybe_shared(Bytes::from(path_and_query))
        .ok()
        .and_then(|path_and_query| {
            parts.path_and_query = Some(path_and_query);
            http::Uri::from_parts(parts).ok()
        });
    match rebuilt {
        Some(uri) => {
            *request.uri_mut() = uri;
            Ok(())
        }
        // Cannot happen: the normal form only drops characters or decodes unreserved ones.
        None => Err(ApiError::internal("the normalised path is not a valid URI").to_response()),
    }
}

/// The answer when a route's target is not (or no longer) there: `502`, naming both.
fn missing_target(route: &str, kind: &str, name: &str) -> Response<ResponseBody> {
    let (code, state) = match kind {
        "upstream" => ("no_upstream", "is gone"),
        _ => ("no_function", "is not deployed"),
    };
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        code,
        format!("route {route} targets {kind} {name}, which {state}"),
    )
    .to_response()
    .map(Either::Left)
}

/// Copies bytes both ways between an upgraded client connection and the upgraded
/// connection to the upstream node (after `early`, what the node sent right after its
/// `101`), until either side closes.
async fn bridge_upgraded(client: OnUpgrade, mut upstream: tokio::net::TcpStream, early: Bytes) {
    use tokio::io::AsyncWriteExt;
    let client = match client.await {
        Ok(client) => client,
        Err(error) => {
            tracing::debug!(%error, "an upgraded connection could not be taken");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    if !early.is_empty()
        && let Err(error) = client.write_all(&early).await
    {
        tracing::debug!(%error, "an upgraded connection ended with an error");
        return;
    }
    if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(%error, "an upgraded connection ended with an error");
    }
}

/// Serves a connection with hyper on this thread, HTTP/1.1 or HTTP/2: every request the
/// front (`crate::front`) does not proxy itself. `io` may start with bytes the front has
/// already read.
pub fn serve_connection<I>(
    worker: &Rc<Worker>,
    io: I,
    peer_ip: Arc<str>,
    watcher: hyper_util::server::graceful::Watcher,
    guard: ConnGuard,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let service_worker = worker.clone();
    let service = hyper::service::service_fn(move |request| {
        let worker = service_worker.clone();
        let peer_ip = peer_ip.clone();
        async move { Ok::<_, Infallible>(worker.handle(request, peer_ip).await) }
    });
    let connection = worker
        .builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    let connection = watcher.watch(connection);
    tokio::task::spawn_local(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "connection ended with an error");
        }
        // Counted until hyper is done with the socket (an upgraded connection's bridge
        // is not counted: known gap).
        drop(guard);
    });
}

/// Where a routed request goes, as the router found it.
struct Target<'a> {
    route: &'a Route,
    /// The route pattern that matched (the event's `resource`).
    resource: String,
    /// Where the route's rest (`proxy` parameter) starts in the path.
    proxy_at: usize,
}

/// How hyper serves the data plane's connections (HTTP/1.1 and HTTP/2); public so that the
/// fuzz target (`fuzz/`) writes responses exactly as the data plane does.
pub fn connection_builder() -> hyper_util::server::conn::auto::Builder<LocalExecutor> {
    connection_builder_with(ClientTimeouts::default().head)
}

/// [`connection_builder`] with the node's head timeout (idle keep-alive time included).
pub fn connection_builder_with(
    head_timeout: Duration,
) -> hyper_util::server::conn::auto::Builder<LocalExecutor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(LocalExecutor);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Asks hyper to close the connection after this answer (HTTP/1.1; HTTP/2 drops the
/// header and only the stream ends).
fn close_after<B>(response: &mut Response<B>) {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// Every data-plane answer carries the request's id (the node's, never the function's).
pub fn set_request_id<B>(response: &mut Response<B>, id: Option<HeaderValue>) {
    if let Some(value) = id {
        response.headers_mut().insert(REQUEST_ID.clone(), value);
    }
}

/// A function's (or a plugin's) response as the HTTP response hyper writes. The result's
/// framing headers were dropped when it was converted (`moontide_runtime::contract`), so
/// hyper frames the body from its length alone. Public for the fuzz target.
pub fn function_response(output: HttpResponse) -> Response<Full<Bytes>> {
    debug_assert!(
        output.headers.keys().all(|name| {
            moontide_runtime::contract::framing_header(name.as_str().as_bytes()).is_none()
        }),
        "a tenant's response reached hyper with a framing header"
    );
    let mut response = Response::new(Full::new(output.body));
    *response.status_mut() = output.status;
    *response.headers_mut() = output.headers;
    response
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
    let details = serde_json::json!({
        "request_id": request_id,
        "function": &*function.name,
        "kind": error.kind(),
    });
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
        CallError::Blocking(cap_ms) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "function_blocked",
            format!(
                "function held its thread for {cap_ms} ms inside one C call (a pattern \
                 match, a sort); its calls now run on the long-call worker: retry"
            ),
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
        AcquireError::Shed(why) => {
            function.metrics.error("overloaded");
            function.metrics.shed(why);
            let (reason, message) = match why {
                Shed::QueueFull => (
                    "queue_full",
                    "function is at its instance limit and its wait queue is full; retry later",
                ),
                Shed::QueueTimeout => (
                    "queue_timeout",
                    "no instance of the function became free within its queue timeout; retry later",
                ),
                Shed::NodeFull => (
                    "node_full",
                    "the node is out of instance budget; retry later",
                ),
            };
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
                .with_details(serde_json::json!({"request_id": request_id, "reason": reason}))
        }
        AcquireError::Init(InstanceError::Init(error)) => {
            call_failure(function, &error, request_id)
        }
        AcquireError::Quarantined(record) => {
            function.metrics.error("quarantined");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "function_quarantined",
                format!(
                    "version {} of function {} is quarantined: it crashed the node {} times \
                     (last: {}); deploy a new version to lift it",
                    record.version, function.name, record.crashes, record.last_signal
                ),
            )
            .with_details(serde_json::json!({
                "request_id": request_id,
                "version": record.version,
                "crashes": record.crashes,
                "quarantined_since_ms": record.quarantined_since_ms,
            }))
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
