//! [`Membership`] on etcd: each member's record is a key under a lease of its own.
//!
//! Records live beside the config keys, under `PREFIX-nodes/` (`/moontide-nodes/NAME` for
//! the default prefix): outside the config prefix, so the config watch every node runs
//! never sees a registry write (a node reports the revision it serves; if that report woke
//! every node's config watch, they would report again, forever). `join` grants a lease
//! and puts the record with it; `renew` is one keep-alive round trip; `leave` revokes the
//! lease, which deletes the record. A lease etcd no longer knows (it expired: the process
//! was paused or cut off longer than its TTL) is [`StoreError::LeaseExpired`].

use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{Client, GetOptions, PutOptions, SortOrder, SortTarget};
use moontide_store::StoreError;
use moontide_store::membership::{Lease, Member, Membership};

use crate::{EtcdStore, backend, bounded, prefix_end};

impl EtcdStore {
    /// Where member records live: `PREFIX-nodes/` (`/moontide-nodes/` by default).
    fn members_prefix(&self) -> String {
        format!("{}-nodes/", self.prefix.trim_end_matches('/'))
    }
}

#[async_trait]
impl Membership for EtcdStore {
    async fn join(
        &self,
        name: &str,
        record: Vec<u8>,
        ttl: Duration,
    ) -> Result<Box<dyn Lease>, StoreError> {
        let mut client = self.client.clone();
        let seconds = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let granted = bounded(client.lease_grant(seconds, None)).await?;
        let lease = EtcdLease {
            client,
            key: format!("{}{name}", self.members_prefix()),
            id: granted.id(),
        };
        lease.update(record).await?;
        Ok(Box::new(lease))
    }

    async fn members(&self) -> Result<Vec<Member>, StoreError> {
        let mut kv = self.client.kv_client();
        let prefix = self.members_prefix();
        let options = GetOptions::new()
            .with_range(prefix_end(prefix.as_bytes()))
            .with_sort(SortTarget::Key, SortOrder::Ascend);
        let response = bounded(kv.get(prefix.as_bytes().to_vec(), Some(options))).await?;
        response
            .kvs()
            .iter()
            .map(|kv| {
                let key = kv.key_str().map_err(backend)?;
                Ok(Member {
                    name: key.strip_prefix(prefix.as_str()).unwrap_or(key).to_string(),
                    record: kv.value().to_vec(),
                })
            })
            .collect()
    }
}

struct EtcdLease {
    client: Client,
    key: String,
    id: i64,
}

/// etcd's word for a lease it does not know (expired or revoked).
fn lease_gone(error: StoreError) -> StoreError {
    match error {
        StoreError::Backend(message) if message.contains("lease not found") => {
            StoreError::LeaseExpired
        }
        other => other,
    }
}

#[async_trait]
impl Lease for EtcdLease {
    async fn update(&self, record: Vec<u8>) -> Result<(), StoreError> {
        let mut kv = self.client.kv_client();
        let options = PutOptions::new().with_lease(self.id);
        bounded(kv.put(self.key.clone(), record, Some(options)))
            .await
            .map_err(lease_gone)?;
        Ok(())
    }

    async fn renew(&self) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        let (mut keeper, mut answers) = bounded(client.lease_keep_alive(self.id))
            .await
            .map_err(lease_gone)?;
        bounded(keeper.keep_alive()).await.map_err(lease_gone)?;
        match bounded(answers.message()).await.map_err(lease_gone)? {
            // etcd answers a keep-alive of an unknown lease with a TTL of 0.
            Some(answer) if answer.ttl() > 0 => Ok(()),
            Some(_) => Err(StoreError::LeaseExpired),
            None => Err(StoreError::Backend(
                "etcd closed the lease keep-alive stream".into(),
            )),
        }
    }

    async fn leave(&self) -> Result<(), StoreError> {
        let mut client = self.client.clone();
        match bounded(client.lease_revoke(self.id))
            .await
            .map_err(lease_gone)
        {
            Ok(_) | Err(StoreError::LeaseExpired) => Ok(()),
            Err(error) => Err(error),
        }
    }
}
