"""Training checkpoints on disk: atomic writes, the file format, per-rank RNG states as plain values,
the reference export. What a checkpoint holds is the Trainer's (`Trainer.state_dict`); this module
only writes and reads it.

A training checkpoint (``latest.pth``, ``best.pth``) is a dict::

    {"format": "fastdist-train", "version": 1, "config": resolved configuration (config_dict),
     **Trainer.state_dict(): "iteration": int, "student": state dict, "optimizer": state dict,
     "scaler": state dict | None, "rng": [per-rank RNG states], "best_miou": float | None,
     "best_iteration": int | None, "owed": list of "validate" / "export"}

``owed`` is what the iteration still had to do when the file was written (``latest.pth`` is saved
before validating, so that a failing validation loses no training): ``--resume`` does it first.
Files without the key (earlier fastdist) owe nothing.

It loads with ``torch.load(weights_only=True)`` (tensors and plain containers only). Every file is
written to a temporary name in the same folder, flushed to disk and renamed over the old one, so a
crash or preemption at any moment leaves either the old or the new file, never a torn one.
``export_reference`` writes the plain student state dict in the reference key layout (what the
reference ``train_kd.py`` saves and its ``eval.py`` loads).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fastdist.models import to_reference_state_dict

__all__ = ["BEST", "FORMAT", "LATEST", "OWED", "CheckpointFormatError", "CheckpointWriteError", "atomic_copy",
           "atomic_save", "export_reference", "gather_rng_states", "load_training_state", "read_saved_config",
           "reference_export_name", "remove_earlier_run", "rng_state", "save_training_state", "set_rng_state"]

FORMAT = "fastdist-train"
VERSION = 1
LATEST = "latest.pth"
BEST = "best.pth"
OWED = ("validate", "export")  # what a checkpoint's iteration may still owe, in the order it is done


class CheckpointFormatError(ValueError):
    """A ``--resume`` file that is not a fastdist training checkpoint."""


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written (disk full, permissions, ...); the old file is intact."""


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` then fsync and rename over ``path``; on failure the temporary file is removed and
    a `CheckpointWriteError` names ``path`` and the cause (a torn file never replaces a good one)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(directory, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        kept = "the previous file is unchanged" if os.path.exists(path) else "no earlier file existed"
        raise CheckpointWriteError(f"could not write {path} ({kept}): {type(err).__name__}: {err}. "
                                   "Check free space and permissions of that folder") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(directory)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically: temporary file in the same folder, fsync, rename."""
    _write_atomically(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: str, dst: str) -> None:
    """Copy a finished file atomically (same temporary-then-rename scheme)."""
    _write_atomically(dst, lambda tmp: shutil.copyfile(src, tmp))


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes()


def _from_bytes(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random generators (Python, NumPy, torch CPU and CUDA device) as plain values.

    Plain bytes/ints only, so the states travel through ``all_gather_object`` and load under
    ``torch.load(weights_only=True)``.
    """
    name, keys, *rest = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, keys.astype(np.uint32).tobytes(), *[float(v) if isinstance(v, float) else int(v)
                                                            for v in rest]],
        "torch": _to_bytes(torch.get_rng_state()),
        "cuda": _to_bytes(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None,
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32).copy(), *rest))
    torch.set_rng_state(_from_bytes(state["torch"]))
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(_from_bytes(state["cuda"]), device)


def gather_rng_states(device: torch.device) -> list[dict[str, Any]]:
    """Every rank's `rng_state`, in rank order (collective under a process group)."""
    mine = rng_state(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def save_training_state(state: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """Write a training checkpoint: ``state`` (`Trainer.state_dict`) with the format header and the
    resolved ``config`` (`config_dict`), atomically."""
    atomic_save({"format": FORMAT, "version": VERSION, "config": config, **state}, path)


def _read(path: str, mmap: bool = False) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # truncated file, not a torch file, unsupported pickle content...
        reason = f"{type(err).__name__}: {err}"
        raise CheckpointFormatError(f"--resume {path}: cannot read it ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointFormatError(
            f"--resume {path} is not a fastdist training checkpoint (no optimizer/iteration state); "
            f"to start from plain model weights use --student-pretrained {path}")
    if state.get("version") != VERSION:
        raise CheckpointFormatError(f"--resume {path}: checkpoint version {state.get('version')}, "
                                    f"this fastdist reads version {VERSION}")
    if not set(state.setdefault("owed", [])) <= set(OWED):
        raise CheckpointFormatError(f"--resume {path}: unknown pending work {state['owed']}")
    return state


def load_training_state(path: str) -> dict[str, Any]:
    """Read a training checkpoint on the CPU; raise `CheckpointFormatError` for anything else."""
    return _read(path)


def read_saved_config(path: str) -> dict[str, Any]:
    """The resolved configuration a training checkpoint was written under, without reading its tensors
    (memory-mapped); `CheckpointFormatError` for a file that is not a training checkpoint."""
    return dict(_read(path, mmap=True)["config"])


def reference_export_name(student_model: str, student_backbone: str, distilled: bool, best: bool,
                          dataset: str = "citys") -> str:
    """The file name the reference scripts use (``kd_`` prefix for distilled students; the dataset as
    CIRKD names it: citys, ade20k, voc, camvid, coco_stuff_164k)."""
    from fastdist.data import get_dataset

    prefix = "kd_" if distilled else ""
    suffix = "_best_model" if best else ""
    return f"{prefix}{student_model}_{student_backbone}_{get_dataset(dataset).reference_name}{suffix}.pth"


def remove_earlier_run(save_dir: str, log_dir: str) -> list[str]:
    """Delete what an earlier run wrote (``--overwrite``); return the removed paths.

    Its training checkpoints, its reference exports (named from its ``config.json``, so that no other
    file that merely looks like an export is touched) and its ``train.log`` / ``metrics.jsonl``.
    """
    names = [LATEST, BEST]
    try:
        with open(os.path.join(save_dir, "config.json")) as f:
            saved = json.load(f)
        distilled = saved.get("teacher_model") is not None
        names += [reference_export_name(saved["student_model"], saved["student_backbone"], distilled, best,
                                        saved.get("dataset", "citys"))
                  for best in (True, False)]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no readable config.json: only the fixed names
    paths = [os.path.join(save_dir, n) for n in names]
    paths += [os.path.join(log_dir, n) for n in ("train.log", "metrics.jsonl")]
    removed = [p for p in paths if os.path.isfile(p)]
    for path in removed:
        os.remove(path)
    return removed


def export_reference(student: nn.Module, path: str) -> None:
    """Write the plain student state dict (reference key layout), atomically."""
    atomic_save(to_reference_state_dict(student), path)
