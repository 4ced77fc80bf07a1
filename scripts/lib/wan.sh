# shellcheck shell=bash
#
# scripts/lib/wan.sh — an emulated WAN link on one machine, for the
# benchmarks: two network namespaces joined by a veth pair, each end shaped
# with `tc qdisc ... tbf` to a rate, and a round-trip time added by
# tools/delay-proxy (a forwarding TCP proxy that delays every byte by RTT/2
# each way without limiting throughput; the kernel's netem is not needed).
#
#   bs-src  10.77.0.1  bs-veth-src  ──── veth, tbf RATE each way ────  bs-veth-dst  10.77.0.2  bs-dst
#
# A client in bs-src reaches a server in bs-dst at 10.77.0.2:PORT directly
# (rate-limited, no delay), or at 10.77.0.1:PORT through a delay proxy
# running in bs-src (rate-limited and delayed): the proxy is what adds the
# round-trip time, so only connections made through it see it.
#
# Sourced, never executed:  . "$ROOT/scripts/lib/wan.sh"  (after common.sh).
# Needs root, iproute2 (ip, tc) and the sch_tbf qdisc.

# shellcheck disable=SC2034  # the names are for the scripts that source this file
BS_WAN_SRC_NS=bs-src
# shellcheck disable=SC2034
BS_WAN_DST_NS=bs-dst
# shellcheck disable=SC2034
BS_WAN_SRC_IP=10.77.0.1
# shellcheck disable=SC2034
BS_WAN_DST_IP=10.77.0.2
BS_WAN_SRC_DEV=bs-veth-src
BS_WAN_DST_DEV=bs-veth-dst
# Where `wan-link up` keeps what `wan-link down` must undo (proxy pids).
BS_WAN_STATE=${BS_WAN_STATE:-/run/blockship-wan}

# bs_wan_rate_bytes RATE — bytes per second of a tc rate (e.g. 1gbit,
# 500mbit, 100kbit, 2.5gbit; the units tc takes in bits). Fails on anything else.
bs_wan_rate_bytes() {
  local r=${1,,} num unit mult
  [[ "$r" =~ ^([0-9]+(\.[0-9]+)?)(bit|kbit|mbit|gbit)$ ]] || return 1
  num=${BASH_REMATCH[1]}
  unit=${BASH_REMATCH[3]}
  case "$unit" in
    bit) mult=1 ;;
    kbit) mult=1000 ;;
    mbit) mult=1000000 ;;
    gbit) mult=1000000000 ;;
  esac
  awk -v n="$num" -v m="$mult" 'BEGIN { b = n * m / 8; if (b < 1000) exit 1; printf "%.0f\n", b }'
}

# bs_wan_us DURATION — microseconds of a duration like 20ms, 0.5s, 250us or 0.
bs_wan_us() {
  local d=$1
  [[ "$d" =~ ^([0-9]+(\.[0-9]+)?)(us|ms|s)?$ ]] || return 1
  local num=${BASH_REMATCH[1]} unit=${BASH_REMATCH[3]}
  if [[ -z "$unit" && "$num" != 0 ]]; then
    return 1
  fi
  awk -v n="$num" -v u="$unit" 'BEGIN {
    m = (u == "us") ? 1 : (u == "ms") ? 1000 : 1000000
    printf "%.0f\n", n * m
  }'
}

# bs_wan_exists — is either namespace there?
bs_wan_exists() {
  ip netns list 2>/dev/null | awk '{print $1}' | grep -qxE "$BS_WAN_SRC_NS|$BS_WAN_DST_NS"
}

# bs_wan_ns_exec NS CMD... — run CMD in namespace NS, or here when NS is "",
# in the foreground. (To start a server in the background, write
# `ip netns exec NS CMD &` out: it execs CMD in place, so $! is CMD's pid,
# whereas a function sent to the background is a subshell of its own.)
bs_wan_ns_exec() {
  local ns=$1
  shift
  if [[ -n "$ns" ]]; then
    ip netns exec "$ns" "$@"
  else
    "$@"
  fi
}

