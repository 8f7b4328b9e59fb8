"""Stage two (LP-FT fine-tuning): what is frozen stays frozen, the head starts from the probe, the trunk
cache, the schedule, the checkpoint, and tiny end-to-end runs of ``fine_tune`` and ``python -m finetune``
that write nothing but ``--out``. Random-init networks and generated images only."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import birds_lpft.memory as memory
from birds_lpft.classifier import Classifier
from birds_lpft.data.images import ImageDataset
from birds_lpft.data.sets import load_split_dir
from birds_lpft.data.synthetic import make_synthetic, write_grader_layout
from birds_lpft.extract import extract
from birds_lpft.models.net import NetConfig, build_net
from birds_lpft.models.preprocess import EvalTransform, Mirrored, data_config
from birds_lpft.models.zoo import get_spec
from birds_lpft.recipe import PRESETS, RETIRED, FinetuneConfig, ProbeFit, recipe
from birds_lpft.utils.settings import ConfigError, plain

from probe.linear import fit_probe, init_head_from_probe, linear_probe

import finetune.__main__ as finetune_cli
import finetune.stage_one as finetune_stage_one
import finetune.train as finetune_train
from finetune.cache import CachedViews, View, ViewBatches, cache_views, extract_views
from finetune.datamodule import TrunkCacheData
from finetune.module import LPFTModule, TrunkFreeze, warmup_cosine
from finetune.stage_one import pooled_from_trunk
from finetune.train import FinetuneResult, fine_tune, train_tops

from conftest import calibrate_batchnorm, make_classifier, snapshot

SIZE = 64  # network input side of every test here: split 14 gives (96, 4, 4) trunk activations
TINY = replace(PRESETS["fast"], image_size=SIZE, batch_size=8, limit_train_batches=2)
TRAINER = dict(accelerator="cpu", devices=1)


# --------------------------------------------------------------------------- helpers


def _inputs(images, image_size: int = SIZE) -> torch.Tensor:
    """The evaluation view of every image as one (N, 3, S, S) batch."""
    transform = EvalTransform(data_config(get_spec("mobilenet_v2"), image_size))
    dataset = ImageDataset(images.sources, images.names, transform)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _class_acts(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 96, 4, 4) O(1) random 'trunk activations' with a class-dependent pattern, and their labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    centres = torch.randn(k, 96, 4, 4, generator=g)
    return centres[y] * 2 + torch.randn(n, 96, 4, 4, generator=g), y


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _bn_buffers(net: nn.Module) -> list[str]:
    return [f"{name}.{b}" for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in ("running_mean", "running_var", "num_batches_tracked")]


class Spy(L.Callback):
    """Records, during ``fit``, what the trainer really trains: grads, modes, learning rates."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # the rates this step uses: the scheduler has stepped after the previous batch, not yet after this one
        self._lrs = [(g["lr"], g["initial_lr"]) for g in trainer.optimizers[0].param_groups]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        net = pl_module.net
        self.steps.append({
            "trunk_requires_grad": [p.requires_grad for p in net.trunk.parameters()],
            "tail_requires_grad": [p.requires_grad for p in net.tail.parameters()],
            "head_requires_grad": [p.requires_grad for p in net.head.parameters()],
            "bn_training": [m.training for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)],
            "dropout_training": net.dropout.training,
            "lrs": self._lrs,
            "step": trainer.global_step - 1,
        })


def train_tail(net, stacks, cfg, **kwargs):
    """Stage one and the tail on cached stacks through ``train_tops`` (the fine-tune's own path); its module."""
    labels = stacks.labels.numpy()
    data = TrunkCacheData.from_stacks(labels, stacks.stacks[0], stacks.stacks[1:], np.arange(len(labels)), cfg)
    return train_tops(net, data, cfg, **kwargs).modules[0]


@pytest.fixture
def spy(monkeypatch) -> Spy:
    """A :class:`Spy` added to every Trainer that ``finetune.train`` builds (its own callbacks kept)."""
    spy, make = Spy(), finetune_train.make_trainer

    def make_trainer(*args, **kwargs):
        trainer = make(*args, **kwargs)
        assert any(isinstance(c, TrunkFreeze) for c in trainer.callbacks)
        trainer.callbacks.append(spy)
        return trainer

    monkeypatch.setattr(finetune_train, "make_trainer", make_trainer)
    return spy


