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
    /// The decided mode.
    pub mode: Mode,
    /// Whether to set `bootstrap: true` (bootstrap mode, no Raft state yet).
    pub bootstrap: bool,
    /// The cluster's number of servers (the record's): autopilot never
    /// prunes the quorum below it.
    pub servers: u32,
    /// Addresses to join.
    pub retry_join: &'a [IpAddr],
    /// Gossip encryption key.
    pub encrypt: Option<&'a str>,
    /// ACL token for the agent.
    pub acl_token: Option<&'a str>,
    /// TLS CA, certificate and key paths.
    pub tls: Tls<'a>,
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
    c.insert(
        "retry_join".into(),
        json!(
            s.retry_join
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
        ),
    );
    if s.mode.is_server() {
        c.insert("server".into(), json!(true));
        if s.bootstrap {
            c.insert("bootstrap".into(), json!(true));
        }
        // Replacement servers join while the dead ones still count in Raft:
        // autopilot removes the dead once a replacement is healthy, and
        // never below the cluster's size (min_quorum, from 3 servers on,
        // where losing one still leaves a quorum). Consul applies these
        // when the datacenter bootstraps; later changes go through
        // `consul operator autopilot set-config`. Servers do not leave on
        // terminate: a server that leaves shrinks the quorum's size.
        let mut autopilot = Map::new();
        autopilot.insert("cleanup_dead_servers".into(), json!(true));
        autopilot.insert("last_contact_threshold".into(), json!("200ms"));
        autopilot.insert("max_trailing_logs".into(), json!(250));
        autopilot.insert("server_stabilization_time".into(), json!("10s"));
        if s.servers >= 3 {
            autopilot.insert("min_quorum".into(), json!(s.servers));
        }
        c.insert("autopilot".into(), Value::Object(autopilot));
        c.insert("leave_on_terminate".into(), json!(false));
    } else {
        c.insert("server".into(), json!(false));
        c.insert("leave_on_terminate".into(), json!(true));
    }
    if let Some(key) = s.encrypt {
        c.insert("encrypt".into(), json!(key));
    }
    if let Some(token) = s.acl_token {
        c.insert("acl".into(), json!({ "tokens": { "agent": token } }));
    }
    let mut tls = Map::new();
    for (name, path) in [
        ("ca_file", s.tls.ca_file),
        ("cert_file", s.tls.cert_file),
        ("key_file", s.tls.key_file),
    ] {
        if let Some(p) = path {
            tls.insert(name.into(), json!(p.to_string_lossy()));
        }
    }
    if !tls.is_empty() {
        tls.insert("verify_incoming".into(), json!(s.tls.cert_file.is_some()));
        tls.insert("verify_outgoing".into(), json!(true));
        c.insert("tls".into(), json!({ "defaults": Value::Object(tls) }));
    }
    let mut text =
        serde_json::to_string_pretty(&Value::Object(c)).expect("JSON of strings serialises");
    text.push('\n');
    text
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

/// The drop-in for the packaged `consul.service`.
pub fn consul_dropin(consul: &str, config_dir: &str) -> String {
    format!(
        "# Written by auto-consul; rewritten at every boot.\n\
         [Unit]\n\
         Wants=network-online.target\n\
         After=network-online.target auto-consul.service\n\
         \n\
         [Service]\n\
         # Consul reports ready to systemd only after joining a cluster, which a\n\
         # lone bootstrap server never does: do not wait for it.\n\
         Type=exec\n\
         ExecStart=\n\
         ExecStart={consul} agent -config-dir={config_dir}\n"
    )
}

