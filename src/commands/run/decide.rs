//! `run`'s second phase, decide: from what was gathered and what the
//! election settled to a [`NodePlan`], every file with its path, mode,
//! owner and contents, every file moved aside or removed, every unit
//! action. Nothing here reads or writes outside the values it is given
//! (a new server certificate's key is drawn from the OS random source).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Result;

use super::elect::Elected;
use super::files::*;
use super::gather::{After, Before, Disk, Election, generations};
use crate::cli::{ConsulOpts, GlobalOpts, SecretOpts, SnapshotOpts, WaitOpts};
use crate::install::FileSpec;
use crate::model::Mode;
use crate::precedence::Conflict;
use crate::render::{self, ConsulSettings};
use crate::state::State;

/// What `run` does on this node, in full; `plan` shows it.
pub(super) struct NodePlan {
    /// Written atomically under the config lock, in this order.
    pub(super) files: Vec<FileSpec>,
    /// During a gossip key rotation, Consul's keyring with both keys,
    /// written first (in Consul's serf directory, made owned by the consul
    /// user when new).
    pub(super) keyring: Option<FileSpec>,
    /// Moved aside before Consul starts.
    pub(super) aside: Vec<Aside>,
    /// Removed after the files are written, when present.
    pub(super) remove: Vec<Removal>,
    /// The generations this node now runs with, recorded for its
    /// heartbeat (a failure is a warning).
    pub(super) records: Vec<FileSpec>,
    /// Whether a missing consul user is to be warned about (under a root
    /// other than `/`, where it is never made).
    pub(super) check_consul_user: bool,
    /// Units enabled and started (after `daemon-reload`), when `start`.
    pub(super) units: Vec<&'static str>,
    pub(super) start: bool,
    /// Consul's unit type is `notify` (it has someone to join).
    pub(super) notify: bool,
    pub(super) retry_join: Vec<IpAddr>,
    /// Other files of the config dir that set what this one decides.
    pub(super) conflicts: Vec<Conflict>,
    /// Consul's config file holds a secret (masked when shown).
    pub(super) config_holds_secret: bool,
}

/// A file moved aside: Consul would use it against the decision.
pub(super) struct Aside {
    /// What the file is, as the log names it.
    pub(super) what: &'static str,
    pub(super) from: PathBuf,
    pub(super) to: PathBuf,
    pub(super) why: String,
}

/// A file auto-consul removes when present.
pub(super) struct Removal {
    pub(super) path: PathBuf,
    pub(super) why: &'static str,
}

/// The plan for this node.
pub(super) fn decide(opts: &GlobalOpts, b: &Before, e: &Election, a: &After) -> Result<NodePlan> {
    let elected = &e.elected;
    let server = elected.mode.is_server();
    let settings = elected.view.settings;
    // Consul joins every instance a cloud entry finds: agents only.
    let cloud_join = opts
        .consul
        .cloud_join
        .as_deref()
        .filter(|_| elected.mode == Mode::Agent);
    // Consul's readiness notice is worth waiting for when it has someone
    // to join; a lone bootstrap server never sends it.
    let notify = !a.retry_join.is_empty() || cloud_join.is_some();
    let timer_expiry = if server {
        settings.expiry
    } else {
        settings.agent_expiry
    };
    let mut fixed = b.fixed.clone();
    decided_units(
        &mut fixed,
        &b.units,
        &b.consul,
        &b.root,
        timer_expiry,
        notify,
    );
    let tls_paths = TlsPaths::new(&opts.consul.config_dir);
    let tls_files = match &a.made {
        Some(m) if opts.tls.ca_file.is_none() => tls_material(
            &tls_paths,
            m,
            elected.mode,
            &format!("server.{}.{}", opts.consul.datacenter, opts.consul.domain),
            &b.me.node,
            b.me.address,
            a.disk.tls.as_ref(),
        )?,
        _ => Vec::new(),
    };
    let tls = tls_paths.tls(&opts.tls, elected.mode, !tls_files.is_empty());
    let config = consul_settings(&opts.consul, b, elected, a, cloud_join, tls);
    let holds_secret = b.local.secrets.any() || a.made.is_some();
    let (config_file, conflicts) = consul_config_file(&opts.consul, &config, holds_secret, &a.disk);
    let mut files = vec![config_file];
    files.extend(tls_files.into_iter().map(|mut f| {
        f.owner = a.disk.consul_user;
        f
    }));
    files.extend(fixed);
    files.extend(extra_units(&opts.waits, &opts.snapshots, b, e, server));
    files.push(state_file(b, elected));
    let mut plan = NodePlan {
        files,
        keyring: None,
        aside: Vec::new(),
        remove: removals(&opts.consul, &a.disk, &b.fixed),
        records: records(&opts.tls, b, elected, a),
        check_consul_user: !b.root.is_system() && b.local.manages_consul,
        units: units(
            e.launch.as_ref().and_then(|l| l.hook.as_ref()).is_some(),
            server,
        ),
        start: !opts.consul.no_start && b.root.is_system(),
        notify,
        retry_join: a.retry_join.clone(),
        conflicts,
        config_holds_secret: holds_secret,
    };
    data_dir_work(&opts.consul, b, elected, a, config.encrypt, &mut plan);
    Ok(plan)
}

