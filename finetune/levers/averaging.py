"""Weight averaging: an exponential or uniform moving average of the trainable weights during one fit
(``FinetuneConfig.ema_decay``, ``swa``), and the uniform soup of several members' weights (``average='weights'``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn


class WeightAverage(Callback):
    """A moving average of the trainable weights (``torch.optim.swa_utils.AveragedModel``): exponential
    (``decay``, EMA) or uniform over the last ``swa`` share of the steps (SWA, Izmailov et al. 2018).

    The average stands in for the weights during validation and replaces them when training ends. The EMA's decay
    warms up, as in timm's and TF's ModelEma, so the first, untrained weights are forgotten quickly.
    """

    def __init__(self, decay: float = 0.0, swa: float = 0.0):
        super().__init__()
        self.decay = decay
        self.swa = swa
        self.average: torch.optim.swa_utils.AveragedModel | None = None
        self.first_step = 0  # SWA: updates after this many optimiser steps
        self._live: list[torch.Tensor] | None = None

    def _avg_fn(self, averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
        decay = min(self.decay, (1.0 + float(n)) / (10.0 + float(n)))
        return torch.lerp(current, averaged, decay)  # decay * averaged + (1 - decay) * current

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        avg_fn = self._avg_fn if self.decay > 0 else None  # None: AveragedModel's running mean, SWA's
        top = cast(nn.Module, pl_module.top)  # the trained top of finetune.module.LPFTModule
        self.average = torch.optim.swa_utils.AveragedModel(top, avg_fn=avg_fn, use_buffers=False)
        if self.swa > 0:
            self.first_step = int(round((1.0 - self.swa) * trainer.estimated_stepping_batches))

    def on_train_batch_end(self, trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.swa == 0 or trainer.global_step > self.first_step:
            assert self.average is not None  # made in on_fit_start
            self.average.update_parameters(cast(nn.Module, pl_module.top))

    def _trainable(self, pl_module: L.LightningModule) -> list[tuple[nn.Parameter, nn.Parameter]]:
        assert self.average is not None  # only called once the average holds weights
        pairs = zip(cast(nn.Module, pl_module.top).parameters(), self.average.module.parameters(), strict=True)
        return [(p, a) for p, a in pairs if p.requires_grad]

    def _load_average(self, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            for p, a in self._trainable(pl_module):
                p.copy_(a)

    def _averaged(self) -> bool:
        """Whether the average holds any step's weights yet (SWA starts late in the fit)."""
        return self.average is not None and int(self.average.n_averaged) > 0

    def on_validation_start(self, trainer, pl_module: L.LightningModule) -> None:
        if self._averaged() and not trainer.sanity_checking:
            self._live = [p.detach().clone() for p, _ in self._trainable(pl_module)]
            self._load_average(pl_module)

    def on_validation_end(self, trainer, pl_module: L.LightningModule) -> None:
        if self._live is not None:
            with torch.no_grad():
                for (p, _), live in zip(self._trainable(pl_module), self._live, strict=True):
                    p.copy_(live)
            self._live = None

    def on_train_end(self, trainer, pl_module: L.LightningModule) -> None:
        if self._averaged():
            self._load_average(pl_module)


@torch.no_grad()
def uniform_soup(tops: Sequence[nn.Module], into: nn.Module) -> nn.Module:
    """Load the mean of ``tops``' weights into ``into`` (a top of the same shape): the uniform model soup (Wortsman
    et al. 2022), sound because every member starts from the same probe-initialised network, so their weights lie in
    one basin. Integer buffers (BatchNorm's step count, the same in every member) are member 0's."""
    states = [top.state_dict() for top in tops]
    mean = {k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[0].items()}
    into.load_state_dict(mean)
    return into
