//! `run` and `plan`: identity, mode decision (sticky state first, then the
//! atomic claims of DESIGN.md), files, systemctl.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chrono::Utc;
use serde_json::json;

use super::members::cluster_json;
use super::{env_file, open_store, registry_url, seed_settings, warn_on_mismatch};
use crate::claims::{Claims, Renewal};
use crate::cli::{GlobalOpts, RoleWanted};
use crate::decision::{self, MAX_JOIN, Step};
use crate::ec2::{self, Witness};
use crate::error::usage;
use crate::identity::{self, Identity};
use crate::install::{self, FileSpec, Root};
use crate::model::{CLUSTER_KEY, ClusterRecord, Mode, Settings, SlotRecord};
use crate::registry::{
    Agents, Condition, PutOutcome, RegistryView, Store, read_slots_from, read_view,
};
use crate::render::{self, ConsulSettings, Tls};
use crate::state::{self, State};

/// The most a default wait (`--role-wait`, `--witness-wait`) lasts: both,
/// with the IMDS wait, stay inside the boot unit's 15-minute start timeout.
const DEFAULT_WAIT_CAP: u64 = 400;
/// How long a joiner waits for the record of a cluster whose bootstrap
/// node holds slot 0 but has not written it yet.
const PENDING_WAIT: Duration = Duration::from_secs(5);
/// The name of a cluster that neither a record nor a slot names
/// (`--replace-cluster unnamed` replaces it).
const UNNAMED: &str = "unnamed";
/// Rounds of read-decide-claim before giving up under contention.
const MAX_ROUNDS: u32 = 12;
/// Agents whose bodies are read: twice the join bound, room for those EC2
/// reports gone.
const VIEW_AGENTS: usize = 2 * MAX_JOIN;
/// A version tag no store ever gives.
const PROBE_TAG: &str = "\"auto-consul-probe-matches-nothing\"";
/// The key written to check that the store honours conditional writes.
const PROBE_KEY: &str = "cas-probe";

/// Paths on the target system.
const CONFIG_FILE: &str = "auto-consul.json";
const DROPIN: &str = "/etc/systemd/system/consul.service.d/auto-consul.conf";
const CONSUL_UNIT: &str = "/etc/systemd/system/consul.service";
const HEARTBEAT_SERVICE: &str = "/etc/systemd/system/auto-consul-heartbeat.service";
/// Leaves at shutdown when the instance is being terminated.
pub const LEAVE_UNIT: &str = "/etc/systemd/system/auto-consul-leave.service";
pub const HEARTBEAT_TIMER: &str = "/etc/systemd/system/auto-consul-heartbeat.timer";
/// The env file shared by `run`, the heartbeat and the boot unit.
pub const ENV_FILE: &str = "/etc/auto-consul/auto-consul.env";

/// What the election settled on.
#[derive(Debug, Clone)]
struct Elected {
    mode: Mode,
    cluster_id: Option<String>,
    slot: Option<u32>,
    claim_id: Option<String>,
    view: RegistryView,
}

/// Everything a node needs to take part in the election.
struct Elector<'a> {
    store: &'a dyn Store,
    me: &'a Identity,
    registry: String,
    /// This node's flags: they seed a new cluster's record only.
    seed: Settings,
    /// Write nothing (`plan`).
    dry_run: bool,
    /// The store ignores conditions and the operator accepted it.
    racy: bool,
    /// The AWS configuration, for asking EC2 about an old cluster's servers.
    aws: Option<&'a aws_config::SdkConfig>,
    /// The cluster the operator allows to be replaced (`--replace-cluster`).
    replace: Option<String>,
    /// How long to wait for an old cluster's servers (witness rule).
    witness_wait: Duration,
    /// What this node may become (`--role`).
    role: RoleWanted,
    /// How long a `server` waits for a slot, an `agent` for a server.
    role_wait: Duration,
}

