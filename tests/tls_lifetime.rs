//! Nothing the cluster made expires or goes stale: servers' certificates
//! renew while they run (a server's heartbeat, with the clock moved on by
//! libfaketime), Consul reloads them and presents the new one on its RPC
//! port (the fake agent serves Consul's RPC TLS), `status` warns 14 days
//! before expiry, `--domain` names the certificates, and a gossip keyring
//! that Consul would prefer to the new key is moved aside.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn config(root: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root.join("etc/consul.d/zz-auto-consul.json")).unwrap(),
    )
    .unwrap()
}

fn tls_file(root: &Path, name: &str) -> PathBuf {
    root.join("etc/consul.d/auto-consul-tls").join(name)
}

/// `openssl verify` of `cert` against `ca` at Unix time `at`, for the name
/// `host`.
fn verifies_at(ca: &Path, cert: &Path, at: i64, host: &str) -> Result<(), String> {
    let out = Command::new("openssl")
        .args([
            "verify",
            "-attime",
            &at.to_string(),
            "-verify_hostname",
            host,
            "-CAfile",
        ])
        .arg(ca)
        .arg(cert)
        .output()
        .expect("openssl");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

const DAY: i64 = 86_400;

#[test]
fn server_certificates_renew_while_running_and_status_warns_before_expiry() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "tls/renew";
    let registry = format!("s3://{bucket}/{p}");
    let secrets = "ssm:///auto-consul/renew";
    let tmp = tempfile::tempdir().unwrap();
    // Loopback addresses: the fake agents serve RPC TLS on them.
    let nodes: Vec<(PathBuf, String, String, u16)> = (0..3)
        .map(|i| {
            (
                tmp.path().join(format!("s{i}")),
                format!("tls-{i}"),
                format!("127.0.3.{}", i + 1),
                closed_port(),
            )
        })
        .collect();
    let genesis = chrono::Utc::now().timestamp();
    for (root, node, ip, port) in &nodes {
        // The operator's own file sets Consul's RPC port.
        let dir = root.join("etc/consul.d");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ports.json"),
            format!("{{\"ports\": {{\"server\": {port}}}}}"),
        )
        .unwrap();
        ok_json(&output(run_cmd(moto, &registry, root, node, ip, 3).args([
            "--secrets",
            secrets,
            "--domain",
            "example",
        ])));
        // --domain is Consul's, and the certificate's name.
        assert_eq!(config(root)["domain"], "example");
        verifies_at(
            &tls_file(root, "ca.pem"),
            &tls_file(root, "server.pem"),
            genesis,
            "server.dc1.example",
        )
        .unwrap();
        assert!(
            verifies_at(
                &tls_file(root, "ca.pem"),
                &tls_file(root, "server.pem"),
                genesis,
                "server.dc1.consul",
            )
            .is_err()
        );
    }
    let ca = tls_file(&nodes[0].0, "ca.pem");
    // Day 366 without renewal: every certificate made at genesis has
    // expired.
    for (root, ..) in &nodes {
        let err = verifies_at(
            &ca,
            &tls_file(root, "server.pem"),
            genesis + 366 * DAY,
            "server.dc1.example",
        )
        .unwrap_err();
        assert!(err.contains("expired"), "{err}");
    }

    // `status` with the heartbeat stopped: quiet on day 350, degraded from
    // day 351 (14 days before the end).
    let (root, node, ip, _) = &nodes[0];
    let agent = FakeAgent::start(node, true, &["--address", ip]);
    let tls_reasons = |offset: &str| -> Vec<String> {
        let out = output(skewed(
            &mut agent_cmd(moto, "status", &registry, root, node, ip, &agent.addr()),
            offset,
        ));
        json(&out)["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .filter(|r| r.contains("TLS"))
            .collect()
    };
    assert!(tls_reasons("+350d").is_empty());
    let late = tls_reasons("+351d");
    assert_eq!(late.len(), 1, "{late:?}");
    assert!(late[0].contains("TLS certificate expires"), "{late:?}");
    drop(agent);

    // The heartbeats run on: on day 200 nothing is due; on day 340 every
    // server renews, with no reboot, and Consul presents the new one.
    let agents: Vec<FakeAgent> = nodes
        .iter()
        .map(|(root, node, ip, port)| {
            let f = |n: &str| tls_file(root, n).display().to_string();
            FakeAgent::start_skewed(
                node,
                true,
                &[
                    "--address",
                    ip,
                    "--rpc-port",
                    &port.to_string(),
                    "--rpc-cert",
                    &f("server.pem"),
                    "--rpc-key",
                    &f("server-key.pem"),
                    "--rpc-ca",
                    &f("ca.pem"),
                ],
                "+340d",
            )
        })
        .collect();
    let beat = |i: usize, offset: &str| {
        let (root, node, ip, _) = &nodes[i];
        ok_json(&output(skewed(
            heartbeat_cmd(moto, &registry, root, node, ip, &agents[i].addr()).args([
                "--secrets",
                secrets,
                "--domain",
                "example",
                "--metrics-file",
                "/metrics.prom",
            ]),
            offset,
        )))
    };
    for i in 0..3 {
        let v = beat(i, "+200d");
        assert_eq!(v["tls"]["renewed"], false, "{v}");
    }
    let mut renew_days = Vec::new();
    for (i, (root, ..)) in nodes.iter().enumerate() {
        let before = std::fs::read_to_string(tls_file(root, "server.pem")).unwrap();
        let v = beat(i, "+340d");
        assert_eq!(v["tls"]["renewed"], true, "{v}");
        assert_eq!(v["tls"]["served"], "new", "{v}");
        let after = std::fs::read_to_string(tls_file(root, "server.pem")).unwrap();
        assert_ne!(before, after);
        // Day 366: what Consul now presents verifies, for its name.
        verifies_at(
            &ca,
            &tls_file(root, "server.pem"),
            genesis + 366 * DAY,
            "server.dc1.example",
        )
        .unwrap();
        let metrics = std::fs::read_to_string(root.join("metrics.prom")).unwrap();
        assert!(
            metrics.contains("auto_consul_tls_expiry_timestamp_seconds{command=\"heartbeat\",file=\"certificate\"}"),
            "{metrics}"
        );
        // The next renewal, by the new certificate's date and this node's
        // spread: two thirds of its life, less up to a twelfth.
        let next = chrono::DateTime::parse_from_rfc3339(v["tls"]["renew_at"].as_str().unwrap())
            .unwrap()
            .timestamp();
        renew_days.push((next - genesis) / DAY);
    }
    for d in &renew_days {
        assert!((340 + 213..=340 + 244).contains(d), "{renew_days:?}");
    }
    // Servers made together do not renew together.
    renew_days.sort();
    renew_days.dedup();
    assert!(renew_days.len() > 1, "{renew_days:?}");
}

