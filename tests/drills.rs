//! Failure drills: the registry answering errors, dropping connections,
//! stalling past timeouts, conflicting; IMDS slow at boot; `run` killed at
//! random points. Each time `run` either succeeds or exits non-zero with a
//! clear message, and never leaves a half-written file, a second bootstrap
//! or more servers than asked for. Each drill has its own moto_server,
//! since faults apply to every request it serves.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Every file `run` wrote under `root` is whole: the config parses, and
/// no temporary file is left.
fn assert_files_whole(root: &Path) {
    let config = root.join("etc/consul.d/zz-auto-consul.json");
    if config.exists() {
        let text = std::fs::read_to_string(&config).unwrap();
        serde_json::from_str::<Value>(&text)
            .unwrap_or_else(|e| panic!("half-written config ({e}): {text:?}"));
    }
    let state = root.join("var/lib/auto-consul/state.json");
    if state.exists() {
        let text = std::fs::read_to_string(&state).unwrap();
        serde_json::from_str::<Value>(&text)
            .unwrap_or_else(|e| panic!("half-written state ({e}): {text:?}"));
    }
}

/// The slots' holders, as the registry has them.
fn slot_holders(moto: &Moto, bucket: &str, prefix: &str, servers: u32) -> Vec<String> {
    (0..servers)
        .filter_map(|i| {
            let key = format!("{prefix}/slots/server-{i}");
            keys(moto, bucket, &key).first()?;
            let v: Value = serde_json::from_str(&get(moto, bucket, &key)).ok()?;
            Some(v["node"].as_str()?.to_string())
        })
        .collect()
}

#[test]
fn error_answers_for_a_while_are_retried_and_for_ever_fail_cleanly() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let registry = format!("s3://{bucket}/drill/errors");
    let tmp = tempfile::tempdir().unwrap();
    moto.faults(json!([
        {"status": 503, "code": "SlowDown", "count": 2},
        {"status": 500, "code": "InternalError", "count": 1}
    ]));
    let v = ok_json(&output(&mut run_cmd(
        &moto,
        &registry,
        &tmp.path().join("a"),
        "e-a",
        "10.8.0.1",
        1,
    )));
    assert_eq!(mode(&v), "bootstrap");
    assert_eq!(moto.fired(), [2, 1], "the faults did not fire");
    assert_files_whole(&tmp.path().join("a"));

    // SlowDown for ever: a clear failure, nothing written, nothing claimed.
    moto.faults(json!([{"status": 503, "code": "SlowDown", "count": 100000}]));
    let root = tmp.path().join("b");
    let out = output(&mut run_cmd(&moto, &registry, &root, "e-b", "10.8.0.2", 3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains("SlowDown"),
        "{stderr}"
    );
    assert!(files_under(&root).is_empty(), "{:?}", files_under(&root));
    moto.faults(json!([]));
    assert_eq!(slot_holders(&moto, &bucket, "drill/errors", 3), ["e-a"]);
}

#[test]
fn lost_responses_and_dropped_connections_on_claims_settle_right() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let registry = format!("s3://{bucket}/drill/lost");
    let tmp = tempfile::tempdir().unwrap();
    // The cluster record and slot 1 are written, but their answers are lost;
    // slot 2's first request is dropped before it is applied.
    moto.faults(json!([
        {"drop": "after", "method": "PUT", "match": "drill/lost/cluster", "count": 1},
        {"drop": "after", "method": "PUT", "match": "slots/server-1", "count": 1},
        {"drop": "before", "method": "PUT", "match": "slots/server-2", "count": 1}
    ]));
    let modes: Vec<String> = (0..5)
        .map(|i| {
            let root = tmp.path().join(format!("n{i}"));
            let v = ok_json(&output(&mut run_cmd(
                &moto,
                &registry,
                &root,
                &format!("l-{i}"),
                &format!("10.8.1.{}", i + 1),
                3,
            )));
            assert_files_whole(&root);
            mode(&v)
        })
        .collect();
    assert_eq!(moto.fired(), [1, 1, 1], "the faults did not fire");
    assert_eq!(modes, ["bootstrap", "server", "server", "agent", "agent"]);
    assert_eq!(
        slot_holders(&moto, &bucket, "drill/lost", 3),
        ["l-0", "l-1", "l-2"]
    );
}

