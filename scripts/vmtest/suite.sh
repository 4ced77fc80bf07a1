#!/usr/bin/env bash
#
# scripts/vmtest/suite.sh — the guest scenarios, each against the real Linux
# kernel of a QEMU guest (TCG, one boot or more each):
#
#   scripts/vmtest/fetch.sh && scripts/vmtest/build-initramfs.sh && scripts/vmtest/suite.sh [SCENARIO...]
#
# Scenarios (default: all, in this order):
#   nbd            the kernel NBD client (/dev/nbd0) against the splitter on
#                  the host: patterns, zeroing, discard, multi-conn, ext4
#                  (guest-nbd.sh); the disk file is checked on the host.
#   ublk           the splitter with --ublk in the guest on a disk file,
#                  shipping to an nbd-target on the host: ext4 files, fio
#                  verify=crc32c, discard, write-zeroes (guest-ublk.sh); the
#                  replica, read from the target's NBD export, must equal
#                  the guest's disk file and hold a clean ext4 with the files.
#   ublk-recovery  kill -9 of the ublk splitter while ext4 on /dev/ublkb0 is
#                  written, restart with --recover, and an upgrade (a new
#                  splitter with --recover while the old one runs), several
#                  rounds (guest-ublk-recovery.sh); replica = disk file.
#   nbd-restart    the kernel NBD client across restarts (SIGKILL) of the
#                  replicating splitter on the host, while ext4 on /dev/nbd0
#                  is written; /dev/nbd0 attached with `splitter nbd-attach`
#                  (netlink, dead-connection timeout, reconnect)
#                  (guest-nbd-restart.sh); replica = disk file.
#   power-cut      QEMU itself killed at a random moment under a write load
#                  that flushes often, VMTEST_CUTS times (default 5; 20 or
#                  more for a long run). The guest's data disk goes through
#                  nbdkit's cache filter (cache=writeback: what the guest
#                  did not flush is in nbdkit's memory and lost with it),
#                  so a cut loses exactly what a power cut loses. Each boot
#                  checks the previous cut (guest-power-cut.sh); the last
#                  one lets the shipper catch up: replica = disk file.
#
# Each scenario prints "SCENARIO NAME: PASS (N s)" or "SCENARIO NAME: FAIL
# why", with the end of the guest's console and the logs on failure; the
# suite exits 0 only when every scenario passed. Logs: VMTEST_LOGS (default
# target/vmtest/logs), one folder per scenario.
#
# Env: SPLITTER, NBD_TARGET (default target/debug/...), VMTEST_CACHE,
# VMTEST_LOGS, VMTEST_CUTS (power cuts, default 5), VMTEST_ROUNDS (recovery
# rounds, default 3), VMTEST_QUIET=1 (no console on stdout), VMTEST_KEEP=1.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"
PATH="$PATH:/usr/sbin:/sbin"    # e2fsck, debugfs, mke2fs