# --------------------------------------------------------------------------- what a training step may change


@pytest.mark.parametrize("mode", ["eval", "train"])  # fine_tune passes an eval-mode net
def test_train_tail_changes_only_tail_and_head(mode, spy):
    torch.manual_seed(0)
    net = build_net(NetConfig("mobilenet_v2", 3, TINY.trunk_split, 0.2)).train(mode == "train")
    acts, y = _class_acts(24, 3, seed=1)
    before = _state(net)

    module = train_tail(net, CachedViews([acts, acts.flip(3)], y), TINY, progress=False, **TRAINER)
    after = net.state_dict()

    assert len(spy.steps) == 2  # limit_train_batches: two real optimisation steps ran
    for step in spy.steps:
        assert not any(step["trunk_requires_grad"])
        assert all(step["tail_requires_grad"]) and all(step["head_requires_grad"])
    # the frozen trunk is bit-identical
    for name in before:
        if name.startswith("trunk."):
            assert torch.equal(after[name], before[name]), name
    # no BatchNorm statistic anywhere (trunk and tail) moved
    buffers = _bn_buffers(net)
    assert any(b.startswith("trunk.") for b in buffers) and any(b.startswith("tail.") for b in buffers)
    for name in buffers:
        assert torch.equal(after[name], before[name]), name
    # ... while every tail convolution and the head did learn
    tail_convs = [f"tail.{n}.weight" for n, m in net.tail.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(tail_convs) > 5
    for name in tail_convs + ["head.weight", "head.bias"]:
        assert not torch.equal(after[name], before[name]), name
    assert not net.training and len(module.history) == 1


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_train_tail_pins_batchnorm_and_keeps_dropout_during_training(mode, spy):
    net = build_net(NetConfig("mobilenet_v2", 3, TINY.trunk_split, 0.2)).train(mode == "train")
    acts, y = _class_acts(16, 3, seed=2)
    train_tail(net, CachedViews([acts], y), TINY, progress=False, **TRAINER)
    assert spy.steps
    for step in spy.steps:
        assert not any(step["bn_training"])  # running statistics used, never updated
        assert step["dropout_training"]  # cfg.dropout really regularises the head


def test_trunk_freeze_callback_freezes_trunk_and_the_other_members():
    net = build_net(NetConfig("mobilenet_v2", 3, TINY.trunk_split, members=3))
    TrunkFreeze().freeze_before_training(LPFTModule(net, TINY))
    assert not any(p.requires_grad for p in net.trunk.parameters())
    assert all(p.requires_grad for p in net.tail.parameters()) and all(p.requires_grad for p in net.head.parameters())
    assert not any(p.requires_grad for p in net.extra.parameters())
    TrunkFreeze().freeze_before_training(LPFTModule(net, TINY, member=2))  # the next member's turn
    assert all(p.requires_grad for p in net.member(2).parameters())
    assert not any(p.requires_grad for i in (0, 1) for p in net.member(i).parameters())
    assert not any(p.requires_grad for p in net.trunk.parameters())


def test_training_follows_the_lr_schedule(spy):
    cfg = replace(TINY, lr_head=2e-3, lr_tail=5e-4, limit_train_batches=3, warmup_fraction=0.0)
    acts, y = _class_acts(24, 3, seed=3)
    train_tail(build_net(NetConfig("mobilenet_v2", 3, cfg.trunk_split)).eval(), CachedViews([acts], y), cfg,
               progress=False, **TRAINER)
    assert [s["step"] for s in spy.steps] == [0, 1, 2]
    factors = _factors(3, 0)
    for s in spy.steps:
        factor = factors[s["step"]]
        assert {peak for _, peak in s["lrs"]} == {cfg.lr_head, cfg.lr_tail}
        for lr, peak in s["lrs"]:
            assert lr == pytest.approx(peak * factor)
    assert spy.steps[1]["lrs"][0][0] < spy.steps[0]["lrs"][0][0]  # the cosine decays within the run


# --------------------------------------------------------------------------- the head starts from the probe


def test_stage_one_head_equals_probe_decision_function():
    k = 3
    images = make_synthetic(num_classes=k, per_class=8, size=48, seed=3)
    cfg = replace(TINY, probe=ProbeFit(Cs=(1.0,)))
    data_cfg = cfg.data_config()
    net = calibrate_batchnorm(build_net(NetConfig(cfg.backbone, k, cfg.trunk_split, cfg.dropout)), _inputs(images))

    (centre,) = extract_views(net, images, cache_views(data_cfg, cfg)[:1], cfg, progress=False)
    assert centre.dtype == torch.float16 and centre.shape == (len(images), 96, 4, 4)
    feats = pooled_from_trunk(net, centre).numpy()
    assert feats.shape == (len(images), net.head.in_features) and feats.std() > 1e-3
    fitted = fit_probe(feats, images.labels, cfg.probe, cfg.seed)
    assert fitted.C == 1.0 and fitted.val_accuracy is None  # one C: nothing chosen
    init_head_from_probe(net.head, fitted.probe)

    # the module that fine-tunes starts exactly where the probe ends
    module = LPFTModule(net, cfg).eval()
    with torch.no_grad():
        logits = module(centre).numpy()
    d = fitted.probe.decision_function(feats)
    assert d.shape == (len(images), k) and np.abs(d).max() > 0.5  # a real, non-trivial probe
    np.testing.assert_allclose(logits, d, rtol=0, atol=1e-4)


def test_pooled_features_do_not_depend_on_the_batch_size():
    # the shipped shape (block 11's input at 320 px); at a 4x4 map, batches of 1 or 7 differ by ~1e-11
    net = build_net(NetConfig("mobilenet_v2", 3, 11, pooling="gem")).eval()
    acts = torch.randn(24, 64, 20, 20).relu().half()
    small = pooled_from_trunk(net, acts)  # the default batch, chosen for speed (the last one holds 8)
    assert all(torch.equal(small, pooled_from_trunk(net, acts, batch_size=b)) for b in (7, 24))


def test_fit_probe_chooses_C_on_a_split_then_refits_on_everything():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 8)
    feats = rng.normal(size=(24, 16)) + labels[:, None]
    cfg = ProbeFit(val_fraction=0.25, Cs=(0.1, 1.0))
    fitted = fit_probe(feats, labels, cfg, seed=0)
    assert fitted.C in cfg.Cs and set(fitted.val_scores) == set(cfg.Cs) and 0.0 <= fitted.val_accuracy <= 1.0
    expected = linear_probe(fitted.C, random_state=0).fit(feats, labels)
    np.testing.assert_allclose(fitted.probe.decision_function(feats), expected.decision_function(feats), atol=1e-10)


