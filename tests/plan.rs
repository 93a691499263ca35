//! `run` applies exactly the plan `plan` shows for the same inputs: for a
//! bootstrap node, a server, an agent, nodes with TLS made from
//! `--secrets`, and a reboot with nothing changed, `plan --json` and then
//! `run --json` on the same root, compared file by file (path, mode,
//! owner, contents; secrets masked alike).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::*;
use serde_json::{Value, json};

/// One node of a test cluster: its root, name and address.
struct Node<'a> {
    moto: &'static Moto,
    registry: &'a str,
    root: std::path::PathBuf,
    name: String,
    ip: String,
}

impl Node<'_> {
    fn cmd(&self, command: &str, extra: &[&str]) -> std::process::Command {
        let mut c = node_cmd(
            self.moto,
            command,
            self.registry,
            &self.root,
            &self.name,
            &self.ip,
        );
        c.args(["--servers", "2"]).args(extra);
        c
    }

    /// `plan --json`, then `run --json`: both, once the run's files were
    /// checked against the plan.
    fn plan_then_run(&self, extra: &[&str]) -> (Value, Value) {
        let before = snapshot(&self.root);
        let plan = ok_json(&output(&mut self.cmd("plan", extra)));
        assert_eq!(snapshot(&self.root), before, "plan wrote under the root");
        let run = ok_json(&output(&mut self.cmd("run", extra)));
        same(&plan, &run);
        (plan, run)
    }
}

/// Every file under `root` with its contents.
fn snapshot(root: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    files_under(root)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(root.join(&p)).unwrap();
            (p, bytes)
        })
        .collect()
}

/// Consul's config as `plan` shows it: every secret value masked.
fn mask_config(text: &str) -> String {
    let mut v: Value = serde_json::from_str(text).unwrap();
    const HIDDEN: &str = "(a secret, not shown)";
    if v.get("encrypt").is_some() {
        v["encrypt"] = json!(HIDDEN);
    }
    if let Some(tokens) = v["acl"]["tokens"].as_object_mut() {
        for t in tokens.values_mut() {
            *t = json!(HIDDEN);
        }
    }
    serde_json::to_string_pretty(&v).unwrap() + "\n"
}

/// Asserts the run wrote what the plan shows: the same decision, the same
/// files in the same order, each file and record on disk with the plan's
/// mode, owner and contents.
fn same(plan: &Value, run: &Value) {
    for key in [
        "mode",
        "retry_join",
        "files",
        "consul_type",
        "node",
        "address",
    ] {
        assert_eq!(plan[key], run[key], "{key}: plan {plan} / run {run}");
    }
    let p = &plan["plan"];
    let entries: Vec<&Value> = p["files"]
        .as_array()
        .unwrap()
        .iter()
        .chain(p["records"].as_array().unwrap())
        .collect();
    assert!(entries.len() >= 8, "{p}");
    for e in &entries {
        let path = Path::new(e["path"].as_str().unwrap());
        let meta =
            std::fs::metadata(path).unwrap_or_else(|_| panic!("{} not written", path.display()));
        assert_eq!(
            format!("{:04o}", meta.mode() & 0o7777),
            e["mode"].as_str().unwrap(),
            "{}",
            path.display()
        );
        if let Some(owner) = e["owner"].as_array() {
            assert_eq!(
                (meta.uid(), meta.gid()),
                (
                    owner[0].as_u64().unwrap() as u32,
                    owner[1].as_u64().unwrap() as u32
                )
            );
        }
        let disk = std::fs::read_to_string(path).unwrap();
        let shown = e["contents"].as_str().unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        if name == "state.json" {
            // The claim run makes (its id, and a new cluster's id) cannot
            // be known before it is made: the rest is the plan's.
            let (mut a, mut b): (Value, Value) = (
                serde_json::from_str(shown).unwrap(),
                serde_json::from_str(&disk).unwrap(),
            );
            for k in ["claim_id", "cluster_id", "slot"] {
                if a[k].is_null() {
                    a[k] = Value::Null;
                    b[k] = Value::Null;
                }
            }
            assert_eq!(a, b, "{}", path.display());
        } else if name == "server.pem" && e["status"] != "unchanged" {
            // A server certificate is signed when it is needed, by `run`.
            assert!(disk.starts_with("-----BEGIN CERTIFICATE-----"));
        } else if e["secret"] == json!(true) && name.ends_with(".json") {
            assert_eq!(mask_config(&disk), shown, "{}", path.display());
        } else if e["secret"] == json!(true) {
            assert!(shown.starts_with("(a secret"), "{shown}");
        } else {
            assert_eq!(disk, shown, "{}", path.display());
        }
    }
    // Nothing else was written.
    let planned: Vec<&str> = entries
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    for changed in run["changed"].as_array().unwrap() {
        assert!(
            planned.contains(&changed.as_str().unwrap()),
            "{changed} was not planned"
        );
    }
}

