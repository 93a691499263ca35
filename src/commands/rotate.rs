//! Rotating the gossip key without an outage: `secrets rotate gossip-key`
//! makes the next generation (create-only: `<cluster>/agent/gossip-key.<n>`;
//! nothing is overwritten) and says in the cluster record that a rotation
//! is under way; the leader's heartbeat then takes it through Consul's
//! three keyring steps (agent/keyring.go; `consul keyring -install`,
//! `-use`, `-remove`), each recorded under `If-Match` once every live
//! member has done it:
//!
//! 1. `install`: the new key in every member's keyring;
//! 2. `use`: the new key every member's primary (the generation in use
//!    moves on);
//! 3. `remove`: the old key out of every keyring; then the rotation ends.
//!
//! Each step is idempotent, so a heartbeat stopped anywhere is finished by
//! the next. A node that boots mid-rotation writes both keys in its keyring
//! (`run`), so it reads every member whichever key they send with.

use anyhow::{Result, bail};
use reqwest::Method;
use serde_json::{Value, json};

use crate::agent::{self, KeyringPool};
use crate::claims::put_settled;
use crate::model::{
    CLUSTER_KEY, ClusterRecord, Generation, RotationStep, TokenGeneration, TokenStep,
};
use crate::registry::{Condition, Store};
use crate::secrets::{self, Secret, SecretStore};

/// `secrets rotate gossip-key`: starts a rotation (or says where the one
/// under way stands).
pub async fn start_gossip_key(
    store: &dyn Store,
    secrets_store: &dyn SecretStore,
    mut record: ClusterRecord,
    etag: String,
) -> Result<Value> {
    let cluster = record.cluster_id.clone();
    let cur = record.gossip_key.unwrap_or_default();
    if let Some(step) = cur.rotation {
        return Ok(json!({
            "started": false,
            "generation": cur.generation,
            "next": cur.generation + 1,
            "step": step.as_str(),
        }));
    }
    let next = cur.generation + 1;
    let name = secrets::generation_name(&cluster, Secret::GossipKey, next);
    // Create-only: a start stopped after this point finds it and goes on.
    if secrets_store
        .create(&name, &secrets::new_gossip_key())
        .await?
    {
        tracing::info!("made {}", secrets_store.shown(&name));
    } else {
        let made = secrets_store.get(&name).await?.unwrap_or_default();
        if let Err(why) = secrets::check_gossip_key(made.trim()) {
            bail!(
                "{} exists but {why}: delete it and run `auto-consul secrets rotate gossip-key` again",
                secrets_store.shown(&name)
            );
        }
    }
    record.gossip_key = Some(Generation {
        generation: cur.generation,
        rotation: Some(RotationStep::Install),
    });
    write(store, &record, etag).await?;
    Ok(json!({
        "started": true,
        "generation": cur.generation,
        "next": next,
        "step": RotationStep::Install.as_str(),
        "secret": secrets_store.shown(&name),
    }))
}