CACHE=${VMTEST_CACHE:-$(bs_target_dir)/vmtest}
[[ -r "$CACHE/vmtest.env" ]] || bs_die "$CACHE/vmtest.env is missing: run scripts/vmtest/fetch.sh first"
# shellcheck source=/dev/null
. "$CACHE/vmtest.env"
: "${KERNEL:?}"
SPLITTER=${SPLITTER:-$(bs_target_dir)/debug/splitter}
NBD_TARGET=${NBD_TARGET:-$(bs_target_dir)/debug/nbd-target}
INITRD=${VMTEST_INITRD:-$CACHE/initramfs.cpio.gz}
LOGS=${VMTEST_LOGS:-$CACHE/logs}
CUTS=${VMTEST_CUTS:-5}
ROUNDS=${VMTEST_ROUNDS:-3}
QEMU=${QEMU:-qemu-system-x86_64}
ALL=(nbd ublk ublk-recovery nbd-restart power-cut)
SCENARIOS=("$@")
((${#SCENARIOS[@]})) || SCENARIOS=("${ALL[@]}")

for b in "$SPLITTER" "$NBD_TARGET"; do
  [[ -x "$b" ]] || bs_die "$b is missing: cargo build --workspace --bins"
done
[[ -r "$KERNEL" ]] || bs_die "guest kernel $KERNEL is missing: run scripts/vmtest/fetch.sh"
[[ -r "$INITRD" ]] || bs_die "$INITRD is missing: run scripts/vmtest/build-initramfs.sh"
for t in "$QEMU" e2fsck debugfs mke2fs timeout flock nbdkit nbdcopy fio objcopy; do
  command -v "$t" >/dev/null || bs_die "$t is missing (scripts/test installs it)"
done

mkdir -p "$LOGS"
# One VM test at a time on this machine (two TCG guests would only slow
# each other down past their time limits).
exec 9>"$CACHE/run.lock"
flock -w 900 9 || bs_die "another VM test held $CACHE/run.lock for 15 minutes"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/blockship-vmsuite.XXXXXX")
PIDS=()
cleanup() {
  local rc=$?
  local p f
  for f in "$LOGS"/*/*.qemu.pid; do
    [[ -f "$f" ]] && kill -KILL "$(cat "$f")" 2>/dev/null || true
  done
  for p in "${PIDS[@]}"; do
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [[ "${VMTEST_KEEP:-0}" == 1 ]]; then
    echo "kept $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

secs_since() {
  local now
  now=$(date +%s%N)
  awk -v a="$1" -v b="$now" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'
}

# shellcheck source=scripts/vmtest/lib.sh
. "$HERE/lib.sh"

# --- scenarios ---------------------------------------------------------------

sc_nbd() {
  local dir=$1
  local disk="$WORK/nbd-disk.img"
  truncate -s 256M "$disk"
  RUST_LOG=${RUST_LOG:-info} "$SPLITTER" serve --disk "$disk" --listen 127.0.0.1:0 --export disk \
    2>"$dir/splitter.log" &
  local sp=$!
  PIDS+=("$sp")
  local port=""
  for _ in $(seq 200); do
    port=$(sed -En 's#.*listening on (nbd://)?127\.0\.0\.1:([0-9]+).*#\2#p' "$dir/splitter.log" | head -n1)
    [[ -z "$port" ]] || break
    sleep 0.1
  done
  [[ -n "$port" ]] || { FAIL_WHY="the splitter did not listen"; return 1; }
  boot nbd "$dir" 180 "vmtest.scenario=nbd vmtest.port=$port vmtest.export=disk vmtest.size=$((256 << 20)) vmtest.conns=2"
  guest_ok || return 1
  local src=0
  bs_stop "$sp" 30 || src=$?
  ((src == 0)) || { FAIL_WHY="the splitter exited with status $src after SIGTERM"; return 1; }
  if grep -Eq 'panicked|ERROR' "$dir/splitter.log"; then
    FAIL_WHY="the splitter logged errors"
    return 1
  fi
  e2fsck -fn "$disk" >"$dir/e2fsck.out" 2>&1 || { FAIL_WHY="e2fsck -fn on the disk file found problems"; return 1; }
  mkdir -p "$dir/out"
  local f
  for f in hello.txt det.txt random.bin second.bin sums.sha256 second.sha256; do
    debugfs -R "dump /$f $dir/out/$f" "$disk" >/dev/null 2>&1
  done
  cat "$dir/out/second.sha256" >>"$dir/out/sums.sha256"
  (cd "$dir/out" && sha256sum -c --quiet sums.sha256) || { FAIL_WHY="the guest's files in the disk file do not match their sums"; return 1; }
  awk -f "$HERE/detfile.awk" | cmp -s - "$dir/out/det.txt" || { FAIL_WHY="det.txt differs"; return 1; }
  if debugfs -R 'stat /many' "$disk" 2>/dev/null | grep -q 'Inode:'; then
    FAIL_WHY="/many, removed by the guest, is still there"
    return 1
  fi
}

sc_ublk() {
  local dir=$1
  data_disk "$WORK/ublk-data.img" 1024
  boot ublk "$dir" 300 "vmtest.scenario=ublk vmtest.rport=$RPORT vmtest.diskid=vm-ublk" \
    -drive "file=$WORK/ublk-data.img,format=raw,if=virtio"
  guest_ok || return 1
  dump_file "$WORK/ublk-data.img" /disk.img "$dir/disk.img" || { FAIL_WHY="no disk.img on the data disk"; return 1; }
  replica_to vm-ublk "$dir/replica.img" || { FAIL_WHY="nbdcopy of the replica failed"; return 1; }
  same "$dir/disk.img" "$dir/replica.img" || return 1
  check_fs_files "$dir/replica.img" "$dir" || return 1
  rm -f "$dir/disk.img" "$dir/replica.img"
}

sc_ublk_recovery() {
  local dir=$1
  data_disk "$WORK/rec-data.img" 1024
  boot ublk-recovery "$dir" 420 "vmtest.scenario=ublk-recovery vmtest.rport=$RPORT vmtest.diskid=vm-recovery vmtest.rounds=$ROUNDS" \
    -drive "file=$WORK/rec-data.img,format=raw,if=virtio"
  guest_ok || return 1
  dump_file "$WORK/rec-data.img" /disk.img "$dir/disk.img" || { FAIL_WHY="no disk.img on the data disk"; return 1; }
  replica_to vm-recovery "$dir/replica.img" || { FAIL_WHY="nbdcopy of the replica failed"; return 1; }
  same "$dir/disk.img" "$dir/replica.img" || return 1
  e2fsck -fn "$dir/replica.img" >"$dir/e2fsck.out" 2>&1 || { FAIL_WHY="e2fsck -fn on the replica found problems"; return 1; }
  rm -f "$dir/disk.img" "$dir/replica.img"
}

sc_nbd_restart() {
  local dir=$1
  local disk="$WORK/restart-disk.img" ring="$WORK/restart.ring"
  truncate -s 256M "$disk"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  local sp
  start_sp() {
    RUST_LOG=${RUST_LOG:-info} "$SPLITTER" serve --disk "$disk" --listen "127.0.0.1:$port" --export disk \
      --ring "$ring" --ring-size 64M --ship-to "127.0.0.1:$RPORT" --disk-id vm-nbd --tls "$WORK/shp" \
      >>"$dir/splitter.log" 2>&1 &
    sp=$!
    PIDS+=("$sp")
    local i
    for i in $(seq 100); do
      (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
      sleep 0.1
    done
    return 1
  }
  start_sp || { FAIL_WHY="the splitter did not listen on $port"; return 1; }
  boot_bg nbd-restart "$dir" 300 "vmtest.scenario=nbd-restart vmtest.port=$port vmtest.rounds=$ROUNDS"
  local r=0 i
  while ((r < ROUNDS)); do
    # The guest says when its writer runs; the splitter is restarted then.
    for i in $(seq 1200); do
      grep -q "@@WRITING round=$r" "$CONSOLE" 2>/dev/null && break
      kill -0 "$QEMU_PID" 2>/dev/null || break
      sleep 0.1
    done
    grep -q "@@WRITING round=$r" "$CONSOLE" || break
    sleep "$(awk -v s="$RANDOM" 'BEGIN { srand(s); printf "%.1f", 0.5 + rand() * 1.5 }')"
    echo "restart $r: SIGKILL pid $sp" >>"$dir/splitter.log"
    kill -KILL "$sp" 2>/dev/null || true
    wait "$sp" 2>/dev/null || true
    sleep 1
    start_sp || { FAIL_WHY="the restarted splitter did not listen"; break; }
    r=$((r + 1))
  done
  boot_wait
  guest_ok || return 1
  bs_stop "$sp" 30 || true
  [[ -z "${FAIL_WHY:-}" ]] || return 1
  e2fsck -fn "$disk" >"$dir/e2fsck.out" 2>&1 || { FAIL_WHY="e2fsck -fn on the disk file found problems"; return 1; }
  # The shipper restarted with the splitter: the replica converges too.
  local j
  for j in $(seq 300); do
    replica_to vm-nbd "$dir/replica.img" 2>/dev/null && cmp -s "$disk" "$dir/replica.img" && break
    sleep 0.2
  done
  same "$disk" "$dir/replica.img" || return 1
  rm -f "$dir/replica.img"
}

sc_power_cut() {
  local dir=$1
  local img="$WORK/cut-data.img" sock="$WORK/cut.sock"
  data_disk "$img" 1024
  local cut acked=0 nbdkit_pid
  # The data disk through nbdkit: file plugin under the cache filter with
  # cache=writeback, so only what the guest flushed reaches the file.
  start_nbdkit() {
    rm -f "$sock"
    nbdkit --foreground --exit-with-parent --unix "$sock" --filter=cache file "$img" cache=writeback \
      >>"$dir/nbdkit.log" 2>&1 &
    nbdkit_pid=$!
    PIDS+=("$nbdkit_pid")
    local i
    for i in $(seq 100); do
      [[ -S "$sock" ]] && return 0
      sleep 0.1
    done
    return 1
  }
  local drive="file=nbd+unix:///?socket=$sock,format=raw,if=virtio,cache=writeback"
  for ((cut = 0; cut <= CUTS; cut++)); do
    start_nbdkit || { FAIL_WHY="nbdkit did not start"; return 1; }
    local mode=load
    ((cut == CUTS)) && mode=final
    boot_bg "boot$cut" "$dir" 240 "vmtest.scenario=power-cut vmtest.rport=$RPORT vmtest.diskid=vm-cut vmtest.mode=$mode vmtest.acked=$acked vmtest.boot=$cut" \
      -drive "$drive"
    if [[ "$mode" == load ]]; then
      local i
      for i in $(seq 1800); do
        grep -q '@@LOADING' "$CONSOLE" 2>/dev/null && break
        kill -0 "$QEMU_PID" 2>/dev/null || break
        sleep 0.1
      done
      if ! grep -q '@@LOADING' "$CONSOLE"; then
        boot_wait
        FAIL_WHY="boot $cut: the guest did not start its load (${RESULT:-no result})"
        return 1
      fi
      sleep "$(awk -v s="$RANDOM" 'BEGIN { srand(s); printf "%.2f", 1 + rand() * 3 }')"
      # The power cut: QEMU itself (not timeout(1), its parent) dies, then
      # the volatile cache with what the guest did not flush. In that order:
      # the guest must not see its disk fail first.
      kill -KILL "$(cat "$QEMU_PIDFILE")" 2>/dev/null || true
      wait "$QEMU_PID" 2>/dev/null || true
      kill -KILL "$nbdkit_pid" 2>/dev/null || true
      wait "$nbdkit_pid" 2>/dev/null || true
      QEMU_PID=""
      if grep -q '^VMTEST RESULT: FAIL' <(tr -d '\r' <"$CONSOLE"); then
        RESULT=$(tr -d '\r' <"$CONSOLE" | grep -m1 '^VMTEST RESULT:')
        FAIL_WHY="boot $cut: $RESULT"
        return 1
      fi
      # The oracle: the last write the guest saw acknowledged, FLUSH included.
      acked=$(tr -d '\r' <"$CONSOLE" | sed -n 's/^@@ACK \([0-9]*\)$/\1/p' | tail -n1)
      acked=${acked:-0}
      echo "cut $cut: last acknowledged generation $acked" >>"$dir/cuts.log"
    else
      boot_wait
      kill -KILL "$nbdkit_pid" 2>/dev/null || true
      wait "$nbdkit_pid" 2>/dev/null || true
      guest_ok || { FAIL_WHY="final boot: $FAIL_WHY"; return 1; }
    fi
  done
  bs_say "$CUTS power cut(s); the last acknowledged generations: $(awk '{print $NF}' "$dir/cuts.log" | tr '\n' ' ')"
  dump_file "$img" /disk.img "$dir/disk.img" || { FAIL_WHY="no disk.img on the data disk"; return 1; }
  replica_to vm-cut "$dir/replica.img" || { FAIL_WHY="nbdcopy of the replica failed"; return 1; }
  same "$dir/disk.img" "$dir/replica.img" || return 1
  rm -f "$dir/disk.img" "$dir/replica.img"
}

# --- the suite ---------------------------------------------------------------

T0=$(date +%s%N)
bs_step "VM suite: ${SCENARIOS[*]} (logs: $LOGS)"
make_pki
make_tools
mkdir -p "$LOGS/target"
start_target "$LOGS/target" || bs_die "nbd-target did not start"
bs_say "nbd-target on 127.0.0.1:$RPORT (replication), 127.0.0.1:$NBDPORT (NBD); tools disk $(du -h --apparent-size "$WORK/tools.img" | cut -f1)"

failed=()
for s in "${SCENARIOS[@]}"; do
  fn="sc_${s//-/_}"
  declare -F "$fn" >/dev/null || bs_die "no scenario $s (known: ${ALL[*]})"
  dir="$LOGS/$s"
  rm -rf "$dir"
  mkdir -p "$dir"
  FAIL_WHY=""
  CONSOLE=""
  ts=$(date +%s%N)
  bs_step "Scenario $s"
  if "$fn" "$dir" && [[ -z "$FAIL_WHY" ]]; then
    echo "SCENARIO $s: PASS ($(secs_since "$ts") s)"
  else
    echo "SCENARIO $s: FAIL ${FAIL_WHY:-(see the logs)} ($(secs_since "$ts") s)"
    if [[ -n "$CONSOLE" && -f "$CONSOLE" ]]; then
      echo "--- end of the guest's console ($CONSOLE) ---"
      tr -d '\r' <"$CONSOLE" | sed -e 's/\x1b[[?0-9;]*[a-zA-Z]//g' | tail -n 80
    fi
    for l in "$dir"/*.log "$LOGS/target/target.log"; do
      [[ -f "$l" ]] || continue
      echo "--- end of $l ---"
      tail -n 25 "$l"
    done
    failed+=("$s")
  fi
  if [[ -n "$QEMU_PID" ]]; then
    kill -KILL "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=""
  fi
done
bs_stop "$TARGET_PID" 20 || true

if ((${#failed[@]})); then
  bs_die "VM suite: ${#failed[@]} of ${#SCENARIOS[@]} scenario(s) failed: ${failed[*]} ($(secs_since "$T0") s)"
fi
bs_step "VM suite: all ${#SCENARIOS[@]} scenario(s) passed in $(secs_since "$T0") s"
