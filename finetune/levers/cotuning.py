"""Co-Tuning (You et al., NeurIPS 2020; ``FinetuneConfig.cotuning``, the loss weight): the pretrained ImageNet head,
on the tail's maps, is trained too, towards its species' p(ImageNet class | species). That relationship is the
paper's "direct approach" (``tllib.regularization.co_tuning.Relationship``): the pretrained softmax averaged over each
species' cached centre views. Prediction never runs that head, so the shipped network and ``classify`` are unchanged.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from birds_lpft.models.net import TailHead

from finetune.levers.terms import LossTerm


@torch.inference_mode()
def relationship(top: TailHead, source_head: nn.Module, centre: torch.Tensor, rows, labels: torch.Tensor,
                 num_classes: int, trainer: L.Trainer | None = None, batch_size: int = 64) -> torch.Tensor:
    """(K, S) p(ImageNet class | species): each species' mean of the source softmax over its images.

    ``top``'s tail runs in eval mode on ``rows`` of the cached ``centre`` views (the fit images, ``labels`` theirs).
    Under DDP the ranks' sums and counts are added up, so every rank gets the same matrix. A species without images
    (never in a training set, which has every class) gets the uniform row.
    """
    modes = [(m, m.training) for m in top.modules()]  # each module's own: a TailHead is a fresh wrapper
    top.eval()
    device = next(top.parameters()).device
    classes = source_head(torch.zeros(1, top.head.in_features, 1, 1, device=device)).shape[1]  # even a shard of none
    sums = torch.zeros(num_classes, classes, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    for i in range(0, len(rows), batch_size):
        acts = centre[torch.as_tensor(rows[i:i + batch_size])].to(device)
        p = F.softmax(source_head(top.forward_tail(acts)).double(), dim=1)  # (B, S)
        y = labels[i:i + batch_size].to(device)
        sums.index_add_(0, y, p)
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
    for module, mode in modes:
        module.training = mode
    if trainer is not None and trainer.world_size > 1:
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
    uniform = torch.full_like(sums[0], 1.0 / sums.shape[1])
    rel = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], uniform)
    return rel.float()


class CoTuning(LossTerm):
    """The Co-Tuning loss term: ``weight`` x CE(ImageNet head(maps), relationship[y]).

    The ImageNet head trains at the tail's learning rate (it is pretrained, as the tail is) and always runs in eval
    mode: its dropout would only regularise a head that is thrown away, and would draw from the global generator.
    """

    EVAL_MODE = ("source_head",)
    rel: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, source_head: nn.Module, rel: torch.Tensor, weight: float):
        super().__init__()
        self.source_head = source_head
        self.register_buffer("rel", rel)
        self.weight = weight

    def forward(self, *, maps: torch.Tensor, y: torch.Tensor, **_) -> torch.Tensor:
        log_p = F.log_softmax(self.source_head(maps).float(), dim=1)  # (B, S)
        return self.weight * -(self.rel[y] * log_p).sum(1).mean()

    def param_groups(self, lr_tail: float, lr_head: float) -> list[tuple[list[nn.Parameter], float]]:
        return [(list(self.source_head.parameters()), lr_tail)]
