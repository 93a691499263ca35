//! In service only when really in service: in an autoscaling group, the
//! launch lifecycle hook is completed with CONTINUE only once the node is
//! in service (a server: autopilot reports it a healthy voter; an agent:
//! its Consul knows a leader), with lifecycle heartbeats while it waits,
//! and with ABANDON when the boot cannot succeed. Outside a group nothing
//! is called. moto does not implement the lifecycle calls: moto_locked
//! answers them as AWS does and records them (`/_lifecycle`); the fake
//! agent serves autopilot's health report from a file the test changes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn lifecycle_calls(moto: &Moto) -> Vec<Value> {
    let out = Command::new("curl")
        .args(["-sf", &format!("{}/_lifecycle", moto.url())])
        .output()
        .expect("curl");
    serde_json::from_slice(&out.stdout).expect("a list")
}

fn in_group<'a>(cmd: &'a mut Command, id: &str) -> &'a mut Command {
    cmd.args([
        "--instance-id",
        id,
        "--autoscaling-group",
        "consul-servers",
        "--lifecycle-hook",
        "auto-consul-launch",
    ])
}

fn gate(moto: &Moto, registry: &str, root: &Path, node: &str, ip: &str, agent: &str) -> Command {
    let mut cmd = node_cmd(moto, "gate", registry, root, node, ip);
    cmd.env("CONSUL_HTTP_ADDR", agent);
    cmd
}

