"""Model cost: parameter count and GFLOPs per image at a given input size.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per multiply-add of
the matmul/convolution family (element-wise ops, pooling and interpolation are not counted). The
forward runs on the ``meta`` device through `torch.func.functional_call`, so it costs no compute
and no copy of the weights, whatever the model's size or device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_parameters", "format_model_cost", "forward_gflops", "log_model_cost", "model_cost"]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def forward_gflops(model: nn.Module, size: Sequence[int]) -> float:
    """GFLOPs (1e9, FlopCounterMode's count) of one eval-mode forward of a ``(1, 3, H, W)`` image."""
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be (H, W) with positive entries, got {tuple(size)}")
    meta = {name: torch.empty_like(t, device="meta")
            for name, t in [*model.named_parameters(), *model.named_buffers()]}
    x = torch.zeros(1, 3, int(size[0]), int(size[1]), device="meta")
    was_training = model.training
    model.eval()  # eval: BatchNorm uses its running statistics and updates nothing
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            torch.func.functional_call(model, meta, (x,))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def model_cost(models: Mapping[str, nn.Module | None], size: Sequence[int]) -> dict[str, dict[str, float]]:
    """``{role: {"params": int, "gflops": float, "input_size": [H, W]}}`` for every model that is not None."""
    return {role: {"params": count_parameters(m), "gflops": forward_gflops(m, size),
                   "input_size": [int(size[0]), int(size[1])]}
            for role, m in models.items() if m is not None}


def format_model_cost(cost: Mapping[str, Mapping[str, float]]) -> str:
    """One line per model: ``student: 3.21 M parameters, 4.56 GFLOPs per 512x1024 image``."""
    return "\n".join(f"  {role}: {c['params'] / 1e6:.2f} M parameters, {c['gflops']:.2f} GFLOPs per "
                     f"{c['input_size'][0]}x{c['input_size'][1]} image" for role, c in cost.items())


def log_model_cost(log: Any, models: Mapping[str, nn.Module | None], size: Sequence[int]) -> dict:
    """Print the cost of ``models`` at ``size`` through ``log`` (a `RunLogger`) and record it as
    ``{"kind": "model_cost", "models": {...}}`` in metrics.jsonl; returns the cost."""
    cost = model_cost(models, size)
    log.info("model cost (FlopCounterMode, eval-mode forward):\n" + format_model_cost(cost))
    log.record("model_cost", models=cost)
    return cost
