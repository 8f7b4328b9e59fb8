"""Pretrained weights, offline first, and the pretrained :class:`~probe.backbone.BirdNet` every stage starts from.

Lookup order: the torch hub cache (``$TORCH_HOME/hub/checkpoints/<file>``, where torchvision itself looks),
hash-checked; then torchvision's own download, only when the caller allows it. Grading never downloads.
``python -m probe.weights`` (``probe/weights/__main__.py``) provisions the file offline.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from probe.backbone import BirdNet, NetConfig, build_net, get_spec


class WeightsError(RuntimeError):
    """Pretrained weights missing or not the expected file; the message says how to fix it."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> Path:
    """Return ``path`` when its sha256 is ``expected``; else raise WeightsError naming the file."""
    if not Path(path).is_file():
        raise WeightsError(f"{path}: no such file; pass the official weights file.")
    actual = sha256_of(path)
    if actual != expected:
        raise WeightsError(
            f"{path}: sha256 {actual} is not the expected {expected}; delete the file and run "
            "`python -m probe.weights` to provision the official one."
        )
    return path


def cache_path(backbone: str) -> Path:
    """Where torchvision caches ``backbone``'s weights file (honours $TORCH_HOME)."""
    filename = get_spec(backbone).weights.url.rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def load_pretrained(backbone: str, *, allow_download: bool = False) -> dict[str, torch.Tensor]:
    """The backbone's pretrained state dict, from the cache (hash-checked) or, if allowed, downloaded.

    Raises:
        WeightsError: not cached and downloading not allowed, or the file fails its hash check.
    """
    spec = get_spec(backbone)
    path = cache_path(backbone)
    if not path.is_file():
        if not allow_download:
            raise WeightsError(
                f"{path}: pretrained {backbone} weights are not in the torch hub cache. Provision them offline "
                "with `python -m probe.weights`, or allow torchvision to download them (--allow-download)."
            )
        torch.hub.load_state_dict_from_url(spec.weights.url, progress=True, check_hash=True)
    verify_sha256(path, spec.sha256)
    return torch.load(path, map_location="cpu", weights_only=True)


def has_pretrained(backbone: str) -> bool:
    """Whether the verified weights file is in the cache (no download, no exception)."""
    path = cache_path(backbone)
    try:
        return path.is_file() and verify_sha256(path, get_spec(backbone).sha256) is not None
    except WeightsError:
        return False


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
        try:
            state = load_pretrained(cfg.backbone)  # never downloads: missing or wrong is a WeightsError
        except WeightsError:
            warnings.warn(f"pretrained {cfg.backbone} weights not cached: training from random init", stacklevel=2)
    return build_net(cfg, state).eval()
