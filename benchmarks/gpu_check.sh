#!/usr/bin/env bash
# The GPU check: on one CUDA machine (sized for one H200), offline, from this checkout with the .venv that
# `make install` builds. Prints nvidia-smi's summary, runs the gpu-marked tests, then measures and prints one
# table: backfill detections/s (resnet50 at 224 px, end to end, images decoded on the GPU; target >= 2,000/s),
# Serve identifications/s at 64 clients (serve_config.gpu.yaml's deployments) and training samples/s
# (python -m batch.train --gpu's loop), and last, for comparison, the same backfill decoding on the CPUs.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine; under 8 minutes
#   bash benchmarks/gpu_check.sh --smoke         # every step tiny, on the CPU: proves the wiring, no figures
#   bash benchmarks/gpu_check.sh --out DIR       # also copy the logs, results and table to DIR
#   bash benchmarks/gpu_check.sh --budget-s 600  # the whole run's time limit (default 440 s; smoke 1500 s)
#
# Postgres and Redis: cluster/local/services.py ensure (embedded ones under .data/ when none answers; they
# are left running: `.venv/bin/python cluster/local/services.py stop`). Each step has its own time limit
# inside the budget; a step that fails or runs out of time is marked in the table and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
OUT_DIR=""
BUDGET_S=""
while (($#)); do
    case $1 in
        --smoke) MODE=smoke ;;
        --out) OUT_DIR=$2; shift ;;
        --budget-s) BUDGET_S=$2; shift ;;
        *) echo "usage: bash benchmarks/gpu_check.sh [--smoke] [--out DIR] [--budget-s S]" >&2; exit 2 ;;
    esac
    shift
done

PY=.venv/bin/python
if [[ ! -x $PY ]]; then
    echo "no .venv here: build it with make install first" >&2
    exit 2
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS  # every step starts its own local Ray; none may join a cluster named here

LOGS=.data/gpu-check/$(date -u +%Y%m%dT%H%M%SZ)-$MODE
mkdir -p "$LOGS"
START=$(date +%s)
STEPS=()  # "name|results name|status" per step, in order

if [[ $MODE == gpu ]]; then
    BUDGET_S=${BUDGET_S:-440}
    CAPS=(60 170 120 110 90 90)  # services, tests, backfill, serve, train, backfill with CPU decoding
    BACKFILL=(--model resnet50:random --input-size-px 224 --batch-size 256 --images 2500 --copies 12)
    TARGET=(--target-det-s 2000)
    DECODE=gpu
    CPU_DECODE=exact
    REID=(--config serve_config.gpu.yaml --clients 64 --warmup-s 10 --duration-s 10 --rounds 2 --raw-iterations 20)
    TRAIN=(--gpu --epochs 3 --individuals 64 --per-individual 16)
else
    # The same steps and flags, tiny and on the CPU: decode gpu is refused there (exact and draft stand in),
    # and serve_config.gpu.yaml's replica would wait for a GPU forever (serve_config.yaml stands in).
    BUDGET_S=${BUDGET_S:-1500}
    CAPS=(60 240 420 360 300 300)
    BACKFILL=(--model resnet18:random --input-size-px 64 --batch-size 16 --images 48 --copies 2)
    TARGET=()
    DECODE=exact
    CPU_DECODE=draft
    REID=(--config serve_config.yaml --clients 4 --warmup-s 3 --duration-s 3 --rounds 1 --raw-iterations 1)
    TRAIN=(--fit --quick --epochs 1 --individuals 8 --per-individual 6 --batch-size 8)
fi

step() {  # step NAME RESULTS_NAME CAP_S COMMAND...: run it within min(CAP_S, what is left of the budget)
    local name=$1 result=$2 cap=$3
    shift 3
    local left=$((BUDGET_S - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "== $name: skipped, the ${BUDGET_S} s budget is spent"
        STEPS+=("$name|$result|skipped: budget spent")
        return
    fi
    local log=$LOGS/${name//[^a-z0-9]/-}.log began=$(date +%s)
    echo "== $name (at most $limit s): $*"
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]} took=$(($(date +%s) - began)) status
    case $rc in
        0) status="ok" ;;
        124 | 137) status="timed out at $limit s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    if [[ $name == tests ]]; then  # pytest's summary line, e.g. "7 passed in 61.2s"
        status="$status: $(grep -E '(passed|failed|skipped|error)' "$log" | tail -1 | tr -d '=' | xargs)"
    fi
    STEPS+=("$name|$result|$status, $took s")
}

