"""Decoding untrusted image files into 8-bit RGB, with bounded memory and time whatever the file holds.

Every stage reads images through :func:`open_rgb` and :class:`ImageDataset`, so training and ``classify``
see the same pixels. A file that cannot be decoded raises :class:`~birds_lpft.data.sets.DataError` naming it;
``ImageDataset(on_error="blank")`` turns that into a warning and a blank image instead, for ``classify``,
where every file must get a label (a missing key scores zero at the grader).
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

# Beyond this aspect ratio the long side is cut to the middle before resizing: a 40000x1 strip would
# otherwise be resized to 14.6M x 366 pixels. The centre crop only ever sees the middle; a training crop
# (ratio 3/4..4/3) could have come from the ends, which are lost, but no bird photo is this elongated
# (birds50-a's most is 2.5:1), so ordinary images are never touched.
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

    Handles grayscale, palette, alpha (composited on white), CMYK, 16-bit and float images in any format
    Pillow reads. A JPEG at least 4x larger than needed is decoded at the smallest DCT scale (1/2, 1/4, 1/8)
    that keeps twice ``min_side``, which bounds the memory of a 200-megapixel photo and is faster; other
    formats above Pillow's decompression-bomb limit are refused.

    Args:
        source: a path or the encoded bytes.
        name: how messages name the file (default: the path).
        min_side: the shorter side the caller needs (None: decode at full size).

    Raises:
        DataError: the file is missing, not a regular file, too large or not a decodable image.
    """
    label = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    try:
        with _opened(source, label) as img:
            if min_side is not None:
                _draft(img, min_side)
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

    Views that need different sides usually decode alike (an image under 4x the larger need is decoded at
    full size for both), so the file is decoded once and the same image is returned for them; where the
    draft scale or reduction differs, each gets exactly the pixels ``open_rgb`` would give it alone.
    """
    label = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    try:
        with _opened(source, label) as img:
            keys = [_decoding(img, side) for side in min_sides]
    except DataError:
        raise
    except Exception:  # noqa: BLE001 - let open_rgb raise its own DataError, naming the file
        keys = list(range(len(min_sides)))
    decoded: dict = {}
    for key, side in zip(keys, min_sides):
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

    Pillow checks the declared size inside ``open``, before ``draft`` could shrink a large JPEG; the limit
    is lifted for the ``open`` call alone (which only reads the header) and restored at once.
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


def _draft(img: Image.Image, min_side: int) -> None:
    """Let a JPEG at least 4x larger than needed decode at a reduced DCT scale (1/2, 1/4 or 1/8) that keeps
    at least twice the needed side: the resize that follows still has 2x to antialias from, and every
    image under 4x the need decodes exactly as before (birds50-a's 500 px photos at any preset)."""
    request = _draft_request(img, min_side) if img.format == "JPEG" else None
    if request is not None:
        img.draft("RGB", request)


def _draft_request(img: Image.Image, min_side: int) -> tuple[int, int] | None:
    """The size :func:`_draft` asks a JPEG's decoder for, or None where the image is under 4x the need."""
    w, h = img.size
    scale = OVERSAMPLE * min_side / max(1, min(w, h))
    return (math.ceil(w * scale), math.ceil(h * scale)) if scale <= 0.5 else None


def _reduce_factor(img: Image.Image, min_side: int) -> int:
    """The integer shrink that keeps at least twice ``min_side`` (:func:`_reduced` applies it from 2)."""
    return min(img.size) // max(1, OVERSAMPLE * min_side)


def _reduced(img: Image.Image, min_side: int) -> Image.Image:
    """A non-JPEG at least 4x larger than needed, shrunk by an integer box filter to at least twice the
    needed side (what ``draft`` does for a JPEG), before the mode conversions, which hold several
    full-size copies at once."""
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

    Only the orientation is read, unlike ``ImageOps.exif_transpose``, which also rewrites the EXIF block and
    raises on a mistyped tag in it. An unreadable EXIF block leaves the pixels as stored, with a warning.
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

    Args:
        sources, names: the images and the names messages use for them.
        transform: a preset from :mod:`birds_lpft.models.net`; its ``min_side`` (if any) bounds JPEG decoding.
        on_error: 'raise' (training: a :class:`DataError` naming the file) or 'blank' (``classify``: any
            ``Exception`` while reading or preprocessing a file gives a warning naming it and a blank,
            mean-grey image, so that the file still gets a prediction).

    Attributes:
        failures: {index: why} for each image replaced by a blank one so far.
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
