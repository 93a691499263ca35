#!/bin/bash
# auto-consul: shell user data for an EC2 launch template, for images or
# tooling that prefer a script to cloud-config. Same prerequisites as
# launch-template.yaml: Consul from HashiCorp's package, auto-consul on PATH
# (/usr/bin from the .deb or /usr/local/bin), an instance profile with the
# permissions in docs/deploy.md, IMDSv2.
#
# Change the values below; every instance of a cluster needs the same ones.
# cloud-init runs this once per instance, as root, late in the first boot.
set -euo pipefail

REGISTRY="s3://my-bucket/consul/prod"
ROLE="auto"     # server for a servers' group, agent for an agents' group, auto for one group
SERVERS=3
EXPIRY=120
DATACENTER="dc1"
DATA_DIR="/opt/consul"
CONFIG_DIR="/etc/consul.d"

# Optional: fetch the binary when the image does not carry it.
# AUTO_CONSUL_URL="https://example.com/auto-consul/auto-consul-x86_64-linux"
# curl -fsSL -o /usr/local/bin/auto-consul "$AUTO_CONSUL_URL"
# chmod 0755 /usr/local/bin/auto-consul

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

if ! command -v auto-consul >/dev/null 2>&1; then
    echo "auto-consul user data: auto-consul is not on PATH; install the .deb or place the binary in /usr/local/bin" >&2
    exit 1
fi

# Write the env file atomically: a half-written file must never be read by
# auto-consul-heartbeat.service.
install -d -m 0755 /etc/auto-consul
tmp="$(mktemp /etc/auto-consul/.auto-consul.env.XXXXXX)"
cat >"$tmp" <<ENV
AUTO_CONSUL_REGISTRY=${REGISTRY}
AUTO_CONSUL_ROLE=${ROLE}
AUTO_CONSUL_SERVERS=${SERVERS}
AUTO_CONSUL_EXPIRY=${EXPIRY}
AUTO_CONSUL_DATACENTER=${DATACENTER}
AUTO_CONSUL_DATA_DIR=${DATA_DIR}
AUTO_CONSUL_CONFIG_DIR=${CONFIG_DIR}
ENV
chmod 0644 "$tmp"
mv -f "$tmp" /etc/auto-consul/auto-consul.env

# The options are read from the environment, exactly as the systemd units do.
set -a
# shellcheck source=/dev/null
. /etc/auto-consul/auto-consul.env
set +a

# `install --now` enables auto-consul.service and starts it without
# waiting: it runs `auto-consul run` now and at every later boot, and systemd
# retries it until it succeeds (sticky mode, no `bootstrap` once Raft state
# exists).
exec auto-consul install --now
