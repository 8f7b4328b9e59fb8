"""The trunk cache as a ``LightningDataModule`` (extraction, shards, loaders), the same code for one process and DDP.

Lightning's launchers start the other ranks at ``fit()``, so ``setup()`` is the first place that knows rank and world
size (the model not yet wrapped). Each rank extracts only its own shard of the images, so extraction covers the dataset
once whatever the number of ranks, and trains on it (``use_distributed_sampler=False``) in as many steps as the others.
"""

from __future__ import annotations

import time

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from birds_lpft.data.sets import LabelledImages
from birds_lpft.models.net import BirdNet
from birds_lpft.recipe import FinetuneConfig
from birds_lpft.utils.timing import Stopwatch

from finetune.cache import CachedViews, bytes_per_view, cache_views, check_budget, extract_views
from finetune.distributed import shards_by_rank


class TrunkCacheData(L.LightningDataModule):
    """This rank's cached trunk views of ``images`` for stage two, and the centre views stage one needs.

    Every rank is given all of ``images`` and keeps its shard; ``cache_budget`` is the bytes the cache may use on this
    machine (None: no check). After ``setup``: ``train_set``, ``fit_centre`` and ``fit_index`` (this rank's centre
    activations of its images and their indices in ``images``), ``labels``, ``shards`` (each rank's
    image indices), ``cache_bytes`` and ``setup_seconds``. :meth:`from_stacks` builds one from a cache made once for
    many fits (cross-validation's folds).
    """

    def __init__(self, images: LabelledImages | None, net: BirdNet | None, cfg: FinetuneConfig, *,
                 stopwatch: Stopwatch | None = None, cache_budget: int | None = None, progress: bool = True):
        super().__init__()
        self.images = images
        self.net = net
        self.cfg = cfg
        self.sw = stopwatch if stopwatch is not None else Stopwatch()
        self.cache_budget = cache_budget
        self.progress = progress
        self.labels = images.labels if images is not None else None
        self.train_set: CachedViews | None = None
        self.fit_centre: torch.Tensor | None = None
        self.fit_index: np.ndarray | None = None
        self.fit_pooled: torch.Tensor | None = None  # stage one's features of the fit images, if given
        self.shards: list[list[int]] = []
        self.samples_per_epoch: int | None = None
        self.planned_bytes = 0
        self.setup_seconds = 0.0
        self.pin_memory = False
        self.member = 0  # the ensemble member the next fit trains: its own data order

    @classmethod
    def from_stacks(cls, labels: np.ndarray, centre: torch.Tensor, views: list[torch.Tensor], rows: np.ndarray,
                    cfg: FinetuneConfig, pooled: torch.Tensor | None = None) -> TrunkCacheData:
        """Train on ``rows`` of stacks cached for every image (no copy).

        ``pooled``: stage one's (N, F) features of every image's centre view (``finetune.stage_one.pooled_from_trunk``
        with the network this data trains), when the caller computed them once for many fits.
        """
        data = cls(None, None, cfg, progress=False)
        data.labels = labels
        data.train_set = CachedViews([centre, *views], labels[rows], rows=rows)
        data.fit_index = np.asarray(rows)
        if pooled is None:
            data.fit_centre = centre[torch.as_tensor(rows)]
        else:  # stage one needs only the features: no copy of the fit images' activations
            if len(pooled) != len(centre):
                raise ValueError(f"pooled features for {len(pooled)} images, but the cache holds {len(centre)}")
            data.fit_pooled = pooled[torch.as_tensor(rows)]
        data.shards = [sorted(int(r) for r in rows)]
        return data

    @property
    def cache_bytes(self) -> int:
        """The bytes this rank's cache holds (0 before ``setup``)."""
        return self.train_set.nbytes if self.train_set is not None else 0

    def setup(self, stage: str) -> None:
        if self.train_set is not None:  # fit() calls it again for each ensemble member, and from_stacks is ready
            return
        start = time.perf_counter()
        trainer = self.trainer
        assert trainer is not None  # Lightning's fit attaches it before setup
        # Only from_stacks leaves these None, and its train_set is ready.
        assert self.images is not None and self.net is not None and self.labels is not None
        rank = trainer.global_rank
        world = trainer.world_size
        shard = np.arange(len(self.images))[rank::world]
        device = trainer.strategy.root_device
        self.net.to(device).eval()  # extraction sees the eval network; LPFTModule.on_train_start sets training mode
        cache_device = self._cache_device(device, len(shard), trainer.num_devices)
        views = cache_views(self.cfg.data_config(), self.cfg, rank)
        planned = len(shard) * len(views)
        with self.sw("trunk cache"):  # one pass: each image decoded once for its centre and augmented views
            stacks = extract_views(self.net, self.images.subset(shard), views, self.cfg, progress=self.progress,
                                   device=device, out_device=cache_device, echo=True,
                                   first_batch=lambda n, s: self._cost(planned, n, s))
        self.fit_centre = stacks[0]
        self.fit_index = shard
        self.train_set = CachedViews(stacks, self.labels[shard])
        self.shards = shards_by_rank(trainer, shard)
        # DDP needs the same number of steps on every rank: each draws as many samples as the smallest shard.
        self.samples_per_epoch = None if world == 1 else min(map(len, self.shards))
        self.pin_memory = device.type == "cuda" and cache_device.type == "cpu"
        self.setup_seconds = time.perf_counter() - start

    def _cost(self, views: int, n: int, seconds: float) -> None:
        """The cost up front, on rank 0: the cache's size and, from the first batch, its extraction time."""
        assert self.trainer is not None  # called from setup
        if self.trainer.is_global_zero:
            rate = n / max(seconds, 1e-9)
            print(f"trunk cache: {self.planned_bytes / 2**20:.1f} MiB for {views} image views at "
                  f"{self.cfg.image_size} px; first batch {rate:.1f} views/s, so about {views / rate:.0f} s to "
                  "extract", flush=True)

    def _cache_device(self, device: torch.device, n_images: int, ranks_here: int) -> torch.device:
        """Where the cache goes: an accelerator's memory when it takes at most half of what is free there
        (no copy per batch; the rest is for training), else this machine's RAM, within the budget."""
        assert self.net is not None  # called from setup, which has the network
        nbytes = n_images * (self.cfg.views + 1) * bytes_per_view(self.net, self.cfg)  # centres + views
        self.planned_bytes = nbytes
        if device.type == "cuda" and nbytes <= 0.5 * torch.cuda.mem_get_info(device)[0]:
            return device
        check_budget(nbytes, self.cache_budget, images=n_images, views=self.cfg.views + 1,
                     image_size=self.cfg.image_size, ranks_here=ranks_here)
        return torch.device("cpu")

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of cached views, seeded per rank and ensemble member; under DDP an epoch draws
        ``samples_per_epoch``; pinned memory when a CPU cache feeds an accelerator."""
        assert self.train_set is not None and self.trainer is not None  # inside fit, after setup
        generator = torch.Generator().manual_seed(self.cfg.seed + self.trainer.global_rank + 1000 * self.member)
        sampler = RandomSampler(self.train_set, num_samples=self.samples_per_epoch, generator=generator)
        # The loader draws a base seed per epoch from the same generator, before the sampler's shuffle, as
        # DataLoader(shuffle=True, generator=...) does: passing it keeps every recipe's batches, and so its model.
        return DataLoader(self.train_set, batch_size=self.cfg.batch_size, sampler=sampler, generator=generator,
                          pin_memory=self.pin_memory)
