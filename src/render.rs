//! Rendering, pure: settings in, file text out. The Consul agent
//! configuration, the systemd units and the env file.

use std::net::IpAddr;
use std::path::Path;

use anyhow::{Result, bail};
use serde_json::{Map, Value, json};

use crate::model::Mode;

/// The first line of every unit `run` writes, so a later run knows its own.
pub const MARKER: &str = "# Written by auto-consul";

/// Everything the Consul agent configuration says.
#[derive(Debug, Clone)]
pub struct ConsulSettings<'a> {
    /// Node name.
    pub node: &'a str,
    /// Advertise and bind address.
    pub address: IpAddr,
    /// Consul data dir.
    pub data_dir: &'a Path,
    /// Datacenter.
    pub datacenter: &'a str,
    /// Consul's DNS domain (`--domain`).
    pub domain: &'a str,
    /// The decided mode.
    pub mode: Mode,
    /// Whether to set `bootstrap: true` (bootstrap mode, no Raft state yet).
    pub bootstrap: bool,
    /// The cluster's number of servers (the record's): autopilot never
    /// prunes the quorum below it.
    pub servers: u32,
    /// Addresses to join.
    pub retry_join: &'a [IpAddr],
    /// A cloud auto-join entry (`provider=aws tag_key=... tag_value=...`),
    /// listed after the addresses; Consul joins every instance it finds.
    /// Given to agents only.
    pub cloud_join: Option<&'a str>,
    /// Gossip encryption key.
    pub encrypt: Option<&'a str>,
    /// ACL token for the agent.
    pub acl_token: Option<&'a str>,
    /// ACLs made at genesis (a secrets store): enabled, default deny.
    pub acl: Option<GenesisAcl<'a>>,
    /// TLS CA, certificate and key paths.
    pub tls: Tls<'a>,
    /// A secondary datacenter's primary (its name): `primary_datacenter`.
    pub primary_datacenter: Option<&'a str>,
    /// A secondary's server: the primary's servers, joined over the WAN.
    pub retry_join_wan: &'a [IpAddr],
}

/// The ACLs a cluster made at genesis runs with.
#[derive(Debug, Clone, Copy)]
pub struct GenesisAcl<'a> {
    /// `acl.tokens.initial_management`: servers only.
    pub management: Option<&'a str>,
    /// `acl.tokens.agent`.
    pub agent: &'a str,
    /// `acl.tokens.default`: what DNS and requests without a token run
    /// with (read on nodes, services and prepared queries); empty: none.
    pub dns: &'a str,
    /// `acl.tokens.replication`: a secondary datacenter's servers, the
    /// primary's replication token (once its servers made it).
    pub replication: Option<&'a str>,
}

/// TLS file paths for Consul.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tls<'a> {
    /// CA certificate.
    pub ca_file: Option<&'a Path>,
    /// Certificate.
    pub cert_file: Option<&'a Path>,
    /// Private key.
    pub key_file: Option<&'a Path>,
}

/// The Consul agent configuration (`auto-consul.json`), pretty JSON.
pub fn consul_config(s: &ConsulSettings<'_>) -> String {
    let mut c = Map::new();
    c.insert("node_name".into(), json!(s.node));
    c.insert("advertise_addr".into(), json!(s.address.to_string()));
    c.insert("bind_addr".into(), json!(s.address.to_string()));
    c.insert("data_dir".into(), json!(s.data_dir.to_string_lossy()));
    c.insert("datacenter".into(), json!(s.datacenter));
    c.insert("domain".into(), json!(s.domain));
    c.insert(
        "retry_join".into(),
        json!(retry_join(s.retry_join, s.cloud_join)),
    );
    if s.mode.is_server() && !s.retry_join_wan.is_empty() {
        c.insert(
            "retry_join_wan".into(),
            json!(retry_join(s.retry_join_wan, None)),
        );
    }
    if s.mode.is_server() {
        c.insert("server".into(), json!(true));
        // Explicit either way: auto-consul's file is read last, so no other
        // file can make a joining server bootstrap.
        c.insert("bootstrap".into(), json!(s.bootstrap));
        // Replacement servers join while the dead ones still count in Raft:
        // autopilot removes the dead once a replacement is healthy, and
        // never below the cluster's size (min_quorum, from 3 servers on,
        // where losing one still leaves a quorum). Consul applies these
        // when the datacenter bootstraps; later changes go through
        // `consul operator autopilot set-config`. Servers do not leave on
        // terminate: a server that leaves shrinks the quorum's size.
        let mut autopilot = Map::new();
        for (file_key, _, value) in autopilot_settings(s.servers) {
            if file_key != "min_quorum" || value != json!(0) {
                autopilot.insert(file_key.into(), value);
            }
        }
        c.insert("autopilot".into(), Value::Object(autopilot));
        c.insert("leave_on_terminate".into(), json!(false));
    } else {
        c.insert("server".into(), json!(false));
        c.insert("bootstrap".into(), json!(false));
        c.insert("leave_on_terminate".into(), json!(true));
    }
    if let Some(key) = s.encrypt {
        c.insert("encrypt".into(), json!(key));
    }
    if let Some(acl) = s.acl {
        // Consul's ACL block (agent/config/builder.go reads `acl.enabled`,
        // `acl.default_policy`, `acl.enable_token_persistence` and
        // `acl.tokens.{initial_management,agent}`): deny what no token
        // allows; the first leader creates the initial management token;
        // tokens set by API persist. ACLs need the primary datacenter
        // named (this one: a cluster of one datacenter).
        let mut tokens = Map::new();
        if let Some(m) = acl.management {
            tokens.insert("initial_management".into(), json!(m));
        }
        tokens.insert("agent".into(), json!(s.acl_token.unwrap_or(acl.agent)));
        // DNS answers with the default token when no `dns` token is set
        // (Consul's ACL docs on `acl.tokens.dns`, which only newer Consul
        // has: agent/token/store.go `DNSToken`), and so do requests that
        // carry no token: one config for every version.
        if !acl.dns.is_empty() {
            tokens.insert("default".into(), json!(acl.dns));
        }
        if let Some(r) = acl.replication {
            tokens.insert("replication".into(), json!(r));
        }
        let mut block = json!({
            "enabled": true,
            "default_policy": "deny",
            "enable_token_persistence": true,
            "tokens": Value::Object(tokens),
        });
        // A secondary datacenter's nodes replicate the primary's global
        // tokens, so they resolve locally (Consul's federation guide:
        // `enable_token_replication` on the secondary's servers and
        // clients).
        if s.primary_datacenter.is_some() {
            block["enable_token_replication"] = json!(true);
        }
        c.insert("acl".into(), block);
        c.insert(
            "primary_datacenter".into(),
            json!(s.primary_datacenter.unwrap_or(s.datacenter)),
        );
    } else if let Some(token) = s.acl_token {
        c.insert("acl".into(), json!({ "tokens": { "agent": token } }));
    }
    // A secondary datacenter names its primary everywhere (ACLs and
    // Connect's CA are the primary's).
    if let Some(p) = s.primary_datacenter {
        c.insert("primary_datacenter".into(), json!(p));
    }
    if let Some((tls, auto_encrypt)) = tls_config(&s.tls, s.mode.is_server()) {
        c.insert("tls".into(), tls);
        if let Some(auto_encrypt) = auto_encrypt {
            c.insert("auto_encrypt".into(), auto_encrypt);
        }
        // Servers sign agents' auto_encrypt certificates with Connect's CA:
        // with Connect off, they refuse (Consul's AutoEncrypt.Sign).
        if s.mode.is_server() {
            c.insert("connect".into(), json!({ "enabled": true }));
        }
    }
    let mut text =
        serde_json::to_string_pretty(&Value::Object(c)).expect("JSON of strings serialises");
    text.push('\n');
    text
}

