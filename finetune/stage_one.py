"""Stage one of LP-FT inside stage two: the probe fitted on the cached centre views, folded into every head.

The fine-tune and every cross-validation fold run it through the :class:`StageOne` callback inside ``fit``: under DDP
the first place the ranks exist, before the strategy wraps the model. Every rank's (small) pooled features are
gathered, rank 0 fits the probe and broadcasts it, and every rank sets its heads from it.
"""

from __future__ import annotations

import time
from typing import cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from birds_lpft.models.net import BirdNet
from birds_lpft.recipe import FinetuneConfig

from probe.linear import FittedProbe, fit_probe, init_head_from_probe

from finetune.distributed import gather_rows


@torch.inference_mode()
def pooled_from_trunk(net: BirdNet, acts: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(N, F) fp32 pooled features of cached trunk activations (N, C, h, w) through the net's first top in eval
    mode: what stage one's probe is fitted on."""
    net.eval()
    out = []
    for i in range(0, len(acts), batch_size):
        out.append(net.forward_head(net.forward_tail(acts[i:i + batch_size]), pre_logits=True).float())
    return torch.cat(out)


def stage_one(net: BirdNet, fit_centre: torch.Tensor | None, fit_index: np.ndarray, labels: np.ndarray,
              cfg: FinetuneConfig, trainer: L.Trainer | None = None,
              pooled: torch.Tensor | None = None) -> FittedProbe:
    """Fit the probe on the centre views of the fit images (every rank's) and initialise every head of ``net``.

    ``fit_centre``: this rank's cached centre activations of its fit images, ``fit_index`` their indices into
    ``labels``; None when ``pooled`` (:func:`pooled_from_trunk` of them, computed once for many folds) is given.
    ``trainer`` only under DDP (gather and broadcast).
    """
    if pooled is None:
        assert fit_centre is not None  # None only when ``pooled`` is given
        pooled = pooled_from_trunk(net, fit_centre)
    features = pooled.float()
    index = gather_rows(trainer, torch.as_tensor(fit_index))
    features = gather_rows(trainer, features)
    fitted: FittedProbe | None = None
    if trainer is None or trainer.is_global_zero:
        order = torch.argsort(index).cpu().numpy()  # the global image order, whatever the shards
        X = features.cpu().numpy()[order]
        y = labels[index.cpu().numpy()[order]]
        fitted = fit_probe(X, y, cfg.probe, cfg.seed)
    if trainer is not None:
        fitted = trainer.strategy.broadcast(fitted, src=0)
    assert fitted is not None  # rank 0 fitted it and broadcast it to every other rank
    for top in net.tops():
        init_head_from_probe(top.head, fitted.probe)
    return fitted


class StageOne(Callback):
    """Runs :func:`stage_one` once, when the first fit's data module has its cache; later fits (an ensemble's
    other members, a distilled student) keep the same probe. ``fitted`` and ``seconds`` say what it did; with
    ``keep_start``, ``start_state`` is the network's state dict right after it (pretrained, probe heads)."""

    def __init__(self, keep_start: bool = False):
        super().__init__()
        self.fitted: FittedProbe | None = None
        self.seconds = 0.0
        self.keep_start = keep_start
        self.start_state: dict[str, torch.Tensor] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.fitted is not None:
            return
        start = time.perf_counter()
        data = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's fit, not declared on Trainer
        world = trainer if trainer.world_size > 1 else None
        net = cast(BirdNet, pl_module.net)  # finetune.module.LPFTModule's
        cfg = cast(FinetuneConfig, pl_module.cfg)
        self.fitted = stage_one(net, data.fit_centre, data.fit_index, data.labels, cfg, world, data.fit_pooled)
        if self.keep_start:
            self.start_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        self.seconds = time.perf_counter() - start
