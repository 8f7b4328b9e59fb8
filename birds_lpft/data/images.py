"""Decoding untrusted image files into 8-bit RGB, with bounded memory and time whatever the file holds.

Every stage reads through :func:`open_rgb` and :class:`ImageDataset`, so training and ``classify`` see the same
pixels. An undecodable file raises :class:`~birds_lpft.data.sets.DataError` naming it, or, for ``classify`` (where a
missing key scores zero at the grader), becomes a warning and a blank image.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from birds_lpft.data.sets import DataError, Source

# Beyond this aspect ratio the long side is cut to its middle before resizing, which would otherwise blow a thin
# strip up to an enormous image. Only a training crop could have used the lost ends; no bird photo is this elongated.
MAX_ASPECT = 4.0
# A large image is decoded (JPEG draft) or shrunk (reduce) to no less than this many times the side the
# resize needs, so the resize keeps antialiasing from real pixels.
OVERSAMPLE = 2
# EXIF orientation -> the transpose that undoes it (the table of PIL.ImageOps.exif_transpose).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_EXIF_ORIENTATION_TAG = 0x0112


def open_rgb(source: Source, name: str | None = None, *, min_side: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB with its EXIF orientation applied.

    Handles grayscale, palette, alpha (composited on white), CMYK, 16-bit and float images in any format Pillow
    reads. Given ``min_side`` (the shorter side the caller needs), a large image is decoded small (JPEG) or shrunk
    early to no less than ``OVERSAMPLE`` times it, which bounds memory; what is still over Pillow's
    decompression-bomb limit is refused. Every failure is a DataError naming the file (``name``, default the path).
    """
    label = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    try:
        with _opened(source, label) as img:
            request = _decoding(img, min_side)[0]  # a JPEG decoded at a reduced DCT scale (see _draft_request)
            if request is not None:
                img.draft("RGB", request)
            _check_pixels(img, label)
            img.load()
            upright = _orientation(img, label)  # read before _reduced, whose copy has no EXIF
            img = _reduced(img, min_side) if min_side is not None else img
            img = img.transpose(upright) if upright is not None else img
            return _to_rgb(_bounded_aspect(img))
    except DataError:
        raise
    except Exception as err:  # decoders raise OSError, ValueError, TypeError, struct.error, MemoryError, ...
        raise DataError(
            f"{label}: cannot read this image ({type(err).__name__}: {err}); "
            "re-save it as JPEG or PNG, or remove it from gt.csv."
        ) from err


def open_rgb_many(source: Source, name: str | None, min_sides: Sequence[int | None]) -> list[Image.Image]:
    """:func:`open_rgb` at each of ``min_sides``, decoding the file once per distinct decoding.

    Sides that decode alike (usually all of them: an image too small to draft or reduce decodes at full size)
    share one image; otherwise each gets exactly the pixels ``open_rgb`` would give it alone.
    """
    label = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    try:
        with _opened(source, label) as img:
            keys: list[tuple | int] = [_decoding(img, side) for side in min_sides]
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - let open_rgb raise its own DataError, naming the file
        keys = list(range(len(min_sides)))
    decoded: dict = {}
    for key, side in zip(keys, min_sides, strict=True):
        if key not in decoded:
            decoded[key] = open_rgb(source, name, min_side=side)
    return [decoded[key] for key in keys]


def _decoding(img: Image.Image, min_side: int | None) -> tuple:
    """What :func:`open_rgb` does differently for ``min_side``: its draft request and its reduction factor."""
    if min_side is None:
        return (None, 1)
    if img.format == "JPEG":
        return (_draft_request(img, min_side), 1)
    factor = _reduce_factor(img, min_side)
    return (None, factor if factor >= 2 else 1)


@contextmanager
def _opened(source: Source, label: str) -> Iterator[Image.Image]:
    """``Image.open`` with the decompression-bomb check deferred to :func:`_check_pixels`.

    Pillow checks the declared size inside ``open``, before ``draft`` could shrink a large JPEG, so the limit is
    lifted for that header-only call alone.
    """
    if isinstance(source, (str, os.PathLike)):
        mode = os.stat(source).st_mode  # raises FileNotFoundError for a missing or dangling path
        if not stat.S_ISREG(mode):  # opening a pipe or a device would block or never end
            raise DataError(f"{label}: not a regular file; replace it with the image file itself.")
    fp = io.BytesIO(source) if isinstance(source, bytes) else source
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        img = Image.open(fp)
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with img:
        yield img


def _draft_request(img: Image.Image, min_side: int) -> tuple[int, int] | None:
    """The size a JPEG's decoder is asked for: one ``2 * OVERSAMPLE`` times larger than needed or more decodes at a
    reduced DCT scale that keeps ``OVERSAMPLE`` times the needed side, so the resize still antialiases from real
    pixels; None where the image is too small to draft."""
    w, h = img.size
    scale = OVERSAMPLE * min_side / max(1, min(w, h))
    return (math.ceil(w * scale), math.ceil(h * scale)) if scale <= 0.5 else None