/// One pass of the leader's heartbeat over a rotation under way: every
/// step the members allow, each recorded before the next. What it did,
/// for the heartbeat's output.
pub async fn drive_gossip_key(
    store: &dyn Store,
    secrets_store: &dyn SecretStore,
    token: Option<&str>,
    mut record: ClusterRecord,
    mut etag: String,
) -> Result<Value> {
    let cluster = record.cluster_id.clone();
    let key = |g: u32| {
        let name = secrets::generation_name(&cluster, Secret::GossipKey, g);
        async move {
            let v = secrets_store.get(&name).await?.ok_or_else(|| {
                anyhow::anyhow!(
                    "{} is missing: the rotation cannot go on (`auto-consul secrets rotate gossip-key` makes it again)",
                    secrets_store.shown(&name)
                )
            })?;
            Ok::<_, anyhow::Error>(v.trim().to_string())
        }
    };
    let mut done = Vec::new();
    loop {
        let cur = record.gossip_key.unwrap_or_default();
        let Some(step) = cur.rotation else {
            return Ok(json!({"steps": done, "generation": cur.generation, "step": null}));
        };
        let g = cur.generation;
        let (next_step, holding) = match step {
            RotationStep::Install => {
                let new = key(g + 1).await?;
                agent::keyring_op(token, Method::POST, &new).await?;
                let pools = agent::keyring(token).await?;
                (
                    Generation {
                        generation: g,
                        rotation: Some(RotationStep::Use),
                    },
                    every_member(&pools, |p| p.keys.get(&new)),
                )
            }
            RotationStep::Use => {
                let new = key(g + 1).await?;
                agent::keyring_op(token, Method::PUT, &new).await?;
                let pools = agent::keyring(token).await?;
                (
                    Generation {
                        generation: g + 1,
                        rotation: Some(RotationStep::Remove),
                    },
                    every_member(&pools, |p| p.primary_keys.get(&new)),
                )
            }
            RotationStep::Remove => {
                let old = key(g - 1).await?;
                agent::keyring_op(token, Method::DELETE, &old).await?;
                let pools = agent::keyring(token).await?;
                let left: u64 = pools.iter().filter_map(|p| p.keys.get(&old)).sum();
                (
                    Generation {
                        generation: g,
                        rotation: None,
                    },
                    (left == 0)
                        .then_some(())
                        .ok_or(format!("{left} member(s) still hold it")),
                )
            }
        };
        if let Err(why) = holding {
            tracing::info!(
                "gossip key rotation to generation {}: step {} is not done on every member yet ({why}); the next heartbeat goes on",
                g + u32::from(step != RotationStep::Remove),
                step.as_str()
            );
            return Ok(json!({
                "steps": done,
                "generation": g,
                "step": step.as_str(),
                "waiting": why,
            }));
        }
        record.gossip_key = Some(next_step).filter(|n| *n != Generation::default());
        etag = write(store, &record, etag).await?;
        tracing::warn!(
            "gossip key rotation: {} done on every member (generation in use: {})",
            step.as_str(),
            next_step.generation
        );
        done.push(step.as_str());
    }
}

/// Whether every live member of every pool counts for the key (`count`
/// of a pool); else how many do not.
fn every_member(
    pools: &[KeyringPool],
    count: impl Fn(&KeyringPool) -> Option<&u64>,
) -> Result<(), String> {
    if pools.is_empty() {
        return Err("Consul listed no keyring".into());
    }
    let short: Vec<String> = pools
        .iter()
        .filter(|p| count(p).copied().unwrap_or(0) < p.num_nodes)
        .map(|p| {
            format!(
                "{} of {} {} members",
                count(p).copied().unwrap_or(0),
                p.num_nodes,
                if p.wan { "WAN" } else { "LAN" }
            )
        })
        .collect();
    if short.is_empty() {
        Ok(())
    } else {
        Err(short.join(", "))
    }
}

/// Rewrites the cluster record under `If-Match`; its new version tag.
async fn write(store: &dyn Store, record: &ClusterRecord, etag: String) -> Result<String> {
    let body = serde_json::to_vec(record)?;
    match put_settled(store, CLUSTER_KEY, body, Condition::Matches(etag)).await? {
        Some(tag) => Ok(tag),
        None => bail!(
            "the cluster record changed meanwhile (another server or an operator wrote it): run again"
        ),
    }
}

/// Where a node keeps the generation of the agents' token its Consul runs
/// with (absent: 1, the one made at genesis).
pub const AGENT_TOKEN_GENERATION: &str = "/var/lib/auto-consul/agent-token-generation";

