"""Static roofline of the fused loss kernels: no GPU needed, every number is a static estimate.

Every kernel variant the launchers JIT (each kernel module's ``report_specs(C, dtype, layout, shape)``: the
same constexprs, signature and divisibility hints as at run time) is compiled ahead of time for
sm_90a and sm_80 (``GPUTarget("cuda", 90, 32)``: Triton 3.6 compiles capability >= 90 for the
architecture-specific "a" target) and disassembled with the ``cuobjdump`` that Triton ships. Per
variant the report gives registers, spill bytes (local memory per thread), occupancy (resident warps
per SM), the global load/store instructions by width, MUFU ops, and the dynamic warp-instructions per
logits row: the loops are found in the SASS as backward branches, their number must equal
``len(program_plan(spec, shape)["loop_trips"])``, and each instruction is weighted by the product of
the trip counts of the loops that enclose it (forward-branch paths are all counted: an upper bound).

Predicted time (static estimate, sm_90a only, for H100 SXM and H200) = max(HBM floor, issue floor):
  HBM floor   = rows x bytes_per_row / HBM bandwidth
  issue floor = P x warp-instructions per program / (min(4, P x num_warps) schedulers x clock),
                P = ceil(programs / SMs) programs on the busiest SM
(one warp-instruction per scheduler per cycle; latency, L2 and tail effects are not modelled: for a
one-program kernel such as a finalize the floor is far below its latency-bound time). The
predicted fraction of HBM bandwidth is HBM floor / predicted time.

Usage: python benchmarks/kernel_report.py [--dtype bfloat16] [--shapes recipe-b8 ...] [--json PATH]
[--readme] (--readme: also replace the README's static-estimate block with the printed tables; the README
shows ``--shapes recipe-b2 recipe-b8 fullres-b2 --archs sm_90a``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing
import os
import re
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import loss_bench
from env import ROOT  # importing env puts the repository root on sys.path

# Kernel modules following the report contract; a module that does not exist (yet) is skipped.
KERNEL_MODULES = ("kernels.dist_loss", "kernels.kd_loss", "kernels.cwd_loss")
ARCHS = {"sm_90a": 90, "sm_80": 80}
README_BEGIN, README_END = "<!-- static-estimate:begin -->", "<!-- static-estimate:end -->"


@dataclass(frozen=True)
class Gpu:
    """Datasheet figures used by the static model."""

    name: str
    sms: int
    clock_hz: float  # boost clock
    hbm_bytes_per_s: float


# NVIDIA H100 / H200 datasheets (SXM): 132 SMs, 1.98 GHz boost; HBM3 3.35 TB/s, HBM3e 4.8 TB/s.
GPUS = {"h100": Gpu("H100 SXM", 132, 1.98e9, 3.35e12), "h200": Gpu("H200", 132, 1.98e9, 4.8e12)}
SCHEDULERS_PER_SM = 4

# Occupancy limits per SM: (32-bit registers, max resident warps, max resident blocks, shared bytes)
_SM_LIMITS = {90: (65536, 64, 32, 228 * 1024), 80: (65536, 64, 32, 164 * 1024)}
_REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256

_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
# `BRA 0x1f0`, `@!P0 BRA 0x1f0`, `BRA.U !UP0, 0x1f0` (a uniform predicate operand)
_BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+(?:!?U?P\w+,\s*)?`?\(?0x([0-9a-f]+)")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def kernel_modules() -> list[Any]:
    """The modules of KERNEL_MODULES that exist."""
    mods = []
    for name in KERNEL_MODULES:
        try:
            mods.append(importlib.import_module(name))
        except ModuleNotFoundError as err:
            if err.name != name:  # the module exists but one of its imports is missing: a real error
                raise
    return mods


def _cuobjdump() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    return str(Path(get_ptxas(90).path).with_name("cuobjdump"))


def parse_sass(sass: str) -> list[tuple[int, str]]:
    """(address, instruction text without the trailing ';') of every instruction up to the end of the
    code (the final self-branch after EXIT and the NOP padding after it are dropped)."""
    out = []
    for line in sass.splitlines():
        m = _SASS_LINE.match(line)
        if not m:
            continue
        addr, text = int(m.group(1), 16), m.group(2)
        br = _BRANCH.match(text)
        if br and int(br.group(1), 16) == addr:  # `BRA self`: the trap after the last EXIT
            break
        out.append((addr, text))
    return out


def find_loops(instrs: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """Loops as (first, last) address: the target and the last backward branch to it, in source order
    (by first address: an outer loop before the loops nested in it)."""
    ends: dict[int, int] = {}
    for addr, text in instrs:
        br = _BRANCH.match(text)
        if br and int(br.group(1), 16) < addr:
            target = int(br.group(1), 16)
            ends[target] = max(ends.get(target, addr), addr)
    return sorted(ends.items(), key=lambda se: (se[0], -se[1]))


def _opcode(text: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]


def sass_stats(instrs: list[tuple[int, str]]) -> dict:
    """Static counts: instructions, global loads/stores by opcode (the suffix gives the width), MUFU."""
    ops = Counter(_opcode(t) for _, t in instrs)

    def pick(prefix: str) -> dict[str, int]:
        return {k: v for k, v in sorted(ops.items()) if k.startswith(prefix)}

    return {"sass_instructions": len(instrs), "global_loads": pick("LDG"), "global_stores": pick("STG"),
            "mufu": pick("MUFU"), "spill_instructions": sum(pick("LDL").values()) + sum(pick("STL").values())}


def weighted_count(instrs: list[tuple[int, str]], loops: list[tuple[int, int]], trips: list[int],
                   prefix: str = "") -> int:
    """Dynamic count per warp of one program: each instruction (whose opcode starts with `prefix`)
    weighted by the product of the trip counts of the loops enclosing it."""
    if len(loops) != len(trips):
        raise ValueError(f"SASS has {len(loops)} loops, program_plan lists {len(trips)} trip counts")
    total = 0
    for addr, text in instrs:
        if _opcode(text).startswith(prefix):
            total += math.prod(t for (lo, hi), t in zip(loops, trips, strict=True) if lo <= addr <= hi)
    return total


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> int:
    """Resident warps per SM allowed by registers, shared memory and the block / warp limits."""
    regs, max_warps, max_blocks, smem = _SM_LIMITS[arch]
    per_warp = math.ceil(max(registers, 1) * 32 / _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
    blocks = min(max_blocks, max_warps // num_warps, (regs // per_warp) // num_warps,
                 smem // shared if shared else max_blocks)
    return blocks * num_warps


def compile_spec(spec: dict, arch: int) -> dict:
    """Worker: compile one spec for `arch`, disassemble, return its shape-independent analysis."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec.get("attrs", {}))
    kern = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
                                   "maxnreg": spec["maxnreg"]})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kern.asm["cubin"])
        sass, res = (subprocess.run([_cuobjdump(), flag, str(cubin)], capture_output=True, text=True,
                                    check=True).stdout for flag in ("-sass", "-res-usage"))
    # spilled registers live in the stack frame (STACK) or in local memory (LOCAL): both count
    regs, stack, shared, local = map(int, _RESOURCES.search(res).groups())
    instrs = parse_sass(sass)
    target = re.search(r"code for (sm_\w+)", sass).group(1)
    return {"target": target, "registers": regs, "spills": stack + local, "shared_bytes": shared,
            "occupancy_warps": occupancy(arch, regs, shared, spec["num_warps"]),
            "instrs": instrs, "loops": find_loops(instrs), **sass_stats(instrs)}


