//! Forwarding a request to an upstream: pick a node, send over a keep-alive connection of
//! this worker thread, retry on another node when the attempt failed in a way the
//! upstream's policy retries, and hand the response back streaming.
//!
//! - **Connections**: the gateway's own HTTP/1.1 client (`gateway::client`): a keep-alive
//!   pool per node per worker thread, as nginx keeps one per worker, replaced only when
//!   the upstream's keep-alive settings change (editing nodes or weights keeps the
//!   connections of the nodes that stay; a removed node's pool closes on the next sweep).
//!   A reused connection the node closed while idle is replaced and the request resent
//!   when resending is safe (idempotent, or `retry_non_idempotent`), without counting
//!   against the node.
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
//!   body with `read` as the longest wait for each next piece of it, as nginx's
//!   `proxy_read_timeout` does.
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

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{Method, StatusCode};
use moontide_gateway::balance::{self, NodeSet};

use super::client::{self, ExchangeError, NodePool, Pooled};
use super::config::{HashOn, PassHost, RetryOn, UpstreamConfig};
use super::http1::{Forwarding, RequestHead, ResponseHead, write_request_head};
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

/// One worker thread's connection pools and balancer state, per upstream.
#[derive(Default)]
pub struct LocalUpstreams {
    upstreams: RefCell<HashMap<Arc<str>, Local>>,
}

struct Local {
    /// What the pools were made with; a change of these (not of nodes or weights) makes
    /// new pools, so that editing the nodes keeps the open connections of those that stay.
    settings: PoolSettings,
    /// Idle connections per node address.
    pools: HashMap<Arc<str>, Rc<NodePool>>,
    balancer: balance::Local,
}

/// The upstream settings a node's pool is made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PoolSettings {
    keepalive_idle_timeout_ms: u64,
    keepalive_max_idle: u32,
}

impl PoolSettings {
    fn of(config: &UpstreamConfig) -> PoolSettings {
        PoolSettings {
            keepalive_idle_timeout_ms: config.keepalive_idle_timeout_ms,
            keepalive_max_idle: config.keepalive_max_idle,
        }
    }
}

impl Local {
    fn new(upstream: &Upstream) -> Local {
        Local {
            settings: PoolSettings::of(&upstream.config),
            pools: HashMap::new(),
            balancer: balance::Local::new(),
        }
    }

    fn pool(&mut self, address: &str) -> Rc<NodePool> {
        if let Some(pool) = self.pools.get(address) {
            return pool.clone();
        }
        let pool = NodePool::new(
            self.settings.keepalive_max_idle as usize,
            Duration::from_millis(self.settings.keepalive_idle_timeout_ms),
        );
        self.pools.insert(Arc::from(address), pool.clone());
        pool
    }
}

/// What the proxy needs to know about the client's request besides its head.
pub struct Downstream<'a> {
    pub client_ip: &'a str,
    pub scheme: &'static str,
    /// The protocol the client asks to switch to (`Upgrade`), when the request is an
    /// upgrade: the handshake is forwarded with its `Upgrade` and `Connection: upgrade`.
    pub upgrade: Option<&'a [u8]>,
}

/// The protocol of an HTTP/1.1 upgrade request (`Connection: upgrade` + `Upgrade: X`), if
/// the request is one.
pub fn upgrade_protocol<R: RequestHead>(request: &R) -> Option<&[u8]> {
    let asks = request
        .header_lines()
        .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, value)| value.split(|&b| b == b','))
        .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    if asks {
        request.header("upgrade")
    } else {
        None
    }
}

/// The consistent-hash key of a request, per the upstream's `hash_on`.
fn hash_key<'a, R: RequestHead>(
    hash_on: Option<&HashOn>,
    request: &'a R,
    downstream: &Downstream<'a>,
) -> Option<Cow<'a, [u8]>> {
    match hash_on? {
        HashOn::Header(name) => request.header(name).map(Cow::Borrowed),
        HashOn::Cookie(name) => request
            .header_lines()
            .filter(|(header, _)| header.eq_ignore_ascii_case("cookie"))
            .flat_map(|(_, value)| value.split(|&b| b == b';'))
            .filter_map(|pair| {
                let at = pair.iter().position(|&b| b == b'=')?;
                Some((pair[..at].trim_ascii(), &pair[at + 1..]))
            })
            .find(|(key, _)| *key == name.as_bytes())
            .map(|(_, value)| Cow::Borrowed(value.trim_ascii())),
        HashOn::Query(name) => request.query().and_then(|query| {
            form_urlencoded::parse(query.as_bytes())
                .find(|(key, _)| key == name)
                .map(|(_, value)| Cow::Owned(value.into_owned().into_bytes()))
        }),
        HashOn::ClientIp => Some(Cow::Borrowed(downstream.client_ip.as_bytes())),
        HashOn::Uri => Some(Cow::Borrowed(request.path().as_bytes())),
    }
}

/// Methods whose repetition has no further effect (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The buffers of one proxied request, reusable for the next: the head sent upstream,
/// the bytes read back, and the response head parsed from them.
#[derive(Default)]
pub struct Exchange {
    pub request: Vec<u8>,
    pub response: BytesMut,
    pub head: ResponseHead,
}

/// How one attempt failed before a response head.
enum AttemptError {
    /// No connection: the request never left, so it is always safe to retry.
    Connect(std::io::Error),
    Exchange(ExchangeError),
}

