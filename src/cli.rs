//! The command line: commands, options and the environment variables behind them.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::model::{validate_address, validate_datacenter, validate_node_name};

/// Join this EC2 instance to the right Consul cluster in the right role.
///
/// At boot, `auto-consul run` learns the instance's address and name from the
/// EC2 instance metadata service (IMDSv2), reads a registry of heartbeats in
/// S3, decides race-free whether this node bootstraps the cluster, joins it as
/// a server, or runs as an agent, writes the Consul configuration and systemd
/// units, and starts Consul and a heartbeat timer.
///
/// Every option can also be given through the environment variable shown with
/// it, so units only need /etc/auto-consul/auto-consul.env.
///
/// Exit status: 0 on success, 1 on an operational failure (registry or
/// metadata service unreachable, agent not running), 2 on a usage or
/// configuration error.
#[derive(Debug, Parser)]
#[command(
    name = "auto-consul",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,

    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by every command; accepted before or after the command name,
/// grouped by concern as the help's headings group them.
#[derive(Debug, Clone, Args)]
pub struct GlobalOpts {
    #[command(flatten)]
    pub cluster: ClusterOpts,
    #[command(flatten)]
    pub identity: IdentityOpts,
    #[command(flatten)]
    pub waits: WaitOpts,
    #[command(flatten)]
    pub consul: ConsulOpts,
    #[command(flatten)]
    pub tls: SecretOpts,
    #[command(flatten)]
    pub snapshots: SnapshotOpts,
    #[command(flatten)]
    pub output: OutputOpts,
}

/// The registry and the cluster's settings a node's flags seed. (Registry and cluster)
#[derive(Debug, Clone, Args)]
pub struct ClusterOpts {
    /// Registry: s3://BUCKET/PREFIX, or file:///DIR for a directory on this
    /// host or a shared mount.
    #[arg(
        help_heading = "Registry and cluster",
        short = 'r',
        long,
        env = "AUTO_CONSUL_REGISTRY",
        value_name = "URL",
        global = true
    )]
    pub registry: Option<String>,

    /// A secondary datacenter's primary: the primary cluster's registry
    /// (s3://BUCKET/PREFIX). Recorded at this cluster's genesis, after its
    /// datacenter is checked against the primary's; every node of the
    /// cluster then follows the record. The servers join the primary's
    /// live servers over the WAN.
    #[arg(
        hide_short_help = true,
        help_heading = "Registry and cluster",
        long,
        env = "AUTO_CONSUL_PRIMARY_REGISTRY",
        value_name = "URL",
        global = true
    )]
    pub primary_registry: Option<String>,

    /// Desired number of Consul servers (3 or 5 in production).
    ///
    /// Seeds a new cluster's record; once a cluster exists its record rules
    /// (change it with `auto-consul cluster set`) [default: 1].
    #[arg(help_heading = "Registry and cluster", short = 's', long, env = "AUTO_CONSUL_SERVERS", value_name = "N",
          global = true, allow_negative_numbers = true, value_parser = servers_in_range)]
    pub servers: Option<u32>,

    /// Seconds after which a heartbeat or a server slot expires; the heartbeat
    /// timer fires every EXPIRY/3 seconds.
    ///
    /// Seeds a new cluster's record, which then rules [default: 120].
    #[arg(help_heading = "Registry and cluster", short = 'e', long, env = "AUTO_CONSUL_EXPIRY", value_name = "SECONDS",
          global = true, allow_negative_numbers = true,
          value_parser = seconds_in(2, 86_400))]
    pub expiry: Option<u64>,

    /// Seconds after which an agent's heartbeat expires; agents heartbeat every
    /// AGENT_EXPIRY/3 seconds.
    ///
    /// Long by default: agents' heartbeats are most of a fleet's registry
    /// requests, and only join lists use them. Seeds a new cluster's record,
    /// which then rules [default: 7200].
    #[arg(hide_short_help = true, help_heading = "Registry and cluster", long, env = "AUTO_CONSUL_AGENT_EXPIRY", value_name = "SECONDS", global = true,
          allow_negative_numbers = true,
          value_parser = seconds_in(2, 86_400))]
    pub agent_expiry: Option<u64>,

    /// Allow `run` to replace the cluster with this id by a new, empty one
    /// although its servers are not confirmed gone (the witness rule's way out,
    /// for one boot; `auto-consul cluster retire ID` is the lasting one).
    ///
    /// Only the id named is replaced.
    #[arg(
        hide_short_help = true,
        help_heading = "Registry and cluster",
        long,
        env = "AUTO_CONSUL_REPLACE_CLUSTER",
        value_name = "CLUSTER_ID",
        global = true
    )]
    pub replace_cluster: Option<String>,

    /// Accept a registry that ignores conditional writes, falling back to the
    /// original tool's racy decision (two nodes booting at once may both
    /// bootstrap).
    ///
    /// Never use this with S3 itself.
    #[arg(
        hide_short_help = true,
        help_heading = "Registry and cluster",
        long,
        env = "AUTO_CONSUL_ALLOW_RACY",
        global = true
    )]
    pub allow_racy: bool,
}

