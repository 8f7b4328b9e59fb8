"""Hostile inputs: no image file can take ``classify`` down or cost unbounded memory, training names every
file it cannot use, and no checkpoint file can crash or trick the loader. Tiny generated files only
(the 200-megapixel JPEG is one flat colour, so it stays a few hundred kilobytes)."""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile_files import encode, hostile_folder, mistyped_exif, png_claiming
from PIL import Image, ImageOps

from birds_lpft.classifier import Classifier
from birds_lpft.data.images import MAX_ASPECT, ImageDataset, open_rgb
from birds_lpft.data.sets import DataError
from birds_lpft.models.net import NetConfig, build_net
from birds_lpft.models.preprocess import EvalTransform, TrainTransform, data_config
from birds_lpft.models.zoo import get_spec

import solution

from conftest import make_classifier

SIZE = 64
CFG = data_config(get_spec("mobilenet_v2"), SIZE)


# --------------------------------------------------------------------------- EXIF


def test_mistyped_exif_breaks_pillows_transpose_but_not_ours():
    data = encode(Image.new("RGB", (40, 20), (200, 10, 10)), "JPEG", exif=mistyped_exif(6))
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        with pytest.raises(Exception):  # noqa: B017 - struct.error, TypeError or AttributeError by Pillow version
            ImageOps.exif_transpose(img)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a readable orientation is applied without any warning
        out = open_rgb(data, "phone.jpg")
    assert out.size == (20, 40) and out.mode == "RGB"  # orientation 6: turned upright like any viewer shows it


def test_unreadable_exif_keeps_the_stored_pixels_with_a_warning(monkeypatch):
    data = encode(Image.new("RGB", (40, 20), (10, 200, 10)), "JPEG", exif=mistyped_exif(6))

    def broken(self):
        raise struct.error("unpack requires a buffer of 12 bytes")

    monkeypatch.setattr(Image.Image, "getexif", broken)
    with pytest.warns(UserWarning, match="phone.jpg: unreadable EXIF"):
        out = open_rgb(data, "phone.jpg")
    assert out.size == (40, 20)


# --------------------------------------------------------------------------- shapes and sizes


@pytest.mark.parametrize("size", [(40000, 1), (1, 30000), (50000, 3)])
def test_extreme_aspect_ratios_are_cut_before_resizing(size):
    data = encode(Image.new("RGB", size, (90, 120, 30)), "PNG")
    img = open_rgb(data, "strip.png", min_side=CFG.resize_size)
    assert max(img.size) <= MAX_ASPECT * min(img.size) + 1
    x = EvalTransform(CFG)(img)
    assert x.shape == (3, SIZE, SIZE) and torch.isfinite(x).all()
    t = TrainTransform(CFG, scale=(0.3, 1.0), jitter=0.2)(img)
    assert t.shape == (3, SIZE, SIZE)


def test_ordinary_photos_are_untouched():
    """birds50-a-sized photos (shorter side up to 500 px, ratio up to 2.5) decode exactly as Pillow alone does."""
    rng = np.random.default_rng(0)
    for size in [(500, 375), (375, 500), (333, 500), (500, 125), (500, 200)]:  # up to 4:1 passes through
        img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
        for fmt in ("PNG", "JPEG"):
            data = encode(img, fmt)
            with Image.open(io.BytesIO(data)) as plain:
                expected = np.asarray(plain.convert("RGB"))
            for need in (183, 366, 439, 675):  # eval at 160 (fast), 320 and 384 px, a training crop at 320 px
                assert np.array_equal(np.asarray(open_rgb(data, "x", min_side=need)), expected), (size, fmt, need)


def test_200_megapixel_jpeg_is_drafted_not_refused(tmp_path):
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (16384, 12288), (70, 110, 160)).save(path, quality=80)  # 201 MP, over Pillow's bomb limit
    assert 2 * Image.MAX_IMAGE_PIXELS < 16384 * 12288 and path.stat().st_size < 5_000_000
    limit = Image.MAX_IMAGE_PIXELS
    img = open_rgb(path, min_side=CFG.resize_size)
    assert limit == Image.MAX_IMAGE_PIXELS  # lifted for the header only, then restored
    assert img.size == (2048, 1536) and img.getpixel((5, 5)) == pytest.approx((70, 110, 160), abs=3)  # 1/8 scale
    assert min(open_rgb(path, min_side=1000).size) >= 2000  # never below twice what the caller needs


def test_draft_keeps_at_least_the_needed_side(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (2400, 1800), (1, 2, 3)).save(path)
    for need, side in ((100, 225), (300, 900), (450, 900), (451, 1800), (900, 1800)):
        assert min(open_rgb(path, min_side=need).size) == side  # 1/8, 1/2, 1/2, 1 (under 4x), 1
        assert side >= 2 * need or side == 1800
    assert open_rgb(path).size == (2400, 1800)  # no need given: full size


def test_a_non_jpeg_decompression_bomb_is_refused_before_decoding():
    data = png_claiming(30000, 30000)
    with pytest.raises(DataError, match=r"bomb.png: 30000x30000 pixels .* decompression-bomb limit"):
        open_rgb(data, "bomb.png", min_side=366)


# --------------------------------------------------------------------------- a folder of everything


def tiny_model(path: Path, k: int = 4) -> Path:
    torch.manual_seed(0)
    cfg = NetConfig("mobilenet_v2", k, 14)
    make_classifier(build_net(cfg).eval(), cfg, SIZE).save(path)
    return path


