"""Synthetic data sets in each dataset's real on-disk layout, whose images are learnable from labels.

Cityscapes (the default, what ``make demo`` trains on):

Each label map is a street-like layout (sky band, buildings, road, sidewalk) overlaid with large
random ellipses and rectangles of random classes, stored as Cityscapes *labelIds*
(including ids that map to the ignore index: 0 unlabeled, 1 ego vehicle, 4 static).  Each image
paints every label id with its own base colour (drawn without repetition from a 5x5x5 grid, so two
classes differ by at least 50 in some channel) and its own texture (stripes of a class-dependent
orientation and period) plus pixel noise, so a small model learns the mapping in a few hundred
iterations (``make demo``).

    python -m fastdist.data.synthetic OUT --train 32 --val 8 --size 256 512

writes ``OUT/leftImg8bit/<split>/<city>/*``, ``OUT/gtFine/<split>/<city>/*`` and ``OUT/<split>.lst``.

The other datasets (``--dataset ade20k|voc|camvid|cocostuff164k``, see ``fastdist.data.datasets``):
label maps of horizontal bands and random shapes of a few classes spread over the whole class range,
stored as the real set stores them (ADE20K: id + 1 with 0 "other"; VOC: grey ``SegmentationClassAug``
for train, palette ``SegmentationClass`` for val, 255 borders; CamVid: grey ids with 11 void; COCO-Stuff:
stuffthingmaps with 255 unlabeled), each with a patch of the ignored id; images painted per class as for
Cityscapes, JPEG where the real set uses JPEG.  ADE20K, VOC and COCO-Stuff images vary in size (each
side drawn from [3/4, 1] of ``--size``), as theirs do.  VOC's name lists go to
``ImageSets/Segmentation/{train_aug,val}.txt``, CamVid's CIRKD lists ``camvid_<split>_list.txt`` to the
root.

Output is a deterministic function of ``--seed`` and the arguments.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fastdist.data.cityscapes import IMAGE_SUFFIX, LABEL_ID_TO_TRAIN_ID, LABEL_SUFFIX
from fastdist.data.datasets import DATASET_NAMES, get_dataset
from fastdist.data.spec import DatasetSpec

CITIES: dict[str, tuple[str, ...]] = {
    "train": ("aachen", "bochum", "bremen", "cologne"),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bielefeld"),
}
IGNORED_IDS = (0, 1, 4)
SHAPE_IDS = tuple(sorted(LABEL_ID_TO_TRAIN_ID)) + (4,)
_NUM_TEXTURES = 8


@functools.lru_cache(maxsize=4)
def _class_tables(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per label id: base colour (256, 3), texture index (256,), texture amplitude (256,)."""
    rng = np.random.default_rng([seed, 7919])
    levels = np.linspace(28, 228, 5).astype(np.int16)  # 50 apart: well above texture + noise
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    colours = np.resize(grid[rng.permutation(len(grid))], (256, 3)).astype(np.int16)
    texture = rng.integers(0, _NUM_TEXTURES, size=256)
    amplitude = rng.integers(6, 13, size=256).astype(np.int16)
    return colours, texture, amplitude


