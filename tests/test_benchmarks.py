"""Smoke tests of benchmarks/: one CPU dry run of gpu-check (every part's --quick run) and report.py on it.

The dry run is small (under a minute on 2 CPU cores). The tests check that the files and fields
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

import gpu_check  # noqa: E402
import loader_bench  # noqa: E402
import loss_bench  # noqa: E402
import report  # noqa: E402
import train_bench  # noqa: E402
from env import DevicePeak, lookup_peak, resolve_device, slugify  # noqa: E402
from output import NOT_MEASURED  # noqa: E402
from runargs import Budget  # noqa: E402
from timing import summarize, time_fn  # noqa: E402


def _gpu_check(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(BENCH / "gpu_check.sh"), *args],
                          env={**os.environ, "PYTHON": sys.executable, **env}, capture_output=True, text=True,
                          timeout=400)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One CPU dry run of the whole gpu-check script, copying to a temporary $OUT."""
    base = tmp_path_factory.mktemp("bench")
    proc = _gpu_check("--dry-run", "--base", str(base / "results"), OUT=str(base / "out"))
    assert proc.returncode == 0, f"gpu-check dry run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    (folder,) = (base / "results").glob("cpu-*")
    return {"folder": folder, "out": base / "out", "stdout": proc.stdout}


@pytest.fixture(scope="module")
def results(dry_run: dict[str, Any]) -> dict[str, Path]:
    """The folder of each benchmark's results (the dry run writes them all into one)."""
    return {name: dry_run["folder"] for name in report.BENCHMARKS}


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
        # The two byte models differ only for fwd+bwd: S and T read twice (5 tensor-sizes) vs once (3).
        ratio = 3 / 5 if r["mode"] == "fwd+bwd" else 1.0
        assert math.isclose(float(r["gbps_min_io"]), float(r["gbps"]) * ratio, rel_tol=1e-9)
        assert math.isclose(float(r["bytes_min_io"]), float(r["bytes_moved"]) * ratio, rel_tol=1e-9)
        assert r["bw_frac_peak"] == r["bw_frac_peak_min_io"] == ""  # CPU: no peak, no fraction
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


