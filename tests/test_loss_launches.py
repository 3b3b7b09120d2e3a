"""Device launches of one fused forward+backward (at most 4, autograd's seed included).

Counted on CPU under the Triton interpreter: every Triton kernel launch, plus every ATen op that would
launch a device kernel (a TorchDispatchMode sees each op below autograd; allocations and views do not
launch). ATen ops the interpreter itself runs to emulate a Triton launch are not counted.
"""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported", allow_module_level=True)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fastdist  # noqa: E402

aten = torch.ops.aten
# ops that allocate, alias or only read metadata: no device kernel
_NO_LAUNCH = {
    aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.empty_like.default, aten.view.default, aten._unsafe_view.default,
    aten.as_strided.default, aten.detach.default, aten.alias.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.unsqueeze.default, aten.squeeze.dim, aten.lift_fresh.default,
}
_MAYBE_NO_OP = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.contiguous.default}
_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class LaunchCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.launches: list[str] = []
        self.in_triton = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastdist":  # a custom op: run its CPU kernel with the mode on, to count
            with self:  # what it launches (the mode is popped while this method runs)
                return func.redispatch(_CPU, *args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        # aten.to / contiguous return their input unchanged (no kernel) when nothing is to be done
        no_op = func in _MAYBE_NO_OP and out is args[0]
        if not self.in_triton and func not in _NO_LAUNCH and not no_op:
            self.launches.append(str(func))
        return out


@pytest.fixture
def counter(monkeypatch):
    mode = LaunchCounter()
    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        mode.launches.append(f"triton:{self.fn.__name__}")
        mode.in_triton = True
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.in_triton = False

    monkeypatch.setattr(InterpretedFunction, "run", counted_run)
    return mode


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("C, fwd_kernel", [(19, "_dist_fwd_kernel"), (150, "_dist_fwd_kernel")])
def test_forward_backward_launches(counter, layout, C, fwd_kernel):
    # C <= 32: the row-layout statistics kernel; larger C: the tile-layout one (same launch count)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, C, 4, 6, generator=g)
    teacher = torch.randn(2, C, 4, 6, generator=g)
    if layout == "nhwc":
        student = student.to(memory_format=torch.channels_last)
    student.requires_grad_(True)
    with counter:
        loss = fastdist.dist_loss(student, teacher, backend="triton")
        loss.backward()
    assert counter.launches == [f"triton:{fwd_kernel}", "triton:_dist_finalize_kernel",
                                "aten.ones_like.default", "triton:_dist_bwd_kernel"], counter.launches
    assert student.grad is not None and torch.isfinite(student.grad).all()


# keyword arguments of a launch that are launch options, not constexprs of the kernel
_LAUNCH_OPTIONS = ("grid", "warmup", "num_warps", "num_stages", "maxnreg")


def _runtime_spec(fn, args: tuple, kwargs: dict) -> tuple[dict, list[int]]:
    """Signature and divisibility-hinted argument indices Triton's JIT derives for one launch."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, hinted = {}, []
    for i, name in enumerate(fn.arg_names):
        if name in kwargs:  # a constexpr passed by keyword
            signature[name] = "constexpr"
            continue
        ty, key = native_specialize_impl(BaseBackend, args[i], False, True, True)
        signature[name] = ty
        if key == "D":
            hinted.append(i)
    return signature, hinted


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "2d"])
def test_compile_specs_match_runtime_specialisation(monkeypatch, layout):
    """The specs tests/aot and the static report compile are what the launchers JIT: same signature
    (int 1 -> constexpr), same constexprs, same divisibility-16 hints, for each kernel of one
    default forward+backward."""
    from kernels import dist_loss as K

    launches = []
    run = InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        launches.append((self.fn, args, kwargs))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    shape = (128, 19) if layout == "2d" else (2, 19, 4, 16)  # HW = 64, N = 128: one record (R = 1)
    s = torch.randn(*shape, dtype=torch.bfloat16)
    t = torch.randn(*shape, dtype=torch.bfloat16)
    if layout == "nhwc":
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    s.requires_grad_(True)
    fastdist.dist_loss(s, t, backend="triton").backward()
    one = K._one_image(128, 128 if layout == "2d" else 64, K.tile_params(19)["GROUP_ROWS"])
    expected = [K._fwd_spec(19, s.dtype, t.dtype, layout, shape, False, one, K._FWD_DEFAULT, True),
                K._finalize_spec(19, s.dtype, layout, shape, True, torch.float32, True),
                K._bwd_spec(19, s.dtype, t.dtype, layout, shape, False, True, False, one, K._BWD_DEFAULT,
                            True)]
    assert [fn.__name__ for fn, _, _ in launches] == [sp["fn"].fn.__name__ for sp in expected]
    for (_, args, kwargs), spec in zip(launches, expected, strict=True):
        signature, hinted = _runtime_spec(spec["fn"], args, kwargs)
        assert signature == spec["signature"], spec["name"]
        assert sorted(i for (i,) in spec["attrs"]) == hinted, spec["name"]
        runtime_const = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
        ones = {name: 1 for name, ty in signature.items() if ty == "constexpr" and name not in kwargs}
        assert spec["constexprs"] == {**runtime_const, **ones}, spec["name"]
        assert (kwargs.get("num_warps"), kwargs.get("num_stages", 3), kwargs.get("maxnreg")) == \
            (spec["num_warps"], spec["num_stages"], spec["maxnreg"]), spec["name"]


class OpCounter(TorchDispatchMode):
    """Every ATen op one call issues below autograd, allocations and views included: each one is a
    dispatcher call, the unit of host time per call on a GPU (what the front-end costs the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _no_kernels(monkeypatch):
    """Triton launches as no-ops: only the host-side ops are left to count (the outputs are garbage)."""
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, **kwargs: None)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "2d"])
def test_aten_ops_per_call(monkeypatch, layout):
    """One eager triton forward+backward issues exactly: the 5 output / record allocations of the
    forward (records, loss, col_coef, row_coef), autograd's seed and the gradient allocation. A new
    cast, view, copy, constant tensor or check that dispatches fails this test (CPU count, no timing)."""
    shape = (24, 19) if layout == "2d" else (2, 19, 3, 4)
    s, t = torch.randn(shape), torch.randn(shape)
    if layout == "nhwc":
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    s.requires_grad_(True)
    _no_kernels(monkeypatch)
    torch.autograd.grad(fastdist.dist_loss(s, t, backend="triton"), s)  # first call: caches filled
    counter = OpCounter()
    with counter:
        torch.autograd.grad(fastdist.dist_loss(s, t, backend="triton"), s)
    assert sorted(counter.ops) == sorted(["aten.empty.memory_format"] * 5 + [
        "aten.ones_like.default", "aten.empty_like.default"]), counter.ops


