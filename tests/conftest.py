"""Shared fixtures: every test gets its own empty torch hub cache, so none reads or writes the real one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$TORCH_HOME`` per test (created lazily by whoever writes to it)."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    # torch.hub.get_dir() reads $TORCH_HOME at call time unless torch.hub.set_dir() pinned a folder.
    assert Path(torch.hub.get_dir()) == home / "hub", "torch.hub.set_dir() was called: $TORCH_HOME is ignored"
    return home
