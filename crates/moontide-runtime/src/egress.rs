//! The egress policy: which addresses a function's outbound `http` calls may reach.
//!
//! Tenant code must not reach what the node can reach for it: the node's own admin API,
//! its data plane (a function calling itself in a loop), backends behind the gateway (past
//! its auth plugins), cloud metadata services, or anything else on loopback and private
//! networks. So, by default, a destination is **denied** when its address is
//! ([`classify`]): unspecified (`0.0.0.0/8`, `::`), loopback (`127.0.0.0/8`, `::1`),
//! link-local (`169.254.0.0/16`, `fe80::/10`), a cloud metadata address
//! (`169.254.169.254`, `169.254.170.2`, `100.100.100.200`, `fd00:ec2::254`), private
//! (`10/8`, `172.16/12`, `192.168/16`, `fc00::/7`, `fec0::/10`, `64:ff9b:1::/48`), shared
//! CGNAT space (`100.64/10`), multicast, broadcast or reserved (`192.0.0.0/24`,
//! `198.18/15`, `240/4`, the rest of `::/8`, `100::/64`, Teredo `2001::/32`). IPv6 forms
//! that embed an IPv4 address — mapped `::ffff:a.b.c.d`, translated `::ffff:0:a.b.c.d`,
//! compatible `::a.b.c.d`, NAT64 `64:ff9b::/96` and 6to4 `2002::/16` — are judged by the
//! IPv4 address they carry ([`canonical`]).
//!
//! An operator opens ranges with allowlist entries ([`AllowRule`], `CIDR[:PORT]`): the
//! node's (`serve --egress-allow`, every function) and a function's own (its config's
//! `egress_allow`, that function only). Three rules hold whatever the lists say:
//!
//! - the node's **admin listener** is always denied;
//! - the node's **data plane** is denied unless the *function's own* list has an entry
//!   naming that exact address and port (a deliberate self-call, never a node-wide one);
//! - a **metadata** address is opened only by an entry naming that exact address
//!   (`169.254.169.254/32`), never by a range that happens to contain it; unspecified
//!   addresses are never opened.
//!
//! Where the checks happen ([`Outbound`], one `reqwest::Client` per effective policy):
//!
//! 1. **IP-literal URLs** (reqwest never resolves them) are checked in full — address and
//!    port — before the request is made ([`Policy::check_url`]). The URL parser has
//!    already turned every spelling it accepts (`2130706433`, `0x7f000001`, `0177.0.0.1`,
//!    `127.1`, `[::ffff:127.0.0.1]`, percent-encoded or full-width digits...) into one
//!    address, so the check sees the address, never the text.
//! 2. **Host names** go through the client's DNS resolver ([`PolicyResolver`]), which
//!    drops every resolved address the policy denies on all ports; denied addresses are
//!    never connected to. A name left with no address fails with the reason.
//! 3. **Ports of resolved names**: reqwest does not tell a resolver the port, so once a
//!    connection is established — before a byte of the request is written — its peer
//!    address and port are checked again in full ([`PeerCheckLayer`], a connector
//!    layer). This is also where an address of this host that the listeners are bound to
//!    through `0.0.0.0` is recognised (the connection's local address equals its peer's).
//! 4. **Redirects** are re-checked at every hop ([`Outbound::build`]'s redirect policy:
//!    literal hosts in full; names go through steps 2 and 3 again).
//!
//! The client ignores `HTTP(S)_PROXY`: through a proxy, the proxy would resolve and reach
//! the target, out of the policy's sight.
//!
//! A denial is a [`Denied`] error (`egress to 127.0.0.1:9080 denied by policy:
//! admin_listener (...)`), found in reqwest's error chain by [`find_denied`].

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connection, HttpInfo};
use ipnet::IpNet;

/// Most redirects one outbound request follows (reqwest's default).
const MAX_REDIRECTS: usize = 10;

/// Why a destination is refused; [`DenyReason::label`] is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// The node's own admin API (never allowed).
    AdminListener,
    /// The node's own data plane (allowed only by the function's own exact entry).
    DataPlane,
    /// A cloud metadata service (allowed only by an entry naming the exact address).
    Metadata,
    /// `0.0.0.0/8` or `::`: "this host" (never allowed).
    Unspecified,
    Loopback,
    LinkLocal,
    Private,
    /// Shared address space `100.64.0.0/10` (carrier-grade NAT).
    Cgnat,
    Multicast,
    Broadcast,
    Reserved,
}

impl DenyReason {
    pub const ALL: [DenyReason; 11] = [
        DenyReason::AdminListener,
        DenyReason::DataPlane,
        DenyReason::Metadata,
        DenyReason::Unspecified,
        DenyReason::Loopback,
        DenyReason::LinkLocal,
        DenyReason::Private,
        DenyReason::Cgnat,
        DenyReason::Multicast,
        DenyReason::Broadcast,
        DenyReason::Reserved,
    ];

