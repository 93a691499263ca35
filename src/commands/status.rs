//! `status`: whether this node is healthy, for a person and for a
//! monitoring check (exit 0 healthy, 1 degraded, each reason named).
//!
//! It reads what `run` and `heartbeat` left on the node (the state file,
//! the time of the last heartbeat written), the cluster record and this
//! node's slot (two GETs; never a listing, so a fleet's checks cost no
//! more than that), the local agent, and the heartbeat timer.

use anyhow::Result;

use serde_json::{Value, json};

use super::open_store;
use crate::cli::{ClusterOpts, ConsulOpts, GlobalOpts, SecretOpts, SnapshotOpts, WaitOpts};
use crate::install::Root;
use crate::registry::read_slot;
use crate::{agent, state};

/// The heartbeat timer's state, where systemd runs (`None` elsewhere).
fn timer_state(root: &Root) -> Option<String> {
    if !root.is_system() {
        return None;
    }
    let out = std::process::Command::new("systemctl")
        .args(["is-active", "auto-consul-heartbeat.timer"])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|s| !s.is_empty())
}

/// How many days before a TLS file expires `status` is degraded.
const TLS_WARN_DAYS: i64 = 14;

/// `status`: what the node left, the registry, the heartbeat's age, the
/// local agent and the timer, each adding the reasons it is degraded.
pub async fn status(opts: &GlobalOpts) -> Result<()> {
    let root = Root::new(&opts.consul.root);
    let mut h = Health {
        saved: state::load(&root),
        settings: opts.cluster.seed(),
        reasons: Vec::new(),
        cluster: Value::Null,
        slot: Value::Null,
        agent: Value::Null,
        heartbeat_age: None,
        timer: None,
        snapshot: Value::Null,
        tls: Value::Null,
    };
    if h.saved.is_none() {
        h.degraded("this node has no state: `auto-consul run` never set it up");
    }
    h.registry(&opts.cluster, &opts.snapshots, &root).await;
    h.heartbeat_age();
    h.agent(&opts.tls).await;
    h.tls(&opts.consul, &opts.tls, &root);
    h.timer = timer_state(&root);
    if let Some(t) = h.timer.clone().filter(|t| *t != "active") {
        h.degraded(format!("auto-consul-heartbeat.timer is {t}"));
    }
    if opts.output.json {
        println!("{}", h.json(&opts.waits));
    } else {
        h.print(&opts.waits);
    }
    if h.reasons.is_empty() {
        Ok(())
    } else {
        Err(crate::error::Degraded.into())
    }
}

/// What `status` found, and why the node is degraded.
struct Health {
    saved: Option<state::State>,
    settings: crate::model::Settings,
    reasons: Vec<String>,
    cluster: Value,
    slot: Value,
    agent: Value,
    heartbeat_age: Option<i64>,
    timer: Option<String>,
    /// A server's view of its cluster's newest snapshot.
    snapshot: Value,
    /// The expiry of the TLS files auto-consul made.
    tls: Value,
}

impl Health {
    fn degraded(&mut self, why: impl Into<String>) {
        self.reasons.push(why.into());
    }

    /// The CA and (servers) the certificate auto-consul made: degraded 14
    /// days before either expires, by this node's clock.
    fn tls(&mut self, consul_opts: &ConsulOpts, tls: &SecretOpts, root: &Root) {
        let now = chrono::Utc::now().timestamp();
        let mut out = serde_json::Map::new();
        for (what, info) in super::renew::expiries(consul_opts, tls, root) {
            let left = info.not_after - now;
            let until = super::renew::stamp(info.not_after);
            if left <= TLS_WARN_DAYS * 86_400 {
                let fix = if what == "ca" {
                    "rotate the CA (`auto-consul secrets rotate ca`)"
                } else {
                    "the server's heartbeat renews it: is auto-consul-heartbeat.timer running, and does \
                     its journal say why it did not?"
                };
                self.degraded(format!(
                    "this node's TLS {what} expires at {until} ({} days left): {fix}",
                    left.div_euclid(86_400)
                ));
            }
            out.insert(
                what.into(),
                json!({"not_after": until, "days_left": left.div_euclid(86_400)}),
            );
        }
        if !out.is_empty() {
            self.tls = Value::Object(out);
        }
    }

