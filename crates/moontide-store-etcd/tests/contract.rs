//! `EtcdStore` against a real etcd (started by the test harness on free loopback ports):
//! the store contract every `Store` meets (`moontide_store::contract`, the suite
//! `SqliteStore` runs too), then what only a networked store has to do: fail fast while
//! etcd is down and work again, watches included, once it is back.

#[path = "../../moontide/tests/common/etcd.rs"]
mod etcd;

use std::time::Duration;

use moontide_store::contract::{self, put, write};
use moontide_store::{Revision, Store, StoreError};
use moontide_store_etcd::{EtcdConfig, EtcdStore, REQUEST_TIMEOUT};

struct OnEtcd {
    endpoint: String,
    keyspaces: usize,
}

impl contract::Subject for OnEtcd {
    type S = EtcdStore;

    async fn fresh(&mut self) -> EtcdStore {
        self.keyspaces += 1;
        let url = format!("etcd://{}/contract-{}", self.endpoint, self.keyspaces);
        EtcdStore::connect(&EtcdConfig::from_url(&url).unwrap())
            .await
            .unwrap()
    }

    async fn compact(&self, store: &EtcdStore, revision: Revision) {
        store.compact(revision).await.unwrap();
    }
}

#[tokio::test]
async fn etcd_store_meets_the_store_contract() {
    let etcd = etcd::Etcd::start();
    contract::run_all(&mut OnEtcd {
        endpoint: etcd.endpoint(),
        keyspaces: 0,
    })
    .await;
}

#[tokio::test]
async fn keyspaces_under_different_prefixes_do_not_see_each_other() {
    let etcd = etcd::Etcd::start();
    let connect = |prefix: &str| {
        let url = format!("{}/{prefix}", etcd.store_url());
        async move {
            EtcdStore::connect(&EtcdConfig::from_url(&url).unwrap())
                .await
                .unwrap()
        }
    };
    let (a, b) = (connect("a").await, connect("a2").await);
    write(&a, vec![put("k", "from a")]).await;
    write(&b, vec![put("k", "from b")]).await;
    let (in_a, _) = a.range("").await.unwrap();
    assert_eq!(in_a.len(), 1);
    assert_eq!(in_a[0].value, b"from a");
    assert!(etcd.etcdctl(&["get", "/a/k"]).contains("from a"));
}

#[tokio::test]
async fn calls_fail_while_etcd_is_down_and_work_when_it_is_back() {
    let mut etcd = etcd::Etcd::start();
    let store = EtcdStore::connect(&EtcdConfig::from_url(&etcd.store_url()).unwrap())
        .await
        .unwrap();
    let before = write(&store, vec![put("k", "1")]).await.revision;
    let mut watch = store.watch("", before).await.unwrap();

    etcd.stop();
    // A bound on waiting, not a timing assertion: a call must end, with an error.
    let guard = REQUEST_TIMEOUT * 3;
    let failed = tokio::time::timeout(guard, store.txn(Vec::new(), vec![put("k", "2")]))
        .await
        .expect("a write while etcd is down ends");
    assert!(matches!(failed, Err(StoreError::Backend(_))), "{failed:?}");
    let broken = tokio::time::timeout(guard, watch.next())
        .await
        .expect("a watch on a dead etcd ends");
    assert!(matches!(broken, Err(StoreError::Backend(_))), "{broken:?}");

    etcd.restart();
    let mut written = None;
    for _ in 0..50 {
        match store.txn(Vec::new(), vec![put("k", "3")]).await {
            Ok(outcome) => {
                written = Some(outcome.revision);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let written = written.expect("writes work again once etcd is back");
    let mut watch = store.watch("", before).await.unwrap();
    let events = watch.next().await.unwrap().unwrap();
    assert_eq!(
        events[0].revision(),
        written,
        "the watch resumes from a revision"
    );
    assert_eq!(store.get("k").await.unwrap().unwrap().value, b"3");
}

#[tokio::test]
async fn etcd_membership_meets_the_membership_contract() {
    let etcd = etcd::Etcd::start();
    let store = EtcdStore::connect(&EtcdConfig::from_url(&etcd.store_url()).unwrap())
        .await
        .unwrap();
    contract::run_membership(&store).await;
}

/// Member records stay out of the config keyspace: a node reporting the revision it
/// serves must not wake every node's config watch (which would report again, forever).
#[tokio::test]
async fn member_records_are_invisible_to_the_config_keyspace() {
    use moontide_store::Membership;
    let etcd = etcd::Etcd::start();
    let store = EtcdStore::connect(&EtcdConfig::from_url(&etcd.store_url()).unwrap())
        .await
        .unwrap();
    let from = store.revision().await.unwrap();
    let mut watch = store.watch("", from).await.unwrap();
    let lease = store
        .join("node-a", b"record".to_vec(), Duration::from_secs(5))
        .await
        .unwrap();
    lease.update(b"again".to_vec()).await.unwrap();
    write(&store, vec![put("f/head/x", "config")]).await;
    let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the config write arrives")
        .unwrap()
        .unwrap();
    let keys: Vec<&str> = batch.iter().map(|event| event.key()).collect();
    assert_eq!(keys, ["f/head/x"], "the config watch saw only config");
    let (config, _) = store.range("").await.unwrap();
    assert_eq!(
        config.len(),
        1,
        "range over the config sees no member: {config:?}"
    );
    assert_eq!(store.members().await.unwrap().len(), 1);
}
