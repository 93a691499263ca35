//! DESIGN.md's "`bootstrap: true` has one gate": the bootstrap node of a
//! cluster, run again, writes `"bootstrap": true` only when it has no Raft
//! state and no other server of the cluster is live or unconfirmed; with
//! or without its state file. Every combination is tried with the real
//! binary against moto_server (S3 and EC2), and so are the heartbeat's
//! rewrites of the config, the gossip key and the datacenter checks, and a
//! server stopped past Consul's `server_rejoin_age_max`.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

fn config(root: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root.join("etc/consul.d/zz-auto-consul.json")).unwrap(),
    )
    .unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Peer {
    /// The other server's slot is live.
    Live,
    /// Its slot expired, unreleased, and EC2 says its instance runs.
    Unconfirmed,
    /// Its slot expired and EC2 says its instance is terminated.
    Gone,
}

/// One cell of the matrix: bootstrap node `b` and server `s` of a
/// two-server cluster; then `b` loses its state file and/or holds Raft
/// data, `s` is live, unconfirmed or gone, and `b` runs again.
fn bootstrap_node_runs_again(case: usize, state_file: bool, raft: bool, peer: Peer) {
    let moto = moto();
    let bucket = bucket(moto);
    let p = format!("gate/{case}");
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let ids = run_instances(moto, 2);
    let (b, s) = (tmp.path().join("b"), tmp.path().join("s"));
    let run = |root: &Path, node: &str, ip: &str, id: &str| {
        let mut cmd = run_cmd(moto, &registry, root, node, ip, 2);
        cmd.args(["--instance-id", id, "--witness-wait", "1"]);
        cmd
    };
    let first = ok_json(&output(&mut run(&b, "b", "10.40.0.1", &ids[0])));
    assert_eq!(mode(&first), "bootstrap");
    assert_eq!(config(&b)["bootstrap"], true);
    let second = ok_json(&output(&mut run(&s, "s", "10.40.0.2", &ids[1])));
    assert_eq!(mode(&second), "server");

    if peer != Peer::Live {
        // Only s's slot goes silent (three expiries); b's slot 0 stays live.
        assert_eq!(moto.age(&bucket, &format!("{p}/slots/server-1"), 365), 1);
    }
    if peer == Peer::Gone {
        terminate(moto, &[&ids[1]]);
    }
    if !state_file {
        std::fs::remove_file(b.join("var/lib/auto-consul/state.json")).unwrap();
    }
    if raft {
        std::fs::create_dir_all(b.join("opt/consul/raft")).unwrap();
        std::fs::write(b.join("opt/consul/raft/raft.db"), b"raft").unwrap();
    }

    let again = ok_json(&output(&mut run(&b, "b", "10.40.0.1", &ids[0])));
    let may_bootstrap = !raft && peer == Peer::Gone;
    let what = format!("state file {state_file}, raft {raft}, peer {peer:?}: {again}");
    assert_eq!(again["bootstrap"], may_bootstrap, "{what}");
    assert_eq!(config(&b)["bootstrap"], may_bootstrap, "{what}");
    assert_eq!(config(&b)["server"], true, "{what}");
    let want = if may_bootstrap { "bootstrap" } else { "server" };
    assert_eq!(mode(&again), want, "{what}");
    // It keeps slot 0 either way: it is still the same cluster's server.
    assert_eq!(again["slot"], 0, "{what}");
    let join = again["retry_join"].as_array().unwrap();
    if peer == Peer::Live {
        assert_eq!(join, &[Value::from("10.40.0.2")], "{what}");
    }
}

#[test]
fn the_bootstrap_node_bootstraps_again_only_with_no_raft_state_and_every_peer_gone() {
    let mut case = 0;
    for state_file in [true, false] {
        for raft in [true, false] {
            for peer in [Peer::Live, Peer::Unconfirmed, Peer::Gone] {
                bootstrap_node_runs_again(case, state_file, raft, peer);
                case += 1;
            }
        }
    }
}

#[test]
fn the_heartbeat_turns_bootstrap_off_once_raft_state_or_peers_exist() {
    let moto = moto();
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/gate/heartbeat");
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    let first = run_node(moto, &registry, &b, "b", "10.41.0.1", 3);
    assert_eq!(mode(&first), "bootstrap");
    assert_eq!(config(&b)["bootstrap"], true);
    let retry_join = config(&b)["retry_join"].clone();

    // A lone leader with no Raft state on disk (it just started): the
    // file is left as it is.
    let alone = FakeAgent::start("b", true, &["--address", "10.41.0.1"]);
    let beat = || {
        ok_json(&output(&mut heartbeat_cmd(
            moto,
            &registry,
            &b,
            "b",
            "10.41.0.1",
            &alone.addr(),
        )))
    };
    let out = beat();
    assert_eq!(out["retry_join"], Value::Null, "{out}");
    assert_eq!(config(&b)["bootstrap"], true);

    // Raft state on disk: `bootstrap` goes, everything else stays.
    std::fs::create_dir_all(b.join("opt/consul/raft")).unwrap();
    std::fs::write(b.join("opt/consul/raft/raft.db"), b"raft").unwrap();
    beat();
    let now = config(&b);
    assert_eq!(now["bootstrap"], false, "{now}");
    assert_eq!(now["server"], true);
    assert_eq!(now["retry_join"], retry_join);
    drop(alone);

    // A second bootstrap node's file, no Raft state, and peers known to
    // Consul: the rewrite of retry_join turns `bootstrap` off too.
    let c = tmp.path().join("c");
    let registry2 = format!("s3://{bucket}/gate/heartbeat-peers");
    assert_eq!(
        mode(&run_node(moto, &registry2, &c, "c", "10.41.1.1", 3)),
        "bootstrap"
    );
    let agent = FakeAgent::start(
        "c",
        true,
        &[
            "--address",
            "10.41.1.1",
            "--peers",
            "10.41.1.1:8300,10.41.1.2:8300",
        ],
    );
    let out = ok_json(&output(&mut heartbeat_cmd(
        moto,
        &registry2,
        &c,
        "c",
        "10.41.1.1",
        &agent.addr(),
    )));
    assert_eq!(out["retry_join"], serde_json::json!(["10.41.1.2"]), "{out}");
    assert_eq!(config(&c)["bootstrap"], false);
}

