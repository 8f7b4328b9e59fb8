"""The data layer: bad inputs fail loudly naming the file, every image mode opens as RGB, orders are fixed."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from birds_lpft.data.images import open_rgb
from birds_lpft.data.sets import (
    MAX_CLASS_ID,
    DataError,
    LabelledImages,
    check_labels,
    labelled_from_gt,
    list_image_files,
    load_split_dir,
    read_class_names,
    read_gt,
    stratified_split,
)
from birds_lpft.data.synthetic import load_data, make_synthetic, write_grader_layout


def _png_bytes(size=(8, 8), colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _layout(root: Path, gt_text: str, images: dict[str, bytes]) -> Path:
    """``root/train/gt.csv`` with ``gt_text`` and ``root/train/images/<name>`` for each image; returns gt.csv."""
    (root / "train" / "images").mkdir(parents=True)
    for name, data in images.items():
        (root / "train" / "images" / name).write_bytes(data)
    gt = root / "train" / "gt.csv"
    gt.write_text(gt_text)
    return gt


# --------------------------------------------------------------------------- bad inputs -> DataError


def test_missing_image_names_the_image_and_gt_file(tmp_path):
    gt = _layout(tmp_path, "filename,class_id\na.png,0\nb.png,1\nghost.png,1\n",
                 {"a.png": _png_bytes(), "b.png": _png_bytes()})
    with pytest.raises(DataError) as exc:
        load_split_dir(tmp_path, "train")
    msg = str(exc.value)
    assert "ghost.png" in msg and str(gt) in msg
    assert "a.png" not in msg  # only the offending file is listed
    assert "remove their rows" in msg or "add the files" in msg


@pytest.mark.parametrize("bad", ["abc", "1.5", "", "0x1", "two", "nan", "inf", "1e400"])
def test_non_integer_label_in_gt_csv(tmp_path, bad):
    gt = _layout(tmp_path, f"filename,class_id\na.png,0\nb.png,{bad}\n",
                 {"a.png": _png_bytes(), "b.png": _png_bytes()})
    with pytest.raises(DataError) as exc:
        read_gt(gt)
    msg = str(exc.value)
    assert f"{gt}:3" in msg  # file and line of the bad row
    assert "integers 0..K-1" in msg


@pytest.mark.parametrize("bad", ["abc", 1.5, True, False, np.bool_(True), None, float("nan"), "0.5"])
def test_non_integer_label_in_mapping(tmp_path, bad):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (img_dir / name).write_bytes(_png_bytes())
    with pytest.raises(DataError) as exc:
        labelled_from_gt({"a.png": 0, "b.png": bad, "c.png": 1}, img_dir, where="my_gt.csv")
    msg = str(exc.value)
    assert "my_gt.csv" in msg and "b.png" in msg
    assert "integers 0..K-1" in msg


def test_integer_like_labels_are_accepted(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        (img_dir / name).write_bytes(_png_bytes())
    images = labelled_from_gt({"a.png": " 1 ", "b.png": np.int64(0), "c.png": 1}, img_dir)
    assert images.labels.tolist() == [1, 0, 1]
    assert images.labels.dtype == np.int64 and images.num_classes == 2
    # a whole number is a label however it is written: '0' and 0.0 alike (a pandas column of floats, say)
    same = labelled_from_gt({"a.png": 1.0, "b.png": "0.0", "c.png": np.float32(1)}, img_dir)
    assert same.labels.tolist() == [1, 0, 1]


def test_empty_listed_images_are_refused_and_unlisted_ones_noted(tmp_path, capsys):
    write_grader_layout(tmp_path, "train", make_synthetic(num_classes=2, per_class=3, size=32, seed=0))
    images = tmp_path / "train" / "images"
    (images / "stray.jpg").write_bytes(_png_bytes())  # in the folder, not in gt.csv
    train, _ = load_data(tmp_path)
    assert "note: 1 file(s)" in capsys.readouterr().out and "stray.jpg" not in train.names
    (images / train.names[2]).write_bytes(b"")
    with pytest.raises(DataError, match=f"1 listed image.s. empty .0 bytes. in .*{train.names[2]}"):
        load_data(tmp_path)


@pytest.mark.parametrize(
    "labels, hint",
    [
        ({"a.png": -1, "b.png": 0, "c.png": 1}, "negative"),
        ({"a.png": 0, "b.png": 2, "c.png": 2}, "classes without images: [1]"),
        ({"a.png": 1, "b.png": 2, "c.png": 3}, "classes without images: [0]"),
        ({"a.png": -2, "b.png": -1, "c.png": -1}, "negative"),
        ({"a.png": -1, "b.png": 0, "c.png": 2}, "negative"),  # as many distinct ids as K = max + 1
    ],
)
def test_labels_not_0_to_k_minus_1(tmp_path, labels, hint):
    rows = "".join(f"{n},{y}\n" for n, y in labels.items())
    gt = _layout(tmp_path, "filename,class_id\n" + rows, {n: _png_bytes() for n in labels})
    with pytest.raises(DataError) as exc:
        load_split_dir(tmp_path, "train")
    msg = str(exc.value)
    assert str(gt) in msg and hint in msg
    assert "renumber them 0..K-1" in msg


@pytest.mark.parametrize("content", ["nothing", "subfolder_only"])
def test_empty_image_folder(tmp_path, content):
    gt = _layout(tmp_path, "filename,class_id\na.png,0\n", {})
    img_dir = tmp_path / "train" / "images"
    if content == "subfolder_only":
        (img_dir / "sub").mkdir()
        (img_dir / "sub" / "a.png").write_bytes(_png_bytes())
    with pytest.raises(DataError) as exc:
        load_split_dir(tmp_path, "train")
    msg = str(exc.value)
    assert str(img_dir) in msg and "empty" in msg
    assert "put the training images there" in msg
    assert gt.is_file()


def test_missing_image_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder") as exc:
        labelled_from_gt({"a.png": 0}, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(exc.value)


def test_gt_without_rows(tmp_path):
    gt = _layout(tmp_path, "filename,class_id\n", {"a.png": _png_bytes()})
    with pytest.raises(DataError, match="no labelled images") as exc:
        load_split_dir(tmp_path, "train")
    assert str(gt) in str(exc.value)


@pytest.mark.parametrize(
    "name, data",
    [
        ("corrupt.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10),
        ("random.png", bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8))),
        ("empty.png", b""),
        ("text.jpg", b"hello, world\n"),
        ("truncated.png", _png_bytes(size=(64, 64))[:60]),
    ],
)
def test_unreadable_image(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as exc:
        open_rgb(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "re-save it as JPEG or PNG" in msg


def test_unreadable_bytes_use_the_given_name():
    with pytest.raises(DataError, match=r"^0007\.jpg: cannot read"):
        open_rgb(b"garbage", "0007.jpg")


def test_missing_image_file_via_open_rgb(tmp_path):
    with pytest.raises(DataError) as exc:
        open_rgb(tmp_path / "gone.jpg")
    assert str(tmp_path / "gone.jpg") in str(exc.value)


@pytest.mark.parametrize(
    "text, found",
    [
        ("name,label\na.png,0\n", "name,label"),  # wrong names
        ("class_id,filename\n0,a.png\n", "class_id,filename"),  # swapped
        ("filename\na.png\n", "'filename'"),  # one column
        ("filename,class_id,extra\na.png,0,1\n", "filename,class_id,extra"),
    ],
)
def test_gt_wrong_header_shows_found_and_expected(tmp_path, text, found):
    gt = _layout(tmp_path, text, {"a.png": _png_bytes()})
    with pytest.raises(DataError) as exc:
        read_gt(gt)
    msg = str(exc.value)
    assert str(gt) in msg and found in msg and "expected 'filename,class_id'" in msg
    assert "add it" not in msg  # a header is there: it is misspelt, not missing


@pytest.mark.parametrize("text, first", [("x.jpg,3\nb.png,0\n", "'x.jpg,3'"), ("\na.png,0\n", "''"), ("", None)])
def test_gt_missing_header_says_add_it(tmp_path, text, first):
    gt = _layout(tmp_path, text, {"a.png": _png_bytes()})
    with pytest.raises(DataError) as exc:
        read_gt(gt)
    msg = str(exc.value)
    assert str(gt) in msg and "'filename,class_id'" in msg and "add it" in msg
    assert first is None or f"first line {first}" in msg  # the line it read, so the user sees why


@pytest.mark.parametrize(
    "rows, what",
    [("a.png\n", "expected 'filename,class_id'"), ("a.png,0,1\n", "expected 'filename,class_id'"),
     ("a.png,0\na.png,1\n", "listed twice")],
)
def test_gt_bad_rows(tmp_path, rows, what):
    gt = _layout(tmp_path, "filename,class_id\n" + rows, {"a.png": _png_bytes()})
    with pytest.raises(DataError, match=what) as exc:
        read_gt(gt)
    assert str(gt) in str(exc.value)


def test_gt_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file") as exc:
        read_gt(tmp_path / "gt.csv")
    assert str(tmp_path / "gt.csv") in str(exc.value)


def test_gt_tolerates_bom_spaces_blank_lines_and_crlf(tmp_path):
    gt = tmp_path / "gt.csv"
    gt.write_bytes("\ufefffilename , class_id\r\n b.png , 1\r\n\r\na.png,0\r\n,\r\n".encode("utf-8"))
    assert read_gt(gt) == {"b.png": 1, "a.png": 0}


# --------------------------------------------------------------------------- hostile labels: bounded checks


def _img_dir(root: Path, names) -> Path:
    """``root/images`` holding a tiny PNG per name."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        (img_dir / name).write_bytes(_png_bytes())
    return img_dir


