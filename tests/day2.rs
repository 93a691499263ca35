//! The Day-2 rules of DESIGN.md, tried as an operator would, with the real
//! binary against moto_server and the directory store: skewed clocks (the
//! binary run under libfaketime), a silent registry and the witness rule,
//! the cluster record's settings, interrupted bootstraps, copied state
//! files and the operator's env file.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `run --json` for one node, with its instance id and extra arguments.
fn run_with(
    moto: &Moto,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
    servers: u32,
    extra: &[&str],
) -> Command {
    let mut cmd = run_cmd(moto, registry, root, node, ip, servers);
    cmd.args(extra);
    cmd
}

fn cluster_id(moto: &Moto, bucket: &str, prefix: &str) -> String {
    let v: Value = serde_json::from_str(&get(moto, bucket, &format!("{prefix}/cluster"))).unwrap();
    v["cluster_id"].as_str().unwrap().to_string()
}

fn slot_of(moto: &Moto, bucket: &str, prefix: &str, i: u32) -> Value {
    serde_json::from_str(&get(moto, bucket, &format!("{prefix}/slots/server-{i}"))).unwrap()
}

fn config(root: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root.join("etc/consul.d/zz-auto-consul.json")).unwrap(),
    )
    .unwrap()
}

fn heartbeat(
    moto: &Moto,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
    agent: &FakeAgent,
) -> Command {
    heartbeat_cmd(moto, registry, root, node, ip, &agent.addr())
}

