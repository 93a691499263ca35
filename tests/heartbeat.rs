//! The heartbeat lifecycle against moto_server and a stand-in Consul agent:
//! `heartbeat`, `purge`, `leave`, slot renewal and takeover, and the join
//! list checked against EC2.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `run` for one node with a given expiry.
fn run_exp_cmd(
    moto: &Moto,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
    servers: u32,
    expiry: u64,
) -> Command {
    let mut cmd = run_cmd(moto, registry, root, node, ip, servers);
    cmd.args(["--expiry", &expiry.to_string()]);
    cmd
}

fn run_exp(
    moto: &Moto,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
    servers: u32,
    expiry: u64,
) -> Value {
    ok_json(&output(&mut run_exp_cmd(
        moto, registry, root, node, ip, servers, expiry,
    )))
}

/// A heartbeat with a given expiry.
fn heartbeat_cmd(
    moto: &Moto,
    registry: &str,
    root: &Path,
    node: &str,
    ip: &str,
    agent: &str,
    expiry: u64,
) -> Command {
    let mut cmd = common::heartbeat_cmd(moto, registry, root, node, ip, agent);
    cmd.args(["--expiry", &expiry.to_string()])
        // As many slots as any test here wants; the env file gives it in production.
        .args(["--servers", "3"]);
    cmd
}

fn slot(moto: &Moto, bucket: &str, prefix: &str, i: u32) -> Value {
    serde_json::from_str(&get(moto, bucket, &format!("{prefix}/slots/server-{i}"))).unwrap()
}

