//! `status`: whether this node is healthy, for a person and for a
//! monitoring check (exit 0 healthy, 1 degraded, each reason named).
//!
//! It reads what `run` and `heartbeat` left on the node (the state file,
//! the time of the last heartbeat written), the cluster record and this
//! node's slot (two GETs; never a listing, so a fleet's checks cost no
//! more than that), the local agent, and the heartbeat timer.

use anyhow::Result;

use serde_json::{Value, json};

use super::{open_store, registry_url, seed_settings};
use crate::cli::GlobalOpts;
use crate::install::Root;
use crate::registry::{read_cluster, read_slot};
use crate::{agent, state};

/// The heartbeat timer's state, where systemd runs (`None` elsewhere).
fn timer_state(root: &Root) -> Option<String> {
    if !root.is_system() {
        return None;
    }
    let out = std::process::Command::new("systemctl")
        .args(["is-active", "auto-consul-heartbeat.timer"])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
}

/// `status`.
pub async fn status(opts: &GlobalOpts) -> Result<()> {
    let root = Root::new(&opts.root);
    let mut degraded: Vec<String> = Vec::new();
    let saved = state::load(&root);
    if saved.is_none() {
        degraded.push("this node has no state: `auto-consul run` never set it up".into());
    }

    // The registry: the record and this node's slot.
    let mut cluster = Value::Null;
    let mut slot = Value::Null;
    let mut heartbeat_age = None;
    let mut settings = seed_settings(opts);
    match registry_url(opts) {
        Err(e) => degraded.push(format!("{e:#}")),
        Ok(url) => match open_store(&url).await {
            Err(e) => degraded.push(format!("the registry {url} cannot be opened: {e:#}")),
            Ok(opened) => {
                let store = opened.store.as_ref();
                match read_cluster(store).await {
                    Err(e) => degraded.push(format!("the registry {url} cannot be read: {e:#}")),
                    Ok(None) => degraded.push(format!("the registry {url} has no cluster record")),
                    Ok(Some((record, _))) => {
                        settings = record.settings(seed_settings(opts));
                        if record.retired {
                            degraded.push(format!("cluster {} is retired", record.cluster_id));
                        }
                        // A server's Raft data is its cluster's; an agent
                        // follows the servers it finds (and decides again
                        // at its next boot).
                        if let Some(mine) = saved
                            .as_ref()
                            .filter(|s| s.mode.is_server())
                            .and_then(|s| s.cluster_id.as_deref())
                            && mine != record.cluster_id
                        {
                            degraded.push(format!(
                                "this node joined cluster {mine}, the registry now holds {}",
                                record.cluster_id
                            ));
                        }
                        cluster = json!({
                            "cluster_id": record.cluster_id,
                            "bootstrap_node": record.bootstrap_node,
                            "servers": settings.servers,
                            "expiry": settings.expiry,
                            "agent_expiry": settings.agent_expiry,
                            "retired": record.retired,
                        });
                    }
                }
                if let Some((s, index)) = saved.as_ref().and_then(|s| s.slot.map(|i| (s, i))) {
                    match read_slot(store, index).await {
                        Err(e) => {
                            degraded.push(format!("server slot {index} cannot be read: {e:#}"))
                        }
                        Ok(view) => {
                            let holder = view.record.as_ref();
                            let mine = holder
                                .is_some_and(|h| h.held_by(&s.node, s.instance_id.as_deref()));
                            if !mine {
                                degraded.push(format!(
                                    "server slot {index} is held by {}, not this node",
                                    holder.map_or("nobody", |h| h.node.as_str())
                                ));
                            } else if view.age_seconds > settings.expiry {
                                degraded.push(format!(
                                    "server slot {index} was last renewed {}s ago, past the expiry ({}s)",
                                    view.age_seconds, settings.expiry
                                ));
                            }
                            slot = json!({
                                "index": index,
                                "holder": holder.map(|h| h.node.clone()),
                                "held": mine,
                                "age_seconds": view.age_seconds,
                            });
                        }
                    }
                }
                let now = store.now().await;
                heartbeat_age = state::recorded_time(&root, state::HEARTBEAT_AT)
                    .map(|t| (now - t).num_seconds().max(0));
            }
        },
    }
    let server = saved.as_ref().is_some_and(|s| s.mode.is_server());
    let expiry = if server {
        settings.expiry
    } else {
        settings.agent_expiry
    };
    match heartbeat_age {
        None => degraded.push("no heartbeat has been written from this node".into()),
        Some(age) if age as u64 > expiry => degraded.push(format!(
            "the last heartbeat was written {age}s ago, past the expiry ({expiry}s): is auto-consul-heartbeat.timer running?"
        )),
        Some(_) => {}
    }

    // The local agent.
    let agent = match agent::status(opts.acl_token_file.as_deref()).await {
        Ok(a) => {
            if a.leader.is_none() {
                degraded.push("the local Consul agent knows no leader".into());
            }
            // The agent's own word (when the token allows) against the mode
            // `run` decided: another config file can make a server a client.
            if let (Some(s), Some(is_server)) = (saved.as_ref(), a.server)
                && s.mode.is_server() != is_server
            {
                degraded.push(format!(
                    "`run` decided {}, but the local Consul agent runs as {}: check the other files of the config dir (`auto-consul plan` names them)",
                    s.mode.as_str(),
                    if is_server { "a server" } else { "a client" }
                ));
            }
            json!({ "answering": true, "leader": a.leader, "server_peers": a.peers.len() })
        }
        Err(e) => {
            degraded.push(format!("{e:#}"));
            json!({ "answering": false })
        }
    };
    let timer = timer_state(&root);
    if let Some(t) = timer.as_deref().filter(|t| *t != "active") {
        degraded.push(format!("auto-consul-heartbeat.timer is {t}"));
    }

    let healthy = degraded.is_empty();
    if opts.json {
        println!(
            "{}",
            json!({
                "healthy": healthy,
                "reasons": degraded,
                "node": saved.as_ref().map(|s| s.node.clone()),
                "address": saved.as_ref().map(|s| s.address.to_string()),
                "role": opts.role.as_str(),
                "mode": saved.as_ref().map(|s| s.mode.as_str()),
                "cluster_id": saved.as_ref().and_then(|s| s.cluster_id.clone()),
                "claim_id": saved.as_ref().and_then(|s| s.claim_id.clone()),
                "slot": slot,
                "cluster": cluster,
                "agent": agent,
                "heartbeat_age_seconds": heartbeat_age,
                "timer": timer,
            })
        );
    } else {
        match &saved {
            Some(s) => println!(
                "node {} ({}): {}{}, role {}",
                s.node,
                s.address,
                s.mode.as_str(),
                s.slot
                    .map(|i| format!(" in server slot {i}"))
                    .unwrap_or_default(),
                opts.role.as_str()
            ),
            None => println!("node: not set up"),
        }
        if let Some(id) = cluster["cluster_id"].as_str() {
            println!(
                "cluster {id} (bootstrapped by {}): {} servers, expiry {}s, agent expiry {}s",
                cluster["bootstrap_node"].as_str().unwrap_or("?"),
                cluster["servers"],
                cluster["expiry"],
                cluster["agent_expiry"]
            );
        }
        if let Some(age) = slot["age_seconds"].as_u64() {
            println!(
                "slot holder: {} (renewed {age}s ago)",
                slot["holder"].as_str().unwrap_or("nobody")
            );
        }
        println!(
            "consul agent: {}",
            if agent["answering"] == json!(true) {
                format!(
                    "answering, leader {}, {} server peers",
                    agent["leader"].as_str().unwrap_or("none"),
                    agent["server_peers"]
                )
            } else {
                "not answering".into()
            }
        );
        match heartbeat_age {
            Some(age) => println!("last heartbeat: {age}s ago"),
            None => println!("last heartbeat: none"),
        }
        if let Some(t) = &timer {
            println!("heartbeat timer: {t}");
        }
        if healthy {
            println!("healthy");
        } else {
            println!("DEGRADED: {}", degraded.join("; "));
        }
    }
    if healthy {
        Ok(())
    } else {
        Err(crate::error::Degraded.into())
    }
}
