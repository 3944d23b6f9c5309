//! Moontide's config store on etcd: [`EtcdStore`] implements `moontide_store::Store` over
//! an etcd v3 cluster, so many nodes serve one configuration.
//!
//! The trait is etcd's model, so the mapping is direct:
//!
//! - a [`Revision`] is etcd's cluster revision; `create_revision`/`mod_revision` are
//!   etcd's own;
//! - [`Store::txn`] is one etcd transaction: [`Compare::Exists`]/[`Compare::Missing`]
//!   compare the key's `create_revision` with 0, [`Compare::ModRevision`] its
//!   `mod_revision` (0 for a missing key, as etcd compares it); puts and deletes are the
//!   success branch. etcd refuses two writes to one key in a txn, so the ops are folded
//!   first (the last write to a key wins, as in `SqliteStore`);
//! - [`Store::range`] pages through the prefix at one pinned revision;
//! - [`Store::watch`] is an etcd prefix watch from `after + 1`; a compacted start (or a
//!   watcher etcd cancels because it fell behind a compaction) is
//!   [`StoreError::Compacted`]. A broken connection ends the watch with
//!   [`StoreError::Backend`]: the caller reopens it from the last revision it applied.
//!
//! Every key is stored under a prefix (`/moontide/` by default, the URL's path otherwise),
//! so several clusters can share one etcd; the prefix never leaves this crate.
//!
//! [`EtcdStore`] is also the cluster's node registry (`moontide_store::Membership`): see
//! the `membership` module.
//!
//! Each unary call is bounded by [`REQUEST_TIMEOUT`]: with etcd unreachable, the client's
//! balanced channel would otherwise wait for an endpoint forever, and a write must fail
//! (`503 store_unavailable` at the admin API) instead of hanging.

#![forbid(unsafe_code)]

mod membership;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, SortOrder, SortTarget,
    Txn, TxnOp, WatchOptions,
};
use moontide_store::{
    Compare, KeyValue, Op, Revision, Store, StoreError, TxnOutcome, Watch, WatchEvent,
};

/// The longest a single etcd request (or opening a watch) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long connecting to one endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 keep-alive pings find a dead connection (a partition) while a watch idles. etcd
/// answers pings sent more often than every 5 s (its `--grpc-keepalive-min-time`) with
/// GOAWAY, so stay above that.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest message read from etcd (etcd's own request limit is 1.5 MiB by default).
const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// Keys read per page by [`Store::range`].
const RANGE_PAGE: i64 = 256;
/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/moontide/";

/// Where the etcd cluster is and which part of its keyspace is ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `host:port` of each endpoint.
    pub endpoints: Vec<String>,
    /// Every key is stored under this prefix; it ends with `/`.
    pub prefix: String,
}

/// A `--store` URL that is not `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid etcd URL {url:?}: {reason} (expected etcd://HOST:PORT[,HOST:PORT...][/PREFIX])")]
pub struct UrlError {
    pub url: String,
    pub reason: String,
}