/// The state file: this node's decision, for its next boot and its
/// heartbeat.
fn state_file(b: &Before, elected: &Elected) -> FileSpec {
    crate::state::file(&State {
        registry: b.url.to_string(),
        cluster_id: elected.cluster_id.clone(),
        mode: elected.mode,
        node: b.me.node.clone(),
        address: b.me.address,
        instance_id: b.me.instance_id.clone(),
        slot: elected.slot,
        claim_id: elected.claim_id.clone(),
    })
}

/// Consul's configuration, as rendered into its config file.
fn consul_settings<'a>(
    consul: &'a ConsulOpts,
    b: &'a Before,
    elected: &'a Elected,
    a: &'a After,
    cloud_join: Option<&'a str>,
    tls: crate::render::Tls<'a>,
) -> ConsulSettings<'a> {
    let made = a.made.as_ref();
    ConsulSettings {
        node: &b.me.node,
        address: b.me.address,
        data_dir: &consul.data_dir,
        datacenter: &consul.datacenter,
        domain: &consul.domain,
        mode: elected.mode,
        // Settled by the election's one gate (`Elector::may_bootstrap`).
        bootstrap: elected.mode == Mode::Bootstrap,
        servers: elected.view.settings.servers,
        retry_join: &a.retry_join,
        cloud_join,
        encrypt: b
            .local
            .secrets
            .encrypt
            .as_deref()
            .or(made.map(|m| m.gossip_key.as_str())),
        acl_token: b.local.secrets.acl_token.as_deref(),
        acl: made.map(|m| render::GenesisAcl {
            // A secondary's Consul makes no initial management token
            // (its servers make theirs with the replication token).
            management: m
                .management_token
                .as_deref()
                .filter(|_| a.primary.is_none()),
            agent: m.agent_token_in_use(),
            dns: &m.dns_token,
            replication: a.replication.as_deref(),
        }),
        tls,
        primary_datacenter: a.primary.as_ref().map(|p| p.datacenter.as_str()),
        retry_join_wan: &a.retry_join_wan,
    }
}

/// Consul's config file (0600 when it holds a secret), and the other
/// files of the config dir that set what it decides, warned about.
fn consul_config_file(
    consul: &ConsulOpts,
    config: &ConsulSettings<'_>,
    holds_secret: bool,
    disk: &Disk,
) -> (FileSpec, Vec<Conflict>) {
    let contents = render::consul_config(config);
    let conflicts = crate::precedence::conflicts_with(
        &disk.other_config,
        &consul.config_dir,
        CONFIG_FILE,
        &serde_json::from_str(&contents).expect("rendered JSON parses"),
    );
    for c in &conflicts {
        tracing::warn!("{c}");
    }
    let file = FileSpec {
        path: consul.config_dir.join(CONFIG_FILE),
        contents,
        mode: if holds_secret { 0o600 } else { 0o640 },
        owner: disk.consul_user,
    };
    (file, conflicts)
}

/// The launch gate (in an autoscaling group) and, on servers, the
/// snapshot service and timer.
fn extra_units(
    waits: &WaitOpts,
    snapshots: &SnapshotOpts,
    b: &Before,
    e: &Election,
    server: bool,
) -> Vec<FileSpec> {
    let mut out = Vec::new();
    if e.launch.as_ref().and_then(|l| l.hook.as_ref()).is_some() {
        out.push(FileSpec {
            path: GATE_UNIT.into(),
            contents: render::gate_service(&b.units.paths(), waits.gate_wait),
            mode: 0o644,
            owner: None,
        });
    }
    if server {
        out.push(unit(
            SNAPSHOT_SERVICE,
            render::snapshot_service(&b.units.paths()),
        ));
        out.push(unit(
            SNAPSHOT_TIMER,
            render::snapshot_timer(snapshots.interval()),
        ));
    }
    out
}

