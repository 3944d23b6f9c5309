//! The store contract as a test suite: what every [`Store`] implementation must do, checked
//! the same way against each ([`SqliteStore`](crate::SqliteStore) in this crate's tests,
//! `EtcdStore` in `moontide-store-etcd`'s).
//!
//! An implementation's test provides a [`Subject`] (fresh, empty keyspaces and a way to
//! compact history) and calls [`run_all`]. The cases run one after another, each on its
//! own fresh keyspace, and assert only relative revisions (`r + 1`, `>`), never absolute
//! ones: an etcd keyspace under a fresh prefix starts at whatever revision the cluster is
//! at. Nothing else may write to the backend while the suite runs.
//!
//! Compiled only for tests and with the `contract-tests` feature; it panics on failure,
//! naming the case.

use std::future::Future;
use std::time::Duration;

use crate::{Compare, KeyValue, Op, Revision, Store, StoreError, TxnOutcome, Watch, WatchEvent};

/// How long a case waits for a watch event before it fails.
const WAIT: Duration = Duration::from_secs(10);

/// A backend under test.
pub trait Subject {
    type S: Store;

    /// A store over a fresh, empty keyspace.
    fn fresh(&mut self) -> impl Future<Output = Self::S>;

    /// Drops the change history before `revision` (etcd's `compact`): watching from an
    /// older revision must then fail with [`StoreError::Compacted`].
    fn compact(&self, store: &Self::S, revision: Revision) -> impl Future<Output = ()>;
}

/// Runs every case of the contract against `subject`.
pub async fn run_all<T: Subject>(subject: &mut T) {
    macro_rules! case {
        ($name:ident) => {{
            eprintln!("store contract: {}", stringify!($name));
            let store = subject.fresh().await;
            $name(&store).await;
        }};
    }
    case!(put_get_and_range_by_prefix);
    case!(range_returns_every_key_of_a_large_prefix_in_order);
    case!(revisions_bump_once_per_write_txn);
    case!(create_revision_survives_updates_and_resets_after_delete);
    case!(failed_compares_write_nothing);
    case!(compares_that_hold_apply_the_ops);
    case!(txn_that_changes_nothing_keeps_the_revision);
    case!(delete_prefix_deletes_exactly_the_prefix);
    case!(the_last_write_to_a_key_in_one_txn_wins);
    case!(empty_value_is_a_put_not_a_delete);
    case!(watch_replays_history_then_follows_live_changes_in_order);
    case!(watch_sees_every_revision_exactly_once_across_replay_and_live);
    case!(watch_filters_by_prefix);
    case!(watch_from_the_current_revision_sees_only_later_changes);

    eprintln!("store contract: watch_from_a_compacted_revision_returns_compacted");
    let store = subject.fresh().await;
    watch_from_a_compacted_revision_returns_compacted(subject, &store).await;
}

pub fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
    }
}

pub fn del(key: &str) -> Op {
    Op::Delete {
        key: key.to_owned(),
    }
}

/// Applies `ops` unconditionally; the txn must succeed.
pub async fn write(store: &dyn Store, ops: Vec<Op>) -> TxnOutcome {
    let outcome = store.txn(Vec::new(), ops).await.expect("txn");
    assert!(outcome.succeeded, "an unconditional txn succeeds");
    outcome
}

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

type Summary = (String, Revision, Option<String>);

/// `(key, revision, Some(value) | None for a delete)` for compact assertions.
pub fn summary(events: &[WatchEvent]) -> Vec<Summary> {
    events
        .iter()
        .map(|event| match event {
            WatchEvent::Put(kv) => (
                kv.key.clone(),
                kv.mod_revision,
                Some(String::from_utf8_lossy(&kv.value).into_owned()),
            ),
            WatchEvent::Delete { key, revision } => (key.clone(), *revision, None),
        })
        .collect()
}

fn ev(key: &str, revision: Revision, value: Option<&str>) -> Summary {
    (key.to_owned(), revision, value.map(str::to_owned))
}

async fn next_batch(watch: &mut Box<dyn Watch>) -> Vec<WatchEvent> {
    let batch = tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("watch timed out")
        .expect("watch failed")
        .expect("watch ended");
    assert!(!batch.is_empty(), "a watch never yields an empty batch");
    batch
}

/// Reads batches until one reaches `until`; checks that revisions never go backwards.
async fn collect_until(watch: &mut Box<dyn Watch>, until: Revision) -> Vec<Summary> {
    let mut seen: Vec<Summary> = Vec::new();
    while seen.last().is_none_or(|(_, revision, _)| *revision < until) {
        seen.extend(summary(&next_batch(watch).await));
    }
    assert!(
        seen.windows(2).all(|pair| pair[0].1 <= pair[1].1),
        "events arrive in revision order: {seen:?}"
    );
    seen
}

