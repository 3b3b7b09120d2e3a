"""Cityscapes: the constants of the recipe and its :class:`DatasetSpec` (layout, label convention).

Layout under a root (the standard Cityscapes one)::

    leftImg8bit/{train,val,test}/<city>/<stem>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<stem>_gtFine_labelIds.png

Reference list files (``train.lst``, ``val.lst``, ...: ``image_path label_path`` per line, relative
to the root) are also accepted.  Images and labels are matched by ``<city>/<stem>``.  Labels are
*labelIds* (PIL mode ``L``); train-id, colour and instance maps (``*_gtFine_labelTrainIds.png``,
``*_gtFine_color.png``, ``*_gtFine_instanceIds.png``) are refused.  The ``test`` split works without
``gtFine/test``.  Pairing and the header checks are ``fastdist.data.pairs`` (re-exported here).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastdist.data.spec import DatasetError, DatasetSpec, Pair, Recipe, SplitLayout

__all__ = ["CITYSCAPES", "CLASS_NAMES", "DatasetError", "IGNORE_INDEX", "LABEL_ID_TO_TRAIN_ID", "MEAN_BGR",
           "NUM_CLASSES", "PALETTE", "Pair", "TRAIN_ID_TO_LABEL_ID", "label_lut"]

NUM_CLASSES = 19
IGNORE_INDEX = 255

CLASS_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

# RGB colours of the 19 train ids (the official Cityscapes palette).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
TRAIN_ID_TO_LABEL_ID: dict[int, int] = {t: i for i, t in LABEL_ID_TO_TRAIN_ID.items()}

# Per-channel mean in BGR order, subtracted from 0..255 pixel values (no division by a std).
MEAN_BGR: tuple[float, float, float] = (104.00698793, 116.66876762, 122.67891434)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
LABEL_MODE = "L"  # PIL mode of an 8-bit single-channel PNG, as every *_gtFine_labelIds.png is
# gtFine files that are not labelIds: the label LUT would silently mis-map them
NOT_LABEL_IDS_SUFFIXES = ("_gtFine_labelTrainIds.png", "_gtFine_color.png", "_gtFine_instanceIds.png")

CITYSCAPES = DatasetSpec(
    name="citys", reference_name="citys", title="Cityscapes", class_names=CLASS_NAMES, palette=PALETTE,
    label_map=LABEL_ID_TO_TRAIN_ID,
    splits={s: SplitLayout(f"leftImg8bit/{s}", f"gtFine/{s}", lists=(f"{s}.lst",)) for s in SPLITS},
    image_suffix=IMAGE_SUFFIX, label_suffix=LABEL_SUFFIX, image_format="png", varying_size=False,
    # CIRKD's Cityscapes scripts (and DIST_KD's): 512x1024 crops, 16 images, 40k iterations, lr 0.02
    recipe=Recipe((512, 1024), 16, 40000, 0.02, val_split="val", eval_split="val",
                  source="CIRKD train_kd.py / train_cirkd.py defaults (DIST_KD's recipe): --crop-size "
                         "512 1024 --batch-size 16 --lr 0.02 --max-iterations 40000"),
    label_kind="labelIds", label_modes=(LABEL_MODE,), refused_label_suffixes=NOT_LABEL_IDS_SUFFIXES,
    ignore_index=IGNORE_INDEX,
)


def label_lut() -> np.ndarray:
    """The 256-entry uint8 table labelId -> trainId (255 for every id that is not trained)."""
    return CITYSCAPES.label_lut()


_PAIRS_API = ("check_dataset", "check_pairs", "list_pairs", "load_verified")


def __getattr__(name: str) -> Any:
    """The pairing functions, for callers that import them from here (``fastdist.data.pairs`` imports
    this module's spec, so they are looked up on first use rather than imported at the top)."""
    if name in _PAIRS_API:
        from fastdist.data import pairs

        return getattr(pairs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


