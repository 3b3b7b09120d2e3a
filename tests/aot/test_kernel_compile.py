"""Ahead-of-time compile of every DIST kernel variant for sm_80 and sm_90 (no GPU needed), with a
register-spill check (`ptxas -v` must report 0 bytes of spill stores and loads), plus the launchers'
error paths without a GPU. Runs WITHOUT TRITON_INTERPRET.

Coverage: C in {2, 19, 21, 150, 1024, MAX_C} (the row layout up to its largest C, each tile-geometry
regime and the limit).
- bf16/bf16: every autotune config of the heaviest variants (forward with mask, backward writing
  dS and dT) in both stride specialisations Triton makes at run time (class stride 1: row-major /
  channels-last; row stride 1: NCHW), with the divisibility-by-16 hints of aligned tensors
  (vectorised loads: the largest register use), for sm_80 and sm_90; plus the lighter flag
  variants (no mask, dS only, dT only, groups spanning images) without hints, default config, sm_90.
- fp32/fp32, fp16/fp16, bf16/fp32: the default config of the heaviest variants, channels-last,
  without hints, sm_80 and sm_90.
Compiles run in a pool of 2 processes with a private Triton cache.
"""

import os

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("tests/aot must run without TRITON_INTERPRET (the kernels are compiled ahead of time)")

import multiprocessing  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from ptxas_spills import ptxas_spills  # noqa: E402

from kernels import dist_loss as K  # noqa: E402

C_VALUES = (2, 19, K._ROW_LAYOUT_MAX_C, 150, 1024, K.MAX_C)  # row layout up to 21, tile layout above
ARCHS = (80, 90)
MAIN = ("bfloat16", "bfloat16")
OTHER = (("float32", "float32"), ("float16", "float16"), ("bfloat16", "float32"))


def _specs(C, s_name, t_name, arch):
    """What one worker job compiles (see the module docstring)."""
    s_dt, t_dt = getattr(torch, s_name), getattr(torch, t_name)
    if (s_name, t_name) != MAIN:
        return K.aot_kernel_specs(C, s_dt, t_dt, configs="default", variants="heaviest", layouts=("c1",))
    specs = K.aot_kernel_specs(C, s_dt, t_dt, configs="all", variants="heaviest", layouts=("c1", "hw1"),
                               aligned=True)
    if arch == 90:  # the lighter flag variants (no mask; dS only; dT only) once
        light = K.aot_kernel_specs(C, s_dt, t_dt, configs="default", variants="all", layouts=("c1",))
        specs += [sp for sp in light if sp["name"] not in {x["name"] for x in specs}]
    return specs


def _compile_batch(job):
    """Worker: compile specs[i] for every i of one (C, dtypes) for one arch; returns (name, error, spills)."""
    C, s_name, t_name, arch = job
    out = []
    for sp in _specs(C, s_name, t_name, arch):
        name = (f"sm_{arch} {s_name}/{t_name} {sp['name']} warps={sp['num_warps']} "
                f"stages={sp['num_stages']} maxnreg={sp['maxnreg']}")
        try:
            out.append((name, None, ptxas_spills(sp, arch)))
        except Exception as e:  # reported per kernel by the test
            out.append((name, f"{type(e).__name__}: {e}"[-4000:], None))
    return out


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("triton_cache"))
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = cache  # inherited by the spawned workers
    jobs = [(C, s, t, arch) for C in C_VALUES for (s, t) in (MAIN, *OTHER) for arch in ARCHS]
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
            results = dict(zip(jobs, pool.map(_compile_batch, jobs), strict=True))
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old
    return results


@pytest.mark.parametrize("C", C_VALUES)
@pytest.mark.parametrize("dtypes", (MAIN, *OTHER), ids=lambda d: "/".join(d))
def test_compiles_without_spills(compiled, C, dtypes):
    failures = []
    n = 0
    for arch in ARCHS:
        for name, err, spills in compiled[(C, *dtypes, arch)]:
            n += 1
            if err is not None:
                failures.append(f"{name}: {err}")
            elif any(s or lo for s, lo in spills):
                failures.append(f"{name}: spills {spills}")
    assert n == sum(len(_specs(C, *dtypes, arch)) for arch in ARCHS)
    assert not failures, "\n".join(failures)


def test_every_autotune_config_is_covered():
    for C in C_VALUES:
        specs = _specs(C, *MAIN, 80)
        fwd = {(s["constexprs"]["CHUNKS_PER_PROGRAM"], s["num_stages"])
               for s in specs if s["kernel"] == "fwd"}
        bwd = {(s["constexprs"]["GROUPS_PER_PROGRAM"], s["num_stages"])
               for s in specs if s["kernel"] == "bwd"}
        assert fwd == {(c["CHUNKS_PER_PROGRAM"], c["num_stages"]) for c in K._fwd_configs(K.tile_params(C))}
        assert bwd == {(c["GROUPS_PER_PROGRAM"], c["num_stages"]) for c in K.BWD_CONFIGS}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cpu_tensors_without_interpreter_raise():
    S, T = torch.randn(10, 19), torch.randn(10, 19)
    with pytest.raises(RuntimeError, match="torch backend.*TRITON_INTERPRET=1"):
        K.dist_forward_stats(S, T, 1.0, None)
    cc, rc, go = torch.zeros(5, 19), torch.zeros(1), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match="torch backend"):
        K.dist_backward(S, T, 1.0, None, cc, rc, go, True, False)


def test_too_many_classes_is_a_value_error():
    with pytest.raises(ValueError, match=f"at most C={K.MAX_C}"):
        K.dist_forward_stats(torch.randn(4, K.MAX_C + 1), torch.randn(4, K.MAX_C + 1), 1.0, None)
    # the largest supported C has a valid tile geometry
    tp = K.tile_params(K.MAX_C)
    assert tp["GROUP_ROWS"] * tp["BLOCK_C"] // (32 * tp["num_warps"]) <= 4