echo "== GPU check ($MODE), budget $BUDGET_S s, logs in $LOGS"
if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi 2>&1 | tee "$LOGS/nvidia-smi.log"
    timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOGS/nvidia-smi.log"
else
    echo "nvidia-smi: not found on this machine"
fi
"$PY" - <<'EOF' 2>&1 | tee "$LOGS/torch.log"
import torch, torchvision

cuda = torch.cuda.is_available()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), torchvision {torchvision.__version__}, cuda available: {cuda}")
if cuda:
    print(f"device 0: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}")
EOF
if [[ $MODE == gpu ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device for torch here: nothing to measure (bash benchmarks/gpu_check.sh --smoke checks the wiring)" >&2
    exit 2
fi

step services "" "${CAPS[0]}" "$PY" cluster/local/services.py ensure
step tests "" "${CAPS[1]}" .venv/bin/pytest -m gpu tests/gpu -q -p no:cacheprovider --timeout 120
step backfill "${MODE}_backfill" "${CAPS[2]}" "$PY" -m benchmarks.bench_backfill "${BACKFILL[@]}" \
    --decode "$DECODE" --long-run --no-sequential "${TARGET[@]}" --results-name "${MODE}_backfill"
step serve "${MODE}_reid" "${CAPS[3]}" "$PY" -m benchmarks.bench_reid "${REID[@]}" --no-score-log \
    --results-name "${MODE}_reid"
step train "${MODE}_train" "${CAPS[4]}" "$PY" -m benchmarks.bench_train "${TRAIN[@]}" --results-name "${MODE}_train"
step "backfill-cpu-decode" "${MODE}_backfill_cpu_decode" "${CAPS[5]}" "$PY" -m benchmarks.bench_backfill \
    "${BACKFILL[@]}" --decode "$CPU_DECODE" --long-run --no-sequential --results-name "${MODE}_backfill_cpu_decode"

echo
echo "== GPU check ($MODE) in $(($(date +%s) - START)) s"
"$PY" - "$START" "${STEPS[@]}" <<'EOF' | tee "$LOGS/table.md"
import json
import sys
from pathlib import Path

started = int(sys.argv[1])
print("| step | case | value | unit | target | step status |")
print("|---|---|---:|---|---|---|")
for entry in sys.argv[2:]:
    name, result, status = entry.split("|", 2)
    path = Path("benchmarks/results") / f"{result}.json"
    if result and path.is_file() and path.stat().st_mtime >= started:
        for row in json.loads(path.read_text())["rows"]:
            value = f"{row['value']:,.3f}" if abs(row["value"]) < 10 else f"{row['value']:,.0f}"
            print(f"| {name} | {row['case']} | {value} | {row['unit']} | {row.get('target') or ''} | {status} |")
    elif result:
        print(f"| {name} | not measured | | | | {status} |")
    else:
        print(f"| {name} | | | | | {status} |")
EOF
for entry in "${STEPS[@]}"; do
    result=$(cut -d'|' -f2 <<<"$entry")
    if [[ -n $result && benchmarks/results/$result.json -nt $LOGS/torch.log ]]; then
        cp "benchmarks/results/$result.json" "$LOGS/"
    fi
done
if [[ -n $OUT_DIR ]]; then
    mkdir -p "$OUT_DIR" && cp -r "$LOGS"/. "$OUT_DIR"/
fi
echo "logs, results and the table: $LOGS${OUT_DIR:+ (copied to $OUT_DIR)}"
for entry in "${STEPS[@]}"; do
    [[ $(cut -d'|' -f3 <<<"$entry") == ok* ]] || exit 1
done
exit 0
