#!/usr/bin/env bash
# reboot.sh WORKDIR
#
# Reboots the container booted by boot.sh in WORKDIR from inside
# (`systemctl reboot`): systemd stops every unit, systemd-nspawn exits with
# status 133, and boot.sh's loop boots the same root again, as
# systemd-nspawn@.service would. The disk (overlay upper dir), the machine id
# and the persistent journal are kept. Waits as boot.sh does (at most
# AUTO_CONSUL_BOOT_TIMEOUT seconds, 60) and rewrites WORKDIR/pid1.
set -euo pipefail
work=${1:?usage: reboot.sh WORKDIR}
work=$(realpath "$work")
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=lib.sh
. "$here/lib.sh"
name=$(cat "$work/name")
timeout=${AUTO_CONSUL_BOOT_TIMEOUT:-60}
old=$(cat "$work/nspawn.pid")
"$here/exec.sh" "$work" systemctl reboot
deadline=$((SECONDS + timeout))
# The old nspawn exits, the loop starts a new one.
while [ "$(cat "$work/nspawn.pid" 2>/dev/null)" = "$old" ] && [ ! -f "$work/nspawn.rc" ]; do
  ((SECONDS < deadline)) || { echo "reboot.sh: $name did not go down within ${timeout}s" >&2; exit 1; }
  sleep 0.2
done
wait_booted "$work" "$name" "$timeout"
