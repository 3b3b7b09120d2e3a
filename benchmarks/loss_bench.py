"""DIST loss benchmark: reference vs reference+compile vs fastdist's torch and Triton backends.

Providers
  reference          the published formula, eager (``fastdist.loss.reference.dist_loss_reference``)
  reference+compile  ``torch.compile`` of that formula (a fresh compile per case, ``dynamic=False``)
  torch              fastdist's analytic PyTorch backend (``fastdist.dist_loss(..., backend="torch")``)
  triton             fastdist's fused Triton kernels (``backend="triton"``; GPU only: under the CPU
                     interpreter it is listed as "skipped: interpreter", never timed)
Modes
  fwd          forward with autograd recording (what a training step runs)
  fwd_nograd   forward under ``torch.no_grad()``
  bwd          ``torch.autograd.grad`` of a retained graph (backward only)
  fwd+bwd      forward then ``torch.autograd.grad`` (gradient w.r.t. the student only, as in KD)

Per case: median and p20/p80 time (cold L2; fwd+bwd also warm L2 on CUDA, ``median_ms_warm_l2``),
effective bandwidth (bytes / median) and its fraction of the device's peak under two byte models,
peak memory over the inputs (CUDA only), relative error of the loss (and gradient)
against a float64 evaluation of the reference formula, and speed-ups against reference and
reference+compile computed from the medians of the same case.

Byte models (the same bytes for every provider; one tensor-size = the bytes of S):
  two-pass  (``bytes_moved``, ``gbps``, ``bw_frac_peak``): the traffic of the fused algorithm. fwd = read S
            and T; bwd = read S and T, write dS; fwd+bwd = both, 5 tensor-sizes (the column statistics
            need every row before any gradient can be formed, so S and T are read twice).
  min-io    (``bytes_min_io``, ``gbps_min_io``, ``bw_frac_peak_min_io``): the minimum traffic, "read S
            and T, write dS" (fwd: read S and T). It differs only for fwd+bwd (3 tensor-sizes), where a
            two-pass algorithm can reach at most 3/5 = 60% of peak.
report.py therefore checks the 70% bandwidth target on ``bwd`` (the backward kernel reads S and T and
writes dS: the same bytes under both models), and the fwd+bwd fractions under both models as separate
target rows.

Run order (compiling reference+compile costs seconds per case, far more than timing it): every case,
priority cases first, with the other providers and with reference+compile only on the case of the
speed-up-vs-compile target; then reference+compile on the remaining cases while the time budget lasts.
The budget is checked before every case and before every provider is built (i.e. before any compile).

Writes ``loss.csv``, ``loss.json`` (with the environment) and ``loss.png``; report.py judges the targets.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from env import DevicePeak
from output import matplotlib_pyplot, write_csv, write_json
from runargs import Budget, add_run_args, error_status, run_context
from timing import peak_extra_memory, synchronize, time_fn

PROVIDERS = ["reference", "reference+compile", "torch", "triton"]
MODES = ["fwd", "fwd_nograd", "bwd", "fwd+bwd"]
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
SHAPES: dict[str, tuple[int, ...]] = {
    "recipe-b2": (2, 19, 64, 128),
    "recipe-b8": (8, 19, 64, 128),
    "fullres-b2": (2, 19, 512, 1024),
    "ade20k-b8": (8, 150, 64, 64),
    "cls-256": (256, 1000),
    "cls-1024": (1024, 1000),
}
# Cases that the targets are checked on run first, so that a time budget never cuts them.
PRIORITY = [("recipe-b8", "bf16", "nchw"), ("fullres-b2", "bf16", "nchw"), ("fullres-b2", "fp32", "nchw"),
            ("recipe-b8", "fp32", "nchw"), ("recipe-b2", "bf16", "nchw")]
QUICK_CASES = [("recipe-b2", "fp32", "nchw"), ("recipe-b2", "bf16", "nhwc"), ("cls-256", "fp32", "rows")]
COMPILED = "reference+compile"

# Tensor-sizes each mode moves under the two byte models (see the module docstring).
TRAFFIC = {"two-pass": {"fwd": 2, "fwd_nograd": 2, "bwd": 3, "fwd+bwd": 5},
           "min-io": {"fwd": 2, "fwd_nograd": 2, "bwd": 3, "fwd+bwd": 3}}
# Fields (bytes, GB/s, fraction of peak) of each byte model.
BW_FIELDS = {"two-pass": ("bytes_moved", "gbps", "bw_frac_peak"),
             "min-io": ("bytes_min_io", "gbps_min_io", "bw_frac_peak_min_io")}

CSV_FIELDS = ["shape_name", "shape", "dtype", "layout", "mode", "provider", "status", "median_ms", "p20_ms",
              "p80_ms", "reps", "median_ms_warm_l2", *BW_FIELDS["two-pass"], *BW_FIELDS["min-io"],
              "peak_extra_bytes", "mem_frac_reference", "speedup_vs_reference", "speedup_vs_compile",
              "loss_rel_err", "grad_rel_err", "first_calls_s"]


@dataclass(frozen=True)
class Case:
    shape_name: str
    shape: tuple[int, ...]
    dtype: str  # "fp32" | "bf16"
    layout: str  # "nchw" | "nhwc" | "rows"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.shape_name, self.dtype, self.layout)


@dataclass(frozen=True)
class Item:
    """One unit of work: ``providers`` on ``case``; with a ``reason`` the rows are written, never run."""

    case: Case
    providers: tuple[str, ...]
    reason: str | None = None


# The cases reference+compile runs on in the first pass: that of report.py's speed-up-vs-compile target.
COMPILE_FIRST = {("recipe-b8", "bf16", "nchw")}


# --------------------------------------------------------------------------------------------------
# Cases and providers
# --------------------------------------------------------------------------------------------------
def all_cases(shapes: list[str], dtypes: list[str], layouts: list[str]) -> list[Case]:
    """Every (shape, dtype, layout) combination, priority cases first. 2-D shapes only use ``rows``."""
    cases = []
    for name in shapes:
        shape = SHAPES[name]
        valid = ["rows"] if len(shape) == 2 else [lay for lay in ("nchw", "nhwc") if lay in layouts]
        for dtype in dtypes:
            for layout in valid:
                cases.append(Case(name, shape, dtype, layout))
    rank = {key: i for i, key in enumerate(PRIORITY)}
    return sorted(cases, key=lambda c: rank.get(c.key, len(rank)))


def quick_cases() -> list[Case]:
    return [Case(n, SHAPES[n], d, lay) for n, d, lay in QUICK_CASES]


def plan(cases: list[Case], providers: list[str], quick: bool) -> list[Item]:
    """Work items in run order: every case with the providers other than reference+compile, which runs in
    this first pass only on the :data:`COMPILE_FIRST` cases; then reference+compile on the other cases
    (while the time budget lasts). ``quick`` compiles on the first case only (compiling on a CPU is slow)."""
    first = {cases[0].key} if quick and cases else COMPILE_FIRST
    items = [Item(c, tuple(p for p in providers if p != COMPILED or c.key in first)) for c in cases]
    if COMPILED in providers:
        reason = "skipped: --quick (compiled on the first case only)" if quick else None
        items += [Item(c, (COMPILED,), reason) for c in cases if c.key not in first]
    return [item for item in items if item.providers]


def make_inputs(case: Case, device: str, seed: int = 0) -> tuple[Any, Any]:
    """Student and teacher logits of the case (student requires grad)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, DTYPES[case.dtype])
    s = (torch.randn(case.shape, generator=gen) * 2.0).to(device=device, dtype=dtype)
    t = (torch.randn(case.shape, generator=gen) * 2.0).to(device=device, dtype=dtype)
    if case.layout == "nhwc":
        s = s.contiguous(memory_format=torch.channels_last)
        t = t.contiguous(memory_format=torch.channels_last)
    return s.requires_grad_(True), t


