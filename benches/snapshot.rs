//! Snapshot benchmark: a leader's `auto-consul snapshot` saving a snapshot
//! of SIZE MiB (the fake agent's `GET /v1/snapshot`) to moto_server, then
//! a replacing cluster's leader restoring it (`PUT /v1/snapshot`). For
//! each: wall time, peak memory (max RSS of the auto-consul process) and
//! whether the bytes that arrived hash to what was saved.
//!
//! Run: `cargo bench --bench snapshot` (release profile). Options after
//! `--`: `--mib N` (default 200).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/measure.rs"]
mod measure;

use std::io::Write;

use common::*;
use measure::measure;
use sha2::{Digest, Sha256};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut mib = 200usize;
    while let Some(a) = args.next() {
        if a == "--mib" {
            mib = args.next().unwrap().parse().unwrap();
        }
    }
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let registry = format!("s3://{bucket}/bench");
    let tmp = tempfile::tempdir().unwrap();

    // The snapshot: MiB of bytes nothing compresses.
    let snap = tmp.path().join("consul.snap");
    let mut hasher = Sha256::new();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&snap).unwrap());
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            hasher.update(&block);
            f.write_all(&block).unwrap();
        }
    }
    let sha = format!("{:x}", hasher.finalize());
    println!("auto-consul snapshot benchmark: one snapshot of {mib} MiB");
    println!(
        "{:<28} {:>10} {:>10} {:>10}",
        "case", "wall s", "RSS MiB", "bytes ok"
    );

    // Save: the old cluster's leader.
    let ids = run_instances(&moto, 1);
    let root_a = tmp.path().join("a");
    ok_json(&output(
        run_cmd(&moto, &registry, &root_a, "bench-a", "10.99.0.1", 1)
            .args(["--instance-id", &ids[0]]),
    ));
    let agent_a = FakeAgent::start(
        "bench-a",
        true,
        &[
            "--address",
            "10.99.0.1",
            "--snapshot-file",
            snap.to_str().unwrap(),
        ],
    );
    let m = measure(&mut agent_cmd(
        &moto,
        "snapshot",
        &registry,
        &root_a,
        "bench-a",
        "10.99.0.1",
        &agent_a.addr(),
    ));
    assert!(m.ok, "snapshot failed: {}{}", m.stdout, m.stderr);
    let saved: serde_json::Value = serde_json::from_str(m.stdout.trim()).unwrap();
    println!(
        "{:<28} {:>10.1} {:>10.1} {:>10}",
        "save (GET, multipart PUT)",
        m.wall.as_secs_f64(),
        m.max_rss_kib as f64 / 1024.0,
        saved["sha256"] == sha.as_str()
    );
    drop(agent_a);

    // Restore: the old server gone, a new cluster's leader.
    terminate(&moto, &[&ids[0]]);
    moto.age(&bucket, "bench/", 3 * 120 + 5);
    let root_b = tmp.path().join("b");
    ok_json(&output(
        run_cmd(&moto, &registry, &root_b, "bench-b", "10.99.0.2", 1).args(["--witness-wait", "1"]),
    ));
    let restores = tmp.path().join("restores");
    std::fs::create_dir_all(&restores).unwrap();
    let small = tmp.path().join("small.snap");
    std::fs::write(&small, b"a new cluster's first snapshot").unwrap();
    let agent_b = FakeAgent::start(
        "bench-b",
        true,
        &[
            "--address",
            "10.99.0.2",
            "--snapshot-file",
            small.to_str().unwrap(),
            "--restore-dir",
            restores.to_str().unwrap(),
        ],
    );
    let m = measure(
        agent_cmd(
            &moto,
            "snapshot",
            &registry,
            &root_b,
            "bench-b",
            "10.99.0.2",
            &agent_b.addr(),
        )
        .args(["--snapshot-interval", "0"]),
    );
    assert!(m.ok, "restore failed: {}{}", m.stdout, m.stderr);
    let got = std::fs::read_to_string(restores.join("restores.jsonl")).unwrap_or_default();
    println!(
        "{:<28} {:>10.1} {:>10.1} {:>10}",
        "restore (GET, PUT to Consul)",
        m.wall.as_secs_f64(),
        m.max_rss_kib as f64 / 1024.0,
        got.contains(&sha)
    );
}
