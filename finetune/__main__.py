"""``python -m finetune [DATA_DIR] [--out birds_model.pt]``: both LP-FT stages, then test accuracy.

DATA_DIR is the grader layout (train/gt.csv + train/images, optionally test/...). Without it, a small
generated set is used. Prints validation and test accuracy, each stage's time and the peak memory.
Writes nothing but ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from probe.__main__ import load_data
from probe.data import DataError, LabelledImages
from probe.timing import Stopwatch, peak_rss_mb
from probe.weights import WeightsError
from finetune.config import PRESETS, FinetuneConfig, preset
from finetune.train import FinetuneResult, fine_tune

OVERRIDES = ("image_size", "views", "epochs", "split", "val_fraction", "seed", "precision", "lr_head", "lr_tail",
             "batch_size", "head_only_epochs", "dropout")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", type=Path, help="grader-layout folder (default: a generated set)")
    p.add_argument("--out", type=Path, help="write the checkpoint here (e.g. birds_model.pt)")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    for name in OVERRIDES:
        kind = type(getattr(FinetuneConfig, name))
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=f"override (preset: {getattr(PRESETS['full'], name)})")
    p.add_argument("--allow-download", action="store_true", help="let torchvision download missing weights")
    p.add_argument("--random-init", action="store_true", help="no pretrained weights (a smoke run)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", default="auto")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def evaluate(result: FinetuneResult, test: LabelledImages, progress: bool) -> float:
    """Test accuracy through the same prediction path as ``classify``."""
    return result.classifier.score(test, precision=result.cfg.precision, progress=progress)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = preset(args.preset, **{k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
    sw, progress = Stopwatch(), not args.no_progress
    try:
        with sw("read data"):
            train, test = load_data(args.data_dir)
        result = fine_tune(train, cfg, "none" if args.random_init else "required", allow_download=args.allow_download,
                           progress=progress, accelerator=args.accelerator, devices=args.devices, strategy=args.strategy)
    except (DataError, WeightsError) as err:
        sys.exit(f"error: {err}")
    report(result, train)
    if test is not None:
        with sw("test"):
            print(f"test accuracy:             {evaluate(result, test, progress):.4f}  ({len(test)} images, "
                  f"flip TTA {'on' if cfg.tta_flip else 'off'})")
    if args.out:
        result.classifier.save(args.out)
        print(f"checkpoint written to {args.out}")
    print(f"time: {sw.report()}, {result.stopwatch.report()}; peak RSS {peak_rss_mb():.0f} MiB")


def report(result: FinetuneResult, train: LabelledImages) -> None:
    cfg = result.cfg
    print(f"config: {cfg}")
    probe_val = "n/a" if result.probe_val_accuracy is None else f"{result.probe_val_accuracy:.4f}"
    print(f"stage one: C {result.probe_C:g}, probe validation accuracy {probe_val}")
    if result.val_accuracy is not None:
        print(f"stage two validation accuracy: {result.val_accuracy:.4f} (best epoch)")
    else:
        print("stage two trained on every training image (val_fraction 0): no stage-two validation")
    per_1000 = result.cache_bytes / result.cache_images * 1000 / 2**20
    print(f"trunk cache: {result.cache_bytes / 2**20:.0f} MiB for {result.cache_images} images "
          f"({per_1000:.0f} MiB per 1,000 images, {cfg.views + 1} views each)")
    for row in result.history:
        print("  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
