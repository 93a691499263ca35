"""Prototype: what moto_server enforces of the module's IAM policies.

Run from the repository root with the test venv's Python:

    /root/.cache/auto-consul-venv/bin/python tests/support/iam/prototype.py

It starts tests/support/moto_locked.py, renders the Terraform module's policy
templates (terraform/modules/auto-consul/policies/*.json.tftpl) by plain
string substitution of their three variables, the way a Rust test would:

    ${bucket_arn}         arn:aws:s3:::BUCKET
    ${key_prefix}         registry prefix + "/" ("" at the bucket root)
    ${ssm_parameter_arn}  arn:aws:ssm:REGION:ACCOUNT:parameter<ssm path>

creates one IAM user per role with the rendered policy inline, and prints,
for every S3, EC2 and SSM call auto-consul makes (and a few it must not),
what moto answers under each role next to what AWS answers. It exits 1 if
moto answers anything other than what is written here, so it doubles as a
check of the notes below (moto 5.2.5).

What moto enforces (moto/core/authorization.py, moto/iam/access_control.py,
moto/iam/policy_conditions.py, moto/s3/responses.py):

* Only requests signed with an IAM user's (or assumed role's) access key are
  checked, and only once ActionAuthenticatorMixin.request_count has reached
  settings.INITIAL_NO_AUTH_ACTION_COUNT (authorization.py:40-65). The count
  is read from the environment when moto is imported (settings.py:16-18), so
  in server mode it is the moto_server process's environment; it can be
  changed at run time by POST /moto-api/reset-auth with the new count as
  body, which also sets the request count back to 0
  (moto_api/_internal/responses.py:26-50). Before that, every request is
  free and only counted. This script sets up with the free budget, then
  posts 0: every later request is checked.
* Action: "service:Operation" from the signing scope and the operation
  (access_control.py:238-240); S3 operations are mapped to IAM actions by
  ACTION_MAP (s3/responses.py:102-175): ListObjectsV2 -> s3:ListBucket,
  GetObject -> s3:GetObject, PutObject -> s3:PutObject. Patterns are
  matched with "*" as ".*", case-sensitively (access_control.py:571-575).
* Resource: S3 passes the object ARN (arn:aws:s3:::BUCKET/KEY) or the
  bucket ARN (authorization.py:70-78), so key-prefix scoping of GetObject
  and PutObject is enforced as on AWS. Every other service passes "*"
  unless its responses define _determine_resource (core/responses.py:
  434-442; only IAM, STS, SQS do): an SSM statement whose Resource is a
  parameter ARN never matches "*", so under moto no ssm:GetParameter or
  ssm:PutParameter is allowed by a path-scoped policy. SSM resource scoping
  cannot be tested with moto; only Resource "*" grants SSM there.
* DeleteObjects is authorized against the bucket ARN with action
  s3:DeleteObject (s3/responses.py:1653-1660); a policy that grants
  s3:DeleteObject on keys only (as AWS wants: DeleteObjects is authorized
  per key) is refused there, and moto then answers 200 with every key in
  Errors as AccessDenied and deletes nothing (s3/responses.py:1760-1763).
  So under moto a role cannot purge or `leave` through DeleteObjects at all.
* Condition: identity policies are evaluated with no request context
  (access_control.py:273, incoming_condition_values=None), so every
  condition block is taken as met (policy_conditions.py:35-46: only
  StringEquals is known, and it is checked against no values). An Allow
  with a condition (ListBucket with s3:prefix, StringLike, IfExists) is an
  unconditional Allow; a Deny with a condition is an unconditional Deny.
  s3:prefix, StringLike, StringLikeIfExists, Null, s3:if-none-match and
  s3:if-match are not evaluated.
* Bucket policies: moto checks the bucket policy before the caller's
  identity for object requests (s3/responses.py:1926-1937, through
  FakeBucket.get_permission, s3/models.py:1154-1161), with no principal
  and no condition: our Deny of PutObject "without If-None-Match or
  If-Match" on slots/ and cluster denies every PutObject there, conditional
  or not (an empty 403). Tests against moto must not apply the bucket
  policy; its Null condition can only be proven on real S3.
* GetObject of a missing key answers 404 whatever the caller may list: the
  403-without-s3:ListBucket rule of AWS is not modelled.

Where real AWS is stricter than moto (so a pass under moto proves less):
  - s3:ListBucket: AWS applies the s3:prefix condition (an agent cannot list
    other/); moto lets every listing through;
  - the bucket policy's conditional-write rule: AWS refuses only writes
    without either header; moto refuses all writes to those keys;
  - SSM: AWS scopes GetParameter/PutParameter to the parameter ARNs (an
    agent cannot read <path>/<id>/server/*); moto refuses all of them under
    these policies, so moto can prove only "denied", never "allowed";
  - DeleteObjects: AWS allows per key; moto refuses all keys.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

ROOT = Path(__file__).resolve().parents[3]
POLICIES = ROOT / "terraform/modules/auto-consul/policies"
ACCOUNT = "123456789012"  # moto's default account
REGION = "us-east-1"
BUCKET = "registry"
PREFIX = "consul/test/"
SSM_PATH = "/auto-consul/test"
CLUSTER_ID = "c0ffee00-0000-4000-8000-000000000001"


def render(name, **values):
    """The module's template, rendered by substitution: no directives."""
    text = (POLICIES / name).read_text()
    for key, value in values.items():
        text = text.replace("${" + key + "}", value)
    assert "${" not in text and "%{" not in text, f"{name}: unrendered template syntax"
    return json.loads(text)


