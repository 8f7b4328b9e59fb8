"""Stage one and the trunk cache as a ``LightningDataModule``: the same code for one process and for DDP.

Lightning's launchers start the other ranks at ``fit()``, so whatever runs before it runs in every rank
without knowing its rank. ``setup()`` is the first place that knows rank and world size (the process
group is up, the model not yet wrapped): each rank extracts only its own shard of the images (every view),
so the extraction work is the dataset once whatever the number of ranks; stage one still sees every image
(the pooled features are small and gathered), rank 0 fits the probe and broadcasts it, and every rank
initialises the head from it before the strategy wraps the model. Each rank then trains on its shard
(``use_distributed_sampler=False``), with the same number of steps on every rank.
"""

from __future__ import annotations

import hashlib
import time

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from probe.backbone import BirdNet
from probe.preprocess import DataConfig
from probe.data import LabelledImages, stratified_split
from probe.linear import FittedProbe, fit_probe, init_head_from_probe
from probe.timing import Stopwatch
from finetune.cache import CachedViews, augmented_activations, bytes_per_view, centre_activations, check_budget
from finetune.config import FinetuneConfig


def stage_two_split(labels: np.ndarray, cfg: FinetuneConfig) -> tuple[np.ndarray, np.ndarray]:
    """(fit, validation) indices of stage two: a seeded stratified split, or every image and none."""
    if cfg.val_fraction > 0:
        return stratified_split(labels, cfg.val_fraction, cfg.seed)
    return np.arange(len(labels)), np.array([], dtype=np.int64)


