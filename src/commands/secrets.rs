//! `secrets list|get`: the secrets a cluster made at genesis, for an
//! operator. Names and places only, except `get`, which prints the one
//! value asked for (and needs the IAM right to read it).

use anyhow::Result;
use serde_json::json;

use super::open_store;
use crate::cli::{GlobalOpts, Rotatable, SecretsAction};
use crate::error::usage;
use crate::registry::read_cluster;
use crate::secrets::{Secret, SecretsUrl, generation_name};

/// `secrets ...`.
pub async fn secrets(opts: &GlobalOpts, action: &SecretsAction) -> Result<()> {
    let url = match &opts.tls.secrets {
        None | Some(SecretsUrl::None) => {
            return Err(usage(
                "no secrets store: give --secrets ssm:///PATH or file:///DIR (AUTO_CONSUL_SECRETS), as the cluster's nodes have it",
            ));
        }
        Some(url) => url,
    };
    let registry = opts.cluster.registry_url()?;
    let opened = open_store(&registry).await?;
    let Some((record, etag)) = read_cluster(opened.store.as_ref()).await? else {
        return Err(usage(format!(
            "the registry {registry} has no cluster record: no secrets were made"
        )));
    };
    let cluster = record.cluster_id.clone();
    let gossip = record.gossip_key.unwrap_or_default();
    let agent_token = record.agent_token.unwrap_or_default();
    let ca = record.ca.unwrap_or_default();
    let management = record.management_token.clone().unwrap_or_default();
    // Each secret's generation in use, and a rotation under way: (to, step).
    let generation_of = |s: Secret| -> (u32, Option<(u32, &'static str)>) {
        match s {
            Secret::GossipKey => (
                gossip.generation,
                gossip.next().zip(gossip.rotation.map(|r| r.as_str())),
            ),
            Secret::AgentToken => (
                agent_token.generation,
                agent_token
                    .rotation
                    .map(|r| (agent_token.generation + 1, r.as_str())),
            ),
            Secret::Ca | Secret::CaCert => (
                ca.generation,
                ca.rotation.map(|r| (ca.generation + 1, r.as_str())),
            ),
            Secret::ManagementToken => (
                management.generation,
                management
                    .rotation
                    .map(|r| (management.generation + 1, r.as_str())),
            ),
            Secret::DnsToken => (1, None),
        }
    };
    let store = crate::secrets::open(url)
        .await?
        .expect("a store for a URL that is not none");
    match action {
        SecretsAction::Rotate { secret } => {
            // A secondary's gossip key and CA are its primary's: they
            // rotate there, and its servers copy the rotation.
            if let (Some(p), Rotatable::GossipKey | Rotatable::Ca) = (&record.primary, secret) {
                return Err(crate::error::usage(format!(
                    "this cluster is a secondary datacenter of {} ({}): its gossip key and CA are the \
                     primary's and rotate there (run `auto-consul secrets rotate` with --registry {} and \
                     the primary's --secrets); its servers' heartbeats copy the rotation",
                    p.datacenter, p.registry, p.registry
                )));
            }
            let v = match secret {
                Rotatable::GossipKey => {
                    super::rotate::start_gossip_key(
                        opened.store.as_ref(),
                        store.as_ref(),
                        record,
                        etag,
                    )
                    .await?
                }
                Rotatable::AgentToken => {
                    super::rotate::start_agent_token(
                        opened.store.as_ref(),
                        store.as_ref(),
                        record,
                        etag,
                    )
                    .await?
                }
                Rotatable::Ca => {
                    super::rotate::start_ca(opened.store.as_ref(), store.as_ref(), record, etag)
                        .await?
                }
                Rotatable::ManagementToken => {
                    super::rotate::start_management_token(
                        opened.store.as_ref(),
                        store.as_ref(),
                        record,
                        etag,
                    )
                    .await?
                }
            };
            let what = match secret {
                Rotatable::GossipKey => "the gossip key",
                Rotatable::AgentToken => "the agents' token",
                Rotatable::Ca => "the CA",
                Rotatable::ManagementToken => "the management token",
            };
            if opts.output.json {
                println!("{v}");
            } else if v["started"] == true {
                println!(
                    "rotating {what} of cluster {cluster} to generation {} ({}): the servers' and nodes' \
                     heartbeats finish it; `auto-consul secrets list` shows where it stands",
                    v["next"],
                    v["secret"].as_str().unwrap_or_default()
                );
            } else {
                println!(
                    "a rotation of {what} of cluster {cluster} to generation {} is under way \
                     (step {}): the heartbeats finish it",
                    v["next"],
                    v["step"].as_str().unwrap_or_default()
                );
            }
        }
        SecretsAction::Revoke { node } => {
            if !crate::model::instance_id_ok(node) {
                return Err(usage(format!(
                    "`{}` is not an instance id: name the node by its instance id (i-...), as its token is kept",
                    node.escape_debug()
                )));
            }
            let management = super::management_token(&opts.cluster, &opts.consul, &opts.tls, &cluster).await?.ok_or_else(|| {
                usage("revoking a node's token needs the cluster's management token: run it on one of its servers")
            })?;
            let v = super::node_tokens::revoke(store.as_ref(), &management, &cluster, node).await?;
            if opts.output.json {
                println!("{v}");
            } else {
                println!(
                    "node {node}: {}; {}",
                    if v["revoked"] == true {
                        "its token is deleted from Consul and the secrets store: its Consul is refused"
                    } else {
                        "it had no token of its own"
                    },
                    if v["new_token_made"] == true {
                        "a new one is made, which it reads when it boots again"
                    } else {
                        "EC2 does not run it: no new one is made"
                    }
                );
            }
        }
        SecretsAction::Get { name: wanted } => {
            let Some(secret) = Secret::ALL.into_iter().find(|s| s.short() == wanted) else {
                let names: Vec<&str> = Secret::ALL.iter().map(|s| s.short()).collect();
                return Err(usage(format!(
                    "no secret `{wanted}`: use one of {}",
                    names.join(", ")
                )));
            };
            let name = |s: Secret| generation_name(&cluster, s, generation_of(s).0);
            match store.get(&name(secret)).await? {
                Some(v) => println!("{}", v.trim_end()),
                None => anyhow::bail!(
                    "{} does not exist yet: the cluster's servers make it at genesis",
                    store.shown(&name(secret))
                ),
            }
        }
        SecretsAction::List => {
            let mut rows = Vec::new();
            for s in Secret::ALL {
                let (generation, rotation) = generation_of(s);
                let n = generation_name(&cluster, s, generation);
                // Existence only; a denial (an agent's role, say) is shown.
                let exists = match store.get(&n).await {
                    Ok(v) => json!(v.is_some()),
                    Err(e) => json!(format!("{e:#}")),
                };
                rows.push(json!({
                    "name": s.short(),
                    "where": store.shown(&n),
                    "exists": exists,
                    "readers": if s.for_agents() { "servers, agents" } else { "servers" },
                    "generation": generation,
                    "rotation": rotation.map(|(to, step)| json!({"to": to, "step": step})),
                }));
            }
            if opts.output.json {
                println!("{}", json!({ "cluster_id": cluster, "secrets": rows }));
            } else {
                println!("cluster {cluster}: secrets in {url}");
                for r in &rows {
                    let state = match &r["exists"] {
                        serde_json::Value::Bool(true) => "made".to_string(),
                        serde_json::Value::Bool(false) => "not made yet".to_string(),
                        other => other.as_str().unwrap_or_default().to_string(),
                    };
                    let rotation = match &r["rotation"] {
                        serde_json::Value::Null => String::new(),
                        v => format!(
                            "; rotating to generation {}, step {}",
                            v["to"],
                            v["step"].as_str().unwrap_or_default()
                        ),
                    };
                    println!(
                        "  {:<17} {} ({state}; generation {}{rotation}; read by {})",
                        r["name"].as_str().unwrap_or_default(),
                        r["where"].as_str().unwrap_or_default(),
                        r["generation"],
                        r["readers"].as_str().unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(())
}
