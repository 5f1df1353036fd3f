#!/usr/bin/env bash
# Benchmarks, one command each: bench/run.sh NAME [ARGS]. Results are appended
# to bench/RESULTS.md with the machine, the date and the command.
#
#   bench/run.sh idle-connections [DEVICES] [SECONDS] [tcp|tls|mtls]   (alias: fleetsim-scale)
#       fleetd (embedded PostgreSQL) and Mosquitto, in turn, each holding DEVICES idle devices
#       played by one fleetsim (keepalive 300 s) over plain TCP (default), TLS (token in CONNECT)
#       or mTLS (a client certificate per device, Mosquitto with require_certificate): RSS per
#       connection of both brokers, and fleetd's Go stacks, heap in use and goroutines per device.
#   bench/run.sh connect-rate [SECONDS]
#       CONNECT -> CONNACK -> DISCONNECT as fast as admitted: fleetd with token authentication
#       (every connect event committed in PostgreSQL) against Mosquitto (anonymous).
#   bench/run.sh offline-detection [DEVICES] [KEEPALIVE]
#       DEVICES go silent with their sockets open: time to fleetd's keepalive_timeout event,
#       and to Mosquitto's delivery of their wills.
#   bench/run.sh per-message [SECONDS] [RATE]
#       broker CPU time per QoS 0 telemetry message at RATE messages/s, fleetd vs Mosquitto.
#   bench/run.sh reconnect-storm [DEVICES] [RETRY]
#       fleetd restarted under DEVICES connected devices (raw MQTT, token auth) that each retry
#       every ~RETRY (default 100ms, jittered) until admitted: time until all are back online
#       against 2 x (DEVICES / connect rate), memory overshoot, connect events written; the same
#       for Mosquitto. STORM_RATE=N sets fleetd's connect rate (default 5000/s).
#   bench/run.sh ota-download [DOWNLOADS] [MIB]
#       DOWNLOADS concurrent ranged downloads of a MIB image from fleetd (token-authorised,
#       http.ServeContent) against a plain Go file server.
#   bench/run.sh campaign-dispatch [DEVICES] [PER_MINUTE] [ONLINE]
#       one campaign over DEVICES devices (registered through SQL) at devices_per_minute
#       PER_MINUTE, ONLINE of them played by fleetsim and upgraded over MQTT: achieved rate
#       against the configured one (the peer is the schedule itself), worst 10 s window, CPU.
#   bench/run.sh telemetry-ingest [SECONDS] [DEVICES]
#       DEVICES devices (default 2 000) send QoS 0 telemetry (three metrics and a link) at
#       TELEMETRY_RATE messages/s in total (default 50 000, i.e. 25/s per device, written about
#       four to a TCP write) for SECONDS (default 60): messages/s stored by fleetd (committed
#       rows, then counted in PostgreSQL), CPU per message of fleetd and of its PostgreSQL,
#       against Mosquitto delivering the same load to one subscriber. fleetd runs with
#       -telemetry-rate at twice the per-device rate.
#   bench/run.sh event-ingest
#       connection events written through fleetd's batched writer vs a raw COPY into the same
#       table vs one INSERT per row (Go benchmarks of package fleet).
#   bench/run.sh replicas [N] [DEVICES]
#       N fleetd replicas on one PostgreSQL behind HAProxy, DEVICES devices played by
#       ceil(DEVICES / 18000) fleetsim processes; decommissions and token rotations through random
#       replicas, then a campaign over every device: connects, kick latency across replicas, job
#       delivery (jobs / devices, none twice), RSS per replica. Up to 9 000 devices connect through
#       HAProxy (it holds 2 fds per connection under the same 20 000 limit); above, each fleetsim
#       spreads its devices over the replicas directly (REPLICAS_VIA=haproxy|direct forces one).
#   bench/run.sh data-scale [DEVICES] [EVENTS]
#       DEVICES devices (default 200 000) and EVENTS connection events (default 20 000 000) over
#       the last 30 days loaded in SQL into one PostgreSQL with the rollups they imply, and a day of
#       telemetry for 100 devices through telemetry.Writer; then, with fleetd serving it: p50/p99 of
#       fleet health, fleet history (a day by 5m and 1m, a week by 1h, a month by 1d) and a device's
#       telemetry for a day (raw, 1m, 1h), each analysis run, load time and database size; the
#       pre-rollup fleet-health query on device_events for contrast.
#   bench/run.sh ota-delta [DEVICES]
#       two builds of one small Go program that differ by a small change (a string and a line of
#       code, made by go build here)
#       as firmware 1.0.0 and 1.1.0; DEVICES (default 1 000) simulated devices on 1.0.0 upgraded by a delta
#       campaign, then DEVICES others (another model) by a full-image campaign, same pacing: bytes
#       fleetd served per campaign (its own per-job count), bytes saved, time and fleetd CPU.
#
# --smoke as the last argument runs a tiny version and writes to a scratch file instead of
# bench/RESULTS.md (the tests do this so that no benchmark rots).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-}
[ -n "$name" ] || { sed -n '2,40p' "$0"; exit 2; }
shift
smoke=false
if [ "${!#:-}" = "--smoke" ]; then smoke=true; set -- "${@:1:$(($#-1))}"; fi
args="$*"
results=bench/RESULTS.md
$smoke && results=$(mktemp)
bin=$(mktemp -d)
work=$(mktemp -d)
chmod 755 "$work"
# stop_pids PID...: SIGTERM to each, then wait for all of them.
stop_pids() {
  local p
  for p in "$@"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "$@"; do wait "$p" 2>/dev/null || true; done
}
sim_pids=(); replica_pids=(); haproxy_pid=; pg_pid=
cleanup() {
  [ -n "${fleetd_pid:-}" ] && kill -TERM "$fleetd_pid" 2>/dev/null && wait "$fleetd_pid" 2>/dev/null || true
  [ -n "${mosq_pid:-}" ] && kill -TERM "$mosq_pid" 2>/dev/null && wait "$mosq_pid" 2>/dev/null || true
  # The replicas benchmark's processes, load first and the database last.
  ((${#sim_pids[@]})) && stop_pids "${sim_pids[@]}"
  [ -n "$haproxy_pid" ] && stop_pids "$haproxy_pid"
  ((${#replica_pids[@]})) && stop_pids "${replica_pids[@]}"
  [ -n "$pg_pid" ] && stop_pids "$pg_pid"
  rm -rf "$bin" "$work"
}
trap cleanup EXIT
go build -o "$bin/" ./cmd/fleetd ./cmd/fleetsim ./bench/mqttload ./bench/replicaload

# free_port prints a loopback TCP port no socket uses, below the kernel's
# ephemeral range (where outbound connections take their ports), so that
# runs (and the tests' smoke runs) never collide with each other.
free_port() {
  local p low
  low=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range)
  while :; do
    p=$((10000 + RANDOM % (low - 10000)))
    [ -z "$(ss -Htan "sport = :$p")" ] && { echo "$p"; return; }
  done
}
HTTP_PORT=$(free_port); MQTT_PORT=$(free_port); MOSQ_PORT=$(free_port); FILE_PORT=$(free_port)

machine() {
  echo "- machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(go version | cut -d' ' -f3), open files: soft $(ulimit -Sn) / hard $(ulimit -Hn)"
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo none)"
}

rss_kib() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }

# start_fleetd [VAR=value ...]: the benchmarks' fleetd; assignments override the defaults.
# Every simulated device connects from 127.0.0.1: the per-source cap on
# connections that have not sent CONNECT is for real fleets spread over many
# addresses, so it is off here.
start_fleetd() {
  env FLEETD_DATA_DIR="$work/data" FLEETD_HTTP_ADDR=127.0.0.1:$HTTP_PORT FLEETD_MQTT_ADDR=127.0.0.1:$MQTT_PORT \
    FLEETD_LOG_LEVEL=warn FLEETD_MQTT_CONNECT_RATE=0 FLEETD_MQTT_CLIENT_CONNECT_RATE=0 \
    FLEETD_MQTT_MAX_PENDING_CONNECTS_PER_SOURCE=0 "$@" "$bin/fleetd" 2>>"$work/fleetd.log" &
  fleetd_pid=$!
  for _ in $(seq 150); do
    curl -fs http://127.0.0.1:$HTTP_PORT/readyz >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "fleetd did not become ready"; cat "$work/fleetd.log"; exit 1
}

stop_fleetd() { kill -TERM "$fleetd_pid"; wait "$fleetd_pid" || true; fleetd_pid=; }

# start_mosquitto [LISTENER_OPTIONS]: the peer; the options (e.g. cafile,
# certfile, keyfile lines) go with its listener.
start_mosquitto() {
  local mosq
  mosq=$(command -v mosquitto || { [ -x /usr/sbin/mosquitto ] && echo /usr/sbin/mosquitto; }) ||
    { echo "mosquitto (the peer broker) is not installed: apt-get install mosquitto"; exit 1; }
  printf 'listener %s 127.0.0.1\n%s\nallow_anonymous true\nmax_connections -1\nmax_queued_messages 100\npersistence false\nlog_type none\n' "$MOSQ_PORT" "${1:-}" >"$work/mosquitto.conf"
  "$mosq" -c "$work/mosquitto.conf" 2>"$work/mosquitto.log" &
  mosq_pid=$!
  for _ in $(seq 50); do
    (exec 3<>/dev/tcp/127.0.0.1/"$MOSQ_PORT") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "mosquitto did not start"; cat "$work/mosquitto.log"; exit 1
}
stop_mosquitto() { kill -TERM "$mosq_pid"; wait "$mosq_pid" || true; mosq_pid=; }

token() { cat "$work/data/admin-token"; }

# register N devices prefix → writes $work/ids-fleetd.json (id → token) and $work/ids-anon.json
register() {
  local n=$1 prefix=$2 tok
  tok=$(token)
  { echo "{"
    for i in $(seq 0 $((n - 1))); do
      t=$(curl -fs -X POST -H "Authorization: Bearer $tok" -d "{\"id\":\"$prefix$i\",\"model\":\"bench\"}" \
        http://127.0.0.1:$HTTP_PORT/api/v1/devices | sed -n 's/.*"token":"\([^"]*\)".*/\1/p')
      [ "$i" -gt 0 ] && echo ","
      printf '"%s%s":"%s"' "$prefix" "$i" "$t"
    done
    echo "}"; } >"$work/ids-fleetd.json"
  { echo "{"
    for i in $(seq 0 $((n - 1))); do [ "$i" -gt 0 ] && echo ","; printf '"%s%s":""' "$prefix" "$i"; done
    echo "}"; } >"$work/ids-anon.json"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# field JSON KEY: the first number KEY has in a one-line JSON result.
field() { echo "$1" | sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" | head -1; }
# ratio A B [DIGITS]: A / B with DIGITS decimals (2), or - when B is 0.
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN{if (b > 0) printf "%.*f", d, a/b; else print "-"}'; }

header() {
  echo
  echo "## $1"
  machine
  echo "- command: \`bench/run.sh $name $args\`"
}

sessions() { curl -fs http://127.0.0.1:$HTTP_PORT/metrics | awk '/^fleetd_mqtt_sessions /{print $2}'; }
# go_mem: the Go runtime's own view of fleetd's memory, in MiB.
go_mem() {
  curl -fs http://127.0.0.1:$HTTP_PORT/metrics | awk '/^go_memstats_heap_inuse_bytes /{h=$2} /^go_memstats_stack_inuse_bytes /{s=$2} /^go_memstats_heap_idle_bytes /{i=$2} /^go_memstats_heap_released_bytes /{r=$2}
    END {printf "heap in use %.0f MiB, stacks %.0f MiB, idle heap not yet returned to the OS %.0f MiB", h/1048576, s/1048576, (i-r)/1048576}'
}
established() { ss -Htn state established "( sport = :$1 )" | wc -l; }

case "$name" in
reconnect-storm)
  devices=${1:-15000}; retry=${2:-100ms}; $smoke && devices=100
  # since_restart RESULT READY: "all back online N s after it was ready (M s after the drop)".
  since_restart() {
    echo "$1" | awk -v up="$2" -v d="$devices" '{
      match($0, /"back":[0-9]+/); n = substr($0, RSTART + 7, RLENGTH - 7)
      match($0, /"all_back_unix_ms":[0-9]+/); all = substr($0, RSTART + 19, RLENGTH - 19) / 1000
      match($0, /"first_drop_unix_ms":[0-9]+/); drop = substr($0, RSTART + 21, RLENGTH - 21) / 1000
      if (n != d) print "not all back (" n " of " d ")"
      else printf "all back online %.1f s after it was ready (%.1f s after the drop)", all - up, all - drop }'
  }
  rate=${STORM_RATE:-5000}
  start_fleetd FLEETD_MQTT_CONNECT_RATE=$rate FLEETD_MQTT_CONNECT_BURST=1000
  "$bin/mqttload" storm -addr 127.0.0.1:$MQTT_PORT -n "$devices" -api "http://127.0.0.1:$HTTP_PORT" -token "$(token)" \
    -ready "$work/held" -retry "$retry" -duration 120s >"$work/storm.json" 2>"$work/storm.err" &
  load_pid=$!
  for _ in $(seq 1200); do [ -e "$work/held" ] && break; sleep 0.2; done
  [ -e "$work/held" ] || { echo "the devices did not all connect"; cat "$work/storm.err"; exit 1; }
  sleep 2
  steady=$(rss_kib "$fleetd_pid"); steady_go=$(go_mem)
  kill -TERM "$fleetd_pid"; wait "$fleetd_pid" || true
  down=$(date +%s.%N)
  start_fleetd FLEETD_MQTT_CONNECT_RATE=$rate FLEETD_MQTT_CONNECT_BURST=1000
  up=$(date +%s.%N)
  peak=0
  while [ ! -s "$work/storm.json" ] && kill -0 "$load_pid" 2>/dev/null; do
    r=$(rss_kib "$fleetd_pid"); [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.1
  done
  sleep 2
  after=$(rss_kib "$fleetd_pid"); after_go=$(go_mem)
  written=$(curl -fs http://127.0.0.1:$HTTP_PORT/metrics | awk '/^fleetd_events_written_total /{print $2}')
  online=$(sessions)
  kill "$load_pid"; wait "$load_pid" || true
  stop_fleetd
  f=$(cat "$work/storm.json")
  f_all=$(since_restart "$f" "$up")
  f_over=$(( (peak - steady) * 100 / steady ))
  # The peer: Mosquitto restarted under the same load (anonymous, no rate limit).
  rm -f "$work/held"
  start_mosquitto
  "$bin/mqttload" storm -addr 127.0.0.1:$MOSQ_PORT -n "$devices" -ready "$work/held" -retry "$retry" -duration 120s >"$work/storm-mosq.json" 2>"$work/storm-mosq.err" &
  load_pid=$!
  for _ in $(seq 1200); do [ -e "$work/held" ] && break; sleep 0.2; done
  stop_mosquitto
  start_mosquitto
  mup=$(date +%s.%N)
  while [ ! -s "$work/storm-mosq.json" ] && kill -0 "$load_pid" 2>/dev/null; do sleep 0.1; done
  kill "$load_pid"; wait "$load_pid" || true
  stop_mosquitto
  m=$(cat "$work/storm-mosq.json")
  m_all=$(since_restart "$m" "$mup")
  { header "reconnect-storm: $devices devices reconnecting after a restart, each retrying every ~$retry (connect rate $rate/s, burst 1000)"
    echo "- fleetd: $f_all; the new process was ready $(awk -v a="$up" -v b="$down" 'BEGIN{printf "%.1f", a-b}') s after the old one exited; RSS ${steady} KiB before ($steady_go), peak ${peak} KiB during the storm (+${f_over} %), ${after} KiB after ($after_go); sessions after: ${online}; events written after the restart: ${written:-0} ($devices connects + $(echo "$f" | sed -n 's/.*"refused":\([0-9]*\).*/\1/p') refusals expected); load generator: \`$f\`"
    echo "- mosquitto 2.0 (peer, no rate limit): $m_all; \`$m\`"
    echo "- target: all online within 2 x ($devices / $rate) = $(awk -v n="$devices" -v r="$rate" 'BEGIN{printf "%.1f", 2*n/r}') s, memory overshoot <= 10 %, no crash, no lost event"
  } | tee -a "$results"
  ;;
ota-download)
  downloads=${1:-1000}; mib=${2:-4}; $smoke && downloads=20 && mib=1
  head -c $((mib << 20)) /dev/urandom >"$work/fw.bin"
  start_fleetd FLEETD_OTA_MAX_DOWNLOADS="$downloads"
  id=$(curl -fs -X POST -H "Authorization: Bearer $(token)" --data-binary @"$work/fw.bin" \
    "http://127.0.0.1:$HTTP_PORT/api/v1/firmware?version=bench&models=gw-100" | sed -n 's/.*"id":"\([^"]*\)".*/\1/p')
  f=$("$bin/mqttload" download -url "http://127.0.0.1:$HTTP_PORT/api/v1/firmware/$id/download" -token "$(token)" -n "$downloads")
  stop_fleetd
  "$bin/mqttload" fileserver -addr 127.0.0.1:$FILE_PORT -file "$work/fw.bin" &
  fs_pid=$!
  sleep 0.5
  m=$("$bin/mqttload" download -url "http://127.0.0.1:$FILE_PORT/fw.bin" -n "$downloads")
  kill "$fs_pid"; wait "$fs_pid" 2>/dev/null || true
  { header "ota-download: $downloads concurrent ranged downloads of a $mib MiB image"
    echo "- fleetd (token check, ServeContent from the content-addressed file): \`$f\`"
    echo "- plain Go file server (peer): \`$m\`"
    echo "- target: >= 0.8x the peer's throughput"
  } | tee -a "$results"
  ;;
connect-rate)
  seconds=${1:-30}; $smoke && seconds=2
  start_fleetd
  register 200 cr-
  pg=$(head -1 "$work/data/postgres/data/postmaster.pid")
  f=$("$bin/mqttload" connect-rate -addr 127.0.0.1:$MQTT_PORT -ids "$work/ids-fleetd.json" -duration "${seconds}s" -concurrency 64 \
    -pids "fleetd=$fleetd_pid,postgres=$pg")
  sleep 1
  written=$(curl -fs http://127.0.0.1:$HTTP_PORT/metrics | awk '/^fleetd_events_written_total /{print $2}')
  stop_fleetd
  start_mosquitto
  m=$("$bin/mqttload" connect-rate -addr 127.0.0.1:$MOSQ_PORT -ids "$work/ids-anon.json" -duration "${seconds}s" -concurrency 64 \
    -pids "mosquitto=$mosq_pid")
  stop_mosquitto
  fcpu=$(field "$f" fleetd); pcpu=$(field "$f" postgres); mcpu=$(field "$m" mosquitto)
  { header "connect-rate: ${seconds}s, 64 parallel clients, 200 device ids"
    echo "- fleetd (token auth, events committed): \`$f\`; events written to PostgreSQL: $written (a connect and a disconnect per session)"
    echo "- mosquitto 2.0 (anonymous, peer): \`$m\`"
    echo "- ratios: connects/s fleetd / mosquitto $(ratio "$(field "$f" connects_per_s)" "$(field "$m" connects_per_s)"); CPU per connect fleetd / mosquitto $(ratio "$fcpu" "$mcpu"), fleetd + PostgreSQL / mosquitto $(ratio "$(awk -v a="$fcpu" -v b="$pcpu" 'BEGIN{print a+b}')" "$mcpu")"
    echo "- target: >= 10 000 connects/s sustained, p99 <= 20 ms, >= 1.0x Mosquitto"
  } | tee -a "$results"
  ;;
offline-detection)
  devices=${1:-200}; keepalive=${2:-5}; $smoke && devices=5 && keepalive=1
  start_fleetd
  register "$devices" od-
  f=$("$bin/mqttload" freeze -addr 127.0.0.1:$MQTT_PORT -ids "$work/ids-fleetd.json" -keepalive "$keepalive" -events-api http://127.0.0.1:$HTTP_PORT -token "$(token)")
  stop_fleetd
  start_mosquitto
  m=$("$bin/mqttload" freeze -addr 127.0.0.1:$MOSQ_PORT -ids "$work/ids-anon.json" -keepalive "$keepalive" -watch-will)
  stop_mosquitto
  { header "offline-detection: $devices frozen devices, keepalive ${keepalive}s"
    echo "- fleetd, silence to the keepalive_timeout event (committed within the 50 ms flush): \`$f\`"
    echo "- mosquitto 2.0 (peer), silence to will delivery: \`$m\`"
    echo "- target: p99 <= 1.5 x keepalive + 1 s ($((keepalive * 1500 + 1000)) ms)"
  } | tee -a "$results"
  ;;
per-message)
  seconds=${1:-20}; rate=${2:-20000}; $smoke && seconds=2 && rate=500
  # 200 messages/s per device is above a device session's default rate; the
  # peer has no such limit, so neither does fleetd here.
  start_fleetd FLEETD_MQTT_PUBLISH_RATE=-1
  register 100 pm-
  before=$(cpu_ticks "$fleetd_pid")
  f=$("$bin/mqttload" publish -addr 127.0.0.1:$MQTT_PORT -ids "$work/ids-fleetd.json" -rate "$rate" -duration "${seconds}s")
  after=$(cpu_ticks "$fleetd_pid")
  fmsgs=$(echo "$f" | sed -n 's/.*"messages":\([0-9]*\).*/\1/p')
  fus=$(( (after - before) * 1000000 / $(getconf CLK_TCK) / (fmsgs > 0 ? fmsgs : 1) ))
  stop_fleetd
  start_mosquitto
  before=$(cpu_ticks "$mosq_pid")
  m=$("$bin/mqttload" publish -addr 127.0.0.1:$MOSQ_PORT -ids "$work/ids-anon.json" -rate "$rate" -duration "${seconds}s")
  after=$(cpu_ticks "$mosq_pid")
  mmsgs=$(echo "$m" | sed -n 's/.*"messages":\([0-9]*\).*/\1/p')
  mus=$(( (after - before) * 1000000 / $(getconf CLK_TCK) / (mmsgs > 0 ? mmsgs : 1) ))
  stop_mosquitto
  { header "per-message: ${rate} QoS 0 telemetry messages/s from 100 devices for ${seconds}s"
    echo "- fleetd: $fus µs of CPU per message (\`$f\`)"
    echo "- mosquitto 2.0 (peer): $mus µs of CPU per message (\`$m\`)"
  } | tee -a "$results"
  ;;
campaign-dispatch)
  devices=${1:-100000}; per_minute=${2:-60000}; online=${3:-1000}
  $smoke && devices=300 && per_minute=6000 && online=20
  start_fleetd
  cat >"$work/fleet.yaml" <<YAML
server: {mqtt: "tcp://127.0.0.1:$MQTT_PORT", api: "http://127.0.0.1:$HTTP_PORT", admin_token_file: "$work/data/admin-token"}
run: {duration: 3600s, ramp: 2000, register: true}
ota: {install_time: 1s}
cohorts:
  - {name: online, count: $online, model: gw-100, firmware: 1.0.3, keepalive: 60s}
YAML
  "$bin/fleetsim" run -f "$work/fleet.yaml" >/dev/null 2>"$work/fleetsim.err" &
  sim_pid=$!
  for _ in $(seq 300); do [ "$(sessions)" = "$online" ] && break; sleep 0.2; done
  before=$(cpu_ticks "$fleetd_pid")
  r=$("$bin/mqttload" campaign-dispatch -api "http://127.0.0.1:$HTTP_PORT" -token "$(token)" \
    -dsn "host=$work/data/postgres/run port=5432 user=fleetd dbname=fleetd sslmode=disable" -devices "$devices" -per-minute "$per_minute")
  after=$(cpu_ticks "$fleetd_pid")
  kill "$sim_pid"; wait "$sim_pid" || true
  stop_fleetd
  jobs=$(echo "$r" | sed -n 's/.*"dispatched":\([0-9]*\).*/\1/p')
  cpu_ms=$(( (after - before) * 1000 / $(getconf CLK_TCK) ))
  { header "campaign-dispatch: $((devices + online)) devices, devices_per_minute $per_minute, $online of them online"
    echo "- fleetd: \`$r\`"
    echo "- fleetd CPU while dispatching: $cpu_ms ms ($(( cpu_ms * 1000 / (jobs > 0 ? jobs : 1) )) µs per job, in step transactions, signing and MQTT delivery)"
    echo "- peer: the configured schedule, $per_minute jobs a minute ($(awk -v n="$((devices + online))" -v r="$per_minute" 'BEGIN{printf "%.1f", (n-1)/r*60}') s for every job)"
    echo "- target: achieved rate within 5 % of devices_per_minute"
  } | tee -a "$results"
  ;;
telemetry-ingest)
  seconds=${1:-60}; devices=${2:-2000}; rate=${TELEMETRY_RATE:-50000}
  $smoke && seconds=3 && devices=50 && rate=500
  # Each process holds at most 20 000 open files: one per device connection.
  [ "$devices" -le 18000 ] || { echo "at most 18000 devices (open files)"; exit 2; }
  per_device=$(awk -v r="$rate" -v d="$devices" 'BEGIN{printf "%g", r/d}')
  limit=$(awk -v p="$per_device" 'BEGIN{printf "%g", 2*p}')
  burst=$(awk -v p="$per_device" 'BEGIN{b=int(4*p); print (b < 10 ? 10 : b)}')
  start_fleetd FLEETD_TELEMETRY_RATE="$limit" FLEETD_TELEMETRY_BURST="$burst"
  pg=$(head -1 "$work/data/postgres/data/postmaster.pid")
  dsn="host=$work/data/postgres/run port=5432 user=fleetd dbname=fleetd sslmode=disable"
  f=$("$bin/mqttload" telemetry -addr 127.0.0.1:$MQTT_PORT -n "$devices" -api "http://127.0.0.1:$HTTP_PORT" -token "$(token)" \
    -rate "$rate" -duration "${seconds}s" -metrics "http://127.0.0.1:$HTTP_PORT/metrics" -pids "fleetd=$fleetd_pid,postgres=$pg")
  mtext=$(curl -fs http://127.0.0.1:$HTTP_PORT/metrics)
  dropped=$(echo "$mtext" | awk '/^fleetd_telemetry_dropped_total/{s+=$2} END{print s+0}')
  sampled=$(echo "$mtext" | awk '/^fleetd_telemetry_sampled_total /{print $2}')
  rows=$(psql "$dsn" -Atc "SELECT count(*) FROM telemetry_raw")
  [ "$dropped" = 0 ] || { echo "fleetd dropped telemetry; its log:"; tail -20 "$work/fleetd.log"; } >&2
  # The rollup job runs every 10 s; a minute is sealed 10 s after its end.
  $smoke || sleep 25
  rolled=$(psql "$dsn" -Atc "SELECT (SELECT count(*) FROM telemetry_minute) || ' minute rows, ' || (SELECT count(*) FROM telemetry_link) || ' links, rolled up to ' || (SELECT to_char(rolled_to AT TIME ZONE 'UTC', 'HH24:MI') FROM telemetry_rollup_state) || ' UTC, now ' || to_char(now() AT TIME ZONE 'UTC', 'HH24:MI:SS')")
  stop_fleetd
  start_mosquitto
  m=$("$bin/mqttload" telemetry -addr 127.0.0.1:$MOSQ_PORT -n "$devices" -rate "$rate" -duration "${seconds}s" -subscribe -pids "mosquitto=$mosq_pid")
  stop_mosquitto
  fcpu=$(field "$f" fleetd); pcpu=$(field "$f" postgres); mcpu=$(field "$m" mosquitto)
  fstored=$(field "$f" stored_per_s); mdel=$(field "$m" delivered_per_s)
  { header "telemetry-ingest: $devices devices, $rate QoS 0 telemetry messages/s offered in total ($per_device/s per device; fleetd's -telemetry-rate $limit, burst $burst) for ${seconds}s"
    echo "- fleetd: $fstored messages/s stored (fleetd_telemetry_written_total, committed to telemetry_raw, from the first message sent to the last commit); $rows rows counted in telemetry_raw after the run; $dropped dropped after acceptance, ${sampled:-0} sampled by the rate limit; CPU per stored message: fleetd $fcpu µs, PostgreSQL (same machine, all its processes) $pcpu µs; rollups: $rolled; \`$f\`"
    echo "- mosquitto 2.0 (peer, forwarding the same messages to one subscriber): $mdel messages/s delivered, $mcpu µs of CPU per message; \`$m\`"
    echo "- ratios: fleetd stored / mosquitto delivered $(ratio "$fstored" "$mdel"); CPU per message fleetd / mosquitto $(ratio "$fcpu" "$mcpu" 1), fleetd + PostgreSQL / mosquitto $(ratio "$(awk -v a="$fcpu" -v b="$pcpu" 'BEGIN{print a+b}')" "$mcpu" 1)"
    echo "- target (issue #17): >= 50 000 messages/s stored"
  } | tee -a "$results"
  ;;
event-ingest)
  benchtime=3s; $smoke && benchtime=1x
  out=$(go test -run '^$' -bench 'Ingest' -benchtime "$benchtime" ./fleet/ 2>&1 | grep -E '^Benchmark|rows/s')
  { header "event-ingest: connection events into PostgreSQL (the test harness's private server: fsync off)"
    echo '```'
    echo "$out"
    echo '```'
    echo "- target: >= 50 000 rows/s through the writer, >= 0.3x the raw COPY; one INSERT per row shown for contrast"
  } | tee -a "$results"
  ;;
idle-connections|fleetsim-scale)
  # The transport may be given anywhere among the arguments: tcp (default), tls or mtls.
  transport=tcp; nums=()
  for a in "$@"; do case "$a" in tcp|tls|mtls) transport=$a ;; *) nums+=("$a") ;; esac; done
  devices=${nums[0]:-15000}
  seconds=${nums[1]:-60}
  $smoke && devices=50 && seconds=6
  TLS_PORT=$(free_port)
  fleetd_env=(); fleetd_url="tcp://127.0.0.1:$MQTT_PORT"; sim_tls=""; sim_ca=""; creds=""; mosq_tls=""
  case "$transport" in
  tcp) what="plain TCP" ;;
  tls | mtls)
    # A device CA and a server certificate for 127.0.0.1, the same files for both brokers.
    "$bin/fleetsim" certs -dir "$work/certs" >/dev/null
    chmod 644 "$work/certs/server.key" # Mosquitto reads it after dropping root for its own user
    fleetd_env=(FLEETD_MQTT_TLS_ADDR=127.0.0.1:$TLS_PORT FLEETD_TLS_CERT_FILE="$work/certs/server.crt" FLEETD_TLS_KEY_FILE="$work/certs/server.key")
    fleetd_url="tls://127.0.0.1:$TLS_PORT"
    sim_tls=", ca_file: \"$work/certs/device-ca.crt\""
    mosq_tls=$(printf 'cafile %s\ncertfile %s\nkeyfile %s\n' "$work/certs/device-ca.crt" "$work/certs/server.crt" "$work/certs/server.key")
    what="TLS (token in CONNECT)"
    if [ "$transport" = mtls ]; then
      fleetd_env+=(FLEETD_TLS_CLIENT_CA_FILE="$work/certs/device-ca.crt")
      creds=", credentials: cert"
      sim_ca="tls: {device_ca_cert: \"$work/certs/device-ca.crt\", device_ca_key: \"$work/certs/device-ca.key\"}"
      mosq_tls=$(printf '%s\nrequire_certificate true\n' "$mosq_tls")
      what="mTLS (a client certificate per device, no token)"
    fi ;;
  esac
  start_fleetd "${fleetd_env[@]}"
  if [ "$transport" = mtls ]; then
    # Certificate devices are not registered by fleetsim: fleetd admits a
    # certificate whose CN is a registered device.
    psql -qX "host=$work/data/postgres/run port=5432 user=fleetd dbname=fleetd" -c \
      "INSERT INTO devices (id, model, firmware) SELECT 'idle-' || g, 'gw-100', '1.2.0' FROM generate_series(0, $((devices - 1))) AS g ON CONFLICT (id) DO NOTHING" >/dev/null
  fi
  base_rss=$(rss_kib "$fleetd_pid")
  # go_stats: fleetd's Go stack bytes in use, heap bytes in use and goroutines.
  go_stats() {
    curl -fs http://127.0.0.1:$HTTP_PORT/metrics | awk '/^go_memstats_stack_inuse_bytes /{s=$2} /^go_memstats_heap_inuse_bytes /{h=$2} /^go_goroutines /{g=$2}
      END {printf "%.0f %.0f %.0f\n", s, h, g}'
  }
  read -r base_stack base_heap base_gr < <(go_stats)
  register=true; [ "$transport" = mtls ] && register=false
  # Two cores handshake TLS for both fleetsim and the broker: at 2 000/s devices time out.
  ramp=2000; [ "$transport" != tcp ] && ramp=500
  cat >"$work/fleet.yaml" <<YAML
