"""The shipped model: a :class:`Classifier` (network + preprocessing) and its checkpoint file.

A checkpoint is a plain dict: the state dict plus the configs that rebuild the network and its
preprocessing. Loading never downloads (the backbone is built with random weights, then the state dict
overwrites them) and uses ``torch.load(..., weights_only=True)``, so an untrusted file cannot run code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from probe.backbone import BirdNet, DataConfig, NetConfig, build_net
from probe.data import LabelledImages, Source
from finetune.predict import predict_logits

FORMAT = "birds-lpft/1"


class Classifier(nn.Module):
    """A trained :class:`BirdNet` with everything needed to predict: its config and preprocessing.

    Args:
        net: the network (trunk, tail, head).
        net_cfg: rebuilds ``net``'s architecture.
        data_cfg: the preprocessing ``net`` was trained with.
        tta_flip: average the logits of each image and its mirror.
    """

    def __init__(self, net: BirdNet, net_cfg: NetConfig, data_cfg: DataConfig, tta_flip: bool):
        super().__init__()
        self.net, self.net_cfg, self.data_cfg, self.tta_flip = net, net_cfg, data_cfg, tta_flip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def predict_logits(self, sources: Sequence[Source], names: Sequence[str], *, precision: str = "auto",
                       progress: bool = False) -> torch.Tensor:
        """(N, K) logits; an unreadable image gets a warning and a guess (see ``finetune.predict``)."""
        return predict_logits(self.net, sources, names, self.data_cfg, tta_flip=self.tta_flip,
                              precision=precision, progress=progress)

    def predict(self, sources: Sequence[Source], names: Sequence[str], *, precision: str = "auto",
                progress: bool = False) -> np.ndarray:
        """(N,) predicted class ids, in order."""
        return self.predict_logits(sources, names, precision=precision, progress=progress).argmax(1).numpy()

    def score(self, images: LabelledImages, *, precision: str = "auto", progress: bool = False) -> float:
        """Accuracy on a labelled set: the one evaluation the CLI, tools and benchmark share."""
        predicted = self.predict(images.sources, images.names, precision=precision, progress=progress)
        return float(np.mean(predicted == images.labels))

    def checkpoint(self) -> dict:
        """A plain dict (tensors, str, numbers, lists), loadable with ``weights_only=True``."""
        data = asdict(self.data_cfg)
        data["mean"], data["std"] = list(data["mean"]), list(data["std"])
        return {
            "format": FORMAT,
            "net": asdict(self.net_cfg),
            "data": data,
            "tta_flip": bool(self.tta_flip),
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        torch.save(self.checkpoint(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Classifier":
        """Rebuild a classifier (eval mode, CPU) from a checkpoint file.

        Raises:
            ValueError: the file is not a checkpoint of this project.
        """
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} checkpoint; build one with `python -m finetune DATA --out FILE`.")
        data = dict(ckpt["data"])
        data["mean"], data["std"] = tuple(data["mean"]), tuple(data["std"])
        net_cfg = NetConfig(**ckpt["net"])
        net = build_net(net_cfg)
        net.load_state_dict(ckpt["state_dict"])
        return cls(net.eval(), net_cfg, DataConfig(**data), bool(ckpt["tta_flip"])).eval()
