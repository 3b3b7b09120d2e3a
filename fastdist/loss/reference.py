"""The published DIST loss, literally, with eager autograd (``backend="reference"``).

The formula (``docs/design.md``, "The DIST loss") written as the DIST_KD code writes it: softmax over
classes, a Pearson correlation as the cosine of the centred vectors with 1e-8 in the denominator, over
the rows (inter) and over the class columns (intra). A 4-D (B, C, H, W) input is first turned
into B*H*W rows by ``permute(0, 2, 3, 1).reshape(-1, C)`` (the DIST_KD segmentation code uses
``transpose(1, 3)``, i.e. (b, w, h) row order; the loss does not depend on the row order, and (b, h, w)
matches the (B, H, W) mask). A mask keeps only its rows; with no kept row both correlations are taken
as 0 (loss ``tau^2 * (beta + gamma)``, zero gradients), as in the fused backends. The math runs in
float32 (float64 for float64 input), so, like the published code, its column sums lose accuracy for
millions of rows on CPU.

With ``intra_sync`` the terms are taken over the rows of all ranks: each rank's per-row correlation
sum and Chan column statistics are all-gathered differentiably and merged in rank order, so the
value is the global loss and the backward (the gather's backward sums the identical gradients of the
W ranks) gives W times the single-process gradient, which DDP's averaging divides back out.
"""

import torch
from torch import Tensor

from . import sync
from .stats import EPS, merge_stats, output_dtype


def _rows(x: Tensor) -> Tensor:
    return x if x.dim() == 2 else x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    return _cosine(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True))


def _probs(x: Tensor, tau: float, kept: Tensor | None) -> Tensor:
    """Softmax over the classes of the rows of ``x`` (only the rows indexed by ``kept``)."""
    rows = _rows(x).to(torch.promote_types(x.dtype, torch.float32))
    if kept is not None:
        rows = rows.index_select(0, kept)
    return (rows / tau).softmax(dim=1)


def _synced_terms(p: Tensor, q: Tensor, process_group: object) -> tuple[Tensor, Tensor]:
    """Global (inter, intra) from this rank's rows and the other ranks' gathered statistics."""
    count = max(p.shape[0], 1)  # a rank may hold no kept rows: its statistics are then all 0
    row = torch.stack([_pearson(p, q).sum(), p.new_tensor(float(p.shape[0]))]).double()
    mu_p, mu_q = p.sum(0) / count, q.sum(0) / count
    a, b = p - mu_p, q - mu_q
    col = torch.stack([mu_p, mu_q, (a * a).sum(0), (b * b).sum(0), (a * b).sum(0)]).double()
    rows, cols = sync.all_gather_autograd(torch.cat([row, col.flatten()]), process_group).split(
        [2, col.numel()], dim=1
    )
    row, col = rows[0], cols[0].view_as(col)
    for rank in range(1, rows.shape[0]):
        row, col = merge_stats(row, col, rows[rank], cols[rank].view_as(col))
    inter = 1 - row[0] / row[1].clamp_min(1)
    intra = 1 - (col[4] / (_sqrt0(col[2]) * _sqrt0(col[3]) + EPS)).mean()
    return inter, intra


def _sqrt0(x: Tensor) -> Tensor:
    """sqrt with gradient 0 at 0 (a column constant over all ranks), like the norm in ``_cosine``."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1).sqrt(), 0)


def dist_loss_reference(
    student: Tensor,
    teacher: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 1.0,
    mask: Tensor | None = None,
    intra_sync: bool = False,
    process_group: object = None,
) -> Tensor:
    """DIST loss of (N, C) or (B, C, H, W) logits by the published formula.

    Returns a float32 0-d tensor (float64 when an input is float64).
    """
    # one index for both inputs: under torch.compile both then have the same (data-dependent) row count
    kept = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
    p, q = _probs(student, tau, kept), _probs(teacher, tau, kept)
    if intra_sync:
        inter, intra = _synced_terms(p, q, process_group)
    else:
        # mean over the rows, 0 without a kept row (no branch on the data-dependent row count, so
        # torch.compile(fullgraph=True) traces it); the columns' sums over no row are 0 already
        r = _pearson(p, q)
        inter = 1 - r.sum() / torch.ones_like(r).sum().clamp_min(1)
        intra = 1 - _pearson(p.t(), q.t()).mean()
    loss = tau**2 * (beta * inter + gamma * intra)
    return loss.to(output_dtype(student, teacher))
