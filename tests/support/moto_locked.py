"""moto_server for the auto-consul test suite.

Serves moto's WSGI application on a free loopback port and prints
`PORT=<n>` on its first line of stdout. Three changes from plain moto_server,
each one a measured difference from the real services:

* requests are applied one at a time (plain moto checks a PutObject condition
  and then writes without a lock; real S3 linearizes conditional writes);
* the IMDSv2 token response carries `X-aws-ec2-metadata-token-ttl-seconds`, as
  the real metadata service does (aws-config rejects a token without it);
* with --ignore-conditions, `If-None-Match` and `If-Match` are stripped from
  every request: a stand-in for an S3-compatible store that ignores them;
  with --ignore-if-none-match, only `If-None-Match` is.

`GET /_stats` answers the number of requests served so far (for tests and
benchmarks that count requests); `POST /_stats` sets it back to 0.
`GET /_kinds` answers them by kind, as S3 prices them: {"LIST": n, "GET": n,
"PUT": n, "DELETE": n, ...} (a ListObjectsV2 is a GET with list-type=2, a
DeleteObjects a POST with ?delete).

Faults and latency, for drills and benchmarks:

* --delay-ms N holds every request N milliseconds before it is looked at,
  outside the lock, so concurrent requests overlap as on a network;
* `POST /_faults` with a JSON list of rules arms faults; each rule applies to
  the next `count` requests whose method is `method` (any when absent) and
  whose path contains `match` (any when absent):
    {"status": 503, "code": "SlowDown"}   answer that S3 error, apply nothing
    {"drop": "before"}                     close the connection, apply nothing
    {"drop": "after"}                      apply the request, then close the
                                           connection without answering
    {"stall": 12.5}                        wait that many seconds, then serve
  `GET /_faults` answers how many times each rule fired.
* `POST /_delay` with a number of milliseconds changes --delay-ms.

Seeding, for benchmarks that need large registries: `POST /_seed` with
{"bucket": NAME, "items": [[KEY, BODY], ...]} creates the bucket if needed
and stores the objects straight into moto's S3 backend, without a request
each.

Time, for Day-2 tests: `POST /_age` with {"bucket": NAME, "prefix": P,
"seconds": N} moves the LastModified of every object under P that far into
the past, as if the registry had been silent for N seconds (the objects'
own clock is the store's: heartbeats, slots and the cluster record age by
it, whatever the writers' clocks say).

Instance metadata the stock moto does not serve, for termination tests:
`POST /_imds` with {PATH: BODY, ...} answers GET PATH with BODY (200), or 404
where BODY is null; e.g. "/latest/meta-data/autoscaling/target-lifecycle-state".
Instance tags (`/latest/meta-data/tags/instance...`) answer 404 unless a rule
says otherwise, as EC2 does while tags are not allowed in the metadata.

IAM for SSM, which moto does not evaluate past the action: `POST /_iam`
with {ACCESS_KEY_ID: {"policy": POLICY, "context": {"ec2:SourceInstanceARN":
ARN, ...}}} has every later SSM request signed with that key evaluated by
tests/support/iam_standin.py (the parameter's ARN, its tags, the context)
and refused as AWS refuses one (400 AccessDeniedException) when denied.

SSM, for the secrets tests: `GET /_ssm` answers every SSM call so far as
[{"action": "GetParameter", "name": NAME, "key": ACCESS_KEY_ID}, ...] (who
read or wrote which parameter). Fault rules also match the `X-Amz-Target`
header (after a `#`), and a rule with "json": true answers a JSON-protocol
error, as SSM does: {"match": "AmazonSSM.GetParameter", "status": 400,
"code": "AccessDeniedException", "json": true}.

Autoscaling lifecycle actions, which moto does not implement:
CompleteLifecycleAction and RecordLifecycleActionHeartbeat are checked
(group, hook, instance id or token; CONTINUE or ABANDON), recorded and
answered as AWS answers them; `GET /_lifecycle` lists the calls in order
([{"action", "group", "hook", "instance", "result", "time", "error"}, ...]).
An instance's launch action is over once completed: later calls for it are
answered with AWS's ValidationError "No active Lifecycle Action found with
instance ID ..." (error "no active action" in the list); `POST /_lifecycle`
with {"inactive": [INSTANCE_ID, ...]} ends them as a hook's timeout does.

The server exits when its parent process goes away.
"""

import argparse
import io
import json
import os
import socket
import sys
import threading
import time
import urllib.parse

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


