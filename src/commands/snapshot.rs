//! `snapshot` and `restore`: nothing is lost with a cluster (DESIGN.md).
//!
//! On servers, auto-consul-snapshot.timer runs `snapshot`: the leader
//! saves `GET /v1/snapshot` to `snapshots/<cluster id>/<stamp>-<node>.snap`
//! in the registry bucket (streamed through a file in the state dir, its
//! SHA-256 in the object's metadata) and keeps the newest
//! `--snapshot-keep`. Before that, a cluster that replaced a gone one
//! restores the old cluster's newest valid snapshot, once: the cluster
//! record says what is owed and what was done, under `If-Match`.

use std::path::Path;

use anyhow::{Result, bail};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::{open_store, registry_url};
use crate::claims::put_settled;
use crate::cli::GlobalOpts;
use crate::error::usage;
use crate::install::Root;
use crate::model::{
    CLUSTER_KEY, ClusterRecord, HeartbeatKey, RestorePlan, RestoreState, SnapshotKey, snapshots_dir,
};
use crate::registry::{Condition, Store, read_cluster};
use crate::spool::Spooled;
use crate::{agent, state};

/// When this node last saved a snapshot (the store's clock).
pub const SNAPSHOT_AT: &str = "/var/lib/auto-consul/snapshot-at";
/// How long a restore another server started is left to it (the store's
/// clock, from the record's last write) before this leader takes it over.
const RESTORE_TAKEOVER_SECS: u64 = 1800;
/// Where a snapshot passes through on its way to or from the registry.
const SPOOL: &str = "/var/lib/auto-consul/snapshot.spool";

/// `snapshot`: a restore owed first, then the leader's save and the
/// retention.
pub async fn snapshot(opts: &GlobalOpts) -> Result<()> {
    let url = registry_url(opts)?;
    let root = Root::new(&opts.root);
    let saved = this_server(&root, &url.to_string())?;
    let Some(saved) = saved else {
        return say(opts, json!({"saved": false, "reason": "agent"}), || {
            "this node is an agent: snapshots are the servers' (nothing to do)".into()
        });
    };
    let Some(cluster) = saved.cluster_id.clone() else {
        return say(
            opts,
            json!({"saved": false, "reason": "no cluster"}),
            || "this server's registry has no cluster record: nothing to save".into(),
        );
    };
    // Only the leader: one snapshot per interval for the cluster.
    let status = agent::status(opts.acl_token_file.as_deref()).await?;
    let Some(leader) = status.leader.as_deref() else {
        bail!(
            "the local Consul agent knows no leader yet: no snapshot can be saved or restored now \
             (auto-consul-snapshot.service tries again in 30s)"
        );
    };
    if leader_ip(leader) != Some(saved.address) {
        let shown = status.leader.clone().unwrap_or_else(|| "none".into());
        return say(
            opts,
            json!({"saved": false, "reason": "not the leader", "leader": status.leader}),
            || {
                format!(
                    "this server is not the leader (leader: {shown}): the leader saves the snapshots"
                )
            },
        );
    }
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();
    let token = management_token(opts, &cluster).await?;
    let spool = root.path(Path::new(SPOOL));
    let restored = restore_owed(opts, store, &saved, &cluster, token.as_deref(), &spool)
        .await
        .map_err(|e| {
            e.context(format!(
                "the restore cluster {cluster} owes did not happen; auto-consul-snapshot.service tries again in 30s \
                 (`auto-consul restore --cancel` drops it, and the cluster keeps its own state)"
            ))
        })?;
    if opts.snapshot_interval() == 0 {
        return say(
            opts,
            json!({"saved": false, "reason": "off", "restored": restored}),
            || "snapshots are off (--snapshot-interval 0)".into(),
        );
    }
    let file = agent::save_snapshot(token.as_deref(), &spool).await;
    let file = file.inspect_err(|_| {
        let _ = std::fs::remove_file(&spool);
    })?;
    let now = store.now().await;
    let key = SnapshotKey {
        cluster: cluster.clone(),
        stamp: HeartbeatKey {
            time: now,
            node: saved.node.clone(),
        },
    }
    .key();
    let put = store.put_file(&key, &file.path, &file.sha256).await;
    let _ = std::fs::remove_file(&spool);
    put?;
    state::record_time(&root, SNAPSHOT_AT, now);
    crate::metrics::snapshot_saved(now);
    let deleted = keep_newest(store, &cluster, opts.snapshot_keep()).await?;
    say(
        opts,
        json!({
            "saved": true,
            "key": key,
            "sha256": file.sha256,
            "size": file.size,
            "deleted": deleted,
            "restored": restored,
        }),
        || {
            format!(
                "saved {key} ({} bytes, sha256 {}); deleted {} older snapshot(s), keeping {}",
                file.size,
                file.sha256,
                deleted.len(),
                opts.snapshot_keep()
            )
        },
    )
}

