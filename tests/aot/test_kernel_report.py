"""benchmarks/kernel_report.py (static roofline): the SASS loop weighting on a hand-counted listing, a
tiny kernel compiled for sm_90a, the report on the DIST kernels at one small shape (sm_90a, NCHW), and the
static targets of the DIST kernels (C=19, bf16).
Runs WITHOUT TRITON_INTERPRET (the kernels are compiled ahead of time)."""

import os

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("tests/aot must run without TRITON_INTERPRET (the kernels are compiled ahead of time)")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import kernel_report as R  # noqa: E402

from kernels import dist_loss as K  # noqa: E402

# Two nested loops (outer 0x10-0x60 closed by a uniform-predicate branch, inner 0x20-0x40), a forward
# branch, the trap after EXIT and padding.
_SASS = """
        code for sm_90a
        /*0000*/                   MOV R1, c[0x0][0x28] ;         /* 0x0 */
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;   /* 0x0 */
        /*0020*/                   FADD R3, R3, R2 ;              /* 0x0 */
        /*0030*/                   MUFU.EX2 R3, R3 ;              /* 0x0 */
        /*0040*/               @P0 BRA 0x20 ;                     /* 0x0 */
        /*0050*/              @!P1 BRA 0x70 ;                     /* 0x0 */
        /*0060*/                   BRA.U !UP0, 0x10 ;             /* 0x0 */
        /*0070*/                   STG.E desc[UR4][R6.64], R3 ;   /* 0x0 */
        /*0080*/                   EXIT ;                         /* 0x0 */
        /*0090*/                   BRA 0x90;                      /* 0x0 */
        /*00a0*/                   NOP;                           /* 0x0 */
"""


def test_weighting_hand_counted():
    instrs = R.parse_sass(_SASS)
    assert [a for a, _ in instrs] == list(range(0, 0x90, 0x10))  # the trap and the padding are dropped
    loops = R.find_loops(instrs)
    assert loops == [(0x10, 0x60), (0x20, 0x40)]  # outer first
    # outer 3 trips, inner 5: 1 + 3 * (1 + 5 * 3 + 2) + 2 = 57 instructions per warp
    assert R.weighted_count(instrs, loops, [3, 5]) == 57
    assert R.weighted_count(instrs, loops, [3, 5], "LDG") == 3
    assert R.weighted_count(instrs, loops, [3, 5], "MUFU") == 15
    assert R.sass_stats(instrs)["global_stores"] == {"STG.E": 1}
    with pytest.raises(ValueError, match="2 loops"):
        R.weighted_count(instrs, loops, [3])


@triton.jit
def _tiny_kernel(
    x_ptr,  # fp32 input, n_iter * BLOCK elements
    y_ptr,  # fp32 output, BLOCK elements
    n_iter,  # loop trip count
    BLOCK: tl.constexpr,  # elements per iteration (one per thread)
):
    offs = tl.arange(0, BLOCK)  # [BLOCK]
    acc = tl.zeros([BLOCK], dtype=tl.float32)  # [BLOCK]
    for i in range(n_iter):
        acc += tl.load(x_ptr + i * BLOCK + offs)
    tl.store(y_ptr + offs, acc)


def test_tiny_kernel_sm90a():
    spec = {"fn": _tiny_kernel, "signature": {"x_ptr": "*fp32", "y_ptr": "*fp32", "n_iter": "i32",
                                              "BLOCK": "constexpr"},
            "constexprs": {"BLOCK": 32}, "attrs": {}, "num_warps": 1, "num_stages": 1, "maxnreg": None}
    a = R.compile_spec(spec, 90)
    assert a["target"] == "sm_90a"  # capability 90 compiles the architecture-specific target
    assert a["spills"] == 0 and a["spill_instructions"] == 0 and 0 < a["registers"] <= 255
    assert a["global_stores"] == {"STG.E": 1}  # one fp32 per thread, after the loop
    assert a["occupancy_warps"] == 32  # 1-warp blocks: the 32-blocks-per-SM limit binds
    # ptxas unrolls this small runtime-trip loop by 4 (a main and a remainder loop): the report's loop
    # check refuses to weight it with the single trip count of the source loop
    assert len(a["loops"]) == 2
    with pytest.raises(ValueError, match="2 loops, program_plan lists 1"):
        R.weighted_count(a["instrs"], a["loops"], [8])
    spec.update(loss="test", kernel="tiny", name="tiny", C=32, dtype="float32", layout="2d")
    plan = {"programs": 1, "rows_per_program": 32, "loop_trips": [8], "bytes_per_row": 4.0}
    rec = R.record(spec, "sm_90a", a, (32, 32), plan)
    assert rec["error"].startswith("SASS has 2 loops")
    assert rec["warp_instructions_per_row"] is None and rec["predicted_hbm_fraction_h200"] is None