/// The `retry_join` list: the addresses, then the cloud auto-join entry.
pub fn retry_join(addresses: &[IpAddr], cloud_join: Option<&str>) -> Vec<String> {
    addresses
        .iter()
        .map(|a| a.to_string())
        .chain(cloud_join.map(str::to_string))
        .collect()
}

/// Consul's `tls` and `auto_encrypt` blocks, as HashiCorp's production
/// guidance has them; `None` without a CA (no TLS).
///
/// - `tls.defaults` holds the CA, certificate and key, and
///   `verify_outgoing`: every connection this agent makes checks the
///   other end against the CA.
/// - `verify_incoming` is set for internal RPC only (`tls.internal_rpc`)
///   and on servers only: agents and servers must show a certificate to
///   a server, while the HTTPS and gRPC listeners keep their own choice
///   (a default `verify_incoming` would demand client certificates of
///   every API and UI user).
/// - `verify_server_hostname` on every node: a server must present
///   `server.<datacenter>.<domain>`, so a certificate an agent holds (any
///   the CA signed) cannot pose as a server.
/// - `auto_encrypt`: servers hand out agent certificates (`allow_tls`);
///   an agent given only the CA asks for one (`tls`).
fn tls_config(tls: &Tls<'_>, server: bool) -> Option<(Value, Option<Value>)> {
    let ca = tls.ca_file?;
    let mut defaults = Map::new();
    defaults.insert("ca_file".into(), json!(ca.to_string_lossy()));
    if let (Some(cert), Some(key)) = (tls.cert_file, tls.key_file) {
        defaults.insert("cert_file".into(), json!(cert.to_string_lossy()));
        defaults.insert("key_file".into(), json!(key.to_string_lossy()));
    }
    defaults.insert("verify_outgoing".into(), json!(true));
    let mut internal = Map::new();
    if server {
        internal.insert("verify_incoming".into(), json!(true));
    }
    internal.insert("verify_server_hostname".into(), json!(true));
    let auto_encrypt = if server {
        Some(json!({ "allow_tls": true }))
    } else if tls.cert_file.is_none() {
        Some(json!({ "tls": true }))
    } else {
        None
    };
    Some((
        json!({ "defaults": defaults, "internal_rpc": internal }),
        auto_encrypt,
    ))
}

/// Checks that a path can stand unquoted in a unit file line (no spaces,
/// quotes, `%` specifiers, `$` or control characters).
pub fn unit_path(path: &Path) -> Result<String> {
    let s = path.to_string_lossy();
    let ok = path.is_absolute()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-' | b'+' | b'@')
        });
    if !ok {
        bail!(
            "path {} cannot be used in a systemd unit: use a path of letters, digits and /._-+@",
            s.escape_debug()
        );
    }
    Ok(s.into_owned())
}

