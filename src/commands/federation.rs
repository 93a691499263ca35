//! Federation across regions: a secondary datacenter's cluster names its
//! primary (`--primary-registry`), checked at its genesis and kept in its
//! cluster record, so every node follows it the way it follows `servers`.
//! Its servers join the primary's live servers over the WAN
//! (`retry_join_wan`, from the primary's registry), and their heartbeats
//! follow the primary's servers as they are replaced. Agents of a secondary
//! read nothing of the primary: `primary_datacenter` comes from their own
//! record.
//!
//! Secrets (`--secrets` on both sides): the gossip key and the CA are the
//! primary's. A secondary's genesis copies them (at the generations the
//! primary's record says) into its own store, so its agents read only
//! their own region's store and its servers sign `server.<dc>.<domain>`
//! with the primary's CA; its heartbeats copy a rotation's new generations
//! the same way. The primary's servers make an ACL replication token once;
//! the secondary's servers read it (`acl.tokens.replication`) and, since a
//! secondary's Consul makes no initial management token, make their own
//! management token with it (local to their datacenter).

use std::net::IpAddr;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cli::{ClusterOpts, ConsulOpts, SecretOpts};
use crate::error::usage;
use crate::model::{
    CaGeneration, ClusterRecord, Generation, Mode, Primary, SecondaryReport, SecretsAt, Settings,
};
use crate::registry::{Agents, RegistryUrl, read_cluster, read_view};
use crate::secrets::{Secret, SecretStore, SecretsUrl};

/// Where a primary server records that it made the replication token in
/// Consul (its cluster id): made once, not asked at each heartbeat.
const REPLICATION_MADE: &str = "/var/lib/auto-consul/replication-token-made";
/// Where a secondary's server records that its datacenter's management
/// token is in Consul (its cluster id).
const SECONDARY_MANAGEMENT_MADE: &str = "/var/lib/auto-consul/secondary-management-token-made";
/// A secondary's leader: the report it last wrote to its primary, and
/// where (one line).
const REPORTED: &str = "/var/lib/auto-consul/reported-to-primary";

/// The name of cluster `cluster`'s ACL replication token (its servers
/// make it; a secondary's servers read it).
pub fn replication_token_name(cluster: &str) -> String {
    format!("{cluster}/server/replication-token")
}

/// This cluster's secrets store as its record keeps it (`--secrets`, and
/// the region of an SSM store): what a secondary's servers read.
pub async fn secrets_at(tls: &SecretOpts) -> Result<Option<SecretsAt>> {
    Ok(match &tls.secrets {
        None | Some(SecretsUrl::None) => None,
        Some(url @ SecretsUrl::Dir { .. }) => Some(SecretsAt {
            url: url.to_string(),
            region: None,
        }),
        Some(url @ SecretsUrl::Ssm { .. }) => Some(SecretsAt {
            url: url.to_string(),
            region: crate::aws::load()
                .await?
                .region()
                .map(|r| r.as_ref().to_string()),
        }),
    })
}

/// Opens another cluster's secrets store (in its region).
async fn open_secrets(at: &SecretsAt) -> Result<Box<dyn SecretStore>> {
    let url = SecretsUrl::parse(&at.url)?;
    crate::secrets::open_in(&url, at.region.as_deref())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the primary's record names no secrets store"))
}

/// The primary's registry, read in its bucket's region.
async fn open_primary(primary: &Primary) -> Result<super::Opened> {
    let url = RegistryUrl::parse(&primary.registry)?;
    super::open_store_in(&url, primary.region.as_deref()).await
}

