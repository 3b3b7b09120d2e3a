"""Validation: multi-scale / flip inference, distributed confusion matrices, model loading for the CLIs.

Inference follows the CIRKD/DIST_KD ``eval.py``: the input is resized by each scale with bilinear
``align_corners=True``; the main logits are upsampled to the label size with bilinear
``align_corners=True``; with flip the logits of the mirrored input are flipped back and averaged
with the plain ones (0.5 each); the (flip-averaged) **logits** of all scales are summed (not softmax
probabilities) and divided by the number of scales; the prediction is their argmax.

Distributed evaluation counts every image exactly once (each rank its shard, ranks may differ by one
batch, one all-reduce at the end). The reference's DistributedSampler pads the val set to a multiple
of the world size, counting a few images twice; single-process numbers are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastdist.engine.finite import non_finite_logits_error
from fastdist.engine.metrics import ConfusionMatrix

__all__ = [
    "InferenceSetupError",
    "amp_dtype_from_name",
    "build_inference_model",
    "check_model_name",
    "evaluate",
    "flat_palette",
    "image_to_input",
    "infer_logits",
    "main_logits",
    "predict_images",
    "prediction_paths",
    "save_results_json",
    "to_device",
    "train_id_to_label_id_lut",
    "unwrap_for_inference",
    "write_prediction",
]


def unwrap_for_inference(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (also under torch.compile) so inference runs no collectives.

    Ranks may see different numbers of validation batches; a DDP forward could then hang on its
    buffer broadcast. A compiled plain module is kept compiled.
    """
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.module
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def main_logits(output: object) -> torch.Tensor:
    """The main logits of a model output: ``out["out"]``, the first element of a tuple, or a tensor."""
    if isinstance(output, dict):
        return output["out"]
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, torch.Tensor):
        return output
    raise TypeError(f"cannot take logits from a model output of type {type(output).__name__}")


def _upsample(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Float32 logits resized to ``size`` (bilinear, align_corners=True like the reference)."""
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)


def _logits_at_scale(model: nn.Module, images: torch.Tensor, scale: float, size: Sequence[int],
                     flip: bool) -> torch.Tensor:
    """Upsampled logits for one scale; with ``flip``, averaged with those of the mirrored input."""
    x = images
    if scale != 1.0:
        x = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=True)
    if not flip:
        return _upsample(main_logits(model(x)), size)
    batch = x.shape[0]
    # One forward over [x, flip(x)]: eval-mode BN makes samples independent, and one big batch
    # keeps the GPU busier than two small ones.
    both = _upsample(main_logits(model(torch.cat([x, x.flip(3)], dim=0))), size)
    return 0.5 * (both[:batch] + both[batch:].flip(3))


def infer_logits(model: nn.Module, images: torch.Tensor, size: Sequence[int] | None = None,
                 scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Float32 ``(B, C, H, W)`` logits at ``size`` (default: the image size), reference-style TTA.

    The caller sets eval mode, no-grad/inference mode and autocast.
    """
    if not scales:
        raise ValueError("scales must not be empty")
    size = tuple(images.shape[-2:]) if size is None else tuple(size)
    total: torch.Tensor | None = None
    for scale in scales:
        logits = _logits_at_scale(model, images, float(scale), size, flip)
        total = logits if total is None else total.add_(logits)
    assert total is not None
    return total.div_(len(scales)) if len(scales) > 1 else total


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast on ``device`` for ``amp_dtype``, or a null context when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _all_reduce_count(count: int, device: torch.device) -> int:
    """Sum a host integer over all ranks (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    t = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def evaluate(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    device: torch.device | str,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    ignore_index: int = 255,
    source: str = "the model",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Evaluate ``model`` on ``loader`` (this rank's shard) and return metrics over all ranks.

    The loader yields ``(images (B,3,H,W), labels (B,H,W))``; logits are upsampled to the label size.
    Every rank must call this (the confusion matrices are all-reduced at the end, one collective;
    ranks may have different numbers of batches). The model's train/eval state is restored.

    Returns ``{"mIoU", "pixAcc", "IoU": list[float], "images": int}`` (fractions; see
    `fastdist.engine.metrics` for the absent-class convention). NaN/inf logits on any rank raise
    `NonFiniteLogitsError` naming ``source`` on every rank (counted on the device, read once at the end).
    """
    device = torch.device(device)
    net = unwrap_for_inference(model)
    was_training = model.training
    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    images_seen = 0
    bad_batches = torch.zeros((), dtype=torch.int64, device=device)
    model.eval()
    try:
        with torch.inference_mode(), _autocast(device, amp_dtype):
            for images, labels in loader:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                logits = infer_logits(net, images, labels.shape[-2:], scales, flip)
                bad_batches += (~torch.isfinite(logits)).any()
                cm.update(logits.argmax(1), labels)
                images_seen += labels.shape[0]
                if progress is not None:  # images done on this rank (a host count, no sync)
                    progress(images_seen)
    finally:
        model.train(was_training)
    bad = _all_reduce_count(int(bad_batches.item()), device)
    if bad:
        raise non_finite_logits_error(source, bad)
    cm.all_reduce()
    result = cm.compute()
    result["images"] = _all_reduce_count(images_seen, device)
    return result


# --------------------------------------------------------------------------------------------------
# Model loading for eval.py / predict.py: every user error is an InferenceSetupError with a clear
# message, raised before any heavy start-up (process group, data pipeline, device transfer).


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """The options eval.py and predict.py share: model, checkpoint, data, test-time augmentation, device."""
    parser.add_argument("--model", required=True, help="deeplabv3 | psp | deeplab_mobile | psp_mobile")
    parser.add_argument("--backbone", required=True, help="resnet18 | resnet50 | resnet101 | mobilenetv2")
    parser.add_argument("--data", required=True, help="dataset root (the --dataset's layout)")
    from fastdist.data import DATASET_NAMES

    parser.add_argument("--dataset", default="citys", choices=DATASET_NAMES,
                        help="dataset: layout, label map, classes (the model's), palette")
    parser.add_argument("--pretrained", required=True, help="model checkpoint")
    from fastdist.engine.config import SCALE_RANGE, finite_scale

    parser.add_argument("--scales", type=finite_scale, nargs="+", default=[1.0],
                        help=f"test scales in [{SCALE_RANGE[0]}, {SCALE_RANGE[1]}], e.g. 0.75 1.0 1.25")
    parser.add_argument("--flip-eval", action="store_true", help="average with horizontally flipped input")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--amp", default="none", help="autocast dtype: none | bf16 | fp16")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last memory format (default: on for CUDA)")


