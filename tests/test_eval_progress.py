"""eval.py / train.py wiring of the new options: progress counts, slide mode, model cost in the results."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as eval_cli  # noqa: E402  (the repository-root script)
from fastdist.data.synthetic import make_synthetic_cityscapes  # noqa: E402
from fastdist.engine.config import ConfigError, parse_config  # noqa: E402
from fastdist.engine.evaluation import evaluate  # noqa: E402
from fastdist.engine.logger import ProgressBar  # noqa: E402
from fastdist.engine.prediction import predict_images  # noqa: E402
from fastdist.models import build_model  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("progress")
    data = make_synthetic_cityscapes(root / "data", train=2, val=3, size=(32, 64), seed=4)
    torch.manual_seed(0)
    ckpt = root / "student.pth"
    torch.save(build_model("psp_mobile", "mobilenetv2", num_classes=19).state_dict(), ckpt)
    return {"data": data, "ckpt": ckpt, "root": root}


def test_evaluate_reports_images_done() -> None:
    stream = io.StringIO()
    bar = ProgressBar(5, stream, interval=0.0, unit="img")
    seen: list[int] = []
    images, labels = torch.randn(5, 3, 4, 4), torch.zeros(5, 4, 4, dtype=torch.long)
    loader = [(images[:2], labels[:2]), (images[2:], labels[2:])]

    def progress(done: int) -> None:
        seen.append(done)
        bar.update(done)

    evaluate(torch.nn.Conv2d(3, 2, 1), loader, 2, "cpu", progress=progress)
    assert seen == [2, 5]
    assert "5/5" in stream.getvalue() and "img/s" in stream.getvalue()


def test_predict_images_reports_images_done(workspace: dict[str, Path], tmp_path: Path) -> None:
    from fastdist.data.cityscapes import list_pairs

    paths = [pair.image for pair in list_pairs(workspace["data"], "val")]
    model = build_model("psp_mobile", "mobilenetv2", num_classes=19).eval()
    seen: list[int] = []
    assert predict_images(model, paths, str(tmp_path), "cpu", workers=1, progress=seen.append) == 3
    assert seen == [1, 2, 3]


def _eval(ws: dict[str, Path], out: Path, *extra: str) -> dict:
    argv = ["--model", "psp_mobile", "--backbone", "mobilenetv2", "--data", str(ws["data"]), "--pretrained",
            str(ws["ckpt"]), "--device", "cpu", "--workers", "0", "--save-dir", str(out), *extra]
    assert eval_cli.main(argv) == 0
    return json.loads((out / "eval_psp_mobile_mobilenetv2_val.json").read_text())


def test_eval_cli_slide_mode_and_model_cost(workspace: dict[str, Path], tmp_path: Path) -> None:
    whole = _eval(workspace, tmp_path / "whole")
    one_window = _eval(workspace, tmp_path / "one", "--eval-mode", "slide", "--crop-size", "32", "64")
    tiles = _eval(workspace, tmp_path / "tiles", "--eval-mode", "slide", "--crop-size", "16", "32",
                  "--stride", "8", "16")
    assert whole["eval_mode"] == "whole" and tiles["eval_mode"] == "slide"
    assert one_window["mIoU"] == whole["mIoU"] and one_window["pixAcc"] == whole["pixAcc"]
    assert tiles["images"] == 3
    cost = whole["model_cost"]["model"]
    assert cost["input_size"] == [32, 64] and cost["params"] > 1e6
    # the tiles' cost is quoted per 16x32 window: a quarter of the pixels
    assert tiles["model_cost"]["model"]["gflops"] == pytest.approx(cost["gflops"] / 4, rel=0.05)


def test_eval_cli_bad_slide_options_exit_2(workspace: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    argv = ["--model", "psp_mobile", "--backbone", "mobilenetv2", "--data", str(workspace["data"]),
            "--pretrained", str(workspace["ckpt"]), "--device", "cpu", "--eval-mode", "slide"]
    assert eval_cli.main(argv) == 2
    assert "--crop-size" in capsys.readouterr().err


def test_train_config_validation_windows(workspace: dict[str, Path]) -> None:
    base = ["--device", "cpu", "--data", str(workspace["data"]), "--teacher-model", "none", "--student-model",
            "psp_mobile", "--student-backbone", "mobilenetv2", "--crop-size", "32", "64",
            "--save-dir", str(workspace["root"] / "run")]
    cfg = parse_config([*base, "--eval-mode", "slide", "--eval-stride", "16", "32"])
    val = cfg.validation
    assert val.eval_mode == "slide" and val.eval_stride == (16, 32) and not cfg.paths.tensorboard
    assert parse_config(base).validation.eval_mode == "whole"
    with pytest.raises(ConfigError, match="skips pixels"):
        parse_config([*base, "--eval-mode", "slide", "--eval-stride", "48", "32"])