/// The drop-in for `consul.service`, packaged or ours. `notify` when the
/// node has someone to join; `config_file` is the file `run` writes.
///
/// `data_dir` is given when the consul user exists: the data dir is made
/// (outside any sandbox) and handed to it before Consul starts.
pub fn consul_dropin(
    consul: &str,
    config_dir: &str,
    config_file: &str,
    data_dir: Option<&str>,
    notify: bool,
) -> String {
    let prepare = data_dir
        .map(|d| {
            format!(
                "# The data dir, the consul user's ('+': outside the sandbox).\n\
                 ExecStartPre=+/usr/bin/install -d -o consul -g consul -m 0750 {d}\n"
            )
        })
        .unwrap_or_default();
    let start = if notify {
        "# Consul tells systemd it is ready once it has joined the cluster:\n\
         # units ordered after consul.service start with a joined agent. A join\n\
         # that takes longer than the timeout (servers being replaced) fails\n\
         # the start, and Restart= tries again with the retry_join the\n\
         # heartbeat keeps current.\n\
         Type=notify\n\
         TimeoutStartSec=10min\n"
    } else {
        "# A lone bootstrap server has nobody to join, and Consul reports ready\n\
         # only after a join: do not wait for it.\n\
         Type=exec\n\
         TimeoutStartSec=90s\n"
    };
    format!(
        "{MARKER}; rewritten at every boot.\n\
         [Unit]\n\
         Wants=network-online.target\n\
         After=network-online.target auto-consul.service\n\
         # HashiCorp's package starts Consul only when its consul.hcl is not\n\
         # empty; the configuration that matters is auto-consul's. (An empty\n\
         # assignment resets every condition of the unit.)\n\
         ConditionFileNotEmpty=\n\
         ConditionFileNotEmpty={config_file}\n\
         \n\
         [Service]\n\
         {start}\
         LimitNOFILE=65536\n\
         {prepare}\
         ExecStart=\n\
         ExecStart={consul} agent -config-dir={config_dir}\n"
    )
}

/// Where auto-consul's own units run and what they may write.
#[derive(Debug, Clone, Copy)]
pub struct UnitPaths<'a> {
    /// The auto-consul binary.
    pub auto_consul: &'a str,
    /// The env file.
    pub env_file: &'a str,
    /// Consul's config dir (written by `run`, rewritten by `heartbeat`).
    pub config_dir: &'a str,
    /// Consul's data dir (`run` moves a stale `server_metadata.json` aside).
    pub data_dir: &'a str,
    /// The directory of a `file://` registry, which must stay writable.
    pub registry_dir: Option<&'a str>,
    /// The directory of the metrics file, which must stay writable.
    pub metrics_dir: Option<&'a str>,
    /// The directory of a `file://` secrets store, which `run` and the
    /// heartbeat may write (a genesis makes its files there).
    pub secrets_dir: Option<&'a str>,
    /// Whether a file the units read (secret, certificate, metrics) lies
    /// under /root, /home or /run/user.
    pub reads_home: bool,
}

/// Whether `path` lies where `ProtectHome=yes` hides it.
pub fn in_home(path: &str) -> bool {
    ["/root/", "/home/", "/run/user/"]
        .iter()
        .any(|h| path.starts_with(h))
}

impl UnitPaths<'_> {
    /// `ProtectHome=yes` hides /root, /home and /run/user: `read-only`
    /// when the binary or a file it reads lies there, so that it still runs.
    fn protect_home(&self) -> &'static str {
        if self.reads_home || in_home(self.auto_consul) {
            "read-only"
        } else {
            "yes"
        }
    }

    /// The writable paths every auto-consul unit needs beyond its own.
    fn registry_rw(&self) -> String {
        [self.registry_dir, self.metrics_dir, self.secrets_dir]
            .iter()
            .flatten()
            .map(|d| format!(" -{d}"))
            .collect()
    }
}

/// The sandbox every unit gets, measured with `systemd-analyze security
/// --offline=true` (the test suite asserts the scores). What differs per
/// unit: the capabilities, the writable paths, `ProtectHome=`, extra
/// system calls, address families and the umask.
struct Sandbox<'a> {
    caps: &'a str,
    read_write: String,
    protect_home: &'a str,
    state_dir: bool,
    extra_syscalls: &'a str,
    families: &'a str,
    umask: &'a str,
}

impl Sandbox<'_> {
    fn render(&self) -> String {
        let state = if self.state_dir {
            "StateDirectory=auto-consul\nStateDirectoryMode=0755\n"
        } else {
            ""
        };
        let rw = if self.read_write.is_empty() {
            String::new()
        } else {
            format!("ReadWritePaths={}\n", self.read_write)
        };
        format!(
            "CapabilityBoundingSet={caps}\n\
             AmbientCapabilities=\n\
             NoNewPrivileges=yes\n\
             ProtectSystem=strict\n\
             {state}{rw}\
             ProtectHome={home}\n\
             PrivateTmp=yes\n\
             PrivateDevices=yes\n\
             DevicePolicy=closed\n\
             PrivateMounts=yes\n\
             ProtectKernelTunables=yes\n\
             ProtectKernelModules=yes\n\
             ProtectKernelLogs=yes\n\
             ProtectControlGroups=yes\n\
             ProtectClock=yes\n\
             ProtectHostname=yes\n\
             ProtectProc=invisible\n\
             ProcSubset=pid\n\
             RestrictAddressFamilies={families}\n\
             RestrictNamespaces=yes\n\
             RestrictRealtime=yes\n\
             RestrictSUIDSGID=yes\n\
             LockPersonality=yes\n\
             MemoryDenyWriteExecute=yes\n\
             SystemCallArchitectures=native\n\
             SystemCallFilter=@system-service\n\
             SystemCallFilter=~@privileged @resources\n\
             {extra}\
             SystemCallErrorNumber=EPERM\n\
             KeyringMode=private\n\
             UMask={umask}\n",
            caps = self.caps,
            home = self.protect_home,
            families = self.families,
            extra = self.extra_syscalls,
            umask = self.umask,
        )
    }
}

