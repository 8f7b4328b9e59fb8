"""Which backbone? Stage one of each on the same split, side by side (``python -m probe DATA --backbones ...``).

A row per backbone (:data:`COLUMNS`): the probe's accuracies and C, the feature width, the extraction rate, the
trunk cache's size at the fine-tune's input size and the weights file. A backbone whose weights are absent is
listed with the file to provide, never silently skipped.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from birds_lpft.data.sets import LabelledImages
from birds_lpft.models.net import NetConfig, build_net, trunk_bytes
from birds_lpft.models.weights import WeightsError, cache_path, has_pretrained, missing
from birds_lpft.models.zoo import get_spec
from birds_lpft.recipe import TRAIN_IMAGE_SIZE
from birds_lpft.utils.outputs import markdown_table, write_text

from probe.pipeline import ProbeConfig, run_probe

# (table heading, row key), in table order
COLUMNS = (("backbone", "backbone"), ("probe val", "probe_val"), ("probe test", "probe_test"), ("C", "C"),
           ("width", "width"), ("extract img/s", "extract_images_per_s"),
           ("cache MiB/1k/view", "cache_mib_per_1k_view"), ("weights", "weights"))


def compare(train: LabelledImages, test: LabelledImages | None, names: list[str], cfg: ProbeConfig, *,
            random_init: bool = False, progress: bool = False) -> list[dict]:
    """One row per backbone name, in order."""
    return [_row(train, test, name, cfg, random_init, progress) for name in names]


def _row(train, test, name: str, cfg: ProbeConfig, random_init: bool, progress: bool) -> dict:
    try:
        cfg = replace(cfg, backbone=name)
    except ValueError as err:
        return {"backbone": name, "error": str(err)}
    spec = cfg.spec
    row = {"backbone": name, "width": spec.width, "cache_mib_per_1k_view": cache_mib(name)}
    if not random_init and not has_pretrained(spec):
        return {**row, "weights": f"missing: {missing(spec, cache_path(spec))}"}
    try:
        result = run_probe(train, test, cfg, "none" if random_init else "required", progress=progress)
    except WeightsError as err:
        return {**row, "weights": f"missing: {err}"}
    seconds = result.stopwatch.seconds["train features"]
    return {**row, "probe_val": result.fitted.val_accuracy, "probe_test": result.test_accuracy,
            "C": result.fitted.C, "extract_images_per_s": len(train) / seconds,
            "weights": "random init" if random_init else str(cache_path(spec))}


def cache_mib(name: str, image_size: int = TRAIN_IMAGE_SIZE) -> float:
    """MiB of fp16 trunk activations of 1,000 images, one view each, at ``image_size`` and the default split."""
    with torch.random.fork_rng(devices=[]):  # a random-init net only for its shapes: seeded runs stay as they are
        net = build_net(NetConfig(name, 2, get_spec(name).default_split)).eval()
    return 1000 * trunk_bytes(net, image_size) / 2**20


def _cell(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    return f"{value:.4f}" if key.startswith("probe") else f"{value:g}" if key == "C" else \
        f"{value:.1f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    """The table; a backbone that could not be built has its reason in the last column."""
    cells = [[row["backbone"], *("-" for _ in COLUMNS[1:-1]), row["error"]] if "error" in row
             else [_cell(row, key) for _, key in COLUMNS] for row in rows]
    return markdown_table((heading for heading, _ in COLUMNS), cells) + "\n"


def write_table(path: Path, rows: list[dict]) -> None:
    """``.json`` (the rows) or ``.md`` (the table), atomically."""
    write_text(path, json.dumps(rows, indent=2) + "\n" if path.suffix == ".json" else markdown(rows))
