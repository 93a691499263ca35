//! Nodes find servers again. `retry_join` is written at boot; once every
//! server it names has been replaced, a Consul restart would join nobody.
//! So each heartbeat keeps it current, and a local agent that knows no
//! leader is asked to join live servers at once.
//!
//! The live servers come from Consul itself while it knows a leader (its
//! Raft peers: no registry request, so an agent's heartbeat stays one
//! write), and from the registry when it does not (the servers' newest
//! heartbeats, as `run` reads them).

use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::Value;

use super::run::{CONFIG_FILE, has_raft_state};
use crate::agent::{self, AgentStatus, Joined};
use crate::cli::GlobalOpts;
use crate::decision;
use crate::identity::Identity;
use crate::install::{self, FileSpec, Root};
use crate::model::{Mode, Settings};
use crate::registry::{Agents, Store, read_view};

/// What the heartbeat did to find servers.
#[derive(Debug, Default, Clone)]
pub struct Rejoin {
    /// The live servers, and where they came from (`consul` or `registry`).
    pub servers: Vec<IpAddr>,
    pub source: Option<&'static str>,
    /// The new `retry_join`, when the config file was rewritten.
    pub rewritten: Option<Vec<String>>,
    /// The address the agent joined, when it knew no leader.
    pub joined: Option<IpAddr>,
}

/// Keeps `retry_join` current and, with no leader known, asks the agent
/// to join. Failures are warnings: the heartbeat itself went through.
pub async fn rejoin(
    opts: &GlobalOpts,
    root: &Root,
    store: &dyn Store,
    status: &AgentStatus,
    me: &Identity,
    seed: Settings,
    saved: Option<&crate::state::State>,
) -> Rejoin {
    let my_cluster = saved.and_then(|s| s.cluster_id.as_deref());
    let server = saved.is_some_and(|s| s.mode.is_server());
    let mut out = Rejoin::default();
    let config = opts.consul.config_dir.join(CONFIG_FILE);
    let on_disk = root.path(&config);
    // A node `run` never set up (a heartbeat by hand) has nothing to keep.
    if !on_disk.is_file() {
        return out;
    }
    let leaderless = status.leader.is_none();
    out.servers = if leaderless {
        out.source = Some("registry");
        match read_view(store, seed, Agents::Recent(0)).await {
            // The registry's servers may be another cluster's (this node's
            // was replaced): joining them would merge two clusters.
            Ok(view)
                if my_cluster
                    .is_some_and(|mine| view.record().is_some_and(|r| r.cluster_id != mine)) =>
            {
                tracing::warn!(
                    "the local Consul agent knows no leader, but the registry now holds another cluster than this node's ({}): \
                     not joining its servers; `run` at the next boot decides afresh",
                    my_cluster.unwrap_or_default()
                );
                Vec::new()
            }
            // A cluster that owes a restore: an agent joining now would
            // get certificates and registrations the restore replaces.
            Ok(view)
                if !server
                    && view
                        .record()
                        .and_then(|r| r.restore.as_ref())
                        .is_some_and(|p| p.state.open()) =>
            {
                tracing::warn!(
                    "the local Consul agent knows no leader, and cluster {} owes the restore of a snapshot: \
                     not joining until it is done (the next heartbeat looks again)",
                    view.record()
                        .map(|r| r.cluster_id.as_str())
                        .unwrap_or_default()
                );
                Vec::new()
            }
            Ok(view) => decision::join_list(
                &view,
                Mode::Server,
                &me.node,
                me.address,
                view.settings.expiry,
                &Default::default(),
            ),
            Err(e) => {
                tracing::warn!(
                    "the local Consul agent knows no leader, and the registry cannot be read for live servers: {e:#}"
                );
                Vec::new()
            }
        }
    } else {
        out.source = Some("consul");
        let mut seen = std::collections::HashSet::new();
        status
            .peers
            .iter()
            .map(|p| p.ip())
            .filter(|ip| *ip != me.address && seen.insert(*ip))
            .collect()
    };
    // DESIGN.md's one gate for `bootstrap: true`, kept in every rewrite:
    // once Raft data exists, or another server lives, the file no longer
    // says `bootstrap: true` (Consul would bootstrap alone again should its
    // Raft data go and only consul.service restart).
    let past_bootstrap = !out.servers.is_empty() || has_raft_state(root, &opts.consul.data_dir);
    if out.servers.is_empty() && !past_bootstrap {
        return out;
    }
    // Under the lock `run` takes to write the same file, and from the file
    // as it is now: a `run` in between is never undone.
    let rewritten = install::lock(root, "consul-config").and_then(|_lock| {
        let text = std::fs::read_to_string(&on_disk)?;
        rewrite_config(root, &config, &on_disk, &text, &out.servers)
    });
    match rewritten {
        Ok(new) => out.rewritten = new,
        Err(e) => tracing::warn!(
            "could not update retry_join in {}: {e:#}",
            on_disk.display()
        ),
    }
    if leaderless && !out.servers.is_empty() {
        // Joining takes agent:write on this node (agent_endpoint.go,
        // AgentJoin): a server whose secrets auto-consul made has the
        // management token; a node on its own token (--instance-tag) has
        // agent:write on itself, and its Consul config holds it.
        let own = super::node_tokens::own_from_config(&opts.consul, root);
        let token = match (&opts.tls.acl_token_file, my_cluster.filter(|_| server)) {
            (None, Some(cluster)) => {
                super::management_token(&opts.cluster, &opts.consul, &opts.tls, cluster)
                    .await
                    .map_err(|e| tracing::warn!("reading the management token to join with: {e:#}"))
                    .ok()
                    .flatten()
            }
            (None, None) => own,
            _ => None,
        };
        for address in &out.servers {
            match agent::join(
                opts.tls.acl_token_file.as_deref(),
                token.as_deref(),
                *address,
            )
            .await
            {
                Ok(Joined::Yes) => {
                    tracing::warn!(
                        "the local Consul agent knew no leader: it joined {address}, a live server"
                    );
                    out.joined = Some(*address);
                    break;
                }
                Ok(Joined::Denied) => {
                    tracing::warn!(
                        "the local Consul agent knows no leader, and its token may not make it join \
                         (agent:write): it finds the live servers at its next restart, from retry_join"
                    );
                    break;
                }
                Ok(Joined::Failed(why)) => {
                    tracing::warn!("the local Consul agent could not join {address}: {why}")
                }
                Err(e) => {
                    tracing::warn!("asking the local Consul agent to join {address}: {e:#}");
                    break;
                }
            }
        }
    }
    out
}

