"""The benchmark's PNGs: learning curves, per-class accuracy, the confusion matrix and the top-losses sheet.

matplotlib is imported only through :func:`agg_figure`, called once ``tools.bench`` has pointed
``MPLCONFIGDIR`` into the report folder (matplotlib writes its font cache where that says, on first import).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from birds_lpft.data.images import open_rgb
from birds_lpft.utils.outputs import atomic_write

THUMB = 160  # contact-sheet thumbnail side, pixels


def agg_figure() -> type:
    """matplotlib's ``Figure`` class on the Agg backend (no display, no pyplot state)."""
    import matplotlib  # here, not at the top: only once MPLCONFIGDIR is set (see tools.bench.scratch_in)

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure


def save_figure(fig, path: Path, dpi: int) -> None:
    """``fig.savefig`` as a PNG, atomically (``birds_lpft.utils.outputs``)."""
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=dpi)


def plot_learning_curves(Figure, results: dict, path: Path) -> None:
    """Train/val loss and accuracy per epoch of the pipeline (and of the baseline's training, dashed)."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    runs = [("LP-FT", results["pipeline"]["history"], "-")]
    if results["baseline"] is not None:
        runs.append(("baseline", results["baseline"]["history"], "--"))
    for ax, metric in zip(axes, ("loss", "acc")):
        for run, history, style in runs:
            for split in ("train", "val"):
                points = [(h["epoch"], h[f"{split}_{metric}"]) for h in history if f"{split}_{metric}" in h]
                if points:
                    ax.plot(*zip(*points), style, marker="o", label=f"{run} {split}")
        ax.set(xlabel="epoch", ylabel="accuracy" if metric == "acc" else "loss",
               title="accuracy" if metric == "acc" else "loss (train with label smoothing)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def plot_per_class(Figure, per_class: list[float | None], names: list[str], path: Path) -> None:
    """Horizontal bars of test accuracy per class, sorted, worst at the bottom."""
    scored = sorted((acc, name) for acc, name in zip(per_class, names) if acc is not None)
    fig = Figure(figsize=(8, max(3.0, 0.22 * len(scored) + 1.2)), layout="constrained")
    ax = fig.subplots()
    ax.barh(range(len(scored)), [a for a, _ in scored], color="tab:blue")
    ax.set_yticks(range(len(scored)), [n for _, n in scored], fontsize=7)
    mean = float(np.mean([a for a, _ in scored])) if scored else float("nan")
    ax.set(xlim=(0, 1), xlabel="test accuracy", title=f"LP-FT test accuracy per class (mean {mean:.3f})")
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path, dpi=100)


def plot_confusion(Figure, matrix: list[list[int]], names: list[str], path: Path) -> None:
    """Row-normalised confusion matrix (rows: true class), species names on both axes, counts when small."""
    m = np.asarray(matrix, dtype=float)
    rates = m / np.maximum(m.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(14, 12), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=90, fontsize=6)
    ax.set_yticks(ticks, names, fontsize=6)
    ax.set(xlabel="predicted", ylabel="true", title="LP-FT confusion matrix on test (row-normalised)")
    if len(names) <= 20:
        for (i, j), count in np.ndenumerate(m):
            if count:
                ax.text(j, i, int(count), ha="center", va="center", fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, shrink=0.6, label="share of the true class")
    save_figure(fig, path, dpi=120)  # 1680 x 1440 px: 50 names in 6 pt stay legible


def plot_top_losses(Figure, losses: list[dict], image_dir: Path, path: Path, columns: int = 4) -> None:
    """A contact sheet of the most confidently wrong test images: thumbnail, true and predicted species, and
    the probabilities the model gave the prediction and the truth (fastai's ``plot_top_losses``)."""
    rows = max(1, -(-len(losses) // columns))
    fig = Figure(figsize=(3.2 * columns, 3.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, loss in zip(axes, losses):
        img = open_rgb(image_dir / loss["file"], loss["file"], min_side=THUMB)
        img.thumbnail((THUMB, THUMB))
        ax.imshow(np.asarray(img))
        ax.set_title(f"{loss['file']}\ntrue: {loss['true']}\npredicted: {loss['predicted']}\n"
                     f"p={loss['p_predicted']:.2f} (true {loss['p_true']:.2f})", fontsize=7)
    if not losses:
        axes[0].text(0.5, 0.5, "no test mistakes", ha="center", va="center")
    fig.suptitle("Most confidently wrong test images", fontsize=11)
    save_figure(fig, path, dpi=100)


def write_plots(results: dict, out: Path, test_image_dir: Path | None) -> list[str]:
    """The PNGs this run can make (per-class, confusion and top losses need a test split); their file names."""
    Figure = agg_figure()
    names = ["learning_curves.png"]
    plot_learning_curves(Figure, results, out / names[0])
    if results["confusion_matrix"] is not None:
        plot_per_class(Figure, results["per_class_test_accuracy"], results["classes"], out / "per_class_accuracy.png")
        plot_confusion(Figure, results["confusion_matrix"], results["classes"], out / "confusion_matrix.png")
        plot_top_losses(Figure, results["top_losses"], test_image_dir, out / "top_losses.png")
        names += ["per_class_accuracy.png", "confusion_matrix.png", "top_losses.png"]
    return names
