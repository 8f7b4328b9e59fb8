"""Preprocessing derived from a backbone's pretrained weights: one source of truth for every stage.

:class:`DataConfig` (sizes, mean, std, interpolation) comes from the weights' own transforms
(:func:`data_config`); the two presets turn a decoded RGB image into a network input: :class:`EvalTransform`
(probe features, the centre view of the cache, validation, ``classify``) and :class:`TrainTransform` (the
augmented views). Each carries ``min_side``, the shorter side decoding must keep (see ``birds_lpft.data.images``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from birds_lpft.models.zoo import BackboneSpec


@dataclass(frozen=True)
class DataConfig:
    """Input preprocessing, derived from the backbone's weights (see :func:`data_config`).

    Attributes:
        image_size: side of the square network input (the centre crop).
        resize_size: shorter side after resizing, before the centre crop.
        mean, std: per-channel normalisation of 0..1 RGB.
        interpolation: resize interpolation name (a torchvision ``InterpolationMode`` value).
    """

    image_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @property
    def crop_fraction(self) -> float:
        return self.image_size / self.resize_size


def data_config(spec: BackboneSpec, image_size: int | None = None) -> DataConfig:
    """Preprocessing of the backbone's pretrained weights, optionally at another input size.

    A different ``image_size`` keeps the weights' crop fraction (224/256 for MobileNetV2).
    """
    d = spec.data
    native = DataConfig(d["image_size"], d["resize_size"], tuple(float(v) for v in d["mean"]),
                        tuple(float(v) for v in d["std"]), InterpolationMode(d["interpolation"]).value)
    if image_size is None or image_size == native.image_size:
        return native
    return replace(native, image_size=int(image_size), resize_size=int(round(image_size / native.crop_fraction)))


def with_crop_fraction(cfg: DataConfig, fraction: float) -> DataConfig:
    """The same preprocessing with a centre crop covering ``fraction`` of the shorter side (a TTA view)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"a crop fraction must be in (0, 1], got {fraction}")
    return replace(cfg, resize_size=max(cfg.image_size, int(round(cfg.image_size / fraction))))


class EvalTransform:
    """The evaluation preset: resize the shorter side, centre-crop, normalise: PIL RGB -> (3, S, S) float.

    Attributes:
        min_side: the shorter side decoding must keep (JPEGs may decode smaller, see ``birds_lpft.data.images``).
        mean: the normalisation mean, for a blank stand-in image.
    """

    def __init__(self, cfg: DataConfig):
        self.min_side = cfg.resize_size
        self.mean = cfg.mean
        self.transforms = transforms.Compose([
            transforms.Resize(cfg.resize_size, interpolation=InterpolationMode(cfg.interpolation), antialias=True),
            transforms.CenterCrop(cfg.image_size),
            transforms.ToTensor(),
            transforms.Normalize(cfg.mean, cfg.std),
        ])

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transforms(img)


class TTATransform:
    """The evaluation preset at several crops of the same decoded image: PIL RGB -> (V, 3, S, S) float.

    View 0 is :class:`EvalTransform`'s; view i covers ``crops[i - 1]`` of the shorter side (see
    :func:`with_crop_fraction`). Decoding keeps the largest resize any view needs.
    """

    def __init__(self, cfg: DataConfig, crops: tuple[float, ...]):
        self.views = [EvalTransform(cfg)] + [EvalTransform(with_crop_fraction(cfg, c)) for c in crops]
        self.min_side = max(v.min_side for v in self.views)
        self.mean = cfg.mean

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.stack([view(img) for view in self.views])


class TrainTransform:
    """The training preset: random resized crop, horizontal flip, mild colour jitter, normalise.

    Args:
        scale: RandomResizedCrop's area range.
        jitter: brightness/contrast/saturation strength (0 = none).
    """

    def __init__(self, cfg: DataConfig, *, scale: tuple[float, float], jitter: float):
        # The smallest crop side is sqrt(scale[0] * 3/4) of the image's (area share, ratio 3/4); decoding
        # must keep that crop at least image_size wide so the crop is never upsampled from a drafted JPEG.
        self.min_side = math.ceil(cfg.image_size / math.sqrt(scale[0] * 3 / 4))
        self.mean = cfg.mean
        steps = [
            transforms.RandomResizedCrop(
                cfg.image_size, scale=scale, interpolation=InterpolationMode(cfg.interpolation), antialias=True
            ),
            transforms.RandomHorizontalFlip(),
        ]
        if jitter > 0:
            steps.append(transforms.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter))
        steps += [transforms.ToTensor(), transforms.Normalize(cfg.mean, cfg.std)]
        self.transforms = transforms.Compose(steps)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.transforms(img)


def mirror(x: torch.Tensor) -> torch.Tensor:
    """The horizontal mirror of an image tensor (..., H, W): the second view of flip TTA."""
    return torch.flip(x, dims=[-1])


class Mirrored:
    """A preset followed by :func:`mirror` of its tensor (a cached view of flip TTA)."""

    def __init__(self, preset):
        self.preset = preset
        self.min_side = preset.min_side
        self.mean = preset.mean

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return mirror(self.preset(img))
