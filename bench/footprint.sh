#!/usr/bin/env bash
# Steady-state footprint of `nodewatt-agent run`: resident memory and CPU seconds per
# minute, read from /proc/<pid>/status and /proc/<pid>/stat after a warm-up.
#
#   bench/footprint.sh [CONFIG] [SECONDS]     (defaults: config/agent-simulated.toml 60)
#
# Builds the release binary, runs it with output to /dev/null, and prints one line per
# figure. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-config/agent-simulated.toml}
seconds=${2:-60}
warmup=5

cargo build --release -q -p nodewatt-agent
bin=target/release/nodewatt-agent
"$bin" run --config "$config" >/dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT

ticks_per_s=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }   # utime + stime

sleep "$warmup"
t0=$(cpu_ticks)
sleep "$seconds"
t1=$(cpu_ticks)
rss_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
hwm_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
threads=$(awk '/^Threads:/ {print $2}' "/proc/$pid/status")

awk -v t0="$t0" -v t1="$t1" -v hz="$ticks_per_s" -v s="$seconds" -v rss="$rss_kb" -v hwm="$hwm_kb" \
    -v th="$threads" -v cfg="$config" 'BEGIN {
  printf "config            %s\n", cfg
  printf "measured          %d s after %d s warm-up\n", s, 5
  printf "rss_kb            %d\n", rss
  printf "rss_peak_kb       %d\n", hwm
  printf "threads           %d\n", th
  printf "cpu_s_per_min     %.3f\n", (t1 - t0) / hz * 60 / s
}'