def bytes_moved(case: Case, mode: str, model: str) -> int:
    """Bytes ``mode`` moves under the byte ``model`` ("two-pass" or "min-io", see the module docstring)."""
    elem = 4 if case.dtype == "fp32" else 2
    return TRAFFIC[model][mode] * math.prod(case.shape) * elem


def bandwidth(case: Case, mode: str, median_ms: float, peak: DevicePeak | None) -> dict[str, Any]:
    """Bytes, GB/s and fraction of the peak bandwidth of a measured median, under both byte models."""
    out: dict[str, Any] = {}
    for model, (bytes_field, gbps_field, frac_field) in BW_FIELDS.items():
        moved = bytes_moved(case, mode, model)
        gbps = moved / (median_ms * 1e-3) / 1e9
        out.update({bytes_field: moved, gbps_field: gbps,
                    frac_field: gbps * 1e9 / peak.mem_bw_bytes_s if peak else None})
    return out


def loss_fns(loss: str) -> tuple[Callable[..., Any], Callable[..., Any], dict[str, float]]:
    """``--loss``: (reference formula, fastdist front-end, hyper-parameters). DIST: beta = gamma = tau = 1;
    KD (CIRKD's CriterionKD) tau = 1; CWD (CIRKD's CriterionCWD on logits) tau = 4."""
    import fastdist
    from fastdist.loss import cwd_loss_reference, dist_loss_reference, kd_loss_reference

    return {"dist": (dist_loss_reference, fastdist.dist_loss, {"beta": 1.0, "gamma": 1.0, "tau": 1.0}),
            "kd": (kd_loss_reference, fastdist.kd_loss, {"tau": 1.0}),
            "cwd": (cwd_loss_reference, fastdist.cwd_loss, {"tau": 4.0})}[loss]


