"""Command line of ``train.py``: argparse groups, validation that fails in seconds, one frozen config.

The flags and defaults are those of the reference ``train_kd.py`` (DIST_KD / CIRKD), so its scripts
run unchanged; ``--teacher-model none`` is the reference ``train_baseline.py``. The speed flags
(``--amp``, ``--channels-last``, ``--compile``, ``--loader``, ``--kd-backend``, ``--optimizer``) default
to the fast setting for the device and can each be switched off for ablations.

`parse_config` returns a `RunConfig`: frozen dataclasses, one per concern (`ModelConfig`, `DataConfig`,
`OptimConfig`, `DistillConfig`, `RuntimeConfig`, `ScheduleConfig`, `ValidationConfig`, `PathsConfig`,
`ReferenceFlags`), with every derived value (device type, world size, per-rank batch, random teacher,
command line, torch version, resume notes, ...) computed once in `build_config`; each component gets
only its part (``build_optimizer(cfg.optim, ...)``). Field names are the flags' names, so
`config_dict` (what ``config.json`` and every checkpoint store) is the union of the parts' fields:
the same keys as before the dataclasses, which `check_resume_compatible` compares on ``--resume``.

`parse_config` validates everything that is cheap to validate (names, files, the dataset layout, the
batch split, the recipe of a ``--resume`` checkpoint) before any heavy start-up and raises
`ConfigError` with a message that says what to do.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastdist.data import DALI_HINT, DATASET_NAMES, DATASETS, dali_available, default_backend, get_dataset
from fastdist.engine.dashboards import add_dashboard_args, check_dashboards
from fastdist.engine.runtime import add_runtime_args, resolve_runtime
from fastdist.engine.sliding import add_sliding_args, check_sliding_args

__all__ = ["DATASET_RECIPE_FLAGS", "NON_FINITE_HINT", "RECIPE_KEYS", "ConfigError", "DataConfig",
           "DistillConfig", "ModelConfig", "OptimConfig", "PathsConfig", "ReferenceFlags", "RunConfig",
           "RuntimeConfig", "ScheduleConfig", "ValidationConfig", "apply_dataset_recipe", "build_config",
           "build_parser", "check_resume_compatible", "check_writable_dir", "config_dict", "finite_nonneg",
           "finite_positive", "finite_scale",
           "parse_config", "recipe_warnings", "remove_stale_temp_files", "save_config",
           "validation_precision"]

# Flags that define the training problem: a checkpoint resumes only under the same values
# (everything else -- speed flags, paths, intervals -- may change between the two runs).
RECIPE_KEYS: tuple[str, ...] = (
    "teacher_model", "teacher_backbone", "student_model", "student_backbone", "crop_size",
    "batch_size", "max_iterations", "lr", "momentum", "weight_decay", "lambda_kd", "kd_temperature",
    "kd_beta", "kd_gamma", "kd_mask", "kd_intra_sync", "seed", "kd_method", "dataset",
)  # fmt: skip

# --kd-method: (loss weight --lambda-kd, temperature --kd-temperature) when not given. dist: the DIST
# recipe; kd and cwd: CIRKD's Cityscapes scripts (train_kd.py --lambda-kd 1.0, --kd-temperature
# default 1.0; --lambda-cwd-logit 3.0 with the CWD logit criterion's temperature 4.0).
# Recipe keys added after the first checkpoints were written: a config without the key was trained
# with this value (before --kd-method existed every run distilled with DIST).
RECIPE_KEY_DEFAULTS: dict[str, Any] = {"kd_method": "dist", "dataset": "citys"}

# Flags whose default is the --dataset's recipe (fastdist.data.spec.Recipe); the parser's defaults are
# Cityscapes' recipe, an explicit flag always wins.
DATASET_RECIPE_FLAGS: tuple[str, ...] = ("crop_size", "batch_size", "max_iterations", "lr")

KD_METHOD_DEFAULTS: dict[str, tuple[float, float]] = {"dist": (1.0, 1.0), "kd": (1.0, 1.0), "cwd": (3.0, 4.0)}

_NONE_STRINGS = ("", "none", "None")

# What to do after a non-finite loss. --lr is part of the recipe, so --resume refuses a changed one.
NON_FINITE_HINT = ("Try --resume auto with --amp off (a speed flag, allowed on resume); a lower --lr changes "
                   "the recipe, which --resume refuses: start a new run for it (another --save-dir, or "
                   "--overwrite)")

# Test-time scales: below 0.1 a 1024x2048 image shrinks under the models' output stride; above 8 it
# is far beyond any memory. Anything outside is a typo, not a recipe.
SCALE_RANGE = (0.1, 8.0)


class ConfigError(ValueError):
    """A command line that cannot run; the message says what to change."""


@dataclass(frozen=True)
class ModelConfig:
    """The two networks and their initial weights (``--student-*``, ``--teacher-*``)."""

    student_model: str
    student_backbone: str
    student_pretrained: str | None
    student_pretrained_base: str | None
    teacher_model: str | None  # None: no teacher, the student trains alone (--teacher-model none)
    teacher_backbone: str | None
    teacher_pretrained: str | None
    teacher_pretrained_base: str | None
    random_teacher: bool  # --teacher-pretrained none: a randomly initialised teacher (benchmarks)
    teacher_sha256: str | None  # the contents of --teacher-pretrained, which --resume compares

    @property
    def distilled(self) -> bool:
        """True when a teacher distils into the student."""
        return self.teacher_model is not None


@dataclass(frozen=True)
class DataConfig:
    """The training data and its loader (``--data``, ``--dataset``, ``--crop-size``, ``--loader``, ...)."""

    data: str  # as given
    data_root: str  # its real path: what --resume compares (--data may be relative or a link)
    dataset: str
    crop_size: tuple[int, int]
    loader: str  # dali or torch
    workers: int
    dataset_defaults: tuple[str, ...] = ()  # the DATASET_RECIPE_FLAGS taken from the dataset's recipe


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser and the batch (``--lr``, ``--momentum``, ``--weight-decay``, ``--batch-size``, ...)."""

    batch_size: int  # global
    batch_per_rank: int
    lr: float
    momentum: float
    weight_decay: float
    optimizer: str  # sgd or apex
    seed: int


