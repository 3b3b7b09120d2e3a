"""Prediction files (predict.py); for Cityscapes ready for its test server.

Layout under ``save_dir``, per input ``<root>/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``:

* ``labelIds/<city>/<stem>_leftImg8bit.png``: 8-bit label ids (train ids mapped back), what the server
  and cityscapesScripts match by ``<city>_<seq>_<frame>*.png``;
* ``color/<city>/<stem>_color.png``: a palette visualisation (kept out of ``labelIds/`` on purpose: the
  server rejects two files matching one frame).

Other datasets: ``labels/<stem>.png`` in the dataset's own id space and ``color/<stem>.png``.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch import nn

from fastdist.engine.finite import non_finite_logits_error
from fastdist.engine.inference import image_to_input, infer_logits, unwrap_for_inference
from fastdist.engine.runtime import autocast

__all__ = ["flat_palette", "predict_images", "prediction_paths", "train_id_to_label_id_lut",
           "write_prediction"]


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

    Cityscapes keeps the city folder (the module docstring); the other datasets write
    ``labels/<stem>.png`` (ids as the dataset stores them) and ``color/<stem>.png``.
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
    amp: str = "off",
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
            with torch.inference_mode(), autocast(device.type, amp):
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
