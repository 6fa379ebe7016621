#!/usr/bin/env bash
# Stop the Prometheus and Grafana that start.sh started (by their recorded PIDs, nothing else).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
STATE="${TRAILCAM_MONITORING_DIR:-$ROOT/.data/monitoring}"

for name in grafana prometheus; do
    pidfile="$STATE/$name.pid"
    [ -f "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    # Only a live process that is still the one we started (a PID can be reused).
    if kill -0 "$pid" 2>/dev/null && grep -q "$name" "/proc/$pid/cmdline" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
done
