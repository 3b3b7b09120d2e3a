"""train.py under torchrun on 2 CPU ranks (gloo): a KD run with logs, checkpoints and validation,
identical weights and per-rank shards, exact resume, preemption by SIGTERM, non-finite loss.

Run as a script (``python tests/test_train_ddp.py OUT -- TRAIN ARGS``, also under torchrun) this file
is a *probe*: it runs ``train.main`` and records, per rank, what each step saw and the final weights.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--crop-size", "32", "64", "--workers", "0", "--batch-size", "4",
        "--student-model", "deeplab_mobile", "--student-backbone", "mobilenetv2"]


# ------------------------------------------------------------------------------------------ probe
def _probe(out: Path, argv: list[str]) -> int:
    """Run train.main with a recording wrapper around the step; NaN input at PROBE_NAN_AT."""
    sys.path.insert(0, str(ROOT))
    import train
    from fastdist.engine.trainer import Trainer

    nan_at = int(os.environ.get("PROBE_NAN_AT", "0"))
    rank = int(os.environ.get("RANK", "0"))
    seen: list[list[float]] = []
    step, fit = Trainer.train_step, Trainer.fit

    def recording_step(self, images, labels, iteration):  # noqa: ANN001
        seen.append([iteration, float(images.double().sum()), float(labels.sum())])
        if iteration == nan_at:
            images = images * float("nan")
        step(self, images, labels, iteration)

    def recording_fit(self, *loaders):  # noqa: ANN001, ANN002
        code = fit(self, *loaders)
        torch.save(self.student.state_dict(), out / f"weights_rank{rank}.pt")
        (out / f"batches_rank{rank}.json").write_text(json.dumps(seen))
        return code

    Trainer.train_step, Trainer.fit = recording_step, recording_fit
    return train.main(argv)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # this checkout's fastdist, not an installed copy elsewhere
    from fastdist.engine.distributed import exit_process

    exit_process(_probe(Path(sys.argv[1]), sys.argv[3:]))


# ---------------------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # the loss runs the torch backend on CPU anyway
    return env


def _run(cmd: list[str], timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env={**_env(), **extra_env}, capture_output=True, text=True,
                          timeout=timeout)
    return proc


def _records(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 train / 4 val synthetic Cityscapes images at 32x64 (shared by the training tests)."""
    root = tmp_path_factory.getbasetemp() / "train_tiny_cityscapes"
    if not (root / "val.lst").exists():
        from fastdist.data.synthetic import make_synthetic_cityscapes

        make_synthetic_cityscapes(root, train=16, val=4, size=(32, 64), seed=1)
    return root


