"""The one measurement command (``python -m tools.bench``): a tiny end-to-end ``run`` on a generated grader layout
that checks the report, the figures in results.json and that nothing lands outside REPORT_DIR; ``speed`` of
this checkout against itself; ``backbones``; and the pure helpers. Random-init networks and generated images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import birds_lpft.tools.bench as bench
import birds_lpft.tools.bench_report as bench_report
import birds_lpft.tools.bench_speed as bench_speed
from birds_lpft.classifier import Classifier
from birds_lpft.data.synthetic import make_synthetic, write_grader_layout

from conftest import snapshot

# read at import, before conftest points $TORCH_HOME at an empty folder
WEIGHTS = Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth"

SPECIES = ("Acadian_Flycatcher", "American_Goldfinch", "Baltimore_Oriole")
TINY = ["--random-init", "--preset", "fast", "--image-size", "64", "--epochs", "1", "--no-progress", "--compare"]


def _grader_layout(root: Path, with_test: bool = True) -> Path:
    write_grader_layout(root, "train", make_synthetic(num_classes=3, per_class=8, size=48, seed=0))
    if with_test:
        write_grader_layout(root, "test", make_synthetic(num_classes=3, per_class=4, size=48, seed=1))
    (root / "classes.txt").write_text("".join(f"{k} {name}\n" for k, name in enumerate(SPECIES)))
    return root


def _is_accuracy(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_bench_run_end_to_end_writes_only_the_report(tmp_path, watched, capsys):
    data, report = _grader_layout(tmp_path / "data"), tmp_path / "report"
    before, data_before = watched(), snapshot(data)

    results = bench.main([str(data), "--out", str(report), *TINY, "v1"])  # 'run' is the default subcommand

    printed = capsys.readouterr().out
    assert all(s in printed for s in ("LP-FT pipeline (fast)", "LP-FT pipeline (v1)", "classify", "peak RSS MiB"))
    assert watched() == before and snapshot(data) == data_before and "MPLCONFIGDIR" not in os.environ
    assert {p.name for p in report.iterdir()} == {"report.md", "results.json", bench.CHECKPOINT}
    assert json.loads((report / "results.json").read_text()) == json.loads(json.dumps(results))
    probe, pipeline, classify = results["probe"], results["pipelines"]["fast"], results["classify"]
    for step in (probe, pipeline, results["pipelines"]["v1"]):
        assert _is_accuracy(step["val_accuracy"]) and _is_accuracy(step["test_accuracy"])
        assert 0 < step["seconds"] < step["wall_seconds"] and step["peak_rss_mib"] > 0
    assert {"load network", "trunk cache", "probe", "fine-tune"} <= set(pipeline["stages"])
    assert [h["epoch"] for h in pipeline["history"]] == [1] and pipeline["cache_mib"] > 0
    assert pipeline["val_images"] == 6 and results["config"]["v1"]["image_size"] == 64  # 2 of each class's 8
    assert pipeline["cache_mib"] * 2**20 == 18 * 2 * 96 * 4 * 4 * 2  # the other 18 trained: centre + 1 view, fp16
    assert classify["images"] == 12 and classify["accuracy"] == pytest.approx(pipeline["test_accuracy"])
    assert results["classes"] == [s.replace("_", " ") for s in SPECIES]
    wrong = sum(p != y for p, y in zip(pipeline["test_predictions"], pipeline["test_labels"], strict=True))
    assert len(results["top_losses"]) == min(wrong, 16)
    assert sum(pair["count"] for pair in results["most_confused"]) == wrong or len(results["most_confused"]) == 10
    text = (report / "report.md").read_text()
    assert "| LP-FT pipeline (v1) |" in text and "| classify |" in text and '"torch"' in text


def test_bench_run_without_a_test_split_skips_classify(tmp_path, watched, capsys):
    data, report = _grader_layout(tmp_path / "data", with_test=False), tmp_path / "report"
    results = bench.main(["run", str(data), "--out", str(report), *TINY])
    assert results["classify"] is None and results["probe"]["test_accuracy"] is None
    assert _is_accuracy(results["pipelines"]["fast"]["val_accuracy"]) and "most_confused" not in results
    assert "n/a" in capsys.readouterr().out


def test_bench_pipeline_with_no_image_to_hold_out_reports_no_val_accuracy(tmp_path):
    write_grader_layout(tmp_path, "train", make_synthetic(num_classes=3, per_class=1, size=48, seed=0))
    cfg = bench.recipe("fast", ["image_size=64"])
    out = bench.pipeline_step(tmp_path, cfg, "none", None)
    assert out["val_images"] == 0 and out["val_accuracy"] is None and out["test_accuracy"] is None


def test_bench_refuses_a_bad_setting_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main([str(tmp_path), "--out", str(tmp_path / "r"), "epochs=0"])
    assert exc.value.code == 2 and "epochs" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_speed_of_this_checkout_against_itself_finds_the_same_fold_scores(tmp_path, capsys):
    data = tmp_path / "data"
    write_grader_layout(data, "train", make_synthetic(num_classes=2, per_class=6, size=48, seed=0))
    text = bench.main(["speed", str(data), "--cv", "2", "--old", str(bench_speed.ROOT), "--random-init",
                       "--preset", "fast", "image_size=64", "--per-class", "4"])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()}
    old, new = (cell.strip() for cell in rows["fold scores"].split("|")[2:4])
    assert old == new and len(old.split()) == 2 and "wall s" in rows and capsys.readouterr().out.count("round 1 ") == 2


def test_speed_reads_a_runs_stages_and_a_cvs_figures():
    out = ("fine-tune: 37290 cached views in 500.0s (74.6 views/s)\n"
           "time: read data 0.1s, test 4.3s, load network 0.1s, trunk cache 200.0s, probe 5.5s, fine-tune 500.0s; "
           "peak RSS 2100 MiB\n")
    assert bench_speed.stage_seconds(out)["trunk cache"] == 200.0 and bench_speed.stage_seconds(out)["probe"] == 5.5
    cv = ("trunk cache for ['full:crop_scale=(0.2, 1.0)']: 294s\n"
          "  full:crop_scale=(0.2, 1.0) fold 1/2: 0.8936 (flip TTA off: 0.8996)\n"
          "  full:crop_scale=(0.2, 1.0) fold 2/2: 0.9095 (flip TTA off: 0.9000)\n"
          "full:crop_scale=(0.2, 1.0)               0.9016 +- 0.0080  [0.8936 0.9095]  1042s\n")
    assert bench_speed.cv_figures(cv) == {"trunk cache s": 294.0, "folds s": 1042.0, "folds": [0.8936, 0.9095]}
    for broken in (bench_speed.stage_seconds, bench_speed.cv_figures):
        with pytest.raises(RuntimeError, match="no"):
            broken("Traceback ...")


def test_speed_table_puts_new_against_old():
    old = {"wall s": 520.0, "peak MiB": 2000.0}
    new = {"wall s": 312.0, "peak MiB": 1900.0}
    text = bench_speed.speed_table({"old": [old], "new": [new]})
    assert "| wall s | 520.0 | 312.0 | 60% |" in text and "| peak MiB | 2000.0 | 1900.0 | 95% |" in text


def test_backbones_refuses_a_split_of_another_models_blocks_and_measures_one(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["backbones", "resnet18", "split=11"])
    assert exc.value.code == 2 and "split" in capsys.readouterr().err
    text = bench.main(["backbones", "mobilenet_v2", "image_size=64", "views=1", "--images", "16"])
    row = next(line for line in text.splitlines() if line.startswith("| mobilenet_v2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "11" and float(cells[2]) > 0 and float(cells[3]) > 0 and int(cells[5].replace(",", "")) > 0


def test_scratch_files_live_in_the_report_dir_and_are_removed(tmp_path, monkeypatch):
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    monkeypatch.setenv("TMPDIR", "/somewhere/tmp")
    with bench_report.scratch_in(tmp_path) as scratch:
        assert os.environ["MPLCONFIGDIR"] == str(tmp_path / ".scratch" / "mpl") and scratch == tmp_path / ".scratch"
        assert tempfile.gettempdir() == str(scratch / "tmp")
        (scratch / "tmp" / "pymp-x").write_text("")  # what multiprocessing leaves while running
    assert not scratch.exists() and "MPLCONFIGDIR" not in os.environ and os.environ["TMPDIR"] == "/somewhere/tmp"


def test_importing_the_bench_imports_neither_lightning_nor_matplotlib():
    # The parent of a run must not import them before it sets MPLCONFIGDIR: `import lightning` may import
    # matplotlib.pyplot (through torchmetrics), which writes ~/.config and ~/.cache/matplotlib.
    code = ("import sys, birds_lpft.tools.bench; "
            "print(sorted(m for m in ('lightning', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_most_confused_pairs_and_top_losses():
    names = ["a", "b", "c"]
    pipeline = {"test_predictions": [0, 1, 2, 1, 2, 2, 1], "test_labels": [0, 2, 2, 0, 1, 1, 1],
                "test_names": list("uvwxyzq"), "test_p_predicted": [0.9, 0.6, 0.8, 0.95, 0.5, 0.4, 0.7],
                "test_p_true": [0.9, 0.3, 0.8, 0.01, 0.2, 0.3, 0.7]}
    pairs = bench_report.most_confused(pipeline, names)
    found = [(p["true"], p["predicted"], p["count"], p["of_true"]) for p in pairs]
    assert found == [("b", "c", 2, 3), ("a", "b", 1, 2), ("c", "b", 1, 2)]
    losses = bench_report.top_losses(pipeline, names, top=2)
    assert [(loss["file"], loss["true"], loss["predicted"]) for loss in losses] == [("x", "a", "b"), ("v", "c", "b")]
    assert losses[0]["p_predicted"] == 0.95 and losses[0]["p_true"] == 0.01


@pytest.mark.skipif(not WEIGHTS.is_file(), reason=f"no pretrained weights at {WEIGHTS}")
def test_speed_keeps_each_trees_model_where_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(WEIGHTS.parents[2]))  # the fine-tune's child needs the real weights
    data = tmp_path / "data"
    write_grader_layout(data, "train", make_synthetic(num_classes=2, per_class=6, size=48, seed=0))
    bench.main(["speed", str(data), "--preset", "fast", "image_size=64", "--per-class", "4", "--keep",
                str(tmp_path / "kept")])
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["new-1.pt"]
    assert Classifier.load(tmp_path / "kept" / "new-1.pt").net.head.out_features == 2
