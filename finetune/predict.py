"""``python -m finetune.predict MODEL IMAGE_OR_DIR... [--top-k 5] [--csv out.csv]``: species for new photos.

Prints each image's top-k species and probabilities (names from the checkpoint, else class ids); a folder gives its
non-hidden files. Predictions take ``classify``'s own path, so top-1 is what the grader would get. An unreadable file
is reported with the reason and has no prediction in the CSV (``classify`` would still guess one). Writes only --csv.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from birds_lpft.classifier import Classifier
from birds_lpft.data.sets import DataError, list_image_files
from birds_lpft.utils.cli import check_output_file, fail, printable, run_interruptible
from birds_lpft.utils.outputs import atomic_write


@dataclass(frozen=True)
class Prediction:
    """One image's top-k: (class id, species name, probability), most probable first; or why it failed."""

    file: str
    top: tuple[tuple[int, str, float], ...]
    error: str | None = None


def predict_files(model: Classifier, files: list[Path], k: int, progress: bool = False) -> list[Prediction]:
    """Top-k species of every file, through ``Classifier.predict_logits`` (``classify``'s path)."""
    if not files:
        return []
    out = model.predict_logits(files, [str(f) for f in files], progress=progress)
    probs = torch.softmax(out.logits, dim=1)
    values, ids = probs.topk(min(k, probs.shape[1]), dim=1)
    results = []
    for i, f in enumerate(files):
        if i in out.unreadable:
            results.append(Prediction(str(f), (), out.unreadable[i]))
            continue
        top = tuple((int(c), model.name_of(int(c)), float(p)) for c, p in zip(ids[i], values[i], strict=True))
        results.append(Prediction(str(f), top))
    return results


def write_csv(path: Path, results: list[Prediction], k: int) -> None:
    """One row per file: file, status, reason, then id, name and probability of each of the top k. Written
    atomically; a file name that is not UTF-8 is written as its own bytes (``surrogateescape``), naming it exactly."""
    header = ["file", "status", "reason"] + [f"{c}_{r}" for r in range(1, k + 1) for c in ("id", "species", "prob")]
    with atomic_write(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in results:
            cells = [x for c, name, p in r.top for x in (c, name, f"{p:.6f}")]
            row = [r.file, "unreadable" if r.error else "ok", r.error or ""] + cells
            writer.writerow(row + [""] * (len(header) - len(row)))  # an unreadable file: empty prediction cells


def format_line(r: Prediction) -> str:
    name = printable(r.file)
    if r.error:
        return f"{name}: unreadable ({printable(r.error)})"
    return f"{name}: " + ", ".join(f"{species} {p:.3f}" for _, species, p in r.top)


PROG = "python -m finetune.predict"


def main(argv: list[str] | None = None) -> list[Prediction]:
    args = parse_args(argv)
    return run_interruptible(lambda written: run(args, written), PROG)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, ``--top-k`` and the ``--csv`` destination checked (exit 2) before any image is read."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a checkpoint (birds_model.pt)")
    p.add_argument("inputs", type=Path, nargs="+", help="image files and/or folders of images")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--csv", type=Path, help="also write one row per file here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.top_k < 1:
        fail(PROG, f"--top-k must be at least 1, got {args.top_k}")
    check_output_file(PROG, "--csv", args.csv, [args.model, *args.inputs])
    return args


def run(args: argparse.Namespace, written: list) -> list[Prediction]:
    try:
        model = Classifier.load(args.model)
        files = [f for path in args.inputs for f in (list_image_files(path) if path.is_dir() else [path])]
    except (ValueError, DataError) as err:
        sys.exit(f"error: {err}")
    progress = not args.no_progress and any(path.is_dir() for path in args.inputs)
    results = predict_files(model, files, args.top_k, progress)
    for r in results:
        print(format_line(r))
    if args.csv:
        write_csv(args.csv, results, min(args.top_k, model.net_cfg.num_classes))
        written.append(args.csv)
    return results


if __name__ == "__main__":
    main()
