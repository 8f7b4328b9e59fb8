"""The trunk cache: frozen-trunk activations of several augmented views per image, computed once, in RAM.

The frozen trunk's output for a given augmented image never changes, so caching it makes every epoch a tail pass
instead of a whole-network pass. :func:`check_budget` runs before any extraction, so that a cache that cannot fit stops
the run at once with the ways out, instead of it being killed half-way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from birds_lpft.data.images import as_data_error, open_rgb_many
from birds_lpft.data.sets import LabelledImages
from birds_lpft.extract import extract
from birds_lpft.models.net import BirdNet, trunk_bytes
from birds_lpft.models.preprocess import DataConfig, EvalTransform, TrainTransform
from birds_lpft.recipe import FinetuneConfig

# Default budget: this share of MemAvailable at the start; the rest is for the libraries, the network, the optimiser
# and the batches in flight.
DEFAULT_BUDGET_SHARE = 0.6


class CacheBudgetError(RuntimeError):
    """The trunk cache would not fit in its memory budget; the message gives the figure and the ways out."""


@dataclass(frozen=True)
class View:
    """One cached view of every image: its transform and, for a random one, its stream's seed (None: deterministic)."""

    name: str
    transform: Callable
    seed: int | None = None


def cache_views(data_cfg: DataConfig, cfg: FinetuneConfig, rank: int = 0) -> list[View]:
    """What stage two caches: the centre view (the one ``classify`` sees), then ``cfg.views`` augmented views,
    each seeded on its own (and per rank, so a sharded run's ranks draw differently)."""
    train = TrainTransform(data_cfg, scale=cfg.crop_scale, jitter=cfg.jitter)
    return [View("centre view", EvalTransform(data_cfg))] + [
        View(f"view {v + 1}/{cfg.views}", train, cfg.seed * 1000 + v + 7919 * rank) for v in range(cfg.views)]


def _stream(seed: int) -> torch.Tensor:
    """The state a random view's stream starts from: ``torch.manual_seed(seed)``, then the int64 a DataLoader
    iterator draws for its base seed, so the cache is bit-identical to one DataLoader pass per view."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.empty((), dtype=torch.int64).random_()
        return torch.get_rng_state()


class ViewBatches:
    """One pass over the images for every view, as ``(x, index, k)``: x the (B, 3, S, S) inputs of view k for the
    images ``index``. Each batch is decoded once for all views, whose batches are then made one at a time, so only
    one view's floats are held at once.

    torchvision's random transforms draw from torch's global generator and take none of their own, so each random
    view's stream state is swapped in for its draws and saved after; the global generator is left as it was. Each
    stream restarts with every pass, so two passes give the same batches.
    """

    def __init__(self, images: LabelledImages, views: Sequence[View], batch_size: int):
        self.dataset = images  # ``birds_lpft.extract.extract`` counts the images as a DataLoader's
        self.views = list(views)
        self.batch_size = batch_size
        self.sides = [getattr(v.transform, "min_side", None) for v in self.views]

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size) * len(self.views)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        streams = {k: _stream(v.seed) for k, v in enumerate(self.views) if v.seed is not None}
        n = len(self.dataset)
        for start in range(0, n, self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, n))
            decoded = [(i, self._decoded(i)) for i in index.tolist()]
            for k in range(len(self.views)):
                yield torch.stack([self._view(k, img[k], i, streams) for i, img in decoded]), index, k

    def _decoded(self, i: int) -> list:
        try:
            return open_rgb_many(self.dataset.sources[i], self.dataset.names[i], self.sides)
        except Exception as err:  # noqa: BLE001 - never a BaseException: KeyboardInterrupt still stops the run
            raise as_data_error(err, self.dataset.names[i]) from err

    def _view(self, k: int, img, i: int, streams: dict) -> torch.Tensor:
        try:
            if k not in streams:
                return self.views[k].transform(img)
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(streams[k])
                try:
                    return self.views[k].transform(img)
                finally:
                    streams[k] = torch.get_rng_state()
        except Exception as err:  # noqa: BLE001 - as in ``_decoded``
            raise as_data_error(err, self.dataset.names[i]) from err


def extract_views(net: BirdNet, images: LabelledImages, views: Sequence[View], cfg: FinetuneConfig,
                  **extract_kwargs) -> list[torch.Tensor]:
    """One (N, C, h, w) stack of trunk activations per view, in ``cfg.cache_dtype``, from one pass over the images
    (:class:`ViewBatches`), a thread making the next view's batch meanwhile (the same numbers). ``extract_kwargs``
    go to ``birds_lpft.extract.extract`` (``desc``, ``progress``, ``device``, ``out_device``, ``echo``, ...)."""
    dtype = getattr(torch, cfg.cache_dtype)
    if len(images) == 0:
        return [torch.empty(0, dtype=dtype, device=extract_kwargs.get("out_device", "cpu")) for _ in views]
    kwargs = {"desc": "trunk cache", "prefetch": True, **extract_kwargs}
    batches = ViewBatches(images, views, cfg.extract_batch_size)
    return extract(net.forward_trunk, batches, precision=cfg.precision, out_dtype=dtype, **kwargs)


def bytes_per_view(net: BirdNet, cfg: FinetuneConfig) -> int:
    """Cache bytes of one view of one image: the trunk's output at ``cfg.image_size`` in the cache dtype."""
    return trunk_bytes(net, cfg.image_size, getattr(torch, cfg.cache_dtype))


def parse_size(text: str) -> int:
    """'6GiB', '6G', '512MB', '123456' -> bytes (binary units either way)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 6GiB, 512M or a number of bytes")
    return int(float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper()))


def default_budget() -> int | None:
    """``DEFAULT_BUDGET_SHARE`` of the bytes the kernel says can be allocated now without swapping (MemAvailable),
    or None (no check) where that is unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return int(available * DEFAULT_BUDGET_SHARE)


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

    ``stacks`` are (N, C, h, w), one per view, row n of each the same image; ``rows`` picks the rows held, without a
    copy (default all), and ``labels`` are aligned with them.
    """

    def __init__(self, stacks: Sequence[torch.Tensor], labels, rows: Sequence[int] | np.ndarray | None = None):
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
