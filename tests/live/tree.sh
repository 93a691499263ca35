#!/usr/bin/env bash
# tree.sh DIR
#
# Builds (once) a Debian bookworm root tree for the live-systemd test: booted
# with systemd-nspawn, it runs systemd as PID 1 and the real cloud-init with
# the NoCloud datasource, and can install a .deb (dpkg -i / apt-get install
# ./x.deb).
#
# Idempotent and cached: DIR is complete once DIR/.auto-consul-tree holds the
# recipe version (written last). A build goes into DIR.tmp and is renamed to
# DIR only when complete, so an interrupted build never leaves a half tree;
# concurrent callers are serialized by a lock on DIR.lock. A tree built from
# an older recipe (a different TREE_VERSION) is rebuilt.
#
# Needs root and the Debian mirror. Installs debootstrap and
# systemd-container (systemd-nspawn) on the host when missing.
# Quiet: prints one line when it builds, and the log's tail on failure.
set -euo pipefail

dir=${1:?usage: tree.sh DIR}
dir=$(realpath -m "$dir")
# Bump when the package list or the tree's configuration below changes.
TREE_VERSION=4
marker="$dir/.auto-consul-tree"
mirror=${AUTO_CONSUL_DEBIAN_MIRROR:-http://deb.debian.org/debian}

complete() { [ "$(cat "$marker" 2>/dev/null)" = "$TREE_VERSION" ]; }
complete && exit 0

[ "$(id -u)" = 0 ] || { echo "tree.sh: needs root" >&2; exit 1; }

# Host tools, only when missing.
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
if ((${#missing[@]})); then
  echo "tree.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$(dirname "$dir")"
exec 9>"$dir.lock"
flock 9
complete && exit 0 # built by another caller while we waited
# An older tree still in use (the lower dir of a container's overlay) must
# not be deleted under it.
if [ -e "$dir" ] && grep -o 'lowerdir=[^, ]*' /proc/self/mountinfo | cut -d= -f2 | tr ':' '\n' | grep -qxF "$dir"; then
  echo "tree.sh: $dir (an older recipe) is in use by a mounted container; stop it first" >&2
  exit 1
fi

tmp="$dir.tmp"
log="$dir.log"
# remove_tree DIR: debootstrap mounts /proc, /sys (and, in some containers,
# binds host devices) in the tree while it works; an interrupted build can
# leave them. Unmount everything under DIR, deepest first, and never cross
# into another file system while deleting.
remove_tree() {
  awk -v p="$1" '$5 == p || index($5, p "/") == 1 { print $5 }' /proc/self/mountinfo |
    sort -r | while read -r m; do umount -l "$m"; done
  rm -rf --one-file-system "$1"
}
trap 'complete || remove_tree "$tmp"' EXIT
start=$(date +%s)
# A half-built tree, or a stale one of an older recipe.
remove_tree "$tmp"
remove_tree "$dir"
echo "tree.sh: building a Debian bookworm tree in $dir (a few minutes; log: $log)"

# What the test boots (debootstrap resolves their Depends, not Recommends):
#   systemd systemd-sysv dbus  PID 1, /sbin/init, the system bus (systemctl,
#                              hostnamectl, logind)
#   cloud-init                 the real one, with python3 and its modules
#   iproute2 procps            ip, ps/pgrep for the checks and cloud-init
#   ca-certificates            as on a real image
#   locales sudo               what cloud-init's default modules (locale,
#                              users-groups) expect on a Debian cloud image
#   python3                    the stand-in consul (a Python script)
#   curl                       the checks inside (IMDS, the agent API)
#   openssh-client             ssh-keygen, for cloud-init's ssh module (host
#                              keys; no sshd is installed or started)
#   python3-cffi-backend       provides python3-cffi-backend-api-min/max,
#                              virtual Depends of python3-cryptography (a
#                              cloud-init dependency) that debootstrap does
#                              not resolve by itself
# apt and dpkg are in minbase: `apt-get install ./x.deb` works offline when
# the .deb's Depends are installed.
include=systemd,systemd-sysv,dbus,cloud-init,iproute2,procps,ca-certificates,locales,sudo,python3,curl,openssh-client,python3-cffi-backend
if ! debootstrap --variant=minbase --include="$include" bookworm "$tmp" "$mirror" >"$log" 2>&1; then
  echo "tree.sh: debootstrap failed; last lines of $log:" >&2
  tail -n 30 "$log" >&2
  exit 1
fi

# Configuration common to every container booted from the tree.
#
# No machine id: boot.sh gives each container its own (kept across its
# reboots). An empty file (not a missing one) is what Debian's cloud images
# ship: systemd treats the first boot as such.
: >"$tmp/etc/machine-id"
rm -f "$tmp/var/lib/dbus/machine-id"
# cloud-init's locale module sets LANG=en_US.UTF-8 (its Debian default), and
# Debian's locale-gen builds only what /etc/locale.gen enables: enable it, as
# Debian's cloud images do, or cloud-config.service fails.
sed -i 's/^# *\(en_US.UTF-8 UTF-8\)/\1/' "$tmp/etc/locale.gen"
chroot "$tmp" locale-gen >/dev/null
# debootstrap copies the host's /etc/hostname: without one, the container
# keeps the name systemd-nspawn -M gives it (until cloud-init sets the
# meta-data's local-hostname). /etc/hosts as Debian's installer writes it.
rm -f "$tmp/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n' >"$tmp/etc/hosts"
# A persistent journal, so that journalctl sees the boots before a reboot.
mkdir -p "$tmp/var/log/journal"
# The containers share the host's network: cloud-init must not write a
# network configuration for the host's interfaces (and has no renderer here).
mkdir -p "$tmp/etc/cloud/cloud.cfg.d"
cat >"$tmp/etc/cloud/cloud.cfg.d/80_auto_consul_live_network.cfg" <<'CFG'
# Written by auto-consul's tests/live/tree.sh: the container shares the
# host's network namespace; cloud-init leaves the network alone.
network: {config: disabled}
CFG
# No background apt runs (they would hold dpkg's lock when the test
# installs a package) and no periodic jobs a short-lived container does not
# need.
for t in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer; do
  ln -sf /dev/null "$tmp/etc/systemd/system/$t"
done
# Shrink: package caches are not needed at runtime.
chroot "$tmp" apt-get clean
rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/var/cache/apt/*.bin

echo "$TREE_VERSION" >"$tmp/.auto-consul-tree"
mv "$tmp" "$dir"
echo "tree.sh: built in $(( $(date +%s) - start ))s, $(du -sh "$dir" | cut -f1)"
