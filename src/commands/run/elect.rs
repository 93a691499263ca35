//! The election: sticky state first, then read, decide and claim until
//! one claim settles the mode (DESIGN.md's algorithm around the pure
//! decision in `crate::decision`).

use std::time::Duration;

use anyhow::{Result, bail};
use chrono::Utc;

use crate::claims::{Claims, Renewal};
use crate::cli::{GlobalOpts, RoleWanted};
use crate::decision::{self, Step};
use crate::identity::Identity;
use crate::model::{CLUSTER_KEY, ClusterRecord, Mode, RestorePlan, RestoreState, Settings};
use crate::registry::{Agents, Condition, RegistryView, Store, read_view};
use crate::retry::Backoff;
use crate::state::State;

/// Agents whose bodies are read: twice the join bound, room for those EC2
/// reports gone.
pub(super) const VIEW_AGENTS: usize = 2 * crate::decision::MAX_JOIN;
/// How long a joiner waits for the record of a cluster whose bootstrap
/// node holds slot 0 but has not written it yet.
pub(super) const PENDING_WAIT: Duration = Duration::from_secs(5);
/// The name of a cluster that neither a record nor a slot names
/// (`--replace-cluster unnamed` replaces it).
pub(super) const UNNAMED: &str = "unnamed";

/// A server of an old cluster that is not confirmed gone (the witness
/// rule, `witness.rs`, finds them; this module waits on them).
pub(super) struct Unconfirmed {
    pub(super) slot: u32,
    pub(super) holder: crate::model::SlotRecord,
    pub(super) why: String,
}
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
    /// A cluster that replaces a gone one restores its snapshot
    /// (`--no-restore` turns this off).
    pub(super) restore: bool,
    /// The secrets this node made at a genesis (cluster id, material): `run`
    /// uses them rather than reading them again.
    pub(super) made: std::sync::Mutex<Option<(String, crate::secrets::Material)>>,
    /// This node's instance when it runs with its own token
    /// (`--instance-tag`): a genesis makes its token's parameter in the
    /// same round as the cluster's secrets.
    pub(super) own_token: Option<String>,
    /// This node's flags: a genesis records the datacenter, and the
    /// primary a secondary names (`--primary-registry`), checked then.
    pub(super) opts: &'a GlobalOpts,
    /// The primary this node's genesis recorded (cluster id, primary).
    pub(super) recorded_primary: std::sync::Mutex<Option<(String, crate::model::Primary)>>,
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
        let mut waits = Waits::new(self);
        let mut round = 0;
        let mut backoff = Backoff::CONTENTION;
        loop {
            let view = match first.take() {
                Some(view) => view,
                None => read_view(self.store, self.seed, Agents::Recent(VIEW_AGENTS)).await?,
            };
            let cluster_id = cluster_of(&view);
            // 1. Sticky state: a server keeps its mode and slot (not one it
            //    released when it left: it decides afresh).
            if let Some(prev) = previous
                .filter(|p| same_cluster(p.cluster_id.as_ref(), cluster_id.as_ref()))
                .filter(|p| !left(p, &view))
            {
                return self.keep(prev, cluster_id, view).await;
            }
            // 2. Never a replaced cluster's Raft data in a new one.
            self.refuse_mixing(previous, raft, cluster_id.as_ref())?;
            // 3. Another node between slot 0 and its record: wait for the
            //    record, bounded.
            if waits.pending_bootstrap(self, &view).await {
                continue;
            }
            // 4. The decision, narrowed by the role; a role that cannot be
            //    had yet waits, bounded.
            let step = decision::decide(
                &view,
                &self.me.node,
                self.me.instance_id.as_deref(),
                view.settings.servers,
                view.settings.expiry,
                raft,
            );
            tracing::debug!("round {round}: {step:?}");
            if let Some(why) = self.role_blocked(&step, &view) {
                waits.role(self, why, view.settings.expiry).await?;
                continue;
            }
            // 5. Carry the step out; a lost race reads the registry again.
            let settled = match narrowed(self.role, step) {
                Step::Agent => Some(elected(Mode::Agent, None, cluster_id, view)),
                Step::Renew {
                    index,
                    etag,
                    bootstrap,
                } => {
                    self.renew_found(index, etag, bootstrap, cluster_id, view)
                        .await?
                }
                Step::Bootstrap { cluster, slot0 } => {
                    let unconfirmed = self.unconfirmed_servers(&view).await?;
                    if !unconfirmed.is_empty() {
                        waits.witness(self, &view, &unconfirmed).await?;
                        continue;
                    }
                    self.genesis(cluster, slot0, cluster_id, view).await?
                }
                Step::Claim(free) => self.claim_free(free, raft, cluster_id, view).await?,
            };
            if let Some(elected) = settled {
                return Ok(elected);
            }
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

    /// A server of a cluster since replaced, still holding its Raft data:
    /// joining the new cluster with it would mix the two.
    fn refuse_mixing(
        &self,
        previous: Option<&State>,
        raft: bool,
        cluster_id: Option<&String>,
    ) -> Result<()> {
        if raft
            && let Some(x) = previous.and_then(|p| p.cluster_id.as_ref())
            && let Some(y) = cluster_id
        {
            bail!(
                "this node served cluster {x} and holds its Raft data, but the registry {} now holds cluster {y}: \
                 joining {y} with {x}'s Raft data would mix two clusters. If {x} is gone for good, stop consul, \
                 move the raft/ directory of the Consul data dir aside, and run again",
                self.registry
            );
        }
        Ok(())
    }

    /// Why the role cannot take what the registry offers yet: a `server`
    /// never settles as an agent, an `agent` never claims or bootstraps
    /// (it waits for a live server).
    fn role_blocked(&self, step: &Step, view: &RegistryView) -> Option<String> {
        let settings = view.settings;
        let live = decision::live_servers(view, &self.me.node, settings.expiry);
        match (self.role, step) {
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
        }
    }

    /// Step::Renew: this node already holds a live slot (its state file
    /// was lost). The bootstrap node whose state file was never written is
    /// still the one to bootstrap (the gate says whether it may); a
    /// bootstrap interrupted before its record is finished under the id
    /// its slot was claimed for.
    async fn renew_found(
        &self,
        index: u32,
        etag: String,
        bootstrap: bool,
        cluster_id: Option<String>,
        view: RegistryView,
    ) -> Result<Option<Elected>> {
        let mode = if bootstrap {
            Mode::Bootstrap
        } else {
            Mode::Server
        };
        let held = view.slots[index as usize].record.as_ref();
        let serves = if bootstrap {
            held.and_then(|r| r.cluster_id.clone()).or(cluster_id)
        } else {
            cluster_id
        };
        if self.dry_run {
            let claim = held.map(|r| (index, r.claim_id.clone()));
            return Ok(Some(elected(mode, claim, serves, view)));
        }
        let claim = held.map_or_else(new_id, |r| r.claim_id.clone());
        let sequence = held.map_or(1, |r| r.sequence + 1);
        if !self
            .claims(serves.as_ref())
            .write_slot(index, &claim, sequence, Condition::Matches(etag))
            .await?
        {
            return Ok(None);
        }
        if bootstrap && let Some(id) = &serves {
            self.finish_bootstrap(&view, id).await?;
        }
        Ok(Some(elected(mode, Some((index, claim)), serves, view)))
    }

    /// Step::Bootstrap, the witness rule satisfied: slot 0 first. The node
    /// that takes it is the bootstrap node. Joiners only claim once they
    /// see a live server, and no live server exists before slot 0 is
    /// taken, so any view of theirs that shows slot 0 free is stale and
    /// their conditional write on it fails: the bootstrap node always holds
    /// slot 0, and servers never outnumber the slots.
    async fn genesis(
        &self,
        cluster: Condition,
        slot0: Condition,
        cluster_id: Option<String>,
        view: RegistryView,
    ) -> Result<Option<Elected>> {
        if self.dry_run {
            // The cluster's id is drawn by `run`.
            let mut out = elected(Mode::Bootstrap, None, None, view);
            out.witnessed = true;
            return Ok(Some(out));
        }
        let id = new_id();
        let claim = new_id();
        if !self
            .claims(Some(&id))
            .write_slot(0, &claim, 1, slot0)
            .await?
        {
            return Ok(None);
        }
        if let Some(stale) = &cluster_id {
            tracing::warn!(
                "every server of cluster {stale} is confirmed gone: bootstrapping a NEW, EMPTY cluster {id} in its place"
            );
        }
        // A new cluster: this node's flags seed its record, which names
        // the cluster whose snapshot it restores.
        let from = restore_source(&view).or_else(|| cluster_id.clone());
        if !self
            .write_cluster(&id, cluster, self.seed, from.as_deref(), true)
            .await?
        {
            // Someone changed the record between our read and now: finish
            // under whatever is there.
            let now = read_view(self.store, self.seed, Agents::Recent(0)).await?;
            self.finish_bootstrap(&now, &id).await?;
        }
        // The new cluster's settings are the ones it was seeded with,
        // whatever the record it replaced said.
        let mut view = view;
        view.settings = self.seed;
        let mut out = elected(Mode::Bootstrap, Some((0, claim)), Some(id), view);
        out.witnessed = true;
        Ok(Some(out))
    }

    /// Step::Claim: the free slots in order; a node with Raft state and no
    /// free slot runs as a server without one.
    async fn claim_free(
        &self,
        free: Vec<(u32, Condition)>,
        raft: bool,
        cluster_id: Option<String>,
        view: RegistryView,
    ) -> Result<Option<Elected>> {
        if raft && free.is_empty() {
            tracing::warn!(
                "this node has Raft state but every server slot is held: running as a server without a slot"
            );
            return Ok(Some(elected(Mode::Server, None, cluster_id, view)));
        }
        for (index, condition) in free {
            if self.dry_run {
                return Ok(Some(elected(Mode::Server, None, cluster_id, view)));
            }
            let claim = new_id();
            if self
                .claims(cluster_id.as_ref())
                .write_slot(index, &claim, 1, condition)
                .await?
            {
                return Ok(Some(elected(
                    Mode::Server,
                    Some((index, claim)),
                    cluster_id,
                    view,
                )));
            }
        }
        Ok(None)
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
        replaces: Option<&str>,
        fresh: bool,
    ) -> Result<bool> {
        let restore = self.restore_plan(id, replaces);
        // A secondary datacenter: its primary, checked against the
        // primary's record (only at genesis: a secondary's boots never
        // depend on the primary being reachable).
        let (primary, primary_record) = match crate::commands::federation::primary_for_genesis(
            &self.opts.cluster,
            &self.opts.consul,
            &self.opts.tls,
        )
        .await?
        {
            Some((p, r)) => (Some(p), Some(r)),
            None => (None, None),
        };
        *self
            .recorded_primary
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = primary.clone().map(|p| (id.to_string(), p));
        let mut record = ClusterRecord {
            cluster_id: id.to_string(),
            bootstrap_node: self.me.node.clone(),
            bootstrap_address: self.me.address,
            servers: settings.servers,
            expiry: Some(settings.expiry),
            agent_expiry: Some(settings.agent_expiry),
            created: Utc::now().to_rfc3339(),
            retired: false,
            restore,
            gossip_key: None,
            agent_token: None,
            ca: None,
            management_token: None,
            datacenter: Some(self.opts.consul.datacenter.clone()),
            primary,
            secrets: match self.secrets {
                Some(_) => crate::commands::federation::secrets_at(&self.opts.tls).await?,
                None => None,
            },
        };
        // The secrets first: until the record names the cluster, its
        // genesis counts as unfinished (no Consul of it has run), so a
        // node stopped while making them bootstraps when it runs again.
        if let Some(store) = self.secrets {
            let made = self
                .genesis_secrets(store, id, &mut record, primary_record.as_ref(), fresh)
                .await?;
            *self.made.lock().unwrap_or_else(|p| p.into_inner()) = Some((id.to_string(), made));
        }
        let body = serde_json::to_vec(&record)?;
        let won = self
            .claims(None)
            .put_settled(CLUSTER_KEY, body, condition)
            .await?;
        Ok(won.is_some())
    }

    /// The restore a cluster `id` replacing cluster `replaces` owes (none
    /// with `--no-restore`).
    fn restore_plan(&self, id: &str, replaces: Option<&str>) -> Option<RestorePlan> {
        let plan = replaces
            .filter(|old| *old != id && self.restore)
            .map(|old| RestorePlan {
                from: old.to_string(),
                state: RestoreState::Pending,
                key: None,
                sha256: None,
                node: None,
                at: Some(Utc::now().to_rfc3339()),
                refused: Vec::new(),
            })?;
        tracing::warn!(
            "cluster {id} replaces cluster {}: its newest valid snapshot will be restored once this node's Consul leads (auto-consul-snapshot.service; --no-restore opts out)",
            plan.from
        );
        Some(plan)
    }

    /// Cluster `id`'s secrets, made at its genesis, with this node's own
    /// token. A cluster id this node has just drawn (`fresh`) names no
    /// secret yet: they are made without reading first (create-only all
    /// the same). A secondary's gossip key and CA are the primary's
    /// (`primary`'s record), copied first at the primary's generations,
    /// which `record` then says; then its own tokens.
    async fn genesis_secrets(
        &self,
        store: &dyn crate::secrets::SecretStore,
        id: &str,
        record: &mut ClusterRecord,
        primary: Option<&ClusterRecord>,
        fresh: bool,
    ) -> Result<crate::secrets::Material> {
        let own = async {
            match &self.own_token {
                Some(instance) => crate::commands::node_tokens::make_own(store, id, instance).await,
                None => Ok(None),
            }
        };
        let made = async {
            match primary {
                Some(theirs) => {
                    (record.gossip_key, record.ca) =
                        crate::commands::federation::copy_shared(store, id, theirs).await?;
                    let gens = crate::secrets::Generations::of(Some(record));
                    crate::secrets::genesis_with(store, id, true, gens).await
                }
                None => crate::secrets::genesis_fresh(store, id, fresh).await,
            }
        };
        let (mut made, own) = tokio::try_join!(made, own)?;
        made.node_token = own;
        Ok(made)
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
        let replaces = restore_source(view);
        if !self
            .write_cluster(id, condition, settings, replaces.as_deref(), false)
            .await?
        {
            bail!(
                "the cluster record of {} changed while this node finished bootstrapping cluster {id}; run again",
                self.registry
            );
        }
        Ok(())
    }
}

