//! `members`: the live servers and agents in the registry, and the cluster
//! record's settings that rule them.

use anyhow::Result;
use serde_json::json;

use super::open_store;
use crate::cli::{ClusterOpts, OutputOpts};
use crate::decision::live_servers;
use crate::registry::{Agents, Member, RegistryView, read_view};

/// The cluster record and settings as `members`, `plan` and `cluster show`
/// print them in JSON.
pub fn cluster_json(view: &RegistryView) -> serde_json::Value {
    let record = view.record();
    json!({
        "cluster_id": record.map(|r| r.cluster_id.clone()),
        "bootstrap_node": record.map(|r| r.bootstrap_node.clone()),
        "created": record.map(|r| r.created.clone()),
        "retired": record.is_some_and(|r| r.retired),
        "record_age_seconds": view.cluster.as_ref().map(|c| c.age_seconds),
        "servers": view.settings.servers,
        "expiry": view.settings.expiry,
        "agent_expiry": view.settings.agent_expiry,
        "from_record": record.is_some(),
    })
}

/// One line on the cluster record and settings, for text output.
pub fn cluster_line(view: &RegistryView) -> String {
    let s = view.settings;
    match view.record() {
        Some(r) => format!(
            "cluster {} (bootstrapped by {}{}): {} servers, expiry {}s, agent expiry {}s",
            r.cluster_id,
            r.bootstrap_node,
            if r.retired { ", RETIRED" } else { "" },
            s.servers,
            s.expiry,
            s.agent_expiry
        ),
        None => format!(
            "no cluster record: {} servers, expiry {}s, agent expiry {}s (this node's flags)",
            s.servers, s.expiry, s.agent_expiry
        ),
    }
}

/// Lists every live server and agent.
pub async fn members(cluster: &ClusterOpts, output: &OutputOpts) -> Result<()> {
    let url = cluster.registry_url()?;
    let opened = open_store(&url).await?;
    let view = read_view(opened.store.as_ref(), cluster.seed(), Agents::All).await?;
    // Servers as the decision counts them: slot holders and heartbeats.
    let servers = live_servers(&view, "", view.settings.expiry);
    // An agent's role may not list snapshots/: that costs only the line.
    let snapshot = match view.record() {
        Some(r) => super::snapshot::newest(opened.store.as_ref(), &r.cluster_id)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!("the snapshots cannot be listed: {e:#}");
                None
            }),
        None => None,
    };
    // A secondary: the primary's live servers too, its WAN peers (a
    // primary learns its secondaries through gossip: `consul members
    // -wan` lists them).
    let wan = wan_members(cluster, &view, &servers).await;
    let now = opened.store.now().await;
    let snapshot_age = snapshot
        .as_ref()
        .map(|(_, at)| crate::model::age_seconds(*at, now));
    if output.json {
        let list = |ms: &[Member]| {
            ms.iter()
                .map(|m| {
                    json!({
                        "node": m.node,
                        "address": m.address.to_string(),
                        "instance_id": m.instance_id,
                        "age_seconds": m.age_seconds,
                    })
                })
                .collect::<Vec<_>>()
        };
        println!(
            "{}",
            json!({
                "cluster": cluster_json(&view),
                "snapshot": snapshot.as_ref().map(|(key, _)| json!({"newest": key, "age_seconds": snapshot_age})),
                "servers": list(&servers),
                "agents": list(&view.agents),
                "wan": wan,
            })
        );
        return Ok(());
    }
    println!("{}", cluster_line(&view));
    for dc in wan.as_array().into_iter().flatten() {
        let servers: Vec<&str> = dc["servers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str())
            .collect();
        println!(
            "WAN datacenter {}{}: {}",
            dc["datacenter"].as_str().unwrap_or("?"),
            if dc["primary"] == json!(true) {
                " (primary)"
            } else {
                ""
            },
            match dc["error"].as_str() {
                Some(e) => format!("cannot be read: {e}"),
                None => format!("{} server(s) {}", servers.len(), servers.join(", ")),
            }
        );
    }
    match (&snapshot, snapshot_age) {
        (Some((key, _)), Some(age)) => println!("newest snapshot: {key} ({age}s ago)"),
        _ if view.record().is_some() => println!("newest snapshot: none"),
        _ => {}
    }
    for (title, ms) in [("servers", &servers), ("agents", &view.agents)] {
        println!("{title} ({}):", ms.len());
        for m in ms {
            println!(
                "  {:<24} {:<40} {:>5}s ago{}",
                m.node,
                m.address,
                m.age_seconds,
                m.instance_id
                    .as_deref()
                    .map(|i| format!("  {i}"))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// A secondary's WAN members by datacenter, from the registries: its own
/// live servers and its primary's (the primary's registry read as its
/// servers' heartbeats read it; an error there is shown, not fatal). Null
/// for a cluster that names no primary.
async fn wan_members(
    cluster: &ClusterOpts,
    view: &RegistryView,
    servers: &[Member],
) -> serde_json::Value {
    let Some(record) = view.record() else {
        return serde_json::Value::Null;
    };
    let Some(primary) = &record.primary else {
        return serde_json::Value::Null;
    };
    let own = json!({
        "datacenter": record.datacenter,
        "primary": false,
        "servers": servers.iter().map(|m| m.address.to_string()).collect::<Vec<_>>(),
    });
    let theirs = match super::federation::from_primary(primary, cluster.seed(), false).await {
        Ok(got) => json!({
            "datacenter": primary.datacenter,
            "primary": true,
            "registry": primary.registry,
            "servers": got.servers.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        }),
        Err(e) => json!({
            "datacenter": primary.datacenter,
            "primary": true,
            "registry": primary.registry,
            "error": format!("{e:#}"),
        }),
    };
    json!([theirs, own])
}
