"""``python -m finetune.bench DATA_DIR --out REPORT_DIR [--baseline] [--random-init]``: one side-by-side benchmark.

The machine is noisy, so every figure comes from the same command:

1. **compute limit**: backbone forward throughput on pre-decoded random tensors at the pipeline's image
   size (full network and trunk only), with ``probe.features.extract``'s settings (channels-last, the
   config's precision, inference mode, batch 16): the ceiling of every step that decodes images and runs
   the network on them (probe features, the trunk cache, classify);
2. **linear probe**: stage one alone (``probe.pipeline.run_probe``, ``ProbeConfig`` defaults);
3. **baseline** (``--baseline``, slow): the online fine-tune a user would otherwise write: MobileNetV2
   with ``features[14:]`` trainable, a fresh head, images decoded and augmented again every epoch,
   AdamW, label smoothing 0.1, a fixed number of epochs, plain PyTorch loop;
4. **pipeline**: ``finetune.train.fine_tune`` (a preset with ``val_fraction=0.2``, so the learning
   curves have validation points), its checkpoint saved in REPORT_DIR;
5. **classify**: ``solution.classify`` on that checkpoint and the test folder.

Steps 2-5 each run in a fresh 'spawn' child, so each reports its own peak memory; the parent times every
step wall-clock. Without a ``test/`` split, test accuracy is n/a and classify is skipped. Everything is
written under REPORT_DIR: ``report.md``, ``results.json``, ``learning_curves.png``,
``per_class_accuracy.png``, ``confusion_matrix.png`` and the checkpoint. Scratch files (matplotlib's config
and font cache, the temp dir) live in ``REPORT_DIR/.scratch`` during the run and are deleted at the end.
"""

from __future__ import annotations

import argparse
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

# Nothing here may import lightning (finetune.train, solution): it imports torchmetrics, which imports
# matplotlib.pyplot, which writes ~/.config/matplotlib and ~/.cache/matplotlib unless MPLCONFIGDIR is set
# first. The steps that need it import it in their child process, after main() has set MPLCONFIGDIR.
from probe.__main__ import load_data
from probe.backbone import BirdNet, NetConfig, data_config, train_transform
from probe.data import DataError, LabelledImages, read_gt, stratified_split
from probe.features import ImageDataset, bf16_supported, extract, make_loader, resolve_precision
from probe.pipeline import ProbeConfig, pretrained_net, run_probe
from probe.timing import Stopwatch, peak_rss_mb, proc_status_mb
from probe.weights import WeightsError
from finetune.config import PRESETS, FinetuneConfig, preset
from finetune.predict import predict_logits

CHECKPOINT = "birds_model.pt"
COMPUTE_BATCH = 16  # probe.features.extract's batch size: small batches are fastest on a CPU
OVERRIDES = ("image_size", "epochs", "views")


@dataclass(frozen=True)
class BaselineConfig:
    """The online fine-tune recipe of step 3: what a user would write without caching or LP init.

    Attributes:
        backbone: a name in ``probe.backbone.BACKBONES``.
        image_size: network input side; images are decoded and augmented again every epoch.
        split: first trainable block: ``features[14:]``, the last 5 blocks of MobileNetV2.
        dropout: before the fresh linear head (torchvision's MobileNetV2 classifier uses 0.2).
        epochs: fixed number of passes over the training images.
        batch_size: images per step.
        lr, weight_decay: AdamW, one rate for tail and head, cosine-annealed per step to 0.
        label_smoothing: cross-entropy label smoothing.
        crop_scale, jitter: ``train_transform`` augmentation, the pipeline's own, so only the recipe differs.
        val_fraction: held-out share per class (the same seeded split as the probe's and the pipeline's).
        precision: evaluation precision (training runs in fp32, as a plain loop does).
        seed: head init, shuffling and augmentation.
    """

    backbone: str = "mobilenet_v2"
    image_size: int = 224
    split: int = 14
    dropout: float = 0.2
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = FinetuneConfig.crop_scale
    jitter: float = FinetuneConfig.jitter
    val_fraction: float = 0.2
    precision: str = "auto"
    seed: int = 0