/// Who this node is. (Identity)
#[derive(Debug, Clone, Args)]
pub struct IdentityOpts {
    /// Address this node advertises and binds [default: IMDS local-ipv4].
    #[arg(help_heading = "Identity", short = 'a', long, env = "AUTO_CONSUL_ADDRESS", value_name = "IP", global = true,
          value_parser = parse_address)]
    pub address: Option<IpAddr>,

    /// Consul node name [default: IMDS instance-id].
    #[arg(help_heading = "Identity", short = 'n', long, env = "AUTO_CONSUL_NODE", value_name = "NAME", global = true,
          value_parser = parse_node)]
    pub node: Option<String>,

    /// The EC2 instance id published in slots and heartbeats [default: IMDS
    /// instance-id, or the node name when it is one].
    ///
    /// For hosts without IMDS and for tests; the witness rule asks EC2 about
    /// these ids.
    #[arg(hide_short_help = true, help_heading = "Identity", long, env = "AUTO_CONSUL_INSTANCE_ID", value_name = "ID", global = true,
          value_parser = parse_instance_id)]
    pub instance_id: Option<String>,

    /// Overall wait, in seconds, for the instance metadata service at boot.
    #[arg(hide_short_help = true, help_heading = "Identity", long, env = "AUTO_CONSUL_IMDS_TIMEOUT", value_name = "SECONDS",
          default_value_t = 30, global = true,
          allow_negative_numbers = true,
          value_parser = seconds_in(1, 600))]
    pub imds_timeout: u64,
}

/// The role a node may take, and how long it waits for what. (Roles and waits)
#[derive(Debug, Clone, Args)]
pub struct WaitOpts {
    /// What this node may become: `server` (never an agent: waits for a
    /// free or expired slot), `agent` (never claims a slot or bootstraps:
    /// waits for a live server), or `auto` (the decision: servers until
    /// the cluster has enough, then agents).
    #[arg(help_heading = "Roles and waits", long, env = "AUTO_CONSUL_ROLE", value_enum, default_value_t = RoleWanted::Auto,
          global = true)]
    pub role: RoleWanted,

    /// How long `run` with `--role server` waits for a server slot, or with
    /// `--role agent` for a live server, before it exits 1 (the boot unit
    /// retries) [default: EXPIRY + EXPIRY/3 + 10, one expiry and one
    /// heartbeat interval].
    #[arg(hide_short_help = true, help_heading = "Roles and waits", long, env = "AUTO_CONSUL_ROLE_WAIT", value_name = "SECONDS", global = true,
          allow_negative_numbers = true,
          value_parser = seconds_in(0, 86_400))]
    pub role_wait: Option<u64>,

    /// How long `run` on an agent waits, when its cluster owes the restore
    /// of a snapshot, for the restore to be done before it exits 1 (the boot
    /// unit retries): an agent joining before would get certificates and
    /// registrations the restore replaces.
    #[arg(hide_short_help = true, help_heading = "Roles and waits", long, env = "AUTO_CONSUL_RESTORE_WAIT", value_name = "SECONDS",
          default_value_t = 400, global = true, allow_negative_numbers = true, value_parser = seconds_in(1, 86_400))]
    pub restore_wait: u64,

    /// How long `run` waits for this node's own token (`--instance-tag`,
    /// once the cluster's shared agents' token is deleted) before it exits
    /// 1 (the boot unit retries): the leader's heartbeat makes one for each
    /// running instance with the tag.
    #[arg(hide_short_help = true, help_heading = "Roles and waits", long, env = "AUTO_CONSUL_TOKEN_WAIT", value_name = "SECONDS",
          default_value_t = 120, global = true, allow_negative_numbers = true, value_parser = seconds_in(1, 86_400))]
    pub token_wait: u64,

    /// How long `run` waits, in seconds, for an old cluster's servers to
    /// come back or be confirmed gone before it fails (exit 1; the boot
    /// unit retries) [default: the expiry].
    #[arg(hide_short_help = true, help_heading = "Roles and waits", long, env = "AUTO_CONSUL_WITNESS_WAIT", value_name = "SECONDS", global = true,
          allow_negative_numbers = true,
          value_parser = seconds_in(0, 86_400))]
    pub witness_wait: Option<u64>,

    /// The autoscaling group whose launch lifecycle hook this instance
    /// completes once in service [default: the instance's metadata tag
    /// aws:autoscaling:groupName, when tags are in IMDS; none: no hook].
    #[arg(
        hide_short_help = true,
        help_heading = "Roles and waits",
        long,
        env = "AUTO_CONSUL_AUTOSCALING_GROUP",
        value_name = "NAME",
        global = true
    )]
    pub autoscaling_group: Option<String>,

    /// The launch lifecycle hook's name [default: auto-consul-launch, the
    /// Terraform module's].
    #[arg(
        hide_short_help = true,
        help_heading = "Roles and waits",
        long,
        env = "AUTO_CONSUL_LIFECYCLE_HOOK",
        value_name = "NAME",
        global = true
    )]
    pub lifecycle_hook: Option<String>,

    /// How long `gate` waits for the node to be in service (an agent: a
    /// leader known; a server: a healthy voter by autopilot) before it
    /// abandons the launch.
    #[arg(hide_short_help = true, help_heading = "Roles and waits", long, env = "AUTO_CONSUL_GATE_WAIT", value_name = "SECONDS", default_value_t = 900,
          global = true, allow_negative_numbers = true, value_parser = seconds_in(1, 86_400))]
    pub gate_wait: u64,
}

