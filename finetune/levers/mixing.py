"""Mixup and CutMix of cached trunk activations within a batch (``FinetuneConfig.mix``).

Not torchvision's ``MixUp`` / ``CutMix``: they draw from torch's global generator, which here also seeds the cached
views and dropout, and take none of their own; and here the first label always dominates, so training accuracy on it
stays meaningful.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def mix_batch(acts: torch.Tensor, y: torch.Tensor, mode: str, alpha: float, rng: np.random.Generator):
    """Mixup or CutMix of a batch of trunk activations (B, C, h, w) with a shuffled copy of itself: (mixed
    activations, labels a, labels b, share of a), for the loss share * CE(a) + (1 - share) * CE(b)."""
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