/// The units enabled and started: Consul, the heartbeat timer, the leave
/// unit, and the launch gate in an autoscaling group, the snapshot timer
/// on servers.
fn units(gate: bool, server: bool) -> Vec<&'static str> {
    let mut units = vec![
        "consul.service",
        "auto-consul-heartbeat.timer",
        "auto-consul-leave.service",
    ];
    if gate {
        units.push("auto-consul-gate.service");
    }
    if server {
        units.push("auto-consul-snapshot.timer");
    }
    units
}

/// The old config file (`auto-consul.json`, read before the packaged
/// `consul.hcl`: Consul would read both), and the sandbox drop-in
/// auto-consul wrote when `--sandbox-consul` is no longer set (or Consul's
/// unit is now auto-consul's own).
fn removals(consul_opts: &ConsulOpts, disk: &Disk, fixed: &[FileSpec]) -> Vec<Removal> {
    let mut out = Vec::new();
    if disk.legacy_config {
        out.push(Removal {
            path: consul_opts.config_dir.join(LEGACY_CONFIG_FILE),
            why: "auto-consul's config file before it was renamed zz-auto-consul.json",
        });
    }
    if disk.sandbox_dropin_ours && !fixed.iter().any(|f| f.path == Path::new(SANDBOX_DROPIN)) {
        out.push(Removal {
            path: SANDBOX_DROPIN.into(),
            why: "--sandbox-consul is not set",
        });
    }
    out
}

/// The generations this node runs with, for its heartbeat: the agents'
/// token's, the CA's, a server's management token's, and which token its
/// Consul runs with (a node that ran with its own and no longer does
/// follows the shared one).
fn records(tls: &SecretOpts, b: &Before, elected: &Elected, a: &After) -> Vec<FileSpec> {
    use crate::commands::rotate::{
        AGENT_TOKEN_GENERATION, CA_SIGNED_BY, CA_TRUSTED, MANAGEMENT_TOKEN_GENERATION, list_file,
    };
    use crate::state::number_file;
    let Some(m) = &a.made else {
        return Vec::new();
    };
    let gens = generations(elected);
    let server = elected.mode.is_server();
    let mut out = Vec::new();
    if b.local.secrets.acl_token.is_none() {
        out.push(number_file(AGENT_TOKEN_GENERATION, gens.agent_token));
    }
    if tls.ca_file.is_none() {
        out.push(list_file(CA_TRUSTED, &gens.ca.trusted()));
        if server {
            out.push(number_file(CA_SIGNED_BY, gens.ca.signing()));
        }
    }
    if server {
        out.push(number_file(
            MANAGEMENT_TOKEN_GENERATION,
            gens.management_token.max(1),
        ));
    }
    let kind = if a.own.is_some() && m.node_token.is_some() {
        "node"
    } else {
        "shared"
    };
    out.push(crate::commands::node_tokens::kind_file(kind));
    out
}

/// What the data dir needs before Consul starts: a server's stale
/// `server_metadata.json` and keyrings Consul would use against the key
/// moved aside; during a gossip key rotation, a keyring with both keys.
fn data_dir_work(
    consul: &ConsulOpts,
    b: &Before,
    elected: &Elected,
    a: &After,
    encrypt: Option<&str>,
    plan: &mut NodePlan,
) {
    let data_dir = &consul.data_dir;
    if b.raft && elected.mode.is_server() {
        plan.aside.extend(stale_server_metadata(&a.disk, data_dir));
    }
    let Some(key) = encrypt else {
        return;
    };
    let changed = match (&a.disk.previous_cluster, &elected.cluster_id) {
        (Some(was), Some(now)) if was != now => Some((was.as_str(), now.as_str())),
        _ => None,
    };
    plan.aside
        .extend(stale_keyrings(&a.disk, data_dir, key, changed));
    // A gossip key rotation under way: the keyring holds both keys (the
    // primary first, as Consul's keyring file lists it), so this node
    // reads every member whichever key it sends with.
    if let Some(other) = a.made.as_ref().and_then(|m| m.gossip_other.as_deref())
        && b.local.secrets.encrypt.is_none()
    {
        plan.keyring = Some(rotation_keyring(data_dir, key, other, a.disk.consul_user));
    }
}