/// Where Consul and its files are, and the settings written into its config. (Consul paths)
#[derive(Debug, Clone, Args)]
pub struct ConsulOpts {
    /// Consul data directory.
    #[arg(help_heading = "Consul paths", short = 'd', long, env = "AUTO_CONSUL_DATA_DIR", value_name = "DIR",
          default_value = "/opt/consul", global = true, value_parser = parse_abs_path)]
    pub data_dir: PathBuf,

    /// Consul configuration directory.
    #[arg(help_heading = "Consul paths", short = 'c', long, env = "AUTO_CONSUL_CONFIG_DIR", value_name = "DIR",
          default_value = "/etc/consul.d", global = true, value_parser = parse_abs_path)]
    pub config_dir: PathBuf,

    /// Consul datacenter.
    #[arg(help_heading = "Consul paths", long, env = "AUTO_CONSUL_DATACENTER", value_name = "DC", default_value = "dc1",
          global = true, value_parser = parse_datacenter)]
    pub datacenter: String,

    /// Consul's DNS domain: Consul's `domain`, and the name servers'
    /// certificates carry (`server.<datacenter>.<domain>`, what
    /// `verify_server_hostname` checks).
    #[arg(hide_short_help = true, help_heading = "Consul paths", long, env = "AUTO_CONSUL_DOMAIN", value_name = "DOMAIN",
          default_value = "consul", global = true, value_parser = parse_domain)]
    pub domain: String,

    /// Take every local path (files written, state, the data dir's Raft check,
    /// the unit path) under DIR; with a root other than /, systemctl is never
    /// called.
    ///
    /// For image baking and tests.
    #[arg(hide_short_help = true, help_heading = "Consul paths", long, env = "AUTO_CONSUL_ROOT", value_name = "DIR", default_value = "/",
          global = true, value_parser = parse_abs_path)]
    pub root: PathBuf,

    /// Write files but call no systemctl.
    #[arg(
        hide_short_help = true,
        help_heading = "Consul paths",
        long,
        global = true
    )]
    pub no_start: bool,

    /// A cloud auto-join entry added after the registry's addresses in an
    /// agent's `retry_join` (servers never get it): agents find the cluster
    /// even when the registry is out of reach.
    ///
    /// Consul joins every instance it finds, so the tag must name this cluster
    /// only, e.g. `provider=aws tag_key=auto-consul:cluster tag_value=prod`.
    /// Consul resolves it with ec2:DescribeInstances.
    #[arg(hide_short_help = true, help_heading = "Consul paths", long, env = "AUTO_CONSUL_CLOUD_JOIN", value_name = "SPEC", global = true,
          value_parser = parse_cloud_join)]
    pub cloud_join: Option<String>,

    /// Also sandbox a packaged consul.service (HashiCorp's package, or any unit
    /// auto-consul did not write) as auto-consul's own is: no capabilities, a
    /// read-only system but the data dir.
    ///
    /// Opt-in: script checks, log files or DNS on port 53 need more. The
    /// consul.service auto-consul writes (Consul from a zip) is always
    /// sandboxed.
    #[arg(
        hide_short_help = true,
        help_heading = "Consul paths",
        long,
        env = "AUTO_CONSUL_SANDBOX_CONSUL",
        global = true
    )]
    pub sandbox_consul: bool,
}

/// The cluster's secrets, made or given. (TLS and secrets)
#[derive(Debug, Clone, Args)]
pub struct SecretOpts {
    /// Where the cluster makes and keeps its secrets at genesis (gossip key,
    /// CA, ACL tokens): `ssm:///PATH` (SSM Parameter Store, SecureString, under
    /// PATH/<cluster id>/), `file:///DIR` (files 0600), or `none`.
    ///
    /// Files named by --encrypt-file, --ca-file, ... still win [default: none].
    #[arg(help_heading = "TLS and secrets", long, env = "AUTO_CONSUL_SECRETS", value_name = "URL", global = true,
          value_parser = parse_secrets)]
    pub secrets: Option<crate::secrets::SecretsUrl>,

    /// The EC2 tag every instance of this cluster carries, `KEY=VALUE`
    /// (the Terraform module sets `auto-consul:cluster=<name>`). With
    /// `--secrets`, every node then runs with a token of its own (node and
    /// agent write on itself only), which the leader's heartbeat makes
    /// ahead for each running instance with this tag, readable by that
    /// instance alone.
    #[arg(hide_short_help = true, help_heading = "TLS and secrets", long, env = "AUTO_CONSUL_INSTANCE_TAG",
          value_name = "KEY=VALUE", global = true, value_parser = parse_instance_tag)]
    pub instance_tag: Option<(String, String)>,

    /// File holding the gossip encryption key (Consul's `encrypt`).
    #[arg(help_heading = "TLS and secrets", long, env = "AUTO_CONSUL_ENCRYPT_FILE", value_name = "FILE", global = true,
          value_parser = parse_abs_path)]
    pub encrypt_file: Option<PathBuf>,

    /// File holding the ACL token the agent uses (Consul's `acl.tokens.agent`).
    #[arg(help_heading = "TLS and secrets", long, env = "AUTO_CONSUL_ACL_TOKEN_FILE", value_name = "FILE", global = true,
          value_parser = parse_abs_path)]
    pub acl_token_file: Option<PathBuf>,

    /// CA certificate file for Consul's TLS (written as a path, not read).
    #[arg(help_heading = "TLS and secrets", long, env = "AUTO_CONSUL_CA_FILE", value_name = "FILE", global = true,
          value_parser = parse_abs_path)]
    pub ca_file: Option<PathBuf>,

    /// Certificate file for Consul's TLS (written as a path, not read).
    #[arg(help_heading = "TLS and secrets", long, env = "AUTO_CONSUL_CERT_FILE", value_name = "FILE", global = true,
          value_parser = parse_abs_path, requires_all = ["key_file", "ca_file"])]
    pub cert_file: Option<PathBuf>,

    /// Private key file for Consul's TLS (written as a path, not read).
    #[arg(help_heading = "TLS and secrets", long, env = "AUTO_CONSUL_KEY_FILE", value_name = "FILE", global = true,
          value_parser = parse_abs_path, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

