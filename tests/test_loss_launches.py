"""Device launches of one fused forward+backward (issue 11: at most 4, autograd's seed included).

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
def test_forward_backward_launches(counter, layout):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 19, 4, 6, generator=g)
    teacher = torch.randn(2, 19, 4, 6, generator=g)
    if layout == "nhwc":
        student = student.to(memory_format=torch.channels_last)
    student.requires_grad_(True)
    with counter:
        loss = fastdist.dist_loss(student, teacher, backend="triton")
        loss.backward()
    assert counter.launches == ["triton:_dist_fwd_kernel", "triton:_dist_finalize_kernel",
                                "aten.ones_like.default", "triton:_dist_bwd_kernel"], counter.launches
    assert student.grad is not None and torch.isfinite(student.grad).all()
