"""Data for fastdist: ``build_loader`` (DALI or torch backend), checks, synthetic data, for every dataset.

``dataset`` (a ``--dataset`` name or a :class:`DatasetSpec`: ``citys``, the default, ``ade20k``,
``voc``, ``camvid``, ``cocostuff164k``; see ``fastdist.data.datasets``) decides the layout, the
label map and the label checks.

``build_loader(root, split, batch_size, ...)`` yields ``(images, labels)``: images (B, 3, H, W) in
``dtype`` on ``device`` (channels-last memory unless ``channels_last=False``), BGR minus
:data:`~fastdist.data.cityscapes.MEAN_BGR`; labels (B, H, W) int64 train ids, 255 for ignore.
``split="train"`` is augmented (random scale from {0.5, ..., 2.0}, pad, random crop, flip) and
yields ``max_iterations`` batches per rank; other splits yield every image once over all ranks,
unaugmented.  The ``test`` split works without its label folder (labels are then all 255);
:func:`list_pairs` gives the image paths in loader order (rank ``r`` of ``w`` takes ``pairs[r::w]``).
Before any loading, ``build_loader`` checks the names and every file's header (:func:`check_pairs`:
images readable, labels 8-bit single-channel maps of the dataset's kind and of their image's size), so
both backends refuse bad pairs with
a :class:`DatasetError` instead of yielding wrong labels.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from fastdist.data.datasets import DATASET_NAMES, DATASETS, get_dataset
from fastdist.data.loader import Loader
from fastdist.data.pairs import DatasetLike, check_dataset, check_pairs, list_pairs, resolve_dataset
from fastdist.data.sampler import Schedule
from fastdist.data.spec import DatasetError, DatasetSpec, Pair

__all__ = [
    "BACKENDS", "DALI_HINT", "DATASETS", "DATASET_NAMES", "DatasetError", "DatasetSpec", "Loader", "Pair",
    "build_loader", "check_dataset", "check_pairs", "dali_available", "default_backend", "get_dataset",
    "list_pairs",
]  # fmt: skip

BACKENDS = ("dali", "torch")
DALI_HINT = ("the 'dali' data backend needs NVIDIA DALI (pip install nvidia-dali-cuda120, or the project's "
             "[dali] extra); without it use the 'torch' backend (--loader torch)")


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:  # no "nvidia" package at all
        return False


def default_backend(device: str | torch.device) -> str:
    """``"dali"`` on CUDA when DALI is installed, else ``"torch"``."""
    return "dali" if torch.device(device).type == "cuda" and dali_available() else "torch"


def build_loader(
    root: str | os.PathLike,
    split: str,
    batch_size: int,
    crop_size: tuple[int, int] = (512, 1024),
    backend: str = "dali",
    device: str | torch.device = "cuda",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_threads: int = 4,
    max_iterations: int | None = None,
    start_iteration: int = 0,
    channels_last: bool = True,
    dtype: torch.dtype = torch.float32,
    augment: bool | None = None,
    list_file: str | os.PathLike | None = None,
    check_files: bool = True,
    dataset: DatasetLike = "citys",
) -> Loader:
    """Build the loader of one rank (see the module docstring; the name and header checks run first).

    ``augment`` defaults to ``split == "train"`` (which also selects the iteration-based, reshuffled
    schedule); ``num_threads`` is DALI's CPU thread count or the torch backend's worker count
    (0: load in the main process); ``list_file`` replaces the folder scan by a reference list;
    ``check_files=False`` skips the header check (for callers that ran :func:`check_dataset` already).
    Unaugmented batches of a dataset whose image sizes vary (``DatasetSpec.varying_size``) hold one image.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend {backend!r}: expected one of {BACKENDS}")
    if backend == "dali" and not dali_available():
        raise RuntimeError(DALI_HINT)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"images must be a float dtype, got {dtype}")
    spec = resolve_dataset(dataset)
    pairs = list_pairs(root, split, list_file, spec)
    if check_files:
        check_pairs(pairs, dataset=spec)
    train = split == "train" if augment is None else augment
    if not train and spec.varying_size and batch_size != 1:
        raise ValueError(f"{spec.title} images vary in size, so the unaugmented {split!r} split loads one "
                         f"image per batch and rank (batch_size=1), got batch_size={batch_size}")
    schedule = Schedule(
        len(pairs), batch_size, train, rank, world_size, seed, max_iterations, start_iteration
    )
    crop = (int(crop_size[0]), int(crop_size[1]))
    dev = torch.device(device)
    if backend == "torch":
        from fastdist.data.torch_loader import TorchLoader

        return TorchLoader(pairs, schedule, crop, dev, num_threads, channels_last, dtype, spec)
    from fastdist.data.dali_pipeline import DaliLoader

    return DaliLoader(pairs, schedule, crop, dev, num_threads, channels_last, dtype, spec)
