"""Distil a segmentation teacher into a student with DIST (or train one model alone) on Cityscapes.

    torchrun --nproc_per_node=8 train.py --teacher-model deeplabv3 --teacher-backbone resnet101 \\
        --student-model deeplabv3 --student-backbone resnet18 --data data/cityscapes \\
        --teacher-pretrained ckpts/deeplabv3_resnet101_citys_best_model.pth \\
        --student-pretrained-base ckpts/resnet18-imagenet.pth --save-dir work_dirs/dist_r18

``--teacher-model none`` trains the student alone (the reference ``train_baseline.py``; also how a
teacher is trained). ``python train.py --help`` lists every flag. The recipe: parse the flags into a
`RunConfig`, build the models, maybe resume, fit; the machinery lives in ``fastdist.engine`` (config,
kd, trainer, schedule, checkpoint, logger, signals).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from torch import nn

from fastdist.data import build_loader, get_dataset
from fastdist.engine import checkpoint as ckpt
from fastdist.engine.config import (
    ConfigError,
    RunConfig,
    parse_config,
    recipe_warnings,
    remove_stale_temp_files,
    save_config,
    validation_precision,
)
from fastdist.engine.dashboards import open_dashboards
from fastdist.engine.distributed import DistEnv, barrier, cleanup_distributed, exit_process, setup_distributed
from fastdist.engine.kd import ModelLoadError, build_student, build_teacher
from fastdist.engine.lock import SaveDirLock, SaveDirLockError
from fastdist.engine.logger import RunLogger
from fastdist.engine.trainer import Trainer, configure_backends, seed_everything
from fastdist.models import CheckpointError

SETUP_ERRORS = (ConfigError, ModelLoadError, ckpt.CheckpointFormatError, CheckpointError,
                SaveDirLockError)


def build_loaders(cfg: RunConfig, env: DistEnv, start: int) -> tuple[Any, Any | None]:
    """The training loader from iteration ``start`` on (the same order as an uninterrupted run) and
    the validation loader (None with ``--skip-val``)."""
    data = cfg.data
    common = dict(backend=data.loader, device=env.device, rank=env.rank, world_size=env.world_size,
                  num_threads=data.workers, channels_last=cfg.runtime.channels_last, dataset=data.dataset,
                  check_files=False)  # parse_config checked the pairs and headers
    train = build_loader(data.data, "train", cfg.optim.batch_per_rank, crop_size=data.crop_size,
                         seed=cfg.optim.seed, max_iterations=cfg.schedule.max_iterations,
                         start_iteration=start, **common)
    val_split = get_dataset(data.dataset).recipe.val_split
    val = None if cfg.schedule.skip_val else build_loader(data.data, val_split, cfg.validation.val_batch_size,
                                                          **common)
    return train, val


def _prepare_dirs(cfg: RunConfig, fresh: bool) -> list[str]:
    """Rank 0: remove temporary files of killed writes (and, for ``--overwrite``, the earlier run) and
    write config.json; returns the log lines that say what was removed."""
    paths, lines = cfg.paths, []
    stale = remove_stale_temp_files(paths.save_dir)
    if paths.log_dir != paths.save_dir:
        stale += remove_stale_temp_files(paths.log_dir)
    if stale:
        lines.append("removed temporary files of an interrupted write: "
                     + ", ".join(map(os.path.basename, stale)))
    if paths.overwrite and fresh:
        removed = ckpt.remove_earlier_run(paths.save_dir, paths.log_dir)
        if removed:
            names = ", ".join(map(os.path.basename, removed))
            lines.append(f"--overwrite: removed the earlier run's {names}")
    save_config(cfg, paths.save_dir)
    return lines


def _log_header(log: RunLogger, cfg: RunConfig, env: DistEnv, notes: list[str]) -> None:
    rt, kd = cfg.runtime, cfg.distill
    log.info(f"fastdist train: {rt.command}\n  device {env.device} x {env.world_size}, amp {rt.amp} "
             f"(validation {validation_precision(cfg)}), "
             f"channels_last {rt.channels_last}, compile {rt.compile}, loader {cfg.data.loader}, "
             f"kd backend {kd.kd_backend}, optimizer {cfg.optim.optimizer}\n"
             f"  kd method {kd.kd_method}: lambda_kd {kd.lambda_kd}, temperature {kd.kd_temperature}\n"
             f"  dataset {cfg.data.dataset}: crop {list(cfg.data.crop_size)}, batch {cfg.optim.batch_size}, "
             f"iterations {cfg.schedule.max_iterations}, lr {cfg.optim.lr} (the dataset's recipe: "
             f"{', '.join(cfg.data.dataset_defaults) or 'none'})")
    for line in notes:
        log.info(line)
    for warning in recipe_warnings(cfg):
        log.warning(warning)
    for note in cfg.paths.resume_notes:
        log.warning(note)


def run(cfg: RunConfig, env: DistEnv, student: nn.Module, teacher: nn.Module | None,
        state: dict[str, Any] | None) -> int:
    """Everything after the cheap checks: device set-up, the Trainer (resumed from ``state``), fit."""
    configure_backends(env.device)
    seed_everything(cfg.optim.seed + env.rank)  # dropout streams differ per rank (restored on resume)
    notes = _prepare_dirs(cfg, fresh=state is None) if env.is_main else []
    log = RunLogger(cfg.paths.log_dir, env.is_main, progress_total=cfg.schedule.end,
                    dashboards=open_dashboards(cfg, env.is_main))
    try:
        _log_header(log, cfg, env, notes)
        trainer = Trainer(cfg, env, student, teacher, log)
        if state is not None:
            trainer.load_state_dict(state)
            log.info(f"resuming from {cfg.paths.resume} at iteration {trainer.iteration}")
        code = trainer.fit(*build_loaders(cfg, env, trainer.iteration))
        barrier()  # no rank tears the process group down while rank 0 still writes checkpoints
        return code
    finally:
        log.close()


def _lock_save_dir(cfg: RunConfig, held: contextlib.ExitStack) -> None:
    """Rank 0 holds the save dir's lock until ``held`` closes (`SaveDirLockError` if a live run has it)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    lock = held.enter_context(SaveDirLock(cfg.paths.save_dir))
    if lock.stale:
        print(f"train.py: note: {lock.path} was left by a run that did not end cleanly ({lock.stale}); "
              "taken over", file=sys.stderr)


