"""Export a trained segmentation model (e.g. the distilled student) to ONNX and check it with onnxruntime.

    python export.py --model psp_mobile --backbone mobilenetv2 \\
        --pretrained runs/kd_psp_mobile_mobilenetv2/kd_psp_mobile_mobilenetv2_citys_best_model.pth \\
        --onnx student.onnx [--size 512 1024] [--dataset citys]

The graph maps ``image`` (N, 3, H, W) float32 -- BGR pixels minus the loaders' mean (``MEAN_BGR``, the
same for every dataset), exactly what eval.py feeds the model -- to ``logits`` (N, C, H, W) float32,
C the ``--dataset``'s class count (19 for Cityscapes, 150 for ADE20K, ...), upsampled to the input size
(bilinear, align_corners=True, as in evaluation). The batch dimension is dynamic; H and W are fixed
to ``--size`` (the pyramid-pooling heads pool to fixed bins of the feature map). The exporter is
torch's ``dynamo=True`` one at the installed torch's default opset. After writing, onnxruntime
(CPU) runs a random batch of 2 and the maximum absolute difference to PyTorch is printed; the exit
status is 1 if it exceeds ``--atol``. Needs the ``export`` extra (``pip install -e ".[export]"``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fastdist.data import DATASET_NAMES, get_dataset
from fastdist.engine.inference import main_logits, upsample_logits
from fastdist.engine.inference_cli import InferenceSetupError, build_inference_model

_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


class LogitsAtInputSize(nn.Module):
    """``model``'s main logits, upsampled to the input size (what evaluation scores)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return upsample_logits(main_logits(self.model(image)), image.shape[-2:])


def export_onnx(model: nn.Module, path: str, size: Sequence[int], batch: int = 2) -> int:
    """Write ``model`` (eval mode, CPU) as ONNX with a dynamic batch; returns the opset used."""
    import onnx

    net = LogitsAtInputSize(model).eval()
    example = torch.zeros(batch, 3, int(size[0]), int(size[1]))
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    program.save(path)
    opsets = onnx.load(path, load_external_data=False).opset_import
    return next(o.version for o in opsets if o.domain in ("", "ai.onnx"))


def onnx_max_abs_diff(model: nn.Module, path: str, images: torch.Tensor) -> float:
    """Max |onnxruntime(CPU) - PyTorch| over the logits of ``images``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": images.numpy()})[0]
    with torch.inference_mode():
        want = LogitsAtInputSize(model).eval()(images).numpy()
    if got.shape != want.shape:
        raise RuntimeError(f"{path}: onnxruntime returned {got.shape}, PyTorch {want.shape}")
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Export a segmentation model to ONNX (checked with onnxruntime).")
    p.add_argument("--model", required=True, help="deeplabv3 | psp | deeplab_mobile | psp_mobile")
    p.add_argument("--backbone", required=True, help="resnet18 | resnet50 | resnet101 | mobilenetv2")
    p.add_argument("--pretrained", required=True, help="model checkpoint (e.g. the *_best_model.pth export)")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--dataset", default="citys", choices=DATASET_NAMES,
                   help="dataset the model was trained on: its class count (default: citys)")
    p.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"), help="input size")
    p.add_argument("--atol", type=float, default=1e-3, help="largest accepted |onnxruntime - PyTorch|")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: 0 on success, 1 if the check fails, 2 on a user error."""
    args = parse_args(argv)
    missing = [name for name in _PACKAGES if importlib.util.find_spec(name) is None]
    try:
        if missing:
            raise InferenceSetupError(f"needs {', '.join(missing)}: pip install -e \".[export]\"")
        if min(args.size) < 1:
            raise InferenceSetupError(f"--size must be positive, got {args.size}")
        model = build_inference_model(args.model, args.backbone, args.pretrained,
                                      get_dataset(args.dataset).num_classes)
    except InferenceSetupError as exc:
        print(f"export.py: error: {exc}", file=sys.stderr)
        return 2
    opset = export_onnx(model, args.onnx, args.size)
    images = torch.randn(2, 3, *args.size, generator=torch.Generator().manual_seed(0)) * 60.0
    diff = onnx_max_abs_diff(model, args.onnx, images)
    ok = diff <= args.atol
    print(f"wrote {args.onnx} (opset {opset}, input image [batch, 3, {args.size[0]}, {args.size[1]}]); "
          f"onnxruntime CPU vs PyTorch on 2 random images: max abs diff {diff:.3g} "
          f"({'ok' if ok else 'FAILED'}, atol {args.atol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