#[test]
fn run_writes_what_plan_shows_for_a_bootstrap_node_a_server_and_an_agent() {
    let moto = moto();
    let registry = format!("s3://{}/plan/three", bucket(moto));
    let tmp = tempfile::tempdir().unwrap();
    let node = |i: usize| Node {
        moto,
        registry: &registry,
        root: tmp.path().join(format!("n{i}")),
        name: format!("pl-{i}"),
        ip: format!("10.61.0.{}", i + 1),
    };
    let (plan, run) = node(0).plan_then_run(&[]);
    assert_eq!(run["mode"], "bootstrap");
    // Every file is new on a fresh node, none with a diff.
    for f in plan["plan"]["files"].as_array().unwrap() {
        assert_eq!(f["status"], "new", "{f}");
    }
    assert_eq!(
        plan["plan"]["units"]["enable_now"],
        json!([]),
        "under --root nothing is started"
    );
    let (_, run) = node(1).plan_then_run(&[]);
    assert_eq!(run["mode"], "server");
    let (_, run) = node(2).plan_then_run(&[]);
    assert_eq!(run["mode"], "agent");
}

#[test]
fn run_writes_what_plan_shows_with_tls_from_secrets() {
    let moto = moto();
    let registry = format!("s3://{}/plan/tls", bucket(moto));
    let tmp = tempfile::tempdir().unwrap();
    let secrets = format!("file://{}", tmp.path().join("secrets").display());
    std::fs::create_dir_all(tmp.path().join("secrets")).unwrap();
    let node = |i: usize| Node {
        moto,
        registry: &registry,
        root: tmp.path().join(format!("n{i}")),
        name: format!("pt-{i}"),
        ip: format!("10.62.0.{}", i + 1),
    };
    let flags = ["--secrets", secrets.as_str()];
    // A genesis's secrets do not exist before `run` makes them: `plan`
    // says so, and makes none.
    let genesis = ok_json(&output(&mut node(0).cmd("plan", &flags)));
    assert_eq!(genesis["plan"]["secrets_made_at_genesis"], json!(true));
    assert!(
        files_under(&tmp.path().join("secrets")).is_empty(),
        "plan made a secret"
    );
    ok_json(&output(&mut node(0).cmd("run", &flags)));
    // A server and an agent of the cluster: plan reads the secrets, shows
    // them masked, and run writes the same.
    let (plan, _) = node(1).plan_then_run(&flags);
    let config = plan["plan"]["files"][0].clone();
    assert_eq!(config["secret"], json!(true), "{config}");
    let shown = config["contents"].as_str().unwrap();
    assert!(
        shown.contains("(a secret, not shown)") && !shown.contains("==\""),
        "{shown}"
    );
    let key = plan["plan"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("server-key.pem"))
        .expect("a server key planned");
    assert!(key["contents"].as_str().unwrap().starts_with("(a secret"));
    let (_, run) = node(2).plan_then_run(&flags);
    assert_eq!(run["mode"], "agent");
    // Without --secrets the plan drops them: the diff of the config on
    // disk shows none of its secret values either.
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(node(1).root.join("etc/consul.d/zz-auto-consul.json")).unwrap(),
    )
    .unwrap();
    let out = output(
        auto_consul(moto)
            .args(["plan", "--registry", &registry, "--servers", "2"])
            .args(["--address", "10.62.0.2", "--node", "pt-1", "--root"])
            .arg(&node(1).root),
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("changed file: "), "{text}");
    let key = config["encrypt"].as_str().unwrap();
    assert!(!text.contains(key), "the gossip key shown: {text}");
    for (name, token) in config["acl"]["tokens"].as_object().unwrap() {
        assert!(
            !text.contains(token.as_str().unwrap()),
            "token {name} shown: {text}"
        );
    }
}

#[test]
fn plan_on_an_unchanged_node_says_so_and_shows_the_timers_diff_after_cluster_set() {
    let moto = moto();
    let registry = format!("s3://{}/plan/same", bucket(moto));
    let tmp = tempfile::tempdir().unwrap();
    let n = Node {
        moto,
        registry: &registry,
        root: tmp.path().join("n0"),
        name: "ps-0".into(),
        ip: "10.63.0.1".into(),
    };
    n.plan_then_run(&[]);
    // A reboot with nothing changed: the plan changes nothing, and run
    // rewrites nothing.
    let (plan, run) = n.plan_then_run(&[]);
    assert_eq!(plan["plan"]["nothing_changes"], json!(true), "{plan}");
    assert_eq!(run["changed"], json!([]));
    let text = || {
        let out = output(
            auto_consul(moto)
                .args(["plan", "--registry", &registry, "--servers", "2"])
                .args(["--address", &n.ip, "--node", &n.name, "--root"])
                .arg(&n.root),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let shown = text();
    assert!(shown.contains("nothing would change"), "{shown}");
    assert!(shown.contains("unchanged file: "), "{shown}");

    ok_json(&output(auto_consul(moto).args([
        "cluster",
        "set",
        "--json",
        "--registry",
        &registry,
        "--expiry",
        "60",
    ])));
    let plan = ok_json(&output(&mut n.cmd("plan", &[])));
    let changed: Vec<&Value> = plan["plan"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["status"] != "unchanged")
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert!(
        changed[0]["path"]
            .as_str()
            .unwrap()
            .ends_with("auto-consul-heartbeat.timer")
    );
    let diff = changed[0]["diff"].as_str().unwrap();
    assert!(
        diff.contains("-OnUnitActiveSec=40s") && diff.contains("+OnUnitActiveSec=20s"),
        "{diff}"
    );
    assert_eq!(plan["plan"]["nothing_changes"], json!(false));
    let shown = text();
    assert!(!shown.contains("nothing would change"), "{shown}");
    assert!(
        shown.contains("changed file: ") && shown.contains("+OnUnitActiveSec=20s"),
        "{shown}"
    );
}
