//! `recover`: quorum-loss recovery as Consul's outage guide describes it.
//! When most servers are gone and the survivors have no leader, Consul
//! recovers only from a `raft/peers.json` written on every surviving server
//! while Consul is stopped, the same file on each. Step 1 of that procedure
//! stops Consul, and a stopped server publishes no heartbeat: recomputed on
//! each survivor minutes apart, the list would shrink to the node itself,
//! and each would elect itself leader of its own one-node cluster. So the
//! plan is computed once and pinned in the registry
//! (`recovery/<cluster id>.json`: the survivors, the file and its SHA-256);
//! `--apply HASH` writes exactly that file on each survivor. It stops and
//! starts nothing: that stays the operator's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::open_store;
use crate::cli::{ConsulOpts, GlobalOpts, OutputOpts};
use crate::install::{self, FileSpec, Root};
use crate::model::{Role, parse_heartbeat_body};
use crate::registry::{Agents, Condition, Store, parse_listing, read_view};
use crate::{ec2, identity, state};

/// Consul's server RPC port when the config names none (`ports.server`,
/// agent/config/default.go: consul.DefaultRPCPort).
const DEFAULT_RPC_PORT: u16 = 8300;

/// What `recover` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Print what a plan would be, and the pinned one; write nothing.
    Show,
    /// Compute the plan and pin it in the registry.
    Pin,
    /// Write the pinned plan's file here (only if it is still HASH).
    Apply(Option<String>),
}

/// A survivor, as the plan names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Survivor {
    node: String,
    address: IpAddr,
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default)]
    node_id: Option<String>,
}

/// The pinned recovery plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Plan {
    cluster: String,
    made_by: String,
    made_at: String,
    port: u16,
    survivors: Vec<Survivor>,
    peers_json: String,
    sha256: String,
}

impl Plan {
    fn unknown(&self) -> Vec<&str> {
        self.survivors
            .iter()
            .filter(|s| s.node_id.is_none())
            .map(|s| s.node.as_str())
            .collect()
    }
}

fn plan_key(cluster: &str) -> String {
    format!("recovery/{cluster}.json")
}

