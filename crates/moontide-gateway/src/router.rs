//! The routing table: which route, if any, a request belongs to.
//!
//! # Why it is persistent
//!
//! A gateway holds thousands of routes, and users change them while traffic flows (say 50
//! changes a second against 5 000 routes). A matcher that is rebuilt on every change makes each
//! change cost O(routes): APISIX rebuilds its radix tree per change and spends most of a core
//! on it at 20–50 changes/s. Here the data plane only reads an immutable snapshot, and a
//! [`Router`] is a *persistent* structure:
//!
//! - [`Clone`] is O(1): it copies four pointers.
//! - [`Router::insert`] and [`Router::remove`] copy only the trie nodes on the paths of the
//!   route they change (path copying over `Arc`s and [`imbl::OrdMap`] B-trees). A change costs
//!   O(hosts × paths × depth × log fan-out) of *that* route, plus the length of the entry list
//!   at the node where each of its paths ends (see below), never a pass over all routes.
//! - Every other clone, such as the snapshot the workers are reading, is left untouched.
//!
//! The publisher's loop is therefore: clone the current snapshot, apply the change, swap the
//! clone in whole (e.g. with `arc_swap`). Readers never take a lock and never see a half-applied
//! change.
//!
//! # Structure
//!
//! ```text
//! Router
//! ├── routes          OrdMap<id, Arc<Route>>            get / remove / replace by id
//! ├── exact_hosts     OrdMap<"api.example.com", Node>   hosts: ["api.example.com"]
//! ├── wildcard_hosts  OrdMap<".example.com", Node>      hosts: ["*.example.com"]
//! └── any_host        Node                              hosts: []
//!
//! Node (one per path segment, shared between snapshots through Arc)
//! ├── literal  OrdMap<segment, Node>    "users"
//! ├── param    Option<Node>             ":id" (any name: the shape is what matters)
//! ├── exact    [Entry]                  patterns that end here
//! └── prefix   [Entry]                  patterns that end here with "/*"
//! ```
//!
//! A route with several hosts and paths has one entry per (host, path). An entry list is
//! sorted by priority (highest first) then id; all entries of one list share the same path
//! shape and host, so the first entry of a list that passes the method, header and query
//! checks is that list's best. A list is a copied-on-write slice: changing it costs its length,
//! which is the number of routes with the very same host and path shape. Such routes differ
//! only in methods, headers or query, and [`Router::find`] scans that list anyway.
//!
//! [`Router::find`] looks the request's host up in `exact_hosts`, each of its suffixes in
//! `wildcard_hosts`, and takes `any_host`. It walks each of those tries once along the request's
//! segments, into the literal child and the param child, collecting the prefix entries of every
//! node it passes and the exact entries of the node where the path ends. Only those candidates
//! are checked against methods, headers and query, and a list whose best entry cannot beat the
//! current winner is skipped whole. A walk visits each trie node at most once; in practice it
//! visits one or two nodes per segment. Routes off the request's path are never looked at.
//!
//! # Matching rules
//!
//! A request matches a route when all of these hold:
//!
//! - **Host.** The request's host has its port removed, is lowercased, and loses one trailing
//!   `.`. A route with no `hosts` matches any request, with or without a host. An exact host
//!   (`api.example.com`) matches that host. `*.example.com` matches any host that ends in
//!   `.example.com` with at least one label before it, but not `example.com` itself. A request
//!   without a host matches only routes with no `hosts`.
//! - **Path.** The path is matched as given: the router does not decode or normalise it. The
//!   data plane hands it the normal form ([`crate::path::normalize`]: unreserved characters
//!   decoded, other encodings uppercased, dot segments removed, slashes merged), so a pattern
//!   must be written in that form (`/a%3Ab`, not `/a%3ab` or `/a/./b`): validation refuses
//!   one that is not, naming its normal form. An
//!   empty path is `/`; a path that does not start with `/` (such as the `*` of `OPTIONS *`)
//!   matches nothing. Patterns:
//!   - `/exact` matches only `/exact`. The trailing slash counts: `/a` does not match `/a/`, and
//!     `/a/` does not match `/a`.
//!   - `/` alone matches only the root.
//!   - `:name` as a whole segment matches exactly one non-empty segment and captures it.
//!   - `/prefix/*` matches `/prefix`, `/prefix/` and everything below `/prefix/`, at a segment
//!     boundary (not `/prefixes`). `/*` matches every path. The last segment may name the rest:
//!     `/files/*path`. The rest ([`Match::rest`], and the named capture) is the part of the path
//!     below `prefix/`, without a leading slash: `v1/x` for `/api/*` on `/api/v1/x`, and the
//!     empty string on `/api` and `/api/`.
//! - **Method.** Any method when `methods` is empty, otherwise one of them (case-sensitive;
//!   `HEAD` is not implied by `GET`).
//! - **Headers.** Every matcher holds. Names are case-insensitive, values are compared as
//!   bytes, case-sensitively. A header sent several times satisfies a matcher if any of its
//!   values does.
//! - **Query.** Every matcher holds. The query string is parsed as
//!   `application/x-www-form-urlencoded` (percent-decoded, `+` is a space); when a name occurs
//!   more than once, its first occurrence counts. `Present` holds for `?a` and `?a=`.
//!
//! Among the routes that match, the winner is decided by, in order:
//!
//! 1. the higher `priority`;
//! 2. the more specific path: an all-literal pattern, then a pattern with params, then a
//!    prefix. Among patterns with params, more literal segments first, then the one whose
//!    first difference from the other is a literal (`/a/b/:y` before `/a/:x/c`). Among
//!    prefixes, the deeper one (`/api/v1/*` before `/api/*`), then the same two rules;
//! 3. the more specific host: exact, then the longer wildcard suffix, then any host;
//! 4. the smaller route id, so that the answer never depends on insertion order.
//!
//! # Validation
//!
//! [`Router::insert`] (and [`RouteSpec::validate`]) reject a spec with every problem at once,
//! each with the path of its field (`paths[1]`, `hosts[0]`, `headers[2].name`): no paths; a
//! path that is empty, does not start with `/`, holds whitespace, control or non-ASCII
//! characters, `?`, `#`, `{` or `}`, an empty segment (`//`, except a trailing `/`), or a `*`
//! anywhere but as the whole last segment; a param with an empty or non-`[A-Za-z0-9_]` name,
//! or a name used twice in one pattern; two paths that match the same requests; a host that is
//! empty, `*` alone, has a wildcard anywhere but a leading `*.` label, a port, characters
//! other than ASCII letters, digits, `-`, `_` and `.` (or a bracketed IPv6 literal), an empty
//! label or a label over 63 bytes; a method name with lowercase letters; an invalid header
//! name; a header value no request can carry; an empty query name; any duplicate entry. Hosts
//! are lowercased.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method};
use imbl::OrdMap;

/// What a route matches. Checked and normalised by [`RouteSpec::validate`] when it is
/// inserted; see the [module docs](self) for the exact rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteSpec {
    /// Empty: any host. `"api.example.com"`: exact, case-insensitive; the port of the
    /// request's host is ignored. `"*.example.com"`: any host ending in `.example.com`, with
    /// one or more labels before it (not `example.com` itself).
    pub hosts: Vec<String>,
    /// At least one. `"/exact"` matches only that path. `"/prefix/*"` matches `/prefix`,
    /// `/prefix/` and anything below `/prefix/`. `"/users/:id/posts"`: `:name` matches exactly
    /// one non-empty segment and captures it. A trailing `/*name` names the captured rest.
    /// `"/"` alone is the exact root; `"/*"` is everything.
    pub paths: Vec<String>,
    /// Empty: any method. Otherwise uppercase method names.
    pub methods: Vec<Method>,
    /// Header name → matcher; all must hold. Names are case-insensitive.
    pub headers: Vec<(String, ValueMatch)>,
    /// Query-string argument → matcher (form-urlencoded, first occurrence wins); all must hold.
    pub query: Vec<(String, ValueMatch)>,
    /// Higher wins over any difference in specificity.
    pub priority: i32,
}

/// A condition on a header value or a query argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueMatch {
    /// The header or argument is there, whatever its value (even empty).
    Present,
    /// The value is exactly this (case-sensitive).
    Exact(String),
    /// The value starts with this (case-sensitive).
    Prefix(String),
}

impl ValueMatch {
    fn matches(&self, value: &[u8]) -> bool {
        match self {
            ValueMatch::Present => true,
            ValueMatch::Exact(want) => value == want.as_bytes(),
            ValueMatch::Prefix(want) => value.starts_with(want.as_bytes()),
        }
    }
}

/// The parts of a request that routing looks at, borrowed from wherever the server keeps them.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The `Host` header or `:authority`, port included or not.
    pub host: Option<&'a str>,
    pub method: &'a Method,
    /// The raw (not percent-decoded) path, without the query string.
    pub path: &'a str,
    /// The raw query string, without the `?`.
    pub query: Option<&'a str>,
    pub headers: &'a dyn Headers,
}