impl EtcdConfig {
    /// Parses `etcd://HOST:PORT[,HOST:PORT…][/PREFIX]`. The prefix defaults to
    /// [`DEFAULT_PREFIX`]; `/staging` means keys under `/staging/`.
    pub fn from_url(url: &str) -> Result<EtcdConfig, UrlError> {
        let fail = |reason: &str| UrlError {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = url
            .strip_prefix("etcd://")
            .ok_or_else(|| fail("the scheme must be etcd://"))?;
        let (hosts, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let mut endpoints = Vec::new();
        for endpoint in hosts.split(',') {
            if endpoint.is_empty() {
                return Err(fail("an endpoint is empty"));
            }
            let (host, port) = endpoint
                .rsplit_once(':')
                .ok_or_else(|| fail(&format!("endpoint {endpoint:?} has no :PORT")))?;
            let bracketed = host.starts_with('[') && host.ends_with(']');
            if host.is_empty()
                || (!bracketed && host.contains(':'))
                || host.contains(['@', '?', '#', ' '])
            {
                return Err(fail(&format!("endpoint {endpoint:?} has no valid host")));
            }
            match port.parse::<u16>() {
                Ok(p) if p > 0 => {}
                _ => return Err(fail(&format!("endpoint {endpoint:?} has no valid port"))),
            }
            endpoints.push(endpoint.to_owned());
        }
        let prefix = match path.trim_end_matches('/') {
            "" => DEFAULT_PREFIX.to_owned(),
            path if path.contains(['?', '#']) => {
                return Err(fail("the prefix may not hold ? or #"));
            }
            path => format!("{path}/"),
        };
        Ok(EtcdConfig { endpoints, prefix })
    }
}

/// The [`Store`] on an etcd cluster; see the crate docs.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// A client for `config`. Connections are made lazily: this succeeds while etcd is
    /// down, and calls fail (bounded by [`REQUEST_TIMEOUT`]) until it is back.
    pub async fn connect(config: &EtcdConfig) -> Result<EtcdStore, StoreError> {
        let endpoints: Vec<String> = config
            .endpoints
            .iter()
            .map(|e| format!("http://{e}"))
            .collect();
        let options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
            .with_keep_alive_while_idle(true);
        let client = bounded(Client::connect(&endpoints, Some(options))).await?;
        Ok(EtcdStore {
            client,
            prefix: config.prefix.clone(),
            endpoints: config.endpoints.clone(),
        })
    }

    /// Drops etcd's history before `revision` (etcd `compact`). Watches opened from an
    /// older revision then fail with [`StoreError::Compacted`].
    pub async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        bounded(kv.compact(to_etcd(revision)?, None)).await?;
        Ok(())
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn key_value(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        Ok(KeyValue {
            key: self.strip(kv.key())?,
            value: kv.value().to_vec(),
            create_revision: from_etcd(kv.create_revision()),
            mod_revision: from_etcd(kv.mod_revision()),
        })
    }

    fn strip(&self, key: &[u8]) -> Result<String, StoreError> {
        let key = std::str::from_utf8(key)
            .map_err(|_| StoreError::Backend("etcd returned a key that is not UTF-8".into()))?;
        key.strip_prefix(self.prefix.as_str())
            .map(str::to_owned)
            .ok_or_else(|| {
                StoreError::Backend(format!("etcd returned a key outside our prefix: {key:?}"))
            })
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let response = bounded(kv.get(self.full_key(key), None)).await?;
        response
            .kvs()
            .first()
            .map(|kv| self.key_value(kv))
            .transpose()
    }

    async fn range(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let full = self.full_key(prefix);
        let end = prefix_end(full.as_bytes());
        let mut from = full.into_bytes();
        let mut revision = 0;
        let mut kvs = Vec::new();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_sort(SortTarget::Key, SortOrder::Ascend)
                .with_limit(RANGE_PAGE);
            if revision > 0 {
                // Later pages read the same snapshot as the first.
                options = options.with_revision(revision);
            }
            let response = bounded(kv.get(from.clone(), Some(options))).await?;
            if revision == 0 {
                revision = header_revision(response.header())?;
            }
            for kv in response.kvs() {
                kvs.push(self.key_value(kv)?);
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok((kvs, from_etcd(revision)))
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> Result<TxnOutcome, StoreError> {
        let compares: Vec<etcd_client::Compare> = compares
            .into_iter()
            .map(|compare| match compare {
                Compare::Exists(key) => Ok(etcd_client::Compare::create_revision(
                    self.full_key(&key),
                    CompareOp::Greater,
                    0,
                )),
                Compare::Missing(key) => Ok(etcd_client::Compare::create_revision(
                    self.full_key(&key),
                    CompareOp::Equal,
                    0,
                )),
                Compare::ModRevision(key, revision) => Ok(etcd_client::Compare::mod_revision(
                    self.full_key(&key),
                    CompareOp::Equal,
                    to_etcd(revision)?,
                )),
            })
            .collect::<Result<_, StoreError>>()?;
        let ops: Vec<TxnOp> = fold_ops(ops)
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value } => TxnOp::put(self.full_key(&key), value, None),
                Op::Delete { key } => TxnOp::delete(self.full_key(&key), None),
                Op::DeletePrefix { prefix } => TxnOp::delete(
                    self.full_key(&prefix),
                    Some(DeleteOptions::new().with_prefix()),
                ),
            })
            .collect();
        let mut kv = self.client.kv_client();
        let response = bounded(kv.txn(Txn::new().when(compares).and_then(ops))).await?;
        Ok(TxnOutcome {
            succeeded: response.succeeded(),
            revision: from_etcd(header_revision(response.header())?),
        })
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<Box<dyn Watch>, StoreError> {
        let start = to_etcd(after.saturating_add(1))?;
        let options = WatchOptions::new().with_prefix().with_start_revision(start);
        let mut client = self
            .client
            .watch_client()
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
        let mut stream = bounded(client.watch(self.full_key(prefix), Some(options))).await?;
        // etcd answers a create request first; a compacted start shows here or in the
        // next response, which `next` turns into `Compacted`.
        let created = bounded(stream.message()).await?;
        let mut watch = EtcdWatch {
            store: self.clone(),
            stream,
            failed: None,
        };
        match created {
            Some(response) => {
                if let Some(events) = watch.events_of(response)? {
                    // Not expected (events come after `created`), but never drop them.
                    return Ok(Box::new(PrefetchedWatch {
                        first: Some(events),
                        rest: watch,
                    }));
                }
            }
            None => return Err(StoreError::Backend("etcd closed the watch stream".into())),
        }
        Ok(Box::new(watch))
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        let mut kv = self.client.kv_client();
        // A count-only read of one key: etcd's header carries the cluster revision.
        let response = bounded(kv.get(
            self.prefix.as_bytes().to_vec(),
            Some(GetOptions::new().with_count_only()),
        ))
        .await?;
        Ok(from_etcd(header_revision(response.header())?))
    }
}

/// A watch on an [`EtcdStore`]; see the crate docs.
struct EtcdWatch {
    store: EtcdStore,
    stream: etcd_client::WatchStream,
    /// Set once `next` has failed; the watch then keeps failing the same way.
    failed: Option<StoreError>,
}

impl EtcdWatch {
    /// The events of one response, `None` for a response without any (created, progress);
    /// an error for a cancelled watch.
    fn events_of(
        &mut self,
        response: etcd_client::WatchResponse,
    ) -> Result<Option<Vec<WatchEvent>>, StoreError> {
        if response.compact_revision() > 0 {
            return Err(StoreError::Compacted(from_etcd(
                response.compact_revision(),
            )));
        }
        if response.canceled() {
            return Err(StoreError::Backend(format!(
                "etcd cancelled the watch: {}",
                response.cancel_reason()
            )));
        }
        if response.events().is_empty() {
            return Ok(None);
        }
        let mut events = Vec::with_capacity(response.events().len());
        for event in response.events() {
            let Some(kv) = event.kv() else {
                return Err(StoreError::Backend(
                    "etcd sent a watch event without a key".into(),
                ));
            };
            events.push(match event.event_type() {
                EventType::Put => WatchEvent::Put(self.store.key_value(kv)?),
                EventType::Delete => WatchEvent::Delete {
                    key: self.store.strip(kv.key())?,
                    revision: from_etcd(kv.mod_revision()),
                },
            });
        }
        Ok(Some(events))
    }
}

#[async_trait]
impl Watch for EtcdWatch {
    async fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, StoreError> {
        if let Some(error) = &self.failed {
            return Err(clone_error(error));
        }
        loop {
            let result = match self.stream.message().await {
                Ok(Some(response)) => self.events_of(response),
                Ok(None) => Err(StoreError::Backend("etcd closed the watch stream".into())),
                Err(error) => Err(backend(error)),
            };
            match result {
                Ok(Some(events)) => return Ok(Some(events)),
                Ok(None) => continue,
                Err(error) => {
                    self.failed = Some(clone_error(&error));
                    return Err(error);
                }
            }
        }
    }
}

/// A watch whose first batch arrived with its `created` answer.
struct PrefetchedWatch {
    first: Option<Vec<WatchEvent>>,
    rest: EtcdWatch,
}

#[async_trait]
impl Watch for PrefetchedWatch {
    async fn next(&mut self) -> Result<Option<Vec<WatchEvent>>, StoreError> {
        match self.first.take() {
            Some(events) => Ok(Some(events)),
            None => self.rest.next().await,
        }
    }
}

/// Folds a txn's ops so each key is written once (etcd refuses duplicates): a later put or
/// delete of a key replaces an earlier one, keeping the earlier one's position.
fn fold_ops(ops: Vec<Op>) -> Vec<Op> {
    let mut folded: Vec<Op> = Vec::with_capacity(ops.len());
    let mut slot: HashMap<String, usize> = HashMap::new();
    for op in ops {
        let key = match &op {
            Op::Put { key, .. } | Op::Delete { key } => key.clone(),
            Op::DeletePrefix { .. } => {
                folded.push(op);
                continue;
            }
        };
        match slot.get(&key) {
            Some(&i) => folded[i] = op,
            None => {
                slot.insert(key, folded.len());
                folded.push(op);
            }
        }
    }
    folded
}

/// The first key after every key that starts with `prefix` (etcd's range end).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

pub(crate) async fn bounded<T>(
    call: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(result) => result.map_err(backend),
        Err(_) => Err(StoreError::Backend(format!(
            "etcd did not answer within {} s",
            REQUEST_TIMEOUT.as_secs()
        ))),
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<i64, StoreError> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::Backend("etcd answered without a header".into()))
}