def provider_fn(provider: str, compile_mode: str, loss: str = "dist") -> Callable[[Any, Any], Any]:
    """The loss callable ``f(student, teacher) -> loss`` of a provider (hyper-parameters: `loss_fns`)."""
    reference, fused, kw = loss_fns(loss)
    if provider in ("reference", "reference+compile"):

        def ref(s: Any, t: Any) -> Any:
            return reference(s, t, **kw)

        if provider == "reference":
            return ref
        import torch

        torch._dynamo.reset()  # fresh graphs per case: no recompile limit, no automatic dynamic shapes
        return torch.compile(ref, dynamic=False, mode=None if compile_mode == "default" else compile_mode)

    backend = {"torch": "torch", "triton": "triton"}[provider]
    return lambda s, t: fused(s, t, backend=backend, **kw)


def mode_fn(f: Callable[[Any, Any], Any], mode: str, s: Any, t: Any) -> tuple[Callable[..., Any], Any]:
    """``(fn, setup)`` of a mode: the timed call is ``fn()``, or ``fn(setup())`` with only ``fn`` timed."""
    import torch

    if mode == "fwd":
        return (lambda: f(s, t)), None
    if mode == "fwd_nograd":

        def nograd() -> Any:
            with torch.no_grad():
                return f(s, t)

        return nograd, None
    if mode == "bwd":  # a fresh graph per call (compiled backward graphs may not be retained)
        return (lambda loss: torch.autograd.grad(loss, s)), (lambda: f(s, t))
    if mode == "fwd+bwd":
        return (lambda: torch.autograd.grad(f(s, t), s)), None
    raise ValueError(mode)


def skip_reason(provider: str, device: str) -> str | None:
    """Why a provider cannot be timed on this device, or None."""
    if provider == "triton" and not device.startswith("cuda"):
        return "skipped: interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "skipped: no GPU"
    return None


# --------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------
def truth(s: Any, t: Any, loss_name: str = "dist") -> tuple[float, Any]:
    """Loss and student gradient of the reference formula evaluated in float64."""
    import torch

    reference, _, kw = loss_fns(loss_name)
    s64 = s.detach().double().requires_grad_(True)
    loss = reference(s64, t.detach().double(), **kw)
    (grad,) = torch.autograd.grad(loss, s64)
    return float(loss.detach()), grad


