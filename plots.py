"""PNG plots of training curves and of word-vector projections (matplotlib, no display).

Every picture is written through fileio.atomic_write, so a reader such as an image viewer
never sees a half-written PNG, even if training is interrupted mid-save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

# Select the non-interactive backend before pyplot is imported anywhere:
# training runs on headless machines where a GUI backend would fail.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must follow matplotlib.use)
import numpy as np  # noqa: E402

import fileio  # noqa: E402

# Panels in this order when present, the headline first: the normalized PIP loss
# is the one that falls as the vectors improve. Each loss gets its own axes
# because their scales differ.
CURVE_ORDER = ("PIP loss (normalized)", "Train loss", "PIP loss", "PIP loss (oracle)")
PROJECTION_METHODS = ("pca", "tsne")


class PlotError(ValueError):
    """The plot cannot be made from these inputs (reported in one line by CLIs)."""


def _save_atomically(figure, path) -> Path:
    try:
        fileio.atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(figure)
    return Path(path)


def plot_training_curves(history: Mapping[str, Sequence[tuple[float, float]]], path,
                         tags: Sequence[str] = CURVE_ORDER) -> Path:
    """Plot the curves of ``history`` (tag -> list of ``(epoch, value)``), one panel per tag.

    Only ``tags`` are drawn (by default those of ``CURVE_ORDER``, in that
    order), so the trainer's whole history, which also logs epoch time and
    learning rate, can be passed as is. Tags absent or without points are left
    out.
    """
    tags = [tag for tag in tags if history.get(tag)]
    if not tags:
        raise PlotError("no training history to plot (none of: " + ", ".join(CURVE_ORDER) + ")")

    figure, axes = plt.subplots(1, len(tags), figsize=(4.2 * len(tags), 3.4), squeeze=False)
    for axis, tag in zip(axes[0], tags):
        points = sorted((float(epoch), float(value)) for epoch, value in history[tag])
        epochs = [epoch for epoch, _ in points]
        values = [value for _, value in points]
        axis.plot(epochs, values, marker="o", markersize=3, linewidth=1.5)
        axis.set_title(tag)
        axis.set_xlabel("epoch")
        axis.grid(True, alpha=0.3)
        positive = all(value > 0 for value in values)
        # PIP losses often shrink by orders of magnitude over training.
        if tag.startswith("PIP") and positive and max(values) > 20 * min(values):
            axis.set_yscale("log")
    figure.tight_layout()
    return _save_atomically(figure, path)


def plot_loss_and_scores(history: Mapping[str, Sequence[tuple[float, float]]], loss_tag: str,
                         score_tags: Sequence[str], path, title: str | None = None) -> Path:
    """One panel: the ``loss_tag`` curve on the left axis and the ``score_tags``
    curves (benchmark scores) on a shared right axis, over the epochs of a run,
    so one can see whether the loss falls as the scores rise."""
    missing = [tag for tag in (loss_tag, *score_tags) if not history.get(tag)]
    if missing:
        raise PlotError("no points for: " + ", ".join(missing))
    figure, loss_axis = plt.subplots(figsize=(6.4, 3.8))
    score_axis = loss_axis.twinx()
    lines = []
    for axis, tag, color, style in [(loss_axis, loss_tag, "black", "-"),
                                    *((score_axis, tag, f"C{i}", "--") for i, tag in enumerate(score_tags))]:
        epochs, values = zip(*sorted((float(e), float(v)) for e, v in history[tag]))
        lines += axis.plot(epochs, values, style, color=color, marker="o", markersize=3, label=tag)
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel(loss_tag)
    score_axis.set_ylabel("benchmark score")
    loss_axis.grid(True, alpha=0.3)
    loss_axis.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    if title:
        loss_axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return _save_atomically(figure, path)


def project_2d(vectors: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Return an ``n x 2`` projection of the rows of ``vectors``."""
    matrix = np.asarray(vectors, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < 2:
        raise PlotError("need at least 2 vectors to project")
    if method == "pca":
        centred = matrix - matrix.mean(axis=0)
        # Rows of vt are the principal directions; scores = U * S.
        left, singular, _ = np.linalg.svd(centred, full_matrices=False)
        coords = left[:, :2] * singular[:2]
        if coords.shape[1] < 2:  # one-dimensional input: pad the missing axis
            coords = np.hstack([coords, np.zeros((len(coords), 2 - coords.shape[1]))])
        return coords
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError as error:
            raise PlotError("t-SNE needs scikit-learn (pip install scikit-learn); "
                            "use method 'pca' otherwise") from error
        # Perplexity must stay below the number of points.
        perplexity = max(1.0, min(30.0, (len(matrix) - 1) / 3))
        return TSNE(n_components=2, perplexity=perplexity, init="pca",
                    random_state=seed).fit_transform(matrix)
    raise PlotError(f"unknown projection method {method!r}; use one of {PROJECTION_METHODS}")


def plot_projection(words: Sequence[str], vectors: np.ndarray, path, method: str = "pca",
                    title: str | None = None) -> Path:
    """Scatter the 2-D projection of ``vectors`` (one row per word) with word labels."""
    if len(words) != len(vectors):
        raise PlotError(f"{len(words)} words but {len(vectors)} vectors")
    coords = project_2d(vectors, method)
    figure, axis = plt.subplots(figsize=(7, 6))
    axis.scatter(coords[:, 0], coords[:, 1], s=18, color="tab:blue")
    for word, (x, y) in zip(words, coords):
        axis.annotate(word, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=9)
    axis.set_title(title or f"{method.upper()} projection of {len(words)} words")
    axis.set_xticks([])
    axis.set_yticks([])
    figure.tight_layout()
    return _save_atomically(figure, path)