#[test]
fn a_registry_stalling_past_the_timeout_is_retried() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let registry = format!("s3://{bucket}/drill/stall");
    let tmp = tempfile::tempdir().unwrap();
    // Past the 10 s attempt timeout: the SDK gives up on that attempt and
    // tries again; the stalled write lands later and must change nothing.
    moto.faults(json!([{"stall": 11, "method": "PUT", "match": "slots/server-0", "count": 1}]));
    let v = ok_json(&output(&mut run_cmd(
        &moto,
        &registry,
        &tmp.path().join("a"),
        "s-a",
        "10.8.2.1",
        2,
    )));
    assert_eq!(mode(&v), "bootstrap");
    std::thread::sleep(Duration::from_secs(2));
    // By now the stalled write (a create-only copy of the same claim) has
    // landed and been refused; the slot is still s-a's.
    assert_eq!(moto.fired(), [1]);
    assert_eq!(slot_holders(&moto, &bucket, "drill/stall", 2), ["s-a"]);
    let v = ok_json(&output(&mut run_cmd(
        &moto,
        &registry,
        &tmp.path().join("b"),
        "s-b",
        "10.8.2.2",
        2,
    )));
    assert_eq!(mode(&v), "server");
}

#[test]
fn conflicts_on_claims_are_retried() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let registry = format!("s3://{bucket}/drill/conflict");
    let tmp = tempfile::tempdir().unwrap();
    moto.faults(json!([
        {"status": 409, "code": "ConditionalRequestConflict", "method": "PUT", "match": "slots/", "count": 3},
        {"status": 409, "code": "ConditionalRequestConflict", "method": "PUT", "match": "/cluster", "count": 2}
    ]));
    let modes: Vec<String> = (0..3)
        .map(|i| {
            let root = tmp.path().join(format!("n{i}"));
            mode(&ok_json(&output(&mut run_cmd(
                &moto,
                &registry,
                &root,
                &format!("c-{i}"),
                &format!("10.8.3.{}", i + 1),
                2,
            ))))
        })
        .collect();
    assert_eq!(moto.fired(), [3, 2]);
    assert_eq!(modes, ["bootstrap", "server", "agent"]);
}

#[test]
fn imds_slow_at_boot_is_waited_for_and_imds_never_answering_fails_cleanly() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let registry = format!("s3://{bucket}/drill/imds");
    let tmp = tempfile::tempdir().unwrap();
    // The first token request takes longer than the client's read timeout.
    moto.faults(json!([{"stall": 3, "match": "/latest/api/token", "count": 1}]));
    let v = ok_json(&output(
        auto_consul(&moto)
            .args([
                "run",
                "--json",
                "--registry",
                &registry,
                "--imds-timeout",
                "20",
            ])
            .arg("--root")
            .arg(tmp.path().join("a"))
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", moto.url()),
    ));
    assert_eq!(v["node"], "i-fake");
    assert_eq!(moto.fired(), [1]);

    moto.faults(json!([{"stall": 30, "match": "/latest/", "count": 1000}]));
    let root = tmp.path().join("b");
    let out = output(
        auto_consul(&moto)
            .args(["run", "--registry", &registry, "--imds-timeout", "3"])
            .arg("--root")
            .arg(&root)
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", moto.url()),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("pass --address and --node") && stderr.contains("within 3s"),
        "{stderr}"
    );
    assert!(files_under(&root).is_empty());
}

#[test]
fn run_killed_at_random_points_then_run_again_is_consistent() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let registry = format!("s3://{bucket}/drill/kill");
    let tmp = tempfile::tempdir().unwrap();
    let servers = 2;
    // A fixed pseudo-random sequence of kill delays (ms), so a failure can
    // be replayed.
    let mut seed: u64 = 0x5eed;
    let mut finals = Vec::new();
    let mut bootstrapping = 0;
    for i in 0..8 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = (seed >> 33) % 400;
        let root = tmp.path().join(format!("k{i}"));
        let (node, ip) = (format!("k-{i}"), format!("10.8.4.{}", i + 1));
        let mut child = run_cmd(&moto, &registry, &root, &node, &ip, servers)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        assert_files_whole(&root);
        let v = ok_json(&output(&mut run_cmd(
            &moto, &registry, &root, &node, &ip, servers,
        )));
        assert_files_whole(&root);
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("etc/consul.d/zz-auto-consul.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            config["server"],
            mode(&v) != "agent",
            "config and mode disagree after a kill at {delay} ms"
        );
        eprintln!(
            "kill drill: node {i} killed at {delay} ms, then ran as {}",
            mode(&v)
        );
        finals.push(mode(&v));
        bootstrapping += usize::from(config["bootstrap"] == true);
    }
    // Exactly one Consul config of the cluster says `bootstrap: true`,
    // wherever the kills fell.
    assert_eq!(bootstrapping, 1, "{finals:?}");
    let count = |m: &str| finals.iter().filter(|x| *x == m).count();
    assert_eq!(count("bootstrap"), 1, "{finals:?}");
    assert_eq!(
        count("bootstrap") + count("server"),
        servers as usize,
        "{finals:?}"
    );
    let holders = slot_holders(&moto, &bucket, "drill/kill", servers);
    assert_eq!(holders.len(), servers as usize);
}

