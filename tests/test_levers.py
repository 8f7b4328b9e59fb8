"""The accuracy levers and the cross-validation that chooses among them: folds, one trunk cache per trunk
setting, bf16 against fp32 tails, GeM. Random-init networks and generated images only."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from birds_lpft.data.synthetic import make_synthetic, write_grader_layout
from birds_lpft.models.net import GeM, NetConfig, _GeMPool, build_net
from birds_lpft.recipe import PRESETS

import finetune.cache as finetune_cache
import finetune.cv as cv
import finetune.cv_cache as cv_cache
import finetune.cv_report as cv_report
import finetune.stage_one as finetune_stage_one
from finetune.datamodule import TrunkCacheData

from conftest import calibrate_batchnorm

SIZE = 32


# --------------------------------------------------------------------------- cross-validation


def test_folds_are_stratified_disjoint_covering_and_seeded():
    labels = np.repeat(np.arange(4), [10, 11, 12, 13])
    folds = cv.repeated_folds(labels, 5, [3])
    held = [va for _, va in folds]
    assert len(folds) == 5 and sorted(np.concatenate(held).tolist()) == list(range(len(labels)))
    for tr, va in folds:
        assert not set(tr) & set(va) and len(tr) + len(va) == len(labels)
        for k, n in zip(range(4), (10, 11, 12, 13), strict=True):  # every class in every fold, in proportion
            assert abs(np.sum(labels[va] == k) - n / 5) <= 1
    again = cv.repeated_folds(labels, 5, [3])
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again, strict=True))
    other = cv.repeated_folds(labels, 5, [4])
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds, other, strict=True))


def test_repeated_folds_are_each_seeds_folds_in_turn():
    labels = np.repeat(np.arange(3), [8, 9, 10])
    folds = cv.repeated_folds(labels, 4, [5, 2])
    assert len(folds) == 8
    for got, want in zip(folds, cv.repeated_folds(labels, 4, [5]) + cv.repeated_folds(labels, 4, [2]), strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    for part in (folds[:4], folds[4:]):  # each seed's held-out parts cover every image once
        assert sorted(np.concatenate([va for _, va in part]).tolist()) == list(range(len(labels)))


def _row(name: str, folds: list[float]) -> dict:
    return {"candidate": name, **cv_report.mean_se(folds), "seconds": 1.0, "cache_seconds": 2.0}


def test_rows_are_paired_with_the_first_fold_by_fold_and_averaged_per_seed():
    rows = cv_report.compare_rows([_row("a", [0.8, 0.9, 0.7, 0.6]), _row("b", [0.85, 0.9, 0.7, 0.7])], [3, 7])
    assert rows[0]["seed_means"] == pytest.approx({"3": 0.85, "7": 0.65}) and "vs_first" not in rows[0]
    d = rows[1]["vs_first"]
    assert d["candidate"] == "a" and d["folds"] == pytest.approx([0.05, 0.0, 0.0, 0.1])
    assert d["mean"] == pytest.approx(0.0375) and d["se"] == pytest.approx(np.std([0.05, 0, 0, 0.1], ddof=1) / 2)
    assert d["seed_means"] == pytest.approx([0.025, 0.05])
    text = cv_report.format_row(rows[1])
    assert "vs a: +3.75 +- 2.39 points (paired over 4 folds) per seed +2.50 +5.00" in text
    assert "per seed 3: 0.8750  7: 0.7000" in text
    table = cv_report.markdown(rows, 2, [3, 7])
    assert "seeds 3, 7: 4 folds" in table and "| `b` | 0.7875 | " in table and "| +3.75 +- 2.39 |" in table
    one_seed = cv_report.compare_rows([_row("a", [0.8, 0.9]), _row("b", [0.9, 0.9])], [0])
    assert "seed_means" not in one_seed[1] and "per seed" not in cv_report.format_row(one_seed[1])
    merged = {**_row("c", [0.9, 0.8, 0.7, 0.6]), "seconds": float("nan")}  # folds of several runs: no one time
    assert "| 0.6000 | - | 2 |" in cv_report.markdown(cv_report.compare_rows([rows[0], merged], [3, 7]), 2, [3, 7])


def test_cache_is_built_once_per_trunk_setting(tmp_path, monkeypatch, capsys):
    write_grader_layout(tmp_path, "train", make_synthetic(num_classes=3, per_class=6, size=40, seed=0))
    calls = []
    real = finetune_cache.extract_views

    def counted(net, images, views, cfg, *args, **kwargs):
        calls.append((cfg.image_size, tuple(v.name for v in views), len(images)))
        return real(net, images, views, cfg, *args, **kwargs)

    monkeypatch.setattr(cv_cache, "extract_views", counted)
    base = f"fast:image_size={SIZE},limit_train_batches=1,batch_size=8"
    rows = cv.main([str(tmp_path), "--random-init", "--folds", "2", "--out", str(tmp_path / "cv.json"),
                    "--candidates", f"{base},views=2", f"{base},views=1,cotuning=0.5", f"{base},members=2",
                    "fast:image_size=48,limit_train_batches=1,batch_size=8"])
    # one pass for the three 32 px candidates (centre, mirror, 2 views), one for the 48 px one (1 view)
    assert sorted(calls) == sorted([(SIZE, ("centre view", "mirrored centre", "view 1/2", "view 2/2"), 18),
                                    (48, ("centre view", "mirrored centre", "view 1/1"), 18)])
    assert [len(r["folds"]) for r in rows] == [2, 2, 2, 2]
    for r in rows:
        assert all(0.0 <= a <= 1.0 for a in r["folds"]) and r["mean"] == pytest.approx(np.mean(r["folds"]))
        assert r["se"] == pytest.approx(np.std(r["folds"], ddof=1) / np.sqrt(2))
    assert json.loads((tmp_path / "cv.json").read_text())[2]["config"]["members"] == 2
    # an ensemble's folds also score its first member alone; one-member candidates have no such entry
    assert len(rows[2]["readouts"]["member 1 alone"]["folds"]) == 2 and "readouts" not in rows[0]
    assert "+-" in capsys.readouterr().out


def test_repeated_cv_scores_every_seeds_folds_on_one_cache(tmp_path, monkeypatch, capsys):
    write_grader_layout(tmp_path, "train", make_synthetic(num_classes=3, per_class=6, size=40, seed=0))
    calls = []
    real = finetune_cache.extract_views
    monkeypatch.setattr(cv_cache, "extract_views", lambda *a, **k: calls.append(1) or real(*a, **k))
    base = f"fast:image_size={SIZE},limit_train_batches=1,batch_size=8"
    argv = [str(tmp_path), "--random-init", "--folds", "2", "--candidates", base, f"{base},lr_tail=1e-2"]
    once = cv.main(argv)
    twice = cv.main([*argv, "--seed", "0", "4", "--out", str(tmp_path / "cv.md")])
    assert len(calls) == 2  # one cache per run, whatever the number of seeds
    for a, b in zip(once, twice, strict=True):  # seed 0's folds come first and score as in a one-seed run
        assert len(b["folds"]) == 4 and b["folds"][:2] == a["folds"] and set(b["seed_means"]) == {"0", "4"}
    assert twice[1]["vs_first"]["folds"] == pytest.approx(np.subtract(twice[1]["folds"], twice[0]["folds"]))
    assert "paired over 4 folds" in capsys.readouterr().out and "seeds 0, 4" in (tmp_path / "cv.md").read_text()


def test_folds_share_one_computation_of_stage_ones_features_and_fit_the_same_probes(tmp_path, monkeypatch):
    """The CV pools every centre view once per candidate; each fold's probe sees exactly the features it would
    have computed itself, so the fold scores are the same as with a fold-by-fold stage one."""
    write_grader_layout(tmp_path, "train", make_synthetic(num_classes=3, per_class=6, size=40, seed=0))
    argv = [str(tmp_path), "--random-init", "--folds", "3", "--candidates",
            f"fast:image_size={SIZE},limit_train_batches=1,batch_size=8,pooling=gem"]
    pooled_calls, seen = [], []
    real_pooled, real_fit = finetune_stage_one.pooled_from_trunk, finetune_stage_one.fit_probe

    def counted(net, acts, *args):
        pooled_calls.append(len(acts))
        return real_pooled(net, acts, *args)

    def recorded(X, y, *args):
        seen.append((X, y))
        return real_fit(X, y, *args)

    monkeypatch.setattr(finetune_stage_one, "pooled_from_trunk", counted)
    monkeypatch.setattr(cv, "pooled_from_trunk", counted)
    monkeypatch.setattr(finetune_stage_one, "fit_probe", recorded)
    shared = cv.main(argv)
    assert pooled_calls == [18]  # every image once, whatever the number of folds
    by_fold = list(seen)
    pooled_calls.clear()
    seen.clear()
    monkeypatch.setattr(cv, "centre_features", lambda cache, cfg: None)  # each fold pools its own images
    own = cv.main(argv)
    assert pooled_calls == [12, 12, 12]
    assert shared[0]["folds"] == own[0]["folds"]
    for (X, y), (X_own, y_own) in zip(by_fold, seen, strict=True):
        assert np.array_equal(X, X_own) and np.array_equal(y, y_own)


def test_precomputed_features_must_cover_the_cache():
    centre, labels = torch.zeros(4, 2, 3, 3), np.arange(4)
    with pytest.raises(ValueError, match="pooled features for 3 images, but the cache holds 4"):
        TrunkCacheData.from_stacks(labels, centre, [], np.arange(2), PRESETS["fast"], pooled=torch.zeros(3, 5))
    data = TrunkCacheData.from_stacks(labels, centre, [], np.array([1, 3]), PRESETS["fast"],
                                      pooled=torch.arange(20.).reshape(4, 5))
    assert torch.equal(data.fit_pooled, torch.arange(20.).reshape(4, 5)[[1, 3]])
    assert data.fit_centre is None  # the features stand in for the fit images' activations: no copy of them


def test_tta_logits_average_the_chosen_views_and_members():
    logits = torch.randn(2, 2, 5, 3, generator=torch.Generator().manual_seed(0))  # (flip, top, N, K)
    want = (logits[0][0] + logits[0][1] + logits[1][0] + logits[1][1]) / 4
    torch.testing.assert_close(cv_cache.tta_logits(logits, flip=True), want)
    assert torch.equal(cv_cache.tta_logits(logits, flip=False, member=1), logits[0][1])


def test_candidates_parse_with_types_checked():
    cfg = cv.recipe("full:crop_scale=(0.2, 1.0),pooling=avg,cotuning=0.5,members=2")
    assert cfg == replace(PRESETS["full"], crop_scale=(0.2, 1.0), pooling="avg", cotuning=0.5, members=2)
    for bad in ("full:epochs=2.5", "full:nope=1", "full:pooling=3", "full:mix=cutmix", "nothere"):
        with pytest.raises(ValueError):
            cv.recipe(bad)


# --------------------------------------------------------------------------- bf16 tail


def test_bf16_and_fp32_tails_agree_on_a_fixed_batch():
    """bf16 keeps 8 mantissa bits (relative rounding 2^-9 per operation); through the tail's ~15 layers that
    compounds to a few tenths of a percent of the logits' scale. 3% relative error and 0.99 gradient cosine
    leave room for that and still catch a wrong cast (fp16 overflow, a dropped normalisation), which is off
    by orders of magnitude."""
    torch.manual_seed(0)
    net = calibrate_batchnorm(build_net(NetConfig("mobilenet_v2", 5, 14)), torch.randn(16, 3, 64, 64)).eval()
    member = net.top()
    acts = net.forward_trunk(torch.randn(16, 3, 64, 64)).detach()
    y = torch.arange(16) % 5
    results = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            logits = member(acts)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        results[name] = (logits.float().detach(), member.head.weight.grad.clone(), loss.item())
    (a, ga, la), (b, gb, lb) = results["fp32"], results["bf16"]
    assert b.dtype == torch.float32 and (a - b).norm() / a.norm() < 0.03
    assert F.cosine_similarity(ga.flatten(), gb.flatten(), dim=0) > 0.99 and abs(la - lb) / la < 0.03


def test_presets_train_in_bf16_where_native_and_v1_stays_fp32():
    assert PRESETS["v1"].train_precision == "fp32" and PRESETS["full"].train_precision == "auto"


# --------------------------------------------------------------------------- GeM


def test_gem_pooling_spans_average_to_max():
    x = torch.rand(2, 3, 5, 5) * 6
    gem = GeM(p=1.0)
    torch.testing.assert_close(gem(x), x.mean(dim=(2, 3)))
    with torch.no_grad():
        gem.p.fill_(60.0)  # 6^60 would overflow fp32 unscaled
    top = x.amax(dim=(2, 3))
    # the mean of 25 values of (x / max)^60 is at least 1/25 (the max itself) and at most 1
    assert torch.isfinite(gem(x)).all() and (gem(x) <= top + 1e-5).all() and (gem(x) >= top * 25 ** (-1 / 60)).all()
    assert gem(x).shape == (2, 3) and gem.p.requires_grad
    net = build_net(NetConfig("mobilenet_v2", 3, 14, pooling="gem"))
    assert isinstance(net.pool, GeM) and net(torch.randn(1, 3, 64, 64)).shape == (1, 3)
    assert replace(PRESETS["full"], pooling="gem").pooling == "gem"


def _gem_formula(x: torch.Tensor, p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GeM as autograd differentiates it from its formula (the module's code before its backward was written)."""
    x = x.float().clamp(min=eps)
    top = x.amax(dim=(2, 3), keepdim=True)
    return (x / top).pow(p).mean(dim=(2, 3)).pow(1.0 / p) * top.flatten(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gem_is_its_formula_forward_bit_for_bit_and_backward_to_rounding(dtype):
    torch.manual_seed(0)
    x = (torch.randn(4, 16, 5, 5) * 2).relu_().to(dtype).requires_grad_()  # a third or so clamped at eps
    gem = GeM(p=2.7)
    y, y0 = gem(x), _gem_formula(x, gem.p)
    assert y.dtype == torch.float32 and torch.equal(y, y0)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, gem.p), g)
    expected = torch.autograd.grad(y0, (x, gem.p), g)
    assert grads[0].dtype == dtype and (grads[0][x == 0] == 0).all()
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-4, atol=1e-6)


def test_gem_gradient_is_the_numerical_one():
    x = (torch.rand(2, 3, 4, 4, dtype=torch.float64) + 0.1).requires_grad_()  # above eps: no clamp kink
    p = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, p: _GeMPool.apply(x, p, 1e-6), (x, p))
