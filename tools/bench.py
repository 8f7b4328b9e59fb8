"""``python -m tools.bench [run|speed|backbones] ...``: every measurement of the project, one command.

- ``run DATA_DIR --out REPORT_DIR`` (the default subcommand): side by side, each step in a fresh process,
  stage one alone, the pipeline with ``--preset`` (and each ``--compare`` preset) on a seeded 80/20 split,
  and ``classify`` of the pipeline's checkpoint; writes ``report.md``, ``results.json`` and the checkpoint
  into REPORT_DIR and nothing anywhere else.
- ``speed DATA_DIR [--old TREE]``: this checkout against another (the code before a change): each tree's
  ``python -m finetune`` (or its ``scripts/run.sh``) and then ``classify`` of the model it wrote, or with
  ``--cv K`` its cross-validation of one candidate; stage seconds, wall time and peak memory side by side.
- ``backbones [NAME ...]``: what each backbone costs on this machine before its weights are fetched: the
  cache's extraction rate, the tail's training rate, the cache's size and how many images fit in memory
  (random initialisation: the speed is the shape's, the accuracy means nothing).

The machine is noisy: figures meant to be compared come from the same command, one after the other.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from birds_lpft.data.sets import DataError, read_class_names, stratified_split
from birds_lpft.data.synthetic import load_data
from birds_lpft.models.weights import WeightsError
from birds_lpft.recipe import PRESETS, FinetuneConfig, ProbeFit, add_recipe_args, alias_overrides, recipe
from birds_lpft.tools import bench_report, bench_speed
from birds_lpft.utils.cli import check_output_dir, fail, run_interruptible
from birds_lpft.utils.settings import ConfigError, plain
from birds_lpft.utils.timing import peak_rss_mb

CHECKPOINT = "birds_model.pt"
VAL_FRACTION = ProbeFit().val_fraction  # each class's share the pipelines hold out: the probe's, to choose C
PROG = "python -m tools.bench"
COMMANDS = {"speed": bench_speed.speed_main, "backbones": bench_speed.backbones_main}  # and "run", the default


# --------------------------------------------------------------------------- run: the steps, each in its own process


def in_child(step: str, *args) -> dict:
    """``step(*args)`` (a function of this module) in a fresh 'spawn' process; its dict gains the process's
    peak memory and the parent's wall clock for it (start and imports included). The parent never imports
    Lightning: the steps import what they train with themselves."""
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        result = pool.submit(_measured, step, *args).result()
    return {**result, "wall_seconds": time.perf_counter() - start}


def _measured(step: str, *args) -> dict:
    return {**globals()[step](*args), "peak_rss_mib": peak_rss_mb()}


def probe_step(data_dir: Path, weights: str) -> dict:
    """Stage one alone, with ``ProbeConfig``'s defaults."""
    from probe.pipeline import ProbeConfig, run_probe

    train, test = load_data(data_dir)
    result = run_probe(train, test, ProbeConfig(), weights, progress=False)
    seconds = sum(v for k, v in result.stopwatch.seconds.items() if k != "test features")
    return {"val_accuracy": result.fitted.val_accuracy, "test_accuracy": result.test_accuracy, "C": result.fitted.C,
            "seconds": seconds, "images_per_s": len(train) / seconds}


def pipeline_step(data_dir: Path, cfg: FinetuneConfig, weights: str, checkpoint: Path | None) -> dict:
    """Both stages on a seeded ``VAL_FRACTION`` of each class less, scored on it as ``classify`` scores; the test
    split's predictions with their probabilities; the checkpoint where asked."""
    from finetune.train import fine_tune

    images, test = load_data(data_dir)
    fit_idx, val_idx = stratified_split(images.labels, VAL_FRACTION, cfg.seed)
    result = fine_tune(images.subset(fit_idx), cfg, weights, progress=False, accelerator="cpu", devices=1)
    stages = dict(result.stopwatch.seconds)
    held_out = images.subset(val_idx)
    val_accuracy = result.classifier.evaluate(held_out, precision=cfg.precision)["accuracy"] if len(val_idx) else None
    out = {"val_accuracy": val_accuracy, "val_images": len(val_idx), "probe_C": result.fitted.C, "stages": stages,
           "seconds": sum(stages.values()), "history": result.history, "cache_mib": result.cache_bytes / 2**20,
           "train_images_per_s": result.trained_samples / stages["fine-tune"], "test_accuracy": None}
    if test is not None:
        evaluation = result.classifier.evaluate(test, precision=cfg.precision)
        out.update(bench_report.test_outputs(evaluation, test))
    if checkpoint is not None:
        result.classifier.save(checkpoint)
    return out


