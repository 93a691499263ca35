//! What `run` did and what `plan` would do, as text or `--json`. `plan`
//! shows the whole [`NodePlan`]: each file new, changed (a unified diff
//! against the disk, secrets masked) or unchanged, what is moved aside or
//! removed, and the units started.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::decide::NodePlan;
use super::elect::Elected;
use super::files::{CONFIG_FILE, KEYRINGS, TlsPaths};
use crate::cli::ConsulOpts;
use crate::commands::members::cluster_json;
use crate::identity::Identity;
use crate::install::{FileSpec, Root};
use crate::model::Mode;

/// What `run` did (or `plan` would do), as `--json` or text says it.
pub(super) struct Done<'a> {
    pub(super) elected: &'a Elected,
    pub(super) me: &'a Identity,
    pub(super) plan: &'a NodePlan,
    pub(super) root: &'a Root,
    pub(super) written: Vec<PathBuf>,
    pub(super) dry_run: bool,
    pub(super) hook: Option<&'a crate::lifecycle::Hook>,
    /// `plan` of a genesis with `--secrets`: the secrets are made by `run`.
    pub(super) secrets_at_genesis: bool,
}

impl Done<'_> {
    pub(super) fn json(&self, consul: &ConsulOpts) -> Value {
        let (elected, me, plan) = (self.elected, self.me, self.plan);
        let mut out = json!({
            "mode": elected.mode.as_str(),
            "node": me.node,
            "address": me.address.to_string(),
            "instance_id": me.instance_id,
            "cluster_id": elected.cluster_id,
            "slot": elected.slot,
            "bootstrap": elected.mode == Mode::Bootstrap,
            "retry_join": plan.retry_join.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "cluster": cluster_summary(elected, me),
            "files": plan.files.iter().map(|f| self.root.path(&f.path)).collect::<Vec<_>>(),
            "config_conflicts": plan.conflicts.iter().map(|c| json!({
                "file": c.file, "key": c.key, "effect": c.effect,
            })).collect::<Vec<_>>(),
            "consul_type": if plan.notify { "notify" } else { "exec" },
            "changed": self.written,
            "started": plan.start && !self.dry_run,
            "dry_run": self.dry_run,
            "lifecycle_hook": self.hook.map(|h| json!({"group": h.group, "hook": h.hook})),
        });
        if self.dry_run {
            out["plan"] = self.plan_json(consul);
        }
        out
    }

    /// The whole plan as data: each file and record with its status (and
    /// diff), what moves aside, what is removed, the units.
    fn plan_json(&self, consul: &ConsulOpts) -> Value {
        let plan = self.plan;
        let file = |f: &FileSpec| {
            let c = Change::of(self.root, consul, plan, f);
            json!({
                "path": self.root.path(&f.path),
                "contents": masked(consul, plan, &f.path, &f.contents),
                "mode": format!("{:04o}", f.mode),
                "owner": f.owner.map(|(u, g)| json!([u, g])),
                "status": c.status,
                "diff": c.diff,
                "secret": c.secret,
            })
        };
        json!({
            "files": plan.keyring.iter().chain(&plan.files).map(file).collect::<Vec<_>>(),
            "records": plan.records.iter().map(file).collect::<Vec<_>>(),
            "aside": plan.aside.iter().map(|a| json!({
                "what": a.what, "from": self.root.path(&a.from), "to": self.root.path(&a.to), "why": a.why,
            })).collect::<Vec<_>>(),
            "remove": plan.remove.iter().map(|r| json!({
                "path": self.root.path(&r.path), "why": r.why,
            })).collect::<Vec<_>>(),
            "units": {
                "daemon_reload": plan.start,
                "enable_now": if plan.start { plan.units.clone() } else { Vec::new() },
            },
            "secrets_made_at_genesis": self.secrets_at_genesis,
            "nothing_changes": self.nothing_changes(consul),
        })
    }

    /// Whether applying the plan would change no file.
    fn nothing_changes(&self, consul: &ConsulOpts) -> bool {
        let plan = self.plan;
        plan.aside.is_empty()
            && plan.remove.is_empty()
            && plan
                .keyring
                .iter()
                .chain(&plan.files)
                .chain(&plan.records)
                .all(|f| Change::of(self.root, consul, plan, f).status == "unchanged")
    }

    pub(super) fn print(&self, consul_opts: &ConsulOpts) {
        let (elected, me) = (self.elected, self.me);
        let verb = if self.dry_run { "would run" } else { "runs" };
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
        let join: Vec<String> = self.plan.retry_join.iter().map(|a| a.to_string()).collect();
        println!("retry_join: [{}]", join.join(", "));
        let summary = cluster_summary(elected, me);
        match summary["cluster_id"].as_str() {
            Some(id) => println!(
                "cluster {id} (bootstrapped by {}): {} servers, expiry {}s, agent expiry {}s",
                summary["bootstrap_node"].as_str().unwrap_or("?"),
                summary["servers"],
                summary["expiry"],
                summary["agent_expiry"]
            ),
            None => println!("{}", crate::commands::members::cluster_line(&elected.view)),
        }
        if self.dry_run {
            self.print_plan(consul_opts);
            return;
        }
        for f in &self.plan.files {
            let p = self.root.path(&f.path);
            let what = if self.written.contains(&p) {
                "wrote"
            } else {
                "unchanged"
            };
            println!("{what}: {}", p.display());
        }
        if self.plan.start {
            println!(
                "started: consul.service, auto-consul-heartbeat.timer, auto-consul-leave.service"
            );
        }
    }

    /// `plan`'s text: every file and record with its status and diff,
    /// then what moves aside, what is removed, the units.
    fn print_plan(&self, consul: &ConsulOpts) {
        let plan = self.plan;
        if self.secrets_at_genesis {
            println!("secrets: made at this cluster's genesis by `run` (not shown here)");
        }
        let files: Vec<&FileSpec> = plan.keyring.iter().chain(&plan.files).collect();
        let records: Vec<&FileSpec> = plan.records.iter().collect();
        for (kind, list) in [("file", files), ("record", records)] {
            for f in list {
                let c = Change::of(self.root, consul, plan, f);
                println!(
                    "{} {kind}: {} ({:04o})",
                    c.status,
                    self.root.path(&f.path).display(),
                    f.mode
                );
                if let Some(diff) = &c.diff {
                    for line in diff.lines() {
                        println!("    {line}");
                    }
                }
            }
        }
        for a in &plan.aside {
            println!(
                "would move aside {}: {} -> {}: {}",
                a.what,
                self.root.path(&a.from).display(),
                self.root.path(&a.to).display(),
                a.why
            );
        }
        for r in &plan.remove {
            println!(
                "would remove: {} ({})",
                self.root.path(&r.path).display(),
                r.why
            );
        }
        if plan.start {
            println!(
                "would run: systemctl daemon-reload; systemctl enable --now --no-block {}",
                plan.units.join(" ")
            );
        }
        if self.nothing_changes(consul) {
            println!("nothing would change");
        }
    }
}

