//! The commands, and what they share: the settings resolved from the command
//! line and the registry they open.

mod cluster;
pub(crate) mod federation;
mod gate;
mod heartbeat;
mod install;
mod leave;
mod members;
pub(crate) mod node_tokens;
mod purge;
mod recover;
mod rejoin;
mod renew;
pub(crate) mod rotate;
mod run;
mod secrets;
mod snapshot;
mod status;

use std::path::Path;

use anyhow::Result;

use crate::cli::{Cli, ClusterOpts, Command, ConsulOpts, GlobalOpts, OutputOpts, SecretOpts};
use crate::error::usage;
use crate::install::Root;
use crate::registry::{self, RegistryUrl, Store};
use crate::render;

/// Runs one command.
pub async fn dispatch(cli: Cli) -> Result<()> {
    let g = &cli.global;
    let (consul, output) = (&g.consul, &g.output);
    match cli.command {
        Command::Run => measured(consul, output, "run", run::run(g, false)).await,
        Command::Plan => run::run(g, true).await,
        Command::Members => members::members(&g.cluster, output).await,
        Command::Status => status::status(g).await,
        Command::Heartbeat => measured(consul, output, "heartbeat", heartbeat::heartbeat(g)).await,
        Command::Purge => purge::purge(&g.cluster, output).await,
        Command::Leave { if_terminating } => leave::leave(g, if_terminating).await,
        Command::Install { now } => install::install(g, now),
        Command::Cluster { action } => cluster::cluster(&g.cluster, output, &action).await,
        Command::Secrets { action } => secrets::secrets(g, &action).await,
        Command::Gate => gate::gate(g).await,
        Command::Recover { plan, apply } => {
            let step = match apply {
                Some(hash) => recover::Step::Apply((!hash.is_empty()).then_some(hash)),
                None if plan => recover::Step::Pin,
                None => recover::Step::Show,
            };
            recover::recover(g, step).await
        }
        Command::Snapshot => measured(consul, output, "snapshot", snapshot::snapshot(g)).await,
        Command::Restore { key, cancel } => snapshot::restore(g, key.as_deref(), cancel).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut cmd, "auto-consul", &mut text);
            print_all(&text)
        }
        Command::Man => {
            let mut text = Vec::new();
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut text)
                .map_err(|e| anyhow::anyhow!("rendering the manual page: {e}"))?;
            print_all(&text)
        }
    }
}

/// Runs `command` and writes its metrics (`--metrics-file`), failed or not.
async fn measured(
    consul: &ConsulOpts,
    output: &OutputOpts,
    name: &str,
    command: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    let result = command.await;
    if let Some(path) = &output.metrics_file {
        let root = Root::new(&consul.root);
        if let Err(e) = crate::metrics::write(&root, path, name, result.is_ok()) {
            tracing::warn!("could not write the metrics file {}: {e:#}", path.display());
        }
    }
    result
}

/// Writes generated text to stdout; a reader that stops early (`| head`)
/// is no error.
fn print_all(text: &[u8]) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().write_all(text) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(anyhow::anyhow!("writing to stdout: {e}"))
        }
        _ => Ok(()),
    }
}

/// An open registry, and the AWS configuration when it lives in S3.
pub struct Opened {
    /// The store.
    pub store: Box<dyn Store>,
    /// The AWS configuration (S3 registries only).
    pub aws: Option<aws_config::SdkConfig>,
}

/// Opens the registry's store, loading the AWS configuration only for S3.
pub async fn open_store(url: &RegistryUrl) -> Result<Opened> {
    open_store_in(url, None).await
}

/// [`open_store`], an S3 bucket read in `region` when given (a federated
/// primary's, in another region).
pub async fn open_store_in(url: &RegistryUrl, region: Option<&str>) -> Result<Opened> {
    let aws = match url {
        RegistryUrl::S3 { .. } => Some(crate::aws::load_in(region).await?),
        RegistryUrl::File { .. } => None,
    };
    let store = registry::open(url, aws.as_ref()).await?;
    Ok(Opened {
        store: Box::new(crate::metrics::Counted(store)),
        aws,
    })
}

/// The mode of the env file: the operator's, when the file exists (a
/// 0600 file holding a proxy's credentials stays 0600), else 0644 (it
/// holds no secret of auto-consul's).
pub fn env_file_mode(root: &Root) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(root.path(Path::new(run::ENV_FILE)))
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

