#!/usr/bin/env bash
#
# scripts/vmtest/fetch.sh — get what the kernel-NBD-client VM test needs.
#
#   scripts/vmtest/fetch.sh          (as root; VMTEST_CACHE=DIR to put the cache elsewhere)
#
# The hosts blockship is developed on run a kernel without the NBD client, so
# the test boots a small Linux guest under QEMU that has it. This script:
#
# 1. installs, with apt-get and only when missing, kmod (depmod, modprobe),
#    cpio, xz-utils, e2fsprogs (mke2fs, e2fsck and debugfs for the guest and
#    the host-side checks), util-linux (blkdiscard), the libraries
#    nbd-client needs (the guest gets the host's copies) and QEMU's x86
#    system emulator. QEMU comes from
#    bookworm-backports: it matches the installed qemu-utils 10.0 (bookworm's
#    own QEMU 7.2 conflicts with it, and its TCG crashed the guest kernel in 3
#    of 8 runs on these machines while 10.0 passed every time). The
#    backports apt source is added when no source names it yet;
# 2. downloads (apt-get download, nothing is installed) and unpacks under
#    the cache (default target/vmtest/): the backports cloud kernel (6.12: it
#    has the nbd module; Debian 12's own kernel would do for NBD too, but the
#    same guest will test ublk later, which needs 6.12), busybox-static and
#    nbd-client;
# 3. writes DIR/vmtest.env, which build-initramfs.sh, suite.sh and scripts/bench/vm read: the
#    kernel image, the unpacked kernel tree, busybox and nbd-client.
#
# Idempotent: when everything is there already it touches neither apt nor the
# network. Remove the cache folder to fetch again.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/lib/common.sh
. "$ROOT/scripts/lib/common.sh"
# shellcheck source=scripts/lib/deps.sh
. "$ROOT/scripts/lib/deps.sh"

CACHE=${VMTEST_CACHE:-$(bs_target_dir)/vmtest}
SUITE=${VMTEST_SUITE:-bookworm-backports}     # where QEMU and the kernel come from
KPKG=${VMTEST_KPKG:-}                         # e.g. linux-image-6.12.43+deb12-cloud-amd64; default: newest cloud kernel
mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)

# What the host needs; bs_ensure_deps runs `apt-get update` (once) and
# `apt-get install` only when something is missing.
VMTEST_DEPS=(
  cmd:depmod:kmod
  cmd:modprobe:kmod
  cmd:cpio:cpio
  cmd:xz:xz-utils
  cmd:mke2fs:e2fsprogs
  cmd:e2fsck:e2fsprogs
  cmd:debugfs:e2fsprogs
  cmd:blkdiscard:util-linux
  cmd:timeout:coreutils
  cmd:flock:util-linux
  # suite.sh: the splitter's debug info stripped for the guest's tools disk
  cmd:objcopy:binutils
  # nbd-client's shared libraries: build-initramfs.sh copies them from the host.
  pkg:libgnutls30:libgnutls30
  pkg:libnl-3-200:libnl-3-200
  pkg:libnl-genl-3-200:libnl-genl-3-200
)
# QEMU comes from $SUITE, with the dependencies that version needs (apt-get -t).
VMTEST_QEMU=(cmd:qemu-system-x86_64:qemu-system-x86)

# have_suite_source — does some apt source already name $SUITE?
have_suite_source() {
  grep -rqsE "^[^#]*[[:space:]]$SUITE([[:space:]]|\$)" /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

# add_suite_source — add "$SUITE main" from the mirror this machine's apt
# already uses (the first URIs: line of its deb822 sources, else the first deb
# line of sources.list).
add_suite_source() {
  local mirror
  mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 || true)
  [[ -n "$mirror" ]] || mirror=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [[ -n "$mirror" ]] || bs_die "cannot tell which Debian mirror apt uses (no URIs: or deb line in /etc/apt)"
  bs_say "adding apt source: deb $mirror $SUITE main"
  echo "deb $mirror $SUITE main" | _bs_as_root tee "/etc/apt/sources.list.d/$SUITE.list" >/dev/null
}

# apt_knows_suite — have the package lists been fetched for $SUITE?
apt_knows_suite() {
  apt-cache policy 2>/dev/null | grep -q " $SUITE/"
}

