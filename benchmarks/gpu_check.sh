#!/usr/bin/env bash
# `make gpu-check`: the CUDA parity tests and the three benchmarks on one GPU, into one results folder
# benchmarks/results/<device>-<date>/: env.json, pytest.log, loss.csv, loss.json, loss.png, train.json,
# loader.json and gpu_check.log (every step's outcome and the rendered report). A step that fails or times
# out is logged, keeps what it wrote (the benchmarks rewrite their files after every case or row), and the
# next step still runs. When $OUT is set, those (at most 8) files are copied there after every step.
#
# Time plan: the whole run fits in TOTAL_S = 600 s (10 minutes on one H100). Each step has a hard limit
# (PYTEST_S + LOSS_S + TRAIN_S + LOADER_S = 570 s by default; each can be overridden), a step that ignores
# SIGTERM is killed KILL_S = 3 s later, and SETUP_S = 10 s covers the results folder and the report; the
# script refuses to start when these add up to more than TOTAL_S. Each benchmark stops starting new work
# MARGIN seconds before its limit (the training step 30 s earlier still: one compiling row may run past
# its budget), and runs its most important numbers first with the compiles bounded:
#   loss    every case (the targets' cases first) with reference, torch and triton, and reference+compile
#           (a fresh compile per case) only on the case of the speed-up-vs-compile target; then
#           reference+compile on the other cases while the budget lasts.
#   train   every eager row (the batch-2 ablation, then reference and the best eager configuration at the
#           larger batches), then +compile at batch 2 (the target row; a cold compile of the teacher and
#           the student), then +compile at the larger batches.
#   loader  the throughput sweep, then the data wait with train.py's CUDA step (+compile), whose compile
#           can reuse Inductor's on-disk caches filled by train_bench's batch-2 +compile row.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET   # compiled kernels, never the interpreter

TOTAL_S=${TOTAL_S:-600}
PYTEST_S=${PYTEST_S:-110}
LOSS_S=${LOSS_S:-180}
TRAIN_S=${TRAIN_S:-180}
LOADER_S=${LOADER_S:-100}
KILL_S=3
SETUP_S=10
MARGIN=45
PLAN_S=$((PYTEST_S + LOSS_S + TRAIN_S + LOADER_S + 4 * KILL_S + SETUP_S))
if [ "$PLAN_S" -gt "$TOTAL_S" ]; then
    echo "gpu-check: the limits add up to ${PLAN_S}s (with 4 x ${KILL_S}s kill grace and ${SETUP_S}s setup)," \
        "more than TOTAL_S=${TOTAL_S}s; lower PYTEST_S, LOSS_S, TRAIN_S or LOADER_S" >&2
    exit 2
fi

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
fi
# common.py checks the device (it exits with a message when no CUDA device is visible) and creates the
# results folder; without that folder there is nowhere to write, so stop here.
if ! DIR=$("$PY" benchmarks/common.py --device "$DEVICE" "${BASE_ARGS[@]}" | tail -n 1) \
        || [ -z "$DIR" ] || [ ! -d "$DIR" ]; then
    echo "gpu-check: benchmarks/common.py could not create the results folder (see its message above);" \
        "nothing was run" >&2
    exit 1
fi
LOG="$DIR/gpu_check.log"
echo "gpu-check: results in $DIR; time plan ${PLAN_S}s of ${TOTAL_S}s" | tee "$LOG"
status=0

copy_out() {  # copy the results files to $OUT (when set), so that they survive a kill of the whole run
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    for f in env.json pytest.log loss.csv loss.json loss.png train.json loader.json gpu_check.log; do
        if [ -f "$DIR/$f" ]; then cp "$DIR/$f" "$OUT/"; fi
    done
}

step() {  # step NAME SECONDS LOGFILE CMD...: run CMD bounded by SECONDS, output to LOGFILE, log the outcome
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    timeout --signal=TERM --kill-after="$KILL_S" "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 40
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "== $name: TIMED OUT (partial results kept)" | tee -a "$LOG"
    fi
    [ "$rc" -eq 0 ] || status=1
    copy_out
}

# FASTDIST_AUTOTUNE=0: every kernel config computes the same bits (tests/test_loss_determinism.py), so the
# parity tests need not benchmark 4 configs per new shape (~250 compiles); the loss benchmark autotunes.
step "CUDA parity tests" "$PYTEST_S" "$DIR/pytest.log" \
    env FASTDIST_AUTOTUNE=0 "$PY" -m pytest tests --ignore=tests/aot -m cuda -q \
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
copy_out
exit $status
