"""Render the README's "Performance" section from the newest benchmark results files.

    python benchmarks/report.py                      # newest GPU results under benchmarks/results/
    python benchmarks/report.py --results DIR [DIR]  # these folders (CPU smoke results allowed, labelled)

For each benchmark (loss, train, loader) the newest ``<name>.json`` (by its capture time) of a complete,
non-quick run is used; only when no such file exists is an incomplete (killed or timed-out) or ``--quick``
run used, and its section title says so. The pass/fail targets are judged here from the measured rows
(the benchmarks only measure): a CPU run is never judged, a missing number is "not measured".
Every table names its device, date, versions and source file.
Only numbers read from those files are shown (formatted or unit-converted); what a file does not hold is
written as its status or "not measured". The README text between ``<!-- perf:begin -->`` and
``<!-- perf:end -->`` is replaced; without those markers (or with ``--stdout``) the section is printed
instead. CPU results are never picked up automatically (they are not
performance claims); when given explicitly they are labelled as a CPU smoke run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from env import RESULTS_DIR, ROOT
from output import NOT_MEASURED

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
BENCHMARKS = ("kernel", "loss", "train", "loader")
KERNEL_TIMES = ("cold_l2", "warm_l2", "graph")
DASH = "-"
# How the loss section's bandwidth figures count bytes (static text: its numbers are not measurements).
LOSS_BYTES_NOTE = (
    "Bandwidth is reported under two byte models: two-pass, the traffic of the fused algorithm (its column "
    "statistics need every row before any gradient, so forward + backward reads S and T twice and writes "
    "dS: 5 tensor-sizes), and S+T+dS, the minimum traffic (read S and T, write dS: 3 tensor-sizes), "
    "under which a two-pass forward + backward cannot exceed 3/5 = 60% of peak. The 70% target is "
    "therefore checked on the backward pass, which moves exactly S, T and dS under both models."
)
NO_RESULTS = ("Not measured yet: no GPU results file exists under `benchmarks/results/` "
              "(run `make gpu-check` on a GPU machine).\n")


# --------------------------------------------------------------------------------------------------
# Finding results
# --------------------------------------------------------------------------------------------------
def load(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) and "env" in doc and "results" in doc else None


def preference(doc: dict[str, Any]) -> tuple[bool, str]:
    """Sort key of a results document: complete, non-``--quick`` runs first, then the newest."""
    cfg = doc.get("config", {})
    full = bool(cfg.get("complete", True)) and not cfg.get("quick", False)
    return full, doc["env"].get("datetime_utc", "")


def newest(folders: Iterable[Path], include_cpu: bool) -> dict[str, tuple[dict[str, Any], Path]]:
    """For each benchmark, the results document (and its path) found in ``folders`` to report: the newest
    complete, non-quick one, else the newest of any kind."""
    found: dict[str, tuple[dict[str, Any], Path]] = {}
    for folder in folders:
        for name in BENCHMARKS:
            path = folder / f"{name}.json"
            doc = load(path) if path.exists() else None
            if doc is None or (not include_cpu and not doc["env"].get("is_cuda")):
                continue
            if name not in found or preference(doc) > preference(found[name][0]):
                found[name] = (doc, path)
    return found


def caveat(doc: dict[str, Any]) -> str:
    """What a section title says about a run that is not a complete, full run ("" for one that is)."""
    cfg = doc.get("config", {})
    notes = []
    if not cfg.get("complete", True):
        notes.append("incomplete run (stopped before its end; what it did not reach is missing)")
    if cfg.get("quick"):
        notes.append("--quick settings")
    return f" [{'; '.join(notes)}]" if notes else ""


# --------------------------------------------------------------------------------------------------
# Formatting (every number shown goes through these)
# --------------------------------------------------------------------------------------------------
def num(value: Any, digits: int | None = None) -> str:
    """A measured value, or a dash when absent."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return DASH
    if digits is None:
        digits = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1
    return f"{value:.{digits}f}"


def pct(value: Any) -> str:
    return f"{num(value * 100, 1)}%" if isinstance(value, int | float) else DASH


