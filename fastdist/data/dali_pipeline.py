"""The DALI backend: one pipeline per rank, decoding and augmentation in DALI, output on device.

Sample order and all random draws come from the shared :class:`Schedule` (the same as the torch
backend): an ``external_source`` feeds each batch's encoded image and label bytes *together* (so pairs
can never misalign) with each sample's resize size, crop position and flip. The pipeline decodes
(``mixed`` on a GPU: JPEG with nvJPEG on the GPU, PNG on DALI's CPU threads, then a copy to the GPU;
CPU threads otherwise) straight to BGR, maps the stored label ids to train ids with the dataset's
``lookup_table`` (palette labels, Pascal VOC's ``SegmentationClass``, are decoded to their indices by
the source with PIL: DALI's decoder would expand the palette to colours),
and for training resizes (linear without antialias / nearest), then crops with
bottom-right padding, flips and subtracts the mean in one ``crop_mirror_normalize`` (padding written as
exactly 0, labels padded with 255). With a CUDA device it runs on ``device_id`` = that device with GPU
operators and hands the output to torch via DLPack; without one the same graph runs in DALI's CPU-only
mode (``device_id=None``), which is what the tests use. DALI errors surface as :class:`DatasetError`
naming the file.
"""

from __future__ import annotations

import functools
import io
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from fastdist.data.cityscapes import CITYSCAPES, IGNORE_INDEX
from fastdist.data.loader import MEAN_BGR_F32, Loader, check_same_size, finish_batch
from fastdist.data.pairs import load_verified, read_stored_ids
from fastdist.data.sampler import CropPlan, SampleSpec, Schedule, nearest_sources, plan_crop
from fastdist.data.spec import DatasetError, DatasetSpec, Pair

_MEAN = [float(m) for m in MEAN_BGR_F32]  # the float32 values, as in the torch backend


def _read_bytes(path: str) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from exc


def _image_size(data: np.ndarray, path: str) -> tuple[int, int]:
    """(height, width) from the file header (no decoding)."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as img:
            return img.height, img.width
    except (OSError, ValueError, SyntaxError) as exc:
        raise DatasetError(f"cannot decode {path}: {exc}") from exc


def _crop_pos(offset: int, extent: int, crop: int) -> float:
    """DALI's normalised crop position for an integer offset (0 when the crop pads)."""
    return offset / (extent - crop) if extent > crop else 0.0


_FLOAT32_HEADROOM = 1e-3  # DALI computes source coordinates in float32: keep this far from pixel edges


@functools.lru_cache(maxsize=1024)
def _nearest_roi(in_size: int, out_size: int, scale: float) -> tuple[float, float]:
    """(roi_start, roi_end) along one axis making DALI's nearest resize pick cv2's source pixels.

    DALI picks ``floor(roi_start + (d + 0.5) * step)`` with ``step = (roi_end - roi_start) / out``;
    cv2 picks ``floor(d * (1 / scale))`` in float64 (:func:`nearest_sources`).  With ``step = 1 / scale``
    that is ``floor(d / scale + shift)`` for every shift in ``[max(k_d - d / scale),
    min(k_d + 1 - d / scale))``; the middle of that interval is taken.  Where cv2's float64 rounding
    of ``d * (1 / scale)`` is not affine in ``d`` (at scale 1.3, some multiples of 13 land just below
    an integer) the interval is empty and the shift is half the smallest gap to the next integer,
    the exact ``floor(d / scale)``: those rows/columns then take the neighbouring source pixel.
    """
    d = np.arange(out_size, dtype=np.float64)
    exact = d / scale
    k = nearest_sources(0, out_size, np.iinfo(np.int64).max, scale).astype(np.float64)
    lo, hi = np.max(k - exact), np.min(k + 1 - exact)
    if hi - lo > 2 * _FLOAT32_HEADROOM:
        shift = (lo + hi) / 2
    else:
        gaps = np.ceil(exact) - exact
        shift = float(np.min(gaps[gaps > _FLOAT32_HEADROOM], initial=1.0)) / 2
    start = shift - 0.5 / scale
    return start, start + out_size / scale


