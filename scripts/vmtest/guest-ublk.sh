#!/bin/sh
# shellcheck shell=sh
#
# scripts/vmtest/guest-ublk.sh — the ublk front end against the real kernel
# (guest scenario "ublk"; host side: suite.sh). The splitter serves a disk
# file on the data disk (/dev/vdb, ext4) as /dev/ublkb0 and ships its ring
# to the nbd-target on the host (10.0.2.2:vmtest.rport) as disk
# vmtest.diskid:
#
# 1. mke2fs makes a 96 MiB ext4 at the start of /dev/ublkb0; mounted, it
#    gets a deterministic file (detfile.awk), 8 MiB of random data and 200
#    small files; their sha256 sums go beside them; sync, umount, e2fsck -fn;
# 2. fio writes the rest of the device (from 128 MiB) with verify=crc32c
#    (direct I/O, 4k random and 1M sequential, several jobs) and verifies it;
# 3. a discard and a write-zeroes of a range read back as zeroes;
# 4. a second splitter serving the same disk over NBD is refused (locked);
# 5. the ring is shipped completely; SIGTERM stops the splitter, which must
#    exit 0 and remove /dev/ublkb0.
# The host then compares the replica with the disk file and checks its
# file system. Prints "VMTEST RESULT: PASS" or "VMTEST RESULT: FAIL why".
. /lib.sh

RPORT=$(arg vmtest.rport)
DISK_ID=$(arg vmtest.diskid)
MNT=/mnt
[ -n "$RPORT" ] || fail "no vmtest.rport= on the kernel command line"
[ -e /dev/ublk-control ] || fail "/dev/ublk-control is missing (ublk_drv not loaded?)"
mkdir -p /data
mount -t ext4 /dev/vdb /data || fail "mount /dev/vdb (the data disk)"
truncate -s 256M /data/disk.img || fail "truncate disk.img"
# Two queues (the guest has two CPUs): fio's jobs spread over both, so the
# queues' own ring lanes and the overlap claims between them are exercised.
splitter_start /tmp/splitter.log --disk /data/disk.img --ring /data/disk.ring --ring-size 64M \
  --ublk --ublk-id 0 --queues 2 --ship-to "$HOST:$RPORT" --disk-id "$DISK_ID" --tls /opt/tls
wait_ublk_ready /tmp/splitter.log 0
grep 'ublk driver' /tmp/splitter.log | head -n 1
DEV=/dev/ublkb0
log "$DEV: $(blockdev --getsize64 $DEV) bytes, logical sector $(blockdev --getss $DEV), $(cat /sys/block/ublkb0/queue/write_cache) cache, fua $(cat /sys/block/ublkb0/queue/fua 2>/dev/null), discard_max_bytes $(cat /sys/block/ublkb0/queue/discard_max_bytes)"
[ "$(blockdev --getsize64 $DEV)" = 268435456 ] || fail "$DEV is not 256 MiB"
[ "$(ls /sys/block/ublkb0/mq | wc -l)" = 2 ] || fail "$DEV has $(ls /sys/block/ublkb0/mq | wc -l) hardware queue(s), not 2"
[ "$(cat /sys/block/ublkb0/queue/write_cache)" = "write back" ] ||
  fail "$DEV does not announce a volatile write cache: the kernel would send no FLUSH"

# NBD beside ublk on the same disk: refused (the disk is locked).
if "$SPLITTER" serve --disk /data/disk.img --listen 127.0.0.1:10809 >/tmp/second.log 2>&1; then
  fail "a second splitter served the disk over NBD while /dev/ublkb0 serves it"
fi
grep -q 'in use by another process' /tmp/second.log || { cat /tmp/second.log; fail "the second splitter's refusal does not say why"; }
log "a second splitter (NBD) on the same disk is refused: $(grep -o 'disk .* in use[^:]*' /tmp/second.log | head -n 1)"