def test_loss_plot_written_before_the_end(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A run killed after its first case keeps its plot: loss.png is written with the first case's rows."""
    pytest.importorskip("matplotlib")
    seen: list[tuple[bool, bool]] = []
    write = loss_bench.write_results

    def spy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        doc = write(*args, **kwargs)
        seen.append((doc["config"]["complete"], (tmp_path / "loss.png").exists()))
        return doc

    monkeypatch.setattr(loss_bench, "write_results", spy)
    loss_bench.run(loss_bench.parse_args(["--quick", "--device", "cpu", "--providers", "reference",
                                          "--modes", "fwd+bwd", "--out", str(tmp_path)]))
    assert seen[0] == (False, True) and seen[-1] == (True, True)
    assert len(seen) == len(loss_bench.quick_cases()) + 1


def test_loss_budget_checked_before_provider_is_built(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """With the budget spent, no provider is built (so reference+compile never compiles)."""
    built: list[str] = []
    monkeypatch.setattr(loss_bench, "provider_fn", lambda provider, mode, loss="dist": built.append(provider))
    args = loss_bench.parse_args(["--quick", "--device", "cpu"])
    case = loss_bench.quick_cases()[0]
    s, t = loss_bench.make_inputs(case, "cpu")
    rows = loss_bench.run_provider("reference+compile", case, s, t, "cpu", None, None, args, args.modes,
                                   Budget(0))
    assert built == [] and [r["status"] for r in rows] == ["skipped: time budget"] * len(args.modes)
    doc = loss_bench.run(loss_bench.parse_args(["--quick", "--device", "cpu", "--time-budget", "0",
                                                "--out", str(tmp_path)]))
    assert built == []
    statuses = {r["status"] for r in doc["results"]}
    assert statuses <= {"skipped: time budget", "skipped: interpreter", "skipped: no GPU",
                        "skipped: --quick (compiled on the first case only)"}
    assert "skipped: time budget" in statuses and doc["config"]["complete"] is True


def test_loss_plan_bounds_compiles() -> None:
    """Every case runs with the eager providers before reference+compile runs beyond the target's case."""
    cases = loss_bench.all_cases(list(loss_bench.SHAPES), list(loss_bench.DTYPES), ["nchw", "nhwc"])
    items = loss_bench.plan(cases, loss_bench.PROVIDERS, quick=False)
    compiled = loss_bench.COMPILED
    first_pass = [i for i in items if i.providers != (compiled,)]
    assert [i.case for i in first_pass] == cases  # every case once, priority cases first
    assert items[: len(cases)] == first_pass  # ... before any compile-only item
    assert {("recipe-b8", "bf16", "nchw")} == loss_bench.COMPILE_FIRST
    for item in first_pass:
        assert (compiled in item.providers) == (item.case.key in loss_bench.COMPILE_FIRST)
        assert {"reference", "torch", "triton"} <= set(item.providers)
    rest = items[len(cases):]
    assert [i.case for i in rest] == [c for c in cases if c.key not in loss_bench.COMPILE_FIRST]
    assert all(i.providers == (compiled,) and i.reason is None for i in rest)
    quick = loss_bench.plan(loss_bench.quick_cases(), loss_bench.PROVIDERS, quick=True)
    assert compiled in quick[0].providers
    assert [i.reason for i in quick if i.providers == (compiled,)] == [
        "skipped: --quick (compiled on the first case only)"] * (len(loss_bench.quick_cases()) - 1)


def test_loss_byte_models_and_bandwidth_targets() -> None:
    case = loss_bench.Case("fullres-b2", loss_bench.SHAPES["fullres-b2"], "bf16", "nchw")
    one = 2 * 19 * 512 * 1024 * 2  # bytes of S in bf16
    assert loss_bench.bytes_moved(case, "fwd+bwd", "two-pass") == 5 * one
    assert loss_bench.bytes_moved(case, "fwd+bwd", "min-io") == 3 * one
    assert loss_bench.bytes_moved(case, "bwd", "two-pass") == 3 * one
    assert loss_bench.bytes_moved(case, "bwd", "min-io") == 3 * one
    peak = DevicePeak("test", 1e12, 1e14, "test")
    bw = loss_bench.bandwidth(case, "fwd+bwd", 1.0, peak)
    assert bw["gbps"] == pytest.approx(5 * one / 1e6) and bw["bw_frac_peak"] == pytest.approx(5 * one / 1e9)
    assert bw["bw_frac_peak_min_io"] == pytest.approx(bw["bw_frac_peak"] * 3 / 5)
    base = {"shape_name": "fullres-b2", "dtype": "bf16", "layout": "nchw", "provider": "triton",
            "status": "ok"}
    rows = [{**base, "mode": "bwd", "bw_frac_peak": 0.8, "bw_frac_peak_min_io": 0.8},
            {**base, "mode": "fwd+bwd", "bw_frac_peak": 0.75, "bw_frac_peak_min_io": 0.45}]
    bandwidth_targets = [t for t in report.loss_targets({"env": {"is_cuda": True}, "results": rows})
                         if t["case"].startswith("fullres-b2 bf16") and "bandwidth" in t["target"]]
    got = {(t["mode"], t["field"]): (t["value"], t["status"]) for t in bandwidth_targets}
    assert got == {("bwd", "bw_frac_peak"): (0.8, "pass"), ("fwd+bwd", "bw_frac_peak"): (0.75, "pass"),
                   ("fwd+bwd", "bw_frac_peak_min_io"): (0.45, "fail")}
    names = {t["field"] + " " + t["mode"]: t["target"] for t in bandwidth_targets}
    assert "two-pass" in names["bw_frac_peak fwd+bwd"] and "S+T+dS" in names["bw_frac_peak_min_io fwd+bwd"]
    assert "both models" in names["bw_frac_peak bwd"]


# --------------------------------------------------------------------------------------------------
# train_bench
# --------------------------------------------------------------------------------------------------
def test_train_bench_files_and_values(results: dict[str, Path]) -> None:
    doc = json.loads((results["train"] / "train.json").read_text())
    _check_env(doc["env"])
    rows = {r["config"]: r for r in doc["results"]}
    assert list(rows) == train_bench.CONFIG_ORDER
    assert rows["+compile"]["status"] == rows["+teacher_graph"]["status"] == "skipped: --quick"
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
        phases = r["phases"]
        assert list(phases) == list(train_bench.PHASES) == doc["config"]["phases"]
        assert all(_finite_positive(v["host_ms"]) and _finite_positive(v["profiled_host_ms"]) for v in
                   phases.values()), (name, phases)
        assert math.isclose(r["host_ms_per_step"], sum(v["host_ms"] for v in phases.values()), rel_tol=1e-9)
        # on a CPU the host is the device: the phases add up to the step (same clock, same steps)
        assert r["host_ms_per_step"] == pytest.approx(r["step_ms"], rel=0.5)
        assert all(v["gpu_ms"] is None and v["profiled_busy_ms"] is None for v in phases.values())
        assert r["gpu_busy_ms_per_step"] is None and r["gpu_idle_frac"] is None  # CPU: not measured
        assert phases["backward"]["aten_ops"] > 0 and phases["teacher_fwd"]["aten_ops"] > 0
        assert sum(v["syncs"] for v in phases.values()) == 0  # no mask: no data-dependent op in the step
    assert rows["+fused_loss"]["loss_backend"] == "torch"
    assert "targets" not in doc  # the benchmark measures, report.py judges
    assert report.train_targets(doc)[0]["status"] == "not applicable (CPU run)"
    assert doc["config"]["multi_gpu"]["strategy"] and doc["config"]["flops_counted_at_batch"] == 2


def test_train_plan_runs_the_recipe_batch_first() -> None:
    """The whole ablation at batch 2 (eager rows, then +compile, then the teacher's CUDA graph) before any
    larger batch, so that a time budget cuts the larger batches first."""
    pairs = [(cfg.name, batch) for cfg, batch in train_bench.plan(train_bench.parse_args([]), "triton")]
    first = [("reference", 2), ("+amp", 2), ("+channels_last", 2), ("+fused_loss", 2), ("+compile", 2),
             ("+teacher_graph", 2)]
    larger = [(c, b) for b in (4, 8) for c in ("reference", "+fused_loss", "+compile", "+teacher_graph")]
    assert pairs == [*first, *larger]
    graph = {c.name: c for c in train_bench.ablation("triton")}["+teacher_graph"]
    assert train_bench.skip_reason(graph, "cpu") == "skipped: CUDA graphs need a GPU"
    assert train_bench.skip_reason(graph, "cuda") is None


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
    assert doc["step"] == NOT_MEASURED
    assert doc["config"]["complete"] is True and doc["config"]["step_config"] == "+fused_loss"


def test_loader_gpu_share_counts_batches_produced(results: dict[str, Path]) -> None:
    """The profiled window spans the loader's whole life: every batch it produces is counted."""
    root = Path(json.loads((results["loader"] / "loader.json").read_text())["config"]["dataset"])
    args = loader_bench.parse_args(["--quick", "--profile-batches", "5"])
    gpu_ms, batches = loader_bench.loader_gpu_ms_per_batch(root, "torch", 1, args, "cpu")
    assert (gpu_ms, batches) == (0.0, 5)  # no CUDA kernels on a CPU


def test_loader_step_is_the_training_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the data-wait step is what train.py runs there (engine defaults) and the target needs it."""
    import torch

    from fastdist.engine import config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cfg = config.build_config(config.build_parser().parse_args(["--device", "cuda"])).runtime
    name = loader_bench.default_step_config(is_cuda=True, quick=False)
    step = {c.name: c for c in train_bench.ablation("triton")}[name]
    assert (step.compile, step.channels_last, step.amp) == (cfg.compile, cfg.channels_last, cfg.amp == "bf16")
    assert step.compile and loader_bench.default_step_config(is_cuda=False, quick=False) == "+fused_loss"
    rows = [{"backend": "dali", "status": "ok", "data_wait_frac": 0.01}]
    eager = "not measured: the target uses the +compile step, batch 2, 8 threads"
    for step_config, status in ((name, "pass"), ("+fused_loss", eager)):
        args = loader_bench.parse_args(["--step-config", step_config])
        cfg = {"step_config": args.step_config, "batch": args.batch, "step_threads": args.step_threads}
        doc = {"env": {"is_cuda": True}, "step": rows, "config": cfg}
        assert report.loader_targets(doc)[0]["status"] == status


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
            allowed.update(re.findall(r"\d+(?:\.\d+)?", f"{leaf:.1e}"))  # scientific notation
        elif isinstance(leaf, str):
            allowed.update(re.findall(r"\d+(?:\.\d+)?", leaf))
            allowed.update(re.findall(r"\d+", leaf))
    return allowed


def _static_tokens() -> set[str]:
    """Numbers of the report's own text: the byte-model note and the targets' goals (not measurements)."""
    goals = [t.threshold for t in report.LOSS_TARGETS] + [report.TRAIN_TARGET[1], report.LOADER_TARGET[3]]
    return set(_shown_numbers(report.LOSS_BYTES_NOTE)) | {f"{g:.2f}" for g in goals} | {"2", "8"}


def _shown_numbers(text: str) -> list[str]:
    """The numbers a reader sees: digit runs not glued to a preceding letter or digit (so the digits
    inside a shortened commit hash such as ``bfced1e9f498`` or a device name such as ``H100`` are not
    read as figures; ``8.1x`` and ``12 ms`` still are)."""
    return re.findall(r"(?<![A-Za-z0-9.])\d+(?:\.\d+)?", text)


def test_report_shows_only_numbers_from_files(results: dict[str, Path], tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\n{report.BEGIN}\nOLD-PLACEHOLDER\n{report.END}\n\n## After\n")
    report.main(["--results", *map(str, set(results.values())), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\n") and text.endswith(f"{report.END}\n\n## After\n")
    section = text[text.index(report.BEGIN) + len(report.BEGIN): text.index(report.END)]
    assert "OLD-PLACEHOLDER" not in section
    for title in ("### Fused loss kernels", "### DIST loss", "### KD training step", "### Training loader"):
        assert title in section
    assert section.count("CPU smoke run") == 4  # every CPU table is labelled
    assert "| pass |" not in section and "| fail |" not in section  # a CPU run is never judged
    docs = [json.loads((results[n] / f"{n}.json").read_text()) for n in report.BENCHMARKS]
    allowed = _allowed_tokens(docs) | _static_tokens()
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
                                 "bw_frac_peak_min_io": twin["gbps_min_io"] / 1e3,
                                 "peak_extra_bytes": 1000 + i, "mem_frac_reference": 0.01 * (i + 1)}
    (tmp_path / "loss.json").write_text(json.dumps(doc))
    report.main(["--results", str(tmp_path), "--stdout"])
    out = capsys.readouterr().out
    assert "Test GPU" in out and "CPU smoke run" not in out and "skipped: interpreter" not in out
    assert "%" in out and "3/5 = 60%" in out  # the two byte models are explained
    allowed = _allowed_tokens([doc]) | set(re.findall(r"\d+", str(tmp_path)))  # the source path is shown
    allowed |= _static_tokens()
    invented = sorted({t for t in _shown_numbers(out) if t not in allowed})
    assert not invented, invented


def test_report_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "none"
    empty.mkdir()
    report.main(["--results", str(empty), "--readme", str(tmp_path / "missing.md")])
    assert capsys.readouterr().out == report.NO_RESULTS


def test_readme_section_is_what_report_generates(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's Performance section is report.py's output for benchmarks/results/ (regenerate it with
    ``python benchmarks/report.py`` after adding results)."""
    report.main(["--stdout"])
    text = (ROOT / "README.md").read_text()
    section = text[text.index(report.BEGIN) + len(report.BEGIN): text.index(report.END)]
    assert section == "\n" + capsys.readouterr().out


def _variant(doc: dict[str, Any], folder: Path, stamp: str, **config: Any) -> Path:
    folder.mkdir()
    variant = {**doc, "env": {**doc["env"], "datetime_utc": stamp}, "config": {**doc["config"], **config}}
    (folder / "loss.json").write_text(json.dumps(variant))
    return folder


def test_report_prefers_complete_full_runs(results: dict[str, Path], tmp_path: Path) -> None:
    doc = json.loads((results["loss"] / "loss.json").read_text())
    full = _variant(doc, tmp_path / "full", "2030-01-01T00:00:00+00:00", complete=True, quick=False)
    killed = _variant(doc, tmp_path / "killed", "2030-01-03T00:00:00+00:00", complete=False, quick=False)
    quick = _variant(doc, tmp_path / "quick", "2030-01-02T00:00:00+00:00", complete=True, quick=True)
    assert report.newest([full, killed, quick], include_cpu=True)["loss"][1] == full / "loss.json"
    found = report.newest([killed, quick], include_cpu=True)
    assert found["loss"][1] == killed / "loss.json"  # no full run: the newest, labelled
    assert report.render(found).count("[incomplete run") == 1
    assert "[--quick settings]" in report.render(report.newest([quick], include_cpu=True))
    assert "[" not in report.loss_section(*report.newest([full], include_cpu=True)["loss"])[0]


def test_report_ignores_cpu_results_by_default(results: dict[str, Path]) -> None:
    assert report.newest(results.values(), include_cpu=False) == {}
    assert set(report.newest(results.values(), include_cpu=True)) == set(report.BENCHMARKS)


def test_report_keeps_cpu_results_out_of_the_gpu_section(results: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """CPU results under benchmarks/results/ (e.g. a saved CPU loss run) never appear as GPU numbers: the
    default report ignores them; only --include-cpu shows them, labelled as a CPU smoke run."""
    import shutil

    shutil.copytree(results["loss"], tmp_path / "cpu-2026-12-04")
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path)
    report.main(["--stdout"])
    assert capsys.readouterr().out == report.NO_RESULTS
    report.main(["--stdout", "--include-cpu"])
    assert "CPU smoke run" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# env.py, timing.py
# --------------------------------------------------------------------------------------------------
def test_device_peaks() -> None:
    assert lookup_peak("NVIDIA H100 80GB HBM3").mem_bw_bytes_s == 3.35e12
    assert lookup_peak("NVIDIA H100 PCIe").mem_bw_bytes_s == 2.0e12
    assert lookup_peak("NVIDIA H200").mem_bw_bytes_s == 4.8e12
    assert lookup_peak("NVIDIA A100-SXM4-80GB").mem_bw_bytes_s == 2.039e12
    assert lookup_peak("NVIDIA GeForce RTX 3090") is None
    assert slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_resolve_device_sets_the_current_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert resolve_device("cuda:1") == "cuda:1" and current == [1]
    with pytest.raises(SystemExit, match="only 2 CUDA device"):
        resolve_device("cuda:2")
    assert resolve_device("cpu") == "cpu" and current == [1]


def test_summarize_quantiles() -> None:
    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.reps) == pytest.approx((3.0, 1.8, 4.2, 5))


def test_time_fn_times_only_fn_after_an_untimed_setup() -> None:
    """The marginal time of ``fn`` after ``setup`` (CPU: torch.utils.benchmark): a 4 ms setup is not
    counted in a 2 ms call."""
    import time

    sleep = time.sleep
    t = time_fn(lambda _arg: sleep(0.002), "cpu", warmup_ms=1, rep_ms=60, setup=lambda: sleep(0.004))
    assert 1.0 < t.median_ms < 3.5 and t.p20_ms <= t.p80_ms
    alone = time_fn(lambda: sleep(0.002), "cpu", warmup_ms=1, rep_ms=30)
    assert 1.9 < alone.median_ms < 3.5
    with pytest.raises(ValueError, match="l2 must be"):
        time_fn(lambda: None, "cpu", l2="hot")


def test_gpu_timing_apis_exist() -> None:
    """The CUDA-only calls timing.py and train_bench.py make (not runnable here) exist with the arguments
    they pass, in the installed torch and triton."""
    import inspect

    import torch
    import triton.testing
    from triton.backends.nvidia.driver import CudaDriver

    assert {"warmup", "rep", "return_mode"} <= set(inspect.signature(triton.testing.do_bench).parameters)
    assert {"rep", "return_mode"} <= set(inspect.signature(triton.testing.do_bench_cudagraph).parameters)
    assert callable(CudaDriver.get_empty_cache_for_benchmark) and callable(CudaDriver.clear_cache)
    assert callable(torch.cuda.CUDAGraph) and callable(torch.cuda.graph)
    assert callable(torch.compiler.cudagraph_mark_step_begin)
    assert hasattr(torch._dynamo.config, "optimize_ddp")


def test_gpu_check_script_parses() -> None:
    subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=True)


