//! `cluster show|set|retire`: the cluster record, which rules the settings
//! of every node (DESIGN.md, Day-2 rules), read and changed under
//! `If-Match` so that no concurrent change is lost.

use anyhow::{Result, bail};
use serde_json::json;

use super::members::{cluster_json, cluster_line};
use super::open_store;
use crate::claims::put_settled;
use crate::cli::{ClusterAction, ClusterOpts, OutputOpts};
use crate::decision::live_servers;
use crate::error::usage;
use crate::model::{CLUSTER_KEY, ClusterRecord};
use crate::registry::{Agents, Condition, Store, read_cluster, read_view};
use crate::retry::Backoff;

/// Attempts at a change that meets concurrent changes.
const MAX_ATTEMPTS: u32 = 5;

/// `cluster ...`.
pub async fn cluster(
    cluster: &ClusterOpts,
    output: &OutputOpts,
    action: &ClusterAction,
) -> Result<()> {
    let url = cluster.registry_url()?;
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();
    match action {
        ClusterAction::Show => show(cluster, output, store).await,
        ClusterAction::Set => {
            if cluster.servers.is_none()
                && cluster.expiry.is_none()
                && cluster.agent_expiry.is_none()
            {
                return Err(usage(
                    "`cluster set` changes nothing without --servers N, --expiry SECONDS or --agent-expiry SECONDS",
                ));
            }
            let changed = change(store, &url.to_string(), |r| {
                if let Some(s) = cluster.servers {
                    r.servers = s;
                }
                if let Some(e) = cluster.expiry {
                    r.expiry = Some(e);
                }
                if let Some(e) = cluster.agent_expiry {
                    r.agent_expiry = Some(e);
                }
                Ok(())
            })
            .await?;
            report(output, &changed, "set");
            Ok(())
        }
        ClusterAction::Retire { cluster_id, force } => {
            let view = read_view(store, cluster.seed(), Agents::Recent(0)).await?;
            let live = live_servers(&view, "", view.settings.expiry);
            if !live.is_empty() && !force {
                return Err(usage(format!(
                    "cluster {cluster_id} has {} live servers in the registry ({}): retired, a later outage would let \
                     a new cluster start beside them; stop them first, or pass --force if they are going away",
                    live.len(),
                    live.iter()
                        .map(|m| m.node.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let changed = change(store, &url.to_string(), |r| {
                if r.cluster_id != *cluster_id {
                    return Err(usage(format!(
                        "the registry's cluster is {}, not {cluster_id}: nothing retired; check `auto-consul cluster show`",
                        r.cluster_id
                    )));
                }
                r.retired = true;
                Ok(())
            })
            .await?;
            report(output, &changed, "retired");
            if !output.json {
                println!(
                    "once none of its servers is live, the next node to boot starts a NEW, EMPTY cluster in its place"
                );
            }
            Ok(())
        }
    }
}

async fn show(cluster: &ClusterOpts, output: &OutputOpts, store: &dyn Store) -> Result<()> {
    let view = read_view(store, cluster.seed(), Agents::Recent(0)).await?;
    let slots: Vec<_> = view
        .slots
        .iter()
        .map(|s| {
            json!({
                "index": s.index,
                "node": s.record.as_ref().map(|r| r.node.clone()),
                "instance_id": s.record.as_ref().and_then(|r| r.instance_id.clone()),
                "cluster_id": s.record.as_ref().and_then(|r| r.cluster_id.clone()),
                "released": s.record.as_ref().is_some_and(|r| r.released),
                "age_seconds": s.etag.as_ref().map(|_| s.age_seconds),
            })
        })
        .collect();
    if output.json {
        println!(
            "{}",
            json!({ "cluster": cluster_json(&view), "slots": slots })
        );
        return Ok(());
    }
    println!("{}", cluster_line(&view));
    for s in &view.slots {
        match &s.record {
            Some(r) => println!(
                "  slot {}: {} {}{}, written {}s ago{}",
                s.index,
                r.node,
                r.address,
                r.instance_id
                    .as_deref()
                    .map(|i| format!(" ({i})"))
                    .unwrap_or_default(),
                s.age_seconds,
                if r.released { ", released" } else { "" }
            ),
            None => println!("  slot {}: free", s.index),
        }
    }
    Ok(())
}

/// Reads the record, applies `edit`, writes it back under `If-Match`;
/// again from the read when another change came first.
async fn change(
    store: &dyn Store,
    registry: &str,
    edit: impl Fn(&mut ClusterRecord) -> Result<()>,
) -> Result<ClusterRecord> {
    let mut backoff = Backoff::CONTENTION;
    for _ in 0..MAX_ATTEMPTS {
        let Some((mut record, etag)) = read_cluster(store).await? else {
            return Err(usage(format!(
                "the registry {registry} has no readable cluster record: nothing to change; \
                 the first node to boot writes one from its --servers and --expiry"
            )));
        };
        let before = record.clone();
        edit(&mut record)?;
        if record == before {
            return Ok(record);
        }
        let body = serde_json::to_vec(&record)?;
        // Not ours (someone changed the record first): read and edit again.
        if put_settled(store, CLUSTER_KEY, body, Condition::Matches(etag))
            .await?
            .is_some()
        {
            return Ok(record);
        }
        tokio::time::sleep(backoff.delay()).await;
    }
    bail!(
        "the cluster record of {registry} changed under every one of {MAX_ATTEMPTS} attempts; run again"
    )
}

fn report(output: &OutputOpts, record: &ClusterRecord, what: &str) {
    if output.json {
        println!(
            "{}",
            json!({
                "cluster_id": record.cluster_id,
                "servers": record.servers,
                "expiry": record.expiry,
                "agent_expiry": record.agent_expiry,
                "retired": record.retired,
                "restore": record.restore,
            })
        );
    } else {
        println!(
            "cluster {} {what}: {} servers, expiry {}{}",
            record.cluster_id,
            record.servers,
            record.expiry.map_or_else(
                || "from each node's --expiry".to_string(),
                |e| format!("{e}s")
            ),
            if record.retired { ", retired" } else { "" }
        );
        if let Some(plan) = &record.restore {
            println!(
                "restore of cluster {}'s snapshot: {}{}",
                plan.from,
                plan.state.as_str(),
                plan.key
                    .as_deref()
                    .map(|k| format!(" ({k})"))
                    .unwrap_or_default()
            );
        }
    }
}
