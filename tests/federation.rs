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

    // `plan` of dc2's genesis checks the primary and shows what follows.
    let (root0, _, _) = dc2.node(0);
    let plan = ok_json(&output(
        node_cmd(moto, "plan", &dc2.registry(), &root0, "dc2-0", "10.81.2.1").args([
            "--servers",
            "3",
            "--role",
            "server",
            "--datacenter",
            "dc2",
            &primary,
        ]),
    ));
    let shown: Value =
        serde_json::from_str(plan["plan"]["files"][0]["contents"].as_str().unwrap()).unwrap();
    assert_eq!(shown["primary_datacenter"], "dc1", "{shown}");
    assert_eq!(ips(&shown["retry_join_wan"]), dc1_servers);
    assert!(files_under(&root0).is_empty(), "plan wrote files");
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

    // `members` of dc2 lists the WAN members by datacenter: dc1's servers
    // (its primary) and its own.
    let m = ok_json(&output(
        auto_consul(moto)
            .args(["members", "--json", "--registry"])
            .arg(dc2.registry()),
    ));
    assert_eq!(m["wan"][0]["datacenter"], "dc1", "{m}");
    assert_eq!(m["wan"][0]["primary"], json!(true));
    assert_eq!(ips(&m["wan"][0]["servers"]), dc1_servers);
    assert_eq!(m["wan"][1]["datacenter"], "dc2");
    assert_eq!(ips(&m["wan"][1]["servers"]).len(), 3);
    let m1 = ok_json(&output(
        auto_consul(moto)
            .args(["members", "--json", "--registry"])
            .arg(dc1.registry()),
    ));
    assert!(m1["wan"].is_null(), "{m1}");

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

/// A datacenter with its secrets in SSM, in its own region: its bucket
/// made there, its commands run there.
struct Secure {
    moto: &'static Moto,
    region: &'static str,
    bucket: String,
    prefix: String,
    ssm: String,
    tmp: PathBuf,
    acl: PathBuf,
    name: &'static str,
    net: String,
}

