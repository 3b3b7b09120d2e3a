"""Both loader backends (torch and DALI in CPU-only mode) against independent numpy computations."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdist.data import DatasetError, build_loader, list_pairs
from fastdist.data.sampler import Schedule, plan_crop
from fastdist.data.synthetic import make_synthetic_cityscapes

BACKENDS = ["torch", "dali"]
MEAN = np.array([104.00698793, 116.66876762, 122.67891434], dtype=np.float32)
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
             25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
CROP = (48, 96)


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_cityscapes(
        tmp_path_factory.mktemp("citys"), train=12, val=5, test=3, size=(64, 128)
    )


@pytest.fixture(scope="session")
def colour_coded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Blocky train-id labels (no ignore ids) and images whose colour encodes the label exactly."""
    root = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    ids = sorted(TRAIN_IDS)
    for i in range(6):
        blocks = rng.choice(ids, size=(4, 8))
        ids_map = np.kron(blocks, np.ones((16, 16), np.int64))
        label = ids_map.astype(np.uint8)
        image = np.stack([ids_map * 7, 255 - ids_map * 5, ids_map * 3], -1).astype(np.uint8)
        stem = f"town_{i:06d}_000019"
        for sub, name, arr in (("leftImg8bit", "_leftImg8bit", image), ("gtFine", "_gtFine_labelIds", label)):
            path = root / sub / "train" / "town" / f"{stem}{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path)
    return root


