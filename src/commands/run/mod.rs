//! `run` and `plan`: identity, mode decision (sticky state first, then the
//! atomic claims of DESIGN.md), files, systemctl. One concern a file: the
//! election (`elect`), the witness rule (`witness`), the conditional-write
//! probe (`probe`), the files written (`files`), the secrets read (`secrets`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;

use crate::cli::{GlobalOpts, RoleWanted};
use crate::commands::members::cluster_json;
use crate::commands::{open_store, registry_url, seed_settings, warn_on_mismatch};
use crate::decision::{self, MAX_JOIN};
use crate::ec2::{self};
use crate::error::usage;
use crate::identity::{self, Identity};
use crate::install::{self, FileSpec, Root};
use crate::model::Mode;
use crate::precedence;
use crate::registry::{Agents, read_view};
use crate::render::{self, ConsulSettings};
use crate::state::{self, State};

mod elect;
mod files;
mod probe;
mod secrets;
mod witness;

use elect::{Elected, Elector};
use files::*;
pub use files::{
    CONFIG_FILE, ENV_FILE, HEARTBEAT_TIMER, LEAVE_UNIT, TlsPaths, UnitStrings, ensure_consul_user,
    has_raft_state, own_binary,
};
use probe::check_conditional_writes;
use secrets::Secrets;

