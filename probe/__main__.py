"""``python -m probe [DATA_DIR]``: the linear probe on a grader-layout dataset, with step times.

``--backbones mobilenet_v2 efficientnet_b0 timm/resnet50 ...`` compares backbones by probe instead, one table
row each (``probe.compare``). Without DATA_DIR it runs on a small generated set. It writes nothing but --out.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from birds_lpft.data.sets import DataError
from birds_lpft.data.synthetic import load_data
from birds_lpft.models.weights import WeightsError
from birds_lpft.utils import cli
from birds_lpft.utils.timing import Stopwatch, peak_rss_mb

from probe.compare import compare, markdown, write_table
from probe.pipeline import ProbeConfig, run_probe

PROG = "python -m probe"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, the ``--out`` destination and the backbone names checked (exit 2) before any work."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", type=Path, help="folder with train/gt.csv, train/images[, test/...]")
    p.add_argument("--backbone", default=ProbeConfig.backbone, help="a torchvision model name or timm/NAME")
    p.add_argument("--backbones", nargs="+", help="compare these backbones by probe, one table row each")
    p.add_argument("--out", type=Path, help="with --backbones: also write the table (.md or .json)")
    p.add_argument("--image-size", type=int, default=None, help="input side (default: the weights' own)")
    p.add_argument("--precision", default=ProbeConfig.precision, choices=["auto", "bf16", "fp32"])
    p.add_argument("--seed", type=int, default=ProbeConfig.seed)
    cli.add_weights_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    args = p.parse_args(argv)
    if args.out is not None and (args.backbones is None or args.out.suffix not in (".md", ".json")):
        cli.fail(PROG, "--out writes the --backbones table: give --backbones and a .md or .json file")
    if args.backbones and (args.weights is not None or args.allow_download):
        cli.fail(PROG, f"{'--weights' if args.weights is not None else '--allow-download'} goes with one --backbone; "
                   "--backbones compares the weights each backbone has in the cache")
    args.weights_mode = cli.weights_mode(PROG, args)
    cli.check_output_file(PROG, "--out", args.out, cli.layout_inputs(args.data_dir), example="table.md")
    for name in args.backbones or [args.backbone]:  # every backbone resolved now: a typo costs nothing
        flag = "--backbones" if args.backbones else "--backbone"
        args.cfg = cli.read_or_fail(PROG, flag, partial(ProbeConfig, backbone=name, image_size=args.image_size,
                                                        precision=args.precision, seed=args.seed))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cli.run_interruptible(lambda written: run(args, written), PROG)


def run(args: argparse.Namespace, written: list) -> None:
    sw = Stopwatch()
    try:
        with sw("read data"):
            train, test = load_data(args.data_dir)
        if args.backbones:
            return run_compare(args, train, test, written)
        result = run_probe(train, test, args.cfg, args.weights_mode, allow_download=args.allow_download,
                           weights_file=args.weights, progress=not args.no_progress)
    except (DataError, WeightsError) as err:
        sys.exit(f"error: {err}")
    fitted = result.fitted
    print(f"train images {len(train)}, classes {train.num_classes}, C chosen {fitted.C:g} "
          f"(validation accuracy per C: {', '.join(f'{c:g}: {s:.3f}' for c, s in fitted.val_scores.items())})")
    if fitted.val_accuracy is not None:
        print(f"validation accuracy: {fitted.val_accuracy:.4f}")
    if result.test_accuracy is not None:
        assert test is not None  # a test accuracy is only measured on a test set
        print(f"test accuracy:       {result.test_accuracy:.4f}  ({len(test)} images)")
    print(f"time: {sw.report()}, {result.stopwatch.report()}; peak RSS {peak_rss_mb():.0f} MiB")


def run_compare(args: argparse.Namespace, train, test, written: list) -> None:
    rows = compare(train, test, args.backbones, args.cfg, random_init=args.random_init, progress=not args.no_progress)
    print(markdown(rows), end="")
    if args.out is not None:
        write_table(args.out, rows)
        written.append(args.out)


if __name__ == "__main__":
    main()
