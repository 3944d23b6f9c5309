//! Unit tests for [`SqliteStore`]: the key-value semantics, revisions, transactions,
//! watches (replay, live, prefix, compaction, lag, close) and durability on disk.

use std::sync::Arc;
use std::time::Duration;

use super::*;

const WAIT: Duration = Duration::from_secs(10);

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
    }
}

fn del(key: &str) -> Op {
    Op::Delete {
        key: key.to_owned(),
    }
}

async fn write(store: &SqliteStore, ops: Vec<Op>) -> TxnOutcome {
    let outcome = store.txn(Vec::new(), ops).await.expect("txn");
    assert!(outcome.succeeded);
    outcome
}

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

/// `(key, revision, Some(value) | None for delete)` for compact assertions.
fn summary(events: &[WatchEvent]) -> Vec<(String, Revision, Option<String>)> {
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

fn ev(key: &str, revision: Revision, value: Option<&str>) -> (String, Revision, Option<String>) {
    (key.to_owned(), revision, value.map(str::to_owned))
}

async fn next_batch(watch: &mut Box<dyn Watch>) -> Vec<WatchEvent> {
    tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("watch timed out")
        .expect("watch failed")
        .expect("watch ended")
}

async fn assert_quiet(watch: &mut Box<dyn Watch>) {
    if let Ok(got) = tokio::time::timeout(Duration::from_millis(200), watch.next()).await {
        panic!("expected no event, got {got:?}");
    }
}

#[tokio::test]
async fn put_get_and_range_by_prefix() {
    let store = SqliteStore::open_in_memory().unwrap();
    write(
        &store,
        vec![
            put("a/2", "two"),
            put("ab/1", "x"),
            put("a/1", "one"),
            put("a", "root"),
            put("b/1", "b"),
        ],
    )
    .await;

    let got = store.get("a/1").await.unwrap().expect("a/1 exists");
    assert_eq!(got.value, b"one");
    assert_eq!(got.key, "a/1");
    assert_eq!(store.get("a/3").await.unwrap(), None);

    let (kvs, revision) = store.range("a/").await.unwrap();
    assert_eq!(
        keys(&kvs),
        ["a/1", "a/2"],
        "prefix a/ must not match ab/ or a"
    );
    assert_eq!(revision, 1);

    let (kvs, _) = store.range("a").await.unwrap();
    assert_eq!(keys(&kvs), ["a", "a/1", "a/2", "ab/1"]);

    let (kvs, _) = store.range("").await.unwrap();
    assert_eq!(keys(&kvs), ["a", "a/1", "a/2", "ab/1", "b/1"]);

    let (kvs, _) = store.range("c/").await.unwrap();
    assert!(kvs.is_empty());
}

#[tokio::test]
async fn revisions_bump_once_per_write_txn() {
    let store = SqliteStore::open_in_memory().unwrap();
    assert_eq!(store.revision().await.unwrap(), 0);

    let outcome = write(&store, vec![put("k/a", "1"), put("k/b", "1")]).await;
    assert_eq!(outcome.revision, 1, "all ops of one txn share one revision");
    let outcome = write(&store, vec![put("k/a", "2")]).await;
    assert_eq!(outcome.revision, 2);
    let outcome = write(&store, vec![put("k/a", "3")]).await;
    assert_eq!(outcome.revision, 3);
    assert_eq!(store.revision().await.unwrap(), 3);

    let a = store.get("k/a").await.unwrap().unwrap();
    assert_eq!(
        (a.create_revision, a.mod_revision, a.value.as_slice()),
        (1, 3, &b"3"[..])
    );
    let b = store.get("k/b").await.unwrap().unwrap();
    assert_eq!((b.create_revision, b.mod_revision), (1, 1));

    // Deleting and re-creating a key starts a new life: create_revision resets.
    write(&store, vec![del("k/a")]).await;
    let outcome = write(&store, vec![put("k/a", "again")]).await;
    assert_eq!(outcome.revision, 5);
    let a = store.get("k/a").await.unwrap().unwrap();
    assert_eq!((a.create_revision, a.mod_revision), (5, 5));
}

#[tokio::test]
async fn failed_compares_write_nothing() {
    let store = SqliteStore::open_in_memory().unwrap();
    write(&store, vec![put("k", "v1")]).await;
    let mut watch = store.watch("", 1).await.unwrap();

    let failing = [
        vec![Compare::Missing("k".into())],
        vec![Compare::Exists("nope".into())],
        vec![Compare::ModRevision("k".into(), 7)],
        vec![Compare::ModRevision("nope".into(), 1)],
        // The first holds, the second does not: still nothing is written.
        vec![Compare::Exists("k".into()), Compare::Missing("k".into())],
    ];
    for compares in failing {
        let outcome = store
            .txn(
                compares.clone(),
                vec![put("k", "v2"), put("other", "x"), del("k")],
            )
            .await
            .unwrap();
        assert_eq!(
            outcome,
            TxnOutcome {
                succeeded: false,
                revision: 1
            },
            "{compares:?}"
        );
    }
    assert_eq!(store.revision().await.unwrap(), 1);
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"v1");
    assert_eq!(store.get("other").await.unwrap(), None);
    assert_quiet(&mut watch).await;
}

