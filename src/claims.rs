//! Conditional writes whose outcome is known for sure, and what is built on
//! them: claiming, renewing and releasing server slots, creating the cluster
//! record.

use anyhow::{Context, Result};

use crate::decision::slot_is_live;
use crate::identity::Identity;
use crate::model::{SlotRecord, slot_key};
use crate::registry::{Condition, PutOutcome, SlotView, Store};
use crate::retry::Backoff;

/// Retries of one write that meets a 409 conflict.
const MAX_CONFLICT_RETRIES: u32 = 5;

/// A conditional write whose result is known for sure (see
/// [`Claims::put_settled`]); `Some(etag)` when the key holds our bytes.
pub async fn put_settled(
    store: &dyn Store,
    key: &str,
    body: Vec<u8>,
    condition: Condition,
) -> Result<Option<String>> {
    let mut backoff = Backoff::CONTENTION;
    for _ in 0..=MAX_CONFLICT_RETRIES {
        match store.put(key, body.clone(), condition.clone()).await? {
            PutOutcome::Written(etag) => return Ok(Some(etag)),
            PutOutcome::Conflict => tokio::time::sleep(backoff.delay()).await,
            PutOutcome::PreconditionFailed => {
                let back = store.get(key).await?;
                return Ok(back.filter(|o| o.body == body).map(|o| o.etag));
            }
            PutOutcome::Unknown(err) => {
                tracing::warn!("the result of writing {key} is unknown, reading it back: {err:#}");
                let back = store.get(key).await.with_context(|| {
                    format!("reading back {key} after a write with a lost response")
                })?;
                return Ok(back.filter(|o| o.body == body).map(|o| o.etag));
            }
        }
    }
    tracing::warn!("writing {key} met {MAX_CONFLICT_RETRIES} conflicts in a row");
    Ok(None)
}

/// Writes to the registry on behalf of one node.
pub struct Claims<'a> {
    /// The registry.
    pub store: &'a dyn Store,
    /// This node.
    pub me: &'a Identity,
    /// The store ignores conditions and the operator accepted it.
    pub racy: bool,
    /// The cluster this node serves, written into its slot.
    pub cluster_id: Option<String>,
}

/// What became of a renewal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Our claim, written again.
    Renewed,
    /// The slot was free (absent, expired or released): taken again.
    Retaken,
    /// Another node holds it.
    HeldBy(String),
    /// This node released it (`leave`): it is not taken again until `run`
    /// decides afresh.
    Released,
}

impl Claims<'_> {
    /// A conditional write whose result is known for sure: a 409 is
    /// retried, and a lost response or a 412 (which a retry of our own
    /// applied write also gets) is settled by reading the key back: the
    /// write is ours when the key holds exactly the bytes we sent (claim ids
    /// are random, and a renewal differs from a release of the same claim).
    /// `Some(etag)` when it is ours.
    pub async fn put_settled(
        &self,
        key: &str,
        body: Vec<u8>,
        condition: Condition,
    ) -> Result<Option<String>> {
        let condition = if self.racy {
            Condition::None
        } else {
            condition
        };
        put_settled(self.store, key, body, condition).await
    }

    /// Writes server slot `index` with our claim; whether this node holds it.
    pub async fn write_slot(
        &self,
        index: u32,
        claim: &str,
        sequence: u64,
        condition: Condition,
    ) -> Result<bool> {
        let record = SlotRecord {
            node: self.me.node.clone(),
            address: self.me.address,
            instance_id: self.me.instance_id.clone(),
            claim_id: claim.to_string(),
            sequence,
            released: false,
            cluster_id: self.cluster_id.clone(),
        };
        let body = serde_json::to_vec(&record)?;
        let won = self.put_settled(&slot_key(index), body, condition).await?;
        Ok(won.is_some())
    }

    /// Renews our claim on `slot` (as just read), or takes the slot again
    /// when it is free; never takes it from a live holder.
    pub async fn renew(&self, slot: &SlotView, claim: &str, expiry: u64) -> Result<Renewal> {
        let record = slot.record.as_ref();
        if record.is_some_and(|r| r.claim_id == claim && r.released) {
            return Ok(Renewal::Released);
        }
        let ours = record.is_some_and(|r| r.claim_id == claim && !r.released);
        let (condition, sequence, outcome) = match (&slot.etag, ours) {
            (None, _) => (Condition::Absent, 1, Renewal::Retaken),
            (Some(etag), true) => (
                Condition::Matches(etag.clone()),
                record.map_or(1, |r| r.sequence + 1),
                Renewal::Renewed,
            ),
            (Some(etag), false) if !slot_is_live(slot, expiry) => {
                (Condition::Matches(etag.clone()), 1, Renewal::Retaken)
            }
            (Some(_), false) => {
                return Ok(Renewal::HeldBy(
                    record.map_or_else(|| "?".to_string(), |r| r.node.clone()),
                ));
            }
        };
        if self
            .write_slot(slot.index, claim, sequence, condition)
            .await?
        {
            return Ok(outcome);
        }
        let now = self.store.get(&slot_key(slot.index)).await?;
        let holder = now
            .and_then(|o| SlotRecord::parse(&o.body).ok())
            .map_or_else(|| "?".to_string(), |r| r.node);
        Ok(Renewal::HeldBy(holder))
    }

    /// Marks our claim on `slot` released, so a replacement can take it at
    /// once. Whether it was ours to release.
    pub async fn release(&self, slot: &SlotView, claim: Option<&str>) -> Result<bool> {
        let Some(record) = slot.record.as_ref() else {
            return Ok(false);
        };
        let ours = match claim {
            Some(c) => record.claim_id == c,
            None => record.held_by(&self.me.node, self.me.instance_id.as_deref()),
        };
        let Some(etag) = slot.etag.clone().filter(|_| ours && !record.released) else {
            return Ok(false);
        };
        let released = SlotRecord {
            released: true,
            sequence: record.sequence + 1,
            ..record.clone()
        };
        let body = serde_json::to_vec(&released)?;
        let done = self
            .put_settled(&slot_key(slot.index), body, Condition::Matches(etag))
            .await?;
        Ok(done.is_some())
    }
}