class HeadCheck(L.Callback):
    """At the start of training: the head in training reproduces the probe's decision function."""

    def __init__(self, probes: list):
        self.probes, self.checked = probes, 0

    def on_train_start(self, trainer, pl_module):
        centre, member = trainer.datamodule.train_set.stacks[0], pl_module.top  # this fit's member
        with torch.no_grad():
            feats = member.eval().forward_head(member.forward_tail(centre), pre_logits=True).numpy()
            logits = pl_module.eval()(centre).numpy()
        pl_module.train()
        np.testing.assert_allclose(logits, self.probes[0].decision_function(feats), rtol=0, atol=1e-4)
        self.checked += 1


class MemoryKept(L.Callback):
    """Whether freed memory is kept for the next step (``birds_lpft.extract.reusing_freed_memory``) at each step."""

    def __init__(self):
        self.depths = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.depths.append(memory._reuse_depth)


def test_every_training_step_reuses_freed_memory_and_training_hands_it_back(monkeypatch):
    calls = []
    monkeypatch.setattr(memory, "_glibc", lambda name, *args: calls.append((name, *args)))
    check = MemoryKept()
    fine_tune(make_synthetic(num_classes=3, per_class=6, size=48, seed=4), replace(TINY, members=2), "none",
              progress=False, callbacks=[check], **TRAINER)
    assert len(check.depths) >= 2 and all(d >= 1 for d in check.depths)  # every step of both members
    assert memory._reuse_depth == 0 and calls[-1] == ("malloc_trim", 0)