/// The gossip keys a Consul started now on `root` would use (the fake
/// agent reads the data dir's keyring, or the config's `encrypt`).
fn keys_in_use(root: &Path, node: &str) -> Vec<String> {
    let agent = FakeAgent::start(
        node,
        false,
        &[
            "--keyring-data-dir",
            root.join("opt/consul").to_str().unwrap(),
            "--keyring-config",
            root.join("etc/consul.d/zz-auto-consul.json")
                .to_str()
                .unwrap(),
        ],
    );
    let out = Command::new("curl")
        .args([
            "-sf",
            &format!("http://{}/v1/operator/keyring", agent.addr()),
        ])
        .output()
        .expect("curl");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["Keys"].as_object().unwrap().keys().cloned().collect()
}

#[test]
fn a_keyring_of_a_replaced_cluster_is_moved_aside_and_a_current_one_kept() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "tls/keyring";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let secrets_dir = tmp.path().join("secrets");
    std::fs::create_dir_all(&secrets_dir).unwrap();
    let secrets = format!("file://{}", secrets_dir.display());
    let ids = run_instances(moto, 1);
    let a = tmp.path().join("a");
    ok_json(&output(
        run_cmd(moto, &registry, &a, "kr-a", "10.73.0.1", 1).args([
            "--instance-id",
            &ids[0],
            "--secrets",
            &secrets,
        ]),
    ));
    // An agent of cluster A, whose Consul wrote its keyring.
    let x = tmp.path().join("x");
    let boot_x = || {
        output(run_cmd(moto, &registry, &x, "kr-x", "10.73.0.9", 1).args([
            "--role",
            "agent",
            "--secrets",
            &secrets,
        ]))
    };
    ok_json(&boot_x());
    let key_a = config(&x)["encrypt"].as_str().unwrap().to_string();
    let ring = x.join("opt/consul/serf/local.keyring");
    std::fs::create_dir_all(ring.parent().unwrap()).unwrap();
    std::fs::write(&ring, format!("[\"{key_a}\"]")).unwrap();
    // A reboot in the same cluster keeps it: it holds the key.
    let again = boot_x();
    ok_json(&again);
    assert!(ring.exists(), "{}", stderr(&again));
    assert_eq!(keys_in_use(&x, "kr-x"), std::slice::from_ref(&key_a));

    // Cluster A is replaced by B (a new gossip key).
    terminate(moto, &[&ids[0]]);
    moto.age(&bucket, &format!("{p}/"), 3 * 120 + 5);
    let b = tmp.path().join("b");
    ok_json(&output(
        run_cmd(moto, &registry, &b, "kr-b", "10.73.0.2", 1).args([
            "--witness-wait",
            "1",
            "--no-restore",
            "--secrets",
            &secrets,
        ]),
    ));
    let key_b = config(&b)["encrypt"].as_str().unwrap().to_string();
    assert_ne!(key_a, key_b);
    // Before the reboot, Consul on x would still gossip with A's key,
    // whatever its config says.
    std::fs::write(
        x.join("etc/consul.d/zz-auto-consul.json"),
        config(&x).to_string().replace(&key_a, &key_b),
    )
    .unwrap();
    assert_eq!(keys_in_use(&x, "kr-x"), std::slice::from_ref(&key_a));
    // The agent reboots: its old keyring is moved aside, kept.
    let out = boot_x();
    ok_json(&out);
    assert!(!ring.exists());
    let aside: Vec<_> = std::fs::read_dir(ring.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("local.keyring.stale-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(
        stderr(&out).contains("moved Consul's gossip keyring"),
        "{}",
        stderr(&out)
    );
    assert_eq!(config(&x)["encrypt"], key_b.as_str());
    assert_eq!(keys_in_use(&x, "kr-x"), [key_b]);
}
