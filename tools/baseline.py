"""The online fine-tune a user would otherwise write: the benchmark's baseline recipe, plain PyTorch.

MobileNetV2 with the backbone's default tail trainable, a fresh linear head, images decoded and augmented
again every epoch, AdamW, label smoothing, a fixed number of epochs; scored through ``Classifier.score``
like every other model in the project (centre view, no flip TTA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from birds_lpft.classifier import Classifier
from birds_lpft.data.images import ImageDataset
from birds_lpft.data.sets import LabelledImages
from birds_lpft.models.net import BirdNet, NetConfig, get_spec
from birds_lpft.models.preprocess import TrainTransform, data_config
from birds_lpft.models.weights import pretrained_net

from finetune.config import FinetuneConfig


@dataclass(frozen=True)
class BaselineConfig:
    """The online fine-tune recipe.

    Attributes:
        backbone: a torchvision model name or ``timm/NAME`` (see ``birds_lpft.models.zoo``).
        image_size: network input side; images are decoded and augmented again every epoch.
        split: first trainable block; None takes the backbone's own default (the pipeline's too).
        dropout: before the fresh linear head (torchvision's MobileNetV2 classifier uses 0.2).
        epochs: fixed number of passes over the training images.
        batch_size: images per step.
        lr, weight_decay: AdamW, one rate for tail and head, cosine-annealed per step to 0.
        label_smoothing: cross-entropy label smoothing.
        crop_scale, jitter: the pipeline's own augmentation, so only the recipe differs.
        val_fraction: held-out share per class (the same seeded split as the probe's and the pipeline's).
        precision: evaluation precision (training runs in fp32, as a plain loop does).
        seed: head init, shuffling and augmentation.
    """

    backbone: str = "mobilenet_v2"
    image_size: int = 224
    split: int | None = None
    dropout: float = 0.2
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    crop_scale: tuple[float, float] = FinetuneConfig.crop_scale
    jitter: float = FinetuneConfig.jitter
    val_fraction: float = 0.2
    precision: str = "auto"
    seed: int = 0

    def net_config(self, num_classes: int) -> NetConfig:
        split = self.split if self.split is not None else get_spec(self.backbone).default_split
        return NetConfig(self.backbone, num_classes, split, self.dropout)


def baseline_net(num_classes: int, cfg: BaselineConfig, weights: str) -> BirdNet:
    """The pretrained network with a frozen trunk, a trainable tail and a fresh linear head."""
    torch.manual_seed(cfg.seed)
    net = pretrained_net(cfg.net_config(num_classes), weights)
    net.trunk.requires_grad_(False)
    return net


def baseline_epoch(net: BirdNet, loader: DataLoader, labels: torch.Tensor, opt, sched, cfg: BaselineConfig,
                   desc: str, progress: bool) -> dict[str, float]:
    """One online epoch: decode, augment, forward, step. Returns the epoch's mean loss and accuracy."""
    net.train()
    net.trunk.eval()  # frozen means frozen: the trunk's BatchNorm keeps its ImageNet statistics
    loss_sum = 0.0
    correct = 0
    for x, index in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        y = labels[index]
        logits = net(x.contiguous(memory_format=torch.channels_last))
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
    n = len(loader.dataset)
    return {"train_loss": loss_sum / n, "train_acc": correct / n}


def train_baseline(net: BirdNet, images: LabelledImages, cfg: BaselineConfig, progress: bool) -> list[dict]:
    """Fit tail + head for ``cfg.epochs`` epochs of online augmentation. Returns the per-epoch history."""
    transform = TrainTransform(data_config(cfg.backbone, cfg.image_size), scale=cfg.crop_scale, jitter=cfg.jitter)
    loader = DataLoader(ImageDataset(images.sources, images.names, transform), batch_size=cfg.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(cfg.seed))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * len(loader))
    labels = torch.as_tensor(images.labels)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        row = baseline_epoch(net, loader, labels, opt, sched, cfg, f"baseline epoch {epoch}/{cfg.epochs}", progress)
        history.append({"epoch": epoch, **row})
    return history


def baseline_classifier(net: BirdNet, cfg: BaselineConfig) -> Classifier:
    """The trained baseline as a :class:`Classifier` (no flip TTA), scored like every other model."""
    return Classifier(net.eval(), cfg.net_config(net.head.out_features), data_config(cfg.backbone, cfg.image_size),
                      tta_flip=False)