def _compile_job(job: tuple[str, int, str, str, tuple[int, ...], int, int]) -> dict:
    """Worker entry: (module, C, dtype, layout, shape, spec index, arch). A spec's JITFunction does not
    pickle (its function's module name now refers to the JITFunction), so the worker rebuilds the spec."""
    import torch

    module, C, dtype, layout, shape, index, arch = job
    spec = importlib.import_module(module).report_specs(C, getattr(torch, dtype), layout, shape)[index]
    return compile_spec(spec, arch)


def _rows(shape: tuple[int, ...]) -> int:
    return math.prod(shape) // shape[1]


def record(spec: dict, arch_name: str, analysis: dict, shape: tuple[int, ...], plan: dict) -> dict:
    """One report row: the compiled variant at one shape, with the static time model (sm_90a only).
    A SASS loop structure that does not match the plan's trip counts (e.g. a loop ptxas unrolled)
    gives a row with `error` set and no dynamic counts or predictions."""
    n = _rows(shape)
    warps = spec["num_warps"]
    trips = plan["loop_trips"]
    rows_pp = plan["rows_per_program"]
    rec = {"loss": spec["loss"], "kernel": spec["kernel"], "name": spec["name"], "arch": arch_name,
           "target": analysis["target"], "C": spec["C"], "dtype": spec["dtype"], "layout": spec["layout"],
           "shape": list(shape), "num_warps": warps, "num_stages": spec["num_stages"],
           **{k: analysis[k] for k in ("registers", "spills", "spill_instructions", "shared_bytes",
                                       "occupancy_warps", "sass_instructions", "global_loads",
                                       "global_stores", "mufu")},
           "loops": len(analysis["loops"]), "loop_trips": trips, "programs": plan["programs"],
           "rows_per_program": rows_pp, "bytes_per_row": plan["bytes_per_row"], "error": None,
           "global_loads_per_program": None, "warp_instructions_per_program": None,
           "warp_instructions_per_row": None,
           **{f"{k}_{g}": None for g in GPUS for k in ("predicted_us", "predicted_hbm_fraction", "bound")}}
    try:
        per_warp = weighted_count(analysis["instrs"], analysis["loops"], trips)
    except ValueError as err:
        return {**rec, "error": str(err)}
    rec.update(global_loads_per_program=warps * weighted_count(analysis["instrs"], analysis["loops"], trips,
                                                               "LDG"),
               warp_instructions_per_program=warps * per_warp,
               # per row of a full program; a merge kernel (rows_per_program 0): the launch over N rows
               warp_instructions_per_row=(warps * per_warp / rows_pp if rows_pp
                                          else plan["programs"] * warps * per_warp / n))
    if ARCHS[arch_name] != 90:  # H100 / H200 run the sm_90a code
        return rec
    for key, gpu in GPUS.items():
        hbm = n * plan["bytes_per_row"] / gpu.hbm_bytes_per_s
        per_sm = math.ceil(plan["programs"] / gpu.sms)  # programs on the busiest SM
        schedulers = min(SCHEDULERS_PER_SM, per_sm * warps)  # a warp issues on one scheduler
        issue = per_sm * warps * per_warp / (schedulers * gpu.clock_hz)
        rec[f"predicted_us_{key}"] = max(hbm, issue) * 1e6
        rec[f"predicted_hbm_fraction_{key}"] = hbm / max(hbm, issue)
        rec[f"bound_{key}"] = "HBM" if hbm >= issue else "issue"
    return rec