/// A secondary's genesis: the primary named by `--primary-registry`,
/// checked against the primary's own record, and that record. A primary
/// never names a primary, the datacenter names differ; the primary must
/// exist (its servers made it), and both keep secrets or neither does.
pub async fn primary_for_genesis(
    cluster_opts: &ClusterOpts,
    consul_opts: &ConsulOpts,
    tls: &SecretOpts,
) -> Result<Option<(Primary, ClusterRecord)>> {
    let Some(raw) = cluster_opts
        .primary_registry
        .as_deref()
        .filter(|s| !s.is_empty())
    else {
        return Ok(None);
    };
    let url = RegistryUrl::parse(raw)?;
    if cluster_opts
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
    // The primary's bucket may be in another region: asked once, here,
    // and recorded.
    let region = match &url {
        RegistryUrl::S3 { bucket, .. } => {
            Some(crate::registry::S3Store::bucket_region(&crate::aws::load().await?, bucket).await?)
        }
        RegistryUrl::File { .. } => None,
    };
    let mut primary = Primary {
        registry: url.to_string(),
        datacenter: String::new(),
        region,
    };
    let opened = open_primary(&primary).await?;
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
    let Some(dc) = record.datacenter.clone() else {
        bail!(
            "the primary registry {url} records no datacenter yet (an older auto-consul made it): its \
             servers' next heartbeat writes it (the boot unit tries again)"
        );
    };
    if dc == consul_opts.datacenter {
        return Err(usage(format!(
            "datacenter `{dc}` is the primary's ({url}): a secondary needs a name of its own (--datacenter)"
        )));
    }
    let ours = tls.secrets.as_ref().filter(|s| **s != SecretsUrl::None);
    match (&record.secrets, ours) {
        (Some(at), None) => {
            return Err(usage(format!(
                "the primary {url} keeps its gossip key and CA in {}: a secondary shares them, so it \
                 needs a secrets store of its own to copy them into (--secrets)",
                at.url
            )));
        }
        (None, Some(s)) => bail!(
            "the primary {url} records no secrets store, and this cluster would keep its secrets in {s}: \
             a secondary's gossip key and CA must be the primary's (start the primary with --secrets; an \
             older primary's servers record theirs at their next heartbeat, and the boot unit tries again)"
        ),
        _ => {}
    }
    if record.gossip_key.is_some_and(|g| g.rotation.is_some())
        || record.ca.is_some_and(|c| c.rotation.is_some())
    {
        bail!(
            "the primary {url} is rotating its gossip key or CA: a secondary's genesis waits for the \
             rotation to end (the boot unit tries again)"
        );
    }
    primary.datacenter = dc;
    Ok(Some((primary, record)))
}

/// A secondary's genesis with secrets: copies the primary's gossip key and
/// CA (at the generations `primary`'s record uses) into this cluster's
/// store under its own names, create-only; returns the generations its
/// record starts at. A copy already there (an interrupted genesis) must be
/// the primary's.
pub async fn copy_shared(
    own: &dyn SecretStore,
    cluster: &str,
    primary: &ClusterRecord,
) -> Result<(Option<Generation>, Option<CaGeneration>)> {
    let at = primary
        .secrets
        .as_ref()
        .context("the primary's record names no secrets store")?;
    let theirs = open_secrets(at).await?;
    let gossip = primary.gossip_key.unwrap_or_default().generation.max(1);
    let ca = primary.ca.unwrap_or_default().signing();
    copy_generations(
        theirs.as_ref(),
        &primary.cluster_id,
        own,
        cluster,
        &[
            (Secret::GossipKey, gossip),
            (Secret::Ca, ca),
            (Secret::CaCert, ca),
        ],
    )
    .await?;
    Ok((
        (gossip > 1).then_some(Generation {
            generation: gossip,
            rotation: None,
        }),
        (ca > 1).then_some(CaGeneration {
            generation: ca,
            rotation: None,
        }),
    ))
}