def _train_args(plan: CropPlan, height: int, width: int, crop_size: tuple[int, int]) -> list[np.ndarray]:
    """One sample's per-sample arguments: output size, crop position, mirror, image and label ROIs.

    DALI samples output pixel ``d`` at ``roi_start + (d + 0.5) * (roi_end - roi_start) / out`` (pixel
    edges at integers).  The image ROI ``[0, out / scale]`` gives bilinear the source coordinate
    ``(d + 0.5) / scale - 0.5`` of cv2 INTER_LINEAR for ``resize(fx=fy=scale)`` (beyond the image DALI
    clamps, as cv2 does); the label ROI comes from :func:`_nearest_roi`.
    """
    (top, bottom), (left, right) = (_nearest_roi(n, m, plan.scale) for n, m in
                                    ((height, plan.height), (width, plan.width)))
    return [
        np.array(plan.height, dtype=np.float32),
        np.array(plan.width, dtype=np.float32),
        np.array(_crop_pos(plan.top, plan.height, crop_size[0]), dtype=np.float32),
        np.array(_crop_pos(plan.left, plan.width, crop_size[1]), dtype=np.float32),
        np.array(int(plan.flip), dtype=np.int32),
        np.array([0.0, 0.0], dtype=np.float32),
        np.array([plan.height / plan.scale, plan.width / plan.scale], dtype=np.float32),
        np.array([top, left], dtype=np.float32),
        np.array([bottom, right], dtype=np.float32),
    ]


class _BatchSource:
    """Iterable external source: one batch of encoded files and per-sample draws per step."""

    def __init__(self, pairs: Sequence[Pair], schedule: Schedule, crop_size: tuple[int, int],
                 dataset: DatasetSpec) -> None:
        self.pairs, self.schedule, self.crop_size, self.dataset = pairs, schedule, crop_size, dataset
        self.fed: deque[list[Pair]] = deque()  # batches handed to DALI and not yet returned

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], ...]]:
        self.fed.clear()
        for batch in self.schedule:
            pairs = [self.pairs[spec.index] for spec in batch]
            self.fed.append(pairs)
            yield self._batch(batch, pairs)

    def _batch(self, batch: list[SampleSpec], pairs: list[Pair]) -> tuple[list[np.ndarray], ...]:
        images = [_read_bytes(p.image) for p in pairs]
        columns: list[list[np.ndarray]] = [images]
        if pairs[0].label is not None:
            columns.append([self._label(p.label) for p in pairs])
        if self.schedule.train:
            per_sample = []
            for spec, pair, data in zip(batch, pairs, images, strict=True):
                height, width = _image_size(data, pair.image)
                plan = plan_crop(height, width, spec.augment, self.crop_size)
                per_sample.append(_train_args(plan, height, width, self.crop_size))
            columns += [list(column) for column in zip(*per_sample, strict=True)]
        return tuple(columns)


    def _label(self, path: str) -> np.ndarray:
        """The encoded label file, or for palette labels (see the module docstring) its (H, W, 1) ids."""
        if self.dataset.host_label_decode:
            return read_stored_ids(path, self.dataset)[..., None]
        return _read_bytes(path)