@dataclass(frozen=True)
class DistillConfig:
    """The distillation loss (``--kd-*``, ``--lambda-kd``); the method's defaults already filled in."""

    kd_method: str
    lambda_kd: float
    kd_temperature: float
    kd_beta: float
    kd_gamma: float
    kd_backend: str
    kd_mask: str
    kd_intra_sync: bool


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the run executes (`fastdist.engine.runtime` resolved the device's defaults)."""

    device: str  # as given: auto, cpu, cuda, cuda:N
    device_type: str  # cuda or cpu
    world_size: int
    amp: str  # bf16, fp16 or off
    channels_last: bool
    compile: bool
    command: str  # the command line, as logged
    torch_version: str


@dataclass(frozen=True)
class ScheduleConfig:
    """The iterations and the periods of the loop (`fastdist.engine.schedule.plan` reads them)."""

    max_iterations: int  # the poly schedule's length
    stop_at: int | None  # this run's last iteration when earlier than max_iterations
    log_iter: int
    check_every: int
    save_per_iters: int
    val_per_iters: int
    skip_val: bool

    @property
    def end(self) -> int:
        """The last iteration this run trains (``--stop-at`` or ``--max-iterations``)."""
        return min(self.max_iterations, self.stop_at or self.max_iterations)


@dataclass(frozen=True)
class ValidationConfig:
    """Training validation (``--val-batch-size``, ``--val-amp``, ``--eval-mode``, ``--eval-stride``)."""

    val_batch_size: int
    val_amp: bool
    eval_mode: str
    eval_stride: tuple[int, int] | None


@dataclass(frozen=True)
class PathsConfig:
    """What the run reads to start from and where it writes (checkpoints, logs, dashboards)."""

    save_dir: str
    log_dir: str
    resume: str | None  # the checkpoint file (--resume auto resolved), or None
    resume_notes: tuple[str, ...]  # changes since the --resume checkpoint, logged as warnings
    overwrite: bool
    tensorboard: bool
    wandb: str | None


@dataclass(frozen=True)
class ReferenceFlags:
    """Flags of the reference scripts that are accepted and ignored (saved in config.json as given)."""

    gpu_id: str | None
    local_rank: int | None
    aux: bool


@dataclass(frozen=True)
class RunConfig:
    """The resolved ``train.py`` configuration, one part per concern; built once by `build_config`."""

    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    distill: DistillConfig
    runtime: RuntimeConfig
    schedule: ScheduleConfig
    validation: ValidationConfig
    paths: PathsConfig
    reference: ReferenceFlags


def _optional_path(value: str) -> str | None:
    """Reference scripts pass the string 'None' for "no file"."""
    return None if value in _NONE_STRINGS else value


def _number(value: str, convert: Callable[[str], float], ok: Callable[[float], bool], expected: str) -> float:
    """``convert(value)`` if ``ok`` accepts it, else an `argparse.ArgumentTypeError` (argparse prefixes
    the option's name and exits 2)."""
    try:
        number = convert(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}") from None
    if not ok(number):  # nan fails every comparison, so it never passes
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
    return number


def _positive_int(value: str) -> int:
    return _number(value, int, lambda n: n >= 1, "a positive integer")


def _non_negative_int(value: str) -> int:
    return _number(value, int, lambda n: n >= 0, "an integer >= 0")


def finite_positive(value: str) -> float:
    """argparse type: a finite number > 0 (rejects nan, inf, 0 and negatives)."""
    return _number(value, float, lambda x: 0 < x < math.inf, "a finite number > 0")


def finite_nonneg(value: str) -> float:
    """argparse type: a finite number >= 0 (rejects nan, inf and negatives)."""
    return _number(value, float, lambda x: 0 <= x < math.inf, "a finite number >= 0")


def finite_scale(value: str) -> float:
    """argparse type of ``--scales`` (eval.py, predict.py): a number in `SCALE_RANGE`."""
    low, high = SCALE_RANGE
    return _number(value, float, lambda x: low <= x <= high, f"a scale between {low} and {high}")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to the help texts that do not say their default themselves."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _recipe_help(text: str, flag: str) -> str:
    """``text`` and the default of ``flag`` (a `DATASET_RECIPE_FLAGS` entry): each dataset's recipe value."""
    by_value: dict[str, list[str]] = {}
    for name, spec in DATASETS.items():
        value = getattr(spec.recipe, flag)
        shown = " ".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}"
        by_value.setdefault(shown, []).append(name)
    if len(by_value) == 1:
        listing = f"{next(iter(by_value))} for every dataset"
    else:
        listing = ", ".join(f"{value} for {'/'.join(names)}" for value, names in by_value.items())
    return f"{text} (default: from the --dataset's recipe: {listing})"