def _layouts(shape: tuple[int, ...], layouts: list[str]) -> list[str]:
    return ["2d"] if len(shape) == 2 else [lay for lay in layouts if lay != "2d"]


def build_report(shapes: dict[str, tuple[int, ...]], dtype: str, layouts: list[str], archs: list[str],
                 jobs: int = 2, modules: list[Any] | None = None) -> list[dict]:
    """Records for every module x (C, layout) of `shapes` x spec x arch x shape, compiled in a pool.
    Specs come from ``report_specs(C, dtype, layout, shape)``: the specialisation that runs at that
    shape (e.g. the forward's record length depends on N); a spec shared by several shapes (same
    name) is compiled once."""
    import torch

    modules = kernel_modules() if modules is None else modules
    work = []  # (spec, module, arch_name, shape, compile job)
    for mod in modules:
        for shape in shapes.values():
            for layout in _layouts(shape, layouts):
                C = shape[1]
                for i, spec in enumerate(mod.report_specs(C, getattr(torch, dtype), layout, shape)):
                    for arch in archs:
                        work.append((spec, mod, arch, shape, (mod.__name__, C, dtype, layout, shape, i,
                                                              ARCHS[arch])))
    unique = {(w[1].__name__, w[0]["name"], w[2]): w[4] for w in work}  # one compile per distinct spec
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        analyses = dict(zip(unique, pool.map(_compile_job, unique.values()), strict=True))
    records = [record(spec, arch, analyses[(mod.__name__, spec["name"], arch)], shape,
                      mod.program_plan(spec, shape)) for spec, mod, arch, shape, _ in work]
    order = {k: i for i, k in enumerate(("dist", "kd", "cwd"))}  # loss, then C, layout, kernel, arch
    return sorted(records, key=lambda r: (order.get(r["loss"], 9), r["C"], r["layout"], r["arch"],
                                          _rows(tuple(r["shape"]))))


