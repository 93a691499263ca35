"""A stand-in for a local Consul agent's HTTP API, for the heartbeat tests.

Consul itself cannot be installed here. This serves `GET /v1/agent/self` in
the shape Consul documents for that endpoint (Config, DebugConfig, Coord,
Member, Meta, Stats, xDS), with `Config.Server` telling whether the agent
runs as a server, and `GET /v1/status/leader` and `/v1/status/peers`, which
Consul serves without any ACL token (a JSON string, "" when there is no
leader; a JSON list of "ip:port" Raft peers). With --token, requests to
/v1/agent/self without that `X-Consul-Token` get 403 "ACL not found", as
Consul answers when the token lacks agent:read; the status endpoints still
answer. `PUT /v1/agent/leave` (what `consul leave` sends) writes the file
named by --leave-file; `PUT /v1/agent/join/<address>` (what `consul join`
sends) appends the address to --join-file and answers 200, or 403 with
--token when the token differs. With --tls-cert/--tls-key it serves HTTPS,
and with --tls-client-ca it demands a client certificate signed by that CA
(an agent whose HTTPS listener has verify_incoming). `GET /v1/snapshot`
streams the file named by --snapshot-file (Consul: application/x-gzip, with
X-Consul-Index), and `PUT /v1/snapshot` reads the body it is sent and, when
all of Content-Length arrived, appends its SHA-256 and size to
<--restore-dir>/restores.jsonl (a body cut short goes to aborted.jsonl, as
Consul drops a restore whose stream breaks); both need the --acl-management
token when it is set (Consul: a management token). With --acl-dir the ACL
state holds the --acl-management token (linked to global-management, as
Consul bootstraps it), ACL writes and snapshots need a management token of
that state, `GET /v1/snapshot` without --snapshot-file is the ACL state as
JSON, and a restore of such a body replaces the ACL state (then, as Consul
re-runs its leader actions, the --acl-management token is made again if the
restored state lacks it). Prints `PORT=<n>` first;
exits when its parent goes away.
"""