/// The most a default wait (`--role-wait`, `--witness-wait`) lasts: both,
/// with the IMDS wait, stay inside the boot unit's 15-minute start timeout.
const DEFAULT_WAIT_CAP: u64 = 400;
/// Agents whose bodies are read: twice the join bound, room for those EC2
/// reports gone.
pub(super) const VIEW_AGENTS: usize = 2 * MAX_JOIN;
/// `run` (or `plan` with `dry_run`): DESIGN.md's steps, one call each.
pub async fn run(opts: &GlobalOpts, dry_run: bool) -> Result<()> {
    let url = registry_url(opts)?;
    let root = Root::new(&opts.consul.root);
    // 1. What can fail on local input fails before anything is asked.
    let local = local_checks(opts, &root, dry_run)?;
    // 2. Identity (IMDS), the conditional-write probe and the first read
    //    of the registry, at once; no claim before the probe has passed.
    let (me, launch, opened, racy, first_view) = first_look(opts, &root, &url, dry_run).await?;
    let me = &me;
    warn_on_mismatch(opts, &first_view);
    // 3. The files the decision does not change, checked writable before
    //    any claim.
    let units = UnitStrings::new(opts, &local.auto_consul, Some(&url))?;
    let consul = render::unit_path(&local.consul).context("the consul binary's path")?;
    let mut fixed = fixed_files(
        opts,
        &root,
        local.manages_consul,
        &units,
        &consul,
        &url.to_string(),
    )?;
    install::check_writable(&root, &fixed)?;
    // 4. The election: sticky state, claims, the one bootstrap gate.
    let raft = has_raft_state(&root, &opts.consul.data_dir);
    let previous = sticky_state(opts, &root, &url.to_string(), me);
    let secrets_store = match &opts.tls.secrets {
        Some(url) if !dry_run => crate::secrets::open(url).await?,
        _ => None,
    };
    let elector = Elector {
        secrets: secrets_store.as_deref(),
        store: opened.store.as_ref(),
        me,
        registry: url.to_string(),
        seed: seed_settings(opts),
        dry_run,
        racy,
        aws: opened.aws.as_ref(),
        replace: opts.cluster.replace_cluster.clone(),
        witness_wait: witness_wait(opts, &first_view),
        role: opts.waits.role,
        role_wait: role_wait(opts, &first_view),
        restore: !opts.snapshots.no_restore,
        made: Default::default(),
        own_token: super::node_tokens::own_instance(opts, &me.node, me.instance_id.as_deref())
            .map(str::to_string),
        opts,
        recorded_primary: Default::default(),
    };
    let (elected, launch) =
        elect_or_abandon(&elector, launch, previous.as_ref(), raft, first_view).await?;
    if !dry_run && elected.mode == Mode::Agent {
        wait_for_restore(opts, opened.store.as_ref(), &elected).await?;
    }
    let hook = launch.as_ref().and_then(|l| l.hook.as_ref());
    let settings = elected.view.settings;
    if !dry_run {
        crate::metrics::node(elected.mode, elected.slot);
        crate::metrics::live_servers(
            decision::live_servers(&elected.view, &me.node, settings.expiry).len(),
        );
    }
    // 5. Whom to join, and the units the decision settles; a secondary
    //    datacenter's servers also join the primary's over the WAN.
    let recorded = elector
        .recorded_primary
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .filter(|(id, _)| Some(id) == elected.cluster_id.as_ref())
        .map(|(_, p)| p);
    let primary = recorded.or_else(|| {
        elected
            .view
            .record()
            .filter(|r| Some(&r.cluster_id) == elected.cluster_id.as_ref())
            .and_then(|r| r.primary.clone())
    });
    let config_on_disk = root.path(&opts.consul.config_dir.join(CONFIG_FILE));
    let (retry_join, (retry_join_wan, replication)) = tokio::join!(
        join_list(&opened, &elected, me),
        super::federation::at_run(opts, primary.as_ref(), elected.mode, &config_on_disk)
    );
    // Consul joins every instance a cloud entry finds: agents only.
    let cloud_join = opts
        .consul
        .cloud_join
        .as_deref()
        .filter(|_| elected.mode == Mode::Agent);
    // Consul's readiness notice is worth waiting for when it has someone
    // to join; a lone bootstrap server never sends it.
    let notify = !retry_join.is_empty() || cloud_join.is_some();
    let timer_expiry = if elected.mode.is_server() {
        settings.expiry
    } else {
        settings.agent_expiry
    };
    decided_units(&mut fixed, &units, &consul, &root, timer_expiry, notify);
    // 6. The secrets made at genesis, and the TLS files from them.
    let made_at_genesis = elector
        .made
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .filter(|(id, _)| Some(id) == elected.cluster_id.as_ref() && elected.mode.is_server())
        .map(|(_, m)| m);
    let own = super::node_tokens::own_instance(opts, &me.node, me.instance_id.as_deref());
    let made = match made_at_genesis {
        Some(m) => Some(m),
        None => genesis_material(secrets_store.as_deref(), &elected, own, dry_run).await?,
    };
    let made = match (
        made,
        secrets_store.as_deref(),
        elected.cluster_id.as_deref(),
    ) {
        (Some(m), Some(store), Some(cluster)) if own.is_some() && !dry_run => Some(
            super::node_tokens::at_run(
                opts,
                store,
                elected.mode.is_server(),
                generations(&elected).per_node,
                cluster,
                own.unwrap_or_default(),
                m,
            )
            .await?,
        ),
        (made, ..) => made,
    };
    let tls_paths = TlsPaths::new(&opts.consul.config_dir);
    let tls_files = match &made {
        Some(m) if opts.tls.ca_file.is_none() => tls_material(
            &root,
            &tls_paths,
            m,
            elected.mode,
            &format!("server.{}.{}", opts.consul.datacenter, opts.consul.domain),
            &me.node,
            me.address,
        )?,
        _ => Vec::new(),
    };
    // 7. Consul's configuration and every other file.
    let config = ConsulSettings {
        node: &me.node,
        address: me.address,
        data_dir: &opts.consul.data_dir,
        datacenter: &opts.consul.datacenter,
        domain: &opts.consul.domain,
        mode: elected.mode,
        // Settled by the election's one gate (`Elector::may_bootstrap`).
        bootstrap: elected.mode == Mode::Bootstrap,
        servers: settings.servers,
        retry_join: &retry_join,
        cloud_join,
        encrypt: local
            .secrets
            .encrypt
            .as_deref()
            .or(made.as_ref().map(|m| m.gossip_key.as_str())),
        acl_token: local.secrets.acl_token.as_deref(),
        acl: made.as_ref().map(|m| render::GenesisAcl {
            // A secondary's Consul makes no initial management token
            // (its servers make theirs with the replication token).
            management: m.management_token.as_deref().filter(|_| primary.is_none()),
            agent: m.agent_token_in_use(),
            dns: &m.dns_token,
            replication: replication.as_deref(),
        }),
        tls: tls_paths.tls(opts, elected.mode, !tls_files.is_empty()),
        primary_datacenter: primary.as_ref().map(|p| p.datacenter.as_str()),
        retry_join_wan: &retry_join_wan,
    };
    if !dry_run && raft && elected.mode.is_server() {
        clear_stale_server_metadata(&root, &opts.consul.data_dir)?;
    }
    if !dry_run && let Some(key) = config.encrypt {
        let was = state::load(&root).and_then(|s| s.cluster_id);
        let changed = match (&was, &elected.cluster_id) {
            (Some(was), Some(now)) if was != now => Some((was.as_str(), now.as_str())),
            _ => None,
        };
        stale_keyrings(&root, &opts.consul.data_dir, key, changed)?;
        // A gossip key rotation under way: the keyring holds both keys
        // (the primary first, as Consul's keyring file lists it), so this
        // node reads every member whichever key it sends with.
        if let Some(other) = made.as_ref().and_then(|m| m.gossip_other.as_deref())
            && local.secrets.encrypt.is_none()
        {
            write_rotation_keyring(&root, &opts.consul.data_dir, key, other)?;
        }
    }
    if !dry_run && !root.is_system() && local.manages_consul {
        ensure_consul_user(&root)?;
    }
    let holds_secret = local.secrets.any() || made.is_some();
    let (config_file, conflicts) = consul_config_file(opts, &root, &config, holds_secret);
    let consul_user = root.user("consul");
    let mut files = vec![config_file];
    files.extend(tls_files.into_iter().map(|mut f| {
        f.owner = consul_user;
        f
    }));
    files.extend(fixed);
    if hook.is_some() {
        files.push(FileSpec {
            path: GATE_UNIT.into(),
            contents: render::gate_service(&units.paths(), opts.waits.gate_wait),
            mode: 0o644,
            owner: None,
        });
    }
    let snapshots = elected.mode.is_server();
    if snapshots {
        files.push(unit(
            SNAPSHOT_SERVICE,
            render::snapshot_service(&units.paths()),
        ));
        files.push(unit(
            SNAPSHOT_TIMER,
            render::snapshot_timer(opts.snapshot_interval()),
        ));
    }
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
    // 8. Write, start, say what was done.
    let written = if dry_run {
        Vec::new()
    } else {
        write_files(&root, &opts.consul.config_dir, &files)?
    };
    // The generations this node now runs with, for its heartbeat.
    if !dry_run && made.is_some() {
        use crate::commands::rotate::{
            AGENT_TOKEN_GENERATION, CA_SIGNED_BY, CA_TRUSTED, MANAGEMENT_TOKEN_GENERATION,
            record_list,
        };
        let gens = generations(&elected);
        if local.secrets.acl_token.is_none() {
            state::record_number(&root, AGENT_TOKEN_GENERATION, gens.agent_token);
        }
        if opts.tls.ca_file.is_none() {
            record_list(&root, CA_TRUSTED, &gens.ca.trusted());
            if elected.mode.is_server() {
                state::record_number(&root, CA_SIGNED_BY, gens.ca.signing());
            }
        }
        if elected.mode.is_server() {
            state::record_number(
                &root,
                MANAGEMENT_TOKEN_GENERATION,
                gens.management_token.max(1),
            );
        }
        // Which token Consul runs with now: a node that ran with its own
        // and no longer does (no --instance-tag) follows the shared one.
        if let Some(m) = made.as_ref() {
            let kind = if own.is_some() && m.node_token.is_some() {
                "node"
            } else {
                "shared"
            };
            super::node_tokens::record_kind(&root, kind);
        }
    }
    let start = !dry_run && !opts.consul.no_start && root.is_system();
    if start {
        start_units(hook.is_some(), snapshots)?;
    }
    let done = Done {
        elected: &elected,
        me,
        retry_join: &retry_join,
        files: files.iter().map(|f| root.path(&f.path)).collect(),
        written,
        conflicts: &conflicts,
        notify,
        start,
        dry_run,
        hook,
    };
    if opts.output.json {
        println!("{}", done.json());
    } else {
        done.print();
    }
    Ok(())
}

