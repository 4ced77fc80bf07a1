#!/bin/sh
# shellcheck shell=sh
#
# scripts/vmtest/guest-bench.sh — the kernel block device paths measured in
# one guest boot (guest scenario "bench"; host side: scripts/bench/vm).
# Emulation makes absolute numbers meaningless; ratios within one boot are
# not. One backing file (/data/disk.img on the data disk, ext4) serves, in
# turn, through:
#   loop-ref     libublk's own `loop` example (/opt/bin/loop, async, O_DIRECT)
#   ublk         splitter serve --ublk, no ring (capture off)
#   ublk-ring    splitter serve --ublk --ring (capture on)
#   nbdkit-ref   nbdkit's file plugin on 127.0.0.1, /dev/nbd0 by nbd-attach
#   nbd          splitter serve (NBD, no ring) through the same client
#   nbd-ring     splitter serve --ring through the same client
# and fio runs the same jobs on each (direct I/O, libaio): sequential 1M
# writes (iodepth 4), random 4k writes (iodepth 16) and random 4k writes at
# queue depth 1 (the latency of one request), vmtest.runtime
# seconds each (default 8). Each result is a line
#   BENCH <path> <job> <MB/s> <IOPS> <mean latency us>
. /lib.sh

RT=$(arg vmtest.runtime)
RT=${RT:-8}
mkdir -p /data
mount -t ext4 /dev/vdb /data || fail "mount /dev/vdb"
rm -f /data/disk.img /data/disk.ring /data/disk.ring.*
# Allocated (not sparse): every path writes over the same blocks.
dd if=/dev/zero of=/data/disk.img bs=1M count=512 2>/dev/null || fail "make disk.img"
sync

# jobs DEV PATH
jobs() {
  for j in "write 1M 4" "randwrite 4k 16" "randwrite 4k 1"; do
    set -- "$1" "$2" $j
    /opt/bin/fio --name=b --filename="$1" --thread --direct=1 --ioengine=libaio --rw="$3" --bs="$4" \
      --iodepth="$5" --size=512M --time_based --runtime="$RT" --ramp_time=1 \
      --output-format=terse --terse-version=3 >/tmp/fio.terse 2>/tmp/fio.err ||
      { cat /tmp/fio.err; fail "fio $3 $4 on $2"; }
    # terse v3 (this fio): 48 write bandwidth KiB/s, 49 write IOPS, 81 write
    # total latency mean (us)
    q=""
    [ "$5" = 1 ] && q="-qd1"
    awk -F';' -v p="$2" -v j="$3-$4$q" 'NR==1 { printf "BENCH %s %s %.1f %d %.0f\n", p, j, $48/1024, $49, $81 }' /tmp/fio.terse
  done
}

stop_pid() {
  kill -TERM "$1" 2>/dev/null
  wait "$1" 2>/dev/null
}

# --- ublk: libublk's loop example, then the splitter ---------------------------
/opt/bin/loop add -n 1 -f /data/disk.img --foreground -q 1 -d 64 -a >/tmp/loop.log 2>&1 &
LP=$!
wait_for "[ -b /dev/ublkb1 ] || ! kill -0 $LP 2>/dev/null" 30 "the loop example did not make /dev/ublkb1"
sleep 1
jobs /dev/ublkb1 loop-ref
/opt/bin/loop del -n 1 >>/tmp/loop.log 2>&1
stop_pid $LP

for mode in plain ring; do
  ring=""
  name=ublk
  if [ $mode = ring ]; then
    ring="--ring /data/disk.ring --ring-size 256M"
    name=ublk-ring
  fi
  : >/tmp/splitter.log
  # shellcheck disable=SC2086
  splitter_start /tmp/splitter.log --disk /data/disk.img $ring --ublk --ublk-id 0
  wait_ublk_ready /tmp/splitter.log 0
  # A drain keeps the ring from overflowing (what the shipper would do).
  if [ $mode = ring ]; then
    "$SPLITTER" ring drain --ring /data/disk.ring >/tmp/drain.log 2>&1 &
    DP=$!
  fi
  jobs /dev/ublkb0 $name
  stop_pid "$SPLITTER_PID"
  [ $mode = ring ] && stop_pid $DP
  wait_for "[ ! -e /dev/ublkb0 ]" 20 "/dev/ublkb0 still there"
  rm -f /data/disk.ring /data/disk.ring.*
done

# --- the kernel NBD client: nbdkit's file plugin, then the splitter ------------
attach() {
  "$SPLITTER" nbd-attach --device /dev/nbd0 --connect 127.0.0.1:10809 --export "$1" >/tmp/attach.log 2>&1 &
  AP=$!
  wait_for "[ \"\$(cat /sys/block/nbd0/size)\" != 0 ] || ! kill -0 $AP 2>/dev/null" 30 "/dev/nbd0 not attached"
}
detach() {
  stop_pid $AP
  "$SPLITTER" nbd-attach --device /dev/nbd0 --detach >>/tmp/attach.log 2>&1
  wait_for "[ \"\$(cat /sys/block/nbd0/size)\" = 0 ]" 20 "/dev/nbd0 still attached"
}
/opt/bin/nbdkit --foreground --exit-with-parent -i 127.0.0.1 -p 10809 -e disk \
  /opt/bin/nbdkit-file-plugin.so file=/data/disk.img >/tmp/nbdkit.log 2>&1 &
NP=$!
sleep 2
kill -0 $NP 2>/dev/null || { cat /tmp/nbdkit.log; fail "nbdkit exited"; }
attach disk
jobs /dev/nbd0 nbdkit-ref
detach
stop_pid $NP

for mode in plain ring; do
  ring=""
  name=nbd
  if [ $mode = ring ]; then
    ring="--ring /data/disk.ring --ring-size 256M"
    name=nbd-ring
  fi
  : >/tmp/splitter.log
  # shellcheck disable=SC2086
  splitter_start /tmp/splitter.log --disk /data/disk.img $ring --listen 127.0.0.1:10809 --export disk
  wait_for "grep -q 'listening on' /tmp/splitter.log" 30 "the splitter did not listen"
  if [ $mode = ring ]; then
    "$SPLITTER" ring drain --ring /data/disk.ring >/tmp/drain.log 2>&1 &
    DP=$!
  fi
  attach disk
  jobs /dev/nbd0 $name
  detach
  stop_pid "$SPLITTER_PID"
  [ $mode = ring ] && stop_pid $DP
  rm -f /data/disk.ring /data/disk.ring.*
done
umount /data
pass
