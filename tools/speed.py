"""``python -m tools.speed DATA_DIR [--old TREE] [--per-class N] [--rounds R] [field=value ...]``: each stage's
rate in the pipeline next to the bare rate of the work it does, old code against new, in one run.

The machine is noisy, so everything is measured in the same command:

1. **bare rates**, in this process, on the first training images, before the pipelines and again after them
   (the machine drifts; the shares are against the mean of the two): decoding alone, each preset alone
   (centre view, augmented view), the trunk alone on a random batch (the extraction's batch size, layout and
   precision), and a bare tail step (forward, loss, backward, AdamW on random cached activations, BatchNorm
   pinned; ``tools.tail_speed``). From them, the **serial bound** of extraction: the rate of decoding each
   image once, applying its 1 + ``views`` presets and running the trunk on every view, one after the other,
   with nothing overlapped (and the bound of the old plan, which decoded each image once per view). And the
   **compute ceiling** (``tools.flops``): the trunk's and the tail step's multiply-accumulates at their bare
   rates, as a share of this machine's dense matmul rate in the same precision;
2. **the pipeline**: ``python -m finetune`` on a class-balanced subset of DATA_DIR's training images
   (``--per-class``) in this tree and, with ``--old TREE``, in that checkout (the code before a change), one
   after the other, ``--rounds`` times, each in a fresh process. Its ``time:`` line gives the seconds of
   extraction, stage one and the tail's training; the process's wall time and peak RSS come from ``wait4``.

With ``--cv K`` the pipeline is ``python -m finetune.cv`` of one candidate (the preset with the overrides) with
K folds, in each tree, in the same way, and no bare rates are measured: each tree's trunk-cache and fold
seconds, wall time, peak RSS and fold scores, side by side (the issue's "CV of one candidate" criterion).

Prints one table: bare rate, and per tree the pipeline's rate and its share of the bare rate. The subset
(a gt.csv beside a link to the image folder) and the checkpoints live in a temporary folder, removed at the
end; nothing else is written.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from birds_lpft.data.images import open_rgb
from birds_lpft.data.sets import DataError, LabelledImages, load_split_dir
from birds_lpft.extract import autocast, resolve_precision
from birds_lpft.memory import reusing_freed_memory
from birds_lpft.models.preprocess import EvalTransform, TrainTransform
from birds_lpft.tools.flops import forward_macs, matmul_gflops, training_macs
from birds_lpft.tools.tail_speed import tail_step
from birds_lpft.utils.cli import check_output_dir, fail, run_interruptible
from birds_lpft.utils.outputs import copy_file, write_text
from birds_lpft.utils.settings import ConfigError

from finetune.cli import settings
from finetune.config import PRESETS, FinetuneConfig
from finetune.train import trainer_precision

STAGES = ("extraction", "stage one", "tail training", "whole run")


def _rate(fn, items: int, repeats: int = 1) -> float:
    """``items`` per second of ``fn()``, the best of ``repeats`` timed calls after one warm-up call."""
    fn()
    best = min(_seconds(fn) for _ in range(repeats))
    return items / max(best, 1e-9)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Bare:
    """Bare rates (per second) of the pipeline's pieces, measured alone."""

    decode: float
    centre: float
    augment: float
    trunk: float
    tail: float
    views: int

    def serial_bound(self, decodes_per_view: bool = False) -> float:
        """Views per second of decode + presets + trunk in series, nothing overlapped: each image decoded
        once for its 1 + ``views`` views (or, ``decodes_per_view``, once per view, as the old plan did)."""
        decodes = (1 + self.views) if decodes_per_view else 1
        per_image = decodes / self.decode + 1 / self.centre + self.views / self.augment + (1 + self.views) / self.trunk
        return (1 + self.views) / per_image


