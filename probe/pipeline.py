"""Stage one end to end: pretrained network, in-RAM features of the centre view, a probe with C chosen on a split."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from birds_lpft.data.images import ImageDataset
from birds_lpft.data.sets import LabelledImages
from birds_lpft.extract import extract, make_loader
from birds_lpft.models.net import BirdNet, NetConfig
from birds_lpft.models.preprocess import DataConfig, EvalTransform, data_config
from birds_lpft.models.weights import pretrained_net
from birds_lpft.models.zoo import BackboneSpec, get_spec
from birds_lpft.recipe import PRECISIONS, ProbeFit, check_size, checked_spec
from birds_lpft.utils.settings import check_choice, check_int
from birds_lpft.utils.timing import Stopwatch

from probe.linear import FittedProbe, fit_probe


@dataclass(frozen=True)
class ProbeConfig:
    """Stage-one settings."""

    backbone: str = "mobilenet_v2"  # a torchvision model name or timm/NAME
    image_size: int | None = None  # the input side; None: the weights' own
    probe: ProbeFit = field(default_factory=ProbeFit)  # the same as the fine-tune's LP init (FinetuneConfig.probe)
    extract_batch_size: int = 16  # images per forward pass (small batches are fastest on a CPU)
    precision: str = "auto"  # 'auto' (bf16 where the CPU runs it natively), 'bf16' or 'fp32'
    seed: int = 0  # of the split and the solver

    def __post_init__(self):
        spec = checked_spec(self)
        if self.image_size is not None:
            check_size("image_size", spec, self.image_size)
        check_choice("precision", self.precision, PRECISIONS)
        check_int("extract_batch_size", self.extract_batch_size, 1)

    @cached_property
    def spec(self) -> BackboneSpec:
        """The backbone, resolved once."""
        return get_spec(self.backbone)

    def net_config(self, num_classes: int) -> NetConfig:
        """The network whose pooled features the probe sees (its split does not change them)."""
        return NetConfig(self.backbone, num_classes, self.spec.default_split)

    def data_config(self) -> DataConfig:
        return data_config(self.spec, self.image_size)


def pooled_features(net: BirdNet, images: LabelledImages, cfg: ProbeConfig, desc: str,
                    progress: bool = True) -> torch.Tensor:
    """(N, F) pooled backbone features of the centre view, computed in RAM; ``progress``: a bar and a summary."""
    dataset = ImageDataset(images.sources, images.names, EvalTransform(cfg.data_config()))
    feats = extract(
        lambda x: net.forward_head(net.forward_features(x), pre_logits=True),
        make_loader(dataset, cfg.extract_batch_size),
        precision=cfg.precision, desc=desc, progress=progress, prefetch=True,  # decoding overlaps the forward
    )
    return feats


@dataclass
class ProbeResult:
    fitted: FittedProbe
    test_accuracy: float | None
    stopwatch: Stopwatch


def run_probe(
    train: LabelledImages, test: LabelledImages | None, cfg: ProbeConfig, weights: str = "required",
    *, allow_download: bool = False, weights_file=None, progress: bool = True,
) -> ProbeResult:
    """Fit the probe: choose C on a stratified validation split, then refit on all training images."""
    sw = Stopwatch()
    with sw("load network"):
        net = pretrained_net(cfg.net_config(train.num_classes), weights, allow_download=allow_download,
                             weights_file=weights_file)
    with sw("train features"):
        X = pooled_features(net, train, cfg, "train features", progress).numpy()
    with sw("choose C and fit"):
        fitted = fit_probe(X, train.labels, cfg.probe, cfg.seed)
    test_acc = None
    if test is not None:
        with sw("test features"):
            X_test = pooled_features(net, test, cfg, "test features", progress).numpy()
        test_acc = fitted.probe.score(X_test, test.labels)
    return ProbeResult(fitted, test_acc, sw)