def policy_vars():
    return {
        "bucket_arn": f"arn:aws:s3:::{BUCKET}",
        "key_prefix": PREFIX,
        "ssm_parameter_arn": f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{SSM_PATH}",
    }


def start_moto():
    env = dict(os.environ)
    # A budget of free requests for the set-up; switched off below with
    # POST /moto-api/reset-auth (0), whatever is left of it.
    env["INITIAL_NO_AUTH_ACTION_COUNT"] = "1000"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/support/moto_locked.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # werkzeug's request log
        env=env,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line.startswith("PORT="), line
    return proc, f"http://127.0.0.1:{line[5:]}"


def client(endpoint, service, key=("testing", "testing")):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key[0],
        aws_secret_access_key=key[1],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def user_with_policy(iam, name, document):
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName=f"auto-consul-{name}", PolicyDocument=json.dumps(document))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


def outcome(call):
    """ALLOW, or DENY (the error code), or what else happened."""
    try:
        result = call()
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code") or str(e.response["ResponseMetadata"]["HTTPStatusCode"])
        if code in ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "403"):
            return "DENY"
        if code in ("NoSuchKey", "404", "ParameterNotFound"):
            return "ALLOW(404)"
        return f"ERR:{code}"
    if isinstance(result, dict) and result.get("Errors"):
        codes = {e["Code"] for e in result["Errors"]}
        return "DENY(per key)" if codes == {"AccessDenied"} else f"ERR:{codes}"
    return "ALLOW"


