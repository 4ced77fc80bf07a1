# shellcheck shell=bash
#
# scripts/lib/deps.sh — installs the tools that blockship's scripts and tests
# drive, and makes sure the kernel devices they use are there.
#
# Sourced, never executed:  . "$ROOT/scripts/lib/deps.sh"
#
# It only installs what is missing: on a machine that already has everything it
# does not touch apt at all. When something is missing it runs `apt-get update`
# (once per script run), then `apt-get install` for the missing packages
# (Debian / Ubuntu).
#
# A requirement is written as  KIND:NAME:PACKAGES
#   KIND      "cmd" — NAME is a command that must be on PATH
#             "pkg" — NAME is a Debian package that must be installed
#   PACKAGES  the Debian package(s) that bring NAME, separated by "|"; the first
#             one that apt knows is installed (nbdfuse, for example, comes with
#             libnbd-bin on Debian 12 and is a package of its own later).

# Tools live in sbin too (losetup, mkfs.ext4, modprobe); a non-login root shell
# does not always have those on PATH.
case ":$PATH:" in
  *:/usr/sbin:*) ;;
  *) PATH="$PATH:/usr/sbin:/sbin" ;;
esac
export PATH

# What building the workspace needs besides Rust: libclang, for the bindings
# libublk (the splitter's ublk front end) generates with bindgen.
# shellcheck disable=SC2034  # used by the scripts that source this file
BS_DEPS_BUILD=(
  pkg:libclang-dev:libclang-dev
)

# What the end-to-end tests (scripts/test) drive.
# shellcheck disable=SC2034  # used by the scripts that source this file
BS_DEPS_TEST=(
  cmd:fio:fio
  cmd:nbdinfo:libnbd-bin
  cmd:nbdcopy:libnbd-bin
  cmd:nbdfuse:"libnbd-bin|nbdfuse"
  cmd:nbdsh:python3-libnbd
  pkg:python3-libnbd:python3-libnbd
  cmd:nbdkit:nbdkit
  cmd:qemu-img:qemu-utils
  cmd:qemu-io:qemu-utils
  cmd:qemu-nbd:qemu-utils
  cmd:mkfs.ext4:e2fsprogs
  cmd:fsck.ext4:e2fsprogs
  cmd:fusermount3:fuse3
  cmd:losetup:"mount|util-linux"
  cmd:mount:mount
)

# What scripts/demo uses.
# shellcheck disable=SC2034
BS_DEPS_DEMO=(
  cmd:nbdinfo:libnbd-bin
  cmd:nbdfuse:"libnbd-bin|nbdfuse"
  cmd:mkfs.ext4:e2fsprogs
  cmd:fsck.ext4:e2fsprogs
  cmd:debugfs:e2fsprogs
  cmd:fusermount3:fuse3
  cmd:losetup:"mount|util-linux"
  cmd:mount:mount
  cmd:python3:python3
)

# What scripts/bench/nbd uses.
# shellcheck disable=SC2034
BS_DEPS_BENCH=(
  cmd:fio:fio
  cmd:nbdinfo:libnbd-bin
  cmd:nbdkit:nbdkit
  cmd:qemu-nbd:qemu-utils
  cmd:python3:python3
)

# What scripts/bench/replicate uses.
# shellcheck disable=SC2034
BS_DEPS_REPLICATE=(
  cmd:fio:fio
  cmd:nbdinfo:libnbd-bin
  cmd:python3:python3
  cmd:cmp:diffutils
  cmd:numfmt:coreutils
)

# What scripts/bench/replicate --churn adds: qemu's mirror and its target.
# shellcheck disable=SC2034
BS_DEPS_MIRROR=(
  cmd:qemu-storage-daemon:qemu-utils
  cmd:nbdkit:nbdkit
  cmd:python3:python3
)

# What scripts/bench/wan-link uses (iperf3 and python3 for `wan-link check`).
# shellcheck disable=SC2034
BS_DEPS_WAN=(
  cmd:ip:iproute2
  cmd:tc:iproute2
  cmd:setsid:util-linux
  cmd:iperf3:iperf3
  cmd:python3:python3
)

# What scripts/bench/sync uses (and BS_DEPS_WAN for its WAN runs).
# shellcheck disable=SC2034
BS_DEPS_SYNC=(
  cmd:nbdinfo:libnbd-bin
  cmd:nbdcopy:libnbd-bin
  cmd:nbdkit:nbdkit
  cmd:rsync:rsync
  cmd:mkfs.ext4:e2fsprogs
  cmd:losetup:"mount|util-linux"
  cmd:mount:mount
  cmd:ss:iproute2
  cmd:python3:python3
  cmd:cmp:diffutils
  cmd:numfmt:coreutils
)

