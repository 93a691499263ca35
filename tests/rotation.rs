//! Every secret rotatable without an outage: the gossip key, with 3
//! servers and 6 agents whose fake agents share one cluster's keyrings
//! (Consul's keyring operations reach every live member; each member's
//! keyring file is rewritten as serf rewrites it). The leader's heartbeat
//! is killed at random moments and resumed; after every pass every live
//! member can still talk to every server; a node boots mid-rotation; in
//! the end one key is in use everywhere and the old one is gone.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn config(root: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root.join("etc/consul.d/zz-auto-consul.json")).unwrap(),
    )
    .unwrap()
}

/// The live members' keyrings, as the fake agents hold them.
fn members(agent: &FakeAgent) -> Vec<Value> {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{}/_members", agent.addr())])
        .output()
        .expect("curl");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every live member reads every server's gossip and every server reads
/// it: each one's primary key is in the other's keyring.
fn all_reach_the_servers(agent: &FakeAgent) -> Result<(), String> {
    let all = members(agent);
    let holds = |m: &Value, k: &Value| m["keys"].as_array().unwrap().contains(k);
    for s in all.iter().filter(|m| m["server"] == true) {
        for m in &all {
            if !holds(s, &m["primary"]) || !holds(m, &s["primary"]) {
                return Err(format!(
                    "{} and server {} cannot talk: {all:?}",
                    m["node"], s["node"]
                ));
            }
        }
    }
    Ok(())
}

/// A small deterministic generator, seeded per run (the seed is printed).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[test]
fn a_gossip_key_rotation_killed_anywhere_ends_with_one_key_and_no_outage() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "rot/gossip";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let secrets_dir = tmp.path().join("secrets");
    std::fs::create_dir_all(&secrets_dir).unwrap();
    let secrets = format!("file://{}", secrets_dir.display());
    let state = tmp.path().join("cluster");
    std::fs::create_dir_all(&state).unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill schedule seed: {seed}");
    let mut rng = Lcg(seed);

    let node = |i: usize| -> (PathBuf, String, String) {
        (
            tmp.path().join(format!("n{i}")),
            format!("rot-{i}"),
            format!("10.74.0.{}", i + 1),
        )
    };
    // 3 servers, then 6 agents.
    for i in 0..9 {
        let (root, name, ip) = node(i);
        let role = if i < 3 { "server" } else { "agent" };
        ok_json(&output(
            run_cmd(moto, &registry, &root, &name, &ip, 3).args([
                "--role",
                role,
                "--secrets",
                &secrets,
            ]),
        ));
    }
    let record =
        || -> Value { serde_json::from_str(&get(moto, &bucket, &format!("{p}/cluster"))).unwrap() };
    let cluster = record()["cluster_id"].as_str().unwrap().to_string();
    let management =
        std::fs::read_to_string(secrets_dir.join(&cluster).join("server/management-token"))
            .unwrap()
            .trim()
            .to_string();
    let old_key = config(&node(0).0)["encrypt"].as_str().unwrap().to_string();
    let start_agent = |i: usize| {
        let (root, name, ip) = node(i);
        let mut args = vec![
            "--address".to_string(),
            ip,
            "--leader".into(),
            "10.74.0.1:8300".into(),
            "--acl-dir".into(),
            state.display().to_string(),
            "--acl-management".into(),
            management.clone(),
            "--keyring-data-dir".into(),
            root.join("opt/consul").display().to_string(),
            "--keyring-config".into(),
            root.join("etc/consul.d/zz-auto-consul.json")
                .display()
                .to_string(),
        ];
        if i < 3 {
            args.push("--peers".into());
            args.push("10.74.0.1:8300,10.74.0.2:8300,10.74.0.3:8300".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        FakeAgent::start(&name, i < 3, &args)
    };
    let mut agents: Vec<FakeAgent> = (0..9).map(start_agent).collect();
    all_reach_the_servers(&agents[0]).unwrap();

    // A start stopped after it made the new key: the key is there, the
    // record says nothing yet. Starting again takes that key.
    let made = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    std::fs::create_dir_all(secrets_dir.join(&cluster).join("agent")).unwrap();
    std::fs::write(secrets_dir.join(&cluster).join("agent/gossip-key.2"), made).unwrap();
    let rotate = || {
        output(auto_consul(moto).args([
            "secrets",
            "rotate",
            "gossip-key",
            "--json",
            "--registry",
            &registry,
            "--secrets",
            &secrets,
        ]))
    };
    let started = ok_json(&rotate());
    assert_eq!(started["started"], true, "{started}");
    assert_eq!(started["next"], 2);
    assert_eq!(record()["gossip_key"]["rotation"], "install");
    // Asked again, it says where the one under way stands.
    let again = ok_json(&rotate());
    assert_eq!(again["started"], false, "{again}");
    assert_eq!(again["step"], "install");

    // The leader's heartbeat, killed at random moments, then let run; a
    // node boots mid-rotation.
    let (root0, name0, ip0) = node(0);
    let beat = |agent: &FakeAgent| {
        heartbeat_cmd(moto, &registry, &root0, &name0, &ip0, &agent.addr())
            .args(["--secrets", &secrets])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut steps_seen = HashSet::new();
    let mut booted_mid_rotation = false;
    for round in 0..20 {
        let rotation = record()["gossip_key"]["rotation"].clone();
        if rotation.is_null() {
            break;
        }
        steps_seen.insert(rotation.as_str().unwrap().to_string());
        if round == 0 {
            // A new agent boots now: its keyring holds both keys.
            let (root, name, ip) = node(9);
            ok_json(&output(
                run_cmd(moto, &registry, &root, &name, &ip, 3).args([
                    "--role",
                    "agent",
                    "--secrets",
                    &secrets,
                ]),
            ));
            agents.push(start_agent(9));
            booted_mid_rotation = true;
        }
        let mut child = beat(&agents[0]);
        if round % 3 != 2 {
            std::thread::sleep(Duration::from_millis(rng.below(250)));
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "pass {round}: killed; the record says {}",
                record()["gossip_key"]
            );
        } else {
            let out = child.wait_with_output().unwrap();
            let v = ok_json(&out);
            eprintln!("pass {round}: {}", v["rotations"]);
        }
        all_reach_the_servers(&agents[0]).unwrap_or_else(|e| panic!("after pass {round}: {e}"));
    }
    assert!(booted_mid_rotation);
    let rec = record();
    assert!(rec["gossip_key"]["rotation"].is_null(), "{rec}");
    assert_eq!(rec["gossip_key"]["generation"], 2, "{rec}");
    // One key in use everywhere, the old one gone from every keyring.
    for m in members(&agents[0]) {
        assert_eq!(m["keys"], serde_json::json!([made]), "{m}");
        assert_eq!(m["primary"], made, "{m}");
    }
    assert!(
        !members(&agents[0])
            .iter()
            .any(|m| m.to_string().contains(&old_key))
    );
    // Nodes booting now write the new key.
    let (root, name, ip) = node(3);
    ok_json(&output(
        run_cmd(moto, &registry, &root, &name, &ip, 3).args([
            "--role",
            "agent",
            "--secrets",
            &secrets,
        ]),
    ));
    assert_eq!(config(&root)["encrypt"], made);
    let list = ok_json(&output(auto_consul(moto).args([
        "secrets",
        "list",
        "--json",
        "--registry",
        &registry,
        "--secrets",
        &secrets,
    ])));
    let gossip = list["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "gossip-key")
        .unwrap()
        .clone();
    assert_eq!(gossip["generation"], 2, "{list}");
    assert!(gossip["rotation"].is_null(), "{list}");
    assert!(gossip["where"].as_str().unwrap().ends_with("gossip-key.2"));
    eprintln!("steps seen between passes: {steps_seen:?}");
}

/// The ACL state the fake agents of one cluster share.
fn acl_tokens(dir: &Path) -> Value {
    let st: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("acl-state.json")).unwrap())
            .unwrap();
    st["tokens"].clone()
}

#[test]
fn an_agents_token_rotation_killed_anywhere_moves_every_node_and_deletes_the_old_token() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "rot/token";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let secrets_dir = tmp.path().join("secrets");
    std::fs::create_dir_all(&secrets_dir).unwrap();
    let secrets = format!("file://{}", secrets_dir.display());
    let acl = tmp.path().join("acl");
    std::fs::create_dir_all(&acl).unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill schedule seed: {seed}");
    let mut rng = Lcg(seed);
    let node = |i: usize| -> (PathBuf, String, String) {
        (
            tmp.path().join(format!("n{i}")),
            format!("tok-{i}"),
            format!("10.75.0.{}", i + 1),
        )
    };
    for i in 0..9 {
        let (root, name, ip) = node(i);
        let role = if i < 3 { "server" } else { "agent" };
        ok_json(&output(
            run_cmd(moto, &registry, &root, &name, &ip, 3).args([
                "--role",
                role,
                "--secrets",
                &secrets,
            ]),
        ));
    }
    let record =
        || -> Value { serde_json::from_str(&get(moto, &bucket, &format!("{p}/cluster"))).unwrap() };
    let cluster = record()["cluster_id"].as_str().unwrap().to_string();
    let management =
        std::fs::read_to_string(secrets_dir.join(&cluster).join("server/management-token"))
            .unwrap()
            .trim()
            .to_string();
    let agents: Vec<FakeAgent> = (0..9)
        .map(|i| {
            let (_, name, ip) = node(i);
            FakeAgent::start(
                &name,
                i < 3,
                &[
                    "--address",
                    &ip,
                    "--leader",
                    "10.75.0.1:8300",
                    "--acl-dir",
                    acl.to_str().unwrap(),
                    "--acl-management",
                    &management,
                ],
            )
        })
        .collect();
    let beat = |i: usize| {
        let (root, name, ip) = node(i);
        heartbeat_cmd(moto, &registry, &root, &name, &ip, &agents[i].addr())
            .args(["--secrets", &secrets])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let token_of = |i: usize| config(&node(i).0)["acl"]["tokens"]["agent"].clone();
    // Every node's Consul runs with a token that exists.
    let all_have_tokens = || -> Result<(), String> {
        let tokens = acl_tokens(&acl);
        for i in 0..9 {
            let t = token_of(i);
            if tokens.get(t.as_str().unwrap()).is_none() {
                return Err(format!(
                    "{} runs with a token Consul does not have",
                    node(i).1
                ));
            }
        }
        Ok(())
    };
    // The servers' first heartbeats make generation 1 in Consul.
    for i in 0..9 {
        ok_json(&beat(i).wait_with_output().unwrap());
    }
    all_have_tokens().unwrap();
    let old = token_of(3).as_str().unwrap().to_string();

    let rotate = ok_json(&output(auto_consul(moto).args([
        "secrets",
        "rotate",
        "agent-token",
        "--json",
        "--registry",
        &registry,
        "--secrets",
        &secrets,
    ])));
    assert_eq!(rotate["started"], true, "{rotate}");
    assert_eq!(record()["agent_token"]["rotation"], "create");
    for round in 0..12 {
        if record()["agent_token"]["rotation"].is_null() {
            break;
        }
        // The leader first, then every node; some killed at random.
        for i in 0..9 {
            let mut child = beat(i);
            if rng.below(4) == 0 {
                std::thread::sleep(Duration::from_millis(rng.below(200)));
                let _ = child.kill();
                let _ = child.wait();
            } else {
                ok_json(&child.wait_with_output().unwrap());
            }
        }
        all_have_tokens().unwrap_or_else(|e| panic!("after round {round}: {e}"));
        eprintln!("after round {round}: {}", record()["agent_token"]);
    }
    let rec = record();
    assert!(rec["agent_token"]["rotation"].is_null(), "{rec}");
    assert_eq!(rec["agent_token"]["generation"], 2, "{rec}");
    let new = std::fs::read_to_string(secrets_dir.join(&cluster).join("agent/agent-token.2"))
        .unwrap()
        .trim()
        .to_string();
    for i in 0..9 {
        assert_eq!(token_of(i), new.as_str(), "{}", node(i).1);
    }
    let tokens = acl_tokens(&acl);
    assert!(
        tokens.get(&old).is_none(),
        "the old token is deleted: {tokens}"
    );
    assert!(tokens.get(&new).is_some());
    // A node booting now gets the new one.
    let (root, name, ip) = node(9);
    ok_json(&output(
        run_cmd(moto, &registry, &root, &name, &ip, 3).args([
            "--role",
            "agent",
            "--secrets",
            &secrets,
        ]),
    ));
    assert_eq!(config(&root)["acl"]["tokens"]["agent"], new.as_str());
}

/// `openssl verify` of `cert` against the CA file `ca`.
fn verifies(ca: &Path, cert: &Path) -> bool {
    Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg(cert)
        .output()
        .expect("openssl")
        .status
        .success()
}

#[test]
fn a_ca_rotation_killed_anywhere_never_has_a_node_reject_a_server() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "rot/ca";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let secrets_dir = tmp.path().join("secrets");
    std::fs::create_dir_all(&secrets_dir).unwrap();
    let secrets = format!("file://{}", secrets_dir.display());
    let acl = tmp.path().join("acl");
    std::fs::create_dir_all(&acl).unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill schedule seed: {seed}");
    let mut rng = Lcg(seed);
    let node = |i: usize| -> (PathBuf, String, String) {
        (
            tmp.path().join(format!("n{i}")),
            format!("ca-{i}"),
            format!("10.76.0.{}", i + 1),
        )
    };
    for i in 0..9 {
        let (root, name, ip) = node(i);
        let role = if i < 3 { "server" } else { "agent" };
        ok_json(&output(
            run_cmd(moto, &registry, &root, &name, &ip, 3).args([
                "--role",
                role,
                "--secrets",
                &secrets,
            ]),
        ));
    }
    let record =
        || -> Value { serde_json::from_str(&get(moto, &bucket, &format!("{p}/cluster"))).unwrap() };
    let cluster = record()["cluster_id"].as_str().unwrap().to_string();
    let management =
        std::fs::read_to_string(secrets_dir.join(&cluster).join("server/management-token"))
            .unwrap()
            .trim()
            .to_string();
    let agents: Vec<FakeAgent> = (0..9)
        .map(|i| {
            let (_, name, ip) = node(i);
            FakeAgent::start(
                &name,
                i < 3,
                &[
                    "--address",
                    &ip,
                    "--leader",
                    "10.76.0.1:8300",
                    "--acl-dir",
                    acl.to_str().unwrap(),
                    "--acl-management",
                    &management,
                ],
            )
        })
        .collect();
    let tls = |i: usize, f: &str| node(i).0.join("etc/consul.d/auto-consul-tls").join(f);
    // No live node rejects a live server's certificate.
    let all_trust_the_servers = || -> Result<(), String> {
        for i in 0..9 {
            for s in 0..3 {
                if !verifies(&tls(i, "ca.pem"), &tls(s, "server.pem")) {
                    return Err(format!("{} rejects server {}", node(i).1, node(s).1));
                }
            }
        }
        Ok(())
    };
    all_trust_the_servers().unwrap();
    let old_server_cert = tmp.path().join("old-server.pem");
    std::fs::copy(tls(0, "server.pem"), &old_server_cert).unwrap();
    let beat = |i: usize| {
        let (root, name, ip) = node(i);
        heartbeat_cmd(moto, &registry, &root, &name, &ip, &agents[i].addr())
            .args(["--secrets", &secrets])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // The cluster has been running: every node has heartbeated.
    for i in 0..9 {
        ok_json(&beat(i).wait_with_output().unwrap());
    }
    let rotate = ok_json(&output(auto_consul(moto).args([
        "secrets",
        "rotate",
        "ca",
        "--json",
        "--registry",
        &registry,
        "--secrets",
        &secrets,
    ])));
    assert_eq!(rotate["started"], true, "{rotate}");
    let mut steps = Vec::new();
    for round in 0..15 {
        let step = record()["ca"]["rotation"].clone();
        if step.is_null() {
            break;
        }
        steps.push(step.as_str().unwrap().to_string());
        for i in 0..9 {
            let mut child = beat(i);
            if rng.below(4) == 0 {
                std::thread::sleep(Duration::from_millis(rng.below(200)));
                let _ = child.kill();
                let _ = child.wait();
            } else {
                let v = ok_json(&child.wait_with_output().unwrap());
                if i == 0 {
                    eprintln!("leader, round {round}: {}", v["rotations"]);
                }
            }
            all_trust_the_servers()
                .unwrap_or_else(|e| panic!("round {round}, after {}: {e}", node(i).1));
        }
    }
    eprintln!("steps at the start of each round: {steps:?}");
    let rec = record();
    assert!(rec["ca"]["rotation"].is_null(), "{rec}");
    assert_eq!(rec["ca"]["generation"], 2, "{rec}");
    let new_ca =
        std::fs::read_to_string(secrets_dir.join(&cluster).join("agent/ca-cert.2")).unwrap();
    for i in 0..9 {
        assert_eq!(
            std::fs::read_to_string(tls(i, "ca.pem")).unwrap().trim(),
            new_ca.trim(),
            "{}",
            node(i).1
        );
        // The old CA is no longer trusted.
        assert!(!verifies(&tls(i, "ca.pem"), &old_server_cert));
    }
    all_trust_the_servers().unwrap();
    // A server booting now is signed by the new CA.
    let (root, name, ip) = node(9);
    ok_json(&output(
        run_cmd(moto, &registry, &root, &name, &ip, 3).args(["--secrets", &secrets]),
    ));
    let ca9 = root.join("etc/consul.d/auto-consul-tls/ca.pem");
    assert_eq!(std::fs::read_to_string(&ca9).unwrap().trim(), new_ca.trim());
}
