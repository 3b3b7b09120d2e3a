"""Where and how the models run: ``--device``, ``--amp`` and ``--channels-last``, for every entry point.

train.py, eval.py and predict.py take these three flags with the same names, values and defaults and
resolve them here (`resolve_runtime`), so one spelling works everywhere:

* ``--device auto|cuda|cuda:N|cpu`` (default ``auto``: CUDA when available);
* ``--amp auto|bf16|fp16|off`` (default ``auto``: bf16 on GPUs that have it, else fp16; off on CPU).
  ``none`` and ``fp32`` are accepted as aliases of ``off`` (eval.py's and predict.py's earlier
  spellings), in any letter case;
* ``--channels-last`` / ``--no-channels-last`` (default: on for CUDA).

train.py adds ``--compile`` (default: on for CUDA) through the same resolver.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["AMP_ALIASES", "AMP_DTYPES", "AMP_NAMES", "Runtime", "add_runtime_args", "amp_name", "autocast",
           "resolve_runtime", "to_device"]

AMP_NAMES = ("auto", "bf16", "fp16", "off")  # the canonical values of --amp
AMP_ALIASES = {"none": "off", "fp32": "off"}  # earlier spellings that keep working
AMP_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass(frozen=True)
class Runtime:
    """Resolved runtime flags: ``device_type`` "cuda" or "cpu", ``amp`` one of bf16 / fp16 / off."""

    device: str  # as given (auto, cpu, cuda, cuda:N): setup_distributed picks the index from it
    device_type: str
    amp: str
    channels_last: bool
    compile: bool


def _canonical_amp(value: str) -> str:
    name = AMP_ALIASES.get(value.lower(), value.lower())
    if name not in AMP_NAMES:
        raise ValueError(f"expected one of {', '.join((*AMP_NAMES, *AMP_ALIASES))}, got {value!r}")
    return name


def amp_name(value: str) -> str:
    """argparse type of ``--amp``: the canonical name of ``value`` (aliases and letter case folded)."""
    try:
        return _canonical_amp(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_runtime_args(parser: argparse._ActionsContainer) -> None:
    """``--device``, ``--amp`` and ``--channels-last``, as every entry point spells them."""
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: auto, CUDA "
                        "when available)")
    parser.add_argument("--amp", type=amp_name, default="auto", metavar="{auto,bf16,fp16,off}",
                        help="autocast dtype (default: auto, bf16 on GPUs that have it, else fp16; off on "
                        "CPU; none and fp32 mean off)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last model and data (default: on for CUDA)")


def _device_type(device: str) -> str:
    kind = device.split(":", 1)[0].lower()
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device {device}: expected auto, cuda, cuda:N or cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} but CUDA is not available here; use --device cpu")
    return "cuda" if kind != "cpu" and torch.cuda.is_available() else "cpu"


def resolve_runtime(device: str, amp: str | None, channels_last: bool | None,
                    compile_model: bool | None = False) -> Runtime:
    """The concrete runtime for the flags (``None`` and ``"auto"`` take the device's fast setting);
    ValueError naming the flag for a device that is not there."""
    device_type = _device_type(device)
    cuda = device_type == "cuda"
    amp = _canonical_amp(amp or "auto")
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
    return Runtime(device=device, device_type=device_type, amp=amp,
                   channels_last=cuda if channels_last is None else channels_last,
                   compile=cuda if compile_model is None else compile_model)


def autocast(device_type: str, amp: str) -> contextlib.AbstractContextManager:
    """Autocast to ``amp``'s dtype on ``device_type`` (bf16, fp16), or a null context for ``off`` (or
    its aliases ``fp32`` / ``none``)."""
    dtype = AMP_DTYPES[_canonical_amp(amp)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def to_device(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """Move ``model`` to ``device``, in channels-last memory format when asked."""
    fmt = torch.channels_last if channels_last else torch.preserve_format
    return model.to(device, memory_format=fmt)
