"""--dataset for train.py, eval.py and predict.py: recipe defaults, a 2-iteration run, eval, predictions.

Tiny synthetic trees in each dataset's layout and the smallest model (PSPNet-MobileNetV2) on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from fastdist.data import get_dataset, list_pairs  # noqa: E402
from fastdist.data.synthetic import make_synthetic_dataset  # noqa: E402
from fastdist.engine.config import ConfigError, check_resume_compatible, config_dict, parse_config  # noqa: E402

DATASETS = ("ade20k", "voc", "camvid", "cocostuff164k")
# CIRKD's train_scripts (see the README table): crop, global batch, iterations, lr
RECIPES = {
    "citys": ([512, 1024], 16, 40000, 0.02),
    "ade20k": ([512, 512], 16, 40000, 0.02),
    "voc": ([512, 512], 16, 40000, 0.02),
    "camvid": ([360, 360], 16, 40000, 0.02),
    "cocostuff164k": ([512, 512], 16, 80000, 0.02),
}


def _load_cli(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"cli_{Path(script).stem}", ROOT / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dataset_cli")
    return {name: make_synthetic_dataset(root / name, name, train=2, val=2, test=2 if name == "camvid" else 0,
                                         size=(32, 48), seed=2) for name in DATASETS + ("citys",)}


def _model(data: Path, name: str, *extra: str) -> list[str]:
    return ["--device", "cpu", "--data", str(data), "--dataset", name, "--teacher-model", "none",
            "--student-model", "psp_mobile", "--student-backbone", "mobilenetv2", *extra]


@pytest.mark.parametrize("name", DATASETS + ("citys",))
def test_recipe_defaults_and_overrides(trees: dict[str, Path], tmp_path: Path, name: str) -> None:
    flat = config_dict(parse_config(_model(trees[name], name, "--save-dir", str(tmp_path / "a"))))
    assert [flat["crop_size"], flat["batch_size"], flat["max_iterations"], flat["lr"]] == list(RECIPES[name])
    assert flat["dataset_defaults"] == ["crop_size", "batch_size", "max_iterations", "lr"]
    varying = get_dataset(name).varying_size
    assert flat["val_batch_size"] == (1 if varying else flat["batch_per_rank"])
    flat = config_dict(parse_config(_model(trees[name], name, "--save-dir", str(tmp_path / "b"),
                                           "--crop-size", "16", "24", "--lr", "0.5", "--batch-size", "4")))
    assert [flat["crop_size"], flat["batch_size"], flat["max_iterations"], flat["lr"]] == [
        [16, 24], 4, RECIPES[name][2], 0.5]
    assert flat["dataset_defaults"] == ["max_iterations"] and flat["dataset"] == name
    if varying:
        with pytest.raises(ConfigError, match="vary in size"):
            parse_config(_model(trees[name], name, "--save-dir", str(tmp_path / "c"),
                                "--val-batch-size", "2"))


def test_resume_refuses_another_dataset(trees: dict[str, Path], tmp_path: Path) -> None:
    common = ("--save-dir", str(tmp_path), "--crop-size", "16", "24", "--batch-size", "2")
    saved = config_dict(parse_config(_model(trees["citys"], "citys", *common)))
    cfg = parse_config(_model(trees["ade20k"], "ade20k", *common, "--max-iterations", "40000"))
    with pytest.raises(ConfigError, match="dataset: checkpoint 'citys', now 'ade20k'"):
        check_resume_compatible(saved, cfg)
    del saved["dataset"]  # a config written before --dataset existed: a Cityscapes run
    with pytest.raises(ConfigError, match="dataset: checkpoint 'citys'"):
        check_resume_compatible(saved, cfg)


def test_wrong_layout_names_the_dataset(trees: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    small = ("--save-dir", str(tmp_path), "--crop-size", "16", "24", "--batch-size", "2",
             "--max-iterations", "1")
    for tree in ("camvid", "citys"):  # (a Cityscapes tree's train.lst is no ADE20K list file)
        assert train.main(_model(trees[tree], "ade20k", *small)) == 2
        err = capsys.readouterr().err
        assert "ADE20K root" in err and "--dataset ade20k" in err


@pytest.mark.parametrize("name", DATASETS)
def test_train_eval_predict(trees: dict[str, Path], tmp_path: Path, name: str) -> None:
    spec, data, run = get_dataset(name), trees[name], tmp_path / "run"
    argv = _model(data, name, "--crop-size", "24", "32", "--batch-size", "2", "--max-iterations", "2",
                  "--log-iter", "1", "--val-per-iters", "2", "--save-dir", str(run), "--workers", "0")
    assert train.main(argv) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["dataset"] == name and saved["dataset_defaults"] == ["lr"] and saved["lr"] == 0.02
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("kind") == "val"]
    assert len(val) == 1 and len(val[0]["IoU"]) == spec.num_classes
    export = run / f"psp_mobile_mobilenetv2_{spec.reference_name}_best_model.pth"
    state = torch.load(export, map_location="cpu", weights_only=True)
    assert state["head.classifier.weight"].shape[0] == spec.num_classes

    model = ["--model", "psp_mobile", "--backbone", "mobilenetv2", "--data", str(data), "--dataset", name,
             "--pretrained", str(export), "--device", "cpu", "--workers", "0"]
    assert _load_cli("eval.py").main([*model, "--loader", "torch", "--save-dir", str(tmp_path / "eval")]) == 0
    split = spec.recipe.eval_split
    result = json.loads((tmp_path / "eval" / f"eval_psp_mobile_mobilenetv2_{split}.json").read_text())
    assert result["dataset"] == name and result["split"] == split and result["images"] == 2
    assert list(result["IoU"]) == list(spec.class_names)
    # training validation and eval.py score the same val images the same way (CamVid: eval.py scores test)
    if split == "val":
        assert result["mIoU"] == pytest.approx(val[0]["mIoU"], abs=1e-6)

    out = tmp_path / "pred"
    assert _load_cli("predict.py").main([*model, "--save-dir", str(out)]) == 0
    pairs = list_pairs(data, "test" if "test" in spec.splits else split, dataset=name)
    assert len(list((out / "labels").iterdir())) == len(pairs)
    for pair in pairs:
        stem = Path(pair.image).stem
        with (Image.open(out / "labels" / f"{stem}.png") as lbl,
              Image.open(out / "color" / f"{stem}.png") as col, Image.open(pair.image) as img):
            stored, train_ids = np.asarray(lbl), np.asarray(col)
            assert lbl.mode == "L" and col.mode == "P" and lbl.size == col.size == img.size
            assert col.getpalette()[: 3 * spec.num_classes] == [c for rgb in spec.palette for c in rgb]
        assert train_ids.max() < spec.num_classes
        # the label PNG is in the dataset's own id space: ADE20K stores train id + 1, the others as is
        offset = 1 if name == "ade20k" else 0
        np.testing.assert_array_equal(stored, train_ids + offset)
