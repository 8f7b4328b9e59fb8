"""The recipe that defines a model: how both stages train it and how it predicts (:class:`FinetuneConfig`), its
named presets, and the one way to change one: ``PRESET`` plus ``field=value`` overrides (:func:`recipe`), the
same text on a command line and as a cross-validation candidate (``full:lr_tail=6e-4,views=6``). A checkpoint
stores its recipe alone: the network and preprocessing derive from it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property

from birds_lpft.models.net import NetConfig
from birds_lpft.models.preprocess import DataConfig, data_config
from birds_lpft.models.zoo import BackboneSpec, get_spec, input_problem
from birds_lpft.utils.settings import (
    ConfigError,
    check_choice,
    check_int,
    check_number,
    overridden,
    plain,
    require,
    split_overrides,
)

PRECISIONS = ("auto", "bf16", "fp32")
MAX_IMAGE_SIZE = 2048
MAX_MEMBERS = 16
# The fine-tune's input side: larger than MobileNetV2's own 224, since the species differ in small parts.
TRAIN_IMAGE_SIZE = 320


@dataclass(frozen=True)
class ProbeFit:
    """How stage one's probe is fitted (``python -m probe`` and the fine-tune's LP init alike)."""

    val_fraction: float = 0.2  # each class's share held out to choose C (then refitted on every image)
    Cs: tuple[float, ...] = (0.002, 0.005, 0.01, 0.02, 0.05)  # the LogisticRegression C values tried

    def __post_init__(self):
        check_number("probe.val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)
        require(isinstance(self.Cs, tuple) and len(self.Cs) >= 1, "probe.Cs",
                f"must be a non-empty tuple; got {self.Cs!r}")
        for C in self.Cs:
            check_number("probe.Cs", C, 0, 1e6, low_open=True)


def checked_spec(cfg) -> BackboneSpec:
    """``cfg.spec``, or a ConfigError naming the backbone setting."""
    try:
        return cfg.spec
    except ValueError as err:
        raise ConfigError("backbone", str(err)) from None


def check_size(field: str, spec: BackboneSpec, size) -> None:
    """An input side the backbone takes: a whole number from its smallest to MAX_IMAGE_SIZE, on which its
    blocks run (a dry forward pass on the meta device)."""
    check_int(field, size, spec.min_image_size, MAX_IMAGE_SIZE)
    problem = input_problem(spec.name, size)
    require(problem is None, field, f"{problem}; choose a size the backbone takes")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a model, each field checked here; the shipped one is ``PRESETS["full"]``."""

    backbone: str = "mobilenet_v2"  # a torchvision classification model's name, or timm/NAME
    image_size: int = TRAIN_IMAGE_SIZE  # the input side of training views, the probe and classify
    split: int | None = None  # the first trainable block (before it: the frozen trunk); None: the backbone's own
    pooling: str = "avg"  # or 'gem': generalised mean, p learnt
    dropout: float = 0.0  # before the head
    views: int = 4  # augmented views cached per training image, beside its centre view (one more training view)
    crop_scale: tuple[float, float] = (0.3, 1.0)  # RandomResizedCrop's area range of the augmented views
    jitter: float = 0.2  # their brightness / contrast / saturation jitter
    epochs: int = 3  # passes over every cached view
    batch_size: int = 32  # cached views per optimisation step
    lr_head: float = 1e-3  # AdamW's peak learning rate of the head and pooling
    lr_tail: float = 3e-4  # and of the trainable blocks
    weight_decay: float = 0.05  # AdamW's, on conv and linear weights only
    warmup_fraction: float = 0.05  # share of the steps warming up linearly before the cosine decay
    label_smoothing: float = 0.1
    members: int = 1  # tails + heads trained one after the other on one cache, each its own data order
    cotuning: float = 0.0  # weight of Co-Tuning's loss on the pretrained ImageNet head (0: off)
    distill: float = 0.0  # weight of distilling the trained members into one fresh student, shipped (0: off)
    probe: ProbeFit = field(default_factory=ProbeFit)  # how stage one fits the probe that initialises the head
    tta_flip: bool = True  # predict with each image's mirror too
    precision: str = "auto"  # of extraction and prediction: bf16 where the hardware runs it natively, else fp32
    train_precision: str = "auto"  # of the tail's training: bf16-mixed where native, else fp32
    cache_dtype: str = "float16"  # of the cached trunk activations
    limit_train_batches: float | int = 1.0  # Lightning's cap on steps per epoch
    extract_batch_size: int = 16  # images per trunk forward pass
    seed: int = 0  # everything random derives from it

    def __post_init__(self):
        spec = checked_spec(self)
        check_size("image_size", spec, self.image_size)
        if self.split is not None:
            check_int("split", self.split, 0, spec.num_blocks)
        self._check_training()
        self._check_levers()
        self._check_views()
        require(isinstance(self.probe, ProbeFit), "probe", "must be a ProbeFit")
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("train_precision", self.train_precision, PRECISIONS)
        check_choice("cache_dtype", self.cache_dtype, ("float16", "bfloat16", "float32"))
        check_int("extract_batch_size", self.extract_batch_size, 1)
        check_int("seed", self.seed, 0, 2**32 - 1)  # numpy's generators take seeds below 2**32

    def _check_training(self) -> None:
        check_choice("pooling", self.pooling, ("avg", "gem"))
        check_number("dropout", self.dropout, 0, 1, high_open=True)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_number("lr_head", self.lr_head, 0, 10, low_open=True)
        check_number("lr_tail", self.lr_tail, 0, 10, low_open=True)
        check_number("weight_decay", self.weight_decay, 0, 10)
        check_number("warmup_fraction", self.warmup_fraction, 0, 1, high_open=True)
        check_number("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        limit = self.limit_train_batches
        if type(limit) is int:
            check_int("limit_train_batches", limit, 1)
        else:
            check_number("limit_train_batches", limit, 0, 1, low_open=True)

    def _check_levers(self) -> None:
        check_int("members", self.members, 1, MAX_MEMBERS)
        for name in ("cotuning", "distill"):
            check_number(name, getattr(self, name), 0, 100)

    def _check_views(self) -> None:
        check_int("views", self.views, 0)
        scale = self.crop_scale
        require(isinstance(scale, tuple) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale)
                and 0 < scale[0] <= scale[1] <= 1, "crop_scale", f"must be (low, high) with 0 < low <= high <= 1; "
                f"got {scale!r}")
        check_number("jitter", self.jitter, 0, 1)
        require(isinstance(self.tta_flip, bool), "tta_flip", f"must be True or False; got {self.tta_flip!r}")

    @cached_property
    def spec(self) -> BackboneSpec:
        """The backbone, resolved once (``birds_lpft.models.zoo.get_spec``)."""
        return get_spec(self.backbone)

    @property
    def trunk_split(self) -> int:
        """The first trainable block: ``split``, else the backbone's own default."""
        return self.split if self.split is not None else self.spec.default_split

    @property
    def shipped_members(self) -> int:
        """How many tails the shipped network runs: one for a distilled student."""
        return 1 if self.distill > 0 else self.members

    def on_backbone(self, backbone: str) -> FinetuneConfig:
        """This recipe on another backbone. A split counts its own backbone's blocks, so another backbone
        takes its own default split: the one place this rule is written."""
        return self if backbone == self.backbone else replace(self, backbone=backbone, split=None)

    def members_config(self, num_classes: int) -> NetConfig:
        """The network that is trained: ``members`` tails on one trunk."""
        return NetConfig(self.backbone, num_classes, self.trunk_split, self.dropout, self.pooling, self.members)

    def net_config(self, num_classes: int) -> NetConfig:
        """The shipped network for ``num_classes`` species (the members, or the one network made of them)."""
        return replace(self.members_config(num_classes), members=self.shipped_members)

    def data_config(self) -> DataConfig:
        """This recipe's preprocessing, in training and prediction: the backbone weights' own, at ``image_size``."""
        return data_config(self.spec, self.image_size)

    def to_dict(self) -> dict:
        """Plain values (tuples as lists): what a checkpoint stores."""
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, fields: dict) -> FinetuneConfig:
        """The recipe a :meth:`to_dict` (or any subset of its fields) describes, each field checked."""
        flat = {f"probe.{k}": v for k, v in fields.get("probe", {}).items()}
        flat.update({k: v for k, v in fields.items() if k != "probe"})
        return overridden(cls(), without_retired(flat))


