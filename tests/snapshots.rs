//! Nothing is lost with a cluster: the leader's snapshots go to the
//! registry bucket (streamed, multipart past 16 MiB, SHA-256 in the
//! metadata, the newest --snapshot-keep kept), and a cluster that replaces
//! a gone one restores the old cluster's newest valid snapshot exactly once,
//! also when it is stopped mid-way; against moto_server and the fake agent's
//! `/v1/snapshot`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A snapshot in Consul's archive format whose state is `size` bytes no
/// compressor or dedup would shorten, different per `seed`; its SHA-256.
fn write_noise(path: &Path, size: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = FAKE_FSM_HEADER.to_vec();
    while bytes.len() < size {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(size);
    write_snapshot(path, &bytes)
}

fn snapshot_cmd(
    moto: &Moto,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
    agent: &str,
) -> Command {
    agent_cmd(moto, "snapshot", registry, root, node, ip, agent)
}

/// The object's bytes' SHA-256 and its `sha256` metadata.
fn object_hashes(moto: &Moto, bucket: &str, key: &str) -> (String, Option<String>) {
    let s3 = s3(moto);
    rt().block_on(async {
        let obj = s3
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        let meta = obj.metadata().and_then(|m| m.get("sha256")).cloned();
        let body = obj.body.collect().await.unwrap().into_bytes();
        (format!("{:x}", Sha256::digest(&body)), meta)
    })
}

/// The registry's cluster record under `prefix`.
fn record_of(moto: &Moto, bucket: &str, prefix: &str) -> Value {
    serde_json::from_str(&get(moto, bucket, &format!("{prefix}/cluster"))).unwrap()
}

/// `status` on a node.
fn status_of(
    moto: &Moto,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
    agent: &FakeAgent,
) -> std::process::Output {
    output(&mut agent_cmd(
        moto,
        "status",
        registry,
        root,
        node,
        ip,
        &agent.addr(),
    ))
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn only_the_leader_saves_and_the_newest_n_are_kept() {
    // Its own moto: the follower's request count is exact.
    let own = Moto::start(&[]);
    let moto = &own;
    let bucket = bucket(moto);
    let prefix = "snap/leader";
    let registry = format!("s3://{bucket}/{prefix}");
    let tmp = tempfile::tempdir().unwrap();
    // 20 MiB: past one 16 MiB part, so the upload is multipart.
    let snap = tmp.path().join("consul.snap");
    let sha = write_noise(&snap, 20 << 20, 1);
    let nodes: Vec<(PathBuf, String, String)> = (0..3)
        .map(|i| {
            (
                tmp.path().join(format!("s{i}")),
                format!("sn-{i}"),
                format!("10.96.0.{}", i + 1),
            )
        })
        .collect();
    let mut agents = Vec::new();
    for (root, node, ip) in &nodes {
        assert!(mode(&run_node(moto, &registry, root, node, ip, 3)) != "agent");
        // Servers get the snapshot units; the timer fires every interval.
        let timer =
            std::fs::read_to_string(root.join("etc/systemd/system/auto-consul-snapshot.timer"))
                .unwrap();
        assert!(timer.contains("OnUnitActiveSec=3600s\n"), "{timer}");
        assert!(
            root.join("etc/systemd/system/auto-consul-snapshot.service")
                .is_file()
        );
        agents.push(FakeAgent::start(
            node,
            true,
            &[
                "--address",
                ip,
                "--leader",
                "10.96.0.1:8300",
                "--snapshot-file",
                snap.to_str().unwrap(),
            ],
        ));
    }
    // No snapshot yet: healthy while the cluster is young, degraded once
    // its record is older than two intervals and ten minutes.
    let status = |i: usize| {
        let (root, node, ip) = &nodes[i];
        json(&output(&mut agent_cmd(
            moto,
            "status",
            &registry,
            root,
            node,
            ip,
            &agents[i].addr(),
        )))
    };
    assert_eq!(status(0)["snapshot"]["newest"], Value::Null);
    assert!(!status(0)["reasons"].to_string().contains("no snapshot"));
    assert!(moto.age(&bucket, &format!("{prefix}/cluster"), 2 * 3600 + 601) >= 1);
    let late = status(0)["reasons"].to_string();
    assert!(late.contains("has no snapshot"), "{late}");
    // A follower's timer: nothing asked of the registry, nothing saved.
    let before = moto.requests();
    let (root, node, ip) = &nodes[1];
    let out = ok_json(&output(&mut snapshot_cmd(
        moto,
        &registry,
        root,
        node,
        ip,
        &agents[1].addr(),
    )));
    assert_eq!(out["saved"], false, "{out}");
    assert_eq!(out["reason"], "not the leader", "{out}");
    assert_eq!(moto.requests(), before, "a follower made registry requests");
    assert_eq!(
        count_keys(moto, &bucket, &format!("{prefix}/snapshots/")),
        0
    );

    // The leader, four times, keeping 2.
    let (root, node, ip) = &nodes[0];
    let metrics = root.join("metrics.prom");
    let mut saved = Vec::new();
    for _ in 0..4 {
        let out = ok_json(&output(
            snapshot_cmd(moto, &registry, root, node, ip, &agents[0].addr()).args([
                "--snapshot-keep",
                "2",
                "--metrics-file",
                "/metrics.prom",
            ]),
        ));
        assert_eq!(out["saved"], true, "{out}");
        assert_eq!(out["sha256"], sha.as_str(), "{out}");
        assert_eq!(
            out["size"],
            std::fs::metadata(&snap).unwrap().len(),
            "{out}"
        );
        saved.push(out["key"].as_str().unwrap().to_string());
        // Keys name the second they were saved.
        std::thread::sleep(Duration::from_millis(1100));
    }
    let mut kept = keys(moto, &bucket, &format!("{prefix}/snapshots/"));
    kept.sort();
    let want: Vec<String> = saved[2..].iter().map(|k| format!("{prefix}/{k}")).collect();
    assert_eq!(kept, want, "retention keeps exactly the newest 2");
    let (bytes, meta) = object_hashes(moto, &bucket, &kept[1]);
    assert_eq!(
        bytes, sha,
        "the object is the agent's snapshot, byte for byte"
    );
    assert_eq!(meta.as_deref(), Some(sha.as_str()));
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.lines().any(|l| l.starts_with(
            "auto_consul_snapshot_last_success_timestamp_seconds{command=\"snapshot\"} "
        )),
        "{prom}"
    );
    // A leader whose clock is three hours slow: its snapshot is named by
    // the store's clock, so it is the newest and retention keeps it.
    let out = ok_json(&output(
        skewed(
            &mut agent_cmd(
                moto,
                "snapshot",
                &registry,
                root,
                node,
                ip,
                &agents[0].addr(),
            ),
            "-3h",
        )
        .args(["--snapshot-keep", "2"]),
    ));
    let skewed_key = out["key"].as_str().unwrap().to_string();
    assert!(key_skew_seconds(&skewed_key).abs() < 60, "{skewed_key}");
    let mut kept = keys(moto, &bucket, &format!("{prefix}/snapshots/"));
    kept.sort();
    assert_eq!(
        kept,
        [&saved[3], &skewed_key].map(|k| format!("{prefix}/{k}")),
        "the slow clock's snapshot is kept as the newest"
    );
    saved.push(skewed_key);
    // `members` and `status` show the newest one's age.
    let members = ok_json(&output(auto_consul(moto).args([
        "members",
        "--json",
        "--registry",
        &registry,
    ])));
    assert_eq!(
        members["snapshot"]["newest"],
        saved[4].as_str(),
        "{members}"
    );
    assert!(
        members["snapshot"]["age_seconds"].as_u64().unwrap() < 60,
        "{members}"
    );
    let status = status(0);
    assert_eq!(status["snapshot"]["newest"], saved[4].as_str(), "{status}");
}

#[test]
fn a_replacing_cluster_restores_the_newest_valid_snapshot_exactly_once() {
    let moto = moto();
    let bucket = bucket(moto);
    let prefix = "snap/restore";
    let registry = format!("s3://{bucket}/{prefix}");
    let tmp = tempfile::tempdir().unwrap();
    let ids = run_instances(moto, 1);
    let (root_a, ip_a) = (tmp.path().join("a"), "10.97.0.1");
    ok_json(&output(
        run_cmd(moto, &registry, &root_a, "old-a", ip_a, 1).args(["--instance-id", &ids[0]]),
    ));
    let old: Value = record_of(moto, &bucket, prefix);
    let old = old["cluster_id"].as_str().unwrap().to_string();
    // Two snapshots of the old cluster; the newest is then damaged.
    let snap = tmp.path().join("old.snap");
    let agent_a = FakeAgent::start(
        "old-a",
        true,
        &["--address", ip_a, "--snapshot-file", snap.to_str().unwrap()],
    );
    let mut saved = Vec::new();
    for seed in [7, 8] {
        let sha = write_noise(&snap, 3 << 20, seed);
        let out = ok_json(&output(&mut snapshot_cmd(
            moto,
            &registry,
            &root_a,
            "old-a",
            ip_a,
            &agent_a.addr(),
        )));
        assert_eq!(out["sha256"], sha.as_str());
        saved.push((out["key"].as_str().unwrap().to_string(), sha));
        std::thread::sleep(Duration::from_millis(1100));
    }
    drop(agent_a);
    let (damaged, damaged_sha) = &saved[1];
    rt().block_on(
        s3(moto)
            .put_object()
            .bucket(&bucket)
            .key(format!("{prefix}/{damaged}"))
            .metadata("sha256", damaged_sha)
            .body(b"not the bytes that were saved".to_vec().into())
            .send(),
    )
    .unwrap();

    // The old cluster's server is gone: EC2 says so, the registry is silent.
    terminate(moto, &[&ids[0]]);
    moto.age(&bucket, &format!("{prefix}/"), 3 * 120 + 5);
    let (root_b, ip_b) = (tmp.path().join("b"), "10.97.0.2");
    let boot = ok_json(&output(
        run_cmd(moto, &registry, &root_b, "new-b", ip_b, 1).args(["--witness-wait", "1"]),
    ));
    assert_eq!(mode(&boot), "bootstrap");
    let record: Value = record_of(moto, &bucket, prefix);
    assert_ne!(record["cluster_id"], old.as_str());
    assert_eq!(record["restore"]["from"], old.as_str(), "{record}");
    assert_eq!(record["restore"]["state"], "pending", "{record}");

    // The new leader's first run is stopped mid-way through the restore.
    let restores = tmp.path().join("restores");
    std::fs::create_dir_all(&restores).unwrap();
    let new_snap = tmp.path().join("new.snap");
    write_noise(&new_snap, 1 << 20, 9);
    let agent_b = FakeAgent::start(
        "new-b",
        true,
        &[
            "--address",
            ip_b,
            "--snapshot-file",
            new_snap.to_str().unwrap(),
            "--restore-dir",
            restores.to_str().unwrap(),
            "--restore-pace-ms",
            "400",
        ],
    );
    let mut first = snapshot_cmd(moto, &registry, &root_b, "new-b", ip_b, &agent_b.addr())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !restores.join("started.jsonl").exists() {
        assert!(Instant::now() < deadline, "the restore never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap();
    let first = first.wait_with_output().unwrap();
    // What the killed client had buffered no longer reaches Consul.
    std::fs::write(restores.join("cut"), "").unwrap();
    assert!(
        stderr(&first).contains(&format!("skipping snapshot {damaged}")),
        "the damaged newest snapshot is skipped with a warning: {}",
        stderr(&first)
    );
    let record: Value = record_of(moto, &bucket, prefix);
    assert_eq!(record["restore"]["state"], "restoring", "{record}");
    // Until it is done, `status` on the new server says what is owed.
    let st = status_of(moto, &registry, &root_b, "new-b", ip_b, &agent_b);
    assert_eq!(st.status.code(), Some(1));
    let reasons = json(&st)["reasons"].to_string();
    assert!(reasons.contains("still owes the restore"), "{reasons}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while lines(&restores.join("aborted.jsonl")).is_empty() {
        assert!(Instant::now() < deadline, "the cut restore was not seen");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(lines(&restores.join("restores.jsonl")).is_empty());
    std::fs::remove_file(restores.join("cut")).unwrap();

    // Had another server begun it (a leader before a change of leader),
    // it would be left to that server for half an hour, then taken over.
    let cluster_key = format!("{prefix}/cluster");
    let mut other: Value = serde_json::from_str(&get(moto, &bucket, &cluster_key)).unwrap();
    other["restore"]["node"] = "new-c".into();
    put(moto, &bucket, &cluster_key, &other.to_string());
    let wait = output(&mut snapshot_cmd(
        moto,
        &registry,
        &root_b,
        "new-b",
        ip_b,
        &agent_b.addr(),
    ));
    // Exit 75: the unit tries again in 30 s; nothing restored or saved.
    assert_eq!(wait.status.code(), Some(75), "{}", stderr(&wait));
    assert!(
        stderr(&wait).contains("new-c is restoring"),
        "{}",
        stderr(&wait)
    );
    assert!(lines(&restores.join("restores.jsonl")).is_empty());
    assert!(moto.age(&bucket, &cluster_key, 1801) >= 1);
    std::thread::sleep(Duration::from_millis(1100));

    // Run again: the same snapshot restored, whole; then never again.
    let (good, good_sha) = &saved[0];
    for _ in 0..2 {
        let out = ok_json(&output(&mut snapshot_cmd(
            moto,
            &registry,
            &root_b,
            "new-b",
            ip_b,
            &agent_b.addr(),
        )));
        assert_eq!(out["saved"], true, "{out}");
        std::thread::sleep(Duration::from_millis(1100));
    }
    let done = lines(&restores.join("restores.jsonl"));
    assert_eq!(done.len(), 1, "exactly one restore: {done:?}");
    assert_eq!(
        done[0]["sha256"],
        good_sha.as_str(),
        "byte-identical to what was saved"
    );
    assert_eq!(done[0]["size"], std::fs::metadata(&snap).unwrap().len());
    let record: Value = record_of(moto, &bucket, prefix);
    assert_eq!(record["restore"]["state"], "done", "{record}");
    assert_eq!(record["restore"]["key"], good.as_str(), "{record}");
    assert_eq!(record["restore"]["node"], "new-b", "{record}");
    // The new cluster's own snapshots go under its own id.
    let new_id = record["cluster_id"].as_str().unwrap();
    assert_eq!(
        count_keys(moto, &bucket, &format!("{prefix}/snapshots/{new_id}/")),
        2
    );
}

#[test]
fn restore_on_demand_checks_the_key_and_the_bytes_and_no_restore_opts_out() {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let reg = tmp.path().join("registry");
    std::fs::create_dir_all(&reg).unwrap();
    let registry = format!("file://{}", reg.display());
    let root = tmp.path().join("a");
    assert_eq!(
        mode(&run_node(moto, &registry, &root, "dir-a", "10.98.0.1", 1)),
        "bootstrap"
    );
    let snap = tmp.path().join("a.snap");
    let sha = write_noise(&snap, 1 << 20, 3);
    let restores = tmp.path().join("restores");
    std::fs::create_dir_all(&restores).unwrap();
    let agent = FakeAgent::start(
        "dir-a",
        true,
        &[
            "--address",
            "10.98.0.1",
            "--snapshot-file",
            snap.to_str().unwrap(),
            "--restore-dir",
            restores.to_str().unwrap(),
        ],
    );
    let out = ok_json(&output(&mut snapshot_cmd(
        moto,
        &registry,
        &root,
        "dir-a",
        "10.98.0.1",
        &agent.addr(),
    )));
    let key = out["key"].as_str().unwrap().to_string();
    // A snapshot holds every ACL token: readable by root only.
    use std::os::unix::fs::PermissionsExt;
    let perms = std::fs::metadata(reg.join(&key))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(perms & 0o777, 0o600, "{perms:o}");
    // The directory registry keeps the hash beside the file.
    assert_eq!(
        std::fs::read(reg.join(&key)).unwrap(),
        std::fs::read(&snap).unwrap()
    );
    let listed = ok_json(&output(
        node_cmd(moto, "restore", &registry, &root, "dir-a", "10.98.0.1")
            .env("CONSUL_HTTP_ADDR", agent.addr()),
    ));
    assert_eq!(listed["snapshots"][0]["key"], key.as_str(), "{listed}");

    let restore = |arg: &str| {
        output(
            node_cmd(moto, "restore", &registry, &root, "dir-a", "10.98.0.1")
                .arg(arg)
                .env("CONSUL_HTTP_ADDR", agent.addr()),
        )
    };
    let bad = restore("slots/server-0");
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(
        stderr(&bad).contains("is not a snapshot key"),
        "{}",
        stderr(&bad)
    );
    let ok = ok_json(&restore(&key));
    assert_eq!(ok["sha256"], sha.as_str());
    assert_eq!(lines(&restores.join("restores.jsonl")).len(), 1);
    // Damaged bytes are refused before Consul sees them.
    std::fs::write(reg.join(&key), b"junk").unwrap();
    let damaged = restore(&key);
    assert_eq!(damaged.status.code(), Some(1), "{}", stderr(&damaged));
    assert!(
        stderr(&damaged).contains("is damaged"),
        "{}",
        stderr(&damaged)
    );
    assert_eq!(lines(&restores.join("restores.jsonl")).len(), 1);

    // Each cluster is replaced in turn: the one that left (its slot
    // released) and was retired, by the next node.
    let record = || -> Value {
        serde_json::from_str(&std::fs::read_to_string(reg.join("cluster")).unwrap()).unwrap()
    };
    // Nodes are `dir-<x>`, with their root in `<x>`.
    let replace = |leaving: (&str, &str), next: (&str, &str), extra: &[&str]| {
        let old = record()["cluster_id"].as_str().unwrap().to_string();
        let (dir, ip) = leaving;
        ok_json(&output(&mut node_cmd(
            moto,
            "leave",
            &registry,
            &tmp.path().join(dir),
            &format!("dir-{dir}"),
            ip,
        )));
        ok_json(&output(auto_consul(moto).args([
            "cluster",
            "retire",
            "--json",
            "--registry",
            &registry,
            &old,
        ])));
        let (dir, ip) = next;
        let v = ok_json(&output(
            run_cmd(
                moto,
                &registry,
                &tmp.path().join(dir),
                &format!("dir-{dir}"),
                ip,
                1,
            )
            .args(["--witness-wait", "0"])
            .args(extra),
        ));
        assert_eq!(mode(&v), "bootstrap");
        old
    };
    // With --no-restore the new cluster owes nothing.
    replace(("a", "10.98.0.1"), ("b", "10.98.0.2"), &["--no-restore"]);
    assert!(record().get("restore").is_none(), "{}", record());
    // Without it, it owes the restore of the one it replaced...
    let b = replace(("b", "10.98.0.2"), ("c", "10.98.0.3"), &[]);
    assert_eq!(record()["restore"]["from"], b.as_str());
    assert_eq!(record()["restore"]["state"], "pending");
    // ...and a cluster that died still owing it passes it on: its own
    // snapshots (none were saved while it owed one) hold nothing of worth.
    replace(("c", "10.98.0.3"), ("d", "10.98.0.4"), &[]);
    assert_eq!(record()["restore"]["from"], b.as_str(), "{}", record());
}

/// With ACLs made at genesis, a restore brings back the old cluster's ACL
/// state, which knows nothing of the new cluster's agents' token: Consul
/// makes its initial management token again (its leader actions re-run
/// after a restore), and auto-consul makes the agents' token with it, then
/// the record says done. The fake agent's snapshot is its ACL state, and
/// its restore replaces that state, as Consul's does.
#[test]
fn after_a_restore_the_new_clusters_tokens_are_made_in_the_restored_acl_state() {
    let moto = moto();
    let bucket = bucket(moto);
    let prefix = "snap/acl";
    let registry = format!("s3://{bucket}/{prefix}");
    let tmp = tempfile::tempdir().unwrap();
    let secrets_dir = tmp.path().join("secrets");
    std::fs::create_dir_all(&secrets_dir).unwrap();
    let secrets = format!("file://{}", secrets_dir.display());
    let secret = |cluster: &str, name: &str| {
        std::fs::read_to_string(secrets_dir.join(cluster).join(name))
            .unwrap()
            .trim()
            .to_string()
    };
    let cluster = || -> String {
        let v: Value = record_of(moto, &bucket, prefix);
        v["cluster_id"].as_str().unwrap().to_string()
    };
    let ids = run_instances(moto, 1);
    let (root_a, ip_a) = (tmp.path().join("a"), "10.99.1.1");
    ok_json(&output(
        run_cmd(moto, &registry, &root_a, "acl-a", ip_a, 1).args([
            "--instance-id",
            &ids[0],
            "--secrets",
            &secrets,
        ]),
    ));
    let a = cluster();
    let acl_a = tmp.path().join("acl-a");
    std::fs::create_dir_all(&acl_a).unwrap();
    let agent_a = FakeAgent::start(
        "acl-a",
        true,
        &[
            "--address",
            ip_a,
            "--acl-dir",
            acl_a.to_str().unwrap(),
            "--acl-management",
            &secret(&a, "server/management-token"),
        ],
    );
    // A's autopilot settings, set by an operator, and its Connect CA are
    // in A's state, and so in its snapshot.
    let state_a = acl_a.join("acl-state.json");
    let mut st: Value = serde_json::from_str(&std::fs::read_to_string(&state_a).unwrap()).unwrap();
    st["autopilot"] = serde_json::json!({"CleanupDeadServers": false, "MinQuorum": 5});
    std::fs::write(&state_a, st.to_string()).unwrap();
    let ca_a = st["connect_ca"]["ActiveRootID"]
        .as_str()
        .unwrap()
        .to_string();
    // A's heartbeat makes its agents' token; its snapshot holds it.
    ok_json(&output(
        heartbeat_cmd(moto, &registry, &root_a, "acl-a", ip_a, &agent_a.addr()).args([
            "--instance-id",
            &ids[0],
            "--secrets",
            &secrets,
        ]),
    ));
    ok_json(&output(
        agent_cmd(
            moto,
            "snapshot",
            &registry,
            &root_a,
            "acl-a",
            ip_a,
            &agent_a.addr(),
        )
        .args(["--secrets", &secrets]),
    ));
    drop(agent_a);

    terminate(moto, &[&ids[0]]);
    moto.age(&bucket, &format!("{prefix}/"), 3 * 120 + 5);
    let (root_b, ip_b) = (tmp.path().join("b"), "10.99.1.2");
    ok_json(&output(
        run_cmd(moto, &registry, &root_b, "acl-b", ip_b, 1).args([
            "--witness-wait",
            "1",
            "--secrets",
            &secrets,
        ]),
    ));
    let b = cluster();
    assert_ne!(a, b);
    let acl_b = tmp.path().join("acl-b");
    let restores = tmp.path().join("restores");
    std::fs::create_dir_all(&acl_b).unwrap();
    std::fs::create_dir_all(&restores).unwrap();
    // An agent boots while B owes the restore: it waits.
    let root_c = tmp.path().join("c");
    let mut booting = run_cmd(moto, &registry, &root_c, "acl-c", "10.99.1.3", 1)
        .args([
            "--role",
            "agent",
            "--restore-wait",
            "120",
            "--secrets",
            &secrets,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // B's Consul was elected a moment ago: raft refuses restores for a
    // while (4 s here).
    let agent_b = FakeAgent::start(
        "acl-b",
        true,
        &[
            "--address",
            ip_b,
            "--acl-dir",
            acl_b.to_str().unwrap(),
            "--acl-management",
            &secret(&b, "server/management-token"),
            "--restore-dir",
            restores.to_str().unwrap(),
            "--restore-refuse-s",
            "4",
        ],
    );
    let ca_b = {
        let st: Value =
            serde_json::from_str(&std::fs::read_to_string(acl_b.join("acl-state.json")).unwrap())
                .unwrap();
        st["connect_ca"]["ActiveRootID"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_ne!(ca_a, ca_b);
    let early = output(
        agent_cmd(
            moto,
            "snapshot",
            &registry,
            &root_b,
            "acl-b",
            ip_b,
            &agent_b.addr(),
        )
        .args(["--secrets", &secrets]),
    );
    // Exit 75: auto-consul-snapshot.service tries again in 30 s (not at
    // the next interval); the snapshot is not taken for a refused one.
    assert_eq!(early.status.code(), Some(75), "{}", stderr(&early));
    assert!(
        stderr(&early).contains("cannot restore snapshot now"),
        "{}",
        stderr(&early)
    );
    let record: Value = record_of(moto, &bucket, prefix);
    assert!(record["restore"]["state"] == "restoring", "{record}");
    assert!(record["restore"].get("refused").is_none(), "{record}");
    if booting.try_wait().unwrap().is_some() {
        let out = booting.wait_with_output().unwrap();
        panic!(
            "the agent's run ended while its cluster owes a restore: {} {}",
            String::from_utf8_lossy(&out.stdout),
            stderr(&out)
        );
    }
    std::thread::sleep(Duration::from_secs(4));
    let out = ok_json(&output(
        agent_cmd(
            moto,
            "snapshot",
            &registry,
            &root_b,
            "acl-b",
            ip_b,
            &agent_b.addr(),
        )
        .args(["--secrets", &secrets]),
    ));
    // Restored, the agents' token made, then B's own first snapshot, taken
    // with B's management token.
    assert_eq!(out["restored"]["from"], a.as_str(), "{out}");
    assert_eq!(out["saved"], true, "{out}");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(acl_b.join("acl-state.json")).unwrap())
            .unwrap();
    let tokens = &state["tokens"];
    for (what, token) in [
        (
            "A's management token",
            secret(&a, "server/management-token"),
        ),
        ("A's agents' token", secret(&a, "agent/agent-token")),
        (
            "B's management token",
            secret(&b, "server/management-token"),
        ),
        ("B's agents' token", secret(&b, "agent/agent-token")),
    ] {
        assert!(tokens.get(&token).is_some(), "{what} missing: {state}");
    }
    let b_management = &tokens[secret(&b, "server/management-token")];
    assert_eq!(b_management["Policies"][0]["Name"], "global-management");
    let record: Value = record_of(moto, &bucket, prefix);
    assert_eq!(record["restore"]["state"], "done", "{record}");
    // The restored state's Connect CA is A's; autopilot's settings are B's
    // again, every field set (Consul decodes the body onto zero values).
    assert_eq!(
        state["connect_ca"]["ActiveRootID"],
        ca_a.as_str(),
        "{state}"
    );
    assert_eq!(
        state["autopilot"],
        serde_json::json!({
            "CleanupDeadServers": true,
            "LastContactThreshold": "200ms",
            "MaxTrailingLogs": 250,
            "MinQuorum": 0,
            "ServerStabilizationTime": "10s",
            "RedundancyZoneTag": "",
            "DisableUpgradeMigration": false,
            "UpgradeVersionTag": "",
        })
    );
    // The agent went on once the restore was done: its Consul joins a
    // cluster whose CA (A's, restored) signs its certificate.
    let booted = booting.wait_with_output().unwrap();
    assert!(booted.status.success(), "{}", stderr(&booted));
    assert_eq!(mode(&json(&booted)), "agent");
    assert!(
        stderr(&booted).contains(&format!(
            "cluster {b} owes the restore of cluster {a}'s snapshot"
        )),
        "one line says why it waits: {}",
        stderr(&booted)
    );
}

#[test]
fn a_leader_whose_stream_breaks_uploads_nothing_and_says_so() {
    let moto = moto();
    let bucket = bucket(moto);
    let prefix = "snap/cut";
    let registry = format!("s3://{bucket}/{prefix}");
    let tmp = tempfile::tempdir().unwrap();
    let ids = run_instances(moto, 1);
    let (root, ip) = (tmp.path().join("a"), "10.97.2.1");
    ok_json(&output(
        run_cmd(moto, &registry, &root, "cut-a", ip, 1).args(["--instance-id", &ids[0]]),
    ));
    let snap = tmp.path().join("cut.snap");
    write_noise(&snap, 2 << 20, 4);
    let half = (std::fs::metadata(&snap).unwrap().len() / 2).to_string();
    // A change of leader mid-stream: Consul has sent its 200 and half the
    // archive, then writes its error and closes.
    let agent = FakeAgent::start(
        "cut-a",
        true,
        &[
            "--address",
            ip,
            "--snapshot-file",
            snap.to_str().unwrap(),
            "--snapshot-cut-at",
            &half,
        ],
    );
    let out = output(
        snapshot_cmd(moto, &registry, &root, "cut-a", ip, &agent.addr())
            .args(["--metrics-file", "/metrics.prom"]),
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not one Consul would restore")
            && stderr(&out).contains("nothing was uploaded"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        count_keys(moto, &bucket, &format!("{prefix}/snapshots/")),
        0
    );
    let metrics = std::fs::read_to_string(root.join("metrics.prom")).unwrap();
    assert!(
        metrics
            .contains("auto_consul_snapshot_last_failure_timestamp_seconds{command=\"snapshot\"}")
            && metrics.contains("auto_consul_last_run_success{command=\"snapshot\"} 0"),
        "{metrics}"
    );
    let status = |agent: &FakeAgent| status_of(moto, &registry, &root, "cut-a", ip, agent);
    let st = status(&agent);
    assert_eq!(st.status.code(), Some(1));
    let said = json(&st);
    assert!(
        said["reasons"]
            .to_string()
            .contains("last snapshot save failed"),
        "{said}"
    );
    assert!(
        said["snapshot"]["last_failure"]["reason"]
            .as_str()
            .unwrap()
            .contains("failed to read snapshot file")
    );
    drop(agent);

    // The next save is whole: uploaded, and the failure is behind.
    let agent = FakeAgent::start(
        "cut-a",
        true,
        &["--address", ip, "--snapshot-file", snap.to_str().unwrap()],
    );
    let out = ok_json(&output(&mut snapshot_cmd(
        moto,
        &registry,
        &root,
        "cut-a",
        ip,
        &agent.addr(),
    )));
    assert_eq!(out["saved"], true, "{out}");
    let said = json(&status(&agent));
    assert!(
        !said["reasons"]
            .to_string()
            .contains("last snapshot save failed"),
        "{said}"
    );
}

/// Writes a snapshot of cluster `cluster` straight into the registry, as
/// its leader would have saved it (the object's SHA-256 in its metadata).
fn put_snapshot(
    moto: &Moto,
    bucket: &str,
    prefix: &str,
    cluster: &str,
    stamp: &str,
    file: &Path,
) -> String {
    let key = format!("snapshots/{cluster}/{stamp}-old-a.snap");
    let bytes = std::fs::read(file).unwrap();
    let sha = format!("{:x}", Sha256::digest(&bytes));
    rt().block_on(
        s3(moto)
            .put_object()
            .bucket(bucket)
            .key(format!("{prefix}/{key}"))
            .metadata("sha256", &sha)
            .body(bytes.into())
            .send(),
    )
    .unwrap();
    key
}

#[test]
fn a_snapshot_consul_refuses_gives_way_to_the_next_older_one() {
    let moto = moto();
    let bucket = bucket(moto);
    let tmp = tempfile::tempdir().unwrap();
    // Two replaced clusters: one whose newest snapshots Consul refuses but
    // whose oldest it takes, one whose every snapshot it refuses.
    for (prefix, oldest_ok) in [("snap/refused", true), ("snap/refused-all", false)] {
        let registry = format!("s3://{bucket}/{prefix}");
        let ids = run_instances(moto, 1);
        let (root_a, ip_a) = (tmp.path().join(format!("{oldest_ok}-a")), "10.97.3.1");
        ok_json(&output(
            run_cmd(moto, &registry, &root_a, "old-a", ip_a, 1).args(["--instance-id", &ids[0]]),
        ));
        let old: Value = record_of(moto, &bucket, prefix);
        let old = old["cluster_id"].as_str().unwrap().to_string();
        // Oldest: whole (or, for the second cluster, a state Consul's FSM
        // cannot decode). Middle: a whole archive of such a state. Newest: an
        // archive whose state.bin no longer matches its SHA256SUMS.
        let good = tmp.path().join("good.snap");
        let good_sha = if oldest_ok {
            write_noise(&good, 1 << 20, 11)
        } else {
            write_snapshot(&good, b"not a state Consul's FSM wrote")
        };
        let undecodable = tmp.path().join("undecodable.snap");
        write_snapshot(&undecodable, &vec![9u8; 4096]);
        let tampered = tmp.path().join("tampered.snap");
        write_noise(&tampered, 1 << 20, 12);
        let mut bytes = std::fs::read(&tampered).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0xff;
        std::fs::write(&tampered, &bytes).unwrap();
        let oldest = put_snapshot(moto, &bucket, prefix, &old, "20261201000000", &good);
        let middle = put_snapshot(moto, &bucket, prefix, &old, "20261202000000", &undecodable);
        let newest = put_snapshot(moto, &bucket, prefix, &old, "20261203000000", &tampered);

        terminate(moto, &[&ids[0]]);
        moto.age(&bucket, &format!("{prefix}/"), 3 * 120 + 5);
        let (root_b, ip_b) = (tmp.path().join(format!("{oldest_ok}-b")), "10.97.3.2");
        ok_json(&output(
            run_cmd(moto, &registry, &root_b, "new-b", ip_b, 1).args(["--witness-wait", "1"]),
        ));
        let restores = tmp.path().join(format!("restores-{oldest_ok}"));
        std::fs::create_dir_all(&restores).unwrap();
        let new_snap = tmp.path().join("new.snap");
        write_noise(&new_snap, 4096, 13);
        let agent_b = FakeAgent::start(
            "new-b",
            true,
            &[
                "--address",
                ip_b,
                "--snapshot-file",
                new_snap.to_str().unwrap(),
                "--restore-dir",
                restores.to_str().unwrap(),
            ],
        );
        let out = output(&mut snapshot_cmd(
            moto,
            &registry,
            &root_b,
            "new-b",
            ip_b,
            &agent_b.addr(),
        ));
        let v = ok_json(&out);
        let record: Value = record_of(moto, &bucket, prefix);
        let plan = &record["restore"];
        // The tampered one never reached Consul (it fails Consul's own
        // checks here); the undecodable one was sent and refused.
        let refused = lines(&restores.join("refused.jsonl"));
        assert!(
            stderr(&out).contains(&format!("Consul refuses snapshot {newest}"))
                && stderr(&out).contains("hash check failed for \"state.bin\""),
            "{}",
            stderr(&out)
        );
        assert!(
            refused[0]["reason"]
                .as_str()
                .unwrap()
                .contains("failed to restore snapshot")
        );
        if oldest_ok {
            assert_eq!(refused.len(), 1, "{refused:?}");
            let done = lines(&restores.join("restores.jsonl"));
            assert_eq!(done.len(), 1, "{done:?}");
            assert_eq!(done[0]["sha256"], good_sha.as_str());
            assert_eq!(plan["state"], "done", "{record}");
            assert_eq!(plan["key"], oldest.as_str(), "{record}");
            assert_eq!(
                plan["refused"],
                serde_json::json!([newest, middle]),
                "{record}"
            );
            assert_eq!(v["saved"], true, "{v}");
        } else {
            assert_eq!(refused.len(), 2, "{refused:?}");
            assert!(lines(&restores.join("restores.jsonl")).is_empty());
            assert_eq!(plan["state"], "refused", "{record}");
            assert_eq!(
                plan["refused"],
                serde_json::json!([newest, middle, oldest]),
                "{record}"
            );
            // `status` names the way out.
            let st = status_of(moto, &registry, &root_b, "new-b", ip_b, &agent_b);
            assert_eq!(st.status.code(), Some(1));
            let reasons = json(&st)["reasons"].to_string();
            assert!(
                reasons.contains("Consul refused every snapshot")
                    && reasons.contains("auto-consul restore KEY")
                    && reasons.contains("auto-consul restore --cancel"),
                "{reasons}"
            );
            // Cancelled, the cluster keeps its own state and is healthy again.
            ok_json(&output(
                agent_cmd(
                    moto,
                    "restore",
                    &registry,
                    &root_b,
                    "new-b",
                    ip_b,
                    &agent_b.addr(),
                )
                .arg("--cancel"),
            ));
            let reasons = json(&status_of(
                moto, &registry, &root_b, "new-b", ip_b, &agent_b,
            ))["reasons"]
                .to_string();
            assert!(!reasons.contains("refused every snapshot"), "{reasons}");
        }
    }
}