/// A request's headers as the router reads them: whether any value of a header passes a
/// test. Implemented for `http::HeaderMap` and by the data plane's own parsed heads, so
/// that routing needs no header map built.
pub trait Headers {
    /// Whether some value of header `name` passes `test`.
    fn any_value(&self, name: &HeaderName, test: &mut dyn FnMut(&[u8]) -> bool) -> bool;
}

impl Headers for HeaderMap {
    fn any_value(&self, name: &HeaderName, test: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.get_all(name)
            .iter()
            .any(|value| test(value.as_bytes()))
    }
}

/// The route a request matched, and what the match captured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<'r, T> {
    /// The id the route was inserted under.
    pub id: &'r str,
    pub value: &'r T,
    /// Captured `:name` params and the named rest (`/*name`), in path order.
    pub params: Vec<(&'r str, String)>,
    /// The path pattern that matched, as written (e.g. `"/users/:id"`), for logs and metric
    /// labels.
    pub pattern: &'r str,
    /// For prefix patterns, the part of the request path below the prefix, without its
    /// leading slash (`"v1/x"` for `/api/*` on `/api/v1/x`); `""` for other patterns.
    pub rest: String,
}

impl<T> Match<'_, T> {
    /// The value captured by the param (or named rest) `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One problem in a [`RouteSpec`], with the path of the offending field (`"paths[1]"`,
/// `"hosts[0]"`, `"headers[2].name"`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct SpecError {
    pub path: String,
    pub message: String,
}

impl RouteSpec {
    /// Checks the spec and reports every problem at once. [`Router::insert`] runs the same
    /// checks.
    pub fn validate(&self) -> Result<(), Vec<SpecError>> {
        compile(self).map(drop)
    }
}

/// The routing table. See the [module docs](self) for its structure and rules.
///
/// Cloning is O(1) and clones share everything; a change to one clone copies only what it
/// touches and is never seen by the others.
pub struct Router<T> {
    routes: OrdMap<Arc<str>, Arc<Route<T>>>,
    exact_hosts: OrdMap<Arc<str>, Arc<Node<T>>>,
    /// Keyed by the suffix with its leading dot: `"*.example.com"` → `".example.com"`.
    wildcard_hosts: OrdMap<Arc<str>, Arc<Node<T>>>,
    any_host: Option<Arc<Node<T>>>,
}

impl<T> Clone for Router<T> {
    fn clone(&self) -> Self {
        Router {
            routes: self.routes.clone(),
            exact_hosts: self.exact_hosts.clone(),
            wildcard_hosts: self.wildcard_hosts.clone(),
            any_host: self.any_host.clone(),
        }
    }
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Router {
            routes: OrdMap::new(),
            exact_hosts: OrdMap::new(),
            wildcard_hosts: OrdMap::new(),
            any_host: None,
        }
    }
}

impl<T> fmt::Debug for Router<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("routes", &self.routes.len())
            .field("exact_hosts", &self.exact_hosts.len())
            .field("wildcard_hosts", &self.wildcard_hosts.len())
            .finish_non_exhaustive()
    }
}

impl<T> Router<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks `spec` and reports every problem at once; the same as [`RouteSpec::validate`].
    pub fn validate(spec: &RouteSpec) -> Result<(), Vec<SpecError>> {
        spec.validate()
    }

    /// Adds the route `id`, or replaces it: the old spec's entries are removed first. On
    /// error the table is unchanged.
    ///
    /// Cost: O(hosts × paths × depth × log fan-out) for this route (twice when it replaces
    /// one), plus the entry lists it joins (see the [module docs](self)); independent of the
    /// number of routes in the table.
    pub fn insert(&mut self, id: &str, spec: RouteSpec, value: T) -> Result<(), Vec<SpecError>> {
        let spec = compile(&spec)?;
        self.remove(id);
        let route = Arc::new(Route {
            id: Arc::from(id),
            spec,
            value,
        });
        for host in route.spec.hosts.iter() {
            let root = self.bucket_mut(host);
            for (index, pattern) in route.spec.patterns.iter().enumerate() {
                let entry = Entry {
                    route: Arc::clone(&route),
                    pattern: index,
                };
                root.add(&pattern.segments, pattern.is_prefix(), entry);
            }
        }
        self.routes.insert(Arc::clone(&route.id), route);
        Ok(())
    }

    /// Removes the route `id`; false if there was none. Trie nodes left empty are dropped.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(route) = self.routes.remove(id) else {
            return false;
        };
        for host in route.spec.hosts.iter() {
            let emptied = match host {
                HostKey::Any => self.any_host.as_mut().is_some_and(|root| {
                    remove_patterns(Arc::make_mut(root), &route);
                    root.is_empty()
                }),
                HostKey::Exact(name) => remove_in(&mut self.exact_hosts, name, &route),
                HostKey::Suffix(suffix) => remove_in(&mut self.wildcard_hosts, suffix, &route),
            };
            if emptied {
                match host {
                    HostKey::Any => self.any_host = None,
                    HostKey::Exact(name) => {
                        self.exact_hosts.remove(&**name);
                    }
                    HostKey::Suffix(suffix) => {
                        self.wildcard_hosts.remove(&**suffix);
                    }
                }
            }
        }
        true
    }

    /// The number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The value of the route `id`.
    pub fn get(&self, id: &str) -> Option<&T> {
        self.routes.get(id).map(|route| &route.value)
    }

    /// True when the route `id` exists.
    pub fn contains(&self, id: &str) -> bool {
        self.routes.contains_key(id)
    }

    /// Every route's id and value, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &T)> {
        self.routes.iter().map(|(id, route)| (&**id, &route.value))
    }

    /// The route `request` matches, if any; see the [module docs](self) for the rules.
    ///
    /// Allocation-free until the winner is known, except to lowercase a host that has
    /// uppercase letters and to decode the query string when a candidate has query matchers.
    pub fn find<'r>(&'r self, request: &Request<'_>) -> Option<Match<'r, T>> {
        let path = if request.path.is_empty() {
            "/"
        } else {
            request.path
        };
        let start = below_root(path)?;
        let mut search = Search {
            request,
            query: None,
            best: None,
        };
        if let Some(host) = request.host.map(normalize_request_host) {
            if let Some(root) = self.exact_hosts.get(&*host) {
                search.walk(root, HostRank::Exact, start);
            }
            if !self.wildcard_hosts.is_empty() {
                for (dot, _) in host.match_indices('.').filter(|&(dot, _)| dot > 0) {
                    let suffix = &host[dot..];
                    if let Some(root) = self.wildcard_hosts.get(suffix) {
                        search.walk(root, HostRank::Suffix(suffix.len()), start);
                    }
                }
            }
        }
        if let Some(root) = &self.any_host {
            search.walk(root, HostRank::Any, start);
        }
        search.best.map(|winner| winner.into_match(start))
    }

    /// The trie of `host`, created if missing, made unique to this router.
    fn bucket_mut(&mut self, host: &HostKey) -> &mut Node<T> {
        let root = match host {
            HostKey::Any => self.any_host.get_or_insert_with(Arc::default),
            HostKey::Exact(name) => self.exact_hosts.entry(Arc::clone(name)).or_default(),
            HostKey::Suffix(suffix) => self.wildcard_hosts.entry(Arc::clone(suffix)).or_default(),
        };
        Arc::make_mut(root)
    }
}

/// Removes `route`'s entries from the trie of `key` in `buckets`; true if that trie is now
/// empty.
fn remove_in<T>(buckets: &mut OrdMap<Arc<str>, Arc<Node<T>>>, key: &str, route: &Route<T>) -> bool {
    buckets.get_mut(key).is_some_and(|root| {
        remove_patterns(Arc::make_mut(root), route);
        root.is_empty()
    })
}

fn remove_patterns<T>(root: &mut Node<T>, route: &Route<T>) {
    for (index, pattern) in route.spec.patterns.iter().enumerate() {
        root.remove(&pattern.segments, pattern.is_prefix(), &route.id, index);
    }
}

/// A route as stored: its id, its checked spec and its value.
struct Route<T> {
    id: Arc<str>,
    spec: Compiled,
    value: T,
}

/// A [`RouteSpec`] after validation: normalised and parsed.
struct Compiled {
    priority: i32,
    /// Never empty: no hosts in the spec is `[HostKey::Any]`.
    hosts: Box<[HostKey]>,
    patterns: Box<[Pattern]>,
    methods: Box<[Method]>,
    headers: Box<[(HeaderName, ValueMatch)]>,
    query: Box<[(String, ValueMatch)]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostKey {
    Any,
    Exact(Arc<str>),
    /// The suffix with its leading dot: `".example.com"`.
    Suffix(Arc<str>),
}

/// How specific the host of a candidate is; greater is more specific.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum HostRank {
    Any,
    /// The length of the matched wildcard suffix.
    Suffix(usize),
    Exact,
}