@dataclass(frozen=True)
class BenchOptions:
    """What one benchmark run measures.

    Attributes:
        data_dir: grader layout: ``train/``, optionally ``test/`` and ``classes.txt``.
        out: the report folder, the only place anything is written.
        preset: ``finetune.config`` preset of the pipeline step (run with ``val_fraction=0.2``).
        overrides: ``(field, value)`` pairs replacing preset fields (image_size, epochs, views).
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
    overrides: tuple[tuple[str, int], ...] = ()
    baseline: bool = False
    baseline_epochs: int = 6
    baseline_image_size: int = 224
    random_init: bool = False
    compute_batches: int = 8
    progress: bool = True

    @property
    def weights(self) -> str:
        return "none" if self.random_init else "required"

    def pipeline_config(self) -> FinetuneConfig:
        return preset(self.preset, val_fraction=0.2, **dict(self.overrides))

    def baseline_config(self) -> BaselineConfig:
        return BaselineConfig(epochs=self.baseline_epochs, image_size=self.baseline_image_size)


# --------------------------------------------------------------------------- measuring


def in_child(fn: Callable[..., dict], *args) -> dict:
    """Run ``fn(*args)`` in a fresh 'spawn' process and return its (picklable) dict, with its peak memory."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_measured, fn, *args).result()


def _measured(fn: Callable[..., dict], *args) -> dict:
    start_rss = proc_status_mb("VmRSS")  # the libraries alone (torch, torchvision, scikit-learn): the floor
    result = fn(*args)
    return {**result, "peak_rss_mib": peak_rss_mb(), "start_rss_mib": start_rss}


