"""``torch.library`` custom ops of the fused DIST loss (``torch`` and ``triton`` backends).

``fastdist::dist_loss_fwd(student, teacher, mask, tau, beta, gamma, backend, intra_sync, group)``
  -> ``(loss, col_coef, row_coef)``: the backend's statistics, optionally merged over the ranks of
  ``group`` (a :func:`fastdist.loss.sync.group_key`), then :func:`fastdist.loss.stats.coefficients`.
``fastdist::dist_loss_bwd(student, teacher, mask, col_coef, row_coef, grad_out, tau, backend,
  need_student, need_teacher)`` -> ``(d_student, d_teacher)`` (an empty (0,) tensor when not needed).

The forward op carries ``register_autograd`` (saving only the inputs and the O(C) coefficients) and
both carry ``register_fake``, so ``torch.compile(fullgraph=True)`` traces through them without a
graph break. In eager mode :func:`dist_loss` runs the same bodies through ``_EagerDistLoss``, a plain
``torch.autograd.Function``: a custom op call crosses the dispatcher into Python twice per op
(autograd key, then the backend kernel) plus schema default filling and alias checks, the largest
part of the host time of a small forward+backward (CPU profile in docs/design.md).
"""

import functools
import os
from types import ModuleType

import torch
from torch import Tensor

from . import stats, sync, torch_backend


@functools.cache
def _backend_module(backend: str, device_type: str) -> ModuleType:
    """The launcher module (``dist_forward_stats`` / ``dist_backward``) of a fused backend (cached per
    (backend, device type): an error is raised again on every call, since lru_cache keeps no exception)."""
    if backend == "torch":
        return torch_backend
    if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' on CPU tensors needs the Triton interpreter (set TRITON_INTERPRET=1 before "
            "triton is imported); use backend='torch' or 'auto' for CPU tensors"
        )
    from kernels import dist_loss

    return dist_loss