async fn assert_quiet(watch: &mut Box<dyn Watch>) {
    if let Ok(got) = tokio::time::timeout(Duration::from_millis(200), watch.next()).await {
        panic!("expected no event, got {got:?}");
    }
}

async fn put_get_and_range_by_prefix(store: &dyn Store) {
    let outcome = write(
        store,
        vec![
            put("a/2", "two"),
            put("b/1", "other"),
            put("a/1", "one"),
            put("a", "bare"),
        ],
    )
    .await;
    let one = store.get("a/1").await.unwrap().expect("a/1 exists");
    assert_eq!(one.value, b"one");
    assert_eq!(one.create_revision, outcome.revision);
    assert_eq!(one.mod_revision, outcome.revision);
    assert_eq!(store.get("a/3").await.unwrap(), None);

    let (kvs, revision) = store.range("a/").await.unwrap();
    assert_eq!(keys(&kvs), ["a/1", "a/2"], "sorted by key, prefix only");
    assert_eq!(revision, outcome.revision, "read at the current revision");
    let (all, _) = store.range("").await.unwrap();
    assert_eq!(keys(&all), ["a", "a/1", "a/2", "b/1"]);
    assert_eq!(store.revision().await.unwrap(), outcome.revision);
}

async fn range_returns_every_key_of_a_large_prefix_in_order(store: &dyn Store) {
    // More keys than one etcd page, written 100 per txn (etcd's default cap is 128 ops).
    for chunk in 0..7 {
        let ops = (0..100)
            .map(|i| put(&format!("many/{:04}", chunk * 100 + i), "v"))
            .collect();
        write(store, ops).await;
    }
    write(store, vec![put("many0", "outside"), put("man", "outside")]).await;
    let (kvs, revision) = store.range("many/").await.unwrap();
    assert_eq!(kvs.len(), 700);
    assert!(
        kvs.windows(2).all(|pair| pair[0].key < pair[1].key),
        "sorted"
    );
    assert_eq!(revision, store.revision().await.unwrap());
}

async fn revisions_bump_once_per_write_txn(store: &dyn Store) {
    let start = store.revision().await.unwrap();
    let first = write(store, vec![put("x", "1"), put("y", "1"), put("z", "1")]).await;
    assert_eq!(first.revision, start + 1, "one txn, one revision");
    let second = write(store, vec![put("x", "2")]).await;
    assert_eq!(second.revision, start + 2);
    let third = write(store, vec![del("y")]).await;
    assert_eq!(third.revision, start + 3);
    assert_eq!(store.revision().await.unwrap(), start + 3);
    let (kvs, revision) = store.range("").await.unwrap();
    assert_eq!(keys(&kvs), ["x", "z"]);
    assert_eq!(revision, start + 3);
}

async fn create_revision_survives_updates_and_resets_after_delete(store: &dyn Store) {
    let created = write(store, vec![put("k", "1")]).await.revision;
    let updated = write(store, vec![put("k", "2")]).await.revision;
    let kv = store.get("k").await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision), (created, updated));
    write(store, vec![del("k")]).await;
    let recreated = write(store, vec![put("k", "3")]).await.revision;
    let kv = store.get("k").await.unwrap().unwrap();
    assert_eq!(
        (kv.create_revision, kv.mod_revision),
        (recreated, recreated)
    );
}

async fn failed_compares_write_nothing(store: &dyn Store) {
    let at = write(store, vec![put("k", "1")]).await.revision;
    for compare in [
        Compare::Missing("k".into()),
        Compare::Exists("absent".into()),
        Compare::ModRevision("k".into(), at + 5),
        Compare::ModRevision("k".into(), 0),
        Compare::ModRevision("absent".into(), at),
    ] {
        let outcome = store
            .txn(
                vec![Compare::Exists("k".into()), compare.clone()],
                vec![put("new", "x"), del("k")],
            )
            .await
            .unwrap();
        assert_eq!(
            outcome,
            TxnOutcome {
                succeeded: false,
                revision: at
            },
            "{compare:?} fails"
        );
        assert_eq!(store.get("new").await.unwrap(), None, "{compare:?}");
        assert!(store.get("k").await.unwrap().is_some(), "{compare:?}");
    }
    assert_eq!(store.revision().await.unwrap(), at);
}