#[test]
fn a_server_heartbeat_writes_both_prefixes_and_renews_its_slot() {
    let moto = moto();
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/hb/server");
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(
        mode(&run_exp(
            moto,
            &registry,
            tmp.path(),
            "srv-1",
            "10.1.0.1",
            1,
            120
        )),
        "bootstrap"
    );
    let before = slot(moto, &bucket, "hb/server", 0);
    let agent = FakeAgent::start("srv-1", true, &[]);
    let v = ok_json(&output(&mut heartbeat_cmd(
        moto,
        &registry,
        tmp.path(),
        "srv-1",
        "10.1.0.1",
        &agent.addr(),
        120,
    )));
    assert_eq!(v["mode"], "server");
    assert_eq!(v["slot"]["status"], "renewed");
    let servers = keys(moto, &bucket, "hb/server/servers/");
    let agents = keys(moto, &bucket, "hb/server/agents/");
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert!(servers[0].ends_with("-srv-1") && agents[0].ends_with("-srv-1"));
    let body: Value = serde_json::from_str(&get(moto, &bucket, &servers[0])).unwrap();
    assert_eq!(body["address"], "10.1.0.1");
    assert_eq!(body["mode"], "server");
    let after = slot(moto, &bucket, "hb/server", 0);
    assert_eq!(after["claim_id"], before["claim_id"]);
    assert_eq!(
        after["sequence"].as_u64().unwrap(),
        before["sequence"].as_u64().unwrap() + 1
    );

    // A second heartbeat within the expiry purges nothing (the purger, the
    // holder of slot 0, purges once per expiry): both keys stay.
    std::thread::sleep(Duration::from_millis(1100));
    let hb = |tmp: &std::path::Path| {
        ok_json(&output(&mut heartbeat_cmd(
            moto,
            &registry,
            tmp,
            "srv-1",
            "10.1.0.1",
            &agent.addr(),
            120,
        )))
    };
    assert_eq!(hb(tmp.path())["purged"], 0);
    assert_eq!(keys(moto, &bucket, "hb/server/servers/").len(), 2);
    // An expiry after its last purge, it purges again: its older keys go.
    let stamp = tmp.path().join("var/lib/auto-consul/purged-at");
    assert!(stamp.is_file(), "the purger records its purge");
    std::fs::write(
        &stamp,
        (chrono::Utc::now() - chrono::Duration::seconds(121)).to_rfc3339(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(hb(tmp.path())["purged"], 4);
    assert_eq!(keys(moto, &bucket, "hb/server/servers/").len(), 1);
    assert_eq!(keys(moto, &bucket, "hb/server/agents/").len(), 1);
    assert_ne!(keys(moto, &bucket, "hb/server/servers/"), servers);
}

#[test]
fn an_agent_heartbeat_writes_agents_only_and_a_down_agent_writes_nothing() {
    let moto = moto();
    let bucket = bucket(moto);
    let registry = format!("s3://{bucket}/hb/agent");
    let tmp = tempfile::tempdir().unwrap();
    let agent = FakeAgent::start("ag-1", false, &["--token", "s3cr3t"]);
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, "s3cr3t\n").unwrap();
    let v = ok_json(&output(
        heartbeat_cmd(
            moto,
            &registry,
            tmp.path(),
            "ag-1",
            "10.1.1.1",
            &agent.addr(),
            120,
        )
        .env("CONSUL_HTTP_TOKEN_FILE", &token_file),
    ));
    assert_eq!(v["mode"], "agent");
    assert!(keys(moto, &bucket, "hb/agent/servers/").is_empty());
    assert_eq!(keys(moto, &bucket, "hb/agent/agents/").len(), 1);

    assert_eq!(v["agent_self"], true, "the token was sent: {v}");

    // Without the token /v1/agent/self answers 403; a 403 never stops
    // heartbeats (DESIGN.md, Day-2 rules): the status endpoints say the
    // agent runs, and it is published as an agent.
    let out = output(&mut heartbeat_cmd(
        moto,
        &registry,
        tmp.path(),
        "ag-2",
        "10.1.1.2",
        &agent.addr(),
        120,
    ));
    let v = ok_json(&out);
    assert_eq!(v["agent_self"], false);
    assert_eq!(v["mode"], "agent");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("agent:read"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Agent not running (and this root never ran `run`): at once, a clear
    // message naming both, nothing written.
    let down = format!("127.0.0.1:{}", closed_port());
    let out = output(&mut heartbeat_cmd(
        moto,
        &registry,
        tmp.path(),
        "ag-3",
        "10.1.1.3",
        &down,
        120,
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is not answering") && stderr.contains("auto-consul run"),
        "{stderr}"
    );
    assert_eq!(
        keys(moto, &bucket, "hb/agent/agents/").len(),
        2,
        "a down agent wrote a heartbeat"
    );
}

#[test]
fn purge_deletes_every_expired_key_in_batches_and_keeps_every_live_one() {
    // Its own moto_server, so that the request count is this test's alone.
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let p = "hb/purge";
    let (expired_n, live_n) = (1150usize, 250usize);
    let mut items = Vec::new();
    let mut expired = HashSet::new();
    for i in 0..expired_n {
        let dir = if i % 10 == 0 { "servers" } else { "agents" };
        let key = format!("{p}/{dir}/{}-old-{i}", stamp(600 + (i as i64 % 50)));
        expired.insert(key.clone());
        // Half in the original tool's bare-IP form.
        let body = if i % 2 == 0 {
            format!("10.2.{}.{}", i / 250, i % 250 + 1)
        } else {
            format!(
                "{{\"node\":\"old-{i}\",\"address\":\"10.3.0.1\",\"mode\":\"agent\",\"version\":\"0\"}}"
            )
        };
        items.push((key, body));
    }
    // Expired on the store's clock: written, then aged ten minutes.
    put_many(&moto, &bucket, std::mem::take(&mut items));
    assert_eq!(moto.age(&bucket, &format!("{p}/"), 600) as usize, expired_n);
    let mut live = HashSet::new();
    for i in 0..live_n {
        let key = format!("{p}/agents/{}-live-{i}", stamp(5));
        live.insert(key.clone());
        items.push((key, "10.4.0.1".to_string()));
    }
    put_many(&moto, &bucket, items);
    let before = moto.requests();
    let v = ok_json(&output(auto_consul(&moto).args([
        "purge",
        "--json",
        "--registry",
        &format!("s3://{bucket}/{p}"),
        "--expiry",
        "120",
        "--agent-expiry",
        "120",
    ])));
    let requests = moto.requests() - before;
    let left: HashSet<String> = keys(&moto, &bucket, &format!("{p}/")).into_iter().collect();
    assert_eq!(left, live, "exactly the live keys remain");
    assert_eq!(v["deleted"].as_u64().unwrap() as usize, expired_n);
    // A listing page at a time (1000 keys), each page's expired keys in one
    // DeleteObjects: memory bounded by a page.
    let agents_keys = live_n + expired_n - expired_n.div_ceil(10);
    let pages = agents_keys.div_ceil(1000) + expired_n.div_ceil(10).div_ceil(1000);
    let batches = v["delete_requests"].as_u64().unwrap() as usize;
    assert!(
        batches <= pages,
        "{batches} DeleteObjects for {pages} pages"
    );
    // Plus one slot read (--servers 1) and one read of the cluster record.
    let bound = pages + batches + 2;
    eprintln!(
        "purge: {expired_n} expired + {live_n} live keys: {requests} requests ({batches} DeleteObjects), bound {bound}"
    );
    assert!(
        requests as usize <= bound,
        "{requests} requests for the purge, more than {bound}"
    );
}

#[test]
fn a_server_that_stops_heartbeating_loses_its_slot_and_a_dead_cluster_rebootstraps_once() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "hb/takeover";
    let registry = format!("s3://{bucket}/{p}");
    // Slot ages have 1-second resolution: margins of 4 s and more below
    // (a loaded machine takes seconds per debug-build run).
    let expiry = 12;
    let tmp = tempfile::tempdir().unwrap();
    let root = |n: &str| tmp.path().join(n);
    let mut last_write_of_c = std::time::Instant::now();
    let modes: Vec<String> = ["s-a", "s-b", "s-c"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let v = run_exp(
                moto,
                &registry,
                &root(n),
                n,
                &format!("10.5.0.{}", i + 1),
                3,
                expiry,
            );
            last_write_of_c = std::time::Instant::now();
            mode(&v)
        })
        .collect();
    assert_eq!(modes, ["bootstrap", "server", "server"]);
    let held_by_c = (0..3)
        .find(|i| slot(moto, &bucket, p, *i)["node"] == "s-c")
        .unwrap();

    // s-a and s-b keep heartbeating; s-c stops.
    let agents: Vec<FakeAgent> = ["s-a", "s-b"]
        .iter()
        .map(|n| FakeAgent::start(n, true, &[]))
        .collect();
    std::thread::sleep(Duration::from_secs(6));
    for (i, (n, a)) in ["s-a", "s-b"].iter().zip(&agents).enumerate() {
        let v = ok_json(&output(&mut heartbeat_cmd(
            moto,
            &registry,
            &root(n),
            n,
            &format!("10.5.0.{}", i + 1),
            &a.addr(),
            expiry,
        )));
        assert_eq!(v["slot"]["status"], "renewed");
    }
    // s-c last wrote about 13 s ago (expired); s-a and s-b about 7 s ago (live).
    std::thread::sleep(Duration::from_secs(7));
    let d = run_exp(moto, &registry, &root("s-d"), "s-d", "10.5.0.4", 3, expiry);
    eprintln!(
        "takeover: the slot of a silent server was taken {:.1}s after its claim (expiry {expiry}s)",
        last_write_of_c.elapsed().as_secs_f64()
    );
    assert_eq!(mode(&d), "server");
    assert_eq!(d["slot"].as_u64().unwrap() as u32, held_by_c);
    assert_eq!(slot(moto, &bucket, p, held_by_c)["node"], "s-d");

    // Now every server goes silent. After the expiry a node boots: the
    // servers have no instance id EC2 could confirm gone, so the witness
    // rule refuses a new cluster beside them.
    std::thread::sleep(Duration::from_secs(expiry + 1));
    let racer = |i: usize| {
        let mut cmd = run_exp_cmd(
            moto,
            &registry,
            &root(&format!("new-{i}")),
            &format!("new-{i}"),
            &format!("10.5.1.{}", i + 1),
            1,
            expiry,
        );
        // (The new cluster restores nothing: its agents need not wait.)
        cmd.args(["--witness-wait", "2", "--no-restore"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    let refused = racer(9).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("not confirmed gone"), "{err}");
    // The operator confirms them gone; six nodes boot at once.
    let record: Value = serde_json::from_str(&get(moto, &bucket, &format!("{p}/cluster"))).unwrap();
    ok_json(&output(auto_consul(moto).args([
        "cluster",
        "retire",
        "--json",
        "--registry",
        &registry,
        record["cluster_id"].as_str().unwrap(),
    ])));
    let racers: Vec<_> = (0..6).map(|i| racer(i).spawn().unwrap()).collect();
    let outs: Vec<_> = racers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let modes: Vec<String> = outs.iter().map(|o| mode(&ok_json(o))).collect();
    eprintln!("rebootstrap race: {modes:?}");
    assert_eq!(
        modes.iter().filter(|m| *m == "bootstrap").count(),
        1,
        "{modes:?}"
    );
    assert_eq!(
        modes.iter().filter(|m| *m == "agent").count(),
        5,
        "{modes:?}"
    );
    let warned = outs
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stderr).contains("NEW, EMPTY cluster"))
        .count();
    assert_eq!(warned, 1, "the re-bootstrap must warn loudly, once");
}

#[test]
fn leave_frees_the_slot_and_the_next_node_becomes_a_server_at_once() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "hb/leave";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(
        mode(&run_exp(
            moto,
            &registry,
            &tmp.path().join("a"),
            "l-a",
            "10.6.0.1",
            2,
            120
        )),
        "bootstrap"
    );
    assert_eq!(
        mode(&run_exp(
            moto,
            &registry,
            &tmp.path().join("b"),
            "l-b",
            "10.6.0.2",
            2,
            120
        )),
        "server"
    );
    assert_eq!(
        mode(&run_exp(
            moto,
            &registry,
            &tmp.path().join("c"),
            "l-c",
            "10.6.0.3",
            2,
            120
        )),
        "agent"
    );
    let agent = FakeAgent::start("l-b", true, &[]);
    ok_json(&output(&mut heartbeat_cmd(
        moto,
        &registry,
        &tmp.path().join("b"),
        "l-b",
        "10.6.0.2",
        &agent.addr(),
        120,
    )));
    assert!(!keys(moto, &bucket, &format!("{p}/servers/")).is_empty());

    let v = ok_json(&output(
        auto_consul(moto)
            .args([
                "leave",
                "--json",
                "--registry",
                &registry,
                "--address",
                "10.6.0.2",
                "--node",
                "l-b",
                "--servers",
                "2",
            ])
            .arg("--root")
            .arg(tmp.path().join("b")),
    ));
    assert_eq!(v["slots_released"], serde_json::json!([1]));
    assert!(
        keys(moto, &bucket, &format!("{p}/servers/")).is_empty(),
        "heartbeats of the leaver remain"
    );
    assert_eq!(slot(moto, &bucket, p, 1)["released"], true);
    let d = run_exp(
        moto,
        &registry,
        &tmp.path().join("d"),
        "l-d",
        "10.6.0.4",
        2,
        120,
    );
    assert_eq!(mode(&d), "server");
    assert_eq!(d["slot"], 1);
}

