//! Replacement keeps the cluster whole: `--role server|agent|auto`, the
//! user data path through `install --now`, and a heartbeat that rides out
//! a Consul restart. The real binary against moto_server.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn role_run(moto: &Moto, registry: &str, root: &Path, node: &str, ip: &str, role: &str) -> Command {
    let mut cmd = run_cmd(moto, registry, root, node, ip, 3);
    cmd.args(["--role", role]);
    cmd
}

fn slot_node(moto: &Moto, bucket: &str, p: &str, i: u32) -> Value {
    let v: Value =
        serde_json::from_str(&get(moto, bucket, &format!("{p}/slots/server-{i}"))).unwrap();
    v["node"].clone()
}

#[test]
fn a_server_replacement_waits_for_the_dead_servers_slot_and_never_settles_as_an_agent() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "roles/replace";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let modes: Vec<String> = ["r-a", "r-b", "r-c"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            mode(&ok_json(&output(&mut role_run(
                moto,
                &registry,
                &tmp.path().join(n),
                n,
                &format!("10.30.0.{}", i + 1),
                "server",
            ))))
        })
        .collect();
    assert_eq!(modes, ["bootstrap", "server", "server"]);
    let dead = (0..3)
        .find(|i| slot_node(moto, &bucket, p, *i) == "r-c")
        .unwrap();

    // r-c's instance dies; its replacement boots while the slot is live.
    let started = Instant::now();
    let replacement = role_run(
        moto,
        &registry,
        &tmp.path().join("r-d"),
        "r-d",
        "10.30.0.4",
        "server",
    )
    .args(["--role-wait", "60"])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // Still waiting, not settled as an agent.
    assert!(
        !tmp.path()
            .join("r-d/etc/consul.d/zz-auto-consul.json")
            .exists()
    );
    // The dead server's slot expires (one expiry on the store's clock).
    moto.age(&bucket, &format!("{p}/slots/server-{dead}"), 121);
    let out = replacement.wait_with_output().unwrap();
    let v = ok_json(&out);
    assert_eq!(
        mode(&v),
        "server",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(v["slot"], dead);
    assert_eq!(slot_node(moto, &bucket, p, dead), "r-d");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--role server, but all 3 server slots"));
    eprintln!(
        "replacement: a server after {:.1}s, the slot expiring after 3s",
        started.elapsed().as_secs_f64()
    );

    // With every slot live, a server-role node gives up (exit 1, for the
    // boot unit to retry) and writes nothing.
    let out = output(
        role_run(
            moto,
            &registry,
            &tmp.path().join("r-e"),
            "r-e",
            "10.30.0.5",
            "server",
        )
        .args(["--role-wait", "1"]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("gave up after 1s"), "{err}");
    assert!(files_under(&tmp.path().join("r-e")).is_empty());
}

#[test]
fn an_agent_role_never_claims_or_bootstraps() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "roles/agent";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    // An empty registry: it waits for a server, then exits 1; nothing
    // claimed, no cluster started.
    let out = output(
        role_run(
            moto,
            &registry,
            &tmp.path().join("g-a"),
            "g-a",
            "10.31.0.1",
            "agent",
        )
        .args(["--role-wait", "2"]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no live server to join"), "{err}");
    let left: Vec<String> = keys(moto, &bucket, &format!("{p}/"))
        .into_iter()
        .filter(|k| !k.ends_with("cas-probe"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // Once a server is there it joins as an agent, though two slots are free.
    mode(&ok_json(&output(&mut role_run(
        moto,
        &registry,
        &tmp.path().join("g-s"),
        "g-s",
        "10.31.0.9",
        "server",
    ))));
    let v = ok_json(&output(&mut role_run(
        moto,
        &registry,
        &tmp.path().join("g-a"),
        "g-a",
        "10.31.0.1",
        "agent",
    )));
    assert_eq!(mode(&v), "agent");
    assert_eq!(v["retry_join"][0], "10.31.0.9");
    assert_eq!(keys(moto, &bucket, &format!("{p}/slots/")).len(), 1);
}

#[test]
fn an_auto_agent_becomes_a_server_at_its_next_boot_once_a_slot_frees() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "roles/auto";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let root = |n: &str| tmp.path().join(n);
    let boot = |n: &str, ip: &str| run_node(moto, &registry, &root(n), n, ip, 2);
    assert_eq!(mode(&boot("u-a", "10.32.0.1")), "bootstrap");
    assert_eq!(mode(&boot("u-b", "10.32.0.2")), "server");
    assert_eq!(mode(&boot("u-c", "10.32.0.3")), "agent");
    ok_json(&output(
        auto_consul(moto)
            .args([
                "leave",
                "--json",
                "--registry",
                &registry,
                "--address",
                "10.32.0.2",
                "--node",
                "u-b",
            ])
            .arg("--root")
            .arg(root("u-b")),
    ));
    let v = boot("u-c", "10.32.0.3");
    assert_eq!(mode(&v), "server", "an agent decides again at each boot");
    assert_eq!(v["slot"], 1);
}

#[test]
fn install_takes_the_role_and_user_data_starts_the_boot_unit() {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let v = ok_json(&output(
        auto_consul(moto)
            .args([
                "install",
                "--json",
                "--now",
                "--role",
                "server",
                "--registry",
                "s3://bucket/prefix",
            ])
            .arg("--root")
            .arg(tmp.path()),
    ));
    // Under a root other than /, nothing is enabled or started.
    assert_eq!(v["started"], false);
    let env = std::fs::read_to_string(tmp.path().join("etc/auto-consul/auto-consul.env")).unwrap();
    assert!(env.contains("AUTO_CONSUL_ROLE='server'"), "{env}");
    let unit =
        std::fs::read_to_string(tmp.path().join("etc/systemd/system/auto-consul.service")).unwrap();
    assert!(
        unit.contains("Restart=on-failure") && unit.contains("StartLimitIntervalSec=0"),
        "{unit}"
    );
    // The launch-template user data starts that unit; it never runs `run`
    // once by itself.
    let user_data = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("cloud-init/launch-template.yaml"),
    )
    .unwrap();
    let runcmd: Vec<&str> = user_data
        .lines()
        .filter(|l| l.trim_start().starts_with("- [sh"))
        .collect();
    assert_eq!(runcmd.len(), 1, "{runcmd:?}");
    assert!(
        runcmd[0].contains("auto-consul install --now") && !runcmd[0].contains("auto-consul run")
    );
}

#[test]
fn a_heartbeat_rides_out_a_consul_restart() {
    let moto = moto();
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/roles/restart");
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(
        mode(&run_node(
            moto,
            &registry,
            tmp.path(),
            "hb-a",
            "10.33.0.1",
            1
        )),
        "bootstrap"
    );
    // Consul is down when the timer fires, and back two seconds later.
    let port = closed_port();
    let hb = heartbeat_cmd(
        moto,
        &registry,
        tmp.path(),
        "hb-a",
        "10.33.0.1",
        &format!("127.0.0.1:{port}"),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let _agent = FakeAgent::start(
        "hb-a",
        true,
        &["--address", "10.33.0.1", "--port", &port.to_string()],
    );
    let out = hb.wait_with_output().unwrap();
    let v = ok_json(&out);
    assert_eq!(v["slot"]["status"], "renewed");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("trying again"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A client agent that knows no server (Consul answers 500) still
    // counts as running.
    let lonely = FakeAgent::start("hb-b", false, &["--no-servers"]);
    let v = ok_json(&output(&mut heartbeat_cmd(
        moto,
        &registry,
        &tmp.path().join("b"),
        "hb-b",
        "10.33.0.2",
        &lonely.addr(),
    )));
    assert_eq!(v["mode"], "agent");
    assert_eq!(v["leader"], Value::Null);
}

const LIFECYCLE: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";
const SPOT: &str = "/latest/meta-data/spot/instance-action";

#[test]
fn termination_leaves_and_a_reboot_keeps_everything() {
    // A moto of its own: it serves this test's instance metadata.
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let p = "roles/term";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let root = |n: &str| tmp.path().join(n);
    let boot = |n: &str, ip: &str| run_node(&moto, &registry, &root(n), n, ip, 2);
    assert_eq!(mode(&boot("t-a", "10.34.0.1")), "bootstrap");
    assert_eq!(mode(&boot("t-b", "10.34.0.2")), "server");
    // run installs the unit that acts at shutdown.
    let unit =
        std::fs::read_to_string(root("t-b").join("etc/systemd/system/auto-consul-leave.service"))
            .unwrap();
    assert!(
        unit.contains("leave --if-terminating")
            && unit.contains("After=network-online.target consul.service")
    );

    let left = |n: &str| tmp.path().join(format!("{n}.left"));
    let agent = |n: &str, ip: &str| {
        FakeAgent::start(
            n,
            true,
            &["--address", ip, "--leave-file", left(n).to_str().unwrap()],
        )
    };
    let (agent_a, agent_b) = (agent("t-a", "10.34.0.1"), agent("t-b", "10.34.0.2"));
    let with_imds = |cmd: &mut Command| {
        cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", moto.url());
    };
    for (n, ip, a) in [
        ("t-a", "10.34.0.1", &agent_a),
        ("t-b", "10.34.0.2", &agent_b),
    ] {
        ok_json(&output(&mut heartbeat_cmd(
            &moto,
            &registry,
            &root(n),
            n,
            ip,
            &a.addr(),
        )));
    }
    let shutdown = |n: &str, ip: &str, a: &FakeAgent| {
        let mut cmd = auto_consul(&moto);
        cmd.args([
            "leave",
            "--json",
            "--if-terminating",
            "--registry",
            &registry,
            "--address",
            ip,
            "--node",
            n,
        ])
        .arg("--root")
        .arg(root(n))
        .env("CONSUL_HTTP_ADDR", a.addr());
        with_imds(&mut cmd);
        ok_json(&output(&mut cmd))
    };
    let heartbeats_of = |n: &str| {
        keys(&moto, &bucket, &format!("{p}/"))
            .into_iter()
            .filter(|k| k.ends_with(&format!("-{n}")))
            .count()
    };

    // A reboot: the group keeps the instance in service, no spot notice.
    moto.imds(LIFECYCLE, Some("InService"));
    moto.imds(SPOT, None);
    let v = shutdown("t-b", "10.34.0.2", &agent_b);
    assert_eq!(v["terminating"], false);
    assert!(!left("t-b").exists(), "Consul left on a reboot");
    assert_eq!(slot_node(&moto, &bucket, p, 1), "t-b");
    assert_eq!(heartbeats_of("t-b"), 2);

    // Scale-in: the group terminates it.
    moto.imds(LIFECYCLE, Some("Terminated"));
    let v = shutdown("t-b", "10.34.0.2", &agent_b);
    assert_eq!(v["slots_released"], serde_json::json!([1]));
    assert!(left("t-b").exists(), "Consul did not leave");
    assert_eq!(heartbeats_of("t-b"), 0);
    // A heartbeat that still runs after the leave (the notice gone from
    // IMDS, say) does not take the released slot again.
    moto.imds(LIFECYCLE, Some("InService"));
    let mut hb = heartbeat_cmd(
        &moto,
        &registry,
        &root("t-b"),
        "t-b",
        "10.34.0.2",
        &agent_b.addr(),
    );
    with_imds(&mut hb);
    let v = ok_json(&output(&mut hb));
    assert_eq!(v["slot"]["status"], "released", "{v}");
    let slot: Value =
        serde_json::from_str(&get(&moto, &bucket, &format!("{p}/slots/server-1"))).unwrap();
    assert_eq!(slot["released"], true);

    // A spot stop keeps the instance: nothing is left.
    moto.imds(
        SPOT,
        Some(r#"{"action": "stop", "time": "2026-11-25T23:00:00Z"}"#),
    );
    let v = shutdown("t-a", "10.34.0.1", &agent_a);
    assert_eq!(v["terminating"], false);
    assert!(!left("t-a").exists());

    // Spot's two-minute warning reaches the heartbeat timer first.
    moto.imds(LIFECYCLE, Some("InService"));
    moto.imds(
        SPOT,
        Some(r#"{"action": "terminate", "time": "2026-11-25T23:00:00Z"}"#),
    );
    let mut hb = heartbeat_cmd(
        &moto,
        &registry,
        &root("t-a"),
        "t-a",
        "10.34.0.1",
        &agent_a.addr(),
    );
    with_imds(&mut hb);
    let v = ok_json(&output(&mut hb));
    assert_eq!(v["slots_released"], serde_json::json!([0]), "{v}");
    assert!(left("t-a").exists());
    assert_eq!(heartbeats_of("t-a"), 0);
}
