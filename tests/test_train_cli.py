"""train.py's command line, fail-fast checks and the engine's small parts (in-process, fast)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from fastdist.engine import checkpoint as ckpt  # noqa: E402
from fastdist.engine.config import (  # noqa: E402
    ConfigError,
    build_parser,
    check_resume_compatible,
    config_dict,
    parse_config,
)
from fastdist.engine.kd import DistillationLoss, kd_keep_mask  # noqa: E402
from fastdist.engine.schedule import poly_lr  # noqa: E402
from fastdist.engine.signals import PreemptionHandler  # noqa: E402
from fastdist.loss.reference import dist_loss_reference  # noqa: E402
from fastdist.models import build_model, to_reference_state_dict  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_data")
    from fastdist.data.synthetic import make_synthetic_cityscapes

    return make_synthetic_cityscapes(root, train=4, val=2, size=(32, 64), seed=3)


def _base(data: Path, *extra: str) -> list[str]:
    return ["--device", "cpu", "--data", str(data), "--teacher-model", "none",
            "--student-model", "psp_mobile", "--student-backbone", "mobilenetv2", *extra]


def _fails_fast(argv: list[str], capsys: pytest.CaptureFixture, *needles: str) -> str:
    start = time.perf_counter()
    assert train.main(argv) == 2
    assert time.perf_counter() - start < 15
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_defaults_are_the_reference_recipe() -> None:
    args = build_parser().parse_args([])
    assert (args.teacher_model, args.teacher_backbone) == ("deeplabv3", "resnet101")
    assert (args.student_model, args.student_backbone) == ("deeplabv3", "resnet18")
    assert args.crop_size == [512, 1024] and args.batch_size == 16 and args.max_iterations == 40000
    assert (args.lr, args.momentum, args.weight_decay) == (0.02, 0.9, 5e-4)
    assert (args.kd_method, args.lambda_kd, args.kd_temperature) == ("dist", None, None)  # per method
    assert (args.kd_mask, args.kd_intra_sync) == ("none", False)
    assert (args.log_iter, args.val_per_iters, args.save_per_iters, args.skip_val) == (10, 400, 400, False)


def test_help_states_each_default_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every option's help says its default at most once; the recipe flags say it comes from --dataset."""
    import re

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: one line per option
    blocks = re.split(r"\n(?=  -)", build_parser().format_help())  # one block per option
    options = {b.split()[0].rstrip(","): " ".join(b.split()) for b in blocks if b.startswith("  -")}
    assert {"--crop-size", "--batch-size", "--max-iterations", "--lr", "--val-batch-size"} <= set(options)
    for help_text in options.values():
        assert len(re.findall(r"\bdefault\b", help_text)) <= 1, help_text
    for option in ("--crop-size", "--batch-size", "--max-iterations", "--lr"):
        assert "(default: from the --dataset's recipe:" in options[option], options[option]
    assert "360 360 for camvid" in options["--crop-size"]
    assert "80000 for cocostuff164k" in options["--max-iterations"]
    assert "1 for the datasets of varying image size: ade20k" in options["--val-batch-size"]


def test_resolved_config_on_cpu(data: Path) -> None:
    cfg = parse_config(_base(data, "--batch-size", "4", "--gpu-id", "0,1", "--student-pretrained", "None"))
    rt = cfg.runtime
    assert (rt.amp, rt.channels_last, rt.compile, cfg.data.loader) == ("off", False, False, "torch")
    assert cfg.model.teacher_model is None and cfg.model.student_pretrained is None
    assert cfg.optim.batch_per_rank == 4 and cfg.reference.gpu_id == "0,1"
    assert cfg.paths.save_dir == os.path.join("runs", "baseline_psp_mobile_mobilenetv2") == cfg.paths.log_dir


def test_config_json_keys_are_the_flags_and_the_derived_values(data: Path) -> None:
    """config.json (and every checkpoint) keeps one flat key per flag plus the derived values, as
    written before the typed config, so older checkpoints resume; the parts share no field name."""
    cfg = parse_config(_base(data, "--batch-size", "4"))
    derived = {"batch_per_rank", "command", "data_root", "dataset_defaults", "device_type", "random_teacher",
               "resume_notes", "teacher_sha256", "torch_version", "world_size"}
    assert set(config_dict(cfg)) == set(vars(build_parser().parse_args([]))) | derived
    fields = [f.name for part in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, part.name))]
    assert len(fields) == len(set(fields)) == len(config_dict(cfg))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.runtime.amp = "bf16"  # type: ignore[misc]


