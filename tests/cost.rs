//! What the registry costs, in requests (moto_server's exact counter): an
//! agent's heartbeat is one write whatever the registry holds, and one
//! server purges for the fleet.

mod common;

use common::*;
use serde_json::Value;

fn agent_items(p: &str, n: usize, seconds_ago: i64) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("{p}/agents/{}-fleet-{i}", stamp(seconds_ago)),
                format!(
                    r#"{{"node":"fleet-{i}","address":"10.40.{}.{}","mode":"agent","version":"0"}}"#,
                    i / 250,
                    i % 250 + 1
                ),
            )
        })
        .collect()
}

#[test]
fn an_agent_heartbeat_is_one_request_against_2000_live_heartbeats() {
    // A moto of its own: its request counter is this test's alone.
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let p = "cost/agent";
    let registry = format!("s3://{bucket}/{p}");
    moto.seed(&bucket, agent_items(p, 2000, 5));
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(
        mode(&run_node(
            &moto,
            &registry,
            &tmp.path().join("srv"),
            "srv",
            "10.41.0.1",
            1
        )),
        "bootstrap"
    );
    assert_eq!(
        mode(&run_node(
            &moto,
            &registry,
            &tmp.path().join("ag"),
            "ag",
            "10.41.0.2",
            1
        )),
        "agent"
    );
    // An agent of a working cluster: it knows the leader, so the live
    // servers come from its Raft peers, not from the registry.
    let agent = FakeAgent::start(
        "ag",
        false,
        &["--leader", "10.41.0.1:8300", "--peers", "10.41.0.1:8300"],
    );
    for _ in 0..2 {
        let before = moto.requests();
        let v = ok_json(&output(&mut heartbeat_cmd(
            &moto,
            &registry,
            &tmp.path().join("ag"),
            "ag",
            "10.41.0.2",
            &agent.addr(),
        )));
        let requests = moto.requests() - before;
        assert_eq!(v["mode"], "agent");
        assert_eq!(
            requests, 1,
            "an agent heartbeat made {requests} requests: {v}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
}

#[test]
fn only_the_holder_of_the_lowest_live_slot_purges_and_once_per_expiry() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let p = "cost/purger";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let root = |n: &str| tmp.path().join(n);
    assert_eq!(
        mode(&run_node(
            &moto,
            &registry,
            &root("s0"),
            "s0",
            "10.42.0.1",
            2
        )),
        "bootstrap"
    );
    assert_eq!(
        mode(&run_node(
            &moto,
            &registry,
            &root("s1"),
            "s1",
            "10.42.0.2",
            2
        )),
        "server"
    );
    // 1500 expired agent heartbeats (past the agents' 7200 s, on the
    // store's clock) and 300 live ones.
    moto.seed(&bucket, agent_items(p, 1500, 7300));
    assert_eq!(moto.age(&bucket, &format!("{p}/agents/"), 7300), 1500);
    let live: Vec<(String, String)> = (0..300)
        .map(|i| {
            (
                format!("{p}/agents/{}-live-{i}", stamp(1)),
                format!(
                    r#"{{"node":"live-{i}","address":"10.43.{}.{}","mode":"agent","version":"0"}}"#,
                    i / 250,
                    i % 250 + 1
                ),
            )
        })
        .collect();
    moto.seed(&bucket, live);
    let hb = |n: &str, ip: &str| {
        let agent = FakeAgent::start(n, true, &["--address", ip]);
        ok_json(&output(&mut heartbeat_cmd(
            &moto,
            &registry,
            &root(n),
            n,
            ip,
            &agent.addr(),
        )))
    };
    // The holder of slot 1 does not purge while slot 0 is live.
    let v = hb("s1", "10.42.0.2");
    assert_eq!(v["slot"]["index"], 1);
    assert_eq!(v["purged"], 0, "{v}");
    assert_eq!(
        count_keys(&moto, &bucket, &format!("{p}/agents/")),
        1800 + 1
    );
    // The holder of slot 0 does, streaming pages into DeleteObjects.
    let before = moto.requests();
    let v = hb("s0", "10.42.0.1");
    let requests = moto.requests() - before;
    assert_eq!(v["slot"]["index"], 0);
    assert_eq!(v["purged"], 1500, "{v}");
    // 2 PUTs, the record, the slot read and renewal, then 2 agents/ pages
    // and 1 servers/ page, each page's expired keys in one DeleteObjects.
    assert!(requests <= 5 + 3 + 2, "{requests} requests: {v}");
    assert_eq!(count_keys(&moto, &bucket, &format!("{p}/agents/")), 300 + 2);
    // Again within the expiry: it does not list the registry again.
    moto.seed(&bucket, agent_items(p, 10, 7300));
    moto.age(&bucket, &format!("{p}/agents/"), 0);
    let before = moto.requests();
    let v = hb("s0", "10.42.0.1");
    assert_eq!(v["purged"], 0, "{v}");
    assert_eq!(moto.requests() - before, 5, "{v}");
}

/// Three servers in prefix `p`, then `agents` (key age in seconds, node
/// index) seeded under `agents/`, then a joining node's boot: its `run`
/// output and its requests by kind.
fn join_cost(
    p: &str,
    agents: impl Iterator<Item = (i64, usize)>,
) -> (Value, std::collections::BTreeMap<String, u64>) {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    for (i, n) in ["j0", "j1", "j2"].iter().enumerate() {
        run_node(
            &moto,
            &registry,
            &tmp.path().join(n),
            n,
            &format!("10.44.0.{}", i + 1),
            3,
        );
    }
    let items: Vec<(String, String)> = agents
        .map(|(ago, i)| {
            (
                format!("{p}/agents/{}-fleet-{i}", stamp(ago)),
                format!(
                    r#"{{"node":"fleet-{i}","address":"10.45.{}.{}","mode":"agent","version":"0"}}"#,
                    i / 250,
                    i % 250 + 1
                ),
            )
        })
        .collect();
    moto.seed(&bucket, items);
    let before = moto.kinds();
    let v = run_node(
        &moto,
        &registry,
        &tmp.path().join("joiner"),
        "joiner",
        "10.44.1.1",
        3,
    );
    let after = moto.kinds();
    let delta = after
        .iter()
        .map(|(k, n)| (k.clone(), n - before.get(k).unwrap_or(&0)))
        .collect();
    assert_eq!(mode(&v), "agent");
    // The three servers first (freshest first), then agents.
    let join = v["retry_join"].as_array().unwrap();
    let mut servers: Vec<&str> = join[..3].iter().map(|a| a.as_str().unwrap()).collect();
    servers.sort();
    assert_eq!(servers, ["10.44.0.1", "10.44.0.2", "10.44.0.3"], "{v}");
    assert!(join.len() > 3, "{v}");
    (v, delta)
}

#[test]
fn a_joining_agent_reads_at_most_3_listing_pages_of_a_fleet_of_10000() {
    // Steady state of 10 000 agents heartbeating every 2400 s (the default
    // agent expiry of 7200 s): three live keys each, spread over the expiry.
    let fleet =
        (0..10_000usize).flat_map(|i| (0..3).map(move |k| (((i * 7 + k * 2400) % 7200) as i64, i)));
    let (_, kinds) = join_cost("cost/join", fleet);
    eprintln!("joining 10 000 agents: {kinds:?}");
    assert!(kinds["LIST"] <= 3, "{} listing pages", kinds["LIST"]);
}

#[test]
fn a_server_without_a_slot_purges_only_when_no_slot_is_live() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let p = "cost/noslot";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let root = |n: &str| tmp.path().join(n);
    for (n, ip) in [("n0", "10.46.0.1"), ("n1", "10.46.0.2")] {
        run_node(&moto, &registry, &root(n), n, ip, 2);
    }
    // n1 runs as a server but holds no slot (its state names none, as
    // after a slot it released): it purges only when no slot is live.
    let state = root("n1").join("var/lib/auto-consul/state.json");
    let mut s: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(s["mode"], "server", "{s}");
    s["slot"] = Value::Null;
    s["claim_id"] = Value::Null;
    std::fs::write(&state, s.to_string()).unwrap();
    moto.seed(&bucket, agent_items(p, 50, 7300));
    moto.age(&bucket, &format!("{p}/agents/"), 7300);
    let beat = || {
        let agent = FakeAgent::start("n1", true, &["--address", "10.46.0.2"]);
        ok_json(&output(&mut heartbeat_cmd(
            &moto,
            &registry,
            &root("n1"),
            "n1",
            "10.46.0.2",
            &agent.addr(),
        )))
    };
    // Both slots live (just claimed): n1 leaves the purge to their holders.
    let v = beat();
    assert_eq!(v["slot"], Value::Null, "{v}");
    assert_eq!(v["purged"], 0, "{v}");
    // Every slot expired on the store's clock (their holders silent): any
    // server purges, so expired keys never pile up.
    moto.age(&bucket, &format!("{p}/slots/"), 600);
    let v = beat();
    // The 50 expired keys, and n1's own keys of its first heartbeat when
    // they were stamped in another second than this one's (superseded).
    let purged = v["purged"].as_u64().unwrap();
    assert!(purged == 50 || purged == 52, "{v}");
    // Left: the heartbeat it has just written.
    assert_eq!(count_keys(&moto, &bucket, &format!("{p}/agents/")), 1);
}

#[test]
fn a_boot_storm_of_10000_agents_costs_a_joiner_one_agents_listing_page() {
    // A whole fleet booted within the last 30 s: every key is inside the
    // window a boot reads agents from (300 s), ten pages of it.
    let storm = (0..10_000usize).map(|i| ((i % 30) as i64, i));
    let (_, kinds) = join_cost("cost/storm", storm);
    eprintln!("a boot in a storm of 10 000 agents: {kinds:?}");
    // One servers listing, one agents page: not the ten the window holds.
    assert_eq!(kinds["LIST"], 2, "{} listing pages", kinds["LIST"]);
}
