#!/bin/sh
# shellcheck shell=sh
#
# scripts/vmtest/guest-nbd.sh — the guest scenario "nbd" (as /scenarios/nbd.sh;
# host side: suite.sh)
# (busybox ash, so plain sh: the guest has no bash). It drives the splitter
# on the host through the guest kernel's NBD client, /dev/nbd0:
#
# 1. nbd-client connects (one connection) to the export; the size must match;
# 2. patterns written with O_DIRECT at several offsets (the start, an odd
#    sector, across the middle, near the end, the last sector) read back
#    equal, and the sectors around them stay zero;
# 3. the device is disconnected and connected again with several connections
#    (multi-conn, when this nbd-client has -connections): the patterns are
#    still there; BLKZEROOUT (blkdiscard -z) zeroes a range; a plain discard
#    of another range succeeds;
# 4. mke2fs makes ext4 on /dev/nbd0; it is mounted and gets files: a 5.6 MB
#    deterministic file (detfile.awk, which the host recomputes), 8 MiB of
#    random data with its sha256 saved beside it, 200 small files;
#    sync, umount, e2fsck -fn, disconnect;
# 5. connected again (multi-conn): e2fsck -fn, mount, every checksum and file
#    verified, one more file written, fstrim, umount, e2fsck -fn, disconnect.
#
# It prints "VMTEST RESULT: PASS", or "VMTEST RESULT: FAIL <why>" at the
# first failure (with the end of the kernel log). Parameters come from the
# kernel command line: vmtest.port=PORT (required), vmtest.export=NAME,
# vmtest.size=BYTES (the expected export size), vmtest.conns=N.
#
# The real tools are in /xbin and called by full path: busybox has applets
# called nbd-client, mke2fs, e2fsck and blkdiscard, and its shell prefers
# them to anything on PATH.
# arg, log, X, HOST and write_files come from the shared /lib.sh; this
# script's fail() (below) also disconnects the device.
. /lib.sh

DEV=/dev/nbd0
MNT=/mnt

PORT=$(arg vmtest.port)
EXPORT=$(arg vmtest.export)
EXPORT=${EXPORT:-disk}
SIZE=$(arg vmtest.size)
CONNS=$(arg vmtest.conns)
CONNS=${CONNS:-2}

# fail WHY — report the failure with the kernel's last words, tidy up, stop
# (replaces the shared one: it also unmounts and disconnects).
fail() {
  echo "VMTEST: --- last kernel messages ---"
  dmesg | tail -n 40
  echo "VMTEST RESULT: FAIL $*"
  umount "$MNT" 2>/dev/null
  "$X/nbd-client" -d "$DEV" >/dev/null 2>&1
  exit 1
}

# connect N — attach /dev/nbd0 to the export with N connections.
connect() {
  n=$1
  set -- -N "$EXPORT" "$HOST" "$PORT" "$DEV" -timeout 30
  if [ "$n" -gt 1 ]; then
    set -- "$@" -connections "$n"
  fi
  log "nbd-client $*"
  "$X/nbd-client" "$@" || fail "nbd-client $* failed"
  got=$(blockdev --getsize64 "$DEV") || fail "blockdev --getsize64 $DEV"
  if [ -n "$SIZE" ] && [ "$got" != "$SIZE" ]; then
    fail "$DEV is $got bytes, the export is $SIZE"
  fi
  log "connected: $got bytes, logical sector $(blockdev --getss "$DEV"), $n connection(s)"
}

# disconnect — detach /dev/nbd0 and wait until the kernel has let it go.
disconnect() {
  "$X/nbd-client" -d "$DEV" || fail "nbd-client -d $DEV"
  i=0
  while [ "$(cat /sys/block/nbd0/size)" != 0 ]; do
    i=$((i + 1))
    [ $i -le 100 ] || fail "$DEV still has a size 10 s after nbd-client -d"
    sleep 0.1
  done
  log "disconnected"
}

# fsck — e2fsck -fn must find the file system clean.
fsck() {
  "$X/e2fsck" -fn "$DEV" || fail "e2fsck -fn $DEV found problems ($1)"
  log "e2fsck -fn: clean ($1)"
}

[ -n "$PORT" ] || fail "no vmtest.port= on the kernel command line"
[ -b "$DEV" ] || fail "$DEV is missing (nbd module not loaded?)"
# nbd-client has -connections (-C) since 3.15, but its --help does not say
# so; the message it prints when the kernel lacks multi-conn tells.
if grep -q "support multiple connections" "$X/nbd-client"; then
  multi=$CONNS
else
  log "this nbd-client has no -connections: multi-conn not tried"
  multi=1
fi

