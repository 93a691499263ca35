//! The election: sticky state first, then read, decide and claim until
//! one claim settles the mode (DESIGN.md's algorithm around the pure
//! decision in `crate::decision`).

use std::time::Duration;

use anyhow::{Result, bail};
use chrono::Utc;

use super::VIEW_AGENTS;
use crate::claims::{Claims, Renewal};
use crate::cli::RoleWanted;
use crate::decision::{self, Step};
use crate::identity::Identity;
use crate::model::{CLUSTER_KEY, ClusterRecord, Mode, Settings};
use crate::registry::{Agents, Condition, RegistryView, Store, read_view};
use crate::retry::Backoff;
use crate::state::State;

/// How long a joiner waits for the record of a cluster whose bootstrap
/// node holds slot 0 but has not written it yet.
pub(super) const PENDING_WAIT: Duration = Duration::from_secs(5);
/// The name of a cluster that neither a record nor a slot names
/// (`--replace-cluster unnamed` replaces it).
pub(super) const UNNAMED: &str = "unnamed";
/// Rounds of read-decide-claim before giving up under contention.
pub(super) const MAX_ROUNDS: u32 = 12;
/// An election that cannot succeed on this boot: the witness rule forbids
/// a cluster, or the role cannot be had within its wait. An instance in
/// an autoscaling group abandons its launch on it.
#[derive(Debug)]
pub(super) struct Definitive(pub(super) String);

impl std::fmt::Display for Definitive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Definitive {}

/// What the election settled on.
#[derive(Debug, Clone)]
pub(super) struct Elected {
    pub(super) mode: Mode,
    pub(super) cluster_id: Option<String>,
    pub(super) slot: Option<u32>,
    pub(super) claim_id: Option<String>,
    pub(super) view: RegistryView,
    /// The witness rule was checked against `view` in the round that
    /// settled the mode (a fresh bootstrap): the gate need not ask again.
    pub(super) witnessed: bool,
}

/// Everything a node needs to take part in the election.
pub(super) struct Elector<'a> {
    pub(super) store: &'a dyn Store,
    pub(super) me: &'a Identity,
    pub(super) registry: String,
    /// This node's flags: they seed a new cluster's record only.
    pub(super) seed: Settings,
    /// Write nothing (`plan`).
    pub(super) dry_run: bool,
    /// The store ignores conditions and the operator accepted it.
    pub(super) racy: bool,
    /// The AWS configuration, for asking EC2 about an old cluster's servers.
    pub(super) aws: Option<&'a aws_config::SdkConfig>,
    /// The cluster the operator allows to be replaced (`--replace-cluster`).
    pub(super) replace: Option<String>,
    /// How long to wait for an old cluster's servers (witness rule).
    pub(super) witness_wait: Duration,
    /// What this node may become (`--role`).
    pub(super) role: RoleWanted,
    /// How long a `server` waits for a slot, an `agent` for a server.
    pub(super) role_wait: Duration,
    /// The secrets store (--secrets): a new cluster's secrets are made
    /// before its record is written.
    pub(super) secrets: Option<&'a dyn crate::secrets::SecretStore>,
}

