"""``tools.bench speed`` and ``tools.bench backbones`` (the module docstring of ``tools.bench`` says what each
measures): whole commands timed in fresh processes, one tree against another, and each backbone's costs."""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from birds_lpft.data.sets import DataError, LabelledImages, load_split_dir
from birds_lpft.extract import autocast
from birds_lpft.models.net import build_net
from birds_lpft.recipe import PRESETS, FinetuneConfig, recipe
from birds_lpft.utils.cli import check_output_dir, check_output_file, fail, publish, run_interruptible
from birds_lpft.utils.outputs import copy_file, markdown_table, write_text
from birds_lpft.utils.settings import ConfigError, require

PROG = "python -m tools.bench"
ROOT = Path(__file__).resolve().parents[1]  # this checkout
# What each tree runs to classify a folder with a model, timed around the call, in its own process.
CLASSIFY = ("import sys, time, solution; t = time.perf_counter(); n = len(solution.classify(sys.argv[1], sys.argv[2]))"
            "; print(f'CLASSIFIED {n} {time.perf_counter() - t:.3f}')")


# --------------------------------------------------------------------------- one process, timed


def timed(cmd: list[str], tree: Path) -> tuple[str, float, float]:
    """Run ``cmd`` in ``tree`` with that tree's code first on the path: (what it printed, its wall seconds, its
    peak MiB: ``wait4``'s ru_maxrss), or a RuntimeError where its exit status is not 0."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(tree)})
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{tree}: {' '.join(cmd[:4])} ... exited {code}:\n{text[-3000:]}")
    return text, time.perf_counter() - start, usage.ru_maxrss / 1024


TIME_LINE = re.compile(r"^time: (.*); peak RSS", re.MULTILINE)
CV_CACHE = re.compile(r"^trunk cache for .*: (\d+)s$", re.MULTILINE)
CV_FOLD = re.compile(r"^\s+.+? fold \d+/\d+: ([0-9.]+)", re.MULTILINE)
CV_ROW = re.compile(r"^\S.*?\s+[0-9.]+ \+- \S+\s+\[[0-9. ]*\]\s+(\d+)s", re.MULTILINE)


def stage_seconds(output: str) -> dict[str, float]:
    """The seconds of each stage in a ``python -m finetune`` run's ``time:`` line."""
    line = TIME_LINE.search(output)
    if line is None:
        raise RuntimeError(f"no time line in the run's output:\n{output[-3000:]}")
    return {k: float(v.rstrip("s")) for k, v in (p.rsplit(" ", 1) for p in line.group(1).split(", "))}


def cv_figures(output: str) -> dict:
    """A ``python -m finetune.cv`` run of one candidate: its cache and folds' seconds and its fold scores."""
    cache, row = CV_CACHE.search(output), CV_ROW.search(output)
    folds = [float(a) for a in CV_FOLD.findall(output)]
    if cache is None or row is None or not folds:
        raise RuntimeError(f"no CV result in the run's output:\n{output[-3000:]}")
    return {"trunk cache s": float(cache.group(1)), "folds s": float(row.group(1)), "folds": folds}


# --------------------------------------------------------------------------- speed: one tree against another


def subset_layout(data: Path, per_class: int | None, scratch: Path) -> Path:
    """A grader layout of the first ``per_class`` training images of each class (None: all) beside links to the
    real image folders and test split; nothing is copied but gt.csv and classes.txt."""
    images = load_split_dir(data, "train")
    counts: dict[int, int] = {}
    rows = ["filename,class_id"]
    for name, label in zip(images.names, images.labels.tolist(), strict=True):
        if per_class is None or counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            rows.append(f"{name},{label}")
    root = scratch / "data"
    (root / "train").mkdir(parents=True)
    (root / "train" / "images").symlink_to((data / "train" / "images").resolve())
    write_text(root / "train" / "gt.csv", "\n".join(rows) + "\n")
    if (data / "test").is_dir():
        (root / "test").symlink_to((data / "test").resolve())
    if (data / "classes.txt").is_file():
        copy_file(data / "classes.txt", root / "classes.txt")
    return root


def one_tree(tree: Path, data: Path, args: argparse.Namespace, model: Path) -> dict:
    """One round in one tree: its cross-validation, or its fine-tune and then ``classify`` of the model."""
    if args.cv is not None:
        cmd = [sys.executable, "-m", "finetune.cv", str(data), "--candidates", args.spec, "--folds", str(args.cv),
               *(["--random-init"] if args.random_init else [])]
        output, wall, peak = timed(cmd, tree)
        return {**cv_figures(output), "wall s": wall, "peak MiB": peak}
    main = ["bash", "scripts/run.sh"] if args.run_sh else [sys.executable, "-m", "finetune"]
    output, wall, peak = timed([*main, str(data), "--out", str(model), "--no-progress", *args.settings], tree)
    out = {f"{k} s": v for k, v in stage_seconds(output).items() if k in ("trunk cache", "probe", "fine-tune")}
    out.update({"wall s": wall, "peak MiB": peak})
    if (data / "test" / "images").is_dir():
        output, _, peak = timed([sys.executable, "-c", CLASSIFY, str(model), str(data / "test" / "images")], tree)
        images, seconds = output.split("CLASSIFIED ")[1].split()[:2]
        out.update({"classify s": float(seconds), "classify img/s": int(images) / float(seconds),
                    "classify peak MiB": peak})
    return out


