"""evaluate() (multi-scale, flip, exact-prediction cases), eval.py and predict.py end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fastdist.data.cityscapes import IGNORE_INDEX, TRAIN_ID_TO_LABEL_ID, label_lut, list_pairs
from fastdist.data.synthetic import make_synthetic_cityscapes
from fastdist.engine.distributed import (
    DistributedSetupError,
    barrier,
    cleanup_distributed,
    setup_distributed,
)
from fastdist.engine.evaluation import evaluate
from fastdist.engine.inference import infer_logits
from fastdist.engine.metrics import ConfusionMatrix
from fastdist.engine.prediction import prediction_paths
from fastdist.models import build_model

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4
CODE = 10.0  # image channel 0 holds class * CODE


class ExactModel(nn.Module):
    """Decodes the class from image channel 0 (``class * CODE``): logits peak at the nearest class.

    ``stride`` > 1 returns logits at 1/stride resolution (like the real models, at 1/8).
    """

    def __init__(self, num_classes: int = NUM_CLASSES, stride: int = 1) -> None:
        super().__init__()
        self.register_buffer("centres", torch.arange(num_classes, dtype=torch.float32) * CODE)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        code = x[:, :1]
        if self.stride > 1:
            code = F.avg_pool2d(code, self.stride)
        return {"out": -((code - self.centres.view(1, -1, 1, 1)) ** 2)}


def _encode(label: torch.Tensor) -> torch.Tensor:
    """(B, H, W) labels -> (B, 3, H, W) images whose channel 0 encodes the class (ignore: class 0)."""
    cls = torch.where(label == IGNORE_INDEX, torch.zeros_like(label), label).float()
    noise = torch.linspace(-50, 50, label.numel()).view(label.shape)
    return torch.stack([cls * CODE, noise, -noise], dim=1)


def _constant_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One class per image (so every resize keeps the answer exact), all classes, some ignore pixels."""
    batches = []
    for classes in ([0, 1], [2, 3], [1]):
        label = torch.tensor(classes).view(-1, 1, 1).expand(-1, 21, 34).clone()
        images = _encode(label)  # constant code: ignore only in the label, after encoding
        label[:, :2, :3] = IGNORE_INDEX
        batches.append((images, label))
    return batches


