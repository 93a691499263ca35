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

/// A cluster of 3 servers and 6 agents made with `--secrets` in a
/// directory store, whose fake agents share one cluster state (ACLs,
/// keyrings) and name server 0 their leader; and the random schedule of
/// the kills (its seed printed).
struct Rig {
    moto: &'static Moto,
    bucket: String,
    prefix: &'static str,
    registry: String,
    tmp: tempfile::TempDir,
    secrets_dir: PathBuf,
    secrets: String,
    acl: PathBuf,
    name: &'static str,
    net: &'static str,
    cluster: String,
    management: String,
    rng: Lcg,
}

impl Rig {
    /// Boots the 9 nodes (`<name>-<i>` at `<net>.<i + 1>`) in `prefix`.
    fn new(prefix: &'static str, name: &'static str, net: &'static str) -> Rig {
        let moto = moto();
        let bucket = bucket(moto);
        let tmp = tempfile::tempdir().unwrap();
        let secrets_dir = tmp.path().join("secrets");
        let acl = tmp.path().join("acl");
        std::fs::create_dir_all(&secrets_dir).unwrap();
        std::fs::create_dir_all(&acl).unwrap();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("kill schedule seed: {seed}");
        let mut rig = Rig {
            moto,
            registry: format!("s3://{bucket}/{prefix}"),
            secrets: format!("file://{}", secrets_dir.display()),
            bucket,
            prefix,
            tmp,
            secrets_dir,
            acl,
            name,
            net,
            cluster: String::new(),
            management: String::new(),
            rng: Lcg(seed),
        };
        // 3 servers, then 6 agents.
        for i in 0..9 {
            ok_json(&rig.boot(i, if i < 3 { "server" } else { "agent" }));
        }
        rig.cluster = rig.record()["cluster_id"].as_str().unwrap().to_string();
        rig.management = rig.secret("server/management-token");
        rig
    }

    /// Node `i`: its root, name and address.
    fn node(&self, i: usize) -> (PathBuf, String, String) {
        (
            self.tmp.path().join(format!("n{i}")),
            format!("{}-{i}", self.name),
            format!("{}.{}", self.net, i + 1),
        )
    }

    /// `run` of node `i` with `--role role`.
    fn boot(&self, i: usize, role: &str) -> std::process::Output {
        let (root, name, ip) = self.node(i);
        output(
            run_cmd(self.moto, &self.registry, &root, &name, &ip, 3).args([
                "--role",
                role,
                "--secrets",
                &self.secrets,
            ]),
        )
    }

    /// The cluster record.
    fn record(&self) -> Value {
        serde_json::from_str(&get(
            self.moto,
            &self.bucket,
            &format!("{}/cluster", self.prefix),
        ))
        .unwrap()
    }

