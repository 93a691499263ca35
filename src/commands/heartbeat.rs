//! `heartbeat`: ask the local agent how it runs, publish that, renew a
//! server's slot, purge.

use std::collections::HashSet;

use anyhow::Result;
use chrono::Utc;
use serde_json::{Value, json};

use super::open_store;
use super::purge::{Purged, purge_heartbeats};
use super::run::{HEARTBEAT_TIMER, LEAVE_UNIT};
use crate::claims::{Claims, Renewal};
use crate::cli::{ClusterOpts, ConsulOpts, GlobalOpts, IdentityOpts, OutputOpts, SecretOpts};
use crate::decision::slot_is_live;
use crate::install::Root;
use crate::model::Settings;
use crate::model::{HeartbeatBody, HeartbeatKey, Role, slot_key};
use crate::registry::{Condition, PutOutcome, Store, read_cluster, read_slot, read_slots};
use crate::{agent, identity, install, render, retry, state, termination};

/// `heartbeat`, top to bottom: a termination notice first; then what
/// this node is (gather: the agent, its identity, its state, the
/// registry); what it follows (retry_join, rotations, its own token: each
/// a small rewrite of its config under the config lock); its heartbeat
/// keys; on a server, its slot, the cluster's chores and the timer.
pub async fn heartbeat(opts: &GlobalOpts) -> Result<()> {
    let root = Root::new(&opts.consul.root);
    // 1. Spot's two-minute warning, or the autoscaling group's decision,
    //    is seen here first: the node leaves now rather than at shutdown.
    if let Some(reason) = termination::notice(std::time::Duration::from_secs(2)).await {
        tracing::warn!(
            "{reason}: leaving the Consul cluster and the registry instead of heartbeating"
        );
        super::leave::consul_leaves(&opts.cluster, &opts.consul, &opts.tls).await;
        return super::leave::registry_leave(opts).await;
    }
    // 2. The agent first: a node whose agent is down publishes nothing.
    let seen = Seen::gather(&opts.cluster, &opts.identity, &opts.tls, &root).await?;
    // 3. Live servers found again, rotations and its own token followed.
    let node = follow_node(opts, &root, &seen).await?;
    // 4. The heartbeat keys: an agent's is its one write, whatever the
    //    registry holds (no read, no purge).
    if !node.server {
        return agent_beat(&opts.output, &root, &seen, &node).await;
    }
    server_beat(opts, &root, &seen, &node).await
}

/// What a heartbeat finds before it does anything.
struct Seen {
    url: crate::registry::RegistryUrl,
    /// The state file, and whether `run` never wrote it.
    state_file: std::path::PathBuf,
    never_ran: bool,
    deadline: std::time::Instant,
    status: agent::AgentStatus,
    me: identity::Identity,
    saved: Option<state::State>,
    opened: super::Opened,
}

impl Seen {
    /// The local agent (a node `run` never set up is told at once, with no
    /// minute of retries against an agent never started), this node's
    /// identity and state, the registry opened.
    async fn gather(
        cluster: &ClusterOpts,
        identity_opts: &IdentityOpts,
        tls: &SecretOpts,
        root: &Root,
    ) -> Result<Seen> {
        let url = cluster.registry_url()?;
        let state_file = root.path(std::path::Path::new(state::STATE_PATH));
        let never_ran = !state_file.exists();
        let deadline = retry_deadline(cluster, root);
        let status = if never_ran {
            agent::status(tls.acl_token_file.as_deref())
                .await
                .map_err(|e| not_run(&state_file, &format!("{e:#}")))?
        } else {
            retry::until(deadline, "asking the local Consul agent", || {
                agent::status(tls.acl_token_file.as_deref())
            })
            .await?
        };
        let mut me = identity::of(identity_opts).await?;
        let saved = state::load_for(root, &url.to_string(), &me);
        if me.instance_id.is_none() {
            me.instance_id = saved.as_ref().and_then(|s| s.instance_id.clone());
        }
        if let Some(name) = status.node_name.as_ref().filter(|n| **n != me.node) {
            tracing::warn!(
                "the local agent calls itself `{name}`, this node is `{}`",
                me.node
            );
        }
        let opened = open_store(&url).await?;
        Ok(Seen {
            url,
            state_file,
            never_ran,
            deadline,
            status,
            me,
            saved,
            opened,
        })
    }
}

