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
# simulated GPUs running a small multi-project job scenario. Everything lives under
# $NODEWATT_DEMO_DIR (default: .nodewatt-demo in the repository). Ports (loopback only):
# MQTT $NODEWATT_DEMO_MQTT_PORT (18830), InfluxDB $NODEWATT_DEMO_INFLUX_PORT (18086).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
demo=${NODEWATT_DEMO_DIR:-$repo/.nodewatt-demo}
mqtt_port=${NODEWATT_DEMO_MQTT_PORT:-18830}
influx_port=${NODEWATT_DEMO_INFLUX_PORT:-18086}
influx_rpc_port=$((influx_port + 2))
sim_nodes=(sim001 sim002 sim003)

say() { printf '==> %s\n' "$*"; }
running() { [ -f "$demo/run/$1.pid" ] && kill -0 "$(cat "$demo/run/$1.pid")" 2>/dev/null; }

start() { # name, command...
  local name=$1
  shift
  if running "$name"; then
    say "$name already running (pid $(cat "$demo/run/$name.pid"))"
    return
  fi
  setsid "$@" >>"$demo/log/$name.log" 2>&1 </dev/null &
  echo $! >"$demo/run/$name.pid"
  say "started $name (pid $!, log $demo/log/$name.log)"
}

stop_all() {
  for f in "$demo"/run/*.pid; do
    [ -e "$f" ] || continue
    local pid
    pid=$(cat "$f")
    # Each service leads its own process group (setsid): signal the group.
    { kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null; } && say "stopped $(basename "$f" .pid)"
    rm -f "$f"
  done
}

status() {
  for f in "$demo"/run/*.pid; do
    [ -e "$f" ] || { echo "nothing running"; return; }
    local name
    name=$(basename "$f" .pid)
    if running "$name"; then echo "running  $name (pid $(cat "$f"))"; else echo "stopped  $name"; fi
  done
}

install_servers() {
  local need=()
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
  command -v influxd >/dev/null 2>&1 || need+=(influxdb)
  [ ${#need[@]} -eq 0 ] && return
  say "installing ${need[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

write_configs() {
  mkdir -p "$demo"/{run,log,mosquitto,influxdb,jobs,config,reports}
  local uid root_user=""
  uid=$(id -u)
  [ "$uid" -eq 0 ] && root_user="user root"
  cat >"$demo/config/mosquitto.conf" <<CONF
listener $mqtt_port 127.0.0.1
allow_anonymous true
persistence true
persistence_location $demo/mosquitto/
max_queued_messages 1000000
max_inflight_messages 1000
log_dest file $demo/log/mosquitto-broker.log
$root_user
CONF
  cat >"$demo/config/influxdb.conf" <<CONF
reporting-disabled = true
bind-address = "127.0.0.1:$influx_rpc_port"
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
      -e "s|^state_file = .*|state_file = \"$demo/run/outbox-local.jsonl\"|" \
      config/agent.toml >"$demo/config/agent-local.toml"
  local i=0
  for node in "${sim_nodes[@]}"; do
    mkdir -p "$demo/jobs/$node"
    chmod 0755 "$demo/jobs/$node"
    sed -e "s/^node = .*/node = \"$node\"/" \
        -e "s/^port = 1883/port = $mqtt_port/" \
        config/agent-simulated.toml >"$demo/config/agent-$node.toml"
    printf '\n[jobs]\ndir = "%s"\nowner_uid = %s\ntotals_interval = "10s"\n' "$demo/jobs/$node" "$uid" >>"$demo/config/agent-$node.toml"
    i=$((i + 1))
  done
  mkdir -p "$demo/jobs/local"
  chmod 0755 "$demo/jobs" "$demo/jobs/local"
}