def _forward(
    student: Tensor, teacher: Tensor, mask: Tensor | None, tau: float, beta: float, gamma: float,
    backend: str, intra_sync: bool, group: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss (0-d), col_coef (5, C), row_coef (1,) of the fused backends (the body of both forms)."""
    module = _backend_module(backend, student.device.type)
    dtype = stats.output_dtype(student, teacher)
    if backend == "triton":
        return _triton_forward(module, student, teacher, mask, tau, beta, gamma, intra_sync, group, dtype)
    row_stats, col_stats = module.dist_forward_stats(student, teacher, tau, mask)
    world = 1
    if intra_sync:
        row_stats, col_stats, world = sync.all_gather_merge(row_stats, col_stats, group)
    loss, col_coef, row_coef = stats.coefficients(row_stats, col_stats, beta, gamma, tau, world, dtype)
    return loss.to(dtype), col_coef, row_coef


def _triton_forward(
    module: ModuleType, student: Tensor, teacher: Tensor, mask: Tensor | None, tau: float, beta: float,
    gamma: float, intra_sync: bool, group: str, dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics kernel, then the finalize kernel writing loss and coefficients (two launches, no
    torch op between). With ``intra_sync`` the per-rank records are first merged into one (one more
    launch) and all-gathered: the finalize then merges the W rank records in rank order."""
    row_rec, col_rec = module.dist_forward_records(student, teacher, tau, mask, eps=stats.EPS)
    world = 1
    if intra_sync:
        row_stats, col_stats = module.dist_merge_records(row_rec, col_rec)
        row_rec, col_rec, world = sync.all_gather_records(row_stats, col_stats, group)
    return module.dist_finalize(row_rec, col_rec, beta, gamma, tau, world, stats.EPS, dtype)


@torch.library.custom_op("fastdist::dist_loss_fwd", mutates_args=())
def dist_loss_fwd(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    tau: float,
    beta: float,
    gamma: float,
    backend: str,
    intra_sync: bool,
    group: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss (0-d), col_coef (5, C), row_coef (1,) of the fused backends."""
    return _forward(student, teacher, mask, tau, beta, gamma, backend, intra_sync, group)


@dist_loss_fwd.register_fake
def _fwd_fake(student: Tensor, teacher: Tensor, *_args: object) -> tuple[Tensor, Tensor, Tensor]:
    dtype = stats.output_dtype(student, teacher)
    return (
        student.new_empty((), dtype=dtype),
        student.new_empty((5, student.shape[1]), dtype=dtype),
        student.new_empty((1,), dtype=dtype),
    )


@torch.library.custom_op("fastdist::dist_loss_bwd", mutates_args=())
def dist_loss_bwd(
    student: Tensor,
    teacher: Tensor,
    mask: Tensor | None,
    col_coef: Tensor,
    row_coef: Tensor,
    grad_out: Tensor,
    tau: float,
    backend: str,
    need_student: bool,
    need_teacher: bool,
) -> tuple[Tensor, Tensor]:
    """Closed-form gradients w.r.t. student and teacher, each in its input's dtype and strides."""
    d_student, d_teacher = _backward(
        student, teacher, mask, col_coef, row_coef, grad_out, tau, backend, need_student, need_teacher
    )
    return _or_empty(d_student, student), _or_empty(d_teacher, teacher)


def _backward(
    student: Tensor, teacher: Tensor, mask: Tensor | None, col_coef: Tensor, row_coef: Tensor,
    grad_out: Tensor, tau: float, backend: str, need_student: bool, need_teacher: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """(d_student | None, d_teacher | None): the body of both forms of the backward."""
    eps = {"eps": stats.EPS} if backend == "triton" else {}  # the torch backend reads stats.EPS itself
    return _backend_module(backend, student.device.type).dist_backward(
        student, teacher, tau, mask, col_coef, row_coef, grad_out, need_student, need_teacher, **eps
    )


def _or_empty(grad: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if grad is None else grad


@dist_loss_bwd.register_fake
def _bwd_fake(student: Tensor, teacher: Tensor, *args: object) -> tuple[Tensor, Tensor]:
    need_student, need_teacher = args[-2:]
    grad_s = torch.empty_like(student) if need_student else student.new_empty(0)
    grad_t = torch.empty_like(teacher) if need_teacher else teacher.new_empty(0)
    return grad_s, grad_t


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    student, teacher, mask, tau, _beta, _gamma, backend, _sync, _group = inputs
    _, col_coef, row_coef = output
    ctx.save_for_backward(student, teacher, mask, col_coef, row_coef)
    ctx.tau, ctx.backend = tau, backend
    # col_coef / row_coef never get a gradient: no zero tensors are made (and launched) for them
    ctx.set_materialize_grads(False)


def _op_backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor | None, _gc: object,
                 _gr: object) -> tuple:
    if grad_loss is None:  # only col_coef / row_coef were used
        return (None,) * 9
    student, teacher, mask, col_coef, row_coef = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    d_student, d_teacher = dist_loss_bwd(
        student, teacher, mask, col_coef, row_coef, grad_loss, ctx.tau, ctx.backend, need_s, need_t
    )
    return (d_student if need_s else None, d_teacher if need_t else None) + (None,) * 7


dist_loss_fwd.register_autograd(_op_backward, setup_context=_setup_context)


class _EagerDistLoss(torch.autograd.Function):
    """The eager form of ``dist_loss_fwd`` + its autograd: the same ``_forward`` / ``_backward``
    bodies, without the custom op's per-call dispatch (two dispatcher crossings into Python, schema
    default filling, alias checks, the dynamo-disable wrapper of each op: most of the host time of
    one small fwd+bwd). Only the loss is an output, so autograd makes no gradient for the
    coefficients. Used by :func:`eager_dist_loss`; ``torch.compile`` traces the custom op instead."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, student: Tensor, teacher: Tensor,
                mask: Tensor | None, tau: float, beta: float, gamma: float, backend: str,
                intra_sync: bool, group: str) -> Tensor:
        loss, col_coef, row_coef = _forward(student, teacher, mask, tau, beta, gamma, backend, intra_sync,
                                            group)
        ctx.save_for_backward(student, teacher, mask, col_coef, row_coef)
        ctx.tau, ctx.backend = tau, backend
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple:
        student, teacher, mask, col_coef, row_coef = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_student, d_teacher = _backward(
            student, teacher, mask, col_coef, row_coef, grad_loss, ctx.tau, ctx.backend, need_s, need_t
        )
        return (d_student, d_teacher) + (None,) * 7


def eager_ok(*tensors: Tensor | None) -> bool:
    """Whether the eager form may run: not under ``torch.compile`` / export tracing (no fake, proxy
    or functional mode, no functorch transform) and plain tensors only (no fake or other subclass)."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if any(torch._C._get_dispatch_mode(key) is not None for key in _INFRA_MODES):
        return False
    return all(t is None or type(t) is Tensor for t in tensors)


_INFRA_MODES = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY,
                torch._C._TorchDispatchModeKey.FUNCTIONAL)


def dist_loss(student: Tensor, teacher: Tensor, mask: Tensor | None, tau: float, beta: float, gamma: float,
              backend: str, intra_sync: bool, group: str) -> Tensor:
    """The loss through ``_EagerDistLoss`` when :func:`eager_ok`, else through the custom op."""
    if eager_ok(student, teacher, mask):
        return _EagerDistLoss.apply(student, teacher, mask, tau, beta, gamma, backend, intra_sync, group)
    return dist_loss_fwd(student, teacher, mask, tau, beta, gamma, backend, intra_sync, group)[0]
