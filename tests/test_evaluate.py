"""Tests for evaluate.py: similarity, analogy, neighbours, loading, projector export, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import evaluate  # noqa: E402


def brute_cosine(u, v):
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


@pytest.fixture
def small_space():
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(40)]
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    return words, vectors


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- load_pairs

def test_load_pairs_skips_header_comments_and_blank_lines(tmp_path):
    path = write(tmp_path / "pairs.tsv",
                 "# a comment\n\nword1\tword2\tscore\nA\tb\t1.5\n# middle\nc\td\t-2\n\n")
    assert evaluate.load_pairs(path) == [("A", "b", 1.5), ("c", "d", -2.0)]


def test_load_pairs_without_header_keeps_first_row(tmp_path):
    path = write(tmp_path / "pairs.tsv", "a\tb\t3\nc\td\t4\n")
    assert evaluate.load_pairs(path) == [("a", "b", 3.0), ("c", "d", 4.0)]


def test_load_pairs_rejects_non_numeric_score_after_first_row(tmp_path):
    path = write(tmp_path / "pairs.tsv", "a\tb\t3\nc\td\tlots\n")
    with pytest.raises(evaluate.EvaluationInputError, match=":2:"):
        evaluate.load_pairs(path)


# ---------------------------------------------------------------- similarity

def test_similarity_matches_scipy_spearman_on_cosines(tmp_path, small_space):
    words, vectors = small_space
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(25):
        i, j = rng.choice(len(words), size=2, replace=False)
        rows.append((words[i], words[j], float(rng.uniform(0, 10))))
    # Upper-case copies must be found because lowercase=True; one OOV pair.
    text = "word1\tword2\tscore\n" + "".join(f"{a.upper()}\t{b}\t{s}\n" for a, b, s in rows)
    text += "unknown\tw1\t5\n"
    path = write(tmp_path / "pairs.tsv", text)

    result = evaluate.similarity(words, vectors, evaluate.load_pairs(path))

    index = {w: i for i, w in enumerate(words)}
    cosines = [brute_cosine(vectors[index[a]], vectors[index[b]]) for a, b, _ in rows]
    expected = spearmanr(cosines, [s for _, _, s in rows]).statistic
    assert result["spearman"] == pytest.approx(expected, abs=1e-12)
    assert result["pairs"] == 25
    assert result["oov"] == 1
    assert result["oov_handling"] == "skipped"


def test_similarity_case_sensitive_when_lowercase_off(small_space):
    words, vectors = small_space
    pairs = [("W1", "w2", 1.0), ("w3", "w4", 2.0), ("w5", "w6", 3.0)]
    result = evaluate.similarity(words, vectors, pairs, lowercase=False)
    assert result["pairs"] == 2 and result["oov"] == 1


def test_similarity_embeds_oov_words_with_embed_fn(small_space):
    words, vectors = small_space
    extra = {"new1": vectors[1] * 2.0, "new2": -vectors[2]}
    calls = []

    def embed_fn(batch):
        calls.append(list(batch))
        return np.stack([extra[w] for w in batch])

    pairs = [("new1", "w3", 1.0), ("w4", "new2", 2.0), ("w5", "w6", 0.5), ("new1", "new2", 3.0)]
    result = evaluate.similarity(words, vectors, pairs, embed_fn=embed_fn)
    cosines = [brute_cosine(vectors[1], vectors[3]), brute_cosine(vectors[4], -vectors[2]),
               brute_cosine(vectors[5], vectors[6]), brute_cosine(vectors[1], -vectors[2])]
    assert result["spearman"] == pytest.approx(spearmanr(cosines, [1, 2, 0.5, 3]).statistic)
    assert result["pairs"] == 4
    assert result["oov"] == 2  # distinct words embedded
    assert result["oov_handling"] == "embedded"
    assert sorted(calls[0]) == ["new1", "new2"]


# ---------------------------------------------------------------- analogy

def make_analogy_space(num_pairs=6, noise_words=10, dim=64, seed=0):
    """Words x_i and y_i = x_i + offset (orthogonal random directions): x_i:y_i :: x_j:y_j."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(dim, num_pairs + noise_words + 1)))
    offset = basis[:, 0]
    words, rows = [], []
    for i in range(num_pairs):
        words += [f"x{i}", f"y{i}"]
        rows += [basis[:, 1 + i], basis[:, 1 + i] + offset]
    for k in range(noise_words):
        words.append(f"noise{k}")
        rows.append(basis[:, 1 + num_pairs + k])
    return words, np.asarray(rows, dtype=np.float32)


