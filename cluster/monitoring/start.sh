#!/usr/bin/env bash
# `make monitoring`: Prometheus on 127.0.0.1 scraping the local Ray head's nodes with the trailcam
# alert rules, and Grafana with the trailcam dashboard when Grafana is installed.
# PIDs go to $STATE/*.pid so stop.sh (called by `make down`) stops exactly these processes.
#
# Environment: PROMETHEUS_PORT (9090), GRAFANA_PORT (3000), RAY_PROM_SD_FILE (Ray's service
# discovery file, default /tmp/ray/prom_metrics_service_discovery.json, written by the head's
# dashboard), TRAILCAM_MONITORING_DIR (state folder, default .data/monitoring).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STATE="${TRAILCAM_MONITORING_DIR:-$ROOT/.data/monitoring}"
PROMETHEUS_PORT="${PROMETHEUS_PORT:-9090}"
GRAFANA_PORT="${GRAFANA_PORT:-3000}"
SD_FILE="${RAY_PROM_SD_FILE:-${RAY_TMPDIR:-/tmp/ray}/prom_metrics_service_discovery.json}"
mkdir -p "$STATE"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_http() {  # url seconds
    for _ in $(seq 1 "$2"); do
        if python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null; then
            return 0
        fi
        sleep 1
    done
    return 1
}

bash "$HERE/install.sh"

if [ ! -e "$SD_FILE" ]; then
    echo "note: $SD_FILE does not exist yet (is the head running with its dashboard?);" \
         "Prometheus picks it up when it appears" >&2
fi

# The checked-in config names /tmp/ray and a relative rules file; point both at this machine's paths.
sed -e "s#/tmp/ray/prom_metrics_service_discovery.json#$SD_FILE#" \
    -e "s#^  - alerts.yml#  - $HERE/alerts.yml#" \
    "$HERE/prometheus.yml" > "$STATE/prometheus.yml"
promtool check config "$STATE/prometheus.yml" >/dev/null

if alive "$STATE/prometheus.pid"; then
    # Already running: reload the rendered config and rules.
    kill -HUP "$(cat "$STATE/prometheus.pid")"
else
    nohup prometheus \
        --config.file="$STATE/prometheus.yml" \
        --storage.tsdb.path="$STATE/prometheus-data" \
        --storage.tsdb.retention.time=15d \
        --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
        >"$STATE/prometheus.log" 2>&1 &
    echo $! >"$STATE/prometheus.pid"
fi
if ! wait_http "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" 60; then
    echo "Prometheus did not become ready; see $STATE/prometheus.log" >&2
    exit 1
fi
echo "Prometheus: http://127.0.0.1:$PROMETHEUS_PORT  (alerts: /alerts, targets: /targets)"

GRAFANA_BIN="$(command -v grafana-server || command -v grafana || true)"
if [ -z "$GRAFANA_BIN" ]; then
    echo "Grafana: not installed; import cluster/monitoring/grafana-dashboard.json into yours"
    exit 0
fi
if ! alive "$STATE/grafana.pid"; then
    PROV="$STATE/grafana/provisioning"
    mkdir -p "$PROV/datasources" "$PROV/dashboards" "$PROV/plugins" "$PROV/alerting" "$STATE/grafana/data"
    cat >"$PROV/datasources/trailcam.yaml" <<YAML
apiVersion: 1
datasources:
  - name: Prometheus (trailcam)
    uid: trailcam-prometheus
    type: prometheus
    access: proxy
    url: http://127.0.0.1:$PROMETHEUS_PORT
    isDefault: true
YAML
    cat >"$PROV/dashboards/trailcam.yaml" <<YAML
apiVersion: 1
providers:
  - name: trailcam
    type: file
    options:
      path: $HERE
YAML
    HOMEPATH="${GRAFANA_HOME:-/usr/share/grafana}"
    ARGS=(--homepath "$HOMEPATH")
    [ "$(basename "$GRAFANA_BIN")" = "grafana" ] && ARGS=(server "${ARGS[@]}")
    GF_SERVER_HTTP_ADDR=127.0.0.1 GF_SERVER_HTTP_PORT="$GRAFANA_PORT" \
    GF_PATHS_DATA="$STATE/grafana/data" GF_PATHS_LOGS="$STATE/grafana" GF_PATHS_PROVISIONING="$PROV" \
    GF_AUTH_ANONYMOUS_ENABLED=true GF_AUTH_ANONYMOUS_ORG_ROLE=Viewer \
        nohup "$GRAFANA_BIN" "${ARGS[@]}" >"$STATE/grafana.log" 2>&1 &
    echo $! >"$STATE/grafana.pid"
fi
if wait_http "http://127.0.0.1:$GRAFANA_PORT/api/health" 60; then
    echo "Grafana:    http://127.0.0.1:$GRAFANA_PORT/d/trailcam-reid"
else
    echo "Grafana did not become ready; see $STATE/grafana.log" >&2
fi
