"""A diverging run, NaN models, unfinished runs and shared save dirs (non-finite state, refused
scores, owed work after a failed validation, the save-dir lock)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as eval_cli  # noqa: E402
import predict as predict_cli  # noqa: E402
import train  # noqa: E402
from fastdist.engine import checkpoint as ckpt  # noqa: E402
from fastdist.engine.finite import state_is_finite  # noqa: E402
from fastdist.models import build_model, to_reference_state_dict  # noqa: E402

MODEL = ["--student-model", "psp_mobile", "--student-backbone", "mobilenetv2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastdist.data.synthetic import make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("rel_data")
    return make_synthetic_cityscapes(root, train=4, val=2, size=(32, 64), seed=3)


def _argv(data: Path, save: Path, *extra: str) -> list[str]:
    return ["--device", "cpu", "--data", str(data), "--teacher-model", "none", *MODEL, "--batch-size", "2",
            "--crop-size", "32", "64", "--workers", "0", "--save-dir", str(save), *extra]


def _tensors(obj: object) -> list[torch.Tensor]:
    """Every floating tensor inside nested dicts/lists (a state dict, an optimizer state)."""
    if torch.is_tensor(obj):
        return [obj] if obj.is_floating_point() else []
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]


def _log(save: Path) -> str:
    return (save / "train.log").read_text()


def test_state_check_sees_buffers_and_optimizer_state() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 2)).sum().backward()
    opt.step()
    assert bool(state_is_finite(net, opt))
    net[1].running_var[0] = float("inf")
    assert not bool(state_is_finite(net, opt))
    net[1].running_var.fill_(1.0)
    opt.state[net[0].weight]["momentum_buffer"][0, 0] = float("nan")
    assert not bool(state_is_finite(net, opt))
    assert bool(state_is_finite(net))  # the weights themselves are fine
    net[0].weight.data[0, 0] = 3e38  # finite but huge: the max-abs check does not overflow
    assert bool(state_is_finite(net))


def test_a_diverging_run_keeps_only_finite_checkpoints(data: Path, tmp_path: Path) -> None:
    save = tmp_path / "run"
    argv = _argv(data, save, "--lr", "1e6", "--max-iterations", "12", "--val-per-iters", "3",
                 "--save-per-iters", "2")
    assert train.main(argv) == 1
    log = _log(save)
    assert "Last good checkpoint: latest.pth at iteration" in log, log[-2000:]
    named = int(log.split("Last good checkpoint: latest.pth at iteration ")[1].split()[0])
    latest = ckpt.load_training_state(str(save / ckpt.LATEST))
    assert latest["iteration"] == named
    files = [latest["student"], latest["optimizer"]]
    files += [ckpt.load_training_state(str(p))["student"] for p in save.glob(ckpt.BEST)]
    files += [torch.load(p, weights_only=True) for p in save.glob("psp_mobile_*.pth")]
    assert all(bool(torch.isfinite(t).all()) for state in files for t in _tensors(state))
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    val_its = [r["iteration"] for r in records if r["kind"] == "val"]
    assert all(i <= named for i in val_its), (val_its, named)


def _nan_checkpoint(tmp_path: Path) -> Path:
    net = build_model("psp_mobile", "mobilenetv2", num_classes=19)
    state = to_reference_state_dict(net)
    key = next(k for k in state if k.endswith("running_var"))
    state[key] = torch.full_like(state[key], float("nan"))
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    return path


def test_eval_and_predict_refuse_a_nan_model(data: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    weights = _nan_checkpoint(tmp_path)
    common = ["--model", "psp_mobile", "--backbone", "mobilenetv2", "--data", str(data), "--pretrained",
              str(weights), "--device", "cpu", "--workers", "0"]
    assert eval_cli.main(common + ["--loader", "torch"]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and str(weights) in err, err
    out = tmp_path / "pred"
    assert predict_cli.main(common + ["--split", "val", "--save-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and str(weights) in err, err
    assert not list(out.rglob("*.png"))


@pytest.mark.parametrize("final", [True, False], ids=["final", "midway"])
def test_resume_finishes_a_failed_validation(data: Path, tmp_path: Path, final: bool) -> None:
    bad_data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(data), str(bad_data)], check=True)
    image = sorted((bad_data / "leftImg8bit" / "val").rglob("*.png"))[0]
    good = image.read_bytes()
    image.write_bytes(good[:200])  # header intact, pixels cut: validation fails mid-way
    save = tmp_path / "run"
    argv = _argv(bad_data, save, "--max-iterations", "2" if final else "3", "--val-per-iters", "2",
                 "--save-per-iters", "100")
    with pytest.raises(Exception, match=image.name):
        train.main(argv)
    state = ckpt.load_training_state(str(save / ckpt.LATEST))
    assert state["iteration"] == 2 and state["owed"] == (["validate", "export"] if final else ["validate"])
    assert not (save / ckpt.BEST).exists()
    image.write_bytes(good)
    assert train.main(argv + ["--resume", "auto"]) == 0
    state = ckpt.load_training_state(str(save / ckpt.LATEST))
    assert state["owed"] == [] and state["iteration"] == (2 if final else 3)
    assert ckpt.load_training_state(str(save / ckpt.BEST))["iteration"] in (2, 3)
    assert "validation at it 2" in _log(save)
    assert (save / "psp_mobile_mobilenetv2_citys.pth").exists()
    assert (save / "psp_mobile_mobilenetv2_citys_best_model.pth").exists()
    if final:
        log = _log(save)
        assert train.main(argv + ["--resume", "auto"]) == 0  # now truly nothing to do
        assert _log(save) == log

_HOLD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from fastdist.engine.lock import SaveDirLock
lock = SaveDirLock(sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def _holder(save: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(ROOT), str(save)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_a_live_save_dir_is_refused(data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    save = tmp_path / "run"
    holder = _holder(save)
    try:
        argv = _argv(data, save, "--max-iterations", "1", "--skip-val")
        assert train.main(argv) == 2
        err = capsys.readouterr().err
        assert "in use by another train.py" in err and f"pid {holder.pid}" in err, err
        assert not (save / ckpt.LATEST).exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the flock
        holder.wait()
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert "did not end cleanly" in err and f"pid {holder.pid}" in err, err  # the stale lock was noticed
    assert train.main(argv + ["--overwrite"]) == 0  # the lock was released by the run before
    assert "did not end cleanly" not in capsys.readouterr().err


def test_a_skipped_first_fp16_step_leaves_zero_momentum() -> None:
    """torch's fused SGD allocates momentum with empty_like on its first step; a GradScaler skip must not
    leave that memory as momentum (found by the finite-state check on an fp16 run)."""
    from fastdist.engine.config import OptimConfig
    from fastdist.engine.trainer import build_optimizer

    net = torch.nn.Linear(64, 64)
    optim = OptimConfig(batch_size=2, batch_per_rank=2, lr=0.1, momentum=0.9, weight_decay=0.0,
                        optimizer="sgd", seed=0)
    opt = build_optimizer(optim, net)
    scaler = torch.amp.GradScaler("cpu")
    for x in (torch.full((2, 64), float("inf")), torch.ones(2, 64)):  # inf gradients: skipped, then a step
        torch.full((64, 64), float("nan"))  # freed at once: NaN memory that empty_like may get back
        before = net.weight.detach().clone()
        opt.zero_grad(set_to_none=True)
        scaler.scale(net(x).sum()).backward()
        grad = net.weight.grad.detach() / scaler.get_scale()
        scaler.step(opt)
        scaler.update()
    # the first real step is plain SGD: w - lr * g (no leftover momentum)
    torch.testing.assert_close(net.weight.detach(), before - 0.1 * grad, atol=1e-6, rtol=1e-6)