def write_questions(path, num_pairs=6):
    lines = [": pairs-forward"]
    for i in range(num_pairs):
        for j in range(num_pairs):
            if i != j:
                lines.append(f"X{i} Y{i} X{j} Y{j}")
    lines.append(": pairs-backward")
    for i in range(num_pairs):
        for j in range(num_pairs):
            if i != j:
                lines.append(f"y{i} x{i} y{j} x{j}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("method", ["3cosadd", "3cosmul"])
def test_analogy_exact_offsets_give_full_accuracy(tmp_path, method):
    words, vectors = make_analogy_space()
    path = write_questions(tmp_path / "questions.txt")
    result = evaluate.analogy(words, vectors, path, method=method)
    assert result["accuracy"] == 1.0
    assert result["questions"] == 2 * 6 * 5
    assert result["oov"] == 0
    assert set(result["sections"]) == {"pairs-forward", "pairs-backward"}
    assert all(s["accuracy"] == 1.0 and s["questions"] == 30 for s in result["sections"].values())


def brute_force_analogy(words, vectors, question, method):
    """Straightforward per-question reference: loop over every candidate word."""
    unit = [v / np.linalg.norm(v) for v in vectors]
    ids = [words.index(w) for w in question[:3]]
    best, best_score = None, -np.inf
    for d, vector in enumerate(unit):
        if d in ids:
            continue
        cos = [float(np.dot(vector, unit[i])) for i in ids]
        if method == "3cosadd":
            score = cos[1] - cos[0] + cos[2]
        else:
            shifted = [(c + 1) / 2 for c in cos]
            score = shifted[1] * shifted[2] / (shifted[0] + 1e-3)
        if score > best_score:
            best, best_score = d, score
    return words[best]


@pytest.mark.parametrize("method,table_limit", [
    ("3cosadd", None), ("3cosmul", None),
    ("3cosmul", 0),  # no precomputed cosine table: per-batch matrix products
])
def test_analogy_matches_brute_force_on_random_vectors(tmp_path, method, table_limit, small_space,
                                                       monkeypatch):
    words, vectors = small_space
    rng = np.random.default_rng(7)
    questions = [tuple(words[i] for i in rng.choice(30, size=4, replace=False)) for _ in range(60)]
    # Words w30..w39 fall outside restrict_vocab=30: those questions are OOV.
    questions += [("w1", "w2", "w3", "w35"), ("w31", "w2", "w3", "w4")]
    path = tmp_path / "q.txt"
    path.write_text(": random\n" + "".join(" ".join(q) + "\n" for q in questions))
    # Small batches so that several batches (and a ragged last one) are used.
    monkeypatch.setattr(evaluate, "ANALOGY_BATCH", 7)
    if table_limit is not None:
        monkeypatch.setattr(evaluate, "COSMUL_TABLE_MAX_ELEMENTS", table_limit)

    result = evaluate.analogy(words, vectors, path, restrict_vocab=30, method=method)

    restricted_words, restricted = words[:30], vectors[:30]
    expected = np.mean([brute_force_analogy(restricted_words, restricted, q, method) == q[3]
                        for q in questions[:60]])
    assert result["questions"] == 60
    assert result["oov"] == 2
    assert result["accuracy"] == pytest.approx(expected)


def test_analogy_rejects_unknown_method(tmp_path):
    words, vectors = make_analogy_space()
    with pytest.raises(ValueError):
        evaluate.analogy(words, vectors, write_questions(tmp_path / "q.txt"), method="cosine")


# ---------------------------------------------------------------- neighbours

def test_neighbors_on_tiny_example():
    words = ["cat", "dog", "car", "truck", "zero"]
    vectors = np.array([[1.0, 0.1, 0.0], [0.9, 0.2, 0.0], [0.0, 1.0, 0.1],
                        [0.1, 0.9, 0.3], [0.0, 0.0, 0.0]])
    result = evaluate.neighbors(words, vectors, ["cat", "truck", "Dog", "missing"], topn=2)
    assert [w for w, _ in result["cat"]] == ["dog", "truck"]
    assert result["cat"][0][1] == pytest.approx(brute_cosine(vectors[0], vectors[1]))
    assert [w for w, _ in result["truck"]] == ["car", "dog"]
    assert result["Dog"] == []  # case-sensitive by default
    assert result["missing"] == []
    lowered = evaluate.neighbors(words, vectors, ["Dog"], topn=10, lowercase=True)
    # topn is capped by the vocabulary minus the query itself; the zero vector ranks last.
    assert [w for w, _ in lowered["Dog"]] == ["cat", "truck", "car", "zero"]


def test_neighbors_embeds_oov_query():
    words = ["a", "b", "c"]
    vectors = np.eye(3)
    result = evaluate.neighbors(words, vectors, ["new"], topn=1,
                                embed_fn=lambda batch: np.array([[0.1, 0.0, 1.0]]))
    assert result["new"][0][0] == "c"


# ---------------------------------------------------------------- all-but-the-top

def test_all_but_the_top_matches_svd_reference():
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(60, 6)) * [5, 3, 2, 1, 1, 1] + 4.0  # a shared offset, unequal variances
    transform = evaluate.all_but_the_top(vectors, 2)
    centred = vectors - vectors.mean(0)
    top = np.linalg.svd(centred, full_matrices=False)[2][:2]  # reference: the top right singular vectors
    expected = centred - centred @ top.T @ top
    np.testing.assert_allclose(transform(vectors), expected, atol=1e-4)
    query = rng.normal(size=(3, 6))  # rows outside the table get the same map
    np.testing.assert_allclose(transform(query), (query - vectors.mean(0)) @ (np.eye(6) - top.T @ top), atol=1e-4)
    np.testing.assert_allclose(evaluate.all_but_the_top(vectors, 0)(vectors), centred, atol=1e-4)


