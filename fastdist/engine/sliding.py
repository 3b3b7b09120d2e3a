"""Sliding-window inference (mmsegmentation's ``slide`` test mode) for images larger than a crop.

For an image of ``(H, W)``, crop ``(h, w)`` and stride ``(sh, sw)`` the windows start at
``y = min(i * sh, max(H - h, 0))`` for ``i = 0 .. ceil(max(H - h, 0) / sh)`` (likewise in x), so the
last window ends at the image border. Each window's logits are upsampled to the window size and
added into a full-size sum; the result is that sum divided by the number of windows covering each
pixel. A window larger than the image (an image smaller than the crop) is zero-padded at the
bottom/right -- zero is the mean colour of the normalised input -- and the padding's logits are
dropped.

`SlidingWindow` wraps a model so that ``wrapped(x)`` returns these ``(B, C, H, W)`` logits; the
whole-image evaluation code (scales, flip, metrics) then runs unchanged on the wrapped model.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastdist.engine.inference import main_logits, upsample_logits

__all__ = ["SlidingWindow", "add_sliding_args", "check_sliding_args", "maybe_sliding", "window_starts"]


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis (the last one flush with the end)."""
    if crop < 1 or stride < 1:
        raise ValueError(f"crop and stride must be positive, got crop {crop}, stride {stride}")
    span = max(length - crop, 0)
    count = -(-span // stride) + 1  # ceil(span / stride) + 1
    return [min(i * stride, span) for i in range(count)]


class SlidingWindow(nn.Module):
    """``model`` applied window by window; ``forward`` returns float32 logits at the input size."""

    def __init__(self, model: nn.Module, crop_size: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        if len(crop_size) != 2 or len(stride) != 2 or min(*crop_size, *stride) < 1:
            raise ValueError(f"crop_size and stride must be two positive ints, got {crop_size}, {stride}")
        self.model = model
        self.crop = (int(crop_size[0]), int(crop_size[1]))
        self.stride = (int(stride[0]), int(stride[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        (ch, cw), (sh, sw) = self.crop, self.stride
        total: torch.Tensor | None = None
        count = torch.zeros(height, width, device=x.device)
        for y in window_starts(height, ch, sh):
            for x0 in window_starts(width, cw, sw):
                window = x[..., y : y + ch, x0 : x0 + cw]
                h, w = window.shape[-2:]
                # [B, 3, ch, cw]: pad on the bottom/right when the image is smaller than the crop
                window = F.pad(window, (0, cw - w, 0, ch - h))
                logits = upsample_logits(main_logits(self.model(window)), (ch, cw))[..., :h, :w]
                if total is None:
                    total = x.new_zeros((x.shape[0], logits.shape[1], height, width), dtype=torch.float32)
                total[..., y : y + h, x0 : x0 + w] += logits
                count[y : y + h, x0 : x0 + w] += 1
        assert total is not None
        return total / count


def add_sliding_args(parser: argparse._ActionsContainer, crop_flag: str | None = "--crop-size",
                     stride_flag: str = "--stride") -> None:
    """``--eval-mode whole|slide``, the window size (unless ``crop_flag`` is None) and the stride."""
    parser.add_argument("--eval-mode", choices=("whole", "slide"), default="whole",
                        help="whole images (the reference protocol) or mmsegmentation-style sliding windows")
    if crop_flag is not None:
        parser.add_argument(crop_flag, type=int, nargs=2, default=None, metavar=("H", "W"),
                            help="sliding-window size (needed with --eval-mode slide)")
    parser.add_argument(stride_flag, type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="sliding-window stride (default: 2/3 of the window, rounded up)")


def maybe_sliding(model: nn.Module, mode: str, crop_size: Sequence[int] | None,
                  stride: Sequence[int] | None) -> nn.Module:
    """``model`` itself for ``whole``; a `SlidingWindow` around it for ``slide`` (ValueError if unusable)."""
    stride = check_sliding_args(mode, crop_size, stride)
    return model if stride is None else SlidingWindow(model, crop_size, stride)


def check_sliding_args(mode: str, crop_size: Sequence[int] | None,
                       stride: Sequence[int] | None) -> list[int] | None:
    """The stride to use (None for ``whole``); ValueError naming the problem for unusable options."""
    if mode == "whole":
        return None
    if mode != "slide":
        raise ValueError(f"unknown eval mode {mode!r}; expected whole or slide")
    if crop_size is None:
        raise ValueError("--eval-mode slide needs a window size (--crop-size H W)")
    if stride is None:
        stride = [-(-2 * int(c) // 3) for c in crop_size]
    if min(*crop_size, *stride) < 1:
        raise ValueError(f"window {list(crop_size)} and stride {list(stride)} must be positive")
    if any(int(s) > int(c) for s, c in zip(stride, crop_size, strict=True)):
        raise ValueError(f"stride {list(stride)} larger than the window {list(crop_size)} skips pixels")
    return [int(s) for s in stride]
