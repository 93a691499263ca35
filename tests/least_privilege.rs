//! Least privilege by role, proven against moto_server with IAM enforcement
//! on: the binary runs under the policies the Terraform module applies
//! (`terraform/modules/auto-consul/policies/{server,agent}.json.tftpl`,
//! rendered here as `templatefile()` renders them) as two IAM users.
//!
//! What moto checks (read in moto 5.2.x's source: moto/core/authorization.py,
//! moto/iam/access_control.py, moto/iam/policy_conditions.py): the Action
//! and, for S3, the object or bucket ARN of every request signed by an IAM
//! user's key once `/moto-api/reset-auth` has set the free budget to 0.
//! Where the real S3 is stricter, and this test cannot show it:
//! - Conditions are not evaluated: `s3:prefix` on ListBucket (an agent
//!   cannot list outside the registry's directories on AWS) and the bucket
//!   policy's refusal of unconditional writes (moto would refuse every
//!   write to slots/ and cluster, so the bucket policy is not applied here).
//! - DeleteObjects is checked against the bucket, not per key: under these
//!   key-scoped policies moto deletes nothing and reports each key as
//!   denied (auto-consul warns about each); AWS checks each key.
//! - SSM parameters are checked with resource "*": path-scoped grants
//!   never match, so the secrets split is proven in tests/secrets.rs from
//!   moto's SSM call log instead, and a node's own token (readable only by
//!   its instance, a tag condition) in tests/node_tokens.rs, through
//!   moto_locked's IAM stand-in (tests/support/iam_standin.py).

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

/// The module's role policy for `role`, rendered for `bucket` and prefix
/// `prefix` (without a trailing `/`).
fn policy(role: &str, bucket: &str, prefix: &str) -> String {
    module_policy(role, bucket, prefix, "/auto-consul/lp")
}

