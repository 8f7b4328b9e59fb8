"""Prediction with the shipped preprocessing: batched, bounded memory, in-process loading, CPU.

Used by both ``classify`` and the project's own test evaluation, so the two always agree.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from probe.backbone import BirdNet, DataConfig, eval_transform
from probe.data import DataError, Source, open_rgb
from probe.features import extract, make_loader


class TolerantImages(Dataset):
    """Like ``ImageDataset``, but an unreadable image becomes a mean-grey one, with a warning naming it,
    so that every file still gets a prediction (a missing key scores zero at the grader)."""

    def __init__(self, sources: Sequence[Source], names: Sequence[str], data_cfg: DataConfig):
        self.sources, self.names, self.cfg = list(sources), list(names), data_cfg
        self.transform = eval_transform(data_cfg)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        try:
            img = open_rgb(self.sources[i], self.names[i])
        except DataError as err:
            warnings.warn(f"{err} It is labelled from a blank image.", stacklevel=2)
            grey = tuple(int(255 * m) for m in self.cfg.mean)
            img = Image.new("RGB", (self.cfg.resize_size, self.cfg.resize_size), grey)
        return self.transform(img), i


def flip_averaged(net: BirdNet, tta_flip: bool):
    """x (B, 3, H, W) -> logits (B, K), averaged with the mirrored image's when ``tta_flip``."""

    def logits(x: torch.Tensor) -> torch.Tensor:
        if not tta_flip:
            return net(x).float()
        both = net(torch.cat([x, torch.flip(x, dims=[3])])).float()  # one pass over (2B, 3, H, W)
        return (both[: len(x)] + both[len(x):]) / 2

    return logits


def predict_logits(net: BirdNet, sources: Sequence[Source], names: Sequence[str], data_cfg: DataConfig, *,
                   tta_flip: bool, precision: str = "auto", batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """(N, K) logits for the images, in order; unreadable images get a warning and a blank-image guess."""
    net.eval()
    loader = make_loader(TolerantImages(sources, names, data_cfg), batch_size)
    logits, _ = extract(flip_averaged(net, tta_flip), loader, precision=precision, desc="classify", progress=progress)
    return logits