# --- 1, 2: one connection, patterns at several offsets ----------------------
connect 1
SS=$(blockdev --getss "$DEV")
SECTORS=$((SIZE / SS))
# FIRST:COUNT in logical sectors; none overlap and none touches another's neighbours
REGIONS="0:128 2049:3 $((SECTORS / 2 - 5)):2048 $((SECTORS - 12)):7 $((SECTORS - 1)):1"
i=0
for r in $REGIONS; do
  first=${r%:*}
  count=${r#*:}
  head -c $((count * SS)) /dev/urandom >/tmp/pat.$i
  dd if=/tmp/pat.$i of="$DEV" bs="$SS" seek="$first" count="$count" oflag=direct conv=notrunc 2>/dev/null ||
    fail "dd write of $count sectors at sector $first"
  i=$((i + 1))
done
blockdev --flushbufs "$DEV" || fail "flush $DEV"
head -c "$SS" /dev/zero >/tmp/zero-sector

# check_patterns WHEN — each region reads back as written (O_DIRECT), and the
# sectors just before and after it are still zero.
check_patterns() {
  i=0
  for r in $REGIONS; do
    first=${r%:*}
    count=${r#*:}
    dd if="$DEV" of=/tmp/back bs="$SS" skip="$first" count="$count" iflag=direct 2>/dev/null ||
      fail "dd read of $count sectors at sector $first ($1)"
    cmp -s /tmp/pat.$i /tmp/back || fail "sectors $first..+$count read back differ from what was written ($1)"
    for s in $((first - 1)) $((first + count)); do
      if [ "$s" -lt 0 ] || [ "$s" -ge "$SECTORS" ]; then continue; fi
      dd if="$DEV" of=/tmp/back bs="$SS" skip="$s" count=1 iflag=direct 2>/dev/null ||
        fail "dd read of sector $s ($1)"
      cmp -s /tmp/zero-sector /tmp/back || fail "sector $s next to a written region is not zero ($1)"
    done
    i=$((i + 1))
  done
  log "patterns at $REGIONS (sector:count, $SS-byte sectors) read back ($1)"
}
check_patterns "same connection"
disconnect

# --- 3: again with multi-conn; zeroing and discard ---------------------------
connect "$multi"
check_patterns "after reconnecting with $multi connection(s)"
mid=${REGIONS#* * }
mid=${mid%% *}
first=${mid%:*}
count=${mid#*:}
log "write_zeroes_max_bytes=$(cat /sys/block/nbd0/queue/write_zeroes_max_bytes) discard_max_bytes=$(cat /sys/block/nbd0/queue/discard_max_bytes)"
"$X/blkdiscard" -f -z -o $((first * SS)) -l $((count * SS)) "$DEV" || fail "blkdiscard -z (BLKZEROOUT)"
head -c $((count * SS)) /dev/zero >/tmp/zeros
dd if="$DEV" of=/tmp/back bs="$SS" skip="$first" count="$count" iflag=direct 2>/dev/null || fail "dd read after zeroing"
cmp -s /tmp/zeros /tmp/back || fail "sectors $first..+$count are not zero after blkdiscard -z"
log "blkdiscard -z zeroed $count sectors at sector $first"
if [ "$(cat /sys/block/nbd0/queue/discard_max_bytes)" != 0 ]; then
  "$X/blkdiscard" -f -o 0 -l $((128 * SS)) "$DEV" || fail "blkdiscard (discard) of the first 128 sectors"
  log "blkdiscard discarded the first 128 sectors"
else
  fail "$DEV offers no discard (the splitter advertises TRIM)"
fi
disconnect

# --- 4: ext4, files ----------------------------------------------------------
connect 1
"$X/mke2fs" -q -F -t ext4 "$DEV" || fail "mke2fs -t ext4 $DEV"
log "mke2fs -t ext4 done"
mount -t ext4 "$DEV" "$MNT" || fail "mount $DEV"
write_files "$MNT" "hello from the guest's kernel NBD client"
cat "$MNT/sums.sha256"
sync
umount "$MNT" || fail "umount after writing"
log "files written, unmounted"
fsck "after writing"
disconnect

# --- 5: multi-conn again: verify, write more, fstrim -------------------------
connect "$multi"
fsck "after reconnecting"
mount -t ext4 "$DEV" "$MNT" || fail "mount $DEV again"
(cd "$MNT" && sha256sum -c sums.sha256) || fail "checksums after reconnecting"
n=0
while [ $n -lt 200 ]; do
  [ "$(cat "$MNT/many/f$n")" = "small file $n" ] || fail "many/f$n has the wrong content"
  n=$((n + 1))
done
log "files verified after reconnecting"
dd if=/dev/urandom of="$MNT/second.bin" bs=1M count=4 2>/dev/null || fail "write second.bin"
(cd "$MNT" && sha256sum second.bin >second.sha256) || fail "sha256sum second.bin"
rm -rf "$MNT/many" || fail "rm many"
sync
fstrim -v "$MNT" || fail "fstrim $MNT"
umount "$MNT" || fail "umount at the end"
fsck "at the end"
disconnect

echo "VMTEST RESULT: PASS"