    /// A secret of the cluster, by its name under the cluster's path.
    fn secret(&self, rel: &str) -> String {
        std::fs::read_to_string(self.secrets_dir.join(&self.cluster).join(rel))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Node `i`'s fake agent, with `extra` arguments.
    fn agent(&self, i: usize, extra: &[String]) -> FakeAgent {
        let mut args = vec!["--acl-management".to_string(), self.management.clone()];
        args.extend_from_slice(extra);
        self.agent_of_config(i, &args)
    }

    /// Node `i`'s fake agent, which takes its initial management token
    /// from its config file, as Consul does when it starts (unless `extra`
    /// names one).
    fn agent_of_config(&self, i: usize, extra: &[String]) -> FakeAgent {
        let (root, name, ip) = self.node(i);
        let mut args = vec![
            "--address".to_string(),
            ip,
            "--leader".into(),
            format!("{}.1:8300", self.net),
            "--acl-dir".into(),
            self.acl.display().to_string(),
            "--config-file".into(),
            root.join("etc/consul.d/zz-auto-consul.json")
                .display()
                .to_string(),
        ];
        args.extend_from_slice(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        FakeAgent::start(&name, i < 3, &args)
    }

    /// Node `i`'s heartbeat against `agent`, started.
    fn beat(&self, i: usize, agent: &FakeAgent) -> std::process::Child {
        let (root, name, ip) = self.node(i);
        heartbeat_cmd(self.moto, &self.registry, &root, &name, &ip, &agent.addr())
            .args(["--secrets", &self.secrets])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// `secrets rotate <what> --json`.
    fn rotate(&self, what: &str) -> std::process::Output {
        output(auto_consul(self.moto).args([
            "secrets",
            "rotate",
            what,
            "--json",
            "--registry",
            &self.registry,
            "--secrets",
            &self.secrets,
        ]))
    }

    /// `secrets list --json`: the row of secret `name`, and the whole.
    fn listed(&self, name: &str) -> (Value, Value) {
        let list = ok_json(&output(auto_consul(self.moto).args([
            "secrets",
            "list",
            "--json",
            "--registry",
            &self.registry,
            "--secrets",
            &self.secrets,
        ])));
        let row = list["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {list}"))
            .clone();
        (row, list)
    }

    /// Waits for `child` and gives its output, or (with `kill`) kills it
    /// at a random moment within `ms` and gives none.
    fn maybe_kill(
        &mut self,
        mut child: std::process::Child,
        kill: bool,
        ms: u64,
    ) -> Option<std::process::Output> {
        if kill {
            std::thread::sleep(Duration::from_millis(self.rng.below(ms)));
            let _ = child.kill();
            let _ = child.wait();
            None
        } else {
            Some(child.wait_with_output().unwrap())
        }
    }
}

#[test]
fn a_gossip_key_rotation_killed_anywhere_ends_with_one_key_and_no_outage() {
    let mut rig = Rig::new("rot/gossip", "rot", "10.74.0");
    let old_key = config(&rig.node(0).0)["encrypt"]
        .as_str()
        .unwrap()
        .to_string();
    let start_agent = |rig: &Rig, i: usize| {
        let root = rig.node(i).0;
        let mut extra = vec![
            "--keyring-data-dir".to_string(),
            root.join("opt/consul").display().to_string(),
            "--keyring-config".into(),
            root.join("etc/consul.d/zz-auto-consul.json")
                .display()
                .to_string(),
        ];
        if i < 3 {
            extra.push("--peers".into());
            extra.push("10.74.0.1:8300,10.74.0.2:8300,10.74.0.3:8300".into());
        }
        rig.agent(i, &extra)
    };
    let mut agents: Vec<FakeAgent> = (0..9).map(|i| start_agent(&rig, i)).collect();
    all_reach_the_servers(&agents[0]).unwrap();

    // A start stopped after it made the new key: the key is there, the
    // record says nothing yet. Starting again takes that key.
    let made = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let dir = rig.secrets_dir.join(&rig.cluster);
    std::fs::create_dir_all(dir.join("agent")).unwrap();
    std::fs::write(dir.join("agent/gossip-key.2"), made).unwrap();
    let started = ok_json(&rig.rotate("gossip-key"));
    assert_eq!(started["started"], true, "{started}");
    assert_eq!(started["next"], 2);
    assert_eq!(rig.record()["gossip_key"]["rotation"], "install");
    // Asked again, it says where the one under way stands.
    let again = ok_json(&rig.rotate("gossip-key"));
    assert_eq!(again["started"], false, "{again}");
    assert_eq!(again["step"], "install");

    // The leader's heartbeat, killed at random moments, then let run; a
    // node boots mid-rotation.
    let mut steps_seen = HashSet::new();
    let mut booted_mid_rotation = false;
    for round in 0..20 {
        let rotation = rig.record()["gossip_key"]["rotation"].clone();
        if rotation.is_null() {
            break;
        }
        steps_seen.insert(rotation.as_str().unwrap().to_string());
        if round == 0 {
            // A new agent boots now: its keyring holds both keys.
            ok_json(&rig.boot(9, "agent"));
            agents.push(start_agent(&rig, 9));
            booted_mid_rotation = true;
        }
        let child = rig.beat(0, &agents[0]);
        match rig.maybe_kill(child, round % 3 != 2, 250) {
            None => eprintln!(
                "pass {round}: killed; the record says {}",
                rig.record()["gossip_key"]
            ),
            Some(out) => eprintln!("pass {round}: {}", ok_json(&out)["rotations"]),
        }
        all_reach_the_servers(&agents[0]).unwrap_or_else(|e| panic!("after pass {round}: {e}"));
    }
    assert!(booted_mid_rotation);
    let rec = rig.record();
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
    ok_json(&rig.boot(3, "agent"));
    assert_eq!(config(&rig.node(3).0)["encrypt"], made);
    let (gossip, list) = rig.listed("gossip-key");
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
    let mut rig = Rig::new("rot/token", "tok", "10.75.0");
    let agents: Vec<FakeAgent> = (0..9).map(|i| rig.agent(i, &[])).collect();
    let token_of = |rig: &Rig, i: usize| config(&rig.node(i).0)["acl"]["tokens"]["agent"].clone();
    // Every node's Consul runs with a token that exists.
    let all_have_tokens = |rig: &Rig| -> Result<(), String> {
        let tokens = acl_tokens(&rig.acl);
        for i in 0..9 {
            let t = token_of(rig, i);
            if tokens.get(t.as_str().unwrap()).is_none() {
                return Err(format!(
                    "{} runs with a token Consul does not have",
                    rig.node(i).1
                ));
            }
        }
        Ok(())
    };
    // The servers' first heartbeats make generation 1 in Consul.
    for (i, agent) in agents.iter().enumerate() {
        ok_json(&rig.beat(i, agent).wait_with_output().unwrap());
    }
    all_have_tokens(&rig).unwrap();
    let old = token_of(&rig, 3).as_str().unwrap().to_string();

    let rotate = ok_json(&rig.rotate("agent-token"));
    assert_eq!(rotate["started"], true, "{rotate}");
    assert_eq!(rig.record()["agent_token"]["rotation"], "create");
    for round in 0..12 {
        if rig.record()["agent_token"]["rotation"].is_null() {
            break;
        }
        // The leader first, then every node; some killed at random.
        for (i, agent) in agents.iter().enumerate() {
            let child = rig.beat(i, agent);
            let kill = rig.rng.below(4) == 0;
            if let Some(out) = rig.maybe_kill(child, kill, 200) {
                ok_json(&out);
            }
        }
        all_have_tokens(&rig).unwrap_or_else(|e| panic!("after round {round}: {e}"));
        eprintln!("after round {round}: {}", rig.record()["agent_token"]);
    }
    let rec = rig.record();
    assert!(rec["agent_token"]["rotation"].is_null(), "{rec}");
    assert_eq!(rec["agent_token"]["generation"], 2, "{rec}");
    let new = rig.secret("agent/agent-token.2");
    for i in 0..9 {
        assert_eq!(token_of(&rig, i), new.as_str(), "{}", rig.node(i).1);
    }
    let tokens = acl_tokens(&rig.acl);
    assert!(
        tokens.get(&old).is_none(),
        "the old token is deleted: {tokens}"
    );
    assert!(tokens.get(&new).is_some());
    // A node booting now gets the new one.
    ok_json(&rig.boot(9, "agent"));
    assert_eq!(
        config(&rig.node(9).0)["acl"]["tokens"]["agent"],
        new.as_str()
    );
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
    let mut rig = Rig::new("rot/ca", "ca", "10.76.0");
    let agents: Vec<FakeAgent> = (0..9).map(|i| rig.agent(i, &[])).collect();
    let tls =
        |rig: &Rig, i: usize, f: &str| rig.node(i).0.join("etc/consul.d/auto-consul-tls").join(f);
    // No live node rejects a live server's certificate.
    let all_trust_the_servers = |rig: &Rig| -> Result<(), String> {
        for i in 0..9 {
            for s in 0..3 {
                if !verifies(&tls(rig, i, "ca.pem"), &tls(rig, s, "server.pem")) {
                    return Err(format!(
                        "{} rejects server {}",
                        rig.node(i).1,
                        rig.node(s).1
                    ));
                }
            }
        }
        Ok(())
    };
    all_trust_the_servers(&rig).unwrap();
    let old_server_cert = rig.tmp.path().join("old-server.pem");
    std::fs::copy(tls(&rig, 0, "server.pem"), &old_server_cert).unwrap();
    // The cluster has been running: every node has heartbeated.
    for (i, agent) in agents.iter().enumerate() {
        ok_json(&rig.beat(i, agent).wait_with_output().unwrap());
    }
    let rotate = ok_json(&rig.rotate("ca"));
    assert_eq!(rotate["started"], true, "{rotate}");
    let mut steps = Vec::new();
    for round in 0..15 {
        let step = rig.record()["ca"]["rotation"].clone();
        if step.is_null() {
            break;
        }
        steps.push(step.as_str().unwrap().to_string());
        for (i, agent) in agents.iter().enumerate() {
            let child = rig.beat(i, agent);
            let kill = rig.rng.below(4) == 0;
            if let Some(out) = rig.maybe_kill(child, kill, 200) {
                let v = ok_json(&out);
                if i == 0 {
                    eprintln!("leader, round {round}: {}", v["rotations"]);
                }
            }
            all_trust_the_servers(&rig)
                .unwrap_or_else(|e| panic!("round {round}, after {}: {e}", rig.node(i).1));
        }
    }
    eprintln!("steps at the start of each round: {steps:?}");
    let rec = rig.record();
    assert!(rec["ca"]["rotation"].is_null(), "{rec}");
    assert_eq!(rec["ca"]["generation"], 2, "{rec}");
    let new_ca = rig.secret("agent/ca-cert.2");
    for i in 0..9 {
        assert_eq!(
            std::fs::read_to_string(tls(&rig, i, "ca.pem"))
                .unwrap()
                .trim(),
            new_ca.trim(),
            "{}",
            rig.node(i).1
        );
        // The old CA is no longer trusted.
        assert!(!verifies(&tls(&rig, i, "ca.pem"), &old_server_cert));
    }
    all_trust_the_servers(&rig).unwrap();
    // A server booting now is signed by the new CA.
    ok_json(&rig.boot(9, "auto"));
    assert_eq!(
        std::fs::read_to_string(tls(&rig, 9, "ca.pem"))
            .unwrap()
            .trim(),
        new_ca.trim()
    );
}

/// A management token rotation, with the servers' fake agents reading
/// `initial_management` from their config at start (as Consul does) and
/// restarted whenever their config's changes (as `systemctl restart` does
/// on the running system); the servers' heartbeats killed at random.
#[test]
fn a_management_token_rotation_restarts_one_server_at_a_time_and_the_old_token_stays_deleted() {
    let mut rig = Rig::new("rot/mgmt", "mgt", "10.77.0");
    let health = rig.tmp.path().join("autopilot.json");
    let set_health = |healthy: bool| {
        std::fs::write(
            &health,
            format!(r#"{{"Healthy": {healthy}, "FailureTolerance": 1, "Servers": []}}"#),
        )
        .unwrap()
    };
    set_health(true);
    let held = |rig: &Rig, i: usize| -> String {
        config(&rig.node(i).0)["acl"]["tokens"]["initial_management"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let start = |rig: &Rig, i: usize| -> (FakeAgent, String) {
        let extra = vec!["--autopilot-file".to_string(), health.display().to_string()];
        (rig.agent_of_config(i, &extra), held(rig, i))
    };
    let mut servers: Vec<(FakeAgent, String)> = (0..3).map(|i| start(&rig, i)).collect();
    let old = rig.management.clone();
    for (i, (agent, held_now)) in servers.iter().enumerate() {
        assert_eq!(*held_now, old, "server {i} starts with the genesis token");
        ok_json(&rig.beat(i, agent).wait_with_output().unwrap());
    }
    assert!(acl_tokens(&rig.acl).get(&old).is_some());

    let started = ok_json(&rig.rotate("management-token"));
    assert_eq!(started["started"], true, "{started}");
    assert_eq!(rig.record()["management_token"]["rotation"], "create");
    let new = rig.secret("server/management-token.2");
    assert_ne!(new, old);

    // Which server restarted, in order, and what the record named then.
    let mut restarts: Vec<usize> = Vec::new();
    let mut gate_checked = false;
    for round in 0..25 {
        let m = rig.record()["management_token"].clone();
        if m.is_null() || m["rotation"].is_null() {
            break;
        }
        for i in 0..3 {
            let named_before = rig.record()["management_token"]["restart"].clone();
            // Right after a restart, autopilot says unhealthy for one pass
            // of the leader: it must not let another server go.
            let gate = i == 0 && restarts.last().is_some_and(|r| *r != 0) && !gate_checked;
            if gate {
                set_health(false);
            }
            let child = rig.beat(i, &servers[i].0);
            let kill = rig.rng.below(4) == 0;
            let out = rig.maybe_kill(child, kill, 200);
            if let Some(out) = &out {
                let v = ok_json(out);
                if i == 0 {
                    eprintln!("round {round}, leader: {}", v["rotations"]);
                }
            }
            if gate {
                let named_after = rig.record()["management_token"]["restart"].clone();
                assert!(
                    named_after == named_before || named_after.is_null(),
                    "with autopilot unhealthy the leader named {named_after} after {named_before}"
                );
                set_health(true);
                gate_checked = out.is_some();
            }
            // systemd's part: a config whose initial_management changed
            // means `systemctl restart consul` ran.
            if held(&rig, i) != servers[i].1 {
                let rec = rig.record()["management_token"].clone();
                let me = rig.node(i).1;
                assert!(
                    rec["restart"] == me.as_str()
                        || rec["rotation"] == "delete"
                        || rec["rotation"].is_null(),
                    "{me} restarted while the record said {rec}"
                );
                let (agent, _) = std::mem::replace(&mut servers[i], start(&rig, i));
                drop(agent);
                restarts.push(i);
                // Every live server holds a token Consul has.
                let tokens = acl_tokens(&rig.acl);
                for (j, (_, h)) in servers.iter().enumerate() {
                    assert!(
                        tokens.get(h).is_some(),
                        "server {j} holds a token Consul lacks"
                    );
                }
            }
        }
    }
    eprintln!("restarts, in order: {restarts:?}");
    let rec = rig.record();
    assert!(
        rec["management_token"].is_null() || rec["management_token"]["rotation"].is_null(),
        "{rec}"
    );
    assert_eq!(rec["management_token"]["generation"], 2, "{rec}");
    // Each server restarted once (a kill between its config and its
    // record may make it twice), the leader last.
    let mut once: Vec<usize> = restarts.clone();
    once.dedup();
    assert_eq!(once.len(), 3, "{restarts:?}");
    assert_eq!(
        *once.last().unwrap(),
        0,
        "the leader restarts last: {restarts:?}"
    );
    assert!(gate_checked, "the autopilot gate was exercised");
    for (i, (_, h)) in servers.iter().enumerate() {
        assert_eq!(*h, new, "server {i}");
    }
    let tokens = acl_tokens(&rig.acl);
    assert!(tokens.get(&old).is_none(), "the old token is deleted");
    assert!(tokens.get(&new).is_some());
    // Any server that wins an election now makes no old token again.
    for (agent, _) in &servers {
        let out = Command::new("curl")
            .args([
                "-sf",
                "-X",
                "PUT",
                &format!("http://{}/_fake/leadership", agent.addr()),
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
    }
    assert!(
        acl_tokens(&rig.acl).get(&old).is_none(),
        "no election brings it back"
    );
    // What the restarts prevent: a server still holding the old one in
    // memory makes it again as leader.
    let stale = rig.agent(1, &[]);
    let out = Command::new("curl")
        .args([
            "-sf",
            "-X",
            "PUT",
            &format!("http://{}/_fake/leadership", stale.addr()),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        acl_tokens(&rig.acl).get(&old).is_some(),
        "the fake does bring a held token back"
    );
    drop(stale);
    // Such a server (one that missed the whole rotation, its Consul started
    // with the old token): its heartbeat restarts it with the new one, then
    // deletes the old one its leadership made again.
    let root1 = rig.node(1).0;
    std::fs::write(
        root1.join("var/lib/auto-consul/management-token-generation"),
        "1\n",
    )
    .unwrap();
    let cfg = root1.join("etc/consul.d/zz-auto-consul.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["acl"]["tokens"]["initial_management"] = Value::String(old.clone());
    std::fs::write(&cfg, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    servers[1] = start(&rig, 1);
    assert_eq!(servers[1].1, old);
    let out = ok_json(&rig.beat(1, &servers[1].0).wait_with_output().unwrap());
    assert_eq!(out["consul_restart"], true, "{out}");
    assert_eq!(held(&rig, 1), new);
    assert!(
        acl_tokens(&rig.acl).get(&old).is_none(),
        "the late server deleted the old token"
    );
    let (row, list) = rig.listed("management-token");
    assert_eq!(row["generation"], 2, "{list}");
    assert!(
        row["where"]
            .as_str()
            .unwrap()
            .ends_with("management-token.2")
    );
}