def test_huge_class_id_fails_fast_naming_the_line(tmp_path):
    gt = _layout(tmp_path, "filename,class_id\na.png,0\nb.png,1\nc.png,4815162342\n",
                 {n: _png_bytes() for n in ("a.png", "b.png", "c.png")})
    start = time.perf_counter()
    with pytest.raises(DataError) as exc:
        load_split_dir(tmp_path, "train")
    assert time.perf_counter() - start < 0.5  # no range over the id: 4.8e9 set entries took minutes, then MemoryError
    msg = str(exc.value)
    assert f"{gt}:4" in msg and "4815162342" in msg and "too large" in msg


@pytest.mark.parametrize("huge", [4815162342, 2**70, np.uint64(2**63), "1180591620717411303424", 10**5000],
                         ids=["4815162342", "2**70", "uint64", "str", "10**5000"])
def test_huge_class_id_in_mapping_names_the_entry(tmp_path, huge):
    img_dir = _img_dir(tmp_path, ("a.png", "b.png", "c.png"))
    start = time.perf_counter()
    with pytest.raises(DataError) as exc:  # 2**70 used to be a raw OverflowError from np.array(..., int64)
        labelled_from_gt({"a.png": 0, "b.png": 1, "c.png": huge}, img_dir, where="train_gt")
    assert time.perf_counter() - start < 0.5
    msg = str(exc.value)
    assert "train_gt: c.png" in msg and "too large" in msg and len(msg) < 400