def test_gpu_check_dry_run_runs_every_part(dry_run: dict[str, Any]) -> None:
    """Every part ran in order and succeeded; the kernel part wrote its rows; pytest wrote a junit report."""
    import tarfile
    import xml.etree.ElementTree as ET

    outcomes = json.loads((dry_run["folder"] / "gpu_check.json").read_text())["parts"]
    assert [o["name"] for o in outcomes] == [p.name for p in gpu_check.PARTS]
    assert all(o["status"] == "ok" and o["elapsed_s"] <= o["bound_s"] for o in outcomes), outcomes
    kernel = json.loads((dry_run["folder"] / "kernel.json").read_text())
    assert kernel["config"]["complete"] is True and kernel["config"]["torch_compile"] is False
    parts = {r["part"]: r for r in kernel["results"]}
    assert list(parts) == ["copy", "sanity", "forward", "backward", "front-end"]
    assert all(r["status"] == "ok" for r in parts.values())
    assert parts["sanity"]["torch_loss_rel_err_vs_fp64"] < 1e-5  # fp32 case against float64
    assert parts["sanity"]["torch_grad_rel_err_vs_fp64"] < 1e-5
    for name in ("copy", "forward", "backward", "front-end"):
        r = parts[name]
        assert _finite_positive(r["median_ms_warm_l2"]) and _finite_positive(r["host_ms_per_call"])
        assert math.isclose(r["gbps_warm_l2"], r["bytes"] / r["median_ms_warm_l2"] / 1e6, rel_tol=1e-9)
        assert r["median_ms_cold_l2"] is None and r["median_ms_graph"] is None  # CPU: not measured
    assert "fastdist::dist_loss_fwd" in parts["forward"]["launched"]  # read from the profiler
    assert "fastdist::dist_loss_bwd" in parts["backward"]["launched"]
    suite = ET.parse(dry_run["folder"] / "pytest.xml").getroot()
    assert suite.iter("testcase")  # the machine-readable report exists and parses
    out = sorted(f.name for f in dry_run["out"].iterdir())
    assert len(out) <= gpu_check.MAX_OUT_FILES and "results.tar.gz" in out and "kernel.json" in out
    with tarfile.open(dry_run["out"] / "results.tar.gz") as tar:
        packed = {Path(n).name for n in tar.getnames()}
    assert {"env.json", "kernel.json", "pytest.xml", "loss.csv", "loss.json", "train.json",
            "loader.json"} <= packed


