"""Rank-0 run output: console lines, a progress bar on terminals, ``train.log`` and ``metrics.jsonl``.

Every figure printed is also written as one JSON object per line to ``LOG_DIR/metrics.jsonl``
(``{"kind": "train" | "val" | "event", ...}``), so runs can be plotted or compared without parsing
text. Other ranks get a `RunLogger` whose methods do nothing.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time
from typing import Any, TextIO

__all__ = ["ProgressBar", "RunLogger", "format_duration", "terminal_progress"]


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (days folded into hours), ``?`` for a non-finite value."""
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class ProgressBar:
    """A one-line ``\\r`` progress bar, redrawn at most every ``interval`` seconds (host time only)."""

    def __init__(self, total: int, stream: TextIO, start: int = 0, interval: float = 0.5,
                 unit: str = "it") -> None:
        self.total, self.stream, self.interval, self.unit = total, stream, interval, unit
        self.start_it = start
        self.start_time: float | None = None  # the clock starts at the first update
        self._last_draw = 0.0
        self._text = ""

    def update(self, iteration: int) -> None:
        now = time.perf_counter()
        if self.start_time is None:
            self.start_it, self.start_time = iteration, now
        if now - self._last_draw < self.interval and iteration < self.total:
            return
        self._last_draw = now
        elapsed = now - self.start_time
        rate = (iteration - self.start_it) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - iteration) / rate if rate > 0 else math.inf
        frac = iteration / self.total
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        self._text = f"[{bar}] {iteration}/{self.total} {rate:.2f} {self.unit}/s eta {format_duration(eta)}"
        self.stream.write("\r" + self._text + "\x1b[K")
        self.stream.flush()

    def clear(self) -> None:
        if self._text:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def redraw(self) -> None:
        if self._text:
            self.stream.write("\r" + self._text + "\x1b[K")
            self.stream.flush()


def terminal_progress(total: int, unit: str = "img") -> ProgressBar | None:
    """A `ProgressBar` on stderr when it is a terminal (eval.py, predict.py), else None."""
    return ProgressBar(total, sys.stderr, unit=unit) if sys.stderr.isatty() else None


class RunLogger:
    """Console + ``train.log`` + ``metrics.jsonl`` on rank 0; silent elsewhere."""

    def __init__(self, log_dir: str, enabled: bool, progress_total: int | None = None,
                 progress_start: int = 0, dashboards: Any = None) -> None:
        self.enabled = enabled
        self._dashboards = dashboards if enabled else None  # fastdist.engine.dashboards.Dashboards
        self._jsonl: TextIO | None = None
        self._bar: ProgressBar | None = None
        self._log = logging.getLogger("fastdist.train")
        self._handlers: list[logging.Handler] = []
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self._log.setLevel(logging.INFO)
        self._log.propagate = False
        fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout),
                        logging.FileHandler(os.path.join(log_dir, "train.log"))):
            handler.setFormatter(fmt)
            self._log.addHandler(handler)
            self._handlers.append(handler)
        self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", buffering=1)  # noqa: SIM115
        if progress_total is not None and sys.stderr.isatty():
            self._bar = ProgressBar(progress_total, sys.stderr, progress_start)

    def info(self, message: str) -> None:
        """One line (or block) to the console and ``train.log``."""
        if not self.enabled:
            return
        if self._bar:
            self._bar.clear()
        self._log.info(message)
        if self._bar:
            self._bar.redraw()

    def warning(self, message: str) -> None:
        self.info("WARNING: " + message)

    def record(self, kind: str, **fields: Any) -> None:
        """One JSON line: ``{"kind": kind, "time": unix seconds, **fields}``."""
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"kind": kind, "time": round(time.time(), 3), **fields}) + "\n")
        if self._dashboards is not None:
            self._dashboards.record(kind, fields)

    def progress(self, iteration: int) -> None:
        if self._bar:
            self._bar.update(iteration)

    def close(self) -> None:
        if self._bar:
            self._bar.clear()
        if self._dashboards is not None:
            self._dashboards.close()
            self._dashboards = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for handler in self._handlers:
            self._log.removeHandler(handler)
            handler.close()
        self._handlers.clear()
