//! `purge`: delete expired heartbeats in batches. Ages are measured on the
//! store's clock: a purger whose own clock is off deletes nothing live.

use std::collections::HashSet;

use anyhow::Result;
use chrono::{DateTime, Utc};
use serde_json::json;

use super::open_store;
use crate::cli::{ClusterOpts, OutputOpts};
use crate::decision::slot_is_live;
use crate::model::{Role, Settings};
use crate::registry::{HeartbeatEntry, Store, parse_listing, read_cluster, read_slots};

/// The keys to delete: every heartbeat the store wrote at least `expiry`
/// ago, and, when `own` is given, this node's heartbeats other than the
/// ones just written.
pub fn doomed(
    entries: &[HeartbeatEntry],
    now: DateTime<Utc>,
    expiry: u64,
    own: Option<(&str, &HashSet<String>)>,
) -> Vec<String> {
    entries
        .iter()
        .filter(|e| {
            e.age_seconds(now) >= expiry
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

/// Deletes the doomed heartbeats, a listing page at a time: each page's
/// doomed keys go into one `DeleteObjects` before the next page is read, so
/// memory stays bounded by a page whatever the registry holds.
pub async fn purge_heartbeats(
    store: &dyn Store,
    settings: Settings,
    own: Option<(&str, &HashSet<String>)>,
) -> Result<Purged> {
    let mut purged = Purged::default();
    for (dir, expiry) in [
        (Role::Servers.dir(), settings.expiry),
        (Role::Agents.dir(), settings.agent_expiry),
    ] {
        let mut token = None;
        loop {
            let (page, next) = store.list_page(dir, token).await?;
            let entries = parse_listing(page);
            let now = store.now().await;
            let keys = doomed(&entries, now, expiry, own);
            if !keys.is_empty() {
                purged.requests += store.delete(&keys).await?;
                purged.deleted += keys.len();
            }
            match next {
                Some(t) => token = Some(t),
                None => break,
            }
        }
    }
    Ok(purged)
}

/// `purge`. Expired slots are reported, not released: a released slot
/// says its holder left for good (the witness rule counts on it), and an
/// expired one is taken over under `If-Match` anyway.
pub async fn purge(cluster: &ClusterOpts, output: &OutputOpts) -> Result<()> {
    let url = cluster.registry_url()?;
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();
    let settings = match read_cluster(store).await? {
        Some((record, _)) => record.settings(cluster.seed()),
        None => cluster.seed(),
    };
    let (purged, slots) = tokio::try_join!(
        purge_heartbeats(store, settings, None),
        read_slots(store, settings.servers)
    )?;
    let expired: Vec<u32> = slots
        .iter()
        .filter(|s| s.record.as_ref().is_some_and(|r| !r.released))
        .filter(|s| !slot_is_live(s, settings.expiry))
        .map(|s| s.index)
        .collect();
    if output.json {
        println!(
            "{}",
            json!({
                "deleted": purged.deleted,
                "delete_requests": purged.requests,
                "expired_slots": expired,
                "expiry": settings.expiry,
                "agent_expiry": settings.agent_expiry,
            })
        );
    } else {
        println!(
            "deleted {} expired heartbeats in {} requests (expiry {}s, agents {}s)",
            purged.deleted, purged.requests, settings.expiry, settings.agent_expiry
        );
        if !expired.is_empty() {
            println!("expired server slots (free for a new server to take): {expired:?}");
        }
    }
    Ok(())
}
