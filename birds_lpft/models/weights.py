"""Pretrained weights, offline first, and the pretrained :class:`BirdNet` every stage starts from.

Lookup: a file the user names (``--weights``), else torchvision's or timm's own cache, hash-checked; a download
only where the caller allows it (grading never does). :func:`read_weights` is the one loader: each way a file
can be wrong is one :class:`WeightsError` line naming it, raised before any image is decoded.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from birds_lpft.models.net import BirdNet, NetConfig, build_net, nonfinite
from birds_lpft.models.zoo import BackboneSpec, name_sha256_prefix, source_head_of

KNOWN_OFFLINE = ("mobilenet_v2",)  # the weights python -m probe.weights provisions without a download


class WeightsError(RuntimeError):
    """Pretrained weights missing or not the expected file; the message says how to fix it."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str | None) -> Path:
    """Return ``path`` when its sha256 is ``expected`` (None, no known hash, matches no file); else raise
    WeightsError naming the file."""
    if not Path(path).is_file():
        raise WeightsError(f"{path}: no such file; pass the official weights file.")
    actual = sha256_of(path)
    if actual != expected:
        raise WeightsError(f"{path}: sha256 {actual} is not the expected {expected}; delete the file and run "
                           "`python -m probe.weights` to provision the official one.")
    return path


def cache_path(spec: BackboneSpec) -> Path:
    """Where the backbone's weights file is looked for: timm's own (Hugging Face hub) cache for a timm model
    whose file is there, else torch hub's ``checkpoints`` folder, where torchvision looks."""
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


def verify(path: Path, spec: BackboneSpec) -> Path:
    """Check a weights file against the full sha256 the project knows for it, else against the sha256 prefix
    that torchvision's file names carry (``name-7f5810bc.pth``); a name with neither is taken as it is."""
    if spec.sha256 is not None and path.name == spec.weights_file:
        return verify_sha256(path, spec.sha256)
    prefix = name_sha256_prefix(path.name)
    if prefix and not sha256_of(path).startswith(prefix):
        raise WeightsError(f"{path}: its sha256 does not start with {prefix}, as its name says it must: "
                           "a corrupt or different file; download the official file again.")
    return path


def missing(spec: BackboneSpec, path: Path) -> WeightsError:
    """The error for absent weights: where to put which file (and its hash), or the flag that names one."""
    expected = spec.sha256 or (f"sha256 starting {spec.sha256_prefix}" if spec.sha256_prefix else None)
    source = spec.url or (f"the Hugging Face hub's {spec.hub_id}" if spec.hub_id else "its publisher")
    provision = " (`python -m probe.weights` provisions it offline)" if spec.name in KNOWN_OFFLINE else ""
    return WeightsError(
        f"{path}: pretrained {spec.name} weights are not there{provision}. Put the file {spec.weights_file} from "
        f"{source}{f' ({expected})' if expected else ''} there, pass it with --weights FILE, or, where the "
        "network allows, let it be downloaded (--allow-download).")


def read_weights(path: Path, spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The backbone's state dict from a weights file (``.safetensors``, or a torch file read with
    ``weights_only=True``, so no code from it runs), checked to hold the backbone's own entries, all finite."""
    fix = f"pass the {spec.name} weights file ({spec.weights_file})"
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty; {fix}.")
    try:
        state = _read(path)
    except Exception as err:  # noqa: BLE001 - torch and safetensors raise many types for a file that is not theirs
        text = " ".join(str(err).split())
        if "Unsupported global" in text:  # torch's refusal to build the file's objects
            raise WeightsError(f"{path}: refused as unsafe: it holds Python objects that weights_only loading "
                               f"will not build; {fix}.") from None
        raise WeightsError(f"{path}: not a weights file ({type(err).__name__}: {text[:120]}); {fix}.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        raise WeightsError(f"{path}: a training checkpoint, with the weights under 'state_dict'; save that entry "
                           f"alone (torch.save(ckpt['state_dict'], FILE)) and pass it, or {fix}.")
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise WeightsError(f"{path}: not a state dict (names -> tensors); {fix}.")
    _check_fits(state, spec, path, fix)
    return state


