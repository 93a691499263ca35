//! The files `run` writes that do not depend on the decision, and what
//! it finds on the node: the consul binary, its own path, Raft state.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cli::GlobalOpts;
use crate::commands::env_file;
use crate::error::usage;
use crate::install::{FileSpec, Root};
use crate::render::{self};

/// Paths on the target system.
pub(super) const CONFIG_FILE: &str = "auto-consul.json";
pub(super) const DROPIN: &str = "/etc/systemd/system/consul.service.d/auto-consul.conf";
pub(super) const CONSUL_UNIT: &str = "/etc/systemd/system/consul.service";
pub(super) const HEARTBEAT_SERVICE: &str = "/etc/systemd/system/auto-consul-heartbeat.service";
/// Leaves at shutdown when the instance is being terminated.
pub const LEAVE_UNIT: &str = "/etc/systemd/system/auto-consul-leave.service";
pub const HEARTBEAT_TIMER: &str = "/etc/systemd/system/auto-consul-heartbeat.timer";
/// The env file shared by `run`, the heartbeat and the boot unit.
pub const ENV_FILE: &str = "/etc/auto-consul/auto-consul.env";

/// Whether the data dir under the root holds Consul Raft state.
/// A raft directory that cannot be read counts as state: a node that may
/// have been a server must never bootstrap.
pub(super) fn has_raft_state(root: &Root, data_dir: &Path) -> bool {
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

/// The files that do not depend on the decision: units and env file.
pub(super) fn fixed_files(
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
        mode: crate::commands::env_file_mode(root),
        owner: None,
    });
    Ok(files)
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