/// IAM users with these inline policies, made through moto's IAM API
/// (boto3, in the test venv); their access keys by user name.
fn users(
    moto: &Moto,
    policies: &[(&str, String)],
) -> std::collections::HashMap<String, (String, String)> {
    let script = r#"
import json, sys, boto3
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
out = {}
for name, doc in json.load(sys.stdin).items():
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="auto-consul-" + name, PolicyDocument=doc)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    out[name] = [key["AccessKeyId"], key["SecretAccessKey"]]
print(json.dumps(out))
"#;
    let input: serde_json::Map<String, Value> = policies
        .iter()
        .map(|(n, d)| (n.to_string(), Value::from(d.clone())))
        .collect();
    let mut child = Command::new(python())
        .args(["-c", script, &moto.url()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(Value::Object(input).to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "IAM set-up failed");
    serde_json::from_slice::<std::collections::HashMap<String, (String, String)>>(&out.stdout)
        .unwrap()
}

/// An object's body (empty when absent), read as the IAM user with `key`.
fn get_as(moto: &Moto, key: &(String, String), bucket: &str, name: &str) -> String {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(moto.url())
        .force_path_style(true)
        .credentials_provider(Credentials::new(&key.0, &key.1, None, None, "tests"))
        .build();
    let client = aws_sdk_s3::Client::from_conf(config);
    rt().block_on(async {
        match client.get_object().bucket(bucket).key(name).send().await {
            Ok(out) => {
                String::from_utf8(out.body.collect().await.unwrap().into_bytes().to_vec()).unwrap()
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => String::new(),
            Err(e) => panic!("reading {name}: {e:?}"),
        }
    })
}

/// From now on moto checks every request against its signer's policies.
fn enforce_iam(moto: &Moto) {
    let out = Command::new("curl")
        .args([
            "-sf",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/octet-stream",
            "--data",
            "0",
            &format!("{}/moto-api/reset-auth", moto.url()),
        ])
        .output()
        .expect("curl");
    assert!(out.status.success(), "reset-auth failed");
}

/// `auto-consul` signing as the IAM user with `key`.
fn as_user(mut cmd: Command, key: &(String, String)) -> Command {
    cmd.env("AWS_ACCESS_KEY_ID", &key.0)
        .env("AWS_SECRET_ACCESS_KEY", &key.1);
    cmd
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn each_role_does_its_own_work_and_an_agents_role_cannot_take_a_servers() {
    let moto = Moto::start(&[]);
    let bucket = bucket(&moto);
    let p = "lp/prod";
    let registry = format!("s3://{bucket}/{p}");
    let keys = users(
        &moto,
        &[
            ("server", policy("server", &bucket, p)),
            ("agent", policy("agent", &bucket, p)),
            (
                "admin",
                r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}"#
                    .to_string(),
            ),
        ],
    );
    enforce_iam(&moto);
    let tmp = tempfile::tempdir().unwrap();
    // Enforcement is on: a key of no IAM user is refused.
    let out = output(auto_consul(&moto).args(["members", "--registry", &registry]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // The admin reads the bucket ("testing", no IAM user, is now refused).
    let slot = |i: u32| {
        get_as(
            &moto,
            &keys["admin"],
            &bucket,
            &format!("{p}/slots/server-{i}"),
        )
    };

    // The servers' role: bootstrap, heartbeat (slot renewal, purge), and
    // an operator's cluster edit.
    let s = tmp.path().join("s");
    let out = output(&mut as_user(
        run_cmd(&moto, &registry, &s, "lp-s", "10.80.0.1", 3),
        &keys["server"],
    ));
    assert_eq!(mode(&ok_json(&out)), "bootstrap", "{}", stderr(&out));
    // 17 MiB: the snapshot's upload is multipart.
    let snap = tmp.path().join("lp.snap");
    let mut state = FAKE_FSM_HEADER.to_vec();
    state.resize(17 << 20, 7);
    write_snapshot(&snap, &state);
    let agent_s = FakeAgent::start(
        "lp-s",
        true,
        &[
            "--address",
            "10.80.0.1",
            "--snapshot-file",
            snap.to_str().unwrap(),
        ],
    );
    let out = output(&mut as_user(
        heartbeat_cmd(&moto, &registry, &s, "lp-s", "10.80.0.1", &agent_s.addr()),
        &keys["server"],
    ));
    let v = ok_json(&out);
    assert_eq!(v["slot"]["status"], "renewed", "{v}");
    // The leader's snapshots: a multipart upload, then the retention's
    // listing and delete.
    for keep in ["2", "1"] {
        let out = output(
            as_user(
                agent_cmd(
                    &moto,
                    "snapshot",
                    &registry,
                    &s,
                    "lp-s",
                    "10.80.0.1",
                    &agent_s.addr(),
                ),
                &keys["server"],
            )
            .args(["--snapshot-keep", keep]),
        );
        let v = ok_json(&out);
        assert_eq!(v["saved"], true, "{v}");
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let mut set = as_user(auto_consul(&moto), &keys["server"]);
    ok_json(&output(set.args([
        "cluster",
        "set",
        "--json",
        "--registry",
        &registry,
        "--expiry",
        "150",
    ])));

    // The agents' role: an agent's run, heartbeat and leave.
    let a = tmp.path().join("a");
    let out = output(
        as_user(
            run_cmd(&moto, &registry, &a, "lp-a", "10.80.0.2", 3),
            &keys["agent"],
        )
        .args(["--role", "agent"]),
    );
    assert_eq!(mode(&ok_json(&out)), "agent", "{}", stderr(&out));
    let agent_a = FakeAgent::start(
        "lp-a",
        false,
        &["--address", "10.80.0.2", "--leader", "10.80.0.1:8300"],
    );
    let out = output(&mut as_user(
        heartbeat_cmd(&moto, &registry, &a, "lp-a", "10.80.0.2", &agent_a.addr()),
        &keys["agent"],
    ));
    let v = ok_json(&out);
    assert!(v["keys"][0].as_str().unwrap().starts_with("agents/"), "{v}");
    let mut leave = as_user(auto_consul(&moto), &keys["agent"]);
    let out = output(
        leave
            .args([
                "leave",
                "--registry",
                &registry,
                "--node",
                "lp-a",
                "--address",
                "10.80.0.2",
            ])
            .arg("--root")
            .arg(&a),
    );
    assert!(out.status.success(), "{}", stderr(&out));

    // An agent's instance cannot claim a server slot: the cluster wants 3
    // servers, the node may become one (--role auto), IAM refuses the
    // write, and the one line says which permission and which role.
    let before = slot(1);
    let rogue = tmp.path().join("rogue");
    let out = output(&mut as_user(
        run_cmd(&moto, &registry, &rogue, "lp-r", "10.80.0.3", 3),
        &keys["agent"],
    ));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let first = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    for needle in ["s3:PutObject", "slots/server-1", "servers' role only"] {
        assert!(first.contains(needle), "{needle:?} missing: {err}");
    }
    assert_eq!(slot(1), before, "the slot was not taken");
    assert!(!rogue.join("var/lib/auto-consul/state.json").exists());

    // Nor rewrite the cluster record.
    let mut edit = as_user(auto_consul(&moto), &keys["agent"]);
    let out = output(edit.args(["cluster", "set", "--registry", &registry, "--servers", "1"]));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let first = err
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        first.contains("s3:PutObject on cluster") && first.contains("servers' role only"),
        "{err}"
    );
}
