"""The custom-op form shared by the losses whose gradient is local (KD per pixel row, CWD per plane).

One forward evaluation gives the loss *and* the grad_out = 1 gradients (``torch`` backend: PyTorch ops;
``triton``: one kernel launch). The op saves those gradients; its autograd backward multiplies them by
grad_out. ``register_fake`` makes ``torch.compile(fullgraph=True)`` trace through without a graph break.
``fastdist::<name>(student, teacher, mask, tau, backend, need_s, need_t) -> (loss, dS | (0,), dT | (0,))``.
In eager mode (``ops.eager_ok``) :func:`run` calls the same body through a plain
``torch.autograd.Function`` instead, skipping the custom op's per-call dispatch.
"""

import functools
import importlib
import os
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from . import api, ops
from .stats import output_dtype

# (student, teacher, tau, mask, need_s, need_t) -> (loss, dS | None, dT | None)
Impl = Callable[[Tensor, Tensor, float, Tensor | None, bool, bool], tuple[Tensor, ...]]


@functools.cache
def _triton_kernels(name: str, device_type: str) -> object:
    """``kernels.<name>`` (lazily: triton is optional), after checking that it can run on ``device_type``
    (cached; an error is raised again on every call)."""
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter (set TRITON_INTERPRET=1 before "
            "triton is imported); use backend='torch' or 'auto' for CPU tensors"
        )
    return importlib.import_module(f"kernels.{name}")


def _or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    """A custom op cannot return None: an empty (0,) tensor stands for "not computed"."""
    return like.new_empty(0) if grad is None else grad


class LocalLoss(NamedTuple):
    """A local-gradient loss in its two forms: the custom op (traced by ``torch.compile``) and the
    eager ``torch.autograd.Function`` (``apply(student, teacher, mask, tau, backend, need_s, need_t)
    -> loss``)."""

    op: Callable[..., tuple]
    eager: type[torch.autograd.Function]


def local_loss_op(name: str, torch_impl: Impl, kernel_module: str, kernel_fn: str) -> LocalLoss:
    """Register ``fastdist::<name>`` running ``torch_impl`` or ``kernels.<kernel_module>.<kernel_fn>``,
    and the eager form of the same body."""

    def evaluate(student: Tensor, teacher: Tensor, mask: Tensor | None, tau: float, backend: str,
                 need_s: bool, need_t: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if backend == "torch":
            impl = torch_impl
        else:
            impl = getattr(_triton_kernels(kernel_module, student.device.type), kernel_fn)
        loss, ds, dt = impl(student, teacher, tau, mask, need_s, need_t)
        return loss.to(output_dtype(student, teacher)), ds, dt

    def forward(student: Tensor, teacher: Tensor, mask: Tensor | None, tau: float, backend: str,
                need_s: bool, need_t: bool) -> tuple[Tensor, Tensor, Tensor]:
        loss, ds, dt = evaluate(student, teacher, mask, tau, backend, need_s, need_t)
        return loss, _or_empty(ds, student), _or_empty(dt, teacher)

    def fake(student: Tensor, teacher: Tensor, mask: Tensor | None, tau: float, backend: str,
             need_s: bool, need_t: bool) -> tuple[Tensor, Tensor, Tensor]:
        return (student.new_empty((), dtype=output_dtype(student, teacher)),
                torch.empty_like(student) if need_s else student.new_empty(0),
                torch.empty_like(teacher) if need_t else teacher.new_empty(0))

    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
        ctx.save_for_backward(output[1], output[2])

    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor, *_unused: Tensor) -> tuple:
        ds, dt = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        return _scaled(ds, grad_loss, need_s), _scaled(dt, grad_loss, need_t), None, None, None, None, None

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx: torch.autograd.function.FunctionCtx, student: Tensor, teacher: Tensor,
                    mask: Tensor | None, tau: float, backend: str, need_s: bool, need_t: bool) -> Tensor:
            # need_s / need_t from the caller: ctx.needs_input_grad ignores torch.no_grad()
            loss, ds, dt = evaluate(student, teacher, mask, tau, backend, need_s, need_t)
            ctx.save_for_backward(ds, dt)
            return loss

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple:
            ds, dt = ctx.saved_tensors
            return _scaled(ds, grad_loss, True), _scaled(dt, grad_loss, True), None, None, None, None, None

    op = torch.library.custom_op(f"fastdist::{name}", forward, mutates_args=())
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup_context)
    Eager.__name__ = Eager.__qualname__ = f"Eager_{name}"
    return LocalLoss(op, Eager)


def _scaled(grad: Tensor | None, grad_loss: Tensor, needed: bool) -> Tensor | None:
    """grad_out * (the saved grad_out = 1 gradient), or None when not needed / not computed."""
    if grad is None or not needed:
        return None
    return grad * (grad_loss if grad.dtype == grad_loss.dtype else grad_loss.to(grad.dtype))


def run(loss_fn: LocalLoss, reference: Callable[..., Tensor], student: Tensor, teacher: Tensor,
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
    student, teacher = api._dense(student), api._dense(teacher)
    grad_on = torch.is_grad_enabled()
    need_s, need_t = grad_on and student.requires_grad, grad_on and teacher.requires_grad
    if ops.eager_ok(student, teacher, mask):
        return loss_fn.eager.apply(student, teacher, mask, float(tau), backend, need_s, need_t)
    loss, _, _ = loss_fn.op(student, teacher, mask, float(tau), backend, need_s, need_t)
    return loss