/// `restore [KEY | --cancel]`.
pub async fn restore(opts: &GlobalOpts, key: Option<&str>, cancel: bool) -> Result<()> {
    let url = registry_url(opts)?;
    let root = Root::new(&opts.root);
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();
    let record = read_cluster(store).await?;
    let Some(key) = key else {
        if cancel {
            return cancel_owed(opts, store, record).await;
        }
        return list(opts, store, record.as_ref().map(|(r, _)| r)).await;
    };
    let Some(snap) = parse_any(key) else {
        return Err(usage(format!(
            "`{}` is not a snapshot key: give one as `auto-consul restore` lists it \
             (snapshots/<cluster id>/<stamp>-<node>.snap)",
            key.escape_debug()
        )));
    };
    let cluster = record.as_ref().map(|(r, _)| r.cluster_id.clone());
    let token = match &cluster {
        Some(c) => management_token(opts, c).await?,
        None => None,
    };
    let spool = root.path(Path::new(SPOOL));
    let Some(fetched) = store.get_file(key, &spool).await? else {
        bail!("there is no snapshot {key} in {url}; `auto-consul restore` lists them");
    };
    if let Err(why) = fetched.intact() {
        let _ = std::fs::remove_file(&spool);
        bail!(
            "snapshot {key} is damaged: {why}; restore another one (`auto-consul restore` lists them)"
        );
    }
    let sent = agent::restore_snapshot(token.as_deref(), &fetched.file).await;
    let _ = std::fs::remove_file(&spool);
    sent?;
    if let Some(c) = &cluster {
        tokens_after_restore(opts, &snap.cluster, c).await;
    }
    // A restore owed at genesis is settled by the operator's.
    if let Some((mut rec, etag)) = record
        && rec.restore.as_ref().is_some_and(|p| p.state.open())
    {
        let me = state::load(&root).map(|s| s.node);
        rec.restore = Some(plan_done(&rec, &snap, &fetched.file, me));
        write_record(store, &rec, etag).await?;
    }
    say(
        opts,
        json!({"restored": key, "sha256": fetched.file.sha256, "size": fetched.file.size}),
        || {
            format!(
                "restored {key} ({} bytes, sha256 {}): Consul's state is now that snapshot's",
                fetched.file.size, fetched.file.sha256
            )
        },
    )
}

/// This node's state when `run` made it a server for `registry`; an error
/// naming the missing `run` when there is none.
fn this_server(root: &Root, registry: &str) -> Result<Option<state::State>> {
    let path = root.path(Path::new(state::STATE_PATH));
    let Some(saved) = state::load(root).filter(|s| s.registry == registry) else {
        return Err(usage(format!(
            "there is no state file for {registry} at {}: this node has not run `auto-consul run` \
             (the boot unit auto-consul.service does); run it first",
            path.display()
        )));
    };
    Ok(Some(saved).filter(|s| s.mode.is_server()))
}

/// The IP of a leader as `/v1/status/leader` names it (`ip:port`).
fn leader_ip(leader: &str) -> Option<std::net::IpAddr> {
    leader
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip())
        .or_else(|| leader.parse().ok())
}

/// The management token the snapshot endpoints need when ACLs were made
/// at genesis (`--secrets`); otherwise none (CONSUL_HTTP_TOKEN, if set,
/// is sent).
async fn management_token(opts: &GlobalOpts, cluster: &str) -> Result<Option<String>> {
    let Some(url) = &opts.secrets else {
        return Ok(None);
    };
    let Some(store) = crate::secrets::open(url).await? else {
        return Ok(None);
    };
    crate::secrets::management_token(store.as_ref(), cluster).await
}