# bs_wan_up RATE RTT — make the namespaces, the veth pair and the tbf
# shaping (RTT only checked here: the delay proxies add it). Fails, having
# undone what it did, if any step fails or the link already exists.
bs_wan_up() {
  local rate=$1 rtt=$2 rate_b burst
  rate_b=$(bs_wan_rate_bytes "$rate") || { echo "wan: bad rate '$rate' (e.g. 1gbit, 500mbit)" >&2; return 1; }
  bs_wan_us "$rtt" >/dev/null || { echo "wan: bad round-trip time '$rtt' (e.g. 20ms)" >&2; return 1; }
  if bs_wan_exists; then
    echo "wan: namespace $BS_WAN_SRC_NS or $BS_WAN_DST_NS exists already (scripts/bench/wan-link down removes them)" >&2
    return 1
  fi
  # The bucket holds 4 ms at the rate (at least 64 KiB: a GSO packet, a
  # timer tick's worth at low rates); the queue behind it up to 10 ms.
  burst=$((rate_b / 250))
  ((burst >= 65536)) || burst=65536
  if ! {
    ip netns add "$BS_WAN_SRC_NS" &&
      ip netns add "$BS_WAN_DST_NS" &&
      ip link add "$BS_WAN_SRC_DEV" netns "$BS_WAN_SRC_NS" type veth peer name "$BS_WAN_DST_DEV" netns "$BS_WAN_DST_NS" &&
      ip -n "$BS_WAN_SRC_NS" addr add "$BS_WAN_SRC_IP/24" dev "$BS_WAN_SRC_DEV" &&
      ip -n "$BS_WAN_DST_NS" addr add "$BS_WAN_DST_IP/24" dev "$BS_WAN_DST_DEV" &&
      ip -n "$BS_WAN_SRC_NS" link set lo up &&
      ip -n "$BS_WAN_DST_NS" link set lo up &&
      ip -n "$BS_WAN_SRC_NS" link set "$BS_WAN_SRC_DEV" up &&
      ip -n "$BS_WAN_DST_NS" link set "$BS_WAN_DST_DEV" up &&
      tc -n "$BS_WAN_SRC_NS" qdisc replace dev "$BS_WAN_SRC_DEV" root tbf rate "$rate" burst "$burst" latency 10ms &&
      tc -n "$BS_WAN_DST_NS" qdisc replace dev "$BS_WAN_DST_DEV" root tbf rate "$rate" burst "$burst" latency 10ms
  }; then
    echo "wan: setting up the link failed (root, iproute2 and the sch_tbf qdisc are needed); undoing" >&2
    bs_wan_down >/dev/null 2>&1
    return 1
  fi
  # Wait until both ends of the veth report carrier (state UP).
  local i
  for i in $(seq 1 100); do
    if ip -n "$BS_WAN_SRC_NS" link show "$BS_WAN_SRC_DEV" | grep -q 'state UP' &&
      ip -n "$BS_WAN_DST_NS" link show "$BS_WAN_DST_DEV" | grep -q 'state UP'; then
      return 0
    fi
    sleep 0.05
  done
  echo "wan: the veth pair did not come up" >&2
  return 1
}

# bs_wan_down — stop the proxies `wan-link up` started (by their recorded
# pids), say what each forwarded, and delete both namespaces (which deletes
# the veth pair). Never fails.
bs_wan_down() {
  local pid listen rest log
  if [[ -f "$BS_WAN_STATE/proxies" ]]; then
    while read -r pid listen rest; do
      [[ -n "$pid" ]] || continue
      # Only if it still is a delay-proxy (the pid may have been reused).
      if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == delay-proxy ]]; then
        bs_stop "$pid" 5 >/dev/null 2>&1 || true
      fi
      log="$BS_WAN_STATE/proxy-${listen##*:}.log"
      if [[ -f "$log" ]] && grep -q 'totals' "$log"; then
        echo "delay proxy $listen: $(grep -h 'totals' "$log" | sed 's/.*totals: //')"
      fi
    done <"$BS_WAN_STATE/proxies"
  fi
  if [[ -d "$BS_WAN_STATE" ]]; then
    rm -f "$BS_WAN_STATE"/proxies "$BS_WAN_STATE"/config "$BS_WAN_STATE"/proxy-*.log "$BS_WAN_STATE"/proxy-*.json
    rmdir "$BS_WAN_STATE" 2>/dev/null || true
  fi
  local ns left
  for ns in "$BS_WAN_SRC_NS" "$BS_WAN_DST_NS"; do
    if ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$ns"; then
      left=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
      if [[ -n "$left" ]]; then
        echo "wan: processes still run in $ns (not stopped: they were not started here): $left" >&2
      fi
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  return 0
}