#[test]
fn a_hostile_registry_is_skipped_never_joined_and_never_crashes_run() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "drill/hostile";
    let now = chrono::Utc::now().format("%Y%m%d%H%M%S").to_string();
    let good = r#"{"node":"good","address":"10.9.9.9","mode":"server","version":"0"}"#;
    put(moto, &bucket, &format!("{p}/servers/{now}-good"), good);
    // Keys with `..` segments or line breaks cannot pass moto's path-style
    // routing; the key parser's unit and property tests cover them.
    for (name, body) in [
        (format!("{now}-spaces"), "10.0.0.1 10.0.0.2".to_string()),
        (
            format!("{now}-newline"),
            "10.0.0.1\n\"retry_join\": [\"6.6.6.6\"]".to_string(),
        ),
        (
            format!("{now}-quote"),
            r#"{"node":"quote","address":"10.0.0.1\",\"server\":true","mode":"x","version":"0"}"#
                .to_string(),
        ),
        (format!("{now}-$(reboot)"), "10.0.0.4".to_string()),
        (format!("{now}-huge"), "1".repeat(5 << 20)),
        (
            format!("{now}-other"),
            r#"{"node":"someone-else","address":"10.0.0.6","mode":"agent","version":"0"}"#
                .to_string(),
        ),
    ] {
        put(moto, &bucket, &format!("{p}/agents/{name}"), &body);
    }
    put(
        moto,
        &bucket,
        &format!("{p}/slots/server-0"),
        "{\"node\": \"x\", \"address\": \"0.0.0.0\"",
    );
    put(moto, &bucket, &format!("{p}/cluster"), &"[".repeat(100_000));
    let tmp = tempfile::tempdir().unwrap();
    let out = output(&mut run_cmd(
        moto,
        &format!("s3://{bucket}/{p}"),
        tmp.path(),
        "newbie",
        "10.9.0.1",
        1,
    ));
    let v = ok_json(&out);
    assert_eq!(mode(&v), "agent");
    assert_eq!(
        v["retry_join"],
        json!(["10.9.9.9"]),
        "only the well-formed member is joined"
    );
    let text =
        std::fs::read_to_string(tmp.path().join("etc/consul.d/zz-auto-consul.json")).unwrap();
    let config: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(config["retry_join"], json!(["10.9.9.9"]));
    assert_eq!(config["server"], false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for junk in [
        "spaces",
        "newline",
        "quote",
        "huge",
        "other",
        "slots/server-0",
        "cluster",
    ] {
        assert!(stderr.contains(junk), "no warning naming {junk}: {stderr}");
    }
}

#[test]
fn thousands_of_heartbeats_of_one_node_count_once() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "drill/many";
    let now = chrono::Utc::now();
    // 30 live and 1970 expired heartbeats, all of one node: live ones well
    // inside the expiry, expired ones well past it (on the store's clock:
    // written, then aged).
    let items = |range: std::ops::Range<i64>| {
        range
            .map(|i| {
                let age = if i < 30 { i } else { 7300 + i };
                let stamp = (now - chrono::Duration::seconds(age)).format("%Y%m%d%H%M%S");
                (format!("{p}/agents/{stamp}-chatty"), "10.1.1.1".to_string())
            })
            .collect()
    };
    put_many(moto, &bucket, items(30..2000));
    // Past the agents' expiry (7200 s by default).
    assert_eq!(moto.age(&bucket, &format!("{p}/"), 7300), 1970);
    put_many(moto, &bucket, items(0..30));
    let registry = format!("s3://{bucket}/{p}");
    let m = ok_json(&output(auto_consul(moto).args([
        "members",
        "--json",
        "--registry",
        &registry,
    ])));
    assert_eq!(m["agents"].as_array().unwrap().len(), 1, "{m}");
    assert_eq!(m["agents"][0]["node"], "chatty");
    // The newest of them: written at the start of this test.
    let since_start = (chrono::Utc::now() - now).num_seconds() as u64;
    assert!(
        m["agents"][0]["age_seconds"].as_u64().unwrap() <= since_start + 1,
        "{m}"
    );
    let v = ok_json(&output(auto_consul(moto).args([
        "purge",
        "--json",
        "--registry",
        &registry,
    ])));
    assert_eq!(v["deleted"], 1970);
    assert_eq!(keys(moto, &bucket, &format!("{p}/agents/")).len(), 30);
}
