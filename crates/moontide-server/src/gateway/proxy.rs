//! Forwarding a request to an upstream: pick a node, send over a keep-alive connection of
//! this worker thread, retry on another node when the attempt failed in a way the
//! upstream's policy retries, and hand the response back streaming.
//!
//! - **Connections**: one hyper client per upstream per worker thread (its own keep-alive
//!   pool per node, as nginx keeps one per worker), replaced only when the upstream's
//!   connection settings change (editing nodes or weights keeps the connections of the
//!   nodes that stay). The connect timeout is the connector's.
//! - **Request body**: read whole (bounded, like a function's) before the first attempt,
//!   so that a retry can resend it (nginx's `proxy_request_buffering on`).
//! - **Retries** (`proxy_next_upstream`): a connect failure is always safe to retry (the
//!   request never left); a timeout, a broken connection or a listed status only for
//!   idempotent methods unless `retry_non_idempotent`. Each retry goes to a node not tried
//!   yet; when none is left the last failure answers (`502`, or `504` for a timeout).
//! - **Headers**: hop-by-hop headers are dropped both ways; `X-Forwarded-For` gets the
//!   client's address appended, `X-Forwarded-Proto` and `X-Forwarded-Host` are set, `Host`
//!   follows `pass_host`.
//! - **Timeouts**: `connect` bounds the TCP connect; `send` + `read` bound the time from
//!   the start of an attempt to the response's headers; the data plane then streams the
//!   body with `read` as the longest wait for each next piece of it
//!   (`tower_http::timeout::TimeoutBody`), as nginx's `proxy_read_timeout` does.
//! - **Upgrades** (WebSocket): an upgrade request's handshake is forwarded with its
//!   `Upgrade` and `Connection: upgrade`; when the node answers `101`, the data plane
//!   takes both upgraded connections and copies bytes both ways until either side closes
//!   (no idle timeout: a WebSocket may be quiet for long; its own pings keep it honest).
//! - **Failures** (what passive health and the circuit breaker count against a node): a
//!   failed connect, a connection that broke before the response's headers, a timeout,
//!   and a response whose status is 5xx or listed in `retries.on` (e.g. 429)
//!   ([`UpstreamConfig::is_failure_status`]). Everything else is a success, 4xx included.
//!   A request that ends without an outcome (the client went away) counts neither way.
//!   No node to pick — every breaker open, or every node tried — answers `503`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use moontide_gateway::balance::{self, NodeSet};

use super::config::{HashOn, PassHost, RetryOn, UpstreamConfig};
use crate::metrics::AttemptCounters;

/// An upstream ready to serve: its config and the balancer over its nodes (whose shared
/// state — health, breaker, load — is kept per address across edits).
pub struct Upstream {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    pub balancer: balance::Upstream,
    /// Counters of node transitions.
    pub events: crate::metrics::UpstreamEvents,
    /// Attempt counters per node, indexed like `balancer.nodes()`.
    pub attempts: Vec<AttemptCounters>,
}

/// How one attempt on a node ended (indexes `metrics::ATTEMPT_OUTCOMES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Ok = 0,
    FailedStatus = 1,
    Error = 2,
    Timeout = 3,
}

impl Upstream {
    /// Ends a request on node `index` with its outcome (see the module doc for what
    /// counts as a failure), counting it and reporting the health or breaker transitions
    /// it caused.
    fn finish(&self, in_flight: balance::InFlight, index: usize, attempt: Attempt) {
        if let Some(counters) = self.attempts.get(index) {
            counters[attempt as usize].inc();
        }
        let address = self.balancer.nodes()[index].key();
        let transitions = in_flight.finish(attempt == Attempt::Ok, Instant::now());
        if transitions != balance::Transitions::default() {
            super::health::report(&self.events, &self.name, address, transitions);
        }
    }
}

