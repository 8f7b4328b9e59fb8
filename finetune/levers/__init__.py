"""Optional training levers, kept apart from the model and the training loop: the loss terms of :func:`loss_terms`
(``cotuning``, ``distill``), the two that came nearest to beating the shipped recipe (docs/experiments.md). Each is
off by default, switched on by one ``FinetuneConfig`` field and imported only by a run that asks for it, so a grader
file carries only its recipe's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import lightning as L
from torch import nn

from birds_lpft.models.net import BirdNet, TailHead


def lever_modules(cfg=None) -> list[str]:
    """The lever modules ``cfg`` runs (every lever's without one): what a grader file for it must carry."""
    used = {"cotuning": cfg is None or cfg.cotuning > 0, "distill": cfg is None or cfg.distill > 0}
    return [f"finetune.levers.{name}" for name, on in used.items() if on]


@dataclass
class LeverInputs:
    """What the loss terms need beyond the cache: the pretrained network's own ImageNet head (Co-Tuning) and
    the trained network a student learns from (distillation). None where the recipe has no use for it."""

    source_head: nn.Module | None = None
    teacher: BirdNet | None = None


def loss_terms(cfg, top: TailHead, train_set, inputs: LeverInputs, trainer: L.Trainer | None = None) -> list[nn.Module]:
    """The recipe's loss terms for training ``top`` (pretrained tail, probe head) on ``train_set`` (the cached
    views: its first stack is the centre views); none unless a lever asks, so nothing changes then."""
    terms: list[nn.Module] = []
    if cfg.cotuning > 0:
        from finetune.levers.cotuning import CoTuning, relationship

        if inputs.source_head is None:
            raise ValueError("cotuning needs the pretrained ImageNet head (LeverInputs.source_head)")
        head = copy.deepcopy(inputs.source_head).to(next(top.parameters()).device)  # each fit trains its own
        rel = relationship(top, head, train_set.stacks[0], train_set.rows, train_set.labels,
                           top.head.out_features, trainer)
        terms.append(CoTuning(head, rel, cfg.cotuning))
    if cfg.distill > 0 and inputs.teacher is not None:  # the teachers' own fits come first, without it
        from finetune.levers.distill import Distill

        terms.append(Distill(inputs.teacher, cfg.distill))
    return terms
