"""Segmentation metrics from a confusion matrix kept on the device.

Conventions (those of the CIRKD/DIST_KD ``SegmentationMetric`` the published numbers come from,
except for the pixAcc argmax, see the last point):

* Pixels whose target is ``ignore_index`` (or any value outside ``[0, num_classes)``) are not counted
  at all: neither as labelled pixels nor in any class's prediction area.
* ``IoU[c] = TP / (TP + FP + FN)``; ``mIoU`` is the mean over **all** ``num_classes`` classes.
* A class absent from both the prediction and the target (union 0) has IoU **0.0** and still counts
  in the mean, as in the reference (there ``inter / (eps + union)`` with union 0 gives 0). This only
  matters on subsets of the data: every Cityscapes class occurs in the full val split. Pass
  ``absent="nan"`` to get NaN for such classes instead and have ``mIoU`` average the present ones only
  (NaN when no class is present).
* ``pixAcc = correct / labelled`` over non-ignored pixels; 0.0 when nothing is labelled.  The
  prediction fed in (:mod:`fastdist.engine.evaluation`) is the argmax of the logits as they are, for
  pixAcc as for IoU.  The reference's pixAcc
  (``batch_pix_accuracy``) differs: it truncates the logits to integers first
  (``torch.argmax(output.long(), 1)``), so logits that tie after truncation (say 0.3 and 0.7) pick the
  first class there; fastdist keeps the untruncated argmax, and its pixAcc can be slightly higher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["ConfusionMatrix", "format_iou_table"]

_ABSENT_MODES = ("zero", "nan")


class ConfusionMatrix:
    """A ``(num_classes, num_classes)`` int64 matrix, rows = target class, columns = predicted class.

    `update` only launches device kernels (no host synchronisation), so it can sit inside a
    validation loop without stalling the GPU; `compute` reads the matrix back once.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        device: torch.device | str | None = None,
        absent: str = "zero",
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if absent not in _ABSENT_MODES:
            raise ValueError(f"absent must be one of {_ABSENT_MODES}, got {absent!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.absent = absent
        # One extra bin collects every ignored pixel, so no boolean indexing (a host sync) is needed.
        self._bins = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64,
                                 device=torch.device(device) if device is not None else None)

    @property
    def device(self) -> torch.device:
        """Device the counts live on."""
        return self._bins.device

    @property
    def matrix(self) -> torch.Tensor:
        """The ``(C, C)`` counts (a view; rows = target, columns = prediction)."""
        c = self.num_classes
        return self._bins[: c * c].view(c, c)

    def reset(self) -> None:
        """Zero all counts."""
        self._bins.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` are integer tensors of the same shape, e.g. (B, H, W).

        Pixels whose target is ``ignore_index`` or outside ``[0, num_classes)`` are skipped; so are
        (impossible for argmax output) predictions outside that range.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError("pred and target must be integer class maps (take argmax of the logits first)")
        c = self.num_classes
        pred = pred.to(self.device, non_blocking=True).reshape(-1).long()
        target = target.to(self.device, non_blocking=True).reshape(-1).long()
        valid = (target >= 0) & (target < c) & (target != self.ignore_index) & (pred >= 0) & (pred < c)
        flat = torch.where(valid, target * c + pred, c * c)
        # index_add_ is bincount without the host sync torch.bincount does on CUDA (it reads the
        # input's max to size its output); integer adds make it exact and order-independent.
        ones = torch.ones((), dtype=torch.int64, device=self.device).expand(flat.numel())
        self._bins.index_add_(0, flat, ones)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add the counts of another matrix with the same number of classes."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge confusion matrices with different num_classes")
        self._bins += other._bins.to(self.device)

    def all_reduce(self, group: dist.ProcessGroup | None = None) -> None:
        """Sum the counts over all ranks of ``group`` in place (no-op without a process group).

        With NCCL the counts must be on the rank's GPU; a CPU matrix is reduced through a temporary
        copy on the current CUDA device.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size(group) == 1:
            return
        if dist.get_backend(group) == "nccl" and self._bins.device.type != "cuda":
            tmp = self._bins.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(tmp, op=dist.ReduceOp.SUM, group=group)
            self._bins.copy_(tmp)
        else:
            dist.all_reduce(self._bins, op=dist.ReduceOp.SUM, group=group)

    def compute(self) -> dict:
        """Return ``{"mIoU": float, "pixAcc": float, "IoU": list[float]}`` (fractions in [0, 1])."""
        hist = self.matrix.double().cpu()
        tp = hist.diag()
        union = hist.sum(0) + hist.sum(1) - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp_min(1), torch.zeros_like(tp))
        if self.absent == "nan":
            iou = torch.where(present, iou, torch.full_like(iou, math.nan))
            miou = iou[present].mean().item() if bool(present.any()) else math.nan
        else:
            miou = iou.mean().item()
        labelled = hist.sum().item()
        pix_acc = tp.sum().item() / labelled if labelled > 0 else 0.0
        return {"mIoU": float(miou), "pixAcc": float(pix_acc), "IoU": [float(v) for v in iou.tolist()]}


def format_iou_table(iou: Sequence[float], class_names: Sequence[str], miou: float | None = None) -> str:
    """A fixed-width text table of per-class IoU in percent (NaN shown as ``n/a``).

    ``miou`` adds a closing ``mean`` row; without it the mean of the listed values is not printed,
    so the caller's mIoU convention stays the only one shown.
    """
    if len(iou) != len(class_names):
        raise ValueError(f"{len(iou)} IoU values for {len(class_names)} class names")
    width = max([len("class"), len("mean")] + [len(n) for n in class_names])

    def row(name: str, value: float) -> str:
        text = "n/a" if math.isnan(value) else f"{100.0 * value:6.2f}"
        return f"{name:<{width}}  {text:>6}"

    lines = [f"{'class':<{width}}  {'IoU %':>6}", "-" * (width + 8)]
    lines += [row(name, float(value)) for name, value in zip(class_names, iou, strict=True)]
    if miou is not None:
        lines += ["-" * (width + 8), row("mean", float(miou))]
    return "\n".join(lines)
