//! `leave`: remove this node from the registry at shutdown: its heartbeats
//! deleted, its server slot released so a replacement can take it at once.
//! With `--if-terminating` (the stop action of auto-consul-leave.service),
//! only when the instance is being terminated, and Consul leaves first; a
//! reboot keeps everything.

use anyhow::Result;
use serde_json::json;

use super::open_store;
use crate::claims::Claims;
use crate::cli::{ClusterOpts, ConsulOpts, GlobalOpts, SecretOpts};
use crate::install::Root;
use crate::registry::{list_heartbeats, read_cluster, read_slots};
use crate::{agent, identity, state, termination};

/// How long the termination check waits for the metadata service.
const NOTICE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `leave`; with `if_terminating`, only when the instance is going away.
pub async fn leave(opts: &GlobalOpts, if_terminating: bool) -> Result<()> {
    if if_terminating {
        match termination::notice(NOTICE_WAIT).await {
            None => {
                let line = "this instance is not being terminated (a reboot or a stop): keeping its slot and heartbeats";
                if opts.output.json {
                    println!("{}", json!({ "terminating": false, "left": false }));
                } else {
                    println!("{line}");
                }
                return Ok(());
            }
            Some(reason) => {
                tracing::warn!("{reason}: leaving the Consul cluster and the registry");
                consul_leaves(&opts.cluster, &opts.consul, &opts.tls).await;
            }
        }
    }
    registry_leave(opts).await
}

/// Makes the local Consul agent leave gracefully; a failure is logged (the
/// registry is left anyway: the slot must be freed for a replacement).
pub async fn consul_leaves(cluster_opts: &ClusterOpts, consul_opts: &ConsulOpts, tls: &SecretOpts) {
    // Under default deny, leaving takes agent:write on this node: a
    // server whose secrets auto-consul made has the management token; a
    // node on its own token (--instance-tag) has agent:write on itself.
    let token = match (&tls.acl_token_file, server_cluster(consul_opts)) {
        (None, Some(cluster)) => super::management_token(cluster_opts, consul_opts, tls, &cluster)
            .await
            .map_err(|e| tracing::warn!("reading the management token to leave with: {e:#}"))
            .ok()
            .flatten(),
        (None, None) => {
            super::node_tokens::own_from_config(consul_opts, &Root::new(&consul_opts.root))
        }
        _ => None,
    };
    match agent::leave_with(tls.acl_token_file.as_deref(), token.as_deref()).await {
        Ok(()) => tracing::info!("the local Consul agent left the cluster"),
        Err(e) => tracing::error!("the local Consul agent did not leave: {e:#}"),
    }
}

/// The cluster of this node when `run` made it a server (its state file).
fn server_cluster(consul: &ConsulOpts) -> Option<String> {
    let root = Root::new(&consul.root);
    state::load(&root)
        .filter(|s| s.mode.is_server())
        .and_then(|s| s.cluster_id)
}

/// Deletes this node's heartbeats and releases its slot.
pub async fn registry_leave(opts: &GlobalOpts) -> Result<()> {
    let url = opts.cluster.registry_url()?;
    let root = Root::new(&opts.consul.root);
    let me = identity::of(&opts.identity).await?;
    let saved = state::load_for(&root, &url.to_string(), &me);
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();

    let (entries, record) = tokio::try_join!(list_heartbeats(store), read_cluster(store))?;
    let settings = record.map_or(opts.cluster.seed(), |(r, _)| {
        r.settings(opts.cluster.seed())
    });
    let slots = read_slots(store, settings.servers).await?;
    let mine: Vec<String> = entries
        .into_iter()
        .filter(|e| e.parsed.node == me.node)
        .map(|e| e.key)
        .collect();
    let requests = if mine.is_empty() {
        0
    } else {
        store.delete(&mine).await?
    };

    // Our slot is the one our claim id is in; without a state file, the one
    // that names this node.
    let claim = saved.as_ref().and_then(|s| s.claim_id.as_deref());
    let claims = Claims {
        store,
        me: &me,
        racy: false,
        cluster_id: None,
    };
    let mut released = Vec::new();
    for slot in &slots {
        if claims.release(slot, claim).await? {
            released.push(slot.index);
        }
    }
    if opts.output.json {
        println!(
            "{}",
            json!({ "node": me.node, "deleted": mine, "delete_requests": requests, "slots_released": released })
        );
    } else {
        println!(
            "{}: deleted {} heartbeats, released slots {released:?}",
            me.node,
            mine.len()
        );
    }
    Ok(())
}
