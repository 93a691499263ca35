//! A token per node (`--instance-tag`): nodes are moto EC2 instances with
//! the cluster's tag, secrets in a directory store, and fake agents
//! sharing one cluster's ACL state, which enforce the rules Consul applies
//! to the endpoints used (catalog writes need node:write on the node;
//! leave and join agent:write). A cluster made on the shared agents' token
//! moves to tokens per node by heartbeats alone, then the shared token is
//! deleted; a fresh instance boots with its own token with no wait; a
//! node's token cannot touch another node; a revoked token is refused
//! until the node boots again.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::{Value, json};

const NET: &str = "10.79.0";

struct Cluster {
    moto: &'static Moto,
    bucket: String,
    registry: String,
    tmp: tempfile::TempDir,
    secrets_dir: PathBuf,
    secrets: String,
    acl: PathBuf,
    tag: String,
    ids: Vec<String>,
    /// Each node's AWS access key id (moto's IAM stand-in evaluates the
    /// registered ones).
    keys: Vec<String>,
}

impl Cluster {
    fn new(prefix: &str, instances: i32) -> Cluster {
        Cluster::with_secrets(prefix, instances, None)
    }

    /// [`Cluster::new`] with another secrets store than a directory.
    fn with_secrets(prefix: &str, instances: i32, secrets: Option<String>) -> Cluster {
        let moto = moto();
        let bucket = bucket(moto);
        let tmp = tempfile::tempdir().unwrap();
        let secrets_dir = tmp.path().join("secrets");
        let acl = tmp.path().join("acl");
        std::fs::create_dir_all(&secrets_dir).unwrap();
        std::fs::create_dir_all(&acl).unwrap();
        let value = format!("{}-{}", prefix.replace('/', "-"), std::process::id());
        let ids = run_tagged_instances(moto, instances, "auto-consul:cluster", &value);
        Cluster {
            moto,
            registry: format!("s3://{bucket}/{prefix}"),
            secrets: secrets.unwrap_or_else(|| format!("file://{}", secrets_dir.display())),
            keys: vec!["testing".to_string(); instances as usize],
            bucket,
            tmp,
            secrets_dir,
            acl,
            tag: format!("auto-consul:cluster={value}"),
            ids,
        }
    }

    /// Node `i`: its root, name (its instance id) and address.
    fn node(&self, i: usize) -> (PathBuf, String, String) {
        (
            self.tmp.path().join(format!("n{i}")),
            self.ids[i].clone(),
            format!("{NET}.{}", i + 1),
        )
    }

    fn boot(&self, i: usize, role: &str, extra: &[&str]) -> std::process::Output {
        let (root, name, ip) = self.node(i);
        output(
            run_cmd(self.moto, &self.registry, &root, &name, &ip, 3)
                .env("AWS_ACCESS_KEY_ID", &self.keys[i])
                .args(["--role", role, "--secrets", &self.secrets])
                .args(["--instance-tag", &self.tag])
                .args(extra),
        )
    }

    fn record(&self) -> Value {
        let prefix = self.registry.splitn(4, '/').nth(3).unwrap();
        serde_json::from_str(&get(self.moto, &self.bucket, &format!("{prefix}/cluster"))).unwrap()
    }

    fn cluster_id(&self) -> String {
        self.record()["cluster_id"].as_str().unwrap().to_string()
    }