impl LocalUpstreams {
    /// Sends the request to `upstream`, retrying per its policy. On success the response
    /// head is in `exchange.head` (its bytes at the start of `exchange.response`, followed
    /// by whatever of the body has arrived) and the connection to read the rest from is
    /// returned.
    pub async fn forward<R: RequestHead>(
        &self,
        upstream: &Upstream,
        request: &R,
        body: &[u8],
        downstream: &Downstream<'_>,
        exchange: &mut Exchange,
    ) -> Result<Pooled, ProxyError> {
        let config = &upstream.config;
        let may_retry = config.retry_non_idempotent || is_idempotent(request.method());
        let head_request = *request.method() == Method::HEAD;
        let attempts = 1 + config.retries as usize;
        let deadline = Duration::from_millis(config.send_timeout_ms + config.read_timeout_ms);
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let key = hash_key(config.hash_on.as_ref(), request, downstream);
        let client_host = request.client_host();
        let nodes = upstream.balancer.nodes();
        let mut tried = NodeSet::new();
        let mut last = ProxyError::NoNode;
        for attempt in 0..attempts {
            let Some((pick, pool)) = self.pick(upstream, key.as_deref(), &tried) else {
                break;
            };
            tried.insert(pick.index);
            let in_flight = pick.guard;
            let address = nodes[pick.index].key();
            let host = match &config.pass_host {
                PassHost::Pass => client_host,
                PassHost::Node => Some(address.as_bytes()),
                PassHost::Rewrite(host) => Some(host.as_bytes()),
            };
            exchange.request.clear();
            write_request_head(
                &mut exchange.request,
                request,
                &Forwarding {
                    host,
                    client_host,
                    client_ip: downstream.client_ip,
                    scheme: downstream.scheme,
                    upgrade: downstream.upgrade,
                    body_len: body.len(),
                },
            );
            exchange.request.extend_from_slice(body);
            let sent = send_to_node(
                &pool,
                address,
                connect_timeout,
                may_retry,
                head_request,
                exchange,
            );
            let outcome = tokio::time::timeout(deadline, sent).await;
            let more = attempt + 1 < attempts && tried.len() < nodes.len();
            match outcome {
                Ok(Ok(connection)) => {
                    let status = exchange.head.status;
                    let attempt = if config.is_failure_status(status) {
                        Attempt::FailedStatus
                    } else {
                        Attempt::Ok
                    };
                    upstream.finish(in_flight, pick.index, attempt);
                    if config.retry_on_statuses.contains(&status) && may_retry && more {
                        connection.release(false);
                        last = ProxyError::Failed {
                            node: Arc::from(address),
                            message: format!("answered {status}"),
                        };
                        continue;
                    }
                    return Ok(connection);
                }
                Ok(Err(error)) => {
                    upstream.finish(in_flight, pick.index, Attempt::Error);
                    let retry = config.retry_on.contains(&RetryOn::Error)
                        && (matches!(error, AttemptError::Connect(_)) || may_retry);
                    last = ProxyError::Failed {
                        node: Arc::from(address),
                        message: match error {
                            AttemptError::Connect(error) => format!("connect: {error}"),
                            AttemptError::Exchange(error) => error.to_string(),
                        },
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

    /// The next node, among those not tried yet, started (counted in flight), with this
    /// thread's pool of connections to it. Makes (or remakes, after a change of pool
    /// settings) the thread's state for `upstream` on first use.
    fn pick(
        &self,
        upstream: &Upstream,
        key: Option<&[u8]>,
        tried: &NodeSet,
    ) -> Option<(balance::Pick, Rc<NodePool>)> {
        let mut upstreams = self.upstreams.borrow_mut();
        let local = upstreams
            .entry(upstream.name.clone())
            .or_insert_with(|| Local::new(upstream));
        if local.settings != PoolSettings::of(&upstream.config) {
            *local = Local::new(upstream);
        }
        let pick = upstream
            .balancer
            .pick(&mut local.balancer, key, tried, Instant::now())?;
        let pool = local.pool(upstream.balancer.nodes()[pick.index].key());
        Some((pick, pool))
    }

    /// Drops this thread's state for upstreams that are gone and the pools of nodes that
    /// are gone (their idle connections close), and closes connections idle too long.
    /// `current` gives an upstream's serving form by name.
    pub fn retain(&self, current: impl Fn(&str) -> Option<Arc<Upstream>>) {
        let now = Instant::now();
        self.upstreams.borrow_mut().retain(|name, local| {
            let Some(upstream) = current(name) else {
                return false;
            };
            let nodes = upstream.balancer.nodes();
            local.pools.retain(|address, pool| {
                pool.sweep(now);
                nodes.iter().any(|node| node.key() == &**address)
            });
            true
        });
    }
}

/// One attempt on a node: a connection from its pool (or a new one), the request written,
/// the response head read. A reused connection that the node closed before answering
/// (it timed it out while idle) is replaced and the request sent again, when resending is
/// safe.
async fn send_to_node(
    pool: &Rc<NodePool>,
    address: &str,
    connect_timeout: Duration,
    may_resend: bool,
    head_request: bool,
    exchange: &mut Exchange,
) -> Result<Pooled, AttemptError> {
    loop {
        let mut connection = client::connection(pool, address, connect_timeout)
            .await
            .map_err(AttemptError::Connect)?;
        let sent = client::exchange(
            connection.stream(),
            &exchange.request,
            &mut exchange.response,
            &mut exchange.head,
            head_request,
        )
        .await;
        match sent {
            Ok(()) => return Ok(connection),
            Err(error) if connection.reused && may_resend && error.closed_before_answer() => {}
            Err(error) => return Err(AttemptError::Exchange(error)),
        }
    }
}
