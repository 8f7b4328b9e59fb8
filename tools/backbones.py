"""``python -m tools.backbones [NAME ...] [field=value ...]``: what each backbone costs on this machine, before
a user fetches its weights: random initialisation (speed and memory are the shape's; accuracy means nothing).

For each backbone, at the fine-tune's settings (the ``full`` preset's input size, views, batch sizes and
precision, at the backbone's default split, or ``split=N``):

- **extraction views/s**: the cache's own extraction (``finetune.cache.extract_views``: decode once, the
  centre and augmented presets, the trunk) over generated 500x375 JPEG photos;
- **tail views/s**: bare tail training steps (``tools.tail_speed.tail_step``);
- **cache MiB per 1,000 images**: fp16 trunk activations of 1 + ``views`` views each;
- **images that fit** in 8, 16 and 64 GiB machines: the default cache budget (``DEFAULT_BUDGET_SHARE`` of the
  memory) over one image's cache.

Prints a Markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from birds_lpft.data.sets import LabelledImages
from birds_lpft.models.net import build_net
from birds_lpft.tools.tail_speed import tail_step
from birds_lpft.utils.cli import fail
from birds_lpft.utils.settings import ConfigError

from finetune.cache import DEFAULT_BUDGET_SHARE, bytes_per_view, cache_views, extract_views
from finetune.cli import settings
from finetune.config import FinetuneConfig

TORCHVISION = ("mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_b3", "resnet18", "resnet50",
               "convnext_tiny", "regnet_y_400mf", "efficientnet_v2_s")
TIMM = ("timm/resnet50", "timm/efficientnet_b0")  # default rows only where the [timm] extra is installed
MACHINES_GIB = (8, 16, 64)


def photos(n: int, seed: int = 0) -> LabelledImages:
    """``n`` 500x375 JPEG photos of noise, the size of the assignment's bird photos."""
    rng = np.random.default_rng(seed)
    sources = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        sources.append(buf.getvalue())
    return LabelledImages(tuple(f"{i:04d}.jpg" for i in range(n)), tuple(sources), np.zeros(n, dtype=np.int64), 2)


def for_backbone(overrides: list[str], name: str) -> FinetuneConfig:
    """The ``full`` preset with ``overrides`` on backbone ``name``, read as ``python -m finetune`` reads them
    (``finetune.cli.settings``: the preset's split is kept only for its own backbone or where one is given)."""
    return replace(settings("full", [*overrides, f"backbone={name}"]), members=1)


def costs(cfg: FinetuneConfig, images: LabelledImages) -> dict:
    """One backbone's row (see the module docstring)."""
    name = cfg.backbone
    torch.manual_seed(0)
    net = build_net(cfg.net_config(50)).eval()
    views = cache_views(cfg.data_config(), cfg)
    extract_views(net, images.subset(range(cfg.extract_batch_size)), views, cfg, progress=False)  # warm-up
    start = time.perf_counter()
    extract_views(net, images, views, cfg, progress=False)
    extraction = len(images) * len(views) / (time.perf_counter() - start)
    per_image = bytes_per_view(net, cfg) * len(views)
    return {"backbone": name, "split": cfg.trunk_split, "extraction": extraction,
            "tail": tail_step(net, cfg, 50), "mib_per_1k": 1000 * per_image / 2**20,
            "fits": [int(DEFAULT_BUDGET_SHARE * gib * 2**30 // per_image) for gib in MACHINES_GIB]}


def markdown(rows: list[dict], cfg: FinetuneConfig) -> str:
    head = ("| backbone | split | extraction views/s | tail views/s | cache MiB / 1,000 images | "
            + " | ".join(f"images in {g} GiB" for g in MACHINES_GIB) + " |")
    lines = [head, "|---|---:|---:|---:|---:|" + "---:|" * len(MACHINES_GIB)]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['split']} | {r['extraction']:.1f} | {r['tail']:.1f} | "
                     f"{r['mib_per_1k']:.0f} | " + " | ".join(f"{n:,}" for n in r["fits"]) + " |")
    return (f"{cfg.image_size} px, 1 + {cfg.views} views per image, {cfg.cache_dtype} cache, trunk batch "
            f"{cfg.extract_batch_size}, tail batch {cfg.batch_size}; random initialisation\n\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m tools.backbones", description=__doc__.split("\n")[0])
    p.add_argument("args", nargs="*", help="backbone names (default: a spread of families), field=value overrides")
    p.add_argument("--images", type=int, default=48, help="generated photos timed per backbone")
    a = p.parse_args(argv)
    names = [t for t in a.args if "=" not in t] or [*TORCHVISION, *(TIMM if importlib.util.find_spec("timm") else ())]
    try:
        overrides = [t for t in a.args if "=" in t]
        configs = [for_backbone(overrides, name) for name in names]  # a bad name or value fails now
    except ConfigError as err:
        fail(p.prog, str(err))
    images = photos(a.images)
    rows = []
    for c in configs:
        rows.append(costs(c, images))
        print(f"{c.backbone}: done", flush=True)
    text = markdown(rows, configs[0])
    print(text)
    return text


if __name__ == "__main__":
    main()