def speed_table(runs: dict[str, list[dict]]) -> str:
    """Markdown: per tree the median of each figure over the rounds, and new as a share of old."""
    keys = [k for k in runs[next(iter(runs))][0] if k != "folds"]
    header = ["", *runs, *(["new / old"] if "old" in runs else [])]
    rows = []
    for key in keys:
        medians = {tag: statistics.median(r[key] for r in rs) for tag, rs in runs.items()}
        share = [f"{medians['new'] / medians['old']:.0%}" if medians.get("old") else "-"] if "old" in runs else []
        rows.append([key, *(f"{m:.1f}" for m in medians.values()), *share])
    if "folds" in runs[next(iter(runs))][0]:
        scores = [" / ".join(" ".join(f"{a:.4f}" for a in r["folds"]) for r in rs) for rs in runs.values()]
        rows.append(["fold scores", *scores, *([""] if "old" in runs else [])])
    return markdown_table(header, rows)


def speed_main(argv: list[str]) -> str:
    p = argparse.ArgumentParser(prog=f"{PROG} speed", description="this checkout against --old, side by side")
    p.add_argument("data_dir", type=Path, help="grader layout (train/, optionally test/ for classify)")
    p.add_argument("overrides", nargs="*", help="recipe field=value overrides, given to both trees")
    p.add_argument("--old", type=Path, help="a checkout of the code to compare against (e.g. `git worktree add`)")
    p.add_argument("--preset", default="full", choices=sorted(PRESETS))
    p.add_argument("--per-class", type=int, default=None, help="training images per class (default: all)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each tree, alternating (medians reported)")
    p.add_argument("--run-sh", action="store_true", help="each tree's scripts/run.sh instead of python -m finetune")
    p.add_argument("--cv", type=int, metavar="K", help="each tree's python -m finetune.cv of the one candidate")
    p.add_argument("--random-init", action="store_true", help="with --cv: no pretrained weights (a smoke run)")
    p.add_argument("--out", type=Path, help="also write the table here (.md)")
    p.add_argument("--keep", type=Path, help="keep each tree's model here as TREE-ROUND.pt (for tools/reproduce.py)")
    args = p.parse_intermixed_args(argv)
    check_output_file(p.prog, "--out", args.out, example="speed.md")
    check_output_dir(p.prog, "--keep", args.keep)
    try:
        recipe(args.preset, args.overrides)  # as each tree's command will read them: a typo fails now
        _check_speed_args(args)
    except (ConfigError, DataError) as err:
        fail(p.prog, str(err))
    args.settings = ["--preset", args.preset, *args.overrides]
    args.spec = f"{args.preset}:{','.join(args.overrides)}" if args.overrides else args.preset
    return run_interruptible(lambda written: _speed(args), p.prog)


def _check_speed_args(args: argparse.Namespace) -> None:
    require(args.per_class is None or args.per_class >= 1, "--per-class", "must be at least 1")
    require(args.rounds >= 1, "--rounds", "must be at least 1")
    require(args.cv is None or (args.cv >= 2 and not args.run_sh), "--cv",
            "takes K >= 2 folds, and no --run-sh (a CV writes no model)")
    require(not args.random_init or args.cv is not None, "--random-init",
            "goes with --cv (the fine-tune's speed is the pretrained network's)")
    require(args.old is None or (args.old / "finetune" / "__main__.py").is_file(), "--old",
            f"{args.old} is not a checkout of this project (no finetune/__main__.py)")
    load_split_dir(args.data_dir, "train")


def _speed(args: argparse.Namespace) -> str:
    trees = {"new": ROOT} if args.old is None else {"old": args.old.resolve(), "new": ROOT}
    with tempfile.TemporaryDirectory(prefix="bench-speed-", ignore_cleanup_errors=True) as tmp:
        scratch = Path(tmp)
        data = subset_layout(args.data_dir, args.per_class, scratch)
        runs: dict[str, list[dict]] = {tag: [] for tag in trees}
        keep = scratch if args.keep is None else args.keep.resolve()  # the trees run in their own folders
        keep.mkdir(parents=True, exist_ok=True)
        for r in range(args.rounds):
            for tag, tree in trees.items():
                model = keep / f"{tag}-{r + 1}.pt"
                runs[tag].append(one_tree(tree, data, args, model))
                print(f"round {r + 1} {tag}: " + ", ".join(f"{k} {v:.1f}" for k, v in runs[tag][-1].items()
                                                          if k != "folds"), flush=True)
    text = speed_table(runs)
    print()
    publish(text, args.out)
    return text


