#!/usr/bin/env bash
# nodewatt-agent beside collectd 5.12 (plugins cpu, thermal, mqtt), both publishing with
# QoS 1 to ONE private mosquitto started here on a free loopback port: resident memory
# (VmRSS, VmHWM from /proc/<pid>/status) and CPU time (utime + stime from
# /proc/<pid>/stat) of both, over the same window of the same run, at each interval.
#
#   bench/footprint-vs-collectd.sh [SECONDS] [INTERVALS...]
#       defaults: 60  1s 100ms 10ms      (intervals: whole <n>s or <n>ms, at least 10ms)
#
# Environment:
#   CONFIG   agent config the temp config is made from (default config/agent-simulated.toml:
#            8 simulated GPUs, 3 simulated RAPL domains, the node's real CPU and thermal)
#   WARMUP   seconds both run before the window opens (default 5)
#   AGENTS   agent builds measured side by side in the same run, "label=PATH ...";
#            default: "agent=<release build>" (built here). A PATH may be a wrapper
#            script that `exec`s the binary (e.g. to set MALLOC_ARENA_MAX): the PID must
#            stay the agent's.
#   COLLECTD_GLOBAL  extra lines for collectd's global section (e.g. "ReadThreads 1")
#
# collectd reads on its own schedule (first read at start, then every Interval; not
# aligned to the wall clock); any Interval > 0 is accepted. CPU ticks are 10 ms: use
# windows of 60 s or more. The CPUns columns are the sum of /proc/<pid>/task/*/schedstat
# (ns resolution) over the same window. RSS counts file pages (code, libraries) that the
# kernel may reclaim: compare builds only in the same run. See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then
  seconds=$1
  shift
fi
intervals=("$@")
[ ${#intervals[@]} -gt 0 ] || intervals=(1s 100ms 10ms)
config=${CONFIG:-config/agent-simulated.toml}
warmup=${WARMUP:-5}

# Interval "<n>ms" or "<n>s" -> seconds as collectd writes them (decimal).
to_seconds() {
  case $1 in
    *ms) awk -v v="${1%ms}" 'BEGIN { printf "%g", v / 1000 }' ;;
    *s) awk -v v="${1%s}" 'BEGIN { printf "%g", v }' ;;
    *) return 1 ;;
  esac
}
for iv in "${intervals[@]}"; do
  if ! [[ $iv =~ ^[0-9]+(ms|s)$ ]]; then
    echo "usage: $0 [SECONDS] [INTERVALS...]   (intervals like 1s, 100ms, 10ms; got '$iv')" >&2
    exit 2
  fi
done

missing=()
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
collectd_bin=$(command -v collectd || echo /usr/sbin/collectd)
plugin_dir=/usr/lib/collectd
[ -x "$mosquitto_bin" ] || missing+=("mosquitto (apt-get install mosquitto)")
[ -x "$collectd_bin" ] || missing+=("collectd (apt-get install --no-install-recommends collectd-core)")
for p in cpu thermal mqtt; do
  [ -e "$plugin_dir/$p.so" ] || missing+=("collectd plugin $plugin_dir/$p.so (package collectd-core)")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "$0: missing:" >&2
  printf '  %s\n' "${missing[@]}" >&2
  echo "Debian/Ubuntu: apt-get install --no-install-recommends collectd-core mosquitto mosquitto-clients" >&2
  echo "(collectd-core has the cpu, thermal and mqtt plugins; mqtt.so needs libmosquitto1)" >&2
  exit 1
fi
if sub_bin=$(command -v mosquitto_sub); then :; else
  sub_bin=
  echo "note: mosquitto_sub not found (package mosquitto-clients): messages/s not counted" >&2
fi

if [ -z "${AGENTS:-}" ]; then
  cargo build --release -q -p nodewatt-agent
  AGENTS="agent=${CARGO_TARGET_DIR:-target}/release/nodewatt-agent"
