"""Kernel-level benchmark of the fused DIST loss, without torch.compile (the first part of gpu-check).

Rows of ``kernel.json`` (written after every row), in run order:
  copy        ``dst.copy_(src)`` of a 1 GiB buffer (CPU: 64 MiB): the device's copy bandwidth, the ceiling
              the loss kernels' GB/s is read against (read + write = 2 x bytes).
  sanity      per case: loss and student gradient of the triton backend against the torch backend, and
              of each backend against the float64 reference formula (relative errors).
  forward     per case: ``fastdist::dist_loss_fwd`` alone (the forward statistics kernel and the O(C)
              finalisation; reads S and T).
  backward    per case: ``fastdist::dist_loss_bwd`` alone with the forward's coefficients (the backward
              kernel; reads S and T, writes dS).
  front-end   per case: ``fastdist.dist_loss(..., backend)`` forward + ``torch.autograd.grad`` back to back
              (5 tensor-sizes: S and T are read by both passes, dS written once).
Every timed row holds the cold-L2 and warm-L2 medians (``timing.time_fn``), the CUDA-graph replay median
(``timing.time_graph``), the host time per call (``timing.host_ms_per_call``), GB/s of each, and the
names of what the call launches, read from ``torch.profiler`` (CUDA kernels; on a CPU, top-level ops), so
the list follows the kernels module instead of naming its kernels here.

The backend is ``triton`` on CUDA; on a CPU (the dry run of gpu-check) it is the ``torch`` backend, so
every row's wiring runs, and the CUDA-only columns are None ("not measured").
"""

from __future__ import annotations

import argparse
import gc
import math
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import loss_bench
from output import write_json
from runargs import Budget, add_run_args, error_status, run_context
from timing import host_ms_per_call, synchronize, time_fn, time_graph

CASES = [("recipe-b8", "bf16", "nchw"), ("fullres-b2", "bf16", "nchw"), ("fullres-b2", "fp32", "nchw"),
         ("recipe-b2", "bf16", "nchw"), ("recipe-b8", "bf16", "nhwc"), ("cls-1024", "bf16", "rows")]
QUICK_CASES = [("recipe-b2", "fp32", "nchw")]
# Tensor-sizes (bytes of S) each timed part moves: forward reads S, T; backward reads S, T and writes dS.
TRAFFIC = {"forward": 2, "backward": 3, "front-end": 5}