/// A parsed path pattern.
#[derive(Debug)]
struct Pattern {
    text: Box<str>,
    segments: Box<[Segment]>,
    /// `None`: exact. `Some(None)`: `/*`. `Some(Some(name))`: `/*name`.
    prefix: Option<Option<Box<str>>>,
    rank: PathRank,
}

impl Pattern {
    fn is_prefix(&self) -> bool {
        self.prefix.is_some()
    }

    /// What decides which requests the pattern matches (param names do not).
    fn shape(&self) -> (Vec<Option<&str>>, bool) {
        let segments = self
            .segments
            .iter()
            .map(|segment| match segment {
                Segment::Literal(literal) => Some(&**literal),
                Segment::Param(_) => None,
            })
            .collect();
        (segments, self.is_prefix())
    }
}

#[derive(Debug)]
enum Segment {
    Literal(Arc<str>),
    Param(Box<str>),
}

/// How specific a path pattern is; greater is more specific. Fields compare in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct PathRank {
    /// 2: all literal, 1: with params, 0: prefix.
    class: u8,
    /// Segments before the end (or before `*`).
    depth: u32,
    /// Literal segments among them.
    literals: u32,
    /// Bit 63 - i is set when segment i is literal (first 64 segments), so that, at equal
    /// counts, the pattern whose first difference is a literal wins.
    literal_mask: u64,
}

impl PathRank {
    fn of(segments: &[Segment], prefix: bool) -> PathRank {
        let mut literals = 0;
        let mut literal_mask = 0u64;
        for (i, segment) in segments.iter().enumerate() {
            if let Segment::Literal(_) = segment {
                literals += 1;
                if i < 64 {
                    literal_mask |= 1 << (63 - i);
                }
            }
        }
        let depth = segments.len() as u32;
        let class = match (prefix, literals == depth) {
            (true, _) => 0,
            (false, false) => 1,
            (false, true) => 2,
        };
        PathRank {
            class,
            depth,
            literals,
            literal_mask,
        }
    }
}

/// A route's place in a node's list: which of its patterns ends there.
struct Entry<T> {
    route: Arc<Route<T>>,
    pattern: usize,
}

impl<T> Clone for Entry<T> {
    fn clone(&self) -> Self {
        Entry {
            route: Arc::clone(&self.route),
            pattern: self.pattern,
        }
    }
}

impl<T> Entry<T> {
    /// The order of a node's list: highest priority first, then smallest id.
    fn list_key(&self) -> (Reverse<i32>, &str, usize) {
        (
            Reverse(self.route.spec.priority),
            &self.route.id,
            self.pattern,
        )
    }

    fn pattern(&self) -> &Pattern {
        &self.route.spec.patterns[self.pattern]
    }

    /// The full precedence key of this entry found under a host of rank `host`; greater wins.
    fn rank(&self, host: HostRank) -> Rank<'_> {
        (
            self.route.spec.priority,
            self.pattern().rank,
            host,
            Reverse(&self.route.id),
            Reverse(self.pattern),
        )
    }
}

type Rank<'r> = (i32, PathRank, HostRank, Reverse<&'r str>, Reverse<usize>);

/// A sorted entry list, shared between snapshots; `None` when empty.
type List<T> = Option<Arc<[Entry<T>]>>;

/// One trie node: a position in a path pattern.
struct Node<T> {
    literal: OrdMap<Arc<str>, Arc<Node<T>>>,
    param: Option<Arc<Node<T>>>,
    exact: List<T>,
    prefix: List<T>,
}

impl<T> Clone for Node<T> {
    /// O(1): every field is a shared pointer.
    fn clone(&self) -> Self {
        Node {
            literal: self.literal.clone(),
            param: self.param.clone(),
            exact: self.exact.clone(),
            prefix: self.prefix.clone(),
        }
    }
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literal: OrdMap::new(),
            param: None,
            exact: None,
            prefix: None,
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.param.is_none()
            && self.exact.is_none()
            && self.prefix.is_none()
    }

    /// Adds `entry` at the end of `segments`, copying the nodes on the way that are shared.
    fn add(&mut self, segments: &[Segment], prefix: bool, entry: Entry<T>) {
        match segments.split_first() {
            None => {
                let list = if prefix {
                    &mut self.prefix
                } else {
                    &mut self.exact
                };
                let old = list.as_deref().unwrap_or(&[]);
                let at = old.partition_point(|e| e.list_key() < entry.list_key());
                let mut new = Vec::with_capacity(old.len() + 1);
                new.extend_from_slice(&old[..at]);
                new.push(entry);
                new.extend_from_slice(&old[at..]);
                *list = Some(new.into());
            }
            Some((Segment::Literal(literal), rest)) => {
                let child = self.literal.entry(Arc::clone(literal)).or_default();
                Arc::make_mut(child).add(rest, prefix, entry);
            }
            Some((Segment::Param(_), rest)) => {
                let child = self.param.get_or_insert_with(Arc::default);
                Arc::make_mut(child).add(rest, prefix, entry);
            }
        }
    }

    /// Removes the entry of (`id`, `pattern`) at the end of `segments`, and the nodes it
    /// leaves empty.
    fn remove(&mut self, segments: &[Segment], prefix: bool, id: &str, pattern: usize) {
        match segments.split_first() {
            None => {
                let list = if prefix {
                    &mut self.prefix
                } else {
                    &mut self.exact
                };
                if let Some(old) = list.as_deref() {
                    let kept: Vec<Entry<T>> = old
                        .iter()
                        .filter(|e| !(&*e.route.id == id && e.pattern == pattern))
                        .cloned()
                        .collect();
                    *list = (!kept.is_empty()).then(|| kept.into());
                }
            }
            Some((Segment::Literal(literal), rest)) => {
                if let Some(child) = self.literal.get_mut(&**literal) {
                    let child = Arc::make_mut(child);
                    child.remove(rest, prefix, id, pattern);
                    if child.is_empty() {
                        self.literal.remove(&**literal);
                    }
                }
            }
            Some((Segment::Param(_), rest)) => {
                if let Some(child) = self.param.as_mut() {
                    let child = Arc::make_mut(child);
                    child.remove(rest, prefix, id, pattern);
                    if child.is_empty() {
                        self.param = None;
                    }
                }
            }
        }
    }
}

/// The state of one [`Router::find`].
struct Search<'r, 'q, T> {
    request: &'q Request<'q>,
    /// The decoded query string, parsed on first need.
    query: Option<Vec<(Cow<'q, str>, Cow<'q, str>)>>,
    best: Option<Candidate<'r, 'q, T>>,
}

struct Candidate<'r, 'q, T> {
    entry: &'r Entry<T>,
    host: HostRank,
    /// For a prefix entry, the path below the prefix.
    rest: &'q str,
}

impl<'r, 'q, T> Search<'r, 'q, T> {
    /// Visits `node`, which the request reached with `remaining` segments left (`None`: none).
    fn walk(&mut self, node: &'r Node<T>, host: HostRank, remaining: Option<&'q str>) {
        self.consider(&node.prefix, host, remaining.unwrap_or(""));
        let Some(remaining) = remaining else {
            self.consider(&node.exact, host, "");
            return;
        };
        let (segment, next) = split_segment(remaining);
        if let Some(child) = node.literal.get(segment) {
            self.walk(child, host, next);
        }
        if let (Some(child), false) = (&node.param, segment.is_empty()) {
            self.walk(child, host, next);
        }
    }

    /// Takes the best entry of `list` that accepts the request, if it beats the current best.
    fn consider(&mut self, list: &'r List<T>, host: HostRank, rest: &'q str) {
        let Some(list) = list.as_deref() else {
            return;
        };
        for entry in list {
            // The list is sorted best first, so once one entry cannot win, none can.
            if let Some(best) = &self.best {
                if entry.rank(host) <= best.entry.rank(best.host) {
                    return;
                }
            }
            if self.accepts(&entry.route.spec) {
                self.best = Some(Candidate { entry, host, rest });
                return;
            }
        }
    }

    /// Whether the request passes the method, header and query checks of `spec`.
    fn accepts(&mut self, spec: &Compiled) -> bool {
        let request = self.request;
        if !spec.methods.is_empty() && !spec.methods.contains(request.method) {
            return false;
        }
        let headers_hold = spec.headers.iter().all(|(name, want)| {
            request
                .headers
                .any_value(name, &mut |value| want.matches(value))
        });
        if !headers_hold {
            return false;
        }
        if spec.query.is_empty() {
            return true;
        }
        let args = self.query.get_or_insert_with(|| {
            let raw = request.query.unwrap_or("");
            form_urlencoded::parse(raw.as_bytes()).collect()
        });
        spec.query.iter().all(|(name, want)| {
            let first = args.iter().find(|(arg, _)| arg == name);
            first.is_some_and(|(_, value)| want.matches(value.as_bytes()))
        })
    }
}

