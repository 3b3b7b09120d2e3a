"""Sliding-window inference against hand computations on toy models with known outputs."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fastdist.engine.evaluation import evaluate
from fastdist.engine.inference import infer_logits
from fastdist.engine.sliding import SlidingWindow, check_sliding_args, maybe_sliding, window_starts


class PixelLinear(nn.Module):
    """1x1 convolution: translation-equivariant and local, so every window agrees with the whole image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1).double()
        torch.nn.init.normal_(self.conv.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.double())


class WindowMean(nn.Module):
    """Every output pixel is the mean of channel 0 over the window (depends on the window position)."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mean = x[:, :1].double().mean(dim=(2, 3), keepdim=True)
        return {"out": mean.expand(-1, 1, x.shape[2], x.shape[3])}


def test_window_starts_by_hand() -> None:
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]  # the last window ends at the border
    assert window_starts(3, 4, 3) == [0]  # image smaller than the crop: one (padded) window
    assert window_starts(4, 4, 1) == [0]


def test_slide_equals_whole_for_a_pixelwise_model() -> None:
    x = torch.randn(2, 3, 13, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model = PixelLinear()
    whole = model(x).float()
    for crop, stride in [((5, 6), (3, 4)), ((13, 17), (13, 17)), ((20, 30), (10, 10)), ((4, 4), (4, 4))]:
        slid = SlidingWindow(model, crop, stride)(x)
        assert slid.shape == (2, 4, 13, 17)
        torch.testing.assert_close(slid, whole, atol=1e-5, rtol=1e-5)


def test_slide_average_matches_a_hand_computation() -> None:
    """A position-dependent model: each pixel = mean over windows covering it of that window's mean."""
    height, width, crop, stride = 7, 9, (4, 5), (2, 3)
    x = torch.arange(height * width, dtype=torch.float64).reshape(1, 1, height, width).expand(1, 3, -1, -1)
    expected = torch.zeros(height, width, dtype=torch.float64)
    count = torch.zeros(height, width, dtype=torch.float64)
    for y, x0 in itertools.product([0, 2, 3], [0, 3, 4]):  # window_starts worked out by hand
        expected[y : y + 4, x0 : x0 + 5] += x[0, 0, y : y + 4, x0 : x0 + 5].mean()
        count[y : y + 4, x0 : x0 + 5] += 1
    expected /= count
    got = SlidingWindow(WindowMean(), crop, stride)(x)
    torch.testing.assert_close(got[0, 0].double(), expected, atol=1e-4, rtol=1e-6)


def test_small_image_is_padded_with_zeros() -> None:
    x = torch.ones(1, 3, 3, 4, dtype=torch.float64)
    got = SlidingWindow(WindowMean(), (6, 8), (4, 4))(x)
    # one 6x8 window, 12 of its 48 pixels are the image (ones), the rest zero padding
    torch.testing.assert_close(got, torch.full((1, 1, 3, 4), 12 / 48), atol=1e-6, rtol=0)


def test_evaluate_in_slide_mode_scores_like_whole() -> None:
    torch.manual_seed(2)
    images = torch.randn(3, 3, 12, 14)
    model = PixelLinear()
    labels = model(images).argmax(1)
    loader = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    res = evaluate(maybe_sliding(model, "slide", (5, 5), None), loader, 4, "cpu")
    assert res["pixAcc"] == pytest.approx(1.0)
    flipped = infer_logits(SlidingWindow(model, (5, 5), (3, 3)), images, scales=(1.0, 0.5), flip=True)
    torch.testing.assert_close(flipped, infer_logits(model, images, scales=(1.0, 0.5), flip=True),
                               atol=1e-5, rtol=1e-5)


def test_bad_options_are_named() -> None:
    assert maybe_sliding(nn.Identity(), "whole", None, None).__class__ is nn.Identity
    assert check_sliding_args("slide", (9, 12), None) == [6, 8]
    with pytest.raises(ValueError, match="window size"):
        check_sliding_args("slide", None, None)
    with pytest.raises(ValueError, match="skips pixels"):
        check_sliding_args("slide", (8, 8), (9, 4))
    with pytest.raises(ValueError, match="unknown eval mode"):
        check_sliding_args("tiles", (8, 8), None)
