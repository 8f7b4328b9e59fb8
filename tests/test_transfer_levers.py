"""The levers that keep what the pretrained network knows (Co-Tuning, distillation): each is off by default and
changes nothing then; each does what it says on a small case; each trained model round-trips through save -> load
-> classify and through the built grader file, whose fast_train=False trains it again bit for bit. Random-init
networks and generated images only."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from birds_lpft.classifier import Classifier
from birds_lpft.data.synthetic import make_synthetic, write_grader_layout
from birds_lpft.models.net import BirdNet, NetConfig, build_net
from birds_lpft.models.zoo import get_spec
from birds_lpft.recipe import PRESETS

import finetune.module as finetune_module
from finetune.levers.cotuning import CoTuning, relationship
from finetune.train import fine_tune

import solution

from conftest import calibrate_batchnorm

ROOT = Path(__file__).resolve().parent.parent
TINY = replace(PRESETS["fast"], image_size=64, batch_size=8, limit_train_batches=2)
TRAINER = {"progress": False, "accelerator": "cpu", "devices": 1}
LEVERS = {"cotuning": {"cotuning": 2.3}, "distill": {"members": 2, "distill": 1.0}}


def _images(seed: int = 0):
    return make_synthetic(num_classes=3, per_class=4, size=48, seed=seed)


def _state(result) -> dict[str, torch.Tensor]:
    return result.classifier.net.state_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- off, and at no strength, nothing changes


def test_every_lever_off_trains_bit_for_bit_as_before():
    plain = _state(fine_tune(_images(), TINY, "none", **TRAINER))
    off = {"cotuning": 0.0, "distill": 0.0}
    assert _same(_state(fine_tune(_images(), replace(TINY, **off), "none", **TRAINER)), plain)


def test_co_tunings_term_at_weight_zero_trains_bit_for_bit_as_without_it(monkeypatch):
    plain = _state(fine_tune(_images(), TINY, "none", **TRAINER))
    torch.manual_seed(7)
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), torch.nn.Linear(1280, 10))

    def zero_weight(cfg, top, train_set, inputs, trainer=None):
        rel = relationship(top, head, train_set.stacks[0], train_set.rows, train_set.labels, 3)
        return [CoTuning(copy.deepcopy(head), rel, 0.0)]  # every piece of the term runs, weighted 0

    monkeypatch.setattr(finetune_module, "loss_terms", zero_weight)
    assert _same(_state(fine_tune(_images(), TINY, "none", **TRAINER)), plain)


# --------------------------------------------------------------------------- what each lever does


def test_co_tunings_relationship_rows_are_probability_distributions():
    torch.manual_seed(0)
    net = calibrate_batchnorm(build_net(NetConfig("mobilenet_v2", 4, 14)), torch.randn(8, 3, 64, 64))
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(1), torch.nn.Linear(1280, 7))
    centre = net.forward_trunk(torch.randn(10, 3, 64, 64)).detach()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])  # of rows 1, 3, 5, 6, 8, 9; no image of species 3
    rel = relationship(net.top(), head, centre, [1, 3, 5, 6, 8, 9], labels, 4)
    assert rel.shape == (4, 7) and (rel >= 0).all()
    torch.testing.assert_close(rel.sum(1), torch.ones(4))
    torch.testing.assert_close(rel[3], torch.full((7,), 1 / 7))  # a species without images: uniform
    with torch.no_grad():
        p = F.softmax(head(net.top().forward_tail(centre[[1, 3]])).double(), 1).mean(0).float()
    torch.testing.assert_close(rel[0], p)


def test_distillation_ships_one_network_of_the_shipped_shape():
    result = fine_tune(_images(), replace(TINY, **LEVERS["distill"]), "none", **TRAINER)
    net = result.classifier.net
    assert type(net) is BirdNet and result.classifier.net_cfg.members == 1
    assert net.state_dict().keys() == build_net(NetConfig("mobilenet_v2", 3, TINY.trunk_split)).state_dict().keys()
    assert len(result.history) == 3  # two teachers' fits, then the student's


# --------------------------------------------------------------------------- round trips


CHILD = """
import json, sys
import classification
import birds_lpft.models.weights as weights
weights.verify = lambda path, spec: path  # the cached stand-in is no official file
args = json.loads(sys.argv[1])
model = classification.train_classifier(args["gt"], args["train"], fast_train=False)
model.save(args["out"])
print(json.dumps(classification.classify(args["model"], args["test"])))
"""


@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_a_levers_model_round_trips_and_its_grader_file_trains_it_again(tmp_path, lever):
    data = tmp_path / "data"
    write_grader_layout(data, "train", _images())
    write_grader_layout(data, "test", make_synthetic(num_classes=3, per_class=2, size=48, seed=1))
    home = tmp_path / "torch_home"
    cached = home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    cached.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(get_spec("mobilenet_v2").build().state_dict(), cached)  # a random stand-in, never the official file
    recipe = replace(TINY, **LEVERS[lever])
    model_path = tmp_path / "m.pt"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(home))
        mp.setattr("birds_lpft.models.weights.verify", lambda path, spec: path)
        fine_tune(_images(), recipe, "required", **TRAINER).classifier.save(model_path)
    loaded = Classifier.load(model_path)
    assert loaded.recipe == recipe and loaded.net_cfg.members == recipe.shipped_members
    test_dir = data / "test" / "images"
    labels = solution.classify(str(model_path), str(test_dir))
    assert len(labels) == 6 and all(type(v) is int for v in labels.values())

    upload = tmp_path / "upload"
    upload.mkdir()
    from birds_lpft.tools import build_submission

    build_submission.main(["--model", str(model_path), "--out", str(upload)])
    gt = {line.split(",")[0]: int(line.split(",")[1]) for line in (data / "train" / "gt.csv").read_text().split()[1:]}
    args = {"gt": gt, "train": str(data / "train" / "images"), "out": str(tmp_path / "again.pt"),
            "model": str(upload / "birds_model.pt"), "test": str(test_dir)}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(TORCH_HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], cwd=upload, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == labels  # the same labels from the grader file
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert again["recipe"] == recipe.to_dict()  # the file trains the model's own recipe, lever included
    assert _same(again["state_dict"], loaded.net.state_dict())  # and reproduces it bit for bit
