"""bench/: every script is cited (README.md or bench/RESULTS.md) and runs: on a tiny input where that is
cheap, its --help otherwise (the measurements themselves take minutes to hours)."""
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name != "paths.py")


def test_every_bench_script_is_cited_in_the_readme_or_the_results():
    cited = (ROOT / "README.md").read_text() + (BENCH / "RESULTS.md").read_text()
    assert [name for name in SCRIPTS if name not in cited] == []


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_bench_script_answers_help(name, monkeypatch, capsys):
    """Run as a script (in this process: the imports are shared)."""
    monkeypatch.setattr(sys, "argv", [str(BENCH / name), "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / name), run_name="__main__")
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


def test_the_shared_paths_point_beside_the_repository():
    import paths
    assert paths.ROOT == ROOT and paths.SHARED == ROOT.parent / "shared"
    assert paths.GUTENBERG.parent.parent == paths.SHARED and paths.EVAL.parent == paths.SHARED


def test_pip_tracking_draws_the_loss_beside_the_scores(tmp_path):
    import bench_pip_tracking
    import plots
    history = {"PIP loss (normalized)": [(1, 0.7), (2, 0.5), (3, 0.4)],
               "Similarity/men3000": [(1, 0.25), (2, 0.35), (3, 0.41)],
               "Analogy accuracy": [(2, 0.07), (1, 0.03), (3, 0.09)], "Epoch time": [(1, 9.0)]}
    path = bench_pip_tracking.plot_loss_and_scores(history, "PIP loss (normalized)",
                                                   ["Similarity/men3000", "Analogy accuracy"],
                                                   tmp_path / "tracking.png", title="a run")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(plots.PlotError, match="Similarity/simlex999"):
        bench_pip_tracking.plot_loss_and_scores(history, "PIP loss (normalized)", ["Similarity/simlex999"],
                                                tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_rnn_bench_trains_and_scores_the_rnn_on_a_tiny_corpus(tmp_path, monkeypatch, capsys):
    import bench_rnn
    rng = np.random.default_rng(0)
    vocabulary = ["king", "queen", "man", "woman", "walked", "walking", "kindly", "kind", "happy", "unhappy"]
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(vocabulary, 12)) + "." for _ in range(400)))
    monkeypatch.setattr(sys, "argv", ["bench_rnn.py", "--dataset", str(corpus), "--cache-dir", str(tmp_path / "cache"),
                                      "--tools", "rnn", "--epochs", "1", "--threads", "1"])
    bench_rnn.main()
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("rnn "))
    assert len(row.split()) >= 10 and "nearest neighbours of words not in the vocabulary, rnn:" in out
    assert "unkindly:" in out  # a word the corpus lacks gets neighbours from its spelling


def test_distributed_bench_takes_the_first_books_up_to_its_word_count(tmp_path):
    import bench_distributed
    source = tmp_path / "books"
    source.mkdir()
    (source / "MANIFEST.tsv").write_text("file\twords_wc\na.txt\t300\nb.txt\t300\nc.txt\t300\n")
    for name in "abc":
        (source / f"{name}.txt").write_text("some words\n")
    (tmp_path / "subset").mkdir()
    folder, described = bench_distributed.corpus_subset(source, 500, tmp_path / "subset")
    assert sorted(p.name for p in folder.iterdir()) == ["a.txt", "b.txt"] and "600 words" in described
    assert bench_distributed.corpus_subset(source, 0, tmp_path / "unused") == (source, None)


def test_quality_bench_evaluates_a_vectors_file(tmp_path, capsys):
    import bench_quality
    import paths
    words = ["king", "queen", "man", "woman", "tiger", "cat", "car", "money", "bank", "love"]
    vectors = np.random.default_rng(0).normal(size=(len(words), 8))
    file = tmp_path / "vectors.txt"
    file.write_text(f"{len(words)} 8\n" + "".join(f"{w} {' '.join(f'{x:.5f}' for x in v)}\n"
                                                   for w, v in zip(words, vectors)))
    bench_quality.main(["--skip-gensim", "--ours-vectors", str(file), "--eval-dir", str(paths.EVAL), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert "ours" in json.dumps(report)