/// What the node follows, and the keys it publishes.
struct Node {
    rejoined: super::rejoin::Rejoin,
    server: bool,
    following: super::rotate::Following,
    keys: Beat,
}

/// retry_join kept current (a leaderless agent made to join); the
/// rotations of the agents' token or the CA followed (secrets made at
/// genesis); a node's own token (--instance-tag) moved to once the leader
/// made it; the heartbeat body.
async fn follow_node(opts: &GlobalOpts, root: &Root, seen: &Seen) -> Result<Node> {
    let store = seen.opened.store.as_ref();
    let rejoined = super::rejoin::rejoin(
        opts,
        root,
        store,
        &seen.status,
        &seen.me,
        opts.cluster.seed(),
        seen.saved.as_ref(),
    )
    .await;
    crate::metrics::live_servers(rejoined.servers.len());
    let decided_server = seen.saved.as_ref().is_some_and(|s| s.mode.is_server());
    let server = seen.status.is_server(seen.me.address, decided_server);
    // A server's Consul node id (its data dir's `node-id`), published for
    // a quorum-loss recovery's peers.json (`auto-consul recover`).
    let node_id = std::fs::read_to_string(root.path(&opts.consul.data_dir.join("node-id")))
        .ok()
        .map(|t| t.trim().to_string());
    let following =
        super::rotate::follow_rotations(&opts.consul, &opts.tls, root, store, seen.saved.as_ref())
            .await;
    let node_token = match &seen.saved {
        Some(s) => {
            super::node_tokens::follow(&opts.cluster, &opts.consul, &opts.tls, root, s).await
        }
        None => None,
    };
    let keys = Beat::new(&seen.me, server, node_id, &following, node_token)?;
    crate::metrics::tls_expiry(
        super::renew::expiries(&opts.consul, &opts.tls, root)
            .into_iter()
            .map(|(what, i)| (what, i.not_after))
            .collect(),
    );
    Ok(Node {
        rejoined,
        server,
        following,
        keys,
    })
}

/// An agent's heartbeat: its keys written, and said.
async fn agent_beat(output: &OutputOpts, root: &Root, seen: &Seen, node: &Node) -> Result<()> {
    let store = seen.opened.store.as_ref();
    node.keys.write(store, seen.deadline).await?;
    state::record_time(root, state::HEARTBEAT_AT, store.now().await);
    crate::metrics::node(crate::model::Mode::Agent, None);
    keep_leave_unit_active(root);
    report(
        output,
        seen,
        node,
        Value::Null,
        &Purged::default(),
        None,
        false,
        json!({"consul_restart": node.following.consul_restart}),
    );
    Ok(())
}

/// A server's heartbeat: its keys, with the cluster record (its settings
/// rule) read alongside, nothing into a registry with no cluster from a
/// node `run` never set up; its slot renewed; the cluster's chores; the
/// timer following the record's expiry; the fleet's purge when due.
async fn server_beat(opts: &GlobalOpts, root: &Root, seen: &Seen, node: &Node) -> Result<()> {
    let store = seen.opened.store.as_ref();
    if seen.never_ran && read_cluster(store).await?.is_none() {
        return Err(not_run(
            &seen.state_file,
            &format!(
                "the local Consul agent says it is a server but the registry {} holds no cluster record",
                seen.url
            ),
        ));
    }
    // The record `follow_rotations` read is current: not read again.
    let read_again = async {
        match node.following.record.clone() {
            Some(r) => Ok(Some(r)),
            None => {
                retry::until(seen.deadline, "reading the cluster record", || {
                    read_cluster(store)
                })
                .await
            }
        }
    };
    let (written, record) = tokio::join!(node.keys.write(store, seen.deadline), read_again);
    written?;
    state::record_time(root, state::HEARTBEAT_AT, store.now().await);
    let record = record?;
    let settings = match &record {
        Some((record, _)) => record.settings(opts.cluster.seed()),
        None => opts.cluster.seed(),
    };
    let (slot_report, my_slot) = renew_slot(
        store,
        &seen.me,
        seen.saved.as_ref(),
        record.as_ref(),
        settings,
    )
    .await?;
    let chores = server_chores(
        &opts.cluster,
        &opts.consul,
        &opts.tls,
        root,
        seen,
        node,
        record.as_ref(),
    )
    .await;
    let saved_mode = seen
        .saved
        .as_ref()
        .map(|s| s.mode)
        .filter(|m| m.is_server());
    crate::metrics::node(saved_mode.unwrap_or(crate::model::Mode::Server), my_slot);
    let timer_changed = follow_expiry(root, settings.expiry)?;
    keep_leave_unit_active(root);
    // One server purges for the fleet, once per expiry.
    let purged = purge_if_due(root, store, my_slot, settings, &seen.me, &node.keys.keys).await?;
    crate::metrics::purged(purged.deleted);
    report(
        &opts.output,
        seen,
        node,
        slot_report,
        &purged,
        Some(settings),
        timer_changed,
        chores,
    );
    Ok(())
}