def sci(value: Any) -> str:
    """A small value (a relative error) in scientific notation, or a dash when absent."""
    return f"{value:.1e}" if isinstance(value, int | float) and not isinstance(value, bool) else DASH


def times(value: Any) -> str:
    return f"{num(value, 2)}x" if isinstance(value, int | float) else DASH


def mib(value: Any) -> str:
    return f"{num(value / 2**20, 1)} MiB" if isinstance(value, int | float) else NOT_MEASURED


def cell(row: dict[str, Any] | None, render: Callable[[dict[str, Any]], str]) -> str:
    """``render(row)`` for a measured row, else the row's status (or "not measured")."""
    if row is None:
        return NOT_MEASURED
    if row.get("status") != "ok":
        return str(row.get("status", NOT_MEASURED))
    return render(row)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def provenance(doc: dict[str, Any], path: Path) -> list[str]:
    env = doc["env"]
    peak = env.get("peak")
    peak_txt = (f"; vendor peaks {num(peak['mem_bw_bytes_s'] / 1e12, 2)} TB/s, "
                f"{num(peak['bf16_flops'] / 1e12, 0)} dense BF16 TFLOP/s ({peak['label']})"
                if isinstance(peak, dict) else "; vendor peaks unknown (no fractions of peak)")
    try:
        shown = path.resolve().relative_to(ROOT)
    except ValueError:
        shown = path
    lines = [f"Device **{env['device_name']}**, measured {env['datetime_utc']} UTC, torch {env['torch']}, "
             f"triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver')}, "
             f"commit `{str(env.get('git_commit'))[:12]}`{peak_txt}. Source: `{shown}`."]
    if not env.get("is_cuda"):
        lines.append("")
        lines.append("**CPU smoke run: these numbers only show that the benchmark runs; they are not "
                     "performance claims.**")
    return lines


# --------------------------------------------------------------------------------------------------
# Targets: judged here from the measured rows (the benchmarks only measure)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossTarget:
    """A loss target, checked on the Triton provider's NCHW row of a case and mode."""

    name: str
    shape: str
    dtype: str
    mode: str
    field: str
    op: str  # ">=" | "<=" | "<"
    threshold: float


_BWD_BYTES = "bwd bandwidth / peak (bytes: read S, T + write dS; the same under both models)"
_TWO_PASS = "fwd+bwd bandwidth / peak (two-pass bytes: read S, T twice + write dS)"
_MIN_IO = "fwd+bwd bandwidth / peak (S+T+dS bytes: read S, T + write dS; two passes reach at most 60%)"
_MEMORY = "fwd+bwd peak extra memory / reference's"
_BOTH = ("bf16", "fp32")
LOSS_TARGETS = [
    LossTarget("fwd+bwd speed-up vs reference", "recipe-b8", "bf16", "fwd+bwd", "speedup_vs_reference",
               ">=", 8.0),
    LossTarget("fwd+bwd speed-up vs reference+compile", "recipe-b8", "bf16", "fwd+bwd", "speedup_vs_compile",
               ">=", 2.0),
    *(LossTarget(_BWD_BYTES, "fullres-b2", d, "bwd", "bw_frac_peak", ">=", 0.70) for d in _BOTH),
    *(LossTarget(_TWO_PASS, "fullres-b2", d, "fwd+bwd", "bw_frac_peak", ">=", 0.70) for d in _BOTH),
    *(LossTarget(_MIN_IO, "fullres-b2", d, "fwd+bwd", "bw_frac_peak_min_io", ">=", 0.70) for d in _BOTH),
    *(LossTarget(_MEMORY, shape, d, "fwd+bwd", "mem_frac_reference", "<=", 0.10)
      for shape, d in (("fullres-b2", "bf16"), ("fullres-b2", "fp32"), ("recipe-b8", "bf16"))),
]
TRAIN_TARGET = ("+compile", 3.0)  # the engine's configuration reaches >= 3x the reference's images/s
LOADER_TARGET = ("+compile", 2, 8, 0.05)  # step, batch, threads: DALI data wait < 5% of the step
OPS: dict[str, Callable[[float, float], bool]] = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t,
                                                  "<": lambda v, t: v < t}


