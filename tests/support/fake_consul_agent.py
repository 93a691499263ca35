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
X-Consul-Index; the file is a snapshot in Consul's archive format, which
tests write; --snapshot-cut-at breaks the stream after the 200, as a leader
change does), and `PUT /v1/snapshot` reads the body it is sent and, when all
of Content-Length arrived, checks it as Consul does (snapshot/archive.go:
gzip, tar of meta.json, state.bin, SHA256SUMS, sums matching, nothing
after; then the fake FSM's header in state.bin, see FSM_HEADER), refusing
with Consul's 500 and words (logged to refused.jsonl) or appending its
SHA-256 and size to <--restore-dir>/restores.jsonl (a body cut short goes to
aborted.jsonl, as Consul drops a restore whose stream breaks); for
--restore-refuse-s after start it answers raft's "cannot restore snapshot
now". Both need the --acl-management token when it is set (Consul: a
management token). The cluster state (with --acl-dir, shared on disk; else
this agent's own) holds the Connect CA's active root (`GET
/v1/agent/connect/ca/roots`) and autopilot's configuration (`GET`/`PUT
/v1/operator/autopilot/configuration`); a restore replaces both. With --acl-dir the ACL
state holds the --acl-management token (linked to global-management, as
Consul bootstraps it), ACL writes and snapshots need a management token of
that state, `GET /v1/snapshot` without --snapshot-file is a Consul archive of the ACL state, and a restore of such a body replaces the ACL state (then, as Consul
re-runs its leader actions, the --acl-management token is made again if the
restored state lacks it). Without --acl-management, the initial management
token is `acl.tokens.initial_management` of --config-file, read once at
start (Consul does not reload it); `PUT /_fake/leadership` runs the leader
actions again, as a server winning an election does. Prints `PORT=<n>` first;
exits when its parent goes away.
"""

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import socket
import ssl
import tarfile
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


# The fake's state machine writes this line first in state.bin, as Consul's
# FSM writes a msgpack header first (agent/consul/fsm/snapshot.go,
# `persist`): a state.bin without it is one the FSM cannot restore.
FSM_HEADER = b"fake-consul-fsm 1\n"
ZERO_BLOCK = b"\0" * 512


class Refusal(Exception):
    """What Consul answers (500) to a snapshot it will not restore."""


def consul_archive(state_bin):
    """A snapshot as Consul's snapshot.Write makes one (snapshot/archive.go):
    a tar of meta.json, state.bin and SHA256SUMS ("%x  %s" lines), ended by
    Go's two zero blocks and nothing more (Python's tarfile pads to 10 KiB:
    cut), gzipped."""
    meta = (json.dumps({
        "Version": 1, "ID": "2-42-1700000000000", "Index": 42, "Term": 2,
        "Peers": None, "ConfigurationIndex": 1, "Size": len(state_bin),
    }) + "\n").encode()
    sums = (f"{hashlib.sha256(meta).hexdigest()}  meta.json\n"
            f"{hashlib.sha256(state_bin).hexdigest()}  state.bin\n").encode()
    buf = io.BytesIO()
    tf = tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT)
    for name, data in (("meta.json", meta), ("state.bin", state_bin), ("SHA256SUMS", sums)):
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o600
        tf.addfile(info, io.BytesIO(data))
    end = tf.offset
    tf.close()
    return gzip.compress(buf.getvalue()[:end + 1024], mtime=0)


def gunzip(body):
    """Go's gzip reader: members read one after another as one stream."""
    if body[:2] != b"\x1f\x8b":
        raise Refusal("failed to decompress snapshot: gzip: invalid header")
    out, rest = bytearray(), bytes(body)
    while rest:
        d = zlib.decompressobj(31)
        try:
            out += d.decompress(rest)
        except zlib.error as e:
            raise Refusal(f"failed to read snapshot file: failed reading snapshot: flate: {e}")
        if not d.eof:
            raise Refusal("failed to read snapshot file: failed reading snapshot: unexpected EOF")
        rest = d.unused_data
        if rest and rest[:2] != b"\x1f\x8b":
            raise Refusal("failed to read snapshot file: gzip: invalid header")
    return bytes(out)


def read_archive(body):
    """state.bin of a snapshot, checked as Consul checks one before it
    restores it (snapshot/snapshot.go `Read` and `concludeGzipRead`,
    snapshot/archive.go `read` and `hashList.DecodeAndVerify`), or a
    Refusal with Consul's words."""
    raw = gunzip(body)
    pos, files = 0, {}
    eof = "failed to read snapshot file: failed reading snapshot: unexpected EOF"
    while True:
        block = raw[pos:pos + 512]
        if len(block) < 512:
            raise Refusal(eof)
        if block == ZERO_BLOCK:
            after = raw[pos + 512:pos + 1024]
            if after and len(after) < 512:
                raise Refusal(eof)
            if after and after != ZERO_BLOCK:
                raise Refusal("failed to read snapshot file: failed reading snapshot: archive/tar: invalid tar header")
            end = pos + 512 + len(after)
            break
        chk = sum(block[:148]) + 8 * 32 + sum(block[156:])
        try:
            size = int(block[124:136].rstrip(b"\0 ") or b"0", 8)
            ok = int(block[148:156].rstrip(b"\0 ") or b"0", 8) == chk
        except ValueError:
            ok = False
        if not ok:
            raise Refusal("failed to read snapshot file: failed reading snapshot: archive/tar: invalid tar header")
        name = block[:100].rstrip(b"\0").decode(errors="replace")
        data = raw[pos + 512:pos + 512 + size]
        if len(data) < size:
            raise Refusal(eof)
        if name not in ("meta.json", "state.bin", "SHA256SUMS"):
            raise Refusal(f'failed to read snapshot file: unexpected file "{name}" in snapshot')
        if name == "meta.json":
            try:
                json.loads(data)
            except ValueError as e:
                raise Refusal(f"failed to read snapshot file: failed to decode snapshot metadata: {e}")
        files[name] = data
        pos += 512 + (size + 511) // 512 * 512
    seen = {}
    for line in files.get("SHA256SUMS", b"").decode(errors="replace").splitlines():
        digest, _, fname = line.partition("  ")
        seen[fname] = digest
    for fname in ("meta.json", "state.bin"):
        if fname not in seen:
            raise Refusal(f'failed to read snapshot file: failed checking integrity of snapshot: file missing for "{fname}"')
        if hashlib.sha256(files.get(fname, b"")).hexdigest() != seen[fname]:
            raise Refusal(f'failed to read snapshot file: failed checking integrity of snapshot: hash check failed for "{fname}"')
    if len(raw) - end:
        raise Refusal(f"{len(raw) - end} unread uncompressed bytes remain")
    return files["state.bin"]


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
    parser.add_argument(
        "--snapshot-cut-at",
        type=int,
        help="GET /v1/snapshot sends only this many bytes of the file, then the error Consul's leader appends "
        "when its stream breaks (agent/consul/snapshot_endpoint.go: a msgpack reply with \"failed to stream "
        "snapshot: ...\" after the bytes already sent), and closes: the 200 was committed",
    )
    parser.add_argument(
        "--restore-refuse-s",
        type=float,
        default=0,
        help="for this long after start (a leader just elected), PUT /v1/snapshot answers raft's "
        "\"cannot restore snapshot now\" (hashicorp/raft raft.go, restoreUserSnapshot)",
    )
    parser.add_argument(
        "--rpc-port",
        type=int,
        help="serve Consul's server RPC TLS on --address:PORT: a connection's first byte 3 (RPCTLS, "
        "agent/pool/conn.go) then a TLS handshake with --rpc-cert/--rpc-key, demanding a client certificate "
        "signed by --rpc-ca (verify_incoming); the files are read at start and again at each "
        "PUT /v1/agent/reload (Consul reloads its TLS files then: agent/agent.go reloadConfigInternal)",
    )
    parser.add_argument(
        "--keyring-data-dir",
        help="serve GET /v1/operator/keyring with the gossip keys this agent uses, as Consul picks them "
        "(agent/keyring.go, setupBaseKeyrings): <dir>/serf/local.keyring when it exists (and then the config's "
        "encrypt is ignored), else `encrypt` of --keyring-config",
    )
    parser.add_argument("--keyring-config", help="the Consul config file whose `encrypt` this agent starts with")
    parser.add_argument(
        "--config-file",
        help="this agent's Consul config file: requests without X-Consul-Token run with its acl.tokens.default "
        "(with --acl-dir: the catalog endpoints filter by the ACL rules Consul applies)",
    )
    parser.add_argument(
        "--datacenters",
        help="comma-separated: the datacenters GET /v1/catalog/datacenters lists, as Consul lists the ones its "
        "servers reach over the WAN (agent/consul/catalog_endpoint.go ListDatacenters: no ACL asked; this "
        "datacenter alone without WAN federation); default: the config's datacenter",
    )
    parser.add_argument("--rpc-cert")
    parser.add_argument("--rpc-key")
    parser.add_argument("--rpc-ca")
    args = parser.parse_args()
    if not args.acl_management and args.config_file:
        # Consul reads `acl.tokens.initial_management` from its config when
        # it starts, and not on reload (it is not among the reloadable
        # settings: agent/agent.go reloadConfigInternal), so neither does
        # the fake.
        try:
            with open(args.config_file) as f:
                tokens = (json.load(f).get("acl") or {}).get("tokens") or {}
            args.acl_management = tokens.get("initial_management")
        except (OSError, ValueError):
            pass
    # Which datacenter this agent is in, and whether it is a secondary's
    # (`primary_datacenter` names another): Consul bootstraps ACLs, its
    # initial management token, in the primary only (agent/consul/leader.go,
    # initializeACLs: `if s.InPrimaryDatacenter()`; a secondary starts ACL
    # replication instead), yet enforces them all the same.
    conf = {}
    if args.config_file:
        try:
            with open(args.config_file) as f:
                conf = json.load(f)
        except (OSError, ValueError):
            pass
    my_dc = conf.get("datacenter") or "dc1"
    primary_dc = conf.get("primary_datacenter") or my_dc
    secondary = primary_dc != my_dc
    started = time.monotonic()
    body = json.dumps(agent_self(args.node, args.server, args.address)).encode()
    own = f"{args.address}:8300"
    leader = args.leader if args.leader is not None else (own if args.server else "")
    peers = args.peers.split(",") if args.peers else ([own] if args.server else [])
    status = {
        "/v1/status/leader": json.dumps(leader).encode(),
        "/v1/status/peers": json.dumps([p for p in peers if p]).encode(),
    }

    memory = {"lock": threading.Lock(), "state": {"tokens": {}, "policies": {}}}

    def cluster_state(update):
        """update(state) on the cluster's state: the shared ACL state with
        --acl-dir, else this agent's own, in memory."""
        if args.acl_dir:
            return acl_state(update)
        with memory["lock"]:
            return update(memory["state"])

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

    def visible(st, secret, dc=None):
        """The token `secret` as this datacenter resolves it. One --acl-dir
        may serve a primary and a secondary: global tokens and policies
        (written in, or forwarded to, the primary) are what a secondary
        replicates (`enable_token_replication`), while a token made with
        `Local: true` exists in the datacenter that made it only (Consul:
        ACLToken.Local; structs.ACLToken)."""
        token = st["tokens"].get(secret)
        if token and token.get("Local") and token.get("Datacenter", "dc1") != (dc or my_dc):
            return None
        return token

    def is_management(secret, dc=None):
        """Whether `secret` may do what a management token may: with
        --acl-dir, a token of the ACL state linked to Consul's built-in
        global-management policy (a restore replaces that state, and with it
        which tokens those are); else the --acl-management token."""
        if not args.acl_dir:
            return secret == args.acl_management
        token = acl_state(lambda st: visible(st, secret, dc))
        return bool(token) and any(
            p.get("ID") == GLOBAL_MANAGEMENT or p.get("Name") == "global-management"
            for p in token.get("Policies") or []
        )

    def allowed(secret, resource, name, access):
        """Whether `secret` grants `access` ("read" or "write") on
        `resource` `name` (agent, node, service, query): a management
        token, or a token whose policies' rules name it exactly
        (`service "web"`) or by prefix (`service_prefix ""`), write
        implying read (Consul's ACL rules language, acl/policy.go)."""
        if is_management(secret):
            return True
        pattern = r'(' + resource + r'|' + resource + r'_prefix)\s+"([^"]*)"\s*\{\s*policy\s*=\s*"(\w+)"'
        for rules in rules_of(secret):
            for kind, rule_name, policy in re.findall(pattern, rules):
                hit = rule_name == name if kind == resource else name.startswith(rule_name)
                if hit and (policy == "write" or (policy == "read" and access == "read")):
                    return True
        return False

    def acl_write(secret, dc=None):
        """acl:write in datacenter `dc` (this one by default): a management
        token, or a token whose policies say `acl = "write"`
        (acl/policy_authorizer.go, ACLWrite), as the replication token's
        do; Consul lets it write any token or policy."""
        if is_management(secret, dc):
            return True
        return any(re.search(r'(^|\n)\s*acl\s*=\s*"write"', rules) for rules in rules_of(secret, dc))

    def acl_write_here_or_primary(secret, forwarded):
        """A secondary forwards policy writes, and writes of tokens that are
        not local, to the primary, which resolves the token there
        (agent/consul/acl_endpoint.go: PolicySet, PolicyDelete, TokenSet and
        TokenDelete of a global token set `args.Datacenter` to the primary
        datacenter): a token local to the secondary is not found there."""
        return acl_write(secret, primary_dc if (secondary and forwarded) else None)

    def rules_of(secret, dc=None):
        """The rules of each policy of the token `secret` (none when this
        datacenter resolves no such token)."""
        def read(st):
            token = visible(st, secret, dc)
            if not token:
                return []
            names = {p.get("Name") for p in token.get("Policies") or []}
            return [p.get("Rules", "") for p in st["policies"].values() if p.get("Name") in names]
        return acl_state(read)

    def enforced():
        """Whether endpoints needing management refuse other tokens: with
        an initial management token, or in a secondary (ACLs on, made by
        the primary)."""
        return bool(args.acl_management) or secondary

    def agent_write(secret):
        return allowed(secret, "agent", args.node, "write")

    def request_token(handler):
        """The request's token, or the agent's default token
        (`acl.tokens.default` of its config) when it carries none."""
        token = handler.headers.get("X-Consul-Token", "")
        if token or not args.config_file:
            return token
        with open(args.config_file) as f:
            return ((json.load(f).get("acl") or {}).get("tokens") or {}).get("default", "")

    def bootstrap(st):
        # A new leader sets up the Connect CA when the state has none
        # (agent/consul/leader_connect_ca.go, initializeRootCA); a restore
        # brings the snapshot's roots, which stay.
        st.setdefault("connect_ca", {"ActiveRootID": str(uuid.uuid4())})
        if not args.acl_management or secondary:
            return
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

    cluster_state(bootstrap)

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
                archive = consul_archive(FSM_HEADER + json.dumps(state).encode())
                return self.reply(200, archive, "application/x-gzip")
            if path == "/v1/operator/keyring" and args.keyring_data_dir:
                # Consul answers for every live member: the LAN pool, and
                # the servers' WAN pool (agent/operator_endpoint.go).
                members = live_members()
                pools = [(False, members), (True, [m for m in members if m["server"]])]
                reply = []
                for wan, pool in pools:
                    if wan and not pool:
                        continue
                    keys, primary = {}, {}
                    for m in pool:
                        for k in m["keys"]:
                            keys[k] = keys.get(k, 0) + 1
                        primary[m["primary"]] = primary.get(m["primary"], 0) + 1
                    reply.append({"WAN": wan, "Datacenter": "dc1", "Segment": "", "Partition": "",
                                  "Keys": keys, "PrimaryKeys": primary, "NumNodes": len(pool)})
                return self.reply(200, json.dumps(reply).encode(), "application/json")
            if path == "/_members" and args.keyring_data_dir:
                return self.reply(200, json.dumps(live_members()).encode(), "application/json")
            if path.startswith("/v1/catalog/service/") and args.acl_dir:
                # ACL filtering (agent/consul/acl.go, filterServiceNodes):
                # an entry is shown only with service:read on it and
                # node:read on its node; default deny shows nothing.
                name = path[len("/v1/catalog/service/"):]
                token = request_token(self)
                entries = cluster_state(lambda st: list((st.get("catalog") or {}).get(name, [])))
                shown = [e for e in entries
                         if allowed(token, "service", name, "read") and allowed(token, "node", e["Node"], "read")]
                return self.reply(200, json.dumps(shown).encode(), "application/json")
            if path == "/v1/agent/connect/ca/roots":
                ca = cluster_state(lambda st: st["connect_ca"])
                roots = {"ActiveRootID": ca["ActiveRootID"], "TrustDomain": "11111111-2222-3333-4444-555555555555.consul",
                         "Roots": [{"ID": ca["ActiveRootID"], "Name": "Consul CA Primary Cert", "Active": True}]}
                return self.reply(200, json.dumps(roots).encode(), "application/json")
            if path == "/v1/catalog/datacenters":
                dcs = args.datacenters.split(",") if args.datacenters else [my_dc]
                return self.reply(200, json.dumps(dcs).encode(), "application/json")
            if path == "/v1/operator/autopilot/configuration":
                conf = cluster_state(lambda st: st.get("autopilot"))
                if conf is None:
                    return self.reply(404, b"autopilot configuration not set", "text/plain")
                return self.reply(200, json.dumps(conf).encode(), "application/json")
            if path == "/v1/snapshot" and args.snapshot_file:
                if enforced() and not is_management(self.headers.get("X-Consul-Token", "")):
                    return self.reply(403, b"Permission denied", "text/plain")
                size = os.path.getsize(args.snapshot_file)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-gzip")
                self.send_header("X-Consul-Index", "42")
                if args.snapshot_cut_at is None:
                    self.send_header("Content-Length", str(size))
                self.end_headers()
                left = size if args.snapshot_cut_at is None else min(size, args.snapshot_cut_at)
                with open(args.snapshot_file, "rb") as f:
                    while left > 0:
                        chunk = f.read(min(1 << 20, left))
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        left -= len(chunk)
                if args.snapshot_cut_at is not None:
                    msg = b"failed to stream snapshot: leadership lost while committing log"
                    self.wfile.write(b"\x82\xa9ErrorCode\xcd\x01\xf4\xa8ErrorMsg\xd9" + bytes([len(msg)]) + msg)
                    self.close_connection = True
                return
            if path.startswith("/v1/acl/policy/name/") and args.acl_dir:
                # acl:read (agent/acl_endpoint.go ACLPolicyReadByName); a
                # policy the state lacks: 404 "ACL policy not found".
                if not is_management(self.headers.get("X-Consul-Token", "")):
                    return self.reply(403, b"Permission denied: token lacks acl:read", "text/plain")
                name = path[len("/v1/acl/policy/name/"):]
                policy = acl_state(lambda st: st["policies"].get(name))
                if policy is None:
                    return self.reply(404, b"ACL policy not found", "text/plain")
                return self.reply(200, json.dumps(policy).encode(), "application/json")
            if path == "/v1/acl/token/self" and args.acl_dir:
                # Consul: the token the request carries, or 403 "ACL not found".
                secret = self.headers.get("X-Consul-Token", "")
                token = acl_state(lambda st: visible(st, secret))
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
        if path == "/_fake/leadership":
            # This server wins an election: Consul's leader actions run
            # (leader.go, establishLeadership -> initializeACLs), with the
            # initial management token it read at its start.
            cluster_state(bootstrap)
            return self.reply(200, b"true", "application/json")
        if path in ("/v1/acl/policy", "/v1/acl/token") and args.acl_dir:
            length = int(self.headers.get("Content-Length") or 0)
            req = json.loads(self.rfile.read(length) or b"{}")
            forwarded = path == "/v1/acl/policy" or not req.get("Local")
            if not acl_write_here_or_primary(self.headers.get("X-Consul-Token", ""), forwarded):
                return self.reply(403, b"Permission denied: token lacks acl:write", "text/plain")
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
                    if req.get("Local"):
                        token["Datacenter"] = my_dc
                    st["tokens"][secret] = token
                    return token
                made = acl_state(put_token)
                if made is None:
                    return self.reply(500, b"Invalid Token: SecretID is already in use", "text/plain")
            acl_log({"path": path, "by": args.node, "body": req})
            return self.reply(200, json.dumps(made).encode(), "application/json")
        if path == "/v1/operator/autopilot/configuration":
            # operator:write (agent/operator_endpoint.go); the body decoded
            # onto zero values, stored whole.
            if enforced() and not is_management(self.headers.get("X-Consul-Token", "")):
                return self.reply(403, b"Permission denied", "text/plain")
            length = int(self.headers.get("Content-Length") or 0)
            conf = json.loads(self.rfile.read(length) or b"{}")

            def put_conf(st):
                st["autopilot"] = conf
            cluster_state(put_conf)
            if args.acl_dir:
                acl_log({"path": path, "by": args.node, "body": conf})
            return self.reply(200, b"true", "application/json")
        if path == "/v1/snapshot" and args.restore_dir:
            if enforced() and not is_management(self.headers.get("X-Consul-Token", "")):
                return self.reply(403, b"Permission denied", "text/plain")
            return restore(self)
        if args.token is not None and self.headers.get("X-Consul-Token") != args.token:
            return self.reply(403, b"Permission denied", "text/plain")
        if path == "/v1/operator/keyring" and args.keyring_data_dir:
            return keyring_op(self, "PUT")
        if path in ("/v1/catalog/register", "/v1/catalog/deregister") and args.acl_dir:
            # node:write on the node named (agent/consul/catalog_endpoint.go:
            # vetRegisterWithACL asks it when the register changes the node
            # itself, a node new to the catalog or another address;
            # vetDeregisterWithACL for a node's deregistration, no ServiceID
            # or CheckID); Consul's words on a denial. Service and check
            # entries (service:write) are not served here.
            length = int(self.headers.get("Content-Length") or 0)
            req = json.loads(self.rfile.read(length) or b"{}")
            node = req.get("Node", "")
            if req.get("ServiceID") or req.get("CheckID") or req.get("Service") or req.get("Check"):
                return self.reply(400, b"the fake serves node entries only", "text/plain")
            known = cluster_state(lambda st: (st.get("nodes") or {}).get(node))
            changes = path.endswith("/deregister") or known is None \
                or known.get("Address") != req.get("Address", "")
            if changes and not allowed(request_token(self), "node", node, "write"):
                msg = f'Permission denied: token lacks permission \'node:write\' on "{node}"'
                return self.reply(403, msg.encode(), "text/plain")

            def catalog(st):
                nodes = st.setdefault("nodes", {})
                if path.endswith("/deregister"):
                    nodes.pop(node, None)
                else:
                    nodes[node] = {"Node": node, "Address": req.get("Address", "")}
            cluster_state(catalog)
            return self.reply(200, b"true", "application/json")
        if path == "/v1/agent/service/register" and args.acl_dir:
            # service:write on the service's name (agent_endpoint.go,
            # AgentRegisterService: vetServiceRegister).
            length = int(self.headers.get("Content-Length") or 0)
            svc = json.loads(self.rfile.read(length) or b"{}")
            name = svc.get("Name", "")
            if not allowed(request_token(self), "service", name, "write"):
                msg = f'Permission denied: token lacks permission \'service:write\' on "{name}"'
                return self.reply(403, msg.encode(), "text/plain")

            def register(st):
                entries = st.setdefault("catalog", {}).setdefault(name, [])
                entries[:] = [e for e in entries if e["Node"] != args.node]
                entries.append({"Node": args.node, "Address": args.address, "ServiceName": name,
                                "ServiceID": svc.get("ID", name), "ServicePort": svc.get("Port", 0)})
            cluster_state(register)
            return self.reply(200, b"", "text/plain")
        if path == "/v1/agent/reload":
            # agent:write (agent_endpoint.go AgentReload); with ACLs, a
            # management token here.
            if enforced() and not is_management(self.headers.get("X-Consul-Token", "")):
                return self.reply(403, b"Permission denied", "text/plain")
            try:
                rpc["load"]()
            except (OSError, ssl.SSLError) as e:
                return self.reply(500, f"Failed reloading: {e}".encode(), "text/plain")
            return self.reply(200, b"", "text/plain")
        if path in ("/v1/agent/leave",) or path.startswith("/v1/agent/join/"):
            # agent:write on this agent's node name (agent_endpoint.go,
            # AgentLeave and AgentJoin: AgentWriteAllowed(NodeName)).
            if args.acl_dir and not agent_write(self.headers.get("X-Consul-Token", "")):
                msg = f'Permission denied: token lacks permission \'agent:write\' on "{args.node}"'
                return self.reply(403, msg.encode(), "text/plain")
        if path == "/v1/agent/leave" and args.leave_file:
            with open(args.leave_file, "w") as f:
                f.write("left\n")
            return self.reply(200, b"", "text/plain")
        if path.startswith("/v1/agent/join/") and args.join_file:
            # `?wan=1` (what `consul join -wan` sends; agent_endpoint.go
            # AgentJoin): a join of the WAN pool, logged as "wan <addr>".
            wan = "wan=1" in (self.path.split("?", 1)[1] if "?" in self.path else "")
            with open(args.join_file, "a") as f:
                f.write(("wan " if wan else "") + path[len("/v1/agent/join/"):] + "\n")
            return self.reply(200, b"", "text/plain")
        self.reply(404, b"404 page not found", "text/plain")

    def restore(handler):
        length = int(handler.headers.get("Content-Length") or 0)
        with open(os.path.join(args.restore_dir, "started.jsonl"), "a") as f:
            f.write(json.dumps({"by": args.node, "size": length}) + "\n")
        digest, body = hashlib.sha256(), bytearray()
        # Paced (a test that cuts a restore mid-body): small reads from a
        # small receive buffer, so that what the client sent before it was
        # killed is mostly still in its own send buffer, which the kernel
        # drops; the server sees a short body, as Consul would.
        step = 1 << 20
        if args.restore_pace_ms:
            step = 256 << 10
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        cut = os.path.join(args.restore_dir, "cut")
        while len(body) < length:
            # A killed client's socket lives on in the kernel and may still
            # deliver all it had buffered: a test that means the stream to
            # break says so with <restore-dir>/cut.
            if args.restore_pace_ms and os.path.exists(cut):
                break
            try:
                chunk = handler.rfile.read(min(step, length - len(body)))
            except OSError:
                break
            if not chunk:
                break
            digest.update(chunk)
            body.extend(chunk)
            if args.restore_pace_ms:
                time.sleep(args.restore_pace_ms / 1000)
        entry = {"by": args.node, "size": len(body), "sha256": digest.hexdigest()}

        def record(name, **more):
            with open(os.path.join(args.restore_dir, name), "a") as f:
                f.write(json.dumps(dict(entry, **more)) + "\n")

        if len(body) != length or length == 0:
            # Consul drops a restore whose stream breaks.
            record("aborted.jsonl")
            handler.close_connection = True
            return
        try:
            state_bin = read_archive(body)
            if time.monotonic() - started < args.restore_refuse_s:
                raise Refusal(
                    "Raft error when restoring snapshot: cannot restore snapshot now, wait until the "
                    "configuration entry at 7 has been applied (have applied 5)")
            if not state_bin.startswith(FSM_HEADER):
                # Consul's FSM cannot decode it (fsm.go, Restore).
                raise Refusal(
                    "Raft error when restoring snapshot: failed to restore snapshot 2-42-1700000000000: "
                    "failed to decode snapshot header: msgpack decode error")
        except Refusal as why:
            record("refused.jsonl", reason=str(why))
            return handler.reply(500, str(why).encode(), "text/plain")
        try:
            restored = json.loads(state_bin[len(FSM_HEADER):])
        except ValueError:
            restored = None
        if not isinstance(restored, dict) or "tokens" not in restored:
            # Opaque state (a test's bytes): a cluster state of its own.
            restored = {"tokens": {}, "policies": {}, "opaque_sha256": hashlib.sha256(state_bin).hexdigest()}

        # The restored state replaces the cluster's state (the Connect CA's
        # roots and autopilot's settings with it), as Consul's does; then
        # Consul re-runs its leader actions.
        def replace(st):
            st.clear()
            st.update(restored)
            bootstrap(st)
        cluster_state(replace)
        record("restores.jsonl")
        handler.reply(200, b"", "text/plain")

    rpc = {"ctx": None}

    def load_rpc_tls():
        if not args.rpc_port:
            return
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(args.rpc_cert, args.rpc_key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(args.rpc_ca)
        rpc["ctx"] = ctx

    rpc["load"] = load_rpc_tls

    def serve_rpc():
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((args.address, args.rpc_port))
        listener.listen(16)
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=rpc_conn, args=(conn,), daemon=True).start()

    def rpc_conn(conn):
        try:
            conn.settimeout(10)
            if conn.recv(1) != b"\x03":
                return conn.close()
            tls = rpc["ctx"].wrap_socket(conn, server_side=True)
            tls.recv(1)
            tls.close()
        except (OSError, ssl.SSLError):
            conn.close()

    if args.rpc_port:
        load_rpc_tls()
        threading.Thread(target=serve_rpc, daemon=True).start()

    def read_ring():
        """The keys a Consul started now uses (agent/keyring.go,
        setupBaseKeyrings): serf/local.keyring when it exists (then
        `encrypt` is ignored), else the config's `encrypt`."""
        ring = os.path.join(args.keyring_data_dir, "serf", "local.keyring")
        if os.path.exists(ring):
            with open(ring) as f:
                return json.load(f)
        with open(args.keyring_config) as f:
            key = json.load(f).get("encrypt")
        return [key] if key else []

    def alive(pid):
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False

    def live_members():
        return cluster_state(lambda st: [
            dict(m, node=n) for n, m in sorted(st.get("members", {}).items()) if alive(m["pid"])])

    def keyring_op(handler, method):
        """Install (POST), use (PUT), remove (DELETE) on every live member,
        each member's keyring file rewritten as serf rewrites it; refused
        as memberlist refuses (keyring.go: UseKey "Requested key is not in
        the keyring", RemoveKey "Removing the primary key is not allowed")."""
        if enforced() and not is_management(handler.headers.get("X-Consul-Token", "")):
            return handler.reply(403, b"Permission denied", "text/plain")
        length = int(handler.headers.get("Content-Length") or 0)
        key = json.loads(handler.rfile.read(length) or b"{}").get("Key", "")

        def op(st):
            errors = []
            for node, m in st.get("members", {}).items():
                if not alive(m["pid"]):
                    continue
                if method == "POST" and key not in m["keys"]:
                    m["keys"].append(key)
                elif method == "PUT":
                    if key not in m["keys"]:
                        errors.append(f"{node}: Requested key is not in the keyring")
                        continue
                    m["primary"] = key
                elif method == "DELETE":
                    if m["primary"] == key:
                        errors.append(f"{node}: Removing the primary key is not allowed")
                        continue
                    m["keys"] = [k for k in m["keys"] if k != key]
                ordered = [m["primary"]] + [k for k in m["keys"] if k != m["primary"]]
                ring = os.path.join(m["data_dir"], "serf", "local.keyring")
                os.makedirs(os.path.dirname(ring), exist_ok=True)
                with open(ring, "w") as f:
                    json.dump(ordered, f)
            return errors

        errors = cluster_state(op)
        if errors:
            msg = f"{len(errors)} error(s) occurred:\n" + "\n".join(f"\t* {e}" for e in errors)
            return handler.reply(500, msg.encode(), "text/plain")
        return handler.reply(200, b"", "text/plain")

    if args.keyring_data_dir:
        ring = read_ring()

        def join(st):
            st.setdefault("members", {})[args.node] = {
                "keys": list(ring), "primary": ring[0] if ring else "", "pid": os.getpid(),
                "server": args.server, "data_dir": args.keyring_data_dir}
        cluster_state(join)

    Handler.do_PUT = do_PUT

    def do_POST(self):
        if self.path.split("?")[0] == "/v1/operator/keyring" and args.keyring_data_dir:
            return keyring_op(self, "POST")
        self.reply(404, b"404 page not found", "text/plain")

    def do_DELETE(self):
        path = self.path.split("?")[0]
        if path == "/v1/operator/keyring" and args.keyring_data_dir:
            return keyring_op(self, "DELETE")
        if path.startswith("/v1/acl/policy/") and args.acl_dir:
            # acl:write (agent/acl_endpoint.go ACLPolicyDelete); 200 "true".
            if not acl_write_here_or_primary(self.headers.get("X-Consul-Token", ""), True):
                return self.reply(403, b"Permission denied: token lacks acl:write", "text/plain")
            pid = path[len("/v1/acl/policy/"):]

            def delete_policy(st):
                gone = [k for k, p in st["policies"].items() if p.get("ID") == pid]
                for k in gone:
                    del st["policies"][k]
                return gone
            gone = acl_state(delete_policy)
            acl_log({"path": path, "by": args.node, "method": "DELETE", "deleted": len(gone)})
            return self.reply(200, b"true", "application/json")
        if path.startswith("/v1/acl/token/") and args.acl_dir:
            # acl:write (agent/acl_endpoint.go ACLTokenDelete); 200 "true".
            accessor = path[len("/v1/acl/token/"):]
            target = acl_state(lambda st: next(
                (t for t in st["tokens"].values() if t.get("AccessorID") == accessor), {}))
            if not acl_write_here_or_primary(self.headers.get("X-Consul-Token", ""), not target.get("Local")):
                return self.reply(403, b"Permission denied: token lacks acl:write", "text/plain")

            def delete(st):
                gone = [k for k, t in st["tokens"].items() if t.get("AccessorID") == accessor]
                for k in gone:
                    del st["tokens"][k]
                return gone
            gone = acl_state(delete)
            acl_log({"path": path, "by": args.node, "method": "DELETE", "deleted": len(gone)})
            return self.reply(200, b"true", "application/json")
        self.reply(404, b"404 page not found", "text/plain")

    Handler.do_POST = do_POST
    Handler.do_DELETE = do_DELETE
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