impl Secure {
    fn registry(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn secrets(&self) -> String {
        format!("ssm://{}", self.ssm)
    }

    fn node(&self, i: usize) -> (PathBuf, String, String) {
        (
            self.tmp.join(format!("{}-{i}", self.name)),
            format!("{}-{i}", self.name),
            format!("{}.{}", self.net, i + 1),
        )
    }

    fn boot(&self, i: usize, role: &str, extra: &[&str]) -> std::process::Output {
        self.boot_as(i, role, extra, "testing")
    }

    /// [`Secure::boot`] signed with access key `key` (a role's, which the
    /// IAM stand-in evaluates).
    fn boot_as(&self, i: usize, role: &str, extra: &[&str], key: &str) -> std::process::Output {
        let (root, name, ip) = self.node(i);
        output(
            run_cmd(self.moto, &self.registry(), &root, &name, &ip, 3)
                .env("AWS_ACCESS_KEY_ID", key)
                .env("AWS_REGION", self.region)
                .args(["--role", role, "--datacenter", self.name])
                .args(["--secrets", &self.secrets()])
                .args(extra),
        )
    }

    /// One heartbeat of node `i`, against a fake agent reading its config
    /// (its datacenter, and so whether it is a secondary's) and sharing
    /// the ACL state with every datacenter: global tokens are replicated,
    /// local ones stay where they were made.
    fn beat(&self, i: usize) -> Value {
        self.beat_as(i, "testing")
    }

    fn beat_as(&self, i: usize, key: &str) -> Value {
        let (root, name, ip) = self.node(i);
        let config = root.join("etc/consul.d/zz-auto-consul.json");
        let agent = FakeAgent::start(
            &name,
            i < 3,
            &[
                "--address",
                &ip,
                "--acl-dir",
                self.acl.to_str().unwrap(),
                "--config-file",
                config.to_str().unwrap(),
                // Consul's WAN knows both datacenters.
                "--datacenters",
                "dc1,dc2",
            ],
        );
        let out = heartbeat_cmd(
            self.moto,
            &self.registry(),
            &root,
            &name,
            &ip,
            &agent.addr(),
        )
        .env("AWS_ACCESS_KEY_ID", key)
        .env("AWS_REGION", self.region)
        .args(["--secrets", &self.secrets()])
        // What the heartbeat unit's env file gives it (the datacenter in
        // a renewed server certificate's name).
        .args(["--datacenter", self.name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
        ok_json(&out)
    }

    fn rotate(&self, what: &str) -> Value {
        ok_json(&output(
            auto_consul(self.moto)
                .env("AWS_REGION", self.region)
                .args(["secrets", "rotate", what, "--json", "--registry"])
                .arg(self.registry())
                .args(["--secrets", &self.secrets()]),
        ))
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

    /// The report secondary datacenter `dc` wrote in this (primary's)
    /// registry.
    fn report_of(&self, dc: &str) -> Value {
        serde_json::from_str(&get(
            self.moto,
            &self.bucket,
            &format!("{}/secondaries/{dc}", self.prefix),
        ))
        .unwrap()
    }

    /// A secret of this cluster (`agent/gossip-key`...), from SSM in its
    /// region.
    fn secret(&self, rel: &str) -> Option<String> {
        let cluster = self.record()["cluster_id"].as_str().unwrap().to_string();
        ssm_value(
            self.moto,
            self.region,
            &format!("{}/{cluster}/{rel}", self.ssm),
        )
    }

    fn tls_file(&self, i: usize, key: &str) -> PathBuf {
        let c = self.config(i);
        let path = c["tls"]["defaults"][key].as_str().unwrap().to_string();
        self.node(i).0.join(path.trim_start_matches('/'))
    }
}

/// dc1 in us-west-2 (its bucket made there) and dc2 in us-east-1, their
/// registries and SSM paths named from `label`, their nodes in
/// `<net>.1.*` and `<net>.2.*`, their fake agents sharing one ACL state
/// (in the directory returned, under `acl/`).
fn two_regions(label: &str, net: &str) -> (tempfile::TempDir, Secure, Secure) {
    let moto = moto();
    let tmp = tempfile::tempdir().unwrap();
    let acl = tmp.path().join("acl");
    std::fs::create_dir_all(&acl).unwrap();
    let run = unique(label).to_lowercase();
    let dc = |name: &'static str, region: &'static str, bucket: String| Secure {
        moto,
        region,
        bucket,
        prefix: format!("{run}/{name}"),
        ssm: format!("/{run}/{name}"),
        tmp: tmp.path().to_path_buf(),
        acl: acl.clone(),
        name,
        net: format!("{net}.{}", &name[2..]),
    };
    let dc1 = dc("dc1", "us-west-2", bucket_in(moto, "us-west-2"));
    let dc2 = dc("dc2", "us-east-1", bucket(moto));
    (tmp, dc1, dc2)
}

/// The ACL state every fake agent shares: the token whose SecretID is
/// `secret`, and the policy named `policy`.
fn acl_token(acl: &Path, secret: &str) -> Value {
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(acl.join("acl-state.json")).unwrap())
            .unwrap();
    state["tokens"][secret].clone()
}

fn acl_policy(acl: &Path, name: &str) -> Value {
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(acl.join("acl-state.json")).unwrap())
            .unwrap();
    state["policies"][name].clone()
}

/// `openssl verify` of `cert` against `ca` for host name `host`: whether
/// it verified.
fn verifies(ca: &Path, cert: &Path, host: &str) -> bool {
    let out = std::process::Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(ca)
        .args(["-verify_hostname", host])
        .arg(cert)
        .output()
        .expect("openssl is not installed: apt-get install openssl");
    out.status.success()
}

#[test]
fn a_secondary_runs_with_the_primarys_gossip_key_ca_and_replication_token_and_follows_its_rotations()
 {
    // Two regions: moto keeps SSM per region, so a read in the wrong one
    // finds nothing.
    let (tmp, dc1, dc2) = two_regions("sfed", "10.82");
    let (moto, acl) = (dc1.moto, tmp.path().join("acl"));
    let primary = format!("--primary-registry={}", dc1.registry());

    for i in 0..3 {
        ok_json(&dc1.boot(i, "server", &[]));
    }
    let rec1 = dc1.record();
    assert_eq!(rec1["secrets"]["url"], dc1.secrets(), "{rec1}");
    assert_eq!(rec1["secrets"]["region"], "us-west-2", "{rec1}");
    // The primary's servers make the replication token once, in their
    // store and in Consul (global, with the federation guide's rules).
    let made: Vec<Value> = (0..3).map(|i| dc1.beat(i)).collect();
    let replication = dc1.secret("server/replication-token").expect("made");
    let creators = made
        .iter()
        .filter(|v| v["federation"]["replication_token"]["created"] == json!(true))
        .count();
    assert_eq!(creators, 1, "{made:?}");
    let token = acl_token(&acl, &replication);
    assert_eq!(token["Local"], json!(false), "{token}");
    assert_eq!(token["Policies"][0]["Name"], "auto-consul-replication");
    let rules = acl_policy(&acl, "auto-consul-replication")["Rules"]
        .as_str()
        .unwrap()
        .to_string();
    for rule in [
        "acl = \"write\"",
        "operator = \"write\"",
        "service_prefix \"\"",
        "intentions = \"read\"",
    ] {
        assert!(rules.contains(rule), "{rule} not in {rules}");
    }
    // Made once: a later heartbeat asks nothing more.
    assert!(dc1.beat(0)["federation"]["replication_token"].is_null());

    // A secondary without a store of its own would have nowhere to copy
    // the primary's gossip key and CA to: refused, saying so.
    let (root, name, ip) = dc2.node(0);
    let bare = output(run_cmd(moto, &dc2.registry(), &root, &name, &ip, 3).args([
        "--role",
        "server",
        "--datacenter",
        "dc2",
        &primary,
    ]));
    assert_eq!(bare.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bare.stderr);
    assert!(err.contains("needs a secrets store of its own"), "{err}");

    for i in 0..3 {
        ok_json(&dc2.boot(i, "server", &[&primary]));
    }
    let rec2 = dc2.record();
    assert_eq!(rec2["primary"]["region"], "us-west-2", "{rec2}");
    let key1 = dc1.config(0)["encrypt"].as_str().unwrap().to_string();
    // The primary's gossip key and CA, copied into the secondary's own
    // store (its region) for its agents.
    assert_eq!(
        dc2.secret("agent/gossip-key").as_deref(),
        Some(key1.as_str())
    );
    assert_eq!(dc2.secret("agent/ca-cert"), dc1.secret("agent/ca-cert"));
    for i in 0..3 {
        let c = dc2.config(i);
        assert_eq!(c["encrypt"], json!(key1), "dc2-{i}");
        assert_eq!(c["primary_datacenter"], "dc1");
        assert_eq!(c["acl"]["tokens"]["replication"], json!(replication), "{c}");
        assert_eq!(c["acl"]["enable_token_replication"], json!(true));
        // A secondary's Consul bootstraps no ACLs: no initial management.
        assert!(c["acl"]["tokens"]["initial_management"].is_null(), "{c}");
        let cert = dc2.tls_file(i, "cert_file");
        let ca1 = dc1.tls_file(0, "ca_file");
        assert!(
            verifies(&ca1, &cert, "server.dc2.consul"),
            "dc2-{i}'s certificate and dc1's CA"
        );
        // The control: the name is checked.
        assert!(!verifies(&ca1, &cert, "server.dc1.consul"));
    }

    // dc2's servers make their datacenter's management token with the
    // replication token (local to dc2), then their agents' token with it.
    let first: Vec<Value> = (0..3).map(|i| dc2.beat(i)).collect();
    let management2 = dc2.secret("server/management-token").unwrap();
    let m = acl_token(&acl, &management2);
    assert_eq!(m["Local"], json!(true), "{m} / {first:?}");
    assert_eq!(m["Datacenter"], "dc2");
    assert_eq!(m["Policies"][0]["Name"], "global-management");
    for i in 0..3 {
        dc2.beat(i);
    }
    let agent2 = dc2.secret("agent/agent-token").unwrap();
    let a = acl_token(&acl, &agent2);
    assert_eq!(a["Datacenter"], "dc2", "{a}");
    // dc2's DNS token is global: a query dc1 forwards to dc2 carries it.
    let dns2 = acl_token(&acl, &dc2.secret("agent/dns-token").unwrap());
    assert_eq!(dns2["Local"], json!(false), "{dns2}");
    assert_ne!(
        agent2,
        dc1.secret("agent/agent-token").unwrap(),
        "each datacenter has its own agents' token"
    );

    // An agent of dc2 boots with dc1's registry refusing everything: it
    // reads only its own datacenter's store and registry.
    moto.faults(json!([{"match": dc1.prefix.clone(), "status": 403, "code": "AccessDenied", "count": 1000}]));
    ok_json(&dc2.boot(3, "agent", &[]));
    assert_eq!(
        moto.fired(),
        vec![0],
        "the agent read the primary's registry"
    );
    // The control: a server's reboot reads it (and keeps what its config
    // holds, replication token included).
    let again = dc2.boot(1, "server", &[]);
    ok_json(&again);
    assert!(moto.fired()[0] > 0);
    assert_eq!(
        dc2.config(1)["acl"]["tokens"]["replication"],
        json!(replication)
    );
    moto.faults(json!([]));
    let a = dc2.config(3);
    assert_eq!(a["encrypt"], json!(key1));
    assert_eq!(
        std::fs::read_to_string(dc2.tls_file(3, "ca_file"))
            .unwrap()
            .trim(),
        dc1.secret("agent/ca-cert").unwrap().trim()
    );

    // The primary rotates its gossip key and its CA: dc2's servers copy
    // the new generations and take the primary's steps into their record;
    // dc2's leader drives neither (the primary's does, for every
    // datacenter).
    // dc2's leader reported to dc1 at its first heartbeat
    // (secondaries/dc2 in dc1's registry): no rotation under way.
    let first = dc1.report_of("dc2");
    assert_eq!(first["ca_step"], Value::Null, "{first}");
    assert_eq!(first["cluster_id"], dc2.record()["cluster_id"]);
    // A federated primary's CA step waits for every secondary that
    // reports to it: with every dc1 node trusting both CAs, dc1's leader
    // still holds `trust` until dc2 has taken the step.
    dc1.rotate("ca");
    for i in 0..3 {
        dc1.beat(i);
    }
    let held = dc1.beat(0);
    assert_eq!(held["rotations"]["ca"]["step"], "trust", "{held}");
    // Why dc1's leader holds its CA step, from its heartbeat.
    let waiting = |v: &Value| {
        v["rotations"]["ca"]["waiting"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let why = waiting(&held);
    assert!(
        why.contains("secondary datacenters") && why.contains("dc2: at no rotation"),
        "{held}"
    );
    // dc2's heartbeats copy the step (dc2-0), follow it and report where
    // they are: some dc2 nodes not there yet holds dc1 still.
    for i in 0..4 {
        dc2.beat(i);
    }
    let mid = dc1.report_of("dc2");
    assert_eq!(mid["ca_step"], "trust", "{mid}");
    assert!(mid["behind"].as_u64().unwrap() > 0, "{mid}");
    let held = dc1.beat(0);
    let why = waiting(&held);
    assert!(
        why.contains("dc2: ") && why.contains("not there yet"),
        "{held}"
    );
    assert_eq!(dc1.record()["ca"]["rotation"], "trust");
    // Once every dc2 node trusts both CAs, dc2's leader says so and dc1
    // goes on.
    for i in 0..4 {
        dc2.beat(i);
    }
    let done = dc1.report_of("dc2");
    assert_eq!(done["behind"], 0, "{done}");
    let went = dc1.beat(0);
    assert_eq!(went["rotations"]["ca"]["steps"], json!(["trust"]), "{went}");
    assert_eq!(dc1.record()["ca"]["rotation"], "reissue");
    dc1.rotate("gossip-key");
    let v = dc2.beat(0);
    assert!(v["federation"]["rotations"]["error"].is_null(), "{v}");
    let (rec1, rec2) = (dc1.record(), dc2.record());
    assert_eq!(rec2["gossip_key"], rec1["gossip_key"], "{rec2}");
    assert_eq!(rec2["ca"], rec1["ca"], "{rec2}");
    assert_eq!(rec2["gossip_key"]["rotation"], "install");
    assert_eq!(
        dc2.secret("agent/gossip-key.2"),
        dc1.secret("agent/gossip-key.2")
    );
    assert_eq!(dc2.secret("agent/ca-cert.2"), dc1.secret("agent/ca-cert.2"));
    let v = dc2.beat(1);
    assert!(v["rotations"].is_null(), "dc2 drove a rotation: {v}");
    // dc2's management token rotates in dc2: its new generation is made
    // local to dc2 (a global one would be valid in dc1 too), and no
    // server's config gains an initial management token.
    dc2.rotate("management-token");
    for i in 0..3 {
        let v = dc2.beat(i);
        assert_eq!(v["consul_restart"], json!(false), "{v}");
    }
    let m2 = acl_token(&acl, &dc2.secret("server/management-token.2").unwrap());
    assert_eq!(m2["Local"], json!(true), "{m2}");
    assert_eq!(m2["Datacenter"], "dc2");
    for i in 0..3 {
        let c = dc2.config(i);
        assert!(c["acl"]["tokens"]["initial_management"].is_null(), "{c}");
    }
    // A secondary's own `secrets rotate gossip-key` is refused, naming
    // where it rotates.
    let refused = output(
        auto_consul(moto)
            .env("AWS_REGION", dc2.region)
            .args(["secrets", "rotate", "gossip-key", "--json", "--registry"])
            .arg(dc2.registry())
            .args(["--secrets", &dc2.secrets()]),
    );
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("rotate there") && err.contains(&dc1.registry()),
        "{err}"
    );
    // dc2-1's heartbeat followed the CA's first step: its CA file trusts
    // both of the primary's CAs.
    let ca_file = std::fs::read_to_string(dc2.tls_file(1, "ca_file")).unwrap();
    assert_eq!(ca_file.matches("BEGIN CERTIFICATE").count(), 2, "{ca_file}");
    assert!(ca_file.contains(dc1.secret("agent/ca-cert.2").unwrap().trim()));
}

/// A primary's CA rotation goes through all three steps (trust, reissue,
/// where the generation in use moves on, drop) and leaves each one only
/// once its secondary's report says that very step is done by every dc2
/// node; at the end both datacenters run on the new CA alone: each dc2
/// server's certificate verifies against it and every dc2 CA file holds
/// it and nothing else.
#[test]
fn a_primarys_ca_rotation_leaves_each_step_only_once_its_secondary_reports_it_done() {
    let (_tmp, dc1, dc2) = two_regions("cfed", "10.84");
    let primary = format!("--primary-registry={}", dc1.registry());
    for i in 0..3 {
        ok_json(&dc1.boot(i, "server", &[]));
        dc1.beat(i);
    }
    for i in 0..3 {
        ok_json(&dc2.boot(i, "server", &[&primary]));
    }
    ok_json(&dc2.boot(3, "agent", &[]));
    for i in 0..4 {
        dc2.beat(i);
    }
    dc1.rotate("ca");
    let mut steps = Vec::new();
    for _ in 0..12 {
        for i in 0..3 {
            let (before, said) = (dc1.record(), dc1.report_of("dc2"));
            let v = dc1.beat(i);
            let done = v["rotations"]["ca"]["steps"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            // Each step left: dc2 said, before this beat, that it had done
            // that step of that generation, with no node behind.
            if let Some(first) = done.first() {
                assert_eq!(said["ca_step"], *first, "{said} / {v}");
                assert_eq!(said["ca_generation"], before["ca"]["generation"], "{said}");
                assert_eq!(said["behind"], 0, "{said}");
                assert_eq!(done.len(), 1, "more than one step in a pass: {v}");
                steps.push(first.as_str().unwrap().to_string());
            }
        }
        for i in 0..4 {
            dc2.beat(i);
        }
        if dc1.record()["ca"]["rotation"].is_null() {
            break;
        }
    }
    assert_eq!(steps, ["trust", "reissue", "drop"]);
    let (rec1, rec2) = (dc1.record(), dc2.record());
    assert_eq!(rec1["ca"]["generation"], 2, "{rec1}");
    assert_eq!(rec2["ca"], rec1["ca"], "{rec2}");
    let new_ca = dc1.secret("agent/ca-cert.2").unwrap();
    for i in 0..4 {
        let ca_file = std::fs::read_to_string(dc2.tls_file(i, "ca_file")).unwrap();
        assert_eq!(ca_file.matches("BEGIN CERTIFICATE").count(), 1, "dc2-{i}");
        assert!(ca_file.contains(new_ca.trim()), "dc2-{i}");
    }
    for i in 0..3 {
        assert!(
            verifies(
                &dc1.tls_file(0, "ca_file"),
                &dc2.tls_file(i, "cert_file"),
                "server.dc2.consul"
            ),
            "dc2-{i}'s certificate against dc1's new CA"
        );
    }
}

/// Reads SSM parameter `name` in `region` signed with access key `key`:
/// its value, or the error code.
fn read_as(moto: &Moto, key: &str, region: &str, name: &str) -> Result<String, String> {
    use aws_sdk_ssm::error::ProvideErrorMetadata;
    let client = aws_sdk_ssm::Client::from_conf(
        aws_sdk_ssm::config::Builder::new()
            .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
            .region(aws_sdk_ssm::config::Region::new(region.to_string()))
            .endpoint_url(moto.url())
            .credentials_provider(aws_sdk_ssm::config::Credentials::new(
                key, "testing", None, None, "tests",
            ))
            .build(),
    );
    rt().block_on(
        client
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send(),
    )
    .map(|o| o.parameter().unwrap().value().unwrap().to_string())
    .map_err(|e| e.code().unwrap_or("?").to_string())
}

#[test]
fn a_secondarys_roles_read_of_the_primary_exactly_what_the_module_grants() {
    // The module's policies, evaluated by moto_locked's IAM stand-in for
    // every SSM request signed with these keys: dc2's server role holds
    // the server policy and the primary_secrets policy, its agent role
    // the agent policy.
    let (_tmp, dc1, dc2) = two_regions("ifed", "10.83");
    let moto = dc1.moto;
    ok_json(&dc1.boot(0, "server", &[]));
    dc1.beat(0);
    let server_key = format!("AKIAFS{}", std::process::id());
    let agent_key = format!("AKIAFA{}", std::process::id());
    let agent_policy: Value =
        serde_json::from_str(&module_policy("agent", &dc2.bucket, &dc2.prefix, &dc2.ssm)).unwrap();
    let principals = json!({
        &server_key: {
            "policy": secondary_server_policy(&dc2.bucket, &dc2.prefix, &dc2.ssm, &dc1.ssm),
            "context": {},
            "arn": "arn:aws:sts::123456789012:assumed-role/server/i-dc2server",
        },
        &agent_key: {
            "policy": agent_policy,
            "context": {},
            "arn": "arn:aws:sts::123456789012:assumed-role/agent/i-dc2agent",
        },
    });
    let out = std::process::Command::new("curl")
        .args(["-sf", "-X", "POST", "--data"])
        .arg(principals.to_string())
        .arg(format!("{}/_iam", moto.url()))
        .output()
        .unwrap();
    assert!(out.status.success());

    // The server's role is enough for a secondary's genesis and its
    // heartbeat, the agent's for an agent's boot.
    let primary = format!("--primary-registry={}", dc1.registry());
    ok_json(&dc2.boot_as(0, "server", &[&primary], &server_key));
    let v = dc2.beat_as(0, &server_key);
    assert!(v["federation"]["error"].is_null(), "{v}");
    assert_eq!(
        v["federation"]["management_token"]["in_consul"],
        json!(true),
        "{v}"
    );
    ok_json(&dc2.boot_as(3, "agent", &[], &agent_key));
    assert_eq!(dc2.config(3)["encrypt"], dc1.config(0)["encrypt"]);

    let cluster1 = dc1.record()["cluster_id"].as_str().unwrap().to_string();
    let of_dc1 = |rel: &str| format!("{}/{cluster1}/{rel}", dc1.ssm);
    // The server's role reads the shared ones and nothing else of dc1.
    for rel in ["agent/gossip-key", "server/ca", "server/replication-token"] {
        assert_eq!(
            read_as(moto, &server_key, "us-west-2", &of_dc1(rel)),
            dc1.secret(rel).ok_or_else(|| "absent".to_string()),
            "{rel}"
        );
    }
    for rel in [
        "server/management-token",
        "agent/agent-token",
        "agent/dns-token",
    ] {
        assert_eq!(
            read_as(moto, &server_key, "us-west-2", &of_dc1(rel)),
            Err("AccessDeniedException".to_string()),
            "dc2's servers read dc1's {rel}"
        );
    }
    // The agent's role reads nothing of dc1.
    for rel in ["agent/gossip-key", "agent/ca-cert", "agent/agent-token"] {
        assert_eq!(
            read_as(moto, &agent_key, "us-west-2", &of_dc1(rel)),
            Err("AccessDeniedException".to_string()),
            "dc2's agents read dc1's {rel}"
        );
    }
}
