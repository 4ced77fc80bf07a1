#!/usr/bin/env bash
#
# scripts/vmtest/build-initramfs.sh — make the tiny initramfs the VM test boots.
#
#   scripts/vmtest/build-initramfs.sh      (after fetch.sh; VMTEST_CACHE=DIR as for fetch.sh)
#
# The initramfs is the guest's whole root file system. It holds:
# - busybox (static) with all its applets, for the shell and the small tools;
# - the guest kernel's nbd and virtio_net modules and what they depend on
#   (decompressed: busybox's insmod cannot read .ko.xz), loaded in order;
# - real tools in /xbin, with their shared libraries: nbd-client, mke2fs,
#   e2fsck and blkdiscard (busybox has applets of the same names, which its
#   shell prefers to PATH, so the guest calls these by their full path);
# - the guest scenarios: scripts/vmtest/guest-NAME.sh as /scenarios/NAME.sh,
#   guest-lib.sh (what they share) as /lib.sh, detfile.awk as /detfile.awk;
# - an /init that mounts /proc, /sys and /dev, loads the modules, sets up
#   QEMU's user network (guest 10.0.2.15, host 10.0.2.2), mounts the tools
#   disk (the first virtio disk, made per run by suite.sh: the splitter,
#   fio and their libraries, the shipper's TLS folder) read-only at /opt
#   when the kernel command line has vmtest.tools=1, runs the scenario
#   named by vmtest.scenario=NAME (default nbd) and powers off.
#
# Env: VMTEST_CACHE (default target/vmtest), OUT (default CACHE/initramfs.cpio.gz),
# MODULES (default "virtio_net virtio_blk nbd ublk_drv"),
# BINS (extra host binaries for /xbin).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"
# sbin holds mke2fs, depmod and friends; a non-login root shell may lack it.
PATH="$PATH:/usr/sbin:/sbin"

CACHE=${VMTEST_CACHE:-$(bs_target_dir)/vmtest}
[[ -r "$CACHE/vmtest.env" ]] || bs_die "$CACHE/vmtest.env is missing: run scripts/vmtest/fetch.sh first"
# shellcheck source=/dev/null
. "$CACHE/vmtest.env"
: "${KROOT:?}" "${KVER:?}" "${BUSYBOX:?}" "${NBD_CLIENT:?}"

OUT=${OUT:-$CACHE/initramfs.cpio.gz}
MODULES=${MODULES:-virtio_net virtio_blk nbd ublk_drv}
BINS=${BINS:-"$NBD_CLIENT $(command -v mke2fs) $(command -v e2fsck) $(command -v blkdiscard || true)"}
for t in cpio modprobe gzip; do
  command -v "$t" >/dev/null || bs_die "$t is missing: run scripts/vmtest/fetch.sh first"
done

ST=$(mktemp -d "${TMPDIR:-/tmp}/blockship-initramfs.XXXXXX")
trap 'rm -rf "$ST"' EXIT
mkdir -p "$ST"/{bin,xbin,etc,proc,sys,dev,tmp,run,mnt,lib/modules,lib64}
mkdir -p "$ST/usr"
ln -s ../bin "$ST/usr/bin"
ln -s ../bin "$ST/usr/sbin"
ln -s bin "$ST/sbin"
ln -s /proc/mounts "$ST/etc/mtab"

# busybox and a link for each of its applets
cp "$BUSYBOX" "$ST/bin/busybox"
for a in $("$ST/bin/busybox" --list); do
  [[ -e "$ST/bin/$a" ]] || ln -s busybox "$ST/bin/$a"
done

# kernel modules, decompressed, in dependency order (load-order lists them)
: >"$ST/lib/modules/load-order"
for m in $MODULES; do
  deps=$(modprobe -d "$KROOT" -S "$KVER" --show-depends "$m") ||
    bs_die "module $m: modprobe --show-depends failed"
  while read -r verb path _; do
    [[ "$verb" == insmod ]] || continue       # "builtin NAME" needs nothing
    n=$(basename "$path")
    n=${n%.xz}
    n=${n%.zst}
    n=${n%.gz}
    [[ -e "$ST/lib/modules/$n" ]] && continue
    case $path in
      *.xz) xz -dc "$path" ;;
      *.zst) zstd -dc "$path" ;;
      *.gz) gzip -dc "$path" ;;
      *) cat "$path" ;;
    esac >"$ST/lib/modules/$n"
    echo "$n" >>"$ST/lib/modules/load-order"
  done <<<"$deps"
done

# real tools in /xbin, plus the shared libraries they load (ldd of the host's
# copy; the guest has no libraries of its own)
for b in $BINS; do
  [[ -x "$b" ]] || bs_die "binary $b not found"
  cp -L "$b" "$ST/xbin/"
  if ldd "$b" >/dev/null 2>&1; then
    if ldd "$b" | grep -q 'not found'; then
      bs_die "$b needs libraries this host lacks: $(ldd "$b" | grep 'not found' | tr -s ' \t\n' ' ')"
    fi
    while read -r lib; do
      mkdir -p "$ST$(dirname "$lib")"
      cp -Ln "$lib" "$ST$lib"
    done < <(ldd "$b" | grep -o '/[^ ]*' || true)
  fi
done
if [[ -f /etc/mke2fs.conf ]]; then
  cp /etc/mke2fs.conf "$ST/etc/"
fi

mkdir -p "$ST/scenarios"
for g in "$HERE"/guest-*.sh; do
  n=$(basename "$g" .sh)
  n=${n#guest-}
  if [[ "$n" == lib ]]; then
    cp "$g" "$ST/lib.sh"
  else
    cp "$g" "$ST/scenarios/$n.sh"
    chmod +x "$ST/scenarios/$n.sh"
  fi
done
cp "$HERE/detfile.awk" "$ST/detfile.awk"
cat >"$ST/init" <<'INIT'
#!/bin/sh
# /init of the blockship VM test guest (written by scripts/vmtest/build-initramfs.sh)
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /run /tmp /mnt
echo "@@INIT-START uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /lib/modules/load-order); do
  insmod "/lib/modules/$m" || echo "insmod $m FAILED"
done
ip link set lo up
if ip link set eth0 up 2>/dev/null; then      # QEMU user networking defaults
  ip addr add 10.0.2.15/24 dev eth0
  ip route add default via 10.0.2.2
fi
case " $(cat /proc/cmdline) " in
  *" vmtest.tools=1 "*)
    mkdir -p /opt
    mount -t ext4 -o ro /dev/vda /opt || echo "@@TOOLS-MOUNT-FAILED"
    ;;
esac
scenario=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^vmtest.scenario=//p' | tail -n 1)
echo "@@READY scenario=${scenario:-nbd} uptime=$(cut -d' ' -f1 /proc/uptime)"
case " $(cat /proc/cmdline) " in
  *" vmtest.shell=1 "*) setsid cttyhack sh ;;
  *) "/scenarios/${scenario:-nbd}.sh"; echo "@@TEST-EXIT rc=$? uptime=$(cut -d' ' -f1 /proc/uptime)" ;;
esac
sync
poweroff -f
INIT
chmod +x "$ST/init"

mkdir -p "$(dirname "$OUT")"
(cd "$ST" && find . | cpio -o -H newc --quiet | gzip -1) >"$OUT.tmp"
mv "$OUT.tmp" "$OUT"
bs_say "wrote $OUT ($(du -h "$OUT" | cut -f1)), kernel $KVER"
bs_say "modules: $(tr '\n' ' ' <"$ST/lib/modules/load-order")"
bs_say "tools in /xbin: $(cd "$ST/xbin" && echo *)"