# --------------------------------------------------------------------------------------------------
# What a call launches
# --------------------------------------------------------------------------------------------------
def launched(fn: Callable[[], Any], device: str) -> list[str]:
    """Distinct names of what one call of ``fn`` runs: CUDA kernels on a GPU, top-level ops on a CPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    fn()  # first-call work (tuning, JIT) stays out of the profile
    synchronize(device)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    events = prof.events()
    if not cuda:
        return list(dict.fromkeys(e.name for e in events if e.cpu_parent is None))
    # Device events, and the kernels the profiler attached to the ops that launched them.
    names = [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    names += [k.name for e in events for k in getattr(e, "kernels", [])]
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------------
# Timing of one call
# --------------------------------------------------------------------------------------------------
def timings(fn: Callable[[], Any], device: str, nbytes: int, args: argparse.Namespace) -> dict[str, Any]:
    """Cold-L2, warm-L2 and CUDA-graph medians of ``fn`` (CUDA only for cold and graph), host time per
    call, and the GB/s of each median for ``nbytes`` moved."""
    cuda = device.startswith("cuda")
    row: dict[str, Any] = {"bytes": nbytes}
    warm = time_fn(fn, device, args.warmup_ms, args.rep_ms, l2="warm")
    row.update(median_ms_warm_l2=warm.median_ms, p20_ms_warm_l2=warm.p20_ms, p80_ms_warm_l2=warm.p80_ms)
    cold = time_fn(fn, device, args.warmup_ms, args.rep_ms) if cuda else None
    row["median_ms_cold_l2"] = cold.median_ms if cold else None
    row["median_ms_graph"] = None
    if cuda:  # a capture failure costs this column only, not the row
        try:
            row["median_ms_graph"] = time_graph(fn, args.rep_ms).median_ms
        except Exception as exc:  # noqa: BLE001 - recorded in the row
            row["graph_status"] = error_status(exc)
    row["host_ms_per_call"] = host_ms_per_call(fn, device)
    for key in ("warm_l2", "cold_l2", "graph"):
        ms = row[f"median_ms_{key}"]
        row[f"gbps_{key}"] = nbytes / (ms * 1e-3) / 1e9 if ms else None
    return row


# --------------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------------
def copy_row(device: str, args: argparse.Namespace) -> dict[str, Any]:
    """Copy bandwidth of a large buffer: the ceiling of a memory-bound kernel on this device."""
    import torch

    nbytes = (2**30 if device.startswith("cuda") else 2**26) // (16 if args.quick else 1)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    return {"part": "copy", "case": f"{nbytes / 2**20:.0f} MiB", "status": "ok",
            **timings(lambda: dst.copy_(src), device, 2 * nbytes, args)}


def backend_of(device: str) -> str:
    return "triton" if device.startswith("cuda") else "torch"


def _loss_and_grad(s: Any, t: Any, backend: str) -> tuple[float, Any]:
    import torch

    import fastdist

    loss = fastdist.dist_loss(s, t, backend=backend)
    (grad,) = torch.autograd.grad(loss, s)
    return float(loss.detach()), grad.double()


def _rel(a: Any, b: Any) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def sanity_row(case: loss_bench.Case, s: Any, t: Any, device: str) -> dict[str, Any]:
    """Relative errors of loss and gradient: each backend vs float64 reference, triton vs torch."""
    ref_loss, ref_grad = loss_bench.truth(s, t)
    got = {b: _loss_and_grad(s, t, b) for b in dict.fromkeys(["torch", backend_of(device)])}
    row: dict[str, Any] = {"part": "sanity", "case": case_name(case), "status": "ok"}
    for b, (loss, grad) in got.items():
        row[f"{b}_loss_rel_err_vs_fp64"] = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
        row[f"{b}_grad_rel_err_vs_fp64"] = _rel(grad, ref_grad)
    if "triton" in got:
        row["triton_vs_torch_loss_rel"] = abs(got["triton"][0] - got["torch"][0]) / max(abs(got["torch"][0]),
                                                                                       1e-12)
        row["triton_vs_torch_grad_rel"] = _rel(got["triton"][1], got["torch"][1])
    return row


def part_calls(s: Any, t: Any, backend: str) -> dict[str, Callable[[], Any]]:
    """The timed calls: the forward op, the backward op (on the forward's coefficients), the front-end."""
    import torch

    import fastdist
    from fastdist.loss import ops

    sd = s.detach()
    fwd_args = (None, 1.0, 1.0, 1.0, backend, False, "")
    _, col_coef, row_coef = ops.dist_loss_fwd(sd, t, *fwd_args)
    grad_out = torch.ones((), device=s.device, dtype=torch.float32)
    return {
        "forward": lambda: ops.dist_loss_fwd(sd, t, *fwd_args),
        "backward": lambda: ops.dist_loss_bwd(sd, t, None, col_coef, row_coef, grad_out, 1.0, backend,
                                              True, False),
        "front-end": lambda: torch.autograd.grad(fastdist.dist_loss(s, t, backend=backend), s),
    }


def case_name(case: loss_bench.Case) -> str:
    return f"{case.shape_name} {'x'.join(map(str, case.shape))} {case.dtype} {case.layout}"


def case_rows(case: loss_bench.Case, device: str, args: argparse.Namespace,
              budget: Budget) -> Iterator[dict[str, Any]]:
    """The sanity row and the three timed rows of one case, one at a time (each skipped once the budget
    is spent)."""
    s, t = loss_bench.make_inputs(case, device)
    size = math.prod(case.shape) * (4 if case.dtype == "fp32" else 2)
    backend = backend_of(device)
    yield guarded(lambda: sanity_row(case, s, t, device), "sanity", case_name(case), budget)
    for part, fn in part_calls(s, t, backend).items():
        def measure(part: str = part, fn: Callable[[], Any] = fn) -> dict[str, Any]:
            return {"part": part, "case": case_name(case), "backend": backend, "status": "ok",
                    "launched": launched(fn, device), **timings(fn, device, TRAFFIC[part] * size, args)}

        yield guarded(measure, part, case_name(case), budget)


def guarded(measure: Callable[[], dict[str, Any]], part: str, case: str,
            budget: Budget) -> dict[str, Any]:
    """``measure()``, or a row with the reason it was not run or failed."""
    base = {"part": part, "case": case}
    spent = budget.skip_reason()
    if spent:
        return {**base, "status": spent}
    print(f"[kernel_bench] {part} {base['case']}", flush=True)
    try:
        return measure()
    except Exception as exc:  # noqa: BLE001 - report, do not crash the whole benchmark
        traceback.print_exc()
        return {**base, "status": error_status(exc)}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, "one small case, a smaller copy buffer (CPU dry run)")
    p.add_argument("--warmup-ms", type=float, default=10)
    p.add_argument("--rep-ms", type=float, default=50)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup_ms, args.rep_ms = 2, 10
    return args


def write_results(rows: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace, out_dir: Path,
                  wall_s: float, final: bool) -> dict[str, Any]:
    doc = {"benchmark": "kernel", "env": env,
           "config": {"quick": args.quick, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                      "backend": backend_of(env["device"]), "torch_compile": False,
                      "timing": "timing.time_fn (do_bench cold/warm L2), timing.time_graph "
                                "(do_bench_cudagraph), timing.host_ms_per_call",
                      "complete": final, "wall_s": wall_s},
           "results": rows}
    write_json(out_dir / "kernel.json", doc)
    return doc


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the JSON document (also written to disk after every row)."""
    device, env, _peak, out_dir, budget = run_context(args)
    t_start = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:  # written after every row: a kill keeps what was measured
        rows.append(row)
        write_results(rows, env, args, out_dir, time.perf_counter() - t_start, final=False)

    emit(guarded(lambda: copy_row(device, args), "copy", "device buffer", budget))
    for name, dtype, layout in QUICK_CASES if args.quick else CASES:
        for row in case_rows(loss_bench.Case(name, loss_bench.SHAPES[name], dtype, layout), device, args,
                             budget):
            emit(row)
        gc.collect()
    doc = write_results(rows, env, args, out_dir, time.perf_counter() - t_start, final=True)
    print(f"[kernel_bench] wrote {out_dir}/kernel.json in {doc['config']['wall_s']:.1f}s")
    return doc


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
