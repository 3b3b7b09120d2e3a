"""The declarative description of a segmentation dataset, shared by the pair checks and both loaders.

A :class:`DatasetSpec` says where a split's files are (:class:`SplitLayout`: image and label folders
under the root, how images and labels pair), what the label files hold (class names and palette, the
map from the ids stored in the label PNGs to train ids, every other stored id becoming
:attr:`DatasetSpec.ignore_index`, the PIL modes a label file may have) and the recipe defaults of
CIRKD's scripts for it (:class:`Recipe`).  Nothing here reads files: ``fastdist.data.pairs`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


class DatasetError(ValueError):
    """A dataset that cannot be used: missing/extra/unreadable files, an empty split, bad batches."""


@dataclass(frozen=True)
class Pair:
    """One sample: absolute image path, absolute label path (None: no label), and its name."""

    image: str
    label: str | None
    name: str


@dataclass(frozen=True)
class SplitLayout:
    """Where one split lives under the dataset root.

    Images are the files ending in the dataset's image suffix below ``images``, labels those ending
    in its label suffix below ``labels``, paired by their path relative to the folder minus the
    suffix.  With ``names`` (candidate list files of sample names, one per line, relative to the root,
    the first that exists is used) the split is those names alone: ``images/<name><image suffix>``
    and ``labels/<name><label suffix>`` (Pascal VOC: every image lies in one folder).  ``lists``
    are reference list files (``image_path label_path`` per line) used when ``images`` is absent.
    """

    images: str
    labels: str
    names: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recipe:
    """Training and evaluation defaults of CIRKD's scripts for one dataset (every flag overrides them).

    Evaluation is CIRKD's ``eval.py`` protocol for every dataset: the whole image at scale 1.0 without
    flip, one image per batch and rank where image sizes vary (:attr:`DatasetSpec.varying_size`).
    """

    crop_size: tuple[int, int]  # (height, width) of the training crops
    batch_size: int  # global batch (all ranks together)
    max_iterations: int
    lr: float
    val_split: str  # what training validates on
    eval_split: str  # what eval.py scores by default (the split CIRKD's eval.py reads)
    source: str  # where the numbers come from (CIRKD script or argument default)


@dataclass(frozen=True, eq=False)
class DatasetSpec:
    """One dataset: layout, label convention and recipe (see the module docstring)."""

    name: str  # the --dataset value
    reference_name: str  # CIRKD's name, in checkpoint names (deeplabv3_resnet101_<it>_best_model.pth)
    title: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]  # RGB per train id
    label_map: Mapping[int, int]  # stored label id -> train id; every other id is ignored
    splits: Mapping[str, SplitLayout]
    image_suffix: str
    label_suffix: str
    image_format: str  # "png" or "jpeg": DALI decodes JPEG on the GPU (nvJPEG), PNG on its CPU threads
    varying_size: bool  # images of different sizes: validation runs one image per batch
    recipe: Recipe
    label_kind: str = "label"  # what the error messages call a label file
    label_modes: tuple[str, ...] = ("L",)  # PIL modes a label may have ("P": palette indices are the ids)
    refused_label_suffixes: tuple[str, ...] = ()  # files beside the labels that are not label maps
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def host_label_decode(self) -> bool:
        """Whether labels must be decoded on the host: DALI expands a palette PNG to colours."""
        return "P" in self.label_modes

    def label_lut(self) -> np.ndarray:
        """The 256-entry uint8 table stored id -> train id (``ignore_index`` for every unlisted id)."""
        lut = np.full(256, self.ignore_index, dtype=np.uint8)
        for stored, train_id in self.label_map.items():
            lut[stored] = train_id
        return lut

    def stored_id_lut(self) -> np.ndarray:
        """The 256-entry uint8 table train id -> stored label id, for prediction files (0 for the rest)."""
        lut = np.zeros(256, dtype=np.uint8)
        for stored, train_id in self.label_map.items():
            lut[train_id] = stored
        return lut

    def flat_palette(self) -> list[int]:
        """The palette as a 768-entry PIL palette (entries beyond the classes black)."""
        flat = [channel for colour in self.palette for channel in colour]
        return flat + [0] * (768 - len(flat))
