"""The linear probe, its folding into an nn.Linear head (LP-FT), and stage one end to end on tiny data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from birds_lpft.data.images import ImageDataset
from birds_lpft.data.sets import load_split_dir
from birds_lpft.data.synthetic import make_synthetic, write_grader_layout
from birds_lpft.models.net import NetConfig, build_net
from birds_lpft.models.preprocess import EvalTransform, data_config
from birds_lpft.models.weights import pretrained_net
from birds_lpft.models.zoo import get_spec
from birds_lpft.recipe import ProbeFit

import probe.__main__ as probe_cli
from probe.linear import init_head_from_probe, linear_probe, path_scores, select_C
from probe.pipeline import ProbeConfig, pooled_features, run_probe

from conftest import calibrate_batchnorm

SMALL = ProbeConfig(image_size=64, probe=ProbeFit(Cs=(0.01, 0.1)), extract_batch_size=16, precision="fp32")


def _features(n: int, f: int, k: int, seed: int, spread: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Class-dependent random features with a non-zero mean and very different scales per feature."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centres = rng.normal(0, 1, (k, f))
    mean = rng.uniform(-spread, spread, f)
    scale = np.exp(rng.uniform(-np.log(spread), np.log(spread), f))
    y = rng.permutation(y)
    X = (centres[y] + rng.normal(0, 1.5, (n, f))) * scale + mean
    return X, y


def _probe_and_head(X, y, k, dtype):
    probe = linear_probe(0.5).fit(X, y)
    head = nn.Linear(X.shape[1], k, dtype=dtype)
    assert init_head_from_probe(head, probe) is head
    with torch.no_grad():
        logits = head(torch.as_tensor(X, dtype=dtype)).double().numpy()
    return probe, logits


# --------------------------------------------------------------------------- head initialisation


@pytest.mark.parametrize("k", [3, 5])
def test_head_equals_decision_function_float64(k):
    X, y = _features(120, 32, k, seed=k, spread=20.0)
    probe, logits = _probe_and_head(X, y, k, torch.float64)
    d = probe.decision_function(X)
    assert d.shape == (120, k) and np.abs(d).max() > 1.0  # a real, non-trivial probe
    np.testing.assert_allclose(logits, d, rtol=0, atol=1e-8)
    assert (logits.argmax(1) == probe.predict(X)).all()


@pytest.mark.parametrize("k", [3, 5])
def test_head_equals_decision_function_float32(k):
    X, y = _features(120, 32, k, seed=10 + k, spread=3.0)
    probe, logits = _probe_and_head(X.astype(np.float32), y, k, torch.float32)
    d = probe.decision_function(X.astype(np.float32))
    assert np.abs(d).max() > 1.0
    np.testing.assert_allclose(logits, d, rtol=0, atol=1e-4)
    # the head's softmax is the probe's probability, not just its ranking
    proba = probe.predict_proba(X.astype(np.float32))
    np.testing.assert_allclose(torch.softmax(torch.as_tensor(logits), 1).numpy(), proba, atol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_head_binary(dtype, atol):
    X, y = _features(120, 32, 2, seed=7, spread=3.0)
    probe, logits = _probe_and_head(X, y, 2, dtype)
    d = probe.decision_function(X)
    assert d.shape == (120,) and np.abs(d).max() > 1.0
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], d, rtol=0, atol=atol)
    proba = probe.predict_proba(X)
    np.testing.assert_allclose(torch.softmax(torch.as_tensor(logits), 1).numpy(), proba, atol=1e-6)
    assert (logits.argmax(1) == probe.predict(X)).all()


def test_head_handles_constant_features():
    X, y = _features(60, 8, 3, seed=1)
    X[:, 2] = 4.0  # zero variance: StandardScaler keeps scale 1
    probe, logits = _probe_and_head(X, y, 3, torch.float64)
    np.testing.assert_allclose(logits, probe.decision_function(X), atol=1e-8)


@pytest.mark.parametrize(
    "labels, k",
    [
        (lambda y: y + 1, 3),  # classes 1..3
        (lambda y: np.where(y == 2, 3, y), 3),  # classes 0, 1, 3: a gap
        (lambda y: y, 4),  # the probe saw classes 0..2 but the head has 4 rows
    ],
)
def test_head_refuses_classes_not_0_to_k_minus_1(labels, k):
    X, y = _features(60, 8, 3, seed=2)
    probe = linear_probe(0.5).fit(X, labels(y))
    head = nn.Linear(8, k)
    before = head.weight.detach().clone()
    with pytest.raises(ValueError, match="0.."):
        init_head_from_probe(head, probe)
    assert torch.equal(head.weight, before)


def test_head_refuses_wrong_width():
    X, y = _features(60, 8, 3, seed=3)
    with pytest.raises(ValueError, match="do not fit head"):
        init_head_from_probe(nn.Linear(9, 3), linear_probe(0.5).fit(X, y))


@pytest.mark.parametrize("k", [2, 4])
def test_birdnet_head_from_probe_end_to_end(k):
    images = make_synthetic(num_classes=k, per_class=8, size=48, seed=k)
    net = pretrained_net(NetConfig("mobilenet_v2", k, 14), "none")
    transform = EvalTransform(data_config(get_spec("mobilenet_v2"), SMALL.image_size))
    dataset = ImageDataset(images.sources, images.names, transform)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert x.shape == (len(images), 3, 64, 64)
    calibrate_batchnorm(net, x)

    feats = pooled_features(net, images, SMALL, "test features").numpy()
    assert feats.shape == (len(images), net.head.in_features) and feats.std() > 1e-3

    probe = linear_probe(1.0).fit(feats, images.labels)
    init_head_from_probe(net.head, probe)
    with torch.no_grad():
        logits = net(x).numpy()
    d = probe.decision_function(feats)
    assert np.abs(d).max() > 0.5  # a real, non-trivial probe
    if k == 2:  # a binary probe has one decision value: the difference of the two logits
        logits_diff = logits[:, 1] - logits[:, 0]
        np.testing.assert_allclose(logits_diff, d, rtol=0, atol=1e-4)
    else:
        np.testing.assert_allclose(logits, d, rtol=0, atol=1e-4)
    assert (logits.argmax(1) == probe.predict(feats)).all()


# --------------------------------------------------------------------------- choosing C


def test_select_C_returns_grid_value_and_scores():
    X, y = _features(150, 16, 3, seed=4)
    grid = [0.001, 0.01, 0.1, 1]
    C, scores = select_C(X[:100], y[:100], X[100:], y[100:], grid)
    assert C in grid and isinstance(C, float)
    assert sorted(scores) == [float(c) for c in grid]
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    assert max(scores.values()) > 0.5  # the features are informative
    best = max(scores.values())
    se = np.sqrt(best * (1 - best) / 50)
    assert min(c for c, s in scores.items() if s >= best - se) == C  # the one-standard-error rule
    assert scores[C] == linear_probe(C).fit(X[:100], y[:100]).score(X[100:], y[100:])


@pytest.mark.parametrize("seed", range(4))
def test_the_warm_started_C_path_scores_every_C_as_a_cold_fit_does(seed):
    X, y = _features(400, 10, 8, seed=seed)  # overlapping classes: accuracy varies with C
    grid = (0.002, 0.005, 0.01, 0.02, 0.05, 0.5)
    cold = {C: linear_probe(C).fit(X[:300], y[:300]).score(X[300:], y[300:]) for C in grid}
    assert len(set(cold.values())) > 1
    assert path_scores(X[:300], y[:300], X[300:], y[300:], grid) == cold


def test_select_C_prefers_strong_regularisation_on_ties():
    rng = np.random.default_rng(5)
    y = rng.permutation(np.arange(90) % 2)
    X = np.c_[y * 100.0 + rng.normal(0, 1, 90), rng.normal(0, 1, 90)]  # one perfect feature: every C scores 1.0
    C, scores = select_C(X[:60], y[:60], X[60:], y[60:], [1.0, 0.1, 10.0])
    assert set(scores.values()) == {1.0} and C == 0.1


# --------------------------------------------------------------------------- stage one end to end


def test_run_probe_on_grader_layout(tmp_path):
    k = 3
    write_grader_layout(tmp_path, "train", make_synthetic(num_classes=k, per_class=8, size=48, seed=0))
    write_grader_layout(tmp_path, "test", make_synthetic(num_classes=k, per_class=3, size=48, seed=1))
    train, test = load_split_dir(tmp_path, "train"), load_split_dir(tmp_path, "test")
    assert (len(train), len(test), train.num_classes) == (24, 9, k)

    result = run_probe(train, test, SMALL, weights="none")
    fitted = result.fitted
    assert fitted.C in SMALL.probe.Cs
    assert sorted(fitted.val_scores) == sorted(SMALL.probe.Cs)
    assert fitted.val_accuracy == fitted.val_scores[fitted.C]
    assert 0.0 <= fitted.val_accuracy <= 1.0 and 0.0 <= result.test_accuracy <= 1.0
    assert np.array_equal(fitted.probe.classes_, np.arange(k))
    assert fitted.probe[-1].C == fitted.C
    assert {"load network", "train features", "choose C and fit", "test features"} <= set(result.stopwatch.seconds)


def test_run_probe_without_test_set():
    result = run_probe(make_synthetic(num_classes=3, per_class=6, size=48, seed=2), None, SMALL, weights="none")
    assert result.test_accuracy is None and result.fitted.C in SMALL.probe.Cs


def test_pooled_features_same_from_disk_and_ram(tmp_path):
    images = make_synthetic(num_classes=2, per_class=5, size=48, seed=6)
    write_grader_layout(tmp_path, "train", images)
    net = build_net(NetConfig("mobilenet_v2", 2, 14)).eval()
    ram = pooled_features(net, images, SMALL, "ram")
    disk = pooled_features(net, load_split_dir(tmp_path, "train"), SMALL, "disk")
    assert ram.shape == (10, 1280)
    assert torch.equal(ram, disk)


def test_pretrained_net_weight_modes():
    cfg = NetConfig("mobilenet_v2", 3, 14)
    with pytest.raises(ValueError, match="weights must be"):
        pretrained_net(cfg, "maybe")
    with pytest.warns(UserWarning, match="not cached"):
        net = pretrained_net(cfg, "if-cached")  # the per-test $TORCH_HOME is empty
    assert not net.training and net.head.out_features == 3


# --------------------------------------------------------------------------- probing writes nothing


def test_run_probe_writes_nothing(watched):
    before = watched()
    result = run_probe(make_synthetic(num_classes=3, per_class=8, size=48, seed=0), None, SMALL, weights="none")
    assert result.fitted.C in SMALL.probe.Cs
    assert watched() == before


def test_cli_random_init_writes_nothing(watched, capsys):
    """``python -m probe --random-init``: the generated set (96 images) at the weights' own 224 px."""
    before = watched()
    probe_cli.main(["--random-init"])
    out = capsys.readouterr().out
    assert "validation accuracy:" in out and "test accuracy:" in out
    accuracy = float(out.split("validation accuracy:")[1].split()[0])
    assert 0.0 <= accuracy <= 1.0
    assert watched() == before


def test_cli_no_progress_draws_no_bars(capsys):
    probe_cli.main(["--random-init", "--no-progress"])
    captured = capsys.readouterr()
    assert "validation accuracy:" in captured.out
    assert "img/s" not in captured.err + captured.out and "\r" not in captured.err


def test_cli_reports_missing_weights_without_traceback(watched):
    before = watched()
    with pytest.raises(SystemExit) as exc:
        probe_cli.main(["--image-size", "64"])  # pretrained weights required, none cached
    assert "python -m probe.weights" in str(exc.value.code)
    assert watched() == before


def test_cli_reports_bad_data_dir(tmp_path):
    with pytest.raises(SystemExit) as exc:
        probe_cli.main([str(tmp_path), "--random-init"])
    assert str(exc.value.code).startswith("error: ") and "gt.csv" in str(exc.value.code)