# bs_wan_proxy_bin — the delay-proxy binary: $BLOCKSHIP_BIN_DIR/delay-proxy,
# or built with `cargo build --release -p delay-proxy`. Sets BS_DELAY_PROXY.
BS_DELAY_PROXY=""
bs_wan_proxy_bin() {
  if [[ -n "${BLOCKSHIP_BIN_DIR:-}" ]]; then
    BS_DELAY_PROXY="$BLOCKSHIP_BIN_DIR/delay-proxy"
  else
    (cd "$ROOT" && cargo build --release -q -p delay-proxy) || return 1
    BS_DELAY_PROXY="$(bs_target_dir)/release/delay-proxy"
  fi
  [[ -x "$BS_DELAY_PROXY" ]] || { echo "wan: no delay-proxy binary at $BS_DELAY_PROXY" >&2; return 1; }
}

# bs_wan_proxy_start LISTEN CONNECT DELAY LOG [STATS] — start a delay proxy in
# the source namespace (or here, if BS_WAN_PROXY_NS is set to "") that
# accepts on LISTEN (IP:PORT) and forwards to CONNECT (IP:PORT), delaying
# each direction by DELAY (e.g. 10ms); its log goes to LOG, its byte counts
# (JSON, rewritten as connections end and at exit) to STATS. With
# BS_WAN_DETACH=1 it runs in a session of its own (it outlives the script).
# Waits until it listens. Sets BS_WAN_PROXY_PID.
BS_WAN_PROXY_PID=""
bs_wan_proxy_start() {
  local listen=$1 connect=$2 delay=$3 log=$4 stats=${5:-} ns=${BS_WAN_PROXY_NS-$BS_WAN_SRC_NS} waited=0
  [[ -n "$BS_DELAY_PROXY" ]] || bs_wan_proxy_bin || return 1
  local cmd=()
  [[ "${BS_WAN_DETACH:-0}" != 1 ]] || cmd+=(setsid)
  [[ -z "$ns" ]] || cmd+=(ip netns exec "$ns")
  cmd+=("$BS_DELAY_PROXY" --listen "$listen" --connect "$connect" --delay "$delay")
  [[ -z "$stats" ]] || cmd+=(--stats-file "$stats")
  # setsid and `ip netns exec` exec in place: $! is the proxy's own pid.
  RUST_LOG=${RUST_LOG:-info} "${cmd[@]}" </dev/null >/dev/null 2>"$log" &
  BS_WAN_PROXY_PID=$!
  until grep -q 'listening on' "$log" 2>/dev/null; do
    if ! kill -0 "$BS_WAN_PROXY_PID" 2>/dev/null || ((waited >= 100)); then
      echo "wan: the delay proxy on $listen did not start; its log:" >&2
      tail -n 20 "$log" >&2 || true
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}

# bs_wan_proxy_bytes STATS — "UP DOWN" bytes from a proxy's --stats-file.
bs_wan_proxy_bytes() {
  sed -E 's/.*"bytes_up": ([0-9]+), "bytes_down": ([0-9]+).*/\1 \2/' "$1" 2>/dev/null
}

# bs_wan_dev_bytes NS DEV — "RX TX" byte counters of a device in a namespace.
bs_wan_dev_bytes() {
  ip netns exec "$1" cat /proc/net/dev 2>/dev/null |
    awk -v d="$2:" '{ sub(/^ +/, "") } $1 == d { print $2, $10; exit }'
}
