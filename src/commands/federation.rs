//! Federation across regions: a secondary datacenter's cluster names its
//! primary (`--primary-registry`), checked at its genesis and kept in its
//! cluster record, so every node follows it the way it follows `servers`.
//! Its servers join the primary's live servers over the WAN
//! (`retry_join_wan`, from the primary's registry), and their heartbeats
//! follow the primary's servers as they are replaced. Agents of a secondary
//! read nothing of the primary: `primary_datacenter` comes from their own
//! record.

use std::net::IpAddr;

use anyhow::{Result, bail};

use crate::cli::GlobalOpts;
use crate::error::usage;
use crate::model::{Mode, Primary, Settings};
use crate::registry::{Agents, RegistryUrl, read_cluster, read_view};

/// At a genesis with `--primary-registry`: the primary to record, checked
/// against the primary's own record. A primary never names a primary, the
/// datacenter names differ; the primary must exist (its servers made it).
pub async fn primary_for_genesis(opts: &GlobalOpts) -> Result<Option<Primary>> {
    let Some(raw) = opts
        .cluster
        .primary_registry
        .as_deref()
        .filter(|s| !s.is_empty())
    else {
        return Ok(None);
    };
    let url = RegistryUrl::parse(raw)?;
    if opts
        .cluster
        .registry
        .as_deref()
        .map(RegistryUrl::parse)
        .transpose()?
        .as_ref()
        == Some(&url)
    {
        return Err(usage(format!(
            "--primary-registry {url} is this cluster's own registry: name the primary datacenter's"
        )));
    }
    if opts.tls.secrets.is_some() {
        return Err(usage(
            "a secondary datacenter with --secrets would make its own gossip key, CA and ACLs, which \
             must be the primary's: not supported yet; give the primary's gossip key and CA with \
             --encrypt-file and --ca-file (and no --secrets)",
        ));
    }
    let opened = super::open_store(&url).await?;
    let Some((record, _)) = read_cluster(opened.store.as_ref()).await? else {
        bail!(
            "the primary registry {url} holds no cluster record: its servers make it at their genesis \
             (the boot unit tries again)"
        );
    };
    if let Some(p) = &record.primary {
        return Err(usage(format!(
            "{url} is itself a secondary datacenter (its primary is {}, datacenter {}): \
             --primary-registry must name the primary's registry",
            p.registry, p.datacenter
        )));
    }
    let Some(dc) = record.datacenter else {
        bail!(
            "the primary registry {url} records no datacenter yet (an older auto-consul made it): its \
             servers' next heartbeat writes it (the boot unit tries again)"
        );
    };
    if dc == opts.consul.datacenter {
        return Err(usage(format!(
            "datacenter `{dc}` is the primary's ({url}): a secondary needs a name of its own (--datacenter)"
        )));
    }
    Ok(Some(Primary {
        registry: url.to_string(),
        datacenter: dc,
    }))
}

/// The primary's live servers, from its registry (a secondary server's
/// `retry_join_wan`), as a node finds its own cluster's: slots and
/// heartbeats younger than the primary's expiry.
pub async fn primary_servers(primary: &Primary, seed: Settings) -> Result<Vec<IpAddr>> {
    let url = RegistryUrl::parse(&primary.registry)?;
    let opened = super::open_store(&url).await?;
    let view = read_view(opened.store.as_ref(), seed, Agents::Recent(0)).await?;
    let expiry = view.settings.expiry;
    Ok(crate::decision::join_list(
        &view,
        Mode::Server,
        "",
        IpAddr::from([0, 0, 0, 0]),
        expiry,
        &Default::default(),
    ))
}

