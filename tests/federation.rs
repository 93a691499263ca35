//! Federation across regions: a primary `dc1` and a secondary `dc2`, 3
//! servers each, their registries on one moto (S3 is global), fake agents
//! as the other tests use them. dc2 names its primary once
//! (`--primary-registry`), checked at genesis and kept in its record; its
//! servers join dc1's live servers over the WAN and follow them as they are
//! replaced; its agents read nothing of dc1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::*;
use serde_json::{Value, json};

struct Dc {
    moto: &'static Moto,
    bucket: String,
    prefix: String,
    tmp: PathBuf,
    name: &'static str,
    net: &'static str,
}

impl Dc {
    fn registry(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn node(&self, i: usize) -> (PathBuf, String, String) {
        (
            self.tmp.join(format!("{}-{i}", self.name)),
            format!("{}-{i}", self.name),
            format!("{}.{}", self.net, i + 1),
        )
    }

    fn boot(&self, i: usize, role: &str, extra: &[&str]) -> std::process::Output {
        let (root, name, ip) = self.node(i);
        output(
            run_cmd(self.moto, &self.registry(), &root, &name, &ip, 3)
                .args(["--role", role, "--datacenter", self.name])
                .args(extra),
        )
    }

    fn config(&self, i: usize) -> Value {
        config_of(&self.node(i).0)
    }

    fn record(&self) -> Value {
        serde_json::from_str(&get(
            self.moto,
            &self.bucket,
            &format!("{}/cluster", self.prefix),
        ))
        .unwrap()
    }
}

fn config_of(root: &Path) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root.join("etc/consul.d/zz-auto-consul.json")).unwrap(),
    )
    .unwrap()
}

fn ips(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn a_secondary_names_its_primary_once_and_its_servers_follow_the_primarys_over_the_wan() {
    let moto = moto();
    let bucket = bucket(moto);
    let tmp = tempfile::tempdir().unwrap();
    let dc = |name: &'static str, net: &'static str| Dc {
        moto,
        bucket: bucket.clone(),
        prefix: format!("fed/{name}"),
        tmp: tmp.path().to_path_buf(),
        name,
        net,
    };
    let (dc1, dc2) = (dc("dc1", "10.81.1"), dc("dc2", "10.81.2"));
    let primary = format!("--primary-registry={}", dc1.registry());

    // Before the primary exists, a secondary's genesis waits for it (exit
    // 1: the boot unit tries again).
    let early = dc2.boot(0, "server", &[&primary]);
    assert_eq!(early.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&early.stderr).contains("holds no cluster record"));

    for i in 0..3 {
        ok_json(&dc1.boot(i, "server", &[]));
    }
    assert_eq!(dc1.record()["datacenter"], "dc1");
    assert!(dc1.record()["primary"].is_null());
    let dc1_servers: Vec<String> = (0..3).map(|i| dc1.node(i).2).collect();

    // A secondary named like its primary is refused, naming the clash.
    let clash = output(
        run_cmd(
            moto,
            &dc2.registry(),
            &dc2.node(0).0,
            "dc2-0",
            "10.81.2.1",
            3,
        )
        .args(["--role", "server", "--datacenter", "dc1", &primary]),
    );
    assert_eq!(clash.status.code(), Some(2));
    let err = String::from_utf8_lossy(&clash.stderr);
    assert!(err.contains("datacenter `dc1` is the primary's"), "{err}");

    for i in 0..3 {
        ok_json(&dc2.boot(i, "server", &[&primary]));
    }
    let rec = dc2.record();
    assert_eq!(rec["primary"]["datacenter"], "dc1", "{rec}");
    assert_eq!(rec["primary"]["registry"], dc1.registry());
    assert_eq!(rec["datacenter"], "dc2");
    for i in 0..3 {
        let c = dc2.config(i);
        assert_eq!(c["primary_datacenter"], "dc1", "{c}");
        assert_eq!(c["datacenter"], "dc2");
        assert_eq!(ips(&c["retry_join_wan"]), dc1_servers, "dc2-{i}: {c}");
        // The primary's own: no WAN list of its own.
        let p = dc1.config(i);
        assert!(p["retry_join_wan"].is_null(), "{p}");
    }
    // An agent of dc2, without the flag: follows the record, reads nothing
    // of dc1, joins no WAN.
    // dc1's registry refuses everything meanwhile: the fault never fires.
    let dc1_down =
        json!([{"match": "fed/dc1", "status": 403, "code": "AccessDenied", "count": 1000}]);
    moto.faults(dc1_down);
    ok_json(&dc2.boot(3, "agent", &[]));
    assert_eq!(
        moto.fired(),
        vec![0],
        "the agent read the primary's registry"
    );
    let a = dc2.config(3);
    assert_eq!(a["primary_datacenter"], "dc1");
    assert!(a["retry_join_wan"].is_null());
    // Losing the primary does not stop a secondary's server: it reboots,
    // keeps its datacenter and its WAN list (a warning).
    let again = dc2.boot(1, "server", &[]);
    ok_json(&again);
    assert!(moto.fired()[0] > 0);
    assert!(String::from_utf8_lossy(&again.stderr).contains("cannot be read for its servers"));
    assert_eq!(ips(&dc2.config(1)["retry_join_wan"]), dc1_servers);
    assert_eq!(dc2.config(1)["datacenter"], "dc2");
    moto.faults(json!([]));

    // A primary never names a primary: dc3 naming dc2 is refused.
    let dc3 = dc("dc3", "10.81.3");
    let nested = dc3.boot(
        0,
        "server",
        &[&format!("--primary-registry={}", dc2.registry())],
    );
    assert_eq!(nested.status.code(), Some(2));
    let err = String::from_utf8_lossy(&nested.stderr);
    assert!(err.contains("is itself a secondary datacenter"), "{err}");

    // dc1's server 0 is replaced: it leaves (its slot released), a new
    // server takes its slot at a new address; dc2's heartbeats rewrite
    // retry_join_wan and join the new one over the WAN.
    let (root0, name0, ip0) = dc1.node(0);
    let out = output(
        auto_consul(moto)
            .args(["leave", "--json", "--registry", &dc1.registry()])
            .args(["--address", &ip0, "--node", &name0, "--root"])
            .arg(&root0),
    );
    ok_json(&out);
    ok_json(&dc1.boot(5, "server", &[]));
    let mut now: Vec<String> = vec![dc1.node(1).2, dc1.node(2).2, dc1.node(5).2];
    now.sort();
    for i in 0..3 {
        let (root, name, ip) = dc2.node(i);
        let joins = root.join("joins");
        let agent = FakeAgent::start(
            &name,
            true,
            &["--address", &ip, "--join-file", joins.to_str().unwrap()],
        );
        let out = heartbeat_cmd(moto, &dc2.registry(), &root, &name, &ip, &agent.addr())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let v = ok_json(&out);
        assert_eq!(ips(&v["federation"]["retry_join_wan"]), now, "{v}");
        assert_eq!(v["federation"]["joined_wan"], json!([dc1.node(5).2]), "{v}");
        assert_eq!(ips(&dc2.config(i)["retry_join_wan"]), now);
        let logged = std::fs::read_to_string(&joins).unwrap();
        assert_eq!(logged.trim(), format!("wan {}", dc1.node(5).2));
    }
}
