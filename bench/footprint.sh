#!/usr/bin/env bash
# Steady-state footprint of `nodewatt-agent run`: resident memory and CPU seconds per
# minute, read from /proc/<pid>/status and /proc/<pid>/stat after a warm-up.
#
#   bench/footprint.sh [CONFIG] [SECONDS] [stdout|mqtt]
#       defaults: config/agent-simulated.toml 60 mqtt
#
# mqtt: publishes to a private mosquitto started here on a free loopback port (the
# config's [mqtt] port is replaced); stdout: `run --stdout` into /dev/null.
# Builds the release binary first. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-config/agent-simulated.toml}
seconds=${2:-60}
mode=${3:-mqtt}
warmup=5

cargo build --release -q -p nodewatt-agent
bin=target/release/nodewatt-agent
tmp=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

args=(run --config "$config")
if [ "$mode" = mqtt ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  printf 'listener %s 127.0.0.1\nallow_anonymous true\n%s' "$port" \
    "$([ "$(id -u)" -eq 0 ] && echo 'user root')" > "$tmp/mosquitto.conf"
  /usr/sbin/mosquitto -c "$tmp/mosquitto.conf" >/dev/null 2>&1 &
  pids+=($!)
  sed "s/^port = .*/port = $port/" "$config" > "$tmp/agent.toml"
  grep -q '^\[mqtt\]' "$tmp/agent.toml" || printf '\n[mqtt]\nport = %s\n' "$port" >> "$tmp/agent.toml"
  # Relative roots in the config stay relative to the original file.
  sed -i "s|^sys_root = \"\([^/]\)|sys_root = \"$(dirname "$(realpath "$config")")/\1|; s|^proc_root = \"\([^/]\)|proc_root = \"$(dirname "$(realpath "$config")")/\1|" "$tmp/agent.toml"
  args=(run --config "$tmp/agent.toml")
  sleep 0.3
else
  args+=(--stdout)
fi
"$bin" "${args[@]}" >/dev/null 2>"$tmp/agent.log" &
pid=$!
pids+=($pid)

ticks_per_s=$(getconf CLK_TCK)
cpu_ticks() { awk '{sub(/.*\) /, ""); print $12 + $13}' "/proc/$pid/stat"; }   # utime + stime

sleep "$warmup"
t0=$(cpu_ticks)
sleep "$seconds"
t1=$(cpu_ticks)
rss_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
hwm_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
threads=$(awk '/^Threads:/ {print $2}' "/proc/$pid/status")

awk -v t0="$t0" -v t1="$t1" -v hz="$ticks_per_s" -v s="$seconds" -v rss="$rss_kb" -v hwm="$hwm_kb" \
    -v th="$threads" -v cfg="$config" -v mode="$mode" -v w="$warmup" 'BEGIN {
  printf "config            %s (%s)\n", cfg, mode
  printf "measured          %d s after %d s warm-up\n", s, w
  printf "rss_kb            %d\n", rss
  printf "rss_peak_kb       %d\n", hwm
  printf "threads           %d\n", th
  printf "cpu_s_per_min     %.3f\n", (t1 - t0) / hz * 60 / s
}'