/// Copies each `(secret, generation)` of cluster `from_cluster` in store
/// `from` to the same generation of cluster `to_cluster` in store `to`,
/// create-only; a copy already there must hold the same value.
async fn copy_generations(
    from: &dyn SecretStore,
    from_cluster: &str,
    to: &dyn SecretStore,
    to_cluster: &str,
    which: &[(Secret, u32)],
) -> Result<()> {
    let reads = futures::future::try_join_all(which.iter().map(|(s, g)| {
        let name = crate::secrets::generation_name(from_cluster, *s, *g);
        async move { from.get(&name).await.map(|v| (name, v)) }
    }))
    .await?;
    let writes = which.iter().zip(reads).map(|((s, g), (name, value))| async move {
        let Some(value) = value else {
            bail!(
                "the primary's secret {} is missing: its servers make it (the boot unit tries again)",
                from.shown(&name)
            );
        };
        let mine = crate::secrets::generation_name(to_cluster, *s, *g);
        if to.create(&mine, &value).await? {
            tracing::info!("copied the primary's {} to {}", from.shown(&name), to.shown(&mine));
            return Ok(());
        }
        if to.get(&mine).await?.map(|v| v.trim().to_string()) != Some(value.trim().to_string()) {
            return Err(usage(format!(
                "secret {} is not the primary's {}: a secondary runs with the primary's; delete it so \
                 the copy is made again",
                to.shown(&mine),
                from.shown(&name)
            )));
        }
        Ok(())
    });
    futures::future::try_join_all(writes).await?;
    Ok(())
}

/// What a secondary's server takes from the primary: its live servers
/// (`retry_join_wan`: the registry's slots and heartbeats younger than the
/// primary's expiry, less the instances EC2 says are gone, asked in the
/// primary's region), with `token` the replication token its servers made,
/// and the primary's record.
pub struct FromPrimary {
    pub servers: Vec<IpAddr>,
    pub replication: Option<String>,
    pub record: Option<ClusterRecord>,
}

/// Reads [`FromPrimary`] (the replication token only when `token`).
pub async fn from_primary(primary: &Primary, seed: Settings, token: bool) -> Result<FromPrimary> {
    let opened = open_primary(primary).await?;
    let view = read_view(opened.store.as_ref(), seed, Agents::Recent(0)).await?;
    let expiry = view.settings.expiry;
    let not_running = match &opened.aws {
        Some(aws) => {
            crate::ec2::not_running(aws, &crate::decision::join_candidates(&view, "", expiry)).await
        }
        None => Default::default(),
    };
    let servers = crate::decision::join_list(
        &view,
        Mode::Server,
        "",
        IpAddr::from([0, 0, 0, 0]),
        expiry,
        &not_running,
    );
    let record = view.record().cloned();
    let replication = match record
        .as_ref()
        .and_then(|r| r.secrets.as_ref().map(|s| (r, s)))
    {
        Some((r, at)) if token => open_secrets(at)
            .await?
            .get(&replication_token_name(&r.cluster_id))
            .await?
            .map(|t| t.trim().to_string()),
        _ => None,
    };
    Ok(FromPrimary {
        servers,
        replication,
        record,
    })
}

/// At `run`, for a server of a secondary: `retry_join_wan` and
/// `acl.tokens.replication` from the primary; when its registry or store
/// cannot be read, what the config file at `config` holds (a warning): the
/// primary's loss does not stop a secondary's servers, and a reboot
/// meanwhile forgets nothing.
pub async fn at_run(
    cluster: &ClusterOpts,
    tls: &SecretOpts,
    primary: Option<&Primary>,
    mode: Mode,
    config: &std::path::Path,
) -> (Vec<IpAddr>, Option<String>) {
    let Some(p) = primary.filter(|_| mode.is_server()) else {
        return (Vec::new(), None);
    };
    let kept = configured(config);
    let secrets = tls.secrets.as_ref().is_some_and(|s| *s != SecretsUrl::None);
    match from_primary(p, cluster.seed(), secrets).await {
        Ok(got) => (got.servers, got.replication.or(kept.replication)),
        Err(e) => {
            tracing::warn!(
                "the primary datacenter {}'s registry {} cannot be read for its servers: {e:#} \
                 (retry_join_wan keeps its {} address(es); the heartbeat tries again)",
                p.datacenter,
                p.registry,
                kept.wan.len()
            );
            (
                kept.wan.iter().filter_map(|a| a.parse().ok()).collect(),
                kept.replication,
            )
        }
    }
}