/// Snapshots of the servers' state. (Snapshots and recovery)
#[derive(Debug, Clone, Args)]
pub struct SnapshotOpts {
    /// Seconds between the leader's snapshots of Consul's state to the
    /// registry bucket (`snapshots/<cluster id>/`); 0 turns them off. The
    /// interval is the recovery point: what a lost cluster can lose.
    ///
    /// Servers run auto-consul-snapshot.timer; only the leader saves
    /// [default: 3600].
    #[arg(hide_short_help = true, help_heading = "Snapshots and recovery", long, env = "AUTO_CONSUL_SNAPSHOT_INTERVAL",
          value_name = "SECONDS", global = true, allow_negative_numbers = true, value_parser = snapshot_interval)]
    pub snapshot_interval: Option<u64>,

    /// How many snapshots the leader keeps; it deletes older ones after
    /// each save [default: 24].
    #[arg(hide_short_help = true, help_heading = "Snapshots and recovery", long, env = "AUTO_CONSUL_SNAPSHOT_KEEP",
          value_name = "N", global = true, allow_negative_numbers = true, value_parser = snapshot_keep)]
    pub snapshot_keep: Option<u32>,

    /// A new cluster that replaces a gone one starts empty instead of
    /// restoring the old cluster's newest snapshot.
    #[arg(
        hide_short_help = true,
        help_heading = "Snapshots and recovery",
        long,
        env = "AUTO_CONSUL_NO_RESTORE",
        global = true
    )]
    pub no_restore: bool,
}

/// What a command prints and logs. (Output and logging)
#[derive(Debug, Clone, Args)]
pub struct OutputOpts {
    /// Print one JSON object instead of text.
    #[arg(help_heading = "Output and logging", long, global = true)]
    pub json: bool,

