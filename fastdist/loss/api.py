"""Public front-end: :class:`DISTLoss` and :func:`dist_loss` (validation and backend dispatch).

DIST ("Knowledge Distillation from A Stronger Teacher", NeurIPS 2022) on logits viewed as N rows x C
classes (for (B, C, H, W) input the rows are the B*H*W pixels): ``loss = tau^2 * (beta * inter +
gamma * intra)``, one minus the mean Pearson correlation of the softmax probabilities over the rows
(inter) and over the class columns (intra); the formula every backend computes is written once, in
``docs/design.md`` ("The DIST loss").

Backends: ``"reference"`` (the formula with eager autograd), ``"torch"`` and ``"triton"`` (fused:
forward statistics + closed-form backward, saving only the inputs and O(C) coefficients; see
``stats`` and ``torch_backend``), ``"auto"`` (triton on CUDA when triton is installed, else torch).
"""

import importlib.util
import math
import numbers

import torch
from torch import Tensor, nn

from . import ops, sync
from .reference import dist_loss_reference

BACKENDS = ("auto", "triton", "torch", "reference")
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class HyperparameterTypeError(ValueError, TypeError):
    """A loss hyper-parameter that is not a real number (a str, None, bool, tensor...).

    A ValueError, as every other bad hyper-parameter value is, and a TypeError, as Python raises for a
    wrong argument type: ``except ValueError`` and ``except TypeError`` both catch it."""


def check_hyperparams(backend: str | None = None, **params: object) -> None:
    """Raise a clear error for a bad loss hyper-parameter (reusable by every loss front-end).

    Every keyword is a float hyper-parameter: it must be a real number (not bool, str, None, a tensor;
    else :class:`HyperparameterTypeError`, a ValueError), finite, and ``tau``/``temperature`` must be
    > 0, ``beta``/``gamma`` and other weights >= 0 (else ValueError). ``backend``, when given, must be
    one of ``BACKENDS``.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    for name, value in params.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            kind = type(value).__name__
            raise HyperparameterTypeError(f"{name} must be a real number, got {kind} {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        positive = name in ("tau", "temperature")
        if (value <= 0) if positive else (value < 0):
            raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")


def _check_inputs(student: Tensor, teacher: Tensor) -> None:
    if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
        raise ValueError("student and teacher must be tensors")
    if student.shape != teacher.shape:
        shapes = f"{tuple(student.shape)} vs {tuple(teacher.shape)}"
        raise ValueError(f"student and teacher shapes differ: {shapes}")
    if student.dim() not in (2, 4):
        raise ValueError(f"expected (N, C) or (B, C, H, W) logits, got shape {tuple(student.shape)}")
    if student.device != teacher.device:
        raise ValueError(f"student and teacher devices differ: {student.device} vs {teacher.device}")
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name} dtype must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if student.shape[1] < 2:
        raise ValueError(f"need at least 2 classes (dim 1), got C={student.shape[1]}")
    if student.numel() == 0:
        raise ValueError(f"empty batch: shape {tuple(student.shape)} has no rows")


def _check_mask(mask: Tensor, student: Tensor) -> Tensor:
    """The mask as a contiguous (N,) bool tensor in row order."""
    if not isinstance(mask, Tensor):
        raise ValueError("mask must be a bool tensor")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask dtype must be torch.bool, got {mask.dtype}")
    if mask.device != student.device:
        raise ValueError(f"mask device {mask.device} differs from the logits' device {student.device}")
    rows = student.numel() // student.shape[1]
    pixel_shape = (student.shape[0], *student.shape[2:])
    if tuple(mask.shape) not in ((rows,), pixel_shape):
        raise ValueError(f"mask shape must be {pixel_shape} or ({rows},), got {tuple(mask.shape)}")
    return mask.reshape(-1).contiguous()


def _dense(x: Tensor) -> Tensor:
    """x itself when contiguous (2-D/NCHW) or channels-last, else a contiguous copy."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def _resolve_backend(backend: str, student: Tensor, teacher: Tensor) -> str:
    if backend != "auto":
        return backend
    on_gpu = student.device.type == "cuda" and _HAS_TRITON
    return "triton" if on_gpu and _triton_fits(student, teacher) else "torch"


def _triton_fits(student: Tensor, teacher: Tensor) -> bool:
    """Whether the fused kernels take these logits (no float64, at most ``kernels.dist_loss.MAX_C``
    classes). Imported here, not at module level: that would import triton on every machine."""
    from kernels.dist_loss import MAX_C

    return torch.float64 not in (student.dtype, teacher.dtype) and student.shape[1] <= MAX_C


def dist_loss(
    student: Tensor,
    teacher: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 1.0,
    backend: str = "auto",
    mask: Tensor | None = None,
    intra_sync: bool = False,
    process_group: object = None,
) -> Tensor:
    """DIST loss of student/teacher logits, a float32 0-d tensor (float64 when an input is float64).

    Args:
        student, teacher: (N, C) or (B, C, H, W) logits (NCHW or channels-last; fp32/fp16/bf16,
            may differ). Gradients flow to both (to the teacher only when it requires grad).
        beta, gamma: weights of the inter (row) and intra (column) terms; tau: temperature.
        backend: "auto" | "triton" | "torch" | "reference".
        mask: optional bool (B, H, W) or (N,) keep-mask: the loss is that of the kept rows and the
            excluded rows get zero gradient (their values, even NaN or inf, do not reach the loss).
            With no kept row both correlations are taken as 0: loss tau^2 (beta + gamma), zero gradients.
        intra_sync: take both terms over the global batch of all ranks of ``process_group`` (default
            group when None); the value is the global loss on every rank and the gradients are scaled
            so that DDP's averaging gives the single-process gradient of the concatenated batch.
    """
    check_hyperparams(backend, beta=beta, gamma=gamma, tau=tau)
    if not isinstance(intra_sync, bool):
        raise TypeError(f"intra_sync must be a bool, got {type(intra_sync).__name__} {intra_sync!r}")
    _check_inputs(student, teacher)
    if mask is not None:
        mask = _check_mask(mask, student)
    backend = _resolve_backend(backend, student, teacher)
    if backend == "reference":
        return dist_loss_reference(student, teacher, beta, gamma, tau, mask, intra_sync, process_group)
    if backend == "triton" and torch.float64 in (student.dtype, teacher.dtype):
        raise ValueError("backend='triton' supports float32, float16 and bfloat16 inputs, not float64")
    group = sync.group_key(process_group) if intra_sync else ""
    student, teacher = _dense(student), _dense(teacher)
    return ops.dist_loss(student, teacher, mask, float(tau), float(beta), float(gamma), backend, intra_sync,
                         group)


class DISTLoss(nn.Module):
    """DIST knowledge-distillation loss (thin module around :func:`dist_loss`; see its docstring)."""

    def __init__(
        self,
        beta: float = 1.0,
        gamma: float = 1.0,
        tau: float = 1.0,
        backend: str = "auto",
        intra_sync: bool = False,
        process_group: object = None,
    ) -> None:
        super().__init__()
        check_hyperparams(backend, beta=beta, gamma=gamma, tau=tau)
        self.beta, self.gamma, self.tau = beta, gamma, tau
        self.backend, self.intra_sync, self.process_group = backend, intra_sync, process_group

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return dist_loss(
            student, teacher, self.beta, self.gamma, self.tau, self.backend, mask, self.intra_sync,
            self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, tau={self.tau}, backend={self.backend!r}, "
            f"intra_sync={self.intra_sync}"
        )