    /// The cluster record and this node's slot (two GETs; never a
    /// listing), and the time of its last heartbeat on the store's clock.
    async fn registry(
        &mut self,
        cluster_opts: &ClusterOpts,
        snapshots: &SnapshotOpts,
        root: &Root,
    ) {
        let url = match cluster_opts.registry_url() {
            Ok(url) => url,
            Err(e) => return self.degraded(format!("{e:#}")),
        };
        let opened = match open_store(&url).await {
            Ok(o) => o,
            Err(e) => return self.degraded(format!("the registry {url} cannot be opened: {e:#}")),
        };
        let store = opened.store.as_ref();
        match super::snapshot::read_record(store).await {
            Err(e) => self.degraded(format!("the registry {url} cannot be read: {e:#}")),
            Ok(None) => self.degraded(format!("the registry {url} has no cluster record")),
            Ok(Some((record, obj))) => {
                self.record(cluster_opts, &record);
                if self.saved.as_ref().is_some_and(|s| s.mode.is_server()) {
                    let record_age =
                        crate::model::age_seconds(obj.last_modified, store.now().await);
                    self.snapshot(snapshots, store, &record.cluster_id, record_age)
                        .await;
                    if let Some((at, why)) = super::snapshot::last_failure(root) {
                        self.degraded(format!(
                            "this server's last snapshot save failed at {}: {why}",
                            at.to_rfc3339()
                        ));
                        self.snapshot["last_failure"] =
                            json!({"at": at.to_rfc3339(), "reason": why});
                    }
                }
            }
        }
        if let Some((node, instance, index)) = self
            .saved
            .as_ref()
            .and_then(|s| s.slot.map(|i| (s.node.clone(), s.instance_id.clone(), i)))
        {
            match read_slot(store, index).await {
                Err(e) => self.degraded(format!("server slot {index} cannot be read: {e:#}")),
                Ok(view) => self.slot(&view, &node, instance.as_deref(), index),
            }
        }
        let now = store.now().await;
        self.heartbeat_age =
            state::recorded_time(root, state::HEARTBEAT_AT).map(|t| (now - t).num_seconds().max(0));
    }

    /// A server's check of its cluster's newest snapshot (one listing, on
    /// servers only): degraded when the newest is older than two
    /// intervals and ten minutes (the leader's timer is not saving), or
    /// when there is none and the cluster record (`record_age`, on the
    /// store's clock) is that old.
    async fn snapshot(
        &mut self,
        snapshots_opts: &SnapshotOpts,
        store: &dyn crate::registry::Store,
        cluster: &str,
        record_age: u64,
    ) {
        let interval = snapshots_opts.interval();
        let late = |age: u64| interval > 0 && age > 2 * interval + 600;
        match super::snapshot::newest(store, cluster).await {
            Err(e) => self.degraded(format!("the snapshots cannot be listed: {e:#}")),
            Ok(None) => {
                if late(record_age) {
                    self.degraded(format!(
                        "cluster {cluster} has no snapshot, and its record is {record_age}s old, past two intervals \
                         ({interval}s): is auto-consul-snapshot.timer running on the leader? (its journal says why)"
                    ));
                }
                self.snapshot = json!({"newest": null, "interval": interval});
            }
            Ok(Some((key, at))) => {
                let age = crate::model::age_seconds(at, store.now().await);
                if late(age) {
                    self.degraded(format!(
                        "the newest snapshot {key} is {age}s old, past two intervals ({interval}s): \
                         is auto-consul-snapshot.timer running on the leader?"
                    ));
                }
                self.snapshot = json!({"newest": key, "age_seconds": age, "interval": interval});
            }
        }
    }

    fn record(&mut self, cluster_opts: &ClusterOpts, record: &crate::model::ClusterRecord) {
        self.settings = record.settings(cluster_opts.seed());
        if record.retired {
            self.degraded(format!("cluster {} is retired", record.cluster_id));
        }
        if let Some(plan) = record.restore.as_ref().filter(|p| p.state.open()) {
            self.degraded(format!(
                "cluster {} still owes the restore of cluster {}'s snapshot ({}): the leader's \
                 auto-consul-snapshot.service does it (`auto-consul restore --cancel` drops it)",
                record.cluster_id,
                plan.from,
                if plan.state == crate::model::RestoreState::Pending {
                    "pending"
                } else {
                    "under way"
                }
            ));
        }
        if let Some(plan) = record
            .restore
            .as_ref()
            .filter(|p| p.state == crate::model::RestoreState::Refused)
        {
            self.degraded(format!(
                "Consul refused every snapshot cluster {} left ({}): cluster {} runs on its own \
                 state; restore one by hand (`auto-consul restore` lists them, `auto-consul restore \
                 KEY` restores one), or keep this state with `auto-consul restore --cancel`",
                plan.from,
                plan.refused.join(", "),
                record.cluster_id
            ));
        }
        // A server's Raft data is its cluster's; an agent follows the
        // servers it finds (and decides again at its next boot).
        if let Some(mine) = self
            .saved
            .as_ref()
            .filter(|s| s.mode.is_server())
            .and_then(|s| s.cluster_id.clone())
            && mine != record.cluster_id
        {
            self.degraded(format!(
                "this node joined cluster {mine}, the registry now holds {}",
                record.cluster_id
            ));
        }
        let s = self.settings;
        self.cluster = json!({
            "cluster_id": record.cluster_id,
            "bootstrap_node": record.bootstrap_node,
            "servers": s.servers,
            "expiry": s.expiry,
            "agent_expiry": s.agent_expiry,
            "retired": record.retired,
            "restore": record.restore,
        });
    }

