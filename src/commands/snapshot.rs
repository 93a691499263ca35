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

use super::{management_token, open_store};
use crate::claims::put_settled;
use crate::cli::{GlobalOpts, OutputOpts, SecretOpts};
use crate::error::{soon, usage};
use crate::install::{self, Root};
use crate::model::{
    CLUSTER_KEY, ClusterRecord, HeartbeatKey, RestorePlan, RestoreState, SnapshotKey, snapshots_dir,
};
use crate::registry::{Condition, Object, Store, read_cluster};
use crate::spool::Spooled;
use crate::{agent, state};

/// When this node last saved a snapshot (the store's clock).
pub const SNAPSHOT_AT: &str = "/var/lib/auto-consul/snapshot-at";
/// Why this node's last snapshot save failed (JSON: at, reason); removed
/// by the next save.
pub const SNAPSHOT_FAILED: &str = "/var/lib/auto-consul/snapshot-failed";
/// How long a restore another server started is left to it (the store's
/// clock, from the record's last write) before this leader takes it over.
const RESTORE_TAKEOVER_SECS: u64 = 1800;
/// Where a snapshot passes through on its way to or from the registry.
const SPOOL: &str = "/var/lib/auto-consul/snapshot.spool";

/// `snapshot`: a restore owed first, then the leader's save and the
/// retention.
pub async fn snapshot(opts: &GlobalOpts) -> Result<()> {
    let url = opts.cluster.registry_url()?;
    let root = Root::new(&opts.consul.root);
    let saved = this_server(&root, &url.to_string())?;
    let Some(saved) = saved else {
        return say(
            &opts.output,
            json!({"saved": false, "reason": "agent"}),
            || "this node is an agent: snapshots are the servers' (nothing to do)".into(),
        );
    };
    let Some(cluster) = saved.cluster_id.clone() else {
        return say(
            &opts.output,
            json!({"saved": false, "reason": "no cluster"}),
            || "this server's registry has no cluster record: nothing to save".into(),
        );
    };
    // Only the leader: one snapshot per interval for the cluster.
    let status = leader_known(&opts.tls).await?;
    let Some(leader) = status.leader.as_deref() else {
        return Err(soon(format!(
            "the local Consul agent knew no leader for {}s: no snapshot can be saved or restored now \
             (auto-consul-snapshot.service tries again in 30s)",
            LEADER_WAIT.as_secs()
        )));
    };
    if leader_ip(leader) != Some(saved.address) {
        let shown = status.leader.clone().unwrap_or_else(|| "none".into());
        return say(
            &opts.output,
            json!({"saved": false, "reason": "not the leader", "leader": status.leader}),
            || {
                format!(
                    "this server is not the leader (leader: {shown}): the leader saves the snapshots"
                )
            },
        );
    }
    // One snapshot or restore at a time on this node, through one spool.
    let _lock = install::lock(&root, "snapshot")?;
    let spool = SpoolFile(root.path(Path::new(SPOOL)));
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();
    let token = management_token(&opts.cluster, &opts.consul, &opts.tls, &cluster).await?;
    let owed = Owed {
        tls: &opts.tls,
        store,
        me: &saved,
        cluster: &cluster,
        token: token.as_deref(),
        spool: &spool.0,
    };
    let restored = match owed.settle().await {
        Ok(Settled::Nothing) => Value::Null,
        Ok(Settled::Restored(v)) => v,
        Ok(Settled::Elsewhere(why)) => return Err(soon(why)),
        Err(e) => {
            return Err(crate::error::soon_because(
                format!(
                    "the restore cluster {cluster} owes is not done; auto-consul-snapshot.service tries again in 30s \
                     (`auto-consul restore --cancel` drops it, and the cluster keeps its own state)"
                ),
                &e,
            ));
        }
    };
    if opts.snapshots.interval() == 0 {
        return say(
            &opts.output,
            json!({"saved": false, "reason": "off", "restored": restored}),
            || "snapshots are off (--snapshot-interval 0)".into(),
        );
    }
    let saved_at = store.now().await;
    let (key, file) = match save(store, &cluster, &saved.node, token.as_deref(), &spool.0).await {
        Ok(done) => done,
        Err(e) => {
            record_failure(&root, saved_at, &e);
            crate::metrics::snapshot_failed(saved_at);
            return Err(e);
        }
    };
    let now = store.now().await;
    state::record_time(&root, SNAPSHOT_AT, now);
    let _ = std::fs::remove_file(root.path(Path::new(SNAPSHOT_FAILED)));
    crate::metrics::snapshot_saved(now);
    let deleted = keep_newest(store, &cluster, opts.snapshots.keep()).await?;
    say(
        &opts.output,
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
                opts.snapshots.keep()
            )
        },
    )
}

