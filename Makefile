# fastdist: `make install`, `make test`, `make demo`, `make lint`, `make gpu-check`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
TRITON_PIN ?= triton==3.6.0

.PHONY: install test test-interp test-aot lint demo gpu-check kernel-report

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN) $(TRITON_PIN)
	$(PY) -m pip install --quiet -e ".[dali,dev,dashboards,export]" $(TORCH_PIN) $(TRITON_PIN)
	touch $@

install: $(VENV)/.installed

# Two pytest runs: the Triton interpreter must be switched on before triton is imported,
# and the ahead-of-time compile tests need it off.
test: install lint test-interp test-aot

test-interp: install
	TRITON_INTERPRET=1 $(PY) -m pytest tests --ignore=tests/aot

test-aot: install
	$(PY) -m pytest tests/aot

lint: install
	$(VENV)/bin/ruff check .

# The main job on built-in synthetic Cityscapes data: teacher, DIST student, baseline student.
demo: install
	bash scripts/demo.sh

# The kernel benchmark, CUDA parity tests, loss, KD-step and loader benchmarks on a GPU machine within one
# deadline, into one results folder (GPU_CHECK_ARGS=--dry-run: the same wiring on a CPU).
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

# Static roofline of the fused kernels (no GPU): SASS of every JIT'd variant for sm_90a / sm_80 and the
# predicted time on H100 SXM / H200 (static estimates), KERNEL_REPORT_ARGS e.g. --shapes recipe-b8.
kernel-report: install
	$(PY) benchmarks/kernel_report.py --json runs/kernel_report.json $(KERNEL_REPORT_ARGS)