/// One planned file against the disk.
struct Change {
    status: &'static str,
    /// A unified diff (secrets masked), for a changed file.
    diff: Option<String>,
    /// Whether its contents hold a secret (shown masked).
    secret: bool,
}

impl Change {
    fn of(root: &Root, consul: &ConsulOpts, plan: &NodePlan, f: &FileSpec) -> Change {
        let path = root.path(&f.path);
        let secret = holds_secret(consul, plan, &f.path);
        if crate::install::unchanged(&path, f) {
            return Change {
                status: "unchanged",
                diff: None,
                secret,
            };
        }
        let Ok(old) = std::fs::read_to_string(&path) else {
            return Change {
                status: "new",
                diff: None,
                secret,
            };
        };
        let mask = |text: &str| masked(consul, plan, &f.path, text);
        let (old_shown, new_shown) = (mask(&old), mask(&f.contents));
        let diff = if old == f.contents {
            "(contents unchanged: its mode or owner changes)".to_string()
        } else if old_shown == new_shown {
            "(a secret value changes: not shown)".to_string()
        } else {
            let shown = path.display().to_string();
            similar::TextDiff::from_lines(&old_shown, &new_shown)
                .unified_diff()
                .context_radius(2)
                .header(&shown, &shown)
                .to_string()
        };
        Change {
            status: "changed",
            diff: Some(diff),
            secret,
        }
    }
}