def test_classify_labels_every_file_of_a_hostile_folder(tmp_path):
    folder, unreadable = hostile_folder(tmp_path)
    model = tiny_model(tmp_path / "m.pt")
    with pytest.warns(UserWarning) as record:
        result = solution.classify(str(model), str(folder))
    expected = {p.name for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir()}
    assert set(result) == expected and len(expected) == 18
    assert all(type(v) is int and 0 <= v < 4 for v in result.values())
    messages = " ".join(str(w.message) for w in record)
    for name in unreadable:
        assert f"{name}: " in messages, name
    for name in expected - unreadable:  # decodable ones label without complaint
        assert f"{name}: " not in messages, name


def test_training_names_every_file_it_cannot_use(tmp_path):
    folder, unreadable = hostile_folder(tmp_path)
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and not p.is_dir())
    dataset = ImageDataset([folder / n for n in names], names, TrainTransform(CFG, scale=(0.3, 1.0), jitter=0.2))
    for i, name in enumerate(names):
        if name in unreadable:
            with pytest.raises(DataError, match=f"^{name}: .*(re-save|replace|downscale)"):
                dataset[i]
        else:
            x, index = dataset[i]
            assert x.shape == (3, SIZE, SIZE) and index == i


def test_any_exception_in_preprocessing_is_a_label_in_classify_never_a_base_exception(monkeypatch):
    data = encode(Image.new("RGB", (32, 32)), "PNG")
    calls = []

    def flaky(img):
        calls.append(1)
        if len(calls) == 1:
            raise ZeroDivisionError("a transform bug")
        return EvalTransform(CFG)(img)

    flaky.min_side, flaky.mean = CFG.resize_size, CFG.mean
    with pytest.warns(UserWarning, match="x.png: cannot preprocess"):
        x, _ = ImageDataset([data], ["x.png"], flaky, on_error="blank")[0]
    assert x.shape == (3, SIZE, SIZE)
    with pytest.raises(DataError, match="x.png: cannot preprocess"):
        calls.clear()
        ImageDataset([data], ["x.png"], flaky)[0]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("birds_lpft.data.images.open_rgb", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ImageDataset([data], ["x.png"], EvalTransform(CFG), on_error="blank")[0]


# --------------------------------------------------------------------------- checkpoints


def _good(tmp_path: Path) -> dict:
    return torch.load(tiny_model(tmp_path / "good.pt", 3), weights_only=True)


def _variants(good: dict) -> dict[str, object]:
    recipe, state = good["recipe"], good["state_dict"]
    no_head = {k: v for k, v in state.items() if k != "head.weight"}
    return {
        "missing recipe": {k: v for k, v in good.items() if k != "recipe"},
        "recipe not a dict": {**good, "recipe": [1, 2]},
        "probe not a dict": {**good, "recipe": {**recipe, "probe": [1]}},
        "deep recipe": {**good, "recipe": {**recipe, "probe": {"a": {"b": {"c": {"d": 1}}}}}},
        "long list": {**good, "recipe": {**recipe, "probe": {"Cs": [0.01] * 10**4}}},
        "unknown field": {**good, "recipe": {**recipe, "evil": 1}},
        "negative epochs": {**good, "recipe": {**recipe, "epochs": -5}},
        "unknown backbone": {**good, "recipe": {**recipe, "backbone": "no_such_net"}},
        "backbone not text": {**good, "recipe": {**recipe, "backbone": ["resnet"]}},
        "split out of range": {**good, "recipe": {**recipe, "split": 40}},
        "bad pooling": {**good, "recipe": {**recipe, "pooling": "max"}},
        "members zero": {**good, "recipe": {**recipe, "members": 0}},
        "huge image": {**good, "recipe": {**recipe, "image_size": 100000}},
        "tta not bool": {**good, "recipe": {**recipe, "tta_flip": "yes"}},
        "a retired lever on": {**good, "recipe": {**recipe, "tta_crops": [1.0]}},
        "another architecture": {**good, "recipe": {**recipe, "split": 13}},
        "digest edited": {**good, "architecture": "0" * 16},
        "names wrong count": {**good, "class_names": ["a"]},
        "head missing": {**good, "state_dict": no_head},
        "one species": {**good, "state_dict": {**state, "head.weight": state["head.weight"][:1]}},
        "an entry renamed": {**good, "state_dict": {**no_head, "head.weights": state["head.weight"]}},
        "tensor mis-shaped": {**good, "state_dict": {**state, "tail.14.conv.0.0.weight": torch.zeros(2, 2)}},
        "state not tensors": {**good, "state_dict": {"head.weight": [1, 2]}},
        "format": {**good, "format": "birds-lpft/99"},
        "not a dict": [1, 2, 3],
    }


def test_every_bad_checkpoint_is_a_value_error_naming_the_file(tmp_path):
    good = _good(tmp_path)
    for what, content in _variants(good).items():
        path = tmp_path / f"{what.replace(' ', '_')}.pt"
        torch.save(content, path)
        with pytest.raises(ValueError, match=f"(?s){path}.*python -m finetune") as err:
            Classifier.load(path)
        assert "not a valid checkpoint" in str(err.value) and "\n" not in str(err.value), what
    Classifier.load(tmp_path / "good.pt")  # and the untouched one still loads


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 100, "truncated"])
def test_unreadable_checkpoint_bytes(tmp_path, content):
    good = tiny_model(tmp_path / "good.pt").read_bytes()
    path = tmp_path / "bad.pt"
    path.write_bytes(good[: len(good) // 2] if content == "truncated" else content)
    with pytest.raises(ValueError, match=f"{path}: cannot read this checkpoint"):
        Classifier.load(path)
    with pytest.raises(ValueError, match="no such file"):
        Classifier.load(tmp_path / "absent.pt")
