"""Shared helpers for the fastdist benchmarks: environment capture, device peaks, timing, memory, output.

Every benchmark script imports this module first; it puts the repository root on ``sys.path`` so that
``python benchmarks/<script>.py`` works from a checkout without an install (``PYTHONPATH=.`` also works).

Timing methodology
------------------
* CUDA: CUDA events around each call, after a warm-up, with the L2 cache flushed (a 256 MiB buffer is
  zeroed) before every timed call, in the manner of ``triton.testing.do_bench``; the number of timed
  calls is bounded so a case never takes more than ``rep_ms`` (plus one call) of GPU time.
* CPU: ``time.perf_counter`` wall clock around each call, after a warm-up.
Each case reports the median and the 20th/80th percentiles of the per-call times.
"""

from __future__ import annotations

import csv
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS_DIR = ROOT / "benchmarks" / "results"
NOT_MEASURED = "not measured"


# --------------------------------------------------------------------------------------------------
# Device peaks
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DevicePeak:
    """Vendor peak figures of one GPU model (dense, i.e. without structured sparsity)."""

    label: str
    mem_bw_bytes_s: float  # peak DRAM bandwidth, bytes/s
    bf16_flops: float  # dense BF16 tensor-core peak, FLOP/s
    source: str


_NV_H100 = "NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100); sparse figures halved"
_NV_H200 = "NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200); sparse figures halved"
_NV_A100 = "NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100); sparse figures halved"

# (regex on torch.cuda.get_device_name(), peak). First match wins, so specific names come first. Dense
# figures are the datasheets' "with sparsity" tensor-core figures halved. Anything else (GH200 included,
# whose HBM differs by variant) is "unknown" and no fraction of peak is reported.
DEVICE_PEAKS: list[tuple[str, DevicePeak]] = [
    (r"H100.*PCIe", DevicePeak("H100 PCIe", 2.0e12, 756.5e12, _NV_H100)),
    (r"H100.*NVL", DevicePeak("H100 NVL", 3.9e12, 835.5e12, _NV_H100)),
    (r"H100", DevicePeak("H100 SXM5 (HBM3)", 3.35e12, 989.5e12, _NV_H100)),
    (r"(?<!G)H200.*NVL", DevicePeak("H200 NVL", 4.8e12, 835.5e12, _NV_H200)),
    (r"(?<!G)H200", DevicePeak("H200 SXM", 4.8e12, 989.5e12, _NV_H200)),
    (r"A100.*80GB.*PCIe", DevicePeak("A100 80GB PCIe", 1.935e12, 312e12, _NV_A100)),
    (r"A100.*80GB", DevicePeak("A100 80GB SXM4", 2.039e12, 312e12, _NV_A100)),
    (r"A100", DevicePeak("A100 40GB", 1.555e12, 312e12, _NV_A100)),
]


def lookup_peak(device_name: str) -> DevicePeak | None:
    """Return the vendor peaks of a device by its name, or None when the device is not in the table."""
    for pattern, peak in DEVICE_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak
    return None


