"""Stage one end to end: pretrained network, in-RAM features, a probe with C chosen on validation."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from probe.backbone import BirdNet, NetConfig, build_net, data_config, eval_transform, get_spec
from probe.data import LabelledImages, stratified_split
from probe.features import ImageDataset, extract, make_loader
from probe.linear import LinearProbe, select_C
from probe.timing import Stopwatch
from probe.weights import has_pretrained, load_pretrained


@dataclass(frozen=True)
class ProbeConfig:
    """Stage-one settings.

    Attributes:
        backbone: a name in ``probe.backbone.BACKBONES``.
        image_size: network input side; None keeps the weights' own (224 for MobileNetV2).
        val_fraction: share of each class held out to choose C.
        Cs: LogisticRegression C values tried on the validation split.
        batch_size: images per forward pass (small batches are fastest on a CPU).
        precision: 'auto' (bf16 where the CPU supports it natively), 'bf16' or 'fp32'.
        seed: split and solver seed.
    """

    backbone: str = "mobilenet_v2"
    image_size: int | None = None
    val_fraction: float = 0.2
    Cs: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05)
    batch_size: int = 16
    precision: str = "auto"
    seed: int = 0


def pretrained_net(cfg: NetConfig, weights: str = "required", *, allow_download: bool = False) -> BirdNet:
    """A :class:`BirdNet` with pretrained backbone weights, in eval mode.

    Args:
        weights: 'required' (raise if missing), 'if-cached' (random init with a warning when the verified
            file is not in the cache; never downloads) or 'none' (random init, for tests and demos).
    """
    if weights not in ("required", "if-cached", "none"):
        raise ValueError(f"weights must be 'required', 'if-cached' or 'none', got {weights!r}")
    state = None
    if weights == "required":
        state = load_pretrained(cfg.backbone, allow_download=allow_download)
    elif weights == "if-cached":
        if has_pretrained(cfg.backbone):
            state = load_pretrained(cfg.backbone)
        else:
            warnings.warn(f"pretrained {cfg.backbone} weights not cached: training from random init", stacklevel=2)
    return build_net(cfg, state).eval()


def pooled_features(net: BirdNet, images: LabelledImages, cfg: ProbeConfig, desc: str) -> torch.Tensor:
    """(N, F) pooled backbone features of the centre view, computed in RAM."""
    dataset = ImageDataset(images.sources, images.names, eval_transform(data_config(cfg.backbone, cfg.image_size)))
    feats, _ = extract(
        lambda x: net.forward_features(net.forward_trunk(x)), make_loader(dataset, cfg.batch_size),
        precision=cfg.precision, desc=desc,
    )
    return feats


@dataclass
class ProbeResult:
    probe: LinearProbe
    C: float
    val_scores: dict[float, float]
    val_accuracy: float | None  # None when C was not chosen on a split
    test_accuracy: float | None
    stopwatch: Stopwatch


def run_probe(
    train: LabelledImages, test: LabelledImages | None, cfg: ProbeConfig, weights: str = "required",
    *, allow_download: bool = False,
) -> ProbeResult:
    """Fit the probe: choose C on a stratified validation split, then refit on all training images."""
    sw = Stopwatch()
    with sw("load network"):
        net = pretrained_net(NetConfig(cfg.backbone, train.num_classes, get_spec(cfg.backbone).default_split),
                             weights, allow_download=allow_download)
    with sw("train features"):
        X = pooled_features(net, train, cfg, "train features").numpy()
    with sw("choose C"):
        tr, va = stratified_split(train.labels, cfg.val_fraction, cfg.seed)
        C, scores = select_C(X[tr], train.labels[tr], X[va], train.labels[va], cfg.Cs, cfg.seed)
    with sw("fit probe"):
        probe = LinearProbe(C, random_state=cfg.seed).fit(X, train.labels)
    test_acc = None
    if test is not None:
        with sw("test features"):
            X_test = pooled_features(net, test, cfg, "test features").numpy()
        test_acc = probe.score(X_test, test.labels)
    return ProbeResult(probe, C, scores, scores.get(C), test_acc, sw)
