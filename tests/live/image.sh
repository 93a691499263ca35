#!/usr/bin/env bash
# image.sh BASE IMAGE KIND DEB
#
# Bakes an "image" for the live-systemd test: the tree BASE (tree.sh) plus
# auto-consul installed from DEB with apt-get, as on an AMI, and a stand-in
# Consul (tests/live/consul serving tests/support/fake_consul_agent.py):
#
#   KIND=packaged  Consul as HashiCorp's Debian package installs it:
#                  /usr/bin/consul, the `consul` user, /etc/consul.d/consul.hcl
#                  and consul.env, /opt/consul, and
#                  /usr/lib/systemd/system/consul.service
#                  (tests/fixtures/packaged-consul.service, not enabled)
#   KIND=zip       Consul from a zip: /usr/local/bin/consul only; no user, no
#                  /etc/consul.d, no unit
#
# The image is a layer on BASE: IMAGE/layer is the upper dir of an overlay
# whose lower is BASE, and IMAGE/lowerdirs the overlay lowerdir list that
# boot.sh mounts ("IMAGE/layer:BASE"). Where overlayfs cannot be mounted,
# IMAGE/layer is a full copy of BASE with the changes, and lowerdirs names it
# alone. Built in IMAGE.tmp and renamed when complete; an existing complete
# IMAGE is rebuilt (the .deb changes with every build): callers bake one per
# test run, in seconds.
#
# The setup runs in systemd-nspawn without booting (no systemd inside, so
# nothing is started or enabled; the .deb has no maintainer scripts), with
# the inputs bind-mounted read-only at /mnt/input.
set -euo pipefail

base=${1:?usage: image.sh BASE IMAGE packaged|zip DEB}
image=${2:?usage: image.sh BASE IMAGE packaged|zip DEB}
kind=${3:?usage: image.sh BASE IMAGE packaged|zip DEB}
deb=${4:?usage: image.sh BASE IMAGE packaged|zip DEB}
case $kind in packaged | zip) ;; *) echo "image.sh: KIND is packaged or zip" >&2; exit 2 ;; esac
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$(dirname "$here")")
base=$(realpath "$base")
image=$(realpath -m "$image")
deb=$(realpath "$deb")
[ -f "$base/.auto-consul-tree" ] || { echo "image.sh: $base is not a tree built by tree.sh" >&2; exit 1; }

# A container booted from an older IMAGE still uses its layer.
if grep -o 'lowerdir=[^, ]*' /proc/self/mountinfo | cut -d= -f2 | tr ':' '\n' | grep -qxF "$image/layer"; then
  echo "image.sh: $image is in use by a mounted container; stop it first" >&2
  exit 1
fi
tmp="$image.tmp"
cleanup() {
  if mountpoint -q "$tmp/root" 2>/dev/null; then umount "$tmp/root"; fi
  rm -rf --one-file-system "$tmp"
}
cleanup
trap cleanup EXIT
mkdir -p "$tmp/layer" "$tmp/work" "$tmp/root" "$tmp/input"

# The inputs.
cp "$deb" "$tmp/input/auto-consul.deb"
cp "$here/consul" "$tmp/input/consul"
cp "$repo/tests/support/fake_consul_agent.py" "$tmp/input/"
cp "$repo/tests/fixtures/packaged-consul.service" "$tmp/input/consul.service"
cat >"$tmp/input/setup.sh" <<'SETUP'
set -eu
kind=$1
export DEBIAN_FRONTEND=noninteractive
# As a user would. No package lists are needed: the Depends (libc6,
# libgcc-s1, systemd) are installed.
apt-get install -y -qq --no-install-recommends /mnt/input/auto-consul.deb >/dev/null
install -D -m 0644 /mnt/input/fake_consul_agent.py /usr/local/lib/auto-consul-live/fake_consul_agent.py
if [ "$kind" = packaged ]; then
  # What HashiCorp's consul .deb installs (its postinst creates the user and
  # hands it the config and data dirs).
  install -m 0755 /mnt/input/consul /usr/bin/consul
  useradd --system --home /etc/consul.d --shell /bin/false consul
  install -d -o consul -g consul -m 0755 /etc/consul.d
  install -d -o consul -g consul -m 0750 /opt/consul
  cat >/etc/consul.d/consul.hcl <<'HCL'
# Full configuration options can be found at https://developer.hashicorp.com/docs/agent/config

# data_dir
# This flag provides a data directory for the agent to store state. This is required
# for all agents. The directory should be durable across reboots. This is especially
# critical for agents that are running in server mode as they must be able to persist
# cluster state. Additionally, the directory must support the use of filesystem
# locking, meaning some types of mounted folders (e.g. VirtualBox shared folders) may
# not be suitable.
data_dir = "/opt/consul"
HCL
  : >/etc/consul.d/consul.env
  chown consul:consul /etc/consul.d/consul.hcl /etc/consul.d/consul.env
  chmod 0644 /etc/consul.d/consul.hcl /etc/consul.d/consul.env
  install -m 0644 /mnt/input/consul.service /usr/lib/systemd/system/consul.service
else
  install -m 0755 /mnt/input/consul /usr/local/bin/consul
fi
apt-get clean
SETUP

# The root to set up: an overlay on BASE, or a copy of it.
# AUTO_CONSUL_LIVE_NO_OVERLAY=1 takes the copy path (to test it).
if [ -z "${AUTO_CONSUL_LIVE_NO_OVERLAY:-}" ] && mount -t overlay "overlay-image" \
  -o "lowerdir=$base,upperdir=$tmp/layer,workdir=$tmp/work" "$tmp/root" 2>/dev/null; then
  root="$tmp/root"
  lowerdirs="$image/layer:$base"
else
  echo "image.sh: overlayfs unavailable; copying $base" >&2
  rmdir "$tmp/layer"
  cp -a "$base/." "$tmp/layer/"
  root="$tmp/layer"
  lowerdirs="$image/layer"
fi

if ! systemd-nspawn --quiet --register=no --keep-unit -M "image-$$" -D "$root" \
  --bind-ro="$tmp/input:/mnt/input" --console=pipe \
  /bin/sh /mnt/input/setup.sh "$kind" </dev/null >"$tmp/setup.log" 2>&1; then
  echo "image.sh: setting up the $kind image failed:" >&2
  cat "$tmp/setup.log" >&2
  exit 1
fi
# Nothing of the setup run stays in the image.
rmdir "$root/mnt/input" 2>/dev/null || true
if [ -s "$root/etc/machine-id" ]; then : >"$root/etc/machine-id"; fi

if mountpoint -q "$tmp/root"; then umount "$tmp/root"; fi
rm -rf "$tmp/work" "$tmp/root" "$tmp/input" "$tmp/setup.log"
echo "$lowerdirs" >"$tmp/lowerdirs"
echo "$kind" >"$tmp/kind"
rm -rf --one-file-system "$image"
mv "$tmp" "$image"
trap - EXIT