def _part(marker: Path, seconds: float, limit_s: float, min_s: float) -> gpu_check.Part:
    code = f"import pathlib, time; pathlib.Path({str(marker)!r}).write_text('x'); time.sleep({seconds})"
    return gpu_check.Part("probe", limit_s, min_s, lambda ctx, _s: [ctx.py, "-c", code])


def test_gpu_check_part_that_does_not_fit_is_skipped_never_started(tmp_path: Path) -> None:
    ctx = gpu_check.Ctx(sys.executable, "cpu", tmp_path, dry_run=True)
    log = gpu_check.Log(tmp_path, 100, True)
    marker = tmp_path / "started"
    reserve = gpu_check.REPORT_RESERVE_S + gpu_check.KILL_GRACE_S
    assert gpu_check.part_bound(100, 50) == 50 - reserve and gpu_check.part_bound(10, 500) == 10
    assert gpu_check.run_part(_part(marker, 0, 100, 20), ctx, left_s=reserve + 19, log=log)
    assert not marker.exists()
    (outcome,) = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert outcome["status"].startswith("skipped")
    assert "not started" in (tmp_path / "gpu_check.log").read_text()


def test_gpu_check_part_past_its_bound_is_killed(tmp_path: Path) -> None:
    import time

    ctx = gpu_check.Ctx(sys.executable, "cpu", tmp_path, dry_run=True)
    log = gpu_check.Log(tmp_path, 100, True)
    t0 = time.monotonic()
    assert not gpu_check.run_part(_part(tmp_path / "started", 60, 2, 1), ctx, left_s=500, log=log)
    assert time.monotonic() - t0 < 2 + gpu_check.KILL_GRACE_S + 5 and (tmp_path / "started").exists()
    (outcome,) = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert outcome["status"].startswith("timed out") and outcome["bound_s"] == 2


