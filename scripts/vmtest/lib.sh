# shellcheck shell=bash
#
# scripts/vmtest/lib.sh — the host side of the VM guests, shared by
# suite.sh and scripts/bench/vm (sourced; they set WORK, LOGS, KERNEL,
# INITRD, QEMU, SPLITTER, NBD_TARGET and PIDS first):
#
#   make_pki            a CA whose target certificate is valid for 10.0.2.2
#                       too, and one shipper folder ($WORK/shp) for DISK_IDS
#   make_tools          the guest's tools disk ($WORK/tools.img, /dev/vda in
#                       the guest, mounted at /opt): the splitter, fio,
#                       EXTRA_TOOLS, their libraries, the TLS folder
#   start_target DIR    nbd-target serve on ephemeral ports (RPORT, NBDPORT)
#   replica_to ID FILE  the target's copy of disk ID, over its NBD export
#   boot_bg / boot_wait / boot NAME DIR TIMEOUT CMDLINE [QEMU ARGS]
#                       a guest boot (CONSOLE, QEMU_PID, QRC, RESULT)
#   guest_ok            the last boot passed (else FAIL_WHY)
#   data_disk FILE MIB  a sparse file with an empty ext4
#   dump_file IMG PATH OUT, check_fs_files IMG DIR, same A B

VMTEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The PKI: the target's certificate is also valid for 10.0.2.2, the address
# the guest reaches the host at; one shipper folder for every disk id.
DISK_IDS=(vm-ublk vm-recovery vm-cut vm-nbd)
make_pki() {
  "$NBD_TARGET" pki init --dir "$WORK/pki" --san 10.0.2.2 >/dev/null
  local args=() d
  for d in "${DISK_IDS[@]}"; do args+=(--disk "$d"); done
  "$NBD_TARGET" pki issue --dir "$WORK/pki" --name vm-guest "${args[@]}" --out "$WORK/shp" --days 2 >/dev/null
}

