"""Channel-wise distillation (CWD, Shu et al. 2021) on the logits: :func:`cwd_loss`, :class:`CWDLoss`.

As CIRKD's ``CriterionCWD(norm_type="channel", divergence="kl")``: for each image b and class c the
H*W positions of T[b, c] / tau and S[b, c] / tau are turned into distributions (spatial softmax) and::

    loss = tau^2 / (B * C) * sum_{b, c} KL(phi_t[b, c] || phi_s[b, c])

A mask (B, H, W) removes positions from every channel's softmax (the normalisation stays B * C).
Gradients (local to a plane): dL/dS = tau / (B C) (phi_s - phi_t),
dL/dT = tau / (B C) phi_t (log phi_t - log phi_s - KL_bc).
Backends as for :func:`fastdist.kd_loss` (fused kernel: ``kernels/cwd_loss.py``).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import api, local_op
from .stats import output_dtype


def _check_4d(student: Tensor) -> None:
    if student.dim() != 4:
        raise ValueError(f"CWD needs (B, C, H, W) logits (a spatial softmax per channel), got shape "
                         f"{tuple(student.shape)}")


def _planes(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype).reshape(x.shape[0], x.shape[1], -1)  # (B, C, P)


def cwd_loss_reference(student: Tensor, teacher: Tensor, tau: float = 4.0,
                       mask: Tensor | None = None) -> Tensor:
    """The CIRKD formula with eager autograd (float32 math; float64 for float64 input)."""
    dtype = output_dtype(student, teacher)
    B, C = student.shape[:2]
    s, t = _planes(student, dtype) / tau, _planes(teacher, dtype) / tau
    if mask is None:
        kl = F.kl_div(F.log_softmax(s, 2), F.log_softmax(t, 2), reduction="sum", log_target=True)
        return kl * (tau * tau) / (B * C)
    keep = mask.reshape(B, 1, -1).expand_as(s)
    total = s.new_zeros(())
    for b in range(B):  # a plane's kept positions differ per image
        sb = s[b][keep[b]].reshape(C, -1)
        tb = t[b][keep[b]].reshape(C, -1)
        if sb.shape[1]:
            total = total + F.kl_div(F.log_softmax(sb, 1), F.log_softmax(tb, 1), reduction="sum",
                                     log_target=True)
    return total * (tau * tau) / (B * C) + 0.0 * (student.sum() + teacher.sum()).to(dtype)


def _torch_forward_backward(student: Tensor, teacher: Tensor, tau: float, mask: Tensor | None,
                            need_s: bool, need_t: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The fused contract in PyTorch: loss and grad_out = 1 gradients from one evaluation."""
    dtype = output_dtype(student, teacher)
    B, C = student.shape[:2]
    s, t = _planes(student, dtype) / tau, _planes(teacher, dtype) / tau  # (B, C, P)
    keep = torch.ones_like(s[:, :1], dtype=torch.bool) if mask is None else mask.reshape(B, 1, -1)
    neg = torch.tensor(float("-inf"), dtype=dtype, device=s.device)
    # a plane without kept positions: its log-softmax is NaN everywhere, then zeroed by `keep`
    log_s = F.log_softmax(torch.where(keep, s, neg), 2)
    log_t = F.log_softmax(torch.where(keep, t, neg), 2)
    phi_t = torch.where(keep, log_t.exp(), 0.0)
    lr = torch.where(keep, log_t - log_s, 0.0)
    kl = (phi_t * lr).sum(2, keepdim=True)  # (B, C, 1)
    loss = kl.sum() * (tau * tau / (B * C))
    scale = tau / (B * C)

    def grad(g: Tensor, like: Tensor) -> Tensor:
        g = torch.where(keep, g * scale, 0.0).reshape(like.shape)
        return torch.empty_like(like).copy_(g)

    ds = grad(log_s.exp() - phi_t, student) if need_s else None
    dt = grad(phi_t * (lr - kl), teacher) if need_t else None
    return loss, ds, dt


cwd_loss_fwd = local_op.local_loss_op("cwd_loss_fwd", _torch_forward_backward, "cwd_loss",
                                      "cwd_forward_backward")


def cwd_loss(student: Tensor, teacher: Tensor, tau: float = 4.0, backend: str = "auto",
             mask: Tensor | None = None) -> Tensor:
    """Channel-wise distillation loss of (B, C, H, W) logits, a float32 0-d tensor (float64 for float64).

    Args:
        student, teacher: (B, C, H, W) logits (NCHW or channels-last; fp32/fp16/bf16). Gradients flow
            to the student, and to the teacher when it requires grad.
        tau: temperature. backend: "auto" | "triton" | "torch" | "reference".
        mask: optional bool (B, H, W) (or (B*H*W,)) keep-mask of positions, removed
            from every channel's spatial softmax; a plane without kept positions contributes 0.
    """
    return local_op.run(cwd_loss_fwd, cwd_loss_reference, student, teacher, tau, mask, backend,
                        check=_check_4d)


class CWDLoss(nn.Module):
    """Channel-wise distillation loss (thin module around :func:`cwd_loss`; see its docstring)."""

    def __init__(self, tau: float = 4.0, backend: str = "auto") -> None:
        super().__init__()
        api.check_hyperparams(backend=backend, tau=tau)
        self.tau, self.backend = tau, backend

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return cwd_loss(student, teacher, self.tau, self.backend, mask)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, backend={self.backend!r}"
