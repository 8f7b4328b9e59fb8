"""Self-distillation (``FinetuneConfig.distill``, the loss weight; Hinton et al. 2015, Furlanello et al. 2018): once
the tail (or an ensemble of tails) is trained, a fresh student from the same probe-initialised network trains on the
same cached views with the usual loss plus a term towards the trained network's predictions. The student is one
network of the shipped shape, so ``classify`` still runs one network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from birds_lpft.models.net import BirdNet

from finetune.levers.terms import LossTerm

TEMPERATURE = 2.0  # softens both distributions so the teacher's ranking of the wrong species carries over


class Distill(LossTerm):
    """``weight`` x T^2 x KL(teacher || student) at temperature T, on the batch's own cached activations; the
    teacher (a trained network, its tops' logits averaged) is frozen and runs in eval mode without gradients."""

    EVAL_MODE = ("teacher",)

    def __init__(self, teacher: BirdNet, weight: float):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight = weight

    def forward(self, *, acts: torch.Tensor, logits: torch.Tensor, **_) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(self.teacher.forward_from_trunk(acts).float() / TEMPERATURE, dim=1)
        student = F.log_softmax(logits.float() / TEMPERATURE, dim=1)
        kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
        return self.weight * TEMPERATURE**2 * kl