# The tools disk (the guest's /dev/vda, mounted read-only at /opt): the
# splitter (debug info stripped), fio, their libraries, the TLS folder.
# EXTRA_TOOLS: more host binaries for /opt/bin (with their libraries).
make_tools() {
  local t="$WORK/tools"
  mkdir -p "$t/bin" "$t/lib" "$t/tls"
  objcopy --strip-debug "$SPLITTER" "$t/bin/splitter"
  cp -L "$(command -v fio)" "$t/bin/fio"
  local b lib
  for b in ${EXTRA_TOOLS:-}; do
    cp -L "$b" "$t/bin/"
  done
  for b in "$t"/bin/*; do
    while read -r lib; do
      [[ -e "$t/lib/$(basename "$lib")" ]] || cp -L "$lib" "$t/lib/"
    done < <(ldd "$b" | grep -o '/[^ ]*' | grep -v 'ld-linux' || true)
  done
  cp -r "$WORK/shp/." "$t/tls/"
  local mib
  mib=$(($(du -sm "$t" | cut -f1) + 32))
  mke2fs -q -F -t ext4 -d "$t" "$WORK/tools.img" "${mib}M"
}

TARGET_PID=""
RPORT=""
NBDPORT=""
# start_target LOGDIR — nbd-target serve on the host (ephemeral ports).
start_target() {
  local log="$1/target.log"
  RUST_LOG=${RUST_LOG:-info} "$NBD_TARGET" serve --listen 127.0.0.1:0 --data-dir "$WORK/dr" \
    --tls "$WORK/pki/target" --nbd-listen 127.0.0.1:0 >"$log" 2>&1 &
  TARGET_PID=$!
  PIDS+=("$TARGET_PID")
  local i
  for i in $(seq 200); do
    RPORT=$(sed -En 's#.*accepting shippers on 127\.0\.0\.1:([0-9]+).*#\1#p' "$log" | tail -n1)
    NBDPORT=$(sed -En 's#.*read-only over NBD on 127\.0\.0\.1:([0-9]+).*#\1#p' "$log" | tail -n1)
    [[ -z "$RPORT" || -z "$NBDPORT" ]] || return 0
    kill -0 "$TARGET_PID" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.1
  done
  cat "$log" >&2
  return 1
}

# replica_to ID FILE — the target's copy of disk ID, read over its NBD export.
replica_to() {
  nbdcopy "nbd://127.0.0.1:$NBDPORT/$1" "$2"
}

# wait_applied ID LOGDIR — the target has applied everything (it is idle for
# the disk: no session applying, status says so). The guest waited for the
# shipper's acknowledgements already; this is a second look from the host.
wait_applied() {
  "$NBD_TARGET" status --data-dir "$WORK/dr" --json >"$2/target-status.json" 2>/dev/null || true
}

# boot NAME LOGDIR TIMEOUT CMDLINE [QEMU ARGS...] — boot the guest with the
# tools disk (vda) and QEMU ARGS (more disks); the console goes to
# LOGDIR/NAME.console. Sets QRC (QEMU's status) and RESULT (the guest's
# VMTEST RESULT line, or "").
QEMU_PID=""
boot_bg() {
  local name=$1 dir=$2 timeout=$3 cmdline=$4
  shift 4
  CONSOLE="$dir/$name.console"
  QEMU_PIDFILE="$dir/$name.qemu.pid"
  : >"$CONSOLE"
  rm -f "$QEMU_PIDFILE"
  timeout --kill-after=10 "$timeout" "$QEMU" \
    -accel tcg,thread=single -cpu max -smp "${VMTEST_SMP:-2}" -m 1G \
    -nographic -no-reboot -pidfile "$QEMU_PIDFILE" \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -append "console=ttyS0 quiet panic=-1 vmtest.tools=1 $cmdline" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0,romfile= \
    -drive "file=$WORK/tools.img,format=raw,if=virtio,readonly=on" \
    "$@" </dev/null >"$CONSOLE" 2>&1 &
  QEMU_PID=$!
  PIDS+=("$QEMU_PID")
}
boot_wait() {
  QRC=0
  wait "$QEMU_PID" || QRC=$?
  QEMU_PID=""
  RESULT=$(tr -d '\r' <"$CONSOLE" | grep -m1 '^VMTEST RESULT:' || true)
}
boot() {
  boot_bg "$@"
  boot_wait
}

# guest_ok — the last boot passed; otherwise say why (FAIL_WHY).
guest_ok() {
  if [[ "$RESULT" == "VMTEST RESULT: PASS" && "$QRC" == 0 ]]; then
    return 0
  fi
  FAIL_WHY="guest: ${RESULT:-no VMTEST RESULT line}; QEMU status $QRC"
  ((QRC == 124 || QRC == 137)) && FAIL_WHY="$FAIL_WHY (time limit)"
  return 1
}

# data_disk FILE MIB — a sparse file with an empty ext4 (the guest's /dev/vdb).
data_disk() {
  truncate -s "${2}M" "$1"
  mke2fs -q -F -t ext4 "$1"
}

# dump_file IMG PATH OUT — copy a file out of an ext4 image.
dump_file() {
  debugfs -R "dump $2 $3" "$1" >/dev/null 2>&1
  [[ -s "$3" ]]
}

# check_fs_files IMG DIR — IMG holds a clean ext4 whose hello.txt, det.txt
# and random.bin match the guest's sums.sha256 (read out into DIR).
check_fs_files() {
  e2fsck -fn "$1" >"$2/e2fsck.out" 2>&1 || { cat "$2/e2fsck.out"; FAIL_WHY="e2fsck -fn on $(basename "$1") found problems"; return 1; }
  mkdir -p "$2/files"
  local f
  for f in hello.txt det.txt random.bin sums.sha256; do
    debugfs -R "dump /$f $2/files/$f" "$1" >/dev/null 2>&1
  done
  (cd "$2/files" && sha256sum -c --quiet sums.sha256) || { FAIL_WHY="the files in $(basename "$1") do not match the guest's sums"; return 1; }
  awk -f "$VMTEST_DIR/detfile.awk" | cmp -s - "$2/files/det.txt" || { FAIL_WHY="det.txt differs from detfile.awk"; return 1; }
}

# same FILE1 FILE2 — byte-identical, or FAIL_WHY names the first difference.
same() {
  local d
  if d=$(cmp "$1" "$2" 2>&1); then
    return 0
  fi
  FAIL_WHY="$(basename "$1") and $(basename "$2") differ: $d"
  return 1
}
