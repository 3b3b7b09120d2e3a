"""Steady-state DIST knowledge-distillation training step: an ablation from the reference configuration.

One step is the training engine's: teacher forward (no grad) + student forward + the engine's
``DistillationLoss`` (cross-entropy on logits upsampled to the label size + 0.4 x auxiliary CE, DIST with
beta = gamma = tau = 1 on the 1/8-resolution main logits + 0.4 x DIST on the auxiliary logits) + backward +
SGD step (momentum 0.9, weight decay 5e-4; fused on CUDA). Every row uses the engine's backend settings
(TF32, cuDNN benchmark), so that only the listed optimisation changes between rows. Images and labels are
generated once and stay on the device, so the loader is not measured here (see loader_bench.py).

Configurations, each adding one optimisation to the previous one:
  reference      fp32, NCHW, eager, reference loss (the published formula)
  +amp           bf16 autocast
  +channels_last models and images in channels-last
  +fused_loss    fastdist's fused loss (Triton on CUDA; the torch backend on CPU)
  +compile       torch.compile of the teacher and the student (as ``train.py --compile`` does)
  +teacher_graph +compile with the frozen teacher compiled as ``mode="reduce-overhead"`` (its forward
                 replayed as a CUDA graph; CUDA only)
Run order (see ``plan``): the eager ablation at the recipe's per-GPU batch (2 x 512 x 1024), then +compile
and +teacher_graph at that batch, then the reference, the best eager and the compiled configurations at
the larger batches, so that a time budget cuts the larger batches first. The model FLOPs are counted once,
at the first batch, and scaled linearly with the batch (a convolutional step's FLOPs are linear in it).
Several GPUs (not measured here: one GPU): ``multi_gpu`` in the output names the strategy torch supports
for compiling under DDP (``torch._dynamo.config.optimize_ddp``).
Reported per row: step time (median, p20, p80), images/s, where the step time goes (``phases``, below),
speed-up against the reference configuration at the same batch, peak memory (CUDA), the model FLOPs of one
step (counted by ``torch.utils.flop_counter.FlopCounterMode`` on a real step) and the achieved fraction of
the device's dense BF16 tensor-core peak.

Where the step time goes (``phases`` of each row; one line per row in the log). The step is cut into
PHASES: teacher_fwd (with zero_grad), student_fwd, loss_fwd (CE + KD terms), backward, optimizer.
  gpu_ms        CUDA events at the phase boundaries of the timed steps: the device timeline of each phase
                (kernels *and* idle gaps: in a host-bound step a phase lasts as long as its launches take)
  host_ms       host wall clock of each phase in those steps (no sync in between; a host far ahead of the
                device blocks in a launch once the launch queue is full, so a device-bound step shows
                that wait here too)
  profiled_*    one extra step under ``torch.profiler`` after a synchronize, so the host starts with an
                empty queue: profiled_host_ms per phase (the profiler adds a little per op) and
                profiled_busy_ms, the summed duration of the device kernels and copies each phase
                launched (a kernel belongs to the phase in which the host launched it, whatever thread).
Row totals: host_ms_per_step (sum of host_ms), gpu_busy_ms_per_step (sum of profiled_busy_ms; CUDA only)
and gpu_idle_frac = 1 - busy / step time: near 0 the step is device-bound, large it is host-bound
(launch overhead) or waits on a host synchronisation. ``aten_ops`` / ``kernels`` count the profiled
step's top-level ATen ops and device kernels per phase, and ``syncs`` the ATen ops that wait for the
device (``aten::_local_scalar_dense``, ``aten::item``, ``aten::nonzero``, ``aten::is_nonzero``).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from env import DevicePeak
from output import NOT_MEASURED, write_json
from runargs import add_run_args, error_status, run_context
from timing import Timing, summarize, synchronize

PHASES = ("teacher_fwd", "student_fwd", "loss_fwd", "backward", "optimizer")
SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero")
CONFIG_ORDER = ["reference", "+amp", "+channels_last", "+fused_loss", "+compile", "+teacher_graph"]
COMPILED = ("+compile", "+teacher_graph")
IGNORE_INDEX = 255


@dataclass(frozen=True)
class StepConfig:
    name: str
    amp: bool = False
    channels_last: bool = False
    loss_backend: str = "reference"
    compile: bool = False
    teacher_graph: bool = False


def ablation(fused_backend: str) -> list[StepConfig]:
    """The cumulative ablation, reference first."""
    ref = StepConfig("reference")
    amp = replace(ref, name="+amp", amp=True)
    cl = replace(amp, name="+channels_last", channels_last=True)
    fused = replace(cl, name="+fused_loss", loss_backend=fused_backend)
    comp = replace(fused, name="+compile", compile=True)
    graph = replace(comp, name="+teacher_graph", teacher_graph=True)
    return [ref, amp, cl, fused, comp, graph]


# --------------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------------
def build_models(args: argparse.Namespace, device: str) -> tuple[Any, Any]:
    """Teacher (frozen, eval) and student (train) with the models' default heads (aux on ResNets)."""
    from fastdist.models import build_model

    teacher = build_model(args.teacher_model, args.teacher_backbone, num_classes=args.num_classes)
    student = build_model(args.student_model, args.student_backbone, num_classes=args.num_classes)
    teacher.to(device).eval().requires_grad_(False)
    student.to(device).train()
    return teacher, student


