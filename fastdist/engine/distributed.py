"""Process-group setup for single-process, torchrun single-node and torchrun multi-node runs.

`setup_distributed` reads the variables torchrun exports (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``;
``MASTER_ADDR``/``MASTER_PORT`` come from the torchrun rendezvous, also across nodes) and starts
NCCL on CUDA or gloo on CPU. Without torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) it starts no
process group and returns a rank-0, world-size-1 environment, so the same code runs everywhere.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "DistributedSetupError",
    "barrier",
    "cleanup_distributed",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "setup_distributed",
]

_DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DistributedSetupError(RuntimeError):
    """Raised when the requested device or the torchrun environment cannot be used."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its global rank, the world size, its rank on the node and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one rank is active."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    """An integer environment variable, with a clear error when it is not an integer."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedSetupError(f"environment variable {name}={raw!r} is not an integer") from None


def _resolve_device_type(device: str) -> str:
    """Map "auto"/"cpu"/"cuda" (or "cuda:N") to "cpu" or "cuda", checking that CUDA exists."""
    kind = device.split(":", 1)[0].lower()
    if kind not in _DEVICE_CHOICES:
        choices = ", ".join(_DEVICE_CHOICES)
        raise DistributedSetupError(f"unknown device {device!r}; expected one of {choices} or cuda:N")
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise DistributedSetupError(
            "--device cuda was requested but CUDA is not available "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu"
        )
    return kind


def _cuda_device(device: str, local_rank: int, world_size: int) -> torch.device:
    """The CUDA device of this process: LOCAL_RANK under torchrun, or an explicit ``cuda:N``."""
    count = torch.cuda.device_count()
    index = local_rank
    if ":" in device:
        suffix = device.split(":", 1)[1]
        if not suffix.isdigit():
            raise DistributedSetupError(f"bad device {device!r}; expected cuda or cuda:N")
        explicit = int(suffix)
        if world_size > 1 and explicit != local_rank:
            raise DistributedSetupError(
                f"--device {device} conflicts with torchrun LOCAL_RANK={local_rank}; "
                "use --device cuda and let torchrun pick the GPU"
            )
        index = explicit
    if index >= count:
        raise DistributedSetupError(
            f"GPU index {index} requested (LOCAL_RANK={local_rank}) but only {count} CUDA device(s) "
            "are visible; lower --nproc_per_node or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", index)


def _timeout() -> timedelta:
    """Collective timeout; FASTDIST_DIST_TIMEOUT (seconds) overrides the 30-minute default."""
    return timedelta(seconds=_env_int("FASTDIST_DIST_TIMEOUT", 1800))


def _init_process_group(backend: str, device: torch.device, rank: int, world_size: int) -> None:
    """Start the default process group through the env:// rendezvous torchrun prepares."""
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise DistributedSetupError(
                f"WORLD_SIZE={world_size} but {var} is not set; launch with torchrun "
                "(python -m torch.distributed.run --nproc_per_node=N ...)"
            )
    kwargs: dict = {"backend": backend, "init_method": "env://", "rank": rank, "world_size": world_size,
                    "timeout": _timeout()}
    if device.type == "cuda":
        # Binding the device eagerly lets NCCL create its communicator up front and avoids the
        # "guessing device" barrier warning; supported by the pinned torch (>= 2.3).
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)


def setup_distributed(device: str = "auto") -> DistEnv:
    """Start (or join) the process group and return this process's `DistEnv`.

    Args:
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N" (single process).

    Under torchrun each process uses GPU ``LOCAL_RANK`` with NCCL; on CPU all ranks use gloo. Calling
    it again once a process group exists returns the same environment without re-initialising.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedSetupError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")

    kind = _resolve_device_type(device)
    if kind == "cuda":
        dev = _cuda_device(device, local_rank, world_size)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")

    if world_size > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise DistributedSetupError("this torch build has no torch.distributed support")
        backend = "nccl" if kind == "cuda" else "gloo"
        if backend == "nccl" and not dist.is_nccl_available():
            raise DistributedSetupError("CUDA run under torchrun but this torch build has no NCCL")
        _init_process_group(backend, dev, rank, world_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0)


def is_distributed() -> bool:
    """True when a default process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """World size (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Synchronise all ranks; a no-op without a process group."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists (safe to call more than once)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """Leave the process with ``code`` after flushing Python's streams, skipping interpreter teardown.

    Entry points call this after :func:`cleanup_distributed` and after every file is closed. With
    gloo, the teardown of a finished process occasionally aborts in a C++ destructor ("terminate
    called without an active exception", SIGABRT), which torchrun then reports as a failed run
    although all work was done; ``os._exit`` leaves before those destructors run.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
