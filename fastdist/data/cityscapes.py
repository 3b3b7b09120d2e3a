"""Cityscapes layout, image/label pairing, label mapping and the constants of the recipe.

Layout under a root (the standard Cityscapes one)::

    leftImg8bit/{train,val,test}/<city>/<stem>_leftImg8bit.png
    gtFine/{train,val,test}/<city>/<stem>_gtFine_labelIds.png

Reference list files (``train.lst``, ``val.lst``, ...: ``image_path label_path`` per line, relative
to the root) are also accepted through ``list_file``.  Images and labels are matched by
``<city>/<stem>``; a missing or extra file is a :class:`DatasetError` that names the first offenders
and the count.  In a list file a label must fit its image: not the image itself, not a train-id,
colour or instance map (``*_gtFine_labelTrainIds.png``, ``*_gtFine_color.png``,
``*_gtFine_instanceIds.png``), and the same ``<stem>`` when both names follow the Cityscapes
convention (other naming is accepted as it is).  For the ``test`` split labels are optional: without a
``gtFine/test`` folder every pair has ``label=None`` and the loaders yield labels filled with
:data:`IGNORE_INDEX`.

:func:`check_pairs` reads the header of every file (no decoding; 0.05 to 0.1 s per thousand pairs from
a warm cache): each image must open, each label must be an 8-bit single-channel labelIds map (PIL mode
``L``; palette, colour and 16-bit labels are refused, the loaders would mis-read them) of its image's
size.  :func:`check_dataset` (the start-up check) and ``build_loader`` run it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

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
_MAX_NAMED = 5
_HEADER_THREADS = 8
# what PIL raises for a header it cannot use (a DecompressionBombError is not an OSError)
_HEADER_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """A dataset that cannot be used: missing/extra/unreadable files, an empty split, bad batches."""


@dataclass(frozen=True)
class Pair:
    """One sample: absolute image path, absolute label path (None: no label), and its name."""

    image: str
    label: str | None
    name: str


def label_lut() -> np.ndarray:
    """The 256-entry uint8 table labelId -> trainId (255 for every id that is not trained)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


def _unreadable_folder(exc: OSError) -> None:
    """``os.walk``'s onerror: a folder it cannot list would silently drop its pairs."""
    raise DatasetError(f"cannot read folder {exc.filename}: {exc.strerror or exc}") from exc


def _scan(folder: Path, suffix: str) -> dict[str, str]:
    """Map ``<city>/<stem>`` -> absolute path for every file ending in ``suffix`` below ``folder``."""
    found: dict[str, str] = {}
    if not folder.is_dir():
        return found
    for dirpath, _, files in os.walk(folder, onerror=_unreadable_folder):
        for fname in files:
            if fname.endswith(suffix):
                rel = os.path.relpath(os.path.join(dirpath, fname), folder)
                found[rel[: -len(suffix)]] = os.path.join(dirpath, fname)
    return found


def load_verified(path: str) -> Image.Image:
    """Decode an image file after checking its integrity (for PNG every chunk CRC, IDAT included).

    PIL's decoder skips the IDAT checksums, so a corrupt label could decode to wrong ids silently;
    DALI's decoder refuses such a file.  Raises :class:`DatasetError` naming the file.
    """
    try:
        data = io.BytesIO(Path(path).read_bytes())
        with Image.open(data) as img:
            img.verify()
        data.seek(0)
        img = Image.open(data)
        img.load()
        return img
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot decode {path}: {exc}") from exc


def _offenders(kind: str, keys: list[str]) -> str:
    """``"<count> <kind>: <first few keys, in the given order>"``."""
    shown = ", ".join(keys[:_MAX_NAMED])
    more = f" (and {len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else ""
    return f"{len(keys)} {kind}: {shown}{more}"


