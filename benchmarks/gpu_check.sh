#!/usr/bin/env bash
# `make gpu-check`: see benchmarks/gpu_check.py (the deadline, the parts in order, the copies to $OUT).
# GPU_CHECK_DRY_RUN=1 runs the same wiring on a CPU; GPU_CHECK_DEADLINE_S overrides the 540 s deadline.
set -uo pipefail
cd "$(dirname "$0")/.."
# $PYTHON overrides the interpreter (default: the checkout's .venv, else python3).
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET   # compiled kernels, never the interpreter
exec "$PY" benchmarks/gpu_check.py "$@"