#[tokio::test]
async fn compares_that_hold_apply_the_ops() {
    let store = SqliteStore::open_in_memory().unwrap();
    let outcome = store
        .txn(
            vec![
                Compare::Missing("k".into()),
                Compare::ModRevision("k".into(), 0),
            ],
            vec![put("k", "v1")],
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        TxnOutcome {
            succeeded: true,
            revision: 1
        }
    );
    let outcome = store
        .txn(
            vec![
                Compare::Exists("k".into()),
                Compare::ModRevision("k".into(), 1),
            ],
            vec![put("k", "v2")],
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        TxnOutcome {
            succeeded: true,
            revision: 2
        }
    );
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"v2");
}

#[tokio::test]
async fn txn_that_changes_nothing_keeps_the_revision() {
    let store = SqliteStore::open_in_memory().unwrap();
    write(&store, vec![put("k", "v")]).await;
    let mut watch = store.watch("", 1).await.unwrap();

    let outcome = write(
        &store,
        vec![
            del("missing"),
            Op::DeletePrefix {
                prefix: "nothing/".into(),
            },
        ],
    )
    .await;
    assert_eq!(outcome.revision, 1);
    assert_eq!(write(&store, Vec::new()).await.revision, 1);
    assert_eq!(store.revision().await.unwrap(), 1);
    assert_quiet(&mut watch).await;

    assert_eq!(
        write(&store, vec![put("k", "v")]).await.revision,
        2,
        "a put always counts"
    );
}

#[tokio::test]
async fn delete_prefix_deletes_exactly_the_prefix() {
    let store = SqliteStore::open_in_memory().unwrap();
    write(
        &store,
        vec![
            put("f/1", "a"),
            put("f/2", "b"),
            put("f", "c"),
            put("fx/1", "d"),
            put("g/1", "e"),
        ],
    )
    .await;
    let mut watch = store.watch("", 1).await.unwrap();

    let outcome = write(
        &store,
        vec![Op::DeletePrefix {
            prefix: "f/".into(),
        }],
    )
    .await;
    assert_eq!(outcome.revision, 2);

    let (kvs, revision) = store.range("").await.unwrap();
    assert_eq!(keys(&kvs), ["f", "fx/1", "g/1"]);
    assert_eq!(revision, 2);

    let batch = next_batch(&mut watch).await;
    assert_eq!(summary(&batch), [ev("f/1", 2, None), ev("f/2", 2, None)]);
}

#[tokio::test]
async fn watch_replays_history_then_follows_live_changes_in_order() {
    let store = SqliteStore::open_in_memory().unwrap();
    write(&store, vec![put("fn/a", "1")]).await; // rev 1
    write(&store, vec![put("fn/b", "1"), put("fn/a", "2")]).await; // rev 2
    write(&store, vec![del("fn/b")]).await; // rev 3

    let mut watch = store.watch("fn/", 1).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.extend(summary(&next_batch(&mut watch).await));
    }
    assert_eq!(
        seen,
        [
            ev("fn/b", 2, Some("1")),
            ev("fn/a", 2, Some("2")),
            ev("fn/b", 3, None)
        ]
    );

    write(&store, vec![put("fn/c", "1")]).await; // rev 4
    write(&store, vec![put("fn/c", "2"), del("fn/a")]).await; // rev 5
    assert_eq!(
        summary(&next_batch(&mut watch).await),
        [ev("fn/c", 4, Some("1"))]
    );
    assert_eq!(
        summary(&next_batch(&mut watch).await),
        [ev("fn/c", 5, Some("2")), ev("fn/a", 5, None)]
    );
    assert_quiet(&mut watch).await;

    // Replayed puts carry the right create_revision.
    let mut watch = store.watch("fn/c", 0).await.unwrap();
    let batch = next_batch(&mut watch).await;
    let WatchEvent::Put(kv) = &batch[0] else {
        panic!("expected a put, got {batch:?}");
    };
    assert_eq!((kv.create_revision, kv.mod_revision), (4, 4));
}