/// Saves a snapshot through the spool, checks it as Consul would before a
/// restore, and uploads it: the key and the file. A snapshot Consul would
/// refuse (a stream cut mid-way, where Consul writes its error after the
/// 200 it had sent) is not uploaded.
async fn save(
    store: &dyn Store,
    cluster: &str,
    node: &str,
    token: Option<&str>,
    spool: &Path,
) -> Result<(String, Spooled)> {
    let file = agent::save_snapshot(token, spool).await?;
    if let Err(why) = checked(&file).await? {
        bail!(
            "the snapshot Consul sent ({} bytes) is not one Consul would restore: {why}; nothing \
             was uploaded (the next interval saves again; a leader change while saving cuts the stream)",
            file.size
        );
    }
    let key = SnapshotKey {
        cluster: cluster.to_string(),
        stamp: HeartbeatKey {
            time: store.now().await,
            node: node.to_string(),
        },
    }
    .key();
    store.put_file(&key, &file.path, &file.sha256).await?;
    Ok((key, file))
}

/// Why this node's last save failed, for `status` (removed by a save).
fn record_failure(root: &Root, at: DateTime<Utc>, e: &anyhow::Error) {
    let spec = install::FileSpec {
        path: SNAPSHOT_FAILED.into(),
        contents: format!(
            "{}\n",
            json!({"at": at.to_rfc3339(), "reason": format!("{e:#}")})
        ),
        mode: 0o644,
        owner: None,
    };
    if let Err(e) = install::write_atomic(root, &spec) {
        tracing::warn!("could not record the failed save in {SNAPSHOT_FAILED}: {e:#}");
    }
}

/// This node's last failed save, when no save came after it: when, why.
pub fn last_failure(root: &Root) -> Option<(DateTime<Utc>, String)> {
    let text = std::fs::read_to_string(root.path(Path::new(SNAPSHOT_FAILED))).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    let at = DateTime::parse_from_rfc3339(v["at"].as_str()?)
        .ok()?
        .with_timezone(&Utc);
    let saved = state::recorded_time(root, SNAPSHOT_AT);
    if saved.is_some_and(|s| s >= at) {
        return None;
    }
    Some((at, v["reason"].as_str()?.to_string()))
}

