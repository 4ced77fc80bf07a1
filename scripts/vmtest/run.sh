#!/usr/bin/env bash
#
# scripts/vmtest/run.sh — the kernel NBD client against the splitter, end to end.
#
#   scripts/vmtest/fetch.sh && scripts/vmtest/build-initramfs.sh && scripts/vmtest/run.sh
#
# 1. makes a fresh sparse disk file (256 MiB) in a temporary folder and serves
#    it with `splitter serve --disk DISK --listen 127.0.0.1:PORT --export disk`
#    (PORT: a free one the kernel picks, read back from the splitter's
#    "listening on" line);
# 2. boots the test guest under QEMU (TCG, one CPU, user networking: the
#    guest reaches the host's 127.0.0.1:PORT at 10.0.2.2:PORT) with a hard
#    time limit; the guest runs guest-test.sh against /dev/nbd0 and powers
#    off. Its console goes to LOGS/console.log (and to stdout unless
#    VMTEST_QUIET=1);
# 3. requires the guest's "VMTEST RESULT: PASS" line;
# 4. stops the splitter with SIGTERM, which must exit with status 0;
# 5. checks the disk file from the host: e2fsck -fn finds a clean ext4, and
#    the files the guest wrote (read out with debugfs) are intact: det.txt
#    equals what detfile.awk prints here, random.bin and second.bin match the
#    sha256 sums the guest stored beside them.
# Everything it started and the temporary folder go away on exit; the logs
# stay in LOGS. Exit status 0 = pass.
#
# Env: SPLITTER (default target/debug/splitter), VMTEST_CACHE (default
# target/vmtest), VMTEST_LOGS (default CACHE/logs), VMTEST_TIMEOUT (seconds
# for the guest, default 180), VMTEST_DISK_MIB (256), VMTEST_CONNS
# (connections for the multi-conn phases, default 2), VMTEST_PORT (default 0:
# any free port), VMTEST_QUIET=1, VMTEST_KEEP=1 (keep the temporary folder),
# VMTEST_SMP (guest CPUs, default 2: with two CPUs the kernel's NBD client
# spreads I/O over its connections, so multi-conn is exercised; with one,
# all I/O goes down the first connection).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"
PATH="$PATH:/usr/sbin:/sbin"    # e2fsck, debugfs

CACHE=${VMTEST_CACHE:-$(bs_target_dir)/vmtest}
[[ -r "$CACHE/vmtest.env" ]] || bs_die "$CACHE/vmtest.env is missing: run scripts/vmtest/fetch.sh first"
# shellcheck source=/dev/null
. "$CACHE/vmtest.env"
: "${KERNEL:?}"
SPLITTER=${SPLITTER:-$(bs_target_dir)/debug/splitter}
INITRD=${VMTEST_INITRD:-$CACHE/initramfs.cpio.gz}
LOGS=${VMTEST_LOGS:-$CACHE/logs}
TIMEOUT=${VMTEST_TIMEOUT:-180}
DISK_MIB=${VMTEST_DISK_MIB:-256}
CONNS=${VMTEST_CONNS:-2}
QEMU=${QEMU:-qemu-system-x86_64}

[[ -x "$SPLITTER" ]] || bs_die "$SPLITTER is missing: cargo build -p splitter (or set SPLITTER)"
[[ -r "$KERNEL" ]] || bs_die "guest kernel $KERNEL is missing: run scripts/vmtest/fetch.sh"
[[ -r "$INITRD" ]] || bs_die "$INITRD is missing: run scripts/vmtest/build-initramfs.sh"
for t in "$QEMU" e2fsck debugfs timeout flock; do
  command -v "$t" >/dev/null || bs_die "$t is missing: run scripts/vmtest/fetch.sh"
done

mkdir -p "$LOGS"
CONSOLE="$LOGS/console.log"
SPLOG="$LOGS/splitter.log"
: >"$CONSOLE"
: >"$SPLOG"