def _match(images: dict[str, str], labels: dict[str, str], where: str) -> list[Pair]:
    missing = sorted(k for k in images if k not in labels)
    extra = sorted(k for k in labels if k not in images)
    if missing or extra:
        parts = []
        if missing:
            parts.append(_offenders(f"image(s) without a *{LABEL_SUFFIX}", missing))
        if extra:
            parts.append(_offenders(f"label(s) without a *{IMAGE_SUFFIX}", extra))
        raise DatasetError(f"unmatched Cityscapes pairs in {where}: " + "; ".join(parts))
    return [Pair(images[k], labels[k], os.path.basename(k)) for k in sorted(images)]


def _pairs_from_layout(root: Path, split: str) -> list[Pair]:
    images = _scan(root / "leftImg8bit" / split, IMAGE_SUFFIX)
    label_dir = root / "gtFine" / split
    if split == "test" and not label_dir.is_dir():
        return [Pair(images[k], None, os.path.basename(k)) for k in sorted(images)]
    return _match(images, _scan(label_dir, LABEL_SUFFIX), f"{root} ({split})")


def _label_problem(image: str, label: str) -> str | None:
    """Why a list file's ``label`` cannot be the labelIds map of ``image`` (None: it can)."""
    image_name, label_name = os.path.basename(image), os.path.basename(label)
    if os.path.normpath(image) == os.path.normpath(label):
        return f"label {label} is the image itself"
    wrong = [s for s in NOT_LABEL_IDS_SUFFIXES if label_name.endswith(s)]
    if wrong:
        return f"label {label} is a *{wrong[0]} file, but labelIds (*{LABEL_SUFFIX}) are expected"
    cityscapes_names = image_name.endswith(IMAGE_SUFFIX) and label_name.endswith(LABEL_SUFFIX)
    if cityscapes_names and image_name[: -len(IMAGE_SUFFIX)] != label_name[: -len(LABEL_SUFFIX)]:
        return f"label {label} is not the label of image {image} (their Cityscapes stems differ)"
    return None


def _list_pair(root: Path, fields: list[str]) -> Pair:
    """The pair of one list-file line (``image_path [label_path]``, relative to ``root``)."""
    name = os.path.basename(fields[0])
    name = name[: -len(IMAGE_SUFFIX)] if name.endswith(IMAGE_SUFFIX) else name
    return Pair(str(root / fields[0]), str(root / fields[1]) if len(fields) == 2 else None, name)


def _pairs_from_list(root: Path, list_file: Path, split: str) -> list[Pair]:
    """The pairs of a list file; a line without a label is an error except for the ``test`` split."""
    pairs: list[Pair] = []
    wrong: list[str] = []
    missing: list[str] = []
    for lineno, line in enumerate(list_file.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) > 2:
            raise DatasetError(f"{list_file}:{lineno}: expected 'image_path [label_path]', got {line!r}")
        if len(fields) == 1 and split != "test":
            raise DatasetError(
                f"{list_file}:{lineno}: no label path for {fields[0]!r}: the {split!r} split needs "
                "'image_path label_path' lines (only 'test' may list images alone)"
            )
        problem = _label_problem(*fields) if len(fields) == 2 else None
        if problem is not None:
            wrong.append(f"line {lineno}: {problem}")
        pair = _list_pair(root, fields)
        missing += [p for p in (pair.image, pair.label) if p is not None and not os.path.isfile(p)]
        pairs.append(pair)
    found = (("wrong label(s)", wrong), ("missing file(s)", missing))
    parts = [_offenders(kind, keys) for kind, keys in found if keys]
    if parts:
        raise DatasetError(f"list file {list_file}: " + "; ".join(parts))
    return pairs