def _read(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    with warnings.catch_warnings():  # torch's notes on an odd pickle: the refusal, if any, says it all
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def _check_fits(state: dict, spec: BackboneSpec, path: Path, fix: str) -> None:
    """Refuse another model's weights (with the counts) or non-finite ones, in one line each."""
    with torch.device("meta"):  # the backbone's own entries and shapes, built for nothing
        own = {k: tuple(v.shape) for k, v in spec.build().state_dict().items()}
    missing_keys = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [k for k in own if k in state and tuple(state[k].shape) != own[k]]
    if missing_keys or unexpected or reshaped:
        first = (missing_keys or unexpected or reshaped)[0]
        raise WeightsError(f"{path}: not {spec.name}'s weights: {len(missing_keys)} of its {len(own)} entries "
                           f"missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape (first: "
                           f"{first}); {fix}.")
    broken = nonfinite(state)
    if broken:
        raise WeightsError(f"{path}: {len(broken)} tensors hold NaN or infinite values (first: {broken[0]}); "
                           f"the file is damaged: {fix}.")


def load_pretrained(spec: BackboneSpec, *, allow_download: bool = False,
                    weights_file: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The backbone's pretrained state dict, from ``weights_file`` or the cache (checked), or, if allowed, downloaded.

    Raises:
        WeightsError: absent and not downloadable, or not the backbone's weights (:func:`read_weights`).
    """
    path = Path(weights_file) if weights_file is not None else cache_path(spec)
    if not path.is_file():
        if weights_file is not None:
            raise WeightsError(f"{path}: no such file; pass the {spec.name} weights file (e.g. {spec.weights_file}).")
        if not allow_download:
            raise missing(spec, path)
        path = _download(spec)
    return read_weights(verify(path, spec), spec)


def _download(spec: BackboneSpec) -> Path:
    if spec.url is not None:
        torch.hub.load_state_dict_from_url(spec.url, progress=True, check_hash=True)
        return Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file
    from huggingface_hub import hf_hub_download

    assert spec.hub_id is not None  # a spec without a url is a timm model on the hub (zoo._timm_weights)
    return Path(hf_hub_download(spec.hub_id, "model.safetensors"))


def has_pretrained(spec: BackboneSpec) -> bool:
    """Whether the checked weights file is in the cache (no download, no exception)."""
    path = cache_path(spec)
    try:
        return path.is_file() and verify(path, spec) is not None
    except WeightsError:
        return False


def pretrained_state(spec: BackboneSpec, weights: str = "required", *, allow_download: bool = False,
                     weights_file: str | os.PathLike | None = None) -> dict[str, torch.Tensor] | None:
    """The pretrained state dict as ``weights`` asks: 'required' (raise if missing), 'if-cached' (None, with a
    warning, when the checked file is not in the cache; never downloads) or 'none' (None: random init)."""
    if weights not in ("required", "if-cached", "none"):
        raise ValueError(f"weights must be 'required', 'if-cached' or 'none', got {weights!r}")
    if weights == "required":
        return load_pretrained(spec, allow_download=allow_download, weights_file=weights_file)
    if weights == "if-cached":
        try:
            return load_pretrained(spec, weights_file=weights_file)  # never downloads
        except WeightsError:
            warnings.warn(f"pretrained {spec.name} weights not cached: training from random init", stacklevel=3)
    return None


def pretrained_net(cfg: NetConfig, weights: str = "required", **weights_kwargs) -> BirdNet:
    """A :class:`BirdNet` with pretrained backbone weights (see :func:`pretrained_state`), in eval mode."""
    return build_net(cfg, pretrained_state(cfg.spec, weights, **weights_kwargs)).eval()


def pretrained_source_head(spec: BackboneSpec, weights: str = "required", **weights_kwargs) -> nn.Module:
    """The pretrained network's own ImageNet classifier (``zoo.source_head_of``), from the same weights as
    :func:`pretrained_net`, in eval mode; built on a forked generator, so a seeded run's streams are untouched."""
    state = pretrained_state(spec, weights, **weights_kwargs)
    with torch.random.fork_rng(devices=[]):
        model = spec.build()
    if state is not None:
        model.load_state_dict(state)
    return source_head_of(spec.name, model).eval()
