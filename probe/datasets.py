"""The labelled sets a command runs on: a grader-layout folder, or the small generated demo set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from probe.data import LabelledImages, load_split_dir
from probe.synthetic import make_synthetic


def load_data(data_dir: Path | None) -> tuple[LabelledImages, LabelledImages | None]:
    """(train, test or None) from a grader-layout folder, or the generated demo set when ``data_dir`` is None.

    The test split is checked against the training split's K: its labels must be training class ids, but
    a small test split may lack a species or two (one line says so).
    """
    if data_dir is None:
        print("no DATA_DIR given: using a small generated set (4 shapes x 24 images)")
        images = make_synthetic(num_classes=4, per_class=24, seed=0)
        return images.subset(range(0, 64)), images.subset(range(64, 96))
    train = load_split_dir(data_dir, "train")
    if not (data_dir / "test" / "gt.csv").is_file():
        return train, None
    test = load_split_dir(data_dir, "test", num_classes=train.num_classes)
    species = len(np.unique(test.labels))
    if species < test.num_classes:
        print(f"test split: {len(test)} images of {species} of the {test.num_classes} species")
    return train, test