def test_fine_tune_trains_from_the_probe_head(monkeypatch):
    """fine_tune wires the pieces: the net the trainer trains has the probe as its head (every member)."""
    k = 3
    images = make_synthetic(num_classes=k, per_class=6, size=48, seed=4)
    cfg = replace(TINY, probe=ProbeFit(Cs=(1.0,)), members=2)
    nets, probes = [], []

    def calibrated_net(net_cfg, weights, allow_download=False, weights_file=None):
        assert (weights, allow_download, net_cfg.num_classes, net_cfg.members) == ("none", False, k, 2)
        nets.append(calibrate_batchnorm(build_net(net_cfg), _inputs(images)))
        return nets[-1]

    def capture_probe(head, probe):
        probes.append(probe)
        return init_head_from_probe(head, probe)

    monkeypatch.setattr(finetune_train, "pretrained_net", calibrated_net)
    monkeypatch.setattr(finetune_stage_one, "init_head_from_probe", capture_probe)
    check = HeadCheck(probes)
    result = fine_tune(images, cfg, "none", progress=False, callbacks=[check], **TRAINER)
    assert check.checked == 2 and len(probes) == 2 and probes[0] is probes[1]  # both members, one probe
    assert result.classifier.net is nets[0]


# --------------------------------------------------------------------------- schedule