class RandomImages(Dataset):
    """``n`` pre-decoded images, cycling through one seeded random batch: no decoding, no resizing."""

    def __init__(self, n: int, size: int):
        self.n, self.pool = n, torch.randn(COMPUTE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.pool[i % COMPUTE_BATCH], i


def throughput(fn: Callable, size: int, batches: int, precision: str, desc: str, progress: bool) -> dict:
    """Images/s of ``fn`` over ``batches`` batches of 16 through :func:`probe.features.extract`."""
    extract(fn, make_loader(RandomImages(COMPUTE_BATCH, size), COMPUTE_BATCH), precision=precision,
            progress=False)  # warm-up: oneDNN builds its kernels on the first batch
    _, stats = extract(fn, make_loader(RandomImages(batches * COMPUTE_BATCH, size), COMPUTE_BATCH),
                       precision=precision, desc=desc, progress=progress)
    return {"images": stats.images, "seconds": stats.seconds, "images_per_s": stats.images_per_s}


def compute_step(opts: BenchOptions, cfg: FinetuneConfig, num_classes: int) -> dict:
    """Step 1: forward throughput of the full network and of the trunk alone on random tensors."""
    net = pretrained_net(NetConfig(cfg.backbone, num_classes, cfg.split, cfg.dropout), opts.weights)
    args = (cfg.image_size, opts.compute_batches, cfg.precision)
    return {
        "image_size": cfg.image_size, "batch_size": COMPUTE_BATCH, "precision": resolve_precision(cfg.precision),
        "full": throughput(net, *args, "compute: full network", opts.progress),
        "trunk": throughput(net.forward_trunk, *args, f"compute: trunk [:{cfg.split}]", opts.progress),
    }


def probe_step(opts: BenchOptions) -> dict:
    """Step 2 (in a child): the plain linear probe with ``ProbeConfig`` defaults."""
    train, test = load_data(opts.data_dir)
    result = run_probe(train, test, ProbeConfig(), opts.weights)
    stages = dict(result.stopwatch.seconds)
    seconds = sum(v for k, v in stages.items() if k != "test features")
    return {
        "val_accuracy": result.val_accuracy, "test_accuracy": result.test_accuracy, "C": result.C,
        "val_scores": {str(c): s for c, s in result.val_scores.items()}, "stages": stages, "seconds": seconds,
        "train_images": len(train), "images_per_s": len(train) / seconds, "config": asdict(ProbeConfig()),
    }


# --------------------------------------------------------------------------- step 3: the online baseline


def baseline_net(num_classes: int, cfg: BaselineConfig, weights: str) -> BirdNet:
    """MobileNetV2 with a frozen trunk ``features[:split]``, a trainable tail and a fresh linear head."""
    torch.manual_seed(cfg.seed)
    net = pretrained_net(NetConfig(cfg.backbone, num_classes, cfg.split, cfg.dropout), weights)
    net.trunk.requires_grad_(False)
    return net


def baseline_epoch(net: BirdNet, loader: DataLoader, labels: torch.Tensor, opt, sched, cfg: BaselineConfig,
                   desc: str, progress: bool) -> dict[str, float]:
    """One online epoch: decode, augment, forward, step. Returns the epoch's mean loss and accuracy."""
    net.train()
    net.trunk.eval()  # frozen means frozen: the trunk's BatchNorm keeps its ImageNet statistics
    loss_sum, correct = 0.0, 0
    for x, index in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        y = labels[index]
        logits = net(x.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
    n = len(loader.dataset)
    return {"train_loss": loss_sum / n, "train_acc": correct / n}


def train_baseline(net: BirdNet, images: LabelledImages, cfg: BaselineConfig, progress: bool) -> list[dict]:
    """Fit tail + head for ``cfg.epochs`` epochs of online augmentation. Returns the per-epoch history."""
    transform = train_transform(data_config(cfg.backbone, cfg.image_size), scale=cfg.crop_scale, jitter=cfg.jitter)
    loader = DataLoader(ImageDataset(images.sources, images.names, transform), batch_size=cfg.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * len(loader))
    labels, history = torch.as_tensor(images.labels), []
    for epoch in range(1, cfg.epochs + 1):
        row = baseline_epoch(net, loader, labels, opt, sched, cfg, f"baseline epoch {epoch}/{cfg.epochs}", progress)
        history.append({"epoch": epoch, **row})
    return history


def baseline_accuracy(net: BirdNet, images: LabelledImages, cfg: BaselineConfig) -> float | None:
    """Centre-view accuracy through the project's prediction path (no flip TTA); None for no images."""
    if len(images) == 0:
        return None
    logits = predict_logits(net, images.sources, images.names, data_config(cfg.backbone, cfg.image_size),
                            tta_flip=False, precision=cfg.precision, progress=False)  # its bar says 'classify'
    return float(np.mean(logits.argmax(1).numpy() == images.labels))


def baseline_step(opts: BenchOptions, cfg: BaselineConfig) -> dict:
    """Step 3 (in a child): train the online baseline on the 80% split, score validation and test."""
    train, test = load_data(opts.data_dir)
    fit_idx, val_idx = stratified_split(train.labels, cfg.val_fraction, cfg.seed)
    sw = Stopwatch()
    with sw("load network"):
        net = baseline_net(train.num_classes, cfg, opts.weights)
    with sw("train"):
        history = train_baseline(net, train.subset(fit_idx), cfg, opts.progress)
    with sw("evaluate"):
        val_acc = baseline_accuracy(net, train.subset(val_idx), cfg)
        test_acc = baseline_accuracy(net, test, cfg) if test is not None else None
    seconds = sw.seconds["load network"] + sw.seconds["train"]
    return {
        "val_accuracy": val_acc, "test_accuracy": test_acc, "history": history, "stages": dict(sw.seconds),
        "seconds": seconds, "images_per_s": len(fit_idx) * cfg.epochs / sw.seconds["train"],
        "config": asdict(cfg),
    }


# --------------------------------------------------------------------------- steps 4 and 5


def pipeline_step(opts: BenchOptions) -> dict:
    """Step 4 (in a child): both LP-FT stages, test accuracy via the classifier, checkpoint into REPORT_DIR."""
    from finetune.train import fine_tune  # imports lightning: see the note on the imports

    train, test = load_data(opts.data_dir)
    cfg = opts.pipeline_config()
    result = fine_tune(train, cfg, opts.weights, progress=opts.progress, accelerator="cpu", devices=1)
    stages = dict(result.stopwatch.seconds)
    out = {
        "val_accuracy": result.val_accuracy, "probe_C": result.probe_C, "probe_val_accuracy": result.probe_val_accuracy,
        "stages": stages, "seconds": sum(stages.values()), "history": result.history,
        "train_images_per_s": result.trained_samples / stages["fine-tune"],
        "cache_mib": result.cache_bytes / 2**20, "cache_images": result.cache_images,
        "test_accuracy": None, "config": asdict(cfg),
    }
    if test is not None:
        start = time.perf_counter()
        predictions = result.classifier.predict(test.sources, test.names, precision=cfg.precision,
                                                progress=opts.progress)
        out.update(test_seconds=time.perf_counter() - start, test_predictions=predictions.tolist(),
                   test_labels=test.labels.tolist(), test_accuracy=float(np.mean(predictions == test.labels)))
    result.classifier.save(opts.out / CHECKPOINT)
    return {**out, "checkpoint": str(opts.out / CHECKPOINT)}


def classify_step(model_path: Path, split_dir: Path) -> dict:
    """Step 5 (in a child): ``solution.classify`` on the test folder, timed around the call (model load included)."""
    import solution  # imports lightning: see the note on the imports

    start = time.perf_counter()
    predicted = solution.classify(str(model_path), str(split_dir / "images"))
    seconds = time.perf_counter() - start
    gt = read_gt(split_dir / "gt.csv")
    return {
        "images": len(predicted), "seconds": seconds, "images_per_s": len(predicted) / seconds,
        "accuracy": float(np.mean([predicted.get(name) == label for name, label in gt.items()])),
    }


# --------------------------------------------------------------------------- the run


def run_bench(opts: BenchOptions) -> dict:
    """Run every step side by side; each step's dict gains ``wall_seconds`` (the parent's clock).

    Returns:
        results with keys compute, probe, baseline (None unless asked), pipeline, classify (None without
        a test split), config, environment, classes, per_class_test_accuracy, confusion_matrix.
    """
    opts.out.mkdir(parents=True, exist_ok=True)
    cfg = opts.pipeline_config()
    train, test = load_data(opts.data_dir)
    sw, results = Stopwatch(), {"baseline": None, "classify": None}
    with sw("compute"):
        results["compute"] = compute_step(opts, cfg, train.num_classes)
    with sw("probe"):
        results["probe"] = in_child(probe_step, opts)
    if opts.baseline:
        with sw("baseline"):
            results["baseline"] = in_child(baseline_step, opts, opts.baseline_config())
    with sw("pipeline"):
        results["pipeline"] = in_child(pipeline_step, opts)
    if test is not None:
        with sw("classify"):
            results["classify"] = in_child(classify_step, opts.out / CHECKPOINT, opts.data_dir / "test")
    for step, seconds in sw.seconds.items():
        results[step]["wall_seconds"] = seconds
    results["classes"] = class_names(opts.data_dir, train.num_classes)
    results.update(class_breakdown(results["pipeline"], train.num_classes))
    results["config"], results["environment"] = run_config(opts, cfg), environment(cfg)
    return results


def run_config(opts: BenchOptions, cfg: FinetuneConfig) -> dict:
    """Every setting of the run: the bench options and the probe, baseline and pipeline configs."""
    return {
        "bench": _jsonable({**asdict(opts), "overrides": dict(opts.overrides)}),
        "probe": asdict(ProbeConfig()),
        "baseline": asdict(opts.baseline_config()) if opts.baseline else None,
        "pipeline": asdict(cfg),
    }


def class_breakdown(pipeline: dict, num_classes: int) -> dict:
    """Per-class test accuracy and the confusion matrix (rows: true class) of the pipeline's predictions."""
    if pipeline.get("test_predictions") is None:
        return {"per_class_test_accuracy": None, "confusion_matrix": None}
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (pipeline["test_labels"], pipeline["test_predictions"]), 1)
    totals = matrix.sum(1)
    per_class = [float(matrix[k, k] / totals[k]) if totals[k] else None for k in range(num_classes)]
    return {"per_class_test_accuracy": per_class, "confusion_matrix": matrix.tolist()}


def class_names(data_dir: Path, num_classes: int) -> list[str]:
    """Species names from ``data_dir/classes.txt`` ('class_id species_name' per line), else the ids."""
    names = [str(k) for k in range(num_classes)]
    path = data_dir / "classes.txt"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split(maxsplit=1)
            if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) < num_classes:
                names[int(parts[0])] = parts[1].strip().replace("_", " ")
    return names


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


