"""The shipped model: a :class:`Classifier` (network + preprocessing + species names) and its checkpoint file.

A checkpoint is a plain dict: the state dict plus the configs that rebuild the network and its
preprocessing. Loading never downloads (the backbone is built with random weights, then the state dict
overwrites them) and uses ``torch.load(..., weights_only=True)``, so an untrusted file cannot run code.
Every field is checked before the network is built, so a crafted file fails with a ``ValueError`` naming
it, and cannot make the loader allocate what its config claims.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
from torch import nn
from torchvision.transforms import InterpolationMode

from birds_lpft.data.sets import LabelledImages, Source
from birds_lpft.models.net import BirdNet, NetConfig, build_net, get_spec
from birds_lpft.models.preprocess import DataConfig
from birds_lpft.predict import Predictions, predict_logits
from birds_lpft.utils.outputs import atomic_write

FORMAT = "birds-lpft/2"
READABLE_FORMATS = ("birds-lpft/1", FORMAT)  # 1: before pooling and class names were stored
MAX_CLASSES = 100_000
MAX_IMAGE_SIZE = 2048
MAX_MEMBERS = 16
MAX_TTA_CROPS = 8


class Classifier(nn.Module):
    """A trained :class:`BirdNet` with everything needed to predict: its config, preprocessing and names.

    Args:
        net: the network (trunk, tail, head).
        net_cfg: rebuilds ``net``'s architecture.
        data_cfg: the preprocessing ``net`` was trained with.
        tta_flip: average the logits of each image and its mirror.
        class_names: one name per class id (None: the ids themselves).
        tta_crops: more centre crops to average over, as shares of the shorter side
            (``FinetuneConfig.tta_crops``).
        recipe: the ``FinetuneConfig`` fields that trained it (plain values), so a grader file built for this
            model trains the same recipe; None for checkpoints written before it was stored.
    """

    def __init__(self, net: BirdNet, net_cfg: NetConfig, data_cfg: DataConfig, tta_flip: bool,
                 class_names: Sequence[str] | None = None, tta_crops: Sequence[float] = (),
                 recipe: dict | None = None):
        super().__init__()
        self.recipe = recipe
        self.net = net
        self.net_cfg = net_cfg
        self.data_cfg = data_cfg
        self.tta_flip = tta_flip
        self.tta_crops = tuple(float(c) for c in tta_crops)
        self.class_names = tuple(class_names) if class_names is not None else None

    def name_of(self, class_id: int) -> str:
        return self.class_names[class_id] if self.class_names is not None else str(class_id)

    def predict_logits(self, sources: Sequence[Source], names: Sequence[str], *, precision: str = "auto",
                       progress: bool = False) -> Predictions:
        """Logits (N, K) and the unreadable files; each of those gets a warning and a guess."""
        return predict_logits(self.net, sources, names, self.data_cfg, tta_flip=self.tta_flip,
                              tta_crops=self.tta_crops, precision=precision, progress=progress)

    def predict(self, sources: Sequence[Source], names: Sequence[str], *, precision: str = "auto",
                progress: bool = False) -> np.ndarray:
        """(N,) predicted class ids, in order."""
        return self.predict_logits(sources, names, precision=precision, progress=progress).logits.argmax(1).numpy()

    def evaluate(self, images: LabelledImages, *, precision: str = "auto", progress: bool = False) -> dict:
        """Probabilities (N, K), predictions (N,) and accuracy on a labelled set: the one evaluation the CLIs,
        tools and benchmark share."""
        probs = torch.softmax(self.predict_logits(images.sources, images.names, precision=precision,
                                                  progress=progress).logits, dim=1).numpy()
        predicted = probs.argmax(1)
        accuracy = float(np.mean(predicted == images.labels))
        return {"probabilities": probs, "predictions": predicted, "accuracy": accuracy}

    def score(self, images: LabelledImages, *, precision: str = "auto", progress: bool = False) -> float:
        """Accuracy on a labelled set (see :meth:`evaluate`)."""
        return self.evaluate(images, precision=precision, progress=progress)["accuracy"]

    def checkpoint(self) -> dict:
        """A plain dict (tensors, str, numbers, lists), loadable with ``weights_only=True``."""
        data = asdict(self.data_cfg)
        data["mean"], data["std"] = list(data["mean"]), list(data["std"])
        return {
            "format": FORMAT,
            "net": asdict(self.net_cfg),
            "data": data,
            "tta_flip": bool(self.tta_flip),
            "tta_crops": list(self.tta_crops),
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "recipe": self.recipe,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the checkpoint atomically (``birds_lpft.utils.outputs.atomic_write``): an interrupted or failed
        save leaves the file that was there before, and two saves racing to one path leave one model whole."""
        with atomic_write(path) as f:
            torch.save(self.checkpoint(), f)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Classifier":
        """Rebuild a classifier (eval mode, CPU) from a checkpoint file.

        Raises:
            ValueError: the file is unreadable, not a checkpoint of this project, or inconsistent; the
                message names the file, what is wrong and how to get a good one.
        """
        ckpt = _read(path)
        net_cfg = _net_config(ckpt, path)
        data_cfg = _data_config(ckpt, path)
        names = ckpt.get("class_names")
        _require(names is None or (isinstance(names, list) and len(names) == net_cfg.num_classes
                                   and all(isinstance(n, str) for n in names)),
                 path, f"'class_names' must be None or {net_cfg.num_classes} strings")
        _require(isinstance(ckpt.get("tta_flip"), bool), path, "'tta_flip' must be true or false")
        crops = ckpt.get("tta_crops", [])  # absent from checkpoints written before multi-crop TTA
        _require(isinstance(crops, list) and len(crops) <= MAX_TTA_CROPS
                 and all(type(c) is float and 0.0 < c <= 1.0 for c in crops), path,
                 f"'tta_crops' must be a list of at most {MAX_TTA_CROPS} floats in (0, 1]")
        recipe = ckpt.get("recipe")  # absent from checkpoints written before the recipe was stored
        _require(recipe is None or _plain(recipe), path, "'recipe' must be None or a dict of plain values")
        net = _restored(net_cfg, ckpt["state_dict"], path)
        return cls(net.eval(), net_cfg, data_cfg, ckpt["tta_flip"], names, crops, recipe).eval()


