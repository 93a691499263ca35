//! Boot-path benchmark: `auto-consul run` against moto_server with a fixed
//! delay injected before every request (a stand-in for the network round
//! trip), on registries of 0, 1 000 and 10 000 live heartbeats; then
//! `members` on 10 000 live and `purge` on 100 000 expired heartbeats.
//!
//! For each case: wall time (median, min, max over the runs), requests
//! made, peak memory (max RSS), and the critical-path depth: the extra wall
//! time the delay adds, divided by the delay, i.e. how many round trips
//! happen one after the other.
//!
//! Run: `cargo bench --bench boot` (release profile). Options after `--`:
//! `--runs N` (default 11), `--delay-ms D` (default 20), `--boot-only` (the
//! two empty-registry boots, without the large registries).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Duration;

use common::Moto;
use serde_json::{Value, json};

#[path = "support/measure.rs"]
mod measure;
use measure::measure;

fn auto_consul(moto: &Moto) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_auto-consul"));
    for (k, _) in std::env::vars() {
        if k.starts_with("AUTO_CONSUL_") || k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    let url = format!("http://127.0.0.1:{}", moto.port);
    cmd.env("AWS_ENDPOINT_URL", &url)
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &url)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("PATH", "/usr/bin:/bin")
        .env("RUST_LOG", "error");
    cmd
}

/// Writes SSM parameter `name` in moto (outside any timing: the delay is
/// not applied to it when the caller set none).
fn put_parameter(moto: &Moto, name: &str, value: &str) {
    let client = aws_sdk_ssm::Client::from_conf(
        aws_sdk_ssm::config::Builder::new()
            .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
            .region(aws_sdk_ssm::config::Region::new("us-east-1"))
            .endpoint_url(format!("http://127.0.0.1:{}", moto.port))
            .credentials_provider(aws_sdk_ssm::config::Credentials::new(
                "testing", "testing", None, None, "bench",
            ))
            .build(),
    );
    common::rt().block_on(async {
        client
            .put_parameter()
            .name(name)
            .value(value)
            .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
            .send()
            .await
            .expect("put_parameter")
    });
}

fn stamp(seconds_ago: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::seconds(seconds_ago))
        .format("%Y%m%d%H%M%S")
        .to_string()
}

/// A registry with one live server (slot 0 and its heartbeat) and `n` live
/// agents, each with an instance id.
fn seed_live(moto: &Moto, bucket: &str, prefix: &str, n: usize) {
    let mut items = vec![
        (
            format!("{prefix}/slots/server-0"),
            json!({"node": "seed-server", "address": "10.200.0.1", "claim_id": "seed", "sequence": 1}).to_string(),
        ),
        (format!("{prefix}/servers/{}-seed-server", stamp(5)), "10.200.0.1".to_string()),
    ];
    for i in 0..n {
        let node = format!("i-{:017x}", i);
        let body = json!({"node": node, "address": format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256), "instance_id": node, "mode": "agent", "version": "0"});
        items.push((
            format!("{prefix}/agents/{}-{node}", stamp((i % 60) as i64)),
            body.to_string(),
        ));
    }
    moto.seed(bucket, items);
}

struct Stats {
    median: Duration,
    min: Duration,
    max: Duration,
    requests: u64,
    rss_kib: i64,
}