@pytest.mark.parametrize("loss, budget", [("dist_mask", 12), ("kd", 10), ("cwd", 8)])
def test_aten_ops_per_call_budget(monkeypatch, loss, budget):
    """Upper bounds for the masked DIST, KD and CWD front-ends (measured: 12, 10, 8 on torch 2.13)."""
    s, t = torch.randn(2, 19, 3, 4), torch.randn(2, 19, 3, 4)
    s.requires_grad_(True)
    mask = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    call = {"dist_mask": lambda: fastdist.dist_loss(s, t, backend="triton", mask=mask),
            "kd": lambda: fastdist.kd_loss(s, t, backend="triton"),
            "cwd": lambda: fastdist.cwd_loss(s, t, backend="triton")}[loss]
    _no_kernels(monkeypatch)
    torch.autograd.grad(call(), s)
    counter = OpCounter()
    with counter:
        torch.autograd.grad(call(), s)
    assert not any(op.startswith("fastdist.") for op in counter.ops), "eager calls skip the custom op"
    assert len(counter.ops) <= budget, counter.ops


@pytest.mark.parametrize("masked", [False, True])
def test_eager_path_equals_custom_op(masked):
    """The eager autograd.Function and the custom op (what torch.compile traces) run the same kernels:
    bitwise identical loss and student / teacher gradients."""
    from fastdist.loss import ops

    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 7, 4, 5, generator=g, requires_grad=True)
    t = torch.randn(2, 7, 4, 5, generator=g, requires_grad=True)
    mask = torch.rand(40, generator=g) < 0.6 if masked else None
    eager = ops.dist_loss(s, t, mask, 2.0, 1.0, 0.5, "triton", False, "")
    assert eager.grad_fn is not None and "EagerDistLoss" in type(eager.grad_fn).__name__
    via_op = ops.dist_loss_fwd(s, t, mask, 2.0, 1.0, 0.5, "triton", False, "")[0]
    grads_eager = torch.autograd.grad(3.0 * eager, (s, t))
    grads_op = torch.autograd.grad(3.0 * via_op, (s, t))
    assert torch.equal(eager, via_op)
    for a, b in zip(grads_eager, grads_op, strict=True):
        assert torch.equal(a, b)


def test_fake_tensors_take_the_custom_op():
    """Under FakeTensorMode (torch.compile / export tracing) the front-end calls the custom op (its
    fake kernel), never a Triton launch on fake data."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        s = torch.empty(2, 19, 3, 4, requires_grad=True)
        t = torch.empty(2, 19, 3, 4)
        loss = fastdist.dist_loss(s, t, backend="triton")
        kd = fastdist.kd_loss(s, t, backend="triton")
    assert loss.shape == () and loss.dtype == torch.float32 and kd.shape == ()