def test_poly_schedule() -> None:
    assert poly_lr(0.02, 0, 100) == pytest.approx(0.02)
    assert poly_lr(0.02, 100, 100) == pytest.approx(1e-4)
    assert poly_lr(0.02, 50, 100) == pytest.approx(1e-4 + (0.02 - 1e-4) * 0.5**0.9)


def test_missing_dataset_fails_fast(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    _fails_fast(_base(tmp_path / "nowhere"), capsys, "nowhere", "fastdist.data.synthetic")


def test_unknown_model_fails_fast(data: Path, capsys: pytest.CaptureFixture) -> None:
    _fails_fast(_base(data, "--student-model", "unet"), capsys, "unknown student model 'unet'", "psp_mobile")


def test_teacher_weights_are_required(data: Path, capsys: pytest.CaptureFixture) -> None:
    argv = _base(data, "--teacher-model", "psp_mobile", "--teacher-backbone", "mobilenetv2")
    _fails_fast(argv, capsys, "--teacher-pretrained")


def test_teacher_checkpoint_that_does_not_fit_fails_fast(data: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "deeplab_mobile.pth"
    torch.save(to_reference_state_dict(build_model("deeplab_mobile", "mobilenetv2")), path)
    argv = _base(data, "--teacher-model", "psp_mobile", "--teacher-backbone", "mobilenetv2",
                 "--teacher-pretrained", str(path))
    _fails_fast(argv, capsys, "does not fit the teacher psp_mobile/mobilenetv2", "--teacher-model")


def test_resume_from_plain_weights_or_another_recipe_fails_fast(data: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    model = build_model("psp_mobile", "mobilenetv2")
    plain = tmp_path / "plain.pth"
    torch.save(to_reference_state_dict(model), plain)
    _fails_fast(_base(data, "--resume", str(plain)), capsys, f"--student-pretrained {plain}")

    cfg = parse_config(_base(data, "--lr", "0.01"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    state = {"iteration": 3, "student": to_reference_state_dict(model), "optimizer": opt.state_dict(),
             "scaler": None, "rng": [ckpt.rng_state(torch.device("cpu"))], "best_miou": None,
             "best_iteration": None, "owed": []}
    other = tmp_path / "latest.pth"
    ckpt.save_training_state(state, config_dict(cfg), str(other))
    _fails_fast(_base(data, "--resume", str(other)), capsys, "different recipe",
                "lr: checkpoint 0.01, now 0.02")


def test_batch_must_split_over_ranks(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="not divisible"):
        parse_config(_base(data, "--batch-size", "4"))


def test_one_image_per_rank_needs_sync_batchnorm(data: Path, capsys: pytest.CaptureFixture) -> None:
    _fails_fast(_base(data, "--batch-size", "1"), capsys, "1 image per rank", "--batch-size 2")


@pytest.mark.parametrize("flag", ["--momentum", "--weight-decay", "--lambda-kd", "--kd-beta", "--kd-gamma"])
def test_negative_weights_fail_fast(data: Path, capsys: pytest.CaptureFixture, flag: str) -> None:
    with pytest.raises(SystemExit) as exc:  # an argparse type error: exit 2 with the usage
        train.main(_base(data, flag, "-0.5"))
    assert exc.value.code == 2
    assert f"argument {flag}: expected a finite number >= 0, got -0.5" in capsys.readouterr().err


def test_teacher_weights_without_a_teacher_fail_fast(data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "teacher.pth"
    torch.save(to_reference_state_dict(build_model("psp_mobile", "mobilenetv2")), path)
    _fails_fast(_base(data, "--teacher-pretrained", str(path)), capsys, "--teacher-model none")


def test_a_new_run_never_replaces_an_earlier_one(data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    save = tmp_path / "run"
    save.mkdir()
    (save / "latest.pth").write_bytes(b"earlier run")
    _fails_fast(_base(data, "--save-dir", str(save)), capsys, f"--save-dir {save} already holds a run "
                "(latest.pth)", "--resume auto", "--overwrite")
    assert parse_config(_base(data, "--save-dir", str(save), "--overwrite")).paths.resume is None
    (save / "latest.pth").rename(save / "best.pth")  # nothing to resume, still an earlier run's best
    err = _fails_fast(_base(data, "--save-dir", str(save), "--resume", "auto"), capsys, "(best.pth)")
    assert "--resume auto" not in err
    assert (save / "best.pth").read_bytes() == b"earlier run"


def test_dali_loader_needs_dali(data: Path, capsys: pytest.CaptureFixture,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # a machine without DALI
    _fails_fast(_base(data, "--loader", "dali"), capsys, "--loader dali", "nvidia-dali-cuda120",
                "--loader torch")


def test_overwrite_removes_the_earlier_run(data: Path, tmp_path: Path) -> None:
    """No file of the earlier run (checkpoints, exports, logs) survives next to the new run's."""
    save = tmp_path / "run"
    tiny = ["--batch-size", "2", "--crop-size", "32", "64", "--workers", "0", "--save-dir", str(save)]
    assert train.main(_base(data, *tiny, "--max-iterations", "2", "--val-per-iters", "2")) == 0
    export = "psp_mobile_mobilenetv2_citys_best_model.pth"
    assert {"best.pth", "latest.pth", export, "metrics.jsonl"} <= {p.name for p in save.iterdir()}
    (save / "notes.txt").write_text("mine")  # not the run's: stays
    assert train.main(_base(data, *tiny, "--max-iterations", "1", "--skip-val", "--overwrite")) == 0
    names = {p.name for p in save.iterdir()}
    assert "best.pth" not in names and export not in names and "notes.txt" in names
    assert ckpt.load_training_state(str(save / ckpt.LATEST))["iteration"] == 1
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r.get("iteration", 1) <= 1 for r in records)
    assert "--overwrite: removed the earlier run's latest.pth, best.pth" in (save / "train.log").read_text()


def test_apex_optimizer_needs_apex(data: Path, capsys: pytest.CaptureFixture) -> None:
    _fails_fast(_base(data, "--optimizer", "apex"), capsys, "NVIDIA apex", "--optimizer sgd")


def test_resume_compatibility_notes(data: Path) -> None:
    cfg = parse_config(_base(data, "--amp", "bf16"))
    saved = config_dict(cfg)
    saved.update(amp="off", world_size=2)
    notes = check_resume_compatible(saved, cfg)
    assert any("world size" in n for n in notes) and any("amp" in n for n in notes)


def test_kd_masks() -> None:
    images = torch.randn(2, 3, 16, 16)
    labels = torch.randint(0, 19, (2, 16, 16))
    images[0, :, :, 8:] = 0  # padding: image 0 in all channels and label 255
    labels[0, :, 8:] = 255
    labels[1, :8] = 255  # ignored but not padding
    pad = kd_keep_mask("pad", images, labels, (4, 4))
    ignore = kd_keep_mask("ignore", images, labels, (4, 4))
    assert pad.shape == ignore.shape == (2, 4, 4) and pad.dtype == torch.bool
    assert not pad[0, :, 2:].any() and pad[0, :, :2].all() and pad[1].all()
    assert not ignore[1, :2].any() and ignore[1, 2:].all() and not ignore[0, :, 2:].any()
    assert kd_keep_mask("none", images, labels, (4, 4)) is None


def test_distillation_loss_is_the_recipe() -> None:
    torch.manual_seed(0)
    s = {"out": torch.randn(2, 19, 4, 8, requires_grad=True), "aux": torch.randn(2, 19, 4, 8)}
    t = {"out": torch.randn(2, 19, 4, 8), "aux": torch.randn(2, 19, 4, 8)}
    labels = torch.randint(0, 19, (2, 32, 64))
    labels[:, :4] = 255
    crit = DistillationLoss(lambda_kd=0.5, backend="torch")
    task, kd = crit(s, t, labels, torch.randn(2, 3, 32, 64))
    ce = DistillationLoss.cross_entropy
    assert task.item() == pytest.approx((ce(s["out"], labels) + 0.4 * ce(s["aux"], labels)).item())
    want = 0.5 * dist_loss_reference(s["out"], t["out"]) + 0.2 * dist_loss_reference(s["aux"], t["aux"])
    assert kd.item() == pytest.approx(want.item(), rel=1e-5)
    task_only, zero = crit(s, None, labels, torch.randn(2, 3, 32, 64))
    assert zero.item() == 0 and task_only.item() == pytest.approx(task.item())


def test_task_loss_of_a_batch_without_labels_is_zero() -> None:
    """The mean over labelled pixels (as F.cross_entropy), and 0 with zero gradients, not NaN, without any."""
    logits = torch.randn(2, 19, 4, 8, requires_grad=True)
    labels = torch.randint(0, 19, (2, 16, 32))
    labels[0] = 255
    up = torch.nn.functional.interpolate(logits, size=(16, 32), mode="bilinear", align_corners=True)
    want = torch.nn.functional.cross_entropy(up, labels, ignore_index=255)
    assert DistillationLoss.cross_entropy(logits, labels).item() == pytest.approx(want.item(), rel=1e-6)
    loss = DistillationLoss.cross_entropy(logits, torch.full_like(labels, 255))
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_a_failing_validation_keeps_the_training_state(tmp_path: Path) -> None:
    from fastdist.data import DatasetError
    from fastdist.data.synthetic import make_synthetic_cityscapes

    root = make_synthetic_cityscapes(tmp_path / "data", train=4, val=2, size=(32, 64), seed=3)
    bad = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[0]
    bad.write_bytes(bad.read_bytes()[:200])  # the header (size, mode) is intact, the pixels are cut
    save = tmp_path / "run"
    argv = _base(root, "--batch-size", "2", "--crop-size", "32", "64", "--workers", "0", "--max-iterations",
                 "4", "--val-per-iters", "4", "--save-per-iters", "100", "--save-dir", str(save))
    with pytest.raises(DatasetError, match=bad.name):
        train.main(argv)
    state = ckpt.load_training_state(str(save / ckpt.LATEST))
    assert state["iteration"] == 4 and state["best_miou"] is None


def test_preemption_handler_sets_a_flag() -> None:
    with PreemptionHandler() as handler:
        assert not handler.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert handler.requested and handler.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with PreemptionHandler() as handler:  # Ctrl-C under torchrun: terminal + agent deliver SIGINT twice
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert handler.received == signal.SIGINT


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "latest.pth"
    ckpt.atomic_save({"a": torch.ones(2)}, str(path))
    with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled
        ckpt.atomic_save({"a": lambda: 0}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]


class _FullDisk:
    """Pickling fails half-way with ENOSPC, as a write on a full disk does."""

    def __reduce__(self) -> tuple:
        raise OSError(28, "No space left on device")


def test_checkpoint_write_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latest.pth"
    ckpt.atomic_save({"a": torch.ones(2)}, str(path))
    with pytest.raises(ckpt.CheckpointWriteError, match=f"could not write {path} \\(the previous file is "
                       "unchanged\\): OSError: .*No space left on device"):
        ckpt.atomic_save({"a": torch.zeros(2), "b": _FullDisk()}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]
    blocked = tmp_path / "latest.pth" / "best.pth"  # its folder is a file
    with pytest.raises(ckpt.CheckpointWriteError, match="no earlier file existed"):
        ckpt.atomic_copy(str(path), str(blocked))


def test_rng_states_round_trip() -> None:
    device = torch.device("cpu")
    state = ckpt.rng_state(device)
    first = torch.rand(4)
    torch.rand(7)
    ckpt.set_rng_state(state, device)
    assert torch.equal(torch.rand(4), first)


def test_unused_teacher_aux_head_is_dropped() -> None:
    from fastdist.engine.kd import drop_unused_teacher_heads

    teacher, student = build_model("deeplabv3", "resnet18").eval(), build_model("psp_mobile", "mobilenetv2")
    drop_unused_teacher_heads(teacher, student)
    assert list(teacher(torch.randn(1, 3, 32, 32))) == ["out"]
    teacher = build_model("deeplabv3", "resnet18")
    drop_unused_teacher_heads(teacher, build_model("psp", "resnet18"))
    assert teacher.auxlayer is not None
