"""torchrun worker for tests/test_loss_sync.py: DDP training step with the DIST loss on half a batch.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=W tests/loss_sync_worker.py OUT BACKENDS
Writes OUT/rank{r}.pt = {(backend, intra_sync): (loss, [param grads after DDP averaging])}, plus
("torch", "group"): intra_sync with an explicit process group.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastdist

LOSS_KW = dict(beta=1.0, gamma=2.0, tau=2.0)


def dtype_for(backend: str) -> torch.dtype:
    """float64 where the backend takes it, so that the equivalence is checked beyond fp32 rounding."""
    return torch.float32 if backend == "triton" else torch.float64


def make_model(backend: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 1))
    return model.to(dtype_for(backend))


def global_batch(backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (4, 3, 6, 7), teacher logits (4, 5, 6, 7), keep-mask (4, 6, 7)), the same on every rank."""
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 6, 7, generator=gen)
    teacher = 3 * torch.randn(4, 5, 6, 7, generator=gen)
    mask = torch.rand(4, 6, 7, generator=gen) < 0.8
    return images.to(dtype_for(backend)), teacher.to(dtype_for(backend)), mask


def constant_rows(rows: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) (rows, 4) float64 with all rows equal: every column is constant on every rank."""
    s = torch.tensor([[0.5, -1.0, 2.0, 0.0]], dtype=torch.float64).repeat(rows, 1)
    t = torch.tensor([[1.5, 0.0, -2.0, 1.0]], dtype=torch.float64).repeat(rows, 1)
    return s, t


def step(model: nn.Module, images, teacher, mask, backend: str, intra_sync: bool, group=None, compiled=False):
    crit = fastdist.DISTLoss(backend=backend, intra_sync=intra_sync, process_group=group, **LOSS_KW)
    loss_fn = torch.compile(crit, fullgraph=True) if compiled else crit
    loss = loss_fn(model(images), teacher, mask)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def main(out_dir: Path, backends: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    part = slice(rank * 4 // world, (rank + 1) * 4 // world)
    results = {}
    for backend in backends:
        images, teacher, mask = global_batch(backend)
        for intra_sync in (True, False):
            model = DistributedDataParallel(make_model(backend))
            results[(backend, intra_sync)] = step(
                model, images[part], teacher[part], mask[part], backend, intra_sync
            )
    # an explicit process group (here: all ranks again) gives the same result as the default group
    images, teacher, mask = global_batch("torch")
    model = DistributedDataParallel(make_model("torch"))
    group = dist.new_group()
    results["torch", "group"] = step(model, images[part], teacher[part], mask[part], "torch", True, group)
    # the same under torch.compile(fullgraph=True): the group reaches the custom op by its name
    model = DistributedDataParallel(make_model("torch"))
    results["torch", "group", "compiled"] = step(
        model, images[part], teacher[part], mask[part], "torch", True, group, compiled=True
    )
    for backend in ("torch", "reference"):
        s, t = constant_rows()
        s.requires_grad_(True)
        loss = fastdist.dist_loss(s, t, backend=backend, intra_sync=True, **LOSS_KW)
        loss.backward()
        results[backend, "constant"] = (loss.detach(), [s.grad.clone()])
    torch.save(results, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    from fastdist.engine.distributed import exit_process

    main(Path(sys.argv[1]), sys.argv[2].split(","))
    exit_process(0)
