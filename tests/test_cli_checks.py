"""Start-up checks of train.py / eval.py / predict.py: non-finite or
out-of-range numbers, unusable output folders, a full disk, stale temporary files, the triton backend
without CUDA, resume with other teacher weights or data, validation precision, the temperature the
reference ignores. All but one are argparse / parse_config level; one tiny run checks the log."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
from fastdist.engine import checkpoint as ckpt  # noqa: E402
from fastdist.engine.config import (  # noqa: E402
    NON_FINITE_HINT,
    RECIPE_KEYS,
    ConfigError,
    build_parser,
    check_resume_compatible,
    config_dict,
    parse_config,
    recipe_warnings,
    remove_stale_temp_files,
    save_config,
    validation_precision,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastdist.data.synthetic import make_synthetic_cityscapes

    return make_synthetic_cityscapes(tmp_path_factory.mktemp("checks"), train=4, val=2, size=(32, 64), seed=4)


def _base(data: Path, save: Path, *extra: str) -> list[str]:
    return ["--device", "cpu", "--data", str(data), "--teacher-model", "none", "--student-model",
            "psp_mobile", "--student-backbone", "mobilenetv2", "--save-dir", str(save), *extra]


def _kd(data: Path, save: Path, *extra: str) -> list[str]:
    """A distillation command line with a random psp_mobile teacher (no weights file needed)."""
    return _base(data, save, "--teacher-model", "psp_mobile", "--teacher-backbone", "mobilenetv2",
                 "--teacher-pretrained", "none", *extra)


def _load_cli(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"checks_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exits_2(call, capsys: pytest.CaptureFixture, *needles: str) -> str:
    """``call()`` is an argparse error: SystemExit(2), the message names the option."""
    with pytest.raises(SystemExit) as exc:
        call()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


# ------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize(("flag", "value"), [
    ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-0.01"), ("--momentum", "inf"),
    ("--momentum", "nan"), ("--weight-decay", "inf"), ("--lambda-kd", "inf"), ("--lambda-kd", "nan"),
    ("--kd-temperature", "inf"), ("--kd-temperature", "nan"), ("--kd-temperature", "0"),
    ("--kd-beta", "inf"), ("--kd-beta", "nan"), ("--kd-gamma", "-inf"), ("--kd-gamma", "-0.5"),
])  # fmt: skip
def test_train_rejects_non_finite_or_out_of_range_numbers(flag: str, value: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    _exits_2(lambda: build_parser().parse_args([f"{flag}={value}"]), capsys, f"argument {flag}:", value)


def test_every_float_option_of_train_is_checked() -> None:
    float_actions = [a.option_strings for a in build_parser()._actions if a.type is float]
    assert float_actions == []  # a plain float type accepts nan and inf


def test_finite_numbers_pass() -> None:
    cfg = build_parser().parse_args(["--lr", "1e-3", "--momentum", "0", "--kd-temperature", "4"])
    assert (cfg.lr, cfg.momentum, cfg.kd_temperature) == (1e-3, 0.0, 4.0)


@pytest.mark.parametrize("script", ["eval.py", "predict.py"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0.001", "0", "-1", "100"])
def test_inference_scales_must_be_finite_and_sane(script: str, value: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    cli = _load_cli(script)
    argv = ["--model", "psp_mobile", "--backbone", "mobilenetv2", "--data", str(tmp_path),
            "--pretrained", str(tmp_path / "w.pth"), "--save-dir", str(tmp_path), f"--scales={value}"]
    _exits_2(lambda: cli.parse_args(argv), capsys, "argument --scales:", value)


# ------------------------------------------------------------------------------------- clean errors
def test_eval_save_dir_that_is_a_file_fails_before_evaluating(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    not_a_dir = tmp_path / "results"
    not_a_dir.write_text("x")
    cli = _load_cli("eval.py")
    argv = ["--model", "psp_mobile", "--backbone", "mobilenetv2", "--data", str(tmp_path / "no_data"),
            "--pretrained", str(tmp_path / "w.pth"), "--save-dir", str(not_a_dir), "--device", "cpu"]
    assert cli.main(argv) == 2  # the dataset is not even looked at
    assert f"--save-dir {not_a_dir} exists and is not a folder" in capsys.readouterr().err


def test_predict_unwritable_save_dir_fails_before_the_model(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cli = _load_cli("predict.py")
    argv = ["--model", "psp_mobile", "--backbone", "mobilenetv2", "--data", str(tmp_path),
            "--pretrained", str(tmp_path / "missing.pth"), "--save-dir", str(blocker / "out"),
            "--device", "cpu"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--save-dir {blocker / 'out'} is not writable" in err and "Traceback" not in err


def _no_models(*_: object) -> None:
    raise AssertionError("the models were built before the save dir was checked")


def test_train_unwritable_save_dir_fails_before_the_models(data: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr(train, "build_student", _no_models)
    assert train.main(_base(data, blocker / "run")) == 2
    assert f"--save-dir {blocker / 'run'} is not writable" in capsys.readouterr().err
    assert train.main(_base(data, blocker)) == 2
    assert f"--save-dir {blocker} exists and is not a folder" in capsys.readouterr().err


def _disk_full(fd: int, data: bytes) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_at_start_up_is_an_error_without_leftovers(data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    save = tmp_path / "run"
    monkeypatch.setattr(train, "build_student", _no_models)
    monkeypatch.setattr(os, "write", _disk_full)  # every write in this process: the disk is full
    assert train.main(_base(data, save)) == 2
    assert f"--save-dir {save} is not writable: No space left on device" in capsys.readouterr().err
    assert not save.exists()  # no 0-byte probe, no config.json.tmp.<pid>, not even the folder


def test_save_config_on_a_full_disk_leaves_no_temporary_file(data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(_base(data, tmp_path / "run"))
    monkeypatch.setattr(os, "write", _disk_full)
    with pytest.raises(ConfigError, match="config.json: No space left on device"):
        save_config(cfg, str(tmp_path / "run"))
    assert list((tmp_path / "run").iterdir()) == []
    monkeypatch.undo()
    path = save_config(cfg, str(tmp_path / "run"))
    assert json.loads(Path(path).read_text())["save_dir"] == str(tmp_path / "run")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    dead, live = _dead_pid(), os.getppid()
    for name in (f"latest.pth.tmp.{dead}", f"config.json.tmp.{dead}", f"best.pth.tmp.{live}", "notes.tmp"):
        (tmp_path / name).write_bytes(b"")
    removed = remove_stale_temp_files(str(tmp_path))
    assert sorted(map(os.path.basename, removed)) == [f"config.json.tmp.{dead}", f"latest.pth.tmp.{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"best.pth.tmp.{live}", "notes.tmp"]


def test_triton_backend_without_cuda_or_interpreter_fails_at_start_up(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="--kd-backend triton needs a CUDA device"):
        parse_config(_kd(data, tmp_path, "--kd-backend", "triton"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert parse_config(_kd(data, tmp_path, "--kd-backend", "triton")).distill.kd_backend == "triton"


# ------------------------------------------------------------------------------------ resume inputs
def test_resume_warns_about_other_teacher_weights_or_data(data: Path, tmp_path: Path) -> None:
    from fastdist.models import build_model, to_reference_state_dict

    weights = tmp_path / "teacher.pth"
    torch.save(to_reference_state_dict(build_model("psp_mobile", "mobilenetv2")), weights)
    argv = _base(data, tmp_path / "run", "--teacher-model", "psp_mobile", "--teacher-backbone", "mobilenetv2",
                 "--teacher-pretrained", str(weights))
    saved = config_dict(parse_config(argv))
    assert check_resume_compatible(saved, parse_config(argv)) == []

    torch.save(to_reference_state_dict(build_model("psp_mobile", "mobilenetv2")), weights)  # new weights
    notes = check_resume_compatible(saved, parse_config(argv))
    assert len(notes) == 1 and f"{weights} holds other weights than when the run started (sha256" in notes[0]

    saved = config_dict(parse_config(argv))  # the current weights
    other = tmp_path / "other.pth"
    other.write_bytes(weights.read_bytes())  # a copy: the same teacher
    other_argv = [a if a != str(weights) else str(other) for a in argv]
    assert check_resume_compatible(saved, parse_config(other_argv)) == []
    torch.save(to_reference_state_dict(build_model("psp_mobile", "mobilenetv2")), other)
    (note,) = check_resume_compatible(saved, parse_config(other_argv))
    assert f"--teacher-pretrained changed: {str(weights)!r} -> {str(other)!r} (sha256" in note
    random_teacher = parse_config(_kd(data, tmp_path / "run"))  # 'none': a random teacher
    assert any("--teacher-pretrained changed" in n for n in check_resume_compatible(saved, random_teacher))

    os.symlink(data, tmp_path / "data_link")  # the same root through a link is the same data
    assert check_resume_compatible(saved, parse_config([*argv, "--data", str(tmp_path / "data_link")])) == []
    moved = tmp_path / "data_copy"
    shutil.copytree(data, moved)
    notes = check_resume_compatible(saved, parse_config([*argv, "--data", str(moved)]))
    assert len(notes) == 1 and "--data changed" in notes[0] and str(moved) in notes[0]


def test_non_finite_hint_names_a_way_resume_accepts(data: Path, tmp_path: Path) -> None:
    assert "lr" in RECIPE_KEYS and "lower --lr" in NON_FINITE_HINT and "start a new run" in NON_FINITE_HINT
    assert "--resume auto with --amp off" in NON_FINITE_HINT
    cfg = parse_config(_base(data, tmp_path, "--amp", "off"))
    saved = {**config_dict(cfg), "amp": "bf16"}
    assert check_resume_compatible(saved, cfg) == ["amp changed: 'bf16' -> 'off'"]  # accepted, noted
    with pytest.raises(ConfigError, match="lr: checkpoint 0.02, now 0.01"):
        check_resume_compatible(saved, parse_config(_base(data, tmp_path, "--lr", "0.01")))


# ---------------------------------------------------------------------------------- recipe fidelity
def test_validation_precision(data: Path, tmp_path: Path) -> None:
    def precision(*extra: str) -> str:
        return validation_precision(parse_config(_base(data, tmp_path, *extra)))

    assert precision("--amp", "bf16") == "fp32" and precision("--amp", "off", "--val-amp") == "fp32"
    assert precision("--amp", "bf16", "--val-amp") == "bf16"


def test_temperature_warning(data: Path, tmp_path: Path) -> None:
    assert recipe_warnings(parse_config(_kd(data, tmp_path))) == []
    assert recipe_warnings(parse_config(_base(data, tmp_path, "--kd-temperature", "4"))) == []  # no KD
    (warning,) = recipe_warnings(parse_config(_kd(data, tmp_path, "--kd-temperature", "4")))
    assert "--kd-temperature 4.0" in warning and "never uses it" in warning


def test_tiny_run_logs_precision_warning_and_removes_stale_files(data: Path, tmp_path: Path) -> None:
    save = tmp_path / "run"
    save.mkdir()
    dead = _dead_pid()
    (save / f"latest.pth.tmp.{dead}").write_bytes(b"\0" * 10)
    argv = _kd(data, save, "--kd-temperature", "2", "--amp", "bf16", "--kd-backend", "torch",
               "--crop-size", "32", "64", "--batch-size", "2", "--workers", "0", "--max-iterations", "1",
               "--val-per-iters", "1")
    assert train.main(argv) == 0
    log = (save / "train.log").read_text()
    assert "amp bf16 (validation fp32)" in log and "validation at it 1 (fp32): mIoU" in log
    assert "done at iteration 1: best mIoU (fp32) " in log
    assert "WARNING: --kd-temperature 2.0: the reference segmentation recipe" in log
    assert f"removed temporary files of an interrupted write: latest.pth.tmp.{dead}" in log
    assert not (save / f"latest.pth.tmp.{dead}").exists()
    records = map(json.loads, (save / "metrics.jsonl").read_text().splitlines())
    (val,) = [r for r in records if r["kind"] == "val"]
    assert val["precision"] == "fp32"
    assert ckpt.load_training_state(str(save / ckpt.LATEST))["config"]["val_amp"] is False


# ------------------------------------------------------- one runtime vocabulary for every entry point
def _inference_argv(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model", "psp_mobile", "--backbone", "mobilenetv2", "--data", str(tmp_path),
            "--pretrained", str(tmp_path / "w.pth"), "--save-dir", str(tmp_path), *extra]


@pytest.mark.parametrize(("spelling", "canonical"), [
    ("auto", "auto"), ("bf16", "bf16"), ("BF16", "bf16"), ("fp16", "fp16"), ("off", "off"), ("none", "off"),
    ("fp32", "off"), ("None", "off"),
])  # fmt: skip
def test_amp_spellings_are_the_same_for_every_entry_point(spelling: str, canonical: str,
                                                          tmp_path: Path) -> None:
    assert build_parser().parse_args(["--amp", spelling]).amp == canonical
    for script in ("eval.py", "predict.py"):
        assert _load_cli(script).parse_args(_inference_argv(tmp_path, "--amp", spelling)).amp == canonical


@pytest.mark.parametrize("script", ["train.py", "eval.py", "predict.py"])
def test_unknown_amp_is_an_argparse_error(script: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parse = build_parser().parse_args if script == "train.py" else _load_cli(script).parse_args
    argv = ["--amp", "int8"] if script == "train.py" else _inference_argv(tmp_path, "--amp", "int8")
    _exits_2(lambda: parse(argv), capsys, "argument --amp:", "int8", "bf16", "none")


def test_runtime_defaults_are_the_same_for_every_entry_point(tmp_path: Path) -> None:
    train_ns = build_parser().parse_args([])
    assert (train_ns.device, train_ns.amp, train_ns.channels_last) == ("auto", "auto", None)
    for script in ("eval.py", "predict.py"):
        ns = _load_cli(script).parse_args(_inference_argv(tmp_path))
        assert (ns.device, ns.amp, ns.channels_last) == ("auto", "auto", None)


def test_resolve_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastdist.engine.runtime import Runtime, resolve_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_runtime("auto", "auto", None, None) == Runtime("auto", "cpu", "off", False, False)
    assert resolve_runtime("cpu", "bf16", True) == Runtime("cpu", "cpu", "bf16", True, False)
    assert resolve_runtime("cpu", "fp32", None).amp == "off"
    with pytest.raises(ValueError, match="--device cuda but CUDA is not available"):
        resolve_runtime("cuda", None, None)
    with pytest.raises(ValueError, match="--device tpu: expected auto, cuda, cuda:N or cpu"):
        resolve_runtime("tpu", None, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for bf16, amp in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, bf16=bf16, **k: bf16)
        assert resolve_runtime("auto", None, None, None) == Runtime("auto", "cuda", amp, True, True)
    assert resolve_runtime("cuda:1", "off", False, False) == Runtime("cuda:1", "cuda", "off", False, False)


def test_train_help_prints_each_default_once() -> None:
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = (formatter._get_help_string(action) or "").replace("%(default)s", str(action.default))
        assert text.count("default") <= 1, (action.option_strings, text)
    assert "(default: None)" not in " ".join(formatter._get_help_string(a) or "" for a in parser._actions
                                             if a.dest in ("amp", "loader", "val_batch_size", "eval_stride"))
