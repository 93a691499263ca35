#!/usr/bin/env bash
# stop.sh [--keep] WORKDIR
#
# Shuts down the container booted by boot.sh in WORKDIR, cleanly: SIGTERM to
# its systemd-nspawn, which makes the container's systemd halt (every unit is
# stopped: ExecStop= actions run, as at an instance's shutdown). Waits at most
# AUTO_CONSUL_STOP_TIMEOUT seconds (60), then SIGKILLs that nspawn and the
# container's init. Signals only the processes boot.sh recorded in WORKDIR,
# after checking that they are still the ones it started.
#
# Then writes the container's whole journal (all its boots, the last
# shutdown included) to WORKDIR/journal.txt, unmounts the overlay and,
# without --keep, deletes the container's disk (WORKDIR/root, upper, work).
# console.log, journal.txt and seed/ stay for post-mortems; the caller
# removes WORKDIR.
#
# --keep: keep the disk. `stop.sh --keep W; boot.sh BASE NAME W` is a reboot
# (same disk and machine id, new boot; cloud-init's per-instance modules do
# not run again). For a reboot from inside, see reboot.sh.
#
# Idempotent: stopping a stopped container, or a WORKDIR without one, only
# cleans up.
set -euo pipefail
keep=
if [ "${1:-}" = --keep ]; then keep=1; shift; fi
work=${1:?usage: stop.sh [--keep] WORKDIR}
[ -d "$work" ] || exit 0
work=$(realpath "$work")
root="$work/root"
timeout=${AUTO_CONSUL_STOP_TIMEOUT:-60}
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# is_loop PID: the boot loop boot.sh started for this WORKDIR.
is_loop() {
  alive "$1" && tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qxF boot-loop &&
    tr '\0' '\n' <"/proc/$1/cmdline" | grep -qxF "$work"
}

sup=$(cat "$work/supervisor.pid" 2>/dev/null || true)
signalled=
deadline=$((SECONDS + timeout))
# Until the boot loop ends: TERM each nspawn it runs (a container caught
# rebooting gets a new nspawn, which is stopped in turn).
while is_loop "$sup" && ((SECONDS < deadline)); do
  n=$(cat "$work/nspawn.pid" 2>/dev/null || true)
  if [ "$n" != "$signalled" ] && is_nspawn "$n" "$root"; then
    kill -TERM "$n"
    signalled=$n
  fi
  sleep 0.2
done
if is_loop "$sup"; then
  echo "stop.sh: $(cat "$work/name" 2>/dev/null) did not stop within ${timeout}s; killing it" >&2
  n=$(cat "$work/nspawn.pid" 2>/dev/null || true)
  p=$(container_init "$work")
  kill -KILL "$sup" 2>/dev/null || true
  if is_nspawn "$n" "$root"; then
    kill -KILL "$n"
  fi
  # Killing the init of the container's PID namespace kills everything in it.
  [ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
  for _ in $(seq 50); do alive "$n" || alive "$p" || break; sleep 0.2; done
fi
rm -f "$work/pid1" "$work/nspawn.pid" "$work/supervisor.pid"

# The whole journal (every boot of this disk, shutdowns included), read with
# the host's journalctl, for the caller's checks once the container is gone.
if [ -d "$root/var/log/journal" ] && command -v journalctl >/dev/null; then
  journalctl -D "$root/var/log/journal" --no-pager -o short-precise >"$work/journal.txt" 2>&1 || true
fi

# The container's root. nspawn's mounts live in its own mount namespace and
# are gone with it; only the overlay is ours.
if mountpoint -q "$root"; then
  for _ in $(seq 25); do umount "$root" 2>/dev/null && break; sleep 0.2; done
  if mountpoint -q "$root"; then
    echo "stop.sh: $root still busy; detaching it (umount -l)" >&2
    umount -l "$root"
  fi
fi
if [ -z "$keep" ]; then
  rm -rf --one-file-system "$root" "$root.tmp" "$work/upper" "$work/work" "$work/rootfs"
fi