impl Elector<'_> {
    pub(super) fn claims(&self, cluster_id: Option<&String>) -> Claims<'_> {
        Claims {
            store: self.store,
            me: self.me,
            racy: self.racy,
            cluster_id: cluster_id.cloned(),
        }
    }

    /// The mode decision of DESIGN.md, then the one gate every bootstrap
    /// passes: whatever path settled on [`Mode::Bootstrap`] (a fresh
    /// genesis, a kept state file, a slot 0 found held without one), the
    /// node bootstraps only through [`Self::may_bootstrap`]; otherwise it
    /// joins as a plain server.
    pub(super) async fn elect(
        &self,
        previous: Option<&State>,
        raft: bool,
        first: RegistryView,
    ) -> Result<Elected> {
        let mut elected = self.elect_mode(previous, raft, first).await?;
        if elected.mode == Mode::Bootstrap
            && !self
                .may_bootstrap(&elected.view, raft, elected.witnessed)
                .await?
        {
            elected.mode = Mode::Server;
        }
        Ok(elected)
    }

    /// The gate of DESIGN.md's "`bootstrap: true` has one gate": Consul
    /// bootstraps Raft whenever `bootstrap` is set and it has no Raft
    /// state, before it joins anyone. So `bootstrap` is written only when
    /// this node has no Raft state and no other server of the cluster is
    /// live (slot, heartbeat, a record just written) or unconfirmed (an
    /// unreleased slot whose instance EC2 does not confirm gone).
    /// `witnessed`: the witness rule already held for `view` this round.
    pub(super) async fn may_bootstrap(
        &self,
        view: &RegistryView,
        raft: bool,
        witnessed: bool,
    ) -> Result<bool> {
        if raft {
            tracing::info!(
                "this node holds Raft state: Consul is past its bootstrap, so it starts as a plain server"
            );
            return Ok(false);
        }
        // A genesis this node began but never finished (it took slot 0 for
        // cluster Y and stopped before the record named Y): config files
        // are written only after the record, so no Consul of Y has ever
        // run. The servers that joined meanwhile wait for this node;
        // nothing of Y can be split, and not bootstrapping would leave Y
        // without a leader for ever.
        if unfinished_genesis(view, self.me) {
            return Ok(true);
        }
        let others = decision::live_servers_for(
            view,
            &self.me.node,
            self.me.instance_id.as_deref(),
            view.settings.expiry,
        );
        if !others.is_empty() {
            tracing::warn!(
                "this node holds the cluster's slot 0 but no Raft state, and {} other servers are live ({}): \
                 bootstrapping would start a second cluster beside them, so it joins them as a plain server",
                others.len(),
                others
                    .iter()
                    .map(|m| m.node.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            return Ok(false);
        }
        if witnessed {
            return Ok(true);
        }
        let unconfirmed = self.unconfirmed_servers(view).await?;
        if !unconfirmed.is_empty() {
            tracing::warn!(
                "this node holds the cluster's slot 0 but no Raft state, and other servers of the cluster \
                 are not confirmed gone ({}): they may hold its Raft data, so it starts as a plain server \
                 and waits for them",
                unconfirmed
                    .iter()
                    .map(|u| format!("{}: {}", u.holder.node, u.why))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            return Ok(false);
        }
        Ok(true)
    }

    /// The mode decision of DESIGN.md: sticky state first, then read,
    /// decide and claim until one claim settles it. Rounds lost to other
    /// nodes are bounded; so is the wait for an old cluster's servers.
    async fn elect_mode(
        &self,
        previous: Option<&State>,
        raft: bool,
        first: RegistryView,
    ) -> Result<Elected> {
        let mut first = Some(first);
        let witness_deadline = std::time::Instant::now() + self.witness_wait;
        let role_deadline = std::time::Instant::now() + self.role_wait;
        let mut role_said = false;
        let mut waiting_said = false;
        let mut pending_since: Option<std::time::Instant> = None;
        let mut pending_said = false;
        let mut round = 0;
        let mut backoff = Backoff::CONTENTION;
        loop {
            let view = match first.take() {
                Some(view) => view,
                None => read_view(self.store, self.seed, Agents::Recent(VIEW_AGENTS)).await?,
            };
            let settings = view.settings;
            // The record's cluster; with no record yet, the one a live slot
            // 0 was claimed for (a bootstrap still writing its record).
            let cluster_id = view.record().map(|r| r.cluster_id.clone()).or_else(|| {
                view.slots
                    .first()
                    .filter(|s| decision::slot_is_live(s, settings.expiry))
                    .and_then(|s| s.record.as_ref())
                    .and_then(|r| r.cluster_id.clone())
            });
            // A slot this node released when it left is not kept: the node
            // decides afresh (a spot instance started again, an operator's
            // `leave`).
            let left = |p: &State| {
                p.slot.zip(p.claim_id.as_ref()).is_some_and(|(i, c)| {
                    view.slots
                        .get(i as usize)
                        .and_then(|s| s.record.as_ref())
                        .is_some_and(|r| r.released && r.claim_id == *c)
                })
            };
            if let Some(prev) = previous
                .filter(|p| same_cluster(p.cluster_id.as_ref(), cluster_id.as_ref()))
                .filter(|p| !left(p))
            {
                return self.keep(prev, cluster_id, view).await;
            }
            // A server of a cluster since replaced, still holding its Raft
            // data: joining the new cluster with it would mix the two.
            if raft
                && let Some(x) = previous.and_then(|p| p.cluster_id.as_ref())
                && let Some(y) = &cluster_id
            {
                bail!(
                    "this node served cluster {x} and holds its Raft data, but the registry {} now holds cluster {y}: \
                     joining {y} with {x}'s Raft data would mix two clusters. If {x} is gone for good, stop consul, \
                     move the raft/ directory of the Consul data dir aside, and run again",
                    self.registry
                );
            }
            // Another node is between taking slot 0 and writing its
            // record (a few milliseconds): its settings rule, and are not
            // known yet. Wait for the record, bounded: a bootstrap node
            // killed in between is finished when it runs again, and
            // meanwhile counts as a live server.
            if let Some(y) = decision::bootstrap_in_progress(
                &view,
                &self.me.node,
                self.me.instance_id.as_deref(),
                settings.expiry,
            ) {
                let waited = pending_since.get_or_insert_with(std::time::Instant::now);
                if waited.elapsed() < PENDING_WAIT {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                if !pending_said {
                    tracing::warn!(
                        "cluster {y} holds slot 0 but has no record after {}s: deciding with the settings at hand",
                        PENDING_WAIT.as_secs()
                    );
                    pending_said = true;
                }
            }
            let step = decision::decide(
                &view,
                &self.me.node,
                self.me.instance_id.as_deref(),
                settings.servers,
                settings.expiry,
                raft,
            );
            tracing::debug!("round {round}: {step:?}");
            // The role narrows the step: a `server` never settles as an
            // agent, an `agent` never claims or bootstraps. Either waits
            // (bounded) for the registry to offer what it may take.
            let live = decision::live_servers(&view, &self.me.node, settings.expiry);
            let blocked = match (self.role, &step) {
                (RoleWanted::Server, Step::Agent) => Some(format!(
                    "--role server, but all {} server slots of the registry {} are held by live servers ({}): \
                     waiting for one to be released or to expire",
                    settings.servers,
                    self.registry,
                    live.iter()
                        .map(|m| m.node.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                (RoleWanted::Agent, Step::Bootstrap { .. } | Step::Claim(_)) if live.is_empty() => {
                    Some(format!(
                        "--role agent, and the registry {} has no live server to join: waiting for one \
                         (servers come from the nodes given --role server or auto)",
                        self.registry
                    ))
                }
                _ => None,
            };
            if let Some(why) = blocked {
                let now = std::time::Instant::now();
                if self.dry_run || now >= role_deadline {
                    return Err(Definitive(format!(
                        "{why}; gave up after {}s (the boot unit tries again; --role-wait sets the wait)",
                        self.role_wait.as_secs()
                    ))
                    .into());
                }
                if !role_said {
                    tracing::warn!("{why} (up to {}s)", self.role_wait.as_secs());
                    role_said = true;
                }
                let poll = Duration::from_secs((settings.expiry / 8).clamp(1, 5));
                tokio::time::sleep(poll.min(role_deadline - now)).await;
                continue;
            }
            let step = match (self.role, step) {
                // An agent that still holds a slot (its role changed) does
                // not renew it; it expires and a server takes it.
                (
                    RoleWanted::Agent,
                    Step::Renew { .. } | Step::Claim(_) | Step::Bootstrap { .. },
                ) => Step::Agent,
                (_, step) => step,
            };
            let elected = |mode, slot: Option<(u32, String)>, cluster_id, view| Elected {
                mode,
                cluster_id,
                slot: slot.as_ref().map(|s| s.0),
                claim_id: slot.map(|s| s.1),
                view,
                witnessed: false,
            };
            match step {
                Step::Agent => return Ok(elected(Mode::Agent, None, cluster_id, view)),
                Step::Renew {
                    index,
                    etag,
                    bootstrap,
                } => {
                    // The bootstrap node whose state file was never written
                    // is still the one to bootstrap (until Raft state exists).
                    let mode = if bootstrap {
                        Mode::Bootstrap
                    } else {
                        Mode::Server
                    };
                    let held = view.slots[index as usize].record.as_ref();
                    // The cluster this slot was claimed for: a bootstrap
                    // interrupted before its record was written finishes
                    // it under that id.
                    let slot_cluster = held.and_then(|r| r.cluster_id.clone());
                    let serves = if bootstrap {
                        slot_cluster.clone().or(cluster_id.clone())
                    } else {
                        cluster_id.clone()
                    };
                    if self.dry_run {
                        let claim = held.map(|r| (index, r.claim_id.clone()));
                        return Ok(elected(mode, claim, serves, view));
                    }
                    let claim = held.map_or_else(new_id, |r| r.claim_id.clone());
                    let sequence = held.map_or(1, |r| r.sequence + 1);
                    if self
                        .claims(serves.as_ref())
                        .write_slot(index, &claim, sequence, Condition::Matches(etag))
                        .await?
                    {
                        if bootstrap && let Some(id) = &serves {
                            self.finish_bootstrap(&view, id).await?;
                        }
                        return Ok(elected(mode, Some((index, claim)), serves, view));
                    }
                }
                Step::Bootstrap { cluster, slot0 } => {
                    let unconfirmed = self.unconfirmed_servers(&view).await?;
                    if !unconfirmed.is_empty() {
                        let message = self.witness_message(&view, &unconfirmed);
                        let now = std::time::Instant::now();
                        if self.dry_run || now >= witness_deadline {
                            return Err(Definitive(message).into());
                        }
                        if !waiting_said {
                            tracing::warn!(
                                "{message} Waiting up to {}s for them to come back or be confirmed gone.",
                                self.witness_wait.as_secs()
                            );
                            waiting_said = true;
                        }
                        let poll = Duration::from_secs((settings.expiry / 4).clamp(1, 5));
                        tokio::time::sleep(poll.min(witness_deadline - now)).await;
                        continue;
                    }
                    if self.dry_run {
                        let mut out = elected(Mode::Bootstrap, None, cluster_id, view);
                        out.witnessed = true;
                        return Ok(out);
                    }
                    // Slot 0 first: the node that takes it is the bootstrap
                    // node. Joiners only claim once they see a live server,
                    // and no live server exists before slot 0 is taken, so
                    // any view of theirs that shows slot 0 free is stale and
                    // their conditional write on it fails: the bootstrap
                    // node always holds slot 0, and servers never outnumber
                    // the slots.
                    let id = new_id();
                    let claim = new_id();
                    if self
                        .claims(Some(&id))
                        .write_slot(0, &claim, 1, slot0)
                        .await?
                    {
                        if let Some(stale) = &cluster_id {
                            tracing::warn!(
                                "every server of cluster {stale} is confirmed gone: bootstrapping a NEW, EMPTY cluster {id} in its place"
                            );
                        }
                        // A new cluster: this node's flags seed its record.
                        if !self.write_cluster(&id, cluster, self.seed).await? {
                            // Someone changed the record between our read
                            // and now: finish under whatever is there.
                            let now = read_view(self.store, self.seed, Agents::Recent(0)).await?;
                            self.finish_bootstrap(&now, &id).await?;
                        }
                        // The new cluster's settings are the ones it was
                        // seeded with, whatever the record it replaced said.
                        let mut view = view;
                        view.settings = self.seed;
                        let mut out = elected(Mode::Bootstrap, Some((0, claim)), Some(id), view);
                        out.witnessed = true;
                        return Ok(out);
                    }
                }
                Step::Claim(free) => {
                    if raft && free.is_empty() {
                        tracing::warn!(
                            "this node has Raft state but every server slot is held: running as a server without a slot"
                        );
                        return Ok(elected(Mode::Server, None, cluster_id, view));
                    }
                    for (index, condition) in free {
                        if self.dry_run {
                            return Ok(elected(Mode::Server, None, cluster_id, view));
                        }
                        let claim = new_id();
                        if self
                            .claims(cluster_id.as_ref())
                            .write_slot(index, &claim, 1, condition)
                            .await?
                        {
                            return Ok(elected(
                                Mode::Server,
                                Some((index, claim)),
                                cluster_id,
                                view,
                            ));
                        }
                    }
                }
            }
            // Lost every race this round: back off a little, read again.
            round += 1;
            if round >= MAX_ROUNDS {
                bail!(
                    "could not settle this node's mode after {MAX_ROUNDS} rounds of contention on the registry {}; run again",
                    self.registry
                );
            }
            tokio::time::sleep(backoff.delay()).await;
        }
    }

    /// Step 1: keep the recorded mode, and a server's slot.
    pub(super) async fn keep(
        &self,
        prev: &State,
        cluster_id: Option<String>,
        view: RegistryView,
    ) -> Result<Elected> {
        let settings = view.settings;
        // A bootstrap node's mode is kept; whether it may still bootstrap
        // (no Raft state, no other server live or unconfirmed) is the
        // gate's to say, as on every path.
        let mode = prev.mode;
        let elected = Elected {
            mode,
            cluster_id: cluster_id.or_else(|| prev.cluster_id.clone()),
            slot: prev.slot,
            claim_id: prev.claim_id.clone(),
            view,
            witnessed: false,
        };
        if !mode.is_server() || self.dry_run {
            return Ok(elected);
        }
        let (Some(index), Some(claim)) = (prev.slot, prev.claim_id.clone()) else {
            return Ok(elected);
        };
        let Some(slot) = elected.view.slots.get(index as usize).cloned() else {
            tracing::error!(
                "this server held slot {index}, beyond the cluster's {} servers: it keeps running without a slot",
                settings.servers
            );
            return Ok(elected);
        };
        match self
            .claims(elected.cluster_id.as_ref())
            .renew(&slot, &claim, settings.expiry)
            .await?
        {
            Renewal::Renewed | Renewal::Retaken => {
                // The bootstrap node killed between taking slot 0 and
                // writing the record finishes the record now.
                if prev.mode == Mode::Bootstrap
                    && index == 0
                    && let Some(id) = &elected.cluster_id
                {
                    self.finish_bootstrap(&elected.view, id).await?;
                }
            }
            Renewal::Released => tracing::warn!(
                "server slot {index} was released when this node left; it keeps its Raft state and runs as a server \
                 without a slot"
            ),
            Renewal::HeldBy(holder) => tracing::error!(
                "server slot {index} of this node is now held by {holder}: this node keeps running as a server; \
                 check the cluster has no more servers than wanted"
            ),
        }
        Ok(elected)
    }

    /// Writes the cluster record `id` (settings from `settings`); whether
    /// it was written.
    pub(super) async fn write_cluster(
        &self,
        id: &str,
        condition: Condition,
        settings: Settings,
    ) -> Result<bool> {
        let record = ClusterRecord {
            cluster_id: id.to_string(),
            bootstrap_node: self.me.node.clone(),
            bootstrap_address: self.me.address,
            servers: settings.servers,
            expiry: Some(settings.expiry),
            agent_expiry: Some(settings.agent_expiry),
            created: Utc::now().to_rfc3339(),
            retired: false,
        };
        // The secrets first: until the record names the cluster, its
        // genesis counts as unfinished (no Consul of it has run), so a
        // node stopped while making them bootstraps when it runs again.
        if let Some(store) = self.secrets {
            crate::secrets::genesis(store, id, true).await?;
        }
        let body = serde_json::to_vec(&record)?;
        let won = self
            .claims(None)
            .put_settled(CLUSTER_KEY, body, condition)
            .await?;
        Ok(won.is_some())
    }

    /// This node holds slot 0 for cluster `id`: makes sure the registry's
    /// record names `id`, writing it (under the condition of what `view`
    /// shows) when a bootstrap was interrupted before it could.
    pub(super) async fn finish_bootstrap(&self, view: &RegistryView, id: &str) -> Result<()> {
        if view.record().is_some_and(|r| r.cluster_id == id) {
            return Ok(());
        }
        // A new cluster: this node's flags seed its record.
        let settings = self.seed;
        let condition = match &view.cluster {
            None => Condition::Absent,
            Some(c) => Condition::Matches(c.etag.clone()),
        };
        tracing::warn!("holding slot 0 for cluster {id} with no record of it: writing the record");
        if !self.write_cluster(id, condition, settings).await? {
            bail!(
                "the cluster record of {} changed while this node finished bootstrapping cluster {id}; run again",
                self.registry
            );
        }
        Ok(())
    }
}

/// Whether `me` holds slot 0 for a cluster the registry's record does not
/// name yet (an interrupted genesis of its own).
fn unfinished_genesis(view: &RegistryView, me: &Identity) -> bool {
    view.slots
        .first()
        .and_then(|s| s.record.as_ref())
        .filter(|r| !r.released && r.held_by(&me.node, me.instance_id.as_deref()))
        .and_then(|r| r.cluster_id.as_deref())
        .is_some_and(|y| view.record().is_none_or(|c| c.cluster_id != y))
}

/// The id of the cluster a registry's slots and record describe: the
/// record's, else the one slot 0 was claimed for.
pub(super) fn old_cluster_id(view: &RegistryView) -> Option<String> {
    view.record().map(|r| r.cluster_id.clone()).or_else(|| {
        view.slots
            .first()
            .and_then(|s| s.record.as_ref())
            .and_then(|r| r.cluster_id.clone())
    })
}

/// Whether a recorded cluster id still describes the registry's cluster
/// (a registry without a cluster record, as the original tool's, always does).
pub(super) fn same_cluster(recorded: Option<&String>, current: Option<&String>) -> bool {
    match (recorded, current) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

pub(super) fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
