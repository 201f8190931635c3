"""SPPMI signal matrix, the three PIP losses, and PIP-loss dimension selection.

Everything here works on plain arrays (numpy, scipy.sparse, or CPU torch tensors for the
embeddings), so the trainer can call it every epoch and nothing imports our other modules
except the command line entry point at the bottom.

Three losses are provided, and they mean different things:

* ``pip_loss_sppmi(W, M)``: the original sgns_pytorch's monitor, mean over all V^2 entries of
  (W W^T - M)^2. It is dominated by the *scale* of W W^T, so it mostly tracks vector norms.
  Kept under its old TensorBoard tag 'PIP loss' so numbers can be compared with the original sgns_pytorch's.
* ``pip_loss_oracle(E, E_star)``: Yin & Shen (NeurIPS 2018), ||E E^T - E* E*^T||_F against the
  oracle embedding E* = U_d D_d^alpha of the signal matrix. Invariant to rotations of the
  embedding, but not to its scale, which SGNS keeps growing: it can rise while the vectors improve.
* ``pip_loss_normalized(E, E_star)``: 1 - Pearson's r between the cosine similarities of word
  pairs in E and in E*, i.e. the PIP matrices of unit rows compared after standardising them.
  Scale-free; it falls as the vectors improve, and the trainer keeps its best checkpoint.

No loss forms a V x V dense matrix: ||A - B||_F^2 = ||A||^2 - 2<A, B> + ||B||^2 and the sums
the normalized loss needs are evaluated with d x d Gram matrices and sparse-times-dense products.
"""
import math
import os
import signal
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while numpy, scipy and numba load: nothing is written yet
    signal.signal(signal.SIGINT, lambda signum, frame: (os.write(2, b"pip_loss.py: interrupted\n"),
                                                        os._exit(128 + signum)))

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from numba import njit, prange  # noqa: E402

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
# Largest dimension on the selection curve unless asked otherwise (the Monte Carlo cost grows
# with it; the paper's optima for corpora of this size are in the low hundreds).
DEFAULT_MAX_DIM = 300


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
# Sparse times dense, compiled, on all cores
#
# Both products are bound by memory traffic: every stored value fetches a whole dense row.
# Compiled loops over rows (numba, one range of rows a core) run on every core, where scipy's
# product runs on one, and the PIP cross term reads a float32 W as float32 (half the traffic)
# while doing its arithmetic in float64.

@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _csr_times_dense(indptr, indices, data, dense, out, row_blocks):
    width = dense.shape[1]
    for block in prange(len(row_blocks) - 1):
        for row in range(row_blocks[block], row_blocks[block + 1]):
            for c in range(width):
                out[row, c] = 0.0
            for p in range(indptr[row], indptr[row + 1]):
                col = indices[p]
                value = data[p]
                for c in range(width):
                    out[row, c] += value * dense[col, c]


@njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _weighted_gram_sum(indptr, indices, data, W, row_blocks):
    """sum over stored (i, j) of M_ij * (w_i . w_j) = <W W^T, M>, in float64."""
    per_block = np.zeros(len(row_blocks) - 1)
    for block in prange(len(row_blocks) - 1):
        total = 0.0
        for row in range(row_blocks[block], row_blocks[block + 1]):
            for p in range(indptr[row], indptr[row + 1]):
                col = indices[p]
                dot = 0.0
                for c in range(W.shape[1]):
                    dot += np.float64(W[row, c]) * np.float64(W[col, c])
                total += np.float64(data[p]) * dot
        per_block[block] = total
    return per_block.sum()


def _row_blocks(matrix, n_blocks=256):
    """Row ranges holding about equal numbers of stored values: word counts are skewed, so
    equal row counts would leave one core with most of the work."""
    cuts = np.searchsorted(matrix.indptr, np.linspace(0, matrix.nnz, n_blocks + 1), side="left")
    return np.unique(np.concatenate([[0], np.clip(cuts, 0, matrix.shape[0]), [matrix.shape[0]]])).astype(np.int64)


def spmm(matrix, dense):
    """``matrix @ dense`` for a sparse matrix and a dense 2-D array, on all cores."""
    matrix = matrix if sp.isspmatrix_csr(matrix) else sp.csr_matrix(matrix)
    dense = np.ascontiguousarray(dense)
    if matrix.shape[1] != dense.shape[0]:
        raise ValueError(f"cannot multiply {matrix.shape} by {dense.shape}")
    out = np.empty((matrix.shape[0], dense.shape[1]), dtype=np.result_type(matrix.dtype, dense.dtype))
    _csr_times_dense(matrix.indptr, matrix.indices, matrix.data.astype(out.dtype, copy=False),
                     dense.astype(out.dtype, copy=False), out, _row_blocks(matrix))
    return out


