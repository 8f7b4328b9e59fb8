"""Checks with the real pretrained weights and the real bird set; skipped cleanly where either is absent.

They read only: the weights from the torch hub cache that was set when the tests started, and a few
images of ``../shared/data/birds50-a`` (beside the repository, as on CI).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from birds_lpft.data.sets import labelled_from_gt, read_gt
from birds_lpft.models.net import NetConfig
from birds_lpft.models.weights import pretrained_net
from birds_lpft.recipe import ProbeFit

from probe.pipeline import ProbeConfig, run_probe

REAL_TORCH_HOME = Path(torch.hub.get_dir()).parent  # read at import, before conftest swaps $TORCH_HOME
WEIGHTS = REAL_TORCH_HOME / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
BIRDS = Path(__file__).resolve().parents[2] / "shared" / "data" / "birds50-a"

needs_weights = pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"no pretrained weights at {WEIGHTS}")
needs_birds = pytest.mark.skipif(not (BIRDS / "train" / "gt.csv").is_file(), reason=f"no bird set at {BIRDS}")


@pytest.fixture
def real_cache(monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(REAL_TORCH_HOME))


@needs_weights
def test_real_weights_load_and_classify_imagenet_style(real_cache):
    net = pretrained_net(NetConfig("mobilenet_v2", 10, 14), "required")
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        features = net.forward_head(net.forward_features(x), pre_logits=True)
    # pretrained features are O(1) and non-negative (ReLU6 then average pooling); random init gives ~1e-9
    assert features.shape == (2, 1280) and features.min() >= 0 and features.mean() > 0.01


@needs_weights
@needs_birds
def test_real_probe_separates_six_species(real_cache):
    gt = read_gt(BIRDS / "train" / "gt.csv")
    per_class: dict[int, list[str]] = {}
    for name in sorted(gt):
        if gt[name] < 6 and len(per_class.setdefault(gt[name], [])) < 14:
            per_class[gt[name]].append(name)
    train = {n: k for k, names in per_class.items() for n in names[:10]}
    test = {n: k for k, names in per_class.items() for n in names[10:]}
    images = BIRDS / "train" / "images"
    result = run_probe(labelled_from_gt(train, images), labelled_from_gt(test, images),
                       ProbeConfig(probe=ProbeFit(Cs=(0.01,))), "required")
    # chance is 1/6; a probe on real ImageNet features separates six species from ten photos each
    assert result.test_accuracy is not None and result.test_accuracy >= 0.6, result.test_accuracy
    assert np.isfinite(result.fitted.probe[-1].coef_).all()


@needs_birds
def test_birds50a_images_decode_exactly_as_before():
    """open_rgb's new guards (draft, aspect cut, EXIF read without rewriting) leave every 7th birds50-a image
    bit-identical to the previous decoding (Pillow's exif_transpose, then RGB), at the sizes the presets
    ask for: none of them is large or elongated enough to trigger a guard."""
    from PIL import Image, ImageOps

    from birds_lpft.data.images import _to_rgb, open_rgb

    files = sorted((BIRDS / "train" / "images").iterdir())[::7] + sorted((BIRDS / "test" / "images").iterdir())[::7]
    assert len(files) > 400
    for path in files:
        with Image.open(path) as img:
            img.load()
            before = np.asarray(_to_rgb(ImageOps.exif_transpose(img)))
        for need in (183, 366, 439, 675):  # eval at 160 (fast), 320, 384 px; a training crop at 320 px
            assert np.array_equal(np.asarray(open_rgb(path, min_side=need)), before), (path.name, need)
