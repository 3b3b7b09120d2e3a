"""pytest plugin: fail a test that runs longer than ``--per-test-timeout`` seconds, and go on; on SIGTERM
stop like on Ctrl-C, so that the summary and the ``--junitxml`` report are still written.

The GPU machine has no pytest-timeout; gpu-check loads this with ``-p pytest_per_test_timeout`` (and
``-p no:timeout``: where pytest-timeout is installed its SIGALRM timer would clash with this one)
(``benchmarks/`` on ``PYTHONPATH``). A SIGALRM timer covers the test's call phase; its handler fails the
test from the main thread (a call stuck inside a CUDA or compiler call fails when that call returns; the
whole part's deadline still bounds it). POSIX only, like the machine it serves.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt("SIGTERM (the part's time limit)")


def pytest_configure(config: pytest.Config) -> None:
    # gpu-check ends a part past its bound with SIGTERM: pytest then reports what ran (and writes the
    # junit file) instead of dying silently.
    signal.signal(signal.SIGTERM, _interrupt)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--per-test-timeout", type=float, default=0.0,
                     help="seconds a test's call phase may run (0: no limit)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    limit = float(item.config.getoption("per_test_timeout"))
    if limit <= 0:
        yield
        return

    def on_alarm(_signum: int, _frame: Any) -> None:
        pytest.fail(f"{item.nodeid}: over the per-test timeout of {limit:g} s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