def test_all_but_the_top_reveals_neighbours_hidden_by_a_common_direction():
    # word pairs (a_k, b_k) share a direction; every word also has a component along one common
    # axis, of sizes spread over three orders of magnitude, which decides raw cosines
    rng = np.random.default_rng(1)
    n_pairs, dim = 20, 16
    shared = rng.normal(size=(n_pairs, dim - 1))
    structure = np.repeat(shared, 2, axis=0) + 0.1 * rng.normal(size=(2 * n_pairs, dim - 1))
    common = 10 ** rng.uniform(0, 3, size=(2 * n_pairs, 1))
    vectors = np.hstack([common, structure])
    words = [f"{side}{k}" for k in range(n_pairs) for side in "ab"]

    def pairs_found(table):
        found = evaluate.neighbors(words, table, [f"a{k}" for k in range(n_pairs)], topn=1)
        return sum(found[f"a{k}"][0][0] == f"b{k}" for k in range(n_pairs))
    assert pairs_found(vectors) < n_pairs // 2
    assert pairs_found(evaluate.all_but_the_top(vectors, 1)(vectors)) == n_pairs


def test_post_processing_maps_out_of_vocabulary_queries_like_the_table():
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(30)]
    vectors = rng.normal(size=(30, 5)).astype(np.float32) + 3.0
    table, embed_fn = evaluate._post_processed(vectors, lambda batch: vectors[[7] * len(batch)], 1)
    found = evaluate.neighbors(words, table, ["unseen"], topn=1, embed_fn=embed_fn)
    assert found["unseen"][0][0] == "w7"
    assert found["unseen"][0][1] == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------- loading and export