import argparse
import fcntl
import hashlib
import json
import os
import socket
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def agent_self(node, server, address):
    role_tags = {"role": "consul", "port": "8300", "expect": "0"} if server else {"role": "node"}
    return {
        "Config": {
            "Datacenter": "dc1",
            "PrimaryDatacenter": "dc1",
            "NodeName": node,
            "NodeID": str(uuid.uuid5(uuid.NAMESPACE_DNS, node)),
            "Revision": "0000000",
            "Server": server,
            "Version": "1.20.1",
            "BuildDate": "2024-10-29T19:04:05Z",
        },
        "DebugConfig": {"Bootstrap": False, "ServerMode": server, "NodeName": node},
        "Coord": {"Vec": [0.0] * 8, "Error": 1.5, "Adjustment": 0.0, "Height": 1e-05},
        "Member": {
            "Name": node,
            "Addr": address,
            "Port": 8301,
            "Tags": dict(role_tags, dc="dc1", id=str(uuid.uuid5(uuid.NAMESPACE_DNS, node)), vsn="2", vsn_min="2", vsn_max="3", build="1.20.1:0000000"),
            "Status": 1,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4,
        },
        "Meta": {"consul-network-segment": "", "consul-version": "1.20.1"},
        "Stats": {"agent": {"check_monitors": "0"}, "consul": {"server": str(server).lower()}},
        "xDS": {"SupportedProxies": {"envoy": ["1.31.2"]}, "Port": -1, "Ports": {"Plaintext": -1, "TLS": -1}},
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--node", required=True)
    parser.add_argument("--server", action="store_true")
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--token")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--leave-file", help="PUT /v1/agent/leave writes this file (the agent left)")
    parser.add_argument(
        "--no-servers",
        action="store_true",
        help="a client agent that knows no server: the status endpoints answer 500, as Consul's do",
    )
    parser.add_argument("--join-file", help="PUT /v1/agent/join/<addr> appends <addr> to this file")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="and this key (PEM)")
    parser.add_argument("--tls-client-ca", help="demand client certificates signed by this CA (PEM)")
    parser.add_argument("--leader", help="the leader's ip:port (default: this agent's, when a server)")
    parser.add_argument("--peers", help="comma-separated Raft peers, ip:port (default: this agent's, when a server)")
    parser.add_argument(
        "--acl-dir",
        help="serve Consul's ACL token and policy endpoints, with the cluster's ACL state in this directory "
        "(shared by the fake agents of one cluster, under a lock); every write is logged to acl-log.jsonl there",
    )
    parser.add_argument("--acl-management", help="the initial management token the ACL writes need")
    parser.add_argument(
        "--autopilot-file",
        help="serve GET /v1/operator/autopilot/health with this file's JSON (Consul's OperatorHealthReply: "
        "Healthy, FailureTolerance, Servers[{ID, Name, Address, Healthy, Voter, Leader, ...}]), read at each request",
    )
    parser.add_argument("--snapshot-file", help="GET /v1/snapshot streams this file")
    parser.add_argument("--restore-dir", help="PUT /v1/snapshot records what it received here")
    parser.add_argument(
        "--restore-pace-ms",
        type=float,
        default=0,
        help="sleep this long after each 256 KiB of a restore's body, read through a 64 KiB receive buffer (a restore a test can interrupt)",
    )
    args = parser.parse_args()
    body = json.dumps(agent_self(args.node, args.server, args.address)).encode()
    own = f"{args.address}:8300"
    leader = args.leader if args.leader is not None else (own if args.server else "")
    peers = args.peers.split(",") if args.peers else ([own] if args.server else [])
    status = {
        "/v1/status/leader": json.dumps(leader).encode(),
        "/v1/status/peers": json.dumps([p for p in peers if p]).encode(),
    }

    def acl_state(update):
        """Runs update(state) on the shared ACL state under its lock;
        returns what update returns. State: {"tokens": {secret: token},
        "policies": {name: policy}}."""
        path = os.path.join(args.acl_dir, "acl-state.json")
        with open(os.path.join(args.acl_dir, "acl.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with open(path) as f:
                    state = json.load(f)
            except FileNotFoundError:
                state = {"tokens": {}, "policies": {}}
            result = update(state)
            with open(path + ".tmp", "w") as f:
                json.dump(state, f)
            os.replace(path + ".tmp", path)
            return result

    GLOBAL_MANAGEMENT = "00000000-0000-0000-0000-000000000001"

    def is_management(secret):
        """Whether `secret` may do what a management token may: with
        --acl-dir, a token of the ACL state linked to Consul's built-in
        global-management policy (a restore replaces that state, and with it
        which tokens those are); else the --acl-management token."""
        if not args.acl_dir:
            return secret == args.acl_management
        token = acl_state(lambda st: st["tokens"].get(secret))
        return bool(token) and any(
            p.get("ID") == GLOBAL_MANAGEMENT or p.get("Name") == "global-management"
            for p in token.get("Policies") or []
        )

    def bootstrap(st):
        # Consul's leader actions (leader.go, initializeACLs) make the
        # configured initial management token when the state has none with
        # that SecretID: when a leader is established, and again after a
        # restore (snapshot_endpoint.go re-runs them).
        st["tokens"].setdefault(args.acl_management, {
            "SecretID": args.acl_management,
            "AccessorID": str(uuid.uuid4()),
            "Description": "Initial Management Token",
            "Policies": [{"ID": GLOBAL_MANAGEMENT, "Name": "global-management"}],
        })

    if args.acl_dir and args.acl_management:
        acl_state(bootstrap)

    def acl_log(entry):
        with open(os.path.join(args.acl_dir, "acl-log.jsonl"), "a") as f:
            f.write(json.dumps(entry) + "\n")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, code, payload, ctype):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self):
            path = self.path.split("?")[0]
            if path in status and args.no_servers:
                return self.reply(500, b"No known Consul servers", "text/plain")
            if path in status:
                return self.reply(200, status[path], "application/json")
            if path == "/v1/operator/autopilot/health" and args.autopilot_file:
                with open(args.autopilot_file, "rb") as f:
                    health = f.read()
                # Consul answers 429 when the cluster is unhealthy, with the
                # same body (agent/operator_endpoint.go).
                code = 200 if json.loads(health).get("Healthy") else 429
                return self.reply(code, health, "application/json")
            if path == "/v1/snapshot" and args.acl_dir and not args.snapshot_file:
                # With ACL state and no file: the snapshot is that state.
                if not is_management(self.headers.get("X-Consul-Token", "")):
                    return self.reply(403, b"Permission denied", "text/plain")
                state = acl_state(lambda st: json.loads(json.dumps(st)))
                return self.reply(200, json.dumps(state).encode(), "application/x-gzip")
            if path == "/v1/snapshot" and args.snapshot_file:
                if args.acl_management and not is_management(self.headers.get("X-Consul-Token", "")):
                    return self.reply(403, b"Permission denied", "text/plain")
                size = os.path.getsize(args.snapshot_file)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-gzip")
                self.send_header("X-Consul-Index", "42")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                with open(args.snapshot_file, "rb") as f:
                    while True:
                        chunk = f.read(1 << 20)
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                return
            if path == "/v1/acl/token/self" and args.acl_dir:
                # Consul: the token the request carries, or 403 "ACL not found".
                secret = self.headers.get("X-Consul-Token", "")
                token = acl_state(lambda st: st["tokens"].get(secret))
                if token is None:
                    return self.reply(403, b"ACL not found", "text/plain")
                return self.reply(200, json.dumps(token).encode(), "application/json")
            if args.token is not None and self.headers.get("X-Consul-Token") != args.token:
                return self.reply(403, b"ACL not found", "text/plain")
            if path == "/v1/agent/self":
                return self.reply(200, body, "application/json")
            self.reply(404, b"404 page not found", "text/plain")

    def do_PUT(self):
        path = self.path.split("?")[0]
        if path in ("/v1/acl/policy", "/v1/acl/token") and args.acl_dir:
            if not is_management(self.headers.get("X-Consul-Token", "")):
                return self.reply(403, b"Permission denied: token lacks acl:write", "text/plain")
            length = int(self.headers.get("Content-Length") or 0)
            req = json.loads(self.rfile.read(length) or b"{}")
            if path == "/v1/acl/policy":
                def put_policy(st):
                    if req.get("Name") in st["policies"]:
                        return None
                    policy = dict(req, ID=str(uuid.uuid4()))
                    st["policies"][req.get("Name")] = policy
                    return policy
                made = acl_state(put_policy)
                if made is None:
                    msg = f'Invalid Policy: A Policy with Name "{req.get("Name")}" already exists'
                    return self.reply(500, msg.encode(), "text/plain")
            else:
                def put_token(st):
                    secret = req.get("SecretID") or str(uuid.uuid4())
                    if secret in st["tokens"]:
                        return None
                    token = dict(req, SecretID=secret, AccessorID=str(uuid.uuid4()))
                    st["tokens"][secret] = token
                    return token
                made = acl_state(put_token)
                if made is None:
                    return self.reply(500, b"Invalid Token: SecretID is already in use", "text/plain")
            acl_log({"path": path, "by": args.node, "body": req})
            return self.reply(200, json.dumps(made).encode(), "application/json")
        if path == "/v1/snapshot" and args.restore_dir:
            if args.acl_management and not is_management(self.headers.get("X-Consul-Token", "")):
                return self.reply(403, b"Permission denied", "text/plain")
            return restore(self)
        if args.token is not None and self.headers.get("X-Consul-Token") != args.token:
            return self.reply(403, b"Permission denied", "text/plain")
        if path == "/v1/agent/leave" and args.leave_file:
            with open(args.leave_file, "w") as f:
                f.write("left\n")
            return self.reply(200, b"", "text/plain")
        if path.startswith("/v1/agent/join/") and args.join_file:
            with open(args.join_file, "a") as f:
                f.write(path[len("/v1/agent/join/"):] + "\n")
            return self.reply(200, b"", "text/plain")
        self.reply(404, b"404 page not found", "text/plain")

    def restore(handler):
        length = int(handler.headers.get("Content-Length") or 0)
        with open(os.path.join(args.restore_dir, "started.jsonl"), "a") as f:
            f.write(json.dumps({"by": args.node, "size": length}) + "\n")
        digest, got = hashlib.sha256(), 0
        # A snapshot this fake made of its ACL state is small: kept to load.
        small = bytearray() if args.acl_dir and length <= (1 << 20) else None
        # Paced (a test that cuts a restore mid-body): small reads from a
        # small receive buffer, so that what the client sent before it was
        # killed is mostly still in its own send buffer, which the kernel
        # drops; the server sees a short body, as Consul would.
        step = 1 << 20
        if args.restore_pace_ms:
            step = 256 << 10
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        while got < length:
            chunk = handler.rfile.read(min(step, length - got))
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
            if small is not None:
                small.extend(chunk)
            if args.restore_pace_ms:
                time.sleep(args.restore_pace_ms / 1000)
        entry = {"by": args.node, "size": got, "sha256": digest.hexdigest()}
        name = "restores.jsonl" if got == length and length > 0 else "aborted.jsonl"
        if name == "restores.jsonl" and small is not None:
            try:
                restored = json.loads(bytes(small))
            except ValueError:
                restored = None
            if isinstance(restored, dict) and "tokens" in restored:
                # The restored state replaces the ACL state, as Consul's does.
                def replace(st):
                    st.clear()
                    st.update(restored)
                    if args.acl_management:
                        bootstrap(st)
                acl_state(replace)
        with open(os.path.join(args.restore_dir, name), "a") as f:
            f.write(json.dumps(entry) + "\n")
        if name == "aborted.jsonl":
            handler.close_connection = True
            return
        handler.reply(200, b"", "text/plain")

    Handler.do_PUT = do_PUT
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    if args.tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(args.tls_client_ca)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    print(f"PORT={server.server_address[1]}", flush=True)

    def watch_parent():
        parent = os.getppid()
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch_parent, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
