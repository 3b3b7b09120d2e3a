"""The poly learning-rate schedule of the reference recipe."""

from __future__ import annotations

from torch.optim import Optimizer

__all__ = ["MIN_LR", "poly_lr", "set_lr"]

MIN_LR = 1e-4  # the reference's floor: lr never drops below it


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float = 0.9) -> float:
    """``1e-4 + (base_lr - 1e-4) * (1 - iteration / max_iterations) ** power``.

    ``iteration`` counts completed steps (0 for the first step), as in the reference ``adjust_lr``.
    """
    frac = min(max(iteration / max_iterations, 0.0), 1.0)
    return MIN_LR + (base_lr - MIN_LR) * (1.0 - frac) ** power


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (a Python float: no device work, no sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
