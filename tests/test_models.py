"""Tests of fastdist.models: reference key layout, shapes, checkpoints, channels-last, autocast, compile."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastdist.models import (
    BACKBONE_NAMES,
    MODEL_NAMES,
    CheckpointError,
    build_model,
    load_checkpoint,
    load_pretrained_backbone,
    to_reference_state_dict,
)

# State-dict keys/shapes, parameter counts and output shapes read from the reference implementation
# (a copy of shared/reference/model_keys.json).
MODEL_KEYS = Path(__file__).with_name("data") / "model_keys.json"
CONFIGS = {
    "deeplabv3_resnet101": ("deeplabv3", "resnet101"),
    "deeplabv3_resnet18": ("deeplabv3", "resnet18"),
    "psp_resnet18": ("psp", "resnet18"),
    "deeplab_mobile_mobilenetv2": ("deeplab_mobile", "mobilenetv2"),
    "psp_mobile_mobilenetv2": ("psp_mobile", "mobilenetv2"),
}
SMALL = ["deeplabv3_resnet18", "psp_resnet18", "deeplab_mobile_mobilenetv2", "psp_mobile_mobilenetv2"]
# Parameter counts of the reference models (DIST_KD segmentation/models, 19 classes).
REFERENCE_PARAMS = {
    "deeplabv3_resnet101": 61_118_950,
    "deeplabv3_resnet18": 13_607_974,
    "psp_resnet18": 12_919_334,
    "deeplab_mobile_mobilenetv2": 3_233_171,
    "psp_mobile_mobilenetv2": 2_654_739,
}
CL = torch.channels_last
# torch.compile / nn.DataParallel import code that uses the deprecated torch.jit.script_method.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
# Golden summaries (_summary) of the reference implementation (DIST_KD segmentation/models), eval mode,
# with _deterministic_state_dict weights and _golden_input: our outputs must reproduce them.
GOLDEN = {
    "deeplabv3_resnet101": {
        "out": [-0.04169575, 0.3321202, 0.2683184, -1.102808, 0.2537961],
        "aux": [0.1177076, 1.101387, -0.7812962, 0.2368858, 0.4142945],
    },
    "deeplabv3_resnet18": {
        "out": [0.06760285, 0.1228947, 0.1892081, -0.02829792, -0.00617747],
        "aux": [0.02097072, 0.2425194, 0.4758152, -0.4984334, -0.1840256],
    },
    "psp_resnet18": {
        "out": [0.005375282, 0.1963739, 0.249419, 0.3567839, -0.1283883],
        "aux": [0.05946855, 0.3040636, 0.6058223, 0.2169976, 0.3439248],
    },
    "deeplab_mobile_mobilenetv2": {
        "out": [-0.07275683, 0.1516754, 0.00348068, -0.2290259, -0.1551379],
    },
    "psp_mobile_mobilenetv2": {
        "out": [0.03083703, 0.1266382, 0.1176478, 0.01079302, -0.04576273],
    },
}


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(MODEL_KEYS.read_text())["models"]


@pytest.fixture(scope="module")
def models() -> Callable[[str], nn.Module]:
    """Lazily built eval-mode models, one per configuration and test module (do not mutate them)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = build_model(*CONFIGS[name]).eval()
        return cache[name]

    return get


def _synthetic_state_dict(entries: dict[str, list[int]], offset: float = 0.0) -> dict[str, Tensor]:
    """Tensors with the given keys and shapes, a distinct value per key (``num_batches_tracked``: int64)."""
    state = {}
    for i, (key, shape) in enumerate(entries.items()):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000 + i, dtype=torch.long)
        else:
            state[key] = torch.full(shape, offset + 1e-3 * (i + 1))
    return state


def _hash_noise(n: int, salt: int) -> Tensor:
    """Platform-independent pseudo-random values with zero mean and unit variance (float64)."""
    u = torch.frac(torch.sin(torch.arange(n, dtype=torch.float64) * 12.9898 + salt * 78.233) * 43758.5453)
    return (u.abs() - 0.5) * math.sqrt(12.0)


