"""The Lightning pieces of stage two: the module that trains tail + head on cached trunk activations, the
freezing callback and the warm-up + cosine learning-rate schedule. The optional levers (Co-Tuning,
distillation) are ``finetune.levers``."""

from __future__ import annotations

from contextlib import ExitStack
from typing import cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from torch import nn

from birds_lpft.models.net import BirdNet, TailHead
from birds_lpft.recipe import FinetuneConfig

from finetune.kernels import fp32_depthwise_input_grads
from finetune.levers import LeverInputs, loss_terms


class TrainingDiverged(RuntimeError):
    """A training step's loss was NaN or infinite: the run stops, and nothing is written."""


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warm-up to each group's learning rate over ``warmup_steps`` steps, then cosine decay to 0 at
    ``total_steps`` (torchvision's references compose the same two schedulers)."""
    schedulers = torch.optim.lr_scheduler
    cosine = schedulers.CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps))
    if warmup_steps == 0:
        return cosine
    warmup = schedulers.LinearLR(optimizer, start_factor=1 / warmup_steps, total_iters=warmup_steps - 1)
    return schedulers.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


class TrunkFreeze(BaseFinetuning):
    """Freeze the whole network but the top in training (its tail, pooling and head), which trains from the
    start: the trunk's activations are cached, and an ensemble's other members train in their own fits."""

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        module = cast(LPFTModule, pl_module)  # the module this callback is made for (train.make_trainer)
        self.freeze(module.net, train_bn=False)
        self.make_trainable(module.top)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer) -> None:
        pass  # nothing is unfrozen later: gradual unfreezing did not pay for its epochs here


class CpuBf16Kernels(Callback):
    """Under bf16-mixed on a CPU, the trained top's strided depthwise convolutions take their input gradient from
    the fp32 kernel (``finetune.kernels``). Entered in the process that trains (a spawned DDP rank too), left at
    teardown or on an exception."""

    def __init__(self):
        self._kernels = ExitStack()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.precision == "bf16-mixed" and pl_module.device.type == "cpu":
            self._kernels.enter_context(fp32_depthwise_input_grads(cast(LPFTModule, pl_module).top))

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._kernels.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._kernels.close()


class LPFTModule(L.LightningModule):
    """Trains one top of ``net`` (``net.tops()[member]``: tail, pooling, head) on cached trunk activations
    (B, C, h, w), keeping a per-epoch ``history``."""

    def __init__(self, net: BirdNet, cfg: FinetuneConfig, member: int = 0, inputs: LeverInputs | None = None):
        super().__init__()
        self.net = net
        self.cfg = cfg
        self.member_index = member  # which top, and its own data order
        self.inputs = inputs if inputs is not None else LeverInputs()
        self.terms = nn.ModuleList()  # the levers' loss terms, made in setup once the cache is there
        self.history: list[dict[str, float]] = []
        self.samples_seen = 0  # cached views that went through the tail in training steps

    @property
    def top(self) -> TailHead:
        return self.net.tops()[self.member_index]

    def train(self, mode: bool = True) -> LPFTModule:
        # Called before fit and at train start: re-pin BatchNorm every time (eval mode: small batches from one
        # dataset estimate the statistics worse than ImageNet did; affine weights still learn).
        super().train(mode)
        for m in self.net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        return self.top(acts)

    def setup(self, stage: str) -> None:
        # Here: after the cache and stage one's heads exist, before the optimiser that also trains the terms.
        data = self.trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's fit, not declared on Trainer
        self.terms = nn.ModuleList(loss_terms(self.cfg, self.top, data.train_set, self.inputs, self.trainer))

    def on_train_start(self) -> None:
        self.train()  # the data module's setup ran the probe in eval mode inside fit(); dropout back on, BN pinned

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        acts, y = batch
        self.samples_seen += len(y)
        logits, loss = self._logits_and_loss(acts, y)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"training diverged: the loss is {loss.item()} at step {self.global_step + 1} "
                                   f"of member {self.member_index + 1}; lower lr_tail and lr_head")
        acc = (logits.argmax(1) == y).float().mean()
        self.log_dict({"train_loss": loss, "train_acc": acc}, on_step=False, on_epoch=True, prog_bar=True,
                      batch_size=len(y), sync_dist=True)  # averaged over the ranks: one all-reduce per epoch
        return loss

    def _logits_and_loss(self, acts: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss) with the levers' terms (if any) added; the forward is the top's own, step by step, so that
        each term can read the maps (B, F, h, w) and the pooled features (B, F) it needs."""
        top = self.top
        maps = top.forward_tail(acts)
        features = top.forward_head(maps, pre_logits=True)
        logits = top.head(top.dropout(features))
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        for term in self.terms:
            loss = loss + term(acts=acts, maps=maps, features=features, logits=logits, y=y)
        return logits, loss

    def on_train_epoch_end(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.endswith(("_loss", "_acc"))}
        self.history.append({"epoch": self.current_epoch + 1, **metrics})

    def param_groups(self) -> list[dict]:
        """AdamW groups: the tail at ``lr_tail``, pooling and head at ``lr_head``; no decay on 1-d parameters."""
        top = self.top
        parts = [(list(top.tail.parameters()), self.cfg.lr_tail),
                 ([*top.pool.parameters(), *top.head.parameters()], self.cfg.lr_head)]
        for term in self.terms:  # ModuleList types its items as plain Modules; each is a levers.terms.LossTerm
            parts += term.param_groups(self.cfg.lr_tail, self.cfg.lr_head)  # type: ignore[operator]
        weight_decay = self.cfg.weight_decay
        groups = []
        for params, lr in parts:
            params = [p for p in params if p.requires_grad]
            decay = [p for p in params if p.ndim > 1]  # conv and linear weights; not biases, BatchNorm or GeM's p
            no_decay = [p for p in params if p.ndim <= 1]
            groups += [{"params": decay, "lr": lr, "weight_decay": weight_decay},
                       {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.param_groups())
        # Lightning's own count: epochs x batches after limit_train_batches, per rank under DDP.
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = warmup_cosine(optimizer, total, int(self.cfg.warmup_fraction * total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