/// What `run` checked of its local input.
struct Local {
    consul: PathBuf,
    auto_consul: PathBuf,
    secrets: Secrets,
    manages_consul: bool,
}

/// Step 1: the consul and auto-consul binaries, the secret files, the TLS
/// flags, other files of the config dir that would bootstrap, the consul
/// user (made before anything is claimed on the running system).
fn local_checks(opts: &GlobalOpts, root: &Root, dry_run: bool) -> Result<Local> {
    let consul = find_consul(root)?;
    let auto_consul = own_binary(root)?;
    let secrets = Secrets::read(opts)?;
    if opts.tls.ca_file.is_some()
        && opts.tls.cert_file.is_none()
        && opts.waits.role != RoleWanted::Agent
    {
        return Err(usage(
            "--ca-file without --cert-file: a server needs its own certificate (--cert-file and \
             --key-file); only a node run with --role agent does without one (it gets one from \
             the servers through auto_encrypt)",
        ));
    }
    if let Some(c) = precedence::bootstrapping(
        &root.path(&opts.consul.config_dir),
        &opts.consul.config_dir,
        CONFIG_FILE,
        &[LEGACY_CONFIG_FILE],
    )
    .first()
    {
        return Err(usage(format!(
            "{c}: auto-consul alone decides which node bootstraps"
        )));
    }
    // On the running system the user is made before anything is claimed
    // or rendered (the drop-in hands it the data dir); under another root
    // its absence is only a warning, given with the files.
    let manages_consul = manages_consul_unit(root);
    if !dry_run && root.is_system() && manages_consul {
        ensure_consul_user(root)?;
    }
    Ok(Local {
        consul,
        auto_consul,
        secrets,
        manages_consul,
    })
}

