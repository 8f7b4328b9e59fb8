"""Predict at a larger input than the tail was trained at (``FinetuneConfig.test_size``; Touvron et al. 2019): random
resized crops make a bird look larger in training than the centre crop does, and a larger input makes up for it. The
pooled features shift there, so the head is recalibrated, not refitted: each feature's mean and spread over the
training images are moved to the training size's, an affine map folded into the head. The network keeps its shape.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from birds_lpft.data.sets import LabelledImages
from birds_lpft.models.net import BirdNet
from birds_lpft.models.preprocess import EvalTransform, data_config
from birds_lpft.recipe import FinetuneConfig

from finetune.cache import View, extract_views
from finetune.stage_one import pooled_from_trunk


def recalibrate(net: BirdNet, images: LabelledImages, centre: torch.Tensor, cfg: FinetuneConfig,
                progress: bool = False) -> BirdNet:
    """Fold the alignment into ``net``'s head from the training images' centre views: ``centre`` (their cached
    trunk activations at the training size) and the same images at ``cfg.test_size``, extracted now."""
    view = View(f"centre view at {cfg.test_size} px", EvalTransform(data_config(cfg.spec, cfg.test_size)))
    device = next(net.parameters()).device
    tested = extract_views(net, images, [view], cfg, desc=view.name, progress=progress, device=device,
                           out_device=centre.device)[0]
    return recalibrate_cached(net, centre, tested, None, cfg.precision)


def recalibrate_cached(net: BirdNet, trained: torch.Tensor, tested: torch.Tensor, rows: np.ndarray | None,
                       precision: str) -> BirdNet:
    """:func:`fold_alignment` of ``net``'s head from cached trunk activations of the same images at both sizes
    (their ``rows``), pooled as prediction pools them."""
    fold_alignment(net.head, pooled_from_trunk(net, trained, rows, precision),
                   pooled_from_trunk(net, tested, rows, precision))
    return net


@torch.no_grad()
def fold_alignment(head: nn.Linear, trained: torch.Tensor, tested: torch.Tensor) -> nn.Linear:
    """Make ``head(f)`` equal the old head on ``f`` moved from the test size's statistics to the training size's:
    f' = a f + c with a = sd_train / sd_test and c = mean_train - a mean_test, per feature (a = 1 for a feature
    constant at the test size); ``trained`` and ``tested`` are (N, F) features of the same images at each size."""
    spread = tested.std(0)
    # x / x is 1 exactly, so the same features change nothing; a feature constant at the test size keeps its scale
    scale = torch.where(spread > 0, trained.std(0) / spread.clamp(min=1e-30), torch.ones_like(spread))
    shift = trained.mean(0) - scale * tested.mean(0)
    head.bias.add_(head.weight.double().mv(shift.double()).to(head.bias.dtype))
    head.weight.mul_(scale.to(head.weight.dtype))
    return head
