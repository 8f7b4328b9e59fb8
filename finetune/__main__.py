"""``python -m finetune [DATA_DIR] [--out birds_model.pt]``: both LP-FT stages, then test accuracy.

DATA_DIR is the grader layout (train/gt.csv + train/images, optionally test/... and classes.txt). Without it,
a small generated set is used. Prints one line per stage with its time, the validation and test accuracy
and the peak memory. Writes nothing but ``--out`` (and ``--log-dir`` when given).

Scale out with Lightning's own flags: ``--accelerator gpu --devices 4`` (one machine), ``--strategy ddp
--devices 2`` on CPU processes, ``--num-nodes N`` under a cluster launcher. Each rank extracts and trains on
its shard of the images; only rank 0 reports and writes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from probe.data import DataError, LabelledImages
from probe.datasets import load_data
from probe.timing import Stopwatch, peak_rss_mb
from probe.weights import WeightsError
from finetune.cache import CacheBudgetError, default_budget, parse_size
from finetune.config import PRESETS, FinetuneConfig, preset
from finetune.train import FinetuneResult, fine_tune

OVERRIDES = ("image_size", "views", "epochs", "split", "pooling", "val_fraction", "seed", "precision",
             "train_precision", "lr_head", "lr_tail", "batch_size", "dropout", "mix", "mix_alpha", "ema_decay", "members")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", type=Path, help="grader-layout folder (default: a generated set)")
    p.add_argument("--out", type=Path, help="write the checkpoint here (e.g. birds_model.pt)")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    for name in OVERRIDES:
        kind = int if name == "split" else type(getattr(FinetuneConfig(), name))
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help=f"override (full preset: {getattr(PRESETS['full'], name)})")
    p.add_argument("--allow-download", action="store_true", help="let torchvision download missing weights")
    p.add_argument("--random-init", action="store_true", help="no pretrained weights (a smoke run)")
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = preset(args.preset, **{k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
    sw, progress = Stopwatch(), not args.no_progress
    budget = args.cache_budget if args.cache_budget is not None else default_budget()
    try:
        with sw("read data"):
            train, test = load_data(args.data_dir)
        result = fine_tune(train, cfg, "none" if args.random_init else "required", allow_download=args.allow_download,
                           progress=progress, verbose=args.verbose, cache_budget=budget, log_dir=args.log_dir,
                           accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
                           num_nodes=args.num_nodes)
    except (DataError, WeightsError, CacheBudgetError) as err:
        sys.exit(f"error: {err}")
    if not result.is_global_zero:
        return  # another rank of a distributed run: rank 0 reports and writes
    report(result, args.verbose)
    if test is not None:
        with sw("test"):
            accuracy = result.classifier.score(test, precision=result.cfg.precision, progress=progress)
        crops = f", crops {'+'.join(map(str, cfg.tta_crops))}" if cfg.tta_crops else ""
        print(f"test accuracy: {accuracy:.4f} ({len(test)} images, flip TTA {'on' if cfg.tta_flip else 'off'}{crops})")
    if args.out:
        result.classifier.save(args.out)
        print(f"checkpoint written to {args.out}")
    print(f"time: {sw.report()}, {result.stopwatch.report()}; peak RSS {peak_rss_mb():.0f} MiB")


def report_shards(shards: list[list[int]], images: int, verbose: bool) -> None:
    """Each rank's share of the extraction, and whether together they are every image exactly once."""
    for rank, shard in enumerate(shards):
        head = ", ".join(map(str, shard[:3])) + (f", ... {shard[-1]}" if len(shard) > 3 else "")
        print(f"rank {rank}: extracted {len(shard)} of {images} images" + (f" (indices {head})" if verbose else ""))
    every = sorted(i for shard in shards for i in shard) == list(range(images))
    print(f"shards: {'every image exactly once' if every else 'OVERLAP OR GAP: the ranks did not split the images'}")


def report(result: FinetuneResult, verbose: bool) -> None:
    cfg, fitted = result.cfg, result.fitted
    if verbose:
        print(f"config: {cfg}")
    if len(result.shards) > 1:
        report_shards(result.shards, result.cache_images, verbose)
    probe_val = "n/a" if fitted.val_accuracy is None else f"{fitted.val_accuracy:.4f}"
    print(f"stage one: C {fitted.C:g}, probe validation accuracy {probe_val}; probe head digest per rank: "
          f"{' '.join(result.head_digests)}")
    if result.val_accuracy is not None:
        print(f"stage two validation accuracy: {result.val_accuracy:.4f} (best epoch)")
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
