//! Quorum-loss recovery: `recover` computes the `raft/peers.json` of
//! Consul's outage guide for the servers that survive (holding this
//! cluster's slots at any age, running by EC2), with the node ids their
//! heartbeats publish; `--plan` pins it in the registry, `--apply HASH`
//! writes exactly the pinned file on the node it runs on, however long after
//! the survivors' Consul stopped.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn recover(
    moto: &Moto,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
    id: &str,
    args: &[&str],
) -> std::process::Output {
    output(
        node_cmd(moto, "recover", registry, root, node, ip)
            .args(["--instance-id", id])
            .args(args),
    )
}

#[test]
fn peers_json_lists_the_surviving_servers_with_their_node_ids() {
    let moto = moto();
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/recover/q");
    let tmp = tempfile::tempdir().unwrap();
    let ids = run_instances(moto, 3);
    let nodes: Vec<(PathBuf, String, String, String)> = (0..3)
        .map(|i| {
            (
                tmp.path().join(format!("s{i}")),
                format!("rc-{i}"),
                format!("10.95.0.{}", i + 1),
                format!("{:08x}-0000-4000-8000-00000000000{i}", 0xabc + i),
            )
        })
        .collect();
    for (i, (root, node, ip, node_id)) in nodes.iter().enumerate() {
        ok_json(&output(
            run_cmd(moto, &registry, root, node, ip, 3).args(["--instance-id", &ids[i]]),
        ));
        // Consul's node id, as Consul writes it in the data dir.
        std::fs::create_dir_all(root.join("opt/consul")).unwrap();
        std::fs::write(root.join("opt/consul/node-id"), node_id).unwrap();
        let agent = FakeAgent::start(node, true, &["--address", ip]);
        let beat = ok_json(&output(
            heartbeat_cmd(moto, &registry, root, node, ip, &agent.addr())
                .args(["--instance-id", &ids[i]]),
        ));
        assert!(beat["keys"][0].as_str().unwrap().starts_with("servers/"));
    }
    // Two of three servers are lost: one terminated, the other survives.
    terminate(moto, &[&ids[2]]);
    let (root, node, ip, _) = &nodes[0];
    let shown = ok_json(&recover(moto, &registry, root, node, ip, &ids[0], &[]));
    assert_eq!(shown["pinned"], Value::Null, "{shown}");
    let path = |r: &Path| r.join("opt/consul/raft/peers.json");
    assert!(!path(root).exists(), "recover alone writes nothing");
    // The operator's Consul config names another RPC port: the plan's
    // addresses carry it.
    std::fs::write(
        root.join("etc/consul.d/ports.json"),
        r#"{"ports": {"server": 8400}}"#,
    )
    .unwrap();
    let plan = ok_json(&recover(
        moto,
        &registry,
        root,
        node,
        ip,
        &ids[0],
        &["--plan"],
    ));
    let hash = plan["sha256"].as_str().unwrap().to_string();
    assert_eq!(plan["pinned"], hash.as_str());
    let peers = plan["peers"].as_array().unwrap();
    let mut got: Vec<(String, String)> = peers
        .iter()
        .map(|p| {
            assert_eq!(p["non_voter"], false);
            (
                p["id"].as_str().unwrap().to_string(),
                p["address"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    let want: Vec<(String, String)> = nodes[..2]
        .iter()
        .map(|(_, _, ip, id)| (id.clone(), format!("{ip}:8400")))
        .collect();
    assert_eq!(got, want, "{plan}");
    assert!(!path(root).exists(), "--plan writes no file on the node");
    assert!(plan["steps"].to_string().contains("systemctl stop consul"));

    // Consul stops on both survivors: their heartbeats age past the
    // expiry (10 minutes), and each applies the pinned plan 5 minutes
    // after the other.
    let prefix = "recover/q/";
    moto.age(&bucket, prefix, 600);
    let applied = ok_json(&recover(
        moto,
        &registry,
        root,
        node,
        ip,
        &ids[0],
        &["--apply", &hash],
    ));
    assert_eq!(applied["written"], true);
    moto.age(&bucket, prefix, 300);
    let (root1, node1, ip1, _) = &nodes[1];
    ok_json(&recover(
        moto,
        &registry,
        root1,
        node1,
        ip1,
        &ids[1],
        &["--apply", &hash],
    ));
    let first = std::fs::read(path(root)).unwrap();
    assert_eq!(
        first,
        std::fs::read(path(root1)).unwrap(),
        "both survivors write the same file"
    );
    let file: Value = serde_json::from_slice(&first).unwrap();
    assert_eq!(file, Value::Array(peers.clone()), "the file is the plan");

    // The lost server, a hash that is not the pinned plan's: refused, and
    // nothing written.
    let (root2, node2, ip2, _) = &nodes[2];
    let out = recover(
        moto,
        &registry,
        root2,
        node2,
        ip2,
        &ids[2],
        &["--apply", &hash],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not among the pinned plan's survivors"),
        "{err}"
    );
    assert!(!path(root2).exists());
    let out = recover(
        moto,
        &registry,
        root1,
        node1,
        ip1,
        &ids[1],
        &["--apply", "00ff"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&hash) && err.contains("made again"), "{err}");

    // A survivor whose heartbeats carry no node id: a plan made now
    // names it, and --apply refuses, naming it, and writes nothing.
    std::fs::remove_file(root1.join("opt/consul/node-id")).unwrap();
    let agent = FakeAgent::start(node1, true, &["--address", ip1]);
    ok_json(&output(
        heartbeat_cmd(moto, &registry, root1, node1, ip1, &agent.addr())
            .args(["--instance-id", &ids[1]]),
    ));
    ok_json(&recover(
        moto,
        &registry,
        root,
        node,
        ip,
        &ids[0],
        &["--plan"],
    ));
    std::fs::remove_file(path(root)).unwrap();
    let out = recover(moto, &registry, root, node, ip, &ids[0], &["--apply"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(node1.as_str()) && err.contains("node id"),
        "{err}"
    );
    assert!(!path(root).exists());

    // Two of the three terminated: the survivor alone, in Consul's format.
    terminate(moto, &[&ids[1]]);
    let plan = ok_json(&recover(moto, &registry, root, node, ip, &ids[0], &[]));
    assert_eq!(
        plan["peers"],
        serde_json::json!([{"id": nodes[0].3, "address": format!("{ip}:8400"), "non_voter": false}]),
        "{plan}"
    );
}