#[tokio::test]
async fn watch_sees_every_revision_exactly_once_across_replay_and_live() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    // More history than one replay chunk, and writes racing with the replay.
    for i in 0..300 {
        write(&store, vec![put(&format!("x/{}", i % 7), &i.to_string())]).await;
    }
    let mut watch = store.watch("x/", 0).await.unwrap();
    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            for i in 300..400 {
                write(&store, vec![put(&format!("x/{}", i % 7), &i.to_string())]).await;
            }
        })
    };
    let mut revisions = Vec::new();
    while revisions.len() < 400 {
        for event in next_batch(&mut watch).await {
            revisions.push(event.revision());
        }
    }
    writer.await.unwrap();
    assert_eq!(revisions, (1..=400).collect::<Vec<Revision>>());
    assert_quiet(&mut watch).await;
}

#[tokio::test]
async fn watch_filters_by_prefix() {
    let store = SqliteStore::open_in_memory().unwrap();
    write(&store, vec![put("a/old", "1"), put("ab/old", "1")]).await; // rev 1
    write(&store, vec![put("b/old", "1")]).await; // rev 2, nothing under a/
    let mut watch = store.watch("a/", 0).await.unwrap();

    assert_eq!(
        summary(&next_batch(&mut watch).await),
        [ev("a/old", 1, Some("1"))]
    );
    write(&store, vec![put("ab/x", "1")]).await; // rev 3
    write(
        &store,
        vec![put("b/x", "1"), put("a/x", "1"), put("a", "1")],
    )
    .await; // rev 4
    assert_eq!(
        summary(&next_batch(&mut watch).await),
        [ev("a/x", 4, Some("1"))]
    );
    write(&store, vec![put("ab/y", "1")]).await; // rev 5
    assert_quiet(&mut watch).await;
}

#[tokio::test]
async fn watch_from_the_future_starts_after_that_revision() {
    let store = SqliteStore::open_in_memory().unwrap();
    write(&store, vec![put("k", "1")]).await; // rev 1
    let mut watch = store.watch("", 2).await.unwrap();
    write(&store, vec![put("k", "2")]).await; // rev 2: skipped
    write(&store, vec![put("k", "3")]).await; // rev 3
    assert_eq!(
        summary(&next_batch(&mut watch).await),
        [ev("k", 3, Some("3"))]
    );
}

#[tokio::test]
async fn watch_from_a_compacted_revision_returns_compacted() {
    let store = SqliteStore::open_in_memory_with(SqliteStoreOptions {
        history_revisions: 3,
        ..SqliteStoreOptions::default()
    })
    .unwrap();
    for i in 1..=10 {
        write(&store, vec![put("k", &i.to_string())]).await;
    }
    // History holds revisions 8..=10.
    match store.watch("", 6).await {
        Err(StoreError::Compacted(oldest)) => assert_eq!(oldest, 8),
        other => panic!("expected Compacted(8), got {:?}", other.map(|_| "a watch")),
    }
    match store.watch("", 0).await {
        Err(StoreError::Compacted(8)) => {}
        other => panic!("expected Compacted(8), got {:?}", other.map(|_| "a watch")),
    }

    let mut watch = store.watch("", 7).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.extend(summary(&next_batch(&mut watch).await));
    }
    assert_eq!(
        seen,
        [
            ev("k", 8, Some("8")),
            ev("k", 9, Some("9")),
            ev("k", 10, Some("10"))
        ]
    );

    let (history_rows,): (i64,) = {
        let state = store.inner.lock();
        let live = state.as_ref().unwrap();
        live.conn
            .query_row("SELECT count(*) FROM history", [], |row| Ok((row.get(0)?,)))
            .unwrap()
    };
    assert_eq!(history_rows, 3, "history is bounded");
}

