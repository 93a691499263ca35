# shellcheck shell=bash
# Functions shared by the live-systemd scripts (sourced, not run).

# alive PID: the process exists.
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# is_nspawn PID ROOT: PID is a systemd-nspawn running the container rooted at
# ROOT (so that a recycled PID is never signalled).
is_nspawn() {
  alive "$1" && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = systemd-nspawn ] &&
    tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | grep -qxF "$2"
}

# container_init WORKDIR: the host PID of the container's init (systemd, the
# child of systemd-nspawn once it has exec'd it), or nothing.
container_init() {
  local n
  n=$(cat "$1/nspawn.pid" 2>/dev/null || true)
  [ -n "$n" ] || return 0
  pgrep -P "$n" -x systemd | head -n1 || true
}

# wait_booted WORKDIR NAME TIMEOUT: waits for the container's init, writes
# WORKDIR/pid1, then waits until `systemctl is-system-running` says running
# or degraded (printing the failed units). Returns 1 on timeout or when
# systemd-nspawn exited, after printing what it knows.
wait_booted() {
  local work=$1 name=$2 timeout=$3 deadline p='' state=''
  deadline=$((SECONDS + timeout))
  while ((SECONDS < deadline)); do
    if [ -f "$work/nspawn.rc" ]; then
      echo "$name: systemd-nspawn exited with $(cat "$work/nspawn.rc"); console:" >&2
      tail -n 30 "$work/console.log" >&2
      return 1
    fi
    p=$(container_init "$work")
    if [ -n "$p" ]; then
      [ "$(cat "$work/pid1" 2>/dev/null)" = "$p" ] || echo "$p" >"$work/pid1"
      state=$(nsenter -t "$p" -a systemctl is-system-running 2>/dev/null || true)
      case $state in
        running) return 0 ;;
        degraded)
          echo "$name: degraded; failed units:" >&2
          nsenter -t "$p" -a systemctl --failed --no-legend --no-pager >&2 || true
          return 0
          ;;
      esac
    fi
    sleep 0.2
  done
  echo "$name: not up after ${timeout}s (state: ${state:-no init yet})" >&2
  if [ -n "$p" ]; then
    nsenter -t "$p" -a systemctl --failed --no-legend --no-pager >&2 || true
    nsenter -t "$p" -a systemctl list-jobs --no-pager >&2 || true
  fi
  tail -n 30 "$work/console.log" >&2
  return 1
}