def judge(value: Any, op: str, threshold: float, is_cuda: bool) -> str:
    """``pass`` / ``fail`` of a measured value; a CPU run or a missing value is never judged."""
    if not is_cuda:
        return "not applicable (CPU run)"
    if not isinstance(value, int | float):
        return NOT_MEASURED
    return "pass" if OPS[op](value, threshold) else "fail"


def _ok(rows: Iterable[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The first row with every ``match`` field equal, when it was measured ("ok"), else None."""
    row = next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)
    return row if row is not None and row.get("status") == "ok" else None


def loss_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for spec in LOSS_TARGETS:
        row = _ok(doc["results"], shape_name=spec.shape, dtype=spec.dtype, layout="nchw", mode=spec.mode,
                  provider="triton")
        value = row.get(spec.field) if row else None
        out.append({"target": spec.name, "case": f"{spec.shape} {spec.dtype} nchw {spec.mode}",
                    "mode": spec.mode, "field": spec.field, "op": spec.op, "threshold": spec.threshold,
                    "value": value,
                    "status": judge(value, spec.op, spec.threshold, doc["env"].get("is_cuda", False))})
    return out


def train_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    config, threshold = TRAIN_TARGET
    batch = doc["config"]["batches"][0]
    row = _ok(doc["results"], config=config, batch=batch)
    value = row.get("speedup_vs_reference") if row else None
    return [{"target": f"KD step images/s, {config} vs reference configuration", "case": f"batch {batch}",
             "op": ">=", "threshold": threshold, "value": value,
             "status": judge(value, ">=", threshold, doc["env"].get("is_cuda", False))}]


def loader_targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    step, batch, threads, threshold = LOADER_TARGET
    cfg = doc["config"]
    steps = doc.get("step") if isinstance(doc.get("step"), list) else []
    row = _ok(steps, backend="dali")
    value = row.get("data_wait_frac") if row else None
    status = judge(value, "<", threshold, doc["env"].get("is_cuda", False))
    if status in ("pass", "fail") and (cfg.get("step_config"), cfg.get("batch"),
                                      cfg.get("step_threads")) != (step, batch, threads):
        status = f"{NOT_MEASURED}: the target uses the {step} step, batch {batch}, {threads} threads"
    case = f"batch {cfg.get('batch')}, {cfg.get('step_threads')} threads, step {cfg.get('step_config')}"
    return [{"target": "DALI data wait / step time", "case": case,
             "op": "<", "threshold": threshold, "value": value, "status": status}]


def targets(checked: list[dict[str, Any]]) -> list[str]:
    rows = [[t["target"], t["case"], f"{t['op']} {num(t['threshold'], 2)}",
             num(t["value"]) if t.get("value") is not None else NOT_MEASURED, t["status"]]
            for t in checked]
    return table(["target", "case", "goal", "measured", "status"], rows) if rows else []


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
def loss_section(doc: dict[str, Any], path: Path) -> list[str]:
    rows = doc["results"]
    index = {(r["shape_name"], r["dtype"], r["layout"], r["mode"], r["provider"]): r for r in rows}
    cases = list(dict.fromkeys((r["shape_name"], r["shape"], r["dtype"], r["layout"]) for r in rows))
    body = []
    for name, shape, dtype, layout in cases:
        get = lambda p, n=name, d=dtype, lay=layout: index.get((n, d, lay, "fwd+bwd", p))  # noqa: E731
        tri = get("triton")
        derived = [lambda r: times(r.get("speedup_vs_reference")),
                   lambda r: times(r.get("speedup_vs_compile")),
                   lambda r: num(r["gbps"], 1),
                   lambda r: pct(r.get("bw_frac_peak")),
                   lambda r: pct(r.get("bw_frac_peak_min_io")),
                   lambda r: pct(r["mem_frac_reference"]) if r.get("mem_frac_reference") is not None
                   else NOT_MEASURED]
        measured = tri is not None and tri.get("status") == "ok"
        body.append([f"{name} ({shape})", dtype, layout,
                     *(cell(get(p), lambda r: num(r["median_ms"])) for p in
                       ("reference", "reference+compile", "torch", "triton")),
                     *(show(tri) if measured else DASH for show in derived)])
    header = ["case", "dtype", "layout", "reference ms", "reference+compile ms", "torch ms", "triton ms",
              "triton vs reference", "triton vs compile", "triton GB/s (two-pass)", "of peak (two-pass)",
              "of peak (S+T+dS)", "triton extra memory / reference's"]
    return [
        f"### DIST loss: forward + backward{caveat(doc)}", "", *provenance(doc, path), "",
        "Median times; every mode (forward, no-grad forward, backward), the quintile spread, the torch "
        "backend's ratios and the accuracy check are in `loss.csv`. " + LOSS_BYTES_NOTE, "",
        *table(header, body), "", *targets(loss_targets(doc)), "",
    ]


def train_section(doc: dict[str, Any], path: Path) -> list[str]:
    cfg = doc["config"]
    body = [[r["config"], str(r.get("batch", DASH)),
             cell(r, lambda r: f"{num(r['step_ms'])} [{num(r['p20_ms'])}, {num(r['p80_ms'])}]"),
             cell(r, lambda r: num(r["images_per_s"])),
             cell(r, lambda r: times(r.get("speedup_vs_reference"))),
             cell(r, lambda r: mib(r.get("peak_mem_bytes"))),
             cell(r, lambda r: num(r["flops_per_step"] / 1e9, 1) if r.get("flops_per_step") else DASH),
             cell(r, lambda r: num(r.get("achieved_tflops"))),
             cell(r, lambda r: pct(r.get("frac_peak_bf16")))]
            for r in doc["results"]]
    header = ["configuration", "batch", "step ms [low, high]", "images/s", "vs reference", "peak memory",
              "model GFLOP/step", "TFLOP/s", "of dense bf16 peak"]
    size = "x".join(str(s) for s in cfg["size"])
    return [
        f"### KD training step{caveat(doc)}", "", *provenance(doc, path), "",
        f"Teacher {cfg['teacher']}, student {cfg['student']}, crops {size}, data already on the device; each "
        "configuration adds one optimisation to the row above it (fused loss backend: "
        f"{cfg['fused_backend']}; every row with the engine's TF32 / cuDNN settings). low/high: first and "
        "fourth quintiles of the step times.", "",
        *([f"Several GPUs: {cfg['multi_gpu']['strategy']} (torch's optimize_ddp = "
           f"{cfg['multi_gpu']['optimize_ddp']}; {cfg['multi_gpu']['measured']}).", ""]
          if isinstance(cfg.get("multi_gpu"), dict) else []),
        *table(header, body), "", *targets(train_targets(doc)), "",
    ]


def loader_section(doc: dict[str, Any], path: Path) -> list[str]:
    cfg = doc["config"]
    body = [[r["backend"], str(r["threads"]), cell(r, lambda r: num(r["images_per_s"])),
             cell(r, lambda r: num(r["cpu_cores_used"], 2)),
             cell(r, lambda r: pct(r["decode_share"]) if "decode_share" in r else NOT_MEASURED)]
            for r in doc["results"]]
    size, crop = ("x".join(map(str, cfg[k])) for k in ("image_size", "crop"))
    lines = [
        f"### Training loader{caveat(doc)}", "", *provenance(doc, path), "",
        f"Synthetic Cityscapes PNGs of {size}, crops {crop}, batch {cfg['batch']}; "
        f"{cfg['cpu_cores_available']} CPU cores available.", "",
        *table(["backend", "threads / workers", "images/s", "CPU cores used", "decode share"], body), "",
        "Decode share, torch: PIL decode CPU time over the loader's CPU time per image; DALI: the loader's "
        "images/s over a decode-only DALI pipeline's at the same thread count.", "",
    ]
    steps = doc.get("step")
    if isinstance(steps, list) and steps:
        step_body = [[str(r.get("backend", DASH)), str(r.get("threads", DASH)),
                      cell(r, lambda r: pct(r["data_wait_frac"])),
                      cell(r, lambda r: num(r["iter_ms"])),
                      cell(r, lambda r: num(r.get("step_ms_fixed_data"))),
                      cell(r, lambda r: pct(r["gpu_aug_share"]) if "gpu_aug_share" in r
                           else NOT_MEASURED)]
                     for r in steps]
        lines += [f"KD step ({cfg['step_config']}) fed by the loader:", "",
                  *table(["backend", "threads", "data wait", "iteration ms", "step ms, fixed data",
                          "GPU augmentation share"], step_body), ""]
    else:
        lines += ["Data wait with the KD step: not measured in this run.", ""]
    return lines + [*targets(loader_targets(doc)), ""]


def kernel_section(doc: dict[str, Any], path: Path) -> list[str]:
    rows = doc["results"]
    timed = [r for r in rows if r.get("part") != "sanity"]
    body = [[r["part"], r["case"],
             *(cell(r, lambda r, k=k: num(r.get(f"median_ms_{k}"))) for k in KERNEL_TIMES),
             cell(r, lambda r: num(r.get("host_ms_per_call"))),
             *(cell(r, lambda r, k=k: num(r.get(f"gbps_{k}"), 1)) for k in KERNEL_TIMES),
             cell(r, lambda r: ", ".join(f"`{n}`" for n in r.get("launched", [])) or DASH)]
            for r in timed]
    header = ["part", "case", "cold-L2 ms", "warm-L2 ms", "CUDA graph ms", "host ms / call", "GB/s cold",
              "GB/s warm", "GB/s graph", "launches"]
    checks = [[r["case"], cell(r, lambda r: sci(r.get("triton_vs_torch_loss_rel"))),
               cell(r, lambda r: sci(r.get("triton_vs_torch_grad_rel"))),
               cell(r, lambda r: sci(r.get(f"{doc['config']['backend']}_loss_rel_err_vs_fp64"))),
               cell(r, lambda r: sci(r.get(f"{doc['config']['backend']}_grad_rel_err_vs_fp64")))]
              for r in rows if r.get("part") == "sanity"]
    return [
        f"### Fused loss kernels (no torch.compile){caveat(doc)}", "", *provenance(doc, path), "",
        f"Backend {doc['config']['backend']}. copy: a device-to-device copy (read + write), the bandwidth "
        "ceiling; forward / backward: each op alone; front-end: forward + backward back to back. Cold L2: "
        "flushed before each call; warm: right after the same call; CUDA graph: replays (no host time).", "",
        *table(header, body), "",
        *table(["case", "triton vs torch: loss", "gradient", "vs float64 reference: loss", "gradient"],
               checks), "",
    ]


SECTIONS = {"kernel": kernel_section, "loss": loss_section, "train": train_section, "loader": loader_section}


def render(found: dict[str, tuple[dict[str, Any], Path]]) -> str:
    lines = ["_Generated by `python benchmarks/report.py` from the results files each section names; "
             "every number below is read from them._", ""]
    for name in BENCHMARKS:
        if name in found:
            lines += SECTIONS[name](*found[name])
        else:
            lines += [f"**{name}**: not measured (no results file).", ""]
    return "\n".join(lines).rstrip() + "\n"


def update_readme(readme: Path, section: str) -> bool:
    """Replace the text between the markers; False (nothing written) when they are absent."""
    if not readme.exists():
        return False
    text = readme.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return False
    readme.write_text(text[: start + len(BEGIN)] + "\n" + section + text[end:])
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", nargs="+", type=Path, default=None,
                   help="results folders (default: every folder under benchmarks/results/, GPU runs only)")
    p.add_argument("--include-cpu", action="store_true", help="also use CPU runs under benchmarks/results/")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--stdout", action="store_true", help="print the section instead of editing the README")
    args = p.parse_args(argv)
    explicit = args.results is not None
    folders = args.results if explicit else sorted(d for d in RESULTS_DIR.glob("*") if d.is_dir())
    found = newest(folders, include_cpu=explicit or args.include_cpu)
    section = render(found) if found else NO_RESULTS
    if args.stdout or not update_readme(args.readme, section):
        print(section, end="")
    else:
        print(f"updated the Performance section of {args.readme}")


if __name__ == "__main__":
    main()
