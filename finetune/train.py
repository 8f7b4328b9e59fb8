"""Stage two end to end: probe-initialised head (LP-FT), cached trunk views, Lightning fine-tuning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from probe.backbone import BirdNet, NetConfig, data_config
from probe.data import LabelledImages, stratified_split
from probe.linear import LinearProbe, init_head_from_probe, select_C
from probe.pipeline import pretrained_net
from probe.timing import Stopwatch
from finetune.checkpoint import Classifier
from finetune.cache import CachedViews, augmented_activations, centre_activations
from finetune.config import FinetuneConfig
from finetune.module import LPFTModule, TrunkFreeze


@dataclass
class FinetuneResult:
    """The trained network (eval mode) and what the run measured."""

    classifier: Classifier
    cfg: FinetuneConfig
    probe_C: float
    probe_val_accuracy: float | None
    val_accuracy: float | None
    history: list[dict[str, float]]
    cache_bytes: int
    cache_images: int
    trained_samples: int  # cached views that went through the tail during training, all epochs
    stopwatch: Stopwatch = field(default_factory=Stopwatch)


@torch.inference_mode()
def pooled_from_trunk(net: BirdNet, acts: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """(N, F) pooled features from cached trunk activations (N, C, h, w), in fp32 like training."""
    net.eval()
    return torch.cat([net.forward_features(acts[i:i + batch_size]) for i in range(0, len(acts), batch_size)]).numpy()


def fit_stage_one(features: np.ndarray, labels: np.ndarray, cfg: FinetuneConfig):
    """Choose C on stage one's split, then fit the probe on stage two's training indices.

    Returns:
        (probe, C, probe validation accuracy, stage-two train indices, stage-two validation indices)
    """
    tr, va = stratified_split(labels, cfg.probe_val_fraction, cfg.seed)
    C, scores = select_C(features[tr], labels[tr], features[va], labels[va], cfg.probe_Cs, cfg.seed)
    if cfg.val_fraction > 0:
        fit_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed)
    else:
        fit_idx, val_idx = np.arange(len(labels)), np.array([], dtype=np.int64)
    probe = LinearProbe(C, random_state=cfg.seed).fit(features[fit_idx], labels[fit_idx])
    return probe, C, scores.get(C), fit_idx, val_idx


def make_trainer(cfg: FinetuneConfig, progress: bool, **trainer_kwargs) -> L.Trainer:
    """A Trainer that writes nothing: no logger, no checkpoints, no sanity pass; device flags pass through."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")  # in-process loading is the design
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode.*")  # BatchNorm is pinned to eval on purpose
    kwargs = dict(
        max_epochs=cfg.epochs, logger=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_train_batches=cfg.limit_train_batches, deterministic="warn",
        enable_progress_bar=progress, callbacks=[TrunkFreeze(cfg.head_only_epochs, cfg.lr_tail)],
    )
    kwargs["callbacks"] += list(trainer_kwargs.pop("callbacks", []))  # extra callbacks never replace the freezing
    kwargs.update(trainer_kwargs)
    return L.Trainer(**kwargs)


def train_tail(net: BirdNet, train_set: CachedViews, val_set: CachedViews | None, cfg: FinetuneConfig,
               progress: bool = True, **trainer_kwargs) -> LPFTModule:
    """Fit tail + head on cached activations; the best validation weights end up in ``net``."""
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    module = LPFTModule(net, cfg)
    val_loader = DataLoader(val_set, batch_size=64) if val_set is not None else None
    module.train()  # Lightning >= 2.2 keeps the mode it is given; ours pins BatchNorm and enables dropout
    make_trainer(cfg, progress, **trainer_kwargs).fit(module, loader, val_loader)
    if module.best_state is not None:
        net.load_state_dict(module.best_state)
    net.eval()
    return module


def fine_tune(train: LabelledImages, cfg: FinetuneConfig, weights: str = "required", *,
              allow_download: bool = False, progress: bool = True, **trainer_kwargs) -> FinetuneResult:
    """Both stages on ``train``: LP init of the head, then fine-tuning of tail + head.

    Args:
        weights: see :func:`probe.pipeline.pretrained_net` ('required', 'if-cached' or 'none').
        trainer_kwargs: passed to ``lightning.Trainer`` (e.g. accelerator, devices, strategy). Under DDP
            every rank builds the whole trunk cache itself, then trains on its shard of the views.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    sw = Stopwatch()
    data_cfg = data_config(cfg.backbone, cfg.image_size)
    net_cfg = NetConfig(cfg.backbone, train.num_classes, cfg.split, cfg.dropout)
    with sw("load network"):
        net = pretrained_net(net_cfg, weights, allow_download=allow_download)
    with sw("centre view"):
        centre = centre_activations(net, train, data_cfg, cfg, progress=progress)
    with sw("probe"):
        probe, C, probe_val, fit_idx, val_idx = fit_stage_one(pooled_from_trunk(net, centre), train.labels, cfg)
        init_head_from_probe(net.head, probe)
    with sw("augmented views"):
        views = augmented_activations(net, train.subset(fit_idx), data_cfg, cfg, progress=progress)
    fit_centre = centre if len(fit_idx) == len(centre) else centre[fit_idx]  # no copy when training on all
    train_set = CachedViews([fit_centre, *views], train.labels[fit_idx])
    val_set = CachedViews([centre[val_idx]], train.labels[val_idx]) if len(val_idx) else None
    cache_bytes = train_set.nbytes + (val_set.nbytes if val_set else 0)
    with sw("fine-tune"):
        module = train_tail(net, train_set, val_set, cfg, progress, **trainer_kwargs)
    val_acc = module.best_val_accuracy if val_set is not None else None
    classifier = Classifier(net, net_cfg, data_cfg, cfg.tta_flip).eval()
    return FinetuneResult(classifier, cfg, C, probe_val, val_acc, module.history, cache_bytes, len(train),
                          module.samples_seen, sw)
