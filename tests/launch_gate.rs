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
        lifecycle_calls(&moto)
            .iter()
            .all(|c| c["action"] == "RecordLifecycleActionHeartbeat"),
        "run itself completes nothing: {:?}",
        lifecycle_calls(&moto)
    );
    let before_gate = lifecycle_calls(&moto).len();

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
    wait_for(
        "the gate's lifecycle heartbeat",
        Duration::from_secs(15),
        || {
            lifecycle_calls(&moto)[before_gate..]
                .iter()
                .any(|c| c["action"] == "RecordLifecycleActionHeartbeat")
        },
    );
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
    let calls: Vec<Value> = lifecycle_calls(&moto)
        .into_iter()
        .filter(|c| c["action"] == "CompleteLifecycleAction")
        .collect();
    assert_eq!(calls.len(), 1, "{calls:?}");
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

/// The launch hook outlives `run`'s own waits: from its start, `run`
/// records a lifecycle heartbeat at least every 20 s (a third of the
/// module's shortest `launch_wait`, 60 s). Here an agent waits 65 s for a
/// server to join (its role wait, longer than a 60 s hook), and the group
/// hears from it all along; nothing is abandoned, and its gate then puts
/// it in service. A gate that then finds no launch action under way (a
/// reboot before the record was written, a hook that timed out) exits 0
/// with one line.
#[test]
fn runs_waits_keep_the_launch_hook_alive_and_a_hook_no_longer_active_is_not_a_failure() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let registry = format!("s3://{bucket}/gate/wait");
    let tmp = tempfile::tempdir().unwrap();
    let ids = run_instances(&moto, 2);
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let started = now();
    let agent = in_group(
        &mut run_cmd(
            &moto,
            &registry,
            &tmp.path().join("a"),
            "w-a",
            "10.93.0.2",
            1,
        ),
        &ids[1],
    )
    .args(["--role", "agent", "--role-wait", "120"])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(65));
    ok_json(&output(&mut run_cmd(
        &moto,
        &registry,
        &tmp.path().join("s"),
        "w-s",
        "10.93.0.1",
        1,
    )));
    let out = agent.wait_with_output().unwrap();
    let ended = now();
    let v = ok_json(&out);
    assert_eq!(v["mode"], "agent");
    let calls: Vec<Value> = lifecycle_calls(&moto)
        .into_iter()
        .filter(|c| c["instance"] == ids[1].as_str())
        .collect();
    assert!(
        calls
            .iter()
            .all(|c| c["action"] == "RecordLifecycleActionHeartbeat" && c["error"].is_null()),
        "only heartbeats while run waits: {calls:?}"
    );
    let mut times: Vec<f64> = calls.iter().map(|c| c["time"].as_f64().unwrap()).collect();
    times.insert(0, started);
    times.push(ended);
    let gaps: Vec<f64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        ended - started > 65.0 && gaps.iter().all(|g| *g <= 21.0),
        "silences of {gaps:?} s over a {:.0} s run (60 s hook: at most 20 s each)",
        ended - started
    );

    // Its gate puts it in service.
    let client = FakeAgent::start(
        "w-a",
        false,
        &["--address", "10.93.0.2", "--leader", "10.93.0.1:8300"],
    );
    let gate_of = |root: &Path| {
        let mut cmd = gate(&moto, &registry, root, "w-a", "10.93.0.2", &client.addr());
        in_group(&mut cmd, &ids[1]);
        output(&mut cmd)
    };
    assert!(gate_of(&tmp.path().join("a")).status.success());
    let last = lifecycle_calls(&moto).last().cloned().unwrap();
    assert_eq!(
        (last["result"].as_str(), last["error"].is_null()),
        (Some("CONTINUE"), true)
    );
    // The same launch gated again from a root that lost its record: AWS
    // has no launch action under way for it any more.
    let copy = tmp.path().join("a-lost");
    std::fs::create_dir_all(&copy).unwrap();
    std::process::Command::new("cp")
        .args(["-a"])
        .arg(tmp.path().join("a/."))
        .arg(&copy)
        .status()
        .unwrap();
    std::fs::remove_file(copy.join("var/lib/auto-consul/launch-gate")).unwrap();
    let again = gate_of(&copy);
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success() && said.contains("no launch lifecycle action under way"),
        "{said}{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(!String::from_utf8_lossy(&again.stderr).contains("autoscaling:"));
}