def test_dist_report_small():
    shape = (2, 19, 64, 128)
    recs = R.build_report({"recipe-b2": shape}, "bfloat16", ["nchw"], ["sm_90a"], jobs=1, modules=[K])
    assert [r["kernel"] for r in recs] == [sp["kernel"] for sp in K.report_specs(19, torch.bfloat16, "nchw")]
    n = 2 * 64 * 128
    for r in recs:
        assert {"kernel", "arch", "C", "dtype", "layout", "registers", "spills", "warp_instructions_per_row",
                "bytes_per_row", "predicted_hbm_fraction_h200"} <= set(r)
        assert (r["arch"], r["target"], r["C"], r["dtype"], r["layout"]) == ("sm_90a", "sm_90a", 19,
                                                                             "bfloat16", "nchw")
        assert r["spills"] == 0 and r["spill_instructions"] == 0
        assert r["loops"] == len(r["loop_trips"])
        assert r["warp_instructions_per_row"] > 0
        assert r["error"] is None
        rows = r["rows_per_program"] or n / r["programs"]  # 0: a merge kernel, counted over the launch
        assert r["warp_instructions_per_row"] * rows == pytest.approx(r["warp_instructions_per_program"])
        assert 0 < r["predicted_hbm_fraction_h200"] <= 1
        # the same issue rate with less bandwidth: never faster on H100
        assert r["predicted_us_h100"] >= r["predicted_us_h200"]
    fwd, bwd = (next(r for r in recs if r["kernel"] == k) for k in ("fwd", "bwd"))
    assert fwd["bytes_per_row"] >= 2 * 19 * 2 and bwd["bytes_per_row"] >= 3 * 19 * 2  # S, T (and dS), bf16
    merge = K.report_specs(19, torch.bfloat16, "nchw")[0]["constexprs"]["MERGE_GROUPS"]
    assert merge == K._merge_groups(n, K.tile_params(19)) < K.tile_params(19)["MERGE_GROUPS"]  # short records
    assert fwd["loop_trips"] == ([merge] if merge > 1 else [])  # MERGE_GROUPS row groups per record
    assert fwd["global_loads_per_program"] >= 2 * fwd["num_warps"] * merge  # S and T loaded in each trip


def test_write_readme_replaces_only_the_block(tmp_path: Path):
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{R.README_BEGIN}\nold\n{R.README_END}\ntail\n")
    R.write_readme(readme, "new table")
    assert readme.read_text() == f"head\n{R.README_BEGIN}\nnew table\n{R.README_END}\ntail\n"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="static-estimate:begin"):
        R.write_readme(readme, "x")


# The static targets of the fused DIST kernels (C=19 bf16, no mask, sm_90a, H200): backward >= 80% of
# HBM bandwidth, forward >= 60% at the full-resolution shape (records of 2048 rows; at the recipe's
# 16k-64k rows the forward's once-per-record reduction across threads dominates and it is launch-
# latency bound anyway), finalize under 5 us at 16k rows, no spill anywhere.
_STATIC_TARGETS = {"fwd": 0.60, "bwd": 0.80}


def test_dist_static_targets():
    shapes = {"recipe-b2": (2, 19, 64, 128), "fullres-b2": (2, 19, 512, 1024)}
    recs = R.build_report(shapes, "bfloat16", ["nchw", "nhwc"], ["sm_90a"], jobs=2, modules=[K])
    kernels, layouts = ("fwd", "finalize", "bwd"), ("nchw", "nhwc")
    assert {(r["kernel"], r["layout"], tuple(r["shape"])) for r in recs} == {
        (k, lay, sh) for k in kernels for lay in layouts for sh in shapes.values()}
    for r in recs:
        assert r["error"] is None and r["spills"] == 0 and r["spill_instructions"] == 0, r["name"]
        if r["kernel"] == "finalize" and r["shape"] == [2, 19, 64, 128]:
            assert r["predicted_us_h200"] < 5.0, r
        if r["kernel"] == "bwd" or (r["kernel"] == "fwd" and r["shape"] == [2, 19, 512, 1024]):
            assert r["predicted_hbm_fraction_h200"] >= _STATIC_TARGETS[r["kernel"]], (
                r["name"], r["shape"], r["predicted_hbm_fraction_h200"])
