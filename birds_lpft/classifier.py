"""The trained model: a :class:`Classifier` (network, the recipe that made it, species names) and its checkpoint.

A checkpoint is a plain dict: recipe, species names, architecture digest and state dict; everything else derives
from the recipe. Loading never downloads and reads with ``weights_only=True``, so an untrusted file cannot run
code; every field is checked before the network is built, so a crafted file fails with one ``ValueError``.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from birds_lpft.data.sets import LabelledImages, Source
from birds_lpft.models.net import BirdNet, NetConfig, build_net, nonfinite
from birds_lpft.models.preprocess import DataConfig
from birds_lpft.predict import Predictions, predict_logits
from birds_lpft.recipe import PRESETS, FinetuneConfig
from birds_lpft.utils.outputs import atomic_write

FORMAT = "birds-lpft/3"
# Still read: they stored the network's and preprocessing's configs, with or without a recipe (_legacy_recipe).
LEGACY_FORMATS = ("birds-lpft/1", "birds-lpft/2")
MAX_CLASSES = 100_000


class Classifier(nn.Module):
    """A trained :class:`BirdNet` with everything needed to predict.

    Args:
        recipe: the recipe that trained it: the network, preprocessing and prediction views derive from it, and
            a grader file built for this model trains the same recipe.
        class_names: one name per class id (None: the ids themselves).
    """

    def __init__(self, net: BirdNet, recipe: FinetuneConfig, class_names: Sequence[str] | None = None):
        super().__init__()
        self.net = net
        self.recipe = recipe
        self.class_names = tuple(class_names) if class_names is not None else None

    @property
    def num_classes(self) -> int:
        return self.net.head.out_features

    @property
    def net_cfg(self) -> NetConfig:
        return self.recipe.net_config(self.num_classes)

    @property
    def data_cfg(self) -> DataConfig:
        return self.recipe.data_config()

    def name_of(self, class_id: int) -> str:
        return self.class_names[class_id] if self.class_names is not None else str(class_id)

    def predict_logits(self, sources: Sequence[Source], names: Sequence[str], *, precision: str = "auto",
                       progress: bool = False) -> Predictions:
        """Logits (N, K) and the unreadable files; each of those gets a warning and a guess."""
        return predict_logits(self.net, sources, names, self.data_cfg, tta_flip=self.recipe.tta_flip,
                              precision=precision, progress=progress)

    def predict(self, sources: Sequence[Source], names: Sequence[str], *, precision: str = "auto",
                progress: bool = False) -> np.ndarray:
        """(N,) predicted class ids, in order."""
        return self.predict_logits(sources, names, precision=precision, progress=progress).logits.argmax(1).numpy()

    def evaluate(self, images: LabelledImages, *, precision: str = "auto", progress: bool = False) -> dict:
        """Probabilities (N, K), predictions (N,) and accuracy on a labelled set (the one evaluation CLIs share)."""
        probs = torch.softmax(self.predict_logits(images.sources, images.names, precision=precision,
                                                  progress=progress).logits, dim=1).numpy()
        predicted = probs.argmax(1)
        accuracy = float(np.mean(predicted == images.labels))
        return {"probabilities": probs, "predictions": predicted, "accuracy": accuracy}

    def checkpoint(self) -> dict:
        """A plain dict (tensors, str, numbers, lists), loadable with ``weights_only=True``."""
        return {
            "format": FORMAT,
            "recipe": self.recipe.to_dict(),
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "architecture": architecture(self.net),
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the checkpoint atomically: an interrupted or failed save leaves the file that was there
        before, and two saves racing to one path leave one model whole."""
        with atomic_write(path) as f:
            torch.save(self.checkpoint(), f)

    @classmethod
    def load(cls, path: str | os.PathLike, *, allow_nonfinite: bool = False) -> Classifier:
        """Rebuild a classifier (eval mode, CPU) from a checkpoint file.

        Args:
            allow_nonfinite: load NaN or infinite weights with a warning instead of refusing them (``classify``:
                every file still gets a label).

        Raises:
            ValueError: the file is unreadable, not this project's checkpoint, inconsistent, or not finite; the
                message names the file, what is wrong and how to get a good one.
        """
        ckpt = _read(path)
        recipe = _recipe(ckpt, path)
        state = ckpt["state_dict"]
        _check_finite(state, path, allow_nonfinite)
        head = state.get("head.weight")
        _require(head is not None and head.ndim == 2 and 2 <= head.shape[0] <= MAX_CLASSES, path,
                 f"the state dict's head.weight must have 2..{MAX_CLASSES} rows, one per species")
        names = ckpt.get("class_names")
        _require(names is None or (isinstance(names, list) and len(names) == head.shape[0]
                                   and all(isinstance(n, str) for n in names)),
                 path, f"'class_names' must be None or {head.shape[0]} strings")
        net = _restored(recipe.net_config(head.shape[0]), state, ckpt.get("architecture"), path)
        return cls(net.eval(), recipe, names).eval()