def _val_batch_help() -> str:
    varying = [name for name, spec in DATASETS.items() if spec.varying_size]
    return ("validation images per rank and batch (default: the per-rank training batch; 1 for the "
            f"datasets of varying image size: {', '.join(varying)})")


def build_parser() -> argparse.ArgumentParser:
    """The ``train.py`` argument parser (reference-compatible flags first in each group)."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="DIST knowledge distillation for semantic segmentation on Cityscapes "
        "(torchrun --nproc_per_node=N train.py ...). --teacher-model none trains a model alone.",
        formatter_class=_DefaultsFormatter,
    )
    g = p.add_argument_group("models")
    g.add_argument("--teacher-model", default="deeplabv3", help="teacher model name, or 'none' (no KD)")
    g.add_argument("--teacher-backbone", default="resnet101")
    g.add_argument("--student-model", default="deeplabv3")
    g.add_argument("--student-backbone", default="resnet18")
    g.add_argument("--teacher-pretrained", default=None,
                   help="teacher weights (required with a teacher; 'none' = random teacher, for benchmarks)")
    g.add_argument("--teacher-pretrained-base", type=_optional_path, default=None,
                   help="ImageNet backbone weights for the teacher (reference flag; rarely useful)")
    g.add_argument("--student-pretrained-base", type=_optional_path, default=None,
                   help="ImageNet backbone weights for the student, e.g. ckpts/resnet18-imagenet.pth")
    g.add_argument("--student-pretrained", type=_optional_path, default=None,
                   help="full student weights to start from")

    g = p.add_argument_group("data")
    g.add_argument("--data", default="data/cityscapes", help="dataset root (the --dataset's layout)")
    g.add_argument("--dataset", default="citys", choices=DATASET_NAMES,
                   help="dataset: layout, label map, classes and the recipe defaults of --crop-size, "
                        "--batch-size, --max-iterations, --lr (CIRKD's scripts for it; see the README)")
    g.add_argument("--crop-size", type=_positive_int, nargs=2, default=[512, 1024], metavar=("H", "W"),
                   help=_recipe_help("training crop, also the --eval-mode slide window", "crop_size"))
    g.add_argument("--workers", "-j", type=_non_negative_int, default=16,
                   help="loader threads (DALI) or worker processes (torch; 0 = in the main process) per rank")
    g.add_argument("--loader", choices=("dali", "torch"), default=None,
                   help="data pipeline (default: dali on CUDA when DALI is installed, else torch)")
    g.add_argument("--val-batch-size", type=_positive_int, default=None,
                   help=_val_batch_help())

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_positive_int, default=16,
                   help=_recipe_help("global batch, split over ranks", "batch_size"))
    g.add_argument("--max-iterations", type=_positive_int, default=40000,
                   help=_recipe_help("training iterations (the poly schedule's length)", "max_iterations"))
    g.add_argument("--lr", type=finite_positive, default=0.02,
                   help=_recipe_help("base learning rate of the poly schedule", "lr"))
    g.add_argument("--momentum", type=finite_nonneg, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=finite_nonneg, default=5e-4, help="SGD weight decay")
    g.add_argument("--optimizer", choices=("sgd", "apex"), default="sgd",
                   help="sgd: torch SGD (fused on CUDA/CPU); apex: NVIDIA apex FusedSGD")
    g.add_argument("--seed", type=int, default=0, help="model init, dropout and data order")

    g = p.add_argument_group("distillation")
    g.add_argument("--kd-method", choices=tuple(KD_METHOD_DEFAULTS), default="dist",
                   help="distillation loss on the logits: DIST, pixel-wise KD or channel-wise CWD")
    g.add_argument("--lambda-kd", type=finite_nonneg, default=None,
                   help="loss weight (default per --kd-method: dist 1, kd 1, cwd 3)")
    g.add_argument("--kd-temperature", type=finite_positive, default=None,
                   help="temperature (default per --kd-method: dist 1, kd 1, cwd 4)")
    g.add_argument("--kd-beta", type=finite_nonneg, default=1.0, help="DIST inter-class (row) weight")
    g.add_argument("--kd-gamma", type=finite_nonneg, default=1.0, help="DIST intra-class (column) weight")
    g.add_argument("--kd-backend", choices=("auto", "triton", "torch", "reference"), default="auto")
    g.add_argument("--kd-mask", choices=("none", "pad", "ignore"), default="none",
                   help="pixels left out of the DIST loss: crop padding, or every ignore-label pixel")
    g.add_argument("--kd-intra-sync", action="store_true",
                   help="intra-class relation over the global batch (one small all-reduce per loss)")

    g = p.add_argument_group("performance")
    add_runtime_args(g)  # --device, --amp, --channels-last: the same as eval.py and predict.py
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile student and teacher (default: on for CUDA)")

    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--resume", type=_optional_path, default=None,
                   help="training checkpoint to continue from, or 'auto' (SAVE_DIR/latest.pth if present)")
    g.add_argument("--save-dir", default=None, help="checkpoints (default: runs/<kd|baseline>_<student>)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in a save dir that holds one (its checkpoints, exports and logs "
                   "are deleted first)")
    g.add_argument("--log-dir", default=None, help="text and JSON-lines logs (default: the save dir)")
    g.add_argument("--log-iter", type=_positive_int, default=10)
    add_dashboard_args(g)
    g.add_argument("--val-per-iters", type=_positive_int, default=400)
    g.add_argument("--save-per-iters", type=_positive_int, default=400)
    g.add_argument("--skip-val", action="store_true")
    g.add_argument("--val-amp", action="store_true",
                   help="validate under the training autocast (--amp); default fp32, the reference metric "
                   "that picks best.pth")
    add_sliding_args(g, crop_flag=None, stride_flag="--eval-stride")  # validation windows of --crop-size
    g.add_argument("--stop-at", type=_positive_int, default=None,
                   help="save and stop after this iteration, keeping the --max-iterations schedule "
                   "(for time-limited jobs; continue with --resume)")
    g.add_argument("--check-every", type=_positive_int, default=10,
                   help="iterations between the cross-rank checks for preemption signals and non-finite "
                   "losses (one host sync + one tiny all-gather each)")

    g = p.add_argument_group("reference compatibility (ignored)")
    g.add_argument("--gpu-id", default=None, help="ignored: torchrun and CUDA_VISIBLE_DEVICES pick GPUs")
    g.add_argument("--local-rank", "--local_rank", type=int, default=None, help="ignored (torchrun env)")
    g.add_argument("--aux", action="store_true", help="ignored: ResNet models always have the aux head")
    return p


def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _model_config(ns: argparse.Namespace) -> ModelConfig:
    no_teacher = ns.teacher_model in _NONE_STRINGS
    # "--teacher-pretrained none" asks for a random teacher; leaving the flag out is an error with a teacher.
    random_teacher = ns.teacher_pretrained in _NONE_STRINGS
    teacher_pretrained = None if random_teacher else ns.teacher_pretrained
    weights = teacher_pretrained if teacher_pretrained and os.path.isfile(teacher_pretrained) else None
    return ModelConfig(
        student_model=ns.student_model, student_backbone=ns.student_backbone,
        student_pretrained=ns.student_pretrained, student_pretrained_base=ns.student_pretrained_base,
        teacher_model=None if no_teacher else ns.teacher_model,
        teacher_backbone=None if no_teacher else ns.teacher_backbone,
        teacher_pretrained=teacher_pretrained, teacher_pretrained_base=ns.teacher_pretrained_base,
        random_teacher=random_teacher, teacher_sha256=_sha256(weights) if weights else None)


def _distill_config(ns: argparse.Namespace) -> DistillConfig:
    if ns.kd_intra_sync and ns.kd_method != "dist":
        raise ConfigError(f"--kd-intra-sync is a DIST option; --kd-method {ns.kd_method} has no "
                          "batch-wide term")
    lambda_kd, temperature = KD_METHOD_DEFAULTS[ns.kd_method]
    return DistillConfig(
        kd_method=ns.kd_method, lambda_kd=lambda_kd if ns.lambda_kd is None else ns.lambda_kd,
        kd_temperature=temperature if ns.kd_temperature is None else ns.kd_temperature,
        kd_beta=ns.kd_beta, kd_gamma=ns.kd_gamma, kd_backend=ns.kd_backend, kd_mask=ns.kd_mask,
        kd_intra_sync=ns.kd_intra_sync)


def _runtime_config(ns: argparse.Namespace, command: str) -> RuntimeConfig:
    try:
        rt = resolve_runtime(ns.device, ns.amp, ns.channels_last, ns.compile)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return RuntimeConfig(device=rt.device, device_type=rt.device_type, world_size=_world_size(), amp=rt.amp,
                         channels_last=rt.channels_last, compile=rt.compile, command=command,
                         torch_version=str(torch.__version__))


def _paths_config(ns: argparse.Namespace, models: ModelConfig) -> PathsConfig:
    kind = "kd" if models.distilled else "baseline"
    save_dir = os.path.expanduser(ns.save_dir or os.path.join(
        "runs", f"{kind}_{models.student_model}_{models.student_backbone}"))
    resume = ns.resume
    if resume == "auto":
        latest = os.path.join(save_dir, "latest.pth")
        resume = latest if os.path.isfile(latest) else None
    return PathsConfig(save_dir=save_dir, log_dir=os.path.expanduser(ns.log_dir) if ns.log_dir else save_dir,
                       resume=resume, resume_notes=(), overwrite=ns.overwrite, tensorboard=ns.tensorboard,
                       wandb=ns.wandb)


def build_config(ns: argparse.Namespace, command: str = "train.py",
                 dataset_defaults: Sequence[str] = ()) -> RunConfig:
    """The `RunConfig` of parsed flags ``ns``: the device's defaults and every derived value filled in.

    ``dataset_defaults`` names the `DATASET_RECIPE_FLAGS` whose values ``ns`` took from the dataset's
    recipe (what `apply_dataset_recipe` returns; recorded in config.json).

    Reads nothing but the environment (``WORLD_SIZE``), CUDA's availability and the teacher weights'
    digest; the checks of names, files and data are `parse_config`'s.
    """
    models = _model_config(ns)
    runtime = _runtime_config(ns, command)
    batch_per_rank = ns.batch_size // runtime.world_size
    return RunConfig(
        model=models,
        data=DataConfig(data=ns.data, data_root=os.path.realpath(ns.data), dataset=ns.dataset,
                        crop_size=(ns.crop_size[0], ns.crop_size[1]), workers=ns.workers,
                        loader=ns.loader or default_backend(runtime.device_type),
                        dataset_defaults=tuple(dataset_defaults)),
        optim=OptimConfig(batch_size=ns.batch_size, batch_per_rank=batch_per_rank, lr=ns.lr,
                          momentum=ns.momentum, weight_decay=ns.weight_decay, optimizer=ns.optimizer,
                          seed=ns.seed),
        distill=_distill_config(ns),
        runtime=runtime,
        schedule=ScheduleConfig(max_iterations=ns.max_iterations, stop_at=ns.stop_at, log_iter=ns.log_iter,
                                check_every=ns.check_every, save_per_iters=ns.save_per_iters,
                                val_per_iters=ns.val_per_iters, skip_val=ns.skip_val),
        validation=ValidationConfig(
            val_batch_size=ns.val_batch_size or _default_val_batch(ns.dataset, batch_per_rank),
            val_amp=ns.val_amp,
            eval_mode=ns.eval_mode, eval_stride=tuple(ns.eval_stride) if ns.eval_stride else None),
        paths=_paths_config(ns, models),
        reference=ReferenceFlags(gpu_id=ns.gpu_id, local_rank=ns.local_rank, aux=ns.aux),
    )


def _check_models(models: ModelConfig) -> None:
    from fastdist.models import VALID_COMBINATIONS

    pairs = [("student", models.student_model, models.student_backbone)]
    if models.distilled:
        pairs.append(("teacher", models.teacher_model, models.teacher_backbone))
    for role, model, backbone in pairs:
        if backbone not in VALID_COMBINATIONS.get(model, ()):
            valid = "; ".join(f"{m} on {', '.join(bs)}" for m, bs in VALID_COMBINATIONS.items())
            raise ConfigError(f"unknown {role} model {model!r} on backbone {backbone!r}. "
                              f"Use --{role}-model/--{role}-backbone from: {valid}")


def _check_files(models: ModelConfig) -> None:
    for flag in ("teacher_pretrained", "teacher_pretrained_base", "student_pretrained",
                 "student_pretrained_base"):
        path = getattr(models, flag)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: file not found")
    teacher_weights = models.teacher_pretrained or models.teacher_pretrained_base or models.random_teacher
    if not models.distilled and teacher_weights:
        raise ConfigError("--teacher-pretrained / --teacher-pretrained-base given with --teacher-model none "
                          "(no teacher, no distillation): name the teacher with --teacher-model/"
                          "--teacher-backbone, or drop the teacher weights")
    if models.distilled and models.teacher_pretrained is None and not models.random_teacher:
        raise ConfigError(
            "distilling needs the teacher's weights: pass --teacher-pretrained PATH (train a teacher with "
            "--teacher-model none), or --teacher-pretrained none for a random teacher (benchmarks only)")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_dataset(cfg: RunConfig) -> None:
    from fastdist.data import check_dataset
    from fastdist.data.cityscapes import DatasetError

    spec = get_dataset(cfg.data.dataset)
    if spec.varying_size and cfg.validation.val_batch_size != 1:
        raise ConfigError(f"--val-batch-size {cfg.validation.val_batch_size}: {spec.title} images vary in "
                          "size, so validation runs one image per batch and rank; leave the flag out or "
                          "use 1")
    splits = ["train"] + ([] if cfg.schedule.skip_val else [spec.recipe.val_split])
    for split in splits:
        try:
            check_dataset(cfg.data.data, split, rank=int(os.environ.get("RANK", "0")),
                          world_size=cfg.runtime.world_size, dataset=spec)
        except DatasetError as err:
            raise ConfigError(f"dataset {cfg.data.data!r} ({split}): {err}. Point --data at a {spec.title} "
                              "root (see fastdist.data.datasets for the layout), or make a synthetic one "
                              f"with `python -m fastdist.data.synthetic --dataset {spec.name} DIR`") from None


def _default_val_batch(dataset: str, batch_per_rank: int) -> int:
    """One image per batch where the dataset's image sizes vary, else the per-rank training batch."""
    return 1 if get_dataset(dataset).varying_size else max(1, batch_per_rank)