# Fields that left the code, with their off values: a recipe stored before then names them, and off they change
# nothing. On, each is refused in one line naming the last commit that runs it, and why it left.
LEVER = ("ae9c2c5", "a lever that did not beat the shipped recipe in cross-validation (docs/experiments.md)")
VALIDATION = ("152c5a6", "stage two's validation split (the benchmark holds its images out itself)")
RETIRED = {"mix": ("none", *LEVER), "mix_alpha": (1.0, *LEVER), "ema_decay": (0.0, *LEVER), "swa": (0.0, *LEVER),
           "average": ("logits", *LEVER), "supcon": (0.0, *LEVER), "l2sp": (0.0, *LEVER), "test_size": (None, *LEVER),
           "tta_crops": ((), *LEVER), "val_fraction": (0.0, *VALIDATION)}


def without_retired(changes: dict) -> dict:
    """``changes`` less the retired fields at their off values; one that is on is a ConfigError saying where it
    still runs."""
    for name, (off, commit, why) in RETIRED.items():
        value = changes.get(name, off)
        require(plain(value) == plain(off), name, f"retired after commit {commit}: {why}; {name}={value!r} needs "
                f"that code: git checkout {commit}")
    return {k: v for k, v in changes.items() if k not in RETIRED}


PRESETS: dict[str, FinetuneConfig] = {
    # The recipe before cross-validation chose one, kept as a baseline.
    "v1": FinetuneConfig(train_precision="fp32"),
    # The shipped recipe, chosen by k-fold CV on the training images (docs/results/): GeM pooling, as the species
    # differ in small parts that an average washes out; the tail from block 11, the whole 96-channel stage.
    "full": FinetuneConfig(pooling="gem", split=11, lr_tail=6e-4),
    # The grader's smoke run: the same pipeline, small input, one view, one short epoch, the default tail.
    "fast": FinetuneConfig(image_size=160, views=1, epochs=1, limit_train_batches=8, probe=ProbeFit(Cs=(0.01,)),
                           train_precision="fp32"),
}