/// The restore the cluster record says is owed, when there is one: the
/// old cluster's snapshots newest first (the one an interrupted attempt
/// chose before them), the first whose bytes match their SHA-256
/// restored; the record says `restoring` before and `done` after, so a
/// node stopped mid-way restores again and a finished restore is never
/// repeated.
async fn restore_owed(
    opts: &GlobalOpts,
    store: &dyn Store,
    me: &state::State,
    cluster: &str,
    token: Option<&str>,
    spool: &Path,
) -> Result<Value> {
    let Some(obj) = store.get(CLUSTER_KEY).await? else {
        return Ok(Value::Null);
    };
    let Ok(record) = ClusterRecord::parse(&obj.body) else {
        return Ok(Value::Null);
    };
    let etag = obj.etag;
    let Some(plan) = record.restore.clone().filter(|p| p.state.open()) else {
        return Ok(Value::Null);
    };
    if record.cluster_id != cluster {
        return Ok(Value::Null);
    }
    // Another server (the leader before a change of leader) restoring
    // now is left to it; one silent for long is taken over.
    if plan.state == RestoreState::Restoring
        && let Some(other) = plan.node.as_deref().filter(|n| *n != me.node)
    {
        let age = crate::model::age_seconds(obj.last_modified, store.now().await);
        if age < RESTORE_TAKEOVER_SECS {
            tracing::info!(
                "{other} has been restoring {} for {age}s: not restoring it again",
                plan.key.as_deref().unwrap_or("a snapshot")
            );
            return Ok(json!({"by": other, "state": "restoring"}));
        }
    }
    let mut keys = snapshots_of(store, &plan.from).await?;
    keys.reverse();
    if let Some(chosen) = plan
        .key
        .as_deref()
        .and_then(|k| SnapshotKey::parse(&plan.from, k))
    {
        keys.retain(|k| *k != chosen);
        keys.insert(0, chosen);
    }
    let mut etag = etag;
    for snap in keys {
        let key = snap.key();
        let Some(fetched) = store.get_file(&key, spool).await? else {
            continue;
        };
        if let Err(why) = fetched.intact() {
            tracing::warn!("skipping snapshot {key} of cluster {}: {why}", plan.from);
            continue;
        }
        let mut rec = record.clone();
        rec.restore = Some(RestorePlan {
            state: RestoreState::Restoring,
            key: Some(key.clone()),
            sha256: Some(fetched.file.sha256.clone()),
            node: Some(me.node.clone()),
            at: Some(Utc::now().to_rfc3339()),
            ..plan.clone()
        });
        etag = write_record(store, &rec, etag).await?;
        tracing::warn!(
            "restoring snapshot {key} of cluster {} into cluster {cluster} ({} bytes)",
            plan.from,
            fetched.file.size
        );
        let sent = agent::restore_snapshot(token, &fetched.file).await;
        let _ = std::fs::remove_file(spool);
        sent?;
        tokens_after_restore(opts, &plan.from, cluster).await;
        rec.restore = Some(plan_done(&rec, &snap, &fetched.file, Some(me.node.clone())));
        write_record(store, &rec, etag).await?;
        return Ok(json!({"key": key, "sha256": fetched.file.sha256, "from": plan.from}));
    }
    let _ = std::fs::remove_file(spool);
    tracing::warn!(
        "cluster {} left no valid snapshot under {}: cluster {cluster} starts empty",
        plan.from,
        snapshots_dir(&plan.from)
    );
    let mut rec = record;
    rec.restore = Some(RestorePlan {
        state: RestoreState::Nothing,
        at: Some(Utc::now().to_rfc3339()),
        ..plan.clone()
    });
    write_record(store, &rec, etag).await?;
    Ok(json!({"key": null, "from": plan.from}))
}

fn plan_done(
    rec: &ClusterRecord,
    snap: &SnapshotKey,
    file: &Spooled,
    node: Option<String>,
) -> RestorePlan {
    let from = rec
        .restore
        .as_ref()
        .map_or_else(|| snap.cluster.clone(), |p| p.from.clone());
    RestorePlan {
        from,
        state: RestoreState::Done,
        key: Some(snap.key()),
        sha256: Some(file.sha256.clone()),
        node,
        at: Some(Utc::now().to_rfc3339()),
    }
}

/// Rewrites the cluster record under `If-Match`; its new version tag.
async fn write_record(store: &dyn Store, rec: &ClusterRecord, etag: String) -> Result<String> {
    let body = serde_json::to_vec(rec)?;
    match put_settled(store, CLUSTER_KEY, body, Condition::Matches(etag)).await? {
        Some(tag) => Ok(tag),
        None => bail!(
            "the cluster record changed while this node was restoring a snapshot into it; the next run looks again"
        ),
    }
}

/// After a restore, Consul's ACL state is the snapshot's: this cluster's
/// management and agents' tokens (made at genesis) are made again in it
/// with the old cluster's management token, which the snapshot knows.
async fn tokens_after_restore(opts: &GlobalOpts, from: &str, cluster: &str) {
    if from == cluster {
        return;
    }
    let Some(url) = &opts.secrets else { return };
    let done = async {
        let Some(store) = crate::secrets::open(url).await? else {
            return Ok(());
        };
        let Some(old) = crate::secrets::management_token(store.as_ref(), from).await? else {
            anyhow::bail!(
                "cluster {from} made no management token; the restored ACL state may not know this cluster's"
            );
        };
        let made = crate::secrets::genesis(store.as_ref(), cluster, true).await?;
        if let Some(new) = &made.management_token {
            agent::ensure_management_token(&old, new).await?;
        }
        agent::ensure_agent_token(&old, &made.agent_token).await?;
        Ok(())
    };
    if let Err(e) = done.await {
        tracing::warn!(
            "this cluster's ACL tokens are not in the restored state yet: {e:#}; \
             make them with the old cluster's management token (`auto-consul secrets get management-token`)"
        );
    }
}