def configure_backends(device: str) -> dict[str, Any]:
    """The training engine's backend settings (TF32, cuDNN benchmark), the same for every row."""
    import torch

    from fastdist.engine.trainer import configure_backends as engine_configure

    engine_configure(torch.device(device))
    cudnn = torch.backends.cudnn
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_allow_tf32": cudnn.allow_tf32, "cudnn_benchmark": cudnn.benchmark}


Mark = Callable[[str], None]


def _no_mark(_phase: str) -> None:
    """The default phase marker: nothing."""


def make_step(teacher: Any, student: Any, cfg: StepConfig, device: str,
              lr: float) -> Callable[..., Any]:
    """One training step as the engine runs it (``fastdist.engine``'s DistillationLoss: CE + 0.4 aux CE,
    DIST on the main and aux logits), with the models in ``cfg``'s memory format and compiled on request.

    ``step(images, labels, mark)`` calls ``mark(phase)`` at the end of each of PHASES (``mark("start")``
    first), in the host order of the work."""
    import torch

    from fastdist.engine.kd import DistillationLoss

    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    teacher.to(memory_format=fmt)
    student.to(memory_format=fmt)
    t_net = torch.compile(teacher, mode="reduce-overhead" if cfg.teacher_graph else None) if cfg.compile \
        else teacher
    s_net = torch.compile(student) if cfg.compile else student
    criterion = DistillationLoss(backend=cfg.loss_backend)
    cuda = device.startswith("cuda")
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, fused=cuda or None)
    device_type = "cuda" if cuda else "cpu"

    def step(images: Any, labels: Any, mark: Mark = _no_mark) -> Any:
        mark("start")
        opt.zero_grad(set_to_none=True)
        if cfg.teacher_graph:  # a new step: the graph's output buffers of the last step may be reused
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.amp):
            with torch.no_grad():
                t_out = t_net(images)
            mark("teacher_fwd")
            out = s_net(images)
            mark("student_fwd")
            task, kd = criterion(out, t_out, labels, images)
            loss = task + kd
        mark("loss_fwd")
        loss.backward()
        mark("backward")
        opt.step()
        mark("optimizer")
        return loss

    return step