def _layout_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Left/right asymmetric blocks: a flip that is not undone would be caught."""
    label = torch.zeros(2, 16, 24, dtype=torch.long)
    label[:, :, 5:] = 1
    label[0, 8:, 15:] = 2
    label[1, :4, 20:] = 3
    label[1, 10:, :2] = IGNORE_INDEX
    return _encode(label), label


@pytest.mark.parametrize("stride", [1, 8])
def test_exact_model_multiscale_flip_gives_miou_one(stride: int) -> None:
    res = evaluate(ExactModel(stride=stride), _constant_batches(), NUM_CLASSES, "cpu",
                   scales=(0.75, 1.0, 1.25), flip=True)
    assert res["mIoU"] == 1.0 and res["pixAcc"] == 1.0 and res["IoU"] == [1.0] * NUM_CLASSES
    assert res["images"] == 5


def test_exact_model_on_layout_with_flip_and_channels_last() -> None:
    images, labels = _layout_batch()
    loader = [(images.contiguous(memory_format=torch.channels_last), labels)]
    res = evaluate(ExactModel(), loader, NUM_CLASSES, "cpu", flip=True)
    assert res["mIoU"] == 1.0 and res["pixAcc"] == 1.0


def test_wrong_predictions_are_counted() -> None:
    images, labels = _layout_batch()
    shifted = [(images + CODE, labels)]  # every class predicted one higher (3 saturates)
    res = evaluate(ExactModel(), shifted, NUM_CLASSES, "cpu")
    valid = labels != IGNORE_INDEX
    cm = ConfusionMatrix(NUM_CLASSES)
    cm.update((labels + 1).clamp(max=3), labels)
    assert res["pixAcc"] == pytest.approx(float((labels[valid] == 3).float().mean()))
    assert res == {**cm.compute(), "images": 2}


def test_infer_logits_matches_reference_tta() -> None:
    torch.manual_seed(0)
    net = nn.Conv2d(3, 5, 3, padding=1, bias=True).eval()
    x = torch.randn(2, 3, 19, 27)

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, size=(19, 27), mode="bilinear", align_corners=True)

    expected = torch.zeros(2, 5, 19, 27)
    for s in (0.5, 1.0, 1.5):
        xs = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=True) if s != 1.0 else x
        expected += 0.5 * (up(net(xs)) + up(net(xs.flip(3))).flip(3))
    expected /= 3
    with torch.no_grad():
        got = infer_logits(net, x, None, (0.5, 1.0, 1.5), flip=True)
    assert got.shape == (2, 5, 19, 27) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_evaluate_real_model_shapes_amp_and_train_state() -> None:
    torch.manual_seed(0)
    model = build_model("psp_mobile", "mobilenetv2", num_classes=NUM_CLASSES).to(
        memory_format=torch.channels_last)
    model.train()
    label = torch.randint(0, NUM_CLASSES, (2, 29, 45))
    images = torch.randn(2, 3, 29, 45).contiguous(memory_format=torch.channels_last)
    res = evaluate(model, [(images, label)], NUM_CLASSES, torch.device("cpu"), scales=(0.75, 1.25),
                   flip=True, amp="bf16")
    assert model.training, "evaluate must restore train mode"
    assert set(res) == {"mIoU", "pixAcc", "IoU", "images"} and len(res["IoU"]) == NUM_CLASSES
    assert 0.0 <= res["mIoU"] <= 1.0 and res["images"] == 2
    with torch.inference_mode():
        out = infer_logits(model.eval(), images, (31, 47), (0.75, 1.25), flip=True)
    assert out.shape == (2, NUM_CLASSES, 31, 47)


_DDP_SCRIPT = """
import json, sys
import torch
from torch import nn
from fastdist.engine.distributed import setup_distributed, cleanup_distributed, exit_process
from fastdist.engine.evaluation import evaluate
from fastdist.engine.inference import infer_logits
from fastdist.engine.metrics import ConfusionMatrix

env = setup_distributed("cpu")
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 5, 1))
batches = [(torch.randn(2, 3, 12, 16), torch.randint(0, 5, (2, 12, 16))) for _ in range(5)]
ddp = nn.parallel.DistributedDataParallel(net)
ddp.train()
mine = batches[env.rank::env.world_size]  # 3 batches on rank 0, 2 on rank 1
res = evaluate(ddp, mine, 5, env.device, scales=(0.5, 1.0), flip=True)
assert ddp.training and net.training
local = ConfusionMatrix(5)  # every image, this process only (no all_reduce)
with torch.inference_mode():
    for images, labels in batches:
        local.update(infer_logits(net.eval(), images, None, (0.5, 1.0), True).argmax(1), labels)
if env.is_main:
    json.dump({"dist": res, "single": {**local.compute(), "images": 10}}, open(sys.argv[1], "w"))
