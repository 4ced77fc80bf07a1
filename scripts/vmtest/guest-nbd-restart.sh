#!/bin/sh
# shellcheck shell=sh
#
# scripts/vmtest/guest-nbd-restart.sh — the kernel NBD client across
# restarts of the splitter (guest scenario "nbd-restart"; host side:
# suite.sh, which kills the splitter with SIGKILL and starts it again on
# the same port each time the guest prints "@@WRITING round=R").
#
# /dev/nbd0 is attached with `splitter nbd-attach` (netlink, a
# dead-connection timeout, reconnection on the kernel's LINK_DEAD): ext4 on
# it is written by a writer that fsyncs each file while the splitter is
# killed and restarted; the writer must finish without an error, the file
# system stay mounted with no I/O error in the kernel log, every fsynced
# file read back intact (caches dropped), and e2fsck -fn find it clean.
. /lib.sh

PORT=$(arg vmtest.port)
ROUNDS=$(arg vmtest.rounds)
ROUNDS=${ROUNDS:-3}
DEV=/dev/nbd0
MNT=/mnt
[ -n "$PORT" ] || fail "no vmtest.port= on the kernel command line"
log "splitter nbd-attach --device $DEV --connect $HOST:$PORT --export disk --timeout 5 --dead-conn-timeout 60"
"$SPLITTER" nbd-attach --device "$DEV" --connect "$HOST:$PORT" --export disk --timeout 5 \
  --dead-conn-timeout 60 >/tmp/attach.log 2>&1 &
APID=$!
wait_for "[ \"\$(cat /sys/block/nbd0/size)\" != 0 ] || ! kill -0 $APID 2>/dev/null" 30 "$DEV was not attached"
kill -0 $APID 2>/dev/null || fail "splitter nbd-attach exited"
log "attached: $(blockdev --getsize64 $DEV) bytes"
"$X/mke2fs" -q -F -t ext4 "$DEV" || fail "mke2fs"
mount -t ext4 "$DEV" "$MNT" || fail "mount"
: >/tmp/acked.sha256
r=0
while [ $r -lt "$ROUNDS" ]; do
  fsynced_writer "$MNT" $r &
  WPID=$!
  echo "@@WRITING round=$r"
  wait "$WPID"
  wrc=$?
  dmesg | grep -i nbd | tail -n 5 | sed 's/^/VMTEST: dmesg: /'
  grep -E 'dead connection|reconnected' /tmp/attach.log | tail -n 2 | sed 's/^/VMTEST: /'
  [ $wrc = 0 ] || fail "round $r: the writer failed (status $wrc) across the splitter's restart"
  grep -q " $MNT " /proc/mounts || fail "round $r: $MNT is no longer mounted"
  no_io_errors "round $r"
  sync
  echo 3 >/proc/sys/vm/drop_caches
  sha256sum -c -s /tmp/acked.sha256 || fail "round $r: fsynced files do not read back"
  log "round $r: the writer finished across the restart, $(wc -l </tmp/acked.sha256) fsynced files intact"
  r=$((r + 1))
done
umount "$MNT" || fail "umount"
"$X/e2fsck" -fn "$DEV" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck -fn"; }
grep -q reconnected /tmp/attach.log || fail "nbd-attach never reconnected (did the splitter restart?)"
kill -TERM $APID
wait $APID
"$SPLITTER" nbd-attach --device "$DEV" --detach >>/tmp/attach.log 2>&1 || fail "nbd-attach --detach"
wait_for "[ \"\$(cat /sys/block/nbd0/size)\" = 0 ]" 10 "$DEV still attached after --detach"
pass