/// Why no response came from the upstream.
#[derive(Debug)]
pub enum ProxyError {
    /// No node could be picked (none configured, or all excluded).
    NoNode,
    /// The last attempt failed to connect or broke.
    Failed { node: Arc<str>, message: String },
    /// The last attempt timed out.
    TimedOut { node: Arc<str> },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoNode => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Failed { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::TimedOut { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn message(&self) -> String {
        match self {
            ProxyError::NoNode => "no upstream node is available".into(),
            ProxyError::Failed { node, message } => format!("upstream {node} failed: {message}"),
            ProxyError::TimedOut { node } => format!("upstream {node} timed out"),
        }
    }
}

/// One worker thread's clients and balancer state, per upstream.
#[derive(Default)]
pub struct LocalUpstreams {
    upstreams: RefCell<HashMap<Arc<str>, Local>>,
}

struct Local {
    /// What the client was built with; a change of these (not of nodes or weights) makes
    /// a new client, so that editing the nodes keeps the open connections of those that
    /// stay.
    settings: ClientSettings,
    client: Client<HttpConnector, Full<Bytes>>,
    balancer: balance::Local,
}

/// The upstream settings a client is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClientSettings {
    connect_timeout_ms: u64,
    keepalive_idle_timeout_ms: u64,
    keepalive_max_idle: u32,
}

impl ClientSettings {
    fn of(config: &UpstreamConfig) -> ClientSettings {
        ClientSettings {
            connect_timeout_ms: config.connect_timeout_ms,
            keepalive_idle_timeout_ms: config.keepalive_idle_timeout_ms,
            keepalive_max_idle: config.keepalive_max_idle,
        }
    }
}

impl Local {
    fn new(upstream: &Upstream) -> Local {
        let config = &upstream.config;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_millis(config.connect_timeout_ms)));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_millis(config.keepalive_idle_timeout_ms))
            .pool_max_idle_per_host(config.keepalive_max_idle as usize)
            .build(connector);
        Local {
            settings: ClientSettings::of(config),
            client,
            balancer: balance::Local::new(),
        }
    }
}

/// What the proxy needs to know about the client's request besides its parts.
pub struct Downstream<'a> {
    pub client_ip: &'a str,
    pub scheme: &'static str,
    /// The protocol the client asks to switch to (`Upgrade`), when the request is an
    /// upgrade: the handshake is forwarded with its `Upgrade` and `Connection: upgrade`.
    pub upgrade: Option<&'a HeaderValue>,
}

/// The protocol of an HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade: X`), if
/// the request is one.
pub fn upgrade_protocol(headers: &HeaderMap) -> Option<&HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(header::UPGRADE)
    } else {
        None
    }
}

/// The consistent-hash key of a request, per the upstream's `hash_on`.
fn hash_key<'a>(
    hash_on: Option<&HashOn>,
    parts: &'a http::request::Parts,
    downstream: &Downstream<'a>,
) -> Option<std::borrow::Cow<'a, [u8]>> {
    use std::borrow::Cow;
    match hash_on? {
        HashOn::Header(name) => parts
            .headers
            .get(name.as_str())
            .map(|v| Cow::Borrowed(v.as_bytes())),
        HashOn::Cookie(name) => parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(key, _)| key == name)
            .map(|(_, value)| Cow::Borrowed(value.as_bytes())),
        HashOn::Query(name) => parts.uri.query().and_then(|query| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == name)
                .map(|(_, value)| Cow::Owned(value.into_owned().into_bytes()))
        }),
        HashOn::ClientIp => Some(Cow::Borrowed(downstream.client_ip.as_bytes())),
        HashOn::Uri => Some(Cow::Borrowed(parts.uri.path().as_bytes())),
    }
}

/// Methods whose repetition has no further effect (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Headers that belong to one connection, not to the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named by `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
    headers.remove(HeaderName::from_static("proxy-connection"));
}

