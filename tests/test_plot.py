"""python -m fastdist.plot: curves from metrics.jsonl and example predictions in the run's dataset palette."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdist.data.synthetic import make_synthetic_cityscapes, make_synthetic_dataset
from fastdist.plot import colorize, load_metrics, main, plot_runs, predict_examples


def _fake_run(folder, kd: bool) -> None:
    folder.mkdir()
    lines = [{"kind": "model_cost", "models": {}}]
    lines += [{"kind": "train", "iteration": i, "lr": 0.01 * (1 - i / 40), "task_loss": 2.0 / i,
               "kd_loss": 0.5 / i if kd else 0.0} for i in (10, 20, 30)]
    lines += [{"kind": "val", "iteration": 30, "mIoU": 0.42, "pixAcc": 0.9, "IoU": [0.42] * 19}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_curves_of_two_runs(tmp_path, capsys) -> None:
    _fake_run(tmp_path / "a", kd=True)
    _fake_run(tmp_path / "b", kd=False)
    metrics = load_metrics(tmp_path / "a")
    assert [r["iteration"] for r in metrics["train"]] == [10, 20, 30] and len(metrics["val"]) == 1
    out = tmp_path / "curves.png"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)]) == 0
    with Image.open(out) as img:
        assert img.width > 400 and img.height > 200
    assert main([str(tmp_path / "missing"), "-o", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().out


def test_palette_by_hand() -> None:
    got = colorize(np.array([[0, 13], [18, 255]]))
    assert got.tolist() == [[[128, 64, 128], [0, 0, 142]], [[119, 11, 32], [0, 0, 0]]]


def _saved_model_rows(run, data, classes: int, checkpoint: str) -> list:
    """Save a seeded psp_mobile student of `classes` classes as `checkpoint` in `run`, then the example
    rows (image, truth, prediction) of the 2 validation images of `data`."""
    from fastdist.models import build_model

    torch.manual_seed(0)
    model = build_model("psp_mobile", "mobilenetv2", num_classes=classes).eval()
    torch.save(model.state_dict(), run / checkpoint)
    rows = predict_examples([run], str(data), count=5)
    assert len(rows) == 2 and all(len(row) == 3 for row in rows)
    return rows


def test_examples_strip(tmp_path) -> None:
    from fastdist.data.cityscapes import PALETTE, label_lut

    data = make_synthetic_cityscapes(tmp_path / "data", train=0, val=2, size=(32, 64))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"student_model": "psp_mobile",
                                                 "student_backbone": "mobilenetv2", "teacher_model": None}))
    rows = _saved_model_rows(run, data, 19, "psp_mobile_mobilenetv2_citys_best_model.pth")
    image_file = sorted((data / "leftImg8bit" / "val").rglob("*.png"))[0]
    label_file = sorted((data / "gtFine" / "val").rglob("*.png"))[0]
    image, truth, prediction = rows[0]
    np.testing.assert_array_equal(image, np.asarray(Image.open(image_file).convert("RGB")))
    np.testing.assert_array_equal(truth, colorize(label_lut()[np.asarray(Image.open(label_file))]))
    assert prediction.shape == (32, 64, 3) and prediction.dtype == np.uint8
    colours = {tuple(c) for c in prediction.reshape(-1, 3).tolist()}
    assert colours <= {tuple(c) for c in np.asarray(PALETTE).tolist()}  # argmax classes in the palette
    _fake_run(tmp_path / "curves", kd=False)
    (tmp_path / "curves" / "config.json").write_text((run / "config.json").read_text())
    (tmp_path / "curves" / "psp_mobile_mobilenetv2_citys_best_model.pth").write_bytes(
        (run / "psp_mobile_mobilenetv2_citys_best_model.pth").read_bytes())
    out = tmp_path / "summary.png"
    assert main([str(tmp_path / "curves"), "--data", str(data), "--examples", "1", "-o", str(out)]) == 0
    assert out.stat().st_size > 10_000


def test_examples_strip_ade20k(tmp_path, capsys) -> None:
    """A run of another dataset: its export name, 150 classes, its label map, palette and val split."""
    from fastdist.data import get_dataset

    spec = get_dataset("ade20k")
    data = make_synthetic_dataset(tmp_path / "ade", "ade20k", train=0, val=2, size=(32, 48))
    run = tmp_path / "run"
    _fake_run(run, kd=True)
    (run / "config.json").write_text(json.dumps({"student_model": "psp_mobile", "dataset": "ade20k",
                                                 "student_backbone": "mobilenetv2", "teacher_model": "psp"}))
    rows = _saved_model_rows(run, data, 150, "kd_psp_mobile_mobilenetv2_ade20k_best_model.pth")
    image_file = sorted((data / "images" / "validation").glob("*.jpg"))[0]
    label_file = sorted((data / "annotations" / "validation").glob("*.png"))[0]
    image, truth, prediction = rows[0]
    np.testing.assert_array_equal(image, np.asarray(Image.open(image_file).convert("RGB")))
    stored = np.asarray(Image.open(label_file))
    train_ids = spec.label_lut()[stored]
    assert (train_ids[stored == 0] == 255).all() and (train_ids[stored > 0] == stored[stored > 0] - 1).all()
    np.testing.assert_array_equal(truth, colorize(train_ids, spec.palette))
    assert truth[stored == 0].max() == 0 and truth[stored > 0].any()  # "other" black, classes coloured
    assert prediction.shape == image.shape and prediction.dtype == np.uint8
    colours = {tuple(c) for c in prediction.reshape(-1, 3).tolist()}
    assert colours <= {tuple(c) for c in spec.palette}  # argmax classes in the ADE20K palette
    out = tmp_path / "summary.png"
    assert main([str(run), "--data", str(data), "--examples", "1", "-o", str(out)]) == 0
    assert out.stat().st_size > 10_000
    export = run / "kd_psp_mobile_mobilenetv2_ade20k_best_model.pth"
    export.rename(run / "kd_psp_mobile_mobilenetv2_citys_best_model.pth")
    assert main([str(run), "--data", str(data), "-o", str(out)]) == 2  # a Cityscapes name is not its export
    assert "kd_psp_mobile_mobilenetv2_ade20k_best_model.pth" in capsys.readouterr().out


def test_palette_of_a_dataset() -> None:
    from fastdist.data import get_dataset

    voc = get_dataset("voc")
    got = colorize(np.array([[0, 1], [20, 255]]), voc.palette)
    assert got.tolist() == [[list(voc.palette[0]), list(voc.palette[1])], [list(voc.palette[20]), [0, 0, 0]]]


def test_labels_must_match_runs(tmp_path) -> None:
    _fake_run(tmp_path / "a", kd=False)
    with pytest.raises(ValueError, match="2 labels for 1 runs"):
        plot_runs([tmp_path / "a"], tmp_path / "x.png", labels=["x", "y"])
