"""A folder of hostile image files, for checking that ``classify`` labels every one of them (``hostile_folder``).

Holds: a JPEG with a mistyped EXIF tag next to its orientation, 40000x1 and 1x30000 strips, truncated,
zero-byte and text-as-.jpg files, RGBA, 16-bit, CMYK, GIF, WebP, 1x1, a PNG decompression bomb's header,
oddly named files, a symlink, a dangling symlink, a named pipe, a hidden file and a subfolder; with
``with_200mp`` also a 201-megapixel JPEG (one flat colour, so the file stays small).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from birds_lpft.utils.outputs import atomic_write, write_bytes


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def mistyped_exif(orientation: int = 6) -> bytes:
    """An EXIF block whose ImageWidth is stored as ASCII (Pillow cannot even write that) plus an orientation:
    what some phones and Windows' rotate write. ``ImageOps.exif_transpose`` raises on it."""
    entries = [(0x0100, 2, 6, 38), (0x0112, 3, 1, orientation)]  # (tag, type, count, value/offset), sorted
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd + b"forty\x00"  # data at 8 + 30 = 38


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height`` (valid CRC): a decompression bomb's header."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def hostile_folder(root: Path, with_200mp: bool = False) -> tuple[Path, set[str]]:
    """Every kind of file a test folder might hold; returns it and the names expected to be unreadable."""
    folder = root / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    good_jpeg = encode(rgb, "JPEG")
    files = {
        "bad_exif.jpg": encode(rgb, "JPEG", exif=mistyped_exif(6)),
        "strip.png": encode(Image.new("RGB", (40000, 1), (1, 2, 3)), "PNG"),
        "tall.png": encode(Image.new("L", (1, 30000), 7), "PNG"),
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "deep.png": encode(Image.fromarray((rng.random((20, 30)) * 65535).astype(np.uint16)), "PNG"),
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "anim.gif": encode(rgb.convert("P"), "GIF"),
        "photo.webp": encode(rgb, "WEBP"),
        "dot.png": encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "bomb.png": png_claiming(30000, 30000),
        "naïve name, with comma & spaces.jpg": good_jpeg,
        "no_extension": good_jpeg,
    }
    for name, data in files.items():  # each whole or absent, also if interrupted: no stray half-file to label
        write_bytes(folder / name, data)
    (folder / "link.jpg").symlink_to(folder / "bad_exif.jpg")
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    os.mkfifo(folder / "pipe.jpg")  # opening it would block forever
    write_bytes(folder / ".hidden.jpg", good_jpeg)
    (folder / "subfolder").mkdir()
    if with_200mp:
        with atomic_write(folder / "phone_200mp.jpg") as f:
            Image.new("RGB", (16384, 12288), (70, 110, 160)).save(f, format="JPEG", quality=80)
    unreadable = {"truncated.jpg", "zero.jpg", "text.jpg", "bomb.png", "dangling.jpg", "pipe.jpg"}
    return folder, unreadable
