"""`make gpu-check`: one bounded call that returns the GPU numbers, the most valuable first.

    python benchmarks/gpu_check.py                 # on the GPU machine (PYTHONPATH=.)
    python benchmarks/gpu_check.py --dry-run       # the same wiring on a CPU, --quick settings, temp folder

A hard deadline (``--deadline``, default 540 s, inside a 600 s command) covers the whole script. The parts
run in order of value per second, each in its own process (session) bounded by
``min(its limit, time left - the report's reserve - the kill grace)``; a part whose bound is under its
minimum is logged as skipped and never started. A part past its bound gets SIGTERM, then SIGKILL
``KILL_GRACE_S`` later; what it wrote stays (every benchmark rewrites its file after every row).

Parts: (1) kernel (``kernel_bench.py``: no torch.compile), (2) the CUDA parity tests (pytest ``-m cuda``,
a per-test timeout, ``--junitxml``, ``FASTDIST_AUTOTUNE=0``), (3) the loss benchmark on the target cases,
(4) the KD step (``train_bench.py``: the batch-2 ablation, +compile, +compile with the teacher in a CUDA
graph, then the larger batches), (5) the torch loader (DALI only where installed; no training step).

Results: ``benchmarks/results/<device>-<date>/`` (``env.json``, ``<part>.log``, the benchmarks' files,
``gpu_check.json`` with every part's outcome, ``gpu_check.log`` with the report). With ``$OUT`` (or
``--out``) set, after every part at most ``MAX_OUT_FILES`` files are copied there: ``results.tar.gz``
(every file of the folder; env.json, loss.csv, loss.png and the parts' logs are only there) and the
most important single files (``OUT_FILES``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEADLINE_S = 540.0
REPORT_RESERVE_S = 20.0
KILL_GRACE_S = 3.0
PER_TEST_TIMEOUT_S = 30.0
MAX_OUT_FILES = 8
MAX_OUT_BYTES = 16 * 2**20
PACK = "results.tar.gz"
# Copied to $OUT beside the pack (a fixed set of names, so that repeated copies never exceed the limit).
OUT_FILES = ["gpu_check.log", "kernel.json", "pytest.xml", "loss.json", "train.json", "loader.json",
             "gpu_check.json"][: MAX_OUT_FILES - 1]


@dataclass(frozen=True)
class Ctx:
    """What the parts' command lines depend on."""

    py: str
    device: str
    folder: Path
    dry_run: bool


@dataclass(frozen=True)
class Part:
    """One step: ``argv(ctx, seconds)`` runs it within ``seconds``; under ``min_s`` it is not started."""

    name: str
    limit_s: float
    min_s: float
    argv: Callable[[Ctx, float], list[str]]
    env: tuple[tuple[str, str], ...] = ()
    bench_on_path: bool = False  # benchmarks/ on PYTHONPATH (pytest loads its per-test timeout plugin)


def _bench(script: str, margin_s: float, *extra: str) -> Callable[[Ctx, float], list[str]]:
    """A benchmark's command line: its own budget stops new rows ``margin_s`` before the part's bound."""

    def argv(ctx: Ctx, seconds: float) -> list[str]:
        quick = ["--quick"] if ctx.dry_run else []
        budget = f"{max(seconds - margin_s, 1.0):.0f}"
        return [ctx.py, str(BENCH / script), "--device", ctx.device, "--out", str(ctx.folder), *quick,
                "--time-budget", budget, *extra]

    return argv


def _pytest(ctx: Ctx, _seconds: float) -> list[str]:
    # The dry run collects one small file (its cuda tests skip on a CPU): the wiring, not the suite.
    tests = ["tests/test_metrics.py"] if ctx.dry_run else ["tests", "--ignore=tests/aot"]
    return [ctx.py, "-m", "pytest", *tests, "-m", "cuda", "-q", "-p", "no:cacheprovider", "--tb=short",
            "-p", "no:timeout", "-p", "pytest_per_test_timeout", f"--per-test-timeout={PER_TEST_TIMEOUT_S:g}",
            f"--junitxml={ctx.folder / 'pytest.xml'}", "--continue-on-collection-errors"]


