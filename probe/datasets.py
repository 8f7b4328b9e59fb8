"""The labelled sets a command runs on: a grader-layout folder, or the small generated demo set."""

from __future__ import annotations

from pathlib import Path

from probe.data import LabelledImages, load_split_dir
from probe.synthetic import make_synthetic


def load_data(data_dir: Path | None) -> tuple[LabelledImages, LabelledImages | None]:
    """(train, test or None) from a grader-layout folder, or the generated demo set when ``data_dir`` is None."""
    if data_dir is None:
        print("no DATA_DIR given: using a small generated set (4 shapes x 24 images)")
        images = make_synthetic(num_classes=4, per_class=24, seed=0)
        return images.subset(range(0, 64)), images.subset(range(64, 96))
    test = load_split_dir(data_dir, "test") if (data_dir / "test" / "gt.csv").is_file() else None
    return load_split_dir(data_dir, "train"), test
