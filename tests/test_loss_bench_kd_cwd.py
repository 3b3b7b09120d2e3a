"""benchmarks/loss_bench.py --loss kd|cwd: the same providers on the KD / CWD losses (CPU, one small case)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import loss_bench  # noqa: E402


@pytest.mark.parametrize(("loss", "tau"), [("kd", 1.0), ("cwd", 4.0)])
def test_loss_bench_kd_cwd(tmp_path: Path, loss: str, tau: float) -> None:
    args = loss_bench.parse_args([
        "--device", "cpu", "--out", str(tmp_path), "--loss", loss, "--shapes", "recipe-b2",
        "--dtypes", "fp32", "--layouts", "nhwc", "--providers", "reference", "torch", "--modes", "fwd+bwd",
        "--warmup-ms", "1", "--rep-ms", "3"])
    loss_bench.run(args)
    doc = json.loads((tmp_path / f"loss_{loss}.json").read_text())
    assert (doc["config"]["loss"], doc["config"]["tau"]) == (loss, tau)
    rows = {r["provider"]: r for r in doc["results"]}
    assert set(rows) == {"reference", "torch"} and all(r["status"] == "ok" for r in rows.values())
    for r in rows.values():  # against the float64 evaluation of the reference formula
        assert r["loss_rel_err"] < 1e-5 and r["grad_rel_err"] < 1e-4
    assert not (tmp_path / "loss.json").exists()  # DIST's files are left alone


def test_cwd_skips_2d_shapes(tmp_path: Path) -> None:
    args = loss_bench.parse_args(["--device", "cpu", "--out", str(tmp_path), "--loss", "cwd",
                                  "--shapes", "cls-256", "--providers", "torch", "--modes", "fwd"])
    assert loss_bench.run(args)["results"] == []