/// What a secondary server's config file holds of the primary.
struct Configured {
    wan: Vec<String>,
    replication: Option<String>,
}

/// The `retry_join_wan` and `acl.tokens.replication` of the config file
/// at `config` (none when absent).
fn configured(config: &std::path::Path) -> Configured {
    let v = super::rotate::config_json(config).unwrap_or_default();
    Configured {
        wan: v["retry_join_wan"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        replication: v["acl"]["tokens"]["replication"]
            .as_str()
            .map(str::to_string),
    }
}

/// The token a server writes ACL tokens and policies with. In a primary,
/// its management token. In a secondary, the primary's replication token
/// (once its config holds it): policies are global, and Consul writes them
/// in the primary (agent/consul/acl_endpoint.go, `PolicySet` forwards to
/// the primary datacenter, which resolves the token), where a token local
/// to the secondary does not exist; the replication token is global and
/// may write any token or policy (`acl = "write"`).
pub fn acl_writer(
    consul: &ConsulOpts,
    root: &crate::install::Root,
    record: &ClusterRecord,
    management: String,
) -> String {
    if record.primary.is_none() {
        return management;
    }
    configured(&root.path(&consul.config_dir.join(super::run::CONFIG_FILE)))
        .replication
        .unwrap_or(management)
}

/// Whether the marker file at `path` names cluster `cluster`.
pub(super) fn made_for(root: &crate::install::Root, path: &str, cluster: &str) -> bool {
    std::fs::read_to_string(root.path(std::path::Path::new(path)))
        .is_ok_and(|c| c.trim() == cluster)
}

/// Writes the marker file at `path`: cluster `cluster`'s thing is made.
pub(super) fn mark_made(root: &crate::install::Root, path: &str, cluster: &str) {
    if let Err(e) = crate::install::write_atomic(
        root,
        &crate::install::FileSpec {
            path: path.into(),
            contents: format!("{cluster}\n"),
            mode: 0o644,
            owner: None,
        },
    ) {
        tracing::warn!("could not write {path}: {e:#}");
    }
}

/// A server's heartbeat: an older record gets its datacenter (what a
/// secondary checks its name against) and its secrets store (what a
/// secondary copies from); a primary's server makes the replication token
/// once; a secondary's server keeps `retry_join_wan` to the primary's
/// live servers and joins, over the WAN, those it did not list before
/// (the LAN rule, applied to the WAN), takes the replication token, makes
/// its datacenter's management token with it, and copies the primary's
/// rotations. Failures are warnings: the next heartbeat goes on.
pub async fn follow(
    cluster_opts: &ClusterOpts,
    consul: &ConsulOpts,
    tls: &SecretOpts,
    root: &crate::install::Root,
    store: &dyn crate::registry::Store,
    record: Option<&(ClusterRecord, String)>,
    saved: Option<&crate::state::State>,
) -> Value {
    let Some((rec, etag)) = record.filter(|(r, _)| {
        saved.is_some_and(|s| s.mode.is_server() && s.cluster_id.as_deref() == Some(&r.cluster_id))
    }) else {
        return Value::Null;
    };
    let mut out = json!({});
    let mut next = rec.clone();
    if rec.datacenter.is_none() {
        next.datacenter = Some(consul.datacenter.clone());
    }
    if rec.secrets.is_none() {
        next.secrets = secrets_at(tls).await.unwrap_or_else(|e| {
            tracing::warn!("the secrets store's region: {e:#}");
            None
        });
    }
    let mut etag = etag.clone();
    if next.datacenter != rec.datacenter || next.secrets != rec.secrets {
        match super::rotate::write(store, &next, etag.clone()).await {
            Ok(e) => {
                etag = e;
                out["recorded"] = json!({"datacenter": next.datacenter, "secrets": next.secrets});
            }
            Err(e) => {
                tracing::warn!("recording the datacenter and secrets in the cluster record: {e:#}")
            }
        }
    }
    let cluster = rec.cluster_id.as_str();
    let Some(primary) = &rec.primary else {
        out["replication_token"] =
            make_replication_token(cluster_opts, consul, tls, root, cluster).await;
        return out;
    };
    let config = root.path(&consul.config_dir.join(super::run::CONFIG_FILE));
    let had = configured(&config);
    let secrets = tls.secrets.as_ref().is_some_and(|s| *s != SecretsUrl::None);
    let got = match from_primary(
        primary,
        cluster_opts.seed(),
        secrets && had.replication.is_none(),
    )
    .await
    {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(
                "the primary datacenter {}'s registry cannot be read: {e:#} (retry_join_wan kept; the next heartbeat tries again)",
                primary.datacenter
            );
            out["error"] = json!(format!("{e:#}"));
            return out;
        }
    };
    // The management token (agent:write for joins, a reload, this
    // datacenter's token made in Consul), read only when one of those is
    // due: not at every heartbeat.
    let changed = got
        .servers
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        != had.wan
        && !got.servers.is_empty();
    let due =
        changed || got.replication.is_some() || !made_for(root, SECONDARY_MANAGEMENT_MADE, cluster);
    let management = match tls.acl_token_file {
        None if due => super::management_token(cluster_opts, consul, tls, cluster)
            .await
            .ok()
            .flatten(),
        _ => None,
    };
    out["retry_join_wan"] = json!(
        got.servers
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
    );
    out["joined_wan"] = follow_wan(
        consul,
        tls,
        root,
        &got.servers,
        &had.wan,
        management.as_deref(),
    )
    .await;
    if let Some(token) = &got.replication {
        match super::rotate::edit_config(consul, root, |v| {
            v["acl"]["tokens"]["replication"] = json!(token);
        }) {
            Ok(()) => {
                tracing::warn!("acl.tokens.replication is now the primary's replication token");
                super::rotate::reload_consul(root, management.as_deref()).await;
                out["replication_token"] = json!("configured");
            }
            Err(e) => tracing::warn!("could not write acl.tokens.replication: {e:#}"),
        }
    }
    let replication = got.replication.or(had.replication);
    out["management_token"] =
        secondary_management(root, cluster, replication.as_deref(), management.as_deref()).await;
    if let (Some(theirs), true) = (&got.record, secrets) {
        out["rotations"] = copy_rotations(tls, store, &next, etag, theirs).await;
    }
    out
}

