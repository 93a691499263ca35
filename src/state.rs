//! The sticky state `run` keeps between boots
//! (`/var/lib/auto-consul/state.json`).

use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::identity::Identity;
use crate::install::{FileSpec, Root};
use crate::model::Mode;

/// Where the state lives on the target system.
pub const STATE_PATH: &str = "/var/lib/auto-consul/state.json";
/// Where the purger keeps the store time of its last purge.
pub const PURGED_AT: &str = "/var/lib/auto-consul/purged-at";
/// Where `heartbeat` keeps the store time of its last written heartbeat
/// (read by `status`).
pub const HEARTBEAT_AT: &str = "/var/lib/auto-consul/heartbeat-at";

/// Records a time (the store's) in `path`; a failure is a warning: what
/// the time marks has happened.
pub fn record_time(root: &Root, path: &str, at: chrono::DateTime<chrono::Utc>) {
    let spec = FileSpec {
        path: path.into(),
        contents: format!("{}\n", at.to_rfc3339()),
        mode: 0o644,
        owner: None,
    };
    if let Err(e) = crate::install::write_atomic(root, &spec) {
        tracing::warn!("could not record the time in {path}: {e:#}");
    }
}

/// The time recorded in `path`, if any.
pub fn recorded_time(root: &Root, path: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let text = std::fs::read_to_string(root.path(Path::new(path))).ok()?;
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// Records a number in `path`; a failure is a warning.
pub fn record_number(root: &Root, path: &str, n: u32) {
    let spec = number_file(path, n);
    if let Err(e) = crate::install::write_atomic(root, &spec) {
        tracing::warn!("could not record {n} in {path}: {e:#}");
    }
}

/// The file recording `n` at `path`.
pub fn number_file(path: &str, n: u32) -> FileSpec {
    FileSpec {
        path: path.into(),
        contents: format!("{n}\n"),
        mode: 0o644,
        owner: None,
    }
}

/// The number recorded in `path`, if any.
pub fn recorded_number(root: &Root, path: &str) -> Option<u32> {
    std::fs::read_to_string(root.path(Path::new(path)))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What this node decided, for which registry and cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The registry URL the decision was made against.
    pub registry: String,
    /// The cluster id, when the registry has a cluster record.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// The decided mode.
    pub mode: Mode,
    /// This node's name.
    pub node: String,
    /// This node's address.
    pub address: IpAddr,
    /// This node's EC2 instance id, when known.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// The server slot held, if any.
    #[serde(default)]
    pub slot: Option<u32>,
    /// The claim id written into the slot.
    #[serde(default)]
    pub claim_id: Option<String>,
}

/// Reads the state under `root`. A missing file is `None`; an unreadable
/// or corrupt one is `None` with a warning (the decision then starts afresh,
/// still guarded by the Raft check).
pub fn load(root: &Root) -> Option<State> {
    let path = root.path(Path::new(STATE_PATH));
    let text = match std::fs::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!("ignoring state file {}: {e}", path.display());
            return None;
        }
    };
    serde_json::from_slice(&text)
        .map_err(|e| tracing::warn!("ignoring corrupt state file {}: {e}", path.display()))
        .ok()
}

/// The state of this node for `registry`: `None` when there is none, when
/// it is for another registry, or (with a warning) when another instance or
/// node wrote it: a state file copied in an image made from a configured
/// node must never make this node a server or let it renew a slot.
pub fn load_for(root: &Root, registry: &str, me: &Identity) -> Option<State> {
    let state = load(root)?;
    if state.registry != registry {
        return None;
    }
    let path = root.path(Path::new(STATE_PATH));
    let other_instance = matches!(
        (&state.instance_id, &me.instance_id),
        (Some(theirs), Some(mine)) if theirs != mine
    );
    if other_instance || state.node != me.node {
        tracing::warn!(
            "ignoring state file {}: it was written by node {} (instance {}), and this is node {} (instance {}); \
             an image made from a configured node? deciding afresh",
            path.display(),
            state.node,
            state.instance_id.as_deref().unwrap_or("unknown"),
            me.node,
            me.instance_id.as_deref().unwrap_or("unknown"),
        );
        return None;
    }
    Some(state)
}

/// The state file to write.
pub fn file(state: &State) -> FileSpec {
    let mut contents = serde_json::to_string_pretty(state).expect("state serialises");
    contents.push('\n');
    FileSpec {
        path: STATE_PATH.into(),
        contents,
        mode: 0o600,
        owner: None,
    }
}