def _graph(source: _BatchSource, train: bool, has_labels: bool, crop_size: tuple[int, int], gpu: bool):
    """Define the pipeline graph (called inside ``Pipeline``'s context)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    num_outputs = 1 + has_labels + (9 if train else 0)
    inputs = fn.external_source(source=source, num_outputs=num_outputs, batch=True)
    decoder = "mixed" if gpu else "cpu"
    image = fn.decoders.image(inputs[0], device=decoder, output_type=types.BGR)
    label = None
    if has_labels:
        if source.dataset.host_label_decode:
            label = fn.reshape(inputs[1], layout="HWC")  # ids decoded by the source
            label = label.gpu() if gpu else label
        else:
            label = fn.decoders.image(inputs[1], device=decoder, output_type=types.GRAY)
        keys, values = zip(*sorted(source.dataset.label_map.items()), strict=True)
        label = fn.lookup_table(
            label, keys=list(keys), values=list(values), default_value=IGNORE_INDEX, dtype=types.UINT8
        )
    normalize = dict(mean=_MEAN, std=[1.0, 1.0, 1.0], dtype=types.FLOAT, output_layout="HWC")
    if not train:
        image = fn.crop_mirror_normalize(image, **normalize)
        return (image, label) if has_labels else (image,)
    size_y, size_x, pos_y, pos_x, mirror, *rois = inputs[1 + has_labels :]
    image_start, image_end, label_start, label_end = rois
    resize = dict(resize_x=size_x, resize_y=size_y, antialias=False)
    image = fn.resize(
        image, interp_type=types.INTERP_LINEAR, roi_start=image_start, roi_end=image_end, **resize
    )
    crop = dict(
        crop=list(crop_size), crop_pos_x=pos_x, crop_pos_y=pos_y, mirror=mirror, out_of_bounds_policy="pad"
    )
    image = fn.crop_mirror_normalize(image, fill_values=[0.0, 0.0, 0.0], **normalize, **crop)
    if has_labels:
        label = fn.resize(
            label, interp_type=types.INTERP_NN, roi_start=label_start, roi_end=label_end, **resize
        )
        label = fn.crop_mirror_normalize(
            label, fill_values=[float(IGNORE_INDEX)], dtype=types.UINT8, output_layout="HWC", **crop
        )
    return (image, label) if has_labels else (image,)


def _find_bad_file(batches: Sequence[list[Pair]]) -> str | None:
    for pairs in batches:
        for pair in pairs:
            for path in (pair.image, pair.label):
                if path is None:
                    continue
                try:
                    load_verified(path).close()
                except DatasetError:
                    return path
    return None


def _to_torch(output, device: torch.device) -> torch.Tensor:
    """A DALI TensorList (uniform shape) as a torch tensor: zero-copy via DLPack, as DALI's own
    PyTorch iterator does with the dynamic executor (each output owns its buffer; the consumer
    stream is synchronised through the DLPack protocol)."""
    tensor = output.as_tensor()
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.from_dlpack(tensor)
    return torch.from_dlpack(tensor)


class DaliLoader(Loader):
    """(images, labels) batches from one DALI pipeline over the shared schedule."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        schedule: Schedule,
        crop_size: tuple[int, int],
        device: torch.device,
        num_threads: int,
        channels_last: bool,
        dtype: torch.dtype,
        dataset: DatasetSpec = CITYSCAPES,
    ) -> None:
        super().__init__(schedule)
        self.device, self.channels_last, self.dtype = device, channels_last, dtype
        self.num_threads = max(int(num_threads), 1)
        self.has_labels = all(p.label is not None for p in pairs)
        self.pairs, self.crop_size, self.dataset = list(pairs), crop_size, dataset
        self._source: _BatchSource | None = None

    def _build(self):
        from nvidia.dali import Pipeline

        gpu = self.device.type == "cuda"
        device_id = (
            (self.device.index if self.device.index is not None else torch.cuda.current_device())
            if gpu
            else None
        )
        pipe = Pipeline(
            batch_size=self.schedule.batch_size,
            num_threads=self.num_threads,
            device_id=device_id,
            seed=self.schedule.seed,
            prefetch_queue_depth=2,
            exec_dynamic=True,  # outputs own their buffers: safe zero-copy hand-over to torch
        )
        self._source = _BatchSource(self.pairs, self.schedule, self.crop_size, self.dataset)
        with pipe:
            pipe.set_outputs(*_graph(self._source, self.schedule.train, self.has_labels, self.crop_size, gpu))
        pipe.build()
        return pipe

    def _run(self, pipe):
        try:
            return pipe.run()
        except StopIteration:
            raise
        except RuntimeError as exc:
            bad = _find_bad_file(list(self._source.fed))
            where = bad if bad is not None else ", ".join(p.image for p in self._source.fed[0])
            raise DatasetError(f"DALI failed to load {where}: {str(exc).splitlines()[0]}") from exc

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pipe = self._build()  # a fresh pipeline per pass: restarts the source cleanly after a break
        for _ in range(len(self)):
            outputs = self._run(pipe)
            pairs = self._source.fed.popleft()
            check_same_size([p.name for p in pairs], [tuple(s[:2]) for s in outputs[0].shape()])
            images = _to_torch(outputs[0], self.device).to(self.device, non_blocking=True)
            labels = None
            if self.has_labels:
                labels = _to_torch(outputs[1], self.device)[..., 0].to(self.device, non_blocking=True)
            yield finish_batch(images, labels, self.channels_last, self.dtype)
