//! A token per node (`--instance-tag`): every node's Consul runs with a
//! token whose policy names only that node (`agent::node_rules`), kept in
//! the secrets store as `<cluster>/node/<instance id>`, which in SSM is
//! tagged with that instance's ARN so that only the instance itself may
//! read it (the module's agent policy compares the tag with the caller's
//! `ec2:SourceInstanceARN`).
//!
//! The leader's heartbeat makes them ahead: each running instance EC2
//! lists with the cluster's tag gets its token in Consul first, then its
//! parameter (create-only), so a parameter that exists names a token that
//! exists and a booting node starts its Consul with a token Consul knows.
//! A node moves to its own token at `run` (read in the same round as the
//! other secrets) or, when it was made later, by its heartbeat. Once every
//! live node runs with its own, the leader deletes the shared agents'
//! token from Consul, and from then on a node never falls back to it.

use crate::cli::{ClusterOpts, ConsulOpts, GlobalOpts, SecretOpts};
use std::collections::BTreeSet;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::agent;
use crate::install::{FileSpec, Root};
use crate::secrets::{SecretStore, node_token_name};

/// Where the leader records the instances whose tokens it has made (lines
/// `<cluster id> <instance id>`), so later heartbeats ask nothing more of
/// them.
const MADE: &str = "/var/lib/auto-consul/node-tokens-made";
/// Where a node records which token its Consul runs with: `node` (its
/// own) or `shared` (the agents' token).
pub const KIND: &str = "/var/lib/auto-consul/agent-token-kind";
/// How many instances the leader makes tokens for at once.
const AT_ONCE: usize = 8;

/// How long the leader trusts its record that an instance's token exists
/// before it looks again (one read and one Consul request per instance):
/// a token revoked while its instance was stopped, or a parameter deleted
/// by hand, is made again within this.
const RECHECK_SECONDS: i64 = 3600;

/// The instances of `cluster` the leader has made tokens for (lines
/// `<cluster> <id> <unix time of the last check>`): each with whether that
/// check is recent (within [`RECHECK_SECONDS`]).
fn made_checked(root: &Root, cluster: &str) -> std::collections::BTreeMap<String, bool> {
    let now = chrono::Utc::now().timestamp();
    std::fs::read_to_string(root.path(std::path::Path::new(MADE)))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (c, id, at) = (f.next()?, f.next()?, f.next()?.parse::<i64>().ok()?);
            (c == cluster).then(|| (id.to_string(), (0..RECHECK_SECONDS).contains(&(now - at))))
        })
        .collect()
}

/// Records that the tokens of `ids` exist (this cluster's lines only: an
/// older cluster's are dropped); those checked before keep their time.
fn record_made(root: &Root, cluster: &str, ids: &BTreeSet<String>) {
    let before: std::collections::BTreeMap<String, String> =
        std::fs::read_to_string(root.path(std::path::Path::new(MADE)))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut f = l.split(' ');
                let (c, id, at) = (f.next()?, f.next()?, f.next()?);
                (c == cluster).then(|| (id.to_string(), at.to_string()))
            })
            .collect();
    // An id checked before keeps that time while it is recent; one whose
    // check was due has just been checked again.
    let recent = made_checked(root, cluster);
    let now = chrono::Utc::now().timestamp().to_string();
    let contents: String = ids
        .iter()
        .map(|id| {
            let at = before
                .get(id)
                .filter(|_| recent.get(id) == Some(&true))
                .unwrap_or(&now);
            format!("{cluster} {id} {at}\n")
        })
        .collect();
    note(root, MADE, &contents, "the node tokens made");
}

/// Where the leader records that the shared agents' token of a cluster is
/// deleted from Consul (the cluster id).
const SHARED_GONE: &str = "/var/lib/auto-consul/shared-agent-token-deleted";

fn shared_gone(root: &Root, cluster: &str) -> bool {
    std::fs::read_to_string(root.path(std::path::Path::new(SHARED_GONE)))
        .is_ok_and(|c| c.trim() == cluster)
}

fn record_shared_gone(root: &Root, cluster: &str) {
    note(
        root,
        SHARED_GONE,
        &format!("{cluster}\n"),
        "that the shared token is deleted",
    );
}

/// Writes one of this module's small state files; a failure is a warning
/// (`what` says what could not be recorded).
fn note(root: &Root, path: &str, contents: &str, what: &str) {
    let spec = FileSpec {
        path: path.into(),
        contents: contents.to_string(),
        mode: 0o644,
        owner: None,
    };
    if let Err(e) = crate::install::write_atomic(root, &spec) {
        tracing::warn!("could not record {what}: {e:#}");
    }
}

