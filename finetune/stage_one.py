"""Stage one of LP-FT inside stage two: the probe fitted on the cached centre views, folded into every head.

The fine-tune and every cross-validation fold run it through the :class:`StageOne` callback inside ``fit``: under DDP
the first place the ranks exist, before the strategy wraps the model. Every rank's (small) pooled features are
gathered, rank 0 fits the probe and broadcasts it, and every rank sets its heads from it.
"""

from __future__ import annotations

import time
from typing import cast

import lightning as L
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


class StageOne(Callback):
    """Fits the probe on the fit images' centre views and sets every head of the network from it, once, when the
    first fit's data module has its cache; later fits (an ensemble's other members, a distilled student) keep the
    same probe. ``fitted`` and ``seconds`` say what it did; with ``keep_start``, ``start_state`` is the network's
    state dict right after it (pretrained, probe heads)."""

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
        net = cast(BirdNet, pl_module.net)  # finetune.module.LPFTModule's
        cfg = cast(FinetuneConfig, pl_module.cfg)
        # This rank's fit images: their pooled features (from_stacks may hold them already), their indices.
        pooled = data.fit_pooled if data.fit_pooled is not None else pooled_from_trunk(net, data.fit_centre)
        index = gather_rows(trainer, torch.as_tensor(data.fit_index))
        features = gather_rows(trainer, pooled.float())
        fitted: FittedProbe | None = None
        if trainer.is_global_zero:
            order = torch.argsort(index).cpu().numpy()  # the global image order, whatever the shards
            y = data.labels[index.cpu().numpy()[order]]
            fitted = fit_probe(features.cpu().numpy()[order], y, cfg.probe, cfg.seed)
        if trainer.world_size > 1:
            fitted = trainer.strategy.broadcast(fitted, src=0)
        assert fitted is not None  # rank 0 fitted it and broadcast it to every other rank
        for top in net.tops():
            init_head_from_probe(top.head, fitted.probe)
        self.fitted = fitted
        if self.keep_start:
            self.start_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        self.seconds = time.perf_counter() - start