# unpacked_kernel — the unpacked kernel package under the cache ($KPKG when
# set, else the newest one there), or nothing.
unpacked_kernel() {
  local d
  if [[ -n "$KPKG" ]]; then
    d="$CACHE/k/$KPKG"
    compgen -G "$d/boot/vmlinuz-*" >/dev/null && echo "$d"
    return 0
  fi
  for d in $(printf '%s\n' "$CACHE"/k/linux-image-* | sort -V -r); do
    if compgen -G "$d/boot/vmlinuz-*" >/dev/null; then
      echo "$d"
      return 0
    fi
  done
}

KROOT=$(unpacked_kernel)
BUSYBOX="$CACHE/root/bin/busybox"
NBD_CLIENT="$CACHE/root/sbin/nbd-client"
need_download=0
[[ -n "$KROOT" && -x "$BUSYBOX" && -x "$NBD_CLIENT" ]] || need_download=1

bs_step "VM test: host tools (QEMU from $SUITE, kmod, cpio, e2fsprogs)"
if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || ((need_download)); then
  if ! have_suite_source; then
    add_suite_source
    BS_APT_FORCE_UPDATE=1 bs_apt_update
  fi
fi
bs_ensure_deps "${VMTEST_DEPS[@]}"
BS_APT_RELEASE=$SUITE bs_ensure_deps "${VMTEST_QEMU[@]}"
bs_say "$(qemu-system-x86_64 --version | head -n1)"

bs_step "VM test: guest kernel, busybox and nbd-client (in $CACHE)"
if ((need_download)); then
  if ! apt_knows_suite; then
    bs_say "no package lists for $SUITE yet"
    BS_APT_FORCE_UPDATE=1 bs_apt_update
  fi
  if [[ -z "$KPKG" ]]; then
    KPKG=$(apt-cache depends -t "$SUITE" linux-image-cloud-amd64 2>/dev/null |
      sed -n 's/^ *Depends: \(linux-image-[0-9].*\)$/\1/p' | head -n1)
    [[ -n "$KPKG" ]] || bs_die "apt knows no linux-image-cloud-amd64 in $SUITE"
  fi
  DEBS="$CACHE/debs"
  rm -rf "$DEBS" "$CACHE/root" "$CACHE/k/$KPKG"
  mkdir -p "$DEBS" "$CACHE/root" "$CACHE/k"
  bs_say "apt-get download $KPKG busybox-static nbd-client"
  # apt-get download as root warns that it downloads unsandboxed; that is expected.
  (cd "$DEBS" && apt-get download -q "$KPKG/$SUITE" busybox-static nbd-client 2>&1 |
    { grep -v 'Download is performed unsandboxed' || true; })
  for d in "$DEBS"/*.deb; do
    case $(basename "$d") in
      linux-image-*) dpkg-deb -x "$d" "$CACHE/k/$KPKG" ;;
      *) dpkg-deb -x "$d" "$CACHE/root" ;;
    esac
  done
  rm -rf "$DEBS"
  KROOT="$CACHE/k/$KPKG"
  KVER=$(ls "$KROOT/lib/modules")
  # modules.dep, so modprobe --show-depends can list the nbd module's dependencies.
  depmod -b "$KROOT" "$KVER"
else
  bs_say "already there"
fi
[[ -n "$KROOT" && -x "$BUSYBOX" && -x "$NBD_CLIENT" ]] || bs_die "the download did not bring the kernel, busybox and nbd-client"
KVER=$(ls "$KROOT/lib/modules")
KERNEL="$KROOT/boot/vmlinuz-$KVER"
[[ -s "$KROOT/lib/modules/$KVER/modules.dep" ]] || depmod -b "$KROOT" "$KVER"

cat >"$CACHE/vmtest.env" <<ENV
# written by scripts/vmtest/fetch.sh; read by build-initramfs.sh, suite.sh and scripts/bench/vm
KROOT='$KROOT'
KVER='$KVER'
KERNEL='$KERNEL'
BUSYBOX='$BUSYBOX'
NBD_CLIENT='$NBD_CLIENT'
ENV
bs_say "kernel $KVER: $KERNEL"
bs_say "busybox: $BUSYBOX, nbd-client: $NBD_CLIENT"
bs_say "wrote $CACHE/vmtest.env"
