"""Any backbone by name: torchvision's families and timm's models are split by their own structure, train
through both stages, save, load and classify with no download. Random initialisation and tiny generated
images only (the speed and memory of random-init networks are real; their accuracy means nothing)."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from birds_lpft.classifier import Classifier
from birds_lpft.data.synthetic import make_synthetic, write_grader_layout
from birds_lpft.models.net import BirdNet
from birds_lpft.models.weights import WeightsError, load_pretrained, sha256_of
from birds_lpft.models.zoo import get_spec
from birds_lpft.recipe import PRESETS, recipe

import probe.compare as compare

from finetune.train import fine_tune

import solution

from conftest import calibrate_batchnorm

try:
    import timm  # noqa: F401 - an optional extra: its models are tested where it is installed
except ModuleNotFoundError:
    timm = None
needs_timm = pytest.mark.skipif(timm is None, reason="timm is not installed (the project's [timm] extra)")

TORCHVISION = ["mobilenet_v3_large", "efficientnet_b0", "resnet18", "convnext_tiny", "regnet_y_400mf"]
TIMM = [pytest.param(name, marks=needs_timm) for name in ("timm/resnet18", "timm/mobilenetv3_small_100")]
SIZE = 64


def _reference_features(name: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unsplit model's own unpooled features: timm's forward_features, torchvision's graph up to pooling."""
    if name.startswith("timm/"):
        return model.forward_features(x)
    from torchvision.models.feature_extraction import create_feature_extractor

    node = {"resnet18": "layer4", "regnet_y_400mf": "trunk_output"}.get(name, "features")
    return create_feature_extractor(model, {node: "out"})(x)["out"]


@pytest.mark.parametrize("name", TORCHVISION + TIMM)
def test_trunk_and_tail_reproduce_the_unsplit_models_features(name):
    spec = get_spec(name)
    torch.manual_seed(0)
    model = spec.build()
    x = torch.randn(2, 3, SIZE, SIZE)
    calibrate_batchnorm(model, x)  # O(1) activations, so the comparison means something
    with torch.no_grad():
        want = _reference_features(name, model, x)
    assert want.shape[1] == spec.width and SIZE // want.shape[-1] == spec.min_image_size
    for split in sorted({0, spec.default_split, spec.num_blocks}):
        net = BirdNet(spec.blocks(model), spec.width, 3, split).eval()  # the very modules of ``model``
        with torch.no_grad():
            got = net.forward_features(x)
        # channels-last kernels round differently: equal to 1e-4 of the features' own scale
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert 0 < spec.default_split < spec.num_blocks  # the tail is the last stage or two, never everything


def test_an_unsplittable_or_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="MobileNet, EfficientNet, ConvNeXt"):
        get_spec("vgg11")
    with pytest.raises(ValueError, match="not a torchvision classification model"):
        get_spec("nope")


def test_mobilenet_v2_is_derived_as_before():
    spec = get_spec("mobilenet_v2")
    assert (spec.width, spec.default_split, spec.min_image_size, spec.num_blocks) == (1280, 14, 32, 19)
    assert spec.weights_file == "mobilenet_v2-b0353104.pth" and spec.sha256.startswith(spec.sha256_prefix)
    assert spec.data == {"image_size": 224, "resize_size": 256, "mean": (0.485, 0.456, 0.406),
                         "std": (0.229, 0.224, 0.225), "interpolation": "bilinear"}