def reference_sample(image_path: str, label_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Independent PIL + numpy: (3, H, W) float32 BGR minus mean, (H, W) int64 train ids."""
    rgb = np.asarray(Image.open(image_path).convert("RGB"))
    image = (rgb[..., ::-1].astype(np.float32) - MEAN).transpose(2, 0, 1)
    ids = np.asarray(Image.open(label_path))
    label = np.full(ids.shape, 255, np.int64)
    for label_id, train_id in TRAIN_IDS.items():
        label[ids == label_id] = train_id
    return image, label


def loader(root: Path, split: str, backend: str, **kw):
    kw.setdefault("num_threads", 1 if backend == "dali" else 0)
    return build_loader(root, split, kw.pop("batch_size", 2), crop_size=kw.pop("crop_size", CROP),
                        backend=backend, device="cpu", **kw)  # fmt: skip


def collect(ld) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in ld]


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_exact(synth: Path, backend: str) -> None:
    pairs = list_pairs(synth, "val")
    ld = loader(synth, "val", backend, batch_size=2)
    batches = collect(ld)
    assert len(ld) == len(batches) == 3 and [len(y) for _, y in batches] == [2, 2, 1]
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.dtype == torch.float32 and labels.dtype == torch.int64
    assert images.is_contiguous(memory_format=torch.channels_last)
    for i, pair in enumerate(pairs):
        ref_image, ref_label = reference_sample(pair.image, pair.label)
        assert np.array_equal(images[i].numpy(), ref_image)
        assert np.array_equal(labels[i].numpy(), ref_label)
    assert (labels == 255).any() and (labels < 19).any()


def test_val_backends_agree_bitwise(synth: Path) -> None:
    for kw in ({}, {"channels_last": False}, {"dtype": torch.bfloat16}):
        a, b = (collect(loader(synth, "val", be, batch_size=2, **kw)) for be in BACKENDS)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert xa.dtype == kw.get("dtype", torch.float32)
            assert xa.is_contiguous() == (not kw.get("channels_last", True)) or xa.is_contiguous()
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            assert xa.stride() == xb.stride()


def expected_label(label: np.ndarray, plan, crop: tuple[int, int]) -> np.ndarray:
    """Independent numpy of the label path: nearest (cv2 rule), pad 255 bottom-right, crop, flip."""
    rows, cols = (
        np.minimum(np.floor(np.arange(out) * (1.0 / plan.scale)).astype(int), size - 1)
        for out, size in ((plan.height, label.shape[0]), (plan.width, label.shape[1]))
    )
    scaled = label[rows][:, cols]
    padded = np.full((max(plan.height, crop[0]), max(plan.width, crop[1])), 255, np.int64)
    padded[: plan.height, : plan.width] = scaled
    out = padded[plan.top : plan.top + crop[0], plan.left : plan.left + crop[1]]
    return out[:, ::-1] if plan.flip else out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("crop", [CROP, (80, 160)])
def test_train_geometry(synth: Path, backend: str, crop: tuple[int, int]) -> None:
    """Labels follow the scheduled scale/pad/crop/flip; padding is 0 / 255 exactly, nowhere else."""
    pairs = list_pairs(synth, "train")
    sched = Schedule(len(pairs), 3, True, seed=7, max_iterations=4)
    batches = collect(loader(synth, "train", backend, batch_size=3, seed=7, max_iterations=4, crop_size=crop))
    assert len(batches) == 4
    for (images, labels), specs in zip(batches, sched, strict=True):
        assert images.shape == (3, 3, *crop) and labels.shape == (3, *crop)
        for image, label, spec in zip(images, labels, specs, strict=True):
            _, ref = reference_sample(pairs[spec.index].image, pairs[spec.index].label)
            plan = plan_crop(*ref.shape, spec.augment, crop)
            want = expected_label(ref, plan, crop)
            agree = (label.numpy() == want).mean()
            assert agree == 1.0 if backend == "torch" else agree > 0.998  # DALI: float ties only
            pad = np.zeros(crop, bool)
            pad[plan.valid_h :] = True
            if plan.flip:
                pad[:, : crop[1] - plan.valid_w] = True
            else:
                pad[:, plan.valid_w :] = True
            zero = (image == 0).any(0).numpy()
            assert np.array_equal(zero, pad) and (image[:, torch.from_numpy(pad)] == 0).all()
            assert (label.numpy()[pad] == 255).all()
    if crop == (80, 160):
        assert any((y == 255).all(-1).any() for _, y in batches)  # some padding happened


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_alignment(colour_coded: Path, backend: str) -> None:
    """Image and label stay aligned at every pixel (colour encodes label), under every scale/flip."""
    lut = np.full((256, 256), -1, np.int64)
    for label_id, train_id in TRAIN_IDS.items():
        lut[label_id * 7 % 256, (255 - label_id * 5) % 256] = train_id
    ld = loader(colour_coded, "train", backend, batch_size=3, crop_size=(64, 128), max_iterations=12, seed=3)
    checked = 0
    for images, labels in ld:
        bgr = torch.round(images.permute(0, 2, 3, 1) + torch.from_numpy(MEAN)).to(torch.int64).numpy()
        decoded = lut[bgr[..., 2], bgr[..., 1]]
        lab = labels.numpy()
        # interior pixels: the 5x5 label neighbourhood is uniform (bilinear blends at the edges)
        pad = np.pad(lab, ((0, 0), (2, 2), (2, 2)), mode="edge")
        windows = np.lib.stride_tricks.sliding_window_view(pad, (5, 5), axis=(1, 2))
        interior = (windows == lab[..., None, None]).all((-1, -2)) & (lab != 255)
        assert np.array_equal(decoded[interior], lab[interior])
        assert (lab[(images == 0).all(1).numpy()] == 255).all()
        assert ((lab == 255) == (images == 0).all(1).numpy()).all()  # no ignore ids: 255 is padding
        checked += interior.sum()
    assert checked > 12 * 3 * 64 * 128 // 2


def test_train_backends_agree_in_distribution(synth: Path) -> None:
    a, b = (collect(loader(synth, "train", be, batch_size=4, max_iterations=3, seed=1)) for be in BACKENDS)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        # same schedule: labels differ only at float ties of the nearest rule, pixels by rounding
        assert (ya == yb).float().mean() > 0.998
        diff = (xa - xb).abs()
        assert diff.max() <= 1.0 + 1e-4 and (diff > 0.5).float().mean() < 0.02
        assert torch.equal(xa == 0, xb == 0)
    ha = torch.bincount(torch.cat([y for _, y in a]).flatten(), minlength=256).float()
    hb = torch.bincount(torch.cat([y for _, y in b]).flatten(), minlength=256).float()
    assert ((ha - hb).abs().sum() / ha.sum()) < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_and_reproducible(synth: Path, backend: str) -> None:
    full = collect(loader(synth, "train", backend, batch_size=2, max_iterations=8, seed=2))
    again = collect(loader(synth, "train", backend, batch_size=2, max_iterations=8, seed=2))
    tail = collect(loader(synth, "train", backend, batch_size=2, max_iterations=8, seed=2, start_iteration=5))
    assert len(full) == 8 and len(tail) == 3
    for (xa, ya), (xb, yb) in zip(full, again, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(full[5:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_torch_workers_match_main_process(synth: Path) -> None:
    a = collect(loader(synth, "train", "torch", max_iterations=3, num_threads=0))
    b = collect(loader(synth, "train", "torch", max_iterations=3, num_threads=2))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_loader_leaves_global_rng_alone(synth: Path, workers: int) -> None:
    """Exact resume needs the training RNG to be independent of how the data is loaded."""
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    collect(loader(synth, "train", "torch", max_iterations=2, num_threads=workers))
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_val_sharding_through_loader(synth: Path, backend: str, world_size: int) -> None:
    single = torch.cat([x for x, _ in collect(loader(synth, "val", backend, batch_size=1))])
    got = []
    for rank in range(world_size):
        ld = loader(synth, "val", backend, batch_size=1, rank=rank, world_size=world_size)
        got.append(torch.cat([x for x, _ in collect(ld)]))
        assert len(ld) == len(got[-1])
    assert max(map(len, got)) - min(map(len, got)) <= 1
    for rank in range(world_size):
        assert torch.equal(got[rank], single[rank::world_size])


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_png_names_file(synth: Path, tmp_path: Path, backend: str) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=0, val=3, size=(16, 32))
    bad = list_pairs(root, "val")[1].image
    data = Path(bad).read_bytes()
    Path(bad).write_bytes(data[:60] + b"\x00" * 40 + data[100:])
    with pytest.raises(DatasetError, match=Path(bad).name):
        collect(loader(root, "val", backend, batch_size=1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_sizes_and_test_split(synth: Path, tmp_path: Path, backend: str) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=0, val=2, test=2, size=(16, 32))
    pair = list_pairs(root, "val")[0]
    Image.fromarray(np.zeros((20, 32, 3), np.uint8)).save(pair.image)
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(pair.label)
    with pytest.raises(DatasetError, match="different sizes"):
        collect(loader(root, "val", backend, batch_size=2))
    assert len(collect(loader(root, "val", backend, batch_size=1))) == 2
    for lbl in (root / "gtFine" / "test").rglob("*.png"):
        lbl.unlink()
    import shutil

    shutil.rmtree(root / "gtFine" / "test")
    ((images, labels),) = collect(loader(root, "test", backend, batch_size=2))
    assert images.shape == (2, 3, 16, 32) and labels.shape == (2, 16, 32) and (labels == 255).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_pairs_refused_before_loading(tmp_path: Path, backend: str) -> None:
    """A label of another size or in palette mode: an error naming the files, before any batch."""
    root = make_synthetic_cityscapes(tmp_path, train=0, val=2, size=(16, 32))
    pair = list_pairs(root, "val")[1]
    Image.fromarray(np.full((16, 30), 7, np.uint8)).save(pair.label)
    with pytest.raises(DatasetError) as err:
        loader(root, "val", backend, batch_size=1)
    assert f"{pair.image} is 16x32 but {pair.label} is 16x30" in str(err.value)
    Image.fromarray(np.full((16, 32), 7, np.uint8)).convert("P").save(pair.label)
    with pytest.raises(DatasetError, match="mode 'P'") as err:
        loader(root, "val", backend, batch_size=1)
    assert pair.label in str(err.value)


def _signal_from_elsewhere(pids: list[int], signals: tuple[signal.Signals, ...]) -> None:
    """Send ``signals`` to ``pids`` from another process, as torchrun's agent or a terminal does."""
    code = f"import os\nfor s in {[int(s) for s in signals]}:\n    for p in {pids}:\n        os.kill(p, s)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_torch_workers_survive_foreign_signals(synth: Path) -> None:
    """SIGTERM/SIGINT from another process do not kill the workers (the main process decides), the
    batches go on unchanged, and shutting the loader down still stops the workers."""
    want = collect(loader(synth, "train", "torch", max_iterations=6, num_threads=0))
    before = set(multiprocessing.active_children())
    ld = loader(synth, "train", "torch", max_iterations=6, num_threads=2)
    batches = iter(ld)
    got = [(x.clone(), y.clone()) for x, y in (next(batches), next(batches))]  # one from each worker
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2
    _signal_from_elsewhere([w.pid for w in workers], (signal.SIGTERM, signal.SIGINT))
    for worker in workers:
        worker.join(timeout=0.5)
    assert all(worker.is_alive() for worker in workers)
    got += collect(batches)
    assert len(got) == len(want)
    for (xa, ya), (xb, yb) in zip(got, want, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    del batches, ld  # the DataLoader's shutdown stops the (persistent) workers
    for worker in workers:
        worker.join(timeout=10)
    assert not any(worker.is_alive() for worker in workers)


GROUP_SIGNAL_SCRIPT = """
import os, signal, subprocess, sys
from fastdist.data import build_loader

received = []
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: received.append(signum))  # a preemption handler
ld = build_loader(sys.argv[1], "train", 2, crop_size=(32, 64), backend="torch", device="cpu",
                  num_threads=2, max_iterations=6)
batches = iter(ld)
next(batches), next(batches)
# what torchrun's agent does to each rank (and the terminal on Ctrl-C): signal its whole process group
kill = "import os, signal as S; [(S.signal(s, S.SIG_IGN), os.killpg({}, s)) for s in (S.SIGTERM, S.SIGINT)]"
subprocess.run([sys.executable, "-c", kill.format(os.getpgrp())], check=True)
print(sorted(received), 2 + sum(1 for _ in batches), flush=True)
# exit with the loader and its workers alive: multiprocessing terminates them at exit, which must work
"""


def test_torch_loader_under_group_signal_and_exit(synth: Path) -> None:
    """The preemption path end to end, in a process group of its own: the main process gets the
    signals and finishes its batches, then exits promptly and cleanly with the workers still up."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-c", GROUP_SIGNAL_SCRIPT, str(synth)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30, start_new_session=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == f"[{int(signal.SIGINT)}, {int(signal.SIGTERM)}] 6"
    assert proc.stderr == ""


@pytest.mark.parametrize("scale", [0.5, 0.7, 1.0, 1.3, 2.0])
def test_torch_window_resize_matches_full_interpolate(scale: float) -> None:
    """The crop-window resize equals resizing the whole image with torch, then cropping."""
    from fastdist.data.sampler import Augment
    from fastdist.data.torch_loader import _augment

    gen = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (37, 61, 3), dtype=torch.uint8, generator=gen)
    label = torch.randint(0, 19, (37, 61), dtype=torch.uint8, generator=gen)
    crop = (30, 50)
    plan = plan_crop(37, 61, Augment(scale, 0.6, 0.3, False), crop)
    out_img, out_lbl = _augment(image, label, plan, crop)
    size = (plan.height, plan.width)
    # cv2's mapping (step 1 / scale); edge-replicated so that floor(in * s) covers round(in * s)
    padded = torch.nn.functional.pad(image.permute(2, 0, 1)[None].float(), (0, 2, 0, 2), mode="replicate")
    full = torch.nn.functional.interpolate(
        padded, scale_factor=scale, mode="bilinear", align_corners=False, recompute_scale_factor=False
    )[0].permute(1, 2, 0)
    window = (slice(plan.top, plan.top + plan.valid_h), slice(plan.left, plan.left + plan.valid_w))
    want_img = (full + 0.5).floor()[window]
    got = out_img[: plan.valid_h, : plan.valid_w].float()
    assert (got - want_img).abs().max() <= 1 and (got != want_img).float().mean() < 0.01
    rows, cols = (torch.arange(n, dtype=torch.float64).mul(1.0 / scale).floor().long() for n in size)
    want_lbl = label[rows.clamp(max=36)][:, cols.clamp(max=60)][window]
    assert torch.equal(out_lbl[: plan.valid_h, : plan.valid_w], want_lbl)
    assert (out_img[plan.valid_h :] == 0).all() and (out_lbl[plan.valid_h :] == 255).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_matches_cpu(synth: Path, backend: str) -> None:
    """On a GPU (mixed decoding, GPU operators / pinned copies) the batches equal the CPU ones."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="DALI is not installed (e.g. the lent GPU machines)")
    for split, kw in (("val", {}), ("train", {"max_iterations": 3, "seed": 4})):
        cpu = collect(loader(synth, split, backend, batch_size=2, **kw))
        gpu = [
            (x.clone(), y.clone())
            for x, y in build_loader(synth, split, 2, crop_size=CROP, backend=backend, device="cuda", **kw)
        ]
        assert len(cpu) == len(gpu)
        for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
            assert xg.is_cuda and yg.is_cuda and xg.is_contiguous(memory_format=torch.channels_last)
            if split == "val":
                assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())
            else:  # GPU resize kernels may round differently from the CPU ones
                assert (yc == yg.cpu()).float().mean() > 0.998
                assert (xc - xg.cpu()).abs().max() <= 1.0 + 1e-4
                assert torch.equal(xc == 0, xg.cpu() == 0)


def test_without_dali_the_torch_backend_is_the_default(synth: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without DALI (as the lent GPU machines): 'auto' picks torch, asking for dali is a clear
    error at build time, never a failure in the middle of an epoch."""
    from fastdist.data import dali_available, default_backend

    assert dali_available() and default_backend("cuda") == "dali" and default_backend("cpu") == "torch"
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # what an absent package looks like
    assert not dali_available() and default_backend("cuda") == "torch"
    with pytest.raises(RuntimeError, match="needs NVIDIA DALI .*--loader torch"):
        build_loader(synth, "val", 2, crop_size=CROP, backend="dali", device="cpu")


def _corrupt_idat_crc(path: str) -> None:
    """Flip the CRC of the first IDAT chunk (the pixel data itself stays intact)."""
    data = bytearray(Path(path).read_bytes())
    start = data.index(b"IDAT") - 4
    length = int.from_bytes(data[start : start + 4], "big")
    crc = start + 8 + length
    data[crc : crc + 4] = bytes(b ^ 0xFF for b in data[crc : crc + 4])
    Path(path).write_bytes(bytes(data))


@pytest.mark.parametrize("backend", BACKENDS)
def test_label_with_corrupt_idat_crc_names_the_label(tmp_path: Path, backend: str) -> None:
    root = make_synthetic_cityscapes(tmp_path, train=0, val=2, size=(16, 32))
    pair = list_pairs(root, "val")[1]
    _corrupt_idat_crc(pair.label)
    with pytest.raises(DatasetError) as err:
        collect(loader(root, "val", backend, batch_size=2))
    assert pair.label in str(err.value) and pair.image not in str(err.value)
