"""Shared fixtures and helpers: every test gets its own empty torch hub cache (none reads or writes the real
one), a no-writes watcher, and BatchNorm calibration for random-init networks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from birds_lpft.classifier import Classifier
from birds_lpft.models.net import BirdNet, NetConfig
from birds_lpft.recipe import FinetuneConfig


@pytest.fixture(autouse=True)
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$TORCH_HOME`` per test (created lazily by whoever writes to it)."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    # torch.hub.get_dir() reads $TORCH_HOME at call time unless torch.hub.set_dir() pinned a folder.
    assert Path(torch.hub.get_dir()) == home / "hub", "torch.hub.set_dir() was called: $TORCH_HOME is ignored"
    return home


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every file and folder under ``roots`` (roots included): (kind, size, mtime) by path."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(dirpath, name))
                is_dir = name in dirnames
                seen[os.path.join(dirpath, name)] = ("dir" if is_dir else "file", 0 if is_dir else st.st_size,
                                                     st.st_mtime_ns)
        seen[str(root)] = ("root", 0, os.stat(root).st_mtime_ns)
    return seen


class Watched:
    """The four writable places of a no-writes test; calling it snapshots all four."""

    def __init__(self, dirs: dict[str, Path]):
        self.dirs = dirs

    def __call__(self) -> dict[str, tuple]:
        return snapshot(*self.dirs.values())


@pytest.fixture
def watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Watched:
    """An empty cwd, temp dir, $TORCH_HOME and $HOME (inherited by child processes too)."""
    dirs = {name: tmp_path / "watched" / name for name in ("cwd", "tmp", "torch_home", "home")}
    for d in dirs.values():
        d.mkdir(parents=True)
    monkeypatch.chdir(dirs["cwd"])
    monkeypatch.setenv("TMPDIR", str(dirs["tmp"]))
    monkeypatch.setattr(tempfile, "tempdir", None)  # recomputed from $TMPDIR on the next call
    monkeypatch.setenv("TORCH_HOME", str(dirs["torch_home"]))
    monkeypatch.setenv("HOME", str(dirs["home"]))
    for var in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR"):
        monkeypatch.delenv(var, raising=False)
    assert Path(tempfile.gettempdir()) == dirs["tmp"]
    assert Path(torch.hub.get_dir()) == dirs["torch_home"] / "hub"
    return Watched(dirs)


def calibrate_batchnorm(net: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set every BatchNorm's running statistics from ``x`` and return ``net`` in eval mode.

    A random-init MobileNetV2 in eval mode pools to ~1e-9 features (its depthwise-conv init shrinks
    activations layer by layer); calibrated, they are O(1), so numeric comparisons mean something.
    """
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one pass gives the batch statistics
    net.train()
    with torch.no_grad():
        net(x)
    return net.eval()


def make_classifier(net: BirdNet, net_cfg: NetConfig, image_size: int, tta_flip: bool = True,
                    names: list[str] | None = None) -> Classifier:
    """A :class:`Classifier` of ``net`` whose recipe builds ``net_cfg``'s network, predicting at ``image_size``."""
    recipe = FinetuneConfig(backbone=net_cfg.backbone, image_size=image_size, split=net_cfg.split,
                            dropout=net_cfg.dropout, pooling=net_cfg.pooling, members=net_cfg.members,
                            tta_flip=tta_flip)
    return Classifier(net, recipe, names)