/// How long `snapshot` waits for a leader to be known (the timer's first
/// run comes moments after boot, while the servers elect one): a restore
/// owed starts within a second of the election.
const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The local agent's status once it knows a leader, or after
/// [`LEADER_WAIT`] without one.
async fn leader_known(tls: &SecretOpts) -> Result<agent::AgentStatus> {
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        let status = agent::status(tls.acl_token_file.as_deref()).await?;
        if status.leader.is_some() || tokio::time::Instant::now() >= deadline {
            return Ok(status);
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// The spool, removed however the command ends (a partial download or a
/// snapshot of gigabytes is not left on the root disk).
struct SpoolFile(std::path::PathBuf);

impl Drop for SpoolFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `restore [KEY | --cancel]`.
pub async fn restore(opts: &GlobalOpts, key: Option<&str>, cancel: bool) -> Result<()> {
    let url = opts.cluster.registry_url()?;
    let root = Root::new(&opts.consul.root);
    let opened = open_store(&url).await?;
    let store = opened.store.as_ref();
    let Some(key) = key else {
        if cancel {
            return cancel_owed(&opts.output, store).await;
        }
        let record = read_cluster(store).await?;
        return list(&opts.output, store, record.as_ref().map(|(r, _)| r)).await;
    };
    let Some(snap) = parse_any(key) else {
        return Err(usage(format!(
            "`{}` is not a snapshot key: give one as `auto-consul restore` lists it \
             (snapshots/<cluster id>/<stamp>-<node>.snap)",
            key.escape_debug()
        )));
    };
    let _lock = install::lock(&root, "snapshot")?;
    let spool = SpoolFile(root.path(Path::new(SPOOL)));
    let current = read_record(store).await?;
    let cluster = current.as_ref().map(|(r, _)| r.cluster_id.clone());
    let servers = current.as_ref().map(|(r, _)| r.servers);
    let token = match &cluster {
        Some(c) => management_token(&opts.cluster, &opts.consul, &opts.tls, c).await?,
        None => None,
    };
    let Some(fetched) = store.get_file(key, &spool.0).await? else {
        bail!("there is no snapshot {key} in {url}; `auto-consul restore` lists them");
    };
    if let Err(why) = fetched.intact() {
        bail!(
            "snapshot {key} is damaged: {why}; restore another one (`auto-consul restore` lists them)"
        );
    }
    let me = state::load(&root)
        .map(|s| s.node)
        .unwrap_or_else(|| "operator".into());
    // A restore owed at genesis is settled by the operator's, through
    // the same steps in the record (unless another server is at it).
    let owed = match current {
        Some((rec, obj))
            if rec
                .restore
                .as_ref()
                .is_some_and(|p| p.state.open() || p.state == RestoreState::Refused) =>
        {
            if let Some(why) = busy_elsewhere(store, &rec, &obj, &me).await {
                bail!("{why}; try again once it is done (`auto-consul cluster show`)");
            }
            Some((rec, obj.etag))
        }
        _ => None,
    };
    let steps = RestoreSteps {
        tls: &opts.tls,
        store,
        me: &me,
        token: token.as_deref(),
        to: cluster.as_deref(),
        servers,
    };
    steps.run(owed, &snap, &fetched.file).await?;
    say(
        &opts.output,
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
pub(super) fn leader_ip(leader: &str) -> Option<std::net::IpAddr> {
    leader
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip())
        .or_else(|| leader.parse().ok())
}

/// The cluster record with the object it was read from (its version tag
/// and its time on the store's clock); junk counts as none.
pub(super) async fn read_record(store: &dyn Store) -> Result<Option<(ClusterRecord, Object)>> {
    let Some(obj) = store.get(CLUSTER_KEY).await? else {
        return Ok(None);
    };
    Ok(ClusterRecord::parse(&obj.body)
        .map_err(|why| tracing::warn!("skipping registry key {CLUSTER_KEY}: {why}"))
        .ok()
        .map(|r| (r, obj)))
}

/// Why another server's restore, under way and recent (its record write
/// younger than [`RESTORE_TAKEOVER_SECS`] on the store's clock), is left
/// to it; `None` when this node may go on.
async fn busy_elsewhere(
    store: &dyn Store,
    rec: &ClusterRecord,
    obj: &Object,
    me: &str,
) -> Option<String> {
    let plan = rec.restore.as_ref()?;
    let other = plan.node.as_deref().filter(|n| *n != me)?;
    if !matches!(plan.state, RestoreState::Restoring | RestoreState::Restored) {
        return None;
    }
    let age = crate::model::age_seconds(obj.last_modified, store.now().await);
    (age < RESTORE_TAKEOVER_SECS).then(|| {
        format!(
            "{other} is restoring {} into cluster {} ({}, {age}s ago)",
            plan.key.as_deref().unwrap_or("a snapshot"),
            rec.cluster_id,
            plan.state.as_str()
        )
    })
}

/// What became of the restore a cluster owes.
enum Settled {
    /// None was owed.
    Nothing,
    /// This run finished it (or found nothing to restore).
    Restored(Value),
    /// Another server is at it: this run saves nothing.
    Elsewhere(String),
}

/// The restore a cluster record says is owed, done by the leader.
struct Owed<'a> {
    tls: &'a SecretOpts,
    store: &'a dyn Store,
    me: &'a state::State,
    cluster: &'a str,
    token: Option<&'a str>,
    spool: &'a Path,
}

impl Owed<'_> {
    /// The old cluster's snapshots newest first (the one an interrupted
    /// attempt chose before them); the first whose bytes match their
    /// SHA-256 is restored through [`RestoreSteps`]. While it is owed, no
    /// snapshot of this cluster is saved (it would be empty, and a later
    /// replacement could take it for the data).
    async fn settle(&self) -> Result<Settled> {
        let Some((record, obj)) = read_record(self.store).await? else {
            return Ok(Settled::Nothing);
        };
        let Some(plan) = record.restore.clone().filter(|p| p.state.open()) else {
            return Ok(Settled::Nothing);
        };
        if record.cluster_id != self.cluster {
            return Ok(Settled::Nothing);
        }
        if let Some(why) = busy_elsewhere(self.store, &record, &obj, &self.me.node).await {
            return Ok(Settled::Elsewhere(format!(
                "{why}: this server saves no snapshot until it is done, and takes it over after {}s",
                RESTORE_TAKEOVER_SECS
            )));
        }
        let steps = RestoreSteps {
            tls: self.tls,
            store: self.store,
            me: &self.me.node,
            token: self.token,
            to: Some(self.cluster),
            servers: Some(record.servers),
        };
        let etag = obj.etag.clone();
        // Restored, its tokens not yet made again: only that is left.
        if plan.state == RestoreState::Restored {
            let snap = plan
                .key
                .as_deref()
                .and_then(|k| SnapshotKey::parse(&plan.from, k));
            if let Some(snap) = snap {
                steps.finish(record, etag, &snap).await?;
                return Ok(Settled::Restored(
                    json!({"key": plan.key, "from": plan.from}),
                ));
            }
        }
        let mut keys = snapshots_of(self.store, &plan.from).await?;
        keys.reverse();
        if let Some(chosen) = plan
            .key
            .as_deref()
            .and_then(|k| SnapshotKey::parse(&plan.from, k))
        {
            keys.retain(|k| *k != chosen);
            keys.insert(0, chosen);
        }
        let mut refused = plan.refused.clone();
        let (mut record, mut etag) = (record, etag);
        for snap in keys {
            let key = snap.key();
            if refused.contains(&key) {
                continue;
            }
            let Some(fetched) = self.store.get_file(&key, self.spool).await? else {
                continue;
            };
            if let Err(why) = fetched.intact() {
                tracing::warn!("skipping snapshot {key} of cluster {}: {why}", plan.from);
                continue;
            }
            let why = match checked(&fetched.file).await? {
                Err(why) => why,
                Ok(()) => {
                    let sent = steps
                        .run(Some((record.clone(), etag.clone())), &snap, &fetched.file)
                        .await;
                    match sent {
                        Ok(()) => {
                            return Ok(Settled::Restored(json!({
                                "key": key,
                                "sha256": fetched.file.sha256,
                                "from": plan.from,
                                "refused": refused,
                            })));
                        }
                        Err(e) => match e.downcast::<agent::SnapshotRefused>() {
                            Ok(r) => r.0,
                            Err(e) => return Err(e),
                        },
                    }
                }
            };
            tracing::warn!(
                "Consul refuses snapshot {key} of cluster {}: {why}; trying the next older one",
                plan.from
            );
            refused.push(key);
            (record, etag) = self.note_refused(&refused).await?;
        }
        let (state, said) = if refused.is_empty() {
            (RestoreState::Nothing, "left no valid snapshot")
        } else {
            (RestoreState::Refused, "left no snapshot Consul takes")
        };
        tracing::warn!(
            "cluster {} {said} under {}: cluster {} runs on its own state{}",
            plan.from,
            snapshots_dir(&plan.from),
            self.cluster,
            if refused.is_empty() {
                String::new()
            } else {
                format!(
                    " (refused: {}; `auto-consul restore KEY` restores one by hand)",
                    refused.join(", ")
                )
            }
        );
        let mut rec = record;
        let open = rec.restore.clone().unwrap_or(plan);
        rec.restore = Some(RestorePlan {
            state,
            at: Some(Utc::now().to_rfc3339()),
            refused: refused.clone(),
            ..open.clone()
        });
        write_record(self.store, &rec, etag).await?;
        Ok(Settled::Restored(
            json!({"key": null, "from": open.from, "refused": refused}),
        ))
    }

    /// Notes in the record that the snapshots `refused` are not to be
    /// tried again (the record read again: the refused attempt rewrote
    /// it); the record and its new version tag.
    async fn note_refused(&self, refused: &[String]) -> Result<(ClusterRecord, String)> {
        let Some((mut rec, obj)) = read_record(self.store).await? else {
            bail!("the cluster record is gone while this node was restoring a snapshot into it");
        };
        let Some(plan) = rec
            .restore
            .clone()
            .filter(|p| p.state.open() && rec.cluster_id == self.cluster)
        else {
            bail!(
                "the cluster record changed while this node was restoring a snapshot into it; the next run looks again"
            );
        };
        rec.restore = Some(RestorePlan {
            state: RestoreState::Pending,
            key: None,
            sha256: None,
            node: Some(self.me.node.clone()),
            at: Some(Utc::now().to_rfc3339()),
            refused: refused.to_vec(),
            ..plan
        });
        let etag = write_record(self.store, &rec, obj.etag).await?;
        Ok((rec, etag))
    }
}

/// The snapshot at `file` checked as Consul checks one (off the async
/// threads: it reads the whole file); the reason Consul would refuse it.
async fn checked(file: &Spooled) -> Result<Result<(), String>> {
    let path = file.path.clone();
    Ok(tokio::task::spawn_blocking(move || crate::archive::check(&path)).await?)
}

/// A restore's steps, each said in the cluster record when one is owed
/// (under `If-Match`): `restoring` (this node, this key) before the
/// snapshot is sent, `restored` once Consul took it, `done` once this
/// cluster's ACL tokens are in the restored state. A node stopped before
/// `restored` sends it again; one stopped after it only makes the tokens.
struct RestoreSteps<'a> {
    tls: &'a SecretOpts,
    store: &'a dyn Store,
    me: &'a str,
    token: Option<&'a str>,
    /// The cluster restored into, when the registry has one.
    to: Option<&'a str>,
    /// Its number of servers (the record's): its autopilot settings.
    servers: Option<u32>,
}

