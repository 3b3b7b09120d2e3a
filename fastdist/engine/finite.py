"""Device-side finiteness checks: of a model's training state and of the logits it produces.

`state_is_finite` reads nothing on the host: it returns a 0-d bool tensor that the caller reads at a
sync point it already has (the trainer's all-gather). Evaluation counts non-finite logits batches on
the device and reads the count once at its end (`non_finite_logits_error` words the error).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["NonFiniteLogitsError", "non_finite_logits_error", "state_is_finite"]


class NonFiniteLogitsError(ValueError):
    """A model produced NaN/inf logits: its argmax (class 0 for NaN) would be a meaningless score."""


def _floating_tensors(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[Tensor]:
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if optimizer is not None:  # momentum buffers (and any other per-parameter state)
        for state in optimizer.state.values():
            tensors += [v.detach() for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()
                        and v.numel() > 0]
    return [t for t in tensors if t.numel() > 0]


def state_is_finite(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Tensor:
    """0-d bool tensor on the model's device: every floating parameter, buffer (BatchNorm running
    statistics) and optimizer state tensor is finite.

    One fused max-abs per tensor group (``_foreach_norm`` with ord=inf, as ``clip_grad_norm_`` uses):
    inf stays inf and NaN propagates, and unlike a 2-norm it cannot overflow on large finite values.
    """
    tensors = _floating_tensors(model, optimizer)
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    flags = [torch.stack(torch._foreach_norm(group, float("inf"))).isfinite().all()
             for group in by_device.values()]
    first = flags[0]
    return torch.stack([f.to(first.device) for f in flags]).all()


def non_finite_logits_error(source: str, batches: int) -> NonFiniteLogitsError:
    """The error for ``batches`` batches of NaN/inf logits produced by ``source`` (say, a checkpoint)."""
    return NonFiniteLogitsError(
        f"{source} produces non-finite (NaN/inf) logits on {batches} batch(es): its weights or BatchNorm "
        "statistics are corrupt (a diverged run?); refusing to score it or write predictions from it")
