"""Command line of ``train.py``: argparse groups, validation that fails in seconds, resolved config.

The flags and defaults are those of the reference ``train_kd.py`` (DIST_KD / CIRKD), so its scripts
run unchanged; ``--teacher-model none`` is the reference ``train_baseline.py``. The speed flags
(``--amp``, ``--channels-last``, ``--compile``, ``--loader``, ``--kd-backend``, ``--optimizer``) default
to the fast setting for the device and can each be switched off for ablations.

`parse_config` validates everything that is cheap to validate (names, files, the dataset layout, the
batch split) before any heavy start-up and raises `ConfigError` with a message that says what to do.
`resolve` turns the ``None`` ("auto") defaults into concrete values; the result is what is saved as
``config.json`` beside the checkpoints and inside every checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from fastdist.data import DALI_HINT, dali_available, default_backend

__all__ = ["ConfigError", "RECIPE_KEYS", "build_parser", "check_resume_compatible", "config_dict",
           "parse_config", "resolve", "save_config"]

# Flags that define the training problem: a checkpoint resumes only under the same values
# (everything else -- speed flags, paths, intervals -- may change between the two runs).
RECIPE_KEYS: tuple[str, ...] = (
    "teacher_model", "teacher_backbone", "student_model", "student_backbone", "crop_size",
    "batch_size", "max_iterations", "lr", "momentum", "weight_decay", "lambda_kd", "kd_temperature",
    "kd_beta", "kd_gamma", "kd_mask", "kd_intra_sync", "seed", "kd_method",
)  # fmt: skip

# --kd-method: (loss weight --lambda-kd, temperature --kd-temperature) when not given. dist: the DIST
# recipe; kd and cwd: CIRKD's Cityscapes scripts (train_kd.py --lambda-kd 1.0, --kd-temperature
# default 1.0; --lambda-cwd-logit 3.0 with the CWD logit criterion's temperature 4.0).
KD_METHOD_DEFAULTS: dict[str, tuple[float, float]] = {"dist": (1.0, 1.0), "kd": (1.0, 1.0), "cwd": (3.0, 4.0)}

_NONE_STRINGS = ("", "none", "None")


class ConfigError(ValueError):
    """A command line that cannot run; the message says what to change."""


def _optional_path(value: str) -> str | None:
    """Reference scripts pass the string 'None' for "no file"."""
    return None if value in _NONE_STRINGS else value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    """The ``train.py`` argument parser (reference-compatible flags first in each group)."""
    p = argparse.ArgumentParser(
        prog="train.py",
        description="DIST knowledge distillation for semantic segmentation on Cityscapes "
        "(torchrun --nproc_per_node=N train.py ...). --teacher-model none trains a model alone.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    g.add_argument("--data", default="data/cityscapes", help="Cityscapes root (leftImg8bit/, gtFine/)")
    g.add_argument("--crop-size", type=_positive_int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    g.add_argument("--workers", "-j", type=_non_negative_int, default=16,
                   help="loader threads (DALI) or worker processes (torch; 0 = in the main process) per rank")
    g.add_argument("--loader", choices=("dali", "torch"), default=None,
                   help="data pipeline (default: dali on CUDA when DALI is installed, else torch)")
    g.add_argument("--val-batch-size", type=_positive_int, default=None,
                   help="validation images per rank and batch (default: the per-rank training batch)")
    g.add_argument("--dataset", default="citys", choices=("citys",), help="reference flag (Cityscapes only)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=_positive_int, default=16, help="global batch, split over ranks")
    g.add_argument("--max-iterations", type=_positive_int, default=40000)
    g.add_argument("--lr", type=float, default=0.02)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--optimizer", choices=("sgd", "apex"), default="sgd",
                   help="sgd: torch SGD (fused on CUDA/CPU); apex: NVIDIA apex FusedSGD")
    g.add_argument("--seed", type=int, default=0, help="model init, dropout and data order")

    g = p.add_argument_group("distillation")
    g.add_argument("--kd-method", choices=tuple(KD_METHOD_DEFAULTS), default="dist",
                   help="distillation loss on the logits: DIST, pixel-wise KD or channel-wise CWD")
    g.add_argument("--lambda-kd", type=float, default=None,
                   help="loss weight (default per --kd-method: dist 1, kd 1, cwd 3)")
    g.add_argument("--kd-temperature", type=float, default=None,
                   help="temperature (default per --kd-method: dist 1, kd 1, cwd 4)")
    g.add_argument("--kd-beta", type=float, default=1.0, help="DIST inter-class (row) weight")
    g.add_argument("--kd-gamma", type=float, default=1.0, help="DIST intra-class (column) weight")
    g.add_argument("--kd-backend", choices=("auto", "triton", "torch", "reference"), default="auto")
    g.add_argument("--kd-mask", choices=("none", "pad", "ignore"), default="none",
                   help="pixels left out of the DIST loss: crop padding, or every ignore-label pixel")
    g.add_argument("--kd-intra-sync", action="store_true",
                   help="intra-class relation over the global batch (one small all-reduce per loss)")

    g = p.add_argument_group("performance")
    g.add_argument("--device", default="auto", help="auto, cuda or cpu (cpu: gloo, for tests)")
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), default=None,
                   help="autocast dtype (default: bf16 on GPUs that have it, else fp16; off on CPU)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last model and data (default: on for CUDA)")
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
    g.add_argument("--val-per-iters", type=_positive_int, default=400)
    g.add_argument("--save-per-iters", type=_positive_int, default=400)
    g.add_argument("--skip-val", action="store_true")
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


def _check_models(cfg: argparse.Namespace) -> None:
    from fastdist.models import VALID_COMBINATIONS

    pairs = [("student", cfg.student_model, cfg.student_backbone)]
    if cfg.teacher_model is not None:
        pairs.append(("teacher", cfg.teacher_model, cfg.teacher_backbone))
    for role, model, backbone in pairs:
        if backbone not in VALID_COMBINATIONS.get(model, ()):
            valid = "; ".join(f"{m} on {', '.join(bs)}" for m, bs in VALID_COMBINATIONS.items())
            raise ConfigError(f"unknown {role} model {model!r} on backbone {backbone!r}. "
                              f"Use --{role}-model/--{role}-backbone from: {valid}")


def _check_files(cfg: argparse.Namespace) -> None:
    for flag in ("teacher_pretrained", "teacher_pretrained_base", "student_pretrained",
                 "student_pretrained_base"):
        path = getattr(cfg, flag)
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"--{flag.replace('_', '-')} {path}: file not found")
    teacher_weights = cfg.teacher_pretrained or cfg.teacher_pretrained_base or cfg.random_teacher
    if cfg.teacher_model is None and teacher_weights:
        raise ConfigError("--teacher-pretrained / --teacher-pretrained-base given with --teacher-model none "
                          "(no teacher, no distillation): name the teacher with --teacher-model/"
                          "--teacher-backbone, or drop the teacher weights")
    if cfg.teacher_model is not None and cfg.teacher_pretrained is None and not cfg.random_teacher:
        raise ConfigError(
            "distilling needs the teacher's weights: pass --teacher-pretrained PATH (train a teacher with "
            "--teacher-model none), or --teacher-pretrained none for a random teacher (benchmarks only)")


def _check_dataset(cfg: argparse.Namespace) -> None:
    from fastdist.data import check_dataset
    from fastdist.data.cityscapes import DatasetError

    splits = ["train"] + ([] if cfg.skip_val else ["val"])
    for split in splits:
        try:
            check_dataset(cfg.data, split, rank=int(os.environ.get("RANK", "0")), world_size=cfg.world_size)
        except DatasetError as err:
            raise ConfigError(f"dataset {cfg.data!r} ({split}): {err}. Point --data at a Cityscapes root "
                              "(leftImg8bit/ and gtFine/), or make a synthetic one with "
                              "`python -m fastdist.data.synthetic DIR`") from None


def _check_numbers(cfg: argparse.Namespace) -> None:
    if cfg.batch_size % cfg.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} (global) is not divisible by the {cfg.world_size} "
                          "ranks; use a multiple of --nproc_per_node x nodes")
    sync_bn = cfg.device_type == "cuda" and cfg.world_size > 1
    if cfg.batch_per_rank < 2 and not sync_bn:
        raise ConfigError(f"--batch-size {cfg.batch_size} gives 1 image per rank: the BatchNorm after the "
                          "models' global pooling needs at least 2 (SyncBatchNorm over several GPUs "
                          f"excepted); use --batch-size {2 * cfg.world_size} or more")
    for flag in ("momentum", "weight_decay", "lambda_kd", "kd_beta", "kd_gamma"):
        if not getattr(cfg, flag) >= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(cfg, flag)}")
    if cfg.stop_at is not None and cfg.stop_at > cfg.max_iterations:
        raise ConfigError(f"--stop-at {cfg.stop_at} is beyond --max-iterations {cfg.max_iterations}")
    if cfg.lr <= 0 or cfg.kd_temperature <= 0:
        raise ConfigError("--lr and --kd-temperature must be positive")
    if cfg.loader == "dali" and not dali_available():
        raise ConfigError(f"--loader dali: {DALI_HINT}")
    if cfg.optimizer == "apex" and (cfg.device_type != "cuda" or importlib.util.find_spec("apex") is None):
        raise ConfigError("--optimizer apex needs a GPU and NVIDIA apex with its CUDA extensions "
                          "(https://github.com/NVIDIA/apex#installation); --optimizer sgd uses torch's fused "
                          "SGD, the same update rule")


def resolve(cfg: argparse.Namespace) -> argparse.Namespace:
    """Fill in the device-dependent defaults and derived values (in place; returns ``cfg``)."""
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda but CUDA is not available here; use --device cpu")
    cfg.device_type = "cuda" if cuda else "cpu"
    if cfg.amp is None:
        cfg.amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
    if cfg.channels_last is None:
        cfg.channels_last = cuda
    if cfg.compile is None:
        cfg.compile = cuda
    if cfg.loader is None:
        cfg.loader = default_backend(cfg.device_type)
    lambda_kd, temperature = KD_METHOD_DEFAULTS[cfg.kd_method]
    cfg.lambda_kd = lambda_kd if cfg.lambda_kd is None else cfg.lambda_kd
    cfg.kd_temperature = temperature if cfg.kd_temperature is None else cfg.kd_temperature
    if cfg.kd_intra_sync and cfg.kd_method != "dist":
        raise ConfigError(f"--kd-intra-sync is a DIST option; --kd-method {cfg.kd_method} has no "
                          "batch-wide term")
    cfg.world_size = _world_size()
    cfg.batch_per_rank = cfg.batch_size // cfg.world_size
    if cfg.val_batch_size is None:
        cfg.val_batch_size = max(1, cfg.batch_per_rank)
    kind = "kd" if cfg.teacher_model is not None else "baseline"
    if cfg.save_dir is None:
        cfg.save_dir = os.path.join("runs", f"{kind}_{cfg.student_model}_{cfg.student_backbone}")
    cfg.save_dir = os.path.expanduser(cfg.save_dir)
    cfg.log_dir = os.path.expanduser(cfg.log_dir) if cfg.log_dir else cfg.save_dir
    if cfg.resume == "auto":
        latest = os.path.join(cfg.save_dir, "latest.pth")
        cfg.resume = latest if os.path.isfile(latest) else None
    cfg.crop_size = list(cfg.crop_size)
    cfg.torch_version = str(torch.__version__)
    return cfg


def parse_config(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse, resolve and validate the command line; raises `ConfigError` (checks that take seconds at
    most: names, files, the dataset's pairs and file headers, the batch split)."""
    cfg = build_parser().parse_args(argv)
    cfg.command = " ".join(["train.py", *(sys.argv[1:] if argv is None else argv)])
    if cfg.teacher_model in _NONE_STRINGS:
        cfg.teacher_model = None
        cfg.teacher_backbone = None
    # "--teacher-pretrained none" asks for a random teacher; leaving the flag out is an error with a teacher.
    cfg.random_teacher = cfg.teacher_pretrained in _NONE_STRINGS
    if cfg.random_teacher:
        cfg.teacher_pretrained = None
    resolve(cfg)
    _check_numbers(cfg)
    _check_models(cfg)
    _check_files(cfg)
    if cfg.resume is not None and not os.path.isfile(cfg.resume):
        raise ConfigError(f"--resume {cfg.resume}: file not found (use --resume auto to continue only when "
                          "SAVE_DIR/latest.pth exists)")
    _check_save_dir(cfg)
    _check_dataset(cfg)
    return cfg