/// Cluster `cluster`'s management token when ACLs were made at genesis
/// (`--secrets`), for the endpoints that need one (snapshots, autopilot's
/// health); otherwise none (`CONSUL_HTTP_TOKEN`, if set, is sent). Only
/// read: nothing is made.
pub async fn management_token(
    cluster_opts: &ClusterOpts,
    consul: &ConsulOpts,
    tls: &SecretOpts,
    cluster: &str,
) -> Result<Option<String>> {
    let Some(url) = &tls.secrets else {
        return Ok(None);
    };
    let Some(store) = crate::secrets::open(url).await? else {
        return Ok(None);
    };
    let generation = management_generation(cluster_opts, consul, cluster).await;
    crate::secrets::management_token(store.as_ref(), cluster, generation).await
}

/// The generation of cluster `cluster`'s management token to use here: on
/// one of its servers, the one its Consul holds (recorded at its last
/// start: valid until every server moved on); elsewhere, the one the
/// cluster record says is in use; else 1, the one made at genesis.
async fn management_generation(
    cluster_opts: &ClusterOpts,
    consul: &ConsulOpts,
    cluster: &str,
) -> u32 {
    let root = Root::new(&consul.root);
    let local = crate::state::load(&root)
        .filter(|s| s.mode.is_server() && s.cluster_id.as_deref() == Some(cluster));
    if local.is_some() {
        return crate::state::recorded_number(&root, rotate::MANAGEMENT_TOKEN_GENERATION)
            .unwrap_or(1);
    }
    let Ok(registry) = cluster_opts.registry_url() else {
        return 1;
    };
    let read = async {
        let opened = open_store(&registry).await?;
        crate::registry::read_cluster(opened.store.as_ref()).await
    };
    match read.await {
        Ok(Some((r, _))) if r.cluster_id == cluster => {
            r.management_token.unwrap_or_default().generation
        }
        _ => 1,
    }
}

/// Warns when the flags given differ from the settings that rule.
pub fn warn_on_mismatch(cluster_opts: &ClusterOpts, view: &crate::registry::RegistryView) {
    let Some(record) = view.record() else { return };
    let s = view.settings;
    let given = [
        (
            "--servers",
            "AUTO_CONSUL_SERVERS",
            cluster_opts.servers.map(u64::from),
            u64::from(s.servers),
            "",
        ),
        (
            "--expiry",
            "AUTO_CONSUL_EXPIRY",
            cluster_opts.expiry,
            s.expiry,
            "s",
        ),
        (
            "--agent-expiry",
            "AUTO_CONSUL_AGENT_EXPIRY",
            cluster_opts.agent_expiry,
            s.agent_expiry,
            "s",
        ),
    ];
    for (flag, env, mine, theirs, unit) in given {
        let Some(mine) = mine.filter(|m| *m != theirs) else {
            continue;
        };
        // The record may have been changed on purpose (`cluster set`): the
        // usual fix is this node's seed, not the record.
        tracing::warn!(
            "{flag} {mine} ({env}) differs from cluster {}'s record, which has {theirs}{unit} and rules: \
             using {theirs}{unit}. If {theirs}{unit} is meant (say, after `auto-consul cluster set`), set \
             {env}={theirs} in {} or the user data; to change the cluster, run \
             `auto-consul cluster set {flag} {mine}`",
            record.cluster_id,
            run::ENV_FILE
        );
    }
}

/// The settings in this node's env file under `root` (the one `run` and
/// `install` write and the units load); none when there is no such file.
pub fn node_env_file(root: &Path) -> Vec<(String, String)> {
    let path = Root::new(root).path(Path::new(run::ENV_FILE));
    std::fs::read_to_string(path)
        .map(|text| render::parse_env_file(&text))
        .unwrap_or_default()
}

