"""Host-side cost of one loss call on the CPU: ATen ops per call and Python microseconds (CPU profile).

Runs under ``TRITON_INTERPRET=1`` with every Triton launch replaced by a no-op *in this script only*,
so what is timed is fastdist's own Python, the torch ops it issues (on tiny (2, C, 4, 6) logits, so
their arithmetic is negligible) and the autograd machinery, never the interpreter's emulation of a
kernel. The ATen ops are counted with a ``TorchDispatchMode`` (a ``fastdist::`` custom op is
re-dispatched to its CPU kernel with the mode on, so the ops inside it count too); every op is a
dispatcher call, the unit of host overhead on a GPU (~5-10 us each there, not measured here).

These are CPU numbers of this machine, not GPU numbers: GPU host time adds the CUDA launch path of
each kernel and of each kernel-launching op. ``benchmarks/kernel_bench.py`` measures the GPU host
time ("host ms / call").

    TRITON_INTERPRET=1 python benchmarks/host_overhead.py [--calls 2000] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("host_overhead.py needs TRITON_INTERPRET=1 set before triton is imported")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fastdist  # noqa: E402

_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


class OpCounter(TorchDispatchMode):
    """Every ATen op below autograd, including those inside fastdist's custom ops."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastdist":
            with self:
                return func.redispatch(_CPU, *args, **(kwargs or {}))
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def cases(layout: str) -> dict[str, Callable[[], None]]:
    """One forward+backward of each loss front-end (triton backend) on tiny logits of `layout`."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 19, 4, 6, generator=g), torch.randn(2, 19, 4, 6, generator=g)
    if layout == "nhwc":
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    s.requires_grad_(True)
    mask = torch.ones(2, 4, 6, dtype=torch.bool)
    return {
        "dist fwd+bwd": lambda: fastdist.dist_loss(s, t, backend="triton").backward(),
        "dist fwd+bwd, mask": lambda: fastdist.dist_loss(s, t, backend="triton", mask=mask).backward(),
        "kd fwd+bwd": lambda: fastdist.kd_loss(s, t, backend="triton").backward(),
        "cwd fwd+bwd": lambda: fastdist.cwd_loss(s, t, backend="triton").backward(),
    }


def host_us(fn: Callable[[], None], calls: int, repeats: int = 5) -> float:
    """Best of `repeats` means over `calls` calls (the minimum filters other processes' noise)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--profile", action="store_true", help="cProfile of the first case (nchw)")
    args = p.parse_args()
    InterpretedFunction.run = lambda self, *a, **k: None  # kernels off: host work only
    print(f"torch {torch.__version__}; CPU profile, Triton launches replaced by no-ops")
    print("| case | layout | ATen ops / call | host us / call (CPU) |\n| --- | --- | --- | --- |")
    for layout in ("nchw", "nhwc"):
        for name, fn in cases(layout).items():
            for _ in range(20):  # first calls: imports, caches
                fn()
            counter = OpCounter()
            with counter:
                fn()
            print(f"| {name} | {layout} | {sum(counter.ops.values())} | {host_us(fn, args.calls):.1f} |")
            if layout == "nchw" and name == "dist fwd+bwd":
                detail = ", ".join(f"{op} x{n}" for op, n in counter.ops.most_common())
    print(f"\ndist fwd+bwd (nchw) ATen ops: {detail}")
    if args.profile:
        fn = cases("nchw")["dist fwd+bwd"]
        prof = cProfile.Profile()
        prof.runcall(lambda: [fn() for _ in range(args.calls)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