# --------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------
def slugify(text: str) -> str:
    """Lower-case ``text`` and replace every run of non-alphanumerics by one dash."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def resolve_device(device: str) -> str:
    """Map ``auto`` to ``cuda`` when a GPU is visible, else ``cpu``; pass other values through.

    A CUDA device with an index (``cuda:N``) is made the current device (``torch.cuda.set_device``):
    CUDA events, the default stream and Triton launches follow the current device, not the tensors' one.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        return device
    if not torch.cuda.is_available():
        raise SystemExit(f"--device {device} requested but torch.cuda.is_available() is False")
    index = torch.device(device).index
    if index is not None:
        if index >= torch.cuda.device_count():
            raise SystemExit(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(index)
    return device


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def device_name(device: str) -> str:
    """Human-readable device name: the CUDA device name, or ``CPU (<model>)``."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({cpu_model()})"


def device_slug(device: str) -> str:
    """Folder-name slug of a device, e.g. ``nvidia-h100-80gb-hbm3``; CPUs are ``cpu``."""
    return slugify(device_name(device)) if device.startswith("cuda") else "cpu"


def _run(cmd: Sequence[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=ROOT, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_commit() -> str | None:
    """Commit of the checkout, with ``-dirty`` when tracked files differ from it (None outside git)."""
    sha = _run(["git", "rev-parse", "HEAD"])
    if sha is None:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return f"{sha}-dirty" if dirty else sha


def driver_version() -> str | None:
    """NVIDIA driver version from nvidia-smi, or None."""
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _module_version(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return getattr(module, "__version__", "unknown")


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def capture_env(device: str) -> dict[str, Any]:
    """Describe the machine and software a result was measured with."""
    import torch

    peak = lookup_peak(device_name(device)) if device.startswith("cuda") else None
    now = utc_now()
    return {
        "device": device,
        "device_name": device_name(device),
        "device_slug": device_slug(device),
        "is_cuda": device.startswith("cuda"),
        "peak": asdict(peak) if peak else "unknown",
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "dali": _module_version("nvidia.dali"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "driver": driver_version() if device.startswith("cuda") else None,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
        "git_commit": git_commit(),
        "date": now.strftime("%Y-%m-%d"),
        "datetime_utc": now.isoformat(timespec="seconds"),
    }


def results_folder(env: dict[str, Any], base: Path | None = None) -> Path:
    """``<base>/<device-slug>-<YYYY-MM-DD>``, created if needed."""
    folder = (base or RESULTS_DIR) / f"{env['device_slug']}-{env['date']}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Per-call time statistics in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def summarize(times_ms: Sequence[float]) -> Timing:
    """Median and 20th/80th percentiles (linear interpolation) of per-call times."""
    data = sorted(times_ms)
    if len(data) == 1:
        return Timing(data[0], data[0], data[0], 1)

    def quantile(q: float) -> float:
        pos = q * (len(data) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(data) - 1)
        return data[lo] + (data[hi] - data[lo]) * (pos - lo)

    return Timing(statistics.median(data), quantile(0.2), quantile(0.8), len(data))


_L2_FLUSH: dict[str, Any] = {}


def _l2_flush_buffer(device: str) -> Any:
    """A 256 MiB buffer per device; zeroing it evicts the L2 cache (50 MiB on an H100)."""
    import torch

    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    return _L2_FLUSH[device]


def _call(fn: Callable[..., Any], setup: Callable[[], Any] | None) -> Any:
    return fn(setup()) if setup is not None else fn()


def time_cuda(fn: Callable[..., Any], device: str, warmup_ms: float, rep_ms: float, max_reps: int = 1000,
              flush_l2: bool = True, setup: Callable[[], Any] | None = None) -> Timing:
    """Time ``fn`` on a CUDA device with CUDA events (L2 flushed before each timed call).

    With ``setup``, each call is ``fn(setup())`` and only ``fn`` is timed (e.g. setup = forward,
    fn = backward).
    """
    import torch

    flush = _l2_flush_buffer(device) if flush_l2 else None
    _call(fn, setup)
    torch.cuda.synchronize(device)
    times: list[float] = []
    budget_ms = warmup_ms
    n = 0
    while True:  # warm-up, which also estimates the time of one call
        arg = setup() if setup is not None else None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(arg) if setup is not None else fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
        n += 1
        if n >= max_reps or (n >= 3 and sum(times) >= budget_ms):
            break
    estimate = max(statistics.median(times), 1e-3)
    n_rep = max(5, min(max_reps, int(rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        arg = setup() if setup is not None else None
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn(arg) if setup is not None else fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])


def time_cpu(fn: Callable[..., Any], warmup_ms: float, rep_ms: float, min_reps: int = 3,
             max_reps: int = 1000, setup: Callable[[], Any] | None = None) -> Timing:
    """Wall-clock time of ``fn`` on the CPU: warm-up for ``warmup_ms``, then time calls for ``rep_ms``."""
    t_end = time.perf_counter() + warmup_ms / 1e3
    _call(fn, setup)
    while time.perf_counter() < t_end:
        _call(fn, setup)
    times: list[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() < t_end):
        arg = setup() if setup is not None else None
        t0 = time.perf_counter()
        fn(arg) if setup is not None else fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return summarize(times)


def time_fn(fn: Callable[..., Any], device: str, warmup_ms: float = 25, rep_ms: float = 100,
            max_reps: int = 1000, setup: Callable[[], Any] | None = None) -> Timing:
    """Time ``fn`` on ``device`` (CUDA events on GPU, wall clock on CPU); see :func:`time_cuda`."""
    if device.startswith("cuda"):
        return time_cuda(fn, device, warmup_ms, rep_ms, max_reps=max_reps, setup=setup)
    return time_cpu(fn, warmup_ms, rep_ms, max_reps=max_reps, setup=setup)


def synchronize(device: str) -> None:
    """Wait for the device (no-op on CPU)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------
def peak_extra_memory(fn: Callable[..., Any], device: str,
                      setup: Callable[[], Any] | None = None) -> int | None:
    """Peak CUDA memory allocated while ``fn`` runs, over what was allocated before it (bytes).

    Whatever ``fn`` returns counts (e.g. the gradient it produces); what ``setup`` returns (passed to
    ``fn``) is allocated before the baseline. None on CPU: not measured.
    """
    import torch

    if not device.startswith("cuda"):
        return None
    arg = setup() if setup is not None else None
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn(arg) if setup is not None else fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, arg
    return int(peak)


# --------------------------------------------------------------------------------------------------
# Time budget
# --------------------------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget for a whole script; ``None`` seconds means unlimited."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def exhausted(self) -> bool:
        return self.left() <= 0

    def skip_reason(self) -> str | None:
        """The status of a row not started because the budget is spent, or None while time is left."""
        return "skipped: time budget" if self.exhausted() else None


def error_status(exc: BaseException) -> str:
    """The status of a row whose measurement raised: ``oom``, or ``error: <type>: <first line>``."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"error: {type(exc).__name__}: {first}"


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def clean(value: Any) -> Any:
    """Make ``value`` JSON-safe: non-finite floats become None, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(obj), indent=2, sort_keys=False) + "\n")
    return path