def _plain(value, depth: int = 0) -> bool:
    """A small tree of str keys and str / number / bool / None / list leaves (what a recipe holds)."""
    if isinstance(value, dict):
        return depth < 3 and len(value) <= 100 and all(isinstance(k, str) and _plain(v, depth + 1)
                                                       for k, v in value.items())
    if isinstance(value, list):
        return len(value) <= 100 and all(_plain(v, depth + 1) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _fix(path) -> str:
    return f"rebuild it with `python -m finetune DATA --out {os.fspath(path)}`"


def _require(ok: bool, path, what: str) -> None:
    if not ok:
        raise ValueError(f"{path}: not a valid checkpoint: {what}; {_fix(path)}.")


def _read(path) -> dict:
    """The checkpoint dict, through ``weights_only=True``; any failure to read it is a ValueError naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file; pass the path of birds_model.pt.") from None
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for garbage, empty or truncated files
        raise ValueError(f"{path}: cannot read this checkpoint ({type(err).__name__}: {err}); {_fix(path)}.") from err
    _require(isinstance(ckpt, dict) and ckpt.get("format") in READABLE_FORMATS, path,
             f"expected a dict with format in {READABLE_FORMATS}")
    _require(isinstance(ckpt.get("state_dict"), dict)
             and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()),
             path, "'state_dict' must map names to tensors")
    return ckpt


def _net_config(ckpt: dict, path) -> NetConfig:
    """The network config, each field's type and range checked against the state dict before any build."""
    cfg = ckpt.get("net")
    _require(isinstance(cfg, dict) and set(cfg) >= {"backbone", "num_classes", "split"}
             and set(cfg) <= {"backbone", "num_classes", "split", "dropout", "pooling", "members"}, path,
             "'net' must hold backbone, num_classes, split[, dropout, pooling, members]")
    _require(isinstance(cfg["backbone"], str) and _known_backbone(cfg["backbone"]), path,
             f"unknown backbone {cfg['backbone']!r} (a timm/ backbone needs timm installed)")
    k = cfg["num_classes"]
    split = cfg["split"]
    _require(type(k) is int and 2 <= k <= MAX_CLASSES, path, f"num_classes must be an int in 2..{MAX_CLASSES}")
    _require(type(split) is int and 0 <= split <= 64, path, "split must be a small non-negative int")
    _require(isinstance(cfg.get("dropout", 0.0), (int, float)) and 0.0 <= cfg.get("dropout", 0.0) < 1.0,
             path, "dropout must be a number in [0, 1)")
    _require(cfg.get("pooling", "avg") in ("avg", "gem"), path, "pooling must be 'avg' or 'gem'")
    members = cfg.get("members", 1)
    _require(type(members) is int and 1 <= members <= MAX_MEMBERS, path, f"members must be an int in 1..{MAX_MEMBERS}")
    head = ckpt["state_dict"].get("head.weight")
    _require(head is not None and head.ndim == 2 and head.shape[0] == k, path,
             f"the state dict's head.weight must have num_classes = {k} rows")
    return NetConfig(**{**cfg, "dropout": float(cfg.get("dropout", 0.0))})  # absent fields: today's defaults


def _known_backbone(name: str) -> bool:
    """Whether ``name`` is a backbone this project can rebuild here (with random weights: no download)."""
    try:
        get_spec(name)
    except Exception:  # noqa: BLE001 - an unknown name, or timm missing or refusing it: all mean "cannot rebuild"
        return False
    return True


def _data_config(ckpt: dict, path) -> DataConfig:
    data = ckpt.get("data")
    _require(isinstance(data, dict) and set(data) == {"image_size", "resize_size", "mean", "std", "interpolation"},
             path, "'data' must hold image_size, resize_size, mean, std, interpolation")
    size = data["image_size"]
    resize = data["resize_size"]
    _require(type(size) is int and type(resize) is int and 1 <= size <= resize <= 2 * MAX_IMAGE_SIZE
             and size <= MAX_IMAGE_SIZE, path, f"image sizes must be ints with 1 <= image_size <= resize_size, "
             f"image_size <= {MAX_IMAGE_SIZE}")
    for key in ("mean", "std"):
        v = data[key]
        _require(isinstance(v, (list, tuple)) and len(v) == 3
                 and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
                 and (key == "mean" or all(x > 0 for x in v)), path, f"{key} must be 3 finite numbers (std > 0)")
    _require(isinstance(data["interpolation"], str) and data["interpolation"] in {m.value for m in InterpolationMode},
             path, "unknown interpolation")
    return DataConfig(size, resize, tuple(float(x) for x in data["mean"]), tuple(float(x) for x in data["std"]),
                      data["interpolation"])


def _restored(net_cfg: NetConfig, state_dict: dict, path) -> BirdNet:
    try:
        net = build_net(net_cfg)
        net.load_state_dict(state_dict)
    except (RuntimeError, ValueError) as err:  # missing, unexpected or mis-shaped tensors; a bad split
        raise ValueError(f"{path}: the state dict does not fit its config ({str(err)[:300]}); {_fix(path)}.") from err
    return net
