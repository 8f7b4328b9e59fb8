"""Any pretrained backbone by name: torchvision's classification zoo, and timm's models as ``timm/NAME``.

A name resolves to a :class:`BackboneSpec` derived from the model itself, never from a per-model table: its
family's block layout, one dry forward pass for the width, total stride and default split, and the
preprocessing its weights define. timm is imported only for a ``timm/`` name.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torchvision import models

TIMM = "timm/"
# torchvision families whose blocks are their ``features``, by name prefix.
FEATURES = ("mobilenet_", "efficientnet_", "convnext_")
FAMILIES = "MobileNet, EfficientNet, ConvNeXt, MNASNet, ResNet, ResNeXt, Wide-ResNet, RegNet"
# The weights provisioned offline for MobileNetV2 (its DEFAULT, IMAGENET1K_V2, is another file).
PINNED = {"mobilenet_v2": "IMAGENET1K_V1"}
KNOWN_SHA256 = {"mobilenet_v2-b0353104.pth": "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"}
PROBE_SIDE = 64  # the dry forward's input side: small, and a multiple of every family's total stride


def name_sha256_prefix(file_name: str) -> str | None:
    """The first hex digits of its sha256 that a torchvision weights file's name carries (``name-7f5810bc.pth``)."""
    found = re.search(r"-([0-9a-f]{6,})\.", file_name)
    return found.group(1) if found else None


@dataclass(frozen=True)
class BackboneSpec:
    """How to build, split and feed one backbone, derived from the model itself.

    Attributes:
        width: channels of the last block's output: the pooled feature width.
        num_blocks, default_split: trunk = blocks[:split], tail = blocks[split:]; the default is the first block
            at the final resolution, so the tail is the last stage or two.
        min_image_size: the total stride, so the last block still sees one pixel.
        data: the weights' preprocessing: image_size, resize_size, mean, std, interpolation.
        url, sha256, hub_id: the download (None for timm's hub, ``hub_id``) and the full hash where known.
    """

    name: str
    width: int
    num_blocks: int
    default_split: int
    min_image_size: int
    data: dict
    weights_file: str
    url: str | None
    sha256: str | None
    hub_id: str | None = None

    @property
    def sha256_prefix(self) -> str | None:
        return name_sha256_prefix(self.weights_file or "")

    def build(self) -> nn.Module:
        """The model with random weights: never downloads."""
        return build_model(self.name)

    def blocks(self, model: nn.Module) -> nn.Sequential:
        return blocks_of(self.name, model)


def build_model(name: str, **kwargs) -> nn.Module:
    if name.startswith(TIMM):
        return _timm().create_model(name[len(TIMM):], pretrained=False, **kwargs)
    return models.get_model(name, weights=None)


def blocks_of(name: str, model: nn.Module) -> nn.Sequential:
    """The model's feature blocks in the order its forward runs them (the very modules, not copies)."""
    if name.startswith(TIMM):
        return _timm_blocks(model)
    return _family(name)(model)


def source_head_of(name: str, model: nn.Module) -> nn.Module:
    """The model's own pretrained classifier as it runs after the blocks: (B, F, h, w) maps -> the pretraining
    classes' logits, from the very modules of ``model`` (torchvision: ``fc`` or ``classifier`` behind average
    pooling; timm: the children after its blocks)."""
    if name.startswith(TIMM):
        head = set(_TIMM_HEAD) | {cast(dict, model.pretrained_cfg).get("classifier", "")}
        children = list(model.named_children())
        first = next(i for i, (child, _) in enumerate(children) if child in head)
        return nn.Sequential(*(module for _, module in children[first:]))
    classifier = cast(nn.Module, model.fc if hasattr(model, "fc") else model.classifier)
    flatten = [] if any(isinstance(m, nn.Flatten) for m in classifier.modules()) else [nn.Flatten(1)]
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), *flatten, classifier)


def _family(name: str) -> Callable[[Any], nn.Sequential]:
    # Any: each family's blocks are reached by its own attribute names (``features``, ``layer1``, ...)
    if name.startswith(FEATURES):
        return lambda m: m.features
    if name.startswith("mnasnet"):
        return lambda m: m.layers
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return lambda m: nn.Sequential(nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool), m.layer1, m.layer2,
                                       m.layer3, m.layer4)
    if name.startswith("regnet_"):
        return lambda m: nn.Sequential(m.stem, *m.trunk_output)
    raise ValueError(f"backbone {name!r}: its structure is not one this project splits into trunk and tail; "
                     f"use a torchvision {FAMILIES} model, or a timm CNN as timm/NAME")


# timm's modules after forward_features: pooling and the classifier head, under their usual names.
_TIMM_HEAD = ("global_pool", "head", "head_drop", "fc", "classifier", "flatten", "pre_logits", "conv_head_pool")
_TIMM_STAGES = ("blocks", "stages", "layers", "features")


def _timm_blocks(model: nn.Module) -> nn.Sequential:
    """The children before the pooling/head, with a stage container's stages as blocks of their own."""
    head = set(_TIMM_HEAD) | {cast(dict, model.pretrained_cfg).get("classifier", "")}
    blocks = []
    for name, child in model.named_children():
        if name in head:
            break
        blocks += list(child) if name in _TIMM_STAGES and isinstance(child, nn.Sequential) else [child]
    return nn.Sequential(*blocks)


