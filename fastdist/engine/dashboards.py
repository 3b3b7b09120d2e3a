"""Optional dashboards: TensorBoard event files and Weights & Biases, fed from `RunLogger.record`.

Every ``train`` / ``val`` / ``model_cost`` record that goes to ``metrics.jsonl`` is forwarded here with
the same host-side numbers (no extra device sync: the trainer computes them at its sync points):

* ``train/task_loss``, ``train/kd_loss``, ``train/lr``, ``train/images_per_s``, ``train/data_ms``,
  ``train/step_ms``, ``train/peak_mem_gib`` (CUDA only) at the logged iteration;
* ``val/mIoU``, ``val/pixAcc``, ``val/best_mIoU`` and ``val/IoU/<class>`` at the validation iteration;
* the model cost (parameters, GFLOPs) as ``model/<role>/params`` and ``model/<role>/gflops`` at step 0.

Only rank 0 has an enabled `RunLogger`, so only rank 0 writes. Both back-ends are optional packages
(``pip install -e ".[dashboards]"``); `check_dashboards` fails at start-up with the install command
when one is asked for and missing.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastdist.engine.config import RunConfig

__all__ = ["Dashboards", "add_dashboard_args", "check_dashboards", "dashboard_scalars", "open_dashboards"]

_INSTALL = 'pip install -e ".[dashboards]"'
_TRAIN_KEYS = ("task_loss", "kd_loss", "lr", "images_per_s", "data_ms", "step_ms", "peak_mem_gib")
_VAL_KEYS = ("mIoU", "pixAcc", "best_mIoU")


def add_dashboard_args(parser: argparse._ActionsContainer) -> None:
    """``--tensorboard`` and ``--wandb PROJECT``."""
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write TensorBoard event files into the log dir (needs tensorboard)")
    parser.add_argument("--wandb", default=None, metavar="PROJECT",
                        help="also log to Weights & Biases project PROJECT (needs wandb; WANDB_MODE=offline "
                        "works without an account)")


def check_dashboards(tensorboard: bool, wandb_project: str | None) -> None:
    """RuntimeError naming the missing package when a requested back-end is not installed."""
    for wanted, module, flag in ((tensorboard, "tensorboard", "--tensorboard"),
                                 (wandb_project is not None, "wandb", "--wandb")):
        if wanted and importlib.util.find_spec(module) is None:
            raise RuntimeError(f"{flag} needs the {module!r} package, which is not installed: {_INSTALL}")


def dashboard_scalars(kind: str, fields: Mapping[str, Any],
                      class_names: Sequence[str]) -> tuple[int, dict[str, float]] | None:
    """``(step, {tag: value})`` for one metrics.jsonl record, or None for records not plotted."""
    if kind == "model_cost":
        return 0, {f"model/{role}/{key}": float(cost[key]) for role, cost in fields["models"].items()
                   for key in ("params", "gflops")}
    keys = {"train": _TRAIN_KEYS, "val": _VAL_KEYS}.get(kind)
    if keys is None or "iteration" not in fields:
        return None
    scalars = {f"{kind}/{k}": float(fields[k]) for k in keys if fields.get(k) is not None}
    if kind == "val":
        ious = zip(class_names, fields["IoU"], strict=True)
        # None / NaN: a class absent from the split
        scalars.update({f"val/IoU/{name}": float(v) for name, v in ious if v is not None and v == v})
    return int(fields["iteration"]), scalars


class Dashboards:
    """The requested back-ends for one run (rank 0); `record` forwards one metrics record to each."""

    def __init__(self, log_dir: str, tensorboard: bool, wandb_project: str | None,
                 config: Mapping[str, Any] | None = None, class_names: Sequence[str] = ()) -> None:
        check_dashboards(tensorboard, wandb_project)
        self.class_names = tuple(class_names)
        self._tb = self._wandb_run = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=log_dir)
        if wandb_project is not None:
            import wandb

            self._wandb_run = wandb.init(project=wandb_project, dir=log_dir, config=dict(config or {}),
                                         name=str((config or {}).get("save_dir", "")) or None)

    @property
    def active(self) -> bool:
        return self._tb is not None or self._wandb_run is not None

    def record(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Forward one record (host floats already; never touches a device)."""
        item = dashboard_scalars(kind, fields, self.class_names)
        if item is None or not item[1]:
            return
        step, scalars = item
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, global_step=step)
        if self._wandb_run is not None:
            self._wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def open_dashboards(cfg: RunConfig, is_main: bool) -> Dashboards | None:
    """The run's dashboards on the main rank when ``--tensorboard`` / ``--wandb`` ask for any (the run's
    `config_dict` goes to wandb's config)."""
    paths = cfg.paths
    if not is_main or not (paths.tensorboard or paths.wandb is not None):
        return None
    from fastdist.data import get_dataset
    from fastdist.engine.config import config_dict

    class_names = get_dataset(cfg.data.dataset).class_names
    return Dashboards(paths.log_dir, paths.tensorboard, paths.wandb, config_dict(cfg), class_names)
