//! Secure at genesis: with `--secrets ssm:///PATH`, the cluster makes its
//! gossip key, CA and ACL tokens once, in SSM Parameter Store (moto_server),
//! and every node runs with the same ones; agents read only what agents
//! need; the agents' token is created in Consul once, by a server's
//! heartbeat; bad or denied parameters stop `run` with one clear line.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::{Value, json};

fn ssm(moto: &Moto) -> aws_sdk_ssm::Client {
    let config = aws_sdk_ssm::config::Builder::new()
        .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
        .region(aws_sdk_ssm::config::Region::new("us-east-1"))
        .endpoint_url(moto.url())
        .credentials_provider(aws_sdk_ssm::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .build();
    aws_sdk_ssm::Client::from_conf(config)
}

/// A parameter's value and version.
fn parameter(moto: &Moto, name: &str) -> (String, i64) {
    rt().block_on(async {
        let out = ssm(moto)
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let p = out.parameter().unwrap();
        (p.value().unwrap().to_string(), p.version())
    })
}

fn config(root: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root.join("etc/consul.d/zz-auto-consul.json")).unwrap(),
    )
    .unwrap()
}

fn cluster_id(moto: &Moto, bucket: &str, prefix: &str) -> String {
    let v: Value = serde_json::from_str(&get(moto, bucket, &format!("{prefix}/cluster"))).unwrap();
    v["cluster_id"].as_str().unwrap().to_string()
}

/// The SSM calls moto saw: (action, parameter name, access key id).
fn ssm_calls(moto: &Moto) -> Vec<(String, String, String)> {
    let out = Command::new("curl")
        .args(["-sf", &format!("{}/_ssm", moto.url())])
        .output()
        .expect("curl");
    let calls: Vec<Value> = serde_json::from_slice(&out.stdout).expect("a list");
    calls
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (s("action"), s("name"), s("key"))
        })
        .collect()
}

/// `openssl verify` of a server's certificate against the CA certificate.
fn verifies(ca_pem: &str, cert: &Path) -> bool {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), ca_pem).unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(tmp.path())
        .arg(cert)
        .output()
        .expect("openssl");
    out.status.success()
}

/// Every file under `root` holding `text`.
fn files_holding(root: &Path, text: &str) -> Vec<PathBuf> {
    files_under(root)
        .into_iter()
        .filter(|f| std::fs::read_to_string(root.join(f)).is_ok_and(|body| body.contains(text)))
        .collect()
}