# ---------------------------------------------------------------------------------------------
# The three PIP losses

def _as_float_matrix(array):
    """A V x d float32 or float64 numpy array from numpy or torch input (detached, on the CPU)."""
    if hasattr(array, "detach"):  # torch tensor: no torch import needed here
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64)
    if array.ndim != 2:
        raise ValueError(f"expected a V x d embedding matrix, got shape {array.shape}")
    return np.ascontiguousarray(array)


def _as_float64(array):
    """A V x d float64 numpy array from numpy or torch input (detached, moved to CPU)."""
    return _as_float_matrix(array).astype(np.float64, copy=False)


def _canonical_csr(matrix):
    """CSR with summed duplicates, so data**2 sums to the squared Frobenius norm."""
    matrix = sp.csr_matrix(matrix)
    if not matrix.has_canonical_format:
        matrix = matrix.copy()
        matrix.sum_duplicates()
    return matrix


def pip_loss_sppmi(W, M):
    """The original sgns_pytorch's monitor: mean over all V^2 entries of (W W^T - M)^2, without any V x V array.

    ||W W^T||_F^2 = ||W^T W||_F^2 (a d x d Gram matrix), <W W^T, M> = sum(W * (M W)) (one
    sparse-times-dense product) and ||M||_F^2 is the sum of the squared stored values.
    """
    W = _as_float_matrix(W)  # float32 stays float32: exact in float64 arithmetic, half the traffic
    M = _canonical_csr(M)
    n_words = W.shape[0]
    if M.shape != (n_words, n_words):
        raise ValueError(f"M has shape {M.shape}, expected ({n_words}, {n_words}) to match W")
    W64 = W.astype(np.float64, copy=False)
    gram = W64.T @ W64
    embedding_sq = float(np.sum(gram * gram))
    cross = float(_weighted_gram_sum(M.indptr, M.indices, M.data, W, _row_blocks(M)))
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


def _unit_rows(matrix):
    """float64 copy with rows scaled to length 1; an all-zero row (a word without signal) stays zero.
    A float32 input is read as is: one float64 array is written, not two."""
    squared = np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64)
    return np.multiply(matrix, (1.0 / np.sqrt(np.where(squared > 0, squared, 1.0)))[:, np.newaxis])


