"""The distillation set-up: teacher and student models, and the combined task + DIST loss.

Recipe (reference ``train_kd.py``)::

    task = CE(up(main), y) + 0.4 * CE(up(aux), y)              up: bilinear, align_corners=True
    kd   = lambda_kd * DIST(main_s, main_t) + 0.4 * lambda_kd * DIST(aux_s, aux_t)

``method`` swaps DIST for pixel-wise KD or channel-wise CWD (``fastdist.kd_loss`` / ``cwd_loss``) with
the same weighting, aux rule and mask.

CE ignores label 255; DIST compares the logits at their own (1/8) resolution, optionally leaving out
masked pixels (``--kd-mask``). The aux terms exist only for models with an auxiliary head (ResNet
backbones); a student aux head without a teacher aux head gets the CE term but no DIST term.

Models are built and loaded on the CPU first (`build_student`, `build_teacher`), so an unknown name
or a checkpoint that does not fit fails before the process group, CUDA and the data pipeline start;
`prepare_student` / `prepare_teacher` then move them to the device in their fast form.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdist.data.cityscapes import IGNORE_INDEX, NUM_CLASSES
from fastdist.engine.runtime import to_device
from fastdist.loss import CWDLoss, DISTLoss, KDLoss
from fastdist.models import CheckpointError, build_model, load_checkpoint, load_pretrained_backbone

if TYPE_CHECKING:
    from fastdist.engine.config import DistillConfig, ModelConfig

__all__ = ["AUX_WEIGHT", "DistillationLoss", "ModelLoadError", "build_criterion", "build_student",
           "build_teacher", "drop_unused_teacher_heads", "kd_keep_mask", "prepare_student", "prepare_teacher"]

AUX_WEIGHT = 0.4
# torch >= 2.13 renamed DDP's per-forward buffer sync flag (the old name warns).
_DDP_PARAMS = inspect.signature(nn.parallel.DistributedDataParallel).parameters
_DDP_BUFFER_FLAG = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_PARAMS else "broadcast_buffers"
Outputs = dict[str, Tensor]


class ModelLoadError(ValueError):
    """A weights file that cannot be read or does not fit the model named on the command line."""


def _load(what: str, flag: str, path: str, loader: Callable[[], object], model: str, backbone: str) -> None:
    try:
        loader()
    except (CheckpointError, FileNotFoundError, RuntimeError, KeyError) as err:
        raise ModelLoadError(
            f"{flag} {path} does not fit the {what} {model}/{backbone}: {err}\n"
            f"Check that --{what}-model/--{what}-backbone name the network the file was trained as."
        ) from None


def _build_role(models: ModelConfig, role: str, num_classes: int) -> nn.Module:
    """``role`` ("student" or "teacher") with ``num_classes`` outputs on the CPU with
    ``--<role>-pretrained-base`` and then ``--<role>-pretrained`` loaded (each only when given)."""
    name, backbone = getattr(models, f"{role}_model"), getattr(models, f"{role}_backbone")
    model = build_model(name, backbone, num_classes)
    base, full = getattr(models, f"{role}_pretrained_base"), getattr(models, f"{role}_pretrained")
    if base:
        _load(role, f"--{role}-pretrained-base", base, lambda: load_pretrained_backbone(model, base),
              name, backbone)
    if full:
        _load(role, f"--{role}-pretrained", full, lambda: load_checkpoint(model, full), name, backbone)
    return model


def build_student(models: ModelConfig, num_classes: int = NUM_CLASSES) -> nn.Module:
    """The student on the CPU with its initial weights (``--student-pretrained[-base]``)."""
    return _build_role(models, "student", num_classes)


def build_teacher(models: ModelConfig, num_classes: int = NUM_CLASSES) -> nn.Module | None:
    """The frozen teacher on the CPU (None with ``--teacher-model none``)."""
    if not models.distilled:
        return None
    model = _build_role(models, "teacher", num_classes)
    model.eval()
    model.requires_grad_(False)
    return model


def drop_unused_teacher_heads(teacher: nn.Module | None, student: nn.Module) -> None:
    """Remove the teacher's auxiliary head when the student has none: its logits would go unused.

    (A ResNet teacher with a MobileNetV2 student: this saves the FCN head on the teacher's layer3.)
    """
    if teacher is not None and getattr(student, "auxlayer", None) is None and hasattr(teacher, "auxlayer"):
        teacher.auxlayer = None


def prepare_student(model: nn.Module, device: torch.device, world_size: int, channels_last: bool,
                    compile_model: bool) -> nn.Module:
    """The training form of the student: SyncBatchNorm on multi-GPU, device, compile, then DDP.

    ``model`` itself stays the plain module (same parameters): use it for evaluation and saving.
    On CPU, SyncBatchNorm is not supported by torch; BatchNorm stays per-rank there and DDP
    broadcasts rank 0's buffers each step so that all ranks keep identical statistics.
    """
    sync_bn = world_size > 1 and device.type == "cuda"
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = to_device(model, device, channels_last)
    model.train()
    net: nn.Module = torch.compile(model) if compile_model else model
    if world_size > 1:
        kwargs: dict = {}
        if sync_bn:  # SyncBN keeps the buffers identical by itself: no per-forward broadcast
            kwargs[_DDP_BUFFER_FLAG] = False
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
            **kwargs)
    return net


def prepare_teacher(model: nn.Module | None, device: torch.device, channels_last: bool,
                    compile_model: bool) -> nn.Module | None:
    """The frozen teacher on the device (eval mode, no grad), compiled on request."""
    if model is None:
        return None
    model = to_device(model, device, channels_last).eval()
    return torch.compile(model) if compile_model else model


def _integer_steps(full: tuple[int, ...], size: tuple[int, int]) -> tuple[int, int] | None:
    """(sh, sw) when ``full`` (H, W) is an integer multiple of ``size``, else None.

    Then nearest downsampling is the strided view ``x[..., ::sh, ::sw]`` exactly (``F.interpolate``'s
    nearest source index is floor(i * H / h) = i * sh)."""
    (h_in, w_in), (h, w) = full, size
    if h_in % h or w_in % w:
        return None
    return h_in // h, w_in // w


def kd_keep_mask(kind: str, images: Tensor, labels: Tensor, size: tuple[int, int]) -> Tensor | None:
    """The (B, h, w) bool keep-mask of the DIST loss at logits resolution ``size``, or None.

    ``ignore``: pixels whose nearest-downsampled label is not 255. ``pad``: pixels that are not crop
    padding (padding = image exactly 0 in all channels *and* label 255, nearest-downsampled).
    At an integer ratio (the models' output stride) the labels and images are read as strided views at
    logits resolution: two small element-wise ops, no full-resolution temporary, no interpolation.
    """
    if kind == "none":
        return None
    if kind not in ("ignore", "pad"):
        raise ValueError(f"unknown kd mask {kind!r}")
    steps = _integer_steps(tuple(labels.shape[-2:]), size)
    if steps is not None:
        labels, images = labels[..., ::steps[0], ::steps[1]], images[..., ::steps[0], ::steps[1]]
    excluded = labels == IGNORE_INDEX
    if kind == "pad":
        excluded = (images == 0).all(dim=1) & excluded
    if tuple(excluded.shape[-2:]) != tuple(size):
        excluded = F.interpolate(excluded[:, None].to(torch.uint8), size=size, mode="nearest")[:, 0].bool()
    return ~excluded


class DistillationLoss(nn.Module):
    """``forward(student_out, teacher_out, labels, images) -> (task_loss, kd_loss)``, float32 0-d.

    ``kd_loss`` already includes ``lambda_kd`` (and is 0 without a teacher).
    """

    def __init__(self, lambda_kd: float = 1.0, tau: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                 backend: str = "auto", mask: str = "none", intra_sync: bool = False,
                 method: str = "dist") -> None:
        super().__init__()
        self.lambda_kd, self.mask = lambda_kd, mask
        if method == "dist":
            self.dist: nn.Module = DISTLoss(beta=beta, gamma=gamma, tau=tau, backend=backend,
                                            intra_sync=intra_sync)
        elif method in ("kd", "cwd"):
            self.dist = (KDLoss if method == "kd" else CWDLoss)(tau=tau, backend=backend)
        else:
            raise ValueError(f"unknown kd method {method!r}; expected 'dist', 'kd' or 'cwd'")

    @staticmethod
    def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
        """CE of logits upsampled (bilinear, align_corners=True, float32) to the label size.

        The mean over the labelled pixels; 0 (not NaN, as ``reduction="mean"`` gives) for a batch
        without any, e.g. crops that fall entirely on ignore-labelled regions.
        """
        up = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=True)
        total = F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (labels != IGNORE_INDEX).sum().clamp_min(1)

    def task_loss(self, out: Outputs, labels: Tensor) -> Tensor:
        loss = self.cross_entropy(out["out"], labels)
        if "aux" in out:
            loss = loss + AUX_WEIGHT * self.cross_entropy(out["aux"], labels)
        return loss

    def kd_loss(self, out: Outputs, teacher_out: Outputs, labels: Tensor, images: Tensor) -> Tensor:
        masks: dict[tuple[int, int], Tensor | None] = {}

        def term(name: str) -> Tensor:
            size = tuple(out[name].shape[-2:])
            if size not in masks:
                masks[size] = kd_keep_mask(self.mask, images, labels, size)  # type: ignore[index]
            return self.dist(out[name], teacher_out[name], masks[size])  # type: ignore[index]

        loss = term("out")
        if "aux" in out and "aux" in teacher_out:
            loss = loss + AUX_WEIGHT * term("aux")
        return self.lambda_kd * loss

    def forward(self, out: Outputs, teacher_out: Outputs | None, labels: Tensor,
                images: Tensor) -> tuple[Tensor, Tensor]:
        task = self.task_loss(out, labels)
        if teacher_out is None:
            return task, torch.zeros((), device=task.device, dtype=torch.float32)
        return task, self.kd_loss(out, teacher_out, labels, images)


def build_criterion(distill: DistillConfig) -> DistillationLoss:
    """The task + distillation loss of the ``--kd-*`` flags."""
    return DistillationLoss(distill.lambda_kd, distill.kd_temperature, distill.kd_beta, distill.kd_gamma,
                            distill.kd_backend, distill.kd_mask, distill.kd_intra_sync, distill.kd_method)
