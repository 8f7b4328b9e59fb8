"""What cross-validation holds for every fold and candidate of one trunk setting: the trunk cache of every training
image's views (:func:`build_cache`), and the held-out logits read off it through ``classify``'s own forward after the
trunk (``birds_lpft.predict.top_logits``) and flip TTA average (:func:`tta_logits`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from birds_lpft.data.sets import LabelledImages
from birds_lpft.extract import autocast
from birds_lpft.models.net import BirdNet
from birds_lpft.models.preprocess import Mirrored
from birds_lpft.models.weights import pretrained_net
from birds_lpft.predict import top_logits, tta_mean
from birds_lpft.recipe import FinetuneConfig

from finetune.cache import View, cache_views, extract_views


@dataclass
class TrunkCache:
    """Every training image's cached trunk activations for one trunk setting."""

    net: BirdNet  # the pretrained network the activations came from (trunk and untrained tail)
    centre: torch.Tensor
    mirror: torch.Tensor
    views: list[torch.Tensor]
    seconds: float


def build_cache(images: LabelledImages, cfg: FinetuneConfig, views: int, weights: str, progress: bool,
                weights_kwargs: dict | None = None) -> TrunkCache:
    """Centre, mirrored centre and ``views`` augmented views of every image, with the pretrained network: one pass
    over the images, each decoded once."""
    start = time.perf_counter()
    net = pretrained_net(replace(cfg, members=1).net_config(images.num_classes), weights, **(weights_kwargs or {}))
    data_cfg = cfg.data_config()
    centre, *augmented = cache_views(data_cfg, replace(cfg, views=views))
    plan = [centre, View("mirrored centre", Mirrored(centre.transform)), *augmented]
    stacks = dict(zip((v.name for v in plan), extract_views(net, images, plan, cfg, progress=progress), strict=True))
    return TrunkCache(net, stacks["centre view"], stacks["mirrored centre"], [stacks[v.name] for v in augmented],
                      time.perf_counter() - start)


@torch.inference_mode()
def held_out_logits(net: BirdNet, cache: TrunkCache, rows: np.ndarray, cfg: FinetuneConfig) -> torch.Tensor:
    """(2, tops, N, K) logits of the centre view and its mirror, per top of ``net``, of cached rows, in
    ``classify``'s precision."""
    net.eval()
    out: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for i in range(0, len(rows), 64):
        batch = torch.as_tensor(rows[i:i + 64])
        with autocast(cfg.precision):
            for acc, stack in zip(out, (cache.centre, cache.mirror), strict=True):
                acc.append(top_logits(net, stack[batch]))
    return torch.stack([torch.cat(parts, dim=1) for parts in out])


def tta_logits(logits: torch.Tensor, flip: bool, member: int | None = None) -> torch.Tensor:
    """(N, K) logits of the centre view (and its mirror when ``flip``), of every top averaged (as the network's
    forward does) or of ``member`` alone, averaged as ``classify`` averages them."""
    views = logits[: 2 if flip else 1]  # (F, tops, N, K)
    return tta_mean(views.mean(1) if member is None else views[:, member])
