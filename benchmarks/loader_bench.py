"""Training-loader benchmark: images/s of ``fastdist.data.build_loader`` (DALI vs torch) on full-resolution
synthetic Cityscapes PNGs, for several CPU thread / worker counts.

Per (backend, threads): images/s over the timed batches in steady state (after a warm-up that drains
the initial prefetch burst; on CUDA each batch is synchronised before it counts as delivered) and the CPU
cores used (CPU seconds of this process and all its descendants, from /proc, over the wall time).

* decode share. torch backend: single-core PIL decode time of an image + label pair over the CPU time the
  loader spends per image. DALI: the loader's images/s over the images/s of a DALI pipeline that only reads
  and decodes the same PNGs with the same thread count (``mixed`` decoders on a GPU).
* GPU augmentation share (CUDA, ``--with-step``): device time of the loader's own kernels per batch over
  that time plus the measured KD step time. torch.profiler records all CUDA kernels of the process
  (memcpy/memset excluded) over the whole life of a loader that produces ``--profile-batches`` batches
  while nothing else runs, from its construction to its last batch, and the total is divided by the
  batches produced: no batch that DALI prefetches falls outside the window.
* data wait (``--with-step``): the KD training step of train_bench.py fed by the loader: time blocked in
  ``next(loader)`` over the iteration time (synchronised each step), at the recipe's batch. The step is
  ``--step-config``, by default the one train.py runs on CUDA: ``+compile`` (bf16 autocast, channels-last,
  the fused Triton loss, torch.compile); on a CPU or with ``--quick``, ``+fused_loss`` (eager; compiling
  on a CPU is slow and the target applies to CUDA only). The target is checked only with ``+compile``.
  The step is built (and compiled) only while the time budget lasts; run after train_bench.py on the same
  machine, its compile can reuse Inductor's on-disk FX-graph and AOTAutograd caches (on by default) filled
  by train_bench's batch-2 ``+compile`` row: same models, batch, crop and memory format.

A backend that cannot be imported (e.g. no DALI) is written as "not available: <reason>".
Writes ``loader.json`` after every row (``config.complete`` is true once the run reaches its end).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import train_bench
from env import ROOT
from output import NOT_MEASURED, write_json
from runargs import Budget, add_run_args, error_status, run_context
from timing import synchronize

BACKENDS = ["dali", "torch"]
# The train_bench configuration train.py runs on CUDA (fastdist.engine.runtime.resolve_runtime: bf16 autocast,
# channels-last, compile on CUDA; the fused Triton loss): the data-wait target is defined with it.
TRAINING_STEP = "+compile"


# --------------------------------------------------------------------------------------------------
# CPU accounting
# --------------------------------------------------------------------------------------------------
def process_tree_cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of ``pid`` (default: this process) and all its live descendants."""
    pid = os.getpid() if pid is None else pid
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the ")": state ppid ... utime (14th field overall) stime (15th)
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    total, stack = 0.0, [pid]
    while stack:
        p = stack.pop()
        total += cpu.get(p, 0.0)
        stack += children.get(p, [])
    return total


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def ensure_dataset(args: argparse.Namespace) -> Path:
    """``--root`` when given, else a synthetic Cityscapes tree generated (once) under ``--data-dir``."""
    if args.root:
        return Path(args.root)
    h, w = args.image_size
    root = Path(args.data_dir) / f"synthetic-{args.num_images}-{h}x{w}"
    if not (root / "train.lst").exists():
        cmd = [sys.executable, "-m", "fastdist.data.synthetic", str(root), "--train", str(args.num_images),
               "--val", "0", "--size", str(h), str(w), "--workers", str(min(8, os.cpu_count() or 1))]
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path}
        print(f"[loader_bench] generating {args.num_images} synthetic images {h}x{w} in {root}", flush=True)
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return root


def backend_available(backend: str) -> str | None:
    """None when the backend can be used, else the reason it cannot."""
    if backend == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"not available: {type(exc).__name__}: {exc}"
    return None


def make_loader(root: Path, backend: str, threads: int, iterations: int, args: argparse.Namespace,
                device: str) -> Any:
    from fastdist.data import build_loader

    return build_loader(root, "train", args.batch, crop_size=tuple(args.crop), backend=backend, device=device,
                        num_threads=threads, max_iterations=iterations, seed=0)


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------
def window(args: argparse.Namespace, threads: int) -> tuple[int, int]:
    """(warm-up, timed) batch counts. All workers start together and the torch DataLoader keeps up to
    4 batches per worker in flight, so the warm-up drains that initial burst (4 x threads + 2 batches)
    and the timed window spans at least 5 batches per worker; otherwise batches prepared before the
    window would be counted in it."""
    return args.warmup + 4 * threads + 2, max(args.batches, 5 * threads)