/// A server's share of the cluster's chores, each a warning when it
/// fails: federation (a secondary's servers following the primary, a
/// primary's making the replication token); the ACL tokens made at genesis
/// made in Consul once; its certificate renewed before it expires; as
/// leader, the rotations under way and the tokens per node.
async fn server_chores(
    cluster_opts: &ClusterOpts,
    consul: &ConsulOpts,
    tls_opts: &SecretOpts,
    root: &Root,
    seen: &Seen,
    node: &Node,
    record: Option<&(crate::model::ClusterRecord, String)>,
) -> Value {
    let (store, saved, me) = (seen.opened.store.as_ref(), seen.saved.as_ref(), &seen.me);
    let management = node.following.management_token.unwrap_or(1);
    // First: a secondary's servers make their datacenter's management
    // token, which the tokens below are made with.
    let mut federation =
        super::federation::follow(cluster_opts, consul, tls_opts, root, store, record, saved).await;
    let reported = super::federation::report_to_primary(
        root,
        store,
        record.filter(|(r, _)| {
            saved.is_some_and(|s| {
                s.mode.is_server() && s.cluster_id.as_deref() == Some(r.cluster_id.as_str())
            })
        }),
        leads(&seen.status, me),
    )
    .await;
    if !reported.is_null() {
        federation["reported"] = reported;
    }
    if let (Some(url), Some(cluster)) = (
        &tls_opts.secrets,
        saved.and_then(|s| s.cluster_id.as_deref()),
    ) && seen.status.leader.is_some()
    {
        // Once a rotation moved the agents' token on, its steps make the
        // tokens: generation 1 is never made again.
        let agent_token = record.is_none_or(|(r, _)| r.agent_token.is_none());
        let writer = |m: String| match record {
            Some((r, _)) => super::federation::acl_writer(consul, root, r, m),
            None => m,
        };
        tokens_in_consul(root, url, cluster, agent_token, management, writer).await;
    }
    let tls = match saved {
        Some(s) => {
            match super::renew::renew_if_due(
                consul,
                tls_opts,
                root,
                me,
                s,
                node.following.generations,
            )
            .await
            {
                Ok(v) => v.unwrap_or(Value::Null),
                Err(e) => {
                    tracing::warn!(
                        "renewing this server's certificate failed: {e:#} (the next heartbeat tries again)"
                    );
                    json!({"renewed": false, "error": format!("{e:#}")})
                }
            }
        }
        None => Value::Null,
    };
    if tls["renewed"] == json!(true) {
        crate::metrics::tls_expiry(
            super::renew::expiries(consul, tls_opts, root)
                .into_iter()
                .map(|(what, i)| (what, i.not_after))
                .collect(),
        );
    }
    let rotation = rotate_if_leader(
        consul,
        tls_opts,
        store,
        &seen.status,
        me,
        record,
        management,
    )
    .await;
    let node_tokens = lead_node_tokens(cluster_opts, consul, tls_opts, root, seen, record).await;
    json!({
        "tls": tls,
        "rotations": rotation,
        "consul_restart": node.following.consul_restart,
        "node_tokens": node_tokens,
        "federation": federation,
    })
}