/// Whether the file at `path` (on the target system) holds a secret: the
/// config file when it does, a server's TLS key, a gossip keyring.
fn holds_secret(consul: &ConsulOpts, plan: &NodePlan, path: &Path) -> bool {
    (path == consul.config_dir.join(CONFIG_FILE) && plan.config_holds_secret)
        || path == TlsPaths::new(&consul.config_dir).key
        || KEYRINGS.iter().any(|k| path == consul.data_dir.join(k))
}

/// `text` of the file at `path` as `plan` shows it, on disk as in the
/// plan: the config file with every secret value masked (`encrypt`, every
/// `acl.tokens` entry), whatever the plan holds (the file on disk may hold
/// secrets the plan drops); the env file with the values of the lines it
/// keeps from the operator masked (a proxy's credentials, a token); a TLS
/// key or a keyring whole.
fn masked(consul: &ConsulOpts, plan: &NodePlan, path: &Path, text: &str) -> String {
    let _ = plan;
    let whole = || format!("(a secret, {} bytes, not shown)\n", text.len());
    if path == TlsPaths::new(&consul.config_dir).key
        || KEYRINGS.iter().any(|k| path == consul.data_dir.join(k))
    {
        return whole();
    }
    if path == Path::new(super::files::ENV_FILE) {
        return text
            .lines()
            .map(|line| match line.split_once('=') {
                Some((k, _))
                    if !k.starts_with("AUTO_CONSUL_") && !k.trim_start().starts_with('#') =>
                {
                    format!("{k}=(kept from the operator, not shown)\n")
                }
                _ => format!("{line}\n"),
            })
            .collect();
    }
    if path != consul.config_dir.join(CONFIG_FILE) {
        return text.to_string();
    }
    let Ok(mut v) = serde_json::from_str::<Value>(text) else {
        return whole();
    };
    let Some(map) = v.as_object_mut() else {
        return whole();
    };
    const HIDDEN: &str = "(a secret, not shown)";
    if map.contains_key("encrypt") {
        map.insert("encrypt".into(), json!(HIDDEN));
    }
    if let Some(tokens) = map
        .get_mut("acl")
        .and_then(|a| a.get_mut("tokens"))
        .and_then(Value::as_object_mut)
    {
        for t in tokens.values_mut() {
            *t = json!(HIDDEN);
        }
    }
    serde_json::to_string_pretty(&v).expect("JSON serialises") + "\n"
}

/// The `cluster` object of `run --json`: the registry's record as read,
/// or the cluster this node has just bootstrapped in its place.
fn cluster_summary(elected: &Elected, me: &Identity) -> Value {
    let mut out = cluster_json(&elected.view);
    let new = elected.cluster_id.is_some()
        && elected.cluster_id.as_deref() != elected.view.record().map(|r| r.cluster_id.as_str());
    if new && elected.mode == Mode::Bootstrap {
        out["cluster_id"] = json!(elected.cluster_id);
        out["bootstrap_node"] = json!(me.node);
        out["retired"] = json!(false);
        out["record_age_seconds"] = json!(0);
        out["from_record"] = json!(true);
        out["created"] = Value::Null;
    }
    out
}