/// Which token this node's Consul runs with, as recorded.
pub fn kind(root: &Root) -> Option<String> {
    std::fs::read_to_string(root.path(std::path::Path::new(KIND)))
        .ok()
        .map(|k| k.trim().to_string())
}

/// The file recording which token this node's Consul runs with (`node`
/// or `shared`).
pub fn kind_file(kind: &str) -> FileSpec {
    FileSpec {
        path: KIND.into(),
        contents: format!("{kind}\n"),
        mode: 0o644,
        owner: None,
    }
}

/// Records which token this node's Consul runs with (see [`kind_file`]);
/// a failure is a warning.
pub fn record_kind(root: &Root, kind: &str) {
    note(
        root,
        KIND,
        &format!("{kind}\n"),
        "the kind of token Consul runs with",
    );
}

/// Reads node `instance_id`'s own token, checked: `None` when it is not
/// made yet. An agent's role may read it only when its tag names the
/// instance, so AWS answers AccessDenied for one not made yet (no tag to
/// match): taken as not made (and named in the wait's final error).
pub async fn read(
    store: &dyn SecretStore,
    cluster: &str,
    instance_id: &str,
) -> Result<Option<String>> {
    let name = node_token_name(cluster, instance_id);
    let got = match store.get(&name).await {
        Err(e) if e.downcast_ref::<crate::secrets::Denied>().is_some() => {
            tracing::debug!("{e:#}: taken as not made yet");
            return Ok(None);
        }
        got => got?,
    };
    match got {
        None => Ok(None),
        Some(v) if uuid::Uuid::parse_str(v.trim()).is_ok() => Ok(Some(v.trim().to_string())),
        Some(_) => bail!(
            "{} is not a token (a UUID): delete it so the cluster's leader makes it again",
            store.shown(&name)
        ),
    }
}

/// One pass of the leader's heartbeat: a token for every running instance
/// tagged `tag` that has none yet. What it did, for the heartbeat's
/// output.
pub async fn make_ahead(
    root: &Root,
    store: &dyn SecretStore,
    management: &str,
    cluster: &str,
    tag: &(String, String),
) -> Result<(Value, Vec<String>)> {
    let aws = crate::aws::load().await?;
    let instances = crate::ec2::tagged_running(&aws, &tag.0, &tag.1).await?;
    let checked = made_checked(root, cluster);
    // Every instance recorded stays recorded (and may be retired below);
    // those not checked recently are made sure of again.
    let mut made: BTreeSet<String> = checked.keys().cloned().collect();
    let todo: Vec<&(String, String)> = instances
        .iter()
        .filter(|(id, _)| checked.get(id) != Some(&true))
        .collect();
    let ids: Vec<String> = instances.iter().map(|(id, _)| id.clone()).collect();
    // Tokens of instances that left the running list: deleted once EC2
    // says they are terminated (or knows them no more); a stopped one keeps
    // its token for when it starts again.
    let gone: Vec<String> = made
        .iter()
        .filter(|id| !ids.contains(id))
        .cloned()
        .collect();
    let deleted = if gone.is_empty() {
        Vec::new()
    } else {
        retire(&aws, store, management, cluster, &gone, &mut made).await
    };
    if todo.is_empty() {
        if !deleted.is_empty() {
            record_made(root, cluster, &made);
        }
        return Ok((
            json!({"instances": instances.len(), "made": [], "deleted": deleted}),
            ids,
        ));
    }
    let mut created = Vec::new();
    let mut errors = Vec::new();
    for batch in todo.chunks(AT_ONCE) {
        let results = futures::future::join_all(
            batch
                .iter()
                .map(|(id, arn)| ensure_one(store, management, cluster, id, arn)),
        )
        .await;
        for ((id, _), r) in batch.iter().zip(results) {
            match r {
                Ok(new) => {
                    made.insert(id.clone());
                    if new {
                        created.push(id.clone());
                    }
                }
                Err(e) => {
                    tracing::warn!("the token of node {id} is not made yet: {e:#}");
                    errors.push(format!("{id}: {e:#}"));
                }
            }
        }
    }
    record_made(root, cluster, &made);
    if !created.is_empty() {
        tracing::info!(
            "made the tokens of {} node(s): {}",
            created.len(),
            created.join(", ")
        );
    }
    Ok((
        json!({"instances": instances.len(), "made": created, "errors": errors, "deleted": deleted}),
        ids,
    ))
}