def test_class_id_bound_is_exclusive(tmp_path):
    img_dir = _img_dir(tmp_path, ("a.png", "b.png"))
    with pytest.raises(DataError, match="too large"):
        labelled_from_gt({"a.png": 0, "b.png": MAX_CLASS_ID}, img_dir)
    with pytest.raises(DataError, match=r"classes without images: \[1, 2, .*\] \(99998 in all\)"):
        labelled_from_gt({"a.png": 0, "b.png": MAX_CLASS_ID - 1}, img_dir)  # a full-size absent list is cheap


def test_negative_class_id_is_refused_at_its_line(tmp_path):
    gt = _layout(tmp_path, "filename,class_id\na.png,1\nb.png,-1\n", {})
    with pytest.raises(DataError) as exc:
        read_gt(gt)  # read_gt used to return {'a.png': 1, 'b.png': -1}
    msg = str(exc.value)
    assert f"{gt}:3" in msg and "-1 is negative" in msg


@pytest.mark.parametrize("labels", [np.array([True, False, True]), np.array([0.0, 1.0]), np.array([0, 1, 10**12])])
def test_check_labels_refuses_bools_floats_and_huge_ids(labels):
    with pytest.raises(DataError, match="my.csv: .*integers 0..K-1"):
        check_labels(labels, "my.csv")  # a bool array used to count as K = 2