#[tokio::test]
async fn lagging_watcher_gets_compacted_instead_of_losing_events() {
    let store = SqliteStore::open_in_memory_with(SqliteStoreOptions {
        watch_buffer: 2,
        ..SqliteStoreOptions::default()
    })
    .unwrap();
    let mut watch = store.watch("", 0).await.unwrap();
    for i in 1..=5 {
        write(&store, vec![put("k", &i.to_string())]).await;
    }
    for _ in 0..2 {
        match tokio::time::timeout(WAIT, watch.next())
            .await
            .expect("watch timed out")
        {
            Err(StoreError::Compacted(revision)) => assert_eq!(revision, 1),
            other => panic!("expected Compacted(1), got {other:?}"),
        }
    }

    // A watcher that keeps up is unaffected.
    let mut watch = store.watch("", 5).await.unwrap();
    for i in 6..=10 {
        write(&store, vec![put("k", &i.to_string())]).await;
        assert_eq!(
            summary(&next_batch(&mut watch).await),
            [ev("k", i, Some(&i.to_string()))]
        );
    }
}

#[tokio::test]
async fn watch_ends_when_the_store_is_dropped() {
    let store = SqliteStore::open_in_memory().unwrap();
    let mut watch = store.watch("", 0).await.unwrap();
    write(&store, vec![put("k", "1")]).await;
    drop(store);
    // Already committed events are still delivered, then the watch ends.
    assert_eq!(
        summary(&next_batch(&mut watch).await),
        [ev("k", 1, Some("1"))]
    );
    let end = tokio::time::timeout(WAIT, watch.next())
        .await
        .expect("watch timed out");
    assert!(matches!(end, Ok(None)), "got {end:?}");
}

#[tokio::test]
async fn watch_ends_when_the_store_is_closed() {
    let store = SqliteStore::open_in_memory().unwrap();
    write(&store, vec![put("k", "1")]).await;
    let mut live = store.watch("", 1).await.unwrap();
    let mut replaying = store.watch("", 0).await.unwrap();
    store.close().await.unwrap();
    store.close().await.unwrap();

    let end = tokio::time::timeout(WAIT, live.next())
        .await
        .expect("watch timed out");
    assert!(matches!(end, Ok(None)), "got {end:?}");
    let end = tokio::time::timeout(WAIT, replaying.next())
        .await
        .expect("watch timed out");
    assert!(matches!(end, Ok(None)), "got {end:?}");

    assert!(matches!(store.get("k").await, Err(StoreError::Closed)));
    assert!(matches!(
        store.txn(Vec::new(), vec![put("k", "2")]).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(store.watch("", 0).await, Err(StoreError::Closed)));
}

#[tokio::test]
async fn empty_value_is_a_put_not_a_delete() {
    let store = SqliteStore::open_in_memory().unwrap();
    write(
        &store,
        vec![Op::Put {
            key: "k".into(),
            value: Vec::new(),
        }],
    )
    .await;
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"");
    let mut watch = store.watch("", 0).await.unwrap();
    assert_eq!(
        summary(&next_batch(&mut watch).await),
        [ev("k", 1, Some(""))]
    );
}

#[tokio::test]
async fn file_store_is_wal_with_full_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    let state = store.inner.lock();
    let conn = &state.as_ref().unwrap().conn;
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |row| row.get(0))
        .unwrap();
    let sync: i64 = conn
        .pragma_query_value(None, "synchronous", |row| row.get(0))
        .unwrap();
    let busy: i64 = conn
        .pragma_query_value(None, "busy_timeout", |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(sync, 2, "synchronous=FULL");
    assert_eq!(busy, 5000);
}

#[tokio::test]
async fn writes_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        write(&store, vec![put("fn/a", "1"), put("fn/b", "2")]).await;
        write(&store, vec![del("fn/b"), put("fn/a", "3")]).await;
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.revision().await.unwrap(), 2);
    let (kvs, revision) = store.range("fn/").await.unwrap();
    assert_eq!(revision, 2);
    assert_eq!(
        kvs,
        [KeyValue {
            key: "fn/a".into(),
            value: b"3".to_vec(),
            create_revision: 1,
            mod_revision: 2,
        }]
    );
    // History survives too, and revisions continue.
    let mut watch = store.watch("fn/", 0).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 4 {
        seen.extend(summary(&next_batch(&mut watch).await));
    }
    assert_eq!(
        seen,
        [
            ev("fn/a", 1, Some("1")),
            ev("fn/b", 1, Some("2")),
            ev("fn/b", 2, None),
            ev("fn/a", 2, Some("3")),
        ]
    );
    assert_eq!(write(&store, vec![put("fn/c", "1")]).await.revision, 3);
}