/// A server of an old cluster that is not confirmed gone.
struct Unconfirmed {
    slot: u32,
    holder: SlotRecord,
    why: String,
}

/// `run` (or `plan` with `dry_run`).
pub async fn run(opts: &GlobalOpts, dry_run: bool) -> Result<()> {
    let url = registry_url(opts)?;
    let root = Root::new(&opts.root);
    // What can fail on local input fails before anything is asked or
    // claimed; the rest (files that need the identity) before any claim.
    let consul = find_consul(&root)?;
    let auto_consul = own_binary(&root)?;
    let secrets = Secrets::read(opts)?;

    // The identity (IMDS), the check of conditional writes and the first
    // read of the registry are independent: they run at once. No claim is
    // made before the check has passed.
    let seed = seed_settings(opts);
    let identity = identity::of(opts);
    let registry = async {
        let opened = open_store(&url).await?;
        let store = opened.store.as_ref();
        let probe = async {
            if dry_run {
                Ok(false)
            } else {
                check_conditional_writes(store, opts.allow_racy).await
            }
        };
        let (racy, view) =
            tokio::try_join!(probe, read_view(store, seed, Agents::Recent(VIEW_AGENTS)))?;
        Ok::<_, anyhow::Error>((opened, racy, view))
    };
    let (me, (opened, racy, first_view)) = tokio::try_join!(identity, registry)?;
    let store = opened.store;
    warn_on_mismatch(opts, &first_view);
    let mut fixed_files = fixed_files(opts, &root, &consul, &auto_consul, &url.to_string())?;
    install::check_writable(&root, &fixed_files)?;
    let raft = has_raft_state(&root, &opts.data_dir);
    // Only server modes are sticky: an agent decides again at each boot,
    // and a node now given `--role agent` becomes one.
    let previous = state::load_for(&root, &url.to_string(), &me)
        .filter(|s| s.mode.is_server())
        .filter(|s| {
            let keep = opts.role != RoleWanted::Agent;
            if !keep {
                tracing::warn!(
                    "this node ran as {} but is now given --role agent: it runs as an agent; \
                     its slot expires, and a server replaces it",
                    s.mode.as_str()
                );
            }
            keep
        });

    let elector = Elector {
        store: store.as_ref(),
        me: &me,
        registry: url.to_string(),
        seed,
        dry_run,
        racy,
        aws: opened.aws.as_ref(),
        replace: opts.replace_cluster.clone(),
        // Defaults that fit together, with IMDS, inside the boot unit's
        // TimeoutStartSec (15 min).
        witness_wait: Duration::from_secs(
            opts.witness_wait
                .unwrap_or(first_view.settings.expiry.min(DEFAULT_WAIT_CAP)),
        ),
        role: opts.role,
        role_wait: Duration::from_secs(opts.role_wait.unwrap_or_else(|| {
            let e = first_view.settings.expiry;
            (e + e / 3 + 10).min(DEFAULT_WAIT_CAP)
        })),
    };
    let elected = elector.elect(previous.as_ref(), raft, first_view).await?;
    let settings = elected.view.settings;
    // The timer follows the expiry that rules (the cluster record's): a
    // server's, or the longer one of agents.
    let timer_expiry = if elected.mode.is_server() {
        settings.expiry
    } else {
        settings.agent_expiry
    };
    for f in fixed_files
        .iter_mut()
        .filter(|f| f.path == Path::new(HEARTBEAT_TIMER))
    {
        f.contents = render::heartbeat_timer(timer_expiry);
    }
    let bootstrap = elected.mode == Mode::Bootstrap && !raft;
    let not_running = match &opened.aws {
        Some(aws) => {
            ec2::not_running(
                aws,
                &decision::join_candidates(&elected.view, &me.node, settings.expiry),
            )
            .await
        }
        None => Default::default(),
    };
    let retry_join = decision::join_list(
        &elected.view,
        elected.mode,
        &me.node,
        me.address,
        settings.expiry,
        &not_running,
    );

    let config = ConsulSettings {
        node: &me.node,
        address: me.address,
        data_dir: &opts.data_dir,
        datacenter: &opts.datacenter,
        mode: elected.mode,
        bootstrap,
        servers: settings.servers,
        retry_join: &retry_join,
        encrypt: secrets.encrypt.as_deref(),
        acl_token: secrets.acl_token.as_deref(),
        tls: Tls {
            ca_file: opts.ca_file.as_deref(),
            cert_file: opts.cert_file.as_deref(),
            key_file: opts.key_file.as_deref(),
        },
    };
    let consul_user = root.user("consul");
    let mut files = vec![FileSpec {
        path: opts.config_dir.join(CONFIG_FILE),
        contents: render::consul_config(&config),
        mode: if secrets.any() { 0o600 } else { 0o640 },
        owner: consul_user,
    }];
    files.extend(fixed_files);
    files.push(state::file(&State {
        registry: url.to_string(),
        cluster_id: elected.cluster_id.clone(),
        mode: elected.mode,
        node: me.node.clone(),
        address: me.address,
        instance_id: me.instance_id.clone(),
        slot: elected.slot,
        claim_id: elected.claim_id.clone(),
    }));

    let mut written = Vec::new();
    if !dry_run {
        for f in &files {
            if install::write_atomic(&root, f)? {
                written.push(root.path(&f.path));
            }
        }
    }
    let start = !dry_run && !opts.no_start && root.is_system();
    if start {
        install::systemctl(&["daemon-reload"])?;
        install::systemctl(&[
            "enable",
            "--now",
            "--no-block",
            "consul.service",
            "auto-consul-heartbeat.timer",
            "auto-consul-leave.service",
        ])?;
    }

    let paths: Vec<PathBuf> = files.iter().map(|f| root.path(&f.path)).collect();
    if opts.json {
        let out = json!({
            "mode": elected.mode.as_str(),
            "node": me.node,
            "address": me.address.to_string(),
            "instance_id": me.instance_id,
            "cluster_id": elected.cluster_id,
            "slot": elected.slot,
            "bootstrap": bootstrap,
            "retry_join": retry_join.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "cluster": cluster_summary(&elected, &me),
            "files": paths,
            "changed": written,
            "started": start,
            "dry_run": dry_run,
        });
        println!("{out}");
    } else {
        let verb = if dry_run { "would run" } else { "runs" };
        let slot = elected
            .slot
            .map(|s| format!(" in server slot {s}"))
            .unwrap_or_default();
        println!(
            "{} ({}) {verb} as {}{slot}",
            me.node,
            me.address,
            elected.mode.as_str()
        );
        let join: Vec<String> = retry_join.iter().map(|a| a.to_string()).collect();
        println!("retry_join: [{}]", join.join(", "));
        let summary = cluster_summary(&elected, &me);
        match summary["cluster_id"].as_str() {
            Some(id) => println!(
                "cluster {id} (bootstrapped by {}): {} servers, expiry {}s, agent expiry {}s",
                summary["bootstrap_node"].as_str().unwrap_or("?"),
                summary["servers"],
                summary["expiry"],
                summary["agent_expiry"]
            ),
            None => println!("{}", super::members::cluster_line(&elected.view)),
        }
        for p in &paths {
            let what = if dry_run {
                "would write"
            } else if written.contains(p) {
                "wrote"
            } else {
                "unchanged"
            };
            println!("{what}: {}", p.display());
        }
        if start {
            println!(
                "started: consul.service, auto-consul-heartbeat.timer, auto-consul-leave.service"
            );
        }
    }
    Ok(())
}

