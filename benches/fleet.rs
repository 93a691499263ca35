//! Fleet-cost benchmark: what the registry costs a fleet, in S3 requests by
//! kind and in dollars, for 100, 1 000 and 10 000 nodes, measured with the
//! real binary against moto_server (its request counter by kind).
//!
//! For each fleet size it seeds a registry in steady state (3 servers; every
//! agent with the live keys its timer leaves, spread over the agent expiry;
//! the expired keys one purge interval accumulates), then measures one run
//! of each thing that happens: an agent's heartbeat, a server's heartbeat,
//! the purger's heartbeat when its purge is due, and an agent's boot. The
//! per-hour figures multiply those by how often each happens at the default
//! settings (servers every 120/3 s, agents every 7200/3 s, one purge per
//! 120 s).
//!
//! Beside it, the original tool's scheme (one expiry of 120 s, every node
//! heartbeats every 60 s and lists and purges the whole registry): its run
//! is one PUT plus a full listing and purge, measured with `auto-consul
//! purge` on that scheme's steady-state registry.
//!
//! Prices: S3 Standard, us-east-1 list prices: PUT, COPY, POST and LIST
//! $0.005 per 1 000 requests, GET $0.0004 per 1 000. DeleteObjects is a
//! POST and is priced as one here (DELETE requests are free; counting it is
//! the cautious side). A month is 730 hours.
//!
//! Run: `cargo bench --bench fleet` (release profile); `-- --sizes 100,1000`
//! to choose the fleet sizes.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::Value;

const SERVER_EXPIRY: u64 = 120;
const AGENT_EXPIRY: u64 = 7200;
const HOURS_PER_MONTH: f64 = 730.0;
const KINDS: [&str; 4] = ["PUT", "LIST", "GET", "DELETE"];

type Kinds = BTreeMap<String, f64>;

fn price(k: &Kinds) -> f64 {
    let get = |name: &str| k.get(name).copied().unwrap_or(0.0);
    (get("PUT") + get("LIST") + get("DELETE")) * 0.005 / 1000.0 + get("GET") * 0.0004 / 1000.0
}

fn add(into: &mut Kinds, k: &Kinds, times: f64) {
    for (name, n) in k {
        *into.entry(name.clone()).or_default() += n * times;
    }
}

/// The requests, by kind, one run of `cmd` makes.
fn measured(moto: &Moto, cmd: &mut std::process::Command) -> (Kinds, Value) {
    let before = moto.kinds();
    let v = ok_json(&output(cmd));
    let after = moto.kinds();
    let mut k = Kinds::new();
    for (name, n) in &after {
        let d = n - before.get(name).unwrap_or(&0);
        if d > 0 {
            k.insert(normalise(name).to_string(), d as f64);
        }
    }
    (k, v)
}

/// S3's price classes: a HEAD is priced as a GET.
fn normalise(kind: &str) -> &str {
    match kind {
        "HEAD" => "GET",
        "POST" => "PUT",
        other => other,
    }
}

fn agent_body(i: usize) -> String {
    format!(
        r#"{{"node":"fleet-{i}","address":"10.{}.{}.{}","mode":"agent","version":"0"}}"#,
        100 + i / 62_500,
        (i / 250) % 250,
        i % 250 + 1
    )
}

/// The heartbeat keys of `agents` agents, `per_agent` each, their stamps
/// spread over `span` seconds starting `from` seconds ago.
fn agent_keys(
    p: &str,
    agents: usize,
    per_agent: usize,
    from: i64,
    span: i64,
) -> Vec<(String, String)> {
    (0..agents)
        .flat_map(|i| {
            (0..per_agent).map(move |k| {
                let ago =
                    from + ((i as i64 * 7919 + k as i64 * span / per_agent as i64) % span.max(1));
                (
                    format!("{p}/agents/{}-fleet-{i}", stamp(ago)),
                    agent_body(i),
                )
            })
        })
        .collect()
}

/// `n` heartbeat keys of nodes gone for good.
fn gone_keys(p: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("{p}/agents/{}-gone-{i}", stamp(AGENT_EXPIRY as i64 + 60)),
                agent_body(i).replace("fleet-", "gone-"),
            )
        })
        .collect()
}

struct Row {
    nodes: usize,
    scheme: &'static str,
    per_node_hour: Kinds,
    boot: Kinds,
    fleet_month: f64,
}

