"""Write predictions for a split (Cityscapes: default test, ready for the Cityscapes test server).

    python predict.py --model deeplabv3 --backbone resnet101 --data data/cityscapes \
        --pretrained ckpts/deeplabv3_resnet101_citys_best_model.pth --save-dir out/test_pred
    torchrun --nproc_per_node=4 predict.py ...          # each rank predicts its shard

Writes, for every ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``:

* ``<save-dir>/labelIds/<city>/<stem>_leftImg8bit.png``: 8-bit Cityscapes *label ids* (train ids
  mapped back), full resolution. Zip the ``labelIds`` folder for the server (it matches files by
  ``<city>_<seq>_<frame>*.png``, one per frame).
* ``<save-dir>/color/<city>/<stem>_color.png``: a palette visualisation (skip with ``--no-color``).

Labels are not needed (the test split has none).  Other datasets (``--dataset``, default split: test
where the dataset has one, else its eval split) get ``<save-dir>/labels/<stem>.png`` in the dataset's
own id space (ADE20K: 1..150, COCO-Stuff: its stuffthingmaps ids) and ``<save-dir>/color/<stem>.png``
with its palette.
"""

from __future__ import annotations

import argparse
import time

from fastdist.data import get_dataset
from fastdist.engine.distributed import barrier, cleanup_distributed, exit_process
from fastdist.engine.inference_cli import add_inference_args, prepare_inference, run_command
from fastdist.engine.logger import terminal_progress
from fastdist.engine.prediction import predict_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (names follow eval.py)."""
    p = argparse.ArgumentParser(description="Write label-id and colour predictions of a dataset's split.")
    add_inference_args(p)
    p.add_argument("--save-dir", required=True, help="output folder: labelIds/ (citys) or labels/ (the other "
                   "datasets; ids as the dataset stores them) and color/ inside")
    p.add_argument("--split", default=None, help="split to predict (default test, or the dataset's eval "
                                                  "split when it has no test split)")
    p.add_argument("--workers", "-j", type=int, default=4, help="threads decoding and writing PNGs")
    p.add_argument("--no-color", action="store_true", help="do not write colour visualisations")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Validate, load, predict this rank's shard; returns the number of images this rank wrote."""
    spec = get_dataset(args.dataset)
    if args.split is None:
        args.split = "test" if "test" in spec.splits else spec.recipe.eval_split
    prep = prepare_inference(args)
    env, runtime = prep.env, prep.runtime
    shard = [pair.image for pair in prep.shard]
    bar = terminal_progress(len(shard)) if env.is_main else None
    start = time.perf_counter()
    written = predict_images(prep.model, shard, args.save_dir, env.device, scales=tuple(args.scales),
                             flip=args.flip_eval, amp=runtime.amp, color=not args.no_color,
                             channels_last=runtime.channels_last, workers=args.workers,
                             source=f"checkpoint {args.pretrained}",
                             progress=bar.update if bar else None, dataset=args.dataset)
    if bar:
        bar.clear()
    barrier()
    if env.is_main:
        print(f"{len(prep.pairs)} {args.split} predictions written to {args.save_dir} by {env.world_size} "
              f"rank(s) in {time.perf_counter() - start:.1f} s")
    cleanup_distributed()
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit status (2 on a user error, with a one-line message)."""
    return run_command("predict.py", run, parse_args(argv))


if __name__ == "__main__":
    exit_process(main())