server: {mqtt: "$fleetd_url", api: "http://127.0.0.1:$HTTP_PORT", admin_token_file: "$work/data/admin-token"$sim_tls}
$sim_ca
run: {duration: ${seconds}s, ramp: $ramp, register: $register, progress: 5s, source_addrs: [127.0.0.1, 127.0.0.2, 127.0.0.3, 127.0.0.4]}
cohorts:
  - {name: idle, count: $devices, model: gw-100, firmware: 1.2.0, keepalive: 300s$creds}
YAML
  "$bin/fleetsim" run -f "$work/fleet.yaml" -summary "$work/summary.json" >/dev/null 2>"$work/fleetsim.err" &
  sim_pid=$!
  # Sample both processes once the fleet should be fully connected.
  peak_f=0; peak_s=0; peak_online=0
  while kill -0 "$sim_pid" 2>/dev/null; do
    sleep 2
    f=$(rss_kib "$fleetd_pid" 2>/dev/null || echo 0); s=$(rss_kib "$sim_pid" 2>/dev/null || echo 0)
    f=${f:-0}; s=${s:-0} # a process that has just exited has no VmRSS
    [ "$f" -gt "$peak_f" ] && peak_f=$f
    [ "$s" -gt "$peak_s" ] && peak_s=$s
    online=$(curl -fs http://127.0.0.1:$HTTP_PORT/metrics | awk '/^fleetd_mqtt_sessions /{print $2}')
    online=${online:-0}
    if [ "$online" -gt 0 ] && [ "$online" -ge "$peak_online" ]; then
      read -r held_stack held_heap held_gr < <(go_stats); held_n=$online
    fi
    [ "$online" -gt "$peak_online" ] && peak_online=$online
    [ "$online" = "$devices" ] && held_f=$f && held_s=$s
  done
  wait "$sim_pid" || true
  summary=$(cat "$work/summary.json" 2>/dev/null || echo '{}')
  per_f=$(( (${held_f:-$peak_f} - base_rss) * 1024 / devices ))
  per_s=$(( ${held_s:-$peak_s} * 1024 / devices ))
  if [ -n "${held_stack:-}" ]; then
    # Per device online when sampled: all of them, unless the fleet never fully connected.
    go_per=$(awk -v d="$held_n" -v s0="$base_stack" -v s1="$held_stack" -v h0="$base_heap" -v h1="$held_heap" -v g0="$base_gr" -v g1="$held_gr" \
      'BEGIN {printf "stacks %.0f B, heap in use %.0f B, %.2f goroutines per device (stacks %.1f → %.1f MiB, heap in use %.1f → %.1f MiB, goroutines %d → %d, before the fleet → holding it)",
        (s1-s0)/d, (h1-h0)/d, (g1-g0)/d, s0/1048576, s1/1048576, h0/1048576, h1/1048576, g0, g1}')
    [ "$held_n" != "$devices" ] && go_per="$go_per, sampled with $held_n of $devices online"
  else
    go_per="not sampled: no device connected"
  fi
  stop_fleetd
  # The peer: Mosquitto holding the same fleet over the same transport (anonymous; the tokens are ignored).
  start_mosquitto "$mosq_tls"
  mbase=$(rss_kib "$mosq_pid")
  mosq_url="tcp://127.0.0.1:$MOSQ_PORT"; [ "$transport" != tcp ] && mosq_url="tls://127.0.0.1:$MOSQ_PORT"
  tokens=""
  if [ "$transport" != mtls ]; then
    echo "{" >"$work/tokens.json"
    for i in $(seq 0 $((devices - 1))); do [ "$i" -gt 0 ] && echo "," >>"$work/tokens.json"; printf '"idle-%s":"x"' "$i" >>"$work/tokens.json"; done
    echo "}" >>"$work/tokens.json"
    tokens=", tokens_file: \"$work/tokens.json\""
  fi
  cat >"$work/fleet-mosq.yaml" <<YAML
server: {mqtt: "$mosq_url"$sim_tls}
$sim_ca
run: {duration: ${seconds}s, ramp: $ramp$tokens, source_addrs: [127.0.0.1, 127.0.0.2, 127.0.0.3, 127.0.0.4]}
cohorts:
  - {name: idle, count: $devices, model: gw-100, firmware: 1.2.0, keepalive: 300s$creds}
YAML
  "$bin/fleetsim" run -f "$work/fleet-mosq.yaml" -summary "$work/summary-mosq.json" >/dev/null 2>"$work/fleetsim-mosq.err" &
  sim_pid=$!
  mpeak=0
  while kill -0 "$sim_pid" 2>/dev/null; do
    sleep 2
    m=$(rss_kib "$mosq_pid" 2>/dev/null || echo 0)
    [ "$m" -gt "$mpeak" ] && mpeak=$m
  done
  wait "$sim_pid" || true
  msummary=$(cat "$work/summary-mosq.json" 2>/dev/null || echo '{}')
  per_m=$(( (mpeak - mbase) * 1024 / devices ))
  stop_mosquitto
  {
    header "idle-connections: $devices devices over $what held for ${seconds}s"
    echo "- fleetd sessions, peak: $peak_online / $devices"
    echo "- fleetd RSS: ${base_rss} KiB idle, ${held_f:-$peak_f} KiB holding the fleet → $per_f bytes per connection"
    echo "- fleetd Go runtime, per device: $go_per"
    echo "- mosquitto 2.0 (peer, same transport) RSS: ${mbase} KiB idle, ${mpeak} KiB holding the fleet → $per_m bytes per connection"
    echo "- fleetsim RSS: ${held_s:-$peak_s} KiB → $per_s bytes per simulated device (paho clients)"
    echo "- fleetsim summary: \`$(echo "$summary" | tr -d '\n ' )\`"
    echo "- fleetsim summary against mosquitto: \`$(echo "$msummary" | tr -d '\n ' )\`"
    echo "- target: >= 200 000 connections (this machine: hard open-files limit $(ulimit -Hn) per process); issue #21: <= 16 KiB RSS per idle plain-TCP device, <= 30 KiB per TLS device, at 10 000 devices"
  } | tee -a "$results"
  ;;
replicas)
  n=${1:-5}; devices=${2:-95000}; $smoke && n=2 && devices=200
  per_sim=18000   # a fleetsim process holds at most 20 000 open files
  sims=$(( (devices + per_sim - 1) / per_sim ))
  via=${REPLICAS_VIA:-}
  # HAProxy holds two fds per proxied connection under the same 20 000 limit.
  why="REPLICAS_VIA=$via"
  [ -n "$via" ] || { [ "$devices" -le 9000 ] && via=haproxy || via=direct; why="HAProxy's 2 fds per connection would not fit $devices under the 20 000 limit"; }
  haproxy=$(command -v haproxy || { [ -x /usr/sbin/haproxy ] && echo /usr/sbin/haproxy; }) ||
    { echo "haproxy is not installed: apt-get install haproxy (.ci/run installs it)"; exit 1; }
  # One PostgreSQL for every replica: fleetd's embedded-mode code, run by replicaload.
  "$bin/replicaload" postgres -dir "$work/pg" -ready "$work/pg.dsn" 2>"$work/pg.log" &
  pg_pid=$!
  for _ in $(seq 300); do [ -s "$work/pg.dsn" ] && break; kill -0 "$pg_pid" 2>/dev/null || break; sleep 0.1; done
  [ -s "$work/pg.dsn" ] || { echo "postgres did not start"; cat "$work/pg.log"; exit 1; }
  dsn=$(cat "$work/pg.dsn")
  # The secrets every replica shares, from files as in deploy/compose.replicas.yml.
  mkdir -p "$work/secrets"
  for s in admin-token token-pepper firmware-signing-key; do od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$work/secrets/$s"; done
  proxy_mqtt=$(free_port); proxy_http=$(free_port)
  public=""; [ "$via" = haproxy ] && public="http://127.0.0.1:$proxy_http"
  apis=(); nodes=(); mqtts=(); backends=()
  for i in $(seq "$n"); do
    hp=$(free_port); mp=$(free_port)
    env FLEETD_DATA_DIR="$work/r$i" FLEETD_NODE="r$i" FLEETD_HTTP_ADDR=127.0.0.1:$hp FLEETD_MQTT_ADDR=127.0.0.1:$mp \
      FLEETD_DATABASE_URL="$dsn" FLEETD_ADMIN_TOKEN_FILE="$work/secrets/admin-token" \
      FLEETD_TOKEN_PEPPER_FILE="$work/secrets/token-pepper" FLEETD_FIRMWARE_SIGNING_KEY_FILE="$work/secrets/firmware-signing-key" \
      ${public:+FLEETD_PUBLIC_URL=$public} FLEETD_LOG_LEVEL=warn FLEETD_CAMPAIGN_INTERVAL=500ms \
      FLEETD_MQTT_CONNECT_RATE=0 FLEETD_MQTT_CLIENT_CONNECT_RATE=0 FLEETD_MQTT_MAX_PENDING_CONNECTS_PER_SOURCE=0 \
      FLEETD_OTA_MAX_DOWNLOADS_PER_SOURCE=0 FLEETD_OTA_MAX_DOWNLOADS=1000 "$bin/fleetd" 2>>"$work/r$i.log" &
    replica_pids+=($!)
    apis+=("http://127.0.0.1:$hp"); nodes+=("r$i"); mqtts+=("127.0.0.1:$mp"); backends+=("r$i|127.0.0.1:$mp|127.0.0.1:$hp")
  done
  # They started together and raced for the migrations (an advisory lock).
  for i in $(seq "$n"); do
    ok=false
    for _ in $(seq 300); do curl -fs "${apis[$((i-1))]}/readyz" >/dev/null 2>&1 && ok=true && break; sleep 0.1; done
    $ok || { echo "replica r$i did not become ready"; cat "$work/r$i.log"; exit 1; }
  done
  join() { local IFS=,; echo "$*"; }
  "$bin/replicaload" haproxy-config -replicas "$(join "${backends[@]}")" -mqtt 127.0.0.1:$proxy_mqtt -http 127.0.0.1:$proxy_http \
    -socket "$work/haproxy.sock" -maxconn 9500 >"$work/haproxy.cfg"
  "$haproxy" -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
  haproxy_pid=$!
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$proxy_http/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fs "http://127.0.0.1:$proxy_http/readyz" >/dev/null || { echo "haproxy does not answer"; cat "$work/haproxy.log"; exit 1; }
  tok=$(cat "$work/secrets/admin-token")
  key=$(curl -fs -H "Authorization: Bearer $tok" "http://127.0.0.1:$proxy_http/api/v1/firmware/signing-key" | sed -n 's/.*"public_key":"\([^"]*\)".*/\1/p')
  if [ "$via" = haproxy ]; then target=(-mqtt "tcp://127.0.0.1:$proxy_mqtt"); else target=(-direct "$(join "${mqtts[@]}")"); fi
  reg=$("$bin/replicaload" setup -apis "$(join "${apis[@]}")" -token "$tok" -devices "$devices" -sims "$sims" "${target[@]}" \
    -signing-key "$key" -dir "$work")
  started=$(date +%s.%N)
  for s in $(seq 0 $((sims - 1))); do
    "$bin/fleetsim" run -f "$work/fleet-$s.json" -summary "$work/summary-$s.json" >/dev/null 2>"$work/fleetsim-$s.err" &
    sim_pids+=($!)
  done
  online=$("$bin/replicaload" wait-online -dsn "$dsn" -devices "$devices" -timeout "$($smoke && echo 30s || echo 300s)")
  sleep 2
  # Memory while holding the fleet, before the operations.
  rss=""
  for i in $(seq "$n"); do
    sess=$(curl -fs "${apis[$((i-1))]}/metrics" | awk '/^fleetd_mqtt_sessions /{print $2}')
    r=$(rss_kib "${replica_pids[$((i-1))]}" 2>/dev/null || true)
    rss="$rss r$i $(( ${r:-0} / 1024 )) MiB (${sess:-?} sessions);"
  done
  r=$(rss_kib "$haproxy_pid" 2>/dev/null || true); hrss=$(( ${r:-0} / 1024 ))
  proxied=$("$bin/replicaload" haproxy-stat -socket "$work/haproxy.sock")
  ops=$($smoke && echo 5 || echo 100)
  kicks=$("$bin/replicaload" kicks -apis "$(join "${apis[@]}")" -nodes "$(join "${nodes[@]}")" -mqtt-addrs "$(join "${mqtts[@]}")" \
    -token "$tok" -dsn "$dsn" -dir "$work" -decommission "$ops" -rotate "$ops" -timeout 5s)
  camp=$("$bin/replicaload" campaign -apis "$(join "${apis[@]}")" -token "$tok" -dsn "$dsn" -per-minute 60000 \
    -timeout "$($smoke && echo 30s || echo 600s)")
  # Let the last jobs reach the devices before fleetsim counts them.
  sleep 2
  stop_pids "${sim_pids[@]}"; sim_pids=()
  summ=$("$bin/replicaload" summaries "$work"/summary-*.json)
  crashed=""
  for i in $(seq "$n"); do kill -0 "${replica_pids[$((i-1))]}" 2>/dev/null || crashed="$crashed r$i"; done
  stop_pids "$haproxy_pid"; haproxy_pid=
  stop_pids "${replica_pids[@]}"; replica_pids=()
  stop_pids "$pg_pid"; pg_pid=
  jobs=$(echo "$summ" | sed -n 's/.*"ota jobs":\([0-9]*\).*/\1/p'); jobs=${jobs:-0}
  dups=$(echo "$summ" | sed -n 's/.*"ota duplicate jobs":\([0-9]*\).*/\1/p'); dups=${dups:-0}
  at_start=$(field "$camp" online_at_start)
  { header "replicas: $n fleetd replicas on one PostgreSQL, $devices devices from $sims fleetsim process(es), connecting $([ "$via" = haproxy ] && echo "through HAProxy (leastconn, /readyz checks)" || echo "straight to the replicas, each fleetsim spread over all of them ($why); HAProxy in front of the API")"
    echo "- registration through random replicas: \`$reg\`"
    echo "- connects: $(field "$online" online) of $devices online $(field "$online" seconds) s after the first fleetsim started, by node (the registry's presence) \`$(echo "$online" | sed -n 's/.*"online_by_node":\({[^}]*}\).*/\1/p')\`; connect latency p99 per fleetsim: $(echo "$summ" | sed -n 's/.*"connect_p99_ms_per_sim":\[\([^]]*\)\].*/\1/p') ms"
    echo "- fleetsim: \`$summ\`"
    echo "- RSS holding the fleet:$rss HAProxy $hrss MiB; HAProxy's view (state, sessions): \`$proxied\`"
    echo "- kicks ($ops decommissions and $ops rotations through random replicas; latency from the API call to the disconnect event the holding replica recorded; old token tried on every replica 1 s after the call): \`$kicks\`"
    echo "- campaign over every device (devices_per_minute 60000; upload and start through random replicas): \`$camp\`"
    echo "- job delivery: $jobs jobs received by devices for ${at_start:-?} devices online at the start ($(awk -v j="$jobs" -v n="${at_start:-0}" 'BEGIN{if (n > 0) printf "%.1f", 100*j/n; else print "-"}') %), $dups received twice${crashed:+; replicas that died during the run:$crashed}"
    echo "- target (issue #16): >= 95 000 devices over 5 replicas; a rotation or decommission through any replica kicks the session within 1 s (p99), the old token refused everywhere; every online device gets its job, none twice"
  } | tee -a "$results"
  ;;
