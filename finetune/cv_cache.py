"""What cross-validation holds for every fold and candidate of one trunk setting: the trunk cache of every training
image's views (:func:`build_cache`), and the held-out logits read off it through ``classify``'s own forward after the
trunk (``birds_lpft.predict.top_logits``) and TTA average (:func:`tta_logits`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from birds_lpft.data.sets import LabelledImages
from birds_lpft.extract import autocast
from birds_lpft.models.net import BirdNet
from birds_lpft.models.preprocess import EvalTransform, Mirrored, with_crop_fraction
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
    crops: dict[float, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # TTA crop: (view, mirror)


def build_cache(images: LabelledImages, cfg: FinetuneConfig, views: int, weights: str, progress: bool,
                crops: tuple[float, ...] = (), weights_kwargs: dict | None = None) -> TrunkCache:
    """Centre, mirrored centre and ``views`` augmented views of every image, with the pretrained network, and each
    TTA crop in ``crops`` with its mirror: one pass over the images, each decoded once."""
    start = time.perf_counter()
    net = pretrained_net(replace(cfg, members=1).net_config(images.num_classes), weights, **(weights_kwargs or {}))
    data_cfg = cfg.data_config()
    centre, *augmented = cache_views(data_cfg, replace(cfg, views=views))
    plan = [centre, View("mirrored centre", Mirrored(centre.transform)), *augmented]
    extra_views = [(f"crop {f}", EvalTransform(with_crop_fraction(data_cfg, f))) for f in crops]
    for name, transform in extra_views:
        plan += [View(name, transform), View(f"{name} mirrored", Mirrored(transform))]
    stacks = dict(zip((v.name for v in plan), extract_views(net, images, plan, cfg, progress=progress), strict=True))
    pairs = {name: (stacks[name], stacks[f"{name} mirrored"]) for name, _ in extra_views}
    return TrunkCache(net, stacks["centre view"], stacks["mirrored centre"], [stacks[v.name] for v in augmented],
                      time.perf_counter() - start, {f: pairs[f"crop {f}"] for f in crops})


STANDARD = 0.0  # held_out_logits' key of the standard centre view (whatever crop fraction the weights use)


@torch.inference_mode()
def held_out_logits(net: BirdNet, cache: TrunkCache, rows: np.ndarray,
                    cfg: FinetuneConfig) -> dict[float, torch.Tensor]:
    """{crop fraction: (2, tops, N, K) logits of the view and its mirror, per top of ``net``} of cached rows, in
    ``classify``'s precision, for the standard centre view (key ``STANDARD``) and every cached TTA crop."""
    net.eval()
    stacks = {STANDARD: (cache.centre, cache.mirror), **cache.crops}
    out: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {key: ([], []) for key in stacks}
    for i in range(0, len(rows), 64):
        batch = torch.as_tensor(rows[i:i + 64])
        with autocast(cfg.precision):
            for key, pair in stacks.items():
                for acc, stack in zip(out[key], pair, strict=True):
                    acc.append(top_logits(net, stack[batch]))
    return {key: torch.stack([torch.cat(parts, dim=1) for parts in pair]) for key, pair in out.items()}


def tta_logits(logits: dict[float, torch.Tensor], crops: tuple[float, ...], flip: bool, member: int | None = None):
    """(N, K) logits of the standard view and ``crops`` (and their mirrors when ``flip``), of every top averaged
    (as the network's forward does) or of ``member`` alone, averaged as ``classify`` averages them."""
    views = torch.stack([logits[key] for key in (STANDARD, *crops)], dim=3)[: 2 if flip else 1]  # (F, tops, N, V, K)
    return tta_mean(views.mean(1) if member is None else views[:, member])