    /// The label in messages and in `moontide_egress_denied_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            DenyReason::AdminListener => "admin_listener",
            DenyReason::DataPlane => "data_plane",
            DenyReason::Metadata => "metadata",
            DenyReason::Unspecified => "unspecified",
            DenyReason::Loopback => "loopback",
            DenyReason::LinkLocal => "link_local",
            DenyReason::Private => "private",
            DenyReason::Cgnat => "cgnat",
            DenyReason::Multicast => "multicast",
            DenyReason::Broadcast => "broadcast",
            DenyReason::Reserved => "reserved",
        }
    }

    fn explanation(self) -> &'static str {
        const NOT_LISTED: &str = "not in the node's --egress-allow or the function's egress_allow";
        match self {
            DenyReason::AdminListener => "the node's own admin API; no allowlist opens it",
            DenyReason::DataPlane => {
                "the node's own data plane; only the function's egress_allow naming this \
                 address and port opens it"
            }
            DenyReason::Metadata => {
                "a cloud metadata service; only an allowlist entry naming this exact address \
                 opens it"
            }
            DenyReason::Unspecified => "an unspecified address means this host; nothing opens it",
            DenyReason::Loopback => NOT_LISTED,
            DenyReason::LinkLocal => NOT_LISTED,
            DenyReason::Private => NOT_LISTED,
            DenyReason::Cgnat => NOT_LISTED,
            DenyReason::Multicast => NOT_LISTED,
            DenyReason::Broadcast => NOT_LISTED,
            DenyReason::Reserved => NOT_LISTED,
        }
    }
}

/// Cloud metadata services reachable from inside a VM or container: AWS, GCP, Azure,
/// OpenStack, DigitalOcean, Oracle (169.254.169.254), AWS ECS task metadata
/// (169.254.170.2), Alibaba Cloud (100.100.100.200).
const METADATA_V4: [Ipv4Addr; 3] = [
    Ipv4Addr::new(169, 254, 169, 254),
    Ipv4Addr::new(169, 254, 170, 2),
    Ipv4Addr::new(100, 100, 100, 200),
];
/// AWS IMDS over IPv6.
const METADATA_V6: [Ipv6Addr; 1] = [Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)];

/// The IPv4 address an IPv6 address carries, for the forms a host would route to that
/// IPv4 address: mapped `::ffff:0:0/96`, translated `::ffff:0:0:0/96`, compatible `::/96`
/// (but `::` and `::1`), NAT64 `64:ff9b::/96` and 6to4 `2002::/16`.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = || Ipv4Addr::from(((s[6] as u32) << 16) | s[7] as u32);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0xffff, 0, _, _] => Some(low()),
        [0, 0, 0, 0, 0, 0, _, _] if !ip.is_unspecified() && !ip.is_loopback() => Some(low()),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low()),
        [0x2002, high, low16, ..] => Some(Ipv4Addr::from(((high as u32) << 16) | low16 as u32)),
        _ => None,
    }
}

