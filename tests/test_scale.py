"""Scale-out: a real 2-process DDP fine-tune on the CPU (gloo) with a sharded trunk cache, the RAM guard,
and a process left as it was found. Random-init networks and generated images only."""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
import sys
import warnings
from dataclasses import replace

import lightning as L
import numpy as np
import pytest
import torch
import torch.utils.deterministic

from birds_lpft.classifier import Classifier
from birds_lpft.data.sets import load_split_dir, read_gt
from birds_lpft.data.synthetic import make_synthetic, write_grader_layout
from birds_lpft.recipe import PRESETS

import finetune.cache as finetune_cache
from finetune.__main__ import report_shards
from finetune.cache import CacheBudgetError, check_budget, parse_size
from finetune.train import fine_tune

import solution

SIZE = 64
TINY = replace(PRESETS["fast"], image_size=SIZE, batch_size=8, limit_train_batches=2)


def test_ddp_two_processes_shard_the_cache_and_agree_on_the_probe(tmp_path):
    data = tmp_path / "data"
    write_grader_layout(data, "train", make_synthetic(num_classes=3, per_class=8, size=48, seed=0))
    write_grader_layout(data, "test", make_synthetic(num_classes=3, per_class=2, size=48, seed=1))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "finetune", str(data), "--random-init", "--preset", "fast", "--image-size",
           str(SIZE), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--out", str(out_dir / "m.pt"),
           "--no-progress", "--verbose"]
    proc = subprocess.run(cmd, cwd=out_dir, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    counts = dict(re.findall(r"rank (\d): extracted (\d+) of 24 images \(indices ", proc.stdout))
    assert sorted(counts) == ["0", "1"] and sorted(map(int, counts.values())) == [12, 12]  # 1x the data, halved
    # the indices each rank reports extracting, gathered from the ranks: together every image exactly once
    # (test_shard_report_catches_overlap_and_gaps shows this line is not printed otherwise)
    assert "shards: every image exactly once" in proc.stdout
    # no framework noise that our configuration causes under DDP (Lightning's sync_dist advice, the deprecated
    # all_gather it calls), even with --verbose
    assert "sync_dist" not in proc.stderr and "is deprecated" not in proc.stderr, proc.stderr[-2000:]
    digests = re.search(r"probe head digest per rank: ([0-9a-f]+) ([0-9a-f]+)", proc.stdout)
    assert digests and digests.group(1) == digests.group(2)  # one probe, broadcast: the same head on both ranks
    assert proc.stdout.count("checkpoint written to") == 1 and "test accuracy:" in proc.stdout
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.pt"]  # rank 0 wrote it; nothing else, anywhere here
    clf = Classifier.load(out_dir / "m.pt")
    test = load_split_dir(data, "test")
    assert clf.predict(test.sources, test.names).shape == (len(test),)


def test_shard_report_catches_overlap_and_gaps(capsys):
    report_shards([[0, 2, 4], [1, 3, 5]], 6, verbose=True)
    out = capsys.readouterr().out
    assert "rank 0: extracted 3 of 6 images (indices 0, 2, 4)" in out and "every image exactly once" in out
    for bad in ([[0, 1, 2], [2, 3, 4]], [[0, 1], [3, 4]]):  # an image twice and one never; two never
        report_shards(bad, 5, verbose=False)
        out = capsys.readouterr().out
        assert "OVERLAP OR GAP" in out and "indices" not in out


def test_ram_guard_stops_before_any_extraction(monkeypatch):
    def no_extraction(*args, **kwargs):
        raise AssertionError("extraction started")

    monkeypatch.setattr(finetune_cache, "extract", no_extraction)
    images = make_synthetic(num_classes=3, per_class=4, size=48, seed=0)
    with pytest.raises(CacheBudgetError) as err:
        fine_tune(images, TINY, "none", progress=False, cache_budget=1000, accelerator="cpu", devices=1)
    msg = str(err.value)
    # the figure: 12 images x (centre + 1 view) x 96x4x4 fp16 activations
    assert f"{12 * 2 * 96 * 4 * 4 * 2 / 2**30:.2f} GiB" in msg and "12 images x 2 views at 64 px" in msg
    assert all(way in msg for way in ("--views", "--image-size", "more ranks", "--cache-budget"))


def test_budget_arithmetic_and_sizes():
    check_budget(1000, 1000, images=1, views=1, image_size=8)  # exactly fits
    check_budget(10**12, None, images=1, views=1, image_size=8)  # no budget: no check
    with pytest.raises(CacheBudgetError, match="2 ranks on this machine"):
        check_budget(600, 1000, images=1, views=1, image_size=8, ranks_here=2)
    assert parse_size("6GiB") == 6 * 2**30 and parse_size("512M") == 512 * 2**20 and parse_size("100") == 100
    assert parse_size("1.5 GB") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="6 GiBs"):
        parse_size("6 GiBs")


def _process_state() -> dict:
    return {
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled(),
                          torch.utils.deterministic.fill_uninitialized_memory),
        "environ": dict(os.environ), "filters": list(warnings.filters),
        "rng": (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state().tolist()),
        "log_levels": {n: logging.getLogger(n).level for n in ("lightning.pytorch", "lightning.fabric")},
    }


def test_train_classifier_leaves_the_process_as_it_found_it(tmp_path):
    data = tmp_path / "data"
    write_grader_layout(data, "train", make_synthetic(num_classes=3, per_class=5, size=48, seed=0))
    random.seed(1)
    before = _process_state()
    with pytest.warns(UserWarning, match="not cached"):
        solution.train_classifier(read_gt(data / "train" / "gt.csv"), str(data / "train" / "images"))
    after = _process_state()
    assert "PL_GLOBAL_SEED" not in after["environ"]
    for key in before:
        assert after[key] == before[key], key


class MemberStates(L.Callback):
    """Every member's weights at the start and at the end of each fit."""

    def __init__(self):
        self.fits: list[dict] = []

    def _states(self, net) -> list[dict[str, torch.Tensor]]:
        return [{k: v.detach().clone() for k, v in net.member(i).state_dict().items()} for i in range(net.members)]

    def on_train_start(self, trainer, pl_module):
        self.fits.append({"member": pl_module.member_index, "start": self._states(pl_module.net)})

    def on_train_end(self, trainer, pl_module):
        self.fits[-1]["end"] = self._states(pl_module.net)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_members_are_trained_one_by_one_from_the_same_probe():
    images = make_synthetic(num_classes=3, per_class=6, size=48, seed=3)
    spy = MemberStates()
    result = fine_tune(images, replace(TINY, members=2), "none", progress=False, callbacks=[spy],
                       accelerator="cpu", devices=1)
    net = result.classifier.net
    assert net.members == 2 and len(result.history) == 2 and [f["member"] for f in spy.fits] == [0, 1]
    first, second = spy.fits
    assert _same(first["start"][0], first["start"][1])  # both start as the pretrained tail + the probe head
    assert not _same(first["end"][0], first["start"][0]) and _same(first["end"][1], first["start"][1])
    assert not _same(second["end"][1], second["start"][1]) and _same(second["end"][0], second["start"][0])
    assert result.trained_samples == 2 * 2 * TINY.batch_size
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():  # the ensemble's logits are the mean of its members'
        a = net.forward_trunk(x)
        expected = (net.member(0)(a) + net.member(1)(a)) / 2
        torch.testing.assert_close(net(x), expected)
