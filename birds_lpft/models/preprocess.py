"""Preprocessing derived from a backbone's pretrained weights: one source of truth for every stage.

:class:`EvalTransform` (probe features, the cache's centre view, ``classify``) and :class:`TrainTransform`
(the augmented views) turn a decoded RGB image into a network input. Each preset carries ``min_side``, the shorter
side decoding must keep (see ``birds_lpft.data.images``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import cast

import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from birds_lpft.models.zoo import BackboneSpec


@dataclass(frozen=True)
class DataConfig:
    """Input preprocessing, derived from the backbone's weights (see :func:`data_config`): resize the shorter side
    to ``resize_size`` (``interpolation``: an ``InterpolationMode`` value), centre-crop the square ``image_size``,
    normalise 0..1 RGB by ``mean`` and ``std``."""

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"


def data_config(spec: BackboneSpec, image_size: int | None = None) -> DataConfig:
    """Preprocessing of the backbone's pretrained weights, optionally at another ``image_size`` with the weights'
    crop fraction."""
    d = spec.data
    mean = cast("tuple[float, float, float]", tuple(float(v) for v in d["mean"]))
    std = cast("tuple[float, float, float]", tuple(float(v) for v in d["std"]))
    native = DataConfig(d["image_size"], d["resize_size"], mean, std, InterpolationMode(d["interpolation"]).value)
    if image_size is None or image_size == native.image_size:
        return native
    resize_size = int(round(image_size / (native.image_size / native.resize_size)))  # the weights' crop fraction
    return replace(native, image_size=int(image_size), resize_size=resize_size)


class EvalTransform(transforms.Compose):
    """The evaluation preset: resize the shorter side, centre-crop, normalise: PIL RGB -> (3, S, S) float.

    ``mean`` is kept for a blank stand-in image.
    """

    def __init__(self, cfg: DataConfig):
        super().__init__([
            transforms.Resize(cfg.resize_size, interpolation=InterpolationMode(cfg.interpolation), antialias=True),
            transforms.CenterCrop(cfg.image_size),
            transforms.ToTensor(),
            transforms.Normalize(cfg.mean, cfg.std),
        ])
        self.min_side = cfg.resize_size
        self.mean = cfg.mean


class TrainTransform(transforms.Compose):
    """The training preset: random resized crop (``scale``: its area range), flip, colour jitter, normalise."""

    def __init__(self, cfg: DataConfig, *, scale: tuple[float, float], jitter: float):
        steps = [
            transforms.RandomResizedCrop(
                cfg.image_size, scale=scale, interpolation=InterpolationMode(cfg.interpolation), antialias=True
            ),
            transforms.RandomHorizontalFlip(),
        ]
        if jitter > 0:
            steps.append(transforms.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        super().__init__(steps + [transforms.ToTensor(), transforms.Normalize(cfg.mean, cfg.std)])
        # The smallest crop (area share scale[0], aspect ratio 3/4) must stay at least image_size wide, so a crop
        # is never upsampled from a JPEG drafted smaller.
        self.min_side = math.ceil(cfg.image_size / math.sqrt(scale[0] * 3 / 4))
        self.mean = cfg.mean


def mirror(x: torch.Tensor) -> torch.Tensor:
    """The horizontal mirror of an image tensor (..., H, W): the second view of flip TTA."""
    return torch.flip(x, dims=[-1])


class Mirrored(transforms.Compose):
    """A preset followed by :func:`mirror` of its tensor (a cached view of flip TTA)."""

    def __init__(self, preset):
        super().__init__([preset, mirror])
        self.min_side = preset.min_side
        self.mean = preset.mean
