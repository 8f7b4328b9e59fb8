"""The speed work's pieces: the prefetching thread, and the benchmarks' arithmetic and parsing (their figures
are printed by ``tools.speed`` and ``tools.backbones``, never asserted here)."""

from __future__ import annotations

import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import birds_lpft.tools.speed as speed
from birds_lpft import extract
from birds_lpft import memory as features
from birds_lpft.extract import prefetched
from birds_lpft.memory import release_freed_memory
from birds_lpft.tools.backbones import for_backbone, markdown
from birds_lpft.tools.flops import forward_macs, matmul_gflops, training_macs
from birds_lpft.tools.speed import (
    Bare,
    CvRun,
    compute_ceiling,
    cv_spec,
    cv_table,
    mean_bare,
    parse_cv,
    parse_run,
    pipeline_rates,
)
from birds_lpft.utils.settings import ConfigError

from finetune.config import PRESETS


def test_prefetched_keeps_order_and_raises_the_threads_error():
    assert list(prefetched(range(50), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("bad image")

    got = []
    with pytest.raises(ValueError, match="bad image"):
        for item in prefetched(broken()):
            got.append(item)
    assert got == [1]


def test_leaving_a_prefetched_loop_early_stops_its_thread():
    before = threading.active_count()
    for item in prefetched(iter(range(10**6)), depth=2):
        if item == 3:
            break
    assert threading.active_count() == before


def test_a_prefetched_loop_hands_its_memory_back_once_its_thread_has_stopped(monkeypatch):
    calls = []
    monkeypatch.setattr(extract, "release_freed_memory", lambda: calls.append(threading.active_count()))
    before = threading.active_count()
    assert list(prefetched(range(5))) == list(range(5))
    for item in prefetched(iter(range(10**6))):
        if item == 3:
            break
    assert calls == [before, before]  # each loop once, after the join (no thread of its own left)


@pytest.mark.parametrize("libc", [lambda name: object(),  # no malloc_trim: not glibc (musl, macOS)
                                  lambda name: (_ for _ in ()).throw(OSError("no dlopen"))])
def test_releasing_memory_without_glibc_is_a_no_op(monkeypatch, libc):
    monkeypatch.setattr(features.ctypes, "CDLL", libc)
    release_freed_memory()


def test_only_the_outermost_reuse_sets_and_restores_the_thresholds(monkeypatch):
    calls = []
    monkeypatch.setattr(features, "_glibc", lambda name, *args: calls.append((name, *args)))
    with features.reusing_freed_memory():
        with features.reusing_freed_memory():
            assert len(calls) == 2
        assert len(calls) == 2  # the inner exit leaves the outer's setting alone
    kept, settled = features.KEPT_FOR_REUSE, features.GLIBC_SETTLED
    assert calls == [("mallopt", features.M_MMAP_THRESHOLD, kept), ("mallopt", features.M_TRIM_THRESHOLD, kept),
                     *(("mallopt", *item) for item in settled.items()), ("malloc_trim", 0)]


@pytest.mark.parametrize("libc", [lambda name: object(), lambda name: (_ for _ in ()).throw(OSError("no dlopen"))])
def test_reusing_memory_without_glibc_is_a_no_op(monkeypatch, libc):
    monkeypatch.setattr(features.ctypes, "CDLL", libc)
    with features.reusing_freed_memory():
        pass
    assert features._reuse_depth == 0


def test_parse_run_reads_the_time_line_of_both_plans():
    new = ("fine-tune: 37290 cached views in 500.0s (74.6 views/s)\n"
           "time: read data 0.1s, test 4.3s, load network 0.1s, trunk cache 200.0s, probe 5.5s, fine-tune 500.0s; "
           "peak RSS 2100 MiB\n")
    old = new.replace("trunk cache 200.0s", "centre view 50.0s, augmented views 250.0s")
    run, before = parse_run(new, 720.0, 2048 * 1024), parse_run(old, 800.0, 1024)
    assert (run.extraction, run.stage_one, run.tail, run.tail_views, run.peak_rss_mib) == (200.0, 5.5, 500.0, 37290,
                                                                                          2048.0)
    assert before.extraction == 300.0
    rates = pipeline_rates(run, images=2486, views=4)
    assert rates["extraction"] == pytest.approx(2486 * 5 / 200) and rates["tail training"] == pytest.approx(74.58)
    with pytest.raises(RuntimeError, match="no time line"):
        parse_run("Traceback ...", 1.0, 0)


CV_OUT = """trunk cache for ['full:crop_scale=(0.2, 1.0)']: 294s
  full:crop_scale=(0.2, 1.0) fold 1/2: 0.8936 (flip TTA off: 0.8996)
  full:crop_scale=(0.2, 1.0) fold 2/2: 0.9095 (flip TTA off: 0.9000)
full:crop_scale=(0.2, 1.0)               0.9016 +- 0.0080  [0.8936 0.9095]  1042s
"""


def test_parse_cv_reads_cache_fold_seconds_and_scores_even_with_spaces_in_the_candidate():
    run = parse_cv(CV_OUT, 1400.0, 2048 * 1024)
    assert run == CvRun(cache=294.0, folds_seconds=1042.0, wall=1400.0, peak_rss_mib=2048.0, folds=(0.8936, 0.9095))
    with pytest.raises(RuntimeError, match="no CV result"):
        parse_cv("trunk cache for ['full']: 3s\nTraceback ...", 1.0, 0)


def test_cv_spec_and_table_put_new_against_old():
    assert cv_spec("full", []) == "full" and cv_spec("full", ["epochs=1", "views=2"]) == "full:epochs=1,views=2"
    old = CvRun(100.0, 400.0, 520.0, 2000.0, (0.5, 0.75))
    new = CvRun(50.0, 250.0, 312.0, 1900.0, (0.5, 0.75))
    text = cv_table({"old": [old], "new": [new]})
    assert "| wall (s) | 520.0 | 312.0 | 60% |" in text and "| fold scores | 0.5000 0.7500 | 0.5000 0.7500 |" in text
    assert "identical between the trees" in text
    moved = cv_table({"old": [old], "new": [replace(new, folds=(0.5, 0.5))]})
    assert "DIFFERENT between the trees" in moved


def test_speed_cv_runs_both_trees_cv_and_finds_their_fold_scores_equal(tmp_path, capsys):
    from birds_lpft.data.synthetic import make_synthetic, write_grader_layout

    data = tmp_path / "data"
    write_grader_layout(data, "train", make_synthetic(num_classes=2, per_class=6, size=48, seed=0))
    tree = Path(speed.__file__).resolve().parents[1]  # this checkout, as the 'old' tree too
    text = speed.main([str(data), "--cv", "2", "--old", str(tree), "--random-init", "--preset", "fast",
                       "image_size=64", "--per-class", "4"])
    out = capsys.readouterr().out
    assert "identical between the trees" in text and out.count("round 1 ") == 2
    assert "--candidates fast:image_size=64 --folds 2: 8 training images" in out


def test_the_serial_bound_adds_each_pieces_time_per_image():
    bare = Bare(decode=100.0, centre=200.0, augment=100.0, trunk=50.0, tail=90.0, views=4)
    per_image = 1 / 100 + 1 / 200 + 4 / 100 + 5 / 50
    assert bare.serial_bound() == pytest.approx(5 / per_image)
    assert bare.serial_bound(decodes_per_view=True) == pytest.approx(5 / (per_image + 4 / 100))


def test_bare_rates_measured_before_and_after_are_averaged_rate_by_rate():
    before = Bare(decode=100.0, centre=200.0, augment=100.0, trunk=50.0, tail=90.0, views=4)
    after = Bare(decode=300.0, centre=100.0, augment=50.0, trunk=70.0, tail=60.0, views=4)
    assert mean_bare(before, after) == Bare(decode=200.0, centre=150.0, augment=75.0, trunk=60.0, tail=75.0, views=4)


def test_backbone_costs_keep_a_split_only_where_it_belongs():
    full = PRESETS["full"]
    assert for_backbone([], "mobilenet_v2").trunk_split == 11
    assert for_backbone([], "resnet18").split is None  # resnet18's own default
    with pytest.raises(ConfigError, match="split"):  # a split given for another model's blocks is checked
        for_backbone(["split=11"], "resnet18")
    row = {"backbone": "resnet18", "split": 4, "extraction": 12.0, "tail": 16.5, "mib_per_1k": 977.0,
           "fits": [5033, 10066, 40265]}
    table = markdown([row], full)
    assert "| resnet18 | 4 | 12.0 | 16.5 | 977 | 5,033 | 10,066 | 40,265 |" in table


def test_macs_count_every_conv_and_linear_per_sample_and_leave_no_hook():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
                              torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))
    x = torch.randn(2, 3, 4, 4)
    # per sample: 8 x 4 x 4 outputs of 3 x 3 x 3, the same of 1 x 3 x 3 (depthwise), 5 of 128
    assert forward_macs(net, x) == [128 * 27, 128 * 9, 5 * 128]
    # the first layer's input (cached activations) gets no gradient
    assert training_macs(net, x) == 3 * (128 * 27 + 128 * 9 + 5 * 128) - 128 * 27
    assert all(not m._forward_hooks for m in net.modules())
    assert matmul_gflops("fp32", n=64, repeats=1) > 0


def test_compute_ceiling_puts_trunk_and_tail_step_against_the_matmul_rate():
    cfg = replace(PRESETS["fast"], image_size=32)
    line = compute_ceiling(cfg, 3, Bare(decode=1.0, centre=1.0, augment=1.0, trunk=10.0, tail=5.0, views=1))
    share = r"[\d.]+ GFLOP/s \(\d+% of (fp32|bf16) matmul\)"
    assert re.fullmatch(rf"compute: trunk \d+ MMAC/img x 10\.0 = {share}; tail step \d+ MMAC/view x 5\.0 = {share}; "
                        r"dense matmul GFLOP/s: .*", line), line
