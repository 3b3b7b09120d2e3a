#!/usr/bin/env bash
# `make gpu-check`: the CUDA parity tests and the three benchmarks on one GPU, into one results folder
# benchmarks/results/<device>-<date>/: env.json, pytest.log, loss.csv, loss.json, loss.png, train.json,
# loader.json and gpu_check.log (every step's outcome and the rendered report). Each step is bounded in
# time (the benchmarks also stop starting new cases before their limit) so that the whole run fits in
# 10 minutes on one H100; a step that fails or times out is logged, keeps what it wrote, and the next step
# still runs. When $OUT is set, those (at most 8) files are also copied there.
# Limits in seconds can be overridden: PYTEST_S, LOSS_S, TRAIN_S, LOADER_S.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET   # compiled kernels, never the interpreter

PYTEST_S=${PYTEST_S:-110}
LOSS_S=${LOSS_S:-180}
TRAIN_S=${TRAIN_S:-180}
LOADER_S=${LOADER_S:-100}
MARGIN=45   # each benchmark's own budget stops starting new cases this many seconds before its hard limit

# GPU_CHECK_DRY_RUN=1: exercise this script on a CPU with the benchmarks' --quick settings (no results, just
# the wiring), writing under $RESULTS_BASE (default: a temporary folder, never benchmarks/results/).
DEVICE=cuda
QUICK=()
BASE_ARGS=()
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
    DEVICE=cpu
    QUICK=(--quick)
    BASE_ARGS=(--base "${RESULTS_BASE:-$(mktemp -d)}")
    echo "gpu-check: DRY RUN on the CPU (quick settings; not results)"
elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: no CUDA device visible to torch; nothing to do" >&2
    exit 1
fi
DIR=$("$PY" benchmarks/common.py --device "$DEVICE" "${BASE_ARGS[@]}" | tail -n 1)
LOG="$DIR/gpu_check.log"
echo "gpu-check: results in $DIR" | tee "$LOG"
status=0

step() {  # step NAME SECONDS LOGFILE CMD...: run CMD bounded by SECONDS, output to LOGFILE, log the outcome
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 40
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "== $name: TIMED OUT (partial results kept)" | tee -a "$LOG"
    fi
    [ "$rc" -eq 0 ] || status=1
}

step "CUDA parity tests" "$PYTEST_S" "$DIR/pytest.log" \
    "$PY" -m pytest tests --ignore=tests/aot -m cuda -q \
    -p no:cacheprovider --tb=short --continue-on-collection-errors
step "loss benchmark" "$LOSS_S" "$LOG" \
    "$PY" benchmarks/loss_bench.py --device "$DEVICE" "${QUICK[@]}" --out "$DIR" --warmup-ms 10 --rep-ms 50 \
    --time-budget $((LOSS_S - MARGIN))
step "training-step benchmark" "$TRAIN_S" "$LOG" \
    "$PY" benchmarks/train_bench.py --device "$DEVICE" "${QUICK[@]}" --out "$DIR" \
    --time-budget $((TRAIN_S - MARGIN - 30))
step "loader benchmark" "$LOADER_S" "$LOG" \
    "$PY" benchmarks/loader_bench.py --device "$DEVICE" "${QUICK[@]}" --out "$DIR" --with-step \
    --num-images 24 --time-budget $((LOADER_S - MARGIN))

echo "== report (python benchmarks/report.py --results $DIR --stdout)" >>"$LOG"
"$PY" benchmarks/report.py --results "$DIR" --stdout >>"$LOG" 2>&1 || status=1
echo "gpu-check: done in ${SECONDS}s, exit $status; README section: python benchmarks/report.py" | tee -a "$LOG"

if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    for f in env.json pytest.log loss.csv loss.json loss.png train.json loader.json gpu_check.log; do
        [ -f "$DIR/$f" ] && cp "$DIR/$f" "$OUT/"
    done
fi
exit $status
