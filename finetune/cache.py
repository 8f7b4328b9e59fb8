"""The trunk cache: frozen-trunk activations of several augmented views per image, computed once, in RAM.

The trunk is frozen, so its output for a given augmented image never changes: computing it once per view
and training only the tail on the cached activations makes every epoch cost a tail pass instead of a
whole-network pass. Activations are kept in fp16 (half the RAM; the tail upcasts to fp32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from probe.backbone import BirdNet, DataConfig, eval_transform, train_transform
from probe.data import LabelledImages
from probe.features import ImageDataset, extract, make_loader
from finetune.config import FinetuneConfig


def trunk_activations(
    net: BirdNet, images: LabelledImages, transform, cfg: FinetuneConfig, desc: str, progress: bool = True
) -> torch.Tensor:
    """(N, C, h, w) trunk activations of ``transform(image)`` for every image, in ``cfg.cache_dtype``."""
    dataset = ImageDataset(images.sources, images.names, transform)
    acts, _ = extract(
        net.forward_trunk, make_loader(dataset, cfg.extract_batch_size), precision=cfg.precision,
        out_dtype=getattr(torch, cfg.cache_dtype), desc=desc, progress=progress,
    )
    return acts


def centre_activations(net: BirdNet, images: LabelledImages, data_cfg: DataConfig, cfg: FinetuneConfig,
                       desc: str = "centre view", progress: bool = True) -> torch.Tensor:
    """Trunk activations of the deterministic evaluation view (the one ``classify`` sees)."""
    return trunk_activations(net, images, eval_transform(data_cfg), cfg, desc, progress)


def augmented_activations(net: BirdNet, images: LabelledImages, data_cfg: DataConfig, cfg: FinetuneConfig,
                          progress: bool = True) -> list[torch.Tensor]:
    """``cfg.views`` tensors of (N, C, h, w): one seeded random augmentation of every image each."""
    transform = train_transform(data_cfg, scale=cfg.crop_scale, jitter=cfg.jitter)
    views = []
    for v in range(cfg.views):
        # torchvision's random transforms draw from torch's global RNG; loading is in-process, so this
        # seed fixes view v exactly.
        torch.manual_seed(cfg.seed * 1000 + v)
        views.append(trunk_activations(net, images, transform, cfg, f"view {v + 1}/{cfg.views}", progress))
    return views


class CachedViews(Dataset):
    """Cached activations of several views of the same images, as one flat dataset of (activation, label).

    Args:
        stacks: tensors of shape (N, C, h, w), one per view, aligned with ``labels`` (N,).
    """

    def __init__(self, stacks: Sequence[torch.Tensor], labels: torch.Tensor):
        if any(len(s) != len(labels) for s in stacks):
            raise ValueError("every view stack must hold one activation per label")
        self.stacks, self.labels = list(stacks), torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.stacks) * len(self.labels)

    def __getitem__(self, i: int):
        view, n = divmod(i, len(self.labels))
        return self.stacks[view][n], self.labels[n]

    @property
    def nbytes(self) -> int:
        return sum(s.element_size() * s.nelement() for s in self.stacks)