@pytest.mark.parametrize("key", [3, None, 2.5, ("a.png",), b"b.png"])
def test_non_str_key_is_named(tmp_path, key):
    img_dir = _img_dir(tmp_path, ("a.png", "b.png"))
    with pytest.raises(DataError) as exc:  # used to be a raw TypeError from sorted() or img_dir / key
        labelled_from_gt({"a.png": 0, key: 1}, img_dir, where="train_gt")
    msg = str(exc.value)
    assert "train_gt" in msg and repr(key) in msg and type(key).__name__ in msg


@pytest.mark.parametrize("key", ["../outside.png", "sub/inner.png", "..", ".", "", "a\\b.png", "a\x00.png",
                                 str(Path("/tmp/abs.png"))])
def test_key_that_is_not_a_plain_file_name_is_refused(tmp_path, key):
    img_dir = _img_dir(tmp_path, ("a.png", "b.png"))
    (tmp_path / "outside.png").write_bytes(_png_bytes())  # there: the old code accepted it from outside the folder
    _img_dir(img_dir / "sub", ("inner.png",))
    with pytest.raises(DataError) as exc:
        labelled_from_gt({"a.png": 0, "b.png": 1, key: 1}, img_dir, where="train_gt")
    msg = str(exc.value)
    assert "train_gt" in msg and "not a plain file name" in msg


def test_path_like_name_in_gt_csv_names_the_line(tmp_path):
    gt = _layout(tmp_path, "filename,class_id\na.png,0\n../a.png,1\n", {"a.png": _png_bytes()})
    with pytest.raises(DataError, match=f"^{gt}:3: '../a.png' is not a plain file name"):
        read_gt(gt)


@pytest.mark.parametrize(
    "encode, line",
    [
        (lambda t: t.encode("utf-16"), 1),  # with a BOM
        (lambda t: t.encode("utf-16-le"), 1),  # without one: decodes as UTF-8 full of NULs
        (lambda t: t.encode("utf-16-be"), 1),
        (lambda t: t.encode("latin-1"), 3),
        (lambda t: t.encode("utf-8")[:-4] + b"\xff\n", 3),  # one undecodable byte
    ],
)
def test_non_utf8_gt_csv_says_save_as_utf8(tmp_path, encode, line):
    gt = _layout(tmp_path, "", {})
    gt.write_bytes(encode("filename,class_id\na.png,0\ncafé.png,1\n"))
    with pytest.raises(DataError) as exc:  # used to be a raw UnicodeDecodeError (or "add the header")
        read_gt(gt)
    msg = str(exc.value)
    assert msg.startswith(f"{gt}:{line}:") and "save the file as UTF-8" in msg


def test_utf8_with_bom_and_non_ascii_names_still_read(tmp_path):
    gt = tmp_path / "gt.csv"
    gt.write_bytes("filename,class_id\ncafé.png,1\n".encode("utf-8-sig"))
    assert read_gt(gt) == {"café.png": 1}


def test_oversized_csv_field_is_a_data_error(tmp_path):
    gt = _layout(tmp_path, "filename,class_id\na.png,0\n" + "b" * 200_000 + ".png,1\n", {})
    with pytest.raises(DataError, match=f"^{gt}:3: unreadable CSV row"):  # was a raw _csv.Error
        read_gt(gt)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200) | st.text(max_size=60).map(lambda t: ("filename,class_id\n" + t).encode()))
def test_any_gt_csv_bytes_read_or_raise_data_error(tmp_path, data):
    gt = tmp_path / "gt.csv"
    gt.write_bytes(data)
    try:
        gt_map = read_gt(gt)
    except DataError as err:
        assert str(err).startswith(str(gt))
    else:
        assert all(isinstance(v, int) and 0 <= v < MAX_CLASS_ID for v in gt_map.values())


def test_hostile_classes_txt_lines_are_ignored(tmp_path):
    (tmp_path / "classes.txt").write_text("0 Raven\n\u00b2 Superscript_Two\n" + "1" * 5000 + " Huge\n1 Jay\n")
    assert read_class_names(tmp_path / "classes.txt", 3) == ("Raven", "Jay", "2")  # int('²') used to raise


# --------------------------------------------------------------------------- test splits are test splits


def _two_splits(root: Path, train_labels, test_labels) -> None:
    """A grader layout with one tiny image per label in each split."""
    for split, labels in (("train", train_labels), ("test", test_labels)):
        rows = "".join(f"{split}{i}.png,{y}\n" for i, y in enumerate(labels))
        _img_dir(root / split, [f"{split}{i}.png" for i in range(len(labels))])
        (root / split / "gt.csv").write_text("filename,class_id\n" + rows)