async fn compares_that_hold_apply_the_ops(store: &dyn Store) {
    let at = write(store, vec![put("k", "1")]).await.revision;
    let outcome = store
        .txn(
            vec![
                Compare::Exists("k".into()),
                Compare::Missing("absent".into()),
                Compare::ModRevision("k".into(), at),
                Compare::ModRevision("absent".into(), 0),
            ],
            vec![put("k", "2"), put("other", "x")],
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        TxnOutcome {
            succeeded: true,
            revision: at + 1
        }
    );
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"2");
    assert_eq!(store.get("other").await.unwrap().unwrap().value, b"x");
}

async fn txn_that_changes_nothing_keeps_the_revision(store: &dyn Store) {
    let at = write(store, vec![put("k", "1")]).await.revision;
    for ops in [
        vec![],
        vec![del("absent")],
        vec![Op::DeletePrefix {
            prefix: "nothing/".into(),
        }],
    ] {
        let outcome = write(store, ops.clone()).await;
        assert_eq!(outcome.revision, at, "{ops:?} changes nothing");
    }
    assert_eq!(store.revision().await.unwrap(), at);
}

async fn delete_prefix_deletes_exactly_the_prefix(store: &dyn Store) {
    write(
        store,
        vec![
            put("p/a", "1"),
            put("p/b/c", "2"),
            put("pq", "3"),
            put("q", "4"),
        ],
    )
    .await;
    let mut watch = store
        .watch("", store.revision().await.unwrap())
        .await
        .unwrap();
    let outcome = write(
        store,
        vec![Op::DeletePrefix {
            prefix: "p/".into(),
        }],
    )
    .await;
    let (kvs, _) = store.range("").await.unwrap();
    assert_eq!(keys(&kvs), ["pq", "q"]);
    let mut seen = collect_until(&mut watch, outcome.revision).await;
    seen.sort();
    assert_eq!(
        seen,
        [
            ev("p/a", outcome.revision, None),
            ev("p/b/c", outcome.revision, None)
        ]
    );
}

async fn the_last_write_to_a_key_in_one_txn_wins(store: &dyn Store) {
    let outcome = write(store, vec![put("k", "1"), put("k", "2")]).await;
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"2");
    let deleted = write(store, vec![put("k", "3"), del("k")]).await;
    assert_eq!(deleted.revision, outcome.revision + 1);
    assert_eq!(store.get("k").await.unwrap(), None);
}

async fn empty_value_is_a_put_not_a_delete(store: &dyn Store) {
    let start = store.revision().await.unwrap();
    let outcome = write(store, vec![put("k", "")]).await;
    let kv = store
        .get("k")
        .await
        .unwrap()
        .expect("an empty value exists");
    assert!(kv.value.is_empty());
    let mut watch = store.watch("", start).await.unwrap();
    assert_eq!(
        summary(&next_batch(&mut watch).await),
        [ev("k", outcome.revision, Some(""))]
    );
}

async fn watch_replays_history_then_follows_live_changes_in_order(store: &dyn Store) {
    let start = store.revision().await.unwrap();
    let r1 = write(store, vec![put("a", "1")]).await.revision;
    let r2 = write(store, vec![put("b", "1"), put("a", "2")])
        .await
        .revision;
    let r3 = write(store, vec![del("a")]).await.revision;

    let mut watch = store.watch("", start).await.unwrap();
    let mut replayed = collect_until(&mut watch, r3).await;
    replayed[1..3].sort(); // one revision's events come in any order
    assert_eq!(
        replayed,
        [
            ev("a", r1, Some("1")),
            ev("a", r2, Some("2")),
            ev("b", r2, Some("1")),
            ev("a", r3, None),
        ]
    );

    let r4 = write(store, vec![put("c", "1")]).await.revision;
    let r5 = write(store, vec![del("b")]).await.revision;
    let live = collect_until(&mut watch, r5).await;
    assert_eq!(live, [ev("c", r4, Some("1")), ev("b", r5, None)]);
}

async fn watch_sees_every_revision_exactly_once_across_replay_and_live(store: &dyn Store) {
    let start = store.revision().await.unwrap();
    for i in 0..10 {
        write(store, vec![put("k", &i.to_string())]).await;
    }
    let mut watch = store.watch("", start).await.unwrap();
    let mut last = 0;
    for i in 10..20 {
        last = write(store, vec![put("k", &i.to_string())]).await.revision;
    }
    let seen = collect_until(&mut watch, last).await;
    let expected: Vec<Summary> = (0..20)
        .map(|i| ev("k", start + 1 + i, Some(&i.to_string())))
        .collect();
    assert_eq!(seen, expected);
}

