"""The speed paths of train.py each run a step on CPU: bf16 autocast, fp16 + GradScaler,
channels-last (with the pad mask), torch.compile (student and teacher), and a baseline run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from fastdist.data.synthetic import make_synthetic_cityscapes
    from fastdist.models import build_model, to_reference_state_dict

    root = tmp_path_factory.mktemp("paths")
    data = make_synthetic_cityscapes(root / "data", train=4, val=2, size=(32, 64), seed=5)
    teacher = root / "teacher.pth"
    torch.save(to_reference_state_dict(build_model("psp_mobile", "mobilenetv2")), teacher)
    return data, teacher


def _run(setup: tuple[Path, Path], save: Path, *extra: str, teacher: bool = True, iters: int = 2) -> dict:
    data, weights = setup
    kd = ["--teacher-model", "psp_mobile", "--teacher-backbone", "mobilenetv2", "--teacher-pretrained",
          str(weights)] if teacher else ["--teacher-model", "none"]
    argv = ["--device", "cpu", "--data", str(data), "--crop-size", "32", "64", "--batch-size", "2",
            "--workers", "0", "--student-model", "deeplab_mobile", "--student-backbone", "mobilenetv2",
            "--max-iterations", str(iters), "--log-iter", "1", "--val-per-iters", str(iters),
            "--save-dir", str(save), *kd, *extra]
    assert train.main(argv) == 0
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == iters
    assert all(math.isfinite(r["task_loss"]) and math.isfinite(r["kd_loss"]) for r in steps)
    assert [r["iteration"] for r in records if r["kind"] == "val"] == [iters]
    return json.loads((save / "config.json").read_text())


def test_bf16_autocast(setup: tuple[Path, Path], tmp_path: Path) -> None:
    config = _run(setup, tmp_path, "--amp", "bf16", "--kd-backend", "torch")
    assert config["amp"] == "bf16"


def test_fp16_with_grad_scaler_baseline(setup: tuple[Path, Path], tmp_path: Path) -> None:
    config = _run(setup, tmp_path, "--amp", "fp16", teacher=False)
    assert config["amp"] == "fp16" and config["teacher_model"] is None
    assert torch.load(tmp_path / "latest.pth", weights_only=True)["scaler"]["scale"] > 0
    assert (tmp_path / "deeplab_mobile_mobilenetv2_citys_best_model.pth").exists()


def test_channels_last_with_pad_mask(setup: tuple[Path, Path], tmp_path: Path) -> None:
    config = _run(setup, tmp_path, "--channels-last", "--kd-mask", "pad")
    assert config["channels_last"] is True and config["kd_mask"] == "pad"


def test_compile(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, weights = setup
    argv = ["--device", "cpu", "--data", str(data), "--crop-size", "32", "64", "--batch-size", "2",
            "--workers", "0", "--student-model", "deeplab_mobile", "--student-backbone", "mobilenetv2",
            "--max-iterations", "1", "--log-iter", "1", "--skip-val", "--compile",
            "--save-dir", str(tmp_path),
            "--teacher-model", "psp_mobile", "--teacher-backbone", "mobilenetv2", "--teacher-pretrained",
            str(weights)]
    assert train.main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if r["kind"] == "train")
    assert math.isfinite(step["task_loss"]) and math.isfinite(step["kd_loss"])
    assert json.loads((tmp_path / "config.json").read_text())["compile"] is True