def write_csv(path: Path, rows: Iterable[dict[str, Any]], fields: Sequence[str]) -> Path:
    """Write ``rows`` with the columns ``fields``; None is written as an empty cell."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    return path


def default_out_dir(env: dict[str, Any], out: str | None) -> Path:
    """``--out`` when given (created), else ``benchmarks/results/<device>-<date>/``."""
    if out:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return results_folder(env)


class RunContext(NamedTuple):
    """What every benchmark resolves before measuring: device, environment, peaks, output, time budget."""

    device: str
    env: dict[str, Any]
    peak: DevicePeak | None  # None on CPU and on GPUs missing from the peak table
    out_dir: Path
    budget: Budget


def add_run_args(parser: Any, quick_help: str) -> None:
    """The options :func:`run_context` reads: ``--device``, ``--out``, ``--quick``, ``--time-budget``."""
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--out", default=None,
                        help="output folder (default benchmarks/results/<device>-<date>/)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; rows left when it runs out are written as 'skipped: time budget'")


def run_context(args: Any) -> RunContext:
    """The :class:`RunContext` of a benchmark's parsed ``--device``, ``--out`` and ``--time-budget``."""
    device = resolve_device(args.device)
    env = capture_env(device)
    peak = lookup_peak(env["device_name"]) if env["is_cuda"] else None
    return RunContext(device, env, peak, default_out_dir(env, args.out), Budget(args.time_budget))


def matplotlib_pyplot() -> Any | None:
    """``matplotlib.pyplot`` with the Agg backend, or None (with a printed note) when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; skipping the PNG plot (CSV/JSON are written)")
        return None
    return plt


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return NOT_MEASURED
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def main(argv: Sequence[str] | None = None) -> None:
    """Create the results folder of this device and date, write ``env.json`` into it, print its path."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--base", type=Path, default=None, help="parent folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    env = capture_env(resolve_device(args.device))
    folder = results_folder(env, args.base)
    write_json(folder / "env.json", env)
    print(folder)


if __name__ == "__main__":
    main()