# --- 1: ext4 and files -------------------------------------------------------
"$X/mke2fs" -q -F -t ext4 "$DEV" 96M || fail "mke2fs -t ext4 $DEV 96M"
mount -t ext4 "$DEV" "$MNT" || fail "mount $DEV"
write_files "$MNT" "hello from the guest's ublk device"
sync
umount "$MNT" || fail "umount"
"$X/e2fsck" -fn "$DEV" >/tmp/fsck.out 2>&1 || { cat /tmp/fsck.out; fail "e2fsck -fn $DEV"; }
log "ext4 with files written, unmounted, e2fsck -fn clean"

# --- 2: fio with verify on the rest of the device -----------------------------
# Each job has its own region (offset_increment), so its verify reads only
# what it wrote.
for spec in "randwrite 4k 4 128M 16M 4M" "write 1M 2 192M 28M 28M"; do
  set -- $spec
  /opt/bin/fio --name="verify-$1-$2" --filename=$DEV --thread --direct=1 --ioengine=psync \
    --rw="$1" --bs="$2" --numjobs="$3" --offset="$4" --offset_increment="$5" --size="$5" \
    --io_size="$6" --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting >/tmp/fio.out 2>&1 ||
    { tail -n 30 /tmp/fio.out; fail "fio rw=$1 bs=$2 with verify=crc32c failed"; }
  grep -E 'WRITE:|READ:' /tmp/fio.out | sed 's/^ */VMTEST: fio: /'
  log "fio rw=$1 bs=$2 numjobs=$3 verify=crc32c: verified"
done
# One job writes the whole second half, so it holds known bytes end to end.
/opt/bin/fio --name=fill --filename=$DEV --thread --direct=1 --ioengine=psync --rw=write --bs=1M \
  --offset=128M --size=120M --verify=crc32c --do_verify=1 --verify_fatal=1 >/tmp/fio.out 2>&1 ||
  { tail -n 30 /tmp/fio.out; fail "fio fill with verify failed"; }
log "fio wrote and verified 120 MiB from 128 MiB"

# --- 3: discard and write-zeroes ---------------------------------------------
head -c 1048576 /dev/zero >/tmp/zeros
"$X/blkdiscard" -f -z -o $((250 * 1048576)) -l 1048576 "$DEV" || fail "blkdiscard -z (write zeroes)"
dd if="$DEV" of=/tmp/back bs=1M skip=250 count=1 iflag=direct 2>/dev/null || fail "read after write zeroes"
cmp -s /tmp/zeros /tmp/back || fail "1 MiB at 250 MiB is not zero after blkdiscard -z"
if [ "$(cat /sys/block/ublkb0/queue/discard_max_bytes)" != 0 ]; then
  "$X/blkdiscard" -f -o $((252 * 1048576)) -l 1048576 "$DEV" || fail "blkdiscard"
  dd if="$DEV" of=/tmp/back bs=1M skip=252 count=1 iflag=direct 2>/dev/null || fail "read after discard"
  cmp -s /tmp/zeros /tmp/back || fail "1 MiB at 252 MiB is not zero after a discard"
  log "discard and write-zeroes read back as zeroes"
else
  fail "$DEV offers no discard"
fi
no_io_errors "after the writes"

# --- 4: shipped, stopped cleanly ---------------------------------------------
blockdev --flushbufs "$DEV" || fail "flush $DEV"
wait_converged /data/disk.ring 120
stop_ublk_splitter "$DEV"
grep -q "removed /dev/ublkb0" /tmp/splitter.log || fail "the splitter did not say it removed the device"
if grep -Eq 'panicked|ERROR' /tmp/splitter.log; then
  grep -E 'panicked|ERROR' /tmp/splitter.log | head -n 10
  fail "the splitter logged errors"
fi
log "the splitter stopped with status 0 and removed $DEV"
sha256sum /data/disk.img | sed 's/^/VMTEST: disk sha256 /'
umount /data || fail "umount /data"
pass
