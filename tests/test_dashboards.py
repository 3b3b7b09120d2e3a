"""--tensorboard / --wandb: the metrics.jsonl records arrive in the back-ends with the same numbers."""

from __future__ import annotations

import math

import pytest

from fastdist.engine.dashboards import Dashboards, check_dashboards, dashboard_scalars
from fastdist.engine.logger import RunLogger

TRAIN = {"iteration": 20, "lr": 0.0125, "task_loss": 1.5, "kd_loss": 0.25, "images_per_s": 31.0,
         "data_ms": 1.5, "step_ms": 250.0, "peak_mem_gib": None, "eta_s": 3.0}
VAL = {"iteration": 20, "mIoU": 0.375, "pixAcc": 0.8125, "IoU": [0.5, math.nan, 0.25], "best_mIoU": 0.375,
       "best_iteration": 20}
COST = {"models": {"student": {"params": 1234, "gflops": 0.5, "input_size": [8, 8]}}}
NAMES = ("road", "sidewalk", "building")


def test_scalars_by_hand() -> None:
    step, train = dashboard_scalars("train", TRAIN, NAMES)
    assert step == 20
    assert train == {"train/lr": 0.0125, "train/task_loss": 1.5, "train/kd_loss": 0.25,  # no CUDA memory
                     "train/images_per_s": 31.0, "train/data_ms": 1.5, "train/step_ms": 250.0}
    _, val = dashboard_scalars("val", VAL, NAMES)
    assert val == {"val/mIoU": 0.375, "val/pixAcc": 0.8125, "val/best_mIoU": 0.375, "val/IoU/road": 0.5,
                   "val/IoU/building": 0.25}  # the absent class (NaN) is left out
    assert dashboard_scalars("model_cost", COST, NAMES) == (0, {"model/student/params": 1234.0,
                                                                "model/student/gflops": 0.5})
    assert dashboard_scalars("event", {"event": "finished"}, NAMES) is None


def test_tensorboard_event_files_beside_metrics(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLogger(str(tmp_path), enabled=True, dashboards=Dashboards(str(tmp_path), True, None,
                                                                       class_names=NAMES))
    log.record("train", **TRAIN)
    log.record("val", **VAL)
    log.record("model_cost", **COST)
    log.close()
    assert (tmp_path / "metrics.jsonl").is_file()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    got = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert got["train/task_loss"] == [(20, 1.5)]
    assert got["train/lr"] == [(20, pytest.approx(0.0125, rel=1e-7))]  # stored as float32
    assert got["val/mIoU"] == [(20, 0.375)]
    assert got["val/IoU/building"] == [(20, 0.25)]
    assert got["model/student/params"] == [(0, 1234.0)]
    assert "val/IoU/sidewalk" not in got and "train/peak_mem_gib" not in got


def test_disabled_logger_writes_nothing(tmp_path) -> None:
    """Ranks other than 0 get a disabled RunLogger: it drops the dashboards it is given."""
    dash = Dashboards(str(tmp_path / "tb"), True, None)
    log = RunLogger(str(tmp_path / "log"), enabled=False, dashboards=dash)
    log.record("train", **TRAIN)
    log.close()
    assert not (tmp_path / "log").exists()
    dash.close()


def test_wandb_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    dash = Dashboards(str(tmp_path), False, "fastdist-test", {"lr": 0.02}, NAMES)
    dash.record("train", TRAIN)
    dash.record("val", VAL)
    dash.close()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()  # protobuf records; history keys are stored as plain strings
    for tag in ("train/task_loss", "train/lr", "val/mIoU", "val/IoU/road", "val/IoU/building"):
        assert tag.encode() in data, tag
    assert b"val/IoU/sidewalk" not in data


def test_missing_package_is_named(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(RuntimeError, match=r"--wandb needs the 'wandb' package.*\[dashboards\]"):
        check_dashboards(False, "proj")