def _loader(ctx: Ctx, seconds: float) -> list[str]:
    data = ["--data-dir", str(ctx.folder.parent / "loader-data")] if ctx.dry_run else []
    return [*_bench("loader_bench.py", 10, "--num-images", "24")(ctx, seconds), *data]


PARTS = [
    Part("kernel", 100, 20, _bench("kernel_bench.py", 10)),
    # Every kernel config computes the same bits (tests/test_loss_determinism.py): the parity tests need
    # not tune 4 configs per new shape.
    Part("pytest", 130, 20, _pytest, (("FASTDIST_AUTOTUNE", "0"),), bench_on_path=True),
    Part("loss", 120, 20, _bench("loss_bench.py", 15, "--shapes", "recipe-b8", "fullres-b2", "recipe-b2",
                                 "--layouts", "nchw", "--warmup-ms", "10", "--rep-ms", "50")),
    # One compiling row may run past the benchmark's budget: a wider margin.
    Part("train", 170, 40, _bench("train_bench.py", 40)),
    Part("loader", 60, 15, _loader),
]


def part_bound(limit_s: float, left_s: float) -> float:
    """Seconds a part may run: its limit, or what is left before the report's reserve and the kill grace."""
    return min(limit_s, left_s - REPORT_RESERVE_S - KILL_GRACE_S)


class Log:
    """``gpu_check.log`` (and stdout) lines, and ``gpu_check.json`` with the parts' outcomes."""

    def __init__(self, folder: Path, deadline_s: float, dry_run: bool) -> None:
        self.folder, self.path = folder, folder / "gpu_check.log"
        self.doc: dict[str, Any] = {"deadline_s": deadline_s, "dry_run": dry_run, "parts": []}

    def line(self, text: str) -> None:
        print(text, flush=True)
        with self.path.open("a") as handle:
            handle.write(text + "\n")

    def outcome(self, **fields: Any) -> None:
        self.doc["parts"].append(fields)
        (self.folder / "gpu_check.json").write_text(json.dumps(self.doc, indent=2) + "\n")


