//! `leave`: remove this node from the registry at shutdown: its heartbeats
//! deleted, its server slot released so a replacement can take it at once.

use anyhow::Result;
use serde_json::json;

use super::{open_store, registry_url, seed_settings};
use crate::claims::Claims;
use crate::cli::GlobalOpts;
use crate::install::Root;
use crate::registry::{list_heartbeats, read_cluster, read_slots};
use crate::{identity, state};

/// `leave`.
pub async fn leave(opts: &GlobalOpts) -> Result<()> {
    let url = registry_url(opts)?;
    let root = Root::new(&opts.root);
    let me = identity::of(opts).await?;
    let saved = state::load_for(&root, &url.to_string(), &me);
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();

    let (entries, record) = tokio::try_join!(list_heartbeats(store), read_cluster(store))?;
    let settings = record.map_or(seed_settings(opts), |(r, _)| {
        r.settings(seed_settings(opts))
    });
    let slots = read_slots(store, settings.servers).await?;
    let mine: Vec<String> = entries
        .into_iter()
        .filter(|e| e.parsed.node == me.node)
        .map(|e| e.key)
        .collect();
    let requests = if mine.is_empty() {
        0
    } else {
        store.delete(&mine).await?
    };

    // Our slot is the one our claim id is in; without a state file, the one
    // that names this node.
    let claim = saved.as_ref().and_then(|s| s.claim_id.as_deref());
    let claims = Claims {
        store,
        me: &me,
        racy: false,
        cluster_id: None,
    };
    let mut released = Vec::new();
    for slot in &slots {
        if claims.release(slot, claim).await? {
            released.push(slot.index);
        }
    }
    if opts.json {
        println!(
            "{}",
            json!({ "node": me.node, "deleted": mine, "delete_requests": requests, "slots_released": released })
        );
    } else {
        println!(
            "{}: deleted {} heartbeats, released slots {released:?}",
            me.node,
            mine.len()
        );
    }
    Ok(())
}