fn stats(mut walls: Vec<Duration>, requests: Vec<u64>, rss: Vec<i64>) -> Stats {
    walls.sort();
    let mut reqs = requests.clone();
    reqs.sort();
    Stats {
        median: walls[walls.len() / 2],
        min: walls[0],
        max: walls[walls.len() - 1],
        requests: reqs[reqs.len() / 2],
        rss_kib: *rss.iter().max().unwrap(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `make_cmd(i)` `runs` times with `delay` ms per request.
fn bench_case(moto: &Moto, runs: usize, delay: f64, make_cmd: &dyn Fn(usize) -> Command) -> Stats {
    moto.delay(delay);
    let (mut walls, mut reqs, mut rss) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let before = moto.requests();
        let m = measure(&mut make_cmd(i));
        assert!(m.ok, "run {i} failed: {}{}", m.stdout, m.stderr);
        reqs.push(moto.requests() - before);
        walls.push(m.wall);
        rss.push(m.max_rss_kib);
    }
    stats(walls, reqs, rss)
}

fn report(name: &str, floor: Option<u32>, delay: f64, base: &Stats, delayed: &Stats) {
    let depth = (ms(delayed.median) - ms(base.median)) / delay;
    println!(
        "{name:<34} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>6} {:>7.1} {:>6} {:>8.1}",
        ms(delayed.median),
        ms(delayed.min),
        ms(delayed.max),
        ms(base.median),
        delayed.requests,
        depth,
        floor.map_or("-".to_string(), |f| f.to_string()),
        delayed.rss_kib as f64 / 1024.0,
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut runs, mut delay, mut boot_only) = (11usize, 20.0f64, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = args.next().unwrap().parse().unwrap(),
            "--delay-ms" => delay = args.next().unwrap().parse().unwrap(),
            "--boot-only" => boot_only = true,
            _ => {}
        }
    }
    let moto = Moto::start(&[]);
    let bucket = "bench";
    moto.seed(bucket, vec![]);
    let tmp = tempfile::tempdir().unwrap();
    println!("auto-consul boot benchmark: {runs} runs per case, {delay} ms injected per request");
    println!(
        "{:<34} {:>8} {:>8} {:>8} {:>8} {:>6} {:>7} {:>6} {:>8}",
        "case", "med ms", "min ms", "max ms", "0ms med", "reqs", "depth", "floor", "RSS MiB"
    );

    // Empty registry: identity from IMDS (token, then address and id at
    // once) while the registry is read and the write check runs; then the
    // cluster record, then slot 0. Floor: 2 (IMDS, overlapping the read) + 2.
    let n = std::cell::Cell::new(0usize);
    let empty = |_: usize| {
        n.set(n.get() + 1);
        let mut c = auto_consul(&moto);
        c.args([
            "run",
            "--json",
            "--registry",
            &format!("s3://{bucket}/empty-{}", n.get()),
        ])
        .arg("--root")
        .arg(tmp.path().join(format!("empty-{}", n.get())));
        c
    };
    let base = bench_case(&moto, runs, 0.0, &empty);
    let delayed = bench_case(&moto, runs, delay, &empty);
    report(
        "run, empty registry (bootstrap)",
        Some(4),
        delay,
        &base,
        &delayed,
    );

    // The same bootstrap with --secrets in SSM: the gossip key, the CA,
    // its certificate and two tokens made (create-only) and read back
    // before the cluster record, then read again for the config, and a
    // server certificate signed locally.
    let with_secrets = |i: usize| {
        let mut c = empty(i);
        c.args(["--secrets", &format!("ssm:///bench/secrets-{}", n.get())]);
        c
    };
    let base = bench_case(&moto, runs, 0.0, &with_secrets);
    let delayed = bench_case(&moto, runs, delay, &with_secrets);
    report(
        "run, empty registry, --secrets ssm",
        None,
        delay,
        &base,
        &delayed,
    );
    // And with its own token (--instance-tag): its parameter made in the
    // same round as the cluster's secrets.
    let with_tag = |i: usize| {
        let mut c = with_secrets(i);
        c.args(["--instance-tag", "auto-consul:cluster=bench"]);
        c
    };
    let base = bench_case(&moto, runs, 0.0, &with_tag);
    let delayed = bench_case(&moto, runs, delay, &with_tag);
    report(
        "run, genesis, secrets, own token",
        None,
        delay,
        &base,
        &delayed,
    );
    // An agent joining a cluster with secrets in SSM: the secrets read in
    // one round; with --instance-tag its own token (made ahead, as the
    // leader's heartbeat makes it) is read in that same round.
    let seed = |prefix: &str| {
        let mut c = auto_consul(&moto);
        c.args([
            "run",
            "--json",
            "--registry",
            &format!("s3://{bucket}/{prefix}"),
        ])
        .args(["--secrets", &format!("ssm:///bench/{prefix}")])
        .args(["--node", "seed-boot", "--address", "10.251.0.1"])
        .arg("--root")
        .arg(tmp.path().join(format!("{prefix}-seed")));
        let m = measure(&mut c);
        assert!(m.ok, "seeding {prefix}: {}", m.stderr);
        let v: Value = serde_json::from_str(&m.stdout).unwrap();
        v["cluster_id"].as_str().unwrap().to_string()
    };
    moto.delay(0.0);
    let cluster = seed("agent-secrets");
    let next = std::cell::Cell::new(0x0be0_0000u64);
    let (next, moto_ref, tmp_ref, bucket_ref) = (&next, &moto, &tmp, bucket);
    let agent_case = |tag: bool| {
        move |i: usize| {
            let (moto, tmp, bucket) = (moto_ref, tmp_ref, bucket_ref);
            next.set(next.get() + 1);
            let id = format!("i-{:017x}", next.get());
            let mut c = auto_consul(moto);
            c.args(["run", "--json", "--role", "agent"])
                .args(["--registry", &format!("s3://{bucket}/agent-secrets")])
                .args(["--secrets", "ssm:///bench/agent-secrets"])
                .args([
                    "--node",
                    &id,
                    "--address",
                    &format!("10.251.1.{}", i % 250 + 2),
                ])
                .arg("--root")
                .arg(tmp.path().join(format!("agent-{id}")));
            if tag {
                c.args(["--instance-tag", "auto-consul:cluster=bench"]);
            }
            c
        }
    };
    for (name, tag) in [
        ("run, agent, --secrets ssm", false),
        ("run, agent, own token (tag)", true),
    ] {
        if tag {
            // Each run's own token made ahead, as the leader's heartbeat
            // makes it, before any is timed or counted.
            moto.delay(0.0);
            for k in 1..=2 * runs as u64 {
                let id = format!("i-{:017x}", next.get() + k);
                put_parameter(
                    &moto,
                    &format!("/bench/agent-secrets/{cluster}/node/{id}"),
                    "00000000-0000-4000-8000-000000000001",
                );
            }
        }
        let case = agent_case(tag);
        let base = bench_case(&moto, runs, 0.0, &case);
        let delayed = bench_case(&moto, runs, delay, &case);
        report(name, None, delay, &base, &delayed);
    }
    if boot_only {
        return;
    }

    for size in [1_000usize, 10_000] {
        let prefix = format!("live-{size}");
        moto.delay(0.0);
        seed_live(&moto, bucket, &prefix, size);
        let live = |i: usize| {
            let mut c = auto_consul(&moto);
            c.args([
                "run",
                "--json",
                "--expiry",
                "3600",
                "--registry",
                &format!("s3://{bucket}/{prefix}"),
            ])
            .args(["--node", &format!("bench-{i}"), "--address", "10.250.0.1"])
            .arg("--root")
            .arg(tmp.path().join(format!("{prefix}-{i}")));
            c
        };
        let base = bench_case(&moto, runs, 0.0, &live);
        let delayed = bench_case(&moto, runs, delay, &live);
        // Listing pages of 1000 keys follow each other (the first goes with
        // the write check, the cluster record and the slots); then the
        // bodies, then the EC2 check.
        let floor = size.div_ceil(1000) as u32 + 1 + 1;
        report(
            &format!("run, {size} live heartbeats (agent)"),
            Some(floor),
            delay,
            &base,
            &delayed,
        );
    }

    let members = |_: usize| {
        let mut c = auto_consul(&moto);
        c.args([
            "members",
            "--json",
            "--expiry",
            "3600",
            "--registry",
            &format!("s3://{bucket}/live-10000"),
        ]);
        c
    };
    let few = runs.min(3);
    let base = bench_case(&moto, few, 0.0, &members);
    let delayed = bench_case(&moto, few, delay, &members);
    report(
        "members, 10000 live heartbeats",
        None,
        delay,
        &base,
        &delayed,
    );

    // Purge: 100 000 expired heartbeats, seeded afresh for each run.
    let purge_runs = 2;
    let mut results = Vec::new();
    for d in [0.0, delay] {
        let (mut walls, mut reqs, mut rss) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..purge_runs {
            moto.delay(0.0);
            let prefix = format!("purge-{d}-{r}");
            let items = (0..100_000)
                .map(|i| {
                    (
                        format!("{prefix}/agents/{}-old-{i}", stamp(1000 + (i % 500) as i64)),
                        "10.0.0.1".to_string(),
                    )
                })
                .collect();
            moto.seed(bucket, items);
            // Expired on the store's clock (the one that rules): older
            // than the agents' expiry (7200 s).
            moto.age(bucket, &format!("{prefix}/"), 8000);
            moto.delay(d);
            let before = moto.requests();
            let mut c = auto_consul(&moto);
            c.args([
                "purge",
                "--json",
                "--registry",
                &format!("s3://{bucket}/{prefix}"),
            ]);
            let m = measure(&mut c);
            assert!(m.ok, "purge failed: {}", m.stderr);
            let v: Value = serde_json::from_str(&m.stdout).unwrap();
            assert_eq!(v["deleted"], 100_000);
            reqs.push(moto.requests() - before);
            walls.push(m.wall);
            rss.push(m.max_rss_kib);
        }
        results.push(stats(walls, reqs, rss));
    }
    report(
        "purge, 100000 expired heartbeats",
        None,
        delay,
        &results[0],
        &results[1],
    );
    println!(
        "\nfloor: round trips that must follow one another. Empty registry: IMDS token then IMDS reads \
         (the registry read and the write check overlap them), cluster record, slot 0 = 4. Populated \
         (identity given): listing pages one after another (the first with the slots and cluster \
         record), heartbeat bodies, EC2 check."
    );
    println!(
        "depth: (median with the delay - median without) / delay. Static credentials; moto_server \
         applies requests one at a time."
    );
}