def make_batch(batch: int, size: tuple[int, int], num_classes: int, device: str, channels_last: bool,
               seed: int = 0) -> tuple[Any, Any]:
    """Random normalised images and labels (10% ignore pixels), already on the device."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, *size, generator=gen).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch, *size), generator=gen)
    labels[torch.rand(batch, *size, generator=gen) < 0.1] = IGNORE_INDEX
    return images, labels.to(device)


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------
class PhaseClock:
    """Per-step phase boundaries: host ``perf_counter`` and (CUDA) an event recorded at each mark."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.steps: list[list[tuple[str, float, Any]]] = []

    def new_step(self) -> Mark:
        import torch

        marks: list[tuple[str, float, Any]] = []
        self.steps.append(marks)

        def mark(phase: str) -> None:
            event = None
            if self.cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
            marks.append((phase, time.perf_counter(), event))

        return mark

    def step_ms(self) -> list[float]:
        """Each step's time, first mark to last: device timeline on CUDA, host wall clock elsewhere
        (call after a synchronize)."""
        if self.cuda:
            return [m[0][2].elapsed_time(m[-1][2]) for m in self.steps]
        return [(m[-1][1] - m[0][1]) * 1e3 for m in self.steps]

    def phases(self) -> dict[str, dict[str, float | None]]:
        """Median host_ms and (CUDA) gpu_ms of each phase over the steps."""
        out: dict[str, dict[str, float | None]] = {}
        for i, phase in enumerate(PHASES, start=1):
            host = [(m[i][1] - m[i - 1][1]) * 1e3 for m in self.steps]
            gpu = [m[i - 1][2].elapsed_time(m[i][2]) for m in self.steps] if self.cuda else None
            out[phase] = {"host_ms": statistics.median(host),
                          "gpu_ms": statistics.median(gpu) if gpu else None}
        return out


def time_steps(step: Callable[..., Any], images: Any, labels: Any, device: str, warmup: int,
               steps: int) -> tuple[Timing, float, dict[str, dict[str, float | None]]]:
    """Per-step times after ``warmup`` steps; returns (timing, seconds of the first step, per-phase
    medians of the timed steps: host_ms and, on CUDA, gpu_ms)."""
    t0 = time.perf_counter()
    step(images, labels)
    synchronize(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step(images, labels)
    synchronize(device)
    clock = PhaseClock(device.startswith("cuda"))
    for _ in range(steps):
        step(images, labels, clock.new_step())
    synchronize(device)
    return summarize(clock.step_ms()), first, clock.phases()


def _phase_of(start_us: float, bounds: list[tuple[float, str]]) -> str | None:
    """The phase whose host interval holds ``start_us`` (bounds: (end time, phase) in host order)."""
    begin = bounds[0][0]
    for end, phase in bounds[1:]:
        if begin <= start_us < end:
            return phase
        begin = end
    return None


def profile_step(step: Callable[..., Any], images: Any, labels: Any, device: str) -> dict[str, Any]:
    """One step under ``torch.profiler`` after a synchronize: per phase the host ms, the device busy ms
    (kernels, copies, memsets it launched), top-level ATen ops, kernels, and the syncing ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.startswith("cuda")

    def mark(phase: str) -> None:
        with record_function(f"phase::{phase}"):
            pass

    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step(images, labels, mark)
        synchronize(device)
    events = list(prof.events())
    bounds = sorted((e.time_range.start, e.name.removeprefix("phase::")) for e in events
                    if e.name.startswith("phase::"))
    per: dict[str, dict[str, Any]] = {p: {"profiled_host_ms": None, "profiled_busy_ms": 0.0 if cuda else None,
                                          "aten_ops": 0, "kernels": 0, "syncs": 0} for p in PHASES}
    for (start, _), (end, phase) in zip(bounds, bounds[1:], strict=False):
        if phase in per:
            per[phase]["profiled_host_ms"] = (end - start) / 1e3
    for e in events:
        if e.device_type != DeviceType.CPU or e.name.startswith("phase::"):
            continue
        phase = _phase_of(e.time_range.start, bounds)
        if phase not in per:
            continue
        top = e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")
        if e.name.startswith("aten::") and top:
            per[phase]["aten_ops"] += 1
        if e.name in SYNC_OPS:
            per[phase]["syncs"] += 1
        for kernel in getattr(e, "kernels", []):
            per[phase]["kernels"] += 1
            per[phase]["profiled_busy_ms"] += kernel.duration / 1e3
    return per


def count_flops(teacher: Any, student: Any, args: argparse.Namespace, batch: int, device: str) -> int:
    """Model FLOPs of one eager fp32 step at ``batch`` (FlopCounterMode over a real step)."""
    from torch.utils.flop_counter import FlopCounterMode

    step = make_step(teacher, student, StepConfig("flops"), device, args.lr)
    images, labels = make_batch(batch, tuple(args.size), args.num_classes, device, channels_last=False)
    with FlopCounterMode(display=False) as counter:
        step(images, labels)
    synchronize(device)
    return int(counter.get_total_flops())


def measure(teacher: Any, student: Any, cfg: StepConfig, batch: int, args: argparse.Namespace, device: str,
            flops: int | None, peak: DevicePeak | None) -> dict[str, Any]:
    """One row: time ``cfg`` at ``batch``."""
    import torch

    row: dict[str, Any] = {"config": cfg.name, "batch": batch, "size": list(args.size), **asdict(cfg)}
    row.pop("name")
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(teacher, student, cfg, device, args.lr)
    images, labels = make_batch(batch, tuple(args.size), args.num_classes, device, cfg.channels_last)
    timing, first, phases = time_steps(step, images, labels, device, args.warmup, args.steps)
    profiled = profile_step(step, images, labels, device) if args.profile else {}
    for phase, values in profiled.items():
        phases[phase].update(values)
    step_s = timing.median_ms / 1e3
    cuda = device.startswith("cuda")
    busy = sum(v["profiled_busy_ms"] for v in profiled.values()) if cuda and profiled else None
    row.update(status="ok", step_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
               steps=timing.reps, first_step_s=first, images_per_s=batch / step_s,
               peak_mem_bytes=int(torch.cuda.max_memory_allocated(device)) if cuda else None,
               flops_per_step=flops, achieved_tflops=flops / step_s / 1e12 if flops else None,
               frac_peak_bf16=flops / step_s / peak.bf16_flops if flops and peak else None,
               host_ms_per_step=sum(v["host_ms"] for v in phases.values()), gpu_busy_ms_per_step=busy,
               gpu_idle_frac=1 - busy / timing.median_ms if busy is not None else None, phases=phases)
    print(f"[train_bench]   {phase_line(row)}", flush=True)
    return row


def phase_line(row: dict[str, Any]) -> str:
    """One log line: step, host and busy ms per step, then per phase host/gpu/busy ms, ops and syncs."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    parts = [f"step {ms(row['step_ms'])} ms, host {ms(row['host_ms_per_step'])} ms, "
             f"device busy {ms(row['gpu_busy_ms_per_step'])} ms"]
    for phase, v in row["phases"].items():
        times = f"{ms(v['host_ms'])}/{ms(v['gpu_ms'])}/{ms(v.get('profiled_busy_ms'))}"
        counts = f"ops {v.get('aten_ops', '-')} kernels {v.get('kernels', '-')} syncs {v.get('syncs', '-')}"
        parts.append(f"{phase} host/gpu/busy {times} {counts}")
    return " | ".join(parts)


