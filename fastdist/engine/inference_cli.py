"""The command-line preparation eval.py and predict.py share: their common flags, the checkpoint
loaded into its model, and one start-up path (`prepare_inference`).

Every user error (unknown model, a checkpoint that does not fit, a missing dataset, an unusable
``--save-dir``, ``--device cuda`` without CUDA) is an `InferenceSetupError` (or the `ConfigError` /
`DatasetError` of the check that found it) with a clear message, raised before any heavy start-up:
the process group, the device transfer and the data pipeline start last.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from fastdist.data import DatasetError
from fastdist.engine.config import SCALE_RANGE, ConfigError, check_writable_dir, finite_scale
from fastdist.engine.distributed import DistEnv, DistributedSetupError, cleanup_distributed, setup_distributed
from fastdist.engine.finite import NonFiniteLogitsError
from fastdist.engine.runtime import Runtime, add_runtime_args, resolve_runtime, to_device

__all__ = ["InferenceRun", "InferenceSetupError", "add_inference_args", "build_inference_model",
           "check_model_name", "prepare_inference", "run_command"]


class InferenceSetupError(RuntimeError):
    """A model, backbone, checkpoint or option that cannot be used; the message says why."""


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """The options eval.py and predict.py share: model, checkpoint, data, test-time augmentation, and
    ``--device`` / ``--amp`` / ``--channels-last`` as train.py spells them (``--amp`` defaults to off:
    fp32 scores, like training validation's default)."""
    parser.add_argument("--model", required=True, help="deeplabv3 | psp | deeplab_mobile | psp_mobile")
    parser.add_argument("--backbone", required=True, help="resnet18 | resnet50 | resnet101 | mobilenetv2")
    parser.add_argument("--data", required=True, help="dataset root (the --dataset's layout)")
    from fastdist.data import DATASET_NAMES

    parser.add_argument("--dataset", default="citys", choices=DATASET_NAMES,
                        help="dataset: layout, label map, classes (the model's), palette")
    parser.add_argument("--pretrained", required=True, help="model checkpoint")
    parser.add_argument("--scales", type=finite_scale, nargs="+", default=[1.0],
                        help=f"test scales in [{SCALE_RANGE[0]}, {SCALE_RANGE[1]}], e.g. 0.75 1.0 1.25")
    parser.add_argument("--flip-eval", action="store_true", help="average with horizontally flipped input")
    add_runtime_args(parser, amp_default="off")


def check_model_name(model: str, backbone: str) -> None:
    """Raise `InferenceSetupError` for a model/backbone pair `build_model` does not build."""
    from fastdist.models import VALID_COMBINATIONS

    if model not in VALID_COMBINATIONS:
        raise InferenceSetupError(f"unknown --model {model!r}; choose from {', '.join(VALID_COMBINATIONS)}")
    if backbone not in VALID_COMBINATIONS[model]:
        raise InferenceSetupError(
            f"--model {model} does not take --backbone {backbone!r}; "
            f"choose from {', '.join(VALID_COMBINATIONS[model])}"
        )


def _short(text: str, limit: int = 700) -> str:
    return text if len(text) <= limit else text[:limit] + " ..."


def build_inference_model(model: str, backbone: str, checkpoint: str, num_classes: int = 19) -> nn.Module:
    """Build ``model``/``backbone`` on the CPU, load ``checkpoint`` strictly and return it in eval mode.

    Whether the auxiliary head is built follows the checkpoint (``auxlayer.*`` keys), so reference
    checkpoints with one and student checkpoints without one both load strictly.
    """
    from fastdist.models import CheckpointError, build_model, load_checkpoint
    from fastdist.models.checkpoint import read_state_dict

    check_model_name(model, backbone)
    try:
        state = read_state_dict(checkpoint)
    except FileNotFoundError as exc:
        raise InferenceSetupError(f"checkpoint {checkpoint} does not exist") from exc
    except CheckpointError as exc:
        raise InferenceSetupError(_short(str(exc))) from exc
    has_aux = any(key.startswith("auxlayer.") for key in state)
    try:
        net = build_model(model, backbone, num_classes=num_classes, aux=has_aux)
    except ValueError:  # no auxiliary head on this backbone: the strict load below reports the keys
        net = build_model(model, backbone, num_classes=num_classes)
    try:
        load_checkpoint(net, state)
    except CheckpointError as exc:
        raise InferenceSetupError(
            f"checkpoint {checkpoint} does not fit --model {model} --backbone {backbone} "
            f"({num_classes} classes): {_short(str(exc))}"
        ) from exc
    return net.eval()


@dataclass(frozen=True)
class InferenceRun:
    """What `prepare_inference` started: the model on the device (eval mode), the process, the
    resolved runtime flags and every (image, label) pair of the split (all ranks)."""

    model: nn.Module
    env: DistEnv
    runtime: Runtime
    pairs: list[Any]

    @property
    def shard(self) -> list[Any]:
        """This rank's pairs (every world_size-th from its rank on)."""
        return self.pairs[self.env.rank :: self.env.world_size]


def prepare_inference(args: argparse.Namespace,
                      check: Callable[[argparse.Namespace], None] | None = None) -> InferenceRun:
    """Resolve the runtime flags, check ``--save-dir`` (when given) and anything ``check`` adds, list the
    split's pairs, load the checkpoint, then start the process group and move the model to the device."""
    from fastdist.data import get_dataset, list_pairs

    try:
        runtime = resolve_runtime(args.device, args.amp, args.channels_last)
    except ValueError as err:
        raise InferenceSetupError(str(err)) from None
    if args.save_dir:  # a file, no permission, a full disk: before the model and the work
        check_writable_dir(args.save_dir, "--save-dir")
    if check is not None:
        check(args)
    spec = get_dataset(args.dataset)
    pairs = list_pairs(args.data, args.split, dataset=spec)
    model = build_inference_model(args.model, args.backbone, args.pretrained, spec.num_classes)
    env = setup_distributed(runtime.device)
    return InferenceRun(to_device(model, env.device, runtime.channels_last), env, runtime, pairs)


# what an entry point reports in one line; the others are bugs and keep their traceback
_COMMAND_ERRORS = (ConfigError, DatasetError, InferenceSetupError, DistributedSetupError,
                   NonFiniteLogitsError)


def run_command(prog: str, run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Exit status of eval.py / predict.py: 0, 2 on a user error (bad flag, data, checkpoint or
    distributed setup), 1 when the model's logits are not finite (no score, no PNGs); such an error is
    one line on stderr, after which the process group is torn down."""
    try:
        run(args)
    except _COMMAND_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        cleanup_distributed()
        return 1 if isinstance(exc, NonFiniteLogitsError) else 2
    return 0