def bare_rates(images: LabelledImages, cfg: FinetuneConfig, samples: int = 64) -> Bare:
    """Each piece alone, on ``samples`` of the training images (the trunk and tail on random tensors: their
    cost is the shape's)."""
    from birds_lpft.models.net import build_net

    data_cfg = cfg.data_config()
    centre, train = EvalTransform(data_cfg), TrainTransform(data_cfg, scale=cfg.crop_scale, jitter=cfg.jitter)
    subset = images.subset(range(min(samples, len(images))))
    side = max(centre.min_side, train.min_side)
    decoded = [open_rgb(s, n, min_side=side) for s, n in zip(subset.sources, subset.names)]
    n = len(decoded)
    decode = _rate(lambda: [open_rgb(s, m, min_side=side) for s, m in zip(subset.sources, subset.names)], n)
    centre_rate = _rate(lambda: [centre(img) for img in decoded], n)
    augment_rate = _rate(lambda: [train(img) for img in decoded], n)
    torch.manual_seed(0)
    net = build_net(replace(cfg, members=1).net_config(images.num_classes)).eval()
    x = torch.randn(cfg.extract_batch_size, 3, cfg.image_size, cfg.image_size).contiguous(
        memory_format=torch.channels_last)

    @torch.inference_mode()
    def trunk_batch():
        with autocast(cfg.precision):
            net.forward_trunk(x)

    with reusing_freed_memory():  # the network at its best: no page faults of fresh activations
        trunk = _rate(lambda: [trunk_batch() for _ in range(4)], 4 * len(x), repeats=2)
        tail = tail_step(net, cfg, images.num_classes, steps=20)
    return Bare(decode, centre_rate, augment_rate, trunk, tail, cfg.views)


def mean_bare(*measured: Bare) -> Bare:
    """Each bare rate's mean over several measurements (before and after the pipelines)."""
    rates = {f.name: statistics.fmean(getattr(b, f.name) for b in measured) for f in fields(Bare) if f.name != "views"}
    return Bare(**rates, views=measured[0].views)


def _bare_line(when: str, bare: Bare) -> Bare:
    print(f"bare rates {when}: decode {bare.decode:.0f} img/s, centre preset {bare.centre:.0f}, augmented preset "
          f"{bare.augment:.0f}, trunk {bare.trunk:.1f} img/s, tail step {bare.tail:.1f} views/s; serial bound "
          f"{bare.serial_bound():.1f} views/s (decoding once per view: {bare.serial_bound(decodes_per_view=True):.1f})",
          flush=True)
    return bare


