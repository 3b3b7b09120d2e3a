"""Pixel-wise KD (Hinton et al. 2015) front-end: :func:`kd_loss`, :class:`KDLoss`.

As CIRKD's ``CriterionKD``: the logits are N rows x C classes (the B*H*W pixels of a 4-D input) and::

    loss = tau^2 * mean over the kept rows of KL(softmax(T / tau) || softmax(S / tau))

(``KLDivLoss(reduction="batchmean")`` over the rows). Gradients (local to a row; M = kept rows)::

    dL/dS = tau / M * (p - q),   dL/dT = tau / M * q * (log q - log p - KL_row)

Backends: ``"reference"`` (the formula with eager autograd), ``"torch"`` and ``"triton"`` (one fused
pass computing the loss and the gradients, kept for the backward: ``kernels/kd_loss.py``), ``"auto"``
(triton on CUDA when available, else torch). Validation is ``dist_loss``'s (``api``).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import api, local_op
from .stats import output_dtype


def _rows(x: Tensor) -> Tensor:
    """(N, C) view of 2-D / 4-D logits, rows in (b, h, w) order."""
    return x if x.dim() == 2 else x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def kd_loss_reference(student: Tensor, teacher: Tensor, tau: float = 1.0,
                      mask: Tensor | None = None) -> Tensor:
    """The CIRKD formula with eager autograd (float32 math; float64 for float64 input)."""
    dtype = output_dtype(student, teacher)
    s, t = _rows(student).to(dtype), _rows(teacher).to(dtype)
    if mask is not None:
        keep = mask.reshape(-1)
        s, t = s[keep], t[keep]
    if s.shape[0] == 0:  # no kept row: 0, with zero gradients
        return (student.sum() + teacher.sum()).to(dtype) * 0.0
    log_p, log_q = F.log_softmax(s / tau, dim=1), F.log_softmax(t / tau, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * tau * tau


def _torch_forward_backward(student: Tensor, teacher: Tensor, tau: float, mask: Tensor | None,
                            need_s: bool, need_t: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The fused backends' contract in PyTorch: loss and grad_out = 1 gradients from one evaluation."""
    dtype = output_dtype(student, teacher)
    log_p = F.log_softmax(_rows(student).to(dtype) / tau, dim=1)  # (N, C)
    log_q = F.log_softmax(_rows(teacher).to(dtype) / tau, dim=1)  # (N, C)
    keep = torch.ones(log_p.shape[0], dtype=torch.bool, device=log_p.device) if mask is None else mask
    q = log_q.exp()
    lr = log_q - log_p
    kl = torch.where(keep, (q * lr).sum(1), 0.0)  # (N,) excluded rows (even NaN) give 0
    m = keep.sum().to(dtype).clamp_min(1.0)
    loss = kl.sum() * (tau * tau) / m

    def grad(g: Tensor, like: Tensor) -> Tensor:
        g = torch.where(keep[:, None], g * (tau / m), 0.0)
        shaped = g if like.dim() == 2 else g.reshape(like.shape[0], *like.shape[2:], -1).permute(0, 3, 1, 2)
        return torch.empty_like(like).copy_(shaped)

    ds = grad(log_p.exp() - q, student) if need_s else None
    dt = grad(q * (lr - kl[:, None]), teacher) if need_t else None
    return loss, ds, dt


kd_loss_fwd = local_op.local_loss_op("kd_loss_fwd", _torch_forward_backward, "kd_loss", "kd_forward_backward")


def kd_loss(student: Tensor, teacher: Tensor, tau: float = 1.0, mask: Tensor | None = None,
            backend: str = "auto") -> Tensor:
    """Pixel-wise KD loss, a float32 0-d tensor (float64 when an input is float64).

    Args:
        student, teacher: (N, C) or (B, C, H, W) logits (NCHW or channels-last; fp32/fp16/bf16).
            Gradients flow to the student, and to the teacher when it requires grad.
        tau: temperature. mask: optional bool (B, H, W) or (N,) keep-mask of rows (as in DIST):
            excluded rows do not reach the loss and get zero gradient; no kept row gives 0.
        backend: "auto" | "triton" | "torch" | "reference".
    """
    return local_op.run(kd_loss_fwd, kd_loss_reference, student, teacher, tau, mask, backend)


class KDLoss(nn.Module):
    """Pixel-wise KD loss (thin module around :func:`kd_loss`; see its docstring)."""

    def __init__(self, tau: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        api.check_hyperparams(backend=backend, tau=tau)
        self.tau, self.backend = tau, backend

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return kd_loss(student, teacher, self.tau, mask, self.backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, backend={self.backend!r}"
