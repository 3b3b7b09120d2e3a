"""ConfusionMatrix: hand-computed cases, an independent numpy computation, and 2-rank all_reduce."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdist.engine.metrics import ConfusionMatrix, format_iou_table

REPO = Path(__file__).resolve().parents[1]


def _cm(pred: list, target: list, num_classes: int = 3, **kw) -> ConfusionMatrix:
    cm = ConfusionMatrix(num_classes, **kw)
    cm.update(torch.tensor(pred), torch.tensor(target))
    return cm


def test_hand_computed_case() -> None:
    # target: 0 0 1 1 2 255 ; pred: 0 1 1 1 0 2
    cm = _cm([[0, 1, 1, 1, 0, 2]], [[0, 0, 1, 1, 2, 255]])
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    res = cm.compute()
    # IoU0 = 1/(2+2-1)=1/3, IoU1 = 2/(2+3-2)=2/3, IoU2 = 0/(1+0-0)=0 ; 3 of 5 labelled pixels right
    assert res["IoU"] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert res["mIoU"] == pytest.approx(1 / 3)
    assert res["pixAcc"] == pytest.approx(3 / 5)


def test_ignore_index_and_out_of_range_targets_are_not_counted() -> None:
    cm = _cm([[0, 1, 2, 2]], [[0, 1, 255, 7]], ignore_index=255)
    assert int(cm.matrix.sum()) == 2
    res = cm.compute()
    assert res["pixAcc"] == 1.0
    # class 2 is only predicted on ignored pixels: it is absent from prediction and target
    assert res["IoU"] == [1.0, 1.0, 0.0]
    custom = _cm([[0, 1]], [[0, -1]], ignore_index=-1)
    assert int(custom.matrix.sum()) == 1
    inside = _cm([[5, 1, 1]], [[0, 1, 2]], num_classes=6, ignore_index=0)  # an ignore value inside 0..C-1
    assert int(inside.matrix.sum()) == 2 and inside.compute()["pixAcc"] == 0.5


def test_absent_class_conventions() -> None:
    pred, target = [[0, 0, 1]], [[0, 0, 1]]
    ref = _cm(pred, target).compute()  # reference convention: absent class = IoU 0, counted
    assert ref["IoU"] == [1.0, 1.0, 0.0]
    assert ref["mIoU"] == pytest.approx(2 / 3)
    nan = _cm(pred, target, absent="nan").compute()
    assert nan["IoU"][:2] == [1.0, 1.0] and math.isnan(nan["IoU"][2])
    assert nan["mIoU"] == 1.0
    empty = ConfusionMatrix(3, absent="nan").compute()
    assert math.isnan(empty["mIoU"]) and empty["pixAcc"] == 0.0
    assert ConfusionMatrix(3).compute() == {"mIoU": 0.0, "pixAcc": 0.0, "IoU": [0.0, 0.0, 0.0]}


def _numpy_reference(pred: np.ndarray, target: np.ndarray, c: int, ignore: int) -> tuple[float, float, list]:
    """CIRKD SegmentationMetric semantics, written independently with per-class areas in numpy."""
    labelled = (target != ignore) & (target >= 0) & (target < c)
    p, t = pred[labelled], target[labelled]
    inter = np.array([np.sum((p == k) & (t == k)) for k in range(c)], dtype=np.float64)
    area_p = np.array([np.sum(p == k) for k in range(c)], dtype=np.float64)
    area_t = np.array([np.sum(t == k) for k in range(c)], dtype=np.float64)
    iou = inter / (np.spacing(1) + area_p + area_t - inter)
    return float(iou.mean()), float(np.sum(p == t) / (np.spacing(1) + p.size)), iou.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_independent_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = 7
    cm = ConfusionMatrix(c, ignore_index=255)
    preds, targets = [], []
    for _ in range(3):  # several updates accumulate
        pred = rng.integers(0, c - 1, size=(2, 9, 11))  # class c-1 never predicted
        target = rng.integers(0, c - 2, size=(2, 9, 11))  # class c-2, c-1 never in target
        target[rng.random(target.shape) < 0.2] = 255
        cm.update(torch.from_numpy(pred), torch.from_numpy(target).to(torch.uint8))
        preds.append(pred)
        targets.append(target)
    miou, acc, iou = _numpy_reference(np.concatenate(preds), np.concatenate(targets), c, 255)
    res = cm.compute()
    assert res["mIoU"] == pytest.approx(miou, abs=1e-12)
    assert res["pixAcc"] == pytest.approx(acc, abs=1e-12)
    assert res["IoU"] == pytest.approx(iou, abs=1e-12)
    assert res["IoU"][c - 1] == 0.0  # absent from both


def test_merge_reset_and_input_checks() -> None:
    a, b = _cm([[0, 1]], [[0, 0]]), _cm([[2, 2]], [[2, 1]])
    a.merge(b)
    assert a.matrix.tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]
    a.reset()
    assert int(a.matrix.sum()) == 0
    with pytest.raises(ValueError, match="shape"):
        a.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax"):
        a.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="absent"):
        ConfusionMatrix(3, absent="skip")
    with pytest.raises(ValueError, match="merge"):
        a.merge(ConfusionMatrix(4))


def test_all_reduce_is_a_noop_without_process_group() -> None:
    cm = _cm([[0, 1]], [[0, 1]])
    cm.all_reduce()
    assert int(cm.matrix.sum()) == 2


def test_format_iou_table() -> None:
    table = format_iou_table([0.5, float("nan"), 0.12345], ["road", "sidewalk", "traffic light"], miou=0.3)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "IoU", "%"]
    assert "road" in lines[2] and lines[2].endswith("50.00")
    assert lines[3].endswith("n/a")
    assert lines[4].startswith("traffic light") and lines[4].endswith("12.35")
    assert lines[-1].startswith("mean") and lines[-1].endswith("30.00")
    assert "mean" not in format_iou_table([1.0], ["road"])
    with pytest.raises(ValueError):
        format_iou_table([1.0], ["road", "sky"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
def test_update_does_not_sync_on_cuda() -> None:
    cm = ConfusionMatrix(19, device="cuda")
    pred = torch.randint(0, 19, (2, 64, 64), device="cuda")
    target = torch.randint(0, 20, (2, 64, 64), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        cm.update(pred, target)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(cm.matrix.sum()) == int((target < 19).sum())


def free_port() -> int:
    """A TCP port that was free a moment ago (for torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, args: list[str], nproc: int = 2,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``script`` under ``torch.distributed.run`` on CPU (gloo) and return the finished process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


_DIST_SCRIPT = """
import json, sys
import numpy as np, torch
from fastdist.engine.distributed import setup_distributed, cleanup_distributed, exit_process
from fastdist.engine.metrics import ConfusionMatrix

env = setup_distributed("cpu")
rng = np.random.default_rng(123)
pred = torch.from_numpy(rng.integers(0, 5, size=(6, 8, 8)))
target = torch.from_numpy(rng.integers(0, 5, size=(6, 8, 8)))
target[0, :3] = 255
cm = ConfusionMatrix(5, device=env.device)
cm.update(pred[env.rank::env.world_size], target[env.rank::env.world_size])
cm.all_reduce()
single = ConfusionMatrix(5)
single.update(pred, target)
if env.is_main:
    json.dump({"world": env.world_size, "dist": cm.compute(), "single": single.compute(),
               "equal": bool(torch.equal(cm.matrix, single.matrix))}, open(sys.argv[1], "w"))
cleanup_distributed()
exit_process(0)
"""


def test_all_reduce_two_ranks_equals_single_process(tmp_path: Path) -> None:
    script = tmp_path / "dist_cm.py"
    script.write_text(textwrap.dedent(_DIST_SCRIPT))
    out = tmp_path / "out.json"
    proc = torchrun(script, [str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["equal"]
    assert res["dist"] == res["single"]
