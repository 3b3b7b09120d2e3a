"""Cross-rank merge of the DIST statistics for ``intra_sync=True``.

Only ``row_stats`` (2,) and ``col_stats`` (5, C) cross the network: every rank all-gathers them and
merges them in rank order with the exact Chan merge, so all ranks hold bitwise-identical global
statistics (and loss). The process group is handed to the custom ops as a string key
(:func:`group_key`, its registered name), since an op schema cannot carry a ``ProcessGroup``.
"""

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.distributed_c10d import _resolve_process_group

from .stats import merge_stats


def group_key(process_group: object) -> str:
    """A string naming ``process_group`` (None: the default group) for the custom-op schema.

    The group's registered name (what ``torch.distributed`` resolves functional collectives by), so
    no Python-side registry is written: that side effect would not happen under ``torch.compile``.
    """
    if process_group is None:
        return ""
    return process_group.group_name  # type: ignore[attr-defined]


def resolve_group(key: str) -> object:
    return _resolve_process_group(key) if key else None


def _require_initialized() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("intra_sync=True needs an initialized torch.distributed process group")


def _gather_packed(row_stats: Tensor, col_stats: Tensor, key: str) -> list[Tensor]:
    """Every rank's [row_stats, col_stats.flatten()] (2 + 5 C,), in rank order."""
    _require_initialized()
    group = resolve_group(key)
    packed = torch.cat([row_stats, col_stats.flatten()])
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    return parts


def all_gather_merge(row_stats: Tensor, col_stats: Tensor, key: str) -> tuple[Tensor, Tensor, int]:
    """Global (row_stats, col_stats) over the ranks of the group, and the group size W."""
    parts = _gather_packed(row_stats, col_stats, key)
    row, col = parts[0][:2], parts[0][2:].view_as(col_stats)
    for part in parts[1:]:
        row, col = merge_stats(row, col, part[:2], part[2:].view_as(col_stats))
    return row, col, len(parts)


def all_gather_records(row_stats: Tensor, col_stats: Tensor, key: str) -> tuple[Tensor, Tensor, int]:
    """Every rank's (row_stats (2,), col_stats (5, C)) stacked in rank order, (W, 2) and (W, 5, C), and
    the group size W: the records the Triton finalize kernel merges (identically on every rank)."""
    parts = _gather_packed(row_stats, col_stats, key)
    gathered = torch.stack(parts)  # (W, 2 + 5 C)
    world = len(parts)
    return gathered[:, :2].contiguous(), gathered[:, 2:].reshape(world, *col_stats.shape), world


class _AllGather(torch.autograd.Function):
    """(W, *x.shape) stack of every rank's ``x``; backward: the sum over ranks of the gradient slices."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, group: object) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[dist.get_rank(ctx.group)], None


def all_gather_autograd(x: Tensor, process_group: object) -> Tensor:
    """Differentiable all-gather (works on gloo and NCCL): (W, *x.shape)."""
    _require_initialized()
    return _AllGather.apply(x, process_group)