/// A full `consul.service`, for Consul installed from a zip (no unit at all).
pub fn consul_unit(consul: &str, config_dir: &str, user: Option<&str>) -> String {
    let user = user
        .map(|u| format!("User={u}\nGroup={u}\n"))
        .unwrap_or_default();
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
         {user}\
         ExecStart={consul} agent -config-dir={config_dir}\n\
         ExecReload=/bin/kill --signal HUP $MAINPID\n\
         KillMode=process\n\
         KillSignal=SIGTERM\n\
         Restart=on-failure\n\
         LimitNOFILE=65536\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// The oneshot service the heartbeat timer starts.
pub fn heartbeat_service(auto_consul: &str, env_file: &str) -> String {
    format!(
        "# Written by auto-consul.\n\
         [Unit]\n\
         Description=auto-consul heartbeat: publish this node to the registry\n\
         Wants=network-online.target\n\
         After=network-online.target consul.service\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         EnvironmentFile={env_file}\n\
         ExecStart={auto_consul} heartbeat\n\
         # A run that failed (Consul not up yet at boot) is tried again soon,\n\
         # not a whole timer interval later (40 minutes for an agent).\n\
         Restart=on-failure\n\
         RestartSec=30s\n"
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

/// The boot unit `install` writes: `auto-consul run` once per boot, before
/// Consul starts; retried while the registry or IMDS is not reachable yet.
pub fn boot_unit(auto_consul: &str, env_file: &str) -> String {
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
         ExecStart={auto_consul} run\n\
         # Exit 1 (registry or IMDS not reachable yet, no slot free yet) is\n\
         # retried; exit 2, a configuration error, is not.\n\
         Restart=on-failure\n\
         RestartSec=15s\n\
         RestartPreventExitStatus=2\n\
         # Covers the bounded waits of `run` (--role-wait, --witness-wait).\n\
         TimeoutStartSec=15min\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// The unit that tells a termination from a reboot at shutdown. Started
/// at boot (it does nothing then) and ordered after consul.service, so at
/// shutdown it stops first, while Consul and the network still run: when
/// the instance is being terminated, Consul leaves and the node leaves the
/// registry (slot released, heartbeats deleted); on a reboot nothing
/// happens.
pub fn leave_unit(auto_consul: &str, env_file: &str) -> String {
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
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
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
            mode,
            bootstrap,
            servers: 3,
            retry_join: join,
            encrypt: None,
            acl_token: None,
            tls: Tls::default(),
        }
    }

    #[test]
    fn bootstrap_config_matches_golden() {
        let text = consul_config(&settings(Mode::Bootstrap, true, &[]));
        assert_eq!(text, include_str!("../tests/golden/bootstrap.json"));
    }

    #[test]
    fn agent_config_matches_golden() {
        let join = ["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        let text = consul_config(&settings(Mode::Agent, false, &join));
        assert_eq!(text, include_str!("../tests/golden/agent.json"));
    }

    #[test]
    fn server_config_has_autopilot_guarding_the_quorum() {
        let join = ["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()];
        let five = ConsulSettings {
            servers: 5,
            ..settings(Mode::Server, false, &join)
        };
        assert_eq!(
            consul_config(&five),
            include_str!("../tests/golden/server-5.json")
        );
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
        assert!(v.get("bootstrap").is_none());
        assert_eq!(v["retry_join"], json!(["10.0.0.1"]));
    }

    #[test]
    fn units_match_golden() {
        assert_eq!(
            consul_dropin("/usr/bin/consul", "/etc/consul.d"),
            include_str!("../tests/golden/consul.service.d-auto-consul.conf")
        );
        assert_eq!(
            heartbeat_timer(120),
            include_str!("../tests/golden/auto-consul-heartbeat.timer")
        );
        assert_eq!(
            heartbeat_service("/usr/bin/auto-consul", "/etc/auto-consul/auto-consul.env"),
            include_str!("../tests/golden/auto-consul-heartbeat.service")
        );
    }

    #[test]
    fn the_packaged_boot_unit_is_the_one_install_writes() {
        assert_eq!(
            boot_unit("/usr/bin/auto-consul", "/etc/auto-consul/auto-consul.env"),
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