#[test]
fn a_gossip_key_consul_would_refuse_stops_run_before_any_claim() {
    // Its own moto_server: its request counter is this test's alone.
    let moto = &Moto::start(&[]);
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/gate/keys");
    let tmp = tempfile::tempdir().unwrap();
    let key_file = tmp.path().join("gossip.key");
    let before = moto.requests();
    for (key, why) in [
        ("not-base64!", "is not base64"),
        ("AAECAwQFBgcICQoLDA0O", "decodes to 15 bytes"),
    ] {
        std::fs::write(&key_file, format!("{key}\n")).unwrap();
        let root = tmp.path().join("n");
        let out = output(
            run_cmd(moto, &registry, &root, "n", "10.42.0.1", 3)
                .arg("--encrypt-file")
                .arg(&key_file),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        for needle in [key_file.to_str().unwrap(), why, "consul keygen"] {
            assert!(err.contains(needle), "{needle:?} missing: {err}");
        }
        assert!(!err.contains(key), "the key itself is never shown: {err}");
        assert!(files_under(&root).is_empty(), "nothing written");
    }
    assert_eq!(moto.requests(), before, "nothing asked, nothing claimed");
    assert!(keys(moto, &bucket, "gate/keys/").is_empty());

    // A key `consul keygen` makes goes through.
    std::fs::write(&key_file, "pUqJrVyVRj5jsiYEkM/tFQYfWyJIv4s3XkvDwy7Cu5s=\n").unwrap();
    let root = tmp.path().join("ok");
    ok_json(&output(
        run_cmd(moto, &registry, &root, "n", "10.42.0.1", 3)
            .arg("--encrypt-file")
            .arg(&key_file),
    ));
    assert_eq!(
        config(&root)["encrypt"],
        "pUqJrVyVRj5jsiYEkM/tFQYfWyJIv4s3XkvDwy7Cu5s="
    );
}

#[test]
fn a_datacenter_in_capitals_is_refused_with_the_name_consul_would_use() {
    let moto = moto();
    let bucket = bucket(moto);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("n");
    let out = output(
        run_cmd(
            moto,
            &format!("s3://{bucket}/gate/dc"),
            &root,
            "n",
            "10.43.0.1",
            3,
        )
        .args(["--datacenter", "EU-West"]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("`eu-west`"), "{err}");
    assert!(files_under(&root).is_empty());
}

#[test]
fn a_server_stopped_past_consuls_rejoin_age_is_let_rejoin() {
    let moto = moto();
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/gate/rejoin-age");
    let tmp = tempfile::tempdir().unwrap();
    let (b, s) = (tmp.path().join("b"), tmp.path().join("s"));
    assert_eq!(
        mode(&run_node(moto, &registry, &b, "b", "10.44.0.1", 3)),
        "bootstrap"
    );
    assert_eq!(
        mode(&run_node(moto, &registry, &s, "s", "10.44.0.2", 3)),
        "server"
    );
    let data = s.join("opt/consul");
    std::fs::create_dir_all(data.join("raft")).unwrap();
    std::fs::write(data.join("raft/raft.db"), b"raft").unwrap();
    let week = 168 * 3600;
    let now = chrono::Utc::now().timestamp();
    let metadata = data.join("server_metadata.json");

    // Stopped for a day: Consul starts; the file stays.
    std::fs::write(
        &metadata,
        format!("{{\"last_seen_unix\":{}}}", now - 24 * 3600),
    )
    .unwrap();
    let out = output(&mut run_cmd(moto, &registry, &s, "s", "10.44.0.2", 3));
    assert_eq!(mode(&ok_json(&out)), "server");
    assert!(metadata.exists());

    // Stopped for eight days: Consul would refuse to start; the file is
    // moved aside (kept), the Raft data stays, and the log says why.
    let stale = format!("{{\"last_seen_unix\":{}}}", now - week - 24 * 3600);
    std::fs::write(&metadata, &stale).unwrap();
    let out = output(&mut run_cmd(moto, &registry, &s, "s", "10.44.0.2", 3));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(mode(&ok_json(&out)), "server", "{err}");
    assert!(!metadata.exists(), "{err}");
    assert_eq!(
        std::fs::read_to_string(data.join("server_metadata.json.stale")).unwrap(),
        stale
    );
    assert!(data.join("raft/raft.db").exists());
    assert!(err.contains("server_rejoin_age_max"), "{err}");
}
