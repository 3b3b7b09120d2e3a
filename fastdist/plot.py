"""Training curves of one or more runs from their ``metrics.jsonl``, optionally with example predictions.

    python -m fastdist.plot RUN_DIR [RUN_DIR ...] -o curves.png
    python -m fastdist.plot runs/teacher runs/dist runs/baseline -o summary.png \\
        --data data/cityscapes --examples 3          # + image | ground truth | each run's prediction

Panels: task and KD loss (KD dashed), learning rate, val mIoU, one colour per run. With ``--data``, each
run's best export (the reference file name in its save dir, see ``config.json``) predicts the first
``--examples`` validation images of ``--data`` (a root of the runs' ``--dataset``, from ``config.json``),
drawn in that dataset's palette (ignore pixels black) below the curves.
Needs matplotlib (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["colorize", "load_metrics", "main", "plot_runs", "predict_examples", "run_dataset"]


def load_metrics(run_dir: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """``{"train": [...], "val": [...]}`` records of ``RUN_DIR/metrics.jsonl`` (FileNotFoundError: none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a train.py save/log dir?)")
    out: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from None
        if record.get("kind") in out:
            out[record["kind"]].append(record)
    return out


def colorize(train_ids: np.ndarray, palette: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 colours of ``palette`` (RGB per train id; default the
    Cityscapes palette), anything else black."""
    if palette is None:
        from fastdist.data.cityscapes import PALETTE as palette

    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = palette
    return table[train_ids.astype(np.uint8)]


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (is {run_dir} a train.py save dir?)")
    return json.loads(path.read_text())


def run_dataset(run_dir: str | os.PathLike) -> str:
    """The ``--dataset`` a run trained on (its ``config.json``; runs from before ``--dataset``: citys)."""
    return _run_config(Path(run_dir)).get("dataset", "citys")


def _run_model(run_dir: Path) -> Any:
    """The run's best (else final) reference export, loaded for inference with its dataset's classes."""
    from fastdist.data import get_dataset
    from fastdist.engine.checkpoint import reference_export_name
    from fastdist.engine.inference_cli import build_inference_model

    config = _run_config(run_dir)
    model, backbone = config["student_model"], config["student_backbone"]
    distilled = config.get("teacher_model") is not None
    dataset = config.get("dataset", "citys")
    names = [reference_export_name(model, backbone, distilled, best, dataset=dataset)
             for best in (True, False)]
    for path in [run_dir / name for name in names]:
        if path.is_file():
            return build_inference_model(model, backbone, str(path), get_dataset(dataset).num_classes)
    raise FileNotFoundError(f"{run_dir}: no exported model ({' or '.join(names)}) to draw predictions with")


def predict_examples(run_dirs: Sequence[str | os.PathLike], data: str, count: int,
                     split: str | None = None) -> list[list[np.ndarray]]:
    """Per image: [image RGB, ground truth, prediction of each run] as (H, W, 3) uint8 arrays.

    ``data`` is a root of the runs' dataset (their ``config.json`` ``dataset``; all runs must share
    one); ``split`` defaults to the split its training validates on. Colours are the dataset's palette.
    """
    import torch

    from fastdist.data import get_dataset, list_pairs
    from fastdist.data.torch_loader import read_image_bgr, read_train_ids
    from fastdist.engine.inference import image_to_input, infer_logits

    datasets = {run_dataset(d) for d in run_dirs}
    if len(datasets) != 1:
        raise ValueError(f"the runs were trained on different datasets ({', '.join(sorted(datasets))}): "
                         "example predictions need one --data root for all of them")
    spec = get_dataset(datasets.pop())
    pairs = list_pairs(data, split or spec.recipe.val_split, dataset=spec)[:count]
    models = [_run_model(Path(d)) for d in run_dirs]
    rows = []
    for pair in pairs:
        bgr = read_image_bgr(pair.image)
        row = [bgr[..., ::-1].copy(), colorize(read_train_ids(pair.label, spec), spec.palette)]
        with torch.inference_mode():
            for model in models:
                logits = infer_logits(model, image_to_input(bgr, torch.device("cpu")))
                row.append(colorize(logits.argmax(1)[0].numpy(), spec.palette))
        rows.append(row)
    return rows


def _curves(axes: Sequence[Any], runs: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    loss_ax, lr_ax, miou_ax = axes
    for index, (name, metrics) in enumerate(runs.items()):
        colour = f"C{index}"
        train = metrics["train"]
        its = [r["iteration"] for r in train]
        loss_ax.plot(its, [r["task_loss"] for r in train], color=colour, label=f"{name} task")
        if any(r.get("kd_loss") for r in train):
            loss_ax.plot(its, [r["kd_loss"] for r in train], color=colour, linestyle="--", label=f"{name} KD")
        lr_ax.plot(its, [r["lr"] for r in train], color=colour, label=name)
        val = metrics["val"]
        miou_ax.plot([r["iteration"] for r in val], [100 * r["mIoU"] for r in val], color=colour,
                     marker="o", label=f"{name} ({100 * val[-1]['mIoU']:.1f})" if val else name)
    for ax, title in zip(axes, ("loss", "learning rate", "val mIoU %"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)


def plot_runs(run_dirs: Sequence[str | os.PathLike], out: str | os.PathLike,
              labels: Sequence[str] | None = None, data: str | None = None, examples: int = 3) -> Path:
    """Draw the curves (and, with ``data``, example predictions) of ``run_dirs`` into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(labels) if labels else [Path(d).name for d in run_dirs]
    if len(names) != len(run_dirs):
        raise ValueError(f"{len(names)} labels for {len(run_dirs)} runs")
    runs = {name: load_metrics(d) for name, d in zip(names, run_dirs, strict=True)}
    rows = predict_examples(run_dirs, data, examples) if data else []
    columns = max(3, 2 + len(run_dirs)) if rows else 3
    fig = plt.figure(figsize=(3.2 * columns, 3.0 + 1.9 * len(rows)), constrained_layout=True)
    grid = fig.add_gridspec(1 + len(rows), columns, height_ratios=[1.6] + [1.0] * len(rows))
    edges = [0, columns // 3, 2 * columns // 3, columns]  # the three curve panels share the top row
    _curves([fig.add_subplot(grid[0, edges[i] : edges[i + 1]]) for i in range(3)], runs)
    for r, row in enumerate(rows):
        for c, (panel, title) in enumerate(zip(row, ["image", "ground truth", *names], strict=True)):
            ax = fig.add_subplot(grid[1 + r, c])
            ax.imshow(panel)
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastdist.plot RUN_DIR [RUN_DIR ...] -o curves.png [--data ROOT --examples N]``."""
    p = argparse.ArgumentParser(prog="python -m fastdist.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="train.py log dirs (with metrics.jsonl)")
    p.add_argument("-o", "--out", default="curves.png", help="output image (png, pdf, svg)")
    p.add_argument("--labels", nargs="+", default=None, help="legend names (default: the folder names)")
    p.add_argument("--data", default=None, help="root of the runs' dataset (config.json's 'dataset'): add "
                   "example validation predictions of every run")
    p.add_argument("--examples", type=int, default=3, help="validation images shown with --data")
    args = p.parse_args(argv)
    from fastdist.engine.inference_cli import InferenceSetupError

    try:
        out = plot_runs(args.runs, args.out, args.labels, args.data, args.examples)
    except (FileNotFoundError, ValueError, InferenceSetupError) as err:
        print(f"fastdist.plot: error: {err}")
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
