"""The scale augmentation of both loaders against an independent numpy model of cv2's resize rules.

The reference recipe scales with ``cv2.resize(img, None, fx=s, fy=s, INTER_LINEAR)`` and the label
with ``INTER_NEAREST``.  cv2 (not installed here) then maps output to source pixels with ``1 / s``
(not ``in / out``): nearest takes ``min(floor(d * (1 / s)), in - 1)`` in float64; linear takes the
float32 coordinate ``(d + 0.5) * (1 / s) - 0.5`` with 11-bit fixed-point weights, and at s = 0.5
(an integer 2x step) its INTER_AREA fast path; at s = 1 it copies.  Labels must equal that, images be
within 1 grey level (cv2's fixed-point rounding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdist.data import list_pairs
from fastdist.data.cityscapes import label_lut
from fastdist.data.dali_pipeline import DaliLoader
from fastdist.data.sampler import SCALES, Augment, SampleSpec, Schedule
from fastdist.data.torch_loader import TorchLoader

MEAN = np.array([104.00698793, 116.66876762, 122.67891434], dtype=np.float32)
SIZE = (27, 131)  # odd sizes: in * s is fractional at most scales


def cv2_size(size: int, scale: float) -> int:
    return round(size * scale)  # saturate_cast<int>(double): round half to even, as Python's round


def cv2_nearest(label: np.ndarray, scale: float) -> np.ndarray:
    """cv2 resizeNN: source ``min(cvFloor(d * ifx), in - 1)`` with ``ifx = 1. / fx`` in double."""
    rows, cols = (
        np.minimum(np.floor(np.arange(cv2_size(n, scale)) * (1.0 / scale)).astype(np.int64), n - 1)
        for n in label.shape
    )
    return label[rows][:, cols]


def float64_quirks(size: int, scale: float) -> np.ndarray:
    """Output pixels where cv2's float64 ``d * (1 / s)`` lands below the integer ``d / s`` (s = 1.3)."""
    tenths = round(scale * 10)
    d = np.arange(cv2_size(size, scale))
    return np.flatnonzero(np.floor(d * (1.0 / scale)).astype(np.int64) < (d * 10) // tenths)


def _linear_table(in_size: int, scale: float, clamp: bool):
    """cv2's per-axis table: the two source indices and their fixed-point (x 2048) weights.

    Horizontally cv2 clamps the index (weight 0 beyond the edges); vertically it keeps the raw index
    and clips the two source rows into the image.
    """
    idx0, idx1, w0, w1 = [], [], [], []
    for d in range(cv2_size(in_size, scale)):
        f = np.float32((d + 0.5) * (1.0 / scale) - 0.5)  # double arithmetic, stored as float
        s = int(np.floor(f))
        f = np.float32(f - np.float32(s))
        if clamp and s < 0:
            s, f = 0, np.float32(0)
        if clamp and s >= in_size - 1:
            s, f = in_size - 1, np.float32(0)
        idx0.append(min(max(s, 0), in_size - 1))
        idx1.append(min(max(s + 1, 0), in_size - 1))
        w0.append(int(np.rint((np.float32(1) - f) * np.float32(2048))))  # cvRound: half to even
        w1.append(int(np.rint(f * np.float32(2048))))
    return np.array(idx0), np.array(idx1), np.array(w0, np.int64), np.array(w1, np.int64)


def cv2_linear(image: np.ndarray, scale: float) -> np.ndarray:
    """cv2 INTER_LINEAR on uint8 HWC: fixed-point horizontal pass, then VResizeLinear's shifts."""
    if scale == 0.5:
        return cv2_area_half(image)
    if scale == 1.0:
        return image.copy()
    c0, c1, a0, a1 = _linear_table(image.shape[1], scale, clamp=True)
    r0, r1, b0, b1 = _linear_table(image.shape[0], scale, clamp=False)
    src = image.astype(np.int64)
    horizontal = src[:, c0] * a0[None, :, None] + src[:, c1] * a1[None, :, None]  # x 2048
    top, bottom = horizontal[r0] >> 4, horizontal[r1] >> 4
    out = (((b0[:, None, None] * top) >> 16) + ((b1[:, None, None] * bottom) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def cv2_area_half(image: np.ndarray) -> np.ndarray:
    """cv2's INTER_AREA fast path (INTER_LINEAR at fx = 0.5): mean of each 2x2 block, partial at the
    bottom/right edge (the SIMD body rounds half up, the edge half to even)."""
    height, width = image.shape[:2]
    out = np.zeros((cv2_size(height, 0.5), cv2_size(width, 0.5), image.shape[2]), np.uint8)
    src = image.astype(np.int64)
    for y in range(out.shape[0]):
        for x in range(out.shape[1]):
            block = src[2 * y : 2 * y + 2, 2 * x : 2 * x + 2]
            count = block.shape[0] * block.shape[1]
            total = block.sum((0, 1))
            out[y, x] = (total + 2) >> 2 if count == 4 else np.rint(total / count)
    return out


class FixedScales(Schedule):
    """One sample, each of the 16 recipe scales in turn, no crop offset, no flip."""

    def __init__(self) -> None:
        super().__init__(1, 1, True, max_iterations=len(SCALES))

    def epoch_shard(self, epoch: int) -> list[SampleSpec]:
        return [SampleSpec(0, Augment(SCALES[epoch], 0.0, 0.0, False))]


@pytest.fixture(scope="module")
def textured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random pixels and random labelIds: every source pixel matters."""
    root = tmp_path_factory.mktemp("scale")
    rng = np.random.default_rng(5)
    stem = "town_000000_000019"
    for sub, name, arr in (
        ("leftImg8bit", "_leftImg8bit", rng.integers(0, 256, (*SIZE, 3), dtype=np.uint8)),
        ("gtFine", "_gtFine_labelIds", rng.integers(0, 34, SIZE, dtype=np.uint8)),
    ):
        path = root / sub / "train" / "town" / f"{stem}{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)
    return root


def test_reference_model_sanity() -> None:
    """The numpy cv2 model itself: identity at 1, exact 2x nearest, and 1.3's float64 quirk."""
    image = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    assert np.array_equal(cv2_linear(image, 1.0), image)
    assert np.array_equal(cv2_nearest(image[..., 0], 2.0), image[..., 0].repeat(2, 0).repeat(2, 1))
    flat = np.full((5, 7, 3), 77, np.uint8)
    assert all((cv2_linear(flat, s) == 77).all() for s in SCALES)  # weights sum to 2048
    row = np.arange(40)[None, :]
    picked = cv2_nearest(row, 1.3)[0]
    assert picked[13] == 10 and picked[39] == 29  # 39 * (1 / 1.3) = 29.999999999999996 in float64


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_every_scale_matches_cv2(textured: Path, backend: str) -> None:
    (pair,) = list_pairs(textured, "train")
    image = np.asarray(Image.open(pair.image))[..., ::-1]  # BGR, as cv2.imread
    label = label_lut()[np.asarray(Image.open(pair.label))]
    crop = (2 * SIZE[0] + 1, 2 * SIZE[1] + 1)  # the whole scaled image fits: nothing is cropped
    args = (list_pairs(textured, "train"), FixedScales(), crop, torch.device("cpu"))
    cls = TorchLoader if backend == "torch" else DaliLoader
    ld = cls(*args, 0 if backend == "torch" else 1, False, torch.float32)
    batches = [(x.clone(), y.clone()) for x, y in ld]
    assert len(batches) == len(SCALES)
    for scale, (images, labels) in zip(SCALES, batches, strict=True):
        want_label = cv2_nearest(label, scale)
        want_image = cv2_linear(image, scale).astype(np.int64)
        height, width = want_label.shape
        got_label = labels[0].numpy()
        rows, cols = (np.ones(n, bool) for n in want_label.shape)
        if backend == "dali":  # an affine ROI cannot follow cv2's non-affine float64 rounding there
            rows[float64_quirks(SIZE[0], scale)], cols[float64_quirks(SIZE[1], scale)] = False, False
            assert rows.all() and cols.all() or scale == 1.3
        agree = got_label[:height, :width] == want_label
        assert agree[rows][:, cols].all(), f"labels differ at scale {scale}"
        assert (got_label[height:] == 255).all() and (got_label[:, width:] == 255).all()
        got = torch.round(images[0].permute(1, 2, 0) + torch.from_numpy(MEAN)).to(torch.int64).numpy()
        diff = np.abs(got[:height, :width] - want_image)
        assert diff.max() <= 1, f"scale {scale}: {diff.max()} grey levels off"
        assert (diff > 0).mean() < 0.2, f"scale {scale}: {(diff > 0).mean():.3f} of the pixels off"