/// The address a destination is judged by: an IPv6 form that embeds an IPv4 address is
/// that IPv4 address; everything else is itself.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Why `ip` is denied by default, or `None` for a public address (judged by its
/// [`canonical`] form).
pub fn classify(ip: IpAddr) -> Option<DenyReason> {
    match canonical(ip) {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<DenyReason> {
    use DenyReason::*;
    if METADATA_V4.contains(&ip) {
        return Some(Metadata);
    }
    let [a, b, c, _] = ip.octets();
    Some(match (a, b) {
        (0, _) => Unspecified,
        (127, _) => Loopback,
        (169, 254) => LinkLocal,
        (10, _) | (192, 168) => Private,
        (172, 16..=31) => Private,
        (100, 64..=127) => Cgnat,
        // IETF protocol assignments (192.0.0.0/24) and benchmarking (198.18.0.0/15).
        (192, 0) if c == 0 => Reserved,
        (198, 18..=19) => Reserved,
        (224..=239, _) => Multicast,
        _ if ip.is_broadcast() => Broadcast,
        (240..=255, _) => Reserved,
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<DenyReason> {
    use DenyReason::*;
    if METADATA_V6.contains(&ip) {
        return Some(Metadata);
    }
    if ip.is_unspecified() {
        return Some(Unspecified);
    }
    if ip.is_loopback() {
        return Some(Loopback);
    }
    let s = ip.segments();
    Some(match s[0] {
        0xfe80..=0xfebf => LinkLocal,
        // fec0::/10 (deprecated site-local) and fc00::/7 (unique local).
        0xfec0..=0xfeff | 0xfc00..=0xfdff => Private,
        0xff00..=0xffff => Multicast,
        // NAT64 for local use, 64:ff9b:1::/48 (RFC 8215): whatever the operator maps.
        0x0064 if s[1] == 0xff9b && s[2] == 1 => Private,
        // What is left of ::/8 once the IPv4-embedding forms were unwrapped.
        0x0000..=0x00ff => Reserved,
        // Discard-only 100::/64.
        0x0100 if s[1..4] == [0, 0, 0] => Reserved,
        // Teredo 2001::/32: a tunnel to an IPv4 address.
        0x2001 if s[1] == 0 => Reserved,
        _ => return None,
    })
}

/// One allowlist entry: an address range and optionally one port (`CIDR[:PORT]`):
/// `127.0.0.1`, `127.0.0.1:8081`, `10.0.0.0/8`, `10.0.0.0/8:443`, `::1`, `[::1]:8081`,
/// `fd00::/8`, `[fd00::/8]:443`. A bare address is a single-address range. No port means
/// every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowRule {
    net: IpNet,
    port: Option<u16>,
}

impl AllowRule {
    /// Whether the entry covers `ip` (canonical) on `port` (`None`: on some port).
    fn covers(&self, ip: IpAddr, port: Option<u16>) -> bool {
        self.net.contains(&ip) && self.covers_port(port)
    }

    fn covers_port(&self, port: Option<u16>) -> bool {
        match (self.port, port) {
            (Some(own), Some(port)) => own == port,
            _ => true,
        }
    }

    /// Whether the entry is exactly the one address `ip` (a /32 or /128).
    fn names_exactly(&self, ip: IpAddr) -> bool {
        self.net.prefix_len() == self.net.max_prefix_len() && self.net.addr() == ip
    }
}

impl FromStr for AllowRule {
    type Err = String;

    fn from_str(text: &str) -> Result<AllowRule, String> {
        let text = text.trim();
        let bad_port = |port: &str| format!("'{port}' is not a port (1-65535)");
        let parse_port = |port: &str| match port.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad_port(port)),
            Ok(port) => Ok(port),
        };
        let (range, port) = if let Some(rest) = text.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("'{text}' lacks the closing ']'"))?;
            let port = match after {
                "" => None,
                after => {
                    Some(parse_port(after.strip_prefix(':').ok_or_else(|| {
                        format!("'{text}': expected ':PORT' after ']'")
                    })?)?)
                }
            };
            (inside, port)
        } else if text.matches(':').count() > 1 {
            // A bare IPv6 address or range; give a port as [ADDRESS]:PORT.
            (text, None)
        } else if let Some((range, port)) = text.split_once(':') {
            (range, Some(parse_port(port)?))
        } else {
            (text, None)
        };
        let shape = || {
            format!(
                "'{text}' is not CIDR[:PORT] (e.g. 10.0.0.0/8, 127.0.0.1:8081, [::1]:8081, \
                 fd00::/8)"
            )
        };
        let net = match range.split_once('/') {
            Some(_) => range.parse::<IpNet>().map_err(|_| shape())?,
            None => IpNet::from(range.parse::<IpAddr>().map_err(|_| shape())?),
        };
        if let IpNet::V6(v6) = net
            && v6.prefix_len() >= 96
            && embedded_v4(v6.addr()).is_some()
        {
            return Err(format!(
                "'{text}' embeds an IPv4 address: write it as IPv4 (the policy judges \
                 such IPv6 forms by the IPv4 address they carry)"
            ));
        }
        Ok(AllowRule {
            net: net.trunc(),
            port,
        })
    }
}

impl fmt::Display for AllowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let single = self.net.prefix_len() == self.net.max_prefix_len();
        let range = if single {
            self.net.addr().to_string()
        } else {
            self.net.to_string()
        };
        match (self.port, self.net) {
            (None, _) => f.write_str(&range),
            (Some(port), IpNet::V4(_)) => write!(f, "{range}:{port}"),
            (Some(port), IpNet::V6(_)) => write!(f, "[{range}]:{port}"),
        }
    }
}

/// The node's part of every function's policy: the operator's allowlist and the node's
/// own listeners.
#[derive(Debug, Clone, Default)]
pub struct NodeEgress {
    /// `serve --egress-allow`: opens ranges for every function.
    pub allow: Vec<AllowRule>,
    /// The admin API's bound addresses: always denied.
    pub admin_listeners: Vec<SocketAddr>,
    /// The data plane's bound addresses: denied unless the function's own list names them.
    pub data_plane_listeners: Vec<SocketAddr>,
}

/// The policy one outbound client enforces: the node's rules plus one function's own
/// allowlist.
#[derive(Debug)]
pub struct Policy {
    node: Arc<NodeEgress>,
    function: Vec<AllowRule>,
}

impl Policy {
    pub fn new(node: Arc<NodeEgress>, function: Vec<AllowRule>) -> Policy {
        Policy { node, function }
    }

