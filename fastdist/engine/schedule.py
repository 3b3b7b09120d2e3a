"""When things happen: the poly learning rate of the reference recipe, and what each iteration does.

`plan(it, schedule)` is the whole timetable of the training loop as one pure function of the
iteration ``it`` (1-based: ``it`` optimisation steps are done) and the `ScheduleConfig`:

* ``check``: a sync point, where the host reads the device-side loss sums and agrees with the other
  ranks on preemption signals and non-finite values (every ``--check-every`` iterations and at every
  iteration that logs, saves, validates or stops);
* ``log``: every ``--log-iter`` iterations and at the run's last iteration;
* ``validate``: every ``--val-per-iters`` iterations and at ``--max-iterations`` (never with
  ``--skip-val``);
* ``export``: the final reference export, at ``--max-iterations``;
* ``save``: ``latest.pth``, every ``--save-per-iters`` iterations and wherever the iteration validates,
  exports or stops (written *before* validating, with what it still owes, so a failure there loses no
  training);
* ``stop``: at the run's last iteration (``--stop-at``, else ``--max-iterations``).

A run resumed at iteration ``k`` executes ``plan(k + 1, ...)`` onwards: the same actions at the same
iterations as an uninterrupted run. A preemption signal (seen at a ``check``) adds save and stop at
that iteration; that is the loop's decision, not the plan's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch.optim import Optimizer

if TYPE_CHECKING:
    from fastdist.engine.config import ScheduleConfig

__all__ = ["MIN_LR", "StepActions", "plan", "poly_lr", "set_lr"]

MIN_LR = 1e-4  # the reference's floor: lr never drops below it


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float = 0.9) -> float:
    """``1e-4 + (base_lr - 1e-4) * (1 - iteration / max_iterations) ** power``.

    ``iteration`` counts completed steps (0 for the first step), as in the reference ``adjust_lr``.
    """
    frac = min(max(iteration / max_iterations, 0.0), 1.0)
    return MIN_LR + (base_lr - MIN_LR) * (1.0 - frac) ** power


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate (a Python float: no device work, no sync)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass(frozen=True)
class StepActions:
    """What the loop does after the optimisation step of one iteration (see the module docstring)."""

    check: bool = False
    log: bool = False
    save: bool = False
    validate: bool = False
    export: bool = False
    stop: bool = False

    @property
    def owed(self) -> tuple[str, ...]:
        """The work after the save, in order, as a checkpoint records it (``checkpoint.OWED``)."""
        return (("validate",) if self.validate else ()) + (("export",) if self.export else ())


def plan(it: int, schedule: ScheduleConfig) -> StepActions:
    """The actions of iteration ``it`` (1-based) under ``schedule``; a pure function."""
    s = schedule
    if not 1 <= it <= s.end:
        raise ValueError(f"iteration {it} is outside this run's 1..{s.end}")
    last = it == s.end
    log = it % s.log_iter == 0 or last
    validate = not s.skip_val and (it % s.val_per_iters == 0 or it == s.max_iterations)
    export = it == s.max_iterations
    save = it % s.save_per_iters == 0 or validate or export or last
    check = it % s.check_every == 0 or log or save
    return StepActions(check=check, log=log, save=save, validate=validate, export=export, stop=last)
