#!/usr/bin/env bash
# Bring the whole system up on this machine; safe to run twice. Called by `make run`.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
PY="$ROOT/.venv/bin/python"
RAY="$ROOT/.venv/bin/ray"
SERVE="$ROOT/.venv/bin/serve"
DATA="$ROOT/.data"
RAY_TMP="$DATA/ray"
GCS_PORT="${TRAILCAM_RAY_GCS_PORT:-6380}"   # Redis owns 6379, Ray's default GCS port
DASHBOARD="127.0.0.1:8265"
API="http://127.0.0.1:8000"
mkdir -p "$DATA"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Absolute paths: replicas and `ray job submit` jobs run in other working directories.
export TRAILCAM_IMAGE_ROOT="${TRAILCAM_IMAGE_ROOT:-$DATA/images}"
export TRAILCAM_EXPORT_DIR="${TRAILCAM_EXPORT_DIR:-$DATA/exports}"
# The head's processes inherit this PATH: `python` in `ray job submit -- python -m ...` is the venv's.
export PATH="$ROOT/.venv/bin:$PATH"

echo "== services"
"$PY" cluster/local/services.py ensure

echo "== schema"
"$PY" -m serve_app.store.migrate

echo "== demo data"
"$PY" -m batch.demo_data --sites 2 --cameras 6 --deer 40 --images "${TRAILCAM_DEMO_IMAGES:-3000}" --seed 7

# Planner statistics for the freshly loaded rows: where autovacuum is off or has not run yet, the review
# queue's query plans without them and takes tens of milliseconds instead of a few.
"$PY" -c 'import psycopg; from serve_app.config import get_settings; psycopg.connect(get_settings().database_dsn, autocommit=True).execute("ANALYZE")'

echo "== re-ID training set"
# The demo generator's own training set: its own seed (1001) and deer, none of them in the demo data set,
# so the model deployed below is measured on individuals it never saw. Rendered once, then reused.
TRAIN_SET="$DATA/train/demo-seed1001"
"$PY" -m batch.train_data --demo "$TRAIN_SET" --seed 1001 --individuals 100 --per-individual 24

echo "== development API key"
"$PY" cluster/local/dev_key.py "$DATA/dev-api-key"

echo "== ray head"
# Serve and Ray tuning for this head (reasons in the file); a variable already set wins.
while IFS='=' read -r name value; do
    if [[ -n "$name" && "$name" != \#* && -z "${!name:-}" ]]; then
        export "$name=$value"
    fi
done < cluster/local/ray.env
# The local head listens on loopback only, so plain `ray status`, `ray job submit` and the dashboard
# work as documented without a token. Set RAY_AUTH_MODE=token to require Ray's token (then export
# the same variable wherever you run ray/serve commands). Clusters on Kubernetes use token auth.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
if "$RAY" status --address "127.0.0.1:$GCS_PORT" >/dev/null 2>&1; then
    echo "a Ray head already answers on 127.0.0.1:$GCS_PORT; reusing it"
else
    mkdir -p "$RAY_TMP"
    # Logical CPUs above the core count: the ingress, one ReID replica, export tasks and a backfill
    # must all be schedulable at once; most of them wait on I/O.
    "$RAY" start --head --port "$GCS_PORT" --node-ip-address 127.0.0.1 --num-cpus "${TRAILCAM_RAY_NUM_CPUS:-6}" \
        --dashboard-host 127.0.0.1 --dashboard-port 8265 --temp-dir "$RAY_TMP" --disable-usage-stats >/dev/null
    echo "$RAY_TMP" > "$DATA/ray-head.started"
    echo "started a Ray head (GCS 127.0.0.1:$GCS_PORT, temp dir $RAY_TMP)"
fi
# TRAILCAM_RAY_WORKER_NODES=N: N worker nodes beside the head, each a Ray node of its own with
# TRAILCAM_RAY_WORKER_CPUS logical CPUs, the resource worker_node and the label trailcam/group=cpu
# (docs/operations.md, "More than one Ray node"). Already running ones are kept; `make down` stops them.
if [ "${TRAILCAM_RAY_WORKER_NODES:-0}" -gt 0 ]; then
    echo "== ray worker nodes"
    "$PY" cluster/local/ray_workers.py start --address "127.0.0.1:$GCS_PORT" --count "$TRAILCAM_RAY_WORKER_NODES" \
        --num-cpus "${TRAILCAM_RAY_WORKER_CPUS:-2}" --temp-root "$DATA/ray-workers" --record "$DATA/ray-workers.started"
fi

echo "== re-ID model"
# MobileNetV2 from ImageNet weights, fine-tuned on Ray Train (batch.train) on the training set above. The
# first run trains it (progress lines below, a few minutes on two cores) and caches it under .data/models;
# later runs find the same run's model there and reuse it.
"$PY" -m batch.train --data "$TRAIN_SET" --out "$DATA/models" --storage "$DATA/train-runs" \
    --address "127.0.0.1:$GCS_PORT" --reuse | tee "$DATA/model.txt"
CARD="$(sed -n 's/^model file: \(.*\)\.safetensors.*/\1.card.json/p' "$DATA/model.txt")"
"$PY" cluster/local/serve_config.py --card "$CARD" --out "$DATA/serve_config.yaml"

echo "== deploy serve_config.yaml with that model (.data/serve_config.yaml)"
for _ in $(seq 1 60); do
    curl -fsS "http://$DASHBOARD/api/version" >/dev/null 2>&1 && break
    sleep 1
done
"$SERVE" deploy "$DATA/serve_config.yaml" --address "http://$DASHBOARD"
# The registry records that this model runs now (GET /api/models; promote and rollback: docs/models.md).
"$PY" -m batch.models register "$CARD" --status active

echo "== waiting for $API/readyz"
for i in $(seq 1 300); do
    if curl -fsS "$API/readyz" >/dev/null 2>&1; then
        echo
        echo "trailcam-reid is up:"
        echo "  API        $API   (key in .data/dev-api-key: Authorization: Bearer \$(cat .data/dev-api-key))"
        echo "  docs       $API/docs"
        echo "  web UI     $API/ui  (sign in with the key below)"
        echo "  dashboard  http://$DASHBOARD"
        echo "  stop with  make down"
        echo "  model      $(sed -n 's/^# Model card: //p' "$DATA/model.txt") (card: $CARD)"
        grep -E "^- (top-1|recommended|at it)" "$DATA/model.txt" | sed 's/^/             /'

        exit 0
    fi
    sleep 1
done
echo "the app did not become ready; last answer:" >&2
curl -sS "$API/readyz" >&2 || true
"$SERVE" status --address "http://$DASHBOARD" >&2 || true
exit 1