@functools.lru_cache(maxsize=2)
def _textures(height: int, width: int) -> np.ndarray:
    """(_NUM_TEXTURES, H, W) int16 stripe patterns in [-1, 1] (scaled later by the amplitude)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((_NUM_TEXTURES, height, width), np.int16)
    for k in range(_NUM_TEXTURES):
        angle = np.pi * k / _NUM_TEXTURES
        period = 4.0 + 3.0 * (k % 3)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi / period)
        out[k] = np.where(np.sin(phase) >= 0, 1, -1)
    return out


def synth_label(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (H, W) uint8 labelIds map: street layout plus random shapes."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    horizon = int(height * rng.uniform(0.3, 0.5))
    draw.rectangle([0, 0, width, horizon], fill=23)  # sky
    draw.rectangle([0, int(horizon * rng.uniform(0.3, 0.8)), width, horizon], fill=11)  # building
    draw.rectangle([0, horizon, width, height], fill=7)  # road
    draw.polygon([(0, horizon), (width // 4, horizon), (0, height)], fill=8)  # sidewalk
    draw.rectangle([0, int(height * 0.93), width, height], fill=int(rng.choice([1, 7])))  # ego / road
    for _ in range(int(rng.integers(5, 10))):
        label = int(rng.choice(SHAPE_IDS))
        x0, y0 = int(rng.integers(-width // 10, width)), int(rng.integers(-height // 10, height))
        w, h = int(rng.integers(width // 6, width // 3 + 1)), int(rng.integers(height // 5, height // 2 + 1))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=label)
        else:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=label)
    if rng.random() < 0.5:  # a patch of 'unlabeled'
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        draw.rectangle([x0, y0, x0 + width // 10, y0 + height // 10], fill=0)
    return np.asarray(img, dtype=np.uint8)


def render_image(label: np.ndarray, rng: np.random.Generator, seed: int = 0) -> np.ndarray:
    """An (H, W, 3) uint8 RGB image that is a noisy, textured, class-dependent function of ``label``."""
    colours, texture, amplitude = _class_tables(seed)
    patterns = _textures(*label.shape)
    tex = np.take_along_axis(patterns, texture[label][None].astype(np.intp), axis=0)[0]
    img = colours[label] + (amplitude[label] * tex)[..., None]
    img += rng.integers(-8, 9, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_sample(job: tuple[str, str, int, int, int, tuple[int, ...]]) -> None:
    image_path, label_path, height, width, seed, key = job
    rng = np.random.default_rng(list(key))
    label = synth_label(rng, height, width)
    Image.fromarray(label).save(label_path, compress_level=1)
    Image.fromarray(render_image(label, rng, seed)).save(image_path, compress_level=1)


def _jobs(out: Path, split: str, count: int, size: tuple[int, int], seed: int) -> list[tuple]:
    cities = CITIES[split]
    jobs = []
    for i in range(count):
        city = cities[i % len(cities)]
        stem = f"{city}_{i // len(cities):06d}_{19 + i % 7:06d}"
        image = out / "leftImg8bit" / split / city / f"{stem}{IMAGE_SUFFIX}"
        label = out / "gtFine" / split / city / f"{stem}{LABEL_SUFFIX}"
        key = (seed, ("train", "val", "test").index(split), i)
        jobs.append((str(image), str(label), size[0], size[1], seed, key))
    return jobs


def make_synthetic_cityscapes(
    out: str | os.PathLike,
    train: int = 32,
    val: int = 8,
    test: int = 0,
    size: tuple[int, int] = (256, 512),
    seed: int = 0,
    workers: int = 1,
) -> Path:
    """Write the synthetic tree and list files under ``out``; return its path. ``size`` is (H, W)."""
    root = Path(out)
    all_jobs = []
    for split, count in (("train", train), ("val", val), ("test", test)):
        jobs = _jobs(root, split, count, size, seed)
        for image, label, *_ in jobs:
            os.makedirs(os.path.dirname(image), exist_ok=True)
            os.makedirs(os.path.dirname(label), exist_ok=True)
        if count:
            lines = [f"{os.path.relpath(j[0], root)} {os.path.relpath(j[1], root)}\n" for j in jobs]
            (root / f"{split}.lst").write_text("".join(lines))
        all_jobs += jobs
    _run_jobs(_write_sample, all_jobs, workers)
    return root


def _run_jobs(write: Callable[[tuple], None], jobs: list[tuple], workers: int) -> None:
    """``write(job)`` for every job, in ``workers`` processes when more than one."""
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(write, jobs, chunksize=4))
    else:
        for job in jobs:
            write(job)


# The stored id each dataset's annotators use for "no class" (every loader maps it to the ignore index).
VOID_IDS: dict[str, int] = {"ade20k": 0, "voc": 255, "camvid": 11, "cocostuff164k": 255}
_SHAPE_CLASSES = 8  # classes per synthetic set: few enough for a small model to learn them quickly
_JPEG_QUALITY = 90
# Per split: the split's sample-name pattern (of the index) in each dataset's naming scheme.
_NAME_PATTERNS: dict[str, dict[str, str]] = {
    "ade20k": {"train": "ADE_train_{:08d}", "val": "ADE_val_{:08d}"},
    "voc": {"train": "2008_{:06d}", "val": "2007_{:06d}"},
    "camvid": {"train": "0001TP_{:06d}", "val": "0016E5_{:05d}", "test": "Seq05VD_f{:05d}"},
    "cocostuff164k": {"train": "{:012d}", "val": "{:012d}"},
}


def shape_ids(dataset: DatasetSpec) -> tuple[int, ...]:
    """The stored ids a synthetic set of ``dataset`` paints: classes spread over the whole range."""
    stored = dataset.stored_id_lut()
    train_ids = np.unique(np.linspace(0, dataset.num_classes - 1, _SHAPE_CLASSES).round().astype(int))
    return tuple(int(stored[t]) for t in train_ids)


def synth_stored_label(rng: np.random.Generator, height: int, width: int, dataset: DatasetSpec) -> np.ndarray:
    """A (H, W) uint8 map of stored ids: two bands, random shapes, and a patch of the void id."""
    ids = shape_ids(dataset)
    img = Image.new("L", (width, height), ids[0])
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, width, int(height * rng.uniform(0.2, 0.45))], fill=ids[-1])
    for _ in range(int(rng.integers(4, 8))):
        label = int(rng.choice(ids))
        x0, y0 = int(rng.integers(-width // 10, width)), int(rng.integers(-height // 10, height))
        w, h = int(rng.integers(width // 5, width // 2 + 1)), int(rng.integers(height // 5, height // 2 + 1))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=label)
    x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
    draw.rectangle([x0, y0, x0 + width // 8, y0 + height // 8], fill=VOID_IDS[dataset.name])
    return np.asarray(img, dtype=np.uint8)


def _save_label(label: np.ndarray, path: str, dataset: DatasetSpec, palette_png: bool) -> None:
    """Grey (mode L) ids, or with ``palette_png`` a palette PNG whose indices are the ids (VOC's val)."""
    if palette_png:
        img = Image.frombytes("P", (label.shape[1], label.shape[0]), label.tobytes())
        img.putpalette(dataset.flat_palette())
    else:
        img = Image.fromarray(label)
    img.save(path, compress_level=1)


def _write_dataset_sample(job: tuple) -> None:
    name, image_path, label_path, height, width, seed, key, palette_png = job
    dataset = get_dataset(name)
    rng = np.random.default_rng(list(key))
    if dataset.varying_size:
        height = int(rng.integers((3 * height + 3) // 4, height + 1))
        width = int(rng.integers((3 * width + 3) // 4, width + 1))
    label = synth_stored_label(rng, height, width, dataset)
    _save_label(label, label_path, dataset, palette_png)
    image = Image.fromarray(render_image(dataset.label_lut()[label], rng, seed))
    if dataset.image_format == "jpeg":
        image.save(image_path, quality=_JPEG_QUALITY)
    else:
        image.save(image_path, compress_level=1)


def _dataset_jobs(root: Path, dataset: DatasetSpec, split: str, count: int, size: tuple[int, int],
                  seed: int) -> tuple[list[tuple], list[str]]:
    """The sample jobs of one split and its sample names (written to the dataset's list files)."""
    if count and split not in _NAME_PATTERNS[dataset.name]:
        raise ValueError(f"{dataset.title} has no {split!r} split (it has {', '.join(dataset.splits)})")
    layout = dataset.splits.get(split)
    jobs, names = [], []
    for i in range(count):
        stem = _NAME_PATTERNS[dataset.name][split].format(i + 1)
        image = root / layout.images / f"{stem}{dataset.image_suffix}"
        label = root / layout.labels / f"{stem}{dataset.label_suffix}"
        key = (seed, ("train", "val", "test").index(split), i)
        palette_png = dataset.name == "voc" and split == "val"  # VOC's SegmentationClass PNGs
        jobs.append((dataset.name, str(image), str(label), size[0], size[1], seed, key, palette_png))
        names.append(stem)
    return jobs, names


def _write_lists(root: Path, dataset: DatasetSpec, split: str, names: list[str]) -> None:
    """VOC's name list and CamVid's CIRKD list (``image label`` per line), as the real sets have them."""
    layout = dataset.splits[split]
    if layout.names:
        path = root / layout.names[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{n}\n" for n in names))
    for list_name in layout.lists:
        lines = [f"{layout.images}/{n}{dataset.image_suffix} {layout.labels}/{n}{dataset.label_suffix}\n"
                 for n in names]
        (root / list_name).write_text("".join(lines))


def make_synthetic_dataset(
    out: str | os.PathLike,
    dataset: str = "citys",
    train: int = 32,
    val: int = 8,
    test: int = 0,
    size: tuple[int, int] = (256, 512),
    seed: int = 0,
    workers: int = 1,
) -> Path:
    """Write a synthetic tree of ``dataset`` (a ``--dataset`` name) under ``out``; return its path."""
    if dataset == "citys":
        return make_synthetic_cityscapes(out, train, val, test, size, seed, workers)
    spec = get_dataset(dataset)
    root = Path(out)
    all_jobs = []
    for split, count in (("train", train), ("val", val), ("test", test)):
        jobs, names = _dataset_jobs(root, spec, split, count, size, seed)
        for job in jobs:
            os.makedirs(os.path.dirname(job[1]), exist_ok=True)
            os.makedirs(os.path.dirname(job[2]), exist_ok=True)
        if count:
            _write_lists(root, spec, split, names)
        all_jobs += jobs
    _run_jobs(_write_dataset_sample, all_jobs, workers)
    return root


def main(argv: list[str] | None = None) -> None:
    """Command line entry: ``python -m fastdist.data.synthetic [--dataset NAME] OUT [--train N] ...``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output root (created)")
    parser.add_argument("--dataset", default="citys", choices=DATASET_NAMES, help="layout to write")
    parser.add_argument("--train", type=int, default=32, help="training images")
    parser.add_argument("--val", type=int, default=8, help="validation images")
    parser.add_argument("--test", type=int, default=0, help="test images (with labels; citys, camvid)")
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="processes (0: several for large images)")
    args = parser.parse_args(argv)
    if args.workers <= 0:
        args.workers = min(8, os.cpu_count() or 1) if args.size[0] * args.size[1] >= 512 * 1024 else 1
    try:
        root = make_synthetic_dataset(args.out, args.dataset, args.train, args.val, args.test,
                                      tuple(args.size), args.seed, args.workers)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"synthetic {get_dataset(args.dataset).title}: {args.train} train / {args.val} val / "
          f"{args.test} test at {args.size[0]}x{args.size[1]} in {root}")


if __name__ == "__main__":
    main()