    /// Write metrics for Prometheus' node_exporter textfile collector to FILE
    /// (atomically) when `run` or `heartbeat` ends: last success per command,
    /// mode, slot, live servers, registry requests and errors by kind, keys
    /// purged.
    ///
    /// The units may write the file's directory.
    #[arg(hide_short_help = true, help_heading = "Output and logging", long, env = "AUTO_CONSUL_METRICS_FILE", value_name = "FILE", global = true,
          value_parser = parse_abs_path)]
    pub metrics_file: Option<PathBuf>,

    /// Log format on stderr: `text` (for people) or `json` (one JSON object
    /// a line, for journald shipped to CloudWatch or Loki).
    #[arg(hide_short_help = true, help_heading = "Output and logging", long, env = "AUTO_CONSUL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text,
          global = true)]
    pub log_format: LogFormat,

    /// More logging: -v for auto-consul's debug messages, -vv for every
    /// library's too; RUST_LOG overrides.
    #[arg(help_heading = "Output and logging", short = 'v', long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot-time one-shot: identity, mode decision, files, then systemctl.
    Run,
    /// Show what `run` would decide and write; writes and claims nothing.
    Plan,
    /// List the live servers and agents in the registry.
    Members,
    /// Whether this node is healthy: its mode and slot, the cluster record, the
    /// local Consul agent, its last heartbeat, the heartbeat timer.
    ///
    /// Exit 0 when healthy, 1 when degraded (each reason named): fit for a
    /// monitoring check.
    Status,
    /// Ask the local Consul agent how it runs and publish a heartbeat; a server
    /// also renews its slot, and the live holder of the lowest slot purges
    /// expired heartbeats for the fleet, once per expiry.
    ///
    /// Run by auto-consul-heartbeat.timer every EXPIRY/3 seconds
    /// (AGENT_EXPIRY/3 on agents).
    Heartbeat,
    /// Delete expired heartbeats (in batches of 1000) and report expired
    /// server slots (a slot is taken over, never deleted).
    Purge,
    /// Remove this node from the registry: delete its heartbeats and release
    /// its server slot, so a replacement can take it at once.
    Leave {
        /// Only when the instance is being terminated (the autoscaling target
        /// lifecycle state `Terminated`, or a spot interruption notice, from
        /// IMDS), and make Consul leave gracefully first; a reboot keeps
        /// everything.
        ///
        /// The stop action of auto-consul-leave.service.
        #[arg(long)]
        if_terminating: bool,
    },
    /// Write the boot unit auto-consul.service (runs `run` at every boot with
    /// the env file, retried until it succeeds) and merge the options given
    /// into the env file, and enable the unit.
    ///
    /// For image baking it starts nothing; user data on a stock image adds
    /// `--now`. Re-running is harmless.
    Install {
        /// Also start the boot unit now, without waiting for it (user data:
        /// a first boot that fails is then retried by systemd).
        #[arg(long)]
        now: bool,
    },
    /// The launch gate, run by auto-consul-gate.service in an autoscaling
    /// group: wait until this node is in service (an agent: its Consul knows a
    /// leader; a server: autopilot reports it a healthy voter), then complete
    /// the launch hook with CONTINUE; ABANDON after --gate-wait.
    ///
    /// Outside a group it does nothing.
    Gate,
    /// Quorum-loss recovery (Consul's outage guide): the raft/peers.json
    /// of the servers that survive (running by EC2, holding a slot of this
    /// cluster, each with the node id its heartbeats publish, at any age)
    /// and the steps. --plan pins it in the registry; --apply HASH writes
    /// that pinned file on this node.
    ///
    /// It stops and starts nothing: Consul must be stopped on every
    /// surviving server, the same file written on each, then Consul
    /// started on all. Without a flag, it prints what a plan would be and
    /// the plan pinned, if any; it writes nothing.
    Recover {
        /// Find the survivors, pin the plan (survivors, peers.json, its
        /// SHA-256) in the registry under the cluster, and print it.
        #[arg(long, conflicts_with = "apply")]
        plan: bool,
        /// Write the pinned plan's peers.json to <data-dir>/raft/ on this
        /// node; with HASH (as --plan printed it), only if the pinned plan
        /// is still that one.
        #[arg(long, value_name = "HASH", num_args = 0..=1, default_missing_value = "")]
        apply: Option<String>,
    },
    /// Save a snapshot of Consul's state to the registry bucket, when this
    /// server's Consul is the leader; keep the newest --snapshot-keep.
    /// First, restore the snapshot a new cluster owes (a cluster that
    /// replaced a gone one), once.
    ///
    /// Run by auto-consul-snapshot.timer on servers. Elsewhere it does
    /// nothing and says why.
    Snapshot,
    /// Restore a snapshot from the registry into this cluster (`PUT
    /// /v1/snapshot`: it replaces Consul's whole state), after checking its
    /// SHA-256; without KEY, list the snapshots there are.
    Restore {
        /// The snapshot's key, as listed (snapshots/<cluster id>/<stamp>-<node>.snap).
        key: Option<String>,
        /// Drop the restore this cluster owes at genesis; restore nothing.
        #[arg(long, conflicts_with = "key")]
        cancel: bool,
    },
    /// Print shell completions for SHELL (bash, zsh, fish, elvish,
    /// powershell) to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff, section 1) to stdout.
    Man,
    /// Show or change the cluster record: the cluster id and the settings
    /// every node adopts (servers, expiry, agent expiry).
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// The secrets the cluster made at genesis (--secrets): where they are,
    /// and one value for an operator whose IAM role may read it.
    Secrets {
        #[command(subcommand)]
        action: SecretsAction,
    },
}

/// What `secrets` does.
#[derive(Debug, Subcommand)]
pub enum SecretsAction {
    /// List the cluster's secrets: each name, where it is kept, whether it
    /// exists and who may read it. Never a value.
    List,
    /// Print one secret's value on stdout (the only way a value reaches a
    /// terminal): gossip-key, ca-cert, agent-token, dns-token, ca or
    /// management-token.
    Get {
        /// The secret's name.
        name: String,
    },
    /// Revoke one node's own token (`--instance-tag`), on a server: it is
    /// deleted from Consul and the secrets store, so that node's Consul is
    /// refused; a new one is made at once for the instance if EC2 still
    /// runs it, which it reads when it boots again.
    Revoke {
        /// The node: its instance id.
        node: String,
    },
    /// Start rotating a secret, on a server: its next generation is made
    /// (nothing is overwritten) and the servers' heartbeats finish the
    /// rotation; `secrets list` shows where it stands. Run again after a
    /// crash: it goes on from where it stopped.
    Rotate {
        /// The secret to rotate.
        #[arg(value_enum)]
        secret: Rotatable,
    },
}

/// The secrets `secrets rotate` rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Rotatable {
    /// Consul's gossip key: installed in every member's keyring, made
    /// primary, the old one removed.
    GossipKey,
    /// The agents' token: made in Consul, every node moves to it by its
    /// heartbeat, the old one deleted once no live node uses it.
    AgentToken,
    /// The TLS CA: every node trusts the old and the new one, servers are
    /// signed by the new one, then the old one is dropped.
    Ca,
    /// The management token: made in Consul, the servers restart with it
    /// one at a time (only while autopilot reports the cluster healthy),
    /// then the old one is deleted.
    ManagementToken,
}

