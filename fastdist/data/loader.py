"""What both backends share after loading: the mean, batch checks and the final tensor layout."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from fastdist.data.cityscapes import IGNORE_INDEX, MEAN_BGR, DatasetError
from fastdist.data.sampler import Schedule

# Normalisation is float32(pixel) - float32(mean) in both backends, so they agree bit for bit.
# (The reference subtracts in float64 and rounds to float32; results differ by at most 1 ulp.)
MEAN_BGR_F32 = torch.tensor(MEAN_BGR, dtype=torch.float32)


def check_same_size(names: Sequence[str], sizes: Sequence[tuple[int, ...]]) -> None:
    """Raise :class:`DatasetError` when the images of one batch do not share a size."""
    if len(set(sizes)) > 1:
        listed = ", ".join(f"{n} {s[0]}x{s[1]}" for n, s in zip(names, sizes, strict=True))
        raise DatasetError(
            f"images of different sizes in one batch ({listed}): use batch_size=1 for this split"
        )


def finish_batch(
    images_bhwc: torch.Tensor, labels: torch.Tensor | None, channels_last: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, W, 3) float32 normalised images and (B, H, W) uint8 labels -> the loader's output.

    Images become (B, 3, H, W) in ``dtype`` (channels-last memory unless ``channels_last=False``);
    labels become int64 (all :data:`IGNORE_INDEX` when ``labels`` is None: a split without labels).
    """
    images = images_bhwc.permute(0, 3, 1, 2).to(dtype)
    if not channels_last:
        images = images.contiguous()
    if labels is None:
        b, h, w, _ = images_bhwc.shape
        return images, torch.full((b, h, w), IGNORE_INDEX, dtype=torch.int64, device=images.device)
    return images, labels.to(torch.int64)


class Loader:
    """Base of both backends: ``len()`` is the number of batches; iterating yields (images, labels)."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule

    def __len__(self) -> int:
        return len(self.schedule)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError
