"""The datasets of the field beside Cityscapes, as :class:`DatasetSpec` descriptions, and the registry.

Layouts, class counts, label maps and recipe defaults are those of CIRKD (``dataset/*.py``, its
``utils/visualize.py`` palettes and the ``train_scripts/`` of 2022); ``--dataset NAME`` picks one.
Under each root:

* ``ade20k`` (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg``,
  ``annotations/{training,validation}/*.png``; 150 classes, stored id 0 ("other") ignored, 1..150 ->
  0..149.
* ``voc`` (Pascal VOC 2012 with the SBD augmentation, CIRKD's ``VOCAug``): ``JPEGImages/<name>.jpg``;
  train: the names of ``train_aug.txt`` (10582) with ``SegmentationClassAug/<name>.png``, val: those of
  ``val.txt`` (1449) with ``SegmentationClass/<name>.png`` (palette PNGs: the palette index is the class);
  list files at the root or in ``ImageSets/Segmentation/``.  21 classes, 255 (object borders) ignored.
* ``camvid``: ``{train,val,test}/*.png`` with ``{train,val,test}annot/*.png`` (367/101/233), or CIRKD's
  list files ``camvid_<split>_list.txt``; 11 classes, stored id 11 ("void") ignored.
* ``cocostuff164k``: ``images/{train2017,val2017}/*.jpg``, ``annotations/{train2017,val2017}/*.png``
  (the stuffthingmaps: 118287/5000); 182 classes (COCO ids 1..182 stored as 0..181, the 11 thing ids
  COCO never used included, as in CIRKD), 255 ignored.  CIRKD reads name lists
  (``coco_stuff_164k_{train,val}.txt``) naming every image of the folders: scanning them is the same set.

Every stored id a dataset does not list is ignored (255 in the loaders' labels), as in Cityscapes.
Recipes (:class:`Recipe`, each with its ``source``): batch 16 and lr 0.02 everywhere; 512x512 crops and
40000 iterations for ADE20K and VOC, 80000 for COCO-Stuff; 360x360 and 40000 for CamVid, whose eval.py
scores ``test``.  (CIRKD's newer ``scripts/`` for CIRKDv2 train ADE20K and VOC for 80000 iterations.)
Validation and evaluation are whole-image, one image per batch for the datasets of varying image size.
Palettes: ADE20K's and VOC's are CIRKD's (the datasets' own), CamVid's SegNet's, COCO-Stuff's CIRKD's
choice (matplotlib jet_r; COCO-Stuff publishes no colour per id).
"""

from __future__ import annotations

import numpy as np

from fastdist.data.cityscapes import CITYSCAPES
from fastdist.data.spec import DatasetSpec, Recipe, SplitLayout

__all__ = ["ADE20K", "CAMVID", "COCOSTUFF164K", "DATASETS", "DATASET_NAMES", "VOC", "get_dataset"]

ADE20K_CLASS_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car",
    "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat",
    "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
    "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

# RGB per train id (CIRKD's utils/visualize.py ADE palette without its entry 0, the ignored 'other')
ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0), (0, 82, 255),
    (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0),
    (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255),
    (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0),
    (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0),
    (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160),
    (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163), (255, 204, 0), (255, 0, 143),
    (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122), (255, 245, 0),
    (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255),
    (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255),
    (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0),
    (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip

# The 80 COCO thing classes in id order, then the 91 stuff classes (ids 92..182) in id order.
COCO_THINGS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake",
    "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
COCO_STUFF: tuple[str, ...] = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
    "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone",
    "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass",
    "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
    "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip

VOC_CLASS_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

# CIRKD names no CamVid classes: these are SegNet's 11 (SegNet-Tutorial test_segmentation_camvid.py,
# its Road_marking merged into road), in the order of the stored ids 0..10.
CAMVID_CLASS_NAMES: tuple[str, ...] = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign symbol", "fence", "car", "pedestrian",
    "bicyclist",
)  # fmt: skip
# SegNet's CamVid colours (the same file; CIRKD has no CamVid palette)
CAMVID_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip

# COCO ids (1-based) that name no annotated class; their stored ids (id - 1) stay in the 182 classes.
_COCO_UNUSED: dict[int, str] = {
    12: "street sign", 26: "hat", 29: "shoe", 30: "eye glasses", 45: "plate", 66: "mirror", 68: "window",
    69: "desk", 71: "door", 83: "blender", 91: "hair brush",
}  # fmt: skip


def _coco_class_names() -> tuple[str, ...]:
    """The 182 names in stored-id order: the 91 thing ids (unused ones marked) then the 91 stuff ids."""
    things = iter(COCO_THINGS)
    names = [f"{_COCO_UNUSED[i]} (unused)" if i in _COCO_UNUSED else next(things) for i in range(1, 92)]
    return (*names, *COCO_STUFF)


def bit_palette(count: int) -> tuple[tuple[int, int, int], ...]:
    """The Pascal VOC colour map: class k's bits 0, 1, 2 (then 3, 4, 5, ...) fill R, G, B from the top bit."""
    colours = []
    for k in range(count):
        rgb = [0, 0, 0]
        for shift in range(8):
            for channel in range(3):
                rgb[channel] |= ((k >> (3 * shift + channel)) & 1) << (7 - shift)
        colours.append((rgb[0], rgb[1], rgb[2]))
    return tuple(colours)


# matplotlib's "jet" as (x, value) breakpoints per channel (piecewise linear between them)
_JET = {
    "r": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "g": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "b": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def jet_r_palette(count: int) -> tuple[tuple[int, int, int], ...]:
    """CIRKD's COCO-Stuff colours: ``uint8(255 * jet_r(k / count))`` for k = 0 .. count-1.

    As matplotlib evaluates a colormap: a 256-entry table sampled at ``linspace(0, 1, 256)`` of the
    reversed breakpoints, entry ``floor(256 * x)`` (x in float32, as CIRKD divides), then truncated.
    """
    grid = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(grid, [1.0 - x for x, _ in points[::-1]], [v for _, v in points[::-1]])
                      for points in _JET.values()], axis=-1)  # [256, 3]
    index = np.minimum((np.arange(count, dtype=np.float32) / np.float32(count) * 256).astype(np.int64), 255)
    return tuple(tuple(int(c) for c in row) for row in (table[index] * 255.0).astype(np.uint8))


_CIRKD_V1 = "CIRKD train_scripts/ (2022, the code DIST_KD builds on)"
_DEFAULTS = "train_cirkd.py defaults --batch-size 16 --lr 0.02 --max-iterations 40000"

ADE20K = DatasetSpec(
    name="ade20k", reference_name="ade20k", title="ADE20K", class_names=ADE20K_CLASS_NAMES,
    palette=ADE20K_PALETTE, label_map={k: k - 1 for k in range(1, 151)},
    splits={"train": SplitLayout("images/training", "annotations/training"),
            "val": SplitLayout("images/validation", "annotations/validation")},
    image_suffix=".jpg", label_suffix=".png", image_format="jpeg", varying_size=True,
    recipe=Recipe((512, 512), 16, 40000, 0.02, val_split="val", eval_split="val",
                  source=f"{_CIRKD_V1} train_cirkd/ade20k/deeplabv3_res18.sh: --batch-size 16 "
                         "--crop-size 512 512 --lr 0.02 --max-iterations 40000"),
)

VOC = DatasetSpec(
    name="voc", reference_name="voc", title="Pascal VOC", class_names=VOC_CLASS_NAMES,
    palette=bit_palette(21), label_map={k: k for k in range(21)},
    splits={"train": SplitLayout("JPEGImages", "SegmentationClassAug",
                                 names=("train_aug.txt", "ImageSets/Segmentation/train_aug.txt")),
            "val": SplitLayout("JPEGImages", "SegmentationClass",
                               names=("val.txt", "ImageSets/Segmentation/val.txt"))},
    image_suffix=".jpg", label_suffix=".png", image_format="jpeg", varying_size=True,
    recipe=Recipe((512, 512), 16, 40000, 0.02, val_split="val", eval_split="val",
                  source=f"{_CIRKD_V1} train_cirkd/voc/*.sh: --crop-size 512 512; {_DEFAULTS}"),
    label_modes=("L", "P"),
)

CAMVID = DatasetSpec(
    name="camvid", reference_name="camvid", title="CamVid", class_names=CAMVID_CLASS_NAMES,
    palette=CAMVID_PALETTE, label_map={k: k for k in range(11)},
    splits={s: SplitLayout(s, f"{s}annot", lists=(f"camvid_{s}_list.txt",))
            for s in ("train", "val", "test")},
    image_suffix=".png", label_suffix=".png", image_format="png", varying_size=False,
    recipe=Recipe((360, 360), 16, 40000, 0.02, val_split="val", eval_split="test",
                  source=f"{_CIRKD_V1} train_cirkd/camvid/*.sh: --crop-size 360 360; {_DEFAULTS}; "
                         "eval.py scores camvid_test_list.txt"),
)

# The stuffthingmaps store COCO-Stuff id - 1 (0..181) and 255 for unlabeled, which CIRKD trains on as
# they are: 182 classes (the 11 never-annotated thing ids included), 255 ignored.
COCOSTUFF164K = DatasetSpec(
    name="cocostuff164k", reference_name="coco_stuff_164k", title="COCO-Stuff-164k",
    class_names=_coco_class_names(), palette=jet_r_palette(182), label_map={k: k for k in range(182)},
    splits={s: SplitLayout(f"images/{s}2017", f"annotations/{s}2017") for s in ("train", "val")},
    image_suffix=".jpg", label_suffix=".png", image_format="jpeg", varying_size=True,
    recipe=Recipe((512, 512), 16, 80000, 0.02, val_split="val", eval_split="val",
                  source=f"{_CIRKD_V1} train_cirkd/coco_stuff_164k/deeplabv3_res18.sh: --batch-size 16 "
                         "--crop-size 512 512 --lr 0.02 --max-iterations 80000"),
)

DATASETS: dict[str, DatasetSpec] = {d.name: d for d in (CITYSCAPES, ADE20K, VOC, CAMVID, COCOSTUFF164K)}
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)


def get_dataset(name: str) -> DatasetSpec:
    """The description of ``--dataset name`` (a ``ValueError`` naming the choices otherwise)."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASET_NAMES)}") from None
