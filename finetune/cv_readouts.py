"""What cross-validation reads off a fold's trained tails besides the candidate's score, at no training cost, each
paired with the candidate fold for fold: every TTA scheme of the cached crops and mirrors, and an ensemble's first
member alone, or a student's teacher.
"""

from __future__ import annotations

from itertools import combinations

from birds_lpft.recipe import FinetuneConfig

from finetune.train import Training


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
    return out

