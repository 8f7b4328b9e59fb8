"""Check that ``train_classifier(..., fast_train=False)`` reproduces a shipped ``birds_model.pt``.

    python tools/reproduce.py DATA_DIR --shipped submission/birds_model.pt [--out retrained.pt]
    python tools/reproduce.py DATA_DIR --shipped old.pt --retrained new.pt   # two checkpoints, no training

Retrains from scratch through the grader interface (the 'full' preset), or takes ``--retrained``, then scores
it and the shipped model on ``DATA_DIR/test`` with the same evaluation and prints both, their difference, the
share of test images on which they agree, how many state-dict tensors are bit-identical, the training time
and the peak memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from birds_lpft.classifier import Classifier
from birds_lpft.data.sets import DataError, LabelledImages, load_split_dir, read_gt
from birds_lpft.utils.cli import check_output_file, fail, read_or_fail
from birds_lpft.utils.timing import peak_rss_mb

from solution import train_classifier


def compare(retrained: Classifier, shipped: Classifier, test: LabelledImages) -> dict:
    """Both models' accuracy on the test split (``Classifier.evaluate``, one pass each) and how often they predict
    the same."""
    ours, original = retrained.evaluate(test), shipped.evaluate(test)
    agree = np.mean(ours["predictions"] == original["predictions"])
    mine, theirs = retrained.net.state_dict(), shipped.net.state_dict()
    same = sum(k in theirs and torch.equal(v, theirs[k]) for k, v in mine.items())
    return {"retrained": ours["accuracy"], "shipped": original["accuracy"], "agree": float(agree),
            "images": len(test), "identical": f"{same}/{len(mine)}"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path)
    p.add_argument("--shipped", type=Path, required=True, help="the submitted birds_model.pt")
    p.add_argument("--out", type=Path, help="also save the retrained checkpoint here")
    p.add_argument("--retrained", type=Path, help="compare this checkpoint instead of retraining")
    p.add_argument("--tolerance", type=float, default=0.015, help="allowed test-accuracy difference")
    args = p.parse_args(argv)
    if args.out and args.retrained:  # nothing is retrained, so --out would be silently left unwritten
        p.error("--out saves a retrained model; with --retrained nothing is trained")
    check_output_file(p.prog, "--out", args.out, inputs=[args.shipped])
    shipped = read_or_fail(p.prog, "--shipped", lambda: Classifier.load(args.shipped))  # before the long work
    retrained = read_or_fail(p.prog, "--retrained", lambda: Classifier.load(args.retrained)) if args.retrained else None
    try:
        test = load_split_dir(args.data_dir, "test", num_classes=shipped.net_cfg.num_classes)
    except DataError as err:
        fail(p.prog, str(err))
    model = retrained or _retrain(args.data_dir, args.out)
    c = compare(model, shipped, test)
    print(f"test accuracy: shipped {c['shipped']:.4f}, retrained {c['retrained']:.4f}, difference "
          f"{c['retrained'] - c['shipped']:+.4f}; predictions agree on {c['agree']:.1%} of {c['images']} images; "
          f"state-dict tensors bit-identical: {c['identical']}")
    sys.exit(0 if abs(c["retrained"] - c["shipped"]) <= args.tolerance else 1)


def _retrain(data_dir: Path, out: Path | None) -> Classifier:
    start = time.perf_counter()
    model = train_classifier(read_gt(data_dir / "train" / "gt.csv"), str(data_dir / "train" / "images"),
                             fast_train=False)
    print(f"retrained with fast_train=False in {(time.perf_counter() - start) / 60:.1f} min (peak RSS "
          f"{peak_rss_mb():.0f} MiB)")
    if out:
        model.save(out)
    return model


if __name__ == "__main__":
    main()
