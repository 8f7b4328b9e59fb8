"""Optional training levers, kept apart from the model and the training loop (as timm keeps ``mixup.py`` and
``model_ema.py`` apart from its models). Each is off by default, switched on by one ``FinetuneConfig`` field,
measured by ``finetune.cv``, and imported only by a run that asks for it, so a grader file carries only the
levers its recipe uses (``tools/build_submission.py``):

- ``averaging``: EMA or SWA of the weights during a fit (``ema_decay``, ``swa``), the uniform soup of the
  members' weights (``average='weights'``);
- ``mixing``: mixup / CutMix of cached activations (``mix``);
- ``cotuning``, ``contrastive``, ``distill``: loss terms added to the cross-entropy (``cotuning``, ``supcon``,
  ``distill``), made by :func:`loss_terms`;
- ``l2sp``: decay of the tail towards its pretrained weights (``l2sp``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import lightning as L
from torch import nn

from birds_lpft.models.net import TailHead


@dataclass
class LeverInputs:
    """What the loss terms need beyond the cache: the pretrained network's own ImageNet head (Co-Tuning) and
    the trained network a student learns from (distillation). None where the recipe has no use for it."""

    source_head: nn.Module | None = None
    teacher: nn.Module | None = None


def loss_terms(cfg, top: TailHead, train_set, inputs: LeverInputs, trainer: L.Trainer | None = None) -> list:
    """The recipe's loss terms for training ``top`` (pretrained tail, probe head) on ``train_set`` (the cached
    views: its first stack is the centre views); none unless a lever asks, so nothing changes then."""
    terms = []
    if cfg.cotuning > 0:
        from finetune.levers.cotuning import CoTuning, relationship

        if inputs.source_head is None:
            raise ValueError("cotuning needs the pretrained ImageNet head (LeverInputs.source_head)")
        head = copy.deepcopy(inputs.source_head).to(next(top.parameters()).device)  # each fit trains its own
        rel = relationship(top, head, train_set.stacks[0], train_set.rows, train_set.labels,
                           top.head.out_features, trainer)
        terms.append(CoTuning(head, rel, cfg.cotuning))
    if cfg.supcon > 0:
        from finetune.levers.contrastive import SupCon

        terms.append(SupCon(top.head.in_features, cfg.supcon, cfg.seed).to(next(top.parameters()).device))
    if cfg.distill > 0 and inputs.teacher is not None:  # the teachers' own fits come first, without it
        from finetune.levers.distill import Distill

        terms.append(Distill(inputs.teacher, cfg.distill))
    return terms