def _fmt_ops(ops: dict) -> str:
    return " ".join(f"{n}x{op}" for op, n in ops.items()) or "-"


def format_report(records: list[dict]) -> str:
    """Markdown: per-variant SASS table (each compiled variant once, at the first shape it runs at),
    then the sm_90a predictions per shape."""
    seen, lines = set(), [
        "Static estimates (no GPU): compiled SASS, not measured.", "",
        "| loss | kernel | arch | C | dtype | layout | shape | regs | spills (B) | warps/SM | loads | stores "
        "| MUFU | warp-instr/row | bytes/row |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        key = (r["loss"], r["name"], r["arch"])
        if key in seen:
            continue
        seen.add(key)
        per_row = r["error"] or f"{r['warp_instructions_per_row']:.1f}"
        cells = [r["loss"], r["kernel"], r["target"], r["C"], r["dtype"], r["layout"],
                 "x".join(map(str, r["shape"])), r["registers"], r["spills"], r["occupancy_warps"],
                 _fmt_ops(r["global_loads"]), _fmt_ops(r["global_stores"]), sum(r["mufu"].values()), per_row,
                 f"{r['bytes_per_row']:.1f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "Predicted time = max(HBM floor, issue floor), sm_90a code (static estimate):", "",
              "| loss | kernel | shape | layout | H100 SXM us | H100 % HBM | H200 us | H200 % HBM "
              "| bound (H200) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["predicted_us_h200"] is None:
            continue
        lines.append(f"| {r['loss']} | {r['kernel']} | {'x'.join(map(str, r['shape']))} | {r['layout']} "
                     f"| {r['predicted_us_h100']:.1f} | {100 * r['predicted_hbm_fraction_h100']:.0f}% "
                     f"| {r['predicted_us_h200']:.1f} | {100 * r['predicted_hbm_fraction_h200']:.0f}% "
                     f"| {r['bound_h200']} |")
    return "\n".join(lines)


def write_readme(path: Path, text: str) -> None:
    """Replace the block between README_BEGIN and README_END of `path` with `text`."""
    doc = path.read_text()
    if README_BEGIN not in doc or README_END not in doc:
        raise ValueError(f"{path} has no {README_BEGIN} ... {README_END} block")
    head, rest = doc.split(README_BEGIN, 1)
    path.write_text(f"{head}{README_BEGIN}\n{text}\n{README_END}{rest.split(README_END, 1)[1]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(loss_bench.SHAPES), choices=list(loss_bench.SHAPES),
                    help="benchmark shapes (benchmarks/loss_bench.py SHAPES)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--layouts", nargs="+", default=["nchw", "nhwc", "2d"], choices=("nchw", "nhwc", "2d"))
    ap.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--jobs", type=int, default=2, help="compile processes")
    ap.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    ap.add_argument("--readme", action="store_true", help="write the tables into README.md's static block")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    records = build_report({n: loss_bench.SHAPES[n] for n in args.shapes}, args.dtype, args.layouts,
                           args.archs, args.jobs)
    text = format_report(records)
    print(text)
    if args.readme:
        write_readme(ROOT / "README.md", text)
    failed = [r["name"] for r in records if r["error"]]
    if failed:
        raise SystemExit(f"SASS loops do not match program_plan for: {', '.join(sorted(set(failed)))}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