/// Deletes the tokens (Consul, with their policies, and the store) of those
/// `gone` instances EC2 reports terminated or shutting down, or no longer
/// knows, and drops them from `made`; the ids deleted. Any failure leaves
/// the rest for the next heartbeat.
async fn retire(
    aws: &aws_config::SdkConfig,
    store: &dyn SecretStore,
    management: &str,
    cluster: &str,
    gone: &[String],
    made: &mut BTreeSet<String>,
) -> Vec<String> {
    use crate::ec2::Witness;
    let words = match crate::ec2::witness(aws, gone).await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("not retiring the tokens of gone nodes now: {e:#}");
            return Vec::new();
        }
    };
    let mut deleted = Vec::new();
    for id in gone {
        let over = match words.get(id) {
            Some(Witness::Unknown) => true,
            // Not while shutting down: its leave unit still leaves Consul
            // with the token.
            Some(Witness::Gone(state)) => state == "terminated",
            _ => false,
        };
        if !over {
            continue;
        }
        let done = async {
            if let Some(secret) = read(store, cluster, id).await? {
                agent::delete_node_token(management, id, &secret).await?;
                store.delete(&node_token_name(cluster, id)).await?;
            }
            Ok::<_, anyhow::Error>(())
        };
        match done.await {
            Ok(()) => {
                made.remove(id);
                deleted.push(id.clone());
            }
            Err(e) => tracing::warn!("the token of gone node {id} is not deleted yet: {e:#}"),
        }
    }
    if !deleted.is_empty() {
        tracing::info!(
            "deleted the tokens of {} terminated node(s): {}",
            deleted.len(),
            deleted.join(", ")
        );
    }
    deleted
}

/// Makes sure instance `id`'s token exists in Consul and in the store;
/// whether this call made it. The token goes into Consul before its
/// parameter is written, so a parameter names a token Consul has; a
/// server that loses the race to write it deletes the token it made and
/// takes the winner's.
async fn ensure_one(
    store: &dyn SecretStore,
    management: &str,
    cluster: &str,
    id: &str,
    arn: &str,
) -> Result<bool> {
    if let Some(secret) = read(store, cluster, id).await? {
        agent::ensure_node_token(management, id, &secret).await?;
        return Ok(false);
    }
    let fresh = uuid::Uuid::new_v4().to_string();
    agent::ensure_node_token(management, id, &fresh).await?;
    let name = node_token_name(cluster, id);
    if store.create_owned(&name, &fresh, arn).await? {
        return Ok(true);
    }
    agent::delete_token(management, &fresh).await?;
    let theirs = read(store, cluster, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{} vanished", store.shown(&name)))?;
    agent::ensure_node_token(management, id, &theirs).await?;
    Ok(false)
}

/// The instance whose own token this node runs with: with `--secrets`
/// and `--instance-tag`, a node named by its instance id (the Consul node
/// name its token's policy names) whose token auto-consul manages (no
/// `--acl-token-file`).
pub fn own_instance<'a>(
    tls: &SecretOpts,
    node: &str,
    instance_id: Option<&'a str>,
) -> Option<&'a str> {
    if tls.secrets.is_none() || tls.instance_tag.is_none() || tls.acl_token_file.is_some() {
        return None;
    }
    instance_id.filter(|id| *id == node)
}

/// A server's own token's parameter, made by itself (create-only; the
/// leader's heartbeat makes the token in Consul), or the one that exists.
pub async fn make_own(store: &dyn SecretStore, cluster: &str, id: &str) -> Result<Option<String>> {
    let name = node_token_name(cluster, id);
    let fresh = uuid::Uuid::new_v4().to_string();
    if store.create(&name, &fresh).await? {
        tracing::info!(
            "made {}: the leader's heartbeat makes it in Consul",
            store.shown(&name)
        );
        return Ok(Some(fresh));
    }
    read(store, cluster, id).await
}