/// The cluster whose snapshot a cluster replacing the record's restores:
/// the record's own, or, when that one still owed a restore itself (it
/// died before restoring, so its own snapshots hold nothing of worth), the
/// cluster it was to restore from.
fn restore_source(view: &RegistryView) -> Option<String> {
    let record = view.record()?;
    Some(
        record
            .restore
            .as_ref()
            .filter(|p| p.state.open())
            .map_or_else(|| record.cluster_id.clone(), |p| p.from.clone()),
    )
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

/// The bounded waits of one election, and whether each was said.
struct Waits {
    role_deadline: std::time::Instant,
    witness_deadline: std::time::Instant,
    role_said: bool,
    witness_said: bool,
    pending_since: Option<std::time::Instant>,
    pending_said: bool,
}

impl Waits {
    fn new(e: &Elector<'_>) -> Waits {
        let now = std::time::Instant::now();
        Waits {
            role_deadline: now + e.role_wait,
            witness_deadline: now + e.witness_wait,
            role_said: false,
            witness_said: false,
            pending_since: None,
            pending_said: false,
        }
    }

    /// Another node is between taking slot 0 and writing its record (a few
    /// milliseconds): its settings rule, and are not known yet. Whether to
    /// read again (after a short sleep): up to PENDING_WAIT, after which a
    /// bootstrap node killed in between is finished when it runs again,
    /// and meanwhile counts as a live server.
    async fn pending_bootstrap(&mut self, e: &Elector<'_>, view: &RegistryView) -> bool {
        let Some(y) = decision::bootstrap_in_progress(
            view,
            &e.me.node,
            e.me.instance_id.as_deref(),
            view.settings.expiry,
        ) else {
            return false;
        };
        let waited = self
            .pending_since
            .get_or_insert_with(std::time::Instant::now);
        if waited.elapsed() < PENDING_WAIT {
            tokio::time::sleep(Duration::from_millis(100)).await;
            return true;
        }
        if !self.pending_said {
            tracing::warn!(
                "cluster {y} holds slot 0 but has no record after {}s: deciding with the settings at hand",
                PENDING_WAIT.as_secs()
            );
            self.pending_said = true;
        }
        false
    }

    /// The role cannot be had yet: wait a poll, or fail for good
    /// (`Definitive`) once `--role-wait` has passed.
    async fn role(&mut self, e: &Elector<'_>, why: String, expiry: u64) -> Result<()> {
        let now = std::time::Instant::now();
        if e.dry_run || now >= self.role_deadline {
            return Err(Definitive(format!(
                "{why}; gave up after {}s (the boot unit tries again; --role-wait sets the wait)",
                e.role_wait.as_secs()
            ))
            .into());
        }
        if !self.role_said {
            tracing::warn!("{why} (up to {}s)", e.role_wait.as_secs());
            self.role_said = true;
        }
        let poll = Duration::from_secs((expiry / 8).clamp(1, 5));
        tokio::time::sleep(poll.min(self.role_deadline - now)).await;
        Ok(())
    }

    /// The witness rule forbids a new cluster yet: wait a poll for the old
    /// servers to come back or be confirmed gone, or fail for good once
    /// `--witness-wait` has passed.
    async fn witness(
        &mut self,
        e: &Elector<'_>,
        view: &RegistryView,
        unconfirmed: &[Unconfirmed],
    ) -> Result<()> {
        let message = e.witness_message(view, unconfirmed);
        let now = std::time::Instant::now();
        if e.dry_run || now >= self.witness_deadline {
            return Err(Definitive(message).into());
        }
        if !self.witness_said {
            tracing::warn!(
                "{message} Waiting up to {}s for them to come back or be confirmed gone.",
                e.witness_wait.as_secs()
            );
            self.witness_said = true;
        }
        let poll = Duration::from_secs((view.settings.expiry / 4).clamp(1, 5));
        tokio::time::sleep(poll.min(self.witness_deadline - now)).await;
        Ok(())
    }
}

/// The record's cluster; with no record yet, the one a live slot 0 was
/// claimed for (a bootstrap still writing its record).
fn cluster_of(view: &RegistryView) -> Option<String> {
    view.record().map(|r| r.cluster_id.clone()).or_else(|| {
        view.slots
            .first()
            .filter(|s| decision::slot_is_live(s, view.settings.expiry))
            .and_then(|s| s.record.as_ref())
            .and_then(|r| r.cluster_id.clone())
    })
}

/// Whether this node released the slot its state file names (`leave`: a
/// spot instance started again, an operator's leave).
fn left(p: &State, view: &RegistryView) -> bool {
    p.slot.zip(p.claim_id.as_ref()).is_some_and(|(i, c)| {
        view.slots
            .get(i as usize)
            .and_then(|s| s.record.as_ref())
            .is_some_and(|r| r.released && r.claim_id == *c)
    })
}

/// The role narrows the step: an agent that still holds a slot (its role
/// changed) does not renew it; it expires and a server takes it.
fn narrowed(role: RoleWanted, step: Step) -> Step {
    match (role, step) {
        (RoleWanted::Agent, Step::Renew { .. } | Step::Claim(_) | Step::Bootstrap { .. }) => {
            Step::Agent
        }
        (_, step) => step,
    }
}

/// What the election settled on, before the gate looks at it.
fn elected(
    mode: Mode,
    slot: Option<(u32, String)>,
    cluster_id: Option<String>,
    view: RegistryView,
) -> Elected {
    Elected {
        mode,
        cluster_id,
        slot: slot.as_ref().map(|s| s.0),
        claim_id: slot.map(|s| s.1),
        view,
        witnessed: false,
    }
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