def throughput(root: Path, backend: str, threads: int, args: argparse.Namespace,
               device: str) -> dict[str, Any]:
    """images/s and CPU cores used of one loader configuration, in steady state."""
    warmup, batches = window(args, threads)
    loader = make_loader(root, backend, threads, warmup + batches, args, device)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    synchronize(device)
    cpu0, t0 = process_tree_cpu_s(), time.perf_counter()
    for _ in range(batches):
        images, _labels = next(it)
        synchronize(device)
    wall = time.perf_counter() - t0
    cpu = process_tree_cpu_s() - cpu0
    n_images = batches * args.batch
    shape = list(images.shape)
    del it, loader, images, _labels
    gc.collect()
    return {"status": "ok", "images_per_s": n_images / wall, "wall_s": wall, "images": n_images,
            "cpu_cores_used": cpu / wall, "cpu_ms_per_image": cpu * 1e3 / n_images, "batch_shape": shape}


def decode_ms_per_image(root: Path, count: int) -> float:
    """Single-core wall time (ms) to decode one image + label pair with the torch backend's PIL readers."""
    from fastdist.data import list_pairs
    from fastdist.data.torch_loader import read_image_bgr, read_train_ids

    pairs = list_pairs(root, "train")[:count]
    t0 = time.perf_counter()
    for pair in pairs:
        read_image_bgr(pair.image)
        read_train_ids(pair.label)
    return (time.perf_counter() - t0) * 1e3 / len(pairs)


def dali_decode_images_per_s(root: Path, threads: int, args: argparse.Namespace, device: str) -> float:
    """images/s of a DALI pipeline that only reads and decodes the image + label PNGs (same threads)."""
    import torch
    from nvidia.dali import fn, pipeline_def, types

    from fastdist.data import list_pairs

    pairs = list_pairs(root, "train")
    gpu = device.startswith("cuda")
    device_id = torch.cuda.current_device() if gpu else None  # env.resolve_device set it
    decoder = "mixed" if gpu else "cpu"

    @pipeline_def(batch_size=args.batch, num_threads=threads, device_id=device_id, seed=0)
    def decode_only() -> Any:
        image, _ = fn.readers.file(files=[p.image for p in pairs], name="images")
        label, _ = fn.readers.file(files=[p.label for p in pairs])
        return (fn.decoders.image(image, device=decoder, output_type=types.BGR),
                fn.decoders.image(label, device=decoder, output_type=types.GRAY))

    pipe = decode_only()
    pipe.build()
    for _ in range(args.warmup):
        pipe.run()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        outputs = pipe.run()
        if gpu:
            outputs[0].as_cpu()  # waits for the decoded batch
    rate = args.batches * args.batch / (time.perf_counter() - t0)
    del pipe
    return rate


def add_decode_share(row: dict[str, Any], root: Path, args: argparse.Namespace, device: str,
                     pil_decode_ms: float, budget: Budget) -> None:
    """torch: PIL decode CPU time over the loader's CPU time per image. DALI: images/s of the full loader
    over images/s of a decode-only DALI pipeline with the same threads (the decode's share of the time;
    run only while the time budget lasts)."""
    if row["backend"] == "torch":
        row["decode_share"] = pil_decode_ms / row["cpu_ms_per_image"]
        row["decode_share_method"] = "PIL decode CPU ms / loader CPU ms per image"
        return
    spent = budget.skip_reason()
    if spent:
        row["decode_share_status"] = spent
        return
    try:
        rate = dali_decode_images_per_s(root, row["threads"], args, device)
    except Exception as exc:  # noqa: BLE001 - the throughput row stays valid
        traceback.print_exc()
        row["decode_share_status"] = error_status(exc)
        return
    row.update(decode_only_images_per_s=rate, decode_share=row["images_per_s"] / rate,
               decode_share_method="loader images/s / decode-only DALI pipeline images/s")