def _timm():
    try:
        import timm
    except ModuleNotFoundError:
        raise ValueError("timm/ backbones need timm: pip install timm (or the project's [timm] extra)") from None
    return timm


# Every spec derived so far in this process, by name (tests may put their own here).
BACKBONES: dict[str, BackboneSpec] = {}


def get_spec(name: str) -> BackboneSpec:
    """The spec of backbone ``name``, derived once per process on the meta device: shapes only, so asking costs
    no memory and never changes a seeded run.

    Raises:
        ValueError: an unknown name, a model this project cannot split, or timm missing for a timm/ name.
    """
    if name not in BACKBONES:
        BACKBONES[name] = _derive(name)
    return BACKBONES[name]


def _derive(name: str) -> BackboneSpec:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a backbone is a torchvision model name or timm/NAME, got {name!r}")
    if not name.startswith(TIMM):
        if name not in models.list_models(module=models):
            raise ValueError(f"unknown backbone {name!r}: not a torchvision classification model "
                             f"(torchvision.models.list_models()); for timm write timm/NAME")
        _family(name)  # an unsupported family is refused by its name, before anything is built
    timm_module = _timm() if name.startswith(TIMM) else None  # a missing timm: its own message
    try:
        model, (sides, width) = _shapes(name, PROBE_SIDE)
    except Exception as err:  # noqa: BLE001 - timm's unknown names and models that are no CNN fail many ways
        raise ValueError(f"backbone {name!r} cannot be used here ({type(err).__name__}: {_line(err)}); use a "
                         f"torchvision {FAMILIES} model, or a timm CNN as timm/NAME") from None
    final = sides[-1]
    default_split = next(i for i, side in enumerate(sides) if side == final)
    weights = _timm_weights(timm_module, model) if timm_module is not None else _weights_info(name)
    return BackboneSpec(name, width, len(sides), default_split, PROBE_SIDE // final, **weights)


def _line(err: Exception) -> str:
    """An exception's message as one short line."""
    return " ".join(str(err).split())[:200]


@functools.lru_cache(maxsize=256)
def input_problem(name: str, image_size: int) -> str | None:
    """Why ``name``'s blocks cannot run on an ``image_size`` input (a model fixed to its own size, say), else
    None; a dry forward pass on the meta device."""
    try:
        _shapes(name, image_size)
    except Exception as err:  # noqa: BLE001 - whatever the model raises for an input it cannot take
        return f"{name} cannot run at {image_size} px ({type(err).__name__}: {_line(err)})"
    return None


def _shapes(name: str, side: int) -> tuple[nn.Module, tuple[list[int], int]]:
    """The model and :func:`_dry_run` of its blocks, built on the meta device. A model whose constructor
    computes with tensors (torchvision's RegNet) cannot be built there: it is built for real, its draws undone."""
    try:
        with torch.device("meta"):
            model = build_model(name)
            return model, _dry_run(blocks_of(name, model).eval(), side)
    except NotImplementedError as err:
        if "meta" not in str(err):
            raise
    with torch.random.fork_rng(devices=[]):
        model = build_model(name)
        return model, _dry_run(blocks_of(name, model).eval(), side)


@torch.no_grad()
def _dry_run(blocks: nn.Sequential, side: int) -> tuple[list[int], int]:
    """(spatial side after each block, channels of the last) for a ``side`` input; every block must give the
    image maps (B, C, H, W) the trunk cache holds and the pooling reads."""
    x = torch.zeros(1, 3, side, side)
    sides = []
    for block in blocks:
        x = block(x)
        if x.ndim != 4:
            raise ValueError(f"a block gives {tuple(x.shape)}, not image maps (B, C, H, W)")
        sides.append(int(x.shape[-1]))
    return sides, int(x.shape[1])


def _weights_info(name: str) -> dict:
    """The torchvision weights' preprocessing and file: the project's pinned entry, else the model's DEFAULT."""
    enum = models.get_model_weights(name)
    entry = enum[PINNED[name]] if name in PINNED else enum.DEFAULT
    t = entry.transforms()
    data = {"image_size": int(t.crop_size[0]), "resize_size": int(t.resize_size[0]),
            "mean": tuple(float(v) for v in t.mean), "std": tuple(float(v) for v in t.std),
            "interpolation": t.interpolation.value}
    filename = entry.url.rsplit("/", 1)[-1]
    return {"data": data, "weights_file": filename, "url": entry.url, "sha256": KNOWN_SHA256.get(filename)}


def _timm_weights(timm, model: nn.Module) -> dict:
    cfg = timm.data.resolve_model_data_config(model)
    size = int(cfg["input_size"][-1])
    data = {"image_size": size, "resize_size": int(round(size / cfg["crop_pct"])),
            "mean": tuple(float(v) for v in cfg["mean"]), "std": tuple(float(v) for v in cfg["std"]),
            "interpolation": str(cfg["interpolation"])}
    pretrained = cast(dict, model.pretrained_cfg)  # timm's record of the weights, a plain attribute
    url = pretrained.get("url") or None
    hub_id = pretrained.get("hf_hub_id") or None
    # Weights on timm's hub have no file name of their own: the cache names them after the hub id.
    filename = url.rsplit("/", 1)[-1] if url else f"{(hub_id or 'timm').replace('/', '--')}.safetensors"
    return {"data": data, "weights_file": filename, "url": url, "sha256": None, "hub_id": hub_id}