def save_word2vec(path: Path, words, vectors) -> Path:
    """gensim's word2vec file of the vectors: binary when the name ends in .bin."""
    from gensim.models import KeyedVectors

    keyed = KeyedVectors(vector_size=vectors.shape[1])
    keyed.add_vectors(words, vectors)
    keyed.save_word2vec_format(str(path), binary=path.suffix == ".bin")
    return path


@pytest.mark.parametrize("name", ["vectors.txt", "vectors.bin"])
def test_word2vec_round_trip(tmp_path, name, small_space):
    words, vectors = small_space
    path = save_word2vec(tmp_path / name, words, vectors)

    loaded_words, loaded = evaluate.load_vectors(path)
    assert loaded_words == words
    assert loaded.dtype == np.float32
    np.testing.assert_allclose(loaded, vectors, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vectors.txt", "vectors.bin"])
def test_load_vectors_refuses_more_words_than_the_header_announces(tmp_path, name, small_space):
    words, vectors = small_space
    raw = save_word2vec(tmp_path / name, words, vectors).read_bytes()
    header_end = raw.index(b"\n")
    short = tmp_path / f"short-{name}"
    short.write_bytes(f"{len(words) - 1} {vectors.shape[1]}".encode() + raw[header_end:])
    with pytest.raises(evaluate.EvaluationInputError, match=f"more than the {len(words) - 1} words its header"):
        evaluate.load_vectors(short)
    trailing = tmp_path / f"trailing-{name}"  # a last newline, or blank lines, are not more words
    trailing.write_bytes(raw + b"\n\n")
    assert evaluate.load_vectors(trailing)[0] == words


def test_non_finite_vectors_are_refused_naming_the_first_word(tmp_path, small_space):
    import torch

    words, vectors = small_space
    vectors = vectors.copy()
    vectors[[12, 30], 3] = [np.inf, np.nan]
    path = tmp_path / "vectors.txt"
    path.write_text(f"{len(words)} {vectors.shape[1]}\n" + "".join(
        f"{word} {' '.join(map(str, row))}\n" for word, row in zip(words, vectors)))
    with pytest.raises(evaluate.EvaluationInputError, match=r"'w12' \(word 13\) and 1 more holds NaN or infinite"):
        evaluate.load_vectors(path)
    state = {"in_embed.weight": torch.from_numpy(vectors), "out_embed.weight": torch.zeros(vectors.shape)}
    checkpoint = {"model_name": "sgns", "model": state, "words": words, "args": {"embed_size": vectors.shape[1]}}
    with pytest.raises(evaluate.EvaluationInputError, match="'w12'"):
        evaluate.load_checkpoint(checkpoint)


def test_load_vectors_missing_file(tmp_path):
    with pytest.raises(evaluate.EvaluationInputError, match="not found"):
        evaluate.load_vectors(tmp_path / "absent.txt")


def test_load_checkpoint_reads_sgns_state(tmp_path, small_space):
    import torch

    words, vectors = small_space
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Embedding-shaped state dict as SGNS saves it; the evaluator must find
    # the center vectors whether model.py can rebuild the model or not.
    state = {"in_embed.weight": torch.from_numpy(vectors),
             "out_embed.weight": torch.zeros_like(torch.from_numpy(vectors))}
    torch.save({"format": 1, "model_name": "sgns", "model": state, "words": words,
                "counts": list(range(len(words), 0, -1)),
                "args": {"embed_size": 8, "lowercase": False, "model": "sgns"},
                "corpus_hash": "x", "epoch": 1}, run_dir / "checkpoint.pt")
    try:
        loaded_words, loaded, embed_fn, lowercase = evaluate.load_checkpoint(run_dir)
    except evaluate.EvaluationInputError as error:
        if "rebuild" in str(error):
            pytest.skip(f"model.py cannot rebuild this minimal checkpoint: {error}")
        raise
    assert loaded_words == words
    np.testing.assert_allclose(loaded, vectors)
    assert embed_fn is None
    assert lowercase is False


def test_cli_checkpoint_neighbors_and_curves(tmp_path, capsys):
    import torch

    words, vectors = make_analogy_space()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    state = {"in_embed.weight": torch.from_numpy(vectors),
             "out_embed.weight": torch.zeros_like(torch.from_numpy(vectors))}
    history = {"Train loss": [[1, 3.0], [2, 2.5], [3, 2.2]], "PIP loss": [[1, 40.0], [3, 20.0]],
               "Epoch time": [[1, 5.0], [2, 5.0], [3, 5.0]]}
    torch.save({"format": 1, "model_name": "sgns", "model": state, "words": words,
                "counts": list(range(len(words), 0, -1)), "args": {"embed_size": vectors.shape[1]},
                "corpus_hash": "x", "epoch": 3, "history": history}, run_dir / "checkpoint.pt")
    try:
        code = evaluate.main(["--checkpoint", str(run_dir), "--no-default-eval", "--json",
                              "--neighbors", "X0", "--topn", "1", "--plot-curves"])
    except SystemExit as error:  # model.py may refuse this minimal checkpoint
        pytest.skip(f"checkpoint not loadable here: exit {error.code}")
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["neighbors"]["X0"][0][0] == "y0"  # lowercased: the run lowercased its corpus
    assert report["curves"]["tags"] == ["Train loss", "PIP loss"]
    assert (run_dir / "training-curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_checkpoint_rejects_garbage(tmp_path):
    path = write(tmp_path / "checkpoint.pt", "not a checkpoint")
    with pytest.raises(evaluate.EvaluationInputError):
        evaluate.load_checkpoint(path)


# ---------------------------------------------------------------- CLI

def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


@pytest.fixture
def word2vec_file(tmp_path):
    return save_word2vec(tmp_path / "vectors.txt", *make_analogy_space())


def test_cli_json_output(tmp_path, word2vec_file):
    pairs = write(tmp_path / "mini.tsv", "word1\tword2\tscore\nx0\ty0\t9\nx1\tnoise1\t1\n"
                                         "y2\tx2\t8\nx3\tnope\t2\n")
    questions = write_questions(tmp_path / "questions.txt")
    result = run_cli("--vectors", word2vec_file, "--similarity", pairs, "--analogy", questions,
                     "--analogy-method", "3cosmul", "--neighbors", "x0", "--topn", "3", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"mini", "analogy", "neighbors"}
    assert report["mini"]["pairs"] == 3 and report["mini"]["oov"] == 1
    assert isinstance(report["mini"]["spearman"], float)
    assert report["analogy"]["accuracy"] == 1.0
    assert report["analogy"]["questions"] == 60
    assert report["neighbors"]["x0"][0][0] == "y0"
    assert len(report["neighbors"]["x0"]) == 3
    processed = json.loads(run_cli("--vectors", word2vec_file, "--neighbors", "x0", "--topn", "3",
                                   "--no-default-eval", "--remove-top", "1", "--json").stdout)
    words, vectors = evaluate.load_vectors(word2vec_file)
    expected = evaluate.neighbors(words, evaluate.all_but_the_top(vectors, 1)(vectors), ["x0"], topn=3)
    assert [w for w, _ in processed["neighbors"]["x0"]] == [w for w, _ in expected["x0"]]
    assert processed["neighbors"]["x0"] != report["neighbors"]["x0"]


def test_cli_table_output_plot_and_projector(tmp_path, word2vec_file):
    questions = write_questions(tmp_path / "questions.txt")
    plot_path = tmp_path / "proj.png"
    result = run_cli("--vectors", word2vec_file, "--analogy", questions, "--neighbors", "x1",
                     "--plot-words", "x0", "y0", "x1", "y1", "unknownword",
                     "--plot-out", plot_path, "--export-projector", tmp_path / "tb")
    assert result.returncode == 0, result.stderr
    assert "accuracy 1.000" in result.stdout
    assert "x1:" in result.stdout
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "tb" / "metadata.tsv").read_text().split("\n")[0] == "x0"


@pytest.mark.parametrize("args", [
    ["--vectors", "does-not-exist.txt"],
    ["--checkpoint", "no-such-run-dir"],
    ["--vectors", "{vectors}", "--similarity", "missing.tsv"],
    ["--vectors", "{vectors}", "--analogy", "missing.txt"],
    ["--vectors", "{vectors}", "--similarity", "{badpairs}"],
    ["--vectors", "{vectors}", "--plot-words", "nope1", "nope2"],
    ["--vectors", "{vectors}", "--topn", "0"],
    ["--vectors", "{vectors}", "--remove-top", "-1"],
    ["--vectors", "{vectors}", "--plot-curves"],
    ["--vectors", "{vectors}", "--export-projector", "{vectors}"],  # a file, not a folder
    ["--vectors", "{garbage}"],
    ["--checkpoint", "{garbage}"],
    ["--checkpoint", "{empty}"],
    ["--vectors", "{nan}", "--json", "--neighbors", "x0"],
    ["--vectors", "{short}"],
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, word2vec_file, args, capsys, monkeypatch):
    # In-process (a subprocess per case costs seconds of imports): any exception
    # other than SystemExit(2) would fail the test, i.e. no traceback reaches users.
    garbage = write(tmp_path / "garbage.bin", "\x00\x01 this is not a vector file")
    badpairs = write(tmp_path / "bad.tsv", "a\tb\t1\nc\td\tnot-a-number\n")
    empty = write(tmp_path / "empty.pt", "")
    lines = word2vec_file.read_text().splitlines()
    nan = write(tmp_path / "nan.txt", "\n".join(lines[:3] + [lines[3].split()[0] + " nan" * int(lines[0].split()[1])]
                                                + lines[4:]) + "\n")
    short = write(tmp_path / "short.txt", "\n".join([f"5 {lines[0].split()[1]}"] + lines[1:]) + "\n")
    args = [a.format(vectors=word2vec_file, garbage=garbage, badpairs=badpairs, empty=empty, nan=nan, short=short)
            for a in args]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error


def main_exit(args, capsys):
    """(exit code, stderr) of evaluate.main(args), in process."""
    try:
        code = evaluate.main([str(a) for a in args])
    except SystemExit as error:
        code = error.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("output", [
    ["--plot-words", "x0", "y0", "--plot-out", "{vectors}"],
    ["--plot-words", "x0", "y0", "--plot-out", "{link}"],  # a link to the vectors, resolved
    ["--plot-words", "x0", "y0", "--plot-out", "{pairs}"],
    ["--export-projector", "{folder}"],  # its vectors.tsv is the vectors file
])
def test_an_output_over_an_input_is_refused_before_anything_is_read(tmp_path, word2vec_file, output, capsys,
                                                                    monkeypatch):
    folder = tmp_path / "tb"
    folder.mkdir()
    vectors = folder / "vectors.tsv"
    vectors.write_bytes(word2vec_file.read_bytes())
    link = tmp_path / "link.png"
    link.symlink_to(vectors)
    pairs = write(tmp_path / "pairs.tsv", "x0\ty0\t9\nx1\ty2\t1\n")
    before = {path: path.read_bytes() for path in (vectors, pairs)}
    monkeypatch.setattr(evaluate, "load_vectors", lambda *a: pytest.fail("read before the paths were checked"))
    args = ["--vectors", vectors, "--similarity", pairs] + [
        str(a).format(vectors=vectors, link=link, pairs=pairs, folder=folder) for a in output]
    code, err = main_exit(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "choose another output path" in err, err
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png", "pairs.tsv", "tb", "vectors.txt"]
    assert sorted(p.name for p in folder.iterdir()) == ["vectors.tsv"]


def test_a_plot_of_a_checkpoint_never_replaces_the_run_files(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"x")
    (run_dir / "args.json").write_text("{}")
    code, err = main_exit(["--checkpoint", run_dir, "--no-default-eval", "--plot-words", "a", "b",
                           "--plot-out", run_dir / "args.json"], capsys)
    assert code == 2 and "the run's args.json" in err and len(err.strip().splitlines()) == 1
    assert (run_dir / "args.json").read_text() == "{}"


@pytest.mark.parametrize("which", ["--vectors", "--similarity", "--analogy", "--checkpoint"])
def test_a_fifo_or_a_folder_as_input_is_one_line_exit_2_without_blocking(tmp_path, word2vec_file, which, capsys):
    import os
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    source = ["--checkpoint", fifo] if which == "--checkpoint" else \
        ["--vectors", fifo] if which == "--vectors" else ["--vectors", word2vec_file, which, fifo]
    code, err = main_exit(source, capsys)
    assert code == 2 and "not a regular file" in err and str(fifo) in err and len(err.strip().splitlines()) == 1
    if which in ("--similarity", "--analogy"):
        code, err = main_exit(["--vectors", word2vec_file, which, tmp_path], capsys)
        assert code == 2 and "is a folder" in err and len(err.strip().splitlines()) == 1


def test_the_trainer_loaders_refuse_a_fifo_too(tmp_path):
    import os
    fifo = tmp_path / "pairs.tsv"
    os.mkfifo(fifo)
    for load in (evaluate.load_pairs, evaluate.load_analogies):
        with pytest.raises(evaluate.EvaluationInputError, match="not a regular file"):
            load(fifo)


@pytest.mark.parametrize("score", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_a_score_that_is_not_finite_is_refused_naming_its_line(tmp_path, score):
    path = write(tmp_path / "pairs.tsv", f"word1\tword2\tscore\na\tb\t1\nc\td\t{score}\n")
    with pytest.raises(evaluate.EvaluationInputError, match=rf"pairs.tsv:3: score '{score}' is not a finite number"):
        evaluate.load_pairs(path)


@pytest.mark.parametrize("content, flag", [("", "--similarity"), ("word1\tword2\tscore\n", "--similarity"),
                                           ("# only a comment\n\n", "--similarity"),
                                           ("nan\tb\tnan\n", "--similarity"),
                                           (": family\n", "--analogy"), ("", "--analogy")])
def test_empty_header_only_or_nan_evaluation_files_are_one_line_exit_2(tmp_path, word2vec_file, content, flag,
                                                                       capsys):
    path = write(tmp_path / "eval.txt", content)
    code, err = main_exit(["--vectors", word2vec_file, flag, path, "--json"], capsys)
    assert code == 2 and str(path) in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name", ["vectors.txt", "vectors.bin"])
def test_a_word_listed_twice_keeps_its_first_vector_with_a_warning(tmp_path, name, small_space):
    words, vectors = small_space
    listed = list(zip(words, vectors))
    listed.insert(5, ("w3", vectors[7]))  # w3 again, with another vector
    if name.endswith(".bin"):  # a binary record is "word " then d float32s
        body = b"".join(word.encode() + b" " + vector.tobytes() for word, vector in listed)
    else:
        body = "".join(f"{word} {' '.join(map(str, vector))}\n" for word, vector in listed).encode()
    path = tmp_path / name
    path.write_bytes(f"{len(listed)} {vectors.shape[1]}\n".encode() + body)
    warned = []
    loaded_words, loaded = evaluate.load_vectors(path, warn=warned.append)
    assert loaded_words == words and loaded.shape == vectors.shape
    np.testing.assert_allclose(loaded, vectors, rtol=1e-5, atol=1e-5)  # w3 keeps its first vector
    assert len(warned) == 1 and "'w3'" in warned[0] and "first vector" in warned[0]


def test_a_zero_words_header_is_a_clear_error(tmp_path, capsys):
    path = write(tmp_path / "zero.txt", "0 0\n")
    code, err = main_exit(["--vectors", path, "--no-default-eval", "--neighbors", "a"], capsys)
    assert code == 2 and "holds no vectors" in err and "--remove-top" not in err
    assert len(err.strip().splitlines()) == 1


def test_ctrl_c_is_one_line_exit_130(tmp_path, word2vec_file, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "similarity", interrupted)
    pairs = write(tmp_path / "pairs.tsv", "x0\ty0\t9\nx1\ty2\t1\n")
    code, err = main_exit(["--vectors", word2vec_file, "--similarity", pairs], capsys)
    assert code == 130 and err.strip() == "evaluate.py: interrupted; files already written are complete"


# ---------------------------------------------------------------- --embed WORDS --export OUT

def sgns_checkpoint_dir(tmp_path, words, vectors):
    import torch

    run_dir = tmp_path / "sgns-run"
    run_dir.mkdir()
    state = {"in_embed.weight": torch.from_numpy(vectors), "out_embed.weight": torch.zeros(vectors.shape)}
    torch.save({"format": 1, "model_name": "sgns", "model": state, "words": words,
                "args": {"embed_size": vectors.shape[1]}}, run_dir / "checkpoint.pt")
    return run_dir


def test_embed_writes_the_listed_words_in_order(tmp_path, small_space):
    words, vectors = small_space
    run_dir = sgns_checkpoint_dir(tmp_path, words, vectors)
    listed = write(tmp_path / "words.txt", "w7\n\n  w2 \nW7\nw39\n")
    out = tmp_path / "out.txt"
    assert evaluate.main(["--checkpoint", str(run_dir), "--embed", str(listed), "--export", str(out)]) == 0
    got_words, got = evaluate.load_vectors(out)
    assert got_words == ["w7", "w2", "W7", "w39"]  # as listed: blank lines and spaces around words dropped
    np.testing.assert_allclose(got, vectors[[7, 2, 7, 39]], atol=1e-6)


@pytest.mark.parametrize("listed,flags,message", [
    ("w1\nunseen1\nw2\nunseen2\n", [], "2 word(s) not in the vocabulary"),
    ("\n\n", [], "no words"),
    ("w1 w2\n", [], "holds a space"),
    (None, [], "--embed word list not found"),
    ("w1\n", ["--export"], "go together"),
    ("w1\n", ["--outdir"], "is a folder"),
])
def test_embed_errors_are_one_line_exit_2_with_nothing_written(tmp_path, small_space, capsys, listed, flags,
                                                               message):
    words, vectors = small_space
    run_dir = sgns_checkpoint_dir(tmp_path, words, vectors)
    words_file = tmp_path / "words.txt"
    if listed is not None:
        write(words_file, listed)
    out = tmp_path / "out.txt"
    argv = ["--checkpoint", str(run_dir), "--embed", str(words_file), "--export", str(out)]
    if flags == ["--export"]:  # --embed alone
        argv = argv[:4]
    elif flags == ["--outdir"]:
        argv[-1] = str(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error
    if "not in the vocabulary" in message:
        assert "unseen1 unseen2" in error
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["sgns-run"] + (["words.txt"] if listed is not None else []))


def test_query_words_are_folded_as_the_corpus_was_read():
    """'İstanbul' and a decomposed 'café' find the words the corpus reader made of them."""
    import data
    words = data.tokenize("İstanbul cafe\u0301 ok")
    vectors = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    found = evaluate.neighbors(words, vectors, ["İstanbul", "CAFE\u0301", "Ok"], topn=1, lowercase=True)
    assert words[:2] == ["istanbul", "café"] and all(found[word] for word in found), found
    result = evaluate.similarity(words, vectors, [("İSTANBUL", "Café", 5.0), ("ok", "café", 1.0),
                                                  ("istanbul", "ok", 3.0)], lowercase=True)
    assert result["pairs"] == 3