#[tokio::test]
async fn acknowledged_write_is_visible_to_a_second_store_without_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let first = SqliteStore::open(&path).unwrap();
    write(&first, vec![put("fn/a", "1")]).await;

    // `first` stays open: the write must already be on disk, not in its memory.
    let second = SqliteStore::open(&path).unwrap();
    let got = second
        .get("fn/a")
        .await
        .unwrap()
        .expect("visible to a second store");
    assert_eq!((got.value.as_slice(), got.mod_revision), (&b"1"[..], 1));
    assert_eq!(second.revision().await.unwrap(), 1);

    // And the revision counter is shared through the file.
    assert_eq!(write(&second, vec![put("fn/b", "1")]).await.revision, 2);
    assert_eq!(first.get("fn/b").await.unwrap().unwrap().mod_revision, 2);
    drop(first);
}

#[tokio::test]
async fn watch_fills_gaps_left_by_another_writer_on_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let first = SqliteStore::open(&path).unwrap();
    let second = SqliteStore::open(&path).unwrap();
    let mut watch = first.watch("", 0).await.unwrap();

    write(&second, vec![put("from/second", "1")]).await; // rev 1, not broadcast on `first`
    write(&first, vec![put("from/first", "1")]).await; // rev 2
    let mut seen = Vec::new();
    while seen.len() < 2 {
        seen.extend(summary(&next_batch(&mut watch).await));
    }
    assert_eq!(
        seen,
        [
            ev("from/second", 1, Some("1")),
            ev("from/first", 2, Some("1"))
        ]
    );
}

async fn race_once(a: Arc<SqliteStore>, b: Arc<SqliteStore>, round: usize) {
    let seen = a.get("race").await.unwrap().map_or(0, |kv| kv.mod_revision);
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let racer = |store: Arc<SqliteStore>, name: &'static str| {
        let barrier = Arc::clone(&barrier);
        tokio::spawn(async move {
            barrier.wait().await;
            store
                .txn(
                    vec![Compare::ModRevision("race".into(), seen)],
                    vec![put("race", &format!("{name}{round}"))],
                )
                .await
                .expect("txn")
        })
    };
    let first = racer(a.clone(), "a");
    let second = racer(b, "b");
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert!(
        first.succeeded != second.succeeded,
        "round {round}: {first:?} / {second:?}"
    );
    let winner = if first.succeeded { first } else { second };
    let loser = if first.succeeded { second } else { first };
    assert_eq!(winner.revision, seen + 1);
    assert_eq!(
        loser.revision,
        seen + 1,
        "a failed compare reports the current revision"
    );
    assert_eq!(a.get("race").await.unwrap().unwrap().mod_revision, seen + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_mod_revision_writers_exactly_one_wins() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    for round in 0..20 {
        race_once(Arc::clone(&store), Arc::clone(&store), round).await;
    }

    // Also across two connections to the same file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    let a = Arc::new(SqliteStore::open(&path).unwrap());
    let b = Arc::new(SqliteStore::open(&path).unwrap());
    for round in 0..20 {
        race_once(Arc::clone(&a), Arc::clone(&b), round).await;
    }
}

/// The store contract (`crate::contract`), the same suite `EtcdStore` runs.
struct InMemory;

impl crate::contract::Subject for InMemory {
    type S = SqliteStore;

    async fn fresh(&mut self) -> SqliteStore {
        SqliteStore::open_in_memory().unwrap()
    }

    async fn compact(&self, store: &SqliteStore, revision: Revision) {
        store.compact(revision).await.unwrap();
    }
}

#[tokio::test]
async fn sqlite_store_meets_the_store_contract() {
    crate::contract::run_all(&mut InMemory).await;
}

#[tokio::test]
async fn local_membership_meets_the_membership_contract() {
    crate::contract::run_membership(&crate::LocalMembership::new()).await;
}
