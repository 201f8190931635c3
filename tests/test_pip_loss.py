"""pip_loss.py against straightforward dense / brute-force references."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pip_loss  # noqa: E402


def random_sparse(n, density, seed, symmetric=True):
    rng = np.random.default_rng(seed)
    dense = rng.random((n, n)) * (rng.random((n, n)) < density)
    if symmetric:
        dense = np.triu(dense) + np.triu(dense, 1).T
    return sp.csr_matrix(dense), dense


def dense_sppmi_loss(W, dense_M):
    W = np.asarray(W, dtype=np.float64)
    return float(np.mean((W @ W.T - dense_M) ** 2))


def dense_oracle_loss(E, F):
    return float(np.linalg.norm(E @ E.T - F @ F.T))


# ---------------------------------------------------------------------------------------------
# Losses

@pytest.mark.parametrize("zero_row", [False, True])
def test_losses_match_dense_reference(zero_row):
    M, dense = random_sparse(300, 0.05, seed=1)
    if zero_row:
        dense[7, :] = 0
        dense[:, 7] = 0
        M = sp.csr_matrix(dense)
        assert M[7].nnz == 0
    rng = np.random.default_rng(2)
    W = rng.standard_normal((300, 20)) * 0.3
    assert pip_loss.pip_loss_sppmi(W, M) == pytest.approx(dense_sppmi_loss(W, dense), rel=1e-6)
    E, F = rng.standard_normal((300, 20)), rng.standard_normal((300, 20))
    assert pip_loss.pip_loss_oracle(E, F) == pytest.approx(dense_oracle_loss(E, F), rel=1e-6)


def test_losses_near_cancellation_and_different_dims():
    # W W^T close to M: the three Frobenius terms nearly cancel, the hard case for accuracy.
    rng = np.random.default_rng(3)
    W = rng.standard_normal((300, 20))
    target = W @ W.T
    noise = rng.standard_normal((300, 300)) * 0.01
    dense = target + (noise + noise.T)
    assert pip_loss.pip_loss_sppmi(W, sp.csr_matrix(dense)) == pytest.approx(
        dense_sppmi_loss(W, dense), rel=1e-6)
    # The oracle loss compares Gram matrices, so the two embeddings may differ in width.
    E, F = W[:, :20] + 0.01 * rng.standard_normal((300, 20)), W[:, :15]
    assert pip_loss.pip_loss_oracle(E, F) == pytest.approx(dense_oracle_loss(E, F), rel=1e-6)


def test_losses_accept_torch_and_float32():
    torch = pytest.importorskip("torch")
    M, dense = random_sparse(120, 0.1, seed=4)
    W = torch.randn(120, 8, requires_grad=True)
    expected = dense_sppmi_loss(W.detach().double().numpy(), dense)
    assert pip_loss.pip_loss_sppmi(W, M.astype(np.float32)) == pytest.approx(expected, rel=1e-5)
    F = torch.randn(120, 8)
    assert pip_loss.pip_loss_oracle(W, F) == pytest.approx(
        dense_oracle_loss(W.detach().double().numpy(), F.double().numpy()), rel=1e-6)


def test_sppmi_loss_counts_duplicate_entries_once_summed():
    # A COO input with a repeated coordinate means the sum of the two values.
    coo = sp.coo_matrix(([1.0, 2.0, 4.0], ([0, 0, 1], [1, 1, 0])), shape=(3, 3))
    W = np.array([[1.0, 0.0], [0.5, 1.0], [0.0, 2.0]])
    assert pip_loss.pip_loss_sppmi(W, coo) == pytest.approx(dense_sppmi_loss(W, coo.toarray()), rel=1e-12)


def test_oracle_loss_is_zero_on_itself_and_rotation_invariant():
    rng = np.random.default_rng(5)
    E = rng.standard_normal((200, 10))
    assert pip_loss.pip_loss_oracle(E, E) == 0.0
    assert pip_loss.pip_loss_oracle(E, E.copy()) == 0.0
    rotation = np.linalg.qr(rng.standard_normal((10, 10)))[0]
    assert pip_loss.pip_loss_oracle(E @ rotation, E) == pytest.approx(0.0, abs=1e-9 * np.sum(E * E))


def dense_normalized_loss(E, F):
    """1 - Pearson r over the pairs i != j of (cosine in E, cosine in F); a zero row has cosine 0."""
    def cosines(X):
        norms = np.linalg.norm(X, axis=1)
        unit = X / np.where(norms > 0, norms, 1.0)[:, None]
        return unit @ unit.T
    off_diagonal = ~np.eye(len(E), dtype=bool)
    return float(1.0 - np.corrcoef(cosines(E)[off_diagonal], cosines(F)[off_diagonal])[0, 1])


@pytest.mark.parametrize("dims", [(20, 20), (20, 12)])
def test_normalized_loss_matches_dense_reference(dims):
    rng = np.random.default_rng(7)
    E, F = rng.standard_normal((250, dims[0])), rng.standard_normal((250, dims[1]))
    E[:, 0] += 2.0  # a common direction, as trained vectors have: cosines far from 0
    F[:, :3] += 0.5 * E[:, :3]  # something to agree on
    F[11] = 0.0  # a word without signal in the oracle
    expected = dense_normalized_loss(E, F)
    assert 0.2 < expected < 0.95
    assert pip_loss.pip_loss_normalized(E, F) == pytest.approx(expected, rel=1e-9)
    torch = pytest.importorskip("torch")
    assert pip_loss.pip_loss_normalized(torch.from_numpy(E).float(), F) == pytest.approx(
        dense_normalized_loss(E.astype(np.float32).astype(np.float64), F), rel=1e-6)


def test_normalized_loss_ignores_scale_rotation_and_a_common_direction():
    rng = np.random.default_rng(8)
    F = rng.standard_normal((300, 16))
    E = F @ rng.standard_normal((16, 16)) + rng.standard_normal((300, 16))
    reference = pip_loss.pip_loss_normalized(E, F)
    assert 0.1 < reference < 0.9
    rotation = np.linalg.qr(rng.standard_normal((16, 16)))[0]
    assert pip_loss.pip_loss_normalized(250.0 * E, F) == pytest.approx(reference, rel=1e-9)
    assert pip_loss.pip_loss_normalized(E, 0.01 * F) == pytest.approx(reference, rel=1e-9)
    assert pip_loss.pip_loss_normalized(E @ rotation, F) == pytest.approx(reference, rel=1e-9)
    # each word may grow at its own rate (frequent words' vectors grow faster): cosines stay
    row_scales = rng.uniform(0.1, 30.0, size=(300, 1))
    assert pip_loss.pip_loss_normalized(row_scales * E, F) == pytest.approx(reference, rel=1e-9)
    # where the unnormalized loss changes with the scale
    assert pip_loss.pip_loss_oracle(2.0 * E, F) != pytest.approx(pip_loss.pip_loss_oracle(E, F), rel=1e-3)
    # a cone: every cosine of F turns into a + b cosine (b > 0), which r does not see
    cone = np.hstack([np.full((300, 1), 4.0), F / np.linalg.norm(F, axis=1, keepdims=True)])
    assert pip_loss.pip_loss_normalized(cone, F) == pytest.approx(0.0, abs=1e-9)


def test_normalized_loss_is_zero_at_the_oracle_and_one_for_random_vectors():
    rng = np.random.default_rng(9)
    F = rng.standard_normal((400, 10))
    assert pip_loss.pip_loss_normalized(F, F) == pytest.approx(0.0, abs=1e-12)
    rotation = np.linalg.qr(rng.standard_normal((10, 10)))[0]
    assert pip_loss.pip_loss_normalized(3.0 * F @ rotation, F) == pytest.approx(0.0, abs=1e-9)
    noise = rng.standard_normal(F.shape)
    losses = [pip_loss.pip_loss_normalized(F + level * noise, F) for level in (0.05, 0.2, 0.5, 1.0, 3.0)]
    assert all(a < b for a, b in zip(losses, losses[1:]))
    assert pip_loss.pip_loss_normalized(rng.standard_normal((400, 50)), F) == pytest.approx(1.0, abs=0.05)
    assert pip_loss.pip_loss_normalized(np.ones((400, 10)), F) == 1.0  # all cosines equal: nothing to agree


def test_losses_reject_mismatched_shapes():
    M, _ = random_sparse(30, 0.1, seed=6)
    with pytest.raises(ValueError):
        pip_loss.pip_loss_sppmi(np.zeros((31, 4)), M)
    with pytest.raises(ValueError):
        pip_loss.pip_loss_oracle(np.zeros((30, 4)), np.zeros((29, 4)))
    with pytest.raises(ValueError):
        pip_loss.pip_loss_normalized(np.ones((30, 4)), np.ones((29, 4)))
    with pytest.raises(ValueError):
        pip_loss.pip_loss_normalized(np.eye(2), np.eye(2))


# ---------------------------------------------------------------------------------------------
# SPPMI

def brute_force_counts(sentences, vocab_size, window):
    counts = np.zeros((vocab_size, vocab_size))
    for sentence in sentences:
        for i, word in enumerate(sentence):
            for j in range(max(0, i - window), min(len(sentence), i + window + 1)):
                if j != i and word < vocab_size and sentence[j] < vocab_size:
                    counts[word, sentence[j]] += 1
    return counts


def brute_force_sppmi(counts, neg):
    total = counts.sum()
    rows, cols = counts.sum(axis=1), counts.sum(axis=0)
    result = np.zeros_like(counts)
    for w in range(counts.shape[0]):
        for c in range(counts.shape[1]):
            if counts[w, c] > 0:
                result[w, c] = max(math.log(counts[w, c] * total / (rows[w] * cols[c])) - math.log(neg), 0.0)
    return result


TINY_SENTENCES = [
    [0, 1, 2, 0, 3, 1, 0, 7],   # 7 >= vocab_size: skipped but keeps its position
    [2, 2, 4, 0],
    [5],
    [1, 0, 6, 3, 0, 1, 2, 4, 4, 0, 1],
]


def flatten(sentences):
    ids = np.array([w for s in sentences for w in s], dtype=np.uint32)
    starts = np.cumsum([0] + [len(s) for s in sentences[:-1]]).astype(np.int64)
    return ids, starts


@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("neg", [1, 2, 5])
def test_sppmi_matches_brute_force(window, neg):
    vocab_size = 6
    ids, starts = flatten(TINY_SENTENCES)
    counts = pip_loss.cooccurrence_counts(ids, vocab_size, window, starts)
    expected_counts = brute_force_counts(TINY_SENTENCES, vocab_size, window)
    np.testing.assert_array_equal(counts.toarray(), expected_counts)
    result = pip_loss.sppmi(ids, vocab_size, window, neg, sentence_starts=starts)
    assert isinstance(result, sp.csr_matrix) and result.shape == (vocab_size, vocab_size)
    np.testing.assert_allclose(result.toarray(), brute_force_sppmi(expected_counts, neg), rtol=1e-6, atol=1e-6)
    assert np.all(result.data > 0)  # no stored zeros


def test_sppmi_respects_sentence_boundaries_and_chunks():
    # Without boundaries the pair (0 at the end of sentence 0, 2 at the start of sentence 1)
    # would count; with them it must not.
    ids, starts = flatten([[1, 0], [2, 1]])
    with_bounds = pip_loss.cooccurrence_counts(ids, 3, 1, starts).toarray()
    without = pip_loss.cooccurrence_counts(ids, 3, 1, None).toarray()
    assert with_bounds[0, 2] == 0 and without[0, 2] == 1
    # Tiny chunks give the same counts as one chunk (pairs straddling a chunk edge included).
    ids, starts = flatten(TINY_SENTENCES * 5)
    whole = pip_loss.cooccurrence_counts(ids, 6, 3, starts)
    chunked = pip_loss.cooccurrence_counts(ids, 6, 3, starts, chunk_tokens=4)
    np.testing.assert_array_equal(whole.toarray(), chunked.toarray())


def test_sppmi_rejects_bad_arguments():
    ids, starts = flatten(TINY_SENTENCES)
    with pytest.raises(ValueError):
        pip_loss.sppmi(ids, 6, 2, 0, starts)
    with pytest.raises(ValueError):
        pip_loss.sppmi(ids, 6, 0, 5, starts)


# ---------------------------------------------------------------------------------------------
# Oracle embedding (iterative path forced by lowering the dense-SVD size limit)

def low_rank_plus_noise(n, rank, seed, symmetric=True):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((n, rank)))[0]
    values = 10.0 * 0.8 ** np.arange(rank)
    if symmetric:
        signs = np.where(np.arange(rank) % 3 == 2, -1.0, 1.0)  # indefinite, like SPPMI
        dense = (basis * values * signs) @ basis.T
        noise = rng.standard_normal((n, n)) * 0.002
        dense += noise + noise.T
    else:
        right = np.linalg.qr(rng.standard_normal((n, rank)))[0]
        dense = (basis * values) @ right.T + rng.standard_normal((n, n)) * 0.002
    return dense


@pytest.mark.parametrize("symmetric", [True, False])
def test_oracle_embedding_matches_dense_svd(monkeypatch, symmetric):
    monkeypatch.setattr(pip_loss, "DENSE_SVD_MAX_SIZE", 0)
    dense = low_rank_plus_noise(400, 30, seed=7, symmetric=symmetric)
    dim, alpha = 12, 0.5
    U, values, _ = np.linalg.svd(dense)
    expected = U[:, :dim] * values[:dim] ** alpha
    E = pip_loss.oracle_embedding(sp.csr_matrix(dense), dim, alpha=alpha)
    assert E.shape == (400, dim)
    # Columns may differ in sign (and within equal singular values, by rotation): compare E E^T.
    np.testing.assert_allclose(E @ E.T, expected @ expected.T, atol=1e-6 * values[0])
    _, top = pip_loss.truncated_svd(sp.csr_matrix(dense), dim)
    np.testing.assert_allclose(top, values[:dim], rtol=1e-8)


def test_oracle_embedding_dense_path_and_alpha():
    dense = low_rank_plus_noise(80, 10, seed=8)
    U, values, _ = np.linalg.svd(dense)
    for alpha in (0.0, 0.5, 1.0):
        E = pip_loss.oracle_embedding(sp.csr_matrix(dense), 5, alpha=alpha)
        expected = U[:, :5] * values[:5] ** alpha
        np.testing.assert_allclose(E @ E.T, expected @ expected.T, atol=1e-9)
    with pytest.raises(ValueError):
        pip_loss.oracle_embedding(sp.csr_matrix(dense), 0)


# ---------------------------------------------------------------------------------------------
# Dimension selection

def test_noise_sigma_estimate():
    rng = np.random.default_rng(9)
    n, sigma = 400, 0.3
    signal = low_rank_plus_noise(n, 5, seed=10) * 0
    # Halves carry twice the variance of the full-data estimate.
    half_1 = signal + rng.standard_normal((n, n)) * sigma * math.sqrt(2)
    half_2 = signal + rng.standard_normal((n, n)) * sigma * math.sqrt(2)
    estimate = pip_loss.estimate_noise_sigma(sp.csr_matrix(half_1), sp.csr_matrix(half_2))
    assert estimate == pytest.approx(sigma, rel=0.02)


def test_debias_spectrum_inverts_the_noise_bias():
    rng = np.random.default_rng(11)
    n, sigma = 600, 0.05
    strengths = np.array([6.0, 4.0, 3.0, 2.0]) * sigma * math.sqrt(n)
    basis = np.linalg.qr(rng.standard_normal((n, 4)))[0]
    noisy = (basis * strengths) @ basis.T + rng.standard_normal((n, n)) * sigma
    observed = np.linalg.svd(noisy, compute_uv=False)[:6]
    recovered = pip_loss.debias_spectrum(observed, sigma, noisy.shape)
    np.testing.assert_allclose(recovered[:4], strengths, rtol=0.06)
    assert np.all(recovered[4:] == 0)  # noise-bulk values are not signal


@pytest.mark.parametrize("true_rank", [8, 20])
def test_select_dimension_finds_rank_of_low_rank_plus_noise(true_rank):
    rng = np.random.default_rng(12 + true_rank)
    n, sigma = 300, 0.02
    edge = 2 * sigma * math.sqrt(n)
    basis = np.linalg.qr(rng.standard_normal((n, true_rank)))[0]
    # Well separated signal values, all far above the noise edge, then nothing.
    values = edge * np.linspace(12.0, 4.0, true_rank)
    signal = (basis * values) @ basis.T

    def noise(scale):
        z = rng.standard_normal((n, n)) * scale
        return (z + z.T) / math.sqrt(2)
    half_1 = signal + noise(sigma * math.sqrt(2))
    half_2 = signal + noise(sigma * math.sqrt(2))
    full = (half_1 + half_2) / 2
    best, curve = pip_loss.select_dimension_from_matrices(
        sp.csr_matrix(full), sp.csr_matrix(half_1), sp.csr_matrix(half_2),
        alpha=0.5, max_dim=60, n_trials=2)
    dims, losses = curve
    assert len(dims) == len(losses) == 60 and dims[0] == 1
    assert curve.sigma == pytest.approx(sigma, rel=0.05)
    assert abs(best - true_rank) <= 2
    assert losses[best - 1] == losses.min()
    # Bias falls then variance rises: both ends are worse than the chosen dimension.
    assert losses[0] > losses[best - 1] and losses[-1] > losses[best - 1]


def test_select_dimension_on_a_token_stream():
    rng = np.random.default_rng(13)
    # Two "topics": words 0-19 and 20-39 each co-occur only within their topic.
    sentences = [list(rng.integers(0, 20, 12)) if i % 2 else list(rng.integers(20, 40, 12))
                 for i in range(3000)]
    ids, starts = flatten(sentences)
    best, (dims, losses) = pip_loss.select_dimension(ids, 40, 2, 1, sentence_starts=starts,
                                                     max_dim=30, n_trials=2)
    assert 1 <= best <= 30 and len(dims) == 30 and np.all(np.isfinite(losses))
    assert best >= 2  # two blocks need at least two dimensions


# ---------------------------------------------------------------------------------------------
# Command line: values, paths and Ctrl-C refused or reported in one line

def small_corpus(path):
    topics = [["cat", "dog", "mouse", "the"], ["car", "bus", "train", "a"]]  # words co-occur within a topic
    rng = np.random.default_rng(0)
    path.write_text("\n".join(" ".join(rng.choice(topics[i % 2], 8)) + "." for i in range(300)))
    return path


def cli_flags(tmp_path, corpus, *extra):
    return ["--dataset", str(corpus), "--select-dim", "--vocab-size", "8", "--max-dim", "3", "--trials", "1",
            "--min-count", "1", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "out"), *extra]


def run_main(argv, capsys):
    try:
        code = pip_loss.main(argv)
    except SystemExit as error:
        code = error.code
    return code, capsys.readouterr()


@pytest.mark.parametrize("flags", [["--alpha", "nan"], ["--alpha", "inf"], ["--alpha", "-0.5"], ["--alpha", "2"],
                                   ["--neg", "inf"], ["--neg", "nan"], ["--neg", "0"], ["--seed", "-1"]])
def test_meaningless_values_are_refused_naming_the_flag_before_the_corpus_is_read(tmp_path, capsys, flags):
    code, output = run_main(cli_flags(tmp_path, tmp_path / "absent.txt", *flags), capsys)
    last = output.err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("pip_loss.py: error: " + flags[0]), output.err
    assert "Traceback" not in output.err and not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_shift_that_empties_the_sppmi_matrix_is_one_line_exit_2(tmp_path, capsys):
    code, output = run_main(cli_flags(tmp_path, small_corpus(tmp_path / "c.txt"), "--neg", "1e30"), capsys)
    assert code == 2 and output.err.strip().startswith("error: every PMI of the corpus is below log(1e+30)")
    assert len(output.err.strip().splitlines()) == 1 and "expected PIP loss" not in output.out
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file_is_refused_before_the_corpus_is_read(tmp_path, capsys, monkeypatch):
    import data
    monkeypatch.setattr(data, "load_corpus", lambda *a, **k: pytest.fail("corpus read before --out-dir was checked"))
    (tmp_path / "out").write_text("mine")
    code, output = run_main(cli_flags(tmp_path, small_corpus(tmp_path / "c.txt")), capsys)
    out = tmp_path / "out"
    assert code == 2 and output.err.strip() == f"error: --out-dir {out}: {out} is a file, not a folder"
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.parametrize("place", ["inside the corpus folder", "a link to the corpus"])
def test_an_output_over_the_corpus_is_refused_before_the_corpus_is_read(tmp_path, capsys, monkeypatch, place):
    import data
    monkeypatch.setattr(data, "load_corpus", lambda *a, **k: pytest.fail("corpus read before the outputs were checked"))
    folder = tmp_path / "books"
    folder.mkdir()
    corpus = small_corpus(folder / "c.txt")
    flags = cli_flags(tmp_path, folder if place == "inside the corpus folder" else corpus)
    if place == "inside the corpus folder":
        flags[flags.index("--out-dir") + 1] = str(folder / "curves")
    else:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "pip_select_dim.json").symlink_to(corpus)
    before = corpus.read_bytes()
    code, output = run_main(flags, capsys)
    assert code == 2 and len(output.err.strip().splitlines()) == 1 and "choose another output path" in output.err
    assert corpus.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["c.txt"]


def test_ctrl_c_is_one_line_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(pip_loss, "select_dimension", interrupted)
    code, output = run_main(cli_flags(tmp_path, small_corpus(tmp_path / "c.txt")), capsys)
    assert code == 130 and output.err.strip() == "pip_loss.py: interrupted; files already written are complete"
    assert not (tmp_path / "out").exists()


def test_the_command_line_writes_its_curve(tmp_path, capsys):
    code, output = run_main(cli_flags(tmp_path, small_corpus(tmp_path / "c.txt"), "--neg", "1"), capsys)
    assert code == 0, output.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pip_select_dim.json", "pip_select_dim.png"]