fn autopilot(file: &Path, node: &str, ip: &str, healthy: bool, voter: bool) {
    let report = json!({
        "Healthy": healthy,
        "FailureTolerance": 0,
        "Servers": [{
            "ID": "e349749b-3303-3ddf-959c-b5885a0e1f6e",
            "Name": node,
            "Address": format!("{ip}:8300"),
            "SerfStatus": "alive",
            "Version": "1.20.1",
            "Leader": true,
            "LastContact": "0s",
            "LastTerm": 2,
            "LastIndex": 10,
            "Healthy": healthy,
            "Voter": voter,
            "StableSince": "2026-12-01T00:00:00Z"
        }]
    });
    std::fs::write(file, report.to_string()).unwrap();
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_server_continues_only_once_a_healthy_voter_and_an_agent_once_it_knows_a_leader() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let registry = format!("s3://{bucket}/gate/asg");
    let tmp = tempfile::tempdir().unwrap();
    let ids = run_instances(&moto, 2);
    let (s, a) = (tmp.path().join("s"), tmp.path().join("a"));

    let v = ok_json(&output(in_group(
        &mut run_cmd(&moto, &registry, &s, "g-s", "10.90.0.1", 1),
        &ids[0],
    )));
    assert_eq!(v["mode"], "bootstrap");
    assert_eq!(v["lifecycle_hook"]["group"], "consul-servers", "{v}");
    // The gate's unit verifies with systemd's own checker.
    let units = s.join("etc/systemd/system");
    assert!(units.join("auto-consul-gate.service").is_file());
    let verify = Command::new("systemd-analyze")
        .args(["verify", "auto-consul-gate.service"])
        .env("SYSTEMD_UNIT_PATH", format!("{}:", units.display()))
        .output()
        .expect("systemd-analyze");
    let said = String::from_utf8_lossy(&verify.stderr);
    assert!(
        verify.status.success() && !said.contains("auto-consul-gate"),
        "{said}"
    );
    assert!(
        lifecycle_calls(&moto).is_empty(),
        "run itself completes nothing"
    );

    // Consul runs, autopilot does not count this server yet.
    let report = tmp.path().join("autopilot.json");
    autopilot(&report, "g-s", "10.90.0.1", false, false);
    let agent = FakeAgent::start(
        "g-s",
        true,
        &[
            "--address",
            "10.90.0.1",
            "--autopilot-file",
            report.to_str().unwrap(),
        ],
    );
    let waiting = in_group(
        &mut gate(&moto, &registry, &s, "g-s", "10.90.0.1", &agent.addr()),
        &ids[0],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for("a lifecycle heartbeat", Duration::from_secs(15), || {
        lifecycle_calls(&moto)
            .iter()
            .any(|c| c["action"] == "RecordLifecycleActionHeartbeat")
    });
    // Healthy but not yet a voter: still waiting, a few polls later.
    autopilot(&report, "g-s", "10.90.0.1", true, false);
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        lifecycle_calls(&moto)
            .iter()
            .all(|c| c["action"] != "CompleteLifecycleAction"),
        "completed before autopilot said a healthy voter: {:?}",
        lifecycle_calls(&moto)
    );
    let flipped = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    autopilot(&report, "g-s", "10.90.0.1", true, true);
    let out = waiting.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = lifecycle_calls(&moto);
    let last = calls.last().unwrap();
    assert_eq!(last["action"], "CompleteLifecycleAction", "{calls:?}");
    assert_eq!(last["result"], "CONTINUE");
    assert_eq!(last["instance"], ids[0].as_str());
    assert_eq!(last["group"], "consul-servers");
    assert_eq!(last["hook"], "auto-consul-launch");
    assert!(last["time"].as_f64().unwrap() >= flipped, "{calls:?}");
    // Done once per instance: a reboot's gate asks nothing.
    let again = output(in_group(
        &mut gate(&moto, &registry, &s, "g-s", "10.90.0.1", &agent.addr()),
        &ids[0],
    ));
    assert!(again.status.success());
    assert_eq!(lifecycle_calls(&moto).len(), calls.len());

    // An agent: in service as soon as its Consul knows a leader.
    ok_json(&output(in_group(
        &mut run_cmd(&moto, &registry, &a, "g-a", "10.90.0.2", 1),
        &ids[1],
    )));
    let client = FakeAgent::start(
        "g-a",
        false,
        &["--address", "10.90.0.2", "--leader", "10.90.0.1:8300"],
    );
    let out = output(in_group(
        &mut gate(&moto, &registry, &a, "g-a", "10.90.0.2", &client.addr()),
        &ids[1],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = lifecycle_calls(&moto).last().cloned().unwrap();
    assert_eq!(last["result"], "CONTINUE");
    assert_eq!(last["instance"], ids[1].as_str());
}

#[test]
fn a_boot_the_witness_rule_forbids_abandons_its_launch() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let p = "gate/witness";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let ids = run_instances(&moto, 3);
    for (i, node) in ["w-a", "w-b"].iter().enumerate() {
        ok_json(&output(
            run_cmd(
                &moto,
                &registry,
                &tmp.path().join(node),
                node,
                &format!("10.91.0.{}", i + 1),
                2,
            )
            .args(["--instance-id", &ids[i]]),
        ));
    }
    // Silent for three expiries, its servers still running in EC2.
    moto.age(&bucket, &format!("{p}/"), 3 * 120 + 5);
    let out = output(
        in_group(
            &mut run_cmd(
                &moto,
                &registry,
                &tmp.path().join("new"),
                "w-new",
                "10.91.1.1",
                1,
            ),
            &ids[2],
        )
        .args(["--witness-wait", "1"]),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = lifecycle_calls(&moto);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["action"], "CompleteLifecycleAction");
    assert_eq!(calls[0]["result"], "ABANDON");
    assert_eq!(calls[0]["instance"], ids[2].as_str());
}

#[test]
fn outside_an_autoscaling_group_nothing_is_called() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let registry = format!("s3://{bucket}/gate/none");
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("s");
    let v = ok_json(&output(
        run_cmd(&moto, &registry, &s, "n-s", "10.92.0.1", 1)
            .args(["--instance-id", "i-0123456789abcdef0"]),
    ));
    assert_eq!(v["lifecycle_hook"], Value::Null);
    assert!(
        !s.join("etc/systemd/system/auto-consul-gate.service")
            .exists()
    );
    let agent = FakeAgent::start("n-s", true, &["--address", "10.92.0.1"]);
    let out = output(
        gate(&moto, &registry, &s, "n-s", "10.92.0.1", &agent.addr())
            .args(["--instance-id", "i-0123456789abcdef0"]),
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("not in an autoscaling group"));
    assert!(lifecycle_calls(&moto).is_empty());
}
