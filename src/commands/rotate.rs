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
use crate::model::{CLUSTER_KEY, ClusterRecord, Generation, RotationStep};
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
