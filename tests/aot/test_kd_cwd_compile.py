"""Ahead-of-time compile of the KD and CWD kernels for sm_80 and sm_90 (no GPU needed) with a register
spill check (``ptxas -v`` must report 0 bytes of spill stores and loads). Runs WITHOUT TRITON_INTERPRET.

Coverage: every variant the launchers JIT (mask on/off; no gradient, dS, dT, both; NCHW and
channels-last strides, divisibility-by-16 hints of aligned allocations), bf16 logits, for
KD: C in {2, 19, 1024, MAX_C} (each num_warps regime and the limit) and CWD: planes of 21 (small),
8192 (the recipe's 64 x 128, the largest one-pass plane) and 8193 (two-pass fallback) positions;
plus the heaviest variant (mask, dS and dT) for fp32 and fp16 logits.
"""

import os

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("tests/aot must run without TRITON_INTERPRET (the kernels are compiled ahead of time)")


import pytest  # noqa: E402
import torch  # noqa: E402
from ptxas_spills import ptxas_spills  # noqa: E402

from kernels import cwd_loss, kd_loss  # noqa: E402

ARCHS = (80, 90)


def _heaviest(specs: list[dict]) -> list[dict]:
    return [sp for sp in specs if all(sp["constexprs"][k] for k in ("HAS_MASK", "NEED_S", "NEED_T"))]


def _kd_specs() -> list[dict]:
    specs = [sp for C in (2, 19, 1024, kd_loss.MAX_C) for sp in kd_loss.aot_kernel_specs(C, torch.bfloat16)]
    for dt in (torch.float32, torch.float16):
        specs += _heaviest(kd_loss.aot_kernel_specs(19, dt))
    return specs


def _cwd_specs() -> list[dict]:
    specs = [sp for P in (21, 8192, 8193) for sp in cwd_loss.aot_kernel_specs(P, torch.bfloat16)]
    for dt in (torch.float32, torch.float16):
        specs += _heaviest(cwd_loss.aot_kernel_specs(8192, dt))
    return specs


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("specs", (_kd_specs, _cwd_specs), ids=("kd", "cwd"))
def test_compiles_without_spills(tmp_path, monkeypatch, specs, arch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    failures = []
    for sp in specs():
        spills = ptxas_spills(sp, arch)
        if any(s or lo for s, lo in spills):
            failures.append(f"sm_{arch} {sp['name']} {sp['dtype']}: spills {spills}")
    assert not failures, "\n".join(failures)


def test_specs_follow_the_report_contract():
    for mod, C in ((kd_loss, 19), (cwd_loss, 19)):
        for layout in ("nchw", "nhwc"):
            (sp,) = mod.report_specs(C, torch.bfloat16, layout)
            assert {"name", "fn", "signature", "constexprs", "attrs", "num_warps", "num_stages", "maxnreg",
                    "loss", "kernel", "layout", "C", "dtype"} <= set(sp)
            assert (sp["layout"], sp["C"], sp["dtype"]) == (layout, C, "bfloat16")
            plan = mod.program_plan(sp, (8, C, 64, 128))
            assert plan["programs"] > 0 and plan["bytes_per_row"] == 2 * 3 * C  # read S, T; write dS
    # KD: 4 tiles of GROUP_ROWS rows per program; CWD: one program per (b, c) plane, one pass
    kd_sp = kd_loss.report_specs(19, torch.bfloat16, "nchw")[0]
    assert kd_loss.program_plan(kd_sp, (8, 19, 64, 128))["programs"] == -(-8 * 64 * 128 // (4 * 16))
    cwd_sp = cwd_loss.report_specs(19, torch.bfloat16, "nchw")[0]
    assert cwd_loss.program_plan(cwd_sp, (8, 19, 64, 128))["programs"] == 8 * 19
    assert cwd_loss.program_plan(cwd_sp, (8, 19, 64, 128))["loop_trips"] == []
    assert kd_loss.report_specs(19, torch.bfloat16, "2d")[0]["layout"] == "2d"
    assert cwd_loss.report_specs(19, torch.bfloat16, "2d") == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cpu_tensors_without_interpreter_raise():
    import fastdist

    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    for fn in (fastdist.kd_loss, fastdist.cwd_loss):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            fn(s, t, backend="triton")