fi
labels=()
bins=()
for a in $AGENTS; do
  label=${a%%=*}
  path=${a#*=}
  [[ $label =~ ^[a-z0-9-]+$ ]] || { echo "$0: AGENTS label '$label': use a-z 0-9 -" >&2; exit 2; }
  [ -x "$path" ] || { echo "$0: $path: not executable" >&2; exit 1; }
  labels+=("$label")
  bins+=("$path")
done

tmp=$(mktemp -d)
pids=()
sleeper=
cleanup() {
  local p
  [ -z "$sleeper" ] || kill "$sleeper" 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# A sleep that a signal interrupts (bash runs traps only between foreground commands).
pause() { sleep "$1" & sleeper=$!; wait "$sleeper"; sleeper=; }

stop() {   # stop and reap these PIDs, drop them from `pids`
  local p q keep=()
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
  for q in "${pids[@]}"; do
    [[ " $* " == *" $q "* ]] || keep+=("$q")
  done
  pids=("${keep[@]}")
}

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\n%s\n' "$port" \
  "$([ "$(id -u)" -eq 0 ] && echo 'user root')" > "$tmp/mosquitto.conf"
"$mosquitto_bin" -c "$tmp/mosquitto.conf" >"$tmp/mosquitto.log" 2>&1 &
pids+=($!)
pause 0.3

cfgdir=$(dirname "$(realpath "$config")")
hz=$(getconf CLK_TCK)
cpu_ticks() { awk '{sub(/.*\) /, ""); printf "%.0f", $12 + $13}' "/proc/$1/stat"; }   # utime + stime
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.0f", s}'; }
status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }

agent_config() {   # label interval -> temp config path
  local f="$tmp/agent-$1.toml"
  # Interval and broker replaced; the node name made unique per label (it is the MQTT
  # client id); relative roots stay relative to the original file.
  sed -e "s/^interval = .*/interval = \"$2\"/" \
      -e "s/^port = .*/port = $port/" \
      -e "s/^node = \"\(.*\)\"/node = \"\1-$1\"/" \
      -e "s|^sys_root = \"\([^/]\)|sys_root = \"$cfgdir/\1|" \
      -e "s|^proc_root = \"\([^/]\)|proc_root = \"$cfgdir/\1|" "$config" > "$f"
  grep -q '^node = ' "$f" || sed -i "/^\[agent\]/a node = \"bench-$1\"" "$f"
  grep -q '^\[mqtt\]' "$f" || printf '\n[mqtt]\nhost = "127.0.0.1"\nport = %s\n' "$port" >> "$f"
  echo "$f"
}

collectd_config() {   # interval-seconds -> temp config path
  local f="$tmp/collectd.conf"
  mkdir -p "$tmp/collectd"
  cat > "$f" <<EOF
Hostname "collectd-bench"
FQDNLookup false
BaseDir "$tmp/collectd"
PIDFile "$tmp/collectd/collectd.pid"
PluginDir "$plugin_dir"
TypesDB "/usr/share/collectd/types.db"
AutoLoadPlugin false
Interval $1
${COLLECTD_GLOBAL:-}
LoadPlugin cpu
LoadPlugin thermal
LoadPlugin mqtt
<Plugin mqtt>
  <Publish "bench">
    Host "127.0.0.1"
    Port "$port"
    ClientId "collectd-bench"
    QoS 1
    Prefix "collectd"
    Retain false
  </Publish>
</Plugin>
EOF
  echo "$f"
}

results=$tmp/results
: > "$results"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)   window ${seconds} s after ${warmup} s warm-up   broker 127.0.0.1:$port" >&2
for iv in "${intervals[@]}"; do
  secs=$(to_seconds "$iv")
  round=()
  "$collectd_bin" -f -C "$(collectd_config "$secs")" >"$tmp/collectd-$iv.log" 2>&1 &
  cpid=$!
  pids+=($cpid)
  round+=($cpid)
  apids=()
  for i in "${!labels[@]}"; do
    "${bins[$i]}" run --config "$(agent_config "${labels[$i]}" "$iv")" >/dev/null 2>"$tmp/agent-${labels[$i]}-$iv.log" &
    apids+=($!)
    pids+=($!)
    round+=($!)
  done
  pause "$warmup"
  for p in "$cpid" "${apids[@]}"; do
    kill -0 "$p" 2>/dev/null || {
      echo "$0: a process exited early at $iv; logs:" >&2
      tail -n 20 "$tmp"/collectd-"$iv".log "$tmp"/agent-*-"$iv".log >&2
      exit 1
    }
  done
  spid=
  if [ -n "$sub_bin" ]; then
    # Arrival time and topic, retained messages skipped; counted per publisher afterwards
    # for the arrivals inside the window.
    "$sub_bin" -h 127.0.0.1 -p "$port" -R -F '%U %t' -t 'nodewatt/#' -t 'collectd/#' >"$tmp/topics-$iv" 2>/dev/null &
    spid=$!
    pids+=($spid)
    round+=($spid)
    pause 0.2
  fi
  declare -A t0=() n0=()
  w0=$(date +%s.%N)
  for p in "$cpid" "${apids[@]}"; do t0[$p]=$(cpu_ticks "$p"); n0[$p]=$(cpu_ns "$p"); done
  pause "$seconds"
  w1=$(date +%s.%N)
  for p in "$cpid" "${apids[@]}"; do
    t1=$(cpu_ticks "$p")
    n1=$(cpu_ns "$p")
    echo "$iv $p $((t1 - ${t0[$p]})) $((n1 - ${n0[$p]})) $(status_kb "$p" VmRSS) $(status_kb "$p" VmHWM)" \
      "$(status_kb "$p" RssAnon) $(status_kb "$p" RssFile) $(status_kb "$p" Threads)" >> "$tmp/raw"
  done
  [ -z "$spid" ] || stop "$spid"
  stop "$cpid" "${apids[@]}"
  collectd_warn=$(grep -c -i 'not sleeping\|took .* seconds' "$tmp/collectd-$iv.log" || true)
  # One message per sample for the agent (unless samples were merged); collectd: one
  # per value, so its reads are counted by one value (cpu-0/cpu-idle).
  for i in "${!labels[@]}"; do
    a=${apids[$i]}
    if [ -n "$spid" ]; then
      read -r am cm cr < <(awk -v w0="$w0" -v w1="$w1" -v a="-${labels[$i]}/sample" '
        $1 >= w0 && $1 < w1 {
          if (substr($2, 1, 12) == "nodewatt/v1/" && substr($2, length($2) - length(a) + 1) == a) am++
          if (substr($2, 1, 9) == "collectd/") { cm++; if ($2 ~ /\/cpu-0\/cpu-idle$/) cr++ }
        }
        END { print am + 0, cm + 0, cr + 0 }' "$tmp/topics-$iv")
    else
      am=- cm=- cr=-
    fi
    awk -v iv="$iv" -v label="${labels[$i]}" -v a="$a" -v c="$cpid" -v hz="$hz" -v s="$(awk -v a="$w0" -v b="$w1" 'BEGIN { print b - a }')" \
        -v am="$am" -v cm="$cm" -v cr="$cr" -v warn="$collectd_warn" '
      $1 == iv && $2 == a { at = $3; an = $4; ar = $5; ah = $6; aa = $7; af = $8; ath = $9 }
      $1 == iv && $2 == c { ct = $3; cn = $4; cr_ = $5; ch = $6; ca = $7; cf = $8; cth = $9 }
      END {
        acpu = at / hz * 60 / s; ccpu = ct / hz * 60 / s
        printf "%s|%s|%d|%d|%.2f|%d|%d|%.3f|%.3f|%s|%.4f|%.4f|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s\n",
          iv, label, ar, cr_, cr_ ? ar / cr_ : 0, ah, ch, acpu, ccpu,
          ct ? sprintf("%.2f", acpu / ccpu) : "-",
          an / 1e9 * 60 / s, cn / 1e9 * 60 / s,
          am == "-" ? "-" : sprintf("%.1f", am / s), cm == "-" ? "-" : sprintf("%.1f", cm / s),
          cr == "-" ? "-" : sprintf("%.1f", cr / s),
          (am == "-" || am == 0) ? "-" : sprintf("%.3f", an / 1e6 / am),
          (cr == "-" || cr == 0) ? "-" : sprintf("%.3f", cn / 1e6 / cr),
          aa, af, ca, cf, ath, cth, warn
      }' "$tmp/raw" >> "$results"
  done
done
echo "load after:  $(cut -d' ' -f1-3 /proc/loadavg)" >&2

awk -F'|' -v s="$seconds" -v w="$warmup" '
  BEGIN {
    printf "window %d s after %d s warm-up; RSS in kB; CPU = utime+stime (10 ms ticks) per minute of window\n\n", s, w
    printf "%-8s %-12s %9s %9s %6s | %9s %9s | %8s %8s %6s | %9s %9s\n", "interval", "agent", "agentRSS", "cdRSS",
      "ratio", "agentHWM", "cdHWM", "agentCPU", "cdCPU", "ratio", "agentmsg/s", "cdmsg/s"
  }
  { printf "%-8s %-12s %9d %9d %6.2f | %9d %9d | %8.3f %8.3f %6s | %9s %9s\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $13, $14 }' "$results"
echo
awk -F'|' '
  BEGIN {
    printf "%-8s %-12s | %11s %11s | %9s %10s %10s | %9s %9s %9s %9s | %4s %4s | %s\n", "interval", "agent",
      "agentCPUns", "cdCPUns", "cdreads/s", "agentms/sm", "cdms/read", "agentAnon", "agentFile", "cdAnon", "cdFile",
      "aThr", "cThr", "collectd late-warnings"
  }
  { printf "%-8s %-12s | %11.4f %11.4f | %9s %10s %10s | %9s %9s %9s %9s | %4s %4s | %s\n", $1, $2, $11, $12, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24 }' "$results"
echo "(CPUns: schedstat CPU s/min; ms/sm: CPU ms per published sample; ms/read: per collectd read of all plugins)"