def recipe(spec: str, overrides: Iterable[str] = ()) -> FinetuneConfig:
    """``'PRESET[:field=value,...]'`` and more ``field=value`` overrides -> the checked recipe.

    Commas inside values (``crop_scale=(0.2, 1.0)``) stay; dotted keys reach the probe's fields
    (``probe.Cs=(0.01,)``). A new backbone takes its own default split unless one is given.

    Raises:
        ConfigError: an unknown preset or field, or a value of the wrong type or out of range.
    """
    name, _, rest = spec.partition(":")
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    items = [item for item in re.split(r",(?=\s*[\w.]+\s*=)", rest) if item.strip()]
    changes = without_retired(split_overrides([*items, *overrides]))
    base = PRESETS[name]
    backbone = changes.get("backbone")
    if isinstance(backbone, str) and "split" not in changes:
        del changes["backbone"]
        base = base.on_backbone(backbone)
    return overridden(base, changes)


def grader_recipe(fast_train: bool, shipped: dict | None = None) -> FinetuneConfig:
    """What the grader interface trains: the shipped model's recipe (the build writes it into the grader file),
    else the 'full' preset; with ``fast_train`` the 'fast' smoke run on the same backbone."""
    full = FinetuneConfig.from_dict(shipped) if shipped is not None else PRESETS["full"]
    return PRESETS["fast"].on_backbone(full.backbone) if fast_train else full


# The common fields, also as flags of the commands that train: --epochs 2 is epochs=2.
ALIASES = ("backbone", "image_size", "views", "epochs", "split", "batch_size", "lr_head", "lr_tail", "seed")


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """``--preset`` (default 'full') and the alias flags, each of which becomes a ``field=value`` override."""
    parser.add_argument("--preset", default="full", choices=sorted(PRESETS),
                        help="the recipe to start from (default: full, the shipped one)")
    for name in ALIASES:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"alias_{name}", default=None, metavar="VALUE",
                            help=f"the same as {name}=VALUE (full preset: {getattr(PRESETS['full'], name)})")


def alias_overrides(args: argparse.Namespace) -> list[str]:
    """The alias flags given, as the ``field=value`` overrides they stand for."""
    return [f"{name}={getattr(args, f'alias_{name}')}" for name in ALIASES
            if getattr(args, f"alias_{name}", None) is not None]