def child_env(extra: tuple[tuple[str, str], ...] = (), bench_on_path: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels only
    paths = [str(ROOT), *([str(BENCH)] if bench_on_path else [])]
    paths += [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
    env.update(PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1", **dict(extra))
    return env


def run_bounded(argv: list[str], seconds: float, log_path: Path, env: dict[str, str]) -> tuple[int, bool]:
    """Run ``argv`` in its own session, output to ``log_path``; past ``seconds`` SIGTERM, then SIGKILL.
    Returns (exit code, timed out)."""
    with log_path.open("a") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=seconds), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return proc.returncode, True


def run_part(part: Part, ctx: Ctx, left_s: float, log: Log) -> bool:
    """Run one part within its bound, or log it as skipped; returns whether it succeeded."""
    bound = part_bound(part.limit_s, left_s)
    if bound < part.min_s:
        status = f"skipped: {max(bound, 0):.0f}s left for it, needs {part.min_s:.0f}s"
        log.line(f"== {part.name}: {status} (not started)")
        log.outcome(name=part.name, status=status, limit_s=part.limit_s, bound_s=bound)
        return True
    argv = part.argv(ctx, bound)
    log.line(f"== {part.name} (bound {bound:.0f}s): {' '.join(argv)}")
    t0 = time.monotonic()
    log_path = ctx.folder / f"{part.name}.log"
    rc, timed_out = run_bounded(argv, bound, log_path, child_env(part.env, part.bench_on_path))
    elapsed = time.monotonic() - t0
    status = "timed out (partial results kept)" if timed_out else "ok" if rc == 0 else f"failed (exit {rc})"
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    log.line("\n".join(f"   | {t}" for t in tail))
    log.line(f"== {part.name}: {status} after {elapsed:.0f}s")
    log.outcome(name=part.name, status=status, rc=rc, limit_s=part.limit_s, bound_s=bound, elapsed_s=elapsed)
    return status == "ok"


def copy_out(folder: Path, out: Path | None, log: Log) -> None:
    """Pack every file of ``folder`` into ``results.tar.gz`` and copy it, with the most important single
    files, to ``out`` (at most ``MAX_OUT_FILES`` files, each at most ``MAX_OUT_BYTES``)."""
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    pack = Path(tempfile.gettempdir()) / f"gpu-check-{os.getpid()}-{PACK}"  # outside the results folder
    with tarfile.open(pack, "w:gz") as tar:
        for f in sorted(p for p in folder.iterdir() if p.is_file()):
            tar.add(f, arcname=f"{folder.name}/{f.name}")
    for src, name in [(pack, PACK), *((folder / n, n) for n in OUT_FILES)]:
        if not src.is_file():
            continue
        if src.stat().st_size > MAX_OUT_BYTES:
            log.line(f"copy-out: {name} is over {MAX_OUT_BYTES >> 20} MiB; not copied (see {PACK})")
            continue
        shutil.copyfile(src, out / name)


def results_folder(ctx_py: str, device: str, base: Path | None) -> Path | None:
    """Create the results folder with ``env.py`` (which checks the device); None when it could not."""
    argv = [ctx_py, str(BENCH / "env.py"), "--device", device, *(["--base", str(base)] if base else [])]
    try:
        proc = subprocess.run(argv, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    sys.stderr.write(proc.stderr)
    lines = proc.stdout.strip().splitlines()
    folder = Path(lines[-1]) if proc.returncode == 0 and lines else None
    return folder if folder is not None and folder.is_dir() else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_deadline = float(os.environ.get("GPU_CHECK_DEADLINE_S", DEADLINE_S))
    p.add_argument("--deadline", type=float, default=default_deadline,
                   help="seconds for the whole script, report included (env GPU_CHECK_DEADLINE_S)")
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
                   help="on the CPU with --quick settings, into a temporary folder (env GPU_CHECK_DRY_RUN=1)")
    p.add_argument("--base", type=Path, default=os.environ.get("RESULTS_BASE") or None,
                   help="parent of the results folder (default benchmarks/results; dry run: a temp folder)")
    p.add_argument("--out", type=Path, default=os.environ.get("OUT") or None,
                   help="folder the results are copied to after every part (default $OUT)")
    p.add_argument("--parts", nargs="+", default=[p.name for p in PARTS], choices=[p.name for p in PARTS])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_end = time.monotonic() + args.deadline
    device = "cpu" if args.dry_run else "cuda"
    base = args.base or (Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.dry_run else None)
    if args.dry_run:
        print("gpu-check: DRY RUN on the CPU (quick settings; not results)", flush=True)
    folder = results_folder(sys.executable, device, base)
    if folder is None:
        print("gpu-check: benchmarks/env.py could not create the results folder (see its message above); "
              "nothing was run", file=sys.stderr)
        return 1
    ctx = Ctx(sys.executable, device, folder, args.dry_run)
    log = Log(folder, args.deadline, args.dry_run)
    log.line(f"gpu-check: results in {folder}; deadline {args.deadline:.0f}s")
    ok = True
    for part in (p for p in PARTS if p.name in args.parts):
        ok = run_part(part, ctx, t_end - time.monotonic(), log) and ok
        copy_out(folder, args.out, log)
    left = t_end - time.monotonic()
    if left > 1:
        log.line(f"== report (python benchmarks/report.py --results {folder} --stdout)")
        rc, _ = run_bounded([sys.executable, str(BENCH / "report.py"), "--results", str(folder), "--stdout"],
                            left - 1, log.path, child_env())
        ok = ok and rc == 0
    else:
        log.line("== report: skipped (deadline reached)")
    log.line(f"gpu-check: done, {'ok' if ok else 'some parts failed or timed out'}; "
             f"{t_end - time.monotonic():.0f}s of the deadline left")
    copy_out(folder, args.out, log)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
