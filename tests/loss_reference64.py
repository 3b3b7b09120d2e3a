"""Independent float64 implementation of the published DIST loss (does not import fastdist).

Written from the paper / DIST_KD definition, in a different form from fastdist's reference: rows as
an explicit (N, C) matrix, the Pearson correlation spelled out with sums.
"""

import torch
from torch import Tensor

EPS = 1e-8


def as_rows(x: Tensor) -> Tensor:
    """(N, C) or (B, C, H, W) -> (N, C) float64, row n = b*H*W + h*W + w."""
    x = x.detach().to(torch.float64)
    if x.dim() == 4:
        x = x.movedim(1, -1).reshape(-1, x.shape[1])
    return x


def _pearson_rows(u: Tensor, v: Tensor) -> Tensor:
    """Pearson correlation of each row of u with the same row of v."""
    du = u - u.sum(dim=1, keepdim=True) / u.shape[1]
    dv = v - v.sum(dim=1, keepdim=True) / v.shape[1]
    num = torch.einsum("nc,nc->n", du, dv)
    # vector_norm, like the published ``.norm()``: its backward at a zero vector is 0 (sqrt's is inf)
    norms = torch.linalg.vector_norm(du, dim=1) * torch.linalg.vector_norm(dv, dim=1)
    return num / (norms + EPS)


def loss64(s_rows: Tensor, t_rows: Tensor, beta: float, gamma: float, tau: float) -> Tensor:
    p = torch.softmax(s_rows / tau, dim=1)
    q = torch.softmax(t_rows / tau, dim=1)
    inter = 1.0 - _pearson_rows(p, q).mean()
    intra = 1.0 - _pearson_rows(p.T, q.T).mean()
    return tau * tau * (beta * inter + gamma * intra)


def dist64(
    student: Tensor,
    teacher: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 1.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dloss/dstudent, dloss/dteacher) in float64; gradients shaped like the inputs.

    Masked-out rows are dropped before the loss, so their gradient is 0.
    """
    s_rows = as_rows(student).requires_grad_(True)
    t_rows = as_rows(teacher).requires_grad_(True)
    keep = None if mask is None else mask.detach().reshape(-1).cpu()
    s_used = s_rows if keep is None else s_rows[keep.to(s_rows.device)]
    t_used = t_rows if keep is None else t_rows[keep.to(t_rows.device)]
    loss = loss64(s_used, t_used, beta, gamma, tau)
    d_s, d_t = torch.autograd.grad(loss, (s_rows, t_rows))
    return loss.detach(), _like(d_s, student), _like(d_t, teacher)


def _like(rows: Tensor, x: Tensor) -> Tensor:
    if x.dim() == 2:
        return rows
    b, c, h, w = x.shape
    return rows.reshape(b, h, w, c).movedim(-1, 1)