    /// For a resolved name, whose port the resolver is not told: may `ip` be connected to
    /// on some port? (The port is checked once connected, see [`PeerCheckLayer`].)
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), DenyReason> {
        let ip = canonical(ip);
        match classify(ip) {
            None => Ok(()),
            Some(reason) if self.opens(reason, ip, None) => Ok(()),
            Some(reason) => Err(reason),
        }
    }

    /// The full check of a destination `ip`:`port`. `local` is the local address of an
    /// established connection: a peer equal to it is this host, which matters for
    /// listeners bound to `0.0.0.0` or `::`.
    pub fn check(&self, ip: IpAddr, port: u16, local: Option<IpAddr>) -> Result<(), DenyReason> {
        let ip = canonical(ip);
        let local = local.map(canonical);
        let listens = |listener: &SocketAddr| listener_matches(listener, ip, port, local);
        if self.node.admin_listeners.iter().any(listens) {
            return Err(DenyReason::AdminListener);
        }
        if self.node.data_plane_listeners.iter().any(listens) {
            let named = self
                .function
                .iter()
                .any(|rule| rule.port == Some(port) && rule.names_exactly(ip));
            return if named {
                Ok(())
            } else {
                Err(DenyReason::DataPlane)
            };
        }
        match classify(ip) {
            None => Ok(()),
            Some(reason) if self.opens(reason, ip, Some(port)) => Ok(()),
            Some(reason) => Err(reason),
        }
    }

    /// The check of a URL before a request to it: in full for an IP-literal host (which
    /// reqwest does not resolve); a name is checked when it resolves and connects.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Denied> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        let port = url.port_or_known_default().unwrap_or(0);
        self.check(ip, port, None).map_err(|reason| Denied {
            host: None,
            ip,
            port: Some(port),
            reason,
        })
    }

    /// Whether an allowlist entry opens a destination of this default-denied kind.
    fn opens(&self, reason: DenyReason, ip: IpAddr, port: Option<u16>) -> bool {
        let mut rules = self.node.allow.iter().chain(&self.function);
        match reason {
            DenyReason::Unspecified | DenyReason::AdminListener | DenyReason::DataPlane => false,
            DenyReason::Metadata => {
                rules.any(|rule| rule.names_exactly(ip) && rule.covers_port(port))
            }
            _ => rules.any(|rule| rule.covers(ip, port)),
        }
    }
}

/// Whether a connection to `ip`:`port` (canonical) reaches `listener`. A listener bound
/// to an unspecified address takes connections to loopback and to every address of this
/// host (recognised once connected: the peer is the connection's own local address).
fn listener_matches(listener: &SocketAddr, ip: IpAddr, port: u16, local: Option<IpAddr>) -> bool {
    if listener.port() != port {
        return false;
    }
    let bound = canonical(listener.ip());
    // Connecting to an unspecified address connects to this host.
    if ip.is_unspecified() || ip == bound {
        return true;
    }
    bound.is_unspecified() && (ip.is_loopback() || local == Some(ip))
}

/// An outbound request refused by the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// The name asked for, when the address came from resolving it.
    pub host: Option<String>,
    pub ip: IpAddr,
    /// Unknown when a name was refused at resolution (the resolver is not told the port).
    pub port: Option<u16>,
    pub reason: DenyReason,
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("egress to ")?;
        match (&self.host, self.port) {
            (None, Some(port)) => write!(f, "{}", SocketAddr::new(self.ip, port))?,
            (None, None) => write!(f, "{}", self.ip)?,
            (Some(host), Some(port)) => write!(f, "{host}:{port} ({})", self.ip)?,
            (Some(host), None) => write!(f, "{host} ({})", self.ip)?,
        }
        write!(
            f,
            " denied by policy: {} ({})",
            self.reason.label(),
            self.reason.explanation()
        )
    }
}

impl std::error::Error for Denied {}

