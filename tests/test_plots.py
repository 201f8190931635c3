"""Tests for plots.py: PNGs are written atomically, valid and not blank."""

import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_nonblank_png(path: Path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    flat = pixels.reshape(-1, pixels.shape[2])
    assert flat.var(axis=0).sum() > 0
    assert len(np.unique(flat, axis=0)) > 2
    # No temporary file is left behind next to the plot.
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_training_curves_all_tags(tmp_path):
    history = {
        "Train loss": [(1, 3.2), (2, 2.9), (3, 2.7)],
        "PIP loss": [(1, 900.0), (2, 400.0), (3, 10.0)],
        "PIP loss (oracle)": [(1, 0.5), (2, 0.4), (3, 0.35)],
    }
    path = plots.plot_training_curves(history, tmp_path / "curves" / "loss.png")
    assert path == tmp_path / "curves" / "loss.png"
    assert_valid_nonblank_png(path)


def test_training_curves_subset_and_overwrite(tmp_path):
    path = tmp_path / "loss.png"
    path.write_bytes(b"old contents")
    plots.plot_training_curves({"Train loss": [(1, 1.0), (2, 0.5)], "PIP loss": []}, path)
    assert_valid_nonblank_png(path)


def test_training_curves_ignores_other_tags_by_default(tmp_path):
    # The trainer's history also holds epoch time etc.; only loss panels are drawn.
    history = {"Train loss": [(1, 1.0), (2, 0.5)], "Epoch time": [(1, 9.0), (2, 8.0)],
               "Learning rate": [(1, 0.02), (2, 0.01)]}
    both = plots.plot_training_curves(history, tmp_path / "a.png")
    alone = plots.plot_training_curves({"Train loss": history["Train loss"]}, tmp_path / "b.png")
    assert (matplotlib.image.imread(str(both)).shape
            == matplotlib.image.imread(str(alone)).shape)
    chosen = plots.plot_training_curves(history, tmp_path / "c.png",
                                        tags=["Train loss", "Epoch time"])
    assert (matplotlib.image.imread(str(chosen)).shape[1]
            > 1.5 * matplotlib.image.imread(str(alone)).shape[1])
    with pytest.raises(plots.PlotError):
        plots.plot_training_curves({"Epoch time": [(1, 9.0)]}, tmp_path / "d.png")


def test_training_curves_width_follows_panel_count(tmp_path):
    one = plots.plot_training_curves({"Train loss": [(1, 1.0), (2, 0.5)]}, tmp_path / "a.png")
    three = plots.plot_training_curves({"Train loss": [(1, 1.0)], "PIP loss": [(1, 2.0)],
                                        "PIP loss (oracle)": [(1, 3.0)]}, tmp_path / "b.png")
    assert (matplotlib.image.imread(str(three)).shape[1]
            > 2 * matplotlib.image.imread(str(one)).shape[1])


def test_training_curves_empty_history_is_an_error(tmp_path):
    with pytest.raises(plots.PlotError):
        plots.plot_training_curves({"Train loss": []}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_pca_projection_matches_reference():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    coords = plots.project_2d(vectors, "pca")
    # Reference: eigenvectors of the covariance matrix, largest two.
    centred = vectors - vectors.mean(axis=0)
    values, vecs = np.linalg.eigh(centred.T @ centred)
    reference = centred @ vecs[:, np.argsort(values)[::-1][:2]]
    for k in range(2):  # each principal axis is defined up to sign
        assert np.allclose(np.abs(coords[:, k]), np.abs(reference[:, k]), atol=1e-8)


def test_projection_plot_pca(tmp_path):
    rng = np.random.default_rng(1)
    words = ["harry", "ron", "hermione", "dumbledore", "snape", "wand"]
    path = plots.plot_projection(words, rng.normal(size=(6, 10)), tmp_path / "proj.png")
    assert_valid_nonblank_png(path)


def test_projection_tsne_without_sklearn_says_use_pca(tmp_path, monkeypatch):
    try:
        import sklearn  # noqa: F401
        pytest.skip("scikit-learn is installed; the missing-dependency message cannot show")
    except ImportError:
        pass
    with pytest.raises(plots.PlotError, match="pca"):
        plots.plot_projection(["a", "b", "c"], np.eye(3), tmp_path / "t.png", method="tsne")
    assert not (tmp_path / "t.png").exists()


def test_projection_rejects_bad_input(tmp_path):
    with pytest.raises(plots.PlotError):
        plots.plot_projection(["a", "b"], np.eye(3), tmp_path / "p.png")
    with pytest.raises(plots.PlotError):
        plots.plot_projection(["a"], np.eye(1), tmp_path / "p.png")
    with pytest.raises(plots.PlotError):
        plots.plot_projection(["a", "b"], np.eye(2), tmp_path / "p.png", method="umap")


def test_plot_words_lowercases_and_embeds_unseen_words_where_the_model_can(tmp_path):
    """trainer.py and evaluate.py draw words through plot_words: the same case handling, and a word
    outside the vocabulary gets the model's vector from its spelling (rnn) or is left out."""
    words, vectors = ["cat", "dog", "car"], np.arange(15, dtype=np.float32).reshape(3, 5)
    path, chosen, missing = plots.plot_words(["Cat", "DOG", "cats", "dog"], words, vectors, tmp_path / "a.png")
    assert chosen == ["cat", "dog"] and missing == ["cats"]
    assert_valid_nonblank_png(path)
    asked = []
    _, chosen, missing = plots.plot_words(["Cat", "cats"], words, vectors, tmp_path / "b.png",
                                          embed_fn=lambda ws: asked.extend(ws) or np.ones((len(ws), 5)))
    assert chosen == ["cat", "cats"] and missing == [] and asked == ["cats"]
    _, chosen, _ = plots.plot_words(["Cat", "cat", "dog"], ["Cat", "cat", "dog"], vectors, tmp_path / "c.png",
                                    lowercase=False)
    assert chosen == ["Cat", "cat", "dog"]
    with pytest.raises(plots.PlotError, match="cats"):
        plots.plot_words(["cat", "cats"], words, vectors, tmp_path / "d.png")
    assert not (tmp_path / "d.png").exists()