data-scale)
  devices=${1:-200000}; events=${2:-20000000}; tdevices=100; requests=100; analyses=5; verify=
  $smoke && devices=2000 && events=50000 && tdevices=5 && requests=5 && analyses=2 && verify=-verify
  go build -o "$bin/" ./bench/datascale
  # One PostgreSQL (fleetd's embedded-mode code, as for the replicas), loaded
  # first, then served by fleetd as a restart on an existing database would.
  "$bin/replicaload" postgres -dir "$work/pg" -ready "$work/pg.dsn" 2>"$work/pg.log" &
  pg_pid=$!
  for _ in $(seq 300); do [ -s "$work/pg.dsn" ] && break; kill -0 "$pg_pid" 2>/dev/null || break; sleep 0.1; done
  [ -s "$work/pg.dsn" ] || { echo "postgres did not start"; cat "$work/pg.log"; exit 1; }
  dsn=$(cat "$work/pg.dsn")
  l=$("$bin/datascale" load -dsn "$dsn" -devices "$devices" -events "$events" -telemetry-devices "$tdevices" $verify 2>"$work/load.err") ||
    { echo "the load failed"; cat "$work/load.err"; exit 1; }
  # fleetd's own analysis runs once at start; the measured runs are in-process.
  before=$(date +%s.%N)
  start_fleetd FLEETD_DATABASE_URL="$dsn" FLEETD_ANALYSIS_INTERVAL=1h
  ready=$(awk -v a="$(date +%s.%N)" -v b="$before" 'BEGIN{printf "%.1f", a-b}')
  m=$("$bin/datascale" measure -dsn "$dsn" -api "http://127.0.0.1:$HTTP_PORT" -token "$(token)" -telemetry-devices "$tdevices" -n "$requests" -analyses "$analyses" 2>"$work/measure.err") ||
    { echo "the measurement failed"; cat "$work/measure.err"; cat "$work/fleetd.log"; exit 1; }
  stop_fleetd
  stop_pids "$pg_pid"; pg_pid=
  { header "data-scale: $devices devices, $events connection events over 30 days with a month of rollups, a day of telemetry for $tdevices devices"
    echo "$l"
    echo "- fleetd ready ${ready} s after its start on the loaded database (FLEETD_ANALYSIS_INTERVAL=1h: its loop analyses once at start, the runs below are timed in-process)"
    echo "$m"
    echo "- target (issue #17): fleet health and fleet history p99 <= 100 ms, one analysis run <= 1 s, device telemetry for a day <= 100 ms; peer: the same disconnect counts from device_events, as fleet health read them before the rollups"
  } | tee -a "$results"
  ;;