def apply_dataset_recipe(ns: argparse.Namespace, argv: Sequence[str] | None) -> tuple[str, ...]:
    """Set the `DATASET_RECIPE_FLAGS` not given in ``argv`` to ``--dataset``'s recipe (in place) and
    return their names (pass them to `build_config`, which records them in config.json)."""
    unset = object()  # a default no command line can produce: the flag was left out
    probe = build_parser()
    probe.set_defaults(**dict.fromkeys(DATASET_RECIPE_FLAGS, unset))
    given = vars(probe.parse_args(argv))
    recipe = get_dataset(ns.dataset).recipe
    defaults = tuple(flag for flag in DATASET_RECIPE_FLAGS if given[flag] is unset)
    for flag in defaults:
        value = getattr(recipe, flag)
        setattr(ns, flag, list(value) if isinstance(value, tuple) else value)
    return defaults


def _check_numbers(cfg: RunConfig) -> None:
    optim, runtime = cfg.optim, cfg.runtime
    if optim.batch_size % runtime.world_size:
        raise ConfigError(f"--batch-size {optim.batch_size} (global) is not divisible by the "
                          f"{runtime.world_size} ranks; use a multiple of --nproc_per_node x nodes")
    sync_bn = runtime.device_type == "cuda" and runtime.world_size > 1
    if optim.batch_per_rank < 2 and not sync_bn:
        raise ConfigError(f"--batch-size {optim.batch_size} gives 1 image per rank: the BatchNorm after the "
                          "models' global pooling needs at least 2 (SyncBatchNorm over several GPUs "
                          f"excepted); use --batch-size {2 * runtime.world_size} or more")
    if cfg.schedule.stop_at is not None and cfg.schedule.stop_at > cfg.schedule.max_iterations:
        raise ConfigError(f"--stop-at {cfg.schedule.stop_at} is beyond --max-iterations "
                          f"{cfg.schedule.max_iterations}")