/// A secondary's leader tells its primary where its CA rotation stands
/// (`secondaries/<datacenter>` in the primary's registry, a
/// [`SecondaryReport`]): the step its record is at and how many of its live
/// nodes have not done it. The primary's leader goes on from a step only
/// once it is done here too ([`super::rotate::drive_ca`]). While a
/// rotation is under way the leader writes at each of its heartbeats (so a
/// report a former leader wrote from an older record is soon replaced);
/// otherwise only when it changed from the last one this node wrote (kept
/// in a local file): a secondary registers at its leader's first heartbeat.
/// `record` is this node's own cluster's.
pub async fn report_to_primary(
    root: &crate::install::Root,
    store: &dyn crate::registry::Store,
    record: Option<&(ClusterRecord, String)>,
    leads: bool,
) -> Value {
    let Some((rec, _)) = record.filter(|_| leads) else {
        return Value::Null;
    };
    let (Some(primary), Some(dc)) = (&rec.primary, rec.datacenter.as_deref()) else {
        return Value::Null;
    };
    let ca = rec.ca.unwrap_or_default();
    let behind = match ca.rotation {
        Some(step) => match super::rotate::ca_step_behind(store, rec, step, ca.generation).await {
            Ok(b) => b.len() as u32,
            Err(e) => return json!({"error": format!("{e:#}")}),
        },
        None => 0,
    };
    let report = SecondaryReport {
        datacenter: dc.to_string(),
        cluster_id: rec.cluster_id.clone(),
        ca_generation: ca.generation,
        ca_step: ca.rotation,
        behind,
    };
    let body = json!(report).to_string();
    let stamp = format!("{} {body}", primary.registry);
    if ca.rotation.is_none() && made_for(root, REPORTED, &stamp) {
        return Value::Null;
    }
    let key = format!("{}{dc}", super::rotate::SECONDARIES);
    let put = async {
        let opened = open_primary(primary).await?;
        match opened
            .store
            .put(&key, body.into_bytes(), crate::registry::Condition::None)
            .await?
        {
            crate::registry::PutOutcome::Written(_) => Ok(()),
            other => bail!("the write's outcome: {other:?}"),
        }
    };
    match put.await {
        Ok(()) => {
            mark_made(root, REPORTED, &stamp);
            json!(report)
        }
        Err(e) => {
            tracing::warn!(
                "could not report to the primary datacenter {} at {}/{key}: {e:#} (its CA rotations \
                 wait for this report; the servers' role needs s3:PutObject there: the module's \
                 primary_registry policy; the next heartbeat tries again)",
                primary.datacenter,
                primary.registry
            );
            json!({"error": format!("{e:#}")})
        }
    }
}