#[test]
fn members_whose_instance_ec2_reports_terminated_are_not_joined() {
    use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
    let moto = moto();
    let bucket = bucket(moto);
    let p = "hb/ec2";
    let ec2 = aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(moto.url())
            .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
            .build(),
    );
    let ids: Vec<String> = rt().block_on(async {
        let images = ec2.describe_images().send().await.unwrap();
        let ami = images.images()[0].image_id().unwrap().to_string();
        let out = ec2
            .run_instances()
            .image_id(ami)
            .min_count(3)
            .max_count(3)
            .send()
            .await
            .unwrap();
        let ids: Vec<String> = out
            .instances()
            .iter()
            .map(|i| i.instance_id().unwrap().to_string())
            .collect();
        ec2.terminate_instances()
            .instance_ids(&ids[1])
            .send()
            .await
            .unwrap();
        ids
    });
    for (i, id) in ids.iter().enumerate() {
        let body = format!(
            r#"{{"node":"{id}","address":"10.7.0.{}","instance_id":"{id}","mode":"agent","version":"0"}}"#,
            i + 1
        );
        put(
            moto,
            &bucket,
            &format!("{p}/agents/{}-{id}", stamp(3)),
            &body,
        );
    }
    // An instance id EC2 does not know (another account, long gone) is kept,
    // and does not hide the state of the others.
    put(
        moto,
        &bucket,
        &format!("{p}/agents/{}-i-0abcdef0123456789", stamp(3)),
        r#"{"node":"i-0abcdef0123456789","address":"10.7.0.9","instance_id":"i-0abcdef0123456789","mode":"agent","version":"0"}"#,
    );
    put(
        moto,
        &bucket,
        &format!("{p}/servers/{}-srv", stamp(3)),
        "10.7.0.100",
    );
    let tmp = tempfile::tempdir().unwrap();
    let v = run_exp(
        moto,
        &format!("s3://{bucket}/{p}"),
        tmp.path(),
        "newcomer",
        "10.7.0.50",
        1,
        120,
    );
    assert_eq!(mode(&v), "agent");
    let join: HashSet<String> = v["retry_join"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert_eq!(v["retry_join"][0], "10.7.0.100", "servers first");
    assert!(
        !join.contains("10.7.0.2"),
        "the terminated instance was joined: {join:?}"
    );
    for kept in ["10.7.0.1", "10.7.0.3", "10.7.0.9"] {
        assert!(join.contains(kept), "{kept} missing from {join:?}");
    }
}

