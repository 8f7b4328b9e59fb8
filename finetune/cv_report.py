"""What ``finetune.cv`` reports of its fold scores: means and standard errors, the per-seed means of a
repeated CV, each candidate paired with the first on the same folds, and the printed and Markdown tables; as a
command, the rows of several runs on the same folds in one table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from birds_lpft.utils.cli import check_output_file, fail, publish
from birds_lpft.utils.outputs import markdown_table


def mean_se(accs: list[float]) -> dict:
    """Fold accuracies, their mean and standard error (of the mean)."""
    a = np.array(accs)
    se = float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")
    return {"folds": list(accs), "mean": float(a.mean()), "se": se}


def compare_rows(rows: list[dict], seeds: list[int]) -> list[dict]:
    """Add to every row each seed's mean ('seed_means', with several seeds), and to every row after the first its
    fold-by-fold difference from the first ('vs_first'): the candidates share their folds, so the paired difference
    is far less noisy than the means' own standard errors. Folds come seed by seed (``finetune.cv.repeated_folds``).
    With several seeds the standard errors treat the folds as independent, which they are not, so they understate
    the uncertainty; a difference that holds under every seed is the sturdier read.
    """
    for row in rows:
        per_seed = np.array(row["folds"]).reshape(len(seeds), -1)
        if len(seeds) > 1:
            row["seed_means"] = {str(s): float(m) for s, m in zip(seeds, per_seed.mean(1), strict=True)}
        if row is not rows[0]:
            row["vs_first"] = _paired(row["folds"], rows[0], seeds)
        for readout in row.get("readouts", {}).values():  # read off the same tails: paired with the first too
            readout["vs_first"] = _paired(readout["folds"], rows[0], seeds)
    return rows


def _paired(folds: list[float], first: dict, seeds: list[int]) -> dict:
    """``folds`` minus the first row's, fold by fold: their mean, standard error and per-seed means."""
    diffs = np.array(folds) - np.array(first["folds"])
    return {"candidate": first["candidate"], **mean_se(diffs.tolist()),
            "seed_means": [float(m) for m in diffs.reshape(len(seeds), -1).mean(1)]}


def format_row(row: dict) -> str:
    folds = " ".join(f"{a:.4f}" for a in row["folds"])
    line = f"{row['candidate']:<40} {row['mean']:.4f} +- {row['se']:.4f}  [{folds}]  {row['seconds']:.0f}s"
    if "seed_means" in row:
        line += "\n    per seed " + "  ".join(f"{s}: {m:.4f}" for s, m in row["seed_means"].items())
    if "vs_first" in row:
        line += "\n    " + _versus(row["vs_first"])
    for name, r in row.get("readouts", {}).items():
        versus = _versus(r["vs_first"]) if "vs_first" in r else ""  # paired once every row is in
        line += f"\n    readout {name:<32} {r['mean']:.4f} +- {r['se']:.4f}  {versus}"
    return line


def _versus(d: dict) -> str:
    per_seed = d["seed_means"]
    by_seed = (" per seed " + " ".join(f"{100 * m:+.2f}" for m in per_seed)) if len(per_seed) > 1 else ""
    return (f"vs {d['candidate']}: {100 * d['mean']:+.2f} +- {100 * d['se']:.2f} points "
            f"(paired over {len(d['folds'])} folds){by_seed}")


def markdown(rows: list[dict], k: int, seeds: list[int]) -> str:
    n = k * len(seeds)
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}: {n} folds"
    intro = (f"{k}-fold stratified CV ({seed_text}), training images only; time = the candidate's folds (its shared "
             "trunk cache is built once per trunk setting, shown apart); 'vs first' = the paired difference from the "
             "first row, in points.")
    header = ["candidate", "mean", "SE", "vs first", *(f"fold {i + 1}" for i in range(n)), "seconds", "cache s"]
    cells = []
    for r in rows:
        cells.append([*_cells(f"`{r['candidate']}`", r), *(_seconds(r.get(k)) for k in ("seconds", "cache_seconds"))])
        for name, readout in r.get("readouts", {}).items():
            cells.append([*_cells(f"`{r['candidate']}`, read off: {name}", readout), "-", "-"])
    return f"{intro}\n\n{markdown_table(header, cells)}\n"


def _seconds(value: float | None) -> str:
    """A row's time, or '-' where it has none (a row merged from the folds of several runs)."""
    return "-" if value is None or not np.isfinite(value) else f"{value:.0f}"


def _cells(name: str, r: dict) -> list[str]:
    d = r.get("vs_first")
    versus = f"{100 * d['mean']:+.2f} +- {100 * d['se']:.2f}" if d else "-"
    return [name, f"{r['mean']:.4f}", f"{r['se']:.4f}", versus, *(f"{a:.4f}" for a in r["folds"])]


def main(argv: list[str] | None = None) -> str:
    """``python -m finetune.cv_report RUN.json ... --seed S ... --folds K --out table.md``: the rows of several
    ``finetune.cv --out`` runs on the same folds in one table, each paired with the first run's first row."""
    p = argparse.ArgumentParser(prog="python -m finetune.cv_report", description=main.__doc__)
    p.add_argument("runs", type=Path, nargs="+", help="finetune.cv --out .json files of the same folds")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="their fold seeds, in their order")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--out", type=Path, help="write the table here (.md)")
    args = p.parse_args(argv)
    check_output_file(p.prog, "--out", args.out, args.runs, example="table.md")
    rows = [row for run in args.runs for row in json.loads(run.read_text())]
    if any(len(row["folds"]) != args.folds * len(args.seed) for row in rows):
        fail(p.prog, f"every row must hold {args.folds} folds x {len(args.seed)} seeds; give the runs' --seed "
                     "and --folds")
    text = markdown(compare_rows(rows, args.seed), args.folds, args.seed)
    publish(text, args.out)
    return text


if __name__ == "__main__":
    main()
