"""Smoke tests of benchmarks/: the three benchmarks' --quick CPU runs and report.py on their outputs.

The runs are small (a minute or two on 2 CPU cores together). They check that the files and fields
exist, that measured values are finite and positive, that derived values (speed-ups, images/s) are
recomputed from the measured times, and that the rendered report shows no number that the results files
do not hold.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import report  # noqa: E402


def _run(script: str, *args: str, timeout: float = 400) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run the three quick benchmarks once into temporary folders."""
    base = tmp_path_factory.mktemp("bench")
    out = {name: base / name for name in ("loss", "train", "loader")}
    _run("loss_bench.py", "--quick", "--device", "cpu", "--out", str(out["loss"]))
    _run("train_bench.py", "--quick", "--device", "cpu", "--out", str(out["train"]))
    _run("loader_bench.py", "--quick", "--device", "cpu", "--out", str(out["loader"]),
         "--data-dir", str(base / "data"))
    return out


def _finite_positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _check_env(env: dict[str, Any]) -> None:
    for key in ("device_name", "torch", "triton", "cuda", "git_commit", "date", "datetime_utc", "is_cuda"):
        assert key in env
    assert env["is_cuda"] is False and env["device_slug"] == "cpu"


# --------------------------------------------------------------------------------------------------
# loss_bench
# --------------------------------------------------------------------------------------------------
def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_loss_bench_files_and_values(results: dict[str, Path]) -> None:
    doc = json.loads((results["loss"] / "loss.json").read_text())
    _check_env(doc["env"])
    rows = _csv_rows(results["loss"] / "loss.csv")
    assert len(rows) == len(doc["results"]) > 0
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"reference", "reference+compile", "torch"}
    assert {r["mode"] for r in ok} == {"fwd", "fwd_nograd", "bwd", "fwd+bwd"}
    for r in ok:
        med, p20, p80 = float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        assert _finite_positive(med) and p20 <= med <= p80
        assert _finite_positive(float(r["gbps"]))
        assert r["peak_extra_bytes"] == ""  # CPU: not measured, never invented
        assert float(r["loss_rel_err"]) < 1e-2
    # The Triton kernels are never timed under the CPU interpreter.
    triton = [r for r in rows if r["provider"] == "triton"]
    assert triton and all(r["status"].startswith("skipped") for r in triton)


def test_loss_speedups_recomputed_from_csv(results: dict[str, Path]) -> None:
    rows = _csv_rows(results["loss"] / "loss.csv")
    ok = {(r["shape_name"], r["dtype"], r["layout"], r["mode"], r["provider"]): r
          for r in rows if r["status"] == "ok"}
    checked = 0
    bases = (("reference", "speedup_vs_reference"), ("reference+compile", "speedup_vs_compile"))
    for (shape, dtype, layout, mode, _provider), r in ok.items():
        for base, field in bases:
            ref = ok.get((shape, dtype, layout, mode, base))
            if ref is None:
                assert r[field] == ""
                continue
            expected = float(ref["median_ms"]) / float(r["median_ms"])
            assert math.isclose(float(r[field]), expected, rel_tol=1e-9)
            checked += 1
    assert checked > 0


def test_loss_plot_written(results: dict[str, Path]) -> None:
    pytest.importorskip("matplotlib")
    assert (results["loss"] / "loss.png").stat().st_size > 0


# --------------------------------------------------------------------------------------------------
# train_bench
# --------------------------------------------------------------------------------------------------
def test_train_bench_files_and_values(results: dict[str, Path]) -> None:
    doc = json.loads((results["train"] / "train.json").read_text())
    _check_env(doc["env"])
    rows = {r["config"]: r for r in doc["results"]}
    assert list(rows) == ["reference", "+amp", "+channels_last", "+fused_loss", "+compile"]
    assert rows["+compile"]["status"].startswith("skipped")
    ref = rows["reference"]
    assert ref["amp"] is False and ref["channels_last"] is False and ref["loss_backend"] == "reference"
    for name in ("reference", "+amp", "+channels_last", "+fused_loss"):
        r = rows[name]
        assert r["status"] == "ok"
        for key in ("step_ms", "images_per_s", "flops_per_step", "achieved_tflops"):
            assert _finite_positive(r[key]), (name, key)
        assert math.isclose(r["images_per_s"], r["batch"] / (r["step_ms"] / 1e3), rel_tol=1e-9)
        assert math.isclose(r["speedup_vs_reference"], r["images_per_s"] / ref["images_per_s"], rel_tol=1e-9)
        assert r["peak_mem_bytes"] is None and r["frac_peak_bf16"] is None  # CPU: not measured
    assert rows["+fused_loss"]["loss_backend"] == "torch"
    assert doc["targets"][0]["status"].startswith("not applicable")


# --------------------------------------------------------------------------------------------------
# loader_bench
# --------------------------------------------------------------------------------------------------
def test_loader_bench_files_and_values(results: dict[str, Path]) -> None:
    doc = json.loads((results["loader"] / "loader.json").read_text())
    _check_env(doc["env"])
    rows = doc["results"]
    torch_rows = [r for r in rows if r["backend"] == "torch"]
    assert torch_rows and all(r["status"] == "ok" for r in torch_rows)
    for r in rows:
        if r["status"] == "ok":
            assert _finite_positive(r["images_per_s"]) and _finite_positive(r["cpu_cores_used"])
            assert math.isclose(r["images_per_s"], r["images"] / r["wall_s"], rel_tol=1e-9)
        else:
            assert r["backend"] == "dali" and r["status"].startswith("not available")
    assert all(r["decode_share"] > 0 for r in torch_rows)
    assert doc["step"] == common.NOT_MEASURED