# A small scenario: jobs of three projects come and go on the simulated nodes, as the
# Slurm prolog and epilog would write them.
scenario() {
  local projects=(climate llm-pretrain vision) users=(ana ben chen) n=1000
  while true; do
    for node in "${sim_nodes[@]}"; do
      local dir="$demo/jobs/$node" k=$((RANDOM % 3))
      # End one running job here, if any (recording its end, as the epilog does), and
      # start another on half of the GPUs. Ended files go after a minute.
      local old
      old=$(grep -L '^end_ms=' "$dir"/*.job 2>/dev/null | head -n 1 || true)
      if [ -n "$old" ]; then
        { cat "$old" && printf 'end_ms=%s\n' "$(date +%s%3N)"; } >"$dir/.tmp" && mv "$dir/.tmp" "$old"
      fi
      find "$dir" -name '*.job' -mmin +1 -exec grep -l '^end_ms=' {} + 2>/dev/null | xargs -r rm -f || true
      n=$((n + 1))
      local gpus="0,1,2,3"
      [ $((n % 2)) -eq 0 ] && gpus="4,5,6,7"
      printf 'job=%s\nproject=%s\nuser=%s\ngpus=%s\ncpus=16\nstart_ms=%s\n' \
        "$n" "${projects[$k]}" "${users[$k]}" "$gpus" "$(date +%s%3N)" >"$dir/.tmp" &&
        mv "$dir/.tmp" "$dir/$n.job"
    done
    sleep 20
  done
}

case ${1:-start} in
  stop) stop_all; exit 0 ;;
  status) status; exit 0 ;;
  clean) stop_all; rm -rf "$demo"; say "deleted $demo"; exit 0 ;;
  scenario) scenario ;;
  start) ;;
  *) echo "usage: $0 [start|status|stop|clean]" >&2; exit 2 ;;
esac

install_servers
command -v cargo >/dev/null || { echo "cargo is needed (https://rustup.rs)" >&2; exit 1; }
say "building (release)"
cargo build --release --quiet -p nodewatt-agent -p nodewatt-collector
write_configs
bin=$repo/target/release

start mosquitto "$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$demo/config/mosquitto.conf"
start influxd "$(command -v influxd)" -config "$demo/config/influxdb.conf"
for _ in $(seq 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$influx_port/ping" 2>/dev/null && break
  sleep 0.1
done
start collector "$bin/nodewatt-collector" serve --config "$demo/config/collector.toml"
sleep 1
start agent-local "$bin/nodewatt-agent" run --config "$demo/config/agent-local.toml"
for node in "${sim_nodes[@]}"; do
  start "agent-$node" "$bin/nodewatt-agent" run --config "$demo/config/agent-$node.toml"
done
start scenario bash "$repo/scripts/quickstart.sh" scenario

wait_s=${NODEWATT_DEMO_WAIT:-60}
say "collecting for ${wait_s}s (agents sample every second)..."
sleep "$wait_s"

from=$(date -u -d '-1 hour' +%Y-%m-%dT%H:%M:%SZ)
to=$(date -u -d '+1 minute' +%Y-%m-%dT%H:%M:%SZ)
say "usage by project, last hour"
"$bin/nodewatt-collector" usage --config "$demo/config/collector.toml" --from "$from" --to "$to" \
  --by project --price-per-kwh 0.25 --pue 1.3 --co2-g-per-kwh 350

cat <<MSG

Everything runs on loopback; data, configs and logs are in $demo
  InfluxDB   http://127.0.0.1:$influx_port  (database "nodewatt")
  MQTT       127.0.0.1:$mqtt_port

Grafana: add an InfluxDB (InfluxQL) datasource with uid "nodewatt-influxdb", URL
http://127.0.0.1:$influx_port and database "nodewatt" (or copy
dashboards/provisioning/ into /etc/grafana/provisioning/ and set the URL there), then
import dashboards/*.json. docs/dashboards.md says what each panel shows.

More:   $bin/nodewatt-collector usage --config $demo/config/collector.toml --from $from --to $to --by user
        $bin/nodewatt-collector report --config $demo/config/collector.toml --project llm-pretrain --from $from --to $to --output $demo/reports/llm-pretrain.md
Status: scripts/quickstart.sh status     Stop: scripts/quickstart.sh stop     Delete: scripts/quickstart.sh clean
Running it again reuses what is there.
MSG
