"""`fastdist.engine.schedule.plan`: what the training loop does at each iteration, without a model.

Every expected table below is written out by hand from the rules in the module docstring.
"""

from __future__ import annotations

import pytest

from fastdist.engine.config import ScheduleConfig
from fastdist.engine.schedule import StepActions, plan

ACTIONS = ("check", "log", "save", "validate", "export", "stop")


def _schedule(**overrides: object) -> ScheduleConfig:
    values = dict(max_iterations=10, stop_at=None, log_iter=4, check_every=3, save_per_iters=6,
                  val_per_iters=7, skip_val=False)
    values.update(overrides)
    return ScheduleConfig(**values)  # type: ignore[arg-type]


def _table(schedule: ScheduleConfig, first: int = 1) -> dict[int, str]:
    """iteration -> the actions that are on, as a space-separated string (iterations with none left out)."""
    rows = {}
    for it in range(first, schedule.end + 1):
        actions = plan(it, schedule)
        on = " ".join(name for name in ACTIONS if getattr(actions, name))
        if on:
            rows[it] = on
    return rows


def test_periods_that_do_not_divide_max_iterations() -> None:
    # checks every 3, logs every 4, saves every 6, validates every 7, all up to 10; the last iteration
    # (10) logs, validates, exports, saves and stops although no period divides it
    assert _table(_schedule()) == {
        3: "check",
        4: "check log",
        6: "check save",
        7: "check save validate",
        8: "check log",
        9: "check",
        10: "check log save validate export stop",
    }


def test_stop_at_ends_the_run_early_without_the_final_work() -> None:
    # --stop-at 5 of 10: iteration 5 logs, saves and stops; validation and export stay with iteration 10
    schedule = _schedule(stop_at=5)
    assert schedule.end == 5
    assert _table(schedule) == {3: "check", 4: "check log", 5: "check log save stop"}


def test_skip_val_and_period_one() -> None:
    schedule = _schedule(max_iterations=3, log_iter=1, check_every=1, save_per_iters=100, val_per_iters=1,
                         skip_val=True)
    assert _table(schedule) == {1: "check log", 2: "check log", 3: "check log save export stop"}


def test_validation_period_beyond_the_run_still_validates_the_last_iteration() -> None:
    schedule = _schedule(max_iterations=5, log_iter=100, check_every=100, save_per_iters=100,
                         val_per_iters=400)
    assert _table(schedule) == {5: "check log save validate export stop"}


def test_a_resumed_run_sees_the_same_plan_as_an_uninterrupted_one() -> None:
    straight = _table(_schedule())
    first_part = _table(_schedule(stop_at=6))
    resumed = _table(_schedule(), first=7)  # continued from the checkpoint of iteration 6
    assert first_part == {3: "check", 4: "check log", 6: "check log save stop"}  # 6 also logs: it ends
    assert resumed == {it: on for it, on in straight.items() if it > 6}


def test_owed_work_is_in_checkpoint_order() -> None:
    last = plan(10, _schedule())
    assert last.owed == ("validate", "export")
    assert plan(7, _schedule()).owed == ("validate",) and plan(6, _schedule()).owed == ()
    assert StepActions(export=True).owed == ("export",)


@pytest.mark.parametrize("it", [0, 11, -1])
def test_iterations_outside_the_run_are_refused(it: int) -> None:
    with pytest.raises(ValueError, match=f"iteration {it} is outside this run's 1..10"):
        plan(it, _schedule())