impl RestoreSteps<'_> {
    async fn run(
        &self,
        owed: Option<(ClusterRecord, String)>,
        snap: &SnapshotKey,
        file: &Spooled,
    ) -> Result<()> {
        let key = snap.key();
        let mut record = None;
        if let Some((mut rec, etag)) = owed {
            rec.restore = Some(self.plan(&rec, snap, file, RestoreState::Restoring));
            let etag = write_record(self.store, &rec, etag).await?;
            record = Some((rec, etag));
        }
        tracing::warn!(
            "restoring snapshot {key} ({} bytes) into cluster {}: Consul's state is replaced by it",
            file.size,
            self.to.unwrap_or("of this registry")
        );
        agent::restore_snapshot(self.token, file).await?;
        match record {
            Some((mut rec, etag)) => {
                rec.restore = Some(self.plan(&rec, snap, file, RestoreState::Restored));
                let etag = write_record(self.store, &rec, etag).await?;
                self.finish(rec, etag, snap).await
            }
            None => {
                self.tokens(&snap.cluster).await?;
                self.autopilot().await
            }
        }
    }

    /// The restored state holds the old cluster's autopilot settings, and
    /// Consul takes the config file's only into a state that has none:
    /// this cluster's are set again through the API.
    async fn autopilot(&self) -> Result<()> {
        let Some(servers) = self.servers else {
            return Ok(());
        };
        agent::set_autopilot(self.token, &crate::render::autopilot_api(servers))
            .await
            .map_err(|e| {
                e.context("setting this cluster's autopilot configuration again after the restore")
            })
    }

    /// This cluster's tokens made again, then `done`.
    async fn finish(&self, mut rec: ClusterRecord, etag: String, snap: &SnapshotKey) -> Result<()> {
        self.tokens(&snap.cluster).await?;
        self.autopilot().await?;
        let plan = rec.restore.clone();
        rec.restore = plan.map(|p| RestorePlan {
            state: RestoreState::Done,
            node: Some(self.me.to_string()),
            at: Some(Utc::now().to_rfc3339()),
            ..p
        });
        write_record(self.store, &rec, etag).await?;
        Ok(())
    }

    fn plan(
        &self,
        rec: &ClusterRecord,
        snap: &SnapshotKey,
        file: &Spooled,
        state: RestoreState,
    ) -> RestorePlan {
        // The record names only keys of the cluster it restores from: an
        // operator's choice of another cluster's snapshot says so.
        let refused = rec
            .restore
            .as_ref()
            .filter(|p| p.from == snap.cluster)
            .map(|p| p.refused.clone())
            .unwrap_or_default();
        RestorePlan {
            refused,
            from: snap.cluster.clone(),
            state,
            key: Some(snap.key()),
            sha256: Some(file.sha256.clone()),
            node: Some(self.me.to_string()),
            at: Some(Utc::now().to_rfc3339()),
        }
    }

    /// After a restore from another cluster, Consul's ACL state is the
    /// snapshot's. Consul re-runs its leader actions once a restore is in
    /// (agent/consul/snapshot_endpoint.go), and they make the configured
    /// initial management token again when the state lacks it
    /// (leader.go, initializeACLs): this cluster's management token works.
    /// The agents' token, made through the API, is not in the snapshot:
    /// it is made again here.
    async fn tokens(&self, from: &str) -> Result<()> {
        let (Some(url), Some(cluster)) = (&self.tls.secrets, self.to) else {
            return Ok(());
        };
        if from == cluster {
            return Ok(());
        }
        let Some(store) = crate::secrets::open(url).await? else {
            return Ok(());
        };
        let made = crate::secrets::genesis(store.as_ref(), cluster, true).await?;
        let Some(management) = &made.management_token else {
            return Ok(());
        };
        agent::ensure_agent_token(management, &made.agent_token).await?;
        agent::ensure_dns_token(management, &made.dns_token).await?;
        Ok(())
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

/// The newest snapshot of `cluster` and when the store wrote it, for
/// `status` and `members`.
pub async fn newest(store: &dyn Store, cluster: &str) -> Result<Option<(String, DateTime<Utc>)>> {
    let listed = store.list(&snapshots_dir(cluster), None).await?;
    Ok(listed
        .into_iter()
        .filter(|l| SnapshotKey::parse(cluster, &l.key).is_some())
        .max_by(|a, b| a.key.cmp(&b.key))
        .map(|l| (l.key, l.last_modified)))
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
async fn list(
    output: &OutputOpts,
    store: &dyn Store,
    record: Option<&ClusterRecord>,
) -> Result<()> {
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
        output,
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

/// `restore --cancel`: the restore owed at genesis is dropped, unless a
/// server is sending it now.
async fn cancel_owed(output: &OutputOpts, store: &dyn Store) -> Result<()> {
    let Some((mut rec, obj)) = read_record(store).await? else {
        bail!("the registry holds no cluster record: no restore is owed");
    };
    let Some(plan) = rec
        .restore
        .clone()
        .filter(|p| p.state.open() || p.state == RestoreState::Refused)
    else {
        return say(output, json!({"cancelled": false}), || {
            "no restore is owed: nothing to cancel".into()
        });
    };
    if plan.state == RestoreState::Restored {
        bail!(
            "the snapshot {} is already restored; only this cluster's ACL tokens are left to make: nothing to cancel",
            plan.key.as_deref().unwrap_or("?")
        );
    }
    if let Some(why) = busy_elsewhere(store, &rec, &obj, "").await {
        bail!(
            "{why}: it cannot be cancelled half-way; check again with `auto-consul cluster show`"
        );
    }
    rec.restore = Some(RestorePlan {
        state: RestoreState::Cancelled,
        at: Some(Utc::now().to_rfc3339()),
        ..plan.clone()
    });
    write_record(store, &rec, obj.etag).await?;
    say(
        output,
        json!({"cancelled": true, "from": plan.from}),
        || {
            format!(
                "cancelled the restore of cluster {}'s snapshot: cluster {} keeps its own state",
                plan.from, rec.cluster_id
            )
        },
    )
}

/// Prints `json` with `--json`, else the text.
fn say(output: &OutputOpts, json: Value, text: impl FnOnce() -> String) -> Result<()> {
    if output.json {
        println!("{json}");
    } else {
        println!("{}", text());
    }
    Ok(())
}
