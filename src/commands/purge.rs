//! `purge`: delete expired heartbeats in batches, and mark expired slots
//! released.

use std::collections::HashSet;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde_json::json;

use super::{open_store, registry_url};
use crate::claims::Claims;
use crate::cli::GlobalOpts;
use crate::decision::slot_is_live;
use crate::identity::Identity;
use crate::registry::{HeartbeatEntry, Store, list_heartbeats, read_slots};

/// The keys to delete: every heartbeat at least `expiry` old, and, when
/// `own` is given, this node's heartbeats other than the ones just written.
pub fn doomed(
    entries: &[HeartbeatEntry],
    now: DateTime<Utc>,
    expiry: u64,
    own: Option<(&str, &HashSet<String>)>,
) -> Vec<String> {
    entries
        .iter()
        .filter(|e| {
            e.parsed.age_seconds(now) >= expiry
                || e.from_the_future(now, expiry)
                || own.is_some_and(|(node, keep)| e.parsed.node == node && !keep.contains(&e.key))
        })
        .map(|e| e.key.clone())
        .collect()
}

/// What a purge did.
#[derive(Debug, Default)]
pub struct Purged {
    /// Keys deleted.
    pub deleted: usize,
    /// Delete requests made.
    pub requests: usize,
}

/// Lists the heartbeats and deletes the doomed ones.
pub async fn purge_heartbeats(
    store: &dyn Store,
    expiry: u64,
    own: Option<(&str, &HashSet<String>)>,
) -> Result<Purged> {
    let entries = list_heartbeats(store).await?;
    let keys = doomed(&entries, Utc::now(), expiry, own);
    if keys.is_empty() {
        return Ok(Purged::default());
    }
    let requests = store.delete(&keys).await?;
    Ok(Purged {
        deleted: keys.len(),
        requests,
    })
}

/// `purge`.
pub async fn purge(opts: &GlobalOpts) -> Result<()> {
    let url = registry_url(opts)?;
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();
    let (purged, slots) = tokio::try_join!(
        purge_heartbeats(store, opts.expiry, None),
        read_slots(store, opts.servers)
    )?;
    // Releasing needs no identity: the holder's own record is written back,
    // marked released, under If-Match on the version just read.
    let mut freed = Vec::new();
    for slot in slots.iter().filter(|s| !slot_is_live(s, opts.expiry)) {
        let Some(record) = &slot.record else { continue };
        if record.released {
            continue;
        }
        let holder = Identity {
            address: record.address,
            node: record.node.clone(),
            instance_id: record.instance_id.clone(),
        };
        let claims = Claims {
            store,
            me: &holder,
            racy: false,
            cluster_id: record.cluster_id.clone(),
        };
        if claims.release(slot, Some(&record.claim_id)).await? {
            freed.push(slot.index);
        }
    }
    if opts.json {
        println!(
            "{}",
            json!({ "deleted": purged.deleted, "delete_requests": purged.requests, "slots_freed": freed })
        );
    } else {
        println!(
            "deleted {} expired heartbeats in {} requests",
            purged.deleted, purged.requests
        );
        if !freed.is_empty() {
            println!("released expired server slots: {freed:?}");
        }
    }
    Ok(())
}