/// A full `consul.service`, for Consul installed from a zip (no unit at
/// all): run as the `consul` user, with no capabilities (Consul's ports are
/// unprivileged), writing only its data dir. The drop-in adds the type,
/// the start timeout and the command line.
pub fn consul_unit(consul: &str, config_dir: &str, data_dir: &str) -> String {
    let sandbox = consul_sandbox(data_dir);
    format!(
        "# Written by auto-consul: no consul.service was installed.\n\
         [Unit]\n\
         Description=Consul agent\n\
         Documentation=https://developer.hashicorp.com/consul/docs\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=exec\n\
         User=consul\n\
         Group=consul\n\
         ExecStart={consul} agent -config-dir={config_dir}\n\
         ExecReload=/bin/kill --signal HUP $MAINPID\n\
         KillMode=process\n\
         KillSignal=SIGTERM\n\
         Restart=on-failure\n\
         LimitNOFILE=65536\n\
         {sandbox}\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// The drop-in that sandboxes a packaged `consul.service` as auto-consul's
/// own is (`--sandbox-consul`, opt-in: an operator's Consul may run script
/// checks or write logs the sandbox forbids).
pub fn consul_sandbox_dropin(data_dir: &str) -> String {
    format!(
        "{MARKER} (--sandbox-consul); removed when that is no longer set.\n\
         [Service]\n\
         {}",
        consul_sandbox(data_dir)
    )
}

/// Consul's sandbox: no capabilities (its ports are unprivileged), writing
/// only its data dir. Script checks (enable_script_checks) run inside it.
fn consul_sandbox(data_dir: &str) -> String {
    let sandbox = Sandbox {
        caps: "",
        // '-': a data dir not made yet fails no start; the drop-in's
        // ExecStartPre makes it.
        read_write: format!("-{data_dir}"),
        protect_home: "yes",
        state_dir: false,
        extra_syscalls: "",
        // Netlink: Go lists the interfaces for bind and advertise
        // addresses (and go-sockaddr templates); AF_UNIX: sd_notify.
        families: "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        umask: "0027",
    }
    .render();
    format!("RemoveIPC=yes\n{sandbox}")
}

/// The heartbeat's and the leave unit's sandbox: root, reading past file
/// modes (a consul-owned config dir, token or CA file) but nothing more.
fn small_sandbox(paths: &UnitPaths<'_>, read_write: String, chown: bool) -> String {
    let (caps, extra_syscalls) = if chown {
        (
            "CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH",
            "SystemCallFilter=@chown\n",
        )
    } else {
        ("CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH", "")
    };
    Sandbox {
        caps,
        read_write,
        protect_home: paths.protect_home(),
        state_dir: true,
        extra_syscalls,
        families: "AF_UNIX AF_INET AF_INET6",
        umask: "0077",
    }
    .render()
}

/// The oneshot service the heartbeat timer starts. It may rewrite the
/// `retry_join` of Consul's config and its own timer, and reloads systemd
/// to re-arm it.
pub fn heartbeat_service(paths: &UnitPaths<'_>) -> String {
    let sandbox = small_sandbox(
        paths,
        format!(
            "-{} -/etc/systemd/system{}",
            paths.config_dir,
            paths.registry_rw()
        ),
        // Consul's config file, rewritten, stays the consul user's.
        true,
    );
    format!(
        "# Written by auto-consul.\n\
         [Unit]\n\
         Description=auto-consul heartbeat: publish this node to the registry\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         EnvironmentFile={env_file}\n\
         ExecStart={auto_consul} heartbeat\n\
         # A run that failed (Consul not up yet at boot) is tried again soon,\n\
         # not a whole timer interval later (40 minutes for an agent). Not\n\
         # ordered after consul.service: while Consul waits to join, the\n\
         # heartbeat is what gives it live servers to join.\n\
         Restart=on-failure\n\
         RestartSec=30s\n\
         {sandbox}",
        env_file = paths.env_file,
        auto_consul = paths.auto_consul,
    )
}

/// The timer: every `expiry/3` seconds, to the second, with a small random
/// delay so that a fleet booted together does not write in lockstep.
pub fn heartbeat_timer(expiry: u64) -> String {
    // At most every expiry/3, with a jitter well inside it: one run may
    // fail outright (after its own retries) and the next still renews the
    // slot before it expires.
    let every = (expiry / 3).max(1);
    let jitter = (expiry / 30).min(5);
    let jitter = if jitter > 0 {
        format!("RandomizedDelaySec={jitter}s\n")
    } else {
        String::new()
    };
    format!(
        "# Written by auto-consul.\n\
         [Unit]\n\
         Description=auto-consul heartbeat every {every}s (expiry {expiry}s)\n\
         \n\
         [Timer]\n\
         OnActiveSec=5s\n\
         OnUnitActiveSec={every}s\n\
         AccuracySec=1s\n\
         {jitter}\
         \n\
         [Install]\n\
         WantedBy=timers.target\n"
    )
}

/// The snapshot unit, on servers: `auto-consul snapshot` (the leader
/// saves; a restore a new cluster owes comes first). A run that can pass
/// soon (no leader yet, a restore to do or under way) exits 75 and is
/// tried again after 30 s, so that the restore does not wait an interval;
/// other failures wait for the next interval (a full snapshot every 30 s
/// would be a load of its own).
pub fn snapshot_service(paths: &UnitPaths<'_>) -> String {
    let sandbox = small_sandbox(paths, paths.registry_rw().trim_start().to_string(), false);
    format!(
        "{MARKER}.\n\
         [Unit]\n\
         Description=auto-consul snapshot: save the leader's Consul state to the registry\n\
         Wants=network-online.target\n\
         After=network-online.target consul.service\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         EnvironmentFile={env_file}\n\
         ExecStart={auto_consul} snapshot\n\
         # Snapshots of gigabytes stream through the state directory.\n\
         TimeoutStartSec=6h\n\
         # Exit 75 (no leader yet, a restore under way elsewhere) is tried\n\
         # again soon; any other failure waits for the next interval.\n\
         Restart=on-failure\n\
         RestartPreventExitStatus=1 2\n\
         RestartSec=30s\n\
         Nice=10\n\
         IOSchedulingClass=idle\n\
         {sandbox}",
        env_file = paths.env_file,
        auto_consul = paths.auto_consul,
    )
}

/// Autopilot's settings for a cluster of `servers`: (config file key, API
/// field, value). min_quorum only from 3 servers on (0: none).
fn autopilot_settings(servers: u32) -> [(&'static str, &'static str, Value); 5] {
    [
        ("cleanup_dead_servers", "CleanupDeadServers", json!(true)),
        (
            "last_contact_threshold",
            "LastContactThreshold",
            json!("200ms"),
        ),
        ("max_trailing_logs", "MaxTrailingLogs", json!(250)),
        (
            "server_stabilization_time",
            "ServerStabilizationTime",
            json!("10s"),
        ),
        (
            "min_quorum",
            "MinQuorum",
            json!(if servers >= 3 { servers } else { 0 }),
        ),
    ]
}

/// The body of `PUT /v1/operator/autopilot/configuration` setting what
/// the config file sets (Consul applies the file's `autopilot` only when
/// its state holds none, e.g. not after a restore): every field, since
/// Consul decodes the body onto zero values (api/operator_autopilot.go,
/// `AutopilotConfiguration`).
pub fn autopilot_api(servers: u32) -> Value {
    let mut body = Map::new();
    for (_, field, value) in autopilot_settings(servers) {
        body.insert(field.into(), value);
    }
    body.insert("RedundancyZoneTag".into(), json!(""));
    body.insert("DisableUpgradeMigration".into(), json!(false));
    body.insert("UpgradeVersionTag".into(), json!(""));
    Value::Object(body)
}

/// The snapshot timer: a first run 15 s after boot (a restore owed at
/// genesis starts as soon as this server leads: `snapshot` waits for the
/// election), then every `interval` seconds; with 0 (no snapshots), only
/// the first.
pub fn snapshot_timer(interval: u64) -> String {
    let (what, every) = if interval == 0 {
        ("once after boot (snapshots off)".to_string(), String::new())
    } else {
        (
            format!("every {interval}s"),
            format!(
                "OnUnitActiveSec={interval}s\nRandomizedDelaySec={}s\n",
                (interval / 20).min(300)
            ),
        )
    };
    format!(
        "{MARKER}.\n\
         [Unit]\n\
         Description=auto-consul snapshot {what}\n\
         \n\
         [Timer]\n\
         OnActiveSec=15s\n\
         {every}\
         AccuracySec=1s\n\
         \n\
         [Install]\n\
         WantedBy=timers.target\n"
    )
}

/// The launch gate's unit (an instance in an autoscaling group with a
/// launch hook): after Consul starts, `auto-consul gate` waits until the
/// node is in service, then completes the hook. Written and started by
/// `run` only in a group.
pub fn gate_service(paths: &UnitPaths<'_>, gate_wait: u64) -> String {
    let sandbox = small_sandbox(paths, paths.registry_rw().trim_start().to_string(), false);
    format!(
        "{MARKER}.\n\
         [Unit]\n\
         Description=auto-consul launch gate: put this instance in service once Consul is\n\
         Wants=network-online.target consul.service\n\
         After=network-online.target consul.service\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         EnvironmentFile={env_file}\n\
         ExecStart={auto_consul} gate\n\
         # --gate-wait, and time to complete the hook after it.\n\
         TimeoutStartSec={timeout}\n\
         # A failure (the hook's call failed past its retries) is tried\n\
         # again while the hook waits: the gate's heartbeats come back\n\
         # within 20 s.\n\
         Restart=on-failure\n\
         RestartSec=10s\n\
         {sandbox}\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        env_file = paths.env_file,
        auto_consul = paths.auto_consul,
        timeout = gate_wait + 300,
    )
}

/// The boot unit `install` writes: `auto-consul run` once per boot, before
/// Consul starts; retried while the registry or IMDS is not reachable yet.
pub fn boot_unit(paths: &UnitPaths<'_>) -> String {
    // CAP_CHOWN: Consul's config file is handed to the consul user.
    // CAP_DAC_*: the config dir and the data dir may be consul's, and the
    // Raft check must see <data_dir>/raft (or a server could bootstrap).
    let sandbox = Sandbox {
        caps: "CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH",
        // '-': a directory that does not exist yet (Consul from a zip has
        // no /etc/consul.d; a custom config dir; a data dir Consul makes)
        // must not fail the namespace set-up (status=226/NAMESPACE).
        // ExecStartPre makes the config dir first, outside the sandbox.
        read_write: format!(
            "/etc/auto-consul /etc/systemd/system -{} -{}{}",
            paths.config_dir,
            paths.data_dir,
            paths.registry_rw()
        ),
        protect_home: paths.protect_home(),
        state_dir: true,
        extra_syscalls: "SystemCallFilter=@chown\n",
        families: "AF_UNIX AF_INET AF_INET6",
        // Directories it creates must stay readable by the consul user;
        // files get explicit modes.
        umask: "0022",
    }
    .render();
    format!(
        "{MARKER}.\n\
         [Unit]\n\
         Description=auto-consul: join this instance to its Consul cluster\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         Before=consul.service\n\
         # Retried until it succeeds: a first boot may fail for minutes (an\n\
         # instance profile not usable yet, S3 errors past the SDK's retries,\n\
         # a server slot still held by a dead server).\n\
         StartLimitIntervalSec=0\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         EnvironmentFile={env_file}\n\
         # Outside the sandbox ('+'): the directories it may write must exist\n\
         # before the sandbox is set up.\n\
         ExecStartPre=+/bin/mkdir -p /etc/auto-consul {config_dir}\n\
         {secrets_mkdir}\
         ExecStart={auto_consul} run\n\
         # Exit 1 (registry or IMDS not reachable yet, no slot free yet) is\n\
         # retried; exit 2, a configuration error, is not.\n\
         Restart=on-failure\n\
         RestartSec=15s\n\
         RestartPreventExitStatus=2\n\
         # Covers the bounded waits of `run` (--role-wait, --witness-wait).\n\
         TimeoutStartSec=15min\n\
         {sandbox}\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        env_file = paths.env_file,
        config_dir = paths.config_dir,
        auto_consul = paths.auto_consul,
        secrets_mkdir = paths
            .secrets_dir
            .map(|d| format!("ExecStartPre=+/bin/mkdir -p -m 0700 {d}\n"))
            .unwrap_or_default(),
    )
}

/// The unit that tells a termination from a reboot at shutdown. Started
/// at boot (it does nothing then) and ordered after consul.service, so at
/// shutdown it stops first, while Consul and the network still run: when
/// the instance is being terminated, Consul leaves and the node leaves the
/// registry (slot released, heartbeats deleted); on a reboot nothing
/// happens.
pub fn leave_unit(paths: &UnitPaths<'_>) -> String {
    let sandbox = small_sandbox(paths, paths.registry_rw().trim_start().to_string(), false);
    format!(
        "{MARKER}.\n\
         [Unit]\n\
         Description=auto-consul: leave the cluster when this instance is terminated\n\
         Wants=network-online.target\n\
         After=network-online.target consul.service\n\
         # Stopped after the heartbeat, so that no heartbeat renews the slot\n\
         # this unit releases.\n\
         Before=auto-consul-heartbeat.service auto-consul-heartbeat.timer\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         EnvironmentFile={env_file}\n\
         ExecStart=/bin/true\n\
         ExecStop={auto_consul} leave --if-terminating\n\
         TimeoutStopSec=90s\n\
         {sandbox}\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        env_file = paths.env_file,
        auto_consul = paths.auto_consul,
    )
}

/// The env file shared by `run`, the heartbeat service and the boot unit:
/// `vars` merged into the file as it is (`existing`). The operator's lines
/// are kept verbatim and in place: comments, blank lines and every
/// variable auto-consul does not set (`AWS_REGION`, `HTTPS_PROXY`, ...).
/// A line setting one of `vars` gets the new value where it stands; the
/// rest of `vars` are appended.
pub fn env_file(existing: Option<&str>, vars: &[(&str, String)]) -> Result<String> {
    let line = |key: &str, value: &str| -> Result<String> {
        if value.contains(['\'', '\n', '\r', '\0']) {
            bail!(
                "the value of {key} contains a quote or a line break, which the env file cannot hold"
            );
        }
        Ok(format!("{key}='{value}'"))
    };
    let mut out = String::new();
    let mut done = std::collections::HashSet::new();
    match existing {
        Some(text) => {
            for raw in text.lines() {
                let (key, value) = raw.split_once('=').unwrap_or((raw, ""));
                let key = key.trim();
                match vars.iter().find(|(k, _)| raw.contains('=') && *k == key) {
                    // The same value, however quoted: the line stays as
                    // the operator wrote it.
                    Some((k, v)) if unquote(value) == v => {
                        out.push_str(raw);
                        done.insert(*k);
                    }
                    Some((k, v)) => {
                        out.push_str(&line(k, v)?);
                        done.insert(*k);
                    }
                    None => out.push_str(raw),
                }
                out.push('\n');
            }
        }
        None => out.push_str(ENV_HEADER),
    }
    for (k, v) in vars.iter().filter(|(k, _)| !done.contains(k)) {
        out.push_str(&line(k, v)?);
        out.push('\n');
    }
    Ok(out)
}

/// An env file value without its surrounding quotes.
/// The `KEY=VALUE` lines of an env file, as systemd's `EnvironmentFile=`
/// reads them (comments and blank lines skipped, one level of quotes off).
pub fn parse_env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), unquote(v).to_string()))
        .filter(|(k, _)| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .collect()
}