/// The [`Denied`] in an error's source chain, if the policy is why it failed.
pub fn find_denied<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Denied> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(denied) = error.downcast_ref::<Denied>() {
            return Some(denied);
        }
        current = error.source();
    }
    None
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The outbound client's DNS resolver: the system's (`getaddrinfo`), minus every address
/// the policy denies on all ports.
pub struct PolicyResolver {
    policy: Arc<Policy>,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let mut kept = Vec::new();
            let mut refused = None;
            for addr in resolved {
                match policy.check_ip(addr.ip()) {
                    Ok(()) => kept.push(addr),
                    Err(reason) => {
                        refused.get_or_insert((addr.ip(), reason));
                    }
                }
            }
            match (kept.is_empty(), refused) {
                (true, Some((ip, reason))) => Err(Box::new(Denied {
                    host: Some(host),
                    ip,
                    port: None,
                    reason,
                }) as BoxError),
                _ => Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// A connector layer that checks every new connection's peer address and port against
/// the policy before the connection is used (see the module docs: the resolver cannot
/// see ports). A connection with no peer address to check is refused.
#[derive(Clone)]
pub struct PeerCheckLayer {
    policy: Arc<Policy>,
}

impl<S> tower_layer::Layer<S> for PeerCheckLayer {
    type Service = PeerCheck<S>;

    fn layer(&self, inner: S) -> PeerCheck<S> {
        PeerCheck {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service [`PeerCheckLayer`] wraps the connector in.
#[derive(Clone)]
pub struct PeerCheck<S> {
    inner: S,
    policy: Arc<Policy>,
}

impl<S, R> tower_service::Service<R> for PeerCheck<S>
where
    S: tower_service::Service<R, Error = BoxError>,
    S::Response: Connection + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let connecting = self.inner.call(request);
        let policy = self.policy.clone();
        Box::pin(async move {
            let connection = connecting.await?;
            let mut extras = http::Extensions::new();
            connection.connected().get_extras(&mut extras);
            let Some(info) = extras.get::<HttpInfo>() else {
                return Err("egress policy: the connection has no peer address to check".into());
            };
            let peer = info.remote_addr();
            match policy.check(peer.ip(), peer.port(), Some(info.local_addr().ip())) {
                Ok(()) => Ok(connection),
                Err(reason) => Err(Box::new(Denied {
                    host: None,
                    ip: peer.ip(),
                    port: Some(peer.port()),
                    reason,
                }) as BoxError),
            }
        })
    }
}

/// An outbound HTTP client bound to one [`Policy`]: its resolver, connector layer and
/// redirect policy all enforce it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbound {
    client: reqwest::Client,
    policy: Arc<Policy>,
}

impl Outbound {
    pub fn build(policy: Policy, connect_timeout: Duration) -> Result<Outbound, String> {
        let policy = Arc::new(policy);
        let redirects = policy.clone();
        let client = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .user_agent(concat!("moontide/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .dns_resolver(PolicyResolver {
                policy: policy.clone(),
            })
            .connector_layer(PeerCheckLayer {
                policy: policy.clone(),
            })
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt
                        .error(format!("too many redirects (more than {MAX_REDIRECTS})"));
                }
                match redirects.check_url(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(denied) => attempt.error(denied),
                }
            }))
            .build()
            .map_err(|e| format!("building the outbound HTTP client: {e}"))?;
        Ok(Outbound { client, policy })
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }
}