def accuracy(f: Callable[[Any, Any], Any], s: Any, t: Any, ref: tuple[float, Any] | None) -> dict[str, Any]:
    """Relative error of the loss and the gradient against the float64 reference."""
    import torch

    if ref is None:
        return {}
    loss = f(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    loss_err = abs(float(loss.detach()) - ref[0]) / max(abs(ref[0]), 1e-12)
    grad_err = float((grad.double() - ref[1]).norm() / ref[1].norm().clamp_min(1e-30))
    return {"loss_rel_err": loss_err, "grad_rel_err": grad_err}


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------
def measure_mode(f: Callable[[Any, Any], Any], mode: str, case: Case, s: Any, t: Any, device: str,
                 peak: DevicePeak | None, args: argparse.Namespace) -> dict[str, Any]:
    """Time one mode of one provider and measure its peak extra memory."""
    fn, setup = mode_fn(f, mode, s, t)
    timing = time_fn(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, setup=setup)
    # Warm L2 (the recipe's logits are in L2 in training): fwd+bwd on CUDA only (on a CPU the timing
    # above is already warm), to bound the run's time.
    warm = (time_fn(fn, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, setup=setup, l2="warm")
            if mode == "fwd+bwd" and device.startswith("cuda") else None)
    return {
        "status": "ok", "median_ms": timing.median_ms, "p20_ms": timing.p20_ms, "p80_ms": timing.p80_ms,
        "reps": timing.reps, "median_ms_warm_l2": warm.median_ms if warm else None,
        **bandwidth(case, mode, timing.median_ms, peak),
        "peak_extra_bytes": peak_extra_memory(fn, device, setup=setup),
    }


def first_calls(f: Callable[[Any, Any], Any], s: Any, t: Any, device: str) -> float:
    """Seconds of the first forward+backward and the first no-grad forward (compiles / autotunes)."""
    import torch

    t0 = time.perf_counter()
    torch.autograd.grad(f(s, t), s)
    with torch.no_grad():
        f(s, t)
    synchronize(device)
    return time.perf_counter() - t0


def run_provider(provider: str, case: Case, s: Any, t: Any, device: str, ref: tuple[float, Any] | None,
                 peak: DevicePeak | None, args: argparse.Namespace, modes: list[str],
                 budget: Budget, reason: str | None = None) -> list[dict[str, Any]]:
    """Rows (one per mode) of one provider on one case; failures become status rows, never crashes.

    The time budget is checked before the provider is built (reference+compile compiles on its first
    calls) and before every mode."""
    base = {"shape_name": case.shape_name, "shape": "x".join(map(str, case.shape)), "dtype": case.dtype,
            "layout": case.layout, "provider": provider}
    reason = reason or skip_reason(provider, device) or budget.skip_reason()
    if reason:
        return [{**base, "mode": m, "status": reason} for m in modes]
    try:
        f = provider_fn(provider, args.compile_mode, args.loss)
        acc = {"first_calls_s": first_calls(f, s, t, device), **accuracy(f, s, t, ref)}
    except Exception as exc:  # noqa: BLE001 - report, do not crash the whole benchmark
        traceback.print_exc()
        return [{**base, "mode": m, "status": error_status(exc)} for m in modes]
    rows = []
    for mode in modes:
        spent = budget.skip_reason()
        if spent:
            rows.append({**base, "mode": mode, "status": spent})
            continue
        try:
            measured = measure_mode(f, mode, case, s, t, device, peak, args)
            rows.append({**base, "mode": mode, **measured, **acc})
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            rows.append({**base, "mode": mode, "status": error_status(exc)})
        s.grad = None
    release(device)
    return rows


def release(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Speed-ups and memory ratios against reference / reference+compile of the same case and mode."""
    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return (r["shape_name"], r["dtype"], r["layout"], r["mode"])

    ok = {(key(r), r["provider"]): r for r in rows if r.get("status") == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            continue
        ref = ok.get((key(r), "reference"))
        comp = ok.get((key(r), "reference+compile"))
        r["speedup_vs_reference"] = ref["median_ms"] / r["median_ms"] if ref else None
        r["speedup_vs_compile"] = comp["median_ms"] / r["median_ms"] if comp else None
        if ref and ref.get("peak_extra_bytes") and r.get("peak_extra_bytes") is not None:
            r["mem_frac_reference"] = r["peak_extra_bytes"] / ref["peak_extra_bytes"]


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------
def plot(rows: list[dict[str, Any]], env: dict[str, Any], path: Path) -> Path | None:
    """Bar chart of fwd+bwd median time per case and provider (log scale); None without matplotlib or
    without a measured fwd+bwd row."""
    sel = [r for r in rows if r["mode"] == "fwd+bwd" and r.get("status") == "ok"]
    plt = matplotlib_pyplot() if sel else None
    if plt is None:
        return None
    cases = list(dict.fromkeys(f"{r['shape_name']}\n{r['dtype']} {r['layout']}" for r in sel))
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in sel)]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(cases) + 2), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, prov in enumerate(providers):
        xs, ys = [], []
        for j, c in enumerate(cases):
            for r in sel:
                if r["provider"] == prov and f"{r['shape_name']}\n{r['dtype']} {r['layout']}" == c:
                    xs.append(j + i * width)
                    ys.append(r["median_ms"])
        ax.bar(xs, ys, width=width, label=prov)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("fwd+bwd median time (ms, log)")
    label = "" if env["is_cuda"] else " (CPU smoke run, not a performance claim)"
    ax.set_title(f"DIST loss fwd+bwd, {env['device_name']}, {env['date']}{label}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, "a few small cases (CI smoke run, < 1 min on CPU)")
    p.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--layouts", nargs="+", default=["nchw", "nhwc"], choices=["nchw", "nhwc"])
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of reference+compile (default, max-autotune-no-cudagraphs, ...)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the float64 accuracy check")
    p.add_argument("--loss", choices=("dist", "kd", "cwd"), default="dist",
                   help="the loss benchmarked (files loss.* for dist, loss_kd.* / loss_cwd.* otherwise)")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup_ms, args.rep_ms = min(args.warmup_ms, 5.0), min(args.rep_ms, 30.0)
    return args


def run_item(item: Item, device: str, peak: DevicePeak | None, args: argparse.Namespace,
             budget: Budget) -> list[dict[str, Any]]:
    """Rows of one work item: its inputs and float64 truth, then each provider (budget permitting)."""
    case = item.case
    print(f"[loss_bench] {case.shape_name} {case.shape} {case.dtype} {case.layout}: "
          f"{', '.join(item.providers)}", flush=True)
    status = item.reason or budget.skip_reason()
    s = t = ref = None
    if status is None:
        try:
            s, t = make_inputs(case, device)
            ref = None if args.no_accuracy else truth(s, t, args.loss)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            status, s, t, ref = error_status(exc), None, None, None
    rows = []
    for provider in item.providers:
        rows += run_provider(provider, case, s, t, device, ref, peak, args, args.modes, budget, status)
    del s, t, ref
    release(device)
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the JSON document (also written to disk after every work item, so that
    a killed run keeps its CSV, JSON and plot)."""
    device, env, peak, out_dir, budget = run_context(args)
    cases = quick_cases() if args.quick else all_cases(args.shapes, args.dtypes, args.layouts)
    if args.loss == "cwd":  # a spatial softmax per channel: 4-D logits only
        cases = [c for c in cases if len(c.shape) == 4]
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for item in plan(cases, args.providers, args.quick):
        new = run_item(item, device, peak, args, budget)
        rows += new
        replot = any(r["mode"] == "fwd+bwd" and r.get("status") == "ok" for r in new)
        write_results(rows, env, args, out_dir, time.perf_counter() - t_start, final=False, replot=replot)
    doc = write_results(rows, env, args, out_dir, time.perf_counter() - t_start, final=True, replot=False)
    stem = _stem(args)
    print(f"[loss_bench] wrote {out_dir}/{stem}.csv, {stem}.json in {doc['config']['wall_s']:.1f}s")
    return doc


def write_results(rows: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace, out_dir: Path,
                  wall_s: float, final: bool, replot: bool) -> dict[str, Any]:
    """Add the ratios and write loss.csv, loss.json (``final``: the run reached its end) and, with
    ``replot`` (new fwd+bwd times), the plot."""
    import torch

    add_ratios(rows)
    doc = {
        "benchmark": "loss",
        "env": env,
        "config": {"quick": args.quick, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                   "compile_mode": args.compile_mode, "loss": args.loss, **loss_fns(args.loss)[2],
                   "timing": "CUDA events, L2 flushed per call" if env["is_cuda"] else "CPU wall clock",
                   "bytes_models": {
                       "two-pass": "fwd: read S,T; bwd: read S,T + write dS; fwd+bwd: both (5 tensor-sizes)",
                       "min-io": "read S,T (+ write dS with a gradient); fwd+bwd: 3 tensor-sizes"},
                   "torch_threads": torch.get_num_threads(), "complete": final, "wall_s": wall_s},
        "results": rows,
    }
    write_csv(out_dir / f"{_stem(args)}.csv", rows, CSV_FIELDS)
    write_json(out_dir / f"{_stem(args)}.json", doc)
    if replot:
        plot(rows, env, out_dir / f"{_stem(args)}.png")
    return doc


def _stem(args: argparse.Namespace) -> str:
    return "loss" if args.loss == "dist" else f"loss_{args.loss}"


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
