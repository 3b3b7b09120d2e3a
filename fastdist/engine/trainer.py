"""The training step and loop: distil (or train) the student, validate, checkpoint, survive preemption.

Hot path (`Trainer.train_step`): set the poly learning rate (a Python float), forward the frozen teacher
under ``no_grad`` and the student under autocast, task + DIST loss, backward (through a GradScaler for
fp16), fused SGD step, ``zero_grad(set_to_none=True)``. The step never waits for the device (one
exception: torch's SyncBatchNorm, used on several GPUs, syncs in each layer's forward and breaks
``torch.compile`` graphs at every such layer; torch's own code, not ours): losses are summed on the
device and a non-finite loss only sets a device-side flag holding its iteration. The host reads them at
*sync points* (every ``--check-every`` iterations and at every log, validation and checkpoint iteration)
in one small all-gather that also carries each rank's preemption flag and whether its weights, buffers
(BatchNorm running statistics) and optimizer state are all finite (computed on the device at the sync
point, `fastdist.engine.finite`), so all ranks take the same decision at the same iteration.

The loop's timetable is `fastdist.engine.schedule.plan` (check, log, save, validate, export, stop per
iteration). After a sync point: stop on a non-finite loss or state (nothing is saved, validated or
exported: every checkpoint on disk holds finite state) -> log -> save latest (recording what the
iteration still owes: validation, the final export) -> validate (on a new best mIoU: best) -> exports ->
latest again, owing nothing -> stop on a signal or at the run's last iteration. A run resumed from a
checkpoint that owes work does it first.

`Trainer.state_dict` / `load_state_dict` hold everything ``--resume`` restores (iteration, best mIoU
and its iteration, per-rank RNG states, student weights, optimizer, GradScaler, owed work);
`fastdist.engine.checkpoint` only writes and reads that dict.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastdist.data import get_dataset
from fastdist.engine import checkpoint as ckpt
from fastdist.engine.config import NON_FINITE_HINT, OptimConfig, RunConfig, config_dict, validation_precision
from fastdist.engine.distributed import DistEnv
from fastdist.engine.evaluation import evaluate
from fastdist.engine.finite import state_is_finite
from fastdist.engine.flops import log_model_cost
from fastdist.engine.kd import (
    ModelLoadError,
    build_criterion,
    drop_unused_teacher_heads,
    prepare_student,
    prepare_teacher,
)
from fastdist.engine.logger import RunLogger, format_duration
from fastdist.engine.metrics import format_iou_table
from fastdist.engine.runtime import autocast
from fastdist.engine.schedule import StepActions, plan, poly_lr, set_lr
from fastdist.engine.signals import PreemptionHandler
from fastdist.engine.sliding import maybe_sliding
from fastdist.models import CheckpointError, load_checkpoint, to_reference_state_dict

__all__ = ["SyncResult", "Trainer", "build_optimizer", "build_scaler", "configure_backends",
           "seed_everything"]

_APEX_HINT = ("--optimizer apex needs NVIDIA apex with its CUDA extensions (see "
              "https://github.com/NVIDIA/apex#installation); --optimizer sgd uses torch's fused SGD, "
              "the same update rule")


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum over all student parameters (reference: one group, weight decay on all)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "apex":
        try:
            from apex.optimizers import FusedSGD  # type: ignore[import-not-found]
        except ImportError:
            raise RuntimeError(_APEX_HINT) from None
        return FusedSGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    # Fused (one kernel for all parameters; takes GradScaler's scale/inf flags without a host sync).
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          fused=True)
    # Zero momentum buffers up front: the fused first step allocates them with torch.empty_like and a
    # GradScaler-skipped step (inf gradients, common at fp16's first iteration) leaves that memory
    # uninitialised, to be used as momentum from then on. With zeros (and dampening 0) an unskipped
    # first step computes 0.9 * 0 + g = g exactly, the same update.
    if cfg.momentum != 0:
        for p in params:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return opt


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls/convolutions and cuDNN autotuning (fixed crop sizes make benchmark mode pay)."""
    torch.set_float32_matmul_precision("high")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type) if amp == "fp16" else None


