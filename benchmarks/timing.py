"""How the fastdist benchmarks measure: per-call time statistics and peak extra CUDA memory.

The environment capture (device, vendor peaks, versions; it also puts the repository root on
``sys.path``) is :mod:`env`; the command-line options, run context and row statuses are :mod:`runargs`;
the results files are :mod:`output`; the pass/fail targets are judged by ``report.py``, never here.

Timing methodology
------------------
* CUDA, cold L2: ``triton.testing.do_bench`` (the tool the kernels' tuner uses): CUDA events around each
  call, Triton's 256 MiB L2 flush right before every timed call. Every provider is timed the same way, so
  none starts with its inputs in L2.
* CUDA, warm L2 (the recipe's logits are in L2 in real training): ``do_bench`` of two calls back to back
  minus ``do_bench`` of one; the second call finds what the first left in L2 (the same flush precedes
  both blocks, so no provider gets a head start).
* Per-call untimed setup (e.g. the forward before a timed backward): the marginal time of ``fn``,
  ``do_bench(setup; flush; fn)`` minus ``do_bench(setup; flush)`` (the same Triton L2 flush between
  them, so ``fn`` starts cold as well); warm: ``(setup; fn; setup; fn)`` minus ``(setup; fn; setup)``.
* CUDA-graph replays: ``triton.testing.do_bench_cudagraph`` (no host overhead; warm L2).
* Host time per call: wall clock of ``n`` asynchronous calls (no synchronisation in between) over ``n``.
* CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` (the same marginal-time rule for setup; the CPU
  has no L2 flush: its times are "warm").
Each timing holds the median and the 20th/80th percentiles of the per-call times (for a marginal time,
the quantiles of the full block shifted by the median of its prefix).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


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


def _sequence(calls: Sequence[Callable[[], Any]]) -> Callable[[], None]:
    def run() -> None:
        for call in calls:
            call()

    return run


def _block_times(block: Callable[[], Any], device: str, warmup_ms: float, rep_ms: float) -> list[float]:
    """Per-call times (ms) of ``block``: do_bench (cold L2) on CUDA, torch.utils.benchmark on CPU."""
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return list(do_bench(block, warmup=warmup_ms, rep=rep_ms, return_mode="all"))
    import torch
    from torch.utils import benchmark

    block()  # warm-up (first-call costs)
    timer = benchmark.Timer(stmt="block()", globals={"block": block}, num_threads=torch.get_num_threads())
    return [t * 1e3 for t in timer.blocked_autorange(min_run_time=max(rep_ms, warmup_ms) / 1e3).times]


def _marginal(prefix: Sequence[Callable[[], Any]], fn: Callable[[], Any], device: str, warmup_ms: float,
              rep_ms: float) -> Timing:
    """Time of ``fn`` run after ``prefix``: block(prefix + fn) minus block(prefix) (median of each)."""
    full = summarize(_block_times(_sequence([*prefix, fn]), device, warmup_ms, rep_ms))
    if not prefix:
        return full
    base = summarize(_block_times(_sequence(prefix), device, warmup_ms, rep_ms)).median_ms
    floor = 1e-6  # a marginal time is positive; noise may not make it negative
    return Timing(max(full.median_ms - base, floor), max(full.p20_ms - base, floor),
                  max(full.p80_ms - base, floor), full.reps)


def time_fn(fn: Callable[..., Any], device: str, warmup_ms: float = 25, rep_ms: float = 100,
            setup: Callable[[], Any] | None = None, l2: str = "cold") -> Timing:
    """Time ``fn`` on ``device`` (see the module docstring). With ``setup``, each call is
    ``fn(setup())`` and only ``fn`` is timed. ``l2``: ``"cold"`` (flushed before the timed call) or
    ``"warm"`` (run right after the same work); on CPU both are warm."""
    if l2 not in ("cold", "warm"):
        raise ValueError(f"l2 must be 'cold' or 'warm', got {l2!r}")
    if setup is None:
        call, prefix = fn, []
    else:
        state: dict[str, Any] = {}
        call = lambda: fn(state["arg"])  # noqa: E731 - a closure over the setup's latest result
        prefix = [lambda: state.__setitem__("arg", setup())]
    cuda = device.startswith("cuda")
    if cuda and l2 == "warm":  # the timed call follows the same work (and setup)
        prefix = [*prefix, call, *prefix]
    elif cuda and prefix:  # cold: flushed again between the setup and the timed call
        prefix = [*prefix, _l2_flush()]
    return _marginal(prefix, call, device, warmup_ms, rep_ms)


def _l2_flush() -> Callable[[], None]:
    """Triton's own L2 flush (the one do_bench runs before every timed call)."""
    from triton.runtime import driver

    cache = driver.active.get_empty_cache_for_benchmark()
    return lambda: driver.active.clear_cache(cache)


def time_graph(fn: Callable[[], Any], rep_ms: float = 100) -> Timing:
    """Per-call time of ``fn`` as CUDA-graph replays (``triton.testing.do_bench_cudagraph``; warm L2).
    ``fn`` must be capturable (static shapes, no host synchronisation)."""
    from triton.testing import do_bench_cudagraph

    return summarize(list(do_bench_cudagraph(fn, rep=rep_ms, return_mode="all")))


def host_ms_per_call(fn: Callable[[], Any], device: str, calls: int = 50) -> float:
    """Host (Python + dispatch) time per call: ``calls`` asynchronous calls, no synchronisation between
    them (a CUDA launch queue holds far more than 50 calls' kernels, so the host does not wait)."""
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host_s = time.perf_counter() - t0
    synchronize(device)
    return host_s * 1e3 / calls


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
