#!/usr/bin/env bash
# smoke.sh DEB
#
# The live-systemd scenarios, by hand: a reference for the Rust test and a
# way to run them without cargo. Needs root, a Python with moto[server]
# (AUTO_CONSUL_TEST_PYTHON, else ~/.cache/auto-consul-venv/bin/python),
# cloud-init on the host (for `cloud-init schema`), and DEB, the package
# `cargo deb` built. Prints each phase's time and each check's PASS/FAIL;
# exits 1 when a check failed. Cleans up every container and process it
# started (AUTO_CONSUL_LIVE_KEEP=1 keeps the run directory for a look).
#
# Scenarios, one registry prefix each where they must not meet:
#   c1  packaged Consul, bootstrap server (AUTO_CONSUL_SERVERS=1)
#   c2  packaged Consul, agent of c1's cluster (Type=notify)
#       `cluster set --expiry 45` from c1: its heartbeat rewrites the timer
#   c1  reboot from inside: mode and slot kept, no bootstrap again
#   c2  spot interruption notice, then shutdown: leaves before Consul stops
#   c1  autoscaling lifecycle Terminated, then shutdown: slot released
#   c3  Consul from a zip (no /etc/consul.d, no consul.service, no user)
#   all no journal line with a sandbox or chroot failure, no failed
#       auto-consul unit
set -euo pipefail
deb=$(realpath "${1:?usage: smoke.sh DEB}")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$(dirname "$here")")
py=${AUTO_CONSUL_TEST_PYTHON:-$HOME/.cache/auto-consul-venv/bin/python}
tree=${AUTO_CONSUL_LIVE_TREE:-$HOME/.cache/auto-consul-nspawn/bookworm}
run=$(mktemp -d /tmp/auto-consul-live.XXXXXX)
bucket=live-registry
failures=0
started_pids=()
containers=()

