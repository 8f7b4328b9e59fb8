"""The Lightning pieces of stage two: the module that trains tail + head on cached trunk activations, the
freezing callback, the weight-averaging callback, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning, Callback
from torch import nn

from probe.backbone import BirdNet, Member
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
    """Freeze the trunk (whose activations are cached) and every ensemble member but the one in training;
    that member's tail trains from the start."""

    def freeze_before_training(self, pl_module: "LPFTModule") -> None:
        net = pl_module.net
        self.freeze(net.trunk, train_bn=False)
        for i in range(net.members):
            if i != pl_module.member_index:
                self.freeze(net.member(i), train_bn=False)
        self.make_trainable(pl_module.member)

    def finetune_function(self, pl_module: "LPFTModule", epoch: int, optimizer) -> None:
        pass  # nothing is unfrozen later: gradual unfreezing did not pay for its epochs here


class WeightAverage(Callback):
    """An exponential moving average of the trainable weights (``torch.optim.swa_utils.AveragedModel``).

    The average stands in for the weights during validation and replaces them when training ends. The
    decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the first, untrained weights
    are forgotten quickly (timm's and TF's ModelEma do the same).
    """

    def __init__(self, decay: float):
        super().__init__()
        self.decay, self.average, self._live = decay, None, None

    def _avg_fn(self, averaged: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        decay = min(self.decay, (1.0 + float(n)) / (10.0 + float(n)))
        return torch.lerp(current, averaged, decay)  # decay * averaged + (1 - decay) * current

    def on_fit_start(self, trainer: L.Trainer, pl_module: "LPFTModule") -> None:
        self.average = torch.optim.swa_utils.AveragedModel(pl_module.member, avg_fn=self._avg_fn, use_buffers=False)

    def on_train_batch_end(self, trainer, pl_module: "LPFTModule", outputs, batch, batch_idx: int) -> None:
        self.average.update_parameters(pl_module.member)

    def _trainable(self, pl_module: "LPFTModule"):
        pairs = zip(pl_module.member.parameters(), self.average.module.parameters())
        return [(p, a) for p, a in pairs if p.requires_grad]

    def _load_average(self, pl_module: "LPFTModule") -> None:
        with torch.no_grad():
            for p, a in self._trainable(pl_module):
                p.copy_(a)

    def on_validation_start(self, trainer, pl_module: "LPFTModule") -> None:
        if self.average is not None and not trainer.sanity_checking:
            self._live = [p.detach().clone() for p, _ in self._trainable(pl_module)]
            self._load_average(pl_module)

    def on_validation_end(self, trainer, pl_module: "LPFTModule") -> None:
        if self._live is not None:
            with torch.no_grad():
                for (p, _), live in zip(self._trainable(pl_module), self._live):
                    p.copy_(live)
            self._live = None

    def on_train_end(self, trainer, pl_module: "LPFTModule") -> None:
        self._load_average(pl_module)


def mix_batch(acts: torch.Tensor, y: torch.Tensor, mode: str, alpha: float, rng: np.random.Generator):
    """Mixup or CutMix of a batch of trunk activations (B, C, h, w) with a shuffled copy of itself.

    Returns:
        (mixed activations, labels a, labels b, share of a); the loss is share * CE(a) + (1 - share) * CE(b).
    """
    lam = float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0
    lam = max(lam, 1.0 - lam)  # labels a always dominate, so accuracy on a is meaningful
    perm = torch.as_tensor(rng.permutation(len(y)))
    acts = acts.float()
    if mode == "mixup":
        return lam * acts + (1.0 - lam) * acts[perm], y, y[perm], lam
    if mode != "cutmix":
        raise ValueError(f"mix must be 'none', 'mixup' or 'cutmix', got {mode!r}")
    h, w = acts.shape[-2:]  # a box of area ~(1 - lam) from the partner, at a random place
    bh, bw = round(h * math.sqrt(1.0 - lam)), round(w * math.sqrt(1.0 - lam))
    top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    mixed = acts.clone()
    mixed[..., top:top + bh, left:left + bw] = acts[perm][..., top:top + bh, left:left + bw]
    return mixed, y, y[perm], 1.0 - bh * bw / (h * w)  # the share of a actually kept


class LPFTModule(L.LightningModule):
    """Trains one member of ``net`` (its tail, pooling and head; member 0 is the net's own) on cached trunk
    activations (B, C, h, w).

    Keeps the best validation weights in memory (``best_state``) and a per-epoch ``history``.
    """

    def __init__(self, net: BirdNet, cfg: FinetuneConfig, member: int = 0):
        super().__init__()
        self.net, self.cfg, self.member_index = net, cfg, member
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_val_accuracy = -1.0
        self.history: list[dict[str, float]] = []
        self.samples_seen = 0  # cached views that went through the tail in training steps
        self.mix_rng = np.random.default_rng(cfg.seed + member)  # own stream: the global RNGs stay untouched

    @property
    def member(self) -> Member:
        return self.net.member(self.member_index)

    def train(self, mode: bool = True) -> "LPFTModule":
        # Called before fit and by Lightning after each validation loop: re-pin BatchNorm every time.
        super().train(mode)
        freeze_batchnorm_stats(self.net)
        return self

    def forward(self, acts: torch.Tensor) -> torch.Tensor:
        return self.member(acts)

    def on_train_start(self) -> None:
        self.train()  # the data module's setup ran the probe in eval mode inside fit(); dropout back on, BN pinned

    def _log(self, stage: str, loss: torch.Tensor, acc: torch.Tensor, n: int) -> None:
        self.log_dict({f"{stage}_loss": loss, f"{stage}_acc": acc}, on_step=False, on_epoch=True, prog_bar=True,
                      batch_size=n, sync_dist=True)  # averaged over the ranks: one all-reduce per epoch

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        acts, y = batch
        self.samples_seen += len(y)
        smoothing = self.cfg.label_smoothing
        if self.cfg.mix == "none":
            logits = self(acts)
            loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
        else:
            acts, y, y_b, lam = mix_batch(acts, y, self.cfg.mix, self.cfg.mix_alpha, self.mix_rng)
            logits = self(acts)
            loss = lam * F.cross_entropy(logits, y, label_smoothing=smoothing) + \
                (1.0 - lam) * F.cross_entropy(logits, y_b, label_smoothing=smoothing)
        self._log("train", loss, (logits.argmax(1) == y).float().mean(), len(y))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        acts, y = batch
        logits = self(acts)
        self._log("val", F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean(), len(y))

    def on_validation_epoch_end(self) -> None:
        acc = self.trainer.callback_metrics.get("val_acc")
        if acc is not None and not self.trainer.sanity_checking and float(acc) > self.best_val_accuracy:
            self.best_val_accuracy = float(acc)
            self.best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def on_train_epoch_end(self) -> None:
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.endswith(("_loss", "_acc"))}
        self.history.append({"epoch": self.current_epoch + 1, **metrics})

    def param_groups(self) -> list[dict]:
        """AdamW groups: the tail at ``lr_tail``, pooling and head at ``lr_head``; no decay on 1-d parameters."""
        groups, member = [], self.member
        for modules, lr in (((member.tail,), self.cfg.lr_tail), ((member.pool, member.head), self.cfg.lr_head)):
            params = [p for module in modules for p in module.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim > 1]  # conv and linear weights; not biases, BatchNorm or GeM's p
            no_decay = [p for p in params if p.ndim <= 1]
            groups += [{"params": decay, "lr": lr, "weight_decay": self.cfg.weight_decay},
                       {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.param_groups())
        # Lightning's own count: epochs x batches after limit_train_batches, per rank under DDP.
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.cfg.warmup_fraction * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
