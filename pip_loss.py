"""SPPMI signal matrix, the two PIP losses, and PIP-loss dimension selection.

Everything here works on plain arrays (numpy, scipy.sparse, or CPU torch tensors for the
embeddings), so the trainer can call it every epoch and nothing imports our other modules
except the command line entry point at the bottom.

Two losses are provided, and they mean different things:

* ``pip_loss_sppmi(W, M)``: the seed project's monitor, mean over all V^2 entries of
  (W W^T - M)^2. It is dominated by the *scale* of W W^T, so it mostly tracks vector norms.
  Kept under its old TensorBoard tag 'PIP loss' so numbers can be compared with the seed.
* ``pip_loss_oracle(E, E_star)``: Yin & Shen (NeurIPS 2018), ||E E^T - E* E*^T||_F against the
  oracle embedding E* = U_d D_d^alpha of the signal matrix. Invariant to rotations of the
  embedding and meaningful across checkpoints; this one picks the best checkpoint.

Neither loss forms a V x V dense matrix: ||A - B||_F^2 = ||A||^2 - 2<A, B> + ||B||^2 is
evaluated with d x d Gram matrices and sparse-times-dense products.
"""
import math
import os
import sys
import threading
import time
import warnings

import numpy as np
import scipy.sparse as sp

# Token positions processed per chunk when counting co-occurrences. Each chunk holds a few
# int64 arrays of this length per window offset, so memory stays around a few hundred MB
# whatever the corpus size.
COUNT_CHUNK_TOKENS = 1 << 21
# Above this many V x V float32 bytes the Monte Carlo noise is regenerated block by block
# on every product instead of being held in memory.
MC_NOISE_BYTES_IN_MEMORY = 1 << 30
# Matrices with at most this many rows (or columns) get an exact dense SVD instead of the
# iterative one: at that size it is both exact and faster.
DENSE_SVD_MAX_SIZE = 2000


# ---------------------------------------------------------------------------------------------
# Co-occurrence counts and SPPMI

def _sentence_index(positions, sentence_starts):
    """Sentence number of each token position (the starts are sorted offsets, first is 0)."""
    return np.searchsorted(sentence_starts, positions, side="right")


