"""export.py: ONNX of a small model, checked against PyTorch with onnxruntime (dynamic batch)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import export  # noqa: E402  (the repository-root script)


def test_export_matches_pytorch(tmp_path, capsys) -> None:
    import onnxruntime

    from fastdist.engine.inference import main_logits
    from fastdist.engine.inference_cli import build_inference_model
    from fastdist.models import build_model

    torch.manual_seed(0)
    model = build_model("psp_mobile", "mobilenetv2", num_classes=19)
    for module in model.modules():  # non-trivial BatchNorm statistics, so eval mode matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    ckpt, onnx_path = tmp_path / "student.pth", tmp_path / "out" / "student.onnx"
    torch.save(model.state_dict(), ckpt)
    code = export.main(["--model", "psp_mobile", "--backbone", "mobilenetv2", "--pretrained", str(ckpt),
                        "--onnx", str(onnx_path), "--size", "32", "64"])
    out = capsys.readouterr().out
    assert code == 0, out
    diff = float(re.search(r"max abs diff (\S+)", out).group(1))
    assert diff <= 1e-3 and "opset" in out
    # independent check at another batch size (the batch dimension is dynamic)
    images = torch.randn(3, 3, 32, 64, generator=torch.Generator().manual_seed(5)) * 50
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": images.numpy()})
    reference = build_inference_model("psp_mobile", "mobilenetv2", str(ckpt))
    with torch.inference_mode():
        logits = main_logits(reference(images))
        want = torch.nn.functional.interpolate(logits, size=(32, 64), mode="bilinear", align_corners=True)
    assert got.shape == (3, 19, 32, 64)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-3, rtol=1e-3)


def test_missing_checkpoint_exit_2(tmp_path, capsys) -> None:
    code = export.main(["--model", "psp_mobile", "--backbone", "mobilenetv2", "--pretrained",
                        str(tmp_path / "nope.pth"), "--onnx", str(tmp_path / "x.onnx")])
    assert code == 2
    assert "nope.pth" in capsys.readouterr().err


def test_export_ade20k_has_150_channels(tmp_path, capsys) -> None:
    import onnxruntime

    from fastdist.models import build_model

    torch.manual_seed(0)
    model = build_model("psp_mobile", "mobilenetv2", num_classes=150)
    ckpt, onnx_path = tmp_path / "ade.pth", tmp_path / "ade.onnx"
    torch.save(model.state_dict(), ckpt)
    args = ["--model", "psp_mobile", "--backbone", "mobilenetv2", "--pretrained", str(ckpt),
            "--onnx", str(onnx_path), "--size", "32", "32"]
    assert export.main(args) == 2  # the default (citys, 19 classes) does not fit a 150-class checkpoint
    assert "19 classes" in capsys.readouterr().err
    code = export.main([*args, "--dataset", "ade20k"])
    out = capsys.readouterr().out
    assert code == 0, out
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"image": np.zeros((1, 3, 32, 32), np.float32)})
    assert got.shape == (1, 150, 32, 32)