cleanup_distributed()
exit_process(0)
"""


def test_evaluate_ddp_model_with_unequal_shards_on_two_ranks(tmp_path: Path) -> None:
    script = tmp_path / "ddp_eval.py"
    script.write_text(_DDP_SCRIPT)
    out = tmp_path / "out.json"
    proc = torchrun(str(script), [str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dist"] == res["single"] and res["dist"]["images"] == 10


# ---------------------------------------------------------------------------------------------
# eval.py / predict.py on synthetic Cityscapes

VAL_IMAGES, TEST_IMAGES = 5, 3  # odd: the two ranks get different numbers of images
LABEL_IDS = set(TRAIN_ID_TO_LABEL_ID.values())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cityscapes")
    make_synthetic_cityscapes(root, train=0, val=VAL_IMAGES, test=TEST_IMAGES, size=(48, 96), seed=3)
    shutil.rmtree(root / "gtFine" / "test")  # the real test split has no usable labels
    torch.manual_seed(0)
    model = build_model("psp_mobile", "mobilenetv2")
    with torch.no_grad():  # spread the logits so several classes get predicted
        for p in model.head.parameters():
            p.mul_(4.0)
    ckpt = root / "psp_mobile.pth"
    torch.save({"model": model.state_dict(), "iteration": 7}, ckpt)
    bad = root / "deeplab_mobile.pth"
    torch.save(build_model("deeplab_mobile", "mobilenetv2").state_dict(), bad)
    return {"root": root, "ckpt": ckpt, "bad": bad}


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _cli(script: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``script`` as a single process."""
    return subprocess.run([sys.executable, script, *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``script`` as 2 CPU ranks (gloo) under ``torch.distributed.run``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", script, *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _model_args(ws: dict[str, Path], ckpt: str = "ckpt") -> list[str]:
    return ["--model", "psp_mobile", "--backbone", "mobilenetv2", "--data", str(ws["root"]),
            "--pretrained", str(ws[ckpt]), "--device", "cpu"]


def test_eval_cli_single_and_two_ranks_agree(workspace: dict[str, Path], tmp_path: Path) -> None:
    common = [*_model_args(workspace), "--loader", "torch", "--workers", "0", "--scales", "0.75", "1.0",
              "--flip-eval"]
    single = _cli("eval.py", [*common, "--save-dir", str(tmp_path / "one")])
    assert single.returncode == 0, single.stderr[-3000:]
    assert "mIoU" in single.stdout and "road" in single.stdout
    dist = torchrun("eval.py", [*common, "--save-dir", str(tmp_path / "two")])
    assert dist.returncode == 0, dist.stderr[-3000:]
    name = "eval_psp_mobile_mobilenetv2_val.json"
    one = json.loads((tmp_path / "one" / name).read_text())
    two = json.loads((tmp_path / "two" / name).read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["images"] == two["images"] == VAL_IMAGES
    for key in ("mIoU", "pixAcc", "IoU"):
        assert one[key] == two[key], key
    assert list(one["IoU"])[:2] == ["road", "sidewalk"] and len(one["IoU"]) == 19
    # the same numbers from predict.py's labelId files, mapped back to train ids
    pred_dir = tmp_path / "pred"
    proc = _cli("predict.py", [*_model_args(workspace), "--split", "val", "--save-dir", str(pred_dir),
                               "--scales", "0.75", "1.0", "--flip-eval", "--no-color"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (pred_dir / "color").exists()
    cm = ConfusionMatrix(19)
    lut = torch.from_numpy(label_lut().astype(np.int64))
    for pair in list_pairs(workspace["root"], "val"):
        label_path, _ = prediction_paths(pair.image, str(pred_dir))
        pred = lut[torch.from_numpy(np.array(Image.open(label_path))).long()]
        cm.update(pred, lut[torch.from_numpy(np.array(Image.open(pair.label))).long()])
    res = cm.compute()
    assert res["mIoU"] == pytest.approx(one["mIoU"], abs=1e-12)
    assert res["pixAcc"] == pytest.approx(one["pixAcc"], abs=1e-12)


def test_predict_cli_two_ranks_on_unlabelled_test_split(workspace: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pred"
    proc = torchrun("predict.py", [*_model_args(workspace), "--save-dir", str(out), "--workers", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = sorted((workspace["root"] / "leftImg8bit" / "test").rglob("*_leftImg8bit.png"))
    assert len(images) == TEST_IMAGES
    written = sorted((out / "labelIds").rglob("*.png"))
    assert [p.relative_to(out / "labelIds") for p in written] == [
        p.relative_to(workspace["root"] / "leftImg8bit" / "test") for p in images]
    for img_path, label_path in zip(images, written, strict=True):
        label = Image.open(label_path)
        assert label.mode == "L" and label.size == Image.open(img_path).size
        assert set(np.unique(np.asarray(label)).tolist()) <= LABEL_IDS
        city, stem = img_path.parent.name, img_path.name[: -len("_leftImg8bit.png")]
        colour = Image.open(out / "color" / city / f"{stem}_color.png")
        assert colour.mode == "P" and colour.size == label.size
        assert colour.getpalette()[:6] == [128, 64, 128, 244, 35, 232]


def _load_cli(script: str) -> ModuleType:
    """Import eval.py / predict.py as a module (for in-process error-path checks)."""
    spec = importlib.util.spec_from_file_location(f"cli_{Path(script).stem}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _changed(ws: dict[str, Path], change: dict[str, str]) -> list[str]:
    args = _model_args(ws)
    for flag, value in change.items():
        value = str(ws[value]) if value in ws else value
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--data": "/nonexistent/cityscapes"}, "does not exist"),
        ({"--pretrained": "bad"}, "does not fit --model psp_mobile"),
    ],
)
def test_eval_cli_errors_are_fast_and_clear(workspace: dict[str, Path], change: dict[str, str],
                                            message: str) -> None:
    start = time.perf_counter()
    proc = _cli("eval.py", _changed(workspace, change), timeout=60)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert elapsed < 30, f"eval.py took {elapsed:.1f} s to fail"


@pytest.mark.parametrize(
    ("script", "change", "message"),
    [
        ("eval.py", {"--pretrained": "/nonexistent/model.pth"}, "checkpoint /nonexistent/model.pth does not"),
        ("eval.py", {"--model": "pspnet"}, "unknown --model 'pspnet'"),
        ("eval.py", {"--backbone": "resnet18"}, "does not take --backbone 'resnet18'"),
        ("predict.py", {"--data": "/nonexistent/cityscapes"}, "does not exist"),
        ("predict.py", {"--pretrained": "bad"}, "does not fit --model psp_mobile"),
        ("predict.py", {"--save-dir": "ckpt"}, "exists and is not a folder"),
    ],
)
def test_cli_errors_in_process(workspace: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                               script: str, change: dict[str, str], message: str) -> None:
    args = _changed(workspace, change)
    if script == "predict.py" and "--save-dir" not in change:
        args += ["--save-dir", str(tmp_path / "out")]
    assert _load_cli(script).main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{script}: error: ") and message in err
    assert not (tmp_path / "out").exists()


def test_eval_needs_labels(workspace: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert _load_cli("eval.py").main([*_model_args(workspace), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert "split 'test'" in err and "has no labels" in err and "predict.py" in err


def test_eval_scores_the_train_split_on_whole_images(workspace: dict[str, Path], tmp_path: Path) -> None:
    """A train split holding the val images scores exactly as val: no training augmentation."""
    root = tmp_path / "train_is_val"
    for top in ("leftImg8bit", "gtFine"):
        shutil.copytree(workspace["root"] / top / "val", root / top / "train")
    cli = _load_cli("eval.py")
    common = ["--loader", "torch", "--workers", "0"]
    val = cli.run(cli.parse_args([*_model_args(workspace), *common]))
    train_args = _changed(workspace, {"--data": str(root)})
    train = cli.run(cli.parse_args([*train_args, *common, "--split", "train"]))
    assert train["images"] == val["images"] == VAL_IMAGES
    assert (train["mIoU"], train["pixAcc"]) == (val["mIoU"], val["pixAcc"])


# ---------------------------------------------------------------------------------------------
# setup_distributed (the 2-rank gloo path runs in the torchrun tests above and in test_metrics.py)


def test_setup_distributed_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = setup_distributed("cpu")
    assert (env.rank, env.world_size, env.local_rank, env.is_main) == (0, 1, 0, True)
    assert env.device == torch.device("cpu") and not env.distributed
    assert not torch.distributed.is_initialized()
    barrier()
    cleanup_distributed()


@pytest.mark.parametrize(
    ("environ", "device", "message"),
    [
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "cpu", "launch with torchrun"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "cpu", "invalid torchrun environment"),
        ({"WORLD_SIZE": "two"}, "cpu", "not an integer"),
        ({}, "tpu", "unknown device"),
        ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, "fake-one-gpu", "only 1 CUDA device"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "fake-one-gpu:1", "conflicts with torchrun"),
    ],
)
def test_setup_distributed_errors(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], device: str,
                                  message: str) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    for var, value in environ.items():
        monkeypatch.setenv(var, value)
    if device.startswith("fake-one-gpu"):  # a 1-GPU machine, without touching CUDA
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        device = device.replace("fake-one-gpu", "cuda")
    with pytest.raises(DistributedSetupError, match=message):
        setup_distributed(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_setup_distributed_cuda_without_cuda() -> None:
    with pytest.raises(DistributedSetupError, match="CUDA is not available"):
        setup_distributed("cuda")
