"""The torch.utils.data backend: PIL decoding and augmentation in workers, normalisation on device.

Workers decode (PIL: PNG and JPEG; a palette label's indices are its ids), map labels to train ids
(the dataset's table), and for training resize with cv2's source-pixel
mapping for ``resize(fx=fy=scale)`` (step ``1 / scale``; bilinear with ``align_corners=False``
semantics and no antialias, like INTER_LINEAR, within one grey level of cv2's fixed-point result;
labels nearest, source pixel ``floor(dst * (1 / scale))`` exactly as INTER_NEAREST), pad
bottom/right, crop and flip, all as uint8.  Only the crop window of the scaled image is computed.
The main process copies pinned uint8 batches to the device without
blocking, converts to float32, subtracts the mean and zeroes the padding there: 4x less traffic
than shipping floats.  Sample order and every random draw come from :class:`Schedule`.

Workers obey SIGINT and SIGTERM only when the main process sends them: torchrun signals each rank's
whole process group (a terminal's Ctrl-C its foreground group), and a worker killed by that would make
the main process fail with "DataLoader worker ... is killed by signal" before its preemption handler
could checkpoint.  So only the main process decides; its ``DataLoader`` still stops the workers (the
sentinel, and as a last resort ``terminate()``, as ``multiprocessing`` also does at interpreter exit),
and workers exit on their own when the main process dies.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fastdist.data.cityscapes import CITYSCAPES, IGNORE_INDEX
from fastdist.data.loader import MEAN_BGR_F32, Loader, check_same_size, finish_batch
from fastdist.data.pairs import load_verified, read_stored_ids
from fastdist.data.sampler import CropPlan, SampleSpec, Schedule, nearest_sources, plan_crop
from fastdist.data.spec import DatasetError, DatasetSpec, Pair

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}

Sample = tuple[torch.Tensor, torch.Tensor | None, tuple[int, int, bool], str]


def _read(path: str, mode: str) -> np.ndarray:
    with load_verified(path) as img:
        return np.asarray(img.convert(mode) if img.mode != mode else img)


def read_image_bgr(path: str) -> np.ndarray:
    """(H, W, 3) uint8 BGR pixels of an image file."""
    return np.ascontiguousarray(_read(path, "RGB")[..., ::-1])


def read_train_ids(path: str, dataset: DatasetSpec = CITYSCAPES) -> np.ndarray:
    """(H, W) uint8 train ids (255: ignore) of a label file of ``dataset`` (default Cityscapes labelIds)."""
    return dataset.label_lut()[read_stored_ids(path, dataset)]


def _linear_taps(start: int, count: int, in_size: int, scale: float):
    """Source taps of output pixels ``start .. start+count-1`` for bilinear, ``align_corners=False``.

    Source coordinate ``(d + 0.5) * (1 / scale) - 0.5``, computed in float64 and rounded to float32,
    clamped to ``[0, in_size - 1]`` (cv2 INTER_LINEAR of ``resize(fx=fy=scale)``: the step is
    ``1 / scale``, not ``in_size / out_size``): lower index, upper index and the upper weight.
    """
    src = (torch.arange(start, start + count, dtype=torch.float64) + 0.5) * (1.0 / scale) - 0.5
    src = src.to(torch.float32).clamp_(0, in_size - 1)
    lower = src.floor().long()
    return lower, (lower + 1).clamp_(max=in_size - 1), src - lower


def _resize_window(image: torch.Tensor, plan: CropPlan) -> torch.Tensor:
    """The crop window of the image resized to (plan.height, plan.width), computed for the window only.

    Separable bilinear in float32, rounded half up to uint8 (as DALI rounds); work scales with the
    crop, not with the scaled image (2x upscales of 1024x2048 images are 16x cheaper).
    """
    height, width = image.shape[:2]
    r0, r1, rw = _linear_taps(plan.top, plan.valid_h, height, plan.scale)
    c0, c1, cw = _linear_taps(plan.left, plan.valid_w, width, plan.scale)
    first, last = int(c0.min()), int(c1.max())
    band = image[:, first : last + 1]
    top, bottom = band.index_select(0, r0).float(), band.index_select(0, r1).float()
    rows = top.lerp_(bottom, rw[:, None, None])
    left, right = rows.index_select(1, c0 - first), rows.index_select(1, c1 - first)
    out = left.lerp_(right, cw[None, :, None]).add_(0.5).floor_().clamp_(0, 255)
    return out.to(torch.uint8)


def _augment(
    image: torch.Tensor, label: torch.Tensor, plan: CropPlan, crop_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize, pad (image 0 / label 255, bottom-right), crop and flip uint8 HWC image and HW label."""
    out_img = torch.zeros((*crop_size, 3), dtype=torch.uint8)
    out_lbl = torch.full(crop_size, IGNORE_INDEX, dtype=torch.uint8)
    out_img[: plan.valid_h, : plan.valid_w] = _resize_window(image, plan)
    rows = torch.from_numpy(nearest_sources(plan.top, plan.valid_h, label.shape[0], plan.scale))
    cols = torch.from_numpy(nearest_sources(plan.left, plan.valid_w, label.shape[1], plan.scale))
    out_lbl[: plan.valid_h, : plan.valid_w] = label.index_select(0, rows).index_select(1, cols)
    if plan.flip:
        out_img, out_lbl = out_img.flip(1), out_lbl.flip(1)
    return out_img, out_lbl