# --------------------------------------------------------------------------- the table and the report


def table_rows(results: dict) -> list[list[str]]:
    """One row per measured step: step, val acc, test acc, seconds, wall s, images/s, peak RSS MiB."""
    c, rows = results["compute"], []
    for part in ("full", "trunk"):
        rows.append([f"compute: {part}", "-", "-", _f(c[part]["seconds"]), _f(c["wall_seconds"]),
                     _f(c[part]["images_per_s"]), "-"])
    named = (("linear probe", "probe", "images_per_s"), ("baseline (online FT)", "baseline", "images_per_s"),
             ("LP-FT pipeline", "pipeline", "train_images_per_s"))
    for label, key, rate in named:
        r = results[key]
        if r is not None:
            rows.append([label, _acc(r["val_accuracy"]), _acc(r["test_accuracy"]), _f(r["seconds"]),
                         _f(r["wall_seconds"]), _f(r[rate]), _f(r["peak_rss_mib"])])
    r = results["classify"]
    if r is not None:
        rows.append(["classify", "-", _acc(r["accuracy"]), _f(r["seconds"]), _f(r["wall_seconds"]),
                     _f(r["images_per_s"]), _f(r["peak_rss_mib"])])
    return rows


HEADER = ["step", "val acc", "test acc", "seconds", "wall s", "images/s", "peak RSS MiB"]
NOTES = """\
- seconds: the step's own work. probe, baseline, pipeline: producing the model (test scoring excluded);
  compute: the timed batches; classify: the `solution.classify` call, model load included.
  wall s: the parent's wall clock for the whole step (process start and imports of a child included).
- images/s: compute: forward passes on pre-decoded tensors; probe: training images per second end to end;
  baseline: training images per second of online training; pipeline: cached views per second of the
  fine-tune stage; classify: test images per second.
- peak RSS: each step's own process (VmHWM); compute runs in the parent and is not measured.
- val acc: the same seeded 20% per class for probe, baseline and pipeline; pipeline test accuracy uses flip TTA."""