#[test]
fn racing_nodes_share_one_set_of_secrets_and_agents_read_only_theirs() {
    // Its own moto: its SSM call log is this test's alone.
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let p = "sec/race";
    let registry = format!("s3://{bucket}/{p}");
    let secrets = "ssm:///auto-consul/race";
    let tmp = tempfile::tempdir().unwrap();
    let root = |i: usize| tmp.path().join(format!("n{i}"));
    let node = |i: usize| -> Child {
        run_cmd(
            &moto,
            &registry,
            &root(i),
            &format!("race-{i}"),
            &format!("10.70.0.{}", i + 1),
            3,
        )
        .args(["--secrets", secrets])
        // Each node signs with its own key id: moto's log tells who read what.
        .env("AWS_ACCESS_KEY_ID", format!("KEYRACE{i:02}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    // 24 at once; those that fail (an agent before the servers made the
    // secrets: exit 1) run again, as their boot unit would.
    let mut results: HashMap<usize, Value> = HashMap::new();
    let mut pending: Vec<usize> = (0..24).collect();
    for round in 0..8 {
        let children: Vec<(usize, Child)> = pending.iter().map(|&i| (i, node(i))).collect();
        pending.clear();
        for (i, child) in children {
            let out = child.wait_with_output().unwrap();
            match out.status.code() {
                Some(0) => {
                    results.insert(i, json(&out));
                }
                Some(1) => pending.push(i),
                _ => panic!(
                    "node {i}, round {round}: {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        }
        if pending.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    assert!(pending.is_empty(), "never succeeded: {pending:?}");
    let modes: Vec<&str> = (0..24)
        .map(|i| results[&i]["mode"].as_str().unwrap())
        .collect();
    assert_eq!(
        modes.iter().filter(|m| **m == "bootstrap").count(),
        1,
        "{modes:?}"
    );
    assert_eq!(
        modes.iter().filter(|m| **m != "agent").count(),
        3,
        "{modes:?}"
    );

    let id = cluster_id(&moto, &bucket, p);
    let name = |rel: &str| format!("/auto-consul/race/{id}/{rel}");
    // One value per parameter: every create after the first was refused.
    let mut values = HashMap::new();
    for rel in [
        "agent/gossip-key",
        "agent/ca-cert",
        "agent/agent-token",
        "agent/dns-token",
        "server/ca",
        "server/management-token",
    ] {
        let (value, version) = parameter(&moto, &name(rel));
        assert_eq!(version, 1, "{rel} was written more than once");
        values.insert(rel, value);
    }
    let management = values["server/management-token"].trim().to_string();
    for (i, node_mode) in modes.iter().enumerate() {
        let c = config(&root(i));
        assert_eq!(c["encrypt"], values["agent/gossip-key"].trim(), "node {i}");
        assert_eq!(c["acl"]["default_policy"], "deny", "node {i}");
        assert_eq!(
            c["acl"]["tokens"]["agent"],
            values["agent/agent-token"].trim()
        );
        assert_eq!(
            c["acl"]["tokens"]["default"],
            values["agent/dns-token"].trim()
        );
        let tls = root(i).join("etc/consul.d/auto-consul-tls");
        assert_eq!(
            std::fs::read_to_string(tls.join("ca.pem")).unwrap(),
            values["agent/ca-cert"]
        );
        if *node_mode == "agent" {
            // An agent holds neither the CA key nor the management token.
            assert!(
                files_holding(&root(i), "PRIVATE KEY").is_empty(),
                "node {i}"
            );
            assert!(files_holding(&root(i), &management).is_empty(), "node {i}");
            assert_eq!(c["auto_encrypt"]["tls"], true, "node {i}");
            assert!(c["acl"]["tokens"].get("initial_management").is_none());
        } else {
            assert!(
                verifies(&values["agent/ca-cert"], &tls.join("server.pem")),
                "node {i}'s certificate does not verify against the cluster's CA"
            );
            assert_eq!(c["acl"]["tokens"]["initial_management"], management);
            assert_eq!(c["tls"]["internal_rpc"]["verify_server_hostname"], true);
        }
    }
    // Nothing secret in S3, in stdout or in the logs.
    for k in keys(&moto, &bucket, p) {
        let body = get(&moto, &bucket, &k);
        assert!(
            !body.contains(&management) && !body.contains("PRIVATE KEY"),
            "{k}"
        );
    }
    for v in results.values() {
        assert!(!v.to_string().contains(&management));
    }
    // Who read what: agents only ever asked for agent/ parameters.
    let calls = ssm_calls(&moto);
    let agent_keys: Vec<String> = (0..24)
        .filter(|i| modes[*i] == "agent")
        .map(|i| format!("KEYRACE{i:02}"))
        .collect();
    let by_agents: Vec<&(String, String, String)> =
        calls.iter().filter(|c| agent_keys.contains(&c.2)).collect();
    assert!(!by_agents.is_empty(), "agents read their secrets from SSM");
    for (action, name, key) in &by_agents {
        assert_eq!(action, "GetParameter", "{key} {name}");
        assert!(name.contains("/agent/"), "agent {key} read {name}");
    }
}

#[test]
fn a_node_stopped_while_making_the_secrets_is_finished_by_the_next() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "sec/stopped";
    let registry = format!("s3://{bucket}/{p}");
    let secrets = "ssm:///auto-consul/stopped";
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    // Node a takes slot 0, then cannot reach SSM: it stops with exit 1
    // before the cluster record is written.
    let out = output(
        run_cmd(moto, &registry, &a, "st-a", "10.71.0.1", 3)
            .args(["--secrets", secrets])
            .env(
                "AWS_ENDPOINT_URL_SSM",
                format!("http://127.0.0.1:{}", closed_port()),
            ),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("SSM"), "{err}");
    assert!(keys(moto, &bucket, &format!("{p}/cluster")).is_empty());
    // Node b joins a's unfinished cluster and makes its secrets.
    let vb = ok_json(&output(
        run_cmd(moto, &registry, &b, "st-b", "10.71.0.2", 3).args(["--secrets", secrets]),
    ));
    assert_eq!(vb["mode"], "server");
    assert_eq!(config(&b)["bootstrap"], false);
    // Node a runs again: its genesis was never finished, so it bootstraps,
    // with the secrets b made.
    let va = ok_json(&output(
        run_cmd(moto, &registry, &a, "st-a", "10.71.0.1", 3).args(["--secrets", secrets]),
    ));
    assert_eq!(va["mode"], "bootstrap", "{va}");
    assert_eq!(config(&a)["bootstrap"], true);
    assert_eq!(config(&a)["encrypt"], config(&b)["encrypt"]);
    assert_eq!(
        config(&a)["acl"]["tokens"]["initial_management"],
        config(&b)["acl"]["tokens"]["initial_management"]
    );
    let id = cluster_id(moto, &bucket, p);
    assert_eq!(va["cluster_id"], id.as_str());
    let (ca, _) = parameter(moto, &format!("/auto-consul/stopped/{id}/agent/ca-cert"));
    for root in [&a, &b] {
        assert!(verifies(
            &ca,
            &root.join("etc/consul.d/auto-consul-tls/server.pem")
        ));
    }
}

#[test]
fn the_agents_token_is_made_in_consul_once_by_the_servers_heartbeats() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "sec/acl";
    let registry = format!("s3://{bucket}/{p}");
    let secrets = "ssm:///auto-consul/acl";
    let tmp = tempfile::tempdir().unwrap();
    let nodes: Vec<(PathBuf, String, String)> = (0..3)
        .map(|i| {
            (
                tmp.path().join(format!("s{i}")),
                format!("acl-{i}"),
                format!("10.72.0.{}", i + 1),
            )
        })
        .collect();
    for (root, node, ip) in &nodes {
        ok_json(&output(
            run_cmd(moto, &registry, root, node, ip, 3).args(["--secrets", secrets]),
        ));
    }
    let id = cluster_id(moto, &bucket, p);
    let (management, _) = parameter(
        moto,
        &format!("/auto-consul/acl/{id}/server/management-token"),
    );
    let (agent_token, _) = parameter(moto, &format!("/auto-consul/acl/{id}/agent/agent-token"));
    // One Consul cluster: the three fake agents share its ACL state.
    let acl = tmp.path().join("acl");
    std::fs::create_dir_all(&acl).unwrap();
    let agents: Vec<FakeAgent> = nodes
        .iter()
        .map(|(_, node, ip)| {
            FakeAgent::start(
                node,
                true,
                &[
                    "--address",
                    ip,
                    "--leader",
                    "10.72.0.1:8300",
                    "--acl-dir",
                    acl.to_str().unwrap(),
                    "--acl-management",
                    management.trim(),
                ],
            )
        })
        .collect();
    let beat_all = || {
        let children: Vec<Child> = nodes
            .iter()
            .zip(&agents)
            .map(|((root, node, ip), agent)| {
                heartbeat_cmd(moto, &registry, root, node, ip, &agent.addr())
                    .args(["--secrets", secrets])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            ok_json(&out);
        }
    };
    beat_all();
    let log = || -> Vec<Value> {
        std::fs::read_to_string(acl.join("acl-log.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let writes = log();
    // Each token made once: the agents' and the DNS one.
    let made = |path: &str, policy: &str| -> Vec<&Value> {
        writes
            .iter()
            .filter(|w| w["path"] == path)
            .filter(|w| w["body"]["Name"] == policy || w["body"]["Policies"][0]["Name"] == policy)
            .collect()
    };
    let tokens = made("/v1/acl/token", "auto-consul-agent");
    let policies = made("/v1/acl/policy", "auto-consul-agent");
    assert_eq!(tokens.len(), 1, "{writes:?}");
    assert_eq!(policies.len(), 1, "{writes:?}");
    assert_eq!(
        made("/v1/acl/token", "auto-consul-dns").len(),
        1,
        "{writes:?}"
    );
    assert_eq!(
        made("/v1/acl/policy", "auto-consul-dns").len(),
        1,
        "{writes:?}"
    );
    // And the ACL replication token a secondary datacenter would need,
    // made once too (global: Local false).
    let replication = made("/v1/acl/token", "auto-consul-replication");
    assert_eq!(replication.len(), 1, "{writes:?}");
    assert_eq!(replication[0]["body"]["Local"], json!(false));
    assert_eq!(
        made("/v1/acl/policy", "auto-consul-replication").len(),
        1,
        "{writes:?}"
    );
    assert_eq!(writes.len(), 6, "{writes:?}");
    assert_eq!(
        tokens[0]["body"]["Local"],
        json!(true),
        "a datacenter's own"
    );
    assert_eq!(tokens[0]["body"]["SecretID"], agent_token.trim());
    assert_eq!(
        tokens[0]["body"]["Policies"][0]["Name"],
        "auto-consul-agent"
    );
    let rules = policies[0]["body"]["Rules"].as_str().unwrap();
    assert!(rules.contains("node_prefix \"\"") && rules.contains("service_prefix \"\""));
    // Later heartbeats ask nothing more.
    beat_all();
    assert_eq!(log().len(), writes.len());
    for (root, _, _) in &nodes {
        assert_eq!(
            std::fs::read_to_string(root.join("var/lib/auto-consul/agent-token-made"))
                .unwrap()
                .trim(),
            id
        );
    }
}

#[test]
fn a_garbage_or_denied_parameter_stops_run_with_one_line_naming_it() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let p = "sec/bad";
    let registry = format!("s3://{bucket}/{p}");
    let secrets = "ssm:///auto-consul/bad";
    let tmp = tempfile::tempdir().unwrap();
    ok_json(&output(
        run_cmd(
            &moto,
            &registry,
            &tmp.path().join("s"),
            "bad-s",
            "10.73.0.1",
            1,
        )
        .args(["--secrets", secrets]),
    ));
    let id = cluster_id(&moto, &bucket, p);
    let agent = |name: &str| {
        let root = tmp.path().join(name);
        let out = output(
            run_cmd(&moto, &registry, &root, name, "10.73.0.9", 1).args(["--secrets", secrets]),
        );
        (out, root)
    };

    // SSM refuses the read: exit 1, the parameter and the permission named.
    moto.faults(serde_json::json!([{
        "match": "AmazonSSM.GetParameter", "status": 400,
        "code": "AccessDeniedException", "json": true, "count": 100
    }]));
    let (out, root) = agent("denied");
    moto.faults(serde_json::json!([]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let first = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    // The reads go at once: whichever is refused first is named.
    for needle in [
        format!("SSM parameter /auto-consul/bad/{id}/agent/"),
        "ssm:GetParameter".to_string(),
    ] {
        assert!(first.contains(&needle), "{needle:?} missing: {err}");
    }
    assert!(
        !root.join("etc/consul.d/zz-auto-consul.json").exists(),
        "nothing half-written"
    );

    // A parameter holding garbage: exit 2, named, nothing written.
    rt().block_on(
        ssm(&moto)
            .put_parameter()
            .name(format!("/auto-consul/bad/{id}/agent/gossip-key"))
            .value("garbage")
            .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
            .overwrite(true)
            .send(),
    )
    .unwrap();
    let (out, root) = agent("garbage");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let first = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        first.contains(&format!("/auto-consul/bad/{id}/agent/gossip-key"))
            && first.contains("not base64"),
        "{err}"
    );
    assert!(
        !err.contains("garbage"),
        "a secret's value is never shown: {err}"
    );
    assert!(!root.join("etc/consul.d/zz-auto-consul.json").exists());
}

#[test]
fn a_terminating_server_leaves_under_default_deny_with_the_management_token() {
    // A moto of its own: it serves this test's instance metadata.
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let p = "sec/leave";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let secrets_dir = tmp.path().join("secrets");
    std::fs::create_dir_all(&secrets_dir).unwrap();
    let secrets = format!("file://{}", secrets_dir.display());
    let root = tmp.path().join("s");
    ok_json(&output(
        run_cmd(&moto, &registry, &root, "lv-s", "10.77.0.1", 1).args(["--secrets", &secrets]),
    ));
    let id = cluster_id(&moto, &bucket, p);
    let management = std::fs::read_to_string(secrets_dir.join(&id).join("server/management-token"))
        .unwrap()
        .trim()
        .to_string();
    let acl = tmp.path().join("acl");
    std::fs::create_dir_all(&acl).unwrap();
    let left = tmp.path().join("left");
    // Default deny: Consul's ACL state, where leaving takes agent:write.
    let agent = FakeAgent::start(
        "lv-s",
        true,
        &[
            "--address",
            "10.77.0.1",
            "--acl-dir",
            acl.to_str().unwrap(),
            "--acl-management",
            &management,
            "--leave-file",
            left.to_str().unwrap(),
        ],
    );
    moto.imds(
        "/latest/meta-data/autoscaling/target-lifecycle-state",
        Some("Terminated"),
    );
    let leave = |extra: &[&str]| {
        let mut cmd = auto_consul(&moto);
        cmd.args([
            "leave",
            "--json",
            "--if-terminating",
            "--registry",
            &registry,
            "--address",
            "10.77.0.1",
            "--node",
            "lv-s",
        ])
        .args(extra)
        .arg("--root")
        .arg(&root)
        .env("CONSUL_HTTP_ADDR", agent.addr())
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", moto.url());
        output(&mut cmd)
    };
    // Without a token that may, Consul refuses the leave (as it did before
    // the server read its management token).
    let refused = leave(&[]);
    assert!(!left.exists());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("agent:write"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // With the secrets store, the server leaves with the management token.
    ok_json(&leave(&["--secrets", &secrets]));
    assert!(left.exists(), "the server left Consul's Raft");
}

/// `curl` against a fake agent: the status code and the body.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn dns_and_discovery_answer_under_default_deny_with_the_dns_token() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "sec/dns";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let secrets_dir = tmp.path().join("secrets");
    std::fs::create_dir_all(&secrets_dir).unwrap();
    let secrets = format!("file://{}", secrets_dir.display());
    let (s, a) = (tmp.path().join("s"), tmp.path().join("a"));
    ok_json(&output(
        run_cmd(moto, &registry, &s, "dns-s", "10.78.0.1", 1).args(["--secrets", &secrets]),
    ));
    ok_json(&output(
        run_cmd(moto, &registry, &a, "dns-a", "10.78.0.2", 1).args([
            "--role",
            "agent",
            "--secrets",
            &secrets,
        ]),
    ));
    let id = cluster_id(moto, &bucket, p);
    let secret = |rel: &str| {
        std::fs::read_to_string(secrets_dir.join(&id).join(rel))
            .unwrap()
            .trim()
            .to_string()
    };
    let (management, dns) = (secret("server/management-token"), secret("agent/dns-token"));
    // Every node runs with the DNS token as its default token.
    for root in [&s, &a] {
        assert_eq!(config(root)["acl"]["tokens"]["default"], dns.as_str());
    }
    let acl = tmp.path().join("acl");
    std::fs::create_dir_all(&acl).unwrap();
    let fake = |node: &str, ip: &str, server: bool, config: Option<&Path>| {
        let mut args = vec![
            "--address".to_string(),
            ip.to_string(),
            "--leader".into(),
            "10.78.0.1:8300".into(),
            "--acl-dir".into(),
            acl.display().to_string(),
            "--acl-management".into(),
            management.clone(),
        ];
        if let Some(c) = config {
            args.push("--config-file".into());
            args.push(c.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        FakeAgent::start(node, server, &args)
    };
    let agent_s = fake(
        "dns-s",
        "10.78.0.1",
        true,
        Some(&s.join("etc/consul.d/zz-auto-consul.json")),
    );
    let agent_a = fake(
        "dns-a",
        "10.78.0.2",
        false,
        Some(&a.join("etc/consul.d/zz-auto-consul.json")),
    );
    // The server's heartbeat makes the DNS token (and its policy) in Consul.
    ok_json(&output(
        heartbeat_cmd(moto, &registry, &s, "dns-s", "10.78.0.1", &agent_s.addr())
            .args(["--secrets", &secrets]),
    ));
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(acl.join("acl-state.json")).unwrap())
            .unwrap();
    let rules = state["policies"]["auto-consul-dns"]["Rules"]
        .as_str()
        .unwrap();
    for rule in [
        "node_prefix \"\"",
        "service_prefix \"\"",
        "query_prefix \"\"",
    ] {
        assert!(rules.contains(rule), "{rules}");
    }
    assert!(!rules.contains("write"), "{rules}");
    assert!(state["tokens"].get(&dns).is_some());

    // A local service registers with a token that may write it; the
    // default (DNS) token may not.
    let register = |token: Option<&str>| {
        let mut args = vec![
            "-X".to_string(),
            "PUT".into(),
            "-d".into(),
            r#"{"Name": "web", "Port": 8080}"#.into(),
        ];
        if let Some(t) = token {
            args.push("-H".into());
            args.push(format!("X-Consul-Token: {t}"));
        }
        args.push(format!(
            "http://{}/v1/agent/service/register",
            agent_a.addr()
        ));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&args).0
    };
    assert_eq!(register(None), 403);
    assert_eq!(register(Some(&management)), 200);
    // Discovery without a token answers under default deny (the DNS token)...
    let (code, body) = curl(&[&format!("http://{}/v1/catalog/service/web", agent_a.addr())]);
    assert_eq!(code, 200);
    let found: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(found.as_array().unwrap().len(), 1, "{body}");
    assert_eq!(found[0]["ServicePort"], 8080);
    // ...and an agent without it answers nothing, as Consul's default deny.
    let bare = fake("dns-b", "10.78.0.3", false, None);
    let (_, body) = curl(&[&format!("http://{}/v1/catalog/service/web", bare.addr())]);
    assert_eq!(body.trim(), "[]");
}
