"""Check that ``train_classifier(..., fast_train=False)`` reproduces a shipped ``birds_model.pt``.

    python tools/reproduce.py DATA_DIR --shipped submission/birds_model.pt [--out retrained.pt]

Retrains from scratch through the grader interface (the 'full' preset), then scores the retrained and
the shipped model on ``DATA_DIR/test`` with the same evaluation and prints both, their difference, the
share of test images on which they agree, the training time and the peak memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from probe.data import load_split_dir, read_gt
from probe.timing import peak_rss_mb

from finetune.checkpoint import Classifier

from solution import train_classifier


def compare(retrained: Classifier, shipped: Classifier, data_dir: Path) -> dict:
    """Both models' accuracy on ``data_dir/test`` (``Classifier.score``) and how often they predict the same."""
    test = load_split_dir(data_dir, "test", num_classes=shipped.net_cfg.num_classes)
    agree = np.mean(retrained.predict(test.sources, test.names) == shipped.predict(test.sources, test.names))
    return {"retrained": retrained.score(test), "shipped": shipped.score(test), "agree": float(agree),
            "images": len(test)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path)
    p.add_argument("--shipped", type=Path, required=True, help="the submitted birds_model.pt")
    p.add_argument("--out", type=Path, help="also save the retrained checkpoint here")
    p.add_argument("--tolerance", type=float, default=0.015, help="allowed test-accuracy difference")
    args = p.parse_args(argv)
    start = time.perf_counter()
    model = train_classifier(read_gt(args.data_dir / "train" / "gt.csv"), str(args.data_dir / "train" / "images"),
                             fast_train=False)
    train_s = time.perf_counter() - start
    if args.out:
        model.save(args.out)
    c = compare(model, Classifier.load(args.shipped), args.data_dir)
    print(f"retrained with fast_train=False in {train_s / 60:.1f} min (peak RSS {peak_rss_mb():.0f} MiB)")
    print(f"test accuracy: shipped {c['shipped']:.4f}, retrained {c['retrained']:.4f}, difference "
          f"{c['retrained'] - c['shipped']:+.4f}; predictions agree on {c['agree']:.1%} of {c['images']} images")
    sys.exit(0 if abs(c["retrained"] - c["shipped"]) <= args.tolerance else 1)


if __name__ == "__main__":
    main()
