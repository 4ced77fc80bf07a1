# shellcheck shell=sh
#
# scripts/vmtest/guest-lib.sh — what the guest scenarios share (sourced as
# /lib.sh; busybox ash). The real tools are called by full path: busybox has
# applets of the same names, which its shell prefers to PATH.
#
#   arg NAME        the value of NAME=VALUE on the kernel command line
#   log MSG         a "VMTEST:" line on the console, with the uptime
#   fail WHY        the kernel's last words, "VMTEST RESULT: FAIL WHY", exit 1
#   pass            "VMTEST RESULT: PASS"
#   wait_for COND SECS WHAT   poll `sh -c COND` every 0.1 s, fail after SECS
#   splitter_start LOG ARGS...   start /opt/bin/splitter serve ARGS in the
#                   background (SPLITTER_PID), its log in LOG
#   wait_ublk_ready LOG N   wait for "ublk device /dev/ublkbN ready|recovered"
#   converged RING  true once the ring has nothing left to ship
#   wait_converged RING SECS
#   write_files MNT HELLO   hello.txt, det.txt (detfile.awk), 8 MiB of random
#                   data, 200 small files, and sums.sha256 of the first three
#   fsynced_writer MNT ROUND   24 files of 192 KiB, each fsynced, its sum
#                   appended to /tmp/acked.sha256 once the fsync returned
#   stop_ublk_splitter DEV   SIGTERM: exit 0 and the device gone
set -u

X=/xbin
HOST=10.0.2.2                 # the host, seen from a QEMU user-networking guest
SPLITTER=/opt/bin/splitter
export LD_LIBRARY_PATH=/opt/lib
export RUST_BACKTRACE=1

arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
now() { cut -d' ' -f1 /proc/uptime; }
log() { echo "VMTEST: $* (uptime $(now))"; }

fail() {
  echo "VMTEST: --- last kernel messages ---"
  dmesg | tail -n 40
  for f in /tmp/*.log; do
    [ -f "$f" ] || continue
    echo "VMTEST: --- end of $f ---"
    tail -n 60 "$f"
  done
  echo "VMTEST RESULT: FAIL $*"
  exit 1
}

pass() { echo "VMTEST RESULT: PASS"; }

wait_for() {
  i=0
  limit=$(($2 * 10))
  until sh -c "$1"; do
    i=$((i + 1))
    [ $i -le $limit ] || fail "$3 (waited $2 s)"
    sleep 0.1
  done
}

splitter_start() {
  sl=$1
  shift
  log "splitter serve $*"
  "$SPLITTER" serve "$@" >>"$sl" 2>&1 &
  SPLITTER_PID=$!
}

wait_ublk_ready() {
  wait_for "grep -Eq 'ublk device /dev/ublkb$2 (ready|recovered)' $1 || ! kill -0 $SPLITTER_PID 2>/dev/null" 60 \
    "the splitter did not bring /dev/ublkb$2 up"
  grep -Eq "ublk device /dev/ublkb$2 (ready|recovered)" "$1" || fail "the splitter exited before /dev/ublkb$2 was up"
  [ -b "/dev/ublkb$2" ] || fail "/dev/ublkb$2 is not a block device"
}

# json_val FILE KEY — the value after "KEY": in FILE (pretty-printed JSON).
json_val() { sed -n "s/^ *\"$2\": *\([^,]*\),*$/\1/p" "$1" | head -n 1; }

converged() {
  "$SPLITTER" ring status --ring "$1" --json >/tmp/st.json 2>/dev/null || return 1
  [ "$(json_val /tmp/st.json records_waiting)" = 0 ] &&
    [ "$(json_val /tmp/st.json dirty_bytes)" = 0 ] &&
    [ "$(json_val /tmp/st.json needs_initial_sync)" = false ] &&
    [ "$(json_val /tmp/st.json acked_seq)" = "$(json_val /tmp/st.json head_seq)" ]
}

wait_converged() {
  i=0
  until converged "$1"; do
    i=$((i + 1))
    if [ $i -gt $(($2 * 5)) ]; then
      cat /tmp/st.json
      fail "the ring $1 was not shipped within $2 s"
    fi
    sleep 0.2
  done
  log "everything in $1 is shipped and acknowledged (acked seq $(json_val /tmp/st.json acked_seq))"
}

# no_io_errors — the kernel reported no I/O or ext4 errors.
no_io_errors() {
  if dmesg | grep -Eiq 'I/O error|EXT4-fs error|Buffer I/O|blk_update_request'; then
    dmesg | grep -Ei 'I/O error|EXT4-fs error|Buffer I/O|blk_update_request' | tail -n 10
    fail "the kernel reported I/O errors ($1)"
  fi
}

write_files() {
  echo "$2" >"$1/hello.txt" || fail "write hello.txt"
  awk -f /detfile.awk >"$1/det.txt" || fail "write det.txt"
  dd if=/dev/urandom of="$1/random.bin" bs=1M count=8 2>/dev/null || fail "write random.bin"
  mkdir "$1/many" || fail "mkdir many"
  n=0
  while [ $n -lt 200 ]; do
    echo "small file $n" >"$1/many/f$n" || fail "write many/f$n"
    n=$((n + 1))
  done
  (cd "$1" && sha256sum hello.txt det.txt random.bin >sums.sha256) || fail "sha256sum"
}

fsynced_writer() {
  i=0
  while [ $i -lt 24 ]; do
    f="$1/r$2-f$i"
    head -c 196608 /dev/urandom >"/tmp/w$2.bin" || exit 2
    dd if="/tmp/w$2.bin" of="$f" bs=65536 conv=fsync 2>/dev/null || exit 3
    echo "$(sha256sum <"/tmp/w$2.bin" | cut -d' ' -f1)  $f" >>/tmp/acked.sha256
    i=$((i + 1))
  done
}

stop_ublk_splitter() {
  kill -TERM "$SPLITTER_PID"
  wait "$SPLITTER_PID"
  rc=$?
  [ $rc = 0 ] || fail "the splitter exited with status $rc after SIGTERM"
  [ ! -e "$1" ] || fail "$1 still exists after the splitter stopped"
}