/// `secrets rotate agent-token`: a new token generation (a UUID, made
/// create-only as `<cluster>/agent/agent-token.<n>`), then the record says
/// `create`: the leader makes it in Consul, every node moves to it by its
/// own heartbeat, and the old token is deleted once no live node uses it.
pub async fn start_agent_token(
    store: &dyn Store,
    secrets_store: &dyn SecretStore,
    mut record: ClusterRecord,
    etag: String,
) -> Result<Value> {
    let cluster = record.cluster_id.clone();
    let cur = record.agent_token.unwrap_or_default();
    if let Some(step) = cur.rotation {
        return Ok(json!({
            "started": false,
            "generation": cur.generation,
            "next": cur.generation + 1,
            "step": step.as_str(),
        }));
    }
    let next = cur.generation + 1;
    let name = secrets::generation_name(&cluster, Secret::AgentToken, next);
    if secrets_store
        .create(&name, &uuid::Uuid::new_v4().to_string())
        .await?
    {
        tracing::info!("made {}", secrets_store.shown(&name));
    } else {
        let made = secrets_store.get(&name).await?.unwrap_or_default();
        if uuid::Uuid::parse_str(made.trim()).is_err() {
            bail!(
                "{} exists but is not a token (a UUID): delete it and run `auto-consul secrets rotate agent-token` again",
                secrets_store.shown(&name)
            );
        }
    }
    record.agent_token = Some(TokenGeneration {
        generation: cur.generation,
        rotation: Some(TokenStep::Create),
    });
    write(store, &record, etag).await?;
    Ok(json!({
        "started": true,
        "generation": cur.generation,
        "next": next,
        "step": TokenStep::Create.as_str(),
        "secret": secrets_store.shown(&name),
    }))
}

/// One pass of the leader's heartbeat over an agents' token rotation.
pub async fn drive_agent_token(
    store: &dyn Store,
    secrets_store: &dyn SecretStore,
    management: &str,
    mut record: ClusterRecord,
    mut etag: String,
) -> Result<Value> {
    let cluster = record.cluster_id.clone();
    let token = |g: u32| {
        let name = secrets::generation_name(&cluster, Secret::AgentToken, g);
        async move {
            let v = secrets_store.get(&name).await?.ok_or_else(|| {
                anyhow::anyhow!(
                    "{} is missing: the rotation cannot go on",
                    secrets_store.shown(&name)
                )
            })?;
            Ok::<_, anyhow::Error>(v.trim().to_string())
        }
    };
    let mut done = Vec::new();
    loop {
        let cur = record.agent_token.unwrap_or_default();
        let Some(step) = cur.rotation else {
            return Ok(json!({"steps": done, "generation": cur.generation, "step": null}));
        };
        let g = cur.generation;
        let next = match step {
            TokenStep::Create => {
                agent::ensure_agent_token(management, &token(g + 1).await?).await?;
                TokenGeneration {
                    generation: g,
                    rotation: Some(TokenStep::Switch),
                }
            }
            TokenStep::Switch => {
                let behind = nodes_behind(store, &record, g + 1).await?;
                if !behind.is_empty() {
                    let why = format!(
                        "{} live node(s) still run with generation {g}: {}",
                        behind.len(),
                        behind.join(", ")
                    );
                    tracing::info!("agents' token rotation: {why}; the next heartbeat looks again");
                    return Ok(
                        json!({"steps": done, "generation": g, "step": step.as_str(), "waiting": why}),
                    );
                }
                TokenGeneration {
                    generation: g + 1,
                    rotation: Some(TokenStep::Delete),
                }
            }
            TokenStep::Delete => {
                agent::delete_token(management, &token(g - 1).await?).await?;
                TokenGeneration {
                    generation: g,
                    rotation: None,
                }
            }
        };
        record.agent_token = Some(next).filter(|n| *n != TokenGeneration::default());
        etag = write(store, &record, etag).await?;
        tracing::warn!(
            "agents' token rotation: {} done (generation in use: {})",
            step.as_str(),
            next.generation
        );
        done.push(step.as_str());
    }
}

/// The live nodes (their newest `agents/` heartbeat younger than the
/// agents' expiry, which every node writes) whose heartbeat does not yet
/// say they run with generation `want` of the agents' token.
async fn nodes_behind(store: &dyn Store, record: &ClusterRecord, want: u32) -> Result<Vec<String>> {
    use crate::model::{HeartbeatBody, HeartbeatKey, Role, age_seconds};
    let now = store.now().await;
    let expiry = record.agent_expiry.unwrap_or(7200);
    let listed = store.list(Role::Agents.dir(), None).await?;
    let mut newest: std::collections::BTreeMap<String, (HeartbeatKey, String)> =
        std::collections::BTreeMap::new();
    for l in listed {
        let Some(k) = l.key.rsplit('/').next().and_then(HeartbeatKey::parse) else {
            continue;
        };
        if age_seconds(k.time, now) >= expiry {
            continue;
        }
        let e = newest
            .entry(k.node.clone())
            .or_insert((k.clone(), l.key.clone()));
        if k.time > e.0.time {
            *e = (k, l.key.clone());
        }
    }
    let bodies = futures::future::join_all(newest.values().map(|(_, key)| store.get(key))).await;
    let mut behind = Vec::new();
    for ((node, _), body) in newest.iter().zip(bodies) {
        let generation = body
            .ok()
            .flatten()
            .and_then(|o| serde_json::from_slice::<HeartbeatBody>(&o.body).ok())
            .and_then(|b| b.agent_token_generation)
            .unwrap_or(1);
        if generation < want {
            behind.push(node.clone());
        }
    }
    Ok(behind)
}

