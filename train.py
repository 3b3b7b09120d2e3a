"""Distil a segmentation teacher into a student with DIST (or train one model alone) on Cityscapes.

    torchrun --nproc_per_node=8 train.py --teacher-model deeplabv3 --teacher-backbone resnet101 \\
        --student-model deeplabv3 --student-backbone resnet18 --data data/cityscapes \\
        --teacher-pretrained ckpts/deeplabv3_resnet101_citys_best_model.pth \\
        --student-pretrained-base ckpts/resnet18-imagenet.pth --save-dir work_dirs/dist_r18

``--teacher-model none`` trains the student alone (the reference ``train_baseline.py``; also how a
teacher is trained). ``python train.py --help`` lists every flag; the recipe, the loop and the
machinery live in ``fastdist.engine`` (config, kd, trainer, checkpoint, logger, signals).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from fastdist.data import build_loader, get_dataset
from fastdist.engine import checkpoint as ckpt
from fastdist.engine.config import (
    ConfigError,
    check_resume_compatible,
    parse_config,
    recipe_warnings,
    remove_stale_temp_files,
    save_config,
    validation_precision,
)
from fastdist.engine.dashboards import open_dashboards
from fastdist.engine.distributed import DistEnv, barrier, cleanup_distributed, exit_process, setup_distributed
from fastdist.engine.flops import log_model_cost
from fastdist.engine.kd import (
    DistillationLoss,
    ModelLoadError,
    build_student,
    build_teacher,
    drop_unused_teacher_heads,
    prepare_student,
    prepare_teacher,
)
from fastdist.engine.lock import SaveDirLock, SaveDirLockError
from fastdist.engine.logger import RunLogger
from fastdist.engine.trainer import (
    Trainer,
    build_optimizer,
    build_scaler,
    configure_backends,
    seed_everything,
)
from fastdist.models import CheckpointError, load_checkpoint

SETUP_ERRORS = (ConfigError, ModelLoadError, ckpt.CheckpointFormatError, CheckpointError,
                SaveDirLockError)


def load_resume(cfg: argparse.Namespace, student: torch.nn.Module) -> dict[str, Any] | None:
    """The ``--resume`` training state, checked against the recipe and loaded into ``student``."""
    if cfg.resume is None:
        return None
    state = ckpt.load_training_state(cfg.resume)
    cfg.resume_notes = check_resume_compatible(state["config"], cfg)
    try:
        load_checkpoint(student, state["student"])
    except CheckpointError as err:
        raise ModelLoadError(f"--resume {cfg.resume}: {err}") from None
    return state


def run(cfg: argparse.Namespace, env: DistEnv, student: torch.nn.Module, teacher: torch.nn.Module | None,
        resume: dict[str, Any] | None) -> int:
    """Everything after the cheap checks: device set-up, loaders, the training loop."""
    configure_backends(env.device)
    seed_everything(cfg.seed + env.rank)  # dropout streams differ per rank (restored on resume)
    start = resume["iteration"] if resume else 0
    removed, stale = [], []
    if env.is_main:
        # temporary files of a killed write (kill -9 during a checkpoint or config.json)
        stale = remove_stale_temp_files(cfg.save_dir)
        if cfg.log_dir != cfg.save_dir:
            stale += remove_stale_temp_files(cfg.log_dir)
        if cfg.overwrite and resume is None:
            removed = ckpt.remove_earlier_run(cfg.save_dir, cfg.log_dir)
        save_config(cfg, cfg.save_dir)
    log = RunLogger(cfg.log_dir, env.is_main, progress_total=cfg.stop_at or cfg.max_iterations,
                    progress_start=start, dashboards=open_dashboards(cfg, env.is_main))
    log.info(f"fastdist train: {cfg.command}\n  device {env.device} x {env.world_size}, amp {cfg.amp} "
             f"(validation {validation_precision(cfg)}), "
             f"channels_last {cfg.channels_last}, compile {cfg.compile}, loader {cfg.loader}, "
             f"kd backend {cfg.kd_backend}, optimizer {cfg.optimizer}\n"
             f"  kd method {cfg.kd_method}: lambda_kd {cfg.lambda_kd}, temperature {cfg.kd_temperature}\n"
             f"  dataset {cfg.dataset}: crop {cfg.crop_size}, batch {cfg.batch_size}, iterations "
             f"{cfg.max_iterations}, lr {cfg.lr} (the dataset's recipe: "
             f"{', '.join(cfg.dataset_defaults) or 'none'})")
    if stale:
        log.info("removed temporary files of an interrupted write: "
                 + ", ".join(map(os.path.basename, stale)))
    for warning in recipe_warnings(cfg):
        log.warning(warning)
    if removed:
        log.info(f"--overwrite: removed the earlier run's {', '.join(map(os.path.basename, removed))}")
    for note in getattr(cfg, "resume_notes", []):
        log.warning(note)
    if resume:
        log.info(f"resuming from {cfg.resume} at iteration {start}")

    drop_unused_teacher_heads(teacher, student)
    if env.is_main:
        log_model_cost(log, {"student": student, "teacher": teacher}, cfg.crop_size)
    net = prepare_student(student, env.device, env.world_size, cfg.channels_last, cfg.compile)
    teacher_net = prepare_teacher(teacher, env.device, cfg.channels_last, cfg.compile)
    criterion = DistillationLoss(cfg.lambda_kd, cfg.kd_temperature, cfg.kd_beta, cfg.kd_gamma,
                                 cfg.kd_backend, cfg.kd_mask, cfg.kd_intra_sync, cfg.kd_method)
    optimizer = build_optimizer(cfg, student)
    scaler = build_scaler(cfg.amp, env.device)
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])

    common = dict(backend=cfg.loader, device=env.device, rank=env.rank, world_size=env.world_size,
                  num_threads=cfg.workers, channels_last=cfg.channels_last, dataset=cfg.dataset,
                  check_files=False)  # parse_config checked the pairs and headers
    train_loader = build_loader(cfg.data, "train", cfg.batch_per_rank, crop_size=tuple(cfg.crop_size),
                                seed=cfg.seed, max_iterations=cfg.max_iterations, start_iteration=start,
                                **common)
    val_split = get_dataset(cfg.dataset).recipe.val_split
    val_loader = None if cfg.skip_val else build_loader(cfg.data, val_split, cfg.val_batch_size, **common)

    trainer = Trainer(cfg, env, net, student, teacher_net, criterion, optimizer, scaler, train_loader,
                      val_loader, log, start_iteration=start,
                      best_miou=resume.get("best_miou") if resume else None,
                      best_iteration=resume.get("best_iteration") if resume else None,
                      rng_states=resume.get("rng") if resume else None,
                      owed=resume["owed"] if resume else None)
    try:
        code = trainer.fit()
        barrier()  # no rank tears the process group down while rank 0 still writes checkpoints
        return code
    finally:
        log.close()


def _lock_save_dir(cfg: argparse.Namespace, held: contextlib.ExitStack) -> None:
    """Rank 0 holds the save dir's lock until ``held`` closes (`SaveDirLockError` if a live run has it)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    lock = held.enter_context(SaveDirLock(cfg.save_dir))
    if lock.stale:
        print(f"train.py: note: {lock.path} was left by a run that did not end cleanly ({lock.stale}); "
              "taken over", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check cheaply (exit 2 with a hint), then train; returns the exit code."""
    with contextlib.ExitStack() as held:  # the save-dir lock: released on every return and exception
        return _main(argv, held)


def _main(argv: Sequence[str] | None, held: contextlib.ExitStack) -> int:
    try:
        cfg = parse_config(argv)
        _lock_save_dir(cfg, held)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        student, teacher = build_student(cfg), build_teacher(cfg)
        resume = load_resume(cfg, student)
    except SETUP_ERRORS as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    end = cfg.stop_at or cfg.max_iterations
    owes = resume is not None and resume["iteration"] == end and resume["owed"]  # a failed last validation
    if resume is not None and resume["iteration"] >= end and not owes:
        print(f"train.py: {cfg.resume} is at iteration {resume['iteration']}: nothing to do up to {end}",
              file=sys.stderr)
        return 0
    env = setup_distributed(cfg.device)
    try:
        return run(cfg, env, student, teacher, resume)
    except ConfigError as err:  # config.json could not be written (disk full since the start-up check)
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    exit_process(main())
