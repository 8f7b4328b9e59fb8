"""What every loss term of a lever is (``finetune.levers.loss_terms`` makes them): a module added to the
cross-entropy, with its own parameter groups, whose modules named in ``EVAL_MODE`` run in eval mode while it
trains (a pretrained head's dropout, a teacher's: they would only add noise, and draw from the global
generator)."""

from __future__ import annotations

from torch import nn


class LossTerm(nn.Module):
    EVAL_MODE: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> LossTerm:
        super().train(mode)
        for name in self.EVAL_MODE:
            getattr(self, name).eval()
        return self

    def param_groups(self, lr_tail: float, lr_head: float) -> list[tuple[list[nn.Parameter], float]]:
        """(parameters, learning rate) pairs the optimiser trains besides the network's; none by default."""
        return []
