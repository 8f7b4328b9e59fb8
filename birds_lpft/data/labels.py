"""Untrusted label input, checked at a cost bounded whatever it holds: the grader's ``gt.csv``, the keys and class
ids of a ``{filename: class id}`` mapping, and a labelled set's class ids. :class:`DataError` lives here, at the bottom
of the data layer; callers import it from :mod:`birds_lpft.data.sets`.
"""

from __future__ import annotations

import csv
import io
import math
import operator
import os
from pathlib import Path

import numpy as np

GT_HEADER = ("filename", "class_id")
# Class ids are 0..MAX_CLASS_ID-1. An id sizes allocations (K = max + 1 head rows, the list of absent ids), so one
# bad row must not decide one; the bound is well above the number of bird species in the world.
MAX_CLASS_ID = 100_000
# Longer label strings are refused unparsed: no parsing cost, and never Python's digit-limit ValueError.
_MAX_LABEL_CHARS = 32
# Characters that would make ``img_dir / name`` leave the folder, or fail (NUL), instead of naming a file in it.
_NOT_IN_NAMES = ("/", "\\", "\x00")


class DataError(ValueError):
    """Bad input data; the message names the file and says how to fix it."""


def _shown(value: object) -> str:
    """A short repr for messages: a hostile row or key may be megabytes long, or an int too long to print."""
    if isinstance(value, int) and value.bit_length() > 1000:
        return f"<an integer of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_gt(csv_path: str | os.PathLike) -> dict[str, int]:
    """Read a grader ``gt.csv`` (UTF-8, header ``filename,class_id``) into ``{filename: class id}``.

    Any fault (missing file, encoding, header, row, duplicate, file name, class id) is a DataError naming the line.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the gt.csv of the grader layout (filename,class_id).")
    rows = _read_rows(path)
    _check_header(rows, path)
    gt: dict[str, int] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        where = f"{path}:{line_no}"
        if len(row) != 2:
            raise DataError(f"{where}: expected 'filename,class_id', got {_shown(row)}; fix that row.")
        name = check_name(row[0].strip(), where)
        if name in gt:
            raise DataError(f"{where}: {_shown(name)} is listed twice; keep one row per image.")
        gt[name] = parse_label(row[1], where)
    return gt


def _read_rows(path: Path) -> list[list[str]]:
    """The CSV rows of ``path``, read as UTF-8 (a leading BOM dropped); a DataError names the line otherwise."""
    data = path.read_bytes()
    # Checked first: UTF-16 without a BOM can be "valid" UTF-8, each ASCII letter next to a NUL byte.
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise DataError(f"{path}:{line}: NUL bytes, as in a UTF-16 file; save the file as UTF-8.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}:{line}: byte {data[err.start]:#04x} is not UTF-8 (a UTF-16 or Latin-1 file?); "
            "save the file as UTF-8."
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        return list(reader)
    except csv.Error as err:  # e.g. a field over the csv module's size limit
        raise DataError(f"{path}:{reader.line_num}: unreadable CSV row ({err}); fix that row.") from None


def _check_header(rows: list[list[str]], path: Path) -> None:
    """Raise a DataError unless the first row is ``filename,class_id``; say whether to add or fix it."""
    expected = ",".join(GT_HEADER)
    if not rows:
        raise DataError(f"{path}: the file is empty; the first line must be the header '{expected}'; add it.")
    found = tuple(c.strip() for c in rows[0])
    if found == GT_HEADER:
        return
    shown = _shown(",".join(rows[0]))
    # A blank line or a 'name,integer' row: the header is missing, not misspelt.
    if not any(found) or (len(found) == 2 and found[1].lstrip("+-").isdigit()):
        raise DataError(f"{path}: the first line {shown} is data, not the header '{expected}'; add it.")
    raise DataError(f"{path}: the header is {shown}, expected '{expected}'; change the first line to that.")


def check_name(name: object, where: str) -> str:
    """``name`` when it is a plain file name (a str naming an entry of the image folder itself), else DataError."""
    if not isinstance(name, str):
        raise DataError(f"{where}: key {_shown(name)} ({type(name).__name__}) is not a file name; keys must be str.")
    if name in ("", ".", "..") or any(c in name for c in _NOT_IN_NAMES):
        raise DataError(f"{where}: {_shown(name)} is not a plain file name; name a file inside the image folder "
                        "(no '/', '\\', '..' or NUL).")
    return name


def parse_label(value: object, where: str) -> int:
    """A class id 0..MAX_CLASS_ID-1 from a whole number (an int, or a float such as 3.0) or a string of one
    ('3', '3.0'), not a bool; else DataError."""
    if isinstance(value, (bool, np.bool_)):
        raise DataError(f"{where}: label {value!r} is a boolean; labels must be integers 0..K-1.")
    label = None
    if isinstance(value, (int, np.integer)):
        label = int(value)
    elif isinstance(value, (float, np.floating)) or (isinstance(value, str) and len(value) <= _MAX_LABEL_CHARS):
        label = _whole(value)
    if label is None:
        raise DataError(f"{where}: label {_shown(value)} is not an integer; labels must be integers 0..K-1.")
    if not 0 <= label < MAX_CLASS_ID:
        raise _range_error(label, where)
    return label


def _whole(value: float | np.floating | str) -> int | None:
    """The int a float or a numeric string stands for when it is a whole finite number ('3', '3.0'), else None."""
    try:
        number = float(value)
    except ValueError:
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None


def _range_error(label: int, where: str) -> DataError:
    """The error for a class id outside 0..MAX_CLASS_ID-1."""
    problem = "is negative" if label < 0 else f"is too large (at most {MAX_CLASS_ID} species are supported)"
    return DataError(
        f"{where}: class id {_shown(label)} {problem}; labels must be integers 0..K-1 for K species; "
        "renumber them 0..K-1."
    )


def check_labels(labels: np.ndarray, where: str, num_classes: int | None = None) -> int:
    """Check class ids (named ``where`` in messages) and return K.

    ``num_classes`` is None for a training set, whose labels must be exactly 0..K-1 (K = max + 1 >= 2), each present;
    for a test set it is the training set's K, and labels must lie in 0..K-1 but may leave species out.
    """
    labels = np.asarray(labels)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels of type {labels.dtype}; labels must be integers 0..K-1.")
    outside = labels[(labels < 0) | (labels >= MAX_CLASS_ID)]
    if outside.size:
        raise _range_error(int(outside[0]), where)
    if num_classes is None:
        return _check_train_labels(labels, where)
    return _check_test_labels(labels, where, num_classes)


def _check_train_labels(labels: np.ndarray, where: str) -> int:
    """K when ``labels`` (already within 0..MAX_CLASS_ID-1) are exactly 0..K-1, each present."""
    present = np.unique(labels)
    if len(present) < 2:
        raise DataError(f"{where}: only class {present.tolist()} has images; a classifier needs two or more classes.")
    k = int(present[-1]) + 1
    if len(present) != k:
        absent = np.setdiff1d(np.arange(k), present)  # k <= MAX_CLASS_ID: bounded however bad the file
        more = f" ({len(absent)} in all)" if len(absent) > 10 else ""
        raise DataError(
            f"{where}: labels must be 0..K-1 with every class present; found {present[0]}..{present[-1]}, "
            f"classes without images: {absent[:10].tolist()}{more}; renumber them 0..K-1."
        )
    return k


def _check_test_labels(labels: np.ndarray, where: str, num_classes: int) -> int:
    """``num_classes`` when every label lies in 0..num_classes-1; a test split may leave species out."""
    k = operator.index(num_classes)  # a TypeError for a float: a caller's bug, not bad data
    if isinstance(num_classes, bool) or not 2 <= k <= MAX_CLASS_ID:
        raise ValueError(f"num_classes must be in 2..{MAX_CLASS_ID}, got {k}")
    unknown = labels[labels >= k]
    if unknown.size:
        raise DataError(
            f"{where}: label {int(unknown[0])} is not one of the K = {k} training classes (0..{k - 1}); "
            "the model never saw that species, so a test split must use the training split's class ids."
        )
    return k
