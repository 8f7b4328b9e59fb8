"""A supervised contrastive term on the cached views (``FinetuneConfig.supcon``, the loss weight).

SupCon (Khosla et al. 2020) as Bi-Tuning (Zhong et al. 2020) adds it to fine-tuning: through a small projector, each
view's pooled features are pulled towards the batch's other views of its species and away from the rest. The ordinary
batch serves, so nothing more is extracted and no momentum encoder is needed; the projector is thrown away after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from finetune.levers.terms import LossTerm

TEMPERATURE = 0.1  # SupCon's own
PROJECTION = 128  # the projector's output width (SupCon's)


class SupCon(LossTerm):
    """``weight`` x the supervised contrastive loss of the batch's pooled features (B, F).

    Views without another of their species in the batch are no anchors; a batch without any pair adds 0. The
    projector is seeded on a forked generator, so building it leaves the training's random streams as they were.
    """

    def __init__(self, width: int, weight: float, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, PROJECTION))
        self.weight = weight

    def forward(self, *, features: torch.Tensor, y: torch.Tensor, **_) -> torch.Tensor:
        z = F.normalize(self.projector(features).float(), dim=1)  # (B, P)
        return self.weight * supcon_loss(z, y)

    def param_groups(self, lr_tail: float, lr_head: float) -> list[tuple[list[nn.Parameter], float]]:
        return [(list(self.projector.parameters()), lr_head)]


def supcon_loss(z: torch.Tensor, y: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Khosla et al.'s L_out on unit vectors z (B, P) with labels y (B,): for each anchor, minus the mean log
    softmax (over every other view) of its positives, averaged over the anchors that have one."""
    self_mask = torch.eye(len(y), dtype=torch.bool, device=z.device)
    sim = (z @ z.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (y[:, None] == y[None, :]) & ~self_mask
    anchors = positives.any(1)
    if not anchors.any():
        return z.sum() * 0.0  # keeps the graph (and the device) without adding anything
    per_anchor = log_prob.masked_fill(~positives, 0.0).sum(1)[anchors] / positives.sum(1)[anchors]
    return -per_anchor.mean()