def _factors(total: int, warmup: int) -> list[float]:
    """The learning rate ``warmup_cosine`` gives each step of a group whose peak is 1."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = warmup_cosine(optimizer, total, warmup)
    factors = []
    for _ in range(total + 1):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return factors


@pytest.mark.parametrize("total, warmup", [(100, 10), (37, 5), (10, 0), (1165, 58)])
def test_warmup_then_cosine(total, warmup):
    f = _factors(total, warmup)
    # linear warm-up reaching the peak on its last step
    if warmup:
        np.testing.assert_allclose(f[:warmup], [(s + 1) / warmup for s in range(warmup)], atol=1e-12)
    assert max(f) == pytest.approx(1.0) and f[warmup] == pytest.approx(1.0) and 0.0 < f[0] <= 1.0
    # cosine after it, the closed form to rounding: monotone non-increasing, half-way one half, 0 at the end
    after = f[warmup:]
    closed = [0.5 * (1 + math.cos(math.pi * s / max(1, total - warmup))) for s in range(total - warmup + 1)]
    np.testing.assert_allclose(after, closed, atol=1e-12)
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(after))
    assert after[-1] == pytest.approx(0.0, abs=1e-12) and f[total - 1] < 0.03


# --------------------------------------------------------------------------- the trunk cache


def test_cached_views_indexing():
    n, views = 5, 3
    stacks = [torch.arange(n * 2, dtype=torch.float16).view(n, 2) + 100 * v for v in range(views)]
    labels = np.array([2, 0, 1, 1, 0])
    ds = CachedViews(stacks, labels)
    assert len(ds) == views * n
    assert ds.labels.dtype == torch.long
    for i in range(len(ds)):
        act, label = ds[i]
        assert torch.equal(act, stacks[i // n][i % n]), i
        assert int(label) == labels[i % n]
    assert ds.nbytes == views * n * 2 * 2
    with pytest.raises(ValueError):
        CachedViews([torch.zeros(5, 2), torch.zeros(4, 2)], labels)
    with pytest.raises(ValueError):
        CachedViews([torch.zeros(6, 2)], labels)


def test_augmented_views_are_seeded_and_differ_across_views():
    images = make_synthetic(num_classes=2, per_class=3, size=48, seed=5)
    cfg = replace(TINY, views=2, cache_dtype="float32", seed=7)
    data_cfg = cfg.data_config()
    net = build_net(NetConfig(cfg.backbone, 2, cfg.trunk_split)).eval()

    state = torch.get_rng_state()
    centre, *first = extract_views(net, images, cache_views(data_cfg, cfg), cfg, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left as it was
    torch.rand(1000)  # whatever the global RNG did in between
    second = extract_views(net, images, cache_views(data_cfg, cfg)[1:], cfg, progress=False)
    assert len(first) == len(second) == cfg.views
    for a, b in zip(first, second, strict=True):
        assert a.shape == (len(images), 96, 4, 4) and a.dtype == torch.float32 and a.abs().max() > 0
        assert torch.equal(a, b)  # a view's draws do not depend on which other views share the pass
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], centre)
    other_seed = extract_views(net, images, cache_views(data_cfg, replace(cfg, seed=8))[1:], cfg, progress=False)
    assert not torch.equal(other_seed[0], first[0])


def _one_pass_per_view(net, images, views, cfg) -> list[torch.Tensor]:
    """The cache as it was extracted before views shared a pass: each view a pass of its own over the images
    (every image decoded again), a random one after ``torch.manual_seed`` of its seed."""
    out = []
    for view in views:
        if view.seed is not None:
            torch.manual_seed(view.seed)
        dataset = ImageDataset(images.sources, images.names, view.transform)
        loader = DataLoader(dataset, batch_size=cfg.extract_batch_size)
        out.append(extract(net.forward_trunk, loader, precision=cfg.precision, out_dtype=torch.float16,
                           progress=False))
    return out


@pytest.mark.parametrize("size", [48, 400, 700])  # JPEG drafting: none; the centre view only; every view, unlike
def test_one_pass_gives_the_cache_of_one_pass_per_view_bit_for_bit(tmp_path, size):
    images = make_synthetic(num_classes=2, per_class=5, size=size, seed=2)
    write_grader_layout(tmp_path, "train", images)  # JPEG files: decoded (and drafted) as real photos are
    images = load_split_dir(tmp_path, "train")
    cfg = replace(TINY, views=3, extract_batch_size=4, jitter=0.3)
    net = build_net(NetConfig(cfg.backbone, 2, cfg.trunk_split)).eval()
    views = cache_views(cfg.data_config(), cfg, rank=1)
    views.insert(1, View("mirror", Mirrored(views[0].transform)))
    fused = extract_views(net, images, views, cfg, progress=False)
    for name, a, b in zip([v.name for v in views], fused, _one_pass_per_view(net, images, views, cfg), strict=True):
        assert torch.equal(a, b), name


def test_view_batches_come_one_view_at_a_time_and_repeat_pass_for_pass():
    images = make_synthetic(num_classes=2, per_class=3, size=48, seed=2)
    views = cache_views(replace(TINY, image_size=SIZE).data_config(), replace(TINY, views=2))
    batches = ViewBatches(images, views, batch_size=4)
    first, second = list(batches), list(batches)
    assert [(k, idx.tolist()) for _, idx, k in first] == [
        (k, idx) for idx in ([0, 1, 2, 3], [4, 5]) for k in range(3)] and len(batches) == len(first)
    assert all(x.shape == (len(idx), 3, SIZE, SIZE) for x, idx, _ in first)
    for (a, _, _), (b, _, _) in zip(first, second, strict=True):
        assert torch.equal(a, b)  # every stream starts afresh with each pass
    assert not torch.equal(first[1][0], first[2][0])  # the two random views draw apart


# --------------------------------------------------------------------------- the checkpoint


def _classifier(k: int, split: int, image_size: int, tta_flip: bool, dropout: float = 0.3) -> Classifier:
    torch.manual_seed(k * 100 + split)
    net_cfg = NetConfig("mobilenet_v2", k, split, dropout)
    net = calibrate_batchnorm(build_net(net_cfg), torch.randn(8, 3, image_size, image_size))
    return make_classifier(net, net_cfg, image_size, tta_flip)


@pytest.mark.parametrize("k, split, image_size, tta_flip", [(3, 14, 64, True), (7, 16, 96, False), (4, 14, 64, True)])
def test_checkpoint_round_trip(tmp_path, k, split, image_size, tta_flip):
    original = _classifier(k, split, image_size, tta_flip)
    path = tmp_path / "m.pt"
    original.save(path)

    torch.manual_seed(12345)  # the rebuilt network's random init must not matter
    loaded = Classifier.load(path)
    assert isinstance(loaded, Classifier) and not loaded.training and not loaded.net.training
    assert (loaded.net_cfg, loaded.data_cfg, loaded.recipe) == (original.net_cfg, original.data_cfg, original.recipe)
    assert loaded.recipe.tta_flip == tta_flip
    assert len(loaded.net.trunk) == split and loaded.net.head.out_features == k
    assert loaded.data_cfg.image_size == image_size
    for name, value in original.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[name], value), name

    x = torch.randn(4, 3, image_size, image_size)
    with torch.no_grad():
        expected = original.eval().net(x)
        assert expected.std() > 1e-3  # logits depend on the weights, not just on the head bias
        assert torch.equal(loaded.net(x), expected)
    images = make_synthetic(num_classes=2, per_class=2, size=48, seed=9)
    a = original.predict_logits(images.sources, images.names, precision="fp32").logits
    b = loaded.predict_logits(images.sources, images.names, precision="fp32").logits
    assert a.shape == (4, k) and torch.equal(a, b)


def _legacy(clf: Classifier, version: int, with_recipe: bool) -> dict:
    """``clf``'s checkpoint as format ``version`` wrote it: the network's and the preprocessing's configs beside
    the state dict, and the recipe only where one was stored (format 1: no pooling, no class names either)."""
    data = {"image_size": clf.data_cfg.image_size, "resize_size": clf.data_cfg.resize_size,
            "mean": list(clf.data_cfg.mean), "std": list(clf.data_cfg.std), "interpolation": "bilinear"}
    net = {"backbone": "mobilenet_v2", "num_classes": clf.num_classes, "split": clf.net_cfg.split,
           "dropout": clf.net_cfg.dropout, **({"pooling": "avg", "members": 1} if version == 2 else {})}
    ckpt = {"format": f"birds-lpft/{version}", "net": net, "data": data, "tta_flip": clf.recipe.tta_flip,
            "state_dict": clf.net.state_dict(), "recipe": _with_retired(clf.recipe.to_dict()) if with_recipe else None}
    return {**ckpt, "class_names": None} if version == 2 else ckpt


def _with_retired(fields: dict) -> dict:
    """A recipe as an older build stored it: every field since retired, at its off value."""
    return {**fields, **{name: plain(off) for name, (off, *_) in RETIRED.items()}}


@pytest.mark.parametrize("version, with_recipe", [(2, True), (2, False), (1, False)])
def test_older_checkpoints_still_load_and_predict_as_before(tmp_path, version, with_recipe):
    clf = _classifier(3, 14, 64, True, dropout=0.0)
    torch.save(_legacy(clf, version, with_recipe), tmp_path / "old.pt")
    loaded = Classifier.load(tmp_path / "old.pt")
    assert (loaded.net_cfg, loaded.data_cfg, loaded.recipe.tta_flip) == (clf.net_cfg, clf.data_cfg, True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.net(x), clf.net(x))


RETIRED_ON = {"mix": "cutmix", "mix_alpha": 0.4, "ema_decay": 0.998, "swa": 0.5, "average": "weights", "supcon": 0.2,
              "l2sp": 1.0, "test_size": 96, "tta_crops": (0.75, 1.0), "val_fraction": 0.2}


def test_retired_names_are_no_fields_and_each_has_a_case_below():
    assert set(RETIRED) == set(RETIRED_ON)  # a field of that name would be dropped from every stored recipe
    assert not set(RETIRED) & {f.name for f in dataclasses.fields(FinetuneConfig)}


@pytest.mark.parametrize("name, on", sorted(RETIRED_ON.items()))
def test_retired_fields_load_at_their_off_values_and_are_refused_on(tmp_path, name, on):
    clf = _classifier(3, 14, 64, True, dropout=0.0)
    clf.save(tmp_path / "m.pt")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    off, commit, _ = RETIRED[name]
    ckpt["recipe"] = _with_retired(ckpt["recipe"])
    torch.save(ckpt, tmp_path / "old.pt")
    assert Classifier.load(tmp_path / "old.pt").recipe == clf.recipe
    ckpt["recipe"][name] = plain(on)
    torch.save(ckpt, tmp_path / "on.pt")
    why = rf"{name}: retired after commit {commit}: .*; {name}=.* needs that code: git checkout {commit}"
    with pytest.raises(ValueError, match=rf"on\.pt: not a valid checkpoint: its recipe's {why}"):
        Classifier.load(tmp_path / "on.pt")
    with pytest.raises(ConfigError, match=why):
        recipe(f"full:{name}={on}")
    assert recipe(f"full:{name}={off!r}") == PRESETS["full"]


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_checkpoint_load_refuses_non_checkpoints(tmp_path):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "birds-lpft/1", "payload": _RunsCodeWhenUnpickled(marker)}, evil)
    with pytest.raises(ValueError, match="cannot read this checkpoint"):
        Classifier.load(evil)
    assert not marker.exists()  # weights_only: the pickle's code never ran

    good = _classifier(3, 14, 64, True).checkpoint()
    for bad in ({"state_dict": good["state_dict"]}, {**good, "format": "something-else/1"}, torch.zeros(3), [1, 2]):
        path = tmp_path / "bad.pt"
        torch.save(bad, path)
        with pytest.raises(ValueError, match="not a valid checkpoint"):
            Classifier.load(path)


# --------------------------------------------------------------------------- end to end


def test_fine_tune_end_to_end_tiny():
    train = make_synthetic(num_classes=3, per_class=6, size=48, seed=0)
    test = make_synthetic(num_classes=3, per_class=2, size=48, seed=1)
    result = fine_tune(train, TINY, "none", progress=False, **TRAINER)

    assert isinstance(result, FinetuneResult) and result.cfg == TINY
    assert result.fitted.C in TINY.probe.Cs
    clf = result.classifier
    assert isinstance(clf, Classifier) and not clf.net.training
    assert clf.data_cfg == data_config(get_spec("mobilenet_v2"), SIZE) and clf.recipe == TINY
    assert clf.net_cfg == NetConfig("mobilenet_v2", 3, TINY.trunk_split, TINY.dropout)
    assert [row["epoch"] for row in result.history] == [1]
    assert all(math.isfinite(v) for row in result.history for v in row.values())
    # every fit image, centre view + cfg.views augmented views, fp16
    assert result.cache_images == len(train)
    assert result.cache_bytes == len(train) * (TINY.views + 1) * 96 * 4 * 4 * 2
    # limit_train_batches=2 of 36 cached views: two full batches per epoch went through the tail
    assert result.trained_samples == 2 * TINY.batch_size * TINY.epochs

    logits = clf.predict_logits(test.sources, test.names).logits
    assert logits.shape == (len(test), 3) and torch.isfinite(logits).all()
    preds = logits.argmax(1).tolist()
    assert len(preds) == len(test) and all(type(p) is int and 0 <= p < 3 for p in preds)


# --------------------------------------------------------------------------- writes nothing but --out


def test_fine_tune_writes_nothing(watched):
    snap = watched
    before = snap()
    fine_tune(make_synthetic(num_classes=3, per_class=5, size=48, seed=0), TINY, "none", progress=False, **TRAINER)
    assert snap() == before


def test_cli_without_out_writes_nothing(watched, capsys):
    snap = watched
    before = snap()
    finetune_cli.main(["--random-init", "--preset", "fast", "--image-size", str(SIZE), "--no-progress"])
    out = capsys.readouterr().out
    assert "test accuracy:" in out and "checkpoint written" not in out
    assert snap() == before
    assert not any(p.name in ("lightning_logs", "checkpoints") for p in Path.cwd().rglob("*"))


def test_cli_on_grader_layout_writes_only_out(tmp_path, watched, capsys):
    dirs, snap = watched.dirs, watched
    data = tmp_path / "data"
    write_grader_layout(data, "train", make_synthetic(num_classes=3, per_class=6, size=48, seed=0))
    write_grader_layout(data, "test", make_synthetic(num_classes=3, per_class=2, size=48, seed=1))
    before, data_before = snap(), snapshot(data)
    out = dirs["cwd"] / "m.pt"

    finetune_cli.main([str(data), "--random-init", "--preset", "fast", "--image-size", str(SIZE), "--no-progress",
                       "--out", str(out)])

    printed = capsys.readouterr().out
    accuracy = float(printed.split("test accuracy:")[1].split()[0])
    assert 0.0 <= accuracy <= 1.0 and f"checkpoint written to {out}" in printed
    after = snap()
    assert set(after) - set(before) == {str(out)}
    assert {k: v for k, v in after.items() if k not in (str(out), str(dirs["cwd"]))} == \
           {k: v for k, v in before.items() if k != str(dirs["cwd"])}
    assert snapshot(data) == data_before
    clf = Classifier.load(out)
    assert clf.net.head.out_features == 3 and clf.data_cfg.image_size == SIZE
    test = load_split_dir(data, "test")
    assert clf.predict_logits(test.sources, test.names).logits.shape == (len(test), 3)


def test_fast_preset_is_the_grader_smoke_run():
    fast, full = PRESETS["fast"], PRESETS["full"]
    assert fast.epochs == 1 and fast.views == 1 and fast.image_size < full.image_size
    assert fast.backbone == full.backbone and fast.trunk_split >= full.trunk_split  # no more tail than shipped
    assert recipe(f"fast:image_size={SIZE}") == replace(fast, image_size=SIZE)
    with pytest.raises(ValueError, match="unknown preset"):
        recipe("fastest")
