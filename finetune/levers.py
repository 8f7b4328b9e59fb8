"""Optional training levers, kept apart from the model and the training loop (as timm keeps ``mixup.py`` and
``model_ema.py`` apart from its models): an exponential moving average of the trainable weights, and
mixup / CutMix of cached trunk activations. Each is measured by ``finetune.cv`` and switched on by a
config field (``ema_decay``, ``mix``); the shipped recipe uses neither, and this module is imported only by
a run that asks for one.

Mixing is written here rather than taken from torchvision's ``transforms.v2.MixUp`` / ``CutMix`` (0.19 has
both): those draw their share from torch's global generator, which in this pipeline also seeds the cached
augmented views and dropout, and they cannot be given a generator of their own; they also return soft
targets with the share below one half as often as above, while here the first label always dominates, so
training accuracy on it stays meaningful.
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback


class WeightAverage(Callback):
    """An exponential moving average of the trainable weights (``torch.optim.swa_utils.AveragedModel``).

    The average stands in for the weights during validation and replaces them when training ends. The
    decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the first, untrained weights
    are forgotten quickly (timm's and TF's ModelEma do the same).
    """

    def __init__(self, decay: float):
        super().__init__()
        self.decay = decay
        self.average = None
        self._live = None

    def _avg_fn(self, averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        decay = min(self.decay, (1.0 + float(n)) / (10.0 + float(n)))
        return torch.lerp(current, averaged, decay)  # decay * averaged + (1 - decay) * current

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.average = torch.optim.swa_utils.AveragedModel(pl_module.top, avg_fn=self._avg_fn, use_buffers=False)

    def on_train_batch_end(self, trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self.average.update_parameters(pl_module.top)

    def _trainable(self, pl_module: L.LightningModule):
        pairs = zip(pl_module.top.parameters(), self.average.module.parameters())
        return [(p, a) for p, a in pairs if p.requires_grad]

    def _load_average(self, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            for p, a in self._trainable(pl_module):
                p.copy_(a)

    def on_validation_start(self, trainer, pl_module: L.LightningModule) -> None:
        if self.average is not None and not trainer.sanity_checking:
            self._live = [p.detach().clone() for p, _ in self._trainable(pl_module)]
            self._load_average(pl_module)

    def on_validation_end(self, trainer, pl_module: L.LightningModule) -> None:
        if self._live is not None:
            with torch.no_grad():
                for (p, _), live in zip(self._trainable(pl_module), self._live):
                    p.copy_(live)
            self._live = None

    def on_train_end(self, trainer, pl_module: L.LightningModule) -> None:
        self._load_average(pl_module)


def mix_batch(acts: torch.Tensor, y: torch.Tensor, mode: str, alpha: float, rng: np.random.Generator):
    """Mixup or CutMix of a batch of trunk activations (B, C, h, w) with a shuffled copy of itself.

    Returns:
        (mixed activations, labels a, labels b, share of a); the loss is share * CE(a) + (1 - share) * CE(b).
    """
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    lam = max(lam, 1.0 - lam)  # labels a always dominate, so accuracy on a is meaningful
    perm = torch.as_tensor(rng.permutation(len(y)))
    acts = acts.float()
    if mode == "mixup":
        return lam * acts + (1.0 - lam) * acts[perm], y, y[perm], lam
    if mode != "cutmix":
        raise ValueError(f"mix must be 'none', 'mixup' or 'cutmix', got {mode!r}")
    h, w = acts.shape[-2:]  # a box of area ~(1 - lam) from the partner, at a random place
    bh = round(h * math.sqrt(1.0 - lam))
    bw = round(w * math.sqrt(1.0 - lam))
    top = int(rng.integers(0, h - bh + 1))
    left = int(rng.integers(0, w - bw + 1))
    mixed = acts.clone()
    mixed[..., top:top + bh, left:left + bw] = acts[perm][..., top:top + bh, left:left + bw]
    return mixed, y, y[perm], 1.0 - bh * bw / (h * w)  # the share of a actually kept


def mixed_step(module, acts: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, loss) of a mixed batch: share * CE(a) + (1 - share) * CE(b), with ``module``'s own draws."""
    cfg = module.cfg
    acts, y, y_b, lam = mix_batch(acts, y, cfg.mix, cfg.mix_alpha, module.mix_rng)
    logits = module(acts)
    smoothing = cfg.label_smoothing
    loss = lam * F.cross_entropy(logits, y, label_smoothing=smoothing)
    loss = loss + (1.0 - lam) * F.cross_entropy(logits, y_b, label_smoothing=smoothing)
    return logits, loss
