"""Data layer: the grader's layout (``gt.csv`` + an image folder) read into a checked, sorted labelled set.

Every bad input raises :class:`DataError` naming the file and the fix, so nothing is silently dropped.
Images are opened with EXIF orientation applied and converted to 8-bit RGB whatever their mode.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

# An image source is a file on disk or encoded bytes held in RAM (the generated demo set).
Source = Union[Path, bytes]
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
        gt[name] = _parse_label(label, f"{path}:{line_no}")
    return gt


def _parse_label(value: object, where: str) -> int:
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


def open_rgb(source: Source, name: str | None = None) -> Image.Image:
    """Open an image as 8-bit RGB with its EXIF orientation applied.

    Handles grayscale, palette, alpha (composited on white), CMYK, 16-bit and float images, JPEG or PNG.

    Raises:
        DataError: the file is missing, empty or not a decodable image.
    """
    label = name or str(source if isinstance(source, Path) else "<bytes>")
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{label}: cannot read this image ({type(err).__name__}: {err}); "
            "re-save it as JPEG or PNG, or remove it from gt.csv."
        ) from err


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float: convert("RGB") would clip at 255; rescale the real range to 0..255 first.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


@dataclass(frozen=True)
class LabelledImages:
    """A labelled image set in a fixed, sorted order.

    Attributes:
        names: file names, sorted.
        sources: a path or encoded bytes per name.
        labels: int64 class ids 0..K-1, aligned with ``names``.
        num_classes: K.
    """

    names: tuple[str, ...]
    sources: tuple[Source, ...]
    labels: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, index: Sequence[int]) -> "LabelledImages":
        index = sorted(int(i) for i in index)
        return LabelledImages(
            tuple(self.names[i] for i in index),
            tuple(self.sources[i] for i in index),
            self.labels[index],
            self.num_classes,
        )


def labelled_from_gt(gt: Mapping[str, object], img_dir: str | os.PathLike, where: str = "gt") -> LabelledImages:
    """Check a ``{filename: label}`` mapping against an image folder and build a :class:`LabelledImages`.

    Raises:
        DataError: empty folder or mapping, a listed image that is missing, bad labels.
    """
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: no such folder; pass the folder that holds the training images.")
    if not any(p.is_file() for p in img_dir.iterdir()):
        raise DataError(f"{img_dir}: the image folder is empty; put the training images there.")
    if not gt:
        raise DataError(f"{where}: no labelled images; gt.csv needs one 'filename,class_id' row per image.")
    names = sorted(gt)
    missing = [n for n in names if not (img_dir / n).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(
            f"{where}: {len(missing)} listed image(s) missing from {img_dir}: {shown}; "
            "add the files or remove their rows from gt.csv."
        )
    labels = np.array([_parse_label(gt[n], f"{where}: {n}") for n in names], dtype=np.int64)
    num_classes = check_labels(labels, where)
    return LabelledImages(tuple(names), tuple(img_dir / n for n in names), labels, num_classes)


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


def load_split_dir(root: str | os.PathLike, split: str) -> LabelledImages:
    """Read ``root/split/gt.csv`` and ``root/split/images`` (the grader layout)."""
    root = Path(root)
    gt_path = root / split / "gt.csv"
    return labelled_from_gt(read_gt(gt_path), root / split / "images", where=str(gt_path))


def list_image_files(img_dir: str | os.PathLike) -> list[Path]:
    """Every regular, non-hidden file in ``img_dir``, sorted by name.

    Nothing is filtered by extension: the grader scores every file it expects, and an undecodable one
    is better labelled with a warning than missing.
    """
    img_dir = Path(img_dir)
    if not img_dir.is_dir():
        raise DataError(f"{img_dir}: no such folder; pass the folder of images to classify.")
    return sorted((p for p in img_dir.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/validation indices.

    Every class with two or more images keeps at least one on each side; a class with a single image
    stays in training.

    Returns:
        (train_index, val_index), each sorted.
    """
    labels = np.asarray(labels)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    train_idx, val_idx = [], []
    for cls, count in zip(classes, counts):
        members = np.flatnonzero(labels == cls)
        rng.shuffle(members)
        n_val = 0 if count < 2 else min(count - 1, max(1, int(round(count * val_fraction))))
        val_idx.extend(members[:n_val])
        train_idx.extend(members[n_val:])
    return np.sort(np.array(train_idx, dtype=np.int64)), np.sort(np.array(val_idx, dtype=np.int64))
