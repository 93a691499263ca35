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

use crate::cli::{ConsulOpts, SecretOpts};
use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::{Value, json};

use crate::agent::{self, KeyringPool};
use crate::claims::put_settled;
use crate::model::{
    CLUSTER_KEY, CaGeneration, CaStep, ClusterRecord, Generation, ManagementGeneration,
    RotationStep, SecondaryReport, TokenGeneration, TokenStep,
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
        return Ok(under_way(cur.generation, step.as_str()));
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
    let key = |g: u32| generation_value(secrets_store, &cluster, Secret::GossipKey, g);
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

/// What `secrets rotate` says of a rotation already under way.
fn under_way(generation: u32, step: &str) -> Value {
    json!({
        "started": false,
        "generation": generation,
        "next": generation + 1,
        "step": step,
    })
}

/// Generation `generation` of `secret`, which a rotation under way needs.
async fn generation_value(
    secrets_store: &dyn SecretStore,
    cluster: &str,
    secret: Secret,
    generation: u32,
) -> Result<String> {
    let name = secrets::generation_name(cluster, secret, generation);
    let v = secrets_store.get(&name).await?.ok_or_else(|| {
        anyhow::anyhow!(
            "{} is missing: the rotation cannot go on (`auto-consul secrets rotate {}` makes it again)",
            secrets_store.shown(&name),
            secret.short()
        )
    })?;
    Ok(v.trim().to_string())
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
pub(super) async fn write(
    store: &dyn Store,
    record: &ClusterRecord,
    etag: String,
) -> Result<String> {
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
    let cur = record.agent_token.unwrap_or_default();
    if cur.per_node {
        return Err(crate::error::usage(
            "every node of this cluster runs with a token of its own and the shared agents' token is \
             deleted: there is nothing to rotate (`auto-consul secrets revoke NODE` replaces one node's token)",
        ));
    }
    if let Some(step) = cur.rotation {
        return Ok(under_way(cur.generation, step.as_str()));
    }
    let name = new_token_generation(
        secrets_store,
        &record.cluster_id,
        Secret::AgentToken,
        cur.generation + 1,
    )
    .await?;
    record.agent_token = Some(TokenGeneration {
        generation: cur.generation,
        rotation: Some(TokenStep::Create),
        per_node: false,
    });
    write(store, &record, etag).await?;
    Ok(token_started(cur.generation, &name))
}

/// Makes generation `next` of token `secret` (a UUID), create-only: a start
/// stopped after this finds it and goes on. Its name, as shown.
async fn new_token_generation(
    secrets_store: &dyn SecretStore,
    cluster: &str,
    secret: Secret,
    next: u32,
) -> Result<String> {
    let name = secrets::generation_name(cluster, secret, next);
    if secrets_store
        .create(&name, &uuid::Uuid::new_v4().to_string())
        .await?
    {
        tracing::info!("made {}", secrets_store.shown(&name));
    } else {
        let made = secrets_store.get(&name).await?.unwrap_or_default();
        if uuid::Uuid::parse_str(made.trim()).is_err() {
            bail!(
                "{} exists but is not a token (a UUID): delete it and run `auto-consul secrets rotate {}` again",
                secrets_store.shown(&name),
                secret.short()
            );
        }
    }
    Ok(secrets_store.shown(&name))
}

/// What `secrets rotate` says of a token rotation it started.
fn token_started(generation: u32, shown: &str) -> Value {
    json!({
        "started": true,
        "generation": generation,
        "next": generation + 1,
        "step": TokenStep::Create.as_str(),
        "secret": shown,
    })
}

/// Where a server keeps the generation of the management token its Consul
/// holds as `initial_management`, read when it last started (absent: 1).
pub const MANAGEMENT_TOKEN_GENERATION: &str = "/var/lib/auto-consul/management-token-generation";

/// `secrets rotate management-token`: a new generation (a UUID, made
/// create-only as `<cluster>/server/management-token.<n>`), then the
/// record says `create`. The leader makes it in Consul with the old one;
/// then (`switch`) it lets the servers restart with it as
/// `initial_management` one at a time, each only while autopilot reports
/// the cluster healthy; once every live server has, the old token is
/// deleted. Consul reads `initial_management` only at start and makes
/// that token again at every leadership it establishes
/// (agent/consul/leader.go, `initializeACLs`): deleted any earlier, the
/// old token would come back with the next election.
pub async fn start_management_token(
    store: &dyn Store,
    secrets_store: &dyn SecretStore,
    mut record: ClusterRecord,
    etag: String,
) -> Result<Value> {
    let cur = record.management_token.clone().unwrap_or_default();
    if let Some(step) = cur.rotation {
        return Ok(under_way(cur.generation, step.as_str()));
    }
    let name = new_token_generation(
        secrets_store,
        &record.cluster_id,
        Secret::ManagementToken,
        cur.generation + 1,
    )
    .await?;
    record.management_token = Some(ManagementGeneration {
        generation: cur.generation,
        rotation: Some(TokenStep::Create),
        restart: None,
    });
    write(store, &record, etag).await?;
    Ok(token_started(cur.generation, &name))
}

/// One pass of the leader's heartbeat over a management token rotation.
/// `management`: the token this server's Consul holds (either generation
/// works until `delete`); `me`: this server's node name (it restarts
/// last, so leadership moves once).
pub async fn drive_management_token(
    store: &dyn Store,
    secrets_store: &dyn SecretStore,
    management: &str,
    me: &str,
    mut record: ClusterRecord,
    mut etag: String,
) -> Result<Value> {
    let cluster = record.cluster_id.clone();
    let token = |g: u32| generation_value(secrets_store, &cluster, Secret::ManagementToken, g);
    let mut done = Vec::new();
    loop {
        let cur = record.management_token.clone().unwrap_or_default();
        let Some(step) = cur.rotation else {
            return Ok(json!({"steps": done, "generation": cur.generation, "step": null}));
        };
        let g = cur.generation;
        let waiting = |why: String| {
            tracing::info!("management token rotation: {why}; the next heartbeat looks again");
            json!({"steps": done, "generation": g, "step": step.as_str(), "restart": cur.restart, "waiting": why})
        };
        let next = match step {
            TokenStep::Create => {
                // A secondary's management token is its own datacenter's
                // (local); a primary's stays global, as Consul makes its
                // initial one.
                agent::ensure_management_token(
                    management,
                    &token(g + 1).await?,
                    record.primary.is_some(),
                )
                .await?;
                ManagementGeneration {
                    generation: g,
                    rotation: Some(TokenStep::Switch),
                    restart: None,
                }
            }
            TokenStep::Switch => {
                let mut behind = nodes_behind(store, &record, true, |b| {
                    b.management_token_generation.unwrap_or(1) > g
                })
                .await?;
                if let Some(n) = cur.restart.as_ref().filter(|n| behind.contains(n)) {
                    return Ok(waiting(format!(
                        "{n} restarts its Consul with generation {}",
                        g + 1
                    )));
                }
                if behind.is_empty() {
                    ManagementGeneration {
                        generation: g + 1,
                        rotation: Some(TokenStep::Delete),
                        restart: None,
                    }
                } else {
                    // One server at a time, and only into a healthy
                    // cluster: the one before is back, a voter, stable.
                    match agent::autopilot_healthy(Some(management)).await {
                        Ok(true) => {}
                        Ok(false) => {
                            return Ok(waiting(
                                "autopilot reports the cluster unhealthy: no server restarts now"
                                    .into(),
                            ));
                        }
                        Err(e) => return Ok(waiting(format!("{e:#}"))),
                    }
                    // This server (the leader) last.
                    behind.sort_by_key(|n| (n == me, n.clone()));
                    let n = behind[0].clone();
                    record.management_token = Some(ManagementGeneration {
                        restart: Some(n.clone()),
                        ..cur.clone()
                    });
                    write(store, &record, etag).await?;
                    tracing::warn!(
                        "management token rotation: {n} may now restart its Consul with generation {}                          ({} server(s) still to go)",
                        g + 1,
                        behind.len()
                    );
                    return Ok(
                        json!({"steps": done, "generation": g, "step": step.as_str(), "restart": n}),
                    );
                }
            }
            TokenStep::Delete => {
                agent::delete_token(management, &token(g - 1).await?).await?;
                ManagementGeneration {
                    generation: g,
                    rotation: None,
                    restart: None,
                }
            }
        };
        record.management_token =
            Some(next.clone()).filter(|n| *n != ManagementGeneration::default());
        etag = write(store, &record, etag).await?;
        tracing::warn!(
            "management token rotation: {} done (generation in use: {})",
            step.as_str(),
            next.generation
        );
        done.push(step.as_str());
    }
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
    let token = |g: u32| generation_value(secrets_store, &cluster, Secret::AgentToken, g);
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
                    per_node: false,
                }
            }
            TokenStep::Switch => {
                // A node on its own token (--instance-tag) runs with no
                // shared one: nothing to wait for.
                let behind = nodes_behind(store, &record, false, |b| {
                    b.agent_token_generation.unwrap_or(1) > g || b.node_token == Some(true)
                })
                .await?;
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
                    per_node: false,
                }
            }
            TokenStep::Delete => {
                agent::delete_token(management, &token(g - 1).await?).await?;
                TokenGeneration {
                    generation: g,
                    rotation: None,
                    per_node: false,
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
/// agents' expiry, which every node writes; servers only with
/// `servers_only`) whose heartbeat body does not pass `done`.
pub(super) async fn nodes_behind(
    store: &dyn Store,
    record: &ClusterRecord,
    servers_only: bool,
    done: impl Fn(&crate::model::HeartbeatBody) -> bool,
) -> Result<Vec<String>> {
    let mut behind = Vec::new();
    for (node, body) in live_bodies(store, record).await? {
        match body {
            Some(b) if servers_only && b.mode != "server" => {}
            Some(b) if done(&b) => {}
            // An unreadable body (junk, or the original tool's bare
            // address: an agent) names no server.
            None if servers_only => {}
            _ => behind.push(node),
        }
    }
    Ok(behind)
}

/// Every live node (its newest `agents/` heartbeat younger than the
/// agents' expiry) and that heartbeat's body (`None`: unreadable).
pub(super) async fn live_bodies(
    store: &dyn Store,
    record: &ClusterRecord,
) -> Result<std::collections::BTreeMap<String, Option<crate::model::HeartbeatBody>>> {
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
    Ok(newest
        .into_keys()
        .zip(bodies)
        .map(|(node, body)| {
            // A body that names another node than its key does is junk.
            let body = body
                .ok()
                .flatten()
                .and_then(|o| serde_json::from_slice::<HeartbeatBody>(&o.body).ok())
                .filter(|b| b.node == node);
            (node, body)
        })
        .collect())
}

/// `secrets rotate ca`: a new CA generation (`server/ca.<n>` and its
/// certificate `agent/ca-cert.<n>`, create-only), then the record says
/// `trust`: every node's CA file trusts both, servers are signed by the
/// new one, then every node's CA file drops the old one; at no step does a
/// live node reject a live server's certificate.
pub async fn start_ca(
    store: &dyn Store,
    secrets_store: &dyn SecretStore,
    mut record: ClusterRecord,
    etag: String,
) -> Result<Value> {
    let cluster = record.cluster_id.clone();
    let cur = record.ca.unwrap_or_default();
    if let Some(step) = cur.rotation {
        return Ok(under_way(cur.generation, step.as_str()));
    }
    let next = cur.generation + 1;
    let ca_name = secrets::generation_name(&cluster, Secret::Ca, next);
    let cert_name = secrets::generation_name(&cluster, Secret::CaCert, next);
    if !secrets_store
        .create(&ca_name, &secrets::new_ca_generation(&cluster, next)?)
        .await?
    {
        tracing::info!(
            "{} exists: a start stopped after it made the CA",
            secrets_store.shown(&ca_name)
        );
    }
    let ca = secrets_store.get(&ca_name).await?.unwrap_or_default();
    let Some(cert) = secrets::ca_certificate_of(&ca) else {
        bail!(
            "{} is not a PEM certificate and key: delete it and run `auto-consul secrets rotate ca` again",
            secrets_store.shown(&ca_name)
        );
    };
    if !secrets_store.create(&cert_name, &cert).await? {
        let there = secrets_store.get(&cert_name).await?.unwrap_or_default();
        if there.trim() != cert.trim() {
            bail!(
                "{} is not the certificate of {}: delete it and run `auto-consul secrets rotate ca` again",
                secrets_store.shown(&cert_name),
                secrets_store.shown(&ca_name)
            );
        }
    }
    record.ca = Some(CaGeneration {
        generation: cur.generation,
        rotation: Some(CaStep::Trust),
    });
    write(store, &record, etag).await?;
    Ok(json!({
        "started": true,
        "generation": cur.generation,
        "next": next,
        "step": CaStep::Trust.as_str(),
        "secret": secrets_store.shown(&ca_name),
    }))
}

/// One pass of the leader's heartbeat over a CA rotation: each step ends
/// once every live node's (or server's) newest heartbeat says it is done,
/// and, in a primary, once every secondary datacenter reports it done by
/// its own nodes ([`secondaries_behind`]).
pub async fn drive_ca(
    store: &dyn Store,
    mut record: ClusterRecord,
    mut etag: String,
) -> Result<Value> {
    let mut done = Vec::new();
    loop {
        let cur = record.ca.unwrap_or_default();
        let Some(step) = cur.rotation else {
            return Ok(json!({"steps": done, "generation": cur.generation, "step": null}));
        };
        let g = cur.generation;
        let behind = ca_step_behind(store, &record, step, g).await?;
        let why = if behind.is_empty() {
            secondaries_behind(store, &record, step, g).await?
        } else {
            Some(format!(
                "{} live node(s) not there yet: {}",
                behind.len(),
                behind.join(", ")
            ))
        };
        if let Some(why) = why {
            tracing::info!(
                "CA rotation, step {}: {why}; the next heartbeat looks again",
                step.as_str()
            );
            return Ok(
                json!({"steps": done, "generation": g, "step": step.as_str(), "waiting": why}),
            );
        }
        let next = match step {
            CaStep::Trust => CaGeneration {
                generation: g,
                rotation: Some(CaStep::Reissue),
            },
            CaStep::Reissue => CaGeneration {
                generation: g + 1,
                rotation: Some(CaStep::Drop),
            },
            CaStep::Drop => CaGeneration {
                generation: g,
                rotation: None,
            },
        };
        record.ca = Some(next).filter(|n| *n != CaGeneration::default());
        etag = write(store, &record, etag).await?;
        tracing::warn!(
            "CA rotation: {} done on every live node (generation in use: {})",
            step.as_str(),
            next.generation
        );
        done.push(step.as_str());
    }
}

/// The live nodes of `record`'s registry (servers only, for `reissue`)
/// that have not done CA step `step` of generation `g`, as their
/// heartbeats say.
pub(crate) async fn ca_step_behind(
    store: &dyn Store,
    record: &ClusterRecord,
    step: CaStep,
    g: u32,
) -> Result<Vec<String>> {
    match step {
        CaStep::Trust => {
            nodes_behind(store, record, false, |b| {
                b.ca_trusted.as_ref().is_none_or(|t| t.contains(&(g + 1)))
            })
            .await
        }
        CaStep::Reissue => {
            nodes_behind(store, record, true, |b| {
                b.ca_signed_by.is_none_or(|s| s == g + 1)
            })
            .await
        }
        CaStep::Drop => {
            nodes_behind(store, record, false, |b| {
                b.ca_trusted.as_ref().is_none_or(|t| t.as_slice() == [g])
            })
            .await
        }
    }
}

/// Where secondary datacenters report to their primary, in the primary's
/// registry: `secondaries/<datacenter>`, a [`SecondaryReport`].
pub const SECONDARIES: &str = "secondaries/";

/// A primary's CA step also waits for its secondary datacenters: each one
/// that has reported to this registry (`secondaries/<dc>`) and that
/// Consul's WAN still lists (`GET /v1/catalog/datacenters`; a datacenter
/// taken down leaves the list, and holds nothing) must report this very
/// step (generation and step) done by all its live nodes. WAN RPC needs
/// both sides to trust the CA the other side's servers present. `None`:
/// nothing to wait for; else why it waits.
async fn secondaries_behind(
    store: &dyn Store,
    record: &ClusterRecord,
    step: CaStep,
    g: u32,
) -> Result<Option<String>> {
    if record.primary.is_some() {
        return Ok(None);
    }
    let wan = agent::datacenters()
        .await
        .context("a CA step waits for the secondary datacenters Consul's WAN lists")?;
    let own = record.datacenter.as_deref();
    if wan.iter().all(|d| Some(d.as_str()) == own) {
        // This datacenter alone: nothing to read.
        return Ok(None);
    }
    let reported = store.list(SECONDARIES, None).await?;
    let mut waiting = Vec::new();
    for l in reported {
        let Some(dc) = l.key.strip_prefix(SECONDARIES) else {
            continue;
        };
        if own == Some(dc) || !wan.iter().any(|d| d == dc) {
            continue;
        }
        // Gone since the listing: as if it never reported.
        let Some(object) = store.get(&l.key).await? else {
            continue;
        };
        let report = serde_json::from_slice::<SecondaryReport>(&object.body)
            .inspect_err(|e| {
                tracing::warn!("{SECONDARIES}{dc} is not a report ({e}): the step waits")
            })
            .ok();
        match report {
            Some(r) if r.ca_generation == g && r.ca_step == Some(step) => {
                if r.behind > 0 {
                    waiting.push(format!("{dc}: {} live node(s) not there yet", r.behind));
                }
            }
            Some(r) => waiting.push(format!(
                "{dc}: at {}, not yet at this step",
                r.ca_step.map_or("no rotation".to_string(), |s| format!(
                    "{} of generation {}",
                    s.as_str(),
                    r.ca_generation
                ))
            )),
            None => waiting.push(format!("{dc}: its report is unreadable")),
        }
    }
    Ok((!waiting.is_empty()).then(|| {
        format!(
            "secondary datacenters not there yet ({})",
            waiting.join("; ")
        )
    }))
}

/// Where a node keeps the CA generations its CA file trusts (absent: 1).
pub const CA_TRUSTED: &str = "/var/lib/auto-consul/ca-trusted";
/// Where a server keeps the CA generation that signed its certificate
/// (absent: 1).
pub const CA_SIGNED_BY: &str = "/var/lib/auto-consul/ca-signed-by";

/// What a node runs with of the secrets rotations move, for its heartbeat
/// body (`None`: auto-consul does not manage it).
#[derive(Debug, Default, Clone)]
pub struct Following {
    /// The agents' token's generation.
    pub agent_token: Option<u32>,
    /// The CA generations its CA file trusts.
    pub ca_trusted: Option<Vec<u32>>,
    /// A server's: the CA generation that signed its certificate.
    pub ca_signed_by: Option<u32>,
    /// A server's: the management token's generation its Consul holds.
    pub management_token: Option<u32>,
    /// Whether Consul had to restart to load a new management token (on
    /// the running system this heartbeat restarted it; under another
    /// root, whoever runs that Consul must).
    pub consul_restart: bool,
    /// The generations the cluster record says (for the server's
    /// certificate renewal).
    pub generations: secrets::Generations,
    /// The cluster record as read (and its version tag), when it was.
    pub record: Option<(ClusterRecord, String)>,
}

/// A node's heartbeat follows the rotations under way (clusters whose
/// secrets auto-consul made): one read of the cluster record, then, when
/// it says nodes run with another agents' token, or trust other CAs, than
/// this node does, the new values are read from the secrets store, written
/// into Consul's config or CA file, and Consul reloads them (ACL tokens
/// and TLS files are reloadable configuration).
pub async fn follow_rotations(
    consul: &ConsulOpts,
    tls: &SecretOpts,
    root: &crate::install::Root,
    store: &dyn Store,
    saved: Option<&crate::state::State>,
) -> Following {
    let mut out = Following::default();
    let (Some(url), Some(saved)) = (&tls.secrets, saved) else {
        return out;
    };
    let Some(cluster) = saved.cluster_id.clone() else {
        return out;
    };
    // A node on its own token (--instance-tag) follows no shared one.
    let token_managed =
        tls.acl_token_file.is_none() && super::node_tokens::kind(root).as_deref() != Some("node");
    let ca_managed = tls.ca_file.is_none();
    let token_have = crate::state::recorded_number(root, AGENT_TOKEN_GENERATION).unwrap_or(1);
    let trusted_have = recorded_list(root, CA_TRUSTED).unwrap_or_else(|| vec![1]);
    out.agent_token = token_managed.then_some(token_have);
    out.ca_trusted = ca_managed.then(|| trusted_have.clone());
    if saved.mode.is_server() && ca_managed {
        out.ca_signed_by = Some(crate::state::recorded_number(root, CA_SIGNED_BY).unwrap_or(1));
    }
    let management_managed = saved.mode.is_server();
    let management_have = crate::state::recorded_number(root, MANAGEMENT_TOKEN_GENERATION)
        .unwrap_or(1)
        .max(1);
    out.management_token = management_managed.then_some(management_have);
    let record = match crate::registry::read_cluster(store).await {
        Ok(Some((r, etag))) => {
            out.record = Some((r.clone(), etag));
            if r.cluster_id != cluster {
                return out;
            }
            r
        }
        Ok(None) => return out,
        Err(e) => {
            tracing::warn!("reading the cluster record for the secrets' generations: {e:#}");
            return out;
        }
    };
    let mut gens = secrets::Generations::of(Some(&record));
    out.generations = gens;
    let token_want = gens.agent_token;
    let trusted_want = gens.ca.trusted();
    let management_want = management_generation(&record, &saved.node, management_have);
    gens.management_token = management_want;
    if (!token_managed || token_want == token_have)
        && (!ca_managed || trusted_want == trusted_have)
        && (!management_managed || management_want == management_have)
    {
        return out;
    }
    let switched = async {
        let secrets_store = secrets::open(url)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no secrets store"))?;
        let made = secrets::genesis_with(
            secrets_store.as_ref(),
            &cluster,
            saved.mode.is_server(),
            gens,
        )
        .await?;
        let mut changed = false;
        if token_managed && token_want != token_have {
            set_config_token(consul, root, "agent", &made.agent_token)?;
            crate::state::record_number(root, AGENT_TOKEN_GENERATION, token_want);
            tracing::warn!(
                "this node's Consul now runs with generation {token_want} of the agents' token"
            );
            changed = true;
        }
        if ca_managed && trusted_want != trusted_have {
            set_ca_file(consul, root, &made.ca_cert)?;
            record_list(root, CA_TRUSTED, &trusted_want);
            tracing::warn!("this node's CA file now trusts CA generation(s) {trusted_want:?}");
            changed = true;
        }
        let restart = management_managed && management_want != management_have;
        if restart {
            let token = made
                .management_token
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("no management token read"))?;
            // A secondary's Consul holds no initial management token
            // (it bootstraps no ACLs): the new generation, made by API,
            // needs no restart there.
            if record.primary.is_none() {
                set_config_token(consul, root, "initial_management", token)?;
                restart_consul(root)?;
            } else if changed {
                reload_consul(root, Some(token)).await;
            }
            crate::state::record_number(root, MANAGEMENT_TOKEN_GENERATION, management_want);
            tracing::warn!(
                "this server's Consul now holds generation {management_want} of the management token"
            );
            // Out of a generation the cluster already left (it booted, or
            // was down, while a rotation ended): as a leader it may have
            // made that token again (leader.go, initializeACLs). Delete it.
            let stale = record
                .management_token
                .as_ref()
                .is_none_or(|m| m.rotation.is_none() || m.rotation == Some(TokenStep::Delete));
            if stale && management_have < management_want {
                let old = generation_value(
                    secrets_store.as_ref(),
                    &cluster,
                    Secret::ManagementToken,
                    management_have,
                )
                .await?;
                if let Err(e) = agent::delete_token(token, &old).await {
                    tracing::warn!(
                        "deleting generation {management_have} of the management token, which this \
                         server held: {e:#} (it restarts with the new one; delete it by hand)"
                    );
                }
            }
        } else if changed {
            reload_consul(root, made.management_token.as_deref()).await;
        }
        Ok::<_, anyhow::Error>(restart && record.primary.is_none())
    };
    match switched.await {
        Ok(restarted) => {
            out.agent_token = token_managed.then_some(token_want);
            out.ca_trusted = ca_managed.then(|| trusted_want.clone());
            out.management_token = management_managed.then_some(management_want);
            out.consul_restart = restarted;
        }
        Err(e) => tracing::warn!(
            "could not follow the secrets' rotation: {e:#} (the next heartbeat tries again)"
        ),
    }
    out
}

/// The management token generation server `node` should hold, by the
/// cluster record, having `have`: the new one when the leader lets it
/// restart now (`switch`, `restart` naming it); never an older one; the one
/// in use when it is behind it (a server that missed a whole rotation:
/// the token it holds may be deleted already, and it would make it again
/// as leader).
fn management_generation(record: &ClusterRecord, node: &str, have: u32) -> u32 {
    let m = record.management_token.clone().unwrap_or_default();
    match m.rotation {
        Some(TokenStep::Switch) if m.restart.as_deref() == Some(node) => m.generation + 1,
        _ => have.max(m.generation),
    }
}

/// Restarts Consul so it reads what only its start reads
/// (`initial_management`): `systemctl restart consul.service` on the
/// running system (it returns once the unit is started again); under
/// another root, nothing here runs that Consul: says so.
fn restart_consul(root: &crate::install::Root) -> Result<()> {
    if root.is_system() {
        crate::install::systemctl(&["restart", "consul.service"])
    } else {
        tracing::warn!(
            "Consul must restart to read its new initial management token: under --root {} \
             auto-consul restarts nothing",
            root.path(std::path::Path::new("/")).display()
        );
        Ok(())
    }
}

/// Has Consul reload its config and TLS files: `systemctl reload
/// consul.service` (SIGHUP: no ACL needed) on the running system; else
/// (another root) the agent's reload endpoint with the management token
/// a server holds. Failures are warnings.
pub async fn reload_consul(root: &crate::install::Root, management: Option<&str>) {
    let done = if root.is_system() {
        crate::install::systemctl(&["reload", "consul.service"])
    } else if management.is_some() {
        agent::reload(management).await
    } else {
        Ok(())
    };
    if let Err(e) = done {
        tracing::warn!("Consul did not reload: {e:#} (it reads the new files when it restarts)");
    }
}

/// Writes the CA file auto-consul keeps (its mode and owner kept).
fn set_ca_file(consul_opts: &ConsulOpts, root: &crate::install::Root, pem: &str) -> Result<()> {
    let path = super::run::TlsPaths::new(&consul_opts.config_dir).ca;
    let owner = std::fs::metadata(root.path(&path)).ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        (m.uid(), m.gid())
    });
    let _lock = crate::install::lock(root, "consul-config")?;
    crate::install::write_atomic(
        root,
        &crate::install::FileSpec {
            path,
            contents: pem.to_string(),
            mode: 0o644,
            owner,
        },
    )?;
    Ok(())
}

