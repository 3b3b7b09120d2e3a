"""The distillation part of a training step on the fused path (``DistillationLoss``, backends torch and
triton): no op that waits for the device, no full-size copy of the logits, the keep-mask built once per
step, no graph break when the step is compiled; and the keep-mask equal to nearest interpolation."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from fastdist.engine.kd import DistillationLoss, kd_keep_mask
from fastdist.loss import ops

# ATen ops that copy a device value to the host (or size a tensor by its data): a host sync on CUDA
SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero"}
COPY_OPS = {"_to_copy", "clone", "copy_", "contiguous"}
SHAPE = (2, 19, 4, 8)  # logits (B, C, h, w) of a 32 x 64 crop at output stride 8
FUSED = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="triton on CPU needs TRITON_INTERPRET=1"))]


class _OpLog(TorchDispatchMode):
    """Every op the engine dispatches around the fused loss (the loss's own body, which eagerly runs as
    an autograd.Function, is left out while ``inside`` is set), and which of them return a tensor with
    as many elements as the logits."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.ops, self.full_size, self.inside = numel, Counter(), Counter(), False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if self.inside:
            return out
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        leaves = torch.utils._pytree.tree_leaves(out)
        if any(isinstance(t, torch.Tensor) and t.numel() == self.numel for t in leaves):
            self.full_size[name] += 1
        return out


def _paused(log: _OpLog, fn):  # noqa: ANN001, ANN202
    def run(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        log.inside = True
        try:
            return fn(*args, **kwargs)
        finally:
            log.inside = False
    return run


def _fused_loss_nodes(loss: torch.Tensor) -> int:
    """How many nodes of ``loss``'s autograd graph are a fused DIST loss (autograd.Function or custom
    op); the reference formula has none (it is a graph of ATen ops)."""
    seen, todo, count = set(), [loss.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += "DistLoss" in type(node).__name__ or "dist_loss" in node.name()
        todo += [fn for fn, _ in node.next_functions]
    return count


def _batch(channels_last: bool) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def logits(grad: bool) -> torch.Tensor:
        x = torch.randn(SHAPE, generator=gen).to(torch.bfloat16).contiguous(memory_format=fmt)
        return x.requires_grad_(grad)

    student = {"out": logits(True), "aux": logits(True)}
    teacher = {"out": logits(False), "aux": logits(False)}
    labels = torch.randint(0, 19, (2, 32, 64), generator=gen)
    labels[:, :9] = 255
    return student, teacher, labels, torch.randn(2, 3, 32, 64, generator=gen)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("backend", FUSED)
def test_fused_kd_part_has_no_sync_copy_or_second_mask(backend: str, channels_last: bool,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    student, teacher, labels, images = _batch(channels_last)
    log = _OpLog(student["out"].numel())
    for step in ("forward", "backward"):  # the real fused loss runs; only the op log pauses inside it
        real = getattr(ops._EagerDistLoss, step)
        monkeypatch.setattr(ops._EagerDistLoss, step, staticmethod(_paused(log, real)))
    crit = DistillationLoss(backend=backend, mask="ignore")
    outs = {k: v * 1 for k, v in student.items()}  # non-leaf logits, as a model's
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # every op, inside the custom ops too
        crit.kd_loss(outs, teacher, labels, images).backward()
    syncs = [e.name for e in prof.events() if e.name in SYNC_OPS]
    assert not syncs, f"ops that wait for the device: {syncs}"

    with log:
        kd = crit.kd_loss({k: v * 1 for k, v in student.items()}, teacher, labels, images)
        fused = _fused_loss_nodes(kd)
        kd.backward()
    assert fused == 2, f"main and aux term each through one fused loss node, got {fused}"
    assert log.ops["eq"] == 1 and log.ops["upsample_nearest2d"] == 0, log.ops  # one mask for both terms
    copies = {k: v for k, v in log.full_size.items() if k in COPY_OPS}
    assert not copies, f"full-size copies of the logits: {copies}"
    grad = student["out"].grad
    assert grad.dtype == torch.bfloat16 and grad.stride() == student["out"].stride()


class _Tiny(nn.Module):
    """Main and aux logits at 1/8 resolution, as the segmentation models return them."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Conv2d(3, 19, 3, stride=8, padding=1)
        self.aux = nn.Conv2d(3, 19, 3, stride=8, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.main(x), "aux": self.aux(x)}


@pytest.mark.parametrize("backend", FUSED)
def test_compiled_step_with_the_fused_loss_is_one_graph(backend: str) -> None:
    """Teacher forward, student forward, CE and the masked fused loss trace as one graph (the custom ops
    have fake kernels; the mask has no data-dependent shape)."""
    torch.manual_seed(0)
    student, teacher = _Tiny(), _Tiny().eval().requires_grad_(False)
    crit = DistillationLoss(backend=backend, mask="pad")
    _, _, labels, images = _batch(False)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                t_out = teacher(x)
            task, kd = crit(student(x), t_out, y, x)
        return task + kd

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(images, labels)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


@pytest.mark.parametrize(("full", "size"), [((32, 64), (4, 8)), ((30, 50), (4, 8)), ((17, 9), (5, 4))])
@pytest.mark.parametrize("kind", ["ignore", "pad"])
def test_keep_mask_is_nearest_interpolation(full: tuple[int, int], size: tuple[int, int], kind: str) -> None:
    """Strided views at integer ratios and interpolation otherwise both equal F.interpolate(nearest) of
    the full-resolution exclusion."""
    gen = torch.Generator().manual_seed(sum(full) + len(kind))
    labels = torch.randint(0, 19, (3, *full), generator=gen)
    labels[torch.rand(3, *full, generator=gen) < 0.4] = 255
    images = torch.randn(3, 3, *full, generator=gen)
    images[torch.rand(3, *full, generator=gen).expand(3, 3, *full).transpose(0, 1) < 0.5] = 0
    excluded = labels == 255
    if kind == "pad":
        excluded &= (images == 0).all(dim=1)
    want = ~F.interpolate(excluded[:, None].float(), size=size, mode="nearest")[:, 0].bool()
    got = kd_keep_mask(kind, images, labels, size)
    assert got.dtype == torch.bool and got.shape == (3, *size)
    assert torch.equal(got, want)
    assert 0 < int(got.sum()) < got.numel()  # both kept and excluded pixels: a real comparison
