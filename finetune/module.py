"""The Lightning pieces of stage two: the module that trains tail + head on cached trunk activations,
the freezing callback, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

from probe.backbone import BirdNet
from finetune.config import FinetuneConfig


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def freeze_batchnorm_stats(module: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: running statistics are used and never updated.

    Fine-tuning batches are small and come from one dataset, so their statistics are noisier than the
    ImageNet ones; the affine weights of trainable layers still learn.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class TrunkFreeze(BaseFinetuning):
    """Freeze the trunk for the whole run; unfreeze the tail after ``head_only_epochs`` (0 = at once)."""

    def __init__(self, head_only_epochs: int, lr_tail: float):
        super().__init__()
        self.head_only_epochs, self.lr_tail = head_only_epochs, lr_tail

    def freeze_before_training(self, pl_module: "LPFTModule") -> None:
        self.freeze(pl_module.net.trunk, train_bn=False)
        if self.head_only_epochs > 0:
            self.freeze(pl_module.net.tail, train_bn=False)

    def finetune_function(self, pl_module: "LPFTModule", epoch: int, optimizer) -> None:
        if self.head_only_epochs > 0 and epoch == self.head_only_epochs:
            self.unfreeze_and_add_param_group(pl_module.net.tail, optimizer, lr=self.lr_tail, train_bn=True)
            optimizer.param_groups[-1]["peak_lr"] = self.lr_tail


class LPFTModule(L.LightningModule):
    """Trains ``net.tail`` and ``net.head`` on cached trunk activations (B, C, h, w).

    Keeps the best validation weights in memory (``best_state``) and a per-epoch ``history``.
    """

    def __init__(self, net: BirdNet, cfg: FinetuneConfig):
        super().__init__()
        self.net, self.cfg = net, cfg
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_val_accuracy = -1.0
        self.history: list[dict[str, float]] = []
        self.samples_seen = 0  # cached views that went through the tail in training steps

    def train(self, mode: bool = True) -> "LPFTModule":
        # Called before fit and by Lightning after each validation loop: re-pin BatchNorm every time.
        super().train(mode)
        freeze_batchnorm_stats(self.net)
        return self

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(acts))

    def _step(self, batch, stage: str) -> torch.Tensor:
        acts, y = batch
        logits = self(acts)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing if stage == "train" else 0.0)
        acc = (logits.argmax(1) == y).float().mean()
        self.log_dict({f"{stage}_loss": loss, f"{stage}_acc": acc}, on_step=False, on_epoch=True,
                      prog_bar=True, batch_size=len(y))
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        self.samples_seen += len(batch[1])
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Lightning's own count: epochs x batches after limit_train_batches, per rank under DDP.
        total = max(1, int(self.trainer.estimated_stepping_batches))
        factor = lr_factor(self.global_step, total, int(self.cfg.warmup_fraction * total))
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = group["peak_lr"] * factor

    def on_validation_epoch_end(self) -> None:
        acc = self.trainer.callback_metrics.get("val_acc")
        if acc is not None and not self.trainer.sanity_checking and float(acc) > self.best_val_accuracy:
            self.best_val_accuracy = float(acc)
            self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def on_train_epoch_end(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.endswith(("_loss", "_acc"))}
        self.history.append({"epoch": self.current_epoch + 1, **metrics})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = []
        for module, lr in ((self.net.tail, self.cfg.lr_tail), (self.net.head, self.cfg.lr_head)):
            params = [p for p in module.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim > 1]  # conv and linear weights; not biases or BatchNorm
            no_decay = [p for p in params if p.ndim <= 1]
            groups += [{"params": decay, "lr": lr, "peak_lr": lr, "weight_decay": self.cfg.weight_decay},
                       {"params": no_decay, "lr": lr, "peak_lr": lr, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]])