/// Tokens per node (--instance-tag): the leader makes them ahead, then
/// retires the shared one.
async fn lead_node_tokens(
    cluster_opts: &ClusterOpts,
    consul: &ConsulOpts,
    tls: &SecretOpts,
    root: &Root,
    seen: &Seen,
    record: Option<&(crate::model::ClusterRecord, String)>,
) -> Value {
    let (Some(rec), true, Some(s)) = (record, leads(&seen.status, &seen.me), &seen.saved) else {
        return Value::Null;
    };
    if tls.instance_tag.is_none() {
        return Value::Null;
    }
    let Some(cluster) = s.cluster_id.as_deref().filter(|c| *c == rec.0.cluster_id) else {
        return Value::Null;
    };
    match super::management_token(cluster_opts, consul, tls, cluster).await {
        Ok(Some(m)) => {
            let writer = super::federation::acl_writer(consul, root, &rec.0, m);
            super::node_tokens::lead(tls, root, seen.opened.store.as_ref(), rec, &writer).await
        }
        Ok(None) => Value::Null,
        Err(e) => json!({"error": format!("{e:#}")}),
    }
}

/// One pass of the rotations under way (gossip key, agents' token, CA,
/// management token), when this server's Consul leads (one driver for the
/// cluster); failures are warnings (the next heartbeat goes on from the
/// recorded step). `management`: the generation of the management token
/// this server's Consul holds.
async fn rotate_if_leader(
    consul: &ConsulOpts,
    tls: &SecretOpts,
    store: &dyn Store,
    status: &agent::AgentStatus,
    me: &identity::Identity,
    record: Option<&(crate::model::ClusterRecord, String)>,
    management: u32,
) -> Value {
    let Some((record, etag)) = record.filter(|(r, _)| rotation_under_way(r)) else {
        return Value::Null;
    };
    let Some(url) = tls.secrets.as_ref().filter(|_| leads(status, me)) else {
        return Value::Null;
    };
    let pass = async {
        let secrets_store = crate::secrets::open(url)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no secrets store"))?;
        let token = crate::secrets::management_token(
            secrets_store.as_ref(),
            &record.cluster_id,
            management,
        )
        .await?;
        let leader = Leader {
            consul,
            store,
            secrets: secrets_store.as_ref(),
            token: token.as_deref(),
            node: &me.node,
        };
        leader.drive(record.clone(), etag.clone()).await
    };
    match pass.await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!("a rotation did not go on: {e:#} (the next heartbeat tries again)");
            json!({"error": format!("{e:#}")})
        }
    }
}

/// A secondary datacenter's gossip key and CA rotate with its primary's,
/// whose leader drives them (federation::follow copies them).
fn drives_shared(r: &crate::model::ClusterRecord) -> bool {
    r.primary.is_none()
}

/// Whether the record has a rotation this datacenter's leader drives.
fn rotation_under_way(r: &crate::model::ClusterRecord) -> bool {
    (drives_shared(r) && r.gossip_key.is_some_and(|g| g.rotation.is_some()))
        || r.agent_token.is_some_and(|g| g.rotation.is_some())
        || (drives_shared(r) && r.ca.is_some_and(|g| g.rotation.is_some()))
        || r.management_token
            .as_ref()
            .is_some_and(|g| g.rotation.is_some())
}

/// The leader's pass over the rotations under way, in order: gossip key,
/// agents' token, CA, management token (last: the others use it).
struct Leader<'a> {
    consul: &'a ConsulOpts,
    store: &'a dyn Store,
    secrets: &'a dyn crate::secrets::SecretStore,
    token: Option<&'a str>,
    node: &'a str,
}