def test_test_split_may_lack_a_species(tmp_path, capsys):
    _two_splits(tmp_path, [0, 1, 2, 0, 1, 2], [0, 2, 2])
    test = load_split_dir(tmp_path, "test", num_classes=3)
    assert test.num_classes == 3 and test.labels.tolist() == [0, 2, 2]
    with pytest.raises(DataError, match="renumber them 0..K-1"):
        load_split_dir(tmp_path, "test")  # without K it is judged as a training set, as before
    train, test = load_data(tmp_path)
    assert (train.num_classes, test.num_classes) == (3, 3)
    assert "test split: 3 images of 2 of the 3 species" in capsys.readouterr().out


def test_test_split_with_every_species_prints_nothing(tmp_path, capsys):
    _two_splits(tmp_path, [0, 1, 2, 0], [2, 1, 0])
    train, test = load_data(tmp_path)
    assert test.num_classes == 3 and len(test) == 3
    assert "test split" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", [3, 7])
def test_test_label_the_model_never_saw_is_refused(tmp_path, bad):
    _two_splits(tmp_path, [0, 1, 2], [0, bad])
    gt = tmp_path / "test" / "gt.csv"
    for load in (lambda: load_split_dir(tmp_path, "test", num_classes=3), lambda: load_data(tmp_path)):
        with pytest.raises(DataError) as exc:  # used to pass silently (bad = 3: K = 4 for the test set)
            load()
        msg = str(exc.value)
        assert str(gt) in msg and f"label {bad}" in msg and "K = 3" in msg


@pytest.mark.parametrize("k, error", [(3.0, TypeError), (True, ValueError), (1, ValueError),
                                      (MAX_CLASS_ID + 1, ValueError)])
def test_num_classes_must_be_a_sane_int(tmp_path, k, error):
    _two_splits(tmp_path, [0, 1, 2], [0, 1])
    with pytest.raises(error) as exc:
        load_split_dir(tmp_path, "test", num_classes=k)
    assert not isinstance(exc.value, DataError)  # a caller's bug, not bad data


def test_training_split_still_needs_every_class(tmp_path):
    _two_splits(tmp_path, [0, 2, 2], [0, 1])
    with pytest.raises(DataError) as exc:
        load_data(tmp_path)
    msg = str(exc.value)
    assert str(tmp_path / "train" / "gt.csv") in msg and "classes without images: [1]" in msg


# --------------------------------------------------------------------------- open_rgb: every mode -> RGB


def _roundtrip(tmp_path: Path, img: Image.Image, fmt: str, **save_kw) -> Path:
    path = tmp_path / f"img.{fmt.lower()}"
    img.save(path, format=fmt, **save_kw)
    return path


def _check_rgb(out: Image.Image, size: tuple[int, int]):
    assert out.mode == "RGB"
    assert out.size == size


@pytest.mark.parametrize("as_bytes", [False, True])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_open_rgb_rgb_and_grayscale(tmp_path, fmt, as_bytes):
    for mode, colour, expect in [("RGB", (200, 30, 40), (200, 30, 40)), ("L", 90, (90, 90, 90))]:
        path = _roundtrip(tmp_path, Image.new(mode, (20, 12), colour), fmt)
        out = open_rgb(path.read_bytes() if as_bytes else path)
        _check_rgb(out, (20, 12))
        tol = 0 if fmt == "PNG" else 6
        assert np.abs(np.asarray(out, dtype=int)[6, 10] - expect).max() <= tol


def test_open_rgb_bilevel(tmp_path):
    img = Image.new("1", (10, 10), 0)
    img.putpixel((3, 3), 1)
    out = open_rgb(_roundtrip(tmp_path, img, "PNG"))
    _check_rgb(out, (10, 10))
    assert out.getpixel((3, 3)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 0)


def test_open_rgb_palette(tmp_path):
    img = Image.new("RGB", (16, 8), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 8, 8))
    pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    path = _roundtrip(tmp_path, pal, "PNG")
    assert Image.open(path).mode == "P"
    out = open_rgb(path)
    _check_rgb(out, (16, 8))
    assert out.getpixel((2, 2)) == (255, 0, 0) and out.getpixel((12, 2)) == (0, 0, 255)