/// Cluster `cluster`'s snapshots, oldest first; junk skipped with a warning.
async fn snapshots_of(store: &dyn Store, cluster: &str) -> Result<Vec<SnapshotKey>> {
    let listed = store.list(&snapshots_dir(cluster), None).await?;
    let mut keys: Vec<SnapshotKey> = listed
        .iter()
        .filter_map(|l| {
            let parsed = SnapshotKey::parse(cluster, &l.key);
            if parsed.is_none() {
                tracing::warn!("skipping {}: not a snapshot auto-consul saved", l.key);
            }
            parsed
        })
        .collect();
    keys.sort_by_key(SnapshotKey::key);
    Ok(keys)
}

/// Deletes all but the newest `keep` snapshots of `cluster`; the keys
/// deleted.
async fn keep_newest(store: &dyn Store, cluster: &str, keep: u32) -> Result<Vec<String>> {
    let keys = snapshots_of(store, cluster).await?;
    let drop = keys.len().saturating_sub(keep as usize);
    let old: Vec<String> = keys[..drop].iter().map(SnapshotKey::key).collect();
    if !old.is_empty() {
        store.delete(&old).await?;
    }
    Ok(old)
}

/// The newest snapshot of `cluster` and when it was saved (the store's
/// clock), for `status` and `members`.
pub async fn newest(store: &dyn Store, cluster: &str) -> Result<Option<(String, DateTime<Utc>)>> {
    let keys = snapshots_of(store, cluster).await?;
    Ok(keys.last().map(|k| (k.key(), k.stamp.time)))
}

/// A snapshot key of any cluster.
fn parse_any(key: &str) -> Option<SnapshotKey> {
    let cluster = key.strip_prefix("snapshots/")?.split('/').next()?;
    crate::model::registry_node_name_ok(cluster)
        .then(|| SnapshotKey::parse(cluster, key))
        .flatten()
}

/// `restore` without a key: this cluster's snapshots, and those of the
/// cluster it replaced.
async fn list(opts: &GlobalOpts, store: &dyn Store, record: Option<&ClusterRecord>) -> Result<()> {
    let Some(record) = record else {
        bail!("the registry holds no cluster record: there are no snapshots to list");
    };
    let mut clusters = vec![record.cluster_id.clone()];
    if let Some(plan) = &record.restore {
        clusters.push(plan.from.clone());
    }
    let now = store.now().await;
    let mut rows = Vec::new();
    for c in &clusters {
        for k in snapshots_of(store, c).await?.into_iter().rev() {
            rows.push(json!({
                "key": k.key(),
                "cluster": c,
                "saved": k.stamp.time.to_rfc3339(),
                "age_seconds": crate::model::age_seconds(k.stamp.time, now),
            }));
        }
    }
    say(
        opts,
        json!({"snapshots": rows, "restore": record.restore}),
        || {
            let mut text = String::new();
            if rows.is_empty() {
                text.push_str("no snapshots");
            }
            for r in &rows {
                text.push_str(&format!(
                    "{}  ({}s ago)\n",
                    r["key"].as_str().unwrap_or_default(),
                    r["age_seconds"]
                ));
            }
            if let Some(p) = &record.restore {
                text.push_str(&format!(
                    "restore from cluster {}: {}",
                    p.from,
                    p.state.as_str()
                ));
            }
            text.trim_end().to_string()
        },
    )
}

/// `restore --cancel`: the restore owed at genesis is dropped.
async fn cancel_owed(
    opts: &GlobalOpts,
    store: &dyn Store,
    record: Option<(ClusterRecord, String)>,
) -> Result<()> {
    let Some((mut rec, etag)) = record else {
        bail!("the registry holds no cluster record: no restore is owed");
    };
    let Some(plan) = rec.restore.clone().filter(|p| p.state.open()) else {
        return say(opts, json!({"cancelled": false}), || {
            "no restore is owed: nothing to cancel".into()
        });
    };
    rec.restore = Some(RestorePlan {
        state: RestoreState::Cancelled,
        at: Some(Utc::now().to_rfc3339()),
        ..plan.clone()
    });
    write_record(store, &rec, etag).await?;
    say(opts, json!({"cancelled": true, "from": plan.from}), || {
        format!(
            "cancelled the restore of cluster {}'s snapshot: cluster {} keeps its own state",
            plan.from, rec.cluster_id
        )
    })
}

/// Prints `json` with `--json`, else the text.
fn say(opts: &GlobalOpts, json: Value, text: impl FnOnce() -> String) -> Result<()> {
    if opts.json {
        println!("{json}");
    } else {
        println!("{}", text());
    }
    Ok(())
}
