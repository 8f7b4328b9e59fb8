"""Untrusted label input: the grader's ``gt.csv`` and a labelled set's class ids.

:class:`DataError` is defined here, the bottom of the data layer; callers import it from :mod:`probe.data`.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

GT_HEADER = ("filename", "class_id")


class DataError(ValueError):
    """Bad input data; the message names the file and says how to fix it."""


def read_gt(csv_path: str | os.PathLike) -> dict[str, int]:
    """Read a grader ``gt.csv`` (header ``filename,class_id``) into ``{filename: int}``.

    Raises:
        DataError: missing file, wrong header, a short row, a duplicate or a non-integer label.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the gt.csv of the grader layout (filename,class_id).")
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(c.strip() for c in rows[0]) != GT_HEADER:
        raise DataError(f"{path}: the first line must be the header 'filename,class_id'; add it.")
    gt: dict[str, int] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            raise DataError(f"{path}:{line_no}: expected 'filename,class_id', got {row!r}; fix that row.")
        name, label = row[0].strip(), row[1].strip()
        if name in gt:
            raise DataError(f"{path}:{line_no}: {name!r} is listed twice; keep one row per image.")
        gt[name] = parse_label(label, f"{path}:{line_no}")
    return gt


def parse_label(value: object, where: str) -> int:
    """An integer class id from an int or an integer-looking string, else a DataError naming ``where``."""
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"{where}: label {value!r} is a boolean; labels must be integers 0..K-1.")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise DataError(f"{where}: label {value!r} is not an integer; labels must be integers 0..K-1.")


def check_labels(labels: np.ndarray, where: str) -> int:
    """Return K when ``labels`` are exactly the integers 0..K-1 (each present), else raise DataError."""
    present = np.unique(labels)
    if len(present) < 2:
        raise DataError(f"{where}: only class {present.tolist()} has images; a classifier needs two or more classes.")
    k = int(present.max()) + 1
    if present.min() < 0 or len(present) != k:
        absent = sorted(set(range(max(k, 0))) - set(present.tolist()))
        raise DataError(
            f"{where}: labels must be 0..K-1 with every class present; found {present.min()}..{present.max()}"
            f"{', negative ids' if present.min() < 0 else ''}"
            f"{f', classes without images: {absent[:10]}' if absent else ''}; renumber them 0..K-1."
        )
    return k
