"""Model cost: parameter counts and FLOPs against hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fastdist.engine.flops import count_parameters, forward_gflops, log_model_cost, model_cost
from fastdist.engine.logger import RunLogger


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # 8*3*3*3 + 8 = 224 parameters
        self.bn = nn.BatchNorm2d(8)  # 16 parameters (buffers not counted)
        self.head = nn.Conv2d(8, 5, 1, bias=False)  # 40 parameters

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.head(torch.relu(self.bn(self.conv(x))))}


def test_toy_counts_by_hand() -> None:
    model = Toy().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_parameters(model) == 224 + 16 + 40
    h, w = 6, 10
    # 2 FLOPs per multiply-add: conv 3x3 (3 -> 8) and 1x1 (8 -> 5) at every one of the h*w pixels
    expected = 2 * h * w * (8 * 3 * 3 * 3 + 5 * 8)
    assert forward_gflops(model, (h, w)) == pytest.approx(expected / 1e9, rel=1e-12)
    assert model.training  # restored
    for key, value in model.state_dict().items():  # meta forward: real weights and BN stats untouched
        assert torch.equal(value, before[key]), key


def test_real_model_and_metrics_record(tmp_path) -> None:
    from fastdist.models import build_model

    student = build_model("psp_mobile", "mobilenetv2", num_classes=19)
    log = RunLogger(str(tmp_path), enabled=True)
    cost = log_model_cost(log, {"student": student, "teacher": None}, (64, 128))
    log.close()
    assert set(cost) == {"student"}
    assert cost["student"]["params"] == sum(p.numel() for p in student.parameters())
    # a 2x larger image: the convolutions' FLOPs scale with the pixel count
    assert model_cost({"s": student}, (128, 128))["s"]["gflops"] == pytest.approx(
        2 * cost["student"]["gflops"], rel=0.02)
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["kind"] == "model_cost" and record["models"]["student"]["input_size"] == [64, 128]


def test_bad_size() -> None:
    with pytest.raises(ValueError, match="size must be"):
        forward_gflops(Toy(), (0, 4))
