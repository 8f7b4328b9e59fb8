"""Property-based tests (hypothesis) of decoding untrusted files: random modes, formats, sizes, aspect ratios
up to 1:50000, truncation points and EXIF blocks with random tag types. Whatever the bytes, ``classify``'s
path returns a valid image tensor and a label, and training's path either accepts the file or raises a
``DataError`` that names it."""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from birds_lpft.classifier import Classifier
from birds_lpft.data.images import ImageDataset
from birds_lpft.data.sets import DataError
from birds_lpft.models.net import NetConfig, build_net
from birds_lpft.models.preprocess import EvalTransform, TrainTransform, data_config
from birds_lpft.models.zoo import get_spec

from conftest import make_classifier

SIZE = 32
CFG = data_config(get_spec("mobilenet_v2"), SIZE)
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "I", "F", "CMYK"]
FORMATS = ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "BMP"]
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def exif_blocks(draw) -> bytes:
    """A little-endian EXIF block of random entries: any tag, any of the 12 TIFF types, any count and value
    (offsets may point anywhere), optionally an orientation."""
    entries = draw(st.lists(st.tuples(st.sampled_from([0x0100, 0x0101, 0x010F, 0x0112, 0x0131, 0x8769, 0x8825,
                                                       0x9003, 0xA002]) | st.integers(0, 0xFFFF),
                                      st.integers(1, 12), st.integers(0, 70000), st.integers(0, 2**32 - 1)),
                            max_size=6, unique_by=lambda e: e[0]))
    entries.sort()
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + draw(st.binary(max_size=40))


@st.composite
def image_files(draw, whole: bool = False) -> bytes:
    """Encoded bytes of a random image, maybe with EXIF, maybe truncated, maybe not an image at all
    (``whole``: always a complete, valid file)."""
    if not whole and draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300))
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    short, ratio = draw(st.integers(1, 24)), draw(st.sampled_from([1, 2, 5, 50, 500, 5000, 50000]))
    long_side = min(short * ratio, 50000)
    w, h = (long_side, short) if draw(st.booleans()) else (short, long_side)
    seed = draw(st.integers(0, 2**16))
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))
    img = img.convert(mode) if mode not in ("I;16", "I", "F") else img.convert("L").convert(mode)
    kwargs = {"exif": draw(exif_blocks())} if fmt == "JPEG" and draw(st.booleans()) else {}
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # this format cannot hold this mode: not a file anyone has
    data = buf.getvalue()
    cut = None if whole else draw(st.none() | st.floats(0.0, 1.0))
    return data if cut is None else data[: int(len(data) * cut)]


@pytest.fixture(scope="module")
def model() -> Classifier:
    torch.manual_seed(0)
    cfg = NetConfig("mobilenet_v2", 5, 14)
    return make_classifier(build_net(cfg).eval(), cfg, SIZE)


@SETTINGS
@given(data=image_files())
def test_classify_path_always_gives_a_tensor_and_a_label(model, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unreadable files warn; that they do is tested elsewhere
        x, index = ImageDataset([data], ["f.img"], EvalTransform(CFG), on_error="blank")[0]
        labels = model.predict([data], ["f.img"], precision="fp32")
    assert x.shape == (3, SIZE, SIZE) and torch.isfinite(x).all() and index == 0
    assert labels.shape == (1,) and 0 <= int(labels[0]) < 5


@SETTINGS
@given(data=image_files())
def test_training_path_accepts_a_file_or_names_it(data):
    dataset = ImageDataset([data], ["0042.jpg"], TrainTransform(CFG, scale=(0.3, 1.0), jitter=0.2))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an unreadable EXIF block warns and keeps the pixels
            x, _ = dataset[0]
    except DataError as err:
        assert str(err).startswith("0042.jpg: ") and ("re-save" in str(err) or "downscale" in str(err))
    else:
        assert x.shape == (3, SIZE, SIZE) and torch.isfinite(x).all()


@SETTINGS
@given(data=image_files(whole=True))
def test_every_complete_image_decodes(data):
    """Whatever the mode, format, shape or EXIF block, a complete file is an image, never an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreadable EXIF block warns and keeps the pixels
        x, _ = ImageDataset([data], ["0042.jpg"], EvalTransform(CFG))[0]
    assert x.shape == (3, SIZE, SIZE) and torch.isfinite(x).all()
