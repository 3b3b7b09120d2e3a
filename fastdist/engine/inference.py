"""Inference of a segmentation model: logits at the label size, multi-scale and flip (test-time
augmentation), as the CIRKD/DIST_KD ``eval.py`` computes them.

The input is resized by each scale with bilinear ``align_corners=True``; the main logits are upsampled
to the label size with bilinear ``align_corners=True``; with flip the logits of the mirrored input are
flipped back and averaged with the plain ones (0.5 each); the (flip-averaged) **logits** of all scales
are summed (not softmax probabilities) and divided by the number of scales; the prediction is their
argmax. `evaluation` scores these logits, `prediction` writes them as PNGs, `sliding` tiles them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["image_to_input", "infer_logits", "main_logits", "unwrap_for_inference", "upsample_logits"]


def unwrap_for_inference(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (also under torch.compile) so inference runs no collectives.

    Ranks may see different numbers of validation batches; a DDP forward could then hang on its
    buffer broadcast. A compiled plain module is kept compiled.
    """
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.module
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def main_logits(output: object) -> torch.Tensor:
    """The main logits of a model output: ``out["out"]``, the first element of a tuple, or a tensor."""
    if isinstance(output, dict):
        return output["out"]
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, torch.Tensor):
        return output
    raise TypeError(f"cannot take logits from a model output of type {type(output).__name__}")


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Float32 logits resized to ``size`` (bilinear, align_corners=True like the reference)."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def _logits_at_scale(model: nn.Module, images: torch.Tensor, scale: float, size: Sequence[int],
                     flip: bool) -> torch.Tensor:
    """Upsampled logits for one scale; with ``flip``, averaged with those of the mirrored input."""
    x = images
    if scale != 1.0:
        x = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=True)
    if not flip:
        return upsample_logits(main_logits(model(x)), size)
    batch = x.shape[0]
    # One forward over [x, flip(x)]: eval-mode BN makes samples independent, and one big batch
    # keeps the GPU busier than two small ones.
    both = upsample_logits(main_logits(model(torch.cat([x, x.flip(3)], dim=0))), size)
    return 0.5 * (both[:batch] + both[batch:].flip(3))


def infer_logits(model: nn.Module, images: torch.Tensor, size: Sequence[int] | None = None,
                 scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Float32 ``(B, C, H, W)`` logits at ``size`` (default: the image size), reference-style TTA.

    The caller sets eval mode, no-grad/inference mode and autocast.
    """
    if not scales:
        raise ValueError("scales must not be empty")
    size = tuple(images.shape[-2:]) if size is None else tuple(size)
    total: torch.Tensor | None = None
    for scale in scales:
        logits = _logits_at_scale(model, images, float(scale), size, flip)
        total = logits if total is None else total.add_(logits)
    assert total is not None
    return total.div_(len(scales)) if len(scales) > 1 else total


def image_to_input(bgr: np.ndarray, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """(1, 3, H, W) float32 network input: float32(BGR 0..255) - float32(MEAN_BGR), as the loaders do."""
    from fastdist.data.loader import MEAN_BGR_F32

    x = torch.from_numpy(bgr).to(device, non_blocking=True).permute(2, 0, 1).unsqueeze(0).float()
    x = x - MEAN_BGR_F32.to(device).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