def _check_save_dir(cfg: argparse.Namespace) -> None:
    """A new run never silently replaces the checkpoints of an earlier run in its save dir."""
    if cfg.resume is not None or cfg.overwrite:
        return
    found = [name for name in ("latest.pth", "best.pth") if os.path.isfile(os.path.join(cfg.save_dir, name))]
    if found:
        hint = "continue it with --resume auto, " if "latest.pth" in found else ""
        raise ConfigError(f"--save-dir {cfg.save_dir} already holds a run ({', '.join(found)}): {hint}"
                          "start over in it with --overwrite (replaces its checkpoints), or pick another "
                          "--save-dir")


def check_resume_compatible(saved: dict[str, Any], cfg: argparse.Namespace) -> list[str]:
    """Raise `ConfigError` if the recipe differs from the checkpoint's; return notes on other changes."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(cfg, k)!r}" for k in RECIPE_KEYS
             if _normal(saved.get(k)) != _normal(getattr(cfg, k))]
    if diffs:
        listing = "\n  ".join(diffs)
        raise ConfigError(f"--resume {cfg.resume} was trained with a different recipe:\n  {listing}\n"
                          "Re-run with the checkpoint's values (its config.json lists them) or start a new "
                          "run without --resume.")
    notes = []
    if saved.get("world_size") != cfg.world_size:
        notes.append(f"world size changed ({saved.get('world_size')} -> {cfg.world_size}): the global "
                     "batch is the same but data order and random streams differ from an uninterrupted run")
    for key in ("amp", "optimizer", "compile", "channels_last", "loader", "kd_backend"):
        if key in saved and saved[key] != getattr(cfg, key):
            notes.append(f"{key} changed: {saved[key]!r} -> {getattr(cfg, key)!r}")
    return notes


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_dict(cfg: argparse.Namespace) -> dict[str, Any]:
    """The resolved configuration as plain JSON values (also what checkpoints store)."""
    return json.loads(json.dumps(vars(cfg), sort_keys=True, default=str))


def save_config(cfg: argparse.Namespace, directory: str) -> str:
    """Write ``config.json`` (atomically) into ``directory``; return its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "config.json")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(config_dict(cfg), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path