@torch.inference_mode()
def pooled_from_trunk(net: BirdNet, acts: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """(N, F) pooled features from cached trunk activations (N, C, h, w), in fp32 like training."""
    net.eval()
    return torch.cat([net.forward_head(net.forward_tail(acts[i:i + batch_size]), pre_logits=True)
                      for i in range(0, len(acts), batch_size)])


def gather_rows(trainer: L.Trainer, x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (n_r, ...), concatenated in rank order; ``x`` itself in one process."""
    if trainer.world_size == 1:
        return x
    device = trainer.strategy.root_device
    sizes = trainer.strategy.all_gather(torch.tensor([len(x)], device=device)).flatten().tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: len(x)] = x.to(device)
    stacked = trainer.strategy.all_gather(padded)  # (world, max n, ...)
    return torch.cat([stacked[r, :n] for r, n in enumerate(sizes)]).cpu()


def head_digest(net: BirdNet) -> str:
    """A short hash (15 hex digits: it fits an int64) of the head's weights, to show that every rank starts
    from the same probe."""
    data = torch.cat([net.head.weight.detach().flatten(), net.head.bias.detach()]).cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:15]


class TrunkCacheData(L.LightningDataModule):
    """This rank's cached trunk views of ``images``, with the head initialised from stage one's probe.

    Args:
        images: the training set (every rank is given all of it and keeps its shard).
        net: the pretrained network the module trains; its head is set from the probe here.
        cfg, data_cfg: the run's settings and preprocessing.
        stopwatch: receives the stage times (centre view, probe, augmented views).
        cache_budget: bytes the cache may use on this machine (None: no check).
        progress: progress bars and per-step lines.

    After ``setup``: ``fitted`` (the probe), ``shards`` (each rank's image indices), ``cache_bytes`` and
    ``head_digests`` (a hash of each rank's probe-initialised head) describe what happened.
    """

    def __init__(self, images: LabelledImages, net: BirdNet, cfg: FinetuneConfig, data_cfg: DataConfig, *,
                 stopwatch: Stopwatch, cache_budget: int | None = None, progress: bool = True):
        super().__init__()
        self.images, self.net, self.cfg, self.data_cfg = images, net, cfg, data_cfg
        self.sw, self.cache_budget, self.progress = stopwatch, cache_budget, progress
        self.train_set: CachedViews | None = None
        self.val_set: CachedViews | None = None
        self.fitted: FittedProbe | None = None
        self.shards: list[list[int]] = []
        self.samples_per_epoch: int | None = None
        self.cache_bytes, self.setup_seconds, self.head_digests, self.pin_memory = 0, 0.0, [], False
        self.member = 0  # the ensemble member the next fit trains: its own data order

    def setup(self, stage: str) -> None:
        if self.train_set is not None:  # fit() may call it again (e.g. a second fit on the same data)
            return
        start, trainer = time.perf_counter(), self.trainer
        rank, world = trainer.global_rank, trainer.world_size
        fit_idx, val_idx = stage_two_split(self.images.labels, self.cfg)
        shard = np.arange(len(self.images))[rank::world]
        shard_fit = np.intersect1d(shard, fit_idx)
        device = trainer.strategy.root_device
        self.net.to(device).eval()  # extraction and the probe see the eval network; training mode is set again
        #                              in LPFTModule.on_train_start
        cache_device = self._cache_device(device, len(shard), len(shard_fit), trainer.num_devices)
        kwargs = dict(progress=self.progress, device=device, out_device=cache_device, echo=True)
        with self.sw("centre view"):
            centre = centre_activations(self.net, self.images.subset(shard), self.data_cfg, self.cfg, **kwargs)
        with self.sw("probe"):
            self._stage_one(trainer, centre, shard, fit_idx)
        with self.sw("augmented views"):
            views = augmented_activations(self.net, self.images.subset(shard_fit), self.data_cfg, self.cfg,
                                          rank=rank, **kwargs)
        self._datasets(trainer, centre, views, shard, shard_fit, val_idx)
        self.shards = shards_by_rank(trainer, shard)
        self.pin_memory = device.type == "cuda" and cache_device.type == "cpu"
        self.setup_seconds = time.perf_counter() - start

    def _cache_device(self, device: torch.device, n_images: int, n_fit: int, ranks_here: int) -> torch.device:
        """Where the cache goes: an accelerator's memory when it takes at most half of what is free there
        (no copy per batch; the rest is for training), else this machine's RAM, within the budget."""
        nbytes = (n_images + n_fit * self.cfg.views) * bytes_per_view(self.net, self.cfg)  # centres + views
        if device.type == "cuda" and nbytes <= 0.5 * torch.cuda.mem_get_info(device)[0]:
            return device
        check_budget(nbytes, self.cache_budget, images=n_images, views=self.cfg.views + 1,
                     image_size=self.cfg.image_size, ranks_here=ranks_here)
        return torch.device("cpu")

    def _stage_one(self, trainer: L.Trainer, centre: torch.Tensor, shard: np.ndarray, fit_idx: np.ndarray) -> None:
        """Pooled features of every fit image (gathered from all ranks), one probe fit on rank 0, broadcast."""
        mine = np.isin(shard, fit_idx)
        fit_centre = centre if mine.all() else centre[torch.as_tensor(mine, device=centre.device)]
        features = pooled_from_trunk(self.net, fit_centre).float()
        index = gather_rows(trainer, torch.as_tensor(shard[mine]))
        features = gather_rows(trainer, features)
        fitted = None
        if trainer.is_global_zero:
            order = torch.argsort(index).cpu().numpy()  # the global image order, whatever the shards
            X, y = features.cpu().numpy()[order], self.images.labels[index.cpu().numpy()[order]]
            fitted = fit_probe(X, y, self.cfg.probe, self.cfg.seed)
        self.fitted = trainer.strategy.broadcast(fitted, src=0)
        for i in range(self.net.members):
            init_head_from_probe(self.net.member(i).head, self.fitted.probe)
        mine = torch.tensor([int(head_digest(self.net), 16)])  # each rank hashes its own head
        self.head_digests = [f"{v:015x}" for v in gather_rows(trainer, mine).tolist()]

    def _datasets(self, trainer: L.Trainer, centre: torch.Tensor, views: list[torch.Tensor], shard: np.ndarray,
                  shard_fit: np.ndarray, val_idx: np.ndarray) -> None:
        labels = self.images.labels
        fit_rows = np.flatnonzero(np.isin(shard, shard_fit))
        fit_centre = centre if len(fit_rows) == len(centre) else centre[torch.as_tensor(fit_rows)]
        self.train_set = CachedViews([fit_centre, *views], labels[shard_fit])
        val_rows = np.flatnonzero(np.isin(shard, val_idx))
        sizes = gather_rows(trainer, torch.tensor([[len(self.train_set), len(val_rows)]])).tolist()
        if min(v for _, v in sizes) > 0:  # a rank without validation images would leave the others waiting
            self.val_set = CachedViews([centre[torch.as_tensor(val_rows)]], labels[shard[val_rows]])
        self.cache_bytes = self.train_set.nbytes + (self.val_set.nbytes if self.val_set else 0)
        # DDP needs the same number of steps on every rank: each draws as many samples as the smallest shard.
        self.samples_per_epoch = None if trainer.world_size == 1 else min(t for t, _ in sizes)

    def train_dataloader(self) -> DataLoader:
        return cached_loader(self.train_set, self.cfg, self.trainer.global_rank, self.samples_per_epoch, self.member,
                             self.pin_memory)

    def val_dataloader(self) -> DataLoader | list:
        return val_loader_of(self.val_set) if self.val_set is not None else []


def cached_loader(train_set: CachedViews, cfg: FinetuneConfig, rank: int = 0, samples_per_epoch: int | None = None,
                  member: int = 0, pin_memory: bool = False) -> DataLoader:
    """Shuffled batches of cached views, seeded per rank and ensemble member; ``samples_per_epoch`` caps an
    epoch (None: all); ``pin_memory`` when a CPU cache feeds an accelerator."""
    generator = torch.Generator().manual_seed(cfg.seed + rank + 1000 * member)
    sampler = RandomSampler(train_set, num_samples=samples_per_epoch, generator=generator)
    # The loader draws from the same generator too (a base seed per epoch, before the sampler's shuffle), as
    # DataLoader(shuffle=True, generator=...) does: one process draws exactly the batches the v1 recipe did.
    return DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, generator=generator,
                      pin_memory=pin_memory)


def val_loader_of(val_set: CachedViews) -> DataLoader:
    """Cached validation views in order, in batches of 64 (no gradients: larger batches than training)."""
    return DataLoader(val_set, batch_size=64)


def shards_by_rank(trainer: L.Trainer, shard: np.ndarray) -> list[list[int]]:
    """Each rank's extracted image indices, as the ranks themselves report them ((rank, index) pairs)."""
    pairs = torch.stack([torch.full((len(shard),), trainer.global_rank), torch.as_tensor(shard)], 1)
    pairs = gather_rows(trainer, pairs).numpy()
    return [sorted(pairs[pairs[:, 0] == r, 1].tolist()) for r in range(trainer.world_size)]