def test_open_rgb_palette_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (10, 10), 0)
    img.putpalette([0, 0, 0] + [255, 0, 0] + [0] * (256 - 2) * 3)  # index 0 black, index 1 red
    img.paste(1, (5, 0, 10, 10))
    path = _roundtrip(tmp_path, img, "PNG", transparency=0)  # index 0 (black) is transparent
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = open_rgb(path)
    _check_rgb(out, (10, 10))
    assert out.getpixel((1, 1)) == (255, 255, 255)  # transparent -> white, not black
    assert out.getpixel((7, 1)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_open_rgb_alpha_is_composited_on_white(tmp_path, mode):
    colour = (200, 20, 20, 255) if mode == "RGBA" else (60, 255)
    img = Image.new(mode, (10, 10), colour)
    clear = (0, 0, 0, 0) if mode == "RGBA" else (0, 0)
    for x in range(5):
        for y in range(10):
            img.putpixel((x, y), clear)
    path = _roundtrip(tmp_path, img, "PNG")
    assert Image.open(path).mode == mode
    out = open_rgb(path)
    _check_rgb(out, (10, 10))
    assert out.getpixel((1, 1)) == (255, 255, 255)  # fully transparent black -> white
    assert out.getpixel((8, 1)) == ((200, 20, 20) if mode == "RGBA" else (60, 60, 60))


def test_open_rgb_half_transparent_blends_with_white(tmp_path):
    out = open_rgb(_roundtrip(tmp_path, Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG"))
    assert all(abs(c - 127) <= 1 for c in out.getpixel((1, 1)))


def test_open_rgb_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (12, 10), (0, 255, 255, 0))  # pure red in CMYK
    path = _roundtrip(tmp_path, img, "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    out = open_rgb(path)
    _check_rgb(out, (12, 10))
    r, g, b = out.getpixel((6, 5))
    assert r > 200 and g < 60 and b < 60


def test_open_rgb_16bit_png_is_rescaled_not_saturated(tmp_path):
    ramp = np.linspace(1000, 60000, 32 * 8).reshape(8, 32).astype(np.uint16)  # all values > 255
    path = _roundtrip(tmp_path, Image.fromarray(ramp), "PNG")
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really a 16-bit image, not an 8-bit one
    out = open_rgb(path)
    _check_rgb(out, (32, 8))
    arr = np.asarray(out)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    grey = arr[..., 0].astype(int)
    assert grey.min() <= 5 and grey.max() >= 250  # full range used, not all white
    assert len(np.unique(grey)) > 100  # the ramp survives
    assert (np.diff(grey.ravel()) >= 0).all()  # monotone, like the input


def test_open_rgb_constant_16bit_png(tmp_path):
    out = open_rgb(_roundtrip(tmp_path, Image.fromarray(np.full((4, 6), 40000, np.uint16)), "PNG"))
    _check_rgb(out, (6, 4))


def test_open_rgb_float_tiff(tmp_path):
    arr = np.linspace(-3.0, 5.0, 60, dtype=np.float32).reshape(6, 10)
    out = open_rgb(_roundtrip(tmp_path, Image.fromarray(arr, mode="F"), "TIFF"))
    _check_rgb(out, (10, 6))
    grey = np.asarray(out)[..., 0].astype(int)
    assert grey.min() == 0 and grey.max() == 255


@pytest.mark.parametrize("orientation, expected_size", [(1, (40, 20)), (3, (40, 20)), (6, (20, 40)), (8, (20, 40))])
def test_open_rgb_applies_exif_orientation(tmp_path, orientation, expected_size):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # a red marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _roundtrip(tmp_path, img, "JPEG", exif=exif, quality=95)
    out = open_rgb(path)
    _check_rgb(out, expected_size)
    w, h = out.size
    # where the stored top-left marker ends up once the rotation is applied
    corner = {1: (2, 2), 3: (w - 3, h - 3), 6: (w - 3, 2), 8: (2, h - 3)}[orientation]
    r, g, b = out.getpixel(corner)
    assert r > 200 and b < 60


# --------------------------------------------------------------------------- sorted, deterministic lists


@pytest.mark.parametrize("order", [["c.png", "a.png", "b.png", "B.png"], ["b.png", "B.png", "a.png", "c.png"]])
def test_labelled_from_gt_sorted_by_name(tmp_path, order):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    truth = {"a.png": 0, "b.png": 1, "B.png": 2, "c.png": 1}
    for name in order:
        (img_dir / name).write_bytes(_png_bytes())
    images = labelled_from_gt({n: truth[n] for n in order}, img_dir)
    assert images.names == ("B.png", "a.png", "b.png", "c.png")
    assert images.sources == tuple(img_dir / n for n in images.names)
    assert images.labels.tolist() == [truth[n] for n in images.names]
    assert images.num_classes == 3


def test_list_image_files_sorted_no_hidden_no_folders(tmp_path):
    for name in ["z.jpg", "a.png", ".DS_Store", ".hidden.jpg", "m.JPG", "noext", "B.jpeg"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.jpg").write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()
    files = list_image_files(tmp_path)
    assert [p.name for p in files] == ["B.jpeg", "a.png", "m.JPG", "noext", "z.jpg"]
    assert all(p.parent == tmp_path for p in files)


def test_list_image_files_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        list_image_files(tmp_path / "nope")


def test_grader_layout_roundtrip(tmp_path):
    images = make_synthetic(num_classes=3, per_class=4, size=32, seed=3)
    write_grader_layout(tmp_path, "train", images)
    loaded = load_split_dir(tmp_path, "train")
    assert isinstance(loaded, LabelledImages)
    assert loaded.names == images.names and list(loaded.names) == sorted(loaded.names)
    assert np.array_equal(loaded.labels, images.labels) and loaded.num_classes == 3
    assert [p.read_bytes() for p in loaded.sources] == list(images.sources)


def test_subset_keeps_alignment_and_sorts():
    images = make_synthetic(num_classes=3, per_class=4, size=16, seed=0)
    sub = images.subset([7, 2, 5])
    assert sub.names == tuple(images.names[i] for i in (2, 5, 7))
    assert sub.labels.tolist() == [int(images.labels[i]) for i in (2, 5, 7)]
    assert sub.sources == tuple(images.sources[i] for i in (2, 5, 7)) and sub.num_classes == 3


# --------------------------------------------------------------------------- stratified split

LABELS = np.repeat(np.arange(6), [2, 3, 10, 25, 1, 7])


def test_split_is_seeded():
    a, b = stratified_split(LABELS, 0.2, seed=0), stratified_split(LABELS, 0.2, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    c = stratified_split(LABELS, 0.2, seed=1)
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.9])
def test_split_disjoint_covering_stratified(seed, fraction):
    labels = np.random.default_rng(seed).permutation(LABELS)
    train, val = stratified_split(labels, fraction, seed)
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()  # sorted, no repeats
    assert not set(train) & set(val)
    assert sorted(set(train) | set(val)) == list(range(len(labels)))
    for cls, count in zip(*np.unique(labels, return_counts=True), strict=True):
        n_tr, n_va = int((labels[train] == cls).sum()), int((labels[val] == cls).sum())
        if count == 1:
            assert (n_tr, n_va) == (1, 0)  # a singleton stays in training
        else:
            assert n_tr >= 1 and n_va >= 1
            target = min(max(count * fraction, 1), count - 1)  # the fraction, clamped to keep both sides
            assert abs(n_va - target) <= 0.5 + 1e-9


def test_split_fraction_roughly_respected():
    labels = np.repeat(np.arange(10), 40)
    for fraction in (0.1, 0.25, 0.5):
        _, val = stratified_split(labels, fraction, 0)
        assert len(val) == pytest.approx(fraction * len(labels), abs=10)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError):
        stratified_split(LABELS, fraction, 0)


def test_read_class_names_from_classes_txt_or_none(tmp_path):
    assert read_class_names(tmp_path / "classes.txt", 3) is None
    (tmp_path / "classes.txt").write_text("1 Blue_Jay\n\n0 Common Raven\nnot a line\n7 Out_Of_Range\n")
    assert read_class_names(tmp_path / "classes.txt", 3) == ("Common Raven", "Blue Jay", "2")
    write_grader_layout(tmp_path, "train", make_synthetic(num_classes=3, per_class=2, size=32, seed=0))
    assert load_split_dir(tmp_path, "train").class_names == ("Common Raven", "Blue Jay", "2")
