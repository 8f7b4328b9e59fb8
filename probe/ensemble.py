"""An ensemble lever, kept apart from the model classes: more tails and heads on one frozen trunk.

Measured by cross-validation (``finetune.cv``, ``members=2``) and not shipped: it did not pay for its extra
tail time. Each member is trained on its own (its own data order) from the same probe; the trunk runs once
and the members' logits are averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from probe.backbone import BirdNet, TailHead


class EnsembleNet(BirdNet):
    """A :class:`BirdNet` whose ``extra`` holds ``members - 1`` more tails and heads.

    Member 0 is the net's own tail and head, so the state dict is a single model's plus ``extra.*`` (the
    layout checkpoints have always had).
    """

    def __init__(self, *args, members: int, **kwargs):
        super().__init__(*args, **kwargs)
        if members < 2:
            raise ValueError(f"an ensemble has at least 2 members, got {members}")
        self.extra = nn.ModuleList(copy.deepcopy(self.top()) for _ in range(members - 1))

    @property
    def members(self) -> int:
        return 1 + len(self.extra)

    def member(self, i: int) -> TailHead:
        """Member ``i``'s tail and head: the very modules the net holds, so training them trains the net."""
        return self.top() if i == 0 else self.extra[i - 1]

    def tops(self) -> list[TailHead]:
        return [self.member(i) for i in range(self.members)]

    def member_logits(self, a: torch.Tensor) -> torch.Tensor:
        """Trunk activations (B, C, h', w') -> every member's logits, (members, B, K) in fp32."""
        return torch.stack([self.member(i)(a).float() for i in range(self.members)])

    def forward_from_trunk(self, a: torch.Tensor) -> torch.Tensor:
        """Trunk activations (B, C, h', w') -> logits (B, K), averaged over the members."""
        return self.member_logits(a).mean(0)