    /// A secret by its name under the cluster's path, if made.
    fn secret(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.secrets_dir.join(self.cluster_id()).join(rel))
            .ok()
            .map(|v| v.trim().to_string())
    }

    /// Node `i`'s own token, as the store keeps it.
    fn own(&self, i: usize) -> Option<String> {
        self.secret(&format!("node/{}", self.ids[i]))
    }

    /// The token node `i`'s Consul config names as `acl.tokens.agent`.
    fn runs_with(&self, i: usize) -> String {
        let c: Value = serde_json::from_str(
            &std::fs::read_to_string(self.node(i).0.join("etc/consul.d/zz-auto-consul.json"))
                .unwrap(),
        )
        .unwrap();
        c["acl"]["tokens"]["agent"].as_str().unwrap().to_string()
    }

    fn agent(&self, i: usize, server: bool) -> FakeAgent {
        self.agent_with(i, server, &[])
    }

    /// Node `i`'s fake agent, with `extra` arguments last.
    fn agent_with(&self, i: usize, server: bool, extra: &[&str]) -> FakeAgent {
        let (root, name, ip) = self.node(i);
        let args = [
            "--address".to_string(),
            ip,
            "--leader".into(),
            format!("{NET}.1:8300"),
            "--acl-dir".into(),
            self.acl.display().to_string(),
            "--config-file".into(),
            root.join("etc/consul.d/zz-auto-consul.json")
                .display()
                .to_string(),
            "--join-file".into(),
            root.join("joins").display().to_string(),
        ];
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend_from_slice(extra);
        FakeAgent::start(&name, server, &args)
    }

    fn beat(&self, i: usize, agent: &FakeAgent) -> Value {
        let (root, name, ip) = self.node(i);
        let out = heartbeat_cmd(self.moto, &self.registry, &root, &name, &ip, &agent.addr())
            .env("AWS_ACCESS_KEY_ID", &self.keys[i])
            .args(["--secrets", &self.secrets, "--instance-tag", &self.tag])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        ok_json(&out)
    }

    /// The ACL state's tokens, by SecretID.
    fn tokens(&self) -> Value {
        let st: Value = serde_json::from_str(
            &std::fs::read_to_string(self.acl.join("acl-state.json")).unwrap(),
        )
        .unwrap();
        st["tokens"].clone()
    }
}

