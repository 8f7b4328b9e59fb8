"""Data layer: the grader's layout (``gt.csv`` + an image folder) read into a checked, sorted labelled set.

Every bad input raises :class:`DataError` naming the file and the fix, so nothing is silently dropped. Label parsing
is in :mod:`birds_lpft.data.labels`, image decoding in :mod:`birds_lpft.data.images`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from birds_lpft.data.labels import MAX_CLASS_ID, DataError, check_labels, check_name, parse_label, read_gt

# An image source is a file on disk or encoded bytes held in RAM (the generated demo set).
Source = Path | bytes


@dataclass(frozen=True)
class LabelledImages:
    """A labelled image set in a fixed, sorted order.

    ``labels`` are int64 class ids 0..``num_classes``-1 aligned with the sorted ``names``; ``class_names`` gives a
    species name per class id where the data has them (``classes.txt``).
    """

    names: tuple[str, ...]
    sources: tuple[Source, ...]
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index: Sequence[int] | np.ndarray) -> LabelledImages:
        index = sorted(int(i) for i in index)
        return LabelledImages(
            tuple(self.names[i] for i in index),
            tuple(self.sources[i] for i in index),
            self.labels[index],
            self.num_classes,
            self.class_names,
        )


def read_class_names(path: str | os.PathLike, num_classes: int) -> tuple[str, ...] | None:
    """Species names from a ``classes.txt`` ('class_id species_name' per line); None when there is no file.

    Ids without a line keep their number as name; malformed lines are ignored (names are for people only).
    """
    path = Path(path)
    if not path.is_file():
        return None
    names = [str(k) for k in range(num_classes)]
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split(maxsplit=1)
        key = parts[0] if len(parts) == 2 else ""
        # ASCII digits only, and short: "²".isdigit() is True but int("²") raises, as does a 5000-digit id.
        if key.isascii() and key.isdigit() and len(key) <= len(str(MAX_CLASS_ID)) and int(key) < num_classes:
            names[int(key)] = parts[1].strip().replace("_", " ")
    return tuple(names)


def labelled_from_gt(gt: Mapping[str, object], img_dir: str | os.PathLike, where: str = "gt",
                     num_classes: int | None = None) -> LabelledImages:
    """Check a ``{filename: label}`` mapping against an image folder and build a :class:`LabelledImages`.

    Keys are plain file names inside ``img_dir``, labels ints or integer-looking strs; ``where`` (the file or argument
    ``gt`` came from) is named in every message; ``num_classes`` is as for :func:`check_labels`.
    """
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: no such folder; pass the folder that holds the training images.")
    if not any(p.is_file() for p in img_dir.iterdir()):
        raise DataError(f"{img_dir}: the image folder is empty; put the training images there.")
    names = _checked_names(gt, where)
    # Keys and labels first: they cost no file system calls, so a bad row fails at once on any set size.
    labels = np.array([parse_label(gt[n], f"{where}: {n}") for n in names], dtype=np.int64)
    k = check_labels(labels, where, num_classes)
    missing = [n for n in names if not (img_dir / n).is_file()]
    empty = [] if missing else [n for n in names if (img_dir / n).stat().st_size == 0]
    for problem, bad in (("missing from", missing), ("empty (0 bytes) in", empty)):
        if bad:
            shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
            raise DataError(f"{where}: {len(bad)} listed image(s) {problem} {img_dir}: {shown}; "
                            "add the files or remove their rows from gt.csv.")
    return LabelledImages(tuple(names), tuple(img_dir / n for n in names), labels, k)


def unlisted(images: LabelledImages, img_dir: str | os.PathLike) -> list[str]:
    """The files of ``img_dir`` that the labels do not list (and so are not used), sorted."""
    listed = set(images.names)
    return [p.name for p in list_image_files(img_dir) if p.name not in listed]


def _checked_names(gt: object, where: str) -> list[str]:
    """The sorted keys of ``gt`` once each is a plain file name; DataError naming the first that is not."""
    if not isinstance(gt, Mapping):
        raise DataError(f"{where}: a {type(gt).__name__}, not a mapping {{filename: class_id}}.")
    if not gt:
        raise DataError(f"{where}: no labelled images; gt.csv needs one 'filename,class_id' row per image.")
    for key in gt:
        check_name(key, where)
    return sorted(gt)


def load_split_dir(root: str | os.PathLike, split: str, num_classes: int | None = None) -> LabelledImages:
    """Read ``root/split/gt.csv`` and ``root/split/images`` (the grader layout), with ``root/classes.txt``'s names.

    ``num_classes`` is as for :func:`check_labels`: None for the training split, its K for a test split.
    """
    root = Path(root)
    gt_path = root / split / "gt.csv"
    images = labelled_from_gt(read_gt(gt_path), root / split / "images", str(gt_path), num_classes)
    return replace(images, class_names=read_class_names(root / "classes.txt", images.num_classes))


def list_image_files(img_dir: str | os.PathLike) -> list[Path]:
    """Every non-hidden entry of ``img_dir`` that is not a folder, sorted by name.

    Nothing is filtered by extension or readability: the grader scores every file it expects, and an
    undecodable one (a dangling symlink or a pipe included) is better labelled with a warning than missing.
    """
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: no such folder; pass the folder of images to classify.")
    return sorted((p for p in img_dir.iterdir() if not p.name.startswith(".") and not p.is_dir()),
                  key=lambda p: p.name)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/validation indices: (train_index, val_index), each sorted.

    Every class with two or more images keeps at least one on each side; a single-image class stays in training.
    Hand-written because scikit-learn's ``train_test_split(stratify=)`` refuses a class of one image and a held-out
    part smaller than the number of classes, both of which a user's small set may have.
    """
    labels = np.asarray(labels)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    train_idx: list[int] = []
    val_idx: list[int] = []
    for cls, count in zip(classes, counts, strict=True):
        members = np.flatnonzero(labels == cls)
        rng.shuffle(members)
        n_val = 0 if count < 2 else min(count - 1, max(1, int(round(count * val_fraction))))
        val_idx.extend(members[:n_val])
        train_idx.extend(members[n_val:])
    return np.sort(np.array(train_idx, dtype=np.int64)), np.sort(np.array(val_idx, dtype=np.int64))