async fn watch_filters_by_prefix(store: &dyn Store) {
    let start = store.revision().await.unwrap();
    let mut watch = store.watch("f/", start).await.unwrap();
    write(store, vec![put("g/1", "x"), put("f", "bare")]).await;
    let r = write(store, vec![put("f/1", "y"), put("g/2", "x")])
        .await
        .revision;
    assert_eq!(
        summary(&next_batch(&mut watch).await),
        [ev("f/1", r, Some("y"))]
    );
    write(store, vec![put("g/3", "x")]).await;
    assert_quiet(&mut watch).await;
}

async fn watch_from_the_current_revision_sees_only_later_changes(store: &dyn Store) {
    write(store, vec![put("old", "1")]).await;
    let now = store.revision().await.unwrap();
    let mut watch = store.watch("", now).await.unwrap();
    let r = write(store, vec![put("new", "1")]).await.revision;
    assert_eq!(
        summary(&next_batch(&mut watch).await),
        [ev("new", r, Some("1"))]
    );
}

async fn watch_from_a_compacted_revision_returns_compacted<T: Subject>(subject: &T, store: &T::S) {
    let start = store.revision().await.unwrap();
    let mut revisions = Vec::new();
    for i in 1..=5 {
        revisions.push(write(store, vec![put("k", &i.to_string())]).await.revision);
    }
    // Keep history from the fourth write on.
    subject.compact(store, revisions[3]).await;

    // The compaction shows either when the watch opens or on its first `next`.
    let outcome = match store.watch("", start).await {
        Err(error) => Err(error),
        Ok(mut watch) => match tokio::time::timeout(WAIT, watch.next()).await {
            Ok(result) => result.map(|_| ()),
            Err(_) => panic!("a watch from a compacted revision neither failed nor answered"),
        },
    };
    match outcome {
        Err(StoreError::Compacted(oldest)) => assert!(
            oldest > start + 1 && oldest <= revisions[3],
            "Compacted({oldest}) names the oldest revision still kept"
        ),
        other => panic!("expected Compacted, got {other:?}"),
    }

    // From the compaction point on, history is whole.
    let mut watch = store.watch("", revisions[3]).await.unwrap();
    assert_eq!(
        collect_until(&mut watch, revisions[4]).await,
        [ev("k", revisions[4], Some("5"))]
    );
}

/// The membership contract: what every [`Membership`](crate::Membership) must do. `fresh`
/// gives a registry with no members (the cases join, look, leave).
pub async fn run_membership<M: crate::Membership>(members: &M) {
    use crate::membership::Member;
    eprintln!("membership contract: join, update, leave");
    let ttl = Duration::from_secs(2);
    let a = members
        .join("a", b"one".to_vec(), ttl)
        .await
        .expect("join a");
    let b = members
        .join("b", b"two".to_vec(), ttl)
        .await
        .expect("join b");
    let listed = members.members().await.expect("members");
    assert_eq!(
        listed,
        vec![
            Member {
                name: "a".into(),
                record: b"one".to_vec()
            },
            Member {
                name: "b".into(),
                record: b"two".to_vec()
            }
        ],
        "members are listed sorted by name with their records"
    );
    a.update(b"three".to_vec()).await.expect("update");
    a.renew().await.expect("renew a live lease");
    let listed = members.members().await.expect("members");
    assert_eq!(listed[0].record, b"three", "update replaces the record");
    b.leave().await.expect("leave");
    let listed = members.members().await.expect("members");
    assert_eq!(
        listed.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["a"],
        "a member that left is gone at once"
    );

    eprintln!("membership contract: a lease nobody renews expires with its record");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let listed = members.members().await.expect("members");
        if listed.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "an unrenewed 2 s lease still holds its record after {WAIT:?}: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        matches!(a.renew().await, Err(StoreError::LeaseExpired)),
        "renewing an expired lease says so"
    );
    assert!(
        matches!(
            a.update(b"late".to_vec()).await,
            Err(StoreError::LeaseExpired)
        ),
        "writing under an expired lease says so"
    );
    assert!(
        members.members().await.expect("members").is_empty(),
        "a write under an expired lease does not bring the record back"
    );

    eprintln!("membership contract: renewing keeps a record past its ttl");
    let kept = members
        .join("kept", b"x".to_vec(), ttl)
        .await
        .expect("join");
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        kept.renew().await.expect("renew");
    }
    assert_eq!(
        members.members().await.expect("members").len(),
        1,
        "a renewed lease outlives its ttl"
    );
    let again = members
        .join("kept", b"y".to_vec(), ttl)
        .await
        .expect("rejoin");
    assert_eq!(
        members.members().await.expect("members")[0].record,
        b"y",
        "joining under a taken name replaces the record"
    );
    again.leave().await.expect("leave");
    kept.leave().await.expect("leaving twice is fine");
    assert!(members.members().await.expect("members").is_empty());
}