impl Command {
    /// Whether the command is one a person types on a configured node, and
    /// so takes the node's settings from the env file `run` wrote. The
    /// units' commands (`run`, `heartbeat`, `leave`) get the file from
    /// systemd; `install` writes it.
    pub fn reads_env_file(&self) -> bool {
        matches!(
            self,
            Command::Plan
                | Command::Members
                | Command::Status
                | Command::Purge
                | Command::Cluster { .. }
                | Command::Secrets { .. }
                | Command::Recover { .. }
                | Command::Snapshot
                | Command::Restore { .. }
        )
    }

    /// Lines of the env file this command must not take: `cluster set`
    /// changes exactly the settings given on its command line, never the
    /// seeds a node's env file holds (they would silently overwrite the
    /// record's other settings).
    pub fn env_file_skips(&self) -> &'static [&'static str] {
        match self {
            Command::Cluster {
                action: ClusterAction::Set,
            } => &[
                "AUTO_CONSUL_SERVERS",
                "AUTO_CONSUL_EXPIRY",
                "AUTO_CONSUL_AGENT_EXPIRY",
            ],
            _ => &[],
        }
    }
}

/// Each command's own options: shown first in its help, under "Options:",
/// even those the short help otherwise hides; every other option stays
/// under its heading below.
const OWN_OPTIONS: &[(&str, &[&str])] = &[
    (
        "run",
        &["registry", "servers", "role", "secrets", "address", "node"],
    ),
    ("plan", &["registry", "servers", "role", "address", "node"]),
    ("members", &["registry", "json"]),
    ("status", &["registry", "json"]),
    ("heartbeat", &["registry", "acl_token_file"]),
    ("purge", &["registry", "json"]),
    ("leave", &["registry"]),
    (
        "install",
        &["registry", "servers", "role", "secrets", "metrics_file"],
    ),
    (
        "gate",
        &["autoscaling_group", "lifecycle_hook", "gate_wait"],
    ),
    ("recover", &["registry", "data_dir", "config_dir"]),
    (
        "snapshot",
        &["registry", "snapshot_interval", "snapshot_keep", "secrets"],
    ),
    ("restore", &["registry", "secrets"]),
    (
        "cluster",
        &["registry", "servers", "expiry", "agent_expiry"],
    ),
    ("secrets", &["registry", "secrets"]),
];

/// The help `args` ask for (`COMMAND -h` or `COMMAND --help`), with the
/// command's own options first; `None` for the top-level help.
pub fn help_for(args: &[std::ffi::OsString]) -> Option<String> {
    let mut cmd = help_command();
    // `help COMMAND` is `COMMAND --help`.
    let long = args.iter().any(|a| a == "--help") || args.get(1).is_some_and(|a| a == "help");
    // The deepest command named (`cluster set -h` is `set`'s help).
    let mut path: Vec<String> = Vec::new();
    let mut at = &cmd;
    for arg in args
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .filter(|a| *a != "help")
    {
        if let Some(sub) = at.find_subcommand(arg) {
            path.push(arg.to_string());
            at = sub;
        }
    }
    if path.is_empty() {
        return None;
    }
    let mut sub = &mut cmd;
    for name in &path {
        sub = sub.find_subcommand_mut(name)?;
    }
    Some(
        if long {
            sub.render_long_help()
        } else {
            sub.render_help()
        }
        .to_string(),
    )
}

/// [`Cli`]'s command line for its help only (arguments moved after the
/// build cannot be parsed with): each command's own options first.
fn help_command() -> clap::Command {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    // Global options are copied into every command by the build; each
    // copy can then be placed for its command.
    cmd.build();
    for (name, ids) in OWN_OPTIONS {
        cmd = cmd.mut_subcommand(*name, |mut sub| {
            for (order, id) in ids.iter().enumerate() {
                sub = sub.mut_arg(*id, |a| {
                    a.help_heading(None::<&str>)
                        .hide_short_help(false)
                        .display_order(order)
                });
            }
            sub
        });
    }
    cmd
}

/// How logs are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Plain lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// What a node may become (`--role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoleWanted {
    /// Servers until the cluster has enough, then agents.
    Auto,
    /// Always a server (bootstrap or joining); never an agent.
    Server,
    /// Always an agent; never claims a slot or bootstraps.
    Agent,
}

impl RoleWanted {
    /// The name used on the command line and in the env file.
    pub fn as_str(self) -> &'static str {
        match self {
            RoleWanted::Auto => "auto",
            RoleWanted::Server => "server",
            RoleWanted::Agent => "agent",
        }
    }
}

/// What `cluster` does.
#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// Print the cluster record and the settings that rule.
    Show,
    /// Change the cluster's settings: `--servers N`, `--expiry SECONDS`
    /// and/or `--agent-expiry SECONDS` (from the command line only, never
    /// the env file's seeds), written under If-Match so no concurrent
    /// change is lost.
    Set,
    /// Confirm, as the operator, that every server of cluster CLUSTER_ID is
    /// gone: once none is live, the next node to boot may start a new
    /// cluster in its place.
    Retire {
        /// The id of the cluster to retire (`auto-consul cluster show`).
        cluster_id: String,
        /// Retire it although some of its servers are live in the registry
        /// (they are about to go): otherwise refused, since the next
        /// outage would start a second cluster beside them.
        #[arg(long)]
        force: bool,
    },
}

