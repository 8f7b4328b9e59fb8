"""``python -m finetune [DATA_DIR] [field=value ...] [--preset full] [--out birds_model.pt]``: both LP-FT stages.

DATA_DIR is the grader layout (train/gt.csv, train/images, optionally test/ and classes.txt; default: a small generated
set). Any FinetuneConfig field can be overridden (``lr_tail=6e-4 views=6``); all is checked before any image is decoded.
Prints each stage's time and accuracy, and test accuracy where test/ exists; writes nothing but --out and --log-dir.
Scale out with Lightning's flags (--accelerator, --devices, --strategy ddp, --num-nodes): each rank extracts and trains
on its own shard of the images; only rank 0 reports and writes.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from birds_lpft.data.sets import DataError
from birds_lpft.data.synthetic import load_data
from birds_lpft.models.net import BirdNet
from birds_lpft.models.weights import WeightsError
from birds_lpft.recipe import FinetuneConfig, add_recipe_args, alias_overrides, recipe
from birds_lpft.utils.cli import (
    add_weights_args,
    check_output_dir,
    check_output_file,
    fail,
    layout_inputs,
    run_interruptible,
    weights_mode,
)
from birds_lpft.utils.settings import ConfigError, is_override
from birds_lpft.utils.timing import Stopwatch, peak_rss_mb

from finetune.cache import CacheBudgetError, default_budget, parse_size
from finetune.distributed import gather_rows
from finetune.module import TrainingDiverged
from finetune.train import FinetuneResult, fine_tune

PROG = "python -m finetune"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, FinetuneConfig]:
    """The arguments and the run's config, every flag and destination checked (exit 2 on the first bad one)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("args", nargs="*", metavar="[DATA_DIR] [field=value ...]",
                   help="grader-layout folder (default: a generated set), then FinetuneConfig overrides")
    p.add_argument("--out", type=Path, help="write the checkpoint here (e.g. birds_model.pt)")
    add_recipe_args(p)
    add_weights_args(p)
    p.add_argument("--accelerator", default="cpu", help="Lightning's: cpu, gpu, auto, ...")
    p.add_argument("--devices", default="auto", help="Lightning's: a count, a list, or auto")
    p.add_argument("--strategy", default="auto", help="Lightning's: auto, ddp, ddp_spawn, ...")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--cache-budget", type=parse_size, default=None,
                   help="memory the trunk cache may use on this machine, e.g. 6GiB (default: 60%% of the "
                        "memory available at the start)")
    p.add_argument("--log-dir", type=Path, help="write Lightning's CSV (and TensorBoard) training logs here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="also Lightning's own messages and the full config")
    args = p.parse_intermixed_args(argv)  # field=value may come before or after the flags
    paths = [t for t in args.args if not is_override(t)]
    overrides = [t for t in args.args if is_override(t)]
    if len(paths) > 1:
        fail(PROG, f"one DATA_DIR at most, got {paths}; overrides are field=value")
    args.data_dir = Path(paths[0]) if paths else None
    try:
        cfg = recipe(args.preset, [*overrides, *alias_overrides(args)])
    except ConfigError as err:
        fail(PROG, str(err))
    if args.num_nodes < 1:
        fail(PROG, f"--num-nodes must be at least 1, got {args.num_nodes}")
    args.weights_mode = weights_mode(PROG, args)
    check_output_file(PROG, "--out", args.out, layout_inputs(args.data_dir))
    check_output_dir(PROG, "--log-dir", args.log_dir)
    return args, cfg


def main(argv: list[str] | None = None) -> None:
    args, cfg = parse_args(argv)
    run_interruptible(lambda written: run(args, cfg, written), PROG)


def run(args: argparse.Namespace, cfg: FinetuneConfig, written: list) -> None:
    sw = Stopwatch()
    progress = not args.no_progress
    budget = args.cache_budget if args.cache_budget is not None else default_budget()
    try:
        with sw("read data"):
            train, test = load_data(args.data_dir)
        digests = HeadDigests()
        result = fine_tune(train, cfg, args.weights_mode, allow_download=args.allow_download,
                           weights_file=args.weights, progress=progress, verbose=args.verbose, cache_budget=budget,
                           log_dir=args.log_dir,
                           accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
                           num_nodes=args.num_nodes, callbacks=[digests])
    except (DataError, WeightsError, CacheBudgetError, TrainingDiverged) as err:
        sys.exit(f"error: {err}")
    if not result.is_global_zero:
        return  # another rank of a distributed run: rank 0 reports and writes
    report(result, digests.digests, args.verbose)
    if test is not None:
        with sw("test"):
            accuracy = result.classifier.evaluate(test, precision=result.cfg.precision, progress=progress)["accuracy"]
        print(f"test accuracy: {accuracy:.4f} ({len(test)} images, flip TTA {'on' if cfg.tta_flip else 'off'})")
    if args.out:
        result.classifier.save(args.out)
        written.append(args.out)
        print(f"checkpoint written to {args.out}")
    print(f"time: {sw.report()}, {result.stopwatch.report()}; peak RSS {peak_rss_mb():.0f} MiB")


def report_shards(shards: list[list[int]], images: int, verbose: bool) -> None:
    """Each rank's share of the extraction, and whether together they are every image exactly once."""
    for rank, shard in enumerate(shards):
        head = ", ".join(map(str, shard[:3])) + (f", ... {shard[-1]}" if len(shard) > 3 else "")
        print(f"rank {rank}: extracted {len(shard)} of {images} images" + (f" (indices {head})" if verbose else ""))
    every = sorted(i for shard in shards for i in shard) == list(range(images))
    print(f"shards: {'every image exactly once' if every else 'OVERLAP OR GAP: the ranks did not split the images'}")


class HeadDigests(Callback):
    """The DDP self-check: a hash of each rank's probe-initialised head, gathered at fit start; all must be equal."""

    def __init__(self) -> None:
        super().__init__()
        self.digests: list[str] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.digests:  # an ensemble's later fits start from the same heads
            head = cast(BirdNet, pl_module.net).head  # LPFTModule's net
            data = torch.cat([head.weight.detach().flatten(), head.bias.detach()]).cpu().numpy().tobytes()
            mine = torch.tensor([int(hashlib.sha256(data).hexdigest()[:15], 16)])  # 15 hex digits fit an int64
            self.digests = [f"{v:015x}" for v in gather_rows(trainer, mine).tolist()]


def report(result: FinetuneResult, head_digests: list[str], verbose: bool) -> None:
    cfg = result.cfg
    fitted = result.fitted
    if verbose:
        print(f"config: {cfg}")
    if len(result.shards) > 1:
        report_shards(result.shards, result.cache_images, verbose)
    probe_val = "n/a" if fitted.val_accuracy is None else f"{fitted.val_accuracy:.4f}"
    print(f"stage one: C {fitted.C:g}, probe validation accuracy {probe_val}; probe head digest per rank: "
          f"{' '.join(head_digests)}")
    per_image = result.cache_bytes / max(1, len(result.shards[0]) if result.shards else result.cache_images)
    print(f"trunk cache (rank 0): {result.cache_bytes / 2**20:.0f} MiB, {per_image * 1000 / 2**20:.0f} MiB per 1,000 "
          f"images with {cfg.views + 1} views each")
    train_s = result.stopwatch.seconds.get("fine-tune", 0.0)
    print(f"fine-tune: {result.trained_samples} cached views in {train_s:.1f}s "
          f"({result.trained_samples / max(train_s, 1e-9):.1f} views/s)")
    if verbose:
        for row in result.history:
            print("  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