# --------------------------------------------------------------------------- backbones: costs before any weights


TORCHVISION = ("mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "resnet18", "resnet50", "convnext_tiny",
               "regnet_y_400mf", "efficientnet_v2_s")
MACHINES_GIB = (8, 16, 64)


def photos(n: int, seed: int = 0) -> LabelledImages:
    """``n`` 500x375 JPEG photos of noise, the size of the assignment's bird photos."""
    rng = np.random.default_rng(seed)
    sources = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        sources.append(buf.getvalue())
    return LabelledImages(tuple(f"{i:04d}.jpg" for i in range(n)), tuple(sources), np.zeros(n, dtype=np.int64), 2)


def tail_rate(net, cfg: FinetuneConfig, steps: int = 20) -> float:
    """Cached views per second of bare training steps of the tail + head as ``cfg`` trains them (batch size,
    cache dtype, training precision, the CPU kernel workaround), on random activations: no loader, no Lightning."""
    from finetune.kernels import fp32_depthwise_input_grads
    from finetune.train import trainer_precision

    bf16 = trainer_precision(cfg, "cpu") == "bf16-mixed"
    top = net.eval().top()  # BatchNorm pinned, as in training
    shape = net.forward_trunk(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).shape[1:]
    acts = torch.randn(cfg.batch_size, *shape).to(getattr(torch, cfg.cache_dtype))
    y = torch.randint(0, top.head.out_features, (cfg.batch_size,))
    opt = torch.optim.AdamW([p for p in top.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        with autocast("bf16" if bf16 else "fp32"):
            loss = F.cross_entropy(top(acts).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with fp32_depthwise_input_grads(top) if bf16 else nullcontext():
        for _ in range(3):  # warm-up: the allocator and oneDNN's kernels
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def backbone_costs(cfg: FinetuneConfig, images: LabelledImages) -> list:
    """One backbone's row: split, extraction views/s, tail views/s, cache MiB per 1,000 images, images that fit."""
    from finetune.cache import DEFAULT_BUDGET_SHARE, bytes_per_view, cache_views, extract_views

    torch.manual_seed(0)
    net = build_net(replace(cfg, members=1).net_config(50)).eval()  # the costs are one network's
    views = cache_views(cfg.data_config(), cfg)
    extract_views(net, images.subset(range(cfg.extract_batch_size)), views, cfg, progress=False)  # warm-up
    start = time.perf_counter()
    extract_views(net, images, views, cfg, progress=False)
    extraction = len(images) * len(views) / (time.perf_counter() - start)
    per_image = bytes_per_view(net, cfg) * len(views)
    fits = [f"{int(DEFAULT_BUDGET_SHARE * gib * 2**30 // per_image):,}" for gib in MACHINES_GIB]
    row = [cfg.backbone, cfg.trunk_split, f"{extraction:.1f}", f"{tail_rate(net, cfg):.1f}",
           f"{1000 * per_image / 2**20:.0f}", *fits]
    print(f"{cfg.backbone}: done", flush=True)
    return row


def backbones_main(argv: list[str]) -> str:
    p = argparse.ArgumentParser(prog=f"{PROG} backbones", description="each backbone's costs, random init")
    p.add_argument("args", nargs="*", help="backbone names (default: a spread of families), field=value overrides")
    p.add_argument("--images", type=int, default=48, help="generated photos timed per backbone")
    p.add_argument("--out", type=Path, help="also write the table here (.md)")
    a = p.parse_args(argv)
    check_output_file(p.prog, "--out", a.out, example="backbones.md")
    names = [t for t in a.args if "=" not in t] or list(TORCHVISION)
    overrides = [t for t in a.args if "=" in t]
    try:
        configs = [recipe("full", [*overrides, f"backbone={name}"]) for name in names]  # a bad name fails now
    except ConfigError as err:
        fail(p.prog, str(err))
    images = photos(a.images)
    header = ("backbone", "split", "extraction views/s", "tail views/s", "cache MiB / 1,000 images",
              *(f"images in {g} GiB" for g in MACHINES_GIB))
    rows = [backbone_costs(cfg, images) for cfg in configs]
    first = configs[0]
    text = (f"{first.image_size} px, 1 + {first.views} views per image, {first.cache_dtype} cache, trunk batch "
            f"{first.extract_batch_size}, tail batch {first.batch_size}; random initialisation\n\n"
            + markdown_table(header, rows))
    publish(text, a.out)
    return text
