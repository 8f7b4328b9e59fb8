"""Pretrained weights, offline first, and the pretrained network (``birds_lpft.models.net.BirdNet``) every stage
starts from.

Lookup order: the torch hub cache (``$TORCH_HOME/hub/checkpoints/<file>``, where torchvision itself looks),
hash-checked; then torchvision's own download, only when the caller allows it. Grading never downloads.
``python -m probe.weights`` (``probe/weights/__main__.py``) provisions the file offline.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from birds_lpft.models.net import BirdNet, NetConfig, build_net
from birds_lpft.models.zoo import get_spec, source_head_of

KNOWN_OFFLINE = ("mobilenet_v2",)  # the weights python -m probe.weights provisions without a download


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
    """Where ``backbone``'s weights file is looked for: timm's own (Hugging Face hub) cache for a timm model
    whose file is there, else torch hub's ``checkpoints`` folder, where torchvision looks (honours
    $TORCH_HOME)."""
    spec = get_spec(backbone)
    found = _hub_cached(spec.hub_id) if spec.hub_id else None
    return found or Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file


def _hub_cached(hub_id: str) -> Path | None:
    """The file of a timm model in the Hugging Face hub cache (looked up on disk only), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ModuleNotFoundError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def verify(path: Path, backbone: str) -> Path:
    """Check a weights file: against the full sha256 the project knows for it, else against the sha256 prefix
    that torchvision's file names carry (``name-7f5810bc.pth``); a name with neither is taken as it is."""
    spec = get_spec(backbone)
    if spec.sha256 is not None and path.name == spec.weights_file:
        return verify_sha256(path, spec.sha256)
    prefix = re.search(r"-([0-9a-f]{6,})\.", path.name)
    if prefix and not sha256_of(path).startswith(prefix.group(1)):
        raise WeightsError(f"{path}: its sha256 does not start with {prefix.group(1)}, as its name says it must: "
                           "a corrupt or different file; download the official file again.")
    return path


def missing(backbone: str, path: Path) -> WeightsError:
    """The error for absent weights: where to put which file (and its hash), or the flag that names one."""
    spec = get_spec(backbone)
    expected = spec.sha256 or (f"sha256 starting {spec.sha256_prefix}" if spec.sha256_prefix else None)
    source = spec.url or (f"the Hugging Face hub's {spec.hub_id}" if spec.hub_id else "its publisher")
    provision = " (`python -m probe.weights` provisions it offline)" if backbone in KNOWN_OFFLINE else ""
    return WeightsError(
        f"{path}: pretrained {backbone} weights are not there{provision}. Put the file {spec.weights_file} from "
        f"{source}{f' ({expected})' if expected else ''} there, pass it with --weights FILE, or, where the "
        "network allows, let it be downloaded (--allow-download).")


def load_pretrained(backbone: str, *, allow_download: bool = False,
                    weights_file: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The backbone's pretrained state dict, from ``weights_file`` or the cache (checked), or, if allowed,
    downloaded.

    Raises:
        WeightsError: absent and not downloadable, or the file fails its hash check.
    """
    spec = get_spec(backbone)
    path = Path(weights_file) if weights_file is not None else cache_path(backbone)
    if not path.is_file():
        if weights_file is not None:
            raise WeightsError(f"{path}: no such file; pass the {backbone} weights file (e.g. {spec.weights_file}).")
        if not allow_download:
            raise missing(backbone, path)
        path = _download(spec)
    return read_state_dict(verify(path, backbone))


def _download(spec) -> Path:
    if spec.url is not None:
        torch.hub.load_state_dict_from_url(spec.url, progress=True, check_hash=True)
        return Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(spec.hub_id, "model.safetensors"))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file (timm's hub) or a torch file, never running code from it."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def has_pretrained(backbone: str) -> bool:
    """Whether the checked weights file is in the cache (no download, no exception)."""
    path = cache_path(backbone)
    try:
        return path.is_file() and verify(path, backbone) is not None
    except WeightsError:
        return False


def pretrained_net(cfg: NetConfig, weights: str = "required", *, allow_download: bool = False,
                   weights_file: str | os.PathLike | None = None) -> BirdNet:
    """A :class:`BirdNet` with pretrained backbone weights, in eval mode.

    Args:
        weights: 'required' (raise if missing), 'if-cached' (random init with a warning when the verified
            file is not in the cache; never downloads) or 'none' (random init, for tests and demos).
        weights_file: a local weights file instead of the cache (an air-gapped machine's copy).
    """
    state = _pretrained_state(cfg.backbone, weights, allow_download, weights_file)
    return build_net(cfg, state).eval()


def pretrained_source_head(backbone: str, weights: str = "required", *, allow_download: bool = False,
                           weights_file: str | os.PathLike | None = None) -> nn.Module:
    """The pretrained network's own ImageNet classifier (pooling and head, ``zoo.source_head_of``), from the
    same weights as :func:`pretrained_net`, in eval mode. Built on a forked generator: asking for it
    leaves a seeded run's random streams as they were."""
    state = _pretrained_state(backbone, weights, allow_download, weights_file)
    with torch.random.fork_rng(devices=[]):
        model = get_spec(backbone).build()
    if state is not None:
        model.load_state_dict(state)
    return source_head_of(backbone, model).eval()


def _pretrained_state(backbone: str, weights: str, allow_download: bool,
                      weights_file: str | os.PathLike | None) -> dict[str, torch.Tensor] | None:
    """The pretrained state dict as ``weights`` asks (see :func:`pretrained_net`), None for random init."""
    if weights not in ("required", "if-cached", "none"):
        raise ValueError(f"weights must be 'required', 'if-cached' or 'none', got {weights!r}")
    if weights == "required":
        return load_pretrained(backbone, allow_download=allow_download, weights_file=weights_file)
    if weights == "if-cached":
        try:
            return load_pretrained(backbone, weights_file=weights_file)  # never downloads
        except WeightsError:
            warnings.warn(f"pretrained {backbone} weights not cached: training from random init", stacklevel=3)
    return None