fn sha256_hex(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `recover [--plan | --apply [HASH]]`.
pub async fn recover(opts: &GlobalOpts, step: Step) -> Result<()> {
    let url = opts.cluster.registry_url()?;
    let root = Root::new(&opts.consul.root);
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();
    let view = read_view(store, opts.cluster.seed(), Agents::Recent(0)).await?;
    let Some(cluster) = view.record().map(|r| r.cluster_id.clone()) else {
        bail!("the registry {url} has no cluster record: no cluster to recover");
    };
    let me = identity::of(&opts.identity).await?;
    let pinned = pinned_plan(store, &cluster).await?;
    let path = opts.consul.data_dir.join("raft/peers.json");

    if let Step::Apply(hash) = &step {
        let Some(plan) = pinned else {
            bail!(
                "no recovery plan is pinned for cluster {cluster} in {url}: run \
                 `auto-consul recover --plan` on one surviving server first"
            );
        };
        check_applicable(
            &plan,
            hash.as_deref(),
            &me.node,
            &node_id_here(&root, &opts.consul),
        )?;
        install::write_atomic(
            &root,
            &FileSpec {
                path: path.clone(),
                contents: plan.peers_json.clone(),
                mode: 0o644,
                owner: root.user("consul"),
            },
        )?;
        return report(&opts.output, &plan, &root.path(&path), true, None);
    }

    // The survivors: the holders of this cluster's slots (at any age: a
    // stopped Consul renews nothing) and this node when it serves the
    // cluster, less those EC2 reports not running.
    let mut survivors: Vec<Survivor> = Vec::new();
    for slot in &view.slots {
        if let Some(r) = &slot.record
            && !r.released
            && r.cluster_id.as_deref() == Some(cluster.as_str())
            && !survivors.iter().any(|s| s.node == r.node)
        {
            survivors.push(Survivor {
                node: r.node.clone(),
                address: r.address,
                instance_id: r.instance_id.clone(),
                node_id: None,
            });
        }
    }
    let mine = state::load(&root)
        .filter(|s| s.mode.is_server() && s.cluster_id.as_deref() == Some(cluster.as_str()));
    if mine.is_some() && !survivors.iter().any(|s| s.node == me.node) {
        survivors.push(Survivor {
            node: me.node.clone(),
            address: me.address,
            instance_id: me.instance_id.clone(),
            node_id: None,
        });
    }
    if let Some(aws) = &opened.aws {
        let ids: Vec<String> = survivors
            .iter()
            .filter_map(|s| s.instance_id.clone())
            .collect();
        let gone = ec2::not_running(aws, &ids).await;
        survivors.retain(|s| s.instance_id.as_ref().is_none_or(|id| !gone.contains(id)));
    }
    survivors.sort_by(|a, b| a.node.cmp(&b.node));
    // Each one's node id: its newest `servers/` heartbeat's, at any age;
    // this node's from its data dir.
    let ids = node_ids(store).await?;
    for s in &mut survivors {
        s.node_id = ids.get(&s.node).cloned();
        if s.node == me.node && mine.is_some() {
            s.node_id = node_id_here(&root, &opts.consul).or(s.node_id.take());
        }
    }
    let port = rpc_port(&root, &opts.consul);
    let peers: Vec<Value> = survivors
        .iter()
        .filter_map(|s| {
            s.node_id.as_ref().map(|id| {
                json!({
                    "id": id,
                    "address": std::net::SocketAddr::new(s.address, port).to_string(),
                    "non_voter": false,
                })
            })
        })
        .collect();
    let peers_json = format!("{}\n", serde_json::to_string_pretty(&peers)?);
    let plan = Plan {
        cluster: cluster.clone(),
        made_by: me.node.clone(),
        made_at: view.now.to_rfc3339(),
        port,
        sha256: sha256_hex(&peers_json),
        survivors,
        peers_json,
    };
    if step == Step::Pin {
        if plan.survivors.is_empty() {
            bail!(
                "no surviving server of cluster {cluster} in {url}: nothing to recover from; \
                 restore a snapshot into a new cluster instead"
            );
        }
        if let Some(old) = pinned.as_ref().filter(|p| p.sha256 != plan.sha256) {
            tracing::warn!(
                "replacing the pinned plan {} (made by {} at {}): a survivor that applied it must \
                 apply the new one before Consul starts",
                old.sha256,
                old.made_by,
                old.made_at
            );
        }
        store
            .put(
                &plan_key(&cluster),
                serde_json::to_vec_pretty(&plan)?,
                Condition::None,
            )
            .await
            .with_context(|| format!("pinning the recovery plan at {}", plan_key(&cluster)))?;
        return report(&opts.output, &plan, &root.path(&path), false, None);
    }
    report(
        &opts.output,
        &plan,
        &root.path(&path),
        false,
        Some(pinned.as_ref()),
    )
}

/// The plan pinned for `cluster`, when there is one; a damaged one (its
/// file does not match its hash, or it is not a plan) is refused.
async fn pinned_plan(store: &dyn Store, cluster: &str) -> Result<Option<Plan>> {
    let key = plan_key(cluster);
    let Some(obj) = store.get(&key).await? else {
        return Ok(None);
    };
    let plan: Plan = serde_json::from_slice(&obj.body).map_err(|e| {
        anyhow::anyhow!(
            "the recovery plan at {key} is not one ({e}): pin it again with `auto-consul recover --plan`"
        )
    })?;
    if plan.cluster != cluster || sha256_hex(&plan.peers_json) != plan.sha256 {
        bail!(
            "the recovery plan at {key} is damaged (its peers.json does not match its SHA-256, or \
             it names another cluster): pin it again with `auto-consul recover --plan`"
        );
    }
    Ok(Some(plan))
}

/// Whether this node may write `plan`'s file: the plan is still `hash`
/// (when given), every survivor's node id is known, and this node is one
/// of them (by name, or by the node id of its data dir).
fn check_applicable(
    plan: &Plan,
    hash: Option<&str>,
    node: &str,
    node_id: &Option<String>,
) -> Result<()> {
    if let Some(hash) = hash
        && hash != plan.sha256
    {
        bail!(
            "the pinned recovery plan is {} (made by {} at {}), not {hash}: it was made again; \
             check it with `auto-consul recover` and apply its hash on every survivor",
            plan.sha256,
            plan.made_by,
            plan.made_at
        );
    }
    let unknown = plan.unknown();
    if !unknown.is_empty() {
        bail!(
            "the pinned plan knows no node id for {} (their heartbeats carry none: auto-consul \
             older than this one, or no node-id in their data dir yet); write peers.json by hand \
             with their node ids (cat <data-dir>/node-id on each)",
            unknown.join(", ")
        );
    }
    let mine = plan
        .survivors
        .iter()
        .any(|s| s.node == node || (node_id.is_some() && &s.node_id == node_id));
    if !mine {
        bail!(
            "this node ({node}) is not among the pinned plan's survivors ({}): write nothing \
             here, and do not start Consul on it with this cluster's data",
            plan.survivors
                .iter()
                .map(|s| s.node.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// This node's Consul node id, from its data dir.
fn node_id_here(root: &Root, consul: &ConsulOpts) -> Option<String> {
    std::fs::read_to_string(root.path(&consul.data_dir.join("node-id")))
        .ok()
        .map(|id| id.trim().to_string())
        .filter(|id| !id.is_empty())
}

/// The server RPC port of this node's Consul configuration (`ports.server`
/// in the files of the config dir, the last one read winning as in Consul:
/// files in lexical order), or Consul's default.
pub(super) fn rpc_port(root: &Root, consul: &ConsulOpts) -> u16 {
    let dir = root.path(&consul.config_dir);
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
        .iter()
        .filter_map(|f| port_in(f))
        .next_back()
        .unwrap_or(DEFAULT_RPC_PORT)
}

fn port_in(file: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(file).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v.get("ports")?
        .get("server")?
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
}

/// Prints the plan, the steps and what was done.
fn report(
    output: &OutputOpts,
    plan: &Plan,
    path: &Path,
    written: bool,
    pinned: Option<Option<&Plan>>,
) -> Result<()> {
    let pinned_now = match pinned {
        // `recover` alone: the pinned plan, if any.
        Some(p) => p.map(|p| p.sha256.clone()),
        // --plan pinned this one; --apply wrote it.
        None => Some(plan.sha256.clone()),
    };
    let steps = [
        format!(
            "1. pin the plan once, on one surviving server: auto-consul recover --plan{}",
            if pinned.is_none() { " (done)" } else { "" }
        ),
        "2. stop consul on every surviving server: systemctl stop consul".to_string(),
        format!(
            "3. on each of them, write the pinned file: auto-consul recover --apply {}",
            pinned_now.as_deref().unwrap_or("<hash printed by --plan>")
        ),
        "4. start consul on every one: systemctl start consul (Consul reads peers.json, recovers its Raft configuration, and deletes the file)".to_string(),
        "5. check: consul operator raft list-peers".to_string(),
    ];
    let unknown = plan.unknown();
    if output.json {
        println!(
            "{}",
            json!({
                "cluster": plan.cluster,
                "survivors": plan.survivors,
                "peers": serde_json::from_str::<Value>(&plan.peers_json)?,
                "sha256": plan.sha256,
                "pinned": pinned_now,
                "unknown_node_ids": unknown,
                "path": path,
                "written": written,
                "steps": steps,
            })
        );
        return Ok(());
    }
    println!(
        "surviving servers of cluster {} ({}), as raft/peers.json (sha256 {}):",
        plan.cluster,
        plan.survivors.len(),
        plan.sha256
    );
    print!("{}", plan.peers_json);
    if !unknown.is_empty() {
        println!("no node id known for: {}", unknown.join(", "));
    }
    match (pinned, &pinned_now) {
        (Some(_), Some(h)) if *h == plan.sha256 => println!("pinned: this plan ({h})"),
        (Some(_), Some(h)) => println!(
            "pinned: another plan ({h}); `auto-consul recover --plan` pins this one instead"
        ),
        (Some(_), None) => println!("pinned: none yet"),
        (None, _) if written => println!("wrote: {}", path.display()),
        (None, _) => println!("pinned in the registry as {}", plan_key(&plan.cluster)),
    }
    for s in &steps {
        println!("{s}");
    }
    Ok(())
}

/// The node id of each server whose `servers/` heartbeats carry one (the
/// newest per node, at any age: a stopped server publishes nothing new).
async fn node_ids(store: &dyn Store) -> Result<HashMap<String, String>> {
    let entries = parse_listing(store.list(Role::Servers.dir(), None).await?);
    let mut newest: HashMap<String, &crate::registry::HeartbeatEntry> = HashMap::new();
    for e in &entries {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        let peers = "[]\n".to_string();
        Plan {
            cluster: "c1".into(),
            made_by: "a".into(),
            made_at: "2026-12-07T00:00:00Z".into(),
            port: 8300,
            survivors: vec![Survivor {
                node: "a".into(),
                address: "10.0.0.1".parse().unwrap(),
                instance_id: None,
                node_id: Some("id-a".into()),
            }],
            sha256: sha256_hex(&peers),
            peers_json: peers,
        }
    }

    #[test]
    fn a_plan_applies_only_as_pinned_only_on_its_survivors() {
        let p = plan();
        assert!(check_applicable(&p, Some(&p.sha256), "a", &None).is_ok());
        assert!(check_applicable(&p, None, "a", &None).is_ok());
        // Renamed, same data dir: its node id says it is the survivor.
        assert!(check_applicable(&p, None, "a2", &Some("id-a".into())).is_ok());
        let changed = check_applicable(&p, Some("00ff"), "a", &None).unwrap_err();
        assert!(format!("{changed}").contains("it was made again"));
        let other = check_applicable(&p, None, "b", &Some("id-b".into())).unwrap_err();
        assert!(format!("{other}").contains("not among the pinned plan's survivors (a)"));
        let mut unknown = p.clone();
        unknown.survivors[0].node_id = None;
        assert!(check_applicable(&unknown, None, "a", &None).is_err());
    }
}