def classify_step(model: Path, split_dir: Path) -> dict:
    """``solution.classify`` on a test folder, timed around the call (model load included)."""
    from birds_lpft.data.sets import read_gt

    import solution

    start = time.perf_counter()
    predicted = solution.classify(str(model), str(split_dir / "images"))
    seconds = time.perf_counter() - start
    truth = read_gt(split_dir / "gt.csv")
    accuracy = sum(predicted.get(name) == label for name, label in truth.items()) / len(truth)
    return {"images": len(predicted), "seconds": seconds, "images_per_s": len(predicted) / seconds,
            "accuracy": accuracy}


def run_bench(args: argparse.Namespace, configs: dict[str, FinetuneConfig]) -> dict:
    """Every step of ``run``, one after the other; the results as ``results.json`` holds them."""
    train, test = load_data(args.data_dir)
    weights = "none" if args.random_init else "required"
    results = {"probe": in_child("probe_step", args.data_dir, weights), "pipelines": {}, "classify": None}
    for name, cfg in configs.items():
        first = not results["pipelines"]
        results["pipelines"][name] = in_child("pipeline_step", args.data_dir, cfg, weights,
                                              args.out / CHECKPOINT if first else None)
    if test is not None:
        results["classify"] = in_child("classify_step", args.out / CHECKPOINT, args.data_dir / "test")
    names = read_class_names(args.data_dir / "classes.txt", train.num_classes)
    results["classes"] = list(names or map(str, range(train.num_classes)))
    results["config"] = {name: plain(asdict(cfg)) for name, cfg in configs.items()}
    results["environment"] = bench_report.environment()
    return results


def run(args: argparse.Namespace, configs: dict[str, FinetuneConfig], written: list) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    with bench_report.scratch_in(args.out):
        try:
            results = run_bench(args, configs)
        except (DataError, WeightsError) as err:
            sys.exit(f"error: {err}")
    written.append(args.out / CHECKPOINT)
    bench_report.write(args.out, str(args.data_dir), results)
    written.append(args.out / "report.md")
    return results


# --------------------------------------------------------------------------- command line


def parse_run(argv: list[str]) -> tuple[argparse.Namespace, dict[str, FinetuneConfig]]:
    p = argparse.ArgumentParser(prog=f"{PROG} [run]", description="the side-by-side benchmark (module docstring)")
    p.add_argument("data_dir", type=Path, help="grader-layout folder (train/, optionally test/ and classes.txt)")
    p.add_argument("overrides", nargs="*", metavar="field=value", help="recipe overrides of every pipeline")
    p.add_argument("--out", type=Path, required=True, help="report folder: the only place anything is written")
    add_recipe_args(p)
    p.add_argument("--compare", nargs="*", default=["v1"], choices=sorted(PRESETS),
                   help="presets measured beside --preset (default: v1); give none to skip")
    p.add_argument("--random-init", action="store_true", help="no pretrained weights (a smoke run)")
    p.add_argument("--no-progress", action="store_true", help="accepted for the other commands' sake: no bars here")
    args = p.parse_intermixed_args(argv)
    overrides = [*args.overrides, *alias_overrides(args)]
    try:
        names = [args.preset, *(c for c in args.compare if c != args.preset)]
        configs = {name: recipe(name, overrides) for name in names}
    except ConfigError as err:
        fail(PROG, str(err))
    check_output_dir(PROG, "--out", args.out)
    return args, configs


def main(argv: list[str] | None = None):
    """Run a subcommand (``run`` where the first argument is none of them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("run", *COMMANDS) else "run"
    if command in COMMANDS:
        return COMMANDS[command](argv)
    args, configs = parse_run(argv)
    return run_interruptible(lambda written: run(args, configs, written), PROG)


if __name__ == "__main__":
    main()