def list_pairs(root: str | os.PathLike, split: str, list_file: str | os.PathLike | None = None) -> list[Pair]:
    """All (image, label) pairs of a split, sorted by name; raises :class:`DatasetError` on any problem.

    ``list_file`` (a reference ``*.lst``, relative paths resolved against ``root``) replaces the
    folder scan; without it the folders are scanned, falling back to ``root/<split>.lst`` when the
    ``leftImg8bit/<split>`` folder does not exist.
    """
    root_path = Path(root)
    if not root_path.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder")
    if list_file is None and not (root_path / "leftImg8bit" / split).is_dir():
        fallback = root_path / f"{split}.lst"
        if fallback.is_file():
            list_file = fallback
    if list_file is not None:
        pairs = _pairs_from_list(root_path, Path(list_file), split)
    else:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}: expected one of {SPLITS} or a list file")
        pairs = _pairs_from_layout(root_path, split)
    if not pairs:
        raise DatasetError(f"split {split!r} under {root} is empty: no *{IMAGE_SUFFIX} files found")
    return pairs


def _header(path: str) -> tuple[str, tuple[int, int], bool]:
    """(PIL mode, (height, width), more than 8 bits per sample) of an image file, from its header.

    PIL reads 16-bit grey as mode ``I;16`` and 16-bit RGB as ``RGB`` (the high bytes), DALI decodes
    them otherwise, and the recipe's 0..255 mean has no meaning for them: both are refused.
    """
    with Image.open(path) as img:
        raw_modes = [str(tile.args) for tile in img.tile]
        wide = img.mode.startswith(("I", "F")) or any(";16" in raw for raw in raw_modes)
        return img.mode, (img.height, img.width), wide


def _pair_problem(pair: Pair) -> tuple[str, str] | None:
    """(kind, description) of the first problem in one pair's file headers; None when it is usable."""
    try:
        _, image_size, wide = _header(pair.image)
    except _HEADER_ERRORS as exc:
        return "unreadable image(s)", f"{pair.image} ({exc})"
    if wide:
        return "16-bit image(s) (8 bits per channel expected)", pair.image
    if pair.label is None:
        return None
    try:
        mode, label_size, _ = _header(pair.label)
    except _HEADER_ERRORS as exc:
        return "unreadable label(s)", f"{pair.label} ({exc})"
    if mode != LABEL_MODE:
        kind = f"label(s) not 8-bit single-channel labelIds (*{LABEL_SUFFIX}, PIL mode {LABEL_MODE!r})"
        return kind, f"{pair.label} (mode {mode!r})"
    if label_size != image_size:
        (ih, iw), (lh, lw) = image_size, label_size
        kind = "image/label pair(s) of different sizes (height x width)"
        return kind, f"{pair.image} is {ih}x{iw} but {pair.label} is {lh}x{lw}"
    return None


def check_pairs(pairs: Sequence[Pair], threads: int = _HEADER_THREADS) -> None:
    """Raise :class:`DatasetError` unless every image opens and every label is labelIds of its image's size.

    Reads only the file headers (``threads`` at a time); the error names the first few offenders of
    each kind (unreadable image or label, label not 8-bit single-channel, sizes differ) and the counts.
    """
    with ThreadPoolExecutor(max_workers=threads) as pool:
        problems = [p for p in pool.map(_pair_problem, pairs) if p is not None]
    if problems:
        by_kind: dict[str, list[str]] = {}
        for kind, what in problems:
            by_kind.setdefault(kind, []).append(what)
        found = "; ".join(_offenders(kind, keys) for kind, keys in by_kind.items())
        checked = f"{len(problems)} of the {len(pairs)} image/label pairs checked"
        raise DatasetError(f"{checked} are unusable: {found}")


def check_dataset(root: str | os.PathLike, split: str, list_file: str | os.PathLike | None = None,
                  rank: int = 0, world_size: int = 1) -> int:
    """Validate the pairs of a split (names, then file headers) and return their number.

    The headers of ``pairs[rank::world_size]`` are read: under torchrun every rank checks its share, so a
    large dataset on shared storage is opened once, not once per rank.
    """
    pairs = list_pairs(root, split, list_file)
    check_pairs(pairs[rank::world_size])
    return len(pairs)
