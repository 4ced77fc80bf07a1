#!/bin/sh
# shellcheck shell=sh
#
# scripts/vmtest/guest-ublk-recovery.sh — the splitter's crash and upgrade
# under a mounted file system (guest scenario "ublk-recovery"; host side:
# suite.sh). ext4 on /dev/ublkb0 is written by a writer that fsyncs each
# file and records its checksum once the fsync returned. In each round
# (vmtest.rounds, default 3), while the writer runs:
#   even rounds: kill -9 of the splitter, then a new one re-attaches
#                (round 0: --recover 0; round 2: --ublk-id 0, which recovers
#                a quiesced device by itself);
#   odd rounds:  an upgrade: a new splitter starts with --recover 0 while the
#                old one runs; the old one hands the device over and exits 0.
# Then the writer must finish without an error, the file system must still
# be mounted with no I/O error in the kernel log, and every file whose fsync
# returned must read back (from the device: caches dropped) with its
# checksum. At the end: umount, e2fsck -fn, the ring shipped completely,
# SIGTERM removes the device. The host compares the replica with the disk.
. /lib.sh

RPORT=$(arg vmtest.rport)
DISK_ID=$(arg vmtest.diskid)
ROUNDS=$(arg vmtest.rounds)
ROUNDS=${ROUNDS:-3}
MNT=/mnt
DEV=/dev/ublkb0
[ -n "$RPORT" ] || fail "no vmtest.rport= on the kernel command line"
mkdir -p /data
mount -t ext4 /dev/vdb /data || fail "mount /dev/vdb (the data disk)"
truncate -s 256M /data/disk.img || fail "truncate disk.img"
ARGS="--disk /data/disk.img --ring /data/disk.ring --ring-size 64M --ublk --ship-to $HOST:$RPORT --disk-id $DISK_ID --tls /opt/tls"
# shellcheck disable=SC2086
splitter_start /tmp/splitter.log $ARGS --ublk-id 0
wait_ublk_ready /tmp/splitter.log 0
"$X/mke2fs" -q -F -t ext4 "$DEV" || fail "mke2fs -t ext4 $DEV"
mount -t ext4 "$DEV" "$MNT" || fail "mount $DEV"
: >/tmp/acked.sha256

r=0
while [ $r -lt "$ROUNDS" ]; do
  fsynced_writer "$MNT" $r &
  WPID=$!
  sleep 1
  OLD=$SPLITTER_PID
  if [ $((r % 2)) = 1 ]; then
    log "round $r: upgrade: a new splitter with --recover 0 while pid $OLD serves"
    # shellcheck disable=SC2086
    splitter_start /tmp/splitter.log $ARGS --recover 0
    wait "$OLD"
    orc=$?
    [ $orc = 0 ] || fail "round $r: the old splitter exited with status $orc after the hand-over"
    grep -q 'handed over' /tmp/splitter.log || fail "round $r: the old splitter did not say it handed over"
  else
    log "round $r: kill -9 of the splitter (pid $OLD) under the writer"
    kill -KILL "$OLD"
    wait "$OLD" 2>/dev/null
    sleep 0.5
    if [ $r = 0 ]; then how="--recover 0"; else how="--ublk-id 0"; fi
    # shellcheck disable=SC2086
    splitter_start /tmp/splitter.log $ARGS $how
  fi
  # Round r is the (r+1)-th recovery the log reports.
  wait_for "[ \$(grep -c 'ublk device /dev/ublkb0 recovered' /tmp/splitter.log) -ge $((r + 1)) ]" 60 \
    "round $r: the new splitter did not recover /dev/ublkb0"
  grep 'recovered' /tmp/splitter.log | tail -n 1 | sed 's/^/VMTEST: /'
  wait "$WPID"
  wrc=$?
  [ $wrc = 0 ] || fail "round $r: the writer failed (status $wrc) across the restart"
  grep -q " $MNT " /proc/mounts || fail "round $r: $MNT is no longer mounted"
  no_io_errors "round $r"
  sync
  echo 3 >/proc/sys/vm/drop_caches
  sha256sum -c -s /tmp/acked.sha256 || { sha256sum -c /tmp/acked.sha256 | grep -v OK | head; fail "round $r: files whose fsync returned do not read back"; }
  log "round $r: the writer finished, $MNT stayed mounted, $(wc -l </tmp/acked.sha256) fsynced files read back intact"
  r=$((r + 1))
done

umount "$MNT" || fail "umount $MNT"
"$X/e2fsck" -fn "$DEV" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck -fn $DEV after the restarts"; }
log "e2fsck -fn: clean after $ROUNDS restarts"
blockdev --flushbufs "$DEV"
wait_converged /data/disk.ring 180
stop_ublk_splitter "$DEV"
umount /data || fail "umount /data"
pass