impl<'r, T> Candidate<'r, '_, T> {
    /// Builds the answer: captures the params of the winning pattern from the path that
    /// starts with `start` (the segments below the root).
    fn into_match(self, start: Option<&str>) -> Match<'r, T> {
        let entry = self.entry;
        let pattern = entry.pattern();
        let mut params = Vec::new();
        let mut remaining = start;
        for segment in pattern.segments.iter() {
            // The walk reached this entry through these segments, so they are all there.
            let (value, next) = split_segment(remaining.unwrap_or(""));
            if let Segment::Param(name) = segment {
                params.push((&**name, value.to_owned()));
            }
            remaining = next;
        }
        if let Some(Some(name)) = &pattern.prefix {
            params.push((&**name, self.rest.to_owned()));
        }
        Match {
            id: &entry.route.id,
            value: &entry.route.value,
            params,
            pattern: &pattern.text,
            rest: self.rest.to_owned(),
        }
    }
}

/// The segments of `path` below the root: `None` for `/`, `Some("a/b")` for `/a/b`, and
/// nothing at all (the outer `None`) for a path that does not start with `/`.
fn below_root(path: &str) -> Option<Option<&str>> {
    let below = path.strip_prefix('/')?;
    Some((!below.is_empty()).then_some(below))
}

/// The first segment of `remaining` and what follows it: `("a", Some("b"))` for `"a/b"`,
/// `("a", Some(""))` for `"a/"`, `("a", None)` for `"a"`.
fn split_segment(remaining: &str) -> (&str, Option<&str>) {
    match remaining.split_once('/') {
        Some((segment, next)) => (segment, Some(next)),
        None => (remaining, None),
    }
}