impl Leader<'_> {
    async fn drive(
        &self,
        mut record: crate::model::ClusterRecord,
        mut etag: String,
    ) -> Result<Value> {
        let mut out = json!({});
        if drives_shared(&record) && record.gossip_key.is_some_and(|g| g.rotation.is_some()) {
            out["gossip_key"] = super::rotate::drive_gossip_key(
                self.store,
                self.secrets,
                self.token,
                record.clone(),
                etag.clone(),
            )
            .await?;
            self.reread(&mut record, &mut etag).await?;
        }
        if record.agent_token.is_some_and(|g| g.rotation.is_some()) {
            out["agent_token"] = self.agent_token(&record, &etag).await?;
            self.reread(&mut record, &mut etag).await?;
        }
        if drives_shared(&record) && record.ca.is_some_and(|g| g.rotation.is_some()) {
            out["ca"] = super::rotate::drive_ca(self.store, record.clone(), etag.clone()).await?;
            self.reread(&mut record, &mut etag).await?;
        }
        if record
            .management_token
            .as_ref()
            .is_some_and(|g| g.rotation.is_some())
        {
            let management = self
                .token
                .ok_or_else(|| anyhow::anyhow!("no management token: it cannot be rotated"))?;
            out["management_token"] = super::rotate::drive_management_token(
                self.store,
                self.secrets,
                management,
                self.node,
                record,
                etag,
            )
            .await?;
        }
        Ok(out)
    }

    async fn agent_token(&self, record: &crate::model::ClusterRecord, etag: &str) -> Result<Value> {
        let management = self.token.map(str::to_string).ok_or_else(|| {
            anyhow::anyhow!("no management token: the agents' token cannot be rotated")
        })?;
        let root = Root::new(&self.consul.root);
        let writer = super::federation::acl_writer(self.consul, &root, record, management);
        super::rotate::drive_agent_token(
            self.store,
            self.secrets,
            &writer,
            record.clone(),
            etag.to_string(),
        )
        .await
    }

    /// A step rewrote the record: read it again.
    async fn reread(
        &self,
        record: &mut crate::model::ClusterRecord,
        etag: &mut String,
    ) -> Result<()> {
        if let Some((r, e)) = crate::registry::read_cluster(self.store).await? {
            (*record, *etag) = (r, e);
        }
        Ok(())
    }
}

/// Whether this node's Consul leads (one driver for the cluster's chores).
fn leads(status: &agent::AgentStatus, me: &identity::Identity) -> bool {
    status
        .leader
        .as_deref()
        .and_then(super::snapshot::leader_ip)
        == Some(me.address)
}

/// The error for a node `run` never set up.
fn not_run(state_file: &std::path::Path, what: &str) -> anyhow::Error {
    crate::error::usage(format!(
        "{what}, and there is no state file at {}: this node has not run `auto-consul run` \
         (the boot unit auto-consul.service does, and starts the heartbeat timer); run it first",
        state_file.display()
    ))
}

/// One run must not lose a slot to a brief hiccup (a Consul restart, an
/// S3 error): the agent and the registry are retried, within a deadline
/// shorter than the timer's interval, so runs never overlap. The interval
/// is the installed timer's (it follows the cluster record's expiry); the
/// flag's expiry/3 only for a heartbeat run by hand.
fn retry_deadline(cluster: &ClusterOpts, root: &Root) -> std::time::Instant {
    let interval = timer_interval(root).unwrap_or(cluster.expiry() / 3);
    std::time::Instant::now()
        + std::time::Duration::from_secs(interval.saturating_sub(5).clamp(1, 60))
}

/// This run's heartbeat: its keys (`agents/`, and `servers/` for a
/// server) and their one body.
struct Beat {
    keys: Vec<String>,
    body: Vec<u8>,
}

impl Beat {
    fn new(
        me: &identity::Identity,
        server: bool,
        node_id: Option<String>,
        following: &super::rotate::Following,
        node_token: Option<bool>,
    ) -> Result<Beat> {
        let body = serde_json::to_vec(&HeartbeatBody {
            node: me.node.clone(),
            address: me.address,
            instance_id: me.instance_id.clone(),
            mode: if server { "server" } else { "agent" }.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            node_id: node_id.filter(|_| server),
            agent_token_generation: following.agent_token,
            ca_trusted: following.ca_trusted.clone(),
            ca_signed_by: following.ca_signed_by.filter(|_| server),
            management_token_generation: following.management_token.filter(|_| server),
            node_token,
        })?;
        let name = HeartbeatKey {
            time: Utc::now(),
            node: me.node.clone(),
        }
        .name();
        let roles: &[Role] = if server {
            &[Role::Servers, Role::Agents]
        } else {
            &[Role::Agents]
        };
        let keys = roles.iter().map(|r| format!("{}{name}", r.dir())).collect();
        Ok(Beat { keys, body })
    }