def main():
    proc, endpoint = start_moto()
    try:
        return run(endpoint)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run(endpoint):
    v = policy_vars()
    agent_doc = render("agent.json.tftpl", **v)
    server_doc = render("server.json.tftpl", **v)
    bucket_doc = render("bucket.json.tftpl", **v)

    # --- set-up, inside the free budget --------------------------------
    iam = client(endpoint, "iam")
    s3 = client(endpoint, "s3")
    ssm = client(endpoint, "ssm")
    s3.create_bucket(Bucket=BUCKET)
    cluster_etag = s3.put_object(Bucket=BUCKET, Key=PREFIX + "cluster", Body=b'{"cluster_id":"x"}')["ETag"]
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "slots/server-0", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "servers/20250101000000-s0", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "agents/20250101000000-a0", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "agents/20250101000000-a1", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "servers/20250101000000-s1", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="other/secret", Body=b"x")
    for name in ("agent/gossip-key", "server/ca"):
        ssm.put_parameter(Name=f"{SSM_PATH}/{CLUSTER_ID}/{name}", Value="v", Type="SecureString")
    keys = {
        "agent": user_with_policy(iam, "agent", agent_doc),
        "server": user_with_policy(iam, "server", server_doc),
        "admin": user_with_policy(iam, "admin", {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        }),
    }
    # A body werkzeug does not take for a form (urllib's default type would
    # leave request.data empty, and moto fails on float("")).
    reset = urllib.request.Request(
        endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
        headers={"Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(reset) as r:
        print("IAM enforcement on:", json.loads(r.read()))

    def ops(role):
        s3c = client(endpoint, "s3", keys[role])
        ssmc = client(endpoint, "ssm", keys[role])
        ec2c = client(endpoint, "ec2", keys[role])
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime())
        return [
            ("list servers/", lambda: s3c.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "servers/")),
            ("list agents/", lambda: s3c.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "agents/")),
            ("list slots/", lambda: s3c.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "slots/")),
            ("list other/", lambda: s3c.list_objects_v2(Bucket=BUCKET, Prefix="other/")),
            ("get cluster", lambda: s3c.get_object(Bucket=BUCKET, Key=PREFIX + "cluster")),
            ("get slots/server-1 (absent)", lambda: s3c.get_object(Bucket=BUCKET, Key=PREFIX + "slots/server-1")),
            ("get agents/ key", lambda: s3c.get_object(Bucket=BUCKET, Key=PREFIX + "agents/20250101000000-a0")),
            ("get other/secret", lambda: s3c.get_object(Bucket=BUCKET, Key="other/secret")),
            ("put agents/ heartbeat", lambda: s3c.put_object(Bucket=BUCKET, Key=f"{PREFIX}agents/{stamp}-{role}", Body=b"{}")),
            ("put cas-probe If-None-Match", lambda: s3c.put_object(Bucket=BUCKET, Key=PREFIX + "cas-probe", Body=b"{}", IfNoneMatch="*")),
            ("put servers/ heartbeat", lambda: s3c.put_object(Bucket=BUCKET, Key=f"{PREFIX}servers/{stamp}-{role}", Body=b"{}")),
            (f"put slots/server-1 If-None-Match", lambda: s3c.put_object(Bucket=BUCKET, Key=PREFIX + "slots/server-1", Body=b"{}", IfNoneMatch="*")),
            ("put cluster If-Match", lambda: s3c.put_object(Bucket=BUCKET, Key=PREFIX + "cluster", Body=b'{"cluster_id":"x"}', IfMatch=cluster_etag)),
            ("DeleteObjects agents/ key", lambda: s3c.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": PREFIX + "agents/20250101000000-a1"}], "Quiet": True})),
            ("DeleteObjects servers/ key", lambda: s3c.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": PREFIX + "servers/20250101000000-s1"}], "Quiet": True})),
            ("ec2 DescribeInstances", lambda: ec2c.describe_instances()),
            ("ssm get <id>/agent/gossip-key", lambda: ssmc.get_parameter(Name=f"{SSM_PATH}/{CLUSTER_ID}/agent/gossip-key", WithDecryption=True)),
            ("ssm get <id>/server/ca", lambda: ssmc.get_parameter(Name=f"{SSM_PATH}/{CLUSTER_ID}/server/ca", WithDecryption=True)),
            ("ssm put <id>/agent/agent-token", lambda: ssmc.put_parameter(Name=f"{SSM_PATH}/{CLUSTER_ID}/agent/agent-token", Value="t", Type="SecureString", Overwrite=False)),
        ]

    # (call) -> {role: (what moto answers, what AWS answers)}
    expected = {
        "list servers/": {"agent": ("ALLOW", "ALLOW"), "server": ("ALLOW", "ALLOW")},
        "list agents/": {"agent": ("ALLOW", "ALLOW"), "server": ("ALLOW", "ALLOW")},
        "list slots/": {"agent": ("ALLOW", "ALLOW"), "server": ("ALLOW", "ALLOW")},
        "list other/": {"agent": ("ALLOW", "DENY"), "server": ("ALLOW", "DENY")},
        "get cluster": {"agent": ("ALLOW", "ALLOW"), "server": ("ALLOW", "ALLOW")},
        "get slots/server-1 (absent)": {"agent": ("ALLOW(404)", "ALLOW(404)"), "server": ("ALLOW(404)", "ALLOW(404)")},
        "get agents/ key": {"agent": ("ALLOW", "ALLOW"), "server": ("ALLOW", "ALLOW")},
        "get other/secret": {"agent": ("DENY", "DENY"), "server": ("DENY", "DENY")},
        "put agents/ heartbeat": {"agent": ("ALLOW", "ALLOW"), "server": ("ALLOW", "ALLOW")},
        "put cas-probe If-None-Match": {"agent": ("ALLOW", "ALLOW"), "server": ("ERR:PreconditionFailed", "ERR:PreconditionFailed")},
        "put servers/ heartbeat": {"agent": ("DENY", "DENY"), "server": ("ALLOW", "ALLOW")},
        "put slots/server-1 If-None-Match": {"agent": ("DENY", "DENY"), "server": ("ALLOW", "ALLOW")},
        "put cluster If-Match": {"agent": ("DENY", "DENY"), "server": ("ALLOW", "ALLOW")},
        "DeleteObjects agents/ key": {"agent": ("DENY(per key)", "ALLOW"), "server": ("DENY(per key)", "ALLOW")},
        "DeleteObjects servers/ key": {"agent": ("DENY(per key)", "DENY(per key)"), "server": ("DENY(per key)", "ALLOW")},
        "ec2 DescribeInstances": {"agent": ("ALLOW", "ALLOW"), "server": ("ALLOW", "ALLOW")},
        "ssm get <id>/agent/gossip-key": {"agent": ("DENY", "ALLOW"), "server": ("DENY", "ALLOW")},
        "ssm get <id>/server/ca": {"agent": ("DENY", "DENY"), "server": ("DENY", "ALLOW")},
        "ssm put <id>/agent/agent-token": {"agent": ("DENY", "DENY"), "server": ("DENY", "ALLOW")},
    }

    surprises = []
    print(f"\n{'call':34} {'agent: moto / AWS':32} {'server: moto / AWS':32}")
    observed = {}
    for role in ("agent", "server"):  # the agent first: its writes must change nothing
        for label, call in ops(role):
            observed[(label, role)] = outcome(call)
    for label in expected:
        cells = []
        for role in ("agent", "server"):
            got = observed[(label, role)]
            moto_says, aws_says = expected[label][role]
            mark = "" if moto_says == aws_says else " *"
            cells.append(f"{got} / {aws_says}{mark}")
            if got != moto_says:
                surprises.append(f"{label} as {role}: moto answered {got}, this script expected {moto_says}")
        print(f"{label:34} {cells[0]:32} {cells[1]:32}")
    print("(* moto differs from AWS)")

    # --- the bucket policy ---------------------------------------------
    admin = client(endpoint, "s3", keys["admin"])
    admin.put_bucket_policy(Bucket=BUCKET, Policy=json.dumps(bucket_doc))
    server_s3 = client(endpoint, "s3", keys["server"])
    print("\nbucket policy applied (Deny PutObject on slots/, cluster, cas-probe when Null if-none-match AND Null if-match):")
    for label, call, moto_says, aws_says in [
        ("server: put slots/server-2 If-None-Match", lambda: server_s3.put_object(Bucket=BUCKET, Key=PREFIX + "slots/server-2", Body=b"{}", IfNoneMatch="*"), "DENY", "ALLOW"),
        ("server: put slots/server-2 no condition", lambda: server_s3.put_object(Bucket=BUCKET, Key=PREFIX + "slots/server-2", Body=b"{}"), "DENY", "DENY"),
        ("server: put servers/ heartbeat", lambda: server_s3.put_object(Bucket=BUCKET, Key=PREFIX + "servers/20990101000000-s9", Body=b"{}"), "ALLOW", "ALLOW"),
    ]:
        got = outcome(call)
        print(f"  {label:42} moto {got:12} AWS {aws_says}{'' if moto_says == aws_says else '  *'}")
        if got != moto_says:
            surprises.append(f"{label}: moto answered {got}, this script expected {moto_says}")
    admin.delete_bucket_policy(Bucket=BUCKET)

    # --- nothing of the registry changed by the agent's denied writes ---
    listed = sorted(o["Key"] for o in admin.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX).get("Contents", []))
    stray = [k for k in listed if k.endswith("-agent") and not k.startswith(PREFIX + "agents/")]
    print("\nregistry now:", listed)
    if stray:
        surprises.append(f"the agent's denied writes left keys: {stray}")

    if surprises:
        print("\nUNEXPECTED:\n  " + "\n  ".join(surprises))
        return 1
    print("\nmoto answered as described above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