def architecture(net: nn.Module) -> str:
    """A short digest of the architecture: every module's type and geometry, and every state-dict entry's name,
    shape and dtype. Two timm models can share every key and shape and still compute differently ('same'
    padding, another eps): this tells them apart."""
    parts = []
    for name, module in net.named_modules():
        geometry = [getattr(module, a, None) for a in ("stride", "padding", "dilation", "groups", "eps")]
        parts.append(f"{name}:{type(module).__name__}:{geometry}")
    parts += [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in net.state_dict().items()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _small_plain(value, depth: int = 0) -> bool:
    """A small tree of str keys and str / number / bool / None / list leaves (what a recipe holds)."""
    if isinstance(value, dict):
        return depth < 3 and len(value) <= 100 and all(isinstance(k, str) and _small_plain(v, depth + 1)
                                                       for k, v in value.items())
    if isinstance(value, list):
        return len(value) <= 100 and all(_small_plain(v, depth + 1) for v in value)
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
    formats = (*LEGACY_FORMATS, FORMAT)
    _require(isinstance(ckpt, dict) and ckpt.get("format") in formats, path,
             f"expected a dict with format in {formats}")
    _require(isinstance(ckpt.get("state_dict"), dict)
             and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["state_dict"].items()),
             path, "'state_dict' must map names to tensors")
    return ckpt


def _recipe(ckpt: dict, path) -> FinetuneConfig:
    """The checkpoint's recipe, every field checked (an unknown backbone, a timm one without timm installed,
    or a value out of range is refused here, before anything is built)."""
    fields = ckpt.get("recipe") if ckpt["format"] == FORMAT else _legacy_recipe(ckpt, path)
    _require(isinstance(fields, dict) and _small_plain(fields) and isinstance(fields.get("probe", {}), dict), path,
             "'recipe' must be a dict of plain values")
    assert isinstance(fields, dict)  # _require refused anything else
    try:
        return FinetuneConfig.from_dict(fields)
    except ValueError as err:
        raise ValueError(f"{path}: not a valid checkpoint: its recipe's {err}; {_fix(path)}.") from None


def _legacy_recipe(ckpt: dict, path) -> dict:
    """A format 1 or 2 checkpoint's recipe: the one it stored, else the 'full' preset's training with its own
    network, input size and prediction views (all a recipe-less checkpoint says of itself)."""
    if ckpt.get("recipe") is not None:
        return ckpt["recipe"]
    net = ckpt.get("net")
    data = ckpt.get("data")
    _require(isinstance(net, dict) and isinstance(data, dict), path, "'net' and 'data' must be dicts")
    assert isinstance(net, dict) and isinstance(data, dict)  # _require refused anything else
    fields = {k: net[k] for k in ("backbone", "split", "dropout", "pooling", "members") if k in net}
    return {**PRESETS["full"].to_dict(), "pooling": "avg", **fields, "image_size": data.get("image_size"),
            "tta_flip": ckpt.get("tta_flip"), "tta_crops": ckpt.get("tta_crops", [])}


def _check_finite(state: dict, path, warn_only: bool) -> None:
    broken = nonfinite(state)
    if not broken:
        return
    problem = (f"{path}: {len(broken)} of its tensors hold NaN or infinite values (first: {broken[0]}): a run "
               f"that diverged, or a damaged file; {_fix(path)}.")
    if not warn_only:
        raise ValueError(problem)
    warnings.warn(f"{problem} Its labels are guesses.", stacklevel=3)


def _restored(net_cfg: NetConfig, state_dict: dict, digest, path) -> BirdNet:
    """The network the recipe describes, holding the state dict; refused where the architecture differs from
    the one saved, or the state dict does not fit it (with the counts of missing and unexpected entries)."""
    net = build_net(net_cfg)
    _require(digest is None or digest == architecture(net), path, f"its recipe builds another architecture "
             f"({net_cfg.backbone}) than the one its weights were saved from")
    missing = sorted(set(net.state_dict()) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(net.state_dict()))
    _require(not missing and not unexpected, path, f"the state dict does not fit its {net_cfg.backbone} network: "
             f"{len(missing)} missing entries (first {missing[:1]}), {len(unexpected)} unexpected "
             f"(first {unexpected[:1]})")
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as err:  # mis-shaped tensors
        first = str(err).split("\n\t", 2)[1][:200] if "\n\t" in str(err) else str(err)[:200]
        raise ValueError(f"{path}: not a valid checkpoint: the state dict does not fit its network ({first}); "
                         f"{_fix(path)}.") from None
    return net