def loader_gpu_ms_per_batch(root: Path, backend: str, threads: int, args: argparse.Namespace,
                            device: str) -> tuple[float, int]:
    """Device time (ms) of the CUDA kernels the loader launches per batch (memcpy/memset excluded), and the
    number of batches it is averaged over: everything from the construction of a loader of
    ``--profile-batches`` batches to its last batch, divided by the batches it produced (so the batches
    DALI prefetches are inside the window; one-off start-up kernels are spread over those batches)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    produced = 0
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for _batch in make_loader(root, backend, threads, args.profile_batches, args, device):
            produced += 1
        synchronize(device)
    total_us = sum(e.self_device_time_total for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.lower().startswith(("memcpy", "memset")))
    return total_us / 1e3 / max(produced, 1), produced


def data_wait(root: Path, backend: str, threads: int, args: argparse.Namespace, device: str,
              step: Callable[[Any, Any], Any]) -> dict[str, Any]:
    """KD steps fed by the loader: fraction of the iteration time spent waiting for data."""
    warmup, steps = window(args, threads)[0], args.step_iters  # warm-up past the prefetched batches
    loader = make_loader(root, backend, threads, warmup + steps, args, device)
    it = iter(loader)
    for _ in range(warmup):
        step(*next(it))
    synchronize(device)
    waited, t_start = 0.0, time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        images, labels = next(it)
        waited += time.perf_counter() - t0
        step(images, labels)
        synchronize(device)
    total = time.perf_counter() - t_start
    del it, loader
    return {"data_wait_frac": waited / total, "iter_ms": total * 1e3 / steps,
            "data_wait_ms": waited * 1e3 / steps}


def default_step_config(is_cuda: bool, quick: bool) -> str:
    """The KD step of the data-wait run: the one train.py runs on CUDA (:data:`TRAINING_STEP`); eager
    ``+fused_loss`` on a CPU or with ``--quick`` (compiling on a CPU is slow; the target is CUDA-only)."""
    return TRAINING_STEP if is_cuda and not quick else "+fused_loss"


def build_step(args: argparse.Namespace, device: str) -> tuple[Callable[[Any, Any], Any], float]:
    """The KD training step of train_bench.py (configuration ``--step-config``) and its time on fixed data
    (the first, compiling, step is part of the warm-up)."""
    targs = train_bench.parse_args(["--device", device] + (["--quick"] if args.quick else []))
    configs = {c.name: c for c in train_bench.ablation("triton" if device.startswith("cuda") else "torch")}
    cfg = configs[args.step_config]
    train_bench.configure_backends(device)
    teacher, student = train_bench.build_models(targs, device)
    step = train_bench.make_step(teacher, student, cfg, device, targs.lr)
    images, labels = train_bench.make_batch(args.batch, tuple(args.crop), targs.num_classes, device,
                                            cfg.channels_last)
    timing, _ = train_bench.time_steps(step, images, labels, device, warmup=targs.warmup, steps=targs.steps)
    return step, timing.median_ms


def throughput_rows(root: Path, args: argparse.Namespace, device: str,
                    budget: Budget) -> Iterator[dict[str, Any]]:
    """One row per (backend, threads): steady-state images/s and CPU cores used, or why not measured."""
    for backend in args.backends:
        reason = backend_available(backend)
        for threads in args.threads:
            row: dict[str, Any] = {"backend": backend, "threads": threads, "batch": args.batch}
            status = reason or budget.skip_reason()
            if status:
                yield {**row, "status": status}
                continue
            print(f"[loader_bench] {backend} threads={threads}", flush=True)
            try:
                row.update(throughput(root, backend, threads, args, device))
            except Exception as exc:  # noqa: BLE001 - report, do not crash the whole benchmark
                traceback.print_exc()
                row["status"] = error_status(exc)
            yield row


def step_rows(root: Path, args: argparse.Namespace, device: str,
              budget: Budget) -> Iterator[dict[str, Any]]:
    """Data wait and GPU augmentation share per backend, with the KD step fed by the loader. The step is
    built (and, for ``+compile``, compiled) only while the time budget lasts."""
    base = {"threads": args.step_threads, "batch": args.batch, "step_config": args.step_config}
    spent = budget.skip_reason()
    if spent:
        yield from ({"backend": backend, **base, "status": spent} for backend in args.backends)
        return
    try:
        step, step_ms = build_step(args, device)
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        yield {**base, "status": error_status(exc)}
        return
    for backend in args.backends:
        row: dict[str, Any] = {"backend": backend, **base, "step_ms_fixed_data": step_ms}
        reason = backend_available(backend) or budget.skip_reason()
        if reason:
            yield {**row, "status": reason}
            continue
        print(f"[loader_bench] data wait: {backend} threads={args.step_threads}", flush=True)
        try:
            row.update(status="ok", **data_wait(root, backend, args.step_threads, args, device, step))
            if device.startswith("cuda"):
                gpu_ms, batches = loader_gpu_ms_per_batch(root, backend, args.step_threads, args, device)
                row.update(loader_gpu_ms_per_batch=gpu_ms, gpu_share_batches=batches,
                           gpu_aug_share=gpu_ms / (gpu_ms + step_ms))
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            row["status"] = error_status(exc)
        yield row


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(
        p, "smoke run: 8 images of 128x256, crop 64x128 (with --with-step: train_bench --quick)"
    )
    p.add_argument("--root", default=None, help="an existing Cityscapes tree (default: synthetic)")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "fastdist-loader-bench"),
                   help="where the synthetic set is generated (reused when present)")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--image-size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    p.add_argument("--crop", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=2, help="per-GPU batch (the recipe's is 2)")
    p.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    p.add_argument("--threads", type=int, nargs="+", default=[2, 4, 8],
                   help="DALI CPU threads / torch DataLoader workers")
    p.add_argument("--warmup", type=int, default=3, help="warm-up batches")
    p.add_argument("--batches", type=int, default=30, help="timed batches")
    p.add_argument("--with-step", action="store_true", help="also data wait and GPU augmentation share")
    p.add_argument("--step-config", default=None, choices=train_bench.CONFIG_ORDER,
                   help=f"train_bench configuration of the KD step (default: {TRAINING_STEP} on CUDA, "
                   "+fused_loss on a CPU or with --quick)")
    p.add_argument("--step-threads", type=int, default=8, help="threads for the data-wait / GPU-share runs")
    p.add_argument("--step-iters", type=int, default=20)
    p.add_argument("--profile-batches", type=int, default=24,
                   help="batches of the loader profiled for the GPU augmentation share")
    args = p.parse_args(argv)
    if args.quick:
        args.num_images, args.image_size, args.crop = 8, [128, 256], [64, 128]
        args.threads, args.warmup, args.batches, args.step_iters = [1, 2], 1, 4, 3
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the JSON document (also written to disk after every row, so that a
    killed run keeps what it measured)."""
    device, env, _, out_dir, budget = run_context(args)
    args.step_config = args.step_config or default_step_config(env["is_cuda"], args.quick)
    t_start = time.perf_counter()
    root = ensure_dataset(args)
    parts: dict[str, Any] = {"decode": NOT_MEASURED, "results": [], "step": []}

    def save(complete: bool) -> dict[str, Any]:
        return write_results(parts, env, args, root, out_dir, time.perf_counter() - t_start, complete)

    for row in throughput_rows(root, args, device, budget):
        parts["results"].append(row)
        save(complete=False)
    pil_ms = decode_ms_per_image(root, min(8, args.num_images))
    parts["decode"] = {"status": "ok", "decode_ms_per_image": pil_ms,
                       "method": "PIL, one core, image + label"}
    for row in parts["results"]:
        if row.get("status") == "ok":
            add_decode_share(row, root, args, device, pil_ms, budget)
    save(complete=False)
    for row in step_rows(root, args, device, budget) if args.with_step else ():
        parts["step"].append(row)
        save(complete=False)
    doc = save(complete=True)
    print(f"[loader_bench] wrote {out_dir}/loader.json in {doc['config']['wall_s']:.1f}s")
    return doc


def write_results(parts: dict[str, Any], env: dict[str, Any], args: argparse.Namespace, root: Path,
                  out_dir: Path, wall_s: float, complete: bool) -> dict[str, Any]:
    """Write loader.json from the rows measured so far (``complete``: the run reached its end)."""
    doc = {
        "benchmark": "loader",
        "env": env,
        "config": {"quick": args.quick, "image_size": args.image_size, "crop": args.crop, "batch": args.batch,
                   "num_images": args.num_images, "warmup": args.warmup, "batches": args.batches,
                   "dataset": str(root), "with_step": args.with_step, "step_config": args.step_config,
                   "step_threads": args.step_threads,
                   "profile_batches": args.profile_batches, "cpu_cores_available": env["cpu_affinity"],
                   "complete": complete, "wall_s": wall_s},
        "decode": parts["decode"],
        "results": parts["results"],
        "step": parts["step"] or NOT_MEASURED,
    }
    write_json(out_dir / "loader.json", doc)
    return doc


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