impl LocalUpstreams {
    /// Sends the request to `upstream`, retrying per its policy.
    pub async fn forward(
        &self,
        upstream: &Upstream,
        parts: &http::request::Parts,
        body: Bytes,
        downstream: &Downstream<'_>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let config = &upstream.config;
        let client = self.client(upstream);
        let may_retry = config.retry_non_idempotent || is_idempotent(&parts.method);
        let attempts = 1 + config.retries as usize;
        let deadline = Duration::from_millis(config.send_timeout_ms + config.read_timeout_ms);
        let key = hash_key(config.hash_on.as_ref(), parts, downstream);
        let nodes = upstream.balancer.nodes();
        let mut tried = NodeSet::new();
        let mut last = ProxyError::NoNode;
        for attempt in 0..attempts {
            let Some(pick) = self.pick(upstream, key.as_deref(), &tried) else {
                break;
            };
            tried.insert(pick.index);
            let in_flight = pick.guard;
            let address = nodes[pick.index].key();
            let request = build_request(upstream, address, parts, body.clone(), downstream);
            let outcome = tokio::time::timeout(deadline, client.request(request)).await;
            let more = attempt + 1 < attempts && tried.len() < nodes.len();
            match outcome {
                Ok(Ok(response)) => {
                    let status = response.status().as_u16();
                    let retry_status = config.retry_on_statuses.contains(&status);
                    let attempt = if config.is_failure_status(status) {
                        Attempt::FailedStatus
                    } else {
                        Attempt::Ok
                    };
                    upstream.finish(in_flight, pick.index, attempt);
                    if retry_status && may_retry && more {
                        last = ProxyError::Failed {
                            node: Arc::from(address),
                            message: format!("answered {status}"),
                        };
                        continue;
                    }
                    let mut response = response;
                    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                    let protocol = response.headers().get(header::UPGRADE).cloned();
                    strip_hop_by_hop(response.headers_mut());
                    if let (true, Some(protocol)) = (switched, protocol) {
                        let headers = response.headers_mut();
                        headers.insert(header::UPGRADE, protocol);
                        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    }
                    return Ok(response);
                }
                Ok(Err(error)) => {
                    upstream.finish(in_flight, pick.index, Attempt::Error);
                    // A failed connect never sent the request: always safe to retry.
                    let retry = config.retry_on.contains(&RetryOn::Error)
                        && (error.is_connect() || may_retry);
                    last = ProxyError::Failed {
                        node: Arc::from(address),
                        message: describe(&error),
                    };
                    if !(retry && more) {
                        break;
                    }
                }
                Err(_) => {
                    upstream.finish(in_flight, pick.index, Attempt::Timeout);
                    last = ProxyError::TimedOut {
                        node: Arc::from(address),
                    };
                    if !(config.retry_on.contains(&RetryOn::Timeout) && may_retry && more) {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// This thread's client for `upstream`, made (or remade after a change) on first use.
    fn client(&self, upstream: &Upstream) -> Client<HttpConnector, Full<Bytes>> {
        let mut upstreams = self.upstreams.borrow_mut();
        let local = upstreams
            .entry(upstream.name.clone())
            .or_insert_with(|| Local::new(upstream));
        if local.settings != ClientSettings::of(&upstream.config) {
            *local = Local::new(upstream);
        }
        local.client.clone()
    }

    /// The next node, among those not tried yet, started (counted in flight).
    fn pick(
        &self,
        upstream: &Upstream,
        key: Option<&[u8]>,
        tried: &NodeSet,
    ) -> Option<balance::Pick> {
        let mut upstreams = self.upstreams.borrow_mut();
        let local = upstreams.get_mut(&*upstream.name)?;
        upstream
            .balancer
            .pick(&mut local.balancer, key, tried, Instant::now())
    }

    /// Drops the clients of upstreams that are gone (their idle connections close).
    pub fn retain(&self, alive: impl Fn(&str) -> bool) {
        self.upstreams.borrow_mut().retain(|name, _| alive(name));
    }
}

fn describe(error: &hyper_util::client::legacy::Error) -> String {
    use std::error::Error;
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn build_request(
    upstream: &Upstream,
    address: &str,
    parts: &http::request::Parts,
    body: Bytes,
    downstream: &Downstream<'_>,
) -> Request<Full<Bytes>> {
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = format!("http://{address}{path_and_query}");
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    let client_host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let host = match &upstream.config.pass_host {
        PassHost::Pass => client_host.clone(),
        PassHost::Node => HeaderValue::from_str(address).ok(),
        PassHost::Rewrite(host) => HeaderValue::from_str(host).ok(),
    };
    if let Some(host) = host {
        headers.insert(header::HOST, host);
    }
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(previous) => format!("{previous}, {}", downstream.client_ip),
        None => downstream.client_ip.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), value);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(downstream.scheme),
    );
    if let Some(host) = client_host {
        headers.insert(HeaderName::from_static("x-forwarded-host"), host);
    }
    if let Some(protocol) = downstream.upgrade {
        headers.insert(header::UPGRADE, protocol.clone());
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
    *request.headers_mut() = headers;
    request
}