def _check_features(cfg: RunConfig) -> None:
    """The optional packages and devices the chosen speed and output flags need."""
    if cfg.distill.kd_backend == "triton" and cfg.model.distilled:
        _check_triton(cfg.runtime.device_type)
    if cfg.data.loader == "dali" and not dali_available():
        raise ConfigError(f"--loader dali: {DALI_HINT}")
    try:
        check_sliding_args(cfg.validation.eval_mode, cfg.data.crop_size, cfg.validation.eval_stride)
    except ValueError as err:
        raise ConfigError(f"validation windows: {err}") from None
    try:
        check_dashboards(cfg.paths.tensorboard, cfg.paths.wandb)
    except RuntimeError as err:
        raise ConfigError(str(err)) from None
    apex_missing = cfg.runtime.device_type != "cuda" or importlib.util.find_spec("apex") is None
    if cfg.optim.optimizer == "apex" and apex_missing:
        raise ConfigError("--optimizer apex needs a GPU and NVIDIA apex with its CUDA extensions "
                          "(https://github.com/NVIDIA/apex#installation); --optimizer sgd uses torch's fused "
                          "SGD, the same update rule")


def _check_triton(device_type: str) -> None:
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("--kd-backend triton: triton is not installed; use --kd-backend auto or torch")
    if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("--kd-backend triton needs a CUDA device (or the Triton interpreter, "
                          "TRITON_INTERPRET=1, for tests); use --kd-backend auto or torch on CPU")


