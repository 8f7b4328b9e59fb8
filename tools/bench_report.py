"""The benchmark's report from plain results: the table, the per-class breakdown, the most-confused species
pairs, the most confidently wrong test images, and ``report.md``. No model, no Lightning, no plotting."""

from __future__ import annotations

import json

import numpy as np

HEADER = ["step", "val acc", "test acc", "seconds", "wall s", "images/s", "peak RSS MiB"]
NOTES = """\
- seconds: the step's own work. probe, baseline, pipeline: producing the model (test scoring excluded);
  compute: the timed batches; classify: the `solution.classify` call, model load included.
  wall s: the parent's wall clock for the whole step (process start and imports of a child included).
- images/s: compute: forward passes on pre-decoded tensors; probe: training images per second end to end;
  baseline: training images per second of online training; pipeline: cached views per second of the
  fine-tune stage; classify: test images per second.
- peak RSS: each step's own process (VmHWM); compute runs in the parent and is not measured.
- val acc: the same seeded 20% per class for probe, baseline and pipelines, pipelines on the cached centre
  view (no TTA); pipeline test accuracy uses each preset's own TTA (its `tta_flip` and `tta_crops`)."""


def table_rows(results: dict) -> list[list[str]]:
    """One row per measured step: step, val acc, test acc, seconds, wall s, images/s, peak RSS MiB."""
    c = results["compute"]
    rows = []
    for part in ("full", "trunk"):
        rows.append([f"compute: {part}", "-", "-", _f(c[part]["seconds"]), _f(c["wall_seconds"]),
                     _f(c[part]["images_per_s"]), "-"])
    named = [("linear probe", results["probe"], "images_per_s"),
             ("baseline (online FT)", results["baseline"], "images_per_s"),
             (f"LP-FT pipeline ({results.get('preset', 'full')})", results["pipeline"], "train_images_per_s")]
    named += [(f"LP-FT pipeline ({name})", r, "train_images_per_s") for name, r in results.get("compare", {}).items()]
    for label, r, rate in named:
        if r is not None:
            rows.append([label, _acc(r["val_accuracy"]), _acc(r["test_accuracy"]), _f(r["seconds"]),
                         _f(r["wall_seconds"]), _f(r[rate]), _f(r["peak_rss_mib"])])
    r = results["classify"]
    if r is not None:
        rows.append(["classify", "-", _acc(r["accuracy"]), _f(r["seconds"]), _f(r["wall_seconds"]),
                     _f(r["images_per_s"]), _f(r["peak_rss_mib"])])
    return rows


def _f(value: float) -> str:
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def _acc(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def text_table(rows: list[list[str]]) -> str:
    """A fixed-width table for the terminal."""
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [HEADER, *rows]]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" + "---:|" * (len(HEADER) - 1)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def class_breakdown(pipeline: dict, num_classes: int) -> dict:
    """Per-class test accuracy and the confusion matrix (rows: true class) of the pipeline's predictions."""
    if pipeline.get("test_predictions") is None:
        return {"per_class_test_accuracy": None, "confusion_matrix": None}
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (pipeline["test_labels"], pipeline["test_predictions"]), 1)
    totals = matrix.sum(1)
    per_class = [float(matrix[k, k] / totals[k]) if totals[k] else None for k in range(num_classes)]
    return {"per_class_test_accuracy": per_class, "confusion_matrix": matrix.tolist()}


def most_confused(matrix: list[list[int]], names: list[str], top: int = 10, min_count: int = 1) -> list[dict]:
    """The (true, predicted) species pairs with the most test mistakes, most first (fastai's ``most_confused``)."""
    m = np.asarray(matrix)
    pairs = [(int(m[i, j]), i, j) for i in range(len(m)) for j in range(len(m)) if i != j and m[i, j] >= min_count]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": names[i], "predicted": names[j], "count": c, "of_true": int(m[i].sum())}
            for c, i, j in pairs[:top]]


def top_losses(pipeline: dict, names: list[str], top: int = 16) -> list[dict]:
    """The test images the model got most confidently wrong: highest probability on a wrong class first."""
    if pipeline.get("test_predictions") is None:
        return []
    wrong = [i for i, (p, y) in enumerate(zip(pipeline["test_predictions"], pipeline["test_labels"])) if p != y]
    wrong.sort(key=lambda i: -pipeline["test_p_predicted"][i])
    return [{"file": pipeline["test_names"][i], "true": names[pipeline["test_labels"][i]],
             "predicted": names[pipeline["test_predictions"][i]], "p_predicted": pipeline["test_p_predicted"][i],
             "p_true": pipeline["test_p_true"][i]} for i in wrong[:top]]


def confused_markdown(pairs: list[dict]) -> str:
    if not pairs:
        return "No test mistakes."
    lines = ["| true species | predicted as | mistakes | of its test images |", "|---|---|---:|---:|"]
    return "\n".join(lines + [f"| {p['true']} | {p['predicted']} | {p['count']} | {p['of_true']} |" for p in pairs])


def report_markdown(title: str, results: dict, plots: list[str]) -> str:
    """report.md: the table, the pipeline's stage times, the mistakes, the plots, the config and the machine."""
    env = results["environment"]
    p = results["pipeline"]
    stages = ", ".join(f"{k} {_f(v)}s" for k, v in p["stages"].items())
    floor = "n/a" if p["start_rss_mib"] is None else f"{p['start_rss_mib']:.0f} MiB"
    parts = [
        f"# Benchmark: {title}", "", markdown_table(table_rows(results)), "", NOTES, "",
        f"Pipeline stages: {stages}. Trunk cache {p['cache_mib']:.1f} MiB for {p['cache_images']} images; "
        f"training {p['train_images_per_s']:.1f} views/s. A child holds {floor} (torch and the other "
        "libraries) before its step starts: part of every peak RSS above.", "",
        f"Machine: {env['cpu_count']} CPUs ({env['cpus_usable']} usable, {env['cpu_model'] or 'model unknown'}), "
        f"torch {env['torch']} with {env['torch_threads']} threads, precision {env['precision']}.", "",
    ]
    if results.get("confusion_matrix") is not None:
        parts += ["## Most-confused species (test)", "", confused_markdown(results["most_confused"]), ""]
    parts += [*[f"![{name}]({name})" for name in plots], "",
              "## Config", "", "```json", json.dumps(results["config"], indent=2), "```", "",
              "## Environment", "", "```json", json.dumps(env, indent=2), "```", ""]
    return "\n".join(parts)
