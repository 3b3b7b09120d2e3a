"""Distributed evaluation: confusion matrices over every rank's shard, mIoU, and the results file.

Every image counts exactly once (each rank its shard, ranks may differ by one batch, one all-reduce
at the end). The reference's DistributedSampler pads the val set to a multiple of the world size,
counting a few images twice; single-process numbers are identical. The logits are
`fastdist.engine.inference.infer_logits`'s (the reference's multi-scale / flip protocol).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from fastdist.engine.finite import non_finite_logits_error
from fastdist.engine.inference import infer_logits, unwrap_for_inference
from fastdist.engine.metrics import ConfusionMatrix
from fastdist.engine.runtime import autocast

__all__ = ["evaluate", "save_results_json"]


def _all_reduce_count(count: int, device: torch.device) -> int:
    """Sum a host integer over all ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def evaluate(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    device: torch.device | str,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp: str = "off",
    ignore_index: int = 255,
    source: str = "the model",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Evaluate ``model`` on ``loader`` (this rank's shard) and return metrics over all ranks.

    The loader yields ``(images (B,3,H,W), labels (B,H,W))``; logits are upsampled to the label size,
    under autocast ``amp`` (bf16, fp16, or off / fp32). Every rank must call this (the confusion
    matrices are all-reduced at the end, one collective; ranks may have different numbers of
    batches). The model's train/eval state is restored.

    Returns ``{"mIoU", "pixAcc", "IoU": list[float], "images": int}`` (fractions; see
    `fastdist.engine.metrics` for the absent-class convention). NaN/inf logits on any rank raise
    `NonFiniteLogitsError` naming ``source`` on every rank (counted on the device, read once at the end).
    """
    device = torch.device(device)
    net = unwrap_for_inference(model)
    was_training = model.training
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    images_seen = 0
    bad_batches = torch.zeros((), dtype=torch.int64, device=device)
    model.eval()
    try:
        with torch.inference_mode(), autocast(device.type, amp):
            for images, labels in loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                logits = infer_logits(net, images, labels.shape[-2:], scales, flip)
                bad_batches += (~torch.isfinite(logits)).any()
                cm.update(logits.argmax(1), labels)
                images_seen += labels.shape[0]
                if progress is not None:  # images done on this rank (a host count, no sync)
                    progress(images_seen)
    finally:
        model.train(was_training)
    bad = _all_reduce_count(int(bad_batches.item()), device)
    if bad:
        raise non_finite_logits_error(source, bad)
    cm.all_reduce()
    result = cm.compute()
    result["images"] = _all_reduce_count(images_seen, device)
    return result


def _json_safe(value: object) -> object:
    """NaN/inf floats -> None, recursively, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def save_results_json(result: dict, path: str, class_names: Sequence[str], **extra: object) -> None:
    """Write metrics (plus ``extra`` run information) as JSON; per-class IoU is keyed by class name."""
    payload = dict(extra)
    payload.update({k: v for k, v in result.items() if k != "IoU"})
    payload["IoU"] = dict(zip(class_names, result["IoU"], strict=True))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(_json_safe(payload), fh, indent=2)
        fh.write("\n")
