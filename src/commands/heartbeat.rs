//! `heartbeat`: ask the local agent how it runs, publish that, renew a
//! server's slot, purge.

use std::collections::HashSet;

use anyhow::Result;
use chrono::Utc;
use serde_json::json;

use super::purge::purge_heartbeats;
use super::{open_store, registry_url, seed_settings};
use crate::claims::{Claims, Renewal};
use crate::cli::GlobalOpts;
use crate::install::Root;
use crate::model::{HeartbeatBody, HeartbeatKey, Role, slot_key};
use crate::registry::{Condition, PutOutcome, read_cluster, read_slot};
use crate::{agent, identity, state};

/// `heartbeat`.
pub async fn heartbeat(opts: &GlobalOpts) -> Result<()> {
    let url = registry_url(opts)?;
    let root = Root::new(&opts.root);
    // The agent first: a node whose agent is down publishes nothing.
    let status = agent::status(opts.acl_token_file.as_deref()).await?;
    let mut me = identity::of(opts).await?;
    let saved = state::load_for(&root, &url.to_string(), &me);
    if me.instance_id.is_none() {
        me.instance_id = saved.as_ref().and_then(|s| s.instance_id.clone());
    }
    if let Some(name) = status.node_name.as_ref().filter(|n| **n != me.node) {
        tracing::warn!(
            "the local agent calls itself `{name}`, this node is `{}`",
            me.node
        );
    }
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();

    let decided_server = saved.as_ref().is_some_and(|s| s.mode.is_server());
    let server = status.is_server(me.address, decided_server);
    let mode = if server { "server" } else { "agent" };
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
    let roles: &[Role] = if server {
        &[Role::Servers, Role::Agents]
    } else {
        &[Role::Agents]
    };
    let keys: Vec<String> = roles.iter().map(|r| format!("{}{name}", r.dir())).collect();
    let writes = keys
        .iter()
        .map(|k| store.put(k, body.clone(), Condition::None));
    // The cluster record (its settings rule) is read alongside.
    let (outcomes, record) = tokio::join!(futures::future::join_all(writes), read_cluster(store));
    let settings = match record? {
        Some((record, _)) => record.settings(seed_settings(opts)),
        None => seed_settings(opts),
    };
    for (key, outcome) in keys.iter().zip(outcomes) {
        match outcome? {
            PutOutcome::Written(_) => {}
            PutOutcome::Unknown(err) => return Err(err),
            other => anyhow::bail!("writing heartbeat {key}: unexpected {other:?}"),
        }
    }

    let mut slot_report = serde_json::Value::Null;
    let held = saved.as_ref().and_then(|s| s.slot.zip(s.claim_id.clone()));
    if let Some((index, _)) = held.as_ref().filter(|(i, _)| *i >= settings.servers) {
        tracing::warn!(
            "the state file names server slot {index}, beyond the cluster's {} servers: not renewing it",
            settings.servers
        );
    }
    if server && let Some((index, claim)) = held.filter(|(i, _)| *i < settings.servers) {
        let slot = read_slot(store, index).await?;
        let claims = Claims {
            store,
            me: &me,
            racy: false,
            cluster_id: saved.as_ref().and_then(|s| s.cluster_id.clone()),
        };
        let renewal = claims.renew(&slot, &claim, settings.expiry).await?;
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
    let purged = purge_heartbeats(store, settings.expiry, Some((&me.node, &keep))).await?;

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
                "agent_self": status.server.is_some(),
                "leader": status.leader,
                "settings": settings,
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
