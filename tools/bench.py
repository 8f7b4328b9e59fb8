"""``python -m tools.bench DATA_DIR --out REPORT_DIR [--baseline] [--compare v1]``: one side-by-side benchmark.

The machine is noisy, so every figure comes from the same command:

1. **compute limit**: backbone forward throughput on pre-decoded random tensors at the pipeline's image
   size (full network and trunk only), with ``birds_lpft.extract.extract``'s settings: the ceiling of every
   step that decodes images and runs the network on them (probe features, the trunk cache, classify);
2. **linear probe**: stage one alone (``probe.pipeline.run_probe``, ``ProbeConfig`` defaults);
3. **baseline** (``--baseline``, slow): the online fine-tune a user would otherwise write (``tools.baseline``);
4. **pipeline**: ``finetune.train.fine_tune`` with a preset (``val_fraction=0.2``, so the learning curves
   have validation points), its checkpoint saved in REPORT_DIR; ``--compare`` presets (default: the
   previous recipe, ``v1``) run the same way, so a recipe's gain is measured in one run;
5. **classify**: ``solution.classify`` on that checkpoint and the test folder.

Steps 2-5 each run in a fresh 'spawn' child (``tools.bench_steps``, named by string: this process never
imports Lightning), so each reports its own peak memory. Everything is written under REPORT_DIR:
``report.md`` (with the most-confused species pairs), ``results.json``, ``learning_curves.png``,
``per_class_accuracy.png``, ``confusion_matrix.png``, ``top_losses.png`` and the checkpoint. Scratch files
(matplotlib's cache, the temp dir) live in ``REPORT_DIR/.scratch`` during the run and are deleted at the end.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from birds_lpft.data.sets import DataError, read_class_names
from birds_lpft.data.synthetic import load_data
from birds_lpft.extract import bf16_supported, extract, make_loader, resolve_precision
from birds_lpft.models.weights import WeightsError, pretrained_net
from birds_lpft.tools.baseline import BaselineConfig
from birds_lpft.tools.bench_plots import write_plots
from birds_lpft.tools.bench_report import (
    class_breakdown,
    most_confused,
    report_markdown,
    table_rows,
    text_table,
    top_losses,
)
from birds_lpft.utils.cli import Written, check_output_dir, fail, run_interruptible
from birds_lpft.utils.outputs import write_text
from birds_lpft.utils.settings import ConfigError, overridden, split_overrides
from birds_lpft.utils.timing import peak_rss_mb, proc_status_mb

from probe.pipeline import ProbeConfig

from finetune.cli import add_settings, alias_changes
from finetune.config import PRESETS, FinetuneConfig, preset

CHECKPOINT = "birds_model.pt"
COMPUTE_BATCH = 16  # birds_lpft.extract.extract's batch size: small batches are fastest on a CPU
STEPS = "birds_lpft.tools.bench_steps"


@dataclass(frozen=True)
class BenchOptions:
    """What one benchmark run measures.

    Attributes:
        data_dir: grader layout: ``train/``, optionally ``test/`` and ``classes.txt``.
        out: the report folder, the only place anything is written.
        preset: ``finetune.config`` preset of the pipeline step (run with ``val_fraction=0.2``).
        overrides: ``(field, value)`` pairs replacing preset fields (``field=value`` on the command line).
        compare: more presets run as pipeline steps beside it (same split, same overrides).
        baseline: run step 3, the slow online fine-tune.
        baseline_epochs: its fixed number of epochs.
        baseline_image_size: its input side (224, the weights' own).
        random_init: no pretrained weights anywhere (smoke runs and tests).
        compute_batches: timed batches per compute-limit measurement (after one warm-up batch).
        progress: show progress bars.
    """

    data_dir: Path
    out: Path
    preset: str = "full"
    overrides: tuple[tuple[str, object], ...] = ()
    compare: tuple[str, ...] = ("v1",)
    baseline: bool = False
    baseline_epochs: int = 6
    baseline_image_size: int = 224
    random_init: bool = False
    compute_batches: int = 8
    progress: bool = True

    @property
    def weights(self) -> str:
        return "none" if self.random_init else "required"

    def pipeline_config(self, name: str | None = None) -> FinetuneConfig:
        return overridden(preset(name or self.preset), {"val_fraction": 0.2, **dict(self.overrides)})

    def baseline_config(self) -> BaselineConfig:
        return BaselineConfig(epochs=self.baseline_epochs, image_size=self.baseline_image_size)


# --------------------------------------------------------------------------- measuring


def in_child(step: str, *args) -> dict:
    """Run ``tools.bench_steps.<step>(*args)`` in a fresh 'spawn' process; its dict gains its peak memory."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_measured, step, *args).result()


def _measured(step: str, *args) -> dict:
    start_rss = proc_status_mb("VmRSS")  # before the step's imports: the interpreter and the runner
    result = getattr(importlib.import_module(STEPS), step)(*args)
    return {**result, "peak_rss_mib": peak_rss_mb(), "start_rss_mib": start_rss}


class RandomImages(Dataset):
    """``n`` pre-decoded images, cycling through one seeded random batch: no decoding, no resizing."""

    def __init__(self, n: int, size: int):
        self.n = n
        self.pool = torch.randn(COMPUTE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.pool[i % COMPUTE_BATCH], i


def throughput(fn: Callable, size: int, batches: int, precision: str, desc: str, progress: bool) -> dict:
    """Images/s of ``fn`` over ``batches`` batches of 16 through :func:`birds_lpft.extract.extract`."""
    extract(fn, make_loader(RandomImages(COMPUTE_BATCH, size), COMPUTE_BATCH), precision=precision,
            progress=False)  # warm-up: oneDNN builds its kernels on the first batch
    _, stats = extract(fn, make_loader(RandomImages(batches * COMPUTE_BATCH, size), COMPUTE_BATCH),
                       precision=precision, desc=desc, progress=progress)
    return {"images": stats.images, "seconds": stats.seconds, "images_per_s": stats.images_per_s}


def compute_step(opts: BenchOptions, cfg: FinetuneConfig, num_classes: int) -> dict:
    """Step 1: forward throughput of the full network and of the trunk alone on random tensors."""
    net = pretrained_net(cfg.net_config(num_classes), opts.weights)
    args = (cfg.image_size, opts.compute_batches, cfg.precision)
    return {
        "image_size": cfg.image_size, "batch_size": COMPUTE_BATCH, "precision": resolve_precision(cfg.precision),
        "full": throughput(net, *args, "compute: full network", opts.progress),
        "trunk": throughput(net.forward_trunk, *args, f"compute: trunk [:{cfg.trunk_split}]", opts.progress),
    }


# --------------------------------------------------------------------------- the run


def run_bench(opts: BenchOptions) -> dict:
    """Run every step side by side; each step's dict gains ``wall_seconds`` (the parent's clock)."""
    opts.out.mkdir(parents=True, exist_ok=True)
    cfg = opts.pipeline_config()
    train, test = load_data(opts.data_dir)
    results = {"baseline": None, "classify": None, "preset": opts.preset, "compare": {}}
    start = time.perf_counter()
    results["compute"] = compute_step(opts, cfg, train.num_classes)
    results["compute"]["wall_seconds"] = time.perf_counter() - start
    results["probe"] = timed_child("probe_step", opts.data_dir, opts.weights, opts.progress)
    if opts.baseline:
        results["baseline"] = timed_child("baseline_step", opts.data_dir, opts.baseline_config(), opts.weights,
                                          opts.progress)
    results["pipeline"] = timed_child("pipeline_step", opts.data_dir, cfg, opts.weights, opts.progress,
                                      opts.out / CHECKPOINT)
    for name in opts.compare:
        results["compare"][name] = timed_child("pipeline_step", opts.data_dir, opts.pipeline_config(name),
                                               opts.weights, opts.progress, None)
    if test is not None:
        results["classify"] = timed_child("classify_step", opts.out / CHECKPOINT, opts.data_dir / "test")
    add_analysis(results, opts, train.num_classes)
    return results


def timed_child(step: str, *args) -> dict:
    """:func:`in_child`, with the parent's wall clock for the whole step (process start and imports included)."""
    start = time.perf_counter()
    result = in_child(step, *args)
    return {**result, "wall_seconds": time.perf_counter() - start}


def add_analysis(results: dict, opts: BenchOptions, num_classes: int) -> None:
    """Species names, per-class accuracy, confusion, most-confused pairs, top losses, config, machine."""
    names = read_class_names(opts.data_dir / "classes.txt", num_classes) or tuple(map(str, range(num_classes)))
    results["classes"] = list(names)
    results.update(class_breakdown(results["pipeline"], num_classes))
    if results["confusion_matrix"] is not None:
        results["most_confused"] = most_confused(results["confusion_matrix"], results["classes"])
        results["top_losses"] = top_losses(results["pipeline"], results["classes"])
    results["config"] = {
        "bench": _jsonable({**asdict(opts), "overrides": dict(opts.overrides)}),
        "probe": asdict(ProbeConfig()),
        "baseline": asdict(opts.baseline_config()) if opts.baseline else None,
        "pipeline": asdict(opts.pipeline_config()),
        "compare": {name: asdict(opts.pipeline_config(name)) for name in opts.compare},
    }
    results["environment"] = environment(opts.pipeline_config())


def environment(cfg: FinetuneConfig) -> dict:
    """The machine and library versions the figures come from."""
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(), "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "precision": resolve_precision(cfg.precision), "bf16_supported": bf16_supported(),
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        **{lib: importlib.metadata.version(lib) for lib in ("torchvision", "lightning", "scikit-learn")},
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _jsonable(value):
    """Paths and tuples as JSON-friendly values."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


# --------------------------------------------------------------------------- writing


@contextmanager
def scratch_in(folder: Path) -> Iterator[Path]:
    """Keep the run's scratch files inside ``folder``: matplotlib's config and font cache (``MPLCONFIGDIR``)
    and the temp dir (``TMPDIR``), both under ``folder/.scratch``, deleted afterwards.

    matplotlib reads its variable once, when first imported (by the plots and, in the 'spawn' children,
    by ``import lightning`` through torchmetrics), then writes there instead of ``~/.config``/``~/.cache``.
    multiprocessing and torch make short-lived files in the temp dir. The children inherit both.
    """
    scratch = folder / ".scratch"
    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    saved = {k: os.environ.get(k) for k in ("MPLCONFIGDIR", "TMPDIR")}
    saved_tempdir = tempfile.tempdir
    os.environ.update(MPLCONFIGDIR=str(scratch / "mpl"), TMPDIR=str(scratch / "tmp"))
    tempfile.tempdir = None  # recomputed from $TMPDIR on next use
    try:
        yield scratch
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = saved_tempdir
        shutil.rmtree(scratch, ignore_errors=True)


def write_report(opts: BenchOptions, results: dict) -> None:
    """Print the table and write results.json, the plots and report.md into ``opts.out``."""
    print("\n" + text_table(table_rows(results)))
    write_text(opts.out / "results.json", json.dumps(results, indent=2) + "\n")
    plots = write_plots(results, opts.out, opts.data_dir / "test" / "images")
    write_text(opts.out / "report.md", report_markdown(str(opts.data_dir), results, plots))
    print(f"report written to {opts.out / 'report.md'}")


# --------------------------------------------------------------------------- command line


PROG = "python -m tools.bench"


def parse_args(argv: list[str] | None) -> BenchOptions:
    """Command-line arguments -> :class:`BenchOptions`, every setting and the report folder checked (exit 2)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path, help="grader-layout folder (train/, optionally test/ and classes.txt)")
    p.add_argument("overrides", nargs="*", metavar="field=value", help="FinetuneConfig overrides of every pipeline")
    p.add_argument("--out", type=Path, required=True, help="report folder: the only place anything is written")
    p.add_argument("--baseline", action="store_true", help="also run the slow online fine-tune baseline")
    p.add_argument("--baseline-epochs", type=int, default=BenchOptions.baseline_epochs)
    p.add_argument("--baseline-image-size", type=int, default=BenchOptions.baseline_image_size)
    p.add_argument("--random-init", action="store_true", help="no pretrained weights (a smoke run)")
    add_settings(p)
    p.add_argument("--compare", nargs="*", default=list(BenchOptions.compare), choices=sorted(PRESETS),
                   help="presets measured beside --preset (default: v1); give none to skip")
    p.add_argument("--compute-batches", type=int, default=BenchOptions.compute_batches,
                   help="timed batches of 16 per compute-limit measurement")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_intermixed_args(argv)  # field=value may come before or after the flags
    compare = tuple(c for c in a.compare if c != a.preset)
    opts = BenchOptions(a.data_dir, a.out, a.preset, (), compare, a.baseline, a.baseline_epochs,
                        a.baseline_image_size, a.random_init, a.compute_batches, not a.no_progress)
    try:
        changes = {**split_overrides(a.overrides), **alias_changes(a)}
        opts = replace(opts, overrides=tuple(changes.items()))
        for name in (a.preset, *compare):
            opts.pipeline_config(name)  # raises on a bad override, before any work
        opts.baseline_config()
    except ConfigError as err:
        fail(PROG, str(err))
    for flag, value in (("--baseline-epochs", a.baseline_epochs), ("--compute-batches", a.compute_batches)):
        if value < 1:
            fail(PROG, f"{flag} must be at least 1, got {value}")
    check_output_dir(PROG, "--out", a.out)
    return opts


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write the report.

    Returns:
        the results written to ``results.json``.
    """
    opts = parse_args(argv)
    return run_interruptible(lambda written: run(opts, written), PROG)


def run(opts: BenchOptions, written: Written) -> dict:
    opts.out.mkdir(parents=True, exist_ok=True)
    with scratch_in(opts.out):
        try:
            results = run_bench(opts)
        except (DataError, WeightsError) as err:
            sys.exit(f"error: {err}")
        written.add(opts.out / CHECKPOINT)
        write_report(opts, results)
    return results


if __name__ == "__main__":
    main()