/// Told of every denial (the server counts them in its metrics). Called on the calling
/// function's thread; denials are rare, so it may look a label up.
pub trait EgressObserver: Send + Sync + 'static {
    fn denied(&self, function: &str, reason: DenyReason);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> AllowRule {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn node(allow: &[&str]) -> Arc<NodeEgress> {
        Arc::new(NodeEgress {
            allow: allow.iter().map(|r| rule(r)).collect(),
            admin_listeners: vec!["127.0.0.1:9080".parse().unwrap()],
            data_plane_listeners: vec!["0.0.0.0:8080".parse().unwrap()],
        })
    }

    fn url_check(policy: &Policy, url: &str) -> Result<(), DenyReason> {
        let url = reqwest::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        policy.check_url(&url).map_err(|denied| denied.reason)
    }

    /// Every spelling of an address the URL parser accepts reaches the check as the
    /// address itself.
    #[test]
    fn every_spelling_of_a_denied_address_is_denied() {
        use DenyReason::*;
        let policy = Policy::new(node(&[]), vec![]);
        let cases = [
            // The admin listener, every way the URL parser spells 127.0.0.1.
            ("http://127.0.0.1:9080/metrics", AdminListener),
            ("http://2130706433:9080/", AdminListener),
            ("http://0x7f000001:9080/", AdminListener),
            ("http://0X7F000001:9080/", AdminListener),
            ("http://0x7f.1:9080/", AdminListener),
            ("http://127.1:9080/", AdminListener),
            ("http://127.0.1:9080/", AdminListener),
            ("http://0177.0.0.1:9080/", AdminListener),
            ("http://0177.0.0.01:9080/", AdminListener),
            ("http://017700000001:9080/", AdminListener),
            ("http://0x7f.0x0.0x0.0x1:9080/", AdminListener),
            ("http://127.0.0.1.:9080/", AdminListener),
            ("http://%31%32%37.0.0.1:9080/", AdminListener),
            ("http://\u{ff11}\u{ff12}\u{ff17}.0.0.1:9080/", AdminListener),
            ("http://[::ffff:127.0.0.1]:9080/", AdminListener),
            ("http://[::ffff:7f00:1]:9080/", AdminListener),
            ("http://[0:0:0:0:0:ffff:127.0.0.1]:9080/", AdminListener),
            ("http://[::ffff:0:127.0.0.1]:9080/", AdminListener),
            ("http://[::127.0.0.1]:9080/", AdminListener),
            ("http://[64:ff9b::127.0.0.1]:9080/", AdminListener),
            ("http://[64:ff9b::7f00:1]:9080/", AdminListener),
            ("http://[2002:7f00:1::]:9080/", AdminListener),
            ("http://0.0.0.0:9080/", AdminListener),
            ("http://0:9080/", AdminListener),
            ("http://[::]:9080/", AdminListener),
            // The data plane (bound to 0.0.0.0 here): loopback and unspecified reach it.
            ("http://127.0.0.1:8080/fn/self", DataPlane),
            ("http://127.9.9.9:8080/fn/self", DataPlane),
            ("http://[::1]:8080/fn/self", DataPlane),
            ("http://0x7f000001:8080/fn/self", DataPlane),
            // Loopback elsewhere.
            ("http://127.0.0.1/", Loopback),
            ("http://127.0.0.1:6379/", Loopback),
            ("http://127.255.255.254/", Loopback),
            ("http://[::1]/", Loopback),
            ("http://[0:0:0:0:0:0:0:1]/", Loopback),
            ("https://[::ffff:127.0.0.1]/", Loopback),
            ("http://2130706433/", Loopback),
            // Unspecified: "this host".
            ("http://0.0.0.0/", Unspecified),
            ("http://0/", Unspecified),
            ("http://0.1.2.3/", Unspecified),
            ("http://[::]/", Unspecified),
            ("http://[::ffff:0.0.0.0]/", Unspecified),
            // Cloud metadata, every spelling.
            ("http://169.254.169.254/latest/meta-data/", Metadata),
            ("http://2852039166/", Metadata),
            ("http://0xa9fea9fe/", Metadata),
            ("http://0251.0376.0251.0376/", Metadata),
            ("http://169.254.43518/", Metadata),
            ("http://[::ffff:169.254.169.254]/", Metadata),
            ("http://[::ffff:a9fe:a9fe]/", Metadata),
            ("http://[64:ff9b::169.254.169.254]/", Metadata),
            ("http://[2002:a9fe:a9fe::1]/", Metadata),
            ("http://169.254.170.2/v2/credentials", Metadata),
            ("http://100.100.100.200/latest/meta-data/", Metadata),
            ("http://[fd00:ec2::254]/latest/meta-data/", Metadata),
            // Link-local, private, CGNAT, multicast, broadcast, reserved.
            ("http://169.254.1.1/", LinkLocal),
            ("http://[fe80::1]/", LinkLocal),
            ("http://[febf::1]/", LinkLocal),
            ("http://10.0.0.1/", Private),
            ("http://167772161/", Private),
            ("http://172.16.0.1/", Private),
            ("http://172.31.255.255/", Private),
            ("http://192.168.1.1/", Private),
            ("http://0xc0a80101/", Private),
            ("http://[fc00::1]/", Private),
            ("http://[fd12:3456::1]/", Private),
            ("http://[fec0::1]/", Private),
            ("http://[64:ff9b:1::a00:1]/", Private),
            ("http://[::ffff:10.0.0.1]/", Private),
            ("http://[64:ff9b::10.0.0.1]/", Private),
            ("http://[2002:c0a8:101::]/", Private),
            ("http://100.64.0.1/", Cgnat),
            ("http://100.127.255.255/", Cgnat),
            ("http://224.0.0.1/", Multicast),
            ("http://239.255.255.250/", Multicast),
            ("http://[ff02::1]/", Multicast),
            ("http://255.255.255.255/", Broadcast),
            ("http://4294967295/", Broadcast),
            ("http://240.0.0.1/", Reserved),
            ("http://192.0.0.8/", Reserved),
            ("http://198.18.0.1/", Reserved),
            ("http://[100::1]/", Reserved),
            ("http://[2001::1]/", Reserved),
            ("http://[::2:0:0:1]/", Reserved),
        ];
        let mut wrong = Vec::new();
        for (url, expected) in cases {
            let got = url_check(&policy, url);
            if got != Err(expected) {
                wrong.push(format!("{url}: expected {expected:?}, got {got:?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    #[test]
    fn public_addresses_and_names_pass_the_url_check() {
        let policy = Policy::new(node(&[]), vec![]);
        for url in [
            "http://93.184.215.14/",
            "https://1.1.1.1:8443/",
            "http://[2606:4700:4700::1111]/",
            "http://[64:ff9b::1.1.1.1]/",
            "http://[2002:101:101::]/",
            "http://100.128.0.1/",
            "http://172.32.0.1/",
            "http://example.com:9080/",
            // A name is checked when it resolves, not here.
            "http://localhost:9080/",
        ] {
            assert_eq!(url_check(&policy, url), Ok(()), "{url}");
        }
    }

    #[test]
    fn allowlists_open_what_they_name_and_nothing_more() {
        use DenyReason::*;
        let base = node(&["127.0.0.1:8081", "10.0.0.0/8", "169.254.0.0/16"]);
        let policy = Policy::new(base.clone(), vec![]);
        assert_eq!(url_check(&policy, "http://127.0.0.1:8081/"), Ok(()));
        assert_eq!(
            url_check(&policy, "http://[::ffff:127.0.0.1]:8081/"),
            Ok(())
        );
        assert_eq!(url_check(&policy, "http://127.0.0.1:8082/"), Err(Loopback));
        assert_eq!(url_check(&policy, "http://10.1.2.3:5432/"), Ok(()));
        assert_eq!(url_check(&policy, "http://169.254.1.1/"), Ok(()));
        assert_eq!(url_check(&policy, "http://192.168.1.1/"), Err(Private));
        // A range never opens metadata, the unspecified address or the node's listeners.
        let wide = Policy::new(node(&["0.0.0.0/0", "::/0"]), vec![]);
        assert_eq!(url_check(&wide, "http://127.0.0.1:6379/"), Ok(()));
        assert_eq!(url_check(&wide, "http://[fe80::1]/"), Ok(()));
        assert_eq!(url_check(&wide, "http://169.254.169.254/"), Err(Metadata));
        assert_eq!(url_check(&wide, "http://[fd00:ec2::254]/"), Err(Metadata));
        assert_eq!(url_check(&wide, "http://0.0.0.0:8081/"), Err(Unspecified));
        assert_eq!(url_check(&wide, "http://[::]:8081/"), Err(Unspecified));
        assert_eq!(
            url_check(&wide, "http://127.0.0.1:9080/"),
            Err(AdminListener)
        );
        assert_eq!(url_check(&wide, "http://127.0.0.1:8080/"), Err(DataPlane));
        // The resolver's port-less check keeps an address some entry opens.
        assert_eq!(policy.check_ip("127.0.0.1".parse().unwrap()), Ok(()));
        assert_eq!(policy.check_ip("127.0.0.2".parse().unwrap()), Err(Loopback));
        assert_eq!(policy.check_ip("::1".parse().unwrap()), Err(Loopback));

        // A function's own entries: an exact address opens metadata; an exact address
        // and port opens the data plane; nothing opens the admin listener.
        let own = Policy::new(
            base,
            vec![
                rule("169.254.169.254"),
                rule("127.0.0.1:8080"),
                rule("127.0.0.1:9080"),
            ],
        );
        assert_eq!(url_check(&own, "http://169.254.169.254/"), Ok(()));
        assert_eq!(url_check(&own, "http://127.0.0.1:8080/fn/x"), Ok(()));
        assert_eq!(
            url_check(&own, "http://127.0.0.2:8080/fn/x"),
            Err(DataPlane)
        );
        assert_eq!(
            url_check(&own, "http://127.0.0.1:9080/"),
            Err(AdminListener)
        );
        let range = Policy::new(Arc::new(NodeEgress::default()), vec![rule("127.0.0.0/8")]);
        assert_eq!(url_check(&range, "http://127.0.0.1:6379/"), Ok(()));
    }

    #[test]
    fn own_addresses_are_recognised_once_connected() {
        let policy = Policy::new(node(&["0.0.0.0/0"]), vec![]);
        let public: IpAddr = "203.0.113.7".parse().unwrap();
        // Another host's port 8080: fine. This host's (peer == local): its data plane.
        assert_eq!(
            policy.check(public, 8080, Some("198.51.100.1".parse().unwrap())),
            Ok(())
        );
        assert_eq!(
            policy.check(public, 8080, Some(public)),
            Err(DenyReason::DataPlane)
        );
        // The admin listener is bound to 127.0.0.1 only: another local address does not
        // reach it.
        assert_eq!(policy.check(public, 9080, Some(public)), Ok(()));
    }

    #[test]
    fn allow_rules_parse_and_print_normalised() {
        for (text, shown) in [
            ("127.0.0.1", "127.0.0.1"),
            ("127.0.0.1/32", "127.0.0.1"),
            ("127.0.0.1:8081", "127.0.0.1:8081"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("10.0.0.0/8:443", "10.0.0.0/8:443"),
            ("::1", "::1"),
            ("[::1]:8081", "[::1]:8081"),
            ("fd00::/8", "fd00::/8"),
            ("[fd00::/8]:443", "[fd00::/8]:443"),
            (" 0.0.0.0/0 ", "0.0.0.0/0"),
        ] {
            assert_eq!(rule(text).to_string(), shown, "{text}");
            assert_eq!(rule(shown), rule(text));
        }
        for bad in [
            "",
            "localhost",
            "127.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:http",
            "10.0.0.0/33",
            "[::1",
            "[::1]8081",
            "::ffff:127.0.0.1",
            "[::ffff:7f00:1]:80",
            "2130706433",
        ] {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad:?} parsed");
        }
    }

    #[tokio::test]
    async fn the_resolver_drops_denied_addresses_of_a_name() {
        use reqwest::dns::Resolve;
        let resolver = PolicyResolver {
            policy: Arc::new(Policy::new(node(&[]), vec![])),
        };
        let error = match resolver.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("localhost resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(error) => error,
        };
        let denied = find_denied(error.as_ref()).expect("a policy denial");
        assert_eq!(denied.reason, DenyReason::Loopback);
        assert!(
            denied.to_string().starts_with("egress to localhost ("),
            "{denied}"
        );
        let open = PolicyResolver {
            policy: Arc::new(Policy::new(node(&["127.0.0.1"]), vec![])),
        };
        let kept: Vec<SocketAddr> = open
            .resolve("localhost".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert!(!kept.is_empty());
        assert!(
            kept.iter().all(|a| a.ip() == IpAddr::from([127, 0, 0, 1])),
            "{kept:?}"
        );
    }

    /// A loopback HTTP/1.1 server: `/ok` answers 200, `/to?URL` redirects to URL.
    async fn backend() -> SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let target = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let answer = match target.strip_prefix("/to?") {
                        Some(location) => format!(
                            "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n"
                        ),
                        None => "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string(),
                    };
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        addr
    }

    /// A listener that records how many bytes each connection sent before closing.
    async fn recorder() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<usize>) {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (sender, received) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let sender = sender.clone();
                tokio::spawn(async move {
                    let mut bytes = Vec::new();
                    let _ = stream.read_to_end(&mut bytes).await;
                    let _ = sender.send(bytes.len());
                });
            }
        });
        (addr, received)
    }

    async fn get(outbound: &Outbound, url: &str) -> Result<String, Denied> {
        let url = reqwest::Url::parse(url).unwrap();
        outbound.policy().check_url(&url)?;
        match outbound.client().get(url).send().await {
            Ok(response) => Ok(response.text().await.unwrap()),
            Err(error) => Err(find_denied(&error)
                .unwrap_or_else(|| panic!("not a denial: {error:?}"))
                .clone()),
        }
    }

    /// Through reqwest: an allowlisted backend answers (by address and by name); a
    /// redirect to metadata is refused at the redirect; a name that resolves to an
    /// allowed address but on another port is refused once connected, before a byte of
    /// the request is written.
    #[tokio::test]
    async fn the_client_enforces_the_policy_on_names_ports_and_redirects() {
        crate::install_crypto_provider();
        let backend = backend().await;
        let (other, mut other_bytes) = recorder().await;
        let node = Arc::new(NodeEgress {
            allow: vec![rule(&format!("127.0.0.1:{}", backend.port()))],
            ..NodeEgress::default()
        });
        let outbound = Outbound::build(Policy::new(node, vec![]), Duration::from_secs(5)).unwrap();
        let port = backend.port();
        assert_eq!(
            get(&outbound, &format!("http://127.0.0.1:{port}/ok")).await,
            Ok("ok".into())
        );
        assert_eq!(
            get(&outbound, &format!("http://localhost:{port}/ok")).await,
            Ok("ok".into())
        );

        let to_metadata = format!("http://127.0.0.1:{port}/to?http://169.254.169.254/latest/");
        let denied = get(&outbound, &to_metadata).await.unwrap_err();
        assert_eq!(denied.reason, DenyReason::Metadata);
        assert_eq!(
            denied.to_string().split(" denied").next(),
            Some("egress to 169.254.169.254:80")
        );

        let to_other = format!(
            "http://127.0.0.1:{port}/to?http://localhost:{}/x",
            other.port()
        );
        let denied = get(&outbound, &to_other).await.unwrap_err();
        assert_eq!(denied.reason, DenyReason::Loopback);
        assert_eq!(denied.port, Some(other.port()));
        let sent = tokio::time::timeout(Duration::from_secs(5), other_bytes.recv()).await;
        assert_eq!(
            sent.unwrap(),
            Some(0),
            "request bytes reached a denied port"
        );

        // Directly, too: by name (checked once connected) and by address (before).
        let denied = get(&outbound, &format!("http://localhost:{}/", other.port())).await;
        assert_eq!(denied.unwrap_err().reason, DenyReason::Loopback);
        let denied = get(&outbound, &format!("http://127.0.0.1:{}/", other.port())).await;
        assert_eq!(denied.unwrap_err().reason, DenyReason::Loopback);
    }

    #[test]
    fn denials_read_clearly() {
        let denied = Denied {
            host: None,
            ip: "127.0.0.1".parse().unwrap(),
            port: Some(9080),
            reason: DenyReason::AdminListener,
        };
        assert_eq!(
            denied.to_string(),
            "egress to 127.0.0.1:9080 denied by policy: admin_listener (the node's own admin \
             API; no allowlist opens it)"
        );
        let boxed: BoxError = Box::new(denied.clone());
        assert_eq!(find_denied(boxed.as_ref()), Some(&denied));
    }
}
