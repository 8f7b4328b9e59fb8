"""``python -m finetune.cv DATA_DIR [--candidates SPEC ...]``: score recipes by stratified k-fold cross-validation.

Only the training images are read, in the same seeded folds for every candidate (``PRESET[:field=value,...]``, e.g.
``full:cotuning=2.3``). The trunk cache is extracted once per trunk setting and shared by every fold and candidate
with it; per fold only stage one and the tail are fitted, and the held-out fold is scored as ``classify`` would, with
flip TTA on and off, and its teacher or ensemble and first member apart. Several --seed values repeat the CV on the
one cache. Prints each candidate's folds, mean +- SE and seconds, paired with the first fold by fold; writes only
--out (.json or .md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import cast

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from birds_lpft.data.sets import DataError, LabelledImages, load_split_dir
from birds_lpft.models.net import BirdNet, build_net
from birds_lpft.models.weights import WeightsError, load_pretrained
from birds_lpft.recipe import FinetuneConfig, recipe
from birds_lpft.utils.cli import (
    add_weights_args,
    check_output_file,
    fail,
    layout_inputs,
    run_interruptible,
    weights_mode,
)
from birds_lpft.utils.outputs import write_text
from birds_lpft.utils.settings import ConfigError

from finetune.cv_cache import TrunkCache, build_cache, held_out_logits, tta_logits
from finetune.cv_report import compare_rows, format_row, markdown, mean_se
from finetune.datamodule import TrunkCacheData
from finetune.levers import LeverInputs
from finetune.module import TrainingDiverged
from finetune.process import process_state_kept
from finetune.stage_one import pooled_from_trunk
from finetune.train import lever_inputs, train_tops


def repeated_folds(labels: np.ndarray, k: int, seeds: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Repeated stratified k-fold CV: k seeded (train, held-out) index pairs per seed, seed by seed; each seed's
    held-out parts are disjoint and cover every image."""
    splits = [StratifiedKFold(n_splits=k, shuffle=True, random_state=seed) for seed in seeds]
    return [(np.sort(tr), np.sort(va)) for s in splits for tr, va in s.split(np.zeros(len(labels)), labels)]


def run_fold(cache: TrunkCache, images: LabelledImages, cfg: FinetuneConfig, train_idx: np.ndarray,
             val_idx: np.ndarray, progress: bool, pooled: torch.Tensor | None = None,
             inputs: LeverInputs | None = None) -> dict:
    """Stage one and the tail on the fold's training images (``train_tops``, the fine-tune's own path), then the
    held-out accuracy with the candidate's flip TTA ('acc'), with flip TTA toggled ('other'), and what the trained
    members score beside the shipped network at no training cost ('readouts': a student's teacher or an ensemble,
    and an ensemble's first member alone). ``pooled``: :func:`centre_features` for this candidate if computed for
    all folds already (None: the fold's own, the same)."""
    labels = images.labels
    data = TrunkCacheData.from_stacks(labels, cache.centre, cache.views[:cfg.views], train_idx, cfg, pooled=pooled)
    run = train_tops(candidate_net(cache.net, cfg), data, cfg, inputs=inputs, progress=progress,
                     accelerator="cpu", devices=1)

    def accuracy(logits: torch.Tensor, flip: bool = cfg.tta_flip, member: int | None = None) -> float:
        return float((tta_logits(logits, flip, member).argmax(1).numpy() == labels[val_idx]).mean())

    shipped = held_out_logits(run.net, cache, val_idx, cfg)
    members = shipped if run.members is run.net else held_out_logits(run.members, cache, val_idx, cfg)
    readouts = {}
    if run.members is not run.net:
        readouts["teacher" if cfg.distill > 0 else "ensemble of the members"] = accuracy(members)
    if len(run.members.tops()) > 1:
        readouts["member 1 alone"] = accuracy(members, member=0)
    return {"acc": accuracy(shipped), "other": accuracy(shipped, not cfg.tta_flip), "readouts": readouts}


def candidate_net(base: BirdNet, cfg: FinetuneConfig) -> BirdNet:
    """A network with the candidate's pooling, dropout and ensemble members, whose trunk is the one that made
    the cache and whose every tail starts as the cache network's (pretrained) tail."""
    net = build_net(cfg.members_config(base.head.out_features))
    net.trunk.load_state_dict(base.trunk.state_dict())
    for top in net.tops():
        top.tail.load_state_dict(base.tail.state_dict())
    return net.eval()


def centre_features(cache: TrunkCache, cfg: FinetuneConfig) -> torch.Tensor:
    """Stage one's (N, F) pooled features of every cached centre view, through the candidate's pooling and the
    pretrained tail that every fold starts from, so the folds read their rows from here. An image's features do not
    depend on the rest of its batch (fp32, eval mode; checked bit for bit in the suite), so the probes are the same."""
    return pooled_from_trunk(candidate_net(cache.net, cfg), cache.centre)