def _f(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def text_table(rows: list[list[str]]) -> str:
    """A fixed-width table for the terminal."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [HEADER, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" + "---:|" * (len(HEADER) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report_markdown(opts: BenchOptions, results: dict, plots: list[str]) -> str:
    """report.md: the table, the pipeline's stage times, the plots, the config and the machine."""
    env, p = results["environment"], results["pipeline"]
    stages = ", ".join(f"{k} {_f(v)}s" for k, v in p["stages"].items())
    floor = "n/a" if p["start_rss_mib"] is None else f"{p['start_rss_mib']:.0f} MiB"
    parts = [
        f"# Benchmark: {opts.data_dir}", "", markdown_table(table_rows(results)), "", NOTES, "",
        f"Pipeline stages: {stages}. Trunk cache {p['cache_mib']:.1f} MiB for {p['cache_images']} images; "
        f"training {p['train_images_per_s']:.1f} views/s. A child holds {floor} (torch and the other "
        "libraries) before its step starts: part of every peak RSS above.", "",
        f"Machine: {env['cpu_count']} CPUs ({env['cpus_usable']} usable, {env['cpu_model'] or 'model unknown'}), "
        f"torch {env['torch']} with {env['torch_threads']} threads, precision {env['precision']}.", "",
        *[f"![{name}]({name})" for name in plots], "",
        "## Config", "", "```json", json.dumps(results["config"], indent=2), "```", "",
        "## Environment", "", "```json", json.dumps(env, indent=2), "```", "",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- plots


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


def agg_figure() -> type:
    """matplotlib's ``Figure`` class on the Agg backend (no display, no pyplot state)."""
    import matplotlib  # here, not at the top: only once MPLCONFIGDIR is set (see scratch_in)

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure


def plot_learning_curves(Figure, results: dict, path: Path) -> None:
    """Train/val loss and accuracy per epoch of the pipeline (and of the baseline's training, dashed)."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    runs = [("LP-FT", results["pipeline"]["history"], "-")]
    if results["baseline"] is not None:
        runs.append(("baseline", results["baseline"]["history"], "--"))
    for ax, metric in zip(axes, ("loss", "acc")):
        for run, history, style in runs:
            for split in ("train", "val"):
                points = [(h["epoch"], h[f"{split}_{metric}"]) for h in history if f"{split}_{metric}" in h]
                if points:
                    ax.plot(*zip(*points), style, marker="o", label=f"{run} {split}")
        ax.set(xlabel="epoch", ylabel="accuracy" if metric == "acc" else "loss",
               title="accuracy" if metric == "acc" else "loss (train with label smoothing)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def plot_per_class(Figure, per_class: list[float | None], names: list[str], path: Path) -> None:
    """Horizontal bars of test accuracy per class, sorted, worst at the bottom."""
    scored = sorted((acc, name) for acc, name in zip(per_class, names) if acc is not None)
    fig = Figure(figsize=(8, max(3.0, 0.22 * len(scored) + 1.2)), layout="constrained")
    ax = fig.subplots()
    ax.barh(range(len(scored)), [a for a, _ in scored], color="tab:blue")
    ax.set_yticks(range(len(scored)), [n for _, n in scored], fontsize=7)
    mean = float(np.mean([a for a, _ in scored])) if scored else float("nan")
    ax.set(xlim=(0, 1), xlabel="test accuracy", title=f"LP-FT test accuracy per class (mean {mean:.3f})")
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, dpi=100)


def plot_confusion(Figure, matrix: list[list[int]], names: list[str], path: Path) -> None:
    """Row-normalised confusion matrix (rows: true class), species names on both axes, counts when small."""
    m = np.asarray(matrix, dtype=float)
    rates = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(14, 12), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=90, fontsize=6)
    ax.set_yticks(ticks, names, fontsize=6)
    ax.set(xlabel="predicted", ylabel="true", title="LP-FT confusion matrix on test (row-normalised)")
    if len(names) <= 20:
        for (i, j), count in np.ndenumerate(m):
            if count:
                ax.text(j, i, int(count), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, shrink=0.6, label="share of the true class")
    fig.savefig(path, dpi=120)  # 1680 x 1440 px: 50 names in 6 pt stay legible


def write_plots(results: dict, out: Path) -> list[str]:
    """The PNGs this run can make (per-class and confusion need a test split). Returns their file names."""
    Figure, names = agg_figure(), ["learning_curves.png"]
    plot_learning_curves(Figure, results, out / names[0])
    if results["confusion_matrix"] is not None:
        plot_per_class(Figure, results["per_class_test_accuracy"], results["classes"], out / "per_class_accuracy.png")
        plot_confusion(Figure, results["confusion_matrix"], results["classes"], out / "confusion_matrix.png")
        names += ["per_class_accuracy.png", "confusion_matrix.png"]
    return names


def write_report(opts: BenchOptions, results: dict) -> None:
    """Print the table and write results.json, the plots and report.md into ``opts.out``."""
    print("\n" + text_table(table_rows(results)))
    (opts.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    plots = write_plots(results, opts.out)
    (opts.out / "report.md").write_text(report_markdown(opts, results, plots), encoding="utf-8")
    print(f"report written to {opts.out / 'report.md'}")


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> BenchOptions:
    """Command-line arguments -> :class:`BenchOptions`."""
    p = argparse.ArgumentParser(prog="python -m finetune.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", type=Path, help="grader-layout folder (train/, optionally test/ and classes.txt)")
    p.add_argument("--out", type=Path, required=True, help="report folder: the only place anything is written")
    p.add_argument("--baseline", action="store_true", help="also run the slow online fine-tune baseline")
    p.add_argument("--baseline-epochs", type=int, default=BenchOptions.baseline_epochs)
    p.add_argument("--baseline-image-size", type=int, default=BenchOptions.baseline_image_size)
    p.add_argument("--random-init", action="store_true", help="no pretrained weights (a smoke run)")
    p.add_argument("--preset", default=BenchOptions.preset, choices=sorted(PRESETS))
    for name in OVERRIDES:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help="override the preset's value")
    p.add_argument("--compute-batches", type=int, default=BenchOptions.compute_batches,
                   help="timed batches of 16 per compute-limit measurement")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    overrides = tuple((k, getattr(a, k)) for k in OVERRIDES if getattr(a, k) is not None)
    return BenchOptions(a.data_dir, a.out, a.preset, overrides, a.baseline, a.baseline_epochs,
                        a.baseline_image_size, a.random_init, a.compute_batches, not a.no_progress)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, write the report.

    Returns:
        the results written to ``results.json``.
    """
    opts = parse_args(argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    with scratch_in(opts.out):
        try:
            results = run_bench(opts)
        except (DataError, WeightsError) as err:
            sys.exit(f"error: {err}")
        write_report(opts, results)
    return results


if __name__ == "__main__":
    main()
