"""L2-SP (Li et al. 2018) in AdamW's decoupled form (``FinetuneConfig.l2sp``, the strength): the tail's weights decay
towards their pretrained values instead of zero, so fine-tuning keeps more of what the pretrained network knows. Each
step, before the optimiser's update, every tail weight moves by ``lr * l2sp * (w - w0)``; the tail's ordinary weight
decay is off meanwhile (``LPFTModule.param_groups``). Head, pooling, biases and BatchNorm are left alone.
"""

from __future__ import annotations

from typing import cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from birds_lpft.models.net import TailHead


class TowardsPretrained(Callback):
    """Decoupled decay of the trained tail's weights (conv and linear, ``ndim > 1``) towards their values at
    the start of the fit (the pretrained ones)."""

    def __init__(self, strength: float):
        super().__init__()
        self.strength = strength
        self.anchors: list[tuple[torch.nn.Parameter, torch.Tensor, dict]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        groups = {id(p): g for g in trainer.optimizers[0].param_groups for p in g["params"]}
        top = cast(TailHead, pl_module.top)  # finetune.module.LPFTModule's
        weights = [p for p in top.tail.parameters() if p.requires_grad and p.ndim > 1]
        self.anchors = [(p, p.detach().clone(), groups[id(p)]) for p in weights]

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        for p, start, group in self.anchors:
            p.sub_(p - start, alpha=group["lr"] * self.strength)
