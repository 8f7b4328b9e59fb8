"""What cross-validation reads off a fold's trained tails besides the candidate's score, at no training cost, each
paired with the candidate fold for fold: every TTA scheme of the cached crops and mirrors; an ensemble's logits, its
first member alone and its members' uniform soup, or a student's teacher; and at larger inputs (``--test-sizes``;
Touvron et al. 2019) the head 'as trained', on features 'aligned' to the training size's per-feature mean and spread,
and 'refit' by stage one's probe, plus that refit at the training size, which tells the refit's effect from the size's.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import torch

from birds_lpft.models.net import BirdNet
from birds_lpft.recipe import FinetuneConfig

from probe.linear import fit_probe

from finetune.stage_one import pooled_from_trunk
from finetune.train import Training, soup_of


def tta_schemes(crops: tuple[float, ...]) -> list[tuple[tuple[float, ...], bool]]:
    """Every (extra crops, flip) combination of the cached crops: what each fold is also scored under."""
    subsets = [c for r in range(len(crops) + 1) for c in combinations(sorted(crops), r)]
    return [(c, flip) for c in subsets for flip in (False, True)]


def scheme_name(crops: tuple[float, ...], flip: bool) -> str:
    return "+".join(["centre", *map(str, crops)]) + (" flip" if flip else "")


def member_readouts(run: Training, cfg: FinetuneConfig, score) -> dict[str, float]:
    """Scores of the trained members beside the shipped network (``score(net, member=None)``: held-out
    accuracy with the candidate's TTA, of every top averaged or of top ``member`` alone)."""
    out = {}
    members = run.members
    if members is not run.net:
        out["teacher" if cfg.distill > 0 else "ensemble of the members"] = score(members)
    if len(members.tops()) > 1:
        out["member 1 alone"] = score(members, 0)
        if not (cfg.average == "weights" and cfg.distill == 0):  # else the soup is the shipped network itself
            out["uniform soup"] = score(soup_of(cfg, members))
    return out


def _accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float((logits.argmax(1).numpy() == labels).mean())


class SizeReadouts:
    """Scores of one trained one-top network at other input sizes (see the module docstring); ``train_size`` is the
    (centre, mirror) pair cached at the training size, ``sizes`` {size: (centre, mirror)}."""

    def __init__(self, net: BirdNet, cfg: FinetuneConfig, train_size: tuple, sizes: dict):
        self.net = net.eval()
        self.cfg = cfg
        self.train_size = train_size
        self.sizes = sizes

    @torch.inference_mode()
    def __call__(self, train_idx: np.ndarray, val_idx: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        base = pooled_from_trunk(self.net, self.train_size[0], train_idx, self.cfg.precision)
        scores = {"refit at the training size": self._refit(base, self.train_size, train_idx, val_idx, labels)}
        for size, pair in sorted(self.sizes.items()):
            fit = pooled_from_trunk(self.net, pair[0], train_idx, self.cfg.precision)
            held = self._held(pair, val_idx)
            aligned = [(f - fit.mean(0)) / (fit.std(0) + 1e-6) * base.std(0) + base.mean(0) for f in held]
            scores[f"size {size} as trained"] = _accuracy(self._logits(held), labels[val_idx])
            scores[f"size {size} aligned"] = _accuracy(self._logits(aligned), labels[val_idx])
            scores[f"size {size} refit"] = self._refit(fit, pair, train_idx, val_idx, labels)
        return scores

    def _held(self, pair: tuple, val_idx: np.ndarray) -> list[torch.Tensor]:
        """The held-out images' features at one size: the centre view, and its mirror with flip TTA."""
        views = pair if self.cfg.tta_flip else pair[:1]
        return [pooled_from_trunk(self.net, stack, val_idx, self.cfg.precision) for stack in views]

    def _logits(self, features: list[torch.Tensor]) -> torch.Tensor:
        head = self.net.head
        return torch.stack([head(f) for f in features]).mean(0)

    def _refit(self, fit: torch.Tensor, pair: tuple, train_idx, val_idx, labels: np.ndarray) -> float:
        probe = fit_probe(fit.numpy(), labels[train_idx], self.cfg.probe, self.cfg.seed).probe
        held = self._held(pair, val_idx)
        logits = np.mean([probe.decision_function(f.numpy()) for f in held], axis=0)
        return float((probe.classes_[logits.argmax(1)] == labels[val_idx]).mean())
