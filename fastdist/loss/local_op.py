"""The custom-op form shared by the losses whose gradient is local (KD per pixel row, CWD per plane).

One forward evaluation gives the loss *and* the grad_out = 1 gradients (``torch`` backend: PyTorch ops;
``triton``: one kernel launch). The op saves those gradients; its autograd backward multiplies them by
grad_out. ``register_fake`` makes ``torch.compile(fullgraph=True)`` trace through without a graph break.
``fastdist::<name>(student, teacher, mask, tau, backend, need_s, need_t) -> (loss, dS | (0,), dT | (0,))``.
"""

import importlib
import os
from collections.abc import Callable

import torch
from torch import Tensor

from . import api
from .stats import output_dtype

# (student, teacher, tau, mask, need_s, need_t) -> (loss, dS | None, dT | None)
Impl = Callable[[Tensor, Tensor, float, Tensor | None, bool, bool], tuple[Tensor, ...]]


def _triton_kernels(name: str, device: torch.device) -> object:
    """``kernels.<name>`` (lazily: triton is optional), after checking that it can run on ``device``."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter (set TRITON_INTERPRET=1 before "
            "triton is imported); use backend='torch' or 'auto' for CPU tensors"
        )
    return importlib.import_module(f"kernels.{name}")


def _or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    """A custom op cannot return None: an empty (0,) tensor stands for "not computed"."""
    return like.new_empty(0) if grad is None else grad


def local_loss_op(name: str, torch_impl: Impl, kernel_module: str, kernel_fn: str) -> Callable[..., tuple]:
    """Register ``fastdist::<name>`` running ``torch_impl`` or ``kernels.<kernel_module>.<kernel_fn>``."""

    def forward(student: Tensor, teacher: Tensor, mask: Tensor | None, tau: float, backend: str,
                need_s: bool, need_t: bool) -> tuple[Tensor, Tensor, Tensor]:
        if backend == "torch":
            impl = torch_impl
        else:
            impl = getattr(_triton_kernels(kernel_module, student.device), kernel_fn)
        loss, ds, dt = impl(student, teacher, tau, mask, need_s, need_t)
        return loss.to(output_dtype(student, teacher)), _or_empty(ds, student), _or_empty(dt, teacher)

    def fake(student: Tensor, teacher: Tensor, mask: Tensor | None, tau: float, backend: str,
             need_s: bool, need_t: bool) -> tuple[Tensor, Tensor, Tensor]:
        return (student.new_empty((), dtype=output_dtype(student, teacher)),
                torch.empty_like(student) if need_s else student.new_empty(0),
                torch.empty_like(teacher) if need_t else teacher.new_empty(0))

    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        ctx.save_for_backward(output[1], output[2])

    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *_unused: Tensor) -> tuple:
        ds, dt = ctx.saved_tensors
        d_s = ds * grad_loss.to(ds.dtype) if ctx.needs_input_grad[0] else None
        d_t = dt * grad_loss.to(dt.dtype) if ctx.needs_input_grad[1] else None
        return d_s, d_t, None, None, None, None, None

    op = torch.library.custom_op(f"fastdist::{name}", forward, mutates_args=())
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)
    return op


def run(op: Callable[..., tuple], reference: Callable[..., Tensor], student: Tensor, teacher: Tensor,
        tau: float, mask: Tensor | None, backend: str,
        check: Callable[[Tensor], None] | None = None) -> Tensor:
    """Validate as ``dist_loss`` does (plus ``check``), resolve the backend and evaluate the loss."""
    api.check_hyperparams(backend=backend, tau=tau)
    api._check_inputs(student, teacher)
    if check is not None:
        check(student)
    if mask is not None:
        mask = api._check_mask(mask, student)
    backend = api._resolve_backend(backend, student, teacher)
    if backend == "reference":
        return reference(student, teacher, tau, mask)
    if backend == "triton" and torch.float64 in (student.dtype, teacher.dtype):
        raise ValueError("backend='triton' supports float32, float16 and bfloat16 inputs, not float64")
    grad_on = torch.is_grad_enabled()
    need_s, need_t = grad_on and student.requires_grad, grad_on and teacher.requires_grad
    loss, _, _ = op(api._dense(student), api._dense(teacher), mask, float(tau), backend, need_s, need_t)
    return loss