def cooccurrence_counts(token_ids, vocab_size, window, sentence_starts=None,
                        chunk_tokens=COUNT_CHUNK_TOKENS):
    """Symmetric window co-occurrence counts as a V x V ``csr_matrix`` of float64.

    Every token at position i is a center and the tokens at i-window .. i+window (same
    sentence, not i itself) are its contexts, so each pair of positions at distance
    1..window counts once in each direction and the matrix is symmetric. Ids >= vocab_size
    are skipped but still occupy their positions (they are real words, just rarer ones).
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError("token_ids must be a 1-D array")
    if vocab_size < 1 or window < 1:
        raise ValueError("vocab_size and window must be positive")
    n_tokens = len(ids)
    if sentence_starts is None:
        starts = np.zeros(1, dtype=np.int64)
    else:
        starts = np.asarray(sentence_starts, dtype=np.int64)
        if starts.ndim != 1 or np.any(np.diff(starts) < 0):
            raise ValueError("sentence_starts must be a sorted 1-D array of offsets")
    vocab_size = int(vocab_size)
    upper = sp.csr_matrix((vocab_size, vocab_size), dtype=np.float64)
    for begin in range(0, n_tokens, chunk_tokens):
        end = min(begin + chunk_tokens, n_tokens)
        # The chunk's centers are begin..end-1; their right-hand contexts reach window further.
        stop = min(end + window, n_tokens)
        segment = ids[begin:stop].astype(np.int64)
        sentence = _sentence_index(np.arange(begin, stop), starts)
        in_vocab = segment < vocab_size
        rows, cols = [], []
        for offset in range(1, window + 1):
            n_centers = min(end - begin, len(segment) - offset)
            if n_centers <= 0:
                break
            left, right = slice(0, n_centers), slice(offset, offset + n_centers)
            keep = (sentence[left] == sentence[right]) & in_vocab[left] & in_vocab[right]
            rows.append(segment[left][keep])
            cols.append(segment[right][keep])
        if not rows:
            continue
        rows, cols = np.concatenate(rows), np.concatenate(cols)
        # Only the "center before context" direction is built per chunk; the transpose added at
        # the end supplies the other direction, which halves the duplicate-summing work.
        chunk = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(vocab_size, vocab_size))
        upper = upper + chunk.tocsr()
    counts = (upper + upper.T).tocsr()
    counts.sum_duplicates()
    counts.sort_indices()
    return counts


def sppmi_from_counts(counts, neg):
    """SPPMI_k = max(PMI - log k, 0) from a co-occurrence count matrix (Levy & Goldberg 2014).

    PMI(w, c) = log(#(w,c) |D| / (#(w) #(c))) with |D| the number of counted pairs and #(w),
    #(c) the row and column sums of the counts. Returns float32 CSR without stored zeros.
    """
    if not neg > 0:
        raise ValueError("neg (the k in SPPMI_k) must be positive")
    counts = sp.csr_matrix(counts, dtype=np.float64)
    counts.sum_duplicates()
    counts.eliminate_zeros()
    total = counts.data.sum()
    n_rows = counts.shape[0]
    if total == 0:
        return sp.csr_matrix(counts.shape, dtype=np.float32)
    row_sums = np.asarray(counts.sum(axis=1)).ravel()
    col_sums = np.asarray(counts.sum(axis=0)).ravel()
    row_of_entry = np.repeat(np.arange(n_rows), np.diff(counts.indptr))
    values = (np.log(counts.data) + math.log(total) - math.log(neg)
              - np.log(row_sums[row_of_entry]) - np.log(col_sums[counts.indices]))
    np.maximum(values, 0.0, out=values)
    result = sp.csr_matrix((values.astype(np.float32), counts.indices.copy(), counts.indptr.copy()),
                           shape=counts.shape)
    result.eliminate_zeros()
    return result


def sppmi(token_ids, vocab_size, window, neg, sentence_starts=None):
    """Shifted positive PMI matrix (V x V ``csr_matrix``, float32) of a token-id array.

    Uses the training window (``window`` words each side, never across a sentence start)
    and only ids < vocab_size, which are the most frequent words since vocabularies are
    sorted by count. ``neg`` is the shift k: SPPMI_k = max(PMI - log k, 0).
    """
    counts = cooccurrence_counts(token_ids, vocab_size, window, sentence_starts)
    return sppmi_from_counts(counts, neg)


# ---------------------------------------------------------------------------------------------
# Sparse times dense, on all cores

def _n_threads():
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1), 8))


def _torch_spmm(matrix, dense):
    """``matrix @ dense`` through torch's CSR kernel (multi-threaded on CPU), or None when
    torch is missing or rejects the input. The scipy arrays are shared, not copied."""
    try:
        import torch
    except ImportError:
        return None
    if matrix.indices.dtype != matrix.indptr.dtype:
        return None
    dtype = np.result_type(matrix.dtype, dense.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            sparse = torch.sparse_csr_tensor(torch.from_numpy(matrix.indptr),
                                             torch.from_numpy(matrix.indices),
                                             torch.from_numpy(matrix.data.astype(dtype, copy=False)),
                                             size=matrix.shape, check_invariants=False)
            return (sparse @ torch.from_numpy(np.ascontiguousarray(dense, dtype=dtype))).numpy()
    except (RuntimeError, TypeError):
        return None


def spmm(matrix, dense):
    """``matrix @ dense`` for a CSR matrix and a dense 2-D array, on all cores.

    scipy's product is single-threaded; torch's CSR kernel uses every core and measured about
    twice as fast here, so it is used when available. The fallback splits the rows over
    threads (scipy's sparse kernels release the GIL).
    """
    matrix = matrix if sp.isspmatrix_csr(matrix) else sp.csr_matrix(matrix)
    dense = np.asarray(dense)
    if matrix.shape[1] != dense.shape[0]:
        raise ValueError(f"cannot multiply {matrix.shape} by {dense.shape}")
    product = _torch_spmm(matrix, dense) if matrix.nnz and dense.size else None
    if product is not None:
        return product
    n_rows = matrix.shape[0]
    out = np.empty((n_rows, dense.shape[1]), dtype=np.result_type(matrix.dtype, dense.dtype))
    n_threads = _n_threads() if matrix.nnz * dense.shape[1] > 10_000_000 else 1
    # Split rows so that each thread gets about the same number of non-zeros.
    cuts = np.searchsorted(matrix.indptr, np.linspace(0, matrix.nnz, n_threads + 1)[1:-1])
    bounds = [0, *sorted(set(int(c) for c in cuts) - {0, n_rows}), n_rows]

    def work(lo, hi):
        out[lo:hi] = matrix[lo:hi] @ dense

    threads = [threading.Thread(target=work, args=(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


# ---------------------------------------------------------------------------------------------
# The two PIP losses

def _as_float64(array):
    """A V x d float64 numpy array from numpy or torch input (detached, moved to CPU)."""
    if hasattr(array, "detach"):  # torch tensor: no torch import needed here
        array = array.detach().cpu().numpy()
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"expected a V x d embedding matrix, got shape {array.shape}")
    return array


def _canonical_csr(matrix):
    """CSR with summed duplicates, so data**2 sums to the squared Frobenius norm."""
    matrix = sp.csr_matrix(matrix)
    if not matrix.has_canonical_format:
        matrix = matrix.copy()
        matrix.sum_duplicates()
    return matrix


def pip_loss_sppmi(W, M):
    """The seed's monitor: mean over all V^2 entries of (W W^T - M)^2, without any V x V array.

    ||W W^T||_F^2 = ||W^T W||_F^2 (a d x d Gram matrix), <W W^T, M> = sum(W * (M W)) (one
    sparse-times-dense product) and ||M||_F^2 is the sum of the squared stored values.
    """
    W = _as_float64(W)
    M = _canonical_csr(M)
    n_words = W.shape[0]
    if M.shape != (n_words, n_words):
        raise ValueError(f"M has shape {M.shape}, expected ({n_words}, {n_words}) to match W")
    gram = W.T @ W
    embedding_sq = float(np.sum(gram * gram))
    cross = float(np.sum(W * spmm(M, W)))
    signal_sq = float(np.sum(np.square(M.data, dtype=np.float64)))
    return max(embedding_sq - 2.0 * cross + signal_sq, 0.0) / (float(n_words) ** 2)


def pip_loss_oracle(E, E_star):
    """Yin & Shen's PIP loss ||E E^T - E* E*^T||_F through d x d Gram matrices.

    ||E E^T - F F^T||_F^2 = ||E^T E||^2 - 2 ||E^T F||^2 + ||F^T F||^2. The three terms are
    large and nearly cancel when E is close to F, so rounding can leave a tiny negative
    number: it is clipped to 0 before the square root.
    """
    E, F = _as_float64(E), _as_float64(E_star)
    if E.shape[0] != F.shape[0]:
        raise ValueError(f"E has {E.shape[0]} rows but E_star has {F.shape[0]}")
    if E.shape == F.shape and np.array_equal(E, F):
        return 0.0  # exact, where the Gram-matrix route would leave rounding noise
    gram_e, gram_f, cross = E.T @ E, F.T @ F, E.T @ F
    squared = np.sum(gram_e * gram_e) - 2.0 * np.sum(cross * cross) + np.sum(gram_f * gram_f)
    return math.sqrt(max(float(squared), 0.0))


# ---------------------------------------------------------------------------------------------
# Truncated SVD and the oracle embedding

def _orthonormal(block):
    return np.linalg.qr(block, mode="reduced")[0]


def _is_symmetric(M, tol=1e-6):
    if M.shape[0] != M.shape[1]:
        return False
    difference = abs(M - M.T)
    scale = abs(M).max() if M.nnz else 0.0
    return difference.nnz == 0 or difference.max() <= tol * max(scale, 1e-300)


def _symmetric_top(M, k, oversample, n_iter, tol, rng):
    """Top-k |eigenvalue| pairs of a symmetric matrix by block subspace iteration.

    Each step multiplies the block by M (one sparse product), re-orthonormalises it, and does
    a Rayleigh-Ritz step: eigenpairs of the small projected matrix Q^T M Q. Ritz values
    converge like (|lambda_{b+1}| / |lambda_i|)^(2 * step) with b = k + oversample, so the
    oversampling is what buys accuracy for the last wanted values. Iteration stops once the
    top-k Ritz values move less than ``tol`` (relative) between steps.
    """
    n = M.shape[0]
    width = min(n, k + oversample)
    # float32 products halve the memory traffic of the sparse product; the orthonormalisation
    # and the small eigenproblem stay in float64.
    work_dtype = np.float32 if M.dtype == np.float32 else np.float64
    Q = _orthonormal(rng.standard_normal((n, width)))
    previous = None
    for step in range(max(1, n_iter)):
        MQ = spmm(M, Q.astype(work_dtype, copy=False)).astype(np.float64, copy=False)
        projected = Q.T @ MQ
        projected = (projected + projected.T) / 2.0
        values, vectors = np.linalg.eigh(projected)
        order = np.argsort(-np.abs(values))[:k]
        top = np.abs(values[order])
        converged = previous is not None and np.max(np.abs(top - previous) / np.maximum(top, 1e-300)) < tol
        if converged or step == max(1, n_iter) - 1:
            break
        previous = top
        Q = _orthonormal(MQ)
    # Ritz vectors of the last projected matrix, expressed on the basis that built it.
    return Q @ vectors[:, order], top


def _general_top(M, k, oversample, n_iter, rng):
    """Top-k singular triplets of a general sparse matrix (randomized SVD with power steps)."""
    n_rows, n_cols = M.shape
    width = min(n_rows, n_cols, k + oversample)
    M_t = M.T.tocsr()
    Q = _orthonormal(spmm(M, rng.standard_normal((n_cols, width))))
    for _ in range(max(0, n_iter)):
        Z = _orthonormal(spmm(M_t, Q))
        Q = _orthonormal(spmm(M, Z))
    small = spmm(M_t, Q).T  # = Q^T M, width x n_cols
    u_small, values, _ = np.linalg.svd(small, full_matrices=False)
    return Q @ u_small[:, :k], values[:k]


def truncated_svd(M, k, oversample=None, n_iter=None, tol=1e-6, seed=0):
    """Left singular vectors (n x k) and the k largest singular values of a sparse matrix.

    Symmetric input uses eigen-decomposition (singular values are |eigenvalues|, left singular
    vectors the eigenvectors); anything else goes through a general randomized SVD.
    """
    M = _canonical_csr(M)
    n_rows, n_cols = M.shape
    k = int(k)
    if not 1 <= k <= min(n_rows, n_cols):
        raise ValueError(f"dimension must be between 1 and {min(n_rows, n_cols)}, got {k}")
    rng = np.random.default_rng(seed)
    if oversample is None:
        oversample = max(20, k // 2)
    if min(n_rows, n_cols) <= DENSE_SVD_MAX_SIZE or k + oversample >= min(n_rows, n_cols):
        # Small enough for an exact dense decomposition, which is then both faster and exact.
        U, values, _ = np.linalg.svd(M.toarray().astype(np.float64), full_matrices=False)
        return U[:, :k], values[:k]
    if _is_symmetric(M):
        return _symmetric_top(M, k, oversample, 15 if n_iter is None else n_iter, tol, rng)
    return _general_top(M, k, oversample, 6 if n_iter is None else n_iter, rng)


def oracle_embedding(M, dim, alpha=0.5, **svd_options):
    """Yin & Shen's oracle embedding E* = U_dim D_dim^alpha (V x dim) of the signal matrix M."""
    U, values = truncated_svd(M, dim, **svd_options)
    return U * values[np.newaxis, :] ** alpha


# ---------------------------------------------------------------------------------------------
# Dimension selection (Yin & Shen 2018)

class DimensionCurve(tuple):
    """``(dims, losses)``: expected oracle PIP loss for each candidate dimension.

    A plain pair, so ``dims, losses = curve`` works; the noise level and the spectra behind
    the estimate ride along as attributes for reports and plots.
    """

    def __new__(cls, dims, losses, sigma=None, observed_spectrum=None, signal_spectrum=None):
        curve = super().__new__(cls, (dims, losses))
        curve.sigma = sigma
        curve.observed_spectrum = observed_spectrum
        curve.signal_spectrum = signal_spectrum
        return curve

    @property
    def dims(self):
        return self[0]

    @property
    def losses(self):
        return self[1]


def split_sentences_in_two(token_ids, sentence_starts, seed=0):
    """Assign each sentence at random to one of two halves of the corpus.

    Returns ((ids_1, starts_1), (ids_2, starts_2)). Whole sentences are dealt at random
    rather than cutting the corpus in the middle, so both halves sample the same
    distribution (a multi-book corpus cut in two would differ by topic, and that difference
    would be mistaken for noise).
    """
    ids = np.asarray(token_ids)
    starts = np.zeros(1, dtype=np.int64) if sentence_starts is None else np.asarray(sentence_starts, dtype=np.int64)
    lengths = np.diff(np.append(starts, len(ids)))
    in_first = np.random.default_rng(seed).random(len(lengths)) < 0.5
    halves = []
    for chosen in (in_first, ~in_first):
        token_mask = np.repeat(chosen, lengths)
        kept_lengths = lengths[chosen]
        half_starts = np.concatenate([[0], np.cumsum(kept_lengths)[:-1]]).astype(np.int64)
        halves.append((ids[token_mask], half_starts))
    return halves[0], halves[1]


def estimate_noise_sigma(M1, M2):
    """Per-entry noise standard deviation of the full-corpus signal matrix.

    Model (Yin & Shen 2018, section 5): an estimate from n samples is M_true + Z with i.i.d.
    zero-mean entries of variance sigma^2 that scales like 1/n. Each half of the corpus has
    half the data, so M_i = M_true + Z_i with Var(Z_i) = 2 sigma^2, and Z_1, Z_2 independent.
    Then M_1 - M_2 = Z_1 - Z_2 has entry variance 4 sigma^2, so
    ||M_1 - M_2||_F^2 ~= 4 sigma^2 * rows * cols and sigma = ||M_1 - M_2||_F / (2 sqrt(rows cols)).
    """
    difference = sp.csr_matrix(M1, dtype=np.float64) - sp.csr_matrix(M2, dtype=np.float64)
    rows, cols = difference.shape
    return float(np.sqrt(np.sum(np.square(difference.data))) / (2.0 * math.sqrt(rows * cols)))


def debias_spectrum(observed, sigma, shape):
    """Signal singular values from observed ones, undoing the upward bias of additive noise.

    For a low-rank signal plus i.i.d. noise of std sigma in an n x m matrix (n >= m), a signal
    singular value x (in units of s = sigma sqrt(n)) shows up as y = sqrt((1 + x^2)(beta + x^2)) / x
    with beta = m / n, when x > beta^(1/4) (Benaych-Georges & Nadakuditi 2012); smaller ones
    drown in the noise bulk, whose edge is y = 1 + sqrt(beta). Inverting that map gives the
    spectrum the Monte Carlo treats as the truth; values under the edge become 0.
    """
    n, m = max(shape), min(shape)
    beta = m / n
    scale = sigma * math.sqrt(n)
    if scale <= 0:
        return np.asarray(observed, dtype=np.float64).copy()
    y = np.asarray(observed, dtype=np.float64) / scale
    signal = np.zeros_like(y)
    above = y > 1.0 + math.sqrt(beta)
    t = y[above] ** 2 - beta - 1.0
    signal[above] = np.sqrt((t + np.sqrt(np.maximum(t * t - 4.0 * beta, 0.0))) / 2.0)
    return signal * scale


def _noisy_top_singular(signal, sigma, n, max_dim, rng, oversample=40, n_iter=3):
    """Top max_dim singular values and left vectors of diag-embedded signal + Gaussian noise.

    Gaussian noise is invariant under orthogonal changes of basis, so the signal's singular
    vectors can be taken as the first coordinate axes without changing the distribution of
    the estimated spectrum or of the overlaps between estimated and true vectors; this saves
    forming U diag(s) U^T. Small sizes use an exact SVD, larger ones randomized subspace
    iteration in float32 (the noise matrix alone is n^2 floats).
    """
    if n * n * 4 > MC_NOISE_BYTES_IN_MEMORY:
        raise ValueError(f"vocabulary of {n} words is too large for the Monte Carlo noise matrix "
                         f"(limit {int(math.sqrt(MC_NOISE_BYTES_IN_MEMORY / 4))} words)")
    noisy = rng.standard_normal((n, n), dtype=np.float32)
    noisy *= np.float32(sigma)
    rank = len(signal)
    noisy[np.arange(rank), np.arange(rank)] += signal.astype(np.float32)
    if n <= DENSE_SVD_MAX_SIZE:
        U, values, _ = np.linalg.svd(noisy.astype(np.float64), full_matrices=False)
        return U[:, :max_dim], values[:max_dim]
    width = min(n, max_dim + oversample)
    Q = np.linalg.qr(noisy @ rng.standard_normal((n, width), dtype=np.float32))[0]
    for _ in range(n_iter):
        Z = np.linalg.qr(noisy.T @ Q)[0]
        Q = np.linalg.qr(noisy @ Z)[0]
    small = (noisy.T @ Q).T.astype(np.float64)
    u_small, values, _ = np.linalg.svd(small, full_matrices=False)
    return Q.astype(np.float64) @ u_small[:, :max_dim], values[:max_dim]


def monte_carlo_pip_curve(signal, sigma, n, max_dim, alpha=0.5, n_trials=3, seed=0, log=None):
    """Expected PIP loss ||E_k E_k^T - E E^T||_F of the k-dim estimate, for k = 1..max_dim.

    E = U diag(signal)^alpha is the oracle of the true matrix; each trial adds fresh noise,
    takes the noisy matrix's top singular pairs (u~_i, l~_i) and evaluates, for every k at once,
    ||E_k E_k^T||^2 = sum_{i<=k} l~_i^(4a), ||E^T E_k||^2 = sum_{i<=k} l~_i^(2a) sum_j s_j^(2a) (u_j . u~_i)^2,
    ||E E^T||^2 = sum_j s_j^(4a), combined as in ||A - B||^2 = ||A||^2 - 2<A, B> + ||B||^2.
    """
    signal = np.asarray(signal, dtype=np.float64)
    signal = signal[signal > 0]
    rng = np.random.default_rng(seed)
    weights = signal ** (2 * alpha)
    oracle_sq = float(np.sum(weights ** 2))
    total = np.zeros(max_dim)
    for trial in range(n_trials):
        started = time.perf_counter()
        U_noisy, values = _noisy_top_singular(signal, sigma, n, max_dim, rng)
        overlap = (U_noisy[: len(signal)] ** 2).T @ weights  # sum_j s_j^(2a) (u_j . u~_i)^2
        estimate_sq = np.cumsum(values ** (4 * alpha))
        cross = np.cumsum(values ** (2 * alpha) * overlap)
        total += np.sqrt(np.maximum(estimate_sq - 2.0 * cross + oracle_sq, 0.0))
        if log:
            log(f"  Monte Carlo trial {trial + 1}/{n_trials}: {time.perf_counter() - started:.1f} s")
    return total / n_trials


def select_dimension_from_matrices(M, M1, M2, alpha=0.5, max_dim=None, signal_rank=None,
                                   n_trials=3, seed=0, log=None):
    """PIP-loss-minimising dimension from the full signal matrix and those of two corpus halves.

    Returns (best_dim, DimensionCurve). sigma comes from the halves, the signal spectrum from
    the top ``signal_rank`` singular values of M (de-biased for the noise), and the expected
    PIP loss of every dimension 1..max_dim from a Monte Carlo over fresh noise.
    """
    n = min(M.shape)
    max_dim = min(n, 500) if max_dim is None else int(max_dim)
    if not 1 <= max_dim <= n:
        raise ValueError(f"max_dim must be between 1 and {n}, got {max_dim}")
    signal_rank = min(n, max(2 * max_dim, 1000)) if signal_rank is None else min(int(signal_rank), n)
    signal_rank = max(signal_rank, max_dim)
    sigma = estimate_noise_sigma(M1, M2)
    started = time.perf_counter()
    # A few subspace steps are enough here: the spectrum only sets the Monte Carlo's signal
    # strengths, and its least accurate (smallest) values sit at or under the noise edge.
    _, observed = truncated_svd(M, signal_rank, oversample=min(100, max(10, signal_rank // 5)),
                                n_iter=4, seed=seed)
    if log:
        log(f"  spectrum: top {signal_rank} singular values in {time.perf_counter() - started:.1f} s")
    signal = debias_spectrum(observed, sigma, M.shape)
    losses = monte_carlo_pip_curve(signal, sigma, n, max_dim, alpha, n_trials, seed, log)
    dims = np.arange(1, max_dim + 1)
    best = int(dims[np.argmin(losses)])
    return best, DimensionCurve(dims, losses, sigma, observed, signal)


def select_dimension(token_ids, vocab_size, window, neg, sentence_starts=None, alpha=0.5,
                     max_dim=None, signal_rank=None, n_trials=3, seed=0, log=None):
    """Yin & Shen's PIP-loss-minimising embedding dimension for a corpus.

    Builds the SPPMI matrix of the whole corpus and of two random halves (by sentence), then
    calls ``select_dimension_from_matrices``. Returns (best_dim, curve) with
    ``dims, losses = curve``.
    """
    started = time.perf_counter()
    full = sppmi(token_ids, vocab_size, window, neg, sentence_starts)
    (ids_1, starts_1), (ids_2, starts_2) = split_sentences_in_two(token_ids, sentence_starts, seed)
    half_1 = sppmi(ids_1, vocab_size, window, neg, starts_1)
    half_2 = sppmi(ids_2, vocab_size, window, neg, starts_2)
    if log:
        log(f"  SPPMI matrices (full + two halves): {time.perf_counter() - started:.1f} s, "
            f"{full.nnz:,} non-zeros in the full one")
    return select_dimension_from_matrices(full, half_1, half_2, alpha, max_dim, signal_rank,
                                          n_trials, seed, log)