cleanup() {
  local w p
  for w in "${containers[@]}"; do "$here/stop.sh" "$w" || true; done
  for p in "${started_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -z "${AUTO_CONSUL_LIVE_KEEP:-}" ]; then
    for d in "$run"/img-*; do [ -d "$d" ] && rm -rf "$d"; done
    rm -rf "$run"
  else
    echo "kept: $run"
  fi
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { printf '%.1fs' "$(echo "$(now) - $1" | bc)"; }
check() { # check DESCRIPTION COMMAND...
  local desc=$1; shift
  if "$@" >"$run/check.out" 2>&1; then
    echo "PASS $desc"
  else
    echo "FAIL $desc"; sed 's/^/     /' "$run/check.out" | tail -n 20
    failures=$((failures + 1))
  fi
}
# wait_for SECONDS COMMAND...: until COMMAND succeeds.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}
in_ct() { "$here/exec.sh" "$@"; }
# Inside, with the env file loaded (an operator's shell on the instance).
ac() { local w=$1; shift; in_ct "$w" sh -c 'set -a; . /etc/auto-consul/auto-consul.env; set +a; exec auto-consul "$@"' ac "$@"; }
show() { in_ct "$1" systemctl show -P "$3" "$2"; }
is() { [ "$(show "$1" "$2" "$3")" = "$4" ] || { echo "$2 $3=$(show "$1" "$2" "$3"), not $4"; return 1; }; }

# moto: its S3 (the registry, shared) and EC2; one more per container for
# IMDS, each with its own identity and termination notices.
start_moto() { # start_moto NAME: started now, its port read by moto_port
  "$py" "$repo/tests/support/moto_locked.py" >"$run/$1.out" 2>"$run/$1.err" </dev/null &
  started_pids+=($!)
}
moto_port() { # moto_port NAME: waits for PORT=, writes $run/NAME.port
  wait_for 60 grep -q '^PORT=' "$run/$1.out" || { echo "moto $1 did not start" >&2; cat "$run/$1.err" >&2; exit 1; }
  sed -n 's/^PORT=//p' "$run/$1.out" >"$run/$1.port"
}
port() { cat "$run/$1.port"; }
# S3 without a signer: moto wants an Authorization header, not a valid one.
s3() { curl -sf -H 'Authorization: AWS4-HMAC-SHA256 Credential=testing/20200101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0' "$@"; }
keys() { s3 "http://127.0.0.1:$(port s3)/$bucket?list-type=2&prefix=$1" | grep -o '<Key>[^<]*</Key>' | sed 's/<[^>]*>//g'; }
object() { s3 "http://127.0.0.1:$(port s3)/$bucket/$1"; }
imds_set() { curl -sf -X POST "http://127.0.0.1:$(port "$1")/_imds" -d "$2" >/dev/null; }

t=$(now)
"$here/tree.sh" "$tree"
echo "phase tree: $(since "$t")"

t=$(now)
"$here/image.sh" "$tree" "$run/img-packaged" packaged "$deb"
"$here/image.sh" "$tree" "$run/img-zip" zip "$deb"
echo "phase images: $(since "$t")"

t=$(now)
for m in s3 imds1 imds2 imds3; do start_moto "$m"; done
for m in s3 imds1 imds2 imds3; do moto_port "$m"; done
curl -sf -X PUT "http://127.0.0.1:$(port s3)/$bucket" >/dev/null
# Three instances EC2 knows, for the nodes' identities (the witness rule and
# retry_join ask EC2 about them).
"$py" - "$(port s3)" >"$run/instances" <<'PY'
import sys, boto3
ec2 = boto3.client("ec2", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1",
                   aws_access_key_id="testing", aws_secret_access_key="testing")
tags = [{"ResourceType": "instance", "Tags": [{"Key": "auto-consul:cluster", "Value": "live"}]}]
for i in ec2.run_instances(ImageId="ami-12c6146b", MinCount=3, MaxCount=3, TagSpecifications=tags)["Instances"]:
    print(i["InstanceId"], i["PrivateIpAddress"])
PY
echo "phase moto: $(since "$t")"

# new_container N IMDS PREFIX HTTPPORT [KEY=VALUE...]: WORKDIR $run/cN with
# user data from the template and meta-data naming instance N.
new_container() {
  local n=$1 imds=$2 prefix=$3 http=$4; shift 4
  local w="$run/c$n" id ip
  read -r id ip < <(sed -n "${n}p" "$run/instances")
  mkdir -p "$w/seed"
  imds_set "$imds" "{\"/latest/meta-data/instance-id\": \"$id\", \"/latest/meta-data/local-ipv4\": \"$ip\"}"
  "$here/userdata.sh" "s3://$bucket/$prefix" \
    AWS_ENDPOINT_URL="http://127.0.0.1:$(port s3)" \
    AWS_EC2_METADATA_SERVICE_ENDPOINT="http://127.0.0.1:$(port "$imds")" \
    CONSUL_HTTP_ADDR="127.0.0.1:$http" "$@" >"$w/seed/user-data"
  printf 'instance-id: %s\nlocal-hostname: c%s\n' "$id" "$n" >"$w/seed/meta-data"
  echo "$id" >"$w/instance-id"
  cloud-init schema -c "$w/seed/user-data" >/dev/null
  containers+=("$w")
}
boot() { # boot IMAGE N: boots, then waits for cloud-init
  local t; t=$(now)
  "$here/boot.sh" "$1" "c$2" "$run/c$2"
  echo "phase boot c$2: $(since "$t")"
  in_ct "$run/c$2" cloud-init status --wait >/dev/null || true
  echo "phase cloud-init c$2 (from boot): $(since "$t")"
}
common_checks() { # common_checks W
  local w=$1
  check "$(basename "$w"): cloud-init done, no errors" in_ct "$w" cloud-init status
  check "$(basename "$w"): auto-consul.service succeeded" is "$w" auto-consul.service Result success
  check "$(basename "$w"): auto-consul.service active" is "$w" auto-consul.service ActiveState active
  check "$(basename "$w"): auto-consul.service never restarted" is "$w" auto-consul.service NRestarts 0
  check "$(basename "$w"): consul.service running" is "$w" consul.service SubState running
  check "$(basename "$w"): heartbeat timer active" is "$w" auto-consul-heartbeat.timer ActiveState active
  check "$(basename "$w"): leave unit active" is "$w" auto-consul-leave.service ActiveState active
}
heartbeat_seen() { keys "$1" | grep -q "$2"; }
not() { ! "$@"; }
# has KEY TEXT...: the registry object KEY holds every TEXT.
has() {
  local body x
  body=$(object "$1"); shift
  for x in "$@"; do grep -qF -- "$x" <<<"$body" || { echo "$body"; return 1; }; done
}

# --- c1: packaged Consul, bootstrap server --------------------------------
new_container 1 imds1 consul/live 18501 AUTO_CONSUL_SERVERS=1 AUTO_CONSUL_SECRETS=ssm:///auto-consul/live AUTO_CONSUL_INSTANCE_TAG=auto-consul:cluster=live
boot "$run/img-packaged" 1
c1="$run/c1"; id1=$(cat "$c1/instance-id")
common_checks "$c1"
check "c1: runs as bootstrap" in_ct "$c1" grep -q '"mode": "bootstrap"' /var/lib/auto-consul/state.json
check "c1: consul.service Type=exec (a lone bootstrap server)" is "$c1" consul.service Type exec
check "c1: registry has a cluster record naming c1" has consul/live/cluster "\"bootstrap_node\":\"$id1\""
check "c1: slot 0 is c1's" has consul/live/slots/server-0 "\"instance_id\":\"$id1\"" '"released":false'
check "c1: heartbeat published (servers/)" wait_for 20 heartbeat_seen consul/live/servers/ "$id1"
check "c1: auto-consul status healthy" ac "$c1" status
# Secrets made at genesis in SSM (moto): gossip key, ACLs, TLS from its CA.
cfg=/etc/consul.d/zz-auto-consul.json
tlsdir=etc/consul.d/auto-consul-tls
check "c1: ACLs default deny, gossip key set (secrets from SSM)" in_ct "$c1" sh -c "grep -q '\"default_policy\": \"deny\"' $cfg && grep -q '\"encrypt\"' $cfg"
check "c1: its certificate verifies against the cluster's CA" openssl verify -CAfile "$c1/root/$tlsdir/ca.pem" "$c1/root/$tlsdir/server.pem"
# The leader's snapshot, by its sandboxed unit (the management token from SSM).
check "c1: snapshot timer active (a server)" is "$c1" auto-consul-snapshot.timer ActiveState active
in_ct "$c1" systemctl start auto-consul-snapshot.service || true
check "c1: snapshot unit succeeded" is "$c1" auto-consul-snapshot.service Result success
snapshot_saved() { keys consul/live/snapshots/ | grep -q "\.snap$"; }
check "c1: the leader's snapshot is in the registry" wait_for 20 snapshot_saved
snapshot_matches() {
  local key; key=$(keys consul/live/snapshots/ | grep '\.snap$' | tail -n 1)
  [ -n "$key" ] && [ "$(object "$key" | sha256sum)" = "$(sha256sum < "$c1/root/opt/consul/fake-consul-snapshot")" ]
}
check "c1: the snapshot is the agent's bytes" snapshot_matches

# --- c2: packaged Consul, agent ---------------------------------------------
new_container 2 imds2 consul/live 18502 AUTO_CONSUL_SERVERS=1 AUTO_CONSUL_SECRETS=ssm:///auto-consul/live AUTO_CONSUL_INSTANCE_TAG=auto-consul:cluster=live
boot "$run/img-packaged" 2
c2="$run/c2"; id2=$(cat "$c2/instance-id")
common_checks "$c2"
check "c2: runs as agent" in_ct "$c2" grep -q '"mode": "agent"' /var/lib/auto-consul/state.json
check "c2: no snapshot units on an agent" not in_ct "$c2" test -e /etc/systemd/system/auto-consul-snapshot.timer
check "c2: consul.service Type=notify, started (READY=1)" is "$c2" consul.service Type notify
check "c2: heartbeat published (agents/)" wait_for 20 heartbeat_seen consul/live/agents/ "$id2"
gossip() { in_ct "$1" grep '"encrypt"' "$cfg"; }
check "c2: the same gossip key as c1" test "$(gossip "$c1")" = "$(gossip "$c2")"
check "c2: no CA key or management token on the agent" not grep -rq -e 'PRIVATE KEY' -e initial_management "$c2/root/etc/consul.d"
# A token of its own (AUTO_CONSUL_INSTANCE_TAG): made ahead by c1's
# heartbeat, or moved to by c2's own heartbeat (config, then a reload).
own_token() { in_ct "$c2" systemctl start auto-consul-heartbeat.service; in_ct "$c2" grep -qx node /var/lib/auto-consul/agent-token-kind; }
check "c2: runs with a token of its own" wait_for 60 own_token
agent_token() { in_ct "$1" python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["acl"]["tokens"]["agent"])' "$cfg"; }
check "c2: its token is not the shared agents' token" test "$(agent_token "$c2")" != "$(ac "$c1" secrets get agent-token)"
check "c2: its token's policy names it alone" grep -qF "auto-consul-node-$id2" "$c1/root/opt/consul/fake-consul-acl/acl-state.json"

# --- cluster set --expiry 45: c1's heartbeat follows it ----------------------
check "cluster set --expiry 45" ac "$c1" cluster set --expiry 45
in_ct "$c1" systemctl start auto-consul-heartbeat.service || true
check "c1: heartbeat timer rewritten to 15s" in_ct "$c1" grep -q '^OnUnitActiveSec=15s' /etc/systemd/system/auto-consul-heartbeat.timer
check "c1: timer running the new interval" in_ct "$c1" sh -c 'systemctl show -P TimersMonotonic auto-consul-heartbeat.timer | grep -q "OnUnitActiveUSec=15s"'

# --- c1: reboot --------------------------------------------------------------
t=$(now)
"$here/reboot.sh" "$c1"
echo "phase reboot c1: $(since "$t")"
check "c1 after reboot: auto-consul.service succeeded" is "$c1" auto-consul.service Result success
check "c1 after reboot: consul.service running" is "$c1" consul.service SubState running
check "c1 after reboot: now a plain server (Raft state)" in_ct "$c1" grep -q '"mode": "server"' /var/lib/auto-consul/state.json
check "c1 after reboot: no bootstrap in the config" not in_ct "$c1" grep -q '"bootstrap": true' /etc/consul.d/zz-auto-consul.json
check "c1 after reboot: slot 0 still c1's, not released" has consul/live/slots/server-0 "\"instance_id\":\"$id1\"" '"released":false'
check "c1 after reboot: the expiry hint names the env file, not undoing cluster set" in_ct "$c1" sh -c 'journalctl -b 0 -u auto-consul.service --no-pager | grep -q "set AUTO_CONSUL_EXPIRY=45 in /etc/auto-consul/auto-consul.env"'
check "c1 after reboot: runcmd not run again" not in_ct "$c1" sh -c 'journalctl -b 0 --no-pager | grep "cloud-init.*auto-consul.service"'

# --- c1: management token rotation: its heartbeat restarts Consul ----------
# A lone server, the leader: it names itself, restarts consul.service with
# the new initial_management, then deletes the old token.
mgmt() { in_ct "$c1" python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["acl"]["tokens"]["initial_management"])' "$cfg"; }
old_mgmt=$(mgmt)
inv=$(show "$c1" consul.service InvocationID)
check "c1: secrets rotate management-token" ac "$c1" secrets rotate management-token
rotated() { in_ct "$c1" systemctl start auto-consul-heartbeat.service; has consul/live/cluster '"management_token":{"generation":2}'; }
check "c1: its heartbeats finish the rotation" wait_for 60 rotated
check "c1: consul.service restarted by the heartbeat" test "$(show "$c1" consul.service InvocationID)" != "$inv"
check "c1: consul.service running after the restart" is "$c1" consul.service SubState running
check "c1: its config holds generation 2 of the management token" test "$(mgmt)" = "$(ac "$c1" secrets get management-token)"
check "c1: the old management token is deleted" not grep -qF "$old_mgmt" "$c1/root/opt/consul/fake-consul-acl/acl-state.json"
check "c1: the new one is in the ACL state" grep -qF "$(mgmt)" "$c1/root/opt/consul/fake-consul-acl/acl-state.json"

# --- c2: spot interruption, then shutdown -----------------------------------
imds_set imds2 '{"/latest/meta-data/spot/instance-action": "{\"action\": \"terminate\", \"time\": \"2030-01-01T00:00:00Z\"}"}'
t=$(now)
"$here/stop.sh" --keep "$c2"
echo "phase stop c2: $(since "$t")"
check "c2: left at shutdown (spot notice)" grep -q 'a spot interruption notice' "$c2/journal.txt"
# The stopped container's disk: the overlay's upper dir, or the copy.
disk() { if [ -d "$1/upper" ]; then echo "$1/upper"; else echo "$1/root"; fi; }
check "c2: the agent got the leave" test -e "$(disk "$c2")/opt/consul/fake-consul-left"
check "c2: its heartbeats are gone" not heartbeat_seen consul/live/agents/ "$id2"

# --- c1: autoscaling termination, then shutdown -----------------------------
imds_set imds1 '{"/latest/meta-data/autoscaling/target-lifecycle-state": "Terminated"}'
t=$(now)
"$here/stop.sh" --keep "$c1"
echo "phase stop c1: $(since "$t")"
check "c1: left at shutdown (lifecycle Terminated)" grep -q 'the autoscaling group is terminating this instance' "$c1/journal.txt"
check "c1: slot 0 released" has consul/live/slots/server-0 '"released":true'
# The last boot's shutdown: the leave unit is done before consul.service stops.
check "c1: leave ran before Consul stopped" awk '/auto-consul-leave.service: Deactivated/ {l=NR} /Stopping consul.service/ {c=NR} END {exit !(l && c && l < c)}' "$c1/journal.txt"

# --- c3: Consul from a zip --------------------------------------------------
# Its config dir is a custom one that does not exist either.
new_container 3 imds3 consul/zip 18503 AUTO_CONSUL_SERVERS=1 AUTO_CONSUL_CONFIG_DIR=/srv/consul/conf
boot "$run/img-zip" 3
c3="$run/c3"
common_checks "$c3"
check "c3: consul.service is auto-consul's" in_ct "$c3" test -f /etc/systemd/system/consul.service
check "c3: the consul user was created" in_ct "$c3" getent passwd consul
check "c3: its config in the custom config dir" in_ct "$c3" test -s /srv/consul/conf/zz-auto-consul.json
check "c3: no /etc/consul.d made" not in_ct "$c3" test -e /etc/consul.d
t=$(now)
"$here/stop.sh" --keep "$c3"
echo "phase stop c3: $(since "$t")"

# --- every journal (all boots, shutdowns included) --------------------------
for w in "$c1" "$c2" "$c3"; do
  n=$(basename "$w")
  check "$n: journal has no sandbox/chroot failure" not grep -E 'Read-only file system|Permission denied|status=226|Running in chroot' "$w/journal.txt"
  check "$n: no auto-consul or consul unit failed" not grep -E '(auto-consul|consul)[^ ]*\.(service|timer): Failed|Failed to start (auto-consul|consul)' "$w/journal.txt"
done

echo "failures: $failures"
exit $((failures > 0))