/// A node's heartbeat follows an agents' token rotation: when the record
/// says nodes run with another generation than this node's Consul does,
/// the token is read from the secrets store, written into Consul's config
/// (`acl.tokens.agent`) and Consul reloads it (ACL tokens are reloadable
/// configuration). The generation this node runs with now, for its
/// heartbeat; `None` when auto-consul does not manage its token.
pub async fn follow_agent_token(
    opts: &crate::cli::GlobalOpts,
    root: &crate::install::Root,
    store: &dyn Store,
    saved: Option<&crate::state::State>,
) -> Option<u32> {
    let (Some(url), None, Some(cluster)) = (
        &opts.secrets,
        &opts.acl_token_file,
        saved.and_then(|s| s.cluster_id.clone()),
    ) else {
        return None;
    };
    let have = crate::state::recorded_number(root, AGENT_TOKEN_GENERATION).unwrap_or(1);
    let record = match crate::registry::read_cluster(store).await {
        Ok(Some((r, _))) if r.cluster_id == cluster => r,
        Ok(_) => return Some(have),
        Err(e) => {
            tracing::warn!("reading the cluster record for the agents' token: {e:#}");
            return Some(have);
        }
    };
    let want = record.agent_token.unwrap_or_default().for_nodes();
    if want == have {
        return Some(have);
    }
    let switched = async {
        let secrets_store = secrets::open(url)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no secrets store"))?;
        let name = secrets::generation_name(&cluster, Secret::AgentToken, want);
        let token = secrets_store
            .get(&name)
            .await?
            .ok_or_else(|| anyhow::anyhow!("{} is missing", secrets_store.shown(&name)))?;
        set_agent_token(opts, root, token.trim())?;
        crate::state::record_number(root, AGENT_TOKEN_GENERATION, want);
        Ok::<_, anyhow::Error>(())
    };
    match switched.await {
        Ok(()) => {
            tracing::warn!(
                "this node's Consul now runs with generation {want} of the agents' token"
            );
            Some(want)
        }
        Err(e) => {
            tracing::warn!(
                "could not move to generation {want} of the agents' token: {e:#} (the next heartbeat tries again)"
            );
            Some(have)
        }
    }
}

/// Writes `token` as `acl.tokens.agent` in Consul's config (its mode and
/// owner kept, under the lock `run` takes) and has Consul reload it
/// (`systemctl reload consul.service`: SIGHUP, no ACL needed).
fn set_agent_token(
    opts: &crate::cli::GlobalOpts,
    root: &crate::install::Root,
    token: &str,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let config = opts.config_dir.join(super::run::CONFIG_FILE);
    let on_disk = root.path(&config);
    {
        let _lock = crate::install::lock(root, "consul-config")?;
        let text = std::fs::read_to_string(&on_disk)?;
        let mut value: Value = serde_json::from_str(&text)?;
        value["acl"]["tokens"]["agent"] = json!(token);
        let meta = std::fs::metadata(&on_disk)?;
        let mut contents = serde_json::to_string_pretty(&value)?;
        contents.push('\n');
        crate::install::write_atomic(
            root,
            &crate::install::FileSpec {
                path: config.clone(),
                contents,
                mode: meta.mode() & 0o7777,
                owner: Some((meta.uid(), meta.gid())),
            },
        )?;
    }
    if root.is_system() {
        crate::install::systemctl(&["reload", "consul.service"])?;
    }
    Ok(())
}