class PairDataset(Dataset):
    """Map-style dataset indexed by :class:`SampleSpec`: returns uint8 image, uint8 label, valid box."""

    def __init__(self, pairs: Sequence[Pair], crop_size: tuple[int, int],
                 dataset: DatasetSpec = CITYSCAPES) -> None:
        self.pairs, self.crop_size, self.dataset = list(pairs), crop_size, dataset

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, spec: SampleSpec) -> Sample:
        pair = self.pairs[spec.index]
        image = torch.from_numpy(read_image_bgr(pair.image))
        label = None if pair.label is None else torch.from_numpy(read_train_ids(pair.label, self.dataset))
        if label is not None and label.shape != image.shape[:2]:
            raise DatasetError(
                f"{pair.label} is {tuple(label.shape)} but {pair.image} is {tuple(image.shape[:2])}"
            )
        if spec.augment is None:
            return image, label, (image.shape[0], image.shape[1], False), pair.name
        if label is None:
            label = torch.full(image.shape[:2], IGNORE_INDEX, dtype=torch.uint8)
        plan = plan_crop(image.shape[0], image.shape[1], spec.augment, self.crop_size)
        image, label = _augment(image, label, plan, self.crop_size)
        return image, label, (plan.valid_h, plan.valid_w, plan.flip), pair.name


def collate(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor | None, list, list[str]]:
    """Stack uint8 samples (erroring clearly on mixed sizes)."""
    images, labels, valid, names = zip(*samples, strict=True)
    check_same_size(names, [tuple(i.shape[:2]) for i in images])
    stacked = None if any(lbl is None for lbl in labels) else torch.stack(labels)
    return torch.stack(images), stacked, list(valid), list(names)


def normalize(
    images_u8: torch.Tensor, valid: Sequence[tuple[int, int, bool]], mean: torch.Tensor = MEAN_BGR_F32
) -> torch.Tensor:
    """(B, H, W, 3) uint8 BGR -> float32 minus the mean, with padding (outside ``valid``) exactly 0."""
    out = images_u8.to(torch.float32) - mean.to(images_u8.device)
    height, width = out.shape[1:3]
    for i, (valid_h, valid_w, flip) in enumerate(valid):
        if valid_h < height:
            out[i, valid_h:] = 0
        if valid_w < width:
            cols = slice(0, width - valid_w) if flip else slice(valid_w, width)
            out[i, :, cols] = 0
    return out


def _obey_only(main_pid: int) -> None:
    """Wait for SIGINT/SIGTERM; exit on one sent by the main process, drop those sent by others.

    The exit is a clean one (status 0): the main process asked for it, and torch's SIGCHLD check in
    the main process would report any other status as a failed worker.
    """
    while signal.sigwaitinfo(_STOP_SIGNALS).si_pid != main_pid:
        pass
    os._exit(0)


def _drop_signal(_signum: int, _frame: object) -> None:
    """The worker's SIGINT/SIGTERM handler: nothing to do, the main process decides (``_obey_only``)."""


def _worker_init(main_pid: int, _: int) -> None:
    """Leave SIGINT/SIGTERM to the main process ``main_pid`` (see the module docstring).

    The signals are blocked in every thread of the worker (it has one now; later threads inherit the
    mask) and one thread takes them with ``sigwaitinfo``, which tells who sent them.  Plain SIG_IGN
    would not do: ``multiprocessing`` terminates daemonic workers at exit with SIGTERM and then waits
    for them, forever if they ignore it.  (torch itself limits each worker to one intra-op thread.)
    Second line of defence: torch's worker handler turns a SIGTERM from anyone but the parent into
    the default action (death), so the handlers are replaced by one that drops the signal, should
    one ever reach a thread outside ``sigwaitinfo``.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    for stop_signal in _STOP_SIGNALS:
        signal.signal(stop_signal, _drop_signal)
    threading.Thread(target=_obey_only, args=(main_pid,), daemon=True).start()


class TorchLoader(Loader):
    """(images, labels) batches from a ``torch.utils.data.DataLoader`` over the shared schedule."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        schedule: Schedule,
        crop_size: tuple[int, int],
        device: torch.device,
        num_workers: int,
        channels_last: bool,
        dtype: torch.dtype,
        dataset: DatasetSpec = CITYSCAPES,
    ) -> None:
        super().__init__(schedule)
        self.device, self.channels_last, self.dtype = device, channels_last, dtype
        self._mean = MEAN_BGR_F32.to(device)
        workers = max(int(num_workers), 0)
        self._loader = DataLoader(
            PairDataset(pairs, crop_size, dataset),
            batch_sampler=schedule,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None,
            # worker seeds from a private generator: iterating never moves the global torch RNG
            generator=torch.Generator().manual_seed(schedule.seed),
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, valid, _ in self._start_batches():
            images = normalize(images.to(self.device, non_blocking=True), valid, self._mean)
            if labels is not None:
                labels = labels.to(self.device, non_blocking=True)
            yield finish_batch(images, labels, self.channels_last, self.dtype)

    def _start_batches(self) -> Iterator[Sample]:
        """``iter(DataLoader)`` with SIGINT/SIGTERM blocked in this thread while it forks the workers.

        torch starts threads in a worker before its init function runs, and a signal from elsewhere
        delivered to one of those would kill the worker with the default action; forked with the
        signals blocked, every thread of the worker inherits the block.  Signals sent to this process
        meanwhile stay pending and arrive when the mask is restored.
        """
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return iter(self._loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
