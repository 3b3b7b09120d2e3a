"""ADE20K, Pascal VOC (aug), CamVid and COCO-Stuff-164k: layouts, label maps through both loaders,
pair checks, validation on images of varying size, and checkpoints with each dataset's class count.

Every dataset gets a tiny synthetic tree in its real layout (``fastdist.data.synthetic``) whose first
val label holds every stored id 0..255, so the label map is checked over the whole id range, pixel by
pixel, against the dataset's convention written out independently below (from CIRKD's
``dataset/*.py``).  DALI runs on the CPU (``device_id=None``); the torch loader decodes with PIL.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdist.data import DatasetError, build_loader, check_pairs, get_dataset, list_pairs
from fastdist.data.cityscapes import MEAN_BGR
from fastdist.data.synthetic import main as synthetic_main
from fastdist.data.synthetic import make_synthetic_dataset
from fastdist.engine.evaluation import evaluate
from fastdist.engine.inference_cli import InferenceSetupError, build_inference_model
from fastdist.models import build_model

DATASETS = ("ade20k", "voc", "camvid", "cocostuff164k")
BACKENDS = ("torch", "dali")
SIZE = (24, 40)  # (H, W) of the synthetic images (ADE20K, VOC, COCO: each side in [3/4, 1] of it)


def _ade20k(raw: np.ndarray) -> np.ndarray:  # label - 1; 0 ("other") and ids above 150 ignored
    return np.where((raw >= 1) & (raw <= 150), raw.astype(np.int64) - 1, 255)


def _voc(raw: np.ndarray) -> np.ndarray:  # ids 0..20 as they are; 255 (borders) and the rest ignored
    return np.where(raw <= 20, raw, 255).astype(np.int64)


def _camvid(raw: np.ndarray) -> np.ndarray:  # ids 0..10; 11 (void) and the rest ignored
    return np.where(raw <= 10, raw, 255).astype(np.int64)


def _cocostuff(raw: np.ndarray) -> np.ndarray:  # stuffthingmaps 0..181 (COCO id - 1); 255 ignored
    return np.where(raw <= 181, raw, 255).astype(np.int64)


REFERENCE_MAPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "ade20k": _ade20k, "voc": _voc, "camvid": _camvid, "cocostuff164k": _cocostuff,
}
FACTS = {  # classes, image format, varying size, CIRKD checkpoint name part
    "ade20k": (150, "JPEG", True, "ade20k"),
    "voc": (21, "JPEG", True, "voc"),
    "camvid": (11, "PNG", False, "camvid"),
    "cocostuff164k": (182, "JPEG", True, "coco_stuff_164k"),
}


def _all_ids_label(shape: tuple[int, int]) -> np.ndarray:
    """A label map that holds every stored id 0..255 (the image has at least 256 pixels)."""
    return (np.arange(shape[0] * shape[1]) % 256).astype(np.uint8).reshape(shape)


def _save_label(path: str, ids: np.ndarray, like: str) -> None:
    """Write ``ids`` in the mode of the label file ``like`` (palette PNGs keep their palette)."""
    with Image.open(like) as old:
        mode, palette = old.mode, old.getpalette()
    img = Image.frombytes("P", ids.shape[::-1], ids.tobytes()) if mode == "P" else Image.fromarray(ids)
    if palette is not None:
        img.putpalette(palette)
    img.save(path)


def _make_tree(root: Path, name: str, train: int = 2, val: int = 2) -> Path:
    make_synthetic_dataset(root, name, train=train, val=val, size=SIZE, seed=3)
    return root


@pytest.fixture(scope="module", params=DATASETS)
def tree(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(dataset name, root) of a synthetic tree whose first val label holds every id 0..255."""
    name = request.param
    root = _make_tree(tmp_path_factory.mktemp(name), name)
    pair = list_pairs(root, "val", dataset=name)[0]
    with Image.open(pair.image) as img:
        shape = (img.height, img.width)
    _save_label(pair.label, _all_ids_label(shape), pair.label)
    return name, root


def _loader(root: Path, name: str, split: str, backend: str, batch_size: int = 1, **kw):
    return build_loader(root, split, batch_size, backend=backend, device="cpu", num_threads=1,
                        dataset=name, channels_last=False, **kw)