fn agent_body(node: &str, ip: &str) -> String {
    format!(r#"{{"node":"{node}","address":"{ip}","mode":"agent","version":"0"}}"#)
}

/// A registry holding one live server (bootstrapped by `boot`) and three
/// live agents' heartbeats; returns the agents' keys (relative).
fn live_registry(
    moto: &Moto,
    registry: &str,
    root: &Path,
    write: impl Fn(&str, &str),
) -> Vec<String> {
    // Agents expire after 600 s here: a clock an hour off, were it used,
    // would find every live agent's key expired.
    let boot = ok_json(&output(
        run_cmd(moto, registry, &root.join("boot"), "boot", "10.20.0.1", 1)
            .args(["--agent-expiry", "600"]),
    ));
    assert_eq!(mode(&boot), "bootstrap");
    assert_eq!(boot["cluster"]["agent_expiry"], 600);
    (1..=3)
        .map(|i| {
            let node = format!("live-{i}");
            let key = format!("agents/{}-{node}", stamp(2));
            write(&key, &agent_body(&node, &format!("10.20.1.{i}")));
            key
        })
        .collect()
}

/// Skewed nodes (±1 h): their heartbeat and purge delete no live key,
/// their boot takes no live slot and starts no cluster, and the others
/// count their heartbeat as live.
fn skewed_nodes_change_nothing(
    moto: &Moto,
    registry: &str,
    cluster: &str,
    keys_now: impl Fn() -> Vec<String>,
    tmp: &Path,
) {
    let before_cluster = keys_now();
    for (i, offset) in ["+1h", "-1h", "+10m"].iter().enumerate() {
        let node = format!("skewed-{i}");
        let ip = format!("10.20.2.{}", i + 1);
        let root = tmp.join(&node);
        // Its boot: one server is wanted and slot 0 is live.
        let v = ok_json(&output(skewed(
            &mut run_cmd(moto, registry, &root, &node, &ip, 1),
            offset,
        )));
        assert_eq!(mode(&v), "agent", "clock {offset}: {v}");
        assert_eq!(v["cluster"]["cluster_id"], cluster, "clock {offset}: {v}");
        // Its heartbeat and a purge of its own: nothing live is deleted.
        let agent = FakeAgent::start(&node, false, &[]);
        let hb = ok_json(&output(skewed(
            &mut heartbeat(moto, registry, &root, &node, &ip, &agent),
            offset,
        )));
        assert_eq!(hb["purged"], 0, "clock {offset} purged live keys: {hb}");
        let written = hb["keys"][0].as_str().unwrap().to_string();
        let skew = key_skew_seconds(&written);
        let want: i64 = match *offset {
            "+1h" => 3600,
            "-1h" => -3600,
            _ => 600,
        };
        assert!(
            (skew - want).abs() < 120,
            "libfaketime did not shift the clock: key {written} is {skew}s off, {want}s wanted"
        );
        // The purger (the bootstrap node, slot 0), its purge due, on the
        // same skewed clock: its own keys aside, it deletes nothing live.
        let boot_root = tmp.join("boot");
        let _ = std::fs::remove_file(boot_root.join("var/lib/auto-consul/purged-at"));
        let server = FakeAgent::start("boot", true, &["--address", "10.20.0.1"]);
        let hb = ok_json(&output(skewed(
            &mut heartbeat(moto, registry, &boot_root, "boot", "10.20.0.1", &server),
            offset,
        )));
        assert_eq!(hb["slot"]["status"], "renewed", "clock {offset}: {hb}");
        for k in &before_cluster {
            assert!(
                keys_now().contains(k),
                "clock {offset}: the purger deleted {k}"
            );
        }
        let purge = ok_json(&output(skewed(
            auto_consul(moto).args(["purge", "--json", "--registry", registry]),
            offset,
        )));
        assert_eq!(purge["deleted"], 0, "clock {offset}: {purge}");
        for k in &before_cluster {
            assert!(keys_now().contains(k), "clock {offset}: {k} was deleted");
        }
        // A node with a right clock counts the skewed node's heartbeat.
        let members = ok_json(&output(auto_consul(moto).args([
            "members",
            "--json",
            "--registry",
            registry,
        ])));
        let agents: Vec<&str> = members["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["node"].as_str().unwrap())
            .collect();
        assert!(
            agents.contains(&node.as_str()),
            "clock {offset}: {agents:?}"
        );
        assert_eq!(members["servers"][0]["node"], "boot", "{members}");
    }
}

#[test]
fn skewed_clocks_never_purge_take_or_bootstrap_on_s3() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "d2/skew";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    live_registry(moto, &registry, tmp.path(), |k, b| {
        put(moto, &bucket, &format!("{p}/{k}"), b)
    });
    let id = cluster_id(moto, &bucket, p);
    let slot = slot_of(moto, &bucket, p, 0);
    skewed_nodes_change_nothing(
        moto,
        &registry,
        &id,
        || {
            keys(moto, &bucket, &format!("{p}/"))
                .into_iter()
                .map(|k| k[p.len() + 1..].to_string())
                .filter(|k| k.starts_with("agents/") && k.contains("live-"))
                .collect()
        },
        tmp.path(),
    );
    assert_eq!(
        cluster_id(moto, &bucket, p),
        id,
        "a skewed node started a cluster"
    );
    assert_eq!(slot_of(moto, &bucket, p, 0)["node"], slot["node"]);
    assert_eq!(slot_of(moto, &bucket, p, 0)["claim_id"], slot["claim_id"]);
}

#[test]
fn skewed_clocks_never_purge_take_or_bootstrap_on_a_directory() {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let reg = tmp.path().join("registry");
    std::fs::create_dir_all(reg.join("agents")).unwrap();
    let registry = format!("file://{}", reg.display());
    live_registry(moto, &registry, tmp.path(), |k, b| {
        std::fs::write(reg.join(k), b).unwrap()
    });
    let record = std::fs::read_to_string(reg.join("cluster")).unwrap();
    let slot = std::fs::read_to_string(reg.join("slots/server-0")).unwrap();
    let id: Value = serde_json::from_str(&record).unwrap();
    skewed_nodes_change_nothing(
        moto,
        &registry,
        id["cluster_id"].as_str().unwrap(),
        || {
            let mut out: Vec<String> = std::fs::read_dir(reg.join("agents"))
                .unwrap()
                .flatten()
                .map(|e| format!("agents/{}", e.file_name().to_string_lossy()))
                .filter(|k| k.contains("live-"))
                .collect();
            out.sort();
            out
        },
        tmp.path(),
    );
    assert_eq!(
        std::fs::read_to_string(reg.join("cluster")).unwrap(),
        record
    );
    let now: Value =
        serde_json::from_str(&std::fs::read_to_string(reg.join("slots/server-0")).unwrap())
            .unwrap();
    let then: Value = serde_json::from_str(&slot).unwrap();
    assert_eq!(now["claim_id"], then["claim_id"]);
}

#[test]
fn a_silent_registry_gets_no_new_cluster_until_ec2_says_its_servers_are_gone() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "d2/witness";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let ids = run_instances(moto, 2);
    for (i, (node, want)) in [("w-a", "bootstrap"), ("w-b", "server")].iter().enumerate() {
        let v = ok_json(&output(&mut run_with(
            moto,
            &registry,
            &tmp.path().join(node),
            node,
            &format!("10.21.0.{}", i + 1),
            2,
            &["--instance-id", &ids[i]],
        )));
        assert_eq!(mode(&v), *want);
    }
    let old = cluster_id(moto, &bucket, p);
    // Silent for three expiries (120 s): the servers still run in EC2.
    assert!(moto.age(&bucket, &format!("{p}/"), 3 * 120 + 5) >= 3);
    let fresh = |i: u32, extra: &[&str]| {
        let mut cmd = run_with(
            moto,
            &registry,
            &tmp.path().join(format!("n{i}")),
            &format!("new-{i}"),
            &format!("10.21.1.{i}"),
            1,
            &["--witness-wait", "1"],
        );
        cmd.args(extra);
        cmd
    };
    let out = output(&mut fresh(0, &[]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    for needle in [
        old.as_str(),
        "w-a",
        "w-b",
        &ids[0],
        "is running",
        &format!("auto-consul cluster retire {old}"),
        &format!("--replace-cluster {old}"),
    ] {
        assert!(
            last.contains(needle),
            "{needle:?} missing from the error: {last}"
        );
    }
    assert!(out.stdout.is_empty(), "nothing decided, nothing printed");
    assert_eq!(
        cluster_id(moto, &bucket, p),
        old,
        "a silent registry got a new cluster"
    );
    assert_eq!(slot_of(moto, &bucket, p, 0)["node"], "w-a");
    // `plan` says the same, without waiting, and writes nothing.
    let plan = output(
        auto_consul(moto)
            .args([
                "plan",
                "--registry",
                &registry,
                "--address",
                "10.21.1.9",
                "--node",
                "planner",
            ])
            .arg("--root")
            .arg(tmp.path().join("planner")),
    );
    assert_eq!(plan.status.code(), Some(1), "{}", stderr(&plan));
    assert!(stderr(&plan).contains("not confirmed gone"));

    // One server terminated: the other still stops the boot, and only it
    // is named.
    terminate(moto, &[&ids[0]]);
    let out = output(&mut fresh(1, &[]));
    let last = stderr(&out)
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert_eq!(out.status.code(), Some(1), "{last}");
    assert!(last.contains("w-b") && !last.contains("w-a ("), "{last}");

    // Both gone: six nodes race; exactly one new cluster, with the warning.
    terminate(moto, &[&ids[1]]);
    // (The new cluster restores nothing: its agents need not wait.)
    let racers: Vec<_> = (10..16)
        .map(|i| {
            fresh(i, &["--no-restore"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = racers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let modes: Vec<String> = outs.iter().map(|o| mode(&ok_json(o))).collect();
    assert_eq!(
        modes.iter().filter(|m| *m == "bootstrap").count(),
        1,
        "{modes:?}"
    );
    assert_eq!(
        modes.iter().filter(|m| *m == "agent").count(),
        5,
        "{modes:?}"
    );
    let warned: Vec<_> = outs
        .iter()
        .filter(|o| stderr(o).contains("NEW, EMPTY cluster"))
        .collect();
    assert_eq!(warned.len(), 1, "the new cluster must be announced once");
    let new = cluster_id(moto, &bucket, p);
    assert_ne!(new, old);
    let boot = outs.iter().find(|o| mode(&json(o)) == "bootstrap").unwrap();
    assert_eq!(json(boot)["cluster_id"], new.as_str());
    // The new cluster is seeded by the racers' flags (--servers 1), not by
    // the record it replaced (2 servers).
    assert_eq!(json(boot)["cluster"]["cluster_id"], new.as_str());
    assert_eq!(json(boot)["cluster"]["servers"], 1);
    let record: Value = serde_json::from_str(&get(moto, &bucket, &format!("{p}/cluster"))).unwrap();
    assert_eq!(record["servers"], 1);
    assert_eq!(record["expiry"], 120);
}

#[test]
fn a_released_slot_or_an_operator_retire_lets_a_new_cluster_form_on_a_directory() {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let reg = tmp.path().join("registry");
    std::fs::create_dir_all(&reg).unwrap();
    let registry = format!("file://{}", reg.display());
    assert_eq!(
        mode(&run_node(
            moto,
            &registry,
            &tmp.path().join("a"),
            "dir-a",
            "10.22.0.1",
            1
        )),
        "bootstrap"
    );
    let old: Value =
        serde_json::from_str(&std::fs::read_to_string(reg.join("cluster")).unwrap()).unwrap();
    let old = old["cluster_id"].as_str().unwrap().to_string();
    // Retiring a cluster whose server is live is refused.
    let early =
        output(auto_consul(moto).args(["cluster", "retire", "--registry", &registry, &old]));
    assert_eq!(early.status.code(), Some(2), "{}", stderr(&early));
    assert!(
        stderr(&early).contains("live servers"),
        "{}",
        stderr(&early)
    );
    // Silent for an hour: every mtime an hour back.
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    for f in files_under(&reg) {
        let f = std::fs::File::options()
            .write(true)
            .open(reg.join(f))
            .unwrap();
        f.set_modified(hour_ago).unwrap();
    }
    let boot = |name: &str, extra: &[&str]| {
        output(&mut run_with(
            moto,
            &registry,
            &tmp.path().join(name),
            name,
            "10.22.0.9",
            1,
            &[&["--witness-wait", "0"], extra].concat(),
        ))
    };
    let out = boot("dir-b", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("dir-a (10.22.0.1, slot 0: no instance id"),
        "{}",
        stderr(&out)
    );
    // A flag naming another cluster does not open the way.
    let out = boot("dir-b", &["--replace-cluster", "not-this-one"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // The operator retires the cluster: the next boot replaces it, once.
    let retire =
        output(auto_consul(moto).args(["cluster", "retire", "--registry", &registry, "wrong-id"]));
    assert_eq!(retire.status.code(), Some(2), "{}", stderr(&retire));
    ok_json(&output(auto_consul(moto).args([
        "cluster",
        "retire",
        "--json",
        "--registry",
        &registry,
        &old,
    ])));
    // (Restoring nothing: its agents need not wait.)
    let v = ok_json(&boot("dir-b", &["--no-restore"]));
    assert_eq!(mode(&v), "bootstrap");
    assert_ne!(v["cluster_id"], old.as_str());
    let second = v["cluster_id"].as_str().unwrap().to_string();
    assert_eq!(mode(&ok_json(&boot("dir-c", &[]))), "agent");

    // dir-b leaves (its slot released), then the registry goes silent: a
    // released slot confirms its holder gone, so a new cluster forms.
    ok_json(&output(
        auto_consul(moto)
            .args([
                "leave",
                "--json",
                "--registry",
                &registry,
                "--address",
                "10.22.0.9",
                "--node",
                "dir-b",
            ])
            .arg("--root")
            .arg(tmp.path().join("dir-b")),
    ));
    for f in files_under(&reg) {
        let f = std::fs::File::options()
            .write(true)
            .open(reg.join(f))
            .unwrap();
        f.set_modified(hour_ago).unwrap();
    }
    let v = ok_json(&boot("dir-d", &[]));
    assert_eq!(mode(&v), "bootstrap");
    assert_ne!(v["cluster_id"], second.as_str());
}

#[test]
fn a_joiner_with_other_servers_and_expiry_changes_nothing_and_cluster_set_does() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "d2/settings";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let node = |name: &str, ip: &str, servers: u32, expiry: &str| {
        output(&mut run_with(
            moto,
            &registry,
            &tmp.path().join(name),
            name,
            ip,
            servers,
            &["--expiry", expiry],
        ))
    };
    let modes: Vec<String> = [
        ("st-a", "10.23.0.1"),
        ("st-b", "10.23.0.2"),
        ("st-c", "10.23.0.3"),
    ]
    .iter()
    .map(|(n, ip)| mode(&ok_json(&node(n, ip, 3, "120"))))
    .collect();
    assert_eq!(modes, ["bootstrap", "server", "server"]);
    let id = cluster_id(moto, &bucket, p);
    // Seven seconds later (on the store's clock), a node with --servers 5
    // --expiry 5 boots.
    moto.age(&bucket, &format!("{p}/"), 7);
    let out = node("st-x", "10.23.0.9", 5, "5");
    let v = ok_json(&out);
    assert_eq!(mode(&v), "agent", "{}", stderr(&out));
    assert_eq!(v["cluster"]["cluster_id"], id.as_str());
    assert_eq!(v["cluster"]["servers"], 3);
    assert_eq!(v["cluster"]["expiry"], 120);
    let err = stderr(&out);
    assert!(
        err.contains("--servers 5") && err.contains("which has 3 and rules"),
        "{err}"
    );
    // The record may have been changed on purpose: the hint's first fix is
    // the node's seed, not undoing `cluster set`.
    let expiry_line = err
        .lines()
        .find(|l| l.contains("--expiry 5"))
        .unwrap_or_else(|| panic!("no --expiry warning: {err}"));
    for needle in [
        "which has 120s",
        "set AUTO_CONSUL_EXPIRY=120 in /etc/auto-consul/auto-consul.env or the user data",
        "`auto-consul cluster set --expiry 5`",
    ] {
        assert!(expiry_line.contains(needle), "{needle:?}: {expiry_line}");
    }
    let slots: Vec<String> = keys(moto, &bucket, &format!("{p}/slots/"));
    assert_eq!(slots.len(), 3, "{slots:?}");
    assert_eq!(cluster_id(moto, &bucket, p), id);
    // The timer it installed follows the record's agent expiry (an agent:
    // every 7200/3 s), not its own flag.
    let timer = std::fs::read_to_string(
        tmp.path()
            .join("st-x/etc/systemd/system/auto-consul-heartbeat.timer"),
    )
    .unwrap();
    assert!(timer.contains("OnUnitActiveSec=2400s"), "{timer}");

    // `members` shows the settings; `cluster set` changes them under If-Match.
    let members = ok_json(&output(auto_consul(moto).args([
        "members",
        "--json",
        "--registry",
        &registry,
    ])));
    assert_eq!(members["cluster"]["servers"], 3);
    let none = output(auto_consul(moto).args(["cluster", "set", "--registry", &registry]));
    assert_eq!(none.status.code(), Some(2), "{}", stderr(&none));
    let set = ok_json(&output(auto_consul(moto).args([
        "cluster",
        "set",
        "--json",
        "--registry",
        &registry,
        "--servers",
        "5",
    ])));
    assert_eq!(set["servers"], 5);
    assert_eq!(set["expiry"], 120);
    assert_eq!(set["cluster_id"], id.as_str());
    // A node with the old flag now becomes the fourth server.
    let out = node("st-y", "10.23.0.10", 3, "120");
    let v = ok_json(&out);
    assert_eq!(mode(&v), "server", "{}", stderr(&out));
    assert!(v["slot"].as_u64().unwrap() >= 3);
    assert!(
        stderr(&out).contains("which has 5 and rules"),
        "{}",
        stderr(&out)
    );
    let show = ok_json(&output(auto_consul(moto).args([
        "cluster",
        "show",
        "--json",
        "--registry",
        &registry,
    ])));
    assert_eq!(show["cluster"]["servers"], 5);
    assert_eq!(show["slots"].as_array().unwrap().len(), 5);

    // A lower expiry reaches every node's timer at its next heartbeat.
    ok_json(&output(auto_consul(moto).args([
        "cluster",
        "set",
        "--json",
        "--registry",
        &registry,
        "--expiry",
        "60",
    ])));
    // (A server's heartbeat reads the record; an agent's makes one write
    // and nothing else, and follows a new expiry at its next boot.)
    let agent = FakeAgent::start("st-a", true, &["--address", "10.23.0.1"]);
    let hb = ok_json(&output(&mut heartbeat(
        moto,
        &registry,
        &tmp.path().join("st-a"),
        "st-a",
        "10.23.0.1",
        &agent,
    )));
    assert_eq!(hb["timer_changed"], true, "{hb}");
    assert_eq!(hb["settings"]["expiry"], 60);
    let timer = std::fs::read_to_string(
        tmp.path()
            .join("st-a/etc/systemd/system/auto-consul-heartbeat.timer"),
    )
    .unwrap();
    assert!(timer.contains("OnUnitActiveSec=20s"), "{timer}");
}

#[test]
fn a_bootstrap_killed_between_slot_0_and_the_record_is_finished_by_its_node() {
    // A moto of its own: its faults apply to every request it serves.
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let tmp = tempfile::tempdir().unwrap();
    // Kill points: while the cluster record is being written (slot 0 is
    // taken), and while slot 0 is being written (the write lands after the
    // kill).
    for (case, (matcher, stall)) in [("/cluster?", 30.0), ("/slots/server-0?", 2.0)]
        .iter()
        .enumerate()
    {
        let p = format!("d2/kill{case}");
        let registry = format!("s3://{bucket}/{p}");
        let root = |n: &str| tmp.path().join(format!("{case}-{n}"));
        moto.faults(serde_json::json!([{ "method": "PUT", "match": matcher, "stall": stall }]));
        let mut first = run_cmd(&moto, &registry, &root("a"), "kb-a", "10.24.0.1", 2)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while moto.fired() != [1] {
            assert!(
                std::time::Instant::now() < deadline,
                "the stall never fired"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        first.kill().unwrap();
        first.wait().unwrap();
        moto.faults(serde_json::json!([]));
        // Let a write stalled past the kill land.
        std::thread::sleep(Duration::from_secs_f64(f64::min(*stall, 3.0) + 0.5));
        assert!(
            keys(&moto, &bucket, &format!("{p}/cluster")).is_empty(),
            "case {case}: the record was written before the kill"
        );
        // Another node boots while the bootstrap is unfinished, then the
        // killed node runs again, then a third.
        let b = run_node(&moto, &registry, &root("b"), "kb-b", "10.24.0.2", 2);
        let a = run_node(&moto, &registry, &root("a"), "kb-a", "10.24.0.1", 2);
        let c = run_node(&moto, &registry, &root("c"), "kb-c", "10.24.0.3", 2);
        let modes = [mode(&a), mode(&b), mode(&c)];
        assert_eq!(modes, ["bootstrap", "server", "agent"], "case {case}");
        let bootstrapping: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .filter(|n| config(&root(n))["bootstrap"] == true)
            .collect();
        assert_eq!(bootstrapping, ["a"], "case {case}");
        let record = cluster_id(&moto, &bucket, &p);
        assert_eq!(
            slot_of(&moto, &bucket, &p, 0)["cluster_id"],
            record.as_str()
        );
        assert_eq!(a["cluster_id"], record.as_str());
        assert_eq!(b["cluster_id"], record.as_str(), "case {case}");
    }
}

#[test]
fn a_state_file_copied_from_another_instance_claims_nothing() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "d2/copied";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let (ra, rb) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = ok_json(&output(&mut run_with(
        moto,
        &registry,
        &ra,
        "cp-a",
        "10.25.0.1",
        1,
        &["--instance-id", "i-0aaaaaaaaaaaaaaaa"],
    )));
    assert_eq!(mode(&a), "bootstrap");
    let slot_before = slot_of(moto, &bucket, p, 0);
    let copy = || {
        let state = "var/lib/auto-consul/state.json";
        std::fs::create_dir_all(rb.join("var/lib/auto-consul")).unwrap();
        std::fs::copy(ra.join(state), rb.join(state)).unwrap();
    };
    copy();
    let out = output(&mut run_with(
        moto,
        &registry,
        &rb,
        "cp-b",
        "10.25.0.2",
        1,
        &["--instance-id", "i-0bbbbbbbbbbbbbbbb"],
    ));
    let v = ok_json(&out);
    assert_eq!(mode(&v), "agent");
    assert_eq!(config(&rb)["bootstrap"], Value::Bool(false));
    assert!(
        stderr(&out).contains("ignoring state file"),
        "{}",
        stderr(&out)
    );
    // Same node name, another instance (an image with a fixed --node): still
    // ignored.
    copy();
    let out = output(&mut run_with(
        moto,
        &registry,
        &rb,
        "cp-a",
        "10.25.0.2",
        1,
        &["--instance-id", "i-0bbbbbbbbbbbbbbbb"],
    ));
    assert!(
        stderr(&out).contains("ignoring state file"),
        "{}",
        stderr(&out)
    );
    // Its heartbeat, even from a server agent, renews no slot.
    copy();
    let agent = FakeAgent::start("cp-b", true, &["--address", "10.25.0.2"]);
    let mut hb = heartbeat(moto, &registry, &rb, "cp-b", "10.25.0.2", &agent);
    hb.args(["--instance-id", "i-0bbbbbbbbbbbbbbbb"]);
    let hb = output(&mut hb);
    assert_eq!(ok_json(&hb)["slot"], Value::Null, "{}", stderr(&hb));
    let slot_after = slot_of(moto, &bucket, p, 0);
    assert_eq!(slot_after["node"], "cp-a");
    assert_eq!(slot_after["sequence"], slot_before["sequence"]);
}

#[test]
fn the_operators_env_file_lines_survive_run_and_reach_the_heartbeat_unit() {
    let moto = moto();
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/d2/env");
    let tmp = tempfile::tempdir().unwrap();
    let env = tmp.path().join("etc/auto-consul/auto-consul.env");
    std::fs::create_dir_all(env.parent().unwrap()).unwrap();
    let operator = "# set by our user data\nAWS_REGION=eu-west-1\nHTTPS_PROXY=http://proxy.internal:3128\nAUTO_CONSUL_SERVERS=1\n";
    std::fs::write(&env, operator).unwrap();
    let first = run_node(moto, &registry, tmp.path(), "env-a", "10.26.0.1", 1);
    let text = std::fs::read_to_string(&env).unwrap();
    for line in operator.lines() {
        assert!(text.lines().any(|l| l == line), "{line:?} lost:\n{text}");
    }
    assert!(text.contains("AUTO_CONSUL_NODE='env-a'"), "{text}");
    assert!(
        first["changed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().ends_with("auto-consul.env"))
    );
    // A second run changes nothing, and the lines are still there.
    let second = run_node(moto, &registry, tmp.path(), "env-a", "10.26.0.1", 1);
    assert!(second["changed"].as_array().unwrap().is_empty(), "{second}");
    assert_eq!(std::fs::read_to_string(&env).unwrap(), text);
    let unit = std::fs::read_to_string(
        tmp.path()
            .join("etc/systemd/system/auto-consul-heartbeat.service"),
    )
    .unwrap();
    assert!(
        unit.contains("EnvironmentFile=/etc/auto-consul/auto-consul.env"),
        "{unit}"
    );
}

#[test]
fn a_heartbeat_denied_agent_self_by_acls_still_publishes_and_renews() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "d2/acl";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let (rs, ra) = (tmp.path().join("s"), tmp.path().join("a"));
    assert_eq!(
        mode(&run_node(moto, &registry, &rs, "acl-s", "10.27.0.1", 1)),
        "bootstrap"
    );
    assert_eq!(
        mode(&run_node(moto, &registry, &ra, "acl-a", "10.27.0.2", 1)),
        "agent"
    );
    // Default-deny ACLs, and a token without agent:read (none at all here):
    // /v1/agent/self answers 403; the status endpoints answer.
    let server = FakeAgent::start(
        "acl-s",
        true,
        &["--token", "only-for-agent-read", "--address", "10.27.0.1"],
    );
    let out = output(&mut heartbeat(
        moto,
        &registry,
        &rs,
        "acl-s",
        "10.27.0.1",
        &server,
    ));
    let v = ok_json(&out);
    assert_eq!(v["agent_self"], false);
    assert_eq!(v["mode"], "server", "{}", stderr(&out));
    assert_eq!(v["slot"]["status"], "renewed");
    assert_eq!(v["leader"], "10.27.0.1:8300");
    assert!(
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k.as_str().unwrap().starts_with("servers/"))
    );
    let agent = FakeAgent::start(
        "acl-a",
        false,
        &[
            "--token",
            "only-for-agent-read",
            "--address",
            "10.27.0.2",
            "--leader",
            "10.27.0.1:8300",
            "--peers",
            "10.27.0.1:8300",
        ],
    );
    let v = ok_json(&output(&mut heartbeat(
        moto,
        &registry,
        &ra,
        "acl-a",
        "10.27.0.2",
        &agent,
    )));
    assert_eq!(v["mode"], "agent");
    assert_eq!(v["keys"].as_array().unwrap().len(), 1);
    // A server with no state file is known by its place among the peers.
    let bare = tmp.path().join("bare");
    let v = ok_json(&output(&mut heartbeat(
        moto,
        &registry,
        &bare,
        "acl-s",
        "10.27.0.1",
        &server,
    )));
    assert_eq!(v["mode"], "server");
}
