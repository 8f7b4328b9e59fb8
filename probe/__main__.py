"""``python -m probe [DATA_DIR]``: the linear probe on a grader-layout dataset, with step times.

Without DATA_DIR it runs on a small generated set. It writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from probe.data import DataError, load_split_dir
from probe.pipeline import ProbeConfig, run_probe
from probe.synthetic import make_synthetic
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
    return p.parse_args(argv)


def load_data(data_dir: Path | None):
    """(train, test or None) from a grader-layout folder, or the generated demo set."""
    if data_dir is None:
        print("no DATA_DIR given: using a small generated set (4 shapes x 24 images)")
        images = make_synthetic(num_classes=4, per_class=24, seed=0)
        return images.subset(range(0, 64)), images.subset(range(64, 96))
    test = load_split_dir(data_dir, "test") if (data_dir / "test" / "gt.csv").is_file() else None
    return load_split_dir(data_dir, "train"), test


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = ProbeConfig(backbone=args.backbone, image_size=args.image_size, precision=args.precision, seed=args.seed)
    sw = Stopwatch()
    try:
        with sw("read data"):
            train, test = load_data(args.data_dir)
        result = run_probe(train, test, cfg, "none" if args.random_init else "required",
                           allow_download=args.allow_download)
    except (DataError, WeightsError) as err:
        sys.exit(f"error: {err}")
    print(f"train images {len(train)}, classes {train.num_classes}, C chosen {result.C:g} "
          f"(validation accuracy per C: {', '.join(f'{c:g}: {s:.3f}' for c, s in result.val_scores.items())})")
    if result.val_accuracy is not None:
        print(f"validation accuracy: {result.val_accuracy:.4f}")
    if result.test_accuracy is not None:
        print(f"test accuracy:       {result.test_accuracy:.4f}  ({len(test)} images)")
    print(f"time: {sw.report()}, {result.stopwatch.report()}; peak RSS {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