    /// Writes every key, each retried within `deadline`: a heartbeat is a
    /// plain write, writing it again is harmless.
    async fn write(&self, store: &dyn Store, deadline: std::time::Instant) -> Result<()> {
        let write = |key: &String| {
            let (key, body) = (key.clone(), self.body.clone());
            retry::until(deadline, "writing a heartbeat", move || {
                let (key, body) = (key.clone(), body.clone());
                async move {
                    match store.put(&key, body, Condition::None).await? {
                        PutOutcome::Written(_) => Ok(()),
                        PutOutcome::Unknown(err) => Err(err),
                        other => anyhow::bail!("writing heartbeat {key}: unexpected {other:?}"),
                    }
                }
            })
        };
        futures::future::try_join_all(self.keys.iter().map(write)).await?;
        Ok(())
    }
}

/// Renews the slot the state file names, unless it is beyond the
/// cluster's count or was claimed for a cluster the registry no longer
/// holds. Returns the `slot` object of the report and the slot held.
async fn renew_slot(
    store: &dyn Store,
    me: &identity::Identity,
    saved: Option<&state::State>,
    record: Option<&(crate::model::ClusterRecord, String)>,
    settings: Settings,
) -> Result<(Value, Option<u32>)> {
    let held = saved.and_then(|s| s.slot.zip(s.claim_id.clone()));
    if let Some((index, _)) = held.as_ref().filter(|(i, _)| *i >= settings.servers) {
        tracing::warn!(
            "the state file names server slot {index}, beyond the cluster's {} servers: not renewing it",
            settings.servers
        );
    }
    // A slot claimed for a cluster the registry no longer holds is not
    // this node's to renew or retake.
    if let (Some(mine), Some(now)) = (
        saved.and_then(|s| s.cluster_id.as_deref()),
        record.map(|(r, _)| r.cluster_id.as_str()),
    ) && mine != now
    {
        tracing::error!(
            "this node serves cluster {mine}, but the registry now holds cluster {now}: not renewing its slot; \
             check `auto-consul cluster show` and this node's Consul data"
        );
        return Ok((Value::Null, None));
    }
    let Some((index, claim)) = held.filter(|(i, _)| *i < settings.servers) else {
        return Ok((Value::Null, None));
    };
    let slot = read_slot(store, index).await?;
    let claims = Claims {
        store,
        me,
        racy: false,
        cluster_id: saved.and_then(|s| s.cluster_id.clone()),
    };
    let renewal = claims.renew(&slot, &claim, settings.expiry).await?;
    match &renewal {
        Renewal::Released => tracing::warn!(
            "{} was released by this node (`leave`): not taking it again; `run` decides afresh at the next boot",
            slot_key(index)
        ),
        Renewal::HeldBy(holder) => tracing::error!(
            "SERVER SLOT LOST: {} is held by {holder}; this node keeps running as a server, \
             so the cluster may have more servers than wanted: check `consul operator raft list-peers`",
            slot_key(index)
        ),
        Renewal::Renewed | Renewal::Retaken => {}
    }
    let mine = matches!(renewal, Renewal::Renewed | Renewal::Retaken).then_some(index);
    let report = json!({
        "index": index,
        "status": match &renewal { Renewal::Renewed => "renewed", Renewal::Retaken => "retaken", Renewal::HeldBy(_) => "lost", Renewal::Released => "released" },
        "holder": match &renewal { Renewal::HeldBy(h) => h.clone(), _ => me.node.clone() },
    });
    Ok((report, mine))
}

/// One node purges for the fleet: the live holder of the lowest slot, or,
/// when no slot is live, any server (two at once do no harm); once per
/// expiry on the store's clock. The recorded time is checked first (no
/// slot reads when a purge is not due); one more than an expiry in the
/// future (another registry's clock, say) does not count. (A reading a
/// second ahead is only the `Date` header's resolution.)
async fn purge_if_due(
    root: &Root,
    store: &dyn Store,
    my_slot: Option<u32>,
    settings: Settings,
    me: &identity::Identity,
    keys: &[String],
) -> Result<Purged> {
    let now = store.now().await;
    let expiry = chrono::Duration::seconds(settings.expiry as i64);
    let due = state::recorded_time(root, state::PURGED_AT)
        .is_none_or(|t| t > now + expiry || t + expiry <= now);
    if !(due && purger(store, my_slot, settings).await?) {
        return Ok(Purged::default());
    }
    let keep: HashSet<String> = keys.iter().cloned().collect();
    let purged = purge_heartbeats(store, settings, Some((&me.node, &keep))).await?;
    state::record_time(root, state::PURGED_AT, now);
    Ok(purged)
}