/// The env file shared by `run`, the heartbeat and the boot unit: every
/// setting given or resolved, merged into the file under `root` as it is
/// (the operator's own lines are kept). `install` passes no identity (each
/// instance learns its own at boot) and may pass no registry (user data
/// gives it).
pub fn env_file(opts: &GlobalOpts, root: &Root, registry: Option<&str>) -> Result<String> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut vars = Vec::new();
    if let Some(registry) = registry {
        vars.push(("AUTO_CONSUL_REGISTRY", registry.to_string()));
    }
    // Only an identity the operator gave is written down: one learned from
    // IMDS is learned again by every command on this instance, so an image
    // made from this node does not carry it (the copy would take this
    // node's name, address and slot).
    if let Some(address) = opts.identity.address {
        vars.push(("AUTO_CONSUL_ADDRESS", address.to_string()));
    }
    if let Some(node) = &opts.identity.node {
        vars.push(("AUTO_CONSUL_NODE", node.clone()));
    }
    if let Some(id) = &opts.identity.instance_id {
        vars.push(("AUTO_CONSUL_INSTANCE_ID", id.clone()));
    }
    vars.push(("AUTO_CONSUL_ROLE", opts.waits.role.as_str().to_string()));
    if let Some(s) = opts.cluster.servers {
        vars.push(("AUTO_CONSUL_SERVERS", s.to_string()));
    }
    if let Some(e) = opts.cluster.expiry {
        vars.push(("AUTO_CONSUL_EXPIRY", e.to_string()));
    }
    if let Some(e) = opts.cluster.agent_expiry {
        vars.push(("AUTO_CONSUL_AGENT_EXPIRY", e.to_string()));
    }
    vars.extend([
        ("AUTO_CONSUL_DATA_DIR", path(&opts.consul.data_dir)),
        ("AUTO_CONSUL_CONFIG_DIR", path(&opts.consul.config_dir)),
        ("AUTO_CONSUL_DATACENTER", opts.consul.datacenter.clone()),
    ]);
    if opts.consul.domain != "consul" {
        vars.push(("AUTO_CONSUL_DOMAIN", opts.consul.domain.clone()));
    }
    if let Some(file) = &opts.output.metrics_file {
        vars.push(("AUTO_CONSUL_METRICS_FILE", path(file)));
    }
    if let Some(spec) = &opts.consul.cloud_join {
        vars.push(("AUTO_CONSUL_CLOUD_JOIN", spec.clone()));
    }
    for (key, value) in [
        ("AUTO_CONSUL_ENCRYPT_FILE", &opts.tls.encrypt_file),
        ("AUTO_CONSUL_ACL_TOKEN_FILE", &opts.tls.acl_token_file),
        ("AUTO_CONSUL_CA_FILE", &opts.tls.ca_file),
        ("AUTO_CONSUL_CERT_FILE", &opts.tls.cert_file),
        ("AUTO_CONSUL_KEY_FILE", &opts.tls.key_file),
    ] {
        if let Some(p) = value {
            vars.push((key, path(p)));
        }
    }
    if let Some(g) = &opts.waits.autoscaling_group {
        vars.push(("AUTO_CONSUL_AUTOSCALING_GROUP", g.clone()));
    }
    if let Some(h) = &opts.waits.lifecycle_hook {
        vars.push(("AUTO_CONSUL_LIFECYCLE_HOOK", h.clone()));
    }
    if let Some(url) = &opts.tls.secrets {
        vars.push(("AUTO_CONSUL_SECRETS", url.to_string()));
    }
    if let Some(i) = opts.snapshots.snapshot_interval {
        vars.push(("AUTO_CONSUL_SNAPSHOT_INTERVAL", i.to_string()));
    }
    if let Some(k) = opts.snapshots.snapshot_keep {
        vars.push(("AUTO_CONSUL_SNAPSHOT_KEEP", k.to_string()));
    }
    if opts.snapshots.no_restore {
        vars.push(("AUTO_CONSUL_NO_RESTORE", "true".into()));
    }
    if opts.consul.sandbox_consul {
        vars.push(("AUTO_CONSUL_SANDBOX_CONSUL", "true".into()));
    }
    if opts.cluster.allow_racy {
        vars.push(("AUTO_CONSUL_ALLOW_RACY", "true".into()));
    }
    let file = root.path(Path::new(run::ENV_FILE));
    let existing = match std::fs::read_to_string(&file) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(usage(format!(
                "cannot read the env file {} ({e}); fix its permissions",
                file.display()
            )));
        }
    };
    render::env_file(existing.as_deref(), &vars).map_err(|e| usage(format!("{e}; fix the option")))
}
