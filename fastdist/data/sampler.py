"""The iteration schedule shared by both backends: which sample each rank loads, when, and how.

Everything random lives here, drawn from the seed in the main process, so the DALI and the torch
backend load the same samples in the same order with the same augmentation parameters, any worker
count gives the same batches, and a run resumed at ``start_iteration`` continues the exact data
order of an uninterrupted run.

Training (DistributedSampler-style): epoch ``e`` is the permutation ``default_rng(seed + e)`` of all
samples, padded by wrapping to a multiple of ``world_size``; rank ``r`` takes positions
``r, r + world_size, ...``.  A rank's stream is its shards of epochs 0, 1, 2, ... concatenated, and
batch ``i`` holds stream positions ``i*B .. i*B + B - 1`` (so batches may straddle epochs).
Validation/test: rank ``r`` takes samples ``r, r + world_size, ...`` in order, once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# The reference draws 0.5 + randint(0, 15) / 10.0: the 16 scales 0.5, 0.6, ..., 2.0.
SCALES: tuple[float, ...] = tuple(0.5 + i / 10.0 for i in range(16))


@dataclass(frozen=True)
class Augment:
    """Random draws of one training sample (resolved against the image size by :func:`plan_crop`)."""

    scale: float
    u_y: float  # uniform [0, 1): picks the crop row offset among the valid ones
    u_x: float
    flip: bool


@dataclass(frozen=True)
class SampleSpec:
    """What to load: the sample's index in the pair list and its augmentation (None: none)."""

    index: int
    augment: Augment | None = None


@dataclass(frozen=True)
class CropPlan:
    """A training sample's geometry: resize by ``scale`` to (height, width), crop at (top, left), flip.

    The resize maps output to source pixels with ``1 / scale`` (as cv2 ``resize(fx=fy=scale)`` does),
    not with ``size / height``: the two differ when ``height * scale`` is not an integer.

    The scaled image is padded at the bottom/right to the crop size before cropping (as the
    reference does), so ``valid_h``/``valid_w`` rows/columns of the crop hold image pixels; the
    valid columns are the left ones, or the right ones after a flip.
    """

    scale: float
    height: int
    width: int
    top: int
    left: int
    flip: bool
    valid_h: int
    valid_w: int


def _offset(u: float, extent: int, crop: int) -> int:
    span = max(extent, crop) - crop  # valid offsets: 0 .. span
    return min(int(math.floor(u * (span + 1))), span)


def plan_crop(height: int, width: int, augment: Augment, crop_size: tuple[int, int]) -> CropPlan:
    """Resolve a sample's draws against its image size (cv2 ``fx/fy`` output size: round half even)."""
    scaled_h, scaled_w = round(height * augment.scale), round(width * augment.scale)
    top, left = _offset(augment.u_y, scaled_h, crop_size[0]), _offset(augment.u_x, scaled_w, crop_size[1])
    return CropPlan(
        augment.scale, scaled_h, scaled_w, top, left, augment.flip,
        min(crop_size[0], scaled_h - top), min(crop_size[1], scaled_w - left),
    )  # fmt: skip


def nearest_sources(start: int, count: int, in_size: int, scale: float) -> np.ndarray:
    """Source pixels of output pixels ``start .. start+count-1`` of a nearest-neighbour resize by ``scale``.

    cv2 INTER_NEAREST of ``resize(fx=fy=scale)``: ``min(floor(d * (1 / scale)), in_size - 1)`` in
    float64, rounding of ``1 / scale`` included (at scale 1.3 it puts every 13th output pixel one
    source pixel before the exact ``d / 1.3``).
    """
    dst = np.arange(start, start + count, dtype=np.float64)
    return np.minimum(np.floor(dst * (1.0 / scale)).astype(np.int64), in_size - 1)


class Schedule:
    """Batches of :class:`SampleSpec` for one rank (see the module docstring for the order)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        max_iterations: int | None = None,
        start_iteration: int = 0,
    ) -> None:
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError(f"need samples and a positive batch size, got {num_samples=}, {batch_size=}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if start_iteration < 0:
            raise ValueError(f"start_iteration must be >= 0, got {start_iteration}")
        self.num_samples, self.batch_size, self.train = num_samples, batch_size, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_rank = (
            math.ceil(num_samples / world_size) if train else len(range(rank, num_samples, world_size))
        )
        natural = math.ceil(self.per_rank / batch_size)
        total = natural if max_iterations is None or not train else max_iterations
        if max_iterations is not None and not train:
            total = min(natural, max_iterations)
        self.total_batches, self.start_iteration = total, start_iteration

    def __len__(self) -> int:
        return max(self.total_batches - self.start_iteration, 0)

    def epoch_shard(self, epoch: int) -> list[SampleSpec]:
        """This rank's samples of one training epoch, with their augmentation draws."""
        perm = np.random.default_rng(self.seed + epoch).permutation(self.num_samples)
        shard = np.resize(perm, self.per_rank * self.world_size)[self.rank :: self.world_size]
        rng = np.random.default_rng([self.seed, epoch, self.rank, self.world_size])
        scale_idx = rng.integers(0, len(SCALES), size=len(shard))
        u = rng.random(size=(len(shard), 2))
        flips = rng.random(size=len(shard)) < 0.5
        return [
            SampleSpec(int(i), Augment(SCALES[s], float(uy), float(ux), bool(f)))
            for i, s, (uy, ux), f in zip(shard, scale_idx, u, flips, strict=True)
        ]

    def _train_stream(self, start: int) -> Iterator[SampleSpec]:
        epoch, pos = divmod(start, self.per_rank)
        while True:
            yield from self.epoch_shard(epoch)[pos:]
            epoch, pos = epoch + 1, 0

    def __iter__(self) -> Iterator[list[SampleSpec]]:
        if self.train:
            stream = self._train_stream(self.start_iteration * self.batch_size)
            for _ in range(len(self)):
                yield [next(stream) for _ in range(self.batch_size)]
            return
        indices = list(range(self.rank, self.num_samples, self.world_size))
        for b in range(self.start_iteration, self.total_batches):
            chunk = indices[b * self.batch_size : (b + 1) * self.batch_size]
            yield [SampleSpec(i) for i in chunk]