#[test]
fn members_and_purge_handle_the_original_tools_registry() {
    let moto = moto();
    let bucket = bucket(moto);
    let p = "hb/legacy";
    let (live_server, live_agent) = (
        format!("{p}/servers/{}-server1", stamp(20)),
        format!("{p}/agents/{}-agent1", stamp(30)),
    );
    // Ages are the store's (LastModified), so each key is written, then
    // aged as much as its stamp says.
    for (key, body, age) in [
        (live_server.clone(), "192.168.50.100", 20),
        (
            format!("{p}/servers/{}-server1", stamp(300)),
            "192.168.50.100",
            300,
        ),
        (live_agent.clone(), "192.168.50.101", 30),
        (
            format!("{p}/agents/{}-agent-gone", stamp(400)),
            "192.168.50.102",
            400,
        ),
    ] {
        put(moto, &bucket, &key, body);
        moto.age(&bucket, &key, age);
    }
    let registry = format!("s3://{bucket}/{p}");
    // The original tool had one expiry for servers and agents alike.
    let m = ok_json(&output(auto_consul(moto).args([
        "members",
        "--json",
        "--registry",
        &registry,
        "--agent-expiry",
        "120",
    ])));
    assert_eq!(m["servers"].as_array().unwrap().len(), 1);
    assert_eq!(m["servers"][0]["address"], "192.168.50.100");
    assert_eq!(m["agents"][0]["node"], "agent1");
    assert!(m["agents"][0]["age_seconds"].as_u64().unwrap() >= 29);
    let v = ok_json(&output(auto_consul(moto).args([
        "purge",
        "--json",
        "--registry",
        &registry,
        "--agent-expiry",
        "120",
    ])));
    assert_eq!(v["deleted"], 2);
    assert_eq!(
        keys(moto, &bucket, &format!("{p}/")),
        [live_agent, live_server]
    );
}
