"""Around a trained model: species names in the checkpoint, ``python -m finetune.predict`` (top-k with
probabilities, a CSV row per file), opt-in training logs, and quiet command lines. Random-init networks
and generated images only."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from birds_lpft.classifier import Classifier
from birds_lpft.data.synthetic import make_synthetic, write_grader_layout
from birds_lpft.models.net import NetConfig, build_net
from birds_lpft.recipe import PRESETS

import finetune.__main__ as finetune_cli
from finetune.predict import main as predict_main
from finetune.train import fine_tune

import solution

from conftest import make_classifier

SIZE = 64
TINY = replace(PRESETS["fast"], image_size=SIZE, batch_size=8, limit_train_batches=2)
NAMES = ("Acadian Flycatcher", "Blue Jay", "Common Raven")
# What Lightning and torch print by themselves about choices this design makes on purpose.
NOISE = ("Tip:", "GPU available", "TPU available", "does not have many workers", "validation_step",
         "val_dataloader", "LeafSpec", "deprecated", "limit_train_batches", "Trainer.fit", "in eval mode",
         "distributed_sampler", "litlogger")


def _model(path: Path, names=NAMES) -> Path:
    torch.manual_seed(0)
    cfg = NetConfig("mobilenet_v2", len(names), 14)
    make_classifier(build_net(cfg).eval(), cfg, SIZE, names=names).save(path)
    return path


def test_class_names_travel_from_the_data_into_the_checkpoint(tmp_path):
    images = replace(make_synthetic(num_classes=3, per_class=4, size=48, seed=0), class_names=NAMES)
    result = fine_tune(images, TINY, "none", progress=False, accelerator="cpu", devices=1)
    assert result.classifier.class_names == NAMES
    result.classifier.save(tmp_path / "m.pt")
    loaded = Classifier.load(tmp_path / "m.pt")
    assert loaded.class_names == NAMES and loaded.name_of(1) == "Blue Jay"


def test_a_checkpoint_without_names_or_new_fields_still_loads(tmp_path):
    ckpt = torch.load(_model(tmp_path / "new.pt"), weights_only=True)
    net = {"backbone": "mobilenet_v2", "num_classes": 3, "split": 14, "dropout": 0.0}
    data = {"image_size": SIZE, "resize_size": 73, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "interpolation": "bilinear"}
    old = {"format": "birds-lpft/1", "net": net, "data": data, "tta_flip": True, "state_dict": ckpt["state_dict"]}
    torch.save(old, tmp_path / "old.pt")
    loaded = Classifier.load(tmp_path / "old.pt")
    assert loaded.class_names is None and loaded.name_of(2) == "2"
    assert loaded.net_cfg == NetConfig("mobilenet_v2", 3, 14)


def _mixed_folder(root: Path) -> Path:
    folder = root / "photos"
    images = make_synthetic(num_classes=3, per_class=2, size=48, seed=5)
    write_grader_layout(root, "x", images)
    (root / "x" / "images").rename(folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    (folder / ".hidden.jpg").write_bytes(images.sources[0])
    (folder / "inner").mkdir()
    return folder


def test_predict_on_a_mixed_folder_agrees_with_classify(tmp_path, capsys):
    model, folder = _model(tmp_path / "m.pt"), _mixed_folder(tmp_path)
    out_csv = tmp_path / "preds.csv"
    with pytest.warns(UserWarning, match="broken.jpg"):
        results = predict_main([str(model), str(folder), "--top-k", "2", "--csv", str(out_csv), "--no-progress"])
    printed = capsys.readouterr().out
    files = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
    assert [Path(r.file).name for r in results] == files and len(files) == 7
    rows = list(csv.DictReader(out_csv.open()))
    assert [Path(r["file"]).name for r in rows] == files  # one row per file
    with pytest.warns(UserWarning):
        graded = solution.classify(str(model), str(folder))
    for row, r in zip(rows, results, strict=True):
        name = Path(r.file).name
        if name == "broken.jpg":
            assert row["status"] == "unreadable" and "broken.jpg" in row["reason"] and row["id_1"] == ""
            assert f"{r.file}: unreadable" in printed
            continue
        assert row["status"] == "ok" and row["reason"] == ""
        probs = [float(row["prob_1"]), float(row["prob_2"])]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
        assert int(row["id_1"]) == graded[name] and row["species_1"] == NAMES[graded[name]]
        assert f"{r.file}: {NAMES[graded[name]]} " in printed


def test_predict_single_files_and_bad_model(tmp_path, capsys):
    model, folder = _model(tmp_path / "m.pt"), _mixed_folder(tmp_path)
    one = sorted(folder.glob("0*.jpg"))[0]
    (result,) = predict_main([str(model), str(one), "--top-k", "10", "--no-progress"])
    assert len(result.top) == 3 and abs(sum(p for _, _, p in result.top) - 1.0) < 1e-5  # k capped at K classes
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="junk.pt: cannot read this checkpoint"):
        predict_main([str(tmp_path / "junk.pt"), str(one)])


def test_log_dir_writes_only_there(tmp_path, watched):
    before = watched()
    log_dir = watched.dirs["cwd"] / "logs"
    finetune_cli.main(["--random-init", "--preset", "fast", "--image-size", str(SIZE), "--no-progress",
                       "--log-dir", str(log_dir)])
    written = sorted(str(p.relative_to(log_dir)) for p in log_dir.rglob("*") if p.is_file())
    assert any(w.startswith("csv/") and w.endswith("metrics.csv") for w in written), written
    after = {k: v for k, v in watched().items() if not k.startswith(str(log_dir))}
    assert {k for k in after if k not in before} == set()
    assert "train_loss" in next(log_dir.rglob("metrics.csv")).read_text()


def test_cli_output_is_free_of_framework_noise(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "finetune", "--random-init", "--preset", "fast", "--image-size",
                           str(SIZE), "--no-progress"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert [n for n in NOISE if n in text] == []
    for stage in ("trunk cache: 64 images x 2 views", "fine-tune:", "test accuracy:"):  # one line per stage stays
        assert stage in proc.stdout


def test_reproduce_compares_two_checkpoints_without_training(tmp_path, capsys):
    """``tools/reproduce.py --retrained``: accuracy, agreement and bit-identical tensors of two checkpoints."""
    import birds_lpft.tools.reproduce as reproduce

    root = tmp_path / "data"
    write_grader_layout(root, "test", make_synthetic(num_classes=3, per_class=2, size=64, seed=0))
    paths = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        net_cfg = NetConfig("mobilenet_v2", 3, 14)
        paths.append(tmp_path / f"m{len(paths)}.pt")
        make_classifier(build_net(net_cfg), net_cfg, 64).save(paths[-1])
    with pytest.raises(SystemExit):
        reproduce.main([str(root), "--shipped", str(paths[0]), "--retrained", str(paths[1])])
    assert "agree on 100.0% of 6 images" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        reproduce.main([str(root), "--shipped", str(paths[0]), "--retrained", str(paths[2])])
    out = capsys.readouterr().out
    total = len(build_net(NetConfig("mobilenet_v2", 3, 14)).state_dict())
    assert f"bit-identical: {total}/{total}" not in out and "bit-identical: " in out
    with pytest.raises(SystemExit) as refused:  # nothing is trained, so --out could never be written
        reproduce.main([str(root), "--shipped", str(paths[0]), "--retrained", str(paths[1]),
                        "--out", str(tmp_path / "x.pt")])
    assert refused.value.code == 2 and not (tmp_path / "x.pt").exists()
    capsys.readouterr()
    for args, words in [(["--shipped", str(tmp_path / "missing.pt")], "--shipped"),
                        (["--shipped", str(paths[0]), "--retrained", str(tmp_path / "missing.pt")], "--retrained"),
                        (["--shipped", str(paths[0]), "--retrained", str(paths[1])], "test")]:
        data = root if words != "test" else tmp_path / "no_test_split"
        with pytest.raises(SystemExit) as refused:  # one line, before any training
            reproduce.main([str(data), *args])
        err = capsys.readouterr().err.strip()
        assert refused.value.code == 2 and words in err and len(err.splitlines()) == 1, err
