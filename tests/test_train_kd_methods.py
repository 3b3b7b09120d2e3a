"""train.py --kd-method dist|kd|cwd: the per-method defaults (CIRKD's Cityscapes scripts), the
criterion each method builds, and a 2-iteration CPU training run per method."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from fastdist.engine.config import ConfigError, parse_config  # noqa: E402
from fastdist.engine.kd import DistillationLoss  # noqa: E402
from tests.test_loss_kd_cwd import cwd64, kd64  # noqa: E402

# (method, lambda_kd, temperature) when neither flag is given
DEFAULTS = [("dist", 1.0, 1.0), ("kd", 1.0, 1.0), ("cwd", 3.0, 4.0)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastdist.data.synthetic import make_synthetic_cityscapes

    root = tmp_path_factory.mktemp("kd_methods")
    return make_synthetic_cityscapes(root, train=2, val=1, size=(32, 64), seed=5)


def _argv(data: Path, save: Path, *extra: str) -> list[str]:
    return ["--device", "cpu", "--data", str(data), "--student-model", "psp_mobile", "--student-backbone",
            "mobilenetv2", "--teacher-model", "psp_mobile", "--teacher-backbone", "mobilenetv2",
            "--teacher-pretrained", "none", "--batch-size", "2", "--crop-size", "32", "64", "--workers", "0",
            "--save-dir", str(save), *extra]


@pytest.mark.parametrize(("method", "lam", "tau"), DEFAULTS)
def test_method_defaults_and_overrides(data: Path, tmp_path: Path, method: str, lam: float,
                                       tau: float) -> None:
    cfg = parse_config(_argv(data, tmp_path, "--kd-method", method))
    kd = cfg.distill
    assert (kd.kd_method, kd.lambda_kd, kd.kd_temperature) == (method, lam, tau)
    cfg = parse_config(_argv(data, tmp_path, "--kd-method", method, "--lambda-kd", "0.5",
                             "--kd-temperature", "2"))
    assert (cfg.distill.lambda_kd, cfg.distill.kd_temperature) == (0.5, 2.0)


def test_intra_sync_is_dist_only(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--kd-intra-sync is a DIST option"):
        parse_config(_argv(data, tmp_path, "--kd-method", "cwd", "--kd-intra-sync"))


@pytest.mark.parametrize(("method", "ref"), [("kd", kd64), ("cwd", cwd64)])
def test_criterion_weights_main_and_aux(method: str, ref) -> None:
    torch.manual_seed(0)
    s = {"out": torch.randn(2, 19, 4, 8, requires_grad=True), "aux": torch.randn(2, 19, 4, 8)}
    t = {"out": torch.randn(2, 19, 4, 8), "aux": torch.randn(2, 19, 4, 8)}
    labels = torch.randint(0, 19, (2, 32, 64))
    crit = DistillationLoss(lambda_kd=3.0, tau=4.0, backend="torch", method=method)
    _, kd = crit(s, t, labels, torch.randn(2, 3, 32, 64))
    want = 3.0 * (ref(s["out"], t["out"], 4.0, None) + 0.4 * ref(s["aux"], t["aux"], 4.0, None))
    assert kd.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize(("method", "lam", "tau"), DEFAULTS)
def test_two_iterations_per_method(data: Path, tmp_path: Path, method: str, lam: float, tau: float) -> None:
    save = tmp_path / method
    assert train.main(_argv(data, save, "--kd-method", method, "--max-iterations", "2", "--skip-val",
                            "--log-iter", "1")) == 0
    config = json.loads((save / "config.json").read_text())
    assert (config["kd_method"], config["lambda_kd"], config["kd_temperature"]) == (method, lam, tau)
    assert f"kd method {method}: lambda_kd {lam}, temperature {tau}" in (save / "train.log").read_text()
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd_loss"] for r in records if "kd_loss" in r]
    assert len(kd) == 2 and all(v > 0 and v == v for v in kd)  # finite, positive distillation term


def test_resume_of_a_checkpoint_from_before_kd_method(data: Path, tmp_path: Path) -> None:
    """A config.json without kd_method (written before --kd-method existed) was a DIST run: it resumes
    under the default method and is refused under another one."""
    from fastdist.engine.config import check_resume_compatible, config_dict

    cfg = parse_config(_argv(data, tmp_path))
    saved = config_dict(cfg)
    del saved["kd_method"]
    assert cfg.distill.kd_method == "dist"
    check_resume_compatible(saved, cfg)  # no ConfigError
    other = parse_config(_argv(data, tmp_path, "--kd-method", "kd"))
    with pytest.raises(ConfigError, match="kd_method: checkpoint 'dist', now 'kd'"):
        check_resume_compatible(saved, other)