def _with_resume_notes(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the notes on what changed since its ``--resume`` checkpoint (ConfigError if the
    recipe changed, `CheckpointFormatError` if the file is not a training checkpoint)."""
    resume = cfg.paths.resume
    if resume is None:
        return cfg
    if not os.path.isfile(resume):
        raise ConfigError(f"--resume {resume}: file not found (use --resume auto to continue only when "
                          "SAVE_DIR/latest.pth exists)")
    from fastdist.engine.checkpoint import read_saved_config

    notes = tuple(check_resume_compatible(read_saved_config(resume), cfg))
    return dataclasses.replace(cfg, paths=dataclasses.replace(cfg.paths, resume_notes=notes))


def parse_config(argv: Sequence[str] | None = None) -> RunConfig:
    """Parse, resolve and validate the command line; raises `ConfigError` (checks that take seconds at
    most: names, files, the dataset's pairs and file headers, the batch split, the resumed recipe)."""
    command = " ".join(["train.py", *(sys.argv[1:] if argv is None else argv)])
    ns = build_parser().parse_args(argv)
    recipe_defaults = apply_dataset_recipe(ns, argv)
    cfg = build_config(ns, command, dataset_defaults=recipe_defaults)
    _check_numbers(cfg)
    _check_features(cfg)
    _check_models(cfg.model)
    _check_files(cfg.model)
    cfg = _with_resume_notes(cfg)
    _check_save_dir(cfg.paths)
    for flag, directory in (("--save-dir", cfg.paths.save_dir), ("--log-dir", cfg.paths.log_dir)):
        check_writable_dir(directory, flag)
    _check_dataset(cfg)
    return cfg


def check_writable_dir(directory: str, flag: str) -> None:
    """Write (and fsync) a probe file in ``directory`` (creating it for the check only), so that a path
    that is a file, a folder without write permission or a full disk is a `ConfigError` naming ``flag``
    at start-up rather than a traceback at the first checkpoint or output file. Under torchrun only
    rank 0 writes the probe."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"{flag} {directory} exists and is not a folder; pick another {flag}")
    if os.environ.get("RANK", "0") != "0":
        return  # one probe per job: another rank's rmdir below could pull the folder from under this one
    created = []  # the folders this check makes, deepest first: removed again, the check leaves nothing
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    probe = os.path.join(directory, f".fastdist-write-probe.tmp.{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        _write_file(probe, b"\0" * 4096)  # a block, so that a full disk fails here and not at a checkpoint
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"{flag} {directory} is not writable: {err.strerror or err} "
                          "(check its permissions and free space, or pick another folder)") from None
    finally:
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def _write_file(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it; on any error the partial file is removed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.remove(path)
        raise
    os.close(fd)


_TEMP_NAME = re.compile(r"\.tmp\.(\d+)$")  # what atomic writes (checkpoints, config.json) leave behind


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a reused pid: this process has written nothing yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temp_files(directory: str) -> list[str]:
    """Delete ``*.tmp.<pid>`` files of killed writers (their pid is gone) in ``directory``; return them."""
    removed = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return removed
    for name in names:
        match = _TEMP_NAME.search(name)
        path = os.path.join(directory, name)
        if match and os.path.isfile(path) and not _pid_alive(int(match.group(1))):
            try:
                os.remove(path)
            except FileNotFoundError:
                continue
            removed.append(path)
    return removed


def _check_save_dir(paths: PathsConfig) -> None:
    """A new run never silently replaces the checkpoints of an earlier run in its save dir."""
    if paths.resume is not None or paths.overwrite:
        return
    found = [name for name in ("latest.pth", "best.pth")
             if os.path.isfile(os.path.join(paths.save_dir, name))]
    if found:
        hint = "continue it with --resume auto, " if "latest.pth" in found else ""
        raise ConfigError(f"--save-dir {paths.save_dir} already holds a run ({', '.join(found)}): {hint}"
                          "start over in it with --overwrite (replaces its checkpoints), or pick another "
                          "--save-dir")


def check_resume_compatible(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Raise `ConfigError` if the recipe differs from the checkpoint's config ``saved`` (a `config_dict`);
    return notes on other changes."""
    saved, now = {**RECIPE_KEY_DEFAULTS, **saved}, config_dict(cfg)
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in RECIPE_KEYS
             if saved.get(k) != now[k]]
    if diffs:
        listing = "\n  ".join(diffs)
        raise ConfigError(f"--resume {cfg.paths.resume} was trained with a different recipe:\n  {listing}\n"
                          "Re-run with the checkpoint's values (its config.json lists them) or start a new "
                          "run without --resume.")
    notes = _input_changes(saved, now)
    if saved.get("world_size") != now["world_size"]:
        notes.append(f"world size changed ({saved.get('world_size')} -> {now['world_size']}): the global "
                     "batch is the same but data order and random streams differ from an uninterrupted run")
    for key in ("amp", "val_amp", "optimizer", "compile", "channels_last", "loader", "kd_backend"):
        if key in saved and saved[key] != now[key]:
            notes.append(f"{key} changed: {saved[key]!r} -> {now[key]!r}")
    return notes


def _input_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Inputs outside the recipe keys that still change the run: the teacher weights and the dataset."""
    notes = []
    old_path, new_path = saved.get("teacher_pretrained"), now["teacher_pretrained"]
    old_sha, new_sha = saved.get("teacher_sha256"), now["teacher_sha256"]
    # the contents decide where both are known (a moved copy is the same teacher), else the path
    if (old_sha != new_sha) if old_sha and new_sha else (old_path != new_path):
        what = (f"{old_path!r} -> {new_path!r}" if old_path != new_path
                else f"{new_path} holds other weights than when the run started")
        digest = f" (sha256 {old_sha[:12]} -> {new_sha[:12]})" if old_sha and new_sha else ""
        notes.append(f"--teacher-pretrained changed: {what}{digest}; the distillation target differs from "
                     "the run so far")
    # checkpoints from before data_root was saved: their --data, relative to today's working directory
    saved_root = saved.get("data_root") or os.path.realpath(saved.get("data", ""))
    if saved_root != now["data_root"]:
        notes.append(f"--data changed: {saved_root!r} -> {now['data_root']!r}; training continues on other "
                     "data")
    return notes


def validation_precision(cfg: RunConfig) -> str:
    """``"bf16"``/``"fp16"`` when training validation runs under the training autocast (``--val-amp``),
    else ``"fp32"`` (the reference metric, the default)."""
    amp = cfg.runtime.amp
    return amp if cfg.validation.val_amp and amp != "off" else "fp32"


def recipe_warnings(cfg: RunConfig) -> list[str]:
    """Settings that are valid here but make the run differ from the reference recipe it mirrors."""
    warnings = []
    tau = cfg.distill.kd_temperature
    if cfg.model.distilled and cfg.distill.kd_method == "dist" and tau != 1:
        warnings.append(f"--kd-temperature {tau}: the reference segmentation recipe (DIST_KD "
                        "train_kd.py) parses this flag but never uses it (its DIST has no temperature), so "
                        "a reference run with it trains with tau = 1; here the logits are divided by "
                        f"{tau}")
    return warnings


def config_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved configuration as one flat dict of plain JSON values: every part's fields (their
    names are the flags'), what ``config.json`` and every checkpoint store."""
    flat: dict[str, Any] = {}
    for part in dataclasses.fields(cfg):
        flat.update(dataclasses.asdict(getattr(cfg, part.name)))
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def save_config(cfg: RunConfig, directory: str) -> str:
    """Write ``config.json`` (atomically) into ``directory``; return its path. A failure (disk full,
    permissions) is a `ConfigError` and leaves no temporary file."""
    path = os.path.join(directory, "config.json")
    tmp = f"{path}.tmp.{os.getpid()}"
    text = json.dumps(config_dict(cfg), indent=2, sort_keys=True) + "\n"
    try:
        os.makedirs(directory, exist_ok=True)
        _write_file(tmp, text.encode())  # removes the partial file on failure
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ConfigError(f"could not write {path}: {err.strerror or err} (check free space and "
                          "permissions of that folder)") from None
    return path
