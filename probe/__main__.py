"""``python -m probe [DATA_DIR]``: the linear probe on a grader-layout dataset, with step times.

Without DATA_DIR it runs on a small generated set. It writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from probe.data import DataError
from probe.datasets import load_data
from probe.pipeline import ProbeConfig, run_probe
from probe.timing import Stopwatch, peak_rss_mb
from probe.weights import WeightsError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", type=Path, help="folder with train/gt.csv, train/images[, test/...]")
    p.add_argument("--backbone", default=ProbeConfig.backbone)
    p.add_argument("--image-size", type=int, default=None, help="input side (default: the weights' own)")
    p.add_argument("--precision", default=ProbeConfig.precision, choices=["auto", "bf16", "fp32"])
    p.add_argument("--seed", type=int, default=ProbeConfig.seed)
    p.add_argument("--allow-download", action="store_true", help="let torchvision download missing weights")
    p.add_argument("--random-init", action="store_true", help="no pretrained weights (a smoke run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = ProbeConfig(backbone=args.backbone, image_size=args.image_size, precision=args.precision, seed=args.seed)
    sw = Stopwatch()
    try:
        with sw("read data"):
            train, test = load_data(args.data_dir)
        result = run_probe(train, test, cfg, "none" if args.random_init else "required",
                           allow_download=args.allow_download, progress=not args.no_progress)
    except (DataError, WeightsError) as err:
        sys.exit(f"error: {err}")
    fitted = result.fitted
    print(f"train images {len(train)}, classes {train.num_classes}, C chosen {fitted.C:g} "
          f"(validation accuracy per C: {', '.join(f'{c:g}: {s:.3f}' for c, s in fitted.val_scores.items())})")
    if fitted.val_accuracy is not None:
        print(f"validation accuracy: {fitted.val_accuracy:.4f}")
    if result.test_accuracy is not None:
        print(f"test accuracy:       {result.test_accuracy:.4f}  ({len(test)} images)")
    print(f"time: {sw.report()}, {result.stopwatch.report()}; peak RSS {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
