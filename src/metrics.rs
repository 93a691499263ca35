//! Metrics for Prometheus' node_exporter textfile collector
//! (`--metrics-file`): what `run` and `heartbeat` did last, written
//! atomically in the text exposition format when the command ends, failed
//! or not. One file holds both commands: each run keeps the other
//! command's lines as they were.
//!
//! Facts are gathered while the command runs: requests to the registry
//! and their errors, by kind, counted by [`Counted`] around the store;
//! the mode, slot, live servers and purged keys reported by the command.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Result;
use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::install::{self, FileSpec, Root};
use crate::model::Mode;
use crate::registry::{Condition, Fetched, Listed, Object, PutOutcome, Store};

/// What the command reported.
#[derive(Debug, Default, Clone)]
struct Facts {
    mode: Option<Mode>,
    slot: Option<Option<u32>>,
    live_servers: Option<usize>,
    purged: Option<usize>,
    /// When the snapshot this command saved was saved.
    snapshot_saved: Option<DateTime<Utc>>,
    /// When the save this command tried failed.
    snapshot_failed: Option<DateTime<Utc>>,
    /// The expiry (Unix seconds) of the TLS files auto-consul made, by file.
    tls_expiry: Vec<(&'static str, i64)>,
    /// (kind, errors?) -> count.
    requests: BTreeMap<(&'static str, bool), u64>,
}

static FACTS: Mutex<Option<Facts>> = Mutex::new(None);

fn with(f: impl FnOnce(&mut Facts)) {
    let mut guard = FACTS.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(Facts::default));
}

/// This node's mode and server slot (`None`: holds none).
pub fn node(mode: Mode, slot: Option<u32>) {
    with(|f| {
        f.mode = Some(mode);
        f.slot = Some(slot);
    });
}

/// How many live servers the command saw.
pub fn live_servers(n: usize) {
    with(|f| f.live_servers = Some(n));
}

/// How many heartbeat keys the command purged.
pub fn purged(n: usize) {
    with(|f| f.purged = Some(n));
}

/// When the snapshot the command saved was saved.
pub fn snapshot_saved(at: DateTime<Utc>) {
    with(|f| f.snapshot_saved = Some(at));
}

/// When the snapshot save the command tried failed.
pub fn snapshot_failed(at: DateTime<Utc>) {
    with(|f| f.snapshot_failed = Some(at));
}

/// The expiry of the TLS files auto-consul made (`ca`, `certificate`).
pub fn tls_expiry(files: Vec<(&'static str, i64)>) {
    with(|f| f.tls_expiry = files);
}

fn request(kind: &'static str, failed: bool) {
    with(|f| *f.requests.entry((kind, failed)).or_default() += 1);
}

/// A store that counts its requests by kind for the metrics.
pub struct Counted(pub Box<dyn Store>);

#[async_trait]
impl Store for Counted {
    async fn list(&self, dir: &str, start_after: Option<&str>) -> Result<Vec<Listed>> {
        let r = self.0.list(dir, start_after).await;
        request("list", r.is_err());
        r
    }

    async fn list_until(
        &self,
        dir: &str,
        start_after: Option<&str>,
        enough: &(dyn for<'x> Fn(&'x [Listed]) -> bool + Send + Sync),
    ) -> Result<Vec<Listed>> {
        let r = self.0.list_until(dir, start_after, enough).await;
        request("list", r.is_err());
        r
    }

    async fn list_page(
        &self,
        dir: &str,
        token: Option<String>,
    ) -> Result<(Vec<Listed>, Option<String>)> {
        let r = self.0.list_page(dir, token).await;
        request("list", r.is_err());
        r
    }

    async fn get(&self, key: &str) -> Result<Option<Object>> {
        let r = self.0.get(key).await;
        request("get", r.is_err());
        r
    }

    async fn put(&self, key: &str, body: Vec<u8>, condition: Condition) -> Result<PutOutcome> {
        let r = self.0.put(key, body, condition).await;
        request("put", matches!(r, Err(_) | Ok(PutOutcome::Unknown(_))));
        r
    }

    async fn delete(&self, keys: &[String]) -> Result<usize> {
        let r = self.0.delete(keys).await;
        request("delete", r.is_err());
        r
    }

    async fn put_file(&self, key: &str, path: &Path, sha256: &str) -> Result<()> {
        let r = self.0.put_file(key, path, sha256).await;
        request("put", r.is_err());
        r
    }

    async fn get_file(&self, key: &str, dest: &Path) -> Result<Option<Fetched>> {
        let r = self.0.get_file(key, dest).await;
        request("get", r.is_err());
        r
    }

    async fn now(&self) -> DateTime<Utc> {
        self.0.now().await
    }
}

/// The metric families, in the order written: name, type, help.
const FAMILIES: &[(&str, &str, &str)] = &[
    (
        "auto_consul_last_run_timestamp_seconds",
        "gauge",
        "Unix time the command last ended.",
    ),
    (
        "auto_consul_last_success_timestamp_seconds",
        "gauge",
        "Unix time the command last succeeded.",
    ),
    (
        "auto_consul_last_run_success",
        "gauge",
        "Whether the command's last run succeeded (1) or failed (0).",
    ),
    (
        "auto_consul_mode",
        "gauge",
        "The mode this node runs in (1 for the mode it has).",
    ),
    (
        "auto_consul_server_slot_held",
        "gauge",
        "Whether this node holds a server slot (1) or not (0).",
    ),
    (
        "auto_consul_live_servers",
        "gauge",
        "Live servers the command's last run saw.",
    ),
    (
        "auto_consul_registry_requests",
        "gauge",
        "Requests to the registry in the command's last run, by kind.",
    ),
    (
        "auto_consul_registry_errors",
        "gauge",
        "Failed requests to the registry in the command's last run, by kind.",
    ),
    (
        "auto_consul_heartbeats_purged",
        "gauge",
        "Heartbeat keys the command's last run purged.",
    ),
    (
        "auto_consul_snapshot_last_success_timestamp_seconds",
        "gauge",
        "Unix time this node last saved a snapshot of Consul's state to the registry.",
    ),
    (
        "auto_consul_snapshot_last_failure_timestamp_seconds",
        "gauge",
        "Unix time a snapshot save of this node last failed (nothing uploaded).",
    ),
    (
        "auto_consul_tls_expiry_timestamp_seconds",
        "gauge",
        "Unix time the TLS file auto-consul made expires, by file (ca, certificate).",
    ),
];

/// Writes the metrics of `command` (which ended now, `ok` or not) into
/// `path` under `root`, keeping the other commands' samples.
pub fn write(root: &Root, path: &Path, command: &str, ok: bool) -> Result<()> {
    let facts = FACTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    let _lock = install::lock(root, "metrics")?;
    let on_disk = root.path(path);
    let previous = std::fs::read_to_string(&on_disk).unwrap_or_default();
    let now = Utc::now().timestamp_millis() as f64 / 1000.0;
    let mine = format!("command=\"{command}\"");
    // name -> sample lines.
    let mut samples: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for line in previous.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, _)) = line.split_once(['{', ' ']) else {
            continue;
        };
        let Some((fname, ..)) = FAMILIES.iter().find(|(n, ..)| *n == name) else {
            continue;
        };
        // The other commands' samples stay; this command's are replaced.
        // The node's mode and slot are replaced by a command that knows them.
        let replaced =
            line.contains(&mine) || (facts.mode.is_some() && !line.contains("command=\""));
        // What only a success says stays until the next success says it.
        let kept_until_said = (!ok && name == "auto_consul_last_success_timestamp_seconds")
            || (facts.snapshot_saved.is_none()
                && name == "auto_consul_snapshot_last_success_timestamp_seconds")
            || (facts.snapshot_failed.is_none()
                && name == "auto_consul_snapshot_last_failure_timestamp_seconds")
            || (facts.tls_expiry.is_empty() && name == "auto_consul_tls_expiry_timestamp_seconds");
        let keep = !replaced || kept_until_said;
        if keep {
            samples.entry(fname).or_default().push(line.to_string());
        }
    }
    let mut add = |name: &'static str, labels: String, value: String| {
        samples
            .entry(name)
            .or_default()
            .push(format!("{name}{{{labels}}} {value}"));
    };
    add(
        "auto_consul_last_run_timestamp_seconds",
        mine.clone(),
        now.to_string(),
    );
    if ok {
        add(
            "auto_consul_last_success_timestamp_seconds",
            mine.clone(),
            now.to_string(),
        );
    }
    add(
        "auto_consul_last_run_success",
        mine.clone(),
        u8::from(ok).to_string(),
    );
    if let Some(mode) = facts.mode {
        for m in [Mode::Bootstrap, Mode::Server, Mode::Agent] {
            add(
                "auto_consul_mode",
                format!("mode=\"{}\"", m.as_str()),
                u8::from(m == mode).to_string(),
            );
        }
    }
    if let Some(slot) = facts.slot {
        let labels = slot.map(|s| format!("slot=\"{s}\"")).unwrap_or_default();
        add(
            "auto_consul_server_slot_held",
            labels,
            u8::from(slot.is_some()).to_string(),
        );
    }
    if let Some(n) = facts.live_servers {
        add("auto_consul_live_servers", mine.clone(), n.to_string());
    }
    for kind in ["list", "get", "put", "delete"] {
        let count = |failed| facts.requests.get(&(kind, failed)).copied().unwrap_or(0);
        add(
            "auto_consul_registry_requests",
            format!("{mine},kind=\"{kind}\""),
            (count(false) + count(true)).to_string(),
        );
        add(
            "auto_consul_registry_errors",
            format!("{mine},kind=\"{kind}\""),
            count(true).to_string(),
        );
    }
    if let Some(n) = facts.purged {
        add("auto_consul_heartbeats_purged", mine.clone(), n.to_string());
    }
    if let Some(at) = facts.snapshot_saved {
        add(
            "auto_consul_snapshot_last_success_timestamp_seconds",
            mine.clone(),
            (at.timestamp_millis() as f64 / 1000.0).to_string(),
        );
    }
    for (file, at) in &facts.tls_expiry {
        add(
            "auto_consul_tls_expiry_timestamp_seconds",
            format!("{mine},file=\"{file}\""),
            at.to_string(),
        );
    }
    if let Some(at) = facts.snapshot_failed {
        add(
            "auto_consul_snapshot_last_failure_timestamp_seconds",
            mine.clone(),
            (at.timestamp_millis() as f64 / 1000.0).to_string(),
        );
    }
    let mut text = String::new();
    for (name, kind, help) in FAMILIES {
        let Some(lines) = samples.get(name) else {
            continue;
        };
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
    }
    install::write_atomic(
        root,
        &FileSpec {
            path: path.to_path_buf(),
            contents: text,
            mode: 0o644,
            owner: None,
        },
    )
    .map_err(|e| {
        e.context(format!(
            "the units may write only an existing directory: create {} and run `auto-consul install` again",
            path.parent().unwrap_or(path).display()
        ))
    })?;
    Ok(())
}