@pytest.fixture(scope="module")
def teacher(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random psp_mobile teacher in the reference key layout (KD mechanics only need a teacher)."""
    from fastdist.models import build_model, to_reference_state_dict

    path = tmp_path_factory.mktemp("teacher") / "psp_mobile_mobilenetv2_citys_best_model.pth"
    torch.manual_seed(0)
    torch.save(to_reference_state_dict(build_model("psp_mobile", "mobilenetv2")), path)
    return path


def _kd_args(data: Path, teacher: Path, save: Path, iters: int) -> list[str]:
    return TINY + ["--data", str(data), "--teacher-model", "psp_mobile", "--teacher-backbone", "mobilenetv2",
                   "--teacher-pretrained", str(teacher), "--max-iterations", str(iters), "--save-dir",
                   str(save), "--log-iter", "2", "--val-per-iters", "2", "--save-per-iters", "2",
                   "--check-every", "1", "--kd-mask", "ignore"]


def _probe_cmd(out: Path, args: list[str], nproc: int = 2) -> list[str]:
    return _torchrun(nproc) + [str(Path(__file__)), str(out), "--"] + args


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def straight_run(tiny_data: Path, teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 KD iterations on 2 ranks, uninterrupted, through the probe."""
    out = tmp_path_factory.mktemp("straight")
    proc = _run(_probe_cmd(out, _kd_args(tiny_data, teacher, out, 4)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def test_kd_run_logs_checkpoints_and_validation(straight_run: Path) -> None:
    records = _records(straight_run)
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["iteration"] for r in train] == [2, 4]
    for r in train:
        assert all(torch.isfinite(torch.tensor([r["task_loss"], r["kd_loss"]])))
        assert r["kd_loss"] > 0 and r["task_loss"] > 0 and r["images_per_s"] > 0
        assert {"lr", "data_ms", "step_ms", "eta_s", "peak_mem_gib"} <= r.keys()
    assert [r["iteration"] for r in val] == [2, 4]
    assert all(0 <= r["mIoU"] <= 1 and len(r["IoU"]) == 19 for r in val)
    stdout = (straight_run / "stdout.txt").read_text()
    assert "it 4/4 | lr" in stdout and "img/s" in stdout and "validation at it 4 (fp32): mIoU" in stdout

    config = json.loads((straight_run / "config.json").read_text())
    assert config["world_size"] == 2 and config["batch_per_rank"] == 2 and config["lr"] == 0.02
    latest, best = _load(straight_run / "latest.pth"), _load(straight_run / "best.pth")
    assert latest["iteration"] == 4 and len(latest["rng"]) == 2
    assert latest["config"]["student_model"] == "deeplab_mobile"
    assert best["best_miou"] == max(r["mIoU"] for r in val)
    for key in ("student", "optimizer", "scaler", "rng", "best_miou", "config"):
        assert key in latest and key in best
    from fastdist.models import build_model, load_checkpoint

    load_checkpoint(build_model("deeplab_mobile", "mobilenetv2"),
                    straight_run / "kd_deeplab_mobile_mobilenetv2_citys_best_model.pth")
    assert not list(straight_run.glob("*.tmp*"))


def test_ddp_ranks_keep_identical_weights_on_their_own_shards(straight_run: Path, tiny_data: Path) -> None:
    w0, w1 = _load(straight_run / "weights_rank0.pt"), _load(straight_run / "weights_rank1.pt")
    assert w0.keys() == w1.keys()
    for key in w0:
        assert torch.equal(w0[key], w1[key]), key
    saved = _load(straight_run / "latest.pth")["student"]
    assert all(torch.equal(saved[k], w0[k]) for k in w0), "latest.pth differs from the trained weights"

    from fastdist.data import build_loader

    for rank in (0, 1):
        seen = json.loads((straight_run / f"batches_rank{rank}.json").read_text())
        loader = build_loader(tiny_data, "train", 2, crop_size=(32, 64), backend="torch", device="cpu",
                              rank=rank, world_size=2, seed=0, num_threads=0, max_iterations=4,
                              channels_last=False)
        expected = [[i + 1, float(x.double().sum()), float(y.sum())] for i, (x, y) in enumerate(loader)]
        flat = [v for row in seen for v in row]
        assert flat == pytest.approx([v for row in expected for v in row]), f"rank {rank} is off its shard"
    s0 = json.loads((straight_run / "batches_rank0.json").read_text())
    s1 = json.loads((straight_run / "batches_rank1.json").read_text())
    assert all(a[1] != b[1] for a, b in zip(s0, s1, strict=True))


def test_resume_is_exact(straight_run: Path, tiny_data: Path, teacher: Path, tmp_path: Path) -> None:
    args = _kd_args(tiny_data, teacher, tmp_path, 4)
    first = _run(_torchrun() + ["train.py"] + args + ["--stop-at", "2"])
    assert first.returncode == 0, first.stderr[-5000:]
    assert _load(tmp_path / "latest.pth")["iteration"] == 2
    second = _run(_torchrun() + ["train.py"] + args + ["--resume", "auto"])
    assert second.returncode == 0, second.stderr[-5000:]
    assert "resuming from" in second.stdout
    resumed, straight = _load(tmp_path / "latest.pth"), _load(straight_run / "latest.pth")
    assert resumed["iteration"] == straight["iteration"] == 4
    for key, value in straight["student"].items():
        assert torch.equal(resumed["student"][key], value), key
    opt_a, opt_b = resumed["optimizer"]["state"], straight["optimizer"]["state"]
    for a, b in zip(opt_a.values(), opt_b.values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert resumed["rng"] == straight["rng"]
    assert resumed["best_miou"] == straight["best_miou"]


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tiny_data: Path, teacher: Path,
                                                        tmp_path: Path) -> None:
    args = _kd_args(tiny_data, teacher, tmp_path, 40) + ["--skip-val", "--save-per-iters", "1000",
                                                         "--kd-intra-sync", "--kd-mask", "pad"]
    proc = subprocess.Popen(_torchrun() + ["train.py"] + args, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and '"kind": "train"' in metrics.read_text():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be preempted"
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    out, _ = proc.communicate(timeout=120)
    state = _load(tmp_path / "latest.pth")
    assert 2 <= state["iteration"] < 40, out[-3000:]
    assert any(r.get("event") == "preempted" for r in _records(tmp_path)), out[-3000:]

    resumed = _run(_torchrun() + ["train.py"] + args + ["--resume", str(tmp_path / "latest.pth")])
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert _load(tmp_path / "latest.pth")["iteration"] == 40
    assert any(r.get("event") == "finished" for r in _records(tmp_path))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data: Path, teacher: Path,
                                                                  tmp_path: Path) -> None:
    args = _kd_args(tiny_data, teacher, tmp_path, 8) + ["--skip-val", "--check-every", "2"]
    proc = _run([sys.executable, str(Path(__file__)), str(tmp_path), "--"] + args, PROBE_NAN_AT="3")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "non-finite loss at iteration 3" in proc.stdout
    assert "--resume auto with --amp off" in proc.stdout and "Lower --lr" not in proc.stdout
    state = _load(tmp_path / "latest.pth")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
