#!/usr/bin/env bash
# boot.sh BASE NAME WORKDIR
#
# Boots container NAME from BASE, a tree built by tree.sh or an image baked
# by image.sh, with systemd-nspawn, in the background, and waits until its
# systemd is up.
#
#   WORKDIR/seed/user-data    written by the caller: the NoCloud user data
#   WORKDIR/seed/meta-data    optional; default "instance-id: iid-NAME" and
#                             "local-hostname: NAME"
#
# Writes:
#   WORKDIR/root              the container's root: an overlay (lower BASE,
#                             or the image's layers; upper WORKDIR/upper), or
#                             a copy where overlayfs cannot be mounted
#                             (WORKDIR/rootfs says which)
#   WORKDIR/console.log       the container's console (appended at each boot)
#   WORKDIR/supervisor.pid    the background loop that runs systemd-nspawn and
#                             boots the container again when it asks for a
#                             reboot (nspawn exits 133), as
#                             systemd-nspawn@.service does
#   WORKDIR/nspawn.pid        the running systemd-nspawn process
#   WORKDIR/nspawn.rc         its exit status, once it exited for good
#   WORKDIR/pid1              the host PID of the container's init (for
#                             nsenter -t PID -a; see exec.sh)
#
# Booting again a WORKDIR that stop.sh --keep stopped keeps its disk (the
# upper dir, or the copy): that is a reboot with a new PID 1. A
# `systemctl reboot` inside also reboots, in place (see reboot.sh).
#
# Waits at most AUTO_CONSUL_BOOT_TIMEOUT seconds (60) for
# `systemctl is-system-running` to say running or degraded; prints the failed
# units when degraded (exit 0). On timeout prints the state, the failed units
# and the console's tail, and exits 1, leaving the container running for
# stop.sh.
#
# Needs root. The container shares the host's network: services on the
# host's 127.0.0.1 are reachable from inside, and ports opened inside are
# the host's.
set -euo pipefail

base=${1:?usage: boot.sh BASE NAME WORKDIR}
name=${2:?usage: boot.sh BASE NAME WORKDIR}
work=${3:?usage: boot.sh BASE NAME WORKDIR}
base=$(realpath "$base")
mkdir -p "$work"
work=$(realpath "$work")
root="$work/root"
timeout=${AUTO_CONSUL_BOOT_TIMEOUT:-60}
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [ -f "$base/.auto-consul-tree" ]; then
  lowerdirs=$base
elif [ -f "$base/lowerdirs" ]; then
  lowerdirs=$(cat "$base/lowerdirs")
else
  echo "boot.sh: $base is neither a tree (tree.sh) nor an image (image.sh)" >&2
  exit 1
fi

[ -f "$work/seed/user-data" ] || { echo "boot.sh: no $work/seed/user-data" >&2; exit 1; }
if alive "$(cat "$work/supervisor.pid" 2>/dev/null)"; then
  echo "boot.sh: $name is already running (stop.sh $work first)" >&2
  exit 1
fi
rm -f "$work/pid1" "$work/nspawn.pid" "$work/nspawn.rc" "$work/supervisor.pid"
echo "$name" >"$work/name"

# 1. The root: an overlay on BASE, kept across boots of this WORKDIR.
mkdir -p "$root"
if ! mountpoint -q "$root"; then
  mode=$(cat "$work/rootfs" 2>/dev/null || true)
  # AUTO_CONSUL_LIVE_NO_OVERLAY=1 takes the copy path (to test it).
  [ -n "${AUTO_CONSUL_LIVE_NO_OVERLAY:-}" ] && [ -z "$mode" ] && mode=copy
  if [ "$mode" != copy ]; then
    mkdir -p "$work/upper" "$work/work"
    if mount -t overlay "overlay-$name" \
      -o "lowerdir=$lowerdirs,upperdir=$work/upper,workdir=$work/work" "$root" 2>"$work/overlay.err"; then
      echo overlay >"$work/rootfs"
    elif [ "$mode" = overlay ]; then
      # The disk of an earlier boot is in the upper dir: do not start over.
      echo "boot.sh: cannot mount the overlay again: $(cat "$work/overlay.err")" >&2
      exit 1
    else
      echo "boot.sh: overlayfs unavailable ($(cat "$work/overlay.err")); copying $lowerdirs" >&2
      rm -rf "$work/upper" "$work/work"
      mode=copy
    fi
  fi
  if [ "$mode" = copy ] && [ ! -f "$root/.auto-consul-tree" ]; then
    # Without overlayfs, image.sh made a full copy: one lower dir.
    case $lowerdirs in *:*) echo "boot.sh: cannot copy layers $lowerdirs" >&2; exit 1 ;; esac
    # cp -a, not hard links: the container writes files in place.
    rm -rf "$root.tmp"
    cp -a "$lowerdirs/." "$root.tmp/"
    rm -rf "$root"
    mv "$root.tmp" "$root"
    echo copy >"$work/rootfs"
  fi
fi

[ -s "$work/overlay.err" ] || rm -f "$work/overlay.err"

# 2. Per-container identity, made once and kept across reboots.
if [ ! -s "$root/etc/machine-id" ]; then
  od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$root/etc/machine-id"
  echo >>"$root/etc/machine-id"
fi

# 3. The NoCloud seed and the datasource: only NoCloud, so cloud-init never
# probes EC2's (or anyone's) metadata address.
seed="$root/var/lib/cloud/seed/nocloud"
mkdir -p "$seed" "$root/etc/cloud/cloud.cfg.d"
install -m 0600 "$work/seed/user-data" "$seed/user-data"
if [ -f "$work/seed/meta-data" ]; then
  install -m 0644 "$work/seed/meta-data" "$seed/meta-data"
else
  printf 'instance-id: iid-%s\nlocal-hostname: %s\n' "$name" "$name" >"$seed/meta-data"
fi
for f in vendor-data network-config; do
  if [ -f "$work/seed/$f" ]; then install -m 0600 "$work/seed/$f" "$seed/$f"; fi
done
printf '# Written by tests/live/boot.sh\ndatasource_list: [ NoCloud ]\n' \
  >"$root/etc/cloud/cloud.cfg.d/90_auto_consul_live_nocloud.cfg"

# 4. Boot in the background. setsid: the container outlives this script and
# the caller's terminal or process group. The loop boots again on exit
# status 133 (the container asked for a reboot). TERM=dumb: no colour codes
# in the console log.
#   --register=no --keep-unit  no machined or systemd on the host to talk to
#   -b                         run the tree's init (systemd) as PID 1
#   --console=read-only        no TTY needed; console output goes to the log
#   (no --private-network)     the host's network namespace is shared
: >>"$work/console.log"
# shellcheck disable=SC2016 # expanded by the inner bash
setsid env TERM=dumb bash -c '
  work=$1 name=$2 root=$3
  echo $$ >"$work/supervisor.pid"
  while :; do
    systemd-nspawn --quiet --register=no --keep-unit -M "$name" -D "$root" -b \
      --console=read-only </dev/null >>"$work/console.log" 2>&1 &
    echo $! >"$work/nspawn.pid"
    rc=0; wait $! || rc=$?
    [ "$rc" = 133 ] || break
    rm -f "$work/pid1"
    echo "--- reboot ---" >>"$work/console.log"
  done
  echo "$rc" >"$work/nspawn.rc"
' boot-loop "$work" "$name" "$root" </dev/null >/dev/null 2>&1 &

# 5. Wait for PID 1, then for systemd to finish booting.
wait_booted "$work" "$name" "$timeout"