/// A list of numbers recorded in `path` (space-separated).
pub fn recorded_list(root: &crate::install::Root, path: &str) -> Option<Vec<u32>> {
    let text = std::fs::read_to_string(root.path(std::path::Path::new(path))).ok()?;
    text.split_whitespace().map(|n| n.parse().ok()).collect()
}

/// The file recording `list` at `path` (space-separated).
pub fn list_file(path: &str, list: &[u32]) -> crate::install::FileSpec {
    crate::install::FileSpec {
        path: path.into(),
        contents: format!(
            "{}\n",
            list.iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        ),
        mode: 0o644,
        owner: None,
    }
}

/// Records a list of numbers in `path`; a failure is a warning.
pub fn record_list(root: &crate::install::Root, path: &str, list: &[u32]) {
    let spec = list_file(path, list);
    if let Err(e) = crate::install::write_atomic(root, &spec) {
        tracing::warn!("could not record {list:?} in {path}: {e:#}");
    }
}

/// Writes `token` as `acl.tokens.<which>` in Consul's config (its mode
/// and owner kept, under the lock `run` takes).
pub(super) fn set_config_token(
    consul: &ConsulOpts,
    root: &crate::install::Root,
    which: &str,
    token: &str,
) -> Result<()> {
    edit_config(consul, root, |value| {
        value["acl"]["tokens"][which] = json!(token);
    })
}

/// Consul's config file at `path` (on disk), as JSON, when it reads as such.
pub(super) fn config_json(path: &std::path::Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Rewrites Consul's config file through `edit` (its mode and owner kept,
/// under the lock `run` takes, from the file as it is now).
pub(super) fn edit_config(
    consul_opts: &ConsulOpts,
    root: &crate::install::Root,
    edit: impl FnOnce(&mut Value),
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let config = consul_opts.config_dir.join(super::run::CONFIG_FILE);
    let on_disk = root.path(&config);
    {
        let _lock = crate::install::lock(root, "consul-config")?;
        let text = std::fs::read_to_string(&on_disk)?;
        let mut value: Value = serde_json::from_str(&text)?;
        edit(&mut value);
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
    Ok(())
}