/// `PUT path` with `body` and `token` on the fake agent: the status code.
fn put(agent: &FakeAgent, path: &str, token: &str, body: &Value) -> u16 {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .args(["-H", &format!("X-Consul-Token: {token}")])
        .args(["--data", &body.to_string()])
        .arg(format!("http://{}{path}", agent.addr()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).parse().unwrap()
}

fn kind(root: &Path) -> String {
    std::fs::read_to_string(root.join("var/lib/auto-consul/agent-token-kind"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn every_node_moves_to_its_own_token_then_the_shared_one_is_deleted() {
    let c = Cluster::new("nt/move", 6);
    // 3 servers and 3 agents; the agents boot before any leader made their
    // tokens: they start on the shared agents' token.
    for i in 0..6 {
        ok_json(&c.boot(i, if i < 3 { "server" } else { "agent" }, &[]));
    }
    let shared = c.secret("agent/agent-token").unwrap();
    for i in 0..3 {
        // A server makes its own token's parameter at run; the leader's
        // heartbeat makes it in Consul.
        assert_eq!(c.runs_with(i), c.own(i).unwrap(), "server {i}");
        assert_eq!(kind(&c.node(i).0), "node");
    }
    for i in 3..6 {
        assert_eq!(c.own(i), None);
        assert_eq!(c.runs_with(i), shared, "agent {i}");
        assert_eq!(kind(&c.node(i).0), "shared");
    }
    let agents: Vec<FakeAgent> = (0..6).map(|i| c.agent(i, i < 3)).collect();
    // Round 1: the leader makes every instance's token ahead (Consul first,
    // then the store); the others move to theirs by their heartbeat. The
    // shared token is kept while any node has not said it moved.
    let lead = c.beat(0, &agents[0]);
    eprintln!("leader, round 1: {}", lead["node_tokens"]);
    assert_eq!(lead["consul_restart"], false, "no rotation: no restart");
    assert_eq!(
        lead["node_tokens"]["made"].as_array().unwrap().len(),
        3,
        "{lead}"
    );
    assert!(
        lead["node_tokens"]["shared_token"]
            .as_str()
            .unwrap()
            .starts_with("kept")
    );
    for (i, a) in agents.iter().enumerate().skip(1) {
        c.beat(i, a);
    }
    let tokens = c.tokens();
    for i in 0..6 {
        let own = c.own(i).unwrap();
        assert_eq!(c.runs_with(i), own, "node {i} runs with its own token");
        assert_eq!(kind(&c.node(i).0), "node");
        let t = &tokens[&own];
        assert_eq!(
            t["Policies"][0]["Name"],
            format!("auto-consul-node-{}", c.ids[i]),
            "{t}"
        );
    }
    assert!(tokens.get(&shared).is_some(), "not yet deleted");
    // Round 2: every live node says it runs with its own token.
    let lead = c.beat(0, &agents[0]);
    assert_eq!(lead["node_tokens"]["shared_token"], "deleted", "{lead}");
    assert!(
        c.tokens().get(&shared).is_none(),
        "the shared token is deleted"
    );
    assert_eq!(c.record()["agent_token"]["per_node"], true);
    // A terminated instance's token goes with it (Consul, its policy, the
    // store); a stopped one would keep it.
    let gone_token = c.own(5).unwrap();
    terminate(c.moto, &[c.ids[5].as_str()]);
    let lead = c.beat(0, &agents[0]);
    assert_eq!(lead["node_tokens"]["deleted"], json!([c.ids[5]]), "{lead}");
    assert!(c.tokens().get(&gone_token).is_none());
    assert_eq!(c.own(5), None);
    let policies: Value =
        serde_json::from_str(&std::fs::read_to_string(c.acl.join("acl-state.json")).unwrap())
            .unwrap();
    assert!(
        policies["policies"]
            .get(format!("auto-consul-node-{}", c.ids[5]))
            .is_none()
    );
    assert!(
        policies["policies"]
            .get(format!("auto-consul-node-{}", c.ids[4]))
            .is_some()
    );
    // Rotating it is refused now, with the way out.
    let out = output(auto_consul(c.moto).args([
        "secrets",
        "rotate",
        "agent-token",
        "--registry",
        &c.registry,
        "--secrets",
        &c.secrets,
    ]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("secrets revoke NODE"));

    // A node's token acts on its own node only (Consul's catalog rules).
    let (a, b) = (c.own(3).unwrap(), c.own(4).unwrap());
    let node_b = json!({"Node": c.ids[4], "Address": "10.79.0.5"});
    assert_eq!(put(&agents[0], "/v1/catalog/register", &a, &node_b), 403);
    assert_eq!(put(&agents[0], "/v1/catalog/deregister", &a, &node_b), 403);
    assert_eq!(put(&agents[0], "/v1/catalog/register", &b, &node_b), 200);
    let node_a = json!({"Node": c.ids[3], "Address": "10.79.0.4"});
    assert_eq!(put(&agents[0], "/v1/catalog/register", &a, &node_a), 200);
    // A server's node: no agent's token may rewrite it.
    let server = json!({"Node": c.ids[0], "Address": "10.79.0.1"});
    assert_eq!(put(&agents[0], "/v1/catalog/register", &a, &server), 403);
    // Its agent's leave takes its own token (agent:write on itself), not
    // another's.
    assert_eq!(
        put(&agents[3], "/v1/agent/join/10.79.0.1", &b, &json!({})),
        403
    );
    assert_eq!(
        put(&agents[3], "/v1/agent/join/10.79.0.1", &a, &json!({})),
        200
    );
}

#[test]
fn a_fresh_instance_boots_with_its_own_token_and_a_revoked_one_is_refused_until_it_boots_again() {
    let c = Cluster::new("nt/fresh", 5);
    for i in 0..4 {
        ok_json(&c.boot(i, if i < 3 { "server" } else { "agent" }, &[]));
    }
    let agents: Vec<FakeAgent> = (0..4).map(|i| c.agent(i, i < 3)).collect();
    // Instance 4 is running (tagged) but not booted: the shared token is
    // kept for it.
    for _ in 0..2 {
        for (i, a) in agents.iter().enumerate() {
            c.beat(i, a);
        }
    }
    assert!(c.record()["agent_token"]["per_node"].is_null());
    // Its token was made ahead: it boots with it, no wait, and the token
    // was in Consul before its Consul started.
    let own = c.own(4).expect("made ahead by the leader");
    assert!(c.tokens().get(&own).is_some());
    let booted = c.boot(4, "agent", &[]);
    ok_json(&booted);
    assert!(!String::from_utf8_lossy(&booted.stderr).contains("waits for its own token"));
    assert_eq!(c.runs_with(4), own);
    let agent4 = c.agent(4, false);
    c.beat(4, &agent4);
    let lead = c.beat(0, &agents[0]);
    assert_eq!(lead["node_tokens"]["shared_token"], "deleted", "{lead}");

    // Revoked: deleted from Consul and the store; a new one is made for the
    // running instance; the node's Consul still names the old one (refused)
    // until it boots again.
    let out = output(
        auto_consul(c.moto)
            .args(["secrets", "revoke", &c.ids[4], "--json"])
            .args(["--registry", &c.registry, "--secrets", &c.secrets])
            .args(["--root"])
            .arg(&c.node(0).0)
            .env("CONSUL_HTTP_ADDR", agents[0].addr()),
    );
    let v = ok_json(&out);
    assert_eq!(v["revoked"], true, "{v}");
    assert_eq!(v["new_token_made"], true, "{v}");
    let tokens = c.tokens();
    assert!(tokens.get(&own).is_none(), "the revoked token is gone");
    let new = c.own(4).unwrap();
    assert_ne!(new, own);
    assert!(tokens.get(&new).is_some());
    c.beat(4, &agent4);
    assert_eq!(c.runs_with(4), own, "its heartbeat does not move it");
    ok_json(&c.boot(4, "agent", &[]));
    assert_eq!(c.runs_with(4), new, "it boots again with the new one");

    // An agent that lost its leader joins a live server with its own token
    // (agent:write on itself).
    let leaderless = c.agent_with(3, false, &["--leader", ""]);
    let v = c.beat(3, &leaderless);
    assert_eq!(v["joined"], "10.79.0.1", "{v}");
    let joins = std::fs::read_to_string(c.node(3).0.join("joins")).unwrap();
    assert!(joins.contains("10.79.0.1"), "{joins}");

    // Terminated, it leaves Consul with its own token: a metadata service
    // of its own says so (the shared moto serves the other tests).
    let imds = Moto::start(&[]);
    imds.imds(
        "/latest/meta-data/autoscaling/target-lifecycle-state",
        Some("Terminated"),
    );
    let left = c.node(3).0.join("left");
    let leaving = c.agent_with(3, false, &["--leave-file", left.to_str().unwrap()]);
    let (root, name, ip) = c.node(3);
    let out = output(
        auto_consul(c.moto)
            .args([
                "leave",
                "--json",
                "--if-terminating",
                "--registry",
                &c.registry,
            ])
            .args(["--address", &ip, "--node", &name, "--secrets", &c.secrets])
            .args(["--instance-tag", &c.tag, "--root"])
            .arg(&root)
            .env("CONSUL_HTTP_ADDR", leaving.addr())
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url()),
    );
    ok_json(&out);
    assert!(
        left.exists(),
        "the agent left with its own token: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Now that the shared token is gone, a node whose token is not made
    // waits for it, then exits 1 naming the tag.
    let store = c.secrets_dir.join(c.cluster_id()).join("node");
    std::fs::remove_file(store.join(&c.ids[3])).unwrap();
    let out = c.boot(3, "agent", &["--token-wait", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("waits for its own token"), "{err}");
    assert!(err.contains(&c.tag), "{err}");
}

/// moto's SSM, signed with access key `key`.
fn ssm(moto: &Moto, key: &str) -> aws_sdk_ssm::Client {
    aws_sdk_ssm::Client::from_conf(
        aws_sdk_ssm::config::Builder::new()
            .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
            .region(aws_sdk_ssm::config::Region::new("us-east-1"))
            .endpoint_url(moto.url())
            .credentials_provider(aws_sdk_ssm::config::Credentials::new(
                key, "testing", None, None, "tests",
            ))
            .build(),
    )
}

/// `GetParameter` of `name` with key `key`: the value, or the error code.
fn read_as(moto: &Moto, key: &str, name: &str) -> Result<String, String> {
    use aws_sdk_ssm::error::ProvideErrorMetadata;
    rt().block_on(async {
        match ssm(moto, key)
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send()
            .await
        {
            Ok(o) => Ok(o.parameter().unwrap().value().unwrap().to_string()),
            Err(e) => Err(e.code().unwrap_or("?").to_string()),
        }
    })
}

#[test]
fn one_instances_role_cannot_read_another_instances_token() {
    // The module's policies, evaluated by moto_locked's IAM stand-in for
    // every SSM request signed with these keys; each agent key carries its
    // instance's ARN as `ec2:SourceInstanceARN`, as AWS sets it for an
    // instance profile's credentials.
    let path = format!("/auto-consul/nt-iam-{}", std::process::id());
    let mut c = Cluster::with_secrets("nt/iam", 4, Some(format!("ssm://{path}")));
    let arn = |id: &str| format!("arn:aws:ec2:us-east-1:123456789012:instance/{id}");
    let mut principals = serde_json::Map::new();
    for i in 0..4 {
        let role = if i == 0 { "server" } else { "agent" };
        c.keys[i] = format!("AKIANT{i}{}", std::process::id());
        let policy: Value =
            serde_json::from_str(&module_policy(role, &c.bucket, "nt/iam", &path)).unwrap();
        principals.insert(
            c.keys[i].clone(),
            json!({"policy": policy, "context": {"ec2:SourceInstanceARN": arn(&c.ids[i])},
                   "arn": format!("arn:aws:sts::123456789012:assumed-role/{role}/{}", c.ids[i])}),
        );
    }
    let out = Command::new("curl")
        .args(["-sf", "-X", "POST", "--data"])
        .arg(Value::Object(principals).to_string())
        .arg(format!("{}/_iam", c.moto.url()))
        .output()
        .unwrap();
    assert!(out.status.success());

    ok_json(&c.boot(0, "server", &[]));
    let server = c.agent(0, true);
    let lead = c.beat(0, &server);
    assert_eq!(lead["node_tokens"]["errors"], json!([]), "{lead}");
    let cluster = c.cluster_id();
    let token = |i: usize| format!("{path}/{cluster}/node/{}", c.ids[i]);
    let own = |i: usize| read_as(c.moto, "testing", &token(i)).unwrap();
    // Made tagged with its instance's ARN.
    // An agent reads its own, and no other node's, nor a server secret.
    assert_eq!(read_as(c.moto, &c.keys[1], &token(1)), Ok(own(1)));
    assert_eq!(
        read_as(c.moto, &c.keys[1], &token(2)),
        Err("AccessDeniedException".into()),
        "node A's role reads node B's token"
    );
    assert_eq!(
        read_as(c.moto, &c.keys[2], &token(1)),
        Err("AccessDeniedException".into())
    );
    assert_eq!(
        read_as(
            c.moto,
            &c.keys[1],
            &format!("{path}/{cluster}/server/management-token")
        ),
        Err("AccessDeniedException".into())
    );
    // The binary under A's role boots with A's token.
    ok_json(&c.boot(1, "agent", &[]));
    assert_eq!(c.runs_with(1), own(1));
    // A token not made yet is refused to its own instance too (no tag to
    // match): the agent takes it as not made and starts on the shared one.
    rt().block_on(async {
        ssm(c.moto, "testing")
            .delete_parameter()
            .name(token(3))
            .send()
            .await
            .unwrap()
    });
    assert_eq!(
        read_as(c.moto, &c.keys[3], &token(3)),
        Err("AccessDeniedException".into())
    );
    let booted = c.boot(3, "agent", &[]);
    ok_json(&booted);
    assert_eq!(kind(&c.node(3).0), "shared");
}