def pip_loss_normalized(E, E_star):
    """Scale-free PIP loss: 1 - r, with r Pearson's correlation, over all pairs of distinct words,
    between their cosine similarity in E and in the oracle E*.

    Equivalently, half the mean squared difference between the two PIP matrices of unit rows (the
    cosine matrices) once each is standardised over its off-diagonal entries. 0 when E's cosines
    are an increasing linear function of E*'s, about 1 for random vectors, at most 2. It does not
    change under a rotation of E, a positive factor on any of its rows, or a common shift of all its
    cosines (the narrow cone SGNS vectors share). With unit rows U and W, the sums over all V^2
    pairs come from d x d Gram matrices: of the cosines ||U^T 1||^2, of their squares ||U^T U||_F^2,
    of the products ||U^T W||_F^2; the diagonal terms (1, or 0 for a zero row) are taken out.
    """
    E, F = _as_float_matrix(E), _as_float_matrix(E_star)
    if E.shape[0] != F.shape[0]:
        raise ValueError(f"E has {E.shape[0]} rows but E_star has {F.shape[0]}")
    if E.shape[0] < 3:
        raise ValueError(f"the normalized PIP loss needs at least 3 words, got {E.shape[0]}")
    U, W = _unit_rows(E), _unit_rows(F)
    self_u, self_w = np.sum(U * U, axis=1), np.sum(W * W, axis=1)
    n_pairs = U.shape[0] * (U.shape[0] - 1)

    def off_diagonal_mean(total, diagonal):
        return (float(total) - float(np.sum(diagonal))) / n_pairs

    mean_u = off_diagonal_mean(np.sum(U.sum(axis=0) ** 2), self_u)
    mean_w = off_diagonal_mean(np.sum(W.sum(axis=0) ** 2), self_w)
    var_u = off_diagonal_mean(np.sum((U.T @ U) ** 2), self_u ** 2) - mean_u ** 2
    var_w = off_diagonal_mean(np.sum((W.T @ W) ** 2), self_w ** 2) - mean_w ** 2
    if min(var_u, var_w) <= 1e-12:  # all cosines equal: no structure to agree with
        return 1.0
    covariance = off_diagonal_mean(np.sum((U.T @ W) ** 2), self_u * self_w) - mean_u * mean_w
    return min(max(1.0 - covariance / math.sqrt(var_u * var_w), 0.0), 2.0)


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
    n_steps = max(1, n_iter)
    for step in range(n_steps):
        MQ = spmm(M, Q.astype(work_dtype, copy=False)).astype(np.float64, copy=False)
        last = step == n_steps - 1
        # The Rayleigh-Ritz step (a width^2 x n product) only tells whether to stop, so it is
        # done every third step and at the end, not at every step.
        if last or step % 3 == 2:
            projected = Q.T @ MQ
            projected = (projected + projected.T) / 2.0
            values, vectors = np.linalg.eigh(projected)
            order = np.argsort(-np.abs(values))[:k]
            top = np.abs(values[order])
            converged = previous is not None and np.max(np.abs(top - previous) / np.maximum(top, 1e-300)) < tol
            if converged or last:
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
    max_dim = min(n, DEFAULT_MAX_DIM) if max_dim is None else int(max_dim)
    if not 1 <= max_dim <= n:
        raise ValueError(f"max_dim must be between 1 and {n}, got {max_dim}")
    signal_rank = min(n, 2 * max_dim) if signal_rank is None else min(int(signal_rank), n)
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
    if log:
        log(f"  noise sigma {sigma:.4g}; {int(np.sum(signal > 0))} of the top {signal_rank} singular "
            f"values stand above the noise edge {2 * sigma * math.sqrt(max(M.shape)):.4g}")
        if signal_rank < n and signal[-1] > 0:
            log("  warning: the smallest computed singular value is still signal; a larger "
                "signal rank would make the curve's tail more accurate")
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
    if full.nnz == 0:
        raise ValueError(f"every PMI of the corpus is below log({neg:g}): the SPPMI matrix is empty, so every "
                         "dimension would fit it; use a smaller --neg (word2vec uses 5 to 20)")
    (ids_1, starts_1), (ids_2, starts_2) = split_sentences_in_two(token_ids, sentence_starts, seed)
    half_1 = sppmi(ids_1, vocab_size, window, neg, starts_1)
    half_2 = sppmi(ids_2, vocab_size, window, neg, starts_2)
    if log:
        log(f"  SPPMI matrices (full + two halves): {time.perf_counter() - started:.1f} s, "
            f"{full.nnz:,} non-zeros in the full one")
    return select_dimension_from_matrices(full, half_1, half_2, alpha, max_dim, signal_rank,
                                          n_trials, seed, log)


# ---------------------------------------------------------------------------------------------
# Command line: python pip_loss.py --dataset DIR --select-dim