def _read_raw(path: str) -> np.ndarray:
    """Stored ids of a label file: PIL's array is the grey value, or the index of a palette PNG."""
    with Image.open(path) as img:
        assert img.mode in ("L", "P"), img.mode
        return np.asarray(img)


# ---------------------------------------------------------------------------------------------------
# Descriptions and on-disk layouts
# ---------------------------------------------------------------------------------------------------


def test_dataset_facts() -> None:
    for name, (classes, fmt, varying, reference_name) in FACTS.items():
        spec = get_dataset(name)
        assert spec.num_classes == classes == len(spec.palette)
        assert spec.image_format == fmt.lower() and spec.varying_size is varying
        assert spec.reference_name == reference_name and spec.ignore_index == 255
        lut = spec.label_lut()
        np.testing.assert_array_equal(lut, REFERENCE_MAPS[name](np.arange(256)))
    with pytest.raises(ValueError, match="unknown dataset 'kitti'.*citys, ade20k, voc, camvid"):
        get_dataset("kitti")


def test_palettes() -> None:
    """ADE20K: CIRKD's table (entry 0 'other' dropped); VOC: the bit-interleaved VOC colour map;
    CamVid: SegNet's; COCO-Stuff: CIRKD's matplotlib jet_r at id / 182."""
    ade, voc, camvid, coco = (get_dataset(n).palette for n in DATASETS)
    assert ade[:3] == ((120, 120, 120), (180, 120, 120), (6, 230, 230)) and ade[149] == (92, 0, 255)
    assert voc[:4] == ((0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0))
    assert voc[15] == (192, 128, 128) and voc[20] == (0, 64, 128)  # person, tvmonitor
    assert camvid[0] == (128, 128, 128) and camvid[4] == (60, 40, 222) and camvid[10] == (0, 128, 192)
    assert coco[0] == (127, 0, 0) and coco[181] == (0, 0, 132)  # jet_r: dark red down to dark blue
    from matplotlib import cm

    want = np.uint8(cm.jet_r(np.arange(182, dtype=np.float32) / 182)[..., :3] * 255.0)
    np.testing.assert_array_equal(np.array(coco), want)


def test_synthetic_layouts(tmp_path: Path) -> None:
    """Each tree is in its dataset's real layout, JPEG where the real set uses JPEG, labels as stored."""
    for name in DATASETS:
        root = tmp_path / name
        synthetic_main(["--dataset", name, str(root), "--train", "2", "--val", "2", "--size", "24", "40"]
                       + (["--test", "1"] if name == "camvid" else []))
        _, fmt, varying, _ = FACTS[name]
        for split in ("train", "val") + (("test",) if name == "camvid" else ()):
            pairs = list_pairs(root, split, dataset=name)
            assert len(pairs) == (1 if split == "test" else 2)
            for pair in pairs:
                with Image.open(pair.image) as img, Image.open(pair.label) as lbl:
                    assert img.format == fmt and img.mode == "RGB" and lbl.format == "PNG"
                    assert lbl.mode == ("P" if (name, split) == ("voc", "val") else "L")
                    assert lbl.size == img.size
                    h, w = img.height, img.width
                assert (h, w) == SIZE or (varying and 18 <= h <= 24 and 30 <= w <= 40)
    layout = {
        "ade20k": ["images/training/ADE_train_00000001.jpg", "annotations/validation/ADE_val_00000002.png"],
        "voc": ["JPEGImages/2008_000001.jpg", "SegmentationClassAug/2008_000002.png",
                "SegmentationClass/2007_000001.png", "ImageSets/Segmentation/train_aug.txt"],
        "camvid": ["train/0001TP_000001.png", "trainannot/0001TP_000001.png", "testannot/Seq05VD_f00001.png",
                   "camvid_val_list.txt"],
        "cocostuff164k": ["images/train2017/000000000001.jpg", "annotations/val2017/000000000002.png"],
    }
    for name, files in layout.items():
        for rel in files:
            assert (tmp_path / name / rel).is_file(), rel
    assert (tmp_path / "voc/ImageSets/Segmentation/val.txt").read_text() == "2007_000001\n2007_000002\n"
    assert (tmp_path / "camvid/camvid_val_list.txt").read_text().splitlines()[0] == (
        "val/0016E5_00001.png valannot/0016E5_00001.png")
    # CamVid's CIRKD list files alone (no folders scanned) give the same pairs
    assert [p.image for p in list_pairs(tmp_path / "camvid", "val", tmp_path / "camvid/camvid_val_list.txt",
                                        dataset="camvid")] == [p.image for p in
                                                               list_pairs(tmp_path / "camvid", "val",
                                                                          dataset="camvid")]
    with pytest.raises(SystemExit):
        synthetic_main(["--dataset", "ade20k", str(tmp_path / "x"), "--test", "1"])  # ADE20K has no test


