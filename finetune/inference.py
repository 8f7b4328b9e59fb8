"""Prediction with the shipped preprocessing: batched, bounded memory, in-process loading, CPU by default.

The one prediction path: ``classify``, ``python -m finetune.predict``, the CLIs' test evaluation and the
tools all go through :func:`predict_logits`, so they always agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from probe.backbone import BirdNet
from probe.preprocess import DataConfig, EvalTransform
from probe.data import Source
from probe.features import extract, make_loader
from probe.images import ImageDataset


def flip_averaged(net: BirdNet, tta_flip: bool):
    """x (B, 3, H, W) -> logits (B, K), averaged with the mirrored image's when ``tta_flip``."""

    def logits(x: torch.Tensor) -> torch.Tensor:
        if not tta_flip:
            return net(x).float()
        both = net(torch.cat([x, torch.flip(x, dims=[3])])).float()  # one pass over (2B, 3, H, W)
        return (both[: len(x)] + both[len(x):]) / 2

    return logits


@dataclass
class Predictions:
    """(N, K) logits in input order, and the files that could not be read: {position: reason}."""

    logits: torch.Tensor
    unreadable: dict[int, str] = field(default_factory=dict)


def predict_logits(net: BirdNet, sources: Sequence[Source], names: Sequence[str], data_cfg: DataConfig, *,
                   tta_flip: bool, precision: str = "auto", batch_size: int = 8,
                   progress: bool = True) -> Predictions:
    """Logits for the images, in order; an unreadable image gets a warning naming it and a blank-image guess."""
    net.eval()
    dataset = ImageDataset(sources, names, EvalTransform(data_cfg), on_error="blank")
    logits, _ = extract(flip_averaged(net, tta_flip), make_loader(dataset, batch_size), precision=precision,
                        desc="classify", progress=progress)
    return Predictions(logits, dict(dataset.failures))