/// A secondary's server: rewrites `retry_join_wan` to `servers` when they
/// changed from `had`, and joins the new ones over the WAN (with the
/// management token, agent:write on this node; else the token file's).
async fn follow_wan(
    consul: &ConsulOpts,
    tls: &SecretOpts,
    root: &crate::install::Root,
    servers: &[IpAddr],
    had: &[String],
    management: Option<&str>,
) -> Value {
    let wanted: Vec<String> = servers.iter().map(|a| a.to_string()).collect();
    if wanted == had || wanted.is_empty() {
        return json!([]);
    }
    if let Err(e) = super::rotate::edit_config(consul, root, |v| {
        v["retry_join_wan"] = json!(wanted);
    }) {
        tracing::warn!("could not update retry_join_wan: {e:#}");
        return json!([]);
    }
    tracing::warn!("retry_join_wan is now [{}]", wanted.join(", "));
    let mut joined = Vec::new();
    for address in servers.iter().filter(|a| !had.contains(&a.to_string())) {
        match crate::agent::join_pool(tls.acl_token_file.as_deref(), management, *address, true)
            .await
        {
            Ok(crate::agent::Joined::Yes) => joined.push(address.to_string()),
            Ok(other) => tracing::warn!("joining {address} over the WAN: {other:?}"),
            Err(e) => tracing::warn!("joining {address} over the WAN: {e:#}"),
        }
    }
    json!(joined)
}

/// A primary's server, once per cluster: the ACL replication token in the
/// secrets store (create-only: every server reads the first one's) and in
/// Consul, global, with the rules Consul's federation guide gives it.
async fn make_replication_token(
    cluster_opts: &ClusterOpts,
    consul: &ConsulOpts,
    tls: &SecretOpts,
    root: &crate::install::Root,
    cluster: &str,
) -> Value {
    let Some(url) = tls.secrets.as_ref().filter(|s| **s != SecretsUrl::None) else {
        return Value::Null;
    };
    if made_for(root, REPLICATION_MADE, cluster) {
        return Value::Null;
    }
    let made = async {
        let store = crate::secrets::open(url)
            .await?
            .context("no secrets store")?;
        let name = replication_token_name(cluster);
        let fresh = uuid::Uuid::new_v4().to_string();
        let secret = if store.create(&name, &fresh).await? {
            tracing::info!("made {}", store.shown(&name));
            fresh
        } else {
            store
                .get(&name)
                .await?
                .with_context(|| format!("{} exists but cannot be read", store.shown(&name)))?
                .trim()
                .to_string()
        };
        let management = super::management_token(cluster_opts, consul, tls, cluster)
            .await?
            .context("no management token")?;
        crate::agent::ensure_replication_token(&management, &secret).await
    };
    made_once(
        root,
        REPLICATION_MADE,
        cluster,
        "the ACL replication token",
        made,
    )
    .await
}