impl Elector<'_> {
    fn claims(&self, cluster_id: Option<&String>) -> Claims<'_> {
        Claims {
            store: self.store,
            me: self.me,
            racy: self.racy,
            cluster_id: cluster_id.cloned(),
        }
    }

    /// The mode decision of DESIGN.md: sticky state first, then read,
    /// decide and claim until one claim settles it. Rounds lost to other
    /// nodes are bounded; so is the wait for an old cluster's servers.
    async fn elect(
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
                return self.keep(prev, raft, cluster_id, view).await;
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
                    bail!(
                        "{why}; gave up after {}s (the boot unit tries again; --role-wait sets the wait)",
                        self.role_wait.as_secs()
                    );
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
                    let mode = if bootstrap && !raft {
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
                            bail!("{message}");
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
                        return Ok(elected(Mode::Bootstrap, None, cluster_id, view));
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
                        return Ok(elected(Mode::Bootstrap, Some((0, claim)), Some(id), view));
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
            tokio::time::sleep(Duration::from_millis(20 + u64::from(rand_below(80)))).await;
        }
    }

    /// The witness rule: the servers of the registry's old cluster (the
    /// holders of unreleased slots) that are not confirmed gone. A slot
    /// released by `leave` confirms its holder gone; otherwise only EC2
    /// can (terminated, stopped or unknown). The operator's
    /// `cluster retire` or `--replace-cluster` confirms them all.
    async fn unconfirmed_servers(&self, view: &RegistryView) -> Result<Vec<Unconfirmed>> {
        // Every slot, also those past the cluster's count (a lowered
        // `--servers`, a junk record): their holders may still serve.
        // A registry that never had a cluster (no record, no slot) has
        // nothing to witness: no listing.
        let fresh = view.cluster.is_none() && view.slots.iter().all(|s| s.etag.is_none());
        let beyond = if fresh {
            Vec::new()
        } else {
            read_slots_from(self.store, view.slots.len() as u32).await?
        };
        let holders: Vec<(u32, SlotRecord)> = view
            .slots
            .iter()
            .chain(beyond.iter())
            .filter_map(|s| s.record.clone().map(|r| (s.index, r)))
            .filter(|(_, r)| {
                !r.released && !r.held_by(&self.me.node, self.me.instance_id.as_deref())
            })
            .collect();
        if holders.is_empty() {
            return Ok(Vec::new());
        }
        let old = old_cluster_id(view).unwrap_or_else(|| UNNAMED.to_string());
        if view.record().is_some_and(|r| r.retired) {
            tracing::warn!(
                "cluster {old} was retired by an operator (`auto-consul cluster retire`): its servers count as gone"
            );
            return Ok(Vec::new());
        }
        if let Some(id) = &self.replace {
            if old == *id {
                tracing::warn!(
                    "--replace-cluster {id}: an operator confirmed the servers of cluster {id} gone"
                );
                return Ok(Vec::new());
            }
            tracing::warn!(
                "--replace-cluster {id} names no cluster of this registry (its cluster is {old}): ignored"
            );
        }
        let ids: Vec<String> = holders
            .iter()
            .filter_map(|(_, r)| r.instance_id.clone())
            .collect();
        let answer = if ids.is_empty() {
            Ok(Default::default())
        } else {
            match self.aws {
                Some(aws) => ec2::witness(aws, &ids).await,
                None => match crate::aws::load().await {
                    Ok(aws) => ec2::witness(&aws, &ids).await,
                    Err(e) => Err(e),
                },
            }
        };
        let mut out = Vec::new();
        for (slot, holder) in holders {
            let why = match (&holder.instance_id, &answer) {
                (None, _) => Some("no instance id to ask EC2 about".to_string()),
                (Some(_), Err(e)) => Some(format!("EC2 could not say ({e:#})")),
                (Some(id), Ok(words)) => match words.get(id) {
                    Some(Witness::Running) => Some(format!("EC2 says {id} is running")),
                    Some(Witness::Gone(state)) => {
                        tracing::info!(
                            "server {} of the old cluster: EC2 says {id} is {state}",
                            holder.node
                        );
                        None
                    }
                    Some(Witness::Unknown) | None => {
                        tracing::info!(
                            "server {} of the old cluster: EC2 does not know {id}",
                            holder.node
                        );
                        None
                    }
                },
            };
            if let Some(why) = why {
                out.push(Unconfirmed { slot, holder, why });
            }
        }
        Ok(out)
    }

    fn witness_message(&self, view: &RegistryView, unconfirmed: &[Unconfirmed]) -> String {
        let old = old_cluster_id(view).unwrap_or_else(|| UNNAMED.to_string());
        // `cluster retire` needs a record to mark; without one, the flag.
        let way_out = if view.record().is_some() {
            format!(
                "run `auto-consul cluster retire {old}` (or boot once with --replace-cluster {old})"
            )
        } else {
            format!("boot once with --replace-cluster {old}")
        };
        let list: Vec<String> = unconfirmed
            .iter()
            .map(|u| {
                format!(
                    "{} ({}, slot {}: {})",
                    u.holder.node, u.holder.address, u.slot, u.why
                )
            })
            .collect();
        format!(
            "cluster {old} has no live server in the registry {}, but its servers are not confirmed gone: {}. \
             A new cluster beside them would split Consul in two, so none is started. If they are alive, \
             fix their heartbeats (registry permissions, the Consul agent, auto-consul-heartbeat.timer); \
             if they are gone for good, {way_out}.",
            self.registry,
            list.join("; ")
        )
    }

    /// Step 1: keep the recorded mode, and a server's slot.
    async fn keep(
        &self,
        prev: &State,
        raft: bool,
        cluster_id: Option<String>,
        view: RegistryView,
    ) -> Result<Elected> {
        let settings = view.settings;
        let others = decision::live_servers(&view, &self.me.node, settings.expiry);
        let mode = match prev.mode {
            // Bootstrap only until Raft state exists; a plain server after.
            Mode::Bootstrap if raft => Mode::Server,
            // Raft state gone (say, a data dir on instance storage) while
            // other servers live: bootstrapping again would split the
            // cluster. Join them instead.
            Mode::Bootstrap if !others.is_empty() => {
                tracing::warn!(
                    "this node bootstrapped the cluster but has no Raft state now, and {} other servers are live: \
                     joining them as a plain server",
                    others.len()
                );
                Mode::Server
            }
            // None live, but servers of this cluster may be alive (a
            // fleet-wide stop, their Raft data kept): bootstrapping again
            // would make a second leader. The witness rule decides.
            Mode::Bootstrap if !self.unconfirmed_servers(&view).await?.is_empty() => {
                tracing::warn!(
                    "this node bootstrapped the cluster but has no Raft state now, and other servers of it \
                     are not confirmed gone: joining them as a plain server"
                );
                Mode::Server
            }
            m => m,
        };
        let elected = Elected {
            mode,
            cluster_id: cluster_id.or_else(|| prev.cluster_id.clone()),
            slot: prev.slot,
            claim_id: prev.claim_id.clone(),
            view,
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
    async fn write_cluster(
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
    async fn finish_bootstrap(&self, view: &RegistryView, id: &str) -> Result<()> {
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

/// The `cluster` object of `run --json`: the registry's record as read,
/// or the cluster this node has just bootstrapped in its place.
fn cluster_summary(elected: &Elected, me: &Identity) -> serde_json::Value {
    let mut out = cluster_json(&elected.view);
    let new = elected.cluster_id.is_some()
        && elected.cluster_id.as_deref() != elected.view.record().map(|r| r.cluster_id.as_str());
    if new && elected.mode == Mode::Bootstrap {
        out["cluster_id"] = json!(elected.cluster_id);
        out["bootstrap_node"] = json!(me.node);
        out["retired"] = json!(false);
        out["record_age_seconds"] = json!(0);
        out["from_record"] = json!(true);
        out["created"] = serde_json::Value::Null;
    }
    out
}

/// The id of the cluster a registry's slots and record describe: the
/// record's, else the one slot 0 was claimed for.
fn old_cluster_id(view: &RegistryView) -> Option<String> {
    view.record().map(|r| r.cluster_id.clone()).or_else(|| {
        view.slots
            .first()
            .and_then(|s| s.record.as_ref())
            .and_then(|r| r.cluster_id.clone())
    })
}

/// Whether a recorded cluster id still describes the registry's cluster
/// (a registry without a cluster record, as the original tool's, always does).
fn same_cluster(recorded: Option<&String>, current: Option<&String>) -> bool {
    match (recorded, current) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// Checks the store honours create-only writes; `Ok(true)` means it does
/// not and the operator accepted the racy fallback.
async fn check_conditional_writes(store: &dyn Store, allow_racy: bool) -> Result<bool> {
    // Both headers are checked, at once. A write under If-Match of a tag no
    // store gives must fail, whether the key exists (412) or not (404). A
    // create-only write must fail once the key exists; the very first one
    // on a new registry creates it, and only then is a second one needed.
    let body = json!({ "probe": "conditional writes must be honoured" })
        .to_string()
        .into_bytes();
    let put = |condition: Condition| {
        let body = body.clone();
        async move {
            for _ in 0..3 {
                match store
                    .put(PROBE_KEY, body.clone(), condition.clone())
                    .await?
                {
                    PutOutcome::Conflict => continue,
                    PutOutcome::Unknown(err) => return Err(err),
                    PutOutcome::PreconditionFailed => return Ok(true),
                    PutOutcome::Written(_) => return Ok(false),
                }
            }
            anyhow::bail!(
                "checking that the registry honours conditional writes: conflicts every time; run again"
            )
        }
    };
    let (if_match_refused, create_refused) = tokio::try_join!(
        put(Condition::Matches(PROBE_TAG.into())),
        put(Condition::Absent)
    )?;
    let honoured = if_match_refused && (create_refused || put(Condition::Absent).await?);
    if honoured {
        return Ok(false);
    }
    if allow_racy {
        tracing::warn!(
            "the registry ignores conditional writes: using the original, racy decision (--allow-racy); \
             nodes booting at once may bootstrap two clusters"
        );
        return Ok(true);
    }
    Err(usage(
        "the registry ignores conditional writes (a write under If-Match of a version that does not exist, \
         or a create-only write of an existing key, succeeded), so two nodes booting at once could both \
         bootstrap: use S3 or a store that honours If-None-Match and If-Match, or pass --allow-racy to \
         accept the original racy behaviour",
    ))
}

/// Whether the data dir under the root holds Consul Raft state.
/// A raft directory that cannot be read counts as state: a node that may
/// have been a server must never bootstrap.
fn has_raft_state(root: &Root, data_dir: &Path) -> bool {
    let dir = root.path(&data_dir.join("raft"));
    match std::fs::read_dir(&dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!(
                "cannot read {} ({e}): assuming Raft state, so never bootstrapping",
                dir.display()
            );
            true
        }
    }
}

/// Secrets read from the files named by options; never from argv values.
struct Secrets {
    encrypt: Option<String>,
    acl_token: Option<String>,
}

impl Secrets {
    fn read(opts: &GlobalOpts) -> Result<Secrets> {
        let read = |path: &Option<PathBuf>, what: &str| -> Result<Option<String>> {
            let Some(path) = path else { return Ok(None) };
            let text = std::fs::read_to_string(path).map_err(|e| {
                usage(format!(
                    "cannot read the {what} file {}: {e}; fix the path or its permissions",
                    path.display()
                ))
            })?;
            let value = text.trim().to_string();
            if value.is_empty() || value.contains(char::is_whitespace) {
                return Err(usage(format!(
                    "the {what} file {} must hold one value on one line",
                    path.display()
                )));
            }
            Ok(Some(value))
        };
        Ok(Secrets {
            encrypt: read(&opts.encrypt_file, "gossip encryption key")?,
            acl_token: read(&opts.acl_token_file, "ACL token")?,
        })
    }

    fn any(&self) -> bool {
        self.encrypt.is_some() || self.acl_token.is_some()
    }
}

/// The `consul` binary for `ExecStart`: on PATH (inside the root first when
/// there is one). Under a root other than `/` a missing binary is a warning
/// (it may be installed later in the bake) and `/usr/bin/consul` is assumed.
fn find_consul(root: &Root) -> Result<PathBuf> {
    if !root.is_system() {
        let path = std::env::var_os("PATH").unwrap_or_default();
        for dir in std::env::split_paths(&path) {
            if root.path(&dir.join("consul")).is_file() {
                return Ok(dir.join("consul"));
            }
        }
    }
    match which::which("consul") {
        Ok(p) => Ok(p),
        Err(_) if !root.is_system() => {
            tracing::warn!("no consul on PATH: the units will run /usr/bin/consul");
            Ok(PathBuf::from("/usr/bin/consul"))
        }
        Err(e) => Err(usage(format!(
            "no `consul` binary on PATH ({e}): install Consul (HashiCorp's package or zip) before auto-consul run"
        ))),
    }
}

/// The absolute path of this binary, for the heartbeat unit; its path
/// inside the root when it lies there.
pub fn own_binary(root: &Root) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the path of the auto-consul binary")?;
    let exe = exe.canonicalize().unwrap_or(exe);
    let root_dir = root.path(Path::new("/"));
    Ok(match exe.strip_prefix(&root_dir) {
        Ok(rel) if !root.is_system() => Path::new("/").join(rel),
        _ => exe,
    })
}

/// The files that do not depend on the decision: units and env file.
fn fixed_files(
    opts: &GlobalOpts,
    root: &Root,
    consul: &Path,
    auto_consul: &Path,
    registry: &str,
) -> Result<Vec<FileSpec>> {
    let consul = render::unit_path(consul).context("the consul binary's path")?;
    let auto_consul = render::unit_path(auto_consul).context("the auto-consul binary's path")?;
    let config_dir =
        render::unit_path(&opts.config_dir).map_err(|e| usage(format!("--config-dir: {e}")))?;
    let unit = |path: &str, contents: String| FileSpec {
        path: path.into(),
        contents,
        mode: 0o644,
        owner: None,
    };
    let mut files = vec![unit(DROPIN, render::consul_dropin(&consul, &config_dir))];
    if manages_consul_unit(root) {
        let user = root.user("consul").map(|_| "consul");
        files.push(unit(
            CONSUL_UNIT,
            render::consul_unit(&consul, &config_dir, user),
        ));
    }
    files.push(unit(
        HEARTBEAT_SERVICE,
        render::heartbeat_service(&auto_consul, ENV_FILE),
    ));
    files.push(unit(LEAVE_UNIT, render::leave_unit(&auto_consul, ENV_FILE)));
    // Its contents follow the expiry that rules, known after the election.
    files.push(unit(
        HEARTBEAT_TIMER,
        render::heartbeat_timer(opts.expiry()),
    ));
    files.push(FileSpec {
        path: ENV_FILE.into(),
        contents: env_file(opts, root, Some(registry))?,
        mode: super::env_file_mode(root),
        owner: None,
    });
    Ok(files)
}

/// Whether `run` writes a full `consul.service`: only when no other unit
/// of that name exists anywhere on the unit path (Consul from a zip). One we
/// wrote before is ours to keep current; an operator's is never replaced.
fn manages_consul_unit(root: &Root) -> bool {
    root.units_named("consul.service").iter().all(|p| {
        p == Path::new(CONSUL_UNIT)
            && std::fs::read_to_string(root.path(p)).is_ok_and(|t| t.starts_with(render::MARKER))
    })
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn rand_below(n: u32) -> u32 {
    (uuid::Uuid::new_v4().as_u128() % u128::from(n)) as u32
}