/// Writes `servers` (unless empty) as the addresses of `retry_join` in
/// Consul's config, keeping its other entries (the cloud auto-join one)
/// after them, and turns `bootstrap: true` off: the caller knows this node
/// is past its bootstrap. Keeps the file's mode and owner; `None` when
/// nothing changed.
fn rewrite_config(
    root: &Root,
    config: &Path,
    on_disk: &Path,
    text: &str,
    servers: &[IpAddr],
) -> anyhow::Result<Option<Vec<String>>> {
    let mut value: Value = serde_json::from_str(text)?;
    let Some(map) = value.as_object_mut() else {
        anyhow::bail!("it is not a JSON object");
    };
    let current: Vec<String> = map
        .get("retry_join")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let others = current.iter().filter(|s| s.parse::<IpAddr>().is_err());
    let wanted: Vec<String> = if servers.is_empty() {
        current.clone()
    } else {
        servers
            .iter()
            .map(|a| a.to_string())
            .chain(others.cloned())
            .collect()
    };
    let same = {
        let mut a = current.clone();
        let mut b = wanted.clone();
        a.sort();
        b.sort();
        a == b
    };
    let bootstraps = map.get("bootstrap") == Some(&Value::Bool(true));
    if same && !bootstraps {
        return Ok(None);
    }
    map.insert("retry_join".into(), serde_json::json!(wanted));
    if bootstraps {
        map.insert("bootstrap".into(), Value::Bool(false));
        tracing::info!(
            "{}: `bootstrap` is now false (this node is past its bootstrap: Raft state or other live servers)",
            config.display()
        );
    }
    let meta = std::fs::metadata(on_disk)?;
    let mut contents = serde_json::to_string_pretty(&value)?;
    contents.push('\n');
    install::write_atomic(
        root,
        &FileSpec {
            path: config.to_path_buf(),
            contents,
            mode: meta.mode() & 0o7777,
            owner: Some((meta.uid(), meta.gid())),
        },
    )?;
    tracing::info!(
        "retry_join in {} is now [{}]",
        config.display(),
        wanted.join(", ")
    );
    Ok(Some(wanted))
}