S3_ERROR = """<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>{code}</Code><Message>injected by the test harness</Message><RequestId>fault</RequestId></Error>"""

STATUS_TEXT = {409: "Conflict", 500: "Internal Server Error", 503: "Service Unavailable", 412: "Precondition Failed"}


def reply(start_response, status, body, ctype="text/plain"):
    start_response(f"{status} {STATUS_TEXT.get(status, 'Error')}", [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def seed_objects(bucket, items):
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    try:
        backend.get_bucket(bucket)
    except Exception:
        backend.create_bucket(bucket, "us-east-1")
    for key, body in items:
        backend.put_object(bucket, key, body.encode())
    return len(items)


def age_objects(bucket, prefix, seconds):
    import datetime

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    aged = 0
    for name, key in list(backend.get_bucket(bucket).keys.items()):
        if name.startswith(prefix):
            key.last_modified = key.last_modified - datetime.timedelta(seconds=seconds)
            aged += 1
    return aged


# Autoscaling lifecycle calls the stand-in answers (moto does not).
LIFECYCLE_ACTIONS = ("CompleteLifecycleAction", "RecordLifecycleActionHeartbeat")


def drop_connection(environ):
    sock = environ.get("werkzeug.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class Serialized:
    def __init__(self, app, ignore_conditions, delay_ms):
        self.app = app
        self.ignore_conditions = ignore_conditions
        self.delay = delay_ms / 1000.0
        self.lock = threading.Lock()
        self.requests = 0
        self.faults = []
        self.fired = []
        self.imds = {}
        self.kinds = {}
        self.ssm_calls = []
        self.lifecycle_calls = []
        self.lifecycle_over = set()
        self.principals = {}

    def iam_denies(self, principal, operation, raw, auth):
        """The IAM stand-in (iam_standin.py) on one SSM request of a
        registered principal: None when allowed, else AWS's message."""
        import iam_standin
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ssm.models import ssm_backends

        try:
            req = json.loads(raw or b"{}")
        except ValueError:
            req = {}
        name = req.get("Name") or ""
        scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/") if "Credential=" in auth else []
        region = scope[2] if len(scope) > 2 else "us-east-1"
        arn = f"arn:aws:ssm:{region}:{DEFAULT_ACCOUNT_ID}:parameter{name if name.startswith('/') else '/' + name}"
        context = dict(principal.get("context") or {})
        with self.lock:
            try:
                tags = dict(ssm_backends[DEFAULT_ACCOUNT_ID][region].list_tags_for_resource("Parameter", name))
            except Exception:
                tags = {}
        for k, v in tags.items():
            context[f"ssm:resourceTag/{k}"] = v
            context[f"aws:ResourceTag/{k}"] = v
        for t in req.get("Tags") or []:
            context[f"aws:RequestTag/{t.get('Key')}"] = t.get("Value")
        action = f"ssm:{operation}"
        if iam_standin.decide(principal["policy"], action, arn, context) == "allow":
            return None
        return f"User: {principal.get('arn', 'the caller')} is not authorized to perform: {action} on resource: {arn}"

    def lifecycle(self, form, start_response):
        """Autoscaling's lifecycle calls, which moto does not implement:
        checked as AWS checks them (a group, a hook, and an instance id or
        a token; CONTINUE or ABANDON), recorded, answered in AWS's XML."""
        action = form["Action"]
        missing = [k for k in ("AutoScalingGroupName", "LifecycleHookName") if not form.get(k)]
        if not form.get("InstanceId") and not form.get("LifecycleActionToken"):
            missing.append("InstanceId or LifecycleActionToken")
        if action == "CompleteLifecycleAction" and form.get("LifecycleActionResult") not in ("CONTINUE", "ABANDON"):
            missing.append("LifecycleActionResult (CONTINUE or ABANDON)")
        if missing:
            body = ("<ErrorResponse><Error><Type>Sender</Type><Code>ValidationError</Code><Message>"
                    + "missing or invalid: " + ", ".join(missing) + "</Message></Error></ErrorResponse>")
            return reply(start_response, 400, body.encode(), "text/xml")
        instance = form.get("InstanceId")
        with self.lock:
            # A launch action ends when it is completed (or, in AWS, when
            # its hook times out: POST /_lifecycle {"inactive": [id]}); AWS
            # then answers every call for it with this ValidationError.
            over = instance in self.lifecycle_over
            if action == "CompleteLifecycleAction" and not over:
                self.lifecycle_over.add(instance)
            self.lifecycle_calls.append({
                "action": action,
                "group": form.get("AutoScalingGroupName"),
                "hook": form.get("LifecycleHookName"),
                "instance": instance,
                "result": form.get("LifecycleActionResult"),
                "time": time.time(),
                "error": "no active action" if over else None,
            })
        if over:
            body = ("<ErrorResponse><Error><Type>Sender</Type><Code>ValidationError</Code><Message>"
                    f"No active Lifecycle Action found with instance ID {instance}"
                    "</Message></Error><RequestId>x</RequestId></ErrorResponse>")
            return reply(start_response, 400, body.encode(), "text/xml")
        ns = "http://autoscaling.amazonaws.com/doc/2011-01-01/"
        body = (f'<{action}Response xmlns="{ns}"><{action}Result/>'
                f"<ResponseMetadata><RequestId>{len(self.lifecycle_calls)}</RequestId></ResponseMetadata>"
                f"</{action}Response>")
        return reply(start_response, 200, body.encode(), "text/xml")

    def take_fault(self, environ):
        method = environ.get("REQUEST_METHOD", "")
        target = environ.get("PATH_INFO", "") + "?" + environ.get("QUERY_STRING", "")
        # JSON-protocol services (SSM) name the operation in a header.
        target += "#" + environ.get("HTTP_X_AMZ_TARGET", "")
        with self.lock:
            for i, rule in enumerate(self.faults):
                if rule.get("count", 1) <= 0:
                    continue
                if rule.get("method") and rule["method"] != method:
                    continue
                if rule.get("match") and rule["match"] not in target:
                    continue
                rule["count"] = rule.get("count", 1) - 1
                self.fired[i] += 1
                return rule
        return None

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_lifecycle"):
            if environ.get("REQUEST_METHOD") == "POST":
                length = int(environ.get("CONTENT_LENGTH") or 0)
                body = json.loads(environ["wsgi.input"].read(length) or b"{}")
                with self.lock:
                    self.lifecycle_over.update(body.get("inactive", []))
            with self.lock:
                calls = list(self.lifecycle_calls)
            return reply(start_response, 200, json.dumps(calls).encode(), "application/json")
        if path == "/_iam":
            # Principals whose SSM requests the IAM stand-in evaluates:
            # {ACCESS_KEY_ID: {"policy": {...}, "context": {...}}}.
            length = int(environ.get("CONTENT_LENGTH") or 0)
            with self.lock:
                self.principals.update(json.loads(environ["wsgi.input"].read(length) or b"{}"))
            return reply(start_response, 200, b"ok")
        if path.startswith("/_ssm"):
            with self.lock:
                calls = list(self.ssm_calls)
            return reply(start_response, 200, json.dumps(calls).encode(), "application/json")
        if path.startswith("/_kinds"):
            return reply(start_response, 200, json.dumps(self.kinds).encode(), "application/json")
        if path.startswith("/_stats"):
            if environ.get("REQUEST_METHOD") == "POST":
                self.requests = 0
                self.kinds = {}
            return reply(start_response, 200, str(self.requests).encode())
        if path.startswith("/_faults"):
            if environ.get("REQUEST_METHOD") == "POST":
                length = int(environ.get("CONTENT_LENGTH") or 0)
                rules = json.loads(environ["wsgi.input"].read(length) or b"[]")
                with self.lock:
                    self.faults = rules
                    self.fired = [0] * len(rules)
            return reply(start_response, 200, json.dumps(self.fired).encode(), "application/json")
        if path == "/_delay":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            self.delay = float(environ["wsgi.input"].read(length) or b"0") / 1000.0
            return reply(start_response, 200, b"ok")
        if path == "/_seed":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            seed = json.loads(environ["wsgi.input"].read(length))
            with self.lock:
                count = seed_objects(seed["bucket"], seed.get("items", []))
            return reply(start_response, 200, str(count).encode())
        if path == "/_imds":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            self.imds.update(json.loads(environ["wsgi.input"].read(length)))
            return reply(start_response, 200, b"ok")
        if path in self.imds and environ.get("REQUEST_METHOD") == "GET":
            body = self.imds[path]
            if body is None:
                return reply(start_response, 404, b"Not Found")
            return reply(start_response, 200, body.encode())
        if path.startswith("/latest/meta-data/tags/instance") and environ.get("REQUEST_METHOD") == "GET":
            # EC2 answers 404 while instance tags are not allowed in the
            # metadata (the default; AWS's "Work with instance tags in
            # instance metadata"); moto answers 500, which an IMDS client
            # retries after a backoff of about a second.
            return reply(start_response, 404, b"Not Found")
        if path == "/_age":
            length = int(environ.get("CONTENT_LENGTH") or 0)
            age = json.loads(environ["wsgi.input"].read(length))
            with self.lock:
                count = age_objects(age["bucket"], age.get("prefix", ""), float(age["seconds"]))
            return reply(start_response, 200, str(count).encode())
        if self.delay:
            time.sleep(self.delay)
        rule = self.take_fault(environ)
        if rule is not None:
            if "stall" in rule:
                time.sleep(float(rule["stall"]))
            elif "status" in rule and rule.get("json"):
                # A JSON-protocol error (SSM), as AWS answers it.
                body = json.dumps({"__type": rule.get("code", "InternalServerError"),
                                   "message": rule.get("message", "injected fault")}).encode()
                return reply(start_response, int(rule["status"]), body, "application/x-amz-json-1.1")
            elif "status" in rule:
                body = S3_ERROR.format(code=rule.get("code", "InternalError")).encode()
                return reply(start_response, int(rule["status"]), body, "application/xml")
            elif rule.get("drop") == "before":
                drop_connection(environ)
                return []
        if self.ignore_conditions:
            environ.pop("HTTP_IF_NONE_MATCH", None)
            if self.ignore_conditions == "all":
                environ.pop("HTTP_IF_MATCH", None)
        token_ttl = None
        if path == "/latest/api/token":
            token_ttl = environ.get("HTTP_X_AWS_EC2_METADATA_TOKEN_TTL_SECONDS", "21600")

        def start(status, headers, exc_info=None):
            if token_ttl is not None and not any(
                k.lower() == "x-aws-ec2-metadata-token-ttl-seconds" for k, _ in headers
            ):
                headers = list(headers) + [("X-aws-ec2-metadata-token-ttl-seconds", token_ttl)]
            return start_response(status, headers, exc_info)

        method = environ.get("REQUEST_METHOD", "")
        query = environ.get("QUERY_STRING", "")
        if method == "POST" and "x-www-form-urlencoded" in environ.get("CONTENT_TYPE", ""):
            length = int(environ.get("CONTENT_LENGTH") or 0)
            raw = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(raw)
            form = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode()).items()}
            if form.get("Action") in LIFECYCLE_ACTIONS:
                return self.lifecycle(form, start_response)
        amz_target = environ.get("HTTP_X_AMZ_TARGET", "")
        if amz_target.startswith("AmazonSSM."):
            # Every SSM call, by whom (the access key id) and on which name,
            # for tests that check who reads what.
            length = int(environ.get("CONTENT_LENGTH") or 0)
            raw = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(raw)
            try:
                name = json.loads(raw or b"{}").get("Name")
            except ValueError:
                name = None
            auth = environ.get("HTTP_AUTHORIZATION", "")
            key = auth.split("Credential=", 1)[1].split("/", 1)[0] if "Credential=" in auth else None
            with self.lock:
                self.ssm_calls.append({"action": amz_target.split(".", 1)[1], "name": name, "key": key})
                principal = self.principals.get(key)
            if principal is not None:
                denied = self.iam_denies(principal, amz_target.split(".", 1)[1], raw, auth)
                if denied:
                    body = json.dumps({"__type": "AccessDeniedException", "message": denied}).encode()
                    return reply(start_response, 400, body, "application/x-amz-json-1.1")
        if method == "GET" and "list-type=2" in query:
            kind = "LIST"
        elif method == "POST" and "delete" in query:
            kind = "DELETE"
        else:
            kind = method
        with self.lock:
            self.requests += 1
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            # Drain the whole response under the lock so that the write is
            # complete before the next request is looked at.
            body = list(self.app(environ, start))
        if rule is not None and rule.get("drop") == "after":
            drop_connection(environ)
            return []
        return body


def watch_parent():
    parent = os.getppid()
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ignore-conditions", action="store_const", const="all", dest="ignore")
    parser.add_argument("--ignore-if-none-match", action="store_const", const="if-none-match", dest="ignore")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    app = Serialized(DomainDispatcherApplication(create_backend_app), args.ignore, args.delay_ms)
    server = make_server("127.0.0.1", args.port, app, threaded=True)
    print(f"PORT={server.server_port}", flush=True)
    threading.Thread(target=watch_parent, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