/// Awaits `made` (whether it created a token in Consul); on success marks
/// it made for cluster `cluster` at `marker`; what to report.
async fn made_once(
    root: &crate::install::Root,
    marker: &str,
    cluster: &str,
    what: &str,
    made: impl std::future::Future<Output = Result<bool>>,
) -> Value {
    match made.await {
        Ok(created) => {
            mark_made(root, marker, cluster);
            json!({"in_consul": true, "created": created})
        }
        Err(e) => {
            tracing::warn!("{what} is not in Consul yet: {e:#} (the next heartbeat tries again)");
            json!({"error": format!("{e:#}")})
        }
    }
}

/// A secondary's server, once per cluster: a secondary's Consul makes no
/// initial management token (agent/consul/leader.go, `initializeACLs`,
/// bootstraps ACLs in the primary datacenter only), so its management
/// token (made at genesis in its own store) is made in Consul with the
/// replication token, local to this datacenter.
async fn secondary_management(
    root: &crate::install::Root,
    cluster: &str,
    replication: Option<&str>,
    management: Option<&str>,
) -> Value {
    let (Some(replication), Some(management)) = (replication, management) else {
        return Value::Null;
    };
    if made_for(root, SECONDARY_MANAGEMENT_MADE, cluster) {
        return Value::Null;
    }
    made_once(
        root,
        SECONDARY_MANAGEMENT_MADE,
        cluster,
        "this datacenter's management token",
        crate::agent::ensure_local_management_token(replication, management),
    )
    .await
}

/// A secondary's server: the primary's rotations of the gossip key and the
/// CA reach this datacenter. The generations the primary's record (`theirs`)
/// uses now are copied into this cluster's store, then its record says
/// the same generations and steps, which its nodes follow as in any
/// cluster (keyrings and CA files at boot, CA files and certificates at
/// each heartbeat). The primary's leader drives the steps: Consul's keyring
/// operations reach every datacenter (agent/consul/internal_endpoint.go,
/// `KeyringOperation` forwards to each), and this datacenter's leader
/// drives neither.
async fn copy_rotations(
    tls: &SecretOpts,
    store: &dyn crate::registry::Store,
    ours: &ClusterRecord,
    etag: String,
    theirs: &ClusterRecord,
) -> Value {
    if ours.gossip_key == theirs.gossip_key && ours.ca == theirs.ca {
        return Value::Null;
    }
    let copied = async {
        let (Some(own_url), Some(at)) = (tls.secrets.as_ref(), theirs.secrets.as_ref()) else {
            bail!("no secrets store to copy the primary's into");
        };
        let own = crate::secrets::open(own_url)
            .await?
            .context("no secrets store")?;
        let from = open_secrets(at).await?;
        let (gossip, other) =
            crate::secrets::gossip_generations(theirs.gossip_key.unwrap_or_default());
        let ca = theirs.ca.unwrap_or_default();
        let mut which: Vec<(Secret, u32)> = std::iter::once(gossip)
            .chain(other)
            .map(|g| (Secret::GossipKey, g))
            .chain(
                ca.trusted()
                    .into_iter()
                    .flat_map(|g| [(Secret::Ca, g), (Secret::CaCert, g)]),
            )
            .collect();
        which.sort_by_key(|(s, g)| (s.rel(), *g));
        which.dedup();
        copy_generations(
            from.as_ref(),
            &theirs.cluster_id,
            own.as_ref(),
            &ours.cluster_id,
            &which,
        )
        .await?;
        let mut next = ours.clone();
        next.gossip_key = theirs.gossip_key;
        next.ca = theirs.ca;
        super::rotate::write(store, &next, etag).await?;
        Ok(json!({"gossip_key": next.gossip_key, "ca": next.ca}))
    };
    match copied.await {
        Ok(v) => {
            tracing::warn!("the primary's gossip key and CA generations copied: {v}");
            v
        }
        Err(e) => {
            tracing::warn!(
                "the primary's rotations are not copied yet: {e:#} (the next heartbeat tries again)"
            );
            json!({"error": format!("{e:#}")})
        }
    }
}