def _nothing_to_do(state: dict[str, Any] | None, end: int) -> bool:
    """The checkpoint is at (or past) the run's end and owes nothing (no failed last validation)."""
    if state is None:
        return False
    return state["iteration"] > end or (state["iteration"] == end and not state["owed"])


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, check cheaply (exit 2 with a hint), then train; returns the exit code."""
    with contextlib.ExitStack() as held:  # the save-dir lock: released on every return and exception
        return _main(argv, held)


def _main(argv: Sequence[str] | None, held: contextlib.ExitStack) -> int:
    try:
        cfg = parse_config(argv)
        _lock_save_dir(cfg, held)
        seed_everything(cfg.optim.seed)  # identical initial weights on every rank
        classes = get_dataset(cfg.data.dataset).num_classes
        student, teacher = build_student(cfg.model, classes), build_teacher(cfg.model, classes)
        state = ckpt.load_training_state(cfg.paths.resume) if cfg.paths.resume else None
    except SETUP_ERRORS as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    if _nothing_to_do(state, cfg.schedule.end):
        print(f"train.py: {cfg.paths.resume} is at iteration {state['iteration']}: nothing to do up to "
              f"{cfg.schedule.end}", file=sys.stderr)
        return 0
    env = setup_distributed(cfg.runtime.device)
    try:
        return run(cfg, env, student, teacher, state)
    except (ConfigError, ModelLoadError) as err:  # config.json unwritable since the start-up check, or a
        print(f"train.py: error: {err}", file=sys.stderr)  # --resume file whose weights do not fit
        return 2
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    exit_process(main())