ota-delta)
  devices=${1:-1000}
  $smoke && devices=20
  # The image pair: one program, built twice with a small change (a string and a constant).
  mkdir -p "$work/prog"
  printf 'module prog\n\ngo 1.26\n' >"$work/prog/go.mod"
  cat >"$work/prog/main.go.in" <<'GO'
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"
)

const version = "VERSION"

type reading struct {
	At      time.Time          `json:"at"`
	Metrics map[string]float64 `json:"metrics"`
}

func main() {
	r := reading{At: time.Now(), Metrics: map[string]float64{"temp": 21.5, "rssi": -70}}
	CHANGE
	b, _ := json.Marshal(r)
	fmt.Fprintln(os.Stdout, strings.ToUpper("GREETING"), version, string(b))
}
GO
  build_fw() { sed -e "s/VERSION/$1/" -e "s/GREETING/$2/" -e "s/CHANGE/$3/" "$work/prog/main.go.in" >"$work/prog/main.go" && (cd "$work/prog" && GOFLAGS= go build -trimpath -o "$work/fw-$1.bin" .); }
  build_fw 1.0.0 "sensor up" "" &&
    build_fw 1.1.0 "sensor up, calibrated" 'if len(os.Args) > 1 { r.Metrics["humidity"] = float64(len(os.Args[1])) }'
  img_size=$(stat -c %s "$work/fw-1.1.0.bin")
  start_fleetd FLEETD_OTA_MAX_DOWNLOADS_PER_SOURCE=0 FLEETD_CAMPAIGN_INTERVAL=200ms
  api="http://127.0.0.1:$HTTP_PORT/api/v1"
  auth="Authorization: Bearer $(token)"
  for v in 1.0.0 1.1.0; do
    curl -fs -H "$auth" --data-binary @"$work/fw-$v.bin" "$api/firmware?version=$v&models=gw-100,gw-200" >"$work/fw-$v.json"
  done
  target=$(jq -r .id "$work/fw-1.1.0.json")
  key=$(curl -fs -H "$auth" "$api/firmware/signing-key" | jq -r .public_key)
  cat >"$work/fleet.yaml" <<YAML
