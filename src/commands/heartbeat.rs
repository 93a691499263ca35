//! `heartbeat`: ask the local agent how it runs, publish that, renew a
//! server's slot, purge.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Result;
use chrono::Utc;
use serde_json::json;

use super::purge::purge_heartbeats;
use super::{open_store, registry_url};
use crate::claims::{Claims, Renewal};
use crate::cli::GlobalOpts;
use crate::install::Root;
use crate::model::{HeartbeatBody, HeartbeatKey, Role, slot_key};
use crate::registry::{Condition, PutOutcome, read_slot};
use crate::{agent, identity, state};

/// `heartbeat`.
pub async fn heartbeat(opts: &GlobalOpts) -> Result<()> {
    let url = registry_url(opts)?;
    let root = Root::new(&opts.root);
    // The agent first: a node whose agent is down publishes nothing.
    let status = agent::status(opts.acl_token_file.as_deref()).await?;
    let mut me = identity::resolve(
        opts.address,
        opts.node.clone(),
        Duration::from_secs(opts.imds_timeout),
    )
    .await?;
    let saved = state::load(&root).filter(|s| s.registry == url.to_string() && s.node == me.node);
    if me.instance_id.is_none() {
        me.instance_id = saved.as_ref().and_then(|s| s.instance_id.clone());
    }
    if status.node_name != me.node {
        tracing::warn!(
            "the local agent calls itself `{}`, this node is `{}`",
            status.node_name,
            me.node
        );
    }
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();

    let mode = if status.server { "server" } else { "agent" };
    let body = serde_json::to_vec(&HeartbeatBody {
        node: me.node.clone(),
        address: me.address,
        instance_id: me.instance_id.clone(),
        mode: mode.into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })?;
    let name = HeartbeatKey {
        time: Utc::now(),
        node: me.node.clone(),
    }
    .name();
    let roles: &[Role] = if status.server {
        &[Role::Servers, Role::Agents]
    } else {
        &[Role::Agents]
    };
    let keys: Vec<String> = roles.iter().map(|r| format!("{}{name}", r.dir())).collect();
    let writes = keys
        .iter()
        .map(|k| store.put(k, body.clone(), Condition::None));
    for (key, outcome) in keys.iter().zip(futures::future::join_all(writes).await) {
        match outcome? {
            PutOutcome::Written(_) => {}
            PutOutcome::Unknown(err) => return Err(err),
            other => anyhow::bail!("writing heartbeat {key}: unexpected {other:?}"),
        }
    }

    let mut slot_report = serde_json::Value::Null;
    let held = saved.as_ref().and_then(|s| s.slot.zip(s.claim_id.clone()));
    if let Some((index, _)) = held.as_ref().filter(|(i, _)| *i >= opts.servers) {
        tracing::warn!(
            "the state file names server slot {index}, beyond --servers {}: not renewing it",
            opts.servers
        );
    }
    if status.server
        && let Some((index, claim)) = held.filter(|(i, _)| *i < opts.servers)
    {
        let slot = read_slot(store, index).await?;
        let claims = Claims {
            store,
            me: &me,
            racy: false,
            cluster_id: saved.as_ref().and_then(|s| s.cluster_id.clone()),
        };
        let renewal = claims.renew(&slot, &claim, opts.expiry).await?;
        if let Renewal::HeldBy(holder) = &renewal {
            tracing::error!(
                "SERVER SLOT LOST: {} is held by {holder}; this node keeps running as a server, \
                 so the cluster may have more servers than wanted: check `consul operator raft list-peers`",
                slot_key(index)
            );
        }
        slot_report = json!({
            "index": index,
            "status": match &renewal { Renewal::Renewed => "renewed", Renewal::Retaken => "retaken", Renewal::HeldBy(_) => "lost" },
            "holder": match &renewal { Renewal::HeldBy(h) => h.clone(), _ => me.node.clone() },
        });
    }

    let keep: HashSet<String> = keys.iter().cloned().collect();
    let purged = purge_heartbeats(store, opts.expiry, Some((&me.node, &keep))).await?;

    if opts.json {
        println!(
            "{}",
            json!({
                "node": me.node,
                "address": me.address.to_string(),
                "mode": mode,
                "keys": keys,
                "slot": slot_report,
                "purged": purged.deleted,
                "delete_requests": purged.requests,
            })
        );
    } else {
        println!(
            "{} ({}) is a {mode}: wrote {}",
            me.node,
            me.address,
            keys.join(", ")
        );
        if let Some(status) = slot_report.get("status").and_then(|s| s.as_str()) {
            println!("server slot {}: {status}", slot_report["index"]);
        }
        println!(
            "purged {} heartbeats in {} requests",
            purged.deleted, purged.requests
        );
    }
    Ok(())
}