def test_gpu_check_tiny_deadline_starts_no_part(tmp_path: Path) -> None:
    """With a deadline that leaves no part its minimum, every part is logged as skipped and none starts;
    the report still runs and the files still reach $OUT."""
    proc = _gpu_check("--dry-run", "--deadline", "30", "--base", str(tmp_path / "r"), OUT=str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (folder,) = (tmp_path / "r").glob("cpu-*")
    outcomes = json.loads((folder / "gpu_check.json").read_text())["parts"]
    assert [o["name"] for o in outcomes] == [p.name for p in gpu_check.PARTS]
    assert all(o["status"].startswith("skipped") for o in outcomes)
    assert not any((folder / f).exists() for f in ("kernel.json", "pytest.xml", "loss.json", "train.json"))
    assert "== report" in proc.stdout and (tmp_path / "o" / "gpu_check.log").exists()


def test_per_test_timeout_fails_the_slow_test_and_goes_on(tmp_path: Path) -> None:
    (tmp_path / "test_probe.py").write_text(
        "import time\n\ndef test_slow():\n    time.sleep(20)\n\ndef test_fast():\n    assert True\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", str(tmp_path), "-q", "-p", "no:cacheprovider",
                           "-p", "pytest_per_test_timeout", "--per-test-timeout=1", "-p", "no:timeout"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert "1 failed, 1 passed" in proc.stdout and "over the per-test timeout of 1 s" in proc.stdout


def test_sigterm_still_writes_the_junit_report(tmp_path: Path) -> None:
    """A pytest part ended with SIGTERM (past its bound) still writes its summary and junit file."""
    import signal
    import time

    (tmp_path / "test_probe.py").write_text(
        "import time\n\ndef test_fast():\n    assert True\n\ndef test_slow():\n    time.sleep(30)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    xml = tmp_path / "pytest.xml"
    proc = subprocess.Popen([sys.executable, "-m", "pytest", str(tmp_path), "-v", "-p", "no:cacheprovider",
                             "-p", "pytest_per_test_timeout", f"--junitxml={xml}", "-p", "no:timeout"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # wait until the slow test runs
        if "test_fast PASSED" in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=30)[0]
    assert "KeyboardInterrupt" in rest and "1 passed" in rest
    assert 'name="test_fast"' in xml.read_text()


def test_gpu_check_stops_without_results_folder(tmp_path: Path) -> None:
    """When env.py cannot create the results folder, nothing runs and nothing is written elsewhere."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = _gpu_check(GPU_CHECK_DRY_RUN="1", RESULTS_BASE=str(blocker / "sub"))
    assert proc.returncode == 1 and "could not create the results folder" in proc.stderr
    assert "==" not in proc.stdout  # no step started
