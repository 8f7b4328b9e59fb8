"""Predict at a larger input than the tail was trained at (``FinetuneConfig.test_size``; Touvron et al. 2019,
"Fixing the train-test resolution discrepancy"). Random resized crops make a bird look larger in training than
in the centre crop at prediction; a larger input shows it larger again.

At the larger size the pooled features shift, so the head is recalibrated, not refitted: each feature's mean and
spread over the training images at the test size are moved to those at the training size, an affine map folded
into the head's weights and bias. The shipped network keeps its shape; ``classify`` runs it at ``test_size``.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fold_alignment(head: nn.Linear, trained: torch.Tensor, tested: torch.Tensor) -> nn.Linear:
    """Make ``head(f)`` equal the old head on ``f`` moved from the test size's statistics to the training size's:
    f' = a f + c with a = sd_train / sd_test and c = mean_train - a mean_test, per feature.

    Args:
        trained, tested: (N, F) pooled features of the same training images at the training and the test size.
    """
    scale = trained.std(0) / (tested.std(0) + 1e-6)
    shift = trained.mean(0) - scale * tested.mean(0)
    head.bias.add_(head.weight.double().mv(shift.double()).to(head.bias.dtype))
    head.weight.mul_(scale.to(head.weight.dtype))
    return head