fn ours(moto: &Moto, nodes: usize) -> Row {
    let bucket = bucket(moto);
    let p = "fleet";
    let registry = format!("s3://{bucket}/{p}");
    let tmp = tempfile::tempdir().unwrap();
    let agents = nodes - 3;
    let root = |n: &str| tmp.path().join(n);
    for (i, n) in ["s0", "s1", "s2"].iter().enumerate() {
        run_node(
            moto,
            &registry,
            &root(n),
            n,
            &format!("10.99.0.{}", i + 1),
            3,
        );
    }
    // Steady state: the expired keys one purge interval accumulates (seeded
    // first and aged past the agent expiry on the store's clock), then
    // three live keys per agent, spread over the agent expiry.
    let expired_per_purge = (agents as u64 * SERVER_EXPIRY / (AGENT_EXPIRY / 3)).max(1) as usize;
    moto.seed(&bucket, gone_keys(p, expired_per_purge));
    moto.age(&bucket, &format!("{p}/agents/"), AGENT_EXPIRY + 60);
    moto.seed(&bucket, agent_keys(p, agents, 3, 0, AGENT_EXPIRY as i64));

    let agent = FakeAgent::start("fleet-1", false, &[]);
    let (agent_run, _) = measured(
        moto,
        &mut heartbeat_cmd(
            moto,
            &registry,
            &root("a"),
            "fleet-1",
            "10.100.0.2",
            &agent.addr(),
        ),
    );
    let server_agent = |n: &str, ip: &str| FakeAgent::start(n, true, &["--address", ip]);
    let s1 = server_agent("s1", "10.99.0.2");
    let (server_run, _) = measured(
        moto,
        &mut heartbeat_cmd(moto, &registry, &root("s1"), "s1", "10.99.0.2", &s1.addr()),
    );
    let s0 = server_agent("s0", "10.99.0.1");
    let _ = std::fs::remove_file(root("s0").join("var/lib/auto-consul/purged-at"));
    let (purger_run, v) = measured(
        moto,
        &mut heartbeat_cmd(moto, &registry, &root("s0"), "s0", "10.99.0.1", &s0.addr()),
    );
    assert!(
        v["purged"].as_u64().unwrap_or(0) > 0,
        "the purger purged nothing: {v}"
    );
    let (boot, v) = measured(
        moto,
        &mut run_cmd(moto, &registry, &root("joiner"), "joiner", "10.100.9.9", 3),
    );
    assert_eq!(v["mode"], "agent");

    // Per hour: agents every AGENT_EXPIRY/3, servers every SERVER_EXPIRY/3
    // (the purger's extra work once per SERVER_EXPIRY).
    let mut fleet = Kinds::new();
    add(
        &mut fleet,
        &agent_run,
        agents as f64 * 3600.0 / (AGENT_EXPIRY / 3) as f64,
    );
    add(
        &mut fleet,
        &server_run,
        3.0 * 3600.0 / (SERVER_EXPIRY / 3) as f64,
    );
    let mut extra = purger_run.clone();
    for (k, n) in &server_run {
        *extra.entry(k.clone()).or_default() -= n;
    }
    add(&mut fleet, &extra, 3600.0 / SERVER_EXPIRY as f64);
    let month = price(&fleet) * HOURS_PER_MONTH;
    let mut per_node = Kinds::new();
    add(&mut per_node, &fleet, 1.0 / nodes as f64);
    Row {
        nodes,
        scheme: "auto-consul",
        per_node_hour: per_node,
        boot,
        fleet_month: month,
    }
}

fn original(moto: &Moto, nodes: usize) -> Row {
    let bucket = bucket(moto);
    let p = "orig";
    let registry = format!("s3://{bucket}/{p}");
    // Its steady state: every node heartbeats every 60 s with a 120 s
    // expiry (two live keys each), and the keys one run finds expired
    // (the fleet's writes since the last purge, every node purging).
    moto.seed(&bucket, gone_keys(p, 1));
    moto.age(&bucket, &format!("{p}/agents/"), SERVER_EXPIRY + 60);
    moto.seed(&bucket, agent_keys(p, nodes, 2, 0, SERVER_EXPIRY as i64));
    let (purge, _) = measured(
        moto,
        auto_consul(moto).args([
            "purge",
            "--json",
            "--registry",
            &registry,
            "--expiry",
            "120",
            "--agent-expiry",
            "120",
        ]),
    );
    // One run: a PUT, then the full listing and purge (our `purge` also
    // reads the record and a slot, which the original tool does not: only
    // LIST and DELETE are kept).
    let mut run = Kinds::new();
    run.insert("PUT".into(), 1.0);
    for k in ["LIST", "DELETE"] {
        if let Some(n) = purge.get(k) {
            run.insert(k.into(), *n);
        }
    }
    let mut fleet = Kinds::new();
    add(&mut fleet, &run, nodes as f64 * 60.0);
    let mut per_node = Kinds::new();
    add(&mut per_node, &fleet, 1.0 / nodes as f64);
    // Its boot lists both directories whole and reads the newest server.
    let mut boot = Kinds::new();
    boot.insert("LIST".into(), purge.get("LIST").copied().unwrap_or(1.0));
    boot.insert("GET".into(), 1.0);
    boot.insert("PUT".into(), 1.0);
    Row {
        nodes,
        scheme: "original (emulated)",
        per_node_hour: per_node,
        boot,
        fleet_month: price(&fleet) * HOURS_PER_MONTH,
    }
}

fn show(k: &Kinds) -> String {
    KINDS
        .iter()
        .map(|n| format!("{:>8.2}", k.get(*n).copied().unwrap_or(0.0)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sizes: Vec<usize> = args
        .iter()
        .position(|a| a == "--sizes")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(|n| n.parse().expect("a size")).collect())
        .unwrap_or_else(|| vec![100, 1000, 10_000]);
    let moto = Moto::start(&[]);
    let mut rows = Vec::new();
    for &n in &sizes {
        rows.push(ours(&moto, n));
        rows.push(original(&moto, n));
    }
    println!(
        "{:>6}  {:<20} | steady, per node-hour: {:>4} {:>8} {:>8} {:>8} | one boot: {:>5} {:>8} {:>8} {:>8} | $/month fleet  $/month per 1000 nodes",
        "nodes", "scheme", "PUT", "LIST", "GET", "DELETE", "PUT", "LIST", "GET", "DELETE"
    );
    for r in &rows {
        println!(
            "{:>6}  {:<20} | {:>31} | {:>32} | {:>14.2}  {:>10.2}",
            r.nodes,
            r.scheme,
            show(&r.per_node_hour),
            show(&r.boot),
            r.fleet_month,
            r.fleet_month * 1000.0 / r.nodes as f64
        );
    }
}