@pytest.mark.parametrize("name", ["ade20k", "voc"])
def test_synthetic_is_learnable(tmp_path: Path, name: str) -> None:
    """Nearest class-mean colour (fitted on two images, scored on two others) recovers most labels,
    through JPEG and varying sizes; the void id occurs too."""
    root = make_synthetic_dataset(tmp_path, name, train=4, val=0, size=(48, 64), seed=1)
    pairs = list_pairs(root, "train", dataset=name)
    labels = [REFERENCE_MAPS[name](_read_raw(p.label)).ravel() for p in pairs]
    images = [np.asarray(Image.open(p.image), np.float32).reshape(-1, 3) for p in pairs]
    assert all((lbl == 255).any() for lbl in labels)
    fit_px, fit_lbl = np.concatenate(images[:2]), np.concatenate(labels[:2])
    ids = np.setdiff1d(np.unique(fit_lbl), [255])
    means = np.stack([fit_px[fit_lbl == i].mean(0) for i in ids])
    test_px, test_lbl = np.concatenate(images[2:]), np.concatenate(labels[2:])
    known = np.isin(test_lbl, ids)
    pred = ids[np.argmin(((test_px[known, None] - means[None]) ** 2).sum(-1), 1)]
    assert len(ids) >= 5 and (pred == test_lbl[known]).mean() > 0.8


# ---------------------------------------------------------------------------------------------------
# Both loaders: label map pixel by pixel, images as PIL decodes them
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_labels_and_images(tree: tuple[str, Path], backend: str) -> None:
    name, root = tree
    pairs = list_pairs(root, "val", dataset=name)
    batches = list(_loader(root, name, "val", backend))
    assert len(batches) == len(pairs)
    for (images, labels), pair in zip(batches, pairs, strict=True):
        want = torch.from_numpy(REFERENCE_MAPS[name](_read_raw(pair.label)))
        assert labels.dtype == torch.int64 and torch.equal(labels[0], want)
        with Image.open(pair.image) as img:
            bgr = np.asarray(img.convert("RGB"), dtype=np.float32)[..., ::-1]
        ref = torch.from_numpy(bgr - np.asarray(MEAN_BGR, dtype=np.float32)).permute(2, 0, 1)
        # DALI's libjpeg-turbo and PIL's may round an IDCT differently: one grey level at most
        assert (images[0] - ref).abs().max() <= (0 if backend == "torch" else 1)
    first = _read_raw(pairs[0].label)
    assert len(np.unique(first)) == 256  # every stored id went through the map


def test_train_batches_agree_and_map(tree: tuple[str, Path]) -> None:
    """Augmented crops: both backends give the same labels, all mapped ids of the files or 255."""
    name, root = tree
    kw = dict(batch_size=2, crop_size=(16, 24), max_iterations=2, seed=5)
    got = {b: list(_loader(root, name, "train", b, **kw)) for b in BACKENDS}
    allowed = set().union(*(np.unique(REFERENCE_MAPS[name](_read_raw(p.label))).tolist()
                            for p in list_pairs(root, "train", dataset=name))) | {255}
    for (xt, yt), (xd, yd) in zip(got["torch"], got["dali"], strict=True):
        assert xt.shape == (2, 3, 16, 24) and yt.shape == (2, 16, 24)
        assert torch.equal(yt, yd) and (xt - xd).abs().max() <= 1.0 + 1e-4
        assert set(torch.unique(yt).tolist()) <= allowed


