#!/usr/bin/env bash
# exec.sh WORKDIR CMD [ARG...]
#
# Runs CMD inside the container booted by boot.sh in WORKDIR (all of its
# namespaces: nsenter -t PID1 -a), with a clean environment (PATH, LANG, and
# nothing of the caller's: no AWS_*, HOME, RUST_LOG... leak in; pass
# variables with `exec.sh WORKDIR env K=V CMD`). Stdin, stdout and stderr are
# the caller's; the exit status is CMD's.
#
# The process joins the container's namespaces but not its cgroup, and is
# not a child of its systemd: to run a service, use systemctl or
# systemd-run inside.
set -euo pipefail
work=${1:?usage: exec.sh WORKDIR CMD [ARG...]}
shift
(($#)) || { echo "usage: exec.sh WORKDIR CMD [ARG...]" >&2; exit 2; }
# shellcheck source=lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
p=$(cat "$work/pid1" 2>/dev/null || true)
# After a reboot inside (reboot.sh), PID 1 is a new process.
alive "$p" || p=$(container_init "$work")
[ -n "$p" ] || { echo "exec.sh: no container running in $work" >&2; exit 125; }
exec nsenter -t "$p" -a env -i \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 "$@"
