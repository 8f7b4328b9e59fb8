"""A small generated image set: the demo default when no dataset is given (:func:`load_data`), and the tests' data.

Each class is a coloured shape on a textured background, easy for a pretrained backbone and enough for a random one
to run the whole pipeline. Images are JPEG bytes in RAM; :func:`write_grader_layout` lays them out on disk.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from birds_lpft.data.sets import LabelledImages, load_split_dir, unlisted
from birds_lpft.utils.outputs import write_bytes, write_text

_SHAPES = ("ellipse", "rectangle", "triangle", "cross")


def _draw(label: int, num_classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    hue = np.array([np.sin(2 * np.pi * label / num_classes + p) for p in (0.0, 2.1, 4.2)]) * 100 + 128
    background = rng.normal(100, 40, (size, size, 3)).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    w = int(size * rng.uniform(0.35, 0.6))
    x, y = (int(v) for v in rng.integers(0, size - w, 2))
    colour = tuple(int(c) for c in np.clip(hue + rng.normal(0, 10, 3), 0, 255))
    shape = _SHAPES[label % len(_SHAPES)]
    if shape == "ellipse":
        draw.ellipse([x, y, x + w, y + w], fill=colour)
    elif shape == "rectangle":
        draw.rectangle([x, y, x + w, y + w], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y + w), (x + w, y + w), (x + w // 2, y)], fill=colour)
    else:
        draw.rectangle([x + w // 3, y, x + 2 * w // 3, y + w], fill=colour)
        draw.rectangle([x, y + w // 3, x + w, y + 2 * w // 3], fill=colour)
    return img


def make_synthetic(num_classes: int = 4, per_class: int = 12, size: int = 96, seed: int = 0) -> LabelledImages:
    """``num_classes * per_class`` JPEG images in RAM, named ``0000.jpg``.. in a shuffled label order."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    sources = []
    for label in labels:
        buf = io.BytesIO()
        _draw(int(label), num_classes, size, rng).save(buf, format="JPEG", quality=90)
        sources.append(buf.getvalue())
    names = tuple(f"{i:04d}.jpg" for i in range(len(labels)))
    return LabelledImages(names, tuple(sources), labels.astype(np.int64), num_classes)


def write_grader_layout(root: Path, split: str, images: LabelledImages) -> Path:
    """Write ``root/split/gt.csv`` and ``root/split/images/`` (the grader layout); return ``root/split``."""
    image_dir = root / split / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for name, source in zip(images.names, images.sources, strict=True):
        write_bytes(image_dir / name, source if isinstance(source, bytes) else Path(source).read_bytes())
    rows = "".join(f"{n},{int(y)}\n" for n, y in zip(images.names, images.labels, strict=True))
    write_text(root / split / "gt.csv", "filename,class_id\n" + rows)
    return root / split


def load_data(data_dir: Path | None) -> tuple[LabelledImages, LabelledImages | None]:
    """(train, test or None) from a grader-layout folder, or the generated demo set when ``data_dir`` is None.

    Test labels must be training class ids, but a small test split may lack a species or two (one line says so).
    """
    if data_dir is None:
        print("no DATA_DIR given: using a small generated set (4 shapes x 24 images)")
        images = make_synthetic(num_classes=4, per_class=24, seed=0)
        return images.subset(range(0, 64)), images.subset(range(64, 96))
    train = load_split_dir(data_dir, "train")
    extra = unlisted(train, data_dir / "train" / "images")
    if extra:
        print(f"note: {len(extra)} file(s) in {data_dir / 'train' / 'images'} are not in gt.csv and are not used "
              f"(first: {extra[0]})")
    if not (data_dir / "test" / "gt.csv").is_file():
        return train, None
    test = load_split_dir(data_dir, "test", num_classes=train.num_classes)
    species = len(np.unique(test.labels))
    if species < test.num_classes:
        print(f"test split: {len(test)} images of {species} of the {test.num_classes} species")
    return train, test