def plot_curve(curve, best_dim, path, title):
    """Save the expected-PIP-loss curve with the chosen dimension marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dims, losses = curve
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(dims, losses, color="tab:blue", label="expected PIP loss (Monte Carlo)")
    ax.axvline(best_dim, color="tab:red", linestyle="--", label=f"minimum: d = {best_dim}")
    ax.set_xlabel("embedding dimension d")
    ax.set_ylabel("E ||E_d E_d^T - E* E*^T||_F")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    import fileio
    fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _parse_args(argv):
    import argparse
    parser = argparse.ArgumentParser(
        prog="pip_loss.py",
        description="PIP-loss tools (Yin & Shen 2018). With --select-dim: estimate the "
                    "embedding dimension that minimises the expected PIP loss for a corpus.")
    parser.add_argument("--dataset", required=True,
                        help="corpus: a directory of .txt files, a .txt file, or a dataset name data.py knows")
    parser.add_argument("--select-dim", action="store_true",
                        help="run the PIP-loss dimension selection (the only action so far; required)")
    parser.add_argument("--vocab-size", type=int, default=10000,
                        help="keep the N most frequent words for the signal matrix (default 10000)")
    parser.add_argument("--window", type=int, default=5, help="context words on each side (default 5)")
    parser.add_argument("--neg", type=float, default=5,
                        help="SPPMI shift k, the number of negative samples (default 5)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="exponent of the singular values in E = U D^alpha (default 0.5)")
    parser.add_argument("--max-dim", type=int, default=DEFAULT_MAX_DIM,
                        help=f"largest dimension on the curve (default {DEFAULT_MAX_DIM})")
    parser.add_argument("--trials", type=int, default=2, help="Monte Carlo trials (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the split and the noise (default 0)")
    parser.add_argument("--min-count", type=int, default=5,
                        help="drop words seen fewer times when building the corpus (default 5)")
    parser.add_argument("--data-dir", default="data", help="where data.py looks for named datasets (default data)")
    parser.add_argument("--cache-dir", default="data/cache", help="corpus cache directory (default data/cache)")
    parser.add_argument("--out-dir", default=None,
                        help="where to write the curve (default saved/runs/select-dim-<timestamp>)")
    args = parser.parse_args(argv)
    if not args.select_dim:
        parser.error("nothing to do: pass --select-dim")
    for name in ("vocab_size", "window", "max_dim", "trials"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(args.neg) and args.neg > 0):
        parser.error(f"--neg must be a positive number, got {args.neg:g}")
    if not 0 <= args.alpha <= 1:  # NaN fails too
        parser.error(f"--alpha must be between 0 and 1 (E = U D^alpha; 0.5 is SGNS's), got {args.alpha:g}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    return args


def _check_paths(args, data):
    """Before the corpus is read: --out-dir can be a folder we write into, and neither file written
    there is the corpus or inside its folder (through links). Raises ValueError or DatasetError."""
    import fileio
    out_dir = Path(args.out_dir)
    existing = next(path for path in (out_dir, *out_dir.parents) if path.exists())
    if not existing.is_dir():
        raise ValueError(f"--out-dir {out_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out-dir {out_dir}: folder {existing} is not writable")
    source = data.resolve_dataset(args.dataset, args.data_dir)
    inputs = {f"the corpus file {path}": path for path in source.files}
    if Path(source.name).is_dir():
        inputs["the corpus folder"] = source.name
    fileio.check_outputs_apart({"--out-dir's curve": out_dir / "pip_select_dim.png",
                                "--out-dir's curve data": out_dir / "pip_select_dim.json"}, inputs)


def main(argv=None):
    """Entry point; user mistakes print one line and exit with status 2, Ctrl-C exits 130."""
    try:
        return _select_dim(_parse_args(argv))
    except KeyboardInterrupt:
        print("pip_loss.py: interrupted; files already written are complete", file=sys.stderr)
        return 128 + signal.SIGINT


def _select_dim(args):
    import json
    try:
        import data  # only the command line needs the corpus reader
    except ImportError as err:
        print(f"error: cannot import data.py: {err}", file=sys.stderr)
        return 2
    import fileio
    out_dir = args.out_dir = args.out_dir or os.path.join("saved", "runs", time.strftime("select-dim-%Y%m%d-%H%M%S"))
    started = time.perf_counter()
    try:
        _check_paths(args, data)
        corpus = data.load_corpus(dataset=args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir,
                                  min_count=args.min_count)
    except (data.DatasetError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    vocab_size = min(args.vocab_size, len(corpus.words))
    max_dim = min(args.max_dim, vocab_size)
    print(f"corpus {corpus.name}: {len(corpus.token_ids):,} tokens, vocabulary {len(corpus.words):,} "
          f"(using the top {vocab_size:,}); loaded in {time.perf_counter() - started:.1f} s")
    try:
        best, curve = select_dimension(corpus.token_ids, vocab_size, args.window, args.neg,
                                       sentence_starts=corpus.sentence_starts, alpha=args.alpha,
                                       max_dim=max_dim, n_trials=args.trials, seed=args.seed, log=print)
    except (ValueError, MemoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dims, losses = curve
    try:
        os.makedirs(out_dir, exist_ok=True)
        png = os.path.join(out_dir, "pip_select_dim.png")
        title = (f"{os.path.basename(os.path.normpath(str(corpus.name)))}: V={vocab_size}, window={args.window}, k={args.neg:g}, "
                 f"alpha={args.alpha:g} -> d={best}")
        plot_curve(curve, best, png, title)
        summary = {"best_dim": best, "dims": dims.tolist(), "losses": losses.tolist(),
                   "sigma": curve.sigma, "vocab_size": vocab_size, "window": args.window,
                   "neg": args.neg, "alpha": args.alpha, "trials": args.trials, "seed": args.seed,
                   "corpus_hash": corpus.hash}
        fileio.atomic_write(Path(out_dir) / "pip_select_dim.json", lambda tmp: tmp.write_text(json.dumps(summary)))
    except OSError as err:
        print(f"error: cannot write the curve: {err}", file=sys.stderr)
        return 2
    print(f"PIP-loss-minimising dimension: {best} (expected PIP loss {losses[best - 1]:.4g}; "
          f"curve in {png}; {time.perf_counter() - started:.1f} s in all)")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on main reports Ctrl-C in one line
    sys.exit(main())
