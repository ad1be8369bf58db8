#!/usr/bin/env bash
# nodewatt quickstart: the whole stack on this machine, on loopback, in one directory.
#
#   scripts/quickstart.sh          start (or reuse) everything, then print a usage table
#   scripts/quickstart.sh status   what is running
#   scripts/quickstart.sh stop     stop everything (data is kept)
#   scripts/quickstart.sh clean    stop and delete the directory
#
# Starts private mosquitto and influxd instances (installed with apt when missing), the
# collector, one agent reading this machine's real sources, and three agents with
# simulated GPUs running a small multi-project job scenario. Builds with README's own
# `cargo build --release`, so running that afterwards rebuilds nothing. Checks its ports
# before starting anything and each part after starting it; when one fails, or the bill
# comes out empty, it says which, shows the end of its log and exits non-zero.
#
# Environment, all optional:
#   NODEWATT_DEMO_DIR           where everything lives (default: .nodewatt-demo in the repository)
#   NODEWATT_DEMO_MQTT_PORT     MQTT port on 127.0.0.1 (18830)
#   NODEWATT_DEMO_INFLUX_PORT   InfluxDB HTTP port on 127.0.0.1 (18086); influxd also binds
#                               this + 2 for its RPC
#   NODEWATT_DEMO_WAIT          seconds of collecting before the bill (60)
#   NODEWATT_DEMO_BIN           directory holding nodewatt-agent and nodewatt-collector:
#                               use those and skip the cargo build
#   NODEWATT_DEMO_MOSQUITTO     mosquitto binary (default: mosquitto on PATH, or /usr/sbin)
#   NODEWATT_DEMO_INFLUXD       influxd binary (default: influxd on PATH)
#   NODEWATT_DEMO_NO_INSTALL=1  fail when a server is missing instead of installing it
set -euo pipefail
demo=${NODEWATT_DEMO_DIR:-}
[ -z "$demo" ] || [[ $demo == /* ]] || demo=$PWD/$demo
bin=${NODEWATT_DEMO_BIN:-}
[ -z "$bin" ] || [[ $bin == /* ]] || bin=$PWD/$bin
cd "$(dirname "$0")/.."
repo=$(pwd)
demo=${demo:-$repo/.nodewatt-demo}
mqtt_port=${NODEWATT_DEMO_MQTT_PORT:-18830}
influx_port=${NODEWATT_DEMO_INFLUX_PORT:-18086}
sim_nodes=(sim001 sim002 sim003)
# How to call this script again for the same directory.
self=scripts/quickstart.sh
[ -z "${NODEWATT_DEMO_DIR:-}" ] || self="NODEWATT_DEMO_DIR=$demo $self"

say() { printf '==> %s\n' "$*"; }
die() {
  printf 'quickstart: %s\n' "$*" >&2
  exit 1
}

# Running and ours: a stale pid file (after a reboot, say) may name someone else's
# process, and stop signals whole process groups, so the command line must name $demo.
running() {
  local f=$demo/run/$1.pid pid
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [[ $pid =~ ^[0-9]+$ ]] && grep -qaF -- "$demo" "/proc/$pid/cmdline" 2>/dev/null
}

# Alive and not a zombie (an exited child nobody reaped yet still has a pid).
alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat:0:1}" != Z ]
}

# Parts started by this run: a failure later stops them again, leaving nothing behind.
started=()
declare -A log_from=()

start() { # name, command...
  local name=$1 log=$demo/log/$1.log
  shift
  if running "$name"; then
    say "$name already running (pid $(cat "$demo/run/$name.pid"))"
    return
  fi
  touch "$log"
  # Checks read what this start logged, not an earlier run's lines.
  log_from[$name]=$(($(stat -c %s "$log") + 1))
  setsid "$@" >>"$log" 2>&1 </dev/null &
  local pid=$! tries=0
  echo "$pid" >"$demo/run/$name.pid"
  started+=("$name")
  # Until it has exec'd, the child's command line is still this script's (see running).
  until running "$name" || ! alive "$pid" || [ "$tries" -ge 100 ]; do
    sleep 0.02
    tries=$((tries + 1))
  done
}

started_ok() {
  local name=$1
  [ -n "${log_from[$name]:-}" ] || return 0 # reused: said so already
  say "started $name (pid $(cat "$demo/run/$name.pid"), log $demo/log/$name.log)"
}

# What a part logged since this run started it (or its whole log when reused).
new_log() { tail -c +"${log_from[$1]:-1}" "$demo/log/$1.log" 2>/dev/null; }

fail() { # name, what went wrong
  local name=$1 log=$demo/log/$1.log
  {
    printf 'quickstart: %s %s\n' "$name" "$2"
    if [ -n "$(new_log "$name")" ]; then
      printf -- '--- last lines of %s:\n' "$log"
      new_log "$name" | tail -n 20
      printf -- '---\n'
    else
      printf '(nothing in its log %s)\n' "$log"
    fi
  } >&2
  if [ ${#started[@]} -gt 0 ]; then
    say "stopping what this run started"
    stop_names "${started[@]}"
  fi
  exit 1
}

# Waits up to $2 seconds for the check "$4..." to pass while part $1 keeps running;
# $3 says what was waited for.
await() {
  local name=$1 secs=$2 what=$3
  shift 3
  local end=$((SECONDS + secs))
  until "$@"; do
    running "$name" || fail "$name" "exited while starting"
    [ "$SECONDS" -lt "$end" ] || fail "$name" "$what within ${secs}s"
    sleep 0.2
  done
  # A port answered by something else must not pass for ours.
  running "$name" || fail "$name" "exited while starting"
}

# shellcheck disable=SC2016 # $0 is expanded by the inner bash: the port.
accepts_tcp() { timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null; }
influx_ping() { curl -sf -o /dev/null --max-time 2 "http://127.0.0.1:$influx_port/ping"; }
# The collector logs "subscribed" at its SubAck: from then on the broker keeps its messages.
subscribed() { new_log collector | grep -q ' subscribed'; }

stop_names() {
  local name pids=() pid
  for name in "$@"; do
    local f=$demo/run/$name.pid
    [ -e "$f" ] || continue
    if running "$name"; then
      pid=$(cat "$f")
      # Each part leads its own process group (setsid): signal the group.
      kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
      pids+=("$pid")
      say "stopped $name"
    fi
    rm -f "$f"
  done
  # Wait, so that stop returns with everything gone (and ports free for a new start).
  local end=$((SECONDS + 20))
  for pid in "${pids[@]}"; do
    while alive "$pid" && [ "$SECONDS" -lt "$end" ]; do sleep 0.1; done
    if alive "$pid"; then
      kill -KILL -- -"$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

stop_all() {
  local f names=()
  for f in "$demo"/run/*.pid; do
    [ -e "$f" ] && names+=("$(basename "$f" .pid)")
  done
  [ ${#names[@]} -eq 0 ] || stop_names "${names[@]}"
}

status() {
  local f name any=
  for f in "$demo"/run/*.pid; do
    [ -e "$f" ] || continue
    any=1
    name=$(basename "$f" .pid)
    if running "$name"; then echo "running  $name (pid $(cat "$f"))"; else echo "stopped  $name"; fi
  done
  [ -n "$any" ] || echo "nothing running"
}

# Who listens on a TCP port, as "name (pid N)" when ss can tell (it can for root, or for
# the user's own processes).
holder() {
  command -v ss >/dev/null 2>&1 || return 0
  ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:(("[^"]*",pid=[0-9]*' | head -n 1 |
    sed -E 's/users:\(\("([^"]*)",pid=([0-9]+)/\1 (pid \2)/'
}

port_taken() {
  accepts_tcp "$1" && return 0
  command -v ss >/dev/null 2>&1 && [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]
}

check_ports() {
  local bad=0 port what var ours who
  while read -r port what var ours; do
    if ! [[ $port =~ ^[0-9]+$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
      die "port $port (${what//_/ }) is not a port number; set $var"
    fi
    # Our own instance from an earlier run holds it: it is reused, not started again.
    running "$ours" && continue
    port_taken "$port" || continue
    who=$(holder "$port")
    printf 'quickstart: port %s (%s) is already in use%s; choose another with %s=<port>\n' \
      "$port" "${what//_/ }" "${who:+ by $who}" "$var" >&2
    bad=1
  done <<PORTS
$mqtt_port MQTT NODEWATT_DEMO_MQTT_PORT mosquitto
$influx_port InfluxDB_HTTP NODEWATT_DEMO_INFLUX_PORT influxd
$((influx_port + 2)) InfluxDB_RPC,_the_HTTP_port_+_2 NODEWATT_DEMO_INFLUX_PORT influxd
PORTS
  [ "$bad" -eq 0 ] || exit 1
}

find_servers() {
  mosquitto_bin=${NODEWATT_DEMO_MOSQUITTO:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}
  influxd_bin=${NODEWATT_DEMO_INFLUXD:-$(command -v influxd || echo /usr/bin/influxd)}
}

# Missing servers (and curl) come from apt, unless told not to or impossible.
install_servers() {
  find_servers
  local need=() missing=()
  if [ ! -x "$mosquitto_bin" ]; then
    [ -z "${NODEWATT_DEMO_MOSQUITTO:-}" ] ||
      die "mosquitto: $mosquitto_bin (NODEWATT_DEMO_MOSQUITTO) is not an executable file"
    need+=(mosquitto) missing+=("mosquitto (package mosquitto)")
  fi
  if [ ! -x "$influxd_bin" ]; then
    [ -z "${NODEWATT_DEMO_INFLUXD:-}" ] ||
      die "influxd: $influxd_bin (NODEWATT_DEMO_INFLUXD) is not an executable file"
    need+=(influxdb) missing+=("influxd (package influxdb)")
  fi
  command -v curl >/dev/null 2>&1 || need+=(curl) missing+=("curl (package curl)")
  [ ${#need[@]} -eq 0 ] && return
  local list
  list=$(printf '%s, ' "${missing[@]}")
  list=${list%, }
  local hint="install ${need[*]} (Debian/Ubuntu: apt-get install ${need[*]}), or point NODEWATT_DEMO_MOSQUITTO / NODEWATT_DEMO_INFLUXD at the servers"
  [ "${NODEWATT_DEMO_NO_INSTALL:-}" != 1 ] ||
    die "not installed: $list; NODEWATT_DEMO_NO_INSTALL=1 forbids installing: $hint"
  command -v apt-get >/dev/null 2>&1 || die "not installed: $list, and there is no apt-get: $hint"
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "not installed: $list; installing needs root or sudo: $hint"
    sudo=(sudo)
  fi
  say "installing ${need[*]} (apt-get)"
  { "${sudo[@]}" apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; } ||
    die "apt-get could not install ${need[*]}: $hint"
  find_servers
  [ -x "$mosquitto_bin" ] || die "mosquitto is still missing after installing: $hint"
  [ -x "$influxd_bin" ] || die "influxd is still missing after installing: $hint"
}

build() {
  if [ -n "$bin" ]; then
    local b
    for b in nodewatt-agent nodewatt-collector; do
      [ -x "$bin/$b" ] || die "$bin/$b (NODEWATT_DEMO_BIN) is missing"
    done
    return
  fi
  command -v cargo >/dev/null || die "cargo is needed (https://rustup.rs), or set NODEWATT_DEMO_BIN"
  say "building: cargo build --release (the first build takes a few minutes)"
  # The whole workspace, as README's step by step builds it: building only the two
  # binaries unifies dependency features differently, and README's build redid 25 crates.
  cargo build --release || die "cargo build --release failed (above)"
  local target
  target=$(cargo metadata --no-deps --format-version 1 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  bin=${target:-$repo/target}/release
}

write_configs() {
  mkdir -p "$demo"/{run,log,mosquitto,influxdb,jobs,config,reports}
  local uid root_user=""
  uid=$(id -u)
  [ "$uid" -eq 0 ] && root_user="user root"
  # Broker messages go to stderr, i.e. its log, so a failed start shows why.
  cat >"$demo/config/mosquitto.conf" <<CONF
listener $mqtt_port 127.0.0.1
allow_anonymous true
persistence true
persistence_location $demo/mosquitto/
max_queued_messages 1000000
max_inflight_messages 1000
log_dest stderr
$root_user
CONF
  cat >"$demo/config/influxdb.conf" <<CONF
reporting-disabled = true
bind-address = "127.0.0.1:$((influx_port + 2))"
[meta]
  dir = "$demo/influxdb/meta"
[data]
  dir = "$demo/influxdb/data"
  wal-dir = "$demo/influxdb/wal"
  query-log-enabled = false
[http]
  enabled = true
  bind-address = "127.0.0.1:$influx_port"
  log-enabled = false
[monitor]
  store-enabled = false
CONF
  sed -e "s/^id = .*/id = \"quickstart\"/" \
      -e "s|^url = .*|url = \"http://127.0.0.1:$influx_port\"|" \
      -e "s/^# port = 1883.*/port = $mqtt_port/" \
      -e "s/^health_interval = .*/health_interval = \"5s\"/" \
      config/collector.toml >"$demo/config/collector.toml"
  # This machine, as it is: real GPUs (if any), CPU, RAPL, hwmon, thermal.
  sed -e "s/^cluster = .*/cluster = \"demo\"/" \
      -e "s|^dir = \"/run/nodewatt/jobs\"|dir = \"$demo/jobs/local\"|" \
      -e "s/^owner_uid = 0/owner_uid = $uid/" \
      -e "s/^# port = 1883 .*/port = $mqtt_port/" \
      -e "s|^state_file = .*|state_file = \"$demo/run/agent-local-state.json\"|" \
      -e "s|^spool_dir = .*|spool_dir = \"$demo/run/spool-local\"|" \
      config/agent.toml >"$demo/config/agent-local.toml"
  # Everything of the demo under $demo: not the installed agent's /var/lib/nodewatt.
  mkdir -p "$demo/run/spool-local"
  for node in "${sim_nodes[@]}"; do
    mkdir -p "$demo/jobs/$node"
    chmod 0755 "$demo/jobs/$node"
    sed -e "s/^node = .*/node = \"$node\"/" \
        -e "s/^port = 1883/port = $mqtt_port/" \
        config/agent-simulated.toml >"$demo/config/agent-$node.toml"
    printf '\n[jobs]\ndir = "%s"\nowner_uid = %s\ntotals_interval = "10s"\n' "$demo/jobs/$node" "$uid" >>"$demo/config/agent-$node.toml"
  done
  mkdir -p "$demo/jobs/local"
  chmod 0755 "$demo/jobs" "$demo/jobs/local"
}

# A small scenario: jobs of three projects come and go on the simulated nodes, as the
# Slurm prolog and epilog would write them. Projects rotate over the nodes, so every
# round runs all three and even a short demo bills each of them.
scenario() {
  local projects=(climate llm-pretrain vision) users=(ana ben chen) n=1000 round=0
  while true; do
    local i=0
    for node in "${sim_nodes[@]}"; do
      local dir="$demo/jobs/$node" k=$(((round + i) % 3))
      i=$((i + 1))
      # End one running job here, if any (recording its end, as the epilog does), and
      # start another on half of the GPUs. Ended files go after a minute.
      local old
      old=$(grep -L '^end_ms=' "$dir"/*.job 2>/dev/null | head -n 1 || true)
      if [ -n "$old" ]; then
        { cat "$old" && printf 'end_ms=%s\n' "$(date +%s%3N)"; } >"$dir/.tmp" && mv "$dir/.tmp" "$old"
      fi
      find "$dir" -name '*.job' -mmin +1 -exec grep -q '^end_ms=' {} \; -delete 2>/dev/null || true
      n=$((n + 1))
      local gpus="0,1,2,3"
      [ $((n % 2)) -eq 0 ] && gpus="4,5,6,7"
      printf 'job=%s\nproject=%s\nuser=%s\ngpus=%s\ncpus=16\nstart_ms=%s\n' \
        "$n" "${projects[$k]}" "${users[$k]}" "$gpus" "$(date +%s%3N)" >"$dir/.tmp" &&
        mv "$dir/.tmp" "$dir/$n.job"
    done
    round=$((round + 1))
    sleep 20
  done
}

case ${1:-start} in
  stop) stop_all; exit 0 ;;
  status) status; exit 0 ;;
  clean)
    stop_all
    # Only a directory this script made: NODEWATT_DEMO_DIR may point anywhere.
    if [ -e "$demo" ] && [ ! -e "$demo/config/mosquitto.conf" ]; then
      die "$demo does not look like a quickstart directory; not deleting it"
    fi
    rm -rf "$demo"
    say "deleted $demo"
    exit 0 ;;
  # Started by start below, with the directory as an argument so that its command line
  # names it (see running).
  scenario) demo=${2:-$demo}; scenario ;;
  start) ;;
  *) echo "usage: $0 [start|status|stop|clean]" >&2; exit 2 ;;
esac

check_ports
install_servers
build
write_configs

start mosquitto "$mosquitto_bin" -c "$demo/config/mosquitto.conf"
await mosquitto 10 "accepted no connection on 127.0.0.1:$mqtt_port" accepts_tcp "$mqtt_port"
started_ok mosquitto
start influxd "$influxd_bin" -config "$demo/config/influxdb.conf"
await influxd 30 "did not answer http://127.0.0.1:$influx_port/ping" influx_ping
started_ok influxd
start collector "$bin/nodewatt-collector" serve --config "$demo/config/collector.toml"
if [ -n "${log_from[collector]:-}" ]; then
  await collector 20 "did not subscribe to the broker (its log says \"subscribed\" when it has)" subscribed
fi
started_ok collector
agents=(agent-local)
start agent-local "$bin/nodewatt-agent" run --config "$demo/config/agent-local.toml"
for node in "${sim_nodes[@]}"; do
  agents+=("agent-$node")
  start "agent-$node" "$bin/nodewatt-agent" run --config "$demo/config/agent-$node.toml"
done
start scenario bash "$repo/scripts/quickstart.sh" scenario "$demo"
# An agent with a bad config or no broker exits within its first sample or two.
sleep 2
for name in "${agents[@]}" scenario; do
  running "$name" || fail "$name" "exited shortly after starting"
  started_ok "$name"
done

wait_s=${NODEWATT_DEMO_WAIT:-60}
say "collecting for ${wait_s}s (agents sample every second)..."
sleep "$wait_s"

from=$(date -u -d '-1 hour' +%Y-%m-%dT%H:%M:%SZ)
to=$(date -u -d '+1 minute' +%Y-%m-%dT%H:%M:%SZ)
say "usage by project, last hour"
bill=$("$bin/nodewatt-collector" usage --config "$demo/config/collector.toml" --from "$from" --to "$to" \
  --by project --price-per-kwh 0.25 --pue 1.3 --co2-g-per-kwh 350) ||
  die "nodewatt-collector usage failed (above); the collector's log: $demo/log/collector.log"
printf '%s\n' "$bill"
# A bill with no energy means the pipeline is broken somewhere: say where to look.
if ! awk '$1 == "TOTAL" { for (i = 2; i <= NF; i++) if ($i + 0 > 0) found = 1 } END { exit !found }' <<<"$bill"; then
  {
    echo "quickstart: the bill is empty: no energy reached InfluxDB in ${wait_s}s."
    echo "Look first at the collector's log, $demo/log/collector.log: its \"health\" lines count"
    echo "messages in, rejected and written. The agents' logs are beside it."
    printf -- '--- last lines of %s:\n' "$demo/log/collector.log"
    tail -n 10 "$demo/log/collector.log"
    printf -- '---\nEverything is still running: %s status; %s stop\n' "$self" "$self"
  } >&2
  exit 1
fi

cat <<MSG

Everything runs on loopback; data, configs and logs are in $demo
  InfluxDB   http://127.0.0.1:$influx_port  (database "nodewatt")
  MQTT       127.0.0.1:$mqtt_port

Grafana: provision the datasource and the five dashboards by copying files, with the URL
http://127.0.0.1:$influx_port and database "nodewatt": docs/dashboards.md, "Provisioning
Grafana". That page also says what each panel shows.

More:   $bin/nodewatt-collector usage --config $demo/config/collector.toml --from $from --to $to --by user
        $bin/nodewatt-collector report --config $demo/config/collector.toml --project llm-pretrain --from $from --to $to --output $demo/reports/llm-pretrain.md
Status: $self status
Stop:   $self stop     (all of it; the data is kept, and a new start reuses it)
Delete: $self clean
MSG
