//! `run`, `plan` and `members` against a real S3 API (moto_server).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

#[test]
fn first_node_bootstraps_then_one_server_means_agents() {
    let moto = moto();
    let registry = format!("s3://{}/consul/one", bucket(moto));
    let tmp = tempfile::tempdir().unwrap();
    let first = run_node(
        moto,
        &registry,
        &tmp.path().join("a"),
        "node-a",
        "10.0.0.1",
        1,
    );
    assert_eq!(mode(&first), "bootstrap");
    assert_eq!(first["retry_join"], serde_json::json!([]));
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("a/etc/consul.d/zz-auto-consul.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["bootstrap"], true);
    assert_eq!(config["server"], true);
    assert_eq!(config["node_name"], "node-a");

    let second = run_node(
        moto,
        &registry,
        &tmp.path().join("b"),
        "node-b",
        "10.0.0.2",
        1,
    );
    assert_eq!(mode(&second), "agent");
    assert_eq!(second["retry_join"], serde_json::json!(["10.0.0.1"]));
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("b/etc/consul.d/zz-auto-consul.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["server"], false);
    assert_eq!(config["leave_on_terminate"], true);
    assert_eq!(config["retry_join"], serde_json::json!(["10.0.0.1"]));
}

#[test]
fn three_servers_wanted_gives_bootstrap_two_servers_then_agents() {
    let moto = moto();
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/consul/three");
    let tmp = tempfile::tempdir().unwrap();
    let modes: Vec<String> = (1..=5)
        .map(|i| {
            let v = run_node(
                moto,
                &registry,
                &tmp.path().join(format!("n{i}")),
                &format!("n{i}"),
                &format!("10.0.1.{i}"),
                3,
            );
            mode(&v)
        })
        .collect();
    assert_eq!(modes, ["bootstrap", "server", "server", "agent", "agent"]);
    let slots = keys(moto, &bucket, "consul/three/slots/");
    assert_eq!(
        slots,
        [
            "consul/three/slots/server-0",
            "consul/three/slots/server-1",
            "consul/three/slots/server-2"
        ]
    );
    assert!(keys(moto, &bucket, "consul/three/cluster").len() == 1);
}

/// Starts `count` runs at once on one prefix; returns their modes.
/// Starts `count` runs at once; returns each one's JSON output and stderr.
fn race(
    moto: &Moto,
    registry: &str,
    count: usize,
    servers: u32,
    tmp: &Path,
) -> Vec<(Value, String)> {
    let children: Vec<_> = (0..count)
        .map(|i| {
            run_cmd(
                moto,
                registry,
                &tmp.join(format!("r{i}")),
                &format!("racer-{i}"),
                &format!("10.9.0.{}", i + 1),
                servers,
            )
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            (
                ok_json(&out),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
        .collect()
}

/// Who became what, and what they said, for a failed race's message.
fn race_report(results: &[(Value, String)]) -> String {
    results
        .iter()
        .map(|(v, err)| {
            format!(
                "{} {} slot {} {}",
                v["node"],
                v["mode"],
                v["slot"],
                err.trim()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts a race's outcome: one bootstrap, exactly `servers` servers
/// holding slots 0..servers one each, the rest agents.
fn check_race(label: &str, results: &[(Value, String)], servers: u32) {
    let report = race_report(results);
    let count = |m: &str| results.iter().filter(|(v, _)| mode(v) == m).count();
    eprintln!(
        "race {label}: {} processes, bootstrap {}, server {}, agent {}",
        results.len(),
        count("bootstrap"),
        count("server"),
        count("agent")
    );
    assert_eq!(count("bootstrap"), 1, "{report}");
    assert_eq!(
        count("bootstrap") + count("server"),
        servers as usize,
        "{report}"
    );
    assert_eq!(count("agent"), results.len() - servers as usize, "{report}");
    let mut slots: Vec<u64> = results
        .iter()
        .filter_map(|(v, _)| v["slot"].as_u64())
        .collect();
    slots.sort();
    assert_eq!(
        slots,
        (0..u64::from(servers)).collect::<Vec<_>>(),
        "one slot each: {report}"
    );
}

#[test]
fn racing_nodes_elect_exactly_one_bootstrap_and_exactly_n_servers_on_s3() {
    let moto = moto();
    let bucket = bucket(moto);
    let (racers, prefixes, servers) = (16, 5, 3);
    for p in 0..prefixes {
        let tmp = tempfile::tempdir().unwrap();
        let results = race(
            moto,
            &format!("s3://{bucket}/race-{p}"),
            racers,
            servers,
            tmp.path(),
        );
        check_race(&format!("s3 prefix {p}"), &results, servers);
        // The registry agrees: each slot names a node that runs as a server.
        let servers_named: std::collections::HashSet<String> = results
            .iter()
            .filter(|(v, _)| mode(v) != "agent")
            .map(|(v, _)| v["node"].as_str().unwrap().to_string())
            .collect();
        for i in 0..servers {
            let body: Value =
                serde_json::from_str(&get(moto, &bucket, &format!("race-{p}/slots/server-{i}")))
                    .unwrap();
            assert!(
                servers_named.contains(body["node"].as_str().unwrap()),
                "slot {i}: {body}"
            );
        }
    }
}

#[test]
fn racing_nodes_elect_exactly_one_bootstrap_and_exactly_n_servers_on_a_directory() {
    let moto = moto();
    let (racers, prefixes, servers) = (16, 5, 3);
    for p in 0..prefixes {
        let tmp = tempfile::tempdir().unwrap();
        let reg = tmp.path().join("registry");
        std::fs::create_dir(&reg).unwrap();
        let results = race(
            moto,
            &format!("file://{}", reg.display()),
            racers,
            servers,
            tmp.path(),
        );
        check_race(&format!("file prefix {p}"), &results, servers);
    }
}

#[test]
fn a_registry_written_by_the_original_tool_is_read_right() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "consul/legacy";
    // Ages are the store's: each key is written, then aged as its stamp says.
    for (key, body, age) in [
        (
            format!("servers/{}-web-server-1", stamp(10)),
            "192.168.50.100",
            10,
        ),
        (
            format!("servers/{}-web-server-1", stamp(70)),
            "192.168.50.100",
            70,
        ),
        (
            format!("servers/{}-old-server", stamp(500)),
            "192.168.50.99",
            500,
        ),
        (
            format!("servers/{}-bad-body", stamp(5)),
            "not an address",
            5,
        ),
        ("servers/garbage".to_string(), "192.168.50.98", 0),
        (
            format!("agents/{}-web-server-1", stamp(10)),
            "192.168.50.100",
            10,
        ),
        (
            format!("agents/{}-agent1", stamp(20)),
            "192.168.50.101\n",
            20,
        ),
        (
            format!("agents/{}-agent-old", stamp(200)),
            "192.168.50.102",
            200,
        ),
        // Listings start at a margin before the expiry cut-off (keys sort
        // by time), so junk that sorts before it is never even read; this
        // one sorts after.
        ("agents/latest-agent2".to_string(), "192.168.50.103", 0),
    ] {
        put(moto, &bucket, &format!("{p}/{key}"), body);
        moto.age(&bucket, &format!("{p}/{key}"), age);
    }
    let registry = format!("s3://{bucket}/{p}");

    // The original tool had one expiry for servers and agents alike.
    let out = output(auto_consul(moto).args([
        "members",
        "--json",
        "--registry",
        &registry,
        "--agent-expiry",
        "120",
    ]));
    let members = ok_json(&out);
    let nodes = |role: &str| -> Vec<(String, String)> {
        members[role]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["node"].as_str().unwrap().to_string(),
                    m["address"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        nodes("servers"),
        [("web-server-1".to_string(), "192.168.50.100".to_string())]
    );
    assert_eq!(
        nodes("agents"),
        [
            ("web-server-1".to_string(), "192.168.50.100".to_string()),
            ("agent1".to_string(), "192.168.50.101".to_string())
        ]
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("servers/garbage"),
        "junk key not named: {stderr}"
    );
    assert!(stderr.contains("bad-body"), "junk body not named: {stderr}");
    assert!(
        stderr.contains("agents/latest-agent2"),
        "junk key not named: {stderr}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let v = ok_json(&output(
        run_cmd(moto, &registry, tmp.path(), "agent3", "192.168.50.110", 1)
            .args(["--agent-expiry", "120"]),
    ));
    assert_eq!(mode(&v), "agent");
    assert_eq!(
        v["retry_join"],
        serde_json::json!(["192.168.50.100", "192.168.50.101"])
    );
}

#[test]
fn rerunning_keeps_the_mode_and_files_and_raft_state_means_no_bootstrap() {
    let moto = moto();
    let registry = format!("s3://{}/consul/sticky", bucket(moto));
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("boot");
    let first = run_node(moto, &registry, &root, "boot", "10.0.2.1", 3);
    assert_eq!(mode(&first), "bootstrap");
    let snapshot = |root: &Path| -> Vec<(std::path::PathBuf, Vec<u8>)> {
        files_under(root)
            .into_iter()
            .map(|f| (f.clone(), std::fs::read(root.join(&f)).unwrap()))
            .collect()
    };
    let before = snapshot(&root);
    let again = run_node(moto, &registry, &root, "boot", "10.0.2.1", 3);
    assert_eq!(
        mode(&again),
        "bootstrap",
        "no Raft state yet: the cluster is still to be bootstrapped"
    );
    assert_eq!(again["changed"], serde_json::json!([]));
    assert_eq!(snapshot(&root), before, "a second run changes no file");

    // Consul ran: Raft state exists. The bootstrap node comes back as a plain server.
    std::fs::create_dir_all(root.join("opt/consul/raft")).unwrap();
    std::fs::write(root.join("opt/consul/raft/raft.db"), b"raft").unwrap();
    let back = run_node(moto, &registry, &root, "boot", "10.0.2.1", 3);
    assert_eq!(mode(&back), "server");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("etc/consul.d/zz-auto-consul.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["server"], true);
    assert_eq!(config["bootstrap"], false, "{config}");

    // A node with Raft state and no state file, on an empty registry, never bootstraps.
    let empty = format!("s3://{}/consul/raft-only", bucket(moto));
    let root2 = tmp.path().join("old-server");
    std::fs::create_dir_all(root2.join("opt/consul/raft")).unwrap();
    std::fs::write(root2.join("opt/consul/raft/raft.db"), b"raft").unwrap();
    let v = run_node(moto, &empty, &root2, "old-server", "10.0.2.9", 3);
    assert_eq!(mode(&v), "server");
    assert_eq!(v["bootstrap"], false);
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(root2.join("etc/consul.d/zz-auto-consul.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["bootstrap"], false, "{config}");
}

#[test]
fn identity_comes_from_imdsv2_when_not_given() {
    let moto = moto();
    let registry = format!("s3://{}/consul/imds", bucket(moto));
    let tmp = tempfile::tempdir().unwrap();
    let out = output(
        auto_consul(moto)
            .args(["run", "--json", "--registry", &registry])
            .arg("--root")
            .arg(tmp.path())
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", moto.url()),
    );
    let v = ok_json(&out);
    assert_eq!(v["node"], "i-fake");
    assert_eq!(v["address"], "127.0.0.1");
    assert_eq!(v["instance_id"], "i-fake");
    let env = std::fs::read_to_string(tmp.path().join("etc/auto-consul/auto-consul.env")).unwrap();
    // Learned, not given: every command on this instance learns it again,
    // so an image made from this node does not carry it.
    assert!(!env.contains("AUTO_CONSUL_NODE"), "{env}");
    assert!(!env.contains("AUTO_CONSUL_ADDRESS"), "{env}");
    assert!(!env.contains("AUTO_CONSUL_INSTANCE_ID"), "{env}");
    // The heartbeat learns it the same way, and finds the state run wrote.
    let agent = FakeAgent::start("i-fake", true, &[]);
    let hb = ok_json(
        auto_consul(moto)
            .args(["heartbeat", "--json", "--registry", &registry])
            .arg("--root")
            .arg(tmp.path())
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", moto.url())
            .env("CONSUL_HTTP_ADDR", agent.addr())
            .output()
            .as_ref()
            .unwrap(),
    );
    assert_eq!(hb["node"], "i-fake");
    assert_eq!(hb["slot"]["status"], "renewed");
}

#[test]
fn plan_decides_but_writes_and_claims_nothing() {
    let moto = moto();
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/consul/plan");
    let tmp = tempfile::tempdir().unwrap();
    let out = output(
        auto_consul(moto)
            .args([
                "plan",
                "--json",
                "--registry",
                &registry,
                "--address",
                "10.0.3.1",
                "--node",
                "p1",
            ])
            .arg("--root")
            .arg(tmp.path()),
    );
    let v = ok_json(&out);
    assert_eq!(mode(&v), "bootstrap");
    assert!(v["files"].as_array().unwrap().len() >= 6, "{v}");
    assert!(files_under(tmp.path()).is_empty(), "plan wrote files");
    assert!(
        keys(moto, &bucket, "consul/plan/").is_empty(),
        "plan wrote to the registry"
    );
}

/// Runs a bad invocation: asserts exit code, a message, and that nothing was written.
fn refused(cmd: &mut Command, root: &Path, code: i32, needle: &str) {
    let out = output(cmd.arg("--root").arg(root));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.contains(needle),
        "expected {needle:?} in the first line: {stderr}"
    );
    assert!(first.starts_with("error"), "first line: {stderr}");
    assert!(
        files_under(root).is_empty(),
        "files written: {:?}",
        files_under(root)
    );
}

#[test]
fn bad_input_is_refused_with_a_clear_message_and_nothing_written() {
    let moto = moto();
    let bucket = bucket(moto);
    let good = format!("s3://{bucket}/consul/bad");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let base = ["run", "--address", "10.0.4.1", "--node", "n1"];

    refused(
        auto_consul(moto)
            .args(base)
            .args(["--registry", "http://example/x"]),
        root,
        2,
        "registry URL",
    );
    refused(
        auto_consul(moto).args(base).args(["--registry", "s3://"]),
        root,
        2,
        "registry URL",
    );
    refused(auto_consul(moto).args(base), root, 2, "--registry");
    refused(
        auto_consul(moto)
            .args(base)
            .args(["--registry", "s3://no-such-bucket-here/x"]),
        root,
        2,
        "bucket does not exist",
    );
    refused(
        auto_consul(moto)
            .args(base)
            .args(["--registry", &good])
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", closed_port()),
            ),
        root,
        1,
        "cannot be reached",
    );
    refused(
        auto_consul(moto).args(["run", "--registry", &good, "--imds-timeout", "3"]),
        root,
        1,
        "pass --address and --node",
    );
    refused(
        auto_consul(moto).args([
            "run",
            "--registry",
            &good,
            "--node",
            "n1",
            "--address",
            "10.0.0.256",
        ]),
        root,
        2,
        "not an IP address",
    );
    refused(
        auto_consul(moto).args([
            "run",
            "--registry",
            &good,
            "--node",
            "bad/name",
            "--address",
            "10.0.4.1",
        ]),
        root,
        2,
        "not a valid Consul node name",
    );
    refused(
        auto_consul(moto)
            .args(base)
            .args(["--registry", &good, "--servers", "0"]),
        root,
        2,
        "--servers",
    );
    assert!(
        keys(moto, &bucket, "consul/bad/slots").is_empty(),
        "a refused run claimed a slot"
    );
    assert!(
        keys(moto, &bucket, "consul/bad/cluster").is_empty(),
        "a refused run created the cluster"
    );
}

#[test]
fn a_store_that_ignores_conditional_writes_is_refused_unless_racy_is_allowed() {
    let careless = Moto::start(&["--ignore-conditions"]);
    let bucket = bucket(&careless);
    let registry = format!("s3://{bucket}/consul/careless");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("refused");
    refused(
        auto_consul(&careless).args([
            "run",
            "--registry",
            &registry,
            "--address",
            "10.0.5.1",
            "--node",
            "c1",
        ]),
        &root,
        2,
        "ignores conditional writes",
    );
    assert!(keys(&careless, &bucket, "consul/careless/slots").is_empty());
    let mut cmd = run_cmd(
        &careless,
        &registry,
        &tmp.path().join("racy"),
        "c1",
        "10.0.5.1",
        1,
    );
    let v = ok_json(&output(cmd.arg("--allow-racy")));
    assert_eq!(mode(&v), "bootstrap");
}

#[test]
fn a_store_that_honours_if_match_but_ignores_if_none_match_is_refused() {
    let careless = Moto::start(&["--ignore-if-none-match"]);
    let bucket = bucket(&careless);
    let registry = format!("s3://{bucket}/consul/half");
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..2 {
        // The first run on a new registry, and a later one.
        refused(
            auto_consul(&careless).args([
                "run",
                "--registry",
                &registry,
                "--address",
                "10.0.5.2",
                "--node",
                "h1",
            ]),
            &tmp.path().join(format!("r{i}")),
            2,
            "ignores conditional writes",
        );
    }
    assert!(keys(&careless, &bucket, "consul/half/slots").is_empty());
}
