//! `recover`: quorum-loss recovery as Consul's outage guide describes it.
//! When most servers are gone and the survivors have no leader, Consul
//! recovers only from a `raft/peers.json` written by hand on every
//! surviving server while Consul is stopped. `recover` finds the survivors
//! (live in the registry and not reported gone by EC2), with each one's
//! node id (published in its heartbeats), and prints that file and the
//! steps (`--plan`, the default); `--apply` writes it on this node. It
//! stops and starts nothing: that stays the operator's.

use std::collections::HashMap;
use std::net::IpAddr;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use super::{open_store, registry_url, seed_settings};
use crate::cli::GlobalOpts;
use crate::install::{self, FileSpec, Root};
use crate::model::{Role, parse_heartbeat_body};
use crate::registry::{Agents, parse_listing, read_view};
use crate::{decision, ec2, identity, state};

/// Consul's server RPC port, the address Raft knows a server by.
const RAFT_PORT: u16 = 8300;

/// `recover [--plan | --apply]`.
pub async fn recover(opts: &GlobalOpts, apply: bool) -> Result<()> {
    let url = registry_url(opts)?;
    let root = Root::new(&opts.root);
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();
    let view = read_view(store, seed_settings(opts), Agents::Recent(0)).await?;
    let me = identity::of(opts).await?;
    let expiry = view.settings.expiry;

    // The survivors: live servers by the registry, this node too when
    // `run` made it a server; less those EC2 reports not running.
    let mut servers: Vec<(String, IpAddr, Option<String>)> =
        decision::live_servers(&view, &me.node, expiry)
            .into_iter()
            .map(|m| (m.node, m.address, m.instance_id))
            .collect();
    let mine = state::load(&root).filter(|s| s.mode.is_server());
    if mine.is_some() {
        servers.push((me.node.clone(), me.address, me.instance_id.clone()));
    }
    if let Some(aws) = &opened.aws {
        let ids: Vec<String> = servers.iter().filter_map(|s| s.2.clone()).collect();
        let gone = ec2::not_running(aws, &ids).await;
        servers.retain(|s| s.2.as_ref().is_none_or(|id| !gone.contains(id)));
    }
    servers.sort_by(|a, b| a.0.cmp(&b.0));

    // Each one's node id: its newest live `servers/` heartbeat's; this
    // node's from its data dir.
    let mut ids = node_ids(store, &view).await?;
    if mine.is_some()
        && let Ok(id) = std::fs::read_to_string(root.path(&opts.data_dir.join("node-id")))
    {
        ids.insert(me.node.clone(), id.trim().to_string());
    }
    let peers: Vec<Value> = servers
        .iter()
        .filter_map(|(node, address, _)| {
            ids.get(node).map(|id| {
                json!({
                    "id": id,
                    "address": std::net::SocketAddr::new(*address, RAFT_PORT).to_string(),
                    "non_voter": false,
                })
            })
        })
        .collect();
    let unknown: Vec<&str> = servers
        .iter()
        .filter(|(node, _, _)| !ids.contains_key(node))
        .map(|(node, _, _)| node.as_str())
        .collect();
    let path = opts.data_dir.join("raft/peers.json");
    let steps = [
        "1. stop consul on every surviving server: systemctl stop consul".to_string(),
        format!(
            "2. on each of them, write the same {}: auto-consul recover --apply",
            path.display()
        ),
        "3. start consul on every one: systemctl start consul (Consul reads peers.json, recovers its Raft configuration, and deletes the file)".to_string(),
        "4. check: consul operator raft list-peers".to_string(),
    ];
    let contents = format!("{}\n", serde_json::to_string_pretty(&peers)?);

    if apply {
        if servers.is_empty() {
            bail!(
                "no surviving server in the registry {url}: nothing to recover from; \
                 restore a snapshot into a new cluster instead"
            );
        }
        if !unknown.is_empty() {
            bail!(
                "no node id is known for {} (their heartbeats carry none: auto-consul older than this one, \
                 or no node-id in their data dir yet); write peers.json by hand with their node ids \
                 (cat <data-dir>/node-id on each)",
                unknown.join(", ")
            );
        }
        install::write_atomic(
            &root,
            &FileSpec {
                path: path.clone(),
                contents: contents.clone(),
                mode: 0o644,
                owner: root.user("consul"),
            },
        )?;
    }
    if opts.json {
        println!(
            "{}",
            json!({
                "peers": peers,
                "unknown_node_ids": unknown,
                "path": root.path(&path),
                "written": apply,
                "steps": steps,
            })
        );
    } else {
        println!("surviving servers ({}), as raft/peers.json:", servers.len());
        print!("{contents}");
        if !unknown.is_empty() {
            println!("no node id known for: {}", unknown.join(", "));
        }
        if apply {
            println!("wrote: {}", root.path(&path).display());
        }
        for s in &steps {
            println!("{s}");
        }
    }
    Ok(())
}

/// The node id of each server with a live `servers/` heartbeat that
/// carries one (the newest per node).
async fn node_ids(
    store: &dyn crate::registry::Store,
    view: &crate::registry::RegistryView,
) -> Result<HashMap<String, String>> {
    let entries = parse_listing(store.list(Role::Servers.dir(), None).await?);
    let mut newest: HashMap<String, &crate::registry::HeartbeatEntry> = HashMap::new();
    for e in entries
        .iter()
        .filter(|e| e.age_seconds(view.now) < view.settings.expiry)
    {
        let slot = newest.entry(e.parsed.node.clone()).or_insert(e);
        if (e.last_modified, e.parsed.time) > (slot.last_modified, slot.parsed.time) {
            *slot = e;
        }
    }
    let mut out = HashMap::new();
    for (node, e) in newest {
        let Some(obj) = store.get(&e.key).await? else {
            continue;
        };
        match parse_heartbeat_body(&node, &obj.body) {
            Ok(info) => {
                if let Some(id) = info.node_id {
                    out.insert(node, id);
                }
            }
            Err(why) => tracing::warn!("skipping registry key {}: {why}", e.key),
        }
    }
    Ok(out)
}