class InferenceSetupError(RuntimeError):
    """A model, backbone, checkpoint or option that cannot be used; the message says why."""


def amp_dtype_from_name(name: str | None) -> torch.dtype | None:
    """``"bf16"``/``"fp16"`` -> torch dtype; ``None``/``"none"``/``"fp32"`` -> None (no autocast)."""
    table = {None: None, "none": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    key = name.lower() if isinstance(name, str) else name
    if key not in table:
        raise InferenceSetupError(f"unknown --amp {name!r}; expected none, bf16 or fp16")
    return table[key]


def check_model_name(model: str, backbone: str) -> None:
    """Raise `InferenceSetupError` for a model/backbone pair `build_model` does not build."""
    from fastdist.models import VALID_COMBINATIONS

    if model not in VALID_COMBINATIONS:
        raise InferenceSetupError(f"unknown --model {model!r}; choose from {', '.join(VALID_COMBINATIONS)}")
    if backbone not in VALID_COMBINATIONS[model]:
        raise InferenceSetupError(
            f"--model {model} does not take --backbone {backbone!r}; "
            f"choose from {', '.join(VALID_COMBINATIONS[model])}"
        )


def _short(text: str, limit: int = 700) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def build_inference_model(model: str, backbone: str, checkpoint: str, num_classes: int = 19) -> nn.Module:
    """Build ``model``/``backbone`` on the CPU, load ``checkpoint`` strictly and return it in eval mode.

    Whether the auxiliary head is built follows the checkpoint (``auxlayer.*`` keys), so reference
    checkpoints with one and student checkpoints without one both load strictly.
    """
    from fastdist.models import CheckpointError, build_model, load_checkpoint
    from fastdist.models.checkpoint import read_state_dict

    check_model_name(model, backbone)
    try:
        state = read_state_dict(checkpoint)
    except FileNotFoundError as exc:
        raise InferenceSetupError(f"checkpoint {checkpoint} does not exist") from exc
    except CheckpointError as exc:
        raise InferenceSetupError(_short(str(exc))) from exc
    has_aux = any(key.startswith("auxlayer.") for key in state)
    try:
        net = build_model(model, backbone, num_classes=num_classes, aux=has_aux)
    except ValueError:  # no auxiliary head on this backbone: the strict load below reports the keys
        net = build_model(model, backbone, num_classes=num_classes)
    try:
        load_checkpoint(net, state)
    except CheckpointError as exc:
        raise InferenceSetupError(
            f"checkpoint {checkpoint} does not fit --model {model} --backbone {backbone} "
            f"({num_classes} classes): {_short(str(exc))}"
        ) from exc
    return net.eval()


def to_device(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move ``model`` to ``device``, in channels-last memory format when asked."""
    fmt = torch.channels_last if channels_last else torch.preserve_format
    return model.to(device, memory_format=fmt)


def _json_safe(value: object) -> object:
    """NaN/inf floats -> None, recursively, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def save_results_json(result: dict, path: str, class_names: Sequence[str], **extra: object) -> None:
    """Write metrics (plus ``extra`` run information) as JSON; per-class IoU is keyed by class name."""
    payload = dict(extra)
    payload.update({k: v for k, v in result.items() if k != "IoU"})
    payload["IoU"] = dict(zip(class_names, result["IoU"], strict=True))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(_json_safe(payload), fh, indent=2)
        fh.write("\n")


# --------------------------------------------------------------------------------------------------
# Prediction files for the Cityscapes test server (predict.py).
#
# Layout under save_dir, per input <root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png:
#   labelIds/<city>/<stem>_leftImg8bit.png  8-bit label ids (train ids mapped back), what the server
#                                           and cityscapesScripts match by "<city>_<seq>_<frame>*.png"
#   color/<city>/<stem>_color.png           palette visualisation (kept out of labelIds/ on purpose:
#                                           the server rejects two files matching one frame)


def train_id_to_label_id_lut() -> np.ndarray:
    """256-entry uint8 table train id -> Cityscapes label id (0 = "unlabeled" for anything else)."""
    from fastdist.data.cityscapes import CITYSCAPES

    return CITYSCAPES.stored_id_lut()


def flat_palette() -> list[int]:
    """The Cityscapes train-id palette as a 768-entry PIL palette (unused entries black)."""
    from fastdist.data.cityscapes import CITYSCAPES

    return CITYSCAPES.flat_palette()


def prediction_paths(image_path: str, save_dir: str, dataset: str = "citys") -> tuple[str, str]:
    """(label PNG path, colour PNG path) for one input image.

    Cityscapes keeps the city folder (``labelIds/<city>/<stem>_leftImg8bit.png``, ``color/<city>/
    <stem>_color.png``); the other datasets write ``labels/<stem>.png`` (ids as the dataset stores them)
    and ``color/<stem>.png``.
    """
    fname = os.path.basename(image_path)
    if dataset != "citys":
        stem = os.path.splitext(fname)[0]
        return os.path.join(save_dir, "labels", f"{stem}.png"), os.path.join(save_dir, "color", f"{stem}.png")
    city = os.path.basename(os.path.dirname(image_path))
    suffix = "_leftImg8bit.png"
    stem = fname[: -len(suffix)] if fname.endswith(suffix) else os.path.splitext(fname)[0]
    label_path = os.path.join(save_dir, "labelIds", city, f"{stem}_leftImg8bit.png")
    color_path = os.path.join(save_dir, "color", city, f"{stem}_color.png")
    return label_path, color_path


def image_to_input(bgr: np.ndarray, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """(1, 3, H, W) float32 network input: float32(BGR 0..255) - float32(MEAN_BGR), as the loaders do."""
    from fastdist.data.loader import MEAN_BGR_F32

    x = torch.from_numpy(bgr).to(device, non_blocking=True).permute(2, 0, 1).unsqueeze(0).float()
    x = x - MEAN_BGR_F32.to(device).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def write_prediction(pred: np.ndarray, label_path: str, color_path: str | None, lut: np.ndarray,
                     palette: list[int]) -> None:
    """Write one (H, W) uint8 train-id map as a labelId PNG and, optionally, a palette PNG."""
    os.makedirs(os.path.dirname(label_path), exist_ok=True)
    Image.fromarray(lut[pred], mode="L").save(label_path)
    if color_path is not None:
        os.makedirs(os.path.dirname(color_path), exist_ok=True)
        vis = Image.fromarray(pred, mode="P")
        vis.putpalette(palette)
        vis.save(color_path)


def predict_images(
    model: nn.Module,
    image_paths: Sequence[str],
    save_dir: str,
    device: torch.device | str,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp_dtype: torch.dtype | None = None,
    color: bool = True,
    channels_last: bool = False,
    workers: int = 4,
    source: str = "the model",
    progress: Callable[[int], None] | None = None,
    dataset: str = "citys",
) -> int:
    """Predict every image of ``image_paths`` (this rank's shard) and write its PNGs; returns the count.

    Label PNGs hold the ids of ``dataset``'s own id space (train ids mapped back to the stored ids),
    colour PNGs its palette.

    Decoding and PNG encoding run in a thread pool (bounded read-ahead and write-behind) so the device
    stays busy; predictions are at the full image size. An image with NaN/inf logits raises
    `NonFiniteLogitsError` naming ``source`` before its PNGs are written.
    """
    from fastdist.data.torch_loader import read_image_bgr

    device = torch.device(device)
    net = unwrap_for_inference(model).eval()
    from fastdist.data import get_dataset

    spec = get_dataset(dataset)
    lut, palette = spec.stored_id_lut(), spec.flat_palette()
    window = max(2, workers)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reads: deque[Future] = deque(pool.submit(read_image_bgr, p) for p in image_paths[:window])
        writes: deque[Future] = deque()
        for i, path in enumerate(image_paths):
            bgr = reads.popleft().result()
            if i + window < len(image_paths):
                reads.append(pool.submit(read_image_bgr, image_paths[i + window]))
            with torch.inference_mode(), _autocast(device, amp_dtype):
                logits = infer_logits(net, image_to_input(bgr, device, channels_last), None, scales, flip)
            if not bool(torch.isfinite(logits).all()):  # this loop reads the prediction anyway
                raise non_finite_logits_error(f"{source} (image {path})", 1)
            pred = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
            label_path, color_path = prediction_paths(path, save_dir, dataset)
            writes.append(pool.submit(write_prediction, pred, label_path, color_path if color else None,
                                      lut, palette))
            while len(writes) > window:
                writes.popleft().result()
            if progress is not None:
                progress(i + 1)
        for fut in writes:
            fut.result()
    return len(image_paths)
