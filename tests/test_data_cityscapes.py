"""Cityscapes layout, pairing errors, constants, the synthetic generator and the shared schedule."""

from __future__ import annotations

import os
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastdist.data import DatasetError, check_dataset, list_pairs
from fastdist.data import cityscapes as cs
from fastdist.data.sampler import SCALES, Augment, Schedule, plan_crop
from fastdist.data.synthetic import main as synthetic_main
from fastdist.data.synthetic import make_synthetic_cityscapes

TRAINED = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_cityscapes(tmp_path_factory.mktemp("citys"), train=10, val=4, test=3, size=(32, 64))


def test_constants() -> None:
    assert cs.NUM_CLASSES == 19 and cs.IGNORE_INDEX == 255
    assert len(cs.CLASS_NAMES) == len(cs.PALETTE) == 19
    assert cs.CLASS_NAMES[0] == "road" and cs.CLASS_NAMES[18] == "bicycle"
    assert cs.PALETTE[0] == (128, 64, 128)
    assert [cs.LABEL_ID_TO_TRAIN_ID[i] for i in TRAINED] == list(range(19))
    assert all(cs.LABEL_ID_TO_TRAIN_ID[cs.TRAIN_ID_TO_LABEL_ID[t]] == t for t in range(19))
    lut = cs.label_lut()
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    for label_id in range(256):
        assert lut[label_id] == (TRAINED.index(label_id) if label_id in TRAINED else 255)
    assert all(m != int(m) for m in cs.MEAN_BGR)  # a real pixel minus the mean is never exactly 0


def test_synthetic_tree(synth: Path) -> None:
    assert check_dataset(synth, "train") == 10
    assert check_dataset(synth, "val") == 4
    assert check_dataset(synth, "test") == 3
    pairs = list_pairs(synth, "train")
    assert len({Path(p.image).parent.name for p in pairs}) > 1  # several cities
    for p in pairs:
        assert p.image.endswith(cs.IMAGE_SUFFIX) and p.label.endswith(cs.LABEL_SUFFIX)
        assert os.path.basename(p.image).startswith(p.name) and os.path.basename(p.label).startswith(p.name)
    # the list files name the same pairs (list order is the generator's, the scan's is sorted)
    listed = list_pairs(synth, "train", list_file=synth / "train.lst")
    assert sorted((p.image, p.label) for p in listed) == [(p.image, p.label) for p in pairs]
    image = np.asarray(Image.open(pairs[0].image))
    label = np.asarray(Image.open(pairs[0].label))
    assert image.shape == (32, 64, 3) and image.dtype == np.uint8
    assert label.shape == (32, 64) and label.dtype == np.uint8


def test_synthetic_deterministic_and_learnable(tmp_path: Path) -> None:
    synthetic_main(
        [str(tmp_path / "a"), "--train", "6", "--val", "0", "--size", "64", "128", "--workers", "1"]
    )
    make_synthetic_cityscapes(tmp_path / "b", train=6, val=0, size=(64, 128), seed=0, workers=2)
    make_synthetic_cityscapes(tmp_path / "c", train=6, val=0, size=(64, 128), seed=1)
    pa, pb, pc = (list_pairs(tmp_path / d, "train") for d in "abc")
    for a, b in zip(pa, pb, strict=True):
        assert Path(a.image).read_bytes() == Path(b.image).read_bytes()
        assert Path(a.label).read_bytes() == Path(b.label).read_bytes()
    assert Path(pa[0].label).read_bytes() != Path(pc[0].label).read_bytes()
    # images are a learnable function of the labels: nearest class-mean colour (fitted on half the
    # images, scored on the rest) recovers most labels; ignore ids (0, 1) occur too
    labels = np.stack([np.asarray(Image.open(p.label)) for p in pa])
    images = np.stack([np.asarray(Image.open(p.image)) for p in pa]).astype(np.float32)
    assert {0, 1} & set(np.unique(labels).tolist())
    ids = np.unique(labels[:3])
    means = np.stack([images[:3][labels[:3] == i].mean(0) for i in ids])
    test_px, test_lbl = images[3:].reshape(-1, 3), labels[3:].reshape(-1)
    known = np.isin(test_lbl, ids)
    pred = ids[np.argmin(((test_px[known, None] - means[None]) ** 2).sum(-1), 1)]
    assert (pred == test_lbl[known]).mean() > 0.8


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_missing_and_extra_files(tmp_path: Path) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=8, val=2, size=(16, 32))
    labels = sorted((root / "gtFine" / "train").rglob("*.png"))
    for lbl in labels[:7]:
        lbl.unlink()
    _write_png(
        root / "gtFine/train/zurich/zurich_000000_000001_gtFine_labelIds.png", np.zeros((16, 32), np.uint8)
    )
    with pytest.raises(DatasetError) as err:
        check_dataset(root, "train")
    msg = str(err.value)
    assert "7 image(s) without" in msg and "(and 2 more)" in msg
    assert labels[0].name.replace(cs.LABEL_SUFFIX, "") in msg
    assert "1 label(s) without" in msg and "zurich_000000_000001" in msg
    assert check_dataset(root, "val") == 2


