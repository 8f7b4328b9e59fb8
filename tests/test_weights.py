"""Offline pretrained weights: hash-checked, cached where torchvision looks, never a wrong or partial file.

Every test runs with an empty per-test ``$TORCH_HOME`` (see conftest.py) and never downloads: the expected
hash of the registry entry is swapped for that of a small file made here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import birds_lpft.models.net
from birds_lpft.models.net import NetConfig, build_net
from birds_lpft.models.weights import (
    WeightsError,
    cache_path,
    has_pretrained,
    load_pretrained,
    pretrained_net,
    sha256_of,
    verify_sha256,
)
from birds_lpft.models.zoo import get_spec

from probe.weights import main, provision

NAME = "mobilenet_v2"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture
def wrong_file(tmp_path) -> Path:
    path = tmp_path / "downloads" / "mobilenet_v2-b0353104.pth"
    path.parent.mkdir()
    path.write_bytes(b"not the official weights")
    return path


@pytest.fixture
def trusted(tmp_path, monkeypatch):
    """Save ``state`` to a file and make its sha256 the registry's expected one; returns the file."""

    def make(state: dict) -> Path:
        path = tmp_path / "downloads" / "trusted.pth"
        path.parent.mkdir(exist_ok=True)
        torch.save(state, path)
        spec = dataclasses.replace(get_spec(NAME), sha256=sha256_of(path))
        monkeypatch.setitem(birds_lpft.models.zoo.BACKBONES, NAME, spec)
        assert get_spec(NAME).sha256 == sha256_of(path)
        return path

    return make


def test_cache_path_follows_torch_home(torch_home):
    path = cache_path(get_spec(NAME))
    assert path == torch_home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert path.name == get_spec(NAME).url.rsplit("/", 1)[-1]


def test_registry_hash_matches_the_url_prefix():
    spec = get_spec(NAME)
    prefix = spec.url.rsplit("-", 1)[-1].split(".")[0]  # torchvision names files <name>-<sha256[:8]>.pth
    assert len(spec.sha256) == 64 and spec.sha256.startswith(prefix)


def test_verify_sha256(wrong_file):
    assert verify_sha256(wrong_file, sha256_of(wrong_file)) == wrong_file
    with pytest.raises(WeightsError) as exc:
        verify_sha256(wrong_file, get_spec(NAME).sha256)
    msg = str(exc.value)
    assert str(wrong_file) in msg and get_spec(NAME).sha256 in msg and "python -m probe.weights" in msg


def test_provision_refuses_wrong_file_and_caches_nothing(wrong_file, torch_home):
    with pytest.raises(WeightsError) as exc:
        provision(NAME, source=wrong_file)
    assert str(wrong_file) in str(exc.value)
    assert _files(torch_home) == []
    assert not has_pretrained(get_spec(NAME))
    assert wrong_file.read_bytes() == b"not the official weights"  # the source is left alone


def test_cli_refuses_wrong_file(wrong_file, torch_home):
    with pytest.raises(SystemExit) as exc:
        main(["--from-file", str(wrong_file)])
    assert str(exc.value.code).startswith("error: ") and str(wrong_file) in str(exc.value.code)
    assert _files(torch_home) == []


def test_provision_caches_verified_file(trusted, torch_home, capsys):
    official = get_spec(NAME).build().state_dict()
    source = trusted(official)
    assert not has_pretrained(get_spec(NAME))
    path = provision(NAME, source=source)
    assert path == cache_path(get_spec(NAME)) == torch_home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert path.read_bytes() == source.read_bytes()
    assert _files(torch_home) == [path]  # no .partial left behind
    assert has_pretrained(get_spec(NAME))
    state = load_pretrained(get_spec(NAME))
    assert all(torch.equal(state[k], v) for k, v in official.items())
    # provisioning again is a no-op that verifies the cached file
    assert provision(NAME, source=None) == path
    main([])  # the CLI's no-op path: nothing to install, the cache already holds the verified file
    assert "sha256 verified" in capsys.readouterr().out


def test_provision_via_cli(trusted, torch_home, capsys):
    source = trusted({"w": torch.ones(3)})
    main(["--from-file", str(source)])
    assert "weights ready" in capsys.readouterr().out
    assert _files(torch_home) == [cache_path(get_spec(NAME))]


def test_pretrained_net_loads_cached_backbone(trusted):
    backbone = get_spec(NAME).build()  # random weights standing in for the official file
    provision(NAME, source=trusted(backbone.state_dict()))
    for weights in ("required", "if-cached"):
        net = pretrained_net(NetConfig(NAME, 3, 14), weights)
        assert not net.training
        loaded = dict(net.trunk.named_parameters())
        expected = backbone.features[:14].state_dict()
        assert loaded and all(torch.equal(p, expected[k]) for k, p in loaded.items())
    random_net = build_net(NetConfig(NAME, 3, 14))
    assert not torch.equal(random_net.trunk[0][0].weight, backbone.features[0][0].weight)


def test_corrupted_cache_is_refused(trusted, torch_home):
    provision(NAME, source=trusted({"w": torch.ones(3)}))
    cache_path(get_spec(NAME)).write_bytes(b"truncated")
    assert not has_pretrained(get_spec(NAME))
    with pytest.raises(WeightsError, match="sha256"):
        load_pretrained(get_spec(NAME))
    with pytest.raises(WeightsError, match="sha256"):
        provision(NAME, source=None)  # a wrong cached file is never trusted nor silently replaced
    with pytest.warns(UserWarning, match="not cached"):
        pretrained_net(NetConfig(NAME, 3, 14), "if-cached")  # random init, never the bad file
    assert cache_path(get_spec(NAME)).read_bytes() == b"truncated"


def test_load_pretrained_without_cache_explains_the_fix(torch_home):
    assert not has_pretrained(get_spec(NAME))
    with pytest.raises(WeightsError) as exc:
        load_pretrained(get_spec(NAME), allow_download=False)
    msg = str(exc.value)
    assert "python -m probe.weights" in msg and str(cache_path(get_spec(NAME))) in msg
    with pytest.raises(WeightsError, match="python -m probe.weights"):
        pretrained_net(NetConfig(NAME, 3, 14), "required")
    assert _files(torch_home) == []


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        get_spec("resnet9000")
