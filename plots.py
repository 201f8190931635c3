"""PNG plots of training curves and of word-vector projections (matplotlib, no display).

Every picture is written through fileio.atomic_write, so a reader such as an image viewer
never sees a half-written PNG, even if training is interrupted mid-save.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

import fileio

# Panels in this order when present, the headline first: the normalized PIP loss
# is the one that falls as the vectors improve. Each loss gets its own axes
# because their scales differ.
CURVE_ORDER = ("PIP loss (normalized)", "Train loss", "PIP loss", "PIP loss (oracle)")
PROJECTION_METHODS = ("pca", "tsne")


class PlotError(ValueError):
    """The plot cannot be made from these inputs (reported in one line by CLIs)."""


def pyplot():
    """matplotlib's pyplot on the non-interactive backend, imported only when a picture is drawn:
    choosing words to plot needs none of it, and training runs on headless machines where a GUI
    backend would fail."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_atomically(figure, path) -> Path:
    try:
        fileio.atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        pyplot().close(figure)
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

    figure, axes = pyplot().subplots(1, len(tags), figsize=(4.2 * len(tags), 3.4), squeeze=False)
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
    figure, axis = pyplot().subplots(figsize=(7, 6))
    axis.scatter(coords[:, 0], coords[:, 1], s=18, color="tab:blue")
    for word, (x, y) in zip(words, coords):
        axis.annotate(word, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=9)
    axis.set_title(title or f"{method.upper()} projection of {len(words)} words")
    axis.set_xticks([])
    axis.set_yticks([])
    figure.tight_layout()
    return _save_atomically(figure, path)


def words_to_plot(asked: Sequence[str], words: Sequence[str], vectors: np.ndarray, lowercase: bool = True,
                  embed_fn=None) -> tuple[list[str], np.ndarray, list[str]]:
    """The ``asked`` words that can be drawn and their vectors, as trainer.py and evaluate.py choose them.

    A word is looked up lowercased when ``lowercase`` (as the corpus was read); one not in
    ``words`` takes a vector from ``embed_fn`` (a list of words -> their vectors) where the
    model has one (rnn: from its spelling), else is left out. Returns (the words drawn, their
    vectors, the words left out); raises PlotError when fewer than 2 words remain.
    """
    index: dict[str, int] = {}
    for word_id, word in enumerate(words):
        index.setdefault(word, word_id)  # the first (most frequent) id of a word listed twice
    from evaluate import fold_case  # the corpus's case folding, as every query word gets it
    keys = list(dict.fromkeys(fold_case(word) if lowercase else word for word in asked))
    chosen = [key for key in keys if key in index]
    missing = [key for key in keys if key not in index]
    rows = [np.asarray(vectors[index[key]]) for key in chosen]
    if missing and embed_fn is not None:
        chosen, rows = chosen + missing, rows + list(np.asarray(embed_fn(missing)))
        missing = []
    if len(chosen) < 2:
        raise PlotError("--plot-words needs at least 2 known words; not in the vocabulary: " + " ".join(missing))
    return chosen, np.asarray(rows), missing


def plot_words(asked: Sequence[str], words: Sequence[str], vectors: np.ndarray, path, method: str = "pca",
               lowercase: bool = True, embed_fn=None) -> tuple[Path, list[str], list[str]]:
    """words_to_plot, drawn by plot_projection: (the picture, the words drawn, the words left out)."""
    chosen, rows, missing = words_to_plot(asked, words, vectors, lowercase, embed_fn)
    return plot_projection(chosen, rows, path, method), chosen, missing
