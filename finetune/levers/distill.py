"""Self-distillation (``FinetuneConfig.distill``, the loss weight): once the tail (or an ensemble of
``members`` tails) is trained, a fresh student, which starts from the same probe-initialised network, is
trained on the same cached views with the usual loss plus the distillation term towards the trained
network's predictions (Hinton et al. 2015; "born-again networks", Furlanello et al. 2018). The student is
one network of the shipped shape, so ``classify`` still runs one network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TEMPERATURE = 2.0  # softens both distributions so the teacher's ranking of the wrong species carries over


class Distill(nn.Module):
    """``weight`` x T^2 x KL(teacher || student) at temperature T, on the batch's own cached activations.

    The teacher (a trained network: its tops' logits averaged) is frozen, in eval mode, and runs on the same
    trunk activations as the student, without gradients.
    """

    def __init__(self, teacher: nn.Module, weight: float):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight = weight

    def train(self, mode: bool = True) -> Distill:
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, *, acts: torch.Tensor, logits: torch.Tensor, **_) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(self.teacher.forward_from_trunk(acts).float() / TEMPERATURE, dim=1)
        student = F.log_softmax(logits.float() / TEMPERATURE, dim=1)
        kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
        return self.weight * TEMPERATURE**2 * kl

    def param_groups(self, lr_tail: float, lr_head: float) -> list[tuple[list[nn.Parameter], float]]:
        return []
