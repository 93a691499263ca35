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
use crate::render::{self, ConsulSettings, Tls};
use crate::state::{self, State};

mod elect;
mod files;
mod probe;
mod secrets;
mod witness;

use elect::{Elected, Elector};
use files::*;
pub use files::{
    CONFIG_FILE, ENV_FILE, HEARTBEAT_TIMER, LEAVE_UNIT, UnitStrings, ensure_consul_user,
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
/// `run` (or `plan` with `dry_run`).
pub async fn run(opts: &GlobalOpts, dry_run: bool) -> Result<()> {
    let url = registry_url(opts)?;
    let root = Root::new(&opts.root);
    // What can fail on local input fails before anything is asked or
    // claimed; the rest (files that need the identity) before any claim.
    let consul = find_consul(&root)?;
    let auto_consul = own_binary(&root)?;
    let secrets = Secrets::read(opts)?;
    if opts.ca_file.is_some() && opts.cert_file.is_none() && opts.role != RoleWanted::Agent {
        return Err(usage(
            "--ca-file without --cert-file: a server needs its own certificate (--cert-file and \
             --key-file); only a node run with --role agent does without one (it gets one from \
             the servers through auto_encrypt)",
        ));
    }

    if let Some(c) = precedence::bootstrapping(
        &root.path(&opts.config_dir),
        &opts.config_dir,
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
    let manages_consul = manages_consul_unit(&root);
    if !dry_run && root.is_system() && manages_consul {
        ensure_consul_user(&root)?;
    }

    // The identity (IMDS), the check of conditional writes and the first
    // read of the registry are independent: they run at once. No claim is
    // made before the check has passed.
    let seed = seed_settings(opts);
    let identity = identity::of(opts);
    let registry = async {
        let opened = open_store(&url).await?;
        let store = opened.store.as_ref();
        let probe = async {
            // An agent never makes a conditional write (DESIGN.md: agents
            // write only agents/ keys), so it has nothing to probe.
            if dry_run || opts.role == RoleWanted::Agent {
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
    let units = UnitStrings::new(opts, &auto_consul, Some(&url))?;
    let consul = render::unit_path(&consul).context("the consul binary's path")?;
    let mut fixed_files = fixed_files(
        opts,
        &root,
        manages_consul,
        &units,
        &consul,
        &url.to_string(),
    )?;
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

    let secrets_store = match &opts.secrets {
        Some(url) if !dry_run => crate::secrets::open(url).await?,
        _ => None,
    };
    let elector = Elector {
        secrets: secrets_store.as_deref(),
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
    let elected = match elector.elect(previous.as_ref(), raft, first_view).await {
        Ok(elected) => elected,
        Err(e) => {
            if !dry_run && e.downcast_ref::<elect::Definitive>().is_some() {
                crate::lifecycle::abandon(
                    opts,
                    me.instance_id.as_deref(),
                    "this boot cannot succeed",
                )
                .await;
            }
            return Err(e);
        }
    };
    // In an autoscaling group, the launch gate's unit puts the instance in
    // service once Consul is (an agent: a leader; a server: a voter).
    let hook = if dry_run {
        None
    } else {
        crate::lifecycle::hook(opts, me.instance_id.as_deref()).await
    };
    let settings = elected.view.settings;
    if !dry_run {
        crate::metrics::node(elected.mode, elected.slot);
        crate::metrics::live_servers(
            decision::live_servers(&elected.view, &me.node, settings.expiry).len(),
        );
    }
    // The timer follows the expiry that rules (the cluster record's): a
    // server's, or the longer one of agents.
    let timer_expiry = if elected.mode.is_server() {
        settings.expiry
    } else {
        settings.agent_expiry
    };
    // Settled by the election's one gate (`Elector::may_bootstrap`).
    let bootstrap = elected.mode == Mode::Bootstrap;
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

    // Consul joins every instance a cloud entry finds, not the first: only
    // agents get it (a server's gossip pool and Raft peers come from the
    // registry), and never a bootstrap server.
    let cloud_join = opts
        .cloud_join
        .as_deref()
        .filter(|_| elected.mode == Mode::Agent);
    // Consul's readiness notice is worth waiting for when it has someone
    // to join; a lone bootstrap server never sends it.
    let notify = !retry_join.is_empty() || cloud_join.is_some();
    decided_units(
        &mut fixed_files,
        &units,
        &consul,
        &root,
        timer_expiry,
        notify,
    );
    // Secrets made at genesis (--secrets): read, or made by a server and
    // read back. What an operator's files give wins, piece by piece.
    let made = match (secrets_store.as_deref(), elected.cluster_id.as_deref()) {
        (Some(store), Some(cluster)) => {
            Some(crate::secrets::genesis(store, cluster, elected.mode.is_server()).await?)
        }
        (Some(_), None) => {
            return Err(usage(
                "--secrets needs a cluster id to keep secrets under, and this registry has no \
                 cluster record (the original tool's): run `auto-consul cluster set` or drop --secrets",
            ));
        }
        (None, _) => None,
    };
    let tls_files = match &made {
        Some(m) if opts.ca_file.is_none() => tls_material(
            &root,
            &opts.config_dir,
            m,
            elected.mode,
            &opts.datacenter,
            me.address,
        )?,
        _ => Vec::new(),
    };
    let tls_path = |f: &str| crate::secrets::tls_path(&opts.config_dir, f);
    let (ca_path, cert_path, key_path) = (
        tls_path("ca.pem"),
        tls_path("server.pem"),
        tls_path("server-key.pem"),
    );
    let tls = if tls_files.is_empty() {
        Tls {
            ca_file: opts.ca_file.as_deref(),
            cert_file: opts.cert_file.as_deref(),
            key_file: opts.key_file.as_deref(),
        }
    } else {
        Tls {
            ca_file: Some(&ca_path),
            cert_file: elected.mode.is_server().then_some(cert_path.as_path()),
            key_file: elected.mode.is_server().then_some(key_path.as_path()),
        }
    };
    let config = ConsulSettings {
        node: &me.node,
        address: me.address,
        data_dir: &opts.data_dir,
        datacenter: &opts.datacenter,
        mode: elected.mode,
        bootstrap,
        servers: settings.servers,
        retry_join: &retry_join,
        cloud_join,
        encrypt: secrets
            .encrypt
            .as_deref()
            .or(made.as_ref().map(|m| m.gossip_key.as_str())),
        acl_token: secrets.acl_token.as_deref(),
        acl: made.as_ref().map(|m| render::GenesisAcl {
            management: m.management_token.as_deref(),
            agent: &m.agent_token,
        }),
        tls,
    };
    if !dry_run && raft && elected.mode.is_server() {
        clear_stale_server_metadata(&root, &opts.data_dir)?;
    }
    if !dry_run && !root.is_system() && manages_consul {
        ensure_consul_user(&root)?;
    }
    let consul_user = root.user("consul");
    let consul_config = render::consul_config(&config);
    let conflicts = precedence::conflicts(
        &root.path(&opts.config_dir),
        &opts.config_dir,
        CONFIG_FILE,
        &[LEGACY_CONFIG_FILE],
        &serde_json::from_str(&consul_config).expect("rendered JSON parses"),
    );
    for c in &conflicts {
        tracing::warn!("{c}");
    }
    let mut files = vec![FileSpec {
        path: opts.config_dir.join(CONFIG_FILE),
        contents: consul_config,
        mode: if secrets.any() || made.is_some() {
            0o600
        } else {
            0o640
        },
        owner: consul_user,
    }];
    files.extend(tls_files.into_iter().map(|mut f| {
        f.owner = consul_user;
        f
    }));
    files.extend(fixed_files);
    if hook.is_some() {
        files.push(FileSpec {
            path: GATE_UNIT.into(),
            contents: render::gate_service(&units.paths()),
            mode: 0o644,
            owner: None,
        });
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

    let mut written = Vec::new();
    if !dry_run {
        let _lock = install::lock(&root, "consul-config")?;
        for f in &files {
            if install::write_atomic(&root, f)? {
                written.push(root.path(&f.path));
            }
        }
        remove_legacy_config(&root, &opts.config_dir)?;
        if !files
            .iter()
            .any(|f| f.path == std::path::Path::new(SANDBOX_DROPIN))
        {
            remove_sandbox_dropin(&root)?;
        }
    }
    let start = !dry_run && !opts.no_start && root.is_system();
    if start {
        install::systemctl(&["daemon-reload"])?;
        let mut units = vec![
            "enable",
            "--now",
            "--no-block",
            "consul.service",
            "auto-consul-heartbeat.timer",
            "auto-consul-leave.service",
        ];
        if hook.is_some() {
            units.push("auto-consul-gate.service");
        }
        install::systemctl(&units)?;
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
            "config_conflicts": conflicts.iter().map(|c| json!({
                "file": c.file, "key": c.key, "effect": c.effect,
            })).collect::<Vec<_>>(),
            "consul_type": if notify { "notify" } else { "exec" },
            "changed": written,
            "started": start,
            "dry_run": dry_run,
            "lifecycle_hook": hook.as_ref().map(|h| json!({"group": h.group, "hook": h.hook})),
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