/// `retry_join_wan` for a server of a secondary: the primary's live
/// servers; when its registry cannot be read, the list the config file at
/// `config` holds (a warning): the primary's loss does not stop a
/// secondary's servers, and a reboot meanwhile forgets no one.
pub async fn wan_join_list(
    primary: Option<&Primary>,
    mode: Mode,
    seed: Settings,
    config: &std::path::Path,
) -> Vec<IpAddr> {
    let Some(p) = primary.filter(|_| mode.is_server()) else {
        return Vec::new();
    };
    match primary_servers(p, seed).await {
        Ok(list) => list,
        Err(e) => {
            let kept = configured_wan(config);
            tracing::warn!(
                "the primary datacenter {}'s registry {} cannot be read for its servers: {e:#} \
                 (retry_join_wan keeps its {} address(es); the heartbeat tries again)",
                p.datacenter,
                p.registry,
                kept.len()
            );
            kept.iter().filter_map(|a| a.parse().ok()).collect()
        }
    }
}

/// The `retry_join_wan` of the config file at `config` (none when absent).
fn configured_wan(config: &std::path::Path) -> Vec<String> {
    super::rotate::config_json(config)
        .and_then(|v| {
            v["retry_join_wan"].as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// A server's heartbeat: an older record gets its datacenter (what a
/// secondary checks its name against); a secondary's server keeps
/// `retry_join_wan` to the primary's live servers and joins, over the WAN,
/// those it did not list before (the LAN rule, applied to the WAN).
/// Failures are warnings: the next heartbeat goes on.
pub async fn follow(
    opts: &GlobalOpts,
    root: &crate::install::Root,
    store: &dyn crate::registry::Store,
    record: Option<&(crate::model::ClusterRecord, String)>,
    saved: Option<&crate::state::State>,
) -> serde_json::Value {
    use serde_json::json;
    let Some((rec, etag)) = record.filter(|(r, _)| {
        saved.is_some_and(|s| s.mode.is_server() && s.cluster_id.as_deref() == Some(&r.cluster_id))
    }) else {
        return serde_json::Value::Null;
    };
    let mut out = json!({});
    if rec.datacenter.is_none() {
        let mut next = rec.clone();
        next.datacenter = Some(opts.consul.datacenter.clone());
        match super::rotate::write(store, &next, etag.clone()).await {
            Ok(_) => out["datacenter_recorded"] = json!(opts.consul.datacenter),
            Err(e) => tracing::warn!("recording the datacenter in the cluster record: {e:#}"),
        }
    }
    let Some(primary) = &rec.primary else {
        return out;
    };
    let servers = match primary_servers(primary, super::seed_settings(opts)).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(
                "the primary datacenter {}'s registry cannot be read: {e:#} (retry_join_wan kept; the next heartbeat tries again)",
                primary.datacenter
            );
            out["error"] = json!(format!("{e:#}"));
            return out;
        }
    };
    let wanted: Vec<String> = servers.iter().map(|a| a.to_string()).collect();
    let had = configured_wan(&root.path(&opts.consul.config_dir.join(super::run::CONFIG_FILE)));
    out["retry_join_wan"] = json!(wanted);
    if wanted == had || wanted.is_empty() {
        return out;
    }
    if let Err(e) = super::rotate::edit_config(opts, root, |v| {
        v["retry_join_wan"] = json!(wanted);
    }) {
        tracing::warn!("could not update retry_join_wan: {e:#}");
        return out;
    }
    tracing::warn!("retry_join_wan is now [{}]", wanted.join(", "));
    // Joining takes agent:write on this node: the management token a
    // server whose secrets auto-consul made holds, else the token file's.
    let token = match &saved.and_then(|s| s.cluster_id.clone()) {
        Some(cluster) if opts.tls.acl_token_file.is_none() => {
            super::management_token(opts, cluster).await.ok().flatten()
        }
        _ => None,
    };
    let mut joined = Vec::new();
    for address in servers.iter().filter(|a| !had.contains(&a.to_string())) {
        match crate::agent::join_pool(
            opts.tls.acl_token_file.as_deref(),
            token.as_deref(),
            *address,
            true,
        )
        .await
        {
            Ok(crate::agent::Joined::Yes) => joined.push(address.to_string()),
            Ok(other) => tracing::warn!("joining {address} over the WAN: {other:?}"),
            Err(e) => tracing::warn!("joining {address} over the WAN: {e:#}"),
        }
    }
    out["joined_wan"] = json!(joined);
    out
}