/// A server that may rejoin (the election kept or gave it a server's
/// place in its cluster) but was stopped longer than Consul's
/// `server_rejoin_age_max` would restart-loop on Consul's refusal. The
/// registry has just decided it rejoins, so the step Consul's docs leave
/// to an operator is taken: its `server_metadata.json` is moved aside
/// (kept as `server_metadata.json.stale`); the Raft data stays and Consul
/// catches up from the leader. The move, when one is due.
fn stale_server_metadata(disk: &Disk, data_dir: &Path) -> Option<Aside> {
    let path = data_dir.join(SERVER_METADATA);
    let text = disk.server_metadata.as_deref()?;
    let Some(offline) = server_offline_for(text, disk.now_unix) else {
        tracing::warn!(
            "{} is not the {{\"last_seen_unix\": N}} Consul writes: left alone",
            path.display()
        );
        return None;
    };
    if offline <= SERVER_REJOIN_AGE_MAX {
        return None;
    }
    Some(Aside {
        what: "Consul's server metadata",
        to: path.with_file_name(format!("{SERVER_METADATA}.stale")),
        from: path,
        why: format!(
            "this server last ran {} h ago, past Consul's server_rejoin_age_max (168 h), and the \
             registry has it rejoin its cluster: Consul starts without it and catches up from the leader",
            offline / 3600
        ),
    })
}

/// Consul loads `serf/local.keyring` whenever it exists and then ignores
/// `encrypt`, logging only "keyring doesn't include key provided with
/// -encrypt, using keyring" (agent/keyring.go, `setupBaseKeyrings`). A node
/// whose cluster changed (a new cluster, a new gossip key) would gossip
/// with the old key and never join. So before Consul starts, a keyring
/// that does not hold `key`, or any keyring when this node's cluster
/// changed, is moved aside (kept as `<file>.stale-<unix time>`, logged);
/// one that holds the key of the same cluster is kept (a rotation under
/// way adds keys to it). The moves due.
fn stale_keyrings(
    disk: &Disk,
    data_dir: &Path,
    key: &str,
    cluster_changed: Option<(&str, &str)>,
) -> Vec<Aside> {
    let mut out = Vec::new();
    for (rel, text) in &disk.keyrings {
        let keys: Option<Vec<String>> = serde_json::from_str(text).ok();
        let why = match (cluster_changed, &keys) {
            (Some((was, now)), _) => format!("this node was in cluster {was} and is now in {now}"),
            (None, None) => "it is not the JSON list of keys Consul writes".to_string(),
            (None, Some(k)) if !k.iter().any(|k| k.trim() == key) => {
                "it does not hold the cluster's gossip key".to_string()
            }
            (None, Some(_)) => continue,
        };
        let from = data_dir.join(rel);
        let name = from
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("keyring")
            .to_string();
        out.push(Aside {
            what: "Consul's gossip keyring",
            to: from.with_file_name(format!("{name}.stale-{}", disk.now_unix)),
            from,
            why: format!(
                "{why}; Consul would use this gossip keyring and ignore the key in its config"
            ),
        });
    }
    out
}

/// Consul's LAN keyring with `primary` then `other` (what Consul itself
/// writes there: a JSON list of base64 keys, the first its primary,
/// agent/keyring.go `loadKeyringFile`), owned by consul, 0600.
fn rotation_keyring(
    data_dir: &Path,
    primary: &str,
    other: &str,
    owner: Option<(u32, u32)>,
) -> FileSpec {
    FileSpec {
        path: data_dir.join(KEYRINGS[0]),
        contents: serde_json::to_string(&[primary, other]).expect("strings serialise"),
        mode: 0o600,
        owner,
    }
}

/// The TLS files of a node whose secrets were made at genesis (see
/// [`TlsPaths`]): the CA file, and a server's certificate and key, kept
/// from the disk (`on_disk`: certificate, key, CA) while still good, else
/// newly signed.
fn tls_material(
    paths: &TlsPaths,
    made: &crate::secrets::Material,
    mode: crate::model::Mode,
    server_name: &str,
    node: &str,
    address: std::net::IpAddr,
    on_disk: Option<&(String, String, String)>,
) -> Result<Vec<FileSpec>> {
    use crate::secrets::{certificate_still_good, server_certificate};
    let file = |path: &Path, contents: String, mode: u32| FileSpec {
        path: path.to_path_buf(),
        contents,
        mode,
        owner: None,
    };
    let mut out = vec![file(&paths.ca, made.ca_cert.clone(), 0o644)];
    if mode.is_server() {
        let kept = match on_disk {
            Some((cert, key, ca)) if certificate_still_good(cert, made, ca, server_name, node) => {
                Some((cert.clone(), key.clone()))
            }
            _ => None,
        };
        let (cert, key) = match kept {
            Some(pair) => pair,
            None => server_certificate(made, server_name, address)?,
        };
        out.push(file(&paths.cert, cert, 0o644));
        out.push(file(&paths.key, key, 0o600));
    }
    Ok(out)
}
