"""The benchmark (``python -m tools.bench``): one tiny end-to-end run on a generated grader layout that
checks the report, the figures in results.json, the PNGs and that nothing lands outside REPORT_DIR; and the
small pure helpers. Random-init networks and generated images only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import birds_lpft.tools.bench as bench
import birds_lpft.tools.bench_report as bench_report
from birds_lpft.data.synthetic import make_synthetic, write_grader_layout

from conftest import snapshot

SPECIES = ("Acadian_Flycatcher", "American_Goldfinch", "Baltimore_Oriole")
PNGS = ("learning_curves.png", "per_class_accuracy.png", "confusion_matrix.png", "top_losses.png")
TINY = ["--random-init", "--preset", "fast", "--image-size", "64", "--epochs", "1", "--compute-batches", "1",
        "--no-progress", "--compare"]  # no preset beside the pipeline (the end-to-end test adds one)


def _grader_layout(root: Path, with_test: bool = True) -> Path:
    write_grader_layout(root, "train", make_synthetic(num_classes=3, per_class=8, size=48, seed=0))
    if with_test:
        write_grader_layout(root, "test", make_synthetic(num_classes=3, per_class=4, size=48, seed=1))
    (root / "classes.txt").write_text("".join(f"{k} {name}\n" for k, name in enumerate(SPECIES)))
    return root


def _is_accuracy(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


# --------------------------------------------------------------------------- end to end


def test_bench_end_to_end_writes_only_the_report(tmp_path, watched, capsys):
    data, report = _grader_layout(tmp_path / "data"), tmp_path / "report"
    before, data_before = watched(), snapshot(data)

    bench.main([str(data), "--out", str(report), *TINY, "v1", "--baseline", "--baseline-epochs", "1",
                "--baseline-image-size", "64"])

    printed = capsys.readouterr().out
    assert all(s in printed for s in ("LP-FT pipeline (fast)", "LP-FT pipeline (v1)", "baseline (online FT)",
                                      "classify", "peak RSS MiB"))
    assert watched() == before and snapshot(data) == data_before
    assert "MPLCONFIGDIR" not in os.environ
    assert {p.name for p in report.iterdir()} == {"report.md", "results.json", bench.CHECKPOINT, *PNGS}
    for name in PNGS:
        with Image.open(report / name) as img:
            assert img.format == "PNG" and min(img.size) > 200
    results = json.loads((report / "results.json").read_text())
    _check_results(results, report)
    text = (report / "report.md").read_text()
    assert "| LP-FT pipeline (fast) |" in text and "| LP-FT pipeline (v1) |" in text and "| classify |" in text
    assert '"torch"' in text and "precision" in text and "![confusion_matrix.png]" in text
    assert "## Most-confused species (test)" in text and "![top_losses.png]" in text


def _check_results(results: dict, report: Path) -> None:
    assert {"compute", "probe", "pipeline", "classify", "baseline", "config", "environment"} <= set(results)
    compute = results["compute"]
    assert compute["image_size"] == 64 and compute["batch_size"] == 16
    assert all(compute[part]["images_per_s"] > 0 and compute[part]["seconds"] > 0 for part in ("full", "trunk"))
    for step in ("probe", "baseline", "pipeline"):
        r = results[step]
        assert _is_accuracy(r["val_accuracy"]) and _is_accuracy(r["test_accuracy"]), step
        assert 0 < r["seconds"] < r["wall_seconds"] and r["peak_rss_mib"] > 0, step
        assert 0 < r["start_rss_mib"] <= r["peak_rss_mib"], step
    pipeline, classify = results["pipeline"], results["classify"]
    assert pipeline["train_images_per_s"] > 0 and pipeline["cache_mib"] > 0 and pipeline["cache_images"] == 24
    assert {"load network", "trunk cache", "probe", "fine-tune"} <= set(pipeline["stages"])
    assert [h["epoch"] for h in pipeline["history"]] == [1] and {"train_loss", "val_acc"} <= set(pipeline["history"][0])
    assert pipeline["checkpoint"] == str(report / bench.CHECKPOINT) and pipeline["config"]["val_fraction"] == 0.2
    assert classify["images"] == 12 and classify["images_per_s"] > 0 and classify["peak_rss_mib"] > 0
    assert classify["accuracy"] == pytest.approx(pipeline["test_accuracy"])  # classify == the project's evaluation
    assert results["baseline"]["config"]["epochs"] == 1 and len(results["baseline"]["history"]) == 1
    assert results["classes"] == [s.replace("_", " ") for s in SPECIES]
    assert np.asarray(results["confusion_matrix"]).sum() == 12
    assert results["config"]["pipeline"]["image_size"] == 64 and results["environment"]["torch"] == torch.__version__
    v1 = results["compare"]["v1"]  # the previous recipe, measured in the same run, same split and size
    assert _is_accuracy(v1["val_accuracy"]) and _is_accuracy(v1["test_accuracy"]) and v1["config"]["image_size"] == 64
    assert v1["config"]["train_precision"] == "fp32" and "checkpoint" not in v1
    wrong = sum(p != y for p, y in zip(pipeline["test_predictions"], pipeline["test_labels"]))
    assert len(results["top_losses"]) == min(wrong, 16)
    assert sum(pair["count"] for pair in results["most_confused"]) <= wrong


def test_bench_without_test_split_skips_classify(tmp_path, watched, capsys):
    data, report = _grader_layout(tmp_path / "data", with_test=False), tmp_path / "report"

    results = bench.main([str(data), "--out", str(report), *TINY])

    assert results["classify"] is None and results["baseline"] is None and results["confusion_matrix"] is None
    assert results["probe"]["test_accuracy"] is None and results["pipeline"]["test_accuracy"] is None
    assert _is_accuracy(results["pipeline"]["val_accuracy"])
    assert {p.name for p in report.iterdir()} == {"report.md", "results.json", bench.CHECKPOINT, PNGS[0]}
    table = capsys.readouterr().out.split("peak RSS MiB")[1]
    assert "n/a" in table and "classify" not in table and "baseline" not in table
    assert json.loads((report / "results.json").read_text())["classify"] is None


# --------------------------------------------------------------------------- helpers


def test_class_breakdown_per_class_and_confusion():
    out = bench_report.class_breakdown({"test_labels": [0, 0, 1, 1, 1], "test_predictions": [0, 1, 1, 1, 0]}, 3)
    assert out["confusion_matrix"] == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    assert out["per_class_test_accuracy"][:2] == [0.5, pytest.approx(2 / 3)]
    assert out["per_class_test_accuracy"][2] is None  # no test image of class 2
    assert bench_report.class_breakdown({"test_predictions": None}, 3) == {"per_class_test_accuracy": None,
                                                                    "confusion_matrix": None}


def test_table_shows_n_a_and_skips_steps_not_run():
    step = {"val_accuracy": 0.5, "test_accuracy": None, "seconds": 1.0, "wall_seconds": 2.0, "peak_rss_mib": 300.0}
    results = {
        "compute": {"full": {"seconds": 0.5, "images_per_s": 40.0}, "trunk": {"seconds": 0.25, "images_per_s": 80.0},
                    "wall_seconds": 1.0},
        "probe": {**step, "images_per_s": 10.0}, "baseline": None, "classify": None,
        "pipeline": {**step, "train_images_per_s": 123.4},
    }
    rows = bench_report.table_rows(results)
    assert [r[0] for r in rows] == ["compute: full", "compute: trunk", "linear probe", "LP-FT pipeline (full)"]
    assert rows[-1][1:] == ["0.5000", "n/a", "1.00", "2.00", "123", "300"]
    assert bench_report.markdown_table(rows).count("\n") == len(rows) + 1
    assert len(set(map(len, bench_report.text_table(rows).splitlines()))) == 1  # aligned columns


def test_scratch_files_live_in_the_report_dir_and_are_removed(tmp_path, monkeypatch):
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.setenv("TMPDIR", "/somewhere/tmp")
    with bench.scratch_in(tmp_path) as scratch:
        assert os.environ["MPLCONFIGDIR"] == str(tmp_path / ".scratch" / "mpl") and scratch == tmp_path / ".scratch"
        assert tempfile.gettempdir() == str(scratch / "tmp")
        (scratch / "tmp" / "pymp-x").write_text("")  # what multiprocessing leaves while running
    assert not scratch.exists() and "MPLCONFIGDIR" not in os.environ and os.environ["TMPDIR"] == "/somewhere/tmp"


def test_importing_the_bench_imports_neither_lightning_nor_matplotlib():
    # The parent of a CLI run must not import them before main() sets MPLCONFIGDIR: `import lightning`
    # imports matplotlib.pyplot (through torchmetrics), which writes ~/.config and ~/.cache/matplotlib.
    code = ("import sys, birds_lpft.tools.bench; "
            "print(sorted(m for m in ('lightning', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_most_confused_pairs_and_top_losses():
    names = ["a", "b", "c"]
    matrix = [[5, 2, 0], [1, 4, 3], [0, 0, 6]]
    pairs = bench_report.most_confused(matrix, names, top=2)
    found = [(p["true"], p["predicted"], p["count"], p["of_true"]) for p in pairs]
    assert found == [("b", "c", 3, 8), ("a", "b", 2, 7)]
    pipeline = {"test_predictions": [0, 1, 2, 1], "test_labels": [0, 2, 2, 0], "test_names": ["w", "x", "y", "z"],
                "test_p_predicted": [0.9, 0.6, 0.8, 0.95], "test_p_true": [0.9, 0.3, 0.8, 0.01]}
    losses = bench_report.top_losses(pipeline, names)
    assert [(loss["file"], loss["true"], loss["predicted"]) for loss in losses] == [("z", "a", "b"), ("x", "c", "b")]
    assert losses[0]["p_predicted"] == 0.95 and losses[0]["p_true"] == 0.01
    assert bench_report.top_losses({"test_predictions": None}, names) == []