# bs_apt_update — `apt-get update`, at most once per run of a script (a later
# call does nothing unless BS_APT_FORCE_UPDATE=1, after adding a source, say).
_BS_APT_UPDATED=0
bs_apt_update() {
  if [[ $_BS_APT_UPDATED -eq 1 && "${BS_APT_FORCE_UPDATE:-0}" != 1 ]]; then
    return 0
  fi
  echo "    running apt-get update"
  _bs_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  _BS_APT_UPDATED=1
}

# _bs_dep_present KIND NAME — is this requirement met already?
_bs_dep_present() {
  case "$1" in
    cmd) command -v "$2" >/dev/null 2>&1 ;;
    pkg) dpkg-query -W -f='${Status}' "$2" 2>/dev/null | grep -q 'install ok installed' ;;
    *) echo "deps.sh: unknown requirement kind '$1'" >&2; return 2 ;;
  esac
}

# _bs_apt_has PACKAGE — does apt have an installable candidate for PACKAGE?
_bs_apt_has() {
  local cand
  cand=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
  [[ -n "$cand" && "$cand" != "(none)" ]]
}

# _bs_as_root CMD... — run CMD as root (directly, or through sudo).
_bs_as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    echo "deps.sh: need root to run: $*" >&2
    return 1
  fi
}

# bs_ensure_deps REQUIREMENT... — install, with apt-get, the packages that bring
# every requirement that is not met yet. Fails when one cannot be met.
# Set BS_APT_RELEASE to install them from a given release (-t).
bs_ensure_deps() {
  local req kind name pkgs missing=() unmet=()
  for req in "$@"; do
    kind=${req%%:*}
    name=${req#*:}
    name=${name%%:*}
    if ! _bs_dep_present "$kind" "$name"; then
      missing+=("$req")
    fi
  done

  if [[ ${#missing[@]} -eq 0 ]]; then
    echo "    all tools present"
    return 0
  fi

  if ! command -v apt-get >/dev/null 2>&1; then
    echo "deps.sh: missing, and no apt-get to install them with:" >&2
    printf '    %s\n' "${missing[@]}" >&2
    return 1
  fi

  echo "    missing: ${missing[*]}"
  bs_apt_update

  # Pick, for each missing requirement, the first package apt can install.
  local to_install=() p chosen alts
  for req in "${missing[@]}"; do
    pkgs=${req#*:}
    pkgs=${pkgs#*:}
    IFS='|' read -r -a alts <<<"$pkgs"
    chosen=""
    for p in "${alts[@]}"; do
      if _bs_apt_has "$p"; then chosen=$p; break; fi
    done
    [[ -n "$chosen" ]] || chosen=${alts[0]}
    # Skip duplicates (several commands come from one package).
    if [[ " ${to_install[*]} " != *" $chosen "* ]]; then
      to_install+=("$chosen")
    fi
  done

  # BS_APT_RELEASE (e.g. bookworm-backports): install from that release, and
  # the dependencies too (apt-get -t).
  local release=()
  [[ -z "${BS_APT_RELEASE:-}" ]] || release=(-t "$BS_APT_RELEASE")
  echo "    apt-get install ${release[*]:+${release[*]} }${to_install[*]}"
  _bs_as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${release[@]}" "${to_install[@]}" >/dev/null

  # Check again: an install that "worked" but did not bring the command is an
  # error worth stating plainly.
  for req in "${missing[@]}"; do
    kind=${req%%:*}
    name=${req#*:}
    name=${name%%:*}
    _bs_dep_present "$kind" "$name" || unmet+=("$req")
  done
  if [[ ${#unmet[@]} -gt 0 ]]; then
    echo "deps.sh: still missing after apt-get install: ${unmet[*]}" >&2
    return 1
  fi
  echo "    installed"
}

# bs_ensure_devices — best effort: load the loop and fuse modules and create
# /dev/fuse, /dev/loop-control and /dev/loop0..7 when a container left them out.
# Never fails; the tests and scripts say clearly what they lack.
bs_ensure_devices() {
  if command -v modprobe >/dev/null 2>&1; then
    _bs_as_root modprobe loop 2>/dev/null || true
    _bs_as_root modprobe fuse 2>/dev/null || true
  fi
  if [[ ! -e /dev/fuse ]]; then
    _bs_as_root mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
  fi
  if [[ ! -e /dev/loop-control ]]; then
    _bs_as_root mknod -m 0660 /dev/loop-control c 10 237 2>/dev/null || true
  fi
  local i
  for i in 0 1 2 3 4 5 6 7; do
    if [[ ! -e /dev/loop$i ]]; then
      _bs_as_root mknod -m 0660 "/dev/loop$i" b 7 "$i" 2>/dev/null || true
    fi
  done
  if [[ -c /dev/fuse ]]; then
    echo "    /dev/fuse: present"
  else
    echo "    /dev/fuse: MISSING (nbdfuse cannot work here)"
  fi
  if [[ -e /dev/loop-control ]] || [[ -b /dev/loop0 ]]; then
    echo "    loop devices: present"
  else
    echo "    loop devices: MISSING (losetup cannot work here)"
  fi
}
