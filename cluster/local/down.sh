#!/usr/bin/env bash
# Stop exactly what `make run` started: the Serve app, our own Ray worker nodes and head (by PID), embedded
# services.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
DATA="$ROOT/.data"
if [ -f "$DATA/ray-head.started" ] || [ -f "$DATA/ray-workers.started" ]; then
    "$ROOT/.venv/bin/serve" shutdown -y --address http://127.0.0.1:8265 >/dev/null 2>&1 || true
fi
if [ -f "$DATA/ray-workers.started" ]; then
    "$ROOT/.venv/bin/python" cluster/local/ray_workers.py stop "$DATA/ray-workers.started"
fi
if [ -f "$DATA/ray-head.started" ]; then
    "$ROOT/.venv/bin/python" cluster/local/ray_head.py stop "$(cat "$DATA/ray-head.started")" \
        "${TRAILCAM_RAY_GCS_PORT:-6380}"
    rm -f "$DATA/ray-head.started"
else
    echo "no Ray head started by make run"
fi
[ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" cluster/local/services.py stop
bash cluster/monitoring/stop.sh
exit 0