def compute_ceiling(cfg: FinetuneConfig, num_classes: int, bare: Bare) -> str:
    """The trunk's and the tail step's arithmetic rate at their bare rates, each as a share of this machine's
    dense matmul rate in its own precision: how far the network itself is from the hardware."""
    from birds_lpft.models.net import build_net

    net = build_net(replace(cfg, members=1).net_config(num_classes)).eval()
    x = torch.zeros(1, 3, cfg.image_size, cfg.image_size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        acts = net.forward_trunk(x)
    parts = {"trunk": (sum(forward_macs(net.trunk, x)), bare.trunk, resolve_precision(cfg.precision), "img"),
             "tail step": (training_macs(net.top(), acts), bare.tail,
                           "bf16" if trainer_precision(cfg, "cpu") == "bf16-mixed" else "fp32", "view")}
    matmul = {precision: matmul_gflops(precision) for _, _, precision, _ in parts.values()}
    cells = []
    for name, (macs, rate, precision, unit) in parts.items():
        gflops = 2 * macs * rate / 1e9
        cells.append(f"{name} {macs / 1e6:.0f} MMAC/{unit} x {rate:.1f} = {gflops:.1f} GFLOP/s "
                     f"({gflops / matmul[precision]:.0%} of {precision} matmul)")
    rates = ", ".join(f"{p} {g:.1f}" for p, g in matmul.items())
    return f"compute: {'; '.join(cells)}; dense matmul GFLOP/s: {rates}"


@dataclass(frozen=True)
class Run:
    """One ``python -m finetune`` process: its stage seconds and what it did."""

    extraction: float
    stage_one: float
    tail: float
    wall: float
    tail_views: int
    peak_rss_mib: float


TIME_LINE = re.compile(r"^time: (.*); peak RSS", re.MULTILINE)
TAIL_LINE = re.compile(r"^fine-tune: (\d+) cached views", re.MULTILINE)


def parse_run(out: str, wall: float, peak_kib: int) -> Run:
    """The stage seconds of a run's ``time:`` line: extraction is 'trunk cache' (one pass) or 'centre view'
    + 'augmented views' (a pass per view, the code before)."""
    line = TIME_LINE.search(out)
    views = TAIL_LINE.search(out)
    if line is None or views is None:
        raise RuntimeError(f"no time line in the run's output:\n{out[-3000:]}")
    seconds = {k: float(v.rstrip("s")) for k, v in (p.rsplit(" ", 1) for p in line.group(1).split(", "))}
    extraction = seconds.get("trunk cache", seconds.get("centre view", 0.0) + seconds.get("augmented views", 0.0))
    return Run(extraction, seconds["probe"], seconds["fine-tune"], wall, int(views.group(1)), peak_kib / 1024)


def _timed(tree: Path, cmd: list[str], what: str) -> tuple[str, float, int]:
    """Run ``cmd`` in ``tree`` with that tree's code first on the path: (its output, wall seconds, peak RSS KiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(tree)})
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{tree}: {what} exited {code}:\n{text[-3000:]}")
    return text, wall, usage.ru_maxrss


def run_pipeline(tree: Path, data: Path, settings: list[str], scratch: Path, tag: str, run_sh: bool = False) -> Run:
    """``python -m finetune`` in ``tree`` (its own code, this interpreter), or the tree's own
    ``scripts/run.sh`` (its set-up check, then its virtualenv's ``python -m finetune``), timed as a whole."""
    main = ["bash", "scripts/run.sh"] if run_sh else [sys.executable, "-m", "finetune"]
    cmd = [*main, str(data), "--out", str(scratch / f"{tag}.pt"), "--no-progress", *settings]
    return parse_run(*_timed(tree, cmd, "python -m finetune"))


@dataclass(frozen=True)
class CvRun:
    """One ``python -m finetune.cv`` process of one candidate: its seconds and fold scores."""

    cache: float
    folds_seconds: float
    wall: float
    peak_rss_mib: float
    folds: tuple[float, ...]


CV_CACHE = re.compile(r"^trunk cache for .*: (\d+)s$", re.MULTILINE)
CV_FOLD = re.compile(r"^\s+.+? fold \d+/\d+: ([0-9.]+)", re.MULTILINE)
CV_ROW = re.compile(r"^\S.*?\s+[0-9.]+ \+- \S+\s+\[[0-9. ]*\]\s+(\d+)s", re.MULTILINE)


def parse_cv(out: str, wall: float, peak_kib: int) -> CvRun:
    """The cache seconds, the candidate's fold seconds (its row) and its fold scores in a CV run's output."""
    cache, row = CV_CACHE.search(out), CV_ROW.search(out)
    folds = tuple(float(a) for a in CV_FOLD.findall(out))
    if cache is None or row is None or not folds:
        raise RuntimeError(f"no CV result in the run's output:\n{out[-3000:]}")
    return CvRun(float(cache.group(1)), float(row.group(1)), wall, peak_kib / 1024, folds)


def run_cv(tree: Path, data: Path, spec: str, folds: int, random_init: bool = False) -> CvRun:
    """``python -m finetune.cv`` of the one candidate ``spec`` in ``tree``, timed as a whole."""
    cmd = [sys.executable, "-m", "finetune.cv", str(data), "--candidates", spec, "--folds", str(folds),
           *(["--random-init"] if random_init else [])]
    return parse_cv(*_timed(tree, cmd, "python -m finetune.cv"))


def cv_spec(preset: str, overrides: list[str]) -> str:
    """The CV candidate of a preset and its overrides (``finetune.cli.candidate``'s syntax)."""
    return f"{preset}:{','.join(overrides)}" if overrides else preset


def cv_table(runs: dict[str, list[CvRun]]) -> str:
    """Markdown: per tree the median seconds over rounds (and, with an old tree, new as a share of old), the
    peak RSS, and each round's fold scores."""
    tags = list(runs)
    head = "| |" + "".join(f" {t} |" for t in tags) + (" new / old |" if "old" in runs else "")
    rows = [head, "|---|" + "---:|" * (len(tags) + ("old" in runs))]
    for name, key in (("trunk cache (s)", "cache"), ("folds (s)", "folds_seconds"), ("wall (s)", "wall")):
        medians = {t: statistics.median(getattr(r, key) for r in rs) for t, rs in runs.items()}
        share = "" if "old" not in runs else f" {medians['new'] / medians['old']:.0%} |" if medians["old"] else " - |"
        rows.append(f"| {name} |" + "".join(f" {m:.1f} |" for m in medians.values()) + share)
    rows.append("| peak RSS (MiB) |" + "".join(f" {max(r.peak_rss_mib for r in rs):.0f} |" for rs in runs.values())
                + (" |" if "old" in runs else ""))
    scores = [" / ".join(" ".join(f"{a:.4f}" for a in r.folds) for r in rs) for rs in runs.values()]
    rows.append("| fold scores |" + "".join(f" {s} |" for s in scores) + (" |" if "old" in runs else ""))
    if "old" in runs:
        same = all(r.folds == o.folds for r, o in zip(runs["new"], runs["old"]))
        rows.append(f"\nfold scores {'identical' if same else 'DIFFERENT'} between the trees")
    return "\n".join(rows)


def subset_layout(data: Path, images: LabelledImages, per_class: int | None, scratch: Path) -> tuple[Path, int]:
    """A grader layout of the first ``per_class`` training images of each class (None: all), its gt.csv
    beside a link to the real image folder; (its root, its image count)."""
    counts: dict[int, int] = {}
    keep = []
    for name, label in zip(images.names, images.labels.tolist()):
        if per_class is None or counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            keep.append((name, label))
    root = scratch / "data"
    (root / "train").mkdir(parents=True)
    (root / "train" / "images").symlink_to((data / "train" / "images").resolve())
    lines = ["filename,class_id"] + [f"{n},{c}" for n, c in keep]
    write_text(root / "train" / "gt.csv", "\n".join(lines) + "\n")
    if (data / "classes.txt").is_file():
        copy_file(data / "classes.txt", root / "classes.txt")
    return root, len(keep)


def pipeline_rates(run: Run, images: int, views: int) -> dict[str, float]:
    return {"extraction": images * (1 + views) / max(run.extraction, 1e-9), "stage one": run.stage_one,
            "tail training": run.tail_views / max(run.tail, 1e-9), "whole run": run.wall}


def table(bare: Bare, runs: dict[str, list[Run]], images: int, views: int) -> str:
    """Markdown: per stage its bare rate and, per tree, the pipeline's median over rounds and its share."""
    bound = {"extraction": bare.serial_bound(), "tail training": bare.tail}
    units = {"extraction": "views/s", "stage one": "s", "tail training": "views/s", "whole run": "s"}
    head = "| stage | bare (serial bound) |" + "".join(f" {t} | share |" for t in runs)
    rows = [head, "|---|---:|" + "---:|---:|" * len(runs)]
    for stage in STAGES:
        cells = [f"| {stage} ({units[stage]}) | {f'{bound[stage]:.1f}' if stage in bound else '-'} |"]
        for tree_runs in runs.values():
            value = statistics.median(pipeline_rates(r, images, views)[stage] for r in tree_runs)
            share = f"{value / bound[stage]:.0%}" if stage in bound else "-"
            cells.append(f" {value:.1f} | {share} |")
        rows.append("".join(cells))
    peaks = " / ".join(f"{t} {max(r.peak_rss_mib for r in rs):.0f} MiB" for t, rs in runs.items())
    return "\n".join(rows) + f"\n\npeak RSS: {peaks}"


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m tools.speed", description=__doc__.split("\n")[0])
    p.add_argument("data_dir", type=Path, help="grader layout (train/gt.csv, train/images/)")
    p.add_argument("overrides", nargs="*", help="FinetuneConfig field=value overrides, given to both trees")
    p.add_argument("--old", type=Path, help="a checkout of the code to compare against (e.g. `git worktree add`)")
    p.add_argument("--per-class", type=int, default=None, help="training images per class (default: all)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each tree, alternating (medians reported)")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    p.add_argument("--keep", type=Path, help="copy each run's checkpoint into this folder (TAG+ROUND.pt) to compare "
                   "their predictions")
    p.add_argument("--run-sh", action="store_true", help="run each tree's scripts/run.sh (the README's main "
                   "command) instead of this interpreter's python -m finetune")
    p.add_argument("--cv", type=int, metavar="K", help="time each tree's python -m finetune.cv of the one candidate "
                   "(the preset with the overrides) with K folds instead of the fine-tune; no bare rates")
    p.add_argument("--random-init", action="store_true", help="with --cv: no pretrained weights (a smoke run)")
    return p, p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> str:
    p, args = parse_args(argv)
    try:
        cfg = settings(args.preset, args.overrides)  # as each tree's `python -m finetune` reads them
        if args.per_class is not None and args.per_class < 1:
            raise ConfigError("--per-class", "must be at least 1")
        if args.rounds < 1:
            raise ConfigError("--rounds", "must be at least 1")
        if args.cv is not None and (args.cv < 2 or args.keep is not None or args.run_sh):
            raise ConfigError("--cv", "takes K >= 2 folds, and neither --keep nor --run-sh (a CV writes no model)")
        if args.random_init and args.cv is None:
            raise ConfigError("--random-init", "goes with --cv (the fine-tune's speed is the pretrained network's)")
        check_output_dir(p.prog, "--keep", args.keep)  # None: nothing kept, nothing to check
        if args.old is not None and not (args.old / "finetune" / "__main__.py").is_file():
            raise ConfigError("--old", f"{args.old} is not a checkout of this project (no finetune/__main__.py)")
        images = load_split_dir(args.data_dir, "train")
    except (ConfigError, DataError) as err:
        fail(p.prog, str(err))
    measure = _measure_cv if args.cv is not None else _measure
    return run_interruptible(lambda written: measure(args, cfg, images), p.prog)


def _trees(args) -> dict[str, Path]:
    new = {"new": Path(__file__).resolve().parents[1]}
    return new if args.old is None else {"old": args.old.resolve(), **new}


def _measure_cv(args, cfg: FinetuneConfig, images: LabelledImages) -> str:
    spec = cv_spec(args.preset, args.overrides)
    scratch = Path(tempfile.mkdtemp(prefix="speed-"))
    try:
        data, n = subset_layout(args.data_dir, images, args.per_class, scratch)
        trees = _trees(args)
        runs: dict[str, list[CvRun]] = {t: [] for t in trees}
        for r in range(args.rounds):
            for tag, tree in trees.items():
                run = run_cv(tree, data, spec, args.cv, args.random_init)
                runs[tag].append(run)
                print(f"round {r + 1} {tag}: trunk cache {run.cache:.0f}s, folds {run.folds_seconds:.0f}s, wall "
                      f"{run.wall:.1f}s, peak RSS {run.peak_rss_mib:.0f} MiB, folds "
                      f"{' '.join(f'{a:.4f}' for a in run.folds)}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = cv_table(runs)
    print(f"\npython -m finetune.cv --candidates {spec} --folds {args.cv}: {n} training images, {1 + cfg.views} "
          f"views each\n\n{text}")
    return text


def _measure(args, cfg: FinetuneConfig, images: LabelledImages) -> str:
    print(f"bare rates: {cfg.image_size} px, {resolve_precision(cfg.precision)} trunk, batch "
          f"{cfg.extract_batch_size}; tail from block {cfg.trunk_split}, batch {cfg.batch_size}", flush=True)
    before = _bare_line("before", bare_rates(images, cfg))
    print(compute_ceiling(cfg, images.num_classes, before), flush=True)
    trees = _trees(args)
    settings = ["--preset", args.preset, *args.overrides]
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)  # checked before any work (check_output_dir)
    scratch = Path(tempfile.mkdtemp(prefix="speed-"))
    try:
        data, n = subset_layout(args.data_dir, images, args.per_class, scratch)
        runs: dict[str, list[Run]] = {t: [] for t in trees}
        for r in range(args.rounds):
            for tag, tree in trees.items():
                run = run_pipeline(tree, data, settings, scratch, f"{tag}{r}", args.run_sh)
                runs[tag].append(run)
                if args.keep is not None:
                    copy_file(scratch / f"{tag}{r}.pt", args.keep / f"{tag}{r}.pt")
                print(f"round {r + 1} {tag}: extraction {run.extraction:.1f}s, stage one {run.stage_one:.1f}s, "
                      f"tail {run.tail:.1f}s, wall {run.wall:.1f}s, peak RSS {run.peak_rss_mib:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # The machine drifts: the bare rates again after the runs, and the shares against the mean of both.
    bare = mean_bare(before, _bare_line("after", bare_rates(images, cfg)))
    text = table(bare, runs, n, cfg.views)
    print(f"\n{n} training images, {1 + cfg.views} views each\n\n{text}")
    return text


if __name__ == "__main__":
    main()