/// At `run`, a node whose own token was not read: a server makes its
/// parameter itself (servers may; the leader's heartbeat then makes the
/// token in Consul: a server never waits for a leader, which may be the
/// very thing it boots to restore); an agent of a cluster whose shared
/// token is deleted waits for the leader to make it (`--token-wait`); an
/// agent of a cluster still moving to tokens per node starts with the
/// shared one and moves by its heartbeat.
pub async fn at_run(
    opts: &GlobalOpts,
    store: &dyn SecretStore,
    server: bool,
    shared_gone: bool,
    cluster: &str,
    id: &str,
    mut m: crate::secrets::Material,
) -> Result<crate::secrets::Material> {
    if m.node_token.is_some() {
        return Ok(m);
    }
    let name = node_token_name(cluster, id);
    if server {
        m.node_token = make_own(store, cluster, id).await?;
        return Ok(m);
    }
    if !shared_gone {
        return Ok(m);
    }
    let (k, v) = opts.tls.instance_tag.clone().unwrap_or_default();
    tracing::info!(
        "node {id} waits for its own token, which the leader's heartbeat makes for each running \
         instance tagged {k}={v} (up to {}s, --token-wait)",
        opts.waits.token_wait
    );
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_secs(opts.waits.token_wait);
    loop {
        if let Some(t) = read(store, cluster, id).await? {
            m.node_token = Some(t);
            return Ok(m);
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "node {id} has no token of its own after {}s ({} does not exist, or this instance's role \
                 may not read it): the cluster's leader makes one for each running instance tagged {k}={v}; \
                 check the instance's tags, that the cluster has a leader, and the role's grant on \
                 */node/* (docs/deploy.md); the boot unit tries again",
                opts.waits.token_wait,
                store.shown(&name)
            );
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

/// A node's heartbeat, when it runs with its own token or should: whether
/// its Consul does now (`None`: tokens per node do not apply to it). A
/// node still on the shared token reads its own (one read per heartbeat
/// until the leader has made it), writes it as `acl.tokens.agent` and has
/// Consul reload it (ACL tokens are reloadable configuration).
pub async fn follow(
    cluster_opts: &ClusterOpts,
    consul: &ConsulOpts,
    tls: &SecretOpts,
    root: &Root,
    saved: &crate::state::State,
) -> Option<bool> {
    let own = own_instance(tls, &saved.node, saved.instance_id.as_deref())?;
    if kind(root).as_deref() == Some("node") {
        return Some(true);
    }
    let (url, cluster) = (tls.secrets.as_ref()?, saved.cluster_id.as_deref()?);
    let switched = async {
        let store = crate::secrets::open(url)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no secrets store"))?;
        let Some(token) = read(store.as_ref(), cluster, own).await? else {
            return Ok(false);
        };
        super::rotate::set_config_token(consul, root, "agent", &token)?;
        record_kind(root, "node");
        let management = if saved.mode.is_server() {
            super::management_token(cluster_opts, consul, tls, cluster)
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        super::rotate::reload_consul(root, management.as_deref()).await;
        tracing::warn!("this node's Consul now runs with its own token");
        Ok::<_, anyhow::Error>(true)
    };
    match switched.await {
        Ok(on) => Some(on),
        Err(e) => {
            tracing::warn!(
                "could not move to this node's own token: {e:#} (the next heartbeat tries again)"
            );
            Some(false)
        }
    }
}

/// The leader's heartbeat: tokens made ahead for every running instance
/// with the cluster's tag, then, once every live node's newest heartbeat
/// says it runs with its own token, the shared agents' token deleted from
/// Consul and the record marked `per_node` (nodes never fall back to it
/// again). Failures are warnings: the next heartbeat goes on.
pub async fn lead(
    tls: &SecretOpts,
    root: &Root,
    registry: &dyn crate::registry::Store,
    record: &(crate::model::ClusterRecord, String),
    management: &str,
) -> Value {
    let (Some(url), Some(tag)) = (&tls.secrets, &tls.instance_tag) else {
        return Value::Null;
    };
    let (record, etag) = record;
    let pass = async {
        let store = crate::secrets::open(url)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no secrets store"))?;
        let (mut out, instances) =
            make_ahead(root, store.as_ref(), management, &record.cluster_id, tag).await?;
        let shared = record.agent_token.unwrap_or_default();
        let shared_name = crate::secrets::generation_name(
            &record.cluster_id,
            crate::secrets::Secret::AgentToken,
            shared.generation,
        );
        if shared.per_node {
            // Marked before it was deleted: a pass stopped in between is
            // finished here, once per cluster.
            if !shared_gone(root, &record.cluster_id) {
                if let Some(secret) = store.get(&shared_name).await? {
                    agent::delete_token(management, secret.trim()).await?;
                }
                record_shared_gone(root, &record.cluster_id);
            }
            return Ok(out);
        }
        if shared.rotation.is_some() {
            return Ok(out);
        }
        // Behind: a live node not on its own token, or a running instance
        // of the cluster with no heartbeat yet (booted on the shared one,
        // perhaps, and not heard from).
        let live = super::rotate::live_bodies(registry, record).await?;
        let mut behind: BTreeSet<String> = live
            .iter()
            .filter(|(_, b)| b.as_ref().and_then(|b| b.node_token) != Some(true))
            .map(|(n, _)| n.clone())
            .collect();
        behind.extend(instances.into_iter().filter(|id| !live.contains_key(id)));
        if !behind.is_empty() {
            let behind: Vec<String> = behind.into_iter().collect();
            out["shared_token"] = json!(format!(
                "kept: {} live node(s) still run with it: {}",
                behind.len(),
                behind.join(", ")
            ));
            return Ok(out);
        }
        // The record first (from a fresh read: a rotation may have written
        // it in this heartbeat), so no server makes the shared token again
        // once it is deleted; then the token.
        let (mut next, fresh_etag) = crate::registry::read_cluster(registry)
            .await?
            .filter(|(r, _)| r.cluster_id == record.cluster_id)
            .unwrap_or((record.clone(), etag.clone()));
        next.agent_token = Some(crate::model::TokenGeneration {
            per_node: true,
            ..next.agent_token.unwrap_or(shared)
        });
        super::rotate::write(registry, &next, fresh_etag).await?;
        if let Some(secret) = store.get(&shared_name).await? {
            agent::delete_token(management, secret.trim()).await?;
        }
        record_shared_gone(root, &record.cluster_id);
        tracing::warn!(
            "every live node runs with its own token: the shared agents' token is deleted from Consul"
        );
        out["shared_token"] = json!("deleted");
        Ok::<_, anyhow::Error>(out)
    };
    match pass.await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("tokens per node: {e:#} (the next heartbeat goes on)");
            json!({"error": format!("{e:#}")})
        }
    }
}

/// `secrets revoke NODE`: node `id`'s token deleted from Consul (with its
/// policy) and from the store; when EC2 still runs the instance, a new one
/// is made for it at once (Consul first, then the store), which it reads
/// at its next boot: until then its Consul is refused (its heartbeat does
/// not move it: only `run` reads a node's token once it has one).
pub async fn revoke(
    store: &dyn SecretStore,
    management: &str,
    cluster: &str,
    id: &str,
) -> Result<Value> {
    let name = node_token_name(cluster, id);
    let old = read(store, cluster, id).await?;
    if let Some(secret) = &old {
        agent::delete_node_token(management, id, secret).await?;
        store.delete(&name).await?;
        tracing::warn!(
            "deleted the token of node {id} from Consul and {}",
            store.shown(&name)
        );
    }
    let aws = crate::aws::load().await?;
    let remade = match crate::ec2::running_arn(&aws, id).await? {
        Some(arn) => {
            ensure_one(store, management, cluster, id, &arn).await?;
            true
        }
        None => false,
    };
    Ok(
        json!({"node": id, "revoked": old.is_some(), "new_token_made": remade, "secret": store.shown(&name)}),
    )
}

/// This node's own token as its Consul config holds it (`acl.tokens.agent`),
/// when it runs with one: what its agent's leave and join are made with
/// (agent:write on itself).
pub fn own_from_config(consul: &ConsulOpts, root: &Root) -> Option<String> {
    if kind(root).as_deref() != Some("node") {
        return None;
    }
    let config = root.path(&consul.config_dir.join(super::run::CONFIG_FILE));
    super::rotate::config_json(&config)?["acl"]["tokens"]["agent"]
        .as_str()
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_of_made_tokens_is_rechecked_after_an_hour_and_keeps_its_times() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let now = chrono::Utc::now().timestamp();
        let file = root.path(std::path::Path::new(MADE));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(
            &file,
            format!(
                "c1 i-1 {}\nc1 i-2 {}\nc0 i-3 {now}\njunk\n",
                now - 10,
                now - RECHECK_SECONDS - 1
            ),
        )
        .unwrap();
        let checked = made_checked(&root, "c1");
        assert_eq!(checked.get("i-1"), Some(&true));
        assert_eq!(checked.get("i-2"), Some(&false), "due for a check");
        assert_eq!(checked.get("i-3"), None, "another cluster's");
        // Recorded again: i-1 keeps its time, i-2 (checked now) and i-4
        // (new) get now; the other cluster's line goes.
        let ids: BTreeSet<String> = ["i-1", "i-2", "i-4"].map(String::from).into();
        record_made(&root, "c1", &ids);
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains(&format!("c1 i-1 {}\n", now - 10)), "{text}");
        assert!(!text.contains("c0 "), "{text}");
        let checked = made_checked(&root, "c1");
        assert!(checked.values().all(|recent| *recent), "{checked:?}");
        assert_eq!(checked.len(), 3);
    }
}
