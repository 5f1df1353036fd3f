#!/usr/bin/env bash
# Benchmarks, one command each: bench/run.sh NAME [ARGS]. Results are appended
# to bench/RESULTS.md with the machine, the date and the command.
#
#   bench/run.sh fleetsim-scale [DEVICES] [SECONDS]
#       fleetd (embedded PostgreSQL) and one fleetsim holding DEVICES idle devices
#       (keepalive 300 s) for SECONDS; reports connect latency, RSS per connection of
#       both processes, and the open-file limit that caps a process here.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-}
[ -n "$name" ] || { sed -n '2,9p' "$0"; exit 2; }
shift

bin=$(mktemp -d)
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
  [ -n "${fleetd_pid:-}" ] && kill -TERM "$fleetd_pid" 2>/dev/null && wait "$fleetd_pid" 2>/dev/null || true
  rm -rf "$bin" "$work"
}
trap cleanup EXIT
go build -o "$bin/" ./cmd/fleetd ./cmd/fleetsim

machine() {
  echo "- machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(go version | cut -d' ' -f3), open files: soft $(ulimit -Sn) / hard $(ulimit -Hn)"
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo none)"
}

rss_kib() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }

start_fleetd() {
  FLEETD_DATA_DIR="$work/data" FLEETD_HTTP_ADDR=127.0.0.1:18080 FLEETD_MQTT_ADDR=127.0.0.1:11883 \
  FLEETD_LOG_LEVEL=warn FLEETD_MQTT_CONNECT_RATE=0 "$bin/fleetd" 2>"$work/fleetd.log" &
  fleetd_pid=$!
  for _ in $(seq 150); do
    curl -fs http://127.0.0.1:18080/readyz >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "fleetd did not become ready"; cat "$work/fleetd.log"; exit 1
}

case "$name" in
fleetsim-scale)
  devices=${1:-15000}
  seconds=${2:-60}
  start_fleetd
  base_rss=$(rss_kib "$fleetd_pid")
  cat >"$work/fleet.yaml" <<YAML
server: {mqtt: "tcp://127.0.0.1:11883", api: "http://127.0.0.1:18080", admin_token_file: "$work/data/admin-token"}
run: {duration: ${seconds}s, ramp: 2000, register: true, progress: 5s, source_addrs: [127.0.0.1, 127.0.0.2, 127.0.0.3, 127.0.0.4]}
cohorts:
  - {name: idle, count: $devices, model: gw-100, firmware: 1.2.0, keepalive: 300s}
YAML
  "$bin/fleetsim" run -f "$work/fleet.yaml" -summary "$work/summary.json" >/dev/null 2>"$work/fleetsim.err" &
  sim_pid=$!
  # Sample both processes once the fleet should be fully connected.
  peak_f=0; peak_s=0; peak_online=0
  while kill -0 "$sim_pid" 2>/dev/null; do
    sleep 2
    f=$(rss_kib "$fleetd_pid" 2>/dev/null || echo 0); s=$(rss_kib "$sim_pid" 2>/dev/null || echo 0)
    [ "$f" -gt "$peak_f" ] && peak_f=$f
    [ "$s" -gt "$peak_s" ] && peak_s=$s
    online=$(curl -fs http://127.0.0.1:18080/metrics | awk '/^fleetd_mqtt_sessions /{print $2}')
    online=${online:-0}
    [ "$online" -gt "$peak_online" ] && peak_online=$online
    [ "$online" = "$devices" ] && held_f=$f && held_s=$s
  done
  wait "$sim_pid" || true
  summary=$(cat "$work/summary.json" 2>/dev/null || echo '{}')
  per_f=$(( (${held_f:-$peak_f} - base_rss) * 1024 / devices ))
  per_s=$(( ${held_s:-$peak_s} * 1024 / devices ))
  {
    echo
    echo "## fleetsim-scale: $devices devices for ${seconds}s"
    machine
    echo "- command: \`bench/run.sh fleetsim-scale $devices $seconds\`"
    echo "- fleetd sessions, peak: $peak_online / $devices"
    echo "- fleetd RSS: ${base_rss} KiB idle, ${held_f:-$peak_f} KiB holding the fleet → $per_f bytes per connection"
    echo "- fleetsim RSS: ${held_s:-$peak_s} KiB → $per_s bytes per simulated device (paho clients)"
    echo "- fleetsim summary: \`$(echo "$summary" | tr -d '\n ' )\`"
  } | tee -a bench/RESULTS.md
  ;;
*)
  echo "unknown benchmark $name"; exit 2 ;;
esac