/// Step 2: identity, the probe of conditional writes (none for an agent,
/// which never makes one, nor for `plan`) and the first read, at once.
async fn first_look(
    opts: &GlobalOpts,
    root: &Root,
    url: &crate::registry::RegistryUrl,
    dry_run: bool,
) -> Result<(
    Identity,
    Option<tokio::task::JoinHandle<crate::lifecycle::Launch>>,
    super::Opened,
    bool,
    crate::registry::RegistryView,
)> {
    // Who this node is; then, in the background, its launch hook (the
    // group tag was read with the identity), whose heartbeats start at once.
    let who = async {
        let me = identity::of_with_group(opts).await?;
        let launch = (!dry_run).then(|| crate::lifecycle::watch_launch(opts, &me, root));
        Ok::<_, anyhow::Error>((me, launch))
    };
    let registry = async {
        let opened = open_store(url).await?;
        let store = opened.store.as_ref();
        let probe = async {
            if dry_run || opts.waits.role == RoleWanted::Agent {
                Ok(false)
            } else {
                check_conditional_writes(store, opts.cluster.allow_racy).await
            }
        };
        let (racy, view) = tokio::try_join!(
            probe,
            read_view(store, seed_settings(opts), Agents::Recent(VIEW_AGENTS))
        )?;
        Ok::<_, anyhow::Error>((opened, racy, view))
    };
    let ((me, launch), (opened, racy, view)) = tokio::try_join!(who, registry)?;
    Ok((me, launch, opened, racy, view))
}

/// The state file's mode, when it is sticky: only server modes are; an
/// agent decides again at each boot, and a node now given `--role agent`
/// becomes one.
fn sticky_state(opts: &GlobalOpts, root: &Root, registry: &str, me: &Identity) -> Option<State> {
    state::load_for(root, registry, me)
        .filter(|s| s.mode.is_server())
        .filter(|s| {
            let keep = opts.waits.role != RoleWanted::Agent;
            if !keep {
                tracing::warn!(
                    "this node ran as {} but is now given --role agent: it runs as an agent; \
                     its slot expires, and a server replaces it",
                    s.mode.as_str()
                );
            }
            keep
        })
}

/// `--witness-wait`, or a default that fits, with IMDS, inside the boot
/// unit's start timeout (15 min).
fn witness_wait(opts: &GlobalOpts, view: &crate::registry::RegistryView) -> Duration {
    Duration::from_secs(
        opts.waits
            .witness_wait
            .unwrap_or(view.settings.expiry.min(DEFAULT_WAIT_CAP)),
    )
}

/// `--role-wait`, or one expiry and one heartbeat interval, capped alike.
fn role_wait(opts: &GlobalOpts, view: &crate::registry::RegistryView) -> Duration {
    Duration::from_secs(opts.waits.role_wait.unwrap_or_else(|| {
        let e = view.settings.expiry;
        (e + e / 3 + 10).min(DEFAULT_WAIT_CAP)
    }))
}

/// Step 4: the election; a boot that cannot succeed abandons its launch
/// in an autoscaling group (the group replaces the instance at once).
async fn elect_or_abandon(
    elector: &Elector<'_>,
    launch: Option<tokio::task::JoinHandle<crate::lifecycle::Launch>>,
    previous: Option<&State>,
    raft: bool,
    view: crate::registry::RegistryView,
) -> Result<(Elected, Option<crate::lifecycle::Launch>)> {
    let elected = elector.elect(previous, raft, view).await;
    let launch = match launch {
        Some(task) => Some(task.await.context("finding this instance's launch hook")?),
        None => None,
    };
    match elected {
        Ok(elected) => Ok((elected, launch)),
        Err(e) => {
            if !elector.dry_run && e.downcast_ref::<elect::Definitive>().is_some() {
                let hook = launch.as_ref().and_then(|l| l.hook.as_ref());
                crate::lifecycle::abandon(hook, "this boot cannot succeed").await;
            }
            Err(e)
        }
    }
}