def test_varying_size_validation_is_one_image_per_batch(tree: tuple[str, Path]) -> None:
    name, root = tree
    if not get_dataset(name).varying_size:
        assert len(list(_loader(root, name, "val", "torch", batch_size=2))) == 1
        return
    with pytest.raises(ValueError, match="vary in size.*batch_size=1"):
        _loader(root, name, "val", "torch", batch_size=2)


def test_evaluate_on_images_of_varying_size(tmp_path: Path) -> None:
    """evaluate() over ADE20K images of different sizes, batch 1: the confusion matrix of an
    independent per-image computation (fp64), every pixel counted once, ignore pixels not at all."""
    root = _make_tree(tmp_path, "ade20k", train=0, val=3)
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 150, 1)
    result = evaluate(model, _loader(root, "ade20k", "val", "torch"), 150, "cpu")
    cm = np.zeros((150, 150), np.int64)
    sizes = set()
    for pair in list_pairs(root, "val", dataset="ade20k"):
        with Image.open(pair.image) as img:
            bgr = np.asarray(img.convert("RGB"), np.float64)[..., ::-1] - np.asarray(MEAN_BGR)
        sizes.add(bgr.shape[:2])
        w = model.weight.detach().double()[:, :, 0, 0].numpy()
        logits = bgr @ w.T + model.bias.detach().double().numpy()
        target = _ade20k(_read_raw(pair.label))
        keep = target != 255
        np.add.at(cm, (target[keep], logits.argmax(-1)[keep]), 1)
    assert len(sizes) > 1
    iou = np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1) - np.diag(cm), 1)
    assert result["images"] == 3
    np.testing.assert_allclose(result["IoU"], iou, atol=1e-12)
    assert result["pixAcc"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-12)
    assert result["mIoU"] == pytest.approx(iou.mean(), abs=1e-12)


# ---------------------------------------------------------------------------------------------------
# Pair checks: each kind of bad input refused with an error naming the file
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_bad_pairs_are_refused(tmp_path: Path, name: str) -> None:
    root = _make_tree(tmp_path, name, train=0, val=2)
    pair = list_pairs(root, "val", dataset=name)[1]
    with Image.open(pair.image) as img:
        h, w = img.height, img.width
    raw = _read_raw(pair.label)

    def refused(match: str, *names: str) -> None:
        with pytest.raises(DatasetError, match=match) as err:
            check_pairs(list_pairs(root, "val", dataset=name), dataset=name)
        for part in names:
            assert part in str(err.value)

    _save_label(pair.label, np.zeros((h, w - 2), np.uint8), pair.label)  # size mismatch
    refused("different sizes", f"{pair.image} is {h}x{w} but {pair.label} is {h}x{w - 2}")
    Image.fromarray(raw.astype(np.uint16) * 200).save(pair.label)  # 16-bit grey
    refused("not 8-bit single-channel", pair.label, "mode 'I;16'")
    Image.fromarray(np.stack([raw] * 3, -1)).save(pair.label)  # a colour label
    refused("not 8-bit single-channel", pair.label, "mode 'RGB'")
    Path(pair.label).write_bytes(b"not a png at all")  # corrupt label header
    refused("unreadable label", pair.label)
    _save_label(pair.label, raw, list_pairs(root, "val", dataset=name)[0].label)
    image_bytes = Path(pair.image).read_bytes()
    Path(pair.image).write_bytes(b"\x00" * 64)  # corrupt image header
    refused("unreadable image", pair.image)
    Path(pair.image).write_bytes(image_bytes)
    check_pairs(list_pairs(root, "val", dataset=name), dataset=name)  # repaired
    Path(pair.label).unlink()  # missing label
    with pytest.raises(DatasetError, match="missing file|without a") as err:
        list_pairs(root, "val", dataset=name)
    assert Path(pair.label).stem in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["ade20k", "camvid"])
def test_truncated_image_names_the_file(tmp_path: Path, name: str, backend: str) -> None:
    """A file whose header is fine but whose data ends early (JPEG and PNG): both loaders name it.
    (JPEG has no checksum: a corruption that still decodes cannot be detected by any decoder.)"""
    root = _make_tree(tmp_path, name, train=0, val=2)
    bad = list_pairs(root, "val", dataset=name)[1].image
    data = Path(bad).read_bytes()
    Path(bad).write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=Path(bad).name):
        list(_loader(root, name, "val", backend))