def test_empty_and_bad_roots(tmp_path: Path) -> None:
    root = make_synthetic_cityscapes(tmp_path / "r", train=2, val=0, size=(16, 32))
    with pytest.raises(DatasetError, match="empty"):
        check_dataset(root, "val")
    with pytest.raises(DatasetError, match="does not exist"):
        check_dataset(tmp_path / "nowhere", "train")
    with pytest.raises(DatasetError, match="unknown split"):
        check_dataset(root, "trian")
    (root / "bad.lst").write_text("leftImg8bit/train/x_leftImg8bit.png gtFine/train/x_gtFine_labelIds.png\n")
    with pytest.raises(DatasetError, match="missing file"):
        list_pairs(root, "train", list_file=root / "bad.lst")
    assert issubclass(DatasetError, ValueError)


def test_test_split_without_labels(synth: Path, tmp_path: Path) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=1, val=0, test=3, size=(16, 32))
    for lbl in (root / "gtFine" / "test").rglob("*.png"):
        lbl.unlink()
    for d in sorted((root / "gtFine" / "test").iterdir()):
        d.rmdir()
    (root / "gtFine" / "test").rmdir()
    pairs = list_pairs(root, "test")
    assert len(pairs) == 3 and all(p.label is None for p in pairs)
    assert all(p.label is not None for p in list_pairs(synth, "test"))


# ----------------------------------------------------------------------------- header check


def _bad_label(kind: str, shape: tuple[int, int]) -> Image.Image:
    """A label that is not an 8-bit single-channel labelIds map (or is of another size)."""
    ids = np.full(shape, 7, np.uint8)
    if kind == "palette":
        return Image.fromarray(ids).convert("P")
    if kind == "rgb":
        return Image.fromarray(np.stack([ids] * 3, -1))
    if kind == "16-bit":
        return Image.fromarray(ids.astype(np.uint16))
    return Image.fromarray(np.full((shape[0], shape[1] + 2), 7, np.uint8))  # "size"


@pytest.mark.parametrize("kind", ["palette", "rgb", "16-bit"])
def test_header_check_refuses_labels_that_are_not_label_ids(tmp_path: Path, kind: str) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=0, val=3, size=(16, 32))
    bad = list_pairs(root, "val")[1].label
    _bad_label(kind, (16, 32)).save(bad)
    mode = Image.open(bad).mode
    assert mode != "L"
    with pytest.raises(DatasetError) as err:
        check_dataset(root, "val")
    msg = str(err.value)
    assert f"{bad} (mode {mode!r})" in msg and "8-bit single-channel labelIds" in msg
    assert "1 of the 3 image/label pairs checked" in msg


def test_header_check_names_both_files_of_a_size_mismatch(tmp_path: Path) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=0, val=3, size=(16, 32))
    pair = list_pairs(root, "val")[2]
    _bad_label("size", (16, 32)).save(pair.label)
    with pytest.raises(DatasetError) as err:
        check_dataset(root, "val")
    assert f"{pair.image} is 16x32 but {pair.label} is 16x34" in str(err.value)
    assert "1 image/label pair(s) of different sizes" in str(err.value)