/// Step 4: an agent does not join a cluster that owes the restore of a
/// snapshot (the restore would replace the registrations and the Connect
/// CA that signed its certificates): it waits, bounded by
/// `--restore-wait`, while its launch stays pending.
async fn wait_for_restore(
    opts: &GlobalOpts,
    store: &dyn crate::registry::Store,
    elected: &Elected,
) -> Result<()> {
    let owed = |r: &crate::model::ClusterRecord| {
        r.restore
            .as_ref()
            .filter(|p| p.state.open())
            .map(|p| p.from.clone())
    };
    let Some((cluster, from)) = elected
        .view
        .record()
        .and_then(|r| Some((r.cluster_id.clone(), owed(r)?)))
    else {
        return Ok(());
    };
    tracing::warn!(
        "cluster {cluster} owes the restore of cluster {from}'s snapshot: this agent joins once it is done \
         (waiting up to {}s, --restore-wait)",
        opts.waits.restore_wait
    );
    let poll = Duration::from_secs((opts.waits.restore_wait / 40).clamp(1, 10));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(opts.waits.restore_wait);
    loop {
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(anyhow::anyhow!(
                "cluster {cluster} still owes the restore of cluster {from}'s snapshot after {}s: this \
                 agent does not join it yet (auto-consul.service tries again; `auto-consul status` on a \
                 server says why, `auto-consul restore --cancel` drops the restore)",
                opts.waits.restore_wait
            ));
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
        match crate::commands::snapshot::read_record(store).await {
            Ok(Some((r, _))) if r.cluster_id == cluster && owed(&r).is_some() => {}
            Ok(_) => {
                tracing::info!("cluster {cluster} owes no restore now: this agent joins");
                return Ok(());
            }
            Err(e) => tracing::warn!("reading the cluster record again: {e:#}"),
        }
    }
}

/// Step 5: `retry_join`, members EC2 reports not running left out.
async fn join_list(
    opened: &super::Opened,
    elected: &Elected,
    me: &Identity,
) -> Vec<std::net::IpAddr> {
    let expiry = elected.view.settings.expiry;
    let not_running = match &opened.aws {
        Some(aws) => {
            ec2::not_running(
                aws,
                &decision::join_candidates(&elected.view, &me.node, expiry),
            )
            .await
        }
        None => Default::default(),
    };
    decision::join_list(
        &elected.view,
        elected.mode,
        &me.node,
        me.address,
        expiry,
        &not_running,
    )
}

/// Step 6: the secrets made at genesis (--secrets): read, or made by a
/// server and read back.
async fn genesis_material(
    store: Option<&dyn crate::secrets::SecretStore>,
    elected: &Elected,
    own: Option<&str>,
    dry_run: bool,
) -> Result<Option<crate::secrets::Material>> {
    // The generations are the record's (a rotation moves them).
    let gens = generations(elected);
    match (store, elected.cluster_id.as_deref()) {
        (Some(store), Some(cluster)) => {
            // This node's own token, in the same round of reads.
            let node = async {
                match own.filter(|_| !dry_run) {
                    Some(id) => super::node_tokens::read(store, cluster, id).await,
                    None => Ok(None),
                }
            };
            let (mut m, node) = tokio::try_join!(
                crate::secrets::genesis_with(store, cluster, elected.mode.is_server(), gens),
                node
            )?;
            m.node_token = node;
            Ok(Some(m))
        }
        (Some(_), None) => Err(usage(
            "--secrets needs a cluster id to keep secrets under, and this registry has no \
             cluster record (the original tool's): run `auto-consul cluster set` or drop --secrets",
        )),
        (None, _) => Ok(None),
    }
}

/// The generations of the secrets nodes run with, by the record of the
/// cluster this node is in (rotations move them).
fn generations(elected: &Elected) -> crate::secrets::Generations {
    crate::secrets::Generations::of(
        elected
            .view
            .record()
            .filter(|r| Some(r.cluster_id.as_str()) == elected.cluster_id.as_deref()),
    )
}