def _deterministic_state_dict(entries: dict[str, list[int]]) -> dict[str, Tensor]:
    """Weights for golden-value tests: fan-in scaled convolutions, BN statistics near (0, 1)."""
    state = {}
    for i, (key, shape) in enumerate(entries.items()):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0)
            continue
        noise = _hash_noise(math.prod(shape), i).reshape(shape)
        if len(shape) == 4:
            value = noise / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(("running_var", "weight")):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.1 * noise
        state[key] = value.float()
    return state


def _golden_input(height: int = 33, width: int = 47) -> Tensor:
    return _hash_noise(3 * height * width, -1).reshape(1, 3, height, width).float()


def _summary(logits: Tensor) -> list[float]:
    """Mean, mean |x| and three logits of a (1, 19, 5, 6) output."""
    picks = [logits[0, 0, 0, 0], logits[0, 7, 2, 3], logits[0, 18, 4, 5]]
    return [logits.mean().item(), logits.abs().mean().item(), *(p.item() for p in picks)]


def _assert_state_equal(model: nn.Module, state: dict[str, Tensor]) -> None:
    ours = model.state_dict()
    assert list(ours) == list(state)
    for key, value in state.items():
        assert torch.equal(ours[key], value), key


def _relative_error(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# ---------------------------------------------------------------------------------------------------
# Architecture: keys, shapes, parameter counts, outputs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_matches_reference(name: str, reference: dict, models: Callable) -> None:
    model = models(name)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = reference[name]["state_dict"]
    assert list(ours) == list(expected), (set(ours) ^ set(expected))
    assert ours == expected
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == reference[name]["n_params"] == REFERENCE_PARAMS[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_output_shapes(name: str, reference: dict) -> None:
    """Shapes for the reference 1x3x256x512 input (computed on the meta device: no FLOPs)."""
    with torch.device("meta"):
        model = build_model(*CONFIGS[name]).eval()
        out = model(torch.empty(1, 3, 256, 512))
    expected = reference[name]["outputs"]
    assert list(out["out"].shape) == expected[0]
    if name.split("_")[1].startswith("resnet"):
        assert list(out["aux"].shape) == expected[1]
    else:
        assert set(out) == {"out"}


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("size", [(65, 97), (64, 64), (17, 23), (8, 9)])
def test_output_shapes(name: str, size: tuple[int, int], models: Callable) -> None:
    model = models(name)
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    expected = (1, 19, math.ceil(size[0] / 8), math.ceil(size[1] / 8))
    assert set(out) == ({"out", "aux"} if "resnet" in name else {"out"})
    for value in out.values():
        assert value.shape == expected
        assert value.dtype == torch.float32 and torch.isfinite(value).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_match_reference_implementation(name: str, reference: dict) -> None:
    """Same numbers as the reference code for the same weights (layer order, dilations, interpolation)."""
    model = build_model(*CONFIGS[name]).eval()
    load_checkpoint(model, _deterministic_state_dict(reference[name]["state_dict"]))
    with torch.no_grad():
        out = model(_golden_input())
    assert set(out) == set(GOLDEN[name])
    for key, expected in GOLDEN[name].items():
        assert out[key].shape == (1, 19, 5, 6)
        actual = torch.tensor(_summary(out[key]))
        torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-3, atol=1e-4)


def test_train_mode_batch_and_num_classes() -> None:
    model = build_model("psp", "resnet18", num_classes=7).train()
    out = model(torch.randn(2, 3, 24, 33))
    assert out["out"].shape == out["aux"].shape == (2, 7, 3, 5)
    (out["out"].sum() + out["aux"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_aux_option(reference: dict) -> None:
    no_aux = build_model("deeplabv3", "resnet18", aux=False)
    expected = [k for k in reference["deeplabv3_resnet18"]["state_dict"] if not k.startswith("auxlayer.")]
    assert list(no_aux.state_dict()) == expected
    with torch.no_grad():
        assert set(no_aux.eval()(torch.randn(1, 3, 16, 16))) == {"out"}
    assert build_model("psp_mobile", "mobilenetv2", aux=False).auxlayer is None
    teacher = build_model("deeplabv3", "resnet18").eval()
    teacher.auxlayer = None  # after loading a checkpoint with aux weights: skip the aux head's compute
    with torch.no_grad():
        assert set(teacher(torch.randn(1, 3, 16, 16))) == {"out"}
    with pytest.raises(ValueError, match="auxiliary"):
        build_model("deeplab_mobile", "mobilenetv2", aux=True)


@pytest.mark.parametrize("model,backbone", [("deeplabv3", "mobilenetv2"), ("psp", "resnet50"),
                                            ("unet", "resnet18"), ("deeplabv3", "resnet34")])
def test_unknown_names(model: str, backbone: str) -> None:
    with pytest.raises(ValueError) as info:
        build_model(model, backbone)
    message = str(info.value)
    assert repr(model) in message and repr(backbone) in message
    assert "psp on resnet18, resnet101" in message and "deeplab_mobile on mobilenetv2" in message
    assert set(MODEL_NAMES) == {"deeplabv3", "psp", "deeplab_mobile", "psp_mobile"}
    assert set(BACKBONE_NAMES) == {"resnet18", "resnet50", "resnet101", "mobilenetv2"}


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_layout_checkpoint_loads(name: str, reference: dict, tmp_path: Path) -> None:
    state = _synthetic_state_dict(reference[name]["state_dict"])
    path = tmp_path / f"{name}_citys_best_model.pth"
    torch.save(state, path)
    model = build_model(*CONFIGS[name])
    load_checkpoint(model, path)
    _assert_state_equal(model, state)


WRAPPERS: dict[str, Callable[[dict], object]] = {
    "ddp": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "compile": lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
    "ddp_compile": lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
    "compile_ddp": lambda sd: {f"_orig_mod.module.{k}": v for k, v in sd.items()},
    "state_dict": lambda sd: {"state_dict": sd, "epoch": 3},
    "model": lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {"lr": 0.01}},
    "nested": lambda sd: {"state_dict": {"model": sd}},
    # a fastdist training checkpoint (latest.pth / best.pth): the weights are under "student"
    "training": lambda sd: {"format": "fastdist-train", "iteration": 4, "student": sd,
                            "optimizer": {"state": {}, "param_groups": []}, "config": {"lr": 0.02}},
}


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_prefixed_and_wrapped_checkpoints_load(wrapper: str, reference: dict, tmp_path: Path) -> None:
    state = _synthetic_state_dict(reference["psp_mobile_mobilenetv2"]["state_dict"], offset=1.0)
    path = tmp_path / "ckpt.pth"
    torch.save(WRAPPERS[wrapper](state), path)
    for source in (path, str(path), WRAPPERS[wrapper](state)):
        model = build_model("psp_mobile", "mobilenetv2")
        load_checkpoint(model, source)
        _assert_state_equal(model, state)


def test_wrapped_models_load_and_export(reference: dict) -> None:
    state = _synthetic_state_dict(reference["deeplab_mobile_mobilenetv2"]["state_dict"], offset=2.0)
    model = build_model("deeplab_mobile", "mobilenetv2").to(memory_format=CL)
    for wrapped in (torch.compile(model), nn.DataParallel(model), torch.compile(nn.DataParallel(model))):
        load_checkpoint(wrapped, {f"module.{k}": v for k, v in state.items()})
        exported = to_reference_state_dict(wrapped)
        assert list(exported) == list(state)
        assert all(v.is_contiguous() and torch.equal(v, state[k]) for k, v in exported.items())
        assert not any(v.requires_grad for v in exported.values())
    _assert_state_equal(model, state)


def test_compiled_submodule_keys_normalized(reference: dict) -> None:
    model = build_model("psp", "resnet18")
    model.head = torch.compile(model.head)  # keys become head._orig_mod.*
    state = to_reference_state_dict(model)
    assert list(state) == list(reference["psp_resnet18"]["state_dict"])
    load_checkpoint(model, model.state_dict())


def test_round_trip_gives_identical_outputs(models: Callable) -> None:
    source = models("psp_resnet18")
    model = build_model("psp", "resnet18").eval()
    load_checkpoint(model, to_reference_state_dict(source))
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():
        assert torch.equal(model(x)["out"], source(x)["out"])


def test_wrong_key_fails_with_clear_message(reference: dict) -> None:
    state = _synthetic_state_dict(reference["psp_resnet18"]["state_dict"])
    state["head.classifer.weight"] = state.pop("head.classifier.weight")
    model = build_model("psp", "resnet18")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, state)
    message = str(info.value)
    assert "missing keys (1): head.classifier.weight" in message
    assert "unexpected keys (1): head.classifer.weight" in message


def test_wrong_shape_and_missing_buffer_fail(reference: dict) -> None:
    state = _synthetic_state_dict(reference["psp_resnet18"]["state_dict"])
    model = build_model("psp", "resnet18")
    bad = dict(state, **{"head.classifier.bias": torch.zeros(21)})
    message = r"shape mismatches \(1\): head\.classifier\.bias \(checkpoint \(21,\), model \(19,\)\)"
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(model, bad)
    del state["pretrained.bn1.num_batches_tracked"]
    with pytest.raises(CheckpointError, match="pretrained.bn1.num_batches_tracked"):
        load_checkpoint(model, state)


def test_other_model_checkpoint_fails(reference: dict) -> None:
    state = _synthetic_state_dict(reference["deeplabv3_resnet18"]["state_dict"])
    with pytest.raises(CheckpointError, match=r"missing keys .*unexpected keys .*\(\d+ more\)"):
        load_checkpoint(build_model("psp", "resnet18"), state)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    model = build_model("psp_mobile", "mobilenetv2")
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(model, missing)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(model, garbage)
    truncated = tmp_path / "truncated.pth"
    torch.save(model.state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint(model, truncated)
    not_state = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_state)
    with pytest.raises(CheckpointError, match="list.pth: no state dict"):
        load_checkpoint(model, not_state)
    with pytest.raises(FileNotFoundError):
        load_pretrained_backbone(model, missing)


def _imagenet_trunk(model: nn.Module) -> nn.Module:
    return model.pretrained.net if hasattr(model.pretrained, "net") else model.pretrained


def _imagenet_file(tmp_path: Path, trunk: nn.Module, extra: dict[str, list[int]], drop_counts: bool) -> Path:
    """A synthetic ImageNet backbone file: the trunk's own keys plus ``extra`` (classifier) keys."""
    entries = {k: list(v.shape) for k, v in trunk.state_dict().items()}
    if drop_counts:
        entries = {k: s for k, s in entries.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "backbone-imagenet.pth"
    torch.save(_synthetic_state_dict({**entries, **extra}, offset=3.0), path)
    return path


IMAGENET_EXTRA = {
    "resnet18": {"fc.weight": [1000, 512], "fc.bias": [1000]},
    "mobilenetv2": {"features.18.0.weight": [1280, 320, 1, 1], "classifier.1.weight": [1000, 1280]},
}


@pytest.mark.parametrize("model_name,backbone", [("deeplabv3", "resnet18"), ("psp_mobile", "mobilenetv2")])
@pytest.mark.parametrize("drop_counts", [False, True])
def test_load_pretrained_backbone(model_name: str, backbone: str, drop_counts: bool, tmp_path: Path) -> None:
    model = build_model(model_name, backbone)
    extra = IMAGENET_EXTRA[backbone]
    path = _imagenet_file(tmp_path, _imagenet_trunk(build_model(model_name, backbone)), extra, drop_counts)
    head_before = copy.deepcopy(model.head.state_dict())
    assert load_pretrained_backbone(model, path) == sorted(extra)
    file_state = torch.load(path, weights_only=True)
    for key, value in _imagenet_trunk(model).state_dict().items():
        if key in file_state:
            assert torch.equal(value, file_state[key]), key
        else:
            assert drop_counts and key.endswith("num_batches_tracked")
    assert all(torch.equal(v, head_before[k]) for k, v in model.head.state_dict().items())


def test_load_pretrained_backbone_wrong_file(tmp_path: Path) -> None:
    r18 = build_model("deeplabv3", "resnet18").pretrained
    path = _imagenet_file(tmp_path, r18, {}, drop_counts=False)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_pretrained_backbone(build_model("deeplabv3", "resnet50"), path)
    with pytest.raises(CheckpointError, match="no key matches the backbone"):
        load_pretrained_backbone(build_model("psp_mobile", "mobilenetv2"), path)


# ---------------------------------------------------------------------------------------------------
# Memory format, autocast, SyncBatchNorm, torch.compile
# ---------------------------------------------------------------------------------------------------


class _ChannelsLastChecker(TorchDispatchMode):
    """Records every op that allocates a 4-D tensor which is not channels-last (views are skipped)."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        is_view = any(r.alias_info is not None for r in func._schema.returns)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, Tensor) and t.dim() == 4 and t.numel() > 0 and not is_view
                    and not t.is_contiguous(memory_format=CL)):
                self.violations.append(f"{func}: shape {tuple(t.shape)} strides {t.stride()}")
        return out


@pytest.mark.parametrize("name", SMALL)
def test_channels_last_has_no_nchw_copies(name: str) -> None:
    """Train-mode forward and backward: every op output (activations, gradients) stays channels-last."""
    torch.manual_seed(0)
    model = build_model(*CONFIGS[name]).train().to(memory_format=CL)
    x = torch.randn(2, 3, 33, 49).to(memory_format=CL)
    with _ChannelsLastChecker() as checker:
        out = model(x)
        # Logit gradients in the logits' format, as the DIST loss returns them.
        grads = [torch.randn_like(v) for v in out.values()]
        torch.autograd.backward(list(out.values()), grads)
    assert not checker.violations, "\n".join(checker.violations)
    assert {"aten.upsample_bilinear2d", "aten.upsample_bilinear2d_backward", "aten.cat"} <= checker.ops
    assert all(v.is_contiguous(memory_format=CL) for v in out.values())


def test_channels_last_resnet101_eval(models: Callable) -> None:
    model = copy.deepcopy(models("deeplabv3_resnet101")).to(memory_format=CL)
    x = torch.randn(1, 3, 33, 47).to(memory_format=CL)
    with _ChannelsLastChecker() as checker, torch.no_grad():
        model(x)
    assert not checker.violations, "\n".join(checker.violations)


@pytest.mark.parametrize("name", SMALL)
def test_channels_last_matches_contiguous(name: str, models: Callable) -> None:
    model = models(name)
    model_cl = copy.deepcopy(model).to(memory_format=CL)
    x = torch.randn(2, 3, 65, 97)
    with torch.no_grad():
        ref = model(x)
        out = model_cl(x.to(memory_format=CL))
    for key, value in ref.items():
        assert out[key].is_contiguous(memory_format=CL)
        torch.testing.assert_close(out[key], value, rtol=1e-4, atol=1e-4 * value.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["deeplabv3_resnet18", "psp_mobile_mobilenetv2"])
def test_autocast(name: str, dtype: torch.dtype, models: Callable) -> None:
    model = copy.deepcopy(models(name)).to(memory_format=CL)
    x = torch.randn(1, 3, 17, 25).to(memory_format=CL)  # small: float16 convolutions are slow on CPUs
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=dtype):
            out = model(x)
    for key, value in ref.items():
        assert out[key].dtype == dtype and out[key].is_contiguous(memory_format=CL)
        assert _relative_error(out[key], value) < 5e-2


def test_sync_batchnorm(reference: dict, models: Callable) -> None:
    source = models("deeplabv3_resnet18")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(source)).eval()
    built = build_model("deeplabv3", "resnet18", norm_layer=nn.SyncBatchNorm).eval()
    for model in (converted, built):
        assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
        assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == 31
        assert list(model.state_dict()) == list(reference["deeplabv3_resnet18"]["state_dict"])
    load_checkpoint(built, to_reference_state_dict(source))
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad():  # eval-mode SyncBatchNorm runs without a process group
        torch.testing.assert_close(built(x)["out"], source(x)["out"], rtol=0, atol=0)


def test_compile_train_graph_matches_eager() -> None:
    """fullgraph (no graph breaks) through the custom pooling backward; aot_eager: same numerics as eager."""
    torch.manual_seed(0)
    model = build_model("deeplab_mobile", "mobilenetv2").train().to(memory_format=CL)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 33, 49).to(memory_format=CL)
    grads = []
    for fn in (compiled, model):
        model.zero_grad()
        torch.manual_seed(1)
        out = fn(x)["out"]
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()] + [out.detach()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_compile_inductor_matches_eager(models: Callable) -> None:
    model = copy.deepcopy(models("psp_mobile_mobilenetv2")).to(memory_format=CL)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(1, 3, 33, 49).to(memory_format=CL)
    with torch.no_grad():
        expected = model(x)["out"]
        out = compiled(x)["out"]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
