"""Checkpoint I/O for the segmentation models, compatible with the published DIST/CIRKD files.

Accepted layouts: a plain state dict (``torch.save(model.state_dict())``, as the reference saves), one
wrapped under ``"state_dict"``, ``"model"`` or ``"student"`` (fastdist's ``latest.pth``/``best.pth``;
nested wrappers too), and keys prefixed by DDP (``module.``) or ``torch.compile`` (``_orig_mod.``), in
any combination. Loading is strict: missing,
unexpected or wrongly shaped keys raise ``CheckpointError`` listing them. Files are read with
``torch.load(weights_only=True)`` on the CPU (tensors and plain containers only; no code execution).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]
_WRAPPER_KEYS = ("state_dict", "model", "student")
_MAX_LISTED = 30


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read, or does not match the model."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP / DataParallel / ``torch.compile`` wrappers (in any nesting)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def normalize_key(key: str) -> str:
    """Drop leading ``module.`` (DDP) and every ``_orig_mod.`` (torch.compile) component of a key."""
    parts = key.split(".")
    start = 0
    while start < len(parts) - 1 and parts[start] in ("module", "_orig_mod"):
        start += 1
    return ".".join(p for p in parts[start:] if p != "_orig_mod")


def _read_file(path: str | os.PathLike[str]) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {os.fspath(path)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for truncated / non-checkpoint files
        reason = f"{type(err).__name__}: {err}"
        raise CheckpointError(f"cannot read checkpoint {os.fspath(path)}: {reason}") from err


def _extract_state_dict(obj: Any, source: str) -> StateDict:
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: no state dict found (got {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, Tensor))]
    if bad:
        raise CheckpointError(f"{source}: not a state dict, non-tensor entries: {_listing(bad)}")
    state: StateDict = {}
    for key, value in obj.items():
        name = normalize_key(key)
        if name in state:
            raise CheckpointError(f"{source}: key {name!r} appears twice after removing prefixes")
        state[name] = value
    return state


def read_state_dict(path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any]) -> StateDict:
    """Read a checkpoint file (or take a loaded object), unwrap it and normalize its keys."""
    if isinstance(path_or_state_dict, Mapping):
        return _extract_state_dict(path_or_state_dict, "state dict")
    return _extract_state_dict(_read_file(path_or_state_dict), os.fspath(path_or_state_dict))


def _listing(keys: Iterable[str]) -> str:
    items = sorted(keys)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def _shape_mismatches(state: StateDict, expected: Mapping[str, Tensor]) -> list[str]:
    return [f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
            for k, v in state.items() if k in expected and v.shape != expected[k].shape]


def _check_match(state: StateDict, expected: Mapping[str, Tensor], source: str,
                 missing_ok: Iterable[str] = ()) -> None:
    missing = set(expected) - set(state) - set(missing_ok)
    unexpected = set(state) - set(expected)
    mismatched = _shape_mismatches(state, expected)
    problems = [f"missing keys ({len(missing)}): {_listing(missing)}" if missing else "",
                f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}" if unexpected else "",
                f"shape mismatches ({len(mismatched)}): {_listing(mismatched)}" if mismatched else ""]
    if any(problems):
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(p for p in problems if p))


def _load_strict(target: nn.Module, state: StateDict, source: str, missing_ok: Iterable[str] = ()) -> None:
    """Check ``state`` against ``target``'s normalized keys, then load it (submodules may be compiled)."""
    actual = target.state_dict()
    names = {normalize_key(k): k for k in actual}
    expected = {name: actual[key] for name, key in names.items()}
    _check_match(state, expected, source, missing_ok)
    target.load_state_dict({names[k]: v for k, v in state.items()}, strict=not missing_ok)


def load_checkpoint(model: nn.Module, path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any]) -> None:
    """Load a model checkpoint strictly into ``model`` (which may itself be DDP/compile wrapped).

    Raises ``FileNotFoundError`` for a missing file, ``CheckpointError`` for an unreadable file or for
    missing / unexpected / wrongly shaped keys (all listed in the message).
    """
    source = "state dict" if isinstance(path_or_state_dict, Mapping) else os.fspath(path_or_state_dict)
    _load_strict(unwrap_model(model), read_state_dict(path_or_state_dict), source)


def _imagenet_trunk(model: nn.Module) -> nn.Module:
    """The backbone module whose keys the ImageNet files use (``pretrained``, or ``pretrained.net``)."""
    backbone = unwrap_model(unwrap_model(model).pretrained)
    return unwrap_model(backbone.net) if hasattr(backbone, "net") else backbone


def load_pretrained_backbone(model: nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Load ImageNet backbone weights (e.g. resnet18-imagenet.pth) into ``model``'s backbone.

    Every backbone parameter/buffer must be in the file (only ``num_batches_tracked`` may be absent)
    with the right shape; the file's other keys (the ImageNet classifier, MobileNetV2's last 1x1
    convolution) are ignored and returned, sorted.
    """
    source = os.fspath(path)
    state = read_state_dict(path)
    trunk = _imagenet_trunk(model)
    expected = {normalize_key(k) for k in trunk.state_dict()}
    unused = sorted(set(state) - expected)
    used = {k: v for k, v in state.items() if k in expected}
    if not used:
        raise CheckpointError(f"{source}: no key matches the backbone (file keys: {_listing(state)})")
    optional = [k for k in expected if k.endswith("num_batches_tracked")]
    _load_strict(trunk, used, source, missing_ok=optional)
    log.info("loaded %d backbone tensors from %s; %d unused keys: %s", len(used), source, len(unused),
             _listing(unused))
    return unused


def to_reference_state_dict(model: nn.Module) -> StateDict:
    """The model's state dict in the plain reference layout (no wrapper prefixes, contiguous tensors)."""
    state = unwrap_model(model).state_dict()
    return {normalize_key(k): v.detach().contiguous() for k, v in state.items()}


__all__ = ["CheckpointError", "load_checkpoint", "load_pretrained_backbone", "normalize_key",
           "read_state_dict", "to_reference_state_dict", "unwrap_model"]
