"""``tools.bench run``'s report from plain results: the table, the most-confused species pairs, the test images
the model got most confidently wrong, the machine, and ``report.md`` / ``results.json``. No model, no
Lightning; and the scratch folder that keeps the run's temporary files inside the report folder."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch

from birds_lpft.extract import bf16_supported
from birds_lpft.utils.outputs import markdown_table, write_text

HEADER = ("step", "val acc", "test acc", "seconds", "wall s", "images/s", "peak RSS MiB")
NOTES = """\
- seconds: the step's own work (probe and pipelines: making the model, val and test scoring excluded; classify: the
  `solution.classify` call, model load included); wall s: the step's whole process, start and imports included.
- images/s: probe: training images end to end; pipelines: cached views trained per second; classify: test images.
- val acc: a seeded 20% per class (`ProbeFit.val_fraction`); probe: the score of its chosen C on that split (it
  then refits on every image); pipelines: held out of training, scored as `classify` scores. test acc: each
  pipeline's own prediction views."""


def test_outputs(evaluation: dict, test) -> dict:
    """A pipeline's test predictions, with the probabilities of the predicted and of the true species."""
    probs = evaluation["probabilities"]
    return {"test_accuracy": evaluation["accuracy"], "test_predictions": evaluation["predictions"].tolist(),
            "test_labels": test.labels.tolist(), "test_names": list(test.names),
            "test_p_predicted": probs.max(1).tolist(),
            "test_p_true": probs[np.arange(len(probs)), test.labels].tolist()}


def table_rows(results: dict) -> list[list[str]]:
    """One row per step that ran."""
    p = results["probe"]
    rows = [["linear probe", _acc(p["val_accuracy"]), _acc(p["test_accuracy"]), _f(p["seconds"]),
             _f(p["wall_seconds"]), _f(p["images_per_s"]), _f(p["peak_rss_mib"])]]
    for name, r in results["pipelines"].items():
        rows.append([f"LP-FT pipeline ({name})", _acc(r["val_accuracy"]), _acc(r["test_accuracy"]), _f(r["seconds"]),
                     _f(r["wall_seconds"]), _f(r["train_images_per_s"]), _f(r["peak_rss_mib"])])
    c = results["classify"]
    if c is not None:
        rows.append(["classify", "-", _acc(c["accuracy"]), _f(c["seconds"]), _f(c["wall_seconds"]),
                     _f(c["images_per_s"]), _f(c["peak_rss_mib"])])
    return rows


def _f(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def most_confused(pipeline: dict, names: list[str], top: int = 10) -> list[dict]:
    """The (true, predicted) species pairs with the most test mistakes, most first (fastai's ``most_confused``)."""
    labels = pipeline["test_labels"]
    mistakes = Counter((y, p) for y, p in zip(labels, pipeline["test_predictions"], strict=True) if y != p)
    pairs = sorted(mistakes.items(), key=lambda pair: (-pair[1], pair[0]))
    return [{"true": names[i], "predicted": names[j], "count": c, "of_true": labels.count(i)}
            for (i, j), c in pairs[:top]]


def top_losses(pipeline: dict, names: list[str], top: int = 16) -> list[dict]:
    """The test images the model got most confidently wrong: highest probability on a wrong species first."""
    labels, predicted = pipeline["test_labels"], pipeline["test_predictions"]
    wrong = sorted((i for i, (p, y) in enumerate(zip(predicted, labels, strict=True)) if p != y),
                   key=lambda i: -pipeline["test_p_predicted"][i])
    return [{"file": pipeline["test_names"][i], "true": names[labels[i]], "predicted": names[predicted[i]],
             "p_predicted": pipeline["test_p_predicted"][i], "p_true": pipeline["test_p_true"][i]}
            for i in wrong[:top]]


def environment() -> dict:
    """The machine and library versions the figures come from."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {lib: importlib.metadata.version(lib) for lib in ("torchvision", "lightning", "scikit-learn")}
    return {"cpu_count": os.cpu_count(), "cpus_usable": usable, "torch_threads": torch.get_num_threads(),
            "bf16_supported": bf16_supported(), "python": platform.python_version(), "torch": torch.__version__,
            **versions}


def write(out: Path, title: str, results: dict) -> None:
    """Print the table; write ``results.json`` and ``report.md`` (with the mistakes) into ``out``."""
    first = next(iter(results["pipelines"].values()))
    if "test_predictions" in first:
        results["most_confused"] = most_confused(first, results["classes"])
        results["top_losses"] = top_losses(first, results["classes"])
    table = markdown_table(HEADER, table_rows(results))
    print("\n" + table)
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    parts = [f"# Benchmark: {title}", "", table, "", NOTES, ""]
    if results.get("most_confused"):
        rows = [(p["true"], p["predicted"], p["count"], p["of_true"]) for p in results["most_confused"]]
        parts += ["## Most-confused species (test)", "",
                  markdown_table(("true species", "predicted as", "mistakes", "of its test images"), rows), ""]
    machine = json.dumps({"config": results["config"], "environment": results["environment"]}, indent=2)
    parts += ["## Config and machine", "", "```json", machine, "```", ""]
    write_text(out / "report.md", "\n".join(parts))
    print(f"report written to {out / 'report.md'}")


@contextmanager
def scratch_in(folder: Path) -> Iterator[Path]:
    """Keep the run's scratch files inside ``folder``: the temp dir (``TMPDIR``, for multiprocessing's and
    torch's short-lived files) and matplotlib's config and caches (``MPLCONFIGDIR``: ``import lightning`` may
    import it through torchmetrics), both under ``folder/.scratch``, which is removed afterwards. The child
    processes inherit both; ``tempfile`` recomputes its folder from ``TMPDIR`` while inside."""
    scratch = folder / ".scratch"
    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    env = {"MPLCONFIGDIR": str(scratch / "mpl"), "TMPDIR": str(scratch / "tmp")}
    try:
        with patch.dict(os.environ, env), patch.object(tempfile, "tempdir", None):
            yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