    fn slot(
        &mut self,
        view: &crate::registry::SlotView,
        node: &str,
        instance: Option<&str>,
        index: u32,
    ) {
        let holder = view.record.as_ref();
        let mine = holder.is_some_and(|h| h.held_by(node, instance));
        if !mine {
            self.degraded(format!(
                "server slot {index} is held by {}, not this node",
                holder.map_or("nobody", |h| h.node.as_str())
            ));
        } else if view.age_seconds > self.settings.expiry {
            self.degraded(format!(
                "server slot {index} was last renewed {}s ago, past the expiry ({}s)",
                view.age_seconds, self.settings.expiry
            ));
        }
        self.slot = json!({
            "index": index,
            "holder": holder.map(|h| h.node.clone()),
            "held": mine,
            "age_seconds": view.age_seconds,
        });
    }

    /// The last heartbeat against the expiry of this node's kind.
    fn heartbeat_age(&mut self) {
        let server = self.saved.as_ref().is_some_and(|s| s.mode.is_server());
        let expiry = if server {
            self.settings.expiry
        } else {
            self.settings.agent_expiry
        };
        match self.heartbeat_age {
            None => self.degraded("no heartbeat has been written from this node"),
            Some(age) if age as u64 > expiry => self.degraded(format!(
                "the last heartbeat was written {age}s ago, past the expiry ({expiry}s): is auto-consul-heartbeat.timer running?"
            )),
            Some(_) => {}
        }
    }

    /// The local agent: answering, knowing a leader, running in the mode
    /// `run` decided (another config file can make a server a client).
    async fn agent(&mut self, tls: &SecretOpts) {
        self.agent = match agent::status(tls.acl_token_file.as_deref()).await {
            Ok(a) => {
                if a.leader.is_none() {
                    self.degraded("the local Consul agent knows no leader");
                }
                if let (Some(mode), Some(is_server)) =
                    (self.saved.as_ref().map(|s| s.mode), a.server)
                    && mode.is_server() != is_server
                {
                    self.degraded(format!(
                        "`run` decided {}, but the local Consul agent runs as {}: check the other files of the config dir (`auto-consul plan` names them)",
                        mode.as_str(),
                        if is_server { "a server" } else { "a client" }
                    ));
                }
                json!({ "answering": true, "leader": a.leader, "server_peers": a.peers.len() })
            }
            Err(e) => {
                self.degraded(format!("{e:#}"));
                json!({ "answering": false })
            }
        };
    }

    fn json(&self, waits: &WaitOpts) -> Value {
        let saved = self.saved.as_ref();
        json!({
            "healthy": self.reasons.is_empty(),
            "reasons": self.reasons,
            "node": saved.map(|s| s.node.clone()),
            "address": saved.map(|s| s.address.to_string()),
            "role": waits.role.as_str(),
            "mode": saved.map(|s| s.mode.as_str()),
            "cluster_id": saved.and_then(|s| s.cluster_id.clone()),
            "claim_id": saved.and_then(|s| s.claim_id.clone()),
            "slot": self.slot,
            "cluster": self.cluster,
            "agent": self.agent,
            "heartbeat_age_seconds": self.heartbeat_age,
            "timer": self.timer,
            "snapshot": self.snapshot,
            "tls": self.tls,
        })
    }

    fn print(&self, waits: &WaitOpts) {
        match &self.saved {
            Some(s) => println!(
                "node {} ({}): {}{}, role {}",
                s.node,
                s.address,
                s.mode.as_str(),
                s.slot
                    .map(|i| format!(" in server slot {i}"))
                    .unwrap_or_default(),
                waits.role.as_str()
            ),
            None => println!("node: not set up"),
        }
        let cluster = &self.cluster;
        if let Some(id) = cluster["cluster_id"].as_str() {
            println!(
                "cluster {id} (bootstrapped by {}): {} servers, expiry {}s, agent expiry {}s",
                cluster["bootstrap_node"].as_str().unwrap_or("?"),
                cluster["servers"],
                cluster["expiry"],
                cluster["agent_expiry"]
            );
        }
        if let Some(age) = self.slot["age_seconds"].as_u64() {
            println!(
                "slot holder: {} (renewed {age}s ago)",
                self.slot["holder"].as_str().unwrap_or("nobody")
            );
        }
        let agent = &self.agent;
        println!(
            "consul agent: {}",
            if agent["answering"] == json!(true) {
                format!(
                    "answering, leader {}, {} server peers",
                    agent["leader"].as_str().unwrap_or("none"),
                    agent["server_peers"]
                )
            } else {
                "not answering".into()
            }
        );
        match self.heartbeat_age {
            Some(age) => println!("last heartbeat: {age}s ago"),
            None => println!("last heartbeat: none"),
        }
        if let Some(t) = &self.timer {
            println!("heartbeat timer: {t}");
        }
        if !self.snapshot.is_null() {
            match self.snapshot["newest"].as_str() {
                Some(key) => println!(
                    "newest snapshot: {key} ({}s ago)",
                    self.snapshot["age_seconds"]
                ),
                None => println!("newest snapshot: none yet"),
            }
        }
        if self.reasons.is_empty() {
            println!("healthy");
        } else {
            println!("DEGRADED: {}", self.reasons.join("; "));
        }
    }
}
