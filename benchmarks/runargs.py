"""What every benchmark script resolves from its command line before measuring, and its rows' statuses.

:func:`add_run_args` adds the shared options (``--device``, ``--out``, ``--quick``, ``--time-budget``);
:func:`run_context` turns them into a :class:`RunContext` (device, environment, vendor peaks, output
folder, :class:`Budget`). A row that is not measured says why in its ``status``: the budget's
:meth:`Budget.skip_reason`, or :func:`error_status` of the exception its measurement raised.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, NamedTuple

from env import DevicePeak, capture_env, lookup_peak, resolve_device
from output import default_out_dir


class Budget:
    """Wall-clock budget for a whole script; ``None`` seconds means unlimited."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def exhausted(self) -> bool:
        return self.left() <= 0

    def skip_reason(self) -> str | None:
        """The status of a row not started because the budget is spent, or None while time is left."""
        return "skipped: time budget" if self.exhausted() else None


def error_status(exc: BaseException) -> str:
    """The status of a row whose measurement raised: ``oom``, or ``error: <type>: <first line>``."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"error: {type(exc).__name__}: {first}"


class RunContext(NamedTuple):
    """What every benchmark resolves before measuring: device, environment, peaks, output, time budget."""

    device: str
    env: dict[str, Any]
    peak: DevicePeak | None  # None on CPU and on GPUs missing from the peak table
    out_dir: Path
    budget: Budget


def add_run_args(parser: Any, quick_help: str) -> None:
    """The options :func:`run_context` reads: ``--device``, ``--out``, ``--quick``, ``--time-budget``."""
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu")
    parser.add_argument("--out", default=None,
                        help="output folder (default benchmarks/results/<device>-<date>/)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; rows left when it runs out are written as 'skipped: time budget'")


def run_context(args: Any) -> RunContext:
    """The :class:`RunContext` of a benchmark's parsed ``--device``, ``--out`` and ``--time-budget``."""
    device = resolve_device(args.device)
    env = capture_env(device)
    peak = lookup_peak(env["device_name"]) if env["is_cuda"] else None
    return RunContext(device, env, peak, default_out_dir(env, args.out), Budget(args.time_budget))
