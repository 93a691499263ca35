//! The files `run` writes that do not depend on the decision, and what
//! it finds on the node: the consul binary, its own path, Raft state.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cli::{ConsulOpts, GlobalOpts, OutputOpts, SecretOpts};
use crate::commands::env_file;
use crate::error::usage;
use crate::install::{FileSpec, Root};
use crate::registry::RegistryUrl;
use crate::render::{self};

/// Paths on the target system.
/// Read after HashiCorp's packaged `consul.hcl` and other files in the
/// config dir (Consul reads them in lexical order; the last one wins).
pub const CONFIG_FILE: &str = "zz-auto-consul.json";
/// Its name before: read before `consul.hcl`, which then won.
pub const LEGACY_CONFIG_FILE: &str = "auto-consul.json";
pub(super) const DROPIN: &str = "/etc/systemd/system/consul.service.d/auto-consul.conf";
pub(super) const CONSUL_UNIT: &str = "/etc/systemd/system/consul.service";
/// The sandbox for a packaged consul.service (`--sandbox-consul`).
pub(super) const SANDBOX_DROPIN: &str =
    "/etc/systemd/system/consul.service.d/auto-consul-sandbox.conf";
pub(super) const HEARTBEAT_SERVICE: &str = "/etc/systemd/system/auto-consul-heartbeat.service";
/// Leaves at shutdown when the instance is being terminated.
/// The launch gate's unit, written in an autoscaling group only.
pub(super) const GATE_UNIT: &str = "/etc/systemd/system/auto-consul-gate.service";
/// The snapshot service and timer, written on servers only.
pub(super) const SNAPSHOT_SERVICE: &str = "/etc/systemd/system/auto-consul-snapshot.service";
pub(super) const SNAPSHOT_TIMER: &str = "/etc/systemd/system/auto-consul-snapshot.timer";
pub const LEAVE_UNIT: &str = "/etc/systemd/system/auto-consul-leave.service";
pub const HEARTBEAT_TIMER: &str = "/etc/systemd/system/auto-consul-heartbeat.timer";
/// The env file shared by `run`, the heartbeat and the boot unit.
pub const ENV_FILE: &str = "/etc/auto-consul/auto-consul.env";

/// Consul's `server_rejoin_age_max` default (168 h; its minimum is 6 h):
/// a server whose `server_metadata.json` says it last ran longer ago
/// refuses to start until an operator removes that file (Consul's docs;
/// agent/config/builder.go `ServerRejoinAgeMax`).
pub(super) const SERVER_REJOIN_AGE_MAX: u64 = 168 * 3600;

/// The file Consul servers stamp with the time they last ran.
pub(super) const SERVER_METADATA: &str = "server_metadata.json";

/// How long ago (seconds, on this host's clock: the clock Consul itself
/// compares it with) a server last ran, by its `server_metadata.json`
/// (`{"last_seen_unix": N}`); `None` when there is no such file or it
/// cannot be read as one.
pub(super) fn server_offline_for(text: &str, now_unix: i64) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let seen = v.get("last_seen_unix")?.as_i64()?;
    Some(now_unix.saturating_sub(seen).max(0) as u64)
}

/// Consul's gossip keyrings in the data dir: the LAN one, and a server's
/// WAN one.
pub(super) const KEYRINGS: [&str; 2] = ["serf/local.keyring", "serf/remote.keyring"];

/// Where a node whose secrets were made at genesis keeps its TLS files:
/// the CA's certificate, and for a server its own certificate and key,
/// signed by the CA. A server's certificate on disk is kept while it was
/// issued under the same CA for this server name and is not yet due for
/// renewal (`secrets::renew_at`); otherwise `run` makes a new one (and a
/// running server's heartbeat renews it).
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    pub fn new(config_dir: &Path) -> TlsPaths {
        let p = |f: &str| crate::secrets::tls_path(config_dir, f);
        TlsPaths {
            ca: p("ca.pem"),
            cert: p("server.pem"),
            key: p("server-key.pem"),
        }
    }

    /// The operator's TLS files, or (`made`) these, a certificate for
    /// servers only.
    pub(super) fn tls<'a>(
        &'a self,
        tls: &'a SecretOpts,
        mode: crate::model::Mode,
        made: bool,
    ) -> render::Tls<'a> {
        if !made {
            return render::Tls {
                ca_file: tls.ca_file.as_deref(),
                cert_file: tls.cert_file.as_deref(),
                key_file: tls.key_file.as_deref(),
            };
        }
        render::Tls {
            ca_file: Some(&self.ca),
            cert_file: mode.is_server().then_some(self.cert.as_path()),
            key_file: mode.is_server().then_some(self.key.as_path()),
        }
    }
}