@dataclass
class SyncResult:
    """What all ranks agreed on at a sync point."""

    task_loss: float  # mean over ranks and iterations since the last log
    kd_loss: float
    stop_requested: bool  # a rank received SIGTERM/SIGINT
    bad_iteration: int | None  # earliest iteration with a non-finite loss on any rank
    bad_state: bool = False  # a rank's weights, buffers or optimizer state hold NaN/inf


class _Meter:
    """Device-side loss sums and the first non-finite iteration, read only at sync points."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)
        self.bad_iteration = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0

    def update(self, task: Tensor, kd: Tensor, iteration: int) -> None:
        self.sums += torch.stack([task, kd])
        bad = ~torch.isfinite(task + kd)
        self.bad_iteration.masked_fill_(bad & (self.bad_iteration == 0), iteration)
        self.count += 1

    def sync(self, stop_flag: bool, world_size: int, state_ok: Tensor) -> SyncResult:
        """One all-gather of [task_sum, kd_sum, bad_iteration, stop_flag, state_ok] from every rank."""
        flag = torch.full((), float(stop_flag), dtype=torch.float64, device=self.device)
        local = torch.stack([self.sums[0], self.sums[1], self.bad_iteration.double(), flag,
                             state_ok.to(self.device, torch.float64)])
        if world_size > 1:
            parts = [torch.empty_like(local) for _ in range(world_size)]
            dist.all_gather(parts, local)
            table = torch.stack(parts).cpu()
        else:
            table = local[None].cpu()
        n = max(self.count, 1) * world_size
        bad = [int(v) for v in table[:, 2].tolist() if v > 0]
        return SyncResult(task_loss=float(table[:, 0].sum()) / n, kd_loss=float(table[:, 1].sum()) / n,
                          stop_requested=bool((table[:, 3] > 0).any()),
                          bad_iteration=min(bad) if bad else None,
                          bad_state=bool((table[:, 4] == 0).any()))

    def reset_sums(self) -> None:
        self.sums.zero_()
        self.count = 0


@dataclass
class _Window:
    """Host-side timing since the last log line (validation and checkpoint time excluded)."""

    start: float
    iteration: int
    wait: float = 0.0  # seconds spent waiting for the loader
    paused: float = 0.0  # seconds of validation / saving inside the window


class Trainer:
    """Trains ``student`` (distilled from ``teacher`` unless it is None) under ``cfg``.

    The constructor builds the training form of the models (``student_net``: SyncBatchNorm, device,
    compile, DDP; ``teacher_net``), the loss, the optimizer and the GradScaler from ``cfg``'s parts.
    ``student`` stays the plain module (the same parameters): evaluation, checkpoints and exports use
    it. `load_state_dict` resumes; `fit` trains from `iteration` to the run's end (or a clean stop).
    """

    def __init__(self, cfg: RunConfig, env: DistEnv, student: nn.Module, teacher: nn.Module | None,
                 log: RunLogger) -> None:
        self.cfg, self.env, self.log = cfg, env, log
        runtime = cfg.runtime
        drop_unused_teacher_heads(teacher, student)
        if env.is_main:
            log_model_cost(log, {"student": student, "teacher": teacher}, cfg.data.crop_size)
        self.student = student
        self.student_net = prepare_student(student, env.device, env.world_size, runtime.channels_last,
                                           runtime.compile)
        self.teacher_net = prepare_teacher(teacher, env.device, runtime.channels_last, runtime.compile)
        self.criterion = build_criterion(cfg.distill)
        self.optimizer = build_optimizer(cfg.optim, student)
        self.scaler = build_scaler(runtime.amp, env.device)
        # the resumable state (state_dict / load_state_dict)
        self.iteration = 0
        self.best_miou: float | None = None
        self.best_iteration: int | None = None
        self.owed: tuple[str, ...] = ()  # what `iteration` still has to do (see `checkpoint`)
        self._rng_states: list[dict[str, Any]] | None = None  # restored once the loader has started
        # per-run machinery
        self.val_loader: Any | None = None
        self.meter = _Meter(env.device)
        self.preemption = PreemptionHandler()
        self._config = config_dict(cfg)
        self._saved_at: int | None = None
        self._window = _Window(time.perf_counter(), 0)

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (collective: every rank calls it, for the RNG states)."""
        return {
            "iteration": self.iteration,
            "student": to_reference_state_dict(self.student),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": ckpt.gather_rng_states(self.env.device),
            "best_miou": self.best_miou,
            "best_iteration": self.best_iteration,
            "owed": list(self.owed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a `state_dict`, e.g. read by `checkpoint.load_training_state`); the
        RNG states are restored by `fit`, after the loader has started."""
        try:
            load_checkpoint(self.student, state["student"])
        except CheckpointError as err:
            raise ModelLoadError(f"--resume {self.cfg.paths.resume}: {err}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]
        self.best_miou, self.best_iteration = state.get("best_miou"), state.get("best_iteration")
        self.owed = tuple(state.get("owed") or ())
        self._rng_states = state.get("rng")

    # ----------------------------------------------------------------------------------------- step
    def train_step(self, images: Tensor, labels: Tensor, iteration: int) -> None:
        """One optimisation step (``iteration`` is 1-based); no host synchronisation."""
        set_lr(self.optimizer, poly_lr(self.cfg.optim.lr, iteration - 1, self.cfg.schedule.max_iterations))
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.env.device.type, self.cfg.runtime.amp):
            teacher_out = None
            if self.teacher_net is not None:
                with torch.no_grad():
                    teacher_out = self.teacher_net(images)
            out = self.student_net(images)
            task, kd = self.criterion(out, teacher_out, labels, images)
            loss = task + kd
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.meter.update(task.detach(), kd.detach(), iteration)

    # ----------------------------------------------------------------------------------------- loop
    def fit(self, train_loader: Any, val_loader: Any | None = None) -> int:
        """Train from `iteration` to the run's end; returns the process exit code (0 or 1).

        ``train_loader`` yields the batches from `iteration` on (``start_iteration``), ``val_loader``
        the validation split (None with ``--skip-val``).
        """
        cfg, start, end = self.cfg, self.iteration, self.cfg.schedule.end
        self.val_loader = val_loader
        self.log.info(f"training iterations {start + 1}..{end} of {cfg.schedule.max_iterations} on "
                      f"{self.env.world_size} rank(s), {cfg.optim.batch_per_rank} images per rank")
        # Starting the loader (a torch DataLoader draws its base seed from the global generator on
        # the first batch) and validation run inside fork_rng: they never move the training RNG
        # streams, so a resumed run draws exactly what the uninterrupted run drew.
        with self._fork_rng():
            batches = iter(train_loader)
            first = next(batches, None)
        if first is not None:
            batches = itertools.chain([first], batches)
        if self._rng_states is not None:
            self._restore_rng(self._rng_states)
        self._window = _Window(time.perf_counter(), start)
        if self.owed:
            self.log.info(f"iteration {start} still owes {' and '.join(self.owed)}: doing it first")
            self._settle()
            if start == end:
                self._finish()
                return 0
        with self.preemption:
            for it in range(start + 1, end + 1):
                t0 = time.perf_counter()
                try:
                    images, labels = next(batches)
                except StopIteration:
                    raise RuntimeError(f"the training loader ran out at iteration {it}") from None
                self._window.wait += time.perf_counter() - t0
                self.train_step(images, labels, it)
                self.iteration = it
                self.log.progress(it)
                actions = plan(it, cfg.schedule)
                if actions.check:
                    code = self._act(actions)
                    if code is not None:
                        return code
        return 0

    def _act(self, actions: StepActions) -> int | None:
        """Carry out ``actions`` at a sync point; an exit code when the run stops here."""
        it, paths = self.iteration, self.cfg.paths
        result = self.meter.sync(self.preemption.requested, self.env.world_size,
                                 state_is_finite(self.student, self.optimizer))
        if result.bad_iteration is not None or result.bad_state:
            self._report_non_finite(result)
            return 1
        if actions.log:
            self._log_train(result)
        if actions.save or result.stop_requested:
            self._broadcast_buffers()
            # before validating: an error there (say, an unreadable val image) loses no training, and
            # the owed work in the file makes --resume do it
            self.owed = actions.owed
            self.save((ckpt.LATEST,))
        if self.owed:
            self._settle()
        latest = os.path.join(paths.save_dir, ckpt.LATEST)
        if result.stop_requested and not actions.stop:
            self.log.info(f"stop requested by a signal: checkpoint at iteration {it} in {paths.save_dir}; "
                          f"continue with --resume {latest}")
            self.log.record("event", event="preempted", iteration=it)
        elif actions.stop and it < self.cfg.schedule.max_iterations:
            self.log.info(f"--stop-at {it} reached; continue with --resume {latest}")
        if actions.stop or result.stop_requested:
            self._finish()
            return 0
        return None

    # ------------------------------------------------------------------------------------- logging
    def _log_train(self, result: SyncResult) -> None:
        it, cfg = self.iteration, self.cfg
        window, now = self._window, time.perf_counter()
        steps = max(it - window.iteration, 1)
        elapsed = now - window.start - window.paused
        wait = window.wait
        step_s = elapsed / steps
        ips = cfg.optim.batch_size * steps / max(elapsed, 1e-9)
        max_it = cfg.schedule.max_iterations
        eta = step_s * (max_it - it)
        lr = poly_lr(cfg.optim.lr, it - 1, max_it)
        mem = (torch.cuda.max_memory_allocated(self.env.device) / 2**30
               if self.env.device.type == "cuda" else None)
        mem_text = f" | mem {mem:.2f} GiB" if mem is not None else ""
        self.log.info(f"it {it}/{max_it} | lr {lr:.6f} | task {result.task_loss:.4f} | "
                      f"kd {result.kd_loss:.4f} | {ips:.1f} img/s | data {1000 * wait / steps:.1f} ms | "
                      f"step {1000 * step_s:.1f} ms{mem_text} | eta {format_duration(eta)}")
        self.log.record("train", iteration=it, lr=lr, task_loss=result.task_loss, kd_loss=result.kd_loss,
                        images_per_s=ips, data_ms=1000 * wait / steps, step_ms=1000 * step_s,
                        peak_mem_gib=mem, eta_s=eta)
        self.meter.reset_sums()
        self._window = _Window(now, it)

    def _broadcast_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics before evaluating or saving.

        Under SyncBatchNorm (CUDA) they are identical already; on CPU, BatchNorm is per-rank and DDP
        syncs buffers only at the start of a forward, so after a step they differ until the next one.
        """
        if self.env.world_size > 1:
            for buf in self.student.buffers():
                dist.broadcast(buf, src=0)

    # ---------------------------------------------------------------------------------- validation
    def _fork_rng(self) -> contextlib.AbstractContextManager:
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _validate(self) -> bool:
        """Evaluate on the whole val split (all ranks); True when the mIoU is a new best."""
        assert self.val_loader is not None
        it, val = self.iteration, self.cfg.validation
        t0 = time.perf_counter()
        precision = validation_precision(self.cfg)  # fp32 unless --val-amp: best.pth on the reference metric
        with self._fork_rng():
            net = maybe_sliding(self.student, val.eval_mode, self.cfg.data.crop_size, val.eval_stride)
            spec = get_dataset(self.cfg.data.dataset)
            res = evaluate(net, self.val_loader, spec.num_classes, self.env.device,
                           amp=precision, source=f"the student at iteration {it}")
        miou, acc = res["mIoU"], res["pixAcc"]
        is_best = self.best_miou is None or miou > self.best_miou
        if is_best:
            self.best_miou, self.best_iteration = miou, it
        self.log.info(f"validation at it {it} ({precision}): mIoU {100 * miou:.2f} | "
                      f"pixAcc {100 * acc:.2f} | best {100 * self.best_miou:.2f} "
                      f"(it {self.best_iteration}) | "
                      f"{res.get('images', '?')} images in {time.perf_counter() - t0:.1f} s\n"
                      + format_iou_table(res["IoU"], spec.class_names, miou))
        self.log.record("val", iteration=it, mIoU=miou, pixAcc=acc, IoU=res["IoU"], best_mIoU=self.best_miou,
                        best_iteration=self.best_iteration, precision=precision)
        self._window.paused += time.perf_counter() - t0
        return is_best

    # --------------------------------------------------------------------------------- checkpoints
    def save(self, names: tuple[str, ...] = (ckpt.LATEST,)) -> None:
        """Write `state_dict` under ``names`` in the save dir (collective: all ranks call it)."""
        t0 = time.perf_counter()
        state = self.state_dict()
        if self.env.is_main:
            first = os.path.join(self.cfg.paths.save_dir, names[0])
            ckpt.save_training_state(state, self._config, first)
            for name in names[1:]:
                ckpt.atomic_copy(first, os.path.join(self.cfg.paths.save_dir, name))
        if ckpt.LATEST in names:
            self._saved_at = self.iteration
        self._window.paused += time.perf_counter() - t0

    def _restore_rng(self, states: list[dict[str, Any]]) -> None:
        if len(states) == self.env.world_size:
            ckpt.set_rng_state(states[self.env.rank], self.env.device)
        else:
            self.log.warning(f"checkpoint has RNG states of {len(states)} ranks, this run has "
                             f"{self.env.world_size}: random streams start fresh")

    def _export(self, best: bool) -> None:
        """Rank 0 writes the plain student weights under the reference file name."""
        if self.env.is_main:
            models = self.cfg.model
            name = ckpt.reference_export_name(models.student_model, models.student_backbone, models.distilled,
                                              best=best, dataset=self.cfg.data.dataset)
            ckpt.export_reference(self.student, os.path.join(self.cfg.paths.save_dir, name))

    def _settle(self) -> None:
        """Do what the iteration owes (validation, best, exports), then save latest owing nothing."""
        names: tuple[str, ...] = (ckpt.LATEST,)
        if "validate" in self.owed and self.val_loader is not None and self._validate():
            # latest.pth carries the best mIoU too, so that a resumed run compares against it
            names = (ckpt.BEST, ckpt.LATEST)
            self._export(best=True)
        if "export" in self.owed:
            self._export(best=False)
        self.owed = ()
        self.save(names)

    def _report_non_finite(self, result: SyncResult) -> None:
        """Log why the run stops and which checkpoint is still good (every saved one is finite)."""
        it, paths = self.iteration, self.cfg.paths
        if result.bad_iteration is not None:
            what = (f"non-finite loss at iteration {result.bad_iteration} (task {result.task_loss:.4g}, "
                    f"kd {result.kd_loss:.4g})")
        else:
            what = f"non-finite weights, BatchNorm statistics or optimizer state at iteration {it}"
        if self._saved_at is not None:
            where = f"{ckpt.LATEST} at iteration {self._saved_at} in {paths.save_dir}"
        elif paths.resume:
            where = f"{paths.resume} (this run resumed from it)"
        else:
            where = "none written yet"
        self.log.info(f"ERROR: {what}; stopping without saving, validating or exporting. "
                      f"Last good checkpoint: {where}. {NON_FINITE_HINT}.")
        loss = result.bad_iteration is not None
        self.log.record("event", event="non_finite_loss" if loss else "non_finite_state",
                        iteration=result.bad_iteration if loss else it)

    def _finish(self) -> None:
        it = self.iteration
        best = "n/a" if self.best_miou is None else f"{100 * self.best_miou:.2f} (it {self.best_iteration})"
        self.log.info(f"done at iteration {it}: best mIoU ({validation_precision(self.cfg)}) {best}; "
                      f"checkpoints in {self.cfg.paths.save_dir}")
        self.log.record("event", event="finished" if it == self.cfg.schedule.max_iterations else "stopped",
                        iteration=it, best_mIoU=self.best_miou, best_iteration=self.best_iteration)
