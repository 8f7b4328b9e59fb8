"""The trunk cache: frozen-trunk activations of several augmented views per image, computed once, in RAM.

The trunk is frozen, so its output for a given augmented image never changes: computing it once per view
and training only the tail on the cached activations makes every epoch cost a tail pass instead of a
whole-network pass. Activations are kept in fp16 (half the RAM; the tail upcasts). Before anything is
extracted, :func:`check_budget` compares the cache's size with the memory it may use, so a run that
cannot fit stops at once with the figure and the ways out instead of being killed half-way.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from probe.backbone import BirdNet
from probe.data import LabelledImages
from probe.features import extract, make_loader
from probe.images import ImageDataset
from probe.preprocess import DataConfig, EvalTransform, TrainTransform

from finetune.config import FinetuneConfig

# Default budget: this share of the memory available when the run starts (MemAvailable). The rest is
# for the libraries (~0.8 GiB), the network, the optimiser and the batches in flight.
DEFAULT_BUDGET_SHARE = 0.6


class CacheBudgetError(RuntimeError):
    """The trunk cache would not fit in its memory budget; the message gives the figure and the ways out."""


def trunk_activations(net: BirdNet, images: LabelledImages, transform, cfg: FinetuneConfig, desc: str,
                      progress: bool = True, device: torch.device | str = "cpu",
                      out_device: torch.device | str = "cpu", echo: bool | None = None,
                      first_batch=None) -> torch.Tensor:
    """(N, C, h, w) trunk activations of ``transform(image)`` for every image, in ``cfg.cache_dtype``;
    ``first_batch`` is ``probe.features.extract``'s."""
    dataset = ImageDataset(images.sources, images.names, transform)
    acts, _ = extract(
        net.forward_trunk, make_loader(dataset, cfg.extract_batch_size), precision=cfg.precision,
        out_dtype=getattr(torch, cfg.cache_dtype), desc=desc, progress=progress, device=device, out_device=out_device,
        echo=echo, first_batch=first_batch,
    )
    return acts


class Mirrored:
    """A preset followed by a horizontal flip of its tensor: the second view of flip TTA."""

    def __init__(self, preset):
        self.preset = preset
        self.min_side = preset.min_side
        self.mean = preset.mean

    def __call__(self, img) -> torch.Tensor:
        return torch.flip(self.preset(img), dims=[-1])


def centre_activations(net: BirdNet, images: LabelledImages, data_cfg: DataConfig, cfg: FinetuneConfig,
                       desc: str = "centre view", mirrored: bool = False, **kwargs) -> torch.Tensor:
    """Trunk activations of the deterministic evaluation view (the one ``classify`` sees), or of its mirror."""
    transform = Mirrored(EvalTransform(data_cfg)) if mirrored else EvalTransform(data_cfg)
    return trunk_activations(net, images, transform, cfg, desc, **kwargs)


def augmented_activations(net: BirdNet, images: LabelledImages, data_cfg: DataConfig, cfg: FinetuneConfig,
                          rank: int = 0, **kwargs) -> list[torch.Tensor]:
    """``cfg.views`` tensors of (N, C, h, w): one seeded random augmentation of every image each."""
    transform = TrainTransform(data_cfg, scale=cfg.crop_scale, jitter=cfg.jitter)
    views = []
    for v in range(cfg.views):
        # torchvision's random transforms draw from torch's global RNG; loading is in-process, so this
        # seed fixes view v exactly (and gives each rank of a sharded run its own draws).
        torch.manual_seed(cfg.seed * 1000 + v + 7919 * rank)
        views.append(trunk_activations(net, images, transform, cfg, f"view {v + 1}/{cfg.views}", **kwargs))
    return views


@torch.inference_mode()
def bytes_per_view(net: BirdNet, cfg: FinetuneConfig) -> int:
    """Cache bytes of one view of one image: the trunk's output shape at ``cfg.image_size`` x the cache dtype."""
    param = next(net.trunk.parameters(), None)
    x = torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=param.device if param is not None else "cpu")
    shape = net.forward_trunk(x.contiguous(memory_format=torch.channels_last)).shape[1:]
    return int(np.prod(shape)) * torch.empty((), dtype=getattr(torch, cfg.cache_dtype)).element_size()


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def parse_size(text: str) -> int:
    """'6GiB', '6G', '512MB', '123456' -> bytes (binary units either way)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 6GiB, 512M or a number of bytes")
    return int(float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper()))


def default_budget() -> int | None:
    """``DEFAULT_BUDGET_SHARE`` of the memory available now, or None (no check) where that is unknown."""
    available = available_memory()
    return None if available is None else int(available * DEFAULT_BUDGET_SHARE)


def check_budget(nbytes: int, budget: int | None, *, images: int, views: int, image_size: int,
                 ranks_here: int = 1) -> None:
    """Raise :class:`CacheBudgetError` when ``ranks_here`` caches of ``nbytes`` each exceed ``budget``."""
    total = nbytes * ranks_here
    if budget is None or total <= budget:
        return
    raise CacheBudgetError(
        f"the trunk cache needs {total / 2**30:.2f} GiB ({images} images x {views} views at {image_size} px"
        f"{f', {ranks_here} ranks on this machine' if ranks_here > 1 else ''}), over the budget of "
        f"{budget / 2**30:.2f} GiB. Use fewer views (--views), a smaller input (--image-size), more ranks "
        "on more machines (each holds only its shard), or raise --cache-budget if the memory is there."
    )


class CachedViews(Dataset):
    """Cached activations of several views of the same images, as one flat dataset of (activation, label).

    Args:
        stacks: tensors of shape (N, C, h, w), one per view, row n of each belonging to the same image.
        labels: (N,) class ids, or (len(rows),) when ``rows`` is given.
        rows: which rows of the stacks the dataset holds (default all); no copy is made.
    """

    def __init__(self, stacks: Sequence[torch.Tensor], labels, rows: Sequence[int] | None = None):
        n = len(stacks[0]) if stacks else 0
        if any(len(s) != n for s in stacks):
            raise ValueError("every view stack must hold the same images")
        self.rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
        self.stacks = list(stacks)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if len(self.labels) != len(self.rows):
            raise ValueError("labels must be aligned with the rows")

    def __len__(self) -> int:
        return len(self.stacks) * len(self.rows)

    def __getitem__(self, i: int):
        view, n = divmod(i, len(self.rows))
        return self.stacks[view][self.rows[n]], self.labels[n]

    @property
    def nbytes(self) -> int:
        return sum(s.element_size() * s.nelement() for s in self.stacks)