def score_candidate(spec: str, cfg: FinetuneConfig, cache: TrunkCache, images: LabelledImages, folds,
                    progress: bool, weights: str = "required", weights_kwargs: dict | None = None) -> dict:
    """Fold accuracies, their mean and standard error, the readouts', and the seconds the folds took."""
    start = time.perf_counter()
    folds_out = []
    with process_state_kept():
        pooled = centre_features(cache, cfg)
        inputs = lever_inputs(cfg, weights, **(weights_kwargs or {}))
        for k, (tr, va) in enumerate(folds):
            torch.manual_seed(cfg.seed)  # each fold starts from the same state, whatever ran before
            out = run_fold(cache, images, cfg, tr, va, progress, pooled, inputs)
            folds_out.append(out)
            more = "".join(f", {name}: {a:.4f}" for name, a in out["readouts"].items())
            print(f"  {spec} fold {k + 1}/{len(folds)}: {out['acc']:.4f} (flip TTA {'off' if cfg.tta_flip else 'on'}: "
                  f"{out['other']:.4f}{more})", flush=True)
    row = {"candidate": spec, **mean_se([o["acc"] for o in folds_out]),
           "mean_other_tta": float(np.mean([o["other"] for o in folds_out])),
           "seconds": time.perf_counter() - start, "cache_seconds": cache.seconds, "config": cfg.to_dict()}
    if folds_out[0]["readouts"]:
        row["readouts"] = {name: mean_se([o["readouts"][name] for o in folds_out]) for name in folds_out[0]["readouts"]}
    return row


def trunk_key(cfg: FinetuneConfig) -> tuple:
    """What the cached activations depend on; candidates equal on it share one cache (views aside)."""
    return (cfg.backbone, cfg.image_size, cfg.trunk_split, cfg.crop_scale, cfg.jitter, cfg.precision,
            cfg.cache_dtype, cfg.extract_batch_size, cfg.seed)


def cross_validate(images: LabelledImages, candidates: list[tuple[str, FinetuneConfig]], folds, *,
                   weights: str = "required", weights_kwargs: dict | None = None, progress: bool = False
                   ) -> list[dict]:
    """Score every candidate on the same folds, building each trunk cache once. Returns rows in input order."""
    groups: dict[tuple, list[int]] = {}
    for i, (_, cfg) in enumerate(candidates):
        groups.setdefault(trunk_key(cfg), []).append(i)
    rows: list[dict | None] = [None] * len(candidates)
    for members in groups.values():
        first = candidates[members[0]][1]
        cache = build_cache(images, first, max(candidates[i][1].views for i in members), weights, progress,
                            weights_kwargs or {})
        print(f"trunk cache for {[candidates[i][0] for i in members]}: {cache.seconds:.0f}s", flush=True)
        for i in members:
            row = score_candidate(*candidates[i], cache, images, folds, progress, weights, weights_kwargs or {})
            rows[i] = row
            print(format_row(row), flush=True)
        del cache
    return cast("list[dict]", rows)  # every candidate is in one group, so every row is filled


PROG = "python -m finetune.cv"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[tuple[str, FinetuneConfig]]]:
    """The arguments and the parsed candidates, every one and the ``--out`` destination checked (exit 2)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path, help="grader layout; only train/ is read")
    p.add_argument("--candidates", nargs="+", default=["v1", "full"], help="PRESET[:field=value,...] each")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, nargs="+", default=[0],
                   help="fold assignment seed; several give repeated CV (k folds per seed, one shared cache)")
    p.add_argument("--out", type=Path, help="also write the table: .json or .md")
    add_weights_args(p)
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args(argv)
    try:
        candidates = [(spec, recipe(spec)) for spec in args.candidates]
    except ConfigError as err:
        fail(PROG, f"--candidates: {err}")
    args.weights_mode = weights_mode(PROG, args)
    backbones = sorted({cfg.backbone for _, cfg in candidates})
    if args.weights is not None and len(backbones) > 1:
        fail(PROG, f"--weights is one backbone's file, and the candidates use {', '.join(backbones)}; give the "
                   "others' files to the cache, or run them apart")
    if len(set(args.seed)) < len(args.seed):
        fail(PROG, f"--seed {' '.join(map(str, args.seed))}: a seed given twice would score the same folds twice")
    if args.folds < 2:
        fail(PROG, f"--folds must be at least 2, got {args.folds}")
    if args.out is not None and args.out.suffix not in (".json", ".md"):
        fail(PROG, f"--out {args.out}: the table is written as .json or .md; name the file so")
    check_output_file(PROG, "--out", args.out, layout_inputs(args.data_dir), example="cv.json")
    return args, candidates


def main(argv: list[str] | None = None) -> list[dict]:
    args, candidates = parse_args(argv)
    return run_interruptible(lambda written: run(args, candidates, written), PROG)


def run(args: argparse.Namespace, candidates: list[tuple[str, FinetuneConfig]], written: list) -> list[dict]:
    try:
        images = load_split_dir(args.data_dir, "train")
        if args.folds > np.bincount(images.labels).min():
            fail(PROG, f"--folds {args.folds}: the smallest class has {np.bincount(images.labels).min()} images; "
                       "use at most that many folds")
        folds = repeated_folds(images.labels, args.folds, args.seed)
        weights = {"allow_download": args.allow_download, "weights_file": args.weights}
        if args.weights_mode == "required":  # every candidate's weights now: a missing file costs no fold
            for spec in {cfg.backbone: cfg.spec for _, cfg in candidates}.values():
                load_pretrained(spec, **weights)
        rows = cross_validate(images, candidates, folds, weights=args.weights_mode, weights_kwargs=weights,
                              progress=args.progress)
    except (DataError, WeightsError, TrainingDiverged) as err:
        sys.exit(f"error: {err}")
    compare_rows(rows, args.seed)
    print("\n" + "\n".join(format_row(r) for r in rows))
    if args.out:
        text = json.dumps(rows, indent=2) if args.out.suffix == ".json" else markdown(rows, args.folds, args.seed)
        write_text(args.out, text)
        written.append(args.out)
    return rows


if __name__ == "__main__":
    main()