def test_a_preset_with_another_backbone_takes_that_backbones_default_split():
    cfg = recipe("full", ["backbone=resnet18"])
    assert cfg.split is None and cfg.trunk_split == get_spec("resnet18").default_split
    assert recipe("full", ["backbone=resnet18", "split=3"]).trunk_split == 3
    assert recipe("full:backbone=resnet18") == cfg  # the same text as a CV candidate
    assert PRESETS["full"].on_backbone("mobilenet_v2") == PRESETS["full"]  # its own backbone: its own split


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt, and torch hub's and timm's downloads, fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.mark.parametrize("name", TORCHVISION + TIMM)
def test_probe_finetune_save_load_classify(name, tmp_path, no_network):
    images = make_synthetic(num_classes=3, per_class=4, size=48, seed=0)
    cfg = replace(PRESETS["fast"], backbone=name, split=None, image_size=SIZE, batch_size=8, limit_train_batches=2)
    result = fine_tune(images, cfg, "none", progress=False, accelerator="cpu", devices=1)
    path = tmp_path / "m.pt"
    result.classifier.save(path)
    loaded = Classifier.load(path)  # rebuilt from its name with random weights, then the state dict
    assert loaded.net_cfg.backbone == name and loaded.data_cfg == result.classifier.data_cfg
    test_dir = write_grader_layout(tmp_path / "data", "test", make_synthetic(3, 2, size=48, seed=1)) / "images"
    labels = solution.classify(str(path), str(test_dir))
    assert sorted(labels) == sorted(p.name for p in test_dir.iterdir()) and all(type(v) is int for v in labels.values())
    files = sorted(test_dir.iterdir())
    torch.testing.assert_close(loaded.predict_logits(files, [f.name for f in files]).logits,
                               result.classifier.predict_logits(files, [f.name for f in files]).logits)


def test_weights_are_checked_against_the_hash_prefix_in_their_name(tmp_path):
    spec = get_spec("resnet18")
    good = tmp_path / "ok.pth"
    torch.save(spec.build().state_dict(), good)
    named = tmp_path / f"resnet18-{sha256_of(good)[:8]}.pth"
    good.rename(named)
    assert set(load_pretrained(get_spec("resnet18"), weights_file=named)) == set(spec.build().state_dict())
    wrong = tmp_path / "resnet18-00000000.pth"
    wrong.write_bytes(named.read_bytes())
    with pytest.raises(WeightsError, match="does not start with 00000000"):
        load_pretrained(get_spec("resnet18"), weights_file=wrong)


def test_missing_weights_say_which_file_and_where(tmp_path):
    with pytest.raises(WeightsError) as err:
        load_pretrained(get_spec("efficientnet_b0"))
    message = str(err.value)
    assert "efficientnet_b0_rwightman-7f5810bc.pth" in message and "7f5810bc" in message
    assert "--weights" in message and str(Path(torch.hub.get_dir()) / "checkpoints") in message


def test_the_comparison_lists_absent_weights_instead_of_skipping_them(tmp_path):
    images = make_synthetic(num_classes=3, per_class=4, size=48, seed=0)
    rows = compare.compare(images, None, ["resnet18", "vgg11"], compare.ProbeConfig(image_size=SIZE))
    assert rows[0]["weights"].startswith("missing:") and "resnet18-f37072fd.pth" in rows[0]["weights"]
    assert rows[0]["width"] == 512 and rows[0]["cache_mib_per_1k_view"] > 0
    assert "structure" in rows[1]["error"]
    measured = compare.compare(images, images, ["regnet_y_400mf"], compare.ProbeConfig(image_size=SIZE),
                               random_init=True)
    assert measured[0]["extract_images_per_s"] > 0 and 0 <= measured[0]["probe_test"] <= 1
    assert "| regnet_y_400mf |" in compare.markdown(measured)


def test_the_grader_interface_trains_the_shipped_recipes_backbone(tmp_path, monkeypatch):
    shipped = replace(PRESETS["full"], backbone="resnet18", split=None).to_dict()
    monkeypatch.setattr(solution, "SHIPPED_RECIPE", shipped)  # what the build writes into the grader file
    images = make_synthetic(num_classes=3, per_class=4, size=48, seed=0)
    train_dir = write_grader_layout(tmp_path / "data", "train", images)
    gt = dict(zip(images.names, images.labels.tolist(), strict=True))
    with pytest.warns(UserWarning, match="random init"):  # no resnet18 weights here: the smoke run says so
        model = solution.train_classifier(gt, str(train_dir / "images"), fast_train=True)
    assert model.net_cfg.backbone == "resnet18" and model.recipe.image_size == PRESETS["fast"].image_size
    path = tmp_path / "m.pt"
    model.save(path)
    assert Classifier.load(path).recipe == model.recipe  # the checkpoint knows how it was trained
