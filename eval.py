"""Evaluate a segmentation checkpoint on a dataset's eval split: mIoU, pixel accuracy, per-class IoU.

    python eval.py --model deeplabv3 --backbone resnet101 --data data/cityscapes \
        --pretrained ckpts/deeplabv3_resnet101_citys_best_model.pth [--scales 0.75 1.0 1.25] [--flip-eval]
    torchrun --nproc_per_node=8 eval.py ...            # each rank evaluates its shard

Bad input (missing dataset, unknown model, checkpoint that does not fit) fails before the process
group, the device and the data pipeline are started, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import time

from fastdist.data import DALI_HINT, check_dataset, dali_available, get_dataset, list_pairs
from fastdist.engine.distributed import cleanup_distributed, exit_process
from fastdist.engine.evaluation import evaluate, save_results_json
from fastdist.engine.flops import format_model_cost, model_cost
from fastdist.engine.inference_cli import (
    InferenceRun,
    InferenceSetupError,
    add_inference_args,
    prepare_inference,
    run_command,
)
from fastdist.engine.logger import terminal_progress
from fastdist.engine.metrics import format_iou_table
from fastdist.engine.sliding import add_sliding_args, check_sliding_args, maybe_sliding


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (names follow the reference eval.py)."""
    p = argparse.ArgumentParser(description="Evaluate a segmentation model on a dataset's eval split.")
    add_inference_args(p)
    p.add_argument("--split", default=None,
                   help="split to evaluate (default: the dataset's, as in CIRKD's eval.py: camvid test, "
                        "else val)")
    p.add_argument("--loader", choices=("auto", "torch", "dali"), default="auto",
                   help="data backend (auto: dali on CUDA when DALI is installed, else torch)")
    p.add_argument("--workers", "-j", type=int, default=4, help="loader threads/workers")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward and rank")
    p.add_argument("--save-dir", default=None, help="write the results as JSON here")
    add_sliding_args(p)
    return p.parse_args(argv)


def _validate(args: argparse.Namespace) -> None:
    """Eval-only cheap checks of everything the user named, before any heavy start-up."""
    spec = get_dataset(args.dataset)
    args.split = spec.recipe.eval_split if args.split is None else args.split
    if args.batch_size < 1:
        raise InferenceSetupError("--batch-size must be >= 1")
    if spec.varying_size and args.batch_size != 1:
        raise InferenceSetupError(f"--batch-size {args.batch_size}: {spec.title} images vary in size, so "
                                  "evaluation runs one whole image per batch and rank; use 1 (the default)")
    try:
        check_sliding_args(args.eval_mode, args.crop_size, args.stride)
    except ValueError as exc:
        raise InferenceSetupError(str(exc)) from None
    if args.loader == "dali" and not dali_available():
        raise InferenceSetupError(f"--loader dali: {DALI_HINT}")
    check_dataset(args.data, args.split, dataset=spec)
    if any(pair.label is None for pair in list_pairs(args.data, args.split, dataset=spec)):
        raise InferenceSetupError(f"split {args.split!r} under {args.data} has no labels (no "
                                  f"{spec.splits[args.split].labels}): there is nothing to score; predict.py "
                                  "writes predictions")


def _input_size(args: argparse.Namespace, image_path: str) -> tuple[int, int]:
    """The network input the model cost is quoted at: the window in slide mode, else the first image."""
    if args.eval_mode == "slide" and args.crop_size:
        return tuple(args.crop_size)
    from PIL import Image

    with Image.open(image_path) as img:  # reads the header only
        return img.height, img.width


def run(args: argparse.Namespace) -> dict:
    """Validate, load, evaluate on all ranks; print and save the results on the main rank."""
    from fastdist.data import build_loader, default_backend

    prep = prepare_inference(args, check=_validate)
    env, runtime = prep.env, prep.runtime
    cost = model_cost({"model": prep.model}, _input_size(args, prep.pairs[0].image))
    model = maybe_sliding(prep.model, args.eval_mode, args.crop_size, args.stride)
    backend = args.loader if args.loader != "auto" else default_backend(env.device)
    loader = build_loader(args.data, args.split, args.batch_size, backend=backend, device=env.device,
                          rank=env.rank, world_size=env.world_size, num_threads=args.workers,
                          channels_last=runtime.channels_last, augment=False,  # whole images, also for train
                          check_files=False, dataset=args.dataset)  # _validate ran check_dataset
    if env.is_main:
        print("model cost (FlopCounterMode):\n" + format_model_cost(cost))
    bar = terminal_progress(len(prep.shard)) if env.is_main else None
    start = time.perf_counter()
    classes = get_dataset(args.dataset).num_classes
    result = evaluate(model, loader, classes, env.device, scales=tuple(args.scales),
                      flip=args.flip_eval, amp=runtime.amp, source=f"checkpoint {args.pretrained}",
                      progress=bar.update if bar else None)
    if bar:
        bar.clear()
    seconds = time.perf_counter() - start
    if env.is_main:
        _report(args, prep, result, cost, seconds)
    cleanup_distributed()
    return result


def _report(args: argparse.Namespace, prep: InferenceRun, result: dict, cost: dict, seconds: float) -> None:
    """Print the metrics table and write the JSON file (main rank only)."""
    world_size, amp = prep.env.world_size, prep.runtime.amp
    class_names = get_dataset(args.dataset).class_names
    print(format_iou_table(result["IoU"], class_names, miou=result["mIoU"]))
    print(f"{args.model}/{args.backbone} on {args.dataset} {args.split} ({result['images']} images, "
          f"scales {args.scales}, flip {args.flip_eval}, amp {amp}, {world_size} rank(s), {seconds:.1f} s): "
          f"mIoU {100 * result['mIoU']:.2f}  pixAcc {100 * result['pixAcc']:.2f}")
    if args.save_dir:
        path = os.path.join(args.save_dir, f"eval_{args.model}_{args.backbone}_{args.split}.json")
        save_results_json(result, path, class_names, model=args.model, backbone=args.backbone,
                          checkpoint=os.path.abspath(args.pretrained), dataset=args.dataset, split=args.split,
                          scales=list(args.scales), flip=args.flip_eval, amp=amp, world_size=world_size,
                          eval_mode=args.eval_mode, model_cost=cost, seconds=round(seconds, 3))
        print(f"results written to {path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit status (2 on a user error, with a one-line message)."""
    return run_command("eval.py", run, parse_args(argv))


if __name__ == "__main__":
    exit_process(main())