pub(crate) fn backend(error: etcd_client::Error) -> StoreError {
    let message = error.to_string();
    if message.contains("request is too large") {
        return StoreError::Backend(format!(
            "etcd: {message} (etcd refuses requests over its --max-request-bytes, 1.5 MiB by default)"
        ));
    }
    if message.contains("too many operations in txn request") {
        return StoreError::Backend(format!(
            "etcd: {message} (etcd's --max-txn-ops, 128 by default)"
        ));
    }
    StoreError::Backend(format!("etcd: {message}"))
}

fn clone_error(error: &StoreError) -> StoreError {
    match error {
        StoreError::Backend(message) => StoreError::Backend(message.clone()),
        StoreError::Compacted(revision) => StoreError::Compacted(*revision),
        StoreError::Closed => StoreError::Closed,
        StoreError::LeaseExpired => StoreError::LeaseExpired,
    }
}

fn to_etcd(revision: Revision) -> Result<i64, StoreError> {
    i64::try_from(revision)
        .map_err(|_| StoreError::Backend(format!("revision {revision} does not fit etcd's")))
}

fn from_etcd(revision: i64) -> Revision {
    // etcd revisions are never negative.
    Revision::try_from(revision).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_endpoints_and_a_prefix() {
        let config = EtcdConfig::from_url("etcd://127.0.0.1:2379").unwrap();
        assert_eq!(config.endpoints, ["127.0.0.1:2379"]);
        assert_eq!(config.prefix, "/moontide/");
        let config = EtcdConfig::from_url("etcd://a:1,b.example:2,[::1]:3/staging/").unwrap();
        assert_eq!(config.endpoints, ["a:1", "b.example:2", "[::1]:3"]);
        assert_eq!(config.prefix, "/staging/");
    }

    #[test]
    fn malformed_urls_are_refused_with_the_reason() {
        for (url, reason) in [
            ("http://127.0.0.1:2379", "scheme"),
            ("etcd://", "empty"),
            ("etcd://127.0.0.1", "no :PORT"),
            ("etcd://127.0.0.1:0", "port"),
            ("etcd://127.0.0.1:99999", "port"),
            ("etcd://127.0.0.1:2379,", "empty"),
            ("etcd://:2379", "host"),
            ("etcd://user@h:1", "host"),
            ("etcd://::1:2379", "host"),
        ] {
            let error = EtcdConfig::from_url(url).expect_err(url);
            assert!(error.to_string().contains(reason), "{url}: {error}");
        }
    }

    #[test]
    fn ops_on_one_key_fold_to_the_last() {
        let put = |k: &str, v: &str| Op::Put {
            key: k.into(),
            value: v.into(),
        };
        let folded = fold_ops(vec![
            put("a", "1"),
            put("b", "1"),
            Op::Delete { key: "a".into() },
            Op::DeletePrefix {
                prefix: "x/".into(),
            },
            put("b", "2"),
        ]);
        assert_eq!(
            folded,
            [
                Op::Delete { key: "a".into() },
                put("b", "2"),
                Op::DeletePrefix {
                    prefix: "x/".into()
                }
            ]
        );
    }

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/m/"), b"/m0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
    }
}
