# shellcheck shell=bash
#
# scripts/lib/common.sh — small helpers shared by blockship's scripts:
# step headers, the location of the binaries, waiting for an NBD server to
# answer and stopping a process politely.
#
# Sourced, never executed:  . "$ROOT/scripts/lib/common.sh"
# The sourcing script sets ROOT to the repository root first.

# bs_step TEXT — a header for one step of a script.
bs_step() {
  printf '\n==> %s\n' "$*"
}

# bs_say TEXT — one line of explanation under a step.
bs_say() {
  printf '    %s\n' "$*"
}

# bs_die TEXT — stop the script with an error (the EXIT trap still cleans up).
bs_die() {
  printf '\nerror: %s\n' "$*" >&2
  exit 1
}

# bs_target_dir — where cargo puts its output.
bs_target_dir() {
  printf '%s\n' "${CARGO_TARGET_DIR:-$ROOT/target}"
}

# bs_nbd_unix_uri SOCKET — the NBD URI of the (only) export on a unix socket.
bs_nbd_unix_uri() {
  printf 'nbd+unix:///?socket=%s\n' "$1"
}

# bs_wait_nbd URI PID LOG [SECONDS] — wait until the NBD server with process id
# PID answers at URI (nbdinfo can read the export size). Fails, printing the
# end of the server's LOG, if the process dies or SECONDS (default 30) pass.
bs_wait_nbd() {
  local uri=$1 pid=$2 log=$3 limit=${4:-30} waited=0
  while ! nbdinfo --size "$uri" >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "error: the server (pid $pid) exited before it answered at $uri; its log:" >&2
      tail -n 30 "$log" >&2 || true
      return 1
    fi
    if ((waited >= limit * 10)); then
      echo "error: no answer at $uri after ${limit}s; the server's log:" >&2
      tail -n 30 "$log" >&2 || true
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

# bs_stop PID [SECONDS] — send SIGTERM to PID and wait up to SECONDS (default
# 20) for it to exit, then SIGKILL it. Returns the process's exit status when
# it is a child of this shell (143 = died of SIGTERM without handling it),
# 0 if it was already gone, and 137 if it had to be killed.
bs_stop() {
  local pid=$1 limit=${2:-20} waited=0 rc=0
  [[ -n "$pid" ]] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || rc=$?; return "$rc"; }
  kill -TERM "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do
    # A zombie child counts as alive for kill -0 until it is waited for;
    # /proc tells the difference.
    if [[ -r /proc/$pid/status ]] && grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then
      break
    fi
    if ((waited >= limit * 10)); then
      echo "warning: pid $pid still running ${limit}s after SIGTERM; sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
      return 137
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  wait "$pid" 2>/dev/null || rc=$?
  return "$rc"
}

# bs_proc_kib PID FIELD — a memory field of /proc/PID/status (VmRSS, VmHWM) in KiB.
bs_proc_kib() {
  awk -v f="$2:" '$1 == f {print $2; exit}' "/proc/$1/status" 2>/dev/null || true
}