# --------------------------------------------------------------------------------------------------
# report.py
# --------------------------------------------------------------------------------------------------
_SCALES = (1, 100, 1 / 2**20, 1 / 2**30, 1e-9, 1e-12)


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _leaves(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _leaves(v)]
    return [obj]


def _allowed_tokens(docs: list[dict[str, Any]]) -> set[str]:
    """Every string a number of the files may be shown as: any rounding or unit scaling, and digit runs
    inside the files' text values (shapes, dates, device names, commits)."""
    allowed: set[str] = set()
    for leaf in (x for doc in docs for x in _leaves(doc)):
        if isinstance(leaf, bool) or leaf is None:
            continue
        if isinstance(leaf, int | float):
            for scale in _SCALES:
                for digits in range(5):
                    allowed.add(f"{leaf * scale:.{digits}f}")
        elif isinstance(leaf, str):
            allowed.update(re.findall(r"\d+(?:\.\d+)?", leaf))
            allowed.update(re.findall(r"\d+", leaf))
    return allowed


def _shown_numbers(text: str) -> list[str]:
    """The numbers a reader sees: digit runs not glued to a preceding letter or digit (so the digits
    inside a shortened commit hash such as ``bfced1e9f498`` or a device name such as ``H100`` are not
    read as figures; ``8.1x`` and ``12 ms`` still are)."""
    return re.findall(r"(?<![A-Za-z0-9.])\d+(?:\.\d+)?", text)


def test_report_shows_only_numbers_from_files(results: dict[str, Path], tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{report.BEGIN}\nold\n{report.END}\n\n## After\n")
    report.main(["--results", *map(str, results.values()), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\n") and text.endswith(f"{report.END}\n\n## After\n")
    section = text[text.index(report.BEGIN) + len(report.BEGIN): text.index(report.END)]
    assert "old" not in section
    for title in ("### DIST loss", "### KD training step", "### Training loader"):
        assert title in section
    assert section.count("CPU smoke run") == 3  # every CPU table is labelled
    docs = [json.loads((results[n] / f"{n}.json").read_text()) for n in ("loss", "train", "loader")]
    allowed = _allowed_tokens(docs)
    shown = _shown_numbers(section)
    assert shown
    invented = sorted({tok for tok in shown if tok not in allowed})
    assert not invented, f"numbers in the report that no results file holds: {invented}"


def test_report_renders_gpu_fields(results: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """GPU-only columns (fractions of peak, memory) render from the files; rendering test only: the values
    are the CPU run's with a made-up device, written to a temporary folder."""
    doc = json.loads((results["loss"] / "loss.json").read_text())
    doc["env"].update(is_cuda=True, device_name="Test GPU", peak={"label": "Test GPU", "mem_bw_bytes_s": 1e12,
                                                                   "bf16_flops": 1e14, "source": "test"})
    for i, r in enumerate(doc["results"]):
        if r["status"] == "skipped: interpreter":  # pretend the Triton rows ran, with the torch rows' values
            twin = next(x for x in doc["results"] if x["provider"] == "torch" and
                        (x["shape_name"], x["dtype"], x["layout"], x["mode"]) ==
                        (r["shape_name"], r["dtype"], r["layout"], r["mode"]))
            doc["results"][i] = {**twin, "provider": "triton", "bw_frac_peak": twin["gbps"] / 1e3,
                                 "peak_extra_bytes": 1000 + i, "mem_frac_reference": 0.01 * (i + 1)}
    (tmp_path / "loss.json").write_text(json.dumps(doc))
    report.main(["--results", str(tmp_path), "--stdout"])
    out = capsys.readouterr().out
    assert "Test GPU" in out and "CPU smoke run" not in out and "skipped: interpreter" not in out
    assert "%" in out
    allowed = _allowed_tokens([doc]) | set(re.findall(r"\d+", str(tmp_path)))  # the source path is shown
    invented = sorted({t for t in _shown_numbers(out) if t not in allowed})
    assert not invented, invented


def test_report_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "none"
    empty.mkdir()
    report.main(["--results", str(empty), "--readme", str(tmp_path / "missing.md")])
    assert "Not measured yet" in capsys.readouterr().out


def test_report_ignores_cpu_results_by_default(results: dict[str, Path]) -> None:
    assert report.newest(results.values(), include_cpu=False) == {}
    assert set(report.newest(results.values(), include_cpu=True)) == {"loss", "train", "loader"}


# --------------------------------------------------------------------------------------------------
# common.py
# --------------------------------------------------------------------------------------------------
def test_device_peaks() -> None:
    assert common.lookup_peak("NVIDIA H100 80GB HBM3").mem_bw_bytes_s == 3.35e12
    assert common.lookup_peak("NVIDIA H100 PCIe").mem_bw_bytes_s == 2.0e12
    assert common.lookup_peak("NVIDIA H200").mem_bw_bytes_s == 4.8e12
    assert common.lookup_peak("NVIDIA A100-SXM4-80GB").mem_bw_bytes_s == 2.039e12
    assert common.lookup_peak("NVIDIA GeForce RTX 3090") is None
    assert common.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_summarize_quantiles() -> None:
    t = common.summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.reps) == pytest.approx((3.0, 1.8, 4.2, 5))


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)