@pytest.mark.parametrize("which", ["image", "label"])
def test_header_check_names_unreadable_files(tmp_path: Path, which: str) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=0, val=2, size=(16, 32))
    bad = getattr(list_pairs(root, "val")[0], which)
    Path(bad).write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match=f"1 unreadable {which}") as err:
        check_dataset(root, "val")
    assert f"{bad} (cannot identify image file" in str(err.value)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")


def _png_header(height: int, width: int) -> bytes:
    """A PNG (8-bit grayscale) whose header claims ``height`` x ``width``; its image data is empty."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"")


def test_header_check_names_a_decompression_bomb(tmp_path: Path) -> None:
    """A header claiming 40000 x 40000 pixels (PIL refuses it with its own exception type)."""
    root = make_synthetic_cityscapes(tmp_path, train=0, val=2, size=(16, 32))
    bad = list_pairs(root, "val")[1].label
    Path(bad).write_bytes(_png_header(40000, 40000))
    with pytest.raises(DatasetError, match="1 unreadable label") as err:
        check_dataset(root, "val")
    assert bad in str(err.value) and "decompression bomb" in str(err.value)


def test_check_dataset_reads_the_headers_of_its_rank_only(tmp_path: Path) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=0, val=4, size=(16, 32))
    bad = list_pairs(root, "val")[2].image
    Path(bad).write_bytes(b"\x89PNG not really")
    assert check_dataset(root, "val", rank=1, world_size=2) == 4  # pairs 1 and 3
    with pytest.raises(DatasetError, match="1 unreadable image"):
        check_dataset(root, "val", rank=0, world_size=2)  # pairs 0 and 2


def test_header_check_counts_offenders_of_each_kind(tmp_path: Path) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=9, val=0, size=(16, 32))
    pairs = list_pairs(root, "train")
    for pair in pairs[:7]:
        _bad_label("size", (16, 32)).save(pair.label)
    _bad_label("rgb", (16, 32)).save(pairs[8].label)
    with pytest.raises(DatasetError) as err:
        check_dataset(root, "train")
    msg = str(err.value)
    assert "8 of the 9 image/label pairs checked are unusable" in msg
    assert "7 image/label pair(s) of different sizes" in msg and "(and 2 more)" in msg
    assert pairs[0].label in msg and pairs[6].label not in msg  # the first five, in pair order
    assert "1 label(s) not 8-bit" in msg and pairs[8].label in msg and pairs[7].label not in msg


# ----------------------------------------------------------------------------- list files


def _list_columns(root: Path) -> tuple[list[str], list[str]]:
    lines = (root / "train.lst").read_text().splitlines()
    return [line.split()[0] for line in lines], [line.split()[1] for line in lines]


def _write_list(root: Path, images: list[str], labels: list[str]) -> Path:
    path = root / "custom.lst"
    path.write_text("".join(f"{i} {lbl}\n" for i, lbl in zip(images, labels, strict=True)))
    return path


def test_list_file_shifted_label_column(tmp_path: Path) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=4, val=0, size=(16, 32))
    images, labels = _list_columns(root)
    lst = _write_list(root, images, labels[1:] + labels[:1])
    assert all(os.path.isfile(root / lbl) for lbl in labels)  # every file exists: only the names tell
    with pytest.raises(DatasetError) as err:
        check_dataset(root, "train", lst)
    msg = str(err.value)
    assert str(lst) in msg and "4 wrong label(s)" in msg and "missing" not in msg
    assert f"line 1: label {labels[1]} is not the label of image {images[0]}" in msg


def test_list_file_label_is_the_image(tmp_path: Path) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=2, val=0, size=(16, 32))
    images, labels = _list_columns(root)
    lst = _write_list(root, images, [labels[0], "./" + images[1]])
    with pytest.raises(DatasetError, match=f"line 2: label ./{images[1]} is the image itself"):
        list_pairs(root, "train", lst)


@pytest.mark.parametrize(
    "suffix", ["_gtFine_labelTrainIds.png", "_gtFine_color.png", "_gtFine_instanceIds.png"]
)
def test_list_file_label_that_is_not_label_ids(tmp_path: Path, suffix: str) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=2, val=0, size=(16, 32))
    images, labels = _list_columns(root)
    other = labels[0].replace(cs.LABEL_SUFFIX, suffix)
    (root / labels[0]).rename(root / other)  # the file exists, with the suffix of another gtFine map
    with pytest.raises(DatasetError) as err:
        list_pairs(root, "train", _write_list(root, images, [other, labels[1]]))
    msg = str(err.value)
    assert f"line 1: label {other} is a *{suffix} file, but labelIds" in msg and "1 wrong label(s)" in msg


def test_list_file_other_naming_is_accepted(tmp_path: Path) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=3, val=0, size=(16, 32))
    images, labels = _list_columns(root)
    renamed = [f"plain/{i}_label.png" for i in range(3)]
    (root / "plain").mkdir()
    for old, new in zip(labels, renamed, strict=True):
        (root / old).rename(root / new)
    lst = _write_list(root, images, renamed)
    assert check_dataset(root, "train", lst) == 3
    pairs = list_pairs(root, "train", lst)
    assert [p.label for p in pairs] == [str(root / n) for n in renamed]
    assert [p.name for p in pairs] == [os.path.basename(i)[: -len(cs.IMAGE_SUFFIX)] for i in images]


# ----------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("n", [12, 13])
def test_train_sharding(world_size: int, n: int) -> None:
    per_rank = -(-n // world_size)
    for epoch in range(3):
        shards = [Schedule(n, 2, True, r, world_size, seed=5).epoch_shard(epoch) for r in range(world_size)]
        indices = [[s.index for s in shard] for shard in shards]
        assert all(len(ix) == per_rank for ix in indices)  # equal lengths
        flat = sum(indices, [])
        assert set(flat) == set(range(n))  # complete
        assert len(flat) - len(set(flat)) == per_rank * world_size - n  # disjoint up to the padding
    e0 = [s.index for s in Schedule(n, 2, True, 0, 1, seed=5).epoch_shard(0)]
    e1 = [s.index for s in Schedule(n, 2, True, 0, 1, seed=5).epoch_shard(1)]
    assert sorted(e0) == sorted(e1) == list(range(n)) and e0 != e1  # reshuffled every epoch


@pytest.mark.parametrize("world_size", [2, 3])
def test_eval_sharding(world_size: int) -> None:
    n = 10
    per_rank = []
    for rank in range(world_size):
        sched = Schedule(n, 3, False, rank, world_size)
        batches = list(sched)
        assert len(batches) == len(sched)
        assert all(s.augment is None for b in batches for s in b)
        per_rank.append([s.index for b in batches for s in b])
    flat = sum(per_rank, [])
    assert sorted(flat) == list(range(n))  # each image exactly once
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1


def test_schedule_length_resume_and_seed() -> None:
    full = list(Schedule(7, 3, True, 1, 2, seed=3, max_iterations=9))
    assert len(full) == 9 and all(len(b) == 3 for b in full)  # batches straddle epochs
    resumed = Schedule(7, 3, True, 1, 2, seed=3, max_iterations=9, start_iteration=4)
    assert len(resumed) == 5 and list(resumed) == full[4:]
    assert list(Schedule(7, 3, True, 1, 2, seed=3, max_iterations=9)) == full  # reproducible
    assert list(Schedule(7, 3, True, 1, 2, seed=4, max_iterations=9)) != full
    assert len(Schedule(7, 3, True, 0, 1)) == 3  # default: one epoch
    assert len(Schedule(10, 4, False, 0, 1, max_iterations=2)) == 2


def test_scale_and_flip_frequencies() -> None:
    specs = [s for e in range(8) for s in Schedule(1000, 1, True, seed=11).epoch_shard(e)]
    scales = Counter(round(s.augment.scale, 6) for s in specs)
    assert sorted(scales) == [round(0.5 + 0.1 * i, 6) for i in range(16)]
    assert SCALES[0] == 0.5 and SCALES[-1] == 2.0 and len(SCALES) == 16
    expected = len(specs) / 16
    chi2 = sum((c - expected) ** 2 / expected for c in scales.values())
    assert chi2 < 40  # 15 d.o.f.: p < 1e-3
    flips = sum(s.augment.flip for s in specs) / len(specs)
    assert abs(flips - 0.5) < 0.02


def test_plan_crop() -> None:
    crop = (20, 30)
    # larger than the crop: offsets uniform over every valid value, endpoints included
    tops = Counter(
        plan_crop(40, 60, Augment(1.0, u, 0.5, False), crop).top for u in np.linspace(0, 0.999999, 2100)
    )
    assert sorted(tops) == list(range(21)) and max(tops.values()) - min(tops.values()) <= 1
    plan = plan_crop(40, 60, Augment(1.5, 0.999999, 0.0, True), crop)
    assert (plan.height, plan.width, plan.top, plan.left, plan.flip) == (60, 90, 40, 0, True)
    assert (plan.valid_h, plan.valid_w) == crop
    # smaller than the crop: offset 0, the valid part is the scaled image
    plan = plan_crop(16, 50, Augment(0.5, 0.7, 0.99, False), crop)
    assert (plan.height, plan.width, plan.top, plan.valid_h) == (8, 25, 0, 8)
    assert (plan.left, plan.valid_w) == (0, 25)
    # the scaled size is round(15 * 0.7), computed as cv2 computes it
    assert plan_crop(15, 25, Augment(0.7, 0, 0, False), crop).height == 10


# ------------------------------------------------------------------ data checks: errors, not silent drops


def test_unreadable_city_folder_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A city folder that cannot be listed is named, not silently dropped (12 pairs instead of 16).

    The tests run as root, which lists any folder, so the EACCES is raised where os.walk lists it.
    """
    root = make_synthetic_cityscapes(tmp_path, train=4, val=0, size=(16, 32))
    assert len(list_pairs(root, "train")) == 4
    city = root / "leftImg8bit" / "train" / "aachen"
    assert city.is_dir()
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(city):
            raise PermissionError(13, "Permission denied", str(city))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DatasetError, match=f"cannot read folder {city}: Permission denied"):
        list_pairs(root, "train")