# One VM test at a time on this machine (two TCG guests would only slow
# each other down past their time limits).
exec 9>"$CACHE/run.lock"
flock -w 900 9 || bs_die "another VM test held $CACHE/run.lock for 15 minutes"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/blockship-vmtest.XXXXXX")
SPLITTER_PID=""
QEMU_PID=""
TAIL_PID=""
cleanup() {
  local rc=$?
  if [[ -n "$QEMU_PID" ]] && kill -0 "$QEMU_PID" 2>/dev/null; then
    kill -TERM "$QEMU_PID" 2>/dev/null || true    # timeout(1) passes it on to QEMU
    wait "$QEMU_PID" 2>/dev/null || true
  fi
  if [[ -n "$TAIL_PID" ]]; then
    kill "$TAIL_PID" 2>/dev/null || true
    wait "$TAIL_PID" 2>/dev/null || true
  fi
  if [[ -n "$SPLITTER_PID" ]]; then
    bs_stop "$SPLITTER_PID" 10 || true
  fi
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

# secs_since START_NS — seconds elapsed, one decimal.
secs_since() {
  local now
  now=$(date +%s%N)
  awk -v a="$1" -v b="$now" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'
}

T0=$(date +%s%N)
bs_step "Serving a fresh ${DISK_MIB} MiB disk with the splitter"
DISK="$WORK/disk.img"
truncate -s "${DISK_MIB}M" "$DISK"
SIZE=$((DISK_MIB * 1024 * 1024))
RUST_LOG=${RUST_LOG:-info} "$SPLITTER" serve --disk "$DISK" \
  --listen "127.0.0.1:${VMTEST_PORT:-0}" --export disk 2>"$SPLOG" &
SPLITTER_PID=$!
PORT=""
for _ in $(seq 200); do
  PORT=$(sed -En 's#.*listening on (nbd://)?127\.0\.0\.1:([0-9]+).*#\2#p' "$SPLOG" | head -n1)
  [[ -z "$PORT" ]] || break
  if ! kill -0 "$SPLITTER_PID" 2>/dev/null; then
    cat "$SPLOG" >&2
    bs_die "the splitter exited before it listened"
  fi
  sleep 0.1
done
[[ -n "$PORT" ]] || { cat "$SPLOG" >&2; bs_die "the splitter did not say where it listens within 20 s"; }
bs_say "splitter pid $SPLITTER_PID on 127.0.0.1:$PORT (log: $SPLOG)"

bs_step "Booting the guest (QEMU TCG, time limit ${TIMEOUT}s; console: $CONSOLE)"
TQ=$(date +%s%N)
# -accel tcg,thread=single: KVM does not work on these hosts, and
# multi-threaded TCG corrupted guest state; two vCPUs on one TCG thread are
# safe (round-robin). romfile= : no option ROM needed
# (the kernel is booted directly), so no ipxe package either.
timeout --kill-after=10 "$TIMEOUT" "$QEMU" \
  -accel tcg,thread=single -cpu max -smp "${VMTEST_SMP:-2}" -m 512M \
  -nographic -no-reboot \
  -kernel "$KERNEL" -initrd "$INITRD" \
  -append "console=ttyS0 quiet panic=-1 vmtest.port=$PORT vmtest.export=disk vmtest.size=$SIZE vmtest.conns=$CONNS" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= \
  </dev/null >"$CONSOLE" 2>&1 &
QEMU_PID=$!
if [[ "${VMTEST_QUIET:-0}" != 1 ]]; then
  # (without the carriage returns and the firmware's terminal escapes)
  tail -n +1 -f --pid="$QEMU_PID" "$CONSOLE" | sed -u -e 's/\r$//' -e 's/\x1b[[?0-9;]*[a-zA-Z]//g; s/\x1bc//g' &
  TAIL_PID=$!
fi
qrc=0
wait "$QEMU_PID" || qrc=$?
QEMU_PID=""
if [[ -n "$TAIL_PID" ]]; then
  wait "$TAIL_PID" 2>/dev/null || true
  TAIL_PID=""
fi
QEMU_SECS=$(secs_since "$TQ")

fail=""
if ((qrc == 124 || qrc == 137)); then
  fail="the guest did not finish within ${TIMEOUT}s"
elif ((qrc != 0)); then
  fail="QEMU exited with status $qrc"
fi
result=$(tr -d '\r' <"$CONSOLE" | grep -m1 '^VMTEST RESULT:' || true)
bs_say "QEMU ran ${QEMU_SECS}s (status $qrc); guest: ${result:-no VMTEST RESULT line}"
if [[ "$result" != "VMTEST RESULT: PASS" ]]; then
  fail="${fail:+$fail; }guest: ${result:-no VMTEST RESULT line}"
fi
[[ -z "$fail" ]] || {
  if [[ "${VMTEST_QUIET:-0}" == 1 ]]; then
    echo "--- end of the console log ($CONSOLE) ---" >&2
    tail -n 60 "$CONSOLE" | tr -d '\r' >&2
  fi
  echo "--- end of the splitter log ($SPLOG) ---" >&2
  tail -n 30 "$SPLOG" >&2
  bs_die "$fail"
}

bs_step "Stopping the splitter (SIGTERM; it must exit with status 0)"
src=0
bs_stop "$SPLITTER_PID" 30 || src=$?
SPLITTER_PID=""
if ((src != 0)); then
  tail -n 30 "$SPLOG" >&2
  bs_die "the splitter exited with status $src after SIGTERM"
fi
if grep -Eq 'panicked|ERROR' "$SPLOG"; then
  grep -E 'panicked|ERROR' "$SPLOG" | head -n 20 >&2
  bs_die "the splitter logged errors while the kernel client used it (log: $SPLOG)"
fi
bs_say "exited 0; it served $(grep -c ': connected' "$SPLOG" || true) connections"

bs_step "Checking the disk file from the host"
e2fsck -fn "$DISK" >"$WORK/e2fsck.out" 2>&1 || { cat "$WORK/e2fsck.out" >&2; bs_die "e2fsck -fn on the disk file found problems"; }
bs_say "e2fsck -fn: clean ($(tail -n1 "$WORK/e2fsck.out"))"
# dbg CMD — run one debugfs command on the disk file (read-only), stdout only.
dbg() { debugfs -R "$1" "$DISK" 2>/dev/null; }
hello=$(dbg 'cat /hello.txt')
[[ "$hello" == "hello from the guest's kernel NBD client" ]] || bs_die "/hello.txt holds '$hello'"
awk -f "$HERE/detfile.awk" >"$WORK/det.expected"
dbg 'cat /det.txt' >"$WORK/det.txt"
cmp "$WORK/det.expected" "$WORK/det.txt" || bs_die "/det.txt in the disk file differs from what detfile.awk prints"
bs_say "/hello.txt and /det.txt ($(stat -c %s "$WORK/det.txt") bytes) are what the guest wrote"
mkdir "$WORK/out"
for f in hello.txt det.txt random.bin second.bin; do
  dbg "dump /$f $WORK/out/$f" >/dev/null
done
dbg 'cat /sums.sha256' >"$WORK/out/sums.sha256"
dbg 'cat /second.sha256' >>"$WORK/out/sums.sha256"
[[ $(wc -l <"$WORK/out/sums.sha256") -eq 4 ]] || bs_die "the checksum files in the disk file are incomplete"
(cd "$WORK/out" && sha256sum -c --quiet sums.sha256) || bs_die "files in the disk file do not match the guest's checksums"
bs_say "random.bin (8 MiB) and second.bin (4 MiB) match the guest's sha256 sums"
if dbg 'stat /many' | grep -q 'Inode:'; then
  bs_die "/many, removed by the guest, is still in the file system"
fi
bs_say "disk file: $(du -k --apparent-size "$DISK" | cut -f1) KiB apparent, $(du -k "$DISK" | cut -f1) KiB allocated"

bs_step "VM test passed in $(secs_since "$T0")s (QEMU ${QEMU_SECS}s)"