/// Where a server records that the agents' token exists in Consul (the
/// cluster id), so later heartbeats ask nothing.
const AGENT_TOKEN_MADE: &str = "/var/lib/auto-consul/agent-token-made";
/// Where a server records that the DNS token exists in Consul.
const DNS_TOKEN_MADE: &str = "/var/lib/auto-consul/dns-token-made";

/// A server of a cluster whose secrets were made at genesis makes the
/// agents' token (unless a rotation moved it on) and the DNS token exist
/// in Consul once a leader is up (with the initial management token), then
/// records each. Failures are warnings: the next heartbeat tries again.
async fn tokens_in_consul(
    root: &Root,
    url: &crate::secrets::SecretsUrl,
    cluster: &str,
    agent_token: bool,
    management: u32,
    writer: impl FnOnce(String) -> String,
) {
    let made_for = |marker: &str| {
        std::fs::read_to_string(root.path(std::path::Path::new(marker)))
            .is_ok_and(|c| c.trim() == cluster)
    };
    let want_agent = agent_token && !made_for(AGENT_TOKEN_MADE);
    let want_dns = !made_for(DNS_TOKEN_MADE);
    if !want_agent && !want_dns {
        return;
    }
    let (m, management) = match genesis_tokens(url, cluster, management).await {
        Ok(Some((m, t))) => (m, writer(t)),
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("the ACL tokens made at genesis are not in Consul yet: {e:#}");
            return;
        }
    };
    if want_agent {
        let ensured = agent::ensure_agent_token(&management, &m.agent_token).await;
        mark_made(
            root,
            cluster,
            AGENT_TOKEN_MADE,
            agent::AGENT_POLICY,
            ensured,
        );
    }
    if want_dns {
        let ensured = agent::ensure_dns_token(&management, &m.dns_token).await;
        mark_made(root, cluster, DNS_TOKEN_MADE, agent::DNS_POLICY, ensured);
    }
}

/// The secrets made at genesis, and the management token of generation
/// `management` among them.
async fn genesis_tokens(
    url: &crate::secrets::SecretsUrl,
    cluster: &str,
    management: u32,
) -> Result<Option<(crate::secrets::Material, String)>> {
    let Some(store) = crate::secrets::open(url).await? else {
        return Ok(None);
    };
    let gens = crate::secrets::Generations {
        management_token: management,
        ..Default::default()
    };
    let m = crate::secrets::genesis_with(store.as_ref(), cluster, true, gens).await?;
    let management = m
        .management_token
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no management token"))?;
    Ok(Some((m, management)))
}

/// After a token of `policy` was ensured in Consul: the marker that says
/// so for `cluster` (the next heartbeat then asks no more), or a warning.
fn mark_made(root: &Root, cluster: &str, marker: &str, policy: &str, ensured: Result<bool>) {
    match ensured {
        Ok(created) => {
            if created {
                tracing::info!("made the ACL token of policy {policy} in Consul");
            }
            if let Err(e) = install::write_atomic(
                root,
                &install::FileSpec {
                    path: marker.into(),
                    contents: format!("{cluster}\n"),
                    mode: 0o644,
                    owner: None,
                },
            ) {
                tracing::warn!("could not record that the token of policy {policy} exists: {e:#}");
            }
        }
        Err(e) => tracing::warn!("the token of policy {policy} is not in Consul yet: {e:#}"),
    }
}

/// Whether this server is the fleet's purger: it holds slot `i` and no slot
/// below it is live, or it holds none and no slot is live at all.
async fn purger(store: &dyn Store, my_slot: Option<u32>, settings: Settings) -> Result<bool> {
    let below = my_slot.unwrap_or(settings.servers);
    if below == 0 {
        return Ok(true);
    }
    let slots = read_slots(store, below).await?;
    Ok(!slots.iter().any(|s| slot_is_live(s, settings.expiry)))
}