impl ClusterOpts {
    /// `--servers`, or its default.
    pub fn servers(&self) -> u32 {
        self.servers.unwrap_or(DEFAULT_SERVERS)
    }

    /// `--expiry`, or its default.
    pub fn expiry(&self) -> u64 {
        self.expiry.unwrap_or(DEFAULT_EXPIRY)
    }

    /// `--agent-expiry`, or its default.
    pub fn agent_expiry(&self) -> u64 {
        self.agent_expiry.unwrap_or(DEFAULT_AGENT_EXPIRY)
    }

    /// The settings this node's flags seed (a new cluster's record; the
    /// record's rule once there is one).
    pub fn seed(&self) -> crate::model::Settings {
        crate::model::Settings {
            servers: self.servers(),
            expiry: self.expiry(),
            agent_expiry: self.agent_expiry(),
        }
        .consistent()
    }

    /// `--registry`, parsed; a usage error when none is given.
    pub fn registry_url(&self) -> anyhow::Result<crate::registry::RegistryUrl> {
        let raw = self
            .registry
            .as_deref()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                crate::error::usage(
                    "no registry given: pass --registry s3://BUCKET/PREFIX or set AUTO_CONSUL_REGISTRY",
                )
            })?;
        crate::registry::RegistryUrl::parse(raw)
    }
}

impl SnapshotOpts {
    /// `--snapshot-interval`, or its default; 0: no snapshots.
    pub fn interval(&self) -> u64 {
        self.snapshot_interval.unwrap_or(SNAPSHOT_INTERVAL_DEFAULT)
    }

    /// `--snapshot-keep`, or its default.
    pub fn keep(&self) -> u32 {
        self.snapshot_keep.unwrap_or(SNAPSHOT_KEEP_DEFAULT)
    }
}

/// `--servers` when not given.
pub const DEFAULT_SERVERS: u32 = 1;
/// `--expiry` when not given.
pub const DEFAULT_EXPIRY: u64 = 120;
/// `--agent-expiry` when not given: agents heartbeat every 40 minutes.
pub const DEFAULT_AGENT_EXPIRY: u64 = 7200;

/// Parses a whole number of seconds from `lo` to `hi`; the error names the
/// range (clap's own says only "invalid digit", or takes `-5` for an option).
fn seconds_in(lo: u64, hi: u64) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync {
    move |s| {
        s.trim()
            .parse::<u64>()
            .ok()
            .filter(|n| (lo..=hi).contains(n))
            .ok_or_else(|| format!("must be a whole number of seconds from {lo} to {hi}"))
    }
}

/// The snapshot interval's bounds: off, or at least a minute.
pub const SNAPSHOT_INTERVAL_RANGE: std::ops::RangeInclusive<u64> = 60..=604_800;
/// The default snapshot interval, seconds.
pub const SNAPSHOT_INTERVAL_DEFAULT: u64 = 3600;
/// The default number of snapshots kept.
pub const SNAPSHOT_KEEP_DEFAULT: u32 = 24;

fn snapshot_interval(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .ok()
        .filter(|n| *n == 0 || SNAPSHOT_INTERVAL_RANGE.contains(n))
        .ok_or_else(|| {
            format!(
                "must be 0 (no snapshots) or a whole number of seconds from {} to {}",
                SNAPSHOT_INTERVAL_RANGE.start(),
                SNAPSHOT_INTERVAL_RANGE.end()
            )
        })
}

fn snapshot_keep(s: &str) -> Result<u32, String> {
    s.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=10_000).contains(n))
        .ok_or_else(|| "must be a whole number of snapshots from 1 to 10000".into())
}

fn servers_in_range(s: &str) -> Result<u32, String> {
    s.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=9).contains(n))
        .ok_or_else(|| {
            "must be a whole number of servers from 1 to 9 (3 or 5 in production)".into()
        })
}

fn parse_secrets(s: &str) -> Result<crate::secrets::SecretsUrl, String> {
    crate::secrets::SecretsUrl::parse(s).map_err(|e| e.to_string())
}