/// Step 7: Consul's config file (0600 when it holds a secret), and the
/// other files of the config dir that set what it decides, warned about.
fn consul_config_file(
    opts: &GlobalOpts,
    root: &Root,
    config: &ConsulSettings<'_>,
    holds_secret: bool,
) -> (FileSpec, Vec<precedence::Conflict>) {
    let contents = render::consul_config(config);
    let conflicts = precedence::conflicts(
        &root.path(&opts.consul.config_dir),
        &opts.consul.config_dir,
        CONFIG_FILE,
        &[LEGACY_CONFIG_FILE],
        &serde_json::from_str(&contents).expect("rendered JSON parses"),
    );
    for c in &conflicts {
        tracing::warn!("{c}");
    }
    let file = FileSpec {
        path: opts.consul.config_dir.join(CONFIG_FILE),
        contents,
        mode: if holds_secret { 0o600 } else { 0o640 },
        owner: root.user("consul"),
    };
    (file, conflicts)
}

/// Step 8: every file, atomically, under the lock the heartbeat's
/// rewrites take; the old config file and a sandbox drop-in no longer
/// wanted removed. Returns the paths actually rewritten.
fn write_files(
    root: &Root,
    config_dir: &std::path::Path,
    files: &[FileSpec],
) -> Result<Vec<PathBuf>> {
    let _lock = install::lock(root, "consul-config")?;
    let mut written = Vec::new();
    for f in files {
        if install::write_atomic(root, f)? {
            written.push(root.path(&f.path));
        }
    }
    remove_legacy_config(root, config_dir)?;
    if !files
        .iter()
        .any(|f| f.path == std::path::Path::new(SANDBOX_DROPIN))
    {
        remove_sandbox_dropin(root)?;
    }
    Ok(written)
}

/// Step 8: Consul, the heartbeat timer, the leave unit (and the launch
/// gate in an autoscaling group, the snapshot timer on servers), enabled
/// and started without waiting.
fn start_units(gate: bool, snapshots: bool) -> Result<()> {
    install::systemctl(&["daemon-reload"])?;
    let mut units = vec![
        "enable",
        "--now",
        "--no-block",
        "consul.service",
        "auto-consul-heartbeat.timer",
        "auto-consul-leave.service",
    ];
    if gate {
        units.push("auto-consul-gate.service");
    }
    if snapshots {
        units.push("auto-consul-snapshot.timer");
    }
    install::systemctl(&units)
}

/// What `run` did, as `--json` or text says it.
struct Done<'a> {
    elected: &'a Elected,
    me: &'a Identity,
    retry_join: &'a [std::net::IpAddr],
    files: Vec<PathBuf>,
    written: Vec<PathBuf>,
    conflicts: &'a [precedence::Conflict],
    notify: bool,
    start: bool,
    dry_run: bool,
    hook: Option<&'a crate::lifecycle::Hook>,
}

impl Done<'_> {
    fn json(&self) -> serde_json::Value {
        let (elected, me) = (self.elected, self.me);
        json!({
            "mode": elected.mode.as_str(),
            "node": me.node,
            "address": me.address.to_string(),
            "instance_id": me.instance_id,
            "cluster_id": elected.cluster_id,
            "slot": elected.slot,
            "bootstrap": elected.mode == Mode::Bootstrap,
            "retry_join": self.retry_join.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "cluster": cluster_summary(elected, me),
            "files": self.files,
            "config_conflicts": self.conflicts.iter().map(|c| json!({
                "file": c.file, "key": c.key, "effect": c.effect,
            })).collect::<Vec<_>>(),
            "consul_type": if self.notify { "notify" } else { "exec" },
            "changed": self.written,
            "started": self.start,
            "dry_run": self.dry_run,
            "lifecycle_hook": self.hook.map(|h| json!({"group": h.group, "hook": h.hook})),
        })
    }

    fn print(&self) {
        let (elected, me) = (self.elected, self.me);
        let verb = if self.dry_run { "would run" } else { "runs" };
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
        let join: Vec<String> = self.retry_join.iter().map(|a| a.to_string()).collect();
        println!("retry_join: [{}]", join.join(", "));
        let summary = cluster_summary(elected, me);
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
        for p in &self.files {
            let what = if self.dry_run {
                "would write"
            } else if self.written.contains(p) {
                "wrote"
            } else {
                "unchanged"
            };
            println!("{what}: {}", p.display());
        }
        if self.start {
            println!(
                "started: consul.service, auto-consul-heartbeat.timer, auto-consul-leave.service"
            );
        }
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