/// The unit that leaves at termination must be active to act at shutdown;
/// an operator's `systemctl stop` would leave it inactive.
fn keep_leave_unit_active(root: &Root) {
    if root.is_system()
        && root.path(std::path::Path::new(LEAVE_UNIT)).exists()
        && let Err(e) = install::systemctl(&["start", "--no-block", "auto-consul-leave.service"])
    {
        tracing::warn!("could not start auto-consul-leave.service: {e:#}");
    }
}

/// Prints what a heartbeat did.
#[allow(clippy::too_many_arguments)]
fn report(
    output: &OutputOpts,
    seen: &Seen,
    node: &Node,
    slot_report: serde_json::Value,
    purged: &Purged,
    settings: Option<crate::model::Settings>,
    timer_changed: bool,
    extra: Value,
) {
    let (me, status, rejoined) = (&seen.me, &seen.status, &node.rejoined);
    let keys = &node.keys.keys;
    let mode = if node.server { "server" } else { "agent" };
    let tls = &extra["tls"];
    if output.json {
        println!(
            "{}",
            json!({
                "node": me.node,
                "address": me.address.to_string(),
                "mode": mode,
                "keys": keys,
                "slot": slot_report,
                "purged": purged.deleted,
                "agent_self": status.server.is_some(),
                "leader": status.leader,
                "settings": settings,
                "timer_changed": timer_changed,
                "delete_requests": purged.requests,
                "live_servers": rejoined.servers.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "live_servers_from": rejoined.source,
                "retry_join": rejoined.rewritten,
                "joined": rejoined.joined.map(|a| a.to_string()),
                "tls": tls,
                "rotations": extra["rotations"],
                "consul_restart": extra["consul_restart"].as_bool().unwrap_or(false),
                "node_tokens": extra["node_tokens"],
                "federation": extra["federation"],
            })
        );
    } else {
        println!(
            "{} ({}) runs as {mode}: wrote {}",
            me.node,
            me.address,
            keys.join(", ")
        );
        if let Some(status) = slot_report.get("status").and_then(|s| s.as_str()) {
            println!("server slot {}: {status}", slot_report["index"]);
        }
        if let Some(list) = &rejoined.rewritten {
            println!("retry_join is now [{}]", list.join(", "));
        }
        if let Some(a) = rejoined.joined {
            println!("the Consul agent knew no leader: it joined {a}");
        }
        if tls["renewed"] == json!(true) {
            println!(
                "renewed this server's certificate: valid until {} (Consul presents {})",
                tls["not_after"].as_str().unwrap_or("?"),
                tls["served"].as_str().unwrap_or("?")
            );
        }
        if purged.requests > 0 {
            println!(
                "purged {} heartbeats in {} requests",
                purged.deleted, purged.requests
            );
        }
    }
}

/// The interval of the heartbeat timer `run` installed (its
/// `OnUnitActiveSec=`, in seconds), if there is one.
fn timer_interval(root: &Root) -> Option<u64> {
    let text = std::fs::read_to_string(root.path(std::path::Path::new(HEARTBEAT_TIMER))).ok()?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix("OnUnitActiveSec="))
        .and_then(|v| v.trim().trim_end_matches('s').parse().ok())
}

/// Rewrites the heartbeat timer `run` installed when the cluster's expiry
/// changed, and re-arms it (on a live system); whether it changed. A timer
/// this node does not have (run by hand, another root) is left alone.
fn follow_expiry(root: &Root, expiry: u64) -> Result<bool> {
    let path = std::path::Path::new(HEARTBEAT_TIMER);
    let Ok(current) = std::fs::read_to_string(root.path(path)) else {
        return Ok(false);
    };
    let wanted = render::heartbeat_timer(expiry);
    if current == wanted {
        return Ok(false);
    }
    tracing::warn!("the cluster's expiry is now {expiry}s: rewriting {HEARTBEAT_TIMER}");
    install::write_atomic(
        root,
        &install::FileSpec {
            path: path.into(),
            contents: wanted,
            mode: 0o644,
            owner: None,
        },
    )?;
    if root.is_system() {
        install::systemctl(&["daemon-reload"])?;
        install::systemctl(&["restart", "--no-block", "auto-consul-heartbeat.timer"])?;
    }
    Ok(true)
}