fn parse_instance_id(s: &str) -> Result<String, String> {
    if crate::model::instance_id_ok(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{}` is not an EC2 instance id (i- then letters and digits)",
            s.escape_debug()
        ))
    }
}

fn parse_address(s: &str) -> Result<IpAddr, String> {
    validate_address(s)
}

fn parse_node(s: &str) -> Result<String, String> {
    validate_node_name(s).map(|()| s.to_string())
}

fn parse_datacenter(s: &str) -> Result<String, String> {
    validate_datacenter(s).map(|()| s.to_string())
}

/// An EC2 tag, `KEY=VALUE`, as EC2 allows one (key 1-128 characters, not
/// starting with `aws:`; value up to 256).
fn parse_instance_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v))
            if (1..=128).contains(&k.len())
                && v.len() <= 256
                && !k.starts_with("aws:")
                && !k.chars().chain(v.chars()).any(char::is_control) =>
        {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!(
            "`{}` is not an EC2 tag: give KEY=VALUE, e.g. auto-consul:cluster=prod \
             (the tag the cluster's instances carry)",
            s.escape_debug()
        )),
    }
}

/// A DNS domain as Consul takes one: labels of lower-case letters, digits
/// and `-` (Consul lower-cases names it compares), a trailing dot dropped.
fn parse_domain(s: &str) -> Result<String, String> {
    let d = s.strip_suffix('.').unwrap_or(s);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if d.len() <= 253 && d.split('.').all(label_ok) {
        Ok(d.to_string())
    } else {
        Err(format!(
            "`{}` is not a DNS domain Consul can serve: use dot-separated labels of lower-case \
             letters, digits and `-` (e.g. `consul` or `consul.example.com`)",
            s.escape_debug()
        ))
    }
}

fn parse_cloud_join(s: &str) -> Result<String, String> {
    let s = s.trim();
    if !s.split_whitespace().any(|kv| kv.starts_with("provider=")) {
        return Err(
            "must be a Consul cloud auto-join entry naming its provider, \
                    e.g. `provider=aws tag_key=auto-consul:cluster tag_value=prod`"
                .into(),
        );
    }
    if s.contains(['\'', '"', '\n', '\r', '\0']) {
        return Err("must not contain quotes or line breaks".into());
    }
    Ok(s.to_string())
}

fn parse_abs_path(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err("must be an absolute path".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn options_work_before_and_after_the_command() {
        let before =
            Cli::try_parse_from(["auto-consul", "-r", "file:///x", "-s", "3", "run"]).unwrap();
        let after =
            Cli::try_parse_from(["auto-consul", "run", "-r", "file:///x", "-s", "3"]).unwrap();
        assert_eq!(before.global.cluster.registry.as_deref(), Some("file:///x"));
        assert_eq!(after.global.cluster.registry.as_deref(), Some("file:///x"));
        assert_eq!(before.global.cluster.servers(), 3);
        assert_eq!(after.global.cluster.servers(), 3);
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [
            &["auto-consul", "run", "--servers", "0"][..],
            &["auto-consul", "run", "--address", "10.0.0.300"][..],
            &["auto-consul", "run", "--node", "bad/name"][..],
            &["auto-consul", "run", "--data-dir", "relative"][..],
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn help_is_grouped_and_the_short_help_is_short() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let short = cmd.render_help().to_string();
        let long = cmd.render_long_help().to_string();
        for heading in [
            "Identity:",
            "Registry and cluster:",
            "Roles and waits:",
            "Consul paths:",
            "TLS and secrets:",
            "Output and logging:",
        ] {
            assert!(long.contains(heading), "--help lacks {heading}");
            assert!(short.contains(heading), "-h lacks {heading}");
        }
        // -h: the options a first run needs; --help: every one.
        assert!(short.contains("--registry") && !short.contains("--allow-racy"));
        assert!(long.contains("--allow-racy") && long.contains("--gate-wait"));
        let (s, l) = (short.lines().count(), long.lines().count());
        assert!(s * 2 < l, "-h is {s} lines, --help {l}");
        let mut run = Cli::command();
        run.build();
        let run = run.find_subcommand_mut("run").unwrap();
        let run_short = run.render_help().to_string();
        assert!(run_short.contains("--registry"), "{run_short}");
        assert!(
            run_short.lines().count() < 70,
            "run -h is {} lines",
            run_short.lines().count()
        );
    }

    #[test]
    fn each_commands_help_shows_its_own_options_first() {
        let mut cmd = help_command();
        for (name, ids) in OWN_OPTIONS {
            let sub = cmd.find_subcommand_mut(name).unwrap();
            let help = sub.render_help().to_string();
            // The first heading after "Options:" is where the others begin.
            let own = help
                .split_once("Options:")
                .map(|(_, rest)| rest.split("\n\n").next().unwrap_or_default())
                .unwrap_or_default();
            for id in *ids {
                let long = format!("--{}", id.replace('_', "-"));
                assert!(
                    own.contains(&long),
                    "`{name} -h` does not show {long} first:\n{help}"
                );
            }
        }
        // The option stays where it was for the other commands.
        let run = cmd
            .find_subcommand_mut("run")
            .unwrap()
            .render_long_help()
            .to_string();
        let (_, tail) = run.split_once("Snapshots and recovery:").unwrap();
        assert!(tail.contains("--snapshot-keep"), "{run}");
    }

    #[test]
    fn a_bounded_option_out_of_range_names_its_range() {
        for (args, range) in [
            (
                &["auto-consul", "run", "--expiry", "-5"][..],
                "from 2 to 86400",
            ),
            (
                &["auto-consul", "run", "--expiry=-5"][..],
                "from 2 to 86400",
            ),
            (
                &["auto-consul", "run", "--expiry", "1"][..],
                "from 2 to 86400",
            ),
            (
                &["auto-consul", "run", "--role-wait", "x"][..],
                "from 0 to 86400",
            ),
            (
                &["auto-consul", "run", "--imds-timeout", "601"][..],
                "from 1 to 600",
            ),
            (
                &["auto-consul", "run", "--servers", "-1"][..],
                "from 1 to 9",
            ),
        ] {
            let err = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}");
            let text = err.to_string();
            let first = text.lines().next().unwrap();
            assert!(first.contains(range), "{args:?}: {first}");
        }
    }
}