def plan(args: argparse.Namespace, fused_backend: str) -> list[tuple[StepConfig, int]]:
    """(config, batch) pairs in run order: the whole ablation at the first batch (the recipe's: the row of
    the KD-step target is +compile there), eager rows first; then, per larger batch, the reference, the best
    eager and the compiled configurations. Under a time budget the larger batches are cut first."""
    configs = [c for c in ablation(fused_backend) if c.name in args.configs]
    eager = [c for c in configs if not c.compile]
    ends = list(dict.fromkeys([eager[0], eager[-1]])) if eager else []
    compiled = [c for c in configs if c.compile]
    pairs = [(c, args.batches[0]) for c in eager + compiled]
    pairs += [(c, b) for b in args.batches[1:] for c in ends + compiled]
    return pairs


def skip_reason(cfg: StepConfig, device: str) -> str | None:
    """Why a configuration cannot run on this device, or None."""
    if cfg.teacher_graph and not device.startswith("cuda"):
        return "skipped: CUDA graphs need a GPU"
    return None


def multi_gpu() -> dict[str, Any]:
    """How torch.compile meets DDP on several GPUs in this torch (one GPU is measured here)."""
    import torch

    mode = getattr(torch._dynamo.config, "optimize_ddp", None)
    strategy = ("torch.compile outside DDP: Dynamo's DDPOptimizer splits the graph at DDP's bucket "
                "boundaries, so each bucket's all-reduce overlaps the compiled backward of the rest")
    if mode in ("python_reducer", "python_reducer_without_compiled_forward"):
        strategy = "DDP's compiled-autograd path (compiled autograd traces the reducer)"
    elif mode in (False, "no_optimization"):
        strategy = "no DDP graph split: one compiled backward, all-reduce after it (no overlap)"
    return {"optimize_ddp": str(mode), "strategy": strategy, "measured": NOT_MEASURED}


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Speed-up of each row over the reference configuration at the same batch."""
    ref = {r["batch"]: r for r in rows if r["config"] == "reference" and r.get("status") == "ok"}
    for r in rows:
        base = ref.get(r["batch"])
        if r.get("status") == "ok" and base:
            r["speedup_vs_reference"] = r["images_per_s"] / base["images_per_s"]


def release(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(p, "smoke run: 16x32 crops, R18 teacher, 1 warm-up + 2 steps, no torch.compile")
    p.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8], help="first = the ablation's batch")
    p.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    p.add_argument("--configs", nargs="+", default=CONFIG_ORDER, choices=CONFIG_ORDER)
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps (the first compiles)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--teacher-model", default="deeplabv3")
    p.add_argument("--teacher-backbone", default="resnet101")
    p.add_argument("--student-model", default="deeplabv3")
    p.add_argument("--student-backbone", default="resnet18")
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the one profiled step per row (its phase breakdown of device busy time)")
    args = p.parse_args(argv)
    if args.quick:  # a smoke run of the machinery, not a performance figure
        args.size, args.batches, args.warmup, args.steps = [16, 32], args.batches[:1], 1, 2
        args.teacher_backbone = "resnet18"
        args.configs = [c for c in args.configs if c not in COMPILED]
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the JSON document (also written to disk)."""
    device, env, peak, out_dir, budget = run_context(args)
    fused_backend = "triton" if env["is_cuda"] else "torch"
    t_start = time.perf_counter()
    backend_settings = configure_backends(device)
    teacher, student = build_models(args, device)
    flops_first: int | None = None
    rows: list[dict[str, Any]] = []
    for cfg, batch in plan(args, fused_backend):
        label = f"{cfg.name} batch {batch}"
        spent = budget.skip_reason() or skip_reason(cfg, device)
        if spent:
            rows.append({"config": cfg.name, "batch": batch, "status": spent})
            continue
        print(f"[train_bench] {label}", flush=True)
        try:
            if flops_first is None:
                flops_first = count_flops(teacher, student, args, args.batches[0], device)
            flops = flops_first * batch // args.batches[0]
            rows.append(measure(teacher, student, cfg, batch, args, device, flops, peak))
        except Exception as exc:  # noqa: BLE001 - report, do not crash the whole benchmark
            traceback.print_exc()
            rows.append({"config": cfg.name, "batch": batch, "status": error_status(exc)})
        release(device)
        write_results(rows, env, args, out_dir, fused_backend, time.perf_counter() - t_start, final=False,
                      backend_settings=backend_settings)
    skipped = [c for c in CONFIG_ORDER if c not in args.configs]
    rows += [{"config": c, "batch": args.batches[0], "status": "skipped: --quick" if args.quick else
              "skipped: not selected"} for c in skipped]
    doc = write_results(rows, env, args, out_dir, fused_backend, time.perf_counter() - t_start, final=True,
                        backend_settings=backend_settings)
    print(f"[train_bench] wrote {out_dir}/train.json in {doc['config']['wall_s']:.1f}s")
    return doc


def write_results(rows: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace, out_dir: Path,
                  fused_backend: str, wall_s: float, final: bool,
                  backend_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add the speed-ups and write train.json (``backend_settings``: what `configure_backends` set)."""
    add_speedups(rows)
    doc = {
        "benchmark": "train",
        "env": env,
        "config": {"quick": args.quick, "size": args.size, "batches": args.batches, "warmup": args.warmup,
                   "steps": args.steps, "teacher": f"{args.teacher_model}-{args.teacher_backbone}",
                   "student": f"{args.student_model}-{args.student_backbone}", "fused_backend": fused_backend,
                   "flops_counter": "torch.utils.flop_counter.FlopCounterMode",
                   "flops_counted_at_batch": args.batches[0], "multi_gpu": multi_gpu(),
                   "phases": list(PHASES), "profiled_step": args.profile,
                   "backend_settings": backend_settings,
                   "peak_used": "dense BF16 tensor-core peak", "complete": final, "wall_s": wall_s},
        "results": rows,
    }
    write_json(out_dir / "train.json", doc)
    return doc


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