server: {mqtt: "tcp://127.0.0.1:$MQTT_PORT", api: "http://127.0.0.1:$HTTP_PORT", admin_token_file: "$work/data/admin-token"}
run: {duration: 3600s, ramp: 500, register: true}
ota: {install_time: 200ms, public_key: "$key", images: {"1.0.0": "$work/fw-1.0.0.bin"}}
cohorts:
  - {name: delta, count: $devices, model: gw-100, firmware: 1.0.0, keepalive: 60s}
  - {name: full, count: $devices, model: gw-200, firmware: 1.0.0, keepalive: 60s}
YAML
  "$bin/fleetsim" run -f "$work/fleet.yaml" >"$work/fleetsim.out" 2>"$work/fleetsim.err" &
  sim_pid=$!
  for _ in $(seq 600); do [ "$(sessions)" = "$((2 * devices))" ] && break; sleep 0.2; done
  [ "$(sessions)" = "$((2 * devices))" ] || { echo "the simulated devices did not connect"; cat "$work/fleetsim.err"; exit 1; }
  # run_campaign MODEL DELTA: one campaign to 1.1.0 over MODEL's devices; prints
  # "seconds cpu_ms" and leaves the campaign's JSON in $work/campaign-MODEL.json.
  run_campaign() {
    local id t0 c0 state
    id=$(curl -fs -H "$auth" -H 'Content-Type: application/json' -d "{\"name\":\"bench $1\",\"firmware_id\":\"$target\",\"delta\":$2,
      \"selector\":{\"models\":[\"$1\"]},\"stages\":[{\"name\":\"all\",\"percent\":100,\"max_failure_rate\":0,\"max_not_back_online\":0}],
      \"pacing\":{\"max_concurrent\":100},\"device_timeout\":\"10m\"}" "$api/campaigns" | jq -r .id)
    t0=$(date +%s.%N); c0=$(cpu_ticks "$fleetd_pid")
    curl -fs -H "$auth" -X POST "$api/campaigns/$id/start" >/dev/null
    for _ in $(seq 3000); do
      state=$(curl -fs -H "$auth" "$api/campaigns/$id" | tee "$work/campaign-$1.json" | jq -r .state)
      [ "$state" = running ] || break
      sleep 0.2
    done
    [ "$state" = completed ] || { echo "campaign $1 ended $state"; cat "$work/campaign-$1.json"; exit 1; }
    echo "$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{printf "%.1f", a-b}') $(( ($(cpu_ticks "$fleetd_pid") - c0) * 1000 / $(getconf CLK_TCK) ))"
  }
  read -r d_s d_cpu < <(run_campaign gw-100 true)
  read -r f_s f_cpu < <(run_campaign gw-200 false)
  kill "$sim_pid"; wait "$sim_pid" || true
  stop_fleetd
  d_sent=$(jq .bytes.sent "$work/campaign-gw-100.json"); d_saved=$(jq .bytes.saved "$work/campaign-gw-100.json")
  d_ok=$(jq '.stage_counts[0].by_state.succeeded' "$work/campaign-gw-100.json"); d_fb=$(jq .bytes.fell_back "$work/campaign-gw-100.json")
  f_sent=$(jq .bytes.sent "$work/campaign-gw-200.json"); f_ok=$(jq '.stage_counts[0].by_state.succeeded' "$work/campaign-gw-200.json")
  [ "$d_ok" = "$devices" ] && [ "$f_ok" = "$devices" ] || { echo "not every device upgraded: delta $d_ok, full $f_ok of $devices"; exit 1; }
  { header "ota-delta: $devices devices with a delta against $devices with the full image, two go builds of one program ($img_size-byte image)"
    echo "- fleetd, delta campaign: $d_sent bytes served for $devices devices ($(( d_sent / devices )) per device, $(awk -v a="$d_sent" -v b="$f_sent" 'BEGIN{printf "%.1f", 100*a/b}') % of the full campaign's), saved $d_saved bytes, $d_fb fell back; ${d_s} s, fleetd CPU $d_cpu ms (the delta built once, in the campaign's time)"
    echo "- peer, full-image campaign on the same fleetd: $f_sent bytes served for $devices devices ($(( f_sent / devices )) per device); ${f_s} s, fleetd CPU $f_cpu ms"
    echo "- pacing max_concurrent 100 for both; every device upgraded and verified the SHA-256 of the result"
  } | tee -a "$results"
  ;;
*)
  echo "unknown benchmark $name"; exit 2 ;;
esac