def test_voc_palette_and_grey_labels_give_the_same_ids(tmp_path: Path) -> None:
    """VOC's SegmentationClass PNGs are palette images (index = class), SegmentationClassAug grey:
    both read as the ids, in both loaders (DALI would expand a palette to colours, so its source
    decodes palette labels on the host)."""
    root = _make_tree(tmp_path, "voc", train=0, val=1)
    pair = list_pairs(root, "val", dataset="voc")[0]
    raw = _read_raw(pair.label)
    got_palette = [list(_loader(root, "voc", "val", b))[0][1] for b in BACKENDS]
    Image.fromarray(raw).save(pair.label)  # the same ids as a grey PNG
    got_grey = [list(_loader(root, "voc", "val", b))[0][1] for b in BACKENDS]
    want = torch.from_numpy(_voc(raw))[None]
    assert all(torch.equal(g, want) for g in got_palette + got_grey)


# ---------------------------------------------------------------------------------------------------
# Checkpoints in the published layout with each dataset's class count
# ---------------------------------------------------------------------------------------------------

MODEL_KEYS = json.loads((Path(__file__).with_name("data") / "model_keys.json").read_text())["models"]
CONFIGS = {
    "deeplabv3_resnet101": ("deeplabv3", "resnet101"),
    "deeplabv3_resnet18": ("deeplabv3", "resnet18"),
    "psp_resnet18": ("psp", "resnet18"),
    "deeplab_mobile_mobilenetv2": ("deeplab_mobile", "mobilenetv2"),
    "psp_mobile_mobilenetv2": ("psp_mobile", "mobilenetv2"),
}
# The classifier convolutions (the only shapes that hold the class count, 19 for Cityscapes)
CLASSIFIERS = ("head.block.4.", "head.classifier.", "auxlayer.block.4.")


def _expected_layout(config: str, classes: int) -> dict[str, list[int]]:
    """model_keys.json's Cityscapes layout with the classifiers' 19 outputs replaced by ``classes``."""
    layout = {}
    for key, shape in MODEL_KEYS[config]["state_dict"].items():
        if key.startswith(CLASSIFIERS):
            assert shape[0] == 19, key
            shape = [classes, *shape[1:]]
        layout[key] = shape
    return layout


@pytest.mark.parametrize("name", DATASETS)
def test_model_layout_per_class_count(name: str) -> None:
    """Every model's keys and shapes for the dataset's class count (on the meta device: no weights);
    the ResNet-101 teacher for the datasets CIRKD publishes one for."""
    classes = get_dataset(name).num_classes
    configs = [c for c in CONFIGS if c != "deeplabv3_resnet101" or name != "camvid"]
    for config in configs:
        with torch.device("meta"):
            model = build_model(*CONFIGS[config], num_classes=classes, aux="resnet" in config)
        got = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert got == _expected_layout(config, classes), config
        assert list(got) == list(MODEL_KEYS[config]["state_dict"])


@pytest.mark.parametrize("name", DATASETS)
def test_published_layout_checkpoint_loads_strictly(tmp_path: Path, name: str) -> None:
    """A CIRKD-style student file (kd_deeplabv3_resnet18_<dataset>_best_model.pth, aux head included)
    loads strictly with the dataset's class count, and is refused with another count."""
    spec = get_dataset(name)
    layout = _expected_layout("deeplabv3_resnet18", spec.num_classes)
    state = {k: torch.full(s, 1e-3 * (i + 1)) for i, (k, s) in enumerate(layout.items())
             if not k.endswith("num_batches_tracked")}
    state.update({k: torch.tensor(7) for k in layout if k.endswith("num_batches_tracked")})
    path = tmp_path / f"kd_deeplabv3_resnet18_{spec.reference_name}_best_model.pth"
    torch.save(state, path)
    model = build_inference_model("deeplabv3", "resnet18", str(path), spec.num_classes)
    loaded = model.state_dict()
    assert list(loaded) == list(layout) and all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(InferenceSetupError, match="19 classes"):
        build_inference_model("deeplabv3", "resnet18", str(path), 19)
    shutil.rmtree(tmp_path)
