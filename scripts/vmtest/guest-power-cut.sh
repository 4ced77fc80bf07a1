#!/bin/sh
# shellcheck shell=sh
#
# scripts/vmtest/guest-power-cut.sh — one boot of the power-cut scenario
# (guest scenario "power-cut"; host side: suite.sh, which kills QEMU and
# the volatile write cache in front of the data disk at a random moment).
#
# The data disk /dev/vdb (ext4) holds the splitter's disk file disk.img
# (64 slots of 4 KiB are written) and its ring. Every boot first checks
# what the last cut left, against the oracle the host passes in:
# vmtest.acked=N, the last generation the guest printed "@@ACK N" for,
# which it prints only after the write and a FLUSH (fsync of /dev/ublkb0)
# returned. A generation g goes to slot g % 64 as 4 KiB of a line naming g
# and its slot, so each slot must hold the newest acknowledged generation
# written to it (or one of the few written after the last acknowledged one,
# possibly torn), and nothing older: an acknowledged write lost, or writes
# reaching the disk out of order, fail the check. The ring must have lost no
# record (records_lost 0) after its recovery.
#
# vmtest.mode=load: then the splitter serves disk.img as /dev/ublkb0 and
# ships to the host's target; the writer prints "@@LOADING" and writes and
# flushes generation after generation until the cut.
# vmtest.mode=final: no load; the shipper catches up (the ring shipped
# completely), SIGTERM, and the host compares the replica with disk.img.
#
# /data/state (fsynced before any load) holds the slots' generations as
# verified at the start of this boot and the first generation this boot
# writes, so the next boot knows what to expect.
. /lib.sh

RPORT=$(arg vmtest.rport)
DISK_ID=$(arg vmtest.diskid)
MODE=$(arg vmtest.mode)
ACKED=$(arg vmtest.acked)
ACKED=${ACKED:-0}
BOOT=$(arg vmtest.boot)
SLOTS=64
DEV=/dev/ublkb0
mkdir -p /data
mount -t ext4 /dev/vdb /data || fail "mount /dev/vdb after the cut (ext4 journal recovery)"

# line G S — the 31 characters each line of generation G's block holds.
line() { printf 'gen=%010d slot=%02d ........' "$1" "$2"; }

# slot_gen FILE S — the generation slot S of FILE holds: a number, "zero"
# (never written), or "torn" (lines of different generations).
slot_gen() {
  dd if="$1" bs=4096 skip="$2" count=1 2>/dev/null | sort -u >/tmp/slot
  if [ "$(tr -d '\000\n' </tmp/slot | wc -c)" = 0 ]; then
    echo zero
    return
  fi
  if [ "$(wc -l </tmp/slot)" != 1 ]; then
    echo torn
    return
  fi
  # (leading zeros stripped: busybox printf would read them as octal)
  g=$(sed -n 's/^gen=0*\([0-9][0-9]*\) slot=.*/\1/p' /tmp/slot)
  n=$(sed -n 's/^gen=[0-9]* slot=0*\([0-9][0-9]*\) .*/\1/p' /tmp/slot)
  if [ -n "$g" ] && [ "$n" = "$2" ] && [ "$(line "$g" "$n")" = "$(cat /tmp/slot)" ]; then
    echo "$g"
  else
    echo torn
  fi
}

if [ ! -f /data/disk.img ]; then
  log "boot $BOOT: a new disk file"
  truncate -s 64M /data/disk.img || fail "truncate"
  i=0
  : >/data/state.new
  while [ $i -lt $SLOTS ]; do echo "$i 0" >>/data/state.new; i=$((i + 1)); done
  echo "first 1" >>/data/state.new
else
  # --- the check ---------------------------------------------------------------
  [ -f /data/state ] || fail "boot $BOOT: /data/state is missing (it was fsynced before the last load)"
  first=$(sed -n 's/^first //p' /data/state)
  # The newest acknowledged generation of this disk's writes so far; the
  # ones after it may or may not have landed.
  a=$ACKED
  [ "$a" -ge $((first - 1)) ] || a=$((first - 1))
  bad=0
  s=0
  : >/data/state.new
  while [ $s -lt $SLOTS ]; do
    base=$(sed -n "s/^$s //p" /data/state)
    # expected: the largest g in [first, a] with g % SLOTS == s, else base
    exp=$base
    if [ "$a" -ge "$first" ]; then
      g=$((a - ((a - s) % SLOTS + SLOTS) % SLOTS))
      [ "$g" -ge "$first" ] && exp=$g
    fi
    got=$(slot_gen /data/disk.img $s)
    ok=0
    case $got in
      zero) [ "$exp" = 0 ] && ok=1 ;;
      torn) ;;
      *) [ "$got" = "$exp" ] && ok=1 ;;
    esac
    if [ $ok = 0 ]; then
      # The generations after the last acknowledged one may have landed (torn or whole).
      for u in $((a + 1)) $((a + 2)) $((a + 3)); do
        if [ $((u % SLOTS)) = $s ]; then
          case $got in torn | "$u") ok=1 ;; esac
        fi
      done
    fi
    if [ $ok = 0 ]; then
      log "boot $BOOT: slot $s holds generation $got, expected $exp (acknowledged up to $ACKED, this disk's writes since $first)"
      bad=$((bad + 1))
    fi
    case $got in torn | zero) got=$exp ;; esac
    echo "$s $got" >>/data/state.new
    s=$((s + 1))
  done
  [ $bad = 0 ] || fail "boot $BOOT: $bad slot(s) lost an acknowledged write or hold writes out of order"
  log "boot $BOOT: every write acknowledged before the cut (up to generation $ACKED) is on the disk, in order"
  echo "first $((a + 4))" >>/data/state.new
fi
mv /data/state.new /data/state
sync

splitter_start /tmp/splitter.log --disk /data/disk.img --ring /data/disk.ring --ring-size 16M \
  --ublk --ublk-id 0 --ship-to "$HOST:$RPORT" --disk-id "$DISK_ID" --tls /opt/tls
wait_ublk_ready /tmp/splitter.log 0
"$SPLITTER" ring status --ring /data/disk.ring --json >/tmp/ring.json || fail "ring status"
lost=$(json_val /tmp/ring.json records_lost)
[ "$lost" = 0 ] || { cat /tmp/ring.json; fail "boot $BOOT: the ring lost $lost record(s) in the cut"; }
log "boot $BOOT: ring recovered: $(json_val /tmp/ring.json records_waiting) record(s) waiting, $(json_val /tmp/ring.json dirty_bytes) dirty bytes, none lost"

if [ "$MODE" = load ]; then
  g=$(sed -n 's/^first //p' /data/state)
  echo "@@LOADING from generation $g"
  while :; do
    s=$((g % SLOTS))
    yes "$(line "$g" "$s")" | head -c 4096 >/tmp/blk
    dd if=/tmp/blk of=$DEV bs=4096 seek=$s count=1 oflag=direct conv=notrunc,fsync 2>/dev/null ||
      fail "boot $BOOT: write of generation $g failed"
    echo "@@ACK $g"
    g=$((g + 1))
  done
fi

# final: everything shipped, a clean stop.
wait_converged /data/disk.ring 180
kill -TERM "$SPLITTER_PID"
wait "$SPLITTER_PID"
rc=$?
[ $rc = 0 ] || fail "the splitter exited with status $rc after SIGTERM"
umount /data || fail "umount /data"
pass