/// Whether the data dir under the root holds Consul Raft state.
/// A raft directory that cannot be read counts as state: a node that may
/// have been a server must never bootstrap.
pub fn has_raft_state(root: &Root, data_dir: &Path) -> bool {
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

/// The `consul` binary for `ExecStart`: on PATH (inside the root first when
/// there is one). Under a root other than `/` a missing binary is a warning
/// (it may be installed later in the bake) and `/usr/bin/consul` is assumed.
pub(super) fn find_consul(root: &Root) -> Result<PathBuf> {
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

/// The paths auto-consul's units name (`run`'s and `install`'s), checked
/// for use in a unit file.
pub struct UnitStrings {
    pub auto_consul: String,
    pub config_dir: String,
    pub data_dir: String,
    pub registry_dir: Option<String>,
    pub metrics_dir: Option<String>,
    pub secrets_dir: Option<String>,
    pub reads_home: bool,
}

impl UnitStrings {
    /// `registry` may be unknown (`install` without one).
    pub fn new(
        consul_opts: &ConsulOpts,
        tls: &SecretOpts,
        output: &OutputOpts,
        auto_consul: &Path,
        registry: Option<&RegistryUrl>,
    ) -> Result<UnitStrings> {
        let registry_dir = match registry {
            Some(RegistryUrl::File { dir }) => {
                Some(render::unit_path(dir).map_err(|e| usage(format!("--registry: {e}")))?)
            }
            Some(RegistryUrl::S3 { .. }) | None => None,
        };
        Ok(UnitStrings {
            auto_consul: render::unit_path(auto_consul).context("the auto-consul binary's path")?,
            config_dir: render::unit_path(&consul_opts.config_dir)
                .map_err(|e| usage(format!("--config-dir: {e}")))?,
            data_dir: render::unit_path(&consul_opts.data_dir)
                .map_err(|e| usage(format!("--data-dir: {e}")))?,
            registry_dir,
            metrics_dir: metrics_dir(output)?,
            secrets_dir: match &tls.secrets {
                Some(crate::secrets::SecretsUrl::Dir { dir }) => {
                    Some(render::unit_path(dir).map_err(|e| usage(format!("--secrets: {e}")))?)
                }
                _ => None,
            },
            reads_home: reads_home(tls, output),
        })
    }

    pub fn paths(&self) -> render::UnitPaths<'_> {
        render::UnitPaths {
            auto_consul: &self.auto_consul,
            env_file: ENV_FILE,
            config_dir: &self.config_dir,
            data_dir: &self.data_dir,
            registry_dir: self.registry_dir.as_deref(),
            metrics_dir: self.metrics_dir.as_deref(),
            secrets_dir: self.secrets_dir.as_deref(),
            reads_home: self.reads_home,
        }
    }

    /// The drop-in for `consul.service` running `consul` (a unit-safe
    /// path); `notify` when the node has someone to join.
    pub fn dropin(&self, root: &Root, consul: &str, notify: bool) -> String {
        let config_file = format!("{}/{CONFIG_FILE}", self.config_dir.trim_end_matches('/'));
        render::consul_dropin(
            consul,
            &self.config_dir,
            &config_file,
            root.user("consul").map(|_| self.data_dir.as_str()),
            notify,
        )
    }
}

/// Whether a file the units read or write lies where `ProtectHome=yes`
/// would hide it.
pub fn reads_home(tls: &SecretOpts, output: &OutputOpts) -> bool {
    [
        &tls.encrypt_file,
        &tls.acl_token_file,
        &tls.ca_file,
        &tls.cert_file,
        &tls.key_file,
        &output.metrics_file,
    ]
    .iter()
    .filter_map(|p| p.as_deref())
    .chain(match &tls.secrets {
        Some(crate::secrets::SecretsUrl::Dir { dir }) => Some(dir.as_path()),
        _ => None,
    })
    .any(|p| render::in_home(&format!("{}/", p.to_string_lossy())))
}

/// The directory of `--metrics-file`, for the units' writable paths.
pub fn metrics_dir(output: &OutputOpts) -> Result<Option<String>> {
    output
        .metrics_file
        .as_deref()
        .and_then(Path::parent)
        .map(|d| render::unit_path(d).map_err(|e| usage(format!("--metrics-file: {e}"))))
        .transpose()
}

pub(super) fn unit(path: &str, contents: String) -> FileSpec {
    FileSpec {
        path: path.into(),
        contents,
        mode: 0o644,
        owner: None,
    }
}

/// The files whose contents the decision settles: the drop-in (Consul's
/// type) and the timer (the expiry that rules).
pub(super) fn decided_units(
    files: &mut [FileSpec],
    units: &UnitStrings,
    consul: &str,
    root: &Root,
    timer_expiry: u64,
    notify: bool,
) {
    for f in files.iter_mut() {
        if f.path == Path::new(HEARTBEAT_TIMER) {
            f.contents = render::heartbeat_timer(timer_expiry);
        } else if f.path == Path::new(DROPIN) {
            f.contents = units.dropin(root, consul, notify);
        }
    }
}

/// The files that do not depend on the decision: units and env file (the
/// full consul.service when `manages_consul`; the
/// drop-in and the timer as placeholders until `decided_units`).
pub(super) fn fixed_files(
    opts: &GlobalOpts,
    root: &Root,
    manages_consul: bool,
    units: &UnitStrings,
    consul: &str,
    registry: &str,
) -> Result<Vec<FileSpec>> {
    let mut files = vec![unit(DROPIN, units.dropin(root, consul, false))];
    if manages_consul {
        files.push(unit(
            CONSUL_UNIT,
            render::consul_unit(consul, &units.config_dir, &units.data_dir),
        ));
    } else if opts.consul.sandbox_consul {
        files.push(unit(
            SANDBOX_DROPIN,
            render::consul_sandbox_dropin(&units.data_dir),
        ));
    }
    files.push(unit(
        HEARTBEAT_SERVICE,
        render::heartbeat_service(&units.paths()),
    ));
    files.push(unit(LEAVE_UNIT, render::leave_unit(&units.paths())));
    // Its contents follow the expiry that rules, known after the election.
    files.push(unit(
        HEARTBEAT_TIMER,
        render::heartbeat_timer(opts.cluster.expiry()),
    ));
    files.push(FileSpec {
        path: ENV_FILE.into(),
        contents: env_file(opts, root, Some(registry))?,
        mode: crate::commands::env_file_mode(root),
        owner: None,
    });
    Ok(files)
}

/// Makes sure the `consul` user exists when auto-consul writes the unit
/// that runs Consul as it (Consul from a zip, which creates no user): on
/// the running system with `useradd --system`; under another root, a
/// warning (create it in the image).
pub fn ensure_consul_user(root: &Root) -> Result<()> {
    if root.user("consul").is_some() {
        return Ok(());
    }
    if !root.is_system() {
        tracing::warn!(
            "no consul user in {}: consul.service runs Consul as `consul`; create it in the image \
             (useradd --system --user-group --no-create-home --shell /usr/sbin/nologin consul)",
            root.path(Path::new("/etc/passwd")).display()
        );
        return Ok(());
    }
    let out = std::process::Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "consul",
        ])
        .output()
        .map_err(|e| anyhow::anyhow!("running useradd to create the consul user: {e}"))?;
    if !out.status.success() {
        return Err(usage(format!(
            "useradd could not create the consul user, which consul.service runs as ({}): {}; \
             create it in the image: `auto-consul install` does (the boot unit's sandbox cannot), \
             or useradd --system --user-group --no-create-home --shell /usr/sbin/nologin consul",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    tracing::info!("created the system user consul, which consul.service runs as");
    Ok(())
}

/// Whether `run` writes a full `consul.service`: only when no other unit
/// of that name exists anywhere on the unit path (Consul from a zip). One we
/// wrote before is ours to keep current; an operator's is never replaced.
pub(super) fn manages_consul_unit(root: &Root) -> bool {
    root.units_named("consul.service").iter().all(|p| {
        p == Path::new(CONSUL_UNIT)
            && std::fs::read_to_string(root.path(p)).is_ok_and(|t| t.starts_with(render::MARKER))
    })
}

#[cfg(test)]
mod tests {
    use super::{SERVER_REJOIN_AGE_MAX, server_offline_for};

    #[test]
    fn a_server_stopped_past_the_rejoin_age_is_told_from_one_that_is_not() {
        let now = 1_800_000_000;
        let file = |ago: i64| format!("{{\"last_seen_unix\":{}}}", now - ago);
        let week = SERVER_REJOIN_AGE_MAX as i64;
        assert_eq!(server_offline_for(&file(3600), now), Some(3600));
        assert!(server_offline_for(&file(week + 1), now).unwrap() > SERVER_REJOIN_AGE_MAX);
        assert!(server_offline_for(&file(week), now).unwrap() <= SERVER_REJOIN_AGE_MAX);
        // A stamp from the future (a clock set back) is not "offline".
        assert_eq!(server_offline_for(&file(-600), now), Some(0));
        assert_eq!(server_offline_for("junk", now), None);
        assert_eq!(server_offline_for("{\"last_seen\":1}", now), None);
    }
}