def _reduce_factor(img: Image.Image, min_side: int) -> int:
    """The integer shrink that keeps at least ``OVERSAMPLE`` times ``min_side`` (:func:`_reduced` applies it from 2)."""
    return min(img.size) // max(1, OVERSAMPLE * min_side)


def _reduced(img: Image.Image, min_side: int) -> Image.Image:
    """A large non-JPEG box-shrunk to ``OVERSAMPLE`` times the needed side or more (what ``draft`` does for a JPEG),
    before the mode conversions, which hold several full-size copies at once."""
    factor = _reduce_factor(img, min_side)
    if img.format == "JPEG" or factor < 2 or img.mode not in ("L", "LA", "RGB", "RGBA", "I", "F", "P", "1"):
        return img
    return img.convert("RGBA" if img.mode in ("P", "LA") else "L" if img.mode == "1" else img.mode).reduce(factor)


def _check_pixels(img: Image.Image, label: str) -> None:
    """Refuse what would still be a decompression bomb after drafting (Pillow's own error threshold)."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and img.size[0] * img.size[1] > 2 * limit:
        raise DataError(f"{label}: {img.size[0]}x{img.size[1]} pixels is over Pillow's decompression-bomb limit "
                        f"for a {img.format} file; downscale it or save it as JPEG.")


def _orientation(img: Image.Image, label: str) -> Image.Transpose | None:
    """The transpose that turns the image upright by its EXIF orientation tag, or None.

    Unlike ``ImageOps.exif_transpose``, which rewrites the EXIF block and raises on a mistyped tag, only the
    orientation is read; an unreadable EXIF block leaves the pixels as stored, with a warning.
    """
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION_TAG)
    except Exception as err:  # noqa: BLE001 - any malformed EXIF: the pixels themselves are still good
        warnings.warn(f"{label}: unreadable EXIF ({type(err).__name__}: {err}); using the image as stored.",
                      stacklevel=3)
        return None
    return _ORIENTATION.get(orientation) if isinstance(orientation, int) else None


def _bounded_aspect(img: Image.Image) -> Image.Image:
    """Cut the long side of an extremely elongated image to ``MAX_ASPECT`` times the short side, centred."""
    w, h = img.size
    short = max(1, min(w, h))
    if max(w, h) <= MAX_ASPECT * short:
        return img
    keep = int(MAX_ASPECT * short)
    if w > h:
        return img.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h))
    return img.crop((0, (h - keep) // 2, w, (h - keep) // 2 + keep))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float: convert("RGB") would clip at 255; rescale the real range to 0..255 first.
        arr = np.asarray(img, dtype=np.float32)
        lo = float(arr.min())
        hi = float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.round().astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def as_data_error(err: Exception, name: str) -> DataError:
    """``err`` as the :class:`DataError` a user sees: decoding raises its own (naming the file and the fix);
    anything else, from a preset, is wrapped so that it names the file too."""
    if isinstance(err, DataError):
        return err
    return DataError(f"{name}: cannot preprocess this image ({type(err).__name__}: {err}); "
                     "re-save it as JPEG or PNG, or remove it from gt.csv.")


class ImageDataset(Dataset):
    """``(transform(image), index)`` per source; images are decoded on access, never cached on disk.

    ``transform`` is a preset from :mod:`birds_lpft.models.net`; its ``min_side`` (if any) bounds decoding.
    ``on_error='raise'`` (training) raises a :class:`DataError` naming the file; ``'blank'`` (``classify``) turns any
    ``Exception`` into a warning and a mean-grey image, so the file still gets a prediction, and records it in
    ``failures`` ({index: why}).
    """

    def __init__(self, sources: Sequence[Source], names: Sequence[str], transform: Callable, *,
                 on_error: str = "raise"):
        if on_error not in ("raise", "blank"):
            raise ValueError(f"on_error must be 'raise' or 'blank', got {on_error!r}")
        self.sources = list(sources)
        self.names = list(names)
        self.transform = transform
        self.on_error = on_error
        self.failures: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        try:
            return self._load(i), i
        except Exception as err:  # noqa: BLE001 - never a BaseException: KeyboardInterrupt still stops the run
            error = as_data_error(err, self.names[i])
            if self.on_error == "raise":
                raise error from err
            self.failures[i] = str(error)
            warnings.warn(f"{error} It is labelled from a blank image.", stacklevel=2)
            return self.transform(self._blank()), i

    def _load(self, i: int):
        img = open_rgb(self.sources[i], self.names[i], min_side=getattr(self.transform, "min_side", None))
        return self.transform(img)

    def _blank(self) -> Image.Image:
        side = getattr(self.transform, "min_side", None) or 256
        mean = getattr(self.transform, "mean", (0.5, 0.5, 0.5))
        return Image.new("RGB", (side, side), tuple(int(255 * m) for m in mean))