fn unquote(value: &str) -> &str {
    let v = value.trim();
    for q in ['\'', '"'] {
        if let Some(inner) = v.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner;
        }
    }
    v
}

/// The first line of an env file auto-consul creates.
const ENV_HEADER: &str = "# auto-consul settings; `run` updates the AUTO_CONSUL_* lines it sets and keeps every other line.\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn settings<'a>(mode: Mode, bootstrap: bool, join: &'a [IpAddr]) -> ConsulSettings<'a> {
        ConsulSettings {
            node: "i-0abc",
            address: "10.0.0.5".parse().unwrap(),
            data_dir: Path::new("/opt/consul"),
            datacenter: "dc1",
            domain: "consul",
            mode,
            bootstrap,
            servers: 3,
            retry_join: join,
            cloud_join: None,
            encrypt: None,
            acl_token: None,
            acl: None,
            tls: Tls::default(),
            primary_datacenter: None,
            retry_join_wan: &[],
        }
    }

    /// Compares `text` with the golden file `name`; with
    /// AUTO_CONSUL_BLESS=1 in the environment, writes it instead (then
    /// review the diff).
    fn golden(name: &str, text: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("AUTO_CONSUL_BLESS").is_some() {
            std::fs::write(&path, text).unwrap();
            return;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (AUTO_CONSUL_BLESS=1 writes it)", path.display()));
        assert_eq!(text, want, "{name} differs from its golden file");
    }

    #[test]
    fn configs_for_every_mode_with_and_without_tls_match_golden() {
        let join: [IpAddr; 2] = ["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        let ca = Path::new("/etc/consul.d/tls/ca.pem");
        let cert = Path::new("/etc/consul.d/tls/node.pem");
        let key = Path::new("/etc/consul.d/tls/node-key.pem");
        let full = Tls {
            ca_file: Some(ca),
            cert_file: Some(cert),
            key_file: Some(key),
        };
        let ca_only = Tls {
            ca_file: Some(ca),
            ..Tls::default()
        };
        let cases: [(&str, ConsulSettings<'_>); 8] = [
            ("bootstrap.json", settings(Mode::Bootstrap, true, &[])),
            ("server.json", settings(Mode::Server, false, &join)),
            ("agent.json", settings(Mode::Agent, false, &join)),
            (
                "agent-cloud-join.json",
                ConsulSettings {
                    cloud_join: Some("provider=aws tag_key=auto-consul:cluster tag_value=prod"),
                    ..settings(Mode::Agent, false, &join)
                },
            ),
            (
                "bootstrap-tls.json",
                ConsulSettings {
                    tls: full,
                    ..settings(Mode::Bootstrap, true, &[])
                },
            ),
            (
                "server-tls.json",
                ConsulSettings {
                    tls: full,
                    ..settings(Mode::Server, false, &join)
                },
            ),
            (
                "agent-tls.json",
                ConsulSettings {
                    tls: full,
                    ..settings(Mode::Agent, false, &join)
                },
            ),
            (
                "agent-auto-encrypt.json",
                ConsulSettings {
                    tls: ca_only,
                    ..settings(Mode::Agent, false, &join)
                },
            ),
        ];
        for (name, s) in &cases {
            golden(name, &consul_config(s));
        }
    }

    #[test]
    fn tls_follows_hashicorps_guidance() {
        let join: [IpAddr; 1] = ["10.0.0.1".parse().unwrap()];
        let tls = Tls {
            ca_file: Some(Path::new("/ca.pem")),
            cert_file: Some(Path::new("/c.pem")),
            key_file: Some(Path::new("/k.pem")),
        };
        let server: Value = serde_json::from_str(&consul_config(&ConsulSettings {
            tls,
            ..settings(Mode::Server, false, &join)
        }))
        .unwrap();
        // Client certificates are demanded for internal RPC only, not of
        // HTTPS or gRPC users; servers prove their role by hostname.
        assert!(server["tls"]["defaults"].get("verify_incoming").is_none());
        assert_eq!(server["tls"]["defaults"]["verify_outgoing"], json!(true));
        assert_eq!(
            server["tls"]["internal_rpc"]["verify_incoming"],
            json!(true)
        );
        assert_eq!(
            server["tls"]["internal_rpc"]["verify_server_hostname"],
            json!(true)
        );
        assert_eq!(server["auto_encrypt"], json!({ "allow_tls": true }));
        let agent: Value = serde_json::from_str(&consul_config(&ConsulSettings {
            tls: Tls {
                ca_file: Some(Path::new("/ca.pem")),
                ..Tls::default()
            },
            ..settings(Mode::Agent, false, &join)
        }))
        .unwrap();
        assert_eq!(agent["auto_encrypt"], json!({ "tls": true }));
        assert!(agent["tls"]["defaults"].get("cert_file").is_none());
        assert!(
            agent["tls"]["internal_rpc"]
                .get("verify_incoming")
                .is_none()
        );
        assert_eq!(
            agent["tls"]["internal_rpc"]["verify_server_hostname"],
            json!(true)
        );
        // No CA, no TLS at all.
        let plain: Value =
            serde_json::from_str(&consul_config(&settings(Mode::Server, false, &join))).unwrap();
        assert!(plain.get("tls").is_none() && plain.get("auto_encrypt").is_none());
    }

    #[test]
    fn server_config_has_autopilot_guarding_the_quorum() {
        let join = ["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        let five = ConsulSettings {
            servers: 5,
            ..settings(Mode::Server, false, &join)
        };
        golden("server-5.json", &consul_config(&five));
        // One server: nothing to keep a quorum of, so no min_quorum (which
        // would stop autopilot from ever replacing it).
        let one = ConsulSettings {
            servers: 1,
            ..settings(Mode::Bootstrap, true, &[])
        };
        let v: Value = serde_json::from_str(&consul_config(&one)).unwrap();
        assert_eq!(v["autopilot"]["cleanup_dead_servers"], json!(true));
        assert!(v["autopilot"].get("min_quorum").is_none(), "{v}");
        // Agents leave on terminate and have no autopilot.
        let agent: Value =
            serde_json::from_str(&consul_config(&settings(Mode::Agent, false, &join))).unwrap();
        assert!(agent.get("autopilot").is_none());
        assert_eq!(agent["leave_on_terminate"], json!(true));
    }

    #[test]
    fn server_config_never_bootstraps_without_the_flag() {
        let join = ["10.0.0.1".parse().unwrap()];
        let v: Value =
            serde_json::from_str(&consul_config(&settings(Mode::Server, false, &join))).unwrap();
        assert_eq!(v["server"], json!(true));
        assert_eq!(v["bootstrap"], json!(false));
        assert_eq!(v["retry_join"], json!(["10.0.0.1"]));
    }

    fn packaged_paths() -> UnitPaths<'static> {
        UnitPaths {
            auto_consul: "/usr/bin/auto-consul",
            env_file: "/etc/auto-consul/auto-consul.env",
            config_dir: "/etc/consul.d",
            data_dir: "/opt/consul",
            registry_dir: None,
            metrics_dir: None,
            secrets_dir: None,
            reads_home: false,
        }
    }

    #[test]
    fn units_match_golden() {
        let dropin = |data_dir, notify| {
            consul_dropin(
                "/usr/bin/consul",
                "/etc/consul.d",
                "/etc/consul.d/zz-auto-consul.json",
                data_dir,
                notify,
            )
        };
        golden(
            "consul.service.d-auto-consul.conf",
            &dropin(Some("/opt/consul"), true),
        );
        golden(
            "consul.service.d-auto-consul-bootstrap.conf",
            &dropin(None, false),
        );
        golden(
            "consul.service",
            &consul_unit("/usr/bin/consul", "/etc/consul.d", "/opt/consul"),
        );
        golden("auto-consul-heartbeat.timer", &heartbeat_timer(120));
        golden(
            "auto-consul-heartbeat.service",
            &heartbeat_service(&packaged_paths()),
        );
        golden("auto-consul-leave.service", &leave_unit(&packaged_paths()));
        golden(
            "auto-consul-snapshot.service",
            &snapshot_service(&packaged_paths()),
        );
        golden("auto-consul-snapshot.timer", &snapshot_timer(3600));
    }

    #[test]
    fn a_binary_under_home_keeps_home_readable_and_a_file_registry_writable() {
        let paths = UnitPaths {
            auto_consul: "/root/bin/auto-consul",
            registry_dir: Some("/srv/registry"),
            ..packaged_paths()
        };
        let unit = heartbeat_service(&paths);
        assert!(unit.contains("ProtectHome=read-only\n"), "{unit}");
        assert!(
            unit.contains("ReadWritePaths=-/etc/consul.d -/etc/systemd/system -/srv/registry\n"),
            "{unit}"
        );
        assert!(heartbeat_service(&packaged_paths()).contains("ProtectHome=yes\n"));
    }

    #[test]
    fn the_packaged_boot_unit_is_the_one_install_writes() {
        if std::env::var_os("AUTO_CONSUL_BLESS").is_some() {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/auto-consul.service");
            std::fs::write(path, boot_unit(&packaged_paths())).unwrap();
            return;
        }
        assert_eq!(
            boot_unit(&packaged_paths()),
            include_str!("../packaging/auto-consul.service")
        );
    }

    #[test]
    fn unsafe_unit_paths_are_refused() {
        assert!(unit_path(Path::new("/usr/bin/consul")).is_ok());
        for bad in [
            "/opt/my consul",
            "/opt/%n",
            "relative",
            "/opt/$x",
            "/opt/a\nb",
        ] {
            assert!(unit_path(Path::new(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_file_refuses_values_it_cannot_quote() {
        assert_eq!(
            env_file(None, &[("A", "s3://b/p".into())])
                .unwrap()
                .lines()
                .nth(1),
            Some("A='s3://b/p'")
        );
        assert!(env_file(None, &[("A", "x'y".into())]).is_err());
        assert!(env_file(None, &[("A", "x\ny".into())]).is_err());
    }

    #[test]
    fn env_file_keeps_the_operators_lines_in_place() {
        let operator = "# proxy for S3\nHTTPS_PROXY=http://proxy:3128\nA='old'\n\nAWS_REGION=eu-west-1\nA=again\nC=\"same\"\n";
        let vars = [("A", "new".into()), ("B", "b".into()), ("C", "same".into())];
        let merged = env_file(Some(operator), &vars).unwrap();
        assert_eq!(
            merged,
            "# proxy for S3\nHTTPS_PROXY=http://proxy:3128\nA='new'\n\nAWS_REGION=eu-west-1\nA='new'\nC=\"same\"\nB='b'\n"
        );
        // Merging again changes nothing.
        assert_eq!(env_file(Some(&merged), &vars).unwrap(), merged);
    }
}