/// The request's host as the tables key it: port removed, one trailing dot removed,
/// lowercased (allocating only when it has uppercase letters).
fn normalize_request_host(host: &str) -> Cow<'_, str> {
    let host = if host.starts_with('[') {
        // An IPv6 literal: `[::1]:8080`.
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        host.split_once(':').map_or(host, |(name, _port)| name)
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Collects the problems of one spec.
#[derive(Default)]
struct Problems(Vec<SpecError>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(SpecError {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Checks and normalises `spec`, reporting every problem at once.
fn compile(spec: &RouteSpec) -> Result<Compiled, Vec<SpecError>> {
    let mut problems = Problems::default();

    let mut hosts: Vec<(usize, HostKey)> = Vec::new();
    for (i, raw) in spec.hosts.iter().enumerate() {
        let at = format!("hosts[{i}]");
        match parse_host(raw) {
            Ok(key) => match hosts.iter().find(|(_, seen)| *seen == key) {
                Some((j, _)) => problems.add(at, format!("duplicate of hosts[{j}]")),
                None => hosts.push((i, key)),
            },
            Err(messages) => messages.into_iter().for_each(|m| problems.add(&at, m)),
        }
    }

    if spec.paths.is_empty() {
        problems.add("paths", "at least one path is required");
    }
    let mut patterns: Vec<(usize, Pattern)> = Vec::new();
    for (i, raw) in spec.paths.iter().enumerate() {
        let at = format!("paths[{i}]");
        match parse_pattern(raw) {
            Ok(pattern) => {
                let shape = pattern.shape();
                match patterns.iter().find(|(_, seen)| seen.shape() == shape) {
                    Some((j, seen)) if seen.text == pattern.text => {
                        problems.add(at, format!("duplicate of paths[{j}]"))
                    }
                    Some((j, seen)) => problems.add(
                        at,
                        format!(
                            "matches the same requests as paths[{j}] (`{}`): only param names differ",
                            seen.text
                        ),
                    ),
                    None => patterns.push((i, pattern)),
                }
            }
            Err(messages) => messages.into_iter().for_each(|m| problems.add(&at, m)),
        }
    }

    let mut methods: Vec<(usize, &Method)> = Vec::new();
    for (i, method) in spec.methods.iter().enumerate() {
        let at = format!("methods[{i}]");
        let name = method.as_str();
        if name.bytes().any(|b| b.is_ascii_lowercase()) {
            let upper = name.to_ascii_uppercase();
            problems.add(
                at,
                format!("`{name}` is not uppercase: methods are case-sensitive (`{upper}`)"),
            );
        } else if let Some((j, _)) = methods.iter().find(|(_, seen)| *seen == method) {
            problems.add(at, format!("duplicate of methods[{j}]"));
        } else {
            methods.push((i, method));
        }
    }

    let mut headers: Vec<(usize, HeaderName, ValueMatch)> = Vec::new();
    for (i, (name, want)) in spec.headers.iter().enumerate() {
        let value_problem = check_header_value(want).err();
        if let Some(message) = value_problem {
            problems.add(format!("headers[{i}].value"), message);
        }
        let at = format!("headers[{i}].name");
        match HeaderName::from_bytes(name.as_bytes()) {
            Err(_) => problems.add(at, format!("`{name}` is not a valid HTTP header name")),
            Ok(name) => match headers.iter().find(|(_, seen, _)| *seen == name) {
                Some((j, _, _)) => problems.add(at, format!("duplicate of headers[{j}].name")),
                None if value_problem.is_none() => headers.push((i, name, want.clone())),
                None => {}
            },
        }
    }

    let mut query: Vec<(usize, &str, &ValueMatch)> = Vec::new();
    for (i, (name, want)) in spec.query.iter().enumerate() {
        let at = format!("query[{i}].name");
        if name.is_empty() {
            problems.add(at, "query argument name is empty");
        } else if let Some((j, _, _)) = query.iter().find(|(_, seen, _)| *seen == name) {
            problems.add(at, format!("duplicate of query[{j}].name"));
        } else {
            query.push((i, name, want));
        }
    }

    if !problems.0.is_empty() {
        return Err(problems.0);
    }
    let mut hosts: Box<[HostKey]> = hosts.into_iter().map(|(_, key)| key).collect();
    if hosts.is_empty() {
        hosts = Box::new([HostKey::Any]);
    }
    Ok(Compiled {
        priority: spec.priority,
        hosts,
        patterns: patterns.into_iter().map(|(_, p)| p).collect(),
        methods: methods.into_iter().map(|(_, m)| m.clone()).collect(),
        headers: headers.into_iter().map(|(_, n, v)| (n, v)).collect(),
        query: query
            .into_iter()
            .map(|(_, n, v)| (n.to_owned(), v.clone()))
            .collect(),
    })
}

/// A header matcher whose value no request can carry is a mistake worth reporting.
fn check_header_value(want: &ValueMatch) -> Result<(), &'static str> {
    let (value, exact) = match want {
        ValueMatch::Present => return Ok(()),
        ValueMatch::Exact(value) => (value, true),
        ValueMatch::Prefix(value) => (value, false),
    };
    if http::HeaderValue::from_bytes(value.as_bytes()).is_err() {
        return Err("can never match: header values cannot contain control characters");
    }
    let trimmed_start = value.starts_with([' ', '\t']);
    let trimmed_end = exact && value.ends_with([' ', '\t']);
    if trimmed_start || trimmed_end {
        return Err("can never match: header values arrive with surrounding whitespace removed");
    }
    Ok(())
}

/// Parses and lowercases one of `RouteSpec::hosts`.
fn parse_host(raw: &str) -> Result<HostKey, Vec<String>> {
    let host = raw.to_ascii_lowercase();
    if host.is_empty() {
        return Err(vec![
            "host is empty (leave `hosts` empty to match any host)".into(),
        ]);
    }
    if host == "*" {
        return Err(vec![
            "`*` alone is not a host pattern (leave `hosts` empty to match any host)".into(),
        ]);
    }
    if let Some(inner) = host.strip_prefix('[') {
        // An IPv6 literal, as it appears in a Host header.
        let ok = inner.strip_suffix(']').is_some_and(|address| {
            !address.is_empty()
                && address
                    .chars()
                    .all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.')
        });
        return match ok {
            true => Ok(HostKey::Exact(host.into())),
            false => Err(vec![
                "invalid IPv6 literal: expected hex digits, `:` and `.` inside `[...]`, no port"
                    .into(),
            ]),
        };
    }
    let (wildcard, name) = match host.strip_prefix("*.") {
        Some(name) => (true, name),
        None => (false, host.as_str()),
    };
    let mut messages = Vec::new();
    if name.contains('*') {
        messages.push(
            "a wildcard is only allowed as the whole first label (`*.example.com`)".to_owned(),
        );
    }
    if name.contains(':') {
        messages.push("must not include a port: the port of the request's host is ignored".into());
    }
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*' | ':');
    if let Some(c) = name.chars().find(|&c| !valid(c)) {
        let hint = if c.is_ascii() {
            "a host is ASCII letters, digits, `-`, `_` and `.`"
        } else {
            "write internationalised names in their punycode (`xn--`) form"
        };
        messages.push(format!("invalid character `{c}`: {hint}"));
    }
    if name.split('.').any(str::is_empty) {
        messages.push("empty label (a leading, trailing or doubled `.`)".into());
    }
    if let Some(label) = name.split('.').find(|label| label.len() > 63) {
        messages.push(format!("label `{label}` is longer than 63 characters"));
    }
    if host.len() > 253 {
        messages.push("longer than 253 characters".into());
    }
    if !messages.is_empty() {
        return Err(messages);
    }
    Ok(match wildcard {
        true => HostKey::Suffix(Arc::from(&host[1..])),
        false => HostKey::Exact(host.into()),
    })
}

/// A problem with the param name `name`, given the names seen before it in the pattern.
fn check_param_name<'a>(name: &'a str, seen: &mut Vec<&'a str>) -> Option<String> {
    let problem = if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Some(format!(
            "param name `{name}` may only contain ASCII letters, digits and `_`"
        ))
    } else if seen.contains(&name) {
        Some(format!("param `{name}` appears twice"))
    } else {
        None
    };
    seen.push(name);
    problem
}

/// Parses one of `RouteSpec::paths`.
fn parse_pattern(raw: &str) -> Result<Pattern, Vec<String>> {
    let mut messages: Vec<String> = Vec::new();
    let mut say = |message: String| {
        if !messages.contains(&message) {
            messages.push(message);
        }
    };
    if raw.is_empty() {
        return Err(vec!["path is empty: it must start with `/`".into()]);
    }
    if !raw.starts_with('/') {
        say("must start with `/`".into());
    }
    for c in raw.chars() {
        match c {
            c if c.is_whitespace() || c.is_control() => {
                say("contains whitespace or a control character".into())
            }
            '?' => say(
                "contains `?`: the query string is not part of the path (match it with `query`)"
                    .into(),
            ),
            '#' => say("contains `#`: a fragment is never sent to the server".into()),
            '{' | '}' => {
                say("contains `{` or `}`: params are written `:name`, not `{name}`".into())
            }
            c if !c.is_ascii() => say(
                "contains a non-ASCII character: write it percent-encoded, as clients send it"
                    .into(),
            ),
            _ => {}
        }
    }

    let body = raw.strip_prefix('/').unwrap_or(raw);
    let parts: Vec<&str> = match body {
        "" => Vec::new(),
        body => body.split('/').collect(),
    };
    let last = parts.len().saturating_sub(1);
    let mut segments = Vec::new();
    let mut prefix = None;
    let mut names: Vec<&str> = Vec::new();
    for (k, part) in parts.iter().copied().enumerate() {
        if part.contains('*') {
            let name = part.strip_prefix('*').filter(|name| !name.contains('*'));
            match name {
                Some(name) if k == last => {
                    let problem = match name {
                        "" => None,
                        name => check_param_name(name, &mut names),
                    };
                    if let Some(problem) = problem {
                        say(problem);
                    }
                    prefix = Some((!name.is_empty()).then(|| name.into()));
                }
                _ => say(
                    "`*` is only allowed as the whole last segment (`/prefix/*` or `/prefix/*name`)"
                        .into(),
                ),
            }
        } else if let Some(name) = part.strip_prefix(':') {
            if name.is_empty() {
                say("param without a name: `:` must be followed by one".into());
            } else if let Some(problem) = check_param_name(name, &mut names) {
                say(problem);
            }
            segments.push(Segment::Param(name.into()));
        } else if part.is_empty() && k != last {
            say("empty segment (`//`)".into());
        } else {
            segments.push(Segment::Literal(part.into()));
        }
    }
    if !messages.is_empty() {
        return Err(messages);
    }
    // Requests are routed on their normal form (`crate::path`), so a pattern in another
    // form would never match.
    match crate::path::normalize(raw) {
        Ok(normal) if normal != raw => {
            return Err(vec![format!(
                "is not in normal form, so no request would match it (request paths are \
                 normalised before routing): write `{normal}`"
            )]);
        }
        Err(rejection) => {
            return Err(vec![format!(
                "no request can match it: requests whose path has this are refused ({rejection})"
            )]);
        }
        Ok(_) => {}
    }
    let rank = PathRank::of(&segments, prefix.is_some());
    Ok(Pattern {
        text: raw.into(),
        segments: segments.into(),
        prefix,
        rank,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// A spec with these paths and nothing else.
    fn paths(paths: &[&str]) -> RouteSpec {
        RouteSpec {
            paths: paths.iter().map(|p| p.to_string()).collect(),
            ..RouteSpec::default()
        }
    }

    fn with_hosts(hosts: &[&str], spec: RouteSpec) -> RouteSpec {
        RouteSpec {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            ..spec
        }
    }

    /// An owned request, borrowed as a [`Request`] by [`Req::find`].
    struct Req {
        host: Option<&'static str>,
        method: Method,
        path: &'static str,
        query: Option<&'static str>,
        headers: HeaderMap,
    }

    fn get(path: &'static str) -> Req {
        Req {
            host: None,
            method: Method::GET,
            path,
            query: None,
            headers: HeaderMap::new(),
        }
    }

    impl Req {
        fn host(self, host: &'static str) -> Req {
            Req {
                host: Some(host),
                ..self
            }
        }
        fn method(self, method: Method) -> Req {
            Req { method, ..self }
        }
        fn query(self, query: &'static str) -> Req {
            Req {
                query: Some(query),
                ..self
            }
        }
        fn header(mut self, name: &'static str, value: &'static str) -> Req {
            self.headers.append(name, HeaderValue::from_static(value));
            self
        }
        fn find<'r, T>(&self, router: &'r Router<T>) -> Option<Match<'r, T>> {
            router.find(&Request {
                host: self.host,
                method: &self.method,
                path: self.path,
                query: self.query,
                headers: &self.headers,
            })
        }
        /// The id of the winning route.
        fn winner<'r, T>(&self, router: &'r Router<T>) -> Option<&'r str> {
            self.find(router).map(|m| m.id)
        }
    }

    fn router(routes: &[(&str, RouteSpec)]) -> Router<String> {
        let mut router = Router::new();
        for (id, spec) in routes {
            router
                .insert(id, spec.clone(), format!("value of {id}"))
                .unwrap();
        }
        router
    }

    #[test]
    fn path_forms() {
        // (pattern, request path, expected: None = no match, Some((rest, params)))
        type Expect = Option<(&'static str, &'static [(&'static str, &'static str)])>;
        let cases: &[(&str, &str, Expect)] = &[
            ("/", "/", Some(("", &[]))),
            ("/", "", Some(("", &[]))),
            ("/", "/a", None),
            ("/a", "/a", Some(("", &[]))),
            ("/a", "/a/", None),
            ("/a", "/ab", None),
            ("/a/", "/a/", Some(("", &[]))),
            ("/a/", "/a", None),
            ("/a/b", "/a/b", Some(("", &[]))),
            ("/a/b", "/a", None),
            ("/a/b", "/a/b/c", None),
            ("/api/*", "/api", Some(("", &[]))),
            ("/api/*", "/api/", Some(("", &[]))),
            ("/api/*", "/api/v1/x", Some(("v1/x", &[]))),
            ("/api/*", "/api/v1/x/", Some(("v1/x/", &[]))),
            ("/api/*", "/apix", None),
            ("/api/*", "/apis/x", None),
            ("/api/*", "/", None),
            ("/*", "/", Some(("", &[]))),
            ("/*", "", Some(("", &[]))),
            ("/*", "/x/y", Some(("x/y", &[]))),
            ("/*", "*", None),
            ("/*", "x", None),
            ("/users/:id", "/users/42", Some(("", &[("id", "42")]))),
            ("/users/:id", "/users/", None),
            ("/users/:id", "/users", None),
            ("/users/:id", "/users/42/", None),
            ("/users/:id", "/users/42/x", None),
            ("/users/:id/", "/users/42/", Some(("", &[("id", "42")]))),
            ("/:a/:b", "/x/y", Some(("", &[("a", "x"), ("b", "y")]))),
            ("/:a/:b", "//y", None),
            (
                "/users/:id/posts/:post",
                "/users/7/posts/9",
                Some(("", &[("id", "7"), ("post", "9")])),
            ),
            (
                "/files/*path",
                "/files/a/b.txt",
                Some(("a/b.txt", &[("path", "a/b.txt")])),
            ),
            ("/files/*path", "/files", Some(("", &[("path", "")]))),
            ("/u/:id/*", "/u/1/x/y", Some(("x/y", &[("id", "1")]))),
            ("/u/:id/*", "/u/1", Some(("", &[("id", "1")]))),
            ("/u/:id/*", "/u", None),
            (
                "/u/:id/*rest",
                "/u/1/x",
                Some(("x", &[("id", "1"), ("rest", "x")])),
            ),
            // The router matches what it is given (the server gives it the normal form).
            ("/a%3Ab", "/a%3Ab", Some(("", &[]))),
            ("/a%3Ab", "/a:b", None),
            ("/a/b", "/a%2Fb", None),
            ("/:name", "/caf%C3%A9", Some(("", &[("name", "caf%C3%A9")]))),
            // A colon inside a segment is literal.
            ("/v1/things:batch", "/v1/things:batch", Some(("", &[]))),
            ("/v1/things:batch", "/v1/things", None),
        ];
        for (pattern, path, expect) in cases {
            let router = router(&[("r", paths(&[pattern]))]);
            let found = get(path).find(&router);
            let got = found.as_ref().map(|m| {
                let params: Vec<(&str, &str)> =
                    m.params.iter().map(|(n, v)| (*n, v.as_str())).collect();
                (m.rest.as_str(), params)
            });
            let want = expect.map(|(rest, params)| (rest, params.to_vec()));
            assert_eq!(got, want, "pattern {pattern:?} on path {path:?}");
            if let Some(m) = found {
                assert_eq!(m.pattern, *pattern);
                assert_eq!(m.id, "r");
                assert_eq!(m.value, "value of r");
            }
        }
    }

    #[test]
    fn the_most_specific_path_wins() {
        let router = router(&[
            ("exact", paths(&["/users/me"])),
            ("param", paths(&["/users/:id"])),
            ("param-deep", paths(&["/users/:id/posts"])),
            ("prefix", paths(&["/users/*"])),
            ("prefix-param", paths(&["/users/:id/*"])),
            ("root", paths(&["/*"])),
            ("a-x-c", paths(&["/a/:x/c"])),
            ("a-b-y", paths(&["/a/b/:y"])),
            ("a-x-y", paths(&["/a/:x/:y"])),
            ("api", paths(&["/api/*"])),
            ("api-v1", paths(&["/api/v1/*"])),
            ("api-v1-exact", paths(&["/api/v1"])),
        ]);
        let cases = [
            ("/users/me", "exact"),
            ("/users/42", "param"),
            ("/users/42/posts", "param-deep"),
            ("/users/42/likes", "prefix-param"),
            ("/users/me/likes", "prefix-param"),
            ("/users", "prefix"),
            ("/users/", "prefix"),
            ("/other", "root"),
            ("/", "root"),
            ("/a/b/c", "a-b-y"),
            ("/a/z/c", "a-x-c"),
            ("/a/z/z", "a-x-y"),
            ("/api/v1/x", "api-v1"),
            ("/api/v1", "api-v1-exact"),
            ("/api/v2", "api"),
            ("/apix", "root"),
        ];
        for (path, want) in cases {
            assert_eq!(get(path).winner(&router), Some(want), "{path}");
        }
    }

    #[test]
    fn priority_overrides_specificity() {
        let mut router = router(&[
            ("exact", paths(&["/users/me"])),
            ("param", paths(&["/users/:id"])),
        ]);
        let catch_all = RouteSpec {
            priority: 10,
            ..paths(&["/*"])
        };
        router.insert("catch-all", catch_all, "x".into()).unwrap();
        assert_eq!(get("/users/me").winner(&router), Some("catch-all"));
        let below = RouteSpec {
            priority: -1,
            ..paths(&["/*"])
        };
        router.insert("catch-all", below, "x".into()).unwrap();
        assert_eq!(get("/users/me").winner(&router), Some("exact"));
        assert_eq!(get("/nope").winner(&router), Some("catch-all"));
    }

    #[test]
    fn ties_go_to_the_smaller_id_whatever_the_insertion_order() {
        for order in [["b", "a", "c"], ["c", "b", "a"], ["a", "c", "b"]] {
            let mut router = Router::new();
            for id in order {
                router.insert(id, paths(&["/x"]), ()).unwrap();
            }
            assert_eq!(get("/x").winner(&router), Some("a"), "{order:?}");
        }
    }

    #[test]
    fn hosts() {
        // (route hosts, request host, matches)
        let cases: &[(&[&str], Option<&str>, bool)] = &[
            (&[], None, true),
            (&[], Some("anything.test"), true),
            (&["api.example.com"], Some("api.example.com"), true),
            (&["api.example.com"], Some("API.Example.COM"), true),
            (&["api.example.com"], Some("api.example.com:8443"), true),
            (&["api.example.com"], Some("api.example.com."), true),
            (&["api.example.com"], Some("api.example.org"), false),
            (&["api.example.com"], Some("x.api.example.com"), false),
            (&["api.example.com"], None, false),
            (&["API.Example.com"], Some("api.example.com"), true),
            (&["*.example.com"], Some("a.example.com"), true),
            (&["*.example.com"], Some("a.b.example.com"), true),
            (&["*.example.com"], Some("A.EXAMPLE.com:80"), true),
            (&["*.example.com"], Some("example.com"), false),
            (&["*.example.com"], Some(".example.com"), false),
            (&["*.example.com"], Some("xexample.com"), false),
            (&["*.example.com"], Some("a.example.org"), false),
            (&["*.example.com"], None, false),
            (&["a.test", "*.b.test"], Some("a.test"), true),
            (&["a.test", "*.b.test"], Some("x.b.test"), true),
            (&["a.test", "*.b.test"], Some("b.test"), false),
            (&["[::1]"], Some("[::1]:8080"), true),
            (&["[::1]"], Some("[::1]"), true),
            (&["127.0.0.1"], Some("127.0.0.1:80"), true),
        ];
        for (hosts, host, matches) in cases {
            let router = router(&[("r", with_hosts(hosts, paths(&["/*"])))]);
            let mut request = get("/x");
            request.host = *host;
            assert_eq!(
                request.winner(&router).is_some(),
                *matches,
                "hosts {hosts:?}, request host {host:?}"
            );
        }
    }

    #[test]
    fn the_most_specific_host_wins_after_the_path() {
        let router = router(&[
            ("any", paths(&["/x"])),
            ("wild", with_hosts(&["*.example.com"], paths(&["/x"]))),
            (
                "wild-long",
                with_hosts(&["*.api.example.com"], paths(&["/x"])),
            ),
            ("exact", with_hosts(&["v1.api.example.com"], paths(&["/x"]))),
            (
                "exact-prefix",
                with_hosts(&["v2.api.example.com"], paths(&["/*"])),
            ),
        ]);
        let cases = [
            ("v1.api.example.com", "exact"),
            ("v3.api.example.com", "wild-long"),
            ("www.example.com", "wild"),
            ("example.org", "any"),
            // The path decides before the host does.
            ("v2.api.example.com", "wild-long"),
        ];
        for (host, want) in cases {
            assert_eq!(get("/x").host(host).winner(&router), Some(want), "{host}");
        }
        assert_eq!(get("/x").winner(&router), Some("any"));
        assert_eq!(
            get("/y").host("v2.api.example.com").winner(&router),
            Some("exact-prefix")
        );
    }

    #[test]
    fn methods() {
        let router = router(&[
            (
                "read",
                RouteSpec {
                    methods: vec![Method::GET, Method::HEAD],
                    ..paths(&["/items"])
                },
            ),
            (
                "write",
                RouteSpec {
                    methods: vec![Method::POST],
                    ..paths(&["/items"])
                },
            ),
        ]);
        let cases = [
            (Method::GET, Some("read")),
            (Method::HEAD, Some("read")),
            (Method::POST, Some("write")),
            (Method::DELETE, None),
        ];
        for (method, want) in cases {
            let request = get("/items").method(method.clone());
            assert_eq!(request.winner(&router), want, "{method}");
        }
    }

    #[test]
    fn header_matchers() {
        let spec = RouteSpec {
            headers: vec![
                ("X-Tenant".into(), ValueMatch::Exact("acme".into())),
                ("authorization".into(), ValueMatch::Prefix("Bearer ".into())),
                ("x-debug".into(), ValueMatch::Present),
            ],
            ..paths(&["/h"])
        };
        let router = router(&[("h", spec)]);
        let full = || {
            get("/h")
                .header("x-tenant", "acme")
                .header("authorization", "Bearer abc")
                .header("x-debug", "")
        };
        assert_eq!(full().winner(&router), Some("h"));
        let misses = [
            get("/h")
                .header("authorization", "Bearer abc")
                .header("x-debug", "1"),
            get("/h")
                .header("x-tenant", "ACME")
                .header("authorization", "Bearer abc")
                .header("x-debug", "1"),
            get("/h")
                .header("x-tenant", "acme")
                .header("authorization", "Basic abc")
                .header("x-debug", "1"),
            get("/h")
                .header("x-tenant", "acme")
                .header("authorization", "Bearer abc"),
        ];
        for (i, request) in misses.iter().enumerate() {
            assert_eq!(request.winner(&router), None, "miss {i}");
        }
        // A header sent twice holds if any of its values does.
        let twice = full().header("x-tenant", "other");
        assert_eq!(twice.winner(&router), Some("h"));
    }

    #[test]
    fn query_matchers() {
        let spec = |name: &str, want: ValueMatch| RouteSpec {
            query: vec![(name.into(), want)],
            ..paths(&["/q"])
        };
        let cases: &[(RouteSpec, Option<&str>, bool)] = &[
            (spec("a", ValueMatch::Present), Some("a"), true),
            (spec("a", ValueMatch::Present), Some("a="), true),
            (spec("a", ValueMatch::Present), Some("b=1&a=2"), true),
            (spec("a", ValueMatch::Present), Some("ab=1"), false),
            (spec("a", ValueMatch::Present), None, false),
            (spec("a", ValueMatch::Present), Some(""), false),
            (spec("a", ValueMatch::Exact("1".into())), Some("a=1"), true),
            (
                spec("a", ValueMatch::Exact("1".into())),
                Some("a=1&a=2"),
                true,
            ),
            (
                spec("a", ValueMatch::Exact("2".into())),
                Some("a=1&a=2"),
                false,
            ),
            (
                spec("a", ValueMatch::Exact("x y".into())),
                Some("a=x%20y"),
                true,
            ),
            (
                spec("a", ValueMatch::Exact("x y".into())),
                Some("a=x+y"),
                true,
            ),
            (spec("a b", ValueMatch::Present), Some("a%20b=1"), true),
            (
                spec("v", ValueMatch::Prefix("2.".into())),
                Some("v=2.1"),
                true,
            ),
            (
                spec("v", ValueMatch::Prefix("2.".into())),
                Some("v=1.2"),
                false,
            ),
        ];
        for (spec, query, matches) in cases {
            let router = router(&[("q", spec.clone())]);
            let mut request = get("/q");
            request.query = *query;
            assert_eq!(
                request.winner(&router).is_some(),
                *matches,
                "{:?} on {query:?}",
                spec.query
            );
        }
        // Two matchers must both hold.
        let both = RouteSpec {
            query: vec![
                ("a".into(), ValueMatch::Exact("1".into())),
                ("b".into(), ValueMatch::Present),
            ],
            ..paths(&["/q"])
        };
        let router = router(&[("q", both)]);
        assert_eq!(get("/q").query("a=1&b").winner(&router), Some("q"));
        assert_eq!(get("/q").query("a=1").winner(&router), None);
    }

    #[test]
    fn a_candidate_that_fails_its_checks_falls_through_to_the_next() {
        let router = router(&[
            (
                "get-user",
                RouteSpec {
                    methods: vec![Method::GET],
                    priority: 5,
                    ..paths(&["/users/:id"])
                },
            ),
            (
                "beta-user",
                RouteSpec {
                    headers: vec![("x-beta".into(), ValueMatch::Present)],
                    ..paths(&["/users/:id"])
                },
            ),
            ("users", paths(&["/users/*"])),
        ]);
        assert_eq!(get("/users/1").winner(&router), Some("get-user"));
        let post = || get("/users/1").method(Method::POST);
        assert_eq!(post().winner(&router), Some("users"));
        assert_eq!(
            post().header("x-beta", "1").winner(&router),
            Some("beta-user")
        );
    }

    #[test]
    fn insert_replaces_the_old_spec() {
        let mut router = router(&[("r", paths(&["/old", "/old/:id"]))]);
        router
            .insert("r", paths(&["/new"]), "new value".into())
            .unwrap();
        assert_eq!(router.len(), 1);
        assert_eq!(get("/old").winner(&router), None);
        assert_eq!(get("/old/1").winner(&router), None);
        let found = get("/new").find(&router).unwrap();
        assert_eq!((found.id, found.value.as_str()), ("r", "new value"));
        assert_eq!(router.get("r").map(String::as_str), Some("new value"));
        // The old path's nodes are gone, not left empty.
        let root = router.any_host.as_ref().unwrap();
        let keys: Vec<&str> = root.literal.keys().map(|k| &**k).collect();
        assert_eq!(keys, ["new"]);

        // A host can move too.
        let moved = with_hosts(&["a.test"], paths(&["/new"]));
        router.insert("r", moved, "on a.test".into()).unwrap();
        assert!(router.any_host.is_none());
        assert_eq!(get("/new").winner(&router), None);
        assert_eq!(get("/new").host("a.test").winner(&router), Some("r"));
    }

    #[test]
    fn an_invalid_insert_changes_nothing() {
        let mut router = router(&[("r", paths(&["/a"]))]);
        let errors = router.insert("r", paths(&["b"]), "x".into()).unwrap_err();
        assert_eq!(errors[0].path, "paths[0]");
        assert_eq!(get("/a").winner(&router), Some("r"));
        assert_eq!(router.get("r").map(String::as_str), Some("value of r"));
    }

    #[test]
    fn remove() {
        let mut router = router(&[
            (
                "a",
                with_hosts(&["x.test", "*.y.test"], paths(&["/a", "/a/*"])),
            ),
            ("b", paths(&["/a"])),
        ]);
        assert!(router.remove("a"));
        assert!(!router.remove("a"));
        assert!(!router.contains("a"));
        assert_eq!((router.len(), router.is_empty()), (1, false));
        assert_eq!(get("/a").host("x.test").winner(&router), Some("b"));
        assert_eq!(get("/a/1").host("x.test").winner(&router), None);
        // Buckets left empty are dropped.
        assert!(router.exact_hosts.is_empty());
        assert!(router.wildcard_hosts.is_empty());
        assert!(router.remove("b"));
        assert!(router.is_empty());
        assert!(router.any_host.is_none());
        assert_eq!(get("/a").winner(&router), None);
    }

    #[test]
    fn a_clone_taken_before_a_change_answers_the_old_way() {
        let mut current = router(&[
            ("users", paths(&["/users/:id"])),
            ("static", paths(&["/static/*"])),
        ]);
        let before = current.clone();
        current
            .insert("users", paths(&["/people/:id"]), "moved".into())
            .unwrap();
        current.remove("static");
        current
            .insert("new", paths(&["/new"]), "new".into())
            .unwrap();

        assert_eq!(get("/users/1").winner(&before), Some("users"));
        assert_eq!(get("/static/x").winner(&before), Some("static"));
        assert_eq!(get("/new").winner(&before), None);
        assert_eq!(
            before.get("users").map(String::as_str),
            Some("value of users")
        );
        assert_eq!(before.len(), 2);

        assert_eq!(get("/users/1").winner(&current), None);
        assert_eq!(get("/people/1").winner(&current), Some("users"));
        assert_eq!(get("/static/x").winner(&current), None);
        assert_eq!(get("/new").winner(&current), Some("new"));
        assert_eq!(current.len(), 2);
    }

    #[test]
    fn five_thousand_routes_one_change_shares_the_rest() {
        let spec_of = |i: usize| {
            let spec = match i % 3 {
                0 => paths(&[&format!("/svc{i}/items")]),
                1 => paths(&[&format!("/svc{i}/items/:id")]),
                _ => paths(&[&format!("/svc{i}/static/*")]),
            };
            match i % 10 {
                0 => with_hosts(&[&format!("h{}.example.com", i % 50)], spec),
                5 => with_hosts(&["*.example.com"], spec),
                _ => spec,
            }
        };
        let mut old = Router::new();
        for i in 0..5_000 {
            old.insert(&format!("r{i}"), spec_of(i), i).unwrap();
        }
        assert_eq!(old.len(), 5_000);

        let mut new = old.clone();
        // r4 is a param route under any host: move it.
        new.insert("r4", paths(&["/moved/:id"]), 4_000_000).unwrap();

        let hit = |router: &Router<usize>, path: &'static str| {
            get(path).winner(router).map(str::to_owned)
        };
        assert_eq!(hit(&old, "/svc4/items/7").as_deref(), Some("r4"));
        assert_eq!(hit(&old, "/moved/7"), None);
        assert_eq!(hit(&new, "/svc4/items/7"), None);
        assert_eq!(hit(&new, "/moved/7").as_deref(), Some("r4"));
        assert_eq!(old.get("r4"), Some(&4));
        assert_eq!(new.get("r4"), Some(&4_000_000));
        for (path, host, want) in [
            ("/svc3/items", None, "r3"),
            ("/svc4999/items/1", None, "r4999"),
            ("/svc8/static/a/b", None, "r8"),
            ("/svc10/items/1", Some("h10.example.com"), "r10"),
            ("/svc5/static/x", Some("any.example.com"), "r5"),
        ] {
            for router in [&old, &new] {
                let mut request = get(path);
                request.host = host;
                assert_eq!(request.winner(router), Some(want), "{path}");
            }
        }
        assert_eq!(get("/svc10/items/1").winner(&new), None);

        // Structural sharing: only the changed paths were copied.
        let (old_root, new_root) = (
            old.any_host.as_ref().unwrap(),
            new.any_host.as_ref().unwrap(),
        );
        assert!(!Arc::ptr_eq(old_root, new_root));
        assert!(Arc::ptr_eq(
            old_root.literal.get("svc3").unwrap(),
            new_root.literal.get("svc3").unwrap()
        ));
        assert!(old.exact_hosts.ptr_eq(&new.exact_hosts));
        assert!(old.wildcard_hosts.ptr_eq(&new.wildcard_hosts));
    }

    #[test]
    fn validation_reports_every_problem_with_its_path() {
        let header = |name: &str, want: ValueMatch| (name.to_owned(), want);
        // (spec, expected (path, message fragment) in order)
        let cases: Vec<(RouteSpec, Vec<(&str, &str)>)> = vec![
            (RouteSpec::default(), vec![("paths", "at least one path")]),
            (paths(&[""]), vec![("paths[0]", "empty")]),
            (
                paths(&["/ok", "users"]),
                vec![("paths[1]", "must start with `/`")],
            ),
            (paths(&["/a/*/b"]), vec![("paths[0]", "last segment")]),
            (paths(&["/a*"]), vec![("paths[0]", "last segment")]),
            (paths(&["/a/x*"]), vec![("paths[0]", "last segment")]),
            (paths(&["/a/**"]), vec![("paths[0]", "last segment")]),
            (paths(&["/a/:"]), vec![("paths[0]", "param without a name")]),
            (
                paths(&["/:id/:id"]),
                vec![("paths[0]", "`id` appears twice")],
            ),
            (
                paths(&["/:id/*id"]),
                vec![("paths[0]", "`id` appears twice")],
            ),
            (paths(&["/:a-b"]), vec![("paths[0]", "may only contain")]),
            (paths(&["/a b"]), vec![("paths[0]", "whitespace")]),
            (paths(&["/a\tb"]), vec![("paths[0]", "whitespace")]),
            (paths(&["/a?b=1"]), vec![("paths[0]", "`?`")]),
            (paths(&["/a#top"]), vec![("paths[0]", "`#`")]),
            (paths(&["/users/{id}"]), vec![("paths[0]", ":name")]),
            (paths(&["/café"]), vec![("paths[0]", "percent-encoded")]),
            (paths(&["/a//b"]), vec![("paths[0]", "empty segment")]),
            (paths(&["/%7Euser"]), vec![("paths[0]", "write `/~user`")]),
            (paths(&["/a%3ab"]), vec![("paths[0]", "write `/a%3Ab`")]),
            (paths(&["/a/./b/*"]), vec![("paths[0]", "write `/a/b/*`")]),
            (paths(&["/a/../b"]), vec![("paths[0]", "write `/b`")]),
            (paths(&["/a%2Fb"]), vec![("paths[0]", "encoded `/`")]),
            (paths(&["/a\\b"]), vec![("paths[0]", "`\\`")]),
            (
                paths(&["/a", "/a"]),
                vec![("paths[1]", "duplicate of paths[0]")],
            ),
            (
                paths(&["/u/:id", "/u/:name"]),
                vec![("paths[1]", "same requests as paths[0]")],
            ),
            (
                paths(&["a b?"]),
                vec![
                    ("paths[0]", "must start with `/`"),
                    ("paths[0]", "whitespace"),
                    ("paths[0]", "`?`"),
                ],
            ),
            (
                with_hosts(&[""], paths(&["/"])),
                vec![("hosts[0]", "empty")],
            ),
            (
                with_hosts(&["*"], paths(&["/"])),
                vec![("hosts[0]", "leave `hosts` empty")],
            ),
            (
                with_hosts(&["a.*.com"], paths(&["/"])),
                vec![("hosts[0]", "whole first label")],
            ),
            (
                with_hosts(&["*a.com"], paths(&["/"])),
                vec![("hosts[0]", "whole first label")],
            ),
            (
                with_hosts(&["*.*.com"], paths(&["/"])),
                vec![("hosts[0]", "whole first label")],
            ),
            (
                with_hosts(&["a.com:80"], paths(&["/"])),
                vec![("hosts[0]", "port")],
            ),
            (
                with_hosts(&["a b.com"], paths(&["/"])),
                vec![("hosts[0]", "invalid character ` `")],
            ),
            (
                with_hosts(&["bücher.de"], paths(&["/"])),
                vec![("hosts[0]", "punycode")],
            ),
            (
                with_hosts(&["a..com"], paths(&["/"])),
                vec![("hosts[0]", "empty label")],
            ),
            (
                with_hosts(&[".a.com"], paths(&["/"])),
                vec![("hosts[0]", "empty label")],
            ),
            (
                with_hosts(&["*."], paths(&["/"])),
                vec![("hosts[0]", "empty label")],
            ),
            (
                with_hosts(&["[::1"], paths(&["/"])),
                vec![("hosts[0]", "IPv6")],
            ),
            (
                with_hosts(&["[::1]:80"], paths(&["/"])),
                vec![("hosts[0]", "IPv6")],
            ),
            (
                with_hosts(&["a.com", "A.com"], paths(&["/"])),
                vec![("hosts[1]", "duplicate of hosts[0]")],
            ),
            (
                RouteSpec {
                    methods: vec![
                        Method::GET,
                        Method::from_bytes(b"get").unwrap(),
                        Method::GET,
                    ],
                    ..paths(&["/"])
                },
                vec![
                    ("methods[1]", "`GET`"),
                    ("methods[2]", "duplicate of methods[0]"),
                ],
            ),
            (
                RouteSpec {
                    headers: vec![
                        header("x ok", ValueMatch::Present),
                        header("X-A", ValueMatch::Present),
                        header("x-a", ValueMatch::Present),
                        header("x-b", ValueMatch::Exact("a\nb".into())),
                        header("x-c", ValueMatch::Exact(" padded".into())),
                        header("x-d", ValueMatch::Prefix("Bearer ".into())),
                    ],
                    ..paths(&["/"])
                },
                vec![
                    ("headers[0].name", "not a valid HTTP header name"),
                    ("headers[2].name", "duplicate of headers[1].name"),
                    ("headers[3].value", "control characters"),
                    ("headers[4].value", "whitespace"),
                ],
            ),
            (
                RouteSpec {
                    query: vec![
                        (String::new(), ValueMatch::Present),
                        ("a".into(), ValueMatch::Present),
                        ("a".into(), ValueMatch::Exact("1".into())),
                    ],
                    ..paths(&["/"])
                },
                vec![
                    ("query[0].name", "empty"),
                    ("query[2].name", "duplicate of query[1].name"),
                ],
            ),
            // Everything at once, in field order.
            (
                RouteSpec {
                    hosts: vec!["*".into()],
                    paths: vec!["x".into()],
                    query: vec![(String::new(), ValueMatch::Present)],
                    ..RouteSpec::default()
                },
                vec![
                    ("hosts[0]", "`*`"),
                    ("paths[0]", "/"),
                    ("query[0].name", "empty"),
                ],
            ),
        ];
        for (spec, want) in cases {
            let errors = Router::<()>::validate(&spec).expect_err(&format!("{spec:?}"));
            let got: Vec<(&str, &str)> = errors
                .iter()
                .map(|e| (e.path.as_str(), e.message.as_str()))
                .collect();
            assert_eq!(got.len(), want.len(), "{spec:?}: {got:?}");
            for ((path, message), (want_path, fragment)) in got.iter().zip(&want) {
                assert_eq!(path, want_path, "{spec:?}: {got:?}");
                assert!(
                    message.contains(fragment),
                    "{spec:?}: {message:?} lacks {fragment:?}"
                );
            }
        }
    }

    #[test]
    fn valid_specs_pass() {
        let specs = [
            paths(&[
                "/",
                "/*",
                "/a/",
                "/a/:b/",
                "/a/:b/*c",
                "/v1/x:batch",
                "/~user",
                "/a%3Ab%20c",
            ]),
            with_hosts(
                &[
                    "Example.COM",
                    "*.example.com",
                    "*.com",
                    "127.0.0.1",
                    "[::1]",
                    "a_b.test",
                ],
                paths(&["/"]),
            ),
            RouteSpec {
                methods: vec![Method::GET, Method::from_bytes(b"PURGE").unwrap()],
                headers: vec![("x-a".into(), ValueMatch::Prefix(String::new()))],
                query: vec![("a".into(), ValueMatch::Exact(" spaced ".into()))],
                ..paths(&["/"])
            },
        ];
        for spec in specs {
            assert_eq!(spec.validate(), Ok(()), "{spec:?}");
        }
    }

    #[test]
    fn snapshots_can_be_shared_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Router<String>>();
        shareable::<Match<'_, String>>();
    }

    #[test]
    fn spec_errors_display_with_their_path() {
        let errors = paths(&["x"]).validate().unwrap_err();
        assert_eq!(errors[0].to_string(), "paths[0]: must start with `/`");
    }
}