@pytest.mark.parametrize("split", ["train", "val"])
def test_list_file_line_without_label_refused_outside_test(tmp_path: Path, split: str) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=2, val=0, size=(16, 32))
    images, labels = _list_columns(root)
    lst = root / "mixed.lst"
    lst.write_text(f"{images[0]} {labels[0]}\n{images[1]}\n")
    with pytest.raises(DatasetError, match=f"mixed.lst:2: no label path for '{images[1]}'"):
        list_pairs(root, split, lst)
    pairs = list_pairs(root, "test", lst)  # test images may come without labels
    assert [p.label is None for p in pairs] == [False, True]


@pytest.mark.parametrize("kind", ["grey", "rgb"])
def test_16_bit_image_refused(tmp_path: Path, kind: str) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=0, val=2, size=(16, 32))
    bad = list_pairs(root, "val")[1].image
    if kind == "grey":
        Image.fromarray(np.full((16, 32), 40000, np.uint16)).save(bad)
    else:  # 16-bit RGB: PIL opens it as mode RGB, only the PNG header says 16 bits
        rows = b"".join(b"\x00" + np.full((32, 3), 1000, ">u2").tobytes() for _ in range(16))
        header = (32).to_bytes(4, "big") + (16).to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
        idat = _chunk(b"IDAT", zlib.compress(rows))
        Path(bad).write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + idat
                              + _chunk(b"IEND", b""))  # fmt: skip
        assert Image.open(bad).mode == "RGB"
    with pytest.raises(DatasetError, match="16-bit image") as err:
        check_dataset(root, "val")
    assert bad in str(err.value)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
